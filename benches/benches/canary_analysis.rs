//! Canary analysis under simulated noisy metrics, in virtual time.
//!
//! Two questions, each over many full canary deployments (4 stable + 1
//! canary fakes, default stages 5 → 25 → 50 → 75 → 100 %, 300 s each) run
//! side by side in one process:
//!
//! 1. **Detection**: a canary that turns bad at the start of stage 2 — how
//!    long from the start of that stage to the rollback decision, for
//!    several check intervals and bad error rates?
//! 2. **False rollbacks**: a good canary (same error rate as stable) under
//!    sampling noise and scrape gaps — how often is it rolled back, and by
//!    which rule?
//!
//! The metrics model: 100 requests/s split by the stage's weight; the error
//! rate a query sees is the errors over the trailing window (so a breach
//! fills the window gradually, as a real `rate(…[5m])` does), drawn from a
//! binomial (normal approximation) of the requests in the window; p99
//! latency is 200 ms ± 50 ms; each query is empty (`NoData`) with a small
//! probability. Seeds are fixed: the figures are reproducible.
//!
//! 3. **Judges side by side**: today's threshold rules against the
//!    sequential error-rate test and the Mann-Whitney latency judge, on the
//!    same simulated traffic (same seeds): detection of a 5 % and a 1.5 %
//!    canary against 0.3 % stable, false rollbacks of a good canary, and
//!    detection of a +100 ms latency shift. Here the traffic is one sample
//!    path per run — errors drawn per second (Poisson), every query summing
//!    the seconds of its window — so overlapping windows see the same
//!    requests, as with a real Prometheus; latencies are log-normal
//!    (median 200 ms) bucketed like the demo app's histogram.
//!
//! Run: `cargo bench -p deploykit-benches --bench canary_analysis`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deploykit::analysis::{AnalysisMetric, CheckOutcome};
use deploykit::judge::{Counts, Distribution, ErrorRateJudge, LatencyJudge, Measured};
use deploykit::{Canary, EventKind, EventLog, Executor, Metric, Observation, OutcomeKind, ReleaseId};
use deploykit_testkit::{FakeFleet, FakeMetrics};

/// splitmix64: small, fast, good enough for noise.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[derive(Debug, Clone, Copy)]
struct Model {
    /// Error rate of stable and of a good canary.
    base: f64,
    /// The canary's error rate once bad; `None` for a good canary.
    bad: Option<f64>,
    /// When the canary turns bad (since the deployment started).
    onset: Duration,
    /// Probability that a query answers empty.
    gap: f64,
    window: Duration,
}

const RPS: f64 = 100.0;
const STAGES: [u8; 5] = [5, 25, 50, 75, 100];
const STAGE: Duration = Duration::from_secs(300);

fn weight_at(t: Duration) -> f64 {
    let k = ((t.as_secs_f64() / STAGE.as_secs_f64()) as usize).min(STAGES.len() - 1);
    f64::from(STAGES[k]) / 100.0
}

/// The errors a query over the trailing window sees.
fn observed_rate(m: &Model, rng: &mut Rng, t: Duration, canary: bool) -> Observation {
    if rng.uniform() < m.gap {
        return Observation::NoData;
    }
    let share = if canary { weight_at(t) } else { 1.0 - weight_at(t) };
    let n = RPS * share * m.window.as_secs_f64();
    if n < 1.0 {
        return Observation::NoData;
    }
    let p = match (canary, m.bad) {
        (true, Some(bad)) if t > m.onset => {
            let bad_part = ((t - m.onset).as_secs_f64() / m.window.as_secs_f64()).min(1.0);
            m.base * (1.0 - bad_part) + bad * bad_part
        }
        _ => m.base,
    };
    let errors = (n * p + (n * p * (1.0 - p)).sqrt() * rng.normal())
        .round()
        .max(0.0);
    Observation::Value(errors / n)
}

