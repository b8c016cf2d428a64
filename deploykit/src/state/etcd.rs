//! The deployment state in etcd, shared by every machine that deploys an
//! application: [`EtcdBackend`].
//!
//! Keys, under `<prefix>/<app>/`:
//!
//! ```text
//! lock                       the holder (JSON), attached to the holder's lease
//! last-holder                the holder, not leased: left behind when it dies
//! sequence                   the last journal's sequence number
//! journals/<seq>-<id>        a journal's header
//! records/<seq>-<id>/<n>     its records, n = 1, 2, … (the outcome is the last)
//! live                       the blue-green live record
//! control, control-ack       the last promote/abort request, and its answer
//! ```
//!
//! **The lock** is the key `lock`, created only when absent, attached to a
//! lease of `lock_ttl` (15 s by default) that a task of the holder keeps
//! alive every third of it, reconnecting on its own when a request fails.
//! Its **fencing token** is the key's create revision: etcd gives every
//! new holder a higher one. Every write for the holder — journal records,
//! the live record, control acknowledgements — is a transaction that
//! commits only while `lock` still has that create revision, so once the
//! lease expired (and the key went with it) or someone else took the lock,
//! the write is refused and the holder learns it has lost the lock.
//!
//! **Losing the lock** turns the [`Fence`] of the [`HeldLock`] on, which
//! fails every later write at once: the executor starts no further step and
//! restores nothing (the new holder owns the fleet). It is lost when etcd
//! refuses a write for the token, or when no keep-alive was confirmed for a
//! whole TTL (the process stalled, or etcd was out of reach — a lost quorum
//! included: etcd answers nothing without a leader).
//!
//! What fencing does **not** cover: a step already acting on an instance
//! when the lease expires (a stalled process that wakes in the middle of an
//! install finishes that call; the instances do not know about etcd). The
//! next step's journal record is refused, and that is where the run stops.
//! Its journal then ends before that step, so a resume from another machine
//! redoes it (every instance step is idempotent).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp};

use super::backend::{Fence, HeldLock, JournalWriter, LockGuard, StateBackend, StateLock};
use super::{
    ControlAck, ControlCommand, ControlRequest, Holder, JournalHeader, JournalOutcome, JournalRecord,
    JournalScan, JournalSummary, UnreadableJournal,
};
use crate::bluegreen_state::{LiveRecord, LiveStore};
use crate::error::{DriverError, Error, Result};
use crate::event::{Event, EventSink};
use crate::promotion::PromotionHandle;

/// Where etcd is and how deploykit uses it.
///
/// ```
/// use std::time::Duration;
/// use deploykit::state::{EtcdBackend, EtcdConfig};
///
/// let config = EtcdConfig::new(["http://127.0.0.1:2379"]).lock_ttl(Duration::from_secs(15));
/// let backend = EtcdBackend::new("shop", config).unwrap();
/// assert_eq!(backend.key("lock"), "/deploykit/shop/lock");
/// assert!(EtcdBackend::new("shop", EtcdConfig::new(Vec::<String>::new())).is_err());
/// ```
#[derive(Clone)]
pub struct EtcdConfig {
    endpoints: Vec<String>,
    prefix: String,
    lock_ttl: Duration,
    request_timeout: Duration,
    user: Option<(String, String)>,
    tls: Option<EtcdTls>,
}

/// TLS to the etcd members (`https://` endpoints): the CA that signed
/// their certificates and, for a cluster started with
/// `--client-cert-auth`, this client's certificate and key. The files are
/// read when the backend is made and again at each new connection, so
/// certificates renewed in place are picked up.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    ca_file: PathBuf,
    client: Option<(PathBuf, PathBuf)>,
}

impl EtcdTls {
    /// Trusts the CA certificates (PEM) in `ca_file`.
    pub fn new(ca_file: impl Into<PathBuf>) -> Self {
        Self {
            ca_file: ca_file.into(),
            client: None,
        }
    }

    /// Presents the certificate (PEM, with its chain) in `cert_file` and
    /// its private key (PEM) in `key_file`.
    pub fn client_cert(mut self, cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        self.client = Some((cert_file.into(), key_file.into()));
        self
    }

    /// Reads and checks the files.
    fn load(&self) -> Result<TlsFiles> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::PrivateKeyDer;
        let ca = read_pem("state.ca_file", &self.ca_file)?;
        certificates("state.ca_file", &self.ca_file, &ca)?;
        let identity = match &self.client {
            None => None,
            Some((cert_file, key_file)) => {
                let cert = read_pem("state.cert_file", cert_file)?;
                certificates("state.cert_file", cert_file, &cert)?;
                let key = read_pem("state.key_file", key_file)?;
                if let Err(e) = PrivateKeyDer::from_pem_slice(&key) {
                    return Err(Error::invalid(
                        "state.key_file",
                        format!(
                            "{} holds no PEM private key ({}); give the key of state.cert_file",
                            key_file.display(),
                            pem_problem(&e)
                        ),
                    ));
                }
                Some((cert, key))
            }
        };
        Ok(TlsFiles { ca, identity })
    }
}

/// The PEM text of the TLS files; never printed (the key is a secret).
#[derive(Clone)]
struct TlsFiles {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl TlsFiles {
    fn options(&self) -> etcd_client::TlsOptions {
        let mut tls =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(&self.ca));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(etcd_client::Identity::from_pem(cert, key));
        }
        tls
    }
}

/// The most a TLS file may hold: a bundle of CAs is tens of KiB.
const TLS_FILE_LIMIT: u64 = 1 << 20;

fn read_pem(field: &str, path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read as _;
    // Checked before opening: opening a FIFO for reading blocks.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(Error::invalid(
            field,
            format!(
                "{} is not a regular file; give the path of a PEM file",
                path.display()
            ),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| {
        Error::invalid(
            field,
            format!("cannot read {}: {e}; give the path of a PEM file", path.display()),
        )
    })?;
    let mut text = Vec::new();
    file.take(TLS_FILE_LIMIT + 1)
        .read_to_end(&mut text)
        .map_err(|e| Error::invalid(field, format!("cannot read {}: {e}", path.display())))?;
    if text.len() as u64 > TLS_FILE_LIMIT {
        return Err(Error::invalid(
            field,
            format!("{} is larger than 1 MiB; give a PEM file", path.display()),
        ));
    }
    Ok(text)
}

