//! Real instances: processes on this machine ([`LocalInstance`]) and on SSH
//! hosts (`SshInstance`, feature `ssh`), run by systemd or by deploykit
//! itself, laid out Capistrano-style.
//!
//! An instance is a [`Host`] (where commands run) plus:
//!
//! * a [`ReleaseLayout`] — `<root>/releases/<id>/`, `<root>/current` swapped
//!   atomically, `<root>/shared/` linked into each release, the newest N
//!   releases kept;
//! * a [`ReleaseSource`] — where the release files come from on the machine
//!   running deploykit;
//! * a [`ServiceControl`] — a systemd unit or a process that deploykit
//!   starts detached and stops with SIGTERM, then SIGKILL after a grace
//!   period;
//! * a [`HealthProbe`] — HTTP (feature `http`) or "the service runs".
//!
//! Every command is an argument vector ([`Command`]); where a shell line is
//! unavoidable (SSH), each word is quoted by [`quote`]. Multi-step
//! operations are constant scripts run as `sh -c <script> sh <args>…`, their
//! values passed as positional arguments — never pasted into script text.
//!
//! ```no_run
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
//! use deploykit::Instance;
//!
//! let web1 = LocalInstance::builder("web-1", "127.0.0.1:18081")
//!     .root("/srv/app/web-1")
//!     .source(ReleaseSource::directory("/srv/builds")) // /srv/builds/<release-id>/
//!     .process(ProcessSpec::new(["./app", "--listen", "127.0.0.1:18081", "--version", "{release}"])?)
//!     .build()?;
//! web1.install(&"v2".parse()?).await?;
//! web1.start().await?;
//! println!("{:?}", web1.health().await?);
//! # Ok(()) }
//! ```

mod cmd;
mod health;
mod host;
mod layout;
mod service;
#[cfg(feature = "ssh")]
#[cfg_attr(docsrs, doc(cfg(feature = "ssh")))]
mod ssh;

use std::fmt;
use std::sync::Mutex;

use async_trait::async_trait;

pub use cmd::{quote, Command, Output, OUTPUT_LIMIT};
pub use health::{HealthProbe, HttpProbe};
pub use host::{CopyMode, Host, LocalHost, ReleaseSource, Transfer};
pub use layout::{first_shared_site, LayoutSite, ReleaseLayout, DEFAULT_KEEP};
pub use service::{ProcessSpec, ServiceControl, SystemdUnit, DEFAULT_GRACE};
#[cfg(feature = "ssh")]
#[cfg_attr(docsrs, doc(cfg(feature = "ssh")))]
pub use ssh::{HostKeyPolicy, SshAuth, SshHost, SshHostBuilder, MANIFEST};

use crate::error::{DriverError, Error, Result};
use crate::names::{Address, Group, InstanceId, ReleaseId};
use crate::traits::{Backend, Health, Instance};
use cmd::script;
use layout::Switch;
use service::Controller;

/// The file on an instance's root naming the deployment that holds it.
const MARKER: &str = ".deploykit-marker";
/// Prints the marker `$1`; exits 3 when there is none.
const READ_MARKER: &str = r#"[ -e "$1" ] || exit 3; cat -- "$1""#;
/// Writes `$3` to the marker `$2` under the root `$1`, atomically.
const WRITE_MARKER: &str =
    r#"set -e; mkdir -p -- "$1"; printf '%s' "$3" >"$2.tmp.$$"; mv -f -- "$2.tmp.$$" "$2""#;

/// An instance on this machine.
pub type LocalInstance = HostInstance<LocalHost>;

/// An instance on an SSH host (feature `ssh`).
#[cfg(feature = "ssh")]
#[cfg_attr(docsrs, doc(cfg(feature = "ssh")))]
pub type SshInstance = HostInstance<SshHost>;

/// An [`Instance`] on a [`Host`]: the release layout, a release source, a
/// service control and a health probe. See [`LocalInstance`] and
/// `SshInstance`.
pub struct HostInstance<H> {
    backend: Backend,
    host: H,
    layout: ReleaseLayout,
    source: ReleaseSource,
    service: ServiceControl,
    health: HealthProbe,
    /// The release this instance last pointed `current` at: saves `start`
    /// a round trip (the host checks it still holds).
    activated: Mutex<Option<ReleaseId>>,
    #[cfg(feature = "http")]
    client: reqwest::Client,
}

