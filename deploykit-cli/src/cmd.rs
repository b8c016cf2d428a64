//! The fleet commands: deploy (and --resume), plan, status, rollback,
//! promote, abort, history, validate. Each wires library objects together;
//! the outcome becomes an exit code in `main`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use deploykit::bluegreen_state::{peek, reconcile, Reconciled};
use deploykit::flags::FlagStore;
use deploykit::recovery::{self, PromotionRecord, Recorded};
use deploykit::regions::RegionName;
use deploykit::state::{
    ControlCommand, HeldLock, HistoryOutcome, JournalHeader, JournalOutcome, JournalSummary, JournalWriter,
    RunKind, SourceCommit, StateBackend, StateDir, StateLock,
};
use deploykit::{
    run_id, Event, EventLog, EventSink, Executor, Fanout, Group, OutcomeKind, ReleaseId, Report, RunOptions,
    StrategyKind as LibKind,
};
use tokio_util::sync::CancellationToken;

use crate::config::{self, Loaded, NotifyOn, StrategyKind};
use crate::exit;
use crate::notify::{Notice, Notifier};
use crate::output::{self, Human, JsonLines};
use crate::wire;

mod drill;
mod regions;

pub(crate) use drill::{drill, DrillArgs};
pub(crate) use regions::{read_record, rollback_cmd, rollback_regions, RollbackArgs};

/// Options every fleet command takes.
#[derive(Debug, Clone, Args)]
pub(crate) struct Global {
    /// The configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "DEPLOYKIT_CONFIG",
        default_value = "deploykit.toml"
    )]
    pub(crate) config: PathBuf,
    /// Print machine-readable JSON (events as JSON lines for deploy and
    /// rollback; see docs/cli.md).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// More log output (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Only errors and the final result.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
    /// When another deployment holds the lock, wait for it up to this long
    /// (`10m`), naming the holder, instead of failing at once (CI runners
    /// queue this way).
    #[arg(long, global = true, value_name = "DURATION", value_parser = lock_wait)]
    pub(crate) lock_wait: Option<Duration>,
    /// In a file with [[regions]]: act on this region only, as on a file of
    /// one fleet (its own lock, journal and history).
    #[arg(long, global = true, value_name = "NAME")]
    pub(crate) region: Option<String>,
}

fn lock_wait(s: &str) -> Result<Duration, String> {
    let d = deploykit::parse_duration("--lock-wait", s).map_err(|e| e.to_string())?;
    if d > Duration::from_secs(24 * 3600) {
        return Err("use at most 24h".into());
    }
    Ok(d)
}

/// `deploykit deploy`.
#[derive(Debug, Args)]
pub(crate) struct DeployArgs {
    /// The release to deploy (a directory name under `releases`).
    #[arg(required_unless_present = "resume")]
    release: Option<String>,
    /// Use this strategy instead of the configured one.
    #[arg(long, value_enum)]
    strategy: Option<StrategyKind>,
    /// Continue the interrupted deployment (same release and strategy).
    #[arg(long, conflicts_with_all = ["release", "strategy"])]
    resume: bool,
    /// Take over instances marked by a deployment of another state
    /// directory that is no longer running (never one that runs).
    #[arg(long)]
    take_over: bool,
    /// The source commit the release was built from (hexadecimal id),
    /// recorded in the journal and the history.
    #[arg(long, conflicts_with = "resume")]
    commit: Option<String>,
    /// When that commit was made, seconds since the Unix epoch (`git log
    /// -1 --format=%ct`): commit time to live time is the lead time.
    #[arg(long, requires = "commit", allow_hyphen_values = true)]
    commit_time: Option<i64>,
    /// Serve the Prometheus exposition of the journals at
    /// http://ADDR/metrics while the deployment runs (docs/metrics.md).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// In a file with [[regions]]: deploy only these regions
    /// (comma-separated), in the rollout's order.
    #[arg(long, value_delimiter = ',', value_name = "NAMES", conflicts_with = "resume")]
    pub(crate) regions: Vec<String>,
    /// Set by `watch` only: once the lock is taken, a journal of an earlier
    /// deployment of the same commit (from any machine sharing the state)
    /// means this one does not run.
    #[arg(skip)]
    once_per_commit: bool,
    /// Run `deploykit drill` of the current release first, and deploy only
    /// if it passed (exit 5 otherwise, the deployment untouched).
    #[arg(long, conflicts_with_all = ["resume", "regions"])]
    drill: bool,
}

impl DeployArgs {
    /// The arguments of a deployment of `release` built from `commit`
    /// (what `watch` runs), to `regions` of a multi-region file (every
    /// region when empty); with `once`, it does not run when the shared
    /// state already holds a deployment of `commit`.
    pub(crate) fn of_commit(
        release: String,
        strategy: Option<StrategyKind>,
        commit: &SourceCommit,
        regions: Vec<String>,
        once: bool,
    ) -> Self {
        Self {
            release: Some(release),
            strategy,
            resume: false,
            take_over: false,
            commit: Some(commit.sha.clone()),
            commit_time: commit.time_s,
            metrics_listen: None,
            regions,
            once_per_commit: once,
            drill: false,
        }
    }
}

/// An earlier deployment of the commit a `watch` deployment was asked for,
/// found in the shared journals once the lock was taken.
#[derive(Debug, Clone)]
pub(crate) struct EarlierRun {
    /// Its run id.
    pub(crate) deployment: String,
    /// The machine that ran it.
    pub(crate) host: String,
    /// How it ended (or that it is still unfinished).
    pub(crate) outcome: HistoryOutcome,
    /// The rollback that undid it later, if one did (a failed gate's).
    pub(crate) rolled_back_by: Option<String>,
}

impl std::fmt::Display for EarlierRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {} ({}", self.deployment, self.host, self.outcome)?;
        if let Some(r) = &self.rolled_back_by {
            write!(f, ", then rolled back by {r}")?;
        }
        write!(f, ")")
    }
}

/// What [`deploy_commit`] did.
#[derive(Debug)]
pub(crate) enum CommitDeploy {
    /// It ran (or was refused) with this exit code.
    Ran(u8),
    /// It did not run: the commit was deployed before.
    Earlier(EarlierRun),
}

/// `deploy` for `watch`: as [`deploy`], but tells apart a deployment that
/// did not run because the commit was deployed before (see
/// [`DeployArgs::of_commit`]).
pub(crate) fn deploy_commit(ctx: Ctx, args: DeployArgs) -> anyhow::Result<CommitDeploy> {
    let mut earlier = None;
    let code = deploy_inner(ctx, args, &mut earlier)?;
    Ok(match earlier {
        Some(e) => CommitDeploy::Earlier(e),
        None => CommitDeploy::Ran(code),
    })
}

/// The newest deployment journal of `sha`, read under the lock so that two
/// watchers sharing the state cannot both decide it is new.
async fn earlier_run(ctx: &Ctx, sha: &str) -> anyhow::Result<Option<EarlierRun>> {
    let scan = ctx.backend.scan_journals().await?;
    let Some(j) =
        scan.journals.iter().rev().find(|j| {
            j.header.kind == RunKind::Deploy && j.header.commit.as_ref().is_some_and(|c| c.sha == sha)
        })
    else {
        return Ok(None);
    };
    let rolled_back_by = scan
        .journals
        .iter()
        .find(|r| {
            r.header.kind == RunKind::Rollback && r.header.acts_on.as_deref() == Some(&j.header.deployment)
        })
        .map(|r| r.header.deployment.clone());
    Ok(Some(EarlierRun {
        deployment: j.header.deployment.clone(),
        host: j.header.host.clone(),
        outcome: j.history_entry(None).outcome,
        rolled_back_by,
    }))
}

/// `deploykit plan`.
#[derive(Debug, Args)]
pub(crate) struct PlanArgs {
    /// The release to plan for.
    release: String,
    /// Plan with this strategy instead of the configured one.
    #[arg(long, value_enum)]
    strategy: Option<StrategyKind>,
}

/// The hidden test hook: abort the process right after the N-th journal
/// record is on disk (the header is record 1), as `kill -9` would.
const ABORT_AFTER: &str = "DEPLOYKIT_TEST_ABORT_AFTER_RECORD";

fn abort_after() -> Option<u64> {
    std::env::var(ABORT_AFTER).ok().and_then(|v| v.parse().ok())
}

/// Forwards to a sink set once the journal exists.
#[derive(Default)]
struct Relay(OnceLock<Arc<dyn EventSink>>);

#[async_trait::async_trait]
impl EventSink for Relay {
    fn emit(&self, e: &Event) {
        if let Some(s) = self.0.get() {
            s.emit(e);
        }
    }

    async fn durable(&self) -> deploykit::Result<()> {
        match self.0.get() {
            Some(s) => s.durable().await,
            None => Ok(()),
        }
    }
}

/// The journal, with the crash hook.
struct Journaled {
    journal: Arc<dyn JournalWriter>,
    abort_after: Option<u64>,
}

impl Journaled {
    fn check(&self) {
        if let Some(n) = self.abort_after {
            if self.journal.records() >= n {
                // Queued records are not written yet: write them first.
                let journal = self.journal.clone();
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
                    if let Ok(rt) = rt {
                        let _ = rt.block_on(journal.sync());
                    }
                })
                .join();
                std::process::abort();
            }
        }
    }
}

