//! The include file, rendered from typed state: the `upstream` block with
//! one `server` line per backend, and the `# deploykit-state:` line when
//! there is state the servers alone do not show.

use std::fmt::Write as _;

use super::state::{saved_line, State};
use super::DrainMode;
use crate::lb::roster::Admin;
use crate::names::{Address, InstanceId};

/// The largest per-server weight the driver renders (the biggest share gets
/// it; smaller shares are scaled down from it).
const MAX_WEIGHT: u32 = 1000;

/// One `server` line of an nginx upstream block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamServer {
    /// The instance it belongs to (rendered as a comment).
    pub id: InstanceId,
    /// `host:port`, validated.
    pub address: Address,
    /// `weight=` (nginx accepts 1 and above; `None` renders no weight).
    pub weight: Option<u32>,
    /// `down`: no traffic.
    pub down: bool,
    /// `backup`: traffic only when every non-backup server is unavailable.
    pub backup: bool,
    /// `max_fails=`: `Some(0)` turns off nginx's passive failover for the
    /// server (`None` renders nginx's default, 1).
    pub max_fails: Option<u32>,
}

/// An nginx `upstream` block, rendered from typed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The upstream's name (validated as a name).
    pub name: String,
    /// Its servers, in a stable order.
    pub servers: Vec<UpstreamServer>,
    /// `keepalive N;`: idle connections each worker keeps open to the
    /// servers (`None` renders none).
    pub keepalive: Option<u32>,
}

impl Upstream {
    /// Renders the include file. Every value in it is a validated name,
    /// address or number, so nothing can break out of the block.
    pub fn render(&self) -> String {
        let mut s =
            String::from("# Managed by deploykit: rendered from its state, replaced on every change.\n");
        s.push_str(&self.render_block());
        s
    }

    /// The `upstream` block alone, without the header comment.
    pub fn render_block(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "upstream {} {{", self.name);
        for srv in &self.servers {
            let _ = write!(s, "    server {}", srv.address);
            if let Some(w) = srv.weight.filter(|w| *w != 1) {
                let _ = write!(s, " weight={w}");
            }
            if let Some(m) = srv.max_fails {
                let _ = write!(s, " max_fails={m}");
            }
            if srv.down {
                s.push_str(" down");
            } else if srv.backup {
                s.push_str(" backup");
            }
            let _ = writeln!(s, "; # {}", srv.id);
        }
        if let Some(k) = self.keepalive {
            let _ = writeln!(s, "    keepalive {k};");
        }
        s.push_str("}\n");
        s
    }
}

/// Idle connections per worker to the servers in
/// [`DrainMode::UpstreamRetry`]: enough for the loopback benchmarks' load,
/// small enough that a stopping instance closes few of them.
const RETRY_KEEPALIVE: u32 = 16;

/// How the driver renders: what the builder chose.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct RenderOpts {
    /// Idle groups' servers are `backup` rather than `down`.
    pub(super) idle_as_backup: bool,
    /// How a drain takes a backend out.
    pub(super) drain: DrainMode,
    /// Routing variables and group upstreams are rendered (a location
    /// include is configured).
    pub(super) routing: bool,
}

/// The upstream block named `name` for `st`: shares become per-server
/// weights, a backend out of rotation is `down`, and an idle group's servers
/// are `down` or, with `idle_as_backup`, `backup`. In
/// [`DrainMode::UpstreamRetry`] a draining backend stays in the block (its
/// own graceful stop turns traffic away, nginx retries elsewhere), every
/// server has `max_fails=0` and the block keeps idle connections alive.
pub(super) fn upstream_for(name: &str, st: &State, opts: RenderOpts) -> Upstream {
    let weights = st.roster.weights(MAX_WEIGHT);
    servers_block(
        name,
        st,
        opts,
        |_| true,
        |g| match &weights {
            None => Some(None),
            Some(w) => w.get(g).map(|w| Some(*w)),
        },
    )
}

