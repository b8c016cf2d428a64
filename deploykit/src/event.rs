//! The typed event stream of a deployment.
//!
//! The executor emits an [`Event`] for every stage and step start and end,
//! every failure, restore and rollback, and the final outcome. Events are
//! serializable; the CLI's `--json` prints them one per line, and the journal
//! stores them. Consumers subscribe with an [`EventSink`].

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::kinds::{StepKind, StrategyKind};
use crate::names::{InstanceId, ReleaseId};
use crate::report::OutcomeKind;

/// One thing that happened during a deployment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the deployment started (on the `tokio` clock, so
    /// virtual in tests).
    pub elapsed_ms: u64,
    /// The deployment's id.
    pub deployment: String,
    /// What happened.
    #[serde(flatten)]
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
#[non_exhaustive]
pub enum EventKind {
    /// The deployment began.
    DeploymentStarted {
        /// The strategy.
        strategy: StrategyKind,
        /// The release being deployed.
        release: ReleaseId,
        /// Instances the plan touches.
        instances: usize,
        /// Stages in the plan.
        stages: usize,
    },
    /// A stage began.
    StageStarted {
        /// 0-based stage index (within the rollout, or within the rollback).
        stage: usize,
        /// Stages in total (in the rollout or rollback).
        of: usize,
        /// The stage's name.
        name: String,
        /// Instances the stage works on.
        instances: Vec<InstanceId>,
        /// Whether the stage belongs to a rollback.
        rollback: bool,
    },
    /// A step began.
    StepStarted {
        /// The stage index.
        stage: usize,
        /// The step's kind (`drain`, `install`, …).
        step: StepKind,
        /// The instance, if any.
        instance: Option<InstanceId>,
        /// Whether this step restores (rollback or per-instance restore).
        rollback: bool,
    },
    /// A step ended.
    StepFinished {
        /// The stage index.
        stage: usize,
        /// The step's kind.
        step: StepKind,
        /// The instance, if any.
        instance: Option<InstanceId>,
        /// Whether this step restores.
        rollback: bool,
        /// How long it took.
        duration_ms: u64,
        /// Attempts made (more than 1 when transient errors were retried).
        attempts: u32,
        /// `ok`, `warning` or `failed`.
        result: StepResult,
    },
    /// A stage ended.
    StageFinished {
        /// The stage index.
        stage: usize,
        /// The stage's name.
        name: String,
        /// Whether it belonged to a rollback.
        rollback: bool,
        /// How long it took.
        duration_ms: u64,
        /// Instances that failed in it.
        failed: usize,
    },
    /// An instance failed; it is being restored.
    InstanceFailed {
        /// The instance.
        instance: InstanceId,
        /// The step that failed.
        step: StepKind,
        /// Why.
        reason: String,
    },
    /// An instance is back on its previous release and serving.
    InstanceRestored {
        /// The instance.
        instance: InstanceId,
        /// The release it is on.
        release: Option<ReleaseId>,
    },
    /// An instance could not be restored; it is kept out of rotation.
    InstanceUnrecoverable {
        /// The instance.
        instance: InstanceId,
        /// Why.
        reason: String,
    },
    /// The deployment is aborting and rolling back.
    RollbackStarted {
        /// Why.
        reason: String,
        /// Instances to roll back.
        instances: Vec<InstanceId>,
    },
    /// Progress of a blue-green warm-up.
    WarmUpProgress {
        /// The environment being warmed up.
        group: crate::names::Group,
        /// Requests answered so far.
        sent: u32,
        /// Requests in all.
        total: u32,
        /// Requests that failed so far (counted, not fatal).
        failed: u32,
    },
    /// One canary analysis check (error rate and p99, canary against stable).
    AnalysisResult {
        /// The canary stage, 1-based.
        stage: usize,
        /// The canary's share of traffic, percent.
        weight: u8,
        /// The typed result.
        result: crate::analysis::CheckOutcome,
        /// Inconclusive checks in a row so far (0 after a pass).
        consecutive_inconclusive: u32,
        /// The statistics of the statistical judges, when selected (each
        /// reads as a sentence).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        evidence: Vec<crate::analysis::Evidence>,
        /// Every value the check measured and its limit (empty in journals
        /// written before measurements were recorded).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        measurements: Vec<crate::analysis::Measurement>,
        /// The treatment whose guardrails were checked, in an experiment
        /// with several treatments: then `stage` is its place among them
        /// and `weight` 0, as no canary stage holds a share. `None` for a
        /// canary (and in journals written before treatments were named).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        group: Option<crate::names::Group>,
    },
    /// One reading of an A/B experiment's test: the tallies, the effect,
    /// the statistic and the always-valid p-value.
    ExperimentReading {
        /// The statistics.
        reading: crate::experiment::Reading,
        /// Time since the experiment started, milliseconds. Serialized as
        /// `experiment_ms`: the event's own `elapsed_ms` is flattened into
        /// the same object, and two fields of one name made every journal
        /// of an experiment unreadable.
        #[serde(rename = "experiment_ms")]
        elapsed_ms: u64,
    },
    /// One reading of an experiment with several treatments: every
    /// variant's tally, rate, effect against the control, raw and
    /// Holm-adjusted p-values.
    ExperimentVariants {
        /// The statistics.
        reading: crate::experiment::VariantsReading,
        /// Time since the experiment started, milliseconds.
        experiment_ms: u64,
    },
    /// An experiment with several treatments chose its winner; recorded
    /// before anything acts on it, so a resumed run promotes the same one.
    ExperimentDecided {
        /// The winning treatment's group.
        winner: crate::names::Group,
        /// Its release: what stable is promoted to.
        release: crate::names::ReleaseId,
    },
    /// After a breach that was not critical, the canary's share stepped
    /// down one step of a ramp-down (the rollback follows the last).
    RampingDown {
        /// The canary stage whose analysis failed.
        stage: usize,
        /// The canary's share now, percent.
        weight: u8,
        /// How long it is held, milliseconds.
        hold_ms: u64,
    },
    /// A chaos entry's fault was injected.
    ChaosInjected {
        /// The entry's index in the canary's `chaos` list.
        entry: usize,
        /// The canary stage.
        stage: usize,
        /// The fault.
        fault: crate::chaos::Fault,
        /// The instances it hit.
        instances: Vec<InstanceId>,
    },
    /// A chaos entry's fault ended (its duration or its stage was over).
    ChaosCleared {
        /// The entry's index.
        entry: usize,
    },
    /// A chaos entry's fault could not be injected or cleared.
    ChaosFailed {
        /// The entry's index.
        entry: usize,
        /// What went wrong.
        message: String,
    },
    /// The canary health watch saw an instance fail its probes that many
    /// times in a row; the gate rolls back.
    CanaryUnhealthy {
        /// The canary stage, 1-based.
        stage: usize,
        /// The canary's share of traffic, percent.
        weight: u8,
        /// The instance.
        instance: InstanceId,
        /// Failed probes in a row.
        failures: u32,
        /// What the last probe saw.
        detail: String,
    },
    /// Progress of a canary stage (percent and seconds), after each check.
    StageProgress {
        /// The canary stage, 1-based.
        stage: usize,
        /// Canary stages in all.
        of: usize,
        /// The canary's share of traffic, percent.
        weight: u8,
        /// How much of the stage's duration has passed, percent.
        percent: u8,
        /// Time held so far. Serialized as `held_ms`: the event's own
        /// `elapsed_ms` (time since the deployment started) is flattened
        /// into the same object.
        #[serde(rename = "held_ms")]
        elapsed_ms: u64,
        /// The stage's duration.
        duration_ms: u64,
    },
    /// A canary stage waits for a manual promotion.
    AwaitingPromotion {
        /// The canary stage, 1-based.
        stage: usize,
        /// The canary's share of traffic, percent.
        weight: u8,
        /// The promotion timeout, if any (then it rolls back).
        timeout_ms: Option<u64>,
    },
    /// A waiting canary stage was promoted.
    Promoted {
        /// The canary stage, 1-based.
        stage: usize,
    },
    /// The releases of a group were recorded before being replaced (the
    /// backup a rollback returns to).
    ReleaseBackedUp {
        /// The group.
        group: crate::names::Group,
        /// Each instance's release at that moment.
        releases: std::collections::BTreeMap<InstanceId, Option<ReleaseId>>,
    },
    /// Something the operator should know that does not fail a step.
    Warning {
        /// The instance, if any.
        instance: Option<InstanceId>,
        /// The message.
        message: String,
    },
    /// The deployment ended.
    DeploymentFinished {
        /// The outcome.
        outcome: OutcomeKind,
        /// Instances now on the new release.
        succeeded: usize,
        /// Instances that failed.
        failed: usize,
        /// Total duration.
        duration_ms: u64,
        /// Why, when not a success.
        reason: Option<String>,
    },
}

