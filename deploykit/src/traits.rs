//! The four core traits: [`Instance`], [`LoadBalancer`], [`MetricsSource`]
//! and [`Strategy`].
//!
//! This module imports nothing from the engines or the drivers: drivers
//! implement these traits, engines consume them.
//!
//! # Contracts
//!
//! Every method documents three guarantees:
//!
//! * **Idempotent** — whether calling it twice has the same effect as once.
//!   The executor retries a *transient* [`DriverError`] only on idempotent
//!   methods.
//! * **Cancel-safe** — what happens if the returned future is dropped before
//!   it completes (the executor applies timeouts by dropping futures).
//! * **On failure** — what state an `Err` leaves behind, so the executor
//!   knows what it must undo.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::chaos::ProcessSignal;
use crate::error::{DriverError, Result};
use crate::names::{Address, Group, InstanceId, ReleaseId};
use crate::plan::{FleetSnapshot, Plan};
use crate::routing::{Capabilities, TrafficPolicy};

/// What identifies an instance to a load balancer: its id, address and
/// group. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Backend {
    /// The instance id (used as the server name by drivers that name servers).
    pub id: InstanceId,
    /// Where the load balancer sends its traffic.
    pub address: Address,
    /// The track (canary) or environment (blue-green) the instance belongs to.
    pub group: Group,
}

/// The answer of one health probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    /// The instance serves correctly.
    Healthy,
    /// The instance answered but is not healthy; the reason says what came
    /// back (status, body excerpt).
    Unhealthy(String),
}

/// One health probe of `instance` bounded by `bound`: `Err` says what
/// failed, in words (unhealthy with its reason, unreachable with the
/// driver's error, or no answer in time). Read-only and cancel-safe.
pub(crate) async fn probe_once(instance: &dyn Instance, bound: std::time::Duration) -> Result<(), String> {
    match tokio::time::timeout(bound, instance.health()).await {
        Ok(Ok(Health::Healthy)) => Ok(()),
        Ok(Ok(Health::Unhealthy(why))) => Err(format!("unhealthy: {why}")),
        Ok(Err(e)) => Err(format!("unreachable: {e}")),
        Err(_) => Err(format!(
            "no answer within {}",
            crate::duration_text::format(bound)
        )),
    }
}

impl Health {
    /// Whether this is [`Health::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

/// One machine, container or process that runs a release of the application.
///
/// An instance has a *current release* (the one it runs, or would run when
/// started) and keeps the releases it ran before, so it can be restored to
/// one of them. Implementations: the testkit's `FakeInstance`, and the
/// local-process, SSH and systemd drivers.
#[async_trait]
pub trait Instance: Send + Sync + Debug {
    /// The instance's id, address and group. Never changes.
    fn backend(&self) -> &Backend;

    /// The release the instance currently runs (or runs when started); `None`
    /// for a fresh instance with no release.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn current_release(&self) -> Result<Option<ReleaseId>, DriverError>;

    /// Stops the application gracefully (SIGTERM or the service manager's
    /// stop), letting in-flight requests finish.
    ///
    /// * Idempotent: yes; stopping a stopped instance succeeds.
    /// * Cancel-safe: yes; the stop may or may not have been delivered, and a
    ///   later `stop` or [`force_stop`](Self::force_stop) finishes it.
    /// * On failure: the application may still be running; the executor
    ///   follows a failed or timed-out `stop` with `force_stop`.
    async fn stop(&self) -> Result<(), DriverError>;

    /// Kills the application (SIGKILL or equivalent) without waiting.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes.
    /// * On failure: the instance is in an unknown running state; the
    ///   executor keeps it out of rotation and reports it.
    async fn force_stop(&self) -> Result<(), DriverError>;

    /// Installs `release` and makes it the current release (for example: lay
    /// out `releases/<id>`, then swap the `current` symlink atomically). Does
    /// not start it. The previously current release stays installed so
    /// [`restore`](Self::restore) can return to it.
    ///
    /// * Idempotent: yes; installing the current release again is a no-op or
    ///   a reinstall with the same result.
    /// * Cancel-safe: yes; a cancelled install leaves either the old or the
    ///   new release current, never a half-written one (the swap is the last,
    ///   atomic action).
    /// * On failure: the previous release is still current, or `restore`
    ///   brings it back.
    async fn install(&self, release: &ReleaseId) -> Result<(), DriverError>;

    /// Makes `release` — one the instance ran before — current again. Does
    /// not start it.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes, as for `install`.
    /// * On failure: the current release is unchanged.
    async fn restore(&self, release: &ReleaseId) -> Result<(), DriverError>;

