//! Failed requests during a deployment, per load balancer × strategy.
//!
//! Real nginx and real HAProxy in front of 4 demo-app processes (run by
//! `LocalInstance`), ~600 GET/s of loopback load through the load balancer
//! while the real `Executor` replaces the fleet v1 → v2 with `Rolling` and
//! with `Recreate`, each combination `RUNS` times side by side in one run.
//!
//! Run: `cargo bench -p deploykit-e2e --bench zero_downtime`
//!
//! A bench of deploykit-e2e (not of the `benches` crate) because it needs
//! the demo-app binary (`CARGO_BIN_EXE_e2e-demo-app`) and reuses the
//! real-server test harness and scenario by path.

#![allow(missing_docs)]

#[path = "../tests/real/harness.rs"]
mod harness;
#[path = "../tests/real/load.rs"]
mod load;

use std::time::Duration;

use load::{run, LbKind, LoadOpts, Outcome, StrategyKind};

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "zero_downtime: 4 demo-app instances v1 -> v2, {RUNS} runs per row, load {} req/s target",
        LoadOpts::default().rate
    );
    println!(
        "| LB | strategy | requests | failed | retried (closed before response) | rate req/s (median) | p50 ms during deploy (median) | p99 ms during deploy (median) | deploy s (median) | 100 % v2 after |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    let mut failure_lines = Vec::new();
    // The last two rows stretch the rolling deployment to about 20 s of
    // load (a 6 s pause between the 4 instances).
    let short = Duration::from_millis(100);
    let long = Duration::from_secs(6);
    let rows = [
        (LbKind::Nginx, StrategyKind::Rolling, true, short),
        (LbKind::Nginx, StrategyKind::Rolling, false, short),
        (LbKind::Nginx, StrategyKind::Recreate, true, short),
        (LbKind::Haproxy, StrategyKind::Rolling, true, short),
        (LbKind::Haproxy, StrategyKind::Recreate, true, short),
        (LbKind::Nginx, StrategyKind::Rolling, true, long),
        (LbKind::Haproxy, StrategyKind::Rolling, true, long),
    ];
    for (lb, strategy, keep_alive, pause) in rows {
        let load = LoadOpts {
            keep_alive,
            pause,
            ..LoadOpts::default()
        };
        let label = match (keep_alive, pause == long) {
            (false, _) => " (new connection per request)",
            (true, true) => " (6 s pauses: ~20 s of load)",
            (true, false) => "",
        };
        let mut outs: Vec<Outcome> = Vec::new();
        for _ in 0..RUNS {
            match rt.block_on(run(lb, strategy, load)) {
                Some(o) => outs.push(o),
                None => break,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if outs.is_empty() {
            println!(
                "| {lb:?} | {strategy:?}{label} | skipped: {} not installed |",
                lb.binary()
            );
            continue;
        }
        let requests: usize = outs.iter().map(|o| o.requests).sum();
        let failures: usize = outs.iter().map(|o| o.failures).sum();
        let retried: usize = outs.iter().map(|o| o.retried).sum();
        let all_v2 = outs.iter().all(|o| o.final_versions.get("v2") == Some(&100));
        println!(
                "| {lb:?} | {strategy:?}{label} | {requests} | {failures} | {retried} | {:.0} | {:.1} | {:.1} | {:.2} | {} |",
                median(outs.iter().map(|o| o.rate).collect()),
                median(outs.iter().map(|o| o.p50_ms).collect()),
                median(outs.iter().map(|o| o.p99_ms).collect()),
                median(outs.iter().map(|o| o.deploy.as_secs_f64()).collect()),
                if all_v2 { "yes" } else { "no" },
            );
        for o in &outs {
            for f in &o.failure_samples {
                failure_lines.push(format!("{lb:?} {strategy:?}{label}: {f}"));
            }
        }
    }
    println!("\nfirst failures of each run:");
    for l in failure_lines {
        println!("  {l}");
    }
}
