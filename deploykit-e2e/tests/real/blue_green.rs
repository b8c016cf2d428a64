//! Blue-green against real nginx and HAProxy with real demo-app processes
//! run by `LocalInstance`s: the switch moves 100 % of traffic, a rollback
//! moves it back, and the zero-downtime load generator running through both
//! sees 0 failed requests.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deploykit::bluegreen_state::FileLiveStore;
use deploykit::instance::LocalInstance;
use deploykit::lb::HaproxyLoadBalancer;
use deploykit::{BlueGreen, Executor, Group, Instance, KeepOld, LoadBalancer, ReleaseId};

use crate::harness::{eventually, free_port, temp_dir, HaServer, Haproxy, Http, Nginx};
use crate::load::{quantile_ms, Client, LoadGen};
use crate::local::{demo_spec, make_release, wait_healthy};

/// Two blue and two green demo-app instances in a temp dir: blue runs v1,
/// green has v1 installed and is stopped.
pub(crate) struct Envs {
    pub(crate) instances: Vec<Arc<LocalInstance>>,
    pub(crate) dir: tempfile::TempDir,
}

impl Drop for Envs {
    fn drop(&mut self) {
        for i in &self.instances {
            let pidfile = format!("{}/app.pid", i.layout().root());
            if let Ok(text) = std::fs::read_to_string(pidfile) {
                if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) {
                    crate::harness::sigkill(pid);
                }
            }
        }
    }
}

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

impl Envs {
    pub(crate) async fn start() -> Envs {
        let dir = temp_dir("dk-bluegreen-");
        let builds = dir.path().join("builds");
        for r in ["v1", "v2"] {
            make_release(&builds, r);
        }
        let mut instances = Vec::new();
        for (n, group) in ["blue", "blue", "green", "green"].iter().enumerate() {
            let port = free_port();
            let name = format!("{group}-{}", n % 2 + 1);
            let inst = LocalInstance::builder(name.as_str(), format!("127.0.0.1:{port}"))
                .group(*group)
                .root(dir.path().join(&name).to_str().unwrap())
                .source(deploykit::instance::ReleaseSource::directory(&builds))
                .process(demo_spec(port))
                .build()
                .unwrap();
            instances.push(Arc::new(inst));
        }
        let envs = Envs { instances, dir };
        for i in &envs.instances {
            i.install(&v("v1")).await.unwrap();
            if i.backend().group.as_str() == "blue" {
                i.start().await.unwrap();
                wait_healthy(i.as_ref()).await;
            }
        }
        envs
    }

    pub(crate) fn backends(&self) -> Vec<deploykit::Backend> {
        self.instances.iter().map(|i| i.backend().clone()).collect()
    }

