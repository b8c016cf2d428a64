//! Rolling deployment over 10,000 zero-latency fake instances, batch 100.
//!
//! Measures the executor's own overhead: wall time (waits are virtual, so
//! the stabilisation pauses cost nothing) and peak memory. Runs each
//! configuration several times side by side and prints medians.
//!
//! Run: `cargo bench -p deploykit-benches --bench rolling_10k`

use std::sync::Arc;
use std::time::{Duration, Instant};

use deploykit::{CountOrPercent, EventLog, Executor, ReleaseId, Rolling};
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

fn once(instances: usize, batch: usize, with_events: bool) -> (Duration, usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let fleet = FakeFleet::new(instances).without_op_log();
        let log = EventLog::new();
        let mut builder = Executor::builder()
            .instances(fleet.instances())
            .load_balancer(Arc::new(fleet.load_balancer()));
        if with_events {
            builder = builder.events(Arc::new(log.clone()));
        }
        let exec = builder.build().expect("executor");
        let strategy = Rolling {
            batch_size: CountOrPercent::Count(batch),
            ..Rolling::default()
        };
        let release = ReleaseId::new("v2").expect("valid");
        let start = Instant::now();
        let report = exec.deploy(&strategy, &release).await.expect("runs");
        let wall = start.elapsed();
        assert!(report.is_success(), "{report}");
        assert_eq!(
            fleet.releases().values().filter(|r| **r == release).count(),
            instances
        );
        (wall, log.events().len())
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

const CONFIGS: [(&str, usize, usize, bool); 3] = [
    ("10,000 instances, batch 100", 10_000, 100, false),
    ("10,000 instances, batch 100, all events kept", 10_000, 100, true),
    ("1,000 instances, batch 10", 1_000, 10, false),
];

/// Peak memory of one configuration, measured in a fresh child process so
/// the configurations do not share a high-water mark.
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
        let (_, n, b, ev) = CONFIGS[i];
        once(n, b, ev);
        println!("peak_mib={}", peak_rss_mib());
        return;
    }
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let configs = CONFIGS;
    let mut results = Vec::new();
    // Interleave the configurations so machine noise hits them alike.
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); configs.len()];
    let mut events = vec![0; configs.len()];
    for _ in 0..runs {
        for (i, (_, n, b, ev)) in configs.iter().enumerate() {
            let (d, e) = once(*n, *b, *ev);
            samples[i].push(d);
            events[i] = e;
        }
    }
    println!("rolling deployment on fake instances, {runs} runs each, medians:");
    println!("| configuration | median wall | per instance | events | peak RSS (own process) |");
    println!("|---|---|---|---|---|");
    for (i, (name, n, _, _)) in configs.iter().enumerate() {
        let m = median(samples[i].clone());
        results.push(m);
        println!(
            "| {name} | {:.1} ms | {:.1} µs | {} | {:.1} MiB |",
            m.as_secs_f64() * 1e3,
            m.as_secs_f64() * 1e6 / *n as f64,
            events[i],
            child_peak_mib(i)
        );
    }
    println!(
        "ratio 10k/1k wall: {:.1}x (10x the instances)",
        results[0].as_secs_f64() / results[2].as_secs_f64()
    );
}
