use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{check_fleet, previous_map};
use crate::bluegreen_state::{reconcile, LiveStore, Reconciled};
use crate::error::{Error, Result};
use crate::executor::{Executor, RunOptions};
use crate::names::{Group, InstanceId, ReleaseId};
use crate::plan::{
    AbortFailure, AbortStep, AbortWhen, FailurePolicy, FleetSnapshot, HealthCheck, InstanceUndo, Plan, Stage,
    Step, Unit,
};
use crate::report::{InstanceStatus, Report};
use crate::smoke::{validate_path, SmokeCheck};
use crate::traits::Health;

/// How long the previously live environment keeps running after a switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepOld {
    /// Keep it running (so a rollback is instant) for this long, then stop
    /// it — as Argo Rollouts' `scaleDownDelaySeconds`. Serialized in
    /// milliseconds.
    For(#[serde(with = "crate::duration_ms")] Duration),
    /// Keep it running until the next deployment prepares it.
    UntilNextDeployment,
}

impl Default for KeepOld {
    /// 30 s, as Argo Rollouts' default `scaleDownDelaySeconds`.
    fn default() -> Self {
        KeepOld::For(Duration::from_secs(30))
    }
}

/// Blue-green deployment: a whole second environment, switched to at once.
///
/// The fleet is two *environments*, each a [`Group`] of any number of
/// instances with their own addresses (default names `blue` and `green`).
/// One is live; which one is durable state in a
/// [`LiveStore`](crate::bluegreen_state::LiveStore), reconciled with the
/// load balancer before anything is done
/// ([`reconcile`](crate::bluegreen_state::reconcile)).
///
/// A deployment ([`deploy`](Self::deploy)):
///
/// 1. **prepare** the idle environment, every instance at once: stop what
///    the previous deployment left running there, install the release (the
///    instance lays out `releases/`, `shared/`, `current` and swaps
///    `current` atomically), start, and wait until healthy within
///    [`healthy_deadline`](Self::healthy_deadline);
/// 2. **smoke test** every idle instance with
///    [`smoke_checks`](Self::smoke_checks) — no live traffic yet;
/// 3. **warm up** the idle environment with
///    [`warmup_requests`](Self::warmup_requests) requests (failures counted,
///    not fatal; progress in the event stream);
/// 4. **switch** all traffic at once
///    ([`LoadBalancer::switch_to`](crate::LoadBalancer::switch_to)), with
///    the pending switch recorded before and the new live environment
///    recorded after;
/// 5. keep the old environment running for [`keep_old`](Self::keep_old),
///    then stop it, unless a rollback made it live again meanwhile.
///
/// A failure before the switch stops the idle environment and returns it to
/// its previous release; live traffic was never touched. A failure of the
/// switch leaves the old environment live. A failure after the switch (the
/// record cannot be written) switches traffic back and records the old
/// environment live again, so the record ends consistent with the load
/// balancer.
///
/// [`rollback`](Self::rollback) makes the previous environment live again.
///
/// [`plan`](Self::plan) compiles steps 1–4 from the live environment that
/// [`reconcile`](crate::bluegreen_state::reconcile) (or, for a dry run,
/// [`peek`](crate::bluegreen_state::peek)) returned: a blue-green plan cannot
/// be made without asking which environment is live.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use deploykit::{BlueGreen, Executor, ReleaseId};
/// use deploykit_testkit::{FakeFleet, FakeLiveStore, FakeSmokeTester};
///
/// let fleet = FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).live("blue");
/// let store = FakeLiveStore::new();
/// let exec = Executor::builder()
///     .instances(fleet.instances())
///     .load_balancer(Arc::new(fleet.load_balancer()))
///     .smoke_tester(Arc::new(FakeSmokeTester::new()))
///     .live_store(Arc::new(store.clone()))
///     .build()?;
/// let outcome = BlueGreen::default().deploy(&exec, &ReleaseId::new("v2")?).await?;
/// assert!(outcome.is_success());
/// assert_eq!(outcome.live.as_str(), "green");
/// assert_eq!(store.live().unwrap().as_str(), "green");
/// # Ok(())
/// # }
/// ```
///
/// Its serde form is the `[strategy.blue-green]` section of `deploykit.toml`
/// (see [`config_key`](super::config_key)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "super::file::BlueGreenDoc", into = "super::file::BlueGreenDoc")]
pub struct BlueGreen {
    /// The two environments' group names. Default `["blue", "green"]`; the
    /// first is live when nothing is recorded.
    pub environments: [Group; 2],
    /// How long each idle instance may take to become healthy after start.
    /// Default 5 min (Nomad's `healthy_deadline`).
    pub healthy_deadline: Duration,
    /// Wait between health probes while waiting. Default 2 s.
    pub health_interval: Duration,
    /// Checks run against every idle instance before the switch. Default
    /// [`SmokeCheck::defaults`] (health, status, database ping).
    pub smoke_checks: Vec<SmokeCheck>,
    /// Warm-up requests sent to the idle environment. Default 100.
    pub warmup_requests: u32,
    /// The path of the warm-up requests. Default `/`.
    pub warmup_path: String,
    /// How long the old environment keeps running after the switch. Default
    /// 30 s.
    pub keep_old: KeepOld,
    /// Integration-test gates run against the idle environment before the switch (after the smoke checks)
    /// (each a [`Step::Gate`](crate::Step) for the executor's
    /// [`GateRunner`](crate::integration::GateRunner)); a failing one rolls
    /// back with nothing switched. Default none. Not part of the `[strategy.blue-green]`
    /// section: the CLI fills it from `[[gitops.gates]]`.
    pub gates: Vec<String>,
}

