//! Service control: how an instance's application is started, stopped and
//! checked — by systemd ([`SystemdUnit`]) or by deploykit itself
//! ([`ProcessSpec`]).

use std::time::Duration;

use super::cmd::{script, Command};
use super::host::Host;
use super::layout::ReleaseLayout;
use crate::error::{DriverError, Error, Result};
use crate::names::ReleaseId;

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

    /// `systemctl kill -s <signal> -- <unit>`.
    pub fn signal_command(&self, signal: crate::chaos::ProcessSignal) -> Command {
        self.systemctl(&["kill", "-s", signal.name()])
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
/// Stopping sends SIGTERM to the process group and waits up to the grace
/// period (default 30 s) for it to exit — checked on the host every 10 ms,
/// one round trip per half second of waiting — then sends SIGKILL. "Running" means: the pid in
/// the pid file is alive, not a zombie, *and* its start time (field 22 of
/// `/proc/<pid>/stat`) is the one recorded — so a reused pid is never taken
/// for the application.
#[derive(Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    grace: Duration,
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

/// Defines `running`: whether the process recorded in `$pidfile` runs —
/// alive, not a zombie, and started when recorded (field 22 of
/// `/proc/<pid>/stat`), so a reused pid is never taken for it; sets `pid`.
/// A function's `set --` replaces only its own positional parameters. It
/// holds no single quote, so [`START`] can embed it in a quoted script.
macro_rules! running_fn {
    () => {
        r#"running() {
  [ -f "$pidfile" ] || return 1
  read -r pid start <"$pidfile" || return 1
  case $pid in ""|*[!0-9]*) return 1;; esac
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  rest=${stat##*) }
  set -- $rest
  [ "$1" != Z ] && [ "${20}" = "$start" ]
}
"#
    };
}

