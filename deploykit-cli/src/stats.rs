//! `deploykit stats` (DORA figures and charts of the journals) and
//! `deploykit postmortem` (a Markdown record of one failed deployment): thin
//! renderings of [`deploykit::stats`].

use std::collections::BTreeMap;
use std::fmt::Write as _;

use clap::Args;
use deploykit::analysis::CheckOutcome;
use deploykit::state::{utc_datetime, HistoryOutcome, JournalSummary, RunKind};
use deploykit::stats::{self, DeploymentRecord, Dora, InstanceFate};
use deploykit::{Event, EventKind};

use crate::cmd::Ctx;
use crate::exit;

/// `deploykit stats`.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// How far back to look: e.g. `30d`, `12h`, `90m` (at most 365d).
    #[arg(long, default_value = "30d")]
    since: String,
}

/// `deploykit postmortem`.
#[derive(Debug, Args)]
pub(crate) struct PostmortemArgs {
    /// The deployment's id (as `deploykit history` lists it).
    deployment: String,
}

/// Why a `stats` or `postmortem` request cannot be answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StatsError {
    /// `--since` is not a duration.
    #[error("--since: `{0}` is not a duration; write e.g. 30d, 12h or 90m (at most 365d)")]
    Since(String),
    /// No journal of that deployment.
    #[error("deployment: no deployment `{id}` in the journals{known}; `deploykit history` lists them")]
    Unknown {
        /// The id asked for.
        id: String,
        /// The newest ids, for the message.
        known: String,
    },
    /// The deployment did not fail.
    #[error(
        "deployment: `{id}` {outcome}; a post-mortem records a deployment that failed, rolled back or was interrupted"
    )]
    NotFailed {
        /// The id.
        id: String,
        /// What it did.
        outcome: &'static str,
    },
}

impl StatsError {
    /// Every one of these is bad input.
    pub(crate) fn code(&self) -> u8 {
        exit::BAD_INPUT
    }
}

/// `30d`, `12h`, `90m`, `45s`, in milliseconds, at most 365 days.
pub(crate) fn parse_since(text: &str) -> Result<u64, StatsError> {
    let bad = || StatsError::Since(text.escape_default().to_string());
    let t = text.trim();
    let ms = match t.strip_suffix('d') {
        Some(days) => {
            let d: u64 = days.parse().map_err(|_| bad())?;
            d.checked_mul(86_400_000).ok_or_else(bad)?
        }
        None => {
            let d = deploykit::parse_duration("since", t).map_err(|_| bad())?;
            u64::try_from(d.as_millis()).map_err(|_| bad())?
        }
    };
    if ms == 0 || ms > 365 * 86_400_000 {
        return Err(bad());
    }
    Ok(ms)
}

/// A duration for a person: `850ms`, `42s`, `2m 30s`, `1h 5m`, `3d 4h`.
pub(crate) fn human_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        _ if ms < 1000 => format!("{ms}ms"),
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

fn when(ms: u64) -> String {
    format!("{} UTC", utc_datetime(ms / 1000))
}

/// One line of block characters, one per value, scaled to the largest.
pub(crate) fn sparkline(values: &[u64]) -> String {
    const BLOCKS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|&v| match (v, max) {
            (0, _) => ' ',
            (_, 0) => BLOCKS[0],
            _ => BLOCKS[((v * 7).div_ceil(max)).min(7) as usize],
        })
        .collect()
}

/// A bar of `width` at most, proportional to `value / max`.
fn bar(value: usize, max: usize, width: usize) -> String {
    let n = if max == 0 {
        0
    } else {
        (value * width).div_ceil(max)
    };
    "█".repeat(n)
}

fn outcome_word(o: HistoryOutcome) -> &'static str {
    match o {
        HistoryOutcome::Succeeded => "succeeded",
        HistoryOutcome::Degraded => "degraded",
        HistoryOutcome::RolledBack => "rolled back",
        HistoryOutcome::RollbackFailed => "rollback failed",
        HistoryOutcome::Interrupted => "interrupted",
        HistoryOutcome::InProgress => "in progress",
    }
}

