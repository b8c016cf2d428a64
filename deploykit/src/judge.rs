//! Statistical judges for the canary analysis: an anytime-valid sequential
//! test for error rates and a Kayenta-style Mann-Whitney U judge for latency
//! distributions, with Kayenta's score and pass/marginal thresholds.
//!
//! The threshold rules of [`crate::analysis`] compare one window's numbers
//! with fixed limits. Checked every interval, any such comparison is a new
//! chance to be fooled by noise; loosening it to avoid false rollbacks makes
//! real regressions slow to catch. The judges here answer the question
//! differently.
//!
//! # Sequential error-rate test
//!
//! Each check reads the requests and errors each track served since the
//! previous check. Given how many errors there were in all, the share that
//! fell on the canary is binomial with a known success probability when the
//! canary errs at the same rate as stable (`θ₀ = n_c / (n_c + n_s)`, the
//! canary's share of requests). For a canary that errs `ρ` times as often,
//! that probability is `ρ·n_c / (ρ·n_c + n_s)`. The product of likelihood
//! ratios over checks, averaged over a grid of `ρ` (a mixture sequential
//! probability ratio test), is an *e-process*: under "the canary errs at
//! most [`tolerated_ratio`](SequentialSettings::tolerated_ratio) times as
//! often as stable" its expected value never exceeds 1, so by Ville's
//! inequality it reaches `1/α` with probability at most `α`, **however often
//! it is looked at**. Checking every 10 s instead of every minute does not
//! add false rollbacks; it only detects sooner.
//!
//! Worked number: at 25 % canary traffic, 100 requests/s and 30 s between
//! checks, a canary erring 1.5 % against stable's 0.3 % brings about 11
//! canary errors and 7 stable ones per check; the likelihood ratio for
//! `ρ = 5` grows by `e^5.6 ≈ 270` per check, past the default `1/α = 200`
//! (times the grid's and the stages' weights) in about two checks. A good
//! canary's evidence hovers below 1. Each canary stage starts a fresh
//! product (see [`SequentialState`]), so the evidence a good stage gathered
//! for "no worse" does not slow the detection of a bad later stage.
//!
//! # Mann-Whitney U judge (latency)
//!
//! Each check reads the latency distribution of each track since the
//! previous check (raw samples or histogram buckets), and runs a two-sample
//! Mann-Whitney U test (ties by mid-ranks, normal approximation) with the
//! Hodges-Lehmann estimate of the shift (the median of all canary−stable
//! differences) and its confidence interval. As in Kayenta the metric is
//! classified [`High`](Classification::High) when the interval lies above 0
//! and the canary's mean is at least
//! [`allowed_increase`](MannWhitneySettings::allowed_increase) times
//! stable's, [`Low`](Classification::Low) for the mirror image,
//! [`NoData`](Classification::NoData) with too few samples, and
//! [`Pass`](Classification::Pass) otherwise. The
//! [`direction`](MannWhitneySettings::direction) says which of High and Low
//! fail. The effect-size limit matters: with thousands of requests per check
//! a test alone would call a 2 ms shift significant.
//!
//! # Score
//!
//! As in a Kayenta canary config, each metric group (errors, latency) has a
//! weight; a check's score is the weighted share of groups that passed,
//! among the groups with data, in percent. A score below
//! [`marginal`](ScoreThresholds::marginal) fails the check, one at or above
//! [`pass`](ScoreThresholds::pass) passes it, and one in between is
//! marginal: neither, so it counts towards the inconclusive limit.
//!
//! ```
//! use deploykit::judge::{Counts, SequentialSettings, SequentialState};
//!
//! let settings = SequentialSettings::default();
//! let mut state = SequentialState::default();
//! // Stable errs 0.3 %, the canary 5 %, at 25 % of 100 requests/s, 30 s.
//! let canary = Counts { requests: 750.0, errors: 37.0 };
//! let stable = Counts { requests: 2250.0, errors: 7.0 };
//! let check = state.update(&settings, canary, stable);
//! assert!(check.rejected, "{check}");
//! ```

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the canary's error rate is judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorRateJudge {
    /// The threshold rules of [`crate::analysis`]: an absolute limit and a
    /// limit relative to stable, on the trailing window. The default.
    #[default]
    Threshold,
    /// The absolute limit, and instead of the relative rule the
    /// anytime-valid sequential test of the [module docs](self).
    Sequential,
}

/// How the canary's latency is judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyJudge {
    /// The p99 threshold of [`crate::analysis`]. The default.
    #[default]
    Threshold,
    /// The p99 threshold, and the Mann-Whitney U comparison of the latency
    /// distributions of the [module docs](self).
    MannWhitney,
}

/// Which change of a metric is a regression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Higher is worse (latency, errors). The default.
    #[default]
    Increase,
    /// Lower is worse (throughput, cache hits).
    Decrease,
    /// Any significant change is a regression.
    Either,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Increase => "increase",
            Direction::Decrease => "decrease",
            Direction::Either => "either",
        })
    }
}

