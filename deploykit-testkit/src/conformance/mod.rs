//! A conformance suite for drivers: async functions that check an
//! implementation of [`LoadBalancer`](deploykit::LoadBalancer),
//! [`Instance`](deploykit::Instance) or
//! [`MetricsSource`](deploykit::MetricsSource) against the contract its
//! trait documents (idempotence, cancel-safety, what a failure leaves), by
//! driving it and reading every change back.
//!
//! * [`load_balancer`] / [`LoadBalancerSuite`] — drain, enable, disable,
//!   switch and split, each repeated, cancelled mid-call and read back with
//!   [`live_group`](deploykit::LoadBalancer::live_group) and
//!   [`active_connections`](deploykit::LoadBalancer::active_connections).
//! * Routing policies: every [`Capability`](deploykit::routing::Capability)
//!   the driver declares in
//!   [`capabilities`](deploykit::LoadBalancer::capabilities) is applied with
//!   [`apply_policy`](deploykit::LoadBalancer::apply_policy) twice,
//!   cancelled, read back (and, given a [`TrafficProbe`], sent requests),
//!   then replaced by `set_weights` / `switch_to`; every one it does not
//!   declare must be refused with
//!   [`RoutingError::Unsupported`](deploykit::routing::RoutingError)
//!   changing nothing. [`policies`] lists what is applied.
//! * [`instance`] / [`InstanceSuite`] — install, restore, start, stop and
//!   the deployment marker, read back with
//!   [`current_release`](deploykit::Instance::current_release) and
//!   [`health`](deploykit::Instance::health).
//! * [`metrics_source`] / [`MetricsSuite`] — answers that are stable,
//!   finite, `NoData` where there is no data, `ProviderError` when the
//!   provider is down.
//!
//! Each check is a [`Clause`]; the first one broken ends the run with a
//! [`ConformanceFailure`] naming it, and a passing run returns the
//! [`Conformance`] record of what was checked and what was skipped, so a
//! test can assert that the suite did check something. A driver that
//! legitimately cannot do something (count connections, split traffic,
//! take one backend out) says so on the suite, and the clauses that need it
//! are skipped with the reason recorded.
//!
//! Every wait is a `tokio::time` sleep bounded by the suite's deadline, so
//! the suite runs in virtual time against fakes
//! (`#[tokio::test(start_paused = true)]`) and in real time against real
//! servers.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use deploykit::Instance;
//! use deploykit_testkit::{conformance, FakeFleet};
//!
//! let fleet = FakeFleet::with_groups(&[("blue", 2), ("green", 2)]);
//! let backends: Vec<_> = fleet.instances().iter().map(|i| i.backend().clone()).collect();
//! let checked = conformance::load_balancer(&fleet.load_balancer(), &backends).await?;
//! assert!(checked.skipped.is_empty());
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::time::Duration;

use deploykit::DriverError;

mod instance;
mod lb;
mod metrics;
mod policy;

pub use instance::{instance, InstanceSuite};
pub use lb::{load_balancer, LoadBalancerSuite};
pub use metrics::{metrics_source, MetricsSuite};
pub use policy::{policies, PolicyCase, ProbeFuture, ProbeRequest, TrafficProbe};

