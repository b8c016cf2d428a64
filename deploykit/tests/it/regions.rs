//! Multi-region runs on fake fleets, in virtual time: waves, parallelism,
//! soak gates and what each `on_failure` returns.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deploykit::regions::{
    self, ExecutorRegions, OnFailure, RegionEvent, RegionEventKind, RegionEventLog, RegionEvents, RegionName,
    RegionState, RegionsOutcome, RegionsPlan, RegionsReport, Rollout,
};
use deploykit::{Canary, Executor, Metric, ReleaseId, Rolling, Strategy};
use deploykit_testkit::{FakeFleet, FakeMetrics, Fault, Op};
use tokio_util::sync::CancellationToken;

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

fn name(s: &str) -> RegionName {
    RegionName::new(s).unwrap()
}

/// What a region is made of in these tests.
enum Kind {
    /// Three instances, deployed one at a time.
    Rolling(FakeFleet),
    /// Two stable instances and one canary, judged on `metrics`.
    Canary(FakeFleet, FakeMetrics),
}

struct World {
    regions: ExecutorRegions,
    fleets: BTreeMap<String, FakeFleet>,
    canaries: Vec<String>,
}

fn world(regions: Vec<(&str, Kind)>) -> World {
    let mut r = ExecutorRegions::new();
    let mut fleets = BTreeMap::new();
    let mut canaries = Vec::new();
    for (n, kind) in regions {
        let (fleet, exec) = match kind {
            Kind::Rolling(fleet) => {
                let exec = Executor::builder()
                    .instances(fleet.instances())
                    .load_balancer(Arc::new(fleet.load_balancer()))
                    .build()
                    .unwrap();
                (fleet, exec)
            }
            Kind::Canary(fleet, metrics) => {
                canaries.push(n.to_string());
                let exec = Executor::builder()
                    .instances(fleet.instances())
                    .load_balancer(Arc::new(fleet.load_balancer()))
                    .metrics(Arc::new(metrics))
                    .promotion(deploykit::PromotionHandle::new())
                    .build()
                    .unwrap();
                (fleet, exec)
            }
        };
        r = r.with(name(n), exec);
        fleets.insert(n.to_string(), fleet);
    }
    World {
        regions: r,
        fleets,
        canaries,
    }
}

fn rolling() -> Kind {
    Kind::Rolling(FakeFleet::new(3))
}

fn canary_metrics(canary_error_rate: f64) -> FakeMetrics {
    FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, canary_error_rate)
        .set("canary", Metric::LatencyP99, 0.12)
}

fn canary(canary_error_rate: f64) -> Kind {
    Kind::Canary(
        FakeFleet::with_groups(&[("stable", 2), ("canary", 1)]),
        canary_metrics(canary_error_rate),
    )
}

fn short_canary() -> Canary {
    Canary {
        stages: vec![50, 100],
        stage_duration: Duration::from_secs(60),
        check_interval: Duration::from_secs(10),
        ..Canary::default()
    }
}

impl World {
    async fn plan(&self, rollout: &Rollout, only: Option<&[RegionName]>) -> RegionsPlan {
        let canaries = self.canaries.clone();
        self.regions
            .plan(rollout, &v("v2"), only, move |r| -> Box<dyn Strategy> {
                if canaries.iter().any(|c| c == r.as_str()) {
                    Box::new(short_canary())
                } else {
                    Box::new(Rolling::default())
                }
            })
            .await
            .expect("plan")
    }

    async fn run(&self, rollout: &Rollout) -> (RegionsReport, Vec<RegionEvent>) {
        let plan = self.plan(rollout, None).await;
        let log = RegionEventLog::new();
        let report = regions::run(&plan, &self.regions, &log, CancellationToken::new()).await;
        (report, log.events())
    }

    /// The releases of a region's instances, one word each.
    fn releases(&self, region: &str) -> Vec<String> {
        self.fleets[region]
            .releases()
            .values()
            .map(|r| r.to_string())
            .collect()
    }

