//! The multi-region engine: waves in order, at most `max_parallel` regions
//! at once, a soak gate after each wave, and what [`OnFailure`] returns.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{FuturesUnordered, StreamExt};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{OnFailure, RegionName, RegionPlan, RegionsPlan};
use crate::error::Result;
use crate::names::ReleaseId;
use crate::report::{OutcomeKind, Report};

/// One probe of a region's health during a soak.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "hold", content = "reason")]
pub enum Hold {
    /// Every instance of the region is healthy.
    Holds,
    /// Not: which instance, and what it answered.
    Broken(String),
}

/// What the engine needs of each region: deploy its plan, probe it, return
/// it. [`ExecutorRegions`](super::ExecutorRegions) does it with one
/// [`Executor`](crate::Executor) per region; the CLI adds a lock and a
/// journal per region.
#[async_trait]
pub trait RegionRunner: Send + Sync {
    /// Runs `region`'s plan to its end.
    ///
    /// * Idempotent: no — a second call deploys again (a strategy plans
    ///   nothing for instances already on the release).
    /// * Cancel-safe: cancel with `cancel`, never by dropping the future:
    ///   the region's run then rolls itself back and still returns its
    ///   report.
    /// * On failure: `Err` only when the run could not start, and then
    ///   nothing of the region was touched; a run that started and failed
    ///   is an `Ok` report saying what each instance runs.
    async fn deploy(&self, region: &RegionPlan, cancel: CancellationToken) -> Result<Report>;

    /// One probe of every instance of `region`.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed; the engine counts an `Err` as a
    ///   broken hold.
    async fn check(&self, region: &RegionName) -> Result<Hold>;

    /// Returns `region`'s instances to the releases they ran before its
    /// plan (its [`previous`](crate::Plan::previous)).
    ///
    /// * Idempotent: yes — instances already back are left alone.
    /// * Cancel-safe: no; the engine never cancels a rollback.
    /// * On failure: the report (or error) says which instances are not
    ///   back; the engine reports the region as
    ///   [`RollbackFailed`](RegionState::RollbackFailed).
    async fn rollback(&self, region: &RegionPlan) -> Result<Report>;
}

/// Where a region ended in a multi-region run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionState {
    /// Not started: an earlier region failed, or `deploy --regions` left it
    /// out.
    NotStarted,
    /// Its run succeeded and it held through its wave's soak.
    Deployed,
    /// Its run did not succeed; its report says what each instance runs.
    Failed,
    /// Its run succeeded, then an instance was unhealthy during the soak.
    HoldBroken,
    /// Cancelled because another region of its wave failed; its run rolled
    /// itself back.
    Cancelled,
    /// Returned to its previous releases by `on_failure`.
    RolledBack,
    /// `on_failure` tried to return it and could not: its state is unknown.
    RollbackFailed,
}

impl fmt::Display for RegionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegionState::NotStarted => "not started",
            RegionState::Deployed => "deployed",
            RegionState::Failed => "failed",
            RegionState::HoldBroken => "failed its soak",
            RegionState::Cancelled => "cancelled, rolled back",
            RegionState::RolledBack => "rolled back",
            RegionState::RollbackFailed => "rollback failed",
        })
    }
}

/// One region in a [`RegionsReport`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionReport {
    /// The region.
    pub region: RegionName,
    /// Its wave, from 1.
    pub wave: usize,
    /// Where it ended.
    pub state: RegionState,
    /// Why it is not deployed, when it failed.
    pub reason: Option<String>,
    /// The report of its run, when it started.
    pub deployment: Option<Report>,
    /// The report of the rollback `on_failure` ran, if any.
    pub rollback: Option<Report>,
}

/// The outcome of a multi-region run in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionsOutcome {
    /// Every region of the plan deployed and held.
    Succeeded,
    /// A region failed; every region is on a known release (the new one or
    /// its previous one), as `on_failure` left it.
    Failed,
    /// A region's run or rollback could not return every instance: some
    /// region is not on one known release.
    Unknown,
}