/// The `--json` document of `stats`.
#[derive(Debug, serde::Serialize)]
struct StatsJson<'a> {
    app: &'a str,
    since_ms: u64,
    until_ms: u64,
    dora: &'a Dora,
    deployments: Vec<&'a DeploymentRecord>,
}

/// `deploykit stats`.
pub(crate) fn stats(ctx: Ctx, args: StatsArgs) -> anyhow::Result<u8> {
    let window = parse_since(&args.since)?;
    let loaded = crate::cmd::runtime()?.block_on(stats::load_from(ctx.backend.as_ref()))?;
    for (path, why) in &loaded.unreadable {
        eprintln!("deploykit: error: {} left out: {why}", path.display());
    }
    let now = deploykit::state::now_ms();
    let since = now.saturating_sub(window);
    let app = ctx.cfg.raw.app.as_str();
    if ctx.g.json {
        let dora = stats::dora(&loaded.records, since, now);
        let doc = StatsJson {
            app,
            since_ms: since,
            until_ms: now,
            dora: &dora,
            deployments: loaded
                .records
                .iter()
                .filter(|r| r.started_at_ms >= since)
                .collect(),
        };
        outln!("{}", serde_json::to_string(&doc)?);
    } else {
        out!("{}", render_stats(app, &loaded.records, since, now));
    }
    Ok(match loaded.unreadable.is_empty() {
        true => exit::SUCCESS,
        false => exit::UNKNOWN_STATE,
    })
}

