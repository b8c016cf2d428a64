//! Recovery: resuming or rolling back a deployment from what its journals
//! say.
//!
//! A deployment whose process died (a crash, `kill -9`, a power cut) leaves
//! a [journal](crate::state::Journal) without an outcome: its header names
//! the strategy, the release and what every instance ran before; its events
//! say which instances were started on and which were finished. Recovery
//! reads that and the fleet as it is now, and returns a [`Plan`] for the
//! [`Executor`](crate::Executor) — nothing here touches an instance.
//!
//! * [`resume`] finishes the deployment: the same strategy planned again
//!   over the fleet, with every instance left part-way treated as still on
//!   its previous release (so it is redone from the start), and a blue-green
//!   deployment that had already switched traffic recognised as done. If
//!   the resume aborts, it returns every instance the deployment moved,
//!   those the interrupted run finished too ([`Plan::moved`]). A ramp,
//!   shadow, dark launch or experiment goes on from the traffic phase it
//!   had reached (see [`resume`]); a canary-shaped run that had begun to
//!   roll back is not resumed, only rolled back.
//! * [`rollback`] undoes it: every instance that is not on the release it
//!   ran before, or that some run left part-way, is returned to it, serving
//!   (canary instances are returned stopped, after all traffic goes back to
//!   the stable track); a blue-green deployment that had switched traffic
//!   switches back.
//!
//! A deployment and the resumes and rollbacks that acted on it form one
//! [`Recorded`] chain: an instance left part-way by the deployment and
//! finished by a later resume is settled; one a rollback only started on is
//! not. Journal the recovery run too (a header with
//! [`acts_on`](crate::state::JournalHeader::acts_on) naming the deployment,
//! as the CLI does), and a recovery that is itself interrupted is recovered
//! the same way.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::collections::BTreeMap;
//! use deploykit::recovery::{self, Recorded, Strategies};
//! use deploykit::state::{JournalHeader, RunKind, StateDir};
//! use deploykit::{Address, Backend, FleetSnapshot, Group, InstanceId, InstanceSnapshot, ReleaseId, StrategyKind};
//!
//! let base = tempfile::tempdir()?;
//! let state = StateDir::open(base.path(), "shop")?;
//! let (v1, v2) = (ReleaseId::new("v1")?, ReleaseId::new("v2")?);
//! let (a, b) = (InstanceId::new("a")?, InstanceId::new("b")?);
//! // A rolling deployment of v2 recorded that both instances ran v1, then
//! // its process died after moving `a`.
//! let previous = BTreeMap::from([(a.clone(), Some(v1.clone())), (b.clone(), Some(v1.clone()))]);
//! let header = JournalHeader::new("d1", "shop", RunKind::Deploy, StrategyKind::Rolling, v2.clone(), previous);
//! drop(state.create_journal(header)?);
//! let on = |id: &InstanceId, release: &ReleaseId| InstanceSnapshot {
//!     backend: Backend { id: id.clone(), address: Address::parse("127.0.0.1:8080").unwrap(), group: Group::default_group() },
//!     release: Some(release.clone()),
//! };
//! let fleet = FleetSnapshot { instances: vec![on(&a, &v2), on(&b, &v1)] };
//! let recorded = Recorded::load(&state, &state.latest()?.unwrap())?;
//! let plan = match recovery::rollback(&recorded, &fleet, &Strategies::default(), None)? {
//!     recovery::Rollback::Plan(plan) => plan,
//!     recovery::Rollback::SwitchBack => unreachable!("not blue-green"),
//! };
//! // Only `a` left v1: it alone is returned.
//! assert_eq!(plan.release, v1);
//! assert_eq!(plan.stages.len(), 1);
//! assert_eq!(plan.stages[0].units[0].instance, Some(a));
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::bluegreen_state::Reconciled;
use crate::error::{Error, Result};
use crate::event::{EventKind, StepResult};
use crate::kinds::StepKind;
use crate::kinds::StrategyKind;
use crate::names::{Group, InstanceId, ReleaseId};
use crate::plan::{
    compensation_steps, retirement_steps, FailurePolicy, FleetSnapshot, InstanceProgress, Plan, Stage, Step,
    Unit,
};
use crate::state::{JournalSummary, RunKind, StateDir};
use crate::strategy::{BlueGreen, Canary, DarkLaunch, Experiment, Ramped, Recreate, Rolling, Shadow};
use crate::traits::{GroupWeight, Strategy};

/// The strategies as configured: what a resume plans with, and the
/// settings (batch size, health checks, drain timeout) a rollback uses.
#[derive(Debug, Clone, Default)]
pub struct Strategies {
    /// Rolling; its batch size, health check and drain timeout also pace
    /// every rollback but blue-green's.
    pub rolling: Rolling,
    /// Recreate.
    pub recreate: Recreate,
    /// Blue-green; its environments say which instances are idle.
    pub blue_green: BlueGreen,
    /// Canary; its groups say which instances end stopped.
    pub canary: Canary,
    /// Ramped (its `base` the canary's settings).
    pub ramped: Ramped,
    /// Shadow (its `base` the canary's settings).
    pub shadow: Shadow,
    /// Dark launch (its `base` the canary's settings).
    pub dark_launch: DarkLaunch,
    /// A/B experiment (its `base` the canary's settings).
    pub experiment: Experiment,
}

impl Strategies {
    /// The strategy of `kind`, or `None` for blue-green (which plans only
    /// from a reconciled live environment, [`BlueGreen::plan`]) and the
    /// kinds only recovery plans have ([`StrategyKind::Rollback`], …).
    pub fn get(&self, kind: StrategyKind) -> Option<&dyn Strategy> {
        match kind {
            StrategyKind::Rolling => Some(&self.rolling),
            StrategyKind::Recreate => Some(&self.recreate),
            StrategyKind::Canary => Some(&self.canary),
            StrategyKind::Ramped => Some(&self.ramped),
            StrategyKind::Shadow => Some(&self.shadow),
            StrategyKind::DarkLaunch => Some(&self.dark_launch),
            StrategyKind::Experiment => Some(&self.experiment),
            _ => None,
        }
    }
}

/// The deployment `latest` belongs to: `latest` itself, or the one it
/// resumed or rolled back (what [`Recorded::load`] reads the chain of, for
/// state kept elsewhere than a [`StateDir`]).
pub fn root_of(latest: &JournalSummary) -> String {
    match (&latest.header.kind, &latest.header.acts_on) {
        (RunKind::Deploy, _) | (_, None) => latest.header.deployment.clone(),
        (_, Some(id)) => id.clone(),
    }
}