impl Default for BlueGreen {
    fn default() -> Self {
        Self {
            environments: [
                Group::new("blue").expect("valid"),
                Group::new("green").expect("valid"),
            ],
            healthy_deadline: Duration::from_secs(300),
            health_interval: Duration::from_secs(2),
            smoke_checks: SmokeCheck::defaults(),
            warmup_requests: 100,
            warmup_path: "/".into(),
            keep_old: KeepOld::default(),
            gates: Vec::new(),
        }
    }
}

/// What a blue-green [`deploy`](BlueGreen::deploy) or
/// [`rollback`](BlueGreen::rollback) did.
#[derive(Debug, Clone, PartialEq)]
pub struct BlueGreenReport {
    /// The run that prepared and switched (or, for a rollback, switched
    /// back).
    pub deployment: Report,
    /// The environment live at the end.
    pub live: Group,
    /// The run that stopped the environment no longer live, if it ran.
    pub retired: Option<Report>,
    /// Why the old environment was left running, when it was.
    pub kept_running: Option<String>,
}

impl BlueGreenReport {
    /// Whether the deployment (or rollback) succeeded.
    pub fn is_success(&self) -> bool {
        self.deployment.is_success()
    }

    /// Instances of the retired environment that could not be stopped.
    pub fn retire_failures(&self) -> Vec<&InstanceId> {
        self.retired
            .iter()
            .flat_map(|r| &r.instances)
            .filter(|i| i.error.is_some() || i.status == InstanceStatus::Unrecoverable)
            .map(|i| &i.id)
            .collect()
    }
}

impl BlueGreen {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `environments` (two equal names),
    /// `healthy_deadline` or `health_interval` (0), `smoke_checks[n]` (see
    /// [`SmokeCheck::validate`]) or `warmup_path`; `keep_old` 0 is allowed
    /// (stop at once).
    pub fn validate(&self) -> Result<()> {
        let [a, b] = &self.environments;
        if a == b {
            return Err(Error::invalid(
                "environments",
                format!("both are named {a}; give the two environments different names, e.g. blue and green"),
            ));
        }
        if self.healthy_deadline.is_zero() {
            return Err(Error::invalid(
                "healthy_deadline",
                "is 0; give instances time to become healthy, e.g. 5m",
            ));
        }
        if self.health_interval.is_zero() {
            return Err(Error::invalid("health_interval", "is 0; use e.g. 2s"));
        }
        for (n, c) in self.smoke_checks.iter().enumerate() {
            c.validate(&format!("smoke_checks[{n}]"))?;
        }
        validate_path("warmup_path", &self.warmup_path)?;
        Ok(())
    }

