//! Integration-test gates before promotion: a named check, typically a
//! test-suite command, run against instances that receive no live traffic
//! yet — blue-green's idle environment before the switch, the canary
//! instances before their first traffic stage. A failing gate stops the
//! deployment where it is: nothing has been switched, so the rollback only
//! undoes instances no user has reached.
//!
//! A strategy names its gates ([`BlueGreen::gates`](crate::BlueGreen),
//! [`Canary::gates`](crate::Canary)); each becomes a
//! [`Step::Gate`](crate::Step) in the plan, which the executor hands to the
//! [`GateRunner`] it was built with. The runner decides what a name means:
//! the CLI runs the command of the `[[gitops.gates]]` entry of that name
//! with the targets' URLs in `DEPLOYKIT_TARGET_URLS`; a test scripts the
//! answer in virtual time.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;

use crate::names::ReleaseId;
use crate::traits::Backend;

/// Why a gate said no. The output tail is bounded by the runner (the CLI
/// keeps the last 4 KiB) and ends up in events and journals, so a runner
/// must not put secrets in it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GateFailure {
    /// The check ran and failed.
    #[error("{}", failed_text(*.exit_code, output_tail))]
    Failed {
        /// The exit code, when the check is a process that exited.
        exit_code: Option<i32>,
        /// The end of its output.
        output_tail: String,
    },
    /// The check did not finish within its timeout (and was stopped).
    #[error("timed out after {:.1}s{}", after.as_secs_f64(), tail_text(output_tail))]
    TimedOut {
        /// Its timeout.
        after: Duration,
        /// The end of its output.
        output_tail: String,
    },
    /// The check could not be started at all.
    #[error("cannot run {program}: {source}")]
    CannotRun {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The runner knows no gate of this name.
    #[error("no gate named {0} is configured")]
    Unknown(String),
}

fn tail_text(tail: &str) -> String {
    let t = tail.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("; output ends with: {t}")
    }
}

fn failed_text(code: Option<i32>, tail: &str) -> String {
    let how = match code {
        Some(c) => format!("exit code {c}"),
        None => "killed by a signal".to_string(),
    };
    format!("failed ({how}){}", tail_text(tail))
}

/// Runs the named gates of a plan.
///
/// A runner that knows the gates it is given by name and refuses any
/// other, wired into a blue-green deployment:
///
/// ```
/// use std::sync::Arc;
/// use async_trait::async_trait;
/// use deploykit::integration::{GateFailure, GateRunner};
/// use deploykit::{Backend, BlueGreen, Executor, ReleaseId};
/// use deploykit_testkit::{FakeFleet, FakeLiveStore, FakeSmokeTester};
///
/// #[derive(Debug)]
/// struct Names(Vec<&'static str>);
///
/// #[async_trait]
/// impl GateRunner for Names {
///     async fn run(&self, name: &str, _: &ReleaseId, targets: &[Backend]) -> Result<(), GateFailure> {
///         if !self.0.contains(&name) {
///             return Err(GateFailure::Unknown(name.to_string()));
///         }
///         // A real runner would test each target here.
///         assert!(!targets.is_empty());
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let fleet = FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).live("blue");
/// let exec = Executor::builder()
///     .instances(fleet.instances())
///     .load_balancer(Arc::new(fleet.load_balancer()))
///     .smoke_tester(Arc::new(FakeSmokeTester::new()))
///     .live_store(Arc::new(FakeLiveStore::new()))
///     .gate_runner(Arc::new(Names(vec!["ping"])))
///     .build()?;
/// let bg = BlueGreen { gates: vec!["ping".into()], ..BlueGreen::default() };
/// assert!(bg.deploy(&exec, &ReleaseId::new("v2")?).await?.is_success());
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait GateRunner: Send + Sync + Debug {
    /// Runs gate `name` for `release` against `targets` (the instances
    /// about to be promoted, already healthy).
    ///
    /// - **Idempotent:** as idempotent as the check itself; the executor
    ///   runs it once per plan step and never retries it (a flaky test
    ///   should retry inside itself).
    /// - **Cancel-safe:** dropping the future must stop the check (the CLI's
    ///   processes are killed on drop); the deployment then rolls back.
    /// - **On failure:** the targets are left as the check left them; the
    ///   executor rolls them back, having switched nothing.
    async fn run(&self, name: &str, release: &ReleaseId, targets: &[Backend]) -> Result<(), GateFailure>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_read_as_sentences_with_the_output_tail() {
        let f = GateFailure::Failed {
            exit_code: Some(3),
            output_tail: "2 tests failed\n".into(),
        };
        assert_eq!(
            f.to_string(),
            "failed (exit code 3); output ends with: 2 tests failed"
        );
        let t = GateFailure::TimedOut {
            after: Duration::from_secs(60),
            output_tail: String::new(),
        };
        assert_eq!(t.to_string(), "timed out after 60.0s");
    }

    #[allow(dead_code)]
    fn _obj_safe(_: Box<dyn GateRunner>) {}
}
