//! A [`TrafficPolicy`] compiled to nginx: the http-level part goes into the
//! upstream include file, under the weighted upstream, and the part that
//! must sit in the proxying `location` goes into the location include.
//!
//! For the upstream `app` (variables are `$deploykit_app_…`):
//!
//! * one upstream per group, `app__<group>`, with that group's servers;
//! * a chain of `map`s, one per rule, in order: each looks at
//!   `$http_<header>`, `$cookie_<name>` or `$arg_<name>` and yields the
//!   rule's group upstream when the value matches, or the next map's
//!   variable; the first map is `$deploykit_app_upstream`, which the
//!   location's `proxy_pass http://$deploykit_app_upstream;` reads;
//! * the default at the end of the chain: the weighted upstream `app`, or,
//!   for a sticky split, a `split_clients` on the stable key choosing a
//!   group upstream by percent (for a deploykit cookie, a `map` turns a
//!   missing cookie into `$request_id`, and `$deploykit_app_set_cookie`
//!   hands that id to the client);
//! * for mirroring, a `split_clients` on `$request_id` for the percent and a
//!   `map` on `method:picked` naming the shadow upstream or nothing; the
//!   location mirrors every request to an internal location that answers
//!   `204` at once when that variable is empty and otherwise proxies the
//!   copy to the shadow upstream.
//!
//! Every value written comes from a validated policy (names checked by
//! [`TrafficPolicy::validate`], group and upstream names by the name rules),
//! and values inside quotes are escaped for nginx's quoted strings
//! (backslash and double quote), so nothing can end a string or a block.
//! Values are compared as case-sensitive regexes (`~^…$` for exact
//! matches): nginx compares plain `map` strings without regard to case.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::render::{group_upstreams, RenderOpts};
use super::state::State;
use crate::names::Group;
use crate::routing::{Match, RequestKey, Sticky, TrafficPolicy};

/// How long a sticky cookie deploykit sets lives: 30 days, so a user keeps
/// their group across visits for the length of a typical experiment.
const STICKY_COOKIE_MAX_AGE: u32 = 30 * 24 * 3600;

/// The prefix of every variable for upstream `name`: `deploykit_<name>_`,
/// with `.` and `-` (allowed in names, not in nginx variables) as `_`.
pub(super) fn var_prefix(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("deploykit_{safe}_")
}

/// The upstream block holding `group`'s servers.
pub(super) fn group_upstream(name: &str, group: &Group) -> String {
    format!("{name}__{group}")
}

/// The internal location mirrored requests go through.
pub(super) fn mirror_location(name: &str) -> String {
    format!(
        "/_deploykit_mirror_{}",
        var_prefix(name)
            .trim_start_matches("deploykit_")
            .trim_end_matches('_')
    )
}

/// `text` as an nginx double-quoted string.
fn quoted(text: &str) -> String {
    let mut s = String::with_capacity(text.len() + 2);
    s.push('"');
    for c in text.chars() {
        if matches!(c, '\\' | '"') {
            s.push('\\');
        }
        s.push(c);
    }
    s.push('"');
    s
}

/// The nginx variable holding a header, cookie or query value.
fn request_var(m: &Match) -> String {
    match m {
        Match::Header { name, .. } => header_var(name),
        Match::Cookie { name, .. } => format!("$cookie_{name}"),
        Match::Query { name, .. } => format!("$arg_{name}"),
    }
}

fn header_var(name: &str) -> String {
    format!("$http_{}", name.to_ascii_lowercase().replace('-', "_"))
}