#[async_trait::async_trait]
impl EventSink for Journaled {
    fn emit(&self, e: &Event) {
        self.journal.emit(e);
        self.check();
    }

    async fn durable(&self) -> deploykit::Result<()> {
        self.journal.durable().await
    }
}

/// Aborts a helper task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What every fleet command starts from.
pub(crate) struct Ctx {
    pub(crate) g: Global,
    pub(crate) cfg: Loaded,
    /// This machine's state directory: simulated fleets, release pins, flag
    /// journal, and (with the local backend) the deployment state.
    pub(crate) state: StateDir,
    /// Where the lock, journals, live record and control channel live.
    pub(crate) backend: Arc<dyn StateBackend>,
    /// The region acted on, in a multi-region file.
    pub(crate) region: Option<RegionName>,
    /// The report of the last run concluded with this context, for the
    /// multi-region engine, which judges a region from its own run.
    last_report: Mutex<Option<Report>>,
    /// Cancels the run in progress, when the multi-region engine does.
    cancel: Mutex<Option<CancellationToken>>,
}

impl Ctx {
    /// A context on `state`, with the state backend `cfg` names: each
    /// region's context gets one of its own, on its own state directory.
    fn new(g: Global, cfg: Loaded, state: StateDir, region: Option<RegionName>) -> anyhow::Result<Self> {
        let backend = wire::state_backend(&cfg, &state)?;
        Ok(Self {
            g,
            cfg,
            state,
            backend,
            region,
            last_report: Mutex::new(None),
            cancel: Mutex::new(None),
        })
    }

    pub(crate) fn load(g: Global) -> anyhow::Result<Self> {
        let cfg = config::load(&g.config)?;
        // Created by the first lock: a refused or read-only command leaves
        // nothing behind.
        let state = StateDir::at(cfg.state_base(), &cfg.raw.app)?;
        let top = Self::new(g, cfg, state, None)?;
        match top.g.region.clone() {
            Some(r) => {
                let region = top.cfg.region(&r)?.clone();
                top.for_region(&region)
            }
            None => Ok(top),
        }
    }

    /// As [`load`](Self::load) for a command that only reads: the state
    /// directory is not created, so no write access is needed.
    pub(crate) fn load_read_only(g: Global) -> anyhow::Result<Self> {
        Self::load(g)
    }

    /// As [`load`](Self::load) for a command that acts on one fleet: a
    /// multi-region file needs `--region`.
    pub(crate) fn load_one(g: Global) -> anyhow::Result<Self> {
        let ctx = Self::load(g)?;
        if ctx.cfg.is_multi_region() && ctx.region.is_none() {
            return Err(config::ConfigError {
                file: ctx.cfg.path.clone(),
                at: None,
                message: format!(
                    "this file has [[regions]]: name the region to act on with --region (the regions are {})",
                    ctx.cfg.region_names().join(", ")
                ),
            }
            .into());
        }
        Ok(ctx)
    }

    /// The context of one region of this multi-region file: its fleet, and
    /// its own state directory `<state_dir>/<app>/regions/<region>`.
    pub(crate) fn for_region(&self, region: &config::Region) -> anyhow::Result<Self> {
        let base = self.cfg.state_base().join(&self.cfg.raw.app).join("regions");
        let state = StateDir::at(base, region.name.as_str()).expect("region names are valid state names");
        Self::new(
            self.g.clone(),
            region.cfg.clone(),
            state,
            Some(region.name.clone()),
        )
    }

