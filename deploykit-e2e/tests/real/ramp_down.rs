//! A ramp with `ramp_down` against a real nginx, real demo apps run by
//! `LocalInstance`s and a real Prometheus: the canary fails a mild share of
//! its requests (`--error-rate`), the analysis reads it from Prometheus and
//! breaches under the critical ratio, and the canary's observed share (the
//! `x-app-track` of answers through nginx) steps down over time before the
//! rollback takes the rest.

use std::sync::Arc;
use std::time::Duration;

use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::{
    Canary, Event, EventKind, EventSink, Executor, Group, GroupWeight, Instance, LoadBalancer, Metric,
    OutcomeKind, RampCurve, Ramped, ReleaseId, StepKind,
};
use tokio::sync::mpsc;
use tokio::time::{sleep, Instant};

use crate::harness::{free_port, temp_dir, Http, KillOnDrop, Nginx};
use crate::load::{Client, LoadGen};
use crate::local::{make_release, wait_healthy};
use crate::prometheus::{wait_for_value, PromServer};

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

/// A demo app of `track` failing `error_rate` of its `GET /`s, evenly
/// spread.
fn spec(port: u16, track: &str, error_rate: &str) -> ProcessSpec {
    ProcessSpec::new([
        "./deploykit-demo-app".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--version".into(),
        "{release}".into(),
        "--track".into(),
        track.into(),
        "--error-rate".into(),
        error_rate.into(),
    ])
    .unwrap()
    .grace(Duration::from_secs(5))
}

/// How many of `n` GETs through nginx the canary answered (by the track
/// header, so its injected 500s count as its answers too).
async fn canary_share(http: &Http, url: &str, n: usize) -> usize {
    let mut on_canary = 0;
    for _ in 0..n {
        let a = http.get(url).await.expect("GET through nginx");
        if a.headers.get("x-app-track").map(String::as_str) == Some("canary") {
            on_canary += 1;
        }
    }
    on_canary
}

