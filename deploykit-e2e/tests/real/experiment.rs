//! An A/B experiment end to end: two demo apps converting at different
//! rates (`--conversion-rate`) behind a real nginx sticky split (its
//! location include), a real Prometheus scraping their visit and
//! conversion counters, and sticky users driving `/api/checkout` through
//! nginx. The better-converting treatment is found and promoted; equal
//! variants end with no significant difference and keep the control.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploykit::experiment::{ExperimentRules, Verdict};
use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::routing::Sticky;
use deploykit::strategy::Treatment;
use deploykit::{
    Canary, EventKind, EventLog, Executor, Experiment, Group, Instance, LoadBalancer, Metric, ReleaseId,
};
use tokio::time::{sleep, Instant};

use crate::harness::{free_port, temp_dir, Http, Nginx};
use crate::local::{make_release, wait_healthy};
use crate::prometheus::{wait_for_value, PromServer};
use crate::routing::{location_file, write_routing_config};

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

/// One demo app of `track` converting `rate` of its checkouts.
fn spec(port: u16, track: &str, rate: &str) -> ProcessSpec {
    ProcessSpec::new([
        "./deploykit-demo-app".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--version".into(),
        "{release}".into(),
        "--track".into(),
        track.into(),
        "--conversion-rate".into(),
        rate.into(),
    ])
    .unwrap()
    .grace(Duration::from_secs(5))
}

/// One failed checkout: when (since the users started), which user, what
/// came back.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    at: Duration,
    user: usize,
    what: String,
}

/// A user: takes the sticky cookie nginx hands out on the first checkout,
/// then checks out with it until `stop`, never sending a request twice;
/// answers the failed ones.
pub(crate) async fn user(
    http: Http,
    url: String,
    n: usize,
    stop: Arc<AtomicBool>,
    t0: Instant,
) -> Vec<Failure> {
    let mut cookie: Option<String> = None;
    let mut failed = Vec::new();
    let mut i = 0;
    while !stop.load(Ordering::SeqCst) {
        let u = format!("{url}?user=u{n}");
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", c.as_str())).collect();
        let what = match http.send("GET", &u, &headers).await {
            Ok(a) if a.status == 200 => {
                if cookie.is_none() {
                    cookie = a
                        .headers
                        .get("set-cookie")
                        .and_then(|c| c.split(';').next())
                        .map(str::to_string);
                }
                None
            }
            Ok(a) => Some(format!("status {} from {:?}", a.status, a.version)),
            Err(e) => Some(e),
        };
        if let Some(what) = what {
            failed.push(Failure {
                at: t0.elapsed(),
                user: n,
                what,
            });
        }
        i += 1;
        // About 20 checkouts a second per user.
        if i % 4 == 0 {
            sleep(Duration::from_millis(200)).await;
        }
    }
    failed
}

/// What one experiment run left: the report, its readings and what nginx
/// serves afterwards.
struct Outcome {
    report: deploykit::Report,
    readings: Vec<deploykit::experiment::Reading>,
    /// The readings of an experiment with several treatments.
    variants: Vec<deploykit::experiment::VariantsReading>,
    served: Vec<String>,
    /// Checkouts that failed, with the events and nginx's error log to
    /// place them.
    failed: Vec<Failure>,
    context: String,
}

/// Control converting 5 %, the treatment `treatment_rate`, for at most
/// `duration`; a missing nginx or Prometheus fails the test (in
/// `find_binary`).
async fn run(treatment_rate: &str, duration: Duration) -> Option<Outcome> {
    run_arms(&[("stable", "0.05", 0), ("canary", treatment_rate, 50)], duration).await
}

