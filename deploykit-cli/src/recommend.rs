//! `deploykit recommend`: a decision tree that picks one of the eight
//! strategies from up to seven answers (monitoring, what the release can
//! be shown to, what the question is, traffic, the pace, spare capacity,
//! downtime), and the comparison table of the four basic ones.
//!
//! The three original answers decide as they always did; each later
//! question only refines a branch, and an unanswered one (not on a
//! terminal) counts as "no", so old inputs keep their old answers.

use std::io::{BufRead, IsTerminal, Write};

use clap::Args;

use crate::config::StrategyKind;

/// Recommend a strategy: answers from flags, or asked on the terminal.
#[derive(Debug, Args)]
pub(crate) struct RecommendArgs {
    /// Do you have advanced monitoring (per-version error rate and latency,
    /// e.g. Prometheus)?
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    monitoring: Option<bool>,
    /// Requests per day (e.g. 2000000 or 2M).
    #[arg(long, value_name = "N", value_parser = count)]
    traffic: Option<u64>,
    /// Can you run twice the instances for the length of a deployment?
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    double_resources: Option<bool>,
    /// With monitoring: can the new release take real requests without
    /// real effects (reads, or writes that go nowhere)? Yes: shadow.
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    side_effect_free: Option<bool>,
    /// With monitoring: must a few known users (testers, a beta segment)
    /// see it before anyone else? Yes: dark launch.
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    testers_first: Option<bool>,
    /// With monitoring: is the question "is it better?" (conversion, a
    /// business metric) rather than "is it broken?"? Yes, with the
    /// traffic for it: experiment.
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    business_metric: Option<bool>,
    /// With monitoring and canary traffic: should exposure grow with the
    /// evidence in many small steps, rather than a few reviewed stages?
    /// Yes: ramped.
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    gradual: Option<bool>,
    /// Without monitoring or spare capacity: is a short outage while every
    /// instance restarts acceptable? Yes: recreate.
    #[arg(long, value_name = "yes|no", value_parser = yes_no)]
    downtime_ok: Option<bool>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn yes_no(s: &str) -> Result<bool, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "y" | "yes" | "true" => Ok(true),
        "n" | "no" | "false" => Ok(false),
        _ => Err(format!("{s:?}: answer yes or no")),
    }
}

fn count(s: &str) -> Result<u64, String> {
    let t = s.trim().replace(['_', ','], "");
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1_000),
        Some('m' | 'M') => (&t[..t.len() - 1], 1_000_000),
        Some('g' | 'G' | 'b' | 'B') => (&t[..t.len() - 1], 1_000_000_000),
        _ => (t.as_str(), 1),
    };
    num.parse::<u64>()
        .map(|n| n.saturating_mul(mult))
        .map_err(|_| format!("{s:?} is not a number of requests; write e.g. 500000 or 2M"))
}

/// Above this many requests a day, a small canary share is significant.
const CANARY_TRAFFIC: u64 = 1_000_000;

/// An experiment needs about 8,000 visits per variant to see one point
/// at a 5 % conversion rate (docs/benchmarks.md); below this many requests
/// a day two variants would not get there within a day.
const EXPERIMENT_TRAFFIC: u64 = 16_000;

/// The answers the tree reads; `None` is "not asked" and counts as no.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Answers {
    pub(crate) monitoring: bool,
    pub(crate) traffic: Option<u64>,
    pub(crate) double: Option<bool>,
    pub(crate) side_effect_free: Option<bool>,
    pub(crate) testers_first: Option<bool>,
    pub(crate) business_metric: Option<bool>,
    pub(crate) gradual: Option<bool>,
    pub(crate) downtime_ok: Option<bool>,
}