fn metrics(m: Model, seed: u64) -> FakeMetrics {
    let rng = Arc::new(Mutex::new(Rng(seed)));
    let mut f = FakeMetrics::new();
    for (group, canary) in [("stable", false), ("canary", true)] {
        let r = rng.clone();
        f = f.script(group, Metric::ErrorRate, move |t| {
            observed_rate(&m, &mut r.lock().unwrap(), t, canary)
        });
        let r = rng.clone();
        f = f.script(group, Metric::LatencyP99, move |_| {
            let mut r = r.lock().unwrap();
            if r.uniform() < m.gap {
                Observation::NoData
            } else {
                Observation::Value((0.2 + 0.05 * r.normal()).max(0.01))
            }
        });
    }
    for (group, canary) in [("stable", false), ("canary", true)] {
        let r = rng.clone();
        f = f.script(group, Metric::RequestCount, move |t| {
            let share = if canary { weight_at(t) } else { 1.0 - weight_at(t) };
            if r.lock().unwrap().uniform() < m.gap {
                Observation::NoData
            } else {
                Observation::Value((RPS * share * m.window.as_secs_f64()).round())
            }
        });
    }
    f
}

struct RunResult {
    rolled_back: bool,
    /// From the start of stage 2 to the rollback decision.
    detection: Option<Duration>,
    rule: Option<String>,
}

