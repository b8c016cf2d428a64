//! Traffic routing beyond weights: one [`TrafficPolicy`] value that every
//! load-balancer driver compiles to its own form.
//!
//! A policy is, in the order a request meets it:
//!
//! 1. ordered [`Rule`]s — the first whose [`Match`] fits the request (a
//!    header, a cookie or a query parameter, compared exactly, by prefix or
//!    by regular expression) sends it to the rule's group;
//! 2. the default [`Split`] — every other request goes to a group by weight,
//!    optionally [`Sticky`] so one user always lands on the same group (a
//!    cookie deploykit sets, or the hash of a request key);
//! 3. an optional [`Mirror`] — a copy of `percent` of the requests whose
//!    method is listed goes to a shadow group, whose answers are thrown
//!    away.
//!
//! [`set_weights`](crate::LoadBalancer::set_weights) and
//! [`switch_to`](crate::LoadBalancer::switch_to) are the special cases
//! [`TrafficPolicy::weights`] and [`TrafficPolicy::switch`].
//!
//! Everything in a policy ends up in a load balancer's config file or
//! runtime command, so [`TrafficPolicy::validate`] is narrow on purpose:
//! header names are `[A-Za-z0-9-]`, cookie and query names `[A-Za-z0-9_]`
//! (nginx reads both as parts of a variable name), values are printable
//! ASCII without whitespace or quotes, and regexes must compile. Drivers
//! escape on top of that for their own syntax.
//!
//! A driver says what it can compile with [`Capabilities`];
//! [`Capabilities::check`] refuses a policy it cannot, naming the driver
//! and the alternative, before anything is touched. Example: 5 % of users
//! on the canary, sticky by a cookie, and internal testers (header
//! `x-canary: always`) always on it:
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use deploykit::routing::{Match, Rule, Split, Sticky, TrafficPolicy, ValueMatch};
//! use deploykit::{Group, GroupWeight};
//!
//! let canary = Group::new("canary")?;
//! let policy = TrafficPolicy {
//!     rules: vec![Rule {
//!         matches: Match::Header { name: "x-canary".into(), value: ValueMatch::Exact("always".into()) },
//!         group: canary.clone(),
//!     }],
//!     split: Split {
//!         weights: vec![
//!             GroupWeight { group: Group::new("stable")?, percent: 95 },
//!             GroupWeight { group: canary, percent: 5 },
//!         ],
//!         sticky: Some(Sticky::Cookie { name: "deploykit_app".into() }),
//!     },
//!     mirror: None,
//! };
//! policy.validate()?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::names::Group;
use crate::traits::GroupWeight;

/// Why a policy is refused: it is malformed, or the driver cannot compile
/// it. Either way nothing was touched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RoutingError {
    /// A field of the policy is not acceptable.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The field at fault, e.g. `routing.rules[0].header`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The load balancer cannot do what the policy asks.
    #[error("the {driver} load balancer cannot {}: {alternative}", capability.describe())]
    Unsupported {
        /// The driver's name (`nginx`, `haproxy`, …).
        driver: String,
        /// The first thing asked for that the driver lacks.
        capability: Capability,
        /// What to use instead.
        alternative: String,
    },
    /// The policy names a group no backend of the load balancer belongs to.
    #[error("the {driver} load balancer has no backend in group {group} ({field}); known groups: {known}")]
    UnknownGroup {
        /// The driver's name.
        driver: String,
        /// Where in the policy the group is named.
        field: String,
        /// The group.
        group: Group,
        /// The groups it knows, comma-separated.
        known: String,
    },
}

impl RoutingError {
    fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        RoutingError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<RoutingError> for crate::DriverError {
    /// A permanent error whose message is the refusal, keeping the typed
    /// refusal for [`DriverError::routing_error`](crate::DriverError::routing_error).
    fn from(e: RoutingError) -> Self {
        crate::DriverError::new(e.to_string()).with_routing_error(e)
    }
}

impl From<RoutingError> for crate::Error {
    fn from(e: RoutingError) -> Self {
        match e {
            RoutingError::Invalid { field, message } => crate::Error::invalid(field, message),
            other => crate::Error::Refused(other.to_string()),
        }
    }
}

/// How a request value is compared.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueMatch {
    /// The whole value equals this text (case-sensitive).
    Exact(String),
    /// The value starts with this text (case-sensitive).
    Prefix(String),
    /// The value matches this regular expression (unanchored; use `^…$`
    /// to anchor). The common subset of Rust's `regex`, PCRE (nginx) and
    /// HAProxy's regex engine: classes, repetition, alternation, anchors.
    Regex(String),
}

impl ValueMatch {
    /// The text given (value, prefix or pattern).
    pub fn text(&self) -> &str {
        match self {
            ValueMatch::Exact(s) | ValueMatch::Prefix(s) | ValueMatch::Regex(s) => s,
        }
    }