    /// Takes the report the last concluded run left.
    fn take_report(&self) -> Option<Report> {
        self.last_report.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Cancels `exec`'s run when the multi-region engine cancels this
    /// region; the link ends when the returned guard is dropped.
    fn link_cancel(&self, exec: &Executor) -> Option<AbortOnDrop> {
        let token = self.cancel.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
        let run = exec.cancel_token();
        Some(AbortOnDrop(tokio::spawn(async move {
            token.cancelled().await;
            run.cancel();
        })))
    }

    fn notifier(&self) -> Notifier {
        Notifier::new(&self.cfg.raw.notifications)
    }

    fn output(&self) -> (Option<Arc<dyn EventSink>>, Option<Arc<Human>>) {
        if self.g.json {
            match &self.region {
                Some(r) => (Some(Arc::new(output::RegionJsonLines(r.to_string()))), None),
                None => (Some(Arc::new(JsonLines)), None),
            }
        } else if self.g.quiet {
            (None, None)
        } else {
            let mut h = Human::new(self.cfg.instances.len() as u64);
            if let Some(r) = &self.region {
                h = h.with_prefix(format!("{r}: "));
            }
            let h = Arc::new(h);
            (Some(h.clone() as Arc<dyn EventSink>), Some(h))
        }
    }

    fn say(&self, text: impl AsRef<str>) {
        if !self.g.json && !self.g.quiet {
            outln!("{}", text.as_ref());
        }
    }
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Takes the lock or explains who holds it (exit 4); with `--lock-wait`,
/// waits for it that long first, saying who holds it.
async fn lock(ctx: &Ctx, purpose: &str) -> anyhow::Result<Result<HeldLock, u8>> {
    let deadline = ctx.g.lock_wait.map(|w| tokio::time::Instant::now() + w);
    let mut announced: Option<deploykit::state::Holder> = None;
    loop {
        match ctx.backend.try_lock(purpose).await? {
            StateLock::Acquired(lock) => {
                if let Some(s) = lock.stale() {
                    eprintln!(
                        "deploykit: note: the previous holder of the lock ({s}) died without releasing it; \
                         its deployment was interrupted (see `deploykit status`)"
                    );
                }
                return Ok(Ok(lock));
            }
            StateLock::Held(h) if deadline.is_some_and(|d| tokio::time::Instant::now() < d) => {
                if announced.as_ref() != Some(&h) {
                    eprintln!(
                        "deploykit: waiting for the lock of {}, held by {h} (--lock-wait {})",
                        ctx.cfg.raw.app,
                        deploykit::duration_text::format(ctx.g.lock_wait.unwrap_or_default())
                    );
                    announced = Some(h);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            StateLock::Held(h) => return Ok(Err(refused(ctx, h))),
        }
    }
}

/// Explains who holds the lock; exit 4.
fn refused(ctx: &Ctx, h: deploykit::state::Holder) -> u8 {
    let alive = match h.is_alive() {
        Some(false) => " (that process is gone; the lock is held by a process it started, or the record is stale: check with `fuser`)",
        _ => "",
    };
    let waited = match ctx.g.lock_wait {
        Some(w) => format!(" (still, after waiting {})", deploykit::duration_text::format(w)),
        None => String::new(),
    };
    eprintln!(
        "deploykit: error: another deployment of {} holds the lock{waited}: {h}{alive}; wait for it \
         (`--lock-wait 10m` queues behind it), or stop it (`deploykit abort`)",
        ctx.cfg.raw.app
    );
    exit::LOCKED
}

/// Starts a journal and hooks it (and the output) into the relay.
async fn start_journal(
    ctx: &Ctx,
    lock: &HeldLock,
    relay: &Relay,
    header: JournalHeader,
    out: Option<Arc<dyn EventSink>>,
) -> anyhow::Result<Arc<dyn JournalWriter>> {
    let journal = ctx.backend.create_journal(lock, header).await?;
    let journaled = Arc::new(Journaled {
        journal: journal.clone(),
        abort_after: abort_after(),
    });
    journaled.check();
    let mut fan = Fanout::new().with(journaled);
    if let Some(o) = out {
        fan = fan.with(o);
    }
    let _ = relay.0.set(Arc::new(fan));
    Ok(journal)
}

/// A run refused before its first step (nothing touched) leaves no journal
/// behind: otherwise the next command would find an "interrupted"
/// deployment that never happened.
async fn unless_refused<T>(journal: &dyn JournalWriter, r: deploykit::Result<T>) -> anyhow::Result<T> {
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            if let Err(d) = journal.discard_unstarted().await {
                eprintln!("deploykit: warning: {d}");
            }
            Err(e.into())
        }
    }
}

fn notice(ctx: &Ctx, h: &JournalHeader, event: NotifyOn, report: Option<&Report>) -> Notice {
    Notice {
        event,
        app: ctx.cfg.raw.app.clone(),
        deployment: h.deployment.clone(),
        kind: match h.kind {
            RunKind::Deploy => "deployment",
            RunKind::Resume => "resumed deployment",
            RunKind::Rollback => "rollback",
        }
        .into(),
        strategy: h.strategy.to_string(),
        release: h.release.to_string(),
        outcome: report.map(|r| HistoryOutcome::from(r.outcome).to_string()),
        reason: report.and_then(|r| r.reason.clone()),
        duration_ms: report.map(|r| u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX)),
        started_at_ms: h.started_at_ms,
    }
}

fn end_event(kind: RunKind, outcome: OutcomeKind) -> NotifyOn {
    match (kind, outcome) {
        (RunKind::Rollback, OutcomeKind::Succeeded) => NotifyOn::Rollback,
        (_, OutcomeKind::Succeeded) => NotifyOn::Success,
        (_, OutcomeKind::RolledBack) => NotifyOn::Rollback,
        _ => NotifyOn::Failure,
    }
}

/// Records the outcome, notifies, prints, and returns the exit code.
async fn conclude(
    ctx: &Ctx,
    exec: &Executor,
    journal: &dyn JournalWriter,
    report: &Report,
    human: Option<&Human>,
) -> anyhow::Result<u8> {
    *ctx.last_report.lock().unwrap_or_else(|p| p.into_inner()) = Some(report.clone());
    let finished = journal
        .finish(JournalOutcome {
            outcome: report.outcome,
            reason: report.reason.clone(),
            duration_ms: u64::try_from(report.duration.as_millis()).unwrap_or(u64::MAX),
        })
        .await;
    if let Err(deploykit::Error::LockLost(why)) = &finished {
        if let Some(hm) = human {
            hm.finish();
        }
        return Ok(lock_lost(ctx, journal, why));
    }
    finished?;
    if journal.write_errors() > 0 {
        eprintln!(
            "deploykit: warning: {} journal record(s) could not be written to {}; after a crash, `status` and `rollback` would know less",
            journal.write_errors(),
            journal.location()
        );
    }
    let h = journal.header();
    ctx.notifier()
        .send(&notice(ctx, h, end_event(h.kind, report.outcome), Some(report)))
        .await;
    if let Some(hm) = human {
        hm.finish();
    }
    if !ctx.g.json {
        if h.kind == RunKind::Rollback {
            // A rollback's report speaks of its own plan; what matters is
            // what each instance runs now.
            outln!(
                "rollback {}: {}",
                h.deployment,
                HistoryOutcome::from(report.outcome)
            );
            for i in exec.instances() {
                let r = match tokio::time::timeout(Duration::from_secs(5), i.current_release()).await {
                    Ok(Ok(Some(r))) => r.to_string(),
                    Ok(Ok(None)) => "no release".into(),
                    _ => "unknown".into(),
                };
                outln!("  {}: {r}", i.backend().id);
            }
        } else {
            out!("{report}");
        }
    }
    Ok(match h.kind {
        RunKind::Rollback if report.outcome != OutcomeKind::Succeeded => exit::UNKNOWN_STATE,
        _ => output::exit_code(report),
    })
}

/// Says that the run stopped because it lost the lock, and what to do;
/// exit 3.
fn lock_lost(ctx: &Ctx, journal: &dyn JournalWriter, why: &str) -> u8 {
    eprintln!(
        "deploykit: error: run {} lost the deployment lock of {} and stopped: {why}. \
         It started no step after that and recorded nothing more (the journal {} ends at its last recorded step). \
         Another machine may hold the lock now: `deploykit status` shows where the run stopped, and \
         `deploykit deploy --resume` or `deploykit rollback` finishes it from any machine with this configuration.",
        journal.header().deployment,
        ctx.cfg.raw.app,
        journal.location()
    );
    exit::UNKNOWN_STATE
}

/// Cancels the run as soon as its lock is lost: it then starts nothing more
/// (its restore steps are refused too, since they cannot be recorded).
fn stop_on_lost_lock(lock: &HeldLock, exec: &Executor) -> tokio::task::JoinHandle<()> {
    let fence = lock.fence().clone();
    let cancel = exec.cancel_token();
    tokio::spawn(async move {
        let why = fence.wait_lost().await;
        eprintln!("deploykit: error: lost the deployment lock: {why}; stopping");
        cancel.cancel();
    })
}

/// The configured strategies recovery plans with. Only the section of the
/// strategy being recovered is checked: rolling back a rolling deployment
/// does not fail on a canary section it does not use.
fn strategies(ctx: &Ctx, kind: LibKind) -> anyhow::Result<recovery::Strategies> {
    let s = &ctx.cfg.raw.strategy;
    let mut out = recovery::Strategies {
        rolling: s.rolling.clone(),
        recreate: s.recreate.clone(),
        ..Default::default()
    };
    match kind {
        LibKind::BlueGreen => out.blue_green = ctx.cfg.raw.blue_green(),
        // The routed strategies are canary-shaped: their rollback uses the
        // canary's groups, their resume their own settings.
        LibKind::Canary | LibKind::Ramped | LibKind::Shadow | LibKind::DarkLaunch | LibKind::Experiment => {
            out.canary = ctx.cfg.raw.canary();
            out.ramped = ctx.cfg.raw.ramped();
            out.shadow = ctx.cfg.raw.shadow();
            out.dark_launch = ctx.cfg.raw.dark_launch();
            out.experiment = ctx.cfg.raw.experiment();
        }
        _ => {}
    }
    Ok(out)
}

/// The library's name for a strategy of the configuration.
fn lib_kind(kind: StrategyKind) -> LibKind {
    match kind {
        StrategyKind::Rolling => LibKind::Rolling,
        StrategyKind::Recreate => LibKind::Recreate,
        StrategyKind::BlueGreen => LibKind::BlueGreen,
        StrategyKind::Canary => LibKind::Canary,
        StrategyKind::Ramped => LibKind::Ramped,
        StrategyKind::Shadow => LibKind::Shadow,
        StrategyKind::DarkLaunch => LibKind::DarkLaunch,
        StrategyKind::Experiment => LibKind::Experiment,
    }
}

async fn reconciled_live(ctx: &Ctx, lock: &HeldLock, exec: &Executor) -> anyhow::Result<Reconciled> {
    let bg = ctx.cfg.raw.blue_green();
    let store = ctx.backend.live_store(Some(lock));
    Ok(reconcile(store.as_ref(), exec.load_balancer().as_ref(), &bg.environments).await?)
}

fn watch_control(ctx: &Ctx, lock: &HeldLock, id: &str, fleet: &wire::Fleet) -> tokio::task::JoinHandle<()> {
    ctx.backend.watch_control(
        lock,
        id.to_string(),
        fleet.promotion.clone(),
        Duration::from_millis(200),
    )
}

/// Ctrl-C (SIGINT) or SIGTERM cancels the run: it rolls back and ends
/// with a journal that says so. Only SIGKILL (or a crash) leaves an
/// interrupted deployment behind.
fn ctrl_c(exec: &Executor) -> tokio::task::JoinHandle<()> {
    let cancel = exec.cancel_token();
    tokio::spawn(async move {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            r = tokio::signal::ctrl_c() => {
                if r.is_err() {
                    return;
                }
            }
            () = term => {}
        }
        eprintln!("interrupted: cancelling and rolling back");
        cancel.cancel();
    })
}

/// Prints what the file holds that is valid but probably not meant.
fn warn_config(g: &Global, cfg: &Loaded, kind: StrategyKind) {
    if !g.quiet {
        for w in cfg.warnings(kind) {
            eprintln!("deploykit: warning: {}: {w}", cfg.path.display());
        }
    }
}

pub(crate) fn deploy(ctx: Ctx, args: DeployArgs) -> anyhow::Result<u8> {
    deploy_inner(ctx, args, &mut None)
}

fn deploy_inner(ctx: Ctx, args: DeployArgs, earlier: &mut Option<EarlierRun>) -> anyhow::Result<u8> {
    if ctx.cfg.is_multi_region() && ctx.region.is_none() {
        if args.drill {
            return Err(deploykit::Error::invalid(
                "--drill",
                "drills one region's canary; pass --region NAME, or run `deploykit drill --region NAME` per region first",
            )
            .into());
        }
        return regions::deploy(ctx, args, earlier);
    }
    if !args.regions.is_empty() {
        let why = if ctx.region.is_some() {
            "--region already names the one region to deploy; drop --regions"
        } else {
            "this file has no [[regions]]; drop --regions"
        };
        return Err(deploykit::Error::invalid("--regions", why).into());
    }
    if let Some(k) = args.strategy {
        ctx.cfg.check_strategy(k)?;
    }
    // Everything that can refuse the arguments comes before the lock, which
    // creates the state directory.
    let commit = args
        .commit
        .as_deref()
        .map(|c| SourceCommit::new(c, args.commit_time))
        .transpose()?;
    let rt = runtime()?;
    let release = match &args.release {
        Some(r) if !args.resume => {
            let release = ReleaseId::new(r).map_err(|e| rename(e, "release"))?;
            // An interrupted deployment is reported first, after the lock.
            if rt.block_on(ctx.backend.latest())?.is_none_or(|j| j.is_finished()) {
                wire::check_release(&ctx.cfg, &release)?;
            }
            warn_config(
                &ctx.g,
                &ctx.cfg,
                args.strategy.unwrap_or(ctx.cfg.raw.strategy.kind),
            );
            Some(release)
        }
        _ => {
            if rt.block_on(ctx.backend.is_unused())? {
                return nothing_to_resume();
            }
            None
        }
    };
    let metrics = args
        .metrics_listen
        .map(|addr| crate::metrics_http::bind("metrics-listen", addr))
        .transpose()?;
    rt.block_on(async move {
        let _metrics = metrics.map(|l| serve_metrics(&ctx, l));
        let purpose = match &args.release {
            Some(r) => format!("deploy {r}"),
            None => "deploy --resume".into(),
        };
        let lock = match lock(&ctx, &purpose).await? {
            Ok(l) => l,
            Err(code) => return Ok(code),
        };
        let claimer = Claimer {
            lock: &lock,
            take_over: args.take_over,
        };
        let code = async {
            if let Some(c) = commit.as_ref().filter(|_| args.once_per_commit) {
                if let Some(e) = earlier_run(&ctx, &c.sha).await? {
                    *earlier = Some(e);
                    return Ok(exit::SUCCESS);
                }
            }
            let latest = ctx.backend.latest().await?;
            let Some(release) = release else {
                return resume(&ctx, latest, &claimer).await;
            };
            if let Some(code) = drill::refuse_interrupted(&ctx).await? {
                return Ok(code);
            }
            wire::check_release(&ctx.cfg, &release)?;
            if args.drill {
                let code = drill::before_deploy(&ctx, &claimer, &release).await?;
                if code != exit::SUCCESS {
                    return Ok(code);
                }
            }
            let kind = args.strategy.unwrap_or(ctx.cfg.raw.strategy.kind);
            run_deploy(
                &ctx,
                RunKind::Deploy,
                Start::Fresh(kind, commit),
                release,
                &claimer,
            )
            .await
        }
        .await;
        lock.release().await;
        code
    })
}

