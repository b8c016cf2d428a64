//! From what a run tracked to the [`Report`]: a pure function, so every
//! combination can be tested without running anything.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::names::{InstanceId, ReleaseId};
use crate::plan::{InstanceProgress, Plan};
use crate::report::{InstanceReport, InstanceStatus, OutcomeKind, Report};

/// Where one instance is in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Its rollout unit(s) have not all finished: not started, interrupted,
    /// or failed and not (yet) restored.
    Rolling,
    /// Every step of its rollout unit(s) completed.
    Completed,
    /// Restored (to its previous release, or stopped as the plan says).
    Restored,
    /// A restore failed: its state is unknown.
    Unrestorable,
}

impl Phase {
    /// A restore ran (to the end or not).
    pub(crate) fn is_restore_attempted(self) -> bool {
        matches!(self, Phase::Restored | Phase::Unrestorable)
    }
}

/// What a run knows of one instance of its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Tracked {
    /// What was done to it (the input of the restore steps).
    pub(crate) progress: InstanceProgress,
    /// The first error it met during the rollout.
    pub(crate) error: Option<String>,
    /// Where it is.
    pub(crate) phase: Phase,
    /// The release a rollout step (not a restore after a failure) put it
    /// back on: a rollback plan's units return instances with `Restore`.
    pub(crate) returned_to: Option<ReleaseId>,
    /// The release a rollout step installed on it, when it is not the
    /// plan's (a treatment of an experiment, a winner's promotion).
    pub(crate) installed: Option<ReleaseId>,
    /// A start or health wait of it failed: it may be down though its
    /// progress says running, so a restore starts and probes it before
    /// enabling it.
    pub(crate) health_unknown: bool,
}

impl Tracked {
    pub(crate) fn new(progress: InstanceProgress) -> Self {
        Self {
            progress,
            error: None,
            phase: Phase::Rolling,
            returned_to: None,
            installed: None,
            health_unknown: false,
        }
    }
}

/// Why a run aborted, and whether undoing it beyond single instances failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Abort {
    /// Why it aborted.
    pub(crate) reason: String,
    /// An abort step whose failure fails the rollback failed (e.g. traffic
    /// could not be switched back).
    pub(crate) undo_failed: Option<String>,
}

/// The report of a run of `plan` with id `deployment` on `fleet` (the
/// executor's instances in order): one line per instance the plan knows,
/// and the outcome.
pub(crate) fn report(
    plan: &Plan,
    fleet: &[InstanceId],
    tracked: &BTreeMap<InstanceId, Tracked>,
    abort: Option<&Abort>,
    deployment: String,
    duration: Duration,
) -> Report {
    let instances: Vec<InstanceReport> = fleet
        .iter()
        .filter(|id| plan.previous.contains_key(*id) || plan.skipped.contains(id))
        .map(|id| instance_report(plan, id, tracked.get(id)))
        .collect();
    let (outcome, reason) = outcome(&instances, abort);
    Report {
        deployment,
        strategy: plan.strategy,
        release: plan.release.clone(),
        outcome,
        reason,
        instances,
        duration,
        checks: Vec::new(),
        experiment: None,
        variants: None,
        winner: None,
    }
}

/// One instance's line.
fn instance_report(plan: &Plan, id: &InstanceId, tracked: Option<&Tracked>) -> InstanceReport {
    let previous = plan.previous.get(id).cloned().flatten();
    let Some(t) = tracked else {
        let skipped = plan.skipped.contains(id);
        return InstanceReport {
            id: id.clone(),
            status: if skipped {
                InstanceStatus::Skipped
            } else {
                InstanceStatus::Untouched
            },
            release: if skipped {
                Some(plan.release.clone())
            } else {
                previous.clone()
            },
            previous,
            error: None,
        };
    };
    if t.phase == Phase::Completed && plan.skipped.contains(id) {
        // Moved by an earlier run of the deployment and not undone.
        return InstanceReport {
            id: id.clone(),
            status: InstanceStatus::Skipped,
            release: Some(plan.release.clone()),
            previous,
            error: None,
        };
    }
    let new = t.installed.as_ref().unwrap_or(&plan.release);
    let (status, release) = status(t, plan.leave_stopped.contains(id), &previous, new);
    InstanceReport {
        id: id.clone(),
        status,
        previous,
        release,
        error: t.error.clone(),
    }
}

