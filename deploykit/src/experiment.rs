//! The statistics of an A/B experiment: is the treatment's conversion rate
//! different from the control's, decided while the data comes in without
//! the bias of peeking.
//!
//! A fixed-horizon two-proportion z-test is valid only when it is read once,
//! at a sample size chosen in advance. Read after every check and stopped at
//! the first p < 0.05, it declares a winner between two *identical* variants
//! far more often than 5 % (about 1 run in 4 at 50 looks): each look is
//! another chance for noise to cross the line. This module uses a
//! **mixture sequential probability ratio test** (mSPRT, Johari et al.,
//! "Always valid inference", 2017) on the difference of the two rates: its
//! statistic Λ can be read after every check, and the chance that it ever
//! crosses `1/alpha` under no difference is at most `alpha`, however often
//! it is read. The always-valid p-value is `min(1, 1/max Λ)`.
//!
//! With `θ̂ = p_B − p_A` and `V = p̂_A(1 − p̂_A)/n_A + p̂_B(1 − p̂_B)/n_B`
//! (the variance of θ̂), and the mixture's spread `τ²`:
//!
//! ```text
//! Λ = sqrt(V / (V + τ²)) · exp(τ² θ̂² / (2 V (V + τ²)))
//! ```
//!
//! `τ` is set to the minimum detectable effect (absolute, in rate), so the
//! test is most sensitive to effects of about that size. Worked number:
//! 5 % against 6 % conversion with τ = 0.005 and alpha 0.05 (decide at
//! Λ ≥ 20): at 10,000 visits each θ̂ = 0.01, V = 1.04e-5, Λ = 0.54 · e^3.4
//! ≈ 16 — not yet (a fixed-horizon z-test says p = 0.002 here, valid only
//! if this is its one planned look); at 15,000 each Λ ≈ 130: a winner.
//!
//! The test needs [`ExperimentRules::min_samples`] visits per variant
//! before it decides (the normal approximation of V is poor below), and
//! ends with no significant difference when the experiment's time runs
//! out.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Visits and conversions of one variant.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Tally {
    /// Visitors (the denominator of the conversion rate).
    pub visits: f64,
    /// Conversions among them.
    pub conversions: f64,
}

impl Tally {
    /// The conversion rate, 0 without visits.
    pub fn rate(&self) -> f64 {
        if self.visits > 0.0 {
            (self.conversions / self.visits).clamp(0.0, 1.0)
        } else {
            0.0
        }
    }
}

/// How an experiment decides.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentRules {
    /// Most chance of declaring a winner between equal variants, however
    /// often the test is read, 0-0.5. Default 0.05.
    pub alpha: f64,
    /// The smallest difference of conversion rates worth detecting,
    /// absolute (0.01 is one percentage point), above 0 and below 1.
    /// Default 0.01.
    pub min_detectable_effect: f64,
    /// Visits each variant needs before any decision. Default 1000.
    pub min_samples: u64,
    /// What happens when the experiment's time runs out with no
    /// significant difference. Default [`NoDifference::KeepControl`].
    pub on_no_difference: NoDifference,
}

/// The outcome of an experiment that ends with no significant difference.
///
/// Keeping the control is the safe reading of "we could not tell them
/// apart"; promoting suits a treatment shipped for other reasons (a
/// refactor, a cheaper dependency) where the experiment only has to show
/// it converts no worse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoDifference {
    /// Roll back: the control keeps every user.
    #[default]
    KeepControl,
    /// Promote the treatment, provided each variant reached
    /// [`ExperimentRules::min_samples`] visits and no guardrail broke;
    /// with fewer visits the control stays, as nothing was measured.
    Promote,
}

impl std::fmt::Display for NoDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NoDifference::KeepControl => "keep-control",
            NoDifference::Promote => "promote",
        })
    }
}

/// The settings are compared as plain values; [`validate`](ExperimentRules::validate)
/// refuses NaN, so equality is total for every checked value.
impl Eq for ExperimentRules {}

impl Default for ExperimentRules {
    fn default() -> Self {
        Self {
            alpha: 0.05,
            min_detectable_effect: 0.01,
            min_samples: 1000,
            on_no_difference: NoDifference::KeepControl,
        }
    }
}

