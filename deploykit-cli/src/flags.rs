//! `deploykit flags …`: list, get, set, validate, evaluate, kill and serve
//! a flagd flag file. Each subcommand wires `deploykit::flags` to the
//! terminal; changes go through `FlagStore` (validated, atomic, journaled).

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use deploykit::flags::{Context, FlagChange, FlagChangeKind, FlagError, FlagSet, FlagStore};
use deploykit::state::StateDir;
use serde_json::{json, Value};

use crate::cmd::Global;
use crate::config;
use crate::exit;
use crate::notify::{FlagNotice, Notifier};

/// `deploykit flags`.
#[derive(Debug, Args)]
pub(crate) struct FlagsArgs {
    /// The flagd flag file (default: `[flags] file` of deploykit.toml, else
    /// `flags.json`).
    #[arg(long, env = "DEPLOYKIT_FLAGS_FILE", global = true)]
    file: Option<PathBuf>,
    #[command(subcommand)]
    command: FlagsCommand,
}

#[derive(Debug, Subcommand)]
enum FlagsCommand {
    /// Every flag: state, default variant, variants, targeting.
    List,
    /// One flag's definition, as in the file.
    Get {
        /// The flag.
        flag: String,
    },
    /// Change a flag (validated as a whole file first, atomic, journaled).
    Set(SetArgs),
    /// Check a flag file; exits 2 with every problem (flag and JSON path).
    Validate {
        /// The file to check (default: the flag file).
        path: Option<PathBuf>,
    },
    /// Evaluate a flag for a context, as an OpenFeature client would.
    Evaluate {
        /// The flag.
        flag: String,
        /// Context attributes: `key=text`, or `key:=json` for numbers,
        /// booleans and objects (`age:=42`). `targetingKey=…` sets the
        /// targeting key.
        #[arg(long = "context", short = 'C', value_name = "KEY=VALUE")]
        context: Vec<String>,
    },
    /// The kill switch: everyone gets the flag's safe variant, at once.
    Kill {
        /// The flag.
        flag: String,
        /// Why (journaled and notified).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Roll a variant out stage by stage, judged by the canary analysis on
    /// `[metrics]` per variant; a breach kills the flag.
    Rollout(RolloutArgs),
    /// Serve the flag file over OFREP (OpenFeature Remote Evaluation
    /// Protocol), reloading it when it changes.
    Serve(crate::ofrep::ServeArgs),
}

#[derive(Debug, Args)]
struct RolloutArgs {
    /// The flag.
    flag: String,
    /// The variant rolled out.
    #[arg(long)]
    variant: String,
    /// Its share at each stage, in percent.
    #[arg(long, value_delimiter = ',', default_value = "5,25,50,100")]
    stages: Vec<u8>,
    /// How long each stage is held and watched, e.g. 5m.
    #[arg(long, default_value = "5m")]
    stage_duration: String,
    /// Time between checks, e.g. 30s: a breach kills the flag within one.
    #[arg(long, default_value = "30s")]
    interval: String,
}

#[derive(Debug, Args)]
struct SetArgs {
    /// The flag.
    flag: String,
    /// Make this variant the default.
    #[arg(long)]
    default: Option<String>,
    /// Enable the flag.
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    /// Disable the flag (clients use their own default).
    #[arg(long)]
    disable: bool,
    /// Replace the targeting rule (JSONLogic, or `@file.json`).
    #[arg(long, conflicts_with = "no_targeting")]
    targeting: Option<String>,
    /// Remove the targeting rule.
    #[arg(long)]
    no_targeting: bool,
    /// Serve VARIANT to PERCENT % of targeting keys, the safe variant to
    /// the rest (`on=25`).
    #[arg(long, value_name = "VARIANT=PERCENT")]
    split: Option<String>,
    /// Create or replace the whole flag definition (JSON, or `@file.json`).
    #[arg(long)]
    definition: Option<String>,
    /// Why (journaled).
    #[arg(long)]
    reason: Option<String>,
}

/// Where the flag file, its journal and notifications come from.
pub(crate) struct FlagsCtx {
    pub(crate) store: FlagStore,
    pub(crate) app: String,
    notifier: Option<Notifier>,
    json: bool,
    quiet: bool,
}

impl FlagsCtx {
    /// With a deploykit.toml: `[flags] file`, the journal in the state
    /// directory and its webhooks. Without one: `flags.json` and a journal
    /// in `.deploykit/` beside it.
    pub(crate) fn load(g: &Global, file: Option<PathBuf>) -> anyhow::Result<Self> {
        let cfg = if g.config.exists() {
            Some(config::load(&g.config)?)
        } else {
            None
        };
        let file = match (file, &cfg) {
            (Some(f), _) => f,
            (None, Some(c)) => c.resolve(c.raw.flags.file.as_deref().unwrap_or("flags.json")),
            (None, None) => PathBuf::from("flags.json"),
        };
        let (journal, app, notifier) = match &cfg {
            Some(c) => {
                let state = StateDir::at(c.state_base(), &c.raw.app)?;
                (
                    flag_journal(&state),
                    c.raw.app.clone(),
                    Some(Notifier::new(&c.raw.notifications)),
                )
            }
            None => {
                let dir = file
                    .parent()
                    .filter(|p| !p.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                (
                    dir.join(".deploykit").join("flags.jsonl"),
                    "flags".to_owned(),
                    None,
                )
            }
        };
        Ok(Self {
            store: FlagStore::new(file, journal),
            app,
            notifier,
            json: g.json,
            quiet: g.quiet,
        })
    }

    async fn notify(&self, notice: FlagNotice) {
        if let Some(n) = &self.notifier {
            n.send_flag(&notice).await;
        }
    }
}

/// The change journal of the flags of `state`'s application.
pub(crate) fn flag_journal(state: &StateDir) -> PathBuf {
    state.root().join("flags.jsonl")
}

/// Who changes a flag: the user and the host.
pub(crate) fn who() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("{user}@{}", deploykit::state::host_name())
}

pub(crate) fn run(g: Global, args: FlagsArgs) -> anyhow::Result<u8> {
    let ctx = FlagsCtx::load(&g, args.file)?;
    match args.command {
        FlagsCommand::List => list(&ctx),
        FlagsCommand::Get { flag } => get(&ctx, &flag),
        FlagsCommand::Validate { path } => validate(&ctx, path.as_deref()),
        FlagsCommand::Evaluate { flag, context } => evaluate(&ctx, &flag, &context),
        FlagsCommand::Set(a) => set(&ctx, a),
        FlagsCommand::Kill { flag, reason } => kill(&ctx, flag, reason),
        FlagsCommand::Serve(a) => crate::ofrep::serve(&ctx, a),
        FlagsCommand::Rollout(a) => rollout(&g, &ctx, a),
    }
}

fn list(ctx: &FlagsCtx) -> anyhow::Result<u8> {
    let set = ctx.store.load()?;
    for p in set.problems() {
        eprintln!("deploykit: warning: {p}");
    }
    if !ctx.json {
        outln!(
            "{:<28} {:<9} {:<12} {:<10} variants",
            "flag",
            "state",
            "default",
            "targeting"
        );
    }
    for f in set.flags() {
        let variants: Vec<&str> = f.variants().keys().map(String::as_str).collect();
        if ctx.json {
            outln!(
                "{}",
                json!({
                    "key": f.key(),
                    "state": f.state(),
                    "defaultVariant": f.default_variant(),
                    "safeVariant": f.safe_variant(),
                    "variants": f.variants(),
                    "targeting": f.has_targeting(),
                })
            );
        } else {
            outln!(
                "{:<28} {:<9} {:<12} {:<10} {}",
                f.key(),
                if f.state() == deploykit::flags::FlagState::Enabled {
                    "enabled"
                } else {
                    "disabled"
                },
                f.default_variant().unwrap_or("-"),
                if f.has_targeting() { "yes" } else { "no" },
                variants.join(", ")
            );
        }
    }
    Ok(exit::SUCCESS)
}

fn get(ctx: &FlagsCtx, key: &str) -> anyhow::Result<u8> {
    let set = ctx.store.load()?;
    let flag = set
        .get(key)
        .ok_or_else(|| FlagError::UnknownFlag { key: key.to_owned() })?;
    if ctx.json {
        outln!("{}", flag.raw());
    } else {
        outln!("{}", serde_json::to_string_pretty(flag.raw())?);
    }
    Ok(exit::SUCCESS)
}

fn validate(ctx: &FlagsCtx, path: Option<&Path>) -> anyhow::Result<u8> {
    let path = path.unwrap_or(ctx.store.file());
    let text = std::fs::read_to_string(path).map_err(|source| FlagError::Io {
        action: "reading the flag file",
        path: path.to_owned(),
        source,
    })?;
    let problems = match FlagSet::parse(&text) {
        Ok(set) => set.problems().to_vec(),
        Err(FlagError::Invalid(p)) => p,
        Err(e) => {
            let e = anyhow::Error::from(e).context(format!("{}", path.display()));
            return Err(e);
        }
    };
    if ctx.json {
        let list: Vec<Value> = problems
            .iter()
            .map(|p| json!({ "flag": p.flag, "path": p.path, "message": p.kind.to_string() }))
            .collect();
        outln!(
            "{}",
            json!({ "file": path.display().to_string(), "valid": problems.is_empty(), "problems": list })
        );
    } else {
        for p in &problems {
            eprintln!("deploykit: error: {}: {p}", path.display());
        }
        if problems.is_empty() && !ctx.quiet {
            outln!("{}: valid", path.display());
        }
    }
    Ok(if problems.is_empty() {
        exit::SUCCESS
    } else {
        exit::BAD_INPUT
    })
}

/// Parses `key=text` / `key:=json` pairs into a context.
pub(crate) fn parse_context(pairs: &[String]) -> Result<Context, deploykit::Error> {
    let mut ctx = Context::new();
    for pair in pairs {
        if let Some((k, v)) = pair.split_once(":=") {
            let value: Value = serde_json::from_str(v).map_err(|e| {
                deploykit::Error::invalid(
                    "--context",
                    format!("`{pair}`: the value after `:=` is not JSON ({e}); use `{k}={v}` for text"),
                )
            })?;
            ctx.insert(k.to_owned(), value);
        } else if let Some((k, v)) = pair.split_once('=') {
            ctx.insert(k.to_owned(), Value::String(v.to_owned()));
        } else {
            return Err(deploykit::Error::invalid(
                "--context",
                format!("`{pair}` is not `key=value` (or `key:=json`)"),
            ));
        }
    }
    Ok(ctx)
}

fn evaluate(ctx: &FlagsCtx, key: &str, pairs: &[String]) -> anyhow::Result<u8> {
    let context = parse_context(pairs)?;
    let set = ctx.store.load()?;
    let e = set.evaluate(key, &context);
    if ctx.json {
        outln!("{}", crate::ofrep::evaluation_json(&e));
    } else if let Some(err) = &e.error {
        eprintln!("deploykit: error: {} ({})", err.detail, err.code.as_str());
    } else {
        let value = e
            .value
            .as_ref()
            .map_or_else(|| "(the caller's default)".to_owned(), ToString::to_string);
        outln!(
            "{key} = {value}  (variant {}, {})",
            e.variant.as_deref().unwrap_or("none"),
            e.reason.as_str()
        );
    }
    Ok(match &e.error {
        None => exit::SUCCESS,
        Some(err) if err.code == deploykit::flags::ErrorCode::FlagNotFound => exit::BAD_INPUT,
        Some(_) => exit::UNKNOWN_STATE,
    })
}

/// `text`, or the content of the file after `@`.
fn json_arg(field: &str, text: &str) -> anyhow::Result<Value> {
    let text = match text.strip_prefix('@') {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {field} from {path}"))?
        }
        None => text.to_owned(),
    };
    serde_json::from_str(&text).map_err(|e| deploykit::Error::invalid(field, format!("not JSON: {e}")).into())
}

