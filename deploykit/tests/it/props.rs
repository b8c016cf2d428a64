//! Property test: random fleets, batch sizes, budgets and fault schedules;
//! every deployment keeps the invariants of the testkit's checker.

use std::sync::Arc;
use std::time::Duration;

use deploykit::{CountOrPercent, Executor, OutcomeKind, ReleaseId, Rolling, RunOptions, Strategy as _};
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

fn run(case: &Case) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut fleet = FakeFleet::new(case.instances);
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
        let batch = strategy.resolved_batch(case.instances);
        let budget = case.budget.of(case.instances);
        let report = exec.run(&plan, RunOptions::default()).await.unwrap();
        let inv = fleet.check(&report, batch);
        prop_assert!(inv.is_ok(), "{:?}\n{report}", inv.violations);
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn random_rollouts_keep_the_invariants(case in case()) {
        run(&case)?;
    }
}
