use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{check_fleet, previous_map};
use crate::analysis::{Analysis, AnalysisRules};
use crate::error::{Error, Result};
use crate::names::{Group, InstanceId, ReleaseId};
use crate::plan::{
    AbortStep, FailurePolicy, FleetSnapshot, HealthCheck, InstanceSnapshot, Plan, Stage, Step, Unit,
};
use crate::routing::{Rule, Split, TrafficPolicy};
use crate::traits::{GroupWeight, Strategy};

/// How a canary moves from one stage to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum Promotion {
    /// On to the next stage as soon as a stage passes its analysis.
    #[default]
    Auto,
    /// After each stage but the last, wait for
    /// [`PromotionHandle::promote`](crate::PromotionHandle::promote); the
    /// analysis keeps running while waiting, and a breach rolls back.
    Manual {
        /// Roll back when no promotion comes within this long; `None`
        /// waits until promoted or aborted.
        #[serde(default, with = "crate::duration_ms::option")]
        timeout: Option<Duration>,
    },
}

/// Canary deployment: the new release takes a growing share of traffic,
/// stage by stage, while its metrics are compared with stable's.
///
/// The fleet is split by [`Group`]: the instances of
/// [`stable_group`](Self::stable_group) serve the current release, those of
/// [`canary_group`](Self::canary_group) receive the new one first. The plan:
///
/// 1. **Isolate** — all traffic to stable (the canary's weight is 0).
/// 2. **Deploy the canary** — each canary instance is drained, stopped,
///    given the release, started and health-checked, all before any traffic
///    reaches it; stable is untouched.
/// 3. **Stages** — for each weight in
///    [`stages`](Self::stages) (default 5 → 25 → 50 → 75 → 100 %): set the
///    split through [`LoadBalancer::set_weights`](crate::LoadBalancer::set_weights),
///    hold it [`stage_duration`](Self::stage_duration), checking the metrics
///    every [`check_interval`](Self::check_interval) against the
///    [`analysis`](Self::analysis) rules (see [`crate::analysis`]). A failed
///    or persistently inconclusive analysis rolls back at once.
/// 4. **Promotion** — [`Promotion::Auto`], or wait for a manual
///    promotion between stages.
/// 5. **Finalize** — record the stable release (the backup; instances
///    keep it installed), move the stable instances to the release in
///    batches of [`finalize_batch`](Self::finalize_batch) (a rolling update),
///    return all traffic to stable, and stop the canary instances.
///
/// **Rollback**, on a failed analysis, a failed step, a promotion
/// timeout, or an abort at any moment: all traffic to stable, the canary
/// instances drained, stopped and returned to their previous release
/// (without starting them); stable instances already moved by the finalize
/// are restored too. Canary instances end stopped either way; the report
/// calls them [`Idle`](crate::InstanceStatus::Idle).
///
/// ```
/// use std::time::Duration;
/// use deploykit::Canary;
/// let canary = Canary {
///     stages: vec![10, 50, 100],
///     stage_duration: Duration::from_secs(120),
///     ..Canary::default()
/// };
/// canary.validate().unwrap();
/// assert_eq!(canary.check_interval, Duration::from_secs(30));
/// ```
///
/// Its serde form is the `[strategy.canary]` section of `deploykit.toml`
/// (see [`config_key`](super::config_key)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "super::file::CanaryDoc", into = "super::file::CanaryDoc")]
pub struct Canary {
    /// The canary's share of traffic at each stage, percent: strictly
    /// increasing, each 1–100. Default `[5, 25, 50, 75, 100]`.
    pub stages: Vec<u8>,
    /// How long each stage is held. Default 300 s.
    pub stage_duration: Duration,
    /// Time between metric checks; at most the stage duration. Default 30 s.
    pub check_interval: Duration,
    /// The group serving the current release. Default `stable`.
    pub stable_group: Group,
    /// The group receiving the new release first. Default `canary`.
    pub canary_group: Group,
    /// Thresholds and limits of the analysis.
    pub analysis: AnalysisRules,
    /// Automatic or manual promotion between stages. Default automatic.
    pub promotion: Promotion,
    /// Health probes after a start. Default 3 probes, 10 s apart.
    pub health: HealthCheck,
    /// Upper bound of a drain wait. Default 30 s.
    pub drain_timeout: Duration,
    /// Stable instances moved to the release at once when finalizing.
    /// Default 1.
    pub finalize_batch: usize,
    /// Integration-test gates run against the canary instances before their first traffic stage
    /// (each a [`Step::Gate`](crate::Step) for the executor's
    /// [`GateRunner`](crate::integration::GateRunner)); a failing one rolls
    /// back with nothing switched. Default none. Not part of the `[strategy.canary]`
    /// section: the CLI fills it from `[[gitops.gates]]`.
    pub gates: Vec<String>,
    /// A feature flag the canary carries: after each stage's weight change,
    /// [`flag_variant`](Self::flag_variant) of this flag is served to the
    /// stage's percent of targeting keys (the rest get the flag's safe
    /// variant), and any rollback kills the flag (safe variant for
    /// everyone). Needs the executor's
    /// [`FlagSwitch`](crate::flags::FlagSwitch). Default none.
    pub flag: Option<String>,
    /// The variant of [`flag`](Self::flag) that stands for the new release.
    /// Default `on`.
    pub flag_variant: String,
    /// Faults injected into the stages, each with the reaction expected
    /// (see [`crate::chaos`]). Default none.
    pub chaos: Vec<crate::chaos::ChaosSpec>,
}

