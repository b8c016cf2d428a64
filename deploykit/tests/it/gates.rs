//! Integration-test gates before promotion ([`Step::Gate`]): blue-green runs
//! them against the idle environment before the switch, canary against the
//! canary before its first traffic; a failing gate rolls back with nothing
//! switched. Virtual time, on the testkit's fleet and a scripted runner.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deploykit::integration::{GateFailure, GateRunner};
use deploykit::{
    Backend, BlueGreen, Canary, Error, EventLog, Executor, Group, Metric, OutcomeKind, ReleaseId, Step,
};
use deploykit_testkit::{FakeFleet, FakeLiveStore, FakeMetrics, FakeSmokeTester, RoutingChange};

/// What the fleet looked like when a gate ran.
#[derive(Debug, Clone)]
struct Call {
    name: String,
    release: ReleaseId,
    targets: Vec<String>,
    live: Option<Group>,
    weights: Option<BTreeMap<Group, u8>>,
}

/// A runner whose gates pass unless scripted to fail; it records each call
/// with the routing of the moment.
#[derive(Debug, Clone)]
struct ScriptedGates {
    fleet: FakeFleet,
    failing: BTreeMap<String, (i32, String)>,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl ScriptedGates {
    fn new(fleet: &FakeFleet) -> Self {
        Self {
            fleet: fleet.clone(),
            failing: BTreeMap::new(),
            calls: Arc::default(),
        }
    }

    fn fail(mut self, name: &str, code: i32, output: &str) -> Self {
        self.failing.insert(name.into(), (code, output.into()));
        self
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl GateRunner for ScriptedGates {
    async fn run(&self, name: &str, release: &ReleaseId, targets: &[Backend]) -> Result<(), GateFailure> {
        self.calls.lock().unwrap().push(Call {
            name: name.into(),
            release: release.clone(),
            targets: targets.iter().map(|b| b.id.to_string()).collect(),
            live: self.fleet.live_group(),
            weights: self.fleet.load_balancer().weights(),
        });
        // A test suite takes a while.
        tokio::time::sleep(Duration::from_secs(30)).await;
        match self.failing.get(name) {
            Some((code, out)) => Err(GateFailure::Failed {
                exit_code: Some(*code),
                output_tail: out.clone(),
            }),
            None => Ok(()),
        }
    }
}

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

fn blue_green(fleet: &FakeFleet, gates: &ScriptedGates) -> Executor {
    Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .smoke_tester(Arc::new(FakeSmokeTester::for_fleet(fleet)))
        .live_store(Arc::new(FakeLiveStore::recording("blue")))
        .gate_runner(Arc::new(gates.clone()))
        .build()
        .expect("valid executor")
}

fn bg_with(gates: &[&str]) -> BlueGreen {
    BlueGreen {
        gates: gates.iter().map(|s| s.to_string()).collect(),
        ..BlueGreen::default()
    }
}

#[tokio::test(start_paused = true)]
async fn blue_green_gates_run_against_the_idle_environment_before_the_switch() {
    let fleet = FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).live("blue");
    let gates = ScriptedGates::new(&fleet);
    let exec = blue_green(&fleet, &gates);
    let out = bg_with(&["api", "ui"]).deploy(&exec, &v("v2")).await.unwrap();
    assert!(out.is_success(), "{}", out.deployment);
    let calls = gates.calls();
    assert_eq!(
        calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["api", "ui"]
    );
    for c in &calls {
        assert_eq!(c.targets, ["i-3", "i-4"], "the idle (green) instances");
        assert_eq!(c.release, v("v2"));
        assert_eq!(c.live, Some(g("blue")), "gates run before the switch");
    }
    assert_eq!(fleet.live_group(), Some(g("green")));
}

#[tokio::test(start_paused = true)]
async fn a_failing_blue_green_gate_rolls_back_without_switching() {
    let fleet = FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).live("blue");
    let gates = ScriptedGates::new(&fleet).fail("api", 3, "2 of 40 tests failed: checkout");
    let exec = blue_green(&fleet, &gates);
    let out = bg_with(&["api", "ui"]).deploy(&exec, &v("v2")).await.unwrap();
    let report = &out.deployment;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    let reason = report.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("gate api failed against green") && reason.contains("2 of 40 tests failed"),
        "the reason names the gate, the environment and the output: {reason}"
    );
    // The second gate never ran; no traffic moved.
    assert_eq!(gates.calls().len(), 1);
    assert_eq!(fleet.live_group(), Some(g("blue")));
    let switched = fleet.routing_history().into_iter().any(
        |e| matches!(e.change, RoutingChange::Weights(w) if w.get(&g("green")).copied().unwrap_or(0) > 0),
    );
    assert!(!switched, "green never got traffic");
    for id in ["i-1", "i-2"] {
        assert_eq!(fleet.release_of(id), Some(v("v1")), "{id}");
        assert!(fleet.is_running(id), "{id} still serves");
    }
    for id in ["i-3", "i-4"] {
        assert!(!fleet.is_running(id), "{id}: the idle environment is stopped");
    }
}

