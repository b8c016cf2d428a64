//! Gateway API `gateway.networking.k8s.io/v1` `HTTPRoute`: typed for the
//! fields deploykit reads and writes, every other field kept as it came.

use std::borrow::Cow;
use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::model::{Condition, Managed};
use super::{KubernetesError, Routed, TrafficApi};
use crate::names::Group;
use crate::routing::{TrafficPolicy, ValueMatch};

type Rest = Map<String, Value>;

/// The most rules an HTTPRoute may have (the CRD's `maxItems`).
const MAX_RULES: usize = 16;
/// The most matches one rule may have.
const MAX_MATCHES: usize = 64;

/// An HTTPRoute as read from the API server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct HttpRoute {
    pub(crate) metadata: ObjectMeta,
    pub(crate) spec: Spec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Spec {
    #[serde(default)]
    pub(crate) rules: Vec<Rule>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) filters: Vec<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) backend_refs: Vec<BackendRef>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RouteMatch {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) headers: Vec<NameMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) query_params: Vec<NameMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) method: Option<String>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

/// A header or query-parameter match (`type` defaults to `Exact`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct NameMatch {
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<String>,
    pub(crate) name: String,
    pub(crate) value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kind: Option<String>,
    pub(crate) name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) weight: Option<u32>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

/// The `RequestMirror` filter deploykit adds to a mirrored twin.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct MirrorFilter {
    #[serde(rename = "type")]
    kind: &'static str,
    request_mirror: RequestMirror,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct RequestMirror {
    backend_ref: MirrorRef,
    #[serde(skip_serializing_if = "Option::is_none")]
    percent: Option<u8>,
}

#[derive(Debug, Serialize)]
struct MirrorRef {
    name: String,
    port: u16,
}

impl Resource for HttpRoute {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "HTTPRoute".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "gateway.networking.k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "httproutes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The group of a `backendRef`: only a core Service in the route's own
/// namespace can be one of deploykit's.
fn group_of<'m>(m: &'m Managed, r: &BackendRef) -> Option<&'m Group> {
    let service =
        r.group.as_deref().unwrap_or("").is_empty() && r.kind.as_deref().unwrap_or("Service") == "Service";
    let here = r.namespace.as_deref().is_none_or(|ns| ns == m.namespace);
    if service && here {
        m.group_of(&r.name, r.port, None)
    } else {
        None
    }
}

fn backend_ref(m: &Managed, base: &Rule, group: &Group, weight: u32) -> BackendRef {
    if let Some(r) = base.backend_refs.iter().find(|r| group_of(m, r) == Some(group)) {
        return BackendRef {
            weight: Some(weight),
            ..r.clone()
        };
    }
    let b = &m.backends[group];
    BackendRef {
        group: None,
        kind: None,
        name: b.service.clone(),
        namespace: None,
        port: b.port,
        weight: Some(weight),
        rest: Rest::new(),
    }
}

/// Gateway API regexes are RE2 in practice and matched in full by the
/// Envoy-based implementations, so a policy regex is wrapped to match
/// anywhere and a prefix becomes an anchored regex.
fn name_match(name: &str, v: &ValueMatch) -> NameMatch {
    let (kind, value) = match v {
        ValueMatch::Exact(s) => ("Exact", s.clone()),
        ValueMatch::Prefix(s) => ("RegularExpression", format!("^{}.*", regex::escape(s))),
        ValueMatch::Regex(r) => ("RegularExpression", format!(".*(?:{r}).*")),
    };
    NameMatch {
        kind: Some(kind.into()),
        name: name.into(),
        value,
    }
}

impl Routed for HttpRoute {
    const API: TrafficApi = TrafficApi::GatewayApi;
    type Route = Rule;

    fn routes(&self) -> &[Rule] {
        &self.spec.rules
    }

