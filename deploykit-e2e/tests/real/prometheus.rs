//! Canary analysis, rollback and finalize against a real Prometheus: the
//! Prometheus metrics source, real nginx or HAProxy weights, demo-app
//! instances run by `LocalInstance`, and a bounded load through the
//! balancer.
//!
//! Prometheus (the Debian package) is started on loopback with a temp config
//! that scrapes every demo app every second; stages are short (3 × 5 s,
//! checked every second, PromQL windows of 10 s).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use deploykit::analysis::CheckOutcome;
use deploykit::chaos::{verdicts, ChaosSpec, Expect};
use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::metrics::prometheus::Prometheus;
use deploykit::{
    EventKind, EventLog, Group, LoadBalancer, Metric, MetricsSource, Observation, OutcomeKind, ReleaseId,
    Report,
};
use tokio::process::{Child, Command};
use tokio::time::{sleep, Instant};

use crate::harness::{
    free_port, make_release, temp_dir, DemoApp, DemoOpts, Haproxy, Http, KillOnDrop, Nginx, START_DEADLINE,
};
use crate::load::LoadGen;

/// A real Prometheus in a temp dir, scraping `targets` every second; killed
/// on drop.
pub(crate) struct PromServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl PromServer {
    pub(crate) async fn start(binary: &Path, dir: &Path, targets: &[String]) -> PromServer {
        let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: demo\n    scrape_interval: 1s\n    scrape_timeout: 900ms\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        );
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).expect("write prometheus.yml");
        let port = free_port();
        let log = dir.join("prometheus.log");
        let err = std::fs::File::create(&log).expect("create prometheus.log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn prometheus");
        let p = PromServer { child, port, log };
        let http = Http::new();
        let end = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(a) = http.get(&p.url("/-/ready")).await {
                if a.status == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < end,
                "prometheus not ready on port {} within {START_DEADLINE:?}:\n{}",
                p.port,
                p.log_text()
            );
            sleep(Duration::from_millis(50)).await;
        }
        p
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(crate) fn source(&self) -> Prometheus {
        Prometheus::builder(self.url(""))
            .timeout(Duration::from_secs(5))
            .build()
            .expect("prometheus source")
    }
}