/// Serves the Prometheus exposition of the journals (this run's too, and
/// the fault proxies' counters while a network fault runs) on `listener`
/// until the returned guard is dropped with the run.
pub(super) fn serve_metrics(
    ctx: &Ctx,
    listener: std::net::TcpListener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::metrics_http::serve(
        listener,
        crate::metrics_http::Journals::of(ctx),
        async move {
            let _ = stopped.await;
        },
    ));
    (stop, server)
}

fn rename(e: deploykit::Error, field: &str) -> deploykit::Error {
    match e {
        deploykit::Error::InvalidInput { message, .. } => deploykit::Error::invalid(field, message),
        other => other,
    }
}

/// What a deploy run starts from.
enum Start<'a> {
    /// A new deployment with the configured (or chosen) strategy, and the
    /// source commit of its release when known.
    Fresh(StrategyKind, Option<SourceCommit>),
    /// The continuation of the newest, interrupted run of a deployment.
    Resume(&'a Recorded),
    /// A drill: a canary broken on purpose, judged by its chaos entries.
    Drill(Box<drill::DrillRun>),
}

/// Deploys, or resumes an interrupted deployment.
async fn run_deploy(
    ctx: &Ctx,
    kind: RunKind,
    start: Start<'_>,
    release: ReleaseId,
    claimer: &Claimer<'_>,
) -> anyhow::Result<u8> {
    let relay = Arc::new(Relay::default());
    let lock = claimer.lock;
    // A drill's default fault is not in the file; the wiring must see it to
    // set up the fault proxies a network fault needs.
    let injected = match &start {
        Start::Drill(run) => &run.canary.chaos,
        _ => &ctx.cfg.raw.strategy.canary.chaos,
    };
    let fleet = wire::fleet_with_chaos(
        &ctx.cfg,
        &ctx.state,
        ctx.backend.live_store(Some(lock)),
        Some(relay.clone()),
        injected,
    )?;
    let exec = &fleet.executor;
    let _linked = ctx.link_cancel(exec);
    let snapshot = exec.snapshot().await?;
    let id = run_id(&release);
    let (out, human) = ctx.output();
    // A fresh canary with chaos entries is a drill: its events are kept
    // for the verdicts.
    let chaos = match &start {
        Start::Fresh(StrategyKind::Canary, _) => ctx.cfg.raw.canary().chaos,
        Start::Drill(d) => d.canary.chaos.clone(),
        _ => Vec::new(),
    };
    let drill_log = EventLog::new();
    let out: Option<Arc<dyn EventSink>> = if chaos.is_empty() {
        out
    } else {
        let mut fan = Fanout::new().with(Arc::new(drill_log.clone()));
        if let Some(o) = out {
            fan = fan.with(o);
        }
        Some(Arc::new(fan))
    };
    let (strategy, acts_on, previous) = match &start {
        Start::Fresh(..) | Start::Drill(_) => (
            match &start {
                Start::Fresh(k, _) => lib_kind(*k),
                _ => LibKind::Canary,
            },
            None,
            snapshot
                .instances
                .iter()
                .map(|i| (i.backend.id.clone(), i.release.clone()))
                .collect(),
        ),
        Start::Resume(rec) => (
            rec.latest().header.strategy,
            Some(rec.deployment().header.deployment.clone()),
            rec.latest().header.previous.clone(),
        ),
    };
    let blue_green = strategy == LibKind::BlueGreen;
    let live = if blue_green {
        Some(reconciled_live(ctx, lock, exec).await?)
    } else {
        None
    };
    let mut header = JournalHeader::new(&id, &ctx.cfg.raw.app, kind, strategy, release.clone(), previous);
    header.acts_on = acts_on;
    header.commit = match &start {
        Start::Fresh(_, commit) => commit.clone(),
        Start::Resume(rec) => rec.deployment().header.commit.clone(),
        Start::Drill(_) => None,
    };
    header.drill = match &start {
        Start::Drill(_) => true,
        Start::Resume(rec) => rec.deployment().header.drill,
        Start::Fresh(..) => false,
    };
    // What the interrupted run left part-way is restored in full if this
    // run fails.
    let unsettled = match &start {
        Start::Resume(rec) => rec.unsettled(),
        Start::Fresh(..) | Start::Drill(_) => Default::default(),
    };
    let mut drill_run = None;
    let plan = match start {
        Start::Fresh(..) if blue_green => {
            let bg = ctx.cfg.raw.blue_green();
            let live = live.as_ref().expect("reconciled above for blue-green");
            bg.plan(live, &snapshot, &release)?
        }
        Start::Fresh(k, _) => wire::strategy(&ctx.cfg, k)?.plan(&snapshot, &release)?,
        Start::Drill(d) => {
            let plan = if d.current {
                d.canary.drill_plan(&snapshot)?
            } else {
                deploykit::Strategy::plan(&d.canary, &snapshot, &release)?
            };
            drill_run = Some(d);
            plan
        }
        Start::Resume(rec) => {
            // A `promote` sent while no process ran is honoured when the
            // stage it approved waits again.
            let root = &rec.deployment().header.deployment;
            if let Some(stage) = ctx.backend.recorded_promotion(root).await? {
                if rec.awaiting_promotion() == Some(stage) {
                    fleet.promotion.approve(stage);
                    ctx.say(format!(
                        "stage {stage} was promoted while no deploykit ran: the resumed run goes on past its wait"
                    ));
                }
            }
            match recovery::resume(rec, &snapshot, &strategies(ctx, strategy)?, live.as_ref())? {
                recovery::Resume::Plan(plan) => plan,
                recovery::Resume::Switched { live } => {
                    let journal = start_journal(ctx, lock, &relay, header, out).await?;
                    ctx.say(format!(
                        "the interrupted deployment had switched traffic to {live}: nothing left to do"
                    ));
                    let report = Report {
                        deployment: id.clone(),
                        strategy,
                        release: release.clone(),
                        outcome: OutcomeKind::Succeeded,
                        reason: None,
                        instances: Vec::new(),
                        duration: Duration::ZERO,
                        checks: Vec::new(),
                        experiment: None,
                        variants: None,
                        winner: None,
                    };
                    return conclude(ctx, exec, journal.as_ref(), &report, human.as_deref()).await;
                }
            }
        }
    };
    if let Some(h) = &human {
        h.learn_plan(&plan);
    }
    header.plan = Some(plan.clone());
    // A detour left by a run that died during a network fault would fail
    // the preflight (HAProxy) or send traffic to a dead proxy.
    wire::undo_detours(&ctx.state, exec).await?;
    // Refusals (a load balancer that fails its preflight, …) come before
    // the journal and the start notice.
    if let Some(d) = &drill_run {
        if let Some(refusal) = d.preflight(exec).await {
            return Ok(drill_refused(ctx, &refusal));
        }
    }
    exec.check(&plan, &RunOptions::default()).await?;
    pin_release(ctx, &release)?;
    let marker = match claimer.claim(ctx, exec, &id).await? {
        Ok(m) => m,
        Err(code) => return Ok(code),
    };
    let lost = stop_on_lost_lock(lock, exec);
    let code = async {
        let journal = start_journal(ctx, lock, &relay, header, out).await?;
        ctx.notifier()
            .send(&notice(ctx, journal.header(), NotifyOn::Start, None))
            .await;
        if blue_green {
            let bg = ctx.cfg.raw.blue_green();
            let sig = ctrl_c(exec);
            let result = bg.deploy(exec, &release).await;
            sig.abort();
            let mut report = unless_refused(journal.as_ref(), result).await?.deployment;
            report.deployment = id;
            return conclude(ctx, exec, journal.as_ref(), &report, human.as_deref()).await;
        }
        let watcher = watch_control(ctx, lock, &id, &fleet);
        let sig = ctrl_c(exec);
        let options = RunOptions::default().with_id(&id).with_unsettled(unsettled);
        let probe = match drill_run.as_ref().and_then(|d| d.probe.clone()) {
            Some(url) => Some(drill::Probe::start(url)?),
            None => None,
        };
        // An abort of a resumed run returns the instances the interrupted
        // run finished too: the plan names them (recovery::resume).
        let run = exec.run(&plan, options).await;
        let probed = match probe {
            Some(p) => Some(p.finish().await),
            None => None,
        };
        let report = unless_refused(journal.as_ref(), run).await?;
        sig.abort();
        watcher.abort();
        let code = conclude(ctx, exec, journal.as_ref(), &report, human.as_deref()).await?;
        if chaos.is_empty() {
            return Ok(code);
        }
        let events = drill_log.events();
        let verdicts = if drill_run.is_some() {
            deploykit::chaos::drill::judge(&chaos, &events)
        } else {
            deploykit::chaos::verdicts(&chaos, &events)
        };
        Ok(drill_verdicts(ctx, &verdicts, probed.as_ref(), code))
    }
    .await;
    // Whatever the outcome, no instance's traffic is left going through a
    // fault proxy that dies with this process.
    if let Some(faults) = &fleet.faults {
        for (id, e) in faults.restore().await {
            eprintln!(
                "deploykit: warning: {id}'s traffic could not be pointed back from its fault proxy: {e}; \
                 run `deploykit rollback` or correct the load balancer by hand"
            );
        }
    }
    lost.abort();
    deploykit::state::release(exec.instances(), &marker).await;
    code
}

