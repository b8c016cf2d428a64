//! The one executor that runs any [`Plan`] against the core traits.
//!
//! It owns, in one place, what every strategy needs: per-call timeouts,
//! retries of transient errors, the event stream, the failure policy,
//! per-instance restore, abort and rollback, and cancellation.
//!
//! Layout: this module holds the builder and the public API ([`Executor::run`]
//! with [`RunOptions`] is the one way to run a plan); `run.rs` walks the
//! stages and owns the rollback; `steps/` holds one handler per kind of step,
//! each given only the context it needs; `report.rs` turns what the run
//! tracked into the [`Report`], as a pure function.
//!
//! # Cancellation
//!
//! Cancelling the [`CancellationToken`] given to the builder stops the
//! deployment at the next step boundary: waits (pauses, health-probe
//! intervals, drain waits) end at once, driver calls already under way are
//! allowed to finish (bounded by their timeouts), no new step starts, and
//! every instance already touched is rolled back. The rollback itself is not
//! cancellable: it is what leaves the fleet on one known version.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::chaos::FaultInjector;
use crate::error::{DriverError, Error, PreflightFailure, Result};
use crate::event::EventSink;
use crate::flags::FlagSwitch;
use crate::integration::GateRunner;
use crate::names::{InstanceId, ReleaseId};
use crate::plan::{FleetSnapshot, InstanceSnapshot, Plan, Step};
use crate::promotion::PromotionHandle;
use crate::report::Report;
use crate::smoke::SmokeTester;
use crate::traits::MetricsSource;
use crate::traits::{Instance, LoadBalancer, Strategy};

use self::error::StepError;
use self::steps::blue_green::LiveStore;

