//! [`ExecutorRegions`]: a [`RegionRunner`] with one [`Executor`] per
//! region, for programs that embed the library and for tests on fakes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::engine::{Hold, RegionRunner};
use super::{RegionName, RegionPlan, RegionsPlan, Rollout};
use crate::error::{Error, Result};
use crate::executor::{Executor, RunOptions};
use crate::names::ReleaseId;
use crate::plan::FleetSnapshot;
use crate::report::Report;
use crate::strategy::{CountOrPercent, Rolling};
use crate::traits::{probe_once, Strategy};

/// One [`Executor`] per region: deploys a region's plan on its executor,
/// probes its instances, and returns them with a rolling plan to the
/// releases the region's plan recorded as their previous ones.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use deploykit::regions::{self, ExecutorRegions, RegionName, RegionsOutcome, Rollout};
/// use deploykit::{Executor, ReleaseId, Rolling};
/// use deploykit_testkit::FakeFleet;
///
/// let mut regions = ExecutorRegions::new();
/// let mut fleets = Vec::new();
/// for name in ["eu-1", "eu-2", "us-1"] {
///     let fleet = FakeFleet::new(3);
///     let exec = Executor::builder()
///         .instances(fleet.instances())
///         .load_balancer(Arc::new(fleet.load_balancer()))
///         .build()?;
///     regions = regions.with(RegionName::new(name)?, exec);
///     fleets.push(fleet);
/// }
/// let rollout = Rollout { waves: vec![vec!["eu-*".into()], vec!["us-*".into()]], ..Rollout::default() };
/// let plan = regions.plan(&rollout, &ReleaseId::new("v2")?, None, |_| Box::new(Rolling::default())).await?;
/// let report = regions::run(&plan, &regions, &(), Default::default()).await;
/// assert_eq!(report.outcome, RegionsOutcome::Succeeded);
/// assert!(fleets.iter().all(|f| f.releases().values().all(|r| r.as_str() == "v2")));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct ExecutorRegions {
    regions: BTreeMap<RegionName, Executor>,
    order: Vec<RegionName>,
}

impl ExecutorRegions {
    /// No regions yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `region`, deployed by `executor` (a region added twice keeps
    /// the last executor, in its first place).
    pub fn with(mut self, region: RegionName, executor: Executor) -> Self {
        if self.regions.insert(region.clone(), executor).is_none() {
            self.order.push(region);
        }
        self
    }

    /// The regions, in the order they were added.
    pub fn names(&self) -> &[RegionName] {
        &self.order
    }

    /// The executor of `region`.
    pub fn executor(&self, region: &RegionName) -> Option<&Executor> {
        self.regions.get(region)
    }

    fn get(&self, region: &RegionName) -> Result<&Executor> {
        self.regions
            .get(region)
            .ok_or_else(|| Error::invalid("region", format!("{region} has no executor")))
    }

    /// The plan of `release` for `rollout`'s waves over these regions (or
    /// `only` those of them), each region planned by `strategy(region)` on
    /// a fresh snapshot of its fleet.
    ///
    /// # Errors
    /// As [`Rollout::waves_for`], [`select`](super::select) and
    /// [`RegionsPlan::build`]; a region's snapshot or plan error.
    pub async fn plan(
        &self,
        rollout: &Rollout,
        release: &ReleaseId,
        only: Option<&[RegionName]>,
        strategy: impl Fn(&RegionName) -> Box<dyn Strategy>,
    ) -> Result<RegionsPlan> {
        let mut waves = rollout.waves_for(&self.order)?;
        if let Some(only) = only {
            waves = super::select(waves, only)?;
        }
        let mut snapshots: BTreeMap<&RegionName, FleetSnapshot> = BTreeMap::new();
        for r in waves.iter().flatten() {
            snapshots.insert(r, self.get(r)?.snapshot().await?);
        }
        RegionsPlan::build(rollout, release, &waves, |r| {
            strategy(r).plan(&snapshots[r], release)
        })
    }
}

/// One health probe of every instance of `executor`'s fleet at once, each
/// bounded by its health-probe timeout: [`Hold::Broken`] naming the first
/// instance (in fleet order) that is unhealthy, unreachable or silent.
/// Read-only and cancel-safe.
pub async fn probe(executor: &Executor) -> Hold {
    let bound = executor.timeouts().health_probe;
    let probes = futures::future::join_all(executor.instances().iter().map(|i| async move {
        let id = i.backend().id.clone();
        probe_once(i.as_ref(), bound)
            .await
            .err()
            .map(|why| format!("{id}: {why}"))
    }))
    .await;
    match probes.into_iter().flatten().next() {
        Some(why) => Hold::Broken(why),
        None => Hold::Holds,
    }
}

#[async_trait]
impl RegionRunner for ExecutorRegions {
    async fn deploy(&self, region: &RegionPlan, cancel: CancellationToken) -> Result<Report> {
        let exec = self.get(&region.region)?;
        let run = exec.run(&region.plan, RunOptions::default());
        tokio::pin!(run);
        tokio::select! {
            report = &mut run => report,
            () = cancel.cancelled() => {
                // The executor rolls back on its own token; the run goes on
                // to its report.
                exec.cancel_token().cancel();
                run.await
            }
        }
    }

    async fn check(&self, region: &RegionName) -> Result<Hold> {
        Ok(probe(self.get(region)?).await)
    }

    async fn rollback(&self, region: &RegionPlan) -> Result<Report> {
        let exec = self.get(&region.region)?;
        let snapshot = exec.snapshot().await?;
        let plan = &region.plan;
        let rolling = Rolling {
            batch_size: CountOrPercent::Count(plan.rollback_batch.max(1)),
            health: plan.health,
            drain_timeout: plan.drain_timeout,
            stabilisation: Some(Duration::ZERO),
            ..Rolling::default()
        };
        let back = crate::recovery::return_to(&snapshot, &plan.previous, &BTreeSet::new(), &rolling, None)?;
        exec.run(&back, RunOptions::recovery()).await
    }
}