/// The text `stats` prints: the DORA figures, then charts of the
/// deployments started in `[since, now)`.
pub(crate) fn render_stats(app: &str, records: &[DeploymentRecord], since: u64, now: u64) -> String {
    let d = stats::dora(records, since, now);
    let mut o = String::new();
    let _ = writeln!(o, "{app}: deployments from {} to {}", when(since), when(now));
    let in_window: Vec<&DeploymentRecord> = records
        .iter()
        .filter(|r| (since..now).contains(&r.started_at_ms))
        .collect();
    if in_window.is_empty() {
        let _ = writeln!(o, "\nno runs recorded in this window");
        return o;
    }
    let _ = writeln!(o, "\nDORA");
    let _ = writeln!(
        o,
        "  deployment frequency   {:.2} a day ({} of {} deployment(s) went live)",
        d.deployments_per_day, d.live, d.deployments
    );
    let _ = match d.lead_time {
        Some(l) => writeln!(
            o,
            "  lead time for changes  {} median ({} with a commit time; {} to {})",
            human_ms(l.median_ms),
            l.count,
            human_ms(l.min_ms),
            human_ms(l.max_ms)
        ),
        None => writeln!(
            o,
            "  lead time for changes  unknown (deploy with --commit SHA --commit-time T to measure it)"
        ),
    };
    let _ = match d.change_failure_rate {
        Some(r) => writeln!(
            o,
            "  change failure rate    {:.1}% ({} failed)",
            r * 100.0,
            d.failed
        ),
        None => writeln!(o, "  change failure rate    no deployment ended yet"),
    };
    let _ = match d.recovery_time {
        Some(r) => writeln!(
            o,
            "  recovery time          {} median ({} recovered, {} not yet; {} to {})",
            human_ms(r.median_ms),
            r.count,
            d.unrecovered,
            human_ms(r.min_ms),
            human_ms(r.max_ms)
        ),
        None if d.unrecovered > 0 => writeln!(
            o,
            "  recovery time          {} failed deployment(s) not recovered yet",
            d.unrecovered
        ),
        None => writeln!(o, "  recovery time          no failed deployment"),
    };

    // Runs per day, oldest left; at most 90 columns.
    let days = usize::try_from(now.saturating_sub(since).div_ceil(86_400_000))
        .unwrap_or(1)
        .clamp(1, 90);
    let first_day = now.saturating_sub(days as u64 * 86_400_000);
    let mut per_day = vec![0u64; days];
    let mut failed_per_day = vec![0u64; days];
    for r in in_window.iter().filter(|r| r.kind == RunKind::Deploy && !r.drill) {
        if let Some(slot) = r
            .started_at_ms
            .checked_sub(first_day)
            .map(|x| (x / 86_400_000) as usize)
            .filter(|s| *s < days)
        {
            per_day[slot] += 1;
            if r.outcome.is_failure() {
                failed_per_day[slot] += 1;
            }
        }
    }
    let _ = writeln!(o, "\ndeployments a day, last {days} day(s), oldest left");
    let _ = writeln!(
        o,
        "  all     |{}|  most {} a day",
        sparkline(&per_day),
        per_day.iter().max().unwrap_or(&0)
    );
    let _ = writeln!(o, "  failed  |{}|", sparkline(&failed_per_day));

    let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
    for r in &in_window {
        *outcomes.entry(outcome_word(r.outcome)).or_default() += 1;
    }
    let most = outcomes.values().copied().max().unwrap_or(0);
    let _ = writeln!(o, "\noutcomes (every run)");
    for (word, n) in &outcomes {
        let _ = writeln!(o, "  {word:<16} {:<30} {n}", bar(*n, most, 30));
    }

    let ended: Vec<&&DeploymentRecord> = in_window
        .iter()
        .filter(|r| r.outcome != HistoryOutcome::InProgress)
        .collect();
    let last: Vec<u64> = ended.iter().rev().take(60).rev().map(|r| r.duration_ms).collect();
    if let Some(summary) = stats::DurationSummary::of(last.clone()) {
        let _ = writeln!(
            o,
            "\nduration of the last {} run(s), oldest left\n  |{}|  median {}, longest {}",
            last.len(),
            sparkline(&last),
            human_ms(summary.median_ms),
            human_ms(summary.max_ms)
        );
    }

    let mut by_strategy: BTreeMap<&'static str, (usize, usize, Vec<u64>)> = BTreeMap::new();
    for r in ended.iter().filter(|r| r.kind == RunKind::Deploy && !r.drill) {
        let e = by_strategy.entry(r.strategy.as_str()).or_default();
        e.0 += 1;
        e.1 += usize::from(r.outcome.is_failure());
        e.2.push(r.duration_ms);
    }
    if !by_strategy.is_empty() {
        let _ = writeln!(o, "\nby strategy");
        for (strategy, (n, failed, durations)) in by_strategy {
            let median = stats::DurationSummary::of(durations).map_or(0, |s| s.median_ms);
            let _ = writeln!(
                o,
                "  {strategy:<12} {n} deployment(s), {failed} failed, median {}",
                human_ms(median)
            );
        }
    }
    // A drill rolls back on purpose: counted on its own, not as a failure.
    let drills: Vec<&&DeploymentRecord> = ended.iter().copied().filter(|r| r.drill).collect();
    if !drills.is_empty() {
        let rolled_back = drills
            .iter()
            .filter(|r| r.outcome == HistoryOutcome::RolledBack)
            .count();
        let _ = writeln!(
            o,
            "
drills: {} ({rolled_back} rolled back by their gates; left out of the figures above)",
            drills.len()
        );
    }
    let checks: Vec<&stats::CheckRecord> = in_window.iter().flat_map(|r| &r.checks).collect();
    if !checks.is_empty() {
        let count = |f: fn(&CheckOutcome) -> bool| checks.iter().filter(|c| f(&c.outcome)).count();
        let _ = writeln!(
            o,
            "\ncanary checks: {} passed, {} failed, {} inconclusive",
            count(|c| matches!(c, CheckOutcome::Pass)),
            count(|c| matches!(c, CheckOutcome::Fail { .. })),
            count(CheckOutcome::is_inconclusive)
        );
    }
    o
}