/// How a step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "message")]
pub enum StepResult {
    /// It did what it should.
    Ok,
    /// It ended, with something to note (drain timed out, stop was forced).
    Warning(String),
    /// It failed.
    Failed(String),
}

/// Receives the events of a deployment.
///
/// The executor calls [`emit`](Self::emit) for every event, in order, and
/// awaits [`durable`](Self::durable) after each step's
/// [`StepStarted`](EventKind::StepStarted) before the step acts: a sink
/// that persists events (the [journal](crate::state::Journal)) only queues
/// them in `emit` and writes them in `durable`, so the records of steps
/// starting together share one write and one flush.
#[async_trait::async_trait]
pub trait EventSink: Send + Sync {
    /// Called for every event, in order; inline in the executor, so it must
    /// not block for long (write to a channel, a buffer, a progress bar).
    ///
    /// Not idempotent: each call is one more event. It cannot fail; a sink
    /// that cannot take the event keeps the failure for
    /// [`durable`](Self::durable) to report, or drops the event.
    fn emit(&self, event: &Event);

    /// Waits until every event emitted so far is durable, so that the step
    /// the last of them announces may act. The default has nothing to wait
    /// for.
    ///
    /// Idempotent (a second call waits for nothing new). Cancel-safe:
    /// dropping the future only stops the wait; the events stay queued and
    /// are written all the same.
    ///
    /// # Errors
    /// [`Error::Io`](crate::Error::Io) when the events could not be made
    /// durable. The sink may then stay failed, so every later call fails
    /// too: what it holds of the events ends before the failure.
    async fn durable(&self) -> crate::Result<()> {
        Ok(())
    }
}

