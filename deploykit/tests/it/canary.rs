//! Canary engine scenarios on the fakes, in virtual time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deploykit::analysis::{AnalysisMetric, CheckOutcome};
use deploykit::{
    Canary, Event, EventKind, EventLog, Executor, Group, InstanceStatus, Metric, Observation, OutcomeKind,
    Promotion, PromotionHandle, ReleaseId, Report,
};
use deploykit_testkit::{FakeFleet, FakeMetrics, Op, RoutingChange};

const STABLE: [&str; 4] = ["i-1", "i-2", "i-3", "i-4"];
const CANARY: &str = "i-5";

struct CanarySetup {
    fleet: FakeFleet,
    exec: Executor,
    log: EventLog,
    handle: PromotionHandle,
    /// Most instances out of rotation at once that the invariants allow.
    max_out: usize,
}

/// Four stable instances (`i-1`…`i-4`) and one canary (`i-5`), all on
/// `v1`, with `metrics` as the metrics source.
fn setup(metrics: FakeMetrics) -> CanarySetup {
    setup_fleet(FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]), metrics)
}

fn setup_fleet(fleet: FakeFleet, metrics: FakeMetrics) -> CanarySetup {
    let log = EventLog::new();
    let handle = PromotionHandle::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(log.clone()))
        .metrics(Arc::new(metrics))
        .promotion(handle.clone())
        .build()
        .expect("valid executor");
    CanarySetup {
        fleet,
        exec,
        log,
        handle,
        max_out: 1,
    }
}

/// Both tracks healthy: 0.1 % errors, 120 ms p99, stable serving requests
/// (so the monitoring check before the first stage passes).
fn healthy() -> FakeMetrics {
    FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, 0.001)
        .set("canary", Metric::LatencyP99, 0.12)
}

/// The default canary without the monitoring check before the first stage,
/// for tests of what the analysis does when metrics fail mid-run.
fn unchecked() -> Canary {
    let mut c = Canary::default();
    c.analysis.monitoring_check = false;
    c
}

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

impl CanarySetup {
    async fn deploy(&self, canary: &Canary) -> Report {
        self.exec
            .deploy(canary, &v("v2"))
            .await
            .expect("deployment starts")
    }

    fn events(&self) -> Vec<Event> {
        self.log.events()
    }

    fn dump(&self) -> String {
        self.events()
            .iter()
            .map(|e| format!("{:>9} {:?}", e.elapsed_ms, e.kind))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn checks(&self) -> Vec<(u64, usize, CheckOutcome)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::AnalysisResult { stage, result, .. } => Some((e.elapsed_ms, stage, result)),
                _ => None,
            })
            .collect()
    }

    /// When the named stage started (ms since the deployment started).
    fn stage_started(&self, name: &str) -> u64 {
        self.events()
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::StageStarted {
                    name: n,
                    rollback: false,
                    ..
                } if n == name => Some(e.elapsed_ms),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no stage {name:?}:\n{}", self.dump()))
    }

    fn rollback_started(&self) -> Option<(u64, String)> {
        self.events().iter().find_map(|e| match &e.kind {
            EventKind::RollbackStarted { reason, .. } => Some((e.elapsed_ms, reason.clone())),
            _ => None,
        })
    }

    /// The canary weights the load balancer was given, in order.
    fn canary_weights(&self) -> Vec<u8> {
        let canary = Group::new("canary").unwrap();
        self.fleet
            .routing_history()
            .into_iter()
            .filter_map(|r| match r.change {
                RoutingChange::Weights(w) => Some(w.get(&canary).copied().unwrap_or(0)),
                _ => None,
            })
            .collect()
    }

    fn final_weights(&self) -> BTreeMap<Group, u8> {
        self.fleet.load_balancer().weights().expect("weights were set")
    }

    fn assert_invariants(&self, report: &Report) {
        let inv = self.fleet.check(report, self.max_out);
        if !inv.is_ok() {
            eprintln!("events:\n{}", self.dump());
        }
        inv.assert_ok();
    }

    /// The fleet is back where it started: stable on v1 and serving, the
    /// canary stopped on v1, all traffic on stable.
    fn assert_rolled_back(&self, report: &Report) {
        assert_eq!(
            report.outcome,
            OutcomeKind::RolledBack,
            "{report}\n{}",
            self.dump()
        );
        for id in STABLE {
            assert_eq!(self.fleet.release_of(id), Some(v("v1")), "{id}");
            assert!(self.fleet.in_rotation(id), "{id} serves");
        }
        assert_eq!(self.fleet.release_of(CANARY), Some(v("v1")), "canary cleaned up");
        assert!(!self.fleet.is_running(CANARY), "canary stopped");
        assert!(!self.fleet.in_rotation(CANARY));
        let w = self.final_weights();
        assert_eq!(w[&Group::new("stable").unwrap()], 100);
        assert_eq!(w[&Group::new("canary").unwrap()], 0);
        let canary = report.instances.iter().find(|i| i.id.as_str() == CANARY).unwrap();
        assert_eq!(canary.status, InstanceStatus::Idle);
        assert_eq!(canary.release, Some(v("v1")));
        self.assert_invariants(report);
    }

    /// No operation touched a stable instance.
    fn assert_stable_untouched(&self) {
        let touched: Vec<_> = self
            .fleet
            .ops()
            .into_iter()
            .filter(|o| STABLE.contains(&o.instance.as_str()))
            .collect();
        assert!(touched.is_empty(), "stable touched: {touched:?}");
    }
}

