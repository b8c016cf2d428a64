//! Blue-green switch and rollback times through real nginx and HAProxy.
//!
//! Two blue and two green demo-app processes run by `LocalInstance`s, the
//! balancer in front, the live state in a file. Each run deploys v2 to green
//! (`BlueGreen::deploy`, old environment kept warm) and then rolls back
//! (`BlueGreen::rollback`), while a poller sends requests through the
//! balancer back to back, each on a new connection, and notes when the first
//! answer from the new side arrives:
//!
//! * **switch**: from the executor starting the `switch_to` step to the first
//!   request answered by green (v2);
//! * **rollback**: from calling `rollback` (reconcile, health probe of the
//!   warm blue instances, record, switch) to the first request answered by
//!   blue (v1); and the whole call, which also stops green.
//!
//! Run: `cargo bench -p deploykit-e2e --bench blue_green_switch`
//! (`BENCH_RUNS=N`, default 7; needs nginx and haproxy on PATH or in
//! /usr/sbin; loopback only).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deploykit::bluegreen_state::FileLiveStore;
use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::lb::{HaproxyLoadBalancer, NginxLoadBalancer};
use deploykit::{BlueGreen, Event, EventKind, Executor, Group, Instance, KeepOld, LoadBalancer, ReleaseId};
use tokio::time::Instant;

#[allow(unused_macros)]
#[path = "../tests/real/harness.rs"]
mod harness;

use harness::{demo_app_binary, find_binary, free_port, temp_dir, HaServer, Haproxy, Http, Nginx};

struct Fleet {
    instances: Vec<Arc<LocalInstance>>,
    dir: tempfile::TempDir,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for i in &self.instances {
            let pidfile = format!("{}/app.pid", i.layout().root());
            if let Ok(text) = std::fs::read_to_string(pidfile) {
                if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) {
                    harness::sigkill(pid);
                }
            }
        }
    }
}

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

