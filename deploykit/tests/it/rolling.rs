//! Rolling engine scenarios, in virtual time.

use std::collections::BTreeMap;
use std::time::Duration;

use deploykit::{
    CountOrPercent, Error, EventKind, Executor, FailurePolicy, HealthCheck, InstanceStatus, OutcomeKind,
    Rolling, RunOptions, StepResult, Strategy,
};
use deploykit_testkit::{FakeFleet, Fault, Op};
use tokio_util::sync::CancellationToken;

use crate::util::{rolling, secs, setup, setup_with, v};

#[tokio::test(start_paused = true)]
async fn healthy_rollout_updates_every_instance_in_batches() {
    let s = setup(FakeFleet::new(8).latency(Op::Install, secs(5)));
    let report = s.deploy(&rolling(2, 1), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{report}");
    assert_eq!(report.succeeded().len(), 8);
    assert!(report.failed().is_empty());
    assert!(s.fleet.releases().values().all(|r| r == &v("v2")));
    let inv = s.fleet.check(&report, 2);
    inv.assert_ok();
    assert_eq!(inv.peak_out_of_rotation, 2, "batches of 2 take 2 out at once");

    // The two instances of a batch are installed concurrently, batches in sequence.
    let installs: BTreeMap<String, Duration> = s
        .fleet
        .ops()
        .into_iter()
        .filter(|o| o.op == Op::Install)
        .map(|o| (o.instance.to_string(), o.at))
        .collect();
    assert_eq!(installs["i-1"], installs["i-2"]);
    assert_eq!(installs["i-3"], installs["i-4"]);
    assert!(installs["i-3"] > installs["i-2"]);
    // Stabilisation (the health interval, 10 s) between batches, plus 5 s of install.
    assert_eq!(installs["i-3"] - installs["i-1"], secs(15));
}

#[tokio::test(start_paused = true)]
async fn each_instance_is_drained_stopped_installed_started_checked_and_enabled_in_order() {
    let s = setup(FakeFleet::new(1));
    let report = s.deploy(&Rolling::default(), "v2").await;
    assert!(report.is_success());
    let ops: Vec<Op> = s.fleet.ops().into_iter().map(|o| o.op).collect();
    assert_eq!(
        ops,
        [
            Op::Drain,
            Op::Stop,
            Op::Install,
            Op::Start,
            Op::Health,
            Op::Enable
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn failure_in_batch_two_within_budget_is_degraded_not_success() {
    let s = setup(FakeFleet::new(6).fail_health("i-3"));
    let report = s.deploy(&rolling(2, 1), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::Degraded, "{report}");
    assert!(!report.is_success());
    let failed: Vec<String> = report.failed().iter().map(|i| i.to_string()).collect();
    assert_eq!(failed, ["i-3"]);
    let i3 = report.instances.iter().find(|i| i.id.as_str() == "i-3").unwrap();
    assert_eq!(i3.status, InstanceStatus::FailedRestored);
    assert!(i3.error.as_deref().unwrap().contains("await_healthy"), "{i3:?}");
    // The failed instance is restored to v1, started and back in rotation.
    assert_eq!(s.fleet.release_of("i-3"), Some(v("v1")));
    assert!(s.fleet.is_running("i-3") && s.fleet.in_rotation("i-3"));
    // The rest carried on to v2, including batch 3.
    for id in ["i-1", "i-2", "i-4", "i-5", "i-6"] {
        assert_eq!(s.fleet.release_of(id), Some(v("v2")), "{id}");
    }
    // The summary names the counts and the instance left behind.
    let text = report.to_string();
    assert!(text.contains("succeeded: 5  failed: 1"), "{text}");
    assert!(text.contains("i-3: failed, restored, on v1"), "{text}");
    s.assert_invariants(&report, 2);
}

#[tokio::test(start_paused = true)]
async fn failures_beyond_budget_abort_and_roll_everything_back() {
    let s = setup(FakeFleet::new(6).fail_health("i-3").fail_start("i-4"));
    let report = s.deploy(&rolling(2, 1), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    assert!(report.reason.as_deref().unwrap().contains("failure budget of 1"));
    // Batch 1 had moved to v2 and is rolled back; the fleet is on one version.
    assert!(
        s.fleet.releases().values().all(|r| r == &v("v1")),
        "{:?}",
        s.fleet.releases()
    );
    let status: BTreeMap<String, InstanceStatus> = report
        .instances
        .iter()
        .map(|i| (i.id.to_string(), i.status))
        .collect();
    assert_eq!(status["i-1"], InstanceStatus::RolledBack);
    assert_eq!(status["i-3"], InstanceStatus::FailedRestored);
    assert_eq!(status["i-5"], InstanceStatus::Untouched);
    // Batch 3 was never touched.
    assert_eq!(s.fleet.calls("i-5", Op::Drain), 0);
    assert_eq!(s.fleet.calls("i-6", Op::Install), 0);
    let kinds: Vec<_> = s.events().into_iter().map(|e| e.kind).collect();
    assert!(kinds
        .iter()
        .any(|k| matches!(k, EventKind::RollbackStarted { instances, .. } if instances.len() == 2)));
    s.assert_invariants(&report, 2);
}

#[tokio::test(start_paused = true)]
async fn zero_budget_aborts_on_first_failure() {
    let s = setup(FakeFleet::new(4).fail_install("i-2"));
    let report = s.deploy(&rolling(1, 0), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    assert!(s.fleet.releases().values().all(|r| r == &v("v1")));
    assert_eq!(s.fleet.calls("i-3", Op::Drain), 0);
    s.assert_invariants(&report, 1);
}

#[tokio::test(start_paused = true)]
async fn percent_budget_counts_against_instances_updated() {
    // 10 instances, 20 % budget = 2 failures tolerated.
    let fleet = FakeFleet::new(10).fail_health("i-2").fail_health("i-5");
    let s = setup(fleet);
    let strategy = Rolling {
        batch_size: CountOrPercent::Percent(30),
        max_failures: CountOrPercent::Percent(20),
        ..Rolling::default()
    };
    let report = s.deploy(&strategy, "v2").await;
    assert_eq!(report.outcome, OutcomeKind::Degraded, "{report}");
    assert_eq!(report.failed().len(), 2);
    s.assert_invariants(&report, 3);
}

#[tokio::test(start_paused = true)]
async fn drain_waits_for_connections_then_times_out_with_a_warning() {
    let fleet = FakeFleet::new(2)
        .connections("i-1", 7, secs(5)) // drains in 5 s
        .connections("i-2", 3, secs(600)); // never within the timeout
    let s = setup(fleet);
    let report = s.deploy(&rolling(1, 0), "v2").await;
    assert!(report.is_success(), "{report}");
    let ops = s.fleet.ops();
    let at = |id: &str, op: Op| {
        ops.iter()
            .find(|o| o.instance.as_str() == id && o.op == op)
            .unwrap()
            .at
    };
    // Confirmed, not slept: i-1 stops as soon as its connections are gone.
    assert_eq!(at("i-1", Op::Stop) - at("i-1", Op::Drain), secs(5));
    // i-2 waits the full drain timeout (30 s), then proceeds with a warning.
    assert_eq!(at("i-2", Op::Stop) - at("i-2", Op::Drain), secs(30));
    let warnings = s.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("drain timeout") && warnings[0].contains("3 connection(s) left"));
    s.assert_invariants(&report, 1);
}

#[tokio::test(start_paused = true)]
async fn failed_graceful_stop_is_forced() {
    let s = setup(FakeFleet::new(3).fail_stop("i-2"));
    let report = s.deploy(&rolling(1, 0), "v2").await;
    assert!(report.is_success(), "{report}");
    assert_eq!(s.fleet.calls("i-2", Op::ForceStop), 1);
    assert_eq!(s.fleet.calls("i-1", Op::ForceStop), 0);
    let stop = s
        .events()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::StepFinished {
                step,
                instance,
                result,
                ..
            } if step == deploykit::StepKind::Stop
                && instance.as_ref().map(|i| i.as_str()) == Some("i-2") =>
            {
                Some(result)
            }
            _ => None,
        })
        .unwrap();
    assert!(matches!(stop, StepResult::Warning(w) if w.contains("force-stopped")));
    s.assert_invariants(&report, 1);
}

#[tokio::test(start_paused = true)]
async fn failed_force_stop_fails_the_instance_and_restores_it() {
    let fleet = FakeFleet::new(2)
        .fail_stop("i-1")
        .fault("i-1", Op::ForceStop, Fault::OnCall(1));
    let s = setup(fleet);
    let report = s.deploy(&rolling(1, 1), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::Degraded, "{report}");
    assert_eq!(s.fleet.release_of("i-1"), Some(v("v1")));
    assert!(s.fleet.in_rotation("i-1"));
    s.assert_invariants(&report, 1);
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried() {
    let s = setup(FakeFleet::new(2).fault("i-1", Op::Drain, Fault::Transient(2)));
    let report = s.deploy(&rolling(1, 0), "v2").await;
    assert!(report.is_success(), "{report}");
    assert_eq!(s.fleet.calls("i-1", Op::Drain), 3);
    let attempts = s
        .events()
        .into_iter()
        .find_map(|e| match e.kind {
            EventKind::StepFinished {
                step: deploykit::StepKind::Drain,
                attempts,
                ..
            } => Some(attempts),
            _ => None,
        })
        .unwrap();
    assert_eq!(attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn every_retry_is_told_with_the_step_the_instance_and_the_cause() {
    let s = setup(FakeFleet::new(2).fault("i-2", Op::Install, Fault::Transient(1)));
    let report = s.deploy(&rolling(1, 0), "v2").await;
    assert!(report.is_success(), "{report}");
    assert_eq!(s.fleet.calls("i-2", Op::Install), 2);
    let retries: Vec<(Option<String>, String)> = s
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Warning { instance, message } if message.contains("retrying") => {
                Some((instance.map(|i| i.to_string()), message))
            }
            _ => None,
        })
        .collect();
    assert_eq!(retries.len(), 1, "{retries:?}");
    let (instance, message) = &retries[0];
    assert_eq!(instance.as_deref(), Some("i-2"));
    for part in [
        "install of i-2",
        "attempt 1 of 3",
        "scripted Install fault on i-2",
    ] {
        assert!(message.contains(part), "{part:?} missing from {message:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_lb_errors_are_not_retried() {
    let s = setup(FakeFleet::new(2).fail_drain("i-1"));
    let report = s.deploy(&rolling(1, 1), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::Degraded);
    assert_eq!(s.fleet.calls("i-1", Op::Drain), 1);
    // The drain failed before anything changed: i-1 was never stopped.
    assert_eq!(s.fleet.calls("i-1", Op::Stop), 0);
    assert_eq!(s.fleet.release_of("i-1"), Some(v("v1")));
    s.assert_invariants(&report, 1);
}

#[tokio::test(start_paused = true)]
async fn unrestorable_instance_is_kept_out_of_rotation_and_reported() {
    let fleet = FakeFleet::new(3)
        .fail_health("i-2")
        .fault("i-2", Op::Restore, Fault::Always);
    let s = setup(fleet);
    let report = s.deploy(&rolling(1, 1), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::RollbackFailed, "{report}");
    let bad: Vec<String> = report.unrecoverable().iter().map(|i| i.to_string()).collect();
    assert_eq!(bad, ["i-2"]);
    assert!(!s.fleet.in_rotation("i-2"));
    let inv = s.fleet.check(&report, 1);
    inv.assert_ok();
}

#[tokio::test(start_paused = true)]
async fn cancellation_mid_batch_rolls_back() {
    let cancel = CancellationToken::new();
    let s = setup_with(FakeFleet::new(6).latency(Op::Install, secs(20)), cancel.clone());
    let exec = s.exec.clone();
    let strategy = rolling(2, 1);
    let run = tokio::spawn(async move { exec.deploy(&strategy, &v("v2")).await });
    // Batch 1 finishes at 20 s, stabilises until 30 s; batch 2 installs from 30 s to 50 s.
    tokio::time::sleep(secs(40)).await;
    cancel.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    assert_eq!(report.reason.as_deref(), Some("cancelled by the operator"));
    assert!(
        s.fleet.releases().values().all(|r| r == &v("v1")),
        "{:?}",
        s.fleet.releases()
    );
    // Nobody is reported as failed: cancellation is not the instances' fault.
    assert!(report.failed().is_empty());
    // Batch 3 never started.
    assert_eq!(s.fleet.calls("i-5", Op::Drain), 0);
    s.assert_invariants(&report, 2);
}

#[tokio::test(start_paused = true)]
async fn cancellation_cuts_waits_short() {
    let cancel = CancellationToken::new();
    let fleet = FakeFleet::new(2).connections("i-1", 1, secs(3600));
    let s = setup_with(fleet, cancel.clone());
    let exec = s.exec.clone();
    let run = tokio::spawn(async move { exec.deploy(&rolling(1, 0), &v("v2")).await });
    tokio::time::sleep(secs(2)).await;
    let before = tokio::time::Instant::now();
    cancel.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    // The drain wait (30 s) was interrupted; i-1 was never stopped and is back in rotation.
    assert!(before.elapsed() < secs(1), "{:?}", before.elapsed());
    assert_eq!(s.fleet.calls("i-1", Op::Stop), 0);
    assert!(s.fleet.in_rotation("i-1"));
    s.assert_invariants(&report, 1);
}

#[tokio::test(start_paused = true)]
async fn redeploying_the_same_release_is_a_no_op() {
    let s = setup(FakeFleet::new(3).on_release("i-2", "v2"));
    let plan = rolling(1, 0)
        .plan(&s.exec.snapshot().await.unwrap(), &v("v2"))
        .unwrap();
    assert_eq!(plan.skipped, [deploykit::InstanceId::new("i-2").unwrap()]);
    let report = s.exec.run(&plan, RunOptions::default()).await.unwrap();
    assert!(report.is_success());
    assert_eq!(s.fleet.calls("i-2", Op::Drain), 0);
    let ops_before = s.fleet.ops().len();
    let again = s.deploy(&rolling(1, 0), "v2").await;
    assert!(again.is_success());
    assert_eq!(s.fleet.ops().len(), ops_before, "nothing touched the second time");
}

#[tokio::test(start_paused = true)]
async fn the_plan_is_a_value() {
    let s = setup(FakeFleet::new(3));
    let strategy = Rolling {
        batch_size: CountOrPercent::Count(2),
        max_failures: CountOrPercent::Count(0),
        health: HealthCheck {
            retries: 5,
            interval: secs(2),
        },
        drain_timeout: secs(15),
        stabilisation: Some(secs(7)),
    };
    let plan = strategy
        .plan(&s.exec.snapshot().await.unwrap(), &v("v2"))
        .unwrap();
    assert_eq!(plan.policy, FailurePolicy::RestoreInstance { max_failures: 0 });
    let shape: Vec<(String, Vec<Vec<&str>>)> = plan
        .stages
        .iter()
        .map(|st| {
            (
                st.name.clone(),
                st.units
                    .iter()
                    .map(|u| u.steps.iter().map(|s| s.kind().as_str()).collect())
                    .collect(),
            )
        })
        .collect();
    let unit = vec![
        "drain",
        "await_drained",
        "stop",
        "install",
        "start",
        "await_healthy",
        "enable",
    ];
    assert_eq!(
        shape,
        vec![
            ("batch 1/2".to_string(), vec![unit.clone(), unit.clone()]),
            ("stabilise".to_string(), vec![vec!["pause"]]),
            ("batch 2/2".to_string(), vec![unit]),
        ]
    );
    let p = plan.projected_duration();
    assert_eq!(p.min, secs(7));
    assert_eq!(p.max, secs(2 * (15 + 4 * 2) + 7));
    let text = plan.to_string();
    assert!(
        text.contains("i-3 (v1 -> v2): drain i-3 -> await drained i-3 (at most 15s)"),
        "{text}"
    );
    assert!(text.contains("projected duration: 7s to 53s"), "{text}");
    // Serializable for --json and the journal.
    let json = serde_json::to_string(&plan).unwrap();
    let back: deploykit::Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, plan);
}

#[tokio::test(start_paused = true)]
async fn percent_batches_round_down_but_never_below_one() {
    let s = setup(FakeFleet::new(10));
    let snap = s.exec.snapshot().await.unwrap();
    let batches = |p: u8| {
        let r = Rolling {
            batch_size: CountOrPercent::Percent(p),
            ..Rolling::default()
        };
        r.plan(&snap, &v("v2"))
            .unwrap()
            .stages
            .iter()
            .filter(|s| s.name.starts_with("batch"))
            .map(|s| s.units.len())
            .collect::<Vec<_>>()
    };
    assert_eq!(batches(25), [2, 2, 2, 2, 2]);
    assert_eq!(batches(35), [3, 3, 3, 1]);
    assert_eq!(batches(5), [1; 10]);
    assert_eq!(batches(100), [10]);
}

#[tokio::test(start_paused = true)]
async fn bad_input_is_rejected_before_anything_is_touched() {
    let s = setup(FakeFleet::new(3));
    let field = |r: Result<deploykit::Report, Error>| match r {
        Err(Error::InvalidInput { field, message }) => (field, message),
        other => panic!("expected invalid input, got {other:?}"),
    };
    let (f, m) = field(s.exec.deploy(&rolling(0, 1), &v("v2")).await);
    assert_eq!(f, "batch_size");
    assert!(m.contains(">= 1"), "{m}");
    for p in [0u8, 101] {
        let r = Rolling {
            batch_size: CountOrPercent::Percent(p),
            ..Rolling::default()
        };
        let (f, m) = field(s.exec.deploy(&r, &v("v2")).await);
        assert_eq!(f, "batch_size");
        assert!(m.contains(&format!("{p}%")), "{m}");
    }
    let r = Rolling {
        health: HealthCheck {
            retries: 0,
            interval: secs(1),
        },
        ..Rolling::default()
    };
    assert_eq!(field(s.exec.deploy(&r, &v("v2")).await).0, "health.retries");
    assert!(s.fleet.ops().is_empty(), "nothing was touched");

    // Fleet-level errors come from the builder.
    let empty = Executor::builder()
        .load_balancer(std::sync::Arc::new(deploykit::NoLoadBalancer))
        .build();
    assert!(matches!(empty, Err(Error::InvalidInput { ref field, .. }) if field == "instances"));
    let twice = FakeFleet::new(2);
    let dup = Executor::builder()
        .instances(twice.instances())
        .instances(twice.instances())
        .load_balancer(std::sync::Arc::new(twice.load_balancer()))
        .build();
    match dup {
        Err(Error::InvalidInput { field, message }) => {
            assert_eq!(field, "instances");
            assert!(message.contains("i-1 appears more than once"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let no_lb = Executor::builder().instances(twice.instances()).build();
    assert!(matches!(no_lb, Err(Error::InvalidInput { ref field, .. }) if field == "load_balancer"));
    // Ids, budgets and timeouts are checked where they are parsed.
    assert!(
        matches!(deploykit::InstanceId::new("web 1"), Err(Error::InvalidInput { ref field, .. }) if field == "instance id")
    );
    assert!(
        matches!(CountOrPercent::parse("max_failures", "-1"), Err(Error::InvalidInput { ref field, .. }) if field == "max_failures")
    );
    assert!(
        matches!(deploykit::parse_duration("drain_timeout", "soon"), Err(Error::InvalidInput { ref field, .. }) if field == "drain_timeout")
    );
}

#[tokio::test(start_paused = true)]
async fn every_step_start_has_an_end_and_the_stream_is_complete() {
    let s = setup(FakeFleet::new(4).fail_health("i-4"));
    let report = s.deploy(&rolling(2, 0), "v2").await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    let events = s.events();
    assert!(matches!(
        events.first().unwrap().kind,
        EventKind::DeploymentStarted { .. }
    ));
    assert!(matches!(
        events.last().unwrap().kind,
        EventKind::DeploymentFinished {
            outcome: OutcomeKind::RolledBack,
            ..
        }
    ));
    let starts = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::StepStarted { .. }))
        .count();
    let ends = events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::StepFinished { .. }))
        .count();
    assert_eq!(starts, ends);
    assert!(events.windows(2).all(|w| w[0].elapsed_ms <= w[1].elapsed_ms));
    assert!(events.iter().all(|e| e.deployment == report.deployment));
    // Events are JSON lines.
    for e in &events {
        let line = serde_json::to_string(e).unwrap();
        let back: deploykit::Event = serde_json::from_str(&line).unwrap();
        assert_eq!(&back, e);
    }
}

#[tokio::test(start_paused = true)]
async fn a_load_balancer_failing_its_preflight_refuses_before_anything_is_touched() {
    let s = setup(FakeFleet::new(3).fail_preflight(Fault::Always));
    let err = s
        .exec
        .deploy(&rolling(1, 1), &v("v2"))
        .await
        .expect_err("the deployment must not start");
    assert!(matches!(err, Error::Refused(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("fake load balancer failed its preflight check")
            && msg.contains("nothing was touched")
            && msg.contains("scripted preflight fault"),
        "{msg}"
    );
    assert_eq!(s.fleet.preflight_calls(), 1, "a permanent failure is not retried");
    assert!(
        s.fleet.ops().is_empty(),
        "no instance or LB operation: {:?}",
        s.fleet.ops()
    );
    assert!(s.fleet.releases().values().all(|r| r == &v("v1")));
    assert!(s.log.events().is_empty(), "no deployment started, no events");
}

#[tokio::test(start_paused = true)]
async fn a_transient_preflight_failure_is_retried_and_checked_once_per_run() {
    let s = setup(FakeFleet::new(2).fail_preflight(Fault::Transient(2)));
    let report = s.deploy(&rolling(1, 1), "v2").await;
    assert!(report.is_success(), "{report}");
    assert_eq!(
        s.fleet.preflight_calls(),
        3,
        "two transient failures, then success"
    );
    // A second run checks again, once.
    let report = s.deploy(&rolling(1, 1), "v3").await;
    assert!(report.is_success(), "{report}");
    assert_eq!(s.fleet.preflight_calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_recovery_run_goes_on_despite_a_failing_preflight_and_says_so_first() {
    let s = setup(FakeFleet::new(2).fail_preflight(Fault::Always));
    let plan = rolling(1, 1)
        .plan(&s.exec.snapshot().await.unwrap(), &v("v2"))
        .unwrap();
    assert!(matches!(
        s.exec.check(&plan, &RunOptions::default()).await,
        Err(Error::Refused(_))
    ));
    assert_eq!(s.fleet.preflight_calls(), 1);
    assert!(s.exec.check(&plan, &RunOptions::recovery()).await.is_ok());
    assert_eq!(
        s.fleet.preflight_calls(),
        2,
        "a recovery check calls it (a balancer that is not wired would refuse), and passes"
    );
    let report = s
        .exec
        .run(&plan, RunOptions::recovery())
        .await
        .expect("not refused");
    assert_eq!(s.fleet.preflight_calls(), 3, "the run calls it once");
    assert!(report.is_success(), "{report}");
    assert!(s.fleet.releases().values().all(|r| r == &v("v2")));
    let kinds: Vec<EventKind> = s.events().into_iter().map(|e| e.kind).take(2).collect();
    assert!(
        matches!(kinds[0], EventKind::DeploymentStarted { .. }),
        "{kinds:?}"
    );
    match &kinds[1] {
        EventKind::Warning {
            instance: None,
            message,
        } => {
            assert!(message.contains("scripted preflight fault"), "{message}")
        }
        other => panic!("the warning comes right after the start: {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_balancer_that_is_not_wired_refuses_a_recovery_run_too() {
    let s = setup(
        FakeFleet::new(2)
            .fail_preflight(Fault::Always)
            .preflight_failure_kind(deploykit::PreflightFailure::NotWired),
    );
    let plan = rolling(1, 1)
        .plan(&s.exec.snapshot().await.unwrap(), &v("v2"))
        .unwrap();
    for options in [RunOptions::recovery(), RunOptions::default()] {
        let err = s
            .exec
            .check(&plan, &options)
            .await
            .expect_err("refused by the check");
        assert!(matches!(err, Error::Refused(_)), "{err:?}");
        assert!(
            err.to_string()
                .contains("does not read what deploykit would change"),
            "{err}"
        );
        let err = s.exec.run(&plan, options).await.expect_err("refused by the run");
        assert!(matches!(err, Error::Refused(_)), "{err:?}");
    }
    assert!(s.fleet.ops().is_empty(), "touched: {:?}", s.fleet.ops());
    assert!(s.fleet.releases().values().all(|r| r == &v("v1")));
    assert!(s.log.events().is_empty(), "no run started, no events");
}
