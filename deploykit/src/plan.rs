//! Plans: what a strategy compiles to, and what the executor runs.
//!
//! A [`Plan`] is a plain value: a list of [`Stage`]s run one after another;
//! each stage holds [`Unit`]s run concurrently; each unit is a sequence of
//! [`Step`]s, usually for one instance. Because it is data, a plan can be
//! printed before anything runs (a dry run), compared with `assert_eq!` in
//! tests, and serialized.
//!
//! What to do when a unit fails is the plan's [`FailurePolicy`]. How to undo
//! each instance is worked out by the executor from what it recorded (see
//! [`compensation_steps`]), in the way the plan's [`InstanceUndo`] says; what
//! undoes the plan beyond single instances (traffic back where it was) is
//! data in the plan, its [`AbortStep`]s — so the executor has no case for
//! any one strategy.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::analysis::Analysis;
use crate::kinds::{StepKind, StrategyKind};
use crate::names::{Group, InstanceId, ReleaseId};
use crate::routing::{Capabilities, TrafficPolicy};
use crate::smoke::SmokeCheck;
use crate::traits::{Backend, GroupWeight};

/// The fleet as it was found before planning: each instance and the release
/// it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSnapshot {
    /// The instances, in the order the operator listed them.
    pub instances: Vec<InstanceSnapshot>,
}

/// One instance in a [`FleetSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSnapshot {
    /// Id, address and group.
    pub backend: Backend,
    /// The release it runs, `None` if it has none.
    pub release: Option<ReleaseId>,
}

impl FleetSnapshot {
    /// The instances' ids, in order.
    pub fn ids(&self) -> Vec<InstanceId> {
        self.instances.iter().map(|i| i.backend.id.clone()).collect()
    }

    /// The instances of one group, in order.
    pub fn group<'a>(&'a self, group: &'a Group) -> impl Iterator<Item = &'a InstanceSnapshot> + 'a {
        self.instances.iter().filter(move |i| &i.backend.group == group)
    }
}

/// How many health probes to make and how far apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    /// Probes before giving up (at least 1).
    pub retries: u32,
    /// Wait between probes.
    #[serde(with = "crate::duration_ms")]
    pub interval: Duration,
}

impl Default for HealthCheck {
    /// 3 probes, 10 s apart.
    fn default() -> Self {
        Self {
            retries: 3,
            interval: Duration::from_secs(10),
        }
    }
}

/// What the executor does when a unit fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum FailurePolicy {
    /// Restore the failed instance to its previous release at once and count
    /// it as failed; abort the deployment (rolling back every instance
    /// already moved) once more than `max_failures` instances failed.
    RestoreInstance {
        /// Failures tolerated before the deployment aborts.
        max_failures: usize,
    },
    /// Any failure aborts the deployment and rolls every touched instance
    /// back.
    AbortAll,
}

/// How an abort returns the plan's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceUndo {
    /// Each touched instance goes back to its previous release and into
    /// rotation ([`compensation_steps`]).
    #[default]
    Serve,
    /// Every instance of the plan is stopped and, if the new release was
    /// installed, returned to its previous one, never put into rotation
    /// ([`idle_steps`]): for a plan whose instances had no live traffic (a
    /// blue-green environment before its switch).
    Idle,
}

impl InstanceUndo {
    fn is_serve(&self) -> bool {
        *self == InstanceUndo::Serve
    }
}

/// When an [`AbortStep`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortWhen {
    /// On every abort.
    #[default]
    Always,
    /// Only once the rollout attempted a [`Step::SwitchTo`] (it may have
    /// taken effect): before that, traffic never moved.
    AfterSwitch,
}

impl AbortWhen {
    fn is_always(&self) -> bool {
        *self == AbortWhen::Always
    }
}

/// What the failure of an [`AbortStep`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AbortFailure {
    /// A warning; the abort goes on.
    #[default]
    Warn,
    /// The rollback failed (the fleet is not where it was); the abort steps
    /// after it are skipped, the instances are restored all the same.
    FailRollback,
}

impl AbortFailure {
    fn is_warn(&self) -> bool {
        *self == AbortFailure::Warn
    }
}

/// A step an abort runs before restoring any instance (e.g. all traffic
/// back to the stable track). Serialized as the step itself plus the
/// non-default settings, so a bare step reads as one that always runs and
/// only warns on failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortStep {
    /// The step.
    #[serde(flatten)]
    pub step: Step,
    /// When it runs.
    #[serde(default, skip_serializing_if = "AbortWhen::is_always")]
    pub when: AbortWhen,
    /// What its failure does.
    #[serde(default, skip_serializing_if = "AbortFailure::is_warn")]
    pub on_failure: AbortFailure,
    /// What the operator should know when it fails (appended to the
    /// warning), e.g. what state the fleet is in regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl AbortStep {
    /// A step that always runs; its failure is a warning.
    pub fn new(step: Step) -> Self {
        Self {
            step,
            when: AbortWhen::Always,
            on_failure: AbortFailure::Warn,
            note: None,
        }
    }

    /// Sets when it runs.
    pub fn when(mut self, when: AbortWhen) -> Self {
        self.when = when;
        self
    }

    /// Sets what its failure does.
    pub fn on_failure(mut self, on_failure: AbortFailure) -> Self {
        self.on_failure = on_failure;
        self
    }

    /// Sets the note added to the warning when it fails.
    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }
}

impl fmt::Display for AbortStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.step.fmt(f)
    }
}

