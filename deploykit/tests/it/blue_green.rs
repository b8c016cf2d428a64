//! Blue-green engine scenarios on the testkit's fakes, in virtual time.

use std::sync::Arc;
use std::time::Duration;

use deploykit::bluegreen_state::{peek, reconcile, LiveRecord, Resolution};
use deploykit::{
    BlueGreen, Error, EventKind, EventLog, Executor, Group, KeepOld, OutcomeKind, ReleaseId, RunOptions,
    StepResult,
};
use deploykit_testkit::{FakeFleet, FakeLiveStore, FakeSmokeTester, Fault, Op, RoutingChange};

struct Bg {
    fleet: FakeFleet,
    store: FakeLiveStore,
    smoke: FakeSmokeTester,
    exec: Executor,
    log: EventLog,
}

/// blue = i-1..i-3, green = i-4..i-6, all on v1; traffic on blue.
fn fleet() -> FakeFleet {
    FakeFleet::with_groups(&[("blue", 3), ("green", 3)]).live("blue")
}

fn setup(fleet: FakeFleet, store: FakeLiveStore, smoke: impl FnOnce(&FakeFleet) -> FakeSmokeTester) -> Bg {
    let smoke = smoke(&fleet);
    let log = EventLog::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .smoke_tester(Arc::new(smoke.clone()))
        .live_store(Arc::new(store.clone()))
        .events(Arc::new(log.clone()))
        .build()
        .expect("valid executor");
    Bg {
        fleet,
        store,
        smoke,
        exec,
        log,
    }
}

fn default_setup() -> Bg {
    setup(
        fleet(),
        FakeLiveStore::recording("blue"),
        FakeSmokeTester::for_fleet,
    )
}

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

const BLUE: [&str; 3] = ["i-1", "i-2", "i-3"];
const GREEN: [&str; 3] = ["i-4", "i-5", "i-6"];

impl Bg {
    fn assert_env(&self, ids: &[&str], release: &str, running: bool) {
        for id in ids {
            assert_eq!(
                self.fleet.release_of(id).map(|r| r.to_string()).as_deref(),
                Some(release),
                "{id}'s release"
            );
            assert_eq!(self.fleet.is_running(id), running, "{id} running?");
        }
    }

    /// The testkit's invariant checker on a blue-green report: the live
    /// environment keeps full capacity (no instance drained or disabled
    /// while it takes traffic), nothing stopped or unready gets traffic,
    /// and the report matches what each instance runs and serves.
    fn assert_invariants(&self, report: &deploykit::Report) {
        self.fleet.check(report, 0).assert_ok();
    }

    fn assert_routing_safe(&self) {
        let v = self.fleet.routing_violations();
        assert!(
            v.is_empty(),
            "the load balancer routed to unready instances: {v:#?}"
        );
    }