impl Default for Canary {
    fn default() -> Self {
        Self {
            stages: vec![5, 25, 50, 75, 100],
            stage_duration: Duration::from_secs(300),
            check_interval: Duration::from_secs(30),
            stable_group: Group::new("stable").expect("valid group"),
            canary_group: Group::new("canary").expect("valid group"),
            analysis: AnalysisRules::default(),
            promotion: Promotion::Auto,
            health: HealthCheck::default(),
            drain_timeout: Duration::from_secs(30),
            finalize_batch: 1,
            gates: Vec::new(),
            flag: None,
            flag_variant: "on".to_owned(),
            chaos: Vec::new(),
        }
    }
}

impl Canary {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: `stages` (empty),
    /// `stages[i]` (outside 1–100, or not above the one before),
    /// `stage_duration` (0), `check_interval` (0 or longer than the stage),
    /// `canary_group` (the same as the stable group), `finalize_batch` (0),
    /// `health.retries` (0), `promotion.timeout` (0), or an `analysis.*`
    /// threshold (see [`AnalysisRules::validate`]).
    pub fn validate(&self) -> Result<()> {
        if self.stages.is_empty() {
            return Err(Error::invalid(
                "stages",
                "is empty; list the canary's traffic percent per stage, e.g. [5, 25, 50, 75, 100]",
            ));
        }
        for (i, w) in self.stages.iter().enumerate() {
            if !(1..=100).contains(w) {
                return Err(Error::invalid(
                    format!("stages[{i}]"),
                    format!("{w} is outside 1-100; each stage is the canary's percent of traffic"),
                ));
            }
            if i > 0 && *w <= self.stages[i - 1] {
                return Err(Error::invalid(
                    format!("stages[{i}]"),
                    format!(
                        "{w} does not increase on the stage before ({}); stages must strictly increase, e.g. [5, 25, 50, 75, 100]",
                        self.stages[i - 1]
                    ),
                ));
            }
        }
        if self.stage_duration.is_zero() {
            return Err(Error::invalid(
                "stage_duration",
                "is 0; hold each stage long enough to judge it, e.g. \"5m\"",
            ));
        }
        if self.check_interval.is_zero() {
            return Err(Error::invalid(
                "check_interval",
                "is 0; check the metrics every few seconds at most as often as they are scraped, e.g. \"30s\"",
            ));
        }
        if self.check_interval > self.stage_duration {
            return Err(Error::invalid(
                "check_interval",
                format!(
                    "{} is longer than stage_duration ({}), so a stage would end unchecked; shorten it or lengthen the stage",
                    crate::duration_text::format(self.check_interval),
                    crate::duration_text::format(self.stage_duration)
                ),
            ));
        }
        if self.canary_group == self.stable_group {
            return Err(Error::invalid(
                "canary_group",
                format!(
                    "is the same as stable_group ({}); canary and stable instances need different groups",
                    self.stable_group
                ),
            ));
        }
        if self.finalize_batch == 0 {
            return Err(Error::invalid(
                "finalize_batch",
                "is 0; move at least 1 stable instance at once",
            ));
        }
        if self.health.retries == 0 {
            return Err(Error::invalid(
                "health.retries",
                "is 0; at least 1 probe is needed",
            ));
        }
        if let Promotion::Manual { timeout: Some(t) } = self.promotion {
            if t.is_zero() {
                return Err(Error::invalid(
                    "promotion.timeout",
                    "is 0; every stage would roll back at once; omit it to wait until promoted",
                ));
            }
        }
        if let Some(flag) = &self.flag {
            if flag.trim().is_empty() {
                return Err(Error::invalid(
                    "flag",
                    "is empty; name the feature flag the canary carries, e.g. \"new-checkout\", or omit it",
                ));
            }
            if self.flag_variant.trim().is_empty() {
                return Err(Error::invalid(
                    "flag_variant",
                    "is empty; name the variant the new release stands for, e.g. \"on\"",
                ));
            }
        }
        for (i, c) in self.chaos.iter().enumerate() {
            c.validate(i, self.stages.len(), self.stage_duration)?;
        }
        self.analysis.validate()
    }