/// One clause of a trait's contract that the suite checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Clause {
    /// `LoadBalancer::preflight` succeeds on a balancer that can be driven,
    /// and again (read-only, idempotent).
    LbPreflight,
    /// `LoadBalancer::enable` twice succeeds.
    LbEnableIdempotent,
    /// `LoadBalancer::drain` twice succeeds.
    LbDrainIdempotent,
    /// After a drain, `LoadBalancer::active_connections` reaches 0 within
    /// the suite's deadline.
    LbDrainCompletes,
    /// `LoadBalancer::disable` twice succeeds, and `enable` brings the
    /// backend back.
    LbDisableIdempotent,
    /// A backend the balancer was not given is refused with a permanent
    /// error (retrying cannot make it known).
    LbUnknownBackendRefused,
    /// After `LoadBalancer::switch_to(g)`, `live_group` reads back `g`.
    LbSwitchReadBack,
    /// `LoadBalancer::switch_to` twice to one group succeeds and reads back.
    LbSwitchIdempotent,
    /// After `set_weights` giving 100 % to one group, `live_group` reads
    /// that group back; after a split, `None`.
    LbWeightsReadBack,
    /// A `set_weights` that fails is permanent when the input is at fault
    /// and leaves the previous split live.
    LbFailedWeightsKeepSplit,
    /// A balancer that cannot be reached is reported: `preflight` fails
    /// (as unreachable, when it says what it found) and every change fails.
    LbUnreachableRefused,
    /// A `drain` dropped mid-call leaves the backend in rotation or
    /// draining: the next `enable` and `drain` succeed and the drain
    /// completes.
    LbDrainCancelSafe,
    /// A `switch_to` dropped mid-call leaves the old or the new group live,
    /// and the next `switch_to` reads back.
    LbSwitchCancelSafe,
    /// A `set_weights` dropped mid-call leaves the old or the new split
    /// live, and the next `set_weights` reads back.
    LbWeightsCancelSafe,
    /// `LoadBalancer::apply_policy` of a policy the driver declares it can
    /// apply, twice, succeeds.
    LbPolicyIdempotent,
    /// After `LoadBalancer::apply_policy`, `live_group` reads back the one
    /// group all traffic goes to (none when rules or a split send some
    /// elsewhere), and a traffic probe, when given, sees the policy route.
    LbPolicyReadBack,
    /// A policy needing a capability the driver does not declare is refused
    /// with `RoutingError::Unsupported` naming the driver and a capability
    /// it lacks, as a permanent error, and nothing changes.
    LbPolicyUnsupportedRefused,
    /// An invalid policy is refused with `RoutingError::Invalid`, as a
    /// permanent error, and nothing changes.
    LbPolicyInvalidRefused,
    /// `set_weights` or `switch_to` after a policy replaces it: its rules no
    /// longer route.
    LbPolicyReplaced,
    /// An `apply_policy` dropped mid-call leaves the old or the new policy
    /// live, and the next `apply_policy` reads back.
    LbPolicyCancelSafe,
    /// `Instance::backend` never changes.
    InstanceBackendStable,
    /// `Instance::current_release` twice reads the same release.
    InstanceCurrentReleaseReadOnly,
    /// After `Instance::install(r)`, `current_release` reads back `r`, and
    /// a second install of `r` keeps it.
    InstanceInstallReadBack,
    /// After `Instance::start`, `health` becomes healthy within the suite's
    /// deadline; a second start succeeds and keeps it healthy.
    InstanceStartHealthy,
    /// `Instance::stop` twice succeeds, and a stopped instance is not
    /// healthy.
    InstanceStopIdempotent,
    /// `Instance::force_stop` twice succeeds, and leaves the instance not
    /// healthy.
    InstanceForceStopIdempotent,
    /// After a stop, `Instance::active_connections` is 0 or unknown.
    InstanceConnectionsAfterStop,
    /// `Instance::restore` of a release installed before makes it current
    /// again, twice.
    InstanceRestoreReadBack,
    /// `Instance::restore` of a release never installed fails permanently
    /// and leaves the current release unchanged.
    InstanceRestoreUnknownFails,
    /// `Instance::set_marker` reads back with `marker`, twice, and `None`
    /// removes it.
    InstanceMarkerReadBack,
    /// An `install` dropped mid-call leaves the old or the new release
    /// current; the next install reads back and the release starts healthy.
    InstanceInstallCancelSafe,
    /// A `start` or `stop` dropped mid-call is finished by the next call of
    /// the same method.
    InstanceStartStopCancelSafe,
    /// `MetricsSource::observe` twice gives the same kind of answer.
    MetricsObserveIdempotent,
    /// A value is finite and in its metric's range (an error rate in
    /// 0–1, a latency or count not negative).
    MetricsValueInRange,
    /// A group without data answers `NoData`, never a value.
    MetricsNoDataIsNoData,
    /// An unreachable provider answers `ProviderError`, never a value or
    /// `NoData`.
    MetricsUnreachableIsProviderError,
    /// An `observe` dropped mid-call changes nothing: the next one gives the
    /// same kind of answer.
    MetricsObserveCancelSafe,
}

