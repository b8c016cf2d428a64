//! The HAProxy driver: the runtime API over the admin stats socket.
//!
//! HAProxy must expose an admin socket, e.g. in `global`:
//!
//! ```text
//! stats socket /run/haproxy/admin.sock mode 600 level admin
//! ```
//!
//! and its backend must use a dynamic balance algorithm (`roundrobin`,
//! `leastconn`, …) for weights other than 0 % and 100 %. Server names are
//! the instance ids.
//!
//! Every change is computed as the desired `state` and `weight` of each
//! server, sent as `set server <backend>/<server> state drain|maint|ready`
//! and `set server <backend>/<server> weight N` (0–256) — all commands of one
//! change on one line, separated by `;`, so HAProxy applies them together —
//! and then **read back** with `show servers state <backend>`: a change that
//! did not take is an error naming the server.
//!
//! # Drain confirmation
//!
//! [`LoadBalancer::active_connections`] reads `show stat` (CSV, parsed by
//! its header names) and returns the server's `scur + qcur`: sessions open to
//! it plus requests queued for it. A drain is confirmed when both are 0.
//! Limits: `scur` counts sessions of *this* HAProxy process (a reload that
//! leaves an old process running keeps its sessions out of view), and idle
//! pooled server connections are not sessions.
//!
//! Names sent to the socket are checked (no whitespace, `;`, newline or
//! other control character) on top of the [name rules](crate::names).

mod routing;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::timeout;

use super::roster::{self, run_to_completion, Admin, Roster, RosterRules};
use crate::error::{DriverError, Error, Result};
use crate::names::{validate_name, Group, InstanceId};
use crate::routing::{check_groups, Capabilities, Capability, TrafficPolicy};
use crate::traits::{Backend, GroupWeight, LoadBalancer};

pub use routing::{config_line, sticky_config, sticky_map_file};

/// HAProxy's largest server weight.
pub const MAX_WEIGHT: u16 = 256;

/// Any maintenance bit: forced, inherited, configured, resolution, hostname.
const ADMF_MAINT_ANY: u32 = 0x01 | 0x02 | 0x04 | 0x20 | 0x40;
/// Any drain bit: forced, inherited.
const ADMF_DRAIN_ANY: u32 = 0x08 | 0x10;

/// Checks that `value` can be sent to the runtime API as one word.
fn socket_word(field: &str, value: &str) -> Result<(), DriverError> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == ';')
    {
        return Err(DriverError::new(format!(
            "{field} {value:?} cannot be sent to the HAProxy runtime API: it must be non-empty, \
             without whitespace, ';' or control characters"
        )));
    }
    Ok(())
}

/// The administrative state a server is set to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAdmin {
    /// `ready`: takes traffic (subject to its weight and health).
    Ready,
    /// `drain`: no new connections; existing ones finish.
    Drain,
    /// `maint`: out of rotation.
    Maint,
}

impl ServerAdmin {
    fn word(self) -> &'static str {
        match self {
            ServerAdmin::Ready => "ready",
            ServerAdmin::Drain => "drain",
            ServerAdmin::Maint => "maint",
        }
    }

    fn from_bits(bits: u32) -> Self {
        if bits & ADMF_MAINT_ANY != 0 {
            ServerAdmin::Maint
        } else if bits & ADMF_DRAIN_ANY != 0 {
            ServerAdmin::Drain
        } else {
            ServerAdmin::Ready
        }
    }
}

/// One server as `show servers state` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerState {
    /// `srv_name`.
    pub name: String,
    /// `srv_op_state`: 0 stopped, 1 starting, 2 running, 3 stopping.
    pub op_state: u32,
    /// `srv_admin_state` bit field (0x01 forced maint, 0x08 forced drain, …).
    pub admin_bits: u32,
    /// `srv_uweight`: the weight set by the operator.
    pub weight: u32,
    /// `srv_addr`: the address HAProxy sends this server's traffic to
    /// (`None` when the answer has no such column).
    pub address: Option<String>,
    /// `srv_port` (HAProxy 1.8 and later; 0 when the server has no port
    /// of its own; `None` when the answer has no such column).
    pub port: Option<u16>,
}

impl ServerState {
    /// The administrative state the bits amount to.
    pub fn admin(&self) -> ServerAdmin {
        ServerAdmin::from_bits(self.admin_bits)
    }

    /// Whether HAProxy sends this server's traffic to `addr` (a column the
    /// answer lacks is not held against it).
    pub(crate) fn is_at(&self, addr: std::net::SocketAddr) -> bool {
        self.address
            .as_deref()
            .and_then(|a| a.parse::<std::net::IpAddr>().ok())
            .is_none_or(|a| a.to_canonical() == addr.ip().to_canonical())
            && self.port.is_none_or(|p| p == addr.port())
    }
}

/// A small client of HAProxy's runtime API: one command line per
/// connection to the admin unix socket.
#[derive(Debug, Clone)]
pub struct RuntimeApi {
    socket: PathBuf,
    timeout: Duration,
}

impl RuntimeApi {
    /// A client of the socket at `socket`; each exchange is bounded by
    /// `timeout`.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    /// Sends one command line (commands separated by `;`) and returns the
    /// whole answer.
    ///
    /// * Idempotent: as the command. Cancel-safe: a dropped exchange may or
    ///   may not have been applied.
    ///
    /// # Errors
    /// A missing socket, one this user cannot write, nobody listening, a
    /// socket without `level admin`, a timeout, or a line with a newline.
    pub async fn command(&self, line: &str) -> Result<String, DriverError> {
        if line.contains(['\n', '\r', '\0']) {
            return Err(DriverError::new(format!(
                "refusing to send a HAProxy command with a line break: {line:?}"
            )));
        }
        let path = &self.socket;
        let exchange = async {
            let mut s = UnixStream::connect(path).await.map_err(|e| {
                let p = path.display();
                match e.kind() {
                    std::io::ErrorKind::NotFound => DriverError::new(format!(
                        "HAProxy admin socket {p} does not exist; start HAProxy with \
                         `stats socket {p} mode 600 level admin` in its global section"
                    )),
                    std::io::ErrorKind::PermissionDenied => DriverError::new(format!(
                        "HAProxy admin socket {p} is not writable by this user (permission denied); \
                         fix its `mode`/`user` in the `stats socket` line"
                    )),
                    std::io::ErrorKind::ConnectionRefused => DriverError::transient(format!(
                        "nothing listens on the HAProxy admin socket {p}: is HAProxy running?"
                    )),
                    _ => DriverError::from(e),
                }
            })?;
            s.write_all(format!("{line}\n").as_bytes()).await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, DriverError>(out)
        };
        let out = timeout(self.timeout, exchange).await.map_err(|_| {
            DriverError::transient(format!(
                "HAProxy admin socket {} did not answer {line:?} within {:.1}s",
                path.display(),
                self.timeout.as_secs_f64()
            ))
        })??;
        if out.starts_with("Permission denied") {
            return Err(DriverError::new(format!(
                "HAProxy admin socket {} refused {line:?}: permission denied; the socket needs `level admin`",
                path.display()
            )));
        }
        if out.starts_with("Unknown command") {
            return Err(DriverError::new(format!(
                "HAProxy does not know the command {line:?}: {}",
                out.lines().next().unwrap_or("")
            )));
        }
        Ok(out)
    }