/// The decision tree. With advanced monitoring: side-effect free → shadow;
/// testers first → dark launch; a business question with enough traffic
/// → experiment; then more than 1M requests a day → ramped (gradual) or
/// canary, else rolling. Without: double resources → blue-green; else a
/// short outage acceptable → recreate, else rolling. Returns the strategy
/// and the path taken.
pub(crate) fn decide(a: Answers) -> (StrategyKind, Vec<String>) {
    let mut why = Vec::new();
    let yes = |o: Option<bool>| o.unwrap_or(false);
    if a.monitoring {
        why.push("advanced monitoring: yes".to_string());
        if yes(a.side_effect_free) {
            why.push(
                "side-effect free: yes, so real requests can be mirrored to it while stable alone answers clients"
                    .to_string(),
            );
            return (StrategyKind::Shadow, why);
        }
        if yes(a.testers_first) {
            why.push(
                "testers first: yes, so only requests matching a header or cookie rule reach it until `deploykit promote`"
                    .to_string(),
            );
            return (StrategyKind::DarkLaunch, why);
        }
        let t = a.traffic.unwrap_or(0);
        if yes(a.business_metric) {
            if t >= EXPERIMENT_TRAFFIC {
                why.push(format!(
                    "business metric: yes, and {t} requests/day >= {EXPERIMENT_TRAFFIC}, enough for about 8,000 visits per variant within a day"
                ));
                return (StrategyKind::Experiment, why);
            }
            why.push(format!(
                "business metric: yes, but {t} requests/day < {EXPERIMENT_TRAFFIC}: too few visits for an experiment to decide within a day, so judge errors and latency instead"
            ));
        }
        if t > CANARY_TRAFFIC {
            why.push(format!(
                "traffic: {t} requests/day > 1M, enough for a small canary share to be significant"
            ));
            if yes(a.gradual) {
                why.push(
                    "gradual: yes, so exposure grows step by step with the analysis running throughout"
                        .to_string(),
                );
                (StrategyKind::Ramped, why)
            } else {
                (StrategyKind::Canary, why)
            }
        } else {
            why.push(format!(
                "traffic: {t} requests/day <= 1M, too little for canary metrics to be significant"
            ));
            (StrategyKind::Rolling, why)
        }
    } else {
        why.push("advanced monitoring: no (canary analysis needs it)".to_string());
        if yes(a.double) {
            why.push("double resources: yes, so the idle environment can be prepared and tested".to_string());
            (StrategyKind::BlueGreen, why)
        } else {
            why.push("double resources: no".to_string());
            if yes(a.downtime_ok) {
                why.push(
                    "downtime acceptable: yes, so every instance is replaced at once, the simplest and fastest".to_string(),
                );
                (StrategyKind::Recreate, why)
            } else {
                (StrategyKind::Rolling, why)
            }
        }
    }
}

/// The comparison table.
pub(crate) const TABLE: &[[&str; 5]] = &[
    ["", "rolling", "blue-green", "canary", "recreate"],
    ["downtime", "none", "none", "none", "yes"],
    [
        "extra resources",
        "one batch",
        "100% (two environments)",
        "the canary instances",
        "none",
    ],
    ["complexity", "low", "medium", "high", "lowest"],
    [
        "deploy time",
        "medium (batch by batch)",
        "fast",
        "slow (stage by stage)",
        "fast",
    ],
    [
        "rollback speed",
        "slow (redeploy)",
        "instant (switch back)",
        "fast (weight to 0)",
        "slow (redeploy)",
    ],
    ["risk", "medium", "low", "lowest", "high"],
    [
        "mixed versions",
        "yes, during the rollout",
        "no",
        "yes, by design",
        "no",
    ],
    [
        "needs an advanced LB",
        "no",
        "yes (atomic switch)",
        "yes (weights)",
        "no",
    ],
    [
        "pre-live testing",
        "no",
        "yes (smoke tests on idle)",
        "on a small share of traffic",
        "no",
    ],
];

fn table_text() -> String {
    let widths: Vec<usize> = (0..5)
        .map(|c| TABLE.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for (n, row) in TABLE.iter().enumerate() {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join(" | ").trim_end());
        out.push('\n');
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            out.push_str(&rule.join("-|-"));
            out.push('\n');
        }
    }
    out
}

fn ask<T>(question: &str, parse: fn(&str) -> Result<T, String>) -> anyhow::Result<T> {
    let stdin = std::io::stdin();
    loop {
        eprint!("{question} ");
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            anyhow::bail!("no answer (end of input)");
        }
        match parse(&line) {
            Ok(v) => return Ok(v),
            Err(e) => eprintln!("  {e}"),
        }
    }
}