/// A complete deployment plan.
///
/// Journals of earlier releases name a `blue_green` policy; it reads as
/// [`FailurePolicy::AbortAll`] with [`InstanceUndo::Idle`], what it meant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "PlanOnDisk")]
pub struct Plan {
    /// The strategy that produced it.
    pub strategy: StrategyKind,
    /// The release being deployed.
    pub release: ReleaseId,
    /// Each instance's release before the deployment (what rollback returns
    /// it to).
    pub previous: BTreeMap<InstanceId, Option<ReleaseId>>,
    /// What a failure does.
    pub policy: FailurePolicy,
    /// Health probing used by the plan and by any restore.
    pub health: HealthCheck,
    /// Drain timeout used by the plan and by any restore.
    #[serde(with = "crate::duration_ms")]
    pub drain_timeout: Duration,
    /// How many instances a rollback moves at once.
    pub rollback_batch: usize,
    /// Instances already on the release, left alone.
    pub skipped: Vec<InstanceId>,
    /// The stages, run in order.
    pub stages: Vec<Stage>,
    /// Steps that undo what the plan did beyond single instances (e.g. send
    /// all traffic back to the stable track), run first when the deployment
    /// aborts, before any instance is restored. Empty for most strategies.
    #[serde(default)]
    pub on_abort: Vec<AbortStep>,
    /// How an abort returns the plan's instances.
    #[serde(default, skip_serializing_if = "InstanceUndo::is_serve")]
    pub instance_undo: InstanceUndo,
    /// Instances the plan leaves stopped and out of rotation, whether it
    /// succeeds or rolls back (canary instances). A rollback stops them and
    /// restores their previous release without starting it; the report
    /// calls them [`Idle`](crate::InstanceStatus::Idle).
    #[serde(default)]
    pub leave_stopped: Vec<InstanceId>,
    /// Instances an earlier, interrupted run of the same deployment moved
    /// off their [`previous`](Self::previous) release (a resume plan, see
    /// [`recovery::resume`](crate::recovery::resume)): an abort returns
    /// them too, skipped or not, so it undoes the whole deployment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moved: Vec<InstanceId>,
    /// Releases an earlier, interrupted run of the same deployment
    /// installed on instances this plan does not install again (a losing
    /// treatment that a resume after the experiment's decision only
    /// stops): what the report says they run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub installed_before: BTreeMap<InstanceId, ReleaseId>,
}

/// [`Plan`] as journals hold it, including the forms of earlier releases.
#[derive(Deserialize)]
struct PlanOnDisk {
    strategy: StrategyKind,
    release: ReleaseId,
    previous: BTreeMap<InstanceId, Option<ReleaseId>>,
    policy: PolicyOnDisk,
    health: HealthCheck,
    #[serde(with = "crate::duration_ms")]
    drain_timeout: Duration,
    rollback_batch: usize,
    skipped: Vec<InstanceId>,
    stages: Vec<Stage>,
    #[serde(default)]
    on_abort: Vec<AbortStep>,
    #[serde(default)]
    instance_undo: Option<InstanceUndo>,
    #[serde(default)]
    leave_stopped: Vec<InstanceId>,
    #[serde(default)]
    moved: Vec<InstanceId>,
    #[serde(default)]
    installed_before: BTreeMap<InstanceId, ReleaseId>,
}

/// [`FailurePolicy`] on disk: `blue_green` is the first release's policy
/// for blue-green plans.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
enum PolicyOnDisk {
    RestoreInstance { max_failures: usize },
    AbortAll,
    BlueGreen,
}

impl From<PlanOnDisk> for Plan {
    fn from(p: PlanOnDisk) -> Self {
        let (policy, undo) = match p.policy {
            PolicyOnDisk::RestoreInstance { max_failures } => {
                (FailurePolicy::RestoreInstance { max_failures }, None)
            }
            PolicyOnDisk::AbortAll => (FailurePolicy::AbortAll, None),
            // It aborted on any failure and stopped the idle environment.
            PolicyOnDisk::BlueGreen => (FailurePolicy::AbortAll, Some(InstanceUndo::Idle)),
        };
        Plan {
            strategy: p.strategy,
            release: p.release,
            previous: p.previous,
            policy,
            health: p.health,
            drain_timeout: p.drain_timeout,
            rollback_batch: p.rollback_batch,
            skipped: p.skipped,
            stages: p.stages,
            on_abort: p.on_abort,
            instance_undo: p.instance_undo.or(undo).unwrap_or_default(),
            leave_stopped: p.leave_stopped,
            moved: p.moved,
            installed_before: p.installed_before,
        }
    }
}

/// Units that run concurrently.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    /// Run the stage only when an experiment of the plan chose this group
    /// as its winner (see [`Step::Experiment`]'s `treatments`): a plan
    /// whose promotion is decided at run time holds one branch per
    /// treatment, and the executor skips the branches of the losers.
    /// `None` (most stages): always run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_winner: Option<Group>,
    /// A name for progress and logs (`batch 3/10`, `stabilise`).
    pub name: String,
    /// The units; all run at once.
    pub units: Vec<Unit>,
}

/// Steps run in sequence, usually all on one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unit {
    /// The instance the unit works on; a failure restores it. `None` for
    /// units that touch no instance (a pause, a traffic change).
    pub instance: Option<InstanceId>,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// One action of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "step")]