fn set(ctx: &FlagsCtx, a: SetArgs) -> anyhow::Result<u8> {
    let mut kinds = Vec::new();
    if let Some(d) = a.definition.as_deref() {
        kinds.push(FlagChangeKind::Put {
            definition: json_arg("--definition", d)?,
        });
    }
    if a.enable || a.disable {
        kinds.push(FlagChangeKind::State { enabled: a.enable });
    }
    if let Some(v) = a.default {
        kinds.push(FlagChangeKind::Default { variant: v });
    }
    if let Some(t) = a.targeting.as_deref() {
        kinds.push(FlagChangeKind::Targeting {
            rule: Some(json_arg("--targeting", t)?),
        });
    }
    if a.no_targeting {
        kinds.push(FlagChangeKind::Targeting { rule: None });
    }
    if let Some(s) = a.split.as_deref() {
        let bad = || {
            deploykit::Error::invalid(
                "--split",
                format!("`{s}` is not VARIANT=PERCENT with PERCENT from 0 to 100 (e.g. on=25)"),
            )
        };
        let (variant, percent) = s.split_once('=').ok_or_else(bad)?;
        let percent: u8 = percent.parse().ok().filter(|p| *p <= 100).ok_or_else(bad)?;
        kinds.push(FlagChangeKind::Split {
            variant: variant.to_owned(),
            percent,
        });
    }
    if kinds.is_empty() {
        return Err(deploykit::Error::invalid(
            "flags set",
            "nothing to change: give --default, --enable, --disable, --targeting, --no-targeting, --split or --definition",
        )
        .into());
    }
    for kind in kinds {
        let change = FlagChange {
            flag: a.flag.clone(),
            kind,
            who: who(),
            why: a.reason.clone(),
        };
        report(ctx, &change, ctx.store.apply(&change)?);
    }
    Ok(exit::SUCCESS)
}

