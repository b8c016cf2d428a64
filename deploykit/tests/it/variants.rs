//! An A/B experiment with several treatments on the fakes, in virtual
//! time: each treatment group on its own release, one sticky split, the
//! Holm-corrected test, and the winner chosen at run time promoted.

use std::sync::Arc;
use std::time::Duration;

use deploykit::experiment::VariantsReading;
use deploykit::routing::{Capabilities, Capability};
use deploykit::strategy::Treatment;
use deploykit::{
    Canary, EventKind, EventLog, Executor, Experiment, Group, Metric, Observation, OutcomeKind, ReleaseId,
    Report,
};
use deploykit_testkit::{FakeFleet, FakeMetrics, RoutingChange};

const STABLE: [&str; 2] = ["i-1", "i-2"];
const B: &str = "i-3";
const C: &str = "i-4";

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

struct Setup {
    fleet: FakeFleet,
    exec: Executor,
    log: EventLog,
}

/// Two stable instances, one of canary-b and one of canary-c, all on v1.
fn setup(metrics: FakeMetrics) -> Setup {
    let fleet = FakeFleet::with_groups(&[("stable", 2), ("canary-b", 1), ("canary-c", 1)])
        .routing_capabilities(Capabilities::of(Capability::ALL));
    let log = EventLog::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(log.clone()))
        .metrics(Arc::new(metrics))
        .build()
        .expect("valid executor");
    Setup { fleet, exec, log }
}

/// Healthy guardrails for every group, and each group's visits (20 a
/// second) and conversions at its rate over any window.
fn converting(control: f64, b: f64, c: f64) -> FakeMetrics {
    let tally = |rate: f64| {
        move |_t: Duration, window: Duration| {
            let visits = 20.0 * window.as_secs_f64();
            deploykit::judge::Measured::Value(deploykit::experiment::Tally {
                visits,
                conversions: (visits * rate).round(),
            })
        }
    };
    let mut m = FakeMetrics::new().set("stable", Metric::RequestCount, 28_500.0);
    for group in ["stable", "canary-b", "canary-c"] {
        m = m
            .set(group, Metric::ErrorRate, 0.001)
            .set(group, Metric::LatencyP99, 0.12);
    }
    m.script_tally("stable", tally(control))
        .script_tally("canary-b", tally(b))
        .script_tally("canary-c", tally(c))
}

/// canary-b on the deployed release (v2), canary-c on v3, 25 % each.
fn experiment() -> Experiment {
    Experiment {
        base: Canary {
            check_interval: Duration::from_secs(10),
            stage_duration: Duration::from_secs(60),
            stages: vec![50, 100],
            ..Canary::default()
        },
        duration: Duration::from_secs(600),
        treatments: vec![
            Treatment::new(g("canary-b"), 25),
            Treatment::new(g("canary-c"), 25).release(v("v3")),
        ],
        ..Experiment::default()
    }
}

impl Setup {
    async fn deploy(&self) -> Report {
        self.exec
            .deploy(&experiment(), &v("v2"))
            .await
            .expect("deployment starts")
    }

