//! A rolling deployment of 12 simulated instances, 3 at a time, where the new
//! release is unhealthy on one instance: it is restored, the deployment
//! finishes within its failure budget, and the report names it.
//!
//! Run: `cargo run -p deploykit-examples --example rolling`

use std::sync::Arc;

use deploykit::{CountOrPercent, EventKind, Executor, ReleaseId, Rolling, RunOptions, Strategy};
use deploykit_testkit::FakeFleet;

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> anyhow::Result<()> {
    // Virtual time: the 10-second health intervals cost nothing.
    let fleet = FakeFleet::new(12).fail_health("i-5");
    let executor = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(|e: &deploykit::Event| match &e.kind {
            EventKind::StageStarted { name, .. } => println!("[{:>5}s] {name}", e.elapsed_ms / 1000),
            EventKind::InstanceFailed { instance, reason, .. } => {
                println!("[{:>5}s]   {instance} failed: {reason}", e.elapsed_ms / 1000)
            }
            EventKind::InstanceRestored { instance, .. } => {
                println!("[{:>5}s]   {instance} restored", e.elapsed_ms / 1000)
            }
            _ => {}
        }))
        .build()?;
    let rolling = Rolling {
        batch_size: CountOrPercent::Percent(25),
        max_failures: CountOrPercent::Count(1),
        ..Rolling::default()
    };
    let plan = rolling.plan(&executor.snapshot().await?, &ReleaseId::new("v2")?)?;
    let p = plan.projected_duration();
    println!(
        "{} stages; projected {}s to {}s",
        plan.stages.len(),
        p.min.as_secs(),
        p.max.as_secs()
    );
    let report = executor.run(&plan, RunOptions::default()).await?;
    print!("{report}");
    fleet.check(&report, rolling.resolved_batch(12)).assert_ok();
    Ok(())
}