/// What [`record_promotion`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PromotionRecord {
    /// The promotion of `stage` was recorded for `deployment` (the
    /// deployment's own id); its `deploy --resume` goes on past the wait.
    Recorded {
        /// The deployment.
        deployment: String,
        /// The stage it waited at.
        stage: usize,
    },
    /// No deployment is interrupted (none, or the last one finished, maybe
    /// while the lock was awaited): nothing was recorded.
    NothingInterrupted,
    /// The interrupted deployment is another one than the one asked for:
    /// nothing was recorded.
    OtherDeployment {
        /// The interrupted deployment's id.
        interrupted: String,
    },
    /// The interrupted deployment was not waiting for a promotion (only a
    /// canary with manual promotion and a dark launch wait): nothing was
    /// recorded.
    NotWaiting {
        /// The deployment.
        deployment: String,
    },
}

/// Records a promotion for the deployment interrupted while it waited for
/// one, which no process runs: read under `lock` (so no resume starts or
/// finishes between the check and the write), the chain of the latest
/// unfinished journal must be waiting
/// ([`Recorded::awaiting_promotion`]); then the promotion goes into the
/// control channel ([`StateBackend::record_promotion`]) for a later
/// `deploy --resume`. `deployment`, when given, must name that deployment
/// (its own id, or the id of the run of it that was interrupted).
///
/// * Idempotent: yes in effect (a second call records the same approval).
/// * Cancel-safe: yes; the record is written whole or not at all.
/// * On failure: nothing was recorded.
///
/// # Errors
/// When the journals cannot be read or the record cannot be written.
///
/// [`StateBackend::record_promotion`]: crate::state::StateBackend::record_promotion
pub async fn record_promotion(
    backend: &dyn crate::state::StateBackend,
    lock: &crate::state::HeldLock,
    deployment: Option<&str>,
) -> Result<PromotionRecord> {
    let Some(latest) = backend.latest().await?.filter(|j| !j.is_finished()) else {
        return Ok(PromotionRecord::NothingInterrupted);
    };
    let recorded = Recorded::new(backend.chain(&root_of(&latest)).await?)?;
    let id = recorded.deployment().header.deployment.clone();
    if let Some(asked) = deployment {
        if asked != id && asked != latest.header.deployment {
            return Ok(PromotionRecord::OtherDeployment {
                interrupted: latest.header.deployment,
            });
        }
    }
    let Some(stage) = recorded.awaiting_promotion() else {
        return Ok(PromotionRecord::NotWaiting { deployment: id });
    };
    backend.record_promotion(lock, &id, stage).await?;
    Ok(PromotionRecord::Recorded {
        deployment: id,
        stage,
    })
}

/// A deployment as its journals tell it: its own journal and those of every
/// resume and rollback that acted on it, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    deployment: JournalSummary,
    chain: Vec<JournalSummary>,
}

impl Recorded {
    /// The deployment `latest` belongs to (`latest` itself, or the one it
    /// resumed or rolled back) and every run that acted on it, read from
    /// `state`.
    ///
    /// # Errors
    /// [`Error::Inconsistent`] when the journal of the deployment `latest`
    /// acts on is missing; as [`StateDir::journals`] otherwise.
    pub fn load(state: &StateDir, latest: &JournalSummary) -> Result<Self> {
        Self::new(state.chain(&root_of(latest))?)
    }

    /// From journals already read: the deployment's own journal and every
    /// run that acted on it, oldest first (as [`StateDir::chain`] returns
    /// them).
    ///
    /// # Errors
    /// [`Error::Inconsistent`] when no journal in `chain` is a deployment
    /// that acts on nothing.
    pub fn new(chain: Vec<JournalSummary>) -> Result<Self> {
        let deployment = chain
            .iter()
            .find(|j| j.header.kind == RunKind::Deploy || j.header.acts_on.is_none())
            .cloned()
            .ok_or_else(|| {
                let named = chain
                    .first()
                    .and_then(|j| j.header.acts_on.clone())
                    .unwrap_or_else(|| "?".into());
                Error::Inconsistent(format!(
                    "the journal of deployment {named}, which later runs act on, is missing"
                ))
            })?;
        Ok(Self { deployment, chain })
    }

    /// The deployment's own journal.
    pub fn deployment(&self) -> &JournalSummary {
        &self.deployment
    }

    /// Every journal of the chain, oldest first.
    pub fn chain(&self) -> &[JournalSummary] {
        &self.chain
    }

    /// The newest run of the chain (the one a resume continues).
    pub fn latest(&self) -> &JournalSummary {
        self.chain.last().unwrap_or(&self.deployment)
    }

    /// Instances some run left part-way and no later run finished.
    pub fn unsettled(&self) -> BTreeSet<InstanceId> {
        JournalSummary::unsettled_across(&self.chain)
    }

    /// The stage the deployment waits to be promoted at, across its runs:
    /// the last promotion-related event of the chain announced a wait (a
    /// resume that has not reached the wait again still waits for the
    /// same promotion). `None` once that stage was promoted, a run began
    /// to roll back or finished.
    pub fn awaiting_promotion(&self) -> Option<usize> {
        let mut waiting = None;
        for e in self.chain.iter().flat_map(|run| &run.events) {
            match &e.kind {
                EventKind::AwaitingPromotion { stage, .. } => waiting = Some(*stage),
                EventKind::Promoted { .. }
                | EventKind::RollbackStarted { .. }
                | EventKind::DeploymentFinished { .. } => waiting = None,
                _ => {}
            }
        }
        waiting.filter(|_| !self.latest().is_finished())
    }
}

/// What resuming an interrupted deployment takes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Resume {
    /// The interrupted blue-green deployment had switched traffic to `live`:
    /// nothing is left to do.
    Switched {
        /// The environment live now, the one the deployment switched to.
        live: Group,
    },
    /// Run this plan (journalled with the interrupted run's release and
    /// previous releases).
    Plan(Plan),
}

/// What rolling back a deployment takes.
#[derive(Debug, Clone, PartialEq, Eq)]
#[allow(clippy::large_enum_variant)]
pub enum Rollback {
    /// The blue-green deployment had switched traffic: make the previous
    /// environment live again with [`BlueGreen::rollback`].
    SwitchBack,
    /// Run this plan.
    Plan(Plan),
}

