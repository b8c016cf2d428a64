//! Chaos entries of a canary, on the fakes, in virtual time: a fault is
//! injected into its stage, the gate reacts (or not), and the verdicts say
//! whether the expectation held.

use std::sync::Arc;
use std::time::Duration;

use deploykit::analysis::HealthWatch;
use deploykit::chaos::{verdicts, ByteRate, ChaosSpec, ChaosTarget, ChaosVerdict, Expect, Fault};
use deploykit::{
    Canary, Event, EventKind, EventLog, Executor, Metric, OutcomeKind, ReleaseId, Report, RunOptions,
};
use deploykit_testkit::{FakeFaults, FakeFleet, FakeMetrics};

const GROUPS: [(&str, usize); 2] = [("stable", 4), ("canary", 1)];

struct Drill {
    fleet: FakeFleet,
    faults: FakeFaults,
    exec: Executor,
    log: EventLog,
}

/// Four stable instances and one canary, both tracks healthy; the metrics
/// see the injected faults when `wired` (a metric query that matches the
/// canary's traffic), and do not otherwise.
fn drill(wired: bool) -> Drill {
    let fleet = FakeFleet::with_groups(&GROUPS);
    let faults = FakeFaults::new();
    let mut metrics = FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, 0.001)
        .set("canary", Metric::LatencyP99, 0.12);
    if wired {
        metrics = metrics.with_faults(&faults, &GROUPS);
    }
    let log = EventLog::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(log.clone()))
        .metrics(Arc::new(metrics))
        .fault_injector(Arc::new(faults.clone()))
        .build()
        .expect("valid executor");
    Drill {
        fleet,
        faults,
        exec,
        log,
    }
}

/// Three stages of 5 minutes, checked every 30 s, carrying `chaos`.
fn canary(chaos: Vec<ChaosSpec>) -> Canary {
    Canary {
        stages: vec![10, 50, 100],
        stage_duration: Duration::from_secs(300),
        check_interval: Duration::from_secs(30),
        chaos,
        ..Canary::default()
    }
}

/// 50 % of the canary's requests answered 503 from 45 s into stage 2 (between
/// two checks),
/// expecting a rollback within `within`.
fn http_errors(within: &str) -> ChaosSpec {
    serde_json::from_value(serde_json::json!({
        "stage": 2, "after": "45s", "kind": "http-error", "percent": 50,
        "expect": "rollback", "within": within,
    }))
    .unwrap()
}

impl Drill {
    async fn run(&self, canary: &Canary) -> (Report, Vec<Event>) {
        let report = self
            .exec
            .deploy(canary, &ReleaseId::new("v2").unwrap())
            .await
            .expect("deployment starts");
        (report, self.log.events())
    }
}

#[tokio::test(start_paused = true)]
async fn http_errors_on_the_canary_roll_back_within_budget_and_the_verdict_says_when() {
    let d = drill(true);
    let c = canary(vec![http_errors("90s")]);
    let (report, events) = d.run(&c).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{:?}", report.reason);
    let v = verdicts(&c.chaos, &events);
    assert_eq!(v.len(), 1);
    assert!(v[0].passed, "{}", v[0]);
    assert_eq!(v[0].instances, vec![deploykit::InstanceId::new("i-5").unwrap()]);
    let injected = v[0].injected_at_ms.unwrap();
    let tripped = v[0]
        .tripped
        .as_ref()
        .expect("a failing check after the injection");
    // The first check after the injection (checks every 30 s) is the one that trips.
    assert!(
        tripped.at_ms >= injected && tripped.at_ms <= injected + 30_000,
        "{}",
        v[0]
    );
    assert!(tripped.result.contains("error rate"), "{}", tripped.result);
    assert!(v[0].rolled_back_at_ms.unwrap() - injected <= 90_000);
    // The fault was injected into stage 2, on the canary only, and cleared before the rollback.
    let stage = events.iter().find_map(|e| match &e.kind {
        EventKind::ChaosInjected { stage, fault, .. } => Some((*stage, *fault)),
        _ => None,
    });
    assert_eq!(
        stage,
        Some((
            2,
            Fault::HttpError {
                status: 503,
                percent: 50
            }
        ))
    );
    assert_eq!(d.faults.injected().len(), 1);
    assert!(d.faults.active().is_empty(), "a fault outlived its stage");
    let cleared = events
        .iter()
        .position(|e| matches!(e.kind, EventKind::ChaosCleared { entry: 0 }));
    let rollback = events
        .iter()
        .position(|e| matches!(e.kind, EventKind::RollbackStarted { .. }));
    assert!(
        cleared.unwrap() < rollback.unwrap(),
        "cleared after the rollback started"
    );
}