    /// The chaos entries of stage `stage`, as the plan carries them.
    pub(super) fn chaos_steps(&self, stage: usize) -> Vec<crate::chaos::ChaosStep> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self.chaos
            .iter()
            .enumerate()
            .filter(|(_, c)| c.stage == stage)
            .map(|(entry, c)| crate::chaos::ChaosStep {
                entry,
                fault: c.fault,
                group: match c.target {
                    crate::chaos::ChaosTarget::Canary => self.canary_group.clone(),
                    crate::chaos::ChaosTarget::Stable => self.stable_group.clone(),
                },
                after_ms: ms(c.after),
                duration_ms: c.duration.map(ms),
            })
            .collect()
    }

    pub(super) fn weights(&self, canary: u8) -> Vec<GroupWeight> {
        vec![
            GroupWeight {
                group: self.stable_group.clone(),
                percent: 100 - canary,
            },
            GroupWeight {
                group: self.canary_group.clone(),
                percent: canary,
            },
        ]
    }

    /// All traffic to stable, then the flag (if any) killed; a flag left on
    /// fails the rollback, since the new code path may still be served.
    fn on_abort(&self) -> Vec<AbortStep> {
        let mut steps = vec![AbortStep::new(Step::SetWeights {
            weights: self.weights(0),
        })];
        if let Some(flag) = &self.flag {
            steps.push(
                AbortStep::new(Step::FlagKill { flag: flag.clone() })
                    .on_failure(crate::plan::AbortFailure::FailRollback),
            );
        }
        steps
    }

    fn replace_steps(&self, id: &InstanceId, release: &ReleaseId) -> Vec<Step> {
        super::replace_steps(id, release, self.health, self.drain_timeout)
    }
}

impl Strategy for Canary {
    fn kind(&self) -> crate::StrategyKind {
        crate::StrategyKind::Canary
    }

    fn plan(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        self.validate()?;
        let of = self.stages.len();
        self.shaped_plan(self.kind(), fleet, release, true, |analysis| {
            self.widen(&[], 1, of, analysis)
        })
    }
}