#[non_exhaustive]
pub enum Step {
    /// Stop sending new requests to the instance.
    Drain {
        /// The instance.
        instance: InstanceId,
    },
    /// Wait until the instance has no connections left, at most `timeout`
    /// (then proceed with a warning).
    AwaitDrained {
        /// The instance.
        instance: InstanceId,
        /// Upper bound of the wait.
        #[serde(with = "crate::duration_ms")]
        timeout: Duration,
    },
    /// Take the instance out of rotation at once.
    Disable {
        /// The instance.
        instance: InstanceId,
    },
    /// Stop gracefully; force-stop when that fails or times out.
    Stop {
        /// The instance.
        instance: InstanceId,
    },
    /// Install the release and make it current.
    Install {
        /// The instance.
        instance: InstanceId,
        /// The release.
        release: ReleaseId,
    },
    /// Make a release the instance ran before current again.
    Restore {
        /// The instance.
        instance: InstanceId,
        /// The release to return to.
        release: ReleaseId,
    },
    /// Start the application.
    Start {
        /// The instance.
        instance: InstanceId,
    },
    /// Probe health up to `check.retries` times, `check.interval` apart.
    AwaitHealthy {
        /// The instance.
        instance: InstanceId,
        /// Probes and interval.
        check: HealthCheck,
    },
    /// Put the instance back into rotation.
    Enable {
        /// The instance.
        instance: InstanceId,
    },
    /// Wait (stabilisation between batches).
    Pause {
        /// How long.
        #[serde(with = "crate::duration_ms")]
        duration: Duration,
        /// Why, for the operator.
        reason: String,
    },
    /// Split traffic between groups.
    SetWeights {
        /// The split.
        weights: Vec<GroupWeight>,
    },
    /// Send all traffic to one group.
    SwitchTo {
        /// The group.
        group: Group,
    },
    /// Hold a canary stage for `duration`, checking the metrics every
    /// `analysis.interval`; fails (and the deployment rolls back) when the
    /// analysis fails or stays inconclusive too long.
    Analyze {
        /// The canary stage, 1-based.
        stage: usize,
        /// Canary stages in all.
        of: usize,
        /// The canary's share of traffic in this stage, percent.
        weight: u8,
        /// How long the stage is held.
        #[serde(with = "crate::duration_ms")]
        duration: Duration,
        /// What is checked, and how often.
        analysis: Analysis,
        /// Faults injected during the stage (a chaos drill); none by default.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        chaos: Vec<crate::chaos::ChaosStep>,
        /// How traffic leaves the canary after a breach that is not
        /// critical (a ramped stage with `ramp_down`); `None` rolls back at
        /// once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ramp_down: Option<RampDown>,
    },
    /// Wait for a manual promotion through the executor's
    /// [`PromotionHandle`](crate::PromotionHandle), analysing all the while;
    /// fails on a breach, or when `timeout` passes first.
    AwaitPromotion {
        /// The canary stage that waits, 1-based.
        stage: usize,
        /// The canary's share of traffic while waiting, percent.
        weight: u8,
        /// Give up (and roll back) after this long, in milliseconds; `None`
        /// waits until promoted or aborted.
        timeout_ms: Option<u64>,
        /// What is checked while waiting.
        analysis: Analysis,
    },
    /// Record the releases the instances of `group` run before they are
    /// replaced: the backup a rollback returns to (instances keep their
    /// previous release installed). Emits
    /// [`EventKind::ReleaseBackedUp`](crate::EventKind::ReleaseBackedUp).
    BackupRelease {
        /// The group.
        group: Group,
    },
    /// Probe health every `interval` until the instance answers healthy;
    /// fail once `deadline` has passed (blue-green's healthy deadline, as
    /// Nomad's `healthy_deadline`).
    AwaitHealthyWithin {
        /// The instance.
        instance: InstanceId,
        /// Upper bound of the whole wait.
        #[serde(with = "crate::duration_ms")]
        deadline: Duration,
        /// Wait between probes.
        #[serde(with = "crate::duration_ms")]
        interval: Duration,
    },
    /// Run HTTP smoke checks against the instance before it gets any live
    /// traffic; the first failing check fails the step.
    SmokeTest {
        /// The instance.
        instance: InstanceId,
        /// The checks, in order.
        checks: Vec<SmokeCheck>,
    },
    /// Run the integration-test gate `name` for `release` against the
    /// instances of `group`, which get no live traffic yet (the executor's
    /// [`GateRunner`](crate::integration::GateRunner)); a failure fails the
    /// step.
    Gate {
        /// The gate's name.
        name: String,
        /// The instances it checks.
        group: Group,
        /// The release they run.
        release: ReleaseId,
    },
    /// Serve `variant` of feature flag `flag` to `percent` % of its
    /// targeting keys and the flag's safe variant to the rest (the
    /// executor's [`FlagSwitch`](crate::flags::FlagSwitch)); a canary
    /// carrying a flag sets it after each traffic stage. A failure fails the
    /// step like a failed weight change.
    FlagShare {
        /// The flag's key.
        flag: String,
        /// The variant the canary stands for.
        variant: String,
        /// Its share, 0 to 100.
        percent: u8,
    },
    /// The kill switch of feature flag `flag`: everyone gets its safe
    /// variant (what a canary's rollback does to the flag it carries).
    FlagKill {
        /// The flag's key.
        flag: String,
    },
    /// Send `requests` warm-up `GET path` requests to the instances of
    /// `group`, spread evenly. Failures are counted, not fatal;
    /// progress goes to the event stream.
    WarmUp {
        /// The environment.
        group: Group,
        /// How many requests in all.
        requests: u32,
        /// The path requested.
        path: String,
    },
    /// Record in the live-state store that a switch from `from` to `to` is
    /// about to happen (so a crash before [`Step::RecordLive`] leaves
    /// evidence).
    RecordSwitching {
        /// The environment live now.
        from: Group,
        /// The environment about to become live.
        to: Group,
    },
    /// Record in the live-state store that `group` is live.
    RecordLive {
        /// The environment.
        group: Group,
    },
    /// Apply a routing policy (rules, a sticky split, mirroring) through
    /// [`LoadBalancer::apply_policy`](crate::LoadBalancer::apply_policy);
    /// it replaces whatever policy or weights were live. A plan with one is
    /// refused before anything runs when the load balancer cannot apply it
    /// ([`Plan::check_routing`]).
    ApplyPolicy {
        /// The policy.
        policy: TrafficPolicy,
    },
    /// Run an A/B experiment between the groups of `analysis` (stable the
    /// control, canary the treatment) for at most `duration`: every
    /// `analysis.interval` the guardrails are checked as in a canary stage
    /// and the conversions since the start are read
    /// ([`MetricsSource::observe_tally`](crate::MetricsSource::observe_tally))
    /// into the sequential test ([`crate::experiment`]). The step passes
    /// when the treatment wins; it fails (and the deployment rolls back,
    /// keeping the control) when the control wins, when time runs out with
    /// no significant difference, or on a guardrail breach.
    Experiment {
        /// How the test decides.
        rules: crate::experiment::ExperimentRules,
        /// The longest the experiment runs.
        #[serde(with = "crate::duration_ms")]
        duration: Duration,
        /// The groups (`stable` is the control) and the guardrails.
        analysis: Analysis,
        /// How long the experiment had already run when this step starts:
        /// zero, or for a resumed experiment the time since it first
        /// started (see [`crate::recovery::resume`]). Its tallies are read
        /// over that time too, and it counts against `duration`.
        #[serde(
            default,
            with = "crate::duration_ms",
            skip_serializing_if = "Duration::is_zero"
        )]
        ran_for: Duration,
        /// The treatments when there are several (each its group and
        /// release; `analysis.canary` is unused): the test compares each
        /// with the control (Holm-corrected, [`crate::experiment::ManySequential`]),
        /// the guardrails are checked for each, and the step passes with a
        /// winner, recorded as an
        /// [`EventKind::ExperimentDecided`](crate::EventKind::ExperimentDecided)
        /// before the step ends, which chooses the plan's
        /// [`Stage::if_winner`] branch. Empty: one treatment,
        /// `analysis.canary`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        treatments: Vec<ExperimentArm>,
    },
}