/// The plan that finishes the newest, interrupted run of `recorded`.
///
/// Its [`previous`](Plan::previous) is what each instance ran before the
/// deployment and its [`moved`](Plan::moved) the instances earlier runs
/// took off that release, so that an abort undoes the whole deployment.
///
/// `fleet` is the fleet as it is now; `live` is the reconciled live
/// environment (see [`reconcile`](crate::bluegreen_state::reconcile)),
/// needed for blue-green only.
///
/// A ramped, shadow, dark-launch or experiment deployment is planned again
/// with its strategy (the canary isolated and redeployed first, as a
/// canary resume does), then picks its traffic phases up where the
/// journals say it was:
///
/// * **ramped**: from the last step whose analysis passed, held again, so
///   the first share the resume gives the canary is one the analysis
///   approved (never the next one up, never back to `from`);
/// * **shadow**: mirroring again for what is left of its duration (one
///   check at least), or, once the shadow had passed, on to what follows it;
/// * **dark launch**: waiting for a promotion again (the timeout counted
///   afresh), or, once promoted, widening from the last stage passed;
/// * **experiment**: the test goes on for what is left of its duration,
///   the tallies read over the whole window since it first started (the
///   time the process was down included), so no visit is lost. The
///   sequential test starts again on those tallies: its likelihood ratio
///   depends only on them, so the evidence carries over; only the best
///   ratio of the earlier looks is forgotten, which can delay a decision,
///   never make one easier. An experiment whose treatment had won goes on
///   to the promotion.
///
/// # Errors
/// * [`Error::Refused`] when the newest run finished (nothing to resume) or
///   is a rollback (roll back again instead), or its strategy is not one
///   that resumes, or it is canary-shaped and had begun to roll back (its
///   analysis failed, or it was aborted): roll it back instead.
/// * [`Error::InvalidInput`] (field `live`) for a blue-green deployment
///   without `live`; the strategy's own errors when it cannot plan.
pub fn resume(
    recorded: &Recorded,
    fleet: &FleetSnapshot,
    strategies: &Strategies,
    live: Option<&Reconciled>,
) -> Result<Resume> {
    let run = recorded.latest();
    let h = &run.header;
    if run.is_finished() {
        return Err(Error::Refused(format!(
            "nothing to resume: the run {} finished",
            h.deployment
        )));
    }
    if h.kind == RunKind::Rollback {
        return Err(Error::Refused(format!(
            "the interrupted run {} is a rollback; roll back again to finish it",
            h.deployment
        )));
    }
    if h.strategy == StrategyKind::BlueGreen {
        let live = live.ok_or_else(|| {
            Error::invalid(
                "live",
                "a blue-green deployment resumes from the reconciled live environment; pass reconcile(..)",
            )
        })?;
        if switch_target(h.plan.as_ref()).as_ref() == Some(&live.live) {
            return Ok(Resume::Switched {
                live: live.live.clone(),
            });
        }
        return Ok(Resume::Plan(strategies.blue_green.plan(live, fleet, &h.release)?));
    }
    if is_canary_shaped(h.strategy) {
        if let Some(reason) = rolling_back(run) {
            return Err(Error::Refused(format!(
                "the run {} was rolling back when it stopped ({reason}); roll back to finish it",
                h.deployment
            )));
        }
    }
    let strategy = strategies.get(h.strategy).ok_or_else(|| {
        Error::Refused(format!(
            "the journal of {} names the strategy {}, which does not resume",
            h.deployment, h.strategy
        ))
    })?;
    // Instances left part-way are redone from the start: plan as if they
    // were still on the release they had before.
    let unsettled = recorded.unsettled();
    let found = fleet;
    let mut fleet = fleet.clone();
    for i in &mut fleet.instances {
        if unsettled.contains(&i.backend.id) {
            if let Some(prev) = h.previous.get(&i.backend.id) {
                i.release = prev.clone();
            }
        }
    }
    let mut plan = strategy.plan(&fleet, &h.release)?;
    if is_canary_shaped(h.strategy) && plan.stages.is_empty() {
        // Every stable instance was moved: what may be left is the canary's
        // end, all traffic to stable and the canary instances stopped, with
        // the stable instances skipped like any the killed run finished.
        let skipped = std::mem::take(&mut plan.skipped);
        plan = finish_canary(&strategies.canary, found, &h.release).with_skipped(skipped);
    } else if h.strategy != StrategyKind::Canary {
        resume_phases(&mut plan, recorded, crate::state::now_ms());
    }
    // An abort undoes the whole deployment, not only this run: every
    // instance returns to what it ran before the deployment, so those the
    // interrupted runs finished (skipped here) are handed back too.
    let before = &recorded.deployment().header.previous;
    for (id, previous) in &mut plan.previous {
        if let Some(b) = before.get(id) {
            previous.clone_from(b);
        }
    }
    plan.moved = found
        .instances
        .iter()
        .filter(|i| before.get(&i.backend.id).is_some_and(|b| *b != i.release))
        .map(|i| i.backend.id.clone())
        .collect();
    Ok(Resume::Plan(plan))
}

/// The plan that undoes the deployment of `recorded`, returning every
/// instance to the release it ran before the deployment.
///
/// `live` is the reconciled live environment (see
/// [`reconcile`](crate::bluegreen_state::reconcile)), needed for blue-green
/// only.
///
/// # Errors
/// * [`Error::InvalidInput`] (field `live`) for a blue-green deployment
///   without `live`.
/// * [`Error::Refused`] when no instance has a release to return to.
pub fn rollback(
    recorded: &Recorded,
    fleet: &FleetSnapshot,
    strategies: &Strategies,
    live: Option<&Reconciled>,
) -> Result<Rollback> {
    let root = recorded.deployment();
    let targets = &root.header.previous;
    let touched = recorded.unsettled();
    match root.header.strategy {
        StrategyKind::BlueGreen => {
            let live = live.ok_or_else(|| {
                Error::invalid(
                    "live",
                    "a blue-green deployment rolls back from the reconciled live environment; pass reconcile(..)",
                )
            })?;
            let live = &live.live;
            let switched_to = switch_target(root.header.plan.as_ref());
            if switched_to.as_ref() == Some(live) {
                return Ok(Rollback::SwitchBack);
            }
            let idle = switched_to.unwrap_or_else(|| {
                strategies
                    .blue_green
                    .other(live)
                    .cloned()
                    .unwrap_or_else(|_| live.clone())
            });
            Ok(Rollback::Plan(stop_idle(
                fleet,
                &idle,
                targets,
                &touched,
                &root.header.release,
            )))
        }
        // The routed strategies are canary-shaped with the canary's groups;
        // sending all traffic to stable also ends their rules and mirrors.
        StrategyKind::Canary
        | StrategyKind::Ramped
        | StrategyKind::Shadow
        | StrategyKind::DarkLaunch
        | StrategyKind::Experiment => {
            // An experiment's treatment groups end stopped like the
            // canary: the journaled plan leaves their instances stopped.
            let mut stopped: BTreeSet<Group> = BTreeSet::from([strategies.canary.canary_group.clone()]);
            if let Some(p) = &root.header.plan {
                stopped.extend(
                    fleet
                        .instances
                        .iter()
                        .filter(|i| p.leave_stopped.contains(&i.backend.id))
                        .map(|i| i.backend.group.clone()),
                );
            }
            let mut plan = return_to_groups(
                fleet,
                targets,
                &touched,
                &strategies.rolling,
                Some((&strategies.canary.stable_group, &stopped)),
            )?;
            // The flag goes first: killing it ends the new code path's
            // exposure at once, whatever the instances take.
            if let Some(flag) = carried_flag(root.header.plan.as_ref()) {
                plan.stages.insert(
                    0,
                    Stage {
                        if_winner: None,
                        name: format!("kill flag {flag}"),
                        units: vec![Unit {
                            instance: None,
                            steps: vec![Step::FlagKill { flag }],
                        }],
                    },
                );
            }
            Ok(Rollback::Plan(plan))
        }
        _ => Ok(Rollback::Plan(return_to(
            fleet,
            targets,
            &touched,
            &strategies.rolling,
            None,
        )?)),
    }
}