/// A PEM parse error in words: the parser's own text of a bad BEGIN or END
/// line is a byte list.
fn pem_problem(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error as E;
    match e {
        E::MissingSectionEnd { end_marker } => format!(
            "its {} block has no -----END line",
            String::from_utf8_lossy(end_marker).escape_default()
        ),
        E::IllegalSectionStart { .. } => "a -----BEGIN line is not well formed".into(),
        E::Base64Decode(_) => "a block's base64 does not decode".into(),
        E::NoItemsFound => "no block of that kind".into(),
        other => other.to_string(),
    }
}

/// At least one certificate, and every one well formed.
fn certificates(field: &str, path: &std::path::Path, pem: &[u8]) -> Result<()> {
    use rustls_pki_types::pem::PemObject as _;
    let mut n = 0;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
        if let Err(e) = c {
            return Err(Error::invalid(
                field,
                format!(
                    "{} is not a PEM certificate file ({})",
                    path.display(),
                    pem_problem(&e)
                ),
            ));
        }
        n += 1;
    }
    if n == 0 {
        return Err(Error::invalid(
            field,
            format!(
                "{} holds no certificate (no -----BEGIN CERTIFICATE----- block)",
                path.display()
            ),
        ));
    }
    Ok(())
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never shows.
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("lock_ttl", &self.lock_ttl)
            .field("request_timeout", &self.request_timeout)
            .field("user", &self.user.as_ref().map(|(u, _)| u))
            .field("tls", &self.tls)
            .finish()
    }
}

impl EtcdConfig {
    /// etcd at `endpoints` (`http://host:port`, or `https://host:port`
    /// with [`tls`](Self::tls); the members of one cluster), prefix
    /// `/deploykit`, lock TTL 15 s, attempts bounded by 5 s.
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: "/deploykit".into(),
            lock_ttl: Duration::from_secs(15),
            request_timeout: Duration::from_secs(5),
            user: None,
            tls: None,
        }
    }

    /// The key prefix (`/deploykit`): the application's keys are under
    /// `<prefix>/<app>/`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The lease of the lock (whole seconds, 2 s to 10 min): how long a
    /// dead or stalled holder keeps others out, and how long etcd may be
    /// out of reach before the holder stops.
    pub fn lock_ttl(mut self, ttl: Duration) -> Self {
        self.lock_ttl = ttl;
        self
    }

    /// How long one attempt of a request may take before it is retried on
    /// the next member (at least 100 ms); a read gives up when every member
    /// and one more attempt have had this long (4 × with 3 endpoints).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Authenticates as `user` with `password` (etcd's own users).
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.user = Some((user.into(), password.into()));
        self
    }

    /// Talks to the members over TLS: every endpoint is `https://`.
    pub fn tls(mut self, tls: EtcdTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Checks the settings without reading any file or contacting etcd.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field (`state.endpoints`,
    /// `state.ca_file`, `state.prefix`, `state.lock_ttl`,
    /// `state.request_timeout`) and the fix.
    pub fn validate(&self) -> Result<()> {
        self.check()
    }

    fn check(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return Err(Error::invalid(
                "state.endpoints",
                "no etcd endpoint given; list the cluster's members, e.g. [\"http://10.0.0.1:2379\"]",
            ));
        }
        let scheme = if self.tls.is_some() { "https://" } else { "http://" };
        for e in &self.endpoints {
            let Some(rest) = e.strip_prefix(scheme) else {
                let hint = match (e.starts_with("https://"), e.starts_with("http://")) {
                    (true, _) => {
                        "an https:// endpoint needs the CA that signed etcd's certificates: \
                                  add ca_file = \"/etc/etcd/ca.pem\" (and cert_file, key_file when etcd \
                                  asks clients for certificates)"
                    }
                    (_, true) => {
                        "state.ca_file is set, so every endpoint must be https://; \
                                  write it as https://host:port"
                    }
                    _ => "write it as http://host:port, or https://host:port with ca_file",
                };
                let field = if e.starts_with("https://") {
                    "state.ca_file"
                } else {
                    "state.endpoints"
                };
                return Err(Error::invalid(
                    field,
                    format!(
                        "`{}` is not an etcd endpoint this can reach: {hint}",
                        e.escape_default()
                    ),
                ));
            };
            let ok = rest.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b))
            });
            if !ok {
                return Err(Error::invalid(
                    "state.endpoints",
                    format!(
                        "`{}` is not an etcd endpoint: write it as {scheme}host:port",
                        e.escape_default()
                    ),
                ));
            }
        }
        let p = &self.prefix;
        let ok = p.starts_with('/')
            && !p.contains("//")
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
        if !ok {
            return Err(Error::invalid(
                "state.prefix",
                format!(
                    "`{}` is not a key prefix: start it with / and use only letters, digits, /, ., _ and -",
                    p.escape_default()
                ),
            ));
        }
        if !(Duration::from_secs(2)..=Duration::from_secs(600)).contains(&self.lock_ttl) {
            return Err(Error::invalid(
                "state.lock_ttl",
                format!(
                    "{} ms is out of range: give 2s to 10m (15s is the usual)",
                    self.lock_ttl.as_millis()
                ),
            ));
        }
        if self.request_timeout < Duration::from_millis(100) {
            return Err(Error::invalid(
                "state.request_timeout",
                "too short: give at least 100ms (5s is the usual)",
            ));
        }
        Ok(())
    }
}

/// The state of one application in etcd. Cheap to clone; connects on first
/// use, and again after any failed request.
#[derive(Debug, Clone)]
pub struct EtcdBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: EtcdConfig,
    /// `<prefix>/<app>/`.
    base: String,
    client: tokio::sync::Mutex<Option<Client>>,
    /// The endpoint the next connection goes to: each failure moves on to
    /// the next member, so a dead one is left at once.
    next: std::sync::atomic::AtomicUsize,
    /// The TLS files as last read well.
    tls: Mutex<Option<TlsFiles>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// How long to wait between two tries of a failed request.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The most operations one transaction carries (etcd refuses more than 128