    /// As a regex that matches what this matches: drivers that only know
    /// regexes use it.
    pub fn to_regex(&self) -> String {
        match self {
            ValueMatch::Exact(s) => format!("^{}$", regex::escape(s)),
            ValueMatch::Prefix(s) => format!("^{}", regex::escape(s)),
            ValueMatch::Regex(r) => r.clone(),
        }
    }

    fn check(&self, field: &str) -> Result<(), RoutingError> {
        let text = self.text();
        if text.is_empty() || text.len() > MAX_VALUE_LEN {
            return Err(RoutingError::invalid(
                field,
                format!("must be 1-{MAX_VALUE_LEN} characters long"),
            ));
        }
        if let Some(bad) = text
            .chars()
            .find(|c| !c.is_ascii_graphic() || matches!(c, '"' | '\''))
        {
            return Err(RoutingError::invalid(
                field,
                format!(
                    "contains {}; use printable ASCII without spaces or quotes (in a regex, \\s or \\x20 stand for a space)",
                    describe_char(bad)
                ),
            ));
        }
        match self {
            ValueMatch::Regex(r) => regex::Regex::new(r)
                .map(|_| ())
                .map_err(|e| RoutingError::invalid(field, format!("does not compile: {e}"))),
            // A backslash in a literal would be an escape in every target syntax.
            _ if text.contains('\\') => Err(RoutingError::invalid(
                field,
                "contains a backslash; use a regex to match one",
            )),
            _ => Ok(()),
        }
    }
}

/// The longest value, prefix or regex a rule may carry.
const MAX_VALUE_LEN: usize = 256;
/// The longest header, cookie or query-parameter name.
const MAX_NAME_LEN: usize = 64;

fn describe_char(c: char) -> String {
    if c.is_ascii_graphic() {
        format!("the character '{c}'")
    } else {
        format!("the character U+{:04X}", u32::from(c))
    }
}

/// What part of a request a rule looks at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Match {
    /// A request header (name compared case-insensitively).
    Header {
        /// The header's name, `[A-Za-z0-9-]`.
        name: String,
        /// How its value is compared.
        value: ValueMatch,
    },
    /// A cookie.
    Cookie {
        /// The cookie's name, `[A-Za-z0-9_]`.
        name: String,
        /// How its value is compared.
        value: ValueMatch,
    },
    /// A query-string parameter.
    Query {
        /// The parameter's name, `[A-Za-z0-9_]`.
        name: String,
        /// How its value is compared.
        value: ValueMatch,
    },
}

impl Match {
    /// The name of the header, cookie or parameter.
    pub fn name(&self) -> &str {
        match self {
            Match::Header { name, .. } | Match::Cookie { name, .. } | Match::Query { name, .. } => name,
        }
    }

    /// How the value is compared.
    pub fn value(&self) -> &ValueMatch {
        match self {
            Match::Header { value, .. } | Match::Cookie { value, .. } | Match::Query { value, .. } => value,
        }
    }

    fn capability(&self) -> Capability {
        match self {
            Match::Header { .. } => Capability::HeaderMatch,
            Match::Cookie { .. } => Capability::CookieMatch,
            Match::Query { .. } => Capability::QueryMatch,
        }
    }

    fn check(&self, field: &str) -> Result<(), RoutingError> {
        match self {
            Match::Header { name, .. } => check_header_name(&format!("{field}.header"), name),
            Match::Cookie { name, .. } => check_var_name(&format!("{field}.cookie"), name),
            Match::Query { name, .. } => check_var_name(&format!("{field}.query"), name),
        }?;
        let how = match self.value() {
            ValueMatch::Exact(_) => "exact",
            ValueMatch::Prefix(_) => "prefix",
            ValueMatch::Regex(_) => "regex",
        };
        self.value().check(&format!("{field}.{how}"))
    }
}

/// Checks a header name: `[A-Za-z0-9-]`, not starting or ending with `-`.
/// Underscores are refused: nginx reads `-` and `_` alike, so two headers
/// would collide.
pub fn check_header_name(field: &str, name: &str) -> Result<(), RoutingError> {
    check_name(field, name, '-', "[A-Za-z0-9-]")
}

/// Checks a cookie or query-parameter name: `[A-Za-z0-9_]` (nginx reads it
/// as the tail of a variable name, `$cookie_<name>`, `$arg_<name>`).
pub fn check_var_name(field: &str, name: &str) -> Result<(), RoutingError> {
    check_name(field, name, '_', "[A-Za-z0-9_]")
}

fn check_name(field: &str, name: &str, sep: char, set: &str) -> Result<(), RoutingError> {
    let fail = |problem: String| {
        Err(RoutingError::invalid(
            field,
            format!(
                "{problem}; use 1-{MAX_NAME_LEN} characters from {set}, not starting or ending with '{sep}'"
            ),
        ))
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return fail(format!("is {} characters long", name.len()));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == sep)) {
        return fail(format!("contains {}", describe_char(bad)));
    }
    if name.starts_with(sep) || name.ends_with(sep) {
        return fail(format!("'{name}' starts or ends with '{sep}'"));
    }
    Ok(())
}