impl ExperimentRules {
    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `alpha` (outside (0, 0.5]),
    /// `min_detectable_effect` (outside (0, 1)) or `min_samples` (0).
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha > 0.0 && self.alpha <= 0.5) {
            return Err(Error::invalid(
                "alpha",
                format!("{} is outside (0, 0.5]; e.g. 0.05", self.alpha),
            ));
        }
        if !(self.min_detectable_effect > 0.0 && self.min_detectable_effect < 1.0) {
            return Err(Error::invalid(
                "min_detectable_effect",
                format!(
                    "{} is outside (0, 1); give an absolute difference of rates, e.g. 0.01 for one percentage point",
                    self.min_detectable_effect
                ),
            ));
        }
        if self.min_samples == 0 {
            return Err(Error::invalid(
                "min_samples",
                "is 0; each variant needs visits before a decision, e.g. 1000",
            ));
        }
        Ok(())
    }
}

/// What one reading of the test says.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "verdict")]
pub enum Verdict {
    /// Too few visits, or no significant difference yet: keep going.
    Continue,
    /// The treatment converts better, significantly.
    TreatmentWins,
    /// The control converts better, significantly.
    ControlWins,
}

impl Reading {
    /// Whether both variants reached `rules.min_samples` visits, so the
    /// test could decide at this reading.
    pub fn has_samples(&self, rules: &ExperimentRules) -> bool {
        let n = rules.min_samples as f64;
        self.control.visits >= n && self.treatment.visits >= n
    }
}

/// The test's state across readings (its running maximum of Λ).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Sequential {
    max_lambda: f64,
}

/// One reading: the statistics that go into events, journals and reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    /// The control's tally.
    pub control: Tally,
    /// The treatment's tally.
    pub treatment: Tally,
    /// Treatment rate minus control rate.
    pub effect: f64,
    /// The mixture likelihood ratio Λ now.
    pub lambda: f64,
    /// The always-valid p-value, `min(1, 1/max Λ)`.
    pub p_value: f64,
    /// What it says.
    pub verdict: Verdict,
}

impl Sequential {
    /// Reads the test at cumulative tallies `control` and `treatment`.
    pub fn read(&mut self, rules: &ExperimentRules, control: Tally, treatment: Tally) -> Reading {
        let effect = treatment.rate() - control.rate();
        let n = rules.min_samples as f64;
        let enough = control.visits >= n && treatment.visits >= n;
        let lambda = if enough {
            lambda(rules, control, treatment)
        } else {
            0.0
        };
        self.max_lambda = self.max_lambda.max(lambda);
        let p_value = if self.max_lambda > 0.0 {
            (1.0 / self.max_lambda).min(1.0)
        } else {
            1.0
        };
        let verdict = if enough && lambda >= 1.0 / rules.alpha {
            if effect > 0.0 {
                Verdict::TreatmentWins
            } else {
                Verdict::ControlWins
            }
        } else {
            Verdict::Continue
        };
        Reading {
            control,
            treatment,
            effect,
            lambda,
            p_value,
            verdict,
        }
    }
}

fn lambda(rules: &ExperimentRules, a: Tally, b: Tally) -> f64 {
    let (pa, pb) = (a.rate(), b.rate());
    let v = pa * (1.0 - pa) / a.visits + pb * (1.0 - pb) / b.visits;
    if v <= 0.0 {
        // Both rates 0 or 1: no evidence of a difference either way.
        return if (pb - pa).abs() > 0.0 { f64::INFINITY } else { 0.0 };
    }
    let tau2 = rules.min_detectable_effect * rules.min_detectable_effect;
    let theta = pb - pa;
    (v / (v + tau2)).sqrt() * (tau2 * theta * theta / (2.0 * v * (v + tau2))).exp()
}

