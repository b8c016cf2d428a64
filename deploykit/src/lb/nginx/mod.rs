//! The nginx driver: deploykit owns one upstream include file.
//!
//! The file is *rendered* from typed state ([`Upstream`], one
//! [`UpstreamServer`] per backend with its weight and `down` / `backup`
//! flags) after every address was validated ([`Address`](crate::Address)); it is never
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
//! # As few reloads as possible
//!
//! A reload makes the old workers close their idle keep-alive connections
//! to clients, and a client whose next request is already on its way on one
//! of them gets no answer: nginx open source cannot avoid that race. So a
//! change that renders the upstream block nginx already runs reloads
//! nothing (a changed `# deploykit-state:` comment is written without a
//! reload), changes that wait for the same reload (the drains of one batch)
//! share it, and [`DrainMode::UpstreamRetry`] drains without any reload.
//! [`NginxLoadBalancer::reloads`] counts them.
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

mod procfs;
mod render;
mod routing;
mod state;
pub(crate) use state::fuzz_line as fuzz_state_line;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::Command;

pub use render::{Upstream, UpstreamServer};

use super::roster::{self, run_to_completion, Admin, Roster, RosterRules};
use crate::error::{DriverError, Error, PreflightFailure, Result};
use crate::names::{validate_name, Group, InstanceId};
use crate::routing::{check_groups, Capabilities, Capability, TrafficPolicy};
use crate::state::atomic::write_atomic;
use crate::traits::{Backend, GroupWeight, LoadBalancer};
use render::{render_file, upstream_for, RenderOpts};
use state::{adopt_saved, State};

/// How the nginx driver takes a backend out of rotation for a drain.
///
/// Every nginx reload makes the old workers close their idle keep-alive
/// connections to clients, and a client that sends its next request on
/// one of them at that moment sees the connection closed with no answer
/// (measured: 14–22 of ~90,000 requests of a rolling deployment of 4
/// instances, with a client that never retries). `UpstreamRetry` drains
/// without a reload, so a rolling deployment never reloads nginx.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrainMode {
    /// Render the backend `down` and reload; the drain is confirmed when
    /// the workers of the previous generation have exited. Two reloads per
    /// batch of a rolling deployment (out, back in).
    #[default]
    Reload,
    /// No reload: the upstream is rendered once with `max_fails=0` (nginx's
    /// passive failover never marks a server failed, so it cannot mark
    /// every server failed at once) and `keepalive`, and nginx's config must
    /// retry a failed connect on the next server (`proxy_next_upstream
    /// error timeout`, nginx's default, without `non_idempotent`). A drain
    /// leaves nginx alone; the instance's graceful stop closes its listener
    /// first and finishes its requests in flight, and nginx retries the
    /// refused connects on another server.
    ///
    /// What it guarantees: a request nginx could not *send* to a stopping
    /// instance (its connect was refused: the listener is closed) is
    /// retried on another server, whatever its method. A request
    /// already sent on a connection the instance then closed without
    /// answering — a pooled upstream connection closed as the instance
    /// stopped, or one still in its listen queue when it closed — is
    /// retried only if it is idempotent: a `POST`, `PATCH` or `LOCK` gets a
    /// 502 instead, because nginx cannot know whether the instance acted on
    /// it. Other limits: an instance takes traffic as soon as it accepts
    /// connections (health checks no longer gate it), and a stopped instance
    /// on a host that is down costs each request up to
    /// `proxy_connect_timeout` before the retry.
    UpstreamRetry,
}