/// A routing rule: requests the match fits go to `group`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RuleSpec", into = "RuleSpec")]
pub struct Rule {
    /// What the rule looks at.
    pub matches: Match,
    /// Where matching requests go.
    pub group: Group,
}

/// A rule as written in `deploykit.toml`: one of `header`, `cookie`,
/// `query`, and one of `exact`, `prefix`, `regex`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cookie: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    query: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    regex: Option<String>,
    group: Group,
}

impl TryFrom<RuleSpec> for Rule {
    type Error = String;
    fn try_from(s: RuleSpec) -> Result<Self, String> {
        let value = match (s.exact, s.prefix, s.regex) {
            (Some(v), None, None) => ValueMatch::Exact(v),
            (None, Some(v), None) => ValueMatch::Prefix(v),
            (None, None, Some(v)) => ValueMatch::Regex(v),
            _ => return Err("a rule needs exactly one of `exact`, `prefix` or `regex`".into()),
        };
        let matches = match (s.header, s.cookie, s.query) {
            (Some(name), None, None) => Match::Header { name, value },
            (None, Some(name), None) => Match::Cookie { name, value },
            (None, None, Some(name)) => Match::Query { name, value },
            _ => return Err("a rule needs exactly one of `header`, `cookie` or `query`".into()),
        };
        Ok(Rule {
            matches,
            group: s.group,
        })
    }
}

impl From<Rule> for RuleSpec {
    fn from(r: Rule) -> Self {
        let mut s = RuleSpec {
            header: None,
            cookie: None,
            query: None,
            exact: None,
            prefix: None,
            regex: None,
            group: r.group,
        };
        let value = match r.matches {
            Match::Header { name, value } => {
                s.header = Some(name);
                value
            }
            Match::Cookie { name, value } => {
                s.cookie = Some(name);
                value
            }
            Match::Query { name, value } => {
                s.query = Some(name);
                value
            }
        };
        match value {
            ValueMatch::Exact(v) => s.exact = Some(v),
            ValueMatch::Prefix(v) => s.prefix = Some(v),
            ValueMatch::Regex(v) => s.regex = Some(v),
        }
        s
    }
}

/// What keeps one user on one group across requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    /// A cookie the load balancer sets on the first answer (a random id);
    /// the split hashes it, so a user keeps their group as long as the
    /// weights stay the same.
    Cookie {
        /// The cookie's name, `[A-Za-z0-9_]`.
        name: String,
    },
    /// The hash of something the client already sends: a user-id header, a
    /// session cookie of the application, a query parameter, or the client
    /// address.
    Key(RequestKey),
}

/// A request value a sticky split hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKey {
    /// A request header.
    Header(String),
    /// A cookie the application sets.
    Cookie(String),
    /// A query parameter.
    Query(String),
    /// The client's IP address (as the load balancer sees it).
    ClientAddress,
}

/// How requests no rule matched are spread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Each group's share, 0-100, summing to 100. Groups not named get 0 %.
    pub weights: Vec<GroupWeight>,
    /// Keep each user on one group; `None` spreads request by request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
}

/// A copy of some requests sent to a shadow group, whose answers are
/// discarded: clients are only ever answered by the groups of the rules and
/// the split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mirror {
    /// The shadow group. It may not take client traffic (no share, no rule).
    pub to: Group,
    /// Percent of the eligible requests copied, 1-100.
    pub percent: u8,
    /// Methods copied; default `GET`, `HEAD`.
    #[serde(default = "default_mirror_methods")]
    pub methods: Vec<String>,
    /// Copying a method that may change state (anything but `GET`, `HEAD`,
    /// `OPTIONS`) makes the shadow act on real users' writes: refused unless
    /// this is true.
    #[serde(default)]
    pub allow_unsafe_methods: bool,
    /// Send the request body with the copy (nginx `mirror_request_body`).
    /// Default true.
    #[serde(default = "yes")]
    pub request_body: bool,
}

fn yes() -> bool {
    true
}

fn default_mirror_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into()]
}

impl Mirror {
    /// A mirror of `percent` of `GET` and `HEAD` requests to `to`, with
    /// their bodies.
    pub fn new(to: Group, percent: u8) -> Self {
        Self {
            to,
            percent,
            methods: default_mirror_methods(),
            allow_unsafe_methods: false,
            request_body: true,
        }
    }
}

/// A complete routing decision for one load balancer. See the
/// [module docs](self).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicy {
    /// Tried in order; the first that matches decides.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
    /// Where every other request goes.
    pub split: Split,
    /// A copy of some requests to a shadow group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Mirror>,
}