    /// `show servers state <backend>`, parsed by the header's field names.
    ///
    /// # Errors
    /// As [`command`](Self::command), and an unknown backend (named).
    pub async fn servers_state(&self, backend: &str) -> Result<Vec<ServerState>, DriverError> {
        socket_word("HAProxy backend", backend)?;
        let out = self.command(&format!("show servers state {backend}")).await?;
        if out.starts_with("Can't find backend") || out.starts_with("No such") {
            return Err(DriverError::new(format!("HAProxy has no backend {backend}")));
        }
        parse_servers_state(&out)
    }

    /// `show stat` for one backend's servers: one map per server, keyed by
    /// the CSV header's names (`svname`, `scur`, `qcur`, …).
    ///
    /// # Errors
    /// As [`command`](Self::command), and an unknown backend (named).
    pub async fn stat(&self, backend: &str) -> Result<Vec<BTreeMap<String, String>>, DriverError> {
        socket_word("HAProxy backend", backend)?;
        let out = self.command(&format!("show stat {backend} 4 -1")).await?;
        if out.starts_with("No such proxy") || out.starts_with("Can't find") {
            return Err(DriverError::new(format!("HAProxy has no backend {backend}")));
        }
        parse_stat_csv(&out)
    }
}

pub(crate) fn parse_servers_state(out: &str) -> Result<Vec<ServerState>, DriverError> {
    let bad =
        |why: &str| DriverError::new(format!("unexpected `show servers state` answer ({why}): {out:?}"));
    let header = out
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .ok_or_else(|| bad("no header line"))?;
    let names: Vec<&str> = header.split_whitespace().collect();
    let col = |n: &str| {
        names
            .iter()
            .position(|h| *h == n)
            .ok_or_else(|| bad(&format!("no column {n}")))
    };
    let (c_name, c_op, c_admin, c_weight) = (
        col("srv_name")?,
        col("srv_op_state")?,
        col("srv_admin_state")?,
        col("srv_uweight")?,
    );
    let c_addr = names.iter().position(|h| *h == "srv_addr");
    let c_port = names.iter().position(|h| *h == "srv_port");
    let mut servers = Vec::new();
    for l in out.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < names.len().min(c_weight + 1) || f.len() == 1 {
            // The version line ("1") and blank lines.
            continue;
        }
        let num = |i: usize| -> Result<u32, DriverError> {
            f.get(i)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad("a non-numeric field"))
        };
        servers.push(ServerState {
            name: f
                .get(c_name)
                .map(|s| s.to_string())
                .ok_or_else(|| bad("short line"))?,
            op_state: num(c_op)?,
            admin_bits: num(c_admin)?,
            weight: num(c_weight)?,
            address: c_addr.and_then(|i| f.get(i)).map(|s| s.to_string()),
            port: c_port.and_then(|i| f.get(i)).and_then(|p| p.parse().ok()),
        });
    }
    Ok(servers)
}

pub(crate) fn parse_stat_csv(out: &str) -> Result<Vec<BTreeMap<String, String>>, DriverError> {
    let header = out
        .lines()
        .find_map(|l| l.strip_prefix("# "))
        .ok_or_else(|| DriverError::new(format!("unexpected `show stat` answer (no CSV header): {out:?}")))?;
    let names: Vec<&str> = header.split(',').collect();
    Ok(out
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            names
                .iter()
                .zip(l.split(','))
                .filter(|(n, _)| !n.is_empty())
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        })
        .collect())
}

/// What a server should look like after a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desired {
    admin: ServerAdmin,
    weight: Option<u32>,
}

/// Builds a [`HaproxyLoadBalancer`]; setters never fail,
/// [`build`](Self::build) checks everything.
#[derive(Debug, Clone)]
pub struct HaproxyBuilder {
    socket: Option<PathBuf>,
    backend: String,
    backends: Vec<Backend>,
    timeout: Duration,
    map_dir: Option<PathBuf>,
    up_timeout: Duration,
}

impl Default for HaproxyBuilder {
    fn default() -> Self {
        Self {
            socket: None,
            backend: "app".into(),
            backends: Vec::new(),
            timeout: Duration::from_secs(5),
            map_dir: None,
            up_timeout: Duration::from_secs(30),
        }
    }
}

impl HaproxyBuilder {
    /// The admin socket (required).
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// The HAProxy backend holding the servers. Default `app`.
    pub fn backend_name(mut self, name: impl Into<String>) -> Self {
        self.backend = name.into();
        self
    }

