//! A multi-region deployment over 50 regions of 200 zero-latency fake
//! instances each (10,000), in 5 waves of 10 regions deployed together,
//! each region rolling 20 instances at a time, with a soak after each wave.
//!
//! Measures the engine's own overhead: wall time (waits, soaks included,
//! are virtual) and peak memory. Prints medians of several runs; peak
//! memory comes from a fresh child process per configuration.
//!
//! Run: `cargo bench -p deploykit-benches --bench regions_10k`

use std::sync::Arc;
use std::time::{Duration, Instant};

use deploykit::regions::{
    self, ExecutorRegions, OnFailure, RegionEventLog, RegionName, RegionsOutcome, Rollout,
};
use deploykit::{CountOrPercent, EventLog, Executor, ReleaseId, Rolling, Strategy};
use deploykit_testkit::FakeFleet;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

struct Timing {
    plan: Duration,
    run: Duration,
    events: usize,
}

fn once(regions: usize, per_region: usize, wave: usize, with_events: bool) -> Timing {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut runner = ExecutorRegions::new();
        let mut fleets = Vec::new();
        let log = EventLog::new();
        for r in 0..regions {
            let fleet = FakeFleet::new(per_region).without_op_log();
            let mut b = Executor::builder()
                .instances(fleet.instances())
                .load_balancer(Arc::new(fleet.load_balancer()));
            if with_events {
                b = b.events(Arc::new(log.clone()));
            }
            // Regions named by wave, so globs place them: w1-r01 … w5-r10.
            let name = format!("w{}-r{:02}", r / wave + 1, r % wave + 1);
            runner = runner.with(
                RegionName::new(name).expect("valid"),
                b.build().expect("executor"),
            );
            fleets.push(fleet);
        }
        let rollout = Rollout {
            waves: (1..=regions.div_ceil(wave))
                .map(|w| vec![format!("w{w}-*")])
                .collect(),
            max_parallel: wave,
            soak: Duration::from_secs(600),
            soak_interval: Duration::from_secs(30),
            on_failure: OnFailure::RollbackAll,
        };
        let release = ReleaseId::new("v2").expect("valid");
        let rolling = Rolling {
            batch_size: CountOrPercent::Count(20),
            ..Rolling::default()
        };
        let start = Instant::now();
        let plan = runner
            .plan(&rollout, &release, None, |_| {
                Box::new(rolling.clone()) as Box<dyn Strategy>
            })
            .await
            .expect("plan");
        let planned = start.elapsed();
        let region_log = RegionEventLog::new();
        let start = Instant::now();
        let report = regions::run(&plan, &runner, &region_log, Default::default()).await;
        let ran = start.elapsed();
        assert_eq!(report.outcome, RegionsOutcome::Succeeded, "{report}");
        assert!(fleets
            .iter()
            .all(|f| f.releases().values().all(|r| *r == release)));
        Timing {
            plan: planned,
            run: ran,
            events: log.events().len() + region_log.events().len(),
        }
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

const CONFIGS: [(&str, usize, usize, usize, bool); 3] = [
    ("50 regions x 200, waves of 10", 50, 200, 10, false),
    (
        "50 regions x 200, waves of 10, all events kept",
        50,
        200,
        10,
        true,
    ),
    ("5 regions x 200, waves of 1", 5, 200, 1, false),
];

/// Peak memory of one configuration, in a fresh child process so the
/// configurations do not share a high-water mark.
fn child_peak_mib(index: usize) -> f64 {
    let exe = std::env::current_exe().expect("own path");
    let out = std::process::Command::new(exe)
        .env("BENCH_CHILD", index.to_string())
        .output()
        .expect("child bench runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("peak_mib=").and_then(|v| v.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn main() {
    if let Some(i) = std::env::var("BENCH_CHILD")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        let (_, r, n, w, ev) = CONFIGS[i];
        once(r, n, w, ev);
        println!("peak_mib={}", peak_rss_mib());
        return;
    }
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut plans: Vec<Vec<Duration>> = vec![Vec::new(); CONFIGS.len()];
    let mut walls: Vec<Vec<Duration>> = vec![Vec::new(); CONFIGS.len()];
    let mut events = vec![0; CONFIGS.len()];
    // Interleaved, so machine noise hits every configuration alike.
    for _ in 0..runs {
        for (i, (_, r, n, w, ev)) in CONFIGS.iter().enumerate() {
            let t = once(*r, *n, *w, *ev);
            plans[i].push(t.plan);
            walls[i].push(t.run);
            events[i] = t.events;
        }
    }
    println!("multi-region deployment on fake instances, {runs} runs each, medians:");
    println!("| configuration | plan | run (wall) | per instance | events | peak RSS (own process) |");
    println!("|---|---|---|---|---|---|");
    let mut medians = Vec::new();
    for (i, (name, r, n, _, _)) in CONFIGS.iter().enumerate() {
        let p = median(plans[i].clone());
        let m = median(walls[i].clone());
        medians.push(m);
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1} µs | {} | {:.1} MiB |",
            p.as_secs_f64() * 1e3,
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() * 1e6 / (*r * *n) as f64,
            events[i],
            child_peak_mib(i)
        );
    }
    println!(
        "ratio 50/5 regions wall: {:.1}x (10x the instances)",
        medians[0].as_secs_f64() / medians[2].as_secs_f64()
    );
}
