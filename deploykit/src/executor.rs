//! The one executor that runs any [`Plan`] against the core traits.
//!
//! It owns, in one place, what every strategy needs: per-call timeouts,
//! retries of transient errors, the event stream, the failure policy,
//! per-instance restore, abort and rollback, and cancellation.
//!
//! # Cancellation
//!
//! Cancelling the [`CancellationToken`] given to the builder stops the
//! deployment at the next step boundary: waits (pauses, health-probe
//! intervals, drain waits) end at once, driver calls already under way are
//! allowed to finish (bounded by their timeouts), no new step starts, and
//! every instance already touched is rolled back. The rollback itself is not
//! cancellable: it is what leaves the fleet on one known version.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{DriverError, Error, Result};
use crate::event::{Event, EventKind, EventSink, StepResult};
use crate::names::{InstanceId, ReleaseId};
use crate::plan::{
    compensation_steps, FailurePolicy, FleetSnapshot, InstanceProgress, InstanceSnapshot, Plan, Step,
};
use crate::report::{InstanceReport, InstanceStatus, OutcomeKind, Report};
use crate::traits::{Health, Instance, LoadBalancer, Strategy};

/// Upper bounds for each kind of driver call. A call that takes longer is
/// abandoned (its future dropped: see each trait method's cancel-safety) and
/// the step fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Graceful stop (then force-stop). Default 90 s.
    pub stop: Duration,
    /// Force-stop. Default 30 s.
    pub force_stop: Duration,
    /// Install of a release. Default 15 min.
    pub install: Duration,
    /// Restore of a previous release. Default 5 min.
    pub restore: Duration,
    /// Start. Default 2 min.
    pub start: Duration,
    /// One health probe. Default 10 s.
    pub health_probe: Duration,
    /// One load-balancer change. Default 60 s.
    pub load_balancer: Duration,
    /// One read of current release or connection counts. Default 10 s.
    pub query: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            stop: Duration::from_secs(90),
            force_stop: Duration::from_secs(30),
            install: Duration::from_secs(15 * 60),
            restore: Duration::from_secs(5 * 60),
            start: Duration::from_secs(120),
            health_probe: Duration::from_secs(10),
            load_balancer: Duration::from_secs(60),
            query: Duration::from_secs(10),
        }
    }
}

/// Retries of transient driver errors (every trait method is idempotent by
/// contract, so each may be retried).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all, at least 1. Default 3.
    pub attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    /// Default 1 s.
    pub backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 3,
            backoff: Duration::from_secs(1),
        }
    }
}

/// Builds an [`Executor`]. Setters never fail; [`build`](Self::build)
/// checks everything.
#[derive(Default)]
pub struct ExecutorBuilder {
    instances: Vec<Arc<dyn Instance>>,
    load_balancer: Option<Arc<dyn LoadBalancer>>,
    sink: Option<Arc<dyn EventSink>>,
    cancel: Option<CancellationToken>,
    timeouts: Timeouts,
    retry: Retry,
    drain_poll: Option<Duration>,
}