/// Settings of the sequential error-rate test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SequentialSettings {
    /// The highest probability of rolling back a canary that errs no more
    /// than `tolerated_ratio` times as often as stable, over the whole
    /// analysis however many checks it makes. Default 0.005.
    pub alpha: f64,
    /// The canary may err this many times as often as stable without being
    /// a regression (1: no worse than stable). Default 1.
    pub tolerated_ratio: f64,
    /// Requests the canary must have served since the analysis began before
    /// a check can pass or fail on this test. Default 100.
    pub min_requests: u64,
}

impl Default for SequentialSettings {
    fn default() -> Self {
        Self {
            alpha: 0.005,
            tolerated_ratio: 1.0,
            min_requests: 100,
        }
    }
}

/// Settings of the Mann-Whitney U latency judge (Kayenta's classifier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MannWhitneySettings {
    /// Confidence level of the Hodges-Lehmann interval. Default 0.99.
    pub confidence: f64,
    /// Which change fails. Default `increase`.
    pub direction: Direction,
    /// The canary's mean latency may be up to this many times stable's
    /// before a significant increase is `High` (Kayenta's
    /// `effectSize.allowedIncrease`). Default 1.1.
    pub allowed_increase: f64,
    /// The canary's mean may be down to this many times stable's before a
    /// significant decrease is `Low`. Default 0.9.
    pub allowed_decrease: f64,
    /// Samples each track needs in the interval for a classification other
    /// than `NoData`. Default 50.
    pub min_samples: u64,
}

impl Default for MannWhitneySettings {
    fn default() -> Self {
        Self {
            confidence: 0.99,
            direction: Direction::Increase,
            allowed_increase: 1.1,
            allowed_decrease: 0.9,
            min_samples: 50,
        }
    }
}

/// Kayenta's `classifier`: group weights and score thresholds, used when a
/// statistical judge is selected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScoreThresholds {
    /// Weight of the errors group. Default 50.
    pub errors_weight: f64,
    /// Weight of the latency group. Default 50.
    pub latency_weight: f64,
    /// A score (0–100) at or above this passes. Default 95.
    pub pass: f64,
    /// A score below this fails; between `marginal` and `pass` it is
    /// marginal. Default 75.
    pub marginal: f64,
}

impl Default for ScoreThresholds {
    fn default() -> Self {
        Self {
            errors_weight: 50.0,
            latency_weight: 50.0,
            pass: 95.0,
            marginal: 75.0,
        }
    }
}

impl SequentialSettings {
    /// Checks the settings, naming fields under `prefix`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `alpha` (not within 0–0.5, exclusive)
    /// or `tolerated_ratio` (not finite or below 1).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if !(self.alpha.is_finite() && self.alpha > 0.0 && self.alpha < 0.5) {
            return Err(Error::invalid(
                format!("{prefix}.alpha"),
                format!(
                    "{} must be a probability between 0 and 0.5 (the false rollback rate you accept); write e.g. 0.005",
                    self.alpha
                ),
            ));
        }
        if !(self.tolerated_ratio.is_finite() && self.tolerated_ratio >= 1.0) {
            return Err(Error::invalid(
                format!("{prefix}.tolerated_ratio"),
                format!(
                    "{} must be a number >= 1 (how many times stable's error rate the canary may have); write e.g. 1",
                    self.tolerated_ratio
                ),
            ));
        }
        Ok(())
    }
}

impl MannWhitneySettings {
    /// Checks the settings, naming fields under `prefix`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `confidence` (not within 0.5–1,
    /// exclusive), `allowed_increase` (below 1), `allowed_decrease` (not
    /// within 0–1) or `min_samples` (0).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        if !(self.confidence.is_finite() && self.confidence > 0.5 && self.confidence < 1.0) {
            return Err(Error::invalid(
                format!("{prefix}.confidence"),
                format!("{} must be between 0.5 and 1; write e.g. 0.99", self.confidence),
            ));
        }
        if !(self.allowed_increase.is_finite() && self.allowed_increase >= 1.0) {
            return Err(Error::invalid(
                format!("{prefix}.allowed_increase"),
                format!(
                    "{} must be a ratio >= 1 (canary mean over stable mean); write e.g. 1.1",
                    self.allowed_increase
                ),
            ));
        }
        if !(self.allowed_decrease.is_finite() && self.allowed_decrease > 0.0 && self.allowed_decrease <= 1.0)
        {
            return Err(Error::invalid(
                format!("{prefix}.allowed_decrease"),
                format!(
                    "{} must be a ratio from 0 to 1 (canary mean over stable mean); write e.g. 0.9",
                    self.allowed_decrease
                ),
            ));
        }
        if self.min_samples == 0 {
            return Err(Error::invalid(
                format!("{prefix}.min_samples"),
                "is 0; a comparison needs samples, write e.g. 50",
            ));
        }
        Ok(())
    }
}

