//! The testkit's conformance suite against every built-in driver on real
//! servers: nginx and HAProxy in front of demo apps, the symlink switch on
//! a temp dir, local and SSH instances running demo-app releases, and
//! Prometheus scraping a demo app.
//!
//! Each test fails with the contract clause a driver broke
//! (`ConformanceFailure`'s message), and asserts that the clauses the driver
//! can honour were checked, not skipped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploykit::lb::SymlinkSwitch;
use deploykit::metrics::prometheus::Prometheus;
use deploykit::routing::{Capabilities, Capability};
use deploykit::{Backend, Group, LoadBalancer, Metric, ReleaseId};
use deploykit_testkit::conformance::{
    self, Clause, Conformance, LoadBalancerSuite, MetricsSuite, ProbeFuture, ProbeRequest, TrafficProbe,
};

use crate::harness::{backend, free_port, make_release, temp_dir, DemoApp, DemoOpts, Http, KillOnDrop};

fn releases() -> [ReleaseId; 2] {
    [ReleaseId::new("v1").unwrap(), ReleaseId::new("v2").unwrap()]
}

/// The clauses a driver that can do everything must pass.
fn assert_all_checked(done: &Conformance, driver: &str) {
    assert!(
        done.skipped.is_empty(),
        "{driver}: nothing may be skipped:\n{done}"
    );
    for c in [
        Clause::LbDrainCompletes,
        Clause::LbWeightsReadBack,
        Clause::LbSwitchCancelSafe,
        Clause::LbWeightsCancelSafe,
        Clause::LbDrainCancelSafe,
        Clause::LbUnknownBackendRefused,
        Clause::LbPolicyIdempotent,
        Clause::LbPolicyReadBack,
        Clause::LbPolicyUnsupportedRefused,
        Clause::LbPolicyInvalidRefused,
        Clause::LbPolicyReplaced,
        Clause::LbPolicyCancelSafe,
    ] {
        assert!(done.passed.contains(&c), "{driver}: {c} not checked:\n{done}");
    }
}

/// A probe sending each request to `base` (`http://127.0.0.1:PORT`) and
/// naming the group from the demo app's `x-app-track` answer header.
fn track_probe(base: String) -> TrafficProbe {
    let http = Http::with_keep_alive(false);
    Arc::new(move |req: ProbeRequest| {
        let (http, url) = (http.clone(), format!("{base}{}", req.path));
        Box::pin(async move {
            let headers: Vec<(&str, &str)> = req
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            let a = http.send("GET", &url, &headers).await?;
            if a.status != 200 {
                return Err(format!("status {}", a.status));
            }
            let track = a
                .headers
                .get("x-app-track")
                .ok_or("no x-app-track header in the answer")?;
            Group::new(track.as_str()).map_err(|e| e.to_string())
        }) as ProbeFuture
    })
}

/// nginx with the location include declares every capability: each policy
/// is applied, read back, sent requests by header, cookie and query,
/// replaced and cancelled; nothing is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_with_a_location_include_conforms_on_every_routing_policy() {
    let bin = crate::require_binary!("nginx");
    let setup = crate::routing::RoutingSetup::start(&bin).await;
    assert_eq!(setup.lb.capabilities(), Capabilities::of(Capability::ALL));
    let done = LoadBalancerSuite::default()
        .traffic_probe(track_probe(setup.nginx.url("")))
        .run(&setup.lb, &setup.backends)
        .await
        .unwrap_or_else(|e| panic!("{e}\nnginx stderr:\n{}", setup.nginx.stderr()));
    assert_all_checked(&done, "nginx with routing");
    // The suite leaves every request on the first group, rules gone.
    let probe = track_probe(setup.nginx.url(""));
    for p in conformance::policies(&[Group::new("stable").unwrap(), Group::new("canary").unwrap()]) {
        for (req, _) in p.routes {
            assert_eq!(probe(req.clone()).await.unwrap().as_str(), "stable", "{req}");
        }
    }
}