fn run(canary: &Canary, model: Model, seed: u64) -> RunResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]).without_op_log();
        let log = EventLog::new();
        let exec = Executor::builder()
            .instances(fleet.instances())
            .load_balancer(Arc::new(fleet.load_balancer()))
            .metrics(Arc::new(metrics(model, seed)))
            .events(Arc::new(log.clone()))
            .build()
            .expect("executor");
        let report = exec
            .deploy(canary, &ReleaseId::new("v2").unwrap())
            .await
            .expect("starts");
        let events = log.events();
        let stage2 = events.iter().find_map(|e| match &e.kind {
            EventKind::StageStarted { name, .. } if name.starts_with("canary 25%") => Some(e.elapsed_ms),
            _ => None,
        });
        let rollback = events.iter().find_map(|e| match &e.kind {
            EventKind::RollbackStarted { .. } => Some(e.elapsed_ms),
            _ => None,
        });
        let rule = events.iter().rev().find_map(|e| match &e.kind {
            EventKind::AnalysisResult { result, .. } => Some(match result {
                CheckOutcome::Fail { metric, .. } => match metric {
                    AnalysisMetric::ErrorRate => "error rate > threshold".to_string(),
                    AnalysisMetric::LatencyP99 => "p99 > threshold".to_string(),
                    AnalysisMetric::ErrorRateVsStable => "error rate > 2x stable".to_string(),
                    AnalysisMetric::ErrorRateSequential => "sequential test".to_string(),
                    AnalysisMetric::LatencyDistribution => "Mann-Whitney latency".to_string(),
                },
                CheckOutcome::NoData { .. } | CheckOutcome::ProviderError { .. } => {
                    "inconclusive limit".to_string()
                }
                CheckOutcome::Pass => "stage without a pass".to_string(),
            }),
            _ => None,
        });
        let rolled_back = report.outcome == OutcomeKind::RolledBack;
        RunResult {
            rolled_back,
            detection: match (stage2, rollback) {
                (Some(s), Some(r)) if r >= s => Some(Duration::from_millis(r - s)),
                _ => None,
            },
            rule: rolled_back.then_some(rule).flatten(),
        }
    })
}

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let wall = Instant::now();
    let runs: u64 = std::env::var("CANARY_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let good = Model {
        base: 0.003,
        bad: None,
        onset: Duration::MAX,
        gap: 0.02,
        window: Duration::from_secs(300),
    };

    println!("## Detection: canary turns bad at the start of stage 2 ({runs} runs per row)\n");
    println!("| bad error rate | window | check interval | ratio significance | detected in stage 2 | median | p99 | max | deciding rule (most runs) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (bad, window, interval, z) in [
        (0.05, 300, 30, 3.0),
        (0.05, 300, 30, 0.0),
        (0.05, 300, 10, 3.0),
        (0.05, 300, 60, 3.0),
        (0.05, 60, 30, 3.0),
        (0.015, 300, 30, 3.0),
        (0.015, 300, 30, 0.0),
        (0.015, 60, 30, 3.0),
    ] {
        let model = Model {
            bad: Some(bad),
            onset: STAGE,
            window: Duration::from_secs(window),
            ..good
        };
        let mut canary = Canary {
            check_interval: Duration::from_secs(interval),
            ..Canary::default()
        };
        canary.analysis.window = Duration::from_secs(window);
        canary.analysis.ratio_significance = z;
        let mut times = Vec::new();
        let mut rules: BTreeMap<String, u64> = BTreeMap::new();
        for seed in 0..runs {
            let r = run(&canary, model, 1_000_000 + seed);
            if let (true, Some(d)) = (r.rolled_back, r.detection) {
                times.push(d);
                *rules.entry(r.rule.unwrap_or_default()).or_default() += 1;
            }
        }
        let detected = times.len();
        let top = rules
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(r, n)| format!("{r} ({n})"))
            .unwrap_or_default();
        if times.is_empty() {
            println!(
                "| {:.1} % | {window}s | {interval}s | {z} | 0/{runs} | – | – | – | – |",
                bad * 100.0
            );
            continue;
        }
        let (p50, p99) = (percentile(&mut times, 0.5), percentile(&mut times, 0.99));
        let max = *times.iter().max().unwrap();
        println!(
            "| {:.1} % | {window}s | {interval}s | {z} | {detected}/{runs} | {:.0}s | {:.0}s | {:.0}s | {top} |",
            bad * 100.0,
            p50.as_secs_f64(),
            p99.as_secs_f64(),
            max.as_secs_f64()
        );
    }

    println!("\n## False rollbacks of a good canary (both tracks 0.3 % errors, 2 % empty queries; {runs} runs per row)\n");
    println!("| window | ratio significance | false rollbacks | by rule |");
    println!("|---|---|---|---|");
    for (window, z) in [(300, 0.0), (300, 3.0), (60, 0.0), (60, 3.0), (30, 3.0)] {
        let model = Model {
            window: Duration::from_secs(window),
            ..good
        };
        let mut canary = Canary::default();
        canary.analysis.window = Duration::from_secs(window);
        canary.analysis.ratio_significance = z;
        let mut rules: BTreeMap<String, u64> = BTreeMap::new();
        let mut false_rollbacks = 0;
        for seed in 0..runs {
            let r = run(&canary, model, 2_000_000 + seed);
            if r.rolled_back {
                false_rollbacks += 1;
                *rules.entry(r.rule.unwrap_or_default()).or_default() += 1;
            }
        }
        let by: Vec<String> = rules.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        println!(
            "| {window}s | {z} | {false_rollbacks}/{runs} ({:.1} %) | {} |",
            false_rollbacks as f64 * 100.0 / runs as f64,
            if by.is_empty() {
                "–".into()
            } else {
                by.join(", ")
            }
        );
    }
    judges_side_by_side(runs);
    println!("\nwall time: {:.1}s", wall.elapsed().as_secs_f64());
}

/// When each canary stage really started (on the metrics' clock) and its
/// weight, recorded from the executor's events, so simulated traffic
/// follows the load balancer instead of a guessed schedule.
#[derive(Debug, Default)]
struct Timeline {
    /// `(since the metrics' epoch, canary weight)` at each stage start.
    weights: Vec<(Duration, f64)>,
    /// When stage 2 started: the onset of a bad canary.
    stage2: Option<Duration>,
}

impl Timeline {
    fn weight_at(&self, t: Duration) -> f64 {
        self.weights
            .iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .map_or(0.0, |(_, w)| *w)
    }

    fn bad_at(&self, t: Duration) -> bool {
        self.stage2.is_some_and(|s| t >= s)
    }
}

/// An event sink that keeps the events and records the timeline.
#[derive(Debug, Clone)]
struct Recorder {
    log: EventLog,
    epoch: tokio::time::Instant,
    timeline: Arc<Mutex<Timeline>>,
}

