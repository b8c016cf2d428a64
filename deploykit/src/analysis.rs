//! Canary analysis: the rules that decide whether a canary is healthy, and
//! the typed result of each check: error rate and p99 latency, canary against
//! fixed thresholds and against stable, every `check_interval`.
//!
//! This module is pure logic: it reads [`Observation`]s and returns a
//! [`CheckOutcome`]; the executor fetches the observations from a
//! [`MetricsSource`](crate::MetricsSource) every check interval and feeds
//! each outcome to an [`Analyzer`], which says when to roll back.
//!
//! # The rules
//!
//! A check **fails** when any of these holds (values are from the trailing
//! [`window`](AnalysisRules::window)):
//!
//! 1. the canary's error rate is above
//!    [`error_threshold`](AnalysisRules::error_threshold) (default 1 %);
//! 2. the canary's p99 latency is above
//!    [`latency_threshold`](AnalysisRules::latency_threshold) (default
//!    500 ms);
//! 3. the canary's error rate is above
//!    [`max_error_ratio`](AnalysisRules::max_error_ratio) (default 2) times
//!    the stable track's — **but only when the canary's error rate is above
//!    [`ratio_floor`](AnalysisRules::ratio_floor)** (default 0.1 %).
//!
//! With [`ratio_significance`](AnalysisRules::ratio_significance) above 0
//! (default 3) and the canary's request count `n` in the window known, rule
//! 3 also asks that the difference be beyond sampling noise: the canary
//! fails only above `max_error_ratio × stable + z·√(p(1−p)/n)` (a one-sided
//! binomial test, `p` the ratio limit but at least the floor). At 5 % of
//! 100 requests/s over 5 minutes (1,500 requests) a plain comparison of a
//! good canary with stable at 0.3 % rolls back one deployment in five on
//! noise alone; see `docs/benchmarks.md`. Without a request count the plain
//! comparison applies.
//!
//! The floor is the stable-is-0 guard: when the stable track has no errors
//! at all, "twice stable's error rate" is 0, and a single failed request on
//! the canary would be "infinitely worse". Below the floor errors are too few
//! to compare, so the relative rule does not apply; above it, a canary
//! erring where stable does not is a real difference and fails (stable 0 %,
//! canary 0.5 % → fail; stable 0 %, canary 0.05 % → pass). When the stable
//! track has no data (for instance at a 100 % canary stage, where stable
//! receives no traffic) the relative rule is skipped and the absolute rules
//! still apply.
//!
//! # No data is never healthy
//!
//! A check with a missing canary metric (empty result, `NaN`, no traffic) is
//! [`CheckOutcome::NoData`]; one the provider could not answer is
//! [`CheckOutcome::ProviderError`]. Neither counts as a pass: both count
//! towards [`inconclusive_limit`](AnalysisRules::inconclusive_limit)
//! consecutive inconclusive checks (default 4, as Argo Rollouts'
//! `consecutiveErrorLimit`), after which the canary is rolled back. With
//! [`min_requests`](AnalysisRules::min_requests) set, a check whose canary
//! served fewer requests in the window is `NoData` too. A definite breach
//! always wins: a canary with a 100 % error rate fails even if its request
//! count or latency is missing.
//!
//! ```
//! use deploykit::analysis::{AnalysisRules, CheckOutcome, Observations};
//! use deploykit::Observation;
//!
//! let rules = AnalysisRules::default();
//! // Stable errs 0.4 %, canary 0.9 %: under the 1 % threshold, but more
//! // than twice stable's rate.
//! let obs = Observations {
//!     canary_error_rate: Observation::Value(0.009),
//!     canary_p99: Observation::Value(0.120),
//!     stable_error_rate: Observation::Value(0.004),
//!     canary_requests: None,
//!     stable_requests: None,
//! };
//! assert!(matches!(rules.evaluate(2, &obs), CheckOutcome::Fail { .. }));
//! ```

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::judge::{
    self, Classification, Counts, Distribution, ErrorRateJudge, LatencyJudge, MannWhitneyCheck,
    MannWhitneySettings, Measured, ScoreThresholds, SequentialCheck, SequentialSettings, SequentialState,
};
use crate::names::Group;
use crate::traits::Observation;

/// The thresholds and limits of the canary analysis.
///
/// Rates are fractions (0.01 is 1 %). Check them with
/// [`validate`](Self::validate); strategies do so when they plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisRules {
    /// The highest acceptable canary error rate, a fraction. Default 0.01
    /// (1 %).
    pub error_threshold: f64,
    /// The highest acceptable canary p99 latency. Default 500 ms.
    #[serde(with = "crate::duration_ms")]
    pub latency_threshold: Duration,
    /// The canary fails when its error rate is above this many times the
    /// stable track's. Default 2.
    pub max_error_ratio: f64,
    /// The relative rule applies only above this canary error rate (the
    /// stable-is-0 guard; see the [module docs](self)). Default 0.001
    /// (0.1 %).
    pub ratio_floor: f64,
    /// How far beyond `max_error_ratio` × stable's rate the canary must be,
    /// in standard deviations of its sampling noise, before the relative
    /// rule fails (a one-sided binomial test on the canary's request count
    /// in the window; see the [module docs](self)). `0` compares the rates
    /// plainly (canary > `max_error_ratio` × stable). Default 3.
    pub ratio_significance: f64,
    /// Requests the canary must have served in the window before a check can
    /// pass; `0` for no minimum. Default 0.
    pub min_requests: u64,
    /// Consecutive inconclusive checks (no data or provider errors) after
    /// which the canary is rolled back. Default 4.
    pub inconclusive_limit: u32,
    /// The trailing window each query covers. Default 5 min (PromQL `[5m]`).
    #[serde(with = "crate::duration_ms")]
    pub window: Duration,
    /// How the error rate is judged: the threshold rules above (default) or
    /// the sequential test of [`crate::judge`].
    // Defaults are left out of plans and journals, so a journal written
    // before the judges existed reads and writes back byte for byte.
    #[serde(skip_serializing_if = "is_default")]
    pub error_judge: ErrorRateJudge,
    /// How latency is judged: the p99 threshold (default), or that and the
    /// Mann-Whitney comparison of [`crate::judge`].
    #[serde(skip_serializing_if = "is_default")]
    pub latency_judge: LatencyJudge,
    /// Settings of the sequential error-rate test.
    #[serde(skip_serializing_if = "is_default")]
    pub sequential: SequentialSettings,
    /// Settings of the Mann-Whitney latency judge.
    #[serde(skip_serializing_if = "is_default")]
    pub mann_whitney: MannWhitneySettings,
    /// Group weights and score thresholds, used when a statistical judge is
    /// selected.
    #[serde(skip_serializing_if = "is_default")]
    pub score: ScoreThresholds,
    /// Before the first canary stage, check that every query answers for
    /// the stable track and that stable serves requests, and refuse to start
    /// otherwise ([`crate::monitoring`]). Default on.
    #[serde(skip_serializing_if = "is_true")]
    pub monitoring_check: bool,
    /// Probe the canary instances' health during every canary gate and roll
    /// back as soon as one fails [`HealthWatch::failures`] probes in a row,
    /// without waiting for the metrics to notice. Default on
    /// ([`HealthWatch::DEFAULT`]); `None` turns it off.
    // Absent reads as off, not as the default: plans and journals written
    // while the watch was opt-in resume as they were planned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_watch: Option<HealthWatch>,
}

