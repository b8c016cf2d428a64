//! `deploykit watch`: deploy on push. The repository is followed with the
//! `git` command line (any path or URL the user's git can fetch, with its
//! credential helpers and SSH configuration); each new commit of a branch
//! that a `[[gitops.branches]]` rule matches becomes a release, is deployed
//! with that rule's strategy through the same code path as `deploykit
//! deploy` (so they share the lock), and is checked by the `after` gates.
//! What happened to each commit is recorded in `<state>/gitops/commits.json`
//! so a restarted watcher never deploys a commit twice. The fields are in
//! `docs/gitops.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use deploykit::integration::{GateFailure, GateRunner};
use deploykit::regions::RegionName;
use deploykit::state::SourceCommit;
use deploykit::{Backend, ReleaseId};
use serde::{Deserialize, Serialize};

use crate::cmd::{self, CommitDeploy, Ctx, DeployArgs, Global};
use crate::config::{Config, Dur, StrategyKind};
use crate::exit;
use crate::gitops_webhook::{self, Secret};

/// `[gitops]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GitopsConfig {
    /// A path (relative to the configuration file) or a URL git can fetch.
    pub(crate) repository: String,
    #[serde(default = "default_interval")]
    pub(crate) interval: Dur,
    /// Up to this much is added to each wait, so watchers started together
    /// do not poll the server together. Default a tenth of `interval`.
    #[serde(default)]
    pub(crate) jitter: Option<Dur>,
    /// A build command (program and arguments, no shell) run in a clean
    /// export of the commit; it must produce `build_output`.
    #[serde(default)]
    pub(crate) build: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) build_output: Option<String>,
    #[serde(default)]
    pub(crate) build_timeout: Option<Dur>,
    #[serde(default)]
    pub(crate) branches: Vec<BranchRule>,
    #[serde(default)]
    pub(crate) gates: Vec<GateConfig>,
    /// The name of the environment variable holding the webhook secret.
    #[serde(default)]
    pub(crate) webhook_secret_env: Option<String>,
    /// A file holding the webhook secret.
    #[serde(default)]
    pub(crate) webhook_secret_file: Option<String>,
}

fn default_interval() -> Dur {
    Dur(Duration::from_secs(60))
}

/// One `[[gitops.branches]]` rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BranchRule {
    pub(crate) pattern: String,
    pub(crate) strategy: StrategyKind,
    /// In a file with `[[regions]]`: the regions a matching commit deploys
    /// to, in the rollout's waves; every region when unset.
    #[serde(default)]
    pub(crate) regions: Option<Vec<String>>,
}

/// When a gate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum GateWhen {
    /// Once the deployment succeeded; a failure rolls it back.
    #[default]
    After,
    /// Against the instances about to be promoted, before any live traffic
    /// reaches them: blue-green's idle environment before the switch, the
    /// canary before its first stage (rolling and recreate have no such
    /// moment: they skip these gates).
    BeforePromotion,
}

/// One `[[gitops.gates]]` command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GateConfig {
    pub(crate) name: String,
    pub(crate) command: Vec<String>,
    #[serde(default)]
    pub(crate) when: GateWhen,
    #[serde(default)]
    pub(crate) timeout: Option<Dur>,
}

fn inv(field: impl Into<String>, message: impl Into<String>) -> deploykit::Error {
    deploykit::Error::invalid(field, message)
}

/// Whether `p` may be a branch pattern: a git ref name in which `*` stands
/// for any run of characters (`/` included).
fn check_pattern(field: &str, p: &str) -> deploykit::Result<()> {
    let bad = p.is_empty()
        || p.len() > 255
        || p.starts_with(['-', '/', '.'])
        || p.ends_with(['/', '.'])
        || p.ends_with(".lock")
        || p.contains("..")
        || p.contains("//")
        || p.contains("@{")
        || p.chars()
            .any(|c| c.is_control() || c.is_whitespace() || "~^:?[\\".contains(c));
    if bad {
        return Err(inv(
            field,
            format!(
                "`{}` is not a branch pattern: use a branch name such as \"main\" or \"release/*\" (`*` matches any characters, `/` included; no spaces, `..`, `~^:?[\\`, no leading `-`, `/` or `.`)",
                p.escape_default()
            ),
        ));
    }
    Ok(())
}

/// Whether `branch` is a branch name deploykit acts on (from the remote):
/// the same rules as a pattern, without `*`.
fn valid_branch(branch: &str) -> bool {
    !branch.contains('*') && check_pattern("branch", branch).is_ok()
}