/// The control and the treatments: each `(group, conversion rate, percent
/// of users)`; the first is stable (the control), the others treatments,
/// the k-th on release `v{k+1}` (a single treatment runs as the
/// two-variant experiment, at 50 %).
async fn run_arms(arms: &[(&str, &str, u8)], duration: Duration) -> Option<Outcome> {
    let nginx_bin = crate::harness::find_binary("nginx")?;
    let prom_bin = crate::harness::find_binary("prometheus")?;
    let dir = temp_dir("dk-experiment-");
    let builds = dir.path().join("builds");
    for k in 1..=arms.len() {
        make_release(&builds, &format!("v{k}"));
    }
    let mut instances = Vec::new();
    let mut targets = Vec::new();
    for (group, rate, _) in arms {
        let (group, rate) = (*group, *rate);
        let name = format!("{group}-1");
        let name = name.as_str();
        let port = free_port();
        targets.push(format!("127.0.0.1:{port}"));
        let inst = LocalInstance::builder(name, format!("127.0.0.1:{port}"))
            .group(group)
            .root(dir.path().join(name).to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            .process(spec(port, group, rate))
            .build()
            .unwrap();
        inst.install(&v("v1")).await.unwrap();
        if group == "stable" {
            inst.start().await.unwrap();
            wait_healthy(&inst).await;
        }
        instances.push(Arc::new(inst));
    }
    let _kill = crate::harness::KillOnDrop(
        instances
            .iter()
            .map(|i| std::path::PathBuf::from(i.layout().root()))
            .collect(),
    );
    let backends: Vec<_> = instances.iter().map(|i| i.backend().clone()).collect();
    let port = free_port();
    write_routing_config(dir.path(), port);
    let lb = crate::nginx::builder(&nginx_bin, dir.path(), &backends)
        .location_include(location_file(dir.path()))
        .build()
        .expect("build the nginx driver with routing");
    lb.install().await.expect("install both owned files");
    let nginx = Nginx::start(&nginx_bin, dir.path(), port).await;
    // What every canary-shaped run leaves behind: the canary instances
    // stopped and out of the split (a fresh install puts every server in
    // rotation, and this canary is not running yet).
    lb.set_weights(&base_weights(arms))
        .await
        .expect("all traffic to stable");
    let prom = PromServer::start(&prom_bin, dir.path(), &targets).await;

    let log = EventLog::new();
    let exec = Executor::builder()
        .instances(instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
        .load_balancer(Arc::new(lb) as Arc<dyn LoadBalancer>)
        .metrics(Arc::new(prom.source()))
        .events(Arc::new(log.clone()))
        .drain_poll(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut base = Canary {
        check_interval: Duration::from_secs(1),
        health: deploykit::HealthCheck {
            retries: 200,
            interval: Duration::from_millis(50),
        },
        drain_timeout: Duration::from_secs(2),
        ..Canary::default()
    };
    base.analysis.window = Duration::from_secs(5);
    // A fresh treatment needs two scrapes before rate() answers.
    base.analysis.inconclusive_limit = 10;
    let experiment = Experiment {
        base,
        treatment_percent: 50,
        sticky: Sticky::Cookie {
            name: "dk_variant".into(),
        },
        duration,
        rules: ExperimentRules {
            alpha: 0.05,
            min_detectable_effect: 0.05,
            min_samples: 200,
            ..ExperimentRules::default()
        },
        treatments: if arms.len() > 2 {
            arms.iter()
                .enumerate()
                .skip(1)
                .map(|(k, (group, _, percent))| {
                    Treatment::new(Group::new(*group).unwrap(), *percent).release(v(&format!("v{}", k + 1)))
                })
                .collect()
        } else {
            Vec::new()
        },
    };

    let stop = Arc::new(AtomicBool::new(false));
    let url = nginx.url("/api/checkout");
    // A new connection per checkout and never a retry: each nginx reload
    // (one per routing change) closes idle keep-alive connections, which a
    // non-retrying keep-alive client sees as failures whatever deploykit
    // does (the zero_downtime bench measures it); every other failure
    // shows.
    let http = Http::without_retries(false);
    let t0 = Instant::now();
    let users: Vec<_> = (0..30)
        .map(|n| tokio::spawn(user(http.clone(), url.clone(), n, stop.clone(), t0)))
        .collect();
    // The monitoring check before the first stage needs stable's metrics.
    let source = prom.source();
    let w = experiment.base.analysis.window;
    for metric in [Metric::ErrorRate, Metric::LatencyP99] {
        wait_for_value(&source, metric, "stable", w).await;
    }
    let end = Instant::now() + Duration::from_secs(20);
    while wait_for_value(&source, Metric::RequestCount, "stable", w).await <= 0.0 {
        assert!(Instant::now() < end, "no stable requests counted within 20 s");
        sleep(Duration::from_millis(200)).await;
    }
    let started = Instant::now();
    let deploy_at = t0.elapsed();
    let report = exec
        .deploy(&experiment, &v("v2"))
        .await
        .expect("the deployment ran");
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut failed = Vec::new();
    for u in users {
        failed.extend(u.await.expect("a user"));
    }
    failed.sort_by_key(|f| f.at);
    let readings: Vec<_> = log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::ExperimentReading { reading, .. } => Some(reading),
            _ => None,
        })
        .collect();
    let variants: Vec<_> = log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::ExperimentVariants { reading, .. } => Some(reading),
            _ => None,
        })
        .collect();
    let mut served = Vec::new();
    for _ in 0..10 {
        let a = http.get(&nginx.url("/")).await.expect("GET through nginx");
        served.push(a.body.trim().to_string());
    }
    let mut context = format!(
        "the deployment started {} ms after the users\n",
        deploy_at.as_millis()
    );
    for f in &failed {
        context += &format!("failed at {} ms: user {}: {}\n", f.at.as_millis(), f.user, f.what);
    }
    for e in log.events() {
        context += &format!(
            "event at {} ms: {}\n",
            e.elapsed_ms,
            serde_json::to_string(&e.kind).unwrap_or_default()
        );
    }
    context += &format!(
        "nginx error log:\n{}",
        std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
    );
    eprintln!("{} checkouts failed", failed.len());
    eprintln!(
        "experiment decided in {took:?} after {} readings",
        readings.len() + variants.len()
    );
    for i in &instances {
        let _ = i.stop().await;
    }
    Some(Outcome {
        report,
        readings,
        variants,
        served,
        failed,
        context,
    })
}