/// The http-level routing text appended to the upstream include file.
pub(super) fn render_http(name: &str, st: &State, opts: RenderOpts) -> String {
    let v = var_prefix(name);
    let mut s = String::from("\n# Routing policy, compiled by deploykit.\n");
    for up in group_upstreams(name, st, opts) {
        s.push_str(&up.render_block());
    }
    let policy = st.policy.as_ref();
    let rules = policy.map_or(&[][..], |p| p.rules.as_slice());
    let sticky = policy.and_then(|p| p.split.sticky.as_ref());
    let default_target = match sticky {
        Some(_) => format!("${v}split"),
        None => name.to_string(),
    };
    for (i, rule) in rules.iter().enumerate() {
        let var = if i == 0 {
            format!("${v}upstream")
        } else {
            format!("${v}rule{i}")
        };
        let next = if i + 1 < rules.len() {
            format!("${v}rule{}", i + 1)
        } else {
            default_target.clone()
        };
        let pattern = format!("~{}", rule.matches.value().to_regex());
        let _ = writeln!(s, "map {} {var} {{", request_var(&rule.matches));
        let _ = writeln!(s, "    default {next};");
        let _ = writeln!(
            s,
            "    {} {};",
            quoted(&pattern),
            group_upstream(name, &rule.group)
        );
        s.push_str("}\n");
    }
    if rules.is_empty() {
        let _ = writeln!(
            s,
            "map $request_method ${v}upstream {{\n    default {default_target};\n}}"
        );
    }
    if let Some(sticky) = sticky {
        {
            let key = match sticky {
                Sticky::Cookie { name: cookie } => {
                    let _ = writeln!(
                        s,
                        "map $cookie_{cookie} ${v}sticky_key {{\n    \"\" $request_id;\n    default $cookie_{cookie};\n}}"
                    );
                    let _ = writeln!(
                        s,
                        "map $cookie_{cookie} ${v}set_cookie {{\n    \"\" \"{cookie}=$request_id; Path=/; Max-Age={STICKY_COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax\";\n    default \"\";\n}}"
                    );
                    format!("${v}sticky_key")
                }
                Sticky::Key(k) => match k {
                    RequestKey::Header(h) => header_var(h),
                    RequestKey::Cookie(c) => format!("$cookie_{c}"),
                    RequestKey::Query(q) => format!("$arg_{q}"),
                    RequestKey::ClientAddress => "$remote_addr".to_string(),
                },
            };
            let shares = st.roster.shares.clone().unwrap_or_default();
            let _ = writeln!(
                s,
                "split_clients \"${{{}}}\" ${v}split {{",
                key.trim_start_matches('$')
            );
            s.push_str(&split_lines(name, &shares));
            s.push_str("}\n");
        }
    }
    if !matches!(sticky, Some(Sticky::Cookie { .. })) {
        let _ = writeln!(s, "map $request_method ${v}set_cookie {{\n    default \"\";\n}}");
    }
    if let Some(m) = policy.and_then(|p| p.mirror.as_ref()) {
        let _ = writeln!(s, "split_clients \"${{request_id}}\" ${v}mirror_pick {{");
        if m.percent >= 100 {
            s.push_str("    * 1;\n");
        } else {
            let _ = writeln!(s, "    {}% 1;\n    * \"\";", m.percent);
        }
        s.push_str("}\n");
        let _ = writeln!(
            s,
            "map \"$request_method:${v}mirror_pick\" ${v}mirror {{\n    default \"\";"
        );
        for method in &m.methods {
            let _ = writeln!(s, "    \"{method}:1\" {};", group_upstream(name, &m.to));
        }
        s.push_str("}\n");
    }
    s
}

/// `split_clients` lines for the shares: every group above 0 % but the
/// last gets its percent, the last gets the rest (`*`).
fn split_lines(name: &str, shares: &BTreeMap<Group, u8>) -> String {
    let live: Vec<(&Group, u8)> = shares
        .iter()
        .filter(|(_, p)| **p > 0)
        .map(|(g, p)| (g, *p))
        .collect();
    let mut s = String::new();
    for (i, (g, p)) in live.iter().enumerate() {
        if i + 1 == live.len() {
            let _ = writeln!(s, "    * {};", group_upstream(name, g));
        } else {
            let _ = writeln!(s, "    {p}% {};", group_upstream(name, g));
        }
    }
    s
}