    /// Starts the application on its current release. Returns once the start
    /// was delivered; readiness is checked with [`health`](Self::health).
    ///
    /// * Idempotent: yes; starting a running instance succeeds.
    /// * Cancel-safe: yes; the process may or may not have been started.
    /// * On failure: the application may be partly started; the executor
    ///   stops it before restoring.
    async fn start(&self) -> Result<(), DriverError>;

    /// Probes health once. `Ok(Health::Unhealthy(_))` is an answer;
    /// `Err` means the probe itself could not be made (both count as not
    /// healthy).
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn health(&self) -> Result<Health, DriverError>;

    /// Requests in flight on the instance itself, if the instance can tell
    /// (`None` when it cannot). Used with
    /// [`LoadBalancer::active_connections`] to confirm a drain.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn active_connections(&self) -> Result<Option<u64>, DriverError> {
        Ok(None)
    }

    /// The deployment marker on the instance (the text last given to
    /// [`set_marker`](Self::set_marker)), `None` when there is none or the
    /// instance keeps no marker. A marker names the deployment that holds
    /// the instance, so that two deployments with different state
    /// directories never change one instance at once. The default keeps
    /// none (instances whose state no other deployment can reach).
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn marker(&self) -> Result<Option<String>, DriverError> {
        Ok(None)
    }

    /// Writes the deployment marker (`Some`, replacing any) or removes it
    /// (`None`).
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; the marker is replaced atomically (the old or
    ///   the new one is there).
    /// * On failure: the previous marker (or none) is still there.
    async fn set_marker(&self, marker: Option<&str>) -> Result<(), DriverError> {
        let _ = marker;
        Ok(())
    }

    /// Sends `signal` to the application's process: a process fault of a
    /// chaos drill ([`crate::chaos`]). The default cannot: it fails,
    /// naming the instance.
    ///
    /// * Idempotent: yes for [`ProcessSignal::Kill`] and
    ///   [`ProcessSignal::Cont`] (a process that does not run needs
    ///   neither); [`ProcessSignal::Stop`] of a process that does not run
    ///   fails.
    /// * Cancel-safe: yes; the signal may or may not have been sent.
    /// * On failure: the signal was not delivered; the process runs (or
    ///   not) as before.
    async fn signal(&self, signal: ProcessSignal) -> Result<(), DriverError> {
        Err(DriverError::new(format!(
            "{} cannot be sent {signal}: its driver does not signal processes",
            self.backend().id
        )))
    }
}

/// How much of a group's traffic a weight asks for, in percent (0–100).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupWeight {
    /// The group.
    pub group: Group,
    /// Its share of traffic, 0–100. The shares passed together sum to 100.
    pub percent: u8,
}

/// Something that routes traffic to backends: nginx, HAProxy, a symlink, a
/// fake.
///
/// A backend is *in rotation* when it is enabled and its group has a
/// non-zero share of traffic. Every change returns only once the load
/// balancer has confirmed it (config reloaded, runtime state read back).
#[async_trait]
pub trait LoadBalancer: Send + Sync + Debug {
    /// A short name for events and errors (`nginx`, `haproxy`, `fake`).
    fn name(&self) -> &str;

    /// Stops sending *new* requests to `backend`; requests in flight finish.
    /// Completion is confirmed separately with
    /// [`active_connections`](Self::active_connections).
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; the backend is either still in rotation or
    ///   draining.
    /// * On failure: the backend is still in rotation.
    async fn drain(&self, backend: &Backend) -> Result<(), DriverError>;

    /// Connections or requests the load balancer still has open to
    /// `backend`, or `None` when it cannot tell (then the executor waits the
    /// full drain timeout unless the instance can tell).
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn active_connections(&self, backend: &Backend) -> Result<Option<u64>, DriverError>;

    /// Puts `backend` back into rotation.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; the backend is either in or out of rotation.
    /// * On failure: the backend is still out of rotation.
    async fn enable(&self, backend: &Backend) -> Result<(), DriverError>;

    /// Takes `backend` out of rotation at once (maintenance), without
    /// waiting for in-flight requests.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes.
    /// * On failure: the backend may still be in rotation.
    async fn disable(&self, backend: &Backend) -> Result<(), DriverError>;

    /// Splits traffic between groups by percent (canary). Groups not named
    /// get 0 %. A 0 % group receives no new requests.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; either the old or the new split is live.
    /// * On failure: the previous split is still live.
    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError>;

    /// Sends all traffic to `group` at once (blue-green), atomically: no
    /// request sees a state in between.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; either the old or the new group is live.
    /// * On failure: the previously live group is still live.
    async fn switch_to(&self, group: &Group) -> Result<(), DriverError>;

