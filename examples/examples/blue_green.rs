//! Blue-green on simulated instances: v2 goes to the idle green environment,
//! is smoke-tested, warmed up and switched to; then a deployment of v3 whose
//! database check fails on one instance is stopped before any traffic
//! reaches it; finally a rollback puts traffic back on blue in one switch.
//!
//! Run: `cargo run -p deploykit-examples --example blue_green`

use std::sync::Arc;

use deploykit::bluegreen_state::peek;
use deploykit::{BlueGreen, Event, EventKind, Executor, KeepOld, ReleaseId};
use deploykit_testkit::{FakeFleet, FakeLiveStore, FakeSmokeTester};

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> anyhow::Result<()> {
    // Three instances per environment; blue (i-1…i-3) is live on v1.
    let fleet = FakeFleet::with_groups(&[("blue", 3), ("green", 3)]).live("blue");
    // The smoke tester answers like the instances would; i-2's database
    // ping fails (it is only checked when blue is the idle side).
    let smoke = FakeSmokeTester::for_fleet(&fleet).fail_check(
        "i-2",
        "/api/db/ping",
        "got status 503 with body \"db: connection refused\"",
    );
    let store = FakeLiveStore::recording("blue");
    let executor = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .smoke_tester(Arc::new(smoke))
        .live_store(Arc::new(store.clone()))
        .events(Arc::new(|e: &Event| match &e.kind {
            EventKind::StageStarted { name, .. } => println!("[{:>4}s] {name}", e.elapsed_ms / 1000),
            EventKind::WarmUpProgress {
                sent, total, failed, ..
            } if sent == total => {
                println!(
                    "[{:>4}s]   warm-up: {sent}/{total} requests, {failed} failed",
                    e.elapsed_ms / 1000
                )
            }
            EventKind::InstanceFailed { instance, reason, .. } => {
                println!("[{:>4}s]   {instance} failed: {reason}", e.elapsed_ms / 1000)
            }
            _ => {}
        }))
        .build()?;
    let bluegreen = BlueGreen {
        keep_old: KeepOld::UntilNextDeployment,
        ..BlueGreen::default()
    };

    println!("== dry run of v2 ==");
    // A dry run reads which environment is live without reconciling.
    let live = peek(&store, executor.load_balancer().as_ref(), &bluegreen.environments).await?;
    print!(
        "{}",
        bluegreen.plan(&live, &executor.snapshot().await?, &ReleaseId::new("v2")?)?
    );

    println!("\n== deploy v2 ==");
    let out = bluegreen.deploy(&executor, &ReleaseId::new("v2")?).await?;
    print!("{}", out.deployment);
    println!("live: {} (recorded: {})", out.live, recorded(&store));

    println!("\n== deploy v3 (blue is idle now; i-2 fails its smoke check) ==");
    let out = bluegreen.deploy(&executor, &ReleaseId::new("v3")?).await?;
    print!("{}", out.deployment);
    println!("live: {} — traffic never left green", out.live);

    println!("\n== roll back to the previous environment ==");
    let rb = bluegreen.rollback(&executor).await?;
    print!("{}", rb.deployment);
    println!("live: {} (recorded: {})", rb.live, recorded(&store));
    Ok(())
}

/// The recorded live environment, for a person.
fn recorded(store: &FakeLiveStore) -> String {
    store.live().map_or_else(|| "nothing".into(), |g| g.to_string())
}
