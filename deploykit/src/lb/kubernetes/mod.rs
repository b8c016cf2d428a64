//! Kubernetes traffic: an Istio `VirtualService` or a Gateway API
//! `HTTPRoute`, driven through kube-rs (feature `kubernetes`).
//!
//! deploykit owns **one named route** of one existing object — the
//! VirtualService's `http` route or the HTTPRoute's rule whose `name` is the
//! configured route name (default `deploykit`) — and the routes it derives
//! from it, named `<route>-match-<n>` (one per [`Rule`](crate::routing::Rule))
//! and `<route>…-mirror` (the mirrored twin of a route). Everything else in
//! the object is left exactly as it is: other routes and rules keep their
//! place, destinations and `backendRefs` of services deploykit was not given
//! keep their weight, and fields deploykit does not model (timeouts,
//! retries, rewrites, filters) are carried through unchanged, because every
//! typed struct keeps the fields it does not name.
//!
//! **A change** is: read the object; compute the new route list from it; if
//! that is what is there, stop (a no-op writes nothing); otherwise send a
//! JSON merge patch of `spec.http` (or `spec.rules`) carrying the
//! `metadata.resourceVersion` that was read, so the API server refuses it
//! with 409 Conflict if anyone changed the object in between; on a conflict
//! read again and recompute, at most five times; finally read the object
//! back and check it now shows the policy. A merge patch is applied by the
//! API server atomically, so a cancelled change leaves either the old or the
//! new routes, never a mix.
//!
//! **Weights.** Istio wants destination weights that sum to 100: the
//! weights of destinations deploykit does not manage are kept, and the rest
//! (100 minus theirs) is shared among the managed groups in proportion to
//! their percent, by largest remainder. Gateway API weights are
//! proportional (a missing weight is 1): managed `backendRefs` get their
//! group's percent as weight, others keep theirs. Either way three or more
//! groups work, and a group with 0 % keeps its destination at weight 0.
//!
//! **Rules and mirroring.** A header or query rule becomes a route that
//! repeats the managed route's own matches (its path, say) with the rule's
//! condition added, sending to the rule's group. A mirror becomes, before
//! each managed route, a twin that also matches the mirrored methods and
//! carries Istio's `mirror` + `mirrorPercentage` or Gateway API's
//! `RequestMirror` filter with `percent`. Gateway API ranks matches by
//! specificity rather than order (a method beats headers, headers beat
//! query parameters), which the twins respect; a query rule placed before a
//! header rule is refused there, since the header rule would win.
//!
//! **Limits.** Per-backend calls (`drain`, `enable`, `disable`) do nothing:
//! the mesh or gateway balances over the pods of a Service, and Kubernetes
//! drains a pod through its readiness. Sticky splits and cookie rules are
//! refused (they need a DestinationRule or session persistence, which
//! deploykit does not manage). `docs/kubernetes.md` has the RBAC rules, the
//! examples and the manual check against a kind cluster: this driver is
//! tested against a scripted API server, not a live cluster.

// Every error names its object and keeps the API server's words; they come
// after a network round trip, so their size costs nothing that matters.
#![allow(clippy::result_large_err)]

mod gateway;
mod istio;
mod model;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use gateway::HttpRoute;
use istio::VirtualService;

use crate::error::{DriverError, PreflightFailure};
use crate::names::Group;
use crate::routing::{Capabilities, Capability, TrafficPolicy};
use crate::traits::{Backend, GroupWeight, LoadBalancer};

/// How many times a change re-reads the object after a 409 Conflict before
/// it gives up (transiently: the executor may retry the step).
const MAX_ATTEMPTS: u32 = 5;

/// The field manager deploykit's patches are recorded under.
const FIELD_MANAGER: &str = "deploykit";

/// Which Kubernetes API carries the traffic split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficApi {
    /// Istio `networking.istio.io/v1` `VirtualService`.
    Istio,
    /// Gateway API `gateway.networking.k8s.io/v1` `HTTPRoute`.
    GatewayApi,
}

