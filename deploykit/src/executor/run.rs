//! One run of a plan: the stages in order, the failure policy, the rollback.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::join_all;
use tokio::time::Instant;

use super::error::StepError;
use super::report::{self, Abort, Phase, Tracked};
use super::steps::{self, StepCtx, StepOk};
use super::{ms, Inner, Prepared};
use crate::event::{Event, EventKind, StepResult};
use crate::names::InstanceId;
use crate::plan::{
    compensation_steps, idle_steps, retirement_steps, AbortFailure, AbortWhen, FailurePolicy,
    InstanceProgress, InstanceUndo, Plan, Step, Unit,
};
use crate::report::Report;
use crate::smoke::SmokeTester;

/// Everything a run learns while it runs, behind its one lock.
#[derive(Debug, Default)]
struct RunState {
    /// What is known of each instance the plan touches.
    tracked: BTreeMap<InstanceId, Tracked>,
    /// The first failure of a unit that works on no instance (a switch, a
    /// warm-up, a record); it aborts unless the policy restores instances.
    plan_failure: Option<String>,
    /// The rollout attempted a [`Step::SwitchTo`] (it may have taken
    /// effect).
    switch_attempted: bool,
    /// The rollout's [`Step::SwitchTo`] succeeded: traffic went to the new
    /// environment (a failed switch leaves the old one live).
    switched: bool,
    /// An abort step whose failure fails the rollback failed.
    undo_failed: Option<String>,
    /// Tracked instances with an error, kept so a stage's count does not
    /// walk every instance.
    failed: usize,
    /// The warning that restores go on without a durable record was given.
    journal_warned: bool,
    /// The last analysis check of each canary stage, in stage order.
    checks: Vec<crate::report::StageCheck>,
    /// The last reading of an experiment's test.
    experiment: Option<crate::experiment::Reading>,
    /// The last reading of an experiment with several treatments.
    variants: Option<crate::experiment::VariantsReading>,
    /// The winner an experiment with several treatments chose: the
    /// [`Stage::if_winner`](crate::Stage::if_winner) branch that runs.
    winner: Option<crate::plan::ExperimentArm>,
}

pub(super) struct Run<'a> {
    inner: &'a Inner,
    plan: &'a Plan,
    id: String,
    started: Instant,
    state: Mutex<RunState>,
    smoke: Option<Arc<dyn SmokeTester>>,
    /// A failed load-balancer preflight the run goes on despite.
    preflight_warning: Option<String>,
    /// The canary gates' state, carried across stages.
    canary: steps::canary::CanaryState,
}

