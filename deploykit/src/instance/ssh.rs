//! SSH hosts (feature `ssh`): one libssh2 session per host, host keys
//! checked against a known_hosts file, releases streamed as a tar.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};
use ssh2::{CheckResult, HashType, KnownHostFileKind, Session};

use super::cmd::{quote, script, tail, Command, Output};
use super::host::Host;
use crate::error::{DriverError, Error, Result};

/// The manifest written into each uploaded release and checked remotely
/// with `sha256sum -c` before the release is moved into place.
pub const MANIFEST: &str = super::host::STREAM_MANIFEST;

/// Unpacks a release tar (`$3`, `-` for stdin; `$2` = `gzip` or `plain`)
/// into the new directory `$1` and checks every file against the manifest.
const UNPACK: &str = r#"set -e; mkdir -- "$1"; cd -- "$1"
if [ "$2" = gzip ]; then tar -x -z --no-same-owner -f "$3"; else tar -x --no-same-owner -f "$3"; fi
sha256sum -c --quiet --strict .deploykit.sha256"#;

/// How deploykit authenticates to an SSH host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshAuth {
    /// A private key file (OpenSSH or PEM format), optionally with a
    /// passphrase.
    KeyFile {
        /// The private key.
        private_key: PathBuf,
        /// Its passphrase, if encrypted.
        passphrase: Option<String>,
    },
    /// The identities of a running ssh-agent, tried in turn: the agent at
    /// `socket`, or at `SSH_AUTH_SOCK` when `None`.
    Agent {
        /// The agent's socket; `None` reads `SSH_AUTH_SOCK`.
        socket: Option<PathBuf>,
    },
}

/// What to do with a host key that is not in the known_hosts file.
///
/// A key that *differs* from the recorded one is refused under every
/// policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostKeyPolicy {
    /// Refuse unknown hosts (the default): record their keys beforehand
    /// (see `docs/hosts.md`).
    #[default]
    Strict,
    /// Trust an unknown host's key on first use and record it in the
    /// known_hosts file; later connections are checked against it. An
    /// explicit opt-in: the first connection is not protected against a
    /// man in the middle.
    TrustOnFirstUse,
}

#[derive(Debug)]
struct SshConfig {
    host: String,
    port: u16,
    user: String,
    auth: SshAuth,
    known_hosts: PathBuf,
    policy: HostKeyPolicy,
    timeout: Duration,
    connect_timeout: Duration,
    keepalive: Duration,
    gzip: bool,
}

/// Builds an [`SshHost`]; setters never fail, [`build`](Self::build)
/// checks everything.
#[derive(Debug, Clone)]
pub struct SshHostBuilder {
    host: String,
    port: u16,
    user: Option<String>,
    auth: Option<SshAuth>,
    known_hosts: Option<PathBuf>,
    policy: HostKeyPolicy,
    timeout: Duration,
    connect_timeout: Duration,
    keepalive: Duration,
    gzip: bool,
}

impl SshHostBuilder {
    /// The user to log in as (required; a dedicated deploy user is best).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }

    /// The SSH port (default 22).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Authenticates with a private key file.
    pub fn key_file(mut self, private_key: impl Into<PathBuf>) -> Self {
        self.auth = Some(SshAuth::KeyFile {
            private_key: private_key.into(),
            passphrase: None,
        });
        self
    }