impl TrafficApi {
    /// The driver's name in events and errors, and the config `kind`:
    /// `istio` or `gateway-api`.
    pub fn as_str(self) -> &'static str {
        match self {
            TrafficApi::Istio => "istio",
            TrafficApi::GatewayApi => "gateway-api",
        }
    }

    /// The kind of object it patches: `VirtualService` or `HTTPRoute`.
    pub fn kind(self) -> &'static str {
        match self {
            TrafficApi::Istio => "VirtualService",
            TrafficApi::GatewayApi => "HTTPRoute",
        }
    }
}

/// Where one group's traffic goes: a Kubernetes Service (and, for Istio, a
/// subset of its DestinationRule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeBackend {
    service: String,
    port: Option<u16>,
    subset: Option<String>,
}

impl KubeBackend {
    /// The Service named `service`, as the object names it (Istio's
    /// `destination.host`, Gateway API's `backendRef.name`).
    pub fn service(service: impl Into<String>) -> Self {
        Self {
            service: service.into(),
            port: None,
            subset: None,
        }
    }

    /// The Service port (required by Gateway API; optional for Istio).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// An Istio DestinationRule subset (Istio only).
    pub fn subset(mut self, subset: impl Into<String>) -> Self {
        self.subset = Some(subset.into());
        self
    }

    /// The Service name.
    pub fn service_name(&self) -> &str {
        &self.service
    }

    /// The Service port, if given.
    pub fn port_number(&self) -> Option<u16> {
        self.port
    }

    /// The Istio subset, if given.
    pub fn subset_name(&self) -> Option<&str> {
        self.subset.as_deref()
    }
}