/// One treatment of an experiment with several: the group that serves it
/// and its release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExperimentArm {
    /// The group.
    pub group: Group,
    /// The release its instances run.
    pub release: ReleaseId,
}

/// A gradual way out of a canary stage after a breach: the canary's share
/// steps down, each step held while the analysis keeps checking, before the
/// rollback takes the rest. A check failing at [`critical`](Self::critical)
/// times its limit or more, monitoring lost (the inconclusive limit), an
/// abort, or a weight change that fails cuts traffic at once instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RampDown {
    /// The steps, in order, each below the one before and above 0.
    pub steps: Vec<RampDownStep>,
    /// A failed check whose value is at least this many times its limit
    /// is critical (the sequential error-rate test, whose statistic is
    /// evidence rather than size, never is); at least 1.
    pub critical: f64,
}

/// [`RampDown::critical`] is checked finite when the plan is built, so
/// equality is total for every planned value.
impl Eq for RampDown {}

/// One step of a [`RampDown`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RampDownStep {
    /// The canary's share, percent.
    pub percent: u8,
    /// The split that gives it.
    pub weights: Vec<GroupWeight>,
    /// How long it is held.
    #[serde(with = "crate::duration_ms")]
    pub hold: Duration,
}

impl fmt::Display for RampDown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let total: Duration = self.steps.iter().map(|s| s.hold).sum();
        let points: Vec<String> = self.steps.iter().map(|s| format!("{}%", s.percent)).collect();
        write!(
            f,
            "on a breach under {}x its limit, ramp down {} over {}, then roll back",
            self.critical,
            points.join(" "),
            secs(total)
        )
    }
}

impl Step {
    /// The step's kind (`drain`, `install`, …).
    pub fn kind(&self) -> StepKind {
        match self {
            Step::Drain { .. } => StepKind::Drain,
            Step::AwaitDrained { .. } => StepKind::AwaitDrained,
            Step::Disable { .. } => StepKind::Disable,
            Step::Stop { .. } => StepKind::Stop,
            Step::Install { .. } => StepKind::Install,
            Step::Restore { .. } => StepKind::Restore,
            Step::Start { .. } => StepKind::Start,
            Step::AwaitHealthy { .. } => StepKind::AwaitHealthy,
            Step::Enable { .. } => StepKind::Enable,
            Step::Pause { .. } => StepKind::Pause,
            Step::SetWeights { .. } => StepKind::SetWeights,
            Step::SwitchTo { .. } => StepKind::SwitchTo,
            Step::Analyze { .. } => StepKind::Analyze,
            Step::AwaitPromotion { .. } => StepKind::AwaitPromotion,
            Step::BackupRelease { .. } => StepKind::BackupRelease,
            Step::AwaitHealthyWithin { .. } => StepKind::AwaitHealthyWithin,
            Step::SmokeTest { .. } => StepKind::SmokeTest,
            Step::WarmUp { .. } => StepKind::WarmUp,
            Step::RecordSwitching { .. } => StepKind::RecordSwitching,
            Step::RecordLive { .. } => StepKind::RecordLive,
            Step::Gate { .. } => StepKind::Gate,
            Step::FlagShare { .. } => StepKind::FlagShare,
            Step::FlagKill { .. } => StepKind::FlagKill,
            Step::ApplyPolicy { .. } => StepKind::ApplyPolicy,
            Step::Experiment { .. } => StepKind::Experiment,
        }
    }

    /// The instance the step acts on, if any.
    pub fn instance(&self) -> Option<&InstanceId> {
        match self {
            Step::Drain { instance }
            | Step::AwaitDrained { instance, .. }
            | Step::Disable { instance }
            | Step::Stop { instance }
            | Step::Install { instance, .. }
            | Step::Restore { instance, .. }
            | Step::Start { instance }
            | Step::AwaitHealthy { instance, .. }
            | Step::Enable { instance } => Some(instance),
            Step::AwaitHealthyWithin { instance, .. } | Step::SmokeTest { instance, .. } => Some(instance),
            Step::Pause { .. } | Step::SetWeights { .. } | Step::SwitchTo { .. } => None,
            Step::Analyze { .. } | Step::AwaitPromotion { .. } | Step::BackupRelease { .. } => None,
            Step::WarmUp { .. } | Step::RecordSwitching { .. } | Step::RecordLive { .. } => None,
            Step::Gate { .. } | Step::FlagShare { .. } | Step::FlagKill { .. } => None,
            Step::ApplyPolicy { .. } | Step::Experiment { .. } => None,
        }
    }