/// A manual promotion's timeout as a plan holds it.
pub(super) fn timeout_ms(timeout: Option<Duration>) -> Option<u64> {
    timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
}

impl Canary {
    /// The canary stages numbered from `first`, each keeping `rules` (so
    /// users a rule sends to the canary stay there): the canary's own
    /// stages from 1 without rules, a shadow's or dark launch's after it.
    pub(super) fn widen(&self, rules: &[Rule], first: usize, of: usize, analysis: &Analysis) -> Vec<Stage> {
        self.stages
            .iter()
            .enumerate()
            .map(|(k, w)| {
                let stage = first + k;
                let weights = self.weights(*w);
                let mut steps = vec![if rules.is_empty() {
                    Step::SetWeights { weights }
                } else {
                    Step::ApplyPolicy {
                        policy: TrafficPolicy {
                            rules: rules.to_vec(),
                            split: Split {
                                weights,
                                sticky: None,
                            },
                            mirror: None,
                        },
                    }
                }];
                if let Some(flag) = &self.flag {
                    steps.push(Step::FlagShare {
                        flag: flag.clone(),
                        variant: self.flag_variant.clone(),
                        percent: *w,
                    });
                }
                steps.push(Step::Analyze {
                    stage,
                    of,
                    weight: *w,
                    duration: self.stage_duration,
                    analysis: analysis.clone(),
                    chaos: self.chaos_steps(stage),
                    ramp_down: None,
                });
                if let Promotion::Manual { timeout } = self.promotion {
                    if stage < of {
                        steps.push(Step::AwaitPromotion {
                            stage,
                            weight: *w,
                            timeout_ms: timeout_ms(timeout),
                            analysis: analysis.clone(),
                        });
                    }
                }
                Stage {
                    if_winner: None,
                    name: format!("canary {w}% ({stage}/{of})"),
                    units: vec![Unit {
                        instance: None,
                        steps,
                    }],
                }
            })
            .collect()
    }

    /// The plan every canary-shaped strategy shares, around its traffic
    /// `phases` (given the analysis of canary against stable): all traffic
    /// to stable, the canary instances replaced, the gates, the phases, then
    /// — when `promote` — the stable release backed up and the stable
    /// instances moved in batches; at the end all traffic back to stable
    /// (which also ends any rule or mirror) and the canary instances
    /// stopped. An abort sends all traffic to stable first.
    pub(super) fn shaped_plan(
        &self,
        kind: crate::StrategyKind,
        fleet: &FleetSnapshot,
        release: &ReleaseId,
        promote: bool,
        phases: impl FnOnce(&Analysis) -> Vec<Stage>,
    ) -> Result<Plan> {
        self.shaped(kind, fleet, release, promote, false, phases)
    }

    /// The release every stable instance runs now: what a drill deploys as
    /// its own canary.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `release` when a stable instance runs
    /// no release yet, or the stable instances run different ones.
    pub fn current_release(&self, fleet: &FleetSnapshot) -> Result<ReleaseId> {
        let mut found: Option<&ReleaseId> = None;
        for i in fleet.group(&self.stable_group) {
            match (&i.release, found) {
                (None, _) => {
                    return Err(Error::invalid(
                        "release",
                        format!(
                            "{} (stable) runs no release yet, so there is no current release to drill; \
                             deploy one first, or name the release to drill",
                            i.backend.id
                        ),
                    ))
                }
                (Some(r), Some(f)) if r != f => {
                    return Err(Error::invalid(
                        "release",
                        format!(
                            "the stable instances run different releases ({f} and {r} on {}), so there is no \
                             current release to drill; finish or roll back the last deployment first",
                            i.backend.id
                        ),
                    ))
                }
                (Some(r), _) => found = Some(r),
            }
        }
        found.cloned().ok_or_else(|| {
            Error::invalid(
                "instances",
                format!(
                    "no instance is in the stable group {}; a drill needs stable instances",
                    self.stable_group
                ),
            )
        })
    }