impl ScoreThresholds {
    /// Checks the settings, naming fields under `prefix`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming a weight (negative, or both 0),
    /// `pass` or `marginal` (not within 0–100, or marginal above pass).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        for (name, w) in [
            ("errors_weight", self.errors_weight),
            ("latency_weight", self.latency_weight),
        ] {
            if !(w.is_finite() && w >= 0.0) {
                return Err(Error::invalid(
                    format!("{prefix}.{name}"),
                    format!("{w} must be a weight >= 0; write e.g. 50"),
                ));
            }
        }
        if self.errors_weight + self.latency_weight <= 0.0 {
            return Err(Error::invalid(
                format!("{prefix}.errors_weight"),
                "and latency_weight are both 0; give at least one group a weight, e.g. 50",
            ));
        }
        for (name, v) in [("pass", self.pass), ("marginal", self.marginal)] {
            if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
                return Err(Error::invalid(
                    format!("{prefix}.{name}"),
                    format!("{v} must be a score from 0 to 100; write e.g. 95 for pass, 75 for marginal"),
                ));
            }
        }
        if self.marginal > self.pass {
            return Err(Error::invalid(
                format!("{prefix}.marginal"),
                format!(
                    "{} is above pass ({}); a marginal score lies below the pass score",
                    self.marginal, self.pass
                ),
            ));
        }
        Ok(())
    }
}

/// Requests and errors a track served in a window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    /// Requests served.
    pub requests: f64,
    /// Of which errors (5xx).
    pub errors: f64,
}

/// A latency distribution: values in seconds, each with how many requests
/// had it (1 per raw sample; a bucket's count for a histogram, at the
/// bucket's upper bound).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// `(seconds, count)` pairs, in any order.
    pub points: Vec<(f64, f64)>,
}

impl Distribution {
    /// A distribution of raw samples (seconds).
    pub fn from_samples(samples: impl IntoIterator<Item = f64>) -> Self {
        Self {
            points: samples.into_iter().map(|s| (s, 1.0)).collect(),
        }
    }

    /// A distribution from cumulative histogram buckets `(upper bound
    /// seconds, requests at or below it)`, as Prometheus keeps them; each
    /// bucket's requests sit at its upper bound, and those of the `+Inf`
    /// bucket at twice the largest finite bound (ranks only need the order).
    pub fn from_cumulative_buckets(buckets: &[(f64, f64)]) -> Self {
        let mut b: Vec<(f64, f64)> = buckets.iter().copied().filter(|(le, _)| !le.is_nan()).collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        let largest_finite = b
            .iter()
            .rev()
            .find(|(le, _)| le.is_finite())
            .map_or(1.0, |(le, _)| *le);
        let mut points = Vec::with_capacity(b.len());
        let mut below = 0.0;
        for (le, cumulative) in b {
            let n = (cumulative - below).max(0.0);
            below = cumulative.max(below);
            if n > 0.0 {
                let at = if le.is_finite() { le } else { largest_finite * 2.0 };
                points.push((at, n));
            }
        }
        Self { points }
    }

    /// Requests in the distribution.
    pub fn count(&self) -> f64 {
        self.points.iter().map(|(_, n)| n).sum()
    }

    fn mean(&self) -> f64 {
        let n = self.count();
        if n <= 0.0 {
            return f64::NAN;
        }
        self.points.iter().map(|(v, c)| v * c).sum::<f64>() / n
    }
}

/// What a metrics source answered for counts or a distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Measured<T> {
    /// The answer.
    Value(T),
    /// The query ran but there is no data. Never healthy.
    NoData,
    /// The provider could not answer.
    ProviderError(String),
}

/// How one metric of one check was classified (Kayenta's classes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Classification {
    /// No significant regression.
    Pass,
    /// Significantly higher than stable, beyond the allowed effect.
    High,
    /// Significantly lower than stable, beyond the allowed effect.
    Low,
    /// Too little data to judge.
    NoData,
}

impl fmt::Display for Classification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Classification::Pass => "pass",
            Classification::High => "high",
            Classification::Low => "low",
            Classification::NoData => "no data",
        })
    }
}

/// Multiples of the tolerated ratio the sequential test's mixture puts
/// equal weight on: wide enough to catch a canary erring 1.5 times as often
/// and one erring twenty times as often without tuning.
const RATIO_GRID: [f64; 6] = [1.5, 2.0, 3.0, 5.0, 10.0, 20.0];

/// The sequential test's evidence so far, carried across checks and stages
/// of one analysis.
///
/// A fresh likelihood-ratio product starts at each canary stage, and the
/// e-value is their average weighted by `1/stages`: a good first stage
/// then leaves no "evidence debt" that a bad later stage must first pay
/// off, and the average of e-processes started at fixed times is still an
/// e-process, so `alpha` holds over the whole analysis.
#[derive(Debug, Clone, Default)]
pub struct SequentialState {
    /// Per started stage: log likelihood ratio per grid point of
    /// [`RATIO_GRID`].
    log_lr: Vec<Vec<f64>>,
    /// The number of stages of the analysis (each stage's weight is 1 over
    /// it); at least the number started.
    stages: usize,
    /// The stage the last update was for.
    stage: usize,
    canary: Option<Counts>,
    stable: Option<Counts>,
    rejected: bool,
}

