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
    ///    had not passed a health probe since it started.
    /// 3. Every instance runs the release the report says it runs; instances
    ///    reported as serving are running and in rotation; unrecoverable
    ///    and idle ones are out of rotation.
    /// 4. Rolled back: every instance is on its previous release. Degraded:
    ///    the instances not updated are exactly those the report lists as
    ///    failed. Succeeded: every instance is on the new release.
    pub fn check(&self, report: &Report, max_out_of_rotation: usize) -> InvariantReport {
        let w = self.shared().lock();
        let mut v = Vec::new();
        let unrecoverable: BTreeSet<&InstanceId> = report.unrecoverable().into_iter().collect();

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
                RoutingChange::Weights(_) => {}
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

        // 3. Each instance against the report.
        for r in &report.instances {
            let Some(s) = w.instances.get(&r.id) else {
                v.push(Violation(format!("report names {} which the fleet lacks", r.id)));
                continue;
            };
            let serving = w.in_rotation(s) && s.running;
            match r.status {
                InstanceStatus::Unrecoverable => {
                    if w.in_rotation(s) {
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
                    let should_serve = r.release.is_some() && s.initially_enabled;
                    if should_serve && !serving {
                        v.push(Violation(format!(
                            "{} ({:?}) is not serving at the end (running={}, in rotation={})",
                            r.id,
                            r.status,
                            s.running,
                            w.in_rotation(s)
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
                InstanceStatus::FailedRestored | InstanceStatus::RolledBack | InstanceStatus::Untouched
                    if s.release != r.previous =>
                {
                    v.push(Violation(format!(
                        "{} reported {:?} but runs {:?}, not its previous {:?}",
                        r.id, r.status, s.release, r.previous
                    )))
                }
                _ => {}
            }
        }

        // 4. The outcome against the fleet.
        match report.outcome {
            OutcomeKind::RolledBack => {
                for r in &report.instances {
                    let s = &w.instances[&r.id];
                    if s.release != r.previous {
                        v.push(Violation(format!(
                            "rolled back, but {} runs {:?} instead of {:?}",
                            r.id, s.release, r.previous
                        )));
                    }
                }
            }
            OutcomeKind::Succeeded => {
                for (id, s) in &w.instances {
                    if report.instances.iter().any(|r| &r.id == id)
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
                    let s = &w.instances[&r.id];
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
                if unrecoverable.is_empty() {
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
}
