//! What the nginx and HAProxy drivers both keep about their backends: the
//! operator's in/out state of each ([`Admin`]), the traffic split between
//! groups, and the checks every driver runs on them; plus running a change
//! to completion whatever happens to the caller.
//!
//! A driver turns a [`Roster`] into its own form (a rendered upstream block,
//! runtime-API commands); the roster itself knows nothing of either.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use super::split::{check_weights, per_server_weights};
use crate::error::{DriverError, Error, Result};
use crate::names::{Group, InstanceId};
use crate::traits::{Backend, GroupWeight};

/// Whether a backend is in rotation as far as the operator is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Admin {
    Ready,
    Draining,
    Disabled,
}

/// How a driver's builder words its checks of the backends it was given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RosterRules {
    /// The field named in errors, e.g. `nginx backends`.
    pub(crate) field: &'static str,
    /// What to do when no backend was given.
    pub(crate) when_empty: &'static str,
    /// What the driver calls a backend: `instance`, `server`.
    pub(crate) member: &'static str,
    /// Whether two backends may not share an address (nginx renders the
    /// addresses; HAProxy's servers carry their own).
    pub(crate) distinct_addresses: bool,
}

/// The backends of one driver, each with its [`Admin`] state, in the order
/// they were given, and the traffic split.
#[derive(Debug, Clone)]
pub(crate) struct Roster {
    backends: Vec<(Backend, Admin)>,
    /// The share of each group; `None` until weights are set (the driver
    /// decides what "no split" means).
    pub(crate) shares: Option<BTreeMap<Group, u8>>,
}

impl Roster {
    /// Every backend in rotation, no split, after checking that there is at
    /// least one and none is listed twice.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `rules.field`.
    pub(crate) fn new(backends: Vec<Backend>, rules: RosterRules) -> Result<Self> {
        if backends.is_empty() {
            return Err(Error::invalid(rules.field, rules.when_empty));
        }
        let mut ids = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for b in &backends {
            if !ids.insert(&b.id) {
                return Err(Error::invalid(
                    rules.field,
                    format!("{} {} is listed twice", rules.member, b.id),
                ));
            }
            if rules.distinct_addresses && !addrs.insert(&b.address) {
                return Err(Error::invalid(
                    rules.field,
                    format!("address {} is used by two instances", b.address),
                ));
            }
        }
        Ok(Self {
            backends: backends.into_iter().map(|b| (b, Admin::Ready)).collect(),
            shares: None,
        })
    }

