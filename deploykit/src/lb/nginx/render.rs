//! The include file, rendered from typed state: the `upstream` block with
//! one `server` line per backend, and the `# deploykit-state:` line when
//! there is state the servers alone do not show.

use std::fmt::Write as _;

use super::state::{saved_line, State};
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
}

/// An nginx `upstream` block, rendered from typed state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The upstream's name (validated as a name).
    pub name: String,
    /// Its servers, in a stable order.
    pub servers: Vec<UpstreamServer>,
}

impl Upstream {
    /// Renders the include file. Every value in it is a validated name,
    /// address or number, so nothing can break out of the block.
    pub fn render(&self) -> String {
        let mut s =
            String::from("# Managed by deploykit: rendered from its state, replaced on every change.\n");
        let _ = writeln!(s, "upstream {} {{", self.name);
        for srv in &self.servers {
            let _ = write!(s, "    server {}", srv.address);
            if let Some(w) = srv.weight.filter(|w| *w != 1) {
                let _ = write!(s, " weight={w}");
            }
            if srv.down {
                s.push_str(" down");
            } else if srv.backup {
                s.push_str(" backup");
            }
            let _ = writeln!(s, "; # {}", srv.id);
        }
        s.push_str("}\n");
        s
    }
}

/// The upstream block named `name` for `st`: shares become per-server
/// weights, a backend out of rotation is `down`, and an idle group's servers
/// are `down` or, with `idle_as_backup`, `backup`.
pub(super) fn upstream_for(name: &str, st: &State, idle_as_backup: bool) -> Upstream {
    let weights = st.roster.weights(MAX_WEIGHT);
    let servers = st
        .roster
        .iter()
        .map(|(b, admin)| {
            let (in_rotation, weight) = match (&weights, admin) {
                (_, Admin::Draining | Admin::Disabled) => (false, None),
                (None, Admin::Ready) => (true, None),
                (Some(w), Admin::Ready) => match w.get(&b.group) {
                    Some(w) => (true, Some(*w)),
                    None => (false, None),
                },
            };
            let backup = !in_rotation && idle_as_backup && admin == Admin::Ready;
            UpstreamServer {
                id: b.id.clone(),
                address: b.address.clone(),
                weight,
                down: !in_rotation && !backup,
                backup,
            }
        })
        .collect();
    Upstream {
        name: name.to_string(),
        servers,
    }
}

/// The whole include file for `st`: the upstream block, with the
/// `# deploykit-state:` line after its header comment when there is state
/// to record.
pub(super) fn render_file(name: &str, st: &State, idle_as_backup: bool) -> String {
    let mut text = upstream_for(name, st, idle_as_backup).render();
    if let Some(line) = saved_line(st) {
        let at = text.find('\n').map_or(0, |i| i + 1);
        text.insert_str(at, &line);
    }
    text
}
