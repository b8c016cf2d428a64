//! The multi-region commands: `deploy` in waves, `plan` of every region,
//! `status` per region and `rollback --all`. Each region is acted on as a
//! file of one fleet, with its own lock, journal and history under
//! `<state_dir>/<app>/regions/<region>`; the waves, gates and failure modes
//! are the library's (`deploykit::regions`).

use std::collections::BTreeMap;

use async_trait::async_trait;
use deploykit::regions::{
    self as lib, Hold, RegionEvent, RegionEvents, RegionPlan, RegionRunner, RegionsOutcome, RegionsPlan,
    RegionsReport,
};
use serde::{Deserialize, Serialize};

use super::*;

/// `deploykit rollback`'s options.
#[derive(Debug, clap::Args)]
pub(crate) struct RollbackArgs {
    /// In a file with [[regions]]: roll back every region's last
    /// deployment, the last wave first.
    #[arg(long)]
    pub(crate) all: bool,
    /// Take over instances marked by a deployment of another state
    /// directory that is no longer running (never one that runs), as
    /// `deploy --take-over` does.
    #[arg(long)]
    pub(crate) take_over: bool,
}

/// `deploykit rollback [--all] [--take-over]`.
pub(crate) fn rollback_cmd(ctx: Ctx, args: RollbackArgs) -> anyhow::Result<u8> {
    if !args.all {
        return super::rollback_with(ctx, args.take_over);
    }
    if !ctx.cfg.is_multi_region() || ctx.region.is_some() {
        let why = if ctx.region.is_some() {
            "rolls back every region; drop --region, or drop --all to roll back that region only"
        } else {
            "is for a file with [[regions]]; `deploykit rollback` rolls back this fleet"
        };
        return Err(deploykit::Error::invalid("--all", why).into());
    }
    rollback_regions(ctx, &[], args.take_over)
}

/// Rolls back the last deployment of each of `only` (every region when
/// empty), the last wave first, under the file's lock: `rollback --all`,
/// and `watch` undoing a deployment whose gate failed; `take_over` as for
/// `rollback --take-over`.
pub(crate) fn rollback_regions(ctx: Ctx, only: &[String], take_over: bool) -> anyhow::Result<u8> {
    let waves = waves(&ctx, only)?;
    let purpose = match only {
        [] => "rollback --all".to_string(),
        some => format!("rollback of regions {}", some.join(", ")),
    };
    runtime()?.block_on(async move {
        let _top = match lock(&ctx, &purpose).await? {
            Ok(l) => l,
            Err(code) => return Ok(code),
        };
        let mut codes = Vec::new();
        // The reverse of the deployment's order: the last wave first.
        for region in waves.iter().rev().flat_map(|w| w.iter().rev()) {
            let rctx = region_ctx(&ctx, region)?;
            if rctx.backend.latest().await?.is_none() {
                ctx.say(format!("region {region}: nothing to roll back"));
                continue;
            }
            ctx.say(format!("region {region}: rolling back"));
            codes.push(super::rollback_in(&rctx, take_over).await?);
        }
        Ok(worst(&codes))
    })
}

/// The most severe of several exit codes: an unknown state, then a held
/// lock, then bad input, then a failure.
fn worst(codes: &[u8]) -> u8 {
    [
        exit::UNKNOWN_STATE,
        exit::LOCKED,
        exit::BAD_INPUT,
        exit::FAILED_ROLLED_BACK,
    ]
    .into_iter()
    .find(|c| codes.contains(c))
    .unwrap_or(exit::SUCCESS)
}

fn names(ctx: &Ctx) -> Vec<RegionName> {
    ctx.cfg.regions.iter().map(|r| r.name.clone()).collect()
}

fn region_ctx(ctx: &Ctx, name: &RegionName) -> anyhow::Result<Ctx> {
    ctx.for_region(ctx.cfg.region(name.as_str())?)
}

