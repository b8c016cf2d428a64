//! Istio `networking.istio.io/v1` `VirtualService`: typed for the fields
//! deploykit reads and writes, every other field kept as it came.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::Resource;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::model::{apportion, Condition, Managed};
use super::{KubernetesError, Routed, TrafficApi};
use crate::names::Group;
use crate::routing::{TrafficPolicy, ValueMatch};

type Rest = Map<String, Value>;

/// A VirtualService as read from the API server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct VirtualService {
    pub(crate) metadata: ObjectMeta,
    pub(crate) spec: Spec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Spec {
    #[serde(default)]
    pub(crate) http: Vec<HttpRoute>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

/// One `http` route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HttpRoute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) name: Option<String>,
    #[serde(rename = "match", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) matches: Vec<MatchRequest>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) route: Vec<RouteDestination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mirror: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) mirror_percentage: Option<Percent>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MatchRequest {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) headers: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) query_params: BTreeMap<String, StringMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) method: Option<StringMatch>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RouteDestination {
    pub(crate) destination: Destination,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) weight: Option<u32>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Destination {
    pub(crate) host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) subset: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<PortSelector>,
    #[serde(flatten)]
    pub(crate) rest: Rest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct PortSelector {
    pub(crate) number: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Percent {
    pub(crate) value: f64,
}

impl Resource for VirtualService {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "VirtualService".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "networking.istio.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "virtualservices".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

fn group_of<'m>(m: &'m Managed, d: &Destination) -> Option<&'m Group> {
    let port = d.port.as_ref().and_then(|p| u16::try_from(p.number).ok());
    m.group_of(&d.host, port, d.subset.as_deref())
}

/// The destination of `group`: the one the route already has (with its
/// extra fields), or one built from the settings.
fn destination(m: &Managed, base: &HttpRoute, group: &Group) -> Destination {
    if let Some(d) = base
        .route
        .iter()
        .find(|d| group_of(m, &d.destination) == Some(group))
    {
        return d.destination.clone();
    }
    let b = &m.backends[group];
    Destination {
        host: b.service.clone(),
        subset: b.subset.clone(),
        port: b.port.map(|p| PortSelector { number: u32::from(p) }),
        rest: Rest::new(),
    }
}

/// Istio compares regexes against the whole value (Envoy's safe regex), so
/// an unanchored policy regex is wrapped to match anywhere.
fn string_match(v: &ValueMatch, prefix_ok: bool) -> StringMatch {
    match v {
        ValueMatch::Exact(s) => StringMatch::Exact(s.clone()),
        ValueMatch::Prefix(s) if prefix_ok => StringMatch::Prefix(s.clone()),
        ValueMatch::Prefix(s) => StringMatch::Regex(format!("{}.*", regex::escape(s))),
        ValueMatch::Regex(r) => StringMatch::Regex(format!(".*(?:{r}).*")),
    }
}

impl Routed for VirtualService {
    const API: TrafficApi = TrafficApi::Istio;
    type Route = HttpRoute;

    fn routes(&self) -> &[HttpRoute] {
        &self.spec.http
    }

