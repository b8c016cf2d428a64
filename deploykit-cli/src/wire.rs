//! Turning a checked configuration into library objects: strategies,
//! instances, the load balancer, the executor.

use std::sync::Arc;

use anyhow::Context;
use deploykit::instance::{
    HealthProbe, HttpProbe, InstanceBuilder, LocalInstance, ProcessSpec, ReleaseSource, ServiceControl,
    SshHost, SystemdUnit, Transfer,
};
use deploykit::state::StateDir;
use deploykit::{
    Backend, EventSink, Executor, Group, Instance, LoadBalancer, NoLoadBalancer, PromotionHandle, ReleaseId,
    Retry, Strategy, Timeouts,
};

use crate::config::{Control, HealthKind, HostSpec, LbKind, Loaded, StrategyKind};
use crate::sim::{SimInstance, SimLoadBalancer, SimSmokeTester};

/// The configured strategy (or `kind`), for planning.
pub(crate) fn strategy(cfg: &Loaded, kind: StrategyKind) -> anyhow::Result<Box<dyn Strategy>> {
    let s = &cfg.raw.strategy;
    Ok(match kind {
        StrategyKind::Rolling => Box::new(s.rolling.clone()),
        StrategyKind::Recreate => Box::new(s.recreate.clone()),
        // A blue-green plan needs the reconciled live environment:
        // `BlueGreen::plan`, which the callers use for this kind.
        StrategyKind::BlueGreen => {
            anyhow::bail!("blue-green plans from the live environment, not as a Strategy")
        }
        StrategyKind::Canary => Box::new(cfg.raw.canary()),
        StrategyKind::Ramped => Box::new(cfg.raw.ramped()),
        StrategyKind::Shadow => Box::new(cfg.raw.shadow()),
        StrategyKind::DarkLaunch => Box::new(cfg.raw.dark_launch()),
        StrategyKind::Experiment => Box::new(cfg.raw.experiment()),
    })
}

/// Checks that `release` can be installed on every instance that installs
/// releases (simulated ones do not): its directory under `releases` exists
/// and can be read, and, when an instance is on an SSH host, that the tar
/// stream can be built from it.
pub(crate) fn check_release(cfg: &Loaded, release: &ReleaseId) -> deploykit::Result<()> {
    let installs = || {
        cfg.instances
            .iter()
            .filter(|i| !matches!(i.control, Control::Simulated { .. }))
    };
    let Some(releases) = cfg
        .raw
        .releases
        .as_deref()
        .filter(|_| installs().next().is_some())
    else {
        return Ok(());
    };
    let transfer = if installs().any(|i| matches!(i.host, HostSpec::Ssh { .. })) {
        Transfer::Stream
    } else {
        Transfer::Local
    };
    ReleaseSource::directory(cfg.resolve(releases))
        .check(release, transfer)
        .map(|_| ())
}