/// One upstream per group, `<name>__<group>`, for the routing policy: every
/// server of the group in rotation unless the operator took it out (its
/// group's share of the split does not matter here: rules and sticky splits
/// pick the group, the block only spreads over its servers).
pub(super) fn group_upstreams(name: &str, st: &State, opts: RenderOpts) -> Vec<Upstream> {
    st.roster
        .groups()
        .into_keys()
        .map(|g| {
            let up_name = super::routing::group_upstream(name, &g);
            servers_block(&up_name, st, opts, |b| b == &g, |_| Some(None))
        })
        .collect()
}

/// The upstream block `name` over the backends `member` accepts; `weight`
/// gives a group's per-server weight (`Some(None)`: in rotation without a
/// weight; `None`: the group has no share).
fn servers_block(
    name: &str,
    st: &State,
    opts: RenderOpts,
    member: impl Fn(&crate::names::Group) -> bool,
    weight: impl Fn(&crate::names::Group) -> Option<Option<u32>>,
) -> Upstream {
    let retry = opts.drain == DrainMode::UpstreamRetry;
    let servers = st
        .roster
        .iter()
        .filter(|(b, _)| member(&b.group))
        .map(|(b, admin)| {
            // A drain in upstream-retry mode changes nothing nginx reads.
            let admin = match admin {
                Admin::Draining if retry => Admin::Ready,
                a => a,
            };
            let (in_rotation, weight) = match admin {
                Admin::Draining | Admin::Disabled => (false, None),
                Admin::Ready => match weight(&b.group) {
                    Some(w) => (true, w),
                    None => (false, None),
                },
            };
            let backup = !in_rotation && opts.idle_as_backup && admin == Admin::Ready;
            UpstreamServer {
                id: b.id.clone(),
                address: st.via.get(&b.id).unwrap_or(&b.address).clone(),
                weight,
                down: !in_rotation && !backup,
                backup,
                max_fails: retry.then_some(0),
            }
        })
        .collect();
    Upstream {
        name: name.to_string(),
        servers,
        keepalive: retry.then_some(RETRY_KEEPALIVE),
    }
}

