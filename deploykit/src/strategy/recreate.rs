use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_fleet, previous_map};
use crate::error::{Error, Result};
use crate::names::ReleaseId;
use crate::plan::{FailurePolicy, FleetSnapshot, HealthCheck, Plan, Stage, Step, Unit};
use crate::traits::Strategy;

/// Recreate ("big bang"): take every instance out of rotation and
/// stop it, install the release everywhere, start everything, check health,
/// put everything back. Simple, with downtime; the baseline the
/// zero-downtime strategies are measured against.
///
/// Any failure aborts and rolls every instance back to its previous release.
///
/// Its serde form is the `[strategy.recreate]` section of `deploykit.toml`
/// (see [`config_key`](super::config_key)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "super::file::RecreateDoc", into = "super::file::RecreateDoc")]
pub struct Recreate {
    /// Health probes after start. Default 3 probes, 10 s apart.
    pub health: HealthCheck,
    /// Drain timeout used when rolling back. Default 30 s.
    pub drain_timeout: Duration,
}

impl Default for Recreate {
    fn default() -> Self {
        Self {
            health: HealthCheck::default(),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Recreate {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `health.retries` (0).
    pub fn validate(&self) -> Result<()> {
        if self.health.retries == 0 {
            return Err(Error::invalid(
                "health.retries",
                "is 0; at least 1 probe is needed",
            ));
        }
        Ok(())
    }
}

impl Strategy for Recreate {
    fn kind(&self) -> crate::StrategyKind {
        crate::StrategyKind::Recreate
    }

    fn plan(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        self.validate()?;
        check_fleet(fleet)?;
        let (skipped, todo): (Vec<_>, Vec<_>) = fleet
            .instances
            .iter()
            .partition(|i| i.release.as_ref() == Some(release));
        let stage = |name: &str, steps: &dyn Fn(&crate::InstanceId) -> Vec<Step>| Stage {
            if_winner: None,
            name: name.into(),
            units: todo
                .iter()
                .map(|i| Unit {
                    instance: Some(i.backend.id.clone()),
                    steps: steps(&i.backend.id),
                })
                .collect(),
        };
        let stages = if todo.is_empty() {
            Vec::new()
        } else {
            vec![
                stage("stop all", &|id| {
                    vec![
                        Step::Disable { instance: id.clone() },
                        Step::Stop { instance: id.clone() },
                    ]
                }),
                stage("install all", &|id| {
                    vec![Step::Install {
                        instance: id.clone(),
                        release: release.clone(),
                    }]
                }),
                stage("start all", &|id| vec![Step::Start { instance: id.clone() }]),
                stage("health and enable", &|id| {
                    vec![
                        Step::AwaitHealthy {
                            instance: id.clone(),
                            check: self.health,
                        },
                        Step::Enable { instance: id.clone() },
                    ]
                }),
            ]
        };
        Ok(
            Plan::new(self.kind(), release.clone(), previous_map(fleet), stages)
                .with_policy(FailurePolicy::AbortAll)
                .with_health(self.health)
                .with_drain_timeout(self.drain_timeout)
                .with_rollback_batch(todo.len().max(1))
                .with_skipped(skipped.iter().map(|i| i.backend.id.clone()).collect()),
        )
    }
}