/// The waves to act on: the rollout's, or only the `--regions` named.
fn waves(ctx: &Ctx, only: &[String]) -> anyhow::Result<Vec<Vec<RegionName>>> {
    let waves = ctx.cfg.rollout.waves_for(&names(ctx))?;
    if only.is_empty() {
        return Ok(waves);
    }
    let subset = only
        .iter()
        .map(|r| RegionName::new(r.trim()).map_err(|e| rename(e, "--regions")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(lib::select(waves, &subset).map_err(|e| rename(e, "--regions"))?)
}

/// Every region's plan of `release`, as a value (touches nothing).
async fn plan_regions(
    regions: &BTreeMap<RegionName, Ctx>,
    waves: &[Vec<RegionName>],
    kind: Option<StrategyKind>,
    rollout: &lib::Rollout,
    release: &ReleaseId,
) -> anyhow::Result<RegionsPlan> {
    let mut plans = BTreeMap::new();
    for r in waves.iter().flatten() {
        let ctx = &regions[r];
        let kind = kind.unwrap_or(ctx.cfg.raw.strategy.kind);
        let plan = dry_plan(ctx, kind, release)
            .await
            .with_context(|| format!("planning region {r}"))?;
        plans.insert(r.clone(), plan);
    }
    Ok(RegionsPlan::build(rollout, release, waves, |r| {
        Ok(plans[r].clone())
    })?)
}

/// `deploykit plan` of a multi-region file: the waves, then each region's
/// plan.
pub(super) fn plan(ctx: Ctx, args: PlanArgs) -> anyhow::Result<u8> {
    for r in &ctx.cfg.regions {
        if let Some(k) = args.strategy {
            r.cfg.check_strategy(k)?;
        }
        warn_config(&ctx.g, &r.cfg, args.strategy.unwrap_or(r.cfg.raw.strategy.kind));
    }
    let release = ReleaseId::new(&args.release).map_err(|e| rename(e, "release"))?;
    let waves = waves(&ctx, &[])?;
    let regions = contexts(&ctx, &waves)?;
    runtime()?.block_on(async move {
        let plan = plan_regions(&regions, &waves, args.strategy, &ctx.cfg.rollout, &release).await?;
        let p = plan.projected_duration();
        if ctx.g.json {
            outln!(
                "{}",
                serde_json::json!({
                    "regions_plan": plan,
                    "projected_duration_ms": {
                        "min": u64::try_from(p.min.as_millis()).unwrap_or(u64::MAX),
                        "max": u64::try_from(p.max.as_millis()).unwrap_or(u64::MAX),
                    },
                })
            );
        } else {
            out!("{plan}");
            for r in plan.regions() {
                outln!("");
                outln!("region {}:", r.region);
                out!("{}", r.plan);
            }
        }
        Ok(exit::SUCCESS)
    })
}

fn contexts(ctx: &Ctx, waves: &[Vec<RegionName>]) -> anyhow::Result<BTreeMap<RegionName, Ctx>> {
    waves
        .iter()
        .flatten()
        .map(|r| Ok((r.clone(), region_ctx(ctx, r)?)))
        .collect()
}

/// The record of the last multi-region run, beside the regions' own
/// journals: what `status` shows of it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RolloutRecord {
    /// The release.
    pub(crate) release: String,
    /// The waves, as planned.
    pub(crate) waves: Vec<Vec<String>>,
    /// `in_progress`, or the outcome.
    pub(crate) outcome: String,
    /// Why it did not succeed.
    pub(crate) reason: Option<String>,
    /// Each region's state at the end, `region: state`.
    pub(crate) regions: BTreeMap<String, String>,
}

fn record_path(ctx: &Ctx) -> PathBuf {
    ctx.state.root().join("rollout.json")
}

/// Replaces the record atomically, as every state file.
fn write_record(ctx: &Ctx, record: &RolloutRecord) -> anyhow::Result<()> {
    let path = record_path(ctx);
    deploykit::state::write_atomic(&path, &serde_json::to_vec_pretty(record)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// The record of the last multi-region run, when there is one.
pub(crate) fn read_record(ctx: &Ctx) -> Option<RolloutRecord> {
    serde_json::from_slice(&std::fs::read(record_path(ctx)).ok()?).ok()
}

/// Prints the engine's events: a line each, or a JSON line each.
struct Printer {
    json: bool,
    quiet: bool,
}

impl RegionEvents for Printer {
    fn emit(&self, e: &RegionEvent) {
        if self.json {
            if let Ok(line) = serde_json::to_string(e) {
                outln!("{line}");
            }
        } else if !self.quiet {
            outln!("{e}");
        }
    }
}

/// Each region deployed as `deploykit --region R deploy` would: its own
/// lock, journal, notifications and marker.
struct CliRegions {
    regions: BTreeMap<RegionName, Ctx>,
    kind: Option<StrategyKind>,
    release: ReleaseId,
    commit: Option<SourceCommit>,
    take_over: bool,
}

/// A CLI error as the library's: typed when it is one, else the refusal
/// with its text (this is the edge where the CLI's errors meet the engine).
fn lib_error(e: anyhow::Error) -> deploykit::Error {
    match e.downcast::<deploykit::Error>() {
        Ok(e) => e,
        Err(e) => deploykit::Error::Refused(crate::error_text(&e)),
    }
}

impl CliRegions {
    fn ctx(&self, r: &RegionName) -> deploykit::Result<&Ctx> {
        self.regions
            .get(r)
            .ok_or_else(|| deploykit::Error::invalid("region", format!("{r} is not in this run")))
    }

    async fn deploy_in(&self, ctx: &Ctx, region: &RegionName) -> anyhow::Result<Option<Report>> {
        let purpose = format!("deploy {} (region {region})", self.release);
        let lock = match lock(ctx, &purpose).await? {
            Ok(l) => l,
            Err(_) => return Ok(None),
        };
        let claimer = Claimer {
            lock: &lock,
            take_over: self.take_over,
        };
        ctx.take_report();
        let kind = self.kind.unwrap_or(ctx.cfg.raw.strategy.kind);
        let ran = run_deploy(
            ctx,
            RunKind::Deploy,
            Start::Fresh(kind, self.commit.clone()),
            self.release.clone(),
            &claimer,
        )
        .await;
        lock.release().await;
        ran?;
        Ok(ctx.take_report())
    }
}

#[async_trait]
impl RegionRunner for CliRegions {
    async fn deploy(&self, region: &RegionPlan, cancel: CancellationToken) -> deploykit::Result<Report> {
        let ctx = self.ctx(&region.region)?;
        *ctx.cancel.lock().unwrap_or_else(|p| p.into_inner()) = Some(cancel);
        let result = self.deploy_in(ctx, &region.region).await;
        *ctx.cancel.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Judged from the report of the run just made, never from the
        // region's older journals.
        result.map_err(lib_error)?.ok_or_else(|| {
            deploykit::Error::Refused(format!(
                "the deployment of region {} did not start (the reason is printed above)",
                region.region
            ))
        })
    }

    async fn check(&self, region: &RegionName) -> deploykit::Result<Hold> {
        let ctx = self.ctx(region)?;
        let fleet =
            wire::fleet(&ctx.cfg, &ctx.state, ctx.backend.live_store(None), None).map_err(lib_error)?;
        Ok(lib::probe(&fleet.executor).await)
    }

    async fn rollback(&self, region: &RegionPlan) -> deploykit::Result<Report> {
        let ctx = self.ctx(&region.region)?;
        ctx.take_report();
        let code = super::rollback_in(ctx, false).await.map_err(lib_error)?;
        ctx.take_report().ok_or_else(|| {
            deploykit::Error::Refused(format!(
                "the rollback of region {} did not run (exit code {code}; the reason is printed above)",
                region.region
            ))
        })
    }
}

/// `deploykit deploy RELEASE` of a multi-region file.
/// With `args.once_per_commit` (`watch`), the regions whose journals hold a
/// deployment of the commit already are left out, under the file's lock;
/// when that is every region, nothing runs and `earlier` names a run.
pub(super) fn deploy(ctx: Ctx, args: DeployArgs, earlier: &mut Option<EarlierRun>) -> anyhow::Result<u8> {
    if args.resume {
        return Err(deploykit::Error::invalid(
            "--resume",
            "resumes one region: run `deploykit --region NAME deploy --resume` for the region `deploykit status` shows interrupted",
        )
        .into());
    }
    if args.metrics_listen.is_some() {
        return Err(deploykit::Error::invalid(
            "--metrics-listen",
            "serves the journals of one fleet: use it with `deploykit --region NAME deploy`",
        )
        .into());
    }
    let release =
        ReleaseId::new(args.release.as_deref().unwrap_or_default()).map_err(|e| rename(e, "release"))?;
    let commit = args
        .commit
        .as_deref()
        .map(|c| SourceCommit::new(c, args.commit_time))
        .transpose()?;
    let waves = waves(&ctx, &args.regions)?;
    let regions = contexts(&ctx, &waves)?;
    for (name, rctx) in &regions {
        if let Some(k) = args.strategy {
            rctx.cfg
                .check_strategy(k)
                .with_context(|| format!("region {name}"))?;
        }
        // A region held by a deployment of its own (`--region R deploy`)
        // is running, not interrupted, and would fail the rollout when its
        // turn came: refuse before any region starts, as a held file lock
        // is (with `--lock-wait`, each region queues for its lock instead).
        if let Some(h) = rctx.state.holder()? {
            if ctx.g.lock_wait.is_none() {
                eprintln!(
                    "deploykit: error: region {name}: another deployment holds its lock: {h}; wait for it \
                     (`--lock-wait 10m` queues behind it), or stop it (`deploykit --region {name} abort`)"
                );
                return Ok(exit::LOCKED);
            }
            wire::check_release(&rctx.cfg, &release)?;
            continue;
        }
        if let Some(j) = rctx.state.latest()?.filter(|j| !j.is_finished()) {
            eprintln!(
                "deploykit: error: region {name}: the {} {} of {} was interrupted; run `deploykit --region {name} deploy --resume` to finish it or `deploykit --region {name} rollback` to undo it first",
                j.header.strategy, j.header.deployment, j.header.release
            );
            return Ok(exit::UNKNOWN_STATE);
        }
        wire::check_release(&rctx.cfg, &release)?;
        warn_config(
            &ctx.g,
            &rctx.cfg,
            args.strategy.unwrap_or(rctx.cfg.raw.strategy.kind),
        );
    }
    runtime()?.block_on(async move {
        let _top = match lock(&ctx, &format!("deploy {release} (regions)")).await? {
            Ok(l) => l,
            Err(code) => return Ok(code),
        };
        let mut waves = waves;
        if let Some(c) = commit.as_ref().filter(|_| args.once_per_commit) {
            let mut done = Vec::new();
            for wave in &mut waves {
                let mut kept = Vec::new();
                for r in wave.drain(..) {
                    match super::earlier_run(&regions[&r], &c.sha).await? {
                        Some(e) => done.push((r, e)),
                        None => kept.push(r),
                    }
                }
                *wave = kept;
            }
            waves.retain(|w| !w.is_empty());
            if waves.is_empty() {
                if let Some((_, e)) = done.into_iter().next() {
                    *earlier = Some(e);
                    return Ok(exit::SUCCESS);
                }
            } else if !done.is_empty() {
                let names: Vec<String> = done.iter().map(|(r, _)| r.to_string()).collect();
                ctx.say(format!(
                    "{} deployed this commit already: left out",
                    names.join(", ")
                ));
            }
        }
        let plan = plan_regions(&regions, &waves, args.strategy, &ctx.cfg.rollout, &release).await?;
        let mut record = RolloutRecord {
            release: release.to_string(),
            waves: waves
                .iter()
                .map(|w| w.iter().map(|r| r.to_string()).collect())
                .collect(),
            outcome: "in_progress".into(),
            reason: None,
            regions: BTreeMap::new(),
        };
        write_record(&ctx, &record)?;
        let runner = CliRegions {
            regions,
            kind: args.strategy,
            release,
            commit,
            take_over: args.take_over,
        };
        let cancel = CancellationToken::new();
        let on_signal = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    cancel.cancel();
                }
            })
        };
        let printer = Printer {
            json: ctx.g.json,
            quiet: ctx.g.quiet,
        };
        let report = lib::run(&plan, &runner, &printer, cancel).await;
        on_signal.abort();
        record.outcome = report.outcome.to_string();
        record.reason = report.reason.clone();
        record.regions = report
            .regions
            .iter()
            .map(|r| (r.region.to_string(), r.state.to_string()))
            .collect();
        write_record(&ctx, &record)?;
        if ctx.g.json {
            outln!("{}", serde_json::json!({ "regions_report": summary(&report) }));
        } else {
            out!("{report}");
        }
        Ok(match report.outcome {
            RegionsOutcome::Succeeded => exit::SUCCESS,
            RegionsOutcome::Failed => exit::FAILED_ROLLED_BACK,
            RegionsOutcome::Unknown => exit::UNKNOWN_STATE,
        })
    })
}