/// The instances, in the order of the file.
pub(crate) fn instances(cfg: &Loaded, state: &StateDir) -> anyhow::Result<Vec<Arc<dyn Instance>>> {
    let mut out: Vec<Arc<dyn Instance>> = Vec::new();
    let sim_log = crate::sim_log::FleetLog::new(&crate::sim::dir(state.root()));
    for i in &cfg.instances {
        let backend = Backend {
            id: i.id.clone(),
            address: i.address.clone(),
            group: i.group.clone(),
        };
        if let Control::Simulated { unhealthy } = &i.control {
            let unhealthy = unhealthy.iter().map(ReleaseId::new).collect::<Result<_, _>>()?;
            out.push(Arc::new(SimInstance::new(backend, unhealthy, sim_log.clone())));
            continue;
        }
        let root = cfg.resolve(i.root.as_deref().expect("checked: root is set"));
        let releases = cfg.resolve(cfg.raw.releases.as_deref().expect("checked: releases is set"));
        let health = match i.health {
            HealthKind::Service => HealthProbe::ServiceActive,
            HealthKind::Http => {
                let mut probe = HttpProbe::new(&i.health_path)?.expect_status(i.health_status)?;
                if let Some(t) = i.health_timeout {
                    probe = probe.timeout(t);
                }
                if let Some(text) = &i.health_body_contains {
                    probe = probe.body_contains(text);
                }
                HealthProbe::Http(probe)
            }
        };
        let service = match &i.control {
            Control::Process { command, env, grace } => {
                let mut spec = ProcessSpec::new(command.clone())?.grace(*grace);
                for (k, v) in env {
                    spec = spec.env(k, v)?;
                }
                ServiceControl::Process(spec)
            }
            Control::Systemd { unit, user, sudo } => {
                ServiceControl::Systemd(SystemdUnit::new(unit)?.user(*user).sudo(*sudo))
            }
            Control::Simulated { .. } => unreachable!("handled above"),
        };
        let root = root.to_string_lossy().into_owned();
        let source = ReleaseSource::directory(releases);
        match &i.host {
            HostSpec::Local => {
                let b = LocalInstance::builder(i.id.as_str(), i.address.to_string());
                out.push(Arc::new(
                    b.group(i.group.as_str())
                        .root(root)
                        .keep(i.keep_releases)
                        .source(source)
                        .health(health)
                        .service(service)
                        .build()?,
                ));
            }
            HostSpec::Ssh { user, host, port } => {
                let mut h = SshHost::builder(host.as_str()).user(user.as_str()).port(*port);
                h = match &i.ssh_key {
                    Some(k) => h.key_file(cfg.resolve(&k.to_string_lossy())),
                    None => h.agent(),
                };
                let known = match &i.ssh_known_hosts {
                    Some(k) => cfg.resolve(&k.to_string_lossy()),
                    None => {
                        std::path::PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                            .join(".ssh/known_hosts")
                    }
                };
                if let Some(t) = i.ssh_timeout {
                    h = h.timeout(t);
                }
                if let Some(t) = i.ssh_connect_timeout {
                    h = h.connect_timeout(t);
                }
                if let Some(gzip) = i.ssh_gzip {
                    h = h.gzip(gzip);
                }
                let host = h.known_hosts(known).build()?;
                let b = InstanceBuilder::new(host, i.id.as_str(), i.address.to_string());
                out.push(Arc::new(
                    b.group(i.group.as_str())
                        .root(root)
                        .keep(i.keep_releases)
                        .source(source)
                        .health(health)
                        .service(service)
                        .build()?,
                ));
            }
        }
    }
    Ok(out)
}

/// The load balancer.
pub(crate) fn load_balancer(cfg: &Loaded, state: &StateDir) -> anyhow::Result<Arc<dyn LoadBalancer>> {
    let lb = &cfg.raw.load_balancer;
    Ok(match lb.kind {
        LbKind::None => Arc::new(NoLoadBalancer),
        LbKind::Simulated => {
            Arc::new(SimLoadBalancer::new(state.root()).context("creating the simulated load balancer")?)
        }
        LbKind::Symlink => {
            let mut b = deploykit::lb::SymlinkSwitch::builder(
                cfg.resolve(lb.link.as_deref().expect("checked: link is set")),
            );
            for (env, dir) in lb.targets.iter().flatten() {
                let group = Group::new(env).map_err(|e| match e {
                    deploykit::Error::InvalidInput { message, .. } => {
                        deploykit::Error::invalid(format!("load_balancer.targets.{env}"), message)
                    }
                    other => other,
                })?;
                b = b.environment(group, cfg.resolve(dir));
            }
            Arc::new(b.build().map_err(|e| match e {
                deploykit::Error::InvalidInput { field, message } => {
                    deploykit::Error::invalid(format!("load_balancer.{field}"), message)
                }
                other => other,
            })?)
        }
        LbKind::Nginx => Arc::new(nginx(cfg)?),
        LbKind::Haproxy => {
            let mut b = deploykit::lb::HaproxyLoadBalancer::builder()
                .socket(cfg.resolve(lb.socket.as_deref().expect("checked: socket is set")))
                .backend_name(lb.backend.as_deref().unwrap_or("app"))
                .backends(backends(cfg));
            if let Some(t) = lb.timeout {
                b = b.timeout(t.0);
            }
            if let Some(t) = lb.up_timeout {
                b = b.up_timeout(t.0);
            }
            if let Some(dir) = &lb.map_dir {
                b = b.map_dir(cfg.resolve(dir));
            }
            Arc::new(b.build().map_err(lb_field)?)
        }
        LbKind::Istio | LbKind::GatewayApi => kubernetes(cfg)?,
    })
}

