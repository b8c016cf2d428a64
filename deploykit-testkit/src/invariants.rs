//! The invariant checker: what every deployment must keep, checked against
//! what the fakes recorded.

use std::collections::BTreeSet;
use std::fmt;

use deploykit::{InstanceId, InstanceStatus, OutcomeKind, Report};

use crate::fleet::{FakeFleet, RoutingChange};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The result of [`FakeFleet::check`].
#[derive(Debug, Clone)]
pub struct InvariantReport {
    /// Every broken invariant.
    pub violations: Vec<Violation>,
    /// The most instances out of rotation at once (not counting those that
    /// started out of rotation).
    pub peak_out_of_rotation: usize,
    context: String,
}

impl InvariantReport {
    /// Whether every invariant held.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Panics, listing every violation and the deployment report, unless
    /// every invariant held.
    #[track_caller]
    pub fn assert_ok(&self) {
        if !self.is_ok() {
            let list: Vec<String> = self.violations.iter().map(|v| format!("  - {v}")).collect();
            panic!(
                "{} invariant violation(s):\n{}\n{}",
                self.violations.len(),
                list.join("\n"),
                self.context
            );
        }
    }
}

impl FakeFleet {
    /// Checks the invariants of a finished deployment whose batch size (the
    /// most instances it may take out of rotation at once) is
    /// `max_out_of_rotation`:
    ///
    /// 1. Instances out of rotation never exceed `max_out_of_rotation` plus
    ///    those the report calls unrecoverable.
    /// 2. The load balancer never routed to an instance that was stopped or
    ///    had not passed a health probe since it started, and no instance
    ///    was stopped with connections open before its drain was confirmed
    ///    or the [drain timeout](Self::drain_timeout) passed.
    /// 3. The report names every instance of the fleet, and only those.
    ///    Every instance has installed the release the report says it runs;
    ///    instances reported as serving are running, in rotation, and their
    ///    running process serves that release (not only installed it);
    ///    idle ones are out of rotation, and unrecoverable ones too unless
    ///    they still run and answer healthy (a load balancer that refused
    ///    every change cannot take them out).
    /// 4. Rolled back: every instance is on the release it started with
    ///    (the fleet's, or the last [`baseline`](Self::baseline) — not the
    ///    report's own `previous`). Degraded: the instances not updated are
    ///    exactly those the report lists as failed. Succeeded: every
    ///    instance of a group that receives traffic is on the new release
    ///    (a shadow torn down: still on the release it started with).
    ///    Rollback failed: an instance is named unrecoverable (or, for
    ///    blue-green, whose switch back can fail, a reason is given).
    ///
    /// Instances of a group without traffic at the end (the idle
    /// blue-green environment) are not required to serve.
    pub fn check(&self, report: &Report, max_out_of_rotation: usize) -> InvariantReport {
        let unrecoverable: BTreeSet<&InstanceId> = report.unrecoverable().into_iter().collect();
        let (mut v, peak) = self.traffic_violations(&unrecoverable, max_out_of_rotation);
        let w = self.shared().lock();

        // 3. The report covers the fleet.
        for id in &w.order {
            if !report.instances.iter().any(|r| &r.id == id) {
                v.push(Violation(format!(
                    "{id} is in the fleet but missing from the report"
                )));
            }
        }

        // 3. Each instance against the report.
        for r in &report.instances {
            let Some(s) = w.instances.get(&r.id) else {
                v.push(Violation(format!("report names {} which the fleet lacks", r.id)));
                continue;
            };
            let serving = w.in_rotation(s) && s.running;
            match r.status {
                InstanceStatus::Unrecoverable => {
                    // Only a load balancer that refused every change keeps
                    // one in rotation; that is safe only while it serves.
                    if w.in_rotation(s) && !(s.running && s.ready) {
                        v.push(Violation(format!("{} is unrecoverable but in rotation", r.id)));
                    }
                }
                InstanceStatus::Idle => {
                    if w.in_rotation(s) {
                        v.push(Violation(format!("{} is reported idle but in rotation", r.id)));
                    }
                    if r.release != s.release {
                        v.push(Violation(format!(
                            "{}: report says {:?} (Idle), fleet runs {:?}",
                            r.id, r.release, s.release
                        )));
                    }
                }
                _ => {
                    if r.release != s.release {
                        v.push(Violation(format!(
                            "{}: report says {:?} ({:?}), fleet runs {:?}",
                            r.id, r.release, r.status, s.release
                        )));
                    }
                    // An instance whose group gets no traffic at the end (the
                    // idle blue-green environment) need not serve.
                    let group_live = w.group_weight(&s.backend.group) > 0;
                    let should_serve = r.release.is_some() && s.initially_enabled && group_live;
                    if should_serve && !serving {
                        v.push(Violation(format!(
                            "{} ({:?}) is not serving at the end (running={}, in rotation={})",
                            r.id,
                            r.status,
                            s.running,
                            w.in_rotation(s)
                        )));
                    }
                    if should_serve && serving && s.serving != r.release {
                        v.push(Violation(format!(
                            "{}: report says {:?} ({:?}), but its running process serves {:?} (installed without a restart)",
                            r.id, r.release, r.status, s.serving
                        )));
                    }
                }
            }
            let on_new = s.release.as_ref() == Some(&report.release);
            match r.status {
                InstanceStatus::Updated | InstanceStatus::Skipped if !on_new => v.push(Violation(format!(
                    "{} reported {:?} but runs {:?}",
                    r.id, r.status, s.release
                ))),
                // What an untouched instance started this run on is the
                // report's to say (a resumed run finds some done); a restore
                // must reach the fleet's own starting release.
                InstanceStatus::Untouched if s.release != r.previous => v.push(Violation(format!(
                    "{} reported untouched but runs {:?}, not its previous {:?}",
                    r.id, s.release, r.previous
                ))),
                InstanceStatus::FailedRestored | InstanceStatus::RolledBack if s.release != s.baseline => v
                    .push(Violation(format!(
                        "{} reported {:?} but runs {:?}, not the {:?} it started with",
                        r.id, r.status, s.release, s.baseline
                    ))),
                _ => {}
            }
        }

        // 4. The outcome against the fleet.
        match report.outcome {
            OutcomeKind::RolledBack => {
                for r in &report.instances {
                    let Some(s) = w.instances.get(&r.id) else { continue };
                    if s.release != s.baseline {
                        v.push(Violation(format!(
                            "rolled back, but {} runs {:?} instead of the {:?} it started with",
                            r.id, s.release, s.baseline
                        )));
                    }
                    if r.previous != s.baseline {
                        v.push(Violation(format!(
                            "rolled back: the report says {} was on {:?} before, but it started on {:?}",
                            r.id, r.previous, s.baseline
                        )));
                    }
                }
            }
            // A shadow torn down moved nothing that serves clients: every
            // instance of a live group still runs what it started with.
            OutcomeKind::Succeeded
                if report.strategy == deploykit::StrategyKind::Shadow && report.succeeded().is_empty() =>
            {
                for (id, s) in &w.instances {
                    if w.group_weight(&s.backend.group) > 0 && s.release != s.baseline {
                        v.push(Violation(format!(
                            "shadow torn down, but {id} runs {:?} instead of the {:?} it started with",
                            s.release, s.baseline
                        )));
                    }
                }
            }
            OutcomeKind::Succeeded => {
                for (id, s) in &w.instances {
                    let group_live = w.group_weight(&s.backend.group) > 0;
                    if group_live
                        && report.instances.iter().any(|r| &r.id == id)
                        && s.release.as_ref() != Some(&report.release)
                    {
                        v.push(Violation(format!("succeeded, but {id} runs {:?}", s.release)));
                    }
                }
            }
            OutcomeKind::Degraded => {
                let failed: BTreeSet<&InstanceId> = report.failed().into_iter().collect();
                if failed.is_empty() {
                    v.push(Violation("degraded, but no instance is reported failed".into()));
                }
                for r in &report.instances {
                    let Some(s) = w.instances.get(&r.id) else { continue };
                    let on_new = s.release.as_ref() == Some(&report.release);
                    if !on_new && !failed.contains(&r.id) && r.status != InstanceStatus::Untouched {
                        v.push(Violation(format!(
                            "degraded: {} is not on the new release but not reported failed",
                            r.id
                        )));
                    }
                }
            }
            OutcomeKind::RollbackFailed => {
                // Blue-green fails a rollback at its switch back, which no
                // instance is to blame for: the reason must say so.
                let named = !unrecoverable.is_empty()
                    || (report.strategy == deploykit::StrategyKind::BlueGreen && report.reason.is_some());
                if !named {
                    v.push(Violation(
                        "rollback failed, but no instance is reported unrecoverable".into(),
                    ));
                }
            }
        }
        InvariantReport {
            violations: v,
            peak_out_of_rotation: peak,
            context: format!("report:\n{report}"),
        }
    }