    /// Authenticates as `auth` says.
    pub fn auth(mut self, auth: SshAuth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// Authenticates with the ssh-agent at `SSH_AUTH_SOCK`.
    pub fn agent(self) -> Self {
        self.auth(SshAuth::Agent { socket: None })
    }

    /// Authenticates with the ssh-agent listening on `socket`.
    pub fn agent_socket(self, socket: impl Into<PathBuf>) -> Self {
        self.auth(SshAuth::Agent {
            socket: Some(socket.into()),
        })
    }

    /// The known_hosts file host keys are checked against (required).
    pub fn known_hosts(mut self, path: impl Into<PathBuf>) -> Self {
        self.known_hosts = Some(path.into());
        self
    }

    /// What to do with unknown host keys (default: refuse).
    pub fn host_key_policy(mut self, policy: HostKeyPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The longest any single blocking SSH call may take before it fails
    /// (default 30 s) — so nothing hangs forever.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The longest the TCP connect may take (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How often an idle session sends a keepalive (default 15 s; zero
    /// turns keepalives off), so a NAT or firewall does not forget the
    /// connection between steps.
    ///
    /// Keepalives are sent by a background thread only while no command
    /// runs — it takes the same lock as a command — so one never interleaves
    /// with a command in flight (which keeps the connection busy anyway).
    pub fn keepalive(mut self, every: Duration) -> Self {
        self.keepalive = every;
        self
    }

    /// Gzips the release tar on the wire (default off: cheaper on a fast
    /// network, better on a slow one).
    pub fn gzip(mut self, gzip: bool) -> Self {
        self.gzip = gzip;
        self
    }

    /// Checks the settings. Does not connect.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `ssh host`, `ssh user` (missing or not
    /// `[a-z_][a-z0-9_.-]*`), `ssh auth` (missing), `known_hosts`
    /// (missing), `ssh port` or `ssh timeout` (zero).
    pub fn build(self) -> Result<SshHost> {
        let host_ok = !self.host.is_empty()
            && self.host.len() <= 253
            && !self.host.starts_with(['-', '.'])
            && self
                .host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':'));
        if !host_ok {
            return Err(Error::invalid(
                "ssh host",
                format!("{:?} is not a host name or IP address", self.host),
            ));
        }
        if self.port == 0 {
            return Err(Error::invalid(
                "ssh port",
                "0 is not a port; use 1-65535 (default 22)",
            ));
        }
        let user = self
            .user
            .ok_or_else(|| Error::invalid("ssh user", "missing; set the (deploy) user to log in as"))?;
        let user_ok = user
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && user.len() <= 32
            && user
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.'));
        if !user_ok {
            return Err(Error::invalid(
                "ssh user",
                format!("{user:?} is not a user name; use [a-z_][a-z0-9_.-]*"),
            ));
        }
        let auth = self.auth.ok_or_else(|| {
            Error::invalid(
                "ssh auth",
                "missing; give a private key file or use the ssh-agent",
            )
        })?;
        let known_hosts = self.known_hosts.ok_or_else(|| {
            Error::invalid(
                "known_hosts",
                "missing; give the known_hosts file that holds the hosts' keys (e.g. ~/.ssh/known_hosts)",
            )
        })?;
        if self.timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(Error::invalid("ssh timeout", "must be above zero; e.g. 30s"));
        }
        Ok(SshHost {
            config: Arc::new(SshConfig {
                host: self.host,
                port: self.port,
                user,
                auth,
                known_hosts,
                policy: self.policy,
                timeout: self.timeout,
                connect_timeout: self.connect_timeout,
                keepalive: self.keepalive,
                gzip: self.gzip,
            }),
            session: Arc::new(Mutex::new(None)),
            keepalive_started: Arc::new(std::sync::Once::new()),
        })
    }
}

/// A host reached over SSH with libssh2 (the `ssh2` crate): no `ssh` or
/// `rsync` binary needed.
///
/// * One session per `SshHost`, opened on first use and reused by every
///   step (clones share it; calls take turns on a mutex).
/// * Host keys are checked against the known_hosts file: an unknown key is
///   refused unless [`HostKeyPolicy::TrustOnFirstUse`] is chosen; a changed
///   key is always refused.
/// * Every blocking libssh2 call runs in `spawn_blocking` under
///   `Session::set_timeout`, so nothing hangs forever.
/// * A session found dead when a step begins is re-established once before
///   the step fails.
/// * Keepalives ([`SshHostBuilder::keepalive`]) go out only while the
///   session is idle, never in the middle of a command.
/// * [`put_dir`](Host::put_dir) streams a tar of the release (optionally
///   gzipped) over one exec channel into `tar -x`, with a SHA-256 manifest
///   that the host checks (`sha256sum -c`) before the directory is used.
///
/// Remote command lines are built by [`Command::to_shell_line`], every word
/// quoted; the deploy user's login shell must be a POSIX shell (sh, bash,
/// dash, zsh). The host needs `sh`, `tar`, `sha256sum`, `setsid` and
/// coreutils (any Debian or RHEL-like system).
#[derive(Clone)]
pub struct SshHost {
    config: Arc<SshConfig>,
    session: Arc<Mutex<Option<Session>>>,
    /// Starts the keepalive thread once per session slot.
    keepalive_started: Arc<std::sync::Once>,
}