/// The strategies whose plans are canary-shaped (see
/// [`Canary::shaped_plan`](crate::Canary)): the canary and those built on
/// routing policies.
fn is_canary_shaped(kind: StrategyKind) -> bool {
    matches!(
        kind,
        StrategyKind::Canary
            | StrategyKind::Ramped
            | StrategyKind::Shadow
            | StrategyKind::DarkLaunch
            | StrategyKind::Experiment
    )
}

/// Why `run` had begun to roll back, if it had: its analysis failed or it
/// was aborted, so finishing it means rolling back, never going on.
fn rolling_back(run: &JournalSummary) -> Option<&str> {
    run.events.iter().find_map(|e| match &e.kind {
        EventKind::RollbackStarted { reason, .. } => Some(reason.as_str()),
        _ => None,
    })
}

/// The traffic phase a stage of a canary-shaped plan holds: the 1-based
/// canary stage of its analysis, promotion wait or experiment.
fn phase_of(stage: &Stage) -> Option<usize> {
    let [unit] = stage.units.as_slice() else {
        return None;
    };
    if unit.instance.is_some() {
        return None;
    }
    unit.steps.iter().find_map(|s| match s {
        Step::Analyze { stage, .. } | Step::AwaitPromotion { stage, .. } => Some(*stage),
        Step::Experiment { .. } => Some(1),
        _ => None,
    })
}

/// Whether a phase gives the canary a share of public traffic while it is
/// judged (a ramp step, a canary stage), rather than deciding whether to go
/// on at all (a shadow, a dark launch waiting for its promotion, an
/// experiment).
fn holds_share(stage: &Stage) -> bool {
    stage
        .units
        .iter()
        .flat_map(|u| &u.steps)
        .any(|s| matches!(s, Step::Analyze { weight, .. } if *weight > 0))
}

/// The traffic phases some run of `recorded` finished: every step of the
/// phase's stage done, its analysis passed (or its promotion came, or its
/// experiment found a winner).
fn passed_phases(recorded: &Recorded) -> BTreeSet<usize> {
    let mut passed = BTreeSet::new();
    for run in recorded.chain() {
        let Some(plan) = &run.header.plan else { continue };
        for e in &run.events {
            // A promotion is the operator's approval of the stage waiting.
            if let EventKind::Promoted { stage } = e.kind {
                passed.insert(stage);
                continue;
            }
            // A winner is journaled before the experiment's step ends, and
            // before anything acts on it: the experiment (phase 1) passed.
            if let EventKind::ExperimentDecided { .. } = e.kind {
                passed.insert(1);
                continue;
            }
            let EventKind::StepFinished {
                stage,
                step,
                rollback: false,
                result: StepResult::Ok | StepResult::Warning(_),
                ..
            } = &e.kind
            else {
                continue;
            };
            let Some(s) = plan.stages.get(*stage) else {
                continue;
            };
            let last = s.units.first().and_then(|u| u.steps.last()).map(Step::kind);
            if let (Some(n), Some(true)) = (phase_of(s), last.map(|k| k == *step)) {
                passed.insert(n);
            }
        }
    }
    passed
}

/// How long the shadow phase was judged across the runs of `recorded`: in
/// each run, from the start of its first analysis (the shadow's, the first
/// phase) to the shadow's last check, added up.
fn shadow_held(recorded: &Recorded) -> Duration {
    let ms = recorded
        .chain()
        .iter()
        .map(|run| {
            let started = run.events.iter().find_map(|e| match e.kind {
                EventKind::StepStarted {
                    step: StepKind::Analyze,
                    rollback: false,
                    ..
                } => Some(e.elapsed_ms),
                _ => None,
            });
            let checked = run
                .events
                .iter()
                .filter(|e| {
                    matches!(
                        e.kind,
                        EventKind::AnalysisResult {
                            stage: 1,
                            weight: 0,
                            ..
                        }
                    )
                })
                .map(|e| e.elapsed_ms)
                .max();
            match (started, checked) {
                (Some(s), Some(c)) => c.saturating_sub(s),
                _ => 0,
            }
        })
        .sum();
    Duration::from_millis(ms)
}

/// How long the experiment of `recorded` has run, at `now_ms` (Unix
/// milliseconds): since its first start by the wall clock, so the time the
/// process was down counts (its users kept their variant), and at least as
/// long as its runs recorded running it.
fn experiment_ran_for(recorded: &Recorded, now_ms: u64) -> Duration {
    let mut first_start = None;
    let mut recorded_ms = 0;
    for run in recorded.chain() {
        let started = run.events.iter().find_map(|e| match e.kind {
            EventKind::StepStarted {
                step: StepKind::Experiment,
                rollback: false,
                ..
            } => Some(e.elapsed_ms),
            _ => None,
        });
        let Some(started) = started else { continue };
        first_start.get_or_insert(run.header.started_at_ms.saturating_add(started));
        let before = run
            .header
            .plan
            .iter()
            .flat_map(|p| &p.stages)
            .flat_map(|s| &s.units)
            .flat_map(|u| &u.steps)
            .find_map(|s| match s {
                Step::Experiment { ran_for, .. } => Some(*ran_for),
                _ => None,
            })
            .unwrap_or_default();
        let last = run.events.last().map_or(started, |e| e.elapsed_ms);
        let ms = u64::try_from(before.as_millis()).unwrap_or(u64::MAX);
        recorded_ms = recorded_ms.max(ms.saturating_add(last.saturating_sub(started)));
    }
    let wall = first_start.map_or(0, |s| now_ms.saturating_sub(s));
    Duration::from_millis(recorded_ms.max(wall))
}

/// How long (ms) `stage` has waited for its promotion at `now_ms` (Unix
/// milliseconds): since the chain first announced the wait, by the wall
/// clock, and at least as long as its runs recorded waiting (a clock set
/// back never gives a wait more time).
fn waited_for_promotion(recorded: &Recorded, stage: usize, now_ms: u64) -> u64 {
    let mut first = None;
    let mut recorded_ms = 0u64;
    for run in recorded.chain() {
        let announced = run.events.iter().find_map(|e| match e.kind {
            EventKind::AwaitingPromotion { stage: s, .. } if s == stage => Some(e.elapsed_ms),
            _ => None,
        });
        let Some(announced) = announced else { continue };
        first.get_or_insert(run.header.started_at_ms.saturating_add(announced));
        let last = run.events.last().map_or(announced, |e| e.elapsed_ms);
        recorded_ms = recorded_ms.saturating_add(last.saturating_sub(announced));
    }
    let wall = first.map_or(0, |f| now_ms.saturating_sub(f));
    wall.max(recorded_ms)
}