    /// The environment that is not `env`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `live`) when `env` is neither.
    pub fn other(&self, env: &Group) -> Result<&Group> {
        let [a, b] = &self.environments;
        if env == a {
            Ok(b)
        } else if env == b {
            Ok(a)
        } else {
            Err(Error::invalid(
                "live",
                format!("{env} is not one of the environments ({a} and {b})"),
            ))
        }
    }

    /// Checks that every instance belongs to one of the environments and each
    /// environment has at least one.
    fn check_environments(&self, fleet: &FleetSnapshot) -> Result<()> {
        check_fleet(fleet)?;
        for i in &fleet.instances {
            if !self.environments.contains(&i.backend.group) {
                return Err(Error::invalid(
                    "instances",
                    format!(
                        "{} is in the group {}, which is neither {} nor {}; put every instance in one of the environments",
                        i.backend.id, i.backend.group, self.environments[0], self.environments[1]
                    ),
                ));
            }
        }
        for env in &self.environments {
            if fleet.group(env).next().is_none() {
                return Err(Error::invalid(
                    "instances",
                    format!("the environment {env} has no instances; give each environment at least one"),
                ));
            }
        }
        Ok(())
    }

    fn live_store(exec: &Executor) -> Result<&dyn LiveStore> {
        exec.live_store().map(|s| s.as_ref()).ok_or_else(|| {
            Error::invalid(
                "live_store",
                "blue-green needs a live-state store; set one with ExecutorBuilder::live_store (e.g. a FileLiveStore)",
            )
        })
    }

    async fn reconciled(&self, exec: &Executor) -> Result<Reconciled> {
        self.validate()?;
        let store = Self::live_store(exec)?;
        let r = reconcile(store, exec.load_balancer().as_ref(), &self.environments).await?;
        tracing::info!(live = %r.live, resolution = ?r.resolution, "blue-green state reconciled");
        Ok(r)
    }

    /// A plan that stops every instance of `env` (the environment no longer
    /// live).
    fn retire_plan(&self, fleet: &FleetSnapshot, env: &Group, release: &ReleaseId) -> Plan {
        let ids: Vec<InstanceId> = fleet.group(env).map(|i| i.backend.id.clone()).collect();
        let stage = Stage {
            if_winner: None,
            name: format!("stop {env}"),
            units: ids
                .iter()
                .map(|id| Unit {
                    instance: Some(id.clone()),
                    steps: vec![Step::Stop { instance: id.clone() }],
                })
                .collect(),
        };
        Plan::new(
            crate::StrategyKind::BlueGreenRetire,
            release.clone(),
            previous_map(fleet),
            vec![stage],
        )
        .with_policy(FailurePolicy::AbortAll)
        .with_instance_undo(InstanceUndo::Idle)
        .with_rollback_batch(ids.len().max(1))
        .with_leave_stopped(ids)
    }

    /// Stops `env` unless it is live again (a rollback may have happened
    /// while it was kept warm).
    async fn retire(
        &self,
        exec: &Executor,
        env: &Group,
        expected_live: &Group,
        release: &ReleaseId,
    ) -> Result<Option<Report>> {
        let store = Self::live_store(exec)?;
        let recorded = store.load().await?.map(|r| r.live);
        let routed = exec.load_balancer().live_group().await?;
        if recorded.as_ref() != Some(expected_live) || routed.as_ref().is_some_and(|g| g != expected_live) {
            tracing::warn!(%env, ?recorded, ?routed, "not stopping the old environment: it is no longer idle");
            return Ok(None);
        }
        let fleet = exec.snapshot().await?;
        let plan = self.retire_plan(&fleet, env, release);
        Ok(Some(exec.run(&plan, RunOptions::default()).await?))
    }

