//! Deployment statistics read from the journals: one typed
//! [`DeploymentRecord`] per run, the four [DORA](Dora) figures over a
//! window, and (feature `exposition`) the Prometheus text exposition of
//! both.
//!
//! Everything here is computed from what the journals say, never from a
//! second store: a record is rebuilt the same way whether the run finished
//! a month ago or is still writing its journal, so `deploykit stats`, a
//! post-mortem, the dashboard and a `/metrics` scrape always agree.
//!
//! # The DORA figures
//!
//! Over the deployments (runs of kind [`RunKind::Deploy`]) started in the
//! window, in-progress ones and drills left out:
//!
//! * **deployment frequency** — deployments that went live (succeeded or
//!   degraded) per day of the window;
//! * **lead time for changes** — from the commit's time to the end of the
//!   deployment that made it live, for deployments given a commit time
//!   (`deploy --commit SHA --commit-time T`, or `watch`); the median;
//! * **change failure rate** — deployments that did not succeed (rolled
//!   back, rollback failed, degraded, interrupted) over all of them;
//! * **failed-deployment recovery time** — from the moment a deployment
//!   failed (its first failed instance, failed check or rollback, else its
//!   last record) to the moment the fleet was whole again: the end of its
//!   own clean rollback, else the end of the next run of any kind that
//!   succeeded; the median.
//!
//! A worked example: 10 deployments in 5 days, 2 rolled back, each rollback
//! done 90 s after the failure: 1.6 deployments a day went live, the change
//! failure rate is 20 %, the recovery time 90 s.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use deploykit::stats;
//! use deploykit::state::StateDir;
//!
//! let base = tempfile::tempdir()?;
//! let state = StateDir::open(base.path(), "shop")?;
//! let loaded = stats::load(&state)?;
//! let dora = stats::dora(&loaded.records, 0, deploykit::state::now_ms());
//! assert_eq!(dora.deployments, 0);
//! assert_eq!(dora.change_failure_rate, None);
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "exposition")]
#[cfg_attr(docsrs, doc(cfg(feature = "exposition")))]
pub mod exposition;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::analysis::{CheckOutcome, Evidence, Measurement};
use crate::error::Result;
use crate::event::{Event, EventKind, StepResult};
use crate::kinds::{StepKind, StrategyKind};
use crate::names::{InstanceId, ReleaseId};
use crate::state::{HistoryOutcome, Holder, JournalHeader, JournalSummary, RunKind, SourceCommit, StateDir};

/// One run (deployment, resume or rollback) as its journal tells it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    /// The run's id.
    pub id: String,
    /// The application.
    pub app: String,
    /// Deploy, resume or rollback.
    pub kind: RunKind,
    /// The strategy.
    pub strategy: StrategyKind,
    /// The release the run moves the fleet to.
    pub release: ReleaseId,
    /// The deployment a resume or rollback acts on.
    pub acts_on: Option<String>,
    /// How it ended (or that it is still running, or was interrupted).
    pub outcome: HistoryOutcome,
    /// When it started, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// How long it took (until its last record, for one not finished).
    pub duration_ms: u64,
    /// Why, when not a success.
    pub reason: Option<String>,
    /// Why it rolled back, when it did (the first rollback's reason).
    pub rollback_reason: Option<String>,
    /// When (since the start) it started to fail: the first failed
    /// instance, failed analysis check or rollback.
    pub failed_at_elapsed_ms: Option<u64>,
    /// The source commit, when given.
    pub commit: Option<SourceCommit>,
    /// A drill (`deploykit drill`): left out of the DORA figures.
    #[serde(default)]
    pub drill: bool,
    /// The names of the plan's stages, in order, when the journal holds
    /// the plan (what is still to come while a run is in progress).
    #[serde(default)]
    pub planned_stages: Vec<String>,
    /// The stages, in the order they started (rollback stages included).
    pub stages: Vec<StageRecord>,
    /// Every canary analysis check, in order.
    pub checks: Vec<CheckRecord>,
    /// Every instance the run knew of, by id.
    pub instances: Vec<InstanceRecord>,
    /// The canary's share of traffic now (the last weight an analysis,
    /// progress or promotion event named; 100 after a canary succeeded, 0
    /// after it rolled back); `None` for runs without a canary.
    pub canary_weight: Option<u8>,
    /// The canary stage (1-based) and the number of canary stages, when
    /// known.
    pub canary_stage: Option<(usize, usize)>,
    /// The canary stage waiting for a manual promotion now, if any.
    pub awaiting_promotion: Option<usize>,
    /// The journal.
    pub journal: PathBuf,
}