pub(crate) fn run(args: RecommendArgs) -> anyhow::Result<u8> {
    let interactive = std::io::stdin().is_terminal();
    let missing = |flag: &str| {
        deploykit::Error::invalid(
            flag,
            "is needed (stdin is not a terminal, so it cannot be asked); pass it as a flag",
        )
    };
    // A refining question: asked on a terminal, else "no".
    let refine = |given: Option<bool>, question: &str| -> anyhow::Result<Option<bool>> {
        match given {
            Some(v) => Ok(Some(v)),
            None if interactive => Ok(Some(ask(question, yes_no)?)),
            None => Ok(None),
        }
    };
    let monitoring = match args.monitoring {
        Some(m) => m,
        None if interactive => ask(
            "Do you have advanced monitoring (per-version error rate and latency)? [yes/no]",
            yes_no,
        )?,
        None => return Err(missing("--monitoring").into()),
    };
    let mut a = Answers {
        monitoring,
        traffic: args.traffic,
        double: args.double_resources,
        side_effect_free: args.side_effect_free,
        testers_first: args.testers_first,
        business_metric: args.business_metric,
        gradual: args.gradual,
        downtime_ok: args.downtime_ok,
    };
    if monitoring {
        a.side_effect_free = refine(
            a.side_effect_free,
            "Can the new release take real requests without real effects (reads, or writes that go nowhere)? [yes/no]",
        )?;
        if a.side_effect_free != Some(true) {
            a.testers_first = refine(
                a.testers_first,
                "Must a few known users (testers, a beta segment) see it before anyone else? [yes/no]",
            )?;
        }
        if a.side_effect_free != Some(true) && a.testers_first != Some(true) {
            a.traffic = Some(match args.traffic {
                Some(t) => t,
                None if interactive => ask("How many requests a day? (e.g. 2M)", count)?,
                None => return Err(missing("--traffic").into()),
            });
            a.business_metric = refine(
                a.business_metric,
                "Is the question \"is it better?\" (conversion, a business metric) rather than \"is it broken?\"? [yes/no]",
            )?;
            if a.traffic.is_some_and(|t| t > CANARY_TRAFFIC) {
                a.gradual = refine(
                    a.gradual,
                    "Should exposure grow in many small steps with the evidence, rather than a few reviewed stages? [yes/no]",
                )?;
            }
        }
    } else {
        let d = match args.double_resources {
            Some(d) => d,
            None if interactive => ask(
                "Can you run twice the instances during a deployment? [yes/no]",
                yes_no,
            )?,
            None => return Err(missing("--double-resources").into()),
        };
        a.double = Some(d);
        if !d {
            a.downtime_ok = refine(
                a.downtime_ok,
                "Is a short outage while every instance restarts acceptable? [yes/no]",
            )?;
        }
    }
    let (kind, why) = decide(a);
    if args.json {
        let table: Vec<serde_json::Value> = TABLE[1..]
            .iter()
            .map(|r| serde_json::json!({"aspect": r[0], "rolling": r[1], "blue-green": r[2], "canary": r[3], "recreate": r[4]}))
            .collect();
        outln!(
            "{}",
            serde_json::json!({ "strategy": kind.to_string(), "because": why, "comparison": table })
        );
    } else {
        outln!("recommended strategy: {kind}");
        for w in &why {
            outln!("  - {w}");
        }
        outln!(
            "set it with [strategy] kind = \"{kind}\" in deploykit.toml{}\n",
            section(kind)
        );
        out!("{}", table_text());
    }
    Ok(crate::exit::SUCCESS)
}

/// Where a strategy's settings go, and its page, for those beyond the four
/// of the table.
fn section(kind: StrategyKind) -> String {
    match kind {
        StrategyKind::Ramped | StrategyKind::Shadow | StrategyKind::DarkLaunch | StrategyKind::Experiment => {
            format!(" and its settings under [strategy.{kind}] (docs/routing.md)")
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_tree() {
        let monitored = |traffic: u64| Answers {
            monitoring: true,
            traffic: Some(traffic),
            ..Answers::default()
        };
        // The original three answers decide as before.
        assert_eq!(decide(monitored(2_000_000)).0, StrategyKind::Canary);
        assert_eq!(decide(monitored(1_000_000)).0, StrategyKind::Rolling);
        let unmonitored = |double: bool| Answers {
            double: Some(double),
            ..Answers::default()
        };
        assert_eq!(decide(unmonitored(true)).0, StrategyKind::BlueGreen);
        assert_eq!(
            decide(Answers {
                traffic: Some(5_000_000),
                ..unmonitored(false)
            })
            .0,
            StrategyKind::Rolling
        );
        // Each refinement.
        let with = |f: fn(&mut Answers), base: Answers| {
            let mut a = base;
            f(&mut a);
            decide(a).0
        };
        assert_eq!(
            with(|a| a.side_effect_free = Some(true), monitored(10)),
            StrategyKind::Shadow
        );
        assert_eq!(
            with(|a| a.testers_first = Some(true), monitored(10)),
            StrategyKind::DarkLaunch
        );
        assert_eq!(
            with(|a| a.business_metric = Some(true), monitored(16_000)),
            StrategyKind::Experiment
        );
        assert_eq!(
            with(|a| a.business_metric = Some(true), monitored(15_999)),
            StrategyKind::Rolling
        );
        assert_eq!(
            with(|a| a.gradual = Some(true), monitored(2_000_000)),
            StrategyKind::Ramped
        );
        assert_eq!(
            with(|a| a.gradual = Some(true), monitored(1_000)),
            StrategyKind::Rolling
        );
        assert_eq!(
            with(|a| a.downtime_ok = Some(true), unmonitored(false)),
            StrategyKind::Recreate
        );
        assert_eq!(
            with(|a| a.downtime_ok = Some(true), unmonitored(true)),
            StrategyKind::BlueGreen
        );
        // Refinements of the monitored branch mean nothing without monitoring.
        assert_eq!(
            with(|a| a.side_effect_free = Some(true), unmonitored(false)),
            StrategyKind::Rolling
        );
        assert_eq!(count("2M").unwrap(), 2_000_000);
        assert_eq!(count("1_500k").unwrap(), 1_500_000);
        assert!(count("lots").is_err());
    }
}
