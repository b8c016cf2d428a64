//! Steps on one instance: rotation, stop/install/start, health, drain,
//! smoke checks, the release backup.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use super::{done, Outcome, StepCtx, StepOk};
use crate::error::{DriverError, Result};
use crate::event::EventKind;
use crate::executor::error::{Failure, Probe, StepError};
use crate::executor::{Inner, Retrying};
use crate::names::{Group, InstanceId};
use crate::plan::{HealthCheck, InstanceProgress, Plan, Step};
use crate::smoke::{SmokeCheck, SmokeTester};
use crate::traits::Health;
use crate::wait::{poll_until, Bound, WaitError};

/// Runs a step on an instance (every kind not handled elsewhere).
pub(in crate::executor) async fn run(ctx: &StepCtx<'_>, step: &Step) -> Outcome {
    let inner = ctx.inner;
    let t = &inner.timeouts;
    let lb = &inner.lb;
    match step {
        Step::Drain { instance } => {
            let b = inner.instance(instance).backend();
            done(call_step(ctx, step, t.load_balancer, || lb.drain(b)).await)
        }
        Step::Disable { instance } => {
            let b = inner.instance(instance).backend();
            done(call_step(ctx, step, t.load_balancer, || lb.disable(b)).await)
        }
        Step::Enable { instance } => {
            let b = inner.instance(instance).backend();
            done(call_step(ctx, step, t.load_balancer, || lb.enable(b)).await)
        }
        Step::AwaitDrained { instance, timeout } => await_drained(ctx, instance, *timeout).await,
        Step::Stop { instance } => stop(ctx, instance).await,
        Step::Install { instance, release } => {
            let i = inner.instance(instance);
            done(call_step(ctx, step, t.install, || i.install(release)).await)
        }
        Step::Restore { instance, release } => {
            let i = inner.instance(instance);
            done(call_step(ctx, step, t.restore, || i.restore(release)).await)
        }
        Step::Start { instance } => {
            let i = inner.instance(instance);
            done(call_step(ctx, step, t.start, || i.start()).await)
        }
        Step::AwaitHealthy { instance, check } => await_healthy(ctx, instance, *check).await,
        Step::AwaitHealthyWithin {
            instance,
            deadline,
            interval,
        } => await_healthy_within(ctx, instance, *deadline, *interval).await,
        Step::SmokeTest { instance, checks } => (smoke_test(ctx, instance, checks).await, 1),
        Step::BackupRelease { group } => (backup_release(ctx, group).await, 1),
        other => unreachable!("{} is not an instance step", other.kind()),
    }
}

/// Whether starting `step` tells anything about its instance
/// ([`mark_started`]), so other steps skip the lookup.
pub(in crate::executor) fn marks_on_start(step: &Step) -> bool {
    matches!(step, Step::Install { .. } | Step::Start { .. })
}

/// Whether a `step` that succeeded tells anything about its instance
/// ([`mark_done`]).
pub(in crate::executor) fn marks_on_done(step: &Step) -> bool {
    matches!(
        step,
        Step::Drain { .. }
            | Step::Disable { .. }
            | Step::Enable { .. }
            | Step::Stop { .. }
            | Step::Restore { .. }
    )
}

/// Calls a driver for `step` as [`Inner::call`] does, and tells of every
/// retry: a warning event (which the executor also logs) naming the step,
/// the instance, the attempt and the cause — a retried step costs seconds
/// of backoff, and an operator should see why.
async fn call_step<T, F, Fut>(
    ctx: &StepCtx<'_>,
    step: &Step,
    timeout: Duration,
    f: F,
) -> (std::result::Result<T, StepError>, u32)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, DriverError>>,
{
    let note = |r: &Retrying<'_>| {
        let on = step.instance().map(|i| format!(" of {i}")).unwrap_or_default();
        (ctx.emit)(EventKind::Warning {
            instance: step.instance().cloned(),
            message: format!(
                "{}{on}: attempt {} of {} failed ({}); retrying in {:.1}s",
                step.kind(),
                r.attempt,
                r.of,
                r.cause,
                r.wait.as_secs_f64()
            ),
        });
    };
    ctx.inner.call_noting(timeout, f, &note).await
}

/// What starting `step` tells about its instance: an attempted install may
/// have changed the release, an attempted start may have started it.
pub(in crate::executor) fn mark_started(step: &Step, p: &mut InstanceProgress) {
    match step {
        Step::Install { .. } => p.release_changed = true,
        Step::Start { .. } => p.running = true,
        _ => {}
    }
}