/// One stage of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageRecord {
    /// 0-based index (within the rollout, or within the rollback).
    pub index: usize,
    /// Stages in its part of the run.
    pub of: usize,
    /// The stage's name.
    pub name: String,
    /// Whether it belongs to a rollback.
    pub rollback: bool,
    /// When it started, since the run's start.
    pub started_elapsed_ms: u64,
    /// How long it took; `None` while running (or when the run stopped in it).
    pub duration_ms: Option<u64>,
    /// The instances it works on.
    pub instances: Vec<InstanceId>,
    /// Instances that failed in it, once it ended.
    pub failed: usize,
}

/// One canary analysis check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRecord {
    /// When, since the run's start.
    pub elapsed_ms: u64,
    /// The canary stage, 1-based.
    pub stage: usize,
    /// The canary's share of traffic, percent.
    pub weight: u8,
    /// The typed result.
    pub outcome: CheckOutcome,
    /// Every value measured and its limit.
    pub measurements: Vec<Measurement>,
    /// The statistical judges' evidence.
    pub evidence: Vec<Evidence>,
    /// The treatment it guarded, in an experiment with several treatments
    /// (`None` for a canary stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<crate::names::Group>,
}

/// What became of one instance in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceFate {
    /// No step touched it.
    Untouched,
    /// Steps ran on it and the run has not settled it yet (running, or the
    /// run stopped part-way).
    InProgress,
    /// It runs the run's release and is back in rotation.
    Updated,
    /// It failed or was rolled back, and is back on its previous release.
    Restored,
    /// It could not be restored; kept out of rotation.
    Unrecoverable,
}

impl std::fmt::Display for InstanceFate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            InstanceFate::Untouched => "untouched",
            InstanceFate::InProgress => "in progress",
            InstanceFate::Updated => "updated",
            InstanceFate::Restored => "restored",
            InstanceFate::Unrecoverable => "UNRECOVERABLE",
        })
    }
}

/// One instance in a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The instance.
    pub instance: InstanceId,
    /// Its release before the run.
    pub previous: Option<ReleaseId>,
    /// What became of it.
    pub fate: InstanceFate,
    /// Why it failed, when it did (the first failure).
    pub failure: Option<String>,
    /// The step that failed, when one did.
    pub failed_step: Option<StepKind>,
}

impl InstanceRecord {
    /// The release it runs after the run, as far as the journal says (its
    /// previous one unless it was updated).
    pub fn release_after<'a>(&'a self, run: &'a DeploymentRecord) -> Option<&'a ReleaseId> {
        match self.fate {
            InstanceFate::Updated => Some(&run.release),
            _ => self.previous.as_ref(),
        }
    }
}

/// Builds a [`DeploymentRecord`] event by event: what [`load`] does with a
/// journal, and what a running deployment does with its own events to serve
/// live figures without reading its journal back.
#[derive(Debug, Clone)]
pub struct RecordBuilder {
    record: DeploymentRecord,
    instances: BTreeMap<InstanceId, InstanceRecord>,
    finished: bool,
}

