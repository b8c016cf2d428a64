use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_fleet, previous_map, replace_steps, CountOrPercent};
use crate::error::{Error, Result};
use crate::names::ReleaseId;
use crate::plan::{FailurePolicy, FleetSnapshot, HealthCheck, Plan, Stage, Step, Unit};
use crate::traits::Strategy;

/// Rolling deployment: a batch at a time out of rotation, replaced and put
/// back, within a failure budget.
///
/// Instances are replaced in batches of [`batch_size`](Self::batch_size);
/// the instances of a batch are replaced *concurrently*, each one: drain →
/// wait until drained (at most [`drain_timeout`](Self::drain_timeout), then
/// proceed with a warning) → stop (force-stop if the graceful stop fails) →
/// install → start → health check → enable. An instance that fails is
/// restored to its previous release at once and counted; once more than
/// [`max_failures`](Self::max_failures) instances have failed the deployment
/// aborts and every instance already moved is rolled back, so the fleet ends
/// on one version. Between batches the deployment waits
/// [`stabilisation`](Self::stabilisation).
///
/// Instances already on the release are skipped, so deploying the same
/// release again is a no-op.
///
/// ```
/// use deploykit::{CountOrPercent, Rolling};
/// let rolling = Rolling {
///     batch_size: CountOrPercent::Percent(25),
///     max_failures: CountOrPercent::Count(0),
///     ..Rolling::default()
/// };
/// assert_eq!(rolling.health.retries, 3);
/// ```
///
/// Its serde form is the `[strategy.rolling]` section of `deploykit.toml`
/// (see [`config_key`](super::config_key)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "super::file::RollingDoc", into = "super::file::RollingDoc")]
pub struct Rolling {
    /// Instances replaced at once: a count, or a percent of the fleet
    /// (rounded down, never below 1). Default 1. This is also the most
    /// instances out of rotation at any time.
    pub batch_size: CountOrPercent,
    /// Failed instances tolerated before the deployment aborts and rolls
    /// back: a count, or a percent of the instances being updated (rounded
    /// down). Default 1.
    pub max_failures: CountOrPercent,
    /// Health probes after start. Default 3 probes, 10 s apart.
    pub health: HealthCheck,
    /// Upper bound of the wait for connections to drain. Default 30 s.
    pub drain_timeout: Duration,
    /// Wait between batches, so a batch shows its problems before the next
    /// one goes; `None` means the health interval. Default `None`.
    pub stabilisation: Option<Duration>,
}

impl Default for Rolling {
    fn default() -> Self {
        Self {
            batch_size: CountOrPercent::Count(1),
            max_failures: CountOrPercent::Count(1),
            health: HealthCheck::default(),
            drain_timeout: Duration::from_secs(30),
            stabilisation: None,
        }
    }
}

impl Rolling {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `batch_size` (0, or a percent outside
    /// 1–100) or `health.retries` (0).
    pub fn validate(&self) -> Result<()> {
        match self.batch_size {
            CountOrPercent::Count(0) => {
                return Err(Error::invalid(
                    "batch_size",
                    "is 0; use a count >= 1 or a percent from 1% to 100%",
                ))
            }
            CountOrPercent::Percent(p) if !(1..=100).contains(&p) => {
                return Err(Error::invalid(
                    "batch_size",
                    format!("{p}% is outside 1%-100%; use a count >= 1 or a percent from 1% to 100%"),
                ))
            }
            _ => {}
        }
        if self.health.retries == 0 {
            return Err(Error::invalid(
                "health.retries",
                "is 0; at least 1 probe is needed",
            ));
        }
        Ok(())
    }

    /// The batch size for a fleet of `total` instances.
    pub fn resolved_batch(&self, total: usize) -> usize {
        self.batch_size.of(total).max(1)
    }
}

impl Strategy for Rolling {
    fn kind(&self) -> crate::StrategyKind {
        crate::StrategyKind::Rolling
    }

    fn plan(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        self.validate()?;
        check_fleet(fleet)?;
        let batch = self.resolved_batch(fleet.instances.len());
        let (skipped, todo): (Vec<_>, Vec<_>) = fleet
            .instances
            .iter()
            .partition(|i| i.release.as_ref() == Some(release));
        let max_failures = self.max_failures.of(todo.len());
        let batches: Vec<_> = todo.chunks(batch).collect();
        let count = batches.len();
        let stabilise = self.stabilisation.unwrap_or(self.health.interval);
        let mut stages = Vec::new();
        for (n, chunk) in batches.into_iter().enumerate() {
            if n > 0 && !stabilise.is_zero() {
                stages.push(Stage {
                    if_winner: None,
                    name: "stabilise".into(),
                    units: vec![Unit {
                        instance: None,
                        steps: vec![Step::Pause {
                            duration: stabilise,
                            reason: "stabilisation between batches".into(),
                        }],
                    }],
                });
            }
            let units = chunk
                .iter()
                .map(|i| Unit {
                    instance: Some(i.backend.id.clone()),
                    steps: replace_steps(&i.backend.id, release, self.health, self.drain_timeout),
                })
                .collect();
            stages.push(Stage {
                if_winner: None,
                name: format!("batch {}/{count}", n + 1),
                units,
            });
        }
        Ok(
            Plan::new(self.kind(), release.clone(), previous_map(fleet), stages)
                .with_policy(FailurePolicy::RestoreInstance { max_failures })
                .with_health(self.health)
                .with_drain_timeout(self.drain_timeout)
                .with_rollback_batch(batch)
                .with_skipped(skipped.iter().map(|i| i.backend.id.clone()).collect()),
        )
    }
}