impl Drop for PromServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Waits (bounded) until `query` of `group` answers a value.
pub(crate) async fn wait_for_value(prom: &Prometheus, metric: Metric, group: &str, window: Duration) -> f64 {
    let g = Group::new(group).unwrap();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match prom.observe(metric, &g, window).await {
            Observation::Value(v) => return v,
            other => assert!(
                Instant::now() < end,
                "no {metric:?} for {group} within 20 s; last: {other:?}"
            ),
        }
        sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn real_prometheus_answers_map_to_typed_observations() {
    let bin = crate::require_binary!("prometheus");
    let dir = temp_dir("deploykit-prometheus");
    let app = DemoApp::start(DemoOpts::new("v1").track("stable")).await;
    let prom_server = PromServer::start(&bin, dir.path(), &[app.addr.to_string()]).await;
    let prom = prom_server.source();
    let http = Http::new();
    let w = Duration::from_secs(10);
    // Traffic, so the rate has something to work on.
    let load = async {
        for _ in 0..60 {
            let _ = http.get(&app.url("/")).await;
            sleep(Duration::from_millis(50)).await;
        }
    };
    let (_, rate) = tokio::join!(load, wait_for_value(&prom, Metric::ErrorRate, "stable", w));
    // No 5xx at all: `or vector(0)` makes it 0, not empty.
    assert_eq!(rate, 0.0);
    let p99 = wait_for_value(&prom, Metric::LatencyP99, "stable", w).await;
    assert!(p99 > 0.0 && p99 < 0.5, "p99 {p99}");
    assert!(wait_for_value(&prom, Metric::RequestCount, "stable", w).await > 0.0);
    // A track with no series: an empty result, never a value.
    let nobody = Group::new("nobody").unwrap();
    assert_eq!(
        prom.observe(Metric::ErrorRate, &nobody, w).await,
        Observation::NoData
    );
    assert_eq!(
        prom.observe(Metric::LatencyP99, &nobody, w).await,
        Observation::NoData
    );
    // Prometheus's own error comes back as a provider error.
    let broken = Prometheus::builder(prom_server.url(""))
        .error_rate(r#"sum(rate(http_requests_total{track="{group}"}[{window}])"#)
        .build()
        .unwrap();
    match broken.observe(Metric::ErrorRate, &nobody, w).await {
        Observation::ProviderError(m) => assert!(m.contains("bad_data"), "{m}"),
        o => panic!("expected a provider error, got {o:?}"),
    }
}

/// Two stable demo apps (`i-1`, `i-2`) and a canary (`i-3`), run by
/// `LocalInstance` under `dir` on v1 (v2 is built beside it), healthy and
/// scraped every second by a real Prometheus: what every real canary test
/// starts from. Dropping it stops Prometheus, then kills the demo apps.
pub(crate) struct CanaryFleet {
    pub(crate) instances: Vec<std::sync::Arc<deploykit::instance::LocalInstance>>,
    pub(crate) backends: Vec<deploykit::Backend>,
    pub(crate) prom: PromServer,
    _kill: KillOnDrop<PathBuf>,
}

impl CanaryFleet {
    /// Starts the fleet in `dir`; `args(track)` are the demo-app arguments
    /// added to every instance of `track` (`"stable"` or `"canary"`).
    pub(crate) async fn start(prom_bin: &Path, dir: &Path, args: impl Fn(&str) -> Vec<String>) -> Self {
        use deploykit::Instance as _;
        let builds = dir.join("builds");
        make_release(&builds, "v1");
        make_release(&builds, "v2");
        let mut instances = Vec::new();
        let mut roots = Vec::new();
        let mut targets = Vec::new();
        for (i, track) in [(1, "stable"), (2, "stable"), (3, "canary")] {
            let port = free_port();
            let root = dir.join(format!("i-{i}"));
            roots.push(root.clone());
            targets.push(format!("127.0.0.1:{port}"));
            let mut argv: Vec<String> = [
                "./deploykit-demo-app",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--version",
                "{release}",
                "--track",
                track,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            argv.extend(args(track));
            let spec = ProcessSpec::new(argv).unwrap().grace(Duration::from_secs(10));
            let inst = LocalInstance::builder(format!("i-{i}"), format!("127.0.0.1:{port}"))
                .group(track)
                .root(root.to_str().unwrap())
                .source(ReleaseSource::directory(&builds))
                .process(spec)
                .build()
                .expect("build a LocalInstance");
            instances.push(std::sync::Arc::new(inst));
        }
        let kill = KillOnDrop(roots);
        let v1 = deploykit::ReleaseId::new("v1").unwrap();
        for inst in &instances {
            inst.install(&v1).await.expect("install v1");
            inst.start().await.expect("start v1");
        }
        for inst in &instances {
            let end = Instant::now() + START_DEADLINE;
            while !inst.health().await.map(|h| h.is_healthy()).unwrap_or(false) {
                assert!(Instant::now() < end, "{} never got healthy", inst.backend().id);
                sleep(Duration::from_millis(20)).await;
            }
        }
        let backends = instances.iter().map(|i| i.backend().clone()).collect();
        let prom = PromServer::start(prom_bin, dir, &targets).await;
        Self {
            instances,
            backends,
            prom,
            _kill: kill,
        }
    }

    /// An executor over the fleet behind `lb`, judged by the fleet's
    /// Prometheus, its events in `log`; callers add what else they need.
    pub(crate) fn executor(
        &self,
        lb: std::sync::Arc<dyn deploykit::LoadBalancer>,
        log: &deploykit::EventLog,
    ) -> deploykit::ExecutorBuilder {
        deploykit::Executor::builder()
            .instances(
                self.instances
                    .iter()
                    .map(|i| i.clone() as std::sync::Arc<dyn deploykit::Instance>),
            )
            .load_balancer(lb)
            .metrics(std::sync::Arc::new(self.prom.source()))
            .events(std::sync::Arc::new(log.clone()))
            .drain_poll(Duration::from_millis(20))
    }

    /// Waits until Prometheus answers stable's error rate and p99 and counts
    /// stable requests over `window` (the monitoring check before the first
    /// stage asks for all three); at most 20 s for the count.
    pub(crate) async fn wait_for_stable_metrics(&self, window: Duration) {
        use deploykit::Metric;
        let prom = self.prom.source();
        for metric in [Metric::ErrorRate, Metric::LatencyP99] {
            wait_for_value(&prom, metric, "stable", window).await;
        }
        let end = Instant::now() + Duration::from_secs(20);
        while wait_for_value(&prom, Metric::RequestCount, "stable", window).await <= 0.0 {
            assert!(Instant::now() < end, "no stable requests counted within 20 s");
            sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops every instance, ignoring errors (the run may have stopped some).
    pub(crate) async fn stop(&self) {
        use deploykit::Instance as _;
        for inst in &self.instances {
            let _ = inst.stop().await;
        }
    }
}

/// The canary the real canary tests run on a [`CanaryFleet`]: `stages` of
/// 5 s checked every second, the canary's start probed every 50 ms (at
/// most 100 times), drains of at most 5 s, PromQL windows of 10 s, and 6
/// inconclusive checks in a row allowed (a freshly started canary needs two
/// scrapes before `rate()` answers).
pub(crate) fn real_canary(stages: Vec<u8>) -> deploykit::Canary {
    let mut canary = deploykit::Canary {
        stages,
        stage_duration: Duration::from_secs(5),
        check_interval: Duration::from_secs(1),
        health: deploykit::HealthCheck {
            retries: 100,
            interval: Duration::from_millis(50),
        },
        drain_timeout: Duration::from_secs(5),
        ..deploykit::Canary::default()
    };
    canary.analysis.window = Duration::from_secs(10);
    canary.analysis.inconclusive_limit = 6;
    canary
}

pub(crate) struct Run {
    pub(crate) report: Report,
    pub(crate) log: EventLog,
    /// The canary's chaos entries (a drill's default one included).
    pub(crate) chaos: Vec<ChaosSpec>,
    /// Versions (or errors) answering 100 requests through the balancer
    /// afterwards.
    pub(crate) after: std::collections::BTreeMap<String, usize>,
    /// Failed requests of the load (see `samples`).
    pub(crate) failed: usize,
    /// HAProxy only: every server's weight afterwards.
    weights: Vec<(String, u32)>,
    /// HAProxy only: the canary's share of the weight (percent, rounded)
    /// read back from the runtime API every 100 ms during the deployment,
    /// each change once.
    shares: Vec<u32>,
    /// When the deployment returned, since the load started.
    deploy_done: Duration,
    /// Every request of the load sent during the deployment and for a second
    /// after it returned.
    samples: Vec<crate::load::Sample>,
    pub(crate) took: Duration,
}

/// The load balancer in front of a canary run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Lb {
    Nginx,
    Haproxy,
}

/// Two stable instances and one canary on v1 behind real nginx or HAProxy,
/// scraped by real Prometheus, under load; a canary deployment of v2 whose
/// canary process runs with `canary_args`.
async fn canary_run(kind: Lb, canary_args: &[&str]) -> Option<Run> {
    canary_run_with(kind, canary_args, Vec::new()).await
}

/// [`canary_run`] with `chaos` entries on the canary.
async fn canary_run_with(kind: Lb, canary_args: &[&str], chaos: Vec<ChaosSpec>) -> Option<Run> {
    canary_run_as(kind, canary_args, chaos, Mode::Deploy).await
}

/// What a canary run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Deploys v2.
    Deploy,
    /// A drill of v1, the release the fleet runs (`Canary::drill_plan`),
    /// with the default kill when `chaos` is empty; stages of 6 s and
    /// PromQL windows of 5 s, so a dead canary's data ends sooner.
    Drill,
}

/// [`canary_run_with`], deploying or drilling.
pub(crate) async fn canary_run_as(
    kind: Lb,
    canary_args: &[&str],
    chaos: Vec<ChaosSpec>,
    mode: Mode,
) -> Option<Run> {
    let prom_bin = crate::harness::find_binary("prometheus")?;
    let lb_bin = crate::harness::find_binary(match kind {
        Lb::Nginx => "nginx",
        Lb::Haproxy => "haproxy",
    })?;
    let started = Instant::now();
    let tmp = temp_dir("deploykit-canary-real");
    let canary_args: Vec<String> = canary_args.iter().map(|s| s.to_string()).collect();
    let fleet = CanaryFleet::start(&prom_bin, tmp.path(), |track| match track {
        "canary" => canary_args.clone(),
        _ => Vec::new(),
    })
    .await;
    let backends = &fleet.backends;
    let port = free_port();
    let (lb, nginx, haproxy): (Arc<dyn LoadBalancer>, Option<Nginx>, Option<Haproxy>) = match kind {
        Lb::Nginx => {
            Nginx::write_config(tmp.path(), port);
            let lb = crate::nginx::driver(&lb_bin, tmp.path(), backends);
            lb.install().await.expect("install the upstream file");
            let nginx = Nginx::start(&lb_bin, tmp.path(), port).await;
            (Arc::new(lb), Some(nginx), None)
        }
        Lb::Haproxy => {
            let h = Haproxy::start_for(&lb_bin, tmp.path(), port, backends).await;
            (
                Arc::new(crate::haproxy::driver(tmp.path(), backends)),
                None,
                Some(h),
            )
        }
    };
    let url = format!("http://127.0.0.1:{port}/");

    let log = EventLog::new();
    let executor = fleet.executor(lb, &log).build().expect("build the executor");
    let mut canary = real_canary(vec![25, 50, 100]);
    canary.chaos = chaos;
    if mode == Mode::Drill {
        // The canary's series goes on from before its restart, so rate()
        // answers at once; a dead one answers nothing 5 s later.
        canary.stage_duration = Duration::from_secs(6);
        canary.analysis.window = Duration::from_secs(5);
        canary.analysis.inconclusive_limit = 3;
        // The drill proves the metric gate sees a dead canary on real
        // Prometheus: the health watch, which would see it first, is off.
        canary.analysis.health_watch = None;
        if canary.chaos.is_empty() {
            canary.chaos = vec![deploykit::chaos::drill::default_entry(
                &canary,
                deploykit::chaos::Fault::Kill,
                None,
            )];
        }
    }

    let load_started = Instant::now();
    let load = LoadGen::start_retrying(&url, 200, Duration::from_secs(50));
    // Read HAProxy's own weights back while the stages run, rather than
    // trusting the stage events.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = haproxy.as_ref().map(|_| {
        let api = crate::haproxy::driver(tmp.path(), backends);
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut shares: Vec<u32> = Vec::new();
            while sampling.load(std::sync::atomic::Ordering::SeqCst) {
                if let Ok(servers) = api.api().servers_state("app").await {
                    let total: u32 = servers.iter().map(|s| s.weight).sum();
                    let canary: u32 = servers.iter().filter(|s| s.name == "i-3").map(|s| s.weight).sum();
                    if total > 0 {
                        let share = (f64::from(canary) * 100.0 / f64::from(total)).round() as u32;
                        if shares.last() != Some(&share) {
                            shares.push(share);
                        }
                    }
                }
                sleep(Duration::from_millis(100)).await;
            }
            shares
        })
    });
    // Let Prometheus see stable traffic before the first check (the
    // monitoring check before the first stage asks for it too).
    sleep(Duration::from_secs(2)).await;
    fleet.wait_for_stable_metrics(canary.analysis.window).await;
    let prom = fleet.prom.source();
    let report = match mode {
        Mode::Deploy => executor.deploy(&canary, &ReleaseId::new("v2").unwrap()).await,
        Mode::Drill => {
            deploykit::chaos::drill::preflight(&prom, &canary, Duration::from_secs(5))
                .await
                .expect("a gate that can fire");
            let plan = canary
                .drill_plan(&executor.snapshot().await.expect("a snapshot"))
                .expect("a drill plan");
            executor.run(&plan, deploykit::RunOptions::default()).await
        }
    }
    .expect("the deployment ran");
    let deploy_done = load_started.elapsed();
    // Keep the load a moment longer, so what clients get once the run has
    // returned is measured, not assumed.
    sleep(Duration::from_secs(1)).await;
    let stats = load.stop().await;
    sampling.store(false, std::sync::atomic::Ordering::SeqCst);
    let shares = match sampler {
        Some(t) => t.await.expect("the weight sampler"),
        None => Vec::new(),
    };
    let after = Http::new().count_versions(&url, 100).await;
    let weights = match &haproxy {
        Some(_) => crate::haproxy::driver(tmp.path(), backends)
            .api()
            .servers_state("app")
            .await
            .expect("show servers state")
            .into_iter()
            .map(|s| (s.name, s.weight))
            .collect(),
        None => Vec::new(),
    };
    fleet.stop().await;
    drop(nginx);
    drop(haproxy);
    Some(Run {
        report,
        log,
        chaos: canary.chaos,
        after,
        failed: stats.iter().filter(|x| x.outcome.is_err()).count(),
        weights,
        shares,
        samples: stats,
        deploy_done,
        took: started.elapsed(),
    })
}