fn report(ctx: &FlagsCtx, change: &FlagChange, record: Option<deploykit::flags::FlagChangeRecord>) {
    if ctx.json {
        outln!(
            "{}",
            json!({ "flag": change.flag, "action": change.kind.name(), "changed": record.is_some() })
        );
    } else if !ctx.quiet {
        match record {
            Some(_) => outln!("{}: {} (journaled)", change.flag, change.kind.name()),
            None => outln!(
                "{}: {}: already so, nothing written",
                change.flag,
                change.kind.name()
            ),
        }
    }
}

fn kill(ctx: &FlagsCtx, flag: String, reason: Option<String>) -> anyhow::Result<u8> {
    let change = FlagChange {
        flag: flag.clone(),
        kind: FlagChangeKind::Kill,
        who: who(),
        why: reason.clone(),
    };
    let record = ctx.store.apply(&change)?;
    if let Some(r) = &record {
        let variant = r
            .after
            .get("defaultVariant")
            .and_then(Value::as_str)
            .map(str::to_owned);
        crate::cmd::runtime()?.block_on(ctx.notify(FlagNotice {
            app: ctx.app.clone(),
            flag,
            action: "kill".into(),
            who: change.who.clone(),
            reason,
            variant,
        }));
    }
    report(ctx, &change, record);
    Ok(exit::SUCCESS)
}

