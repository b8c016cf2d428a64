//! A small third-party load-balancer driver for deploykit: it writes a
//! routes file that a proxy reads (and reloads on change), and reads the
//! file back to answer [`live_group`](LoadBalancer::live_group).
//!
//! The file, one line per group share and per server:
//!
//! ```text
//! # routes written by deploykit-example-file-lb; do not edit
//! group blue 100
//! group green 0
//! server web-1 127.0.0.1:8001 blue ready
//! server web-2 127.0.0.1:8002 green draining
//! ```
//!
//! A proxy sends each group its share, spread over the group's `ready`
//! servers, and sends nothing new to `draining` or `disabled` ones. With no
//! `group` line every group gets traffic.
//!
//! Every change is rendered from typed state and written atomically (a
//! temporary file renamed over the old one), and the in-memory state is
//! updated only once the write succeeded, so a failed change leaves the
//! previous file live. Nothing in a change awaits, so a change is either
//! done or not started when its future is dropped: each method is
//! cancel-safe. The driver cannot count connections (the proxy keeps them),
//! so [`active_connections`](LoadBalancer::active_connections) answers
//! `None` and deploykit waits each drain's full timeout.
//!
//! `tests/conformance.rs` proves the driver with
//! `deploykit_testkit::conformance` in a few lines;
//! `docs/testing-your-driver.md` walks through it.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use deploykit::{Backend, DriverError, Group, GroupWeight, InstanceId, LoadBalancer};

/// How a server is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admin {
    Ready,
    Draining,
    Disabled,
}

impl Admin {
    fn as_str(self) -> &'static str {
        match self {
            Admin::Ready => "ready",
            Admin::Draining => "draining",
            Admin::Disabled => "disabled",
        }
    }
}

#[derive(Debug, Clone)]
struct Routes {
    servers: BTreeMap<InstanceId, (Backend, Admin)>,
    /// `None`: every group gets traffic.
    shares: Option<BTreeMap<Group, u8>>,
}

impl Routes {
    fn render(&self) -> String {
        let mut out = String::from("# routes written by deploykit-example-file-lb; do not edit\n");
        for (g, p) in self.shares.iter().flatten() {
            out.push_str(&format!("group {g} {p}\n"));
        }
        for (b, admin) in self.servers.values() {
            out.push_str(&format!(
                "server {} {} {} {}\n",
                b.id,
                b.address,
                b.group,
                admin.as_str()
            ));
        }
        out
    }
}

/// A load balancer that writes a routes file for a proxy to read.
#[derive(Debug)]
pub struct FileLoadBalancer {
    path: PathBuf,
    routes: Mutex<Routes>,
}

impl FileLoadBalancer {
    /// A driver writing `path` for `backends`, all ready. Writes the file
    /// at once so the proxy has routes from the start.
    ///
    /// # Errors
    /// When the file cannot be written (the message names the path).
    pub fn new(
        path: impl Into<PathBuf>,
        backends: impl IntoIterator<Item = Backend>,
    ) -> Result<Self, DriverError> {
        let routes = Routes {
            servers: backends
                .into_iter()
                .map(|b| (b.id.clone(), (b, Admin::Ready)))
                .collect(),
            shares: None,
        };
        let lb = Self {
            path: path.into(),
            routes: Mutex::new(routes.clone()),
        };
        lb.write(&routes)?;
        Ok(lb)
    }

    /// The routes file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&self, routes: &Routes) -> Result<(), DriverError> {
        deploykit::state::write_atomic(&self.path, routes.render().as_bytes())
            .map_err(|e| DriverError::from(e).with_context(&self.path))
    }

    /// Applies `edit` to a copy of the routes, writes it, and keeps it only
    /// when the write succeeded. Never awaits: cancel-safe.
    fn change(&self, edit: impl FnOnce(&mut Routes) -> Result<(), DriverError>) -> Result<(), DriverError> {
        let mut routes = self.routes.lock().expect("routes lock poisoned");
        let mut next = routes.clone();
        edit(&mut next)?;
        self.write(&next)?;
        *routes = next;
        Ok(())
    }

    fn set_admin(&self, backend: &Backend, admin: Admin) -> Result<(), DriverError> {
        self.change(|r| match r.servers.get_mut(&backend.id) {
            Some((_, a)) => {
                *a = admin;
                Ok(())
            }
            None => Err(unknown(backend)),
        })
    }
}

