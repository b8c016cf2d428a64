//! The Prometheus [`MetricsSource`]: instant PromQL queries against
//! `/api/v1/query`.
//!
//! Each [`Metric`] has a [`QueryTemplate`]; the defaults are the usual
//! queries (5xx ratio over the window; `histogram_quantile(0.99, …)`),
//! adapted to the demo app's metrics `http_requests_total{code,track,version}`
//! and `http_request_duration_seconds{track,version}` and to tracks selected
//! by label:
//!
//! | metric | default PromQL |
//! |---|---|
//! | error rate | `(sum(rate(http_requests_total{track="{group}",code=~"5.."}[{window}])) or vector(0)) / sum(rate(http_requests_total{track="{group}"}[{window}]))` |
//! | p99 latency | `histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{track="{group}"}[{window}])))` |
//! | request count | `sum(increase(http_requests_total{track="{group}"}[{window}]))` |
//! | error count (sequential judge) | `sum(increase(http_requests_total{track="{group}",code=~"5.."}[{window}])) or vector(0)` |
//! | latency buckets (Mann-Whitney judge) | `sum by (le) (increase(http_request_duration_seconds_bucket{track="{group}"}[{window}]))` |
//! | visits (A/B experiment) | `sum(increase(checkout_visits_total{track="{group}"}[{window}])) or vector(0)` |
//! | conversions (A/B experiment) | `sum(increase(checkout_conversions_total{track="{group}"}[{window}])) or vector(0)` |
//!
//! The judges query over one check interval; keep the scrape interval
//! well under it (a third or less), or `increase` has too few samples to
//! work with.
//!
//! `or vector(0)` makes "no 5xx at all" a rate of 0 instead of an empty
//! result; a track with no traffic still answers empty (or `NaN`), which is
//! [`Observation::NoData`] — never healthy.
//!
//! # How answers map to observations
//!
//! * `status: success`, one sample → [`Observation::Value`]; `"NaN"` →
//!   `NoData`; `"+Inf"` → `Value(+∞)` (for a p99 it means "beyond the
//!   largest bucket", which fails any latency threshold); `"-Inf"` →
//!   `NoData`.
//! * An empty result → `NoData`.
//! * More than one series → `ProviderError` (aggregate the query, e.g.
//!   with `sum`).
//! * `status: error`, a non-JSON body, an HTTP error, a connection failure
//!   or a timeout → `ProviderError` with Prometheus's own message.
//!
//! The URL may carry credentials (`http://user:password@host:9090`, sent as
//! basic authentication); every message names it as a [`SecretUrl`], with
//! them hidden.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::template::QueryTemplate;
use crate::error::{Error, Result};
use crate::experiment::Tally;
use crate::judge::{Counts, Distribution, Measured};
use crate::names::Group;
use crate::secret_url::SecretUrl;
use crate::traits::{Metric, MetricsSource, Observation};

/// The default error-rate query (see the [module docs](self)).
pub const DEFAULT_ERROR_RATE: &str = r#"(sum(rate(http_requests_total{track="{group}",code=~"5.."}[{window}])) or vector(0)) / sum(rate(http_requests_total{track="{group}"}[{window}]))"#;
/// The default p99 latency query, in seconds.
pub const DEFAULT_LATENCY_P99: &str = r#"histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{track="{group}"}[{window}])))"#;
/// The default request-count query.
pub const DEFAULT_REQUEST_COUNT: &str = r#"sum(increase(http_requests_total{track="{group}"}[{window}]))"#;
/// The default error-count query (for the sequential judge).
pub const DEFAULT_ERROR_COUNT: &str =
    r#"sum(increase(http_requests_total{track="{group}",code=~"5.."}[{window}])) or vector(0)"#;
/// The default latency-histogram query (for the Mann-Whitney judge): one
/// series per bucket, labelled `le`.
pub const DEFAULT_LATENCY_BUCKETS: &str =
    r#"sum by (le) (increase(http_request_duration_seconds_bucket{track="{group}"}[{window}]))"#;

