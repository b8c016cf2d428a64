//! Steps on traffic as a whole: pauses, weights, switches, routing
//! policies, warm-up.

use futures::StreamExt;

use super::{done, Outcome, StepCtx, StepOk};
use crate::event::EventKind;
use crate::executor::error::{Failure, StepError};
use crate::names::Group;
use crate::plan::{Plan, Step};
use crate::wait::sleep;

/// Warm-up requests in flight at once.
const WARM_UP_CONCURRENCY: usize = 8;

/// Runs a pause, a weight change, a switch, a routing policy or a warm-up.
pub(in crate::executor) async fn run(ctx: &StepCtx<'_>, step: &Step) -> Outcome {
    let inner = ctx.inner;
    let lb = &inner.lb;
    match step {
        Step::Pause { duration, .. } => {
            // A cancelled pause ends early; the next step boundary sees the
            // cancellation.
            sleep(*duration, ctx.cancel).await;
            (Ok(StepOk::Ok), 1)
        }
        Step::SetWeights { weights } => done(
            inner
                .call(inner.timeouts.load_balancer, || lb.set_weights(weights))
                .await,
        ),
        Step::SwitchTo { group } => done(
            inner
                .call(inner.timeouts.load_balancer, || lb.switch_to(group))
                .await,
        ),
        Step::ApplyPolicy { policy } => done(
            inner
                .call(inner.timeouts.load_balancer, || lb.apply_policy(policy))
                .await,
        ),
        Step::WarmUp {
            group,
            requests,
            path,
        } => (warm_up(ctx, group, *requests, path).await, 1),
        other => unreachable!("{} is not a traffic step", other.kind()),
    }
}

/// Whether running `plan` changes the load balancer (so its preflight
/// matters).
pub(in crate::executor) fn touches_lb(plan: &Plan) -> bool {
    plan.stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .any(|s| {
            matches!(
                s,
                Step::Drain { .. }
                    | Step::Disable { .. }
                    | Step::Enable { .. }
                    | Step::SetWeights { .. }
                    | Step::SwitchTo { .. }
                    | Step::ApplyPolicy { .. }
            )
        })
}

/// Each distinct routing policy `plan` applies, in its stages and on abort,
/// in order of first appearance.
pub(in crate::executor) fn policies(plan: &Plan) -> Vec<&crate::routing::TrafficPolicy> {
    let steps = plan
        .stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .chain(plan.on_abort.iter().map(|a| &a.step));
    let mut out: Vec<&crate::routing::TrafficPolicy> = Vec::new();
    for step in steps {
        if let Step::ApplyPolicy { policy } = step {
            if !out.contains(&policy) {
                out.push(policy);
            }
        }
    }
    out
}

/// Every routing policy of `plan` is one the load balancer can apply.
///
/// # Errors
/// [`Error::Routing`](crate::Error::Routing), see
/// [`Plan::check_routing`].
pub(in crate::executor) fn check_routing(inner: &crate::executor::Inner, plan: &Plan) -> crate::Result<()> {
    plan.check_routing(inner.lb.name(), &inner.lb.capabilities())
}

/// Sends `total` warm-up requests to the instances of `group`, spread
/// evenly, a few at a time; failures are counted, not fatal.
async fn warm_up(ctx: &StepCtx<'_>, group: &Group, total: u32, path: &str) -> Result<StepOk, StepError> {
    let Some(tester) = ctx.smoke else {
        return Err(Failure::Missing("smoke tester").into());
    };
    let backends: Vec<_> = ctx
        .inner
        .instances
        .iter()
        .map(|i| i.backend())
        .filter(|b| &b.group == group)
        .collect();
    if backends.is_empty() {
        return Err(Failure::NothingToWarm(group.clone()).into());
    }
    if total == 0 {
        return Ok(StepOk::Ok);
    }
    let bound = ctx.inner.timeouts.health_probe;
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
        let next = match ctx.cancel {
            Some(c) => tokio::select! {
                n = answers.next() => n,
                _ = c.cancelled() => return Err(StepError::Cancelled),
            },
            None => answers.next().await,
        };
        let Some(ok) = next else { break };
        sent += 1;
        if !ok {
            failed += 1;
        }
        if sent % every == 0 || sent == total {
            (ctx.emit)(EventKind::WarmUpProgress {
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
