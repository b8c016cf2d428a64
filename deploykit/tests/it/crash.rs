//! The library crash matrix: a deployment of each strategy on the testkit's
//! fakes, journalled as the CLI journals it, is killed right after each
//! journal record in turn; `deploykit::recovery` then resumes it or rolls
//! it back, and the fleet must end on one release with traffic consistent
//! and the invariant checker satisfied.
//!
//! The kill is a panic raised by the journal sink right after the record
//! is written and unwound out of the executor: nothing the executor would
//! have done after that record happens, and every driver call in flight is
//! dropped, as when the process dies. The fakes keep what was done.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use deploykit::bluegreen_state::{reconcile, Reconciled};
use deploykit::recovery::{self, Recorded, Strategies};
use deploykit::routing::{Capabilities, Capability, Match, Rule, ValueMatch};
use deploykit::state::{Journal, JournalHeader, JournalOutcome, RunKind, StateDir};
use deploykit::strategy::Treatment;
use deploykit::{
    BlueGreen, Canary, CountOrPercent, DarkLaunch, Event, EventSink, Executor, Experiment, FleetSnapshot,
    Group, InstanceId, KeepOld, Metric, OutcomeKind, Plan, PromotionHandle, Ramped, ReleaseId, Report,
    Rolling, RunOptions, Shadow, ShadowThen, StrategyKind,
};
use deploykit_testkit::{
    FakeFleet, FakeLiveStore, FakeMetrics, FakeSmokeTester, RoutingChange, RoutingEntry,
};
use futures::FutureExt as _;
use proptest::prelude::*;

/// The panic payload of a simulated kill.
struct Killed;

/// The journal, killing the "process" right after its `after`-th record.
struct Killing {
    journal: Arc<Journal>,
    after: u64,
}

#[async_trait::async_trait]
impl EventSink for Killing {
    fn emit(&self, e: &Event) {
        self.journal.emit(e);
        if self.journal.records() >= self.after {
            // The record is queued: on disk first, then the "kill".
            self.journal.sync().expect("journal written");
            // resume_unwind skips the panic hook: a kill is expected here.
            std::panic::resume_unwind(Box::new(Killed));
        }
    }

    async fn durable(&self) -> deploykit::Result<()> {
        self.journal.durable().await
    }
}

/// What a recovery run did.
struct Recovery {
    /// Its report, unless it was killed or had nothing to do.
    report: Option<Report>,
    /// Its plan, if it had one.
    plan: Option<Plan>,
    /// Whether it was killed part-way.
    killed: bool,
}

/// How the interrupted deployment is recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    Resume,
    Rollback,
}

/// One application: its fleet, fakes, state directory and strategies.
pub(crate) struct World {
    kind: StrategyKind,
    pub(crate) fleet: FakeFleet,
    pub(crate) store: FakeLiveStore,
    pub(crate) metrics: FakeMetrics,
    pub(crate) state: StateDir,
    pub(crate) strategies: Strategies,
    /// An experiment with two treatments (canary-b on v2, canary-c on v3,
    /// the winner) instead of one canary.
    treatments: bool,
    _dir: tempfile::TempDir,
}

pub(crate) fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

pub(crate) fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