/// Prints each chaos entry's verdict and decides the exit code: a drill
/// whose every expectation held succeeds (0) even when it rolled back, as
/// it was meant to; one that did not exits [`exit::CHAOS_FAILED`]; a fleet
/// left in an unknown state keeps its code.
fn drill_verdicts(
    ctx: &Ctx,
    verdicts: &[deploykit::chaos::ChaosVerdict],
    probe: Option<&drill::ProbeStats>,
    code: u8,
) -> u8 {
    if ctx.g.json {
        let mut line = serde_json::json!({ "chaos_verdicts": verdicts });
        if let Some(p) = probe {
            line["probe"] = serde_json::json!(p);
        }
        outln!("{line}");
    } else {
        for v in verdicts {
            outln!("{v}");
            if let Some(at) = v.injected_at_ms {
                let hit: Vec<String> = v.instances.iter().map(ToString::to_string).collect();
                outln!(
                    "  injected at {:.1}s into {} (checks passed before it: {})",
                    at as f64 / 1000.0,
                    hit.join(", "),
                    v.checks_passed_before
                );
            }
            if let Some(t) = &v.tripped {
                outln!(
                    "  first failing check at {:.1}s: {}",
                    t.at_ms as f64 / 1000.0,
                    t.result
                );
                for e in &t.evidence {
                    outln!("    {e}");
                }
            }
            if let Some(at) = v.rolled_back_at_ms {
                outln!("  rollback done at {:.1}s", at as f64 / 1000.0);
            }
        }
        if let Some(p) = probe {
            outln!("{p}");
        }
    }
    if code == exit::UNKNOWN_STATE {
        return code;
    }
    if verdicts.iter().all(|v| v.passed) {
        exit::SUCCESS
    } else {
        exit::CHAOS_FAILED
    }
}

/// A drill whose gate can never fire fails before anything is touched:
/// exit [`exit::CHAOS_FAILED`], the reason in words.
fn drill_refused(ctx: &Ctx, refusal: &deploykit::chaos::drill::DrillRefusal) -> u8 {
    if ctx.g.json {
        let line = serde_json::json!({ "drill_refused": refusal.to_string() });
        outln!("{line}");
    }
    eprintln!("deploykit: drill FAILED before anything was touched: {refusal}");
    exit::CHAOS_FAILED
}

fn nothing_to_resume() -> anyhow::Result<u8> {
    eprintln!(
        "deploykit: error: nothing to resume: no deployment was interrupted (`deploykit history` lists them)"
    );
    Ok(exit::BAD_INPUT)
}

/// Refuses a release whose directory changed since its first deployment
/// from this state directory (see [`StateDir::pin_release`]); fleets
/// without a release directory (simulated) have nothing to pin.
fn pin_release(ctx: &Ctx, release: &ReleaseId) -> anyhow::Result<()> {
    let Some(releases) = ctx.cfg.raw.releases.as_deref() else {
        return Ok(());
    };
    let dir = ctx.cfg.resolve(releases).join(release.as_str());
    if !dir.is_dir() {
        return Ok(());
    }
    let digest = deploykit::state::release_digest(&dir)
        .with_context(|| format!("reading the release {}", dir.display()))?;
    ctx.state.pin_release(release, &digest)?;
    Ok(())
}

/// Who claims the instances for a run, and whether it may take over those
/// of a deployment that no longer runs.
struct Claimer<'a> {
    lock: &'a HeldLock,
    take_over: bool,
}

impl Claimer<'_> {
    /// Marks every instance as held by run `id`, or explains which other
    /// deployment holds one (exit 4). Nothing is touched when refused.
    async fn claim(
        &self,
        ctx: &Ctx,
        exec: &Executor,
        id: &str,
    ) -> anyhow::Result<Result<deploykit::state::InstanceMarker, u8>> {
        let identity = ctx.backend.identity();
        let marker = deploykit::state::InstanceMarker::for_state(id, identity.clone(), self.lock.holder());
        match deploykit::state::claim_for(exec.instances(), &identity, &marker, self.take_over).await? {
            Ok(()) => Ok(Ok(marker)),
            Err(refused) => {
                eprintln!("deploykit: error: {refused}");
                Ok(Err(exit::LOCKED))
            }
        }
    }
}

async fn resume(ctx: &Ctx, latest: Option<JournalSummary>, claimer: &Claimer<'_>) -> anyhow::Result<u8> {
    let Some(orig) = latest.filter(|j| !j.is_finished()) else {
        return nothing_to_resume();
    };
    if orig.header.kind == RunKind::Rollback {
        eprintln!(
            "deploykit: error: the interrupted run {} is a rollback; run `deploykit rollback` to finish it",
            orig.header.deployment
        );
        return Ok(exit::BAD_INPUT);
    }
    ctx.say(format!(
        "resuming the {} deployment {} of {}",
        orig.header.strategy, orig.header.deployment, orig.header.release
    ));
    wire::check_release(&ctx.cfg, &orig.header.release)?;
    let recorded = Recorded::new(ctx.backend.chain(&recovery::root_of(&orig)).await?)?;
    run_deploy(
        ctx,
        RunKind::Resume,
        Start::Resume(&recorded),
        orig.header.release.clone(),
        claimer,
    )
    .await
}

pub(crate) fn rollback(ctx: Ctx) -> anyhow::Result<u8> {
    rollback_with(ctx, false)
}

/// `rollback`; `take_over` takes over instances whose marker names a
/// deployment of another state directory that no longer runs.
pub(crate) fn rollback_with(ctx: Ctx, take_over: bool) -> anyhow::Result<u8> {
    if ctx.cfg.is_multi_region() && ctx.region.is_none() {
        return Err(config::ConfigError {
            file: ctx.cfg.path.clone(),
            at: None,
            message: format!(
                "this file has [[regions]]: roll back one region with `deploykit --region NAME rollback`, or every region with `deploykit rollback --all` (the regions are {})",
                ctx.cfg.region_names().join(", ")
            ),
        }
        .into());
    }
    runtime()?.block_on(rollback_in(&ctx, take_over))
}

/// `rollback` of one fleet (a file of one fleet, or one region).
async fn rollback_in(ctx: &Ctx, take_over: bool) -> anyhow::Result<u8> {
    let nothing = || {
        eprintln!("deploykit: error: nothing to roll back: no deployment is recorded");
        Ok(exit::BAD_INPUT)
    };
    // The lock would create the state directory.
    if ctx.backend.is_unused().await? {
        return nothing();
    }
    let lock = match lock(ctx, "rollback").await? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let code = rollback_locked(ctx, &lock, take_over, nothing).await;
    lock.release().await;
    code
}