#[tokio::test(start_paused = true)]
async fn a_gate_that_cannot_see_the_fault_fails_the_drill() {
    // The metric queries do not see the canary's errors (templates that
    // match nothing): the canary is promoted, and the verdict says the gate
    // did not fire.
    let d = drill(false);
    let c = canary(vec![http_errors("90s")]);
    let (report, events) = d.run(&c).await;
    assert_eq!(report.outcome, OutcomeKind::Succeeded);
    let v = verdicts(&c.chaos, &events);
    assert!(!v[0].passed);
    assert!(v[0].injected_at_ms.is_some());
    assert!(v[0].explanation.contains("the gate did not fire"), "{}", v[0]);
    assert!(d.faults.active().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_rollback_later_than_within_fails_the_drill() {
    let d = drill(true);
    let c = canary(vec![http_errors("5s")]);
    let (report, events) = d.run(&c).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    let v = verdicts(&c.chaos, &events);
    assert!(!v[0].passed, "{}", v[0]);
    assert!(v[0].explanation.contains("over the budget of 5s"), "{}", v[0]);
}

#[tokio::test(start_paused = true)]
async fn a_paused_stable_instance_is_continued_and_the_deployment_carries_on() {
    let d = drill(true);
    let pause = ChaosSpec {
        stage: 1,
        after: Duration::from_secs(30),
        duration: Some(Duration::from_secs(60)),
        target: ChaosTarget::Stable,
        fault: Fault::Pause,
        expect: Expect::Continue,
        within: None,
    };
    let c = canary(vec![pause.clone()]);
    let exec = d.exec.clone();
    let fleet = d.fleet.clone();
    let run = tokio::spawn(async move { exec.deploy(&c, &ReleaseId::new("v2").unwrap()).await.unwrap() });
    // Stage 1 starts after the canary is deployed (seconds); 60 s into it
    // every stable instance is paused.
    let mut seen_paused = false;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if fleet.is_paused("i-1") {
            seen_paused = true;
            break;
        }
    }
    assert!(seen_paused, "the stable instances were never paused");
    let report = run.await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{:?}", report.reason);
    assert!(!fleet.is_paused("i-1"), "SIGCONT was never sent");
    let v = verdicts(&[pause], &d.log.events());
    assert!(v[0].passed, "{}", v[0]);
    assert_eq!(v[0].instances.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_bandwidth_limit_goes_to_the_fault_injector_for_its_duration_and_not_to_the_process() {
    let d = drill(true);
    let slow = ChaosSpec {
        stage: 1,
        after: Duration::from_secs(30),
        duration: Some(Duration::from_secs(60)),
        target: ChaosTarget::Canary,
        fault: Fault::Bandwidth {
            rate: ByteRate::new(64 * 1024),
            percent: 100,
        },
        expect: Expect::Continue,
        within: None,
    };
    let c = canary(vec![slow.clone()]);
    let exec = d.exec.clone();
    let faults = d.faults.clone();
    let run = tokio::spawn(async move { exec.deploy(&c, &ReleaseId::new("v2").unwrap()).await.unwrap() });
    let mut seen_active = false;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if faults.active() == vec![(deploykit::InstanceId::new("i-5").unwrap(), slow.fault)] {
            seen_active = true;
            break;
        }
    }
    assert!(seen_active, "the canary's traffic was never limited");
    let report = run.await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{:?}", report.reason);
    assert!(d.faults.active().is_empty(), "the limit outlived its duration");
    assert_eq!(d.faults.injected().len(), 1);
    assert!(!d.fleet.is_paused("i-5"));
    let events = d.log.events();
    let injected = events.iter().find_map(|e| match &e.kind {
        EventKind::ChaosInjected { fault, .. } => Some(e.elapsed_ms).filter(|_| *fault == slow.fault),
        _ => None,
    });
    let cleared = events.iter().find_map(|e| match e.kind {
        EventKind::ChaosCleared { entry: 0 } => Some(e.elapsed_ms),
        _ => None,
    });
    assert_eq!(
        cleared.unwrap() - injected.expect("a chaos_injected event of the limit"),
        60_000,
        "the limit lasted its duration"
    );
    let v = verdicts(&[slow], &events);
    assert!(v[0].passed, "{}", v[0]);
}

#[tokio::test(start_paused = true)]
async fn a_bandwidth_limit_that_slows_big_answers_trips_the_latency_gate_and_rolls_back() {
    // 256 KiB answers at 64 KiB/s: 4 s more on the canary's p99.
    let fleet = FakeFleet::with_groups(&GROUPS);
    let faults = FakeFaults::new().with_answer_bytes(256 * 1024);
    let metrics = FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, 0.001)
        .set("canary", Metric::LatencyP99, 0.12)
        .with_faults(&faults, &GROUPS);
    let log = EventLog::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(log.clone()))
        .metrics(Arc::new(metrics))
        .fault_injector(Arc::new(faults.clone()))
        .build()
        .unwrap();
    let slow: ChaosSpec = serde_json::from_value(serde_json::json!({
        "stage": 2, "after": "45s", "kind": "bandwidth", "rate": "64KiB/s",
        "expect": "rollback", "within": "90s",
    }))
    .unwrap();
    let c = canary(vec![slow]);
    let report = exec.deploy(&c, &ReleaseId::new("v2").unwrap()).await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{:?}", report.reason);
    let v = verdicts(&c.chaos, &log.events());
    assert!(v[0].passed, "{}", v[0]);
    let tripped = v[0].tripped.as_ref().expect("a failing check after the limit");
    assert!(tripped.result.contains("p99"), "{}", tripped.result);
    assert!(faults.active().is_empty(), "the limit outlived its stage");
}