/// How the canary instances' health is watched during a canary gate.
///
/// A canary whose process died has no metrics at all: its error rate reads
/// as no data, and only [`AnalysisRules::inconclusive_limit`] checks later
/// (minutes at the default 30 s interval) does the analysis roll back, while
/// the load balancer keeps sending it its share of the traffic. Probing the
/// instances directly rolls back within `interval` × `failures` (plus one
/// probe's time) instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthWatch {
    /// Time between probes of each canary instance.
    #[serde(with = "crate::duration_ms")]
    pub interval: Duration,
    /// Failed probes in a row (an unhealthy answer, an error, or no answer
    /// within the executor's health-probe timeout) that roll back; at least 1.
    pub failures: u32,
}

impl HealthWatch {
    /// The default number of failed probes in a row that roll back: one
    /// failed probe can be a blip, two in a row rarely are.
    pub const DEFAULT_FAILURES: u32 = 2;

    /// The default time between probes: 1 s.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);

    /// The watch every canary gate runs unless told otherwise: every
    /// [`DEFAULT_INTERVAL`](Self::DEFAULT_INTERVAL), rolling back after
    /// [`DEFAULT_FAILURES`](Self::DEFAULT_FAILURES) failed probes in a row.
    ///
    /// A dead canary is then out of the traffic about 2 s after it died,
    /// against minutes for the metrics alone (a 30 s check interval, 4
    /// inconclusive checks), and sooner than a load balancer's own checks
    /// mark it down (HAProxy's defaults: 3 failures 2 s apart). It costs one
    /// health request a second per canary instance, which any health
    /// endpoint carries, and a single lost probe never rolls back.
    pub const DEFAULT: HealthWatch = HealthWatch {
        interval: Self::DEFAULT_INTERVAL,
        failures: Self::DEFAULT_FAILURES,
    };

    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `analysis.health_watch` (a zero
    /// interval) or `analysis.health_watch_failures` (0).
    pub fn validate(&self) -> Result<()> {
        if self.interval.is_zero() {
            return Err(Error::invalid(
                "analysis.health_watch",
                "is 0; write how often the canary is probed, e.g. \"1s\"",
            ));
        }
        if self.failures == 0 {
            return Err(Error::invalid(
                "analysis.health_watch_failures",
                format!(
                    "is 0; at least 1 failed probe must be seen (default {})",
                    Self::DEFAULT_FAILURES
                ),
            ));
        }
        Ok(())
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_true(v: &bool) -> bool {
    *v
}

// `validate` rejects NaN thresholds and JSON cannot carry NaN, so equality
// is reflexive for every value a plan can hold.
impl Eq for AnalysisRules {}

impl Default for AnalysisRules {
    fn default() -> Self {
        Self {
            error_threshold: 0.01,
            latency_threshold: Duration::from_millis(500),
            max_error_ratio: 2.0,
            ratio_floor: 0.001,
            ratio_significance: 3.0,
            min_requests: 0,
            inconclusive_limit: 4,
            window: Duration::from_secs(300),
            error_judge: ErrorRateJudge::Threshold,
            latency_judge: LatencyJudge::Threshold,
            sequential: SequentialSettings::default(),
            mann_whitney: MannWhitneySettings::default(),
            score: ScoreThresholds::default(),
            monitoring_check: true,
            health_watch: Some(HealthWatch::DEFAULT),
        }
    }
}

/// What one check read from the metrics source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observations {
    /// The canary's error rate (fraction).
    pub canary_error_rate: Observation,
    /// The canary's p99 latency (seconds).
    pub canary_p99: Observation,
    /// The stable track's error rate (fraction).
    pub stable_error_rate: Observation,
    /// The canary's request count in the window; `None` when no minimum is
    /// required (then it is not queried).
    pub canary_requests: Option<Observation>,
    /// The stable track's request count in the window, for the noise margin
    /// of the relative rule; `None` when not queried.
    pub stable_requests: Option<Observation>,
}

/// Which rule a failed check broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnalysisMetric {
    /// The canary's error rate against `error_threshold`.
    ErrorRate,
    /// The canary's p99 latency (seconds) against `latency_threshold`.
    LatencyP99,
    /// The canary's error rate against `max_error_ratio` × stable's.
    ErrorRateVsStable,
    /// The sequential test of the canary's error rate against stable's
    /// (value: the evidence, an e-value; threshold: `1/alpha`).
    ErrorRateSequential,
    /// The Mann-Whitney comparison of the latency distributions (value:
    /// canary mean over stable mean; threshold: the allowed ratio).
    LatencyDistribution,
}

impl fmt::Display for AnalysisMetric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AnalysisMetric::ErrorRate => "canary error rate",
            AnalysisMetric::LatencyP99 => "canary p99 latency",
            AnalysisMetric::ErrorRateVsStable => "canary error rate relative to stable",
            AnalysisMetric::ErrorRateSequential => "canary error rate relative to stable (sequential test)",
            AnalysisMetric::LatencyDistribution => "canary latency distribution (Mann-Whitney)",
        })
    }
}

/// The typed result of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum CheckOutcome {
    /// Every rule held, with enough data.
    Pass,
    /// A rule was broken.
    Fail {
        /// Which rule.
        metric: AnalysisMetric,
        /// The canary's value (error rate as a fraction, latency in
        /// seconds).
        value: f64,
        /// The limit it went over, in the same unit (for the relative rule:
        /// `max_error_ratio` × stable's error rate).
        threshold: f64,
        /// The canary stage (1-based) the check ran in.
        stage: usize,
    },
    /// Not enough data to judge (empty result, `NaN`, no or too little
    /// traffic). Never healthy.
    NoData {
        /// What was missing.
        reason: String,
    },
    /// The metrics provider could not answer. Never healthy.
    ProviderError {
        /// The provider's error.
        message: String,
    },
}

impl CheckOutcome {
    /// Whether the check counts towards the inconclusive limit.
    pub fn is_inconclusive(&self) -> bool {
        matches!(
            self,
            CheckOutcome::NoData { .. } | CheckOutcome::ProviderError { .. }
        )
    }
}

