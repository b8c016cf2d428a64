//! Load-balancer drivers.
//!
//! * [`NoLoadBalancer`] — for fleets with nothing in front (every change is
//!   a no-op; drains cannot be confirmed, so drain waits run to their
//!   timeout unless the instance reports its own connections).
//! * `NginxLoadBalancer` (feature `nginx`) — one upstream include file
//!   rendered from typed state, `nginx -t` on the whole config, reload
//!   confirmed by a new worker generation, drains confirmed by the old
//!   generation exiting — or, with the reload-free drain mode, left to the
//!   instance's graceful stop while nginx retries refused connects
//!   elsewhere.
//! * `HaproxyLoadBalancer` (feature `haproxy`) — the runtime API over the
//!   admin socket, every change read back, drains confirmed by `show stat`.
//! * `KubernetesTraffic` (feature `kubernetes`) — an Istio VirtualService or
//!   a Gateway API HTTPRoute patched through the Kubernetes API, with
//!   optimistic concurrency and read-back (`docs/kubernetes.md`).
//! * [`SymlinkSwitch`] — a blue-green switch without a balancer: a `live`
//!   symlink swapped atomically between the environments' directories.
//!
//! `docs/load-balancers.md` describes both drivers, their drain
//! confirmation and its limits, with config examples.

#[cfg(feature = "haproxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "haproxy")))]
pub mod haproxy;
#[cfg(feature = "kubernetes")]
#[cfg_attr(docsrs, doc(cfg(feature = "kubernetes")))]
pub mod kubernetes;
#[cfg(feature = "nginx")]
#[cfg_attr(docsrs, doc(cfg(feature = "nginx")))]
pub mod nginx;
#[cfg(any(feature = "nginx", feature = "haproxy"))]
mod roster;
#[cfg(any(feature = "nginx", feature = "haproxy"))]
mod split;
#[cfg(unix)]
pub mod symlink;
#[cfg(unix)]
pub use symlink::{SymlinkSwitch, SymlinkSwitchBuilder};

#[cfg(feature = "haproxy")]
pub use haproxy::HaproxyLoadBalancer;
#[cfg(feature = "kubernetes")]
pub use kubernetes::KubernetesTraffic;
#[cfg(feature = "nginx")]
pub use nginx::NginxLoadBalancer;

use async_trait::async_trait;

use crate::error::DriverError;
use crate::names::Group;
use crate::traits::{Backend, GroupWeight, LoadBalancer};

/// A load balancer that does nothing: for fleets with no load balancer in
/// front, or where routing is managed elsewhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLoadBalancer;

#[async_trait]
impl LoadBalancer for NoLoadBalancer {
    fn name(&self) -> &str {
        "none"
    }
    async fn drain(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }
    async fn active_connections(&self, _: &Backend) -> Result<Option<u64>, DriverError> {
        Ok(None)
    }
    async fn enable(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }
    async fn disable(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }
    async fn set_weights(&self, _: &[GroupWeight]) -> Result<(), DriverError> {
        Ok(())
    }
    async fn switch_to(&self, _: &Group) -> Result<(), DriverError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::routing::{Match, Mirror, Rule, TrafficPolicy, ValueMatch};

    /// Records the weight and switch calls the default `apply_policy` makes.
    #[derive(Debug, Default)]
    struct Recording(Mutex<Vec<String>>);

    #[async_trait]
    impl LoadBalancer for Recording {
        fn name(&self) -> &str {
            "recording"
        }
        async fn drain(&self, _: &Backend) -> Result<(), DriverError> {
            Ok(())
        }
        async fn active_connections(&self, _: &Backend) -> Result<Option<u64>, DriverError> {
            Ok(None)
        }
        async fn enable(&self, _: &Backend) -> Result<(), DriverError> {
            Ok(())
        }
        async fn disable(&self, _: &Backend) -> Result<(), DriverError> {
            Ok(())
        }
        async fn set_weights(&self, w: &[GroupWeight]) -> Result<(), DriverError> {
            let text: Vec<String> = w.iter().map(|w| format!("{}={}", w.group, w.percent)).collect();
            self.0.lock().unwrap().push(format!("weights {}", text.join(",")));
            Ok(())
        }
        async fn switch_to(&self, g: &Group) -> Result<(), DriverError> {
            self.0.lock().unwrap().push(format!("switch {g}"));
            Ok(())
        }
    }

    fn g(s: &str) -> Group {
        Group::new(s).unwrap()
    }

    #[tokio::test]
    async fn default_apply_policy_maps_weights_and_switch_and_refuses_the_rest() {
        let lb = Recording::default();
        assert_eq!(
            lb.capabilities(),
            crate::routing::Capabilities::weights_and_switch()
        );
        lb.apply_policy(&TrafficPolicy::switch(&g("blue"))).await.unwrap();
        let split = [
            GroupWeight {
                group: g("stable"),
                percent: 80,
            },
            GroupWeight {
                group: g("canary"),
                percent: 20,
            },
        ];
        lb.apply_policy(&TrafficPolicy::weights(&split)).await.unwrap();
        let header = TrafficPolicy {
            rules: vec![Rule {
                matches: Match::Header {
                    name: "x-canary".into(),
                    value: ValueMatch::Exact("1".into()),
                },
                group: g("canary"),
            }],
            ..TrafficPolicy::weights(&split)
        };
        let e = lb.apply_policy(&header).await.unwrap_err();
        assert!(
            e.message()
                .contains("the recording load balancer cannot route by request header"),
            "{e}"
        );
        // The refusal stays typed behind the DriverError, so a caller (the
        // conformance suite) can tell it from a failed change.
        assert!(
            matches!(
                e.routing_error(),
                Some(crate::routing::RoutingError::Unsupported { driver, capability: crate::routing::Capability::HeaderMatch, .. })
                    if driver == "recording"
            ),
            "{e}"
        );
        assert!(!e.is_transient());
        let mirror = TrafficPolicy {
            mirror: Some(Mirror::new(g("shadow"), 5)),
            ..TrafficPolicy::switch(&g("stable"))
        };
        let e = lb.apply_policy(&mirror).await.unwrap_err();
        assert!(e.message().contains("nginx"), "{e}");
        // Invalid before unsupported, and nothing was called for either.
        let bad = TrafficPolicy::weights(&[GroupWeight {
            group: g("a"),
            percent: 50,
        }]);
        let e = lb.apply_policy(&bad).await.unwrap_err();
        assert!(e.message().contains("sum to 50"), "{e}");
        assert!(
            matches!(
                e.routing_error(),
                Some(crate::routing::RoutingError::Invalid { .. })
            ),
            "{e}"
        );
        assert_eq!(
            *lb.0.lock().unwrap(),
            ["switch blue", "weights stable=80,canary=20"]
        );
    }
}