/// Where a resumed ramp, shadow, dark launch or experiment takes its
/// traffic phases up (`plan` is the strategy's full plan; the isolation
/// and the canary's redeployment before them stay, since the canary's
/// processes are not known to be the ones the analysis judged):
///
/// * phases before the last one passed are dropped; the last passed one is
///   held again when it gave the canary a share (a ramp step, a canary
///   stage), so the first share the resume sets is one the analysis
///   approved, never the next one up; it is dropped when it was the
///   shadow, the dark launch's promotion or the experiment, or when every
///   phase had passed;
/// * a shadow not yet passed mirrors again for what is left of its
///   duration (one check at least);
/// * a dark launch not yet promoted waits for a promotion again, its
///   timeout counted from when it first began to wait (by the wall
///   clock, the time no process ran included), with one check interval
///   at least, so a timeout that ran out while down rolls back after one
///   more check — unless a promotion was recorded meanwhile;
/// * an experiment not yet decided goes on for what is left of its
///   duration, its tallies read over its whole window since it first
///   started ([`Step::Experiment`]'s `ran_for`).
fn resume_phases(plan: &mut Plan, recorded: &Recorded, now_ms: u64) {
    if let Some(winner) = recorded_winner(recorded) {
        resolve_winner(plan, &winner);
    }
    let Some(last_phase) = plan.stages.iter().filter_map(phase_of).max() else {
        return;
    };
    let approved = passed_phases(recorded).into_iter().max();
    plan.stages.retain(|stage| {
        let Some(n) = phase_of(stage) else { return true };
        match approved {
            Some(a) if n < a => false,
            Some(a) if n == a => a != last_phase && holds_share(stage),
            _ => true,
        }
    });
    for step in plan
        .stages
        .iter_mut()
        .flat_map(|s| &mut s.units)
        .flat_map(|u| &mut u.steps)
    {
        match step {
            Step::Experiment { ran_for, .. } => *ran_for = experiment_ran_for(recorded, now_ms),
            Step::AwaitPromotion {
                stage,
                timeout_ms: Some(timeout),
                analysis,
                ..
            } => {
                let waited = waited_for_promotion(recorded, *stage, now_ms);
                let interval = u64::try_from(analysis.interval.as_millis()).unwrap_or(u64::MAX);
                *timeout = timeout.saturating_sub(waited).max(interval);
            }
            Step::Analyze {
                stage: 1,
                weight: 0,
                duration,
                analysis,
                ..
            } => {
                *duration = duration
                    .saturating_sub(shadow_held(recorded))
                    .max(analysis.interval)
            }
            _ => {}
        }
    }
}

/// The winner an experiment with several treatments of `recorded` chose
/// (its [`EventKind::ExperimentDecided`]), if one did.
fn recorded_winner(recorded: &Recorded) -> Option<crate::plan::ExperimentArm> {
    recorded
        .chain()
        .iter()
        .flat_map(|run| &run.events)
        .find_map(|e| match &e.kind {
            EventKind::ExperimentDecided { winner, release } => Some(crate::plan::ExperimentArm {
                group: winner.clone(),
                release: release.clone(),
            }),
            _ => None,
        })
}

/// Keeps only the promotion branch of `winner` in a plan of an experiment
/// with several treatments (a resume after the decision, which this run
/// does not make again): the losers' branches are dropped and the winner's
/// stages run unconditionally. The losing treatments are neither deployed
/// nor gated again, since all they have left is to be drained and stopped.
/// Stable instances the resolved plan no longer moves because they already
/// run the winner's release (an earlier run promoted them) are skipped, so
/// an abort still returns them.
fn resolve_winner(plan: &mut Plan, winner: &crate::plan::ExperimentArm) {
    if !plan.stages.iter().any(|s| s.if_winner.is_some()) {
        return;
    }
    plan.stages
        .retain(|s| s.if_winner.is_none() || s.if_winner.as_ref() == Some(&winner.group));
    for s in &mut plan.stages {
        s.if_winner = None;
    }
    let losers: Vec<crate::plan::ExperimentArm> = plan
        .stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .find_map(|s| match s {
            Step::Experiment { treatments, .. } => Some(treatments.clone()),
            _ => None,
        })
        .unwrap_or_default()
        .into_iter()
        .filter(|a| a.group != winner.group)
        .collect();
    // Treatments have distinct releases, so a unit installing a loser's
    // release is that loser's deployment (stable only ever gets the
    // winner's).
    let for_loser = |step: &Step| {
        losers.iter().any(|l| match step {
            Step::Install { release, .. } => release == &l.release,
            Step::Gate { group, .. } => group == &l.group,
            _ => false,
        })
    };
    let mut installed = BTreeMap::new();
    for s in &mut plan.stages {
        s.units.retain(|u| {
            let Some(release) = u.steps.iter().find_map(|s| match s {
                Step::Install { release, .. } if for_loser(s) => Some(release),
                _ => None,
            }) else {
                return !u.steps.iter().any(for_loser);
            };
            if let Some(i) = &u.instance {
                installed.insert(i.clone(), release.clone());
            }
            false
        });
    }
    plan.stages.retain(|s| !s.units.is_empty());
    plan.installed_before.extend(installed);
    // What stable is promoted to, and what the report calls deployed.
    plan.release = winner.release.clone();
    let moved = plan.instances();
    let done: Vec<InstanceId> = plan
        .previous
        .iter()
        .filter(|(id, r)| {
            r.as_ref() == Some(&winner.release)
                && !moved.contains(id)
                && !plan.leave_stopped.contains(id)
                && !plan.skipped.contains(id)
        })
        .map(|(id, _)| id.clone())
        .collect();
    plan.skipped.extend(done);
}

/// The feature flag a canary plan carries (see
/// [`Canary::flag`](crate::Canary::flag)).
pub fn carried_flag(plan: Option<&Plan>) -> Option<String> {
    plan?
        .stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .find_map(|s| match s {
            Step::FlagShare { flag, .. } => Some(flag.clone()),
            _ => None,
        })
}

/// The environment a blue-green plan switches to.
pub fn switch_target(plan: Option<&Plan>) -> Option<Group> {
    plan?
        .stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .find_map(|s| match s {
            Step::SwitchTo { group } => Some(group.clone()),
            _ => None,
        })
}

fn previous_of(fleet: &FleetSnapshot) -> BTreeMap<InstanceId, Option<ReleaseId>> {
    fleet
        .instances
        .iter()
        .map(|i| (i.backend.id.clone(), i.release.clone()))
        .collect()
}

fn to_stable(stable: &Group) -> Stage {
    Stage {
        if_winner: None,
        name: "all traffic to stable".into(),
        units: vec![Unit {
            instance: None,
            steps: vec![Step::SetWeights {
                weights: vec![GroupWeight {
                    group: stable.clone(),
                    percent: 100,
                }],
            }],
        }],
    }
}

