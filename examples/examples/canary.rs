//! Canary deployments on fakes, in virtual time: a healthy canary promoted by
//! hand and finalized, then a canary whose error rate climbs during stage 2
//! rolled back by the analysis on its own.
//!
//! Run: `cargo run -p deploykit-examples --example canary`

use std::sync::Arc;
use std::time::Duration;

use deploykit::{
    Canary, EventKind, Executor, Metric, Observation, Promotion, PromotionHandle, ReleaseId, Report,
};
use deploykit_testkit::{FakeFleet, FakeMetrics};

fn healthy() -> FakeMetrics {
    FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.002)
        .set("stable", Metric::LatencyP99, 0.120)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, 0.002)
        .set("canary", Metric::LatencyP99, 0.130)
}

/// Prints the canary's progress as it goes.
fn progress(event: &deploykit::Event) {
    let t = event.elapsed_ms / 1000;
    match &event.kind {
        EventKind::StageProgress {
            stage,
            of,
            weight,
            percent,
            ..
        } if *percent == 100 => println!("[{t:>5}s] stage {stage}/{of} at {weight}% passed"),
        EventKind::AwaitingPromotion { stage, .. } => {
            println!("[{t:>5}s] stage {stage} waits for a promotion")
        }
        EventKind::Promoted { stage } => println!("[{t:>5}s] stage {stage} promoted"),
        EventKind::AnalysisResult { result, .. }
            if !matches!(result, deploykit::analysis::CheckOutcome::Pass) =>
        {
            println!("[{t:>5}s] check: {result}")
        }
        EventKind::RollbackStarted { reason, .. } => println!("[{t:>5}s] rolling back: {reason}"),
        _ => {}
    }
}

async fn run(
    fleet: &FakeFleet,
    metrics: FakeMetrics,
    canary: Canary,
    handle: PromotionHandle,
) -> anyhow::Result<Report> {
    let executor = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(metrics))
        .promotion(handle)
        .events(Arc::new(progress))
        .build()?;
    Ok(executor.deploy(&canary, &ReleaseId::new("v2")?).await?)
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> anyhow::Result<()> {
    println!("== a healthy canary, promoted by hand ==");
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]);
    let handle = PromotionHandle::new();
    let operator = handle.clone();
    // The embedding program (here: a task; in the CLI: `deploykit promote`)
    // promotes each paused stage after a look at the dashboards.
    tokio::spawn(async move {
        loop {
            operator.wait_for_pause().await;
            tokio::time::sleep(Duration::from_secs(120)).await;
            operator.promote();
        }
    });
    let canary = Canary {
        stages: vec![10, 50, 100],
        promotion: Promotion::Manual {
            timeout: Some(Duration::from_secs(3600)),
        },
        ..Canary::default()
    };
    let report = run(&fleet, healthy(), canary, handle).await?;
    print!("{report}");
    assert!(report.is_success());
    fleet.check(&report, 1).assert_ok();

    println!("\n== a canary whose error rate climbs during stage 2 ==");
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]);
    let metrics = healthy().script("canary", Metric::ErrorRate, |t| {
        Observation::Value(if t <= Duration::from_secs(400) {
            0.002
        } else {
            0.04
        })
    });
    let report = run(&fleet, metrics, Canary::default(), PromotionHandle::new()).await?;
    print!("{report}");
    assert!(fleet.releases().values().all(|r| r.as_str() == "v1"));
    fleet.check(&report, 1).assert_ok();
    Ok(())
}
