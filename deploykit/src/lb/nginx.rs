//! The nginx driver: deploykit owns one upstream include file.
//!
//! The file is *rendered* from typed state ([`Upstream`], one
//! [`UpstreamServer`] per backend with its weight and `down` / `backup`
//! flags) after every address was validated ([`Address`]); it is never
//! edited with text substitutions. Each change:
//!
//! 1. renders the candidate file and writes it to a temp file in the same
//!    directory, created exclusively under a random name (a symlink planted
//!    there is never written through) and `fsync`ed;
//! 2. renames it over the include file and runs `nginx -t` on the **whole**
//!    configuration; when nginx rejects it, the previous file is put back at
//!    once (nginx reads the file only on reload, so the rejected candidate
//!    never served a request) and the error carries nginx's own stderr;
//! 3. reloads (`nginx -s reload` with the same `-p`/`-c`, i.e. SIGHUP to the
//!    master) — once the master's current workers have settled, so that a
//!    master that has only just started and is still forking its first
//!    workers is not mistaken for one that reloaded — and confirms the
//!    reload *took*: a new generation of worker
//!    processes appears under the master, and every worker of the old
//!    generation has exited or retitled itself `worker process is shutting
//!    down` (it then accepts nothing more), within the reload timeout. A
//!    master that is gone, or a reload that starts no new workers, restores
//!    the previous file and is reported.
//!
//! # State across processes
//!
//! Which backends the operator took out of rotation and how traffic is split
//! between groups are written into the include file itself, as one comment
//! line (`# deploykit-state: {...}`, JSON of validated names and numbers),
//! whenever they differ from "every backend in rotation, no split". A driver
//! built later — the next CLI run, a recovery after a crash — adopts that
//! line, so it starts from what nginx actually runs instead of putting a
//! quarantined backend back in rotation on its first change. A record that
//! cannot be read, or that names a group no longer configured, is ignored
//! with a warning. The file and the state it records are replaced together,
//! atomically, so they cannot disagree.
//!
//! nginx rejects `weight=0`, so a backend or group with no share is rendered
//! `down` (or `backup`, see [`NginxBuilder::idle_groups_as_backup`]).
//!
//! # Drain confirmation
//!
//! nginx has no per-server connection counter outside nginx Plus. The driver
//! confirms a drain by the process generations instead: the reload that takes
//! a backend out of rotation starts new workers that never send to it, and
//! the *old* workers finish their in-flight requests and exit (graceful
//! shutdown). [`LoadBalancer::active_connections`] therefore reports, for a
//! backend out of rotation, how many worker processes that were alive before
//! that reload are still alive; 0 means no request that nginx could have sent
//! to the backend is still in flight. Processes are identified by pid *and*
//! start time from `/proc`, so a reused pid is not mistaken for an old
//! worker.
//!
//! Limits: this is Linux-only (`/proc`); it is conservative — an old worker
//! that is still serving a slow request to *another* backend, or a
//! long-lived connection (WebSocket, long poll), keeps the drain unconfirmed
//! until it ends or nginx's `worker_shutdown_timeout` passes (the executor's
//! drain timeout bounds the wait); and for a backend still in rotation the
//! driver cannot count connections (`None`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;
use tokio::time::{sleep, Instant};

use super::split::{check_weights, per_server_weights};
use crate::error::{DriverError, Error, Result};
use crate::names::{validate_name, Address, Group, InstanceId};
use crate::state::atomic::write_atomic;
use crate::traits::{Backend, GroupWeight, LoadBalancer};

/// The largest per-server weight the driver renders (the biggest share gets
/// it; smaller shares are scaled down from it).
const MAX_WEIGHT: u32 = 1000;

/// One `server` line of an nginx upstream block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamServer {
    /// The instance it belongs to (rendered as a comment).
    pub id: InstanceId,
    /// `host:port`, validated.
    pub address: Address,
    /// `weight=` (nginx accepts 1 and above; `None` renders no weight).
    pub weight: Option<u32>,
    /// `down`: no traffic.
    pub down: bool,
    /// `backup`: traffic only when every non-backup server is unavailable.
    pub backup: bool,
}

/// An nginx `upstream` block, rendered from typed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The upstream's name (validated as a name).
    pub name: String,
    /// Its servers, in a stable order.
    pub servers: Vec<UpstreamServer>,
}

impl Upstream {
    /// Renders the include file. Every value in it is a validated name,
    /// address or number, so nothing can break out of the block.
    pub fn render(&self) -> String {
        let mut s =
            String::from("# Managed by deploykit: rendered from its state, replaced on every change.\n");
        let _ = writeln!(s, "upstream {} {{", self.name);
        for srv in &self.servers {
            let _ = write!(s, "    server {}", srv.address);
            if let Some(w) = srv.weight.filter(|w| *w != 1) {
                let _ = write!(s, " weight={w}");
            }
            if srv.down {
                s.push_str(" down");
            } else if srv.backup {
                s.push_str(" backup");
            }
            let _ = writeln!(s, "; # {}", srv.id);
        }
        s.push_str("}\n");
        s
    }
}

/// Whether a backend is in rotation as far as the operator is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Admin {
    Ready,
    Draining,
    Disabled,
}

/// Where the include file carries the driver's state, so that a new
/// process (the next CLI run, a recovery after a crash) starts from what
/// nginx actually runs rather than from "every backend in rotation".
const STATE_MARKER: &str = "# deploykit-state: ";

/// The part of [`State`] that is not visible in the rendered servers alone:
/// which backends the operator took out (as opposed to a group at 0 %), and
/// the traffic split. Rendered as one JSON comment line; every key is a
/// validated name, so the line cannot contain a newline.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shares: Option<BTreeMap<Group, u8>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    out: BTreeMap<InstanceId, Admin>,
}