impl<H: Host> fmt::Debug for HostInstance<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostInstance")
            .field("id", &self.backend.id)
            .field("address", &self.backend.address)
            .field("host", &self.host.describe())
            .field("root", &self.layout.root())
            .field("service", &self.service)
            .finish()
    }
}

/// Builds a [`HostInstance`]. Setters never fail; [`build`](Self::build)
/// checks everything.
#[derive(Debug)]
pub struct InstanceBuilder<H> {
    host: H,
    id: String,
    address: String,
    group: Option<String>,
    root: Option<String>,
    keep: usize,
    linked: Vec<String>,
    source: Option<ReleaseSource>,
    service: Option<ServiceControl>,
    health: HealthProbe,
}

impl LocalInstance {
    /// Starts building an instance on this machine with id `id`, serving at
    /// `address` (`host:port`).
    pub fn builder(id: impl Into<String>, address: impl Into<String>) -> InstanceBuilder<LocalHost> {
        InstanceBuilder::new(LocalHost::new(), id, address)
    }
}

#[cfg(feature = "ssh")]
impl SshInstance {
    /// Starts building an instance on the SSH host `host` with id `id`,
    /// serving at `address` (`host:port`, probed over HTTP from here).
    /// Several instances may share one host (clones share its session).
    pub fn builder(
        host: SshHost,
        id: impl Into<String>,
        address: impl Into<String>,
    ) -> InstanceBuilder<SshHost> {
        InstanceBuilder::new(host, id, address)
    }
}

impl<H: Host> InstanceBuilder<H> {
    /// Starts building an instance on `host`.
    pub fn new(host: H, id: impl Into<String>, address: impl Into<String>) -> Self {
        Self {
            host,
            id: id.into(),
            address: address.into(),
            group: None,
            root: None,
            keep: DEFAULT_KEEP,
            linked: Vec::new(),
            source: None,
            service: None,
            health: HealthProbe::default(),
        }
    }

    /// Replaces the host (e.g. a [`LocalHost`] with hard links).
    pub fn host(mut self, host: H) -> Self {
        self.host = host;
        self
    }

    /// The group (canary track or blue-green environment); default
    /// `default`.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// The layout root (absolute) on the host. Required.
    pub fn root(mut self, root: impl Into<String>) -> Self {
        self.root = Some(root.into());
        self
    }

    /// How many releases to keep (default [`DEFAULT_KEEP`], at least 2).
    pub fn keep(mut self, keep: usize) -> Self {
        self.keep = keep;
        self
    }

    /// Links `<root>/shared/<path>` into every release.
    pub fn link(mut self, path: impl Into<String>) -> Self {
        self.linked.push(path.into());
        self
    }

    /// Where releases come from. Required.
    pub fn source(mut self, source: ReleaseSource) -> Self {
        self.source = Some(source);
        self
    }

    /// How the application is run. Required (or [`process`](Self::process)
    /// / [`systemd`](Self::systemd)).
    pub fn service(mut self, service: ServiceControl) -> Self {
        self.service = Some(service);
        self
    }

    /// Runs the application as a process started by deploykit.
    pub fn process(self, spec: ProcessSpec) -> Self {
        self.service(ServiceControl::Process(spec))
    }

    /// Runs the application as a systemd unit.
    pub fn systemd(self, unit: SystemdUnit) -> Self {
        self.service(ServiceControl::Systemd(unit))
    }

    /// How health is probed (default: [`HealthProbe::default`]).
    pub fn health(mut self, probe: HealthProbe) -> Self {
        self.health = probe;
        self
    }

    /// Checks the settings and builds the instance. Touches nothing on the
    /// host.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: `instance id`, `address`,
    /// `group`, `root` (missing or not absolute), `keep`, `linked path`,
    /// `source` or `service` (missing).
    pub fn build(self) -> Result<HostInstance<H>> {
        let id = InstanceId::new(self.id)?;
        let address = Address::parse(&self.address)?;
        let group = match self.group {
            Some(g) => Group::new(g)?,
            None => Group::default_group(),
        };
        let root = self.root.ok_or_else(|| {
            Error::invalid(
                "root",
                format!("instance {id} has no root; set the directory of its release layout, e.g. /srv/app"),
            )
        })?;
        let mut layout = ReleaseLayout::new(root)?.keep(self.keep)?;
        for p in self.linked {
            layout = layout.link(p)?;
        }
        let source = self.source.ok_or_else(|| {
            Error::invalid(
                "source",
                format!("instance {id} has no release source; set where release directories come from"),
            )
        })?;
        let service = self.service.ok_or_else(|| {
            Error::invalid(
                "service",
                format!("instance {id} has no service control; choose a process or a systemd unit"),
            )
        })?;
        #[cfg(feature = "http")]
        let client = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| Error::invalid("health", format!("cannot create the HTTP client: {e}")))?;
        Ok(HostInstance {
            backend: Backend { id, address, group },
            host: self.host,
            layout,
            source,
            service,
            health: self.health,
            activated: Mutex::new(None),
            #[cfg(feature = "http")]
            client,
        })
    }
}