#[tokio::test(start_paused = true)]
async fn a_chaos_entry_whose_stage_is_never_reached_fails() {
    let d = drill(true);
    // Stage 1 fails at once (the canary's error rate is over the threshold
    // from the start), so the entry of stage 3 is never injected.
    let mut c = canary(vec![http_errors("90s")]);
    c.chaos[0].stage = 3;
    c.chaos.push(ChaosSpec {
        stage: 1,
        after: Duration::ZERO,
        duration: None,
        target: ChaosTarget::Canary,
        fault: Fault::HttpError {
            status: 500,
            percent: 100,
        },
        expect: Expect::Rollback,
        within: Some(Duration::from_secs(120)),
    });
    let (report, events) = d.run(&c).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    let v = verdicts(&c.chaos, &events);
    assert!(!v[0].passed);
    assert!(v[0].explanation.contains("never injected"), "{}", v[0]);
    assert!(v[1].passed, "{}", v[1]);
}

#[tokio::test(start_paused = true)]
async fn network_chaos_without_a_fault_injector_is_refused_before_anything_is_touched() {
    let fleet = FakeFleet::with_groups(&GROUPS);
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(FakeMetrics::new()))
        .build()
        .unwrap();
    let e = exec
        .deploy(&canary(vec![http_errors("90s")]), &ReleaseId::new("v2").unwrap())
        .await
        .unwrap_err();
    assert!(e.to_string().starts_with("invalid fault_injector"), "{e}");
    assert!(fleet.ops().is_empty(), "touched: {:?}", fleet.ops());
}

#[test]
fn chaos_entries_are_checked_naming_the_field() {
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"stage": 4, "kind": "kill", "expect": "continue"}),
            "invalid chaos[0].stage: 4 is not a stage of this canary (1-3)",
        ),
        (
            serde_json::json!({"stage": 1, "kind": "kill", "expect": "rollback"}),
            "invalid chaos[0].within: is missing",
        ),
        (
            serde_json::json!({"stage": 1, "kind": "http-error", "percent": 0, "expect": "continue"}),
            "invalid chaos[0].percent: 0 is outside 1-100",
        ),
        (
            serde_json::json!({"stage": 1, "kind": "latency", "delay": "0s", "expect": "continue"}),
            "invalid chaos[0].delay: is 0",
        ),
        (
            serde_json::json!({"stage": 1, "after": "5m", "kind": "kill", "expect": "continue"}),
            "invalid chaos[0].after: 5m is not shorter than stage_duration (5m)",
        ),
        (
            serde_json::json!({"stage": 1, "kind": "kill", "expect": "rollback", "within": "0s"}),
            "invalid chaos[0].within: is 0",
        ),
        (
            serde_json::json!({"stage": 1, "kind": "bandwidth", "rate": "0KiB/s", "expect": "continue"}),
            "invalid chaos[0].rate: is 0",
        ),
        (
            serde_json::json!({"stage": 1, "kind": "bandwidth", "rate": 1024, "percent": 101, "expect": "continue"}),
            "invalid chaos[0].percent: 101 is outside 1-100",
        ),
    ];
    for (entry, want) in cases {
        let spec: ChaosSpec = serde_json::from_value(entry.clone()).unwrap();
        let e = canary(vec![spec]).validate().unwrap_err().to_string();
        assert!(e.starts_with(want), "{entry}: {e}");
    }
}