impl RecordBuilder {
    /// A run that has just started, from its journal header.
    pub fn new(header: &JournalHeader, journal: PathBuf) -> Self {
        let instances = header
            .previous
            .iter()
            .map(|(i, prev)| {
                (
                    i.clone(),
                    InstanceRecord {
                        instance: i.clone(),
                        previous: prev.clone(),
                        fate: InstanceFate::Untouched,
                        failure: None,
                        failed_step: None,
                    },
                )
            })
            .collect();
        Self {
            record: DeploymentRecord {
                id: header.deployment.clone(),
                app: header.app.clone(),
                kind: header.kind,
                strategy: header.strategy,
                release: header.release.clone(),
                acts_on: header.acts_on.clone(),
                outcome: HistoryOutcome::InProgress,
                started_at_ms: header.started_at_ms,
                duration_ms: 0,
                reason: None,
                rollback_reason: None,
                failed_at_elapsed_ms: None,
                commit: header.commit.clone(),
                drill: header.drill,
                planned_stages: header
                    .plan
                    .as_ref()
                    .map(|p| p.stages.iter().map(|s| s.name.clone()).collect())
                    .unwrap_or_default(),
                stages: Vec::new(),
                checks: Vec::new(),
                instances: Vec::new(),
                canary_weight: None,
                canary_stage: None,
                awaiting_promotion: None,
                journal,
            },
            instances,
            finished: false,
        }
    }

    fn instance(&mut self, i: &InstanceId) -> &mut InstanceRecord {
        self.instances.entry(i.clone()).or_insert_with(|| InstanceRecord {
            instance: i.clone(),
            previous: None,
            fate: InstanceFate::Untouched,
            failure: None,
            failed_step: None,
        })
    }

    fn failing_at(&mut self, elapsed_ms: u64) {
        self.record.failed_at_elapsed_ms.get_or_insert(elapsed_ms);
    }

    /// Takes one event of the run into account.
    pub fn apply(&mut self, event: &Event) {
        let r = &mut self.record;
        r.duration_ms = r.duration_ms.max(event.elapsed_ms);
        match &event.kind {
            // With several treatments the winner's release, not the one
            // the run was started with, is what stable moves to.
            EventKind::ExperimentDecided { release, .. } => {
                r.release = release.clone();
            }
            EventKind::StageStarted {
                stage,
                of,
                name,
                instances,
                rollback,
            } => r.stages.push(StageRecord {
                index: *stage,
                of: *of,
                name: name.clone(),
                rollback: *rollback,
                started_elapsed_ms: event.elapsed_ms,
                duration_ms: None,
                instances: instances.clone(),
                failed: 0,
            }),
            EventKind::StageFinished {
                stage,
                rollback,
                duration_ms,
                failed,
                ..
            } => {
                if let Some(s) = r
                    .stages
                    .iter_mut()
                    .rev()
                    .find(|s| s.index == *stage && s.rollback == *rollback)
                {
                    s.duration_ms = Some(*duration_ms);
                    s.failed = *failed;
                }
            }
            EventKind::StepStarted {
                instance: Some(i), ..
            } => {
                let rec = self.instance(i);
                if rec.fate != InstanceFate::Unrecoverable {
                    rec.fate = InstanceFate::InProgress;
                }
            }
            EventKind::StepFinished {
                instance: Some(i),
                step: StepKind::Enable,
                rollback: false,
                result: StepResult::Ok | StepResult::Warning(_),
                ..
            } => self.instance(i).fate = InstanceFate::Updated,
            EventKind::InstanceFailed {
                instance,
                step,
                reason,
            } => {
                self.failing_at(event.elapsed_ms);
                let rec = self.instance(instance);
                if rec.failure.is_none() {
                    rec.failure = Some(reason.clone());
                    rec.failed_step = Some(*step);
                }
            }
            EventKind::InstanceRestored { instance, .. } => {
                self.instance(instance).fate = InstanceFate::Restored
            }
            EventKind::InstanceUnrecoverable { instance, reason } => {
                self.failing_at(event.elapsed_ms);
                let rec = self.instance(instance);
                rec.fate = InstanceFate::Unrecoverable;
                rec.failure.get_or_insert_with(|| reason.clone());
            }
            EventKind::RollbackStarted { reason, .. } => {
                self.failing_at(event.elapsed_ms);
                let r = &mut self.record;
                r.rollback_reason.get_or_insert_with(|| reason.clone());
                r.awaiting_promotion = None;
            }
            EventKind::AnalysisResult {
                stage,
                weight,
                result,
                evidence,
                measurements,
                group,
                ..
            } => {
                if matches!(result, CheckOutcome::Fail { .. }) {
                    self.failing_at(event.elapsed_ms);
                }
                let r = &mut self.record;
                // A treatment's check holds no canary stage or share.
                if group.is_none() {
                    r.canary_weight = Some(*weight);
                    r.canary_stage = Some((*stage, r.canary_stage.map_or(*stage, |(_, of)| of.max(*stage))));
                }
                r.checks.push(CheckRecord {
                    group: group.clone(),
                    elapsed_ms: event.elapsed_ms,
                    stage: *stage,
                    weight: *weight,
                    outcome: result.clone(),
                    measurements: measurements.clone(),
                    evidence: evidence.clone(),
                });
            }
            EventKind::StageProgress {
                stage, of, weight, ..
            } => {
                r.canary_weight = Some(*weight);
                r.canary_stage = Some((*stage, *of));
            }
            EventKind::AwaitingPromotion { stage, weight, .. } => {
                r.canary_weight = Some(*weight);
                r.canary_stage = Some((*stage, r.canary_stage.map_or(*stage, |(_, of)| of.max(*stage))));
                r.awaiting_promotion = Some(*stage);
            }
            EventKind::Promoted { .. } => r.awaiting_promotion = None,
            EventKind::DeploymentFinished {
                outcome,
                duration_ms,
                reason,
                ..
            } => {
                r.outcome = (*outcome).into();
                r.duration_ms = *duration_ms;
                r.reason.clone_from(reason);
                r.awaiting_promotion = None;
            }
            _ => {}
        }
    }