impl std::fmt::Debug for SshHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SshHost")
            .field("host", &self.describe())
            .field("known_hosts", &self.config.known_hosts)
            .field("policy", &self.config.policy)
            .finish()
    }
}

/// Whether a failure happened before the command reached the host (then a
/// reconnect-and-retry cannot run it twice).
enum Fail {
    BeforeSend(DriverError),
    After(DriverError),
}

impl SshHost {
    /// Starts building a host reached at `host` (name or IP address).
    pub fn builder(host: impl Into<String>) -> SshHostBuilder {
        SshHostBuilder {
            host: host.into(),
            port: 22,
            user: None,
            auth: None,
            known_hosts: None,
            policy: HostKeyPolicy::Strict,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(15),
            gzip: false,
        }
    }

    /// Drops the cached session; the next call reconnects.
    pub fn disconnect(&self) {
        if let Ok(mut g) = self.session.lock() {
            if let Some(s) = g.take() {
                let _ = s.disconnect(None, "bye", None);
            }
        }
    }

    /// Connects now (normally the first call does), checking the host key
    /// and authenticating.
    ///
    /// # Errors
    /// As any call: unreachable host (transient), refused host key or
    /// authentication (permanent).
    pub async fn connect(&self) -> Result<(), DriverError> {
        self.with_session(|_| Ok(())).await
    }

    /// Runs `f` with a live session in a blocking thread; reconnects once
    /// when `f` fails before sending anything.
    async fn with_session<T, F>(&self, f: F) -> Result<T, DriverError>
    where
        T: Send + 'static,
        F: Fn(&Session) -> Result<T, Fail> + Send + 'static,
    {
        let config = self.config.clone();
        let slot = self.session.clone();
        let who = self.describe();
        if !config.keepalive.is_zero() {
            self.keepalive_started.call_once(|| {
                spawn_keepalive(Arc::downgrade(&slot), config.keepalive, who.clone());
            });
        }
        tokio::task::spawn_blocking(move || {
            let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
            for attempt in 0..2 {
                let fresh = guard.is_none();
                if fresh {
                    *guard = Some(connect(&config, &who)?);
                }
                let sess = guard.as_ref().expect("session just set");
                match f(sess) {
                    Ok(v) => return Ok(v),
                    Err(Fail::BeforeSend(e)) if attempt == 0 && !fresh => {
                        tracing::warn!(host = %who, error = %e, "ssh session lost; reconnecting once");
                        *guard = None;
                    }
                    Err(Fail::BeforeSend(e)) | Err(Fail::After(e)) => {
                        // A broken channel usually means a broken session:
                        // start afresh next time.
                        *guard = None;
                        return Err(e);
                    }
                }
            }
            Err(DriverError::transient(format!(
                "{who}: the session could not be re-established"
            )))
        })
        .await
        .map_err(|e| DriverError::new(format!("{}: ssh worker failed", self.describe())).with_source(e))?
    }
}