impl std::fmt::Debug for ExecutorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorBuilder")
            .field("instances", &self.instances.len())
            .field("load_balancer", &self.load_balancer)
            .field("timeouts", &self.timeouts)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl ExecutorBuilder {
    /// Adds one instance.
    pub fn instance(mut self, instance: Arc<dyn Instance>) -> Self {
        self.instances.push(instance);
        self
    }

    /// Adds instances.
    pub fn instances(mut self, instances: impl IntoIterator<Item = Arc<dyn Instance>>) -> Self {
        self.instances.extend(instances);
        self
    }

    /// Sets the load balancer (required; use
    /// [`NoLoadBalancer`](crate::NoLoadBalancer) when there is none).
    pub fn load_balancer(mut self, lb: Arc<dyn LoadBalancer>) -> Self {
        self.load_balancer = Some(lb);
        self
    }

    /// Sends every event to `sink`.
    pub fn events(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Cancelling `token` aborts the deployment and rolls back.
    pub fn cancel_token(mut self, token: CancellationToken) -> Self {
        self.cancel = Some(token);
        self
    }

    /// Per-call timeouts.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Self {
        self.timeouts = timeouts;
        self
    }

    /// Retries of transient errors.
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// How often a drain wait polls connection counts (default 1 s).
    pub fn drain_poll(mut self, every: Duration) -> Self {
        self.drain_poll = Some(every);
        self
    }

    /// Checks the fleet and settings.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an empty fleet (`instances`), duplicate
    /// instance ids (`instances`), a missing load balancer
    /// (`load_balancer`), zero retry attempts (`retry.attempts`) or a zero
    /// drain poll interval (`drain_poll`).
    pub fn build(self) -> Result<Executor> {
        if self.instances.is_empty() {
            return Err(Error::invalid(
                "instances",
                "the fleet is empty; add at least one instance",
            ));
        }
        let mut by_id = HashMap::new();
        for (n, i) in self.instances.iter().enumerate() {
            let id = i.backend().id.clone();
            if by_id.insert(id.clone(), n).is_some() {
                return Err(Error::invalid(
                    "instances",
                    format!("the instance id {id} appears more than once; give every instance its own id"),
                ));
            }
        }
        let Some(lb) = self.load_balancer else {
            return Err(Error::invalid(
                "load_balancer",
                "none set; pass one, or NoLoadBalancer when nothing routes traffic",
            ));
        };
        if self.retry.attempts == 0 {
            return Err(Error::invalid("retry.attempts", "must be at least 1"));
        }
        let drain_poll = self.drain_poll.unwrap_or(Duration::from_secs(1));
        if drain_poll.is_zero() {
            return Err(Error::invalid("drain_poll", "must be greater than 0"));
        }
        Ok(Executor {
            inner: Arc::new(Inner {
                instances: self.instances,
                by_id,
                lb,
                sink: self.sink,
                cancel: self.cancel.unwrap_or_default(),
                timeouts: self.timeouts,
                retry: self.retry,
                drain_poll,
            }),
        })
    }
}

/// Runs plans against a fleet and a load balancer. Cheap to clone.
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("instances", &self.inner.instances.len())
            .field("load_balancer", &self.inner.lb.name())
            .finish_non_exhaustive()
    }
}

struct Inner {
    instances: Vec<Arc<dyn Instance>>,
    by_id: HashMap<InstanceId, usize>,
    lb: Arc<dyn LoadBalancer>,
    sink: Option<Arc<dyn EventSink>>,
    cancel: CancellationToken,
    timeouts: Timeouts,
    retry: Retry,
    drain_poll: Duration,
}

impl Executor {
    /// A builder.
    pub fn builder() -> ExecutorBuilder {
        ExecutorBuilder::default()
    }

    /// The cancellation token (cancel it to abort and roll back).
    pub fn cancel_token(&self) -> CancellationToken {
        self.inner.cancel.clone()
    }

    /// Reads every instance's current release (concurrently). Touches
    /// nothing.
    ///
    /// # Errors
    /// [`Error::Step`] naming the first instance whose release could not be
    /// read: deploykit does not plan on a fleet it cannot see.
    pub async fn snapshot(&self) -> Result<FleetSnapshot> {
        let inner = &self.inner;
        let reads = inner.instances.iter().map(|i| async move {
            let (r, _) = inner.call(inner.timeouts.query, || i.current_release()).await;
            r.map(|release| InstanceSnapshot {
                backend: i.backend().clone(),
                release,
            })
            .map_err(|e| Error::Step {
                step: "current_release".into(),
                instance: Some(i.backend().id.clone()),
                source: DriverError::new(e),
            })
        });
        let instances = join_all(reads).await.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(FleetSnapshot { instances })
    }

    /// Reads the fleet, plans with `strategy` and runs the plan.
    ///
    /// # Errors
    /// As [`snapshot`](Self::snapshot), [`Strategy::plan`] and
    /// [`run`](Self::run): only when the deployment could not start. Once it
    /// starts, failures are in the [`Report`].
    pub async fn deploy(&self, strategy: &dyn Strategy, release: &ReleaseId) -> Result<Report> {
        let snapshot = self.snapshot().await?;
        let plan = strategy.plan(&snapshot, release)?;
        self.run(&plan).await
    }

