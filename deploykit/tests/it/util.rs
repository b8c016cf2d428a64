//! Shared set-up for the engine tests.

use std::sync::Arc;
use std::time::Duration;

use deploykit::{
    CountOrPercent, Event, EventKind, EventLog, Executor, Recreate, ReleaseId, Report, Rolling, Strategy,
};
use deploykit_testkit::FakeFleet;
use tokio_util::sync::CancellationToken;

/// A fleet wired to an executor that records every event.
pub(crate) struct Setup {
    pub(crate) fleet: FakeFleet,
    pub(crate) exec: Executor,
    pub(crate) log: EventLog,
}

pub(crate) fn setup(fleet: FakeFleet) -> Setup {
    setup_with(fleet, CancellationToken::new())
}

pub(crate) fn setup_with(fleet: FakeFleet, cancel: CancellationToken) -> Setup {
    let log = EventLog::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(log.clone()))
        .cancel_token(cancel)
        .build()
        .expect("valid executor");
    Setup { fleet, exec, log }
}

pub(crate) fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

pub(crate) fn rolling(batch: usize, max_failures: usize) -> Rolling {
    Rolling {
        batch_size: CountOrPercent::Count(batch),
        max_failures: CountOrPercent::Count(max_failures),
        ..Rolling::default()
    }
}

pub(crate) fn recreate() -> Recreate {
    Recreate::default()
}

impl Setup {
    pub(crate) async fn deploy(&self, strategy: &dyn Strategy, release: &str) -> Report {
        self.exec
            .deploy(strategy, &v(release))
            .await
            .expect("deployment starts")
    }

    /// Checks the invariants; panics with the report and events on failure.
    pub(crate) fn assert_invariants(&self, report: &Report, batch: usize) {
        let inv = self.fleet.check(report, batch);
        if !inv.is_ok() {
            let events: Vec<String> = self.log.events().iter().map(|e| format!("{e:?}")).collect();
            eprintln!("events:\n{}", events.join("\n"));
        }
        inv.assert_ok();
    }

    pub(crate) fn events(&self) -> Vec<Event> {
        self.log.events()
    }

    pub(crate) fn warnings(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|e| match e.kind {
                EventKind::Warning { message, .. } => Some(message),
                _ => None,
            })
            .collect()
    }
}

pub(crate) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
