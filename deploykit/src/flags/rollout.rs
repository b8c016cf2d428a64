//! Flag rollouts as deployments: a variant's share grows stage by stage
//! (`5, 25, 50, 100` %), each stage held for a while and judged by the
//! canary analysis ([`AnalysisRules`]) with the variant as the canary track
//! and the flag's safe variant as the stable one; a breach flips the flag
//! to its safe variant at once (the kill switch), within one check
//! interval of the check that saw it.
//!
//! Metrics are read per variant through any [`MetricsSource`], the group
//! being the variant's name: with Prometheus, templates whose `{group}` is
//! the label the application puts the variant in (the CLI accepts
//! `{variant}` for it).
//!
//! A stage passes only if at least one of its checks passed: a stage of
//! nothing but inconclusive checks is never healthy, as in a canary
//! deployment. The rollout ends with the variant at 100 % through the same
//! `fractional` rule, so the kill switch still returns everyone to the safe
//! variant.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::store::{FlagChange, FlagChangeKind, FlagStore};
use super::FlagError;
use crate::analysis::{AnalysisRules, Analyzer, CheckOutcome, Observations, Verdict};
use crate::{Group, Metric, MetricsSource};

/// A flag rollout: which variant, in which stages, judged how.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagRollout {
    /// The flag.
    pub flag: String,
    /// The variant rolled out.
    pub variant: String,
    /// Its share at each stage, in percent, increasing, e.g. `[5, 25, 50, 100]`.
    pub stages: Vec<u8>,
    /// How long each stage is held and watched.
    pub stage_duration: Duration,
    /// Time between checks.
    pub interval: Duration,
    /// The analysis rules (thresholds, window, inconclusive limit).
    pub rules: AnalysisRules,
    /// Who runs it (journaled with every change).
    pub who: String,
}

/// What a rollout reports as it goes.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RolloutEvent {
    /// A stage's split was written.
    Stage {
        /// 1-based.
        stage: usize,
        /// The variant's share.
        percent: u8,
    },
    /// A check ran.
    Check {
        /// 1-based stage.
        stage: usize,
        /// Its outcome.
        outcome: CheckOutcome,
    },
    /// The flag was switched to its safe variant.
    Killed {
        /// Why.
        reason: String,
    },
}

/// How a rollout ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RolloutOutcome {
    /// Every stage passed; the variant is served to 100 % (or the last
    /// stage's share).
    Completed,
    /// The analysis said no; the flag was switched to its safe variant.
    Killed {
        /// 1-based stage at which it happened.
        stage: usize,
        /// Why.
        reason: String,
    },
    /// Cancelled; the flag was switched to its safe variant.
    Cancelled {
        /// 1-based stage at which it happened.
        stage: usize,
    },
}

impl FlagRollout {
    /// Checks the rollout against the flag file before anything is written.
    ///
    /// # Errors
    ///
    /// [`FlagError::BadChange`] naming what is wrong: no stages, stages not
    /// increasing or above 100, a zero duration or interval, a variant that
    /// is not a valid metrics group name, or rules that do not validate;
    /// [`FlagError::UnknownFlag`] / [`FlagError::NoSafeVariant`] from the
    /// file.
    pub fn check(&self, store: &FlagStore) -> Result<(Group, Group), FlagError> {
        let bad = |message: String| FlagError::BadChange {
            key: self.flag.clone(),
            message,
        };
        if self.stages.is_empty()
            || self.stages.windows(2).any(|w| w[0] >= w[1])
            || self.stages.iter().any(|s| *s == 0 || *s > 100)
        {
            return Err(bad(
                "stages must increase, each from 1 to 100 (e.g. 5,25,50,100)".into()
            ));
        }
        if self.stage_duration.is_zero() || self.interval.is_zero() || self.interval > self.stage_duration {
            return Err(bad(
                "the check interval must be above 0 and at most the stage duration".into(),
            ));
        }
        self.rules.validate().map_err(|e| bad(e.to_string()))?;
        let set = store.load()?;
        set.validate()?;
        let flag = set.get(&self.flag).ok_or_else(|| FlagError::UnknownFlag {
            key: self.flag.clone(),
        })?;
        if !flag.variants().contains_key(&self.variant) {
            return Err(bad(format!("`{}` is not a variant", self.variant)));
        }
        let safe = flag.safe_variant().ok_or_else(|| FlagError::NoSafeVariant {
            key: self.flag.clone(),
        })?;
        if safe == self.variant {
            return Err(bad(format!("`{safe}` is the safe variant; roll out another one")));
        }
        let group = |v: &str| {
            Group::new(v).map_err(|_| {
                bad(format!(
                    "variant `{v}` cannot name a metrics group: use letters, digits, `.`, `_`, `-`"
                ))
            })
        };
        Ok((group(&self.variant)?, group(safe)?))
    }