pub(crate) fn dump(log: &EventLog) -> String {
    log.events()
        .iter()
        .map(|e| format!("{:>6} {:?}", e.elapsed_ms, e.kind))
        .collect::<Vec<_>>()
        .join("\n")
}

fn checks(log: &EventLog) -> Vec<CheckOutcome> {
    log.events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::AnalysisResult { result, .. } => Some(result),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_canary_erring_five_percent_is_rolled_back_by_real_promql() {
    let Some(run) = canary_run(Lb::Nginx, &["--error-rate", "0.05"]).await else {
        return;
    };
    let r = &run.report;
    assert_eq!(r.outcome, OutcomeKind::RolledBack, "{r}\n{}", dump(&run.log));
    let reason = r.reason.clone().unwrap_or_default();
    assert!(reason.contains("canary error rate"), "{reason}");
    let fail = checks(&run.log)
        .into_iter()
        .find_map(|c| match c {
            CheckOutcome::Fail { value, threshold, .. } => Some((value, threshold)),
            _ => None,
        })
        .expect("a failed check");
    assert!(fail.0 > fail.1, "{fail:?}");
    // Stable serves v1 alone afterwards; the canary is stopped.
    assert_eq!(run.after.get("v1"), Some(&100), "{:?}", run.after);
    assert_eq!(r.instances[2].status, deploykit::InstanceStatus::Idle);
    assert_eq!(r.instances[2].release, Some(ReleaseId::new("v1").unwrap()));
    // What the clients saw: the canary really answered some of them, its
    // errors reached at most its error rate of all requests (the canary
    // never had more than all the traffic), and the last answers of the
    // load came from v1 again.
    let total = run.samples.len();
    let from_v2 = run
        .samples
        .iter()
        .filter(|s| s.outcome.as_deref() == Ok("v2"))
        .count();
    assert!(
        from_v2 > 0,
        "no client ever reached the canary ({total} requests)"
    );
    assert!(
        run.failed * 100 <= total * 5,
        "{} of {total} requests failed: more than the canary's 5 %",
        run.failed
    );
    let tail: Vec<&Result<String, String>> = run
        .samples
        .iter()
        .filter(|s| s.at > run.deploy_done)
        .map(|s| &s.outcome)
        .collect();
    assert!(
        !tail.is_empty(),
        "no request was sent after the rollback returned"
    );
    assert!(
        tail.iter().all(|o| o.as_deref() == Ok("v1")),
        "answers sent after the rollback returned: {tail:?}"
    );
    eprintln!(
        "bad canary: rolled back in {:.1}s; clients saw v2 {from_v2} times, {} failures in {total}",
        run.took.as_secs_f64(),
        run.failed
    );
}

#[tokio::test]
async fn a_healthy_canary_is_promoted_and_finalized_with_real_promql() {
    let Some(run) = canary_run(Lb::Nginx, &[]).await else {
        return;
    };
    let r = &run.report;
    assert!(r.is_success(), "{r}\n{}", dump(&run.log));
    let checks = checks(&run.log);
    assert!(
        checks.iter().filter(|c| **c == CheckOutcome::Pass).count() >= 3,
        "{checks:?}"
    );
    assert!(
        !checks.iter().any(|c| matches!(c, CheckOutcome::Fail { .. })),
        "{checks:?}"
    );
    // Stable runs v2 and takes all traffic; the canary is stopped.
    assert_eq!(run.after.get("v2"), Some(&100), "{:?}", run.after);
    assert_eq!(r.instances[2].status, deploykit::InstanceStatus::Idle);
    assert_eq!(
        run.failed, 0,
        "no request failed through the weight changes and finalize"
    );
    eprintln!(
        "good canary: promoted and finalized in {:.1}s",
        run.took.as_secs_f64()
    );
}

/// The same healthy canary through HAProxy's runtime weights: every stage's
/// split set and read back over the admin socket, then finalize returns all
/// weight to stable.
#[tokio::test]
async fn a_healthy_canary_is_promoted_and_finalized_through_haproxy_weights() {
    let Some(run) = canary_run(Lb::Haproxy, &[]).await else {
        return;
    };
    let r = &run.report;
    assert!(r.is_success(), "{r}\n{}", dump(&run.log));
    let mut weights: Vec<u8> = Vec::new();
    for e in run.log.events() {
        if let EventKind::StageProgress { weight, .. } = e.kind {
            if weights.last() != Some(&weight) {
                weights.push(weight);
            }
        }
    }
    assert_eq!(weights, [25, 50, 100], "every stage held at its split");
    // HAProxy itself carried each split, in order (read back every 100 ms;
    // each stage holds 5 s).
    let mut want = [25u32, 50, 100].into_iter().peekable();
    for share in &run.shares {
        if want.peek().is_some_and(|w| share.abs_diff(*w) <= 2) {
            want.next();
        }
    }
    assert_eq!(
        want.next(),
        None,
        "HAProxy's weights never carried every stage: {:?}",
        run.shares
    );
    assert_eq!(run.after.get("v2"), Some(&100), "{:?}", run.after);
    assert_eq!(run.failed, 0, "no request failed");
    // Read back from HAProxy: stable servers carry the weight, the canary
    // none.
    let weight = |name: &str| run.weights.iter().find(|(n, _)| n == name).map(|(_, w)| *w);
    assert_eq!(weight("i-3"), Some(0), "{:?}", run.weights);
    assert!(
        weight("i-1").unwrap_or(0) > 0 && weight("i-2").unwrap_or(0) > 0,
        "{:?}",
        run.weights
    );
}

#[tokio::test]
async fn monitoring_before_deploy_asks_real_prometheus_and_names_a_query_that_matches_nothing() {
    let bin = crate::require_binary!("prometheus");
    let dir = temp_dir("deploykit-prometheus-monitoring");
    let app = DemoApp::start(DemoOpts::new("v1").track("stable")).await;
    let prom_server = PromServer::start(&bin, dir.path(), &[app.addr.to_string()]).await;
    let prom = prom_server.source();
    let http = Http::new();
    let w = Duration::from_secs(10);
    let stable = Group::new("stable").unwrap();
    let mut rules = deploykit::analysis::AnalysisRules {
        window: w,
        error_judge: deploykit::judge::ErrorRateJudge::Sequential,
        latency_judge: deploykit::judge::LatencyJudge::MannWhitney,
        ..Default::default()
    };
    // Traffic until every query the judges read answers (bounded).
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        for _ in 0..20 {
            let _ = http.get(&app.url("/")).await;
        }
        let r = deploykit::monitoring::check_monitoring(
            &prom,
            &stable,
            &rules,
            Duration::from_secs(5),
            Duration::from_secs(5),
        )
        .await;
        match r {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < end, "monitoring never ready within 30 s: {e}"),
        }
        sleep(Duration::from_millis(200)).await;
    }
    // The judges' own queries answer real data: counts and histogram buckets.
    let counts = prom.observe_counts(&stable, w).await;
    assert!(
        matches!(&counts, deploykit::judge::Measured::Value(c) if c.requests > 0.0),
        "{counts:?}"
    );
    let latency = prom.observe_latency(&stable, w).await;
    assert!(
        matches!(&latency, deploykit::judge::Measured::Value(d) if d.count() > 0.0),
        "{latency:?}"
    );
    // A template that matches nothing is named, with what came back.
    let typo = Prometheus::builder(prom_server.url(""))
        .error_rate(r#"sum(rate(http_requests_totl{track="{group}"}[{window}]))"#)
        .build()
        .unwrap();
    rules.error_judge = deploykit::judge::ErrorRateJudge::Threshold;
    rules.latency_judge = deploykit::judge::LatencyJudge::Threshold;
    let e = deploykit::monitoring::check_monitoring(
        &typo,
        &stable,
        &rules,
        Duration::from_secs(5),
        Duration::from_secs(5),
    )
    .await
    .expect_err("a query that matches nothing");
    let msg = e.to_string();
    assert!(
        msg.contains(r#"stable error rate (query `sum(rate(http_requests_totl{track="stable"}[10s]))`) answered no data"#),
        "{msg}"
    );
    assert_eq!(e.gaps.len(), 1, "only the typo: {msg}");
}

/// A chaos entry through real processes: SIGKILL of the canary's demo app at
/// the start of stage 1. Its health probes fail (the health watch is on by
/// default) and its metrics stop, and the deployment rolls back within the
/// budget; the verdict passes. The same run read against `expect =
/// "continue"` fails, saying why.
#[tokio::test]
async fn a_killed_canary_process_rolls_back_within_budget_and_the_drill_passes() {
    let kill: ChaosSpec = serde_json::from_value(serde_json::json!({
        "stage": 1, "kind": "kill", "expect": "rollback", "within": "30s",
    }))
    .unwrap();
    let Some(run) = canary_run_with(Lb::Nginx, &[], vec![kill.clone()]).await else {
        return;
    };
    let r = &run.report;
    assert_eq!(r.outcome, OutcomeKind::RolledBack, "{r}\n{}", dump(&run.log));
    let events = run.log.events();
    let v = verdicts(std::slice::from_ref(&kill), &events);
    assert!(v[0].passed, "{}\n{}", v[0], dump(&run.log));
    assert_eq!(v[0].instances, vec![deploykit::InstanceId::new("i-3").unwrap()]);
    let injected = v[0].injected_at_ms.expect("injected");
    let done = v[0].rolled_back_at_ms.expect("rolled back");
    assert!(done - injected <= 30_000, "{}", v[0]);
    // Stable serves v1 alone afterwards; the canary is back on v1, stopped.
    assert_eq!(run.after.get("v1"), Some(&100), "{:?}", run.after);
    assert_eq!(r.instances[2].status, deploykit::InstanceStatus::Idle);
    assert_eq!(r.instances[2].release, Some(ReleaseId::new("v1").unwrap()));
    // Read as a drill that expected the deployment to carry on, the same
    // events fail it.
    let carry_on = ChaosSpec {
        expect: Expect::Continue,
        within: None,
        ..kill
    };
    let v = verdicts(&[carry_on], &events);
    assert!(!v[0].passed);
    assert!(
        v[0].explanation
            .contains("rolled back, but was expected to carry on"),
        "{}",
        v[0]
    );
    eprintln!(
        "killed canary: rolled back {:.1}s after the SIGKILL ({:.1}s in all)",
        (done - injected) as f64 / 1000.0,
        run.took.as_secs_f64()
    );
}