    /// Deploys `release` to the idle environment and switches traffic to it
    /// (see the [type docs](Self)); then keeps the old environment running
    /// for [`keep_old`](Self::keep_old) and stops it.
    ///
    /// Cancelling the executor's token before the switch aborts (the idle
    /// environment is stopped); during the keep-old window it ends the wait
    /// and leaves the old environment running.
    ///
    /// # Errors
    /// Only when nothing was started: bad parameters, no live-state store,
    /// a record that disagrees with the load balancer
    /// ([`Error::Inconsistent`]), a fleet that cannot be read. Failures of
    /// the deployment itself are in the [`BlueGreenReport`].
    pub async fn deploy(&self, exec: &Executor, release: &ReleaseId) -> Result<BlueGreenReport> {
        let reconciled = self.reconciled(exec).await?;
        let live = reconciled.live.clone();
        let idle = self.other(&live)?.clone();
        let fleet = exec.snapshot().await?;
        let plan = self.plan(&reconciled, &fleet, release)?;
        let deployment = exec.run(&plan, RunOptions::default()).await?;
        if !deployment.is_success() {
            return Ok(BlueGreenReport {
                deployment,
                live,
                retired: None,
                kept_running: None,
            });
        }
        let (retired, kept_running) = match self.keep_old {
            KeepOld::UntilNextDeployment => (
                None,
                Some(format!(
                    "{live} keeps running until the next deployment (keep_old)"
                )),
            ),
            KeepOld::For(window) => {
                let cancel = exec.cancel_token();
                let waited = tokio::select! {
                    _ = tokio::time::sleep(window) => true,
                    _ = cancel.cancelled() => false,
                };
                if waited {
                    match self.retire(exec, &live, &idle, release).await? {
                        Some(r) => (Some(r), None),
                        None => (
                            None,
                            Some(format!("{live} is live again (rolled back); left running")),
                        ),
                    }
                } else {
                    (
                        None,
                        Some(format!(
                            "cancelled during the keep-old window; {live} left running"
                        )),
                    )
                }
            }
        };
        Ok(BlueGreenReport {
            deployment,
            live: idle,
            retired,
            kept_running,
        })
    }

    /// Makes the previous environment live again: checks it is
    /// healthy (starting the instances that are not, and waiting at most
    /// [`healthy_deadline`](Self::healthy_deadline)), switches traffic back,
    /// records it live, then stops the environment that was live.
    ///
    /// # Errors
    /// * [`Error::Refused`] when the previous environment cannot be made
    ///   healthy: the instances this call started are stopped again, traffic
    ///   and the record are untouched.
    /// * As [`deploy`](Self::deploy) for bad parameters and state, all
    ///   checked before any instance is started. A failed switch is in the
    ///   report (traffic stays where it was).
    ///
    /// A load balancer that fails its preflight check does not refuse a
    /// rollback: its runs use [`RunOptions::recovery`], and the failure is a
    /// `warning` event; a switch that then fails is in the report.
    pub async fn rollback(&self, exec: &Executor) -> Result<BlueGreenReport> {
        let current = self.reconciled(exec).await?.live;
        let previous = self.other(&current)?.clone();
        let fleet = exec.snapshot().await?;
        self.check_environments(&fleet)?;
        let Some(release) = fleet.group(&previous).find_map(|i| i.release.clone()) else {
            return Err(Error::Refused(format!(
                "rollback: the previous environment {previous} has no release installed; {current} stays live"
            )));
        };
        // Which previous instances are warm (healthy now)? Only the others
        // are started, so a refusal leaves the warm ones as they were.
        let started = Instant::now();
        let mut cold = Vec::new();
        for i in exec.instances().iter().filter(|i| i.backend().group == previous) {
            let probe = tokio::time::timeout(exec.timeouts().health_probe, i.health()).await;
            if !matches!(probe, Ok(Ok(Health::Healthy))) {
                cold.push(i.backend().id.clone());
            }
        }
        let base = |stages: Vec<Stage>, batch: usize| {
            Plan::new(
                crate::StrategyKind::BlueGreenRollback,
                release.clone(),
                previous_map(&fleet),
                stages,
            )
            .with_policy(FailurePolicy::AbortAll)
            .with_instance_undo(InstanceUndo::Idle)
            .with_rollback_batch(batch.max(1))
        };
        let switch = base(
            vec![Stage {
                if_winner: None,
                name: format!("switch to {previous}"),
                units: vec![Unit {
                    instance: None,
                    steps: switch_steps(&current, &previous),
                }],
            }],
            1,
        )
        .with_on_abort(switch_back(&current));
        // Everything the switch run checks before its first step, checked
        // before any instance is started: a switch that would be refused
        // must not leave started instances behind. A failed load-balancer
        // preflight does not refuse a rollback (Preflight::Warn).
        exec.check(&switch, &RunOptions::recovery()).await?;
        if !cold.is_empty() {
            let units = cold
                .iter()
                .map(|id| Unit {
                    instance: Some(id.clone()),
                    steps: vec![
                        Step::Start { instance: id.clone() },
                        Step::AwaitHealthyWithin {
                            instance: id.clone(),
                            deadline: self.healthy_deadline,
                            interval: self.health_interval,
                        },
                    ],
                })
                .collect();
            let ready = base(
                vec![Stage {
                    if_winner: None,
                    name: format!("start {previous}"),
                    units,
                }],
                cold.len(),
            );
            let report = exec.run(&ready, RunOptions::recovery()).await?;
            if !report.is_success() {
                let why: Vec<String> = report
                    .instances
                    .iter()
                    .filter_map(|i| i.error.as_ref().map(|e| format!("{}: {e}", i.id)))
                    .collect();
                return Err(Error::Refused(format!(
                    "rollback: the previous environment {previous} could not be made healthy ({}); \
                     the instances started for it were stopped again, {current} stays live",
                    why.join("; ")
                )));
            }
        }
        let deployment = exec.run(&switch, RunOptions::recovery()).await?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            outcome = ?deployment.outcome,
            "blue-green rollback switch"
        );
        if !deployment.is_success() {
            return Ok(BlueGreenReport {
                deployment,
                live: current,
                retired: None,
                kept_running: None,
            });
        }
        let retired = self.retire(exec, &current, &previous, &release).await?;
        Ok(BlueGreenReport {
            deployment,
            live: previous,
            retired,
            kept_running: None,
        })
    }
}

