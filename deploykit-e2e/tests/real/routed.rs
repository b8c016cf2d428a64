//! The strategies built on routing policies, run by the executor against a
//! real nginx (with its location include) and real demo-app processes run
//! by `LocalInstance`s: a ramp's observed canary share follows its curve
//! step by step, and a shadow receives mirrored GETs (never POSTs) while
//! every client answer comes from stable; open-loop load that never
//! retries runs throughout each and sees no failed request. The analysis
//! reads scripted healthy metrics (the routing is what is under test
//! here).

use std::sync::Arc;
use std::time::Duration;

use deploykit::instance::LocalInstance;
use deploykit::{
    Canary, Event, EventKind, EventSink, Executor, Instance, LoadBalancer, Metric, RampCurve, Ramped,
    ReleaseId, Shadow, StepKind,
};
use deploykit_testkit::FakeMetrics;
use tokio::sync::mpsc;

use crate::harness::{free_port, temp_dir, Http, Nginx};
use crate::load::{Client, LoadGen};
use crate::local::{demo_spec, make_release, wait_healthy};
use crate::routing::{location_file, write_routing_config};

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

/// Hands every event to the test as it happens.
struct Channel(mpsc::UnboundedSender<Event>);

impl EventSink for Channel {
    fn emit(&self, event: &Event) {
        let _ = self.0.send(event.clone());
    }
}

/// Two stable instances running v1 and one canary with v1 installed,
/// stopped, behind nginx with routing on; the executor's events come out
/// of `events`.
struct Setup {
    instances: Vec<Arc<LocalInstance>>,
    exec: Executor,
    events: mpsc::UnboundedReceiver<Event>,
    nginx: Nginx,
    _dir: tempfile::TempDir,
}

