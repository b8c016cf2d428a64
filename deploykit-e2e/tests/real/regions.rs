//! A multi-region run against real servers: three regions, each with its
//! own nginx and demo-app instances run by `LocalInstance`; region 2
//! deploys a canary judged by a real Prometheus scraping its instances.
//! A canary erring 5 % in region 2 fails its analysis: region 2 rolls
//! back, region 1 (already deployed) stays, region 3 is never touched, and
//! returning region 1 alone leaves the others as they are.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::regions::{self, ExecutorRegions, OnFailure, RegionName, RegionRunner, RegionState, Rollout};
use deploykit::{
    Backend, Canary, Executor, HealthCheck, Instance, LoadBalancer, Metric, ReleaseId, Rolling, Strategy,
};
use tokio::time::{sleep, Instant};

use crate::harness::{free_port, make_release, temp_dir, Http, KillOnDrop, Nginx, START_DEADLINE};
use crate::load::LoadGen;
use crate::prometheus::{wait_for_value, PromServer};

/// One region: its demo apps (`(track, extra flags)` each), its nginx.
struct Region {
    instances: Vec<Arc<LocalInstance>>,
    backends: Vec<Backend>,
    nginx: Nginx,
    url: String,
    dir: std::path::PathBuf,
}

async fn region(nginx_bin: &Path, dir: &Path, builds: &Path, name: &str, apps: &[(&str, &[&str])]) -> Region {
    std::fs::create_dir_all(dir).unwrap();
    let mut instances = Vec::new();
    for (i, (track, extra)) in apps.iter().enumerate() {
        let port = free_port();
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
        argv.extend(extra.iter().map(|s| s.to_string()));
        let spec = ProcessSpec::new(argv).unwrap().grace(Duration::from_secs(10));
        let inst = LocalInstance::builder(format!("{name}-{}", i + 1), format!("127.0.0.1:{port}"))
            .group(*track)
            .root(dir.join(format!("i-{}", i + 1)).to_str().unwrap())
            .source(ReleaseSource::directory(builds))
            .process(spec)
            .build()
            .expect("build a LocalInstance");
        instances.push(Arc::new(inst));
    }
    let v1 = ReleaseId::new("v1").unwrap();
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
    let backends: Vec<Backend> = instances.iter().map(|i| i.backend().clone()).collect();
    let port = free_port();
    Nginx::write_config(dir, port);
    let lb = crate::nginx::driver(nginx_bin, dir, &backends);
    lb.install().await.expect("install the upstream file");
    let nginx = Nginx::start(nginx_bin, dir, port).await;
    Region {
        instances,
        backends,
        nginx,
        url: format!("http://127.0.0.1:{port}/"),
        dir: dir.to_path_buf(),
    }
}

