//! Ramp accuracy: how closely the traffic a ramped deployment sends to the
//! canary follows the intended curve, in virtual time on the testkit's
//! fakes.
//!
//! Each row is one full ramped deployment (2 stable + 1 canary fakes,
//! healthy metrics) from `from` to 100 % over 10 minutes. The fake load
//! balancer records every weight change with its (virtual) time; from that
//! history, 100 requests per second are routed at random by the weight in
//! force (fixed seed), and the canary's observed share over each 10 s window
//! is compared with `Ramped::share_at`, the continuous curve at the
//! window's middle. Two errors are reported, in percentage points: of the
//! weights alone (the staircase against the curve: what the step interval
//! costs) and of the observed share (staircase plus sampling noise).
//!
//! Run: `cargo bench -p deploykit-benches --bench ramp`

use std::sync::Arc;
use std::time::Duration;

use deploykit::{Canary, EventLog, Executor, Group, Metric, RampCurve, Ramped, ReleaseId};
use deploykit_testkit::{FakeFleet, FakeMetrics, RoutingChange};

/// splitmix64, as in the canary bench: fixed seeds, reproducible figures.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

const REQUESTS_PER_SECOND: u32 = 100;
const WINDOW_SECS: u64 = 10;

struct Row {
    curve: RampCurve,
    from: u8,
    step: Duration,
    stages: usize,
    weight_err: Vec<f64>,
    observed_err: Vec<f64>,
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

async fn run(curve: RampCurve, from: u8, step: Duration, seed: u64) -> Row {
    let fleet = FakeFleet::with_groups(&[("stable", 2), ("canary", 1)]);
    let metrics = FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 10_000.0)
        .set("canary", Metric::ErrorRate, 0.001)
        .set("canary", Metric::LatencyP99, 0.12);
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(EventLog::new()))
        .metrics(Arc::new(metrics))
        .build()
        .expect("valid executor");
    let ramp = Ramped {
        base: Canary {
            check_interval: Duration::from_secs(10),
            ..Canary::default()
        },
        from,
        to: 100,
        duration: Duration::from_secs(600),
        step_interval: step,
        curve,
        ..Ramped::default()
    };
    let stages = ramp.schedule().expect("valid ramp").len();
    let report = exec.deploy(&ramp, &ReleaseId::new("v2").unwrap()).await.unwrap();
    assert!(report.is_success(), "{report}");
    let canary = Group::new("canary").unwrap();
    // The weight changes of the ramp: after the isolation, up to 100 %.
    let changes: Vec<(Duration, u8)> = fleet
        .routing_history()
        .into_iter()
        .filter_map(|r| match r.change {
            RoutingChange::Weights(w) => Some((r.at, w.get(&canary).copied().unwrap_or(0))),
            _ => None,
        })
        .collect();
    let start = changes.iter().find(|(_, p)| *p > 0).expect("ramp started").0;
    let weight_at = |t: Duration| {
        changes
            .iter()
            .take_while(|(at, _)| *at <= start + t)
            .last()
            .map(|(_, p)| *p)
            .unwrap_or(0)
    };
    let mut rng = Rng(seed);
    let (mut weight_err, mut observed_err) = (Vec::new(), Vec::new());
    for w in 0..(600 / WINDOW_SECS) {
        let (mut canary_hits, mut total, mut weight_sum) = (0u32, 0u32, 0f64);
        for s in 0..WINDOW_SECS {
            let t = Duration::from_secs(w * WINDOW_SECS + s);
            let p = f64::from(weight_at(t)) / 100.0;
            weight_sum += p * 100.0;
            for _ in 0..REQUESTS_PER_SECOND {
                total += 1;
                if rng.uniform() < p {
                    canary_hits += 1;
                }
            }
        }
        let middle = Duration::from_secs(w * WINDOW_SECS) + Duration::from_secs(WINDOW_SECS) / 2;
        let intended = ramp.share_at(middle);
        weight_err.push((weight_sum / WINDOW_SECS as f64 - intended).abs());
        observed_err.push((f64::from(canary_hits) * 100.0 / f64::from(total) - intended).abs());
    }
    Row {
        curve,
        from,
        step,
        stages,
        weight_err,
        observed_err,
    }
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    let wall = std::time::Instant::now();
    println!("| curve | from | step interval | stages | weights vs curve: median / p95 / max (pp) | observed share vs curve: median / p95 / max (pp) |");
    println!("|---|---|---|---|---|---|");
    let mut seed = 1;
    for curve in [RampCurve::Linear, RampCurve::Exponential] {
        for from in [1u8, 10] {
            for step in [10u64, 30, 60] {
                seed += 1;
                let mut r = run(curve, from, Duration::from_secs(step), seed).await;
                let (w50, w95, wmax) = (
                    quantile(&mut r.weight_err, 0.5),
                    quantile(&mut r.weight_err, 0.95),
                    quantile(&mut r.weight_err, 1.0),
                );
                let (o50, o95, omax) = (
                    quantile(&mut r.observed_err, 0.5),
                    quantile(&mut r.observed_err, 0.95),
                    quantile(&mut r.observed_err, 1.0),
                );
                let name = match r.curve {
                    RampCurve::Linear => "linear",
                    RampCurve::Exponential => "exponential",
                };
                println!(
                    "| {name} | {} % | {}s | {} | {w50:.1} / {w95:.1} / {wmax:.1} | {o50:.1} / {o95:.1} / {omax:.1} |",
                    r.from,
                    r.step.as_secs(),
                    r.stages
                );
            }
        }
    }
    eprintln!("wall time: {:.1}s", wall.elapsed().as_secs_f64());
}
