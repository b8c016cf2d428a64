//! `deploykit recommend`: a decision tree that picks a strategy from three
//! answers (monitoring, traffic, spare capacity), and the comparison table
//! of all four.

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

/// The decision tree: advanced monitoring? → more than 1M requests a day?
/// → canary : rolling; else → can you double resources? → blue-green :
/// rolling. Returns the strategy and the path taken.
pub(crate) fn decide(
    monitoring: bool,
    traffic: Option<u64>,
    double: Option<bool>,
) -> (StrategyKind, Vec<String>) {
    let mut why = Vec::new();
    if monitoring {
        why.push("advanced monitoring: yes".to_string());
        let t = traffic.unwrap_or(0);
        if t > 1_000_000 {
            why.push(format!(
                "traffic: {t} requests/day > 1M, enough for a small canary share to be significant"
            ));
            (StrategyKind::Canary, why)
        } else {
            why.push(format!(
                "traffic: {t} requests/day <= 1M, too little for canary metrics to be significant"
            ));
            (StrategyKind::Rolling, why)
        }
    } else {
        why.push("advanced monitoring: no (canary analysis needs it)".to_string());
        if double.unwrap_or(false) {
            why.push("double resources: yes, so the idle environment can be prepared and tested".to_string());
            (StrategyKind::BlueGreen, why)
        } else {
            why.push("double resources: no".to_string());
            (StrategyKind::Rolling, why)
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
    let monitoring = match args.monitoring {
        Some(m) => m,
        None if interactive => ask(
            "Do you have advanced monitoring (per-version error rate and latency)? [yes/no]",
            yes_no,
        )?,
        None => return Err(missing("--monitoring").into()),
    };
    let (traffic, double) = if monitoring {
        let t = match args.traffic {
            Some(t) => t,
            None if interactive => ask("How many requests a day? (e.g. 2M)", count)?,
            None => return Err(missing("--traffic").into()),
        };
        (Some(t), args.double_resources)
    } else {
        let d = match args.double_resources {
            Some(d) => d,
            None if interactive => ask(
                "Can you run twice the instances during a deployment? [yes/no]",
                yes_no,
            )?,
            None => return Err(missing("--double-resources").into()),
        };
        (args.traffic, Some(d))
    };
    let (kind, why) = decide(monitoring, traffic, double);
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
        outln!("set it with [strategy] kind = \"{kind}\" in deploykit.toml\n");
        out!("{}", table_text());
    }
    Ok(crate::exit::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_decision_tree() {
        assert_eq!(decide(true, Some(2_000_000), None).0, StrategyKind::Canary);
        assert_eq!(decide(true, Some(1_000_000), None).0, StrategyKind::Rolling);
        assert_eq!(decide(false, None, Some(true)).0, StrategyKind::BlueGreen);
        assert_eq!(
            decide(false, Some(5_000_000), Some(false)).0,
            StrategyKind::Rolling
        );
        assert_eq!(count("2M").unwrap(), 2_000_000);
        assert_eq!(count("1_500k").unwrap(), 1_500_000);
        assert!(count("lots").is_err());
    }
}