    fn dump(&self) -> String {
        self.log
            .events()
            .iter()
            .map(|e| format!("{:>9} {:?}", e.elapsed_ms, e.kind))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn readings(&self) -> Vec<VariantsReading> {
        self.log
            .events()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::ExperimentVariants { reading, .. } => Some(reading),
                _ => None,
            })
            .collect()
    }

    fn assert_invariants(&self, report: &Report) {
        // Both treatments are drained and stopped in one stage.
        let inv = self.fleet.check(report, 2);
        if !inv.is_ok() {
            eprintln!("events:\n{}", self.dump());
        }
        inv.assert_ok();
    }

    /// Both treatments are stopped, out of rotation and get no traffic.
    fn assert_treatments_retired(&self) {
        for id in [B, C] {
            assert!(!self.fleet.is_running(id), "{id} still runs");
            assert!(!self.fleet.in_rotation(id), "{id} still in rotation");
        }
        let weights = self.fleet.load_balancer().weights().expect("weights set");
        for t in ["canary-b", "canary-c"] {
            assert_eq!(weights.get(&g(t)).copied().unwrap_or(0), 0, "{weights:?}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_second_treatment_wins_and_stable_moves_to_its_release() {
    let s = setup(converting(0.05, 0.05, 0.12));
    let report = s.deploy().await;
    assert!(report.is_success(), "{report}\n{}", s.dump());
    // One sticky split over the control and both treatments.
    let policies = s.fleet.load_balancer().policies();
    assert_eq!(policies.len(), 1, "{policies:?}");
    assert!(policies[0].split.sticky.is_some());
    let shares = policies[0].shares();
    assert_eq!(
        (
            shares[&g("stable")],
            shares[&g("canary-b")],
            shares[&g("canary-c")]
        ),
        (50, 25, 25)
    );
    // canary-c wins, by the Holm-adjusted test; canary-b does not.
    let r = s.readings();
    let last = r.last().expect("readings");
    assert_eq!(last.winner, Some(g("canary-c")), "{last}");
    let (b, c) = (&last.treatments[0], &last.treatments[1]);
    assert_eq!((b.group.as_str(), b.release.as_str()), ("canary-b", "v2"));
    assert_eq!((c.group.as_str(), c.release.as_str()), ("canary-c", "v3"));
    assert!(c.comparison.adjusted_p_value <= 0.05, "{last}");
    assert!(b.comparison.adjusted_p_value > 0.05, "{last}");
    for t in [b, c] {
        assert!(t.comparison.adjusted_p_value >= t.comparison.p_value, "{last}");
    }
    // No decision before min_samples visits per variant.
    assert!(r
        .iter()
        .take_while(|x| x.control.visits < 1000.0)
        .all(|x| x.winner.is_none()));
    // Stable moved to the winner's release, not the deployed one.
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v3")), "{id}");
    }
    assert_eq!(report.release, v("v3"));
    let winner = report.winner.as_ref().expect("a winner in the report");
    assert_eq!(
        (winner.group.as_str(), winner.release.as_str()),
        ("canary-c", "v3")
    );
    assert_eq!(report.variants.as_ref(), Some(last));
    let shown = report.to_string();
    assert!(
        shown.contains("experiment (canary-c wins): control stable ")
            && shown.contains("canary-c (v3) ")
            && shown.contains("Holm-adjusted p = ")
            && shown.contains("winner: canary-c (v3)"),
        "{shown}"
    );
    assert!(!shown.contains("Some(") && !shown.contains("Tally {"), "{shown}");
    // The treatments ran their own releases and end stopped on them.
    assert_eq!(s.fleet.release_of(B), Some(v("v2")));
    assert_eq!(s.fleet.release_of(C), Some(v("v3")));
    s.assert_treatments_retired();
    // The winner was recorded before anything acted on it, and every user
    // was on it before the first stable instance was drained.
    let events = s.log.events();
    let decided = events
        .iter()
        .position(|e| matches!(&e.kind, EventKind::ExperimentDecided { winner, .. } if winner.as_str() == "canary-c"))
        .expect("the decision is an event");
    let first_after = events
        .iter()
        .position(|e| matches!(&e.kind, EventKind::StageStarted { name, .. } if name == "all traffic to canary-c (the winner)"))
        .expect("the winner's branch ran");
    assert!(decided < first_after, "{}", s.dump());
    let history = s.fleet.routing_history();
    let all_on_winner = history
        .iter()
        .position(|r| matches!(&r.change, RoutingChange::Weights(w) if w.get(&g("canary-c")) == Some(&100)))
        .expect("all traffic on the winner");
    let first_stable_drain = history
        .iter()
        .position(|r| matches!(&r.change, RoutingChange::Drained(id) if STABLE.contains(&id.as_str())))
        .expect("stable drained for the promotion");
    assert!(all_on_winner < first_stable_drain, "{history:?}");
    // The loser's branch never ran: no stable instance ever got v2.
    assert!(!s.log.events().iter().any(|e| matches!(
        &e.kind,
        EventKind::StageStarted { name, .. } if name.contains("canary-b (the winner)") || name.ends_with("to v2")
    )));
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn equal_treatments_keep_the_control_and_stop_both() {
    let s = setup(converting(0.05, 0.05, 0.05));
    let report = s.deploy().await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}\n{}", s.dump());
    let reason = report.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("no treatment significantly better within 600s, the control stable stays"),
        "{reason}"
    );
    assert!(
        reason.contains("canary-b (v2)")
            && reason.contains("canary-c (v3)")
            && reason.contains("Holm-adjusted p = "),
        "every variant's statistics are in the reason: {reason}"
    );
    assert_eq!(s.readings().len(), 60);
    assert!(report.winner.is_none());
    assert!(!s
        .log
        .events()
        .iter()
        .any(|e| matches!(e.kind, EventKind::ExperimentDecided { .. })));
    for id in STABLE.into_iter().chain([B, C]) {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
    }
    s.assert_treatments_retired();
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_guardrail_breach_of_one_treatment_rolls_back_every_treatment() {
    // canary-c converts far better but fails a fifth of its requests.
    let metrics =
        converting(0.05, 0.05, 0.30).script("canary-c", Metric::ErrorRate, |_| Observation::Value(0.2));
    let s = setup(metrics);
    let report = s.deploy().await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}\n{}", s.dump());
    let reason = report.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("treatment canary-c: ") && reason.contains("every treatment rolls back"),
        "{reason}"
    );
    assert!(s.readings().is_empty(), "no reading after a breach");
    // Each check names the treatment it guarded: canary-b passed, canary-c
    // failed, and no check reads as a canary stage.
    let checks: Vec<(Option<Group>, bool)> = s
        .log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::AnalysisResult { group, result, .. } => Some((
                group,
                matches!(result, deploykit::analysis::CheckOutcome::Fail { .. }),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        checks,
        [(Some(g("canary-b")), false), (Some(g("canary-c")), true)],
        "{}",
        s.dump()
    );
    let failing = report
        .checks
        .iter()
        .find(|c| c.group == Some(g("canary-c")))
        .expect("canary-c's check in the report");
    assert_eq!(failing.subject(), "treatment canary-c");
    let text = report.to_string();
    assert!(
        text.contains("  treatment canary-c: canary error rate 20.000 % > threshold"),
        "{text}"
    );
    assert!(!text.contains("canary stage"), "{text}");
    for id in STABLE.into_iter().chain([B, C]) {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
    }
    s.assert_treatments_retired();
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_plan_without_its_winner_recorded_stops_before_the_branch() {
    // A branch of the plan, run without the experiment before it, cannot
    // know which treatment won: it must act on nothing.
    let s = setup(converting(0.05, 0.05, 0.12));
    let snap = s.exec.snapshot().await.unwrap();
    let mut plan = deploykit::Strategy::plan(&experiment(), &snap, &v("v2")).unwrap();
    plan.stages.retain(|st| st.if_winner.is_some());
    let report = s
        .exec
        .run(&plan, deploykit::RunOptions::default())
        .await
        .expect("runs");
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    assert!(
        report
            .reason
            .clone()
            .unwrap_or_default()
            .contains("no experiment of this run chose a winner"),
        "{report}"
    );
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
    }
}