/// Sends a keepalive on the session in `slot` every `every` while the
/// session is idle: a session in use (its lock held by a command) is
/// skipped, so a keepalive never interleaves with a command, and the
/// session's keepalive interval is set only around the send (see
/// `connect`). Ends when the host is dropped. A keepalive that fails drops
/// the session; the next command reconnects.
fn spawn_keepalive(slot: std::sync::Weak<Mutex<Option<Session>>>, every: Duration, who: String) {
    let host = who.clone();
    let spawned = std::thread::Builder::new()
        .name("ssh-keepalive".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            let Some(slot) = slot.upgrade() else { return };
            let mut guard = match slot.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::WouldBlock) => continue,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            };
            let Some(sess) = guard.as_ref() else { continue };
            // No reply wanted: nothing is left for the next command to read.
            sess.set_keepalive(false, 1);
            let sent = sess.keepalive_send();
            sess.set_keepalive(false, 0);
            match sent {
                Ok(_) => tracing::trace!(host = %host, "ssh keepalive sent"),
                Err(e) => {
                    tracing::debug!(host = %host, error = %e, "ssh keepalive failed; the next command reconnects");
                    *guard = None;
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(host = %who, error = %e, "cannot start the ssh keepalive thread; going without");
    }
}

fn ssh_err(who: &str, what: &str, e: impl std::error::Error + Send + Sync + 'static) -> DriverError {
    DriverError::transient(format!("{who}: {what}")).with_source(e)
}

fn connect(cfg: &SshConfig, who: &str) -> Result<Session, DriverError> {
    let addrs: Vec<_> = (cfg.host.as_str(), cfg.port)
        .to_socket_addrs()
        .map_err(|e| ssh_err(who, "resolving the host", e))?
        .collect();
    let mut last = None;
    let mut tcp = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, cfg.connect_timeout) {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = tcp.ok_or_else(|| match last {
        Some(e) => ssh_err(who, "connecting", e),
        None => DriverError::new(format!("{who}: the host name resolves to no address")),
    })?;
    let _ = tcp.set_nodelay(true);
    let mut sess = Session::new().map_err(|e| ssh_err(who, "creating a session", e))?;
    sess.set_tcp_stream(tcp);
    sess.set_timeout(u32::try_from(cfg.timeout.as_millis()).unwrap_or(u32::MAX));
    sess.handshake().map_err(|e| ssh_err(who, "SSH handshake", e))?;
    check_host_key(&sess, cfg, who)?;
    authenticate(&sess, cfg, who)?;
    // No keepalive interval on the session itself: with one set, libssh2
    // bounds every blocking wait by the time to the next keepalive and
    // fails a command that is quiet longer ("Timed out waiting on
    // socket"). The keepalive thread sets it only for its own send.
    tracing::debug!(host = %who, "ssh session established");
    Ok(sess)
}

/// known_hosts files are rewritten whole when a key is recorded: one
/// writer at a time in this process.
static KNOWN_HOSTS_WRITE: Mutex<()> = Mutex::new(());