    fn all_on(&self, region: &str, release: &str) -> bool {
        self.releases(region).iter().all(|r| r == release)
    }

    /// Whether no instance of `region` was ever installed, stopped or
    /// drained: the region was never touched.
    fn untouched(&self, region: &str) -> bool {
        let f = &self.fleets[region];
        f.releases().keys().all(|id| {
            [Op::Install, Op::Stop, Op::Drain, Op::Disable]
                .iter()
                .all(|op| f.calls(id.as_str(), *op) == 0)
        })
    }
}

fn state(report: &RegionsReport, region: &str) -> RegionState {
    report.region(region).expect("region in the report").state
}

/// Names of the regions events of `kind` mention, in order.
fn regions_of(events: &[RegionEvent], kind: fn(&RegionEventKind) -> bool) -> Vec<String> {
    events
        .iter()
        .filter(|e| kind(&e.kind))
        .filter_map(|e| e.region.as_ref().map(|r| r.to_string()))
        .collect()
}

fn three_waves(on_failure: OnFailure) -> Rollout {
    Rollout {
        waves: vec![vec!["r-1".into()], vec!["r-2".into()], vec!["r-3".into()]],
        on_failure,
        ..Rollout::default()
    }
}

#[tokio::test(start_paused = true)]
async fn waves_run_in_order_one_region_at_a_time_by_default() {
    let w = world(vec![
        ("canary", rolling()),
        ("eu-1", rolling()),
        ("eu-2", rolling()),
        ("us-1", rolling()),
    ]);
    let rollout = Rollout {
        waves: vec![vec!["canary".into()], vec!["eu-*".into()], vec!["us-*".into()]],
        ..Rollout::default()
    };
    let (report, events) = w.run(&rollout).await;
    assert_eq!(report.outcome, RegionsOutcome::Succeeded, "{report}");
    for r in ["canary", "eu-1", "eu-2", "us-1"] {
        assert!(w.all_on(r, "v2"), "{r}: {:?}", w.releases(r));
        assert_eq!(state(&report, r), RegionState::Deployed);
    }
    // With max_parallel = 1 each region deploys before the next starts.
    let order: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.kind {
            RegionEventKind::RegionStarted => Some(format!("start {}", e.region.as_ref().unwrap())),
            RegionEventKind::RegionDeployed => Some(format!("done {}", e.region.as_ref().unwrap())),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [
            "start canary",
            "done canary",
            "start eu-1",
            "done eu-1",
            "start eu-2",
            "done eu-2",
            "start us-1",
            "done us-1"
        ]
    );
    assert_eq!(report.region("eu-2").unwrap().wave, 2);
}

#[tokio::test(start_paused = true)]
async fn max_parallel_deploys_regions_of_a_wave_together_but_never_two_waves() {
    let w = world(vec![
        ("eu-1", rolling()),
        ("eu-2", rolling()),
        ("eu-3", rolling()),
        ("us-1", rolling()),
    ]);
    let rollout = Rollout {
        waves: vec![vec!["eu-*".into()], vec!["us-1".into()]],
        max_parallel: 2,
        ..Rollout::default()
    };
    let (report, events) = w.run(&rollout).await;
    assert_eq!(report.outcome, RegionsOutcome::Succeeded, "{report}");
    let pos = |kind: &str, r: &str| {
        events
            .iter()
            .position(|e| {
                e.region.as_ref().is_some_and(|x| x.as_str() == r)
                    && matches!(
                        (&e.kind, kind),
                        (RegionEventKind::RegionStarted, "start") | (RegionEventKind::RegionDeployed, "done")
                    )
            })
            .unwrap_or_else(|| panic!("no {kind} event of {r}"))
    };
    // eu-1 and eu-2 overlap; eu-3 waits for a free slot; us-1 waits for the
    // whole first wave.
    assert!(pos("start", "eu-2") < pos("done", "eu-1"));
    assert!(pos("start", "eu-3") > pos("done", "eu-1").min(pos("done", "eu-2")));
    let wave_1_done = pos("done", "eu-1")
        .max(pos("done", "eu-2"))
        .max(pos("done", "eu-3"));
    assert!(pos("start", "us-1") > wave_1_done);
}