impl<H: Host> HostInstance<H> {
    /// The host the instance lives on.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// The release layout.
    pub fn layout(&self) -> &ReleaseLayout {
        &self.layout
    }

    /// The service control.
    pub fn service(&self) -> &ServiceControl {
        &self.service
    }

    fn controller(&self) -> Controller<'_> {
        Controller {
            host: &self.host,
            layout: &self.layout,
        }
    }

    fn named(&self, e: DriverError) -> DriverError {
        let transient = e.is_transient();
        let msg = format!("instance {} ({})", self.backend.id, self.host.describe());
        let wrapped = if transient {
            DriverError::transient(msg)
        } else {
            DriverError::new(msg)
        };
        wrapped.with_source(e)
    }

    /// Whether the application runs (process alive and ours, or the unit is
    /// active).
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes. On failure: nothing
    ///   changed.
    ///
    /// # Errors
    /// When the host cannot be reached or the check itself fails.
    pub async fn is_running(&self) -> Result<bool, DriverError> {
        self.controller()
            .is_running(&self.service)
            .await
            .map_err(|e| self.named(e))
    }

    /// The releases installed, newest first.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes. On failure: nothing
    ///   changed.
    ///
    /// # Errors
    /// When the host cannot be reached.
    pub async fn installed(&self) -> Result<Vec<ReleaseId>, DriverError> {
        self.layout.installed(&self.host).await.map_err(|e| self.named(e))
    }

    /// Switches to an installed release in one round trip (swap and prune
    /// together); uploads it first only when it is not installed.
    async fn install_inner(&self, release: &ReleaseId) -> Result<(), DriverError> {
        let host: &dyn Host = &self.host;
        let pruned = match self.layout.switch_if_installed(host, release).await? {
            Switch::Switched { pruned } => pruned,
            Switch::NotInstalled => {
                let source = self.source.locate(release)?;
                let staging = self.layout.prepare(host, release).await?;
                if let Err(e) = host.put_dir(&source, &staging).await {
                    // Best effort: a leftover is removed by the next prune.
                    let _ = host.run(&Command::new("rm").args(["-rf", "--", &staging])).await;
                    return Err(e);
                }
                self.layout.commit(host, &staging, release).await?;
                match self.layout.switch_if_installed(host, release).await? {
                    Switch::Switched { pruned } => pruned,
                    Switch::NotInstalled => {
                        return Err(DriverError::new(format!(
                        "release {release} vanished from {}/releases on {} right after it was moved there",
                        self.layout.root(),
                        host.describe()
                    )))
                    }
                }
            }
        };
        self.remember(release);
        match pruned {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(instance = %self.backend.id, ?deleted, "pruned old releases");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(instance = %self.backend.id, error = %e, "pruning old releases failed"),
        }
        Ok(())
    }

    fn remember(&self, release: &ReleaseId) {
        *self.activated.lock().unwrap_or_else(|p| p.into_inner()) = Some(release.clone());
    }

    fn remembered(&self) -> Option<ReleaseId> {
        self.activated.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait]
impl<H: Host> Instance for HostInstance<H> {
    fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Reads the `current` symlink.
    ///
    /// * Idempotent: yes. Cancel-safe: yes. On failure: nothing changed.
    async fn current_release(&self) -> Result<Option<ReleaseId>, DriverError> {
        self.layout.current(&self.host).await.map_err(|e| self.named(e))
    }

    /// Process: SIGTERM to the process group, wait up to the grace period,
    /// then SIGKILL; systemd: `systemctl stop`.
    ///
    /// * Idempotent: yes; a stopped (or never started) service succeeds.
    /// * Cancel-safe: yes; SIGTERM may have been sent; a later `stop` or
    ///   `force_stop` finishes the job.
    /// * On failure: the application may still run.
    async fn stop(&self) -> Result<(), DriverError> {
        self.controller()
            .stop(&self.service)
            .await
            .map_err(|e| self.named(e))
    }