impl TrafficPolicy {
    /// A plain split by weights: what
    /// [`set_weights`](crate::LoadBalancer::set_weights) asks for.
    pub fn weights(weights: &[GroupWeight]) -> Self {
        Self {
            rules: Vec::new(),
            split: Split {
                weights: weights.to_vec(),
                sticky: None,
            },
            mirror: None,
        }
    }

    /// All traffic to `group`: what
    /// [`switch_to`](crate::LoadBalancer::switch_to) asks for.
    pub fn switch(group: &Group) -> Self {
        Self::weights(&[GroupWeight {
            group: group.clone(),
            percent: 100,
        }])
    }

    /// The weights, when the policy is nothing but a non-sticky split.
    pub fn as_weights(&self) -> Option<&[GroupWeight]> {
        (self.rules.is_empty() && self.split.sticky.is_none() && self.mirror.is_none())
            .then_some(self.split.weights.as_slice())
    }

    /// The group, when the policy sends all traffic to one group and does
    /// nothing else.
    pub fn as_switch(&self) -> Option<&Group> {
        match self.as_weights()? {
            [one] if one.percent == 100 => Some(&one.group),
            _ => None,
        }
    }

    /// Each group's share of the default split (groups at 0 % included when
    /// named).
    pub fn shares(&self) -> BTreeMap<Group, u8> {
        self.split
            .weights
            .iter()
            .map(|w| (w.group.clone(), w.percent))
            .collect()
    }

    /// Every group the policy names: rules, split, mirror.
    pub fn groups(&self) -> BTreeSet<&Group> {
        let mut g: BTreeSet<&Group> = self.rules.iter().map(|r| &r.group).collect();
        g.extend(self.split.weights.iter().map(|w| &w.group));
        g.extend(self.mirror.iter().map(|m| &m.to));
        g
    }

    /// What a load balancer needs to apply this policy.
    pub fn required(&self) -> BTreeSet<Capability> {
        let mut need = BTreeSet::new();
        match self.as_switch() {
            Some(_) => {
                need.insert(Capability::Switch);
            }
            None => {
                need.insert(Capability::Weights);
            }
        }
        for r in &self.rules {
            need.insert(r.matches.capability());
            if matches!(r.matches.value(), ValueMatch::Regex(_)) {
                need.insert(Capability::RegexMatch);
            }
        }
        match &self.split.sticky {
            Some(Sticky::Cookie { .. }) => {
                need.insert(Capability::StickyCookie);
            }
            Some(Sticky::Key(_)) => {
                need.insert(Capability::StickyKey);
            }
            None => {}
        }
        if self.mirror.is_some() {
            need.insert(Capability::Mirror);
        }
        need
    }