/// The default visits query (for an A/B experiment): the demo app's
/// checkout visitors per track.
pub const DEFAULT_VISITS: &str =
    r#"sum(increase(checkout_visits_total{track="{group}"}[{window}])) or vector(0)"#;
/// The default conversions query (for an A/B experiment).
pub const DEFAULT_CONVERSIONS: &str =
    r#"sum(increase(checkout_conversions_total{track="{group}"}[{window}])) or vector(0)"#;

/// The PromQL templates, one per [`Metric`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromQueries {
    /// Fraction of requests answered with 5xx (0–1).
    pub error_rate: QueryTemplate,
    /// 99th-percentile latency in seconds.
    pub latency_p99: QueryTemplate,
    /// Requests served in the window.
    pub request_count: QueryTemplate,
    /// Requests answered with an error in the window (sequential judge).
    pub error_count: QueryTemplate,
    /// Cumulative latency histogram buckets in the window, one series per
    /// `le` label (Mann-Whitney judge).
    pub latency_buckets: QueryTemplate,
    /// Visitors of the variant in the window (A/B experiment).
    pub visits: QueryTemplate,
    /// Conversions among them in the window (A/B experiment).
    pub conversions: QueryTemplate,
}

impl Default for PromQueries {
    fn default() -> Self {
        let t = |field, q| QueryTemplate::parse(field, q).expect("default queries are valid");
        Self {
            error_rate: t("error_rate", DEFAULT_ERROR_RATE),
            latency_p99: t("latency_p99", DEFAULT_LATENCY_P99),
            request_count: t("request_count", DEFAULT_REQUEST_COUNT),
            error_count: t("error_count", DEFAULT_ERROR_COUNT),
            latency_buckets: t("latency_buckets", DEFAULT_LATENCY_BUCKETS),
            visits: t("visits", DEFAULT_VISITS),
            conversions: t("conversions", DEFAULT_CONVERSIONS),
        }
    }
}

impl PromQueries {
    fn for_metric(&self, metric: Metric) -> &QueryTemplate {
        match metric {
            Metric::ErrorRate => &self.error_rate,
            Metric::LatencyP99 => &self.latency_p99,
            Metric::RequestCount => &self.request_count,
        }
    }
}

/// A [`MetricsSource`] backed by a Prometheus server. Cheap to clone.
///
/// ```
/// use std::time::Duration;
/// use deploykit::metrics::prometheus::Prometheus;
/// let prom = Prometheus::builder("http://127.0.0.1:9090")
///     .timeout(Duration::from_secs(5))
///     .error_rate(r#"sum(rate(errors_total{track="{group}"}[{window}])) / sum(rate(requests_total{track="{group}"}[{window}]))"#)
///     .build()?;
/// # let _ = prom;
/// assert!(Prometheus::builder("ftp://x").build().is_err());
/// # Ok::<(), deploykit::Error>(())
/// ```
#[derive(Clone)]
pub struct Prometheus {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    /// The endpoint as messages name it.
    shown: SecretUrl,
    queries: PromQueries,
    timeout: Duration,
}