#[test]
fn the_toml_form_reads_as_written_and_refuses_unknown_keys() {
    let c: Canary = toml_canary(
        r#"
        stages = [10, 50, 100]
        [[chaos]]
        stage = 2
        kind = "http-error"
        percent = 5
        duration = "60s"
        expect = "rollback"
        within = "90s"
        "#,
    )
    .unwrap();
    assert_eq!(c.chaos.len(), 1);
    assert_eq!(
        c.chaos[0].fault,
        Fault::HttpError {
            status: 503,
            percent: 5
        }
    );
    assert_eq!(c.chaos[0].duration, Some(Duration::from_secs(60)));
    assert_eq!(c.chaos[0].within, Some(Duration::from_secs(90)));
    let e = toml_canary(
        r#"
        [[chaos]]
        stage = 1
        kind = "kill"
        precent = 5
        expect = "continue"
        "#,
    )
    .unwrap_err();
    assert!(e.contains("precent"), "{e}");
    let e = toml_canary(
        r#"
        [[chaos]]
        stage = 1
        kind = "explode"
        expect = "continue"
        "#,
    )
    .unwrap_err();
    assert!(e.contains("explode"), "{e}");
    let e = toml_canary(
        r#"
        [[chaos]]
        stage = 1
        kind = "kill"
        percent = 5
        expect = "continue"
        "#,
    )
    .unwrap_err();
    assert!(e.contains("percent does not apply to kind = \"kill\""), "{e}");
    let e = toml_canary(
        r#"
        [[chaos]]
        stage = 1
        kind = "http-error"
        expect = "continue"
        "#,
    )
    .unwrap_err();
    assert!(e.contains("needs percent"), "{e}");
}

#[test]
fn a_bandwidth_entry_reads_its_rate_with_a_unit_or_in_bytes_and_refuses_anything_else() {
    let entry = |rate: &str| {
        toml_canary(&format!(
            "[[chaos]]\nstage = 1\nkind = \"bandwidth\"\nrate = {rate}\nexpect = \"continue\"\n"
        ))
        .map(|c| c.chaos[0].fault)
    };
    let limit = |bytes: u64| Fault::Bandwidth {
        rate: ByteRate::new(bytes),
        percent: 100,
    };
    assert_eq!(entry("\"64KiB/s\"").unwrap(), limit(65_536));
    assert_eq!(entry("\"1MB/s\"").unwrap(), limit(1_000_000));
    assert_eq!(entry("\"2 mib\"").unwrap(), limit(2 << 20));
    assert_eq!(entry("4096").unwrap(), limit(4096));
    for bad in ["\"64 kbit/s\"", "\"fast\"", "\"1.5MiB/s\"", "-5"] {
        let e = entry(bad).unwrap_err();
        assert!(e.contains("rate"), "{bad}: {e}");
    }
    let e = entry("\"fast\"").unwrap_err();
    assert!(
        e.contains("\"fast\" is not a bandwidth") && e.contains("\"64KiB/s\""),
        "{e}"
    );
    let e = toml_canary("[[chaos]]\nstage = 1\nkind = \"bandwidth\"\nexpect = \"continue\"\n").unwrap_err();
    assert!(e.contains("kind = \"bandwidth\" needs rate"), "{e}");
    let e = toml_canary(
        "[[chaos]]\nstage = 1\nkind = \"latency\"\ndelay = \"1s\"\nrate = 100\nexpect = \"continue\"\n",
    )
    .unwrap_err();
    assert!(e.contains("rate does not apply to kind = \"latency\""), "{e}");
    // Written back in the largest unit that divides it, it reads the same.
    let c = toml_canary(
        "[[chaos]]\nstage = 1\nkind = \"bandwidth\"\nrate = \"128KiB\"\npercent = 20\nexpect = \"continue\"\n",
    )
    .unwrap();
    let json = serde_json::to_value(&c.chaos[0]).unwrap();
    assert_eq!(json["rate"], "128KiB/s");
    assert_eq!(json["percent"], 20);
    assert_eq!(serde_json::from_value::<ChaosSpec>(json).unwrap(), c.chaos[0]);
    assert_eq!(
        c.chaos[0].fault.to_string(),
        "bandwidth limited to 128KiB/s on 20% of requests"
    );
}

