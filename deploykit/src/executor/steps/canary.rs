//! The canary gates: analysis of a stage and the wait for promotion. The
//! analyzer's state — inconclusive checks in a row, passes — lives here,
//! carried across the stages of one run.

use std::sync::Mutex;
use std::time::Duration;

use super::{Outcome, StepCtx, StepOk};
use crate::analysis::Analyzer;
use crate::error::{Error, Result};
use crate::executor::error::{Failure, StepError};
use crate::executor::Inner;
use crate::gate::{GateCtx, GateError};
use crate::plan::{Plan, Step};

/// What the canary gates of one run share.
#[derive(Debug, Default)]
pub(in crate::executor) struct CanaryState {
    analyzer: Mutex<Analyzer>,
}

/// Runs [`Step::Analyze`], [`Step::AwaitPromotion`] or [`Step::Experiment`].
pub(in crate::executor) async fn run(ctx: &StepCtx<'_>, state: &CanaryState, step: &Step) -> Outcome {
    let inner = ctx.inner;
    let Some(metrics) = &inner.metrics else {
        return (Err(Failure::Missing("metrics source").into()), 1);
    };
    let gate = GateCtx {
        metrics: metrics.as_ref(),
        query_timeout: inner.timeouts.query,
        cancel: ctx.cancel,
        analyzer: &state.analyzer,
        emit: ctx.emit,
    };
    let r = match step {
        Step::Analyze {
            stage,
            of,
            weight,
            duration,
            analysis,
        } => crate::gate::analyze(&gate, *stage, *of, *weight, *duration, analysis).await,
        Step::AwaitPromotion {
            stage,
            weight,
            timeout_ms,
            analysis,
        } => {
            let Some(handle) = &inner.promotion else {
                return (Err(Failure::Missing("promotion handle").into()), 1);
            };
            let timeout = timeout_ms.map(Duration::from_millis);
            crate::gate::await_promotion(&gate, handle, *stage, *weight, timeout, analysis).await
        }
        Step::Experiment {
            rules,
            duration,
            analysis,
        } => crate::gate::experiment(&gate, rules, *duration, analysis).await,
        other => unreachable!("{} is not a canary step", other.kind()),
    };
    let r = match r {
        Ok(()) => Ok(StepOk::Ok),
        Err(GateError::Cancelled) => Err(StepError::Cancelled),
        Err(e) => Err(Failure::Gate(e).into()),
    };
    (r, 1)
}

/// A plan with canary gates needs a metrics source, and one that waits for
/// promotion a promotion handle.
///
/// # Errors
/// [`Error::InvalidInput`] naming `metrics` or `promotion`.
pub(in crate::executor) fn check(inner: &Inner, plan: &Plan) -> Result<()> {
    let steps = || plan.stages.iter().flat_map(|s| &s.units).flat_map(|u| &u.steps);
    let analyses = steps().any(|s| {
        matches!(
            s,
            Step::Analyze { .. } | Step::AwaitPromotion { .. } | Step::Experiment { .. }
        )
    });
    if analyses && inner.metrics.is_none() {
        return Err(Error::invalid(
            "metrics",
            "the plan analyses canary metrics but the executor has no metrics source; \
             set one with ExecutorBuilder::metrics (e.g. a Prometheus source)",
        ));
    }
    let waits = steps().any(|s| matches!(s, Step::AwaitPromotion { .. }));
    if waits && inner.promotion.is_none() {
        return Err(Error::invalid(
            "promotion",
            "the plan waits for manual promotion but the executor has no promotion handle; \
             set one with ExecutorBuilder::promotion, or use automatic promotion",
        ));
    }
    Ok(())
}

/// Monitoring before deploy: the first canary gate's queries must answer
/// for the stable track before anything is touched.
///
/// # Errors
/// [`Error::Refused`] naming each query and what came back.
pub(in crate::executor) async fn monitoring(inner: &Inner, plan: &Plan) -> Result<()> {
    let first = plan
        .stages
        .iter()
        .flat_map(|s| &s.units)
        .flat_map(|u| &u.steps)
        .find_map(|s| match s {
            Step::Analyze { analysis, .. }
            | Step::AwaitPromotion { analysis, .. }
            | Step::Experiment { analysis, .. } => Some(analysis),
            _ => None,
        });
    let (Some(analysis), Some(metrics)) = (first, &inner.metrics) else {
        return Ok(());
    };
    if !analysis.rules.monitoring_check {
        return Ok(());
    }
    crate::monitoring::check_monitoring(
        metrics.as_ref(),
        &analysis.stable,
        &analysis.rules,
        analysis.interval,
        inner.timeouts.query,
    )
    .await
    .map_err(|e| Error::Refused(format!("{e}; nothing was touched")))
}
