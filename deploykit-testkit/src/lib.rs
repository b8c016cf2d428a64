//! # deploykit-testkit
//!
//! In-memory fakes of deploykit's core traits, scriptable faults, and an
//! invariant checker — so engines, drivers and programs that embed deploykit
//! can be tested in memory and in virtual time.
//!
//! * [`FakeFleet`] — a fleet of [`FakeInstance`]s and the
//!   [`FakeLoadBalancer`] in front of them, sharing one world so the
//!   invariant checker sees both.
//! * [`Fault`] — scripted failures per instance and operation: at the k-th
//!   call, from the k-th call, always, transient for n calls, or only on a
//!   new release.
//! * [`FakeMetrics`] — a [`MetricsSource`](deploykit::MetricsSource)
//!   scripted per group and time.
//! * [`FakeSmokeTester`] and [`FakeLiveStore`] — blue-green's smoke checks
//!   and live record, each with scriptable failures.
//! * [`FakeFleet::check`] — the invariants every deployment must keep.
//! * [`conformance`] — the suite that checks any driver against the
//!   contract of its trait (`docs/testing-your-driver.md`).
//!
//! Every wait is a `tokio::time` sleep, so with
//! `#[tokio::test(start_paused = true)]` minutes of deployment take
//! milliseconds.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use deploykit::{Executor, OutcomeKind, ReleaseId, Rolling};
//! use deploykit_testkit::FakeFleet;
//!
//! // Eight instances; the new release never gets healthy on i-3.
//! let fleet = FakeFleet::new(8).fail_health("i-3");
//! let exec = Executor::builder()
//!     .instances(fleet.instances())
//!     .load_balancer(Arc::new(fleet.load_balancer()))
//!     .build()?;
//! let report = exec.deploy(&Rolling::default(), &ReleaseId::new("v2")?).await?;
//!
//! // Within the default failure budget of 1: finished, but not a success.
//! assert_eq!(report.outcome, OutcomeKind::Degraded);
//! assert_eq!(fleet.release_of("i-3").unwrap().as_str(), "v1");
//! fleet.check(&report, 1).assert_ok();
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod chaos;
pub mod conformance;
mod fleet;
mod invariants;
mod live_store;
mod metrics;
mod smoke;

pub use chaos::FakeFaults;
pub use fleet::{
    FakeFleet, FakeInstance, FakeLoadBalancer, Fault, Op, OpRecord, RoutingChange, RoutingEntry,
};
pub use invariants::{InvariantReport, Violation};
pub use live_store::FakeLiveStore;
pub use metrics::FakeMetrics;
pub use smoke::FakeSmokeTester;