/// Record the pending switch, switch, record the new live environment.
fn switch_steps(from: &Group, to: &Group) -> Vec<Step> {
    vec![
        Step::RecordSwitching {
            from: from.clone(),
            to: to.clone(),
        },
        Step::SwitchTo { group: to.clone() },
        Step::RecordLive { group: to.clone() },
    ]
}

/// What an abort does once the switch was attempted: send traffic back to
/// `live` (the rollback fails if that fails) and record it live again (a
/// warning if that fails: the pending mark lets the next reconcile decide).
fn switch_back(live: &Group) -> Vec<AbortStep> {
    vec![
        AbortStep::new(Step::SwitchTo { group: live.clone() })
            .when(AbortWhen::AfterSwitch)
            .on_failure(AbortFailure::FailRollback),
        AbortStep::new(Step::RecordLive { group: live.clone() })
            .when(AbortWhen::AfterSwitch)
            .note(format!(
                "traffic is back on {live}; the next start reconciles the record with the load balancer"
            )),
    ]
}

impl BlueGreen {
    /// Compiles steps 1–4 of a deployment of `release` (see the [type
    /// docs](Self)) from the environment `live` says is live.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] as [`validate`](Self::validate), naming
    /// `instances` when an instance is in neither environment or one
    /// environment has none, or `live` when the live environment is neither.
    pub fn plan(&self, live: &Reconciled, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        self.validate()?;
        self.check_environments(fleet)?;
        let live = live.live.clone();
        let idle = self.other(&live)?.clone();
        let ids: Vec<InstanceId> = fleet.group(&idle).map(|i| i.backend.id.clone()).collect();
        let per_instance = |steps: &dyn Fn(&InstanceId) -> Vec<Step>| -> Vec<Unit> {
            ids.iter()
                .map(|id| Unit {
                    instance: Some(id.clone()),
                    steps: steps(id),
                })
                .collect()
        };
        let mut stages = vec![Stage {
            if_winner: None,
            name: format!("prepare {idle}"),
            units: per_instance(&|id| {
                vec![
                    Step::Stop { instance: id.clone() },
                    Step::Install {
                        instance: id.clone(),
                        release: release.clone(),
                    },
                    Step::Start { instance: id.clone() },
                    Step::AwaitHealthyWithin {
                        instance: id.clone(),
                        deadline: self.healthy_deadline,
                        interval: self.health_interval,
                    },
                ]
            }),
        }];
        if !self.smoke_checks.is_empty() {
            stages.push(Stage {
                if_winner: None,
                name: format!("smoke test {idle}"),
                units: per_instance(&|id| {
                    vec![Step::SmokeTest {
                        instance: id.clone(),
                        checks: self.smoke_checks.clone(),
                    }]
                }),
            });
        }
        for name in &self.gates {
            stages.push(Stage {
                if_winner: None,
                name: format!("gate {name} on {idle}"),
                units: vec![Unit {
                    instance: None,
                    steps: vec![Step::Gate {
                        name: name.clone(),
                        group: idle.clone(),
                        release: release.clone(),
                    }],
                }],
            });
        }
        if self.warmup_requests > 0 {
            stages.push(Stage {
                if_winner: None,
                name: format!("warm up {idle}"),
                units: vec![Unit {
                    instance: None,
                    steps: vec![Step::WarmUp {
                        group: idle.clone(),
                        requests: self.warmup_requests,
                        path: self.warmup_path.clone(),
                    }],
                }],
            });
        }
        stages.push(Stage {
            if_winner: None,
            name: format!("switch to {idle}"),
            units: vec![Unit {
                instance: None,
                steps: switch_steps(&live, &idle),
            }],
        });
        Ok(Plan::new(
            crate::StrategyKind::BlueGreen,
            release.clone(),
            previous_map(fleet),
            stages,
        )
        .with_policy(FailurePolicy::AbortAll)
        .with_instance_undo(InstanceUndo::Idle)
        .with_health(HealthCheck {
            retries: 1,
            interval: self.health_interval,
        })
        .with_rollback_batch(ids.len().max(1))
        .with_on_abort(switch_back(&live)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bluegreen_state::Resolution;
    use crate::names::Address;
    use crate::plan::InstanceSnapshot;
    use crate::traits::Backend;

    fn live(g: &str) -> Reconciled {
        Reconciled {
            live: Group::new(g).unwrap(),
            resolution: Resolution::Recorded,
        }
    }

    fn fleet(groups: &[(&str, usize)]) -> FleetSnapshot {
        let mut instances = Vec::new();
        let mut k = 0;
        for (g, n) in groups {
            for _ in 0..*n {
                k += 1;
                instances.push(InstanceSnapshot {
                    backend: Backend {
                        id: InstanceId::new(format!("i-{k}")).unwrap(),
                        address: Address::parse(&format!("127.0.0.1:{}", 9000 + k)).unwrap(),
                        group: Group::new(*g).unwrap(),
                    },
                    release: Some(ReleaseId::new("v1").unwrap()),
                });
            }
        }
        FleetSnapshot { instances }
    }

    #[test]
    fn plan_prepares_tests_warms_and_switches_the_idle_environment() {
        let bg = BlueGreen::default();
        let plan = bg
            .plan(
                &live("green"),
                &fleet(&[("blue", 2), ("green", 3)]),
                &ReleaseId::new("v2").unwrap(),
            )
            .unwrap();
        let names: Vec<_> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "prepare blue",
                "smoke test blue",
                "warm up blue",
                "switch to blue"
            ]
        );
        assert_eq!(
            plan.instances().iter().map(|i| i.as_str()).collect::<Vec<_>>(),
            ["i-1", "i-2"]
        );
        let kinds: Vec<_> = plan.stages[0].units[0]
            .steps
            .iter()
            .map(|s| s.kind().as_str())
            .collect();
        assert_eq!(kinds, ["stop", "install", "start", "await_healthy_within"]);
        let kinds: Vec<_> = plan.stages[3].units[0]
            .steps
            .iter()
            .map(|s| s.kind().as_str())
            .collect();
        assert_eq!(kinds, ["record_switching", "switch_to", "record_live"]);
        assert_eq!(plan.policy, FailurePolicy::AbortAll);
        assert_eq!(
            plan.instance_undo,
            InstanceUndo::Idle,
            "an abort stops the idle environment"
        );
        let undo: Vec<_> = plan
            .on_abort
            .iter()
            .map(|a| (a.to_string(), a.when, a.on_failure))
            .collect();
        assert_eq!(
            undo,
            [
                (
                    "switch all traffic to green".to_string(),
                    AbortWhen::AfterSwitch,
                    AbortFailure::FailRollback
                ),
                (
                    "record green live".to_string(),
                    AbortWhen::AfterSwitch,
                    AbortFailure::Warn
                ),
            ],
            "after the switch, an abort sends traffic back to the live environment"
        );
        assert_eq!(plan.projected_duration().max, Duration::from_secs(300));
        let text = plan.to_string();
        assert!(text.contains("smoke test i-1: GET /health -> 200; GET /api/status -> 200; GET /api/db/ping -> 200 containing \"ok\""), "{text}");
        assert!(text.contains("warm up blue with 100 x GET /"), "{text}");
    }

    #[test]
    fn no_checks_and_no_warmup_leave_their_stages_out() {
        let bg = BlueGreen {
            smoke_checks: vec![],
            warmup_requests: 0,
            ..BlueGreen::default()
        };
        let plan = bg
            .plan(
                &live("blue"),
                &fleet(&[("blue", 1), ("green", 1)]),
                &ReleaseId::new("v2").unwrap(),
            )
            .unwrap();
        let names: Vec<_> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["prepare green", "switch to green"]);
    }

