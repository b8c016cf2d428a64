//! Rollback drills: break a canary of the release the fleet already runs,
//! on purpose, and prove that the gate fires and the rollback completes in
//! time — before a real deployment relies on that gate.
//!
//! A drill is a canary of the *current* release ([`Canary::drill_plan`]):
//! nothing changes for users whether it passes or fails, since the canary
//! serves what stable serves and is never promoted. It carries the
//! canary's `[[strategy.canary.chaos]]` entries, or, when there are none,
//! [`default_entry`]: the canary's process killed once a check has had the
//! chance to pass, with a rollback expected within the stage's remaining
//! time plus the time a rollback takes.
//!
//! A drill asks more of the evidence than a deployment with chaos entries
//! ([`judge`] over [`verdicts`](super::verdicts)):
//!
//! * the rollback must come from the analysis — a non-passing check after
//!   the injection — not from a failed step;
//! * unless the fault hits the very start of the analysis, a check must
//!   have **passed before** the injection: a gate that fails a healthy
//!   canary too (queries that match the stable track but not the canary's)
//!   would roll back with or without the fault, and prove nothing.
//!
//! Before anything is touched, [`preflight`] refuses setups whose gate can
//! never fire: metric queries that answer no data for the stable track
//! (checked even when `monitoring_check` is off), or error-rate rules that
//! no error rate can break (`error_threshold` and `ratio_floor` both
//! 100 %: a canary answering only 500s would be promoted).

use std::fmt;
use std::time::Duration;

use crate::analysis::{AnalysisRules, CheckOutcome};
use crate::event::{Event, EventKind};
use crate::judge::ErrorRateJudge;
use crate::monitoring::{check_monitoring, MonitoringError};
use crate::traits::MetricsSource;
use crate::Canary;

use super::{ChaosSpec, ChaosTarget, ChaosVerdict, Expect, Fault};

/// What a rollback takes once the gate has fired, beyond the canary's
/// drain timeout: stopping the canary and putting its release back.
const ROLLBACK_ALLOWANCE: Duration = Duration::from_secs(30);

/// The entry a drill injects when the canary has no chaos entries: `fault`
/// (a `kill` works on every instance that runs a process; network faults
/// need a fault injector) on the canary in stage 1, `after` into the stage — by default
/// three check intervals, at most half the stage, so a check can pass
/// first — expecting a rollback within the rest of the stage plus the
/// drain timeout and 30 s.
pub fn default_entry(canary: &Canary, fault: Fault, after: Option<Duration>) -> ChaosSpec {
    let after = after.unwrap_or_else(|| (canary.check_interval * 3).min(canary.stage_duration / 2));
    let within = canary.stage_duration.saturating_sub(after) + canary.drain_timeout + ROLLBACK_ALLOWANCE;
    ChaosSpec {
        stage: 1,
        after,
        duration: None,
        target: ChaosTarget::Canary,
        fault,
        expect: Expect::Rollback,
        within: Some(within),
    }
}

/// Why a drill cannot prove anything on this setup: its gate can never
/// fire. Found before anything is touched.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DrillRefusal {
    /// A metric query answers no data (or an error) for the stable track,
    /// so every check would be inconclusive whatever the canary does.
    #[error("the gate can never fire on real evidence: {0}")]
    NoData(#[source] MonitoringError),
    /// No error rate can break the error-rate rules.
    #[error(
        "the gate can never fire on errors: error_threshold is {threshold} and ratio_floor is {floor}, \
         so a canary answering only 5xx would pass every check; lower analysis.error_threshold (e.g. 0.01)"
    )]
    LooseThresholds {
        /// `error_threshold`, as a percentage.
        threshold: Percent,
        /// `ratio_floor`, as a percentage.
        floor: Percent,
    },
}

/// A fraction written as a percentage (`1` reads `100%`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(pub f64);

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0 * 100.0)
    }
}

/// Checks, without touching anything, that the canary's gate can fire:
/// the error-rate rules can be broken, and every query the analysis relies
/// on answers for the stable track (each bounded by `timeout`).
///
/// * Idempotent: yes (read-only).
/// * Cancel-safe: yes.
/// * On failure: nothing changed.
///
/// # Errors
/// [`DrillRefusal`] saying why the gate can never fire.
pub async fn preflight(
    metrics: &dyn MetricsSource,
    canary: &Canary,
    timeout: Duration,
) -> Result<(), DrillRefusal> {
    loose(&canary.analysis)?;
    check_monitoring(
        metrics,
        &canary.stable_group,
        &canary.analysis,
        canary.check_interval,
        timeout,
    )
    .await
    .map_err(DrillRefusal::NoData)
}