/// What became of a tracked instance and the release it is on, where
/// `leave_stopped` says the plan leaves it stopped (a canary instance).
fn status(
    t: &Tracked,
    leave_stopped: bool,
    previous: &Option<ReleaseId>,
    new: &ReleaseId,
) -> (InstanceStatus, Option<ReleaseId>) {
    let p = &t.progress;
    match t.phase {
        Phase::Unrestorable => (InstanceStatus::Unrecoverable, None),
        Phase::Completed if t.returned_to.is_some() => {
            let status = if leave_stopped && !p.running {
                InstanceStatus::Idle
            } else {
                InstanceStatus::Updated
            };
            (status, t.returned_to.clone())
        }
        Phase::Restored if leave_stopped => (InstanceStatus::Idle, previous.clone()),
        Phase::Restored if t.error.is_some() => (InstanceStatus::FailedRestored, previous.clone()),
        Phase::Restored => (InstanceStatus::RolledBack, previous.clone()),
        // Stopped once the plan finished with it: on the new release if it
        // was installed.
        Phase::Completed if leave_stopped && !p.running => (
            InstanceStatus::Idle,
            if p.release_changed {
                Some(new.clone())
            } else {
                previous.clone()
            },
        ),
        Phase::Completed if p.release_changed => (InstanceStatus::Updated, Some(new.clone())),
        Phase::Completed if p.running && p.in_rotation => (InstanceStatus::Untouched, previous.clone()),
        // Completed without changing the release, but left stopped or out of
        // rotation: the retired blue-green environment.
        Phase::Completed => (InstanceStatus::Idle, previous.clone()),
        Phase::Rolling if !p.release_changed && p.running && p.in_rotation => {
            (InstanceStatus::Untouched, previous.clone())
        }
        // Left part-way and never restored: nobody knows its state.
        Phase::Rolling => (InstanceStatus::Unrecoverable, None),
    }
}

