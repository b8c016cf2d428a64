//! Property test: random fleets, batch sizes, budgets and fault schedules;
//! every deployment keeps the invariants of the testkit's checker, with the
//! batch and the failure budget worked out here from the documented rules
//! (not with the strategy's own arithmetic), unfaulted instances end
//! updated unless the deployment rolled back, and slow drains are waited
//! for.

use std::sync::Arc;
use std::time::Duration;

use std::collections::BTreeSet;

use deploykit::{
    CountOrPercent, Executor, InstanceStatus, OutcomeKind, ReleaseId, Rolling, RunOptions, Strategy as _,
};
use deploykit_testkit::{FakeFleet, Fault, Op};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    instances: usize,
    batch: CountOrPercent,
    budget: CountOrPercent,
    faults: Vec<(usize, Op, Fault)>,
    slow_drains: Vec<(usize, u64)>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::Stop),
        Just(Op::ForceStop),
        Just(Op::Install),
        Just(Op::Restore),
        Just(Op::Start),
        Just(Op::Health),
        Just(Op::Drain),
        Just(Op::Enable),
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        Just(Fault::Always),
        Just(Fault::NewRelease),
        (1u32..4).prop_map(Fault::OnCall),
        (1u32..4).prop_map(Fault::FromCall),
        (1u32..4).prop_map(Fault::Transient),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (1usize..=200).prop_flat_map(|n| {
        let batch = prop_oneof![
            (1usize..=n.min(50)).prop_map(CountOrPercent::Count),
            (1u8..=100).prop_map(CountOrPercent::Percent),
        ];
        let budget = prop_oneof![
            (0usize..4).prop_map(CountOrPercent::Count),
            (0u8..=50).prop_map(CountOrPercent::Percent),
        ];
        let faults = prop::collection::vec((0..n, op(), fault()), 0..=(n / 4).clamp(1, 12));
        let slow = prop::collection::vec((0..n, 1u64..60), 0..3);
        (Just(n), batch, budget, faults, slow).prop_map(|(instances, batch, budget, faults, slow_drains)| {
            Case {
                instances,
                batch,
                budget,
                faults,
                slow_drains,
            }
        })
    })
}

/// The documented batch: a count as given, a percent of the fleet rounded
/// down but at least 1; never more than the fleet.
fn expected_batch(case: &Case) -> usize {
    let n = case.instances;
    let b = match case.batch {
        CountOrPercent::Count(c) => c,
        CountOrPercent::Percent(p) => (n * p as usize / 100).max(1),
    };
    b.min(n)
}

/// The documented budget: a count as given, or a percent of the instances
/// being updated (all of them here), rounded down.
fn expected_budget(case: &Case) -> usize {
    match case.budget {
        CountOrPercent::Count(c) => c,
        CountOrPercent::Percent(p) => case.instances * p as usize / 100,
    }
}

/// The executor's default drain timeout, which the strategy here keeps.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn run(case: &Case) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        // A start takes a (virtual) second, so the instances of a batch are
        // out of rotation together.
        let mut fleet = FakeFleet::new(case.instances).latency(Op::Start, Duration::from_secs(1));
        for (i, op, f) in &case.faults {
            fleet = fleet.fault(&format!("i-{}", i + 1), *op, f.clone());
        }
        for (i, secs) in &case.slow_drains {
            fleet = fleet.connections(&format!("i-{}", i + 1), 2, Duration::from_secs(*secs));
        }
        let exec = Executor::builder()
            .instances(fleet.instances())
            .load_balancer(Arc::new(fleet.load_balancer()))
            .build()
            .unwrap();
        let strategy = Rolling {
            batch_size: case.batch,
            max_failures: case.budget,
            ..Rolling::default()
        };
        let release = ReleaseId::new("v2").unwrap();
        let plan = strategy.plan(&exec.snapshot().await.unwrap(), &release).unwrap();
        let batch = expected_batch(case);
        let budget = expected_budget(case);
        let report = exec.run(&plan, RunOptions::default()).await.unwrap();
        let inv = fleet.check(&report, batch);
        prop_assert!(inv.is_ok(), "{:?}\n{report}", inv.violations);
        if case.faults.is_empty() {
            // Without faults every batch but the last is full.
            prop_assert_eq!(inv.peak_out_of_rotation, batch, "{}", report);
        }

        // Unfaulted instances end on v2, serving it, unless the deployment
        // rolled back (then on v1).
        let faulted: BTreeSet<usize> = case.faults.iter().map(|(i, _, _)| *i).collect();
        for i in (0..case.instances).filter(|i| !faulted.contains(i)) {
            let id = format!("i-{}", i + 1);
            let line = report.instances.iter().find(|r| r.id.as_str() == id).unwrap();
            let want = match report.outcome {
                OutcomeKind::Succeeded | OutcomeKind::Degraded => {
                    prop_assert_eq!(line.status, InstanceStatus::Updated, "{}: {}", id, report);
                    "v2"
                }
                OutcomeKind::RolledBack => "v1",
                // A failed rollback may strand any instance; the checker
                // has checked what it reports.
                OutcomeKind::RollbackFailed => continue,
            };
            prop_assert_eq!(fleet.serving_release(&id), Some(v(want)), "{}: {}", id, report);
        }

        // A slow drain is waited for: the stop comes once its connections
        // closed, or at the drain timeout, not before.
        let ops = fleet.ops();
        // The last scripting of an instance's connections is the one it has.
        let slow: std::collections::BTreeMap<usize, u64> = case.slow_drains.iter().copied().collect();
        for (i, secs) in &slow {
            let id = format!("i-{}", i + 1);
            let mine: Vec<_> = ops.iter().filter(|o| o.instance.as_str() == id).collect();
            let Some(drain) = mine.iter().find(|o| o.op == Op::Drain && o.ok) else {
                continue;
            };
            let waited = Duration::from_secs(*secs).min(DRAIN_TIMEOUT);
            if let Some(stop) = mine
                .iter()
                .find(|o| matches!(o.op, Op::Stop | Op::ForceStop) && o.at >= drain.at)
            {
                prop_assert!(
                    stop.at >= drain.at + waited,
                    "{} stopped {:?} after its drain, before its {:?} drain\n{}",
                    id,
                    stop.at - drain.at,
                    waited,
                    report
                );
            }
        }
        let failed = report.failed().len();
        match report.outcome {
            OutcomeKind::Succeeded => prop_assert_eq!(failed, 0),
            OutcomeKind::Degraded => prop_assert!((1..=budget).contains(&failed), "{report}"),
            OutcomeKind::RolledBack => prop_assert!(failed > budget, "{report}"),
            OutcomeKind::RollbackFailed => prop_assert!(!report.unrecoverable().is_empty()),
        }
        prop_assert_eq!(report.instances.len(), case.instances);
        Ok(())
    })
}

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_rollouts_keep_the_invariants(case in case()) {
        run(&case)?;
    }
}