    /// The run ended with `outcome` (the journal's last record).
    pub fn finish(&mut self, outcome: &crate::state::JournalOutcome) {
        let r = &mut self.record;
        r.outcome = outcome.outcome.into();
        r.duration_ms = outcome.duration_ms;
        r.reason.clone_from(&outcome.reason);
        r.awaiting_promotion = None;
        self.finished = true;
    }

    /// The record as it stands. `running` says whether the run's process is
    /// alive (holds the lock): an unfinished run is in progress if so, else
    /// interrupted.
    pub fn record(&self, running: bool) -> DeploymentRecord {
        let mut r = self.record.clone();
        if !self.finished && r.outcome == HistoryOutcome::InProgress && !running {
            r.outcome = HistoryOutcome::Interrupted;
            r.reason
                .get_or_insert_with(|| "the process stopped before the run ended".into());
            r.failed_at_elapsed_ms.get_or_insert(r.duration_ms);
        }
        if r.failed_at_elapsed_ms.is_none() && r.outcome.is_failure() {
            r.failed_at_elapsed_ms = Some(r.duration_ms);
        }
        if r.canary_weight.is_some() || r.strategy == StrategyKind::Canary {
            r.canary_weight = match r.outcome {
                HistoryOutcome::Succeeded => Some(100),
                HistoryOutcome::RolledBack | HistoryOutcome::RollbackFailed => Some(0),
                _ => r.canary_weight.or(Some(0)),
            };
        }
        r.instances = self.instances.values().cloned().collect();
        r
    }
}

impl HistoryOutcome {
    /// Whether the run counts as a failed change: it ended any way other
    /// than a success, and is not still running.
    pub fn is_failure(self) -> bool {
        !matches!(self, HistoryOutcome::Succeeded | HistoryOutcome::InProgress)
    }
}

impl DeploymentRecord {
    /// The record of a journal read back. `holder` is the current lock
    /// holder: an unfinished run whose process holds it is in progress,
    /// else interrupted.
    pub fn from_journal(journal: &JournalSummary, holder: Option<&Holder>) -> Self {
        let mut b = RecordBuilder::new(&journal.header, journal.path.clone());
        for e in &journal.events {
            b.apply(e);
        }
        if let Some(o) = &journal.finished {
            b.finish(o);
        }
        let h = &journal.header;
        let running = holder.is_some_and(|x| x.pid == h.pid && x.host == h.host);
        b.record(running)
    }