fn rollout(g: &Global, ctx: &FlagsCtx, a: RolloutArgs) -> anyhow::Result<u8> {
    use deploykit::flags::{FlagRollout, RolloutEvent, RolloutOutcome};
    let cfg = config::load(&g.config)?;
    let Some(m) = &cfg.raw.metrics else {
        return Err(deploykit::Error::invalid(
            "metrics",
            "a flag rollout reads error rate and latency per variant: add a [metrics] section to deploykit.toml",
        )
        .into());
    };
    let mut b = deploykit::metrics::prometheus::Prometheus::builder(m.prometheus.clone());
    let f = &cfg.raw.flags;
    let pick = |flag: &Option<String>, metric: &Option<String>| {
        flag.as_deref()
            .map(|t| t.replace("{variant}", "{group}"))
            .or_else(|| metric.clone())
    };
    if let Some(q) = pick(&f.error_rate, &m.error_rate) {
        b = b.error_rate(q);
    }
    if let Some(q) = pick(&f.latency_p99, &m.latency_p99) {
        b = b.latency_p99(q);
    }
    if let Some(q) = pick(&f.request_count, &m.request_count) {
        b = b.request_count(q);
    }
    if let Some(t) = m.timeout {
        b = b.timeout(t.0);
    }
    let metrics = b.build()?;
    let r = FlagRollout {
        flag: a.flag.clone(),
        variant: a.variant.clone(),
        stages: a.stages,
        stage_duration: deploykit::parse_duration("--stage-duration", &a.stage_duration)?,
        interval: deploykit::parse_duration("--interval", &a.interval)?,
        rules: Default::default(),
        who: format!("rollout by {}", who()),
    };
    let json_out = ctx.json;
    let outcome = crate::cmd::runtime()?.block_on(async {
        let cancel = tokio_util::sync::CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            c.cancel();
        });
        let outcome = r
            .run(&ctx.store, &metrics, &cancel, |e| match (&e, json_out) {
                (RolloutEvent::Stage { stage, percent }, false) => {
                    outln!("stage {stage}: `{}` at {percent} %", r.variant)
                }
                (RolloutEvent::Check { outcome, .. }, false) => outln!("  check: {outcome}"),
                (RolloutEvent::Killed { reason }, false) => outln!("killed: {reason}"),
                (RolloutEvent::Stage { stage, percent }, true) => outln!(
                    "{}",
                    json!({ "event": "stage", "stage": stage, "percent": percent })
                ),
                (RolloutEvent::Check { stage, outcome }, true) => outln!(
                    "{}",
                    json!({ "event": "check", "stage": stage, "result": outcome })
                ),
                (RolloutEvent::Killed { reason }, true) => {
                    outln!("{}", json!({ "event": "killed", "reason": reason }))
                }
                _ => {}
            })
            .await?;
        let reason = match &outcome {
            RolloutOutcome::Killed { reason, .. } => Some(reason.clone()),
            RolloutOutcome::Cancelled { stage } => Some(format!("cancelled at stage {stage}")),
            _ => None,
        };
        if let Some(reason) = reason {
            let safe = ctx
                .store
                .load()
                .ok()
                .and_then(|s| s.get(&r.flag).and_then(|f| f.safe_variant().map(str::to_owned)));
            ctx.notify(FlagNotice {
                app: ctx.app.clone(),
                flag: r.flag.clone(),
                action: "rollout-killed".into(),
                who: r.who.clone(),
                reason: Some(reason),
                variant: safe,
            })
            .await;
        }
        Ok::<_, anyhow::Error>(outcome)
    })?;
    Ok(match outcome {
        RolloutOutcome::Completed => {
            if !json_out {
                outln!("rollout of `{}` complete: 100 % of the last stage", a.variant);
            }
            exit::SUCCESS
        }
        _ => exit::FAILED_ROLLED_BACK,
    })
}