    /// Every backend with its state, in the order given.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Backend, Admin)> {
        self.backends.iter().map(|(b, a)| (b, *a))
    }

    /// The backend with this id, as registered, and its state.
    pub(crate) fn get(&self, id: &InstanceId) -> Option<(&Backend, Admin)> {
        self.iter().find(|(b, _)| &b.id == id)
    }

    /// The registered ids, for an error message: `a, b, c`.
    pub(crate) fn ids(&self) -> String {
        let ids: Vec<&str> = self.backends.iter().map(|(b, _)| b.id.as_str()).collect();
        ids.join(", ")
    }

    pub(crate) fn admin(&self, id: &InstanceId) -> Option<Admin> {
        self.get(id).map(|(_, a)| a)
    }

    pub(crate) fn set_admin(&mut self, id: &InstanceId, admin: Admin) {
        for (b, a) in &mut self.backends {
            if &b.id == id {
                *a = admin;
            }
        }
    }

    /// How many backends each group has.
    pub(crate) fn groups(&self) -> BTreeMap<Group, usize> {
        self.count_per_group(|_| true)
    }

    /// How many backends of each group are in rotation (groups with none
    /// are absent).
    pub(crate) fn ready_per_group(&self) -> BTreeMap<Group, usize> {
        self.count_per_group(|a| a == Admin::Ready)
    }

    fn count_per_group(&self, counts: impl Fn(Admin) -> bool) -> BTreeMap<Group, usize> {
        let mut m = BTreeMap::new();
        for (b, a) in &self.backends {
            if counts(*a) {
                *m.entry(b.group.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    /// The weight of each in-rotation server per group for the current
    /// split, the largest being `max`; `None` without a split.
    pub(crate) fn weights(&self, max: u32) -> Option<BTreeMap<Group, u32>> {
        let ready = self.ready_per_group();
        self.shares
            .as_ref()
            .map(|shares| per_server_weights(shares, &ready, max))
    }

    /// Checks a weight request against the configured groups and returns
    /// the shares to set.
    ///
    /// # Errors
    /// Percents that do not sum to 100, or an unknown or repeated group.
    pub(crate) fn check_weights(&self, weights: &[GroupWeight]) -> Result<BTreeMap<Group, u8>, DriverError> {
        check_weights(weights, &self.groups())
    }
}

/// The state behind a poison-tolerant lock: a panic elsewhere must not make
/// the driver unusable, and no state is ever left half-edited under it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `fut` in its own task so that dropping the caller's future does not
/// stop a change half-way (a file renamed but not reloaded, half of a
/// command line's effects unread). `driver` names it in the error.
pub(crate) async fn run_to_completion<F, T>(driver: &str, fut: F) -> Result<T, DriverError>
where
    F: std::future::Future<Output = Result<T, DriverError>> + Send + 'static,
    T: Send + 'static,
{
    match tokio::spawn(fut).await {
        Ok(r) => r,
        Err(e) => Err(DriverError::new(format!("{driver} change task failed: {e}"))),
    }
}

/// A backend on loopback, for the drivers' tests.
#[cfg(test)]
pub(crate) fn test_backend(id: &str, port: u16, group: &str) -> Backend {
    Backend {
        id: InstanceId::new(id).unwrap(),
        address: crate::names::Address::parse(&format!("127.0.0.1:{port}")).unwrap(),
        group: Group::new(group).unwrap(),
    }
}

#[cfg(test)]
mod tests {
    use super::test_backend as backend;
    use super::*;

    const RULES: RosterRules = RosterRules {
        field: "test backends",
        when_empty: "is empty; add some",
        member: "server",
        distinct_addresses: true,
    };

    fn id(s: &str) -> InstanceId {
        InstanceId::new(s).unwrap()
    }

    fn g(s: &str) -> Group {
        Group::new(s).unwrap()
    }

    #[test]
    fn a_bad_backend_list_is_refused_naming_the_field() {
        let e = Roster::new(vec![], RULES).unwrap_err().to_string();
        assert!(e.contains("test backends") && e.contains("add some"), "{e}");
        let twice = vec![backend("a", 1, "g"), backend("a", 2, "g")];
        let e = Roster::new(twice, RULES).unwrap_err().to_string();
        assert!(e.contains("server a is listed twice"), "{e}");
        let shared = vec![backend("a", 1, "g"), backend("b", 1, "g")];
        let e = Roster::new(shared.clone(), RULES).unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:1") && e.contains("two instances"), "{e}");
        let rules = RosterRules {
            distinct_addresses: false,
            ..RULES
        };
        assert!(Roster::new(shared, rules).is_ok());
    }

    #[test]
    fn groups_count_every_backend_and_ready_ones_only_those_in_rotation() {
        let mut r = Roster::new(
            vec![
                backend("s-1", 1, "stable"),
                backend("s-2", 2, "stable"),
                backend("c-1", 3, "canary"),
            ],
            RULES,
        )
        .unwrap();
        assert!(r.iter().all(|(_, a)| a == Admin::Ready));
        r.set_admin(&id("c-1"), Admin::Draining);
        r.set_admin(&id("s-2"), Admin::Disabled);
        assert_eq!(r.admin(&id("c-1")), Some(Admin::Draining));
        assert_eq!(r.admin(&id("nope")), None);
        assert_eq!(r.groups(), BTreeMap::from([(g("canary"), 1), (g("stable"), 2)]));
        assert_eq!(r.ready_per_group(), BTreeMap::from([(g("stable"), 1)]));
        assert_eq!(r.ids(), "s-1, s-2, c-1");
        assert_eq!(r.get(&id("s-2")).unwrap().0.address.to_string(), "127.0.0.1:2");
    }

    #[test]
    fn weights_follow_the_split_over_backends_in_rotation() {
        let mut r = Roster::new(
            vec![
                backend("s-1", 1, "stable"),
                backend("s-2", 2, "stable"),
                backend("c-1", 3, "canary"),
            ],
            RULES,
        )
        .unwrap();
        assert_eq!(r.weights(100), None);
        let shares = r
            .check_weights(&[
                GroupWeight {
                    group: g("stable"),
                    percent: 50,
                },
                GroupWeight {
                    group: g("canary"),
                    percent: 50,
                },
            ])
            .unwrap();
        r.shares = Some(shares);
        // Two stable servers share 50 %, the one canary has 50 % alone.
        assert_eq!(
            r.weights(100),
            Some(BTreeMap::from([(g("canary"), 100), (g("stable"), 50)]))
        );
        r.set_admin(&id("s-2"), Admin::Draining);
        assert_eq!(
            r.weights(100),
            Some(BTreeMap::from([(g("canary"), 100), (g("stable"), 100)]))
        );
        let e = r
            .check_weights(&[GroupWeight {
                group: g("blue"),
                percent: 100,
            }])
            .unwrap_err();
        assert!(e.message().contains("group blue"), "{e}");
    }

    #[tokio::test]
    async fn a_change_runs_to_completion_when_its_caller_is_dropped() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
        let change = run_to_completion("test", async move {
            let _ = started_tx.send(());
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            let _ = tx.send("finished");
            Ok(())
        });
        // The caller gives up as soon as the change has started.
        tokio::select! {
            _ = change => panic!("the change cannot finish before it yields"),
            _ = started_rx => {}
        }
        assert_eq!(rx.await.unwrap(), "finished");
        let panics = async {
            if true {
                panic!("a change that panics");
            }
            Ok(())
        };
        let e = run_to_completion("nginx", panics).await.unwrap_err();
        assert!(e.message().contains("nginx change task failed"), "{e}");
    }
}