impl World {
    /// `n` instances (per environment for blue-green; stable instances and
    /// one canary for canary), all on v1; rolling batches of `batch`.
    pub(crate) fn new(kind: StrategyKind, n: usize, batch: usize) -> Self {
        let fleet = match kind {
            StrategyKind::BlueGreen => FakeFleet::with_groups(&[("blue", n), ("green", n)]).live("blue"),
            StrategyKind::Canary => FakeFleet::with_groups(&[("stable", n), ("canary", 1)]),
            k if routed(k) => FakeFleet::with_groups(&[("stable", n), ("canary", 1)])
                .routing_capabilities(Capabilities::of(Capability::ALL)),
            _ => FakeFleet::new(n),
        };
        // Visits at 20 a second per group, the treatment converting better:
        // an experiment finds it the winner within minutes.
        let tally = |rate: f64| {
            move |_t: Duration, window: Duration| {
                let visits = VISITS_PER_SECOND * window.as_secs_f64();
                deploykit::judge::Measured::Value(deploykit::experiment::Tally {
                    visits,
                    conversions: (visits * rate).round(),
                })
            }
        };
        let metrics = FakeMetrics::new()
            .set("stable", Metric::ErrorRate, 0.001)
            .set("stable", Metric::LatencyP99, 0.12)
            .set("stable", Metric::RequestCount, 28_500.0)
            .set("canary", Metric::ErrorRate, 0.001)
            .set("canary", Metric::LatencyP99, 0.12)
            .script_tally("stable", tally(0.05))
            .script_tally("canary", tally(0.08));
        let canary = Canary {
            stages: vec![50, 100],
            stage_duration: Duration::from_secs(60),
            check_interval: Duration::from_secs(30),
            ..Canary::default()
        };
        let strategies = Strategies {
            rolling: Rolling {
                batch_size: CountOrPercent::Count(batch),
                max_failures: CountOrPercent::Count(0),
                ..Rolling::default()
            },
            blue_green: BlueGreen {
                keep_old: KeepOld::For(Duration::ZERO),
                warmup_requests: 2,
                ..BlueGreen::default()
            },
            ramped: Ramped {
                base: canary.clone(),
                from: 10,
                to: 100,
                duration: Duration::from_secs(90),
                step_interval: Duration::from_secs(30),
                ..Ramped::default()
            },
            shadow: Shadow {
                base: canary.clone(),
                duration: SHADOW_DURATION,
                then: ShadowThen::Canary,
                ..Shadow::default()
            },
            dark_launch: DarkLaunch {
                base: canary.clone(),
                rules: vec![Rule {
                    matches: Match::Header {
                        name: "x-beta".into(),
                        value: ValueMatch::Exact("1".into()),
                    },
                    group: g("canary"),
                }],
                timeout: None,
            },
            experiment: Experiment {
                base: canary.clone(),
                duration: Duration::from_secs(600),
                ..Experiment::default()
            },
            canary,
            ..Strategies::default()
        };
        // Every record is fsynced: memory-backed storage keeps the matrix fast.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).unwrap()
        } else {
            tempfile::tempdir().unwrap()
        };
        let state = StateDir::open(dir.path(), "shop").unwrap();
        Self {
            kind,
            fleet,
            store: FakeLiveStore::recording("blue"),
            metrics,
            state,
            strategies,
            treatments: false,
            _dir: dir,
        }
    }

    /// An experiment over `n` stable instances and two treatments, each
    /// one instance: canary-b on v2 converting as the control, canary-c on
    /// v3 converting better, which wins and is promoted.
    pub(crate) fn with_treatments(n: usize) -> Self {
        let mut w = Self::new(StrategyKind::Experiment, n, 1);
        w.fleet = FakeFleet::with_groups(&[("stable", n), ("canary-b", 1), ("canary-c", 1)])
            .routing_capabilities(Capabilities::of(Capability::ALL));
        let tally = |rate: f64| {
            move |_t: Duration, window: Duration| {
                let visits = VISITS_PER_SECOND * window.as_secs_f64();
                deploykit::judge::Measured::Value(deploykit::experiment::Tally {
                    visits,
                    conversions: (visits * rate).round(),
                })
            }
        };
        w.metrics = w
            .metrics
            .clone()
            .set("canary-b", Metric::ErrorRate, 0.001)
            .set("canary-b", Metric::LatencyP99, 0.12)
            .set("canary-c", Metric::ErrorRate, 0.001)
            .set("canary-c", Metric::LatencyP99, 0.12)
            .script_tally("canary-b", tally(0.05))
            .script_tally("canary-c", tally(0.12));
        w.strategies.experiment.treatments = vec![
            Treatment::new(g("canary-b"), 25),
            Treatment::new(g("canary-c"), 25).release(v("v3")),
        ];
        w.treatments = true;
        w
    }

    /// The release a resumed deployment ends on: the winner's.
    fn resumed_release(&self) -> &'static str {
        if self.treatments {
            "v3"
        } else {
            "v2"
        }
    }

    /// The groups that end stopped: the canary, or the treatments.
    fn treated(&self) -> &'static [&'static str] {
        if self.treatments {
            &["canary-b", "canary-c"]
        } else {
            &["canary"]
        }
    }

    pub(crate) fn exec(&self, sink: Option<Arc<dyn EventSink>>) -> Executor {
        self.exec_with(sink, tokio_util::sync::CancellationToken::new())
    }

    /// [`exec`](Self::exec), stopped by the operator through `cancel`.
    fn exec_with(
        &self,
        sink: Option<Arc<dyn EventSink>>,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Executor {
        let mut b = Executor::builder()
            .cancel_token(cancel)
            .instances(self.fleet.instances())
            .load_balancer(Arc::new(self.fleet.load_balancer()))
            .live_store(Arc::new(self.store.clone()))
            .smoke_tester(Arc::new(FakeSmokeTester::for_fleet(&self.fleet)))
            .metrics(Arc::new(self.metrics.clone()));
        if let Some(s) = sink {
            b = b.events(s);
        }
        if self.kind == StrategyKind::DarkLaunch {
            // The testers promote the dark release a while after it waits;
            // a fresh handle per run, as each process has its own.
            let handle = PromotionHandle::new();
            b = b.promotion(handle.clone());
            tokio::spawn(async move {
                loop {
                    handle.wait_for_pause().await;
                    tokio::time::sleep(Duration::from_secs(20)).await;
                    handle.promote();
                }
            });
        }
        b.build().expect("valid executor")
    }

    async fn live(&self, exec: &Executor) -> Reconciled {
        reconcile(
            &self.store,
            exec.load_balancer().as_ref(),
            &self.strategies.blue_green.environments,
        )
        .await
        .expect("reconciles")
    }

    /// Starts a journal; `None` when the kill comes right after its header.
    fn journal(&self, header: JournalHeader, kill_after: u64) -> Option<(Arc<Journal>, Arc<dyn EventSink>)> {
        let journal = Arc::new(self.state.create_journal(header).unwrap());
        if journal.records() >= kill_after {
            return None;
        }
        let sink = Arc::new(Killing {
            journal: journal.clone(),
            after: kill_after,
        });
        Some((journal, sink))
    }

    /// Deploys v2, killed after record `kill_after`; the plan, the records
    /// written, and the report unless it was killed.
    pub(crate) async fn deploy(&self, kill_after: u64) -> (Plan, u64, Option<Report>) {
        let release = v("v2");
        let probe = self.exec(None);
        let snap = probe.snapshot().await.unwrap();
        let plan = match self.kind {
            StrategyKind::BlueGreen => {
                let live = self.live(&probe).await;
                self.strategies.blue_green.plan(&live, &snap, &release).unwrap()
            }
            k => self.strategies.get(k).unwrap().plan(&snap, &release).unwrap(),
        };
        let mut header = JournalHeader::new(
            "d1",
            "shop",
            RunKind::Deploy,
            self.kind,
            release.clone(),
            previous_of(&snap),
        );
        header.plan = Some(plan.clone());
        let Some((journal, sink)) = self.journal(header, kill_after) else {
            return (plan, 1, None);
        };
        let exec = self.exec(Some(sink));
        let run = async {
            match self.kind {
                StrategyKind::BlueGreen => self
                    .strategies
                    .blue_green
                    .deploy(&exec, &release)
                    .await
                    .map(|r| r.deployment),
                _ => exec.run(&plan, RunOptions::default().with_id("d1")).await,
            }
        };
        let report = killed_or(run).await.map(|r| r.expect("the deployment starts"));
        if let Some(report) = &report {
            finish(&journal, report);
        }
        (plan, journal.records(), report)
    }

    /// Recovers the interrupted deployment; the report of the recovery run
    /// (none when nothing was left to do) and its plan, if it had one.
    pub(crate) async fn recover(&self, how: How) -> (Option<Report>, Option<Plan>) {
        let r = self.recover_killed(how, u64::MAX).await;
        (r.report, r.plan)
    }

    /// Recovers as `how` says, as an operator following deploykit's advice
    /// would: a resume refused because the killed run had begun to roll
    /// back (its journal holds `rollback_started`) is rolled back instead.
    /// Returns how it recovered, with [`recover`](Self::recover)'s answer.
    pub(crate) async fn recover_as_told(&self, how: How) -> (How, Option<Report>, Option<Plan>) {
        let how = match how {
            How::Resume if self.resume_refused_as_rolling_back().await => How::Rollback,
            how => how,
        };
        let (report, plan) = self.recover(how).await;
        (how, report, plan)
    }

    /// Whether `recovery::resume` refuses the interrupted run because it had
    /// begun to roll back; judged on the journal's typed events, the refusal
    /// itself being only words.
    async fn resume_refused_as_rolling_back(&self) -> bool {
        let latest = self.state.latest().unwrap().expect("a journal");
        let recorded = Recorded::load(&self.state, &latest).unwrap();
        let probe = self.exec(None);
        let snap = probe.snapshot().await.unwrap();
        let live = match self.kind {
            StrategyKind::BlueGreen => Some(self.live(&probe).await),
            _ => None,
        };
        let refused = matches!(
            recovery::resume(&recorded, &snap, &self.strategies, live.as_ref()),
            Err(deploykit::Error::Refused(_))
        );
        let began_rolling_back = recorded
            .latest()
            .events
            .iter()
            .any(|e| matches!(e.kind, deploykit::EventKind::RollbackStarted { .. }));
        refused && began_rolling_back
    }

    /// As [`recover`](Self::recover), the recovery itself killed after its
    /// record `kill_after`.
    async fn recover_killed(&self, how: How, kill_after: u64) -> Recovery {
        let latest = self.state.latest().unwrap().expect("a journal");
        assert!(!latest.is_finished(), "the deployment was interrupted");
        let recorded = Recorded::load(&self.state, &latest).unwrap();
        let root = recorded.deployment().header.clone();
        let probe = self.exec(None);
        let snap = probe.snapshot().await.unwrap();
        let live = match self.kind {
            StrategyKind::BlueGreen => Some(self.live(&probe).await),
            _ => None,
        };
        let run_id = format!("r{}", recorded.chain().len());
        let header = |kind: RunKind, strategy: StrategyKind, plan: Option<&Plan>| {
            let (release, previous) = match kind {
                RunKind::Resume => (root.release.clone(), root.previous.clone()),
                _ => (
                    plan.map(|p| p.release.clone()).unwrap_or(root.release.clone()),
                    previous_of(&snap),
                ),
            };
            let mut h = JournalHeader::new(run_id.clone(), "shop", kind, strategy, release, previous);
            h.acts_on = Some(root.deployment.clone());
            h.plan = plan.cloned();
            h
        };
        let killed = |plan: Option<Plan>| Recovery {
            report: None,
            plan,
            killed: true,
        };
        let (journal, report, plan) = match how {
            How::Resume => {
                match recovery::resume(&recorded, &snap, &self.strategies, live.as_ref()).unwrap() {
                    recovery::Resume::Switched { live } => {
                        assert_eq!(self.kind, StrategyKind::BlueGreen);
                        assert_eq!(Some(live), switch_target(&root.plan), "it had switched");
                        return Recovery {
                            report: None,
                            plan: None,
                            killed: false,
                        };
                    }
                    recovery::Resume::Plan(plan) => {
                        let Some((journal, sink)) =
                            self.journal(header(RunKind::Resume, root.strategy, Some(&plan)), kill_after)
                        else {
                            return killed(Some(plan));
                        };
                        let exec = self.exec(Some(sink));
                        let run = async {
                            match self.kind {
                                StrategyKind::BlueGreen => self
                                    .strategies
                                    .blue_green
                                    .deploy(&exec, &root.release)
                                    .await
                                    .map(|r| r.deployment),
                                _ => {
                                    let options = RunOptions::default()
                                        .with_id(&run_id)
                                        .with_unsettled(recorded.unsettled());
                                    exec.run(&plan, options).await
                                }
                            }
                        };
                        let Some(report) = killed_or(run).await else {
                            return killed(Some(plan));
                        };
                        (journal, report.expect("the resume starts"), Some(plan))
                    }
                }
            }
            How::Rollback => {
                match recovery::rollback(&recorded, &snap, &self.strategies, live.as_ref()).unwrap() {
                    recovery::Rollback::SwitchBack => {
                        assert_eq!(self.kind, StrategyKind::BlueGreen);
                        let Some((journal, sink)) = self.journal(
                            header(RunKind::Rollback, StrategyKind::BlueGreen, None),
                            kill_after,
                        ) else {
                            return killed(None);
                        };
                        let exec = self.exec(Some(sink));
                        let Some(r) = killed_or(self.strategies.blue_green.rollback(&exec)).await else {
                            return killed(None);
                        };
                        (journal, r.expect("the switch back starts").deployment, None)
                    }
                    recovery::Rollback::Plan(plan) => {
                        assert_eq!(plan.strategy, StrategyKind::Rollback);
                        let strategy = match self.kind {
                            StrategyKind::BlueGreen => StrategyKind::BlueGreen,
                            _ => StrategyKind::Rollback,
                        };
                        let Some((journal, sink)) =
                            self.journal(header(RunKind::Rollback, strategy, Some(&plan)), kill_after)
                        else {
                            return killed(Some(plan));
                        };
                        let exec = self.exec(Some(sink));
                        let options = RunOptions::recovery()
                            .with_id(&run_id)
                            .with_unsettled(recorded.unsettled());
                        let Some(r) = killed_or(exec.run(&plan, options)).await else {
                            return killed(Some(plan));
                        };
                        (journal, r.expect("the rollback starts"), Some(plan))
                    }
                }
            }
        };
        finish(&journal, &report);
        Recovery {
            report: Some(report),
            plan,
            killed: false,
        }
    }

    /// The fleet ends on `release` (the live environment for blue-green),
    /// serving, with traffic where it belongs.
    pub(crate) fn assert_settled(&self, release: &str, live_before: Option<&Group>, how: How, ctx: &str) {
        let on = |id: &InstanceId| {
            let id = id.as_str();
            assert_eq!(
                self.fleet.release_of(id).as_ref().map(ReleaseId::as_str),
                Some(release),
                "{ctx}: {id}"
            );
            assert!(self.fleet.is_running(id), "{ctx}: {id} is not running");
            assert_eq!(
                self.fleet.serving_release(id).as_ref().map(ReleaseId::as_str),
                Some(release),
                "{ctx}: {id}'s running process"
            );
            assert!(self.fleet.in_rotation(id), "{ctx}: {id} is out of rotation");
        };
        let ids = |group: &str| -> Vec<InstanceId> {
            self.fleet
                .instances()
                .iter()
                .map(|i| i.backend())
                .filter(|b| b.group.as_str() == group)
                .map(|b| b.id.clone())
                .collect()
        };
        match self.kind {
            StrategyKind::BlueGreen => {
                let live = self.fleet.live_group().expect("one environment gets all traffic");
                let before = live_before.expect("blue-green was live somewhere");
                match how {
                    How::Rollback => {
                        assert_eq!(&live, before, "{ctx}: a rollback leaves the old environment live")
                    }
                    How::Resume => assert_ne!(&live, before, "{ctx}: a resumed deployment switches"),
                }
                let record = self.store.record().expect("a live record");
                assert_eq!(
                    record.live, live,
                    "{ctx}: the record agrees with the load balancer"
                );
                assert_eq!(record.switching_to, None, "{ctx}: no switch left pending");
                ids(live.as_str()).iter().for_each(on);
            }
            k if k == StrategyKind::Canary || routed(k) => {
                ids("stable").iter().for_each(on);
                let weights = self.fleet.load_balancer().weights();
                let to_canary: u8 = self
                    .treated()
                    .iter()
                    .filter_map(|t| weights.as_ref().and_then(|w| w.get(&g(t)).copied()))
                    .sum();
                for id in self.treated().iter().flat_map(|t| ids(t)) {
                    let id = id.as_str();
                    // Retired (stopped, out of rotation), or as it was before
                    // the deployment touched it.
                    let retired = !self.fleet.is_running(id) && !self.fleet.in_rotation(id);
                    let as_before = self.fleet.release_of(id) == Some(v("v1")) && self.fleet.is_running(id);
                    assert!(
                        retired || as_before,
                        "{ctx}: canary {id} is neither retired nor as before"
                    );
                }
                assert_eq!(to_canary, 0, "{ctx}: traffic to the canary: {weights:?}");
            }
            _ => ids("default").iter().for_each(on),
        }
        assert_eq!(self.fleet.routing_violations(), Vec::<String>::new(), "{ctx}");
    }
}