impl std::fmt::Debug for Prometheus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prometheus")
            .field("endpoint", &self.shown)
            .field("queries", &self.queries)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Prometheus`]; setters never fail, [`build`](Self::build)
/// checks everything.
#[derive(Debug, Clone)]
pub struct PrometheusBuilder {
    url: SecretUrl,
    queries: PromQueries,
    overrides: Vec<(Metric, String)>,
    error_count: Option<String>,
    latency_buckets: Option<String>,
    visits: Option<String>,
    conversions: Option<String>,
    timeout: Duration,
}

impl Prometheus {
    /// A builder for the server at `url` (e.g. `http://127.0.0.1:9090`;
    /// `http://user:password@host:9090` for basic authentication).
    pub fn builder(url: impl Into<SecretUrl>) -> PrometheusBuilder {
        PrometheusBuilder {
            url: url.into(),
            queries: PromQueries::default(),
            overrides: Vec::new(),
            error_count: None,
            latency_buckets: None,
            visits: None,
            conversions: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// The query that `metric` of `group` over `window` sends (for logs and
    /// dry runs).
    pub fn query(&self, metric: Metric, group: &Group, window: Duration) -> String {
        self.queries.for_metric(metric).render(group, window)
    }
}

impl PrometheusBuilder {
    /// All templates at once.
    pub fn queries(mut self, queries: PromQueries) -> Self {
        self.queries = queries;
        self
    }

    /// The error-rate template.
    pub fn error_rate(mut self, template: impl Into<String>) -> Self {
        self.overrides.push((Metric::ErrorRate, template.into()));
        self
    }

    /// The p99-latency template (seconds).
    pub fn latency_p99(mut self, template: impl Into<String>) -> Self {
        self.overrides.push((Metric::LatencyP99, template.into()));
        self
    }

    /// The request-count template.
    pub fn request_count(mut self, template: impl Into<String>) -> Self {
        self.overrides.push((Metric::RequestCount, template.into()));
        self
    }

    /// The error-count template (the sequential judge's).
    pub fn error_count(mut self, template: impl Into<String>) -> Self {
        self.error_count = Some(template.into());
        self
    }

    /// The latency-histogram template (the Mann-Whitney judge's): one
    /// series per bucket, labelled `le`.
    pub fn latency_buckets(mut self, template: impl Into<String>) -> Self {
        self.latency_buckets = Some(template.into());
        self
    }

    /// The visits template (an A/B experiment's denominator).
    pub fn visits(mut self, template: impl Into<String>) -> Self {
        self.visits = Some(template.into());
        self
    }

    /// The conversions template (an A/B experiment's numerator).
    pub fn conversions(mut self, template: impl Into<String>) -> Self {
        self.conversions = Some(template.into());
        self
    }

    /// Upper bound of one query, connection included. Default 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Checks the URL, the templates and the timeout.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `metrics.url` (not an `http`/`https`
    /// URL with a host, or one with a query string), `metrics.queries.*` (see
    /// [`QueryTemplate::parse`]) or `metrics.timeout` (0); an
    /// [`Error::Driver`] when the HTTP client cannot be created.
    pub fn build(self) -> Result<Prometheus> {
        let bad_url = |why: &str| {
            Error::invalid(
                "metrics.url",
                format!(
                    "\"{}\" {why}; write the server's base URL, e.g. http://127.0.0.1:9090",
                    self.url
                ),
            )
        };
        let mut url =
            reqwest::Url::parse(self.url.expose()).map_err(|e| bad_url(&format!("is not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad_url("is not http or https"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad_url("has no host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad_url("has a query string or fragment"));
        }
        if !url.path().ends_with('/') {
            let p = format!("{}/", url.path());
            url.set_path(&p);
        }
        let endpoint = url.join("api/v1/query").map_err(|e| bad_url(&e.to_string()))?;
        if self.timeout.is_zero() {
            return Err(Error::invalid(
                "metrics.timeout",
                "is 0; allow each query a few seconds, e.g. \"10s\"",
            ));
        }
        let mut queries = self.queries;
        for (metric, text) in self.overrides {
            let (field, slot) = match metric {
                Metric::ErrorRate => ("metrics.queries.error_rate", &mut queries.error_rate),
                Metric::LatencyP99 => ("metrics.queries.latency_p99", &mut queries.latency_p99),
                Metric::RequestCount => ("metrics.queries.request_count", &mut queries.request_count),
            };
            *slot = QueryTemplate::parse(field, &text)?;
        }
        if let Some(t) = &self.error_count {
            queries.error_count = QueryTemplate::parse("metrics.queries.error_count", t)?;
        }
        if let Some(t) = &self.latency_buckets {
            queries.latency_buckets = QueryTemplate::parse("metrics.queries.latency_buckets", t)?;
        }
        if let Some(t) = &self.visits {
            queries.visits = QueryTemplate::parse("metrics.queries.visits", t)?;
        }
        if let Some(t) = &self.conversions {
            queries.conversions = QueryTemplate::parse("metrics.queries.conversions", t)?;
        }
        let client = reqwest::Client::builder()
            .timeout(self.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| {
                Error::Driver(crate::DriverError::new("cannot create the HTTP client").with_source(e))
            })?;
        Ok(Prometheus {
            client,
            shown: SecretUrl::new(endpoint.as_str()),
            endpoint,
            queries,
            timeout: self.timeout,
        })
    }
}

#[async_trait]
impl MetricsSource for Prometheus {
    /// One instant query (`GET /api/v1/query?query=…`).
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes; dropping the future drops the request.
    /// * On failure: nothing changed; the failure is an
    ///   [`Observation::ProviderError`].
    async fn observe(&self, metric: Metric, group: &Group, window: Duration) -> Observation {
        let query = self.query(metric, group, window);
        tracing::debug!(?metric, %group, %query, "prometheus query");
        match self.get(&query).await {
            Ok((status, body)) => parse_response(status, &body),
            Err(m) => Observation::ProviderError(m),
        }
    }

    fn query_text(&self, metric: Metric, group: &Group, window: Duration) -> Option<String> {
        Some(self.query(metric, group, window))
    }

    /// Two instant queries: the request count and the error count.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes; dropping the future drops the requests.
    /// * On failure: nothing changed; the failure is a
    ///   [`Measured::ProviderError`].
    async fn observe_counts(&self, group: &Group, window: Duration) -> Measured<Counts> {
        let requests = self.observe(Metric::RequestCount, group, window);
        let errors = async {
            let q = self.queries.error_count.render(group, window);
            match self.get(&q).await {
                Ok((status, body)) => parse_response(status, &body),
                Err(m) => Observation::ProviderError(m),
            }
        };
        match futures::join!(requests, errors) {
            (Observation::ProviderError(m), _) | (_, Observation::ProviderError(m)) => {
                Measured::ProviderError(m)
            }
            (Observation::Value(n), Observation::Value(e)) if n.is_finite() && e.is_finite() => {
                Measured::Value(Counts {
                    requests: n.max(0.0),
                    errors: e.max(0.0).min(n.max(0.0)),
                })
            }
            _ => Measured::NoData,
        }
    }

    /// One instant query of the histogram buckets (`sum by (le)`).
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes; dropping the future drops the request.
    /// * On failure: nothing changed; the failure is a
    ///   [`Measured::ProviderError`].
    async fn observe_latency(&self, group: &Group, window: Duration) -> Measured<Distribution> {
        let q = self.queries.latency_buckets.render(group, window);
        match self.get(&q).await {
            Ok((status, body)) => parse_buckets(status, &body),
            Err(m) => Measured::ProviderError(m),
        }
    }

    /// Two instant queries: the visits and the conversions.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes; dropping the future drops the requests.
    /// * On failure: nothing changed; the failure is a
    ///   [`Measured::ProviderError`].
    async fn observe_tally(&self, group: &Group, window: Duration) -> Measured<Tally> {
        let (vq, cq) = self.tally_queries(group, window);
        tracing::debug!(%group, visits = %vq, conversions = %cq, "prometheus tally queries");
        let one = |q: String| async move {
            match self.get(&q).await {
                Ok((status, body)) => parse_response(status, &body),
                Err(m) => Observation::ProviderError(m),
            }
        };
        tally_of(futures::join!(one(vq), one(cq)))
    }
}

/// Visits and conversions from their two observations: no visits yet is a
/// tally of zero (the test waits for its minimum), conversions are capped
/// at the visits (`increase` extrapolates each counter on its own).
fn tally_of((visits, conversions): (Observation, Observation)) -> Measured<Tally> {
    match (visits, conversions) {
        (Observation::ProviderError(m), _) => Measured::ProviderError(format!("visits query: {m}")),
        (_, Observation::ProviderError(m)) => Measured::ProviderError(format!("conversions query: {m}")),
        (Observation::Value(v), Observation::Value(c)) if v.is_finite() && c.is_finite() => {
            let visits = v.max(0.0);
            Measured::Value(Tally {
                visits,
                conversions: c.max(0.0).min(visits),
            })
        }
        (Observation::Value(v), Observation::NoData) if v.is_finite() && v <= 0.0 => {
            Measured::Value(Tally::default())
        }
        _ => Measured::NoData,
    }
}

impl Prometheus {
    /// The visits and conversions queries of `group` over `window`, as
    /// sent (for logs and dry runs).
    pub fn tally_queries(&self, group: &Group, window: Duration) -> (String, String) {
        (
            self.queries.visits.render(group, window),
            self.queries.conversions.render(group, window),
        )
    }

    /// Sends one instant query; the HTTP status and body, or why there is
    /// none.
    async fn get(&self, query: &str) -> std::result::Result<(u16, String), String> {
        let sent = self
            .client
            .get(self.endpoint.clone())
            .query(&[("query", query)])
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(format!(
                    "no answer from {} within {:.1}s",
                    self.shown,
                    self.timeout.as_secs_f64()
                ))
            }
            Err(e) => {
                return Err(format!(
                    "cannot query {}: {}",
                    self.shown,
                    error_chain(&e.without_url())
                ))
            }
        };
        let status = resp.status().as_u16();
        match resp.text().await {
            Ok(body) => Ok((status, body)),
            Err(e) => Err(format!(
                "reading the answer of {} failed: {}",
                self.shown,
                error_chain(&e.without_url())
            )),
        }
    }
}

