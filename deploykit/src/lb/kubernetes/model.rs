//! What both APIs share: the managed settings, name checks, the weight
//! apportionment and the mapping of kube's errors.

use std::collections::BTreeMap;

use super::{KubeBackend, KubernetesError, TrafficApi};
use crate::names::Group;
use crate::routing::{Match, TrafficPolicy};

/// The object and route deploykit manages, and the backend of each group.
#[derive(Debug)]
pub(crate) struct Managed {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) route: String,
    pub(crate) backends: BTreeMap<Group, KubeBackend>,
}

impl Managed {
    /// The name of the route of rule `n`.
    pub(crate) fn match_name(&self, n: usize) -> String {
        format!("{}-match-{n}", self.route)
    }

    /// Whether `name` is one deploykit derives from the managed route (and
    /// so rewrites on every change): `<route>-match-<n>`, `<route>-mirror`,
    /// `<route>-match-<n>-mirror`.
    pub(crate) fn is_derived(&self, name: Option<&str>) -> bool {
        let Some(rest) = name.and_then(|n| n.strip_prefix(self.route.as_str())) else {
            return false;
        };
        let rest = rest.strip_suffix("-mirror").map_or(rest, |r| r);
        if rest.is_empty() {
            // `<route>-mirror` itself, not the route.
            return name.is_some_and(|n| n.ends_with("-mirror"));
        }
        rest.strip_prefix("-match-")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }

    /// The group whose backend is `service`/`port`/`subset`, if any. A
    /// backend without a port matches any port; one with a port needs it.
    pub(crate) fn group_of(&self, service: &str, port: Option<u16>, subset: Option<&str>) -> Option<&Group> {
        self.backends.iter().find_map(|(g, b)| {
            let same =
                b.service == service && b.subset.as_deref() == subset && (b.port.is_none() || b.port == port);
            same.then_some(g)
        })
    }

    /// Each managed group's percent in `policy` (0 when not named).
    pub(crate) fn percents(&self, policy: &TrafficPolicy) -> BTreeMap<Group, u8> {
        let shares = policy.shares();
        self.backends
            .keys()
            .map(|g| (g.clone(), shares.get(g).copied().unwrap_or(0)))
            .collect()
    }