    /// Checks the whole policy, touching nothing.
    ///
    /// # Errors
    /// [`RoutingError::Invalid`] naming the field (`rules[1].header`,
    /// `split.weights`, `mirror.methods`, …) and the fix: bad names or
    /// values, a regex that does not compile, shares that are not 0-100 or
    /// do not sum to 100, a group named twice in the split, a mirror percent
    /// outside 1-100, a state-changing mirrored method without
    /// `allow_unsafe_methods`, or a mirror group that also takes client
    /// traffic.
    pub fn validate(&self) -> Result<(), RoutingError> {
        for (i, r) in self.rules.iter().enumerate() {
            r.matches.check(&format!("rules[{i}]"))?;
        }
        let mut seen = BTreeSet::new();
        let mut sum = 0u32;
        for w in &self.split.weights {
            if w.percent > 100 {
                return Err(RoutingError::invalid(
                    "split.weights",
                    format!("group {} asks for {} %; give 0-100", w.group, w.percent),
                ));
            }
            if !seen.insert(&w.group) {
                return Err(RoutingError::invalid(
                    "split.weights",
                    format!("group {} is named twice", w.group),
                ));
            }
            sum += u32::from(w.percent);
        }
        if sum != 100 {
            return Err(RoutingError::invalid(
                "split.weights",
                format!("the shares sum to {sum} %, they must sum to 100"),
            ));
        }
        match &self.split.sticky {
            Some(Sticky::Cookie { name }) => check_var_name("split.sticky.cookie", name)?,
            Some(Sticky::Key(RequestKey::Header(h))) => check_header_name("split.sticky.key.header", h)?,
            Some(Sticky::Key(RequestKey::Cookie(c))) => check_var_name("split.sticky.key.cookie", c)?,
            Some(Sticky::Key(RequestKey::Query(q))) => check_var_name("split.sticky.key.query", q)?,
            Some(Sticky::Key(RequestKey::ClientAddress)) | None => {}
        }
        if let Some(m) = &self.mirror {
            if !(1..=100).contains(&m.percent) {
                return Err(RoutingError::invalid(
                    "mirror.percent",
                    format!("is {}; give 1-100 (remove the mirror for none)", m.percent),
                ));
            }
            if m.methods.is_empty() {
                return Err(RoutingError::invalid(
                    "mirror.methods",
                    "is empty; list the methods to copy, e.g. [\"GET\", \"HEAD\"]",
                ));
            }
            for method in &m.methods {
                if method.is_empty() || method.len() > 20 || !method.chars().all(|c| c.is_ascii_uppercase()) {
                    return Err(RoutingError::invalid(
                        "mirror.methods",
                        format!("'{method}' is not an HTTP method; use upper-case letters, e.g. GET"),
                    ));
                }
                if !matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS") && !m.allow_unsafe_methods {
                    return Err(RoutingError::invalid(
                        "mirror.methods",
                        format!(
                            "{method} may change state, and the shadow would act on real users' requests; \
                             set mirror.allow_unsafe_methods = true if the shadow's writes go nowhere real"
                        ),
                    ));
                }
            }
            let serves = self.rules.iter().any(|r| r.group == m.to)
                || self
                    .split
                    .weights
                    .iter()
                    .any(|w| w.group == m.to && w.percent > 0);
            if serves {
                return Err(RoutingError::invalid(
                    "mirror.to",
                    format!(
                        "group {} also answers clients (a rule or a share above 0 % sends requests to it); \
                         a shadow group must take copies only",
                        m.to
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl fmt::Display for ValueMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueMatch::Exact(v) => write!(f, "= {v}"),
            ValueMatch::Prefix(v) => write!(f, "starts with {v}"),
            ValueMatch::Regex(v) => write!(f, "~ {v}"),
        }
    }
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self {
            Match::Header { .. } => "header",
            Match::Cookie { .. } => "cookie",
            Match::Query { .. } => "query",
        };
        write!(f, "{what} {} {}", self.name(), self.value())
    }
}

impl fmt::Display for Sticky {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Sticky::Cookie { name } => write!(f, "sticky by cookie {name} it sets"),
            Sticky::Key(RequestKey::Header(h)) => write!(f, "sticky by header {h}"),
            Sticky::Key(RequestKey::Cookie(c)) => write!(f, "sticky by cookie {c}"),
            Sticky::Key(RequestKey::Query(q)) => write!(f, "sticky by query {q}"),
            Sticky::Key(RequestKey::ClientAddress) => f.write_str("sticky by client address"),
        }
    }
}

/// One line for plans and logs: `header x-canary = always -> canary; split
/// stable=90% canary=10% (sticky by cookie dk_user it sets); mirror 25% of
/// GET,HEAD to shadow`.
impl fmt::Display for TrafficPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.rules {
            write!(f, "{} -> {}; ", r.matches, r.group)?;
        }
        f.write_str("split")?;
        for w in &self.split.weights {
            write!(f, " {}={}%", w.group, w.percent)?;
        }
        if let Some(s) = &self.split.sticky {
            write!(f, " ({s})")?;
        }
        if let Some(m) = &self.mirror {
            write!(
                f,
                "; mirror {}% of {} to {}",
                m.percent,
                m.methods.join(","),
                m.to
            )?;
        }
        Ok(())
    }
}

/// One thing a load balancer may be able to do with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Capability {
    /// Split traffic between groups by percent.
    Weights,
    /// Send all traffic to one group at once.
    Switch,
    /// Route by a request header.
    HeaderMatch,
    /// Route by a cookie.
    CookieMatch,
    /// Route by a query parameter.
    QueryMatch,
    /// Compare with a regular expression (beside exact and prefix).
    RegexMatch,
    /// A sticky split by a cookie the load balancer sets.
    StickyCookie,
    /// A sticky split by the hash of a request value.
    StickyKey,
    /// Copy requests to a shadow group.
    Mirror,
}

impl Capability {
    /// Every capability, in order.
    pub const ALL: [Capability; 9] = [
        Capability::Weights,
        Capability::Switch,
        Capability::HeaderMatch,
        Capability::CookieMatch,
        Capability::QueryMatch,
        Capability::RegexMatch,
        Capability::StickyCookie,
        Capability::StickyKey,
        Capability::Mirror,
    ];

    /// What it does, as a verb phrase for messages: "route by header".
    pub fn describe(self) -> &'static str {
        match self {
            Capability::Weights => "split traffic by weights",
            Capability::Switch => "switch all traffic to one group",
            Capability::HeaderMatch => "route by request header",
            Capability::CookieMatch => "route by cookie",
            Capability::QueryMatch => "route by query parameter",
            Capability::RegexMatch => "match values with a regex",
            Capability::StickyCookie => "keep users on one group with a cookie it sets",
            Capability::StickyKey => "keep users on one group by hashing a request value",
            Capability::Mirror => "mirror requests to a shadow group",
        }
    }

    /// Its name in configuration and output: `header_match`.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Weights => "weights",
            Capability::Switch => "switch",
            Capability::HeaderMatch => "header_match",
            Capability::CookieMatch => "cookie_match",
            Capability::QueryMatch => "query_match",
            Capability::RegexMatch => "regex_match",
            Capability::StickyCookie => "sticky_cookie",
            Capability::StickyKey => "sticky_key",
            Capability::Mirror => "mirror",
        }
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a load balancer can do with traffic; see
/// [`LoadBalancer::capabilities`](crate::LoadBalancer::capabilities).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capabilities {
    set: BTreeSet<Capability>,
}