impl<'a> Run<'a> {
    pub(super) fn new(
        inner: &'a Inner,
        plan: &'a Plan,
        id: String,
        prepared: Prepared,
        unsettled: &std::collections::BTreeSet<InstanceId>,
    ) -> Self {
        let mut tracked: BTreeMap<InstanceId, Tracked> = plan
            .instances()
            .into_iter()
            .map(|i| {
                let previous = plan.previous.get(&i).cloned().flatten();
                let mut progress = InstanceProgress::untouched(previous);
                // Left part-way or moved by an interrupted run: assume the
                // worst, so a restore does every step.
                progress.release_changed = unsettled.contains(&i) || plan.moved.contains(&i);
                let mut t = Tracked::new(progress);
                t.installed = plan.installed_before.get(&i).cloned();
                (i, t)
            })
            .collect();
        for id in plan.moved.iter().filter(|i| plan.skipped.contains(i)) {
            // Finished by an interrupted run of the same deployment: on the
            // release and serving it, so an abort returns it like the rest.
            let progress = InstanceProgress {
                previous: plan.previous.get(id).cloned().flatten(),
                release_changed: true,
                in_rotation: true,
                running: true,
            };
            let mut t = Tracked::new(progress);
            t.phase = Phase::Completed;
            tracked.entry(id.clone()).or_insert(t);
        }
        Self {
            inner,
            plan,
            id,
            started: Instant::now(),
            state: Mutex::new(RunState {
                tracked,
                ..RunState::default()
            }),
            smoke: prepared.smoke,
            preflight_warning: prepared.preflight_warning,
            canary: steps::canary::CanaryState::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.state.lock().expect("run state poisoned")
    }

    fn emit(&self, kind: EventKind) {
        match &kind {
            EventKind::InstanceFailed {
                instance,
                step,
                reason,
            } => {
                tracing::warn!(deployment = %self.id, %instance, %step, reason, "instance failed")
            }
            EventKind::Warning { instance, message } => {
                tracing::warn!(deployment = %self.id, instance = ?instance, message, "warning")
            }
            EventKind::AnalysisResult {
                stage,
                weight,
                result,
                evidence,
                group,
                ..
            } => {
                tracing::debug!(deployment = %self.id, stage, %result, "analysis");
                let check = crate::report::StageCheck {
                    stage: *stage,
                    weight: *weight,
                    result: result.clone(),
                    evidence: evidence.clone(),
                    group: group.clone(),
                };
                let checks = &mut self.lock().checks;
                match checks.iter_mut().find(|c| c.stage == *stage && c.group == *group) {
                    Some(c) => *c = check,
                    None => checks.push(check),
                }
            }
            EventKind::ExperimentReading { reading, .. } => {
                tracing::debug!(deployment = %self.id, p_value = reading.p_value, "experiment reading");
                self.lock().experiment = Some(*reading);
            }
            EventKind::ExperimentVariants { reading, .. } => {
                tracing::debug!(deployment = %self.id, "experiment reading");
                self.lock().variants = Some(reading.clone());
            }
            EventKind::ExperimentDecided { winner, release } => {
                tracing::debug!(deployment = %self.id, %winner, "experiment decided");
                self.lock().winner = Some(crate::plan::ExperimentArm {
                    group: winner.clone(),
                    release: release.clone(),
                });
            }
            other => tracing::debug!(deployment = %self.id, event = ?other),
        }
        if let Some(sink) = &self.inner.sink {
            sink.emit(&Event {
                elapsed_ms: ms(self.started.elapsed()),
                deployment: self.id.clone(),
                kind,
            });
        }
    }

    fn with<R>(&self, id: &InstanceId, f: impl FnOnce(&mut Tracked) -> R) -> R {
        f(self.lock().tracked.get_mut(id).expect("plan instance tracked"))
    }

    /// Updates what is known of `id`, if the plan tracks it (a step may
    /// name an instance that no unit of the plan works on).
    fn mark(&self, id: &InstanceId, f: impl FnOnce(&mut InstanceProgress)) {
        if let Some(t) = self.lock().tracked.get_mut(id) {
            f(&mut t.progress);
        }
    }

    fn failed_count(&self) -> usize {
        self.lock().failed
    }

    pub(super) async fn execute(self) -> Report {
        self.emit(EventKind::DeploymentStarted {
            strategy: self.plan.strategy,
            release: self.plan.release.clone(),
            instances: self.plan.instances().len(),
            stages: self.plan.stages.len(),
        });
        if let Some(message) = &self.preflight_warning {
            self.emit(EventKind::Warning {
                instance: None,
                message: message.clone(),
            });
        }
        let abort = self.rollout().await;
        if let Some(reason) = &abort {
            self.rollback(reason).await;
        }
        self.finish(abort)
    }

    /// Runs the stages in order; the reason to abort, if one came up.
    async fn rollout(&self) -> Option<String> {
        let cancel = &self.inner.cancel;
        let total = self.plan.stages.len();
        for (si, stage) in self.plan.stages.iter().enumerate() {
            if cancel.is_cancelled() {
                return Some("cancelled by the operator".into());
            }
            if let Some(group) = &stage.if_winner {
                let winner = self.lock().winner.as_ref().map(|w| w.group.clone());
                match winner {
                    Some(w) if w == *group => {}
                    // Another treatment won: its branch runs instead.
                    Some(_) => continue,
                    // A branch reached with no winner recorded is a plan
                    // the executor cannot follow: stop before acting.
                    None => {
                        return Some(format!(
                            "stage '{}' runs only when {group} wins an experiment, but no experiment of this run chose a winner",
                            stage.name
                        ))
                    }
                }
            }
            let stage_start = Instant::now();
            self.emit(EventKind::StageStarted {
                stage: si,
                of: total,
                name: stage.name.clone(),
                instances: stage.units.iter().filter_map(|u| u.instance.clone()).collect(),
                rollback: false,
            });
            let failed_before = self.failed_count();
            join_all(stage.units.iter().map(|u| self.run_unit(si, u))).await;
            let failed = self.failed_count();
            self.emit(EventKind::StageFinished {
                stage: si,
                name: stage.name.clone(),
                rollback: false,
                duration_ms: ms(stage_start.elapsed()),
                failed: failed - failed_before,
            });
            if let Some(reason) = self.abort_reason(failed) {
                return Some(reason);
            }
        }
        None
    }

    /// Whether the run must abort after a stage with `failed` instance
    /// failures so far, and why.
    fn abort_reason(&self, failed: usize) -> Option<String> {
        match self.plan.policy {
            FailurePolicy::RestoreInstance { max_failures } if failed > max_failures => {
                return Some(format!(
                    "{failed} instance(s) failed, more than the failure budget of {max_failures}"
                ));
            }
            FailurePolicy::AbortAll if failed > 0 => {
                return Some(format!(
                    "{failed} instance(s) failed under the {} strategy, which rolls back on any failure",
                    self.plan.strategy
                ));
            }
            _ => {}
        }
        // A cancellation also fails the step it interrupts (a gate, a
        // warm-up): name the cause, not the symptom.
        if self.inner.cancel.is_cancelled() {
            return Some("cancelled by the operator".into());
        }
        let plan_failure = self.lock().plan_failure.clone();
        match self.plan.policy {
            FailurePolicy::RestoreInstance { .. } => None,
            FailurePolicy::AbortAll => plan_failure,
        }
    }

    /// Runs one unit of the rollout. On failure, records it and (under the
    /// restore policy, or when cancelled) restores the instance at once.
    async fn run_unit(&self, si: usize, unit: &Unit) {
        let cancel = &self.inner.cancel;
        for (n, step) in unit.steps.iter().enumerate() {
            if cancel.is_cancelled() {
                // Nothing of this unit ran yet (or only waits are left):
                // nothing to undo here.
                let interrupted = n > 0 && !matches!(step, Step::Pause { .. });
                if let (true, Some(id)) = (interrupted, &unit.instance) {
                    self.compensate(si, id).await;
                }
                return;
            }
            if let Err(e) = self.exec_step(si, step, false).await {
                self.unit_failed(si, unit, step, e).await;
                return;
            }
        }
        if let Some(id) = &unit.instance {
            self.with(id, |t| t.phase = Phase::Completed);
        }
    }

    /// Records the failure of `step` in `unit` and restores its instance
    /// when the policy (or a cancellation) says so.
    async fn unit_failed(&self, si: usize, unit: &Unit, step: &Step, e: StepError) {
        let cancelled = self.inner.cancel.is_cancelled();
        let Some(id) = &unit.instance else {
            let message = format!("{step} failed: {e}");
            self.emit(EventKind::Warning {
                instance: None,
                message: message.clone(),
            });
            self.lock().plan_failure.get_or_insert(message);
            return;
        };
        // A step the cancellation interrupted is not the instance's failure.
        if !(cancelled && matches!(e, StepError::Cancelled)) {
            let reason = e.to_string();
            let msg = format!("{} failed: {reason}", step.kind());
            {
                let mut guard = self.lock();
                let state = &mut *guard;
                let t = state.tracked.get_mut(id).expect("plan instance tracked");
                t.health_unknown |= matches!(
                    step,
                    Step::Start { .. } | Step::AwaitHealthy { .. } | Step::AwaitHealthyWithin { .. }
                );
                if t.error.is_none() {
                    t.error = Some(msg);
                    state.failed += 1;
                }
            }
            self.emit(EventKind::InstanceFailed {
                instance: id.clone(),
                step: step.kind(),
                reason,
            });
        }
        if matches!(self.plan.policy, FailurePolicy::RestoreInstance { .. }) || cancelled {
            self.compensate(si, id).await;
        }
    }

    /// Brings one instance back as the plan says (see
    /// [`InstanceUndo`] and [`Plan::leave_stopped`]); `true` if it worked.
    async fn compensate(&self, si: usize, id: &InstanceId) -> bool {
        let (progress, health_unknown) = self.with(id, |t| (t.progress.clone(), t.health_unknown));
        let steps = if self.plan.leave_stopped.contains(id) {
            retirement_steps(id, &progress, self.plan.drain_timeout)
        } else {
            match self.plan.instance_undo {
                InstanceUndo::Idle => idle_steps(id, &progress),
                InstanceUndo::Serve => {
                    // A failed start leaves "may be running": bring the
                    // instance up and probe it (starting a running instance
                    // is a no-op) rather than enable it unseen.
                    let mut serve = progress.clone();
                    if health_unknown && !serve.release_changed {
                        serve.running = false;
                    }
                    compensation_steps(id, &serve, self.plan.health, self.plan.drain_timeout)
                }
            }
        };
        for step in &steps {
            if let Err(e) = self.exec_step(si, step, true).await {
                self.with(id, |t| t.phase = Phase::Unrestorable);
                self.emit(EventKind::InstanceUnrecoverable {
                    instance: id.clone(),
                    reason: format!("{} failed while restoring: {e}", step.kind()),
                });
                // Another process owns the fleet once the lock is lost.
                if !e.is_lock_lost() {
                    self.quarantine(id).await;
                }
                return false;
            }
        }
        self.with(id, |t| t.phase = Phase::Restored);
        self.emit(EventKind::InstanceRestored {
            instance: id.clone(),
            release: progress.previous.clone(),
        });
        true
    }

    /// Best effort: keep an unrecoverable instance out of rotation.
    async fn quarantine(&self, id: &InstanceId) {
        let backend = self.inner.instance(id).backend().clone();
        let (r, _) = self
            .inner
            .call(self.inner.timeouts.load_balancer, || {
                self.inner.lb.disable(&backend)
            })
            .await;
        match r {
            Ok(()) => self.with(id, |t| t.progress.in_rotation = false),
            Err(e) => self.emit(EventKind::Warning {
                instance: Some(id.clone()),
                message: format!("could not take the unrecoverable instance out of rotation: {e}"),
            }),
        }
    }

    /// The instances an abort restores: those not restored yet that the
    /// plan changed, or that it leaves stopped, or every one when the plan
    /// undoes its instances as idle.
    fn rollback_targets(&self) -> Vec<InstanceId> {
        let all = self.plan.instance_undo == InstanceUndo::Idle;
        self.lock()
            .tracked
            .iter()
            .filter(|(id, t)| {
                !t.phase.is_restore_attempted()
                    && (all
                        || t.progress.release_changed
                        || !t.progress.running
                        || !t.progress.in_rotation
                        || self.plan.leave_stopped.contains(id))
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    async fn rollback(&self, reason: &str) {
        let targets = self.rollback_targets();
        self.emit(EventKind::RollbackStarted {
            reason: reason.to_string(),
            instances: targets.clone(),
        });
        self.run_abort_steps().await;
        let stuck = {
            let state = self.lock();
            state.switched && state.undo_failed.is_some()
        };
        if self.plan.instance_undo == InstanceUndo::Idle && stuck {
            // Traffic could not be moved back (a failed switch back): the
            // instances an idle undo would stop, undrained, still serve it.
            return;
        }
        let batch = match self.plan.policy {
            FailurePolicy::AbortAll => targets.len().max(1),
            FailurePolicy::RestoreInstance { .. } => self.plan.rollback_batch,
        };
        let batches: Vec<&[InstanceId]> = targets.chunks(batch).collect();
        let of = batches.len();
        for (bi, ids) in batches.into_iter().enumerate() {
            let start = Instant::now();
            let name = format!("rollback {}/{of}", bi + 1);
            self.emit(EventKind::StageStarted {
                stage: bi,
                of,
                name: name.clone(),
                instances: ids.to_vec(),
                rollback: true,
            });
            let results = join_all(ids.iter().map(|id| self.compensate(bi, id))).await;
            self.emit(EventKind::StageFinished {
                stage: bi,
                name,
                rollback: true,
                duration_ms: ms(start.elapsed()),
                failed: results.iter().filter(|ok| !**ok).count(),
            });
        }
    }

    /// What the plan says undoes it beyond single instances (e.g. all
    /// traffic back to where it was), before any instance is touched.
    async fn run_abort_steps(&self) {
        let switched = self.lock().switch_attempted;
        for abort in &self.plan.on_abort {
            if abort.when == AbortWhen::AfterSwitch && !switched {
                continue;
            }
            let Err(e) = self.exec_step(0, &abort.step, true).await else {
                continue;
            };
            let what = format!("{} failed during the rollback: {e}", abort.step);
            match abort.on_failure {
                AbortFailure::FailRollback => {
                    self.lock().undo_failed.get_or_insert(what);
                    return;
                }
                AbortFailure::Warn => self.emit(EventKind::Warning {
                    instance: None,
                    message: match &abort.note {
                        Some(note) => format!("{what}; {note}"),
                        None => what,
                    },
                }),
            }
        }
    }

    fn finish(&self, abort: Option<String>) -> Report {
        let (tracked, undo_failed, checks, experiment, variants, winner) = {
            let state = self.lock();
            (
                state.tracked.clone(),
                state.undo_failed.clone(),
                state.checks.clone(),
                state.experiment,
                state.variants.clone(),
                state.winner.clone(),
            )
        };
        let fleet: Vec<InstanceId> = self
            .inner
            .instances
            .iter()
            .map(|i| i.backend().id.clone())
            .collect();
        let abort = abort.map(|reason| Abort { reason, undo_failed });
        let report = report::report(
            self.plan,
            &fleet,
            &tracked,
            abort.as_ref(),
            self.id.clone(),
            self.started.elapsed(),
        );
        let report = Report {
            checks,
            experiment,
            variants,
            // Stable was promoted to the winner's release, whichever the
            // plan was named after.
            release: winner.as_ref().map_or(report.release, |w| w.release.clone()),
            winner,
            ..report
        };
        self.emit(EventKind::DeploymentFinished {
            outcome: report.outcome,
            succeeded: report.succeeded().len(),
            failed: report.failed().len(),
            duration_ms: ms(report.duration),
            reason: report.reason.clone(),
        });
        report
    }

    /// Runs one step with its events; what it tells about its instance is
    /// tracked.
    async fn exec_step(&self, si: usize, step: &Step, rollback: bool) -> Result<(), StepError> {
        let instance = step.instance().cloned();
        self.emit(EventKind::StepStarted {
            stage: si,
            step: step.kind(),
            instance: instance.clone(),
            rollback,
        });
        if let Err(e) = self.durable(rollback).await {
            self.emit(EventKind::StepFinished {
                stage: si,
                step: step.kind(),
                instance,
                rollback,
                duration_ms: 0,
                attempts: 0,
                result: StepResult::Failed(e.to_string()),
            });
            return Err(e);
        }
        let start = Instant::now();
        if let (Some(id), true) = (&instance, steps::instance::marks_on_start(step)) {
            self.mark(id, |p| steps::instance::mark_started(step, p));
        }
        // Like the release change it is marked when attempted: the
        // instance may run it from here on.
        if let (Some(id), false, Step::Install { release, .. }) = (&instance, rollback, step) {
            if let Some(t) = self.lock().tracked.get_mut(id) {
                t.installed = Some(release.clone());
            }
        }
        if !rollback && matches!(step, Step::SwitchTo { .. }) {
            self.lock().switch_attempted = true;
        }
        let (result, attempts) = self.dispatch(step, rollback).await;
        if !rollback && result.is_ok() && matches!(step, Step::SwitchTo { .. }) {
            self.lock().switched = true;
        }
        let step_result = match &result {
            Ok(StepOk::Ok) => StepResult::Ok,
            Ok(StepOk::Warning(w)) => {
                self.emit(EventKind::Warning {
                    instance: instance.clone(),
                    message: w.clone(),
                });
                StepResult::Warning(w.clone())
            }
            Err(e) => StepResult::Failed(e.to_string()),
        };
        if let (Some(id), Ok(_), true) = (&instance, &result, steps::instance::marks_on_done(step)) {
            if let Some(t) = self.lock().tracked.get_mut(id) {
                steps::instance::mark_done(step, &mut t.progress);
                if let (false, Step::Restore { release, .. }) = (rollback, step) {
                    t.returned_to = Some(release.clone());
                }
            }
        }
        self.emit(EventKind::StepFinished {
            stage: si,
            step: step.kind(),
            instance,
            rollback,
            duration_ms: ms(start.elapsed()),
            attempts,
            result: step_result,
        });
        result.map(|_| ())
    }

    /// Waits until the sink holds every event so far durably, so that a
    /// crash after the step acts leaves a record of it. A rollout step the
    /// sink cannot record fails before acting; a restore step goes on with a
    /// warning, because bringing its instance back matters more than the
    /// record (a later run redoes a restore, which is idempotent).
    /// A lost deployment lock fails every step, restores included: another
    /// process may own the fleet now.
    async fn durable(&self, rollback: bool) -> Result<(), StepError> {
        let Some(sink) = &self.inner.sink else {
            return Ok(());
        };
        match sink.durable().await {
            Ok(()) => Ok(()),
            Err(e) if !rollback || e.is_lock_lost() => Err(StepError::Journal(e)),
            Err(e) => {
                let first = !std::mem::replace(&mut self.lock().journal_warned, true);
                if first {
                    self.emit(EventKind::Warning {
                        instance: None,
                        message: format!("restoring without a durable record of the steps: {e}"),
                    });
                }
                Ok(())
            }
        }
    }

    /// Hands the step to its handler with the context it needs.
    async fn dispatch(&self, step: &Step, rollback: bool) -> steps::Outcome {
        let emit = |k: EventKind| self.emit(k);
        let ctx = StepCtx {
            inner: self.inner,
            // Rollback steps are not cancellable: they restore safety.
            cancel: (!rollback).then_some(&self.inner.cancel),
            emit: &emit,
            smoke: self.smoke.as_deref(),
            run: &self.id,
        };
        match step {
            Step::Analyze { .. } | Step::AwaitPromotion { .. } | Step::Experiment { .. } => {
                steps::canary::run(&ctx, &self.canary, step).await
            }
            Step::RecordSwitching { .. } | Step::RecordLive { .. } => {
                steps::blue_green::run(&ctx, step).await
            }
            Step::Gate { .. } => steps::gate::run(&ctx, step).await,
            Step::FlagShare { .. } | Step::FlagKill { .. } => steps::flag::run(&ctx, step).await,
            Step::Pause { .. }
            | Step::SetWeights { .. }
            | Step::SwitchTo { .. }
            | Step::ApplyPolicy { .. }
            | Step::WarmUp { .. } => steps::traffic::run(&ctx, step).await,
            _ => steps::instance::run(&ctx, step).await,
        }
    }
}
