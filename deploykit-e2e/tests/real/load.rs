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

use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::lb::{HaproxyLoadBalancer, NginxLoadBalancer};
use deploykit::{
    Backend, CountOrPercent, Executor, HealthCheck, Instance, LoadBalancer, Recreate, ReleaseId, Rolling,
    Strategy,
};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant, MissedTickBehavior};

use crate::harness::{free_ports, make_release, temp_dir, Haproxy, Http, KillOnDrop, Nginx};

// ---------------------------------------------------------------------------
// Load generator

/// One request's outcome.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When it was sent, since the load started.
    pub at: Duration,
    /// How long the answer took.
    pub latency: Duration,
    /// `Ok(version)` for a 2xx answer; `Err(what)` for a non-2xx status or
    /// a transport error.
    pub outcome: Result<String, String>,
    /// Whether the first try got no response at all because the load
    /// balancer closed or reset the keep-alive connection, and the request
    /// was retried once on a new one (see [`closed_before_response`]).
    pub retried: bool,
}

/// Whether a transport error means "the server closed the connection
/// before sending any response": an idle keep-alive connection that nginx
/// closed during a reload while the request was on its way. HTTP/1.1
/// (RFC 9112, 9.3.1) lets a client retry an idempotent request on a new
/// connection then, and browsers do; the load generator retries such a GET
/// once and counts it as retried, never as a hidden success of another
/// kind. Statuses (502, 503, …) and refused connections are never retried.
pub fn closed_before_response(err: &str) -> bool {
    err.contains("IncompleteMessage") || err.contains("ConnectionReset")
}

/// Open-loop load: `workers` tasks, each sending one GET every
/// `workers / rate` seconds (so about `rate` requests per second in total
/// while answers keep up), until stopped or `max_duration` passes (hard
/// stop).
#[derive(Debug)]
pub struct LoadGen {
    stop: Arc<AtomicBool>,
    started: Instant,
    workers: Vec<JoinHandle<Vec<Sample>>>,
}

impl LoadGen {
    /// Starts the load against `url` (must be on 127.0.0.1).
    pub fn start(url: &str, rate: u32, workers: u32, max_duration: Duration) -> LoadGen {
        Self::start_with(url, rate, workers, max_duration, true)
    }

    /// As [`start`](Self::start), with client keep-alive on (`true`) or a
    /// new connection per request (`false`).
    pub fn start_with(
        url: &str,
        rate: u32,
        workers: u32,
        max_duration: Duration,
        keep_alive: bool,
    ) -> LoadGen {
        assert!(
            url.starts_with("http://127.0.0.1:"),
            "load only goes to loopback: {url}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let deadline = started + max_duration;
        let period = Duration::from_secs_f64(f64::from(workers) / f64::from(rate.max(1)));
        let http = Http::with_keep_alive(keep_alive);
        let handles = (0..workers)
            .map(|w| {
                let stop = stop.clone();
                let http = http.clone();
                let url = url.to_string();
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    // Spread the workers over one period.
                    sleep(period * w / workers.max(1)).await;
                    let mut tick = tokio::time::interval(period);
                    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                            break;
                        }
                        let sent = Instant::now();
                        let mut retried = false;
                        let mut answer = http.get(&url).await;
                        if matches!(&answer, Err(e) if closed_before_response(e)) {
                            // On a new connection: a fresh client has an
                            // empty pool.
                            retried = true;
                            answer = Http::new().get(&url).await;
                        }
                        let outcome = match answer {
                            Ok(a) if (200..300).contains(&a.status) => {
                                Ok(a.version.unwrap_or_else(|| "none".into()))
                            }
                            Ok(a) => Err(format!("status {}", a.status)),
                            Err(e) => Err(e),
                        };
                        samples.push(Sample {
                            at: sent - started,
                            latency: sent.elapsed(),
                            outcome,
                            retried,
                        });
                    }
                    samples
                })
            })
            .collect();
        LoadGen {
            stop,
            started,
            workers: handles,
        }
    }

    /// Time since the load started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the load and returns every sample, in send order.
    pub async fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for h in self.workers {
            all.extend(h.await.expect("load worker"));
        }
        all.sort_by_key(|s| s.at);
        all
    }
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
    /// Real nginx with the nginx driver.
    Nginx,
    /// Real HAProxy with the HAProxy driver.
    Haproxy,
}

