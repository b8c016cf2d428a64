//! Why a step did not succeed, kept typed until it becomes an event or a
//! report line.

use std::fmt;
use std::time::Duration;

use crate::error::DriverError;
use crate::gate::GateError;
use crate::names::{Group, InstanceId};

/// Why a step failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
    /// The deployment was cancelled while the step waited.
    #[error("cancelled")]
    Cancelled,
    /// A driver call did not answer within its timeout.
    #[error("timed out after {:.1}s", .0.as_secs_f64())]
    TimedOut(Duration),
    /// A driver call failed (after any retries).
    #[error(transparent)]
    Driver(DriverError),
    /// The step ran and what it checked said no.
    #[error(transparent)]
    Failed(Failure),
    /// The event announcing the step could not be made durable, so the step
    /// did not act.
    #[error("not started, because the journal could not record it: {0}")]
    Journal(crate::error::Error),
}

impl StepError {
    /// Whether the step was refused because the deployment lock was lost:
    /// nothing may act after it, not even a best-effort clean-up.
    pub(crate) fn is_lock_lost(&self) -> bool {
        matches!(self, StepError::Journal(e) if e.is_lock_lost())
    }

    /// The error for a caller that only knows driver errors.
    pub(crate) fn into_driver_error(self) -> DriverError {
        match self {
            StepError::Driver(e) => e,
            other => DriverError::new(other.to_string()),
        }
    }
}

impl From<Failure> for StepError {
    fn from(f: Failure) -> Self {
        StepError::Failed(f)
    }
}

/// What a step found wrong.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Failure {
    /// The executor lacks what the step needs (checked before a run, so only
    /// reachable by a plan run without its checks).
    #[error("no {0} is set")]
    Missing(&'static str),
    /// Health probes ran out.
    #[error("not healthy after {probes} probe(s) {:.1}s apart; last: {last}", interval.as_secs_f64())]
    Unhealthy {
        /// Probes made.
        probes: u32,
        /// Wait between them.
        interval: Duration,
        /// What the last one said.
        last: Probe,
    },
    /// The healthy deadline passed.
    #[error("not healthy within the deadline of {:.1}s ({probes} probe(s)); last: {last}", deadline.as_secs_f64())]
    NotHealthyWithin {
        /// The deadline.
        deadline: Duration,
        /// Probes made.
        probes: u32,
        /// What the last one said.
        last: Probe,
    },
    /// Neither a graceful stop nor a force-stop worked.
    #[error("graceful stop failed ({graceful}) and force-stop failed ({force})")]
    StopFailed {
        /// Why the graceful stop failed.
        graceful: Box<StepError>,
        /// Why the force-stop failed.
        force: Box<StepError>,
    },
    /// A smoke check said no.
    #[error("smoke check {check} failed on {instance} ({address}): {why}")]
    Smoke {
        /// The check, described.
        check: String,
        /// The instance.
        instance: InstanceId,
        /// Its address.
        address: String,
        /// What the tester said.
        why: String,
    },
    /// A group has nothing to warm up.
    #[error("the group {0} has no instances to warm up")]
    NothingToWarm(Group),
    /// A release could not be read for the backup.
    #[error("could not read the release of {instance}: {source}")]
    Backup {
        /// The instance.
        instance: InstanceId,
        /// Why.
        source: Box<StepError>,
    },
    /// A canary gate failed (analysis, inconclusive stage, no promotion).
    #[error(transparent)]
    Gate(GateError),
    /// An integration-test gate said no.
    #[error("gate {name} failed against {group}: {source}")]
    IntegrationGate {
        /// The gate.
        name: String,
        /// The instances it checked.
        group: Group,
        /// What its runner said.
        source: crate::integration::GateFailure,
    },
    /// A feature flag could not be changed.
    #[error("changing the feature flag {flag} failed: {source}")]
    Flag {
        /// The flag.
        flag: String,
        /// What the flag store said.
        source: crate::flags::FlagError,
    },
    /// A gate has no instance to check.
    #[error("the gate {name} has no instance to check: the group {group} is empty")]
    NothingToGate {
        /// The gate.
        name: String,
        /// The group.
        group: Group,
    },
}

/// What one health probe said.
#[derive(Debug)]
pub(crate) enum Probe {
    /// The instance answered unhealthy.
    Unhealthy(String),
    /// The probe call failed.
    Failed(Box<StepError>),
    /// The probe did not answer within its bound.
    TimedOut(Duration),
}

impl fmt::Display for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Probe::Unhealthy(why) => write!(f, "unhealthy: {why}"),
            Probe::Failed(e) => write!(f, "probe failed: {e}"),
            Probe::TimedOut(d) => write!(f, "probe timed out after {:.1}s", d.as_secs_f64()),
        }
    }
}
