//! What mirroring costs the clients of the primary, through real nginx.
//!
//! Real nginx with deploykit's routing (upstream and location includes) in
//! front of three demo apps: `stable` (answers at once), a fast shadow and
//! a slow shadow (`--latency-ms 500`). Open-loop GETs at a fixed rate,
//! every one answered by stable, with the policy of each row: no mirror,
//! every GET mirrored to the fast shadow, every GET mirrored to the slow
//! shadow, and to the slow shadow with the driver's `mirror_timeout` —
//! with a keep-alive client and with a new connection per request, neither
//! ever retrying. Prints p50 / p99 / max of the client's
//! latency (from when the request was due), failed requests, and the copies
//! each shadow counted.
//!
//! Run: `cargo bench -p deploykit-e2e --bench mirror`
//!
//! A bench of deploykit-e2e because it needs the demo-app binary and reuses
//! the real-server harness and load generator by path.

#![allow(missing_docs)]

#[path = "../tests/real/harness.rs"]
mod harness;
#[path = "../tests/real/load.rs"]
mod load;

use std::path::Path;
use std::time::Duration;

use deploykit::lb::NginxLoadBalancer;
use deploykit::routing::{Mirror, Split, TrafficPolicy};
use deploykit::{Address, Backend, Group, GroupWeight, InstanceId, LoadBalancer};
use harness::{free_port, temp_dir, DemoApp, DemoOpts, Http, Nginx};
use load::{quantile_ms, Client, LoadGen};

/// Requests per second of every row.
const RATE: u32 = 100;
/// Load per row.
const ROW: Duration = Duration::from_secs(8);
/// The mitigation's bound on nginx's wait for a copy.
const MIRROR_TIMEOUT: Duration = Duration::from_millis(100);

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

/// nginx.conf with deploykit's location include in place of `proxy_pass`.
fn write_config(dir: &Path, port: u16) {
    let d = dir.display();
    let conf = format!(
        r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body_temp;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    include {d}/upstream.conf;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include {d}/location.conf;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
    );
    std::fs::write(Nginx::conf(dir), conf).expect("write nginx.conf");
}

/// All traffic to stable, and every GET copied to `to` when given.
fn policy(to: Option<&str>) -> TrafficPolicy {
    TrafficPolicy {
        rules: Vec::new(),
        split: Split {
            weights: [("stable", 100), ("fast", 0), ("slow", 0)]
                .into_iter()
                .map(|(group, percent)| GroupWeight {
                    group: g(group),
                    percent,
                })
                .collect(),
            sticky: None,
        },
        mirror: to.map(|to| Mirror {
            to: g(to),
            percent: 100,
            methods: vec!["GET".into()],
            allow_unsafe_methods: false,
            request_body: false,
        }),
    }
}

