//! The [`MetricsSource`] contract.

use std::time::Duration;

use deploykit::{Group, Metric, MetricsSource, Observation};

use super::{cancel_after, Clause, Conformance, ConformanceFailure};

/// The metrics suite: which groups have data for which metrics, and which
/// group has none.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use deploykit::{Group, Metric};
/// use deploykit_testkit::{conformance::MetricsSuite, FakeMetrics};
///
/// let metrics = FakeMetrics::new().set("canary", Metric::ErrorRate, 0.01);
/// MetricsSuite::default()
///     .with_data(Group::new("canary")?, [Metric::ErrorRate])
///     .without_data(Group::new("nobody")?)
///     .run(&metrics)
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MetricsSuite {
    with_data: Vec<(Group, Vec<Metric>)>,
    without_data: Vec<Group>,
    unreachable: bool,
    window: Duration,
    cancel_points: Vec<Duration>,
}

impl Default for MetricsSuite {
    fn default() -> Self {
        Self {
            with_data: Vec::new(),
            without_data: Vec::new(),
            unreachable: false,
            window: Duration::from_secs(60),
            cancel_points: vec![
                Duration::ZERO,
                Duration::from_millis(1),
                Duration::from_millis(10),
            ],
        }
    }
}

const ALL: [Metric; 3] = [Metric::ErrorRate, Metric::LatencyP99, Metric::RequestCount];

/// Runs the suite against `source`: `with_data` has data for `metrics`,
/// `without_data` has none for any metric.
///
/// # Errors
/// The first [`ConformanceFailure`] found.
pub async fn metrics_source<M: MetricsSource + ?Sized>(
    source: &M,
    with_data: &Group,
    metrics: &[Metric],
    without_data: &Group,
) -> Result<Conformance, ConformanceFailure> {
    MetricsSuite::default()
        .with_data(with_data.clone(), metrics.iter().copied())
        .without_data(without_data.clone())
        .run(source)
        .await
}

impl MetricsSuite {
    /// `group` has data for each of `metrics`: each answers a value.
    pub fn with_data(mut self, group: Group, metrics: impl IntoIterator<Item = Metric>) -> Self {
        self.with_data.push((group, metrics.into_iter().collect()));
        self
    }

    /// `group` has no data for any metric: each answers `NoData`.
    pub fn without_data(mut self, group: Group) -> Self {
        self.without_data.push(group);
        self
    }

    /// The source points at a provider that cannot be reached: every query
    /// of every group given answers `ProviderError` (use it with a source
    /// built for a dead address, on its own).
    pub fn unreachable(mut self) -> Self {
        self.unreachable = true;
        self
    }

    /// The window queried (default 60 s).
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// After how long each cancelled query is dropped (default: after one
    /// poll, 1 ms and 10 ms).
    pub fn cancel_points(mut self, points: impl IntoIterator<Item = Duration>) -> Self {
        self.cancel_points = points.into_iter().collect();
        self
    }

    /// Runs the suite against `source`.
    ///
    /// # Errors
    /// The first [`ConformanceFailure`] found.
    ///
    /// # Panics
    /// When no group was given.
    pub async fn run<M: MetricsSource + ?Sized>(
        &self,
        source: &M,
    ) -> Result<Conformance, ConformanceFailure> {
        let mut queries: Vec<(Group, Metric, Kind)> = Vec::new();
        if self.unreachable {
            for g in self.with_data.iter().map(|(g, _)| g).chain(&self.without_data) {
                queries.extend(ALL.iter().map(|m| (g.clone(), *m, Kind::ProviderError)));
            }
        } else {
            for (g, metrics) in &self.with_data {
                queries.extend(metrics.iter().map(|m| (g.clone(), *m, Kind::Value)));
            }
            for g in &self.without_data {
                queries.extend(ALL.iter().map(|m| (g.clone(), *m, Kind::NoData)));
            }
        }
        assert!(
            !queries.is_empty(),
            "the metrics suite needs a group with_data or without_data"
        );

        let mut done = Conformance::default();
        for (g, m, want) in &queries {
            let what = format!("observe({}, {g})", metric_name(*m));
            let first = source.observe(*m, g, self.window).await;
            let clause = match want {
                Kind::Value => Clause::MetricsValueInRange,
                Kind::NoData => Clause::MetricsNoDataIsNoData,
                Kind::ProviderError => Clause::MetricsUnreachableIsProviderError,
            };
            if Kind::of(&first) != *want {
                return Err(ConformanceFailure::new(
                    clause,
                    format!("{what} answered {}, expected {}", describe(&first), want.name()),
                ));
            }
            if let Observation::Value(v) = first {
                in_range(*m, v)
                    .map_err(|why| ConformanceFailure::new(clause, format!("{what} = {v}: {why}")))?;
            }
            done.pass(clause);

            let second = source.observe(*m, g, self.window).await;
            if Kind::of(&second) != *want {
                return Err(ConformanceFailure::new(
                    Clause::MetricsObserveIdempotent,
                    format!("{what} answered {} then {}", describe(&first), describe(&second)),
                ));
            }
            done.pass(Clause::MetricsObserveIdempotent);

            for p in &self.cancel_points {
                cancel_after(*p, source.observe(*m, g, self.window)).await;
                let next = source.observe(*m, g, self.window).await;
                if Kind::of(&next) != *want {
                    return Err(ConformanceFailure::new(
                        Clause::MetricsObserveCancelSafe,
                        format!(
                            "after {what} was dropped after {p:?}, the next one answered {}, expected {}",
                            describe(&next),
                            want.name()
                        ),
                    ));
                }
            }
            done.pass(Clause::MetricsObserveCancelSafe);
        }
        Ok(done)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Value,
    NoData,
    ProviderError,
}

impl Kind {
    fn of(o: &Observation) -> Self {
        match o {
            Observation::Value(_) => Kind::Value,
            Observation::NoData => Kind::NoData,
            Observation::ProviderError(_) => Kind::ProviderError,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Value => "a value",
            Kind::NoData => "no data",
            Kind::ProviderError => "a provider error",
        }
    }
}

fn describe(o: &Observation) -> String {
    match o {
        Observation::Value(v) => format!("the value {v}"),
        Observation::NoData => "no data".to_owned(),
        Observation::ProviderError(e) => format!("a provider error ({e})"),
    }
}

fn metric_name(m: Metric) -> &'static str {
    match m {
        Metric::ErrorRate => "error_rate",
        Metric::LatencyP99 => "latency_p99",
        Metric::RequestCount => "request_count",
    }
}

fn in_range(m: Metric, v: f64) -> Result<(), &'static str> {
    if !v.is_finite() {
        return Err("not finite");
    }
    match m {
        Metric::ErrorRate if !(0.0..=1.0).contains(&v) => Err("an error rate is a fraction, 0 to 1"),
        Metric::LatencyP99 | Metric::RequestCount if v < 0.0 => Err("negative"),
        _ => Ok(()),
    }
}
