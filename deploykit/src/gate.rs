//! The canary gates the executor runs: [`Step::Analyze`](crate::Step) (hold
//! a stage, checking the metrics every interval) and
//! [`Step::AwaitPromotion`](crate::Step) (wait for a manual promotion,
//! checking all the while).

use std::ops::ControlFlow;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::analysis::{Analysis, AnalysisMetric, Analyzer, CheckOutcome, JudgeInputs, Observations, Verdict};
use crate::event::EventKind;
use crate::judge::{ErrorRateJudge, LatencyJudge, Measured};
use crate::promotion::PromotionHandle;
use crate::traits::{Metric, MetricsSource, Observation};
use crate::wait::{every, later};

/// Why a gate did not let the deployment go on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum GateError {
    /// The deployment was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// The analyzer said roll back (too many inconclusive checks in a
    /// row, or a ramp-down that ended); its reason.
    #[error("{0}")]
    Rollback(String),
    /// A check failed a rule.
    #[error("{reason}")]
    Failed {
        /// The analyzer's reason.
        reason: String,
        /// How many times its limit the value was; `None` for the
        /// sequential test, whose statistic is evidence, not size.
        over_limit: Option<f64>,
    },
    /// A stage ended without one check that passed.
    #[error("canary analysis inconclusive: no check passed during stage {stage} ({weight}%)")]
    Inconclusive {
        /// The stage.
        stage: usize,
        /// Its weight, percent.
        weight: u8,
    },
    /// The promotion did not come in time.
    #[error("no promotion of stage {stage} ({weight}%) within {:.1}s", timeout.as_secs_f64())]
    NoPromotion {
        /// The stage.
        stage: usize,
        /// Its weight, percent.
        weight: u8,
        /// How long it waited.
        timeout: Duration,
    },
    /// The experiment ended without the treatment winning: the control
    /// won, or time ran out with no significant difference; the statistics.
    #[error("{0}")]
    NoWinner(String),
    /// A canary instance failed the health watch's probes
    /// ([`crate::analysis::HealthWatch`]) that many times in a row.
    #[error(
        "canary {instance} failed {failures} health probe(s) in a row, {} apart, during stage {stage} ({weight}%): {detail}",
        crate::duration_text::format(*every)
    )]
    Unhealthy {
        /// The instance.
        instance: crate::names::InstanceId,
        /// Failed probes in a row.
        failures: u32,
        /// Time between probes.
        every: Duration,
        /// The stage.
        stage: usize,
        /// Its weight, percent.
        weight: u8,
        /// What the last probe saw.
        detail: String,
    },
    /// The promotion handle's channel closed (it owns the sender, so only a
    /// bug gets here; fail safe).
    #[error("promotion handle closed")]
    HandleClosed,
}

impl GateError {
    /// A failed check under `critical` times its limit: one a ramp-down
    /// may answer gradually. Everything else (monitoring lost, an abort, a
    /// breach at or over `critical` times its limit) cuts traffic at once.
    pub(crate) fn is_mild(&self, critical: f64) -> bool {
        matches!(self, GateError::Failed { over_limit: Some(x), .. } if *x < critical)
    }
}

/// What a gate needs from the executor.
pub(crate) struct GateCtx<'a> {
    pub(crate) metrics: &'a dyn MetricsSource,
    pub(crate) query_timeout: Duration,
    /// `None` when the gate may not be cancelled.
    pub(crate) cancel: Option<&'a CancellationToken>,
    /// Carried across gates, so "inconclusive in a row" spans stages.
    pub(crate) analyzer: &'a Mutex<Analyzer>,
    pub(crate) emit: &'a (dyn Fn(EventKind) + Send + Sync),
}