    /// Adds a backend (its id is the HAProxy server name).
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backends.push(backend);
        self
    }

    /// Adds backends.
    pub fn backends(mut self, backends: impl IntoIterator<Item = Backend>) -> Self {
        self.backends.extend(backends);
        self
    }

    /// The directory of the map files deploykit owns, which turns on
    /// header, cookie and query rules ([`LoadBalancer::apply_policy`]):
    /// each rule reads the map named by [`config_line`], loaded by a
    /// `use_backend` line in haproxy.cfg, and changed through the runtime
    /// API without a reload. Without it the driver does weights and
    /// switches only, exactly as before.
    pub fn map_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.map_dir = Some(dir.into());
        self
    }

    /// Bound of one exchange with the socket. Default 5 s.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// How long [`enable`](LoadBalancer::enable) waits for HAProxy's own
    /// health check to report the server up. Default 30 s: above the
    /// `rise` × `inter` of HAProxy's defaults (2 × 2 s) with room for a
    /// slow first check.
    pub fn up_timeout(mut self, t: Duration) -> Self {
        self.up_timeout = t;
        self
    }

    /// Checks the settings. Touches nothing (use
    /// [`HaproxyLoadBalancer::check`] to verify HAProxy knows every server).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: no socket, a bad backend
    /// name, no backends, an id listed twice, a zero timeout.
    pub fn build(self) -> Result<HaproxyLoadBalancer> {
        let socket = self.socket.ok_or_else(|| {
            Error::invalid("haproxy socket", "is not set; give the path of the admin socket")
        })?;
        validate_name("haproxy backend", &self.backend)?;
        let roster = Roster::new(
            self.backends,
            RosterRules {
                field: "haproxy backends",
                when_empty: "is empty; add the servers of the backend",
                member: "server",
                // HAProxy's own config holds the servers' addresses.
                distinct_addresses: false,
            },
        )?;
        if self.timeout.is_zero() {
            return Err(Error::invalid("haproxy timeout", "must be greater than 0"));
        }
        if self.up_timeout.is_zero() {
            return Err(Error::invalid(
                "haproxy up_timeout",
                "must be greater than 0; give HAProxy's health check time to pass, e.g. 30s",
            ));
        }
        if let Some(dir) = &self.map_dir {
            let shown = dir.display().to_string();
            if !dir.is_absolute() || socket_word("HAProxy map dir", &shown).is_err() {
                return Err(Error::invalid(
                    "haproxy map_dir",
                    format!(
                        "'{shown}' must be an absolute path without whitespace, ';' or control characters"
                    ),
                ));
            }
        }
        Ok(HaproxyLoadBalancer {
            inner: Arc::new(Inner {
                api: RuntimeApi::new(socket, self.timeout),
                map_dir: self.map_dir,
                up_timeout: self.up_timeout,
                policy: Mutex::new(None),
                backend: self.backend,
                state: Mutex::new(roster),
                detoured: Mutex::new(BTreeSet::new()),
                apply: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// A HAProxy load balancer driven through its runtime API. Cheap to clone.
///
/// ```no_run
/// # async fn f() -> deploykit::Result<()> {
/// use deploykit::{Address, Backend, Group, InstanceId};
/// use deploykit::lb::HaproxyLoadBalancer;
///
/// let lb = HaproxyLoadBalancer::builder()
///     .socket("/run/haproxy/admin.sock")
///     .backend_name("app")
///     .backend(Backend {
///         id: InstanceId::new("web-1")?, // `server web-1 10.0.0.5:8080` in HAProxy's config
///         address: Address::parse("10.0.0.5:8080")?,
///         group: Group::new("stable")?,
///     })
///     .build()?;
/// lb.check().await?; // the socket answers and knows every server
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct HaproxyLoadBalancer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    api: RuntimeApi,
    /// Where the routing maps live, when rules are on.
    map_dir: Option<PathBuf>,
    /// How long `enable` waits for HAProxy's health check.
    up_timeout: Duration,
    /// The rules applied last (`None`: no rule, or a plain split).
    policy: Mutex<Option<TrafficPolicy>>,
    backend: String,
    /// The servers, who is out of rotation, and the split (`None`: weights
    /// as HAProxy's configuration set them).
    state: Mutex<Roster>,
    /// The instances whose traffic this driver sent to a detour server
    /// (network chaos); their weight and state live on that server.
    detoured: Mutex<BTreeSet<InstanceId>>,
    apply: tokio::sync::Mutex<()>,
}

impl HaproxyLoadBalancer {
    /// A builder with the defaults.
    pub fn builder() -> HaproxyBuilder {
        HaproxyBuilder::default()
    }

    /// The runtime-API client.
    pub fn api(&self) -> &RuntimeApi {
        &self.inner.api
    }

    /// Checks that the socket answers, the backend exists and has a server
    /// for every backend given to the builder, at that backend's address
    /// and port.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    ///
    /// # Errors
    /// The socket problem, the backend / servers missing, by name, or a
    /// server at another address than its instance (both named).
    pub async fn check(&self) -> Result<(), DriverError> {
        let servers = self.inner.api.servers_state(&self.inner.backend).await?;
        let backends: Vec<Backend> = self.lock_state().iter().map(|(b, _)| b.clone()).collect();
        let missing: Vec<&str> = backends
            .iter()
            .filter(|b| !servers.iter().any(|s| s.name == b.id.as_str()))
            .map(|b| b.id.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(DriverError::new(format!(
                "HAProxy backend {} has no server {}",
                self.inner.backend,
                missing.join(", ")
            )));
        }
        // A server of the right name at another address would be drained
        // and enabled while the traffic goes elsewhere.
        let mut wrong = Vec::new();
        for b in &backends {
            if let Some(s) = servers.iter().find(|s| s.name == b.id.as_str()) {
                wrong.extend(address_mismatch(s, b).await);
            }
        }
        if !wrong.is_empty() {
            return Err(DriverError::new(format!(
                "HAProxy backend {}: {}",
                self.inner.backend,
                wrong.join("; ")
            )));
        }
        if self.inner.map_dir.is_some() {
            self.check_group_backends(&backends).await?;
        }
        Ok(())
    }

    /// With routing rules on: every group has its backend
    /// `<backend>__<group>` holding that group's servers (which rules send
    /// requests to), so a rule never names a backend HAProxy lacks.
    async fn check_group_backends(&self, backends: &[Backend]) -> Result<(), DriverError> {
        let be = &self.inner.backend;
        let mut groups: BTreeMap<&Group, Vec<&Backend>> = BTreeMap::new();
        for b in backends {
            groups.entry(&b.group).or_default().push(b);
        }
        for (group, members) in groups {
            let name = format!("{be}__{group}");
            let lines: Vec<String> = members
                .iter()
                .map(|b| format!("server {} {} track {be}/{}", b.id, b.address, b.id))
                .collect();
            let fix = format!(
                "add to haproxy.cfg `backend {name}` with `{}` (routing rules send group {group}'s requests there)",
                lines.join("`, `")
            );
            let servers = match self.inner.api.servers_state(&name).await {
                Ok(s) => s,
                Err(e) if e.message().starts_with("HAProxy has no backend") => {
                    return Err(DriverError::new(format!("HAProxy has no backend {name}: {fix}"))
                        .with_preflight_failure(crate::PreflightFailure::NotWired));
                }
                Err(e) => return Err(e),
            };
            let missing: Vec<&str> = members
                .iter()
                .filter(|b| !servers.iter().any(|s| s.name == b.id.as_str()))
                .map(|b| b.id.as_str())
                .collect();
            if !missing.is_empty() {
                return Err(DriverError::new(format!(
                    "HAProxy backend {name} has no server {}: {fix}",
                    missing.join(", ")
                )));
            }
        }
        Ok(())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, Roster> {
        roster::lock(&self.inner.state)
    }

    fn known(&self, backend: &Backend) -> Result<(), DriverError> {
        let st = self.lock_state();
        if st.admin(&backend.id).is_some() {
            Ok(())
        } else {
            Err(DriverError::new(format!(
                "HAProxy backend {} has no server {} among those deploykit manages ({})",
                self.inner.backend,
                backend.id,
                st.ids()
            )))
        }
    }

    fn desired(&self, st: &Roster) -> BTreeMap<InstanceId, Desired> {
        let weights = st.weights(u32::from(MAX_WEIGHT));
        st.iter()
            .map(|(b, admin)| {
                let d = match admin {
                    Admin::Draining => Desired {
                        admin: ServerAdmin::Drain,
                        weight: None,
                    },
                    Admin::Disabled => Desired {
                        admin: ServerAdmin::Maint,
                        weight: None,
                    },
                    Admin::Ready => Desired {
                        admin: ServerAdmin::Ready,
                        weight: weights.as_ref().map(|w| w.get(&b.group).copied().unwrap_or(0)),
                    },
                };
                (b.id.clone(), d)
            })
            .collect()
    }

    /// Edits the state under the apply lock, sends what differs from
    /// HAProxy's current state, reads it back, and commits the state.
    async fn change(
        &self,
        edit: impl FnOnce(&mut Roster) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<(), DriverError> {
        let this = self.clone();
        run_to_completion("HAProxy", async move { this.change_inner(edit).await }).await
    }

    async fn change_inner(
        &self,
        edit: impl FnOnce(&mut Roster) -> Result<(), DriverError>,
    ) -> Result<(), DriverError> {
        let _g = self.inner.apply.lock().await;
        self.change_locked(edit).await
    }

    /// Sets the routing maps for `policy` (every owned map emptied for
    /// `None`) and then the servers, under the apply lock; when the server
    /// change fails the maps are put back. A rule whose map HAProxy has
    /// not loaded is refused before anything is sent.
    async fn route(
        &self,
        policy: Option<TrafficPolicy>,
        edit: impl FnOnce(&mut Roster) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<(), DriverError> {
        let this = self.clone();
        run_to_completion("HAProxy", async move {
            let inner = &this.inner;
            let _g = inner.apply.lock().await;
            let Some(dir) = &inner.map_dir else {
                return this.change_locked(edit).await;
            };
            let api = &inner.api;
            let loaded = routing::loaded_maps(api).await?;
            let want = routing::desired(dir, &inner.backend, policy.as_ref(), &loaded)?;
            let mut before = Vec::new();
            for (file, entries) in &want {
                let mut now = routing::entries(api, file).await?;
                let mut wanted = entries.clone();
                now.sort();
                wanted.sort();
                if now != wanted {
                    before.push((file.clone(), now));
                }
            }
            // A change that only empties maps (a sticky split or rules
            // ending) sets the weights first: emptied first, the maps would
            // for a moment send pinned users by the old weights, back to
            // the group they had left.
            let emptying = !before.is_empty() && before.iter().all(|(f, _)| want[f].is_empty());
            if emptying {
                this.change_locked(edit).await?;
                for (file, _) in &before {
                    routing::write_map(api, file, &want[file]).await?;
                }
                *roster::lock(&inner.policy) = policy;
                return Ok(());
            }
            let mut written: Vec<&(PathBuf, Vec<(String, String)>)> = Vec::new();
            let mut result = Ok(());
            for b in &before {
                match routing::write_map(api, &b.0, &want[&b.0]).await {
                    Ok(()) => written.push(b),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if result.is_ok() {
                result = this.change_locked(edit).await;
            }
            if let Err(e) = result {
                for (file, old) in written {
                    if let Err(r) = routing::write_map(api, file, old).await {
                        tracing::error!(map = %file.display(), error = %r, "could not restore a HAProxy routing map");
                    }
                }
                return Err(e);
            }
            *roster::lock(&inner.policy) = policy;
            Ok(())
        })
        .await
    }

    async fn change_locked(
        &self,
        edit: impl FnOnce(&mut Roster) -> Result<(), DriverError>,
    ) -> Result<(), DriverError> {
        let inner = &self.inner;
        let mut st = self.lock_state().clone();
        edit(&mut st)?;
        let want = self.desired(&st);
        let be = &inner.backend;
        let raw = self.raw_current().await?;
        let stale = self.stale_detours(&raw, &want);
        let current = self.view(raw);
        let mut cmds = commands_for(be, &want, &current)?;
        cmds.extend(stale);
        if !cmds.is_empty() {
            let out = inner.api.command(&cmds.join(";")).await?;
            let msg: Vec<&str> = out.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            if !msg.is_empty() {
                let msg = msg.join("; ");
                let hint = if msg.contains("static LB algorithm") {
                    " (use a dynamic balance algorithm such as roundrobin)"
                } else {
                    ""
                };
                return Err(DriverError::new(format!(
                    "HAProxy rejected `{}`: {msg}{hint}",
                    cmds.join(";")
                )));
            }
        }
        check_taken(be, &want, &self.current().await?)?;
        *self.lock_state() = st;
        Ok(())
    }

    /// HAProxy's servers by the instance whose traffic they carry: a
    /// detour server this driver made stands in for its instance's own
    /// server (which keeps weight 0 meanwhile), so weights and states
    /// follow the traffic.
    async fn current(&self) -> Result<BTreeMap<String, ServerState>, DriverError> {
        Ok(self.view(self.raw_current().await?))
    }

    /// HAProxy's servers by name.
    async fn raw_current(&self) -> Result<BTreeMap<String, ServerState>, DriverError> {
        Ok(self
            .inner
            .api
            .servers_state(&self.inner.backend)
            .await?
            .into_iter()
            .map(|s| (s.name.clone(), s))
            .collect())
    }

    fn view(&self, mut raw: BTreeMap<String, ServerState>) -> BTreeMap<String, ServerState> {
        let detoured = roster::lock(&self.inner.detoured).clone();
        for id in detoured {
            if let Some(d) = raw.get(&detour_name(id.as_str())).cloned() {
                raw.insert(id.to_string(), d);
            }
        }
        raw
    }

    /// The commands that end detours in rotation which this driver did not
    /// make (a run killed during a network fault): the instance's own
    /// server gets its traffic back with the change, the detour server
    /// leaves rotation after it.
    fn stale_detours(
        &self,
        raw: &BTreeMap<String, ServerState>,
        want: &BTreeMap<InstanceId, Desired>,
    ) -> Vec<String> {
        let be = &self.inner.backend;
        let ours = roster::lock(&self.inner.detoured).clone();
        let mut cmds = Vec::new();
        for (id, d) in want {
            let name = detour_name(id.as_str());
            let Some(detour) = raw.get(&name).filter(|s| s.admin() != ServerAdmin::Maint) else {
                continue;
            };
            if ours.contains(id) {
                continue;
            }
            let own = raw.get(id.as_str()).map_or(0, |s| s.weight);
            if d.weight.is_none() && own != detour.weight {
                cmds.push(format!("set server {be}/{id} weight {}", detour.weight));
            }
            cmds.push(format!("set server {be}/{name} state maint"));
        }
        cmds
    }

    /// Sends `id`'s traffic to `addr` through a server of its own,
    /// `<id>.dk-detour`, added with the instance's weight and state, and
    /// then takes the instance's server to weight 0. Changing the
    /// instance's server address instead would not do: HAProxy keeps
    /// reusing its idle connections to the old address.
    async fn detour(&self, id: &InstanceId, addr: std::net::SocketAddr) -> Result<(), DriverError> {
        let api = &self.inner.api;
        let be = &self.inner.backend;
        let name = detour_name(id.as_str());
        socket_word("HAProxy server", &name)?;
        let raw = self.raw_current().await?;
        let own = raw
            .get(id.as_str())
            .ok_or_else(|| DriverError::new(format!("HAProxy backend {be} has no server {id}")))?;
        let live = match raw.get(&name) {
            Some(d) if roster::lock(&self.inner.detoured).contains(id) => d.clone(),
            _ => own.clone(),
        };
        // A detour server left from an earlier fault is replaced, so no
        // idle connection of it leads to an earlier proxy.
        let mut reuse = false;
        if raw.contains_key(&name) {
            let _ = api
                .command(&format!("set server {be}/{name} state maint"))
                .await?;
            let out = api.command(&format!("del server {be}/{name}")).await?;
            reuse = !out.contains("Server deleted");
        }
        let at = match addr {
            std::net::SocketAddr::V4(a) => a.to_string(),
            std::net::SocketAddr::V6(a) => format!("ipv6@{}:{}", a.ip(), a.port()),
        };
        if reuse {
            api.command(&format!(
                "set server {be}/{name} addr {} port {}",
                addr.ip(),
                addr.port()
            ))
            .await?;
            api.command(&format!("set server {be}/{name} weight {}", live.weight))
                .await?;
        } else {
            let out = api
                .command(&format!("add server {be}/{name} {at} weight {}", live.weight))
                .await?;
            if !out.contains("New server registered") {
                return Err(DriverError::new(format!(
                    "HAProxy refused a detour server for {id}: {}; network chaos on HAProxy adds a \
                     server at run time, which needs HAProxy 2.4 or later and a dynamic balance \
                     algorithm such as roundrobin",
                    out.trim()
                )));
            }
        }
        let out = api
            .command(&format!(
                "set server {be}/{name} state {};set server {be}/{id} weight 0",
                live.admin().word()
            ))
            .await?;
        roster::lock(&self.inner.detoured).insert(id.clone());
        if !out.trim().is_empty() {
            return Err(DriverError::new(format!(
                "HAProxy did not take the detour of {id}: {}",
                out.trim()
            )));
        }
        let after = self.raw_current().await?;
        let d = after
            .get(&name)
            .ok_or_else(|| DriverError::new(format!("HAProxy backend {be} has no server {name}")))?;
        let at_proxy = d.is_at(addr);
        let own_now = after.get(id.as_str()).map_or(0, |s| s.weight);
        if !at_proxy || d.weight != live.weight || d.admin() != live.admin() || own_now != 0 {
            return Err(DriverError::new(format!(
                "HAProxy did not take the detour of {id}: {be}/{name} is at {}:{} with weight {} ({}), \
                 {be}/{id} has weight {own_now}; expected {addr} with weight {} ({}) and 0",
                d.address.as_deref().unwrap_or("?"),
                d.port.unwrap_or(0),
                d.weight,
                d.admin().word(),
                live.weight,
                live.admin().word()
            )));
        }
        Ok(())
    }

    /// Gives `id`'s own server back the weight and state of its detour
    /// server, then takes the detour server out of rotation and deletes it
    /// (one still holding connections stays in maintenance, out of the
    /// way, until the next detour replaces it).
    async fn send_home(&self, id: &InstanceId) -> Result<(), DriverError> {
        let api = &self.inner.api;
        let be = &self.inner.backend;
        let name = detour_name(id.as_str());
        socket_word("HAProxy server", &name)?;
        let raw = self.raw_current().await?;
        let own = raw
            .get(id.as_str())
            .ok_or_else(|| DriverError::new(format!("HAProxy backend {be} has no server {id}")))?;
        let Some(detour) = raw.get(&name) else {
            roster::lock(&self.inner.detoured).remove(id);
            return Ok(());
        };
        let mut cmds = Vec::new();
        let live = detour.admin() != ServerAdmin::Maint;
        if live {
            cmds.push(format!("set server {be}/{id} weight {}", detour.weight));
            if own.admin() != detour.admin() {
                cmds.push(format!("set server {be}/{id} state {}", detour.admin().word()));
            }
            cmds.push(format!("set server {be}/{name} state maint"));
        }
        if !cmds.is_empty() {
            let out = api.command(&cmds.join(";")).await?;
            if !out.trim().is_empty() {
                return Err(DriverError::new(format!(
                    "HAProxy did not send {id}'s traffic home: {}",
                    out.trim()
                )));
            }
        }
        roster::lock(&self.inner.detoured).remove(id);
        let after = self.raw_current().await?;
        if live {
            let back = after.get(id.as_str()).map(|s| (s.weight, s.admin()));
            if back != Some((detour.weight, detour.admin())) {
                return Err(DriverError::new(format!(
                    "HAProxy did not send {id}'s traffic home: {be}/{id} should have weight {} ({})",
                    detour.weight,
                    detour.admin().word()
                )));
            }
        }
        let out = api.command(&format!("del server {be}/{name}")).await?;
        if !out.contains("Server deleted") {
            tracing::debug!(server = %name, answer = %out.trim(), "detour server kept in maintenance");
        }
        Ok(())
    }

    /// Polls `show servers state` until `backend`'s server is running
    /// (`srv_op_state` 1, slow start, or 2) or the up timeout passes.
    async fn wait_up(&self, backend: &Backend) -> Result<(), DriverError> {
        let limit = self.inner.up_timeout;
        let end = tokio::time::Instant::now() + limit;
        loop {
            let state = self.current().await?;
            let op = state.get(backend.id.as_str()).map(|s| s.op_state);
            if matches!(op, Some(1 | 2)) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= end {
                return Err(DriverError::transient(format!(
                    "HAProxy still reports server {}/{} down {:.0}s after it was enabled: its own health check has not passed although the instance answers deploykit's; check the server's `check` settings (port, `option httpchk` path) in haproxy.cfg, or raise the up timeout",
                    self.inner.backend,
                    backend.id,
                    limit.as_secs_f64()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn set_admin(&self, backend: &Backend, admin: Admin) -> Result<(), DriverError> {
        self.known(backend)?;
        let id = backend.id.clone();
        self.change(move |st| {
            st.set_admin(&id, admin);
            Ok(())
        })
        .await
    }
}

/// Why `server` (as HAProxy reports it) does not send its traffic to
/// `backend`'s address, or `None` when it does. Addresses are compared as
/// socket addresses (`[0:0::1]` is `[::1]`); a name in the instance's
/// address is resolved, since HAProxy reports the address it resolved. An
/// answer without the address (or port) column is not checked on it.
async fn address_mismatch(server: &ServerState, backend: &Backend) -> Option<String> {
    use std::net::{IpAddr, SocketAddr};
    let addr = server.address.as_deref()?;
    let want = &backend.address;
    let fix =
        "point the server at the instance's address in HAProxy's config, or correct the instance's address";
    let Ok(ip) = addr.parse::<IpAddr>() else {
        return Some(format!(
            "server {} has no usable address ({addr:?}), but instance {} is at {want}; {fix}",
            server.name, backend.id
        ));
    };
    let shown = match (ip, server.port) {
        (_, Some(0)) => format!("{addr} with no port"),
        (IpAddr::V6(_), Some(p)) => format!("[{addr}]:{p}"),
        (_, Some(p)) => format!("{addr}:{p}"),
        (_, None) => addr.to_string(),
    };
    let host = want.host().trim_start_matches('[').trim_end_matches(']');
    let resolved: Vec<SocketAddr> = match tokio::net::lookup_host((host, want.port())).await {
        Ok(it) => it.collect(),
        Err(e) => {
            return Some(format!(
                "instance {}'s address {want} does not resolve ({e}), so HAProxy's server {} at {shown} cannot be checked against it",
                backend.id, server.name
            ))
        }
    };
    let matches = resolved
        .iter()
        .any(|r| r.ip().to_canonical() == ip.to_canonical() && server.port.is_none_or(|p| p == r.port()));
    // A run killed during a network chaos fault leaves its detour to a
    // fault proxy on loopback in HAProxy's memory.
    let detour = if ip.is_loopback() {
        format!(
            " (if a deploykit run was killed during a network chaos fault, the server still points at its \
             fault proxy: reload HAProxy, or send `set server <backend>/{} addr <ip> port <port>` with the \
             instance's own address)",
            server.name
        )
    } else {
        String::new()
    };
    (!matches).then(|| {
        format!(
            "server {} is at {shown}, but instance {} is at {want}; {fix}{detour}",
            server.name, backend.id
        )
    })
}

/// The name of the server that carries `id`'s traffic through a fault
/// proxy.
fn detour_name(id: &str) -> String {
    format!("{id}.dk-detour")
}

/// `set server <be>/<id> addr …` unless it is there already, read back.
async fn set_addr(
    api: &RuntimeApi,
    be: &str,
    id: &InstanceId,
    addr: std::net::SocketAddr,
) -> Result<(), DriverError> {
    let find = |servers: Vec<ServerState>| {
        servers
            .into_iter()
            .find(|s| s.name == id.as_str())
            .ok_or_else(|| DriverError::new(format!("HAProxy backend {be} has no server {id}")))
    };
    if find(api.servers_state(be).await?)?.is_at(addr) {
        return Ok(());
    }
    // HAProxy answers in prose ("IP changed from …"); the read-back decides.
    api.command(&format!(
        "set server {be}/{id} addr {} port {}",
        addr.ip(),
        addr.port()
    ))
    .await?;
    let s = find(api.servers_state(be).await?)?;
    if !s.is_at(addr) {
        return Err(DriverError::new(format!(
            "HAProxy did not take the change: {be}/{id} is at {}:{}, expected {addr}",
            s.address.as_deref().unwrap_or("?"),
            s.port.unwrap_or(0)
        )));
    }
    Ok(())
}

/// The runtime-API commands that take the servers of backend `be` from
/// `current` to `want`: weights and readiness raised before others are
/// lowered, so that a switch never leaves a moment with no server in
/// rotation.
fn commands_for(
    be: &str,
    want: &BTreeMap<InstanceId, Desired>,
    current: &BTreeMap<String, ServerState>,
) -> Result<Vec<String>, DriverError> {
    let mut up = Vec::new();
    let mut down = Vec::new();
    for (id, d) in want {
        let cur = current
            .get(id.as_str())
            .ok_or_else(|| DriverError::new(format!("HAProxy backend {be} has no server {id}")))?;
        // A detour server carries the instance's traffic in its place.
        let srv = &cur.name;
        socket_word("HAProxy server", srv)?;
        if let Some(w) = d.weight {
            if w != cur.weight {
                let cmd = format!("set server {be}/{srv} weight {w}");
                if w > cur.weight {
                    up.push(cmd)
                } else {
                    down.push(cmd)
                }
            }
        }
        if d.admin != cur.admin() {
            let cmd = format!("set server {be}/{srv} state {}", d.admin.word());
            if d.admin == ServerAdmin::Ready {
                up.push(cmd)
            } else {
                down.push(cmd)
            }
        }
    }
    Ok(up.into_iter().chain(down).collect())
}

/// The read-back: every server of `want` is now as wanted in `after`.
fn check_taken(
    be: &str,
    want: &BTreeMap<InstanceId, Desired>,
    after: &BTreeMap<String, ServerState>,
) -> Result<(), DriverError> {
    for (id, d) in want {
        let Some(s) = after.get(id.as_str()) else {
            return Err(DriverError::new(format!(
                "HAProxy backend {be} has no server {id}"
            )));
        };
        if s.admin() != d.admin {
            return Err(DriverError::new(format!(
                "HAProxy did not take the change: {be}/{id} is {} (admin bits {:#x}), expected {}",
                s.admin().word(),
                s.admin_bits,
                d.admin.word()
            )));
        }
        if let Some(w) = d.weight {
            if s.weight != w {
                return Err(DriverError::new(format!(
                    "HAProxy did not take the change: {be}/{id} has weight {}, expected {w}",
                    s.weight
                )));
            }
        }
    }
    Ok(())
}

#[async_trait]
impl LoadBalancer for HaproxyLoadBalancer {
    fn name(&self) -> &str {
        "haproxy"
    }

    /// [`check`](HaproxyLoadBalancer::check): the socket answers, the
    /// backend exists and has a server for every backend of the fleet, at
    /// that backend's address.
    ///
    /// * Idempotent: yes (read-only: `show servers state`).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn preflight(&self) -> Result<(), DriverError> {
        self.check().await
    }

    /// The capabilities and groups of `policy`, then, for rules or a sticky
    /// split, that HAProxy has loaded every map it needs (`show map`): a
    /// missing one is named with the haproxy.cfg lines that load it.
    ///
    /// * Idempotent: yes (read-only: `show map`).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn preflight_policy(&self, policy: &TrafficPolicy) -> Result<(), DriverError> {
        self.capabilities().check("haproxy", policy)?;
        check_groups("haproxy", policy, &self.lock_state().groups())?;
        let Some(dir) = &self.inner.map_dir else {
            return Ok(());
        };
        if policy.rules.is_empty() && policy.split.sticky.is_none() {
            return Ok(());
        }
        let loaded = routing::loaded_maps(&self.inner.api).await?;
        routing::desired(dir, &self.inner.backend, Some(policy), &loaded).map(|_| ())
    }

    /// `set server <be>/<srv> state drain`, read back.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (runs to completion in a task).
    /// * On failure: the server is as HAProxy reports it; nothing else was
    ///   changed in deploykit's state.
    async fn drain(&self, backend: &Backend) -> Result<(), DriverError> {
        self.set_admin(backend, Admin::Draining).await
    }

    /// `scur + qcur` of the server from `show stat`.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn active_connections(&self, backend: &Backend) -> Result<Option<u64>, DriverError> {
        self.known(backend)?;
        let rows = self.inner.api.stat(&self.inner.backend).await?;
        let row = rows
            .iter()
            .find(|r| {
                r.get("pxname").map(String::as_str) == Some(self.inner.backend.as_str())
                    && r.get("svname").map(String::as_str) == Some(backend.id.as_str())
            })
            .ok_or_else(|| {
                DriverError::new(format!(
                    "HAProxy backend {} has no server {}",
                    self.inner.backend, backend.id
                ))
            })?;
        let num = |k: &str| -> Result<u64, DriverError> {
            let v = row.get(k).map(String::as_str).unwrap_or("");
            if v.is_empty() {
                return Ok(0);
            }
            v.parse()
                .map_err(|_| DriverError::new(format!("HAProxy `show stat` {k} is {v:?}, not a number")))
        };
        Ok(Some(num("scur")? + num("qcur")?))
    }

    /// `set server <be>/<srv> state ready` (and its group's weight), read
    /// back; then waits, up to the builder's
    /// [`up_timeout`](HaproxyBuilder::up_timeout), until HAProxy's own
    /// health check reports the server up. A server whose check still
    /// counts the failures of its stopped instance gets no traffic, so a
    /// group backend holding only such servers answers `503` to every
    /// request a rule or split sends it: enable returns once traffic can
    /// really flow. A server without `check` is up at once.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (the change runs in a task; the
    ///   wait only reads).
    /// * On failure: the server stays out of rotation in deploykit's state
    ///   when the change failed; when only the wait ran out, the server is
    ///   ready and HAProxy sends it traffic as soon as its check passes.
    async fn enable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.set_admin(backend, Admin::Ready).await?;
        self.wait_up(backend).await
    }

    /// Adds a server `<srv>.dk-detour` at `via` carrying the instance's
    /// weight and state, then sets the instance's own server to weight 0;
    /// `None` gives the own server the detour's weight and state back and
    /// deletes the detour server. HAProxy keeps reusing idle connections
    /// to a server's old address after `set server … addr`, so a changed
    /// address would leave the traffic of busy keep-alive clients where it
    /// was. In the group's backend `<be>__<group>` (routing rules on) the
    /// server's address is changed instead, since its servers track the
    /// main backend's. The detour lives in HAProxy's memory only: a
    /// reload of HAProxy drops it, and a driver built afterwards ends a
    /// detour it finds with its first change.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (runs in a task).
    /// * On failure: the traffic goes to either the instance or the detour;
    ///   a retry converges.
    async fn reroute(
        &self,
        backend: &Backend,
        via: Option<&crate::names::Address>,
    ) -> Result<(), DriverError> {
        self.known(backend)?;
        let own = self
            .lock_state()
            .get(&backend.id)
            .map(|(b, _)| b.clone())
            .ok_or_else(|| DriverError::new(format!("no server {}", backend.id)))?;
        let resolve = |target: crate::names::Address| async move {
            let host = target
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            tokio::net::lookup_host((host.as_str(), target.port()))
                .await
                .ok()
                .and_then(|mut it| it.next())
                .ok_or_else(|| {
                    DriverError::new(format!("{target} does not resolve to an address HAProxy can use"))
                })
        };
        let home = resolve(own.address.clone()).await?;
        let via = match via {
            Some(v) => Some(resolve(v.clone()).await?),
            None => None,
        };
        let id = own.id.clone();
        let group_backend = self
            .inner
            .map_dir
            .is_some()
            .then(|| format!("{}__{}", self.inner.backend, own.group));
        let this = self.clone();
        run_to_completion("HAProxy", async move {
            let _g = this.inner.apply.lock().await;
            socket_word("HAProxy server", id.as_str())?;
            match via {
                Some(addr) => this.detour(&id, addr).await?,
                None => {
                    this.send_home(&id).await?;
                    // A detour of an older deploykit moved the server itself.
                    set_addr(&this.inner.api, &this.inner.backend, &id, home).await?;
                }
            }
            if let Some(be) = group_backend {
                set_addr(&this.inner.api, &be, &id, via.unwrap_or(home)).await?;
            }
            Ok(())
        })
        .await
    }

    /// `set server <be>/<srv> state maint`, read back.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (runs in a task).
    /// * On failure: the server may still be in rotation.
    async fn disable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.set_admin(backend, Admin::Disabled).await
    }

    /// Server weights (0–256) so each group gets its share; 0 % is weight 0.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (runs in a task).
    /// * On failure: HAProxy may hold part of the new weights; deploykit's
    ///   state keeps the old split, and a retry converges.
    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        let shares = self.lock_state().check_weights(weights)?;
        self.route(None, move |st| {
            st.shares = Some(shares);
            Ok(())
        })
        .await
    }

    /// The group's servers to full weight and every other server to weight
    /// 0, in one command line (raises first), read back.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (runs in a task).
    /// * On failure: the previously live group still has its weights unless
    ///   HAProxy took part of the line; a retry converges.
    async fn switch_to(&self, group: &Group) -> Result<(), DriverError> {
        let g = group.clone();
        let ready_in_group = self.lock_state().ready_per_group().get(&g).copied().unwrap_or(0);
        if ready_in_group == 0 {
            return Err(DriverError::new(format!(
                "cannot switch HAProxy backend {} to group {g}: it has no enabled server",
                self.inner.backend
            )));
        }
        self.route(None, move |st| {
            st.shares = Some(BTreeMap::from([(g, 100)]));
            Ok(())
        })
        .await
    }

    /// Weights, switch and, with a map dir ([`HaproxyBuilder::map_dir`]),
    /// header, cookie, query and regex rules and sticky splits (by
    /// deploykit's cookie or a request key).
    fn capabilities(&self) -> Capabilities {
        let caps = Capabilities::weights_and_switch();
        if self.inner.map_dir.is_none() {
            return caps;
        }
        caps.with(Capability::HeaderMatch)
            .with(Capability::CookieMatch)
            .with(Capability::QueryMatch)
            .with(Capability::RegexMatch)
            .with(Capability::StickyCookie)
            .with(Capability::StickyKey)
    }

    /// Writes each rule's map entry (value -> `<backend>__<group>`) and, for
    /// a sticky split, its bucket ranges (see [`sticky_config`]) as a new
    /// map version, committed atomically per map and read back, empties the
    /// owned maps nothing uses, then sets the split's weights as
    /// [`set_weights`](Self::set_weights) does (requests without a sticky
    /// key follow them). No reload. Mirroring is refused: HAProxy 2.6 has
    /// no built-in mirroring.
    ///
    /// * Idempotent: yes; maps and servers already as wanted are not sent.
    /// * Cancel-safe: yes (runs in a task).
    /// * On failure: the maps written are put back, so the previous rules
    ///   route; an invalid or unsupported policy, an unknown group, or a
    ///   rule or sticky split whose map HAProxy has not loaded is refused
    ///   before anything is sent.
    async fn apply_policy(&self, policy: &TrafficPolicy) -> Result<(), DriverError> {
        self.capabilities().check("haproxy", policy)?;
        let shares = {
            let st = self.lock_state();
            check_groups("haproxy", policy, &st.groups())?;
            st.check_weights(&policy.split.weights)?
        };
        if let Some(group) = policy.as_switch() {
            return self.switch_to(group).await;
        }
        let routed = (!policy.rules.is_empty() || policy.split.sticky.is_some()).then(|| policy.clone());
        self.route(routed, move |st| {
            st.shares = Some(shares);
            Ok(())
        })
        .await
    }

    /// Read from HAProxy: the one group whose servers are ready with a
    /// weight above 0, if exactly one is and no map deploykit owns holds an
    /// entry (a rule or a sticky split sends some requests elsewhere).
    /// Waits for a change still running (one whose call was dropped) to
    /// finish first.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        // A change that was dropped still runs to its end in its task; its
        // maps, servers and policy are only consistent once it releases this.
        let _g = self.inner.apply.lock().await;
        // Requests a rule matches go to the rule's group, whatever the split.
        if roster::lock(&self.inner.policy).is_some() {
            return Ok(None);
        }
        // A map left filled by an earlier process (one that died between
        // the maps and the weights) still routes what it matches.
        if let Some(dir) = &self.inner.map_dir {
            let api = &self.inner.api;
            for file in routing::loaded_maps(api)
                .await?
                .iter()
                .filter(|f| f.starts_with(dir))
            {
                if !routing::entries(api, file).await?.is_empty() {
                    return Ok(None);
                }
            }
        }
        let current = self.raw_current().await?;
        let st = self.lock_state().clone();
        let mut live = BTreeSet::new();
        for (b, _) in st.iter() {
            // A detour server in rotation carries its instance's traffic,
            // also one a killed run left behind.
            let detour = detour_name(b.id.as_str());
            let serving = [b.id.as_str(), detour.as_str()]
                .iter()
                .filter_map(|n| current.get(*n))
                .any(|s| s.admin() == ServerAdmin::Ready && s.weight > 0);
            if serving {
                live.insert(b.group.clone());
            }
        }
        Ok(if live.len() == 1 {
            live.into_iter().next()
        } else {
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change\n3 app 1 i-1 127.0.0.1 2 8 1 1 1\n3 app 2 i-2 127.0.0.1 2 0 17 1 1\n\n";

    #[test]
    fn servers_state_is_parsed_by_header_names() {
        let s = parse_servers_state(STATE).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].name.as_str(), s[0].admin(), s[0].weight),
            ("i-1", ServerAdmin::Drain, 1)
        );
        assert_eq!(
            (s[1].name.as_str(), s[1].admin(), s[1].weight),
            ("i-2", ServerAdmin::Ready, 17)
        );
        assert_eq!(ServerAdmin::from_bits(0x01 | 0x08), ServerAdmin::Maint);
        assert!(parse_servers_state("garbage").is_err());
    }

    #[test]
    fn stat_csv_is_parsed_by_header_names() {
        let csv = "# pxname,svname,qcur,qmax,scur,smax,\napp,i-1,2,0,5,9,\napp,i-2,,0,0,1,\n\n";
        let rows = parse_stat_csv(csv).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["svname"], "i-1");
        assert_eq!(rows[0]["scur"], "5");
        assert_eq!(rows[0]["qcur"], "2");
        assert_eq!(rows[1]["qcur"], "");
    }

    fn server(name: &str, admin_bits: u32, weight: u32) -> (String, ServerState) {
        let s = ServerState {
            name: name.into(),
            op_state: 2,
            admin_bits,
            weight,
            address: None,
            port: None,
        };
        (name.into(), s)
    }

    #[test]
    fn addresses_and_ports_are_parsed_when_haproxy_reports_them() {
        let s = parse_servers_state(STATE).unwrap();
        assert_eq!((s[0].address.as_deref(), s[0].port), (Some("127.0.0.1"), None));
        let with_port = "1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port\n3 app 1 i-1 ::1 2 0 1 1 5 1 0 1 0 0 0 0 - 18080\n";
        let s = parse_servers_state(with_port).unwrap();
        assert_eq!((s[0].address.as_deref(), s[0].port), (Some("::1"), Some(18080)));
    }

    #[tokio::test]
    async fn a_server_at_another_address_than_its_instance_is_named() {
        let at = |addr: &str, port: Option<u16>| ServerState {
            name: "i-1".into(),
            op_state: 2,
            admin_bits: 0,
            weight: 1,
            address: Some(addr.into()),
            port,
        };
        let b = |a: &str| Backend {
            id: InstanceId::new("i-1").unwrap(),
            address: crate::Address::parse(a).unwrap(),
            group: Group::new("default").unwrap(),
        };
        for (server, backend) in [
            (at("127.0.0.1", Some(8080)), "127.0.0.1:8080"),
            (at("::1", Some(8080)), "[0:0::1]:8080"),
            (at("127.0.0.1", Some(8080)), "localhost:8080"),
            (at("127.0.0.1", None), "127.0.0.1:8080"),
        ] {
            assert_eq!(
                address_mismatch(&server, &b(backend)).await,
                None,
                "{server:?} {backend}"
            );
        }
        for (server, backend, said) in [
            (at("127.0.0.1", Some(8081)), "127.0.0.1:8080", "127.0.0.1:8081"),
            (at("10.0.0.2", Some(8080)), "10.0.0.1:8080", "10.0.0.2:8080"),
            (at("::1", Some(8080)), "127.0.0.1:8080", "[::1]:8080"),
            (at("127.0.0.1", Some(0)), "127.0.0.1:8080", "no port"),
        ] {
            let m = address_mismatch(&server, &b(backend)).await.expect(backend);
            assert!(
                m.contains(said) && m.contains(backend) && m.contains("i-1"),
                "{m}"
            );
            // Only a loopback address can be a fault proxy left by a killed run.
            let ip: std::net::IpAddr = server.address.as_deref().unwrap().parse().unwrap();
            assert_eq!(m.contains("fault proxy"), ip.is_loopback(), "{m}");
        }
    }

    fn want(entries: &[(&str, ServerAdmin, Option<u32>)]) -> BTreeMap<InstanceId, Desired> {
        entries
            .iter()
            .map(|(id, admin, weight)| {
                let d = Desired {
                    admin: *admin,
                    weight: *weight,
                };
                (InstanceId::new(*id).unwrap(), d)
            })
            .collect()
    }

    #[test]
    fn a_change_raises_before_it_lowers_and_sends_only_what_differs() {
        // A switch from blue (b-1) to green (g-1).
        let current = BTreeMap::from([server("b-1", 0, 256), server("g-1", 0x01, 0)]);
        let want = want(&[
            ("b-1", ServerAdmin::Ready, Some(0)),
            ("g-1", ServerAdmin::Ready, Some(256)),
        ]);
        assert_eq!(
            commands_for("app", &want, &current).unwrap(),
            [
                "set server app/g-1 weight 256",
                "set server app/g-1 state ready",
                "set server app/b-1 weight 0",
            ]
        );
        let same = BTreeMap::from([server("b-1", 0, 0), server("g-1", 0, 256)]);
        assert!(commands_for("app", &want, &same).unwrap().is_empty());
        let e = commands_for("app", &want, &BTreeMap::from([server("b-1", 0, 0)])).unwrap_err();
        assert!(
            e.message().contains("HAProxy backend app has no server g-1"),
            "{e}"
        );
    }

    #[test]
    fn a_change_that_did_not_take_is_named_in_words() {
        let want = want(&[
            ("i-1", ServerAdmin::Maint, None),
            ("i-2", ServerAdmin::Ready, Some(7)),
        ]);
        let taken = BTreeMap::from([server("i-1", 0x01, 1), server("i-2", 0, 7)]);
        assert!(check_taken("app", &want, &taken).is_ok());
        let drained = BTreeMap::from([server("i-1", 0x08, 1), server("i-2", 0, 7)]);
        let e = check_taken("app", &want, &drained).unwrap_err();
        assert_eq!(
            e.message(),
            "HAProxy did not take the change: app/i-1 is drain (admin bits 0x8), expected maint"
        );
        let light = BTreeMap::from([server("i-1", 0x01, 1), server("i-2", 0, 3)]);
        let e = check_taken("app", &want, &light).unwrap_err();
        assert!(e.message().contains("app/i-2 has weight 3, expected 7"), "{e}");
    }

    #[test]
    fn socket_words_are_checked() {
        assert!(socket_word("x", "app").is_ok());
        for bad in ["", "a b", "a;b", "a\nb", "a\tb", "a\u{7}"] {
            let e = socket_word("HAProxy backend", bad).unwrap_err();
            assert!(e.message().contains("HAProxy backend"), "{e}");
        }
    }

    /// An experiment's sticky split: refused without a map dir, naming it;
    /// declared with one (the map itself is checked by `preflight_policy`).
    #[test]
    fn a_sticky_split_needs_the_map_dir() {
        let b = Backend {
            id: InstanceId::new("i-1").unwrap(),
            address: crate::Address::parse("127.0.0.1:9").unwrap(),
            group: Group::new("stable").unwrap(),
        };
        let policy = crate::Experiment::default().policy();
        let plain = HaproxyLoadBalancer::builder()
            .socket("/tmp/x.sock")
            .backend(b.clone())
            .build()
            .unwrap();
        let e = plain
            .capabilities()
            .check("haproxy", &policy)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot keep users on one group") && e.contains("set load_balancer.map_dir"),
            "{e}"
        );
        let mapped = HaproxyLoadBalancer::builder()
            .socket("/tmp/x.sock")
            .backend(b)
            .map_dir("/etc/haproxy/dk")
            .build()
            .unwrap();
        mapped.capabilities().check("haproxy", &policy).unwrap();
        assert!(!mapped.capabilities().supports(Capability::Mirror));
    }

    #[test]
    fn builder_names_the_bad_field() {
        let e = HaproxyLoadBalancer::builder().build().unwrap_err().to_string();
        assert!(e.contains("haproxy socket"), "{e}");
        let e = HaproxyLoadBalancer::builder()
            .socket("/tmp/x.sock")
            .backend_name("app;shutdown")
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("haproxy backend"), "{e}");
        let e = HaproxyLoadBalancer::builder()
            .socket("/tmp/x.sock")
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("haproxy backends"), "{e}");
    }

    #[tokio::test]
    async fn command_refuses_line_breaks() {
        let api = RuntimeApi::new("/nonexistent/haproxy.sock", Duration::from_secs(1));
        let e = api.command("show stat\nshutdown").await.unwrap_err();
        assert!(e.message().contains("line break"), "{e}");
    }

    #[test]
    fn object_safe() {
        fn boxed(lb: Box<dyn LoadBalancer>) -> String {
            lb.name().to_string()
        }
        let lb = HaproxyLoadBalancer::builder()
            .socket("/tmp/x.sock")
            .backend(Backend {
                id: InstanceId::new("i-1").unwrap(),
                address: crate::names::Address::parse("127.0.0.1:1").unwrap(),
                group: Group::default_group(),
            })
            .build()
            .unwrap();
        assert_eq!(boxed(Box::new(lb)), "haproxy");
    }
}