#[tokio::test(start_paused = true)]
async fn a_bad_canary_in_region_2_rolls_back_region_2_and_never_touches_region_3() {
    let w = world(vec![
        ("r-1", canary(0.001)),
        ("r-2", canary(0.25)),
        ("r-3", canary(0.001)),
    ]);
    let (report, events) = w.run(&three_waves(OnFailure::RollbackRegion)).await;
    assert_eq!(report.outcome, RegionsOutcome::Failed, "{report}");
    assert!(w.all_on("r-1", "v2"), "{:?}", w.releases("r-1"));
    assert!(w.all_on("r-2", "v1"), "{:?}", w.releases("r-2"));
    assert!(w.all_on("r-3", "v1") && w.untouched("r-3"));
    assert_eq!(state(&report, "r-1"), RegionState::Deployed);
    // The canary's own analysis rolled it back: nothing left to return.
    assert_eq!(state(&report, "r-2"), RegionState::Failed);
    assert_eq!(state(&report, "r-3"), RegionState::NotStarted);
    let reason = report.reason.clone().unwrap();
    assert!(reason.contains("region r-2 failed"), "{reason}");
    assert!(regions_of(&events, |k| matches!(k, RegionEventKind::RegionStarted)) == ["r-1", "r-2"]);
}

#[tokio::test(start_paused = true)]
async fn rollback_all_returns_every_region_this_run_deployed() {
    let w = world(vec![
        ("r-1", rolling()),
        ("r-2", canary(0.25)),
        ("r-3", rolling()),
    ]);
    let (report, events) = w.run(&three_waves(OnFailure::RollbackAll)).await;
    assert_eq!(report.outcome, RegionsOutcome::Failed, "{report}");
    assert!(w.all_on("r-1", "v1"), "{:?}", w.releases("r-1"));
    assert!(w.all_on("r-2", "v1"));
    assert!(w.untouched("r-3"));
    assert_eq!(state(&report, "r-1"), RegionState::RolledBack);
    assert!(report
        .region("r-1")
        .unwrap()
        .rollback
        .as_ref()
        .unwrap()
        .is_success());
    assert_eq!(
        regions_of(&events, |k| matches!(k, RegionEventKind::RollbackStarted)),
        ["r-1"],
        "r-2 rolled itself back; only r-1 needs returning"
    );
}

#[tokio::test(start_paused = true)]
async fn stop_leaves_earlier_regions_on_the_new_release() {
    let w = world(vec![
        ("r-1", rolling()),
        ("r-2", canary(0.25)),
        ("r-3", rolling()),
    ]);
    let (report, events) = w.run(&three_waves(OnFailure::Stop)).await;
    assert_eq!(report.outcome, RegionsOutcome::Failed);
    assert!(w.all_on("r-1", "v2"));
    assert!(w.all_on("r-2", "v1"));
    assert!(w.untouched("r-3"));
    assert!(!events
        .iter()
        .any(|e| matches!(e.kind, RegionEventKind::RollbackStarted)));
}

/// Makes one region's new release unhealthy once its wave's soak starts:
/// it passed its own run, and breaks a little later.
struct BreakOnSoak {
    log: RegionEventLog,
    fleet: FakeFleet,
    wave: usize,
}

impl RegionEvents for BreakOnSoak {
    fn emit(&self, e: &RegionEvent) {
        if e.wave == self.wave && matches!(e.kind, RegionEventKind::SoakStarted { .. }) {
            let _ = self
                .fleet
                .clone()
                .fault("i-2", Op::Health, Fault::OnRelease(v("v2")));
        }
        self.log.emit(e);
    }
}

