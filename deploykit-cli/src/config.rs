//! `deploykit.toml`: what it holds, how it is read, and every check made
//! before anything is touched. The fields are documented in
//! `docs/configuration.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use deploykit::{
    Address, BlueGreen, Canary, DarkLaunch, Experiment, Group, InstanceId, Ramped, Recreate, Rolling, Shadow,
    SmokeCheck,
};
use serde::{Deserialize, Deserializer};

/// A duration written `"30s"`, `"500ms"`, `"5m"`, `"1h"` or a number of
/// seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dur(pub(crate) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        deploykit::duration_text::deserialize(d).map(Dur)
    }
}

/// A duration whose error waits for the semantic checks: the fields of an
/// `[[instances]]` table are flattened, and serde's flatten loses the key a
/// value's error belongs to, so the check names it (`instances[0].stop_grace`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LateDur(Result<Duration, String>);

impl<'de> Deserialize<'de> for LateDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(LateDur(
            deploykit::duration_text::deserialize(d).map_err(|e: D::Error| e.to_string().trim().to_string()),
        ))
    }
}

impl LateDur {
    /// The duration, or its error named `field`.
    fn get(&self, field: String) -> deploykit::Result<Duration> {
        self.0.clone().map_err(|m| inv(field, m))
    }
}

fn d(secs: u64) -> Dur {
    Dur(Duration::from_secs(secs))
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    pub(crate) app: String,
    #[serde(default)]
    pub(crate) state_dir: Option<String>,
    #[serde(default)]
    pub(crate) releases: Option<String>,
    #[serde(default)]
    pub(crate) instance_defaults: InstanceFields,
    #[serde(default)]
    pub(crate) instances: Vec<InstanceConfig>,
    #[serde(default)]
    pub(crate) load_balancer: LoadBalancerConfig,
    #[serde(default)]
    pub(crate) metrics: Option<MetricsConfig>,
    #[serde(default)]
    pub(crate) strategy: StrategyConfig,
    #[serde(default)]
    pub(crate) smoke_checks: Option<Vec<SmokeCheckConfig>>,
    #[serde(default)]
    pub(crate) notifications: NotificationsConfig,
    #[serde(default)]
    pub(crate) flags: FlagsConfig,
    #[serde(default)]
    pub(crate) timeouts: TimeoutsConfig,
    #[serde(default)]
    pub(crate) retry: RetryConfig,
    /// `[gitops]`: what `deploykit watch` follows (docs/gitops.md).
    #[serde(default)]
    pub(crate) gitops: Option<crate::gitops::GitopsConfig>,
    /// `[state]`: where the lock, journals, live record and control
    /// channel live (docs/state.md).
    #[serde(default)]
    pub(crate) state: StateConfig,
    /// `[[regions]]`: fleets of their own, deployed in waves
    /// (docs/regions.md); empty for a file of one fleet.
    #[serde(default)]
    pub(crate) regions: Vec<RegionConfig>,
    /// `[rollout]`: the waves and gates of the regions.
    #[serde(default)]
    pub(crate) rollout: Option<deploykit::regions::Rollout>,
}

/// Where the deployment state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StateBackendKind {
    /// Files in `state_dir` on this machine.
    #[default]
    Local,
    /// etcd, shared by every machine with this configuration.
    Etcd,
}

/// `[state]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StateConfig {
    #[serde(default)]
    pub(crate) backend: StateBackendKind,
    /// etcd: the members, `http://host:port`.
    #[serde(default)]
    pub(crate) endpoints: Vec<String>,
    /// etcd: the key prefix (`/deploykit`).
    #[serde(default)]
    pub(crate) prefix: Option<String>,
    /// etcd: the lock's lease (`15s`).
    #[serde(default)]
    pub(crate) lock_ttl: Option<Dur>,
    /// etcd: how long one request may take (`5s`).
    #[serde(default)]
    pub(crate) request_timeout: Option<Dur>,
    /// etcd: the user to authenticate as.
    #[serde(default)]
    pub(crate) username: Option<String>,
    /// etcd: the environment variable holding the user's password (never
    /// the password itself in the file).
    #[serde(default)]
    pub(crate) password_env: Option<String>,
    /// etcd over TLS: the CA certificates (PEM) that signed the members'.
    #[serde(default)]
    pub(crate) ca_file: Option<String>,
    /// etcd over TLS: this client's certificate (PEM), with `key_file`.
    #[serde(default)]
    pub(crate) cert_file: Option<String>,
    /// etcd over TLS: the private key (PEM) of `cert_file`.
    #[serde(default)]
    pub(crate) key_file: Option<String>,
}

impl StateConfig {
    /// The etcd settings, checked (the password is read from its variable
    /// by [`etcd_password`](Self::etcd_password), not here).
    #[cfg(feature = "etcd")]
    pub(crate) fn etcd(
        &self,
        app: &str,
        password: Option<String>,
        base: &Path,
    ) -> deploykit::Result<deploykit::state::EtcdBackend> {
        deploykit::state::EtcdBackend::new(app, self.etcd_config(password, base)?)
    }

    /// The etcd settings, TLS file paths relative to `base`; nothing read.
    #[cfg(feature = "etcd")]
    fn etcd_config(
        &self,
        password: Option<String>,
        base: &Path,
    ) -> deploykit::Result<deploykit::state::EtcdConfig> {
        let mut c = deploykit::state::EtcdConfig::new(self.endpoints.clone());
        if let Some(p) = &self.prefix {
            c = c.prefix(p.clone());
        }
        if let Some(t) = &self.lock_ttl {
            c = c.lock_ttl(t.0);
        }
        if let Some(t) = &self.request_timeout {
            c = c.request_timeout(t.0);
        }
        if let (Some(u), Some(p)) = (&self.username, password) {
            c = c.user(u.clone(), p);
        }
        let path = |p: &String| {
            let p = Path::new(p);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        match (&self.ca_file, &self.cert_file, &self.key_file) {
            (None, None, None) => {}
            (None, _, _) => {
                return Err(inv(
                    "state.ca_file",
                    "a client certificate is only for TLS: add ca_file, the CA that signed etcd's certificates",
                ))
            }
            (Some(ca), None, None) => c = c.tls(deploykit::state::EtcdTls::new(path(ca))),
            (Some(ca), Some(cert), Some(key)) => {
                c = c.tls(deploykit::state::EtcdTls::new(path(ca)).client_cert(path(cert), path(key)))
            }
            (Some(_), Some(_), None) => {
                return Err(inv(
                    "state.key_file",
                    "state.cert_file is set but not its private key: add key_file = \"/etc/deploykit/etcd-key.pem\"",
                ))
            }
            (Some(_), None, Some(_)) => {
                return Err(inv(
                    "state.cert_file",
                    "state.key_file is set but not its certificate: add cert_file = \"/etc/deploykit/etcd.pem\"",
                ))
            }
        }
        Ok(c)
    }

    /// The password from the variable `password_env` names.
    #[cfg(feature = "etcd")]
    pub(crate) fn etcd_password(&self) -> deploykit::Result<Option<String>> {
        match (&self.username, &self.password_env) {
            (None, None) => Ok(None),
            (Some(_), None) => Err(inv(
                "state.password_env",
                "state.username is set but not where its password is: name the environment variable holding it \
                 (password_env = \"ETCD_PASSWORD\")",
            )),
            (None, Some(_)) => Err(inv(
                "state.username",
                "state.password_env is set but not the user: add username = \"deployer\"",
            )),
            (Some(_), Some(var)) => std::env::var(var).map(Some).map_err(|_| {
                inv(
                    "state.password_env",
                    format!("the environment variable {} is not set (or not UTF-8); export the etcd password in it", var.escape_default()),
                )
            }),
        }
    }
}

/// The checks of `[state]`: its keys fit its backend.
fn check_state(c: &Config) -> deploykit::Result<()> {
    let s = &c.state;
    match s.backend {
        StateBackendKind::Local => {
            let etcd_only = [
                ("state.endpoints", !s.endpoints.is_empty()),
                ("state.prefix", s.prefix.is_some()),
                ("state.lock_ttl", s.lock_ttl.is_some()),
                ("state.request_timeout", s.request_timeout.is_some()),
                ("state.username", s.username.is_some()),
                ("state.password_env", s.password_env.is_some()),
                ("state.ca_file", s.ca_file.is_some()),
                ("state.cert_file", s.cert_file.is_some()),
                ("state.key_file", s.key_file.is_some()),
            ];
            if let Some((field, _)) = etcd_only.iter().find(|(_, set)| *set) {
                return Err(inv(
                    *field,
                    "is an etcd setting, but state.backend is local: add backend = \"etcd\" or remove it",
                ));
            }
            Ok(())
        }
        #[cfg(feature = "etcd")]
        StateBackendKind::Etcd => {
            if let Some(var) = &s.password_env {
                let ok = !var.is_empty() && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
                if !ok {
                    return Err(inv(
                        "state.password_env",
                        "is not an environment variable name: use letters, digits and _",
                    ));
                }
            }
            // Settings only: the password is read when the state is used,
            // the TLS files once the file's directory is known.
            deploykit::names::validate_name("app", &c.app)?;
            s.etcd_config(None, Path::new("."))?.validate()
        }
        #[cfg(not(feature = "etcd"))]
        StateBackendKind::Etcd => Err(inv(
            "state.backend",
            "this deploykit was built without the etcd feature: rebuild with `--features etcd`, or use backend = \"local\"",
        )),
    }
}

/// One `[[regions]]` entry: a fleet with its own instances, load balancer
/// and (optionally) metrics and strategy; every other section is the
/// file's.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegionConfig {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) instances: Vec<InstanceConfig>,
    #[serde(default)]
    pub(crate) load_balancer: LoadBalancerConfig,
    /// Replaces the file's `[metrics]` for this region.
    #[serde(default)]
    pub(crate) metrics: Option<MetricsConfig>,
    /// Replaces the file's `[strategy]` as a whole for this region.
    #[serde(default)]
    pub(crate) strategy: Option<StrategyConfig>,
}