// Compared bit for bit so a state holding the same numbers is equal,
// which makes `Analyzer` comparable in tests.
impl PartialEq for SequentialState {
    fn eq(&self, other: &Self) -> bool {
        let bits = |v: &[Vec<f64>]| {
            v.iter()
                .map(|s| s.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        let cbits = |c: &Option<Counts>| c.map(|c| (c.requests.to_bits(), c.errors.to_bits()));
        bits(&self.log_lr) == bits(&other.log_lr)
            && self.stages == other.stages
            && self.stage == other.stage
            && cbits(&self.canary) == cbits(&other.canary)
            && cbits(&self.stable) == cbits(&other.stable)
            && self.rejected == other.rejected
    }
}

impl Eq for SequentialState {}

/// One check of the sequential test, as events and reports show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SequentialCheck {
    /// The canary's requests and errors since the analysis began.
    pub canary: Counts,
    /// Stable's requests and errors since the analysis began.
    pub stable: Counts,
    /// The canary's error rate over stable's since the analysis began
    /// (`None` while stable has no errors or the canary no requests).
    pub rate_ratio: Option<f64>,
    /// A 95 % interval of the rate ratio (fixed-sample, for reading; the
    /// decision uses the e-value).
    pub ratio_interval: Option<(f64, f64)>,
    /// The evidence against "the canary errs at most `tolerated_ratio`
    /// times as often as stable" (an e-value; 1 is none).
    pub e_value: f64,
    /// The e-value at which the test rejects: `1/alpha`.
    pub threshold: f64,
    /// Whether it rejected (now or at an earlier check: rejection is final).
    pub rejected: bool,
    /// Whether the canary has served the minimum number of requests.
    pub enough_requests: bool,
}

impl SequentialCheck {
    /// The classification this check gives the errors group.
    pub fn classification(&self) -> Classification {
        if self.rejected {
            Classification::High
        } else if !self.enough_requests {
            Classification::NoData
        } else {
            Classification::Pass
        }
    }
}

impl fmt::Display for SequentialCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rate = |c: &Counts| {
            if c.requests > 0.0 {
                c.errors / c.requests * 100.0
            } else {
                0.0
            }
        };
        write!(
            f,
            "sequential error-rate test: canary {:.0} error(s) in {:.0} request(s) ({:.2} %), stable {:.0} in {:.0} ({:.2} %)",
            self.canary.errors,
            self.canary.requests,
            rate(&self.canary),
            self.stable.errors,
            self.stable.requests,
            rate(&self.stable),
        )?;
        match (self.rate_ratio, self.ratio_interval) {
            (Some(r), Some((lo, hi))) => write!(f, "; rate ratio {r:.2} (95 % interval {lo:.2} to {hi:.2})")?,
            (Some(r), None) => write!(f, "; rate ratio {r:.2}")?,
            _ => {}
        }
        write!(
            f,
            "; evidence {} (rolls back at {:.0}): {}",
            format_e(self.e_value),
            self.threshold,
            if self.rejected {
                "canary errs more than stable"
            } else if !self.enough_requests {
                "too few canary requests yet"
            } else {
                "no significant difference"
            }
        )
    }
}

fn format_e(e: f64) -> String {
    if e >= 1e6 {
        format!("{e:.2e}")
    } else if e >= 10.0 {
        format!("{e:.0}")
    } else {
        format!("{e:.2}")
    }
}

impl SequentialState {
    /// Adds the counts each track served since the previous check and
    /// returns the test's state after them, for an analysis of one stage.
    pub fn update(
        &mut self,
        settings: &SequentialSettings,
        canary: Counts,
        stable: Counts,
    ) -> SequentialCheck {
        self.update_in_stage(settings, 1, 1, canary, stable)
    }