/// What went wrong talking to the Kubernetes API server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KubernetesError {
    /// A setting of the driver is not acceptable; nothing was touched.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The setting, e.g. `load_balancer.namespace`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The kubeconfig or in-cluster configuration could not be loaded.
    #[error("cannot load the Kubernetes client configuration ({what})")]
    Config {
        /// Which source was tried.
        what: String,
        /// kube's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// The object (or its API: the CRD) does not exist.
    #[error(
        "{kind} {namespace}/{name} does not exist (or its CRD is not installed): {message}; \
         create it with a route named as load_balancer.route (docs/kubernetes.md)"
    )]
    NotFound {
        /// `VirtualService` or `HTTPRoute`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The API server's message.
        message: String,
    },
    /// The object has no route with the managed name.
    #[error(
        "{kind} {namespace}/{name} has no {what} named {route}; add `name: {route}` to the {what} \
         deploykit should manage (docs/kubernetes.md)"
    )]
    NoManagedRoute {
        /// `VirtualService` or `HTTPRoute`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// `http route` or `rule`.
        what: &'static str,
        /// The managed route's name.
        route: String,
    },
    /// The credentials lack a permission.
    #[error(
        "the API server refused to {action} {kind} {namespace}/{name}: {message}; grant the \
         Role in docs/kubernetes.md (get and patch on {resource})"
    )]
    Forbidden {
        /// `read` or `patch`.
        action: &'static str,
        /// `VirtualService` or `HTTPRoute`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// `virtualservices.networking.istio.io` or `httproutes.gateway.networking.k8s.io`.
        resource: &'static str,
        /// The API server's message.
        message: String,
    },
    /// Another writer changed the object between every read and write.
    #[error(
        "{kind} {namespace}/{name} changed under deploykit {attempts} times in a row (409 Conflict \
         each time); another controller may be rewriting it"
    )]
    Conflict {
        /// `VirtualService` or `HTTPRoute`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// Writes tried.
        attempts: u32,
    },
    /// The API server answered with another error.
    #[error("the API server could not {action} {kind} {namespace}/{name}: {code} {reason}: {message}")]
    Api {
        /// `read` or `patch`.
        action: &'static str,
        /// `VirtualService` or `HTTPRoute`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The HTTP status.
        code: u16,
        /// The API server's reason (`Invalid`, `InternalError`, …).
        reason: String,
        /// The API server's message.
        message: String,
    },
    /// The API server could not be reached or its answer not read.
    #[error("could not {action} {kind} {namespace}/{name}")]
    Transport {
        /// `read` or `patch`.
        action: &'static str,
        /// `VirtualService` or `HTTPRoute`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// kube's error.
        #[source]
        source: kube::Error,
    },
    /// The object read back after a successful patch does not show the
    /// policy (another writer changed it at once, or a webhook rewrote it).
    #[error(
        "{kind} {namespace}/{name} read back after the patch does not route as asked (another \
         writer or an admission webhook changed it)"
    )]
    NotConfirmed {
        /// `VirtualService` or `HTTPRoute`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// The policy cannot be written into this object as it is.
    #[error("cannot route {field} through {kind} {namespace}/{name}: {message}")]
    Unroutable {
        /// `VirtualService` or `HTTPRoute`.
        kind: &'static str,
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The policy field or object part at fault.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl KubernetesError {
    /// Whether retrying may help: unreachable API server, conflicts, 429
    /// and 5xx answers.
    pub fn is_transient(&self) -> bool {
        match self {
            KubernetesError::Conflict { .. } | KubernetesError::Transport { .. } => true,
            KubernetesError::Api { code, .. } => *code == 429 || *code >= 500,
            _ => false,
        }
    }
}

impl From<KubernetesError> for DriverError {
    fn from(e: KubernetesError) -> Self {
        let message = e.to_string();
        let unreachable = matches!(e, KubernetesError::Transport { .. });
        let mut d = if e.is_transient() {
            DriverError::transient(message)
        } else {
            DriverError::new(message)
        };
        if unreachable {
            d = d.with_preflight_failure(PreflightFailure::Unreachable);
        }
        if let KubernetesError::Transport { source, .. } = e {
            d = d.with_source(source);
        }
        d
    }
}

/// Builds a kube client the standard way: `kubeconfig` (a file) or, without
/// it, `$KUBECONFIG` / `~/.kube/config`, and when neither exists and no
/// `context` is asked for, the in-cluster service account.
///
/// # Errors
/// [`KubernetesError::Config`] naming the source that failed.
pub async fn connect(
    kubeconfig: Option<&Path>,
    context: Option<&str>,
) -> Result<kube::Client, KubernetesError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..KubeConfigOptions::default()
    };
    let fail = |what: String| {
        move |e: Box<dyn std::error::Error + Send + Sync>| KubernetesError::Config { what, source: e }
    };
    let config = match (kubeconfig, context) {
        (Some(path), _) => {
            let what = format!("kubeconfig {}", path.display());
            let file = Kubeconfig::read_from(path).map_err(|e| fail(what.clone())(e.into()))?;
            kube::Config::from_custom_kubeconfig(file, &options)
                .await
                .map_err(|e| fail(what)(e.into()))?
        }
        (None, Some(c)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| fail(format!("context {c} of the default kubeconfig"))(e.into()))?,
        (None, None) => kube::Config::infer()
            .await
            .map_err(|e| fail("default kubeconfig, then in-cluster".into())(e.into()))?,
    };
    kube::Client::try_from(config).map_err(|e| KubernetesError::Config {
        what: "client".into(),
        source: e.into(),
    })
}

/// Drives traffic through an Istio `VirtualService` or a Gateway API
/// `HTTPRoute`. Cheap to clone; changes are serialised. See the
/// [module docs](self).
///
/// ```no_run
/// # fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use deploykit::lb::kubernetes::{KubeBackend, KubernetesTraffic, TrafficApi};
/// use deploykit::Group;
///
/// let lb = KubernetesTraffic::builder(TrafficApi::Istio)
///     .context("prod") // from ~/.kube/config; connected on first use
///     .namespace("shop")
///     .resource("web")
///     .backend(Group::new("stable")?, KubeBackend::service("web").subset("stable"))
///     .backend(Group::new("canary")?, KubeBackend::service("web").subset("canary"))
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct KubernetesTraffic {
    inner: Arc<Inner>,
}

struct Inner {
    api: TrafficApi,
    // Connected on first use, so that building the driver stays synchronous
    // and touches nothing.
    client: tokio::sync::OnceCell<kube::Client>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    managed: model::Managed,
    lock: tokio::sync::Mutex<()>,
}

// kube::Client has no Debug; the object is what identifies the driver.
impl Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesTraffic")
            .field("api", &self.api)
            .field("managed", &self.managed)
            .finish_non_exhaustive()
    }
}

