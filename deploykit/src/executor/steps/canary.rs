//! The canary gates: analysis of a stage and the wait for promotion. The
//! analyzer's state — inconclusive checks in a row, passes — lives here,
//! carried across the stages of one run.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;

use super::{Outcome, StepCtx, StepOk};
use crate::analysis::{Analysis, Analyzer};
use crate::chaos::{ChaosStep, Fault, ProcessSignal};
use crate::error::{DriverError, Error, Result};
use crate::event::EventKind;
use crate::executor::error::{Failure, StepError};
use crate::executor::Inner;
use crate::gate::{ExperimentEnd, GateCtx, GateError};
use std::ops::ControlFlow;

use tokio::time::Instant;

use crate::plan::{Plan, RampDown, Step};
use crate::traits::{probe_once, Instance};
use crate::wait::every;

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
            chaos,
            ramp_down,
        } => {
            let analyze = crate::gate::analyze(&gate, *stage, *of, *weight, *duration, analysis);
            let analyze = with_health_watch(ctx, analysis, *stage, *weight, analyze);
            match (with_chaos(ctx, *stage, chaos, analyze).await, ramp_down) {
                (Err(e), Some(down)) if e.is_mild(down.critical) => {
                    Err(step_down(ctx, &gate, (*stage, *of, *weight), analysis, down, e).await)
                }
                (r, _) => r,
            }
        }
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
            // A journal that batches its records (etcd) would otherwise
            // hold the announcement until the next step; a failure to write
            // it surfaces at that step, as for any record.
            let announced = async {
                if let Some(sink) = &inner.sink {
                    let _ = sink.durable().await;
                }
            };
            let wait =
                crate::gate::await_promotion(&gate, handle, *stage, *weight, timeout, analysis, announced);
            with_health_watch(ctx, analysis, *stage, *weight, wait).await
        }
        Step::Experiment {
            rules,
            duration,
            analysis,
            ran_for,
            treatments,
        } if !treatments.is_empty() => {
            crate::gate::experiment_variants(&gate, rules, *duration, *ran_for, analysis, treatments)
                .await
                .map(|_| ())
        }
        Step::Experiment {
            rules,
            duration,
            analysis,
            ran_for,
            ..
        } => match crate::gate::experiment(&gate, rules, *duration, *ran_for, analysis).await {
            Ok(ExperimentEnd::Won) => Ok(()),
            // Promoting without a difference is the operator's choice, but
            // it must stand out from a win in the journal and the output.
            Ok(ExperimentEnd::PromotedWithoutDifference(why)) => return (Ok(StepOk::Warning(why)), 1),
            Err(e) => Err(e),
        },
        other => unreachable!("{} is not a canary step", other.kind()),
    };
    let r = match r {
        Ok(()) => Ok(StepOk::Ok),
        Err(GateError::Cancelled) => Err(StepError::Cancelled),
        Err(e) => Err(Failure::Gate(e).into()),
    };
    (r, 1)
}

/// Runs a canary gate while, with a
/// [`HealthWatch`](crate::analysis::HealthWatch) in its rules, the canary
/// instances are probed every `interval`: one that fails `failures` probes
/// in a row ends the gate at once with [`GateError::Unhealthy`], so the
/// rollback does not wait for the metrics to run dry.
async fn with_health_watch(
    ctx: &StepCtx<'_>,
    analysis: &Analysis,
    stage: usize,
    weight: u8,
    gate: impl Future<Output = Result<(), GateError>>,
) -> Result<(), GateError> {
    let Some(watch) = analysis.rules.health_watch else {
        return gate.await;
    };
    let targets: Vec<Arc<dyn Instance>> = ctx
        .inner
        .instances
        .iter()
        .filter(|i| i.backend().group == analysis.canary)
        .cloned()
        .collect();
    if targets.is_empty() {
        return gate.await;
    }
    let bound = ctx.inner.timeouts.health_probe;
    let watching = async {
        let mut failed = vec![0_u32; targets.len()];
        let mut tick = tokio::time::interval(watch.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let probes = join_all(targets.iter().map(|t| probe_once(t.as_ref(), bound))).await;
            for ((t, n), p) in targets.iter().zip(failed.iter_mut()).zip(probes) {
                let Err(detail) = p else {
                    *n = 0;
                    continue;
                };
                *n += 1;
                if *n >= watch.failures {
                    (ctx.emit)(EventKind::CanaryUnhealthy {
                        stage,
                        weight,
                        instance: t.backend().id.clone(),
                        failures: *n,
                        detail: detail.clone(),
                    });
                    return GateError::Unhealthy {
                        instance: t.backend().id.clone(),
                        failures: *n,
                        every: watch.interval,
                        stage,
                        weight,
                        detail,
                    };
                }
            }
        }
    };
    tokio::select! {
        r = gate => r,
        e = watching => Err(e),
    }
}