fn toml_canary(text: &str) -> Result<Canary, String> {
    toml::from_str(text).map_err(|e| e.to_string())
}

/// A drill of the release the fleet runs (v1): the canary is given v1 and
/// answers only 503 from 90 s into stage 1 (checks every 30 s); with
/// `canary_errors` its queries answer that error rate throughout.
fn current_release_drill(wired: bool, canary_errors: Option<f64>) -> (Drill, Canary) {
    let mut d = drill(wired);
    if let Some(rate) = canary_errors {
        // The canary's queries answer a rate of their own (a broken gate).
        let metrics = FakeMetrics::new()
            .set("stable", Metric::ErrorRate, 0.001)
            .set("stable", Metric::LatencyP99, 0.12)
            .set("stable", Metric::RequestCount, 28_500.0)
            .set("canary", Metric::ErrorRate, rate)
            .set("canary", Metric::LatencyP99, 0.12)
            .with_faults(&d.faults, &GROUPS);
        d.exec = Executor::builder()
            .instances(d.fleet.instances())
            .load_balancer(Arc::new(d.fleet.load_balancer()))
            .events(Arc::new(d.log.clone()))
            .metrics(Arc::new(metrics))
            .fault_injector(Arc::new(d.faults.clone()))
            .build()
            .expect("valid executor");
    }
    let mut c = canary(Vec::new());
    let fault = Fault::HttpError {
        status: 503,
        percent: 100,
    };
    c.chaos = vec![deploykit::chaos::drill::default_entry(&c, fault, None)];
    (d, c)
}

