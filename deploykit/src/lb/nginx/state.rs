//! The driver's state, and how it survives from one process to the next:
//! the `# deploykit-state:` comment line in the include file, which a
//! driver built later (the next CLI run, a recovery after a crash) adopts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::procfs::Proc;
use super::DrainMode;
use crate::lb::roster::{Admin, Roster};
use crate::names::{Group, InstanceId};
use crate::routing::TrafficPolicy;

/// Where the include file carries the driver's state, so that a new
/// process (the next CLI run, a recovery after a crash) starts from what
/// nginx actually runs rather than from "every backend in rotation".
pub(super) const STATE_MARKER: &str = "# deploykit-state: ";

/// The part of [`State`] that is not visible in the rendered servers alone:
/// which backends the operator took out (as opposed to a group at 0 %), and
/// the traffic split. Rendered as one JSON comment line; every key is a
/// validated name, so the line cannot contain a newline.
#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shares: Option<BTreeMap<Group, u8>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    out: BTreeMap<InstanceId, Admin>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    policy: Option<TrafficPolicy>,
}

impl SavedState {
    /// In [`DrainMode::UpstreamRetry`] a draining backend is still in
    /// rotation for nginx, so it is not recorded as out.
    fn of(st: &State, drain: DrainMode) -> Self {
        let out_for_nginx = |a: Admin| match a {
            Admin::Ready => false,
            Admin::Draining => drain == DrainMode::Reload,
            Admin::Disabled => true,
        };
        Self {
            shares: st.roster.shares.clone(),
            out: st
                .roster
                .iter()
                .filter(|(_, a)| out_for_nginx(*a))
                .map(|(b, a)| (b.id.clone(), a))
                .collect(),
            policy: st.policy.clone(),
        }
    }
}

/// The `# deploykit-state:` line (with its newline) for `st`, or `None`
/// when there is nothing to record: every backend in rotation, no split.
pub(super) fn saved_line(st: &State, drain: DrainMode) -> Option<String> {
    let saved = SavedState::of(st, drain);
    if saved == SavedState::default() {
        return None;
    }
    let json = serde_json::to_string(&saved).ok()?;
    Some(format!("{STATE_MARKER}{json}\n"))
}

/// The JSON after [`STATE_MARKER`].
fn parse_saved(line: &str) -> serde_json::Result<SavedState> {
    serde_json::from_str(line)
}

/// Fuzzing: a state line that parses is written back, on one line, to the
/// same state.
pub(crate) fn fuzz_line(line: &str) {
    if let Ok(saved) = parse_saved(line) {
        let json = serde_json::to_string(&saved).expect("a parsed state serializes");
        assert!(!json.contains('\n'), "the state is one line");
        assert_eq!(
            parse_saved(&json).ok(),
            Some(saved),
            "a state line reads back as written"
        );
    }
}

/// Adopts the state recorded in an existing include file, if there is one
/// and it fits the configured backends; otherwise leaves `state` as is
/// (every backend in rotation), with a warning when a record was there but
/// could not be used.
pub(super) fn adopt_saved(include: &Path, state: &mut State) {
    let Ok(text) = std::fs::read_to_string(include) else {
        return;
    };
    let Some(line) = text.lines().find_map(|l| l.strip_prefix(STATE_MARKER)) else {
        return;
    };
    let saved = match parse_saved(line) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(file = %include.display(), error = %e,
                "ignoring an unreadable deploykit-state line; starting with every backend in rotation");
            return;
        }
    };
    let groups = state.roster.groups();
    if let Some(shares) = &saved.shares {
        if let Some(g) = shares.iter().find(|(g, p)| **p > 0 && !groups.contains_key(*g)) {
            tracing::warn!(file = %include.display(), group = %g.0,
                "the recorded traffic split names a group that is no longer configured; ignoring the record");
            return;
        }
    }
    if let Some(policy) = &saved.policy {
        if let Err(e) = crate::routing::check_groups("nginx", policy, &groups) {
            tracing::warn!(file = %include.display(), error = %e,
                "the recorded routing policy does not fit the configured backends; ignoring the record");
            return;
        }
    }
    for (id, recorded) in &saved.out {
        // An id no longer configured is not in the roster: nothing to adopt.
        state.roster.set_admin(id, *recorded);
    }
    state.roster.shares = saved.shares;
    state.policy = saved.policy;
}

/// What the driver believes the live include file says, and what each
/// drain waits for.
#[derive(Debug, Clone)]
pub(super) struct State {
    /// The backends, who is out of rotation, and the split (`None`: every
    /// group gets traffic, each server weight 1).
    pub(super) roster: Roster,
    /// Workers alive at the reload that took a backend out of rotation.
    pub(super) drains: BTreeMap<InstanceId, BTreeSet<Proc>>,
    /// The routing policy beyond the split (rules, sticky, mirror), when
    /// one was applied; its weights are `roster.shares`.
    pub(super) policy: Option<TrafficPolicy>,
    /// Backends whose traffic goes to another address for now (a fault
    /// proxy): rendered, never recorded in the state line, so a driver
    /// built later renders every backend at its own address again.
    pub(super) via: BTreeMap<InstanceId, crate::names::Address>,
}