mod error;
mod report;
mod run;
mod steps;

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
    gates: Option<Arc<dyn GateRunner>>,
    flags: Option<Arc<dyn FlagSwitch>>,
    faults: Option<Arc<dyn FaultInjector>>,
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

    /// What runs [`Step::Gate`] (required by plans with that step).
    pub fn gate_runner(mut self, runner: Arc<dyn GateRunner>) -> Self {
        self.gates = Some(runner);
        self
    }

    /// What runs [`Step::FlagShare`] and [`Step::FlagKill`] (required by
    /// plans with those steps: a canary carrying a feature flag).
    pub fn flag_switch(mut self, flags: Arc<dyn FlagSwitch>) -> Self {
        self.flags = Some(flags);
        self
    }

    /// What injects the network faults of a canary's chaos entries
    /// (required by plans with such faults; process faults go to
    /// [`Instance::signal`]).
    pub fn fault_injector(mut self, faults: Arc<dyn FaultInjector>) -> Self {
        self.faults = Some(faults);
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
                gates: self.gates,
                flags: self.flags,
                faults: self.faults,
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

pub(crate) struct Inner {
    pub(crate) instances: Vec<Arc<dyn Instance>>,
    pub(crate) by_id: HashMap<InstanceId, usize>,
    pub(crate) lb: Arc<dyn LoadBalancer>,
    pub(crate) sink: Option<Arc<dyn EventSink>>,
    pub(crate) cancel: CancellationToken,
    pub(crate) timeouts: Timeouts,
    pub(crate) retry: Retry,
    pub(crate) drain_poll: Duration,
    pub(crate) smoke: Option<Arc<dyn SmokeTester>>,
    pub(crate) live_store: Option<Arc<dyn LiveStore>>,
    pub(crate) metrics: Option<Arc<dyn MetricsSource>>,
    pub(crate) promotion: Option<PromotionHandle>,
    pub(crate) gates: Option<Arc<dyn GateRunner>>,
    pub(crate) flags: Option<Arc<dyn FlagSwitch>>,
    pub(crate) faults: Option<Arc<dyn FaultInjector>>,
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

    /// The metrics source, if one was set (what a drill's preflight asks).
    pub fn metrics(&self) -> Option<&Arc<dyn MetricsSource>> {
        self.inner.metrics.as_ref()
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
                source: e.into_driver_error(),
            })
        });
        let instances = join_all(reads).await.into_iter().collect::<Result<Vec<_>>>()?;
        Ok(FleetSnapshot { instances })
    }

    /// Reads the fleet, plans with `strategy` and runs the plan with
    /// [`RunOptions::default`].
    ///
    /// # Errors
    /// As [`snapshot`](Self::snapshot), [`Strategy::plan`] and
    /// [`run`](Self::run): only when the deployment could not start. Once it
    /// starts, failures are in the [`Report`].
    pub async fn deploy(&self, strategy: &dyn Strategy, release: &ReleaseId) -> Result<Report> {
        let snapshot = self.snapshot().await?;
        let plan = strategy.plan(&snapshot, release)?;
        self.run(&plan, RunOptions::default()).await
    }

    /// Runs `plan`: makes every check of [`check`](Self::check), then runs
    /// the stages, rolling back on abort. The id and what a failed
    /// load-balancer preflight does come from `options`.
    ///
    /// # Errors
    /// As [`check`](Self::check): only when the run could not start, and
    /// then nothing was touched. Once it starts, failures are in the
    /// [`Report`].
    pub async fn run(&self, plan: &Plan, options: RunOptions) -> Result<Report> {
        let prepared = self.prepare(plan, options.preflight, true).await?;
        let id = options.id.unwrap_or_else(|| run_id(&plan.release));
        Ok(run::Run::new(&self.inner, plan, id, prepared, &options.unsettled)
            .execute()
            .await)
    }

    /// Every check [`run`](Self::run) makes before its first step — the plan
    /// against this executor, the live-state record, and the load
    /// balancer's [`preflight`](LoadBalancer::preflight) — without running
    /// anything: for a caller that records the start of a deployment (a
    /// journal, a notification) only once it can start. `run` checks again.
    /// With [`Preflight::Warn`] only a balancer that reads nothing the
    /// driver writes ([`PreflightFailure::NotWired`]) refuses; the run calls
    /// the preflight again and warns of any other failure.
    ///
    /// # Errors
    /// * [`Error::InvalidInput`] (field `plan`) when the plan names an
    ///   instance this executor does not have, (`plan.rollback_batch`) for a
    ///   rollback batch of 0; (`live_store`, `metrics`, `promotion`,
    ///   `smoke_tester`, `gate_runner`) when the plan needs one and the
    ///   executor has none.
    /// * [`Error::Routing`] when a step applies a routing policy the load
    ///   balancer cannot ([`Plan::check_routing`]).
    /// * [`Error::Inconsistent`] when it switches away from an environment
    ///   that the record or the load balancer says is not live.
    /// * [`Error::Refused`] when the plan touches the load balancer and its
    ///   preflight check fails under [`Preflight::Enforce`], or finds it
    ///   [`NotWired`](PreflightFailure::NotWired) under either (transient
    ///   errors retried with backoff, each attempt bounded by the
    ///   load-balancer timeout).
    pub async fn check(&self, plan: &Plan, options: &RunOptions) -> Result<()> {
        self.prepare(plan, options.preflight, true).await.map(|_| ())
    }

    /// The checks before a run; `call_preflight` false skips the load
    /// balancer's.
    async fn prepare(&self, plan: &Plan, preflight: Preflight, call_preflight: bool) -> Result<Prepared> {
        self.check_instances(plan)?;
        if plan.rollback_batch == 0 {
            return Err(Error::invalid("plan.rollback_batch", "must be at least 1"));
        }
        steps::blue_green::check(&self.inner, plan).await?;
        let smoke = steps::instance::smoke_tester(&self.inner, plan)?;
        steps::canary::check(&self.inner, plan)?;
        steps::gate::check(&self.inner, plan)?;
        steps::flag::check(&self.inner, plan)?;
        steps::traffic::check_routing(&self.inner, plan)?;
        // Only a deployment checks its monitoring; a rollback or recovery
        // must not be held back by a metrics outage.
        if call_preflight && preflight == Preflight::Enforce {
            steps::canary::monitoring(&self.inner, plan).await?;
        }
        let preflight_warning = if call_preflight && steps::traffic::touches_lb(plan) {
            self.preflight(plan, preflight).await?
        } else {
            None
        };
        Ok(Prepared {
            smoke,
            preflight_warning,
        })
    }

    /// Every instance the plan names is one of this executor's.
    fn check_instances(&self, plan: &Plan) -> Result<()> {
        for unit in plan.stages.iter().flat_map(|s| &s.units) {
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
        // An abort restores the moved instances: each must be driven here.
        if let Some(i) = plan.moved.iter().find(|i| !self.inner.by_id.contains_key(*i)) {
            return Err(Error::invalid(
                "plan",
                format!("its moved instance {i} is not in this executor's fleet"),
            ));
        }
        Ok(())
    }

    /// Calls the load balancer's preflight, then its policy check for each
    /// policy the plan applies: a failure refuses the run
    /// ([`Preflight::Enforce`]) or is the warning returned.
    async fn preflight(&self, plan: &Plan, preflight: Preflight) -> Result<Option<String>> {
        let lb = &self.inner.lb;
        let (mut r, _) = self
            .inner
            .call(self.inner.timeouts.load_balancer, || lb.preflight())
            .await;
        if r.is_ok() {
            for policy in steps::traffic::policies(plan) {
                (r, _) = self
                    .inner
                    .call(self.inner.timeouts.load_balancer, || lb.preflight_policy(policy))
                    .await;
                if r.is_err() {
                    break;
                }
            }
        }
        let Err(e) = r else { return Ok(None) };
        let not_wired =
            matches!(&e, StepError::Driver(d) if d.preflight_failure() == Some(PreflightFailure::NotWired));
        if not_wired {
            return Err(Error::Refused(format!(
                "the {} load balancer failed its preflight check, so nothing was touched (not even by a \
                 rollback: the balancer does not read what deploykit would change): {e}",
                lb.name()
            )));
        }
        match preflight {
            Preflight::Enforce => Err(Error::Refused(format!(
                "the {} load balancer failed its preflight check, so nothing was touched: {e}",
                lb.name()
            ))),
            Preflight::Warn => Ok(Some(format!(
                "the {} load balancer failed its preflight check; going on because this run \
                 restores a previous state: {e}",
                lb.name()
            ))),
        }
    }
}