/// The rollback, holding the lock.
async fn rollback_locked(
    ctx: &Ctx,
    lock: &HeldLock,
    take_over: bool,
    nothing: impl Fn() -> anyhow::Result<u8>,
) -> anyhow::Result<u8> {
    {
        // Another state's markers only with `--take-over`, and never those
        // of a deployment that runs.
        let claimer = Claimer { lock, take_over };
        let Some(latest) = ctx.backend.latest().await? else {
            return nothing();
        };
        let recorded = Recorded::new(ctx.backend.chain(&recovery::root_of(&latest)).await?)?;
        let root = recorded.deployment().header.clone();
        let relay = Arc::new(Relay::default());
        let fleet = wire::fleet(
            &ctx.cfg,
            &ctx.state,
            ctx.backend.live_store(Some(lock)),
            Some(relay.clone()),
        )?;
        let exec = &fleet.executor;
        let snap = exec.snapshot().await?;
        let (out, human) = ctx.output();
        let id = format!("{}-rollback", run_id(&root.release));
        ctx.say(format!(
            "rolling back the {} deployment {} of {}",
            root.strategy, root.deployment, root.release
        ));
        let blue_green = root.strategy == LibKind::BlueGreen;
        let live = if blue_green {
            Some(reconciled_live(ctx, lock, exec).await?)
        } else {
            None
        };
        let strategies = strategies(ctx, root.strategy)?;
        let lost = stop_on_lost_lock(lock, exec);
        let marker = match claimer.claim(ctx, exec, &id).await? {
            Ok(m) => m,
            Err(code) => return Ok(code),
        };
        let code = async {
            let plan = match recovery::rollback(&recorded, &snap, &strategies, live.as_ref())? {
                recovery::Rollback::Plan(plan) => plan,
                recovery::Rollback::SwitchBack => {
                    let mut header = JournalHeader::new(
                        &id,
                        &ctx.cfg.raw.app,
                        RunKind::Rollback,
                        LibKind::BlueGreen,
                        root.release.clone(),
                        snap.instances
                            .iter()
                            .map(|i| (i.backend.id.clone(), i.release.clone()))
                            .collect(),
                    );
                    header.acts_on = Some(root.deployment.clone());
                    let journal = start_journal(ctx, lock, &relay, header, out).await?;
                    let mut report =
                        unless_refused(journal.as_ref(), strategies.blue_green.rollback(exec).await)
                            .await?
                            .deployment;
                    report.deployment = id;
                    return conclude(ctx, exec, journal.as_ref(), &report, human.as_deref()).await;
                }
            };
            let mut header = JournalHeader::new(
                &id,
                &ctx.cfg.raw.app,
                RunKind::Rollback,
                if blue_green {
                    LibKind::BlueGreen
                } else {
                    LibKind::Rollback
                },
                plan.release.clone(),
                plan.previous.clone(),
            );
            header.acts_on = Some(root.deployment.clone());
            if let Some(h) = &human {
                h.learn_plan(&plan);
            }
            header.plan = Some(plan.clone());
            // Nor does a detour that cannot be undone: the rollback's own
            // changes send the traffic home where the driver can (nginx).
            if let Err(e) = wire::undo_detours(&ctx.state, exec).await {
                eprintln!("deploykit: warning: {e:#}");
            }
            // A load balancer failing its preflight does not block a rollback
            // (a warning event) — refusing would leave the fleet as mixed as it
            // is — unless it does not read what the rollback would write.
            exec.check(&plan, &RunOptions::recovery()).await?;
            let journal = start_journal(ctx, lock, &relay, header, out).await?;
            if !blue_green {
                ctx.notifier()
                    .send(&notice(ctx, journal.header(), NotifyOn::Start, None))
                    .await;
            }
            let options = RunOptions::recovery()
                .with_id(&id)
                .with_unsettled(recorded.unsettled());
            let report = unless_refused(journal.as_ref(), exec.run(&plan, options).await).await?;
            conclude(ctx, exec, journal.as_ref(), &report, human.as_deref()).await
        }
        .await;
        lost.abort();
        deploykit::state::release(exec.instances(), &marker).await;
        code
    }
}

pub(crate) fn plan(ctx: Ctx, args: PlanArgs) -> anyhow::Result<u8> {
    if ctx.cfg.is_multi_region() && ctx.region.is_none() {
        return regions::plan(ctx, args);
    }
    if let Some(k) = args.strategy {
        ctx.cfg.check_strategy(k)?;
    }
    warn_config(
        &ctx.g,
        &ctx.cfg,
        args.strategy.unwrap_or(ctx.cfg.raw.strategy.kind),
    );
    runtime()?.block_on(async move {
        let release = ReleaseId::new(&args.release).map_err(|e| rename(e, "release"))?;
        let kind = args.strategy.unwrap_or(ctx.cfg.raw.strategy.kind);
        let plan = dry_plan(&ctx, kind, &release).await?;
        let flagged = plan
            .stages
            .iter()
            .flat_map(|s| &s.units)
            .flat_map(|u| &u.steps)
            .any(|s| matches!(s, deploykit::Step::FlagShare { .. }));
        if flagged {
            check_canary_flag(&ctx.cfg)?;
        }
        let p = plan.projected_duration();
        let batches: Vec<usize> = plan
            .stages
            .iter()
            .filter(|s| s.units.iter().any(|u| u.instance.is_some()))
            .map(|s| s.units.len())
            .collect();
        if ctx.g.json {
            outln!(
                "{}",
                serde_json::json!({
                    "plan": plan,
                    "batch_sizes": batches,
                    "projected_duration_ms": {"min": u64::try_from(p.min.as_millis()).unwrap_or(u64::MAX), "max": u64::try_from(p.max.as_millis()).unwrap_or(u64::MAX)},
                })
            );
        } else {
            out!("{plan}");
            let sizes: Vec<String> = batches.iter().map(|b| b.to_string()).collect();
            outln!("batch sizes: {}", if sizes.is_empty() { "none (nothing to do)".into() } else { sizes.join(", ") });
        }
        Ok(exit::SUCCESS)
    })
}

/// The plan of `release` with strategy `kind` on a fresh snapshot of the
/// fleet, touching nothing.
async fn dry_plan(ctx: &Ctx, kind: StrategyKind, release: &ReleaseId) -> anyhow::Result<deploykit::Plan> {
    let store = ctx.backend.live_store(None);
    let fleet = wire::fleet(&ctx.cfg, &ctx.state, store.clone(), None)?;
    let exec = &fleet.executor;
    let snapshot = exec.snapshot().await?;
    let plan = if kind == StrategyKind::BlueGreen {
        // Read-only: the record, else the load balancer, else the first
        // environment.
        let bg = ctx.cfg.raw.blue_green();
        let live = peek(store.as_ref(), exec.load_balancer().as_ref(), &bg.environments).await?;
        bg.plan(&live, &snapshot, release)?
    } else {
        wire::strategy(&ctx.cfg, kind)?.plan(&snapshot, release)?
    };
    // A plan the load balancer cannot route is refused in a dry run too,
    // not only when a deployment starts.
    let lb = exec.load_balancer();
    plan.check_routing(lb.name(), &lb.capabilities())?;
    Ok(plan)
}

pub(crate) fn status(ctx: Ctx) -> anyhow::Result<u8> {
    if ctx.cfg.is_multi_region() && ctx.region.is_none() {
        return regions::status(ctx);
    }
    runtime()?.block_on(async move {
        let (status, code) = status_of(&ctx).await?;
        if ctx.g.json {
            outln!("{}", serde_json::to_string(&status)?);
        } else {
            print_status(&status);
        }
        Ok(code)
    })
}

/// What `status` shows of one fleet, and its exit code (3 when a journal
/// could not be read).
async fn status_of(ctx: &Ctx) -> anyhow::Result<(output::Status, u8)> {
    let holder = ctx.backend.holder().await?;
    // An unreadable journal is reported beside the fleet, not instead
    // of it: the fleet is what an operator needs to see to repair.
    let scan = ctx.backend.scan_journals().await?;
    let problems: Vec<String> = scan.unreadable.iter().map(|u| u.error.to_string()).collect();
    let latest = scan.journals.into_iter().next_back();
    let code = if problems.is_empty() {
        exit::SUCCESS
    } else {
        exit::UNKNOWN_STATE
    };
    let store = ctx.backend.live_store(None);
    let fleet = wire::fleet(&ctx.cfg, &ctx.state, store.clone(), None)?;
    let exec = &fleet.executor;
    let probe = Duration::from_secs(5);
    // Every instance at once: a slow or unreachable one costs the probe
    // timeout once, not once per instance.
    let rows = futures::future::join_all(exec.instances().iter().map(|i| async move {
        let b = i.backend();
        let release = match tokio::time::timeout(probe, i.current_release()).await {
            Ok(Ok(r)) => r.map(|r| r.to_string()).unwrap_or_else(|| "none".into()),
            Ok(Err(e)) => format!("unknown ({e})"),
            Err(_) => "unknown (timed out)".into(),
        };
        let health = match tokio::time::timeout(probe, i.health()).await {
            Ok(Ok(h)) if h.is_healthy() => "healthy".to_string(),
            Ok(Ok(deploykit::Health::Unhealthy(why))) => format!("unhealthy: {why}"),
            Ok(Ok(_)) => "unknown".to_string(),
            Ok(Err(e)) => format!("unreachable: {e}"),
            Err(_) => "unreachable: timed out".into(),
        };
        (
            b.id.to_string(),
            b.group.to_string(),
            b.address.to_string(),
            release,
            health,
        )
    }))
    .await;
    let sim_lb = (ctx.cfg.raw.load_balancer.kind == config::LbKind::Simulated)
        .then(|| {
            crate::sim::SimLoadBalancer::new(ctx.state.root())
                .ok()
                .and_then(|l| l.state().ok())
        })
        .flatten();
    let live = store.load().await.ok().flatten();
    let entry = latest.as_ref().map(|j| j.history_entry(holder.as_ref()));
    let instances = rows
        .iter()
        .map(|(id, g, a, r, h)| output::InstanceState {
            id: id.clone(),
            group: g.clone(),
            address: a.clone(),
            release: r.clone(),
            health: h.clone(),
            in_rotation: sim_lb.as_ref().map(|l| !l.out_of_rotation.contains(id)),
        })
        .collect();
    let deployment = latest.as_ref().zip(entry).map(|(j, history)| output::LastRun {
        history,
        unsettled: j.unsettled(),
        awaiting_promotion: j.awaiting_promotion(),
        previous: j.header.previous.clone(),
    });
    let status = output::Status {
        app: ctx.cfg.raw.app.clone(),
        lock: holder,
        deployment,
        instances,
        live: live.map(|l| l.live),
        load_balancer: sim_lb,
        journal_problems: problems,
    };
    Ok((status, code))
}