impl SavedState {
    fn of(st: &State) -> Self {
        Self {
            shares: st.shares.clone(),
            out: st
                .backends
                .iter()
                .filter(|(_, a)| *a != Admin::Ready)
                .map(|(b, a)| (b.id.clone(), *a))
                .collect(),
        }
    }
}

/// Adopts the state recorded in an existing include file, if there is one
/// and it fits the configured backends; otherwise leaves `state` as is
/// (every backend in rotation), with a warning when a record was there but
/// could not be used.
fn adopt_saved(include: &Path, state: &mut State) {
    let Ok(text) = std::fs::read_to_string(include) else {
        return;
    };
    let Some(line) = text.lines().find_map(|l| l.strip_prefix(STATE_MARKER)) else {
        return;
    };
    let saved: SavedState = match serde_json::from_str(line) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(file = %include.display(), error = %e,
                "ignoring an unreadable deploykit-state line; starting with every backend in rotation");
            return;
        }
    };
    let groups = state.groups();
    if let Some(shares) = &saved.shares {
        if let Some(g) = shares.iter().find(|(g, p)| **p > 0 && !groups.contains_key(*g)) {
            tracing::warn!(file = %include.display(), group = %g.0,
                "the recorded traffic split names a group that is no longer configured; ignoring the record");
            return;
        }
    }
    for (b, a) in &mut state.backends {
        if let Some(recorded) = saved.out.get(&b.id) {
            *a = *recorded;
        }
    }
    state.shares = saved.shares;
}

/// A process identified by pid and start time (so a reused pid differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Proc {
    pid: u32,
    start: u64,
}

#[derive(Debug, Clone)]
struct State {
    backends: Vec<(Backend, Admin)>,
    /// `None`: every group gets traffic, each server weight 1.
    shares: Option<BTreeMap<Group, u8>>,
    /// Workers alive at the reload that took a backend out of rotation.
    drains: BTreeMap<InstanceId, BTreeSet<Proc>>,
}

impl State {
    fn admin(&self, id: &InstanceId) -> Option<Admin> {
        self.backends.iter().find(|(b, _)| &b.id == id).map(|(_, a)| *a)
    }

    fn set_admin(&mut self, id: &InstanceId, admin: Admin) {
        for (b, a) in &mut self.backends {
            if &b.id == id {
                *a = admin;
            }
        }
    }

    fn groups(&self) -> BTreeMap<Group, usize> {
        let mut m = BTreeMap::new();
        for (b, _) in &self.backends {
            *m.entry(b.group.clone()).or_insert(0) += 1;
        }
        m
    }

    fn ready_per_group(&self) -> BTreeMap<Group, usize> {
        let mut m = BTreeMap::new();
        for (b, a) in &self.backends {
            if *a == Admin::Ready {
                *m.entry(b.group.clone()).or_insert(0) += 1;
            }
        }
        m
    }
}

/// Builds a [`NginxLoadBalancer`]; setters never fail, [`build`](Self::build)
/// checks everything.
#[derive(Debug, Clone)]
pub struct NginxBuilder {
    upstream: String,
    include_file: Option<PathBuf>,
    binary: PathBuf,
    prefix: Option<PathBuf>,
    config_file: Option<PathBuf>,
    error_log_stderr: bool,
    pid_file: PathBuf,
    backends: Vec<Backend>,
    reload_timeout: Duration,
    idle_as_backup: bool,
}

impl Default for NginxBuilder {
    fn default() -> Self {
        Self {
            upstream: "app".into(),
            include_file: None,
            binary: "nginx".into(),
            prefix: None,
            config_file: None,
            error_log_stderr: false,
            pid_file: "/run/nginx.pid".into(),
            backends: Vec::new(),
            reload_timeout: Duration::from_secs(10),
            idle_as_backup: false,
        }
    }
}

impl NginxBuilder {
    /// The upstream block's name, as `proxy_pass http://<name>` uses it.
    /// Default `app`.
    pub fn upstream(mut self, name: impl Into<String>) -> Self {
        self.upstream = name.into();
        self
    }

