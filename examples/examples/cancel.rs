//! Cancelling a deployment part-way: every instance already moved is rolled
//! back, so the fleet ends on one version.
//!
//! Run: `cargo run -p deploykit-examples --example cancel`

use std::sync::Arc;
use std::time::Duration;

use deploykit::{CountOrPercent, Executor, ReleaseId, Rolling};
use deploykit_testkit::{FakeFleet, Op};
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> anyhow::Result<()> {
    let fleet = FakeFleet::new(6).latency(Op::Install, Duration::from_secs(20));
    let cancel = CancellationToken::new();
    let executor = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .cancel_token(cancel.clone())
        .build()?;
    let rolling = Rolling {
        batch_size: CountOrPercent::Count(2),
        ..Rolling::default()
    };
    let release = ReleaseId::new("v2")?;
    let run = tokio::spawn(async move { executor.deploy(&rolling, &release).await });

    // An operator presses Ctrl-C during the second batch.
    tokio::time::sleep(Duration::from_secs(40)).await;
    println!("cancelling after 40 s; releases now: {:?}", fleet.releases());
    cancel.cancel();

    let report = run.await??;
    print!("{report}");
    assert!(fleet.releases().values().all(|r| r.as_str() == "v1"));
    fleet.check(&report, 2).assert_ok();
    Ok(())
}