/// Fields an instance may set, or inherit from `[instance_defaults]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstanceFields {
    pub(crate) group: Option<String>,
    pub(crate) host: Option<String>,
    pub(crate) root: Option<String>,
    pub(crate) command: Option<Vec<String>>,
    pub(crate) env: Option<BTreeMap<String, String>>,
    pub(crate) systemd_unit: Option<String>,
    pub(crate) systemd_user: Option<bool>,
    pub(crate) sudo: Option<bool>,
    pub(crate) simulated: Option<bool>,
    pub(crate) simulate_unhealthy: Option<Vec<String>>,
    pub(crate) stop_grace: Option<LateDur>,
    pub(crate) health: Option<HealthKind>,
    pub(crate) health_path: Option<String>,
    pub(crate) health_status: Option<u16>,
    pub(crate) keep_releases: Option<usize>,
    pub(crate) ssh_key: Option<String>,
    pub(crate) ssh_known_hosts: Option<String>,
    pub(crate) health_timeout: Option<LateDur>,
    pub(crate) health_body_contains: Option<String>,
    pub(crate) ssh_timeout: Option<LateDur>,
    pub(crate) ssh_connect_timeout: Option<LateDur>,
    pub(crate) ssh_gzip: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum HealthKind {
    Http,
    Service,
}

/// One `[[instances]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct InstanceConfig {
    pub(crate) id: String,
    pub(crate) address: String,
    #[serde(flatten)]
    pub(crate) fields: InstanceFields,
}

/// Where an instance's commands run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum HostSpec {
    Local,
    Ssh { user: String, host: String, port: u16 },
}

/// How an instance's application runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Control {
    Process {
        command: Vec<String>,
        env: BTreeMap<String, String>,
        grace: Duration,
    },
    Systemd {
        unit: String,
        user: bool,
        sudo: bool,
    },
    Simulated {
        unhealthy: Vec<String>,
    },
}

/// An instance after defaults and checks.
#[derive(Debug, Clone)]
pub(crate) struct Instance {
    pub(crate) id: InstanceId,
    pub(crate) address: Address,
    pub(crate) group: Group,
    pub(crate) host: HostSpec,
    pub(crate) root: Option<String>,
    pub(crate) control: Control,
    pub(crate) health: HealthKind,
    pub(crate) health_path: String,
    pub(crate) health_status: u16,
    pub(crate) keep_releases: usize,
    pub(crate) ssh_key: Option<PathBuf>,
    pub(crate) ssh_known_hosts: Option<PathBuf>,
    /// One HTTP health probe's bound (the probe's default when unset).
    pub(crate) health_timeout: Option<Duration>,
    /// Text a healthy answer's body must contain.
    pub(crate) health_body_contains: Option<String>,
    /// SSH: one remote command's bound, the connection's bound, gzip.
    pub(crate) ssh_timeout: Option<Duration>,
    pub(crate) ssh_connect_timeout: Option<Duration>,
    pub(crate) ssh_gzip: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum LbKind {
    #[default]
    None,
    Nginx,
    Haproxy,
    Symlink,
    Simulated,
    /// An Istio VirtualService (feature `kubernetes`).
    Istio,
    /// A Gateway API HTTPRoute (feature `kubernetes`).
    #[serde(rename = "gateway-api")]
    GatewayApi,
}

impl fmt::Display for LbKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LbKind::None => "none",
            LbKind::Nginx => "nginx",
            LbKind::Haproxy => "haproxy",
            LbKind::Symlink => "symlink",
            LbKind::Simulated => "simulated",
            LbKind::Istio => "istio",
            LbKind::GatewayApi => "gateway-api",
        })
    }
}

/// `[load_balancer]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoadBalancerConfig {
    #[serde(default)]
    pub(crate) kind: LbKind,
    /// nginx: the upstream include file deploykit owns.
    pub(crate) include_file: Option<String>,
    /// nginx: the location-level include deploykit owns; turns on routing
    /// policies (header/cookie/query rules, sticky splits, mirroring).
    pub(crate) location_include: Option<String>,
    /// nginx: the main configuration (`nginx -c`), when not the default.
    pub(crate) nginx_config: Option<String>,
    /// nginx: the master's pid file (default `/run/nginx.pid`).
    pub(crate) pid_file: Option<String>,
    /// nginx: the prefix directory (`nginx -p`), when not the default.
    pub(crate) nginx_prefix: Option<String>,
    /// nginx: the upstream's name (default `app`).
    pub(crate) upstream: Option<String>,
    /// nginx: the nginx binary (default `nginx`).
    pub(crate) nginx_binary: Option<String>,
    /// nginx: how a drain takes an instance out, `"reload"` (default) or
    /// `"upstream-retry"` (no reload; see `docs/load-balancers.md`).
    pub(crate) drain: Option<deploykit::lb::nginx::DrainMode>,
    /// haproxy: the runtime API socket.
    pub(crate) socket: Option<String>,
    /// haproxy: the directory of the routing map files deploykit owns;
    /// turns on header/cookie/query rules.
    pub(crate) map_dir: Option<String>,
    /// haproxy: the backend's name.
    pub(crate) backend: Option<String>,
    /// symlink: the `live` link.
    pub(crate) link: Option<String>,
    /// symlink: the directory the link points into, per environment.
    pub(crate) targets: Option<BTreeMap<String, String>>,
    /// nginx: how long a reload may take to be confirmed.
    pub(crate) reload_timeout: Option<Dur>,
    /// nginx: render idle groups as `backup` servers instead of `down`.
    pub(crate) idle_groups_as_backup: Option<bool>,
    /// haproxy: one runtime-API exchange's bound.
    pub(crate) timeout: Option<Dur>,
    /// nginx: bound of nginx's wait for the shadow on a mirrored copy.
    pub(crate) mirror_timeout: Option<Dur>,
    /// haproxy: how long enabling a server waits for HAProxy's health
    /// check to report it up.
    pub(crate) up_timeout: Option<Dur>,
    /// istio, gateway-api: the object's namespace.
    pub(crate) namespace: Option<String>,
    /// istio, gateway-api: the VirtualService's or HTTPRoute's name.
    pub(crate) resource: Option<String>,
    /// istio, gateway-api: the managed route's (rule's) name (default
    /// `deploykit`).
    pub(crate) route: Option<String>,
    /// istio, gateway-api: the kubeconfig file (default: kube's standard
    /// resolution, then in-cluster).
    pub(crate) kubeconfig: Option<String>,
    /// istio, gateway-api: the kubeconfig context.
    pub(crate) context: Option<String>,
    /// istio, gateway-api: each group's Service.
    pub(crate) services: Option<BTreeMap<String, KubeServiceConfig>>,
}

/// `[load_balancer.services.<group>]`: where a group's traffic goes on
/// Kubernetes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
// Read only by the Kubernetes driver's wiring; still parsed without it.
#[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
pub(crate) struct KubeServiceConfig {
    /// The Service name (Istio `destination.host`, Gateway API
    /// `backendRef.name`).
    pub(crate) service: String,
    /// The Service port (required for gateway-api).
    pub(crate) port: Option<u16>,
    /// istio: the DestinationRule subset.
    pub(crate) subset: Option<String>,
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MetricsConfig {
    pub(crate) prometheus: deploykit::SecretUrl,
    pub(crate) error_rate: Option<String>,
    pub(crate) latency_p99: Option<String>,
    pub(crate) request_count: Option<String>,
    pub(crate) error_count: Option<String>,
    pub(crate) latency_buckets: Option<String>,
    pub(crate) timeout: Option<Dur>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum StrategyKind {
    #[default]
    Rolling,
    BlueGreen,
    Canary,
    Recreate,
    Ramped,
    Shadow,
    DarkLaunch,
    Experiment,
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StrategyKind::Rolling => "rolling",
            StrategyKind::BlueGreen => "blue-green",
            StrategyKind::Canary => "canary",
            StrategyKind::Recreate => "recreate",
            StrategyKind::Ramped => "ramped",
            StrategyKind::Shadow => "shadow",
            StrategyKind::DarkLaunch => "dark-launch",
            StrategyKind::Experiment => "experiment",
        })
    }
}

