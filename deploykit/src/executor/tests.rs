//! Unit tests of individual executor steps against mocked instances
//! (mockall): exact calls, in order, with timeouts and retries.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mockall::{predicate::eq, Sequence};

use crate::error::DriverError;
use crate::names::{Address, Group, InstanceId, ReleaseId};
use crate::strategy::{CountOrPercent, Rolling};
use crate::traits::{Backend, Health, Instance};
use crate::{
    Error, Executor, HealthCheck, InstanceStatus, NoLoadBalancer, OutcomeKind, RunOptions, Timeouts,
};

mockall::mock! {
    Inst {}
    #[async_trait]
    impl Instance for Inst {
        fn backend(&self) -> &Backend;
        async fn current_release(&self) -> Result<Option<ReleaseId>, DriverError>;
        async fn stop(&self) -> Result<(), DriverError>;
        async fn force_stop(&self) -> Result<(), DriverError>;
        async fn install(&self, release: &ReleaseId) -> Result<(), DriverError>;
        async fn restore(&self, release: &ReleaseId) -> Result<(), DriverError>;
        async fn start(&self) -> Result<(), DriverError>;
        async fn health(&self) -> Result<Health, DriverError>;
    }
}

impl std::fmt::Debug for MockInst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MockInst")
    }
}

fn rel(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

fn mock(id: &str) -> MockInst {
    let mut m = MockInst::new();
    let backend = Backend {
        id: InstanceId::new(id).unwrap(),
        address: Address::parse("127.0.0.1:9").unwrap(),
        group: Group::default_group(),
    };
    m.expect_backend().return_const(backend);
    m.expect_current_release().returning(|| Ok(Some(rel("v1"))));
    m
}

fn executor(m: MockInst, timeouts: Timeouts) -> Executor {
    Executor::builder()
        .instance(Arc::new(m))
        .load_balancer(Arc::new(NoLoadBalancer))
        .timeouts(timeouts)
        .build()
        .unwrap()
}

fn rolling() -> Rolling {
    Rolling {
        batch_size: CountOrPercent::Count(1),
        max_failures: CountOrPercent::Count(1),
        health: HealthCheck {
            retries: 3,
            interval: Duration::from_secs(10),
        },
        drain_timeout: Duration::from_secs(5),
        stabilisation: None,
    }
}

#[tokio::test(start_paused = true)]
async fn stop_falls_back_to_force_stop_then_proceeds_in_order() {
    let mut m = mock("a");
    let mut seq = Sequence::new();
    m.expect_stop()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Err(DriverError::new("SIGTERM ignored")));
    m.expect_force_stop()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    m.expect_install()
        .with(eq(rel("v2")))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(()));
    m.expect_start()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    m.expect_health()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(Health::Healthy));
    let report = executor(m, Timeouts::default())
        .deploy(&rolling(), &rel("v2"))
        .await
        .unwrap();
    assert!(report.is_success(), "{report}");
}

#[tokio::test(start_paused = true)]
async fn health_probes_exactly_retries_times_then_restores_the_previous_release() {
    let mut m = mock("a");
    let mut seq = Sequence::new();
    m.expect_stop()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    m.expect_install()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(()));
    m.expect_start()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    m.expect_health()
        .times(3)
        .in_sequence(&mut seq)
        .returning(|| Ok(Health::Unhealthy("503".into())));
    // Restore the failed instance: stop, previous release, start, healthy.
    m.expect_stop()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    m.expect_restore()
        .with(eq(rel("v1")))
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(()));
    m.expect_start()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    m.expect_health()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(Health::Healthy));
    let started = tokio::time::Instant::now();
    let report = executor(m, Timeouts::default())
        .deploy(&rolling(), &rel("v2"))
        .await
        .unwrap();
    assert_eq!(report.outcome, OutcomeKind::Degraded, "{report}");
    let err = report.instances[0].error.as_deref().unwrap();
    assert!(
        err.contains("not healthy after 3 probe(s)") && err.contains("503"),
        "{err}"
    );
    // The drain wait runs its full 5 s (nothing can count connections), then
    // 3 probes 10 s apart: 20 s; the restore's first probe passes at once.
    assert_eq!(started.elapsed(), Duration::from_secs(25));
}

/// An instance whose install never finishes.
#[derive(Debug)]
struct Hangs(Backend);

#[async_trait]
impl Instance for Hangs {
    fn backend(&self) -> &Backend {
        &self.0
    }
    async fn current_release(&self) -> Result<Option<ReleaseId>, DriverError> {
        Ok(Some(rel("v1")))
    }
    async fn stop(&self) -> Result<(), DriverError> {
        Ok(())
    }
    async fn force_stop(&self) -> Result<(), DriverError> {
        Ok(())
    }
    async fn install(&self, _: &ReleaseId) -> Result<(), DriverError> {
        std::future::pending().await
    }
    async fn restore(&self, _: &ReleaseId) -> Result<(), DriverError> {
        Ok(())
    }
    async fn start(&self) -> Result<(), DriverError> {
        Ok(())
    }
    async fn health(&self) -> Result<Health, DriverError> {
        Ok(Health::Healthy)
    }
}