    /// What this load balancer can do with traffic. The default: weights
    /// and switch, what every driver implements. A strategy or config that
    /// needs more is refused with [`Capabilities::check`] before anything is
    /// touched.
    ///
    /// * Idempotent: yes (read-only, no I/O).
    /// * Cancel-safe: yes.
    /// * On failure: cannot fail.
    fn capabilities(&self) -> Capabilities {
        Capabilities::weights_and_switch()
    }

    /// Applies a whole [`TrafficPolicy`]: rules, the default split
    /// (sticky or not) and mirroring, replacing the policy or weights live
    /// before. The default maps a policy that is only a switch to
    /// [`switch_to`](Self::switch_to) and one that is only weights to
    /// [`set_weights`](Self::set_weights), and refuses anything else with
    /// the error of [`Capabilities::check`] (naming the driver and the
    /// alternative) without touching anything.
    ///
    /// * Idempotent: yes; applying the live policy again changes nothing.
    /// * Cancel-safe: yes; either the old or the new policy is live, never
    ///   a mix.
    /// * On failure: the previous policy is still live; an invalid or
    ///   unsupported policy is refused before anything is touched.
    async fn apply_policy(&self, policy: &TrafficPolicy) -> Result<(), DriverError> {
        self.capabilities().check(self.name(), policy)?;
        if let Some(group) = policy.as_switch() {
            return self.switch_to(group).await;
        }
        match policy.as_weights() {
            Some(weights) => self.set_weights(weights).await,
            // Unreachable for a driver whose capabilities are honest: check
            // refuses what is not plain weights unless the driver claims it.
            None => Err(DriverError::new(format!(
                "the {} load balancer claims routing capabilities but does not implement apply_policy",
                self.name()
            ))),
        }
    }

    /// The group receiving all traffic, if exactly one does; `None` when
    /// traffic is split or the load balancer cannot tell. Used to reconcile
    /// recorded state with reality.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        Ok(None)
    }

    /// Sends `backend`'s traffic to `via` instead of its own address (a
    /// [fault proxy](crate::chaos::FaultProxy) in front of it, for a chaos
    /// drill), or back to its own address with `None`. Its state in
    /// rotation and its weight are unchanged. A detour is never recorded
    /// for a later process: a driver built afterwards (a resume, a
    /// rollback after a crash) sends the backend's traffic to its own
    /// address again with its first change. The default cannot: it fails,
    /// naming the load balancer.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; either the old or the new address is live.
    /// * On failure: the previous address is still live.
    async fn reroute(&self, backend: &Backend, via: Option<&Address>) -> Result<(), DriverError> {
        let _ = via;
        Err(DriverError::new(format!(
            "the {} load balancer cannot send {}'s traffic through a fault proxy; \
             network chaos needs nginx, HAProxy or the simulated balancer",
            self.name(),
            backend.id
        )))
    }

    /// Checks, without changing anything, that the load balancer can be
    /// driven: it is reachable and running, and it knows every backend it
    /// was given. The executor calls it once before the first step of any
    /// plan that touches the load balancer, so a balancer that cannot be
    /// driven refuses the deployment before any instance is drained or
    /// stopped. The default has nothing to check.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed; the error says what is missing and
    ///   how to fix it.
    async fn preflight(&self) -> Result<(), DriverError> {
        Ok(())
    }

    /// Checks, without changing anything, that the load balancer as it is
    /// wired now can apply `policy`: beyond
    /// [`capabilities`](Self::capabilities), whatever the policy needs from
    /// the balancer's own configuration (HAProxy: the map file of each rule
    /// and of a sticky split loaded). The executor calls it, after
    /// [`preflight`](Self::preflight), for each policy a plan applies, so a
    /// deployment whose policy could never be applied is refused before its
    /// first step. The default checks the capabilities only.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed; the error names what is missing and
    ///   the lines to add.
    async fn preflight_policy(&self, policy: &TrafficPolicy) -> Result<(), DriverError> {
        Ok(self.capabilities().check(self.name(), policy)?)
    }
}

/// A metric the canary analysis reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fraction of requests answered with 5xx, 0.0–1.0.
    ErrorRate,
    /// 99th-percentile latency, in seconds.
    LatencyP99,
    /// Requests served in the window.
    RequestCount,
}

/// What a metrics source answered for one query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "value")]
pub enum Observation {
    /// A finite value.
    Value(f64),
    /// The query ran but there is no data (empty result, NaN, no traffic).
    /// Never to be read as healthy.
    NoData,
    /// The provider could not answer (unreachable, error status, bad body).
    ProviderError(String),
}

/// A source of per-group metrics: Prometheus, a fake.
#[async_trait]
pub trait MetricsSource: Send + Sync + Debug {
    /// Reads `metric` for the instances of `group` over the trailing
    /// `window`.
    ///
    /// Never returns `Err`: a provider failure is
    /// [`Observation::ProviderError`], so the analysis counts it.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn observe(&self, metric: Metric, group: &Group, window: Duration) -> Observation;