/// Turns an `/api/v1/query` answer of histogram buckets (one series per
/// `le` label) into a [`Distribution`]; no series, or no requests in any
/// bucket, is `NoData`.
pub fn parse_buckets(http_status: u16, body: &str) -> Measured<Distribution> {
    let v: serde_json::Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(_) => return Measured::ProviderError(format!("HTTP {http_status}, not a Prometheus API answer")),
    };
    if v.get("status").and_then(|s| s.as_str()) != Some("success") || !(200..300).contains(&http_status) {
        // The single-value parser words every failure the same way.
        return match parse_response(http_status, body) {
            Observation::ProviderError(m) => Measured::ProviderError(m),
            _ => Measured::ProviderError(format!("HTTP {http_status}, not a successful answer")),
        };
    }
    let Some(series) = v.pointer("/data/result").and_then(|r| r.as_array()) else {
        return Measured::ProviderError("the answer has no result list".into());
    };
    let mut buckets = Vec::with_capacity(series.len());
    for s in series {
        let Some(le) = s.pointer("/metric/le").and_then(|l| l.as_str()) else {
            return Measured::ProviderError(
                "a series without an le label; aggregate the buckets with sum by (le)".into(),
            );
        };
        let le = match le {
            "+Inf" | "Inf" => f64::INFINITY,
            t => match t.parse::<f64>() {
                Ok(x) => x,
                Err(_) => return Measured::ProviderError(format!("the bucket bound {t:?} is not a number")),
            },
        };
        let count = s
            .pointer("/value/1")
            .and_then(|c| c.as_str())
            .and_then(|c| c.parse::<f64>().ok())
            .filter(|c| c.is_finite());
        match count {
            Some(c) => buckets.push((le, c)),
            None => return Measured::ProviderError("a bucket without a numeric value".into()),
        }
    }
    let d = Distribution::from_cumulative_buckets(&buckets);
    if d.count() <= 0.0 {
        return Measured::NoData;
    }
    Measured::Value(d)
}