impl fmt::Display for RegionsOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegionsOutcome::Succeeded => "succeeded",
            RegionsOutcome::Failed => "failed",
            RegionsOutcome::Unknown => "unknown state",
        })
    }
}

/// The result of a multi-region run, from the reports of the runs it
/// started (never from what the fleet looked like before).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegionsReport {
    /// The release.
    pub release: ReleaseId,
    /// The outcome.
    pub outcome: RegionsOutcome,
    /// Why it did not succeed.
    pub reason: Option<String>,
    /// Every region of the plan, wave by wave.
    pub regions: Vec<RegionReport>,
    /// How long it took (on the `tokio` clock).
    #[serde(with = "crate::duration_ms")]
    pub duration: Duration,
}

impl RegionsReport {
    /// The report of `region`.
    pub fn region(&self, region: &str) -> Option<&RegionReport> {
        self.regions.iter().find(|r| r.region.as_str() == region)
    }
}

impl fmt::Display for RegionsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "multi-region deployment of {}: {} in {:.1}s",
            self.release,
            self.outcome,
            self.duration.as_secs_f64()
        )?;
        if let Some(r) = &self.reason {
            writeln!(f, "  {r}")?;
        }
        for r in &self.regions {
            write!(f, "  wave {} {}: {}", r.wave, r.region, r.state)?;
            match &r.reason {
                Some(why) => writeln!(f, " ({why})")?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}

/// What happened, as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum RegionEventKind {
    /// A wave starts.
    WaveStarted {
        /// Its regions.
        regions: Vec<RegionName>,
    },
    /// A region's run starts.
    RegionStarted,
    /// A region's run succeeded.
    RegionDeployed,
    /// A region's run did not succeed.
    RegionFailed {
        /// Why.
        reason: String,
    },
    /// A region was cancelled because another one of its wave failed.
    RegionCancelled,
    /// A wave's soak starts.
    SoakStarted {
        /// How long.
        #[serde(with = "crate::duration_ms")]
        soak: Duration,
    },
    /// A region was unhealthy during the soak.
    HoldBroken {
        /// Which instance, and what it answered.
        reason: String,
    },
    /// A wave deployed and held.
    WaveHeld,
    /// `on_failure` returns a region.
    RollbackStarted,
    /// That return ended.
    RollbackFinished {
        /// Its outcome.
        outcome: OutcomeKind,
    },
    /// The run ended.
    Finished {
        /// Its outcome.
        outcome: RegionsOutcome,
    },
}

/// One event of a multi-region run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionEvent {
    /// The wave, from 1 (0 for the run's end).
    pub wave: usize,
    /// The region, for a region's event.
    pub region: Option<RegionName>,
    /// What happened.
    #[serde(flatten)]
    pub kind: RegionEventKind,
}

impl fmt::Display for RegionEvent {
    /// A line for a person.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.region.as_ref().map(RegionName::as_str).unwrap_or("");
        let w = self.wave;
        match &self.kind {
            RegionEventKind::WaveStarted { regions } => {
                let names: Vec<&str> = regions.iter().map(RegionName::as_str).collect();
                write!(f, "wave {w}: {}", names.join(", "))
            }
            RegionEventKind::RegionStarted => write!(f, "region {r}: deploying"),
            RegionEventKind::RegionDeployed => write!(f, "region {r}: deployed"),
            RegionEventKind::RegionFailed { reason } => write!(f, "region {r}: failed: {reason}"),
            RegionEventKind::RegionCancelled => {
                write!(f, "region {r}: cancelled (another region of wave {w} failed)")
            }
            RegionEventKind::SoakStarted { soak } => {
                write!(f, "wave {w}: soaking for {}", crate::duration_text::format(*soak))
            }
            RegionEventKind::HoldBroken { reason } => {
                write!(f, "region {r}: unhealthy during the soak: {reason}")
            }
            RegionEventKind::WaveHeld => write!(f, "wave {w}: deployed and held"),
            RegionEventKind::RollbackStarted => write!(f, "region {r}: rolling back"),
            RegionEventKind::RollbackFinished { outcome } => {
                let word = match outcome {
                    OutcomeKind::Succeeded => "rolled back",
                    _ => "rollback failed",
                };
                write!(f, "region {r}: {word}")
            }
            RegionEventKind::Finished { outcome } => write!(f, "multi-region deployment: {outcome}"),
        }
    }
}