/// Builds a [`KubernetesTraffic`]; setters never fail, [`build`](Self::build)
/// checks everything.
pub struct KubernetesTrafficBuilder {
    api: TrafficApi,
    client: Option<kube::Client>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    namespace: Option<String>,
    resource: Option<String>,
    route: String,
    backends: BTreeMap<Group, KubeBackend>,
}

impl Debug for KubernetesTrafficBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesTrafficBuilder")
            .field("api", &self.api)
            .field("client", &self.client.is_some())
            .field("kubeconfig", &self.kubeconfig)
            .field("context", &self.context)
            .field("namespace", &self.namespace)
            .field("resource", &self.resource)
            .field("route", &self.route)
            .field("backends", &self.backends)
            .finish()
    }
}

impl KubernetesTraffic {
    /// A builder for `api`.
    pub fn builder(api: TrafficApi) -> KubernetesTrafficBuilder {
        KubernetesTrafficBuilder {
            api,
            client: None,
            kubeconfig: None,
            context: None,
            namespace: None,
            resource: None,
            route: "deploykit".into(),
            backends: BTreeMap::new(),
        }
    }

    /// Which API it drives.
    pub fn api(&self) -> TrafficApi {
        self.inner.api
    }

    /// Applies `policy`: read, compute, skip when nothing changes, merge
    /// patch with the read `resourceVersion` (re-read and retried on 409,
    /// bounded), read back.
    ///
    /// * Idempotent: yes; the live policy again writes nothing.
    /// * Cancel-safe: yes; the patch is one atomic write.
    /// * On failure: the previous routes are still live, unless the
    ///   failure is [`KubernetesError::NotConfirmed`].
    ///
    /// # Errors
    /// Any [`KubernetesError`].
    pub async fn apply(&self, policy: &TrafficPolicy) -> Result<(), KubernetesError> {
        let _one_at_a_time = self.inner.lock.lock().await;
        match self.inner.api {
            TrafficApi::Istio => self.apply_to::<VirtualService>(policy).await,
            TrafficApi::GatewayApi => self.apply_to::<HttpRoute>(policy).await,
        }
    }

    /// Reads the object and says which group answers every client, if one
    /// does: the managed route's only weighted group, which every rule's
    /// route also sends to (mirrored copies do not count).
    ///
    /// # Errors
    /// Any [`KubernetesError`] of the read.
    pub async fn live(&self) -> Result<Option<Group>, KubernetesError> {
        match self.inner.api {
            TrafficApi::Istio => self.live_of::<VirtualService>().await,
            TrafficApi::GatewayApi => self.live_of::<HttpRoute>().await,
        }
    }

    async fn api_for<K: Routed>(&self) -> Result<Api<K>, KubernetesError> {
        let i = &self.inner;
        let client = i
            .client
            .get_or_try_init(|| connect(i.kubeconfig.as_deref(), i.context.as_deref()))
            .await?;
        Ok(Api::namespaced(client.clone(), &i.managed.namespace))
    }

    fn ctx(&self) -> &model::Managed {
        &self.inner.managed
    }

    async fn read<K: Routed>(&self) -> Result<K, KubernetesError> {
        self.api_for::<K>()
            .await?
            .get(&self.ctx().name)
            .await
            .map_err(|e| self.ctx().api_error(K::API, "read", e))
    }

    async fn apply_to<K: Routed>(&self, policy: &TrafficPolicy) -> Result<(), KubernetesError> {
        let m = self.ctx();
        for _ in 0..MAX_ATTEMPTS {
            let obj = self.read::<K>().await?;
            let next = obj.compile(m, policy)?;
            if obj.routes() == next.as_slice() {
                return Ok(());
            }
            let body = K::patch_body(obj.resource_version().as_deref().unwrap_or_default(), &next);
            let params = PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..PatchParams::default()
            };
            match self
                .api_for::<K>()
                .await?
                .patch(&m.name, &params, &Patch::Merge(&body))
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.is_conflict() => {
                    tracing::debug!(kind = K::API.kind(), name = %m.name, "409 Conflict, reading again");
                    continue;
                }
                Err(e) => return Err(m.api_error(K::API, "patch", e)),
            }
            let after = self.read::<K>().await?;
            return if after.compile(m, policy)? == after.routes() {
                Ok(())
            } else {
                Err(KubernetesError::NotConfirmed {
                    kind: K::API.kind(),
                    namespace: m.namespace.clone(),
                    name: m.name.clone(),
                })
            };
        }
        Err(KubernetesError::Conflict {
            kind: K::API.kind(),
            namespace: m.namespace.clone(),
            name: m.name.clone(),
            attempts: MAX_ATTEMPTS,
        })
    }

    async fn live_of<K: Routed>(&self) -> Result<Option<Group>, KubernetesError> {
        let obj = self.read::<K>().await?;
        obj.live(self.ctx())
    }
}

