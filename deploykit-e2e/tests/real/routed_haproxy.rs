//! The routed strategies through a real HAProxy: a ramp and a header-rule
//! dark launch run by the executor against demo-app processes run by
//! `LocalInstance`s, with open-loop keep-alive load that never retries
//! running from before the first step to after the last. HAProxy changes
//! weights and routing maps at run time, without a reload, so not one
//! request may fail. The analysis reads scripted healthy metrics (the
//! routing is what is under test here).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploykit::instance::{LocalInstance, ReleaseSource};
use deploykit::lb::HaproxyLoadBalancer;
use deploykit::routing::{Match, Rule, Sticky, ValueMatch};
use deploykit::{
    Canary, DarkLaunch, Executor, Experiment, Group, GroupWeight, Instance, LoadBalancer, Metric,
    PromotionHandle, RampCurve, Ramped, ReleaseId, Strategy,
};
use deploykit_testkit::FakeMetrics;

use crate::harness::{free_port, temp_dir, Haproxy, Http, KillOnDrop};
use crate::load::{Client, LoadGen, Sample};
use crate::local::{demo_spec, make_release, wait_healthy};

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

/// The dark launch's rule: testers send `x-beta: yes`.
fn beta() -> Rule {
    Rule {
        matches: Match::Header {
            name: "x-beta".into(),
            value: ValueMatch::Exact("yes".into()),
        },
        group: g("canary"),
    }
}

/// Two stable instances running v1 and one canary with v1 installed,
/// stopped and out of the split (as every canary-shaped run leaves it),
/// behind HAProxy with a group backend per group and the `x-beta` map
/// loaded, as docs/load-balancers.md has the user write them.
struct Setup {
    instances: Vec<Arc<LocalInstance>>,
    lb: HaproxyLoadBalancer,
    haproxy: Haproxy,
    _kill: KillOnDrop<std::path::PathBuf>,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start(binary: &std::path::Path) -> Setup {
        Self::start_with(binary, &[]).await
    }

    /// As [`start`](Self::start), with the lines and maps of `stickies`
    /// in haproxy.cfg too.
    async fn start_with(binary: &std::path::Path, stickies: &[Sticky]) -> Setup {
        let dir = temp_dir("dk-routed-haproxy-");
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
                .source(ReleaseSource::directory(&builds))
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
        let kill = KillOnDrop(instances.iter().map(|i| i.layout().root().into()).collect());
        let maps = dir.path().join("maps");
        std::fs::create_dir_all(&maps).unwrap();
        let line = deploykit::lb::haproxy::config_line(&maps, "app", &beta().matches);
        let map = maps.join("app.header.x-beta.exact.map");
        assert!(line.contains(map.to_str().unwrap()), "{line}");
        let lines = crate::routing::frontend_lines(&maps, [&beta().matches], stickies);
        assert!(map.exists(), "{}", map.display());
        let addr = |i: usize| instances[i].backend().address.to_string();
        let port = free_port();
        // Health checks every 100 ms, as tracking needs them; `retries 0`
        // and no redispatch: a request HAProxy sent to a server that could
        // not answer fails, so the test sees it.
        let cfg = format!(
            r#"global
    stats socket {sock} mode 600 level admin
    stats timeout 30s
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout queue 10s
frontend fe
    bind 127.0.0.1:{port}
{lines}    default_backend app
backend app
    balance roundrobin
    retries 0
    server stable-1 {s1} weight 1 check inter 100ms
    server stable-2 {s2} weight 1 check inter 100ms
    server canary-1 {c1} weight 1 check inter 100ms
backend app__stable
    server stable-1 {s1} track app/stable-1
    server stable-2 {s2} track app/stable-2
backend app__canary
    server canary-1 {c1} track app/canary-1
"#,
            sock = Haproxy::socket(dir.path()).display(),
            s1 = addr(0),
            s2 = addr(1),
            c1 = addr(2),
        );
        let haproxy = Haproxy::start(binary, dir.path(), port, &cfg).await;
        let lb = HaproxyLoadBalancer::builder()
            .socket(Haproxy::socket(dir.path()))
            .backend_name("app")
            .backends(instances.iter().map(|i| i.backend().clone()))
            .map_dir(&maps)
            .build()
            .unwrap();
        lb.check().await.expect("HAProxy knows every server");
        lb.set_weights(&[
            GroupWeight {
                group: g("stable"),
                percent: 100,
            },
            GroupWeight {
                group: g("canary"),
                percent: 0,
            },
        ])
        .await
        .expect("all traffic to stable");
        Setup {
            instances,
            lb,
            haproxy,
            _kill: kill,
            dir,
        }
    }