/// `deploykit postmortem`.
pub(crate) fn postmortem(ctx: Ctx, args: PostmortemArgs) -> anyhow::Result<u8> {
    let rt = crate::cmd::runtime()?;
    let loaded = rt.block_on(stats::load_from(ctx.backend.as_ref()))?;
    let at = loaded
        .records
        .iter()
        .position(|r| r.id == args.deployment && r.kind == RunKind::Deploy)
        .ok_or_else(|| StatsError::Unknown {
            id: args.deployment.escape_default().to_string(),
            known: known_ids(&loaded.records),
        })?;
    let record = &loaded.records[at];
    if !record.outcome.is_failure() {
        return Err(StatsError::NotFailed {
            id: record.id.clone(),
            outcome: outcome_word(record.outcome),
        }
        .into());
    }
    let chain = rt.block_on(ctx.backend.chain(&record.id))?;
    let pm = Postmortem::new(&loaded.records, at, &chain);
    if ctx.g.json {
        outln!("{}", serde_json::to_string(&pm)?);
    } else {
        out!("{}", pm.markdown());
    }
    Ok(exit::SUCCESS)
}

fn known_ids(records: &[DeploymentRecord]) -> String {
    let ids: Vec<&str> = records
        .iter()
        .rev()
        .filter(|r| r.kind == RunKind::Deploy)
        .take(5)
        .map(|r| r.id.as_str())
        .collect();
    match ids.is_empty() {
        true => String::new(),
        false => format!(" (the newest: {})", ids.join(", ")),
    }
}

/// One line of a post-mortem's timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct TimelineEntry {
    /// Milliseconds since the Unix epoch.
    at_ms: u64,
    /// The run it belongs to.
    run: String,
    /// What happened, a sentence.
    what: String,
}

/// A post-mortem of one failed deployment.
#[derive(Debug, serde::Serialize)]
pub(crate) struct Postmortem<'a> {
    deployment: &'a DeploymentRecord,
    /// Why it stopped: the rollback's reason, else the outcome's.
    decision: Option<String>,
    /// The check that failed it, when one did.
    deciding_check: Option<&'a stats::CheckRecord>,
    failed_at_ms: Option<u64>,
    recovered_at_ms: Option<u64>,
    recovery_ms: Option<u64>,
    /// The run that recovered the fleet, when not the deployment itself.
    recovered_by: Option<String>,
    timeline: Vec<TimelineEntry>,
}

impl<'a> Postmortem<'a> {
    /// The post-mortem of `records[at]`; `chain` is its journal and those
    /// of the runs that acted on it.
    pub(crate) fn new(records: &'a [DeploymentRecord], at: usize, chain: &[JournalSummary]) -> Self {
        let r = &records[at];
        let recovered_at_ms = stats::recovered_at_ms(records, at);
        let recovered_by = match r.outcome {
            HistoryOutcome::RolledBack => None,
            _ => records[at + 1..]
                .iter()
                .find(|x| x.outcome == HistoryOutcome::Succeeded)
                .map(|x| x.id.clone()),
        };
        let failed_at_ms = r.failed_at_ms();
        let mut timeline = Vec::new();
        for j in chain {
            let start = j.header.started_at_ms;
            timeline.push(TimelineEntry {
                at_ms: start,
                run: j.header.deployment.clone(),
                what: format!(
                    "{} of {} started ({})",
                    crate::output::run_kind(j.header.kind),
                    j.header.release,
                    j.header.strategy
                ),
            });
            for e in &j.events {
                if let Some(what) = timeline_line(e) {
                    timeline.push(TimelineEntry {
                        at_ms: start + e.elapsed_ms,
                        run: j.header.deployment.clone(),
                        what,
                    });
                }
            }
            if let Some(f) = &j.finished {
                timeline.push(TimelineEntry {
                    at_ms: start + f.duration_ms,
                    run: j.header.deployment.clone(),
                    what: format!(
                        "{} ended: {}",
                        crate::output::run_kind(j.header.kind),
                        outcome_word(f.outcome.into())
                    ),
                });
            }
        }
        timeline.sort_by_key(|t| t.at_ms);
        Self {
            deployment: r,
            decision: r.rollback_reason.clone().or_else(|| r.reason.clone()),
            deciding_check: r
                .checks
                .iter()
                .find(|c| matches!(c.outcome, CheckOutcome::Fail { .. }))
                .or_else(|| r.checks.last().filter(|c| c.outcome.is_inconclusive())),
            failed_at_ms,
            recovered_at_ms,
            recovery_ms: recovered_at_ms
                .zip(failed_at_ms)
                .map(|(b, f)| b.saturating_sub(f)),
            recovered_by,
            timeline,
        }
    }