impl GateCtx<'_> {
    async fn cancelled(&self) {
        match self.cancel {
            Some(c) => c.cancelled().await,
            None => std::future::pending().await,
        }
    }

    async fn observe(&self, metric: Metric, analysis: &Analysis, canary: bool) -> Observation {
        let group = if canary {
            &analysis.canary
        } else {
            &analysis.stable
        };
        let q = self.metrics.observe(metric, group, analysis.rules.window);
        match tokio::time::timeout(self.query_timeout, q).await {
            Ok(o) => o,
            Err(_) => Observation::ProviderError(format!(
                "no answer within {:.1}s",
                self.query_timeout.as_secs_f64()
            )),
        }
    }

    /// `query`, or a provider error once the query timeout passes.
    async fn bounded<T>(&self, query: impl std::future::Future<Output = Measured<T>>) -> Measured<T> {
        match tokio::time::timeout(self.query_timeout, query).await {
            Ok(m) => m,
            Err(_) => Measured::ProviderError(format!(
                "no answer within {:.1}s",
                self.query_timeout.as_secs_f64()
            )),
        }
    }

    /// What the statistical judges read, over the time since the previous
    /// check (one interval), so each check adds fresh requests only.
    async fn judge_inputs(&self, analysis: &Analysis) -> JudgeInputs {
        let rules = &analysis.rules;
        let window = analysis.interval.max(std::time::Duration::from_secs(1));
        let counts = |group| async move {
            if rules.error_judge == ErrorRateJudge::Sequential {
                Some(self.bounded(self.metrics.observe_counts(group, window)).await)
            } else {
                None
            }
        };
        let latency = |group| async move {
            if rules.latency_judge == LatencyJudge::MannWhitney {
                Some(self.bounded(self.metrics.observe_latency(group, window)).await)
            } else {
                None
            }
        };
        let (canary_counts, stable_counts, canary_latency, stable_latency) = futures::join!(
            counts(&analysis.canary),
            counts(&analysis.stable),
            latency(&analysis.canary),
            latency(&analysis.stable),
        );
        JudgeInputs {
            canary_counts,
            stable_counts,
            canary_latency,
            stable_latency,
        }
    }

    /// One check of a canary stage: query, judge, record, emit.
    pub(crate) async fn check(
        &self,
        stage: usize,
        of: usize,
        weight: u8,
        analysis: &Analysis,
    ) -> Result<(), GateError> {
        self.check_as(stage, of, weight, analysis, None).await
    }

    /// [`Self::check`], its event naming `treatment` when the check guards
    /// a treatment of an experiment rather than a canary stage.
    async fn check_as(
        &self,
        stage: usize,
        of: usize,
        weight: u8,
        analysis: &Analysis,
        treatment: Option<&crate::names::Group>,
    ) -> Result<(), GateError> {
        let requests = |canary: bool| async move {
            if analysis.rules.needs_request_count() {
                Some(self.observe(Metric::RequestCount, analysis, canary).await)
            } else {
                None
            }
        };
        let (canary_error_rate, canary_p99, stable_error_rate, canary_requests, stable_requests) = futures::join!(
            self.observe(Metric::ErrorRate, analysis, true),
            self.observe(Metric::LatencyP99, analysis, true),
            self.observe(Metric::ErrorRate, analysis, false),
            requests(true),
            requests(false),
        );
        let obs = Observations {
            canary_error_rate,
            canary_p99,
            stable_error_rate,
            canary_requests,
            stable_requests,
        };
        let inputs = self.judge_inputs(analysis).await;
        let (judgement, verdict, consecutive) = {
            let mut a = self.analyzer.lock().expect("analyzer poisoned");
            let j = analysis
                .rules
                .judge_stage(stage, of, &obs, &inputs, &mut a.sequential);
            let v = a.record(&analysis.rules, &j.outcome);
            (j, v, a.consecutive_inconclusive)
        };
        let outcome = judgement.outcome;
        let over_limit = match &outcome {
            CheckOutcome::Fail {
                metric: AnalysisMetric::ErrorRateSequential,
                ..
            } => None,
            CheckOutcome::Fail { value, threshold, .. } if *threshold > 0.0 => Some(value / threshold),
            // Over a limit of 0, any value is infinitely over.
            CheckOutcome::Fail { .. } => Some(f64::INFINITY),
            _ => None,
        };
        let failed = matches!(outcome, CheckOutcome::Fail { .. });
        tracing::debug!(stage, weight, ?obs, %outcome, "canary check");
        let measurements = analysis.rules.measurements(&obs, &judgement.evidence);
        (self.emit)(EventKind::AnalysisResult {
            stage,
            weight,
            result: outcome,
            consecutive_inconclusive: consecutive,
            evidence: judgement.evidence,
            measurements,
            group: treatment.cloned(),
        });
        match verdict {
            Verdict::Continue => Ok(()),
            Verdict::Rollback(reason) if failed => Err(GateError::Failed { reason, over_limit }),
            Verdict::Rollback(why) => Err(GateError::Rollback(why)),
        }
    }
}

