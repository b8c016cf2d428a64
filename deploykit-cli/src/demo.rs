//! `deploykit demo`: a full deployment on the testkit's simulated fleet.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use deploykit::{
    CountOrPercent, EventSink, Executor, HealthCheck, InstanceId, Recreate, ReleaseId, Rolling, Strategy,
};
use deploykit_testkit::{FakeFleet, Op};

use crate::output::{exit_code, Human, JsonLines};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum DemoStrategy {
    /// Batches, drained and replaced concurrently, with a failure budget.
    Rolling,
    /// Stop all, install, start all (downtime).
    Recreate,
}

/// Run a full deployment on a simulated fleet (scaled-down real time: it
/// finishes in seconds).
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// The strategy.
    #[arg(long, value_enum, default_value = "rolling")]
    strategy: DemoStrategy,
    /// How many simulated instances.
    #[arg(long, default_value_t = 8)]
    instances: usize,
    /// Instances replaced at once (rolling): a count or a percent like 25%.
    #[arg(long, default_value = "2")]
    batch_size: String,
    /// Failures tolerated before aborting (rolling): a count or a percent.
    /// The demo defaults to 0 so a failure shows a full rollback.
    #[arg(long, default_value = "0")]
    max_failures: String,
    /// Make the new release unhealthy on this instance (e.g. i-3), to see
    /// the failure and the rollback.
    #[arg(long, value_name = "ID")]
    fail_instance: Vec<String>,
    /// The release to deploy (the fleet runs v1).
    #[arg(long, default_value = "v2")]
    release: String,
    /// Print the plan and stop (dry run).
    #[arg(long)]
    plan: bool,
}

pub(crate) fn run(args: DemoArgs, json: bool) -> anyhow::Result<u8> {
    if args.instances == 0 || args.instances > 10_000 {
        return Err(deploykit::Error::invalid("--instances", "must be from 1 to 10000").into());
    }
    let release = ReleaseId::new(&args.release)?;
    let mut fleet = FakeFleet::new(args.instances)
        .latency(Op::Install, Duration::from_millis(400))
        .latency(Op::Start, Duration::from_millis(200))
        .latency(Op::Stop, Duration::from_millis(150))
        .latency(Op::Health, Duration::from_millis(50));
    for id in &args.fail_instance {
        let id = InstanceId::new(id)?;
        let n: usize = id
            .as_str()
            .strip_prefix("i-")
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=args.instances).contains(n))
            .ok_or_else(|| {
                deploykit::Error::invalid(
                    "--fail-instance",
                    format!("{id} is not in the demo fleet; use i-1 to i-{}", args.instances),
                )
            })?;
        fleet = fleet.fail_health(&format!("i-{n}"));
    }
    let health = HealthCheck {
        retries: 3,
        interval: Duration::from_millis(500),
    };
    let strategy: Box<dyn Strategy> = match args.strategy {
        DemoStrategy::Rolling => Box::new(Rolling {
            batch_size: CountOrPercent::parse("--batch-size", &args.batch_size)?,
            max_failures: CountOrPercent::parse("--max-failures", &args.max_failures)?,
            health,
            drain_timeout: Duration::from_secs(2),
            stabilisation: Some(Duration::from_millis(500)),
        }),
        DemoStrategy::Recreate => Box::new(Recreate {
            health,
            drain_timeout: Duration::from_secs(2),
        }),
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let human = Arc::new(Human::new(args.instances as u64));
        let sink: Arc<dyn EventSink> = if json { Arc::new(JsonLines) } else { human.clone() };
        let exec = Executor::builder()
            .instances(fleet.instances())
            .load_balancer(Arc::new(fleet.load_balancer()))
            .events(sink)
            .drain_poll(Duration::from_millis(200))
            .build()?;
        let plan = strategy.plan(&exec.snapshot().await?, &release)?;
        if args.plan {
            out!("{plan}");
            return Ok(crate::exit::SUCCESS);
        }
        if !json {
            outln!(
                "deploykit demo: {} simulated instances on v1 behind a simulated load balancer",
                args.instances
            );
        }
        let cancel = exec.cancel_token();
        let ctrl_c = tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("interrupted: cancelling and rolling back");
                cancel.cancel();
            }
        });
        let report = exec.run(&plan, deploykit::RunOptions::default()).await?;
        ctrl_c.abort();
        human.finish();
        if !json {
            out!("{report}");
            let check = fleet.check(&report, plan.rollback_batch);
            outln!(
                "invariants: {} (peak out of rotation: {})",
                if check.is_ok() { "all held" } else { "VIOLATED" },
                check.peak_out_of_rotation
            );
            for v in &check.violations {
                outln!("  - {v}");
            }
        }
        Ok(exit_code(&report))
    })
}