/// A new deployment id: the time in milliseconds since the Unix epoch, then
/// the release (its first 100 characters), e.g. `1700000000000-v2`. Ids of
/// one application sort by start time; the CLI names its journals by them.
pub fn run_id(release: &ReleaseId) -> String {
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let r: String = release.as_str().chars().take(100).collect();
    format!("{millis}-{r}")
}

/// How [`Executor::run`] and [`Executor::check`] treat one run.
///
/// ```
/// use deploykit::{Preflight, RunOptions};
///
/// let deploy = RunOptions::default();
/// assert_eq!(deploy.preflight, Preflight::Enforce);
/// let undo = RunOptions::recovery().with_id("1700000000000-v1-undo");
/// assert_eq!(undo.preflight, Preflight::Warn);
/// assert_eq!(undo.id.as_deref(), Some("1700000000000-v1-undo"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RunOptions {
    /// The deployment id in events and the report; `None` makes one with
    /// [`run_id`].
    pub id: Option<String>,
    /// What a failed load-balancer preflight does.
    pub preflight: Preflight,
    /// Instances an interrupted run left part-way (see
    /// [`Recorded::unsettled`](crate::recovery::Recorded::unsettled)): this
    /// run assumes anything may have been done to them (drained, stopped,
    /// the new release installed), so restoring one after a failure drains,
    /// stops, restores its previous release and probes it, instead of only
    /// re-enabling it.
    pub unsettled: BTreeSet<InstanceId>,
}

impl RunOptions {
    /// For a run that returns the fleet to a previous state — a rollback:
    /// a failed load-balancer preflight does not refuse it
    /// ([`Preflight::Warn`]).
    pub fn recovery() -> Self {
        Self {
            id: None,
            preflight: Preflight::Warn,
            unsettled: BTreeSet::new(),
        }
    }

    /// Marks `instances` as left part-way by an interrupted run (see
    /// [`unsettled`](Self::unsettled)).
    pub fn with_unsettled(mut self, instances: impl IntoIterator<Item = InstanceId>) -> Self {
        self.unsettled = instances.into_iter().collect();
        self
    }

    /// Names the run `id`.
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Sets what a failed preflight does.
    pub fn with_preflight(mut self, preflight: Preflight) -> Self {
        self.preflight = preflight;
        self
    }
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
    /// handled as any failure. The exception is a balancer that does not
    /// read what the driver writes ([`PreflightFailure::NotWired`]): every
    /// traffic step would write a file nothing reads, so that refuses here
    /// too.
    Warn,
}

impl Inner {
    /// Calls `f` with a timeout, retrying transient errors; also returns
    /// the attempts made.
    /// A retry is logged (a warning with the cause); see
    /// [`call_noting`](Self::call_noting) to also tell the event sink.
    async fn call<T, F, Fut>(&self, timeout: Duration, f: F) -> (std::result::Result<T, StepError>, u32)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = std::result::Result<T, DriverError>>,
    {
        let log = |r: &Retrying<'_>| {
            tracing::warn!(
                attempt = r.attempt,
                of = r.of,
                wait_ms = ms(r.wait),
                cause = %r.cause,
                "transient failure; retrying"
            );
        };
        self.call_noting(timeout, f, &log).await
    }

    /// Like [`call`](Self::call), handing each retry to `note` (before the
    /// backoff) instead of logging it, so no retry goes unnoticed.
    async fn call_noting<T, F, Fut>(
        &self,
        timeout: Duration,
        f: F,
        note: &(dyn Fn(&Retrying<'_>) + Send + Sync),
    ) -> (std::result::Result<T, StepError>, u32)
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
                    let wait = self
                        .retry
                        .backoff
                        .saturating_mul(2u32.saturating_pow(attempt - 1));
                    note(&Retrying {
                        attempt,
                        of: self.retry.attempts,
                        wait,
                        cause: &e,
                    });
                    tokio::time::sleep(wait).await;
                }
                Ok(Err(e)) => return (Err(StepError::Driver(e)), attempt),
                Err(_) => return (Err(StepError::TimedOut(timeout)), attempt),
            }
        }
    }

    fn instance(&self, id: &InstanceId) -> &Arc<dyn Instance> {
        &self.instances[self.by_id[id]]
    }
}

/// A transient failure about to be retried.
#[derive(Debug)]
pub(crate) struct Retrying<'a> {
    /// The attempt that failed, 1-based.
    pub(crate) attempt: u32,
    /// Attempts allowed in all.
    pub(crate) of: u32,
    /// The backoff before the next attempt.
    pub(crate) wait: Duration,
    /// Why the attempt failed.
    pub(crate) cause: &'a DriverError,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