/// The report without each region's per-instance reports (those are in
/// the regions' own journals and event streams).
fn summary(report: &RegionsReport) -> serde_json::Value {
    serde_json::json!({
        "release": report.release,
        "outcome": report.outcome,
        "reason": report.reason,
        "duration_ms": u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
        "regions": report.regions.iter().map(|r| serde_json::json!({
            "region": r.region,
            "wave": r.wave,
            "state": r.state,
            "reason": r.reason,
            "deployment": r.deployment.as_ref().map(|d| &d.deployment),
            "deployment_outcome": r.deployment.as_ref().map(|d| d.outcome),
            "rollback_outcome": r.rollback.as_ref().map(|d| d.outcome),
        })).collect::<Vec<_>>(),
    })
}

/// `deploykit status` of a multi-region file: the last multi-region run,
/// then each region as `--region` shows it.
pub(super) fn status(ctx: Ctx) -> anyhow::Result<u8> {
    let waves = waves(&ctx, &[])?;
    let regions = contexts(&ctx, &waves)?;
    runtime()?.block_on(async move {
        let record = read_record(&ctx);
        let mut out = Vec::new();
        let mut codes = Vec::new();
        for (w, wave) in waves.iter().enumerate() {
            for r in wave {
                let (status, code) = status_of(&regions[r]).await?;
                codes.push(code);
                out.push((w + 1, r, status));
            }
        }
        if ctx.g.json {
            let regions: Vec<serde_json::Value> = out
                .iter()
                .map(|(w, r, s)| serde_json::json!({"region": r, "wave": w, "status": s}))
                .collect();
            outln!(
                "{}",
                serde_json::json!({"app": ctx.cfg.raw.app, "last_rollout": record, "regions": regions})
            );
        } else {
            outln!("app: {} ({} regions)", ctx.cfg.raw.app, out.len());
            match &record {
                Some(r) => {
                    outln!(
                        "last multi-region run: {}: {}",
                        r.release,
                        r.outcome.replace('_', " ")
                    );
                    if let Some(why) = &r.reason {
                        outln!("  {why}");
                    }
                }
                None => outln!("no multi-region run recorded yet"),
            }
            for (w, r, s) in &out {
                outln!("");
                outln!("== region {r} (wave {w}) ==");
                print_status(s);
            }
        }
        Ok(worst(&codes))
    })
}