impl CheckOutcome {
    /// The outcome as a sentence without the stage a failure happened at:
    /// for the guardrails of a treatment, which holds no canary stage.
    pub fn without_stage(&self) -> impl fmt::Display + '_ {
        struct NoStage<'a>(&'a CheckOutcome);
        impl fmt::Display for NoStage<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.write(f, false)
            }
        }
        NoStage(self)
    }

    fn write(&self, f: &mut fmt::Formatter<'_>, with_stage: bool) -> fmt::Result {
        let at = |stage: &usize| {
            if with_stage {
                format!(" at stage {stage}")
            } else {
                String::new()
            }
        };
        match self {
            CheckOutcome::Pass => f.write_str("pass"),
            CheckOutcome::Fail {
                metric,
                value,
                threshold,
                stage,
            } => match metric {
                AnalysisMetric::ErrorRateSequential => write!(
                    f,
                    "{metric}: evidence {value:.0} reached the rollback level {threshold:.0}{}",
                    at(stage)
                ),
                AnalysisMetric::LatencyDistribution if *value < 1.0 => write!(
                    f,
                    "{metric}: canary mean {value:.2}x stable's, below the allowed {threshold:.2}x{}",
                    at(stage)
                ),
                AnalysisMetric::LatencyDistribution => write!(
                    f,
                    "{metric}: canary mean {value:.2}x stable's, above the allowed {threshold:.2}x{}",
                    at(stage)
                ),
                AnalysisMetric::LatencyP99 => write!(
                    f,
                    "{metric} {:.0} ms > threshold {:.0} ms{}",
                    value * 1000.0,
                    threshold * 1000.0,
                    at(stage)
                ),
                _ => write!(
                    f,
                    "{metric} {:.3} % > threshold {:.3} %{}",
                    value * 100.0,
                    threshold * 100.0,
                    at(stage)
                ),
            },
            CheckOutcome::NoData { reason } => write!(f, "no data ({reason})"),
            CheckOutcome::ProviderError { message } => write!(f, "metrics provider error ({message})"),
        }
    }
}

impl fmt::Display for CheckOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, true)
    }
}

impl AnalysisRules {
    /// Checks the thresholds.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `analysis.error_threshold` (not within
    /// 0–1), `analysis.latency_threshold` (0), `analysis.max_error_ratio`
    /// (not finite or below 1), `analysis.ratio_floor` (not within 0–1),
    /// `analysis.inconclusive_limit` (0), `analysis.window` (under 1 s), or
    /// a [`HealthWatch`] field.
    pub fn validate(&self) -> Result<()> {
        let fraction = |field: &str, v: f64, example: &str| {
            if v.is_finite() && (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid(
                    field,
                    format!("{v} is not a fraction from 0 to 1; write e.g. {example}"),
                ))
            }
        };
        fraction("analysis.error_threshold", self.error_threshold, "0.01 for 1 %")?;
        fraction("analysis.ratio_floor", self.ratio_floor, "0.001 for 0.1 %")?;
        if self.latency_threshold.is_zero() {
            return Err(Error::invalid(
                "analysis.latency_threshold",
                "is 0; every request would fail it; write e.g. \"500ms\"",
            ));
        }
        if !(self.max_error_ratio.is_finite() && self.max_error_ratio >= 1.0) {
            return Err(Error::invalid(
                "analysis.max_error_ratio",
                format!(
                    "{} must be a number >= 1 (the canary may err this many times as often as stable); write e.g. 2",
                    self.max_error_ratio
                ),
            ));
        }
        if !(self.ratio_significance.is_finite() && self.ratio_significance >= 0.0) {
            return Err(Error::invalid(
                "analysis.ratio_significance",
                format!(
                    "{} must be a number >= 0 (standard deviations; 0 compares plainly); write e.g. 3",
                    self.ratio_significance
                ),
            ));
        }
        if self.inconclusive_limit == 0 {
            return Err(Error::invalid(
                "analysis.inconclusive_limit",
                "is 0; at least 1 inconclusive check must be allowed (default 4)",
            ));
        }
        self.sequential.validate("analysis.sequential")?;
        self.mann_whitney.validate("analysis.mann_whitney")?;
        self.score.validate("analysis.score")?;
        if let Some(w) = &self.health_watch {
            w.validate()?;
        }
        if self.window < Duration::from_secs(1) {
            return Err(Error::invalid(
                "analysis.window",
                "is under 1s; a rate needs a window of at least a few scrape intervals, e.g. \"5m\"",
            ));
        }
        Ok(())
    }

    /// Judges one check of canary stage `stage` (1-based).
    pub fn evaluate(&self, stage: usize, obs: &Observations) -> CheckOutcome {
        let fail = |metric, value, threshold| CheckOutcome::Fail {
            metric,
            value,
            threshold,
            stage,
        };
        // `+Inf` counts here: a p99 beyond the largest histogram bucket is
        // above any threshold.
        let canary_err = comparable(&obs.canary_error_rate);
        let canary_p99 = comparable(&obs.canary_p99);
        // 1. Absolute error rate.
        if let Some(e) = canary_err {
            if e > self.error_threshold {
                return fail(AnalysisMetric::ErrorRate, e, self.error_threshold);
            }
        }
        // 2. Latency.
        let latency_limit = self.latency_threshold.as_secs_f64();
        if let Some(l) = canary_p99 {
            if l > latency_limit {
                return fail(AnalysisMetric::LatencyP99, l, latency_limit);
            }
        }
        // 3. Relative to stable, above the floor only, and beyond sampling
        // noise when the canary's request count is known.
        if let (Some(e), Some(s)) = (canary_err, value_of(&obs.stable_error_rate)) {
            let count = |o: &Option<Observation>| o.as_ref().and_then(value_of);
            let limit = self.ratio_limit(s, count(&obs.canary_requests), count(&obs.stable_requests));
            if e > self.ratio_floor && e > limit {
                return fail(AnalysisMetric::ErrorRateVsStable, e, limit);
            }
        }
        // No breach: is there enough data to call it a pass?
        let mut inputs = vec![
            ("canary error rate", &obs.canary_error_rate),
            ("canary p99 latency", &obs.canary_p99),
            ("stable error rate", &obs.stable_error_rate),
        ];
        // The request count gates a pass only when a minimum is asked for;
        // for the relative rule's noise margin it is optional.
        if let (Some(r), true) = (&obs.canary_requests, self.min_requests > 0) {
            inputs.push(("canary request count", r));
        }
        for (what, o) in &inputs {
            if let Observation::ProviderError(m) = o {
                return CheckOutcome::ProviderError {
                    message: format!("{what}: {m}"),
                };
            }
        }
        // Stable having no data is not inconclusive: the relative rule is
        // skipped (e.g. stable receives no traffic at a 100 % stage).
        for (what, o) in inputs.iter().filter(|(w, _)| *w != "stable error rate") {
            if value_of(o).is_none() {
                return CheckOutcome::NoData {
                    reason: format!("{what} has no data"),
                };
            }
        }
        if self.min_requests > 0 {
            match obs.canary_requests.as_ref().and_then(value_of) {
                Some(n) if n >= self.min_requests as f64 => {}
                Some(n) => {
                    return CheckOutcome::NoData {
                        reason: format!(
                            "canary served {n:.0} request(s) in the window, fewer than the minimum of {}",
                            self.min_requests
                        ),
                    }
                }
                None => {
                    return CheckOutcome::NoData {
                        reason: "canary request count was not queried".into(),
                    }
                }
            }
        }
        CheckOutcome::Pass
    }
}