    /// A drill of the release the stable instances run now (see
    /// [`crate::chaos::drill`]): the canary instances are given that
    /// release, and the stages run up to the last one carrying a
    /// [`chaos`](Self::chaos) entry, each held until its entries' rollback
    /// budgets (`after` + `within`) have run out, so a gate slower than
    /// its budget ends the stage instead of the drill going on. Nothing is
    /// promoted: traffic goes back to stable and the canary is stopped,
    /// whether the gate fired or not.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `chaos` (no entry), `release` (see
    /// [`current_release`](Self::current_release)) or a field
    /// [`validate`](Self::validate) refuses.
    pub fn drill_plan(&self, fleet: &FleetSnapshot) -> Result<Plan> {
        self.validate()?;
        let Some(last) = self.chaos.iter().map(|c| c.stage).max() else {
            return Err(Error::invalid(
                "chaos",
                "has no entry; a drill injects at least one fault (chaos::drill::default_entry gives one)",
            ));
        };
        let release = self.current_release(fleet)?;
        let of = self.stages.len();
        self.shaped(self.kind(), fleet, &release, false, true, |analysis| {
            let mut stages = self.widen(&[], 1, of, analysis);
            stages.truncate(last);
            for step in stages
                .iter_mut()
                .flat_map(|s| &mut s.units)
                .flat_map(|u| &mut u.steps)
            {
                if let Step::Analyze { stage, duration, .. } = step {
                    let budget = self
                        .chaos
                        .iter()
                        .filter(|c| c.stage == *stage)
                        .filter_map(|c| c.within.map(|w| c.after + w))
                        .max();
                    if let Some(b) = budget {
                        *duration = (*duration).max(b);
                    }
                }
            }
            stages
        })
    }

