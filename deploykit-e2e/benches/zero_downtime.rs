//! Failed requests and nginx reloads during a deployment, per load balancer,
//! drain mode and strategy, side by side in one run.
//!
//! Real nginx and real HAProxy in front of 4 demo-app processes (run by
//! `LocalInstance`; blue-green adds 4 green ones), 600 GET/s of open-loop
//! loopback load through the load balancer with a keep-alive client that
//! never retries (every socket error, connection closed before a response,
//! non-2xx answer, or answer later than 2 s counts as failed), while the
//! real `Executor` replaces the fleet v1 → v2. Each row runs `RUNS` times;
//! one row repeats nginx's reload drain with a client that retries a GET
//! whose connection was closed before any response, for comparison.
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

use deploykit::lb::nginx::DrainMode;
use load::{run, Client, LbKind, LoadOpts, Outcome, StrategyKind};

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
    let base = LoadOpts::default();
    println!(
        "zero_downtime: 4 demo-app instances v1 -> v2, {RUNS} runs per row, {} req/s open loop, keep-alive, \
         request timeout {:.0} s; requests and failed summed over the runs, the rest medians",
        base.rate,
        load::REQUEST_TIMEOUT.as_secs_f64()
    );
    println!(
        "| load balancer | strategy | client | requests | failed | reloads per deployment | failed per reload | \
         p50 ms during deploy | p99 ms during deploy | deploy s | 100 % v2 after |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    let mut failure_lines = Vec::new();
    // The "long" rows stretch the rolling deployment to about 20 s of load
    // (a 6 s pause between the 4 instances).
    let short = Duration::from_millis(100);
    let long = Duration::from_secs(6);
    let reload = LbKind::Nginx(DrainMode::Reload);
    let retry = LbKind::Nginx(DrainMode::UpstreamRetry);
    let never = Client::NonRetrying;
    let rows = [
        (reload, StrategyKind::Rolling, never, short),
        (retry, StrategyKind::Rolling, never, short),
        (LbKind::Haproxy, StrategyKind::Rolling, never, short),
        (reload, StrategyKind::BlueGreen, never, short),
        (LbKind::Haproxy, StrategyKind::BlueGreen, never, short),
        (reload, StrategyKind::Rolling, Client::RetryOnceIfClosed, short),
        (reload, StrategyKind::Rolling, never, long),
        (retry, StrategyKind::Rolling, never, long),
        (LbKind::Haproxy, StrategyKind::Rolling, never, long),
        (reload, StrategyKind::Recreate, never, short),
        (LbKind::Haproxy, StrategyKind::Recreate, never, short),
    ];
    for (lb, strategy, client, pause) in rows {
        let load = LoadOpts {
            client,
            pause,
            ..base
        };
        let label = if pause == long {
            " (6 s pauses: ~20 s of load)"
        } else {
            ""
        };
        let client_label = match client {
            Client::NonRetrying => "never retries",
            Client::RetryOnceIfClosed => "retries a GET closed before its response",
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
                "| {lb} | {strategy}{label} | skipped: {} not installed |",
                lb.binary()
            );
            continue;
        }
        let requests: usize = outs.iter().map(|o| o.requests).sum();
        let failures: usize = outs.iter().map(|o| o.failures).sum();
        let all_v2 = outs.iter().all(|o| o.final_versions.get("v2") == Some(&100));
        let (reloads, per_reload) = match outs.iter().map(|o| o.reloads).collect::<Option<Vec<u64>>>() {
            None => ("none (runtime API)".to_string(), "–".to_string()),
            Some(r) => {
                let total: u64 = r.iter().sum();
                let per_deploy = median(r.iter().map(|n| *n as f64).collect());
                // Recreate's failures come from stopping every instance.
                let per_reload = if total == 0 || strategy == StrategyKind::Recreate {
                    "–".to_string()
                } else {
                    format!("{:.1}", failures as f64 / total as f64)
                };
                (format!("{per_deploy:.0}"), per_reload)
            }
        };
        println!(
            "| {lb} | {strategy}{label} | {client_label} | {requests} | {failures} | {reloads} | {per_reload} | {:.1} | {:.1} | {:.2} | {} |",
            median(outs.iter().map(|o| o.p50_ms).collect()),
            median(outs.iter().map(|o| o.p99_ms).collect()),
            median(outs.iter().map(|o| o.deploy.as_secs_f64()).collect()),
            if all_v2 { "yes" } else { "no" },
        );
        for o in &outs {
            for f in &o.failure_samples {
                failure_lines.push(format!("{lb} {strategy}{label}, {client_label}: {f}"));
            }
        }
    }
    println!("\nfirst failures of each run:");
    for l in failure_lines {
        println!("  {l}");
    }
}