    /// Runs `plan` with a generated deployment id.
    ///
    /// # Errors
    /// See [`run_with_id`](Self::run_with_id).
    pub async fn run(&self, plan: &Plan) -> Result<Report> {
        let millis = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default();
        self.run_with_id(plan, &format!("{}-{millis}", plan.release))
            .await
    }

    /// Runs `plan`, naming the deployment `id` in events and the report.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `plan`) when the plan names an
    /// instance this executor does not have, or a rollback batch of 0.
    /// Nothing is touched then.
    pub async fn run_with_id(&self, plan: &Plan, id: &str) -> Result<Report> {
        for stage in &plan.stages {
            for unit in &stage.units {
                let named = unit
                    .instance
                    .iter()
                    .chain(unit.steps.iter().filter_map(Step::instance));
                for i in named {
                    if !self.inner.by_id.contains_key(i) {
                        return Err(Error::invalid(
                            "plan",
                            format!("it names instance {i}, which is not in this executor's fleet"),
                        ));
                    }
                }
            }
        }
        if plan.rollback_batch == 0 {
            return Err(Error::invalid("plan.rollback_batch", "must be at least 1"));
        }
        let run = Run::new(&self.inner, plan, id.to_string());
        Ok(run.execute().await)
    }
}

impl Inner {
    /// Calls `f` with a timeout, retrying transient errors.
    async fn call<T, F, Fut>(&self, timeout: Duration, f: F) -> (std::result::Result<T, String>, u32)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::result::Result<T, DriverError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match tokio::time::timeout(timeout, f()).await {
                Ok(Ok(v)) => return (Ok(v), attempt),
                Ok(Err(e)) if e.is_transient() && attempt < self.retry.attempts => {
                    let wait = self.retry.backoff * 2u32.saturating_pow(attempt - 1);
                    tokio::time::sleep(wait).await;
                }
                Ok(Err(e)) => return (Err(e.to_string()), attempt),
                Err(_) => {
                    return (
                        Err(format!("timed out after {:.1}s", timeout.as_secs_f64())),
                        attempt,
                    )
                }
            }
        }
    }

    fn instance(&self, id: &InstanceId) -> &Arc<dyn Instance> {
        &self.instances[self.by_id[id]]
    }
}

#[derive(Debug, Clone)]
struct Tracked {
    progress: InstanceProgress,
    /// First error met during the rollout.
    error: Option<String>,
    /// `None`: not compensated; `Some(ok)`: compensation ran.
    compensated: Option<bool>,
    /// Moved back by an abort or a cancellation (not its own failure).
    rolled_back: bool,
    /// Every step of its rollout unit(s) completed.
    completed: bool,
}

struct Run<'a> {
    inner: &'a Inner,
    plan: &'a Plan,
    id: String,
    started: Instant,
    state: Mutex<BTreeMap<InstanceId, Tracked>>,
}

enum StepOk {
    Ok,
    Warning(String),
}

