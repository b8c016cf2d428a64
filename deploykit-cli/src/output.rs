//! Turning the event stream into what the operator sees: progress lines and
//! a bar on a terminal, or JSON lines.

use std::io::{IsTerminal, Write};
use std::sync::Mutex;

use deploykit::{Event, EventKind, EventSink, OutcomeKind, Report, StepResult};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Prints events for a person: one line per stage, failure, restore and
/// rollback, with a progress bar over instances when stderr is a terminal.
pub(crate) struct Human {
    bar: ProgressBar,
    release: Mutex<String>,
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
        }
    }

    fn line(&self, at_ms: u64, text: String) {
        let line = format!("[{:>6.1}s] {text}", at_ms as f64 / 1000.0);
        if self.bar.is_hidden() {
            println!("{line}");
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
            } if step == "enable" => {
                let release = self.release.lock().expect("poisoned").clone();
                self.line(t, format!("  ✓ {i} serving {release}"));
                self.bar.inc(1);
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
            EventKind::DeploymentFinished { outcome, .. } => {
                let word = match outcome {
                    OutcomeKind::Succeeded => "succeeded",
                    OutcomeKind::Degraded => "finished degraded",
                    OutcomeKind::RolledBack => "rolled back",
                    OutcomeKind::RollbackFailed => "ROLLBACK FAILED",
                };
                self.line(t, format!("deployment {word}"));
            }
            _ => {}
        }
    }
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

/// The exit code for a finished deployment.
pub(crate) fn exit_code(report: &Report) -> u8 {
    match report.outcome {
        OutcomeKind::Succeeded => crate::exit::SUCCESS,
        OutcomeKind::Degraded | OutcomeKind::RolledBack => crate::exit::FAILED_ROLLED_BACK,
        OutcomeKind::RollbackFailed => crate::exit::UNKNOWN_STATE,
    }
}