impl AnalysisRules {
    /// Whether a check needs the canary's request count.
    pub fn needs_request_count(&self) -> bool {
        self.min_requests > 0 || self.ratio_significance > 0.0
    }

    /// The canary error rate above which the relative rule fails, given
    /// stable's rate and (if known) the requests each track served in the
    /// window: `max_error_ratio × stable`, plus `ratio_significance`
    /// standard deviations of the difference between the two sampled rates
    /// (binomial: `√(p(1−p)/n_canary + ratio²·q(1−q)/n_stable)`, `p` the
    /// limit and `q` stable's rate, each taken at no less than `ratio_floor`
    /// so a rate of 0 still leaves room for noise; the stable term is left
    /// out when its count is unknown).
    pub fn ratio_limit(
        &self,
        stable: f64,
        canary_requests: Option<f64>,
        stable_requests: Option<f64>,
    ) -> f64 {
        let ratio = self.max_error_ratio;
        let limit = ratio * stable;
        let Some(n) = canary_requests.filter(|n| *n >= 1.0 && self.ratio_significance > 0.0) else {
            return limit;
        };
        let p = limit.max(self.ratio_floor).clamp(0.0, 1.0);
        let mut var = p * (1.0 - p) / n;
        if let Some(m) = stable_requests.filter(|m| *m >= 1.0) {
            let q = stable.max(self.ratio_floor).clamp(0.0, 1.0);
            var += ratio * ratio * q * (1.0 - q) / m;
        }
        limit + self.ratio_significance * var.sqrt()
    }
}

/// One value a check measured and the limit a rule holds it to, for every
/// check that had the data (passes included), so that a dashboard or a
/// post-mortem can show how close a canary came to each limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measurement {
    /// The rule.
    pub metric: AnalysisMetric,
    /// The measured value, in the rule's unit (error rate as a fraction,
    /// latency in seconds, an e-value, a ratio of means).
    pub value: f64,
    /// The limit the value must stay at or under, in the same unit.
    pub threshold: f64,
}

impl AnalysisRules {
    /// What a check measured against each rule that had data: the canary's
    /// error rate and p99 against their thresholds, its error rate against
    /// the relative limit when stable's rate is known, and the statistical
    /// judges' figures from `evidence`.
    pub fn measurements(&self, obs: &Observations, evidence: &[Evidence]) -> Vec<Measurement> {
        let value_of = |o: &Observation| match o {
            Observation::Value(v) if v.is_finite() => Some(*v),
            _ => None,
        };
        let count = |o: &Option<Observation>| o.as_ref().and_then(value_of);
        let mut out = Vec::new();
        let canary_err = value_of(&obs.canary_error_rate);
        if let Some(e) = canary_err {
            out.push(Measurement {
                metric: AnalysisMetric::ErrorRate,
                value: e,
                threshold: self.error_threshold,
            });
        }
        if let Some(p99) = value_of(&obs.canary_p99) {
            out.push(Measurement {
                metric: AnalysisMetric::LatencyP99,
                value: p99,
                threshold: self.latency_threshold.as_secs_f64(),
            });
        }
        if let (Some(e), Some(s)) = (canary_err, value_of(&obs.stable_error_rate)) {
            out.push(Measurement {
                metric: AnalysisMetric::ErrorRateVsStable,
                value: e,
                threshold: self.ratio_limit(s, count(&obs.canary_requests), count(&obs.stable_requests)),
            });
        }
        for e in evidence {
            match e {
                Evidence::Sequential(c) => out.push(Measurement {
                    metric: AnalysisMetric::ErrorRateSequential,
                    value: c.e_value,
                    threshold: c.threshold,
                }),
                Evidence::MannWhitney(c) => out.push(Measurement {
                    metric: AnalysisMetric::LatencyDistribution,
                    value: c.mean_ratio,
                    threshold: self.mann_whitney.allowed_increase,
                }),
                Evidence::Score { .. } => {}
            }
        }
        out
    }
}

/// What one check read for the statistical judges of [`crate::judge`],
/// over the time since the previous check; `None` where that judge is not
/// selected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JudgeInputs {
    /// The canary's requests and errors.
    pub canary_counts: Option<Measured<Counts>>,
    /// Stable's requests and errors.
    pub stable_counts: Option<Measured<Counts>>,
    /// The canary's latency distribution.
    pub canary_latency: Option<Measured<Distribution>>,
    /// Stable's latency distribution.
    pub stable_latency: Option<Measured<Distribution>>,
}

/// The statistics behind one check, as events, the journal and reports
/// carry them; [`Display`](fmt::Display) reads as a sentence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "judge")]
pub enum Evidence {
    /// The sequential error-rate test.
    Sequential(SequentialCheck),
    /// The Mann-Whitney latency comparison.
    MannWhitney(MannWhitneyCheck),
    /// The check's Kayenta score.
    Score {
        /// The score, 0–100.
        score: f64,
        /// At or above this the check passes.
        pass: f64,
        /// Below this the check fails.
        marginal: f64,
    },
}

impl fmt::Display for Evidence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Evidence::Sequential(c) => c.fmt(f),
            Evidence::MannWhitney(c) => c.fmt(f),
            Evidence::Score {
                score,
                pass,
                marginal,
            } => write!(
                f,
                "score {score:.0} of 100 (passes at {pass:.0}, fails below {marginal:.0})"
            ),
        }
    }
}

/// A check's outcome and the statistics that led to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The outcome.
    pub outcome: CheckOutcome,
    /// The statistics (empty with the threshold rules alone).
    pub evidence: Vec<Evidence>,
}

impl AnalysisRules {
    /// Whether a statistical judge is selected (then checks go through
    /// [`judge`](Self::judge) and read [`JudgeInputs`]).
    pub fn uses_judges(&self) -> bool {
        self.error_judge != ErrorRateJudge::Threshold || self.latency_judge != LatencyJudge::Threshold
    }

    /// Judges one check of stage `stage` (1-based) with the selected judges,
    /// carrying the sequential test's evidence in `state`.
    ///
    /// With only threshold judges this is [`evaluate`](Self::evaluate).
    /// Otherwise the absolute limits (`error_threshold`,
    /// `latency_threshold`) still fail a check at once; each metric group is
    /// classified (Pass / High / Low / NoData) by its judge; a group without
    /// data makes the check [`CheckOutcome::NoData`] (never healthy); and the
    /// Kayenta score decides: below `score.marginal` fails, from
    /// `score.pass` passes, in between is marginal (`NoData`).
    pub fn judge(
        &self,
        stage: usize,
        obs: &Observations,
        inputs: &JudgeInputs,
        state: &mut SequentialState,
    ) -> Judgement {
        self.judge_stage(stage, stage, obs, inputs, state)
    }