    /// The shortest and longest time the step's own waits take (not counting
    /// how long drivers take to answer).
    pub fn waits(&self) -> (Duration, Duration) {
        match self {
            Step::AwaitDrained { timeout, .. } => (Duration::ZERO, *timeout),
            Step::AwaitHealthy { check, .. } => (
                Duration::ZERO,
                check.interval.saturating_mul(check.retries.saturating_sub(1)),
            ),
            Step::Pause { duration, .. } => (*duration, *duration),
            Step::Analyze { duration, .. } => (*duration, *duration),
            Step::Experiment { duration, .. } => (Duration::ZERO, *duration),
            Step::AwaitPromotion { timeout_ms, .. } => {
                (Duration::ZERO, Duration::from_millis(timeout_ms.unwrap_or(0)))
            }
            Step::AwaitHealthyWithin { deadline, .. } => (Duration::ZERO, *deadline),
            _ => (Duration::ZERO, Duration::ZERO),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Install { instance, release } => write!(f, "install {release} on {instance}"),
            Step::Restore { instance, release } => write!(f, "restore {release} on {instance}"),
            Step::AwaitDrained { instance, timeout } => {
                write!(f, "await drained {instance} (at most {})", secs(*timeout))
            }
            Step::AwaitHealthy { instance, check } => write!(
                f,
                "await healthy {instance} ({} probes, {} apart)",
                check.retries,
                secs(check.interval)
            ),
            Step::Pause { duration, reason } => write!(f, "pause {} ({reason})", secs(*duration)),
            Step::SetWeights { weights } => {
                write!(f, "set weights")?;
                for w in weights {
                    write!(f, " {}={}%", w.group, w.percent)?;
                }
                Ok(())
            }
            Step::SwitchTo { group } => write!(f, "switch all traffic to {group}"),
            Step::Analyze {
                stage,
                of,
                weight,
                duration,
                analysis,
                chaos,
                ramp_down,
            } => {
                write!(
                    f,
                    "analyze canary stage {stage}/{of} at {weight}% for {} (check every {})",
                    secs(*duration),
                    secs(analysis.interval)
                )?;
                if let Some(r) = ramp_down {
                    write!(f, "; {r}")?;
                }
                for c in chaos {
                    write!(f, "; chaos[{}]: {c}", c.entry)?;
                }
                Ok(())
            }
            Step::AwaitPromotion {
                stage, timeout_ms, ..
            } => match timeout_ms {
                Some(t) => write!(
                    f,
                    "await promotion of stage {stage} (roll back after {})",
                    secs(Duration::from_millis(*t))
                ),
                None => write!(f, "await promotion of stage {stage}"),
            },
            Step::BackupRelease { group } => write!(f, "back up the release of {group}"),
            Step::AwaitHealthyWithin {
                instance,
                deadline,
                interval,
            } => write!(
                f,
                "await healthy {instance} (within {}, probing every {})",
                secs(*deadline),
                secs(*interval)
            ),
            Step::SmokeTest { instance, checks } => {
                let list: Vec<String> = checks.iter().map(SmokeCheck::describe).collect();
                write!(f, "smoke test {instance}: {}", list.join("; "))
            }
            Step::WarmUp {
                group,
                requests,
                path,
            } => {
                write!(f, "warm up {group} with {requests} x GET {path}")
            }
            Step::RecordSwitching { from, to } => write!(f, "record switching {from} -> {to}"),
            Step::RecordLive { group } => write!(f, "record {group} live"),
            Step::Gate { name, group, release } => write!(f, "gate {name} against {group} on {release}"),
            Step::FlagShare {
                flag,
                variant,
                percent,
            } => write!(f, "flag {flag}: {variant} to {percent}%"),
            Step::FlagKill { flag } => write!(f, "kill flag {flag} (safe variant for everyone)"),
            Step::ApplyPolicy { policy } => write!(f, "apply policy: {policy}"),
            Step::Experiment {
                rules,
                duration,
                analysis,
                ran_for,
                treatments,
            } if !treatments.is_empty() => {
                let arms: Vec<String> = treatments
                    .iter()
                    .map(|a| format!("{} ({})", a.group, a.release))
                    .collect();
                write!(
                    f,
                    "experiment {} (treatments, Holm-corrected) against {} (control) for at most {}: winner at alpha {} once each has {} visits (check every {}); the best significantly better treatment wins; no significant difference: keep the control",
                    arms.join(", "),
                    analysis.stable,
                    secs(*duration),
                    rules.alpha,
                    rules.min_samples,
                    secs(analysis.interval),
                )?;
                if !ran_for.is_zero() {
                    write!(f, ", resumed {} in", secs(*ran_for))?;
                }
                Ok(())
            }
            Step::Experiment {
                rules,
                duration,
                analysis,
                ran_for,
                ..
            } => {
                write!(
                    f,
                    "experiment {} (treatment) against {} (control) for at most {}: winner at alpha {} once each has {} visits (check every {}); no significant difference: {}",
                    analysis.canary,
                    analysis.stable,
                    secs(*duration),
                    rules.alpha,
                    rules.min_samples,
                    secs(analysis.interval),
                    match rules.on_no_difference {
                        crate::experiment::NoDifference::KeepControl => "keep the control",
                        crate::experiment::NoDifference::Promote => "promote the treatment",
                    }
                )?;
                if !ran_for.is_zero() {
                    write!(f, ", resumed {} in", secs(*ran_for))?;
                }
                Ok(())
            }
            other => match other.instance() {
                Some(i) => write!(f, "{} {i}", other.kind()),
                None => write!(f, "{}", other.kind()),
            },
        }
    }
}

fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.3}s", d.as_secs_f64())
    }
}

/// The projected duration of a plan from its configured waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Projection {
    /// When every wait ends as early as it can (instant drains, first probe
    /// healthy); pauses always count.
    #[serde(with = "crate::duration_ms")]
    pub min: Duration,
    /// When every drain times out and every health check needs all its
    /// probes.
    #[serde(with = "crate::duration_ms")]
    pub max: Duration,
}

