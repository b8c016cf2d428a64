//! Service control: how an instance's application is started, stopped and
//! checked — by systemd ([`SystemdUnit`]) or by deploykit itself
//! ([`ProcessSpec`]).

use std::ops::ControlFlow;
use std::time::Duration;

use super::cmd::{script, Command};
use super::host::Host;
use super::layout::ReleaseLayout;
use crate::error::{DriverError, Error, Result};
use crate::names::ReleaseId;
use crate::wait::{poll_until, Bound, WaitError};

/// How an instance's application is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceControl {
    /// A systemd unit (`systemctl start|stop|is-active|kill`).
    Systemd(SystemdUnit),
    /// A process that deploykit starts from the release directory, detached
    /// in its own session, with a pid file.
    Process(ProcessSpec),
}

/// A systemd unit controlled with `systemctl`. The unit is expected to run
/// the application from `<root>/current` (e.g. `WorkingDirectory=` and
/// `ExecStart=` under `current/`), so a restart after the symlink swap runs
/// the new release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdUnit {
    unit: String,
    user: bool,
    sudo: bool,
}

impl SystemdUnit {
    /// The unit `name` (e.g. `app.service`, `app@blue.service`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `systemd unit` when the name is empty,
    /// longer than 256 characters, starts with `-`, or has characters
    /// outside `[A-Za-z0-9:_.@\-]`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let unit = name.into();
        let ok = !unit.is_empty()
            && unit.len() <= 256
            && !unit.starts_with('-')
            && !unit.starts_with('.')
            && unit
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '.' | '@' | '-' | '\\'));
        if !ok {
            return Err(Error::invalid(
                "systemd unit",
                format!(
                    "{unit:?} is not a unit name; use [A-Za-z0-9:_.@-], e.g. app.service or app@blue.service"
                ),
            ));
        }
        Ok(Self {
            unit,
            user: false,
            sudo: false,
        })
    }

    /// Talks to the user's service manager (`systemctl --user`).
    pub fn user(mut self, user: bool) -> Self {
        self.user = user;
        self
    }

    /// Prefixes every command with `sudo -n` (non-interactive: a missing
    /// sudoers rule fails at once instead of waiting for a password).
    pub fn sudo(mut self, sudo: bool) -> Self {
        self.sudo = sudo;
        self
    }

    /// The unit name.
    pub fn unit(&self) -> &str {
        &self.unit
    }

    fn systemctl(&self, verb: &[&str]) -> Command {
        let mut cmd = if self.sudo {
            Command::new("sudo").args(["-n", "systemctl"])
        } else {
            Command::new("systemctl")
        };
        if self.user {
            cmd = cmd.arg("--user");
        }
        cmd.args(verb.iter().copied()).arg("--").arg(self.unit.as_str())
    }

    /// `systemctl start -- <unit>`.
    pub fn start_command(&self) -> Command {
        self.systemctl(&["start"])
    }

    /// `systemctl stop -- <unit>`.
    pub fn stop_command(&self) -> Command {
        self.systemctl(&["stop"])
    }

    /// `systemctl kill -s KILL -- <unit>`.
    pub fn kill_command(&self) -> Command {
        self.systemctl(&["kill", "-s", "KILL"])
    }

    /// `systemctl is-active -- <unit>` (exit 0 when active).
    pub fn is_active_command(&self) -> Command {
        self.systemctl(&["is-active"])
    }
}

/// A process deploykit runs itself: started in the release directory with
/// `argv` and `env`, detached in its own session (`setsid`), stdin from
/// `/dev/null`, stdout and stderr appended to `<root>/app.log`, its pid and
/// start time recorded in `<root>/app.pid`.
///
/// Arguments may use placeholders, replaced literally in each element (no
/// shell is involved, so a placeholder can never become syntax):
///
/// | placeholder | becomes |
/// | --- | --- |
/// | `{release}` | the release id (a validated [`ReleaseId`]) |
/// | `{release_dir}` | `<root>/releases/<id>` |
/// | `{root}` | the layout root |
///
/// Stopping sends SIGTERM to the process group, waits up to the grace
/// period (default 30 s), then sends SIGKILL. "Running" means: the pid in
/// the pid file is alive, not a zombie, *and* its start time (field 22 of
/// `/proc/<pid>/stat`) is the one recorded — so a reused pid is never taken
/// for the application.
#[derive(Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    grace: Duration,
    poll: Duration,
}