/// Holds canary stage `stage` for `duration`, checking every
/// `analysis.interval` (the last check at the end of the stage). The stage
/// passes only if at least one of its checks passed: a stage of nothing but
/// inconclusive checks is never healthy.
pub(crate) async fn analyze(
    ctx: &GateCtx<'_>,
    stage: usize,
    of: usize,
    weight: u8,
    duration: Duration,
    analysis: &Analysis,
) -> Result<(), GateError> {
    let passes_before = ctx.analyzer.lock().expect("analyzer poisoned").passes;
    let tick = |elapsed: Duration| async move {
        if let Err(e) = ctx.check(stage, of, weight, analysis).await {
            return ControlFlow::Break(e);
        }
        let percent = u8::try_from(elapsed.as_millis() * 100 / duration.as_millis().max(1)).unwrap_or(100);
        (ctx.emit)(EventKind::StageProgress {
            stage,
            of,
            weight,
            percent,
            elapsed_ms: ms(elapsed),
            duration_ms: ms(duration),
        });
        ControlFlow::Continue(())
    };
    match every(Instant::now(), duration, analysis.interval, ctx.cancel, tick).await {
        Err(()) => return Err(GateError::Cancelled),
        Ok(Some(e)) => return Err(e),
        Ok(None) => {}
    }
    let passes = ctx.analyzer.lock().expect("analyzer poisoned").passes;
    if passes == passes_before {
        return Err(GateError::Inconclusive { stage, weight });
    }
    Ok(())
}

/// Waits for a promotion of `stage` through `handle`, checking every
/// `analysis.interval`; fails on a breach or once `timeout` passes.
/// `announced` runs once the wait is announced, before waiting: it makes
/// the announcement durable, so that `promote` from another process (which
/// reads the journal) sees a wait that may last hours.
pub(crate) async fn await_promotion(
    ctx: &GateCtx<'_>,
    handle: &PromotionHandle,
    stage: usize,
    weight: u8,
    timeout: Option<Duration>,
    analysis: &Analysis,
    announced: impl std::future::Future<Output = ()>,
) -> Result<(), GateError> {
    let (mut rx, seen) = handle.begin_wait(stage);
    (ctx.emit)(EventKind::AwaitingPromotion {
        stage,
        weight,
        timeout_ms: timeout.map(ms),
    });
    announced.await;
    let interval = analysis.interval.max(Duration::from_millis(1));
    let deadline = timeout.map(|t| later(Instant::now(), t));
    let mut next_check = later(Instant::now(), interval);
    let result = loop {
        if rx.borrow_and_update().promotions > seen {
            (ctx.emit)(EventKind::Promoted { stage });
            break Ok(());
        }
        let until_deadline = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    // The handle owns the sender, so this cannot happen;
                    // fail safe.
                    break Err(GateError::HandleClosed);
                }
            }
            _ = tokio::time::sleep_until(next_check) => {
                next_check = later(next_check, interval);
                if let Err(e) = ctx.check(stage, stage, weight, analysis).await {
                    break Err(e);
                }
            }
            _ = until_deadline => {
                break Err(GateError::NoPromotion {
                    stage,
                    weight,
                    timeout: timeout.unwrap_or_default(),
                });
            }
            _ = ctx.cancelled() => break Err(GateError::Cancelled),
        }
    };
    handle.end_wait();
    result
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// How an experiment that did not roll back ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ExperimentEnd {
    /// The treatment won.
    Won,
    /// No significant difference, and the rules say promote: why, for
    /// the operator.
    PromotedWithoutDifference(String),
}