    /// As [`judge`](Self::judge), knowing the analysis has `stages` stages
    /// (the sequential test weighs a fresh start per stage by `1/stages`).
    pub fn judge_stage(
        &self,
        stage: usize,
        stages: usize,
        obs: &Observations,
        inputs: &JudgeInputs,
        state: &mut SequentialState,
    ) -> Judgement {
        if !self.uses_judges() {
            return Judgement {
                outcome: self.evaluate(stage, obs),
                evidence: Vec::new(),
            };
        }
        let mut evidence = Vec::new();
        let done = |outcome, evidence| Judgement { outcome, evidence };
        let fail = |metric, value, threshold| CheckOutcome::Fail {
            metric,
            value,
            threshold,
            stage,
        };
        // The sequential test accumulates evidence at every check, so it
        // reads its counts even when an absolute limit decides this check.
        let sequential = match (self.error_judge, &inputs.canary_counts, &inputs.stable_counts) {
            (ErrorRateJudge::Sequential, Some(Measured::Value(c)), Some(Measured::Value(s))) => {
                let check = state.update_in_stage(&self.sequential, stage, stages, *c, *s);
                evidence.push(Evidence::Sequential(check.clone()));
                Some(check)
            }
            _ => None,
        };
        // The absolute error limit, beyond sampling noise when the canary's
        // request count is known: a window holding only a few canary
        // requests (early in a stage) would otherwise trip on one or two
        // errors and undo the sequential test's false-rollback guarantee.
        let canary_err = comparable(&obs.canary_error_rate);
        let n = obs
            .canary_requests
            .as_ref()
            .and_then(value_of)
            .filter(|n| *n >= 1.0);
        let error_limit = match (self.error_judge, n) {
            (ErrorRateJudge::Sequential, Some(n)) => {
                let p = self.error_threshold;
                p + self.ratio_significance * (p * (1.0 - p) / n).sqrt()
            }
            _ => self.error_threshold,
        };
        if let Some(e) = canary_err.filter(|e| *e > error_limit) {
            return done(fail(AnalysisMetric::ErrorRate, e, error_limit), evidence);
        }
        let latency_limit = self.latency_threshold.as_secs_f64();
        if let Some(l) = comparable(&obs.canary_p99).filter(|l| *l > latency_limit) {
            return done(fail(AnalysisMetric::LatencyP99, l, latency_limit), evidence);
        }
        // Why the check could not pass, if a group lacks data.
        let mut gaps: Vec<CheckOutcome> = Vec::new();
        let (errors, errors_fail) = match self.error_judge {
            ErrorRateJudge::Threshold => {
                // Only the error-rate rules: latency is judged below.
                let errors_only = Observations {
                    canary_p99: Observation::Value(0.0),
                    ..obs.clone()
                };
                match self.evaluate(stage, &errors_only) {
                    f @ CheckOutcome::Fail { .. } => (Classification::High, Some(f)),
                    CheckOutcome::Pass => (Classification::Pass, None),
                    other => {
                        gaps.push(other);
                        (Classification::NoData, None)
                    }
                }
            }
            ErrorRateJudge::Sequential => match &sequential {
                Some(check) => {
                    let c = check.classification();
                    if c == Classification::NoData {
                        gaps.push(CheckOutcome::NoData {
                            reason: format!(
                                "canary served {:.0} request(s) since the analysis began, fewer than the sequential test's minimum of {}",
                                check.canary.requests, self.sequential.min_requests
                            ),
                        });
                    }
                    let failed = fail(
                        AnalysisMetric::ErrorRateSequential,
                        check.e_value,
                        check.threshold,
                    );
                    (c, (c == Classification::High).then_some(failed))
                }
                // Stable without data (no traffic at a 100 % stage) skips
                // the comparison, as the relative threshold rule does.
                None if matches!(
                    (&inputs.canary_counts, &inputs.stable_counts),
                    (Some(Measured::Value(c)), Some(Measured::NoData)) if c.requests > 0.0
                ) =>
                {
                    (Classification::Pass, None)
                }
                None => {
                    gaps.extend(gap("canary request and error counts", &inputs.canary_counts));
                    gaps.extend(gap("stable request and error counts", &inputs.stable_counts));
                    (Classification::NoData, None)
                }
            },
        };
        // The latency group.
        let (latency, latency_fail) = match self.latency_judge {
            LatencyJudge::Threshold => match &obs.canary_p99 {
                Observation::Value(v) if !v.is_nan() && *v != f64::NEG_INFINITY => {
                    (Classification::Pass, None)
                }
                Observation::ProviderError(m) => {
                    gaps.push(CheckOutcome::ProviderError {
                        message: format!("canary p99 latency: {m}"),
                    });
                    (Classification::NoData, None)
                }
                _ => {
                    gaps.push(CheckOutcome::NoData {
                        reason: "canary p99 latency has no data".into(),
                    });
                    (Classification::NoData, None)
                }
            },
            LatencyJudge::MannWhitney => match (&inputs.canary_latency, &inputs.stable_latency) {
                (Some(Measured::Value(c)), Some(Measured::Value(s))) => {
                    let check = judge::mann_whitney(&self.mann_whitney, c, s);
                    let class = check.classification;
                    let failed = match class {
                        Classification::High => Some(fail(
                            AnalysisMetric::LatencyDistribution,
                            check.mean_ratio,
                            self.mann_whitney.allowed_increase,
                        )),
                        Classification::Low => Some(fail(
                            AnalysisMetric::LatencyDistribution,
                            check.mean_ratio,
                            self.mann_whitney.allowed_decrease,
                        )),
                        Classification::NoData => {
                            gaps.push(CheckOutcome::NoData {
                                reason: format!(
                                    "latency samples: canary {:.0}, stable {:.0}, fewer than the minimum of {}",
                                    check.canary_samples, check.stable_samples, self.mann_whitney.min_samples
                                ),
                            });
                            None
                        }
                        Classification::Pass => None,
                    };
                    evidence.push(Evidence::MannWhitney(check));
                    (class, failed)
                }
                // Stable without data skips the comparison; the p99
                // threshold above still applies.
                (Some(Measured::Value(_)), Some(Measured::NoData)) => (Classification::Pass, None),
                (c, s) => {
                    gaps.extend(gap("canary latency distribution", c));
                    gaps.extend(gap("stable latency distribution", s));
                    (Classification::NoData, None)
                }
            },
        };
        // A provider error says more than a gap, so it is the one reported.
        let inconclusive = gaps
            .iter()
            .position(|g| matches!(g, CheckOutcome::ProviderError { .. }))
            .or((!gaps.is_empty()).then_some(0))
            .map(|i| gaps.swap_remove(i));
        let Some(score) = judge::score(&self.score, errors, latency) else {
            return done(
                inconclusive.unwrap_or(CheckOutcome::NoData {
                    reason: "no metric group has data".into(),
                }),
                evidence,
            );
        };
        evidence.push(Evidence::Score {
            score,
            pass: self.score.pass,
            marginal: self.score.marginal,
        });
        if score < self.score.marginal {
            let outcome = errors_fail
                .or(latency_fail)
                .expect("a score below 100 has a failed group");
            return done(outcome, evidence);
        }
        // No data is never healthy: a group without it keeps the check
        // from passing even when the other group's score would.
        if let Some(o) = inconclusive {
            return done(o, evidence);
        }
        if score >= self.score.pass {
            return done(CheckOutcome::Pass, evidence);
        }
        done(
            CheckOutcome::NoData {
                reason: format!(
                    "marginal score {score:.0} (passes at {:.0}, fails below {:.0})",
                    self.score.pass, self.score.marginal
                ),
            },
            evidence,
        )
    }
}

