//! A scripted [`MetricsSource`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deploykit::{Group, Metric, MetricsSource, Observation};
use tokio::time::Instant;

type Script = Arc<dyn Fn(Duration) -> Observation + Send + Sync>;

/// A metrics source scripted per group, metric and time.
///
/// Unscripted queries answer [`Observation::NoData`] — never a healthy
/// value by accident. Time is measured on the `tokio` clock from the moment
/// the source was created, so scripts work in virtual time. Cheap to clone.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use deploykit::{Group, Metric, MetricsSource, Observation};
/// use deploykit_testkit::FakeMetrics;
///
/// let canary = Group::new("canary").unwrap();
/// let metrics = FakeMetrics::new()
///     .set("stable", Metric::ErrorRate, 0.001)
///     .script("canary", Metric::ErrorRate, |t| {
///         // Healthy for a minute, then 5 % errors.
///         Observation::Value(if t < Duration::from_secs(60) { 0.001 } else { 0.05 })
///     });
/// let w = Duration::from_secs(300);
/// assert_eq!(metrics.observe(Metric::ErrorRate, &canary, w).await, Observation::Value(0.001));
/// tokio::time::sleep(Duration::from_secs(61)).await;
/// assert_eq!(metrics.observe(Metric::ErrorRate, &canary, w).await, Observation::Value(0.05));
/// assert_eq!(metrics.observe(Metric::LatencyP99, &canary, w).await, Observation::NoData);
/// # }
/// ```
#[derive(Clone)]
pub struct FakeMetrics {
    epoch: Instant,
    scripts: Arc<Mutex<HashMap<(String, Metric), Script>>>,
    queries: Arc<Mutex<Vec<(Duration, String, Metric)>>>,
}

impl std::fmt::Debug for FakeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeMetrics").finish_non_exhaustive()
    }
}

impl Default for FakeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeMetrics {
    /// A source with nothing scripted (everything answers `NoData`).
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            scripts: Arc::default(),
            queries: Arc::default(),
        }
    }

    /// `metric` of `group` is always `value`.
    pub fn set(self, group: &str, metric: Metric, value: f64) -> Self {
        self.script(group, metric, move |_| Observation::Value(value))
    }

    /// `metric` of `group` always answers `observation` (e.g. a provider
    /// error).
    pub fn always(self, group: &str, metric: Metric, observation: Observation) -> Self {
        self.script(group, metric, move |_| observation.clone())
    }

    /// `metric` of `group` is computed from the time since creation.
    pub fn script(
        self,
        group: &str,
        metric: Metric,
        f: impl Fn(Duration) -> Observation + Send + Sync + 'static,
    ) -> Self {
        self.scripts
            .lock()
            .expect("fake metrics poisoned")
            .insert((group.to_string(), metric), Arc::new(f));
        self
    }

    /// Every query so far: when, which group, which metric.
    pub fn queries(&self) -> Vec<(Duration, String, Metric)> {
        self.queries.lock().expect("fake metrics poisoned").clone()
    }
}

#[async_trait]
impl MetricsSource for FakeMetrics {
    async fn observe(&self, metric: Metric, group: &Group, _window: Duration) -> Observation {
        let t = self.epoch.elapsed();
        self.queries
            .lock()
            .expect("fake metrics poisoned")
            .push((t, group.to_string(), metric));
        let script = self
            .scripts
            .lock()
            .expect("fake metrics poisoned")
            .get(&(group.to_string(), metric))
            .cloned();
        match script {
            Some(f) => f(t),
            None => Observation::NoData,
        }
    }
}