/// The tallies' visits per second and group.
const VISITS_PER_SECOND: f64 = 20.0;

/// How long the matrix's shadow is judged.
const SHADOW_DURATION: Duration = Duration::from_secs(90);

/// The strategies built on routing policies.
fn routed(kind: StrategyKind) -> bool {
    matches!(
        kind,
        StrategyKind::Ramped | StrategyKind::Shadow | StrategyKind::DarkLaunch | StrategyKind::Experiment
    )
}

fn previous_of(snap: &FleetSnapshot) -> BTreeMap<InstanceId, Option<ReleaseId>> {
    snap.instances
        .iter()
        .map(|i| (i.backend.id.clone(), i.release.clone()))
        .collect()
}

fn switch_target(plan: &Option<Plan>) -> Option<Group> {
    recovery::switch_target(plan.as_ref())
}

fn finish(journal: &Journal, report: &Report) {
    journal
        .finish(JournalOutcome {
            outcome: report.outcome,
            reason: report.reason.clone(),
            duration_ms: 0,
        })
        .unwrap();
}

/// Runs `f`; `None` when the journal killed it.
async fn killed_or<T>(f: impl std::future::Future<Output = T>) -> Option<T> {
    match AssertUnwindSafe(f).catch_unwind().await {
        Ok(t) => Some(t),
        Err(payload) if payload.is::<Killed>() => None,
        Err(payload) => std::panic::resume_unwind(payload),
    }
}

