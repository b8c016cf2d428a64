//! The Prometheus text exposition (OpenMetrics) of deployment records,
//! rendered with the `prometheus-client` crate: what `/metrics` answers,
//! during a run (`deploy --metrics-listen`) and on the dashboard.
//!
//! Every scrape renders a fresh registry from the records, so the figures
//! are exactly what the journals say; a counter such as
//! `deploykit_deployments_total` still only grows, because journals are
//! only ever added.
//!
//! The canary series use the names of Flagger's (`flagger_` becomes
//! `deploykit_`, labels `name` and `namespace`, both the application), so a
//! Grafana board built for Flagger works by renaming the prefix:
//!
//! | series | what |
//! |---|---|
//! | `deploykit_canary_status{name,namespace}` | the latest canary: 0 running, 1 succeeded, 2 failed |
//! | `deploykit_canary_weight{name,namespace,workload,track}` | traffic share, percent, of `track="canary"` and `track="stable"` (workload `<app>-primary`) |
//! | `deploykit_canary_total{namespace}` | canary deployments in the journals |
//! | `deploykit_canary_duration_seconds{name,namespace}` | histogram of canary deployment durations |
//! | `deploykit_canary_metric_analysis{name,namespace,metric}` | the latest check's value of each rule |
//!
//! and the rest:
//!
//! | series | what |
//! |---|---|
//! | `deploykit_deployments_total{app,kind,strategy,outcome}` | runs ended, by outcome |
//! | `deploykit_deployment_duration_seconds{app,strategy}` | histogram of run durations |
//! | `deploykit_deployment_in_progress{app}` | 1 while a run is in progress |
//! | `deploykit_last_deployment_start_timestamp_seconds{app}` | when the latest run started |
//! | `deploykit_analysis_value{app,deployment,metric}` | the latest check's measurement of each rule |
//! | `deploykit_analysis_threshold{app,deployment,metric}` | the limit that rule holds it to |
//! | `deploykit_analysis_checks_total{app,result}` | every check, by result (`pass`, `fail`, `no_data`, `provider_error`) |
//! | `deploykit_instances{app,release}` | instances on each release, as the journals say |
//! | `deploykit_dora_deployments_per_day{app}` | deployments that went live per day |
//! | `deploykit_dora_lead_time_seconds{app}` | median commit-to-live time |
//! | `deploykit_dora_change_failure_rate{app}` | failed deployments over all |
//! | `deploykit_dora_recovery_time_seconds{app}` | median failure-to-recovery time |
//! | `deploykit_dora_window_seconds{app}` | the window of the DORA figures |
//!
//! ```
//! use deploykit::stats::exposition;
//!
//! let text = exposition::render("shop", &[], 1_700_000_000_000, exposition::DORA_WINDOW_MS);
//! assert!(text.contains("deploykit_deployment_in_progress{app=\"shop\"} 0"));
//! assert!(text.ends_with("# EOF\n"));
//! ```

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{dora, fleet_releases, DeploymentRecord};
use crate::analysis::CheckOutcome;
use crate::kinds::StrategyKind;
use crate::state::{HistoryOutcome, RunKind};

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The default window of the DORA gauges: 30 days.
pub const DORA_WINDOW_MS: u64 = 30 * 86_400_000;

/// Bucket bounds of the duration histograms, seconds: a 10 s recreate to a
/// two-hour canary.
const DURATION_BUCKETS: [f64; 12] = [
    5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

type Labels = Vec<(String, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

fn kind_label(kind: RunKind) -> &'static str {
    match kind {
        RunKind::Deploy => "deploy",
        RunKind::Resume => "resume",
        RunKind::Rollback => "rollback",
    }
}

/// The outcome as a label value (`succeeded`, `rolled_back`, …).
pub fn outcome_label(outcome: HistoryOutcome) -> &'static str {
    match outcome {
        HistoryOutcome::Succeeded => "succeeded",
        HistoryOutcome::Degraded => "degraded",
        HistoryOutcome::RolledBack => "rolled_back",
        HistoryOutcome::RollbackFailed => "rollback_failed",
        HistoryOutcome::Interrupted => "interrupted",
        HistoryOutcome::InProgress => "in_progress",
    }
}