fn check_host_key(sess: &Session, cfg: &SshConfig, who: &str) -> Result<(), DriverError> {
    let (key, key_type) = sess
        .host_key()
        .ok_or_else(|| DriverError::new(format!("{who}: the server sent no host key")))?;
    let fingerprint = sess
        .host_key_hash(HashType::Sha256)
        .map(|h| format!("SHA256:{}", base64_nopad(h)))
        .unwrap_or_else(|| "(unknown)".into());
    let _write_guard = KNOWN_HOSTS_WRITE.lock().unwrap_or_else(|p| p.into_inner());
    let mut kh = sess
        .known_hosts()
        .map_err(|e| DriverError::new(format!("{who}: known_hosts")).with_source(e))?;
    let path = &cfg.known_hosts;
    if path.exists() {
        kh.read_file(path, KnownHostFileKind::OpenSSH).map_err(|e| {
            DriverError::new(format!(
                "{who}: cannot read the known_hosts file {}",
                path.display()
            ))
            .with_source(e)
        })?;
    }
    let entry = if cfg.port == 22 {
        cfg.host.clone()
    } else {
        format!("[{}]:{}", cfg.host, cfg.port)
    };
    match kh.check_port(&cfg.host, cfg.port, key) {
        CheckResult::Match => Ok(()),
        CheckResult::Mismatch => Err(DriverError::new(format!(
            "{who}: HOST KEY MISMATCH — the host presented {fingerprint}, which differs from the key recorded for \
             {entry} in {}; refusing to connect (the host was reinstalled, or someone is intercepting the \
             connection). If the change is legitimate, verify the new fingerprint out of band, then remove the old \
             entry with `ssh-keygen -R {} -f {}`",
            path.display(),
            quote(&entry),
            quote(&path.display().to_string())
        ))),
        CheckResult::NotFound => match cfg.policy {
            HostKeyPolicy::Strict => Err(DriverError::new(format!(
                "{who}: unknown host key {fingerprint} — {entry} is not in {}; refusing to connect. Verify the \
                 fingerprint out of band and add the key (e.g. `ssh-keyscan -p {} {} >> {}`)",
                path.display(),
                cfg.port,
                quote(&cfg.host),
                quote(&path.display().to_string())
            ))),
            HostKeyPolicy::TrustOnFirstUse => {
                kh.add(&entry, key, "added by deploykit (trust on first use)", key_type.into())
                    .map_err(|e| DriverError::new(format!("{who}: recording the host key")).with_source(e))?;
                kh.write_file(path, KnownHostFileKind::OpenSSH).map_err(|e| {
                    DriverError::new(format!("{who}: writing the known_hosts file {}", path.display())).with_source(e)
                })?;
                tracing::warn!(host = %who, %fingerprint, file = %path.display(), "trusted an unknown host key on first use and recorded it");
                Ok(())
            }
        },
        CheckResult::Failure => Err(DriverError::new(format!(
            "{who}: the host key could not be checked against {}",
            path.display()
        ))),
    }
}

fn authenticate(sess: &Session, cfg: &SshConfig, who: &str) -> Result<(), DriverError> {
    let fail = |how: &str, e: Option<ssh2::Error>| {
        let d = DriverError::new(format!("{who}: authentication as {} with {how} failed", cfg.user));
        match e {
            Some(e) => d.with_source(e),
            None => d,
        }
    };
    match &cfg.auth {
        SshAuth::KeyFile {
            private_key,
            passphrase,
        } => {
            sess.userauth_pubkey_file(&cfg.user, None, private_key, passphrase.as_deref())
                .map_err(|e| fail(&format!("the key {}", private_key.display()), Some(e)))?;
        }
        SshAuth::Agent { socket } => {
            let mut agent = sess.agent().map_err(|e| fail("the ssh-agent", Some(e)))?;
            if let Some(path) = socket {
                agent
                    .set_identity_path(path)
                    .map_err(|e| fail(&format!("the ssh-agent at {}", path.display()), Some(e)))?;
            }
            agent
                .connect()
                .map_err(|e| fail("the ssh-agent (is SSH_AUTH_SOCK set?)", Some(e)))?;
            agent
                .list_identities()
                .map_err(|e| fail("the ssh-agent", Some(e)))?;
            let ids = agent.identities().map_err(|e| fail("the ssh-agent", Some(e)))?;
            let ok = ids.iter().any(|id| agent.userauth(&cfg.user, id).is_ok());
            let _ = agent.disconnect();
            if !ok {
                return Err(fail(
                    &format!("any of the agent's {} identities", ids.len()),
                    None,
                ));
            }
        }
    }
    if sess.authenticated() {
        Ok(())
    } else {
        Err(fail("the configured method", None))
    }
}

/// Opens a channel and starts `line`; failures here happen before the
/// command reached the host.
/// The exec line for `cmd` and what to send on its stdin. A command with
/// environment variables runs as `exec sh -s` with the exports and the
/// command on stdin: the exec line is the remote shell's command line,
/// readable by every user of the host (`ps`), and the values may be
/// secrets. (The channel's own environment would need an `AcceptEnv` for
/// every name in the host's sshd config.)
fn exec_request(cmd: &Command) -> (String, Option<String>) {
    if cmd.get_env().is_empty() {
        (cmd.to_shell_line(), None)
    } else {
        ("exec sh -s".to_string(), Some(cmd.to_shell_script()))
    }
}