fn fail_metric(o: &CheckOutcome) -> Option<(AnalysisMetric, usize)> {
    match o {
        CheckOutcome::Fail { metric, stage, .. } => Some((*metric, *stage)),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn good_canary_is_promoted_through_every_stage_and_finalized() {
    let s = setup(healthy());
    let report = s.deploy(&Canary::default()).await;
    assert!(report.is_success(), "{report}\n{}", s.dump());

    // Every stage's weight, in order, then all traffic back to stable.
    assert_eq!(s.canary_weights(), [0, 5, 25, 50, 75, 100, 0]);
    // Each stage held its full 300 s and was checked every 30 s.
    assert!(
        report.duration >= Duration::from_secs(5 * 300),
        "{:?}",
        report.duration
    );
    let checks = s.checks();
    assert_eq!(checks.len(), 5 * 10);
    assert!(checks.iter().all(|(_, _, o)| *o == CheckOutcome::Pass));
    // Progress per stage, ending at 100 %.
    let progress: Vec<(usize, u8, u64)> = s
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::StageProgress {
                stage,
                percent,
                elapsed_ms,
                ..
            } => Some((stage, percent, elapsed_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 50);
    assert_eq!(progress[0], (1, 10, 30_000));
    for stage in 1..=5 {
        assert!(
            progress.contains(&(stage, 100, 300_000)),
            "stage {stage}: {progress:?}"
        );
    }

    // Finalize: the stable release was backed up, stable moved to v2 and serves,
    // all traffic is on stable, the canary is stopped.
    let backup = s
        .events()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::ReleaseBackedUp { group, releases } => Some((group, releases)),
            _ => None,
        })
        .expect("stable release backed up");
    assert_eq!(backup.0.as_str(), "stable");
    assert_eq!(backup.1.len(), 4);
    assert!(backup.1.values().all(|r| r.as_ref() == Some(&v("v1"))));
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v2")), "{id}");
        assert!(s.fleet.in_rotation(id), "{id}");
    }
    let w = s.final_weights();
    assert_eq!(w[&Group::new("stable").unwrap()], 100);
    assert!(!s.fleet.is_running(CANARY));
    let canary = report.instances.iter().find(|i| i.id.as_str() == CANARY).unwrap();
    assert_eq!(canary.status, InstanceStatus::Idle);
    assert_eq!(canary.release, Some(v("v2")));
    assert_eq!(report.succeeded().len(), 4);
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn canary_is_healthy_before_any_traffic_and_stable_waits_for_the_finalize() {
    let s = setup(healthy());
    let report = s.deploy(&Canary::default()).await;
    assert!(report.is_success());
    let events = s.events();
    let healthy_at = events
        .iter()
        .position(|e| {
            matches!(&e.kind, EventKind::StepFinished { step, instance: Some(i), result: deploykit::StepResult::Ok, .. }
                if *step == deploykit::StepKind::AwaitHealthy && i.as_str() == CANARY)
        })
        .expect("canary health checked");
    let first_weight = events
        .iter()
        .position(|e| matches!(&e.kind, EventKind::AnalysisResult { .. }))
        .unwrap();
    assert!(healthy_at < first_weight);
    // The first split after isolation sends 5 %: nothing before the canary was healthy.
    let ops = s.fleet.ops();
    let canary_healthy = ops
        .iter()
        .find(|o| o.instance.as_str() == CANARY && o.op == Op::Health && o.ok)
        .unwrap()
        .at;
    let first_traffic = s
        .fleet
        .routing_history()
        .into_iter()
        .find(|r| matches!(&r.change, RoutingChange::Weights(w) if w.get(&Group::new("canary").unwrap()).copied().unwrap_or(0) > 0))
        .unwrap()
        .at;
    assert!(canary_healthy <= first_traffic);
    // Stable was not touched until every stage had passed.
    let first_stable_op = ops
        .iter()
        .filter(|o| STABLE.contains(&o.instance.as_str()))
        .map(|o| o.at)
        .min()
        .unwrap();
    assert!(
        first_stable_op >= Duration::from_secs(1500),
        "{first_stable_op:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn error_breach_at_stage_two_rolls_back_within_one_check_interval() {
    // Bad once stage 2 is under way (stage 1's last check is at 300 s).
    let metrics = healthy().script("canary", Metric::ErrorRate, |t| {
        Observation::Value(if t <= Duration::from_secs(300) {
            0.001
        } else {
            0.05
        })
    });
    let s = setup(metrics);
    let report = s.deploy(&Canary::default()).await;
    s.assert_rolled_back(&report);
    s.assert_stable_untouched();

    let stage2 = s.stage_started("canary 25% (2/5)");
    let (rollback_at, reason) = s.rollback_started().unwrap();
    assert!(
        rollback_at - stage2 <= 30_000,
        "decided {} ms into stage 2",
        rollback_at - stage2
    );
    assert!(
        reason.contains("canary error rate 5.000 % > threshold 1.000 % at stage 2"),
        "{reason}"
    );
    let (_, stage, last) = s.checks().pop().unwrap();
    assert_eq!(stage, 2);
    assert_eq!(
        last,
        CheckOutcome::Fail {
            metric: AnalysisMetric::ErrorRate,
            value: 0.05,
            threshold: 0.01,
            stage: 2
        }
    );
    // Never went beyond 25 %.
    assert_eq!(s.canary_weights(), [0, 5, 25, 0]);
}

#[tokio::test(start_paused = true)]
async fn latency_breach_rolls_back() {
    let s = setup(healthy().set("canary", Metric::LatencyP99, 0.8));
    let report = s.deploy(&Canary::default()).await;
    s.assert_rolled_back(&report);
    let checks = s.checks();
    assert_eq!(checks.len(), 1, "the first check fails");
    assert_eq!(fail_metric(&checks[0].2), Some((AnalysisMetric::LatencyP99, 1)));
    assert!(report.reason.unwrap().contains("800 ms > threshold 500 ms"));
}

#[tokio::test(start_paused = true)]
async fn canary_erring_more_than_twice_stable_rolls_back() {
    // Stable 0.4 %, canary 0.9 %: under the 1 % threshold, over 2 x stable.
    let metrics = healthy()
        .set("stable", Metric::ErrorRate, 0.004)
        .set("canary", Metric::ErrorRate, 0.009);
    let s = setup(metrics);
    let report = s.deploy(&Canary::default()).await;
    s.assert_rolled_back(&report);
    let checks = s.checks();
    assert_eq!(
        fail_metric(&checks[0].2),
        Some((AnalysisMetric::ErrorRateVsStable, 1))
    );

    // The same canary beside a stable at 0.5 % passes.
    let ok = setup(
        healthy()
            .set("stable", Metric::ErrorRate, 0.005)
            .set("canary", Metric::ErrorRate, 0.009),
    );
    let report = ok.deploy(&Canary::default()).await;
    assert!(report.is_success(), "{report}");
}

#[tokio::test(start_paused = true)]
async fn provider_down_rolls_back_after_the_consecutive_limit() {
    let down = |m| Observation::ProviderError(format!("{m:?}: connection refused"));
    let metrics = FakeMetrics::new()
        .always("stable", Metric::ErrorRate, down(Metric::ErrorRate))
        .always("canary", Metric::ErrorRate, down(Metric::ErrorRate))
        .always("canary", Metric::LatencyP99, down(Metric::LatencyP99));
    let s = setup(metrics);
    // Past the monitoring check, to see what the analysis does mid-run.
    let report = s.deploy(&unchecked()).await;
    s.assert_rolled_back(&report);
    let checks = s.checks();
    assert_eq!(checks.len(), 4, "{}", s.dump());
    assert!(checks
        .iter()
        .all(|(_, _, o)| matches!(o, CheckOutcome::ProviderError { .. })));
    let counts: Vec<u32> = s
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::AnalysisResult {
                consecutive_inconclusive,
                ..
            } => Some(consecutive_inconclusive),
            _ => None,
        })
        .collect();
    assert_eq!(counts, [1, 2, 3, 4]);
    assert!(report.reason.unwrap().contains("4 time(s) in a row"));
}