/// `e` and its sources, for a message; reqwest's own text names the URL,
/// so callers pass the error through `without_url` first.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Turns an `/api/v1/query` answer (HTTP status and body) into an
/// [`Observation`].
pub fn parse_response(http_status: u16, body: &str) -> Observation {
    let excerpt = || {
        let mut s: String = body.chars().take(200).collect();
        if body.len() > s.len() {
            s.push('…');
        }
        s
    };
    let v: serde_json::Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(_) => {
            return Observation::ProviderError(format!(
                "HTTP {http_status}, not a Prometheus API answer: {}",
                excerpt()
            ))
        }
    };
    match v.get("status").and_then(|s| s.as_str()) {
        Some("success") => {}
        Some("error") => {
            let kind = v.get("errorType").and_then(|s| s.as_str()).unwrap_or("error");
            let msg = v.get("error").and_then(|s| s.as_str()).unwrap_or("(no message)");
            return Observation::ProviderError(format!("HTTP {http_status}, {kind}: {msg}"));
        }
        _ => {
            return Observation::ProviderError(format!(
                "HTTP {http_status}, no status in the answer: {}",
                excerpt()
            ))
        }
    }
    if !(200..300).contains(&http_status) {
        return Observation::ProviderError(format!("HTTP {http_status}: {}", excerpt()));
    }
    let Some(data) = v.get("data") else {
        return Observation::ProviderError("the answer has no data".into());
    };
    let kind = data.get("resultType").and_then(|s| s.as_str()).unwrap_or("");
    let result = data.get("result");
    let sample =
        match (kind, result) {
            ("vector", Some(serde_json::Value::Array(series))) => match series.as_slice() {
                [] => return Observation::NoData,
                [one] => one.get("value"),
                many => {
                    return Observation::ProviderError(format!(
                        "the query returned {} series, not one; aggregate it (e.g. wrap it in sum())",
                        many.len()
                    ))
                }
            },
            ("scalar", Some(s)) => Some(s),
            ("matrix", _) => return Observation::ProviderError(
                "the query returned a range vector; use an instant expression (e.g. rate(x[5m]), not x[5m])"
                    .into(),
            ),
            _ => return Observation::ProviderError(format!("unexpected result type {kind:?}")),
        };
    let Some(text) = sample
        .and_then(|s| s.as_array())
        .and_then(|pair| pair.get(1))
        .and_then(|v| v.as_str())
    else {
        return Observation::ProviderError("a sample without a [time, \"value\"] pair".into());
    };
    match text {
        "NaN" => Observation::NoData,
        "+Inf" | "Inf" => Observation::Value(f64::INFINITY),
        "-Inf" => Observation::NoData,
        t => match t.parse::<f64>() {
            Ok(x) if x.is_finite() => Observation::Value(x),
            _ => Observation::ProviderError(format!("the sample value {t:?} is not a number")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_recorded_answers() {
        // Recorded from Prometheus 2.42 (`curl /api/v1/query?query=…`).
        let ok = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1764205200.123,"0.0512"]}]}}"#;
        assert_eq!(parse_response(200, ok), Observation::Value(0.0512));
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_response(200, empty), Observation::NoData);
        let nan = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1764205200.1,"NaN"]}]}}"#;
        assert_eq!(parse_response(200, nan), Observation::NoData);
        let inf = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1764205200.1,"+Inf"]}]}}"#;
        assert_eq!(parse_response(200, inf), Observation::Value(f64::INFINITY));
        let scalar = r#"{"status":"success","data":{"resultType":"scalar","result":[1764205200.1,"42"]}}"#;
        assert_eq!(parse_response(200, scalar), Observation::Value(42.0));
        let labelled = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"track":"canary"},"value":[1.0,"0"]}]}}"#;
        assert_eq!(parse_response(200, labelled), Observation::Value(0.0));
    }

    #[test]
    fn parses_histogram_buckets() {
        let ok = r#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"le":"0.1"},"value":[1.0,"10"]},
            {"metric":{"le":"+Inf"},"value":[1.0,"31"]},
            {"metric":{"le":"0.25"},"value":[1.0,"30"]}]}}"#;
        let Measured::Value(d) = parse_buckets(200, ok) else {
            panic!("{:?}", parse_buckets(200, ok))
        };
        assert_eq!(d.points, vec![(0.1, 10.0), (0.25, 20.0), (0.5, 1.0)]);
        let empty = r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_buckets(200, empty), Measured::NoData);
        let zero = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"le":"+Inf"},"value":[1.0,"0"]}]}}"#;
        assert_eq!(parse_buckets(200, zero), Measured::NoData);
        let unlabelled = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.0,"3"]}]}}"#;
        assert!(
            matches!(parse_buckets(200, unlabelled), Measured::ProviderError(m) if m.contains("sum by (le)"))
        );
        let bad = r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert!(matches!(parse_buckets(400, bad), Measured::ProviderError(m) if m.contains("bad_data")));
    }

    #[test]
    fn errors_are_provider_errors_with_prometheus_message() {
        let bad = r#"{"status":"error","errorType":"bad_data","error":"invalid parameter \"query\": 1:6: parse error: unexpected \"}\""}"#;
        match parse_response(400, bad) {
            Observation::ProviderError(m) => {
                assert!(m.contains("HTTP 400, bad_data: invalid parameter"), "{m}")
            }
            o => panic!("{o:?}"),
        }
        let timeout =
            r#"{"status":"error","errorType":"timeout","error":"query timed out in expression evaluation"}"#;
        assert!(
            matches!(parse_response(503, timeout), Observation::ProviderError(m) if m.contains("timeout"))
        );
        assert!(matches!(
            parse_response(502, "<html>Bad Gateway</html>"),
            Observation::ProviderError(m) if m.contains("HTTP 502") && m.contains("Bad Gateway")
        ));
        let two = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"a":"1"},"value":[1.0,"1"]},{"metric":{"a":"2"},"value":[1.0,"2"]}]}}"#;
        assert!(matches!(parse_response(200, two), Observation::ProviderError(m) if m.contains("2 series")));
        let matrix = r#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(matches!(
            parse_response(200, matrix),
            Observation::ProviderError(_)
        ));
        let junk = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1.0,"abc"]}]}}"#;
        assert!(matches!(parse_response(200, junk), Observation::ProviderError(_)));
        assert!(matches!(parse_response(200, "{}"), Observation::ProviderError(_)));
    }

    #[test]
    fn default_queries_render_with_the_track_and_window() {
        let p = Prometheus::builder("http://127.0.0.1:9090/").build().unwrap();
        let g = Group::new("canary").unwrap();
        assert_eq!(
            p.query(Metric::ErrorRate, &g, Duration::from_secs(300)),
            r#"(sum(rate(http_requests_total{track="canary",code=~"5.."}[300s])) or vector(0)) / sum(rate(http_requests_total{track="canary"}[300s]))"#
        );
        assert_eq!(
            p.query(Metric::LatencyP99, &g, Duration::from_secs(10)),
            r#"histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{track="canary"}[10s])))"#
        );
        assert_eq!(p.endpoint.as_str(), "http://127.0.0.1:9090/api/v1/query");
        let sub = Prometheus::builder("http://127.0.0.1:9090/prom").build().unwrap();
        assert_eq!(sub.endpoint.as_str(), "http://127.0.0.1:9090/prom/api/v1/query");
    }

    #[test]
    fn bad_settings_name_the_field() {
        for (url, why) in [
            ("127.0.0.1:9090", "metrics.url"),
            ("ftp://h:1", "metrics.url"),
            ("http://h:9090/?x=1", "metrics.url"),
        ] {
            let e = Prometheus::builder(url).build().unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
        }
        let e = Prometheus::builder("http://h:9090")
            .latency_p99("histogram_quantile(0.99, x)")
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.queries.latency_p99"), "{e}");
        let e = Prometheus::builder("http://h:9090")
            .timeout(Duration::ZERO)
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.timeout"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_provider_error() {
        // A port on loopback nothing listens on: bind, read the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = Prometheus::builder(format!("http://127.0.0.1:{port}"))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let o = p
            .observe(
                Metric::ErrorRate,
                &Group::new("canary").unwrap(),
                Duration::from_secs(60),
            )
            .await;
        assert!(
            matches!(&o, Observation::ProviderError(m) if m.contains("cannot query")),
            "{o:?}"
        );
    }

    #[tokio::test]
    async fn credentials_in_the_url_are_never_in_a_message() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = Prometheus::builder(format!("http://user:s3cret@127.0.0.1:{port}/?token=t0ken"))
            .build()
            .unwrap_err();
        assert!(
            !p.to_string().contains("s3cret") && !p.to_string().contains("t0ken"),
            "{p}"
        );
        let p = Prometheus::builder(format!("http://user:s3cret@127.0.0.1:{port}"))
            .build()
            .unwrap();
        assert!(!format!("{p:?}").contains("s3cret"), "{p:?}");
        let o = p
            .observe(
                Metric::ErrorRate,
                &Group::new("canary").unwrap(),
                Duration::from_secs(60),
            )
            .await;
        let Observation::ProviderError(m) = o else {
            panic!("{o:?}")
        };
        assert!(
            m.contains(&format!("cannot query http://***@127.0.0.1:{port}/api/v1/query")),
            "{m}"
        );
        assert!(!m.contains("s3cret"), "{m}");
    }

    /// Serves one scripted `/api/v1/query` answer per connection: the
    /// answer for the first key the (URL-encoded) request line contains.
    async fn scripted(answers: Vec<(&'static str, String)>) -> (u16, tokio::task::JoinHandle<Vec<String>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let n = answers.len();
        let h = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..n {
                let (mut c, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let len = c.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..len]).to_string();
                let line = req.lines().next().unwrap_or("").to_string();
                let body = answers
                    .iter()
                    .find(|(k, _)| line.contains(k))
                    .map(|(_, b)| b.clone())
                    .unwrap_or_else(|| {
                        r#"{"status":"error","errorType":"bad_data","error":"unscripted"}"#.into()
                    });
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                c.write_all(resp.as_bytes()).await.unwrap();
                seen.push(line);
            }
            seen
        });
        (port, h)
    }

    fn sample(v: &str) -> String {
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1.0,"{v}"]}}]}}}}"#
        )
    }

    #[tokio::test]
    async fn tally_reads_the_visits_and_conversions_queries_of_the_track() {
        let (port, h) = scripted(vec![
            ("checkout_visits_total", sample("1200")),
            ("checkout_conversions_total", sample("96")),
        ])
        .await;
        let p = Prometheus::builder(format!("http://127.0.0.1:{port}"))
            .build()
            .unwrap();
        let t = p
            .observe_tally(&Group::new("canary").unwrap(), Duration::from_secs(42))
            .await;
        assert_eq!(
            t,
            Measured::Value(Tally {
                visits: 1200.0,
                conversions: 96.0
            })
        );
        let seen = h.await.unwrap().join("\n");
        // The track and the window reach both queries (URL-encoded).
        assert_eq!(seen.matches("track%3D%22canary%22").count(), 2, "{seen}");
        assert_eq!(seen.matches("%5B42s%5D").count(), 2, "{seen}");
    }

    #[tokio::test]
    async fn custom_tally_templates_are_used_and_a_failure_names_its_query() {
        let (port, h) = scripted(vec![
            ("signups_total", sample("10")),
            (
                "purchases_total",
                r#"{"status":"error","errorType":"bad_data","error":"parse error"}"#.into(),
            ),
        ])
        .await;
        let p = Prometheus::builder(format!("http://127.0.0.1:{port}"))
            .visits(r#"sum(increase(signups_total{arm="{group}"}[{window}]))"#)
            .conversions(r#"sum(increase(purchases_total{arm="{group}"}[{window}]))"#)
            .build()
            .unwrap();
        let t = p
            .observe_tally(&Group::new("b").unwrap(), Duration::from_secs(60))
            .await;
        assert!(
            matches!(&t, Measured::ProviderError(m) if m.starts_with("conversions query:") && m.contains("parse error")),
            "{t:?}"
        );
        h.await.unwrap();
    }

    #[test]
    fn tally_answers_map_to_measurements() {
        use Observation::{NoData, ProviderError, Value};
        assert_eq!(
            tally_of((Value(100.0), Value(130.0))),
            Measured::Value(Tally {
                visits: 100.0,
                conversions: 100.0
            })
        );
        assert_eq!(tally_of((Value(0.0), NoData)), Measured::Value(Tally::default()));
        assert_eq!(tally_of((NoData, Value(3.0))), Measured::NoData);
        assert_eq!(tally_of((Value(5.0), NoData)), Measured::NoData);
        assert!(matches!(
            tally_of((ProviderError("down".into()), Value(1.0))),
            Measured::ProviderError(m) if m == "visits query: down"
        ));
    }

    #[test]
    fn bad_tally_templates_name_the_field() {
        let e = Prometheus::builder("http://h:9090")
            .visits("sum(visits_total)")
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.queries.visits"), "{e}");
        let e = Prometheus::builder("http://h:9090")
            .conversions(r#"sum(x{t="{grup}"})"#)
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("metrics.queries.conversions"), "{e}");
    }
}
