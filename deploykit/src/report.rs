//! The outcome of a deployment.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::names::{InstanceId, ReleaseId};

/// The outcome in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// Every instance runs the new release.
    Succeeded,
    /// Finished within the failure budget: some instances failed and stayed
    /// on (or were restored to) their previous release. Not a success.
    Degraded,
    /// Aborted (failure budget exceeded, a failure under an abort-all
    /// policy, or cancellation); every instance is back on its previous
    /// release.
    RolledBack,
    /// Aborted, and at least one instance could not be restored: the fleet is
    /// not on one known version. Those instances are kept out of rotation.
    RollbackFailed,
}

/// What became of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Not touched by the deployment.
    Untouched,
    /// Already on the release; left alone.
    Skipped,
    /// Now runs the new release and serves traffic.
    Updated,
    /// Failed; restored to its previous release and serving again.
    FailedRestored,
    /// Updated, then rolled back to its previous release by an abort.
    RolledBack,
    /// Failed and could not be restored; out of rotation, state unknown.
    Unrecoverable,
    /// Left without traffic by the plan: the idle blue-green environment once
    /// it is stopped (on its previous release), or a canary instance, stopped
    /// once the canary finalized (on the new release) or rolled back (on its
    /// previous release). `release` says which.
    Idle,
}

impl fmt::Display for InstanceStatus {
    /// Words for a person: `failed, restored`, `rolled back`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InstanceStatus::Untouched => "untouched",
            InstanceStatus::Skipped => "skipped (already on the release)",
            InstanceStatus::Updated => "updated",
            InstanceStatus::FailedRestored => "failed, restored",
            InstanceStatus::RolledBack => "rolled back",
            InstanceStatus::Unrecoverable => "unrecoverable",
            InstanceStatus::Idle => "idle",
        })
    }
}

/// The report for one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// The instance.
    pub id: InstanceId,
    /// What became of it.
    pub status: InstanceStatus,
    /// Its release before the deployment.
    pub previous: Option<ReleaseId>,
    /// Its release now, as far as the executor knows (`None` when unknown
    /// or none).
    pub release: Option<ReleaseId>,
    /// The first error it met, if any.
    pub error: Option<String>,
}

/// The check that decided one canary stage: the last one the stage ran
/// (for a stage that failed, the failing one), with the statistical
/// judges' evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageCheck {
    /// The canary stage, 1-based.
    pub stage: usize,
    /// The canary's share of traffic, percent.
    pub weight: u8,
    /// The check's result.
    pub result: crate::analysis::CheckOutcome,
    /// The statistic, interval and effect of each statistical judge that
    /// ran (none with the threshold rules alone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub evidence: Vec<crate::analysis::Evidence>,
    /// The treatment whose guardrails this check guarded, in an experiment
    /// with several treatments (`None` for a canary stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<crate::names::Group>,
}

impl StageCheck {
    /// What was checked, as a person reads it: "canary stage 2 (10%)", or
    /// "treatment checkout-b" for an experiment's treatment, which holds
    /// no stage or share of its own.
    pub fn subject(&self) -> String {
        check_subject(self.stage, self.weight, self.group.as_ref())
    }
}

/// What a check looked at: "canary stage `stage` (`weight`%)", or
/// "treatment `group`" when it guarded a treatment of an experiment.
pub fn check_subject(stage: usize, weight: u8, group: Option<&crate::names::Group>) -> String {
    match group {
        Some(g) => format!("treatment {g}"),
        None => format!("canary stage {stage} ({weight}%)"),
    }
}

/// The result of a deployment: the outcome, a line per instance, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The deployment's id.
    pub deployment: String,
    /// The strategy.
    pub strategy: crate::kinds::StrategyKind,
    /// The release that was deployed: the plan's, or the winner's
    /// release after an experiment with several treatments chose one.
    pub release: ReleaseId,
    /// The outcome.
    pub outcome: OutcomeKind,
    /// Why it is not a success, when it is not.
    pub reason: Option<String>,
    /// One entry per instance of the fleet, in fleet order.
    pub instances: Vec<InstanceReport>,
    /// Total duration (on the `tokio` clock).
    #[serde(with = "crate::duration_ms")]
    pub duration: Duration,
    /// The check that decided each canary stage analysed, in stage order
    /// (none for other strategies).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<StageCheck>,
    /// The last reading of an A/B experiment's test (none for other
    /// strategies): the tallies, effect and p-value it was decided on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experiment: Option<crate::experiment::Reading>,
    /// The last reading of an experiment with several treatments: every
    /// variant's statistics (none for other deployments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variants: Option<crate::experiment::VariantsReading>,
    /// The treatment an experiment with several chose, and its release:
    /// what stable was promoted to (none without a winner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner: Option<crate::plan::ExperimentArm>,
}

