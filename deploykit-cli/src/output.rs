//! Turning the event stream into what the operator sees: progress lines and
//! a bar on a terminal, or JSON lines.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use deploykit::analysis::CheckOutcome;
use deploykit::state::{HistoryEntry, Holder, RunKind};
use deploykit::{Event, EventKind, EventSink, Group, InstanceId, OutcomeKind, ReleaseId, Report, StepResult};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::sim::SimLbState;

/// Prints events for a person: one line per stage, failure, restore and
/// rollback, with a progress bar over instances when stderr is a terminal.
pub(crate) struct Human {
    bar: ProgressBar,
    release: Mutex<String>,
    /// The release each (stage, instance) install step of the plan gives.
    installs: Mutex<BTreeMap<(usize, InstanceId), ReleaseId>>,
    /// The release each instance was last given in this run: a treatment's
    /// or a winner's may differ from the deployed one.
    given: Mutex<BTreeMap<InstanceId, ReleaseId>>,
    /// Before every line: the region, when regions deploy side by side.
    prefix: String,
}

impl Human {
    pub(crate) fn new(instances: u64) -> Self {
        let bar = ProgressBar::new(instances);
        if std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} instances {msg}",
                )
                .expect("valid template"),
            );
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        Self {
            bar,
            release: Mutex::new(String::new()),
            installs: Mutex::new(BTreeMap::new()),
            given: Mutex::new(BTreeMap::new()),
            prefix: String::new(),
        }
    }

    /// Learns the release each install step of `plan` gives, so an enabled
    /// instance is named with the release it serves.
    pub(crate) fn learn_plan(&self, plan: &deploykit::Plan) {
        let mut installs = self.installs.lock().expect("poisoned");
        for (n, stage) in plan.stages.iter().enumerate() {
            for step in stage.units.iter().flat_map(|u| &u.steps) {
                if let deploykit::Step::Install { instance, release } = step {
                    installs.insert((n, instance.clone()), release.clone());
                }
            }
        }
    }

    /// Starts every line with `prefix`.
    pub(crate) fn with_prefix(mut self, prefix: String) -> Self {
        self.prefix = prefix;
        self
    }

    fn line(&self, at_ms: u64, text: String) {
        let line = format!("[{:>6.1}s] {}{text}", at_ms as f64 / 1000.0, self.prefix);
        if self.bar.is_hidden() {
            outln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl EventSink for Human {
    fn emit(&self, e: &Event) {
        let t = e.elapsed_ms;
        match &e.kind {
            EventKind::DeploymentStarted {
                strategy,
                release,
                instances,
                stages,
            } => {
                *self.release.lock().expect("poisoned") = release.to_string();
                self.line(
                    t,
                    format!(
                        "{strategy} deployment of {release} to {instances} instance(s), {stages} stage(s)"
                    ),
                );
            }
            EventKind::StageStarted {
                name,
                instances,
                rollback,
                ..
            } => {
                if instances.is_empty() {
                    self.line(t, name.clone());
                } else {
                    let ids: Vec<_> = instances.iter().map(|i| i.as_str()).collect();
                    let name = if *rollback {
                        name.to_uppercase()
                    } else {
                        name.clone()
                    };
                    self.line(t, format!("{name}: {}", ids.join(" ")));
                }
                self.bar.set_message(name.clone());
            }
            EventKind::StepFinished {
                step,
                instance: Some(i),
                rollback: false,
                result: StepResult::Ok | StepResult::Warning(_),
                ..
            } if *step == deploykit::StepKind::Enable => {
                let given = self
                    .given
                    .lock()
                    .expect("poisoned")
                    .get(i)
                    .map(ReleaseId::to_string);
                let release = given.unwrap_or_else(|| self.release.lock().expect("poisoned").clone());
                self.line(t, format!("  ✓ {i} serving {release}"));
                self.bar.inc(1);
            }
            EventKind::StepStarted {
                stage,
                step: deploykit::StepKind::Install,
                instance: Some(i),
                rollback: false,
            } => {
                let installs = self.installs.lock().expect("poisoned");
                if let Some(r) = installs.get(&(*stage, i.clone())) {
                    self.given.lock().expect("poisoned").insert(i.clone(), r.clone());
                }
            }
            EventKind::InstanceFailed { instance, reason, .. } => {
                self.line(t, format!("  ✗ {instance} failed: {reason}"));
            }
            EventKind::InstanceRestored { instance, release } => {
                let r = release.as_ref().map(|r| r.as_str()).unwrap_or("no release");
                self.line(t, format!("  ↺ {instance} back on {r} and serving"));
            }
            EventKind::InstanceUnrecoverable { instance, reason } => {
                self.line(
                    t,
                    format!("  ‼ {instance} could not be restored ({reason}); kept out of rotation"),
                );
            }
            EventKind::RollbackStarted { reason, instances } => {
                self.line(
                    t,
                    format!("ABORT: {reason}; rolling back {} instance(s)", instances.len()),
                );
            }
            EventKind::Warning { instance, message } => {
                let who = instance.as_ref().map(|i| format!("{i}: ")).unwrap_or_default();
                self.line(t, format!("  ! {who}{message}"));
            }
            EventKind::RampingDown {
                stage,
                weight,
                hold_ms,
            } => {
                self.line(
                    t,
                    format!(
                        "  ↘ stage {stage} breached: canary stepped down to {weight}% for {}",
                        deploykit::duration_text::format(std::time::Duration::from_millis(*hold_ms))
                    ),
                );
            }
            EventKind::StageProgress {
                stage,
                of,
                weight,
                percent,
                elapsed_ms,
                duration_ms,
                ..
            } => {
                // Percent and seconds, so the operator sees how long the stage still holds.
                self.bar.set_message(format!(
                    "canary stage {stage}/{of} at {weight}%: {percent}% ({:.0}s of {:.0}s)",
                    *elapsed_ms as f64 / 1000.0,
                    *duration_ms as f64 / 1000.0
                ));
                if *percent >= 100 {
                    self.line(
                        t,
                        format!("  canary stage {stage}/{of} at {weight}% held and passed"),
                    );
                }
            }
            EventKind::AnalysisResult {
                stage,
                result,
                evidence,
                group,
                ..
            } if !matches!(result, CheckOutcome::Pass) => {
                self.line(t, format!("  {}", analysis_line(*stage, group.as_ref(), result)));
                // The statistics behind the decision, one sentence each.
                for e in evidence {
                    self.line(t, format!("    {e}"));
                }
            }
            EventKind::ExperimentReading { reading, elapsed_ms } => {
                // Every reading: the operator watches the evidence build up.
                self.line(
                    t,
                    format!(
                        "  experiment at {:.0}s: {reading}: {}",
                        *elapsed_ms as f64 / 1000.0,
                        reading.verdict
                    ),
                );
            }
            EventKind::ExperimentVariants {
                reading,
                experiment_ms,
            } => {
                self.line(
                    t,
                    format!(
                        "  experiment at {:.0}s: {reading}: {}",
                        *experiment_ms as f64 / 1000.0,
                        reading.verdict()
                    ),
                );
            }
            EventKind::ExperimentDecided { winner, release } => {
                self.line(
                    t,
                    format!("  experiment decided: {winner} wins; every user moves to it, then stable to {release}"),
                );
            }
            EventKind::AwaitingPromotion { stage, weight, .. } => {
                self.line(
                    t,
                    format!(
                        "  canary stage {stage} at {weight}% waits for promotion: `deploykit promote` or `deploykit abort`"
                    ),
                );
            }
            EventKind::Promoted { stage } => self.line(t, format!("  canary stage {stage} promoted")),
            EventKind::WarmUpProgress {
                group,
                sent,
                total,
                failed,
            } => {
                self.bar
                    .set_message(format!("warming up {group}: {sent}/{total} ({failed} failed)"));
                if sent == total {
                    self.line(
                        t,
                        format!("  warmed up {group}: {total} requests, {failed} failed"),
                    );
                }
            }
            EventKind::DeploymentFinished { outcome, .. } => {
                let word = match outcome {
                    OutcomeKind::Succeeded => paint("succeeded", GREEN),
                    OutcomeKind::Degraded => paint("finished degraded", YELLOW),
                    OutcomeKind::RolledBack => paint("rolled back", YELLOW),
                    OutcomeKind::RollbackFailed => paint("ROLLBACK FAILED", RED),
                };
                self.line(t, format!("deployment {word}"));
            }
            _ => {}
        }
    }
}

/// A run's kind as `history` and `status` print it (the same word as in
/// the journal and `--json`).
pub(crate) fn run_kind(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Deploy => "deploy",
        RunKind::Resume => "resume",
        RunKind::Rollback => "rollback",
    }
}

/// A check that did not pass, for a person: a failed rule names its stage
/// and numbers; an inconclusive check is given its stage.
fn analysis_line(stage: usize, treatment: Option<&deploykit::names::Group>, result: &CheckOutcome) -> String {
    match (treatment, result) {
        (Some(g), r) => format!("treatment {g}: {}", r.without_stage()),
        (None, CheckOutcome::Fail { .. }) => result.to_string(),
        (None, other) => format!("canary stage {stage}: {other}"),
    }
}

const GREEN: &str = "32";
const YELLOW: &str = "33";
const RED: &str = "31";

/// Colours `text` when stdout is a terminal and `NO_COLOR` is unset.
pub(crate) fn paint(text: &str, colour: &str) -> String {
    if std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        format!("\x1b[{colour}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// Writes to stdout, dropping what a closed stdout cannot take (see
/// `outln!`); any other write error is as good as a closed stdout here.
pub(crate) fn write_stdout(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_fmt(args).and_then(|()| out.flush());
}

/// Prints every event as one JSON object per line on stdout.
#[derive(Debug, Default)]
pub(crate) struct JsonLines;

impl EventSink for JsonLines {
    fn emit(&self, e: &Event) {
        let mut out = std::io::stdout().lock();
        if let Ok(line) = serde_json::to_string(e) {
            let _ = writeln!(out, "{line}");
        }
    }
}

/// [`JsonLines`] for one region of a multi-region run: each line also
/// names the region, so lines of regions deploying side by side can be
/// told apart.
#[derive(Debug)]
pub(crate) struct RegionJsonLines(pub(crate) String);

impl EventSink for RegionJsonLines {
    fn emit(&self, e: &Event) {
        let Ok(mut v) = serde_json::to_value(e) else {
            return;
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("region".into(), serde_json::Value::String(self.0.clone()));
        }
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
    }
}

/// The exit code for a finished deployment.
pub(crate) fn exit_code(report: &Report) -> u8 {
    match report.outcome {
        OutcomeKind::Succeeded => crate::exit::SUCCESS,
        OutcomeKind::Degraded | OutcomeKind::RolledBack => crate::exit::FAILED_ROLLED_BACK,
        OutcomeKind::RollbackFailed => crate::exit::UNKNOWN_STATE,
    }
}

/// `deploykit status --json`: one object, documented in `docs/cli.md`.
#[derive(Debug, Serialize)]
pub(crate) struct Status {
    /// The application's name.
    pub(crate) app: String,
    /// The process holding the deployment lock; `null` when none does.
    pub(crate) lock: Option<Holder>,
    /// The last run; `null` before the first.
    pub(crate) deployment: Option<LastRun>,
    /// Every instance, in the order of the configuration.
    pub(crate) instances: Vec<InstanceState>,
    /// The live blue-green environment as recorded; `null` when none is.
    pub(crate) live: Option<Group>,
    /// The simulated load balancer's state; `null` for any other kind.
    pub(crate) load_balancer: Option<SimLbState>,
    /// Journals that could not be read, each message naming the file and
    /// the fix; `deployment` is then the newest readable run, which may
    /// not be the last one.
    pub(crate) journal_problems: Vec<String>,
}

/// The last run, in [`Status`].
#[derive(Debug, Serialize)]
pub(crate) struct LastRun {
    /// The run as `deploykit history` shows it.
    pub(crate) history: HistoryEntry,
    /// Instances the run left part-way (drained, stopped or between
    /// releases).
    pub(crate) unsettled: BTreeSet<InstanceId>,
    /// The canary stage waiting for a promotion, if one is.
    pub(crate) awaiting_promotion: Option<usize>,
    /// Each instance's release before the run.
    pub(crate) previous: BTreeMap<InstanceId, Option<ReleaseId>>,
}

/// One instance, in [`Status`], as read from the instance itself.
#[derive(Debug, Serialize)]
pub(crate) struct InstanceState {
    /// Its id.
    pub(crate) id: String,
    /// Its group.
    pub(crate) group: String,
    /// Its address.
    pub(crate) address: String,
    /// The release it runs, `none`, or `unknown (why)`.
    pub(crate) release: String,
    /// `healthy`, `unhealthy: why`, `unknown` or `unreachable: why`.
    pub(crate) health: String,
    /// Whether the simulated load balancer sends it traffic; `null` for any
    /// other kind.
    pub(crate) in_rotation: Option<bool>,
}

#[cfg(test)]
mod tests {
    use deploykit::analysis::AnalysisMetric;

    use super::*;

    #[test]
    fn analysis_lines_read_as_sentences() {
        let fail = CheckOutcome::Fail {
            metric: AnalysisMetric::ErrorRate,
            value: 0.0499,
            threshold: 0.01,
            stage: 1,
        };
        let line = analysis_line(1, None, &fail);
        assert_eq!(line, "canary error rate 4.990 % > threshold 1.000 % at stage 1");
        let no_data = CheckOutcome::NoData {
            reason: "canary error rate has no data".into(),
        };
        assert_eq!(
            analysis_line(2, None, &no_data),
            "canary stage 2: no data (canary error rate has no data)"
        );
        let b: deploykit::names::Group = "canary-b".parse().unwrap();
        let treatment = analysis_line(2, Some(&b), &fail);
        assert_eq!(
            treatment,
            "treatment canary-b: canary error rate 4.990 % > threshold 1.000 %"
        );
        assert_eq!(
            analysis_line(2, Some(&b), &no_data),
            "treatment canary-b: no data (canary error rate has no data)"
        );
        for line in [line, analysis_line(2, None, &no_data), treatment] {
            assert!(!line.contains('{') && !line.contains("Fail"), "{line}");
        }
    }
}