async fn fleet() -> Fleet {
    let dir = temp_dir("dk-bench-bg-");
    let builds = dir.path().join("builds");
    for r in ["v1", "v2"] {
        let rel = builds.join(r);
        std::fs::create_dir_all(&rel).unwrap();
        std::os::unix::fs::symlink(demo_app_binary(), rel.join("deploykit-demo-app")).unwrap();
    }
    let mut instances = Vec::new();
    for (n, group) in ["blue", "blue", "green", "green"].iter().enumerate() {
        let port = free_port();
        let name = format!("{group}-{}", n % 2 + 1);
        let spec = ProcessSpec::new([
            "./deploykit-demo-app".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--version".into(),
            "{release}".into(),
        ])
        .unwrap();
        let inst = LocalInstance::builder(name.as_str(), format!("127.0.0.1:{port}"))
            .group(*group)
            .root(dir.path().join(&name).to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            .process(spec)
            .build()
            .unwrap();
        inst.install(&v("v1")).await.unwrap();
        if *group == "blue" {
            inst.start().await.unwrap();
        }
        instances.push(Arc::new(inst));
    }
    for i in instances.iter().take(2) {
        let end = Instant::now() + Duration::from_secs(20);
        while !i.health().await.map(|h| h.is_healthy()).unwrap_or(false) {
            assert!(Instant::now() < end, "blue never got healthy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Fleet { instances, dir }
}

/// Polls `url` back to back (new connection each) until `stop` (hard stop
/// after 60 s); returns the time of the first answer whose version is
/// `want`.
fn first_answer(
    url: String,
    want: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Option<Instant>> {
    tokio::spawn(async move {
        let end = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::Relaxed) && Instant::now() < end {
            if let Ok(a) = Http::new().get(&url).await {
                if a.version.as_deref() == Some(want) {
                    return Some(Instant::now());
                }
            }
        }
        None
    })
}

#[derive(Default)]
struct Samples {
    switch: Vec<Duration>,
    rollback_first: Vec<Duration>,
    rollback_call: Vec<Duration>,
}

async fn run_once(exec: &Executor, switch_started: &Arc<Mutex<Option<Instant>>>, url: &str, s: &mut Samples) {
    let bg = BlueGreen {
        healthy_deadline: Duration::from_secs(20),
        health_interval: Duration::from_millis(20),
        warmup_requests: 20,
        keep_old: KeepOld::UntilNextDeployment,
        ..BlueGreen::default()
    };
    // Deploy: switch_to step start → first v2 answer.
    *switch_started.lock().unwrap() = None;
    let stop = Arc::new(AtomicBool::new(false));
    let poll = first_answer(url.to_string(), "v2", stop.clone());
    let out = bg.deploy(exec, &v("v2")).await.unwrap();
    assert!(out.is_success(), "{}", out.deployment);
    let seen = poll.await.unwrap().expect("green answered");
    let t0 = switch_started.lock().unwrap().expect("switch_to step seen");
    s.switch.push(seen.saturating_duration_since(t0));

    // Rollback: call → first v1 answer; and the whole call.
    let stop = Arc::new(AtomicBool::new(false));
    let poll = first_answer(url.to_string(), "v1", stop.clone());
    let t0 = Instant::now();
    let rb = bg.rollback(exec).await.unwrap();
    let call = t0.elapsed();
    assert!(rb.is_success(), "{}", rb.deployment);
    let seen = poll.await.unwrap().expect("blue answered");
    s.rollback_first.push(seen.saturating_duration_since(t0));
    s.rollback_call.push(call);
    stop.store(true, Ordering::Relaxed);
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn executor(f: &Fleet, lb: Arc<dyn LoadBalancer>, switch_started: Arc<Mutex<Option<Instant>>>) -> Executor {
    let sink = move |e: &Event| {
        if let EventKind::StepStarted {
            step,
            rollback: false,
            ..
        } = &e.kind
        {
            if *step == deploykit::StepKind::SwitchTo {
                switch_started.lock().unwrap().get_or_insert(Instant::now());
            }
        }
    };
    Executor::builder()
        .instances(f.instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
        .load_balancer(lb)
        .live_store(Arc::new(FileLiveStore::new(f.dir.path().join("live.json"))))
        .events(Arc::new(sink))
        .build()
        .unwrap()
}

async fn bench_nginx(bin: &Path, runs: usize) -> Samples {
    let f = fleet().await;
    let dir = temp_dir("dk-bench-bg-nginx-");
    let port = free_port();
    Nginx::write_config(dir.path(), port);
    let backends: Vec<_> = f.instances.iter().map(|i| i.backend().clone()).collect();
    let lb = NginxLoadBalancer::builder()
        .upstream("app")
        .include_file(Nginx::upstream_file(dir.path()))
        .binary(bin)
        .prefix(format!("{}/", dir.path().display()))
        .config_file(Nginx::conf(dir.path()))
        .error_log_stderr(true)
        .pid_file(Nginx::pid_file(dir.path()))
        .backends(backends)
        .build()
        .unwrap();
    lb.install().await.unwrap();
    let nginx = Nginx::start(bin, dir.path(), port).await;
    lb.switch_to(&Group::new("blue").unwrap()).await.unwrap();
    let started = Arc::new(Mutex::new(None));
    let exec = executor(&f, Arc::new(lb), started.clone());
    let mut s = Samples::default();
    for _ in 0..runs {
        run_once(&exec, &started, &nginx.url("/"), &mut s).await;
    }
    s
}

async fn bench_haproxy(bin: &Path, runs: usize) -> Samples {
    let f = fleet().await;
    let dir = temp_dir("dk-bench-bg-haproxy-");
    let port = free_port();
    let servers: Vec<HaServer> = f
        .instances
        .iter()
        .map(|i| HaServer {
            name: i.backend().id.to_string(),
            addr: i.backend().address.to_string().parse().unwrap(),
            weight: 1,
        })
        .collect();
    let haproxy = Haproxy::start(
        bin,
        dir.path(),
        port,
        &Haproxy::config(dir.path(), port, "app", &servers),
    )
    .await;
    let lb = HaproxyLoadBalancer::builder()
        .socket(Haproxy::socket(dir.path()))
        .backend_name("app")
        .backends(f.instances.iter().map(|i| i.backend().clone()))
        .build()
        .unwrap();
    lb.switch_to(&Group::new("blue").unwrap()).await.unwrap();
    let started = Arc::new(Mutex::new(None));
    let exec = executor(&f, Arc::new(lb), started.clone());
    let mut s = Samples::default();
    for _ in 0..runs {
        run_once(&exec, &started, &haproxy.url("/"), &mut s).await;
    }
    s
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7)
        .max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let bins: Vec<(&str, Option<PathBuf>)> = ["nginx", "haproxy"]
        .iter()
        .map(|b| (*b, find_binary(b)))
        .collect();
    println!("blue-green switch and rollback, {runs} run(s) each, 2 + 2 demo-app instances");
    println!("| balancer | switch: step start → first green answer | rollback: call → first blue answer | rollback call (incl. stopping green) |");
    println!("|---|---|---|---|");
    for (name, bin) in bins {
        let Some(bin) = bin else {
            println!("| {name} | (not installed) | | |");
            continue;
        };
        let s = rt.block_on(async {
            match name {
                "nginx" => bench_nginx(&bin, runs).await,
                _ => bench_haproxy(&bin, runs).await,
            }
        });
        println!(
            "| {name} | {} | {} | {} |",
            ms(median(&s.switch)),
            ms(median(&s.rollback_first)),
            ms(median(&s.rollback_call))
        );
    }
}
