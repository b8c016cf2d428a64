//! One handler per kind of step. Each gets a [`StepCtx`] — the executor's
//! drivers and settings, the cancellation token (none during a rollback) and
//! the event sink — and keeps any state of its own; none sees the run.

use tokio_util::sync::CancellationToken;

use super::error::StepError;
use super::Inner;
use crate::event::EventKind;
use crate::smoke::SmokeTester;

pub(super) mod blue_green;
pub(super) mod canary;
pub(super) mod flag;
pub(super) mod gate;
pub(super) mod instance;
pub(super) mod traffic;

/// A step that did not fail.
pub(super) enum StepOk {
    /// Done.
    Ok,
    /// Done, with something the operator should know.
    Warning(String),
}

/// What a step did, and the driver attempts (or probes) it took.
pub(super) type Outcome = (Result<StepOk, StepError>, u32);

/// What a step handler may use.
pub(super) struct StepCtx<'a> {
    /// Drivers, timeouts, retries.
    pub(super) inner: &'a Inner,
    /// `None` when the step may not be cancelled (a rollback step).
    pub(super) cancel: Option<&'a CancellationToken>,
    /// Sends an event of the run.
    pub(super) emit: &'a (dyn Fn(EventKind) + Send + Sync),
    /// What runs smoke checks and warm-up requests, if the plan needs it.
    pub(super) smoke: Option<&'a dyn SmokeTester>,
    /// The run's id (who a flag change names).
    pub(super) run: &'a str,
}

/// One driver call's result as an [`Outcome`].
fn done<T>((r, n): (Result<T, StepError>, u32)) -> Outcome {
    (r.map(|_| StepOk::Ok), n)
}