    /// [`shaped_plan`](Self::shaped_plan); a `drill` replaces the canary
    /// even when stable already runs `release`.
    fn shaped(
        &self,
        kind: crate::StrategyKind,
        fleet: &FleetSnapshot,
        release: &ReleaseId,
        promote: bool,
        drill: bool,
        phases: impl FnOnce(&Analysis) -> Vec<Stage>,
    ) -> Result<Plan> {
        check_fleet(fleet)?;
        for i in &fleet.instances {
            let g = &i.backend.group;
            if g != &self.stable_group && g != &self.canary_group {
                return Err(Error::invalid(
                    "instances",
                    format!(
                        "{} is in group {g}, neither the stable group ({}) nor the canary group ({}); give every instance one of the two",
                        i.backend.id, self.stable_group, self.canary_group
                    ),
                ));
            }
        }
        let stable: Vec<_> = fleet.group(&self.stable_group).collect();
        let canary: Vec<_> = fleet.group(&self.canary_group).collect();
        if stable.is_empty() {
            return Err(Error::invalid(
                "instances",
                format!("no instance is in the stable group {}; a canary needs stable instances to compare with and to promote", self.stable_group),
            ));
        }
        if canary.is_empty() {
            return Err(Error::invalid(
                "instances",
                format!(
                    "no instance is in the canary group {}; put at least one instance in it",
                    self.canary_group
                ),
            ));
        }
        let (skipped, todo): (Vec<&InstanceSnapshot>, Vec<&InstanceSnapshot>) =
            stable.iter().partition(|i| i.release.as_ref() == Some(release));
        let skipped: Vec<InstanceId> = skipped.iter().map(|i| i.backend.id.clone()).collect();
        let mut plan = Plan::new(kind, release.clone(), previous_map(fleet), Vec::new())
            .with_policy(FailurePolicy::AbortAll)
            .with_health(self.health)
            .with_drain_timeout(self.drain_timeout)
            .with_rollback_batch(self.finalize_batch)
            .with_skipped(skipped)
            .with_on_abort(self.on_abort())
            .with_leave_stopped(canary.iter().map(|i| i.backend.id.clone()).collect());
        if todo.is_empty() && !drill {
            // Stable already runs the release: nothing to do.
            plan.on_abort.clear();
            plan.leave_stopped.clear();
            return Ok(plan);
        }
        let traffic = |name: &str, canary_percent: u8| Stage {
            if_winner: None,
            name: name.into(),
            units: vec![Unit {
                instance: None,
                steps: vec![Step::SetWeights {
                    weights: self.weights(canary_percent),
                }],
            }],
        };
        let stages = &mut plan.stages;
        stages.push(traffic("isolate canary", 0));
        stages.push(Stage {
            if_winner: None,
            name: "deploy canary".into(),
            units: canary
                .iter()
                .map(|i| Unit {
                    instance: Some(i.backend.id.clone()),
                    steps: self.replace_steps(&i.backend.id, release),
                })
                .collect(),
        });
        for name in &self.gates {
            stages.push(Stage {
                if_winner: None,
                name: format!("gate {name} on canary"),
                units: vec![Unit {
                    instance: None,
                    steps: vec![Step::Gate {
                        name: name.clone(),
                        group: self.canary_group.clone(),
                        release: release.clone(),
                    }],
                }],
            });
        }
        stages.extend(phases(&self.analysis_of()));
        if promote {
            stages.push(Stage {
                if_winner: None,
                name: "back up stable".into(),
                units: vec![Unit {
                    instance: None,
                    steps: vec![Step::BackupRelease {
                        group: self.stable_group.clone(),
                    }],
                }],
            });
            let batches: Vec<_> = todo.chunks(self.finalize_batch).collect();
            let n = batches.len();
            for (b, chunk) in batches.into_iter().enumerate() {
                stages.push(Stage {
                    if_winner: None,
                    name: format!("promote stable {}/{n}", b + 1),
                    units: chunk
                        .iter()
                        .map(|i| Unit {
                            instance: Some(i.backend.id.clone()),
                            steps: self.replace_steps(&i.backend.id, release),
                        })
                        .collect(),
                });
            }
        }
        stages.push(traffic("all traffic to stable", 0));
        stages.push(Stage {
            if_winner: None,
            name: "stop canary".into(),
            units: canary
                .iter()
                .map(|i| {
                    let instance = || i.backend.id.clone();
                    Unit {
                        instance: Some(instance()),
                        steps: vec![
                            Step::Drain { instance: instance() },
                            Step::AwaitDrained {
                                instance: instance(),
                                timeout: self.drain_timeout,
                            },
                            Step::Stop { instance: instance() },
                        ],
                    }
                })
                .collect(),
        });
        Ok(plan)
    }