    pub(crate) fn executor(&self, lb: Arc<dyn LoadBalancer>) -> Executor {
        Executor::builder()
            .instances(self.instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
            .load_balancer(lb)
            .live_store(Arc::new(FileLiveStore::new(self.dir.path().join("live.json"))))
            .build()
            .unwrap()
    }
}

/// Quick real-server settings: health probed every 50 ms for at most 20 s,
/// a short warm-up, the old environment kept warm until the next
/// deployment (so the rollback is a switch).
pub(crate) fn quick() -> BlueGreen {
    BlueGreen {
        healthy_deadline: Duration::from_secs(20),
        health_interval: Duration::from_millis(50),
        warmup_requests: 20,
        keep_old: KeepOld::UntilNextDeployment,
        ..BlueGreen::default()
    }
}

/// The p99 latency a switch and a rollback may reach: generous, but a
/// request held for a retry or a stalled reload shows.
const P99_BOUND_MS: f64 = 1000.0;

/// Deploys v2 (checking 100 % of traffic on v2 right after the switch),
/// rolls back (checking 100 % on v1), all while `url` is under load; 0
/// failed requests.
///
/// The load client never retries; `keep_alive` false opens a connection per
/// request (for nginx, whose switch is a reload: a reload closes idle
/// keep-alive connections under requests the client has not written yet,
/// which only a retrying client survives).
async fn switch_and_roll_back_under_load(envs: &Envs, exec: &Executor, url: &str, keep_alive: bool) {
    let http = Http::new();
    // Set-up: wait (bounded) until the balancer serves blue only.
    eventually(
        Duration::from_secs(10),
        "blue serves all of 20 requests",
        || async { (http.count_versions(url, 20).await.get("v1") == Some(&20)).then_some(()) },
    )
    .await;

    // ~500 requests/s, hard stop after 60 s, with a client that never
    // retries: every request that fails on the way shows.
    let running = LoadGen::open_loop(url, 500, Duration::from_secs(60), keep_alive, Client::NonRetrying);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let bg = quick();
    let out = bg.deploy(exec, &v("v2")).await.unwrap();
    assert!(out.is_success(), "{}", out.deployment);
    assert_eq!(out.live, g("green"));
    let after = http.count_versions(url, 40).await;
    assert_eq!(
        after.get("v2"),
        Some(&40),
        "100 % on green/v2 right after the switch: {after:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let rb = bg.rollback(exec).await.unwrap();
    assert!(rb.is_success(), "{}", rb.deployment);
    assert_eq!(rb.live, g("blue"));
    let back = http.count_versions(url, 40).await;
    assert_eq!(
        back.get("v1"),
        Some(&40),
        "100 % back on blue/v1 after the rollback: {back:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    let samples = running.stop().await;
    let failed: Vec<_> = samples.iter().filter_map(|x| x.outcome.as_ref().err()).collect();
    let mut latencies: Vec<Duration> = samples.iter().map(|x| x.latency).collect();
    let p99 = quantile_ms(&mut latencies, 0.99);
    let mut versions = BTreeMap::new();
    for x in &samples {
        if let Ok(v) = &x.outcome {
            *versions.entry(v.as_str()).or_insert(0) += 1;
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the switch and the rollback (first: {:?})",
        failed.len(),
        samples.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        samples.len() > 100,
        "the load generator ran: {} requests",
        samples.len()
    );
    assert!(
        p99 <= P99_BOUND_MS,
        "p99 across the switch and the rollback is {p99:.1} ms, above {P99_BOUND_MS} ms"
    );
    assert!(
        versions.contains_key("v1") && versions.contains_key("v2"),
        "{versions:?}"
    );

    // The rollback stopped green; blue runs v1, green keeps v2 installed.
    for i in &envs.instances {
        let blue = i.backend().group.as_str() == "blue";
        assert_eq!(
            i.current_release().await.unwrap(),
            Some(v(if blue { "v1" } else { "v2" }))
        );
        assert_eq!(i.is_running().await.unwrap(), blue, "{}", i.backend().id);
    }
    let state = std::fs::read_to_string(envs.dir.path().join("live.json")).unwrap();
    assert_eq!(state, r#"{"version":1,"live":"blue"}"#);
}

fn nginx_driver(bin: &Path, dir: &Path, envs: &Envs) -> deploykit::lb::NginxLoadBalancer {
    crate::nginx::driver(bin, dir, &envs.backends())
}

#[tokio::test]
async fn nginx_switch_and_rollback_move_all_traffic_with_zero_failed_requests() {
    let bin = crate::require_binary!("nginx");
    let envs = Envs::start().await;
    let dir = temp_dir("dk-bg-nginx-");
    let port = free_port();
    Nginx::write_config(dir.path(), port);
    let lb = nginx_driver(&bin, dir.path(), &envs);
    lb.install().await.unwrap();
    let nginx = Nginx::start(&bin, dir.path(), port).await;
    if let Err(e) = lb.switch_to(&g("blue")).await {
        panic!(
            "set-up: switching nginx to blue failed: {e}\nnginx stderr:\n{}",
            nginx.stderr()
        );
    }
    let exec = envs.executor(Arc::new(lb));
    switch_and_roll_back_under_load(&envs, &exec, &nginx.url("/"), false).await;
}

pub(crate) fn haproxy_driver(dir: &Path, envs: &Envs) -> HaproxyLoadBalancer {
    HaproxyLoadBalancer::builder()
        .socket(Haproxy::socket(dir))
        .backend_name("app")
        .backends(envs.backends())
        .build()
        .unwrap()
}

pub(crate) async fn start_haproxy(bin: &Path, dir: &Path, envs: &Envs) -> Haproxy {
    let port = free_port();
    let servers: Vec<HaServer> = envs
        .instances
        .iter()
        .map(|i| HaServer {
            name: i.backend().id.to_string(),
            addr: i.backend().address.to_string().parse().unwrap(),
            weight: 1,
        })
        .collect();
    let cfg = Haproxy::config(dir, port, "app", &servers);
    Haproxy::start(bin, dir, port, &cfg).await
}

#[tokio::test]
async fn haproxy_switch_and_rollback_move_all_traffic_with_zero_failed_requests() {
    let bin = crate::require_binary!("haproxy");
    let envs = Envs::start().await;
    let dir = temp_dir("dk-bg-haproxy-");
    let haproxy = start_haproxy(&bin, dir.path(), &envs).await;
    let lb = haproxy_driver(dir.path(), &envs);
    lb.switch_to(&g("blue")).await.unwrap();
    let exec = envs.executor(Arc::new(lb));
    switch_and_roll_back_under_load(&envs, &exec, &haproxy.url("/"), true).await;
}

#[tokio::test]
async fn a_failing_smoke_check_on_a_real_instance_leaves_nginx_on_blue() {
    let bin = crate::require_binary!("nginx");
    let envs = Envs::start().await;
    let dir = temp_dir("dk-bg-nginx-smoke-");
    let port = free_port();
    Nginx::write_config(dir.path(), port);
    let lb = nginx_driver(&bin, dir.path(), &envs);
    lb.install().await.unwrap();
    let nginx = Nginx::start(&bin, dir.path(), port).await;
    lb.switch_to(&g("blue")).await.unwrap();
    let exec = envs.executor(Arc::new(lb));
    // The demo app answers `ok`; demand something it never says.
    let bg = BlueGreen {
        smoke_checks: vec![
            deploykit::SmokeCheck::get("/health"),
            deploykit::SmokeCheck::get("/api/db/ping").containing("replica-ok"),
        ],
        ..quick()
    };
    let out = bg.deploy(&exec, &v("v2")).await.unwrap();
    assert!(!out.is_success());
    let err = out
        .deployment
        .instances
        .iter()
        .find_map(|i| i.error.clone())
        .unwrap();
    assert!(
        err.contains("GET /api/db/ping -> 200 containing \"replica-ok\"")
            && err.contains("got status 200 with body"),
        "{err}"
    );
    let now = Http::new().count_versions(&nginx.url("/"), 20).await;
    assert_eq!(now.get("v1"), Some(&20), "{now:?}");
    for i in &envs.instances {
        let blue = i.backend().group.as_str() == "blue";
        assert_eq!(i.is_running().await.unwrap(), blue, "{}", i.backend().id);
        assert_eq!(i.current_release().await.unwrap(), Some(v("v1")));
    }
}
