//! A scripted [`MetricsSource`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deploykit::experiment::Tally;
use deploykit::judge::{Counts, Distribution, Measured};
use deploykit::{Group, Metric, MetricsSource, Observation};
use tokio::time::Instant;

type Script = Arc<dyn Fn(Duration) -> Observation + Send + Sync>;
type CountsScript = Arc<dyn Fn(Duration, Duration) -> Measured<Counts> + Send + Sync>;
type LatencyScript = Arc<dyn Fn(Duration, Duration) -> Measured<Distribution> + Send + Sync>;
type TallyScript = Arc<dyn Fn(Duration, Duration) -> Measured<Tally> + Send + Sync>;

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
    counts: Arc<Mutex<HashMap<String, CountsScript>>>,
    latency: Arc<Mutex<HashMap<String, LatencyScript>>>,
    tallies: Arc<Mutex<HashMap<String, TallyScript>>>,
    queries: Arc<Mutex<Vec<(Duration, String, Metric)>>>,
    /// Faults whose effect is added to the scripted values, and each
    /// group's instance count.
    faults: Option<(crate::FakeFaults, Arc<HashMap<String, usize>>)>,
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
            counts: Arc::default(),
            latency: Arc::default(),
            tallies: Arc::default(),
            queries: Arc::default(),
            faults: None,
        }
    }

    /// Adds the effect of the active chaos faults of `faults` to the
    /// scripted error rate and p99 (see [`FakeFaults`](crate::FakeFaults));
    /// `groups` gives each group's instance count, e.g.
    /// `&[("stable", 4), ("canary", 1)]`.
    pub fn with_faults(mut self, faults: &crate::FakeFaults, groups: &[(&str, usize)]) -> Self {
        let sizes = groups.iter().map(|(g, n)| ((*g).to_string(), *n)).collect();
        self.faults = Some((faults.clone(), Arc::new(sizes)));
        self
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

    /// The requests and errors of `group` (for the sequential judge),
    /// computed from the time since creation and the query's window.
    /// Unscripted, counts come from the `RequestCount` and `ErrorRate`
    /// scripts, as [`MetricsSource::observe_counts`] does by default.
    pub fn script_counts(
        self,
        group: &str,
        f: impl Fn(Duration, Duration) -> Measured<Counts> + Send + Sync + 'static,
    ) -> Self {
        self.counts
            .lock()
            .expect("fake metrics poisoned")
            .insert(group.to_string(), Arc::new(f));
        self
    }

    /// The visits and conversions of `group` over the query's window (an
    /// A/B experiment's business metric), computed from the time since
    /// creation and the window; unscripted it is `NoData`.
    pub fn script_tally(
        self,
        group: &str,
        f: impl Fn(Duration, Duration) -> Measured<Tally> + Send + Sync + 'static,
    ) -> Self {
        self.tallies
            .lock()
            .expect("fake metrics poisoned")
            .insert(group.to_string(), Arc::new(f));
        self
    }

    /// The latency distribution of `group` (for the Mann-Whitney judge),
    /// computed from the time since creation and the query's window;
    /// unscripted it is `NoData`.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use deploykit::judge::{Distribution, Measured};
    /// use deploykit::{Group, MetricsSource};
    /// use deploykit_testkit::FakeMetrics;
    ///
    /// // 200 requests at 120 ms and 10 at 400 ms per window.
    /// let metrics = FakeMetrics::new().script_latency("canary", |_t, _window| {
    ///     Measured::Value(Distribution { points: vec![(0.12, 200.0), (0.4, 10.0)] })
    /// });
    /// let d = metrics.observe_latency(&Group::new("canary").unwrap(), Duration::from_secs(30)).await;
    /// assert!(matches!(d, Measured::Value(d) if d.count() == 210.0));
    /// # }
    /// ```
    pub fn script_latency(
        self,
        group: &str,
        f: impl Fn(Duration, Duration) -> Measured<Distribution> + Send + Sync + 'static,
    ) -> Self {
        self.latency
            .lock()
            .expect("fake metrics poisoned")
            .insert(group.to_string(), Arc::new(f));
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
        let observed = match script {
            Some(f) => f(t),
            None => Observation::NoData,
        };
        match (&self.faults, observed) {
            (Some((faults, sizes)), Observation::Value(v)) => {
                let n = sizes.get(group.as_str()).copied().unwrap_or(1);
                Observation::Value(match metric {
                    Metric::ErrorRate => (v + faults.added_error_rate(group, n)).min(1.0),
                    Metric::LatencyP99 => v + faults.added_latency(group).as_secs_f64(),
                    _ => v,
                })
            }
            (_, o) => o,
        }
    }

    async fn observe_counts(&self, group: &Group, window: Duration) -> Measured<Counts> {
        let script = self
            .counts
            .lock()
            .expect("fake metrics poisoned")
            .get(group.as_str())
            .cloned();
        if let Some(f) = script {
            return f(self.epoch.elapsed(), window);
        }
        let requests = self.observe(Metric::RequestCount, group, window).await;
        let rate = self.observe(Metric::ErrorRate, group, window).await;
        match (requests, rate) {
            (Observation::ProviderError(m), _) | (_, Observation::ProviderError(m)) => {
                Measured::ProviderError(m)
            }
            (Observation::Value(n), Observation::Value(r)) => Measured::Value(Counts {
                requests: n,
                errors: (n * r).round(),
            }),
            _ => Measured::NoData,
        }
    }

    async fn observe_tally(&self, group: &Group, window: Duration) -> Measured<Tally> {
        let script = self
            .tallies
            .lock()
            .expect("fake metrics poisoned")
            .get(group.as_str())
            .cloned();
        match script {
            Some(f) => f(self.epoch.elapsed(), window),
            None => Measured::NoData,
        }
    }

    async fn observe_latency(&self, group: &Group, window: Duration) -> Measured<Distribution> {
        let script = self
            .latency
            .lock()
            .expect("fake metrics poisoned")
            .get(group.as_str())
            .cloned();
        match script {
            Some(f) => f(self.epoch.elapsed(), window),
            None => Measured::NoData,
        }
    }
}