/// by default).
const TXN_OPS: usize = 100;

/// Keys read per request: 1,000 journal records stay far below the
/// client's 4 MiB message limit.
const RANGE_PAGE: i64 = 1_000;

/// The end of the range of keys starting with `prefix` (what etcd's
/// `--prefix` reads): the prefix with its last byte below 0xff raised by one.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: to the end of the keyspace.
    vec![0]
}

/// Whether etcd answered gRPC `INVALID_ARGUMENT` (code 3): it refuses the
/// request as such (too large, too many operations), so the same request
/// would be refused forever.
fn refused_as_invalid(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() as i32 == 3)
}

fn store_error(context: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::StateStore {
        context: context.into(),
        source: Box::new(e),
    }
}

/// An etcd client error in words: the client's own text of a gRPC status
/// carries the debug form of its cause.
#[derive(Debug)]
struct EtcdFailure(String);

impl EtcdFailure {
    /// `e` in words; `tls` the TLS settings in use, which a failed
    /// handshake points at.
    fn new(e: &etcd_client::Error, tls: Option<&EtcdTls>) -> Self {
        let Self(text) = Self::words(e);
        let lower = text.to_ascii_lowercase();
        // A refused client certificate shows under TLS 1.3 as an alert, or
        // only as a connection closed under the first request.
        let handshake = [
            "certificate",
            "alert",
            "broken pipe",
            "handshake",
            "tls",
            "reset",
            "closed",
        ]
        .iter()
        .any(|w| lower.contains(w));
        match tls {
            Some(t) if handshake => {
                let client = if t.client.is_none() {
                    "; if etcd asks clients for a certificate (--client-cert-auth), set state.cert_file and \
                     state.key_file"
                } else {
                    ""
                };
                Self(format!(
                    "{text} (TLS: check state.ca_file, state.cert_file and state.key_file against the CA \
                     that signed etcd's certificates{client})"
                ))
            }
            _ => Self(text),
        }
    }

    fn words(e: &etcd_client::Error) -> Self {
        match e {
            etcd_client::Error::GRpcStatus(status) => {
                let mut text = status.code().description().to_string();
                if !status.message().is_empty() {
                    text = format!("{text}: {}", status.message());
                }
                Self(with_causes(text, std::error::Error::source(status)))
            }
            etcd_client::Error::TransportError(t) => {
                Self(with_causes(t.to_string(), std::error::Error::source(t)))
            }
            other => Self(other.to_string()),
        }
    }

    fn no_answer(within: Duration) -> Self {
        Self(format!(
            "no answer within {} (state.request_timeout)",
            crate::duration_text::format(within)
        ))
    }
}

/// `text` followed by each cause's own words that it does not already say.
fn with_causes(mut text: String, mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(c) = cause {
        let words = c.to_string();
        if !words.is_empty() && !text.contains(&words) {
            text = format!("{text}: {words}");
        }
        cause = c.source();
    }
    text
}

impl std::fmt::Display for EtcdFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EtcdFailure {}

impl EtcdBackend {
    /// The state of `app` in the etcd cluster `config` describes. Nothing
    /// is contacted yet.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field (`app`, `state.endpoints`,
    /// `state.prefix`, `state.lock_ttl`, `state.request_timeout`) and the
    /// fix.
    pub fn new(app: &str, config: EtcdConfig) -> Result<Self> {
        crate::names::validate_name("app", app)?;
        config.check()?;
        let tls = config.tls.as_ref().map(EtcdTls::load).transpose()?;
        let base = format!("{}/{app}/", config.prefix.trim_end_matches('/'));
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                base,
                client: tokio::sync::Mutex::new(None),
                next: std::sync::atomic::AtomicUsize::new(0),
                tls: Mutex::new(tls),
            }),
        })
    }

    /// The full key of `name` (`lock`, `live`, …).
    pub fn key(&self, name: &str) -> String {
        self.inner.key(name)
    }
}