    /// As [`update`](Self::update), for stage `stage` (1-based) of `stages`:
    /// a new stage starts a fresh likelihood-ratio product.
    pub fn update_in_stage(
        &mut self,
        settings: &SequentialSettings,
        stage: usize,
        stages: usize,
        canary: Counts,
        stable: Counts,
    ) -> SequentialCheck {
        if self.log_lr.is_empty() || stage != self.stage {
            self.log_lr.push(vec![0.0; RATIO_GRID.len()]);
            self.stage = stage;
        }
        self.stages = self.stages.max(stages).max(self.log_lr.len());
        let clean = |c: Counts| Counts {
            requests: finite_nonneg(c.requests),
            errors: finite_nonneg(c.errors).min(finite_nonneg(c.requests)).round(),
        };
        let (c, s) = (clean(canary), clean(stable));
        let rho0 = settings.tolerated_ratio;
        if c.requests > 0.0 && s.requests > 0.0 && c.errors + s.errors > 0.0 {
            let share = |rho: f64| rho * c.requests / (rho * c.requests + s.requests);
            let theta0 = share(rho0);
            let current = self.log_lr.last_mut().expect("a stage was started");
            for (l, m) in current.iter_mut().zip(RATIO_GRID) {
                let theta = share(rho0 * m);
                *l += c.errors * (theta / theta0).ln() + s.errors * ((1.0 - theta) / (1.0 - theta0)).ln();
            }
        }
        let add = |acc: Option<Counts>, x: Counts| {
            let a = acc.unwrap_or(Counts {
                requests: 0.0,
                errors: 0.0,
            });
            Some(Counts {
                requests: a.requests + x.requests,
                errors: a.errors + x.errors,
            })
        };
        self.canary = add(self.canary, c);
        self.stable = add(self.stable, s);
        let e_value = self.e_value();
        let threshold = 1.0 / settings.alpha;
        let total_c = self.canary.expect("just set");
        let enough_requests = total_c.requests >= settings.min_requests as f64;
        if e_value >= threshold && enough_requests {
            self.rejected = true;
        }
        let total_s = self.stable.expect("just set");
        let (rate_ratio, ratio_interval) = rate_ratio(total_c, total_s);
        SequentialCheck {
            canary: total_c,
            stable: total_s,
            rate_ratio,
            ratio_interval,
            e_value,
            threshold,
            rejected: self.rejected,
            enough_requests,
        }
    }

    /// The mixture's e-value: the average likelihood ratio over the grid,
    /// averaged over the stages.
    pub fn e_value(&self) -> f64 {
        if self.log_lr.is_empty() {
            return 1.0;
        }
        let per_stage = |lr: &Vec<f64>| {
            let max = lr.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = lr.iter().map(|l| (l - max).exp()).sum();
            (max + (sum / lr.len() as f64).ln()).exp()
        };
        let stages = self.stages.max(self.log_lr.len()) as f64;
        let started: f64 = self.log_lr.iter().map(per_stage).sum();
        // A stage not started yet contributes its starting value, 1.
        (started + (stages - self.log_lr.len() as f64)) / stages
    }
}

fn finite_nonneg(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

/// The rate ratio and a 95 % log-normal interval (with half a count added
/// to each error count so a 0 still gives an interval).
fn rate_ratio(c: Counts, s: Counts) -> (Option<f64>, Option<(f64, f64)>) {
    if c.requests <= 0.0 || s.requests <= 0.0 {
        return (None, None);
    }
    let ratio = (s.errors > 0.0).then(|| (c.errors / c.requests) / (s.errors / s.requests));
    let (ce, se) = (c.errors + 0.5, s.errors + 0.5);
    let log_r = ((ce / c.requests) / (se / s.requests)).ln();
    let sd = (1.0 / ce + 1.0 / se).sqrt();
    let z = 1.959_963_984_540_054;
    (ratio, Some(((log_r - z * sd).exp(), (log_r + z * sd).exp())))
}

/// One Mann-Whitney U comparison of canary against stable latency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MannWhitneyCheck {
    /// Canary requests compared.
    pub canary_samples: f64,
    /// Stable requests compared.
    pub stable_samples: f64,
    /// The U statistic of the canary.
    pub u: f64,
    /// U standardised (tie-corrected, continuity-corrected); positive when
    /// the canary is slower.
    pub z: f64,
    /// Two-sided p-value of "same distribution".
    pub p_value: f64,
    /// Hodges-Lehmann estimate of the shift canary − stable, seconds.
    pub shift: f64,
    /// Its confidence interval, seconds.
    pub interval: (f64, f64),
    /// The interval's confidence level.
    pub confidence: f64,
    /// Canary mean over stable mean (the effect size).
    pub mean_ratio: f64,
    /// The classification.
    pub classification: Classification,
}

impl fmt::Display for MannWhitneyCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.classification == Classification::NoData {
            return write!(
                f,
                "Mann-Whitney latency comparison: no data ({:.0} canary and {:.0} stable sample(s))",
                self.canary_samples, self.stable_samples
            );
        }
        write!(
            f,
            "Mann-Whitney latency comparison: {:.0} canary vs {:.0} stable sample(s); shift {:+.1} ms ({:.0} % interval {:+.1} to {:+.1} ms); canary mean {:.2}x stable; U {:.0}, z {:.2}, p {}: {}",
            self.canary_samples,
            self.stable_samples,
            self.shift * 1000.0,
            self.confidence * 100.0,
            self.interval.0 * 1000.0,
            self.interval.1 * 1000.0,
            self.mean_ratio,
            self.u,
            self.z,
            format_p(self.p_value),
            self.classification
        )
    }
}

fn format_p(p: f64) -> String {
    if p < 1e-4 {
        "< 0.0001".into()
    } else {
        format!("{p:.4}")
    }
}