/// Runs an A/B experiment for at most `duration`: every `analysis.interval`
/// a guardrail check (a breach rolls back, as in a canary stage), then the
/// tallies since the start into the sequential test, emitted as an
/// [`EventKind::ExperimentReading`]. `Ok` when the treatment wins, or when
/// time runs out with no significant difference, enough visits and
/// `on_no_difference = promote`.
///
/// A resumed experiment had already run for `ran_for`: its tallies are read
/// over that time too, so no visit is lost, and the test restarts on them.
/// The mixture likelihood ratio depends only on the cumulative tallies, so
/// the evidence carries over whole; only the running maximum of earlier
/// looks is forgotten, which can make the test later, never more eager.
/// It runs for what is left of `duration`, one check at least.
pub(crate) async fn experiment(
    ctx: &GateCtx<'_>,
    rules: &crate::experiment::ExperimentRules,
    duration: Duration,
    ran_for: Duration,
    analysis: &Analysis,
) -> Result<ExperimentEnd, GateError> {
    use crate::experiment::{NoDifference, Sequential, Verdict};
    let started = Instant::now();
    let left = duration.saturating_sub(ran_for).max(analysis.interval);
    let state = Mutex::new((Sequential::default(), None));
    let tick = |elapsed: Duration| {
        let state = &state;
        async move {
            if let Err(e) = ctx.check(1, 1, 50, analysis).await {
                return ControlFlow::Break(Err(e));
            }
            // Everything since the start, rounded up to whole seconds as
            // a range query needs.
            let since_start = ran_for + elapsed;
            let window = Duration::from_secs(since_start.as_secs_f64().ceil().max(1.0) as u64);
            let (control, treatment) = futures::join!(
                ctx.bounded(ctx.metrics.observe_tally(&analysis.stable, window)),
                ctx.bounded(ctx.metrics.observe_tally(&analysis.canary, window)),
            );
            let (Measured::Value(control), Measured::Value(treatment)) = (control, treatment) else {
                return ControlFlow::Continue(());
            };
            let reading = {
                let mut st = state.lock().expect("experiment state poisoned");
                let r = st.0.read(rules, control, treatment);
                st.1 = Some(r);
                r
            };
            (ctx.emit)(EventKind::ExperimentReading {
                reading,
                elapsed_ms: ms(since_start),
            });
            match reading.verdict {
                Verdict::Continue => ControlFlow::Continue(()),
                Verdict::TreatmentWins => ControlFlow::Break(Ok(ExperimentEnd::Won)),
                Verdict::ControlWins => ControlFlow::Break(Err(GateError::NoWinner(format!(
                    "experiment: the control {} wins: {}",
                    analysis.stable,
                    describe(&reading)
                )))),
            }
        }
    };
    match every(started, left, analysis.interval, ctx.cancel, tick).await {
        Err(()) => Err(GateError::Cancelled),
        Ok(Some(decided)) => decided,
        Ok(None) => {
            let last = state.lock().expect("experiment state poisoned").1;
            let secs = duration.as_secs_f64();
            match (last, rules.on_no_difference) {
                (Some(r), NoDifference::Promote) if r.has_samples(rules) => {
                    Ok(ExperimentEnd::PromotedWithoutDifference(format!(
                        "experiment: no significant difference within {secs:.0}s; the treatment {} is promoted (on_no_difference = promote): {}",
                        analysis.canary,
                        describe(&r)
                    )))
                }
                (Some(r), NoDifference::Promote) => Err(GateError::NoWinner(format!(
                    "experiment: too few visits within {secs:.0}s to compare the variants ({} each needed), so the control {} stays although on_no_difference = promote: {}",
                    rules.min_samples,
                    analysis.stable,
                    describe(&r)
                ))),
                (Some(r), NoDifference::KeepControl) => Err(GateError::NoWinner(format!(
                    "experiment: no significant difference within {secs:.0}s, the control {} stays: {}",
                    analysis.stable,
                    describe(&r)
                ))),
                (None, _) => Err(GateError::NoWinner(format!(
                    "experiment: no visits and conversions could be read within {secs:.0}s; the control {} stays",
                    analysis.stable
                ))),
            }
        }
    }
}