/// What a `step` that succeeded tells about its instance.
pub(in crate::executor) fn mark_done(step: &Step, p: &mut InstanceProgress) {
    match step {
        Step::Drain { .. } | Step::Disable { .. } => p.in_rotation = false,
        Step::Enable { .. } => p.in_rotation = true,
        Step::Stop { .. } => p.running = false,
        Step::Restore { .. } => p.release_changed = false,
        _ => {}
    }
}

/// The smoke tester a plan needs: the executor's, else the default one
/// (`None` when the plan has no smoke checks or warm-up).
///
/// # Errors
/// [`Error::InvalidInput`](crate::Error::InvalidInput) (`smoke_tester`) when the plan needs one and
/// deploykit was built without the `http` feature.
pub(in crate::executor) fn smoke_tester(inner: &Inner, plan: &Plan) -> Result<Option<Arc<dyn SmokeTester>>> {
    let needs = plan
        .stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .any(|s| matches!(s, Step::SmokeTest { .. } | Step::WarmUp { .. }));
    Ok(match (&inner.smoke, needs) {
        (Some(t), _) => Some(t.clone()),
        (None, false) => None,
        (None, true) => Some(default_smoke_tester()?),
    })
}

#[cfg(feature = "http")]
fn default_smoke_tester() -> Result<Arc<dyn SmokeTester>> {
    Ok(Arc::new(crate::smoke::HttpSmokeTester::new()?))
}

#[cfg(not(feature = "http"))]
fn default_smoke_tester() -> Result<Arc<dyn SmokeTester>> {
    Err(crate::error::Error::invalid(
        "smoke_tester",
        "the plan has smoke checks or a warm-up, but deploykit was built without the `http` feature; \
         enable it or set ExecutorBuilder::smoke_tester",
    ))
}

/// Stops gracefully; force-stops when that fails (a warning) or both fail.
async fn stop(ctx: &StepCtx<'_>, instance: &InstanceId) -> Outcome {
    let inner = ctx.inner;
    let i = inner.instance(instance);
    let step = Step::Stop {
        instance: instance.clone(),
    };
    let (r, n) = call_step(ctx, &step, inner.timeouts.stop, || i.stop()).await;
    let Err(graceful) = r else {
        return (Ok(StepOk::Ok), n);
    };
    let (f, _) = inner.call(inner.timeouts.force_stop, || i.force_stop()).await;
    let r = match f {
        Ok(()) => Ok(StepOk::Warning(format!(
            "graceful stop failed ({graceful}); force-stopped"
        ))),
        Err(force) => Err(Failure::StopFailed {
            graceful: Box::new(graceful),
            force: Box::new(force),
        }
        .into()),
    };
    (r, n)
}

/// Probes up to `check.retries` times, `check.interval` apart.
async fn await_healthy(ctx: &StepCtx<'_>, instance: &InstanceId, check: HealthCheck) -> Outcome {
    let inner = ctx.inner;
    let i = inner.instance(instance);
    let retries = check.retries.max(1);
    let step = Step::AwaitHealthy {
        instance: instance.clone(),
        check,
    };
    let step = &step;
    let probe = || async move {
        match call_step(ctx, step, inner.timeouts.health_probe, || i.health())
            .await
            .0
        {
            Ok(Health::Healthy) => ControlFlow::Break(()),
            Ok(Health::Unhealthy(why)) => ControlFlow::Continue(Probe::Unhealthy(why)),
            Err(e) => ControlFlow::Continue(Probe::Failed(Box::new(e))),
        }
    };
    match poll_until(Bound::Probes(retries), check.interval, ctx.cancel, probe).await {
        Ok(w) => (Ok(StepOk::Ok), w.probes),
        Err(WaitError::Cancelled { probes }) => (Err(StepError::Cancelled), probes),
        Err(WaitError::Exhausted { probes, last }) => (
            Err(Failure::Unhealthy {
                probes,
                interval: check.interval,
                last,
            }
            .into()),
            probes,
        ),
    }
}