/// The most instances one stage of `plan` works on.
pub(crate) fn widest_stage(plan: &Plan) -> usize {
    plan.stages
        .iter()
        .map(|s| s.units.iter().filter(|u| u.instance.is_some()).count())
        .max()
        .unwrap_or(0)
}

pub(crate) fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(f)
}

/// Records an uninterrupted deployment of this shape writes.
fn records(kind: StrategyKind, n: usize, batch: usize) -> u64 {
    records_of(|| World::new(kind, n, batch))
}

/// Records an uninterrupted deployment in the world `make` builds writes.
fn records_of(make: impl Fn() -> World) -> u64 {
    block_on(async {
        let w = make();
        let (_, records, report) = w.deploy(u64::MAX).await;
        let report = report.expect("not killed");
        assert!(
            report.is_success(),
            "the uninterrupted deployment succeeds:\n{report}"
        );
        records
    })
}

/// Kills the deployment after record `k`, recovers it `how`, and checks the
/// fleet.
fn crash_and_recover(kind: StrategyKind, n: usize, batch: usize, k: u64, how: How) {
    crash_twice_and_recover(kind, n, batch, k, how, None);
}

/// As [`crash_and_recover`]; with `then = Some((m, how2))` the recovery is
/// killed too, after its record `m`, and recovered `how2` (an interrupted
/// rollback is always rolled back again: it cannot be resumed). Whether the
/// recovery was killed.
fn crash_twice_and_recover(
    kind: StrategyKind,
    n: usize,
    batch: usize,
    k: u64,
    how: How,
    then: Option<(u64, How)>,
) -> bool {
    crash_world(
        || World::new(kind, n, batch),
        &format!("{kind} n={n} batch={batch}"),
        k,
        how,
        then,
    )
}

/// [`crash_twice_and_recover`] in the world `make` builds, named `name`.
fn crash_world(make: impl Fn() -> World, name: &str, k: u64, how: How, then: Option<(u64, How)>) -> bool {
    block_on(async {
        let mut ctx = format!("{name}, killed after record {k}, {how:?}");
        let w = make();
        let kind = w.kind;
        let (deploy_plan, written, report) = w.deploy(k).await;
        assert!(report.is_none(), "{ctx}: the deployment was killed");
        assert_eq!(written, k, "{ctx}: the kill comes right after record {k}");
        // Every blue-green deployment here starts with blue live.
        let live_before = (kind == StrategyKind::BlueGreen).then(|| g("blue"));
        let mut widest = widest_stage(&deploy_plan);
        let mut last = how;
        let mut r = w.recover_killed(how, then.map_or(u64::MAX, |(m, _)| m)).await;
        let killed = r.killed;
        if killed {
            let (m, how2) = then.expect("killed only when asked");
            last = if how == How::Rollback { How::Rollback } else { how2 };
            ctx = format!("{ctx}, recovery killed after record {m}, then {last:?}");
            widest += r.plan.as_ref().map(widest_stage).unwrap_or(0);
            r = w.recover_killed(last, u64::MAX).await;
        }
        let expect = match last {
            How::Resume => w.resumed_release(),
            How::Rollback => "v1",
        };
        if let Some(report) = &r.report {
            assert_eq!(report.outcome, OutcomeKind::Succeeded, "{ctx}:\n{report}");
            // A kill leaves at most one stage's instances out of rotation,
            // and a recovery takes at most one of its stages' out at once.
            let bound = widest + r.plan.as_ref().map(widest_stage).unwrap_or(0);
            // A rollback's report speaks of its own plan, whose "previous"
            // releases are those it found (the CLI prints what each instance
            // runs instead), and blue-green stops the old environment after
            // its report (keep_old): there the checker replays the traffic
            // history only, and assert_settled checks what each instance
            // runs.
            let inv = if last == How::Rollback || kind == StrategyKind::BlueGreen {
                w.fleet.check_traffic(bound)
            } else {
                w.fleet.check(report, bound)
            };
            assert!(inv.is_ok(), "{ctx}: {:?}", inv.violations);
        }
        w.assert_settled(expect, live_before.as_ref(), last, &ctx);
        let after = w.state.latest().unwrap().unwrap();
        assert!(
            after.is_finished() || r.report.is_none(),
            "{ctx}: the recovery's journal is finished"
        );
        killed
    })
}

/// Every record of every strategy, both ways.
fn matrix(kind: StrategyKind, n: usize, batch: usize) {
    let total = records(kind, n, batch);
    assert!(total > 10, "{kind}: only {total} records");
    // The last record is the outcome, written after the run: killing after
    // it kills nothing.
    for k in 1..total {
        for how in [How::Resume, How::Rollback] {
            crash_and_recover(kind, n, batch, k, how);
        }
    }
}