/// The fixed-horizon two-sided two-proportion z-test's p-value, read once
/// (the comparison the benchmark makes; reading it repeatedly is the
/// peeking this module avoids).
pub fn fixed_horizon_p_value(control: Tally, treatment: Tally) -> f64 {
    let pooled = (control.conversions + treatment.conversions) / (control.visits + treatment.visits);
    let se = (pooled * (1.0 - pooled) * (1.0 / control.visits + 1.0 / treatment.visits)).sqrt();
    if se <= 0.0 {
        return 1.0;
    }
    let z = ((treatment.rate() - control.rate()) / se).abs();
    2.0 * (1.0 - normal_cdf(z))
}

/// The standard normal CDF (Abramowitz-Stegun 7.1.26, error below 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs() / std::f64::consts::SQRT_2);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-(z * z) / 2.0).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(visits: f64, rate: f64) -> Tally {
        Tally {
            visits,
            conversions: (visits * rate).round(),
        }
    }

    #[test]
    fn the_worked_number_decides_at_15000_not_10000() {
        let rules = ExperimentRules {
            min_detectable_effect: 0.005,
            ..ExperimentRules::default()
        };
        let mut s = Sequential::default();
        let r = s.read(&rules, tally(10_000.0, 0.05), tally(10_000.0, 0.06));
        assert!((r.lambda - 16.2).abs() < 0.5, "{r:?}");
        assert_eq!(r.verdict, Verdict::Continue);
        let r = s.read(&rules, tally(15_000.0, 0.05), tally(15_000.0, 0.06));
        assert!((r.lambda - 133.0).abs() < 5.0, "{r:?}");
        assert_eq!(r.verdict, Verdict::TreatmentWins);
        assert!(r.p_value < 0.05);
        assert!((r.effect - 0.01).abs() < 1e-9);
    }

    #[test]
    fn a_worse_treatment_makes_the_control_win() {
        let r = Sequential::default().read(
            &ExperimentRules::default(),
            tally(20_000.0, 0.08),
            tally(20_000.0, 0.05),
        );
        assert_eq!(r.verdict, Verdict::ControlWins);
    }

    #[test]
    fn equal_rates_and_too_few_visits_never_decide() {
        let rules = ExperimentRules::default();
        let mut s = Sequential::default();
        let r = s.read(&rules, tally(50_000.0, 0.05), tally(50_000.0, 0.05));
        assert_eq!(r.verdict, Verdict::Continue);
        assert!(r.lambda < 1.0, "{r:?}");
        // A huge effect on 999 visits waits for min_samples.
        let r = Sequential::default().read(&rules, tally(999.0, 0.01), tally(999.0, 0.5));
        assert_eq!(r.verdict, Verdict::Continue);
        assert_eq!(r.p_value, 1.0);
    }

    #[test]
    fn the_p_value_never_rises_again_after_a_low() {
        let rules = ExperimentRules::default();
        let mut s = Sequential::default();
        let low = s
            .read(&rules, tally(5_000.0, 0.05), tally(5_000.0, 0.058))
            .p_value;
        let later = s
            .read(&rules, tally(10_000.0, 0.05), tally(10_000.0, 0.05))
            .p_value;
        assert!(later <= low, "{low} then {later}");
    }

    #[test]
    fn fixed_horizon_matches_a_textbook_z_test() {
        // 500/10000 vs 580/10000: z = 2.50, two-sided p = 0.0124.
        let p = fixed_horizon_p_value(tally(10_000.0, 0.05), tally(10_000.0, 0.058));
        assert!((p - 0.0124).abs() < 0.001, "{p}");
    }

    #[test]
    fn validation_names_the_field() {
        let d = ExperimentRules::default();
        d.validate().unwrap();
        for (bad, field) in [
            (ExperimentRules { alpha: 0.0, ..d }, "alpha"),
            (ExperimentRules { alpha: 0.6, ..d }, "alpha"),
            (
                ExperimentRules {
                    min_detectable_effect: 0.0,
                    ..d
                },
                "min_detectable_effect",
            ),
            (ExperimentRules { min_samples: 0, ..d }, "min_samples"),
        ] {
            match bad.validate().unwrap_err() {
                Error::InvalidInput { field: f, .. } => assert_eq!(f, field),
                e => panic!("{e}"),
            }
        }
    }
}