/// The outcome in one word and why it is not a success.
fn outcome(instances: &[InstanceReport], abort: Option<&Abort>) -> (OutcomeKind, Option<String>) {
    let unrecoverable = instances
        .iter()
        .any(|i| i.status == InstanceStatus::Unrecoverable);
    let failed = instances
        .iter()
        .filter(|i| {
            matches!(
                i.status,
                InstanceStatus::FailedRestored | InstanceStatus::Unrecoverable
            )
        })
        .count();
    match abort {
        Some(Abort {
            reason,
            undo_failed: Some(undo),
        }) => (OutcomeKind::RollbackFailed, Some(format!("{reason}; {undo}"))),
        Some(Abort { reason, .. }) if unrecoverable => (
            OutcomeKind::RollbackFailed,
            Some(format!("{reason}; some instances could not be restored")),
        ),
        Some(Abort { reason, .. }) => (OutcomeKind::RolledBack, Some(reason.clone())),
        None if unrecoverable => (
            OutcomeKind::RollbackFailed,
            Some("some failed instances could not be restored".into()),
        ),
        None if failed == 0 => (OutcomeKind::Succeeded, None),
        None => (
            OutcomeKind::Degraded,
            Some(format!(
                "{failed} instance(s) failed within the failure budget and stayed on their previous release"
            )),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Stage, Step, Unit};

    fn id(s: &str) -> InstanceId {
        InstanceId::new(s).unwrap()
    }

    fn rel(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    /// A plan of `a` and `b` (both on v1) deploying v2; `c` is skipped.
    fn plan() -> Plan {
        let previous = [(id("a"), Some(rel("v1"))), (id("b"), Some(rel("v1")))].into();
        let units = ["a", "b"]
            .iter()
            .map(|i| Unit {
                instance: Some(id(i)),
                steps: vec![Step::Stop { instance: id(i) }],
            })
            .collect();
        Plan::new(
            crate::StrategyKind::Rolling,
            rel("v2"),
            previous,
            vec![Stage {
                if_winner: None,
                name: "batch 1/1".into(),
                units,
            }],
        )
        .with_skipped(vec![id("c")])
    }

    fn fleet() -> Vec<InstanceId> {
        vec![id("a"), id("b"), id("c"), id("elsewhere")]
    }

    fn tracked(phase: Phase, f: impl Fn(&mut InstanceProgress), error: Option<&str>) -> Tracked {
        let mut progress = InstanceProgress::untouched(Some(rel("v1")));
        f(&mut progress);
        Tracked {
            progress,
            error: error.map(String::from),
            phase,
            returned_to: None,
            installed: None,
            health_unknown: false,
        }
    }

    fn updated() -> Tracked {
        tracked(Phase::Completed, |p| p.release_changed = true, None)
    }

    fn run(a: Tracked, b: Tracked, abort: Option<&Abort>) -> Report {
        let map = [(id("a"), a), (id("b"), b)].into();
        report(
            &plan(),
            &fleet(),
            &map,
            abort,
            "d-1".into(),
            Duration::from_secs(3),
        )
    }

    fn statuses(r: &Report) -> Vec<(String, InstanceStatus, Option<String>)> {
        r.instances
            .iter()
            .map(|i| {
                (
                    i.id.to_string(),
                    i.status,
                    i.release.as_ref().map(|r| r.to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn every_instance_updated_is_a_success_in_fleet_order_with_the_skipped_one() {
        let r = run(updated(), updated(), None);
        assert_eq!(r.outcome, OutcomeKind::Succeeded);
        assert_eq!(r.reason, None);
        assert_eq!(
            statuses(&r),
            [
                ("a".into(), InstanceStatus::Updated, Some("v2".into())),
                ("b".into(), InstanceStatus::Updated, Some("v2".into())),
                ("c".into(), InstanceStatus::Skipped, Some("v2".into())),
            ],
            "an instance the plan does not know is left out"
        );
        assert_eq!(
            (r.deployment.as_str(), r.duration),
            ("d-1", Duration::from_secs(3))
        );
    }

    #[test]
    fn a_failure_restored_within_the_budget_is_degraded() {
        let failed = tracked(
            Phase::Restored,
            |p| p.release_changed = true,
            Some("start failed: boom"),
        );
        let r = run(updated(), failed, None);
        assert_eq!(r.outcome, OutcomeKind::Degraded);
        assert!(r
            .reason
            .unwrap()
            .starts_with("1 instance(s) failed within the failure budget"));
        assert_eq!(r.instances[1].status, InstanceStatus::FailedRestored);
        assert_eq!(r.instances[1].release, Some(rel("v1")));
        assert_eq!(r.instances[1].error.as_deref(), Some("start failed: boom"));
    }

    #[test]
    fn an_abort_with_every_instance_restored_is_rolled_back() {
        let abort = Abort {
            reason: "cancelled by the operator".into(),
            undo_failed: None,
        };
        let back = tracked(Phase::Restored, |_| {}, None);
        let not_reached = tracked(Phase::Rolling, |_| {}, None);
        let r = run(back, not_reached, Some(&abort));
        assert_eq!(r.outcome, OutcomeKind::RolledBack);
        assert_eq!(r.reason.as_deref(), Some("cancelled by the operator"));
        assert_eq!(r.instances[0].status, InstanceStatus::RolledBack);
        assert_eq!(r.instances[1].status, InstanceStatus::Untouched);
        assert_eq!(r.instances[1].release, Some(rel("v1")));
    }

    #[test]
    fn an_instance_whose_restore_failed_makes_the_rollback_failed() {
        let abort = Abort {
            reason: "1 instance(s) failed".into(),
            undo_failed: None,
        };
        let lost = tracked(Phase::Unrestorable, |p| p.release_changed = true, Some("x"));
        let r = run(lost, tracked(Phase::Restored, |_| {}, None), Some(&abort));
        assert_eq!(r.outcome, OutcomeKind::RollbackFailed);
        assert_eq!(
            r.reason.as_deref(),
            Some("1 instance(s) failed; some instances could not be restored")
        );
        assert_eq!(
            (r.instances[0].status, r.instances[0].release.clone()),
            (InstanceStatus::Unrecoverable, None)
        );
    }

    #[test]
    fn a_failed_abort_step_makes_the_rollback_failed_and_says_why() {
        let abort = Abort {
            reason: "switch failed".into(),
            undo_failed: Some("switch all traffic to blue failed during the rollback: down".into()),
        };
        let r = run(
            tracked(Phase::Restored, |_| {}, None),
            tracked(Phase::Restored, |_| {}, None),
            Some(&abort),
        );
        assert_eq!(r.outcome, OutcomeKind::RollbackFailed);
        assert_eq!(
            r.reason.as_deref(),
            Some("switch failed; switch all traffic to blue failed during the rollback: down")
        );
    }

    #[test]
    fn a_failure_not_restored_without_an_abort_is_a_failed_rollback() {
        let r = run(updated(), tracked(Phase::Unrestorable, |_| {}, Some("x")), None);
        assert_eq!(r.outcome, OutcomeKind::RollbackFailed);
        assert_eq!(
            r.reason.as_deref(),
            Some("some failed instances could not be restored")
        );
    }

    #[test]
    fn an_instance_left_part_way_is_unrecoverable_not_guessed() {
        let stopped = tracked(Phase::Rolling, |p| p.running = false, None);
        let r = run(updated(), stopped, None);
        assert_eq!(r.instances[1].status, InstanceStatus::Unrecoverable);
        assert_eq!(r.outcome, OutcomeKind::RollbackFailed);
    }

    #[test]
    fn instances_the_plan_leaves_stopped_are_idle_on_the_release_they_run() {
        let mut plan = plan();
        plan.leave_stopped = vec![id("a"), id("b")];
        let finalized = tracked(
            Phase::Completed,
            |p| {
                p.release_changed = true;
                p.running = false;
            },
            None,
        );
        let restored = tracked(Phase::Restored, |p| p.release_changed = true, None);
        let map = [(id("a"), finalized), (id("b"), restored)].into();
        let r = report(&plan, &fleet(), &map, None, "d".into(), Duration::ZERO);
        assert_eq!(
            statuses(&r)[..2],
            [
                ("a".into(), InstanceStatus::Idle, Some("v2".into())),
                ("b".into(), InstanceStatus::Idle, Some("v1".into())),
            ]
        );
    }

    #[test]
    fn a_completed_unit_that_stopped_an_instance_without_a_new_release_leaves_it_idle() {
        let retired = tracked(Phase::Completed, |p| p.running = false, None);
        let kept = tracked(Phase::Completed, |_| {}, None);
        let r = run(retired, kept, None);
        assert_eq!(r.instances[0].status, InstanceStatus::Idle);
        assert_eq!(r.instances[1].status, InstanceStatus::Untouched);
        assert_eq!(r.outcome, OutcomeKind::Succeeded);
    }

    #[test]
    fn an_instance_a_rollback_plan_returned_is_reported_on_the_release_it_returned_to() {
        // A rollback plan's unit restores the instance as a rollout step: it
        // ends on the release it returned to, not the one it had at planning.
        let mut back = tracked(Phase::Completed, |_| {}, None);
        back.returned_to = Some(rel("v0"));
        let report = run(back, updated(), None);
        let a = &report.instances[0];
        assert_eq!(a.status, InstanceStatus::Updated);
        assert_eq!(a.release, Some(rel("v0")));
        assert_eq!(report.outcome, OutcomeKind::Succeeded);
    }
}