#[test]
fn rolling_recovers_from_a_kill_after_every_record() {
    matrix(StrategyKind::Rolling, 3, 2);
}

#[test]
fn recreate_recovers_from_a_kill_after_every_record() {
    matrix(StrategyKind::Recreate, 2, 1);
}

#[test]
fn blue_green_recovers_from_a_kill_after_every_record() {
    matrix(StrategyKind::BlueGreen, 2, 1);
}

#[test]
fn canary_recovers_from_a_kill_after_every_record() {
    matrix(StrategyKind::Canary, 2, 1);
}

#[test]
fn ramped_recovers_from_a_kill_after_every_record() {
    matrix(StrategyKind::Ramped, 2, 1);
}

#[test]
fn shadow_recovers_from_a_kill_after_every_record() {
    matrix(StrategyKind::Shadow, 2, 1);
}

#[test]
fn dark_launch_recovers_from_a_kill_after_every_record() {
    matrix(StrategyKind::DarkLaunch, 2, 1);
}

#[test]
fn experiment_recovers_from_a_kill_after_every_record() {
    matrix(StrategyKind::Experiment, 2, 1);
}

/// An experiment with two treatments, killed after every record, resumed
/// or rolled back: a resume after the winner was journaled promotes that
/// winner's release (v3), never the other treatment's; a rollback returns
/// every instance, both treatments stopped.
#[test]
fn an_experiment_with_two_treatments_recovers_from_a_kill_after_every_record() {
    let total = records_of(|| World::with_treatments(2));
    assert!(total > 10, "only {total} records");
    for k in 1..total {
        for how in [How::Resume, How::Rollback] {
            crash_world(
                || World::with_treatments(2),
                "experiment with two treatments",
                k,
                how,
                None,
            );
        }
    }
}

/// A resume after the winner (canary-c) was journaled deploys no losing
/// treatment again: the resumed plan installs nothing on canary-b's
/// instance (i-3), the resumed run starts nothing there, and it ends
/// stopped with the fleet on the winner's release.
#[test]
fn a_resume_after_the_decision_does_not_redeploy_the_losing_treatment() {
    use deploykit::{EventKind, Step, StepKind};
    let total = records_of(|| World::with_treatments(2));
    let mut after_decision = 0;
    for k in 1..total {
        let resumed = block_on(async {
            let w = World::with_treatments(2);
            let (_, _, report) = w.deploy(k).await;
            assert!(report.is_none(), "killed after record {k}");
            let killed = w.state.latest().unwrap().expect("a journal");
            let decided = killed
                .events
                .iter()
                .any(|e| matches!(e.kind, EventKind::ExperimentDecided { .. }));
            if !decided {
                return false;
            }
            let ctx = format!("killed after record {k}, after the decision, resumed");
            let (report, plan) = w.recover(How::Resume).await;
            let report = report.expect("a resume with a plan");
            assert_eq!(report.outcome, OutcomeKind::Succeeded, "{ctx}:\n{report}");
            let plan = plan.expect("the resumed plan");
            let loser = InstanceId::new("i-3").unwrap();
            let installs: Vec<&str> = plan
                .stages
                .iter()
                .flat_map(|s| &s.units)
                .flat_map(|u| &u.steps)
                .filter_map(|s| match s {
                    Step::Install { instance, release } if instance == &loser => Some(release.as_str()),
                    Step::Gate { group, .. } if group.as_str() == "canary-b" => Some("a gate"),
                    _ => None,
                })
                .collect();
            assert!(
                installs.is_empty(),
                "{ctx}: the resumed plan redeploys canary-b: {installs:?}"
            );
            let events = w.state.latest().unwrap().expect("a journal").events;
            let started: Vec<StepKind> = events
                .iter()
                .filter_map(|e| match &e.kind {
                    EventKind::StepStarted {
                        step,
                        instance: Some(i),
                        ..
                    } if i == &loser => Some(*step),
                    _ => None,
                })
                .collect();
            assert!(
                !started
                    .iter()
                    .any(|s| matches!(s, StepKind::Install | StepKind::Start)),
                "{ctx}: the resume ran {started:?} on i-3"
            );
            assert!(!w.fleet.is_running("i-3"), "{ctx}: canary-b still runs");
            w.assert_settled("v3", None, How::Resume, &ctx);
            true
        });
        after_decision += usize::from(resumed);
    }
    assert!(
        after_decision > 3,
        "only {after_decision} kills came after the decision"
    );
}

/// A deployment killed after one of its records, then resumed to the end.
struct Resumed {
    /// The routing changes of the killed run, then of the resume.
    killed_routing: Vec<RoutingEntry>,
    resumed_routing: Vec<RoutingEntry>,
    /// The events each journalled.
    killed_events: Vec<Event>,
    resumed_events: Vec<Event>,
}

/// Deploys `kind` over two stable instances and a canary, kills it after
/// record `k`, resumes it and checks the fleet settled on v2.
async fn kill_and_resume(kind: StrategyKind, k: u64) -> Resumed {
    let w = World::new(kind, 2, 1);
    let (_, _, report) = w.deploy(k).await;
    assert!(report.is_none(), "{kind}: killed after record {k}");
    let killed_events = w.state.latest().unwrap().expect("a journal").events;
    let before = w.fleet.routing_history().len();
    let (report, _) = w.recover(How::Resume).await;
    let report = report.expect("a canary-shaped deployment resumes with a plan");
    let ctx = format!("{kind}, killed after record {k}");
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{ctx}:\n{report}");
    w.assert_settled("v2", None, How::Resume, &ctx);
    let mut routing = w.fleet.routing_history();
    let resumed_routing = routing.split_off(before);
    Resumed {
        killed_routing: routing,
        resumed_routing,
        killed_events,
        resumed_events: w.state.latest().unwrap().expect("a journal").events,
    }
}

/// The canary's share at each traffic change.
fn canary_shares(routing: &[RoutingEntry]) -> Vec<u8> {
    routing
        .iter()
        .filter_map(|r| match &r.change {
            RoutingChange::Weights(w) => Some(w.get(&g("canary")).copied().unwrap_or(0)),
            RoutingChange::Policy(p) => Some(p.shares().get(&g("canary")).copied().unwrap_or(0)),
            _ => None,
        })
        .collect()
}