    fn compile(&self, m: &Managed, policy: &TrafficPolicy) -> Result<Vec<Rule>, KubernetesError> {
        let api = Self::API;
        let idx = self
            .spec
            .rules
            .iter()
            .position(|r| r.name.as_deref() == Some(m.route.as_str()))
            .ok_or_else(|| m.no_route(api))?;
        let base = &self.spec.rules[idx];

        // Weights are proportional: managed backendRefs get their group's
        // percent, the others keep theirs.
        let percents = m.percents(policy);
        let mut default = base.clone();
        let mut seen = BTreeSet::new();
        default.backend_refs = base
            .backend_refs
            .iter()
            .filter_map(|r| match group_of(m, r) {
                Some(g) if !seen.insert(g) => None,
                Some(g) => Some(BackendRef {
                    weight: Some(u32::from(percents[g])),
                    ..r.clone()
                }),
                None => Some(r.clone()),
            })
            .collect();
        for (g, p) in &percents {
            if *p > 0 && !seen.contains(g) {
                default.backend_refs.push(backend_ref(m, base, g, u32::from(*p)));
            }
        }

        let mut managed = Vec::new();
        let mut first_query = None;
        for (i, rule) in policy.rules.iter().enumerate() {
            let field = format!("rules[{i}]");
            let cond = Condition::of(&rule.matches).ok_or_else(|| {
                m.unroutable(
                    api,
                    &field,
                    "an HTTPRoute cannot match a cookie; use a header rule",
                )
            })?;
            match (&cond, first_query) {
                (Condition::Query(..), None) => first_query = Some(i),
                (Condition::Header(..), Some(q)) => {
                    return Err(m.unroutable(
                        api,
                        field,
                        format!(
                        "Gateway API ranks header matches above query-parameter matches, so this rule would \
                             win over rules[{q}]; put header rules before query rules"
                    ),
                    ))
                }
                _ => {}
            }
            let mut matches = if default.matches.is_empty() {
                vec![RouteMatch::default()]
            } else {
                default.matches.clone()
            };
            for mr in &mut matches {
                let (list, name, value) = match &cond {
                    Condition::Header(n, v) => (&mut mr.headers, n, v),
                    Condition::Query(n, v) => (&mut mr.query_params, n, v),
                };
                if list.iter().any(|h| h.name.eq_ignore_ascii_case(name)) {
                    return Err(m.unroutable(
                        api,
                        field,
                        format!(
                            "rule {} already matches on {name}; a rule cannot add a second condition on it",
                            m.route
                        ),
                    ));
                }
                list.push(name_match(name, value));
            }
            managed.push(Rule {
                name: Some(m.match_name(i)),
                matches,
                backend_refs: vec![backend_ref(m, base, &rule.group, 1)],
                ..default.clone()
            });
        }
        managed.push(default);

        if let Some(mirror) = &policy.mirror {
            if !mirror.request_body {
                return Err(m.unroutable(
                    api,
                    "mirror.request_body",
                    "RequestMirror always sends the request body; set it to true",
                ));
            }
            let b = &m.backends[&mirror.to];
            let filter = serde_json::to_value(MirrorFilter {
                kind: "RequestMirror",
                request_mirror: RequestMirror {
                    backend_ref: MirrorRef {
                        name: b.service.clone(),
                        // Checked at build: a Gateway API backend has a port.
                        port: b.port.unwrap_or_default(),
                    },
                    percent: (mirror.percent < 100).then_some(mirror.percent),
                },
            })
            .expect("a struct of strings and numbers serialises");
            let mut with_twins = Vec::new();
            for r in managed {
                let mut matches = Vec::new();
                for mr in if r.matches.is_empty() {
                    vec![RouteMatch::default()]
                } else {
                    r.matches.clone()
                } {
                    if mr.method.is_some() {
                        return Err(m.unroutable(
                            api,
                            "mirror.methods",
                            format!("rule {} already matches on the method", m.route),
                        ));
                    }
                    for method in &mirror.methods {
                        matches.push(RouteMatch {
                            method: Some(method.clone()),
                            ..mr.clone()
                        });
                    }
                }
                if matches.len() > MAX_MATCHES {
                    return Err(m.unroutable(
                        api,
                        "mirror.methods",
                        format!("the mirrored rule would have {} matches, more than the {MAX_MATCHES} an HTTPRoute rule allows", matches.len()),
                    ));
                }
                let mut filters = r.filters.clone();
                filters.push(filter.clone());
                with_twins.push(Rule {
                    name: r.name.as_ref().map(|n| format!("{n}-mirror")),
                    matches,
                    filters,
                    ..r.clone()
                });
                with_twins.push(r);
            }
            managed = with_twins;
        }

        let mut out = Vec::with_capacity(self.spec.rules.len() + managed.len());
        for (i, r) in self.spec.rules.iter().enumerate() {
            if i == idx {
                out.append(&mut managed);
            } else if !m.is_derived(r.name.as_deref()) {
                out.push(r.clone());
            }
        }
        if out.len() > MAX_RULES {
            return Err(m.unroutable(
                api,
                "rules",
                format!(
                    "the HTTPRoute would have {} rules, more than the {MAX_RULES} it allows (each rule adds one, \
                     a mirror doubles deploykit's); use fewer rules",
                    out.len()
                ),
            ));
        }
        Ok(out)
    }

    fn patch_body(resource_version: &str, routes: &[Rule]) -> Value {
        serde_json::json!({
            "metadata": { "resourceVersion": resource_version },
            "spec": { "rules": routes },
        })
    }

    fn live(&self, m: &Managed) -> Result<Option<Group>, KubernetesError> {
        let base = self
            .spec
            .rules
            .iter()
            .find(|r| r.name.as_deref() == Some(m.route.as_str()))
            .ok_or_else(|| m.no_route(Self::API))?;
        let mut live = None;
        for r in &base.backend_refs {
            // A missing weight is 1.
            if r.weight.unwrap_or(1) == 0 {
                continue;
            }
            match (group_of(m, r), &live) {
                (Some(g), None) => live = Some(g.clone()),
                _ => return Ok(None),
            }
        }
        // A rule's route answers clients too; mirrored twins only copy.
        for r in self.spec.rules.iter().filter(|r| m.is_derived(r.name.as_deref())) {
            if r.name.as_deref().is_some_and(|n| n.ends_with("-mirror")) {
                continue;
            }
            for d in r.backend_refs.iter().filter(|d| d.weight.unwrap_or(1) > 0) {
                if group_of(m, d) != live.as_ref() {
                    return Ok(None);
                }
            }
        }
        Ok(live)
    }
}