/// `[strategy]`: the kind, and each strategy's section read straight into
/// the library's type (its serde form is the section).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StrategyConfig {
    #[serde(default)]
    pub(crate) kind: StrategyKind,
    #[serde(default)]
    pub(crate) rolling: Rolling,
    #[serde(default, rename = "blue-green")]
    pub(crate) blue_green: BlueGreen,
    #[serde(default)]
    pub(crate) canary: Canary,
    #[serde(default)]
    pub(crate) recreate: Recreate,
    #[serde(default)]
    pub(crate) ramped: Ramped,
    #[serde(default)]
    pub(crate) shadow: Shadow,
    #[serde(default, rename = "dark-launch")]
    pub(crate) dark_launch: DarkLaunch,
    #[serde(default)]
    pub(crate) experiment: ExperimentConfig,
}

/// `[strategy.experiment]`: the A/B experiment's own keys; groups,
/// guardrails and health come from `[strategy.canary]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ExperimentConfig {
    /// The users on the treatment (the new release), 1-99 percent; not
    /// with `treatments`.
    pub(crate) treatment_percent: Option<u8>,
    /// `[[strategy.experiment.treatments]]`: several treatments, each a
    /// group with its release and percent.
    pub(crate) treatments: Vec<deploykit::strategy::Treatment>,
    /// What keeps a user on one variant.
    pub(crate) sticky: deploykit::routing::Sticky,
    /// The longest the experiment runs before "no significant difference".
    pub(crate) duration: Dur,
    /// The significance: most chance of a winner between equal variants.
    pub(crate) alpha: f64,
    /// The smallest difference of conversion rates worth detecting.
    pub(crate) min_detectable_effect: f64,
    /// Visits each variant needs before any decision.
    pub(crate) min_samples: u64,
    /// What "no significant difference" at the end does.
    pub(crate) on_no_difference: deploykit::experiment::NoDifference,
    /// PromQL of a variant's visits, with `{group}` and `{window}`.
    pub(crate) visits: Option<String>,
    /// PromQL of a variant's conversions, with `{group}` and `{window}`.
    pub(crate) conversions: Option<String>,
}

impl Default for ExperimentConfig {
    fn default() -> Self {
        let lib = Experiment::default();
        Self {
            treatment_percent: None,
            treatments: Vec::new(),
            sticky: lib.sticky,
            duration: Dur(lib.duration),
            alpha: lib.rules.alpha,
            min_detectable_effect: lib.rules.min_detectable_effect,
            min_samples: lib.rules.min_samples,
            on_no_difference: lib.rules.on_no_difference,
            visits: None,
            conversions: None,
        }
    }
}

/// One `[[smoke_checks]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SmokeCheckConfig {
    pub(crate) path: String,
    #[serde(default = "default_status")]
    pub(crate) status: u16,
    #[serde(default)]
    pub(crate) body_contains: Option<String>,
    #[serde(default)]
    pub(crate) timeout: Option<Dur>,
}

fn default_status() -> u16 {
    200
}

impl SmokeCheckConfig {
    /// The library's check this entry describes.
    pub(crate) fn to_check(&self) -> SmokeCheck {
        SmokeCheck {
            path: self.path.clone(),
            expect_status: self.status,
            body_contains: self.body_contains.clone(),
            timeout: self.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(5)),
        }
    }
}

impl Config {
    /// The blue-green strategy: `[strategy.blue-green]` with the top-level
    /// `[[smoke_checks]]`, when there are any.
    pub(crate) fn blue_green(&self) -> BlueGreen {
        let mut bg = self.strategy.blue_green.clone();
        if let Some(checks) = &self.smoke_checks {
            bg.smoke_checks = checks.iter().map(SmokeCheckConfig::to_check).collect();
        }
        bg.gates = self.early_gates();
        bg
    }

    /// The canary strategy: `[strategy.canary]` with the before-promotion
    /// gates of `[[gitops.gates]]`.
    pub(crate) fn canary(&self) -> Canary {
        let mut c = self.strategy.canary.clone();
        c.gates = self.early_gates();
        c
    }

    /// `[strategy.ramped]` on top of the canary.
    pub(crate) fn ramped(&self) -> Ramped {
        Ramped {
            base: self.canary(),
            ..self.strategy.ramped.clone()
        }
    }

    /// `[strategy.shadow]` on top of the canary.
    pub(crate) fn shadow(&self) -> Shadow {
        Shadow {
            base: self.canary(),
            ..self.strategy.shadow.clone()
        }
    }

    /// `[strategy.dark-launch]` on top of the canary.
    pub(crate) fn dark_launch(&self) -> DarkLaunch {
        DarkLaunch {
            base: self.canary(),
            ..self.strategy.dark_launch.clone()
        }
    }

    /// `[strategy.experiment]` on top of the canary.
    pub(crate) fn experiment(&self) -> Experiment {
        let e = &self.strategy.experiment;
        Experiment {
            base: self.canary(),
            treatment_percent: e
                .treatment_percent
                .unwrap_or(Experiment::default().treatment_percent),
            treatments: e.treatments.clone(),
            sticky: e.sticky.clone(),
            duration: e.duration.0,
            rules: deploykit::experiment::ExperimentRules {
                alpha: e.alpha,
                min_detectable_effect: e.min_detectable_effect,
                min_samples: e.min_samples,
                on_no_difference: e.on_no_difference,
            },
        }
    }

    /// The names of the `[[gitops.gates]]` that run before promotion.
    fn early_gates(&self) -> Vec<String> {
        self.gitops
            .iter()
            .flat_map(|g| &g.gates)
            .filter(|g| g.when == crate::gitops::GateWhen::BeforePromotion)
            .map(|g| g.name.clone())
            .collect()
    }
}

/// `[flags]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct FlagsConfig {
    /// The flagd flag file, relative to the configuration's directory.
    pub(crate) file: Option<String>,
    /// Flag rollouts: PromQL templates with `{variant}` (and `{window}`);
    /// unset ones fall back to `[metrics]`'s, their `{group}` then being
    /// the variant.
    pub(crate) error_rate: Option<String>,
    pub(crate) latency_p99: Option<String>,
    pub(crate) request_count: Option<String>,
}

/// `[notifications]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct NotificationsConfig {
    pub(crate) timeout: Dur,
    pub(crate) webhooks: Vec<WebhookConfig>,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            timeout: d(5),
            webhooks: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub(crate) enum WebhookFormat {
    #[default]
    Json,
    Slack,
    /// Grafana annotations (`POST /api/annotations`).
    Grafana,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum NotifyOn {
    Start,
    Success,
    Rollback,
    Failure,
    /// A feature flag changed by a kill switch or a flag rollout.
    Flag,
}

/// One `[[notifications.webhooks]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookConfig {
    /// The path of a webhook URL is often its token, so messages show the
    /// host only.
    #[serde(deserialize_with = "webhook_url")]
    pub(crate) url: deploykit::SecretUrl,
    #[serde(default)]
    pub(crate) format: WebhookFormat,
    #[serde(default = "all_events")]
    pub(crate) on: Vec<NotifyOn>,
    /// The environment variable holding a token sent as `Authorization:
    /// Bearer` (a Grafana service account token): kept out of the file.
    #[serde(default)]
    pub(crate) token_env: Option<String>,
}

fn webhook_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<deploykit::SecretUrl, D::Error> {
    Ok(deploykit::SecretUrl::new(String::deserialize(d)?).secret_path())
}

fn all_events() -> Vec<NotifyOn> {
    vec![
        NotifyOn::Start,
        NotifyOn::Success,
        NotifyOn::Rollback,
        NotifyOn::Failure,
        NotifyOn::Flag,
    ]
}

/// `[retry]`: how often the executor tries a driver call that failed with
/// a transient error.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RetryConfig {
    pub(crate) attempts: u32,
    pub(crate) backoff: Dur,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let r = deploykit::Retry::default();
        Self {
            attempts: r.attempts,
            backoff: Dur(r.backoff),
        }
    }
}

/// `[timeouts]`: the executor's per-call bounds.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TimeoutsConfig {
    pub(crate) stop: Dur,
    pub(crate) force_stop: Dur,
    pub(crate) install: Dur,
    pub(crate) restore: Dur,
    pub(crate) start: Dur,
    pub(crate) health_probe: Dur,
    pub(crate) load_balancer: Dur,
    pub(crate) query: Dur,
    pub(crate) drain_poll: Dur,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        let t = deploykit::Timeouts::default();
        Self {
            stop: Dur(t.stop),
            force_stop: Dur(t.force_stop),
            install: Dur(t.install),
            restore: Dur(t.restore),
            start: Dur(t.start),
            health_probe: Dur(t.health_probe),
            load_balancer: Dur(t.load_balancer),
            query: Dur(t.query),
            drain_poll: d(1),
        }
    }
}