#[tokio::test(start_paused = true)]
async fn provider_outage_mid_rollout_counts_across_stages() {
    // Healthy until 590 s, then the provider goes away: the 4th
    // inconclusive check in a row comes at 690 s, in stage 3.
    let flaky = |t: Duration| {
        if t < Duration::from_secs(590) {
            Observation::Value(0.001)
        } else {
            Observation::ProviderError("503 Service Unavailable".into())
        }
    };
    let metrics =
        healthy()
            .script("canary", Metric::ErrorRate, flaky)
            .script("stable", Metric::ErrorRate, flaky);
    let s = setup(metrics);
    let report = s.deploy(&Canary::default()).await;
    s.assert_rolled_back(&report);
    let (at, _) = s.rollback_started().unwrap();
    assert_eq!(at, 690_000, "{}", s.dump());
    let stages: Vec<usize> = s
        .checks()
        .iter()
        .filter(|(_, _, o)| o.is_inconclusive())
        .map(|(_, st, _)| *st)
        .collect();
    assert_eq!(stages, [2, 3, 3, 3]);
}

#[tokio::test(start_paused = true)]
async fn empty_and_nan_results_are_no_data_never_a_pass() {
    // Canary p99 NaN (no traffic in a histogram), canary error rate
    // unscripted (an empty result).
    let metrics = FakeMetrics::new().set("stable", Metric::ErrorRate, 0.001).set(
        "canary",
        Metric::LatencyP99,
        f64::NAN,
    );
    let s = setup(metrics);
    // Past the monitoring check, to see what the analysis does mid-run.
    let report = s.deploy(&unchecked()).await;
    s.assert_rolled_back(&report);
    let checks = s.checks();
    assert_eq!(checks.len(), 4);
    for (_, _, o) in &checks {
        assert!(matches!(o, CheckOutcome::NoData { .. }), "{o:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_stage_with_only_inconclusive_checks_does_not_pass() {
    // A generous limit never trips in a 60 s stage of 2 checks, but a stage
    // without a single passing check still fails.
    let mut canary = Canary {
        stages: vec![50, 100],
        stage_duration: Duration::from_secs(60),
        ..Canary::default()
    };
    canary.analysis.inconclusive_limit = 10;
    let s = setup(healthy().always("canary", Metric::LatencyP99, Observation::NoData));
    let report = s.deploy(&canary).await;
    s.assert_rolled_back(&report);
    assert_eq!(s.checks().len(), 2);
    assert!(report.reason.unwrap().contains("no check passed during stage 1"));
}

#[tokio::test(start_paused = true)]
async fn minimum_request_count_gates_passing_checks() {
    let mut canary = Canary::default();
    canary.analysis.min_requests = 100;
    // Too few requests reach the canary: inconclusive, so rolled back.
    let s = setup(healthy().set("canary", Metric::RequestCount, 12.0));
    let report = s.deploy(&canary).await;
    s.assert_rolled_back(&report);
    assert!(report.reason.unwrap().contains("fewer than the minimum of 100"));
    // Enough: promoted.
    let s = setup(healthy().set("canary", Metric::RequestCount, 5000.0));
    assert!(s.deploy(&canary).await.is_success());
}

fn manual(timeout: Option<Duration>) -> Canary {
    Canary {
        stages: vec![10, 50, 100],
        promotion: Promotion::Manual { timeout },
        ..Canary::default()
    }
}

#[tokio::test(start_paused = true)]
async fn manual_promotion_waits_for_the_handle_and_keeps_analysing() {
    let s = setup(healthy());
    let handle = s.handle.clone();
    let operator = tokio::spawn(async move {
        let mut promoted = Vec::new();
        for _ in 0..2 {
            let stage = handle.wait_for_pause().await;
            // The operator takes almost 10 minutes to decide.
            tokio::time::sleep(Duration::from_secs(590)).await;
            assert!(handle.promote());
            promoted.push(stage);
            tokio::task::yield_now().await;
        }
        promoted
    });
    let report = s.deploy(&manual(None)).await;
    assert!(report.is_success(), "{report}\n{}", s.dump());
    assert_eq!(operator.await.unwrap(), [1, 2]);
    let events = s.events();
    let awaiting: Vec<usize> = events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::AwaitingPromotion { stage, .. } => Some(stage),
            _ => None,
        })
        .collect();
    assert_eq!(awaiting, [1, 2], "no pause after the last stage");
    // Stage 2 starts only at the promotion, 590 s after stage 1 ended.
    let stage2 = s.stage_started("canary 50% (2/3)");
    assert_eq!(stage2, 300_000 + 590_000);
    // The analysis ran while paused: checks in stage 1 beyond its 10.
    let stage1_checks = s.checks().iter().filter(|(_, st, _)| *st == 1).count();
    assert_eq!(stage1_checks, 10 + 19, "{}", s.dump());
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn abort_during_the_pause_rolls_back() {
    let s = setup(healthy());
    let handle = s.handle.clone();
    tokio::spawn(async move {
        handle.wait_for_pause().await;
        tokio::time::sleep(Duration::from_secs(45)).await;
        handle.abort();
    });
    let report = s.deploy(&manual(None)).await;
    s.assert_rolled_back(&report);
    s.assert_stable_untouched();
    let (at, reason) = s.rollback_started().unwrap();
    assert_eq!(at, 345_000);
    assert_eq!(reason, "cancelled by the operator");
    assert_eq!(s.canary_weights(), [0, 10, 0]);
}

#[tokio::test(start_paused = true)]
async fn promotion_timeout_rolls_back() {
    let s = setup(healthy());
    let report = s.deploy(&manual(Some(Duration::from_secs(120)))).await;
    s.assert_rolled_back(&report);
    let (at, reason) = s.rollback_started().unwrap();
    assert_eq!(at, 300_000 + 120_000);
    assert!(
        reason.contains("no promotion of stage 1 (10%) within 120.0s"),
        "{reason}"
    );
}

#[tokio::test(start_paused = true)]
async fn breach_while_paused_rolls_back() {
    let metrics = healthy().script("canary", Metric::ErrorRate, |t| {
        Observation::Value(if t < Duration::from_secs(400) { 0.001 } else { 0.2 })
    });
    let s = setup(metrics);
    let report = s.deploy(&manual(None)).await;
    s.assert_rolled_back(&report);
    let (at, _) = s.rollback_started().unwrap();
    assert_eq!(at, 420_000, "the first check at or after 400 s");
    let (_, _, last) = s.checks().pop().unwrap();
    assert_eq!(fail_metric(&last), Some((AnalysisMetric::ErrorRate, 1)));
}

#[tokio::test(start_paused = true)]
async fn cancellation_mid_stage_rolls_back() {
    let s = setup(healthy());
    let token = s.exec.cancel_token();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(700)).await;
        token.cancel();
    });
    let report = s.deploy(&Canary::default()).await;
    s.assert_rolled_back(&report);
    assert_eq!(s.rollback_started().unwrap().0, 700_000);
}