impl<'a> Run<'a> {
    fn new(inner: &'a Inner, plan: &'a Plan, id: String) -> Self {
        let state = plan
            .instances()
            .into_iter()
            .map(|i| {
                let previous = plan.previous.get(&i).cloned().flatten();
                (
                    i,
                    Tracked {
                        progress: InstanceProgress::untouched(previous),
                        error: None,
                        compensated: None,
                        rolled_back: false,
                        completed: false,
                    },
                )
            })
            .collect();
        Self {
            inner,
            plan,
            id,
            started: Instant::now(),
            state: Mutex::new(state),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn emit(&self, kind: EventKind) {
        match &kind {
            EventKind::InstanceFailed {
                instance,
                step,
                reason,
            } => {
                tracing::warn!(deployment = %self.id, %instance, step, reason, "instance failed")
            }
            EventKind::Warning { instance, message } => {
                tracing::warn!(deployment = %self.id, instance = ?instance, message, "warning")
            }
            other => tracing::debug!(deployment = %self.id, event = ?other),
        }
        if let Some(sink) = &self.inner.sink {
            sink.emit(&Event {
                elapsed_ms: self.elapsed_ms(),
                deployment: self.id.clone(),
                kind,
            });
        }
    }

    fn with<R>(&self, id: &InstanceId, f: impl FnOnce(&mut Tracked) -> R) -> R {
        let mut state = self.state.lock().expect("run state poisoned");
        f(state.get_mut(id).expect("plan instance tracked"))
    }

    fn failed_count(&self) -> usize {
        self.state
            .lock()
            .expect("run state poisoned")
            .values()
            .filter(|t| t.error.is_some())
            .count()
    }

    async fn execute(self) -> Report {
        self.emit(EventKind::DeploymentStarted {
            strategy: self.plan.strategy.clone(),
            release: self.plan.release.clone(),
            instances: self.plan.instances().len(),
            stages: self.plan.stages.len(),
        });
        let cancel = &self.inner.cancel;
        let mut abort: Option<String> = None;
        let total = self.plan.stages.len();
        for (si, stage) in self.plan.stages.iter().enumerate() {
            if cancel.is_cancelled() {
                abort = Some("cancelled by the operator".into());
                break;
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
            match self.plan.policy {
                FailurePolicy::RestoreInstance { max_failures } if failed > max_failures => {
                    abort = Some(format!(
                        "{failed} instance(s) failed, more than the failure budget of {max_failures}"
                    ));
                    break;
                }
                FailurePolicy::AbortAll if failed > 0 => {
                    abort = Some(format!(
                        "{failed} instance(s) failed under the {} strategy, which rolls back on any failure",
                        self.plan.strategy
                    ));
                    break;
                }
                _ => {}
            }
            if cancel.is_cancelled() {
                abort = Some("cancelled by the operator".into());
                break;
            }
        }
        if let Some(reason) = &abort {
            self.rollback(reason).await;
        }
        self.finish(abort)
    }

    /// Runs one unit of the rollout. On failure, records it and (under the
    /// restore policy) restores the instance at once.
    async fn run_unit(&self, si: usize, unit: &crate::plan::Unit) {
        let cancel = &self.inner.cancel;
        for (n, step) in unit.steps.iter().enumerate() {
            if cancel.is_cancelled() {
                if n == 0 || matches!(step, Step::Pause { .. }) {
                    // Nothing of this unit ran yet (or only waits are left).
                    return;
                }
                if let Some(id) = &unit.instance {
                    self.with(id, |t| t.rolled_back = true);
                    self.compensate(si, id).await;
                }
                return;
            }
            if let Err(reason) = self.exec_step(si, step, false).await {
                let Some(id) = &unit.instance else {
                    self.emit(EventKind::Warning {
                        instance: None,
                        message: format!("{} failed: {reason}", step.kind()),
                    });
                    return;
                };
                if cancel.is_cancelled() && reason == CANCELLED {
                    self.with(id, |t| t.rolled_back = true);
                } else {
                    let msg = format!("{} failed: {reason}", step.kind());
                    self.with(id, |t| {
                        t.error.get_or_insert(msg);
                    });
                    self.emit(EventKind::InstanceFailed {
                        instance: id.clone(),
                        step: step.kind().into(),
                        reason,
                    });
                }
                if matches!(self.plan.policy, FailurePolicy::RestoreInstance { .. }) || cancel.is_cancelled()
                {
                    self.compensate(si, id).await;
                }
                return;
            }
        }
        if let Some(id) = &unit.instance {
            self.with(id, |t| t.completed = true);
        }
    }

    /// Brings one instance back to its previous release, serving.
    async fn compensate(&self, si: usize, id: &InstanceId) -> bool {
        let progress = self.with(id, |t| t.progress.clone());
        let steps = compensation_steps(id, &progress, self.plan.health, self.plan.drain_timeout);
        for step in &steps {
            if let Err(reason) = self.exec_step(si, step, true).await {
                self.with(id, |t| t.compensated = Some(false));
                self.emit(EventKind::InstanceUnrecoverable {
                    instance: id.clone(),
                    reason: format!("{} failed while restoring: {reason}", step.kind()),
                });
                self.quarantine(id).await;
                return false;
            }
        }
        self.with(id, |t| t.compensated = Some(true));
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

    async fn rollback(&self, reason: &str) {
        let targets: Vec<InstanceId> = {
            let state = self.state.lock().expect("run state poisoned");
            state
                .iter()
                .filter(|(_, t)| {
                    t.compensated.is_none()
                        && (t.progress.release_changed || !t.progress.running || !t.progress.in_rotation)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        self.emit(EventKind::RollbackStarted {
            reason: reason.to_string(),
            instances: targets.clone(),
        });
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
            let results = join_all(ids.iter().map(|id| async move {
                let own_failure = self.with(id, |t| t.error.is_some());
                if !own_failure {
                    self.with(id, |t| t.rolled_back = true);
                }
                self.compensate(bi, id).await
            }))
            .await;
            self.emit(EventKind::StageFinished {
                stage: bi,
                name,
                rollback: true,
                duration_ms: ms(start.elapsed()),
                failed: results.iter().filter(|ok| !**ok).count(),
            });
        }
    }

    fn finish(&self, abort: Option<String>) -> Report {
        let state = self.state.lock().expect("run state poisoned").clone();
        let mut instances = Vec::new();
        for snap_id in self.fleet_order() {
            let previous = self.plan.previous.get(&snap_id).cloned().flatten();
            let Some(t) = state.get(&snap_id) else {
                let skipped = self.plan.skipped.contains(&snap_id);
                instances.push(InstanceReport {
                    release: if skipped {
                        Some(self.plan.release.clone())
                    } else {
                        previous.clone()
                    },
                    id: snap_id,
                    status: if skipped {
                        InstanceStatus::Skipped
                    } else {
                        InstanceStatus::Untouched
                    },
                    previous,
                    error: None,
                });
                continue;
            };
            let (status, release) = match t.compensated {
                Some(false) => (InstanceStatus::Unrecoverable, None),
                Some(true) if t.error.is_some() => (InstanceStatus::FailedRestored, previous.clone()),
                Some(true) => (InstanceStatus::RolledBack, previous.clone()),
                None if t.progress.release_changed && t.completed => {
                    (InstanceStatus::Updated, Some(self.plan.release.clone()))
                }
                None if !t.progress.release_changed && t.progress.running && t.progress.in_rotation => {
                    (InstanceStatus::Untouched, previous.clone())
                }
                // Only reachable if a unit stopped without failing; treat as
                // unknown rather than guess.
                None => (InstanceStatus::Unrecoverable, None),
            };
            instances.push(InstanceReport {
                id: snap_id,
                status,
                previous,
                release,
                error: t.error.clone(),
            });
        }
        let unrecoverable = instances
            .iter()
            .any(|i| i.status == InstanceStatus::Unrecoverable);
        let failed = instances
            .iter()
            .filter(|i| {
                matches!(
                    i.status,
                    InstanceStatus::FailedRestored | InstanceStatus::Unrecoverable
                )
            })
            .count();
        let (outcome, reason) = match (&abort, unrecoverable, failed) {
            (Some(r), true, _) => (
                OutcomeKind::RollbackFailed,
                Some(format!("{r}; some instances could not be restored")),
            ),
            (Some(r), false, _) => (OutcomeKind::RolledBack, Some(r.clone())),
            (None, true, _) => (
                OutcomeKind::RollbackFailed,
                Some("some failed instances could not be restored".into()),
            ),
            (None, false, 0) => (OutcomeKind::Succeeded, None),
            (None, false, n) => (
                OutcomeKind::Degraded,
                Some(format!(
                    "{n} instance(s) failed within the failure budget and stayed on their previous release"
                )),
            ),
        };
        let report = Report {
            deployment: self.id.clone(),
            strategy: self.plan.strategy.clone(),
            release: self.plan.release.clone(),
            outcome,
            reason: reason.clone(),
            instances,
            duration: self.started.elapsed(),
        };
        self.emit(EventKind::DeploymentFinished {
            outcome,
            succeeded: report.succeeded().len(),
            failed: report.failed().len(),
            duration_ms: ms(report.duration),
            reason,
        });
        report
    }

    /// Every instance of the plan's fleet in fleet order: those the plan
    /// touches, those it skipped, and the rest of the executor's fleet that
    /// the plan recorded.
    fn fleet_order(&self) -> Vec<InstanceId> {
        self.inner
            .instances
            .iter()
            .map(|i| i.backend().id.clone())
            .filter(|id| self.plan.previous.contains_key(id) || self.plan.skipped.contains(id))
            .collect()
    }

    /// Runs one step with events. `Err` carries the reason.
    async fn exec_step(&self, si: usize, step: &Step, rollback: bool) -> std::result::Result<(), String> {
        let instance = step.instance().cloned();
        self.emit(EventKind::StepStarted {
            stage: si,
            step: step.kind().into(),
            instance: instance.clone(),
            rollback,
        });
        let start = Instant::now();
        let (result, attempts) = self.do_step(step, rollback).await;
        let step_result = match &result {
            Ok(StepOk::Ok) => StepResult::Ok,
            Ok(StepOk::Warning(w)) => {
                self.emit(EventKind::Warning {
                    instance: instance.clone(),
                    message: w.clone(),
                });
                StepResult::Warning(w.clone())
            }
            Err(e) => StepResult::Failed(e.clone()),
        };
        self.emit(EventKind::StepFinished {
            stage: si,
            step: step.kind().into(),
            instance,
            rollback,
            duration_ms: ms(start.elapsed()),
            attempts,
            result: step_result,
        });
        result.map(|_| ())
    }

    /// Sleeps unless cancelled; `true` if it slept the whole time.
    async fn sleep(&self, d: Duration, cancellable: bool) -> bool {
        if !cancellable {
            tokio::time::sleep(d).await;
            return true;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.inner.cancel.cancelled() => false,
        }
    }

    async fn do_step(&self, step: &Step, rollback: bool) -> (std::result::Result<StepOk, String>, u32) {
        let inner = self.inner;
        let t = &inner.timeouts;
        let lb = &inner.lb;
        // Rollback steps are not cancellable: they restore safety.
        let cancellable = !rollback;
        match step {
            Step::Drain { instance } => {
                let b = inner.instance(instance).backend();
                let (r, n) = inner.call(t.load_balancer, || lb.drain(b)).await;
                if r.is_ok() {
                    self.with(instance, |s| s.progress.in_rotation = false);
                }
                (r.map(|_| StepOk::Ok), n)
            }
            Step::Disable { instance } => {
                let b = inner.instance(instance).backend();
                let (r, n) = inner.call(t.load_balancer, || lb.disable(b)).await;
                if r.is_ok() {
                    self.with(instance, |s| s.progress.in_rotation = false);
                }
                (r.map(|_| StepOk::Ok), n)
            }
            Step::Enable { instance } => {
                let b = inner.instance(instance).backend();
                let (r, n) = inner.call(t.load_balancer, || lb.enable(b)).await;
                if r.is_ok() {
                    self.with(instance, |s| s.progress.in_rotation = true);
                }
                (r.map(|_| StepOk::Ok), n)
            }
            Step::AwaitDrained { instance, timeout } => {
                (self.await_drained(instance, *timeout, cancellable).await, 1)
            }
            Step::Stop { instance } => {
                let i = inner.instance(instance);
                let (r, n) = inner.call(t.stop, || i.stop()).await;
                let r = match r {
                    Ok(()) => Ok(StepOk::Ok),
                    Err(graceful) => {
                        let (f, _) = inner.call(t.force_stop, || i.force_stop()).await;
                        match f {
                            Ok(()) => Ok(StepOk::Warning(format!(
                                "graceful stop failed ({graceful}); force-stopped"
                            ))),
                            Err(force) => Err(format!(
                                "graceful stop failed ({graceful}) and force-stop failed ({force})"
                            )),
                        }
                    }
                };
                if r.is_ok() {
                    self.with(instance, |s| s.progress.running = false);
                }
                (r, n)
            }
            Step::Install { instance, release } => {
                let i = inner.instance(instance);
                self.with(instance, |s| s.progress.release_changed = true);
                let (r, n) = inner.call(t.install, || i.install(release)).await;
                (r.map(|_| StepOk::Ok), n)
            }
            Step::Restore { instance, release } => {
                let i = inner.instance(instance);
                let (r, n) = inner.call(t.restore, || i.restore(release)).await;
                if r.is_ok() {
                    self.with(instance, |s| s.progress.release_changed = false);
                }
                (r.map(|_| StepOk::Ok), n)
            }
            Step::Start { instance } => {
                let i = inner.instance(instance);
                self.with(instance, |s| s.progress.running = true);
                let (r, n) = inner.call(t.start, || i.start()).await;
                (r.map(|_| StepOk::Ok), n)
            }
            Step::AwaitHealthy { instance, check } => {
                let i = inner.instance(instance);
                let retries = check.retries.max(1);
                let mut last = String::new();
                for probe in 1..=retries {
                    let (r, _) = inner.call(t.health_probe, || i.health()).await;
                    match r {
                        Ok(Health::Healthy) => return (Ok(StepOk::Ok), probe),
                        Ok(Health::Unhealthy(why)) => last = format!("unhealthy: {why}"),
                        Err(e) => last = format!("probe failed: {e}"),
                    }
                    if probe < retries && !self.sleep(check.interval, cancellable).await {
                        return (Err(CANCELLED.into()), probe);
                    }
                }
                (
                    Err(format!(
                        "not healthy after {retries} probe(s) {:.1}s apart; last: {last}",
                        check.interval.as_secs_f64()
                    )),
                    retries,
                )
            }
            Step::Pause { duration, .. } => {
                self.sleep(*duration, cancellable).await;
                (Ok(StepOk::Ok), 1)
            }
            Step::SetWeights { weights } => {
                let (r, n) = inner.call(t.load_balancer, || lb.set_weights(weights)).await;
                (r.map(|_| StepOk::Ok), n)
            }
            Step::SwitchTo { group } => {
                let (r, n) = inner.call(t.load_balancer, || lb.switch_to(group)).await;
                (r.map(|_| StepOk::Ok), n)
            }
        }
    }

    /// Polls connection counts until both the load balancer and the
    /// instance report 0 (a side that cannot tell is ignored; when neither
    /// can, the full timeout is waited), or the timeout passes (a warning).
    async fn await_drained(
        &self,
        id: &InstanceId,
        timeout: Duration,
        cancellable: bool,
    ) -> std::result::Result<StepOk, String> {
        let inner = self.inner;
        let i = inner.instance(id);
        let b = i.backend();
        let deadline = Instant::now() + timeout;
        loop {
            let (lb, _) = inner
                .call(inner.timeouts.query, || inner.lb.active_connections(b))
                .await;
            let (own, _) = inner.call(inner.timeouts.query, || i.active_connections()).await;
            let lb = lb.unwrap_or(None);
            let own = own.unwrap_or(None);
            let known: Vec<u64> = [lb, own].into_iter().flatten().collect();
            if !known.is_empty() && known.iter().all(|c| *c == 0) {
                return Ok(StepOk::Ok);
            }
            let now = Instant::now();
            if now >= deadline {
                let left = if known.is_empty() {
                    "connection count unknown".to_string()
                } else {
                    format!("{} connection(s) left", known.iter().max().copied().unwrap_or(0))
                };
                return Ok(StepOk::Warning(format!(
                    "drain timeout of {:.1}s reached ({left}); proceeding",
                    timeout.as_secs_f64()
                )));
            }
            let wait = inner.drain_poll.min(deadline - now);
            if !self.sleep(wait, cancellable).await {
                return Err(CANCELLED.into());
            }
        }
    }
}

const CANCELLED: &str = "cancelled";

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