/// A configuration error: where, what, and how to fix it.
#[derive(Debug)]
pub(crate) struct ConfigError {
    pub(crate) file: PathBuf,
    /// 1-based line and column, for syntax and type errors.
    pub(crate) at: Option<(usize, usize)>,
    pub(crate) message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((l, c)) => write!(f, "{}:{l}:{c}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A loaded, checked configuration.
#[derive(Debug, Clone)]
pub(crate) struct Loaded {
    pub(crate) path: PathBuf,
    pub(crate) raw: Config,
    pub(crate) instances: Vec<Instance>,
    /// Where relative paths are resolved (the config file's directory).
    pub(crate) base: PathBuf,
    /// The regions of a multi-region file, each loaded as a file of one
    /// fleet; empty otherwise.
    pub(crate) regions: Vec<Region>,
    /// The `[rollout]` of a multi-region file (its defaults when unset).
    pub(crate) rollout: deploykit::regions::Rollout,
}

/// One region of a multi-region file: its name and its fleet's
/// configuration (its own instances, load balancer, metrics and strategy
/// with every other section of the file).
#[derive(Debug, Clone)]
pub(crate) struct Region {
    pub(crate) name: deploykit::regions::RegionName,
    pub(crate) cfg: Loaded,
}

impl Loaded {
    /// `state_dir`, resolved.
    pub(crate) fn state_base(&self) -> PathBuf {
        self.resolve(self.raw.state_dir.as_deref().unwrap_or(".deploykit"))
    }

    /// Checks that strategy `kind`, chosen with `--strategy` instead of the
    /// configured one, fits this file: the checks the configured strategy
    /// got when the file was loaded.
    pub(crate) fn check_strategy(&self, kind: StrategyKind) -> Result<(), ConfigError> {
        let groups: BTreeSet<&Group> = self.instances.iter().map(|i| &i.group).collect();
        check_strategy(&self.raw, kind, &groups).map_err(|e| ConfigError {
            file: self.path.clone(),
            at: None,
            message: format!("--strategy {kind} does not fit this file: {e}"),
        })
    }

    /// What is valid but probably not meant, for strategy `kind`: each a
    /// sentence naming the key.
    pub(crate) fn warnings(&self, kind: StrategyKind) -> Vec<String> {
        let mut out = Vec::new();
        let fleet = self.instances.len();
        if let (StrategyKind::Rolling, deploykit::CountOrPercent::Count(n)) =
            (kind, self.raw.strategy.rolling.batch_size)
        {
            if n > fleet {
                out.push(format!(
                    "strategy.rolling.batch_size is {n}, but the fleet has {fleet} instance(s): \
                     every instance is replaced in one batch, as with batch_size = {fleet}"
                ));
            }
        }
        out
    }

    /// Whether the file has `[[regions]]`.
    pub(crate) fn is_multi_region(&self) -> bool {
        !self.regions.is_empty()
    }

    /// The region called `name`.
    ///
    /// # Errors
    /// Names the configured regions when there is no such region, or the
    /// file has none.
    pub(crate) fn region(&self, name: &str) -> Result<&Region, ConfigError> {
        let err = |message: String| ConfigError {
            file: self.path.clone(),
            at: None,
            message,
        };
        if self.regions.is_empty() {
            return Err(err(format!(
                "--region {name}: this file has no [[regions]]; drop --region"
            )));
        }
        self.regions
            .iter()
            .find(|r| r.name.as_str() == name)
            .ok_or_else(|| {
                err(format!(
                    "--region {name}: no such region; the regions are {}",
                    self.region_names().join(", ")
                ))
            })
    }

    /// The regions' names, in the order they are written.
    pub(crate) fn region_names(&self) -> Vec<&str> {
        self.regions.iter().map(|r| r.name.as_str()).collect()
    }

    /// A path from the file, relative to the file's directory.
    pub(crate) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }
}

/// The largest configuration file read; real ones are a few KiB.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads and checks `path`: a regular file of at most 1 MiB, so a device
/// (`/dev/zero`) or a runaway file cannot exhaust memory.
pub(crate) fn load(path: &Path) -> Result<Loaded, ConfigError> {
    use std::io::Read;
    let refuse = |message: String| ConfigError {
        file: path.to_path_buf(),
        at: None,
        message: format!("{message}; pass another file with --config"),
    };
    let cannot = |e: std::io::Error| refuse(format!("cannot read the configuration: {e}"));
    // Checked before opening too: opening a FIFO would wait for a writer.
    let regular = |m: std::fs::Metadata| {
        m.is_file()
            .then_some(())
            .ok_or_else(|| refuse("the configuration is not a regular file".into()))
    };
    regular(std::fs::metadata(path).map_err(cannot)?)?;
    let file = std::fs::File::open(path).map_err(cannot)?;
    regular(file.metadata().map_err(cannot)?)?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(cannot)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(refuse("the configuration is larger than 1 MiB".into()));
    }
    parse(path, &text)
}

/// Parses and checks `text` (read from `path`).
pub(crate) fn parse(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let raw: Config = toml::from_str(text).map_err(|e| {
        let offset = e.span().map(|s| s.start);
        let message = explain(e.message(), text, offset);
        // A value the type refused gets the key it was given for.
        let key = offset
            .and_then(|o| Some(key_at(toml::de::DeTable::parse(text).ok()?.get_ref(), o)))
            .filter(|k| {
                !k.is_empty() && !message.starts_with("unknown ") && !message.starts_with("missing ")
            });
        ConfigError {
            file: path.to_path_buf(),
            at: offset.map(|o| line_col(text, o)),
            message: match key {
                Some(k) => format!("invalid {k}: {}", strip_invalid(&message)),
                None => message,
            },
        }
    })?;
    let semantic = |e: deploykit::Error| {
        let at = match &e {
            deploykit::Error::InvalidInput { field, .. } => toml::de::DeTable::parse(text)
                .ok()
                .and_then(|doc| locate(doc.get_ref(), field))
                .map(|o| line_col(text, o)),
            _ => None,
        };
        ConfigError {
            file: path.to_path_buf(),
            at,
            message: e.to_string(),
        }
    };
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base = std::fs::canonicalize(&base).unwrap_or(base);
    if raw.regions.is_empty() {
        if raw.rollout.is_some() {
            return Err(semantic(inv(
                "rollout",
                "only a file with [[regions]] has a rollout; add regions or remove [rollout]",
            )));
        }
        let instances = check(&raw).map_err(semantic)?;
        #[cfg(feature = "etcd")]
        if raw.state.backend == StateBackendKind::Etcd {
            // The TLS files are read and checked now, before any command
            // touches anything.
            raw.state.etcd(&raw.app, None, &base).map_err(semantic)?;
        }
        return Ok(Loaded {
            path: path.to_path_buf(),
            raw,
            instances,
            base,
            regions: Vec::new(),
            rollout: Default::default(),
        });
    }
    let (regions, rollout) = check_regions(&raw).map_err(semantic)?;
    let regions = regions
        .into_iter()
        .map(|(name, raw, instances)| Region {
            name,
            cfg: Loaded {
                path: path.to_path_buf(),
                raw,
                instances,
                base: base.clone(),
                regions: Vec::new(),
                rollout: Default::default(),
            },
        })
        .collect::<Vec<_>>();
    Ok(Loaded {
        path: path.to_path_buf(),
        raw,
        instances: regions.iter().flat_map(|r| r.cfg.instances.clone()).collect(),
        base,
        regions,
        rollout,
    })
}

/// A region's fleet as a file of one fleet: the file with the region's
/// instances, load balancer, and metrics and strategy when it has its own.
fn region_config(c: &Config, r: &RegionConfig) -> Config {
    let mut out = c.clone();
    out.instances = r.instances.clone();
    out.load_balancer = r.load_balancer.clone();
    if let Some(m) = &r.metrics {
        out.metrics = Some(m.clone());
    }
    if let Some(s) = &r.strategy {
        out.strategy = s.clone();
    }
    out.regions = Vec::new();
    out.rollout = None;
    // Which regions a commit goes to is the whole file's business: each
    // region keeps `[gitops]` for its before-promotion gates only.
    if let Some(g) = &mut out.gitops {
        for rule in &mut g.branches {
            rule.regions = None;
        }
    }
    out
}

type CheckedRegion = (deploykit::regions::RegionName, Config, Vec<Instance>);