#[tokio::test(start_paused = true)]
async fn a_canary_that_never_gets_healthy_gets_no_traffic() {
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]).fail_health(CANARY);
    let s = setup_fleet(fleet, healthy());
    let report = s.deploy(&Canary::default()).await;
    s.assert_rolled_back(&report);
    s.assert_stable_untouched();
    assert_eq!(s.canary_weights(), [0, 0]);
    assert!(s.checks().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failure_while_finalizing_rolls_everything_back() {
    // The new release never gets healthy on stable i-2: the canary was fine,
    // but the finalize cannot complete, so the whole fleet returns to v1.
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]).fail_health("i-2");
    let mut s = setup_fleet(fleet, healthy());
    // The rollback restores i-1 and i-2 and retires the canary at once.
    s.max_out = 3;
    let report = s.deploy(&Canary::default()).await;
    s.assert_rolled_back(&report);
    assert!(
        s.fleet.calls("i-1", Op::Install) >= 1,
        "i-1 was moved, then restored"
    );
    assert_eq!(
        s.fleet.calls("i-3", Op::Install),
        0,
        "the finalize stopped at i-2"
    );
}

#[tokio::test(start_paused = true)]
async fn missing_metrics_or_promotion_handle_is_bad_input_before_anything_runs() {
    let fleet = FakeFleet::with_groups(&[("stable", 2), ("canary", 1)]);
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .build()
        .unwrap();
    let e = exec.deploy(&Canary::default(), &v("v2")).await.unwrap_err();
    assert!(e.is_invalid_input());
    assert!(e.to_string().contains("invalid metrics"), "{e}");
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(healthy()))
        .build()
        .unwrap();
    let e = exec.deploy(&manual(None), &v("v2")).await.unwrap_err();
    assert!(e.to_string().contains("invalid promotion"), "{e}");
    assert!(fleet.ops().is_empty());
    assert!(fleet.routing_history().is_empty());
    // Bad stages are refused before anything too.
    let bad = Canary {
        stages: vec![5, 50, 25],
        ..Canary::default()
    };
    let e = exec.deploy(&bad, &v("v2")).await.unwrap_err();
    assert!(e.to_string().contains("stages[2]"), "{e}");
}