impl std::fmt::Debug for ProcessSpec {
    /// Environment values are left out: they often hold secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSpec")
            .field("argv", &self.argv)
            .field(
                "env",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .field("grace", &self.grace)
            .finish()
    }
}

/// The default grace period between SIGTERM and SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

impl ProcessSpec {
    /// Runs `argv` (program first; a relative program like
    /// `./bin/app` is found in the release directory).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `process argv` when `argv` is empty or has
    /// a NUL byte.
    pub fn new<I, S>(argv: I) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let argv: Vec<String> = argv.into_iter().map(Into::into).collect();
        if argv.is_empty() || argv[0].is_empty() {
            return Err(Error::invalid(
                "process argv",
                "is empty; give the program and its arguments",
            ));
        }
        let spec = Self {
            argv,
            env: Vec::new(),
            grace: DEFAULT_GRACE,
            poll: Duration::from_millis(100),
        };
        spec.command("/x", "/x/releases/v", &ReleaseId::new("v")?)
            .validate()
            .map_err(|e| match e {
                Error::InvalidInput { message, .. } => Error::invalid("process argv", message),
                other => other,
            })?;
        Ok(spec)
    }

    /// Adds an environment variable.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `process env` when the name is not
    /// `[A-Za-z_][A-Za-z0-9_]*` or the value has a NUL byte.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Result<Self> {
        self.env.push((name.into(), value.into()));
        self.command("/x", "/x/releases/v", &ReleaseId::new("v")?)
            .validate()
            .map_err(|e| match e {
                Error::InvalidInput { message, .. } => Error::invalid("process env", message),
                other => other,
            })?;
        Ok(self)
    }

    /// How long `stop` waits after SIGTERM before SIGKILL (default 30 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The grace period.
    pub fn grace_period(&self) -> Duration {
        self.grace
    }

    /// The command that runs the application for `release`: `env NAME=value…
    /// argv…` with placeholders replaced.
    fn command(&self, root: &str, release_dir: &str, release: &ReleaseId) -> Command {
        let subst = |s: &String| {
            s.replace("{release_dir}", release_dir)
                .replace("{release}", release.as_str())
                .replace("{root}", root)
        };
        let mut argv = self.argv.iter().map(subst);
        let program = argv.next().unwrap_or_default();
        let mut cmd = Command::new(program).args(argv);
        for (k, v) in &self.env {
            cmd = cmd.env(k.as_str(), subst(v));
        }
        cmd
    }
}

const START: &str = r#"set -e; set -f
dir=$1; log=$2; pidfile=$3; shift 3
cd -- "$dir"
setsid "$@" >>"$log" 2>&1 </dev/null &
pid=$!
stat=$(cat "/proc/$pid/stat" 2>/dev/null) || { echo "the process exited at once; see $log" >&2; exit 1; }
rest=${stat##*) }
set -- $rest
printf '%s %s\n' "$pid" "${20}" >"$pidfile.tmp"
mv -f -- "$pidfile.tmp" "$pidfile"
echo "$pid""#;

/// Prints the pid and exits 0 when the recorded process runs (sending it
/// signal `$2` first, when given); exits 3 when it does not.
const PROBE: &str = r#"set -f
pidfile=$1; sig=${2:-}
[ -f "$pidfile" ] || exit 3
read -r pid start <"$pidfile" || exit 3
case $pid in ''|*[!0-9]*) exit 3;; esac
stat=$(cat "/proc/$pid/stat" 2>/dev/null) || exit 3
rest=${stat##*) }
set -- $rest
if [ "$1" = Z ] || [ "${20}" != "$start" ]; then exit 3; fi
if [ -n "$sig" ]; then kill -s "$sig" -- "-$pid" 2>/dev/null || kill -s "$sig" "$pid" 2>/dev/null || true; fi
echo "$pid""#;

/// Runs [`ServiceControl`] operations on a host for a layout.
#[derive(Debug)]
pub(crate) struct Controller<'a> {
    pub(crate) host: &'a dyn Host,
    pub(crate) layout: &'a ReleaseLayout,
}