/// The checks of a multi-region file: names, each region as a file of one
/// fleet (its errors named `regions[n].…` where the key is the region's),
/// and the rollout's waves.
fn check_regions(c: &Config) -> deploykit::Result<(Vec<CheckedRegion>, deploykit::regions::Rollout)> {
    use deploykit::regions::RegionName;
    if !c.instances.is_empty() {
        return Err(inv(
            "instances",
            "a file with [[regions]] keeps its instances in each region: move them into [[regions.instances]]",
        ));
    }
    if c.load_balancer.kind != LbKind::None {
        return Err(inv(
            "load_balancer",
            "a file with [[regions]] gives each region its own: move it into [regions.load_balancer]",
        ));
    }
    if c.state.backend != StateBackendKind::Local {
        // Each region keeps its lock and journals in a state directory of
        // its own; sharing them through etcd per region is not built yet.
        return Err(inv(
            "state.backend",
            "a file with [[regions]] keeps its state in a local state directory per region: \
             use backend = \"local\" (remove [state] backend = \"etcd\"), or deploy each region from a file of one fleet with its own [state]",
        ));
    }
    let mut out: Vec<CheckedRegion> = Vec::new();
    for (n, r) in c.regions.iter().enumerate() {
        let name = RegionName::new(&r.name).map_err(|e| rename(e, &format!("regions[{n}].name")))?;
        if out.iter().any(|(o, _, _)| *o == name) {
            return Err(inv(
                format!("regions[{n}].name"),
                format!("{name} is used by an earlier region; give every region its own name"),
            ));
        }
        let own = |field: &str| {
            let first = field.split(['.', '[']).next().unwrap_or("");
            match first {
                "instances" | "load_balancer" => true,
                "metrics" => r.metrics.is_some(),
                "strategy" => r.strategy.is_some(),
                _ => false,
            }
        };
        let cfg = region_config(c, r);
        let instances = check(&cfg).map_err(|e| match e {
            deploykit::Error::InvalidInput { field, message } if own(&field) => {
                inv(format!("regions[{n}].{field}"), message)
            }
            other => other,
        })?;
        out.push((name, cfg, instances));
    }
    let rollout = c.rollout.clone().unwrap_or_default();
    let names: Vec<RegionName> = out.iter().map(|(n, _, _)| n.clone()).collect();
    rollout.waves_for(&names)?;
    if let Some(g) = &c.gitops {
        crate::gitops::check_rule_regions(g, &names)?;
    }
    check_duration("rollout.soak_interval", Dur(rollout.soak_interval))?;
    Ok((out, rollout))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map(|n| before.len() - n)
        .unwrap_or(before.len() + 1);
    (line, col)
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" into a
/// message naming the table and the closest known name.
fn explain(message: &str, text: &str, offset: Option<usize>) -> String {
    let message = message.trim();
    let table = offset.map(|o| enclosing_table(text, o)).unwrap_or_default();
    let place = if table.is_empty() {
        "at the top level".to_string()
    } else {
        format!("in [{table}]")
    };
    for (prefix, what) in [("unknown field `", "field"), ("unknown variant `", "value")] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let Some(end) = rest.find('`') else { break };
            let bad = &rest[..end];
            let expected: Vec<&str> = rest[end..]
                .split('`')
                .skip(2)
                .step_by(2)
                .filter(|s| !s.is_empty())
                .collect();
            let best = expected
                .iter()
                .map(|e| (strsim::jaro_winkler(bad, e), *e))
                .filter(|(score, _)| *score > 0.8)
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let hint = match best {
                Some((_, e)) => format!("did you mean `{e}`?"),
                None => format!("expected one of: {}", expected.join(", ")),
            };
            return format!("unknown {what} `{bad}` {place}; {hint}");
        }
    }
    if message.starts_with("missing field") {
        return format!("{message} {place}");
    }
    message.to_string()
}

/// `message` without a leading `invalid <name>: ` (a library type naming
/// itself), which the key replaces; serde's own "invalid type: …" and
/// "invalid value: …" stay whole.
fn strip_invalid(message: &str) -> &str {
    match message.strip_prefix("invalid ").and_then(|r| r.split_once(": ")) {
        Some((name, rest)) if !name.contains(' ') && !["type", "value", "length"].contains(&name) => rest,
        _ => message,
    }
}

/// One step of a key path: a key in a table or an index in an array.
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// `strategy.canary.stages[1]` as its steps; `None` for anything that is
/// not a key path.
fn segments(path: &str) -> Option<Vec<Seg<'_>>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        if key.is_empty() {
            return None;
        }
        out.push(Seg::Key(key));
        while !rest.is_empty() {
            let (n, after) = rest.split_once(']')?;
            out.push(Seg::Index(n.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(out)
}

/// Where the key `path` (e.g. `instances[1].id`) is written: the byte
/// offset of its key, or of the nearest enclosing key or array element
/// that is written when it is not (a default, a missing field).
fn locate(doc: &toml::de::DeTable<'_>, path: &str) -> Option<usize> {
    use toml::de::DeValue;
    let mut table = Some(doc);
    let mut value: Option<&DeValue<'_>> = None;
    let mut found = None;
    for seg in segments(path)? {
        let next = match (seg, table, value) {
            (Seg::Key(k), Some(t), _) => t
                .iter()
                .find(|(key, _)| key.get_ref() == k)
                .map(|(key, v)| (key.span().start, v.get_ref())),
            (Seg::Index(i), _, Some(DeValue::Array(a))) => a.get(i).map(|v| (v.span().start, v.get_ref())),
            _ => None,
        };
        let Some((at, v)) = next else { break };
        found = Some(at);
        value = Some(v);
        table = match v {
            DeValue::Table(t) => Some(t),
            _ => None,
        };
    }
    found
}

/// The key path of the innermost key or value written at `offset`, e.g.
/// `strategy.canary.stages[1]`; empty when none is.
fn key_at(doc: &toml::de::DeTable<'_>, offset: usize) -> String {
    use toml::de::DeValue;
    fn walk(v: &DeValue<'_>, offset: usize, path: &mut String) -> bool {
        match v {
            DeValue::Table(t) => {
                for (k, v) in t.iter() {
                    let len = path.len();
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(k.get_ref());
                    if walk(v.get_ref(), offset, path)
                        || k.span().contains(&offset)
                        || (v.span().contains(&offset) && !v.get_ref().is_table())
                    {
                        return true;
                    }
                    path.truncate(len);
                }
                false
            }
            DeValue::Array(a) => {
                for (n, e) in a.iter().enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{n}]"));
                    if walk(e.get_ref(), offset, path) || e.span().contains(&offset) {
                        return true;
                    }
                    path.truncate(len);
                }
                false
            }
            _ => false,
        }
    }
    let mut path = String::new();
    walk(&DeValue::Table(doc.clone()), offset, &mut path);
    path
}

/// The `[table]` or `[[table]]` header above `offset`.
fn enclosing_table(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string())
        .unwrap_or_default()
}

fn inv(field: impl Into<String>, message: impl Into<String>) -> deploykit::Error {
    deploykit::Error::invalid(field, message)
}

fn check_duration(field: &str, d: Dur) -> deploykit::Result<()> {
    if d.0.is_zero() {
        return Err(inv(field, "is 0; give a positive duration such as \"10s\""));
    }
    Ok(())
}

/// The semantic checks: names, uniqueness, addresses, paths, per-strategy
/// parameters and the fields that belong to the chosen load balancer.
fn check(c: &Config) -> deploykit::Result<Vec<Instance>> {
    deploykit::names::validate_name("app", &c.app)?;
    if c.instances.is_empty() {
        return Err(inv(
            "instances",
            "no instances; add at least one [[instances]] table with an id and an address",
        ));
    }
    let defaults = &c.instance_defaults;
    for (name, d) in [
        ("stop_grace", &defaults.stop_grace),
        ("health_timeout", &defaults.health_timeout),
        ("ssh_timeout", &defaults.ssh_timeout),
        ("ssh_connect_timeout", &defaults.ssh_connect_timeout),
    ] {
        if let Some(d) = d {
            d.get(format!("instance_defaults.{name}"))?;
        }
    }
    let mut ids = BTreeSet::new();
    let mut addresses = BTreeMap::new();
    let mut out = Vec::new();
    for (n, i) in c.instances.iter().enumerate() {
        let f = |name: &str| format!("instances[{n}].{name}");
        let id = InstanceId::new(&i.id).map_err(|e| rename(e, &f("id")))?;
        if !ids.insert(id.clone()) {
            return Err(inv(
                f("id"),
                format!("{id} is used by an earlier instance; give every instance its own id"),
            ));
        }
        let address = Address::parse(&i.address).map_err(|e| rename(e, &f("address")))?;
        let endpoints = address.endpoints();
        if let Some((written, other)) = endpoints.iter().find_map(|e| addresses.get(e)) {
            let as_written = if *written == address {
                String::new()
            } else {
                format!(" (written {written})")
            };
            return Err(inv(
                f("address"),
                format!("{address} is also the address of {other}{as_written}; every instance needs its own address"),
            ));
        }
        for e in endpoints {
            addresses.insert(e, (address.clone(), id.clone()));
        }
        out.push(instance(c, n, id, address, &i.fields)?);
    }
    check_roots(c, &out)?;
    let groups: BTreeSet<&Group> = out.iter().map(|i| &i.group).collect();
    check_lb(c)?;
    if let Some(checks) = &c.smoke_checks {
        for (n, sc) in checks.iter().enumerate() {
            sc.to_check().validate(&format!("smoke_checks[{n}]"))?;
        }
    }
    check_strategy(c, c.strategy.kind, &groups)?;
    check_state(c)?;
    if let Some(g) = &c.gitops {
        crate::gitops::check(g, c)?;
        for (n, rule) in g.branches.iter().enumerate() {
            check_strategy(c, rule.strategy, &groups).map_err(|e| {
                inv(
                    format!("gitops.branches[{n}].strategy"),
                    format!("{} does not fit this file: {e}", rule.strategy),
                )
            })?;
        }
    }
    if let Some(m) = &c.metrics {
        let url = m.prometheus.expose();
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.len() > "https://".len()
            && !url.chars().any(char::is_whitespace);
        if !ok {
            return Err(inv(
                "metrics.prometheus",
                format!(
                    "\"{}\" is not an http(s) URL; write e.g. \"http://127.0.0.1:9090\"",
                    m.prometheus
                ),
            ));
        }
        for (name, q) in [
            ("error_rate", &m.error_rate),
            ("latency_p99", &m.latency_p99),
            ("request_count", &m.request_count),
            ("error_count", &m.error_count),
            ("latency_buckets", &m.latency_buckets),
        ] {
            if let Some(q) = q {
                deploykit::metrics::QueryTemplate::parse(&format!("metrics.{name}"), q)?;
            }
        }
        if let Some(t) = m.timeout {
            check_duration("metrics.timeout", t)?;
        }
    }
    let e = &c.strategy.experiment;
    for (name, q) in [("visits", &e.visits), ("conversions", &e.conversions)] {
        if let Some(q) = q {
            deploykit::metrics::QueryTemplate::parse(&format!("strategy.experiment.{name}"), q)?;
        }
    }
    for (n, w) in c.notifications.webhooks.iter().enumerate() {
        let url = w.url.expose();
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && !url.chars().any(char::is_whitespace);
        if !ok {
            return Err(inv(
                format!("notifications.webhooks[{n}].url"),
                format!(
                    "\"{}\" is not an http(s) URL; write e.g. \"https://hooks.example.com/deploys\"",
                    w.url
                ),
            ));
        }
        if let Some(var) = &w.token_env {
            let ok = !var.is_empty()
                && !var.starts_with(|c: char| c.is_ascii_digit())
                && var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(inv(
                    format!("notifications.webhooks[{n}].token_env"),
                    format!(
                        "\"{}\" is not an environment variable name; write e.g. \"GRAFANA_TOKEN\" (letters, digits, _)",
                        var.escape_default()
                    ),
                ));
            }
        }
        if w.on.is_empty() {
            return Err(inv(
                format!("notifications.webhooks[{n}].on"),
                "is empty; list some of start, success, rollback, failure (or omit it for all)",
            ));
        }
    }
    check_duration("notifications.timeout", c.notifications.timeout)?;
    let t = &c.timeouts;
    for (name, v) in [
        ("stop", t.stop),
        ("force_stop", t.force_stop),
        ("install", t.install),
        ("restore", t.restore),
        ("start", t.start),
        ("health_probe", t.health_probe),
        ("load_balancer", t.load_balancer),
        ("query", t.query),
        ("drain_poll", t.drain_poll),
    ] {
        check_duration(&format!("timeouts.{name}"), v)?;
    }
    if c.retry.attempts == 0 {
        return Err(inv(
            "retry.attempts",
            "is 0; make at least 1 attempt (1 means no retries)",
        ));
    }
    Ok(out)
}