impl Report {
    /// Whether every instance runs the new release.
    pub fn is_success(&self) -> bool {
        self.outcome == OutcomeKind::Succeeded
    }

    /// Instances on the new release.
    pub fn succeeded(&self) -> Vec<&InstanceId> {
        self.with(|s| matches!(s, InstanceStatus::Updated | InstanceStatus::Skipped))
    }

    /// Instances that failed (restored or not).
    pub fn failed(&self) -> Vec<&InstanceId> {
        self.with(|s| matches!(s, InstanceStatus::FailedRestored | InstanceStatus::Unrecoverable))
    }

    /// Instances that stayed on (or went back to) their previous release.
    pub fn on_previous(&self) -> Vec<&InstanceId> {
        self.instances
            .iter()
            .filter(|i| match i.status {
                InstanceStatus::FailedRestored | InstanceStatus::RolledBack | InstanceStatus::Untouched => {
                    true
                }
                InstanceStatus::Idle => i.release == i.previous,
                _ => false,
            })
            .map(|i| &i.id)
            .collect()
    }

    /// Instances in an unknown state.
    pub fn unrecoverable(&self) -> Vec<&InstanceId> {
        self.with(|s| s == InstanceStatus::Unrecoverable)
    }

    fn with(&self, f: impl Fn(InstanceStatus) -> bool) -> Vec<&InstanceId> {
        self.instances
            .iter()
            .filter(|i| f(i.status))
            .map(|i| &i.id)
            .collect()
    }
}

impl fmt::Display for Report {
    /// The final summary: counts, then the instances that are not on the
    /// new release and why.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let outcome = match self.outcome {
            OutcomeKind::Succeeded => "SUCCEEDED",
            OutcomeKind::Degraded => "DEGRADED (finished within the failure budget)",
            OutcomeKind::RolledBack => "ROLLED BACK",
            OutcomeKind::RollbackFailed => "ROLLBACK FAILED",
        };
        writeln!(f, "deployment {} of {}: {outcome}", self.deployment, self.release)?;
        writeln!(
            f,
            "  succeeded: {}  failed: {}  on previous release: {}  duration: {:.1}s",
            self.succeeded().len(),
            self.failed().len(),
            self.on_previous().len(),
            self.duration.as_secs_f64()
        )?;
        if let Some(r) = &self.reason {
            writeln!(f, "  reason: {r}")?;
        }
        for i in &self.instances {
            if matches!(i.status, InstanceStatus::Updated | InstanceStatus::Skipped) {
                continue;
            }
            let release = i.release.as_ref().map(|r| r.as_str()).unwrap_or("unknown");
            write!(f, "  {}: {}, on {release}", i.id, i.status)?;
            if let Some(e) = &i.error {
                write!(f, " ({e})")?;
            }
            writeln!(f)?;
        }
        for c in &self.checks {
            match &c.group {
                Some(_) => writeln!(f, "  {}: {}", c.subject(), c.result.without_stage())?,
                None => writeln!(f, "  {}: {}", c.subject(), c.result)?,
            }
            for e in &c.evidence {
                writeln!(f, "    {e}")?;
            }
        }
        if let Some(r) = &self.experiment {
            writeln!(f, "  experiment ({}): {r}", r.verdict)?;
        }
        if let Some(r) = &self.variants {
            writeln!(f, "  experiment ({}): {r}", r.verdict())?;
        }
        if let Some(w) = &self.winner {
            writeln!(
                f,
                "  winner: {} ({}), stable promoted to {}",
                w.group, w.release, w.release
            )?;
        }
        Ok(())
    }
}