#[tokio::test(start_paused = true)]
async fn a_region_unhealthy_during_the_soak_fails_its_gate_and_is_returned() {
    let w = world(vec![("r-1", rolling()), ("r-2", rolling()), ("r-3", rolling())]);
    let rollout = Rollout {
        soak: Duration::from_secs(120),
        soak_interval: Duration::from_secs(10),
        ..three_waves(OnFailure::RollbackRegion)
    };
    let plan = w.plan(&rollout, None).await;
    let sink = BreakOnSoak {
        log: RegionEventLog::new(),
        fleet: w.fleets["r-2"].clone(),
        wave: 2,
    };
    let started = tokio::time::Instant::now();
    let report = regions::run(&plan, &w.regions, &sink, CancellationToken::new()).await;
    assert_eq!(report.outcome, RegionsOutcome::Failed, "{report}");
    assert_eq!(state(&report, "r-1"), RegionState::Deployed);
    assert_eq!(state(&report, "r-2"), RegionState::RolledBack);
    assert!(w.all_on("r-1", "v2"));
    assert!(w.all_on("r-2", "v1"), "{:?}", w.releases("r-2"));
    assert!(w.untouched("r-3"));
    let reason = report.reason.clone().unwrap();
    assert!(
        reason.contains("r-2 was unhealthy during the soak") && reason.contains("i-2"),
        "{reason}"
    );
    let events = sink.log.events();
    assert!(events
        .iter()
        .any(|e| e.wave == 1 && e.kind == RegionEventKind::WaveHeld));
    assert!(!events
        .iter()
        .any(|e| e.wave == 2 && e.kind == RegionEventKind::WaveHeld));
    // Wave 1 soaked in full; wave 2 broke at its first probe.
    assert!(started.elapsed() >= Duration::from_secs(130));
}

#[tokio::test(start_paused = true)]
async fn rollback_wave_cancels_the_regions_still_running_and_returns_the_wave() {
    // eu-2 fails its first install at once; eu-1 is slow, still running.
    let slow = FakeFleet::new(3).latency(Op::Install, Duration::from_secs(30));
    let bad = FakeFleet::new(3).fail_install("i-1");
    let w = world(vec![
        ("canary", rolling()),
        ("eu-1", Kind::Rolling(slow)),
        ("eu-2", Kind::Rolling(bad)),
        ("us-1", rolling()),
    ]);
    let rollout = Rollout {
        waves: vec![vec!["canary".into()], vec!["eu-*".into()], vec!["us-*".into()]],
        max_parallel: 2,
        on_failure: OnFailure::RollbackWave,
        ..Rollout::default()
    };
    let (report, _) = w.run(&rollout).await;
    assert_eq!(report.outcome, RegionsOutcome::Failed, "{report}");
    assert_eq!(state(&report, "canary"), RegionState::Deployed);
    assert_eq!(state(&report, "eu-1"), RegionState::Cancelled);
    // Its run finished degraded (one instance failed and was restored, the
    // others updated): not a success, and the wave's rollback returned it.
    let eu2 = report.region("eu-2").unwrap();
    assert_eq!(
        eu2.deployment.as_ref().unwrap().outcome,
        deploykit::OutcomeKind::Degraded
    );
    assert_eq!(eu2.state, RegionState::RolledBack);
    assert!(w.all_on("canary", "v2"));
    assert!(w.all_on("eu-1", "v1"), "{:?}", w.releases("eu-1"));
    assert!(w.all_on("eu-2", "v1"), "{:?}", w.releases("eu-2"));
    assert!(w.untouched("us-1"));
}

