//! The routing policies the load-balancer suite applies, one per
//! [`Capability`], and the optional traffic probe that checks them.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use deploykit::routing::{
    Capability, Match, Mirror, RequestKey, Rule, Split, Sticky, TrafficPolicy, ValueMatch,
};
use deploykit::{Group, GroupWeight};

/// One request a [`TrafficProbe`] sends through the balancer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeRequest {
    /// Path and query, starting with `/`.
    pub path: String,
    /// Request headers, `(name, value)`; a cookie is a `cookie` header.
    pub headers: Vec<(String, String)>,
}

impl ProbeRequest {
    fn plain() -> Self {
        Self {
            path: "/".into(),
            headers: Vec::new(),
        }
    }

    fn header(name: &str, value: &str) -> Self {
        Self {
            path: "/".into(),
            headers: vec![(name.into(), value.into())],
        }
    }

    fn path(path: &str) -> Self {
        Self {
            path: path.into(),
            headers: Vec::new(),
        }
    }
}

impl fmt::Display for ProbeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GET {}", self.path)?;
        for (n, v) in &self.headers {
            write!(f, " {n}: {v}")?;
        }
        Ok(())
    }
}

/// What a [`TrafficProbe`] returns: the group whose backend answered, or
/// what went wrong.
pub type ProbeFuture = Pin<Box<dyn Future<Output = Result<Group, String>> + Send>>;

/// Sends one request through the balancer under test and says which group
/// answered (for example from a header each backend sets). The suite is
/// driver-agnostic, so traffic is checked only when the caller gives one
/// with [`LoadBalancerSuite::traffic_probe`](super::LoadBalancerSuite::traffic_probe).
pub type TrafficProbe = Arc<dyn Fn(ProbeRequest) -> ProbeFuture + Send + Sync>;

/// A policy the suite applies, what it needs, and where requests must go
/// while it is live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyCase {
    /// The capability the policy exercises.
    pub capability: Capability,
    /// The policy.
    pub policy: TrafficPolicy,
    /// Requests and the group each must reach while the policy is live.
    pub routes: Vec<(ProbeRequest, Group)>,
    /// Requests of a sticky split: each must reach one group every time it
    /// is sent, and together they must reach every group of the split.
    pub sticky: Vec<ProbeRequest>,
}

impl PolicyCase {
    /// The group all traffic goes to while the policy is live, if one does:
    /// what `live_group` must read back.
    pub fn live_group(&self) -> Option<Group> {
        if !self.policy.rules.is_empty() {
            return None;
        }
        let live: Vec<&Group> = self
            .policy
            .split
            .weights
            .iter()
            .filter(|w| w.percent > 0)
            .map(|w| &w.group)
            .collect();
        match live.as_slice() {
            [one] => Some((*one).clone()),
            _ => None,
        }
    }
}

fn only(g0: &Group, g1: &Group) -> Vec<GroupWeight> {
    vec![
        GroupWeight {
            group: g0.clone(),
            percent: 100,
        },
        GroupWeight {
            group: g1.clone(),
            percent: 0,
        },
    ]
}