impl Inner {
    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.base)
    }

    fn ttl(&self) -> Duration {
        self.config.lock_ttl
    }

    /// A client of one member (another one after [`reset`](Self::reset)).
    async fn client(&self) -> std::result::Result<Client, etcd_client::Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let mut options = ConnectOptions::new()
            .with_connect_timeout(self.config.request_timeout)
            .with_timeout(self.config.request_timeout)
            // Without a leader (a lost quorum) etcd answers at once with an
            // error rather than after the timeout.
            .with_require_leader(true);
        if let Some((u, p)) = &self.config.user {
            options = options.with_user(u.clone(), p.clone());
        }
        if let Some(tls) = self.tls_files() {
            options = options.with_tls(tls.options());
        }
        let n = self.next.load(std::sync::atomic::Ordering::Relaxed) % self.config.endpoints.len();
        let c = Client::connect([&self.config.endpoints[n]], Some(options)).await?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// The TLS files read again, or the last good ones when they cannot be
    /// read now (a renewal half written).
    fn tls_files(&self) -> Option<TlsFiles> {
        let tls = self.config.tls.as_ref()?;
        let mut last = self.tls.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match tls.load() {
            Ok(files) => *last = Some(files),
            Err(e) => {
                tracing::warn!(error = %e, "etcd: reading the TLS files again failed; using the last good ones")
            }
        }
        last.clone()
    }

    /// Drops the connection: the next request connects again, to the next
    /// member (the client library does not reconnect on its own).
    async fn reset(&self) {
        *self.client.lock().await = None;
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs `call` until it succeeds or `budget` has passed, reconnecting
    /// after each failure.
    async fn retry<T, F, Fut>(&self, what: &str, budget: Duration, mut call: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + budget;
        loop {
            let attempt = async {
                let c = self.client().await?;
                call(c).await
            };
            let err = match tokio::time::timeout(self.config.request_timeout, attempt).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => store_error(
                    format!("{what} (etcd at {})", self.endpoints()),
                    EtcdFailure::new(&e, self.config.tls.as_ref()),
                ),
                Err(_) => store_error(
                    format!("{what} (etcd at {})", self.endpoints()),
                    EtcdFailure::no_answer(self.config.request_timeout),
                ),
            };
            self.reset().await;
            if Instant::now() + RETRY_PAUSE >= deadline {
                return Err(err);
            }
            tracing::debug!(error = %err, "etcd request failed; retrying");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// How long a request outside a run's fenced writes is retried: long
    /// enough for one attempt on every member and one more, so a member
    /// that hangs (restarting, or in an election) costs one attempt, not
    /// the request.
    fn call_budget(&self) -> Duration {
        let attempts = u32::try_from(self.config.endpoints.len()).unwrap_or(u32::MAX);
        self.config
            .request_timeout
            .saturating_mul(attempts.saturating_add(1))
    }

    fn endpoints(&self) -> String {
        self.config.endpoints.join(", ")
    }

    /// Reads every key under `name` (a prefix), sorted by key.
    async fn range(&self, name: &str, keys_only: bool) -> Result<Vec<(String, Vec<u8>)>> {
        let key = self.key(name);
        let end = prefix_end(key.as_bytes());
        let mut out: Vec<(String, Vec<u8>)> = Vec::new();
        let mut from = key.clone().into_bytes();
        // In pages: one answer for a whole large journal (tens of thousands
        // of records) would pass the client's 4 MiB message limit.
        loop {
            let resp = self
                .retry(&format!("reading {key}"), self.call_budget(), |mut c| {
                    let (from, end) = (from.clone(), end.clone());
                    async move {
                        let mut o = GetOptions::new().with_range(end).with_limit(RANGE_PAGE);
                        if keys_only {
                            o = o.with_keys_only();
                        }
                        c.get(from, Some(o)).await
                    }
                })
                .await?;
            out.extend(resp.kvs().iter().map(|kv| {
                (
                    String::from_utf8_lossy(kv.key()).into_owned(),
                    kv.value().to_vec(),
                )
            }));
            match resp.kvs().iter().map(|kv| kv.key()).max() {
                Some(last) if resp.more() => {
                    from = last.to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Reads one key: its value and mod revision.
    async fn get(&self, name: &str) -> Result<Option<(Vec<u8>, i64)>> {
        let key = self.key(name);
        let resp = self
            .retry(&format!("reading {key}"), self.call_budget(), |mut c| {
                let key = key.clone();
                async move { c.get(key, None).await }
            })
            .await?;
        Ok(resp
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Commits `ops` (in transactions of at most [`TXN_OPS`]) only while
    /// `fence` holds the lock; retries a failed request until it commits
    /// or the lock is lost, except one etcd refuses as invalid (too large),
    /// which fails at once.
    async fn fenced(&self, fence: &Fence, what: &str, ops: Vec<TxnOp>) -> Result<()> {
        let lock = self.key("lock");
        for chunk in ops.chunks(TXN_OPS) {
            loop {
                fence.check()?;
                let txn = Txn::new()
                    .when([Compare::create_revision(
                        lock.clone(),
                        CompareOp::Equal,
                        fence.token(),
                    )])
                    .and_then(chunk.to_vec());
                let attempt = async {
                    let mut c = self.client().await?;
                    c.txn(txn).await
                };
                match tokio::time::timeout(self.config.request_timeout, attempt).await {
                    Ok(Ok(r)) if r.succeeded() => break,
                    Ok(Ok(_)) => {
                        let why = format!(
                            "etcd refused {what}: the lock key {lock} is no longer the one this process created \
                             (revision {}); its lease expired or another process holds the lock now",
                            fence.token()
                        );
                        fence.declare_lost(why);
                        return fence.check();
                    }
                    Ok(Err(e)) if refused_as_invalid(&e) => {
                        return Err(store_error(
                            format!(
                                "{what}: etcd refuses the request itself (larger than its --max-request-bytes, \
                                 1.5 MiB by default, or more operations than its --max-txn-ops), so it is not retried"
                            ),
                            EtcdFailure::new(&e, self.config.tls.as_ref()),
                        ));
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %EtcdFailure::new(&e, self.config.tls.as_ref()), "etcd: {what} failed; retrying until it commits or the lock is lost");
                    }
                    Err(_) => {
                        tracing::warn!(
                            "etcd: {what} timed out; retrying until it commits or the lock is lost"
                        );
                    }
                }
                self.reset().await;
                tokio::time::sleep(RETRY_PAUSE).await;
            }
        }
        Ok(())
    }

    /// Keeps the lease alive every third of the TTL until the task is
    /// aborted, trying again at once (on the next member) when a renewal
    /// fails; declares the fence lost when the lease is gone, or when no
    /// renewal was confirmed for a whole TTL.
    async fn keep_alive(self: Arc<Self>, lease: i64, fence: Fence) {
        let ttl = self.ttl();
        let period = ttl / 3;
        // Monotonic: a process stopped with SIGSTOP finds the time passed.
        let mut confirmed = Instant::now();
        loop {
            tokio::time::sleep(period).await;
            loop {
                let left = ttl.saturating_sub(confirmed.elapsed());
                if left.is_zero() {
                    fence.declare_lost(format!(
                        "no keep-alive of its lease was confirmed for {} s (the process stalled, or etcd was out of reach)",
                        ttl.as_secs()
                    ));
                    return;
                }
                let sent = Instant::now();
                let attempt = async {
                    let mut c = self.client().await?;
                    c.lease_keep_alive(lease).await
                };
                match tokio::time::timeout(period.min(left), attempt).await {
                    Ok(Ok(_)) => {
                        confirmed = sent;
                        break;
                    }
                    Ok(Err(e)) if lease_gone(&e) => {
                        fence.declare_lost(format!(
                            "etcd no longer knows its lease ({}): it expired",
                            EtcdFailure::new(&e, self.config.tls.as_ref())
                        ));
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %EtcdFailure::new(&e, self.config.tls.as_ref()), "etcd: renewing the lock's lease failed; trying the next member");
                    }
                    Err(_) => {
                        tracing::warn!("etcd: renewing the lock's lease timed out; trying the next member");
                    }
                }
                self.reset().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn summary(
        &self,
        name: &str,
        header: JournalHeader,
        records: Vec<(String, Vec<u8>)>,
    ) -> Result<JournalSummary> {
        let mut events = Vec::new();
        let mut finished = None;
        for (key, value) in records {
            match serde_json::from_slice::<JournalRecord>(&value) {
                Ok(JournalRecord::Event(e)) => events.push(e),
                Ok(JournalRecord::Finished(o)) => finished = Some(o),
                Ok(JournalRecord::Header(_)) => {}
                Err(e) => {
                    return Err(Error::Inconsistent(format!(
                        "the journal record {key} is not valid JSON ({e}); remove that key if the run is over"
                    )))
                }
            }
        }
        Ok(JournalSummary {
            path: PathBuf::from(self.key(&format!("journals/{name}"))),
            header,
            events,
            finished,
        })
    }

    /// Every journal header, oldest first: (name, header or why not).
    async fn headers(&self) -> Result<Vec<(String, std::result::Result<JournalHeader, Error>)>> {
        let dir = self.key("journals/");
        Ok(self
            .range("journals/", false)
            .await?
            .into_iter()
            .map(|(key, value)| {
                let name = key.strip_prefix(&dir).unwrap_or(&key).to_string();
                let header = match serde_json::from_slice::<JournalRecord>(&value) {
                    Ok(JournalRecord::Header(h)) => Ok(h),
                    _ => Err(Error::Inconsistent(format!(
                        "the journal header {key} is not readable; remove it and the keys under {} if that run is over",
                        self.key(&format!("records/{name}/"))
                    ))),
                };
                (name, header)
            })
            .collect())
    }

    async fn read(&self, name: &str, header: JournalHeader) -> Result<JournalSummary> {
        let records = self.range(&format!("records/{name}/"), false).await?;
        self.summary(name, header, records)
    }
}

/// Whether `e` says the lease does not exist (any more).
fn lease_gone(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("not found"),
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        _ => false,
    }
}

/// The etcd half of a [`HeldLock`].
#[derive(Debug)]
struct EtcdGuard {
    inner: Arc<Inner>,
    lease: i64,
    fence: Fence,
    keep_alive: tokio::task::JoinHandle<()>,
}

impl Drop for EtcdGuard {
    fn drop(&mut self) {
        // Without a release the lease expires within the TTL.
        self.keep_alive.abort();
    }
}

#[async_trait]
impl LockGuard for EtcdGuard {
    async fn release(self: Box<Self>) {
        self.keep_alive.abort();
        // A clean release removes the record a dead holder would leave.
        let ops = vec![
            TxnOp::delete(self.inner.key("lock"), None),
            TxnOp::delete(self.inner.key("last-holder"), None),
        ];
        let released = tokio::time::timeout(
            self.inner.config.request_timeout,
            self.inner.fenced(&self.fence, "releasing the lock", ops),
        )
        .await;
        if !matches!(released, Ok(Ok(()))) {
            tracing::warn!("etcd: could not release the lock; it expires with its lease");
        }
        let lease = self.lease;
        let _ = self
            .inner
            .retry(
                "revoking the lock's lease",
                self.inner.config.request_timeout,
                |mut c| async move { c.lease_revoke(lease).await },
            )
            .await;
    }
}

fn unknown_holder(value: &[u8]) -> Holder {
    serde_json::from_slice(value).unwrap_or(Holder {
        pid: 0,
        pid_start: None,
        host: "unknown".into(),
        started_at_ms: 0,
        purpose: "the lock key holds no readable holder record".into(),
    })
}

#[async_trait]
impl StateBackend for EtcdBackend {
    fn describe(&self) -> String {
        format!("etcd at {} under {}", self.inner.endpoints(), self.inner.base)
    }

    fn identity(&self) -> PathBuf {
        PathBuf::from(format!("etcd:{}", self.inner.base.trim_end_matches('/')))
    }

    async fn is_unused(&self) -> Result<bool> {
        Ok(self.inner.range("journals/", true).await?.is_empty())
    }

    async fn try_lock(&self, purpose: &str) -> Result<StateLock> {
        let inner = &self.inner;
        let lock_key = inner.key("lock");
        let last_key = inner.key("last-holder");
        let stale = inner
            .get("last-holder")
            .await?
            .and_then(|(v, _)| serde_json::from_slice::<Holder>(&v).ok());
        let ttl = i64::try_from(inner.ttl().as_secs()).unwrap_or(i64::MAX);
        let lease = inner
            .retry(
                "granting the lock's lease",
                inner.call_budget(),
                |mut c| async move { c.lease_grant(ttl, None).await },
            )
            .await?
            .id();
        let holder = Holder::me(purpose);
        let record = serde_json::to_vec(&holder).expect("a holder serializes");
        let txn = Txn::new()
            .when([Compare::create_revision(lock_key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    lock_key.clone(),
                    record.clone(),
                    Some(PutOptions::new().with_lease(lease)),
                ),
                TxnOp::put(last_key, record, None),
            ])
            .or_else([TxnOp::get(lock_key.clone(), None)]);
        let resp = inner
            .retry("taking the lock", inner.call_budget(), |mut c| {
                let txn = txn.clone();
                async move { c.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            let held = resp
                .op_responses()
                .into_iter()
                .find_map(|r| match r {
                    etcd_client::TxnOpResponse::Get(g) => {
                        g.kvs().first().map(|kv| unknown_holder(kv.value()))
                    }
                    _ => None,
                })
                // Released between the compare and the read: try again later.
                .unwrap_or_else(|| unknown_holder(b""));
            let _ = inner
                .retry(
                    "revoking an unused lease",
                    inner.config.request_timeout,
                    |mut c| async move { c.lease_revoke(lease).await },
                )
                .await;
            return Ok(StateLock::Held(held));
        }
        // Every key a transaction writes gets its revision: the lock key's
        // create revision, which no later holder's can equal.
        let token = resp.header().map(|h| h.revision()).unwrap_or_default();
        let fence = Fence::new(token);
        let keep_alive = tokio::spawn(inner.clone().keep_alive(lease, fence.clone()));
        if let Some(s) = &stale {
            tracing::info!(holder = %s, "took over the deployment lock of a holder that died without releasing it");
        }
        Ok(StateLock::Acquired(HeldLock::new(
            holder,
            stale,
            fence.clone(),
            Box::new(EtcdGuard {
                inner: inner.clone(),
                lease,
                fence,
                keep_alive,
            }),
        )))
    }

    async fn holder(&self) -> Result<Option<Holder>> {
        Ok(self.inner.get("lock").await?.map(|(v, _)| unknown_holder(&v)))
    }

    async fn create_journal(
        &self,
        lock: &HeldLock,
        mut header: JournalHeader,
    ) -> Result<Arc<dyn JournalWriter>> {
        crate::names::validate_name("deployment", &header.deployment)?;
        let inner = &self.inner;
        let mut last = match inner.get("sequence").await? {
            Some((v, _)) => String::from_utf8_lossy(&v).trim().parse::<u64>().map_err(|_| {
                Error::Inconsistent(format!(
                    "{} does not hold a number; put the highest sequence of the journals under {} into it",
                    inner.key("sequence"),
                    inner.key("journals/")
                ))
            })?,
            None => 0,
        };
        for (name, h) in inner.headers().await? {
            if let Ok(h) = h {
                if h.deployment == header.deployment {
                    return Err(Error::invalid(
                        "deployment",
                        format!(
                            "a journal {} exists already; use another deployment id",
                            inner.key(&format!("journals/{name}"))
                        ),
                    ));
                }
                last = last.max(h.sequence.unwrap_or(0));
            }
        }
        let sequence = last + 1;
        header.sequence = Some(sequence);
        let name = format!("{sequence:010}-{}", header.deployment);
        let bytes = serde_json::to_vec(&JournalRecord::Header(header.clone()))
            .map_err(|e| store_error("serializing the journal header", e))?;
        let what = format!(
            "starting the journal {} (its header, which holds the plan, is {} KiB)",
            inner.key(&format!("journals/{name}")),
            bytes.len().div_ceil(1024)
        );
        inner
            .fenced(
                lock.fence(),
                &what,
                vec![
                    TxnOp::put(inner.key("sequence"), sequence.to_string(), None),
                    TxnOp::put(inner.key(&format!("journals/{name}")), bytes, None),
                ],
            )
            .await?;
        Ok(Arc::new(EtcdJournal {
            inner: inner.clone(),
            name,
            header,
            fence: lock.fence().clone(),
            queue: Mutex::new(Queue {
                appended: 1,
                durable: 1,
                stats: super::journal::FlushStats {
                    records_per_flush: vec![1],
                },
                ..Queue::default()
            }),
            flush: tokio::sync::Mutex::new(()),
        }))
    }

    async fn scan_journals(&self) -> Result<JournalScan> {
        let mut journals = Vec::new();
        let mut unreadable = Vec::new();
        for (name, header) in self.inner.headers().await? {
            let path = PathBuf::from(self.inner.key(&format!("journals/{name}")));
            match header {
                Ok(h) => match self.inner.read(&name, h).await {
                    Ok(j) => journals.push(j),
                    Err(error) => unreadable.push(UnreadableJournal { path, error }),
                },
                Err(error) => unreadable.push(UnreadableJournal { path, error }),
            }
        }
        journals.sort_by_key(|j| j.header.sequence);
        Ok(JournalScan { journals, unreadable })
    }

    async fn latest(&self) -> Result<Option<JournalSummary>> {
        let newest = self
            .inner
            .headers()
            .await?
            .into_iter()
            .filter_map(|(name, h)| Some((name, h.ok()?)))
            .max_by_key(|(_, h)| h.sequence);
        match newest {
            Some((name, h)) => Ok(Some(self.inner.read(&name, h).await?)),
            None => Ok(None),
        }
    }

    async fn chain(&self, deployment: &str) -> Result<Vec<JournalSummary>> {
        let mut out = Vec::new();
        for (name, h) in self.inner.headers().await? {
            let h = h?;
            if h.deployment == deployment || h.acts_on.as_deref() == Some(deployment) {
                out.push(self.inner.read(&name, h).await?);
            }
        }
        out.sort_by_key(|j| j.header.sequence);
        Ok(out)
    }

    fn live_store(&self, lock: Option<&HeldLock>) -> Arc<dyn LiveStore> {
        Arc::new(EtcdLiveStore {
            inner: self.inner.clone(),
            fence: lock.map(|l| l.fence().clone()),
        })
    }

    async fn send_control(&self, deployment: &str, command: ControlCommand) -> Result<u64> {
        let inner = &self.inner;
        let key = inner.key("control");
        loop {
            let last = inner.get("control").await?;
            let seq = last
                .as_ref()
                .and_then(|(v, _)| serde_json::from_slice::<ControlRequest>(v).ok())
                .map_or(0, |r| r.seq)
                + 1;
            let at = last.as_ref().map_or(0, |(_, rev)| *rev);
            let req = ControlRequest {
                seq,
                deployment: deployment.to_string(),
                command,
                stage: None,
            };
            let bytes = serde_json::to_vec(&req).expect("a request serializes");
            // Compare-and-swap: two senders never get the same number.
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, at)])
                .and_then([TxnOp::put(key.clone(), bytes, None)]);
            let resp = inner
                .retry("sending the control request", inner.call_budget(), |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if resp.succeeded() {
                return Ok(seq);
            }
        }
    }

    async fn wait_ack(&self, seq: u64, timeout: Duration) -> Option<ControlAck> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(Some((v, _))) = self.inner.get("control-ack").await {
                if let Ok(ack) = serde_json::from_slice::<ControlAck>(&v) {
                    if ack.seq == seq {
                        return Some(ack);
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn record_promotion(&self, lock: &HeldLock, deployment: &str, stage: usize) -> Result<u64> {
        let inner = &self.inner;
        // Under the lock no other writer numbers a request of this kind; a
        // `promote` racing without it at worst takes the same number, which
        // no watch is waiting for.
        let seq = inner
            .get("control")
            .await?
            .and_then(|(v, _)| serde_json::from_slice::<ControlRequest>(&v).ok())
            .map_or(0, |r| r.seq)
            + 1;
        let req = ControlRequest {
            seq,
            deployment: deployment.to_string(),
            command: ControlCommand::Promote,
            stage: Some(stage),
        };
        let bytes = serde_json::to_vec(&req).expect("a request serializes");
        let op = vec![TxnOp::put(inner.key("control"), bytes, None)];
        inner.fenced(lock.fence(), "recording the promotion", op).await?;
        Ok(seq)
    }

    async fn recorded_promotion(&self, deployment: &str) -> Result<Option<usize>> {
        Ok(self
            .inner
            .get("control")
            .await?
            .and_then(|(v, _)| serde_json::from_slice::<ControlRequest>(&v).ok())
            .and_then(|r| r.recorded_promotion(deployment)))
    }

    fn watch_control(
        &self,
        lock: &HeldLock,
        deployment: String,
        handle: PromotionHandle,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let inner = self.inner.clone();
        let fence = lock.fence().clone();
        tokio::spawn(async move {
            let read = |v: Option<(Vec<u8>, i64)>| {
                v.and_then(|(v, _)| serde_json::from_slice::<ControlRequest>(&v).ok())
            };
            // Requests written before the watch began are not replayed.
            let mut seen = read(inner.get("control").await.ok().flatten()).map_or(0, |r| r.seq);
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Ok(last) = inner.get("control").await else {
                    continue;
                };
                let Some(req) = read(last) else { continue };
                if req.seq <= seen {
                    continue;
                }
                seen = req.seq;
                if req.deployment != deployment {
                    continue;
                }
                let result = match req.command {
                    ControlCommand::Promote if handle.promote() => "promoted",
                    ControlCommand::Promote => "not_waiting",
                    ControlCommand::Abort => {
                        handle.abort();
                        "aborted"
                    }
                };
                let ack = ControlAck {
                    seq: req.seq,
                    result: result.into(),
                };
                let bytes = serde_json::to_vec(&ack).expect("an ack serializes");
                let op = vec![TxnOp::put(inner.key("control-ack"), bytes, None)];
                if let Err(e) = inner.fenced(&fence, "acknowledging a control request", op).await {
                    tracing::warn!(error = %e, "cannot write the control acknowledgement");
                }
            }
        })
    }
}

/// The blue-green live record in etcd, written through the holder's fence.
#[derive(Debug)]
struct EtcdLiveStore {
    inner: Arc<Inner>,
    fence: Option<Fence>,
}

#[async_trait]
impl LiveStore for EtcdLiveStore {
    fn describe(&self) -> String {
        format!("etcd key {}", self.inner.key("live"))
    }

    async fn load(&self) -> std::result::Result<Option<LiveRecord>, DriverError> {
        let Some((bytes, _)) = self
            .inner
            .get("live")
            .await
            .map_err(|e| DriverError::new("cannot read the live record from etcd").with_source(e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            DriverError::new(format!(
                "the etcd key {} is not a valid live record (expected e.g. {{\"live\":\"blue\"}}); \
                 fix it, or delete it and let deploykit reconcile with the load balancer",
                self.inner.key("live")
            ))
            .with_source(e)
        })
    }

    async fn save(&self, record: &LiveRecord) -> std::result::Result<(), DriverError> {
        let Some(fence) = &self.fence else {
            return Err(DriverError::new(
                "the live record is written only by the holder of the deployment lock",
            ));
        };
        let bytes = serde_json::to_vec(record).expect("a live record serializes");
        let op = vec![TxnOp::put(self.inner.key("live"), bytes, None)];
        self.inner
            .fenced(fence, "writing the live record", op)
            .await
            .map_err(|e| DriverError::new("cannot write the live record to etcd").with_source(e))
    }
}

/// A journal in etcd: records queue in [`emit`](EventSink::emit), and
/// [`durable`](EventSink::durable) commits everything queued in fenced
/// transactions (of at most 100 records each), so the records of steps
/// starting together share a round trip (group commit).
#[derive(Debug)]
struct EtcdJournal {
    inner: Arc<Inner>,
    name: String,
    header: JournalHeader,
    fence: Fence,
    queue: Mutex<Queue>,
    /// One commit at a time, in record order.
    flush: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct Queue {
    /// Serialized records not committed yet, numbered from `durable`.
    pending: Vec<Vec<u8>>,
    /// Records queued so far (the header counts).
    appended: u64,
    /// Records committed.
    durable: u64,
    write_errors: u64,
    /// The first failure; every later wait fails with it.
    failed: Option<Failure>,
    /// Records committed by each transaction, the header's first.
    stats: super::journal::FlushStats,
}

#[derive(Debug, Clone)]
enum Failure {
    Lost(String),
    Store(String),
}

impl EtcdJournal {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue_record(&self, record: &JournalRecord) {
        let bytes = serde_json::to_vec(record);
        let mut q = self.lock();
        q.appended += 1;
        match bytes {
            Ok(b) if q.failed.is_none() => q.pending.push(b),
            _ => q.write_errors += 1,
        }
    }

    fn failure(&self, f: &Failure) -> Error {
        match f {
            Failure::Lost(why) => Error::LockLost(why.clone()),
            Failure::Store(why) => Error::StateStore {
                context: format!("writing the journal {}", self.location()),
                source: why.clone().into(),
            },
        }
    }

    async fn commit(&self) -> Result<()> {
        let target = self.lock().appended;
        let _one = self.flush.lock().await;
        let (first, batch) = {
            let mut q = self.lock();
            if let Some(f) = &q.failed {
                return Err(self.failure(f));
            }
            if q.durable >= target {
                return Ok(());
            }
            (q.durable, std::mem::take(&mut q.pending))
        };
        let n = batch.len() as u64;
        let ops = batch
            .into_iter()
            .enumerate()
            .map(|(i, b)| {
                let key = self
                    .inner
                    .key(&format!("records/{}/{:010}", self.name, first + i as u64));
                TxnOp::put(key, b, None)
            })
            .collect();
        let written = self
            .inner
            .fenced(&self.fence, "appending to the journal", ops)
            .await;
        let mut q = self.lock();
        match written {
            Ok(()) => {
                q.durable = first + n;
                // `fenced` commits the records in transactions of at most
                // TXN_OPS, in order.
                let mut left = n;
                while left > 0 {
                    let one = left.min(TXN_OPS as u64);
                    q.stats.records_per_flush.push(one as u32);
                    left -= one;
                }
                Ok(())
            }
            Err(e) => {
                q.write_errors += n + q.pending.len() as u64;
                q.pending.clear();
                let f = match &e {
                    Error::LockLost(why) => Failure::Lost(why.clone()),
                    other => Failure::Store(other.to_string()),
                };
                q.failed.get_or_insert(f);
                Err(e)
            }
        }
    }
}

#[async_trait]
impl EventSink for EtcdJournal {
    fn emit(&self, event: &Event) {
        self.queue_record(&JournalRecord::Event(event.clone()));
    }

    async fn durable(&self) -> Result<()> {
        self.commit().await
    }
}

#[async_trait]
impl JournalWriter for EtcdJournal {
    fn header(&self) -> &JournalHeader {
        &self.header
    }

    fn location(&self) -> String {
        self.inner.key(&format!("journals/{}", self.name))
    }

    fn records(&self) -> u64 {
        self.lock().appended
    }

    fn write_errors(&self) -> u64 {
        self.lock().write_errors
    }

    async fn sync(&self) -> Result<()> {
        self.commit().await
    }

    async fn finish(&self, outcome: JournalOutcome) -> Result<()> {
        self.queue_record(&JournalRecord::Finished(outcome));
        let committed = self.commit().await;
        let (records, stats) = {
            let q = self.lock();
            (q.appended, q.stats.clone())
        };
        // The same line as the local journal's, so one benchmark reads both.
        tracing::info!(
            journal = %self.location(),
            records,
            flushes = stats.flushes(),
            median_records_per_flush = stats.median(),
            max_records_per_flush = stats.max(),
            "journal written"
        );
        committed
    }

    async fn discard_unstarted(&self) -> Result<bool> {
        if self.records() > 1 || self.write_errors() > 0 {
            return Ok(false);
        }
        let op = vec![TxnOp::delete(self.location(), None)];
        self.inner
            .fenced(&self.fence, "removing a journal that never started", op)
            .await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_after_its_last_key() {
        assert_eq!(
            prefix_end(b"/dk/shop/records/1/"),
            b"/dk/shop/records/10".to_vec()
        );
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn bad_settings_are_refused_naming_the_field() {
        let cases: [(EtcdConfig, &str); 6] = [
            (EtcdConfig::new(Vec::<String>::new()), "state.endpoints"),
            (EtcdConfig::new(["127.0.0.1:2379"]), "state.endpoints"),
            (EtcdConfig::new(["https://127.0.0.1:2379"]), "state.ca_file"),
            (EtcdConfig::new(["http://a b:1"]), "state.endpoints"),
            (
                EtcdConfig::new(["http://127.0.0.1:2379"]).prefix("dk"),
                "state.prefix",
            ),
            (
                EtcdConfig::new(["http://127.0.0.1:2379"]).lock_ttl(Duration::from_millis(500)),
                "state.lock_ttl",
            ),
        ];
        for (config, field) in cases {
            let e = EtcdBackend::new("shop", config).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let ok = EtcdBackend::new(
            "shop",
            EtcdConfig::new(["http://[::1]:2379", "http://etcd-1:2379"]),
        )
        .unwrap();
        assert_eq!(ok.identity(), PathBuf::from("etcd:/deploykit/shop"));
        assert!(EtcdBackend::new("../x", EtcdConfig::new(["http://127.0.0.1:2379"])).is_err());
    }

    #[test]
    fn tls_files_are_read_and_checked_before_anything_is_contacted() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        // A well-formed PEM block; its DER is not looked into here.
        let cert = file(
            "cert.pem",
            "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n",
        );
        let key = file(
            "key.pem",
            "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n",
        );
        let not_pem = file("notes.txt", "hello\n");
        let cut = file("cut.pem", "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n");
        let missing = dir.path().join("missing.pem");
        let a_dir = dir.path().to_path_buf();
        let https = || EtcdConfig::new(["https://127.0.0.1:2379"]);
        let cases = [
            (
                EtcdConfig::new(["http://127.0.0.1:2379"]).tls(EtcdTls::new(&cert)),
                &["state.endpoints", "https://"][..],
            ),
            (
                https().tls(EtcdTls::new(&missing)),
                &["state.ca_file", "missing.pem"][..],
            ),
            (
                https().tls(EtcdTls::new(&a_dir)),
                &["state.ca_file", "not a regular file"][..],
            ),
            (
                https().tls(EtcdTls::new(&not_pem)),
                &["state.ca_file", "no certificate"][..],
            ),
            (
                https().tls(EtcdTls::new(&cut)),
                &[
                    "state.ca_file",
                    "cut.pem",
                    "its CERTIFICATE block has no -----END line",
                ][..],
            ),
            (
                https().tls(EtcdTls::new(&cert).client_cert(&not_pem, &key)),
                &["state.cert_file", "no certificate"][..],
            ),
            (
                https().tls(EtcdTls::new(&cert).client_cert(&cert, &cert)),
                &["state.key_file", "no PEM private key"][..],
            ),
        ];
        for (config, parts) in cases {
            let e = EtcdBackend::new("shop", config).unwrap_err().to_string();
            for p in parts {
                assert!(e.contains(p), "{p}: {e}");
            }
        }
        let ok = EtcdBackend::new("shop", https().tls(EtcdTls::new(&cert).client_cert(&cert, &key))).unwrap();
        // The key's text shows nowhere, not even in debug output.
        assert!(!format!("{ok:?}").contains("MAMCAQA"));
    }

    #[test]
    fn the_password_is_never_shown() {
        let c = EtcdConfig::new(["http://127.0.0.1:2379"]).user("deployer", "hunter2");
        let b = EtcdBackend::new("shop", c.clone()).unwrap();
        for text in [format!("{c:?}"), format!("{b:?}"), b.describe()] {
            assert!(!text.contains("hunter2"), "{text}");
        }
    }
}