/// Receives the events of a multi-region run. Each region's own step
/// events go to that region's [`EventSink`](crate::EventSink).
pub trait RegionEvents: Send + Sync {
    /// Called for every event, in order, inline in the engine: it must not
    /// block for long. Not idempotent; it cannot fail.
    fn emit(&self, event: &RegionEvent);
}

/// Drops every event.
impl RegionEvents for () {
    fn emit(&self, _: &RegionEvent) {}
}

/// Keeps every event in memory, for tests and for a report afterwards.
/// Clones share the log.
#[derive(Debug, Clone, Default)]
pub struct RegionEventLog(Arc<Mutex<Vec<RegionEvent>>>);

impl RegionEventLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// The events so far.
    pub fn events(&self) -> Vec<RegionEvent> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl RegionEvents for RegionEventLog {
    fn emit(&self, event: &RegionEvent) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event.clone());
    }
}

/// What a region's run left that a return would have to undo: anything
/// but a run that already rolled itself back.
fn needs_return(r: &RegionReport) -> bool {
    match r.state {
        RegionState::Deployed | RegionState::HoldBroken => true,
        RegionState::Failed => r
            .deployment
            .as_ref()
            .is_some_and(|d| d.outcome != OutcomeKind::RolledBack),
        _ => false,
    }
}

struct Engine<'a> {
    plan: &'a RegionsPlan,
    runner: &'a dyn RegionRunner,
    events: &'a dyn RegionEvents,
    reports: Vec<RegionReport>,
    index: BTreeMap<RegionName, usize>,
    /// The first failure, for the report's reason.
    failure: Option<String>,
}