fn open_exec(sess: &Session, line: &str, who: &str) -> Result<ssh2::Channel, Fail> {
    let mut ch = sess
        .channel_session()
        .map_err(|e| Fail::BeforeSend(ssh_err(who, "opening a channel", e)))?;
    ch.exec(line)
        .map_err(|e| Fail::BeforeSend(ssh_err(who, "starting a command", e)))?;
    Ok(ch)
}

/// Reads stdout and stderr to their end and collects the exit status.
fn finish(mut ch: ssh2::Channel, command: String, who: &str) -> Result<Output, Fail> {
    let lost = |what: &str, e: io::Error| Fail::After(ssh_err(who, &format!("{what} of `{command}`"), e));
    let mut out = Vec::new();
    ch.read_to_end(&mut out)
        .map_err(|e| lost("reading the output", e))?;
    let mut err = Vec::new();
    ch.stderr()
        .read_to_end(&mut err)
        .map_err(|e| lost("reading the errors", e))?;
    ch.wait_close()
        .map_err(|e| Fail::After(ssh_err(who, &format!("closing `{command}`"), e)))?;
    let signalled = ch.exit_signal().ok().and_then(|s| s.exit_signal).is_some();
    let status = if signalled { None } else { ch.exit_status().ok() };
    Ok(Output {
        status,
        stdout: tail(&out),
        stderr: tail(&err),
        command,
    })
}

#[async_trait]
impl Host for SshHost {
    fn describe(&self) -> String {
        format!(
            "ssh {}@{}:{}",
            self.config.user, self.config.host, self.config.port
        )
    }

    async fn run(&self, cmd: &Command) -> Result<Output, DriverError> {
        cmd.validate()
            .map_err(|e| DriverError::new(format!("refusing to run {cmd}")).with_source(e))?;
        let (line, stdin) = exec_request(cmd);
        let shown = cmd.to_string();
        let who = self.describe();
        self.with_session(move |sess| {
            let mut ch = open_exec(sess, &line, &who)?;
            if let Some(script) = &stdin {
                ch.write_all(script.as_bytes())
                    .map_err(|e| Fail::After(ssh_err(&who, "sending the environment", e)))?;
            }
            ch.send_eof()
                .map_err(|e| Fail::After(ssh_err(&who, "closing stdin", e)))?;
            finish(ch, shown.clone(), &who)
        })
        .await
    }

    async fn put_dir(&self, source: &Path, dest: &str) -> Result<(), DriverError> {
        let source = source.to_path_buf();
        let cmd = script(UNPACK).args([dest, if self.config.gzip { "gzip" } else { "plain" }, "-"]);
        let line = cmd.to_shell_line();
        let shown = format!("tar -x into {dest}");
        let gzip = self.config.gzip;
        let who = self.describe();
        let dest_owned = dest.to_string();
        let sent = self
            .with_session(move |sess| {
                let mut ch = open_exec(sess, &line, &who)?;
                let streamed = {
                    // Large writes: libssh2 sends up to 32 KiB per packet.
                    let counter = CountingWriter {
                        inner: io::BufWriter::with_capacity(256 * 1024, &mut ch),
                        count: 0,
                    };
                    write_release_tar(&source, counter, gzip)
                };
                match streamed {
                    Ok(bytes) => {
                        // The stream may have fit in buffers before the
                        // connection broke: a failure from here on is still
                        // a failed upload.
                        let lost = |e: DriverError| {
                            Fail::After(
                                DriverError::transient(format!(
                                    "{who}: uploading the release to {dest_owned}"
                                ))
                                .with_source(e),
                            )
                        };
                        ch.send_eof()
                            .map_err(|e| lost(ssh_err(&who, "closing the upload", e)))?;
                        let out = finish(ch, shown.clone(), &who).map_err(|f| match f {
                            Fail::BeforeSend(e) | Fail::After(e) => lost(e),
                        })?;
                        out.check(&format!(
                            "{who}: unpacking and verifying the release in {dest_owned}"
                        ))
                        .map_err(Fail::After)?;
                        Ok(bytes)
                    }
                    Err(e) => {
                        // The remote side may have said why (tar failed).
                        let why = finish(ch, shown.clone(), &who)
                            .ok()
                            .map(|o| o.stderr)
                            .filter(|s| !s.trim().is_empty())
                            .map(|s| format!(" (remote: {})", s.trim()))
                            .unwrap_or_default();
                        Err(Fail::After(
                            DriverError::transient(format!(
                                "{who}: uploading the release to {dest_owned}{why}"
                            ))
                            .with_source(e),
                        ))
                    }
                }
            })
            .await?;
        tracing::debug!(host = %self.describe(), dest, bytes = sent, "release uploaded and verified");
        Ok(())
    }
}

struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Writes a tar of the directory `source` (symlinks kept as symlinks), then
/// a [`MANIFEST`] with the SHA-256 of every regular file, computed while
/// streaming. Returns the bytes written to `out`.
fn write_release_tar<W: Write>(source: &Path, out: CountingWriter<W>, gzip: bool) -> io::Result<u64> {
    let mut out = if gzip {
        let enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
        write_tar(source, enc)?.finish()?
    } else {
        write_tar(source, out)?
    };
    out.flush()?;
    Ok(out.count)
}

fn write_tar<W: Write>(source: &Path, out: W) -> io::Result<W> {
    let mut builder = tar::Builder::new(out);
    builder.mode(tar::HeaderMode::Complete);
    builder.follow_symlinks(false);
    let mut manifest = String::new();
    walk(source, Path::new(""), &mut builder, &mut manifest)?;
    let mut header = tar::Header::new_gnu();
    header.set_size(manifest.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_entry_type(tar::EntryType::Regular);
    builder.append_data(&mut header, MANIFEST, manifest.as_bytes())?;
    builder.into_inner()
}

fn walk<W: Write>(root: &Path, rel: &Path, b: &mut tar::Builder<W>, manifest: &mut String) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(root.join(rel))?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let rel_path = rel.join(&name);
        let Some(rel_str) = rel_path.to_str() else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not UTF-8; rename it", rel_path.display()),
            ));
        };
        if !super::host::streamable_name(rel_str) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "release file name {rel_str:?} has a newline or backslash (or is reserved); rename it"
                ),
            ));
        }
        let meta = fs::symlink_metadata(entry.path())?;
        let ft = meta.file_type();
        if ft.is_dir() {
            b.append_dir(&rel_path, entry.path())?;
            walk(root, &rel_path, b, manifest)?;
        } else if ft.is_file() {
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            let mut reader = HashingReader {
                inner: fs::File::open(entry.path())?,
                hasher: Sha256::new(),
            };
            b.append_data(&mut header, &rel_path, &mut reader)?;
            manifest.push_str(&hex::encode(reader.hasher.finalize()));
            manifest.push_str("  ./");
            manifest.push_str(rel_str);
            manifest.push('\n');
        } else if ft.is_symlink() {
            let target = fs::read_link(entry.path())?;
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            header.set_size(0);
            b.append_link(&mut header, &rel_path, &target)?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{rel_str:?} is neither a file, a directory nor a symlink; remove it from the release"
                ),
            ));
        }
    }
    Ok(())
}