impl Drill {
    async fn run_drill(&self, canary: &Canary) -> (Report, Vec<ChaosVerdict>) {
        let snapshot = self.exec.snapshot().await.unwrap();
        let plan = canary.drill_plan(&snapshot).expect("a drill plan");
        let report = self
            .exec
            .run(&plan, RunOptions::default())
            .await
            .expect("the drill starts");
        (
            report,
            deploykit::chaos::drill::judge(&canary.chaos, &self.log.events()),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn a_drill_of_the_current_release_passes_when_the_gate_fires_and_changes_nothing() {
    let (d, c) = current_release_drill(true, None);
    let (report, v) = d.run_drill(&c).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{:?}", report.reason);
    assert_eq!(report.release, ReleaseId::new("v1").unwrap());
    assert!(v[0].passed, "{}", v[0]);
    // The checks at 30 s and 60 s passed; the fault lands at 90 s, with the
    // third.
    assert_eq!(v[0].checks_passed_before, 2, "{}", v[0]);
    let injected = v[0].injected_at_ms.unwrap();
    let tripped = v[0].tripped.as_ref().expect("the check that fired");
    assert!(tripped.at_ms >= injected && tripped.at_ms <= injected + 30_000);
    assert!(tripped.result.contains("error rate"), "{}", tripped.result);
    // Every instance still has v1; stable was never stopped, and the canary
    // ends stopped as after any canary.
    assert!(d.fleet.releases().values().all(|r| r.as_str() == "v1"));
    for i in 1..=4 {
        assert_eq!(d.fleet.serving_release(&format!("i-{i}")).unwrap().as_str(), "v1");
    }
    assert_eq!(d.fleet.serving_release("i-5"), None);
    assert!(d.faults.active().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_drill_whose_gate_never_fires_ends_with_its_stage_and_fails() {
    let (d, c) = current_release_drill(false, None);
    let (report, v) = d.run_drill(&c).await;
    // Nothing to promote: the stage ran out its budget, traffic went back
    // to stable.
    assert_eq!(report.outcome, OutcomeKind::Succeeded);
    assert!(!v[0].passed);
    assert!(v[0].explanation.contains("the gate did not fire"), "{}", v[0]);
    // Held 90 s + the budget (210 s left in the stage, 30 s drain, 30 s),
    // not into stage 2.
    let stages: Vec<usize> = d
        .log
        .events()
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AnalysisResult { stage, .. } => Some(*stage),
            _ => None,
        })
        .collect();
    assert_eq!(stages.len(), 12, "{stages:?}");
    assert!(stages.iter().all(|s| *s == 1));
    assert!(d.fleet.releases().values().all(|r| r.as_str() == "v1"));
}

#[tokio::test(start_paused = true)]
async fn a_drill_whose_gate_rejects_a_healthy_canary_proves_nothing_and_fails() {
    // The canary's queries answer 5 % from the start: every check fails,
    // the rollback comes before the fault is even injected.
    let (d, c) = current_release_drill(true, Some(0.05));
    let (report, v) = d.run_drill(&c).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    assert!(!v[0].passed);
    assert!(v[0].explanation.contains("never injected"), "{}", v[0]);

    // Inconclusive rather than failing (the canary's queries match
    // nothing): the gate has not rolled back yet when the fault lands,
    // but no check passed before it.
    let (d, mut c) = current_release_drill(true, None);
    let metrics = FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0);
    let exec = Executor::builder()
        .instances(d.fleet.instances())
        .load_balancer(Arc::new(d.fleet.load_balancer()))
        .events(Arc::new(d.log.clone()))
        .metrics(Arc::new(metrics))
        .fault_injector(Arc::new(d.faults.clone()))
        .build()
        .unwrap();
    let d = Drill { exec, ..d };
    c.analysis.inconclusive_limit = 10;
    let (report, v) = d.run_drill(&c).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    assert!(!v[0].passed, "{}", v[0]);
    assert!(
        v[0].explanation
            .contains("no analysis check passed before the injection")
            && v[0].explanation.contains("last check before it: no data"),
        "{}",
        v[0]
    );
}

#[tokio::test(start_paused = true)]
async fn a_drill_preflight_refuses_queries_that_match_nothing_and_rules_that_cannot_fail() {
    let c = canary(Vec::new());
    let empty = FakeMetrics::new().set("stable", Metric::RequestCount, 100.0);
    let e = deploykit::chaos::drill::preflight(&empty, &c, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("the gate can never fire on real evidence: monitoring is not ready")
            && e.contains("stable error rate")
            && e.contains("answered no data"),
        "{e}"
    );
    let full = FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 100.0);
    deploykit::chaos::drill::preflight(&full, &c, Duration::from_secs(5))
        .await
        .expect("a setup whose gate can fire");
    let mut loose = c.clone();
    loose.analysis.error_threshold = 1.0;
    loose.analysis.ratio_floor = 1.0;
    let e = deploykit::chaos::drill::preflight(&full, &loose, Duration::from_secs(5))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("the gate can never fire on errors"), "{e}");
}

/// SIGKILL of the canary 45 s into stage 2, expecting a rollback within
/// `within`; the metric queries never see it (`drill(false)`).
fn kill_in_stage_2(within: &str) -> ChaosSpec {
    serde_json::from_value(serde_json::json!({
        "stage": 2, "after": "45s", "kind": "kill", "expect": "rollback", "within": within,
    }))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_health_watch_rolls_a_killed_canary_back_that_the_metrics_cannot_see() {
    let d = drill(false);
    let mut c = canary(vec![kill_in_stage_2("5s")]);
    c.analysis.health_watch = Some(HealthWatch {
        interval: Duration::from_secs(1),
        failures: 2,
    });
    let (report, events) = d.run(&c).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{:?}", report.reason);
    let reason = report.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("canary i-5 failed 2 health probe(s) in a row, 1s apart, during stage 2 (50%)"),
        "{reason}"
    );
    let v = verdicts(&c.chaos, &events);
    assert!(v[0].passed, "{}", v[0]);
    // Two probes a second apart after the kill: the rollback starts within
    // 2 s of it, long before the next metric check (30 s later).
    let injected = v[0].injected_at_ms.unwrap();
    let started = events
        .iter()
        .find(|e| matches!(e.kind, EventKind::RollbackStarted { .. }))
        .map(|e| e.elapsed_ms)
        .unwrap();
    assert!(
        started - injected <= 2_000,
        "rollback began {} ms after the kill",
        started - injected
    );
    // The verdict names the watch as what tripped, and the event is there.
    let tripped = v[0].tripped.as_ref().expect("the watch tripped");
    assert!(
        tripped
            .result
            .contains("canary i-5 failed 2 health probe(s) in a row"),
        "{}",
        tripped.result
    );
    assert!(events.iter().any(|e| matches!(
        &e.kind,
        EventKind::CanaryUnhealthy {
            stage: 2,
            weight: 50,
            failures: 2,
            ..
        }
    )));
    assert_eq!(
        d.fleet.release_of("i-5").map(|r| r.to_string()).as_deref(),
        Some("v1")
    );
}