/// A resumed ramp neither starts over nor climbs past what its analysis
/// approved: its first share is the last one the killed run set, or the
/// one before it when that one's step had not passed, and it goes on up
/// the schedule from there.
#[test]
fn a_resumed_ramp_goes_on_from_its_last_passed_step() {
    let schedule: Vec<u8> = World::new(StrategyKind::Ramped, 2, 1)
        .strategies
        .ramped
        .schedule()
        .unwrap()
        .iter()
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(schedule, [10, 40, 70, 100]);
    let total = records(StrategyKind::Ramped, 2, 1);
    let mut mid_ramp = 0;
    for k in 1..total {
        let r = block_on(kill_and_resume(StrategyKind::Ramped, k));
        let set: Vec<u8> = canary_shares(&r.killed_routing)
            .into_iter()
            .filter(|p| *p > 0)
            .collect();
        let again: Vec<u8> = canary_shares(&r.resumed_routing)
            .into_iter()
            .filter(|p| *p > 0)
            .collect();
        let ctx = format!("killed after record {k}: the killed run set {set:?}, the resume {again:?}");
        let Some(&hi) = set.last() else {
            assert_eq!(again, schedule, "{ctx}");
            continue;
        };
        let lo = set[set.len().saturating_sub(2)];
        let Some(&first) = again.first() else {
            // Every step had passed: only the promotion was left.
            assert_eq!(set, schedule, "{ctx}");
            continue;
        };
        assert!(first == lo || first == hi, "{ctx}");
        let at = schedule
            .iter()
            .position(|p| *p == first)
            .expect("a point of the schedule");
        assert_eq!(again, schedule[at..], "{ctx}");
        mid_ramp += usize::from(first > schedule[0]);
    }
    assert!(mid_ramp >= 3, "only {mid_ramp} resumes went on mid-ramp");
}

/// A resumed shadow mirrors again for what is left of its duration: the
/// time traffic was mirrored, over both runs, is the shadow's duration,
/// plus at most the part of one check interval the kill cut short.
#[test]
fn a_resumed_shadow_mirrors_for_what_is_left_of_its_duration() {
    let interval = World::new(StrategyKind::Shadow, 2, 1)
        .strategies
        .canary
        .check_interval;
    let total = records(StrategyKind::Shadow, 2, 1);
    let mut split = 0;
    for k in 1..total {
        let r = block_on(kill_and_resume(StrategyKind::Shadow, k));
        let mut mirrored = [Duration::ZERO; 2];
        let mut since: Option<(usize, Duration)> = None;
        let all = r
            .killed_routing
            .iter()
            .map(|e| (0, e))
            .chain(r.resumed_routing.iter().map(|e| (1, e)));
        for (run, e) in all {
            let mirrors = match &e.change {
                RoutingChange::Policy(p) => p.mirror.is_some(),
                RoutingChange::Weights(_) => false,
                _ => continue,
            };
            if let Some((from_run, from)) = since.take() {
                mirrored[from_run] += e.at - from;
            }
            if mirrors {
                since = Some((run, e.at));
            }
        }
        assert!(
            since.is_none(),
            "killed after record {k}: the mirror was never ended"
        );
        let sum = mirrored[0] + mirrored[1];
        assert!(
            sum >= SHADOW_DURATION && sum <= SHADOW_DURATION + interval,
            "killed after record {k}: mirrored {mirrored:?}"
        );
        split += usize::from(mirrored[0] >= interval && !mirrored[1].is_zero());
    }
    assert!(split >= 2, "only {split} shadows were judged across both runs");
}

/// A dark launch killed before its promotion waits for one again; one
/// killed after it goes on widening without asking twice.
#[test]
fn a_resumed_dark_launch_waits_for_promotion_only_if_it_had_not_come() {
    let total = records(StrategyKind::DarkLaunch, 2, 1);
    let (mut waited, mut went_on) = (0, 0);
    let waits = |events: &[Event]| {
        events
            .iter()
            .filter(|e| matches!(e.kind, deploykit::EventKind::AwaitingPromotion { .. }))
            .count()
    };
    for k in 1..total {
        let r = block_on(kill_and_resume(StrategyKind::DarkLaunch, k));
        let promoted = r
            .killed_events
            .iter()
            .any(|e| matches!(e.kind, deploykit::EventKind::Promoted { stage: 1 }));
        let again = waits(&r.resumed_events);
        if promoted {
            assert_eq!(again, 0, "killed after record {k}, after the promotion");
            went_on += 1;
        } else {
            assert_eq!(again, 1, "killed after record {k}, before the promotion");
            waited += 1;
        }
        // Not promoted yet: dark again (the rules, no share) before any
        // share of public traffic.
        if !promoted {
            let dark_first = r.resumed_routing.iter().find_map(|e| match &e.change {
                RoutingChange::Policy(p) => {
                    Some(!p.rules.is_empty() && p.shares().get(&g("canary")).copied().unwrap_or(0) == 0)
                }
                RoutingChange::Weights(w) if w.get(&g("canary")).copied().unwrap_or(0) > 0 => Some(false),
                _ => None,
            });
            assert_eq!(
                dark_first,
                Some(true),
                "killed after record {k}: {:?}",
                r.resumed_routing
            );
        }
    }
    assert!(waited >= 3 && went_on >= 3, "{waited} waited, {went_on} went on");
}

/// A resumed experiment reads its tallies over its whole window: its first
/// reading counts at least the visits of the time the killed run had
/// already run it, so none are lost, and the treatment still wins.
#[test]
fn a_resumed_experiment_reads_its_whole_window() {
    let total = records(StrategyKind::Experiment, 2, 1);
    let mut resumed_mid_test = 0;
    for k in 1..total {
        let r = block_on(kill_and_resume(StrategyKind::Experiment, k));
        let started = r.killed_events.iter().find_map(|e| match e.kind {
            deploykit::EventKind::StepStarted {
                step: deploykit::StepKind::Experiment,
                rollback: false,
                ..
            } => Some(e.elapsed_ms),
            _ => None,
        });
        let decided = r.killed_events.iter().any(|e| {
            matches!(
                e.kind,
                deploykit::EventKind::StepFinished {
                    step: deploykit::StepKind::Experiment,
                    ..
                }
            )
        });
        let readings: Vec<(u64, deploykit::experiment::Reading)> = r
            .resumed_events
            .iter()
            .filter_map(|e| match e.kind {
                deploykit::EventKind::ExperimentReading { reading, elapsed_ms } => {
                    Some((elapsed_ms, reading))
                }
                _ => None,
            })
            .collect();
        let (Some(started), false) = (started, decided) else {
            continue;
        };
        let ran_ms = r.killed_events.last().expect("events").elapsed_ms - started;
        let (at_ms, first) = readings.first().copied().expect("the resumed experiment reads");
        assert!(
            at_ms >= ran_ms,
            "killed after record {k}: read at {at_ms} ms, ran {ran_ms} ms"
        );
        let before = VISITS_PER_SECOND * (ran_ms / 1000) as f64;
        assert!(
            first.control.visits >= before && first.treatment.visits >= before,
            "killed after record {k} ({ran_ms} ms in): {first:?}"
        );
        let last = readings.last().expect("readings").1;
        assert_eq!(
            last.verdict,
            deploykit::experiment::Verdict::TreatmentWins,
            "killed after record {k}"
        );
        resumed_mid_test += usize::from(ran_ms >= 30_000);
    }
    assert!(resumed_mid_test >= 2, "only {resumed_mid_test} resumes mid-test");
}