/// The end of a canary deployment: all traffic to the stable track, the
/// canary instances drained and stopped.
pub fn finish_canary(canary: &Canary, fleet: &FleetSnapshot, release: &ReleaseId) -> Plan {
    let ids: Vec<InstanceId> = fleet
        .group(&canary.canary_group)
        .map(|i| i.backend.id.clone())
        .collect();
    let units = fleet
        .group(&canary.canary_group)
        .map(|i| Unit {
            instance: Some(i.backend.id.clone()),
            steps: retirement_steps(
                &i.backend.id,
                &InstanceProgress::untouched(i.release.clone()),
                canary.drain_timeout,
            ),
        })
        .collect();
    let stages = vec![
        to_stable(&canary.stable_group),
        Stage {
            if_winner: None,
            name: "stop canary".into(),
            units,
        },
    ];
    Plan::new(StrategyKind::Canary, release.clone(), previous_of(fleet), stages)
        .with_policy(FailurePolicy::RestoreInstance {
            max_failures: ids.len(),
        })
        .with_health(canary.health)
        .with_drain_timeout(canary.drain_timeout)
        .with_rollback_batch(ids.len().max(1))
        .with_leave_stopped(ids)
}

/// A plan that returns every instance in `targets` that is not on its
/// target, or was `touched`, to its target release, serving, in batches of
/// `rolling`'s batch size. With `canary`, its canary instances are returned
/// stopped, after all traffic goes back to the stable track.
///
/// # Errors
/// [`Error::Refused`] when no instance has a release to return to.
pub fn return_to(
    fleet: &FleetSnapshot,
    targets: &BTreeMap<InstanceId, Option<ReleaseId>>,
    touched: &BTreeSet<InstanceId>,
    rolling: &Rolling,
    canary: Option<&Canary>,
) -> Result<Plan> {
    let stopped = canary.map(|c| BTreeSet::from([c.canary_group.clone()]));
    let tracks = canary.zip(stopped.as_ref()).map(|(c, s)| (&c.stable_group, s));
    return_to_groups(fleet, targets, touched, rolling, tracks)
}

/// [`return_to`] with the groups that end stopped named: with
/// `Some((stable, stopped))`, the instances of every group in `stopped`
/// (a canary, an experiment's treatments) are returned stopped, after all
/// traffic goes back to `stable`.
///
/// # Errors
/// [`Error::Refused`] when no instance has a release to return to.
pub fn return_to_groups(
    fleet: &FleetSnapshot,
    targets: &BTreeMap<InstanceId, Option<ReleaseId>>,
    touched: &BTreeSet<InstanceId>,
    rolling: &Rolling,
    tracks: Option<(&Group, &BTreeSet<Group>)>,
) -> Result<Plan> {
    let mut units = Vec::new();
    let mut leave_stopped = Vec::new();
    let mut counts: BTreeMap<ReleaseId, usize> = BTreeMap::new();
    for inst in &fleet.instances {
        let id = &inst.backend.id;
        let Some(target) = targets.get(id) else { continue };
        if inst.release == *target && !touched.contains(id) {
            continue;
        }
        if let Some(t) = target {
            *counts.entry(t.clone()).or_default() += 1;
        }
        let changed = inst.release != *target;
        let progress = InstanceProgress {
            previous: target.clone(),
            release_changed: changed,
            in_rotation: true,
            running: changed,
        };
        let steps = match tracks {
            Some((_, stopped)) if stopped.contains(&inst.backend.group) => {
                leave_stopped.push(id.clone());
                retirement_steps(id, &progress, rolling.drain_timeout)
            }
            _ => {
                let mut steps = Vec::new();
                if !changed {
                    // Left part-way on its old release: maybe stopped, maybe
                    // out of rotation. A load balancer driver that keeps its
                    // state in memory starts this process believing every
                    // backend is in rotation; taking the instance out first
                    // makes that state true before the start and enable.
                    steps.push(Step::Disable { instance: id.clone() });
                }
                steps.extend(compensation_steps(
                    id,
                    &progress,
                    rolling.health,
                    rolling.drain_timeout,
                ));
                steps
            }
        };
        units.push(Unit {
            instance: Some(id.clone()),
            steps,
        });
    }
    let batch = rolling.resolved_batch(fleet.instances.len()).max(1);
    let mut stages = Vec::new();
    if let Some((stable, _)) = tracks {
        stages.push(to_stable(stable));
    }
    let n = units.len().div_ceil(batch);
    let mut it = units.into_iter().peekable();
    let mut k = 0;
    while it.peek().is_some() {
        k += 1;
        stages.push(Stage {
            if_winner: None,
            name: format!("rollback batch {k}/{n}"),
            units: it.by_ref().take(batch).collect(),
        });
    }
    let release = counts
        .into_iter()
        .max_by_key(|(_, c)| *c)
        .map(|(r, _)| r)
        .or_else(|| targets.values().flatten().next().cloned())
        .ok_or_else(|| Error::Refused("rollback: no instance has a release to return to".into()))?;
    let instances = stages
        .iter()
        .flat_map(|s| &s.units)
        .filter(|u| u.instance.is_some())
        .count();
    Ok(
        Plan::new(StrategyKind::Rollback, release, previous_of(fleet), stages)
            .with_policy(FailurePolicy::RestoreInstance {
                max_failures: instances,
            })
            .with_health(rolling.health)
            .with_drain_timeout(rolling.drain_timeout)
            .with_rollback_batch(batch)
            .with_leave_stopped(leave_stopped),
    )
}