    /// Checks only the traffic invariants (1 and 2 of
    /// [`check`](Self::check)) with at most `max_out_of_rotation` instances
    /// out of rotation at once: for runs whose report does not describe the
    /// fleet, such as a recovery that finished another run's work.
    pub fn check_traffic(&self, max_out_of_rotation: usize) -> InvariantReport {
        let (violations, peak) = self.traffic_violations(&BTreeSet::new(), max_out_of_rotation);
        InvariantReport {
            violations,
            peak_out_of_rotation: peak,
            context: String::new(),
        }
    }

    fn traffic_violations(
        &self,
        unrecoverable: &BTreeSet<&InstanceId>,
        max_out_of_rotation: usize,
    ) -> (Vec<Violation>, usize) {
        let w = self.shared().lock();
        let mut v = Vec::new();
        // 1. Replay the routing history.
        let mut out: BTreeSet<InstanceId> = w
            .instances
            .iter()
            .filter(|(_, s)| !s.initially_enabled)
            .map(|(id, _)| id.clone())
            .collect();
        let initially_out = out.clone();
        let mut peak = 0;
        for entry in &w.routing {
            match &entry.change {
                RoutingChange::Drained(id) | RoutingChange::Disabled(id) => {
                    out.insert(id.clone());
                }
                RoutingChange::Enabled(id) => {
                    out.remove(id);
                }
                RoutingChange::Weights(_) | RoutingChange::Policy(_) | RoutingChange::Rerouted { .. } => {}
            }
            let counted = out
                .iter()
                .filter(|id| !unrecoverable.contains(id) && !initially_out.contains(*id))
                .count();
            peak = peak.max(counted);
            if counted > max_out_of_rotation {
                v.push(Violation(format!(
                    "at {:?}: {counted} instances out of rotation, more than {max_out_of_rotation} (+{} unrecoverable): {:?}",
                    entry.at,
                    unrecoverable.len(),
                    out
                )));
            }
        }

        // 2. Live routing checks recorded by the fakes.
        v.extend(w.routing_violations.iter().cloned().map(Violation));
        v.extend(w.drain_violations.iter().cloned().map(Violation));
        (v, peak)
    }
}