    /// Process: SIGKILL to the process group; systemd: `systemctl kill -s
    /// KILL`.
    ///
    /// * Idempotent: yes. Cancel-safe: yes.
    /// * On failure: the application may still run.
    async fn force_stop(&self) -> Result<(), DriverError> {
        self.controller()
            .force_stop(&self.service)
            .await
            .map_err(|e| self.named(e))
    }

    /// Process: `signal` to the recorded process's group; systemd:
    /// `systemctl kill -s <signal>`.
    ///
    /// * Idempotent: yes for KILL and CONT (a process that does not run
    ///   succeeds); STOP of a process that does not run fails.
    /// * Cancel-safe: yes. On failure: nothing was signalled.
    async fn signal(&self, signal: crate::chaos::ProcessSignal) -> Result<(), DriverError> {
        self.controller()
            .signal(&self.service, signal)
            .await
            .map_err(|e| self.named(e))
    }

    /// Uploads the release into a staging directory (unless
    /// `releases/<id>` already exists), verifies it, links the shared
    /// paths, renames it to `releases/<id>`, then swaps `current`
    /// atomically. Old releases are pruned after the swap, best effort (a
    /// pruning failure is logged, not returned).
    ///
    /// * Idempotent: yes; installing an installed release only swaps
    ///   `current` (a no-op when it is current already).
    /// * Cancel-safe: yes; the swap is the last action that changes what
    ///   runs, so `current` points at the old or the new release, never at
    ///   a partial one.
    /// * On failure: the previous release is still current; a partial
    ///   staging directory may remain until the next prune.
    async fn install(&self, release: &ReleaseId) -> Result<(), DriverError> {
        self.install_inner(release).await.map_err(|e| self.named(e))
    }

    /// Swaps `current` back to `releases/<id>`.
    ///
    /// * Idempotent: yes. Cancel-safe: yes.
    /// * On failure: `current` is unchanged (e.g. the release was pruned).
    async fn restore(&self, release: &ReleaseId) -> Result<(), DriverError> {
        self.layout
            .activate(&self.host, release)
            .await
            .map_err(|e| self.named(e))?;
        self.remember(release);
        Ok(())
    }

    /// Process: starts `current`'s release detached (no-op when ours is
    /// running); systemd: `systemctl start`.
    ///
    /// * Idempotent: yes. Cancel-safe: yes; the process may or may not have
    ///   been started, and the pid file says which: the process records
    ///   itself before it runs the application, and runs nothing once the
    ///   start was dropped.
    /// * On failure: nothing runs (a process that died at once says why in
    ///   the log file `<root>/app.log`).
    async fn start(&self) -> Result<(), DriverError> {
        self.controller()
            .start(&self.service, self.remembered())
            .await
            .map_err(|e| self.named(e))
    }

    /// One probe: the service must run (process alive and ours, or the unit
    /// active) and, with an HTTP probe, answer as expected. Checking the
    /// service first means a stray process still holding the port (say, a
    /// previous release) cannot make a failed start look healthy.
    ///
    /// * Idempotent: yes. Cancel-safe: yes. On failure: nothing changed.
    async fn health(&self) -> Result<Health, DriverError> {
        if !self.is_running().await? {
            return Ok(Health::Unhealthy(format!(
                "the service of {} is not running",
                self.backend.id
            )));
        }
        match &self.health {
            HealthProbe::ServiceActive => Ok(Health::Healthy),
            #[cfg(feature = "http")]
            HealthProbe::Http(p) => p.probe(&self.client, &self.backend.address).await,
        }
    }

    /// Reads `<root>/.deploykit-marker`.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes. On failure: nothing
    ///   changed.
    async fn marker(&self) -> Result<Option<String>, DriverError> {
        let out = self
            .host
            .run(&script(READ_MARKER).arg(self.layout.file(MARKER)))
            .await
            .map_err(|e| self.named(e))?;
        match out.status {
            Some(3) => Ok(None),
            _ => out
                .check("reading the deployment marker")
                .map(|o| Some(o.stdout))
                .map_err(|e| self.named(e)),
        }
    }