impl<F: Fn(&Event) + Send + Sync> EventSink for F {
    fn emit(&self, event: &Event) {
        self(event)
    }
}

impl EventSink for tokio::sync::mpsc::UnboundedSender<Event> {
    fn emit(&self, event: &Event) {
        // A closed receiver only means nobody listens any more.
        let _ = self.send(event.clone());
    }
}

/// Several sinks as one.
#[derive(Clone, Default)]
pub struct Fanout(Vec<Arc<dyn EventSink>>);

impl Fanout {
    /// No sinks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a sink.
    pub fn with(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.0.push(sink);
        self
    }
}

impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fanout({} sinks)", self.0.len())
    }
}

#[async_trait::async_trait]
impl EventSink for Fanout {
    fn emit(&self, event: &Event) {
        for s in &self.0 {
            s.emit(event);
        }
    }

    /// Waits for every sink; the first failure, after all were waited for.
    async fn durable(&self) -> crate::Result<()> {
        let mut first = Ok(());
        for s in &self.0 {
            if let Err(e) = s.durable().await {
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// Collects events in memory (handy in tests and examples).
#[derive(Debug, Clone, Default)]
pub struct EventLog(Arc<std::sync::Mutex<Vec<Event>>>);

impl EventLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().expect("event log poisoned").clone()
    }
}

impl EventSink for EventLog {
    fn emit(&self, event: &Event) {
        self.0.lock().expect("event log poisoned").push(event.clone());
    }
}