    /// When it ended, milliseconds since the Unix epoch (`None` while
    /// running).
    pub fn finished_at_ms(&self) -> Option<u64> {
        (self.outcome != HistoryOutcome::InProgress).then(|| self.started_at_ms + self.duration_ms)
    }

    /// When it started to fail, milliseconds since the Unix epoch.
    pub fn failed_at_ms(&self) -> Option<u64> {
        self.failed_at_elapsed_ms.map(|e| self.started_at_ms + e)
    }

    /// Commit time to the end of this deployment, when it went live and its
    /// commit time is known.
    pub fn lead_time_ms(&self) -> Option<u64> {
        if !matches!(self.outcome, HistoryOutcome::Succeeded | HistoryOutcome::Degraded) {
            return None;
        }
        let commit_ms = self.commit.as_ref()?.time_s?.checked_mul(1000)?;
        let end = i64::try_from(self.finished_at_ms()?).ok()?;
        u64::try_from(end - commit_ms).ok()
    }

    /// How many instances each fate has.
    pub fn fates(&self) -> BTreeMap<InstanceFate, usize> {
        let mut out = BTreeMap::new();
        for i in &self.instances {
            *out.entry(i.fate).or_insert(0) += 1;
        }
        out
    }

    /// The last check's measurement of each rule.
    pub fn last_measurements(&self) -> Vec<&Measurement> {
        let mut seen = BTreeMap::new();
        for c in &self.checks {
            for m in &c.measurements {
                seen.insert(m.metric.as_label(), m);
            }
        }
        seen.into_values().collect()
    }
}

impl crate::analysis::AnalysisMetric {
    /// The rule's name in labels and JSON (`error_rate`, `latency_p99`, …).
    pub fn as_label(self) -> &'static str {
        use crate::analysis::AnalysisMetric as M;
        match self {
            M::ErrorRate => "error_rate",
            M::LatencyP99 => "latency_p99",
            M::ErrorRateVsStable => "error_rate_vs_stable",
            M::ErrorRateSequential => "error_rate_sequential",
            M::LatencyDistribution => "latency_distribution",
        }
    }
}

/// Every run of a state directory that could be read, oldest first, and
/// the journals that could not.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// One record per readable journal, oldest first.
    pub records: Vec<DeploymentRecord>,
    /// Journals that could not be read, and why.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Reads every journal of `state` into records, oldest first (the journals'
/// order). Unreadable journals are listed, not fatal: statistics show what
/// they can.
///
/// # Errors
/// [`Error::Io`](crate::Error::Io) when the journal directory cannot be
/// listed or the lock holder cannot be read.
pub fn load(state: &StateDir) -> Result<Loaded> {
    Ok(loaded(state.holder()?, state.scan_journals()?))
}

/// [`load`] from any state backend: the local state directory, or the
/// journals every machine shares in etcd.
///
/// # Errors
/// When the journals or the lock holder cannot be read.
pub async fn load_from(backend: &dyn crate::state::StateBackend) -> Result<Loaded> {
    let holder = backend.holder().await?;
    Ok(loaded(holder, backend.scan_journals().await?))
}

fn loaded(holder: Option<Holder>, scan: crate::state::JournalScan) -> Loaded {
    Loaded {
        records: scan
            .journals
            .iter()
            .map(|j| DeploymentRecord::from_journal(j, holder.as_ref()))
            .collect(),
        unreadable: scan
            .unreadable
            .into_iter()
            .map(|u| (u.path, u.error.to_string()))
            .collect(),
    }
}

/// Each instance's release after every run in `records` (oldest first), as
/// far as the journals say: what a run did not touch keeps what the run
/// before recorded.
pub fn fleet_releases(records: &[DeploymentRecord]) -> BTreeMap<InstanceId, Option<ReleaseId>> {
    let mut out = BTreeMap::new();
    for r in records {
        for i in &r.instances {
            match i.fate {
                InstanceFate::Updated => {
                    out.insert(i.instance.clone(), Some(r.release.clone()));
                }
                _ => {
                    out.entry(i.instance.clone())
                        .or_insert_with(|| i.previous.clone());
                    if i.fate == InstanceFate::Restored {
                        out.insert(i.instance.clone(), i.previous.clone());
                    }
                }
            }
        }
    }
    out
}