/// The Kubernetes driver of `[load_balancer]` (kind `istio` or
/// `gateway-api`); it connects to the API server on its first call.
#[cfg(feature = "kubernetes")]
fn kubernetes(cfg: &Loaded) -> anyhow::Result<Arc<dyn LoadBalancer>> {
    let lb = &cfg.raw.load_balancer;
    let kubeconfig = lb.kubeconfig.as_deref().map(|k| cfg.resolve(k));
    Ok(Arc::new(kubernetes_driver(lb, kubeconfig)?))
}

/// Builds the Kubernetes driver from `[load_balancer]`, touching nothing:
/// `config::check_lb` runs it too (without the kubeconfig, whose path is
/// resolved later), so `validate` reports the library's own checks.
#[cfg(feature = "kubernetes")]
pub(crate) fn kubernetes_driver(
    lb: &crate::config::LoadBalancerConfig,
    kubeconfig: Option<std::path::PathBuf>,
) -> deploykit::Result<deploykit::lb::KubernetesTraffic> {
    use deploykit::lb::kubernetes::{KubeBackend, KubernetesError, KubernetesTraffic, TrafficApi};
    let api = if lb.kind == LbKind::Istio {
        TrafficApi::Istio
    } else {
        TrafficApi::GatewayApi
    };
    let mut b = KubernetesTraffic::builder(api)
        .namespace(lb.namespace.clone().unwrap_or_default())
        .resource(lb.resource.clone().unwrap_or_default());
    if let Some(r) = &lb.route {
        b = b.route(r);
    }
    if let Some(k) = kubeconfig {
        b = b.kubeconfig(k);
    }
    if let Some(c) = &lb.context {
        b = b.context(c);
    }
    for (group, s) in lb.services.iter().flatten() {
        let mut backend = KubeBackend::service(&s.service);
        if let Some(p) = s.port {
            backend = backend.port(p);
        }
        if let Some(sub) = &s.subset {
            backend = backend.subset(sub);
        }
        b = b.backend(Group::new(group.as_str())?, backend);
    }
    b.build().map_err(|e| match e {
        KubernetesError::Invalid { field, message } => deploykit::Error::invalid(field, message),
        other => deploykit::Error::Driver(other.into()),
    })
}

#[cfg(not(feature = "kubernetes"))]
fn kubernetes(_: &Loaded) -> anyhow::Result<Arc<dyn LoadBalancer>> {
    // config::check_lb refuses these kinds without the feature.
    anyhow::bail!("this deploykit was built without the `kubernetes` feature")
}