/// `status` for a person.
fn print_status(status: &output::Status) {
    let problems = &status.journal_problems;
    for p in problems {
        eprintln!("deploykit: error: {p}");
    }
    outln!("app: {}", status.app);
    if let Some(h) = &status.lock {
        outln!("lock: held by {h}");
    }
    match &status.deployment {
        Some(last) => {
            let e = &last.history;
            outln!(
                "last run: {} ({}) {} of {}: {}",
                e.id,
                output::run_kind(e.kind),
                e.strategy,
                e.release,
                e.outcome
            );
            if let Some(r) = &e.reason {
                outln!("  {r}");
            }
            if let Some(stage) = last.awaiting_promotion {
                if e.outcome == HistoryOutcome::InProgress {
                    outln!("  canary stage {stage} waits for promotion: `deploykit promote` or `deploykit abort`");
                }
            }
            if e.outcome == HistoryOutcome::Interrupted {
                let unsettled: Vec<String> = last.unsettled.iter().map(|i| i.to_string()).collect();
                if !unsettled.is_empty() {
                    outln!("  left part-way: {}", unsettled.join(", "));
                }
                outln!(
                    "  the fleet may run a mix of releases: `deploykit deploy --resume` continues, `deploykit rollback` undoes"
                );
            }
        }
        None if problems.is_empty() => outln!("no deployment recorded yet"),
        None => outln!("no readable deployment recorded"),
    }
    if !problems.is_empty() {
        outln!(
            "  {} unreadable journal(s), listed above: the last run may be another one",
            problems.len()
        );
    }
    if let Some(l) = &status.live {
        outln!("live environment: {l}");
    }
    let rows = &status.instances;
    let w = |f: fn(&output::InstanceState) -> &String, h: &str| {
        rows.iter().map(|r| f(r).len()).max().unwrap_or(0).max(h.len())
    };
    let (wi, wg, wa, wr) = (
        w(|r| &r.id, "instance"),
        w(|r| &r.group, "group"),
        w(|r| &r.address, "address"),
        w(|r| &r.release, "release"),
    );
    let lb_col = status.load_balancer.is_some();
    outln!(
        "{:<wi$}  {:<wg$}  {:<wa$}  {:<wr$}  {}health",
        "instance",
        "group",
        "address",
        "release",
        if lb_col { "rotation  " } else { "" }
    );
    for r in rows {
        let rot = match r.in_rotation {
            Some(false) => "out       ",
            Some(true) => "in        ",
            None => "",
        };
        outln!(
            "{:<wi$}  {:<wg$}  {:<wa$}  {:<wr$}  {rot}{}",
            r.id,
            r.group,
            r.address,
            r.release,
            r.health
        );
    }
}

pub(crate) fn history(ctx: Ctx) -> anyhow::Result<u8> {
    // The readable runs are listed even when one journal is not.
    let rt = runtime()?;
    let scan = rt.block_on(ctx.backend.scan_journals())?;
    let holder = rt.block_on(ctx.backend.holder())?;
    let entries: Vec<_> = scan
        .journals
        .iter()
        .map(|j| j.history_entry(holder.as_ref()))
        .collect();
    for u in &scan.unreadable {
        eprintln!("deploykit: error: {}", u.error);
    }
    let code = if scan.unreadable.is_empty() {
        exit::SUCCESS
    } else {
        exit::UNKNOWN_STATE
    };
    let flag_changes = FlagStore::new(PathBuf::new(), crate::flags::flag_journal(&ctx.state)).history()?;
    if ctx.g.json {
        for e in &entries {
            outln!("{}", serde_json::to_string(e)?);
        }
        for c in &flag_changes {
            outln!("{}", crate::flags::history_json(c));
        }
        return Ok(code);
    }
    if entries.is_empty() {
        outln!("no deployments recorded yet");
        crate::flags::print_history(&flag_changes);
        return Ok(code);
    }
    outln!(
        "{:<34} {:<9} {:<11} {:<12} {:<15} {:>9}  reason",
        "id",
        "kind",
        "strategy",
        "release",
        "outcome",
        "duration"
    );
    for e in entries {
        let kind = output::run_kind(e.kind);
        outln!(
            "{:<34} {:<9} {:<11} {:<12} {:<15} {:>8.1}s  {}",
            e.id,
            kind,
            e.strategy,
            e.release.as_str(),
            e.outcome.to_string(),
            e.duration_ms as f64 / 1000.0,
            e.reason.as_deref().unwrap_or_default()
        );
    }
    crate::flags::print_history(&flag_changes);
    Ok(code)
}

/// `promote` / `abort`: through the control file of the running deployment.
/// A `promote` for an interrupted deployment that waited for one is
/// recorded for its `deploy --resume`.
pub(crate) fn control(ctx: Ctx, command: ControlCommand) -> anyhow::Result<u8> {
    let rt = runtime()?;
    let Some(holder) = rt.block_on(ctx.backend.holder())? else {
        if command == ControlCommand::Promote {
            return rt.block_on(record_promotion(&ctx));
        }
        eprintln!(
            "deploykit: error: no deployment of {} is running",
            ctx.cfg.raw.app
        );
        return Ok(exit::BAD_INPUT);
    };
    let Some(running) = rt.block_on(ctx.backend.latest())?.filter(|j| !j.is_finished()) else {
        eprintln!("deploykit: error: {holder} holds the lock but has no journal yet; try again in a moment");
        return Ok(exit::BAD_INPUT);
    };
    let id = running.header.deployment.clone();
    if command == ControlCommand::Promote && running.awaiting_promotion().is_none() {
        eprintln!("deploykit: error: deployment {id} is not waiting for a promotion (only a canary with promotion = \"manual\" and a dark launch wait)");
        return Ok(exit::BAD_INPUT);
    }
    let seq = rt.block_on(ctx.backend.send_control(&id, command))?;
    let ack = match rt.block_on(await_ack(&ctx, seq))? {
        Acked::Answer(a) => Some(a),
        Acked::HolderGone if command == ControlCommand::Promote => {
            // The process died: its lock expired with its lease, so nothing
            // can act on the request; the promotion is recorded instead.
            return rt.block_on(record_promotion(&ctx));
        }
        Acked::HolderGone => {
            eprintln!(
                "deploykit: error: the process running deployment {id} is gone (its lock expired): \
                 `deploykit rollback` undoes the deployment, `deploykit deploy --resume` continues it"
            );
            return Ok(exit::BAD_INPUT);
        }
        Acked::Silent => None,
    };
    match ack.map(|a| a.result) {
        Some(r) if r == "promoted" || r == "aborted" => {
            outln!("deployment {id}: {r}");
            Ok(exit::SUCCESS)
        }
        Some(r) => {
            eprintln!("deploykit: error: deployment {id} answered {r}: nothing was waiting for a promotion");
            Ok(exit::BAD_INPUT)
        }
        None => {
            eprintln!(
                "deploykit: error: deployment {id} did not acknowledge while {holder} still held the lock; \
                 check `deploykit status`"
            );
            Ok(exit::UNKNOWN_STATE)
        }
    }
}

/// What came of a control request.
enum Acked {
    Answer(deploykit::state::ControlAck),
    /// No answer, and the lock is free: the process that held it is gone.
    HolderGone,
    /// No answer while the lock stayed held.
    Silent,
}

/// Waits for the acknowledgement of request `seq`: 10 s, or with etcd as
/// long as a dead holder's lease can outlive it (`lock_ttl`), checking
/// meanwhile whether the lock is still held.
async fn await_ack(ctx: &Ctx, seq: u64) -> anyhow::Result<Acked> {
    let mut wait = Duration::from_secs(10);
    if ctx.cfg.raw.state.backend == config::StateBackendKind::Etcd {
        let ttl = ctx
            .cfg
            .raw
            .state
            .lock_ttl
            .as_ref()
            .map_or(Duration::from_secs(15), |t| t.0);
        wait = wait.max(ttl + Duration::from_secs(2));
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(a) = ctx.backend.wait_ack(seq, Duration::from_millis(500)).await {
            return Ok(Acked::Answer(a));
        }
        if ctx.backend.holder().await?.is_none() {
            return Ok(Acked::HolderGone);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(Acked::Silent);
        }
    }
}