impl Region {
    fn executor(&self, nginx_bin: &Path, metrics: Option<Arc<dyn deploykit::MetricsSource>>) -> Executor {
        let mut b = Executor::builder()
            .instances(self.instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
            .load_balancer(
                Arc::new(crate::nginx::driver(nginx_bin, &self.dir, &self.backends)) as Arc<dyn LoadBalancer>,
            )
            .drain_poll(Duration::from_millis(20));
        if let Some(m) = metrics {
            b = b.metrics(m);
        }
        b.build().expect("build the executor")
    }

    async fn releases(&self) -> Vec<String> {
        let mut out = Vec::new();
        for i in &self.instances {
            out.push(match i.current_release().await {
                Ok(Some(r)) => r.to_string(),
                other => format!("{other:?}"),
            });
        }
        out
    }
}

#[tokio::test]
async fn a_bad_canary_in_region_2_rolls_back_region_2_and_never_touches_region_3() {
    let Some(nginx_bin) = crate::harness::find_binary("nginx") else {
        return;
    };
    let Some(prom_bin) = crate::harness::find_binary("prometheus") else {
        return;
    };
    let tmp = temp_dir("deploykit-regions-real");
    let builds = tmp.path().join("builds");
    make_release(&builds, "v1");
    make_release(&builds, "v2");
    let no_flags: &[&str] = &[];
    let erring: &[&str] = &["--error-rate", "0.05"];
    let r1 = region(
        &nginx_bin,
        &tmp.path().join("r-1"),
        &builds,
        "r-1",
        &[("stable", no_flags), ("stable", no_flags)],
    )
    .await;
    let r2 = region(
        &nginx_bin,
        &tmp.path().join("r-2"),
        &builds,
        "r-2",
        &[("stable", no_flags), ("stable", no_flags), ("canary", erring)],
    )
    .await;
    let r3 = region(
        &nginx_bin,
        &tmp.path().join("r-3"),
        &builds,
        "r-3",
        &[("stable", no_flags), ("stable", no_flags)],
    )
    .await;
    let _kill = KillOnDrop(
        ["r-1", "r-2", "r-3"]
            .iter()
            .flat_map(|r| (1..=3).map(move |i| format!("{r}/i-{i}")))
            .map(|p| tmp.path().join(p))
            .collect::<Vec<_>>(),
    );
    let targets: Vec<String> = r2.backends.iter().map(|b| b.address.to_string()).collect();
    let prom = PromServer::start(&prom_bin, tmp.path(), &targets).await;

    let runner = ExecutorRegions::new()
        .with(RegionName::new("r-1").unwrap(), r1.executor(&nginx_bin, None))
        .with(
            RegionName::new("r-2").unwrap(),
            r2.executor(&nginx_bin, Some(Arc::new(prom.source()))),
        )
        .with(RegionName::new("r-3").unwrap(), r3.executor(&nginx_bin, None));
    let rollout = Rollout {
        waves: vec![vec!["r-1".into()], vec!["r-2".into()], vec!["r-3".into()]],
        on_failure: OnFailure::RollbackRegion,
        soak: Duration::from_secs(2),
        soak_interval: Duration::from_millis(500),
        ..Rollout::default()
    };
    let mut canary = Canary {
        stages: vec![25, 50, 100],
        stage_duration: Duration::from_secs(5),
        check_interval: Duration::from_secs(1),
        health: HealthCheck {
            retries: 100,
            interval: Duration::from_millis(50),
        },
        drain_timeout: Duration::from_secs(5),
        ..Canary::default()
    };
    canary.analysis.window = Duration::from_secs(10);
    canary.analysis.inconclusive_limit = 6;
    let rolling = Rolling {
        health: HealthCheck {
            retries: 100,
            interval: Duration::from_millis(50),
        },
        drain_timeout: Duration::from_secs(5),
        stabilisation: Some(Duration::from_millis(100)),
        ..Rolling::default()
    };
    let v2 = ReleaseId::new("v2").unwrap();
    let plan = runner
        .plan(&rollout, &v2, None, |r| -> Box<dyn Strategy> {
            if r.as_str() == "r-2" {
                Box::new(canary.clone())
            } else {
                Box::new(rolling.clone())
            }
        })
        .await
        .expect("plan");
    let r3_upstream = std::fs::read_to_string(Nginx::upstream_file(&r3.dir)).unwrap();

    // Region 2's analysis needs stable traffic seen by Prometheus first.
    let load = LoadGen::start_retrying(&r2.url, 200, Duration::from_secs(90));
    let source = prom.source();
    for metric in [Metric::ErrorRate, Metric::LatencyP99] {
        wait_for_value(&source, metric, "stable", canary.analysis.window).await;
    }
    let end = Instant::now() + Duration::from_secs(20);
    while wait_for_value(&source, Metric::RequestCount, "stable", canary.analysis.window).await <= 0.0 {
        assert!(Instant::now() < end, "no stable requests counted within 20 s");
        sleep(Duration::from_millis(200)).await;
    }

    let log = regions::RegionEventLog::new();
    let report = regions::run(&plan, &runner, &log, Default::default()).await;
    let _ = load.stop().await;
    let events: Vec<String> = log.events().iter().map(|e| e.to_string()).collect();
    assert_eq!(
        report.outcome,
        regions::RegionsOutcome::Failed,
        "{report}\n{events:#?}"
    );
    assert_eq!(report.region("r-1").unwrap().state, RegionState::Deployed);
    let r2_report = report.region("r-2").unwrap();
    assert_eq!(r2_report.state, RegionState::Failed, "{report}");
    assert!(
        r2_report
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("canary error rate"),
        "{report}"
    );
    assert_eq!(report.region("r-3").unwrap().state, RegionState::NotStarted);

    // What each region's nginx serves, and what its instances run.
    let http = Http::new();
    assert_eq!(http.count_versions(&r1.url, 20).await.get("v2"), Some(&20));
    assert_eq!(http.count_versions(&r2.url, 20).await.get("v1"), Some(&20));
    assert_eq!(http.count_versions(&r3.url, 20).await.get("v1"), Some(&20));
    assert_eq!(r3.releases().await, ["v1", "v1"]);
    assert_eq!(
        std::fs::read_to_string(Nginx::upstream_file(&r3.dir)).unwrap(),
        r3_upstream,
        "region 3's nginx was never touched"
    );

    // Returning region 1 alone leaves regions 2 and 3 as they are.
    let r1_plan = plan.regions().find(|r| r.region.as_str() == "r-1").unwrap();
    let back = runner.rollback(r1_plan).await.expect("rollback of r-1");
    assert!(back.is_success(), "{back}");
    assert_eq!(http.count_versions(&r1.url, 20).await.get("v1"), Some(&20));
    assert_eq!(r1.releases().await, ["v1", "v1"]);
    assert_eq!(http.count_versions(&r3.url, 20).await.get("v1"), Some(&20));
    assert_eq!(
        std::fs::read_to_string(Nginx::upstream_file(&r3.dir)).unwrap(),
        r3_upstream
    );
    for r in [&r1, &r2, &r3] {
        for i in &r.instances {
            let _ = i.stop().await;
        }
    }
    drop((r1.nginx, r2.nginx, r3.nginx));
}