/// Steps the canary's share down after `breach` (a failed check under the
/// critical ratio), holding each step while the analysis checks; a
/// critical check, monitoring lost, an abort or a weight change that fails
/// ends it early. Returns the error the rollback reports: the breach and
/// how the way down went. The rollback then takes the rest of the traffic.
async fn step_down(
    ctx: &StepCtx<'_>,
    gate: &GateCtx<'_>,
    (stage, of, weight): (usize, usize, u8),
    analysis: &crate::analysis::Analysis,
    down: &RampDown,
    breach: GateError,
) -> GateError {
    let inner = ctx.inner;
    let mut at = weight;
    for step in &down.steps {
        let (set, _) = inner
            .call(inner.timeouts.load_balancer, || {
                inner.lb.set_weights(&step.weights)
            })
            .await;
        if let Err(e) = set {
            return GateError::Rollback(format!(
                "{breach}; ramp-down stopped at {at}% (setting {}%: {e}), traffic cut at once",
                step.percent
            ));
        }
        at = step.percent;
        (ctx.emit)(EventKind::RampingDown {
            stage,
            weight: at,
            hold_ms: u64::try_from(step.hold.as_millis()).unwrap_or(u64::MAX),
        });
        let tick = |_| async move {
            match gate.check(stage, of, at, analysis).await {
                Err(e) if !e.is_mild(down.critical) => ControlFlow::Break(e),
                // Still over the limit but not critical: the way down goes on.
                _ => ControlFlow::Continue(()),
            }
        };
        match every(Instant::now(), step.hold, analysis.interval, gate.cancel, tick).await {
            Ok(None) => {}
            Ok(Some(critical)) => {
                return GateError::Rollback(format!("{breach}; ramp-down cut short at {at}%: {critical}"))
            }
            Err(()) => {
                return GateError::Rollback(format!("{breach}; ramp-down cut short at {at}%: aborted"))
            }
        }
    }
    let total: Duration = down.steps.iter().map(|s| s.hold).sum();
    GateError::Rollback(format!(
        "{breach}; ramped down from {weight}% to {at}% over {}",
        crate::duration_text::format(total)
    ))
}

/// A fault being injected: its entry and the instances it hit.
type Active<'a> = Vec<(&'a ChaosStep, Vec<Arc<dyn Instance>>)>;

/// Runs a stage's analysis with its chaos entries injected beside it; what
/// is still injected when the analysis ends (passed or failed) is cleared
/// before the step returns, so no fault outlives its stage or reaches the
/// rollback.
async fn with_chaos(
    ctx: &StepCtx<'_>,
    stage: usize,
    chaos: &[ChaosStep],
    analyze: impl Future<Output = Result<(), GateError>>,
) -> Result<(), GateError> {
    if chaos.is_empty() {
        return analyze.await;
    }
    let active: Mutex<Active<'_>> = Mutex::new(Vec::new());
    let injections = async {
        join_all(chaos.iter().map(|c| one_fault(ctx, stage, c, &active))).await;
        std::future::pending::<()>().await;
    };
    let r = tokio::select! {
        r = analyze => r,
        () = injections => unreachable!("the injections end pending"),
    };
    let left = std::mem::take(&mut *active.lock().expect("chaos poisoned"));
    for (c, targets) in left {
        clear(ctx, c, &targets).await;
    }
    r
}