    #[test]
    fn bad_parameters_and_fleets_name_the_field() {
        let v2 = ReleaseId::new("v2").unwrap();
        let ok = fleet(&[("blue", 1), ("green", 1)]);
        let cases: Vec<(BlueGreen, FleetSnapshot, &str)> = vec![
            (BlueGreen::default(), ok.clone(), "live"),
            (
                BlueGreen {
                    environments: [Group::new("a").unwrap(), Group::new("a").unwrap()],
                    ..BlueGreen::default()
                },
                ok.clone(),
                "environments",
            ),
            (
                BlueGreen {
                    healthy_deadline: Duration::ZERO,
                    ..BlueGreen::default()
                },
                ok.clone(),
                "healthy_deadline",
            ),
            (
                BlueGreen {
                    smoke_checks: vec![SmokeCheck::get("/ok"), SmokeCheck::get("nope")],
                    ..BlueGreen::default()
                },
                ok.clone(),
                "smoke_checks[1].path",
            ),
            (
                BlueGreen {
                    warmup_path: "x y".into(),
                    ..BlueGreen::default()
                },
                ok.clone(),
                "warmup_path",
            ),
            (BlueGreen::default(), fleet(&[("blue", 2)]), "instances"),
            (
                BlueGreen::default(),
                fleet(&[("blue", 1), ("green", 1), ("red", 1)]),
                "instances",
            ),
        ];
        for (bg, f, field) in cases {
            // The live environment is red, which is no environment, only in
            // the case about it.
            let env = if field == "live" { "red" } else { "blue" };
            let e = bg.plan(&live(env), &f, &v2).unwrap_err();
            assert!(
                matches!(&e, Error::InvalidInput { field: got, .. } if got == field),
                "{field}: {e}"
            );
        }
    }

    #[test]
    fn config_deserializes_with_defaults() {
        let bg: BlueGreen = serde_json::from_str(
            r#"{"environments":["left","right"],"warmup_requests":5,"keep_old":"until_next_deployment"}"#,
        )
        .unwrap();
        assert_eq!(bg.environments[1].as_str(), "right");
        assert_eq!(bg.warmup_requests, 5);
        assert_eq!(bg.keep_old, KeepOld::UntilNextDeployment);
        assert_eq!(bg.healthy_deadline, Duration::from_secs(300));
        let bg: BlueGreen = serde_json::from_str(r#"{"keep_old":{"for":5000}}"#).unwrap();
        assert_eq!(bg.keep_old, KeepOld::For(Duration::from_secs(5)));
        assert!(serde_json::from_str::<BlueGreen>(r#"{"environments":["a b","c"]}"#).is_err());
    }
}