#[tokio::test(start_paused = true)]
async fn without_the_health_watch_the_same_killed_canary_is_promoted_blind() {
    // The contrast: metrics that cannot see the dead canary promote it
    // once the watch, on by default, is turned off.
    let d = drill(false);
    let mut c = canary(vec![kill_in_stage_2("5s")]);
    assert_eq!(c.analysis.health_watch, Some(HealthWatch::DEFAULT));
    c.analysis.health_watch = None;
    let (report, events) = d.run(&c).await;
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{:?}", report.reason);
    let v = verdicts(&c.chaos, &events);
    assert!(!v[0].passed, "{}", v[0]);
}

#[tokio::test(start_paused = true)]
async fn the_health_watch_lets_a_healthy_canary_through() {
    let d = drill(true);
    let mut c = canary(Vec::new());
    c.analysis.health_watch = Some(HealthWatch {
        interval: Duration::from_secs(1),
        failures: 1,
    });
    let (report, _) = d.run(&c).await;
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{:?}", report.reason);
}

#[test]
fn the_health_watch_reads_from_toml_and_bad_values_name_the_key() {
    let c = toml_canary("stages = [10, 100]\nhealth_watch = \"500ms\"\nhealth_watch_failures = 3\n").unwrap();
    assert_eq!(
        c.analysis.health_watch,
        Some(HealthWatch {
            interval: Duration::from_millis(500),
            failures: 3
        })
    );
    // It writes back as it reads.
    let text = toml::to_string(&c).unwrap();
    assert_eq!(toml_canary(&text).unwrap(), c, "{text}");
    // Without the key the watch is on: every 1s, 2 failed probes in a row.
    assert_eq!(
        toml_canary("stages = [10, 100]\n").unwrap().analysis.health_watch,
        Some(HealthWatch {
            interval: Duration::from_secs(1),
            failures: 2
        })
    );
    let c = toml_canary("stages = [10, 100]\nhealth_watch = \"2s\"\n").unwrap();
    assert_eq!(c.analysis.health_watch.unwrap().failures, 2);
    // A count alone keeps the default interval.
    let c = toml_canary("stages = [10, 100]\nhealth_watch_failures = 3\n").unwrap();
    assert_eq!(
        c.analysis.health_watch,
        Some(HealthWatch {
            interval: Duration::from_secs(1),
            failures: 3
        })
    );
    // "off" (or false) turns it off, and writes back as "off".
    for off in ["\"off\"", "false"] {
        let c = toml_canary(&format!("stages = [10, 100]\nhealth_watch = {off}\n")).unwrap();
        assert_eq!(c.analysis.health_watch, None, "{off}");
        let text = toml::to_string(&c).unwrap();
        assert!(text.contains("health_watch = \"off\""), "{text}");
        assert_eq!(toml_canary(&text).unwrap(), c, "{text}");
    }
    let e = toml_canary("stages = [10, 100]\nhealth_watch = \"sometimes\"\n").unwrap_err();
    assert!(e.contains("health_watch") && e.contains("\"off\""), "{e}");
    let e = toml_canary("stages = [10, 100]\nhealth_watch = true\n").unwrap_err();
    assert!(
        e.contains("health_watch") && e.contains("does not say how often"),
        "{e}"
    );
    let e = toml_canary("stages = [10, 100]\nhealth_watch = \"1s\"\nhealth_watch_failures = 0\n")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("invalid analysis.health_watch_failures: is 0"),
        "{e}"
    );
    let e = toml_canary("stages = [10, 100]\nhealth_watch = \"0s\"\n")
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("invalid analysis.health_watch: is 0"), "{e}");
    // A count with the watch off would watch nothing: refused, naming both
    // keys.
    let e =
        toml_canary("stages = [10, 100]\nhealth_watch = \"off\"\nhealth_watch_failures = 3\n").unwrap_err();
    assert!(
        e.contains("health_watch_failures is set but health_watch is \"off\""),
        "{e}"
    );
}