    pub(crate) fn unroutable(
        &self,
        api: TrafficApi,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> KubernetesError {
        KubernetesError::Unroutable {
            kind: api.kind(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn no_route(&self, api: TrafficApi) -> KubernetesError {
        KubernetesError::NoManagedRoute {
            kind: api.kind(),
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            what: match api {
                TrafficApi::Istio => "http route",
                TrafficApi::GatewayApi => "rule",
            },
            route: self.route.clone(),
        }
    }

    /// Maps kube's error for `action` to ours, keeping the API server's own
    /// message and never its Rust form.
    pub(crate) fn api_error(&self, api: TrafficApi, action: &'static str, e: kube::Error) -> KubernetesError {
        let (kind, namespace, name) = (api.kind(), self.namespace.clone(), self.name.clone());
        match e {
            kube::Error::Api(s) if s.is_not_found() => KubernetesError::NotFound {
                kind,
                namespace,
                name,
                message: s.message.clone(),
            },
            kube::Error::Api(s) if s.is_forbidden() || s.code == 401 => KubernetesError::Forbidden {
                action,
                kind,
                namespace,
                name,
                resource: match api {
                    TrafficApi::Istio => "virtualservices.networking.istio.io",
                    TrafficApi::GatewayApi => "httproutes.gateway.networking.k8s.io",
                },
                message: s.message.clone(),
            },
            kube::Error::Api(s) => KubernetesError::Api {
                action,
                kind,
                namespace,
                name,
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
            },
            other => KubernetesError::Transport {
                action,
                kind,
                namespace,
                name,
                source: other,
            },
        }
    }
}

/// Checks a DNS-1123 label: 1-63 of `[a-z0-9-]`, alphanumeric at both ends
/// (namespaces, Services, subsets, route names).
pub(crate) fn check_label(field: &str, value: &str) -> Result<(), KubernetesError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(KubernetesError::Invalid {
            field: field.into(),
            message: format!(
                "'{value}' is not a DNS-1123 label; use 1-63 lower-case letters, digits and '-', \
                 starting and ending with a letter or digit"
            ),
        })
    }
}

/// Checks a DNS-1123 subdomain: labels joined by `.`, at most 253 long
/// (object names).
pub(crate) fn check_subdomain(field: &str, value: &str) -> Result<(), KubernetesError> {
    let ok =
        !value.is_empty() && value.len() <= 253 && value.split('.').all(|l| check_label(field, l).is_ok());
    if ok {
        Ok(())
    } else {
        Err(KubernetesError::Invalid {
            field: field.into(),
            message: format!(
                "'{value}' is not a Kubernetes object name; use lower-case letters, digits, '-' and '.', \
                 at most 253 characters"
            ),
        })
    }
}

/// Shares `total` among `percents` (summing to 100) in proportion, by
/// largest remainder, ties to the earlier entry: the results sum to
/// `total` exactly.
pub(crate) fn apportion(total: u32, percents: &[u8]) -> Vec<u32> {
    let exact: Vec<u64> = percents
        .iter()
        .map(|p| u64::from(*p) * u64::from(total))
        .collect();
    let mut out: Vec<u32> = exact.iter().map(|e| (e / 100) as u32).collect();
    let given: u32 = out.iter().sum();
    let mut order: Vec<usize> = (0..percents.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(exact[i] % 100));
    for &i in order.iter().take(total.saturating_sub(given) as usize) {
        out[i] += 1;
    }
    out
}

/// What a rule's route adds to each of the managed route's matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Condition {
    /// A header (lower-case name), exact / prefix / regex.
    Header(String, crate::routing::ValueMatch),
    /// A query parameter.
    Query(String, crate::routing::ValueMatch),
}

impl Condition {
    /// The condition of a rule's match; cookies are refused by the
    /// capabilities before this.
    pub(crate) fn of(m: &Match) -> Option<Self> {
        match m {
            Match::Header { name, value } => {
                Some(Condition::Header(name.to_ascii_lowercase(), value.clone()))
            }
            Match::Query { name, value } => Some(Condition::Query(name.clone(), value.clone())),
            Match::Cookie { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apportion_is_exact_at_100_and_sums_to_the_total_otherwise() {
        assert_eq!(apportion(100, &[80, 20]), [80, 20]);
        assert_eq!(apportion(100, &[34, 33, 33]), [34, 33, 33]);
        // 90 left by an unmanaged destination at 10: 72 / 18.
        assert_eq!(apportion(90, &[80, 20]), [72, 18]);
        // 33.5, 33.5, 33: the first remainder wins the odd unit.
        let w = apportion(100, &[34, 33, 33]);
        assert_eq!(w.iter().sum::<u32>(), 100);
        let w = apportion(50, &[33, 33, 34]);
        assert_eq!(w, [17, 16, 17]);
        assert_eq!(w.iter().sum::<u32>(), 50);
        assert_eq!(apportion(0, &[50, 50]), [0, 0]);
    }

    #[test]
    fn derived_names_are_recognised_and_nothing_else() {
        let m = Managed {
            namespace: "ns".into(),
            name: "web".into(),
            route: "deploykit".into(),
            backends: BTreeMap::new(),
        };
        for yes in [
            "deploykit-mirror",
            "deploykit-match-0",
            "deploykit-match-12-mirror",
        ] {
            assert!(m.is_derived(Some(yes)), "{yes}");
        }
        for no in [
            "deploykit",
            "deploykit-match-",
            "deploykit-match-x",
            "other-match-0",
            "deploykit-matchy",
        ] {
            assert!(!m.is_derived(Some(no)), "{no}");
        }
        assert!(!m.is_derived(None));
        assert_eq!(m.match_name(3), "deploykit-match-3");
    }

    #[test]
    fn names_are_checked_as_kubernetes_names() {
        assert!(check_label("f", "web-1").is_ok());
        for bad in ["", "Web", "-a", "a-", "a_b", &"a".repeat(64)] {
            let e = check_label("load_balancer.namespace", bad).unwrap_err();
            assert!(
                e.to_string().starts_with("invalid load_balancer.namespace: "),
                "{e}"
            );
        }
        assert!(check_subdomain("f", "web.v2").is_ok());
        assert!(check_subdomain("f", "web..v2").is_err());
    }
}