/// The median and the spread of some durations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurationSummary {
    /// How many.
    pub count: usize,
    /// The median, milliseconds.
    pub median_ms: u64,
    /// The shortest, milliseconds.
    pub min_ms: u64,
    /// The longest, milliseconds.
    pub max_ms: u64,
}

impl DurationSummary {
    /// The summary of `values`; `None` when there are none.
    pub fn of(mut values: Vec<u64>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        let n = values.len();
        let median_ms = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2
        };
        Some(Self {
            count: n,
            median_ms,
            min_ms: values[0],
            max_ms: values[n - 1],
        })
    }
}

/// The four DORA figures over a window (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dora {
    /// The window's start, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// The window's end.
    pub until_ms: u64,
    /// Deployments started in the window and ended (any outcome).
    pub deployments: usize,
    /// Of those, how many went live (succeeded or degraded).
    pub live: usize,
    /// Of those, how many failed.
    pub failed: usize,
    /// Deployments that went live per day of the window.
    pub deployments_per_day: f64,
    /// Commit to live, over deployments with a commit time.
    pub lead_time: Option<DurationSummary>,
    /// Failed over all deployments; `None` without deployments.
    pub change_failure_rate: Option<f64>,
    /// Failure to recovery, over failed deployments that recovered.
    pub recovery_time: Option<DurationSummary>,
    /// Failed deployments not recovered yet.
    pub unrecovered: usize,
}

/// When the fleet was whole again after `records[at]` failed: the end of
/// its own clean rollback, else the end of the next run that succeeded.
pub fn recovered_at_ms(records: &[DeploymentRecord], at: usize) -> Option<u64> {
    let failed = &records[at];
    if failed.outcome == HistoryOutcome::RolledBack {
        return failed.finished_at_ms();
    }
    records[at + 1..]
        .iter()
        .find(|r| !r.drill && r.outcome == HistoryOutcome::Succeeded)
        .and_then(DeploymentRecord::finished_at_ms)
}

/// The DORA figures of the deployments in `records` (oldest first) started
/// in `[since_ms, until_ms)`.
pub fn dora(records: &[DeploymentRecord], since_ms: u64, until_ms: u64) -> Dora {
    let mut out = Dora {
        since_ms,
        until_ms,
        deployments: 0,
        live: 0,
        failed: 0,
        deployments_per_day: 0.0,
        lead_time: None,
        change_failure_rate: None,
        recovery_time: None,
        unrecovered: 0,
    };
    let mut lead = Vec::new();
    let mut recovery = Vec::new();
    for (at, r) in records.iter().enumerate() {
        let in_window = (since_ms..until_ms).contains(&r.started_at_ms);
        if !in_window || r.kind != RunKind::Deploy || r.drill || r.outcome == HistoryOutcome::InProgress {
            continue;
        }
        out.deployments += 1;
        if matches!(r.outcome, HistoryOutcome::Succeeded | HistoryOutcome::Degraded) {
            out.live += 1;
        }
        lead.extend(r.lead_time_ms());
        if r.outcome.is_failure() {
            out.failed += 1;
            let failed_at = r.failed_at_ms().unwrap_or(r.started_at_ms);
            match recovered_at_ms(records, at) {
                Some(back) => recovery.push(back.saturating_sub(failed_at)),
                None => out.unrecovered += 1,
            }
        }
    }
    let days = (until_ms.saturating_sub(since_ms) as f64 / 86_400_000.0).max(1.0 / 24.0);
    out.deployments_per_day = out.live as f64 / days;
    out.lead_time = DurationSummary::of(lead);
    out.recovery_time = DurationSummary::of(recovery);
    out.change_failure_rate = (out.deployments > 0).then(|| out.failed as f64 / out.deployments as f64);
    out
}

#[cfg(test)]
mod tests;