/// The whole include file for `st`: the upstream block, with the
/// `# deploykit-state:` line after its header comment when there is state
/// to record.
pub(super) fn render_file(name: &str, st: &State, opts: RenderOpts) -> String {
    let mut text = upstream_for(name, st, opts).render();
    if opts.routing {
        text.push_str(&super::routing::render_http(name, st, opts));
    }
    if let Some(line) = saved_line(st, opts.drain) {
        let at = text.find('\n').map_or(0, |i| i + 1);
        text.insert_str(at, &line);
    }
    text
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::lb::roster::{test_backend as backend, Roster, RosterRules};
    use crate::names::Group;

    /// Two stable servers and one canary, every one in rotation, no split.
    fn state() -> State {
        let rules = RosterRules {
            field: "nginx backends",
            when_empty: "is empty",
            member: "instance",
            distinct_addresses: true,
        };
        let backends = vec![
            backend("s-1", 9001, "stable"),
            backend("s-2", 9002, "stable"),
            backend("c-1", 9003, "canary"),
        ];
        State {
            roster: Roster::new(backends, rules).unwrap(),
            drains: BTreeMap::new(),
            policy: None,
            via: BTreeMap::new(),
        }
    }

    #[test]
    fn renders_every_server_up_by_default() {
        assert_eq!(
            render_file("app", &state(), RenderOpts::default()),
            "# Managed by deploykit: rendered from its state, replaced on every change.\n\
             upstream app {\n    server 127.0.0.1:9001; # s-1\n    server 127.0.0.1:9002; # s-2\n    \
             server 127.0.0.1:9003; # c-1\n}\n"
        );
    }

    #[test]
    fn a_detour_renders_the_proxy_address_and_is_never_recorded() {
        let mut st = state();
        st.via.insert(
            InstanceId::new("c-1").unwrap(),
            Address::parse("127.0.0.1:7001").unwrap(),
        );
        let text = render_file("app", &st, RenderOpts::default());
        assert!(text.contains("server 127.0.0.1:7001; # c-1"), "{text}");
        assert!(!text.contains("127.0.0.1:9003"), "{text}");
        // Nothing else differs from the default, so no state line: a driver
        // built from this file renders c-1 at its own address again.
        assert!(!text.contains(super::super::state::STATE_MARKER), "{text}");
        st.via.clear();
        assert!(render_file("app", &st, RenderOpts::default()).contains("server 127.0.0.1:9003; # c-1"));
    }

    #[test]
    fn shares_become_weights_and_zero_is_down() {
        let mut st = state();
        st.roster.shares = Some(BTreeMap::from([
            (Group::new("stable").unwrap(), 95),
            (Group::new("canary").unwrap(), 5),
        ]));
        let up = upstream_for("app", &st, RenderOpts::default());
        let w: Vec<Option<u32>> = up.servers.iter().map(|s| s.weight).collect();
        assert_eq!(w, vec![Some(1000), Some(1000), Some(105)]);
        st.roster.shares = Some(BTreeMap::from([(Group::new("stable").unwrap(), 100)]));
        st.roster
            .set_admin(&InstanceId::new("s-2").unwrap(), Admin::Draining);
        let text = render_file("app", &st, RenderOpts::default());
        assert!(
            text.contains("server 127.0.0.1:9001 weight=1000; # s-1"),
            "{text}"
        );
        assert!(text.contains("server 127.0.0.1:9002 down; # s-2"), "{text}");
        assert!(text.contains("server 127.0.0.1:9003 down; # c-1"), "{text}");
        assert!(!text.contains("weight=0"), "{text}");
    }

    const BACKUP: RenderOpts = RenderOpts {
        idle_as_backup: true,
        drain: DrainMode::Reload,
        routing: false,
    };

    #[test]
    fn idle_groups_can_be_backups() {
        let mut st = state();
        st.roster.shares = Some(BTreeMap::from([(Group::new("stable").unwrap(), 100)]));
        let text = render_file("app", &st, BACKUP);
        assert!(text.contains("server 127.0.0.1:9003 backup; # c-1"), "{text}");
        // A drained server is down, never a backup.
        st.roster
            .set_admin(&InstanceId::new("c-1").unwrap(), Admin::Draining);
        assert!(render_file("app", &st, BACKUP).contains("server 127.0.0.1:9003 down; # c-1"));
    }

    #[test]
    fn upstream_retry_keeps_a_draining_server_in_and_never_marks_one_failed() {
        let retry = RenderOpts {
            idle_as_backup: false,
            drain: DrainMode::UpstreamRetry,
            routing: false,
        };
        let mut st = state();
        st.roster
            .set_admin(&InstanceId::new("s-2").unwrap(), Admin::Draining);
        let text = render_file("app", &st, retry);
        assert_eq!(
            text,
            "# Managed by deploykit: rendered from its state, replaced on every change.\n\
             upstream app {\n    server 127.0.0.1:9001 max_fails=0; # s-1\n    \
             server 127.0.0.1:9002 max_fails=0; # s-2\n    server 127.0.0.1:9003 max_fails=0; # c-1\n    \
             keepalive 16;\n}\n"
        );
        // The drain is not recorded either: a later process must not read
        // it as out of rotation, since nginx still sends to it.
        assert_eq!(text, render_file("app", &state(), retry));
        // Taken out for maintenance, it is out for nginx too.
        st.roster
            .set_admin(&InstanceId::new("s-2").unwrap(), Admin::Disabled);
        let text = render_file("app", &st, retry);
        assert!(
            text.contains("server 127.0.0.1:9002 max_fails=0 down; # s-2"),
            "{text}"
        );
        assert!(text.contains(r#""out":{"s-2":"disabled"}"#), "{text}");
    }
}