/// Runs an experiment with several treatments (`arms`, each a group and
/// its release) against the control `analysis.stable` for at most
/// `duration`: every `analysis.interval` the guardrails are checked for
/// each treatment (each with an analyzer of its own, its checks numbered
/// as stage `k` of the treatments in the events), and a breach of any
/// rolls the whole experiment back — the simplest rule that never
/// promotes past a failing release; then the tallies of every variant
/// since the start go into the Holm-corrected test
/// ([`crate::experiment::ManySequential`]), emitted as an
/// [`EventKind::ExperimentVariants`]. A winner is emitted as an
/// [`EventKind::ExperimentDecided`] and returned (with its release).
/// Every treatment significantly worse, or no winner when time runs out,
/// keeps the control. Resumed as [`experiment`] is.
pub(crate) async fn experiment_variants(
    ctx: &GateCtx<'_>,
    rules: &crate::experiment::ExperimentRules,
    duration: Duration,
    ran_for: Duration,
    analysis: &Analysis,
    arms: &[crate::plan::ExperimentArm],
) -> Result<crate::plan::ExperimentArm, GateError> {
    use crate::experiment::{ManySequential, VariantsReading};
    let started = Instant::now();
    let left = duration.saturating_sub(ran_for).max(analysis.interval);
    let per_arm: Vec<(Analysis, Mutex<Analyzer>)> = arms
        .iter()
        .map(|a| {
            let mut an = analysis.clone();
            an.canary = a.group.clone();
            (an, Mutex::new(Analyzer::default()))
        })
        .collect();
    let named: Vec<(crate::names::Group, crate::names::ReleaseId)> = arms
        .iter()
        .map(|a| (a.group.clone(), a.release.clone()))
        .collect();
    let state = Mutex::new((ManySequential::default(), None::<VariantsReading>));
    let of = arms.len();
    let tick = |elapsed: Duration| {
        let (state, per_arm, named) = (&state, &per_arm, &named);
        async move {
            for (k, (an, analyzer)) in per_arm.iter().enumerate() {
                let own = GateCtx {
                    metrics: ctx.metrics,
                    query_timeout: ctx.query_timeout,
                    cancel: ctx.cancel,
                    analyzer,
                    emit: ctx.emit,
                };
                if let Err(e) = own.check_as(k + 1, of, 0, an, Some(&an.canary)).await {
                    let e = match e {
                        GateError::Failed { reason, over_limit } => GateError::Failed {
                            reason: format!("treatment {}: {reason}; every treatment rolls back", an.canary),
                            over_limit,
                        },
                        GateError::Rollback(why) => GateError::Rollback(format!(
                            "treatment {}: {why}; every treatment rolls back",
                            an.canary
                        )),
                        other => other,
                    };
                    return ControlFlow::Break(Err(e));
                }
            }
            let since_start = ran_for + elapsed;
            let window = Duration::from_secs(since_start.as_secs_f64().ceil().max(1.0) as u64);
            let control = ctx
                .bounded(ctx.metrics.observe_tally(&analysis.stable, window))
                .await;
            let treatments = futures::future::join_all(
                named
                    .iter()
                    .map(|(g, _)| ctx.bounded(ctx.metrics.observe_tally(g, window))),
            )
            .await;
            let Measured::Value(control) = control else {
                return ControlFlow::Continue(());
            };
            let mut tallies = Vec::with_capacity(treatments.len());
            for t in treatments {
                let Measured::Value(t) = t else {
                    return ControlFlow::Continue(());
                };
                tallies.push(t);
            }
            let reading = {
                let mut st = state.lock().expect("experiment state poisoned");
                let r = st.0.read(rules, control, &tallies);
                let r = VariantsReading::new(analysis.stable.clone(), &r, named);
                st.1 = Some(r.clone());
                r
            };
            (ctx.emit)(EventKind::ExperimentVariants {
                reading: reading.clone(),
                experiment_ms: ms(since_start),
            });
            if let Some(w) = &reading.winner {
                let arm = arms
                    .iter()
                    .find(|a| &a.group == w)
                    .expect("the winner is one of the treatments")
                    .clone();
                return ControlFlow::Break(Ok(arm));
            }
            if reading.control_wins {
                return ControlFlow::Break(Err(GateError::NoWinner(format!(
                    "experiment: the control {} wins, every treatment converts significantly worse: {reading}",
                    analysis.stable
                ))));
            }
            ControlFlow::Continue(())
        }
    };
    let decided = match every(started, left, analysis.interval, ctx.cancel, tick).await {
        Err(()) => return Err(GateError::Cancelled),
        Ok(Some(decided)) => decided,
        Ok(None) => {
            let last = state.lock().expect("experiment state poisoned").1.clone();
            let secs = duration.as_secs_f64();
            Err(GateError::NoWinner(match last {
                Some(r) => format!(
                    "experiment: no treatment significantly better within {secs:.0}s, the control {} stays: {r}",
                    analysis.stable
                ),
                None => format!(
                    "experiment: no visits and conversions could be read within {secs:.0}s; the control {} stays",
                    analysis.stable
                ),
            }))
        }
    };
    let arm = decided?;
    (ctx.emit)(EventKind::ExperimentDecided {
        winner: arm.group.clone(),
        release: arm.release.clone(),
    });
    Ok(arm)
}

/// The statistics of a reading as a sentence.
fn describe(r: &crate::experiment::Reading) -> String {
    r.to_string()
}