/// `http_requests_total` of the app at `addr` (all codes).
async fn served(http: &Http, addr: &str) -> u64 {
    let text = http
        .get(&format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .body;
    text.lines()
        .filter(|l| l.starts_with("http_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

struct Row {
    requests: usize,
    failed: usize,
    p50: f64,
    p99: f64,
    max: f64,
    copies_fast: u64,
    copies_slow: u64,
}

async fn row(url: &str, keep_alive: bool, fast: &str, slow: &str) -> Row {
    let http = Http::new();
    let (f0, s0) = (served(&http, fast).await, served(&http, slow).await);
    let gen = LoadGen::open_loop(url, RATE, ROW, keep_alive, Client::NonRetrying);
    tokio::time::sleep(ROW).await;
    let samples = gen.stop().await;
    // Copies still on their way to the slow shadow arrive within its 500 ms.
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Minus the scrapes that read f0 and s0.
    let copies_fast = served(&http, fast).await - f0 - 1;
    let copies_slow = served(&http, slow).await - s0 - 1;
    let mut lat: Vec<Duration> = samples.iter().map(|s| s.latency).collect();
    Row {
        requests: samples.len(),
        failed: samples.iter().filter(|s| s.outcome.is_err()).count(),
        p50: quantile_ms(&mut lat, 0.50),
        p99: quantile_ms(&mut lat, 0.99),
        max: quantile_ms(&mut lat, 1.0),
        copies_fast,
        copies_slow,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let Some(bin) = harness::find_binary("nginx") else {
            eprintln!("nginx not found; install it (scripts/test shows how)");
            std::process::exit(1);
        };
        let stable = DemoApp::start(DemoOpts::new("v1").track("stable")).await;
        let fast = DemoApp::start(DemoOpts::new("v2").track("fast")).await;
        let slow = DemoApp::start(DemoOpts::new("v2").track("slow").args(&["--latency-ms", "500"])).await;
        let backend = |id: &str, app: &DemoApp, group: &str| Backend {
            id: InstanceId::new(id).unwrap(),
            address: Address::parse(&app.addr.to_string()).unwrap(),
            group: g(group),
        };
        let backends = [
            backend("stable-1", &stable, "stable"),
            backend("fast-1", &fast, "fast"),
            backend("slow-1", &slow, "slow"),
        ];
        let dir = temp_dir("dk-mirror-bench-");
        let port = free_port();
        write_config(dir.path(), port);
        let lb = NginxLoadBalancer::builder()
            .upstream("app")
            .include_file(Nginx::upstream_file(dir.path()))
            .location_include(dir.path().join("location.conf"))
            .binary(&bin)
            .prefix(format!("{}/", dir.path().display()))
            .config_file(Nginx::conf(dir.path()))
            .error_log_stderr(true)
            .pid_file(Nginx::pid_file(dir.path()))
            .backends(backends.iter().cloned())
            .build()
            .expect("the nginx driver");
        lb.install().await.expect("install the includes");
        let nginx = Nginx::start(&bin, dir.path(), port).await;
        let url = nginx.url("/");
        let (fast_addr, slow_addr) = (fast.addr.to_string(), slow.addr.to_string());
        println!(
            "mirror: nginx in front of stable (answers at once), a fast shadow and a slow one (--latency-ms 500); \
             {RATE} GET/s open loop for {}s per row, never retried; latency from when each request was due",
            ROW.as_secs()
        );
        println!("| mirror | client | requests | failed | p50 ms | p99 ms | max ms | copies to fast | copies to slow |");
        println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
        // The same files, rendered with the mirror timeout.
        let cut = NginxLoadBalancer::builder()
            .upstream("app")
            .include_file(Nginx::upstream_file(dir.path()))
            .location_include(dir.path().join("location.conf"))
            .binary(&bin)
            .prefix(format!("{}/", dir.path().display()))
            .config_file(Nginx::conf(dir.path()))
            .error_log_stderr(true)
            .pid_file(Nginx::pid_file(dir.path()))
            .backends(backends.iter().cloned())
            .mirror_timeout(MIRROR_TIMEOUT)
            .build()
            .expect("the nginx driver with a mirror timeout");
        let cut_name = format!("every GET to the slow shadow, mirror_timeout {}ms", MIRROR_TIMEOUT.as_millis());
        for (name, to, driver) in [
            ("none", None, &lb),
            ("every GET to the fast shadow", Some("fast"), &lb),
            ("every GET to the slow shadow", Some("slow"), &lb),
            (cut_name.as_str(), Some("slow"), &cut),
        ] {
            driver.apply_policy(&policy(to)).await.expect("apply the policy");
            // The reload's old worker closes its idle connections; start
            // each row on the new one.
            tokio::time::sleep(Duration::from_millis(500)).await;
            for (client, keep_alive) in [("keep-alive", true), ("connection per request", false)] {
                let r = row(&url, keep_alive, &fast_addr, &slow_addr).await;
                println!(
                    "| {name} | {client} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} |",
                    r.requests, r.failed, r.p50, r.p99, r.max, r.copies_fast, r.copies_slow
                );
            }
        }
        drop(nginx);
    });
}