    /// The Markdown text.
    pub(crate) fn markdown(&self) -> String {
        let r = self.deployment;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# Post-mortem: deployment {} of {} ({})\n",
            r.id,
            r.app,
            outcome_word(r.outcome)
        );
        let _ = writeln!(o, "| | |\n|---|---|");
        let _ = writeln!(o, "| release | {} |", md(r.release.as_str()));
        let _ = writeln!(o, "| strategy | {} |", r.strategy);
        let _ = writeln!(o, "| outcome | {} |", outcome_word(r.outcome));
        let _ = writeln!(o, "| started | {} |", when(r.started_at_ms));
        if let Some(end) = r.finished_at_ms() {
            let _ = writeln!(o, "| ended | {} (after {}) |", when(end), human_ms(r.duration_ms));
        }
        if let Some(c) = &r.commit {
            let _ = writeln!(
                o,
                "| commit | {}{} |",
                c.sha,
                c.time_s
                    .and_then(|t| u64::try_from(t).ok())
                    .map(|t| format!(", committed {}", when(t * 1000)))
                    .unwrap_or_default()
            );
        }
        if let Some(f) = self.failed_at_ms {
            let _ = writeln!(
                o,
                "| failure detected | {} ({} into the deployment) |",
                when(f),
                human_ms(f.saturating_sub(r.started_at_ms))
            );
        }
        match (self.recovered_at_ms, self.recovery_ms) {
            (Some(at), Some(took)) => {
                let by = match &self.recovered_by {
                    Some(id) => format!(", by run {id}"),
                    None => ", by its own rollback".into(),
                };
                let _ = writeln!(
                    o,
                    "| recovered | {} ({} after the failure{by}) |",
                    when(at),
                    human_ms(took)
                );
            }
            _ => {
                let _ = writeln!(o, "| recovered | not yet: no later run succeeded |");
            }
        }