/// What the fake balancer was told about detours, in order, with the index
/// of each in its routing history.
fn detours(fleet: &FakeFleet) -> Vec<(usize, Option<String>)> {
    fleet
        .routing_history()
        .iter()
        .enumerate()
        .filter_map(|(i, r)| match &r.change {
            deploykit_testkit::RoutingChange::Rerouted { instance, via } => {
                assert_eq!(instance.as_str(), "i-5", "only the canary is detoured");
                Some((i, via.as_ref().map(ToString::to_string)))
            }
            _ => None,
        })
        .collect()
}

/// A canary whose fault proxy is set up by `RoutedFaults` over the fake
/// balancer, with the canary's error rate at `canary_errors`.
fn routed_drill(canary_errors: f64) -> (FakeFleet, deploykit::chaos::RoutedFaults, Executor) {
    let fleet = FakeFleet::with_groups(&GROUPS);
    let lb = Arc::new(fleet.load_balancer());
    let faults = deploykit::chaos::RoutedFaults::new(lb.clone(), "127.0.0.1".parse().unwrap()).unwrap();
    let metrics = FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, canary_errors)
        .set("canary", Metric::LatencyP99, 0.12);
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(lb)
        .metrics(Arc::new(metrics))
        .fault_injector(Arc::new(faults.clone()))
        .build()
        .expect("valid executor");
    (fleet, faults, exec)
}

fn stage_one_errors() -> ChaosSpec {
    serde_json::from_value(serde_json::json!({
        "stage": 1, "kind": "http-error", "percent": 50, "expect": "rollback", "within": "5m",
    }))
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_proxied_fault_detours_the_canary_and_sends_it_home_before_the_rollback_routes() {
    let (fleet, faults, exec) = routed_drill(0.05);
    let report = exec
        .deploy(&canary(vec![stage_one_errors()]), &ReleaseId::new("v2").unwrap())
        .await
        .unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{:?}", report.reason);
    let d = detours(&fleet);
    assert_eq!(d.len(), 2, "one detour and its undoing: {d:?}");
    let via = d[0].1.as_deref().expect("the detour");
    assert!(via.starts_with("127.0.0.1:"), "{via}");
    assert_eq!(d[1].1, None, "sent home");
    // Home before the rollback moved any traffic.
    let history = fleet.routing_history();
    let rollback_routes = history
        .iter()
        .enumerate()
        .skip(d[0].0 + 1)
        .find(|(_, r)| !matches!(r.change, deploykit_testkit::RoutingChange::Rerouted { .. }))
        .map(|(i, _)| i)
        .expect("the rollback routes traffic");
    assert!(d[1].0 < rollback_routes, "{history:?}");
    assert!(faults.rerouted().await.is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_run_sends_a_detoured_canary_home() {
    let (fleet, faults, exec) = routed_drill(0.001);
    let token = exec.cancel_token();
    tokio::spawn(async move {
        // Stage 1 (5 minutes) is under way and its fault injected.
        tokio::time::sleep(Duration::from_secs(120)).await;
        token.cancel();
    });
    let report = exec
        .deploy(&canary(vec![stage_one_errors()]), &ReleaseId::new("v2").unwrap())
        .await
        .unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{:?}", report.reason);
    let d = detours(&fleet);
    assert_eq!(
        d.iter().map(|(_, v)| v.is_some()).collect::<Vec<_>>(),
        vec![true, false],
        "{d:?}"
    );
    // Sent home by the cancel, not by the end of the 5-minute stage.
    let home = fleet.routing_history()[d[1].0].at;
    assert!(home < Duration::from_secs(300), "sent home at {home:?}");
    assert!(faults.rerouted().await.is_empty());
}