impl deploykit::EventSink for Recorder {
    fn emit(&self, event: &deploykit::Event) {
        self.log.emit(event);
        if let EventKind::StageStarted {
            name,
            rollback: false,
            ..
        } = &event.kind
        {
            // Canary stages are named "canary 25% (2/5)".
            let Some(rest) = name.strip_prefix("canary ") else {
                return;
            };
            let Some((percent, after)) = rest.split_once("% (") else {
                return;
            };
            let Ok(percent) = percent.parse::<f64>() else {
                return;
            };
            let t = self.epoch.elapsed();
            let mut tl = self.timeline.lock().unwrap();
            tl.weights.push((t, percent / 100.0));
            if after.starts_with("2/") {
                tl.stage2 = Some(t);
            }
        }
    }
}

/// One run's traffic: per second, canary and stable requests and errors,
/// drawn as the deployment goes.
struct Path {
    rng: Rng,
    model: PathModel,
    timeline: Arc<Mutex<Timeline>>,
    /// Per second: canary requests, canary errors, stable requests, stable
    /// errors.
    seconds: Vec<[f64; 4]>,
}

#[derive(Debug, Clone, Copy)]
struct PathModel {
    base: f64,
    bad: Option<f64>,
    /// Added to the canary's latencies after the onset, seconds.
    slower: f64,
    gap: f64,
}

impl Rng {
    fn poisson(&mut self, lambda: f64) -> f64 {
        if lambda <= 0.0 {
            return 0.0;
        }
        if lambda > 30.0 {
            return (lambda + lambda.sqrt() * self.normal()).round().max(0.0);
        }
        let l = (-lambda).exp();
        let (mut k, mut p) = (0.0, 1.0);
        loop {
            p *= self.uniform();
            if p <= l {
                return k;
            }
            k += 1.0;
        }
    }
}

impl Path {
    fn extend_to(&mut self, t: Duration) {
        let until = t.as_secs() as usize + 1;
        while self.seconds.len() < until {
            let at = Duration::from_secs(self.seconds.len() as u64);
            let (w, bad_now) = {
                let tl = self.timeline.lock().unwrap();
                (tl.weight_at(at), tl.bad_at(at))
            };
            let (nc, ns) = (RPS * w, RPS * (1.0 - w));
            let pc = match self.model.bad {
                Some(bad) if bad_now => bad,
                _ => self.model.base,
            };
            let ec = self.rng.poisson(nc * pc).min(nc);
            let es = self.rng.poisson(ns * self.model.base).min(ns);
            self.seconds.push([nc, ec, ns, es]);
        }
    }

    /// Requests and errors of a track over the window ending at `t`.
    fn sum(&mut self, t: Duration, window: Duration, canary: bool) -> Counts {
        self.extend_to(t);
        let end = t.as_secs() as usize;
        let start = end.saturating_sub(window.as_secs().max(1) as usize);
        let (r, e) = if canary { (0, 1) } else { (2, 3) };
        let mut c = Counts {
            requests: 0.0,
            errors: 0.0,
        };
        for s in &self.seconds[start..end] {
            c.requests += s[r];
            c.errors += s[e];
        }
        c
    }

    fn gap(&mut self) -> bool {
        self.rng.uniform() < self.model.gap
    }

    /// `n` latencies, bucketed as the demo app's histogram does
    /// (exponential buckets from 1 ms, doubling, 14 of them).
    fn latencies(&mut self, n: f64, shift: f64) -> Distribution {
        let mut counts = [0.0f64; 15];
        for _ in 0..n as u64 {
            let x = 0.2 * (0.25 * self.rng.normal()).exp() + shift;
            let k = (0..14).find(|k| x <= 0.001 * f64::powi(2.0, *k)).unwrap_or(14);
            counts[k as usize] += 1.0;
        }
        let mut cumulative = Vec::with_capacity(15);
        let mut acc = 0.0;
        for (k, c) in counts.iter().enumerate() {
            acc += c;
            let le = if k < 14 {
                0.001 * f64::powi(2.0, k as i32)
            } else {
                f64::INFINITY
            };
            cumulative.push((le, acc));
        }
        Distribution::from_cumulative_buckets(&cumulative)
    }
}