    /// Runs the rollout: writes each stage's split, watches it, and kills
    /// the flag on a breach, on a stage without a passing check, or on
    /// `cancel`.
    ///
    /// Not idempotent (each run starts from the first stage); cancel-safe
    /// through `cancel`, which kills the flag; dropping the future instead
    /// leaves the flag at the current stage's split. On `Err` (the file
    /// could not be written) the flag holds the last split written.
    ///
    /// # Errors
    ///
    /// The errors of [`check`](Self::check) before anything is written, and
    /// of [`FlagStore::apply`] after.
    pub async fn run(
        &self,
        store: &FlagStore,
        metrics: &dyn MetricsSource,
        cancel: &CancellationToken,
        mut on_event: impl FnMut(RolloutEvent) + Send,
    ) -> Result<RolloutOutcome, FlagError> {
        let (canary, stable) = self.check(store)?;
        let change = |kind, why: Option<String>| FlagChange {
            flag: self.flag.clone(),
            kind,
            who: self.who.clone(),
            why,
        };
        let kill = |reason: String, on_event: &mut dyn FnMut(RolloutEvent)| -> Result<(), FlagError> {
            store.apply(&change(FlagChangeKind::Kill, Some(reason.clone())))?;
            on_event(RolloutEvent::Killed { reason });
            Ok(())
        };
        let mut analyzer = Analyzer::default();
        let checks = (self.stage_duration.as_nanos() / self.interval.as_nanos()).max(1) as usize;
        for (i, &percent) in self.stages.iter().enumerate() {
            let stage = i + 1;
            store.apply(&change(
                FlagChangeKind::Split {
                    variant: self.variant.clone(),
                    percent,
                },
                Some(format!(
                    "rollout stage {stage}/{}: {percent} %",
                    self.stages.len()
                )),
            ))?;
            on_event(RolloutEvent::Stage { stage, percent });
            let mut passed = false;
            for _ in 0..checks {
                tokio::select! {
                    () = cancel.cancelled() => {
                        kill(format!("rollout cancelled at stage {stage} ({percent} %)"), &mut on_event)?;
                        return Ok(RolloutOutcome::Cancelled { stage });
                    }
                    () = tokio::time::sleep(self.interval) => {}
                }
                let obs = observe(metrics, &canary, &stable, &self.rules).await;
                let outcome = self.rules.evaluate(stage, &obs);
                passed |= outcome == CheckOutcome::Pass;
                let verdict = analyzer.record(&self.rules, &outcome);
                on_event(RolloutEvent::Check { stage, outcome });
                if let Verdict::Rollback(reason) = verdict {
                    let reason = format!("flag rollout of `{}` at {percent} %: {reason}", self.variant);
                    kill(reason.clone(), &mut on_event)?;
                    return Ok(RolloutOutcome::Killed { stage, reason });
                }
            }
            if !passed {
                let reason =
                    format!("stage {stage} ({percent} %) had no passing check; no data is never healthy");
                kill(reason.clone(), &mut on_event)?;
                return Ok(RolloutOutcome::Killed { stage, reason });
            }
        }
        Ok(RolloutOutcome::Completed)
    }
}

async fn observe(
    metrics: &dyn MetricsSource,
    canary: &Group,
    stable: &Group,
    rules: &AnalysisRules,
) -> Observations {
    let w = rules.window;
    let counts = rules.needs_request_count();
    let (canary_error_rate, canary_p99, stable_error_rate) = futures::join!(
        metrics.observe(Metric::ErrorRate, canary, w),
        metrics.observe(Metric::LatencyP99, canary, w),
        metrics.observe(Metric::ErrorRate, stable, w),
    );
    let (canary_requests, stable_requests) = if counts {
        let (c, s) = futures::join!(
            metrics.observe(Metric::RequestCount, canary, w),
            metrics.observe(Metric::RequestCount, stable, w)
        );
        (Some(c), Some(s))
    } else {
        (None, None)
    };
    Observations {
        canary_error_rate,
        canary_p99,
        stable_error_rate,
        canary_requests,
        stable_requests,
    }
}