impl std::fmt::Display for DrainMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DrainMode::Reload => "reload",
            DrainMode::UpstreamRetry => "upstream-retry",
        })
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
    drain: DrainMode,
    location_include: Option<PathBuf>,
    mirror_timeout: Option<Duration>,
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
            drain: DrainMode::Reload,
            location_include: None,
            mirror_timeout: None,
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

    /// How a drain takes a backend out of rotation. Default
    /// [`DrainMode::Reload`].
    pub fn drain_mode(mut self, mode: DrainMode) -> Self {
        self.drain = mode;
        self
    }

    /// The location-level include file deploykit owns, which turns on
    /// routing policies (header, cookie and query rules, sticky splits,
    /// mirroring: [`LoadBalancer::apply_policy`]). nginx's config must
    /// `include` it inside the `location` that proxies to the application,
    /// in place of its `proxy_pass` line; [`NginxLoadBalancer::install`]
    /// (`deploykit setup`) writes it. Without it the driver does weights
    /// and switches only, exactly as before.
    pub fn location_include(mut self, path: impl Into<PathBuf>) -> Self {
        self.location_include = Some(path.into());
        self
    }

    /// Bounds how long nginx waits for the shadow when it sends a mirrored
    /// copy (its connect, send and read timeouts in the mirror location).
    /// nginx reads a client's next request on a keep-alive connection only
    /// once every mirror copy of the previous one has finished, so a slow
    /// shadow delays the clients of the primary by its own latency; this
    /// caps that delay. The copy is still delivered and the shadow still
    /// answers it (and counts it in its metrics); nginx only stops
    /// waiting, and logs the timeout. Default none (nginx's 60 s). See
    /// docs/routing.md for the measurements.
    pub fn mirror_timeout(mut self, timeout: Duration) -> Self {
        self.mirror_timeout = Some(timeout);
        self
    }

    /// Checks the settings and builds the driver. Touches nothing: call
    /// [`NginxLoadBalancer::install`] to write the first file.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: no include file, a relative
    /// or parentless include file, a bad upstream name, no backends, a
    /// backend id or address used twice, a zero reload timeout, a mirror
    /// timeout under 1 ms.
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
        let roster = Roster::new(
            self.backends,
            RosterRules {
                field: "nginx backends",
                when_empty: "is empty; add the instances behind the upstream",
                member: "instance",
                distinct_addresses: true,
            },
        )?;
        if self.reload_timeout.is_zero() {
            return Err(Error::invalid("nginx reload_timeout", "must be greater than 0"));
        }
        if self.mirror_timeout.is_some_and(|t| t < Duration::from_millis(1)) {
            return Err(Error::invalid(
                "nginx mirror_timeout",
                "must be at least 1ms; nginx counts its timeouts in milliseconds, e.g. 200ms",
            ));
        }
        if let Some(loc) = &self.location_include {
            if !loc.is_absolute() || loc.file_name().is_none() || loc == &include {
                return Err(Error::invalid(
                    "nginx location_include",
                    format!(
                        "{} must be an absolute path to a file other than the upstream include",
                        loc.display()
                    ),
                ));
            }
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
            roster,
            drains: BTreeMap::new(),
            policy: None,
            via: BTreeMap::new(),
        };
        adopt_saved(&include, &mut state);
        if state.policy.is_some() && self.location_include.is_none() {
            tracing::warn!(file = %include.display(),
                "ignoring the recorded routing policy: load_balancer.location_include is not set, so this driver cannot render it");
            state.policy = None;
        }
        Ok(NginxLoadBalancer {
            inner: Arc::new(Inner {
                upstream: self.upstream,
                include,
                binary: self.binary,
                global_args,
                pid_file: self.pid_file,
                reload_timeout: self.reload_timeout,
                opts: RenderOpts {
                    idle_as_backup: self.idle_as_backup,
                    drain: self.drain,
                    routing: self.location_include.is_some(),
                },
                location: self.location_include,
                mirror_timeout: self.mirror_timeout,
                reloads: AtomicU64::new(0),
                state: Mutex::new(state),
                apply: tokio::sync::Mutex::new(()),
                queued: Mutex::new(Vec::new()),
            }),
        })
    }
}

/// Each file a change replaced, with what it held before (`None`: it did
/// not exist).
type Previous = Vec<(PathBuf, Option<Vec<u8>>)>;

/// A change to the driver's state; it may refuse (then nothing changes).
type Edit = Box<dyn FnOnce(&mut State) -> Result<(), DriverError> + Send>;

/// A change waiting for the apply lock; see [`NginxLoadBalancer::edit`].
struct Queued {
    edit: Edit,
    draining: Option<InstanceId>,
    done: tokio::sync::oneshot::Sender<Result<(), DriverError>>,
}

impl std::fmt::Debug for Queued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("draining", &self.draining)
            .finish_non_exhaustive()
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
    /// The location include, when routing policies are on.
    location: Option<PathBuf>,
    /// nginx's timeouts toward the shadow in the mirror location.
    mirror_timeout: Option<Duration>,
    binary: PathBuf,
    global_args: Vec<OsString>,
    pid_file: PathBuf,
    reload_timeout: Duration,
    opts: RenderOpts,
    /// Reloads sent and confirmed, for [`NginxLoadBalancer::reloads`].
    reloads: AtomicU64,
    state: Mutex<State>,
    /// Serialises changes: one render-check-rename-reload at a time.
    apply: tokio::sync::Mutex<()>,
    /// Changes waiting for `apply`, applied together by the next holder.
    queued: Mutex<Vec<Queued>>,
}

impl NginxLoadBalancer {
    /// A builder with the defaults.
    pub fn builder() -> NginxBuilder {
        NginxBuilder::default()
    }

    /// The upstream block for the current state.
    pub fn upstream(&self) -> Upstream {
        let st = self.inner.lock_state().clone();
        upstream_for(&self.inner.upstream, &st, self.inner.opts)
    }

    /// Reloads this driver sent and saw take since it was built (skipped
    /// no-op changes do not count): how often a deployment made nginx's
    /// workers close their idle client connections.
    pub fn reloads(&self) -> u64 {
        self.inner.reloads.load(Ordering::Relaxed)
    }

    /// How a drain takes a backend out of rotation.
    pub fn drain_mode(&self) -> DrainMode {
        self.inner.opts.drain
    }