trait WithContext {
    fn with_context(self, path: &Path) -> DriverError;
}

impl WithContext for DriverError {
    fn with_context(self, path: &Path) -> DriverError {
        let transient = self.is_transient();
        let e = format!("writing the routes file {}", path.display());
        let wrapped = if transient {
            DriverError::transient(e)
        } else {
            DriverError::new(e)
        };
        wrapped.with_source(self)
    }
}

fn unknown(backend: &Backend) -> DriverError {
    DriverError::new(format!(
        "the routes file has no server {}; give it to FileLoadBalancer::new",
        backend.id
    ))
}

/// Every method is idempotent (it sets a state, it does not toggle one),
/// cancel-safe (a change never awaits) and leaves the previous file live on
/// failure.
#[async_trait]
impl LoadBalancer for FileLoadBalancer {
    fn name(&self) -> &str {
        "file"
    }

    async fn drain(&self, backend: &Backend) -> Result<(), DriverError> {
        self.set_admin(backend, Admin::Draining)
    }

    /// Always `None` for a known backend: the proxy keeps the connections.
    async fn active_connections(&self, backend: &Backend) -> Result<Option<u64>, DriverError> {
        let routes = self.routes.lock().expect("routes lock poisoned");
        match routes.servers.contains_key(&backend.id) {
            true => Ok(None),
            false => Err(unknown(backend)),
        }
    }

    async fn enable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.set_admin(backend, Admin::Ready)
    }

    async fn disable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.set_admin(backend, Admin::Disabled)
    }

    /// Refuses shares that do not sum to 100 or name a group without
    /// servers, before writing anything.
    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        self.change(|r| {
            let sum: u32 = weights.iter().map(|w| u32::from(w.percent)).sum();
            if sum != 100 {
                return Err(DriverError::new(format!("the shares sum to {sum} %, not 100 %")));
            }
            if let Some(w) = weights
                .iter()
                .find(|w| !r.servers.values().any(|(b, _)| b.group == w.group))
            {
                return Err(DriverError::new(format!("no server is in the group {}", w.group)));
            }
            r.shares = Some(weights.iter().map(|w| (w.group.clone(), w.percent)).collect());
            Ok(())
        })
    }

    async fn switch_to(&self, group: &Group) -> Result<(), DriverError> {
        let groups: Vec<Group> = {
            let routes = self.routes.lock().expect("routes lock poisoned");
            routes.servers.values().map(|(b, _)| b.group.clone()).collect()
        };
        let weights: Vec<GroupWeight> = groups
            .into_iter()
            .chain([group.clone()])
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|g| GroupWeight {
                percent: if g == *group { 100 } else { 0 },
                group: g,
            })
            .collect();
        self.set_weights(&weights).await
    }

    /// Read back from the file, not from memory: what the proxy reads is
    /// what counts.
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        let text =
            std::fs::read_to_string(&self.path).map_err(|e| DriverError::from(e).with_context(&self.path))?;
        let mut live = Vec::new();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            if words.next() != Some("group") {
                continue;
            }
            let (Some(g), Some(p)) = (words.next(), words.next()) else {
                return Err(DriverError::new(format!(
                    "a bad group line in {}: {line}",
                    self.path.display()
                )));
            };
            let group = Group::new(g)
                .map_err(|e| DriverError::new(format!("a bad group name in {}: {e}", self.path.display())))?;
            if p != "0" {
                live.push((group, p == "100"));
            }
        }
        Ok(match live.as_slice() {
            [(g, true)] => Some(g.clone()),
            _ => None,
        })
    }

    /// The routes file's directory exists and the file can be read.
    async fn preflight(&self) -> Result<(), DriverError> {
        std::fs::metadata(&self.path)
            .map(|_| ())
            .map_err(|e| DriverError::from(e).with_context(&self.path))
    }
}