impl Plan {
    /// A plan of `stages` deploying `release`, with `previous` the release
    /// each instance ran before, and defaults for the rest: any failure
    /// aborts ([`FailurePolicy::AbortAll`]), the default health check, a
    /// 30 s drain timeout, a rollback batch of 1, nothing skipped, no abort
    /// steps, no instance left stopped. The `with_*` methods change them.
    pub fn new(
        strategy: StrategyKind,
        release: ReleaseId,
        previous: BTreeMap<InstanceId, Option<ReleaseId>>,
        stages: Vec<Stage>,
    ) -> Self {
        Self {
            strategy,
            release,
            previous,
            policy: FailurePolicy::AbortAll,
            health: HealthCheck::default(),
            drain_timeout: Duration::from_secs(30),
            rollback_batch: 1,
            skipped: Vec::new(),
            stages,
            on_abort: Vec::new(),
            instance_undo: InstanceUndo::Serve,
            leave_stopped: Vec::new(),
            moved: Vec::new(),
            installed_before: BTreeMap::new(),
        }
    }

    /// Sets what a failure does.
    pub fn with_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the health probing used by the plan and by any restore.
    pub fn with_health(mut self, health: HealthCheck) -> Self {
        self.health = health;
        self
    }

    /// Sets the drain timeout used by the plan and by any restore.
    pub fn with_drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Sets how many instances a rollback moves at once (0 is refused when
    /// the plan runs).
    pub fn with_rollback_batch(mut self, batch: usize) -> Self {
        self.rollback_batch = batch;
        self
    }

    /// Sets the instances already on the release.
    pub fn with_skipped(mut self, skipped: Vec<InstanceId>) -> Self {
        self.skipped = skipped;
        self
    }

    /// Sets the instances an earlier run of the deployment moved (see
    /// [`moved`](Self::moved)).
    pub fn with_moved(mut self, moved: Vec<InstanceId>) -> Self {
        self.moved = moved;
        self
    }

    /// Sets the steps an abort runs before restoring instances.
    pub fn with_on_abort(mut self, steps: Vec<AbortStep>) -> Self {
        self.on_abort = steps;
        self
    }

    /// Sets how an abort returns the plan's instances.
    pub fn with_instance_undo(mut self, undo: InstanceUndo) -> Self {
        self.instance_undo = undo;
        self
    }

    /// Sets the instances the plan leaves stopped and out of rotation.
    pub fn with_leave_stopped(mut self, ids: Vec<InstanceId>) -> Self {
        self.leave_stopped = ids;
        self
    }

    /// Checks every [`Step::ApplyPolicy`] of the plan, in its stages and
    /// its abort steps, against what a load balancer named `driver` can do
    /// ([`Capabilities::check`]): a plan asking for routing the driver
    /// cannot apply is refused before anything is touched, rather than
    /// failing (and rolling back) at the stage that asks.
    ///
    /// # Errors
    /// [`Error::Routing`](crate::Error::Routing) naming the first stage
    /// (`on abort` for an abort step) and the [`RoutingError`](crate::routing::RoutingError): the
    /// capability missing with the driver and the alternative, or the
    /// field of a malformed policy.
    pub fn check_routing(&self, driver: &str, caps: &Capabilities) -> crate::Result<()> {
        let staged = self.stages.iter().flat_map(|stage| {
            stage
                .units
                .iter()
                .flat_map(|u| &u.steps)
                .map(move |step| (stage.name.as_str(), step))
        });
        let aborting = self.on_abort.iter().map(|a| ("on abort", &a.step));
        for (stage, step) in staged.chain(aborting) {
            if let Step::ApplyPolicy { policy } = step {
                caps.check(driver, policy)
                    .map_err(|source| crate::Error::Routing {
                        stage: stage.to_string(),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// Every instance the plan touches, in order of first appearance.
    pub fn instances(&self) -> Vec<InstanceId> {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for stage in &self.stages {
            for unit in &stage.units {
                if let Some(i) = &unit.instance {
                    if seen.insert(i.clone()) {
                        out.push(i.clone());
                    }
                }
            }
        }
        out
    }

    /// The projected duration from the configured waits (driver time not
    /// included). A stage takes as long as its longest unit.
    pub fn projected_duration(&self) -> Projection {
        let mut min = Duration::ZERO;
        let mut max = Duration::ZERO;
        // One winner's branch runs: count the first one.
        let branch = self.stages.iter().find_map(|s| s.if_winner.as_ref());
        for stage in self
            .stages
            .iter()
            .filter(|s| s.if_winner.is_none() || s.if_winner.as_ref() == branch)
        {
            let (mut smin, mut smax) = (Duration::ZERO, Duration::ZERO);
            for unit in &stage.units {
                let (umin, umax) = unit.steps.iter().fold((Duration::ZERO, Duration::ZERO), |a, s| {
                    let (lo, hi) = s.waits();
                    (a.0.saturating_add(lo), a.1.saturating_add(hi))
                });
                smin = smin.max(umin);
                smax = smax.max(umax);
            }
            min = min.saturating_add(smin);
            max = max.saturating_add(smax);
        }
        Projection { min, max }
    }
}

impl fmt::Display for Plan {
    /// The dry-run text: every stage, unit and step.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.projected_duration();
        writeln!(
            f,
            "plan: {} deployment of {} to {} instance(s) in {} stage(s)",
            self.strategy,
            self.release,
            self.instances().len(),
            self.stages.len()
        )?;
        match self.policy {
            FailurePolicy::RestoreInstance { max_failures } => writeln!(
                f,
                "on failure: restore the instance; abort and roll back when more than {max_failures} fail"
            )?,
            FailurePolicy::AbortAll if self.instance_undo == InstanceUndo::Idle => {
                let after_switch = self.on_abort.iter().any(|a| a.when == AbortWhen::AfterSwitch);
                writeln!(
                    f,
                    "on failure: stop the idle environment{}",
                    if after_switch {
                        "; after the switch, switch traffic back first"
                    } else {
                        ""
                    }
                )?
            }
            FailurePolicy::AbortAll => writeln!(f, "on failure: abort and roll back every instance")?,
        }
        if !self.skipped.is_empty() {
            let skipped: Vec<_> = self.skipped.iter().map(|i| i.as_str()).collect();
            writeln!(f, "already on {}: {}", self.release, skipped.join(", "))?;
        }
        writeln!(
            f,
            "projected duration: {} to {} (waits only)",
            secs(p.min),
            secs(p.max)
        )?;
        // The release each instance is given outside any winner's branch.
        let installs: BTreeMap<&InstanceId, &ReleaseId> = self
            .stages
            .iter()
            .filter(|s| s.if_winner.is_none())
            .flat_map(|s| &s.units)
            .flat_map(|u| &u.steps)
            .filter_map(|s| match s {
                Step::Install { instance, release } => Some((instance, release)),
                _ => None,
            })
            .collect();
        for (n, stage) in self.stages.iter().enumerate() {
            let branch = match &stage.if_winner {
                Some(g) => format!(" [only if {g} wins]"),
                None => String::new(),
            };
            writeln!(
                f,
                "stage {}: {}{branch} ({} unit(s) at once)",
                n + 1,
                stage.name,
                stage.units.len()
            )?;
            for unit in &stage.units {
                let steps: Vec<String> = unit.steps.iter().map(|s| s.to_string()).collect();
                // A branch's instances move to its treatment's release, a
                // treatment's to its own.
                let release = unit
                    .steps
                    .iter()
                    .find_map(|s| match s {
                        Step::Install { release, .. } => Some(release),
                        _ => None,
                    })
                    .or_else(|| unit.instance.as_ref().and_then(|i| installs.get(i).copied()))
                    .unwrap_or(&self.release);
                match &unit.instance {
                    Some(i) => {
                        let prev = self
                            .previous
                            .get(i)
                            .and_then(|p| p.as_ref())
                            .map(|p| p.as_str())
                            .unwrap_or("none");
                        writeln!(f, "  {i} ({prev} -> {release}): {}", steps.join(" -> "))?
                    }
                    None => writeln!(f, "  {}", steps.join(" -> "))?,
                }
            }
        }
        Ok(())
    }
}

/// What the executor knows about one instance while a deployment runs; the
/// input of [`compensation_steps`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceProgress {
    /// The release before the deployment.
    pub previous: Option<ReleaseId>,
    /// An install of the new release was attempted (so the current release
    /// may be the new one).
    pub release_changed: bool,
    /// The instance is (or may be) receiving traffic from the load balancer.
    pub in_rotation: bool,
    /// The application is (or may be) running.
    pub running: bool,
}

impl InstanceProgress {
    /// An instance before the deployment touched it: running, in rotation.
    pub fn untouched(previous: Option<ReleaseId>) -> Self {
        Self {
            previous,
            release_changed: false,
            in_rotation: true,
            running: true,
        }
    }
}

/// The steps that bring one instance back to its previous release, serving
/// traffic, given what was done to it.
///
/// * Release untouched and still running: only make sure it is enabled.
/// * Release untouched but stopped: start, health, enable.
/// * Release changed: drain if in rotation, stop, restore the previous
///   release, start, health, enable. With no previous release to return to,
///   the instance is stopped and left out of rotation.
pub fn compensation_steps(
    id: &InstanceId,
    progress: &InstanceProgress,
    health: HealthCheck,
    drain_timeout: Duration,
) -> Vec<Step> {
    let instance = || id.clone();
    let mut steps = Vec::new();
    let bring_up = |steps: &mut Vec<Step>| {
        steps.push(Step::Start { instance: instance() });
        steps.push(Step::AwaitHealthy {
            instance: instance(),
            check: health,
        });
        steps.push(Step::Enable { instance: instance() });
    };
    if !progress.release_changed {
        if progress.running {
            steps.push(Step::Enable { instance: instance() });
        } else {
            bring_up(&mut steps);
        }
        return steps;
    }
    if progress.in_rotation {
        steps.push(Step::Drain { instance: instance() });
        steps.push(Step::AwaitDrained {
            instance: instance(),
            timeout: drain_timeout,
        });
    }
    steps.push(Step::Stop { instance: instance() });
    match &progress.previous {
        Some(previous) => {
            steps.push(Step::Restore {
                instance: instance(),
                release: previous.clone(),
            });
            bring_up(&mut steps);
        }
        None => steps.push(Step::Disable { instance: instance() }),
    }
    steps
}

/// The steps that take an instance the plan leaves stopped (see
/// [`Plan::leave_stopped`]) out of service on abort: drain it if it may be
/// in rotation, stop it, and restore its previous release (without starting
/// it) if the new one was installed.
pub fn retirement_steps(id: &InstanceId, progress: &InstanceProgress, drain_timeout: Duration) -> Vec<Step> {
    let instance = || id.clone();
    let mut steps = Vec::new();
    if progress.in_rotation {
        steps.push(Step::Drain { instance: instance() });
        steps.push(Step::AwaitDrained {
            instance: instance(),
            timeout: drain_timeout,
        });
    }
    steps.push(Step::Stop { instance: instance() });
    if progress.release_changed {
        if let Some(previous) = &progress.previous {
            steps.push(Step::Restore {
                instance: instance(),
                release: previous.clone(),
            });
        }
    }
    steps
}

/// The steps that take an instance of a plan with [`InstanceUndo::Idle`]
/// out of service on abort: stop it if it may be running or its release
/// changed, and restore its previous release (without starting it) if the
/// new one was installed. It never had live traffic, so it is not drained.
pub fn idle_steps(id: &InstanceId, progress: &InstanceProgress) -> Vec<Step> {
    let mut steps = Vec::new();
    if progress.running || progress.release_changed {
        steps.push(Step::Stop { instance: id.clone() });
    }
    if progress.release_changed {
        if let Some(previous) = &progress.previous {
            steps.push(Step::Restore {
                instance: id.clone(),
                release: previous.clone(),
            });
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> InstanceId {
        InstanceId::new(s).unwrap()
    }

    #[test]
    fn compensation_depends_on_progress() {
        let hc = HealthCheck::default();
        let dt = Duration::from_secs(30);
        let v1 = Some(ReleaseId::new("v1").unwrap());
        let untouched = InstanceProgress::untouched(v1.clone());
        assert_eq!(
            compensation_steps(&id("a"), &untouched, hc, dt),
            vec![Step::Enable { instance: id("a") }]
        );
        let stopped = InstanceProgress {
            running: false,
            in_rotation: false,
            ..untouched.clone()
        };
        let kinds: Vec<_> = compensation_steps(&id("a"), &stopped, hc, dt)
            .iter()
            .map(|s| s.kind().as_str())
            .collect();
        assert_eq!(kinds, ["start", "await_healthy", "enable"]);
        let moved = InstanceProgress {
            release_changed: true,
            ..untouched.clone()
        };
        let kinds: Vec<_> = compensation_steps(&id("a"), &moved, hc, dt)
            .iter()
            .map(|s| s.kind().as_str())
            .collect();
        assert_eq!(
            kinds,
            [
                "drain",
                "await_drained",
                "stop",
                "restore",
                "start",
                "await_healthy",
                "enable"
            ]
        );
        let fresh = InstanceProgress {
            previous: None,
            release_changed: true,
            in_rotation: false,
            running: true,
        };
        let kinds: Vec<_> = compensation_steps(&id("a"), &fresh, hc, dt)
            .iter()
            .map(|s| s.kind().as_str())
            .collect();
        assert_eq!(kinds, ["stop", "disable"]);
    }

    #[test]
    fn abort_steps_read_and_write_the_json_of_bare_steps() {
        // Plans journaled by earlier releases: bare steps, the blue-green
        // policy name.
        let old = r#"{"strategy":"canary","release":"v2","previous":{},"policy":{"policy":"blue_green"},
            "health":{"retries":3,"interval":10000},"drain_timeout":30000,"rollback_batch":1,"skipped":[],
            "stages":[],"on_abort":[{"step":"switch_to","group":"stable"}],"leave_stopped":[]}"#;
        let plan: Plan = serde_json::from_str(old).unwrap();
        assert_eq!(plan.policy, FailurePolicy::AbortAll);
        assert_eq!(
            plan.instance_undo,
            InstanceUndo::Idle,
            "what the blue-green policy did"
        );
        let stable = Group::new("stable").unwrap();
        assert_eq!(
            plan.on_abort,
            [AbortStep::new(Step::SwitchTo {
                group: stable.clone()
            })]
        );
        let json = serde_json::to_value(&plan).unwrap();
        assert_eq!(
            json["on_abort"],
            serde_json::json!([{"step": "switch_to", "group": "stable"}]),
            "defaults are left out, so the JSON is the bare step as before"
        );
        assert_eq!(json["instance_undo"], "idle");
        let serve = plan.clone().with_instance_undo(InstanceUndo::Serve);
        let json = serde_json::to_value(&serve).unwrap();
        assert!(json.get("instance_undo").is_none(), "the default is left out");
        // New settings survive a round trip.
        let plan = plan
            .with_instance_undo(InstanceUndo::Idle)
            .with_on_abort(vec![AbortStep::new(Step::RecordLive { group: stable })
                .when(AbortWhen::AfterSwitch)
                .on_failure(AbortFailure::FailRollback)
                .note("why")]);
        let back: Plan = serde_json::from_str(&serde_json::to_string(&plan).unwrap()).unwrap();
        assert_eq!(back, plan);
    }

    #[test]
    fn new_fills_in_the_defaults() {
        let plan = Plan::new(
            crate::StrategyKind::Rolling,
            ReleaseId::new("v2").unwrap(),
            BTreeMap::new(),
            Vec::new(),
        );
        assert_eq!(plan.policy, FailurePolicy::AbortAll);
        assert_eq!(plan.health, HealthCheck::default());
        assert_eq!(plan.drain_timeout, Duration::from_secs(30));
        assert_eq!(plan.rollback_batch, 1);
        assert!(plan.skipped.is_empty() && plan.on_abort.is_empty() && plan.leave_stopped.is_empty());
        assert_eq!(plan.instance_undo, InstanceUndo::Serve);
    }

    #[test]
    fn waits_and_display() {
        let s = Step::AwaitHealthy {
            instance: id("a"),
            check: HealthCheck {
                retries: 3,
                interval: Duration::from_secs(10),
            },
        };
        assert_eq!(s.waits(), (Duration::ZERO, Duration::from_secs(20)));
        assert_eq!(s.to_string(), "await healthy a (3 probes, 10s apart)");
        let p = Step::Pause {
            duration: Duration::from_millis(1500),
            reason: "stabilise".into(),
        };
        assert_eq!(p.to_string(), "pause 1.500s (stabilise)");
    }

    #[test]
    fn the_projected_duration_saturates_instead_of_overflowing() {
        let huge = HealthCheck {
            retries: u32::MAX,
            interval: Duration::MAX,
        };
        let unit = |i: &str| Unit {
            instance: Some(id(i)),
            steps: vec![
                Step::AwaitDrained {
                    instance: id(i),
                    timeout: Duration::MAX,
                },
                Step::AwaitHealthy {
                    instance: id(i),
                    check: huge,
                },
            ],
        };
        let stage = |i: &str| Stage {
            if_winner: None,
            name: i.into(),
            units: vec![unit(i)],
        };
        let pause = Stage {
            if_winner: None,
            name: "stabilise".into(),
            units: vec![Unit {
                instance: None,
                steps: vec![Step::Pause {
                    duration: Duration::MAX,
                    reason: "stabilise".into(),
                }],
            }],
        };
        let plan = Plan::new(
            crate::StrategyKind::Rolling,
            ReleaseId::new("v2").unwrap(),
            BTreeMap::new(),
            vec![stage("a"), pause.clone(), stage("b"), pause],
        );
        let p = plan.projected_duration();
        assert_eq!((p.min, p.max), (Duration::MAX, Duration::MAX));
        assert!(plan.to_string().contains("projected duration"));
    }
}
