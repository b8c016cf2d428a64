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
//! * [`SymlinkSwitch`] — a blue-green switch without a balancer: a `live`
//!   symlink swapped atomically between the environments' directories.
//!
//! `docs/load-balancers.md` describes both drivers, their drain
//! confirmation and its limits, with config examples.

#[cfg(feature = "haproxy")]
#[cfg_attr(docsrs, doc(cfg(feature = "haproxy")))]
pub mod haproxy;
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
