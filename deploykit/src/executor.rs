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

use crate::analysis::Analyzer;
use crate::bluegreen_state::{LiveRecord, LiveStore};
use crate::error::{DriverError, Error, Result};
use crate::event::{Event, EventKind, EventSink, StepResult};
use crate::gate::{GateCtx, GateError};
use crate::names::{Group, InstanceId, ReleaseId};
use crate::plan::{
    compensation_steps, retirement_steps, FailurePolicy, FleetSnapshot, InstanceProgress, InstanceSnapshot,
    Plan, Step,
};
use crate::promotion::PromotionHandle;
use crate::report::{InstanceReport, InstanceStatus, OutcomeKind, Report};
use crate::smoke::SmokeTester;
use crate::traits::MetricsSource;
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
    smoke: Option<Arc<dyn SmokeTester>>,
    live_store: Option<Arc<dyn LiveStore>>,
    metrics: Option<Arc<dyn MetricsSource>>,
    promotion: Option<PromotionHandle>,
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

    /// What runs [`Step::SmokeTest`] and [`Step::WarmUp`]. Default: an
    /// [`HttpSmokeTester`](crate::HttpSmokeTester) (feature `http`), created
    /// when a plan first needs it.
    pub fn smoke_tester(mut self, tester: Arc<dyn SmokeTester>) -> Self {
        self.smoke = Some(tester);
        self
    }

    /// Where [`Step::RecordSwitching`] and [`Step::RecordLive`] record the
    /// live blue-green environment (required by plans with those steps).
    pub fn live_store(mut self, store: Arc<dyn LiveStore>) -> Self {
        self.live_store = Some(store);
        self
    }

    /// Where [`Step::Analyze`] and [`Step::AwaitPromotion`] read canary
    /// metrics (required by plans with those steps).
    pub fn metrics(mut self, metrics: Arc<dyn MetricsSource>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The handle that promotes a canary waiting in
    /// [`Step::AwaitPromotion`] (required by plans with that step). Its
    /// [`abort`](PromotionHandle::abort) cancels the deployment like the
    /// cancellation token.
    pub fn promotion(mut self, handle: PromotionHandle) -> Self {
        self.promotion = Some(handle);
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
        let cancel = self.cancel.unwrap_or_default();
        if let Some(handle) = &self.promotion {
            handle.attach(cancel.clone());
        }
        Ok(Executor {
            inner: Arc::new(Inner {
                instances: self.instances,
                by_id,
                lb,
                sink: self.sink,
                cancel,
                timeouts: self.timeouts,
                retry: self.retry,
                drain_poll,
                smoke: self.smoke,
                live_store: self.live_store,
                metrics: self.metrics,
                promotion: self.promotion,
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
    smoke: Option<Arc<dyn SmokeTester>>,
    live_store: Option<Arc<dyn LiveStore>>,
    metrics: Option<Arc<dyn MetricsSource>>,
    promotion: Option<PromotionHandle>,
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

    /// The load balancer.
    pub fn load_balancer(&self) -> &Arc<dyn LoadBalancer> {
        &self.inner.lb
    }

    /// The live-state store, if one was set.
    pub fn live_store(&self) -> Option<&Arc<dyn LiveStore>> {
        self.inner.live_store.as_ref()
    }

    /// The fleet, in the order given to the builder.
    pub fn instances(&self) -> &[Arc<dyn Instance>] {
        &self.inner.instances
    }

    /// The per-call timeouts.
    pub fn timeouts(&self) -> &Timeouts {
        &self.inner.timeouts
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
        self.run_with_id(plan, &run_id(plan)).await
    }

    /// Runs a plan that returns the fleet to a previous state — a rollback
    /// — with a generated id: as [`run`](Self::run), except that a failed
    /// load-balancer preflight does not refuse it ([`Preflight::Warn`]).
    ///
    /// # Errors
    /// See [`run_with`](Self::run_with).
    pub async fn run_recovery(&self, plan: &Plan) -> Result<Report> {
        self.run_with(plan, &run_id(plan), Preflight::Warn).await
    }

    /// Runs `plan`, naming the deployment `id` in events and the report.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `plan`) when the plan names an
    /// instance this executor does not have, or a rollback batch of 0;
    /// (field `live_store`) when it records the live blue-green environment
    /// and no store is set. [`Error::Inconsistent`] when it switches away
    /// from an environment that the record or the load balancer says is not
    /// live. [`Error::Refused`] when the plan touches the load balancer and
    /// its [`LoadBalancer::preflight`] check fails (transient errors
    /// retried with backoff, each attempt bounded by the load-balancer
    /// timeout). Nothing is touched then.
    pub async fn run_with_id(&self, plan: &Plan, id: &str) -> Result<Report> {
        self.run_with(plan, id, Preflight::Enforce).await
    }

    /// Runs `plan` as `id`, with `preflight` deciding what a failed
    /// [`LoadBalancer::preflight`] does.
    ///
    /// # Errors
    /// As [`run_with_id`](Self::run_with_id); with [`Preflight::Warn`] never
    /// [`Error::Refused`] for a failed preflight.
    pub async fn run_with(&self, plan: &Plan, id: &str, preflight: Preflight) -> Result<Report> {
        let prepared = self.prepare(plan, preflight, true).await?;
        let mut run = Run::new(&self.inner, plan, id.to_string());
        run.smoke = prepared.smoke;
        run.preflight_warning = prepared.preflight_warning;
        Ok(run.execute().await)
    }

    /// Every check [`run_with_id`](Self::run_with_id) makes before its first
    /// step — the plan against this executor, the live-state record, and
    /// the load balancer's [`preflight`](LoadBalancer::preflight) — without
    /// running anything: for a caller that records the start of a
    /// deployment (a journal, a notification) only once it can start.
    /// `run_with_id` checks again.
    ///
    /// # Errors
    /// As [`run_with_id`](Self::run_with_id) before its first step. Nothing
    /// is touched.
    pub async fn check(&self, plan: &Plan) -> Result<()> {
        self.check_with(plan, Preflight::Enforce).await
    }

    /// [`check`](Self::check) with `preflight` deciding what a failed
    /// load-balancer preflight does. With [`Preflight::Warn`] it could not
    /// refuse, so it is not called (the run calls it, and warns).
    ///
    /// # Errors
    /// As [`check`](Self::check).
    pub async fn check_with(&self, plan: &Plan, preflight: Preflight) -> Result<()> {
        // With Warn a failed preflight cannot refuse: the run itself calls
        // it (and warns), so a check does not call it twice.
        let call = preflight == Preflight::Enforce;
        self.prepare(plan, preflight, call).await.map(|_| ())
    }

    /// The checks before a run; `call_preflight` false skips the load
    /// balancer's.
    async fn prepare(&self, plan: &Plan, preflight: Preflight, call_preflight: bool) -> Result<Prepared> {
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
        let steps = || plan.stages.iter().flat_map(|s| &s.units).flat_map(|u| &u.steps);
        let needs_store =
            steps().any(|s| matches!(s, Step::RecordLive { .. } | Step::RecordSwitching { .. }));
        if needs_store && self.inner.live_store.is_none() {
            return Err(Error::invalid(
                "live_store",
                "the plan records the live environment but the executor has no live-state store; \
                 set one with ExecutorBuilder::live_store (e.g. a FileLiveStore)",
            ));
        }
        if let Some(store) = &self.inner.live_store {
            for step in steps() {
                if let Step::RecordSwitching { from, .. } = step {
                    crate::bluegreen_state::expect_live(store.as_ref(), self.inner.lb.as_ref(), from).await?;
                }
            }
        }
        let needs_smoke = steps().any(|s| matches!(s, Step::SmokeTest { .. } | Step::WarmUp { .. }));
        let smoke = match (&self.inner.smoke, needs_smoke) {
            (Some(t), _) => Some(t.clone()),
            (None, false) => None,
            (None, true) => Some(default_smoke_tester()?),
        };
        let analyses = steps().any(|s| matches!(s, Step::Analyze { .. } | Step::AwaitPromotion { .. }));
        if analyses && self.inner.metrics.is_none() {
            return Err(Error::invalid(
                "metrics",
                "the plan analyses canary metrics but the executor has no metrics source; \
                 set one with ExecutorBuilder::metrics (e.g. a Prometheus source)",
            ));
        }
        let waits = steps().any(|s| matches!(s, Step::AwaitPromotion { .. }));
        if waits && self.inner.promotion.is_none() {
            return Err(Error::invalid(
                "promotion",
                "the plan waits for manual promotion but the executor has no promotion handle; \
                 set one with ExecutorBuilder::promotion, or use automatic promotion",
            ));
        }
        let touches_lb = steps().any(|s| {
            matches!(
                s,
                Step::Drain { .. }
                    | Step::Disable { .. }
                    | Step::Enable { .. }
                    | Step::SetWeights { .. }
                    | Step::SwitchTo { .. }
            )
        });
        let mut preflight_warning = None;
        if touches_lb && call_preflight {
            let lb = &self.inner.lb;
            let (r, _) = self
                .inner
                .call(self.inner.timeouts.load_balancer, || lb.preflight())
                .await;
            if let Err(e) = r {
                match preflight {
                    Preflight::Enforce => {
                        return Err(Error::Refused(format!(
                            "the {} load balancer failed its preflight check, so nothing was touched: {e}",
                            lb.name()
                        )))
                    }
                    Preflight::Warn => {
                        preflight_warning = Some(format!(
                            "the {} load balancer failed its preflight check; going on because this run \
                             restores a previous state: {e}",
                            lb.name()
                        ))
                    }
                }
            }
        }
        Ok(Prepared {
            smoke,
            preflight_warning,
        })
    }
}

/// A generated run id: the release and the time in milliseconds.
fn run_id(plan: &Plan) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!("{}-{millis}", plan.release)
}

/// What the checks before a run hand to it.
struct Prepared {
    smoke: Option<Arc<dyn SmokeTester>>,
    preflight_warning: Option<String>,
}

/// What a failed [`LoadBalancer::preflight`] does to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preflight {
    /// Refuse the run with [`Error::Refused`], touching nothing: for
    /// deployments, which should not start against a load balancer that
    /// cannot be driven.
    #[default]
    Enforce,
    /// Run anyway; the failure is the run's first `warning` event, right
    /// after `deployment_started`. For rollbacks: refusing one would leave
    /// the fleet as mixed as it is, and its own steps may still succeed (the
    /// nginx driver rewrites a deleted include file; a server HAProxy lacks
    /// may be one the rollback never touches). A step that does fail is
    /// handled as any failure.
    Warn,
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
    smoke: Option<Arc<dyn SmokeTester>>,
    switch: Mutex<SwitchState>,
    /// The first failure of a unit that works on no instance (a switch, a
    /// warm-up, a record); it aborts unless the policy restores instances.
    plan_failure: Mutex<Option<String>>,
    /// The canary analysis, carried across stages.
    analyzer: Mutex<Analyzer>,
    /// A failed load-balancer preflight the run goes on despite
    /// ([`Preflight::Warn`]).
    preflight_warning: Option<String>,
}

/// What the run knows about a blue-green switch.
#[derive(Debug, Default)]
struct SwitchState {
    /// The environment to switch back to on abort.
    back_to: Option<Group>,
    /// A [`Step::SwitchTo`] was attempted (it may have taken effect).
    attempted: bool,
    /// Switching back (or recording it) failed during the rollback.
    restore_failed: Option<String>,
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
            smoke: None,
            switch: Mutex::new(SwitchState::default()),
            plan_failure: Mutex::new(None),
            analyzer: Mutex::new(Analyzer::default()),
            preflight_warning: None,
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
                tracing::warn!(deployment = %self.id, %instance, %step, reason, "instance failed")
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
                FailurePolicy::AbortAll | FailurePolicy::BlueGreen if failed > 0 => {
                    abort = Some(format!(
                        "{failed} instance(s) failed under the {} strategy, which rolls back on any failure",
                        self.plan.strategy
                    ));
                    break;
                }
                _ => {}
            }
            // A cancellation also fails the step it interrupts (a gate, a
            // warm-up): name the cause, not the symptom.
            if cancel.is_cancelled() {
                abort = Some("cancelled by the operator".into());
                break;
            }
            let plan_failure = self.plan_failure.lock().expect("run state poisoned").clone();
            if let Some(reason) = plan_failure {
                if !matches!(self.plan.policy, FailurePolicy::RestoreInstance { .. }) {
                    abort = Some(reason);
                    break;
                }
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
                    let message = format!("{step} failed: {reason}");
                    self.emit(EventKind::Warning {
                        instance: None,
                        message: message.clone(),
                    });
                    self.plan_failure
                        .lock()
                        .expect("run state poisoned")
                        .get_or_insert(message);
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
                        step: step.kind(),
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
        let steps = match self.plan.policy {
            _ if self.plan.leave_stopped.contains(id) => {
                retirement_steps(id, &progress, self.plan.drain_timeout)
            }
            FailurePolicy::BlueGreen => idle_compensation_steps(id, &progress),
            _ => compensation_steps(id, &progress, self.plan.health, self.plan.drain_timeout),
        };
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
                .filter(|(id, t)| {
                    t.compensated.is_none()
                        && (t.progress.release_changed
                            || !t.progress.running
                            || !t.progress.in_rotation
                            || self.plan.leave_stopped.contains(id)
                            // Blue-green: every instance of the plan is in
                            // the idle environment, which an abort stops.
                            || self.plan.policy == FailurePolicy::BlueGreen)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        self.emit(EventKind::RollbackStarted {
            reason: reason.to_string(),
            instances: targets.clone(),
        });
        if self.plan.policy == FailurePolicy::BlueGreen {
            self.switch_back().await;
        }
        // What the plan says undoes it beyond single instances (e.g. all
        // traffic back to stable), before any instance is touched; best
        // effort: the instances are restored either way.
        for step in &self.plan.on_abort {
            if let Err(why) = self.exec_step(0, step, true).await {
                self.emit(EventKind::Warning {
                    instance: None,
                    message: format!("{step} failed during the rollback: {why}"),
                });
            }
        }
        let batch = match self.plan.policy {
            FailurePolicy::AbortAll | FailurePolicy::BlueGreen => targets.len().max(1),
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
                // Instances the plan leaves stopped (canary instances):
                // stopped, on their previous release after a rollback, on
                // the new one after a finished deployment.
                Some(true) if self.plan.leave_stopped.contains(&snap_id) => {
                    (InstanceStatus::Idle, previous.clone())
                }
                None if self.plan.leave_stopped.contains(&snap_id) && t.completed && !t.progress.running => (
                    InstanceStatus::Idle,
                    if t.progress.release_changed {
                        Some(self.plan.release.clone())
                    } else {
                        previous.clone()
                    },
                ),
                Some(true) if t.error.is_some() => (InstanceStatus::FailedRestored, previous.clone()),
                Some(true) => (InstanceStatus::RolledBack, previous.clone()),
                None if t.progress.release_changed && t.completed => {
                    (InstanceStatus::Updated, Some(self.plan.release.clone()))
                }
                None if !t.progress.release_changed && t.progress.running && t.progress.in_rotation => {
                    (InstanceStatus::Untouched, previous.clone())
                }
                // A unit that completed without changing the release but
                // left the instance stopped: the retired blue-green
                // environment.
                None if !t.progress.release_changed && t.completed => {
                    (InstanceStatus::Idle, previous.clone())
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
        let switch_back_failed = self
            .switch
            .lock()
            .expect("run state poisoned")
            .restore_failed
            .clone();
        let unrecoverable = instances
            .iter()
            .any(|i| i.status == InstanceStatus::Unrecoverable)
            || switch_back_failed.is_some();
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
                Some(match &switch_back_failed {
                    Some(s) => format!("{r}; {s}"),
                    None => format!("{r}; some instances could not be restored"),
                }),
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
            strategy: self.plan.strategy,
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
            step: step.kind(),
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
            step: step.kind(),
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
            Step::Analyze {
                stage,
                of,
                weight,
                duration,
                analysis,
            } => {
                let Some(metrics) = &inner.metrics else {
                    return (Err("no metrics source is set".into()), 1);
                };
                let emit = |k: EventKind| self.emit(k);
                let ctx = GateCtx {
                    metrics: metrics.as_ref(),
                    query_timeout: t.query,
                    cancel: cancellable.then_some(&inner.cancel),
                    analyzer: &self.analyzer,
                    emit: &emit,
                };
                let r = crate::gate::analyze(&ctx, *stage, *of, *weight, *duration, analysis).await;
                (gate_result(r), 1)
            }
            Step::AwaitPromotion {
                stage,
                weight,
                timeout_ms,
                analysis,
            } => {
                let (Some(metrics), Some(handle)) = (&inner.metrics, &inner.promotion) else {
                    return (Err("no metrics source or promotion handle is set".into()), 1);
                };
                let emit = |k: EventKind| self.emit(k);
                let ctx = GateCtx {
                    metrics: metrics.as_ref(),
                    query_timeout: t.query,
                    cancel: cancellable.then_some(&inner.cancel),
                    analyzer: &self.analyzer,
                    emit: &emit,
                };
                let timeout = timeout_ms.map(Duration::from_millis);
                let r = crate::gate::await_promotion(&ctx, handle, *stage, *weight, timeout, analysis).await;
                (gate_result(r), 1)
            }
            Step::BackupRelease { group } => {
                let members = inner.instances.iter().filter(|i| &i.backend().group == group);
                let reads = members.map(|i| async move {
                    let (r, _) = inner.call(t.query, || i.current_release()).await;
                    r.map(|release| (i.backend().id.clone(), release))
                        .map_err(|e| format!("could not read the release of {}: {e}", i.backend().id))
                });
                match join_all(reads)
                    .await
                    .into_iter()
                    .collect::<std::result::Result<_, _>>()
                {
                    Ok(releases) => {
                        self.emit(EventKind::ReleaseBackedUp {
                            group: group.clone(),
                            releases,
                        });
                        (Ok(StepOk::Ok), 1)
                    }
                    Err(e) => (Err(e), 1),
                }
            }
            Step::SwitchTo { group } => {
                if self.plan.policy == FailurePolicy::BlueGreen && !rollback {
                    let known = self.switch.lock().expect("run state poisoned").back_to.is_some();
                    if !known {
                        // No RecordSwitching said what is live: ask the
                        // load balancer, so an abort can switch back.
                        let (live, _) = inner.call(t.query, || lb.live_group()).await;
                        self.switch.lock().expect("run state poisoned").back_to = live.ok().flatten();
                    }
                    self.switch.lock().expect("run state poisoned").attempted = true;
                }
                let (r, n) = inner.call(t.load_balancer, || lb.switch_to(group)).await;
                (r.map(|_| StepOk::Ok), n)
            }
            Step::AwaitHealthyWithin {
                instance,
                deadline,
                interval,
            } => {
                self.await_healthy_within(instance, *deadline, *interval, cancellable)
                    .await
            }
            Step::SmokeTest { instance, checks } => {
                let Some(tester) = &self.smoke else {
                    return (Err("no smoke tester is set".into()), 1);
                };
                let b = inner.instance(instance).backend();
                for check in checks {
                    let why = match tokio::time::timeout(check.timeout, tester.check(b, check)).await {
                        Ok(Ok(())) => continue,
                        Ok(Err(why)) => why,
                        Err(_) => format!("no answer within {:.1}s", check.timeout.as_secs_f64()),
                    };
                    return (
                        Err(format!(
                            "smoke check {} failed on {instance} ({}): {why}",
                            check.describe(),
                            b.address
                        )),
                        1,
                    );
                }
                (Ok(StepOk::Ok), 1)
            }
            Step::WarmUp {
                group,
                requests,
                path,
            } => (self.warm_up(group, *requests, path, cancellable).await, 1),
            Step::RecordSwitching { from, to } => {
                let Some(store) = &inner.live_store else {
                    return (Err("no live-state store is set".into()), 1);
                };
                let record = LiveRecord::switching(from.clone(), to.clone());
                let (r, n) = inner.call(t.query, || store.save(&record)).await;
                if r.is_ok() && !rollback {
                    self.switch.lock().expect("run state poisoned").back_to = Some(from.clone());
                }
                (r.map(|_| StepOk::Ok), n)
            }
            Step::RecordLive { group } => {
                let Some(store) = &inner.live_store else {
                    return (Err("no live-state store is set".into()), 1);
                };
                let record = LiveRecord::live(group.clone());
                let (r, n) = inner.call(t.query, || store.save(&record)).await;
                (r.map(|_| StepOk::Ok), n)
            }
        }
    }

    /// Probes every `interval` until healthy; fails once `deadline` passed.
    async fn await_healthy_within(
        &self,
        id: &InstanceId,
        deadline: Duration,
        interval: Duration,
        cancellable: bool,
    ) -> (std::result::Result<StepOk, String>, u32) {
        let i = self.inner.instance(id);
        let until = Instant::now() + deadline;
        let interval = interval.max(Duration::from_millis(1));
        let mut probes = 0;
        let mut last;
        loop {
            probes += 1;
            let left = until.saturating_duration_since(Instant::now());
            let bound = self
                .inner
                .timeouts
                .health_probe
                .min(left)
                .max(Duration::from_millis(1));
            match tokio::time::timeout(bound, i.health()).await {
                Ok(Ok(Health::Healthy)) => return (Ok(StepOk::Ok), probes),
                Ok(Ok(Health::Unhealthy(why))) => last = format!("unhealthy: {why}"),
                Ok(Err(e)) => last = format!("probe failed: {e}"),
                Err(_) => last = format!("probe timed out after {:.1}s", bound.as_secs_f64()),
            }
            let now = Instant::now();
            if now >= until {
                break;
            }
            if !self.sleep(interval.min(until - now), cancellable).await {
                return (Err(CANCELLED.into()), probes);
            }
        }
        (
            Err(format!(
                "not healthy within the deadline of {:.1}s ({probes} probe(s)); last: {last}",
                deadline.as_secs_f64()
            )),
            probes,
        )
    }

    /// Sends `total` warm-up requests to the instances of `group`, spread
    /// evenly, a few at a time; failures are counted.
    async fn warm_up(
        &self,
        group: &Group,
        total: u32,
        path: &str,
        cancellable: bool,
    ) -> std::result::Result<StepOk, String> {
        use futures::StreamExt;
        let Some(tester) = &self.smoke else {
            return Err("no smoke tester is set".into());
        };
        let backends: Vec<_> = self
            .inner
            .instances
            .iter()
            .map(|i| i.backend())
            .filter(|b| &b.group == group)
            .collect();
        if backends.is_empty() {
            return Err(format!("the group {group} has no instances to warm up"));
        }
        if total == 0 {
            return Ok(StepOk::Ok);
        }
        let bound = self.inner.timeouts.health_probe;
        let mut answers = futures::stream::iter(0..total)
            .map(|k| {
                let b = backends[k as usize % backends.len()];
                async move {
                    matches!(
                        tokio::time::timeout(bound, tester.warm(b, path)).await,
                        Ok(Ok(()))
                    )
                }
            })
            .buffer_unordered(WARM_UP_CONCURRENCY);
        let every = (total / 10).max(1);
        let (mut sent, mut failed) = (0u32, 0u32);
        loop {
            let next = if cancellable {
                tokio::select! {
                    n = answers.next() => n,
                    _ = self.inner.cancel.cancelled() => return Err(CANCELLED.into()),
                }
            } else {
                answers.next().await
            };
            let Some(ok) = next else { break };
            sent += 1;
            if !ok {
                failed += 1;
            }
            if sent % every == 0 || sent == total {
                self.emit(EventKind::WarmUpProgress {
                    group: group.clone(),
                    sent,
                    total,
                    failed,
                });
            }
        }
        if failed > 0 {
            Ok(StepOk::Warning(format!(
                "warm-up of {group}: {failed} of {total} request(s) failed (counted, not fatal)"
            )))
        } else {
            Ok(StepOk::Ok)
        }
    }

    /// Blue-green abort: if a switch was attempted, sends traffic back to
    /// the environment live before it and records that. A failed switch
    /// back makes the outcome a failed rollback; a failed record is a
    /// warning (the record still shows the pending switch, which
    /// reconciliation resolves from the load balancer).
    async fn switch_back(&self) {
        let (attempted, back_to) = {
            let s = self.switch.lock().expect("run state poisoned");
            (s.attempted, s.back_to.clone())
        };
        if !attempted {
            return;
        }
        let Some(group) = back_to else {
            self.switch.lock().expect("run state poisoned").restore_failed = Some(
                "a switch was attempted and the environment live before it is unknown, so traffic could not be switched back".into(),
            );
            return;
        };
        if let Err(e) = self
            .exec_step(0, &Step::SwitchTo { group: group.clone() }, true)
            .await
        {
            self.switch.lock().expect("run state poisoned").restore_failed =
                Some(format!("switching traffic back to {group} failed: {e}"));
            return;
        }
        if self.inner.live_store.is_some() {
            if let Err(e) = self
                .exec_step(0, &Step::RecordLive { group: group.clone() }, true)
                .await
            {
                self.emit(EventKind::Warning {
                    instance: None,
                    message: format!(
                        "traffic is back on {group}, but recording it failed ({e}); \
                         the next start reconciles the record with the load balancer"
                    ),
                });
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

fn gate_result(r: std::result::Result<(), GateError>) -> std::result::Result<StepOk, String> {
    match r {
        Ok(()) => Ok(StepOk::Ok),
        Err(GateError::Cancelled) => Err(CANCELLED.into()),
        Err(GateError::Failed(why)) => Err(why),
    }
}

/// Warm-up requests in flight at once.
const WARM_UP_CONCURRENCY: usize = 8;

/// Blue-green compensation of an idle-environment instance: stop it (it
/// never had live traffic) and return it to its previous release; never
/// put it into rotation.
fn idle_compensation_steps(id: &InstanceId, progress: &InstanceProgress) -> Vec<Step> {
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

#[cfg(feature = "http")]
fn default_smoke_tester() -> Result<Arc<dyn SmokeTester>> {
    Ok(Arc::new(crate::smoke::HttpSmokeTester::new()?))
}

#[cfg(not(feature = "http"))]
fn default_smoke_tester() -> Result<Arc<dyn SmokeTester>> {
    Err(Error::invalid(
        "smoke_tester",
        "the plan has smoke checks or a warm-up, but deploykit was built without the `http` feature; \
         enable it or set ExecutorBuilder::smoke_tester",
    ))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;