/// The checks of strategy `kind` (the configured one, or one chosen with
/// `--strategy`): its section, the groups it needs, the metrics and the
/// load balancer it drives.
fn check_strategy(c: &Config, kind: StrategyKind, groups: &BTreeSet<&Group>) -> deploykit::Result<()> {
    let s = &c.strategy;
    match kind {
        StrategyKind::Rolling => {
            s.rolling.validate().map_err(in_section("rolling"))?;
            check_duration("strategy.rolling.health_interval", Dur(s.rolling.health.interval))?;
        }
        StrategyKind::Recreate => s.recreate.validate().map_err(in_section("recreate"))?,
        StrategyKind::BlueGreen => {
            let bg = c.blue_green();
            bg.validate().map_err(in_section("blue-green"))?;
            for env in &bg.environments {
                if !groups.contains(&env) {
                    return Err(inv(
                        "instances",
                        format!(
                            "no instance is in the environment {env}; blue-green needs instances with group = \"{}\" and group = \"{}\"",
                            bg.environments[0], bg.environments[1]
                        ),
                    ));
                }
            }
            if let Some(g) = groups.iter().find(|g| !bg.environments.contains(g)) {
                return Err(inv(
                    "instances",
                    format!(
                        "the group {g} is neither {} nor {}; under blue-green every instance belongs to one environment",
                        bg.environments[0], bg.environments[1]
                    ),
                ));
            }
            if c.load_balancer.kind == LbKind::None {
                return Err(inv(
                    "load_balancer.kind",
                    "is none, but blue-green switches traffic; choose nginx, haproxy, symlink or simulated",
                ));
            }
        }
        StrategyKind::Canary
        | StrategyKind::Ramped
        | StrategyKind::Shadow
        | StrategyKind::DarkLaunch
        | StrategyKind::Experiment => {
            let canary = &s.canary;
            canary.validate().map_err(in_section("canary"))?;
            // Network faults go through a fault proxy the balancer is
            // pointed at; only these drivers can point a backend elsewhere.
            let proxied = [LbKind::Nginx, LbKind::Haproxy, LbKind::Simulated];
            if let Some((i, spec)) = canary
                .chaos
                .iter()
                .enumerate()
                .find(|(_, c)| !c.fault.is_process_fault())
            {
                if !proxied.contains(&c.load_balancer.kind) {
                    return Err(inv(
                        format!("strategy.canary.chaos[{i}].kind"),
                        format!(
                            "\"{}\" is a network fault, injected through a fault proxy the load balancer is pointed at, \
                             but load_balancer.kind \"{}\" cannot point a backend at one; use nginx, haproxy or simulated, \
                             or a process fault (kill, pause)",
                            spec.fault.kind(),
                            c.load_balancer.kind
                        ),
                    ));
                }
            }
            // The routed strategies take groups, analysis and health from
            // [strategy.canary], checked above; what is left is their own.
            match kind {
                StrategyKind::Ramped => c.ramped().validate().map_err(in_section("ramped"))?,
                StrategyKind::Shadow => c.shadow().validate().map_err(in_section("shadow"))?,
                StrategyKind::DarkLaunch => c.dark_launch().validate().map_err(in_section("dark-launch"))?,
                StrategyKind::Experiment => {
                    let e = &s.experiment;
                    if e.treatment_percent.is_some() && !e.treatments.is_empty() {
                        return Err(inv(
                            "strategy.experiment.treatment_percent",
                            "is set beside [[strategy.experiment.treatments]]; give each treatment its percent there and remove treatment_percent",
                        ));
                    }
                    c.experiment().validate().map_err(in_section("experiment"))?;
                    if c.metrics.is_none() {
                        return Err(inv(
                            "metrics",
                            "is missing; an experiment decides on visits and conversions read from Prometheus; add [metrics] prometheus = \"http://127.0.0.1:9090\"",
                        ));
                    }
                }
                _ => {}
            }
            // An experiment with several treatments has no canary group:
            // its treatment groups need instances instead.
            let treatments = &s.experiment.treatments;
            if kind == StrategyKind::Experiment && !treatments.is_empty() {
                for (i, t) in treatments.iter().enumerate() {
                    if !groups.contains(&t.group) {
                        return Err(inv(
                            format!("strategy.experiment.treatments[{i}].group"),
                            format!(
                                "no instance is in the group {}; give the treatment's instances group = \"{}\"",
                                t.group, t.group
                            ),
                        ));
                    }
                }
            }
            let needed: Vec<&Group> = if kind == StrategyKind::Experiment && !treatments.is_empty() {
                vec![&canary.stable_group]
            } else {
                vec![&canary.stable_group, &canary.canary_group]
            };
            for g in needed {
                if !groups.contains(g) {
                    return Err(inv(
                        "instances",
                        format!("no instance is in the group {g}; canary needs stable and canary instances (set group = \"{g}\")"),
                    ));
                }
            }
            if c.metrics.is_none() {
                return Err(inv(
                    "metrics",
                    "canary analyses metrics, but there is no [metrics] table; set metrics.prometheus = \"http://host:9090\"",
                ));
            }
            if c.load_balancer.kind == LbKind::None {
                return Err(inv(
                    "load_balancer.kind",
                    "is none, but canary splits traffic by weight; choose nginx, haproxy or simulated",
                ));
            }
        }
    }
    Ok(())
}

fn rename(e: deploykit::Error, field: &str) -> deploykit::Error {
    match e {
        deploykit::Error::InvalidInput { message, .. } => inv(field, message),
        other => other,
    }
}

/// Names a strategy's validation error by the key of its section,
/// `strategy.<section>.<key>`.
fn in_section(section: &str) -> impl Fn(deploykit::Error) -> deploykit::Error + '_ {
    move |e| match e {
        deploykit::Error::InvalidInput { field, message } => inv(
            format!("strategy.{section}.{}", deploykit::strategy::config_key(&field)),
            message,
        ),
        other => other,
    }
}