fn check_label(outcome: &CheckOutcome) -> &'static str {
    match outcome {
        CheckOutcome::Pass => "pass",
        CheckOutcome::Fail { .. } => "fail",
        CheckOutcome::NoData { .. } => "no_data",
        CheckOutcome::ProviderError { .. } => "provider_error",
    }
}

/// Renders the series of the [module docs](self) for application `app`
/// from its `records` (oldest first, as [`load`](super::load) returns
/// them), with the DORA gauges over the `dora_window_ms` before `now_ms`.
/// The text is OpenMetrics (ending in `# EOF`), served with
/// [`CONTENT_TYPE`].
pub fn render(app: &str, records: &[DeploymentRecord], now_ms: u64, dora_window_ms: u64) -> String {
    let mut registry = Registry::default();
    let app_only = labels(&[("app", app)]);
    let flagger = labels(&[("name", app), ("namespace", app)]);

    let deployments = Family::<Labels, Counter>::default();
    registry.register(
        "deploykit_deployments",
        "Deployment runs ended, by kind, strategy and outcome",
        deployments.clone(),
    );
    let durations = Family::<Labels, Histogram>::new_with_constructor(histogram as fn() -> Histogram);
    registry.register(
        "deploykit_deployment_duration_seconds",
        "Durations of ended deployment runs",
        durations.clone(),
    );
    let in_progress = Family::<Labels, Gauge>::default();
    registry.register(
        "deploykit_deployment_in_progress",
        "1 while a deployment run is in progress",
        in_progress.clone(),
    );
    let last_start = Family::<Labels, FloatGauge>::default();
    registry.register(
        "deploykit_last_deployment_start_timestamp_seconds",
        "When the latest deployment run started (Unix time)",
        last_start.clone(),
    );
    let checks = Family::<Labels, Counter>::default();
    registry.register(
        "deploykit_analysis_checks",
        "Canary analysis checks, by result",
        checks.clone(),
    );
    let analysis_value = Family::<Labels, FloatGauge>::default();
    registry.register(
        "deploykit_analysis_value",
        "The latest canary check's measurement of each rule (fraction, seconds, e-value or ratio)",
        analysis_value.clone(),
    );
    let analysis_threshold = Family::<Labels, FloatGauge>::default();
    registry.register(
        "deploykit_analysis_threshold",
        "The limit each rule holds its measurement to, in the same unit",
        analysis_threshold.clone(),
    );
    let canary_status = Family::<Labels, Gauge>::default();
    registry.register(
        "deploykit_canary_status",
        "The latest canary: 0 running, 1 succeeded, 2 failed",
        canary_status.clone(),
    );
    let canary_weight = Family::<Labels, Gauge>::default();
    registry.register(
        "deploykit_canary_weight",
        "Traffic share of the canary and stable tracks, percent",
        canary_weight.clone(),
    );
    let canary_total = Family::<Labels, Gauge>::default();
    registry.register(
        "deploykit_canary_total",
        "Canary deployments in the journals",
        canary_total.clone(),
    );
    let canary_duration = Family::<Labels, Histogram>::new_with_constructor(histogram as fn() -> Histogram);
    registry.register(
        "deploykit_canary_duration_seconds",
        "Durations of ended canary deployments",
        canary_duration.clone(),
    );
    let canary_metric = Family::<Labels, FloatGauge>::default();
    registry.register(
        "deploykit_canary_metric_analysis",
        "The latest canary check's value of each rule",
        canary_metric.clone(),
    );
    let instances = Family::<Labels, Gauge>::default();
    registry.register(
        "deploykit_instances",
        "Instances on each release, as the journals say",
        instances.clone(),
    );

    for r in records {
        let strategy = r.strategy.as_str();
        if r.outcome != HistoryOutcome::InProgress {
            deployments
                .get_or_create(&labels(&[
                    ("app", app),
                    ("kind", if r.drill { "drill" } else { kind_label(r.kind) }),
                    ("strategy", strategy),
                    ("outcome", outcome_label(r.outcome)),
                ]))
                .inc();
            let seconds = r.duration_ms as f64 / 1000.0;
            durations
                .get_or_create(&labels(&[("app", app), ("strategy", strategy)]))
                .observe(seconds);
            if r.strategy == StrategyKind::Canary {
                canary_duration.get_or_create(&flagger).observe(seconds);
            }
        }
        for c in &r.checks {
            checks
                .get_or_create(&labels(&[("app", app), ("result", check_label(&c.outcome))]))
                .inc();
        }
    }
    let running = records.iter().any(|r| r.outcome == HistoryOutcome::InProgress);
    in_progress.get_or_create(&app_only).set(i64::from(running));
    if let Some(last) = records.last() {
        last_start
            .get_or_create(&app_only)
            .set(last.started_at_ms as f64 / 1000.0);
    }

    let canaries: Vec<&DeploymentRecord> = records
        .iter()
        .filter(|r| r.strategy == StrategyKind::Canary)
        .collect();
    canary_total
        .get_or_create(&labels(&[("namespace", app)]))
        .set(i64::try_from(canaries.len()).unwrap_or(i64::MAX));
    if let Some(latest) = canaries.last() {
        let status = match latest.outcome {
            HistoryOutcome::InProgress => 0,
            HistoryOutcome::Succeeded => 1,
            _ => 2,
        };
        canary_status.get_or_create(&flagger).set(status);
        let weight = i64::from(latest.canary_weight.unwrap_or(0));
        let primary = format!("{app}-primary");
        canary_weight
            .get_or_create(&labels(&[
                ("name", app),
                ("namespace", app),
                ("workload", app),
                ("track", "canary"),
            ]))
            .set(weight);
        canary_weight
            .get_or_create(&labels(&[
                ("name", app),
                ("namespace", app),
                ("workload", &primary),
                ("track", "stable"),
            ]))
            .set(100 - weight);
    }
    if let Some(latest) = records.iter().rev().find(|r| !r.checks.is_empty()) {
        for m in latest.last_measurements() {
            let metric = m.metric.as_label();
            let l = labels(&[("app", app), ("deployment", &latest.id), ("metric", metric)]);
            analysis_value.get_or_create(&l).set(m.value);
            analysis_threshold.get_or_create(&l).set(m.threshold);
            canary_metric
                .get_or_create(&labels(&[("name", app), ("namespace", app), ("metric", metric)]))
                .set(m.value);
        }
    }

    let mut by_release = std::collections::BTreeMap::<String, i64>::new();
    for release in fleet_releases(records).into_values() {
        let name = release.map_or_else(|| "none".to_string(), |r| r.to_string());
        *by_release.entry(name).or_default() += 1;
    }
    for (release, n) in by_release {
        instances
            .get_or_create(&labels(&[("app", app), ("release", &release)]))
            .set(n);
    }

    let d = dora(records, now_ms.saturating_sub(dora_window_ms), now_ms);
    let gauge = |registry: &mut Registry, name: &str, help: &str, value: Option<f64>| {
        let family = Family::<Labels, FloatGauge>::default();
        if let Some(v) = value {
            family.get_or_create(&app_only).set(v);
        }
        registry.register(name, help, family);
    };
    gauge(
        &mut registry,
        "deploykit_dora_deployments_per_day",
        "Deployments that went live per day, over the DORA window",
        Some(d.deployments_per_day),
    );
    gauge(
        &mut registry,
        "deploykit_dora_lead_time_seconds",
        "Median time from commit to live, over the DORA window",
        d.lead_time.map(|s| s.median_ms as f64 / 1000.0),
    );
    gauge(
        &mut registry,
        "deploykit_dora_change_failure_rate",
        "Failed deployments over all deployments, over the DORA window",
        d.change_failure_rate,
    );
    gauge(
        &mut registry,
        "deploykit_dora_recovery_time_seconds",
        "Median time from a failed deployment to recovery, over the DORA window",
        d.recovery_time.map(|s| s.median_ms as f64 / 1000.0),
    );
    gauge(
        &mut registry,
        "deploykit_dora_window_seconds",
        "The window of the DORA gauges",
        Some(dora_window_ms as f64 / 1000.0),
    );

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}