    /// Replaces `<root>/.deploykit-marker` through a temporary file and a
    /// rename (creating the root when missing), or removes it.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (the old or the new marker is
    ///   there). On failure: the previous marker is still there.
    async fn set_marker(&self, marker: Option<&str>) -> Result<(), DriverError> {
        let file = self.layout.file(MARKER);
        let cmd = match marker {
            Some(text) => script(WRITE_MARKER).args([self.layout.root(), file.as_str(), text]),
            None => Command::new("rm").args(["-f", "--", file.as_str()]),
        };
        self.host
            .run(&cmd)
            .await
            .and_then(|o| o.check("writing the deployment marker").map(|_| ()))
            .map_err(|e| self.named(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _obj_safe(_: Box<dyn Host>) {}

    /// This machine, counting the commands run: each is one round trip on
    /// an SSH host.
    #[derive(Debug, Default)]
    struct Counting {
        local: LocalHost,
        runs: std::sync::atomic::AtomicUsize,
    }

    impl Counting {
        fn take(&self) -> usize {
            self.runs.swap(0, std::sync::atomic::Ordering::SeqCst)
        }
    }

    #[async_trait]
    impl Host for Counting {
        fn describe(&self) -> String {
            "counting".into()
        }
        async fn run(&self, cmd: &Command) -> Result<Output, DriverError> {
            self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.local.run(cmd).await
        }
        async fn put_dir(&self, source: &std::path::Path, dest: &str) -> Result<(), DriverError> {
            self.runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.local.put_dir(source, dest).await
        }
    }

    #[tokio::test]
    async fn each_step_of_a_replacement_is_one_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let builds = tmp.path().join("builds");
        for r in ["v1", "v2"] {
            std::fs::create_dir_all(builds.join(r)).unwrap();
            std::fs::write(builds.join(r).join("VERSION"), r).unwrap();
        }
        // Exits 30 ms after SIGTERM, as an application finishing requests.
        let app = ProcessSpec::new([
            "sh",
            "-c",
            "trap 'sleep 0.03; exit 0' TERM; while :; do sleep 0.01; done",
        ])
        .unwrap();
        let inst = InstanceBuilder::new(Counting::default(), "web-1", "127.0.0.1:9")
            .root(tmp.path().join("app").to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            .process(app)
            .health(HealthProbe::ServiceActive)
            .build()
            .unwrap();
        let v = |s: &str| ReleaseId::new(s).unwrap();
        inst.install(&v("v2")).await.unwrap();
        inst.install(&v("v1")).await.unwrap();
        inst.start().await.unwrap();
        assert!(inst.is_running().await.unwrap());
        inst.host().take();

        inst.stop().await.unwrap();
        assert_eq!(
            inst.host().take(),
            1,
            "stop: signal and wait for the exit on the host"
        );
        assert!(!inst.is_running().await.unwrap());
        assert!(!tmp.path().join("app/app.pid").exists());
        inst.host().take();
        inst.install(&v("v2")).await.unwrap();
        assert_eq!(
            inst.host().take(),
            1,
            "install of an installed release: swap and prune"
        );
        assert_eq!(inst.current_release().await.unwrap(), Some(v("v2")));
        inst.host().take();
        inst.start().await.unwrap();
        assert_eq!(inst.host().take(), 1, "start: check current and spawn");
        assert!(inst.is_running().await.unwrap());

        // `current` changed behind this instance's back: start notices on
        // the host and starts what `current` holds.
        inst.stop().await.unwrap();
        std::fs::remove_file(tmp.path().join("app/current")).unwrap();
        std::os::unix::fs::symlink("releases/v1", tmp.path().join("app/current")).unwrap();
        inst.start().await.unwrap();
        let pid = std::fs::read_to_string(tmp.path().join("app/app.pid")).unwrap();
        let pid = pid.split_whitespace().next().unwrap();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        assert!(cwd.ends_with("releases/v1"), "{}", cwd.display());
        inst.force_stop().await.unwrap();
        assert!(!inst.is_running().await.unwrap());
    }

    /// A process fault: SIGSTOP freezes the recorded process (still
    /// running, state T), SIGCONT resumes it, SIGKILL ends it; killing or
    /// continuing a process that is gone succeeds.
    #[tokio::test]
    async fn signal_stops_continues_and_kills_the_recorded_process() {
        use crate::chaos::ProcessSignal;
        let tmp = tempfile::tempdir().unwrap();
        let builds = tmp.path().join("builds");
        std::fs::create_dir_all(builds.join("v1")).unwrap();
        let app = ProcessSpec::new(["sh", "-c", "while :; do sleep 0.01; done"]).unwrap();
        let inst = LocalInstance::builder("web-1", "127.0.0.1:9")
            .root(tmp.path().join("app").to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            .process(app)
            .health(HealthProbe::ServiceActive)
            .build()
            .unwrap();
        inst.install(&ReleaseId::new("v1").unwrap()).await.unwrap();
        inst.start().await.unwrap();
        let pid = std::fs::read_to_string(tmp.path().join("app/app.pid")).unwrap();
        let pid = pid.split_whitespace().next().unwrap().to_owned();
        let state = || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
        };
        // A signal is delivered asynchronously: wait (bounded) for its effect.
        let settles = |want_stopped: bool| async move {
            let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while (state() == Some('T')) != want_stopped {
                assert!(
                    tokio::time::Instant::now() < end,
                    "state {:?}, want stopped {want_stopped}",
                    state()
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        inst.signal(ProcessSignal::Stop).await.unwrap();
        settles(true).await;
        assert!(inst.is_running().await.unwrap(), "a stopped process still runs");
        inst.signal(ProcessSignal::Cont).await.unwrap();
        settles(false).await;
        inst.signal(ProcessSignal::Kill).await.unwrap();
        let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while inst.is_running().await.unwrap() {
            assert!(tokio::time::Instant::now() < end, "SIGKILL left {pid} running");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        inst.signal(ProcessSignal::Kill).await.unwrap();
        inst.signal(ProcessSignal::Cont).await.unwrap();
        let e = inst.signal(ProcessSignal::Stop).await.unwrap_err();
        assert!(
            e.to_string().contains("SIGSTOP") && e.to_string().contains("not running"),
            "{e}"
        );
    }

    /// Processes whose command line holds `token`, alive and not zombies.
    fn processes_with(token: &str) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let zombie = stat
                    .rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('Z'));
                !zombie && String::from_utf8_lossy(&cmdline).contains(token)
            })
            .collect()
    }

    /// A start dropped while its script runs (a timeout) once could leave
    /// the spawned process unrecorded: the next start ran a second one and
    /// stops never reached the first.
    #[tokio::test]
    async fn a_start_dropped_at_any_point_leaves_no_process_unrecorded() {
        let tmp = tempfile::tempdir().unwrap();
        let builds = tmp.path().join("builds");
        std::fs::create_dir_all(builds.join("v1")).unwrap();
        let token = format!("dk-dropped-start-{}", std::process::id());
        let app = ProcessSpec::new(["sh", "-c", "while :; do sleep 0.01; done", token.as_str()]).unwrap();
        let inst = LocalInstance::builder("web-1", "127.0.0.1:9")
            .root(tmp.path().join("app").to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            .process(app)
            .health(HealthProbe::ServiceActive)
            .build()
            .unwrap();
        inst.install(&ReleaseId::new("v1").unwrap()).await.unwrap();
        for step in 0..40u64 {
            let after = std::time::Duration::from_micros(step * 500);
            let _ = tokio::time::timeout(after, inst.start()).await;
            inst.start().await.unwrap();
            inst.force_stop().await.unwrap();
            let end = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let left = processes_with(&token);
                if left.is_empty() {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < end,
                    "after a start dropped after {after:?}, processes {left:?} outlived force_stop"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }

    #[test]
    fn build_names_the_missing_or_bad_field() {
        let spec = ProcessSpec::new(["./app"]).unwrap();
        let base = || {
            LocalInstance::builder("web-1", "127.0.0.1:8080")
                .root("/srv/app")
                .source(ReleaseSource::directory("/tmp"))
                .process(spec.clone())
        };
        assert!(base().build().is_ok());
        let cases: Vec<(InstanceBuilder<LocalHost>, &str)> = vec![
            (LocalInstance::builder("web 1", "127.0.0.1:8080"), "instance id"),
            (LocalInstance::builder("web-1", "nowhere"), "address"),
            (base().group("a/b"), "group"),
            (base().root("srv"), "root"),
            (base().keep(1), "keep"),
            (base().link("../x"), "linked path"),
            (
                LocalInstance::builder("web-1", "127.0.0.1:8080")
                    .root("/srv/app")
                    .process(spec.clone()),
                "source",
            ),
            (
                LocalInstance::builder("web-1", "127.0.0.1:8080")
                    .root("/srv/app")
                    .source(ReleaseSource::directory("/tmp")),
                "service",
            ),
        ];
        for (b, field) in cases {
            let e = b.build().unwrap_err();
            assert!(
                matches!(&e, Error::InvalidInput { field: f, .. } if f == field),
                "{field}: {e}"
            );
        }
    }
}
