//! A bounded loopback load generator and the zero-downtime scenario: real
//! nginx or HAProxy in front of 4 demo-app processes run by
//! `deploykit::instance::LocalInstance`, replaced v1 → v2 by the real
//! `Executor` while the load runs.
//!
//! Shared by the `zero_downtime` tests and the `zero_downtime` benchmark
//! (which includes this file and `harness.rs` by path).

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploykit::bluegreen_state::FileLiveStore;
use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::lb::nginx::DrainMode;
use deploykit::lb::{HaproxyLoadBalancer, NginxLoadBalancer};
use deploykit::{
    Backend, BlueGreen, CountOrPercent, Executor, Group, HealthCheck, Instance, LoadBalancer, Recreate,
    ReleaseId, Rolling, Strategy,
};
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout, Instant, MissedTickBehavior};

use crate::harness::{free_ports, make_release, temp_dir, Haproxy, Http, KillOnDrop, Nginx};

// ---------------------------------------------------------------------------
// Load generator

/// How long a request may take before it counts as failed: a stalled answer
/// is a failure, not a pause in the load.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was due (and sent), since the load started.
    pub at: Duration,
    /// From when it was due to its answer (or to the timeout).
    pub latency: Duration,
    /// `Ok(version)` for a 2xx answer; `Err(what)` for a non-2xx status, a
    /// transport error (refused, reset, closed before a response) or no
    /// answer within [`REQUEST_TIMEOUT`].
    pub outcome: Result<String, String>,
    /// [`Client::RetryOnceIfClosed`] only: the first try got no response
    /// because the connection was closed under it, and the request was sent
    /// again on a new connection.
    pub retried: bool,
}

/// How the load generator's client treats a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// Like wrk: every failure counts, nothing is sent twice (not even the
    /// resend hyper's pool does by default for a request it could not
    /// write on a closed pooled connection).
    NonRetrying,
    /// Like a browser: a GET whose keep-alive connection was closed before
    /// any response is sent once more on a new connection (HTTP/1.1 allows
    /// it for idempotent requests) and counted as retried; hyper's pool also
    /// resends, uncounted, a request it could not write on a closed pooled
    /// connection.
    RetryOnceIfClosed,
}

/// Whether a transport error means "the server closed the connection
/// before sending any response" (what [`Client::RetryOnceIfClosed`]
/// retries). Statuses (502, 503, …) and refused connections never are.
pub fn closed_before_response(err: &str) -> bool {
    err.contains("IncompleteMessage") || err.contains("ConnectionReset")
}

/// Open-loop load: one GET every `1 / rate` seconds, on schedule whatever
/// the answers do (a request that has not answered does not hold back the
/// next one, so a stall cannot lower the request count), until stopped or
/// `max_duration` passes (hard stop).
#[derive(Debug)]
pub struct LoadGen {
    stop: Arc<AtomicBool>,
    started: Instant,
    scheduler: JoinHandle<Vec<Sample>>,
}

impl LoadGen {
    /// Starts the load against `url` (must be on 127.0.0.1) with a pooled
    /// keep-alive client that retries a GET once when its connection was
    /// closed before any response; see [`LoadGen::open_loop`] for one that
    /// never retries.
    pub fn start_retrying(url: &str, rate: u32, max_duration: Duration) -> LoadGen {
        Self::open_loop(url, rate, max_duration, true, Client::RetryOnceIfClosed)
    }

    /// Starts `rate` requests per second against `url` (must be on
    /// 127.0.0.1), with client keep-alive on (`true`) or a new connection
    /// per request (`false`).
    pub fn open_loop(
        url: &str,
        rate: u32,
        max_duration: Duration,
        keep_alive: bool,
        client: Client,
    ) -> LoadGen {
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "load only goes to loopback: {url}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let deadline = started + max_duration;
        let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let http = match client {
            Client::NonRetrying => Http::without_retries(keep_alive),
            Client::RetryOnceIfClosed => Http::with_keep_alive(keep_alive),
        };
        let url = url.to_string();
        let stopped = stop.clone();
        let scheduler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            // Late ticks fire at once: the schedule, not the answers, sets
            // the request count.
            tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
            let mut requests = Vec::new();
            loop {
                let due = tick.tick().await;
                if stopped.load(Ordering::SeqCst) || Instant::now() >= deadline {
                    break;
                }
                let (http, url) = (http.clone(), url.clone());
                requests.push(tokio::spawn(async move {
                    let (outcome, retried) = match timeout(REQUEST_TIMEOUT, once(&http, &url, client)).await {
                        Ok(r) => r,
                        Err(_) => (
                            Err(format!("no answer within {:.1}s", REQUEST_TIMEOUT.as_secs_f64())),
                            false,
                        ),
                    };
                    Sample {
                        at: due - started,
                        latency: due.elapsed(),
                        outcome,
                        retried,
                    }
                }));
            }
            let mut samples = Vec::with_capacity(requests.len());
            for r in requests {
                samples.push(r.await.expect("load request task"));
            }
            samples
        });
        LoadGen {
            stop,
            started,
            scheduler,
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the load, waits for the requests still out (each bounded by
    /// [`REQUEST_TIMEOUT`]) and returns every sample, in send order.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        self.scheduler.await.expect("load scheduler")
    }
}