#[tokio::test(start_paused = true)]
async fn a_region_that_cannot_start_fails_even_though_its_fleet_is_healthy() {
    // Every instance of r-2 is healthy on v1 and its load balancer refuses
    // the run: success is judged from this run's reports, not the fleet.
    let refusing = FakeFleet::new(3).fail_preflight(Fault::Always);
    let w = world(vec![
        ("r-1", rolling()),
        ("r-2", Kind::Rolling(refusing)),
        ("r-3", rolling()),
    ]);
    let (report, _) = w.run(&three_waves(OnFailure::Stop)).await;
    assert_eq!(report.outcome, RegionsOutcome::Failed, "{report}");
    assert_eq!(state(&report, "r-2"), RegionState::Failed);
    assert!(report.region("r-2").unwrap().deployment.is_none());
    assert!(w.untouched("r-2") && w.untouched("r-3"));
}

#[tokio::test(start_paused = true)]
async fn a_subset_deploys_only_the_regions_named() {
    let w = world(vec![("r-1", rolling()), ("r-2", rolling()), ("r-3", rolling())]);
    let only = [name("r-3"), name("r-1")];
    let plan = w.plan(&three_waves(OnFailure::Stop), Some(&only)).await;
    let names: Vec<&str> = plan.regions().map(|r| r.region.as_str()).collect();
    assert_eq!(names, ["r-1", "r-3"], "the rollout's order, not the subset's");
    let report = regions::run(&plan, &w.regions, &(), CancellationToken::new()).await;
    assert_eq!(report.outcome, RegionsOutcome::Succeeded);
    assert!(w.all_on("r-1", "v2") && w.all_on("r-3", "v2"));
    assert!(w.untouched("r-2"));
}

#[tokio::test(start_paused = true)]
async fn the_plan_is_a_value_holding_each_regions_own_strategy_plan() {
    let w = world(vec![("r-1", rolling()), ("r-2", canary(0.001))]);
    let rollout = Rollout {
        soak: Duration::from_secs(300),
        ..Rollout::default()
    };
    let plan = w.plan(&rollout, None).await;
    assert_eq!(plan.waves.len(), 2);
    let exec = w.regions.executor(&name("r-2")).unwrap();
    let own = short_canary()
        .plan(&exec.snapshot().await.unwrap(), &v("v2"))
        .unwrap();
    assert_eq!(plan.waves[1][0].plan, own);
    // Every region's plan plus a soak per wave.
    let p = plan.projected_duration();
    let sum = plan
        .regions()
        .map(|r| r.plan.projected_duration().min)
        .sum::<Duration>();
    assert_eq!(p.min, sum + Duration::from_secs(600));
    let text = plan.to_string();
    assert!(text.contains("wave 2: r-2") && text.contains("soak 5m"), "{text}");
    // A dry run touches nothing.
    assert!(w.untouched("r-1") && w.untouched("r-2"));
}

#[tokio::test(start_paused = true)]
async fn cancelling_stops_the_rollout_and_applies_on_failure() {
    let w = world(vec![
        ("r-1", rolling()),
        (
            "r-2",
            Kind::Rolling(FakeFleet::new(3).latency(Op::Install, Duration::from_secs(60))),
        ),
        ("r-3", rolling()),
    ]);
    let plan = w.plan(&three_waves(OnFailure::RollbackAll), None).await;
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let log = RegionEventLog::new();
    let watcher = log.clone();
    tokio::spawn(async move {
        // Cancel once r-2 is under way.
        loop {
            if watcher
                .events()
                .iter()
                .any(|e| e.region.as_ref().is_some_and(|r| r.as_str() == "r-2"))
            {
                tokio::time::sleep(Duration::from_secs(5)).await;
                c.cancel();
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let report = regions::run(&plan, &w.regions, &log, cancel).await;
    assert_eq!(report.outcome, RegionsOutcome::Failed, "{report}");
    assert!(w.all_on("r-1", "v1") && w.all_on("r-2", "v1"));
    assert!(w.untouched("r-3"));
}
