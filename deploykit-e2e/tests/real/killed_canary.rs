//! SIGKILL of a canary's process mid-stage behind real HAProxy, under
//! open-loop keep-alive load from a client that never retries: the health
//! watch rolls the deployment back within a few hundred milliseconds, and
//! HAProxy's retries (`retry-on conn-failure empty-response`, `option
//! redispatch 1`) move every request the dead canary got to a stable
//! server, so no client request fails. Without those retries the same run
//! fails requests, so the measurement can fail.
//!
//! Every failed request is kept with its time and error, and HAProxy logs
//! every request (termination state, retries, redispatch), so a failure
//! names its cause.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deploykit::analysis::HealthWatch;
use deploykit::chaos::{verdicts, ChaosSpec};
use deploykit::{Backend, EventKind, EventLog, InstanceId, LoadBalancer, OutcomeKind, ReleaseId};
use tokio::time::{sleep, Instant};

use crate::harness::{free_port, temp_dir, Haproxy, Http};
use crate::load::{Client, LoadGen, Sample};
use crate::prometheus::{real_canary, CanaryFleet};

/// Requests per second of the load.
const RATE: u32 = 200;

/// The retries docs/load-balancers.md asks of HAProxy for a canary: a
/// request whose connection to a dead server fails, or whose server
/// connection closes before any response, is sent again to another server.
const RETRIES: &str = "    retries 3\n    option redispatch 1\n    retry-on conn-failure empty-response";

/// A haproxy.cfg for backend `app` with `backend_lines` in the backend;
/// HAProxy logs each request to its stderr.
fn config(dir: &Path, port: u16, backends: &[Backend], backend_lines: &str) -> String {
    let mut s = format!(
        r#"global
    stats socket {sock} mode 600 level admin
    stats timeout 30s
    log stderr format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout queue 10s
frontend fe
    bind 127.0.0.1:{port}
    default_backend app
backend app
    balance roundrobin
{backend_lines}
"#,
        sock = Haproxy::socket(dir).display()
    );
    for b in backends {
        s.push_str(&format!("    server {} {} weight 1\n", b.id, b.address));
    }
    s
}

/// What one run saw.
struct KillRun {
    report: deploykit::Report,
    log: EventLog,
    samples: Vec<Sample>,
    /// The chaos entry that killed the canary.
    kill: ChaosSpec,
    /// When the SIGKILL was sent, since the load started.
    killed_at: Duration,
    /// When the deployment returned, since the load started.
    deploy_done: Duration,
    /// HAProxy's request log.
    haproxy_log: String,
    /// `show stat` of backend `app` afterwards, one row per server.
    stat: Vec<BTreeMap<String, String>>,
    /// Versions answering 100 requests afterwards.
    after: std::collections::BTreeMap<String, usize>,
}