/// One GET as `client` sends it: the outcome and whether it was retried.
async fn once(http: &Http, url: &str, client: Client) -> (Result<String, String>, bool) {
    let mut retried = false;
    let mut answer = http.get(url).await;
    if client == Client::RetryOnceIfClosed && matches!(&answer, Err(e) if closed_before_response(e)) {
        // On a new connection: a fresh client has an empty pool.
        retried = true;
        answer = Http::new().get(url).await;
    }
    let outcome = match answer {
        Ok(a) if (200..300).contains(&a.status) => Ok(a.version.unwrap_or_else(|| "none".into())),
        Ok(a) => Err(format!("status {}", a.status)),
        Err(e) => Err(e),
    };
    (outcome, retried)
}

/// The `q`-quantile (0–1) of `values` (sorted in place), in milliseconds.
pub fn quantile_ms(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort();
    let idx = ((values.len() - 1) as f64 * q).round() as usize;
    values[idx].as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------
// The scenario

/// Which load balancer sits in front.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbKind {
    /// Real nginx with the nginx driver, draining as given.
    Nginx(DrainMode),
    /// Real HAProxy with the HAProxy driver.
    Haproxy,
}

impl LbKind {
    /// The server binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            LbKind::Nginx(_) => "nginx",
            LbKind::Haproxy => "haproxy",
        }
    }
}

impl std::fmt::Display for LbKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LbKind::Nginx(mode) => write!(f, "nginx (drain = {mode})"),
            LbKind::Haproxy => f.write_str("HAProxy"),
        }
    }
}

/// Which strategy replaces the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrategyKind {
    /// `deploykit::Rolling`, one instance at a time.
    Rolling,
    /// `deploykit::Recreate`: stop all, install, start all.
    Recreate,
    /// `deploykit::BlueGreen`: 4 more instances (green) get v2, then one
    /// switch moves the traffic from blue to green.
    BlueGreen,
}

impl std::fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StrategyKind::Rolling => "rolling",
            StrategyKind::Recreate => "recreate",
            StrategyKind::BlueGreen => "blue-green",
        })
    }
}

/// Load settings of one run.
#[derive(Debug, Clone, Copy)]
pub struct LoadOpts {
    /// Requests per second, sent on schedule.
    pub rate: u32,
    /// Hard stop of the load.
    pub max_duration: Duration,
    /// Latency the demo apps add to `/`, so requests are in flight when
    /// instances are drained and stopped.
    pub app_latency_ms: u64,
    /// Keep client connections to the load balancer alive (`true`, like
    /// browsers and wrk) or open one per request (`false`).
    pub keep_alive: bool,
    /// Whether the client retries (the zero-downtime claims use
    /// [`Client::NonRetrying`]).
    pub client: Client,
    /// Rolling only: the stabilisation pause between instances; longer
    /// pauses stretch the deployment, and the load with it.
    pub pause: Duration,
}