/// Compares `canary` with `stable` (Kayenta's Mann-Whitney classifier).
pub fn mann_whitney(
    settings: &MannWhitneySettings,
    canary: &Distribution,
    stable: &Distribution,
) -> MannWhitneyCheck {
    let clean = |d: &Distribution| -> Vec<(f64, f64)> {
        let mut p: Vec<(f64, f64)> = d
            .points
            .iter()
            .copied()
            .filter(|(v, n)| !v.is_nan() && n.is_finite() && *n > 0.0)
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let (c, s) = (clean(canary), clean(stable));
    let n: f64 = c.iter().map(|p| p.1).sum();
    let m: f64 = s.iter().map(|p| p.1).sum();
    let no_data = MannWhitneyCheck {
        canary_samples: n,
        stable_samples: m,
        u: f64::NAN,
        z: 0.0,
        p_value: 1.0,
        shift: 0.0,
        interval: (0.0, 0.0),
        confidence: settings.confidence,
        mean_ratio: f64::NAN,
        classification: Classification::NoData,
    };
    let min = settings.min_samples as f64;
    if n < min || m < min {
        return no_data;
    }
    // Mid-ranks over the merged values, ties grouped.
    let mut merged: Vec<(f64, f64, f64)> = Vec::with_capacity(c.len() + s.len()); // value, canary, stable
    let (mut i, mut j) = (0, 0);
    while i < c.len() || j < s.len() {
        let v = match (c.get(i), s.get(j)) {
            (Some(a), Some(b)) => a.0.min(b.0),
            (Some(a), None) => a.0,
            (None, Some(b)) => b.0,
            (None, None) => unreachable!(),
        };
        let (mut nc, mut ns) = (0.0, 0.0);
        while let Some(a) = c.get(i).filter(|a| a.0 == v) {
            nc += a.1;
            i += 1;
        }
        while let Some(b) = s.get(j).filter(|b| b.0 == v) {
            ns += b.1;
            j += 1;
        }
        merged.push((v, nc, ns));
    }
    let total = n + m;
    let (mut below, mut rank_sum, mut ties) = (0.0, 0.0, 0.0);
    for (_, nc, ns) in &merged {
        let t = nc + ns;
        let mid = below + (t + 1.0) / 2.0;
        rank_sum += nc * mid;
        ties += t * t * t - t;
        below += t;
    }
    let u = rank_sum - n * (n + 1.0) / 2.0;
    let mean_u = n * m / 2.0;
    let var_u = n * m / 12.0 * ((total + 1.0) - ties / (total * (total - 1.0)));
    let sd = var_u.max(0.0).sqrt();
    let z = if sd > 0.0 {
        let d = u - mean_u;
        (d - 0.5 * d.signum()).abs().copysign(d) / sd
    } else {
        0.0
    };
    let p_value = (2.0 * normal_sf(z.abs())).min(1.0);
    // Hodges-Lehmann: quantiles of all pairwise differences, weighted.
    let mut diffs: Vec<(f64, f64)> = Vec::with_capacity(c.len() * s.len());
    for (cv, cn) in &c {
        for (sv, sn) in &s {
            diffs.push((cv - sv, cn * sn));
        }
    }
    diffs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let pairs = n * m;
    let quantile = |k: f64| {
        // The value of the k-th smallest difference (1-based, clamped).
        let k = k.clamp(1.0, pairs);
        let mut acc = 0.0;
        for (d, w) in &diffs {
            acc += w;
            if acc >= k {
                return *d;
            }
        }
        diffs.last().map_or(0.0, |d| d.0)
    };
    let shift = (quantile((pairs / 2.0).floor().max(1.0)) + quantile((pairs / 2.0).floor() + 1.0)) / 2.0;
    let zq = normal_quantile(1.0 - (1.0 - settings.confidence) / 2.0);
    let k = (mean_u - zq * sd).floor();
    let interval = (quantile(k + 1.0), quantile(pairs - k));
    let mean_ratio = {
        let (mc, ms) = (mean(&c), mean(&s));
        if ms > 0.0 {
            mc / ms
        } else {
            f64::NAN
        }
    };
    let up = matches!(settings.direction, Direction::Increase | Direction::Either);
    let down = matches!(settings.direction, Direction::Decrease | Direction::Either);
    let classification = if up && interval.0 > 0.0 && mean_ratio >= settings.allowed_increase {
        Classification::High
    } else if down && interval.1 < 0.0 && mean_ratio <= settings.allowed_decrease {
        Classification::Low
    } else {
        Classification::Pass
    };
    MannWhitneyCheck {
        u,
        z,
        p_value,
        shift,
        interval,
        mean_ratio,
        classification,
        ..no_data
    }
}

fn mean(points: &[(f64, f64)]) -> f64 {
    Distribution {
        points: points.to_vec(),
    }
    .mean()
}

/// A check's Kayenta score: the weighted share (percent) of the groups
/// with data that passed; `None` when no group has data.
pub fn score(thresholds: &ScoreThresholds, errors: Classification, latency: Classification) -> Option<f64> {
    let mut weight = 0.0;
    let mut passed = 0.0;
    for (w, c) in [
        (thresholds.errors_weight, errors),
        (thresholds.latency_weight, latency),
    ] {
        if c == Classification::NoData || w <= 0.0 {
            continue;
        }
        weight += w;
        if c == Classification::Pass {
            passed += w;
        }
    }
    (weight > 0.0).then(|| passed / weight * 100.0)
}

/// The upper tail of the standard normal distribution, `P(Z > z)`.
pub(crate) fn normal_sf(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// `erfc` with a relative error under 1.2e-7 (Numerical Recipes' Chebyshev
/// fit), enough for p-values shown to four places.
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// The standard normal quantile (Acklam's rational approximation, relative
/// error under 1.2e-9).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    let low = 0.024_25;
    if p < low {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p <= 1.0 - low {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -normal_quantile(1.0 - p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(requests: f64, errors: f64) -> Counts {
        Counts { requests, errors }
    }

    #[test]
    fn normal_functions_match_tables() {
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-6);
        assert!((normal_quantile(0.005) + 2.575_829).abs() < 1e-6);
        assert!((normal_sf(1.959_964) - 0.025).abs() < 1e-6);
        assert!((normal_sf(-1.0) - 0.841_345).abs() < 1e-6);
    }

    #[test]
    fn sequential_test_rejects_a_bad_canary_quickly() {
        let s = SequentialSettings::default();
        let mut st = SequentialState::default();
        // 1.5 % against 0.3 % at 25 % traffic: expected 11 and 7 errors.
        let first = st.update(&s, counts(750.0, 11.0), counts(2250.0, 7.0));
        let second = st.update(&s, counts(750.0, 12.0), counts(2250.0, 6.0));
        assert!(
            first.rejected || second.rejected,
            "first: {first}\nsecond: {second}"
        );
        assert!(second.e_value > first.e_value);
        assert_eq!(second.canary, counts(1500.0, 23.0));
        let r = second.rate_ratio.unwrap();
        assert!((r - (23.0 / 1500.0) / (13.0 / 4500.0)).abs() < 1e-9);
        let (lo, hi) = second.ratio_interval.unwrap();
        assert!(lo < r && r < hi && lo > 1.0, "{lo} {r} {hi}");
        assert!(
            second.to_string().contains("canary errs more than stable"),
            "{second}"
        );
    }

    #[test]
    fn sequential_test_stays_quiet_for_a_good_canary() {
        let s = SequentialSettings::default();
        let mut st = SequentialState::default();
        // Errors exactly in proportion to traffic, 50 checks.
        for _ in 0..50 {
            let c = st.update(&s, counts(150.0, 1.0), counts(2850.0, 19.0));
            assert!(!c.rejected, "{c}");
            assert!(c.e_value < 1.0, "{c}");
        }
    }

    #[test]
    fn a_rejection_is_final_and_waits_for_the_minimum_sample() {
        let s = SequentialSettings {
            min_requests: 1000,
            ..Default::default()
        };
        let mut st = SequentialState::default();
        let c = st.update(&s, counts(500.0, 50.0), counts(5000.0, 5.0));
        assert!(c.e_value >= c.threshold && !c.rejected, "{c}");
        assert_eq!(c.classification(), Classification::NoData);
        let c = st.update(&s, counts(500.0, 0.0), counts(5000.0, 20.0));
        assert!(c.rejected, "{c}");
        let c = st.update(&s, counts(500.0, 0.0), counts(5000.0, 100.0));
        assert!(c.rejected, "a rejection stays: {c}");
        assert_eq!(c.classification(), Classification::High);
    }

    #[test]
    fn a_good_stage_leaves_no_debt_for_a_bad_one() {
        let s = SequentialSettings::default();
        let mut staged = SequentialState::default();
        let mut single = SequentialState::default();
        // Stage 1 of 2: a long good stretch.
        for _ in 0..10 {
            staged.update_in_stage(&s, 1, 2, counts(300.0, 1.0), counts(2700.0, 9.0));
            single.update(&s, counts(300.0, 1.0), counts(2700.0, 9.0));
        }
        // Stage 2: 5 % against 0.3 %.
        let a = staged.update_in_stage(&s, 2, 2, counts(750.0, 15.0), counts(2250.0, 7.0));
        let b = single.update(&s, counts(750.0, 15.0), counts(2250.0, 7.0));
        assert!(a.e_value > b.e_value * 10.0, "staged {a}\nsingle {b}");
        assert_eq!(SequentialState::default().e_value(), 1.0);
    }

    #[test]
    fn the_tolerated_ratio_moves_the_null() {
        // Canary errs 2x stable: rejected against 1x, not against 3x.
        let strict = SequentialSettings::default();
        let lenient = SequentialSettings {
            tolerated_ratio: 3.0,
            ..Default::default()
        };
        let (mut a, mut b) = (SequentialState::default(), SequentialState::default());
        let (mut ra, mut rb) = (false, false);
        for _ in 0..40 {
            ra |= a
                .update(&strict, counts(1000.0, 20.0), counts(1000.0, 10.0))
                .rejected;
            rb |= b
                .update(&lenient, counts(1000.0, 20.0), counts(1000.0, 10.0))
                .rejected;
        }
        assert!(ra && !rb);
    }

    #[test]
    fn mann_whitney_matches_a_hand_computed_example() {
        // canary 4,5,6 vs stable 1,2,3: U = 9 (all pairs favour the canary),
        // shift median of {1..5} differences = 3.
        let s = MannWhitneySettings {
            min_samples: 3,
            confidence: 0.9,
            ..Default::default()
        };
        let c = Distribution::from_samples([4.0, 5.0, 6.0]);
        let st = Distribution::from_samples([1.0, 2.0, 3.0]);
        let r = mann_whitney(&s, &c, &st);
        assert_eq!(r.u, 9.0);
        assert_eq!(r.shift, 3.0);
        assert!((r.mean_ratio - 2.5).abs() < 1e-12);
        // z = (9 - 4.5 - 0.5) / sqrt(9*7/12)
        assert!((r.z - 4.0 / (63.0f64 / 12.0).sqrt()).abs() < 1e-12, "{}", r.z);
        assert!(r.interval.0 <= r.shift && r.shift <= r.interval.1);
    }

    #[test]
    fn mann_whitney_classifies_high_low_pass_and_no_data() {
        let s = MannWhitneySettings::default();
        let base: Vec<f64> = (0..400).map(|i| 0.15 + 0.1 * (i as f64 / 400.0)).collect();
        let slow: Vec<f64> = base.iter().map(|x| x + 0.1).collect();
        let fast: Vec<f64> = base.iter().map(|x| x - 0.1).collect();
        let d = Distribution::from_samples;
        let high = mann_whitney(&s, &d(slow.clone()), &d(base.clone()));
        assert_eq!(high.classification, Classification::High, "{high}");
        assert!((high.shift - 0.1).abs() < 0.002, "{high}");
        assert!(high.to_string().contains("shift +100.0 ms"), "{high}");
        // Faster is fine when only an increase is a regression.
        let low = mann_whitney(&s, &d(fast.clone()), &d(base.clone()));
        assert_eq!(low.classification, Classification::Pass, "{low}");
        let either = MannWhitneySettings {
            direction: Direction::Either,
            ..Default::default()
        };
        assert_eq!(
            mann_whitney(&either, &d(fast), &d(base.clone())).classification,
            Classification::Low
        );
        assert_eq!(
            mann_whitney(&s, &d(base.clone()), &d(base.clone())).classification,
            Classification::Pass
        );
        // A significant but small shift is within the allowed effect.
        let tiny: Vec<f64> = base.iter().map(|x| x + 0.01).collect();
        let t = mann_whitney(&s, &d(tiny), &d(base.clone()));
        assert!(
            t.interval.0 > 0.0 && t.classification == Classification::Pass,
            "{t}"
        );
        let few = mann_whitney(&s, &d(slow[..10].to_vec()), &d(base));
        assert_eq!(few.classification, Classification::NoData);
    }

    #[test]
    fn histograms_become_distributions() {
        let d = Distribution::from_cumulative_buckets(&[
            (0.1, 10.0),
            (0.25, 30.0),
            (f64::INFINITY, 31.0),
            (0.5, 30.0),
        ]);
        assert_eq!(d.points, vec![(0.1, 10.0), (0.25, 20.0), (1.0, 1.0)]);
        assert_eq!(d.count(), 31.0);
    }

    #[test]
    fn kayenta_score() {
        let t = ScoreThresholds::default();
        use Classification::*;
        assert_eq!(score(&t, Pass, Pass), Some(100.0));
        assert_eq!(score(&t, Pass, High), Some(50.0));
        assert_eq!(score(&t, NoData, Pass), Some(100.0));
        assert_eq!(score(&t, NoData, NoData), None);
        let w = ScoreThresholds {
            errors_weight: 80.0,
            latency_weight: 20.0,
            ..Default::default()
        };
        assert_eq!(score(&w, Pass, High), Some(80.0));
    }

    #[test]
    fn settings_validation_names_the_field() {
        let e = SequentialSettings {
            alpha: 0.0,
            ..Default::default()
        }
        .validate("analysis.sequential")
        .unwrap_err()
        .to_string();
        assert!(e.contains("analysis.sequential.alpha"), "{e}");
        let e = MannWhitneySettings {
            allowed_increase: 0.5,
            ..Default::default()
        }
        .validate("analysis.mann_whitney")
        .unwrap_err()
        .to_string();
        assert!(e.contains("analysis.mann_whitney.allowed_increase"), "{e}");
        let e = ScoreThresholds {
            marginal: 99.0,
            ..Default::default()
        }
        .validate("analysis.score")
        .unwrap_err()
        .to_string();
        assert!(e.contains("analysis.score.marginal"), "{e}");
        SequentialSettings::default().validate("a").unwrap();
        MannWhitneySettings::default().validate("a").unwrap();
        ScoreThresholds::default().validate("a").unwrap();
    }
}