    /// The include file's text for the current state: the upstream block,
    /// and, when any backend is out of rotation or traffic is split, the
    /// `# deploykit-state:` line a later process adopts.
    pub fn render(&self) -> String {
        let st = self.inner.lock_state().clone();
        render_file(&self.inner.upstream, &st, self.inner.opts)
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
        run_to_completion("nginx", async move {
            let _g = inner.apply.lock().await;
            let st = inner.lock_state().clone();
            let previous = inner.replace_and_test(&st).await?;
            drop(previous);
            Ok(())
        })
        .await
    }

    /// As [`install`](Self::install), with the traffic split by `weights`
    /// first (as [`LoadBalancer::set_weights`] would, without a reload):
    /// a group at 0 % — a canary that is stopped between deployments,
    /// blue-green's idle environment — is rendered `down` in the first
    /// file nginx reads, and the split is recorded in the file's
    /// `# deploykit-state:` line for the next process.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes (the work runs to completion in a task).
    /// * On failure: the previous file (if any) is back in place and the
    ///   driver's state is unchanged.
    ///
    /// # Errors
    /// Invalid weights (as [`LoadBalancer::set_weights`]); otherwise as
    /// [`install`](Self::install).
    pub async fn install_with_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        let shares = self.inner.lock_state().roster.check_weights(weights)?;
        let inner = self.inner.clone();
        run_to_completion("nginx", async move {
            let _g = inner.apply.lock().await;
            let mut st = inner.lock_state().clone();
            st.roster.shares = Some(shares);
            st.policy = None;
            inner.replace_and_test(&st).await?;
            *inner.lock_state() = st;
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
        let inner = self.inner.clone();
        run_to_completion("nginx", async move {
            let _g = inner.apply.lock().await;
            let st = inner.lock_state().clone();
            inner.reload_with(st, Vec::new()).await
        })
        .await
    }

    /// Queues `edit` and applies it on the freshest state, under the
    /// apply lock. Edits queued while another change holds the lock are
    /// applied together by whichever of them gets it next, with one reload:
    /// the drains of one batch share a reload instead of taking one each.
    async fn edit(
        &self,
        draining: Option<InstanceId>,
        edit: impl FnOnce(&mut State) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<(), DriverError> {
        let inner = self.inner.clone();
        run_to_completion("nginx", async move {
            let (done, result) = tokio::sync::oneshot::channel();
            roster::lock(&inner.queued).push(Queued {
                edit: Box::new(edit),
                draining,
                done,
            });
            {
                let _g = inner.apply.lock().await;
                let batch = std::mem::take(&mut *roster::lock(&inner.queued));
                // Empty when an earlier holder of the lock took ours along.
                if !batch.is_empty() {
                    inner.apply_batch(batch).await;
                }
            }
            result.await.unwrap_or_else(|_| {
                Err(DriverError::new(
                    "the nginx change was dropped before it was applied",
                ))
            })
        })
        .await
    }

    fn check_backend(&self, backend: &Backend) -> Result<(), DriverError> {
        let st = self.inner.lock_state();
        match st.roster.get(&backend.id) {
            None => Err(DriverError::new(format!(
                "nginx upstream {} has no backend {}; known: {}",
                self.inner.upstream,
                backend.id,
                st.roster.ids()
            ))),
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
        let current = self.inner.lock_state().roster.admin(&id);
        if current == Some(admin) {
            return Ok(());
        }
        // Draining -> disabled (or back) renders the same file in reload
        // mode, and apply_state then skips the reload.
        let id2 = id.clone();
        self.edit(Some(id), move |st| {
            st.roster.set_admin(&id2, admin);
            Ok(())
        })
        .await
    }
}

impl Inner {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        roster::lock(&self.state)
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
        let unreachable = |e: DriverError| e.with_preflight_failure(PreflightFailure::Unreachable);
        let master = procfs::master(&self.pid_file).map_err(unreachable)?;
        // A master without workers (`master_process off`) cannot confirm a
        // reload: found here, not at the first change.
        procfs::settled_generation(&master, self.reload_timeout)
            .await
            .map_err(unreachable)?;
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
            ))
            .with_preflight_failure(PreflightFailure::NotWired));
        }
        if let Some(loc) = &self.location {
            if !includes_file(&dump, loc) {
                let shown = loc.display();
                return Err(DriverError::new(format!(
                    "nginx's configuration does not include the location file {shown}, so routing \
                     policies would route nothing: put `include {shown};` inside the `location` that \
                     proxies to the application, in place of its `proxy_pass` line (`deploykit setup` \
                     writes the file)"
                ))
                .with_preflight_failure(PreflightFailure::NotWired));
            }
        }
        if self.opts.drain == DrainMode::UpstreamRetry {
            if let Some(problem) = retry_config_problem(&dump) {
                return Err(DriverError::new(format!(
                    "load_balancer.drain = \"upstream-retry\" needs nginx to retry a refused connect on \
                     the next server, but {problem}; use `proxy_next_upstream error timeout;` (nginx's \
                     default) or drain = \"reload\""
                )));
            }
        }
        Ok(())
    }

    /// Replaces `path` with `text` through the atomic-write helper: a temp
    /// file created exclusively under a random name (never through a
    /// planted symlink), fsynced and renamed over it.
    async fn write_atomically(&self, path: &Path, text: &[u8]) -> Result<(), DriverError> {
        let target = path.to_path_buf();
        let bytes = text.to_vec();
        tokio::task::spawn_blocking(move || write_atomic(&target, &bytes))
            .await
            .map_err(|e| DriverError::new(format!("writing the nginx file panicked: {e}")))?
            .map_err(|e| DriverError::new(format!("cannot replace the nginx file {}: {e}", path.display())))
    }

    /// Every file the driver owns with its text for `st`: the upstream
    /// include, and the location include when routing is on.
    fn files_for(&self, st: &State) -> Vec<(&Path, String)> {
        let mut files = vec![(self.include.as_path(), render_file(&self.upstream, st, self.opts))];
        if let Some(loc) = &self.location {
            files.push((
                loc.as_path(),
                routing::render_location(&self.upstream, st.policy.as_ref(), self.mirror_timeout),
            ));
        }
        files
    }

    /// What nginx runs for `st`: every rendered line but the state comment,
    /// so that two states nginx cannot tell apart share one reload.
    fn nginx_view(&self, st: &State) -> String {
        let mut view = upstream_for(&self.upstream, st, self.opts).render();
        if self.opts.routing {
            view.push_str(&routing::render_http(&self.upstream, st, self.opts));
            view.push_str(&routing::render_location(
                &self.upstream,
                st.policy.as_ref(),
                self.mirror_timeout,
            ));
        }
        view
    }

    /// Puts back what each file held before (or removes it).
    async fn restore(&self, previous: &[(PathBuf, Option<Vec<u8>>)]) {
        for (path, before) in previous {
            let r = match before {
                Some(p) => self.write_atomically(path, p).await,
                None => tokio::fs::remove_file(path).await.map_err(DriverError::from),
            };
            if let Err(e) = r {
                tracing::error!(file = %path.display(), error = %e, "could not restore the previous nginx file");
            }
        }
    }

    /// Puts the files for `st` in place (the location include first: nginx
    /// reads neither before the test and the reload) and runs `nginx -t`; on
    /// rejection puts the previous files back. Returns the previous content.
    async fn replace_and_test(&self, st: &State) -> Result<Previous, DriverError> {
        let mut previous = Vec::new();
        let mut files = self.files_for(st);
        files.reverse();
        for (path, _) in &files {
            let before = match tokio::fs::read(path).await {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(DriverError::new(format!(
                        "cannot read the nginx file {}: {e}",
                        path.display()
                    )))
                }
            };
            previous.push((path.to_path_buf(), before));
        }
        for (written, (path, text)) in files.iter().enumerate() {
            if let Err(e) = self.write_atomically(path, text.as_bytes()).await {
                self.restore(&previous[..written]).await;
                return Err(e);
            }
        }
        if let Err(e) = self.run_nginx(&["-t", "-q"]).await {
            self.restore(&previous).await;
            return Err(DriverError::new(format!(
                "nginx rejected the new upstream file, the previous one stays live: {}",
                e.message()
            )));
        }
        Ok(previous)
    }

    /// Restores the previous files and returns `e`.
    async fn fail(&self, previous: &Previous, e: DriverError) -> Result<(), DriverError> {
        self.restore(previous).await;
        Err(e)
    }

    /// Applies the queued edits in order on the freshest state (an edit
    /// that refuses is answered alone and leaves the others), then the
    /// result with at most one reload, and answers every edit.
    async fn apply_batch(&self, batch: Vec<Queued>) {
        let mut st = self.lock_state().clone();
        let mut accepted = Vec::new();
        let mut draining = Vec::new();
        for q in batch {
            let mut next = st.clone();
            match (q.edit)(&mut next) {
                Ok(()) => {
                    st = next;
                    draining.extend(q.draining);
                    accepted.push(q.done);
                }
                Err(e) => {
                    let _ = q.done.send(Err(e));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        let r = self.apply_state(st, draining).await;
        for done in accepted {
            let answer = match &r {
                Ok(()) => Ok(()),
                Err(e) if e.is_transient() => Err(DriverError::transient(e.to_string())),
                Err(e) => Err(DriverError::new(e.to_string())),
            };
            let _ = done.send(answer);
        }
    }

    /// Applies `new`: when it renders the file nginx already runs, only
    /// the driver's state changes (no reload); otherwise render, check,
    /// rename, reload, confirm. Commits `new` on success.
    async fn apply_state(&self, new: State, draining: Vec<InstanceId>) -> Result<(), DriverError> {
        let (text, live_view, live_files) = {
            let live = self.lock_state();
            (
                render_file(&self.upstream, &new, self.opts),
                self.nginx_view(&live),
                self.files_for(&live),
            )
        };
        let mut on_disk_is_live = true;
        for (path, live_text) in &live_files {
            let on_disk = tokio::fs::read(path).await.ok();
            on_disk_is_live &= on_disk.as_deref() == Some(live_text.as_bytes());
        }
        if self.nginx_view(&new) != live_view || !on_disk_is_live {
            return self.reload_with(new, draining).await;
        }
        let live_file = &live_files[0].1;
        // nginx already runs this upstream block: a reload would only close
        // idle client connections. Only the recorded state may differ (a
        // comment nginx ignores), and is written without a reload.
        if &text != live_file {
            self.write_atomically(&self.include, text.as_bytes()).await?;
        }
        self.commit(new, Vec::new(), BTreeSet::new());
        Ok(())
    }

    /// Render, check, rename, reload, confirm; commit `new` on success.
    async fn reload_with(&self, new: State, draining: Vec<InstanceId>) -> Result<(), DriverError> {
        let master = procfs::master(&self.pid_file)?;
        let before = procfs::settled_generation(&master, self.reload_timeout).await?;
        let previous = self.replace_and_test(&new).await?;
        if let Err(e) = self.run_nginx(&["-s", "reload"]).await {
            return self
                .fail(
                    &previous,
                    DriverError::new(format!("nginx reload failed: {}", e.message())),
                )
                .await;
        }
        if let Err(e) = procfs::confirm_reload(&master, &before, self.reload_timeout).await {
            return self.fail(&previous, e).await;
        }
        self.reloads.fetch_add(1, Ordering::Relaxed);
        self.commit(new, draining, before);
        tracing::debug!(file = %self.include.display(), "nginx upstream reloaded");
        Ok(())
    }

    /// Makes `new` the driver's state, keeping the drains in progress and
    /// recording `before` (the generation that may still send to them) for
    /// each of `draining`.
    fn commit(&self, new: State, draining: Vec<InstanceId>, before: BTreeSet<procfs::Proc>) {
        let mut st = self.lock_state();
        let drains = std::mem::take(&mut st.drains);
        *st = new;
        st.drains = drains;
        // A backend back in rotation has nothing left to drain.
        let ready: Vec<InstanceId> = st
            .roster
            .iter()
            .filter(|(_, a)| *a == Admin::Ready)
            .map(|(b, _)| b.id.clone())
            .collect();
        for id in ready {
            st.drains.remove(&id);
        }
        for id in draining {
            st.drains.insert(id, before.clone());
        }
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
    /// those it reads (a file nginx does not include would route nothing:
    /// [`PreflightFailure::NotWired`], which refuses rollbacks too; a master
    /// that is not running is [`PreflightFailure::Unreachable`]).
    ///
    /// * Idempotent: yes (changes no routing; runs `nginx -T`, which may
    ///   create log files nginx's config names, as nginx itself would).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn preflight(&self) -> Result<(), DriverError> {
        self.inner.preflight().await
    }

    /// Renders the backend `down`, tests, reloads, and remembers the
    /// workers of the previous generation for the drain confirmation. In
    /// [`DrainMode::UpstreamRetry`] only the driver's state changes: nginx
    /// is neither rewritten nor reloaded.
    ///
    /// * Idempotent: yes (a second call changes nothing).
    /// * Cancel-safe: yes; the change runs to completion in a task.
    /// * On failure: the previous file is back and still live.
    async fn drain(&self, backend: &Backend) -> Result<(), DriverError> {
        self.take_out(backend, Admin::Draining).await
    }

    /// For a backend out of rotation: how many nginx workers of the
    /// generation before it was taken out are still alive (0 = drained). For
    /// a backend in rotation: `None` (nginx cannot tell). In
    /// [`DrainMode::UpstreamRetry`] a draining backend is 0 at once: nginx
    /// keeps no request back for it, the instance's graceful stop finishes
    /// its own requests (and the instance's count, when it reports one,
    /// still bounds the wait).
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn active_connections(&self, backend: &Backend) -> Result<Option<u64>, DriverError> {
        self.check_backend(backend)?;
        let st = self.inner.lock_state().clone();
        if st.roster.admin(&backend.id) == Some(Admin::Ready) {
            return Ok(None);
        }
        let Some(old) = st.drains.get(&backend.id) else {
            return Ok(Some(0));
        };
        let alive = old.iter().filter(|p| procfs::is_alive(p)).count();
        Ok(Some(alive as u64))
    }

    /// Renders the backend in rotation again (with its group's weight).
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; the change runs to completion in a task.
    /// * On failure: the previous file is back and still live.
    async fn enable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.check_backend(backend)?;
        if self.inner.lock_state().roster.admin(&backend.id) == Some(Admin::Ready) {
            return Ok(());
        }
        let id = backend.id.clone();
        self.edit(None, move |st| {
            st.roster.set_admin(&id, Admin::Ready);
            Ok(())
        })
        .await
    }

    /// Renders the backend's server line at `via` (or at its own address
    /// again), tests and reloads. The detour is not written into the
    /// `# deploykit-state:` line, so a driver built later (after a crash)
    /// renders the backend at its own address with its first change.
    ///
    /// * Idempotent: yes (an unchanged file reloads nothing).
    /// * Cancel-safe: yes; the change runs to completion in a task.
    /// * On failure: the previous file is back and still live.
    async fn reroute(
        &self,
        backend: &Backend,
        via: Option<&crate::names::Address>,
    ) -> Result<(), DriverError> {
        self.check_backend(backend)?;
        let id = backend.id.clone();
        let via = via.cloned();
        self.edit(None, move |st| {
            match via {
                Some(a) => st.via.insert(id, a),
                None => st.via.remove(&id),
            };
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
    /// Replaces any routing policy (rules, sticky split, mirror): a plain
    /// split is a policy too.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (runs in a task).
    /// * On failure: the previous split is still live.
    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        let shares = self.inner.lock_state().roster.check_weights(weights)?;
        self.edit(None, move |st| {
            st.roster.shares = Some(shares);
            st.policy = None;
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
            if st.roster.ready_per_group().get(&g).copied().unwrap_or(0) == 0 {
                return Err(DriverError::new(format!(
                    "cannot switch nginx upstream {upstream} to group {g}: it has no enabled backend"
                )));
            }
            st.roster.shares = Some(BTreeMap::from([(g, 100)]));
            st.policy = None;
            Ok(())
        })
        .await
    }

    /// Everything, with a location include
    /// ([`NginxBuilder::location_include`]); weights and switch without.
    fn capabilities(&self) -> Capabilities {
        if self.inner.location.is_some() {
            Capabilities::of(Capability::ALL)
        } else {
            Capabilities::weights_and_switch()
        }
    }

    /// Compiles the policy into both owned files (see the `routing`
    /// module): per-group upstreams, a `map` chain for the rules,
    /// `split_clients` for a sticky split, the mirror's `split_clients`,
    /// `map` and internal location; then `nginx -t` and one reload, as for
    /// every change. A plain split or switch goes through
    /// [`set_weights`](Self::set_weights) / [`switch_to`](Self::switch_to).
    ///
    /// * Idempotent: yes; the live policy again renders the same files and
    ///   reloads nothing.
    /// * Cancel-safe: yes (runs in a task).
    /// * On failure: the previous files are back and still live; a policy
    ///   this driver cannot apply, or naming a group without backends, is
    ///   refused before any file is written.
    async fn apply_policy(&self, policy: &TrafficPolicy) -> Result<(), DriverError> {
        self.capabilities().check("nginx", policy)?;
        let shares = {
            let st = self.inner.lock_state();
            check_groups("nginx", policy, &st.roster.groups())?;
            st.roster.check_weights(&policy.split.weights)?
        };
        if let Some(group) = policy.as_switch() {
            return self.switch_to(group).await;
        }
        if policy.as_weights().is_some() {
            return self.set_weights(&policy.split.weights).await;
        }
        let policy = policy.clone();
        self.edit(None, move |st| {
            st.roster.shares = Some(shares);
            st.policy = Some(policy);
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
        // Requests a rule matches go to the rule's group, whatever the split.
        if st.policy.as_ref().is_some_and(|p| !p.rules.is_empty()) {
            return Ok(None);
        }
        let ready = st.roster.ready_per_group();
        let live: Vec<&Group> = match &st.roster.shares {
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

/// Why the configuration in an `nginx -T` dump cannot serve
/// [`DrainMode::UpstreamRetry`], naming the file and line: a
/// `proxy_next_upstream` without `error` (or `off`), one with
/// `non_idempotent` (it would resend a `POST` an instance may have acted
/// on), or `proxy_next_upstream_tries 1`. Every such directive counts,
/// whichever location it is in: conservative, as the dump does not show
/// which `include` put a file where.
fn retry_config_problem(dump: &str) -> Option<String> {
    let mut file = "the configuration";
    let mut line_no = 0;
    for line in dump.lines() {
        if let Some(f) = line
            .strip_prefix("# configuration file ")
            .and_then(|l| l.strip_suffix(':'))
        {
            file = f;
            line_no = 0;
            continue;
        }
        line_no += 1;
        let code = line.split('#').next().unwrap_or("");
        for stmt in code.split([';', '{', '}']) {
            let words: Vec<&str> = stmt.split_whitespace().collect();
            let why = match words.as_slice() {
                ["proxy_next_upstream", args @ ..] if !args.contains(&"error") => {
                    "it does not retry after a connection error"
                }
                ["proxy_next_upstream", args @ ..] if args.contains(&"non_idempotent") => {
                    "`non_idempotent` would resend a POST an instance may already have acted on"
                }
                ["proxy_next_upstream_tries", "1"] => "it allows no second try",
                _ => continue,
            };
            return Some(format!("{file}:{line_no} has `{};`: {why}", words.join(" ")));
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::state::STATE_MARKER;
    use super::*;
    use crate::lb::roster::test_backend as backend;
    use crate::state::atomic::entries;

    fn canary_rule_policy(group: &str) -> TrafficPolicy {
        use crate::routing::{Match, Rule, ValueMatch};
        TrafficPolicy {
            rules: vec![Rule {
                matches: Match::Header {
                    name: "x-canary".into(),
                    value: ValueMatch::Exact("always".into()),
                },
                group: Group::new(group).unwrap(),
            }],
            ..TrafficPolicy::switch(&Group::new("stable").unwrap())
        }
    }

    #[tokio::test]
    async fn policies_beyond_the_driver_or_its_groups_are_refused_before_any_file_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("upstream.conf");
        let location = dir.path().join("location.conf");
        let backends = [backend("s-1", 9001, "stable"), backend("c-1", 9002, "canary")];
        // Without a location include: weights and switch only.
        let plain = NginxLoadBalancer::builder()
            .include_file(&include)
            .backends(backends.clone())
            .build()
            .unwrap();
        assert_eq!(plain.capabilities(), Capabilities::weights_and_switch());
        let e = plain
            .apply_policy(&canary_rule_policy("canary"))
            .await
            .unwrap_err();
        assert!(
            e.message()
                .contains("the nginx load balancer cannot route by request header")
                && e.message().contains("location_include"),
            "{e}"
        );
        // With one: everything, but not a group without backends.
        let routed = NginxLoadBalancer::builder()
            .include_file(&include)
            .location_include(&location)
            .backends(backends)
            .build()
            .unwrap();
        assert!(routed.capabilities().supports(Capability::Mirror));
        let e = routed
            .apply_policy(&canary_rule_policy("canry"))
            .await
            .unwrap_err();
        assert!(e.message().contains("group canry (rules[0].group)"), "{e}");
        assert!(
            !include.exists() && !location.exists(),
            "a refused policy wrote a file"
        );
        // The same location file as the upstream file is refused at build.
        let e = NginxLoadBalancer::builder()
            .include_file(&include)
            .location_include(&include)
            .backend(backend("s-1", 9001, "stable"))
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("nginx location_include"), "{e}");
    }

    #[test]
    fn a_new_driver_adopts_the_routing_policy_recorded_in_the_include_file() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("upstream.conf");
        let build = || {
            NginxLoadBalancer::builder()
                .include_file(&include)
                .location_include(dir.path().join("location.conf"))
                .backends([backend("s-1", 9001, "stable"), backend("c-1", 9002, "canary")])
                .build()
                .unwrap()
        };
        let first = build();
        {
            let mut st = first.inner.lock_state();
            st.roster.shares = Some(BTreeMap::from([(Group::new("stable").unwrap(), 100)]));
            st.policy = Some(canary_rule_policy("canary"));
        }
        let text = first.render();
        assert!(
            text.contains("map $http_x_canary $deploykit_app_upstream"),
            "{text}"
        );
        std::fs::write(&include, &text).unwrap();
        let second = build();
        assert_eq!(second.render(), text);
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
            st.roster.shares = Some(BTreeMap::from([
                (Group::new("stable").unwrap(), 90),
                (Group::new("canary").unwrap(), 10),
            ]));
            st.roster
                .set_admin(&InstanceId::new("s-2").unwrap(), Admin::Disabled);
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
            // No master: a reload fails at once, whatever runs on the host.
            .pid_file(include.with_extension("no-such-pid"))
            .backends([backend("s-1", 9001, "stable"), backend("c-1", 9003, "canary")])
            .build()
            .unwrap()
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
            entries(dir.path()),
            [".upstream.conf.deploykit-tmp", "upstream.conf", "victim"]
        );
    }

    #[tokio::test]
    async fn installed_with_weights_a_group_at_zero_is_down_from_the_first_file() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("upstream.conf");
        let lb = with_fake_nginx(&include, "true");
        let stable = GroupWeight {
            group: Group::new("stable").unwrap(),
            percent: 100,
        };
        lb.install_with_weights(std::slice::from_ref(&stable))
            .await
            .unwrap();
        let text = std::fs::read_to_string(&include).unwrap();
        let line = |port: u16| {
            text.lines()
                .find(|l| l.contains(&format!("127.0.0.1:{port}")))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line(9003).contains(" down"), "the canary is out:\n{text}");
        assert!(!line(9001).contains(" down"), "stable serves:\n{text}");
        // The next process adopts the split from the file.
        let later = with_fake_nginx(&include, "true");
        assert_eq!(later.live_group().await.unwrap(), Some(stable.group.clone()));
        assert_eq!(later.render(), text);
        // Invalid weights touch nothing.
        let other = dir.path().join("other.conf");
        let bad = GroupWeight {
            group: Group::new("nowhere").unwrap(),
            percent: 100,
        };
        let e = with_fake_nginx(&other, "true")
            .install_with_weights(&[bad])
            .await
            .unwrap_err();
        assert!(e.message().contains("no backend belongs to group nowhere"), "{e}");
        assert!(!other.exists());
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
        assert_eq!(entries(dir.path()), ["upstream.conf"]);
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
        let err = NginxLoadBalancer::builder()
            .include_file("/tmp/x")
            .backend(backend("a", 1, "g"))
            .mirror_timeout(Duration::from_micros(10))
            .build()
            .unwrap_err()
            .to_string();
        assert!(err.contains("nginx mirror_timeout"), "{err}");
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

    #[tokio::test]
    async fn an_upstream_retry_drain_and_enable_neither_rewrite_nor_reload_nginx() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("upstream.conf");
        // No pid file: any reload would fail, so success proves none ran.
        let lb = NginxLoadBalancer::builder()
            .include_file(&include)
            .binary("true")
            .pid_file(dir.path().join("no-such.pid"))
            .drain_mode(DrainMode::UpstreamRetry)
            .backends([backend("s-1", 9001, "stable"), backend("s-2", 9002, "stable")])
            .build()
            .unwrap();
        lb.install().await.unwrap();
        let installed = std::fs::read_to_string(&include).unwrap();
        assert!(installed.contains("max_fails=0") && installed.contains("keepalive"));
        let s2 = backend("s-2", 9002, "stable");
        lb.drain(&s2).await.unwrap();
        assert_eq!(lb.active_connections(&s2).await.unwrap(), Some(0));
        assert_eq!(std::fs::read_to_string(&include).unwrap(), installed);
        lb.enable(&s2).await.unwrap();
        assert_eq!(std::fs::read_to_string(&include).unwrap(), installed);
        assert_eq!(lb.reloads(), 0);
        // Taking it out for maintenance does need nginx: it reloads (and,
        // with no nginx running, fails and leaves the file as it was).
        let e = lb.disable(&s2).await.unwrap_err();
        assert!(e.message().contains("nginx is not running"), "{e}");
        assert_eq!(std::fs::read_to_string(&include).unwrap(), installed);
    }

    #[tokio::test]
    async fn queued_changes_are_applied_together_and_a_refused_one_alone() {
        let dir = tempfile::tempdir().unwrap();
        let include = dir.path().join("upstream.conf");
        let lb = with_fake_nginx(&include, "true");
        lb.install().await.unwrap();
        // Hold the apply lock so that both edits queue behind it.
        let guard = lb.inner.apply.lock().await;
        let a = tokio::spawn({
            let lb = lb.clone();
            async move { lb.switch_to(&Group::new("nowhere").unwrap()).await }
        });
        let b = tokio::spawn({
            let lb = lb.clone();
            async move {
                lb.set_weights(&[GroupWeight {
                    group: Group::new("stable").unwrap(),
                    percent: 100,
                }])
                .await
            }
        });
        while roster::lock(&lb.inner.queued).len() < 2 {
            tokio::task::yield_now().await;
        }
        drop(guard);
        let refused = a.await.unwrap().unwrap_err();
        assert!(refused.message().contains("no enabled backend"), "{refused}");
        // The other one was applied (and failed only at the reload: no
        // nginx is running), not refused with it.
        let e = b.await.unwrap().unwrap_err();
        assert!(e.message().contains("nginx is not running"), "{e}");
        assert_eq!(lb.reloads(), 0);
    }

    #[test]
    fn upstream_retry_refuses_a_config_that_does_not_retry_a_failed_connect() {
        let ok = "# configuration file /etc/nginx/nginx.conf:\nhttp {\n  location / { proxy_pass http://app; } # proxy_next_upstream off;\n}\n";
        assert_eq!(retry_config_problem(ok), None);
        let explicit = ok.replace(
            "proxy_pass http://app;",
            "proxy_pass http://app; proxy_next_upstream error timeout;",
        );
        assert_eq!(retry_config_problem(&explicit), None);
        for (directive, why) in [
            ("proxy_next_upstream off;", "does not retry"),
            ("proxy_next_upstream timeout http_502;", "does not retry"),
            ("proxy_next_upstream error non_idempotent;", "POST"),
            ("proxy_next_upstream_tries 1;", "no second try"),
        ] {
            let dump = format!(
                "# configuration file /etc/nginx/nginx.conf:\nhttp {{\n  include /etc/nginx/app.conf;\n}}\n\
                 # configuration file /etc/nginx/app.conf:\nserver {{\n  location / {{\n    {directive}\n  }}\n}}\n"
            );
            let p = retry_config_problem(&dump).unwrap_or_else(|| panic!("accepted {directive}"));
            assert!(p.starts_with("/etc/nginx/app.conf:3 has `"), "{p}");
            assert!(
                p.contains(directive.trim_end_matches(';')) && p.contains(why),
                "{p}"
            );
        }
    }

    #[test]
    fn object_safe() {
        fn boxed(lb: Box<dyn LoadBalancer>) -> String {
            lb.name().to_string()
        }
        let lb = NginxLoadBalancer::builder()
            .include_file("/tmp/deploykit-test-upstream.conf")
            .backend(backend("s-1", 9001, "stable"))
            .build()
            .unwrap();
        assert_eq!(boxed(Box::new(lb)), "nginx");
    }
}