impl KubernetesTrafficBuilder {
    /// The kube client to use (any `kube::Client`). Without one, the
    /// driver connects on first use as [`connect`] does, with
    /// [`kubeconfig`](Self::kubeconfig) and [`context`](Self::context).
    pub fn client(mut self, client: kube::Client) -> Self {
        self.client = Some(client);
        self
    }

    /// The kubeconfig file; default `$KUBECONFIG`, `~/.kube/config`, then
    /// the in-cluster service account.
    pub fn kubeconfig(mut self, path: impl Into<PathBuf>) -> Self {
        self.kubeconfig = Some(path.into());
        self
    }

    /// The kubeconfig context; default its current context.
    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context = Some(context.into());
        self
    }

    /// The object's namespace.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The VirtualService's or HTTPRoute's name.
    pub fn resource(mut self, name: impl Into<String>) -> Self {
        self.resource = Some(name.into());
        self
    }

    /// The name of the route (Istio) or rule (Gateway API) deploykit
    /// manages; default `deploykit`.
    pub fn route(mut self, route: impl Into<String>) -> Self {
        self.route = route.into();
        self
    }

    /// Where `group`'s traffic goes.
    pub fn backend(mut self, group: Group, backend: KubeBackend) -> Self {
        self.backends.insert(group, backend);
        self
    }

    /// Checks the settings and builds the driver. Touches nothing (the API
    /// server is first contacted by a call).
    ///
    /// # Errors
    /// [`KubernetesError::Invalid`] naming the setting: a kubeconfig that
    /// is not a file, an empty context, a
    /// namespace, name or route that is not a DNS-1123 name, no backend, a
    /// Service or subset name that is not a DNS-1123 label, a Gateway API
    /// backend without a port or with a subset, or two groups on one
    /// backend.
    pub fn build(self) -> Result<KubernetesTraffic, KubernetesError> {
        let invalid = |field: &str, message: String| KubernetesError::Invalid {
            field: field.into(),
            message,
        };
        if let Some(path) = &self.kubeconfig {
            if !path.is_file() {
                return Err(invalid(
                    "load_balancer.kubeconfig",
                    format!(
                        "{} is not a file; give the kubeconfig's path or remove the key to use the default",
                        path.display()
                    ),
                ));
            }
        }
        if let Some(c) = &self.context {
            if c.is_empty() || c.chars().any(char::is_control) {
                return Err(invalid(
                    "load_balancer.context",
                    "is empty or has control characters; give a context name from the kubeconfig".into(),
                ));
            }
        }
        let namespace = self.namespace.ok_or_else(|| {
            invalid(
                "load_balancer.namespace",
                "is missing; give the object's namespace".into(),
            )
        })?;
        model::check_label("load_balancer.namespace", &namespace)?;
        let name = self.resource.ok_or_else(|| {
            invalid(
                "load_balancer.resource",
                format!("is missing; give the {}'s name", self.api.kind()),
            )
        })?;
        model::check_subdomain("load_balancer.resource", &name)?;
        model::check_label("load_balancer.route", &self.route)?;
        // The derived names are the route's plus a suffix and must stay labels.
        if self.route.len() > 40 {
            return Err(invalid(
                "load_balancer.route",
                format!(
                    "'{}' is longer than 40 characters; deploykit appends -match-N-mirror to it",
                    self.route
                ),
            ));
        }
        if self.backends.is_empty() {
            return Err(invalid(
                "load_balancer.services",
                "is empty; map each group to its Service".into(),
            ));
        }
        let mut seen = BTreeMap::new();
        for (group, b) in &self.backends {
            let field = format!("load_balancer.services.{group}");
            model::check_label(&format!("{field}.service"), &b.service)?;
            if let Some(s) = &b.subset {
                if self.api == TrafficApi::GatewayApi {
                    return Err(invalid(
                        &format!("{field}.subset"),
                        "is an Istio DestinationRule subset; Gateway API routes to a Service per group, remove it".into(),
                    ));
                }
                model::check_label(&format!("{field}.subset"), s)?;
            }
            match b.port {
                Some(0) => return Err(invalid(&format!("{field}.port"), "is 0; give 1-65535".into())),
                None if self.api == TrafficApi::GatewayApi => {
                    return Err(invalid(
                        &format!("{field}.port"),
                        "is missing; a Gateway API backendRef to a Service needs its port".into(),
                    ))
                }
                _ => {}
            }
            if let Some(other) = seen.insert((b.service.clone(), b.port, b.subset.clone()), group.clone()) {
                return Err(invalid(
                    &field,
                    format!("routes to the same backend as group {other}; each group needs its own Service or subset"),
                ));
            }
        }
        Ok(KubernetesTraffic {
            inner: Arc::new(Inner {
                api: self.api,
                client: tokio::sync::OnceCell::new_with(self.client),
                kubeconfig: self.kubeconfig,
                context: self.context,
                managed: model::Managed {
                    namespace,
                    name,
                    route: self.route,
                    backends: self.backends,
                },
                lock: tokio::sync::Mutex::new(()),
            }),
        })
    }
}