        let _ = writeln!(o, "\n## The decision that stopped it\n");
        let _ = writeln!(
            o,
            "{}",
            md(self.decision.as_deref().unwrap_or("no reason was recorded"))
        );
        match self.deciding_check {
            Some(c @ stats::CheckRecord { group: Some(g), .. }) => {
                let _ = writeln!(
                    o,
                    "\nDecided by the check of treatment {} {} into the deployment: {}.",
                    md(g.as_str()),
                    human_ms(c.elapsed_ms),
                    md(&c.outcome.without_stage().to_string())
                );
            }
            Some(c) => {
                let _ = writeln!(
                    o,
                    "\nDecided by the canary check {} into the deployment, at stage {} with {}% of traffic: {}.",
                    human_ms(c.elapsed_ms),
                    c.stage,
                    c.weight,
                    md(&c.outcome.to_string())
                );
            }
            None => {}
        }
        if !r.checks.is_empty() {
            let metrics: Vec<&'static str> = {
                let mut m: Vec<&'static str> = r
                    .checks
                    .iter()
                    .flat_map(|c| c.measurements.iter().map(|m| m.metric.as_label()))
                    .collect();
                m.sort_unstable();
                m.dedup();
                m
            };
            let _ = writeln!(o, "\n### Analysis values (value / limit)\n");
            let _ = write!(o, "| at | stage | weight | result |");
            for m in &metrics {
                let _ = write!(o, " {m} |");
            }
            let _ = write!(o, "\n|---|---|---|---|");
            for _ in &metrics {
                let _ = write!(o, "---|");
            }
            let _ = writeln!(o);
            for c in &r.checks {
                let result = match &c.outcome {
                    CheckOutcome::Pass => "pass",
                    CheckOutcome::Fail { .. } => "**fail**",
                    CheckOutcome::NoData { .. } => "no data",
                    CheckOutcome::ProviderError { .. } => "provider error",
                };
                match &c.group {
                    Some(g) => {
                        let _ = write!(
                            o,
                            "| +{} | treatment {} | – | {result} |",
                            human_ms(c.elapsed_ms),
                            md(g.as_str())
                        );
                    }
                    None => {
                        let _ = write!(
                            o,
                            "| +{} | {} | {}% | {result} |",
                            human_ms(c.elapsed_ms),
                            c.stage,
                            c.weight
                        );
                    }
                }
                for m in &metrics {
                    match c.measurements.iter().find(|x| x.metric.as_label() == *m) {
                        Some(x) => {
                            let _ = write!(o, " {} / {} |", num(x.value), num(x.threshold));
                        }
                        None => o.push_str(" – |"),
                    }
                }
                let _ = writeln!(o);
            }
        }

        let touched: Vec<&stats::InstanceRecord> = r
            .instances
            .iter()
            .filter(|i| i.fate != InstanceFate::Untouched)
            .collect();
        let _ = writeln!(
            o,
            "\n## Instances affected ({} of {})\n",
            touched.len(),
            r.instances.len()
        );
        if touched.is_empty() {
            let _ = writeln!(o, "No step touched an instance.");
        } else {
            let _ = writeln!(
                o,
                "| instance | before | after the deployment | failure |\n|---|---|---|---|"
            );
            for i in touched {
                let failure = match (&i.failed_step, &i.failure) {
                    (Some(step), Some(why)) => format!("{step}: {}", md(why)),
                    (None, Some(why)) => md(why),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {failure} |",
                    i.instance,
                    i.previous.as_ref().map_or("none", |p| p.as_str()),
                    i.fate
                );
            }
        }

        let _ = writeln!(o, "\n## Timeline (UTC)\n");
        let _ = writeln!(o, "| time | run | what |\n|---|---|---|");
        for t in &self.timeline {
            let _ = writeln!(
                o,
                "| {} | {} | {} |",
                utc_datetime(t.at_ms / 1000),
                t.run,
                md(&t.what)
            );
        }
        o
    }
}

/// A number for a table: fractions and seconds with four significant
/// digits.
fn num(v: f64) -> String {
    if v == 0.0 || v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else {
        let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 8) as usize;
        format!("{v:.digits$}")
    }
}