/// `*` matches any run of characters; everything else matches itself.
pub(crate) fn matches(pattern: &str, branch: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == branch;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !branch.starts_with(first) || branch.len() < first.len() + last.len() || !branch.ends_with(last) {
        return false;
    }
    let mut rest = &branch[first.len()..branch.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

/// The checks of `[gitops]`, made when the file is loaded.
pub(crate) fn check(g: &GitopsConfig, c: &Config) -> deploykit::Result<()> {
    let repo = g.repository.trim();
    if repo.is_empty() || repo.starts_with('-') || repo.chars().any(char::is_control) {
        return Err(inv(
            "gitops.repository",
            "give a path or a URL git can fetch (not empty, not starting with '-')",
        ));
    }
    if g.interval.0.is_zero() {
        return Err(inv("gitops.interval", "must be more than 0, e.g. \"1m\""));
    }
    if c.releases.is_none() {
        return Err(inv(
            "releases",
            "[gitops] exports each commit to <releases>/<short commit>/: set releases = \"releases\" (a directory beside the file)",
        ));
    }
    match (&g.build, &g.build_output) {
        (Some(argv), Some(out)) => {
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err(inv("gitops.build", "give the program and its arguments, e.g. [\"make\", \"dist\"]"));
            }
            let p = Path::new(out);
            if out.is_empty()
                || p.is_absolute()
                || p.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(inv(
                    "gitops.build_output",
                    "give the directory the build produces, relative to the checkout, without `..` (e.g. \"dist\")",
                ));
            }
        }
        (Some(_), None) => {
            return Err(inv(
                "gitops.build_output",
                "missing: name the directory the build produces in the checkout (e.g. \"dist\"); it becomes the release",
            ))
        }
        (None, Some(_)) => {
            return Err(inv(
                "gitops.build_output",
                "is set without gitops.build: add the build command, or remove build_output to deploy the commit's files as they are",
            ))
        }
        (None, None) => {}
    }
    if g.branches.is_empty() {
        return Err(inv(
            "gitops.branches",
            "no rules: add a [[gitops.branches]] table with a pattern and a strategy, e.g. pattern = \"main\" strategy = \"rolling\"",
        ));
    }
    for (n, b) in g.branches.iter().enumerate() {
        check_pattern(&format!("gitops.branches[{n}].pattern"), &b.pattern)?;
        // A multi-region file's rules are checked against its regions by
        // `check_rule_regions`; its regions' copies have none.
        if b.regions.is_some() && c.regions.is_empty() {
            return Err(inv(
                format!("gitops.branches[{n}].regions"),
                "this file has no [[regions]]: remove regions (the rule deploys to the fleet of this file), or describe the regions with [[regions]] tables",
            ));
        }
    }
    let mut names = BTreeSet::new();
    for (n, gate) in g.gates.iter().enumerate() {
        deploykit::names::validate_name(&format!("gitops.gates[{n}].name"), &gate.name)?;
        if !names.insert(&gate.name) {
            return Err(inv(
                format!("gitops.gates[{n}].name"),
                format!(
                    "{} is used by an earlier gate; give every gate its own name",
                    gate.name
                ),
            ));
        }
        if gate.command.first().is_none_or(|p| p.is_empty()) {
            return Err(inv(
                format!("gitops.gates[{n}].command"),
                "give the program and its arguments, e.g. [\"./tests/integration.sh\"]",
            ));
        }
    }
    if let Some(name) = &g.webhook_secret_env {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(inv(
                "gitops.webhook_secret_env",
                "give the name of an environment variable ([A-Za-z0-9_]), e.g. \"DEPLOYKIT_WEBHOOK_SECRET\"",
            ));
        }
    }
    if g.webhook_secret_env.is_some() && g.webhook_secret_file.is_some() {
        return Err(inv(
            "gitops.webhook_secret_file",
            "set either webhook_secret_env or webhook_secret_file, not both",
        ));
    }
    Ok(())
}

/// The checks of the rules' `regions` in a file with `[[regions]]`: each
/// names a region of the file, at most once.
pub(crate) fn check_rule_regions(g: &GitopsConfig, names: &[RegionName]) -> deploykit::Result<()> {
    for (n, b) in g.branches.iter().enumerate() {
        let Some(regions) = &b.regions else { continue };
        let field = format!("gitops.branches[{n}].regions");
        if regions.is_empty() {
            return Err(inv(
                field,
                "is empty: name the regions this branch deploys to (e.g. [\"staging\"]), or remove regions to deploy to every region",
            ));
        }
        let known = names
            .iter()
            .map(RegionName::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut seen = BTreeSet::new();
        for r in regions {
            if !names.iter().any(|x| x.as_str() == r) {
                return Err(inv(
                    field,
                    format!(
                        "{} is not a region of this file; the regions are {known}",
                        r.escape_default()
                    ),
                ));
            }
            if !seen.insert(r) {
                return Err(inv(field, format!("{r} is named twice")));
            }
        }
    }
    Ok(())
}

/// `deploykit watch`.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Poll once, deploy what is new, and exit (for cron or CI).
    #[arg(long)]
    once: bool,
    /// Deploy again the head commits whose deployment or gate failed
    /// (each once per run of `watch`).
    #[arg(long)]
    retry_failed: bool,
    /// Receive GitHub/Gitea push webhooks on this address (e.g.
    /// 127.0.0.1:9000); a correctly signed one wakes the poller.
    #[arg(long, value_name = "ADDR", conflicts_with = "once")]
    webhook: Option<std::net::SocketAddr>,
}

/// What happened to a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Status {
    /// Deployed, and every gate passed.
    Deployed,
    /// The deployment failed (and was rolled back, or not started).
    Failed,
    /// Deployed, then a gate failed: rolled back.
    GateFailed,
    /// A newer commit of its branch came before it could be deployed.
    Skipped,
    /// No rule matches its branch.
    NotDeployed,
    /// Another watcher (or `deploykit deploy --commit`) sharing this
    /// state deployed it first: not deployed again.
    AlreadyDeployed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Deployed => "deployed",
            Status::Failed => "failed",
            Status::GateFailed => "gate failed",
            Status::Skipped => "skipped",
            Status::NotDeployed => "not deployed",
            Status::AlreadyDeployed => "already deployed",
        }
    }
}

/// A failed gate, with the end of its output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GateRecord {
    name: String,
    /// The exit code; `None` when killed (by its timeout or a signal).
    exit_code: Option<i32>,
    /// The last 4 KiB of its standard output and error, interleaved.
    output_tail: String,
}

/// One commit's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CommitRecord {
    branch: String,
    status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    strategy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    release: Option<String>,
    /// The run id of the deployment (`deploykit history`); in a file
    /// with `[[regions]]`, see `deployments`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    deployment: Option<String>,
    /// In a file with `[[regions]]`: the regions the commit was sent to,
    /// in the rollout's order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regions: Option<Vec<String>>,
    /// In a file with `[[regions]]`: each region's run id
    /// (`deploykit --region R history`), for the regions that ran.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    deployments: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    commit_time_s: Option<i64>,
    recorded_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gate: Option<GateRecord>,
}

/// `<state>/gitops/commits.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Records {
    version: u32,
    /// The last head of each branch that was acted on.
    heads: BTreeMap<String, String>,
    commits: BTreeMap<String, CommitRecord>,
}