/// All traffic on stable (the first arm), none on the others.
fn base_weights(arms: &[(&str, &str, u8)]) -> Vec<deploykit::GroupWeight> {
    arms.iter()
        .enumerate()
        .map(|(k, (g, _, _))| deploykit::GroupWeight {
            group: deploykit::Group::new(*g).unwrap(),
            percent: if k == 0 { 100 } else { 0 },
        })
        .collect()
}

#[tokio::test]
async fn the_better_converting_treatment_wins_on_real_prometheus_and_is_promoted() {
    let Some(Outcome {
        report,
        readings,
        served,
        failed,
        context,
        ..
    }) = run("0.30", Duration::from_secs(25)).await
    else {
        return;
    };
    assert!(report.is_success(), "{report}\nreadings: {readings:?}");
    let last = readings.last().expect("at least one experiment reading");
    assert_eq!(last.verdict, Verdict::TreatmentWins, "{readings:?}");
    // The tallies are the demo apps' own: about 5 % and 30 %.
    assert!(
        last.control.visits >= 200.0 && last.treatment.visits >= 200.0,
        "{last:?}"
    );
    assert!((0.02..0.10).contains(&last.control.rate()), "{last:?}");
    assert!((0.20..0.40).contains(&last.treatment.rate()), "{last:?}");
    // Promoted: every answer through nginx now comes from v2.
    assert!(served.iter().all(|b| b == "v2"), "{served:?}");
    // Not one checkout failed: neither while the treatment was replaced
    // nor while stable was, its users moved to the winner first.
    assert!(failed.is_empty(), "{} checkouts failed:\n{context}", failed.len());
}

#[tokio::test]
async fn equal_conversion_gives_no_significant_difference_and_keeps_the_control() {
    let Some(Outcome {
        report,
        readings,
        served,
        failed,
        context,
        ..
    }) = run("0.05", Duration::from_secs(6)).await
    else {
        return;
    };
    assert!(!report.is_success(), "{report}");
    let text = report.to_string();
    assert!(text.contains("no significant difference"), "{text}");
    assert!(
        readings.iter().all(|r| r.verdict == Verdict::Continue),
        "{readings:?}"
    );
    let last = readings.last().expect("at least one experiment reading");
    assert!(
        last.control.visits >= 200.0 && last.treatment.visits >= 200.0,
        "{last:?}"
    );
    // Rolled back: the control (v1) serves everyone.
    assert!(served.iter().all(|b| b == "v1"), "{served:?}");
    assert!(failed.is_empty(), "{} checkouts failed:\n{context}", failed.len());
}

/// Three variants through real nginx and Prometheus: the control and
/// treatment B converting 5 %, treatment C (on v3) 30 %. C wins by the
/// Holm-corrected test, every user moves to it, stable is promoted to v3,
/// and not one checkout fails.
#[tokio::test]
async fn the_best_of_three_variants_wins_and_stable_moves_to_its_release() {
    let Some(Outcome {
        report,
        variants,
        served,
        failed,
        context,
        ..
    }) = run_arms(
        &[
            ("stable", "0.05", 0),
            ("canary-b", "0.05", 33),
            ("canary-c", "0.30", 33),
        ],
        Duration::from_secs(25),
    )
    .await
    else {
        return;
    };
    assert!(report.is_success(), "{report}\nreadings: {variants:?}");
    let last = variants.last().expect("at least one experiment reading");
    eprintln!("deciding reading: {last}");
    assert_eq!(last.winner, Some(Group::new("canary-c").unwrap()), "{last}");
    let (b, c) = (&last.treatments[0].comparison, &last.treatments[1].comparison);
    assert!(
        last.control.visits >= 200.0 && c.treatment.visits >= 200.0,
        "{last}"
    );
    assert!((0.20..0.40).contains(&c.treatment.rate()), "{last}");
    assert!(c.adjusted_p_value <= 0.05 && b.adjusted_p_value > 0.05, "{last}");
    let winner = report.winner.as_ref().expect("the report names the winner");
    assert_eq!(winner.release, v("v3"));
    assert_eq!(report.release, v("v3"));
    // Promoted: every answer through nginx now comes from v3.
    assert!(served.iter().all(|b| b == "v3"), "{served:?}");
    assert!(failed.is_empty(), "{} checkouts failed:\n{context}", failed.len());
}