/// The policies the suite applies to a balancer with `groups` (in the order
/// of its backends): one per capability beyond weights and switch, each
/// sending a marked request to the second group and everything else to the
/// first; the mirror copies to the last group. Empty with fewer than two
/// groups. A HAProxy test uses it to write the `use_backend` line of each
/// rule into its config.
pub fn policies(groups: &[Group]) -> Vec<PolicyCase> {
    let [g0, g1, ..] = groups else {
        return Vec::new();
    };
    let last = &groups[groups.len() - 1];
    let rule = |matches: Match| TrafficPolicy {
        rules: vec![Rule {
            matches,
            group: g1.clone(),
        }],
        split: Split {
            weights: only(g0, g1),
            sticky: None,
        },
        mirror: None,
    };
    let sticky = |s: Sticky| TrafficPolicy {
        rules: Vec::new(),
        split: Split {
            weights: vec![
                GroupWeight {
                    group: g0.clone(),
                    percent: 50,
                },
                GroupWeight {
                    group: g1.clone(),
                    percent: 50,
                },
            ],
            sticky: Some(s),
        },
        mirror: None,
    };
    let exact = || ValueMatch::Exact("canary".into());
    let plain_to_g0 = (ProbeRequest::plain(), g0.clone());
    vec![
        PolicyCase {
            capability: Capability::HeaderMatch,
            policy: rule(Match::Header {
                name: "x-conformance".into(),
                value: exact(),
            }),
            routes: vec![
                (ProbeRequest::header("x-conformance", "canary"), g1.clone()),
                (ProbeRequest::header("x-conformance", "Canary"), g0.clone()),
                plain_to_g0.clone(),
            ],
            sticky: Vec::new(),
        },
        PolicyCase {
            capability: Capability::CookieMatch,
            policy: rule(Match::Cookie {
                name: "conformance".into(),
                value: exact(),
            }),
            routes: vec![
                (ProbeRequest::header("cookie", "conformance=canary"), g1.clone()),
                (ProbeRequest::header("cookie", "conformance=stable"), g0.clone()),
                plain_to_g0.clone(),
            ],
            sticky: Vec::new(),
        },
        PolicyCase {
            capability: Capability::QueryMatch,
            policy: rule(Match::Query {
                name: "conformance".into(),
                value: exact(),
            }),
            routes: vec![
                (ProbeRequest::path("/?conformance=canary"), g1.clone()),
                (ProbeRequest::path("/?conformance=other"), g0.clone()),
                plain_to_g0.clone(),
            ],
            sticky: Vec::new(),
        },
        PolicyCase {
            capability: Capability::RegexMatch,
            policy: rule(Match::Header {
                name: "x-conformance-build".into(),
                value: ValueMatch::Regex("^canary-[0-9]+$".into()),
            }),
            routes: vec![
                (
                    ProbeRequest::header("x-conformance-build", "canary-42"),
                    g1.clone(),
                ),
                (
                    ProbeRequest::header("x-conformance-build", "canary-x"),
                    g0.clone(),
                ),
                plain_to_g0.clone(),
            ],
            sticky: Vec::new(),
        },
        PolicyCase {
            capability: Capability::StickyCookie,
            policy: sticky(Sticky::Cookie {
                name: "conformance_sticky".into(),
            }),
            // The balancer sets the cookie on a first answer; a client that
            // sends it back (any value it holds) stays on one group.
            routes: Vec::new(),
            sticky: (1..=20)
                .map(|u| ProbeRequest::header("cookie", &format!("conformance_sticky=user-{u}")))
                .collect(),
        },
        PolicyCase {
            capability: Capability::StickyKey,
            policy: sticky(Sticky::Key(RequestKey::Header("x-conformance-user".into()))),
            routes: Vec::new(),
            sticky: (1..=20)
                .map(|u| ProbeRequest::header("x-conformance-user", &format!("user-{u}")))
                .collect(),
        },
        PolicyCase {
            capability: Capability::Mirror,
            policy: TrafficPolicy {
                rules: Vec::new(),
                split: Split {
                    weights: vec![GroupWeight {
                        group: g0.clone(),
                        percent: 100,
                    }],
                    sticky: None,
                },
                mirror: Some(Mirror::new(last.clone(), 100)),
            },
            // Clients are answered by the split only; the copy is thrown away.
            routes: vec![plain_to_g0],
            sticky: Vec::new(),
        },
    ]
}

/// The plain cases every driver declares: a switch and 100/0 weights
/// through `apply_policy`, and with splits a 50/50 split.
pub(crate) fn plain(g0: &Group, g1: &Group, splits: bool) -> Vec<PolicyCase> {
    let mut cases = vec![
        PolicyCase {
            capability: Capability::Switch,
            policy: TrafficPolicy::switch(g1),
            routes: vec![(ProbeRequest::plain(), g1.clone())],
            sticky: Vec::new(),
        },
        PolicyCase {
            capability: Capability::Weights,
            policy: TrafficPolicy::weights(&only(g0, g1)),
            routes: vec![(ProbeRequest::plain(), g0.clone())],
            sticky: Vec::new(),
        },
    ];
    if splits {
        cases.push(PolicyCase {
            capability: Capability::Weights,
            policy: TrafficPolicy::weights(&[
                GroupWeight {
                    group: g0.clone(),
                    percent: 50,
                },
                GroupWeight {
                    group: g1.clone(),
                    percent: 50,
                },
            ]),
            routes: Vec::new(),
            sticky: Vec::new(),
        });
    }
    cases
}

/// A policy no driver may accept: a header name with a space.
pub(crate) fn invalid(g0: &Group, g1: &Group) -> TrafficPolicy {
    TrafficPolicy {
        rules: vec![Rule {
            matches: Match::Header {
                name: "x conformance".into(),
                value: ValueMatch::Exact("canary".into()),
            },
            group: g1.clone(),
        }],
        split: Split {
            weights: only(g0, g1),
            sticky: None,
        },
        mirror: None,
    }
}

/// A [`TrafficProbe`] kept in the suite (which is `Debug`).
#[derive(Clone)]
pub(crate) struct Probe(pub(crate) TrafficProbe);

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TrafficProbe")
    }
}