/// Base64 without padding, as OpenSSH prints fingerprints.
fn base64_nopad(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            s.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_values_go_on_stdin_never_on_the_exec_line() {
        let cmd = Command::new("app")
            .args(["--port", "8080"])
            .env("DB_PASSWORD", "hunter2 'quoted'\nline")
            .cwd("/srv/app");
        assert!(
            cmd.to_shell_line().contains("hunter2"),
            "the line alone would carry it"
        );
        let (line, stdin) = exec_request(&cmd);
        assert_eq!(line, "exec sh -s");
        assert!(!line.contains("hunter2"));
        let script = stdin.expect("a script on stdin");
        assert!(script.contains("export DB_PASSWORD="), "{script}");
        assert!(
            script.ends_with("cd -- /srv/app && exec app --port 8080\n"),
            "{script}"
        );
        let plain = Command::new("true");
        assert_eq!(exec_request(&plain), ("exec true".to_string(), None));
    }

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64_nopad(b""), "");
        assert_eq!(base64_nopad(b"f"), "Zg");
        assert_eq!(base64_nopad(b"fo"), "Zm8");
        assert_eq!(base64_nopad(b"foo"), "Zm9v");
        assert_eq!(base64_nopad(b"foobar!"), "Zm9vYmFyIQ");
    }

    #[test]
    fn builder_names_the_bad_field() {
        let ok = || {
            SshHost::builder("127.0.0.1")
                .user("deploy")
                .key_file("/k")
                .known_hosts("/kh")
        };
        assert!(ok().build().is_ok());
        for (b, field) in [
            (
                SshHost::builder("a b")
                    .user("d")
                    .key_file("/k")
                    .known_hosts("/kh"),
                "ssh host",
            ),
            (ok().port(0), "ssh port"),
            (
                SshHost::builder("h").key_file("/k").known_hosts("/kh"),
                "ssh user",
            ),
            (ok().user("Root;x"), "ssh user"),
            (SshHost::builder("h").user("d").known_hosts("/kh"), "ssh auth"),
            (SshHost::builder("h").user("d").key_file("/k"), "known_hosts"),
            (ok().timeout(Duration::ZERO), "ssh timeout"),
        ] {
            let e = b.build().unwrap_err();
            assert!(
                matches!(&e, Error::InvalidInput { field: f, .. } if f == field),
                "{field}: {e}"
            );
        }
    }

    #[tokio::test]
    async fn release_tar_unpacks_and_verifies_with_system_tar() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        fs::create_dir_all(src.join("bin/sub")).unwrap();
        fs::write(src.join("VERSION"), "v1\n").unwrap();
        fs::write(src.join("bin/sub/data"), vec![7u8; 100_000]).unwrap();
        std::os::unix::fs::symlink("../VERSION", src.join("bin/version")).unwrap();
        for gzip in [false, true] {
            let mut buf = Vec::new();
            let sent = write_release_tar(
                &src,
                CountingWriter {
                    inner: &mut buf,
                    count: 0,
                },
                gzip,
            )
            .unwrap();
            assert_eq!(sent as usize, buf.len());
            let dest = tmp.path().join(format!("dest-{gzip}"));
            let tarball = tmp.path().join(format!("t-{gzip}"));
            fs::write(&tarball, &buf).unwrap();
            let out = script(UNPACK)
                .args([
                    dest.to_str().unwrap(),
                    if gzip { "gzip" } else { "plain" },
                    tarball.to_str().unwrap(),
                ])
                .run_local()
                .await
                .unwrap();
            assert!(out.success(), "{out:?}");
            assert_eq!(fs::read(dest.join("bin/sub/data")).unwrap(), vec![7u8; 100_000]);
            assert_eq!(
                fs::read_link(dest.join("bin/version")).unwrap().to_str(),
                Some("../VERSION")
            );
            let manifest = fs::read_to_string(dest.join(MANIFEST)).unwrap();
            assert_eq!(manifest.lines().count(), 2, "{manifest}");
            // A corrupted file fails the check.
            fs::write(dest.join("VERSION"), "v2\n").unwrap();
            let out = Command::new("sha256sum")
                .args(["-c", "--quiet", "--strict", MANIFEST])
                .cwd(dest.to_str().unwrap())
                .run_local()
                .await
                .unwrap();
            assert!(!out.success());
        }
    }
}