/// Exit code of a flag error: the file or the request is at fault (2), or
/// the disk is (3).
pub(crate) fn error_code(e: &FlagError) -> u8 {
    match e {
        FlagError::Io { .. } => exit::UNKNOWN_STATE,
        _ => exit::BAD_INPUT,
    }
}

/// A journaled flag change as a `history --json` line (`"kind": "flag"`
/// tells it from a deployment).
pub(crate) fn history_json(c: &deploykit::flags::FlagChangeRecord) -> Value {
    json!({
        "kind": "flag",
        "at_ms": c.at_ms,
        "who": c.who,
        "flag": c.flag,
        "action": c.kind.name(),
        "change": c.kind,
        "why": c.why,
        "before": c.before,
        "after": c.after,
    })
}

/// The flag changes section of `deploykit history`.
pub(crate) fn print_history(changes: &[deploykit::flags::FlagChangeRecord]) {
    if changes.is_empty() {
        return;
    }
    outln!("");
    outln!("flag changes:");
    outln!(
        "{:<20} {:<24} {:<20} {:<9} {:<22} why",
        "when (UTC)",
        "flag",
        "who",
        "action",
        "now"
    );
    for c in changes {
        let now = match &c.after {
            Value::Null => "removed".to_owned(),
            after => {
                let default = after.get("defaultVariant").and_then(Value::as_str).unwrap_or("-");
                let state = after.get("state").and_then(Value::as_str).unwrap_or("?");
                let rule = if after
                    .get("targeting")
                    .is_some_and(|t| t.as_object().is_some_and(|o| !o.is_empty()))
                {
                    "+rule"
                } else {
                    ""
                };
                format!("{} {default}{rule}", state.to_lowercase())
            }
        };
        outln!(
            "{:<20} {:<24} {:<20} {:<9} {:<22} {}",
            deploykit::state::utc_datetime(c.at_ms / 1000),
            c.flag,
            c.who,
            c.kind.name(),
            now,
            c.why.as_deref().unwrap_or("")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_pairs() {
        let c =
            parse_context(&["targetingKey=u1".into(), "age:=42".into(), "v=1.2.3".into()]).expect("parses");
        assert_eq!(c["targetingKey"], "u1");
        assert_eq!(c["age"], 42);
        assert_eq!(c["v"], "1.2.3");
        assert!(parse_context(&["oops".into()]).is_err());
        assert!(parse_context(&["n:=nope".into()]).is_err());
    }
}

/// The flag switch of a deployment: the configured flag file, journaled
/// like `deploykit flags`, and a kill notified like `deploykit flags kill`.
#[derive(Debug)]
pub(crate) struct DeployFlags {
    store: FlagStore,
    app: String,
    notifier: Notifier,
}

impl DeployFlags {
    pub(crate) fn new(cfg: &config::Loaded, state: &StateDir) -> Self {
        let file = cfg.resolve(cfg.raw.flags.file.as_deref().unwrap_or("flags.json"));
        Self {
            store: FlagStore::new(file, flag_journal(state)),
            app: cfg.raw.app.clone(),
            notifier: Notifier::new(&cfg.raw.notifications),
        }
    }
}

#[async_trait::async_trait]
impl deploykit::flags::FlagSwitch for DeployFlags {
    fn check(&self, flag: &str, variant: &str) -> Result<(), FlagError> {
        self.store.check(flag, variant)
    }

    async fn share(&self, flag: &str, variant: &str, percent: u8, deployment: &str) -> Result<(), FlagError> {
        self.store.share(flag, variant, percent, deployment).await
    }

    async fn kill(&self, flag: &str, deployment: &str, why: &str) -> Result<(), FlagError> {
        self.store.kill(flag, deployment, why).await?;
        let safe = self
            .store
            .load()
            .ok()
            .and_then(|s| s.get(flag).and_then(|f| f.safe_variant().map(str::to_owned)));
        self.notifier
            .send_flag(&FlagNotice {
                app: self.app.clone(),
                flag: flag.to_owned(),
                action: "kill".into(),
                who: format!("deploy {deployment}"),
                reason: Some(why.to_owned()),
                variant: safe,
            })
            .await;
        Ok(())
    }
}