    /// The analysis of the canary group against the stable group.
    pub(super) fn analysis_of(&self) -> Analysis {
        Analysis {
            canary: self.canary_group.clone(),
            stable: self.stable_group.clone(),
            interval: self.check_interval,
            rules: self.analysis.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traits::Backend;
    use crate::Address;

    fn fleet(stable: usize, canary: usize) -> FleetSnapshot {
        let mut instances = Vec::new();
        for (g, n) in [("stable", stable), ("canary", canary)] {
            for _ in 0..n {
                let k = instances.len() + 1;
                instances.push(InstanceSnapshot {
                    backend: Backend {
                        id: InstanceId::new(format!("i-{k}")).unwrap(),
                        address: Address::parse(&format!("127.0.0.1:{}", 20000 + k)).unwrap(),
                        group: Group::new(g).unwrap(),
                    },
                    release: Some(ReleaseId::new("v1").unwrap()),
                });
            }
        }
        FleetSnapshot { instances }
    }

    fn err_field(c: &Canary) -> String {
        match c.validate().unwrap_err() {
            Error::InvalidInput { field, .. } => field,
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn validation_names_the_field() {
        let d = Canary::default();
        assert_eq!(
            err_field(&Canary {
                stages: vec![],
                ..d.clone()
            }),
            "stages"
        );
        assert_eq!(
            err_field(&Canary {
                stages: vec![0, 50],
                ..d.clone()
            }),
            "stages[0]"
        );
        assert_eq!(
            err_field(&Canary {
                stages: vec![5, 101],
                ..d.clone()
            }),
            "stages[1]"
        );
        assert_eq!(
            err_field(&Canary {
                stages: vec![5, 50, 50],
                ..d.clone()
            }),
            "stages[2]"
        );
        assert_eq!(
            err_field(&Canary {
                stages: vec![50, 25],
                ..d.clone()
            }),
            "stages[1]"
        );
        assert_eq!(
            err_field(&Canary {
                stage_duration: Duration::ZERO,
                ..d.clone()
            }),
            "stage_duration"
        );
        assert_eq!(
            err_field(&Canary {
                check_interval: Duration::ZERO,
                ..d.clone()
            }),
            "check_interval"
        );
        assert_eq!(
            err_field(&Canary {
                check_interval: Duration::from_secs(301),
                ..d.clone()
            }),
            "check_interval"
        );
        assert_eq!(
            err_field(&Canary {
                canary_group: Group::new("stable").unwrap(),
                ..d.clone()
            }),
            "canary_group"
        );
        assert_eq!(
            err_field(&Canary {
                finalize_batch: 0,
                ..d.clone()
            }),
            "finalize_batch"
        );
        assert_eq!(
            err_field(&Canary {
                promotion: Promotion::Manual {
                    timeout: Some(Duration::ZERO)
                },
                ..d.clone()
            }),
            "promotion.timeout"
        );
        let mut bad = d.clone();
        bad.analysis.error_threshold = 2.0;
        assert_eq!(err_field(&bad), "analysis.error_threshold");
        // Up to 100 and a single stage are fine.
        Canary {
            stages: vec![100],
            ..d.clone()
        }
        .validate()
        .unwrap();
        d.validate().unwrap();
    }

    #[test]
    fn plan_shape() {
        let plan = Canary::default()
            .plan(&fleet(4, 1), &ReleaseId::new("v2").unwrap())
            .unwrap();
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "isolate canary",
                "deploy canary",
                "canary 5% (1/5)",
                "canary 25% (2/5)",
                "canary 50% (3/5)",
                "canary 75% (4/5)",
                "canary 100% (5/5)",
                "back up stable",
                "promote stable 1/4",
                "promote stable 2/4",
                "promote stable 3/4",
                "promote stable 4/4",
                "all traffic to stable",
                "stop canary"
            ]
        );
        assert_eq!(plan.policy, FailurePolicy::AbortAll);
        assert_eq!(plan.leave_stopped, vec![InstanceId::new("i-5").unwrap()]);
        assert_eq!(plan.on_abort.len(), 1);
        assert_eq!(plan.on_abort[0].to_string(), "set weights stable=100% canary=0%");
        assert_eq!(
            plan.stages[3].units[0].steps[0].to_string(),
            "set weights stable=75% canary=25%"
        );
        assert_eq!(
            plan.stages[3].units[0].steps[1].to_string(),
            "analyze canary stage 2/5 at 25% for 300s (check every 30s)"
        );
        // Five stages of 300 s at least.
        assert!(plan.projected_duration().min >= Duration::from_secs(1500));
        // The plan is serializable data.
        let json = serde_json::to_string(&plan).unwrap();
        let back: Plan = serde_json::from_str(&json).unwrap();
        assert_eq!(back, plan);
    }

    #[test]
    fn manual_promotion_waits_between_stages_only() {
        let c = Canary {
            stages: vec![10, 50, 100],
            promotion: Promotion::Manual {
                timeout: Some(Duration::from_secs(600)),
            },
            ..Canary::default()
        };
        let plan = c.plan(&fleet(2, 1), &ReleaseId::new("v2").unwrap()).unwrap();
        let waits: Vec<usize> = plan
            .stages
            .iter()
            .flat_map(|s| &s.units)
            .flat_map(|u| &u.steps)
            .filter_map(|s| match s {
                Step::AwaitPromotion {
                    stage, timeout_ms, ..
                } => {
                    assert_eq!(*timeout_ms, Some(600_000));
                    Some(*stage)
                }
                _ => None,
            })
            .collect();
        assert_eq!(waits, [1, 2]);
    }

    #[test]
    fn fleet_errors_name_the_problem() {
        let v2 = ReleaseId::new("v2").unwrap();
        let e = Canary::default().plan(&fleet(3, 0), &v2).unwrap_err().to_string();
        assert!(e.contains("canary group canary"), "{e}");
        let e = Canary::default().plan(&fleet(0, 2), &v2).unwrap_err().to_string();
        assert!(e.contains("stable group stable"), "{e}");
        let mut f = fleet(2, 1);
        f.instances[0].backend.group = Group::new("blue").unwrap();
        let e = Canary::default().plan(&f, &v2).unwrap_err().to_string();
        assert!(e.contains("i-1 is in group blue"), "{e}");
    }

    #[test]
    fn stable_already_on_the_release_is_a_no_op() {
        let mut f = fleet(2, 1);
        for i in &mut f.instances {
            i.release = Some(ReleaseId::new("v2").unwrap());
        }
        let plan = Canary::default()
            .plan(&f, &ReleaseId::new("v2").unwrap())
            .unwrap();
        assert!(plan.stages.is_empty());
        assert_eq!(plan.skipped.len(), 2);
    }

    #[test]
    fn a_drill_replaces_the_canary_with_the_current_release_and_stops_after_its_chaos_stage() {
        let f = fleet(2, 1);
        let mut canary = Canary {
            stages: vec![10, 50, 100],
            stage_duration: Duration::from_secs(60),
            check_interval: Duration::from_secs(10),
            ..Canary::default()
        };
        let e = canary.drill_plan(&f).unwrap_err().to_string();
        assert!(e.contains("invalid chaos: has no entry"), "{e}");
        canary.chaos = vec![crate::chaos::drill::default_entry(
            &canary,
            crate::chaos::Fault::Kill,
            None,
        )];
        let plan = canary.drill_plan(&f).unwrap();
        assert_eq!(plan.release, ReleaseId::new("v1").unwrap());
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "isolate canary",
                "deploy canary",
                "canary 10% (1/3)",
                "all traffic to stable",
                "stop canary"
            ]
        );
        // The stage is held until the entry's budget has run out: injected
        // after 30 s, 30 s + 30 s drain + 30 s allowance.
        let held = plan.stages[2].units[0].steps.iter().find_map(|s| match s {
            Step::Analyze { duration, chaos, .. } => Some((*duration, chaos.len())),
            _ => None,
        });
        assert_eq!(held, Some((Duration::from_secs(120), 1)));
        // The canary's own plan of the same release does nothing, as before.
        assert!(canary.plan(&f, &plan.release).unwrap().stages.is_empty());
    }

    #[test]
    fn a_drill_needs_one_current_release_on_stable() {
        let mut canary = Canary::default();
        canary.chaos = vec![crate::chaos::drill::default_entry(
            &canary,
            crate::chaos::Fault::Kill,
            None,
        )];
        let mut f = fleet(2, 1);
        f.instances[1].release = Some(ReleaseId::new("v2").unwrap());
        let e = canary.drill_plan(&f).unwrap_err().to_string();
        assert!(
            e.contains("invalid release: the stable instances run different releases (v1 and v2 on i-2)"),
            "{e}"
        );
        f.instances[0].release = None;
        let e = canary.drill_plan(&f).unwrap_err().to_string();
        assert!(e.contains("i-1 (stable) runs no release yet"), "{e}");
    }
}
