//! [`Step::Gate`]: an integration-test gate against instances that get no
//! live traffic yet, through the executor's
//! [`GateRunner`](crate::integration::GateRunner).

use super::{Outcome, StepCtx, StepOk};
use crate::error::{Error, Result};
use crate::executor::error::{Failure, StepError};
use crate::executor::Inner;
use crate::plan::{Plan, Step};
use crate::traits::Backend;

/// Runs [`Step::Gate`]: once, never retried (a test suite decides its own
/// retries); cancelling drops the runner's future, which stops the check.
pub(in crate::executor) async fn run(ctx: &StepCtx<'_>, step: &Step) -> Outcome {
    let Step::Gate { name, group, release } = step else {
        unreachable!("{} is not a gate step", step.kind())
    };
    let Some(runner) = &ctx.inner.gates else {
        return (Err(Failure::Missing("gate runner").into()), 1);
    };
    let targets: Vec<Backend> = ctx
        .inner
        .instances
        .iter()
        .map(|i| i.backend().clone())
        .filter(|b| &b.group == group)
        .collect();
    if targets.is_empty() {
        let f = Failure::NothingToGate {
            name: name.clone(),
            group: group.clone(),
        };
        return (Err(f.into()), 1);
    }
    let gate = runner.run(name, release, &targets);
    let r = match ctx.cancel {
        Some(c) => tokio::select! {
            r = gate => r,
            () = c.cancelled() => return (Err(StepError::Cancelled), 1),
        },
        None => gate.await,
    };
    let r = r.map(|()| StepOk::Ok).map_err(|source| {
        Failure::IntegrationGate {
            name: name.clone(),
            group: group.clone(),
            source,
        }
        .into()
    });
    (r, 1)
}

/// A plan with gates needs a gate runner.
///
/// # Errors
/// [`Error::InvalidInput`] naming `gate_runner`.
pub(in crate::executor) fn check(inner: &Inner, plan: &Plan) -> Result<()> {
    let gated = plan
        .stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .any(|s| matches!(s, Step::Gate { .. }));
    if gated && inner.gates.is_none() {
        return Err(Error::invalid(
            "gate_runner",
            "the plan runs integration-test gates but the executor has no gate runner; \
             set one with ExecutorBuilder::gate_runner",
        ));
    }
    Ok(())
}