/// Text for a Markdown table cell: pipes escaped, one line.
fn md(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// The timeline sentence of an event, for the events a post-mortem keeps
/// (stages, failures, restores, rollbacks, failed checks, promotions).
fn timeline_line(e: &Event) -> Option<String> {
    Some(match &e.kind {
        EventKind::StageStarted {
            name,
            instances,
            rollback,
            ..
        } => format!(
            "{}stage {name} started on {} instance(s)",
            if *rollback { "rollback " } else { "" },
            instances.len()
        ),
        EventKind::StageFinished {
            name,
            rollback,
            failed,
            ..
        } => format!(
            "{}stage {name} finished, {failed} instance(s) failed",
            if *rollback { "rollback " } else { "" }
        ),
        EventKind::InstanceFailed {
            instance,
            step,
            reason,
        } => format!("{instance} failed at {step}: {reason}"),
        EventKind::InstanceRestored { instance, release } => format!(
            "{instance} restored to {}",
            release.as_ref().map_or("no release", |r| r.as_str())
        ),
        EventKind::InstanceUnrecoverable { instance, reason } => {
            format!("{instance} could not be restored: {reason}")
        }
        EventKind::RollbackStarted { reason, instances } => {
            format!("rollback of {} instance(s) started: {reason}", instances.len())
        }
        EventKind::AnalysisResult {
            result,
            group: Some(g),
            ..
        } if !matches!(result, CheckOutcome::Pass) => {
            format!("check of treatment {g}: {}", result.without_stage())
        }
        EventKind::AnalysisResult {
            stage,
            weight,
            result,
            ..
        } if !matches!(result, CheckOutcome::Pass) => {
            format!("canary check at stage {stage} ({weight}%): {result}")
        }
        EventKind::AwaitingPromotion { stage, weight, .. } => {
            format!("canary stage {stage} ({weight}%) waited for a promotion")
        }
        EventKind::Promoted { stage } => format!("canary stage {stage} promoted"),
        EventKind::Warning { instance, message } => match instance {
            Some(i) => format!("warning on {i}: {message}"),
            None => format!("warning: {message}"),
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_treatment_check_names_its_group_and_a_canary_check_its_stage() {
        let fail = CheckOutcome::Fail {
            metric: deploykit::analysis::AnalysisMetric::ErrorRate,
            value: 0.2,
            threshold: 0.01,
            stage: 2,
        };
        let check = |group: Option<&str>| Event {
            elapsed_ms: 10_000,
            deployment: "d1".into(),
            kind: EventKind::AnalysisResult {
                stage: 2,
                weight: if group.is_some() { 0 } else { 20 },
                result: fail.clone(),
                consecutive_inconclusive: 0,
                evidence: Vec::new(),
                measurements: Vec::new(),
                group: group.map(|g| g.parse().unwrap()),
            },
        };
        assert_eq!(
            timeline_line(&check(Some("canary-c"))).unwrap(),
            "check of treatment canary-c: canary error rate 20.000 % > threshold 1.000 %"
        );
        assert_eq!(
            timeline_line(&check(None)).unwrap(),
            "canary check at stage 2 (20%): canary error rate 20.000 % > threshold 1.000 % at stage 2"
        );
        // A canary's check is journaled as before, and a journal line of
        // before treatments were named reads as a canary's.
        let line = serde_json::to_value(check(None)).unwrap();
        assert!(line.get("group").is_none(), "{line}");
        let old: Event = serde_json::from_value(line).unwrap();
        assert_eq!(old, check(None));
        let named = serde_json::to_value(check(Some("canary-c"))).unwrap();
        assert_eq!(named["group"], "canary-c", "{named}");
    }

    #[test]
    fn since_takes_days_and_the_usual_units_and_names_the_flag_when_wrong() {
        assert_eq!(parse_since("30d").unwrap(), 30 * 86_400_000);
        assert_eq!(parse_since("12h").unwrap(), 12 * 3_600_000);
        assert_eq!(parse_since("90m").unwrap(), 90 * 60_000);
        for bad in ["", "d", "0d", "366d", "soon", "-1d"] {
            let e = parse_since(bad).unwrap_err().to_string();
            assert!(e.starts_with("--since:") && e.contains("30d"), "{bad}: {e}");
        }
    }

    #[test]
    fn sparkline_scales_to_the_largest_and_leaves_zero_blank() {
        assert_eq!(sparkline(&[0, 1, 2, 4, 8]), " ▂▃▅█");
        assert_eq!(sparkline(&[]), "");
        assert_eq!(sparkline(&[3, 3]), "██");
    }

    #[test]
    fn human_durations_use_the_two_largest_units() {
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(42_000), "42.0s");
        assert_eq!(human_ms(150_000), "2m 30s");
        assert_eq!(human_ms(3_900_000), "1h 5m");
        assert_eq!(human_ms(4 * 86_400_000 + 3_600_000), "4d 1h");
    }

    #[test]
    fn numbers_keep_four_significant_digits() {
        assert_eq!(num(0.05), "0.05000");
        assert_eq!(num(0.5), "0.5000");
        assert_eq!(num(12.5), "12.50");
        assert_eq!(num(0.0), "0");
    }
}