    /// The include file deploykit owns (required). nginx's config must
    /// `include` it inside `http { }`; its directory must be writable.
    pub fn include_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.include_file = Some(path.into());
        self
    }

    /// The nginx binary. Default `nginx` (looked up on `PATH`).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = path.into();
        self
    }

    /// `-p PREFIX` for every nginx invocation.
    pub fn prefix(mut self, dir: impl Into<PathBuf>) -> Self {
        self.prefix = Some(dir.into());
        self
    }

    /// `-c FILE` for every nginx invocation.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config_file = Some(path.into());
        self
    }

    /// `-e stderr` for every nginx invocation (errors of `nginx -t` and
    /// `nginx -s` go to stderr, which the driver reports).
    pub fn error_log_stderr(mut self, yes: bool) -> Self {
        self.error_log_stderr = yes;
        self
    }

    /// The master's pid file, as the config's `pid` directive names it.
    /// Default `/run/nginx.pid`.
    pub fn pid_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.pid_file = path.into();
        self
    }

    /// Adds a backend (an instance behind the upstream).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backends.push(backend);
        self
    }

    /// Adds backends.
    pub fn backends(mut self, backends: impl IntoIterator<Item = Backend>) -> Self {
        self.backends.extend(backends);
        self
    }

    /// How long a reload may take to start new workers. Default 10 s.
    pub fn reload_timeout(mut self, timeout: Duration) -> Self {
        self.reload_timeout = timeout;
        self
    }

    /// Render enabled servers of groups with no share as `backup` instead of
    /// `down`: they then take traffic only when every server of the live
    /// groups is unavailable. Default off (0 % means no traffic).
    pub fn idle_groups_as_backup(mut self, yes: bool) -> Self {
        self.idle_as_backup = yes;
        self
    }

    /// Checks the settings and builds the driver. Touches nothing: call
    /// [`NginxLoadBalancer::install`] to write the first file.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: no include file, a relative
    /// or parentless include file, a bad upstream name, no backends, a
    /// backend id or address used twice, a zero reload timeout.
    pub fn build(self) -> Result<NginxLoadBalancer> {
        validate_name("nginx upstream", &self.upstream)?;
        let include = self.include_file.ok_or_else(|| {
            Error::invalid(
                "nginx include_file",
                "is not set; name the upstream file deploykit owns",
            )
        })?;
        if !include.is_absolute() || include.file_name().is_none() {
            return Err(Error::invalid(
                "nginx include_file",
                format!("{} must be an absolute path to a file", include.display()),
            ));
        }
        if self.backends.is_empty() {
            return Err(Error::invalid(
                "nginx backends",
                "is empty; add the instances behind the upstream",
            ));
        }
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for b in &self.backends {
            if !ids.insert(b.id.clone()) {
                return Err(Error::invalid(
                    "nginx backends",
                    format!("instance {} is listed twice", b.id),
                ));
            }
            if !addrs.insert(b.address.clone()) {
                return Err(Error::invalid(
                    "nginx backends",
                    format!("address {} is used by two instances", b.address),
                ));
            }
        }
        if self.reload_timeout.is_zero() {
            return Err(Error::invalid("nginx reload_timeout", "must be greater than 0"));
        }
        let mut global_args: Vec<OsString> = Vec::new();
        if let Some(p) = &self.prefix {
            global_args.push("-p".into());
            global_args.push(p.clone().into_os_string());
        }
        if let Some(c) = &self.config_file {
            global_args.push("-c".into());
            global_args.push(c.clone().into_os_string());
        }
        if self.error_log_stderr {
            global_args.push("-e".into());
            global_args.push("stderr".into());
        }
        let mut state = State {
            backends: self.backends.into_iter().map(|b| (b, Admin::Ready)).collect(),
            shares: None,
            drains: BTreeMap::new(),
        };
        adopt_saved(&include, &mut state);
        Ok(NginxLoadBalancer {
            inner: Arc::new(Inner {
                upstream: self.upstream,
                include,
                binary: self.binary,
                global_args,
                pid_file: self.pid_file,
                reload_timeout: self.reload_timeout,
                idle_as_backup: self.idle_as_backup,
                state: Mutex::new(state),
                apply: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// An nginx load balancer driven through one upstream include file.
/// Cheap to clone (shared state).
///
/// ```no_run
/// # async fn f() -> deploykit::Result<()> {
/// use deploykit::{Address, Backend, Group, InstanceId};
/// use deploykit::lb::NginxLoadBalancer;
///
/// let lb = NginxLoadBalancer::builder()
///     .upstream("app")
///     .include_file("/etc/nginx/conf.d/deploykit-app.upstream")
///     .backend(Backend {
///         id: InstanceId::new("web-1")?,
///         address: Address::parse("10.0.0.5:8080")?,
///         group: Group::new("stable")?,
///     })
///     .build()?;
/// lb.install().await?; // write and `nginx -t` the first file
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NginxLoadBalancer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    upstream: String,
    include: PathBuf,
    binary: PathBuf,
    global_args: Vec<OsString>,
    pid_file: PathBuf,
    reload_timeout: Duration,
    idle_as_backup: bool,
    state: Mutex<State>,
    /// Serialises changes: one render-check-rename-reload at a time.
    apply: tokio::sync::Mutex<()>,
}

impl NginxLoadBalancer {
    /// A builder with the defaults.
    pub fn builder() -> NginxBuilder {
        NginxBuilder::default()
    }

    /// The upstream block for the current state.
    pub fn upstream(&self) -> Upstream {
        let st = self.inner.lock_state().clone();
        self.inner.upstream_for(&st)
    }

    /// The include file's text for the current state: the upstream block,
    /// and, when any backend is out of rotation or traffic is split, the
    /// `# deploykit-state:` line a later process adopts.
    pub fn render(&self) -> String {
        let st = self.inner.lock_state().clone();
        self.inner.render_file(&st)
    }

    /// Writes the include file for the current state and checks the whole
    /// config with `nginx -t`, without reloading: for setting up before
    /// nginx starts.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes (the work runs to completion in a task).
    /// * On failure: the previous file (if any) is back in place.
    ///
    /// # Errors
    /// When the file cannot be written or `nginx -t` rejects the config
    /// (the message carries nginx's stderr).
    pub async fn install(&self) -> Result<(), DriverError> {
        let inner = self.inner.clone();
        run_to_completion(async move {
            let _g = inner.apply.lock().await;
            let st = inner.lock_state().clone();
            let text = inner.render_file(&st);
            let previous = inner.replace_and_test(&text).await?;
            drop(previous);
            Ok(())
        })
        .await
    }

    /// Renders the current state, tests it and reloads nginx: for bringing
    /// nginx back in line after someone else changed the file.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes (the work runs to completion in a task).
    /// * On failure: the previous file is back in place and nginx runs the
    ///   previous config.
    ///
    /// # Errors
    /// As for every change: a rejected config, a failed reload, a master
    /// that is not running.
    pub async fn sync(&self) -> Result<(), DriverError> {
        let st = self.inner.lock_state().clone();
        self.change(st, None).await
    }

    /// Applies `new` (render, check, rename, reload, confirm) and records
    /// the workers of the previous generation for `draining`.
    async fn change(&self, new: State, draining: Option<InstanceId>) -> Result<(), DriverError> {
        let inner = self.inner.clone();
        run_to_completion(async move {
            let _g = inner.apply.lock().await;
            inner.apply_state(new, draining).await
        })
        .await
    }

    /// Clones the state, lets `edit` change it, and applies it. `edit`
    /// runs under the apply lock on the freshest state.
    async fn edit(
        &self,
        draining: Option<InstanceId>,
        edit: impl FnOnce(&mut State) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<(), DriverError> {
        let inner = self.inner.clone();
        run_to_completion(async move {
            let _g = inner.apply.lock().await;
            let mut st = inner.lock_state().clone();
            edit(&mut st)?;
            inner.apply_state(st, draining).await
        })
        .await
    }

    fn check_backend(&self, backend: &Backend) -> Result<(), DriverError> {
        let st = self.inner.lock_state();
        match st.backends.iter().find(|(b, _)| b.id == backend.id) {
            None => {
                let ids: Vec<&str> = st.backends.iter().map(|(b, _)| b.id.as_str()).collect();
                Err(DriverError::new(format!(
                    "nginx upstream {} has no backend {}; known: {}",
                    self.inner.upstream,
                    backend.id,
                    ids.join(", ")
                )))
            }
            Some((b, _)) if b.address != backend.address => Err(DriverError::new(format!(
                "backend {} is registered with nginx at {}, not {}",
                backend.id, b.address, backend.address
            ))),
            Some(_) => Ok(()),
        }
    }

    async fn take_out(&self, backend: &Backend, admin: Admin) -> Result<(), DriverError> {
        self.check_backend(backend)?;
        let id = backend.id.clone();
        let current = self.inner.lock_state().admin(&id);
        if current == Some(admin) {
            return Ok(());
        }
        if current != Some(Admin::Ready) {
            // Draining -> disabled (or back): nothing changes for nginx, the
            // server is already `down`.
            self.inner.lock_state().set_admin(&id, admin);
            return Ok(());
        }
        let id2 = id.clone();
        self.edit(Some(id), move |st| {
            st.set_admin(&id2, admin);
            Ok(())
        })
        .await
    }
}

/// Runs `fut` in its own task so that dropping the caller's future does not
/// stop a change half-way (rename done, reload not).
async fn run_to_completion<F>(fut: F) -> Result<(), DriverError>
where
    F: std::future::Future<Output = Result<(), DriverError>> + Send + 'static,
{
    match tokio::spawn(fut).await {
        Ok(r) => r,
        Err(e) => Err(DriverError::new(format!("nginx change task failed: {e}"))),
    }
}

impl Inner {
    /// The whole include file for `st` (see [`NginxLoadBalancer::render`]).
    fn render_file(&self, st: &State) -> String {
        let mut text = self.upstream_for(st).render();
        let saved = SavedState::of(st);
        if saved != SavedState::default() {
            if let Ok(json) = serde_json::to_string(&saved) {
                let at = text.find('\n').map_or(0, |i| i + 1);
                text.insert_str(at, &format!("{STATE_MARKER}{json}\n"));
            }
        }
        text
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn upstream_for(&self, st: &State) -> Upstream {
        let ready = st.ready_per_group();
        let weights: Option<BTreeMap<Group, u32>> = st
            .shares
            .as_ref()
            .map(|shares| per_server_weights(shares, &ready, MAX_WEIGHT));
        let servers = st
            .backends
            .iter()
            .map(|(b, admin)| {
                let (in_rotation, weight) = match (&weights, admin) {
                    (_, Admin::Draining | Admin::Disabled) => (false, None),
                    (None, Admin::Ready) => (true, None),
                    (Some(w), Admin::Ready) => match w.get(&b.group) {
                        Some(w) => (true, Some(*w)),
                        None => (false, None),
                    },
                };
                let backup = !in_rotation && self.idle_as_backup && *admin == Admin::Ready;
                UpstreamServer {
                    id: b.id.clone(),
                    address: b.address.clone(),
                    weight,
                    down: !in_rotation && !backup,
                    backup,
                }
            })
            .collect();
        Upstream {
            name: self.upstream.clone(),
            servers,
        }
    }

    fn nginx(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.args(&self.global_args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        c
    }

    async fn run_nginx(&self, args: &[&str]) -> Result<(), DriverError> {
        let what = format!("nginx {}", args.join(" "));
        let out =
            self.nginx().args(args).output().await.map_err(|e| {
                DriverError::new(format!("cannot run {} ({what}): {e}", self.binary.display()))
            })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let msg = format!("{}{}", stderr.trim(), stdout.trim());
        Err(DriverError::new(format!(
            "`{what}` failed ({}): {msg}",
            out.status
        )))
    }

    /// The include file exists, the master is running with settled worker
    /// processes, `nginx -T` accepts the whole configuration as it is and
    /// lists the include file among the files it read.
    async fn preflight(&self) -> Result<(), DriverError> {
        let include = self.include.display();
        match tokio::fs::metadata(&self.include).await {
            Ok(m) if m.is_file() => {}
            Ok(_) => {
                return Err(DriverError::new(format!(
                    "the nginx upstream include file {include} is not a regular file"
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DriverError::new(format!(
                    "the nginx upstream include file {include} does not exist: create it once with \
                     every server in rotation (`deploykit setup`, or NginxLoadBalancer::install), \
                     `include` it inside nginx's `http {{ }}` block, then start or reload nginx"
                )))
            }
            Err(e) => {
                return Err(DriverError::new(format!(
                    "cannot read the nginx upstream include file {include}: {e}"
                )))
            }
        }
        let master = self.master()?;
        // A master without workers (`master_process off`) cannot confirm a
        // reload: found here, not at the first change.
        self.settled_generation(&master).await?;
        let out =
            self.nginx().arg("-T").output().await.map_err(|e| {
                DriverError::new(format!("cannot run {} (nginx -T): {e}", self.binary.display()))
            })?;
        if !out.status.success() {
            return Err(DriverError::new(format!(
                "nginx rejects its current configuration (`nginx -T` failed, {}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let dump = String::from_utf8_lossy(&out.stdout);
        if !includes_file(&dump, &self.include) {
            return Err(DriverError::new(format!(
                "nginx's configuration does not include the upstream file {include}, so changing it \
                 would route nothing: add `include {include};` inside the `http {{ }}` block (and \
                 `proxy_pass http://{};`), or point load_balancer.include_file at the file it includes",
                self.upstream
            )));
        }
        Ok(())
    }

    /// Replaces the include file with `text` through the atomic-write
    /// helper: a temp file created exclusively under a random name (never
    /// through a planted symlink), fsynced and renamed over the include.
    async fn write_atomically(&self, text: &[u8]) -> Result<(), DriverError> {
        let path = self.include.clone();
        let bytes = text.to_vec();
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes))
            .await
            .map_err(|e| DriverError::new(format!("writing the nginx upstream file panicked: {e}")))?
            .map_err(|e| {
                DriverError::new(format!(
                    "cannot replace the nginx upstream file {}: {e}",
                    self.include.display()
                ))
            })
    }

    /// Puts back what the include file held before (or removes it).
    async fn restore(&self, previous: &Option<Vec<u8>>) {
        let r = match previous {
            Some(p) => self.write_atomically(p).await,
            None => tokio::fs::remove_file(&self.include)
                .await
                .map_err(DriverError::from),
        };
        if let Err(e) = r {
            tracing::error!(file = %self.include.display(), error = %e, "could not restore the previous nginx upstream file");
        }
    }

    /// Puts the candidate in place and runs `nginx -t`; on rejection puts
    /// the previous file back. Returns the previous content.
    async fn replace_and_test(&self, text: &str) -> Result<Option<Vec<u8>>, DriverError> {
        let previous = match tokio::fs::read(&self.include).await {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(DriverError::new(format!(
                    "cannot read the nginx upstream file {}: {e}",
                    self.include.display()
                )))
            }
        };
        self.write_atomically(text.as_bytes()).await?;
        if let Err(e) = self.run_nginx(&["-t", "-q"]).await {
            self.restore(&previous).await;
            return Err(DriverError::new(format!(
                "nginx rejected the new upstream file, the previous one stays live: {}",
                e.message()
            )));
        }
        Ok(previous)
    }

    fn master(&self) -> Result<Proc, DriverError> {
        let text = std::fs::read_to_string(&self.pid_file).map_err(|e| {
            DriverError::new(format!(
                "nginx is not running: cannot read its pid file {}: {e}",
                self.pid_file.display()
            ))
        })?;
        if text.trim().is_empty() {
            // `nginx -t` creates the pid file empty when nginx is not running.
            return Err(DriverError::new(format!(
                "nginx is not running: its pid file {} is empty",
                self.pid_file.display()
            )));
        }
        let pid: u32 = text.trim().parse().map_err(|_| {
            DriverError::new(format!(
                "nginx pid file {} holds {:?}, not a pid",
                self.pid_file.display(),
                text.trim()
            ))
        })?;
        match proc_stat(pid) {
            Some(st) if st.state != 'Z' => Ok(Proc { pid, start: st.start }),
            _ => Err(DriverError::new(format!(
                "the nginx master (pid {pid} from {}) is not running",
                self.pid_file.display()
            ))),
        }
    }

    /// The master's children once it has a worker that is not shutting
    /// down and the set has not changed for a moment. A master that has
    /// only just started may still be forking its first workers: a reload
    /// sent then would let those late workers — which route by the *old*
    /// file — pass for the new generation, and the change would be
    /// confirmed before it took. Bounded by the reload timeout.
    async fn settled_generation(&self, master: &Proc) -> Result<BTreeSet<Proc>, DriverError> {
        const SETTLE: Duration = Duration::from_millis(20);
        let deadline = Instant::now() + self.reload_timeout;
        let mut seen = children_of(master.pid);
        loop {
            sleep(SETTLE).await;
            if !is_alive(master) {
                return Err(DriverError::new(format!(
                    "the nginx master (pid {}) exited before the change; nothing was changed",
                    master.pid
                )));
            }
            let now = children_of(master.pid);
            let serving = now.iter().any(|p| !is_shutting_down(p.pid));
            if serving && now == seen {
                return Ok(now);
            }
            if Instant::now() >= deadline {
                let why = if serving {
                    "its worker processes kept changing (workers crashing, or another reload under way)"
                } else {
                    "it has no worker process; deploykit needs nginx running with `master_process on` \
                     (the default)"
                };
                return Err(DriverError::new(format!(
                    "the nginx master (pid {}) had no settled worker processes within {:.1}s: {why}; \
                     nothing was changed",
                    master.pid,
                    self.reload_timeout.as_secs_f64()
                )));
            }
            seen = now;
        }
    }

    /// Restores the previous file and returns `e`.
    async fn fail(&self, previous: &Option<Vec<u8>>, e: DriverError) -> Result<(), DriverError> {
        self.restore(previous).await;
        Err(e)
    }

    /// Render, check, rename, reload, confirm; commit `new` on success.
    async fn apply_state(&self, new: State, draining: Option<InstanceId>) -> Result<(), DriverError> {
        let text = self.render_file(&new);
        let master = self.master()?;
        let before = self.settled_generation(&master).await?;
        let previous = self.replace_and_test(&text).await?;
        if let Err(e) = self.run_nginx(&["-s", "reload"]).await {
            return self
                .fail(
                    &previous,
                    DriverError::new(format!("nginx reload failed: {}", e.message())),
                )
                .await;
        }
        // Confirm: a new generation of workers under the same master.
        let deadline = Instant::now() + self.reload_timeout;
        loop {
            match proc_stat(master.pid) {
                Some(st) if st.state != 'Z' && st.start == master.start => {}
                _ => {
                    let e = DriverError::new(format!(
                        "the nginx master (pid {}) is gone: the reload did not take",
                        master.pid
                    ));
                    return self.fail(&previous, e).await;
                }
            }
            let now = children_of(master.pid);
            let new_generation = now.iter().any(|p| !before.contains(p));
            // The master waits ~100 ms after starting the new workers before
            // it tells the old ones to quit; until then they still accept
            // and route by the old file. An old worker told to quit retitles
            // itself before it closes its listeners and idle connections.
            let old_quitting = before.iter().all(|p| !is_alive(p) || is_shutting_down(p.pid));
            if new_generation && old_quitting {
                break;
            }
            if Instant::now() >= deadline {
                let e = DriverError::new(format!(
                    "nginx started no new workers within {:.1}s of the reload: the reload did not take \
                     (see nginx's error log); the previous upstream file is back in place",
                    self.reload_timeout.as_secs_f64()
                ));
                return self.fail(&previous, e).await;
            }
            sleep(Duration::from_millis(20)).await;
        }
        let mut st = self.lock_state();
        let drains = std::mem::take(&mut st.drains);
        *st = new;
        st.drains = drains;
        // A backend back in rotation has nothing left to drain.
        let ready: Vec<InstanceId> = st
            .backends
            .iter()
            .filter(|(_, a)| *a == Admin::Ready)
            .map(|(b, _)| b.id.clone())
            .collect();
        for id in ready {
            st.drains.remove(&id);
        }
        if let Some(id) = draining {
            st.drains.insert(id, before);
        }
        tracing::debug!(file = %self.include.display(), "nginx upstream reloaded");
        Ok(())
    }
}

#[async_trait]
impl LoadBalancer for NginxLoadBalancer {
    fn name(&self) -> &str {
        "nginx"
    }

    /// The include file exists, the master in the pid file is running and
    /// has worker processes (a reload can be confirmed), and `nginx -T`
    /// accepts the configuration as it is and lists the include file among
    /// those it reads (a file nginx does not include would route nothing).
    ///
    /// * Idempotent: yes (changes no routing; runs `nginx -T`, which may
    ///   create log files nginx's config names, as nginx itself would).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn preflight(&self) -> Result<(), DriverError> {
        self.inner.preflight().await
    }

    /// Renders the backend `down`, tests, reloads, and remembers the
    /// workers of the previous generation for the drain confirmation.
    ///
    /// * Idempotent: yes (a second call changes nothing).
    /// * Cancel-safe: yes; the change runs to completion in a task.
    /// * On failure: the previous file is back and still live.
    async fn drain(&self, backend: &Backend) -> Result<(), DriverError> {
        self.take_out(backend, Admin::Draining).await
    }

    /// For a backend out of rotation: how many nginx workers of the
    /// generation before it was taken out are still alive (0 = drained). For
    /// a backend in rotation: `None` (nginx cannot tell).
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn active_connections(&self, backend: &Backend) -> Result<Option<u64>, DriverError> {
        self.check_backend(backend)?;
        let st = self.inner.lock_state().clone();
        if st.admin(&backend.id) == Some(Admin::Ready) {
            return Ok(None);
        }
        let Some(old) = st.drains.get(&backend.id) else {
            return Ok(Some(0));
        };
        let alive = old.iter().filter(|p| is_alive(p)).count();
        Ok(Some(alive as u64))
    }

    /// Renders the backend in rotation again (with its group's weight).
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; the change runs to completion in a task.
    /// * On failure: the previous file is back and still live.
    async fn enable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.check_backend(backend)?;
        if self.inner.lock_state().admin(&backend.id) == Some(Admin::Ready) {
            return Ok(());
        }
        let id = backend.id.clone();
        self.edit(None, move |st| {
            st.set_admin(&id, Admin::Ready);
            Ok(())
        })
        .await
    }

    /// As [`drain`](Self::drain): nginx has no sharper cut than `down` plus
    /// a reload (requests in flight finish in the old workers).
    async fn disable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.take_out(backend, Admin::Disabled).await
    }

    /// Weights per server so each group gets its share; 0 % groups `down`.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (runs in a task).
    /// * On failure: the previous split is still live.
    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        let known = self.inner.lock_state().groups();
        let shares = check_weights(weights, &known)?;
        self.edit(None, move |st| {
            st.shares = Some(shares);
            Ok(())
        })
        .await
    }

    /// Only `group`'s enabled servers up, every other server `down` (or
    /// `backup`), in one reload: nginx switches atomically per worker
    /// generation.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (runs in a task).
    /// * On failure: the previously live group is still live.
    async fn switch_to(&self, group: &Group) -> Result<(), DriverError> {
        let g = group.clone();
        let upstream = self.inner.upstream.clone();
        self.edit(None, move |st| {
            if st.ready_per_group().get(&g).copied().unwrap_or(0) == 0 {
                return Err(DriverError::new(format!(
                    "cannot switch nginx upstream {upstream} to group {g}: it has no enabled backend"
                )));
            }
            st.shares = Some(BTreeMap::from([(g, 100)]));
            Ok(())
        })
        .await
    }

    /// From the driver's state (what the live file says): the one group
    /// with enabled servers and a share above 0, if exactly one is.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        let st = self.inner.lock_state().clone();
        let ready = st.ready_per_group();
        let live: Vec<&Group> = match &st.shares {
            Some(s) => s
                .iter()
                .filter(|(g, p)| **p > 0 && ready.get(*g).copied().unwrap_or(0) > 0)
                .map(|(g, _)| g)
                .collect(),
            None => ready.keys().collect(),
        };
        Ok(match live.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct ProcStat {
    state: char,
    ppid: u32,
    start: u64,
}

/// `/proc/<pid>/stat`: state, parent and start time.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may contain spaces
    // and ')': the fields after the last ')' are fixed.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        // Field 22 overall: index 19 after the name.
        start: f.get(19)?.parse().ok()?,
    })
}

/// Whether `nginx -T` output lists `file` among the files nginx read (its
/// `# configuration file PATH:` headers), comparing canonical paths.
fn includes_file(dump: &str, file: &Path) -> bool {
    let want = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    dump.lines()
        .filter_map(|l| l.strip_prefix("# configuration file ")?.strip_suffix(':'))
        .any(|p| {
            let p = Path::new(p);
            p == file || std::fs::canonicalize(p).is_ok_and(|c| c == want)
        })
}

/// Whether the process is still the same, live (not zombie) process.
fn is_alive(p: &Proc) -> bool {
    matches!(proc_stat(p.pid), Some(s) if s.start == p.start && s.state != 'Z')
}

/// Whether an nginx worker has retitled itself "worker process is shutting
/// down" (it has stopped accepting and closes idle connections).
fn is_shutting_down(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).contains("shutting down"))
        .unwrap_or(false)
}

/// Live (not zombie) children of `parent`.
fn children_of(parent: u32) -> BTreeSet<Proc> {
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(st) = proc_stat(pid) {
            if st.ppid == parent && st.state != 'Z' {
                out.insert(Proc { pid, start: st.start });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: &str, port: u16, group: &str) -> Backend {
        Backend {
            id: InstanceId::new(id).unwrap(),
            address: Address::parse(&format!("127.0.0.1:{port}")).unwrap(),
            group: Group::new(group).unwrap(),
        }
    }

    fn lb(idle_as_backup: bool) -> NginxLoadBalancer {
        NginxLoadBalancer::builder()
            .include_file("/tmp/deploykit-test-upstream.conf")
            .backends([
                backend("s-1", 9001, "stable"),
                backend("s-2", 9002, "stable"),
                backend("c-1", 9003, "canary"),
            ])
            .idle_groups_as_backup(idle_as_backup)
            .build()
            .unwrap()
    }

    #[test]
    fn renders_every_server_up_by_default() {
        assert_eq!(
            lb(false).render(),
            "# Managed by deploykit: rendered from its state, replaced on every change.\n\
             upstream app {\n    server 127.0.0.1:9001; # s-1\n    server 127.0.0.1:9002; # s-2\n    \
             server 127.0.0.1:9003; # c-1\n}\n"
        );
    }

    #[test]
    fn shares_become_weights_and_zero_is_down() {
        let lb = lb(false);
        {
            let mut st = lb.inner.lock_state();
            st.shares = Some(BTreeMap::from([
                (Group::new("stable").unwrap(), 95),
                (Group::new("canary").unwrap(), 5),
            ]));
        }
        let up = lb.upstream();
        let w: Vec<Option<u32>> = up.servers.iter().map(|s| s.weight).collect();
        assert_eq!(w, vec![Some(1000), Some(1000), Some(105)]);
        {
            let mut st = lb.inner.lock_state();
            st.shares = Some(BTreeMap::from([(Group::new("stable").unwrap(), 100)]));
            st.set_admin(&InstanceId::new("s-2").unwrap(), Admin::Draining);
        }
        let text = lb.render();
        assert!(
            text.contains("server 127.0.0.1:9001 weight=1000; # s-1"),
            "{text}"
        );
        assert!(text.contains("server 127.0.0.1:9002 down; # s-2"), "{text}");
        assert!(text.contains("server 127.0.0.1:9003 down; # c-1"), "{text}");
        assert!(!text.contains("weight=0"), "{text}");
    }

    #[test]
    fn a_new_driver_adopts_the_state_recorded_in_the_include_file() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("upstream.conf");
        let build = || {
            NginxLoadBalancer::builder()
                .include_file(&include)
                .backends([
                    backend("s-1", 9001, "stable"),
                    backend("s-2", 9002, "stable"),
                    backend("c-1", 9003, "canary"),
                ])
                .build()
                .unwrap()
        };
        let first = build();
        // Default state: nothing to record, the file is the plain block.
        assert!(!first.render().contains(STATE_MARKER));
        {
            let mut st = first.inner.lock_state();
            st.shares = Some(BTreeMap::from([
                (Group::new("stable").unwrap(), 90),
                (Group::new("canary").unwrap(), 10),
            ]));
            st.set_admin(&InstanceId::new("s-2").unwrap(), Admin::Disabled);
        }
        let text = first.render();
        assert!(
            text.contains(
                r#"# deploykit-state: {"shares":{"canary":10,"stable":90},"out":{"s-2":"disabled"}}"#
            ),
            "{text}"
        );
        std::fs::write(&include, &text).unwrap();
        // A second process: same split, s-2 still out, not "all in rotation".
        let second = build();
        assert_eq!(second.render(), text);
        assert!(second.render().contains("server 127.0.0.1:9002 down; # s-2"));
        // A record naming a group that is no longer configured is ignored.
        std::fs::write(
            &include,
            text.replace(r#"{"canary":10,"stable":90}"#, r#"{"blue":100}"#),
        )
        .unwrap();
        assert!(!build().render().contains("down"), "{}", build().render());
        // So is a garbled one.
        std::fs::write(&include, format!("{STATE_MARKER}{{not json\n")).unwrap();
        assert!(!build().render().contains("down"));
    }

    /// A driver whose `nginx` is `true` or `false`: `nginx -t` passes or
    /// fails without a real nginx.
    fn with_fake_nginx(include: &Path, nginx: &str) -> NginxLoadBalancer {
        NginxLoadBalancer::builder()
            .include_file(include)
            .binary(nginx)
            .backends([backend("s-1", 9001, "stable"), backend("c-1", 9003, "canary")])
            .build()
            .unwrap()
    }

    fn dir_entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_symlink_planted_at_the_old_fixed_temp_path_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("upstream.conf");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious\n").unwrap();
        // Earlier releases wrote every change to this one fixed name.
        let planted = dir.path().join(".upstream.conf.deploykit-tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let lb = with_fake_nginx(&include, "true");
        lb.install().await.unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
        let meta = std::fs::symlink_metadata(&include).unwrap();
        assert!(
            meta.file_type().is_file(),
            "the include is a regular file, not a link"
        );
        assert_eq!(std::fs::read_to_string(&include).unwrap(), lb.render());
        assert_eq!(
            dir_entries(dir.path()),
            [".upstream.conf.deploykit-tmp", "upstream.conf", "victim"]
        );
    }

    #[tokio::test]
    async fn a_rejected_file_is_rolled_back_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("upstream.conf");
        std::fs::write(&include, "# what nginx runs now\n").unwrap();
        let e = with_fake_nginx(&include, "false").install().await.unwrap_err();
        assert!(
            e.message().contains("nginx rejected the new upstream file"),
            "{e}"
        );
        assert_eq!(
            std::fs::read_to_string(&include).unwrap(),
            "# what nginx runs now\n"
        );
        assert_eq!(dir_entries(dir.path()), ["upstream.conf"]);
    }

    #[test]
    fn idle_groups_can_be_backups() {
        let lb = lb(true);
        lb.inner.lock_state().shares = Some(BTreeMap::from([(Group::new("stable").unwrap(), 100)]));
        let text = lb.render();
        assert!(text.contains("server 127.0.0.1:9003 backup; # c-1"), "{text}");
        // A drained server is down, never a backup.
        lb.inner
            .lock_state()
            .set_admin(&InstanceId::new("c-1").unwrap(), Admin::Draining);
        assert!(lb.render().contains("server 127.0.0.1:9003 down; # c-1"));
    }

    #[test]
    fn builder_rejects_bad_settings_naming_the_field() {
        let err = NginxLoadBalancer::builder().build().unwrap_err().to_string();
        assert!(
            err.contains("nginx upstream") || err.contains("include_file"),
            "{err}"
        );
        let err = NginxLoadBalancer::builder()
            .include_file("relative.conf")
            .backend(backend("a", 1, "g"))
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("include_file") && err.contains("absolute"), "{err}");
        let err = NginxLoadBalancer::builder()
            .upstream("app; evil")
            .include_file("/tmp/x")
            .backend(backend("a", 1, "g"))
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("nginx upstream"), "{err}");
        let err = NginxLoadBalancer::builder()
            .include_file("/tmp/x")
            .backend(backend("a", 1, "g"))
            .backend(backend("b", 1, "g"))
            .build()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("127.0.0.1:1") && err.contains("two instances"),
            "{err}"
        );
        let err = NginxLoadBalancer::builder()
            .include_file("/tmp/x")
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("nginx backends"), "{err}");
    }

    #[test]
    fn the_include_is_found_in_the_nginx_dump_by_its_header_line() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("app.upstream");
        std::fs::write(&f, "upstream app {}\n").unwrap();
        let dump = format!(
            "# configuration file /etc/nginx/nginx.conf:\nhttp {{ include {0}; }}\n\n# configuration file {0}:\nupstream app {{}}\n",
            f.display()
        );
        assert!(includes_file(&dump, &f));
        // The same file reached through a symlinked directory still counts.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(includes_file(&dump, &link.join("app.upstream")));
        // Mentioned only in a directive, never read: not included.
        let only_named = format!(
            "# configuration file /etc/nginx/nginx.conf:\n# include {};\n",
            f.display()
        );
        assert!(!includes_file(&only_named, &f));
        assert!(!includes_file("", &f));
    }

    #[test]
    fn proc_stat_parses_names_with_parentheses() {
        let s = "1234 (a) b) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        let st = parse_stat(s).unwrap();
        assert_eq!((st.state, st.ppid, st.start), ('S', 1, 98765));
        let me = proc_stat(std::process::id()).unwrap();
        assert_ne!(me.state, 'Z');
    }

    #[test]
    fn object_safe() {
        fn boxed(lb: Box<dyn LoadBalancer>) -> String {
            lb.name().to_string()
        }
        assert_eq!(boxed(Box::new(lb(false))), "nginx");
    }
}
