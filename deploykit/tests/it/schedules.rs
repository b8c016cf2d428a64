//! Random fault schedules at scale: thousands of generated deployments of
//! every strategy (rolling, recreate, blue-green, canary), some killed at a
//! random journal record and then resumed or rolled back (a resume refused
//! because the killed run had begun to roll back is rolled back instead, as
//! the refusal says), on random small
//! fleets with faults on every kind of driver call (transient and
//! permanent), slow drains, and noisy or missing canary metrics.
//!
//! After each, the invariants: capacity never below the strategy's promise,
//! no traffic to a stopped or unready instance, one release at the end (or
//! a named unrecoverable instance), the report matching the fleet, and the
//! journal read back from disk telling the same story as the report.
//!
//! A case is a seed: the same seed builds the same schedule. A failure
//! prints its seed and schedule; `DEPLOYKIT_SCHEDULE_SEED=<seed>` replays
//! one, and seeds listed in `tests/it/schedules-regressions.txt` are
//! replayed before the generated ones. `DEPLOYKIT_SCHEDULE_BASE` moves the
//! generated range (default: the same range every run, so CI is
//! repeatable).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use deploykit::{CountOrPercent, InstanceId, Metric, Observation, OutcomeKind, Report, StrategyKind};
use deploykit_testkit::{Fault, Op};
use futures::FutureExt as _;

use crate::crash::{block_on, v, widest_stage, How, World};

thread_local! {
    /// Resumes refused because the killed run had begun to roll back, and
    /// rolled back instead, in this shard (each runs on its own thread).
    static ROLLED_BACK_INSTEAD: Cell<u64> = const { Cell::new(0) };
}