impl Clause {
    /// The trait method and the guarantee, in one line.
    pub fn describe(self) -> &'static str {
        match self {
            Clause::LbPreflight => "LoadBalancer::preflight succeeds on a balancer that can be driven, and is read-only",
            Clause::LbEnableIdempotent => "LoadBalancer::enable is idempotent",
            Clause::LbDrainIdempotent => "LoadBalancer::drain is idempotent",
            Clause::LbDrainCompletes => "after LoadBalancer::drain, active_connections reaches 0",
            Clause::LbDisableIdempotent => "LoadBalancer::disable is idempotent and enable undoes it",
            Clause::LbUnknownBackendRefused => "a backend the balancer does not know is refused with a permanent error",
            Clause::LbSwitchReadBack => "after LoadBalancer::switch_to(g), live_group reads back g",
            Clause::LbSwitchIdempotent => "LoadBalancer::switch_to is idempotent",
            Clause::LbWeightsReadBack => "after LoadBalancer::set_weights, live_group reads back the group with 100 % (none for a split)",
            Clause::LbFailedWeightsKeepSplit => "a failed LoadBalancer::set_weights is permanent for bad input and keeps the previous split live",
            Clause::LbUnreachableRefused => "a balancer that cannot be reached fails preflight (as unreachable) and every change",
            Clause::LbDrainCancelSafe => "LoadBalancer::drain is cancel-safe",
            Clause::LbSwitchCancelSafe => "LoadBalancer::switch_to is cancel-safe: the old or the new group is live",
            Clause::LbWeightsCancelSafe => "LoadBalancer::set_weights is cancel-safe: the old or the new split is live",
            Clause::LbPolicyIdempotent => "LoadBalancer::apply_policy of a declared policy is idempotent",
            Clause::LbPolicyReadBack => "after LoadBalancer::apply_policy, live_group (and traffic, when probed) reads back the policy",
            Clause::LbPolicyUnsupportedRefused => "LoadBalancer::apply_policy refuses a policy the driver does not declare with RoutingError::Unsupported naming it, permanently, changing nothing",
            Clause::LbPolicyInvalidRefused => "LoadBalancer::apply_policy refuses an invalid policy with RoutingError::Invalid, permanently, changing nothing",
            Clause::LbPolicyReplaced => "LoadBalancer::set_weights and switch_to replace a live policy",
            Clause::LbPolicyCancelSafe => "LoadBalancer::apply_policy is cancel-safe: the old or the new policy is live",
            Clause::InstanceBackendStable => "Instance::backend never changes",
            Clause::InstanceCurrentReleaseReadOnly => "Instance::current_release is read-only",
            Clause::InstanceInstallReadBack => "after Instance::install(r), current_release reads back r (idempotent)",
            Clause::InstanceStartHealthy => "after Instance::start, health becomes healthy; start is idempotent",
            Clause::InstanceStopIdempotent => "Instance::stop is idempotent and a stopped instance is not healthy",
            Clause::InstanceForceStopIdempotent => "Instance::force_stop is idempotent and leaves the instance not healthy",
            Clause::InstanceConnectionsAfterStop => "after Instance::stop, active_connections is 0 or unknown",
            Clause::InstanceRestoreReadBack => "Instance::restore makes a release installed before current again (idempotent)",
            Clause::InstanceRestoreUnknownFails => "Instance::restore of a release never installed fails permanently and changes nothing",
            Clause::InstanceMarkerReadBack => "Instance::set_marker reads back with marker (idempotent)",
            Clause::InstanceInstallCancelSafe => "Instance::install is cancel-safe: the old or the new release is current, never a half-written one",
            Clause::InstanceStartStopCancelSafe => "Instance::start and stop are cancel-safe: the next call finishes them",
            Clause::MetricsObserveIdempotent => "MetricsSource::observe is read-only: two answers of the same kind",
            Clause::MetricsValueInRange => "MetricsSource::observe gives finite values in the metric's range",
            Clause::MetricsNoDataIsNoData => "MetricsSource::observe answers NoData for a group without data",
            Clause::MetricsUnreachableIsProviderError => "MetricsSource::observe answers ProviderError when the provider cannot be reached",
            Clause::MetricsObserveCancelSafe => "MetricsSource::observe is cancel-safe",
        }
    }
}