    /// The query [`observe`](Self::observe) would send for `metric` of
    /// `group` over `window`, for messages; `None` (the default) when the
    /// source has no query text.
    ///
    /// * Idempotent: yes (pure).
    /// * Cancel-safe: yes (not async).
    /// * On failure: `None`.
    fn query_text(&self, metric: Metric, group: &Group, window: Duration) -> Option<String> {
        let _ = (metric, group, window);
        None
    }

    /// Reads the requests and errors `group` served over the trailing
    /// `window`, for the sequential error-rate judge.
    ///
    /// The default multiplies [`Metric::RequestCount`] by
    /// [`Metric::ErrorRate`] (two [`observe`](Self::observe) calls); a
    /// source that can count errors directly should do so.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed; the failure is a
    ///   [`Measured::ProviderError`](crate::judge::Measured).
    async fn observe_counts(
        &self,
        group: &Group,
        window: Duration,
    ) -> crate::judge::Measured<crate::judge::Counts> {
        use crate::judge::{Counts, Measured};
        let requests = self.observe(Metric::RequestCount, group, window).await;
        let rate = self.observe(Metric::ErrorRate, group, window).await;
        match (requests, rate) {
            (Observation::ProviderError(m), _) | (_, Observation::ProviderError(m)) => {
                Measured::ProviderError(m)
            }
            (Observation::Value(n), Observation::Value(r)) if n.is_finite() && r.is_finite() => {
                Measured::Value(Counts {
                    requests: n.max(0.0),
                    errors: (n * r).max(0.0).round(),
                })
            }
            // No traffic at all is a count of 0 requests; the judge decides.
            (Observation::Value(n), Observation::NoData) if n <= 0.0 => Measured::Value(Counts {
                requests: 0.0,
                errors: 0.0,
            }),
            _ => Measured::NoData,
        }
    }

    /// Reads the latency distribution (seconds) of the requests `group`
    /// served over the trailing `window`, for the Mann-Whitney judge: raw
    /// samples or histogram buckets.
    ///
    /// The default answers [`Measured::NoData`](crate::judge::Measured):
    /// a source that cannot tell is never taken as healthy.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed; the failure is a
    ///   [`Measured::ProviderError`](crate::judge::Measured).
    async fn observe_latency(
        &self,
        group: &Group,
        window: Duration,
    ) -> crate::judge::Measured<crate::judge::Distribution> {
        let _ = (group, window);
        crate::judge::Measured::NoData
    }

    /// Reads the visits and conversions of `group` over the trailing
    /// `window`: the business metric an A/B experiment
    /// ([`Experiment`](crate::Experiment)) decides on.
    ///
    /// The default has no such query and answers
    /// [`Measured::ProviderError`](crate::judge::Measured) saying so, so an
    /// experiment on it decides nothing and ends without a winner.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed; the failure is a
    ///   [`Measured::ProviderError`](crate::judge::Measured).
    async fn observe_tally(
        &self,
        group: &Group,
        window: Duration,
    ) -> crate::judge::Measured<crate::experiment::Tally> {
        let _ = (group, window);
        crate::judge::Measured::ProviderError(
            "this metrics source has no visit and conversion queries".into(),
        )
    }
}

/// A deployment strategy: turns a fleet and a release into a [`Plan`].
///
/// Strategies are pure: they touch nothing, so a plan can be printed (dry
/// run), compared in tests, and executed by the one
/// [`Executor`](crate::Executor).
pub trait Strategy: Send + Sync + Debug {
    /// Which strategy this is; plans, events and journals carry it.
    fn kind(&self) -> crate::kinds::StrategyKind;

    /// The strategy's name (`rolling`, `recreate`, …).
    fn name(&self) -> &'static str {
        self.kind().as_str()
    }

    /// Checks the strategy's parameters against the fleet and compiles the
    /// plan.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) naming the field,
    /// before anything is touched.
    fn plan(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(
        _: Box<dyn Instance>,
        _: Box<dyn LoadBalancer>,
        _: Box<dyn MetricsSource>,
        _: Box<dyn Strategy>,
    ) {
    }

    fn _send_sync<T: Send + Sync>() {}

    #[test]
    fn trait_objects_are_send_and_sync() {
        _send_sync::<Box<dyn Instance>>();
        _send_sync::<Box<dyn LoadBalancer>>();
        _send_sync::<Box<dyn MetricsSource>>();
        _send_sync::<Box<dyn Strategy>>();
        assert!(Health::Healthy.is_healthy());
        assert!(!Health::Unhealthy("503".into()).is_healthy());
    }
}