/// A journal that, as the etcd one, keeps records queued until
/// `durable` commits them.
#[derive(Default)]
struct BatchingJournal {
    queued: std::sync::Mutex<Vec<Event>>,
    committed: std::sync::Mutex<Vec<Event>>,
}

#[async_trait::async_trait]
impl deploykit::EventSink for BatchingJournal {
    fn emit(&self, event: &Event) {
        self.queued.lock().unwrap().push(event.clone());
    }

    async fn durable(&self) -> deploykit::Result<()> {
        let batch = std::mem::take(&mut *self.queued.lock().unwrap());
        self.committed.lock().unwrap().extend(batch);
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_wait_for_promotion_is_durable_while_it_lasts_so_another_process_can_promote() {
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]);
    let journal = Arc::new(BatchingJournal::default());
    let handle = PromotionHandle::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(journal.clone())
        .metrics(Arc::new(healthy()))
        .promotion(handle.clone())
        .build()
        .expect("valid executor");
    let seen =
        {
            let (journal, handle) = (journal.clone(), handle.clone());
            tokio::spawn(async move {
                let stage = handle.wait_for_pause().await;
                // Well into the pause: only what was committed is visible to a
                // `promote` reading the journal from elsewhere.
                tokio::time::sleep(Duration::from_secs(60)).await;
                let durable =
                    journal.committed.lock().unwrap().iter().any(
                        |e| matches!(e.kind, EventKind::AwaitingPromotion { stage: s, .. } if s == stage),
                    );
                assert!(handle.promote());
                durable
            })
        };
    let canary = Canary {
        stages: vec![50, 100],
        promotion: Promotion::Manual { timeout: None },
        ..Canary::default()
    };
    let report = exec.deploy(&canary, &v("v2")).await.unwrap();
    assert!(report.is_success(), "{report}");
    assert!(
        seen.await.unwrap(),
        "the announcement of the wait was still queued during the wait"
    );
}