/// Waits for the entry's start, injects it, and clears it when its
/// duration is over.
async fn one_fault<'a>(ctx: &StepCtx<'_>, stage: usize, c: &'a ChaosStep, active: &Mutex<Active<'a>>) {
    tokio::time::sleep(Duration::from_millis(c.after_ms)).await;
    let targets: Vec<Arc<dyn Instance>> = ctx
        .inner
        .instances
        .iter()
        .filter(|i| i.backend().group == c.group)
        .cloned()
        .collect();
    if targets.is_empty() {
        (ctx.emit)(EventKind::ChaosFailed {
            entry: c.entry,
            message: format!("no instance is in group {} to inject {} into", c.group, c.fault),
        });
        return;
    }
    let mut hit = Vec::new();
    for t in &targets {
        if let Err(e) = apply(ctx, &c.fault, t.as_ref(), true).await {
            (ctx.emit)(EventKind::ChaosFailed {
                entry: c.entry,
                message: format!("injecting {} into {}: {e}", c.fault, t.backend().id),
            });
            clear(ctx, c, &hit).await;
            return;
        }
        hit.push(Arc::clone(t));
    }
    (ctx.emit)(EventKind::ChaosInjected {
        entry: c.entry,
        stage,
        fault: c.fault,
        instances: hit.iter().map(|i| i.backend().id.clone()).collect(),
    });
    active.lock().expect("chaos poisoned").push((c, hit));
    let Some(d) = c.duration_ms else {
        return;
    };
    tokio::time::sleep(Duration::from_millis(d)).await;
    let mine = {
        let mut a = active.lock().expect("chaos poisoned");
        a.iter()
            .position(|(x, _)| std::ptr::eq(*x, c))
            .map(|k| a.remove(k))
    };
    if let Some((c, targets)) = mine {
        clear(ctx, c, &targets).await;
    }
}

/// Ends an entry's fault on its instances; a failure is reported as an
/// event (and a warning) rather than failing the stage: the analysis
/// judged the stage, and the operator must know a fault may linger.
async fn clear(ctx: &StepCtx<'_>, c: &ChaosStep, targets: &[Arc<dyn Instance>]) {
    let mut ok = true;
    for t in targets {
        if let Err(e) = apply(ctx, &c.fault, t.as_ref(), false).await {
            ok = false;
            let message = format!("clearing {} on {}: {e}", c.fault, t.backend().id);
            (ctx.emit)(EventKind::Warning {
                instance: Some(t.backend().id.clone()),
                message: format!("chaos[{}]: {message}; the fault may still be active", c.entry),
            });
            (ctx.emit)(EventKind::ChaosFailed {
                entry: c.entry,
                message,
            });
        }
    }
    if ok {
        (ctx.emit)(EventKind::ChaosCleared { entry: c.entry });
    }
}

/// Starts (`on`) or ends one fault on one instance, bounded by the
/// load-balancer timeout.
async fn apply(
    ctx: &StepCtx<'_>,
    fault: &Fault,
    instance: &dyn Instance,
    on: bool,
) -> Result<(), DriverError> {
    let inner = ctx.inner;
    let call = async {
        match (fault, on) {
            (Fault::Kill, true) => instance.signal(ProcessSignal::Kill).await,
            // A killed process stays dead: the rollback restores it.
            (Fault::Kill, false) => Ok(()),
            (Fault::Pause, true) => instance.signal(ProcessSignal::Stop).await,
            (Fault::Pause, false) => instance.signal(ProcessSignal::Cont).await,
            (network, on) => {
                let Some(faults) = &inner.faults else {
                    return Err(DriverError::new(
                        "the executor has no fault injector for network faults",
                    ));
                };
                if on {
                    faults.inject(instance.backend(), network).await
                } else {
                    faults.clear(instance.backend(), network).await
                }
            }
        }
    };
    match tokio::time::timeout(inner.timeouts.load_balancer, call).await {
        Ok(r) => r,
        Err(_) => Err(DriverError::transient(format!(
            "no answer within {:.1}s",
            inner.timeouts.load_balancer.as_secs_f64()
        ))),
    }
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
    let network_chaos = steps().any(|s| match s {
        Step::Analyze { chaos, .. } => chaos.iter().any(|c| !c.fault.is_process_fault()),
        _ => false,
    });
    if network_chaos && inner.faults.is_none() {
        return Err(Error::invalid(
            "fault_injector",
            "the plan injects network faults (chaos) but the executor has no fault injector; \
             set one with ExecutorBuilder::fault_injector (e.g. ProxyFaults over a FaultProxy per instance)",
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