/// The location include: the `proxy_pass` through the routing variable,
/// the sticky cookie, and the mirror with its internal location.
pub(super) fn render_location(
    name: &str,
    policy: Option<&TrafficPolicy>,
    mirror_timeout: Option<std::time::Duration>,
) -> String {
    let v = var_prefix(name);
    let mut s = String::from(
        "# Managed by deploykit: include inside the location that proxies to the application,\n\
         # in place of its proxy_pass; rendered from the routing policy on every change.\n",
    );
    let _ = writeln!(s, "proxy_pass http://${v}upstream;");
    if matches!(
        policy.and_then(|p| p.split.sticky.as_ref()),
        Some(Sticky::Cookie { .. })
    ) {
        let _ = writeln!(s, "add_header Set-Cookie ${v}set_cookie;");
    }
    if let Some(m) = policy.and_then(|p| p.mirror.as_ref()) {
        let loc = mirror_location(name);
        let body = if m.request_body { "on" } else { "off" };
        let _ = writeln!(s, "mirror {loc};\nmirror_request_body {body};");
        // nginx holds a keep-alive client's next request until the copy
        // ends, so these bound what a slow shadow costs the primary.
        let timeouts = mirror_timeout.map_or(String::new(), |t| {
            let ms = t.as_millis().max(1);
            format!(
                "    proxy_connect_timeout {ms}ms;\n    proxy_send_timeout {ms}ms;\n    proxy_read_timeout {ms}ms;\n"
            )
        });
        let _ = writeln!(
            s,
            "location = {loc} {{\n    internal;\n    mirror off;\n    if (${v}mirror = \"\") {{\n        return 204;\n    }}\n{timeouts}    \
             proxy_pass http://${v}mirror$request_uri;\n}}"
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::lb::nginx::DrainMode;
    use crate::lb::roster::{test_backend as backend, Roster, RosterRules};
    use crate::routing::{Mirror, Rule, Split, ValueMatch};
    use crate::GroupWeight;

    const OPTS: RenderOpts = RenderOpts {
        idle_as_backup: false,
        drain: DrainMode::Reload,
        routing: true,
    };

    fn g(s: &str) -> Group {
        Group::new(s).unwrap()
    }

    /// One stable, one canary and one shadow server under `policy`.
    fn state(policy: TrafficPolicy) -> State {
        let rules = RosterRules {
            field: "nginx backends",
            when_empty: "is empty",
            member: "instance",
            distinct_addresses: true,
        };
        let mut roster = Roster::new(
            vec![
                backend("s-1", 9001, "stable"),
                backend("c-1", 9002, "canary"),
                backend("m-1", 9003, "shadow"),
            ],
            rules,
        )
        .unwrap();
        roster.shares = Some(policy.shares());
        State {
            roster,
            drains: BTreeMap::new(),
            policy: Some(policy),
            via: BTreeMap::new(),
        }
    }

    fn weights(stable: u8, canary: u8) -> Vec<GroupWeight> {
        vec![
            GroupWeight {
                group: g("stable"),
                percent: stable,
            },
            GroupWeight {
                group: g("canary"),
                percent: canary,
            },
        ]
    }

    #[test]
    fn rules_chain_maps_in_order_down_to_the_weighted_upstream() {
        let policy = TrafficPolicy {
            rules: vec![
                Rule {
                    matches: Match::Header {
                        name: "X-Canary".into(),
                        value: ValueMatch::Exact("a.b".into()),
                    },
                    group: g("canary"),
                },
                Rule {
                    matches: Match::Cookie {
                        name: "beta".into(),
                        value: ValueMatch::Regex(r"^\d+$".into()),
                    },
                    group: g("canary"),
                },
            ],
            split: Split {
                weights: weights(100, 0),
                sticky: None,
            },
            mirror: None,
        };
        let text = render_http("app", &state(policy.clone()), OPTS);
        assert!(
            text.contains(
                "map $http_x_canary $deploykit_app_upstream {\n    default $deploykit_app_rule1;\n    \"~^a\\\\.b$\" app__canary;\n}\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "map $cookie_beta $deploykit_app_rule1 {\n    default app;\n    \"~^\\\\d+$\" app__canary;\n}\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("upstream app__canary {\n    server 127.0.0.1:9002; # c-1\n}"),
            "{text}"
        );
        assert!(
            text.contains("map $request_method $deploykit_app_set_cookie {\n    default \"\";\n}"),
            "{text}"
        );
        let loc = render_location("app", Some(&policy), None);
        assert!(
            loc.contains("proxy_pass http://$deploykit_app_upstream;\n"),
            "{loc}"
        );
        assert!(!loc.contains("mirror") && !loc.contains("add_header"), "{loc}");
    }

    #[test]
    fn a_sticky_split_routes_three_variants_on_one_key() {
        let three = vec![
            GroupWeight {
                group: g("stable"),
                percent: 50,
            },
            GroupWeight {
                group: g("canary"),
                percent: 30,
            },
            GroupWeight {
                group: g("shadow"),
                percent: 20,
            },
        ];
        let policy = TrafficPolicy {
            rules: Vec::new(),
            split: Split {
                weights: three,
                sticky: Some(Sticky::Cookie {
                    name: "dk_variant".into(),
                }),
            },
            mirror: None,
        };
        policy.validate().unwrap();
        let text = render_http("app", &state(policy), OPTS);
        // One hash of the user's key picks among all three: a user stays on
        // one variant, whichever it is.
        assert!(
            text.contains("split_clients \"${deploykit_app_sticky_key}\" $deploykit_app_split {\n    30% app__canary;\n    20% app__shadow;\n    * app__stable;\n}"),
            "{text}"
        );
        assert_eq!(text.matches("split_clients").count(), 1, "{text}");
    }

    #[test]
    fn a_sticky_cookie_split_hashes_the_cookie_or_the_id_it_hands_out() {
        let policy = TrafficPolicy {
            rules: Vec::new(),
            split: Split {
                weights: weights(90, 10),
                sticky: Some(Sticky::Cookie {
                    name: "dk_user".into(),
                }),
            },
            mirror: None,
        };
        let text = render_http("app", &state(policy.clone()), OPTS);
        assert!(
            text.contains(
                "map $request_method $deploykit_app_upstream {\n    default $deploykit_app_split;\n}"
            ),
            "{text}"
        );
        assert!(
            text.contains("split_clients \"${deploykit_app_sticky_key}\" $deploykit_app_split {\n    10% app__canary;\n    * app__stable;\n}"),
            "{text}"
        );
        assert!(text.contains("\"\" \"dk_user=$request_id; Path=/;"), "{text}");
        assert!(render_location("app", Some(&policy), None)
            .contains("add_header Set-Cookie $deploykit_app_set_cookie;"));
    }

    #[test]
    fn mirroring_picks_by_percent_and_method_in_an_internal_location() {
        let policy = TrafficPolicy {
            mirror: Some(Mirror {
                request_body: false,
                ..Mirror::new(g("shadow"), 25)
            }),
            ..TrafficPolicy::weights(&weights(100, 0))
        };
        let text = render_http("app", &state(policy.clone()), OPTS);
        assert!(
            text.contains(
                "split_clients \"${request_id}\" $deploykit_app_mirror_pick {\n    25% 1;\n    * \"\";\n}"
            ),
            "{text}"
        );
        assert!(
            text.contains("map \"$request_method:$deploykit_app_mirror_pick\" $deploykit_app_mirror {\n    default \"\";\n    \"GET:1\" app__shadow;\n    \"HEAD:1\" app__shadow;\n}"),
            "{text}"
        );
        let loc = render_location("app", Some(&policy), None);
        assert!(
            loc.contains("mirror /_deploykit_mirror_app;\nmirror_request_body off;\n"),
            "{loc}"
        );
        assert!(
            loc.contains("location = /_deploykit_mirror_app {\n    internal;"),
            "{loc}"
        );
        assert!(
            loc.contains("proxy_pass http://$deploykit_app_mirror$request_uri;"),
            "{loc}"
        );
        assert!(!loc.contains("timeout"), "nginx's own timeouts by default: {loc}");
        // A mirror timeout bounds the copy, in the mirror location only.
        let loc = render_location("app", Some(&policy), Some(std::time::Duration::from_millis(200)));
        assert!(
            loc.contains(
                "        return 204;\n    }\n    proxy_connect_timeout 200ms;\n    proxy_send_timeout 200ms;\n    \
                 proxy_read_timeout 200ms;\n    proxy_pass http://$deploykit_app_mirror$request_uri;\n}"
            ),
            "{loc}"
        );
    }

    #[test]
    fn quoted_strings_escape_backslash_and_quote() {
        assert_eq!(quoted(r"~^a\.b$"), r#""~^a\\.b$""#);
        assert_eq!(quoted("a\"b"), r#""a\"b""#);
    }

    #[test]
    fn names_become_variable_safe() {
        assert_eq!(var_prefix("my-app.v2"), "deploykit_my_app_v2_");
        assert_eq!(mirror_location("my-app"), "/_deploykit_mirror_my_app");
        assert_eq!(header_var("X-Canary-User"), "$http_x_canary_user");
    }
}