impl Engine<'_> {
    fn emit(&self, wave: usize, region: Option<&RegionName>, kind: RegionEventKind) {
        self.events.emit(&RegionEvent {
            wave,
            region: region.cloned(),
            kind,
        });
    }

    fn report(&mut self, region: &RegionName) -> &mut RegionReport {
        let i = self.index[region];
        &mut self.reports[i]
    }

    /// Runs wave `w` (0-based); `true` when every region deployed.
    async fn deploy_wave(&mut self, w: usize, cancel: &CancellationToken) -> bool {
        let wave = &self.plan.waves[w];
        let runner = self.runner;
        let stop_wave = cancel.child_token();
        let cancels_wave = matches!(
            self.plan.on_failure,
            OnFailure::RollbackWave | OnFailure::RollbackAll
        );
        let mut pending = wave.iter();
        let mut running = FuturesUnordered::new();
        let mut ok = true;
        loop {
            while ok && !stop_wave.is_cancelled() && running.len() < self.plan.max_parallel.max(1) {
                let Some(r) = pending.next() else { break };
                self.emit(w + 1, Some(&r.region), RegionEventKind::RegionStarted);
                let token = stop_wave.child_token();
                running.push(async move { (r, runner.deploy(r, token).await) });
            }
            let Some((r, result)) = running.next().await else {
                break;
            };
            let stopped_by_us = stop_wave.is_cancelled() && !cancel.is_cancelled();
            let (state, reason, deployment) = match result {
                Ok(report) if report.outcome == OutcomeKind::Succeeded => {
                    (RegionState::Deployed, None, Some(report))
                }
                Ok(report) if stopped_by_us && report.outcome == OutcomeKind::RolledBack => {
                    (RegionState::Cancelled, None, Some(report))
                }
                Ok(report) => {
                    let why = report.reason.clone().unwrap_or_else(|| {
                        format!(
                            "its run ended {}",
                            crate::state::HistoryOutcome::from(report.outcome)
                        )
                    });
                    (RegionState::Failed, Some(why), Some(report))
                }
                Err(e) => (RegionState::Failed, Some(e.to_string()), None),
            };
            match state {
                RegionState::Deployed => self.emit(w + 1, Some(&r.region), RegionEventKind::RegionDeployed),
                RegionState::Cancelled => self.emit(w + 1, Some(&r.region), RegionEventKind::RegionCancelled),
                _ => {
                    ok = false;
                    self.failure.get_or_insert_with(|| {
                        format!("region {} failed: {}", r.region, reason.as_deref().unwrap_or(""))
                    });
                    if cancels_wave {
                        stop_wave.cancel();
                    }
                    self.emit(
                        w + 1,
                        Some(&r.region),
                        RegionEventKind::RegionFailed {
                            reason: reason.clone().unwrap_or_default(),
                        },
                    );
                }
            }
            let rep = self.report(&r.region);
            rep.state = state;
            rep.reason = reason;
            rep.deployment = deployment;
        }
        ok && !cancel.is_cancelled()
    }

    /// Probes wave `w`'s regions until the soak ends; `true` when each held.
    async fn soak(&mut self, w: usize, cancel: &CancellationToken) -> bool {
        let plan = self.plan;
        self.emit(w + 1, None, RegionEventKind::SoakStarted { soak: plan.soak });
        let deadline = Instant::now() + plan.soak;
        loop {
            let next = (Instant::now() + plan.soak_interval).min(deadline);
            tokio::select! {
                () = tokio::time::sleep_until(next) => {}
                () = cancel.cancelled() => return false,
            }
            let runner = self.runner;
            let probes = futures::future::join_all(
                plan.waves[w]
                    .iter()
                    .map(|r| async move { (&r.region, runner.check(&r.region).await) }),
            )
            .await;
            let mut held = true;
            for (region, probe) in probes {
                let why = match probe {
                    Ok(Hold::Holds) => continue,
                    Ok(Hold::Broken(why)) => why,
                    Err(e) => format!("could not probe: {e}"),
                };
                held = false;
                self.failure
                    .get_or_insert_with(|| format!("region {region} was unhealthy during the soak: {why}"));
                self.emit(
                    w + 1,
                    Some(region),
                    RegionEventKind::HoldBroken { reason: why.clone() },
                );
                let rep = self.report(region);
                rep.state = RegionState::HoldBroken;
                rep.reason = Some(why);
            }
            if !held {
                return false;
            }
            if Instant::now() >= deadline {
                return true;
            }
        }
    }

    /// What `on_failure` returns after wave `w` failed, newest first.
    async fn on_failure(&mut self, w: usize) {
        let waves: Vec<usize> = match self.plan.on_failure {
            OnFailure::Stop => return,
            OnFailure::RollbackRegion | OnFailure::RollbackWave => vec![w],
            OnFailure::RollbackAll => (0..=w).rev().collect(),
        };
        let only_failed = self.plan.on_failure == OnFailure::RollbackRegion;
        let mut targets: Vec<&RegionPlan> = Vec::new();
        for wave in waves {
            for r in self.plan.waves[wave].iter().rev() {
                let rep = &self.reports[self.index[&r.region]];
                let failed = matches!(rep.state, RegionState::Failed | RegionState::HoldBroken);
                if needs_return(rep) && (failed || !only_failed) {
                    targets.push(r);
                }
            }
        }
        // One region at a time, newest first: a rollback that fails stops
        // nothing else, and the order is the reverse of the deployment's.
        for r in targets {
            self.emit(w + 1, Some(&r.region), RegionEventKind::RollbackStarted);
            let (state, report, why) = match self.runner.rollback(r).await {
                Ok(rep) if rep.outcome == OutcomeKind::Succeeded => {
                    (RegionState::RolledBack, Some(rep), None)
                }
                Ok(rep) => {
                    let why = rep.reason.clone();
                    (RegionState::RollbackFailed, Some(rep), why)
                }
                Err(e) => (RegionState::RollbackFailed, None, Some(e.to_string())),
            };
            self.emit(
                w + 1,
                Some(&r.region),
                RegionEventKind::RollbackFinished {
                    outcome: report
                        .as_ref()
                        .map(|r| r.outcome)
                        .unwrap_or(OutcomeKind::RollbackFailed),
                },
            );
            let mode = self.plan.on_failure;
            let rep = self.report(&r.region);
            if rep.reason.is_none() || state == RegionState::RollbackFailed {
                rep.reason = why.or(rep.reason.take());
            }
            if rep.state == RegionState::Deployed && state == RegionState::RolledBack {
                rep.reason = Some(format!("returned by on_failure = {mode}"));
            }
            rep.state = state;
            rep.rollback = report;
        }
    }
}