impl LbKind {
    /// The server binary's name.
    pub fn binary(self) -> &'static str {
        match self {
            LbKind::Nginx => "nginx",
            LbKind::Haproxy => "haproxy",
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
}

/// Load settings of one run.
#[derive(Debug, Clone, Copy)]
pub struct LoadOpts {
    /// Target requests per second.
    pub rate: u32,
    /// Concurrent request loops.
    pub workers: u32,
    /// Hard stop of the load.
    pub max_duration: Duration,
    /// Latency the demo apps add to `/`, so requests are in flight when
    /// instances are drained and stopped.
    pub app_latency_ms: u64,
    /// Keep client connections to the load balancer alive (`true`, like
    /// browsers) or open one per request (`false`).
    pub keep_alive: bool,
    /// Rolling only: the stabilisation pause between instances; longer
    /// pauses stretch the deployment, and the load with it.
    pub pause: Duration,
}

impl Default for LoadOpts {
    fn default() -> Self {
        Self {
            rate: 600,
            workers: 16,
            max_duration: Duration::from_secs(60),
            app_latency_ms: 5,
            keep_alive: true,
            pause: Duration::from_millis(100),
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Requests sent while the load ran.
    pub requests: usize,
    /// Requests that failed (non-2xx or transport error).
    pub failures: usize,
    /// Up to 5 failure messages.
    pub failure_samples: Vec<String>,
    /// Requests retried once after the load balancer closed the keep-alive
    /// connection before any response (they count as failures only if the
    /// retry failed too).
    pub retried: usize,
    /// Requests sent during the deployment.
    pub requests_during_deploy: usize,
    /// Failures among them.
    pub failures_during_deploy: usize,
    /// p50 / p99 latency of requests sent during the deployment, ms.
    pub p50_ms: f64,
    /// See `p50_ms`.
    pub p99_ms: f64,
    /// How long `Executor::deploy` took.
    pub deploy: Duration,
    /// Achieved request rate over the whole load, per second.
    pub rate: f64,
    /// Versions answering 100 sequential requests after the deployment.
    pub final_versions: BTreeMap<String, usize>,
    /// Whether the executor reported success.
    pub report_success: bool,
    /// The report, for failure messages.
    pub report: String,
}

/// Runs the scenario: 4 instances on v1 behind `lb`, load through the load
/// balancer, `strategy` to v2, then 100 requests to see who answers.
/// Returns `None` when the load balancer's binary is missing outside CI.
pub async fn run(lb: LbKind, strategy: StrategyKind, load: LoadOpts) -> Option<Outcome> {
    let binary = crate::harness::find_binary(lb.binary())?;
    let tmp = temp_dir("deploykit-zero-downtime");
    let builds = tmp.path().join("builds");
    make_release(&builds, "v1");
    make_release(&builds, "v2");

    let mut instances: Vec<Arc<LocalInstance>> = Vec::new();
    let mut roots = Vec::new();
    // Four instance ports and the load balancer's, distinct.
    let ports = free_ports(5);
    for i in 1..=4 {
        let port = ports[i - 1];
        let root = tmp.path().join(format!("i-{i}"));
        roots.push(root.display().to_string());
        let spec = ProcessSpec::new([
            "./deploykit-demo-app".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--version".into(),
            "{release}".into(),
            "--latency-ms".into(),
            load.app_latency_ms.to_string(),
        ])
        .unwrap()
        .grace(Duration::from_secs(10));
        let inst = LocalInstance::builder(format!("i-{i}"), format!("127.0.0.1:{port}"))
            .root(root.to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            .process(spec)
            .build()
            .expect("build a LocalInstance");
        instances.push(Arc::new(inst));
    }
    let _kill = KillOnDrop(roots);
    let v1 = ReleaseId::new("v1").unwrap();
    let v2 = ReleaseId::new("v2").unwrap();
    for inst in &instances {
        inst.install(&v1).await.expect("install v1");
        inst.start().await.expect("start v1");
    }
    for inst in &instances {
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
    let port = ports[4];
    let (driver, _nginx, _haproxy): (Arc<dyn LoadBalancer>, Option<Nginx>, Option<Haproxy>) = match lb {
        LbKind::Nginx => {
            Nginx::write_config(tmp.path(), port);
            let d = NginxLoadBalancer::builder()
                .include_file(Nginx::upstream_file(tmp.path()))
                .binary(&binary)
                .prefix(format!("{}/", tmp.path().display()))
                .config_file(Nginx::conf(tmp.path()))
                .error_log_stderr(true)
                .pid_file(Nginx::pid_file(tmp.path()))
                .backends(backends.clone())
                .build()
                .unwrap();
            d.install().await.expect("install the upstream file");
            let n = Nginx::start(&binary, tmp.path(), port).await;
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
            (Arc::new(d), None, Some(h))
        }
    };
    let url = format!("http://127.0.0.1:{port}/");

    let executor = Executor::builder()
        .instances(instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
        .load_balancer(driver)
        .drain_poll(Duration::from_millis(20))
        .build()
        .expect("build the executor");
    let health = HealthCheck {
        retries: 100,
        interval: Duration::from_millis(50),
    };
    let strategy: Box<dyn Strategy> = match strategy {
        StrategyKind::Rolling => Box::new(Rolling {
            batch_size: CountOrPercent::Count(1),
            health,
            drain_timeout: Duration::from_secs(15),
            stabilisation: Some(load.pause),
            ..Rolling::default()
        }),
        StrategyKind::Recreate => Box::new(Recreate {
            health,
            drain_timeout: Duration::from_secs(15),
        }),
    };

    // Load before, during and after the deployment.
    let gen = LoadGen::start_with(&url, load.rate, load.workers, load.max_duration, load.keep_alive);
    sleep(Duration::from_millis(500)).await;
    let deploy_from = gen.elapsed();
    let t = Instant::now();
    let report = executor.deploy(strategy.as_ref(), &v2).await.expect("deploy ran");
    let deploy = t.elapsed();
    let deploy_to = gen.elapsed();
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
            .map(|s| format!("at {:?}: {}", s.at, s.outcome.clone().unwrap_err()))
            .collect(),
        retried: samples.iter().filter(|s| s.retried).count(),
        requests_during_deploy: during.len(),
        failures_during_deploy: during.iter().filter(|s| s.outcome.is_err()).count(),
        p50_ms: quantile_ms(&mut lat, 0.50),
        p99_ms: quantile_ms(&mut lat, 0.99),
        deploy,
        rate: samples.len() as f64 / load_ran.as_secs_f64(),
        final_versions,
        report_success: report.is_success(),
        report: format!("{report:?}"),
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
