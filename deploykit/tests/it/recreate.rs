//! Recreate engine scenarios, in virtual time.

use deploykit::{InstanceStatus, OutcomeKind};
use deploykit_testkit::{FakeFleet, Op};

use crate::util::{recreate, setup, v};

#[tokio::test(start_paused = true)]
async fn recreate_stops_all_then_starts_all() {
    let s = setup(FakeFleet::new(4));
    let report = s.deploy(&recreate(), "v2").await;
    assert!(report.is_success(), "{report}");
    assert!(s.fleet.releases().values().all(|r| r == &v("v2")));
    // Every instance is out of rotation at once: the downtime the strategy is known for.
    let inv = s.fleet.check(&report, 4);
    inv.assert_ok();
    assert_eq!(inv.peak_out_of_rotation, 4);
    // All stops happen before any install.
    let ops = s.fleet.ops();
    let last_stop = ops
        .iter()
        .filter(|o| o.op == Op::Stop)
        .map(|o| o.at)
        .max()
        .unwrap();
    let first_install = ops
        .iter()
        .filter(|o| o.op == Op::Install)
        .map(|o| o.at)
        .min()
        .unwrap();
    assert!(last_stop <= first_install);
    let stop_idx = ops.iter().rposition(|o| o.op == Op::Stop).unwrap();
    let install_idx = ops.iter().position(|o| o.op == Op::Install).unwrap();
    assert!(stop_idx < install_idx);
}

#[tokio::test(start_paused = true)]
async fn any_failure_rolls_every_instance_back() {
    let s = setup(FakeFleet::new(4).fail_health("i-3"));
    let report = s.deploy(&recreate(), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    assert!(s.fleet.releases().values().all(|r| r == &v("v1")));
    for i in &report.instances {
        let want = if i.id.as_str() == "i-3" {
            InstanceStatus::FailedRestored
        } else {
            InstanceStatus::RolledBack
        };
        assert_eq!(i.status, want, "{}", i.id);
        assert!(s.fleet.in_rotation(i.id.as_str()) && s.fleet.is_running(i.id.as_str()));
    }
    s.assert_invariants(&report, 4);
}

#[tokio::test(start_paused = true)]
async fn install_failure_rolls_back_before_anything_starts() {
    let s = setup(FakeFleet::new(3).fail_install("i-2"));
    let report = s.deploy(&recreate(), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    assert!(s.fleet.releases().values().all(|r| r == &v("v1")));
    // Start was only called by the rollback (once per instance).
    for id in ["i-1", "i-2", "i-3"] {
        assert_eq!(s.fleet.calls(id, Op::Start), 1, "{id}");
    }
    s.assert_invariants(&report, 3);
}