    fn compile(&self, m: &Managed, policy: &TrafficPolicy) -> Result<Vec<HttpRoute>, KubernetesError> {
        let api = Self::API;
        let idx = self
            .spec
            .http
            .iter()
            .position(|r| r.name.as_deref() == Some(m.route.as_str()))
            .ok_or_else(|| m.no_route(api))?;
        let base = &self.spec.http[idx];

        // The split: unmanaged destinations keep their weight, the managed
        // groups share the rest of 100 in proportion.
        let unmanaged: u32 = base
            .route
            .iter()
            .filter(|d| group_of(m, &d.destination).is_none())
            .map(|d| d.weight.unwrap_or(0))
            .sum();
        if unmanaged > 100 {
            return Err(m.unroutable(
                api,
                format!("http route {}", m.route),
                format!("destinations deploykit does not manage weigh {unmanaged}, more than Istio's 100"),
            ));
        }
        let percents = m.percents(policy);
        let shares = apportion(100 - unmanaged, &percents.values().copied().collect::<Vec<_>>());
        let weights: BTreeMap<&Group, u32> = percents.keys().zip(shares).collect();
        let mut default = base.clone();
        let mut seen = BTreeSet::new();
        default.route = base
            .route
            .iter()
            .filter_map(|d| match group_of(m, &d.destination) {
                // A second destination of one group would split its share.
                Some(g) if !seen.insert(g) => None,
                Some(g) => Some(RouteDestination {
                    weight: Some(weights[g]),
                    ..d.clone()
                }),
                None => Some(d.clone()),
            })
            .collect();
        for (g, w) in &weights {
            if *w > 0 && !seen.contains(g) {
                default.route.push(RouteDestination {
                    destination: destination(m, base, g),
                    weight: Some(*w),
                    rest: Rest::new(),
                });
            }
        }

        // One route per rule, in policy order, before the default.
        let mut managed = Vec::new();
        for (i, rule) in policy.rules.iter().enumerate() {
            let field = format!("rules[{i}]");
            let cond = Condition::of(&rule.matches).ok_or_else(|| {
                m.unroutable(
                    api,
                    &field,
                    "a VirtualService cannot match a cookie; use a header rule",
                )
            })?;
            let mut matches = if default.matches.is_empty() {
                vec![MatchRequest::default()]
            } else {
                default.matches.clone()
            };
            for mr in &mut matches {
                let (map, name, value, prefix_ok) = match &cond {
                    Condition::Header(n, v) => (&mut mr.headers, n, v, true),
                    Condition::Query(n, v) => (&mut mr.query_params, n, v, false),
                };
                if map.insert(name.clone(), string_match(value, prefix_ok)).is_some() {
                    return Err(m.unroutable(
                        api,
                        field,
                        format!("http route {} already matches on {name}; a rule cannot add a second condition on it", m.route),
                    ));
                }
            }
            managed.push(HttpRoute {
                name: Some(m.match_name(i)),
                matches,
                route: vec![RouteDestination {
                    destination: destination(m, base, &rule.group),
                    weight: Some(100),
                    rest: Rest::new(),
                }],
                ..default.clone()
            });
        }
        managed.push(default);

        if let Some(mirror) = &policy.mirror {
            if !mirror.request_body {
                return Err(m.unroutable(
                    api,
                    "mirror.request_body",
                    "Istio always mirrors the request body; set it to true",
                ));
            }
            let to = destination(m, base, &mirror.to);
            let mut with_twins = Vec::new();
            for r in managed {
                let mut matches = Vec::new();
                for mr in if r.matches.is_empty() {
                    vec![MatchRequest::default()]
                } else {
                    r.matches.clone()
                } {
                    if mr.method.is_some() {
                        return Err(m.unroutable(
                            api,
                            "mirror.methods",
                            format!("http route {} already matches on the method", m.route),
                        ));
                    }
                    for method in &mirror.methods {
                        matches.push(MatchRequest {
                            method: Some(StringMatch::Exact(method.clone())),
                            ..mr.clone()
                        });
                    }
                }
                with_twins.push(HttpRoute {
                    name: r.name.as_ref().map(|n| format!("{n}-mirror")),
                    matches,
                    mirror: Some(to.clone()),
                    mirror_percentage: Some(Percent {
                        value: f64::from(mirror.percent),
                    }),
                    ..r.clone()
                });
                with_twins.push(r);
            }
            managed = with_twins;
        }

        let mut out = Vec::with_capacity(self.spec.http.len() + managed.len());
        for (i, r) in self.spec.http.iter().enumerate() {
            if i == idx {
                out.append(&mut managed);
            } else if !m.is_derived(r.name.as_deref()) {
                out.push(r.clone());
            }
        }
        Ok(out)
    }

    fn patch_body(resource_version: &str, routes: &[HttpRoute]) -> Value {
        serde_json::json!({
            "metadata": { "resourceVersion": resource_version },
            "spec": { "http": routes },
        })
    }

    fn live(&self, m: &Managed) -> Result<Option<Group>, KubernetesError> {
        let base = self
            .spec
            .http
            .iter()
            .find(|r| r.name.as_deref() == Some(m.route.as_str()))
            .ok_or_else(|| m.no_route(Self::API))?;
        let alone = base.route.len() == 1;
        let mut live = None;
        for d in &base.route {
            // A lone destination without a weight takes everything.
            if d.weight.unwrap_or(if alone { 100 } else { 0 }) == 0 {
                continue;
            }
            match (group_of(m, &d.destination), &live) {
                (Some(g), None) => live = Some(g.clone()),
                _ => return Ok(None),
            }
        }
        // A rule's route answers clients too; mirrored twins only copy.
        for r in self.spec.http.iter().filter(|r| m.is_derived(r.name.as_deref())) {
            if r.name.as_deref().is_some_and(|n| n.ends_with("-mirror")) {
                continue;
            }
            for d in r.route.iter().filter(|d| d.weight.unwrap_or(100) > 0) {
                if group_of(m, &d.destination) != live.as_ref() {
                    return Ok(None);
                }
            }
        }
        Ok(live)
    }
}