/// The error rules can never fail when no rate is above the absolute limit
/// and the relative rule never applies.
fn loose(rules: &AnalysisRules) -> Result<(), DrillRefusal> {
    let relative_off = rules.error_judge == ErrorRateJudge::Threshold && rules.ratio_floor >= 1.0;
    if rules.error_threshold >= 1.0 && relative_off {
        return Err(DrillRefusal::LooseThresholds {
            threshold: Percent(rules.error_threshold),
            floor: Percent(rules.ratio_floor),
        });
    }
    Ok(())
}

/// Each entry's verdict for a drill: [`verdicts`](super::verdicts), and an
/// expected rollback holds only when a check did not pass after the
/// injection (the analysis fired, not a failed step) and — unless the
/// fault hit the very start of the analysis — one check passed before it.
pub fn judge(specs: &[ChaosSpec], events: &[Event]) -> Vec<ChaosVerdict> {
    let mut verdicts = super::verdicts(specs, events);
    for v in &mut verdicts {
        if !v.passed || v.spec.expect != Expect::Rollback {
            continue;
        }
        let Some(at) = v.injected_at_ms else {
            continue;
        };
        if v.tripped.is_none() {
            v.passed = false;
            v.explanation = format!(
                "rolled back, but not by the analysis: no check failed after the injection ({})",
                reason(events).unwrap_or_else(|| "no reason recorded".to_owned())
            );
            continue;
        }
        let at_start = v.spec.stage == 1 && v.spec.after.is_zero();
        if !at_start && v.checks_passed_before == 0 {
            v.passed = false;
            v.explanation = format!(
                "no analysis check passed before the injection, so the rollback proves nothing about \
                 the fault: the gate rejects a healthy canary too{}; check that the metric queries \
                 match the canary's traffic",
                last_check_before(events, at)
                    .map(|c| format!(" (last check before it: {c})"))
                    .unwrap_or_default()
            );
        }
    }
    verdicts
}

/// The reason the run finished with, if it failed.
fn reason(events: &[Event]) -> Option<String> {
    events.iter().rev().find_map(|e| match &e.kind {
        EventKind::DeploymentFinished { reason, .. } => reason.clone(),
        _ => None,
    })
}

fn last_check_before(events: &[Event], at: u64) -> Option<CheckOutcome> {
    events
        .iter()
        .rev()
        .filter(|e| e.elapsed_ms < at)
        .find_map(|e| match &e.kind {
            EventKind::AnalysisResult { result, .. } => Some(result.clone()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_entry_lets_a_check_pass_first_and_budgets_the_rest_of_the_stage() {
        let canary = Canary {
            stage_duration: Duration::from_secs(300),
            check_interval: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            ..Canary::default()
        };
        let e = default_entry(&canary, Fault::Kill, None);
        assert_eq!(e.after, Duration::from_secs(90));
        // 210 s left in the stage, 30 s drain, 30 s to put the release back.
        assert_eq!(e.within, Some(Duration::from_secs(270)));
        assert_eq!(
            (e.stage, e.expect, e.target),
            (1, Expect::Rollback, ChaosTarget::Canary)
        );
        e.validate(0, canary.stages.len(), canary.stage_duration).unwrap();
        // A short stage: half of it.
        let short = Canary {
            stage_duration: Duration::from_secs(4),
            check_interval: Duration::from_secs(1),
            ..canary
        };
        assert_eq!(
            default_entry(&short, Fault::Pause, None).after,
            Duration::from_secs(2)
        );
        let chosen = default_entry(&short, Fault::Kill, Some(Duration::from_secs(3)));
        assert_eq!(chosen.after, Duration::from_secs(3));
    }

    #[test]
    fn error_rules_no_rate_can_break_are_refused_naming_both_values() {
        let mut rules = AnalysisRules {
            error_threshold: 1.0,
            ratio_floor: 1.0,
            ..AnalysisRules::default()
        };
        let e = loose(&rules).unwrap_err().to_string();
        assert!(
            e.contains("error_threshold is 100% and ratio_floor is 100%"),
            "{e}"
        );
        assert!(
            e.contains("a canary answering only 5xx would pass every check"),
            "{e}"
        );
        // Either rule able to fire is enough.
        rules.ratio_floor = 0.001;
        assert!(loose(&rules).is_ok());
        rules.ratio_floor = 1.0;
        rules.error_threshold = 0.5;
        assert!(loose(&rules).is_ok());
    }
}