/// Clients sending slow requests through `url` until `stop` is set; each
/// returns how many answered 200 and the answers that were not a 200.
fn traffic(url: String, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<(usize, Vec<String>)>> {
    (0..4)
        .map(|_| {
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let http = Http::with_keep_alive(false);
                let (mut ok, mut bad) = (0, Vec::new());
                while !stop.load(Ordering::SeqCst) {
                    match http.get(&url).await {
                        Ok(a) if a.status == 200 => ok += 1,
                        Ok(a) => bad.push(format!("status {}", a.status)),
                        Err(e) => bad.push(e),
                    }
                }
                (ok, bad)
            })
        })
        .collect()
}

/// Stops the clients and returns every failed answer, after checking
/// that requests were answered meanwhile.
async fn failures(
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
) -> Vec<String> {
    stop.store(true, Ordering::SeqCst);
    let (mut ok, mut bad) = (0, Vec::new());
    for c in clients {
        let (n, b) = c.await.unwrap();
        ok += n;
        bad.extend(b);
    }
    assert!(ok > 0, "no request was answered during the suite");
    bad
}

/// Apps answering in 200 ms, so requests are in flight at every drain and
/// switch of the suite. Each group has two, so the one backend the suite
/// takes out always leaves a server for its group's traffic.
const SLOW: &[&str] = &["--latency-ms", "200"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_conforms_under_traffic() {
    let bin = crate::require_binary!("nginx");
    let setup = crate::nginx::NginxSetup::start(
        &bin,
        &[
            ("v1", "blue", SLOW),
            ("v1", "blue", SLOW),
            ("v2", "green", SLOW),
            ("v2", "green", SLOW),
        ],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = traffic(setup.nginx.url("/"), stop.clone());
    let done = conformance::load_balancer(&setup.lb, &setup.backends)
        .await
        .unwrap_or_else(|e| panic!("{e}\nnginx stderr:\n{}", setup.nginx.stderr()));
    let bad = failures(stop, clients).await;
    assert_all_checked(&done, "nginx");
    // Drains, reloads and cancelled changes never cut a request.
    assert!(bad.is_empty(), "failed requests: {bad:?}");
    // What the suite left is what nginx serves: every request to blue.
    let counts = setup.count(20).await;
    assert_eq!(counts.get("v1"), Some(&20), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_conforms_under_traffic() {
    let bin = crate::require_binary!("haproxy");
    let setup = crate::haproxy::HaproxySetup::start(
        &bin,
        &[
            ("v1", "blue", SLOW),
            ("v1", "blue", SLOW),
            ("v2", "green", SLOW),
            ("v2", "green", SLOW),
        ],
    )
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    let clients = traffic(setup.haproxy.url("/"), stop.clone());
    let done = conformance::load_balancer(&setup.lb, &setup.backends)
        .await
        .unwrap_or_else(|e| panic!("{e}\nhaproxy stderr:\n{}", setup.haproxy.stderr()));
    let bad = failures(stop, clients).await;
    assert_all_checked(&done, "haproxy");
    assert!(bad.is_empty(), "failed requests: {bad:?}");
    let counts = setup.count(20).await;
    assert_eq!(counts.get("v1"), Some(&20), "{counts:?}");
}

#[tokio::test]
async fn symlink_switch_conforms() {
    let tmp = temp_dir("dk-conformance-symlink-");
    let root = tmp.path();
    let mut switch = SymlinkSwitch::builder(root.join("live"));
    let mut backends: Vec<Backend> = Vec::new();
    for (i, env) in ["blue", "green"].into_iter().enumerate() {
        std::fs::create_dir_all(root.join(env)).unwrap();
        switch = switch.environment(Group::new(env).unwrap(), root.join(env));
        backends.push(backend(
            &format!("i-{}", i + 1),
            "127.0.0.1:9".parse().unwrap(),
            env,
        ));
    }
    let switch = switch.build().unwrap();
    // A symlink routes whole groups, all or nothing, and counts nothing.
    let done = LoadBalancerSuite::default()
        .without_per_backend_routing()
        .without_connection_counts()
        .without_splits()
        .run(&switch, &backends)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for c in [
        Clause::LbSwitchReadBack,
        Clause::LbSwitchCancelSafe,
        Clause::LbWeightsCancelSafe,
        Clause::LbFailedWeightsKeepSplit,
    ] {
        assert!(done.passed.contains(&c), "{c} not checked:\n{done}");
    }
    assert_eq!(std::fs::read_link(root.join("live")).unwrap(), root.join("blue"));
    assert_eq!(switch.live_group().await.unwrap().unwrap().as_str(), "blue");
}

#[tokio::test]
async fn local_instance_conforms() {
    let tmp = temp_dir("dk-conformance-local-");
    let builds = tmp.path().join("builds");
    for v in releases() {
        make_release(&builds, v.as_str());
    }
    let port = free_port();
    let inst = Arc::new(crate::local::local_instance(
        "web-1",
        port,
        &tmp.path().join("web-1"),
        &builds,
    ));
    let _guard = crate::local::StopOnDrop(inst.clone());
    let done = conformance::instance(inst.as_ref(), &releases())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(done.skipped.is_empty(), "{done}");
    // The suite leaves it stopped: nothing answers on its port.
    assert!(Http::new()
        .get(&format!("http://127.0.0.1:{port}/"))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_instance_conforms() {
    let Some(lab) = crate::sshd::SshLab::start(1) else {
        return;
    };
    let builds = lab.dir.path().join("builds");
    for v in releases() {
        make_release(&builds, v.as_str());
    }
    let (inst, address, root) = crate::ssh::ssh_instance(&lab, 0, &builds, 3);
    let _kill = KillOnDrop(vec![root]);
    let done = conformance::instance(&inst, &releases())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(done.skipped.is_empty(), "{done}");
    assert!(Http::new().get(&format!("http://{address}/")).await.is_err());
}

#[tokio::test]
async fn prometheus_conforms() {
    let bin = crate::require_binary!("prometheus");
    let dir = temp_dir("dk-conformance-prometheus-");
    let app = DemoApp::start(DemoOpts::new("v1").track("stable")).await;
    let server = crate::prometheus::PromServer::start(&bin, dir.path(), &[app.addr.to_string()]).await;
    let prom = server.source();
    // Steady traffic for the whole test, so every metric of the track has
    // data in the window.
    let url = app.url("/");
    let load = tokio::spawn(async move {
        let http = Http::new();
        loop {
            let _ = http.get(&url).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let window = Duration::from_secs(10);
    for m in [Metric::ErrorRate, Metric::LatencyP99, Metric::RequestCount] {
        crate::prometheus::wait_for_value(&prom, m, "stable", window).await;
    }
    let result = MetricsSuite::default()
        .window(window)
        .with_data(
            Group::new("stable").unwrap(),
            [Metric::ErrorRate, Metric::LatencyP99, Metric::RequestCount],
        )
        .without_data(Group::new("nobody").unwrap())
        .run(&prom)
        .await;
    load.abort();
    let done = result.unwrap_or_else(|e| panic!("{e}\nprometheus log:\n{}", server.log_text()));
    assert!(done.passed.contains(&Clause::MetricsNoDataIsNoData), "{done}");

    // Nothing listens on a fresh loopback port: every answer is a provider
    // error, never a value or no data.
    let dead = Prometheus::builder(format!("http://127.0.0.1:{}", free_port()))
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    MetricsSuite::default()
        .with_data(Group::new("stable").unwrap(), [])
        .unreachable()
        .run(&dead)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Kills `pid` and waits (bounded) until it is gone or a zombie.
async fn kill_and_wait(pid: u32) {
    crate::harness::sigkill(pid);
    crate::harness::eventually(Duration::from_secs(10), "the process is gone", || async {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        (st.is_empty() || st.contains(") Z ")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn nginx_that_is_down_is_reported_as_unreachable() {
    let bin = crate::require_binary!("nginx");
    let setup = crate::nginx::NginxSetup::start(&bin, &[("v1", "blue", &[]), ("v2", "green", &[])]).await;
    let master = setup.nginx.pid();
    let workers = crate::harness::eventually(Duration::from_secs(10), "nginx has workers", || async {
        let w = crate::harness::children_of(master);
        (!w.is_empty()).then_some(w)
    })
    .await;
    kill_and_wait(master).await;
    for w in workers {
        crate::harness::sigkill(w);
    }
    let done = LoadBalancerSuite::default()
        .unreachable()
        .run(&setup.lb, &setup.backends)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.passed, vec![Clause::LbUnreachableRefused]);
}

#[tokio::test]
async fn haproxy_that_is_down_is_reported_as_unreachable() {
    let bin = crate::require_binary!("haproxy");
    let mut setup =
        crate::haproxy::HaproxySetup::start(&bin, &[("v1", "blue", &[]), ("v2", "green", &[])]).await;
    let pid = setup.haproxy.child.id().expect("HAProxy runs");
    kill_and_wait(pid).await;
    let _ = setup.haproxy.child.wait().await;
    let done = LoadBalancerSuite::default()
        .unreachable()
        .run(&setup.lb, &setup.backends)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.passed, vec![Clause::LbUnreachableRefused]);
}

/// HAProxy with a map dir declares header, cookie, query and regex rules
/// and sticky splits: each is applied through its runtime map, read back,
/// sent requests (20 sticky users keep one group over three requests, both
/// groups reached), replaced and cancelled; mirroring, which it does not
/// declare, is refused naming HAProxy and leaves the live group and the
/// routes as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_with_a_map_dir_conforms_on_its_routing_policies() {
    let bin = crate::require_binary!("haproxy");
    let stable = DemoApp::start(DemoOpts::new("v1").track("stable")).await;
    let canary = DemoApp::start(DemoOpts::new("v2").track("canary")).await;
    let backends = vec![
        backend("i-1", stable.addr, "stable"),
        backend("i-2", canary.addr, "canary"),
    ];
    let dir = temp_dir("dk-conformance-haproxy-routing-");
    let maps = dir.path().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    // One use_backend line per rule the suite applies, each map loaded
    // (empty) at start, as docs/load-balancers.md has the user write them.
    let groups = [Group::new("stable").unwrap(), Group::new("canary").unwrap()];
    let cases = conformance::policies(&groups);
    let matches = cases
        .iter()
        .flat_map(|case| case.policy.rules.iter().map(|rule| &rule.matches));
    let stickies: Vec<_> = cases
        .iter()
        .filter_map(|c| c.policy.split.sticky.clone())
        .collect();
    let (haproxy, lb) =
        crate::routing::haproxy_with_maps(&bin, dir.path(), &maps, &backends, matches, &stickies).await;
    assert_eq!(stickies.len(), 2, "a sticky case per kind");
    for c in [
        Capability::HeaderMatch,
        Capability::QueryMatch,
        Capability::RegexMatch,
        Capability::StickyCookie,
        Capability::StickyKey,
    ] {
        assert!(lb.capabilities().supports(c), "{c}");
    }
    let done = LoadBalancerSuite::default()
        .traffic_probe(track_probe(haproxy.url("")))
        .run(&lb, &backends)
        .await
        .unwrap_or_else(|e| panic!("{e}\nhaproxy stderr:\n{}", haproxy.stderr()));
    assert_all_checked(&done, "haproxy with routing");
    // The suite leaves every request on the first group: no rule routes.
    let probe = track_probe(haproxy.url(""));
    for p in conformance::policies(&groups) {
        for (req, _) in p.routes {
            assert_eq!(probe(req.clone()).await.unwrap().as_str(), "stable", "{req}");
        }
    }
}