/// Why a judge's input is missing, if it is.
fn gap<T>(what: &str, m: &Option<Measured<T>>) -> Option<CheckOutcome> {
    match m {
        Some(Measured::Value(_)) => None,
        Some(Measured::ProviderError(msg)) => Some(CheckOutcome::ProviderError {
            message: format!("{what}: {msg}"),
        }),
        Some(Measured::NoData) | None => Some(CheckOutcome::NoData {
            reason: format!("{what} has no data"),
        }),
    }
}

/// A value that can be compared with a threshold: finite or `+Inf`.
fn comparable(o: &Observation) -> Option<f64> {
    match o {
        Observation::Value(v) if !v.is_nan() && *v != f64::NEG_INFINITY => Some(*v),
        _ => None,
    }
}

/// A finite value, or `None` for anything else (no data, provider error, a
/// non-finite value that slipped through).
fn value_of(o: &Observation) -> Option<f64> {
    match o {
        Observation::Value(v) if v.is_finite() => Some(*v),
        _ => None,
    }
}

/// What the analysis decides after a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Keep going.
    Continue,
    /// Roll the canary back, for this reason.
    Rollback(String),
}

/// Folds check outcomes into a decision: a failed check rolls back at once;
/// inconclusive checks roll back once
/// [`inconclusive_limit`](AnalysisRules::inconclusive_limit) of them come in
/// a row; a pass resets the count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Analyzer {
    /// Inconclusive checks in a row so far.
    pub consecutive_inconclusive: u32,
    /// Checks that passed so far.
    pub passes: u64,
    /// The sequential error-rate test's evidence so far (used only with
    /// [`ErrorRateJudge::Sequential`]).
    pub sequential: SequentialState,
}

impl Analyzer {
    /// Records `outcome` and decides.
    pub fn record(&mut self, rules: &AnalysisRules, outcome: &CheckOutcome) -> Verdict {
        match outcome {
            CheckOutcome::Pass => {
                self.consecutive_inconclusive = 0;
                self.passes += 1;
                Verdict::Continue
            }
            CheckOutcome::Fail { .. } => Verdict::Rollback(format!("canary analysis failed: {outcome}")),
            CheckOutcome::NoData { .. } | CheckOutcome::ProviderError { .. } => {
                self.consecutive_inconclusive += 1;
                if self.consecutive_inconclusive >= rules.inconclusive_limit {
                    Verdict::Rollback(format!(
                        "canary analysis inconclusive {} time(s) in a row (limit {}); last: {outcome}",
                        self.consecutive_inconclusive, rules.inconclusive_limit
                    ))
                } else {
                    Verdict::Continue
                }
            }
        }
    }
}

/// What an analysis step watches: the two tracks, how often, and the rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    /// The canary track.
    pub canary: Group,
    /// The stable track it is compared with.
    pub stable: Group,
    /// Time between checks.
    #[serde(with = "crate::duration_ms")]
    pub interval: Duration,
    /// The rules.
    pub rules: AnalysisRules,
}

#[cfg(test)]
mod tests {
    use super::*;
    use Observation::{NoData, ProviderError, Value};

    fn obs(canary_err: Observation, p99: Observation, stable_err: Observation) -> Observations {
        Observations {
            canary_error_rate: canary_err,
            canary_p99: p99,
            stable_error_rate: stable_err,
            canary_requests: None,
            stable_requests: None,
        }
    }

    fn metric(o: &CheckOutcome) -> Option<AnalysisMetric> {
        match o {
            CheckOutcome::Fail { metric, .. } => Some(*metric),
            _ => None,
        }
    }

    #[test]
    fn healthy_canary_passes() {
        let r = AnalysisRules::default();
        let o = r.evaluate(1, &obs(Value(0.002), Value(0.1), Value(0.002)));
        assert_eq!(o, CheckOutcome::Pass);
    }

    #[test]
    fn absolute_error_threshold() {
        let r = AnalysisRules::default();
        let o = r.evaluate(2, &obs(Value(0.05), Value(0.1), Value(0.04)));
        assert_eq!(
            o,
            CheckOutcome::Fail {
                metric: AnalysisMetric::ErrorRate,
                value: 0.05,
                threshold: 0.01,
                stage: 2
            }
        );
        assert!(o.to_string().contains("5.000 % > threshold 1.000 %"), "{o}");
        // Exactly at the threshold is not above it.
        let at = r.evaluate(1, &obs(Value(0.01), Value(0.1), Value(0.01)));
        assert_eq!(at, CheckOutcome::Pass);
    }

    #[test]
    fn latency_threshold() {
        let r = AnalysisRules::default();
        let o = r.evaluate(3, &obs(Value(0.0), Value(0.75), Value(0.0)));
        assert_eq!(metric(&o), Some(AnalysisMetric::LatencyP99));
        assert!(
            o.to_string().contains("750 ms > threshold 500 ms at stage 3"),
            "{o}"
        );
        assert_eq!(
            r.evaluate(3, &obs(Value(0.0), Value(0.5), Value(0.0))),
            CheckOutcome::Pass
        );
    }

    #[test]
    fn ratio_rule_and_stable_zero_guard() {
        let r = AnalysisRules::default();
        // stable 0.4 %, canary 0.9 % -> fail (0.9 > 0.8).
        let o = r.evaluate(2, &obs(Value(0.009), Value(0.1), Value(0.004)));
        match o {
            CheckOutcome::Fail {
                metric: AnalysisMetric::ErrorRateVsStable,
                value,
                threshold,
                stage: 2,
            } => {
                assert_eq!(value, 0.009);
                assert!((threshold - 0.008).abs() < 1e-12);
            }
            other => panic!("expected a ratio failure, got {other:?}"),
        }
        // stable 0.4 %, canary 0.7 % -> pass.
        assert_eq!(
            r.evaluate(2, &obs(Value(0.007), Value(0.1), Value(0.004))),
            CheckOutcome::Pass
        );
        // stable 0: below the floor passes, above it fails.
        assert_eq!(
            r.evaluate(1, &obs(Value(0.0005), Value(0.1), Value(0.0))),
            CheckOutcome::Pass
        );
        assert_eq!(
            r.evaluate(1, &obs(Value(0.0), Value(0.1), Value(0.0))),
            CheckOutcome::Pass
        );
        let o = r.evaluate(1, &obs(Value(0.005), Value(0.1), Value(0.0)));
        assert_eq!(metric(&o), Some(AnalysisMetric::ErrorRateVsStable));
    }