    fn executor(&self, promotion: Option<PromotionHandle>) -> Executor {
        let metrics = FakeMetrics::new()
            .set("stable", Metric::ErrorRate, 0.001)
            .set("stable", Metric::LatencyP99, 0.05)
            .set("stable", Metric::RequestCount, 1000.0)
            .set("canary", Metric::ErrorRate, 0.001)
            .set("canary", Metric::LatencyP99, 0.05)
            // An experiment's conversions: 5 % on stable, 30 % on the
            // canary, 1,000 visits a second each: a win once each has the
            // 3,000 visits the test is given, two to three seconds in.
            .script_tally("stable", tally(0.05))
            .script_tally("canary", tally(0.30));
        let mut b = Executor::builder()
            .instances(self.instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
            .load_balancer(Arc::new(self.lb.clone()) as Arc<dyn LoadBalancer>)
            .metrics(Arc::new(metrics))
            .drain_poll(Duration::from_millis(20));
        if let Some(h) = promotion {
            b = b.promotion(h);
        }
        b.build().unwrap()
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
            drain_timeout: Duration::from_secs(5),
            ..Canary::default()
        };
        c.analysis.window = Duration::from_secs(1);
        c
    }

    /// Keep-alive load that never retries, 200 GETs a second.
    fn load(&self) -> LoadGen {
        LoadGen::open_loop(
            &self.haproxy.url("/"),
            200,
            Duration::from_secs(60),
            true,
            Client::NonRetrying,
        )
    }