impl Capabilities {
    /// What every load balancer can do: weights and switch.
    pub fn weights_and_switch() -> Self {
        Self::of([Capability::Weights, Capability::Switch])
    }

    /// Exactly these.
    pub fn of(caps: impl IntoIterator<Item = Capability>) -> Self {
        Self {
            set: caps.into_iter().collect(),
        }
    }

    /// With `cap` added.
    pub fn with(mut self, cap: Capability) -> Self {
        self.set.insert(cap);
        self
    }

    /// Whether `cap` is supported.
    pub fn supports(&self, cap: Capability) -> bool {
        self.set.contains(&cap)
    }

    /// The supported capabilities, in order.
    pub fn iter(&self) -> impl Iterator<Item = Capability> + '_ {
        self.set.iter().copied()
    }

    /// Validates `policy` and checks that a driver named `driver` with these
    /// capabilities can apply it.
    ///
    /// # Errors
    /// [`RoutingError::Invalid`] from [`TrafficPolicy::validate`];
    /// [`RoutingError::Unsupported`] for the first capability missing, with
    /// what to use instead.
    pub fn check(&self, driver: &str, policy: &TrafficPolicy) -> Result<(), RoutingError> {
        policy.validate()?;
        // Mirroring first: no setting of a driver without it brings it.
        let mut required: Vec<Capability> = policy.required().into_iter().collect();
        required.sort_by_key(|c| (*c != Capability::Mirror, *c));
        match required.into_iter().find(|c| !self.supports(*c)) {
            None => Ok(()),
            Some(capability) => Err(RoutingError::Unsupported {
                driver: driver.to_string(),
                capability,
                alternative: alternative(driver, capability),
            }),
        }
    }
}

/// What to use instead when `driver` lacks `cap`.
fn alternative(driver: &str, cap: Capability) -> String {
    match (driver, cap) {
        ("haproxy", Capability::Mirror) => "HAProxy 2.6 has no built-in mirroring; use the nginx driver \
             (load_balancer.kind = \"nginx\" with load_balancer.location_include), which copies requests \
             with its `mirror` directive"
            .into(),
        ("nginx", _) => "set load_balancer.location_include (the location-level file `deploykit setup` \
             writes) so nginx can route per request"
            .into(),
        ("haproxy", Capability::StickyCookie | Capability::StickyKey) => "set load_balancer.map_dir and \
             add the sticky split's lines to haproxy.cfg (docs/load-balancers.md), or use the nginx driver \
             with load_balancer.location_include"
            .into(),
        ("haproxy", _) => "set load_balancer.map_dir and add the rule's use_backend line to haproxy.cfg \
             (docs/load-balancers.md), or use the nginx driver with load_balancer.location_include"
            .into(),
        ("istio" | "gateway-api", Capability::StickyCookie | Capability::StickyKey) => "a sticky split \
             needs a DestinationRule consistentHash (Istio) or session persistence (Gateway API), which \
             deploykit does not manage; pin users with a header rule (routing.rules) instead"
            .into(),
        ("istio" | "gateway-api", _) => "VirtualService and HTTPRoute match headers and query parameters; \
             use a header rule instead"
            .into(),
        (_, Capability::Mirror) => {
            "use the nginx driver, which copies requests with its `mirror` directive".into()
        }
        _ => "use the nginx or HAProxy driver, which route per request".into(),
    }
}