/// Self-tests: histories an engine must never produce, played on the fakes
/// by hand, each of which the checker must flag — and the correct history
/// next to them, which it must pass.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use deploykit::{
        Instance, InstanceReport, InstanceStatus, LoadBalancer, OutcomeKind, ReleaseId, Report, StrategyKind,
    };

    use crate::FakeFleet;

    fn v(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    /// A report of `outcome` for v2 with one line per `(id, status,
    /// previous, release)`.
    fn report(outcome: OutcomeKind, lines: &[(&str, InstanceStatus, &str, &str)]) -> Report {
        Report {
            deployment: "self-test".into(),
            strategy: StrategyKind::Rolling,
            release: v("v2"),
            outcome,
            reason: None,
            instances: lines
                .iter()
                .map(|(id, status, previous, release)| InstanceReport {
                    id: deploykit::InstanceId::new(*id).unwrap(),
                    status: *status,
                    previous: Some(v(previous)),
                    release: Some(v(release)),
                    error: None,
                })
                .collect(),
            duration: Duration::ZERO,
            checks: Vec::new(),
            experiment: None,
            variants: None,
            winner: None,
        }
    }

    fn updated(ids: &[&'static str]) -> Vec<(&'static str, InstanceStatus, &'static str, &'static str)> {
        ids.iter()
            .map(|id| (*id, InstanceStatus::Updated, "v1", "v2"))
            .collect()
    }

    /// The correct replacement of one instance: drain, wait for the drain,
    /// stop, install, start, probe, enable.
    async fn replace(fleet: &FakeFleet, id: &str, release: &str) {
        let i = fleet.instance(id);
        let lb = fleet.load_balancer();
        lb.drain(i.backend()).await.unwrap();
        while lb.active_connections(i.backend()).await.unwrap() != Some(0) {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        i.stop().await.unwrap();
        i.install(&v(release)).await.unwrap();
        i.start().await.unwrap();
        assert!(i.health().await.unwrap().is_healthy());
        lb.enable(i.backend()).await.unwrap();
    }

    fn flagged(fleet: &FakeFleet, report: &Report, batch: usize, expect: &str) {
        let inv = fleet.check(report, batch);
        assert!(
            inv.violations.iter().any(|v| v.0.contains(expect)),
            "expected a violation containing {expect:?}, got {:?}",
            inv.violations
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_correct_history_passes() {
        let fleet = FakeFleet::new(2).connections("i-1", 3, Duration::from_secs(5));
        replace(&fleet, "i-1", "v2").await;
        replace(&fleet, "i-2", "v2").await;
        let inv = fleet.check(&report(OutcomeKind::Succeeded, &updated(&["i-1", "i-2"])), 1);
        inv.assert_ok();
        assert_eq!(inv.peak_out_of_rotation, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn installing_and_re_enabling_without_a_restart_is_flagged() {
        let fleet = FakeFleet::new(1);
        let i = fleet.instance("i-1");
        let lb = fleet.load_balancer();
        lb.drain(i.backend()).await.unwrap();
        i.install(&v("v2")).await.unwrap();
        lb.enable(i.backend()).await.unwrap();
        // The installed release is v2, as the report says; the process
        // still serves v1.
        assert_eq!(fleet.release_of("i-1"), Some(v("v2")));
        assert_eq!(fleet.serving_release("i-1"), Some(v("v1")));
        flagged(
            &fleet,
            &report(OutcomeKind::Succeeded, &updated(&["i-1"])),
            1,
            "its running process serves",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_before_the_drain_is_confirmed_is_flagged() {
        let fleet = FakeFleet::new(1).connections("i-1", 4, Duration::from_secs(10));
        let i = fleet.instance("i-1");
        let lb = fleet.load_balancer();
        lb.drain(i.backend()).await.unwrap();
        // 3 s into a 10 s drain, well inside the 30 s drain timeout.
        tokio::time::sleep(Duration::from_secs(3)).await;
        i.stop().await.unwrap();
        i.install(&v("v2")).await.unwrap();
        i.start().await.unwrap();
        i.health().await.unwrap();
        lb.enable(i.backend()).await.unwrap();
        flagged(
            &fleet,
            &report(OutcomeKind::Succeeded, &updated(&["i-1"])),
            1,
            "with 4 connection(s) open",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_after_the_drain_timeout_is_allowed() {
        let fleet = FakeFleet::new(1)
            .connections("i-1", 4, Duration::from_secs(600))
            .drain_timeout(Duration::from_secs(15));
        let i = fleet.instance("i-1");
        let lb = fleet.load_balancer();
        lb.drain(i.backend()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(15)).await;
        i.stop().await.unwrap();
        i.install(&v("v2")).await.unwrap();
        i.start().await.unwrap();
        i.health().await.unwrap();
        lb.enable(i.backend()).await.unwrap();
        fleet
            .check(&report(OutcomeKind::Succeeded, &updated(&["i-1"])), 1)
            .assert_ok();
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_to_a_stopped_instance_is_flagged() {
        let fleet = FakeFleet::new(1);
        let i = fleet.instance("i-1");
        // Stopped while still in rotation: no drain, no disable.
        i.stop().await.unwrap();
        i.install(&v("v2")).await.unwrap();
        i.start().await.unwrap();
        i.health().await.unwrap();
        flagged(
            &fleet,
            &report(OutcomeKind::Succeeded, &updated(&["i-1"])),
            1,
            "in rotation but stopped",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn enabling_before_a_health_probe_is_flagged() {
        let fleet = FakeFleet::new(1);
        let i = fleet.instance("i-1");
        let lb = fleet.load_balancer();
        lb.drain(i.backend()).await.unwrap();
        i.stop().await.unwrap();
        i.install(&v("v2")).await.unwrap();
        i.start().await.unwrap();
        lb.enable(i.backend()).await.unwrap();
        i.health().await.unwrap();
        flagged(
            &fleet,
            &report(OutcomeKind::Succeeded, &updated(&["i-1"])),
            1,
            "in rotation but not healthy",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_missing_from_the_report_is_flagged() {
        let fleet = FakeFleet::new(3);
        for id in ["i-1", "i-2", "i-3"] {
            replace(&fleet, id, "v2").await;
        }
        flagged(
            &fleet,
            &report(OutcomeKind::Succeeded, &updated(&["i-1", "i-3"])),
            1,
            "i-2 is in the fleet but missing from the report",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_instances_out_at_once_are_flagged() {
        let fleet = FakeFleet::new(3);
        let lb = fleet.load_balancer();
        for id in ["i-1", "i-2"] {
            lb.drain(fleet.instance(id).backend()).await.unwrap();
        }
        for id in ["i-1", "i-2"] {
            let i = fleet.instance(id);
            i.stop().await.unwrap();
            i.install(&v("v2")).await.unwrap();
            i.start().await.unwrap();
            i.health().await.unwrap();
            lb.enable(i.backend()).await.unwrap();
        }
        replace(&fleet, "i-3", "v2").await;
        flagged(
            &fleet,
            &report(OutcomeKind::Succeeded, &updated(&["i-1", "i-2", "i-3"])),
            1,
            "2 instances out of rotation, more than 1",
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rollback_to_the_wrong_release_is_flagged_even_when_the_report_agrees() {
        // i-1 started on v0; the engine "rolls back" to v1 and its report
        // claims v1 was the previous release.
        let fleet = FakeFleet::new(2).on_release("i-1", "v0");
        replace(&fleet, "i-1", "v2").await;
        replace(&fleet, "i-1", "v1").await;
        let lines = [
            ("i-1", InstanceStatus::RolledBack, "v1", "v1"),
            ("i-2", InstanceStatus::Untouched, "v1", "v1"),
        ];
        let r = report(OutcomeKind::RolledBack, &lines);
        flagged(&fleet, &r, 1, "instead of the Some(\"v0\") it started with");
        flagged(&fleet, &r, 1, "the report says i-1 was on");
    }

    #[tokio::test(start_paused = true)]
    async fn a_correct_rollback_passes() {
        let fleet = FakeFleet::new(2).on_release("i-1", "v0");
        replace(&fleet, "i-1", "v2").await;
        // Restore, not install: v0 is still on the instance.
        let i = fleet.instance("i-1");
        let lb = fleet.load_balancer();
        lb.drain(i.backend()).await.unwrap();
        i.stop().await.unwrap();
        i.restore(&v("v0")).await.unwrap();
        i.start().await.unwrap();
        i.health().await.unwrap();
        lb.enable(i.backend()).await.unwrap();
        let lines = [
            ("i-1", InstanceStatus::RolledBack, "v0", "v0"),
            ("i-2", InstanceStatus::Untouched, "v1", "v1"),
        ];
        fleet
            .check(&report(OutcomeKind::RolledBack, &lines), 1)
            .assert_ok();
    }

    #[tokio::test(start_paused = true)]
    async fn a_report_that_lies_about_the_release_is_flagged() {
        let fleet = FakeFleet::new(2);
        replace(&fleet, "i-1", "v2").await;
        // i-2 was never touched, but the report calls it updated.
        flagged(
            &fleet,
            &report(OutcomeKind::Succeeded, &updated(&["i-1", "i-2"])),
            1,
            "i-2: report says",
        );
    }
}