fn instance(
    c: &Config,
    n: usize,
    id: InstanceId,
    address: Address,
    own: &InstanceFields,
) -> deploykit::Result<Instance> {
    let def = &c.instance_defaults;
    let f = |name: &str| format!("instances[{n}].{name}");
    macro_rules! pick {
        ($field:ident) => {
            own.$field.clone().or_else(|| def.$field.clone())
        };
    }
    // Checked whatever the control, so a bad value is found where it is
    // written even when this instance does not use it.
    let grace = match &own.stop_grace {
        Some(d) => Some(d.get(f("stop_grace"))?),
        None => def
            .stop_grace
            .as_ref()
            .map(|d| d.get("instance_defaults.stop_grace".into()))
            .transpose()?,
    };
    let group =
        Group::new(pick!(group).unwrap_or_else(|| "default".into())).map_err(|e| rename(e, &f("group")))?;
    let host = match pick!(host).as_deref() {
        None | Some("local") => HostSpec::Local,
        Some(h) => parse_ssh(h).map_err(|m| inv(f("host"), m))?,
    };
    let subst = |s: &str| {
        s.replace("{id}", id.as_str())
            .replace("{address}", &address.to_string())
            .replace("{port}", &address.port().to_string())
            .replace("{app}", &c.app)
    };
    // Checked as written, before `subst` fills anything in.
    let placeholders = |field: &str, values: Vec<&String>, late: bool| {
        values
            .into_iter()
            .try_for_each(|v| check_placeholders(&f(field), v, late))
    };
    let command = pick!(command);
    let unit = pick!(systemd_unit);
    placeholders("root", own.root.iter().chain(&def.root).take(1).collect(), false)?;
    placeholders("systemd_unit", unit.iter().collect(), false)?;
    placeholders("command", command.iter().flatten().collect(), true)?;
    placeholders("env", pick!(env).iter().flat_map(|e| e.values()).collect(), true)?;
    let simulated = pick!(simulated).unwrap_or(false);
    let chosen = [command.is_some(), unit.is_some(), simulated]
        .iter()
        .filter(|b| **b)
        .count();
    if chosen != 1 {
        return Err(inv(
            f("command"),
            format!(
                "{} of command, systemd_unit and simulated = true are set for {id}; set exactly one (here or in [instance_defaults])",
                if chosen == 0 { "none" } else { "more than one" }
            ),
        ));
    }
    let control = if let Some(cmd) = command {
        if cmd.is_empty() || cmd[0].is_empty() {
            return Err(inv(
                f("command"),
                "is empty; give the program and its arguments, e.g. [\"./app\", \"--port\", \"{port}\"]",
            ));
        }
        let env = pick!(env).unwrap_or_default();
        for k in env.keys() {
            let ok = k
                .chars()
                .next()
                .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
                && k.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if !ok {
                return Err(inv(
                    f("env"),
                    format!("{k:?} is not a variable name; use [A-Za-z_][A-Za-z0-9_]*"),
                ));
            }
        }
        Control::Process {
            command: cmd.iter().map(|a| subst(a)).collect(),
            env: env.iter().map(|(k, v)| (k.clone(), subst(v))).collect(),
            grace: grace.unwrap_or(deploykit::instance::DEFAULT_GRACE),
        }
    } else if let Some(unit) = unit {
        let unit = subst(&unit);
        deploykit::instance::SystemdUnit::new(&unit).map_err(|e| rename(e, &f("systemd_unit")))?;
        Control::Systemd {
            unit,
            user: pick!(systemd_user).unwrap_or(false),
            sudo: pick!(sudo).unwrap_or(false),
        }
    } else {
        let unhealthy = pick!(simulate_unhealthy).unwrap_or_default();
        for r in &unhealthy {
            deploykit::ReleaseId::new(r).map_err(|e| rename(e, &f("simulate_unhealthy")))?;
        }
        Control::Simulated { unhealthy }
    };
    let root = pick!(root).map(|r| subst(&r));
    if !matches!(control, Control::Simulated { .. }) {
        let Some(root) = &root else {
            return Err(inv(
                f("root"),
                format!("{id} has no root; set the directory of its release layout, e.g. root = \"/srv/{}/{{id}}\"", c.app),
            ));
        };
        if matches!(host, HostSpec::Ssh { .. }) && !root.starts_with('/') {
            return Err(inv(
                f("root"),
                format!("{root:?} is relative; on an SSH host the root must be absolute"),
            ));
        }
        if root.starts_with('/') && root.split('/').all(|p| p.is_empty() || p == ".") {
            return Err(inv(
                f("root"),
                format!(
                    "{root:?} is the filesystem root; give the instance its own directory, e.g. root = \"/srv/{}/{{id}}\"",
                    c.app
                ),
            ));
        }
        if root.split('/').any(|p| p == "..") {
            return Err(inv(
                f("root"),
                format!("{root:?} contains '..'; use a plain path"),
            ));
        }
        if c.releases.is_none() {
            return Err(inv(
                "releases",
                "is not set, but instances install releases from it; set releases = \"builds\" (a directory holding <release-id>/)",
            ));
        }
    }
    let health = pick!(health).unwrap_or(HealthKind::Http);
    let health_path = pick!(health_path).unwrap_or_else(|| "/health".into());
    deploykit::smoke::validate_path(&f("health_path"), &health_path)?;
    let health_status = pick!(health_status).unwrap_or(200);
    if !(100..=599).contains(&health_status) {
        return Err(inv(
            f("health_status"),
            format!("{health_status} is not an HTTP status; use 100-599"),
        ));
    }
    let keep_releases = pick!(keep_releases).unwrap_or(deploykit::instance::DEFAULT_KEEP);
    if keep_releases < 2 {
        return Err(inv(
            f("keep_releases"),
            format!("is {keep_releases}; keep at least 2 so the previous release can be restored"),
        ));
    }
    // The instance's own value, else the default's, each named where written.
    let late = |name: &str, own: &Option<LateDur>, def: &Option<LateDur>| -> deploykit::Result<Option<Dur>> {
        let d = match (own, def) {
            (Some(d), _) => Some((d.get(f(name))?, f(name))),
            (None, Some(d)) => Some((
                d.get(format!("instance_defaults.{name}"))?,
                format!("instance_defaults.{name}"),
            )),
            (None, None) => None,
        };
        match d {
            Some((d, field)) => {
                check_duration(&field, Dur(d))?;
                Ok(Some(Dur(d)))
            }
            None => Ok(None),
        }
    };
    let health_timeout = late("health_timeout", &own.health_timeout, &def.health_timeout)?;
    let ssh_timeout = late("ssh_timeout", &own.ssh_timeout, &def.ssh_timeout)?;
    let ssh_connect_timeout = late(
        "ssh_connect_timeout",
        &own.ssh_connect_timeout,
        &def.ssh_connect_timeout,
    )?;
    let ssh_gzip = pick!(ssh_gzip);
    if !matches!(host, HostSpec::Ssh { .. }) {
        for (name, set) in [
            ("ssh_timeout", ssh_timeout.is_some()),
            ("ssh_connect_timeout", ssh_connect_timeout.is_some()),
            ("ssh_gzip", ssh_gzip.is_some()),
        ] {
            if set {
                return Err(inv(
                    f(name),
                    format!("{id} is not on an SSH host; remove it or set host = \"ssh://user@host\""),
                ));
            }
        }
    }
    Ok(Instance {
        id,
        address,
        group,
        host,
        root,
        control,
        health,
        health_path,
        health_status,
        keep_releases,
        ssh_key: pick!(ssh_key).map(PathBuf::from),
        ssh_known_hosts: pick!(ssh_known_hosts).map(PathBuf::from),
        health_timeout: health_timeout.map(|d| d.0),
        health_body_contains: pick!(health_body_contains),
        ssh_timeout: ssh_timeout.map(|d| d.0),
        ssh_connect_timeout: ssh_connect_timeout.map(|d| d.0),
        ssh_gzip,
    })
}

/// The placeholders the CLI replaces in `root`, `systemd_unit`, `command`
/// and `env`.
const PLACEHOLDERS: [&str; 4] = ["{id}", "{app}", "{address}", "{port}"];

/// The placeholders an instance replaces when it starts, in `command` and
/// `env` only.
const LATE_PLACEHOLDERS: [&str; 3] = ["{release}", "{release_dir}", "{root}"];