/// The rollback of a blue-green deployment that never switched traffic:
/// stop the half-prepared environment `idle` and return its instances to
/// their previous release (never into rotation: nothing live was touched).
fn stop_idle(
    fleet: &FleetSnapshot,
    idle: &Group,
    targets: &BTreeMap<InstanceId, Option<ReleaseId>>,
    touched: &BTreeSet<InstanceId>,
    release: &ReleaseId,
) -> Plan {
    // The idle environment serves nothing, so there is nothing to wait for.
    let drain = Duration::from_secs(1);
    let mut units = Vec::new();
    for inst in fleet.group(idle) {
        let id = &inst.backend.id;
        let Some(target) = targets.get(id) else { continue };
        if !touched.contains(id) && inst.release == *target {
            continue;
        }
        let progress = InstanceProgress {
            previous: target.clone(),
            release_changed: inst.release != *target,
            in_rotation: false,
            running: true,
        };
        units.push(Unit {
            instance: Some(id.clone()),
            steps: retirement_steps(id, &progress, drain),
        });
    }
    let ids: Vec<InstanceId> = units.iter().filter_map(|u| u.instance.clone()).collect();
    let stages = if units.is_empty() {
        Vec::new()
    } else {
        vec![Stage {
            if_winner: None,
            name: format!("stop {idle}"),
            units,
        }]
    };
    Plan::new(
        StrategyKind::Rollback,
        release.clone(),
        previous_of(fleet),
        stages,
    )
    .with_policy(FailurePolicy::RestoreInstance {
        max_failures: ids.len(),
    })
    .with_drain_timeout(drain)
    .with_rollback_batch(ids.len().max(1))
    .with_leave_stopped(ids)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::event::{Event, EventKind};
    use crate::kinds::StepKind;
    use crate::names::Address;
    use crate::plan::InstanceSnapshot;
    use crate::state::{JournalHeader, JournalOutcome};
    use crate::traits::Backend;
    use crate::OutcomeKind;

    fn live(group: &str) -> Reconciled {
        Reconciled {
            live: g(group),
            resolution: crate::bluegreen_state::Resolution::Recorded,
        }
    }

    fn rid(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }
    fn iid(s: &str) -> InstanceId {
        InstanceId::new(s).unwrap()
    }
    fn g(s: &str) -> Group {
        Group::new(s).unwrap()
    }

    /// `(id, group, release)` for each instance.
    fn fleet(instances: &[(&str, &str, &str)]) -> FleetSnapshot {
        FleetSnapshot {
            instances: instances
                .iter()
                .map(|(id, group, release)| InstanceSnapshot {
                    backend: Backend {
                        id: iid(id),
                        address: Address::parse("127.0.0.1:8080").unwrap(),
                        group: g(group),
                    },
                    release: Some(rid(release)),
                })
                .collect(),
        }
    }

    /// A deployment of v2 from v1 on `ids`, of `strategy`, with `plan`,
    /// whose events started a step on each of `started`.
    fn recorded(strategy: StrategyKind, ids: &[&str], plan: Option<Plan>, started: &[&str]) -> Recorded {
        let previous = ids.iter().map(|i| (iid(i), Some(rid("v1")))).collect();
        let mut header = JournalHeader::new("d1", "shop", RunKind::Deploy, strategy, rid("v2"), previous);
        header.plan = plan;
        let events = started
            .iter()
            .map(|i| Event {
                elapsed_ms: 1,
                deployment: "d1".into(),
                kind: EventKind::StepStarted {
                    stage: 0,
                    step: StepKind::Drain,
                    instance: Some(iid(i)),
                    rollback: false,
                },
            })
            .collect();
        Recorded::new(vec![JournalSummary {
            path: PathBuf::new(),
            header,
            events,
            finished: None,
        }])
        .unwrap()
    }

    fn kinds(plan: &Plan) -> Vec<Vec<&'static str>> {
        plan.stages
            .iter()
            .flat_map(|s| &s.units)
            .map(|u| u.steps.iter().map(|s| s.kind().as_str()).collect())
            .collect()
    }

    #[test]
    fn rollback_returns_moved_and_part_way_instances_only() {
        let snap = fleet(&[
            ("a", "default", "v2"),
            ("b", "default", "v1"),
            ("c", "default", "v1"),
        ]);
        let rec = recorded(StrategyKind::Rolling, &["a", "b", "c"], None, &["a", "b"]);
        let Rollback::Plan(plan) = rollback(&rec, &snap, &Strategies::default(), None).unwrap() else {
            panic!("not blue-green")
        };
        assert_eq!(plan.strategy, StrategyKind::Rollback);
        assert_eq!(plan.release, rid("v1"));
        assert_eq!(
            kinds(&plan),
            [
                // Moved: taken out, returned, brought back.
                vec![
                    "drain",
                    "await_drained",
                    "stop",
                    "restore",
                    "start",
                    "await_healthy",
                    "enable"
                ],
                // Left part-way on v1: out of rotation first, then brought back.
                vec!["disable", "start", "await_healthy", "enable"],
            ]
        );
    }

    #[test]
    fn canary_rollback_sends_traffic_to_stable_first_and_leaves_the_canary_stopped() {
        let snap = fleet(&[("s1", "stable", "v1"), ("c1", "canary", "v2")]);
        let rec = recorded(StrategyKind::Canary, &["s1", "c1"], None, &["c1"]);
        let Rollback::Plan(plan) = rollback(&rec, &snap, &Strategies::default(), None).unwrap() else {
            panic!("not blue-green")
        };
        assert_eq!(plan.stages[0].name, "all traffic to stable");
        assert_eq!(plan.leave_stopped, [iid("c1")]);
        assert_eq!(kinds(&plan)[1], ["drain", "await_drained", "stop", "restore"]);
    }

    #[test]
    fn blue_green_rollback_switches_back_only_if_traffic_moved() {
        let plan = BlueGreen::default()
            .plan(
                &live("blue"),
                &fleet(&[("b1", "blue", "v1"), ("g1", "green", "v1")]),
                &rid("v2"),
            )
            .unwrap();
        let rec = recorded(StrategyKind::BlueGreen, &["b1", "g1"], Some(plan), &["g1"]);
        let snap = fleet(&[("b1", "blue", "v1"), ("g1", "green", "v2")]);
        let s = Strategies::default();
        assert_eq!(
            rollback(&rec, &snap, &s, Some(&live("green"))).unwrap(),
            Rollback::SwitchBack
        );
        let Rollback::Plan(stop) = rollback(&rec, &snap, &s, Some(&live("blue"))).unwrap() else {
            panic!("traffic never moved")
        };
        assert_eq!(stop.stages.len(), 1);
        assert_eq!(stop.stages[0].name, "stop green");
        assert_eq!(kinds(&stop), [vec!["stop", "restore"]], "never into rotation");
        let e = rollback(&rec, &snap, &s, None).unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput { field, .. } if field == "live"),
            "{e}"
        );
    }

    #[test]
    fn resume_redoes_part_way_instances_and_skips_finished_ones() {
        // a finished (v2), b left part-way on v2 but not enabled, c untouched.
        let snap = fleet(&[
            ("a", "default", "v2"),
            ("b", "default", "v2"),
            ("c", "default", "v1"),
        ]);
        let mut rec = recorded(StrategyKind::Rolling, &["a", "b", "c"], None, &["b"]);
        let Resume::Plan(plan) = resume(&rec, &snap, &Strategies::default(), None).unwrap() else {
            panic!("not blue-green")
        };
        assert_eq!(plan.strategy, StrategyKind::Rolling);
        assert_eq!(plan.skipped, [iid("a")]);
        let redone: Vec<_> = plan
            .stages
            .iter()
            .flat_map(|s| &s.units)
            .filter_map(|u| u.instance.clone())
            .collect();
        assert_eq!(redone, [iid("b"), iid("c")]);
        // An abort returns what the deployment moved, a too.
        assert_eq!(plan.previous[&iid("a")], Some(rid("v1")));
        assert_eq!(plan.moved, [iid("a"), iid("b")]);
        // A finished run is not resumed.
        rec.chain[0].finished = Some(JournalOutcome {
            outcome: OutcomeKind::Succeeded,
            reason: None,
            duration_ms: 1,
        });
        let e = resume(&rec, &snap, &Strategies::default(), None).unwrap_err();
        assert!(matches!(e, Error::Refused(_)), "{e}");
    }

    #[test]
    fn a_blue_green_deployment_that_switched_is_not_resumed() {
        let plan = BlueGreen::default()
            .plan(
                &live("blue"),
                &fleet(&[("b1", "blue", "v1"), ("g1", "green", "v1")]),
                &rid("v2"),
            )
            .unwrap();
        let rec = recorded(StrategyKind::BlueGreen, &["b1", "g1"], Some(plan), &["g1"]);
        let snap = fleet(&[("b1", "blue", "v1"), ("g1", "green", "v2")]);
        assert_eq!(
            resume(&rec, &snap, &Strategies::default(), Some(&live("green"))).unwrap(),
            Resume::Switched { live: g("green") }
        );
        let Resume::Plan(again) = resume(&rec, &snap, &Strategies::default(), Some(&live("blue"))).unwrap()
        else {
            panic!("traffic never moved: prepare green again")
        };
        assert_eq!(switch_target(Some(&again)), Some(g("green")));
    }

    #[test]
    fn a_canary_shaped_run_that_was_rolling_back_is_not_resumed() {
        let snap = fleet(&[("s1", "stable", "v1"), ("c1", "canary", "v2")]);
        for kind in [
            StrategyKind::Canary,
            StrategyKind::Ramped,
            StrategyKind::Experiment,
        ] {
            let mut rec = recorded(kind, &["s1", "c1"], None, &["c1"]);
            rec.chain[0].events.push(Event {
                elapsed_ms: 2,
                deployment: "d1".into(),
                kind: EventKind::RollbackStarted {
                    reason: "canary error rate 0.5 above 0.01".into(),
                    instances: vec![iid("c1")],
                },
            });
            let e = resume(&rec, &snap, &Strategies::default(), None).unwrap_err();
            let Error::Refused(why) = &e else {
                panic!("{kind}: {e}")
            };
            assert!(
                why.contains("was rolling back") && why.contains("error rate 0.5"),
                "{why}"
            );
            // Rolling it back is what finishes it.
            assert!(rollback(&rec, &snap, &Strategies::default(), None).is_ok());
        }
    }

    fn dark_launch(timeout: Option<Duration>) -> DarkLaunch {
        use crate::routing::{Match, Rule, ValueMatch};
        DarkLaunch {
            base: Canary {
                stable_group: g("stable"),
                canary_group: g("canary"),
                ..Canary::default()
            },
            rules: vec![Rule {
                matches: Match::Header {
                    name: "x-beta".into(),
                    value: ValueMatch::Exact("1".into()),
                },
                group: g("canary"),
            }],
            timeout,
        }
    }

    fn event(elapsed_ms: u64, kind: EventKind) -> Event {
        Event {
            elapsed_ms,
            deployment: "d1".into(),
            kind,
        }
    }

    fn waits(stage: usize) -> EventKind {
        EventKind::AwaitingPromotion {
            stage,
            weight: 0,
            timeout_ms: None,
        }
    }

    fn promotion_timeout(plan: &Plan) -> Option<u64> {
        plan.stages
            .iter()
            .flat_map(|s| &s.units)
            .flat_map(|u| &u.steps)
            .find_map(|s| match s {
                Step::AwaitPromotion { timeout_ms, .. } => *timeout_ms,
                _ => None,
            })
    }

    #[test]
    fn a_resumed_dark_launch_keeps_the_timeout_it_began_with() {
        let snap = fleet(&[("s1", "stable", "v1"), ("c1", "canary", "v2")]);
        let strategy = dark_launch(Some(Duration::from_secs(600)));
        let plan = Strategy::plan(&strategy, &snap, &rid("v2")).unwrap();
        assert_eq!(promotion_timeout(&plan), Some(600_000));
        let mut rec = recorded(StrategyKind::DarkLaunch, &["s1", "c1"], Some(plan.clone()), &[]);
        let start = 1_700_000_000_000;
        rec.chain[0].header.started_at_ms = start;
        // It began to wait 60 s in and died 120 s in.
        rec.chain[0].events.push(event(60_000, waits(1)));
        rec.chain[0].events.push(event(
            120_000,
            EventKind::StageProgress {
                stage: 1,
                of: 1,
                weight: 0,
                percent: 10,
                elapsed_ms: 60_000,
                duration_ms: 600_000,
            },
        ));
        // Resumed 300 s after it began to wait: 300 s are left.
        let mut resumed = plan.clone();
        resume_phases(&mut resumed, &rec, start + 60_000 + 300_000);
        assert_eq!(promotion_timeout(&resumed), Some(300_000));
        // A clock set back never gives it more than was left when it died.
        let mut resumed = plan.clone();
        resume_phases(&mut resumed, &rec, start);
        assert_eq!(promotion_timeout(&resumed), Some(540_000));
        // Run out while down: one check interval, then the rollback.
        let mut resumed = plan.clone();
        resume_phases(&mut resumed, &rec, start + 3_600_000);
        let interval = u64::try_from(strategy.base.check_interval.as_millis()).unwrap();
        assert_eq!(promotion_timeout(&resumed), Some(interval));
        // No timeout stays none.
        let open = Strategy::plan(&dark_launch(None), &snap, &rid("v2")).unwrap();
        let mut resumed = open.clone();
        resume_phases(&mut resumed, &rec, start + 3_600_000);
        assert_eq!(promotion_timeout(&resumed), None);
    }

    #[test]
    fn a_deployment_waits_for_its_promotion_across_its_runs() {
        let mut rec = recorded(StrategyKind::DarkLaunch, &["s1", "c1"], None, &[]);
        assert_eq!(rec.awaiting_promotion(), None);
        rec.chain[0].events.push(event(5, waits(1)));
        assert_eq!(rec.awaiting_promotion(), Some(1));
        // A resume that died before it waited again still waits for it.
        let mut resume = rec.chain[0].clone();
        resume.header.kind = RunKind::Resume;
        resume.header.acts_on = Some("d1".into());
        resume.events.clear();
        rec.chain.push(resume);
        assert_eq!(rec.awaiting_promotion(), Some(1));
        let mut promoted = rec.clone();
        promoted.chain[1]
            .events
            .push(event(9, EventKind::Promoted { stage: 1 }));
        assert_eq!(promoted.awaiting_promotion(), None);
        let mut rolled = rec.clone();
        rolled.chain[1].events.push(event(
            9,
            EventKind::RollbackStarted {
                reason: "no promotion".into(),
                instances: vec![],
            },
        ));
        assert_eq!(rolled.awaiting_promotion(), None);
    }

    #[test]
    fn a_rollback_chain_without_its_deployment_is_inconsistent() {
        let mut rec = recorded(StrategyKind::Rolling, &["a"], None, &[]);
        let mut orphan = rec.chain.remove(0);
        orphan.header.kind = RunKind::Rollback;
        orphan.header.acts_on = Some("d0".into());
        let e = Recorded::new(vec![orphan]).unwrap_err();
        assert!(e.to_string().contains("deployment d0"), "{e}");
    }
}