/// Probes every `interval` until healthy; fails once `deadline` passed.
/// Each probe is bounded by the probe timeout and by what is left.
async fn await_healthy_within(
    ctx: &StepCtx<'_>,
    instance: &InstanceId,
    deadline: Duration,
    interval: Duration,
) -> Outcome {
    let inner = ctx.inner;
    let i = inner.instance(instance);
    let bound = Bound::after(deadline);
    let Bound::Deadline(until) = bound else {
        unreachable!("Bound::after is a deadline")
    };
    let probe = || async {
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        let limit = inner
            .timeouts
            .health_probe
            .min(left)
            .max(Duration::from_millis(1));
        match tokio::time::timeout(limit, i.health()).await {
            Ok(Ok(Health::Healthy)) => ControlFlow::Break(()),
            Ok(Ok(Health::Unhealthy(why))) => ControlFlow::Continue(Probe::Unhealthy(why)),
            Ok(Err(e)) => ControlFlow::Continue(Probe::Failed(Box::new(StepError::Driver(e)))),
            Err(_) => ControlFlow::Continue(Probe::TimedOut(limit)),
        }
    };
    let interval = interval.max(Duration::from_millis(1));
    match poll_until(bound, interval, ctx.cancel, probe).await {
        Ok(w) => (Ok(StepOk::Ok), w.probes),
        Err(WaitError::Cancelled { probes }) => (Err(StepError::Cancelled), probes),
        Err(WaitError::Exhausted { probes, last }) => (
            Err(Failure::NotHealthyWithin {
                deadline,
                probes,
                last,
            }
            .into()),
            probes,
        ),
    }
}

/// Polls connection counts until both the load balancer and the instance
/// report 0 (a side that cannot tell is ignored; when neither can, the full
/// timeout is waited), or the timeout passes (a warning).
async fn await_drained(ctx: &StepCtx<'_>, instance: &InstanceId, timeout: Duration) -> Outcome {
    let inner = ctx.inner;
    let i = inner.instance(instance);
    let b = i.backend();
    let probe = || async {
        let (lb, _) = inner
            .call(inner.timeouts.query, || inner.lb.active_connections(b))
            .await;
        let (own, _) = inner.call(inner.timeouts.query, || i.active_connections()).await;
        let known: Vec<u64> = [lb.unwrap_or(None), own.unwrap_or(None)]
            .into_iter()
            .flatten()
            .collect();
        if !known.is_empty() && known.iter().all(|c| *c == 0) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(known)
        }
    };
    let r = match poll_until(Bound::after(timeout), inner.drain_poll, ctx.cancel, probe).await {
        Ok(_) => Ok(StepOk::Ok),
        Err(WaitError::Cancelled { .. }) => Err(StepError::Cancelled),
        Err(WaitError::Exhausted { last, .. }) => {
            let left = match last.iter().max() {
                None => "connection count unknown".to_string(),
                Some(n) => format!("{n} connection(s) left"),
            };
            Ok(StepOk::Warning(format!(
                "drain timeout of {:.1}s reached ({left}); proceeding",
                timeout.as_secs_f64()
            )))
        }
    };
    (r, 1)
}

/// Runs the checks in order; the first failing one fails the step.
async fn smoke_test(
    ctx: &StepCtx<'_>,
    instance: &InstanceId,
    checks: &[SmokeCheck],
) -> Result<StepOk, StepError> {
    let Some(tester) = ctx.smoke else {
        return Err(Failure::Missing("smoke tester").into());
    };
    let b = ctx.inner.instance(instance).backend();
    for check in checks {
        let why = match tokio::time::timeout(check.timeout, tester.check(b, check)).await {
            Ok(Ok(())) => continue,
            Ok(Err(why)) => why,
            Err(_) => format!("no answer within {:.1}s", check.timeout.as_secs_f64()),
        };
        return Err(Failure::Smoke {
            check: check.describe(),
            instance: instance.clone(),
            address: b.address.to_string(),
            why,
        }
        .into());
    }
    Ok(StepOk::Ok)
}

/// Reads the release of every instance of `group` and emits it as the
/// backup a rollback returns to.
async fn backup_release(ctx: &StepCtx<'_>, group: &Group) -> Result<StepOk, StepError> {
    let inner = ctx.inner;
    let members = inner.instances.iter().filter(|i| &i.backend().group == group);
    let reads = members.map(|i| async move {
        let (r, _) = inner.call(inner.timeouts.query, || i.current_release()).await;
        r.map(|release| (i.backend().id.clone(), release))
            .map_err(|e| Failure::Backup {
                instance: i.backend().id.clone(),
                source: Box::new(e),
            })
    });
    let releases = join_all(reads)
        .await
        .into_iter()
        .collect::<std::result::Result<_, _>>()?;
    (ctx.emit)(EventKind::ReleaseBackedUp {
        group: group.clone(),
        releases,
    });
    Ok(StepOk::Ok)
}
