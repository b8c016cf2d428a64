//! Monitoring before deploy: before a canary sends its first request to the
//! new release, every query the analysis will rely on must answer for the
//! stable track, and stable must be serving requests.
//!
//! An analysis whose queries match nothing answers `NoData` forever; the
//! canary is then rolled back only after the inconclusive limit, or — worse
//! — a typo in a label selector passes unnoticed for a query the rules skip
//! when stable is empty. Checking stable first costs a few queries and
//! turns that into a refusal that names the query and what came back,
//! before anything is touched. [`check_monitoring`] is the reusable check;
//! the executor calls it before a plan with canary analysis starts (unless
//! [`monitoring_check`](crate::analysis::AnalysisRules::monitoring_check)
//! is off).

use std::fmt;
use std::time::Duration;

use crate::analysis::AnalysisRules;
use crate::judge::{ErrorRateJudge, LatencyJudge, Measured};
use crate::names::Group;
use crate::traits::{Metric, MetricsSource, Observation};

/// One query that did not answer as the analysis needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MonitoringGap {
    /// What was asked, e.g. `stable error rate`.
    pub what: String,
    /// The query as sent, when the source can say.
    pub query: Option<String>,
    /// What came back, in words.
    pub answer: String,
}

impl fmt::Display for MonitoringGap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.query {
            Some(q) => write!(f, "{} (query `{q}`) {}", self.what, self.answer),
            None => write!(f, "{} {}", self.what, self.answer),
        }
    }
}

/// Monitoring is not ready for the canary analysis.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct MonitoringError {
    /// Every query that failed, in the order asked.
    pub gaps: Vec<MonitoringGap>,
}

impl fmt::Display for MonitoringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("monitoring is not ready for the canary analysis: ")?;
        for (i, g) in self.gaps.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{g}")?;
        }
        f.write_str(
            ". Fix the metric queries or send traffic to the stable track first \
             (or turn the check off with monitoring_check = false)",
        )
    }
}

/// Asks every query the analysis under `rules` will rely on for the
/// `stable` track over the analysis window (the judges' over `interval`),
/// each bounded by `timeout`, and checks that each answers a value and that
/// stable served requests.
///
/// * Idempotent: yes (read-only).
/// * Cancel-safe: yes.
/// * On failure: nothing changed.
///
/// # Errors
/// [`MonitoringError`] listing every query that answered no data, a
/// provider error, or no requests.
pub async fn check_monitoring(
    metrics: &dyn MetricsSource,
    stable: &Group,
    rules: &AnalysisRules,
    interval: Duration,
    timeout: Duration,
) -> Result<(), MonitoringError> {
    let window = rules.window;
    let mut gaps = Vec::new();
    let no_answer = || format!("gave no answer within {:.1}s", timeout.as_secs_f64());
    for (metric, what) in [
        (Metric::ErrorRate, "stable error rate"),
        (Metric::LatencyP99, "stable p99 latency"),
        (Metric::RequestCount, "stable request count"),
    ] {
        let answer = tokio::time::timeout(timeout, metrics.observe(metric, stable, window))
            .await
            .unwrap_or_else(|_| Observation::ProviderError(no_answer()));
        let problem = match answer {
            Observation::Value(v) if metric == Metric::RequestCount && (v.is_nan() || v <= 0.0) => {
                Some(format!(
                    "is {v} — no requests reached the stable track in the last {}s",
                    window.as_secs()
                ))
            }
            Observation::Value(v) if v.is_nan() => Some("answered NaN".to_string()),
            Observation::Value(_) => None,
            Observation::NoData => Some("answered no data (an empty result or NaN)".to_string()),
            Observation::ProviderError(m) => Some(format!("failed: {m}")),
        };
        if let Some(answer) = problem {
            gaps.push(MonitoringGap {
                what: what.to_string(),
                query: metrics.query_text(metric, stable, window),
                answer,
            });
        }
    }
    let judge_window = interval.max(Duration::from_secs(1));
    if rules.error_judge == ErrorRateJudge::Sequential {
        let answer = tokio::time::timeout(timeout, metrics.observe_counts(stable, judge_window))
            .await
            .unwrap_or_else(|_| Measured::ProviderError(no_answer()));
        let problem = match answer {
            Measured::Value(c) if c.requests > 0.0 => None,
            Measured::Value(_) => Some("counted no requests".to_string()),
            Measured::NoData => Some("answered no data".to_string()),
            Measured::ProviderError(m) => Some(format!("failed: {m}")),
        };
        if let Some(answer) = problem {
            gaps.push(MonitoringGap {
                what: "stable request and error counts (sequential judge)".into(),
                query: None,
                answer,
            });
        }
    }
    if rules.latency_judge == LatencyJudge::MannWhitney {
        let answer = tokio::time::timeout(timeout, metrics.observe_latency(stable, judge_window))
            .await
            .unwrap_or_else(|_| Measured::ProviderError(no_answer()));
        let problem = match answer {
            Measured::Value(d) if d.count() > 0.0 => None,
            Measured::Value(_) => Some("held no requests".to_string()),
            Measured::NoData => Some("answered no data".to_string()),
            Measured::ProviderError(m) => Some(format!("failed: {m}")),
        };
        if let Some(answer) = problem {
            gaps.push(MonitoringGap {
                what: "stable latency distribution (Mann-Whitney judge)".into(),
                query: None,
                answer,
            });
        }
    }
    if gaps.is_empty() {
        Ok(())
    } else {
        Err(MonitoringError { gaps })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_names_each_query_and_what_came_back() {
        let e = MonitoringError {
            gaps: vec![
                MonitoringGap {
                    what: "stable error rate".into(),
                    query: Some("errors{track=\"stable\"}".into()),
                    answer: "answered no data (an empty result or NaN)".into(),
                },
                MonitoringGap {
                    what: "stable request count".into(),
                    query: None,
                    answer: "is 0 — no requests reached the stable track in the last 300s".into(),
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "monitoring is not ready for the canary analysis: stable error rate (query `errors{track=\"stable\"}`) \
             answered no data (an empty result or NaN); stable request count is 0 — no requests reached the \
             stable track in the last 300s. Fix the metric queries or send traffic to the stable track first \
             (or turn the check off with monitoring_check = false)"
        );
    }
}
