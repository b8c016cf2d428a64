//! The blue-green record: the steps that write which environment is live,
//! and the check that a plan switching away from an environment finds it
//! live. The only part of the executor that knows blue-green state.

use super::{done, Outcome, StepCtx};
pub(in crate::executor) use crate::bluegreen_state::LiveStore;
use crate::bluegreen_state::{expect_live, LiveRecord};
use crate::error::{Error, Result};
use crate::executor::error::Failure;
use crate::executor::Inner;
use crate::plan::{Plan, Step};

/// Runs [`Step::RecordSwitching`] or [`Step::RecordLive`].
pub(in crate::executor) async fn run(ctx: &StepCtx<'_>, step: &Step) -> Outcome {
    let inner = ctx.inner;
    let Some(store) = &inner.live_store else {
        return (Err(Failure::Missing("live-state store").into()), 1);
    };
    let record = match step {
        Step::RecordSwitching { from, to } => LiveRecord::switching(from.clone(), to.clone()),
        Step::RecordLive { group } => LiveRecord::live(group.clone()),
        other => unreachable!("{} is not a blue-green record step", other.kind()),
    };
    done(inner.call(inner.timeouts.query, || store.save(&record)).await)
}

/// A plan that records the live environment needs a store, and each switch
/// it records must start from the environment that is live.
///
/// # Errors
/// [`Error::InvalidInput`] (`live_store`) without a store;
/// [`Error::Inconsistent`] when the record or the load balancer says
/// another environment is live.
pub(in crate::executor) async fn check(inner: &Inner, plan: &Plan) -> Result<()> {
    let steps = || plan.stages.iter().flat_map(|s| &s.units).flat_map(|u| &u.steps);
    let records = steps().any(|s| matches!(s, Step::RecordLive { .. } | Step::RecordSwitching { .. }));
    let Some(store) = &inner.live_store else {
        if records {
            return Err(Error::invalid(
                "live_store",
                "the plan records the live environment but the executor has no live-state store; \
                 set one with ExecutorBuilder::live_store (e.g. a FileLiveStore)",
            ));
        }
        return Ok(());
    };
    for step in steps() {
        if let Step::RecordSwitching { from, .. } = step {
            expect_live(store.as_ref(), inner.lb.as_ref(), from).await?;
        }
    }
    Ok(())
}