    #[test]
    fn stable_without_data_skips_only_the_ratio_rule() {
        let r = AnalysisRules::default();
        assert_eq!(
            r.evaluate(5, &obs(Value(0.005), Value(0.1), NoData)),
            CheckOutcome::Pass
        );
        let o = r.evaluate(5, &obs(Value(0.02), Value(0.1), NoData));
        assert_eq!(metric(&o), Some(AnalysisMetric::ErrorRate));
    }

    #[test]
    fn missing_data_is_never_a_pass() {
        let r = AnalysisRules::default();
        for o in [
            obs(NoData, Value(0.1), Value(0.0)),
            obs(Value(0.0), NoData, Value(0.0)),
            obs(Value(f64::NAN), Value(0.1), Value(0.0)),
            obs(Value(0.0), Value(f64::NEG_INFINITY), Value(0.0)),
        ] {
            let out = r.evaluate(1, &o);
            assert!(matches!(out, CheckOutcome::NoData { .. }), "{o:?} -> {out:?}");
            assert!(out.is_inconclusive());
        }
        let out = r.evaluate(
            1,
            &obs(Value(0.0), ProviderError("connection refused".into()), Value(0.0)),
        );
        assert!(matches!(out, CheckOutcome::ProviderError { .. }), "{out:?}");
        let out = r.evaluate(1, &obs(Value(0.0), Value(0.1), ProviderError("down".into())));
        assert!(matches!(out, CheckOutcome::ProviderError { .. }), "{out:?}");
    }

    #[test]
    fn ratio_rule_allows_for_sampling_noise_when_the_request_count_is_known() {
        let r = AnalysisRules::default();
        // 1,500 canary requests, stable 0.3 %: 2x is 0.6 %, plus 3 sd.
        let limit = r.ratio_limit(0.003, Some(1500.0), None);
        assert!((limit - (0.006 + 3.0 * (0.006f64 * 0.994 / 1500.0).sqrt())).abs() < 1e-12);
        // Stable's own noise widens the margin.
        let both = r.ratio_limit(0.003, Some(1500.0), Some(28_500.0));
        let var = 0.006f64 * 0.994 / 1500.0 + 4.0 * 0.003 * 0.997 / 28_500.0;
        assert!((both - (0.006 + 3.0 * var.sqrt())).abs() < 1e-12);
        assert_eq!(r.ratio_limit(0.003, None, Some(28_500.0)), 0.006);
        let mut o = obs(Value(0.008), Value(0.1), Value(0.003));
        assert_eq!(
            metric(&r.evaluate(1, &o)),
            Some(AnalysisMetric::ErrorRateVsStable),
            "plain"
        );
        o.canary_requests = Some(Value(1500.0));
        assert_eq!(r.evaluate(1, &o), CheckOutcome::Pass, "within noise");
        // A large difference fails either way.
        let mut big = obs(Value(0.009), Value(0.1), Value(0.001));
        big.canary_requests = Some(Value(1500.0));
        assert_eq!(
            metric(&r.evaluate(1, &big)),
            Some(AnalysisMetric::ErrorRateVsStable)
        );
        // With significance 0 the plain comparison applies.
        let plain = AnalysisRules {
            ratio_significance: 0.0,
            ..AnalysisRules::default()
        };
        let mut o = obs(Value(0.008), Value(0.1), Value(0.003));
        o.canary_requests = Some(Value(1500.0));
        assert_eq!(
            metric(&plain.evaluate(1, &o)),
            Some(AnalysisMetric::ErrorRateVsStable)
        );
        // An unknown request count does not make the check inconclusive.
        o.canary_requests = Some(NoData);
        assert_eq!(
            metric(&r.evaluate(1, &o)),
            Some(AnalysisMetric::ErrorRateVsStable)
        );
        let ok = obs(Value(0.001), Value(0.1), Value(0.003));
        let ok = Observations {
            canary_requests: Some(NoData),
            stable_requests: Some(NoData),
            ..ok
        };
        assert_eq!(r.evaluate(1, &ok), CheckOutcome::Pass);
    }

    #[test]
    fn an_infinite_p99_is_a_breach() {
        // Prometheus answers +Inf when the quantile lies beyond the largest
        // bucket.
        let r = AnalysisRules::default();
        let o = r.evaluate(2, &obs(Value(0.0), Value(f64::INFINITY), Value(0.0)));
        assert_eq!(metric(&o), Some(AnalysisMetric::LatencyP99));
    }

    #[test]
    fn a_breach_wins_over_missing_data() {
        let r = AnalysisRules::default();
        let o = r.evaluate(1, &obs(Value(1.0), NoData, ProviderError("x".into())));
        assert_eq!(metric(&o), Some(AnalysisMetric::ErrorRate));
    }

    #[test]
    fn minimum_request_count_gates_a_pass() {
        let r = AnalysisRules {
            min_requests: 100,
            ..AnalysisRules::default()
        };
        let mut o = obs(Value(0.0), Value(0.1), Value(0.0));
        o.canary_requests = Some(Value(20.0));
        let out = r.evaluate(1, &o);
        assert!(
            matches!(&out, CheckOutcome::NoData { reason } if reason.contains("20 request(s)")),
            "{out:?}"
        );
        o.canary_requests = Some(Value(100.0));
        assert_eq!(r.evaluate(1, &o), CheckOutcome::Pass);
        o.canary_requests = None;
        assert!(matches!(r.evaluate(1, &o), CheckOutcome::NoData { .. }));
    }

    #[test]
    fn analyzer_counts_inconclusive_checks_in_a_row() {
        let r = AnalysisRules::default();
        let mut a = Analyzer::default();
        let nd = CheckOutcome::NoData {
            reason: "empty".into(),
        };
        let pe = CheckOutcome::ProviderError {
            message: "down".into(),
        };
        assert_eq!(a.record(&r, &nd), Verdict::Continue);
        assert_eq!(a.record(&r, &pe), Verdict::Continue);
        assert_eq!(a.record(&r, &nd), Verdict::Continue);
        // A pass resets the count.
        assert_eq!(a.record(&r, &CheckOutcome::Pass), Verdict::Continue);
        assert_eq!(a.consecutive_inconclusive, 0);
        for _ in 0..3 {
            assert_eq!(a.record(&r, &pe), Verdict::Continue);
        }
        match a.record(&r, &pe) {
            Verdict::Rollback(why) => assert!(why.contains("4 time(s) in a row"), "{why}"),
            v => panic!("expected rollback, got {v:?}"),
        }
        let fail = CheckOutcome::Fail {
            metric: AnalysisMetric::ErrorRate,
            value: 0.5,
            threshold: 0.01,
            stage: 1,
        };
        assert!(matches!(
            Analyzer::default().record(&r, &fail),
            Verdict::Rollback(_)
        ));
    }