/// `promote` while no process runs: an interrupted deployment that waited
/// for a promotion gets it recorded, under the lock (no resume starts
/// meanwhile), for its `deploy --resume`. Creates nothing when there is
/// nothing to promote.
async fn record_promotion(ctx: &Ctx) -> anyhow::Result<u8> {
    let app = &ctx.cfg.raw.app;
    let interrupted = ctx.backend.latest().await?.filter(|j| !j.is_finished());
    let Some(latest) = interrupted else {
        eprintln!("deploykit: error: no deployment of {app} is running or interrupted: nothing waits for a promotion");
        return Ok(exit::BAD_INPUT);
    };
    let lock = match lock(ctx, "promote").await? {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let result = async {
        // Read again under the lock: a resume may have finished it meanwhile.
        Ok(
            match recovery::record_promotion(ctx.backend.as_ref(), &lock, None).await? {
                PromotionRecord::Recorded {
                    deployment: id,
                    stage,
                } => {
                    outln!(
                        "deployment {id}: promotion of stage {stage} recorded (no deploykit runs it); \
                     `deploykit deploy --resume` goes on past that wait"
                    );
                    exit::SUCCESS
                }
                PromotionRecord::NotWaiting { deployment: id } => {
                    eprintln!(
                        "deploykit: error: the interrupted deployment {id} was not waiting for a promotion \
                     (only a canary with promotion = \"manual\" and a dark launch wait); \
                     `deploykit deploy --resume` continues it, `deploykit rollback` undoes it"
                    );
                    exit::BAD_INPUT
                }
                // Nothing interrupted any more (no deployment was named).
                _ => {
                    eprintln!(
                    "deploykit: error: the deployment {} finished meanwhile: nothing waits for a promotion",
                    latest.header.deployment
                );
                    exit::BAD_INPUT
                }
            },
        )
    }
    .await;
    lock.release().await;
    result
}

pub(crate) fn validate(g: Global) -> anyhow::Result<u8> {
    let cfg = config::load(&g.config)?;
    warn_config(&g, &cfg, cfg.raw.strategy.kind);
    check_canary_flag(&cfg)?;
    if g.json {
        outln!(
            "{}",
            serde_json::json!({"valid": true, "app": cfg.raw.app, "instances": cfg.instances.len(), "strategy": cfg.raw.strategy.kind.to_string()})
        );
    } else if !g.quiet {
        outln!(
            "{}: valid ({} instance(s), strategy {}, load balancer {})",
            cfg.path.display(),
            cfg.instances.len(),
            cfg.raw.strategy.kind,
            cfg.raw.load_balancer.kind
        );
    }
    Ok(exit::SUCCESS)
}

/// Refuses a `[strategy.canary] flag` the flag file cannot roll out (no
/// such flag, no such variant, no distinct safe variant), as `deploy`
/// would before touching anything; reads only.
///
/// # Errors
/// An invalid-input error naming `strategy.canary.flag` and the flag file.
fn check_canary_flag(cfg: &Loaded) -> anyhow::Result<()> {
    use deploykit::flags::FlagSwitch as _;
    let canary = &cfg.raw.strategy.canary;
    let Some(flag) = &canary.flag else {
        return Ok(());
    };
    let file = cfg.resolve(cfg.raw.flags.file.as_deref().unwrap_or("flags.json"));
    // The journal is never touched: `check` only reads the flag file.
    FlagStore::new(&file, PathBuf::new())
        .check(flag, &canary.flag_variant)
        .map_err(|e| {
            deploykit::Error::invalid(
                "strategy.canary.flag",
                format!(
                    "the canary's feature flag `{flag}` cannot be rolled out from {} ([flags] file): {e}",
                    file.display()
                ),
            )
        })?;
    Ok(())
}

/// `deploykit setup`: creates the nginx upstream include file (and the
/// location include, when configured) when one is missing (every instance in rotation, checked with `nginx -t`), then runs
/// the load balancer's preflight check. Touches no instance.
pub(crate) fn setup(ctx: Ctx) -> anyhow::Result<u8> {
    runtime()?.block_on(async move {
        let lock = match lock(&ctx, "setup").await? {
            Ok(l) => l,
            Err(code) => return Ok(code),
        };
        let code = setup_locked(&ctx, &lock).await;
        lock.release().await;
        code
    })
}

/// What a fresh setup keeps out of rotation until a deployment: the split
/// the strategy leaves between deployments, and the groups it leaves out.
struct Resting {
    weights: Vec<deploykit::GroupWeight>,
    out: Vec<Group>,
    why: String,
}

/// The traffic a fresh load balancer state should carry for the configured
/// strategy: a canary-shaped one keeps its canary group (stopped between
/// deployments) out, blue-green its idle environment (the live one is the
/// record's, else the first); `None` when every instance serves (rolling,
/// recreate) or no instance is in the group that would take the traffic.
async fn resting_weights(ctx: &Ctx, lock: &HeldLock) -> anyhow::Result<Option<Resting>> {
    let kind = ctx.cfg.raw.strategy.kind;
    let (serving, why) = match kind {
        StrategyKind::Rolling | StrategyKind::Recreate => return Ok(None),
        StrategyKind::BlueGreen => {
            let bg = ctx.cfg.raw.blue_green();
            let recorded = ctx.backend.live_store(Some(lock)).load().await?;
            let live = recorded.map_or_else(|| bg.environments[0].clone(), |r| r.live);
            (
                live,
                "blue-green serves from its live environment only".to_owned(),
            )
        }
        StrategyKind::Canary
        | StrategyKind::Ramped
        | StrategyKind::Shadow
        | StrategyKind::DarkLaunch
        | StrategyKind::Experiment => (
            ctx.cfg.raw.canary().stable_group,
            format!("a {kind} deployment starts and stops its canary instances itself"),
        ),
    };
    if !ctx.cfg.instances.iter().any(|i| i.group == serving) {
        return Ok(None);
    }
    let out: BTreeSet<Group> = ctx
        .cfg
        .instances
        .iter()
        .filter(|i| i.group != serving)
        .map(|i| i.group.clone())
        .collect();
    if out.is_empty() {
        return Ok(None);
    }
    Ok(Some(Resting {
        weights: vec![deploykit::GroupWeight {
            group: serving,
            percent: 100,
        }],
        out: out.into_iter().collect(),
        why,
    }))
}

/// `N server(s) in rotation`, naming what a resting split leaves out.
fn in_rotation(ctx: &Ctx, resting: Option<&Resting>) -> String {
    match resting {
        None => format!("{} server(s) in rotation", ctx.cfg.instances.len()),
        Some(r) => {
            let serving = ctx
                .cfg
                .instances
                .iter()
                .filter(|i| !r.out.contains(&i.group))
                .count();
            let out: Vec<&str> = r.out.iter().map(Group::as_str).collect();
            format!(
                "{serving} of {} server(s) in rotation, group {} out until a deployment ({})",
                ctx.cfg.instances.len(),
                out.join(", "),
                r.why
            )
        }
    }
}

/// The setup, holding the lock.
async fn setup_locked(ctx: &Ctx, lock: &HeldLock) -> anyhow::Result<u8> {
    {
        let resting = resting_weights(ctx, lock).await?;
        let lb_cfg = &ctx.cfg.raw.load_balancer;
        if lb_cfg.kind == config::LbKind::Nginx {
            let include = ctx.cfg.resolve(
                lb_cfg
                    .include_file
                    .as_deref()
                    .expect("checked: include_file is set"),
            );
            let location = lb_cfg.location_include.as_deref().map(|l| ctx.cfg.resolve(l));
            if include.exists() && location.as_ref().is_none_or(|l| l.exists()) {
                ctx.say(format!("{}: exists, left as it is", include.display()));
            } else {
                let nginx = wire::nginx(&ctx.cfg)?;
                let installed = match &resting {
                    Some(r) => nginx.install_with_weights(&r.weights).await,
                    None => nginx.install().await,
                };
                if let Err(e) = installed {
                    eprintln!(
                        "deploykit: error: could not create the nginx upstream file {}: {e}",
                        include.display()
                    );
                    return Ok(exit::UNKNOWN_STATE);
                }
                ctx.say(format!(
                    "{}: written with {}, accepted by `nginx -t`; start or reload nginx to use it",
                    include.display(),
                    in_rotation(ctx, resting.as_ref())
                ));
                if let Some(l) = &location {
                    ctx.say(format!(
                        "{}: written (proxy_pass through deploykit's routing); include it in the proxying location",
                        l.display()
                    ));
                }
            }
        }
        let lb = wire::load_balancer(&ctx.cfg, &ctx.state)?;
        if lb_cfg.kind == config::LbKind::Simulated && !crate::sim::lb_state_exists(ctx.state.root()) {
            if let Some(r) = &resting {
                lb.set_weights(&r.weights).await?;
                ctx.say(format!("simulated load balancer: {}", in_rotation(ctx, Some(r))));
            }
        }
        let t = ctx.cfg.raw.timeouts.load_balancer.0;
        let checked = match tokio::time::timeout(t, lb.preflight()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {:.1}s", t.as_secs_f64())),
        };
        match checked {
            Ok(()) => {
                if ctx.g.json {
                    outln!(
                        "{}",
                        serde_json::json!({"ready": true, "load_balancer": lb.name()})
                    );
                } else {
                    ctx.say(format!("load balancer {}: ready for deploykit", lb.name()));
                }
                Ok(exit::SUCCESS)
            }
            Err(e) => {
                if ctx.g.json {
                    outln!(
                        "{}",
                        serde_json::json!({"ready": false, "load_balancer": lb.name(), "error": e})
                    );
                }
                eprintln!("deploykit: error: load balancer {} is not ready: {e}", lb.name());
                Ok(exit::UNKNOWN_STATE)
            }
        }
    }
}