#[tokio::test]
async fn a_mild_breach_steps_the_observed_share_down_before_the_rollback() {
    let Some(nginx_bin) = crate::harness::find_binary("nginx") else {
        return;
    };
    let Some(prom_bin) = crate::harness::find_binary("prometheus") else {
        return;
    };
    let dir = temp_dir("dk-ramp-down-");
    let builds = dir.path().join("builds");
    for r in ["v1", "v2"] {
        make_release(&builds, r);
    }
    let mut instances = Vec::new();
    let mut targets = Vec::new();
    // The canary fails 2 % of its requests: over the 1 % limit, well under
    // the critical 5 times it (5 %), whatever a scrape's rounding does.
    for (name, group, errors) in [("stable-1", "stable", "0"), ("canary-1", "canary", "0.02")] {
        let port = free_port();
        targets.push(format!("127.0.0.1:{port}"));
        let inst = LocalInstance::builder(name, format!("127.0.0.1:{port}"))
            .group(group)
            .root(dir.path().join(name).to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            .process(spec(port, group, errors))
            .build()
            .unwrap();
        inst.install(&v("v1")).await.unwrap();
        if group == "stable" {
            inst.start().await.unwrap();
            wait_healthy(&inst).await;
        }
        instances.push(Arc::new(inst));
    }
    let _kill = KillOnDrop(
        instances
            .iter()
            .map(|i| std::path::PathBuf::from(i.layout().root()))
            .collect(),
    );
    let backends: Vec<_> = instances.iter().map(|i| i.backend().clone()).collect();
    let port = free_port();
    Nginx::write_config(dir.path(), port);
    let lb = crate::nginx::builder(&nginx_bin, dir.path(), &backends)
        .build()
        .expect("build the nginx driver");
    // What `deploykit setup` writes for a canary-shaped strategy: the
    // stopped canary out of rotation from the first file nginx reads.
    lb.install_with_weights(&[GroupWeight {
        group: Group::new("stable").unwrap(),
        percent: 100,
    }])
    .await
    .expect("install the upstream file");
    let nginx = Nginx::start(&nginx_bin, dir.path(), port).await;
    let prom = PromServer::start(&prom_bin, dir.path(), &targets).await;

    let (tx, mut events) = mpsc::unbounded_channel();
    let exec = Executor::builder()
        .instances(instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
        .load_balancer(Arc::new(lb) as Arc<dyn LoadBalancer>)
        .metrics(Arc::new(prom.source()))
        .events(Arc::new(Channel(tx)))
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
    // A fresh canary needs two scrapes before rate() answers.
    base.analysis.inconclusive_limit = 10;
    // Only the absolute 1 % limit judges: stable fails nothing, so the
    // relative rule's limit (2 x 0) would make any canary error critical.
    base.analysis.ratio_floor = 0.5;
    let ramp = Ramped {
        base,
        from: 60,
        to: 90,
        // The canary breaks from its start: the ramp never leaves 60 %.
        duration: Duration::from_secs(30),
        step_interval: Duration::from_secs(15),
        curve: RampCurve::Linear,
        ramp_down: Some(Duration::from_secs(3)),
        ramp_down_critical: 5.0,
    };
    let plan = deploykit::Strategy::plan(&ramp, &exec.snapshot().await.unwrap(), &v("v2")).unwrap();
    let way_down = plan.to_string();
    assert!(
        way_down.contains("ramp down 45% 30% 15% over 3s, then roll back"),
        "{way_down}"
    );

    let url = nginx.url("/");
    // Traffic for the analysis: 100 GETs a second, a new connection each.
    let load = LoadGen::open_loop(&url, 100, Duration::from_secs(60), false, Client::NonRetrying);
    // The monitoring check before the first stage needs stable's metrics.
    let source = prom.source();
    let w = ramp.base.analysis.window;
    for metric in [Metric::ErrorRate, Metric::LatencyP99] {
        wait_for_value(&source, metric, "stable", w).await;
    }
    let end = Instant::now() + Duration::from_secs(20);
    while wait_for_value(&source, Metric::RequestCount, "stable", w).await <= 0.0 {
        assert!(Instant::now() < end, "no stable requests counted within 20 s");
        sleep(Duration::from_millis(200)).await;
    }

    let http = Http::without_retries(false);
    let sampler = async {
        let mut stage = String::new();
        // (intended canary share, observed of 100, when)
        let mut seen: Vec<(u8, usize, Instant)> = Vec::new();
        while let Some(e) = events.recv().await {
            match e.kind {
                EventKind::StageStarted { name, .. } => stage = name,
                EventKind::StepFinished {
                    step: StepKind::SetWeights,
                    rollback: false,
                    ..
                } if stage.starts_with("ramp 60%") => {
                    seen.push((60, canary_share(&http, &url, 100).await, Instant::now()));
                }
                // Sent once the lower share is confirmed in nginx.
                EventKind::RampingDown { weight, .. } => {
                    seen.push((weight, canary_share(&http, &url, 100).await, Instant::now()));
                }
                EventKind::DeploymentFinished { .. } => break,
                _ => {}
            }
        }
        seen
    };
    let release = v("v2");
    let (report, seen) = tokio::join!(exec.deploy(&ramp, &release), sampler);
    let report = report.expect("the deployment ran");
    let _ = load.stop().await;
    assert_eq!(
        report.outcome,
        OutcomeKind::RolledBack,
        "{report}\nshares: {seen:?}"
    );
    let reason = report.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("canary error rate") && reason.contains("ramped down from 60% to 15% over 3s"),
        "{reason}"
    );
    let shares: Vec<String> = seen.iter().map(|(p, o, _)| format!("{p}% -> {o}/100")).collect();
    eprintln!("intended -> observed canary share: {}", shares.join(", "));
    let intended: Vec<u8> = seen.iter().map(|(p, _, _)| *p).collect();
    assert_eq!(intended, [60, 45, 30, 15], "{seen:?}");
    for (percent, observed, _) in &seen {
        // nginx's weighted round robin is exact over a cycle; the load's
        // requests interleave with the sample's and shift it.
        assert!(
            observed.abs_diff(usize::from(*percent)) <= 12,
            "{percent} % intended, {observed} of 100 observed: {seen:?}"
        );
    }
    // Down over time: each step held about a check interval.
    for pair in seen[1..].windows(2) {
        let held = pair[1].2 - pair[0].2;
        assert!(
            pair[1].1 < pair[0].1 && held >= Duration::from_millis(500),
            "{seen:?}"
        );
    }
    // Rolled back: all traffic on stable, the canary stopped.
    assert_eq!(canary_share(&http, &url, 20).await, 0);
    for i in &instances {
        let _ = i.stop().await;
    }
}