/// The nginx driver of `[load_balancer]` (kind `nginx`).
pub(crate) fn nginx(cfg: &Loaded) -> anyhow::Result<deploykit::lb::NginxLoadBalancer> {
    let lb = &cfg.raw.load_balancer;
    let include = cfg.resolve(lb.include_file.as_deref().expect("checked: include_file is set"));
    let mut b = deploykit::lb::NginxLoadBalancer::builder()
        .upstream(lb.upstream.as_deref().unwrap_or("app"))
        .include_file(&include)
        .error_log_stderr(true)
        .backends(backends(cfg));
    if let Some(p) = &lb.nginx_prefix {
        b = b.prefix(cfg.resolve(p));
    }
    if let Some(bin) = &lb.nginx_binary {
        b = b.binary(bin);
    }
    if let Some(c) = &lb.nginx_config {
        b = b.config_file(cfg.resolve(c));
    }
    if let Some(p) = &lb.pid_file {
        b = b.pid_file(cfg.resolve(p));
    }
    if let Some(t) = lb.reload_timeout {
        b = b.reload_timeout(t.0);
    }
    if let Some(yes) = lb.idle_groups_as_backup {
        b = b.idle_groups_as_backup(yes);
    }
    if let Some(mode) = lb.drain {
        b = b.drain_mode(mode);
    }
    if let Some(loc) = &lb.location_include {
        b = b.location_include(cfg.resolve(loc));
    }
    if let Some(t) = lb.mirror_timeout {
        b = b.mirror_timeout(t.0);
    }
    Ok(b.build().map_err(lb_field)?)
}

fn backends(cfg: &Loaded) -> Vec<Backend> {
    cfg.instances
        .iter()
        .map(|i| Backend {
            id: i.id.clone(),
            address: i.address.clone(),
            group: i.group.clone(),
        })
        .collect()
}

fn lb_field(e: deploykit::Error) -> deploykit::Error {
    match e {
        deploykit::Error::InvalidInput { field, message } => {
            deploykit::Error::invalid(format!("load_balancer ({field})"), message)
        }
        other => other,
    }
}

/// The metrics source, when `[metrics]` is set.
pub(crate) fn metrics(cfg: &Loaded) -> anyhow::Result<Option<Arc<dyn deploykit::MetricsSource>>> {
    let Some(m) = &cfg.raw.metrics else {
        return Ok(None);
    };
    let mut b = deploykit::metrics::prometheus::Prometheus::builder(m.prometheus.clone());
    if let Some(q) = &m.error_rate {
        b = b.error_rate(q);
    }
    if let Some(q) = &m.latency_p99 {
        b = b.latency_p99(q);
    }
    if let Some(q) = &m.request_count {
        b = b.request_count(q);
    }
    if let Some(q) = &m.error_count {
        b = b.error_count(q);
    }
    if let Some(q) = &m.latency_buckets {
        b = b.latency_buckets(q);
    }
    if let Some(q) = &cfg.raw.strategy.experiment.visits {
        b = b.visits(q);
    }
    if let Some(q) = &cfg.raw.strategy.experiment.conversions {
        b = b.conversions(q);
    }
    if let Some(t) = m.timeout {
        b = b.timeout(t.0);
    }
    let p = b.build().map_err(|e| match e {
        deploykit::Error::InvalidInput { field, message } => {
            deploykit::Error::invalid(format!("metrics.{field}"), message)
        }
        other => other,
    })?;
    Ok(Some(Arc::new(p)))
}

/// Whether every instance is simulated (then smoke checks are simulated
/// too).
fn all_simulated(cfg: &Loaded) -> bool {
    cfg.instances
        .iter()
        .all(|i| matches!(i.control, Control::Simulated { .. }))
}

/// Where the configured deployment state lives: the state directory, or
/// etcd (`[state] backend = "etcd"`; the password is read from its
/// variable here, and shown nowhere).
pub(crate) fn state_backend(
    cfg: &Loaded,
    state: &StateDir,
) -> anyhow::Result<Arc<dyn deploykit::state::StateBackend>> {
    match cfg.raw.state.backend {
        crate::config::StateBackendKind::Local => {
            Ok(Arc::new(deploykit::state::LocalBackend::new(state.clone())))
        }
        #[cfg(feature = "etcd")]
        crate::config::StateBackendKind::Etcd => {
            let password = cfg.raw.state.etcd_password()?;
            Ok(Arc::new(cfg.raw.state.etcd(&cfg.raw.app, password, &cfg.base)?))
        }
        #[cfg(not(feature = "etcd"))]
        crate::config::StateBackendKind::Etcd => {
            anyhow::bail!("this deploykit was built without the etcd feature (state.backend = \"etcd\")")
        }
    }
}

