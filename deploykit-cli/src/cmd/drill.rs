//! `deploykit drill` and `deploy --drill`: a canary of the release the
//! fleet runs (or of a named one) broken on purpose, judged by
//! `deploykit::chaos::drill`; a client probe counts what users would have
//! seen.

use std::sync::atomic::{AtomicU64, Ordering};

use deploykit::chaos::drill::{default_entry, DrillRefusal};
use deploykit::chaos::Fault;
use deploykit::Canary;

use super::*;

/// `deploykit drill`.
#[derive(Debug, Args)]
pub(crate) struct DrillArgs {
    /// The release to deploy as the broken canary; default the release the
    /// stable instances run now (nothing changes for users either way).
    release: Option<String>,
    /// The fault injected when the file has no [[strategy.canary.chaos]]
    /// entry (default kill; http-error goes through a fault proxy the
    /// load balancer is pointed at while it lasts).
    #[arg(long, value_enum, value_name = "KIND")]
    fault: Option<DrillFault>,
    /// When that fault starts into stage 1 (default three check intervals,
    /// at most half the stage, so a check can pass first).
    #[arg(long, value_name = "DURATION", value_parser = duration("--after"))]
    after: Option<Duration>,
    /// The rollback must be done this long after the injection (default the
    /// rest of the stage plus drain_timeout plus 30s).
    #[arg(long, value_name = "DURATION", value_parser = duration("--within"))]
    within: Option<Duration>,
    /// Send GET requests to URL (your balancer's address) 20 times a second
    /// during the drill and report how many failed.
    #[arg(long, value_name = "URL")]
    probe: Option<String>,
    /// Serve the Prometheus exposition of the journals, and the fault
    /// proxies' counters, at http://ADDR/metrics while the drill runs
    /// (docs/metrics.md).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// The faults a drill can inject by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DrillFault {
    /// SIGKILL of the canary's process (local, SSH and systemd instances;
    /// simulated ones stop).
    Kill,
    /// SIGSTOP of the canary's process (a hang).
    Pause,
    /// Every request to the canary answered 503 by a fault proxy.
    HttpError,
}

impl DrillFault {
    fn fault(self) -> Fault {
        match self {
            DrillFault::Kill => Fault::Kill,
            DrillFault::Pause => Fault::Pause,
            DrillFault::HttpError => Fault::HttpError {
                status: 503,
                percent: 100,
            },
        }
    }
}

fn duration(flag: &'static str) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |s| deploykit::parse_duration(flag, s).map_err(|e| e.to_string())
}

/// What a drill run needs beyond a deployment's settings.
pub(super) struct DrillRun {
    /// The canary, its chaos entries filled in.
    pub(super) canary: Canary,
    /// The drill deploys the release stable runs now (no promotion).
    pub(super) current: bool,
    /// The client probe's URL.
    pub(super) probe: Option<reqwest::Url>,
}

impl DrillRun {
    /// The drill of the file's canary: its chaos entries, or the default
    /// one built from the flags. Refuses flags that the entries would
    /// ignore and entries the canary refuses, before anything is touched.
    fn new(ctx: &Ctx, args: &DrillArgs) -> anyhow::Result<Self> {
        let mut canary = ctx.cfg.raw.canary();
        if canary.chaos.is_empty() {
            let fault = args.fault.unwrap_or(DrillFault::Kill).fault();
            let mut entry = default_entry(&canary, fault, args.after);
            if args.within.is_some() {
                entry.within = args.within;
            }
            canary.chaos = vec![entry];
        } else {
            for (flag, set) in [
                ("--fault", args.fault.is_some()),
                ("--after", args.after.is_some()),
                ("--within", args.within.is_some()),
            ] {
                if set {
                    return Err(deploykit::Error::invalid(
                        flag,
                        "sets the default fault, but [[strategy.canary.chaos]] has entries and the drill \
                         injects those; drop the flag or change the entries",
                    )
                    .into());
                }
            }
        }
        canary.validate().map_err(|e| rename_chaos(e, args))?;
        let probe = args.probe.as_deref().map(probe_url).transpose()?;
        Ok(Self {
            canary,
            current: args.release.is_none(),
            probe,
        })
    }

    /// Before anything is touched: a setup whose gate can never fire fails
    /// the drill (exit 5), saying why.
    pub(super) async fn preflight(&self, exec: &Executor) -> Option<DrillRefusal> {
        let metrics = exec.metrics()?;
        deploykit::chaos::drill::preflight(metrics.as_ref(), &self.canary, exec.timeouts().query)
            .await
            .err()
    }
}

/// The default entry's keys are the flags' (`chaos[0].after` is `--after`).
fn rename_chaos(e: deploykit::Error, args: &DrillArgs) -> deploykit::Error {
    match e {
        deploykit::Error::InvalidInput { field, message }
            if field == "chaos[0].after" && args.after.is_some() =>
        {
            deploykit::Error::invalid("--after", message)
        }
        other => other,
    }
}

fn probe_url(s: &str) -> anyhow::Result<reqwest::Url> {
    match reqwest::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(u),
        _ => Err(deploykit::Error::invalid(
            "--probe",
            format!("{s:?} is not an http(s) URL; give your balancer's address, e.g. http://127.0.0.1:8080/"),
        )
        .into()),
    }
}