#[test]
fn a_recovery_that_is_itself_killed_is_recovered_again() {
    for kind in [
        StrategyKind::Rolling,
        StrategyKind::BlueGreen,
        StrategyKind::Canary,
    ] {
        let total = records(kind, 2, 1);
        let mut killed_late = 0;
        for k in (2..total).step_by(5) {
            for (how, how2) in [
                (How::Resume, How::Resume),
                (How::Resume, How::Rollback),
                (How::Rollback, How::Rollback),
            ] {
                for m in [2, 5, 9] {
                    let killed = crash_twice_and_recover(kind, 2, 1, k, how, Some((m, how2)));
                    // Every recovery run writes a header and a start event;
                    // only a blue-green deployment that had switched has
                    // nothing to resume, and no run.
                    if m == 2 {
                        assert!(
                            killed || kind == StrategyKind::BlueGreen,
                            "{kind}, killed after record {k}, {how:?}: the recovery was not killed after record 2"
                        );
                    }
                    killed_late += usize::from(killed && m > 2);
                }
            }
        }
        assert!(
            killed_late > 5,
            "{kind}: only {killed_late} recoveries killed part-way"
        );
    }
}

/// A resume that aborts undoes the whole deployment: the instances the
/// killed run had finished, which the resume skips, go back to v1 too, and
/// its report says where each one ended.
#[test]
fn a_resume_that_aborts_returns_the_instances_the_killed_run_finished() {
    let id = |s: &str| InstanceId::new(s).unwrap();
    let total = records(StrategyKind::Rolling, 4, 1);
    // The first kill point after which i-1 and i-2 serve v2 and i-3 has
    // not been touched.
    let found = (1..total).find_map(|k| {
        block_on(async {
            let w = World::new(StrategyKind::Rolling, 4, 1);
            let (_, _, report) = w.deploy(k).await;
            let f = &w.fleet;
            let done = report.is_none()
                && f.serving_release("i-1") == Some(v("v2"))
                && f.serving_release("i-2") == Some(v("v2"))
                && f.serving_release("i-3") == Some(v("v1"))
                && f.in_rotation("i-2");
            done.then_some(k)
        })
    });
    let k = found.expect("a kill point with two instances finished");
    block_on(async {
        let w = World::new(StrategyKind::Rolling, 4, 1);
        let (_, _, report) = w.deploy(k).await;
        assert!(report.is_none(), "killed after record {k}");
        // The resumed part fails: i-4 never gets healthy on v2.
        let _ = w.fleet.clone().fault(
            "i-4",
            deploykit_testkit::Op::Health,
            deploykit_testkit::Fault::NewRelease,
        );
        let (report, plan) = w.recover(How::Resume).await;
        let (report, plan) = (report.expect("a resume runs"), plan.expect("with a plan"));
        assert_eq!(
            plan.skipped,
            [id("i-1"), id("i-2")],
            "the killed run finished them"
        );
        assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
        for i in ["i-1", "i-2", "i-3", "i-4"] {
            assert_eq!(
                w.fleet.serving_release(i),
                Some(v("v1")),
                "{i} serves v1 again:\n{report}"
            );
        }
        for i in ["i-1", "i-2"] {
            let line = report
                .instances
                .iter()
                .find(|l| l.id.as_str() == i)
                .expect("reported");
            assert_eq!(
                line.status,
                deploykit::InstanceStatus::RolledBack,
                "{i}:\n{report}"
            );
            assert_eq!(line.previous, Some(v("v1")), "{i} ran v1 before the deployment");
            assert_eq!(line.release, Some(v("v1")), "{i}:\n{report}");
        }
        let inv = w.fleet.check(&report, 2);
        assert!(inv.is_ok(), "{inv:?}");
    });
}

/// Cancels the run at its first step, as an operator's Ctrl-C would.
struct CancelAtFirstStep(tokio_util::sync::CancellationToken);

#[async_trait::async_trait]
impl EventSink for CancelAtFirstStep {
    fn emit(&self, e: &Event) {
        if matches!(e.kind, deploykit::EventKind::StepStarted { .. }) {
            self.0.cancel();
        }
    }
}