impl Drop for Setup {
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

impl Setup {
    async fn start(binary: &std::path::Path) -> Setup {
        let dir = temp_dir("dk-routed-");
        let builds = dir.path().join("builds");
        for r in ["v1", "v2"] {
            make_release(&builds, r);
        }
        let mut instances = Vec::new();
        for (name, group) in [
            ("stable-1", "stable"),
            ("stable-2", "stable"),
            ("canary-1", "canary"),
        ] {
            let port = free_port();
            let inst = LocalInstance::builder(name, format!("127.0.0.1:{port}"))
                .group(group)
                .root(dir.path().join(name).to_str().unwrap())
                .source(deploykit::instance::ReleaseSource::directory(&builds))
                .process(demo_spec(port))
                .build()
                .unwrap();
            inst.install(&v("v1")).await.unwrap();
            if group == "stable" {
                inst.start().await.unwrap();
                wait_healthy(&inst).await;
            }
            instances.push(Arc::new(inst));
        }
        let backends: Vec<_> = instances.iter().map(|i| i.backend().clone()).collect();
        let port = free_port();
        write_routing_config(dir.path(), port);
        let lb = crate::nginx::builder(binary, dir.path(), &backends)
            .location_include(location_file(dir.path()))
            // Rendered into the mirror location: nginx -t must accept it.
            .mirror_timeout(Duration::from_secs(2))
            .build()
            .expect("build the nginx driver with routing");
        lb.install().await.expect("install both owned files");
        let nginx = Nginx::start(binary, dir.path(), port).await;
        // What every canary-shaped run leaves behind: the stopped canary
        // out of the split (a fresh install has every server in rotation).
        lb.set_weights(&[
            deploykit::GroupWeight {
                group: deploykit::Group::new("stable").unwrap(),
                percent: 100,
            },
            deploykit::GroupWeight {
                group: deploykit::Group::new("canary").unwrap(),
                percent: 0,
            },
        ])
        .await
        .expect("all traffic to stable");
        let metrics = FakeMetrics::new()
            .set("stable", Metric::ErrorRate, 0.001)
            .set("stable", Metric::LatencyP99, 0.05)
            .set("stable", Metric::RequestCount, 1000.0)
            .set("canary", Metric::ErrorRate, 0.001)
            .set("canary", Metric::LatencyP99, 0.05);
        let (tx, events) = mpsc::unbounded_channel();
        let exec = Executor::builder()
            .instances(instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
            .load_balancer(Arc::new(lb) as Arc<dyn LoadBalancer>)
            .metrics(Arc::new(metrics))
            .events(Arc::new(Channel(tx)))
            .build()
            .unwrap();
        Setup {
            instances,
            exec,
            events,
            nginx,
            _dir: dir,
        }
    }

    /// Quick canary settings: probes every 50 ms, checks every 250 ms.
    fn base() -> Canary {
        let mut c = Canary {
            check_interval: Duration::from_millis(250),
            stage_duration: Duration::from_millis(500),
            health: deploykit::HealthCheck {
                retries: 200,
                interval: Duration::from_millis(50),
            },
            drain_timeout: Duration::from_secs(2),
            ..Canary::default()
        };
        c.analysis.window = Duration::from_secs(1);
        c
    }
}

/// Open-loop load through nginx for the whole deployment: 100 GETs a
/// second, a new connection each (an nginx reload closes idle keep-alive
/// connections under a client, which no deploykit change avoids; the
/// zero_downtime bench measures it), never retried.
fn load(url: &str) -> LoadGen {
    LoadGen::open_loop(url, 100, Duration::from_secs(60), false, Client::NonRetrying)
}

/// Stops the load and asserts that it ran and that not one request failed.
async fn assert_no_failed_request(load: LoadGen) {
    let samples = load.stop().await;
    let failed: Vec<_> = samples
        .iter()
        .filter_map(|s| s.outcome.as_ref().err().map(|e| (s.at, e)))
        .collect();
    assert!(samples.len() >= 100, "only {} requests", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        samples.len()
    );
}

/// How many of `n` GETs through nginx `v2` answered.
async fn v2_share(http: &Http, url: &str, n: usize) -> usize {
    let mut v2 = 0;
    for _ in 0..n {
        let a = http.get(url).await.expect("GET through nginx");
        assert_eq!(a.status, 200, "{a:?}");
        if a.body.trim() == "v2" {
            v2 += 1;
        }
    }
    v2
}

#[tokio::test]
async fn a_ramp_through_real_nginx_moves_the_observed_share_along_its_curve() {
    let bin = crate::require_binary!("nginx");
    let mut s = Setup::start(&bin).await;
    let ramp = Ramped {
        base: Setup::base(),
        from: 20,
        to: 80,
        duration: Duration::from_secs(3),
        step_interval: Duration::from_secs(1),
        curve: RampCurve::Linear,
        ..Ramped::default()
    };
    let url = s.nginx.url("/");
    let http = Http::new();
    let load = load(&url);
    let sampler = async {
        let mut stage = String::new();
        let mut seen = Vec::new();
        while let Some(e) = s.events.recv().await {
            match e.kind {
                EventKind::StageStarted { name, .. } => stage = name,
                EventKind::StepFinished {
                    step: StepKind::SetWeights,
                    ..
                } if stage.starts_with("ramp ") => {
                    // Right after the weight change is confirmed: 100
                    // requests, each answered by whichever the split picks.
                    let percent: usize = stage[5..].split('%').next().unwrap().parse().unwrap();
                    seen.push((percent, v2_share(&http, &url, 100).await));
                }
                EventKind::DeploymentFinished { .. } => break,
                _ => {}
            }
        }
        seen
    };
    let release = v("v2");
    let (report, seen) = tokio::join!(s.exec.deploy(&ramp, &release), sampler);
    let report = report.expect("deployment starts");
    assert!(report.is_success(), "{report}");
    let intended: Vec<usize> = seen.iter().map(|(p, _)| *p).collect();
    assert_no_failed_request(load).await;
    assert_eq!(intended, [20, 40, 60, 80], "{seen:?}");
    for (percent, observed) in &seen {
        // nginx's weighted round robin is exact over a cycle; allow for
        // the cycle a request of another client (a health probe) shifts.
        assert!(
            observed.abs_diff(*percent) <= 10,
            "{percent} % intended, {observed} of 100 observed: {seen:?}"
        );
    }
    // Finalized: stable runs v2, all traffic back on stable.
    assert_eq!(v2_share(&http, &url, 20).await, 20);
}

/// A counter of the app at `addr`: the sum of the `metric` lines whose
/// labels contain `label`.
async fn counter(http: &Http, addr: &str, metric: &str, label: &str) -> u64 {
    let text = http
        .get(&format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .body;
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

#[tokio::test]
async fn a_shadow_behind_real_nginx_gets_copies_of_gets_only_and_never_answers_a_client() {
    let bin = crate::require_binary!("nginx");
    let mut s = Setup::start(&bin).await;
    let shadow = Shadow {
        base: Setup::base(),
        percent: 50,
        duration: Duration::from_secs(4),
        ..Shadow::default()
    };
    let url = s.nginx.url("/");
    let checkout = s.nginx.url("/api/checkout");
    let shadow_addr = s.instances[2].backend().address.to_string();
    let http = Http::new();
    let load = load(&url);
    let client = async {
        let mut result = None;
        while let Some(e) = s.events.recv().await {
            match e.kind {
                EventKind::StepFinished {
                    step: StepKind::ApplyPolicy,
                    ..
                } => {
                    // The measured GETs are checkouts, which the shadow
                    // counts apart from the load's GETs of `/` (mirrored
                    // too).
                    let visits = || counter(&http, &shadow_addr, "checkout_visits_total", "");
                    let posts = || counter(&http, &shadow_addr, "http_requests_total", "code=\"405\"");
                    let (before_get, before_post) = (visits().await, posts().await);
                    for _ in 0..30 {
                        let a = http.send("POST", &url, &[]).await.expect("POST through nginx");
                        assert_ne!(a.body.trim(), "v2", "a client was answered by the shadow: {a:?}");
                    }
                    let mut answered_v2 = 0;
                    for _ in 0..200 {
                        let a = http.get(&checkout).await.expect("GET through nginx");
                        assert_eq!(a.status, 200, "{a:?}");
                        if a.version.as_deref() == Some("v2") {
                            answered_v2 += 1;
                        }
                    }
                    // The copies are sent alongside; give them a moment.
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let copies = visits().await - before_get;
                    let posts = posts().await - before_post;
                    result = Some((answered_v2, copies, posts));
                }
                EventKind::DeploymentFinished { .. } => break,
                _ => {}
            }
        }
        result.expect("the mirror was applied")
    };
    let release = v("v2");
    let (report, (answered_v2, copies, posts)) = tokio::join!(s.exec.deploy(&shadow, &release), client);
    let report = report.expect("deployment starts");
    assert!(report.is_success(), "{report}");
    assert_no_failed_request(load).await;
    assert_eq!(answered_v2, 0, "clients are only answered by stable");
    // 50 % of 200 checkouts: 100 copies, 5 standard deviations (7) either way.
    assert!(
        (65..=135).contains(&copies),
        "{copies} copies of 200 checkouts at 50 %"
    );
    assert_eq!(posts, 0, "POSTs are not mirrored");
    // Torn down: stable still on v1 and serving, the shadow stopped.
    assert_eq!(v2_share(&http, &url, 20).await, 0);
    assert!(!s.instances[2]
        .health()
        .await
        .map(|h| h.is_healthy())
        .unwrap_or(false));
}