impl KillRun {
    fn failures(&self) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.outcome.is_err()).collect()
    }

    /// Every failed request (time since the kill, latency, error), HAProxy's
    /// log lines that are not a plain 200 without retry, and its stats.
    fn describe(&self) -> String {
        let k = self.killed_at.as_secs_f64();
        let mut out = format!(
            "{} requests, {} failed; SIGKILL at {k:.3}s, deployment returned at {:.3}s\n",
            self.samples.len(),
            self.failures().len(),
            self.deploy_done.as_secs_f64()
        );
        let mut kinds = std::collections::BTreeMap::<String, usize>::new();
        for f in self.failures() {
            let e = f.outcome.clone().unwrap_err();
            let kind = if e.starts_with("no answer") {
                "timeout".to_string()
            } else if e.starts_with("status") {
                e.clone()
            } else if crate::load::closed_before_response(&e) {
                "closed/reset".to_string()
            } else {
                "other".to_string()
            };
            *kinds.entry(kind).or_default() += 1;
        }
        out.push_str(&format!("failures by kind: {kinds:?}\n"));
        for f in self.failures().iter().take(40) {
            out.push_str(&format!(
                "  at {:+.3}s from the kill, {:.0} ms: {}\n",
                f.at.as_secs_f64() - k,
                f.latency.as_secs_f64() * 1000.0,
                f.outcome.clone().unwrap_err()
            ));
        }
        let unusual: Vec<&str> = self
            .haproxy_log
            .lines()
            .filter(|l| !(l.contains(" 200 ") && l.contains(" ---- ") && l.contains("/0 0/0")))
            .collect();
        out.push_str(&format!("HAProxy log, {} unusual lines:\n", unusual.len()));
        for l in unusual.iter().take(60) {
            out.push_str(l);
            out.push('\n');
        }
        for row in &self.stat {
            let get = |k: &str| row.get(k).map(String::as_str).unwrap_or("");
            out.push_str(&format!(
                "{}: status {}, weight {}, connection errors {}, response errors {}, retries {}, redispatches {}, queue max {}\n",
                get("svname"),
                get("status"),
                get("weight"),
                get("econ"),
                get("eresp"),
                get("wretr"),
                get("wredis"),
                get("qmax")
            ));
        }
        out
    }

    /// `show stat` counter `key` of server `server` (0 when empty).
    fn counter(&self, server: &str, key: &str) -> u64 {
        self.stat
            .iter()
            .find(|r| r.get("svname").map(String::as_str) == Some(server))
            .and_then(|r| r.get(key))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

/// 2 stable instances and a canary (`LocalInstance`s running the demo app),
/// real Prometheus, real HAProxy with `backend_lines` in its backend; a
/// canary deployment of v2 (stages 25, 50, 100 %, a health watch probing
/// every 100 ms) whose canary is SIGKILLed 1 s into stage 1, under `RATE`
/// GET/s of a keep-alive client that never retries.
async fn run(backend_lines: &str) -> Option<KillRun> {
    let prom_bin = crate::harness::find_binary("prometheus")?;
    let lb_bin = crate::harness::find_binary("haproxy")?;
    let tmp = temp_dir("deploykit-killed-canary");
    // A few ms per request, so some are in flight on the canary when it
    // dies.
    let fleet = CanaryFleet::start(&prom_bin, tmp.path(), |_| {
        vec!["--latency-ms".to_owned(), "5".to_owned()]
    })
    .await;
    let backends = &fleet.backends;
    let port = free_port();
    let cfg = config(tmp.path(), port, backends, backend_lines);
    let haproxy = Haproxy::start(&lb_bin, tmp.path(), port, &cfg).await;
    let lb = crate::haproxy::driver(tmp.path(), backends);
    lb.check().await.expect("HAProxy knows every server");
    let url = haproxy.url("/");

    let log = EventLog::new();
    let executor = fleet
        .executor(Arc::new(lb.clone()) as Arc<dyn LoadBalancer>, &log)
        .build()
        .expect("build the executor");
    let kill: ChaosSpec = serde_json::from_value(serde_json::json!({
        "stage": 1, "after": "1s", "kind": "kill", "expect": "rollback", "within": "30s",
    }))
    .unwrap();
    let mut canary = real_canary(vec![25, 50, 100]);
    canary.chaos = vec![kill.clone()];
    canary.analysis.health_watch = Some(HealthWatch {
        interval: Duration::from_millis(100),
        failures: 2,
    });

    let load = LoadGen::open_loop(&url, RATE, Duration::from_secs(60), true, Client::NonRetrying);
    fleet.wait_for_stable_metrics(canary.analysis.window).await;
    let load_started = Instant::now() - load.elapsed();
    let deploy_started = load_started.elapsed();
    let report = executor
        .deploy(&canary, &ReleaseId::new("v2").unwrap())
        .await
        .expect("the deployment ran");
    let deploy_done = load_started.elapsed();
    // What clients get once the run has returned is measured too.
    sleep(Duration::from_secs(1)).await;
    let samples = load.stop().await;
    let events = log.events();
    let injected_ms = events.iter().find_map(|e| match &e.kind {
        EventKind::ChaosInjected { .. } => Some(e.elapsed_ms),
        _ => None,
    });
    let killed_at = deploy_started + Duration::from_millis(injected_ms.unwrap_or(0));
    let after = Http::new().count_versions(&url, 100).await;
    let stat = lb.api().stat("app").await.expect("show stat");
    fleet.stop().await;
    drop(haproxy);
    Some(KillRun {
        report,
        log,
        samples,
        kill,
        killed_at,
        deploy_done,
        haproxy_log: std::fs::read_to_string(tmp.path().join("haproxy.stderr")).unwrap_or_default(),
        stat,
        after,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_canary_behind_haproxy_rolls_back_and_fails_no_request() {
    let Some(r) = run(RETRIES).await else {
        return;
    };
    let d = r.describe();
    assert_eq!(r.report.outcome, OutcomeKind::RolledBack, "{}\n{d}", r.report);
    let reason = r.report.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("canary i-3 failed 2 health probe(s) in a row, 100ms apart, during stage 1 (25%)"),
        "{reason}\n{d}"
    );
    let kill = &r.kill;
    let v = verdicts(std::slice::from_ref(kill), &r.log.events());
    assert!(v[0].passed, "{}\n{d}", v[0]);
    assert_eq!(v[0].instances, vec![InstanceId::new("i-3").unwrap()]);
    assert_eq!(r.failures().len(), 0, "requests failed:\n{d}");
    // Not zero by construction: the dead canary did get requests, and
    // HAProxy moved them to a stable server.
    assert!(
        r.counter("i-3", "wredis") >= 1,
        "no request reached the dead canary:\n{d}"
    );
    assert_eq!(r.after.get("v1"), Some(&100), "{d}");
    let (injected, done) = (v[0].injected_at_ms.unwrap(), v[0].rolled_back_at_ms.unwrap());
    eprintln!(
        "killed canary behind HAProxy: {} requests, 0 failed, {} redispatched from the dead canary; rolled back {} ms after the SIGKILL",
        r.samples.len(),
        r.counter("i-3", "wredis"),
        done - injected
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_haproxy_retries_the_killed_canary_fails_requests() {
    // The same run with `retries 0`: requests HAProxy sends to the canary
    // between the SIGKILL and the rollback get a 503 or a closed connection.
    let Some(r) = run("    retries 0").await else {
        return;
    };
    let d = r.describe();
    assert_eq!(r.report.outcome, OutcomeKind::RolledBack, "{}\n{d}", r.report);
    assert!(
        !r.failures().is_empty(),
        "no request failed without retries:\n{d}"
    );
    eprintln!(
        "killed canary behind HAProxy without retries: {} of {} requests failed",
        r.failures().len(),
        r.samples.len()
    );
}