    fn judged(error_judge: ErrorRateJudge, latency_judge: LatencyJudge) -> AnalysisRules {
        AnalysisRules {
            error_judge,
            latency_judge,
            ..AnalysisRules::default()
        }
    }

    fn spread(from: f64) -> Measured<Distribution> {
        Measured::Value(Distribution::from_samples(
            (0..400).map(|i| from + 0.1 * f64::from(i) / 400.0),
        ))
    }

    #[test]
    fn a_score_between_marginal_and_pass_is_marginal_not_a_pass() {
        let mut r = judged(ErrorRateJudge::Threshold, LatencyJudge::MannWhitney);
        r.score.errors_weight = 80.0;
        r.score.latency_weight = 20.0;
        let inputs = JudgeInputs {
            canary_latency: Some(spread(0.2)),
            stable_latency: Some(spread(0.1)),
            ..JudgeInputs::default()
        };
        let o = obs(Value(0.001), Value(0.1), Value(0.001));
        let j = r.judge(1, &o, &inputs, &mut SequentialState::default());
        assert!(
            matches!(&j.outcome, CheckOutcome::NoData { reason } if reason == "marginal score 80 (passes at 95, fails below 75)"),
            "{:?}",
            j.outcome
        );
        assert!(j.outcome.is_inconclusive());
        // With the default weights the same latency fails the check.
        let j = AnalysisRules {
            score: ScoreThresholds::default(),
            ..r
        }
        .judge(1, &o, &inputs, &mut SequentialState::default());
        assert_eq!(metric(&j.outcome), Some(AnalysisMetric::LatencyDistribution));
    }

    #[test]
    fn the_judges_skip_the_comparison_when_stable_has_no_traffic() {
        let r = judged(ErrorRateJudge::Sequential, LatencyJudge::MannWhitney);
        let inputs = JudgeInputs {
            canary_counts: Some(Measured::Value(Counts {
                requests: 3000.0,
                errors: 3.0,
            })),
            stable_counts: Some(Measured::NoData),
            canary_latency: Some(spread(0.1)),
            stable_latency: Some(Measured::NoData),
        };
        let o = obs(Value(0.001), Value(0.1), NoData);
        let j = r.judge(5, &o, &inputs, &mut SequentialState::default());
        assert_eq!(j.outcome, CheckOutcome::Pass);
        // A provider error is not "no traffic": the check is inconclusive.
        let down = JudgeInputs {
            stable_latency: Some(Measured::ProviderError("refused".into())),
            ..inputs
        };
        let j = r.judge(5, &o, &down, &mut SequentialState::default());
        assert!(
            matches!(&j.outcome, CheckOutcome::ProviderError { message } if message == "stable latency distribution: refused"),
            "{:?}",
            j.outcome
        );
    }

    #[test]
    fn in_judge_mode_the_absolute_limit_allows_for_noise_on_few_requests() {
        let r = judged(ErrorRateJudge::Sequential, LatencyJudge::Threshold);
        let inputs = JudgeInputs {
            canary_counts: Some(Measured::Value(Counts {
                requests: 50.0,
                errors: 1.0,
            })),
            stable_counts: Some(Measured::Value(Counts {
                requests: 950.0,
                errors: 3.0,
            })),
            ..JudgeInputs::default()
        };
        // One error in 50 requests: 2 %, over 1 % but within noise.
        let mut o = obs(Value(0.02), Value(0.1), Value(0.003));
        o.canary_requests = Some(Value(50.0));
        let j = r.judge(1, &o, &inputs, &mut SequentialState::default());
        assert_ne!(
            metric(&j.outcome),
            Some(AnalysisMetric::ErrorRate),
            "{:?}",
            j.outcome
        );
        // The thresholds alone fail it.
        assert_eq!(
            metric(&AnalysisRules::default().evaluate(1, &o)),
            Some(AnalysisMetric::ErrorRate)
        );
        // 20 % of 500 requests is beyond any noise.
        let mut big = obs(Value(0.2), Value(0.1), Value(0.003));
        big.canary_requests = Some(Value(500.0));
        let j = r.judge(1, &big, &inputs, &mut SequentialState::default());
        assert_eq!(metric(&j.outcome), Some(AnalysisMetric::ErrorRate));
    }

    #[test]
    fn validation_names_the_field() {
        let cases: Vec<(AnalysisRules, &str)> = vec![
            (
                AnalysisRules {
                    error_threshold: 1.5,
                    ..Default::default()
                },
                "analysis.error_threshold",
            ),
            (
                AnalysisRules {
                    error_threshold: f64::NAN,
                    ..Default::default()
                },
                "analysis.error_threshold",
            ),
            (
                AnalysisRules {
                    latency_threshold: Duration::ZERO,
                    ..Default::default()
                },
                "analysis.latency_threshold",
            ),
            (
                AnalysisRules {
                    max_error_ratio: 0.5,
                    ..Default::default()
                },
                "analysis.max_error_ratio",
            ),
            (
                AnalysisRules {
                    ratio_floor: -0.1,
                    ..Default::default()
                },
                "analysis.ratio_floor",
            ),
            (
                AnalysisRules {
                    ratio_significance: -1.0,
                    ..Default::default()
                },
                "analysis.ratio_significance",
            ),
            (
                AnalysisRules {
                    inconclusive_limit: 0,
                    ..Default::default()
                },
                "analysis.inconclusive_limit",
            ),
            (
                AnalysisRules {
                    window: Duration::from_millis(10),
                    ..Default::default()
                },
                "analysis.window",
            ),
        ];
        for (rules, field) in cases {
            let e = rules.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        AnalysisRules::default().validate().unwrap();
    }

    #[test]
    fn measurements_hold_every_value_with_data_and_its_limit() {
        let rules = AnalysisRules {
            ratio_significance: 0.0,
            ..AnalysisRules::default()
        };
        let obs = Observations {
            canary_error_rate: Observation::Value(0.004),
            canary_p99: Observation::Value(0.2),
            stable_error_rate: Observation::Value(0.001),
            canary_requests: None,
            stable_requests: None,
        };
        let got: Vec<(AnalysisMetric, f64, f64)> = rules
            .measurements(&obs, &[])
            .into_iter()
            .map(|m| (m.metric, m.value, m.threshold))
            .collect();
        assert_eq!(
            got,
            [
                (AnalysisMetric::ErrorRate, 0.004, 0.01),
                (AnalysisMetric::LatencyP99, 0.2, 0.5),
                (AnalysisMetric::ErrorRateVsStable, 0.004, 0.002),
            ]
        );
        // A missing value is left out rather than recorded as 0.
        let no_p99 = Observations {
            canary_p99: Observation::NoData,
            stable_error_rate: Observation::NoData,
            ..obs
        };
        let metrics: Vec<_> = rules
            .measurements(&no_p99, &[])
            .into_iter()
            .map(|m| m.metric)
            .collect();
        assert_eq!(metrics, [AnalysisMetric::ErrorRate]);
    }
}