impl fmt::Display for Clause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// A broken clause: which one, and what the suite saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConformanceFailure {
    /// The clause the driver broke.
    pub clause: Clause,
    /// What was done and what came back.
    pub detail: String,
}

impl ConformanceFailure {
    pub(crate) fn new(clause: Clause, detail: impl Into<String>) -> Self {
        Self {
            clause,
            detail: detail.into(),
        }
    }

    /// A failure of `clause` because a call that must succeed failed.
    pub(crate) fn call(clause: Clause, call: &str, e: &DriverError) -> Self {
        Self::new(clause, format!("{call} failed: {e}"))
    }
}

impl fmt::Display for ConformanceFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conformance: {} — {}", self.clause, self.detail)
    }
}

impl std::error::Error for ConformanceFailure {}

/// What a passing run checked and what it skipped (and why).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conformance {
    /// The clauses checked, in order.
    pub passed: Vec<Clause>,
    /// The clauses skipped, with the reason the suite was given.
    pub skipped: Vec<(Clause, &'static str)>,
}

impl Conformance {
    pub(crate) fn pass(&mut self, c: Clause) {
        if !self.passed.contains(&c) {
            self.passed.push(c);
        }
    }

    pub(crate) fn skip(&mut self, c: Clause, why: &'static str) {
        self.skipped.push((c, why));
    }
}

impl fmt::Display for Conformance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} clauses passed, {} skipped",
            self.passed.len(),
            self.skipped.len()
        )?;
        for c in &self.passed {
            writeln!(f, "  ok    {c}")?;
        }
        for (c, why) in &self.skipped {
            writeln!(f, "  skip  {c} ({why})")?;
        }
        Ok(())
    }
}

/// Backends from `(id, address, group)` triples, for setting up a driver
/// under test in a line.
///
/// # Panics
/// When an id, address or group is not valid (the message names it).
pub fn backends(list: &[(&str, &str, &str)]) -> Vec<deploykit::Backend> {
    list.iter()
        .map(|(id, address, group)| deploykit::Backend {
            id: deploykit::InstanceId::new(*id).unwrap_or_else(|e| panic!("backend id {id:?}: {e}")),
            address: deploykit::Address::parse(address)
                .unwrap_or_else(|e| panic!("address {address:?}: {e}")),
            group: deploykit::Group::new(*group).unwrap_or_else(|e| panic!("group {group:?}: {e}")),
        })
        .collect()
}

/// `Ok(value)` or a [`ConformanceFailure`] of `clause` naming `call`.
pub(crate) fn must<T>(
    clause: Clause,
    call: &str,
    r: Result<T, DriverError>,
) -> Result<T, ConformanceFailure> {
    r.map_err(|e| ConformanceFailure::call(clause, call, &e))
}

/// Polls `fut` until `after` has passed, then drops it: with `after` zero
/// the future is polled exactly once. Returns whether it finished.
pub(crate) async fn cancel_after<F: Future>(after: Duration, fut: F) -> bool {
    tokio::time::timeout(after, fut).await.is_ok()
}

/// Asks `probe` every `interval` until it returns `Some`, or `deadline`
/// passed (then the last answer seen is returned as `Err`).
pub(crate) async fn eventually<T, L, F, Fut>(
    deadline: Duration,
    interval: Duration,
    mut probe: F,
) -> Result<T, L>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, L>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        match probe().await {
            Ok(v) => return Ok(v),
            Err(last) if tokio::time::Instant::now() >= end => return Err(last),
            Err(_) => tokio::time::sleep(interval).await,
        }
    }
}

#[cfg(test)]
mod tests;