impl Records {
    fn load(path: &Path) -> anyhow::Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is not a commit record deploykit can read; move it away to start over (every current head would be deployed again)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self {
                version: 1,
                ..Self::default()
            }),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self)?;
        deploykit::state::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
    }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

/// The `git` command line, never through a shell; prompts are off so a
/// missing credential fails instead of waiting for a terminal.
struct Git {
    /// The watcher's own bare repository, a cache of the watched one.
    cache: PathBuf,
    /// The watched repository, as git is given it.
    repo: String,
}

impl Git {
    fn cmd(&self) -> Command {
        let mut c = Command::new("git");
        c.env("GIT_TERMINAL_PROMPT", "0")
            .env_remove("GIT_DIR")
            .env_remove("GIT_WORK_TREE")
            .stdin(Stdio::null());
        c
    }

    fn in_cache(&self) -> Command {
        let mut c = self.cmd();
        c.arg("--git-dir").arg(&self.cache);
        c
    }

    fn output(mut c: Command, what: &str) -> anyhow::Result<String> {
        let out = c.output().with_context(|| {
            format!("{what}: cannot run git (is it installed? Debian: apt-get install git)")
        })?;
        if !out.status.success() {
            bail!(
                "{what}: git failed ({}): {}",
                out.status,
                tail(String::from_utf8_lossy(&out.stderr).trim(), 1000)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The head commit of every branch of the watched repository: one
    /// round trip, no objects transferred.
    fn heads(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut c = self.cmd();
        c.args(["ls-remote", "--heads"]).arg(&self.repo);
        let text = Self::output(c, "listing the branches of the repository")?;
        let mut out = BTreeMap::new();
        for line in text.lines() {
            let Some((sha, name)) = line.split_once('\t') else {
                continue;
            };
            let Some(branch) = name.strip_prefix("refs/heads/") else {
                continue;
            };
            if SourceCommit::new(sha, None).is_ok() && valid_branch(branch) {
                out.insert(branch.to_string(), sha.to_ascii_lowercase());
            } else {
                tracing::warn!(
                    "ignoring the branch {} (not a name deploykit acts on)",
                    branch.escape_default()
                );
            }
        }
        Ok(out)
    }

    /// Brings every branch's commits into the cache.
    fn fetch(&self) -> anyhow::Result<()> {
        if !self.cache.join("HEAD").exists() {
            let mut c = self.cmd();
            c.args(["init", "--bare", "--quiet"]).arg(&self.cache);
            Self::output(c, "creating the watcher's repository cache")?;
        }
        let mut c = self.in_cache();
        c.args(["fetch", "--quiet", "--no-tags", "--prune", "--force"])
            .arg(&self.repo)
            .arg("+refs/heads/*:refs/watched/*");
        Self::output(c, "fetching the repository").map(|_| ())
    }

    fn commit_time(&self, sha: &str) -> Option<i64> {
        let mut c = self.in_cache();
        c.args(["log", "-1", "--format=%ct", sha, "--"]);
        Self::output(c, "reading the commit time")
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The commits reachable from `new` but not from `old`, newest first.
    fn between(&self, old: &str, new: &str) -> anyhow::Result<Vec<String>> {
        let mut c = self.in_cache();
        c.args(["rev-list", new, &format!("^{old}"), "--"]);
        Ok(Self::output(c, "listing the commits of a push")?
            .lines()
            .map(str::to_string)
            .collect())
    }

    /// Writes the tree of `sha` into the empty directory `dest` (`git
    /// archive | tar -x`, both without a shell).
    fn export(&self, sha: &str, dest: &Path) -> anyhow::Result<()> {
        let mut archive = self.in_cache();
        archive
            .args(["archive", "--format=tar", sha])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut archive = archive.spawn().context("exporting the commit: cannot run git")?;
        let pipe = archive.stdout.take().expect("piped above");
        let tar = Command::new("tar")
            .args(["-x", "--no-same-owner", "-f", "-", "-C"])
            .arg(dest)
            .stdin(pipe)
            .stderr(Stdio::piped())
            .output()
            .context("exporting the commit: cannot run tar")?;
        let git = archive.wait_with_output().context("exporting the commit")?;
        if !git.status.success() {
            bail!(
                "exporting the commit {sha}: git archive failed: {}",
                String::from_utf8_lossy(&git.stderr).trim()
            );
        }
        if !tar.status.success() {
            bail!(
                "exporting the commit {sha}: tar failed: {}",
                String::from_utf8_lossy(&tar.stderr).trim()
            );
        }
        Ok(())
    }
}

/// A new empty directory beside `dest` that is renamed into place once
/// complete, so a crash never leaves a half-written release under its name.
fn staging(dest: &Path) -> anyhow::Result<PathBuf> {
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("release");
    let tmp = dest.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    Ok(tmp)
}

/// A command run to its end or its timeout, with its output's tail.
struct Ran {
    exit_code: Option<i32>,
    success: bool,
    timed_out: bool,
    output_tail: String,
}

/// Runs `argv` in `dir` with `env` (and the watcher's environment less the
/// webhook secret), its output (both streams) into a scratch file under
/// `scratch`.
fn run_command(
    argv: &[String],
    dir: &Path,
    env: &[(&str, String)],
    hide: Option<&str>,
    timeout: Duration,
    scratch: &Path,
) -> anyhow::Result<Ran> {
    let log = scratch.join(format!("output-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    if let Some(h) = hide {
        c.env_remove(h);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .spawn()
        .with_context(|| format!("cannot run {}", argv[0].escape_default()))?;
    let started = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Ran {
        exit_code: status.code(),
        success: status.success() && !timed_out,
        timed_out,
        output_tail: take_tail(&log),
    })
}

/// The last 4 KiB of the output file `log`, which is removed.
fn take_tail(log: &Path) -> String {
    let read = || -> std::io::Result<Vec<u8>> {
        let mut f = std::fs::File::open(log)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(4096)))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(bytes)
    };
    let bytes = read().unwrap_or_default();
    let _ = std::fs::remove_file(log);
    tail(&String::from_utf8_lossy(&bytes), 4096)
}

/// A command's program: a relative path with a `/` is the configuration
/// file's, a bare name is looked up in `PATH`.
fn resolve_argv(base: &Path, command: &[String]) -> Vec<String> {
    let mut argv = command.to_vec();
    let p = Path::new(&argv[0]);
    if !p.is_absolute() && argv[0].contains('/') {
        argv[0] = base.join(p).to_string_lossy().into_owned();
    }
    argv
}

/// The before-promotion gates of `[[gitops.gates]]`, run as commands
/// (never through a shell) by the executor's gate steps, with the targets'
/// URLs in `DEPLOYKIT_TARGET_URLS`, in the release's directory.
#[derive(Debug)]
pub(crate) struct CommandGates {
    gates: BTreeMap<String, GateConfig>,
    base: PathBuf,
    releases: PathBuf,
    scratch: PathBuf,
    hide: Option<String>,
}

impl CommandGates {
    /// The runner of the configured before-promotion gates; `None` when
    /// there are none.
    pub(crate) fn new(cfg: &crate::config::Loaded, state: &deploykit::state::StateDir) -> Option<Self> {
        let g = cfg.raw.gitops.as_ref()?;
        let gates: BTreeMap<String, GateConfig> = g
            .gates
            .iter()
            .filter(|x| x.when == GateWhen::BeforePromotion)
            .map(|x| (x.name.clone(), x.clone()))
            .collect();
        if gates.is_empty() {
            return None;
        }
        Some(Self {
            gates,
            base: cfg.base.clone(),
            releases: cfg.resolve(cfg.raw.releases.as_deref().unwrap_or("releases")),
            scratch: state.root().join("gitops"),
            hide: g.webhook_secret_env.clone(),
        })
    }
}

#[async_trait::async_trait]
impl GateRunner for CommandGates {
    async fn run(&self, name: &str, release: &ReleaseId, targets: &[Backend]) -> Result<(), GateFailure> {
        let gate = self
            .gates
            .get(name)
            .ok_or_else(|| GateFailure::Unknown(name.to_string()))?;
        let argv = resolve_argv(&self.base, &gate.command);
        let cannot = |source: std::io::Error| GateFailure::CannotRun {
            program: argv[0].escape_default().to_string(),
            source,
        };
        let release_dir = self.releases.join(release.as_str());
        let dir = if release_dir.is_dir() {
            release_dir
        } else {
            self.base.clone()
        };
        std::fs::create_dir_all(&self.scratch).map_err(cannot)?;
        let log = self
            .scratch
            .join(format!("gate-{name}-{}.log", std::process::id()));
        let file = std::fs::File::create(&log).map_err(cannot)?;
        let urls: Vec<String> = targets.iter().map(|b| format!("http://{}", b.address)).collect();
        let mut c = tokio::process::Command::new(&argv[0]);
        c.args(&argv[1..])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(cannot)?)
            .stderr(file)
            // Cancelling the deployment drops the wait, which kills the gate.
            .kill_on_drop(true)
            .env("DEPLOYKIT_TARGET_URLS", urls.join(" "))
            .env("DEPLOYKIT_RELEASE", release.as_str())
            .env("DEPLOYKIT_GATE", "before-promotion");
        if let Some(h) = &self.hide {
            c.env_remove(h);
        }
        let mut child = c.spawn().map_err(cannot)?;
        let after = gate.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(600));
        let waited = tokio::time::timeout(after, child.wait()).await;
        if waited.is_err() {
            let _ = child.kill().await;
        }
        let output_tail = take_tail(&log);
        match waited {
            Err(_) => Err(GateFailure::TimedOut { after, output_tail }),
            Ok(Err(e)) => Err(cannot(e)),
            Ok(Ok(s)) if s.success() => Ok(()),
            Ok(Ok(s)) => Err(GateFailure::Failed {
                exit_code: s.code(),
                output_tail,
            }),
        }
    }
}

/// What wakes the poller: a signed webhook, or a stop request.
#[derive(Debug, Default)]
struct Wake {
    woken: bool,
    stop: bool,
}

type Waker = Arc<(Mutex<Wake>, Condvar)>;

fn poke(w: &Waker, f: impl FnOnce(&mut Wake)) {
    let (m, cv) = &**w;
    f(&mut m.lock().unwrap_or_else(|p| p.into_inner()));
    cv.notify_all();
}

fn stopping(w: &Waker) -> bool {
    w.0.lock().unwrap_or_else(|p| p.into_inner()).stop
}

/// The webhook secret from the environment variable or file the
/// configuration names.
fn secret(cfg: &GitopsConfig, resolve: impl Fn(&str) -> PathBuf) -> anyhow::Result<Secret> {
    let bytes = match (&cfg.webhook_secret_env, &cfg.webhook_secret_file) {
        (Some(var), _) => std::env::var(var)
            .map_err(|_| {
                inv(
                    "gitops.webhook_secret_env",
                    format!("the environment variable {var} is not set (or not UTF-8): set it to the webhook's secret"),
                )
            })?
            .into_bytes(),
        (None, Some(file)) => std::fs::read(resolve(file)).map_err(|e| {
            inv(
                "gitops.webhook_secret_file",
                format!("cannot read {file}: {e}"),
            )
        })?,
        (None, None) => {
            return Err(inv(
                "gitops.webhook_secret_env",
                "--webhook needs the secret the pushes are signed with: set gitops.webhook_secret_env (or webhook_secret_file)",
            )
            .into())
        }
    };
    let trimmed = String::from_utf8_lossy(&bytes)
        .trim_end_matches(['\r', '\n'])
        .to_string();
    if trimmed.is_empty() {
        return Err(inv("gitops.webhook_secret_env", "the webhook secret is empty").into());
    }
    Ok(Secret::new(trimmed.into_bytes()))
}

/// The watcher's environment: the global options (each deployment reloads
/// the configuration, so an edited file applies from the next commit on).
struct Watcher {
    g: Global,
    git: Git,
    dir: PathBuf,
    releases: PathBuf,
    gitops: GitopsConfig,
    retry_failed: bool,
    retried: BTreeSet<String>,
    waker: Waker,
    targets: Vec<String>,
    base: PathBuf,
}

/// `deploykit watch`.
pub(crate) fn watch(g: Global, args: WatchArgs) -> anyhow::Result<u8> {
    let ctx = Ctx::load(g.clone())?;
    let Some(gitops) = ctx.cfg.raw.gitops.clone() else {
        return Err(inv(
            "gitops",
            "no [gitops] section: add one with the repository and [[gitops.branches]] rules (docs/gitops.md)",
        )
        .into());
    };
    let secret = match args.webhook {
        Some(_) => Some(secret(&gitops, |p| ctx.cfg.resolve(p))?),
        None => None,
    };
    let repo = if gitops.repository.contains("://") || looks_like_scp(&gitops.repository) {
        gitops.repository.clone()
    } else {
        ctx.cfg.resolve(&gitops.repository).to_string_lossy().into_owned()
    };
    let dir = ctx.state.root().join("gitops");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let releases = ctx
        .cfg
        .resolve(ctx.cfg.raw.releases.as_deref().unwrap_or("releases"));
    std::fs::create_dir_all(&releases).with_context(|| format!("creating {}", releases.display()))?;
    let waker: Waker = Arc::new((Mutex::new(Wake::default()), Condvar::new()));
    if !args.once {
        background(&waker, args.webhook, secret)?;
    }
    let mut w = Watcher {
        g,
        git: Git {
            cache: dir.join("cache.git"),
            repo,
        },
        releases,
        targets: ctx
            .cfg
            .instances
            .iter()
            .map(|i| format!("http://{}", i.address))
            .collect(),
        base: ctx.cfg.base.clone(),
        dir,
        gitops,
        retry_failed: args.retry_failed,
        retried: BTreeSet::new(),
        waker: waker.clone(),
    };
    drop(ctx);
    loop {
        poke(&waker, |s| s.woken = false);
        if stopping(&waker) {
            return Ok(exit::SUCCESS);
        }
        match w.pass() {
            Ok(()) => {}
            Err(e) if args.once => return Err(e),
            Err(e) => eprintln!(
                "deploykit: watch: {}; trying again at the next poll",
                crate::error_text(&e)
            ),
        }
        if args.once {
            return Ok(exit::SUCCESS);
        }
        let wait =
            w.gitops.interval.0 + jitter(w.gitops.jitter.map(|j| j.0).unwrap_or(w.gitops.interval.0 / 10));
        let (m, cv) = &*waker;
        let guard = m.lock().unwrap_or_else(|p| p.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, wait, |s| !s.woken && !s.stop)
            .unwrap_or_else(|p| p.into_inner());
        if guard.stop {
            return Ok(exit::SUCCESS);
        }
    }
}

/// `user@host:path`, which git reads as SSH.
fn looks_like_scp(repo: &str) -> bool {
    match repo.split_once(':') {
        Some((host, _)) => !host.contains('/') && host.contains('@'),
        None => false,
    }
}

/// A pseudo-random duration in `[0, max)`: the clock's nanoseconds are
/// enough to spread watchers apart.
fn jitter(max: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let max_ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    if max_ms == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(u64::from(nanos) % max_ms)
}

/// A thread that turns SIGINT/SIGTERM into a stop between deployments (a
/// running deployment gets the signal too, and rolls back) and serves the
/// webhook when asked.
fn background(
    waker: &Waker,
    webhook: Option<std::net::SocketAddr>,
    secret: Option<Secret>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the watcher's runtime")?;
    // Registered before anything is announced, so a signal sent once the
    // watcher says it listens is never the default (fatal) one.
    let (mut term, mut int) = {
        let _in_rt = rt.enter();
        (
            signal(SignalKind::terminate()).context("handling SIGTERM")?,
            signal(SignalKind::interrupt()).context("handling SIGINT")?,
        )
    };
    let listener = match webhook {
        Some(addr) => {
            let l = std::net::TcpListener::bind(addr)
                .with_context(|| format!("--webhook {addr}: cannot listen"))?;
            l.set_nonblocking(true)?;
            // Printed so a test (or a user who asked for port 0) learns
            // the port.
            eprintln!("deploykit: webhook: listening on http://{}", l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let waker = waker.clone();
    std::thread::spawn(move || {
        rt.block_on(async move {
            if let (Some(l), Some(secret)) = (listener, secret) {
                let w = waker.clone();
                let wake: Arc<dyn Fn() + Send + Sync> = Arc::new(move || poke(&w, |s| s.woken = true));
                tokio::spawn(async move {
                    if let Err(e) = gitops_webhook::serve(l, secret, wake).await {
                        eprintln!("deploykit: webhook: stopped: {e}");
                    }
                });
            }
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            eprintln!("deploykit: watch: stopping after the current step");
            poke(&waker, |s| s.stop = true);
        });
    });
    Ok(())
}

impl Watcher {
    fn records_path(&self) -> PathBuf {
        self.dir.join("commits.json")
    }

    fn say(&self, text: &str) {
        if !self.g.quiet && !self.g.json {
            outln!("watch: {text}");
        }
    }

    fn record(&self, records: &mut Records, sha: &str, rec: CommitRecord) -> anyhow::Result<()> {
        if self.g.json {
            let mut v = serde_json::to_value(&rec)?;
            v["event"] = "gitops_commit".into();
            v["commit"] = sha.into();
            outln!("{v}");
        } else {
            let detail = rec
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            self.say(&format!(
                "{} {}: {}{detail}",
                rec.branch,
                short(sha),
                rec.status.as_str()
            ));
        }
        records.commits.insert(sha.to_string(), rec);
        records.save(&self.records_path())
    }

    /// One poll: every branch whose head is new is dealt with, in name order.
    fn pass(&mut self) -> anyhow::Result<()> {
        let heads = self.git.heads()?;
        let path = self.records_path();
        let mut records = Records::load(&path)?;
        let mut fetched = false;
        for (branch, sha) in heads {
            if stopping(&self.waker) {
                break;
            }
            let rule = self
                .gitops
                .branches
                .iter()
                .find(|r| matches(&r.pattern, &branch))
                .cloned();
            let Some(rule) = rule else {
                if !records.commits.contains_key(&sha) && records.heads.get(&branch) != Some(&sha) {
                    let rec = CommitRecord {
                        branch: branch.clone(),
                        status: Status::NotDeployed,
                        strategy: None,
                        release: None,
                        deployment: None,
                        regions: None,
                        deployments: BTreeMap::new(),
                        commit_time_s: None,
                        recorded_at_ms: deploykit::state::now_ms(),
                        reason: Some(format!(
                            "no [[gitops.branches]] pattern matches the branch {branch}"
                        )),
                        gate: None,
                    };
                    self.record(&mut records, &sha, rec)?;
                }
                // Written only on a change: an idle poll writes nothing.
                if records.heads.get(&branch) != Some(&sha) {
                    records.heads.insert(branch, sha);
                    records.save(&path)?;
                }
                continue;
            };
            let mut rule = rule;
            let prior = records.commits.get(&sha).cloned();
            let mut extending = false;
            match prior.as_ref().map(|r| r.status) {
                Some(Status::Deployed | Status::AlreadyDeployed) => {
                    // A commit sent to some regions goes on to those of this
                    // rule it has not reached: a feature branch deployed to
                    // staging, then fast-forwarded into main.
                    let missing: Vec<String> = match prior.as_ref().and_then(|p| p.regions.as_ref()) {
                        Some(done) => target_regions(&crate::config::load(&self.g.config)?, &rule)?
                            .unwrap_or_default()
                            .into_iter()
                            .filter(|r| !done.contains(r))
                            .collect(),
                        None => Vec::new(),
                    };
                    if missing.is_empty() {
                        if records.heads.insert(branch.clone(), sha.clone()).as_ref() != Some(&sha) {
                            records.save(&path)?;
                        }
                        continue;
                    }
                    rule.regions = Some(missing);
                    extending = true;
                }
                Some(Status::Failed | Status::GateFailed)
                    if !self.retry_failed || self.retried.contains(&sha) =>
                {
                    continue
                }
                Some(Status::Failed | Status::GateFailed) => {
                    self.retried.insert(sha.clone());
                }
                _ => {}
            }
            if !fetched {
                self.git.fetch()?;
                fetched = true;
            }
            if let Some(prev) = records.heads.get(&branch).filter(|p| **p != sha).cloned() {
                // After a force push the old head may be gone: the new one
                // still deploys, only the skipped ones go unrecorded.
                let between = self.git.between(&prev, &sha).unwrap_or_else(|e| {
                    eprintln!(
                        "deploykit: watch: warning: cannot list the commits between {} and {} on {branch}: {}",
                        short(&prev),
                        short(&sha),
                        crate::error_text(&e)
                    );
                    Vec::new()
                });
                for c in between.into_iter().filter(|c| *c != sha) {
                    if !records.commits.contains_key(&c) {
                        let rec = CommitRecord {
                            branch: branch.clone(),
                            status: Status::Skipped,
                            strategy: None,
                            release: None,
                            deployment: None,
                            regions: None,
                            deployments: BTreeMap::new(),
                            commit_time_s: self.git.commit_time(&c),
                            recorded_at_ms: deploykit::state::now_ms(),
                            reason: Some(format!(
                                "{branch} moved on to {} before it could be deployed",
                                short(&sha)
                            )),
                            gate: None,
                        };
                        self.record(&mut records, &c, rec)?;
                    }
                }
            }
            // None: the lock is held by someone else, and the next poll tries again.
            if let Some(mut rec) = self.deploy(&branch, &sha, &rule)? {
                if let Some(p) = prior.filter(|_| extending) {
                    let mut regions = p.regions.unwrap_or_default();
                    regions.extend(rec.regions.take().unwrap_or_default());
                    rec.regions = Some(regions);
                    let mut runs = p.deployments;
                    runs.append(&mut rec.deployments);
                    rec.deployments = runs;
                }
                self.record(&mut records, &sha, rec)?;
                records.heads.insert(branch, sha);
                records.save(&path)?;
            }
        }
        Ok(())
    }

    /// Turns `sha` into `<releases>/<short sha>/` (kept when already there:
    /// a commit's tree never changes).
    fn release(&self, sha: &str) -> anyhow::Result<String> {
        let name = short(sha);
        let dest = self.releases.join(&name);
        if dest.is_dir() {
            return Ok(name);
        }
        let tmp = staging(&dest)?;
        let made = match (&self.gitops.build, &self.gitops.build_output) {
            (Some(argv), Some(output)) => {
                let checkout = staging(&self.dir.join(format!("build-{name}")))?;
                let built = (|| {
                    self.git.export(sha, &checkout)?;
                    self.say(&format!("{name}: building"));
                    // `./build.sh` is the commit's own script.
                    let ran = run_command(
                        &resolve_argv(&checkout, argv),
                        &checkout,
                        &[("DEPLOYKIT_COMMIT", sha.to_string())],
                        self.gitops.webhook_secret_env.as_deref(),
                        self.gitops
                            .build_timeout
                            .map(|d| d.0)
                            .unwrap_or(Duration::from_secs(1800)),
                        &self.dir,
                    )?;
                    if !ran.success {
                        bail!(
                            "the build of {name} failed ({}): {}",
                            describe_exit(&ran),
                            ran.output_tail.trim()
                        );
                    }
                    let out = checkout.join(output);
                    if !out.is_dir() {
                        bail!("the build of {name} succeeded but did not produce {output}/ (gitops.build_output)");
                    }
                    std::fs::remove_dir(&tmp)?;
                    std::fs::rename(&out, &tmp).with_context(|| format!("moving {}", out.display()))?;
                    Ok(())
                })();
                let _ = std::fs::remove_dir_all(&checkout);
                built
            }
            _ => self.git.export(sha, &tmp),
        };
        let made = made.and_then(|()| match std::fs::rename(&tmp, &dest) {
            Ok(()) => Ok(()),
            // Another watcher sharing the releases directory exported the
            // same commit first: its tree is this one.
            Err(_) if dest.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display())),
        });
        if made.is_err() {
            // A failed build or export leaves no partial directory behind.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        made.map(|()| name)
    }

    /// Deploys `sha` with `rule`'s strategy (to its regions, in a file with
    /// `[[regions]]`) and runs the gates: the record, or `None` when another
    /// deployment holds the lock.
    fn deploy(&mut self, branch: &str, sha: &str, rule: &BranchRule) -> anyhow::Result<Option<CommitRecord>> {
        let time = self.git.commit_time(sha);
        let mut rec = CommitRecord {
            branch: branch.to_string(),
            status: Status::Failed,
            strategy: Some(rule.strategy.to_string()),
            release: None,
            deployment: None,
            regions: None,
            deployments: BTreeMap::new(),
            commit_time_s: time,
            recorded_at_ms: 0,
            reason: None,
            gate: None,
        };
        let failed = |mut rec: CommitRecord, why: String| {
            rec.reason = Some(why);
            rec.recorded_at_ms = deploykit::state::now_ms();
            Ok(Some(rec))
        };
        let ctx = match Ctx::load(self.g.clone()) {
            Ok(c) => c,
            Err(e) => return failed(rec, crate::error_text(&e)),
        };
        let regions = target_regions(&ctx.cfg, rule)?;
        rec.regions = regions.clone();
        let release = match self.release(sha) {
            Ok(r) => r,
            Err(e) => return failed(rec, crate::error_text(&e)),
        };
        rec.release = Some(release.clone());
        let to = match &regions {
            Some(r) => format!(" to {}", r.join(", ")),
            None => String::new(),
        };
        self.say(&format!(
            "{branch} {release}: deploying with {}{to}",
            rule.strategy
        ));
        let commit = SourceCommit::new(sha, time)?;
        // A watcher retrying its own failure deploys again on purpose.
        let once = !self.retried.contains(sha);
        let ran = cmd::deploy_commit(
            ctx,
            DeployArgs::of_commit(
                release.clone(),
                Some(rule.strategy),
                &commit,
                rule.regions.clone().unwrap_or_default(),
                once,
            ),
        );
        let (run, why) = self.run_of(sha, regions.as_deref());
        match run {
            Runs::One(id) => rec.deployment = id,
            Runs::Regions(ids) => rec.deployments = ids,
        }
        match ran {
            Ok(CommitDeploy::Earlier(e)) => {
                rec.status = Status::AlreadyDeployed;
                rec.deployment = Some(e.deployment.clone());
                rec.reason = Some(format!(
                    "the run {e} deployed this commit already: not deployed again"
                ));
                rec.recorded_at_ms = deploykit::state::now_ms();
                return Ok(Some(rec));
            }
            Ok(CommitDeploy::Ran(exit::LOCKED)) => {
                self.say("another deployment holds the lock: trying again at the next poll");
                return Ok(None);
            }
            Ok(CommitDeploy::Ran(exit::SUCCESS)) => {}
            Ok(CommitDeploy::Ran(code)) => {
                let why = match why {
                    Some(why) => format!("the deployment failed (exit code {code}): {why}"),
                    None => format!("the deployment ended with exit code {code} (see deploykit status)"),
                };
                return failed(rec, why);
            }
            Err(e) => return failed(rec, crate::error_text(&e)),
        }
        let dir = self.releases.join(&release);
        let targets = self.serving(&release, regions.as_deref());
        let env = [
            ("DEPLOYKIT_TARGET_URLS", targets.join(" ")),
            ("DEPLOYKIT_COMMIT", sha.to_string()),
            ("DEPLOYKIT_BRANCH", branch.to_string()),
            ("DEPLOYKIT_RELEASE", release.clone()),
            ("DEPLOYKIT_GATE", "after".to_string()),
            (
                "DEPLOYKIT_REGIONS",
                regions.as_deref().unwrap_or_default().join(" "),
            ),
        ];
        for gate in self
            .gitops
            .gates
            .clone()
            .iter()
            .filter(|g| g.when == GateWhen::After)
        {
            self.say(&format!("{release}: gate {}", gate.name));
            let argv = resolve_argv(&self.base, &gate.command);
            let ran = run_command(
                &argv,
                &dir,
                &env,
                self.gitops.webhook_secret_env.as_deref(),
                gate.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(600)),
                &self.dir,
            );
            let ran = match ran {
                Ok(r) => r,
                Err(e) => Ran {
                    exit_code: None,
                    success: false,
                    timed_out: false,
                    output_tail: crate::error_text(&e),
                },
            };
            if ran.success {
                continue;
            }
            // Only what this commit deployed is undone: the regions it went
            // to, last wave first.
            let rollback = Ctx::load(self.g.clone()).and_then(|ctx| match &regions {
                Some(r) => cmd::rollback_regions(ctx, r, false),
                None => cmd::rollback(ctx),
            });
            let back = match rollback {
                Ok(exit::SUCCESS) => "rolled back".to_string(),
                Ok(code) => format!("the rollback ended with exit code {code}: see deploykit status"),
                Err(e) => format!("the rollback failed: {}", crate::error_text(&e)),
            };
            rec.status = Status::GateFailed;
            rec.reason = Some(format!(
                "the gate {} failed ({}); {back}",
                gate.name,
                describe_exit(&ran)
            ));
            rec.gate = Some(GateRecord {
                name: gate.name.clone(),
                exit_code: ran.exit_code,
                output_tail: ran.output_tail,
            });
            rec.recorded_at_ms = deploykit::state::now_ms();
            return Ok(Some(rec));
        }
        rec.status = Status::Deployed;
        rec.recorded_at_ms = deploykit::state::now_ms();
        Ok(Some(rec))
    }

    /// The contexts of the fleets a deployment acted on: the file's, or
    /// each of `regions`.
    fn fleets(&self, regions: Option<&[String]>) -> anyhow::Result<Vec<Ctx>> {
        let ctx = Ctx::load_read_only(self.g.clone())?;
        match regions {
            None => Ok(vec![ctx]),
            Some(names) => names.iter().map(|n| ctx.for_region(ctx.cfg.region(n)?)).collect(),
        }
    }

    /// `http://<address>` of every instance (of every region deployed to)
    /// that runs `release` and answers healthy: what serves it after the
    /// deployment (a canary's instances and blue-green's old environment
    /// are stopped by then). All the instances when the fleet cannot be
    /// read, so a gate fails loudly rather than checking nothing.
    fn serving(&self, release: &str, regions: Option<&[String]>) -> Vec<String> {
        let read = || -> anyhow::Result<Vec<String>> {
            let mut out = Vec::new();
            for ctx in self.fleets(regions)? {
                let fleet = crate::wire::fleet(&ctx.cfg, &ctx.state, ctx.backend.live_store(None), None)?;
                cmd::runtime()?.block_on(async {
                    for i in fleet.executor.instances() {
                        let bound = Duration::from_secs(10);
                        let runs = matches!(
                            tokio::time::timeout(bound, i.current_release()).await,
                            Ok(Ok(Some(r))) if r.as_str() == release
                        );
                        let healthy = runs
                            && matches!(
                                tokio::time::timeout(bound, i.health()).await,
                                Ok(Ok(deploykit::Health::Healthy))
                            );
                        if healthy {
                            out.push(format!("http://{}", i.backend().address));
                        }
                    }
                });
            }
            Ok(out)
        };
        match read() {
            Ok(t) if !t.is_empty() => t,
            _ => self.targets.clone(),
        }
    }

    /// The run ids that deployed `sha` (the newest run of the fleet, or of
    /// each region, when it is that commit's), and why the deployment
    /// failed when it did.
    fn run_of(&self, sha: &str, regions: Option<&[String]>) -> (Runs, Option<String>) {
        let newest = |ctx: &Ctx| -> Option<(String, Option<String>)> {
            let latest = cmd::runtime().ok()?.block_on(ctx.backend.latest()).ok()??;
            let entry = latest.history_entry(None);
            (entry.commit.as_ref().map(|c| c.sha.as_str()) == Some(sha)).then_some((entry.id, entry.reason))
        };
        let Ok(fleets) = self.fleets(regions) else {
            return (Runs::One(None), None);
        };
        match regions {
            None => match fleets.first().and_then(newest) {
                Some((id, why)) => (Runs::One(Some(id)), why),
                None => (Runs::One(None), None),
            },
            Some(names) => {
                let ids = names
                    .iter()
                    .zip(&fleets)
                    .filter_map(|(n, ctx)| newest(ctx).map(|(id, _)| (n.clone(), id)))
                    .collect();
                // The multi-region run's own record says which region failed.
                let why = Ctx::load_read_only(self.g.clone())
                    .ok()
                    .and_then(|ctx| cmd::read_record(&ctx))
                    .and_then(|r| r.reason);
                (Runs::Regions(ids), why)
            }
        }
    }
}

/// The regions `rule` sends a commit to, in the rollout's order; `None`
/// for a file of one fleet.
fn target_regions(cfg: &crate::config::Loaded, rule: &BranchRule) -> anyhow::Result<Option<Vec<String>>> {
    if !cfg.is_multi_region() {
        return Ok(None);
    }
    let names: Vec<RegionName> = cfg.regions.iter().map(|r| r.name.clone()).collect();
    let chosen = rule.regions.as_deref().unwrap_or_default();
    Ok(Some(
        cfg.rollout
            .waves_for(&names)?
            .into_iter()
            .flatten()
            .map(|r| r.to_string())
            .filter(|r| chosen.is_empty() || chosen.contains(r))
            .collect(),
    ))
}

/// The runs of one deployment of a commit.
enum Runs {
    /// A file of one fleet: its run, if it started.
    One(Option<String>),
    /// A file with `[[regions]]`: each region's run.
    Regions(BTreeMap<String, String>),
}

fn describe_exit(ran: &Ran) -> String {
    match (ran.timed_out, ran.exit_code) {
        (true, _) => "timed out".into(),
        (false, Some(c)) => format!("exit code {c}"),
        (false, None) => "killed by a signal".into(),
    }
}

/// The release name of a commit: its first 12 hexadecimal digits.
fn short(sha: &str) -> String {
    sha.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_star_matches_any_run_of_characters_slashes_included() {
        assert!(matches("main", "main"));
        assert!(!matches("main", "main2"));
        assert!(matches("release/*", "release/1.2"));
        assert!(!matches("release/*", "releases/1.2"));
        assert!(matches("*", "feature/x"));
        assert!(matches("feature/*-fix", "feature/a/b-fix"));
        assert!(!matches("feature/*-fix", "feature/a-fixed"));
        assert!(matches("*/hot*", "team/hotfix"));
    }

    #[test]
    fn patterns_that_are_not_ref_names_are_refused() {
        for bad in ["", "-main", "a..b", "a b", "x:y", "/main", "main/", "a~1", "a\\b"] {
            assert!(check_pattern("p", bad).is_err(), "{bad}");
        }
        for good in ["main", "release/*", "*", "feature/*-fix"] {
            assert!(check_pattern("p", good).is_ok(), "{good}");
        }
    }

    #[test]
    fn the_tail_keeps_the_end_and_whole_characters() {
        assert_eq!(tail("abcdef", 3), "def");
        assert_eq!(tail("ab", 3), "ab");
        assert_eq!(tail("aé", 1), "");
    }

    #[test]
    fn scp_style_addresses_are_urls_not_paths() {
        assert!(looks_like_scp("git@example.com:team/app.git"));
        assert!(!looks_like_scp("../app.git"));
        assert!(!looks_like_scp("dir/a:b"));
    }
}