/// Checks that every group `policy` names has a backend, by the groups a
/// driver knows.
///
/// # Errors
/// [`RoutingError::UnknownGroup`] naming the first unknown group and where
/// the policy names it.
pub fn check_groups<T>(
    driver: &str,
    policy: &TrafficPolicy,
    known: &BTreeMap<Group, T>,
) -> Result<(), RoutingError> {
    let named = policy
        .rules
        .iter()
        .enumerate()
        .map(|(i, r)| (format!("rules[{i}].group"), &r.group))
        .chain(
            policy
                .split
                .weights
                .iter()
                .map(|w| ("split.weights".to_string(), &w.group)),
        )
        .chain(policy.mirror.iter().map(|m| ("mirror.to".to_string(), &m.to)));
    for (field, group) in named {
        if !known.contains_key(group) {
            let names: Vec<&str> = known.keys().map(Group::as_str).collect();
            return Err(RoutingError::UnknownGroup {
                driver: driver.to_string(),
                field,
                group: group.clone(),
                known: names.join(", "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Group {
        Group::new(s).unwrap()
    }

    fn w(s: &str, p: u8) -> GroupWeight {
        GroupWeight {
            group: g(s),
            percent: p,
        }
    }

    fn header(name: &str, value: ValueMatch, group: &str) -> Rule {
        Rule {
            matches: Match::Header {
                name: name.into(),
                value,
            },
            group: g(group),
        }
    }

    fn field_of(e: RoutingError) -> String {
        match e {
            RoutingError::Invalid { field, .. } => field,
            other => panic!("not Invalid: {other}"),
        }
    }

    #[test]
    fn weights_and_switch_are_special_cases() {
        let p = TrafficPolicy::weights(&[w("stable", 90), w("canary", 10)]);
        assert_eq!(p.as_weights().unwrap().len(), 2);
        assert_eq!(p.as_switch(), None);
        assert_eq!(p.required(), BTreeSet::from([Capability::Weights]));
        let s = TrafficPolicy::switch(&g("blue"));
        assert_eq!(s.as_switch(), Some(&g("blue")));
        assert_eq!(s.required(), BTreeSet::from([Capability::Switch]));
        assert!(Capabilities::weights_and_switch().check("fake", &p).is_ok());
        assert!(Capabilities::weights_and_switch().check("fake", &s).is_ok());
    }

    #[test]
    fn rules_sticky_and_mirror_need_their_capabilities() {
        let p = TrafficPolicy {
            rules: vec![
                header("x-canary", ValueMatch::Regex("^(yes|1)$".into()), "canary"),
                Rule {
                    matches: Match::Cookie {
                        name: "beta".into(),
                        value: ValueMatch::Exact("on".into()),
                    },
                    group: g("canary"),
                },
            ],
            split: Split {
                weights: vec![w("stable", 100)],
                sticky: Some(Sticky::Key(RequestKey::ClientAddress)),
            },
            mirror: Some(Mirror::new(g("shadow"), 10)),
        };
        assert_eq!(
            p.required(),
            BTreeSet::from([
                Capability::Weights,
                Capability::HeaderMatch,
                Capability::CookieMatch,
                Capability::RegexMatch,
                Capability::StickyKey,
                Capability::Mirror,
            ])
        );
        // With rules, a single 100 % group is no longer a plain switch.
        assert_eq!(p.as_switch(), None);
        // Mirroring is named first: no setting of a driver brings it.
        let e = Capabilities::weights_and_switch().check("fake", &p).unwrap_err();
        assert!(
            matches!(
                e,
                RoutingError::Unsupported {
                    capability: Capability::Mirror,
                    ..
                }
            ),
            "{e}"
        );
        let no_mirror_asked = TrafficPolicy {
            mirror: None,
            ..p.clone()
        };
        let e = Capabilities::weights_and_switch()
            .check("fake", &no_mirror_asked)
            .unwrap_err();
        assert!(
            matches!(
                e,
                RoutingError::Unsupported {
                    capability: Capability::HeaderMatch,
                    ..
                }
            ),
            "{e}"
        );
        let all = Capabilities::of(Capability::ALL);
        assert!(all.check("nginx", &p).is_ok());
        let no_mirror = Capabilities::of(Capability::ALL.into_iter().filter(|c| *c != Capability::Mirror));
        let e = no_mirror.check("haproxy", &p).unwrap_err().to_string();
        assert!(
            e.contains("haproxy")
                && e.contains("HAProxy 2.6 has no built-in mirroring")
                && e.contains("nginx"),
            "{e}"
        );
    }

    #[test]
    fn names_are_checked_for_the_config_syntax_they_end_up_in() {
        for bad in ["", "x canary", "x_canary", "-x", "x\"y", "x;y", "é"] {
            let p = TrafficPolicy {
                rules: vec![header(bad, ValueMatch::Exact("1".into()), "canary")],
                ..TrafficPolicy::switch(&g("stable"))
            };
            assert_eq!(field_of(p.validate().unwrap_err()), "rules[0].header", "{bad:?}");
        }
        let p = TrafficPolicy {
            rules: vec![Rule {
                matches: Match::Cookie {
                    name: "beta-user".into(),
                    value: ValueMatch::Exact("1".into()),
                },
                group: g("canary"),
            }],
            ..TrafficPolicy::switch(&g("stable"))
        };
        let e = p.validate().unwrap_err().to_string();
        assert!(e.contains("rules[0].cookie") && e.contains("[A-Za-z0-9_]"), "{e}");
    }

    #[test]
    fn values_are_printable_without_quotes_and_regexes_compile() {
        let policy = |v: ValueMatch| TrafficPolicy {
            rules: vec![header("x-user", v, "canary")],
            ..TrafficPolicy::switch(&g("stable"))
        };
        for (bad, field) in [
            (ValueMatch::Exact("a b".into()), "rules[0].exact"),
            (ValueMatch::Exact("a\"b".into()), "rules[0].exact"),
            (ValueMatch::Prefix("a\nb".into()), "rules[0].prefix"),
            (ValueMatch::Prefix("a\\b".into()), "rules[0].prefix"),
            (ValueMatch::Exact(String::new()), "rules[0].exact"),
            (ValueMatch::Regex("(unclosed".into()), "rules[0].regex"),
            (ValueMatch::Regex("it's".into()), "rules[0].regex"),
        ] {
            assert_eq!(
                field_of(policy(bad.clone()).validate().unwrap_err()),
                field,
                "{bad:?}"
            );
        }
        let e = policy(ValueMatch::Regex("(unclosed".into()))
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("does not compile"), "{e}");
        assert!(policy(ValueMatch::Regex(r"^user-\d+$".into())).validate().is_ok());
    }

    #[test]
    fn exact_and_prefix_become_escaped_regexes() {
        assert_eq!(ValueMatch::Exact("a.b".into()).to_regex(), r"^a\.b$");
        assert_eq!(ValueMatch::Prefix("v1+".into()).to_regex(), r"^v1\+");
        let re = regex::Regex::new(&ValueMatch::Exact("a.b".into()).to_regex()).unwrap();
        assert!(re.is_match("a.b") && !re.is_match("axb") && !re.is_match("a.bc"));
    }

    #[test]
    fn split_shares_are_checked() {
        let e = TrafficPolicy::weights(&[w("a", 60)]).validate().unwrap_err();
        assert!(e.to_string().contains("sum to 60"), "{e}");
        let e = TrafficPolicy::weights(&[w("a", 50), w("a", 50)])
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = TrafficPolicy::weights(&[w("a", 101)]).validate().unwrap_err();
        assert!(e.to_string().contains("101"), "{e}");
    }

    #[test]
    fn mirroring_state_changing_methods_needs_an_opt_in() {
        let mut p = TrafficPolicy {
            mirror: Some(Mirror::new(g("shadow"), 20)),
            ..TrafficPolicy::switch(&g("stable"))
        };
        assert!(p.validate().is_ok());
        let m = p.mirror.as_mut().unwrap();
        m.methods.push("POST".into());
        let e = p.validate().unwrap_err().to_string();
        assert!(
            e.contains("mirror.methods") && e.contains("allow_unsafe_methods"),
            "{e}"
        );
        p.mirror.as_mut().unwrap().allow_unsafe_methods = true;
        assert!(p.validate().is_ok());
        p.mirror.as_mut().unwrap().methods.push("get".into());
        assert_eq!(field_of(p.validate().unwrap_err()), "mirror.methods");
        p.mirror = Some(Mirror::new(g("shadow"), 0));
        assert_eq!(field_of(p.validate().unwrap_err()), "mirror.percent");
        p.mirror = Some(Mirror::new(g("stable"), 10));
        assert_eq!(field_of(p.validate().unwrap_err()), "mirror.to");
    }

    #[test]
    fn unknown_groups_are_named_with_where_they_appear() {
        let p = TrafficPolicy {
            rules: vec![header("x-canary", ValueMatch::Exact("1".into()), "canry")],
            ..TrafficPolicy::switch(&g("stable"))
        };
        let known = BTreeMap::from([(g("stable"), 1), (g("canary"), 1)]);
        let e = check_groups("nginx", &p, &known).unwrap_err().to_string();
        assert!(
            e.contains("group canry") && e.contains("rules[0].group") && e.contains("canary, stable"),
            "{e}"
        );
    }

    #[test]
    fn rules_read_from_toml_form() {
        let p: TrafficPolicy = serde_json::from_value(serde_json::json!({
            "rules": [
                {"header": "x-canary", "exact": "always", "group": "canary"},
                {"cookie": "beta", "prefix": "on", "group": "canary"},
                {"query": "variant", "regex": "^b$", "group": "canary"}
            ],
            "split": {"weights": [{"group": "stable", "percent": 100}], "sticky": {"cookie": {"name": "dk"}}},
            "mirror": {"to": "shadow", "percent": 5}
        }))
        .unwrap();
        assert_eq!(
            p.rules[1].matches,
            Match::Cookie {
                name: "beta".into(),
                value: ValueMatch::Prefix("on".into())
            }
        );
        assert_eq!(p.mirror.as_ref().unwrap().methods, ["GET", "HEAD"]);
        let back: TrafficPolicy = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
        assert_eq!(back, p);
        let e = serde_json::from_value::<TrafficPolicy>(serde_json::json!({
            "rules": [{"header": "x", "cookie": "y", "exact": "1", "group": "canary"}],
            "split": {"weights": []}
        }))
        .unwrap_err()
        .to_string();
        assert!(e.contains("exactly one of `header`, `cookie` or `query`"), "{e}");
    }
}
