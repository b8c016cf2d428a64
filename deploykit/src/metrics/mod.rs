//! [`MetricsSource`](crate::MetricsSource) drivers and their query
//! templates.
//!
//! * [`Prometheus`](prometheus::Prometheus) (feature `prometheus`, on by
//!   default) — instant PromQL queries against `/api/v1/query`.
//!
//! The testkit's `FakeMetrics` is the scripted one for tests.

mod template;

#[cfg(feature = "prometheus")]
#[cfg_attr(docsrs, doc(cfg(feature = "prometheus")))]
pub mod prometheus;

pub use template::QueryTemplate;