/// An object deploykit routes through: the typed VirtualService or
/// HTTPRoute.
trait Routed:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// The API it belongs to.
    const API: TrafficApi;
    /// One route (Istio) or rule (Gateway API).
    type Route: Clone + PartialEq + Debug + Serialize;
    /// The routes as they are.
    fn routes(&self) -> &[Self::Route];
    /// The routes as they must be for `policy`.
    fn compile(
        &self,
        m: &model::Managed,
        policy: &TrafficPolicy,
    ) -> Result<Vec<Self::Route>, KubernetesError>;
    /// The merge patch that writes `routes` if the object is still at
    /// `resource_version`.
    fn patch_body(resource_version: &str, routes: &[Self::Route]) -> serde_json::Value;
    /// The group taking all traffic, if one does.
    fn live(&self, m: &model::Managed) -> Result<Option<Group>, KubernetesError>;
}

#[async_trait]
impl LoadBalancer for KubernetesTraffic {
    fn name(&self) -> &str {
        self.inner.api.as_str()
    }

    /// Does nothing: the mesh or gateway balances over a Service's pods.
    async fn drain(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }

    async fn active_connections(&self, _: &Backend) -> Result<Option<u64>, DriverError> {
        Ok(None)
    }

    /// Does nothing: the mesh or gateway balances over a Service's pods.
    async fn enable(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }

    /// Does nothing: the mesh or gateway balances over a Service's pods.
    async fn disable(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }

    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        self.apply_policy(&TrafficPolicy::weights(weights)).await
    }

    async fn switch_to(&self, group: &Group) -> Result<(), DriverError> {
        self.apply_policy(&TrafficPolicy::switch(group)).await
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::of([
            Capability::Weights,
            Capability::Switch,
            Capability::HeaderMatch,
            Capability::QueryMatch,
            Capability::RegexMatch,
            Capability::Mirror,
        ])
    }

    async fn apply_policy(&self, policy: &TrafficPolicy) -> Result<(), DriverError> {
        self.capabilities().check(self.name(), policy)?;
        crate::routing::check_groups(self.name(), policy, &self.inner.managed.backends)?;
        Ok(self.apply(policy).await?)
    }

    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        Ok(self.live().await?)
    }

    /// Reads the object and checks it has the managed route; fails with
    /// what is missing (the object, the CRD, the route, a permission).
    async fn preflight(&self) -> Result<(), DriverError> {
        self.live().await.map(|_| ()).map_err(|e| {
            let not_wired = matches!(
                e,
                KubernetesError::NotFound { .. } | KubernetesError::NoManagedRoute { .. }
            );
            let d = DriverError::from(e);
            if not_wired {
                d.with_preflight_failure(PreflightFailure::NotWired)
            } else {
                d
            }
        })
    }
}