/// Refuses a `{name}` in `value` that is no placeholder (`late`: those an
/// instance fills in at start count too); a shell's `${NAME}` is not one.
fn check_placeholders(field: &str, value: &str, late: bool) -> deploykit::Result<()> {
    let known = |p: &str| PLACEHOLDERS.contains(&p) || (late && LATE_PLACEHOLDERS.contains(&p));
    for (open, _) in value.match_indices('{') {
        if value[..open].ends_with('$') {
            continue;
        }
        let after = &value[open + 1..];
        let len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        let name = &after[..len];
        if !after[len..].starts_with('}') || !name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        {
            continue;
        }
        let placeholder = format!("{{{name}}}");
        if !known(&placeholder) {
            let mut names: Vec<&str> = PLACEHOLDERS.to_vec();
            if late {
                names.extend(LATE_PLACEHOLDERS);
            }
            return Err(inv(
                field,
                format!(
                    "{placeholder} in {value:?} is not a placeholder; the known ones here are {}",
                    names.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// `ssh://user@host:port` (port optional, default 22).
fn parse_ssh(h: &str) -> Result<HostSpec, String> {
    // Shown with any `user:password@` hidden: the text may hold a password.
    let bad = || {
        format!(
            "\"{}\" is neither \"local\" nor an SSH URL; write \"ssh://user@host:22\"",
            deploykit::SecretUrl::new(h)
        )
    };
    let rest = h.strip_prefix("ssh://").ok_or_else(bad)?;
    let (user, hostport) = rest.rsplit_once('@').ok_or_else(bad)?;
    if user.contains(':') {
        return Err(format!(
            "\"{}\" holds a password, which deploykit does not use (and would keep in the configuration file); \
             remove it and authenticate with a key (ssh_key) or the SSH agent",
            deploykit::SecretUrl::new(h)
        ));
    }
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => (host, port.parse::<u16>().map_err(|_| bad())?),
        None => (hostport, 22),
    };
    deploykit::names::validate_name("ssh user", user).map_err(|e| e.to_string())?;
    let host_ok = !host.is_empty()
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'));
    if !host_ok || port == 0 {
        return Err(bad());
    }
    Ok(HostSpec::Ssh {
        user: user.into(),
        host: host.into(),
        port,
    })
}

/// No two instances in one release layout (they would share `current` and
/// the pid file).
fn check_roots(c: &Config, instances: &[Instance]) -> deploykit::Result<()> {
    use deploykit::instance::{first_shared_site, LayoutSite};
    let sites = instances.iter().enumerate().filter_map(|(n, i)| {
        let root = i
            .root
            .as_deref()
            .filter(|_| !matches!(i.control, Control::Simulated { .. }))?;
        let site = match &i.host {
            HostSpec::Local => LayoutSite::local(root),
            HostSpec::Ssh { host, port, .. } => LayoutSite::ssh(host, *port, root),
        };
        Some(((n, i, site.machine()), site))
    });
    match first_shared_site(sites) {
        None => Ok(()),
        Some(((_, first, _), (n, second, machine))) => Err(inv(
            format!("instances[{n}].root"),
            format!(
                "{:?} on {machine} is the root of {} too ({:?}); instances in one root share its `current` link and pid file: \
                 give each instance its own root, e.g. root = \"/srv/{}/{{id}}\"",
                second.root.as_deref().unwrap_or_default(),
                first.id,
                first.root.as_deref().unwrap_or_default(),
                c.app
            ),
        )),
    }
}

fn check_lb(c: &Config) -> deploykit::Result<()> {
    let lb = &c.load_balancer;
    const K8S: &[LbKind] = &[LbKind::Istio, LbKind::GatewayApi];
    let fields: [(&str, bool, &[LbKind]); 24] = [
        ("nginx_prefix", lb.nginx_prefix.is_some(), &[LbKind::Nginx]),
        ("include_file", lb.include_file.is_some(), &[LbKind::Nginx]),
        (
            "location_include",
            lb.location_include.is_some(),
            &[LbKind::Nginx],
        ),
        ("nginx_config", lb.nginx_config.is_some(), &[LbKind::Nginx]),
        ("pid_file", lb.pid_file.is_some(), &[LbKind::Nginx]),
        ("upstream", lb.upstream.is_some(), &[LbKind::Nginx]),
        ("nginx_binary", lb.nginx_binary.is_some(), &[LbKind::Nginx]),
        ("drain", lb.drain.is_some(), &[LbKind::Nginx]),
        ("socket", lb.socket.is_some(), &[LbKind::Haproxy]),
        ("map_dir", lb.map_dir.is_some(), &[LbKind::Haproxy]),
        ("backend", lb.backend.is_some(), &[LbKind::Haproxy]),
        ("link", lb.link.is_some(), &[LbKind::Symlink]),
        ("targets", lb.targets.is_some(), &[LbKind::Symlink]),
        ("reload_timeout", lb.reload_timeout.is_some(), &[LbKind::Nginx]),
        (
            "idle_groups_as_backup",
            lb.idle_groups_as_backup.is_some(),
            &[LbKind::Nginx],
        ),
        ("timeout", lb.timeout.is_some(), &[LbKind::Haproxy]),
        ("mirror_timeout", lb.mirror_timeout.is_some(), &[LbKind::Nginx]),
        ("up_timeout", lb.up_timeout.is_some(), &[LbKind::Haproxy]),
        ("namespace", lb.namespace.is_some(), K8S),
        ("resource", lb.resource.is_some(), K8S),
        ("route", lb.route.is_some(), K8S),
        ("kubeconfig", lb.kubeconfig.is_some(), K8S),
        ("context", lb.context.is_some(), K8S),
        ("services", lb.services.is_some(), K8S),
    ];
    for (name, set, kinds) in fields {
        if set && !kinds.contains(&lb.kind) {
            return Err(inv(
                format!("load_balancer.{name}"),
                format!(
                    "belongs to kind = \"{}\", but kind is \"{}\"; remove it or change kind",
                    kinds[0], lb.kind
                ),
            ));
        }
    }
    for (name, v) in [
        ("reload_timeout", lb.reload_timeout),
        ("timeout", lb.timeout),
        ("mirror_timeout", lb.mirror_timeout),
        ("up_timeout", lb.up_timeout),
    ] {
        if let Some(v) = v {
            check_duration(&format!("load_balancer.{name}"), v)?;
        }
    }
    let need = |name: &str, v: &Option<String>, example: &str| match v {
        Some(s) if !s.is_empty() => Ok(()),
        _ => Err(inv(
            format!("load_balancer.{name}"),
            format!(
                "is required for kind = \"{}\"; e.g. {name} = \"{example}\"",
                lb.kind
            ),
        )),
    };
    match lb.kind {
        LbKind::Nginx => {
            need(
                "include_file",
                &lb.include_file,
                "/etc/nginx/conf.d/app-upstream.conf",
            )?;
        }
        LbKind::Haproxy => {
            need("socket", &lb.socket, "/run/haproxy/admin.sock")?;
        }
        LbKind::Symlink => need("link", &lb.link, "/srv/app/live")?,
        LbKind::Istio | LbKind::GatewayApi => {
            if !cfg!(feature = "kubernetes") {
                return Err(inv(
                    "load_balancer.kind",
                    format!(
                        "\"{}\" needs a deploykit built with the `kubernetes` feature (the default); \
                         rebuild with --features kubernetes",
                        lb.kind
                    ),
                ));
            }
            need("namespace", &lb.namespace, "shop")?;
            need("resource", &lb.resource, "web")?;
            let services = lb.services.as_ref().filter(|s| !s.is_empty()).ok_or_else(|| {
                inv(
                    "load_balancer.services",
                    format!(
                        "is required for kind = \"{}\": map each group to its Service, e.g. \
                         services.stable = {{ service = \"web-stable\", port = 8080 }}",
                        lb.kind
                    ),
                )
            })?;
            for group in services.keys() {
                deploykit::Group::new(group.as_str()).map_err(|e| match e {
                    deploykit::Error::InvalidInput { message, .. } => {
                        inv(format!("load_balancer.services.{group}"), message)
                    }
                    other => other,
                })?;
            }
            #[cfg(feature = "kubernetes")]
            crate::wire::kubernetes_driver(lb, None)?;
        }
        LbKind::None | LbKind::Simulated => {}
    }
    for (name, v) in [("upstream", &lb.upstream), ("backend", &lb.backend)] {
        if let Some(v) = v {
            deploykit::names::validate_name(&format!("load_balancer.{name}"), v)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column() {
        assert_eq!(line_col("ab\ncd\nef", 4), (2, 2));
        assert_eq!(line_col("abc", 0), (1, 1));
    }

    #[test]
    fn key_paths_and_where_they_are_written() {
        let text = "app = \"a\"\n[[instances]]\nid = \"x\"\n[[instances]]\nid = \"y\"\n\
                    [strategy.canary]\nstages = [5, 50, 25]\n";
        let doc = toml::de::DeTable::parse(text).unwrap();
        let doc = doc.get_ref();
        let at = |path: &str| locate(doc, path).map(|o| line_col(text, o));
        assert_eq!(at("instances[1].id"), Some((5, 1)));
        assert_eq!(at("strategy.canary.stages[2]"), Some((7, 18)));
        // Not written: the nearest enclosing key that is.
        assert_eq!(at("instances[1].address"), at("instances[1]"));
        assert_eq!(at("strategy.canary.window"), Some((6, 11)));
        assert_eq!(at("metrics.prometheus"), None);
        assert_eq!(at("not a path["), None);
        let offset = text.find("50").unwrap();
        assert_eq!(key_at(doc, offset), "strategy.canary.stages[1]");
        assert_eq!(key_at(doc, text.find("\"y\"").unwrap()), "instances[1].id");
        assert_eq!(key_at(doc, text.find("app").unwrap()), "app");
    }

    #[test]
    fn a_library_type_naming_itself_gives_way_to_the_key() {
        assert_eq!(strip_invalid("invalid group: contains ' '"), "contains ' '");
        assert_eq!(
            strip_invalid("invalid type: integer `1`, expected a string"),
            "invalid type: integer `1`, expected a string"
        );
        assert_eq!(
            strip_invalid("\"x\" is not a duration"),
            "\"x\" is not a duration"
        );
    }

    #[test]
    fn did_you_mean() {
        let text = "app = \"a\"\n[strategy.rolling]\nbatchsize = 2\n";
        let m = explain(
            "unknown field `batchsize`, expected one of `batch_size`, `max_failures`",
            text,
            Some(text.find("batchsize").unwrap()),
        );
        assert_eq!(
            m,
            "unknown field `batchsize` in [strategy.rolling]; did you mean `batch_size`?"
        );
    }

    #[test]
    fn ssh_urls() {
        assert_eq!(
            parse_ssh("ssh://deploy@10.0.0.5:2222").unwrap(),
            HostSpec::Ssh {
                user: "deploy".into(),
                host: "10.0.0.5".into(),
                port: 2222
            }
        );
        assert!(parse_ssh("ssh://deploy@h").is_ok());
        for bad in ["ftp://x@y", "ssh://y", "ssh://a@-x", "ssh://a@h:0", "ssh://a b@h"] {
            assert!(parse_ssh(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_password_in_an_ssh_url_is_refused_without_being_shown() {
        for url in [
            "ssh://deploy:s3cret@h:22",
            "ssh://deploy:s3cret@-h",
            "ftp://deploy:s3cret@h",
        ] {
            let e = parse_ssh(url).unwrap_err();
            assert!(!e.contains("s3cret"), "{e}");
        }
        let e = parse_ssh("ssh://deploy:s3cret@h:22").unwrap_err();
        assert!(e.contains("password") && e.contains("ssh_key"), "{e}");
    }
}