fn path_metrics(model: PathModel, seed: u64, timeline: Arc<Mutex<Timeline>>) -> FakeMetrics {
    let path = Arc::new(Mutex::new(Path {
        rng: Rng(seed),
        model,
        timeline,
        seconds: Vec::new(),
    }));
    let mut f = FakeMetrics::new();
    for (group, canary) in [("stable", false), ("canary", true)] {
        let window = Duration::from_secs(300);
        let p = path.clone();
        f = f.script(group, Metric::ErrorRate, move |t| {
            let mut p = p.lock().unwrap();
            if p.gap() {
                return Observation::NoData;
            }
            let c = p.sum(t, window, canary);
            if c.requests < 1.0 {
                Observation::NoData
            } else {
                Observation::Value(c.errors / c.requests)
            }
        });
        let p = path.clone();
        f = f.script(group, Metric::RequestCount, move |t| {
            let mut p = p.lock().unwrap();
            if p.gap() {
                return Observation::NoData;
            }
            Observation::Value(p.sum(t, window, canary).requests)
        });
        let p = path.clone();
        f = f.script(group, Metric::LatencyP99, move |t| {
            let mut p = p.lock().unwrap();
            if p.gap() {
                return Observation::NoData;
            }
            let shift = if canary && p.timeline.lock().unwrap().bad_at(t) {
                p.model.slower
            } else {
                0.0
            };
            Observation::Value((0.2 + 0.05 * p.rng.normal()).max(0.01) + shift)
        });
        let p = path.clone();
        f = f.script_counts(group, move |t, window| {
            let mut p = p.lock().unwrap();
            if p.gap() {
                return Measured::NoData;
            }
            Measured::Value(p.sum(t, window, canary))
        });
        let p = path.clone();
        f = f.script_latency(group, move |t, window| {
            let mut p = p.lock().unwrap();
            if p.gap() {
                return Measured::NoData;
            }
            let n = p.sum(t, window, canary).requests;
            let shift = if canary && p.timeline.lock().unwrap().bad_at(t) {
                p.model.slower
            } else {
                0.0
            };
            let d = p.latencies(n, shift);
            if d.count() < 1.0 {
                Measured::NoData
            } else {
                Measured::Value(d)
            }
        });
    }
    f
}

fn run_path(canary: &Canary, model: PathModel, seed: u64) -> RunResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]).without_op_log();
        let log = EventLog::new();
        let timeline = Arc::new(Mutex::new(Timeline::default()));
        let recorder = Recorder {
            log: log.clone(),
            epoch: tokio::time::Instant::now(),
            timeline: timeline.clone(),
        };
        let exec = Executor::builder()
            .instances(fleet.instances())
            .load_balancer(Arc::new(fleet.load_balancer()))
            .metrics(Arc::new(path_metrics(model, seed, timeline)))
            .events(Arc::new(recorder))
            .build()
            .expect("executor");
        let report = exec
            .deploy(canary, &ReleaseId::new("v2").unwrap())
            .await
            .expect("starts");
        let events = log.events();
        let stage2 = events.iter().find_map(|e| match &e.kind {
            EventKind::StageStarted { name, .. } if name.starts_with("canary 25%") => Some(e.elapsed_ms),
            _ => None,
        });
        let rollback = events.iter().find_map(|e| match &e.kind {
            EventKind::RollbackStarted { .. } => Some(e.elapsed_ms),
            _ => None,
        });
        let rule = events.iter().rev().find_map(|e| match &e.kind {
            EventKind::AnalysisResult { result, .. } => Some(match result {
                CheckOutcome::Fail { metric, .. } => metric.to_string(),
                CheckOutcome::NoData { .. } | CheckOutcome::ProviderError { .. } => {
                    "inconclusive limit".to_string()
                }
                CheckOutcome::Pass => "stage without a pass".to_string(),
            }),
            _ => None,
        });
        let rolled_back = report.outcome == OutcomeKind::RolledBack;
        RunResult {
            rolled_back,
            detection: match (stage2, rollback) {
                (Some(s), Some(r)) if r >= s => Some(Duration::from_millis(r - s)),
                _ => None,
            },
            rule: rolled_back.then_some(rule).flatten(),
        }
    })
}

