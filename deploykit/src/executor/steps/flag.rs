//! [`Step::FlagShare`] and [`Step::FlagKill`]: a canary's feature flag,
//! through the executor's [`FlagSwitch`](crate::flags::FlagSwitch).

use super::{Outcome, StepCtx, StepOk};
use crate::error::{Error, Result};
use crate::executor::error::{Failure, StepError};
use crate::executor::Inner;
use crate::plan::{Plan, Step};

/// Runs a flag step once: the switch's write is validated and atomic, so a
/// retry could only repeat a refusal.
pub(in crate::executor) async fn run(ctx: &StepCtx<'_>, step: &Step) -> Outcome {
    let Some(switch) = &ctx.inner.flags else {
        return (Err(Failure::Missing("flag switch").into()), 1);
    };
    let (flag, r) = match step {
        Step::FlagShare {
            flag,
            variant,
            percent,
        } => (flag, switch.share(flag, variant, *percent, ctx.run).await),
        Step::FlagKill { flag } => (
            flag,
            switch
                .kill(flag, ctx.run, "the deployment carrying it rolled back")
                .await,
        ),
        other => unreachable!("{} is not a flag step", other.kind()),
    };
    let r = r.map(|()| StepOk::Ok).map_err(|source| {
        StepError::from(Failure::Flag {
            flag: flag.clone(),
            source,
        })
    });
    (r, 1)
}

/// A plan that changes feature flags needs a flag switch.
///
/// # Errors
/// [`Error::InvalidInput`] naming `flag_switch` when there is none, or
/// `flag` when the switch refuses a flag the plan rolls out.
pub(in crate::executor) fn check(inner: &Inner, plan: &Plan) -> Result<()> {
    let steps = || {
        plan.stages
            .iter()
            .flat_map(|s| &s.units)
            .flat_map(|u| &u.steps)
            .chain(plan.on_abort.iter().map(|a| &a.step))
    };
    let flagged = steps().any(|s| matches!(s, Step::FlagShare { .. } | Step::FlagKill { .. }));
    let Some(switch) = &inner.flags else {
        if flagged {
            return Err(Error::invalid(
                "flag_switch",
                "the plan changes a feature flag but the executor has no flag switch; \
                 set one with ExecutorBuilder::flag_switch",
            ));
        }
        return Ok(());
    };
    // Only a rollout checks: a rollback's kill must run whatever the file
    // says (it reports its own failure).
    for step in steps() {
        if let Step::FlagShare { flag, variant, .. } = step {
            switch
                .check(flag, variant)
                .map_err(|e| Error::invalid("flag", format!("the canary's feature flag {flag}: {e}")))?;
        }
    }
    Ok(())
}