/// Directory `$1`, log `$2`, pid file `$3`, `current` symlink `$4` and the
/// target it must have `$5`, then the argv: prints `running <pid>` when the
/// recorded process runs already; exits 12 (starting nothing) when
/// `current` does not point at `$5`; else starts the argv detached and
/// prints `started <pid>` once it is recorded.
///
/// The started process records its own pid and start time before it
/// `exec`s the argv (a pid keeps its start time across `exec`), holding
/// `flock` on `<pidfile>.lock` (where `flock` is installed) while it checks
/// and records, and only when no recorded process runs and the script that
/// started it is still there. So a start whose script is killed midway (a
/// dropped call) either recorded its process or runs none — never an
/// unrecorded process holding the port, nor one appearing after a later
/// stop — and starts racing each other run one process.
const START: &str = concat!(
    r#"set -e; set -f
dir=$1; log=$2; pidfile=$3; current=$4; want=$5; shift 5
"#,
    running_fn!(),
    r#"if running; then echo "running $pid"; exit 0; fi
[ "$(readlink -- "$current" 2>/dev/null || true)" = "$want" ] || exit 12
cd -- "$dir"
setsid sh -c 'set -f; parent=$1; pidfile=$2; shift 2
"#,
    running_fn!(),
    r#"exec 9>"$pidfile.lock" || exit 1
if command -v flock >/dev/null 2>&1; then flock 9 || exit 1; fi
running && exit 0
stat=$(cat /proc/$$/stat) || exit 1
rest=${stat##*) }
mine() { myppid=$2; mystart=${20}; }
mine $rest
[ "$myppid" = "$parent" ] || exit 0
printf "%s %s\n" "$$" "$mystart" >"$pidfile.tmp.$$" || exit 1
mv -f -- "$pidfile.tmp.$$" "$pidfile" || exit 1
exec 9>&-
exec "$@"' deploykit-start "$$" "$pidfile" "$@" >>"$log" 2>&1 </dev/null &
child=$!
waited=0
while ! running; do
  stat=$(cat "/proc/$child/stat" 2>/dev/null) || stat=
  state=${stat##*) }
  case $state in
    ""|Z*) running && break; echo "the process exited at once; see $log" >&2; exit 1;;
  esac
  if [ "$waited" -ge 10000 ]; then echo "the process $child did not record itself in $pidfile within 10 s" >&2; exit 1; fi
  sleep 0.01 2>/dev/null || sleep 1
  waited=$((waited + 10))
done
if [ "$pid" = "$child" ]; then echo "started $pid"; else echo "running $pid"; fi"#
);

/// Prints the pid and exits 0 when the recorded process runs; exits 3 when
/// it does not.
const PROBE: &str = concat!(
    r#"set -f
pidfile=$1
"#,
    running_fn!(),
    r#"running || exit 3
echo "$pid""#
);

/// Pid file `$1`, signal `$2` (none when empty), wait `$3` ms: signals the
/// recorded process (its group, else itself), then checks every 10 ms
/// whether it is gone. Gone (or never running): removes the pid file and
/// exits 0. Still running after the wait: prints the pid and exits 4.
const SIGNAL_AND_WAIT: &str = concat!(
    r#"set -f
pidfile=$1; sig=$2; wait_ms=$3
"#,
    running_fn!(),
    r#"if running && [ -n "$sig" ]; then
  kill -s "$sig" -- "-$pid" 2>/dev/null || kill -s "$sig" "$pid" 2>/dev/null || true
fi
waited=0
while running; do
  if [ "$waited" -ge "$wait_ms" ]; then echo "$pid"; exit 4; fi
  sleep 0.01 2>/dev/null || sleep 1
  waited=$((waited + 10))
done
rm -f -- "$pidfile""#
);

/// Pid file `$1`, signal `$2`: sends the signal to the recorded process
/// (its group, else itself); exits 3 when no recorded process runs.
const SIGNAL: &str = concat!(
    r#"set -f
pidfile=$1; sig=$2
"#,
    running_fn!(),
    r#"running || exit 3
kill -s "$sig" -- "-$pid" 2>/dev/null || kill -s "$sig" "$pid""#
);

/// The longest one remote wait for an exit holds the host's session (other
/// instances on that host wait for it), and well under any SSH timeout.
const WAIT_CHUNK: Duration = Duration::from_millis(500);

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

    /// The pid of the running process.
    async fn probe(&self) -> Result<Option<u32>, DriverError> {
        let out = self.host.run(&script(PROBE).arg(self.pidfile())).await?;
        match out.status {
            Some(0) => Ok(out.stdout.trim().parse().ok()),
            Some(3) => Ok(None),
            _ => Err(DriverError::new(
                out.describe_failure(&self.ctx("checking the process")),
            )),
        }
    }

    /// Sends `signal` (if any) to the recorded process and waits up to
    /// `limit` for it to exit, in remote waits of at most [`WAIT_CHUNK`]:
    /// `None` once it is gone (the pid file removed), else its pid.
    async fn signal_and_wait(
        &self,
        signal: Option<&str>,
        limit: Duration,
    ) -> Result<Option<u32>, DriverError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut signal = signal;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let chunk = left.min(WAIT_CHUNK);
            let cmd = script(SIGNAL_AND_WAIT).args([
                self.pidfile(),
                signal.unwrap_or_default().to_string(),
                chunk.as_millis().to_string(),
            ]);
            let out = self.host.run(&cmd).await?;
            match out.status {
                Some(0) => return Ok(None),
                Some(4) if left.is_zero() => return Ok(out.stdout.trim().parse().ok().or(Some(0))),
                Some(4) => signal = None,
                _ => {
                    return Err(DriverError::new(
                        out.describe_failure(&self.ctx("stopping the process")),
                    ))
                }
            }
        }
    }

    /// Sends `signal` to the application. Killing or continuing a process
    /// that does not run succeeds (there is nothing left to do); stopping
    /// one fails, naming it.
    pub(crate) async fn signal(
        &self,
        control: &ServiceControl,
        signal: crate::chaos::ProcessSignal,
    ) -> Result<(), DriverError> {
        let what = format!("sending {signal}");
        match control {
            ServiceControl::Systemd(unit) => {
                self.host
                    .run(&unit.signal_command(signal))
                    .await?
                    .check(&self.ctx(&format!("{what} to {}", unit.unit())))?;
                Ok(())
            }
            ServiceControl::Process(_) => {
                let cmd = script(SIGNAL).args([self.pidfile(), signal.name().to_owned()]);
                let out = self.host.run(&cmd).await?;
                match (out.status, signal) {
                    (Some(0), _) => Ok(()),
                    (Some(3), crate::chaos::ProcessSignal::Kill | crate::chaos::ProcessSignal::Cont) => {
                        Ok(())
                    }
                    (Some(3), crate::chaos::ProcessSignal::Stop) => Err(DriverError::new(
                        self.ctx(&format!("{what}: the process is not running")),
                    )),
                    _ => Err(DriverError::new(out.describe_failure(&self.ctx(&what)))),
                }
            }
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
            ServiceControl::Process(_) => Ok(self.probe().await?.is_some()),
        }
    }

    /// Starts the application. `hint` is the release `current` was last
    /// pointed at by this instance, if known: the start script checks it
    /// against `current` on the host, and only when it is missing or stale
    /// does `current` cost a round trip of its own.
    pub(crate) async fn start(
        &self,
        control: &ServiceControl,
        hint: Option<ReleaseId>,
    ) -> Result<(), DriverError> {
        match control {
            ServiceControl::Systemd(unit) => {
                self.host
                    .run(&unit.start_command())
                    .await?
                    .check(&self.ctx(&format!("starting {}", unit.unit())))?;
                Ok(())
            }
            ServiceControl::Process(spec) => {
                let mut hint = hint;
                for _ in 0..2 {
                    let release = match hint.take() {
                        Some(r) => r,
                        None => self.layout.current(self.host).await?.ok_or_else(|| {
                            DriverError::new(format!(
                                "no release is installed under {} on {}; install one before starting",
                                self.layout.root(),
                                self.host.describe()
                            ))
                        })?,
                    };
                    if self.start_release(spec, &release).await? {
                        return Ok(());
                    }
                }
                Err(DriverError::transient(self.ctx(&format!(
                    "starting the process: {}/current changed while starting",
                    self.layout.root()
                ))))
            }
        }
    }

    /// Starts `release` unless ours runs already; `false` (nothing started)
    /// when `current` does not point at `release`.
    async fn start_release(&self, spec: &ProcessSpec, release: &ReleaseId) -> Result<bool, DriverError> {
        let dir = self.layout.release_dir(release);
        let app = spec.command(self.layout.root(), &dir, release);
        app.validate()
            .map_err(|e| DriverError::new("invalid process command").with_source(e))?;
        let mut cmd = script(START).args([
            dir.clone(),
            self.layout.file("app.log"),
            self.pidfile(),
            self.layout.file("current"),
            format!("releases/{release}"),
        ]);
        // The environment goes on the command (inherited by the app), not
        // into its argv: argv shows up in messages, and values may be
        // secrets.
        for (k, v) in app.get_env() {
            cmd = cmd.env(k.as_str(), v.as_str());
        }
        cmd = cmd.args(app.argv());
        let out = self.host.run(&cmd).await?;
        if out.status == Some(12) {
            return Ok(false);
        }
        let out = out.check(&self.ctx(&format!("starting {app} in {dir}")))?;
        match out.stdout.trim().split_once(' ') {
            Some(("running", pid)) => {
                tracing::debug!(pid, host = %self.host.describe(), "already running");
            }
            Some((_, pid)) => {
                tracing::info!(pid, release = %release, host = %self.host.describe(), "process started");
            }
            None => {}
        }
        Ok(true)
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
                let Some(pid) = self.signal_and_wait(Some("TERM"), spec.grace).await? else {
                    return Ok(());
                };
                tracing::warn!(pid, grace_s = spec.grace.as_secs_f64(), host = %self.host.describe(), "still running after the grace period; sending SIGKILL");
                self.kill().await
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
            ServiceControl::Process(_) => self.kill().await,
        }
    }

    async fn kill(&self) -> Result<(), DriverError> {
        match self
            .signal_and_wait(Some("KILL"), Duration::from_secs(10))
            .await?
        {
            None => Ok(()),
            Some(_) => Err(DriverError::new(
                self.ctx("the process survived SIGKILL for 10 s"),
            )),
        }
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