/// `deploykit drill [RELEASE]`.
pub(crate) fn drill(ctx: Ctx, args: DrillArgs) -> anyhow::Result<u8> {
    if ctx.cfg.is_multi_region() && ctx.region.is_none() {
        return Err(deploykit::Error::invalid(
            "--region",
            "is needed: a drill breaks one region's canary; pass --region NAME",
        )
        .into());
    }
    let run = DrillRun::new(&ctx, &args)?;
    let release = args
        .release
        .as_deref()
        .map(|r| ReleaseId::new(r).map_err(|e| rename(e, "release")))
        .transpose()?;
    if let Some(r) = &release {
        wire::check_release(&ctx.cfg, r)?;
    }
    let metrics = args
        .metrics_listen
        .map(|addr| crate::metrics_http::bind("metrics-listen", addr))
        .transpose()?;
    let rt = runtime()?;
    rt.block_on(async move {
        let _metrics = metrics.map(|l| serve_metrics(&ctx, l));
        let purpose = match &release {
            Some(r) => format!("drill {r}"),
            None => "drill".to_owned(),
        };
        let lock = match lock(&ctx, &purpose).await? {
            Ok(l) => l,
            Err(code) => return Ok(code),
        };
        let claimer = Claimer {
            lock: &lock,
            take_over: false,
        };
        let code = async {
            if let Some(code) = refuse_interrupted(&ctx).await? {
                return Ok(code);
            }
            locked(&ctx, &claimer, run, release).await
        }
        .await;
        lock.release().await;
        code
    })
}

/// The drill `deploy --drill` runs first: the current release, the file's
/// entries or the default kill.
pub(super) async fn before_deploy(
    ctx: &Ctx,
    claimer: &Claimer<'_>,
    release: &ReleaseId,
) -> anyhow::Result<u8> {
    let args = DrillArgs {
        release: None,
        fault: None,
        after: None,
        within: None,
        probe: None,
        metrics_listen: None,
    };
    let run = DrillRun::new(ctx, &args)?;
    ctx.say("drill first: the current release as a canary, broken on purpose");
    let code = locked(ctx, claimer, run, None).await?;
    if code != exit::SUCCESS {
        eprintln!(
            "deploykit: error: the drill did not pass, so {release} was not deployed; nothing of that deployment was touched"
        );
        return Ok(if code == exit::UNKNOWN_STATE {
            code
        } else {
            exit::CHAOS_FAILED
        });
    }
    ctx.say(format!("drill passed: deploying {release}"));
    Ok(exit::SUCCESS)
}

/// A drill under the held lock: of `release`, or of the current release
/// (read from the instances).
async fn locked(
    ctx: &Ctx,
    claimer: &Claimer<'_>,
    run: DrillRun,
    release: Option<ReleaseId>,
) -> anyhow::Result<u8> {
    let release = match release {
        Some(r) => r,
        None => {
            let fleet = wire::fleet(
                &ctx.cfg,
                &ctx.state,
                ctx.backend.live_store(Some(claimer.lock)),
                None,
            )?;
            let snapshot = fleet.executor.snapshot().await?;
            run.canary.current_release(&snapshot)?
        }
    };
    run_deploy(
        ctx,
        RunKind::Deploy,
        Start::Drill(Box::new(run)),
        release,
        claimer,
    )
    .await
}

/// An interrupted deployment must be finished or undone before anything
/// else runs.
pub(super) async fn refuse_interrupted(ctx: &Ctx) -> anyhow::Result<Option<u8>> {
    if let Some(j) = ctx.backend.latest().await?.filter(|j| !j.is_finished()) {
        eprintln!(
            "deploykit: error: the {} {} of {} was interrupted and the fleet may run a mix of releases; \
             run `deploykit deploy --resume` to finish it or `deploykit rollback` to undo it first (`deploykit status` shows where it stopped)",
            j.header.strategy, j.header.deployment, j.header.release
        );
        return Ok(Some(exit::UNKNOWN_STATE));
    }
    Ok(None)
}

/// What the client probe saw.
#[derive(Debug, Default, serde::Serialize)]
pub(super) struct ProbeStats {
    /// The URL probed.
    pub(super) url: String,
    /// Requests sent.
    pub(super) requests: u64,
    /// Requests that got no answer within 2 s, or a 5xx.
    pub(super) failed: u64,
}

/// Sends a GET to `url` every 50 ms until stopped, counting failures.
pub(super) struct Probe {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<ProbeStats>,
}

impl Probe {
    pub(super) fn start(url: reqwest::Url) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building the probe's HTTP client")?;
        let stop = CancellationToken::new();
        let requests = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let token = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    _ = tick.tick() => {}
                }
                requests.fetch_add(1, Ordering::Relaxed);
                let ok =
                    matches!(client.get(url.clone()).send().await, Ok(r) if !r.status().is_server_error());
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
            ProbeStats {
                url: url.to_string(),
                requests: requests.load(Ordering::Relaxed),
                failed: failed.load(Ordering::Relaxed),
            }
        });
        Ok(Self { stop, task })
    }

    pub(super) async fn finish(self) -> ProbeStats {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

impl std::fmt::Display for ProbeStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client probe: {} requests to {}, {} failed",
            self.requests, self.url, self.failed
        )?;
        if self.requests > 0 {
            write!(f, " ({:.1}%)", self.failed as f64 * 100.0 / self.requests as f64)?;
        }
        Ok(())
    }
}