/// The fault proxies of this process's run, for `/metrics`: the metrics
/// server starts before the fleet is built, and one process runs one
/// deployment.
static PROXIES: std::sync::Mutex<Option<deploykit::chaos::RoutedFaults>> = std::sync::Mutex::new(None);

/// The fault proxies' series in Prometheus' text format; empty without
/// network chaos.
pub(crate) async fn proxy_exposition() -> String {
    let faults = PROXIES.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match faults {
        Some(f) => f.exposition().await,
        None => String::new(),
    }
}

/// Where a run with network chaos lists the detours through its fault
/// proxies that may be live, so that the next run can undo those of a run
/// that died during a fault.
fn detours_file(state: &StateDir) -> std::path::PathBuf {
    state.root().join("chaos-detours.json")
}

/// Points the load balancer back at every instance a run that died during
/// a network fault left going to its (dead) fault proxy, saying so; called
/// under the lock, before a run's checks.
///
/// # Errors
/// The record cannot be read, or the balancer refuses (the record is kept).
pub(crate) async fn undo_detours(state: &StateDir, exec: &Executor) -> anyhow::Result<()> {
    let backends: Vec<Backend> = exec.instances().iter().map(|i| i.backend().clone()).collect();
    let lb = exec.load_balancer();
    let undone = deploykit::chaos::undo_recorded(lb.as_ref(), &detours_file(state), &backends)
        .await
        .context("pointing the load balancer back from the fault proxies of an interrupted run")?;
    for id in undone {
        eprintln!(
            "deploykit: {id}'s traffic still went to the fault proxy of a run that ended during a network fault; \
             the load balancer sends it to {id} again"
        );
    }
    Ok(())
}

/// Everything a command needs to act on the fleet.
pub(crate) struct Fleet {
    pub(crate) executor: Executor,
    pub(crate) promotion: PromotionHandle,
    /// The fault proxies of the canary's network chaos entries, when it
    /// has any: restored after the run, exported by `--metrics-listen`.
    pub(crate) faults: Option<deploykit::chaos::RoutedFaults>,
}

/// Builds the executor over the configured fleet, with `sink` receiving the
/// events; the file's `[[strategy.canary.chaos]]` entries decide whether
/// fault proxies are set up ([`fleet_with_chaos`] for other entries).
pub(crate) fn fleet(
    cfg: &Loaded,
    state: &StateDir,
    live: Arc<dyn deploykit::bluegreen_state::LiveStore>,
    sink: Option<Arc<dyn EventSink>>,
) -> anyhow::Result<Fleet> {
    fleet_with_chaos(cfg, state, live, sink, &cfg.raw.strategy.canary.chaos)
}