impl Controller<'_> {
    fn pidfile(&self) -> String {
        self.layout.file("app.pid")
    }

    fn ctx(&self, what: &str) -> String {
        format!("{what} on {}", self.host.describe())
    }

    /// The pid of the running process, after optionally signalling it.
    async fn probe(&self, signal: Option<&str>) -> Result<Option<u32>, DriverError> {
        let mut cmd = script(PROBE).arg(self.pidfile());
        if let Some(sig) = signal {
            cmd = cmd.arg(sig);
        }
        let out = self.host.run(&cmd).await?;
        match out.status {
            Some(0) => Ok(out.stdout.trim().parse().ok()),
            Some(3) => Ok(None),
            _ => Err(DriverError::new(
                out.describe_failure(&self.ctx("checking the process")),
            )),
        }
    }

    /// Whether the application runs.
    pub(crate) async fn is_running(&self, control: &ServiceControl) -> Result<bool, DriverError> {
        match control {
            ServiceControl::Systemd(unit) => {
                let out = self.host.run(&unit.is_active_command()).await?;
                match out.status {
                    Some(0) => Ok(true),
                    // is-active: 3 = inactive/failed, 4 = no such unit.
                    Some(1..=4) => Ok(false),
                    _ => Err(DriverError::new(
                        out.describe_failure(&self.ctx("checking the unit")),
                    )),
                }
            }
            ServiceControl::Process(_) => Ok(self.probe(None).await?.is_some()),
        }
    }

    pub(crate) async fn start(&self, control: &ServiceControl) -> Result<(), DriverError> {
        match control {
            ServiceControl::Systemd(unit) => {
                self.host
                    .run(&unit.start_command())
                    .await?
                    .check(&self.ctx(&format!("starting {}", unit.unit())))?;
                Ok(())
            }
            ServiceControl::Process(spec) => {
                if let Some(pid) = self.probe(None).await? {
                    tracing::debug!(pid, host = %self.host.describe(), "already running");
                    return Ok(());
                }
                let release = self.layout.current(self.host).await?.ok_or_else(|| {
                    DriverError::new(format!(
                        "no release is installed under {} on {}; install one before starting",
                        self.layout.root(),
                        self.host.describe()
                    ))
                })?;
                let dir = self.layout.release_dir(&release);
                let app = spec.command(self.layout.root(), &dir, &release);
                app.validate()
                    .map_err(|e| DriverError::new("invalid process command").with_source(e))?;
                let mut cmd = script(START).args([dir.clone(), self.layout.file("app.log"), self.pidfile()]);
                // The environment goes on the command (inherited by the
                // app), not into its argv: argv shows up in messages, and
                // values may be secrets.
                for (k, v) in app.get_env() {
                    cmd = cmd.env(k.as_str(), v.as_str());
                }
                cmd = cmd.args(app.argv());
                let out = self
                    .host
                    .run(&cmd)
                    .await?
                    .check(&self.ctx(&format!("starting {} in {dir}", app)))?;
                tracing::info!(pid = out.stdout.trim(), release = %release, host = %self.host.describe(), "process started");
                Ok(())
            }
        }
    }

    pub(crate) async fn stop(&self, control: &ServiceControl) -> Result<(), DriverError> {
        match control {
            ServiceControl::Systemd(unit) => {
                self.host
                    .run(&unit.stop_command())
                    .await?
                    .check(&self.ctx(&format!("stopping {}", unit.unit())))?;
                Ok(())
            }
            ServiceControl::Process(spec) => {
                let Some(pid) = self.probe(Some("TERM")).await? else {
                    return self.forget().await;
                };
                tracing::debug!(pid, host = %self.host.describe(), "sent SIGTERM");
                if self.wait_gone(spec.grace, spec.poll).await? {
                    return self.forget().await;
                }
                tracing::warn!(pid, grace_s = spec.grace.as_secs_f64(), host = %self.host.describe(), "still running after the grace period; sending SIGKILL");
                self.kill(spec.poll).await
            }
        }
    }

    pub(crate) async fn force_stop(&self, control: &ServiceControl) -> Result<(), DriverError> {
        match control {
            ServiceControl::Systemd(unit) => {
                self.host
                    .run(&unit.kill_command())
                    .await?
                    .check(&self.ctx(&format!("killing {}", unit.unit())))?;
                Ok(())
            }
            ServiceControl::Process(spec) => self.kill(spec.poll).await,
        }
    }

    async fn kill(&self, poll: Duration) -> Result<(), DriverError> {
        if self.probe(Some("KILL")).await?.is_none() {
            return self.forget().await;
        }
        if self.wait_gone(Duration::from_secs(10), poll).await? {
            return self.forget().await;
        }
        Err(DriverError::new(
            self.ctx("the process survived SIGKILL for 10 s"),
        ))
    }

    /// Polls until the process is gone (true) or `limit` passes (false).
    async fn wait_gone(&self, limit: Duration, poll: Duration) -> Result<bool, DriverError> {
        let probe = || async {
            match self.probe(None).await {
                Ok(None) => ControlFlow::Break(Ok(())),
                Ok(Some(_)) => ControlFlow::Continue(()),
                Err(e) => ControlFlow::Break(Err(e)),
            }
        };
        match poll_until(Bound::after(limit), poll, None, probe).await {
            Ok(gone) => gone.value.map(|()| true),
            // Not cancellable (no token): only the limit ends the wait.
            Err(WaitError::Exhausted { .. } | WaitError::Cancelled { .. }) => Ok(false),
        }
    }

    async fn forget(&self) -> Result<(), DriverError> {
        self.host
            .run(&Command::new("rm").args(["-f", "--", &self.pidfile()]))
            .await?
            .check(&self.ctx("removing the pid file"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_argv_is_exact() {
        let u = SystemdUnit::new("app@blue.service").unwrap();
        assert_eq!(
            u.start_command().argv(),
            ["systemctl", "start", "--", "app@blue.service"]
        );
        assert_eq!(
            u.stop_command().argv(),
            ["systemctl", "stop", "--", "app@blue.service"]
        );
        assert_eq!(
            u.is_active_command().argv(),
            ["systemctl", "is-active", "--", "app@blue.service"]
        );
        assert_eq!(
            u.kill_command().argv(),
            ["systemctl", "kill", "-s", "KILL", "--", "app@blue.service"]
        );
        let u = u.user(true).sudo(true);
        assert_eq!(
            u.stop_command().argv(),
            [
                "sudo",
                "-n",
                "systemctl",
                "--user",
                "stop",
                "--",
                "app@blue.service"
            ]
        );
        assert_eq!(
            u.stop_command().to_shell_line(),
            "exec sudo -n systemctl --user stop -- app@blue.service"
        );
    }

    #[test]
    fn bad_unit_names_are_refused() {
        for bad in ["", "-x", "a b", "a;b", "a/b", "$(x)", ".service", "a\nb"] {
            let e = SystemdUnit::new(bad).unwrap_err().to_string();
            assert!(e.contains("systemd unit"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn placeholders_are_replaced_per_element_without_a_shell() {
        let spec = ProcessSpec::new([
            "./app",
            "--version",
            "{release}",
            "--dir={release_dir}",
            "$(x) {root}",
        ])
        .unwrap()
        .env("DATA", "{root}/shared")
        .unwrap();
        let cmd = spec.command("/srv/a", "/srv/a/releases/v2", &ReleaseId::new("v2").unwrap());
        assert_eq!(
            cmd.argv(),
            [
                "./app",
                "--version",
                "v2",
                "--dir=/srv/a/releases/v2",
                "$(x) /srv/a"
            ]
        );
        assert_eq!(cmd.get_env(), [("DATA".to_string(), "/srv/a/shared".to_string())]);
    }

    #[test]
    fn debug_output_leaves_out_environment_values() {
        let spec = ProcessSpec::new(["app"])
            .unwrap()
            .env("DB_PASSWORD", "hunter2")
            .unwrap();
        let text = format!("{spec:?}");
        assert!(
            text.contains("DB_PASSWORD") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[test]
    fn bad_process_specs_are_refused() {
        let e = ProcessSpec::new(Vec::<String>::new()).unwrap_err().to_string();
        assert!(e.contains("process argv"), "{e}");
        let e = ProcessSpec::new(["a\0"]).unwrap_err().to_string();
        assert!(e.contains("process argv") && e.contains("NUL"), "{e}");
        let e = ProcessSpec::new(["app"])
            .unwrap()
            .env("A-B", "1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("process env"), "{e}");
    }
}