    fn switches(&self) -> Vec<(Duration, String)> {
        self.fleet
            .routing_history()
            .into_iter()
            .filter_map(|e| match e.change {
                RoutingChange::Weights(w) => {
                    let live: Vec<_> = w
                        .iter()
                        .filter(|(_, p)| **p == 100)
                        .map(|(g, _)| g.to_string())
                        .collect();
                    Some((e.at, live.join(",")))
                }
                _ => None,
            })
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn deploy_prepares_tests_warms_switches_records_and_retires_the_old_environment() {
    let bg = default_setup();
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);

    assert!(out.is_success(), "{}", out.deployment);
    assert_eq!(out.live, g("green"));
    assert_eq!(bg.fleet.live_group(), Some(g("green")));
    assert_eq!(bg.store.record(), Some(LiveRecord::live(g("green"))));
    assert_eq!(
        bg.store.saves(),
        [
            LiveRecord::switching(g("blue"), g("green")),
            LiveRecord::live(g("green"))
        ],
        "the pending switch is recorded before the switch, the result after it"
    );
    bg.assert_env(&GREEN, "v2", true);
    // The old environment was stopped after the keep-old window, still on v1.
    bg.assert_env(&BLUE, "v1", false);
    let retired = out.retired.as_ref().expect("the old environment was retired");
    assert!(out.retire_failures().is_empty(), "{retired}");
    bg.assert_routing_safe();

    // Every green instance passed the three default checks before the
    // switch; blue was never checked.
    let checks = bg.smoke.checks();
    assert_eq!(checks.len(), 9, "{checks:?}");
    for id in GREEN {
        let paths: Vec<_> = checks
            .iter()
            .filter(|(i, _)| i.as_str() == id)
            .map(|(_, p)| p.as_str())
            .collect();
        assert_eq!(paths, ["/health", "/api/status", "/api/db/ping"], "{id}");
    }
    // 100 warm-up requests, spread over green only.
    let warm = bg.smoke.warm_requests();
    assert_eq!(warm.values().sum::<u32>(), 100);
    assert!(warm.keys().all(|i| GREEN.contains(&i.as_str())), "{warm:?}");
    assert!(warm.values().all(|n| (33..=34).contains(n)), "{warm:?}");
    let progress: Vec<u32> = bg
        .log
        .events()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::WarmUpProgress { sent, total: 100, .. } => Some(*sent),
            _ => None,
        })
        .collect();
    assert_eq!(progress, (1..=10).map(|k| k * 10).collect::<Vec<_>>());

    // One switch, after every green instance was healthy; blue stopped 30 s
    // (keep_old) after the switch.
    let switches = bg.switches();
    assert_eq!(switches.len(), 1, "{switches:?}");
    let (switched_at, to) = &switches[0];
    assert_eq!(to, "green");
    let ops = bg.fleet.ops();
    for id in GREEN {
        let healthy = ops
            .iter()
            .find(|o| o.instance.as_str() == id && o.op == Op::Health && o.ok)
            .unwrap_or_else(|| panic!("{id} was never healthy"));
        assert!(healthy.at <= *switched_at);
    }
    for id in BLUE {
        let stop = ops
            .iter()
            .find(|o| o.instance.as_str() == id && o.op == Op::Stop)
            .unwrap_or_else(|| panic!("{id} was never stopped"));
        assert!(
            stop.at >= *switched_at + Duration::from_secs(30),
            "{id} stopped at {:?}",
            stop.at
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_second_deployment_goes_back_to_blue() {
    let bg = default_setup();
    let bluegreen = BlueGreen::default();
    assert!(bluegreen.deploy(&bg.exec, &v("v2")).await.unwrap().is_success());
    let out = bluegreen.deploy(&bg.exec, &v("v3")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert!(out.is_success(), "{}", out.deployment);
    assert_eq!(out.live, g("blue"));
    bg.assert_env(&BLUE, "v3", true);
    bg.assert_env(&GREEN, "v2", false);
    assert_eq!(bg.store.live(), Some(g("blue")));
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    bg.assert_routing_safe();
}

#[tokio::test(start_paused = true)]
async fn a_failed_smoke_check_stops_the_idle_environment_and_leaves_live_untouched() {
    let bg = setup(fleet(), FakeLiveStore::recording("blue"), |f| {
        FakeSmokeTester::for_fleet(f).fail_check(
            "i-5",
            "/api/db/ping",
            "got status 200 with body \"db down\"",
        )
    });
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);

    assert_eq!(
        out.deployment.outcome,
        OutcomeKind::RolledBack,
        "{}",
        out.deployment
    );
    assert_eq!(out.live, g("blue"));
    let err = out
        .deployment
        .instances
        .iter()
        .find(|i| i.id.as_str() == "i-5")
        .and_then(|i| i.error.clone())
        .expect("i-5 carries the error");
    assert!(
        err.contains("GET /api/db/ping -> 200 containing \"ok\"")
            && err.contains("i-5")
            && err.contains("db down"),
        "the error names the check, the instance and the answer: {err}"
    );
    // Live untouched: no switch, no record, blue serving v1.
    assert!(bg.switches().is_empty());
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    assert!(bg.store.saves().is_empty());
    bg.assert_env(&BLUE, "v1", true);
    assert!(BLUE.iter().all(|i| bg.fleet.in_rotation(i)));
    // The idle environment is stopped, back on its previous release.
    bg.assert_env(&GREEN, "v1", false);
    assert!(out.retired.is_none());
    bg.assert_routing_safe();
    // No warm-up ran.
    assert!(bg.smoke.warm_requests().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_instance_not_healthy_within_the_deadline_aborts_before_any_traffic() {
    let bg = setup(
        fleet().fail_health("i-6"),
        FakeLiveStore::recording("blue"),
        FakeSmokeTester::for_fleet,
    );
    let bluegreen = BlueGreen {
        healthy_deadline: Duration::from_secs(60),
        health_interval: Duration::from_secs(5),
        ..BlueGreen::default()
    };
    let started = tokio::time::Instant::now();
    let out = bluegreen.deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert_eq!(out.deployment.outcome, OutcomeKind::RolledBack);
    let err = out
        .deployment
        .instances
        .iter()
        .find(|i| i.id.as_str() == "i-6")
        .unwrap()
        .error
        .clone()
        .unwrap();
    assert!(err.contains("not healthy within the deadline of 60.0s"), "{err}");
    // 13 probes: at 0, 5, …, 60 s.
    assert_eq!(bg.fleet.calls("i-6", Op::Health), 13);
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert!(
        bg.smoke.checks().is_empty(),
        "no smoke test before every instance is healthy"
    );
    assert!(bg.switches().is_empty());
    bg.assert_env(&GREEN, "v1", false);
    bg.assert_env(&BLUE, "v1", true);
}

#[tokio::test(start_paused = true)]
async fn failed_warm_up_requests_are_counted_not_fatal() {
    let bg = setup(fleet(), FakeLiveStore::recording("blue"), |f| {
        FakeSmokeTester::for_fleet(f).fail_every_warm_request(10)
    });
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert!(out.is_success(), "{}", out.deployment);
    let warned = bg.log.events().iter().any(|e| {
        matches!(&e.kind, EventKind::StepFinished { step, result: StepResult::Warning(w), .. }
            if *step == deploykit::StepKind::WarmUp && w.contains("10 of 100"))
    });
    assert!(warned, "a warning counts the failed warm-up requests");
    let last = bg.log.events().iter().rev().find_map(|e| match &e.kind {
        EventKind::WarmUpProgress { sent, failed, .. } => Some((*sent, *failed)),
        _ => None,
    });
    assert_eq!(last, Some((100, 10)));
}

#[tokio::test(start_paused = true)]
async fn a_failed_switch_leaves_the_old_environment_live() {
    let bg = setup(
        fleet().fail_switch(Fault::OnCall(1)),
        FakeLiveStore::recording("blue"),
        FakeSmokeTester::for_fleet,
    );
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert_eq!(
        out.deployment.outcome,
        OutcomeKind::RolledBack,
        "{}",
        out.deployment
    );
    let reason = out.deployment.reason.clone().unwrap();
    assert!(
        reason.contains("switch all traffic to green failed") && reason.contains("scripted switch fault"),
        "{reason}"
    );
    assert_eq!(out.live, g("blue"));
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    assert_eq!(
        bg.store.record(),
        Some(LiveRecord::live(g("blue"))),
        "the pending mark is cleared"
    );
    bg.assert_env(&BLUE, "v1", true);
    bg.assert_env(&GREEN, "v1", false);
    bg.assert_routing_safe();
}

#[tokio::test(start_paused = true)]
async fn a_switch_back_that_fails_makes_the_rollback_failed_and_leaves_the_pending_mark() {
    let bg = setup(
        fleet().fail_switch(Fault::Always),
        FakeLiveStore::recording("blue"),
        FakeSmokeTester::for_fleet,
    );
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert_eq!(
        out.deployment.outcome,
        OutcomeKind::RollbackFailed,
        "{}",
        out.deployment
    );
    let reason = out.deployment.reason.clone().unwrap();
    assert!(
        reason.contains("switch all traffic to blue failed during the rollback"),
        "{reason}"
    );
    // Every switch failed, so traffic never left blue.
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    // Recording blue live is skipped: the pending mark lets the next
    // reconcile ask the load balancer.
    assert_eq!(
        bg.store.record(),
        Some(LiveRecord::switching(g("blue"), g("green")))
    );
    bg.assert_env(&GREEN, "v1", false);
}

#[tokio::test(start_paused = true)]
async fn a_transient_switch_failure_is_retried() {
    let bg = setup(
        fleet().fail_switch(Fault::Transient(1)),
        FakeLiveStore::recording("blue"),
        FakeSmokeTester::for_fleet,
    );
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert!(out.is_success(), "{}", out.deployment);
    assert_eq!(bg.fleet.live_group(), Some(g("green")));
}

#[tokio::test(start_paused = true)]
async fn a_failure_between_switch_and_record_switches_back_and_records_the_old_environment() {
    // Save 1 records the pending switch, save 2 (green live) fails.
    let store = FakeLiveStore::recording("blue").fail_save(Fault::OnCall(2));
    let bg = setup(fleet(), store, FakeSmokeTester::for_fleet);
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);

    assert_eq!(
        out.deployment.outcome,
        OutcomeKind::RolledBack,
        "{}",
        out.deployment
    );
    assert!(out
        .deployment
        .reason
        .as_deref()
        .unwrap()
        .contains("record green live failed"));
    let switches: Vec<_> = bg.switches().into_iter().map(|(_, to)| to).collect();
    assert_eq!(switches, ["green", "blue"], "switched, then back");
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    assert_eq!(bg.store.record(), Some(LiveRecord::live(g("blue"))));
    bg.assert_env(&BLUE, "v1", true);
    bg.assert_env(&GREEN, "v1", false);
    bg.assert_routing_safe();
}

#[tokio::test(start_paused = true)]
async fn when_no_record_can_be_written_after_the_switch_the_pending_mark_lets_reconcile_decide() {
    let store = FakeLiveStore::recording("blue").fail_save(Fault::FromCall(2));
    let bg = setup(fleet(), store, FakeSmokeTester::for_fleet);
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert_eq!(out.deployment.outcome, OutcomeKind::RolledBack);
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    // The record still shows the pending switch; the load balancer says
    // blue, so the switch did not stick and blue is live.
    assert_eq!(
        bg.store.record(),
        Some(LiveRecord::switching(g("blue"), g("green")))
    );
    let warned = bg.log.events().iter().any(|e| {
        matches!(&e.kind, EventKind::Warning { message, .. } if message.contains("traffic is back on blue"))
    });
    assert!(warned);
    let lb = bg.fleet.load_balancer();
    let envs = [g("blue"), g("green")];
    // While the record cannot be written, reconciling says so.
    let e = reconcile(&bg.store, &lb, &envs).await.unwrap_err();
    assert!(e.to_string().contains("disk full"), "{e}");
    bg.store.heal();
    let r = reconcile(&bg.store, &lb, &envs).await.unwrap();
    assert_eq!((r.live, r.resolution), (g("blue"), Resolution::AbandonedSwitch));
    assert_eq!(bg.store.record(), Some(LiveRecord::live(g("blue"))));
}

#[tokio::test(start_paused = true)]
async fn rollback_with_the_old_environment_warm_switches_back_without_starting_it() {
    let bg = default_setup();
    let bluegreen = BlueGreen {
        keep_old: KeepOld::UntilNextDeployment,
        ..BlueGreen::default()
    };
    let out = bluegreen.deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert!(out.is_success());
    assert!(out.kept_running.is_some());
    bg.assert_env(&BLUE, "v1", true);

    let started = tokio::time::Instant::now();
    let rb = bluegreen.rollback(&bg.exec).await.unwrap();
    bg.assert_invariants(&rb.deployment);
    assert!(rb.is_success(), "{}", rb.deployment);
    assert_eq!(rb.live, g("blue"));
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    assert_eq!(bg.store.record(), Some(LiveRecord::live(g("blue"))));
    assert!(
        BLUE.iter().all(|i| bg.fleet.calls(i, Op::Start) == 0),
        "warm blue was not restarted"
    );
    // Instant: no wait at all in virtual time.
    assert_eq!(started.elapsed(), Duration::ZERO);
    bg.assert_env(&BLUE, "v1", true);
    bg.assert_env(&GREEN, "v2", false);
    bg.assert_routing_safe();
}

#[tokio::test(start_paused = true)]
async fn rollback_with_the_old_environment_stopped_starts_it_first() {
    let bg = default_setup();
    let bluegreen = BlueGreen::default();
    assert!(bluegreen.deploy(&bg.exec, &v("v2")).await.unwrap().is_success());
    bg.assert_env(&BLUE, "v1", false);

    let rb = bluegreen.rollback(&bg.exec).await.unwrap();
    bg.assert_invariants(&rb.deployment);
    assert!(rb.is_success(), "{}", rb.deployment);
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    assert_eq!(bg.store.live(), Some(g("blue")));
    assert!(BLUE.iter().all(|i| bg.fleet.calls(i, Op::Start) == 1));
    bg.assert_env(&BLUE, "v1", true);
    bg.assert_env(&GREEN, "v2", false);
    bg.assert_routing_safe();
    let last_switch = bg.switches().pop().unwrap();
    let ops = bg.fleet.ops();
    for id in BLUE {
        let healthy = ops
            .iter()
            .rev()
            .find(|o| o.instance.as_str() == id && o.op == Op::Health && o.ok)
            .unwrap();
        assert!(
            healthy.at <= last_switch.0,
            "{id} was healthy before traffic came back"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn rollback_is_refused_touching_nothing_when_the_old_environment_cannot_be_made_healthy() {
    let bg = default_setup();
    let bluegreen = BlueGreen {
        healthy_deadline: Duration::from_secs(30),
        ..BlueGreen::default()
    };
    assert!(bluegreen.deploy(&bg.exec, &v("v2")).await.unwrap().is_success());
    let saves_before = bg.store.saves().len();
    let switches_before = bg.switches().len();
    // i-2 (blue) no longer gets healthy.
    let _ = bg.fleet.clone().fault("i-2", Op::Health, Fault::Always);

    let err = bluegreen.rollback(&bg.exec).await.unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("blue could not be made healthy")
            && msg.contains("i-2")
            && msg.contains("green stays live"),
        "{msg}"
    );
    assert_eq!(bg.fleet.live_group(), Some(g("green")));
    assert_eq!(bg.store.saves().len(), saves_before);
    assert_eq!(bg.switches().len(), switches_before);
    bg.assert_env(&GREEN, "v2", true);
    // The blue instances started for the rollback are stopped again.
    bg.assert_env(&BLUE, "v1", false);
    bg.assert_routing_safe();
}

#[tokio::test(start_paused = true)]
async fn a_rollback_during_the_keep_old_window_keeps_the_old_environment_running() {
    let bg = Arc::new(default_setup());
    let bluegreen = BlueGreen::default();
    let deploy = {
        let (bg, bluegreen) = (bg.clone(), bluegreen.clone());
        tokio::spawn(async move { bluegreen.deploy(&bg.exec, &v("v2")).await.unwrap() })
    };
    // Wait (bounded, virtual) until green is live, then roll back inside the
    // 30 s window.
    for _ in 0..600 {
        if bg.store.live() == Some(g("green")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(bg.store.live(), Some(g("green")));
    let rb = bluegreen.rollback(&bg.exec).await.unwrap();
    bg.assert_invariants(&rb.deployment);
    assert!(rb.is_success());
    let out = deploy.await.unwrap();
    assert!(out.is_success());
    assert!(
        out.retired.is_none(),
        "the deployment must not stop blue, which is live again"
    );
    assert!(out.kept_running.as_deref().unwrap().contains("live again"));
    bg.assert_env(&BLUE, "v1", true);
    bg.assert_env(&GREEN, "v2", false);
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
}

#[tokio::test(start_paused = true)]
async fn a_record_that_contradicts_the_load_balancer_is_refused_before_anything_is_touched() {
    let bg = setup(
        fleet(),
        FakeLiveStore::recording("green"),
        FakeSmokeTester::for_fleet,
    );
    let err = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap_err();
    assert!(matches!(err, Error::Inconsistent(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("says green is live") && msg.contains("sends all traffic to blue"),
        "{msg}"
    );
    assert!(bg.fleet.ops().is_empty(), "nothing was touched");
    assert!(bg.store.saves().is_empty());
    let err = BlueGreen::default().rollback(&bg.exec).await.unwrap_err();
    assert!(matches!(err, Error::Inconsistent(_)), "{err}");
    assert!(bg.fleet.ops().is_empty());
}

#[tokio::test(start_paused = true)]
async fn reconciliation_completes_a_recorded_switch_and_adopts_the_load_balancer() {
    // A crash after the switch, before the record: LB on green, record
    // blue with a switch to green pending → green is live.
    let bg = setup(
        FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).live("green"),
        FakeLiveStore::recording_switch("blue", "green"),
        FakeSmokeTester::for_fleet,
    );
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert!(out.is_success(), "{}", out.deployment);
    assert_eq!(out.live, g("blue"), "deployed to blue, the idle one");
    assert_eq!(
        bg.store.saves()[0],
        LiveRecord::live(g("green")),
        "the switch was completed first"
    );

    // No record, LB tells: adopt it.
    let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]).live("green");
    let store = FakeLiveStore::new();
    let envs = [g("blue"), g("green")];
    let r = reconcile(&store, &fleet.load_balancer(), &envs).await.unwrap();
    assert_eq!((r.live, r.resolution), (g("green"), Resolution::FromLoadBalancer));
    assert_eq!(store.live(), Some(g("green")));
    // No record, LB cannot tell: blue by default, nothing written.
    let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
    let store = FakeLiveStore::new();
    let r = reconcile(&store, &fleet.load_balancer(), &envs).await.unwrap();
    assert_eq!((r.live, r.resolution), (g("blue"), Resolution::Default));
    assert!(store.saves().is_empty());
    // A pending switch and a load balancer that cannot tell: refused.
    let store = FakeLiveStore::recording_switch("blue", "green");
    let e = reconcile(&store, &fleet.load_balancer(), &envs)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("cannot tell"), "{e}");
    // A load balancer on a group that is no environment: refused.
    let fleet = FakeFleet::with_groups(&[("blue", 1), ("red", 1)]).live("red");
    let e = reconcile(&FakeLiveStore::new(), &fleet.load_balancer(), &envs)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("red"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn cancelling_before_the_switch_stops_the_idle_environment() {
    let bg = setup(fleet(), FakeLiveStore::recording("blue"), |f| {
        FakeSmokeTester::for_fleet(f).latency(Duration::from_secs(1))
    });
    let cancel = bg.exec.cancel_token();
    let exec = bg.exec.clone();
    let task = tokio::spawn(async move { BlueGreen::default().deploy(&exec, &v("v2")).await.unwrap() });
    // Smoke checks take 3 s per instance; cancel in the middle of them.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cancel.cancel();
    let out = task.await.unwrap();
    assert_eq!(
        out.deployment.outcome,
        OutcomeKind::RolledBack,
        "{}",
        out.deployment
    );
    assert!(bg.switches().is_empty());
    bg.assert_env(&GREEN, "v1", false);
    bg.assert_env(&BLUE, "v1", true);
}

#[tokio::test(start_paused = true)]
async fn missing_store_and_bad_parameters_are_input_errors() {
    let fleet = fleet();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .build()
        .unwrap();
    let e = BlueGreen::default().deploy(&exec, &v("v2")).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput { field, .. } if field == "live_store"),
        "{e}"
    );
    let bg = default_setup();
    let bad = BlueGreen {
        health_interval: Duration::ZERO,
        ..BlueGreen::default()
    };
    let e = bad.deploy(&bg.exec, &v("v2")).await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidInput { field, .. } if field == "health_interval"),
        "{e}"
    );
    assert!(bg.fleet.ops().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stale_blue_green_plan_cannot_prepare_the_live_environment() {
    // Green is live; a plan made from a stale view (a record elsewhere that
    // still says blue) would prepare, i.e. stop, green. The executor refuses
    // it before touching anything.
    let envs = [g("blue"), g("green")];
    let stale = FakeLiveStore::recording("blue");
    let bg = setup(
        FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).live("green"),
        FakeLiveStore::recording("green"),
        FakeSmokeTester::for_fleet,
    );
    let lb = bg.fleet.load_balancer();
    let view = peek(&stale, &lb, &envs).await.unwrap();
    let plan = BlueGreen::default()
        .plan(&view, &bg.exec.snapshot().await.unwrap(), &v("v2"))
        .unwrap();
    let e = bg.exec.run(&plan, RunOptions::default()).await.unwrap_err();
    assert!(matches!(e, Error::Inconsistent(_)), "{e}");
    assert!(e.to_string().contains("says green is live"), "{e}");
    assert!(bg.fleet.ops().is_empty());
    // With no record, the load balancer still tells.
    let bg = setup(
        FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).live("green"),
        FakeLiveStore::new(),
        FakeSmokeTester::for_fleet,
    );
    let e = bg.exec.run(&plan, RunOptions::default()).await.unwrap_err();
    assert!(e.to_string().contains("sends all traffic to green"), "{e}");
    assert!(bg.fleet.ops().is_empty());
    // Reconciling first does the right thing: deploys to blue.
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert!(out.is_success(), "{}", out.deployment);
    assert_eq!(out.live, g("blue"));
}

/// Real time and a real temp dir: the symlink switch does file I/O on
/// blocking threads, which paused time would race.
#[tokio::test]
async fn the_symlink_switch_serves_setups_without_a_balancer() {
    use deploykit::lb::SymlinkSwitch;
    use deploykit::LoadBalancer;
    let root = std::env::temp_dir().join(format!("dk-it-symlink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    for env in ["blue", "green"] {
        std::fs::create_dir_all(root.join(env)).unwrap();
    }
    let switch = SymlinkSwitch::builder(root.join("live"))
        .environment(g("blue"), root.join("blue"))
        .environment(g("green"), root.join("green"))
        .build()
        .unwrap();
    switch.switch_to(&g("blue")).await.unwrap();
    let fleet = FakeFleet::with_groups(&[("blue", 2), ("green", 2)]);
    let store = FakeLiveStore::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(switch))
        .smoke_tester(Arc::new(FakeSmokeTester::for_fleet(&fleet)))
        .live_store(Arc::new(store.clone()))
        .build()
        .unwrap();
    let bluegreen = BlueGreen {
        keep_old: KeepOld::UntilNextDeployment,
        ..BlueGreen::default()
    };
    let out = bluegreen.deploy(&exec, &v("v2")).await.unwrap();
    assert!(out.is_success(), "{}", out.deployment);
    assert_eq!(std::fs::read_link(root.join("live")).unwrap(), root.join("green"));
    assert_eq!(store.live(), Some(g("green")));
    let rb = bluegreen.rollback(&exec).await.unwrap();
    assert!(rb.is_success(), "{}", rb.deployment);
    assert_eq!(std::fs::read_link(root.join("live")).unwrap(), root.join("blue"));
    assert_eq!(store.live(), Some(g("blue")));
    std::fs::remove_dir_all(&root).unwrap();
}

#[tokio::test(start_paused = true)]
async fn cancelling_during_the_keep_old_window_leaves_the_old_environment_running() {
    let bg = default_setup();
    let cancel = bg.exec.cancel_token();
    let exec = bg.exec.clone();
    let task = tokio::spawn(async move { BlueGreen::default().deploy(&exec, &v("v2")).await.unwrap() });
    // The switch happens at once in virtual time; the window is 30 s.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(bg.fleet.live_group(), Some(g("green")));
    cancel.cancel();
    let out = task.await.unwrap();
    assert!(
        out.is_success(),
        "the deployment itself had finished: {}",
        out.deployment
    );
    assert!(out.retired.is_none());
    assert!(
        out.kept_running.as_deref().unwrap().contains("cancelled"),
        "{:?}",
        out.kept_running
    );
    bg.assert_env(&BLUE, "v1", true);
    bg.assert_env(&GREEN, "v2", true);
}

#[tokio::test(start_paused = true)]
async fn transient_record_failures_are_retried() {
    let store = FakeLiveStore::recording("blue").fail_save(Fault::Transient(2));
    let bg = setup(fleet(), store, FakeSmokeTester::for_fleet);
    let out = BlueGreen::default().deploy(&bg.exec, &v("v2")).await.unwrap();
    bg.assert_invariants(&out.deployment);
    assert!(out.is_success(), "{}", out.deployment);
    assert_eq!(bg.store.record(), Some(LiveRecord::live(g("green"))));
}

#[tokio::test(start_paused = true)]
async fn a_failing_preflight_refuses_a_deployment_but_not_a_rollback() {
    // The first preflight (the deployment's) passes, every later one fails.
    let bg = setup(
        fleet().fail_preflight(Fault::FromCall(2)),
        FakeLiveStore::recording("blue"),
        FakeSmokeTester::for_fleet,
    );
    let bluegreen = BlueGreen::default();
    assert!(bluegreen.deploy(&bg.exec, &v("v2")).await.unwrap().is_success());
    bg.assert_env(&BLUE, "v1", false);

    // A second deployment is refused before anything starts.
    let err = bluegreen.deploy(&bg.exec, &v("v3")).await.unwrap_err();
    assert!(matches!(err, Error::Refused(_)), "{err:?}");
    bg.assert_env(&BLUE, "v1", false);
    assert_eq!(bg.fleet.live_group(), Some(g("green")));

    // The rollback goes on: blue started, traffic back, a warning says why.
    let events_before = bg.log.events().len();
    let rb = bluegreen.rollback(&bg.exec).await.unwrap();
    bg.assert_invariants(&rb.deployment);
    assert!(rb.is_success(), "{}", rb.deployment);
    assert_eq!(bg.fleet.live_group(), Some(g("blue")));
    bg.assert_env(&BLUE, "v1", true);
    bg.assert_env(&GREEN, "v2", false);
    let warnings: Vec<String> = bg.log.events()[events_before..]
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Warning { message, .. } => Some(message.clone()),
            _ => None,
        })
        .collect();
    assert!(
        warnings
            .iter()
            .any(|m| m.contains("failed its preflight check; going on because this run restores")),
        "{warnings:?}"
    );
}