fn judged(error: ErrorRateJudge, latency: LatencyJudge) -> Canary {
    let mut c = Canary::default();
    c.analysis.error_judge = error;
    c.analysis.latency_judge = latency;
    c
}

fn judges_side_by_side(runs: u64) {
    let interval = Canary::default().check_interval.as_secs_f64();
    let good = PathModel {
        base: 0.003,
        bad: None,
        slower: 0.0,
        gap: 0.02,
    };
    let rules = [
        (
            "thresholds (today's default)",
            ErrorRateJudge::Threshold,
            LatencyJudge::Threshold,
        ),
        (
            "sequential test",
            ErrorRateJudge::Sequential,
            LatencyJudge::Threshold,
        ),
        (
            "sequential + Mann-Whitney",
            ErrorRateJudge::Sequential,
            LatencyJudge::MannWhitney,
        ),
    ];
    println!("\n## Judges side by side: sample-path traffic, 300 s window, checks every 30 s ({runs} runs per row, same seeds per column)\n");
    println!("| scenario | judges | rolled back in stage 2 | median | in intervals | p99 | deciding rule (most runs) |");
    println!("|---|---|---|---|---|---|---|");
    let scenarios = [
        (
            "5 % errors from stage 2",
            PathModel {
                bad: Some(0.05),
                ..good
            },
            3_000_000u64,
        ),
        (
            "1.5 % errors from stage 2",
            PathModel {
                bad: Some(0.015),
                ..good
            },
            4_000_000,
        ),
        (
            "+100 ms latency from stage 2",
            PathModel { slower: 0.1, ..good },
            5_000_000,
        ),
    ];
    for (name, model, seeds) in scenarios {
        for (label, e, l) in rules {
            if model.slower > 0.0 && e == ErrorRateJudge::Sequential && l == LatencyJudge::Threshold {
                continue;
            }
            let canary = judged(e, l);
            let mut times = Vec::new();
            let mut by: BTreeMap<String, u64> = BTreeMap::new();
            for seed in 0..runs {
                let r = run_path(&canary, model, seeds + seed);
                if let (true, Some(d)) = (r.rolled_back, r.detection) {
                    times.push(d);
                    *by.entry(r.rule.unwrap_or_default()).or_default() += 1;
                }
            }
            let top = by
                .iter()
                .max_by_key(|(_, n)| **n)
                .map(|(r, n)| format!("{r} ({n})"))
                .unwrap_or_else(|| "–".into());
            if times.is_empty() {
                println!("| {name} | {label} | 0/{runs} | – | – | – | – |");
                continue;
            }
            let detected = times.len();
            let (p50, p99) = (percentile(&mut times, 0.5), percentile(&mut times, 0.99));
            println!(
                "| {name} | {label} | {detected}/{runs} | {:.0}s | {:.1} | {:.0}s | {top} |",
                p50.as_secs_f64(),
                p50.as_secs_f64() / interval,
                p99.as_secs_f64()
            );
        }
    }
    println!("\n| good canary (0.3 % errors on both tracks, same latency) | false rollbacks | by rule |");
    println!("|---|---|---|");
    for (label, e, l) in rules {
        let canary = judged(e, l);
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        let mut n = 0;
        for seed in 0..runs {
            let r = run_path(&canary, good, 6_000_000 + seed);
            if r.rolled_back {
                n += 1;
                *by.entry(r.rule.unwrap_or_default()).or_default() += 1;
            }
        }
        let by: Vec<String> = by.iter().map(|(r, n)| format!("{r}: {n}")).collect();
        println!(
            "| {label} | {n}/{runs} ({:.1} %) | {} |",
            n as f64 * 100.0 / runs as f64,
            if by.is_empty() {
                "–".into()
            } else {
                by.join(", ")
            }
        );
    }
}