/// A canary killed after every stable instance moved to v2 resumes with
/// only the canary's end left to do; the operator cancelling that resume
/// aborts the deployment, and an abort undoes the whole deployment: the
/// stable instances the killed run moved go back to v1 too.
#[test]
fn a_cancelled_canary_resume_after_every_stable_instance_moved_returns_them_to_v1() {
    let total = records(StrategyKind::Canary, 2, 1);
    // The first kill point after which both stable instances serve v2 and
    // the resume has only the canary's end left (no instance to move).
    let found = (1..total).find(|&k| {
        block_on(async {
            let w = World::new(StrategyKind::Canary, 2, 1);
            let (_, _, report) = w.deploy(k).await;
            if report.is_some()
                || ["i-1", "i-2"]
                    .iter()
                    .any(|i| w.fleet.serving_release(i) != Some(v("v2")))
            {
                return false;
            }
            let latest = w.state.latest().unwrap().expect("a journal");
            let recorded = Recorded::load(&w.state, &latest).unwrap();
            let snap = w.exec(None).snapshot().await.unwrap();
            match recovery::resume(&recorded, &snap, &w.strategies, None).unwrap() {
                recovery::Resume::Plan(plan) => plan.stages.iter().all(|s| {
                    s.units
                        .iter()
                        .all(|u| u.instance.as_ref().is_none_or(|i| i.as_str() == "i-3"))
                }),
                recovery::Resume::Switched { .. } => false,
            }
        })
    });
    let k = found.expect("a kill point with every stable instance on v2");
    block_on(async {
        let w = World::new(StrategyKind::Canary, 2, 1);
        let (_, _, report) = w.deploy(k).await;
        assert!(report.is_none(), "killed after record {k}");
        let latest = w.state.latest().unwrap().expect("a journal");
        let recorded = Recorded::load(&w.state, &latest).unwrap();
        let snap = w.exec(None).snapshot().await.unwrap();
        let recovery::Resume::Plan(plan) = recovery::resume(&recorded, &snap, &w.strategies, None).unwrap()
        else {
            panic!("a canary resumes with a plan");
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        let exec = w.exec_with(Some(Arc::new(CancelAtFirstStep(cancel.clone()))), cancel);
        let options = RunOptions::default()
            .with_id("r1")
            .with_unsettled(recorded.unsettled());
        let report = exec.run(&plan, options).await.expect("the resume starts");
        assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
        for i in ["i-1", "i-2"] {
            assert_eq!(
                w.fleet.serving_release(i),
                Some(v("v1")),
                "stable {i} serves v1 again after the cancelled resume:\n{report}"
            );
            assert!(w.fleet.in_rotation(i), "{i} serves:\n{report}");
        }
        let weights = w.fleet.load_balancer().weights();
        let to_canary = weights.as_ref().and_then(|w| w.get(&g("canary")).copied());
        assert_eq!(to_canary.unwrap_or(0), 0, "no traffic to the canary: {weights:?}");
        assert_eq!(w.fleet.routing_violations(), Vec::<String>::new());
    });
}

fn kind() -> impl Strategy<Value = StrategyKind> {
    prop_oneof![
        Just(StrategyKind::Rolling),
        Just(StrategyKind::Recreate),
        Just(StrategyKind::BlueGreen),
        Just(StrategyKind::Canary),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random strategies, fleet sizes, batch sizes and kill points; half the
    /// time the recovery is killed too, at a random record, and recovered
    /// again.
    #[test]
    fn any_kill_point_recovers(
        (kind, n, batch) in kind().prop_flat_map(|k| (1usize..=5).prop_flat_map(move |n| (Just(k), Just(n), 1..=n))),
        at in 0.0f64..1.0,
        resume in any::<bool>(),
        then in proptest::option::of((2u64..40, any::<bool>())),
    ) {
        let total = records(kind, n, batch);
        let k = 1 + ((total - 2) as f64 * at).round() as u64;
        let how = |resume: bool| if resume { How::Resume } else { How::Rollback };
        crash_twice_and_recover(kind, n, batch, k, how(resume), then.map(|(m, r)| (m, how(r))));
    }
}

/// A state backend's writer that fails every wait from the `after`-th on,
/// with a lost lock or with a plain write error.
struct Failing {
    waits: std::sync::atomic::AtomicU64,
    after: u64,
    lost: bool,
    fleet: FakeFleet,
    /// How many driver calls the fleet had seen when the first wait failed.
    ops_at_failure: std::sync::Mutex<Option<usize>>,
}

#[async_trait::async_trait]
impl EventSink for Failing {
    fn emit(&self, _: &Event) {}

    async fn durable(&self) -> deploykit::Result<()> {
        let n = self.waits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n < self.after {
            return Ok(());
        }
        self.ops_at_failure
            .lock()
            .unwrap()
            .get_or_insert(self.fleet.ops().len());
        Err(match self.lost {
            true => deploykit::Error::LockLost("the lease expired".into()),
            false => deploykit::Error::io(
                "writing the journal j.jsonl",
                std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"),
            ),
        })
    }
}

/// Runs a rolling deployment over 3 instances whose sink fails from its
/// 12th wait on; returns (driver calls when it failed, driver calls in all).
async fn failing_run(lost: bool) -> (usize, usize) {
    let fleet = FakeFleet::new(3);
    let sink = Arc::new(Failing {
        waits: Default::default(),
        after: 12,
        lost,
        fleet: fleet.clone(),
        ops_at_failure: Default::default(),
    });
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(sink.clone())
        .build()
        .unwrap();
    let strategy = Rolling {
        batch_size: CountOrPercent::Count(1),
        max_failures: CountOrPercent::Count(0),
        ..Rolling::default()
    };
    let report = exec
        .deploy(&strategy, &ReleaseId::new("v2").unwrap())
        .await
        .unwrap();
    assert!(!report.is_success(), "{report}");
    let at = sink.ops_at_failure.lock().unwrap().expect("the sink failed");
    (at, fleet.ops().len())
}

#[tokio::test(start_paused = true)]
async fn a_lost_lock_stops_every_step_restores_included() {
    let (at, total) = failing_run(true).await;
    assert!(at > 0, "the run had acted before the lock was lost");
    assert_eq!(
        total, at,
        "driver calls after the lock was lost: the new holder owns the fleet"
    );
    // A plain write error still restores what was touched: the two differ.
    let (at, total) = failing_run(false).await;
    assert!(total > at, "a journal write error no longer restores");
}

/// An experiment with two treatments killed once its winner was journaled
/// resumes without deciding again: the resume plan holds no experiment and
/// only the winner's branch, promoting its release (v3); killed before,
/// the experiment runs again. Every resume ends with stable on v3.
#[test]
fn a_resumed_experiment_promotes_the_winner_it_had_recorded() {
    let total = records_of(|| World::with_treatments(2));
    let (mut after_decision, mut before_decision) = (0, 0);
    for k in 1..total {
        block_on(async {
            let w = World::with_treatments(2);
            let (_, _, report) = w.deploy(k).await;
            assert!(report.is_none(), "killed after record {k}");
            let latest = w.state.latest().unwrap().expect("a journal");
            let decided = latest
                .events
                .iter()
                .any(|e| matches!(e.kind, deploykit::EventKind::ExperimentDecided { .. }));
            let recorded = Recorded::load(&w.state, &latest).unwrap();
            let snap = w.exec(None).snapshot().await.unwrap();
            let recovery::Resume::Plan(plan) =
                recovery::resume(&recorded, &snap, &w.strategies, None).unwrap()
            else {
                panic!("an experiment resumes with a plan");
            };
            let steps = || plan.stages.iter().flat_map(|s| &s.units).flat_map(|u| &u.steps);
            let experiments = steps()
                .filter(|s| matches!(s, deploykit::Step::Experiment { .. }))
                .count();
            if decided {
                after_decision += 1;
                assert_eq!(
                    experiments, 0,
                    "killed after record {k}: decided, not again\n{plan}"
                );
                assert!(plan.stages.iter().all(|s| s.if_winner.is_none()), "{plan}");
                assert_eq!(plan.release, v("v3"), "{plan}");
                assert!(
                    !plan
                        .stages
                        .iter()
                        .any(|s| s.name.contains("canary-b (the winner)")),
                    "the loser's branch is gone:\n{plan}"
                );
            } else {
                before_decision += 1;
                assert_eq!(experiments, 1, "killed after record {k}: undecided\n{plan}");
            }
            let (report, _) = w.recover(How::Resume).await;
            let report = report.expect("resumed");
            assert_eq!(
                report.outcome,
                OutcomeKind::Succeeded,
                "killed after record {k}:\n{report}"
            );
            assert_eq!(report.release, v("v3"), "killed after record {k}");
            w.assert_settled("v3", None, How::Resume, &format!("killed after record {k}"));
        });
    }
    assert!(
        after_decision >= 5 && before_decision >= 5,
        "{after_decision} / {before_decision}"
    );
}