/// Runs `plan` on `runner`: wave after wave, at most
/// [`max_parallel`](RegionsPlan::max_parallel) regions at once, each wave
/// soaked before the next, [`OnFailure`] applied when a region fails.
/// Cancelling `cancel` (Ctrl-C) cancels the regions running — each rolls
/// itself back — starts nothing more and then applies `on_failure` as for
/// a failure; a rollback it starts is never cancelled.
///
/// Never fails as a whole: every region's fate is in the report.
pub async fn run(
    plan: &RegionsPlan,
    runner: &dyn RegionRunner,
    events: &dyn RegionEvents,
    cancel: CancellationToken,
) -> RegionsReport {
    let started = Instant::now();
    let mut reports = Vec::new();
    let mut index = BTreeMap::new();
    for (w, wave) in plan.waves.iter().enumerate() {
        for r in wave {
            index.insert(r.region.clone(), reports.len());
            reports.push(RegionReport {
                region: r.region.clone(),
                wave: w + 1,
                state: RegionState::NotStarted,
                reason: None,
                deployment: None,
                rollback: None,
            });
        }
    }
    let mut e = Engine {
        plan,
        runner,
        events,
        reports,
        index,
        failure: None,
    };
    let mut failed_wave = None;
    for (w, wave) in plan.waves.iter().enumerate() {
        if cancel.is_cancelled() {
            failed_wave = Some(w.saturating_sub(1));
            break;
        }
        e.emit(
            w + 1,
            None,
            RegionEventKind::WaveStarted {
                regions: wave.iter().map(|r| r.region.clone()).collect(),
            },
        );
        if !e.deploy_wave(w, &cancel).await {
            failed_wave = Some(w);
            break;
        }
        if !plan.soak.is_zero() && !e.soak(w, &cancel).await {
            failed_wave = Some(w);
            break;
        }
        e.emit(w + 1, None, RegionEventKind::WaveHeld);
    }
    if let Some(w) = failed_wave {
        e.on_failure(w).await;
    }
    let failure = e.failure.take();
    let reports = e.reports;
    let unknown = reports.iter().any(|r| {
        r.state == RegionState::RollbackFailed
            || (r.state == RegionState::Failed
                && r.deployment
                    .as_ref()
                    .is_some_and(|d| d.outcome == OutcomeKind::RollbackFailed))
    });
    let outcome = if unknown {
        RegionsOutcome::Unknown
    } else if failed_wave.is_none() && reports.iter().all(|r| r.state == RegionState::Deployed) {
        RegionsOutcome::Succeeded
    } else {
        RegionsOutcome::Failed
    };
    let reason = match outcome {
        RegionsOutcome::Succeeded => None,
        _ => failure.or_else(|| Some("cancelled".to_string())),
    };
    events.emit(&RegionEvent {
        wave: 0,
        region: None,
        kind: RegionEventKind::Finished { outcome },
    });
    RegionsReport {
        release: plan.release.clone(),
        outcome,
        reason,
        regions: reports,
        duration: started.elapsed(),
    }
}