/// [`fleet`] for a run that injects `chaos` (a drill's entries, its default
/// fault included, which the file does not hold): fault proxies are set up
/// when one of them is a network fault.
pub(crate) fn fleet_with_chaos(
    cfg: &Loaded,
    state: &StateDir,
    live: Arc<dyn deploykit::bluegreen_state::LiveStore>,
    sink: Option<Arc<dyn EventSink>>,
    chaos: &[deploykit::chaos::ChaosSpec],
) -> anyhow::Result<Fleet> {
    let t = &cfg.raw.timeouts;
    let promotion = PromotionHandle::new();
    let lb = load_balancer(cfg, state)?;
    let mut b = Executor::builder()
        .instances(instances(cfg, state)?)
        .load_balancer(lb.clone())
        .timeouts(Timeouts {
            stop: t.stop.0,
            force_stop: t.force_stop.0,
            install: t.install.0,
            restore: t.restore.0,
            start: t.start.0,
            health_probe: t.health_probe.0,
            load_balancer: t.load_balancer.0,
            query: t.query.0,
        })
        .drain_poll(t.drain_poll.0)
        .retry(Retry {
            attempts: cfg.raw.retry.attempts,
            backoff: cfg.raw.retry.backoff.0,
        })
        .live_store(live)
        .promotion(promotion.clone());
    if let Some(m) = metrics(cfg)? {
        b = b.metrics(m);
    }
    if all_simulated(cfg) {
        b = b.smoke_tester(Arc::new(SimSmokeTester));
    }
    if let Some(gates) = crate::gitops::CommandGates::new(cfg, state) {
        b = b.gate_runner(Arc::new(gates));
    }
    // Only plans of a canary carrying a flag use it; it holds paths only.
    b = b.flag_switch(Arc::new(crate::flags::DeployFlags::new(cfg, state)));
    if let Some(sink) = sink {
        b = b.events(sink);
    }
    // Network faults go through proxies on loopback, in front of the
    // faulted instances only while their fault lasts.
    let network_chaos = chaos.iter().any(|c| !c.fault.is_process_fault());
    let faults = if network_chaos {
        let f = deploykit::chaos::RoutedFaults::new(lb, std::net::Ipv4Addr::LOCALHOST.into())?
            .record_to(detours_file(state));
        b = b.fault_injector(Arc::new(f.clone()));
        *PROXIES.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.clone());
        Some(f)
    } else {
        None
    };
    Ok(Fleet {
        executor: b.build()?,
        promotion,
        faults,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(chaos: &str) -> Loaded {
        let text = format!(
            "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
             [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18901\"\ngroup = \"stable\"\n\n\
             [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18902\"\ngroup = \"canary\"\n\n\
             [load_balancer]\nkind = \"simulated\"\n\n\
             [metrics]\nprometheus = \"http://127.0.0.1:9\"\n\n[strategy]\nkind = \"canary\"\n\n\
             [strategy.canary]\nstages = [20, 100]\n\n{chaos}"
        );
        crate::config::parse(std::path::Path::new("deploykit.toml"), &text).expect("a valid config")
    }

    fn entry(kind: &str) -> deploykit::chaos::ChaosSpec {
        let mut v = serde_json::json!({"stage": 1, "kind": kind, "expect": "rollback", "within": "30s"});
        if kind == "http-error" {
            v["percent"] = 50.into();
        }
        serde_json::from_value(v).unwrap()
    }

    /// Whether the wiring set up fault proxies for `chaos` over `cfg`.
    fn proxied(cfg: &Loaded, chaos: Option<&[deploykit::chaos::ChaosSpec]>) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), "shop").unwrap();
        let live = Arc::new(deploykit::bluegreen_state::FileLiveStore::new(
            dir.path().join("live.json"),
        ));
        let fleet = match chaos {
            Some(c) => fleet_with_chaos(cfg, &state, live, None, c),
            None => fleet(cfg, &state, live, None),
        };
        fleet.expect("wired").faults.is_some()
    }

    #[test]
    fn fault_proxies_follow_the_entries_the_run_injects_not_only_the_file() {
        let plain = loaded("");
        // A drill's default network fault, which the file does not hold.
        assert!(proxied(&plain, Some(&[entry("http-error")])));
        // A process fault needs no proxy; nor does a run without entries.
        assert!(!proxied(&plain, Some(&[entry("kill")])));
        assert!(!proxied(&plain, None));
        // The file's own network entries, as before.
        let filed = loaded(
            "[[strategy.canary.chaos]]\nstage = 1\nkind = \"http-error\"\npercent = 50\n\
             expect = \"rollback\"\nwithin = \"30s\"\n",
        );
        assert!(proxied(&filed, None));
        assert!(!proxied(&filed, Some(&[entry("kill")])));
    }
}