/// SplitMix64: a seed determines the whole schedule, with no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// Noise in `[-1, 1)` for `(seed, key, tick)`, the same on every call.
fn noise(seed: u64, key: u64, tick: u64) -> f64 {
    let mut r = Rng(seed ^ key.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ tick.wrapping_mul(0x9E37_79B9));
    (r.next() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

const OPS: [Op; 9] = [
    Op::Stop,
    Op::ForceStop,
    Op::Install,
    Op::Restore,
    Op::Start,
    Op::Health,
    Op::Drain,
    Op::Enable,
    Op::Disable,
];

fn fault(rng: &mut Rng) -> Fault {
    match rng.range(0, 5) {
        0 => Fault::Always,
        1 => Fault::NewRelease,
        2 => Fault::OnCall(rng.range(1, 3) as u32),
        3 => Fault::FromCall(rng.range(1, 3) as u32),
        _ => Fault::Transient(rng.range(1, 3) as u32),
    }
}

/// A schedule ready to run: the world with its faults scripted, and what
/// was scripted, for the failure message.
struct Case {
    world: World,
    kind: StrategyKind,
    /// The strategy's capacity promise: the most instances out of rotation
    /// at once.
    bound: usize,
    /// Kill the deployment after this journal record, then recover so.
    kill: Option<(u64, How)>,
    script: Vec<String>,
}

fn build(seed: u64, kind: StrategyKind) -> Case {
    let mut rng = Rng(seed);
    let n = rng.range(1, 4) as usize;
    // Drawn first so the rest of the schedule may depend on it.
    let killed = rng.chance(35);
    let batch = rng.range(1, n as u64) as usize;
    let world = World::new(kind, n, batch);
    let mut script = vec![format!("{kind}, {n} instance(s) per group, batch {batch}")];
    let budget = rng.range(0, 2) as usize;
    // Rebuilding the strategies keeps the world's other choices.
    let mut world = world;
    world.strategies.rolling.max_failures = CountOrPercent::Count(budget);
    script.push(format!("failure budget {budget}"));
    let ids: Vec<InstanceId> = world
        .fleet
        .instances()
        .iter()
        .map(|i| i.backend().id.clone())
        .collect();

    // Faults on instance and per-backend load-balancer calls.
    for _ in 0..rng.range(0, 3) {
        let id = ids[rng.range(0, ids.len() as u64 - 1) as usize].clone();
        let op = rng.pick(&OPS);
        let f = fault(&mut rng);
        script.push(format!("{id}: {op:?} fails {f:?}"));
        let _ = world.fleet.clone().fault(id.as_str(), op, f);
    }
    // Slow drains, some beyond the 30 s drain timeout.
    if rng.chance(30) {
        let id = ids[rng.range(0, ids.len() as u64 - 1) as usize].clone();
        let (conns, secs) = (rng.range(1, 5), rng.range(1, 45));
        script.push(format!("{id}: {conns} connection(s) draining in {secs}s"));
        let _ = world
            .fleet
            .clone()
            .connections(id.as_str(), conns, Duration::from_secs(secs));
    }
    // Group-level calls: switches, weights, the live record.
    match kind {
        StrategyKind::BlueGreen => {
            if rng.chance(20) {
                let f = match rng.range(0, 2) {
                    0 => Fault::Transient(rng.range(1, 2) as u32),
                    1 => Fault::OnCall(rng.range(1, 2) as u32),
                    _ => Fault::Always,
                };
                script.push(format!("switch fails {f:?}"));
                let _ = world.fleet.clone().fail_switch(f);
            }
            // A live record that cannot be saved makes reconciling refuse,
            // which the recovery here does not script: plain runs only.
            if rng.chance(10) && !killed {
                let f = match rng.range(0, 1) {
                    0 => Fault::Transient(1),
                    _ => Fault::OnCall(rng.range(1, 3) as u32),
                };
                script.push(format!("live record save fails {f:?}"));
                let _ = world.store.clone().fail_save(f);
            }
        }
        StrategyKind::Canary => {
            if rng.chance(20) {
                let f = match rng.range(0, 1) {
                    0 => Fault::Transient(rng.range(1, 2) as u32),
                    _ => Fault::OnCall(rng.range(1, 4) as u32),
                };
                script.push(format!("set_weights fails {f:?}"));
                let _ = world.fleet.clone().fail_weights(f);
            }
            // Metric noise, gaps and sometimes a bad canary; a gap starts
            // after the first check, since no data before it is refused up
            // front (monitoring before deploy), touching nothing.
            let gap = rng.chance(15).then(|| rng.range(1, 4));
            let bad_from = rng.chance(20).then(|| rng.range(0, 150));
            script.push(format!(
                "metrics: noisy, no data in check {gap:?}, canary errors from {bad_from:?}s"
            ));
            for (k, group) in ["stable", "canary"].into_iter().enumerate() {
                let canary = group == "canary";
                let _ = world
                    .metrics
                    .clone()
                    .script(group, Metric::ErrorRate, move |t| {
                        let tick = t.as_secs() / 30;
                        if gap == Some(tick) {
                            return Observation::NoData;
                        }
                        if canary && bad_from.is_some_and(|b| t.as_secs() >= b) {
                            return Observation::Value(0.08);
                        }
                        Observation::Value(0.001 * (1.0 + 0.5 * noise(seed, k as u64, tick)))
                    })
                    .script(group, Metric::LatencyP99, move |t| {
                        let tick = t.as_secs() / 30;
                        Observation::Value(0.12 * (1.0 + 0.3 * noise(seed, 10 + k as u64, tick)))
                    });
            }
        }
        _ => {}
    }
    let bound = match kind {
        StrategyKind::Rolling => batch,
        // Recreate promises no capacity: it stops everything.
        StrategyKind::Recreate => n,
        // The live environment keeps all its instances.
        StrategyKind::BlueGreen => 0,
        // One canary, then stable instances one at a time.
        _ => 1,
    };
    let kill = killed.then(|| {
        let how = if rng.chance(50) {
            How::Resume
        } else {
            How::Rollback
        };
        (rng.range(1, 60), how)
    });
    if let Some((k, how)) = kill {
        script.push(format!("killed after record {k}, then {how:?}"));
    }
    Case {
        world,
        kind,
        bound,
        kill,
        script,
    }
}

/// Every instance of a group with traffic serves `release`.
fn one_release(case: &Case, release: &str) -> Result<(), String> {
    let fleet = &case.world.fleet;
    let weights = fleet.load_balancer().weights();
    for i in fleet.instances() {
        let b = i.backend();
        let live = weights
            .as_ref()
            .is_none_or(|w| w.get(&b.group).copied().unwrap_or(0) > 0);
        let id = b.id.as_str();
        // Canary: the stable group serves; the canary instance is retired.
        let serves = match case.kind {
            StrategyKind::Canary => b.group.as_str() == "stable",
            _ => live,
        };
        if serves && fleet.serving_release(id) != Some(v(release)) {
            return Err(format!(
                "{id} serves {:?}, not {release}",
                fleet.serving_release(id).map(|r| r.to_string())
            ));
        }
    }
    Ok(())
}

/// The journal on disk tells the report's story.
fn journal_agrees(case: &Case, report: &Report) -> Result<(), String> {
    let latest = case
        .world
        .state
        .latest()
        .map_err(|e| format!("reading the journal: {e}"))?
        .ok_or("no journal")?;
    let fin = latest.finished.as_ref().ok_or("the journal is not finished")?;
    if fin.outcome != report.outcome {
        return Err(format!(
            "journal outcome {:?}, report {:?}",
            fin.outcome, report.outcome
        ));
    }
    let mut finished = None;
    let mut unrecoverable = BTreeSet::new();
    for e in &latest.events {
        match &e.kind {
            deploykit::EventKind::DeploymentFinished {
                outcome,
                succeeded,
                failed,
                ..
            } if finished.is_none() => finished = Some((*outcome, *succeeded, *failed)),
            deploykit::EventKind::InstanceUnrecoverable { instance, .. } => {
                unrecoverable.insert(instance.clone());
            }
            _ => {}
        }
    }
    let want = (report.outcome, report.succeeded().len(), report.failed().len());
    // Blue-green journals its runs (prepare, switch, retire) one after the
    // other: its outcome record speaks for them.
    if case.kind != StrategyKind::BlueGreen && finished != Some(want) {
        return Err(format!("journal's finish event {finished:?}, report {want:?}"));
    }
    let reported: BTreeSet<InstanceId> = report.unrecoverable().into_iter().cloned().collect();
    if unrecoverable != reported {
        return Err(format!(
            "journal names {unrecoverable:?} unrecoverable, the report {reported:?}"
        ));
    }
    Ok(())
}

/// The capacity promise of a run that ended as `report` says: canary and
/// recreate abort by restoring every changed instance at once.
fn rollback_bound(case: &Case, report: &Report) -> usize {
    let aborted = matches!(
        report.outcome,
        OutcomeKind::RolledBack | OutcomeKind::RollbackFailed
    );
    if aborted && case.kind == StrategyKind::Canary {
        case.world.fleet.instances().len()
    } else {
        case.bound
    }
}

/// Checks a finished run's report against the fleet, its promise, and the
/// journal.
fn check_finished(case: &Case, report: &Report, bound: usize, full: bool, to: &str) -> Result<(), String> {
    // A resume that aborts undoes the whole deployment, the killed run's
    // part too.
    let plain = full && to == "v2";
    let inv = if full {
        case.world.fleet.check(report, bound)
    } else {
        case.world.fleet.check_traffic(bound)
    };
    if !inv.is_ok() {
        let list: Vec<String> = inv.violations.iter().map(|v| v.to_string()).collect();
        return Err(list.join("; "));
    }
    match report.outcome {
        OutcomeKind::Succeeded => one_release(case, to)?,
        OutcomeKind::RolledBack if plain => one_release(case, "v1")?,
        // The checker has matched the failed and unrecoverable instances; a
        // recovery run that rolled back undid only its own changes.
        OutcomeKind::RolledBack | OutcomeKind::Degraded | OutcomeKind::RollbackFailed => {}
    }
    journal_agrees(case, report)
}

/// Runs one schedule; `Err` says what broke.
fn run(seed: u64, kind: StrategyKind) -> Result<(), String> {
    block_on(async {
        let case = build(seed, kind);
        let w = &case.world;
        let kill_after = case.kill.map_or(u64::MAX, |(k, _)| k);
        let (plan, _, report) = w.deploy(kill_after).await;
        if let Some(report) = report {
            // Not killed (or killed after the run ended): a plain run.
            let bound = rollback_bound(&case, &report);
            return check_finished(&case, &report, bound, true, "v2");
        }
        let (_, asked) = case.kill.expect("killed only when asked");
        // A run killed after it began to roll back refuses to resume ("roll
        // back to finish it"): the rollback it asks for must then finish it.
        let recovered = AssertUnwindSafe(w.recover_as_told(asked)).catch_unwind().await;
        let (how, report, rplan) = match recovered {
            Ok(r) => {
                if r.0 != asked {
                    ROLLED_BACK_INSTEAD.set(ROLLED_BACK_INSTEAD.get() + 1);
                }
                r
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                // A refusal touches nothing: the traffic invariants of what
                // the killed run left must hold.
                if msg.contains("Refused(") {
                    let inv = w.fleet.check_traffic(widest_stage(&plan).max(case.bound));
                    if inv.is_ok() {
                        return Ok(());
                    }
                }
                return Err(format!("the {asked:?} failed: {msg}"));
            }
        };
        let Some(report) = report else {
            // A blue-green deployment that had switched: nothing to do.
            return one_release(&case, "v2");
        };
        // The kill leaves at most one stage's instances out, and the
        // recovery takes at most one of its own stages out at once.
        let bound = widest_stage(&plan) + rplan.as_ref().map(widest_stage).unwrap_or(0);
        // A rollback's and blue-green's reports speak of their own runs:
        // the traffic history is checked, and what each instance serves.
        let full = how == How::Resume && kind != StrategyKind::BlueGreen;
        let to = match how {
            How::Resume => "v2",
            How::Rollback => "v1",
        };
        check_finished(
            &case,
            &report,
            bound.max(rollback_bound(&case, &report)),
            full,
            to,
        )
    })
}

fn describe(seed: u64, kind: StrategyKind) -> String {
    build(seed, kind).script.join("\n  ")
}

/// With `DEPLOYKIT_SCHEDULE_TRACE` set, a replayed seed prints every driver
/// call and routing change of its fleet.
fn trace(seed: u64, kind: StrategyKind) {
    if std::env::var_os("DEPLOYKIT_SCHEDULE_TRACE").is_none() {
        return;
    }
    block_on(async {
        let case = build(seed, kind);
        let w = &case.world;
        let kill_after = case.kill.map_or(u64::MAX, |(k, _)| k);
        let (_, _, report) = w.deploy(kill_after).await;
        if let Some(r) = report {
            eprintln!("{r}");
        } else if let Some((_, how)) = case.kill {
            let (how, r, _) = w.recover_as_told(how).await;
            if let Some(r) = r {
                eprintln!("recovery ({how:?}):\n{r}");
            }
        }
        for o in w.fleet.ops() {
            eprintln!("{:?} {} {:?} ok={}", o.at, o.instance, o.op, o.ok);
        }
        for r in w.fleet.routing_history() {
            eprintln!("{:?} {:?}", r.at, r.change);
        }
    });
}

/// The kinds a seed may run, from its low bits.
fn kind_of(seed: u64) -> StrategyKind {
    [
        StrategyKind::Rolling,
        StrategyKind::Recreate,
        StrategyKind::BlueGreen,
        StrategyKind::Canary,
    ][((seed >> 2) % 4) as usize]
}

fn regressions() -> Vec<u64> {
    include_str!("schedules-regressions.txt")
        .lines()
        .filter_map(|l| l.split('#').next())
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|s| s.trim().parse().ok())
}

/// Runs the regression seeds of this shard, then `count` generated seeds;
/// panics listing the failing seeds (at most 5) with their schedules.
fn shard(shard: u64, shards: u64, count: u64) {
    if let Some(seed) = env_u64("DEPLOYKIT_SCHEDULE_SEED") {
        if seed % shards == shard {
            if let Err(e) = run(seed, kind_of(seed)) {
                trace(seed, kind_of(seed));
                panic!("seed {seed}: {e}\n  {}", describe(seed, kind_of(seed)));
            }
        }
        return;
    }
    let base = env_u64("DEPLOYKIT_SCHEDULE_BASE").unwrap_or(0x5EED_0000);
    let generated = (0..count).map(|i| base + i * shards + shard);
    let seeds = regressions()
        .into_iter()
        .filter(|s| s % shards == shard)
        .chain(generated);
    let mut failures = Vec::new();
    let mut ran = 0u64;
    let started = std::time::Instant::now();
    for seed in seeds {
        ran += 1;
        if let Err(e) = run(seed, kind_of(seed)) {
            failures.push(format!("seed {seed}: {e}\n  {}", describe(seed, kind_of(seed))));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    let instead = ROLLED_BACK_INSTEAD.get();
    eprintln!(
        "schedules shard {shard}: {ran} run in {:.1}s ({instead} resume(s) refused as rolling back, rolled back instead)",
        started.elapsed().as_secs_f64(),
    );
    assert!(
        failures.is_empty(),
        "{} of {ran} schedules failed (replay one with DEPLOYKIT_SCHEDULE_SEED=<seed>; keep it in tests/it/schedules-regressions.txt):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // About ten of each shard's 2,500 schedules are killed after their
    // canary began to roll back and asked to resume: the path must be run.
    assert!(
        count < PER_SHARD || instead > 0,
        "no schedule of shard {shard} reached a resume refused as rolling back"
    );
}

// Four shards so the test threads share the 10,000 schedules; each seed's
// low bits pick the strategy, so each shard runs every strategy.
const SHARDS: u64 = 4;
const PER_SHARD: u64 = 2_500;

#[test]
fn random_fault_schedules_shard_0() {
    shard(0, SHARDS, PER_SHARD);
}

#[test]
fn random_fault_schedules_shard_1() {
    shard(1, SHARDS, PER_SHARD);
}

#[test]
fn random_fault_schedules_shard_2() {
    shard(2, SHARDS, PER_SHARD);
}

#[test]
fn random_fault_schedules_shard_3() {
    shard(3, SHARDS, PER_SHARD);
}

/// Engine bugs the schedules found, each replayed as a fixed scenario.
mod found {
    use deploykit::{OutcomeKind, StrategyKind};
    use deploykit_testkit::{Fault, Op};

    use crate::crash::{block_on, How, World};

    /// A restore after a start that failed every retry used to re-enable the
    /// instance unprobed ("may be running"), sending traffic to a stopped
    /// process. Here the instance is also one the killed run left stopped,
    /// so either fix (probing after a failed start, or the unsettled
    /// instances of `RunOptions`) makes the restore start and probe it; the
    /// test fails only without both.
    #[test]
    fn a_restore_after_a_failed_start_probes_before_enabling() {
        block_on(async {
            let w = World::new(StrategyKind::Recreate, 3, 2);
            let _ = w
                .fleet
                .clone()
                .fault("i-1", Op::Start, Fault::Transient(3))
                .fault("i-1", Op::ForceStop, Fault::Always);
            let (_, _, report) = w.deploy(12).await;
            assert!(report.is_none(), "killed");
            let (report, _) = w.recover(How::Rollback).await;
            let report = report.expect("a rollback run");
            assert_eq!(w.fleet.routing_violations(), Vec::<String>::new(), "{report}");
            assert!(w.fleet.is_running("i-1"), "{report}");
            assert!(w.fleet.in_rotation("i-1"), "{report}");
        });
    }

    /// A recovery run used to take an instance the killed run left stopped
    /// for untouched (running, in rotation); when its first step failed,
    /// the restore only re-enabled it, stopped.
    #[test]
    fn a_recovery_restores_an_instance_the_killed_run_left_stopped() {
        block_on(async {
            let w = World::new(StrategyKind::Recreate, 1, 1);
            let _ = w.fleet.clone().fault("i-1", Op::Drain, Fault::NewRelease).fault(
                "i-1",
                Op::Stop,
                Fault::OnCall(1),
            );
            let (_, _, report) = w.deploy(17).await;
            assert!(report.is_none(), "killed");
            let (report, _) = w.recover(How::Rollback).await;
            let report = report.expect("a rollback run");
            assert_eq!(w.fleet.routing_violations(), Vec::<String>::new(), "{report}");
            let inv = w.fleet.check_traffic(1);
            assert!(inv.is_ok(), "{:?}\n{report}", inv.violations);
        });
    }

    /// When the switch to green succeeded but recording it and switching
    /// back both failed, the rollback used to stop the green instances that
    /// still took all the traffic.
    #[test]
    fn a_failed_switch_back_leaves_the_live_environment_running() {
        block_on(async {
            let w = World::new(StrategyKind::BlueGreen, 3, 1);
            let _ = w.fleet.clone().fail_switch(Fault::OnCall(2));
            let _ = w.store.clone().fail_save(Fault::OnCall(2));
            let (_, _, report) = w.deploy(u64::MAX).await;
            let report = report.expect("not killed");
            assert_eq!(report.outcome, OutcomeKind::RollbackFailed, "{report}");
            assert_eq!(
                w.fleet.live_group().map(|g| g.to_string()).as_deref(),
                Some("green")
            );
            for id in ["i-4", "i-5", "i-6"] {
                assert!(w.fleet.is_running(id), "{id} takes the traffic:\n{report}");
            }
            assert_eq!(w.fleet.routing_violations(), Vec::<String>::new(), "{report}");
            w.fleet.check(&report, 0).assert_ok();
        });
    }
}