impl Default for LoadOpts {
    fn default() -> Self {
        Self {
            rate: 600,
            max_duration: Duration::from_secs(60),
            app_latency_ms: 5,
            keep_alive: true,
            client: Client::NonRetrying,
            pause: Duration::from_millis(100),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Requests sent while the load ran.
    pub requests: usize,
    /// Requests that failed: non-2xx, transport error, or no answer within
    /// [`REQUEST_TIMEOUT`].
    pub failures: usize,
    /// Up to 5 failure messages.
    pub failure_samples: Vec<String>,
    /// [`Client::RetryOnceIfClosed`] only: requests sent a second time.
    pub retried: usize,
    /// Requests sent during the deployment.
    pub requests_during_deploy: usize,
    /// Failures among them.
    pub failures_during_deploy: usize,
    /// p50 / p99 latency of requests sent during the deployment, ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// How long the deployment took.
    pub deploy: Duration,
    /// nginx reloads the deployment caused (the driver's count of
    /// confirmed reloads); `None` for HAProxy, which changes at run time.
    pub reloads: Option<u64>,
    /// Achieved request rate over the whole load, per second.
    pub rate: f64,
    /// Versions answering 100 sequential requests after the deployment.
    pub final_versions: BTreeMap<String, usize>,
    /// Whether the executor reported success.
    pub report_success: bool,
    /// The report, for failure messages.
    pub report: String,
}

impl Outcome {
    /// Everything measured, for a failure message.
    pub fn describe(&self) -> String {
        format!(
            "requests {} (during deploy {}), failed {} (during deploy {}), retried {}, \
             first failures {:?}, p50 {:.1} ms, p99 {:.1} ms, rate {:.0}/s, deploy {:.2}s, \
             reloads {:?}, final versions {:?}\nreport: {}",
            self.requests,
            self.requests_during_deploy,
            self.failures,
            self.failures_during_deploy,
            self.retried,
            self.failure_samples,
            self.p50_ms,
            self.p99_ms,
            self.rate,
            self.deploy.as_secs_f64(),
            self.reloads,
            self.final_versions,
            self.report
        )
    }
}

/// Starts one demo-app instance of `group` on `port` under `root`.
fn demo_instance(
    id: &str,
    group: &str,
    port: u16,
    root: &std::path::Path,
    builds: &std::path::Path,
    latency_ms: u64,
) -> LocalInstance {
    let spec = ProcessSpec::new([
        "./deploykit-demo-app".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--version".into(),
        "{release}".into(),
        "--latency-ms".into(),
        latency_ms.to_string(),
    ])
    .unwrap()
    .grace(Duration::from_secs(10));
    LocalInstance::builder(id, format!("127.0.0.1:{port}"))
        .group(group)
        .root(root.to_str().unwrap())
        .source(ReleaseSource::directory(builds))
        .process(spec)
        .build()
        .expect("build a LocalInstance")
}

/// Runs the scenario: 4 instances on v1 behind `lb` (blue-green: 4 blue on
/// v1, 4 green stopped), load through the load balancer, `strategy` to v2,
/// then 100 requests to see who answers. Panics when the load balancer's
/// binary is missing (`Option` keeps the callers' shape).
pub async fn run(lb: LbKind, strategy: StrategyKind, load: LoadOpts) -> Option<Outcome> {
    let binary = crate::harness::find_binary(lb.binary())?;
    let tmp = temp_dir("deploykit-zero-downtime");
    let builds = tmp.path().join("builds");
    make_release(&builds, "v1");
    make_release(&builds, "v2");

    let groups: &[&str] = match strategy {
        StrategyKind::BlueGreen => &["blue", "blue", "blue", "blue", "green", "green", "green", "green"],
        _ => &["default"; 4],
    };
    // The instance ports and the load balancer's, distinct.
    let ports = free_ports(groups.len() + 1);
    let mut instances: Vec<Arc<LocalInstance>> = Vec::new();
    let mut roots = Vec::new();
    for (n, group) in groups.iter().enumerate() {
        let root = tmp.path().join(format!("i-{}", n + 1));
        roots.push(root.display().to_string());
        let inst = demo_instance(
            &format!("i-{}", n + 1),
            group,
            ports[n],
            &root,
            &builds,
            load.app_latency_ms,
        );
        instances.push(Arc::new(inst));
    }
    let _kill = KillOnDrop(roots);
    let v1 = ReleaseId::new("v1").unwrap();
    let v2 = ReleaseId::new("v2").unwrap();
    for inst in &instances {
        inst.install(&v1).await.expect("install v1");
        if inst.backend().group.as_str() != "green" {
            inst.start().await.expect("start v1");
        }
    }
    for inst in instances.iter().filter(|i| i.backend().group.as_str() != "green") {
        wait_healthy(inst.as_ref()).await;
        // Its own process answers, not a neighbour on the same port.
        assert!(
            inst.is_running().await.expect("is_running"),
            "{} is not running after start",
            inst.backend().id
        );
    }
    let backends: Vec<Backend> = instances.iter().map(|i| i.backend().clone()).collect();

    // The load balancer in front.
    let port = *ports.last().expect("a port for the load balancer");
    let mut nginx_driver = None;
    let (driver, _nginx, _haproxy): (Arc<dyn LoadBalancer>, Option<Nginx>, Option<Haproxy>) = match lb {
        LbKind::Nginx(mode) => {
            match mode {
                DrainMode::Reload => Nginx::write_config(tmp.path(), port),
                _ => Nginx::write_config_retrying(tmp.path(), port),
            }
            let d = NginxLoadBalancer::builder()
                .include_file(Nginx::upstream_file(tmp.path()))
                .binary(&binary)
                .prefix(format!("{}/", tmp.path().display()))
                .config_file(Nginx::conf(tmp.path()))
                .error_log_stderr(true)
                .pid_file(Nginx::pid_file(tmp.path()))
                .drain_mode(mode)
                .backends(backends.clone())
                .build()
                .unwrap();
            d.install().await.expect("install the upstream file");
            let n = Nginx::start(&binary, tmp.path(), port).await;
            if strategy == StrategyKind::BlueGreen {
                d.switch_to(&Group::new("blue").unwrap())
                    .await
                    .expect("nginx serves blue");
            }
            nginx_driver = Some(d.clone());
            (Arc::new(d), Some(n), None)
        }
        LbKind::Haproxy => {
            let h = Haproxy::start_for(&binary, tmp.path(), port, &backends).await;
            let d = HaproxyLoadBalancer::builder()
                .socket(Haproxy::socket(tmp.path()))
                .backend_name("app")
                .backends(backends.clone())
                .build()
                .unwrap();
            d.check().await.expect("HAProxy knows the servers");
            if strategy == StrategyKind::BlueGreen {
                d.switch_to(&Group::new("blue").unwrap())
                    .await
                    .expect("HAProxy serves blue");
            }
            (Arc::new(d), None, Some(h))
        }
    };
    let url = format!("http://127.0.0.1:{port}/");

    let executor = Executor::builder()
        .instances(instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
        .load_balancer(driver)
        .live_store(Arc::new(FileLiveStore::new(tmp.path().join("live.json"))))
        .drain_poll(Duration::from_millis(20))
        .build()
        .expect("build the executor");
    let health = HealthCheck {
        retries: 100,
        interval: Duration::from_millis(50),
    };

    // Load before, during and after the deployment.
    let gen = LoadGen::open_loop(&url, load.rate, load.max_duration, load.keep_alive, load.client);
    sleep(Duration::from_millis(500)).await;
    let reloads_before = nginx_driver.as_ref().map(NginxLoadBalancer::reloads);
    let deploy_from = gen.elapsed();
    let t = Instant::now();
    let report = match strategy {
        StrategyKind::Rolling | StrategyKind::Recreate => {
            let s: Box<dyn Strategy> = match strategy {
                StrategyKind::Rolling => Box::new(Rolling {
                    batch_size: CountOrPercent::Count(1),
                    health,
                    drain_timeout: Duration::from_secs(15),
                    stabilisation: Some(load.pause),
                    ..Rolling::default()
                }),
                _ => Box::new(Recreate {
                    health,
                    drain_timeout: Duration::from_secs(15),
                }),
            };
            executor.deploy(s.as_ref(), &v2).await.expect("deploy ran")
        }
        StrategyKind::BlueGreen => {
            let bg = BlueGreen {
                healthy_deadline: Duration::from_secs(20),
                health_interval: Duration::from_millis(50),
                warmup_requests: 20,
                ..BlueGreen::default()
            };
            bg.deploy(&executor, &v2).await.expect("deploy ran").deployment
        }
    };
    let deploy = t.elapsed();
    let deploy_to = gen.elapsed();
    let reloads = nginx_driver
        .as_ref()
        .map(NginxLoadBalancer::reloads)
        .zip(reloads_before)
        .map(|(after, before)| after - before);
    sleep(Duration::from_millis(500)).await;
    let load_ran = gen.elapsed();
    let samples = gen.stop().await;

    let final_versions = Http::new().count_versions(&url, 100).await;
    for inst in &instances {
        let _ = inst.stop().await;
    }

    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= deploy_from && s.at <= deploy_to)
        .collect();
    let mut lat: Vec<Duration> = during.iter().map(|s| s.latency).collect();
    let failures: Vec<&Sample> = samples.iter().filter(|s| s.outcome.is_err()).collect();
    Some(Outcome {
        requests: samples.len(),
        failures: failures.len(),
        failure_samples: failures
            .iter()
            .take(5)
            .map(|s| {
                format!(
                    "at {:.3}s: {}",
                    s.at.as_secs_f64(),
                    s.outcome.clone().unwrap_err()
                )
            })
            .collect(),
        retried: samples.iter().filter(|s| s.retried).count(),
        requests_during_deploy: during.len(),
        failures_during_deploy: during.iter().filter(|s| s.outcome.is_err()).count(),
        p50_ms: quantile_ms(&mut lat, 0.50),
        p99_ms: quantile_ms(&mut lat, 0.99),
        deploy,
        reloads,
        rate: samples.len() as f64 / load_ran.as_secs_f64(),
        final_versions,
        report_success: report.is_success(),
        report: report.to_string(),
    })
}

async fn wait_healthy(inst: &dyn Instance) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match inst.health().await {
            Ok(h) if h.is_healthy() => return,
            other if Instant::now() >= end => panic!("{} never got healthy: {other:?}", inst.backend().id),
            _ => sleep(Duration::from_millis(20)).await,
        }
    }
}