    /// Runs `strategy` with the load running throughout (half a second
    /// before and after); answers the load's samples.
    async fn deploy_under_load(&self, exec: &Executor, strategy: &dyn Strategy) -> Vec<Sample> {
        let load = self.load();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let report = exec.deploy(strategy, &v("v2")).await.expect("deployment starts");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let samples = load.stop().await;
        assert!(
            report.is_success(),
            "{report}\nHAProxy:\n{}",
            self.haproxy.stderr()
        );
        samples
    }
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

/// Visits (1,000 a second) and conversions at `rate` over any window.
fn tally(
    rate: f64,
) -> impl Fn(Duration, Duration) -> deploykit::judge::Measured<deploykit::experiment::Tally> {
    move |_t, window| {
        let visits = (1_000.0 * window.as_secs_f64()).max(1.0);
        deploykit::judge::Measured::Value(deploykit::experiment::Tally {
            visits,
            conversions: (visits * rate).round(),
        })
    }
}

/// Asserts that the load ran and not one of its requests failed; answers
/// how many `v2` answered.
fn assert_no_failed_request(samples: &[Sample]) -> usize {
    let failed: Vec<_> = samples
        .iter()
        .filter_map(|s| s.outcome.as_ref().err().map(|e| (s.at, e)))
        .collect();
    assert!(samples.len() >= 400, "only {} requests", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        samples.len()
    );
    samples
        .iter()
        .filter(|s| s.outcome.as_deref() == Ok("v2"))
        .count()
}

/// Every answer of `n` GETs through HAProxy, by version.
async fn versions(http: &Http, url: &str, headers: &[(&str, &str)], n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let a = http.send("GET", url, headers).await.expect("GET through HAProxy");
        assert_eq!(a.status, 200, "{a:?}");
        out.push(a.version.unwrap_or_default());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ramp_through_real_haproxy_fails_no_request_of_a_keep_alive_client_that_never_retries() {
    let bin = crate::require_binary!("haproxy");
    let s = Setup::start(&bin).await;
    let ramp = Ramped {
        base: Setup::base(),
        from: 25,
        to: 100,
        duration: Duration::from_secs(2),
        step_interval: Duration::from_millis(500),
        curve: RampCurve::Linear,
        ..Ramped::default()
    };
    let exec = s.executor(None);
    let samples = s.deploy_under_load(&exec, &ramp).await;
    let v2 = assert_no_failed_request(&samples);
    // The canary really took part of the load on its way up.
    assert!(v2 > 0, "no request of {} reached v2", samples.len());
    // Finalized: stable runs v2 and serves everything.
    let url = s.haproxy.url("/");
    let after = versions(&Http::new(), &url, &[], 20).await;
    assert!(after.iter().all(|v| v == "v2"), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dark_launch_through_real_haproxy_serves_testers_alone_then_widens_failing_no_request() {
    let bin = crate::require_binary!("haproxy");
    let s = Setup::start(&bin).await;
    let dark = DarkLaunch {
        base: Canary {
            stages: vec![50, 100],
            ..Setup::base()
        },
        rules: vec![beta()],
        timeout: Some(Duration::from_secs(30)),
    };
    let handle = PromotionHandle::new();
    let exec = s.executor(Some(handle.clone()));
    let url = s.haproxy.url("/");
    // The testers: keep-alive, never retrying, with the header, from the
    // start to the end of the run.
    let stop = Arc::new(AtomicBool::new(false));
    let testers = {
        let (http, url, stop) = (Http::without_retries(true), url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut answers, mut failed) = (0usize, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match http.send("GET", &url, &[("x-beta", "yes")]).await {
                    Ok(a) if a.status == 200 => answers += 1,
                    Ok(a) => failed.push(format!("status {}", a.status)),
                    Err(e) => failed.push(e),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (answers, failed)
        })
    };
    let operator = async {
        handle.wait_for_pause().await;
        // While dark: testers reach v2 alone, everyone else v1.
        let http = Http::new();
        let tester = versions(&http, &url, &[("x-beta", "yes")], 30).await;
        let public = versions(&http, &url, &[], 30).await;
        assert!(handle.promote(), "the dark launch waits for a promotion");
        (tester, public)
    };
    let (samples, (tester, public)) = tokio::join!(s.deploy_under_load(&exec, &dark), operator);
    stop.store(true, Ordering::SeqCst);
    let (tester_answers, tester_failed) = testers.await.expect("the testers");
    assert!(tester.iter().all(|v| v == "v2"), "testers while dark: {tester:?}");
    assert!(public.iter().all(|v| v == "v1"), "public while dark: {public:?}");
    let v2 = assert_no_failed_request(&samples);
    assert!(v2 > 0, "the widening sent no public request to v2");
    assert!(tester_answers > 0, "the testers sent nothing");
    assert!(
        tester_failed.is_empty(),
        "{} of the testers' requests failed: {tester_failed:?}",
        tester_failed.len()
    );
    let after = versions(&Http::new(), &url, &[("x-beta", "yes")], 10).await;
    assert!(after.iter().all(|v| v == "v2"), "{after:?}");
}

/// HAProxy's health-check state of `server` (`srv_op_state`: 0 down, 2 up).
async fn op_state(lb: &HaproxyLoadBalancer, server: &str) -> u32 {
    lb.api()
        .servers_state("app")
        .await
        .expect("show servers state")
        .into_iter()
        .find(|s| s.name == server)
        .expect("the server")
        .op_state
}

#[tokio::test]
async fn enable_returns_once_haproxys_own_health_check_reports_the_server_up() {
    let bin = crate::require_binary!("haproxy");
    let s = Setup::start(&bin).await;
    let canary = s.instances[2].clone();
    // The stopped canary fails HAProxy's checks (every 100 ms, 3 to fall).
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while op_state(&s.lb, "canary-1").await != 0 {
        assert!(
            tokio::time::Instant::now() < end,
            "HAProxy never marked the stopped canary down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing listens: with a short bound, enable fails naming the server
    // and what to check, as a transient error.
    let impatient = HaproxyLoadBalancer::builder()
        .socket(Haproxy::socket(s.dir.path()))
        .backends(s.instances.iter().map(|i| i.backend().clone()))
        .up_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let e = impatient.enable(canary.backend()).await.unwrap_err();
    assert!(
        e.message().contains("app/canary-1") && e.message().contains("health check"),
        "{e}"
    );
    assert!(e.is_transient(), "{e}");
    // Started and healthy for deploykit: enable waits for HAProxy's own
    // check (2 to rise) and returns with the server up.
    canary.start().await.unwrap();
    wait_healthy(canary.as_ref()).await;
    s.lb.enable(canary.backend()).await.expect("enable");
    assert_eq!(op_state(&s.lb, "canary-1").await, 2);
}

/// The experiment's default sticky cookie.
fn dk_variant() -> Sticky {
    Sticky::Cookie {
        name: "dk_variant".into(),
    }
}

/// An experiment that decides after two to three seconds (see
/// [`tally`]), so users live with the sticky split for a while.
fn experiment() -> Experiment {
    Experiment {
        base: Setup::base(),
        duration: Duration::from_secs(30),
        rules: deploykit::experiment::ExperimentRules {
            min_samples: 3000,
            ..Default::default()
        },
        ..Experiment::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_through_real_haproxy_keeps_users_on_their_variant_and_promotes_the_winner_failing_no_request(
) {
    let bin = crate::require_binary!("haproxy");
    let s = Setup::start_with(&bin, &[dk_variant()]).await;
    let exec = s.executor(None);
    // 20 users, each on its own keep-alive connection that never retries,
    // sending back the cookie HAProxy hands out: the versions each saw.
    let stop = Arc::new(AtomicBool::new(false));
    let users: Vec<_> = (0..20)
        .map(|_| {
            let (http, url, stop) = (Http::without_retries(true), s.haproxy.url("/"), stop.clone());
            tokio::spawn(async move {
                let (mut seen, mut failed, mut cookie) = (Vec::new(), Vec::new(), None::<String>);
                while !stop.load(Ordering::SeqCst) {
                    let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", c.as_str())).collect();
                    match http.send("GET", &url, &headers).await {
                        Ok(a) if a.status == 200 => {
                            if let Some(c) = a.headers.get("set-cookie") {
                                cookie = c.split(';').next().map(str::to_string);
                            }
                            seen.push(a.version.unwrap_or_default());
                        }
                        Ok(a) => failed.push(format!("status {}", a.status)),
                        Err(e) => failed.push(e),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (seen, failed)
            })
        })
        .collect();
    let samples = s.deploy_under_load(&exec, &experiment()).await;
    stop.store(true, Ordering::SeqCst);
    assert_no_failed_request(&samples);
    let mut saw_both = 0;
    for (u, user) in users.into_iter().enumerate() {
        let (seen, failed) = user.await.expect("a user");
        assert!(failed.is_empty(), "user {u}: {failed:?}");
        // v1 until the user's variant (or the promotion) moved it to v2,
        // never back: a split by request would flip users both ways.
        let first_v2 = seen.iter().position(|v| v == "v2").unwrap_or(seen.len());
        assert!(
            seen[first_v2..].iter().all(|v| v == "v2"),
            "user {u} went back to v1: {seen:?}"
        );
        saw_both += usize::from(first_v2 > 0 && first_v2 < seen.len());
    }
    assert!(saw_both > 0, "no user was moved to the winner");
    // Promoted: every user, cookie or not, reaches v2.
    let after = versions(&Http::new(), &s.haproxy.url("/"), &[], 20).await;
    assert!(after.iter().all(|v| v == "v2"), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_whose_sticky_map_haproxy_has_not_loaded_is_refused_before_anything_is_touched() {
    let bin = crate::require_binary!("haproxy");
    let s = Setup::start(&bin).await;
    let before = s.lb.api().servers_state("app").await.expect("show servers state");
    let e = s
        .executor(None)
        .deploy(&experiment(), &v("v2"))
        .await
        .expect_err("the map is not loaded");
    let msg = e.to_string();
    assert!(matches!(e, deploykit::Error::Refused(_)), "{msg}");
    assert!(
        msg.contains("nothing was touched")
            && msg.contains("app.sticky.cookie.dk_variant.map")
            && msg.contains("use_backend %[var(txn.dk_app.sticky.cookie.dk_variant.group)]"),
        "{msg}"
    );
    let after = s.lb.api().servers_state("app").await.expect("show servers state");
    assert_eq!(
        before
            .iter()
            .map(|b| (&b.name, b.weight, b.admin()))
            .collect::<Vec<_>>(),
        after
            .iter()
            .map(|b| (&b.name, b.weight, b.admin()))
            .collect::<Vec<_>>(),
        "a refused deployment changed HAProxy"
    );
    // The canary was never started, stable still runs v1.
    assert!(
        !matches!(s.instances[2].health().await, Ok(h) if h.is_healthy()),
        "the canary runs"
    );
    let answers = versions(&Http::new(), &s.haproxy.url("/"), &[], 10).await;
    assert!(answers.iter().all(|v| v == "v1"), "{answers:?}");
}