fn canary(fleet: &FakeFleet, gates: &ScriptedGates) -> Executor {
    let metrics = FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, 0.001)
        .set("canary", Metric::LatencyP99, 0.12);
    Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(metrics))
        .events(Arc::new(EventLog::new()))
        .gate_runner(Arc::new(gates.clone()))
        .build()
        .expect("valid executor")
}

fn canary_with(gates: &[&str]) -> Canary {
    Canary {
        stages: vec![50, 100],
        stage_duration: Duration::from_secs(60),
        check_interval: Duration::from_secs(10),
        gates: gates.iter().map(|s| s.to_string()).collect(),
        ..Canary::default()
    }
}

#[tokio::test(start_paused = true)]
async fn canary_gates_run_against_the_canary_before_its_first_traffic() {
    let fleet = FakeFleet::with_groups(&[("stable", 2), ("canary", 1)]);
    let gates = ScriptedGates::new(&fleet);
    let exec = canary(&fleet, &gates);
    let report = exec
        .deploy(&canary_with(&["smoke-suite"]), &v("v2"))
        .await
        .unwrap();
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{report}");
    let calls = gates.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].targets, ["i-3"]);
    assert_eq!(calls[0].release, v("v2"));
    let w = calls[0].weights.clone().expect("the canary was isolated first");
    assert_eq!(
        w.get(&g("canary")).copied().unwrap_or(0),
        0,
        "no traffic on the canary yet"
    );
    assert_eq!(
        fleet.release_of("i-3"),
        Some(v("v2")),
        "the gate saw the new release installed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_canary_gate_rolls_back_before_any_traffic() {
    let fleet = FakeFleet::with_groups(&[("stable", 2), ("canary", 1)]);
    let gates = ScriptedGates::new(&fleet).fail("smoke-suite", 1, "login flow broken");
    let exec = canary(&fleet, &gates);
    let report = exec
        .deploy(&canary_with(&["smoke-suite"]), &v("v2"))
        .await
        .unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    assert!(
        report
            .reason
            .clone()
            .unwrap_or_default()
            .contains("login flow broken"),
        "{report}"
    );
    let canary_traffic = fleet.routing_history().into_iter().any(
        |e| matches!(e.change, RoutingChange::Weights(w) if w.get(&g("canary")).copied().unwrap_or(0) > 0),
    );
    assert!(!canary_traffic, "the canary never got traffic");
    for id in ["i-1", "i-2"] {
        assert_eq!(fleet.release_of(id), Some(v("v1")), "{id} untouched");
    }
    assert_eq!(fleet.release_of("i-3"), Some(v("v1")), "the canary is restored");
    assert!(!fleet.is_running("i-3"));
}

#[tokio::test(start_paused = true)]
async fn a_plan_with_gates_needs_a_gate_runner() {
    let fleet = FakeFleet::with_groups(&[("stable", 2), ("canary", 1)]);
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(FakeMetrics::new()))
        .build()
        .unwrap();
    let snapshot = exec.snapshot().await.unwrap();
    let plan = deploykit::Strategy::plan(&canary_with(&["it"]), &snapshot, &v("v2")).unwrap();
    assert!(plan
        .stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .any(|s| matches!(s, Step::Gate { .. })));
    let err = exec.check(&plan, &Default::default()).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if field == "gate_runner"),
        "{err}"
    );
    // Nothing was touched.
    assert!(fleet.ops().is_empty());
}

#[tokio::test(start_paused = true)]
async fn cancelling_during_a_gate_stops_it_and_rolls_back_with_nothing_switched() {
    let fleet = FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).live("blue");
    let gates = ScriptedGates::new(&fleet);
    let cancel = tokio_util::sync::CancellationToken::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .smoke_tester(Arc::new(FakeSmokeTester::for_fleet(&fleet)))
        .live_store(Arc::new(FakeLiveStore::recording("blue")))
        .gate_runner(Arc::new(gates.clone()))
        .cancel_token(cancel.clone())
        .build()
        .unwrap();
    // The gate takes 30 s; cancel while it runs.
    let watcher = {
        let gates = gates.clone();
        tokio::spawn(async move {
            while gates.calls().is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            cancel.cancel();
        })
    };
    let out = bg_with(&["slow"]).deploy(&exec, &v("v2")).await.unwrap();
    watcher.await.unwrap();
    assert_eq!(
        out.deployment.outcome,
        OutcomeKind::RolledBack,
        "{}",
        out.deployment
    );
    assert_eq!(fleet.live_group(), Some(g("blue")));
    for id in ["i-3", "i-4"] {
        assert!(!fleet.is_running(id), "{id}: the idle environment is stopped");
    }
}