#[tokio::test(start_paused = true)]
async fn install_is_bounded_by_its_timeout() {
    let backend = Backend {
        id: InstanceId::new("a").unwrap(),
        address: Address::parse("127.0.0.1:9").unwrap(),
        group: Group::default_group(),
    };
    let timeouts = Timeouts {
        install: Duration::from_secs(120),
        ..Timeouts::default()
    };
    let exec = Executor::builder()
        .instance(Arc::new(Hangs(backend)))
        .load_balancer(Arc::new(NoLoadBalancer))
        .timeouts(timeouts)
        .build()
        .unwrap();
    let started = tokio::time::Instant::now();
    let report = exec.deploy(&rolling(), &rel("v2")).await.unwrap();
    let err = report.instances[0].error.as_deref().unwrap();
    assert!(err.contains("install failed: timed out after 120.0s"), "{err}");
    assert_eq!(report.instances[0].status, InstanceStatus::FailedRestored);
    // The drain wait ran its full 5 s (no side can count connections), then 120 s of install.
    assert_eq!(started.elapsed(), Duration::from_secs(125));
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_with_backoff_permanent_ones_are_not() {
    let mut m = mock("a");
    let mut seq = Sequence::new();
    m.expect_stop()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    // When each install attempt came (virtual time), to check the backoff.
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = attempts.clone();
    m.expect_install()
        .times(2)
        .in_sequence(&mut seq)
        .returning(move |_| {
            seen.lock().unwrap().push(tokio::time::Instant::now());
            Err(DriverError::transient("connection reset"))
        });
    let seen = attempts.clone();
    m.expect_install()
        .times(1)
        .in_sequence(&mut seq)
        .returning(move |_| {
            seen.lock().unwrap().push(tokio::time::Instant::now());
            Ok(())
        });
    m.expect_start()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Err(DriverError::new("exit status 1")));
    // Restore after the permanent start failure.
    m.expect_stop()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    m.expect_restore()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|_| Ok(()));
    m.expect_start()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(()));
    m.expect_health()
        .times(1)
        .in_sequence(&mut seq)
        .returning(|| Ok(Health::Healthy));
    let report = executor(m, Timeouts::default())
        .deploy(&rolling(), &rel("v2"))
        .await
        .unwrap();
    let err = report.instances[0].error.as_deref().unwrap();
    assert_eq!(err, "start failed: exit status 1");
    // The default backoff: 1 s before the second attempt, doubled (2 s)
    // before the third.
    let at = attempts.lock().unwrap().clone();
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, [Duration::from_secs(1), Duration::from_secs(2)]);
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_fleet_is_not_planned_on() {
    let mut m = MockInst::new();
    let backend = Backend {
        id: InstanceId::new("web-9").unwrap(),
        address: Address::parse("127.0.0.1:9").unwrap(),
        group: Group::default_group(),
    };
    m.expect_backend().return_const(backend);
    m.expect_current_release()
        .times(1)
        .returning(|| Err(DriverError::new("permission denied")));
    // No other method may be called: the mock panics on any unexpected call.
    let err = executor(m, Timeouts::default())
        .deploy(&rolling(), &rel("v2"))
        .await
        .unwrap_err();
    match err {
        Error::Step { step, instance, .. } => {
            assert_eq!(step, "current_release");
            assert_eq!(instance.unwrap().as_str(), "web-9");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn run_ids_are_the_start_time_then_the_release_cut_at_100_characters() {
    let id = crate::run_id(&rel("v2"));
    let (millis, release) = id.split_once('-').unwrap();
    assert!(millis.parse::<u128>().unwrap() > 1_600_000_000_000, "{id}");
    assert_eq!(release, "v2");
    let long = "r".repeat(120);
    let id = crate::run_id(&rel(&long));
    assert!(id.ends_with(&format!("-{}", "r".repeat(100))), "{id}");
    assert!(!id.ends_with(&"r".repeat(101)), "{id}");
}

#[tokio::test(start_paused = true)]
async fn run_options_name_the_run_and_a_default_id_is_made_from_the_release() {
    let exec = executor(mock("a"), Timeouts::default());
    let plan = crate::Plan::new(
        crate::StrategyKind::Rolling,
        rel("v1"),
        Default::default(),
        Vec::new(),
    );
    let named = exec
        .run(&plan, RunOptions::default().with_id("d-7"))
        .await
        .unwrap();
    assert_eq!(named.deployment, "d-7");
    let made = exec.run(&plan, RunOptions::default()).await.unwrap();
    assert!(made.deployment.ends_with("-v1"), "{}", made.deployment);
}

/// A sink whose records never become durable, as a journal on a full disk.
struct UnwritableJournal(crate::EventLog);

#[async_trait]
impl crate::EventSink for UnwritableJournal {
    fn emit(&self, event: &crate::Event) {
        self.0.emit(event);
    }

    async fn durable(&self) -> crate::Result<()> {
        Err(Error::io(
            "writing the journal j.jsonl",
            std::io::Error::new(std::io::ErrorKind::StorageFull, "no space left on device"),
        ))
    }
}

#[tokio::test(start_paused = true)]
async fn a_step_the_journal_cannot_record_fails_before_it_acts() {
    // No expectation but the snapshot's: any driver call panics the test.
    let m = mock("a");
    let log = crate::EventLog::new();
    let exec = Executor::builder()
        .instance(Arc::new(m))
        .load_balancer(Arc::new(NoLoadBalancer))
        .events(Arc::new(UnwritableJournal(log.clone())))
        .build()
        .unwrap();
    let report = exec.deploy(&rolling(), &rel("v2")).await.unwrap();
    assert!(!report.is_success(), "{report}");
    assert_eq!(report.failed().len(), 1, "{report}");
    let failure = log
        .events()
        .into_iter()
        .find_map(|e| match e.kind {
            crate::EventKind::InstanceFailed { reason, .. } => Some(reason),
            _ => None,
        })
        .expect("the instance failed");
    assert!(
        failure.contains("journal could not record it") && failure.contains("no space left"),
        "{failure}"
    );
}
