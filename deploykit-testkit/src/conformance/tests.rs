//! The suite against the testkit's fakes, and against drivers broken on
//! purpose: each break must be caught and named.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use deploykit::{
    Backend, DriverError, Group, GroupWeight, Health, Instance, InstanceId, LoadBalancer, Metric,
    Observation, ReleaseId,
};

use super::backends as backends_of;
use super::*;
use crate::{FakeFleet, FakeInstance, FakeLoadBalancer, FakeMetrics};

fn backends(fleet: &FakeFleet) -> Vec<Backend> {
    fleet.instances().iter().map(|i| i.backend().clone()).collect()
}

fn releases() -> [ReleaseId; 2] {
    [ReleaseId::new("v1").unwrap(), ReleaseId::new("v2").unwrap()]
}

#[tokio::test(start_paused = true)]
async fn the_fake_load_balancer_passes_every_clause() {
    let fleet =
        FakeFleet::with_groups(&[("blue", 2), ("green", 2)]).connections("i-1", 4, Duration::from_secs(3));
    let done = load_balancer(&fleet.load_balancer(), &backends(&fleet))
        .await
        .unwrap();
    assert!(done.skipped.is_empty(), "{done}");
    for c in [
        Clause::LbDrainCompletes,
        Clause::LbSwitchCancelSafe,
        Clause::LbWeightsReadBack,
        Clause::LbFailedWeightsKeepSplit,
        Clause::LbUnknownBackendRefused,
        Clause::LbDrainCancelSafe,
        Clause::LbPolicyIdempotent,
        Clause::LbPolicyReadBack,
        Clause::LbPolicyUnsupportedRefused,
        Clause::LbPolicyInvalidRefused,
        Clause::LbPolicyReplaced,
        Clause::LbPolicyCancelSafe,
    ] {
        assert!(done.passed.contains(&c), "{c} not checked:\n{done}");
    }
    assert!(fleet.in_rotation("i-1") && fleet.in_rotation("i-2"));
    assert_eq!(fleet.live_group(), Some(Group::new("blue").unwrap()));
    assert!(
        fleet.routing_violations().is_empty(),
        "{:?}",
        fleet.routing_violations()
    );
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_outlasts_the_deadline_is_a_failure() {
    let fleet = FakeFleet::new(1).connections("i-1", 2, Duration::from_secs(60));
    let err = LoadBalancerSuite::default()
        .deadline(Duration::from_secs(10))
        .run(&fleet.load_balancer(), &backends(&fleet))
        .await
        .unwrap_err();
    assert_eq!(err.clause, Clause::LbDrainCompletes, "{err}");
    assert!(err.detail.contains("2 connections still open"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn the_fake_instance_passes_every_clause_but_markers() {
    let fleet = FakeFleet::new(1).fresh("i-1");
    let inst = fleet.instance("i-1");
    let done = InstanceSuite::default()
        .without_markers()
        .run(&inst, &releases())
        .await
        .unwrap();
    assert_eq!(
        done.skipped,
        vec![(
            Clause::InstanceMarkerReadBack,
            "the instance keeps no deployment marker"
        )]
    );
    assert!(done.passed.contains(&Clause::InstanceInstallCancelSafe), "{done}");
    assert!(!fleet.is_running("i-1"));
}

#[tokio::test(start_paused = true)]
async fn fake_metrics_pass_and_an_unreachable_provider_is_a_provider_error() {
    let m = FakeMetrics::new()
        .set("canary", Metric::ErrorRate, 0.02)
        .set("canary", Metric::LatencyP99, 0.3);
    let canary = Group::new("canary").unwrap();
    let done = metrics_source(
        &m,
        &canary,
        &[Metric::ErrorRate, Metric::LatencyP99],
        &Group::new("nobody").unwrap(),
    )
    .await
    .unwrap();
    assert!(done.passed.contains(&Clause::MetricsNoDataIsNoData), "{done}");

    let down = FakeMetrics::new()
        .always(
            "canary",
            Metric::ErrorRate,
            Observation::ProviderError("refused".into()),
        )
        .always(
            "canary",
            Metric::LatencyP99,
            Observation::ProviderError("refused".into()),
        )
        .always(
            "canary",
            Metric::RequestCount,
            Observation::ProviderError("refused".into()),
        );
    MetricsSuite::default()
        .with_data(canary.clone(), [])
        .unreachable()
        .run(&down)
        .await
        .unwrap();
    // A provider that answers NoData while it is down hides the outage.
    let err = MetricsSuite::default()
        .with_data(canary, [])
        .unreachable()
        .run(&m)
        .await
        .unwrap_err();
    assert_eq!(err.clause, Clause::MetricsUnreachableIsProviderError, "{err}");
}

#[tokio::test(start_paused = true)]
async fn metrics_out_of_range_or_invented_are_caught() {
    let canary = Group::new("canary").unwrap();
    let m = FakeMetrics::new().set("canary", Metric::ErrorRate, 3.0);
    let err = MetricsSuite::default()
        .with_data(canary.clone(), [Metric::ErrorRate])
        .run(&m)
        .await
        .unwrap_err();
    assert_eq!(err.clause, Clause::MetricsValueInRange, "{err}");

    let m = FakeMetrics::new().set("nobody", Metric::RequestCount, 0.0);
    let err = MetricsSuite::default()
        .without_data(Group::new("nobody").unwrap())
        .run(&m)
        .await
        .unwrap_err();
    assert_eq!(err.clause, Clause::MetricsNoDataIsNoData, "{err}");
}

/// How [`Broken`] breaks the fake load balancer's contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LbBreak {
    /// `switch_to` succeeds without doing anything.
    SwitchIgnored,
    /// `switch_to` first splits traffic, then switches: dropped in between,
    /// no group is live.
    SwitchNotAtomic,
    /// An unknown backend is "transient".
    UnknownTransient,
    /// `drain` of a backend it does not know succeeds.
    UnknownAccepted,
    /// The second drain of a backend fails.
    DrainNotIdempotent,
}

#[derive(Debug)]
struct Broken {
    inner: FakeLoadBalancer,
    known: Vec<Backend>,
    mode: LbBreak,
    drained: Mutex<Vec<InstanceId>>,
}

#[async_trait]
impl LoadBalancer for Broken {
    fn name(&self) -> &str {
        "broken"
    }
    async fn drain(&self, b: &Backend) -> Result<(), DriverError> {
        if !self.known.contains(b) {
            match self.mode {
                LbBreak::UnknownTransient => return Err(DriverError::transient("busy")),
                LbBreak::UnknownAccepted => return Ok(()),
                _ => {}
            }
        }
        if self.mode == LbBreak::DrainNotIdempotent {
            let mut drained = self.drained.lock().unwrap();
            if drained.contains(&b.id) {
                return Err(DriverError::new(format!("{} is already draining", b.id)));
            }
            drained.push(b.id.clone());
        }
        self.inner.drain(b).await
    }
    async fn active_connections(&self, b: &Backend) -> Result<Option<u64>, DriverError> {
        self.inner.active_connections(b).await
    }
    async fn enable(&self, b: &Backend) -> Result<(), DriverError> {
        self.drained.lock().unwrap().retain(|id| *id != b.id);
        self.inner.enable(b).await
    }
    async fn disable(&self, b: &Backend) -> Result<(), DriverError> {
        self.inner.disable(b).await
    }
    async fn set_weights(&self, w: &[GroupWeight]) -> Result<(), DriverError> {
        self.inner.set_weights(w).await
    }
    async fn switch_to(&self, g: &Group) -> Result<(), DriverError> {
        match self.mode {
            LbBreak::SwitchIgnored => Ok(()),
            LbBreak::SwitchNotAtomic => {
                let all: Vec<GroupWeight> = ["blue", "green"]
                    .iter()
                    .map(|n| GroupWeight {
                        group: Group::new(*n).unwrap(),
                        percent: 50,
                    })
                    .collect();
                self.inner.set_weights(&all).await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
                self.inner.switch_to(g).await
            }
            _ => self.inner.switch_to(g).await,
        }
    }
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        self.inner.live_group().await
    }
}

#[tokio::test(start_paused = true)]
async fn each_broken_load_balancer_is_caught_by_its_clause() {
    for (mode, clause) in [
        (LbBreak::SwitchIgnored, Clause::LbSwitchReadBack),
        (LbBreak::SwitchNotAtomic, Clause::LbSwitchCancelSafe),
        (LbBreak::UnknownTransient, Clause::LbUnknownBackendRefused),
        (LbBreak::UnknownAccepted, Clause::LbUnknownBackendRefused),
        (LbBreak::DrainNotIdempotent, Clause::LbDrainIdempotent),
    ] {
        let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
        let lb = Broken {
            inner: fleet.load_balancer(),
            known: backends(&fleet),
            mode,
            drained: Mutex::default(),
        };
        let err = load_balancer(&lb, &backends(&fleet)).await.unwrap_err();
        assert_eq!(err.clause, clause, "{mode:?}: {err}");
        assert!(err.to_string().starts_with("conformance: "), "{err}");
    }
}

/// An instance whose install writes a placeholder release first, and whose
/// restore of a release it never had succeeds.
#[derive(Debug)]
struct BrokenInstance {
    inner: FakeInstance,
    install_in_two_steps: bool,
}

#[async_trait]
impl Instance for BrokenInstance {
    fn backend(&self) -> &Backend {
        self.inner.backend()
    }
    async fn current_release(&self) -> Result<Option<ReleaseId>, DriverError> {
        self.inner.current_release().await
    }
    async fn stop(&self) -> Result<(), DriverError> {
        self.inner.stop().await
    }
    async fn force_stop(&self) -> Result<(), DriverError> {
        self.inner.force_stop().await
    }
    async fn install(&self, r: &ReleaseId) -> Result<(), DriverError> {
        if self.install_in_two_steps {
            self.inner.install(&ReleaseId::new("partial").unwrap()).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.install(r).await
    }
    async fn restore(&self, r: &ReleaseId) -> Result<(), DriverError> {
        if self.install_in_two_steps {
            return self.inner.restore(r).await;
        }
        match self.inner.restore(r).await {
            Err(_) => Ok(()),
            ok => ok,
        }
    }
    async fn start(&self) -> Result<(), DriverError> {
        self.inner.start().await
    }
    async fn health(&self) -> Result<Health, DriverError> {
        self.inner.health().await
    }
}

#[tokio::test(start_paused = true)]
async fn each_broken_instance_is_caught_by_its_clause() {
    for (two_steps, clause) in [
        (true, Clause::InstanceInstallCancelSafe),
        (false, Clause::InstanceRestoreUnknownFails),
    ] {
        let fleet = FakeFleet::new(1);
        let inst = BrokenInstance {
            inner: fleet.instance("i-1"),
            install_in_two_steps: two_steps,
        };
        let err = InstanceSuite::default()
            .without_markers()
            .run(&inst, &releases())
            .await
            .unwrap_err();
        assert_eq!(err.clause, clause, "{err}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_driver_that_cannot_split_or_count_says_so_and_the_clauses_are_skipped() {
    let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
    let done = LoadBalancerSuite::default()
        .without_connection_counts()
        .without_splits()
        .run(&fleet.load_balancer(), &backends(&fleet))
        .await
        .unwrap();
    assert_eq!(
        done.skipped,
        vec![(Clause::LbDrainCompletes, "the driver cannot count connections")]
    );
}

/// A balancer that is down: every call fails, or (`drain_ok`) a drain
/// pretends to succeed.
#[derive(Debug)]
struct Down {
    drain_ok: bool,
}

fn refused() -> DriverError {
    DriverError::transient("connection refused")
}

#[async_trait]
impl LoadBalancer for Down {
    fn name(&self) -> &str {
        "down"
    }
    async fn drain(&self, _: &Backend) -> Result<(), DriverError> {
        if self.drain_ok {
            Ok(())
        } else {
            Err(refused())
        }
    }
    async fn active_connections(&self, _: &Backend) -> Result<Option<u64>, DriverError> {
        Err(refused())
    }
    async fn enable(&self, _: &Backend) -> Result<(), DriverError> {
        Err(refused())
    }
    async fn disable(&self, _: &Backend) -> Result<(), DriverError> {
        Err(refused())
    }
    async fn set_weights(&self, _: &[GroupWeight]) -> Result<(), DriverError> {
        Err(refused())
    }
    async fn switch_to(&self, _: &Group) -> Result<(), DriverError> {
        Err(refused())
    }
    async fn preflight(&self) -> Result<(), DriverError> {
        Err(refused().with_preflight_failure(deploykit::PreflightFailure::Unreachable))
    }
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_balancer_must_fail_preflight_and_every_change() {
    let b = backends_of(&[("web-1", "127.0.0.1:8001", "blue")]);
    let suite = LoadBalancerSuite::default().unreachable();
    let done = suite.run(&Down { drain_ok: false }, &b).await.unwrap();
    assert_eq!(done.passed, vec![Clause::LbUnreachableRefused]);

    let err = suite.run(&Down { drain_ok: true }, &b).await.unwrap_err();
    assert_eq!(err.clause, Clause::LbUnreachableRefused);
    assert!(err.detail.contains("drain(web-1) succeeded"), "{err}");

    // A balancer that works is not unreachable.
    let fleet = FakeFleet::new(1);
    let err = suite
        .run(&fleet.load_balancer(), &backends(&fleet))
        .await
        .unwrap_err();
    assert_eq!(err.detail, "preflight succeeded");
}

/// deploykit's stand-in for fleets with nothing in front: every change is
/// a no-op that succeeds, and it can read nothing back.
#[tokio::test(start_paused = true)]
async fn no_load_balancer_conforms_as_a_balancer_that_can_do_nothing() {
    let b = backends_of(&[
        ("web-1", "127.0.0.1:8001", "blue"),
        ("web-2", "127.0.0.1:8002", "green"),
    ]);
    let done = LoadBalancerSuite::default()
        .without_connection_counts()
        .without_per_backend_routing()
        .without_live_group()
        .without_backend_list()
        .run(&deploykit::NoLoadBalancer, &b)
        .await
        .unwrap();
    assert_eq!(
        done.passed,
        vec![
            Clause::LbPreflight,
            Clause::LbEnableIdempotent,
            Clause::LbSwitchIdempotent,
            // Its apply_policy is the trait's default: plain policies are
            // accepted, the rest refused by type before anything is done.
            Clause::LbPolicyIdempotent,
            Clause::LbPolicyUnsupportedRefused,
            Clause::LbPolicyInvalidRefused,
        ]
    );
}

/// How a routing driver breaks its contract on purpose.
#[derive(Debug, Clone, Copy)]
enum PolicyBreak {
    /// Refuses an unsupported policy with a plain message, not a
    /// `RoutingError`.
    UntypedRefusal,
    /// Switches to the first split group, then refuses.
    RefusalTouches,
    /// Declares header rules; after a rules policy, `switch_to` keeps the
    /// rules live (the probe still sees them).
    SwitchKeepsRules,
    /// Declares header rules but routes nothing by them.
    RulesIgnored,
    /// Applies a rules policy in two steps: all traffic to the rule's group
    /// first, the split and rule after a sleep, so a drop in between leaves
    /// neither policy live.
    NotAtomic,
}

/// A fake balancer with header rules: `rule` is the live rule's
/// `(header, value, group)`, routed by [`PolicyLb::route`].
#[derive(Debug)]
struct PolicyLb {
    inner: FakeLoadBalancer,
    mode: Option<PolicyBreak>,
    rule: Mutex<Option<(String, String, Group)>>,
}

impl PolicyLb {
    fn new(fleet: &FakeFleet, mode: Option<PolicyBreak>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            inner: fleet.load_balancer(),
            mode,
            rule: Mutex::default(),
        })
    }

    /// The group a request goes to: the live rule's, else the live group.
    fn route(&self, fleet: &FakeFleet, req: &ProbeRequest) -> Result<Group, String> {
        if let Some((h, v, g)) = self.rule.lock().unwrap().clone() {
            if req.headers.iter().any(|(n, x)| *n == h && *x == v) {
                return Ok(g);
            }
        }
        fleet.live_group().ok_or_else(|| "traffic is split".to_string())
    }
}

#[async_trait]
impl LoadBalancer for PolicyLb {
    fn name(&self) -> &str {
        "policy-fake"
    }
    async fn drain(&self, b: &Backend) -> Result<(), DriverError> {
        self.inner.drain(b).await
    }
    async fn active_connections(&self, b: &Backend) -> Result<Option<u64>, DriverError> {
        self.inner.active_connections(b).await
    }
    async fn enable(&self, b: &Backend) -> Result<(), DriverError> {
        self.inner.enable(b).await
    }
    async fn disable(&self, b: &Backend) -> Result<(), DriverError> {
        self.inner.disable(b).await
    }
    async fn set_weights(&self, w: &[GroupWeight]) -> Result<(), DriverError> {
        self.inner.set_weights(w).await?;
        *self.rule.lock().unwrap() = None;
        Ok(())
    }
    async fn switch_to(&self, g: &Group) -> Result<(), DriverError> {
        self.inner.switch_to(g).await?;
        if !matches!(self.mode, Some(PolicyBreak::SwitchKeepsRules)) {
            *self.rule.lock().unwrap() = None;
        }
        Ok(())
    }
    fn capabilities(&self) -> deploykit::routing::Capabilities {
        deploykit::routing::Capabilities::weights_and_switch()
            .with(deploykit::routing::Capability::HeaderMatch)
    }
    async fn apply_policy(&self, p: &deploykit::routing::TrafficPolicy) -> Result<(), DriverError> {
        if let Err(e) = self.capabilities().check(self.name(), p) {
            return match self.mode {
                Some(PolicyBreak::UntypedRefusal) => Err(DriverError::new(e.to_string())),
                Some(PolicyBreak::RefusalTouches) => {
                    self.inner.switch_to(&p.split.weights[0].group).await?;
                    Err(e.into())
                }
                _ => Err(e.into()),
            };
        }
        let rule = p.rules.first().map(|r| match &r.matches {
            deploykit::routing::Match::Header { name, value } => {
                (name.clone(), value.text().to_string(), r.group.clone())
            }
            _ => unreachable!("only header rules are declared"),
        });
        if let (Some(PolicyBreak::NotAtomic), Some((_, _, g))) = (self.mode, &rule) {
            // Everything to the rule's group first: the window a cancelled
            // call can stop in.
            self.inner.switch_to(g).await?;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.inner.set_weights(&p.split.weights).await?;
        if !matches!(self.mode, Some(PolicyBreak::RulesIgnored)) {
            *self.rule.lock().unwrap() = rule;
        }
        Ok(())
    }
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        if self.rule.lock().unwrap().is_some() {
            return Ok(None);
        }
        self.inner.live_group().await
    }
}

fn probe_of(lb: &std::sync::Arc<PolicyLb>, fleet: &FakeFleet) -> TrafficProbe {
    let (lb, fleet) = (lb.clone(), fleet.clone());
    std::sync::Arc::new(move |req: ProbeRequest| {
        let r = lb.route(&fleet, &req);
        Box::pin(async move { r }) as ProbeFuture
    })
}

#[tokio::test(start_paused = true)]
async fn a_driver_with_header_rules_passes_the_routing_clauses_traffic_probed() {
    let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
    let lb = PolicyLb::new(&fleet, None);
    let done = LoadBalancerSuite::default()
        .traffic_probe(probe_of(&lb, &fleet))
        .run(lb.as_ref(), &backends(&fleet))
        .await
        .unwrap();
    assert!(done.skipped.is_empty(), "{done}");
    for c in [
        Clause::LbPolicyIdempotent,
        Clause::LbPolicyReadBack,
        Clause::LbPolicyUnsupportedRefused,
        Clause::LbPolicyInvalidRefused,
        Clause::LbPolicyReplaced,
        Clause::LbPolicyCancelSafe,
    ] {
        assert!(done.passed.contains(&c), "{c} not checked:\n{done}");
    }
    assert_eq!(fleet.live_group(), Some(Group::new("blue").unwrap()));
}

#[tokio::test(start_paused = true)]
async fn each_broken_routing_driver_is_caught_by_its_clause() {
    for (mode, clause, detail) in [
        (
            PolicyBreak::UntypedRefusal,
            Clause::LbPolicyUnsupportedRefused,
            "without a RoutingError",
        ),
        (
            PolicyBreak::RefusalTouches,
            Clause::LbPolicyUnsupportedRefused,
            "live_group is blue, expected green",
        ),
        (
            PolicyBreak::SwitchKeepsRules,
            Clause::LbPolicyReplaced,
            "live_group is none, expected green",
        ),
        (
            PolicyBreak::RulesIgnored,
            Clause::LbPolicyReadBack,
            "live_group is blue, expected none",
        ),
        (
            PolicyBreak::NotAtomic,
            Clause::LbPolicyCancelSafe,
            "live_group is green, neither blue nor none",
        ),
    ] {
        let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
        let lb = PolicyLb::new(&fleet, Some(mode));
        let err = LoadBalancerSuite::default()
            .traffic_probe(probe_of(&lb, &fleet))
            .cancel_points([Duration::from_millis(1)])
            .run(lb.as_ref(), &backends(&fleet))
            .await
            .unwrap_err();
        assert_eq!(err.clause, clause, "{mode:?}: {err}");
        assert!(err.detail.contains(detail), "{mode:?}: {err}");
    }
    // Without a live_group read-back, the traffic probe alone sees the mix.
    let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
    let lb = PolicyLb::new(&fleet, Some(PolicyBreak::NotAtomic));
    let err = LoadBalancerSuite::default()
        .without_live_group()
        .traffic_probe(probe_of(&lb, &fleet))
        .cancel_points([Duration::from_millis(1)])
        .run(lb.as_ref(), &backends(&fleet))
        .await
        .unwrap_err();
    assert_eq!(err.clause, Clause::LbPolicyCancelSafe, "{err}");
    assert!(
        err.detail.contains("requests went to green, green, green"),
        "{err}"
    );
}

/// A fake balancer with cookie-sticky splits: while one is live, a request
/// goes to the group its `conformance_sticky` cookie hashes to, or, when
/// `forgets_cookie`, to the next group in turn (a balancer that reads no
/// cookie).
#[derive(Debug)]
struct StickyCookieLb {
    inner: FakeLoadBalancer,
    forgets_cookie: bool,
    split: Mutex<Option<Vec<GroupWeight>>>,
    turn: std::sync::atomic::AtomicUsize,
}

impl StickyCookieLb {
    fn new(fleet: &FakeFleet, forgets_cookie: bool) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            inner: fleet.load_balancer(),
            forgets_cookie,
            split: Mutex::default(),
            turn: Default::default(),
        })
    }

    fn route(&self, fleet: &FakeFleet, req: &ProbeRequest) -> Result<Group, String> {
        let Some(weights) = self.split.lock().unwrap().clone() else {
            return fleet.live_group().ok_or_else(|| "traffic is split".to_string());
        };
        let cookie = req
            .headers
            .iter()
            .filter(|(n, _)| n == "cookie")
            .find_map(|(_, v)| v.strip_prefix("conformance_sticky="));
        let point = match (cookie, self.forgets_cookie) {
            (Some(c), false) => {
                c.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                }) % 100
            }
            _ => (self.turn.fetch_add(37, std::sync::atomic::Ordering::SeqCst) % 100) as u64,
        };
        let mut upto = 0u64;
        for w in weights.iter().filter(|w| w.percent > 0) {
            upto += u64::from(w.percent);
            if point < upto {
                return Ok(w.group.clone());
            }
        }
        Err("no group has a share".into())
    }
}

#[async_trait]
impl LoadBalancer for StickyCookieLb {
    fn name(&self) -> &str {
        "sticky-cookie-fake"
    }
    async fn drain(&self, b: &Backend) -> Result<(), DriverError> {
        self.inner.drain(b).await
    }
    async fn active_connections(&self, b: &Backend) -> Result<Option<u64>, DriverError> {
        self.inner.active_connections(b).await
    }
    async fn enable(&self, b: &Backend) -> Result<(), DriverError> {
        self.inner.enable(b).await
    }
    async fn disable(&self, b: &Backend) -> Result<(), DriverError> {
        self.inner.disable(b).await
    }
    async fn set_weights(&self, w: &[GroupWeight]) -> Result<(), DriverError> {
        self.inner.set_weights(w).await?;
        *self.split.lock().unwrap() = None;
        Ok(())
    }
    async fn switch_to(&self, g: &Group) -> Result<(), DriverError> {
        self.inner.switch_to(g).await?;
        *self.split.lock().unwrap() = None;
        Ok(())
    }
    fn capabilities(&self) -> deploykit::routing::Capabilities {
        deploykit::routing::Capabilities::weights_and_switch()
            .with(deploykit::routing::Capability::StickyCookie)
    }
    async fn apply_policy(&self, p: &deploykit::routing::TrafficPolicy) -> Result<(), DriverError> {
        self.capabilities().check(self.name(), p)?;
        self.inner.set_weights(&p.split.weights).await?;
        *self.split.lock().unwrap() = p.split.sticky.is_some().then(|| p.split.weights.clone());
        Ok(())
    }
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        self.inner.live_group().await
    }
}

fn sticky_probe_of(lb: &std::sync::Arc<StickyCookieLb>, fleet: &FakeFleet) -> TrafficProbe {
    let (lb, fleet) = (lb.clone(), fleet.clone());
    std::sync::Arc::new(move |req: ProbeRequest| {
        let r = lb.route(&fleet, &req);
        Box::pin(async move { r }) as ProbeFuture
    })
}

#[tokio::test(start_paused = true)]
async fn a_cookie_sticky_driver_keeps_each_cookie_on_one_group() {
    let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
    let lb = StickyCookieLb::new(&fleet, false);
    let done = LoadBalancerSuite::default()
        .traffic_probe(sticky_probe_of(&lb, &fleet))
        .run(lb.as_ref(), &backends(&fleet))
        .await
        .unwrap();
    assert!(done.passed.contains(&Clause::LbPolicyReadBack), "{done}");
}

#[tokio::test(start_paused = true)]
async fn a_driver_that_reads_no_sticky_cookie_is_caught() {
    let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
    let lb = StickyCookieLb::new(&fleet, true);
    let err = LoadBalancerSuite::default()
        .traffic_probe(sticky_probe_of(&lb, &fleet))
        .run(lb.as_ref(), &backends(&fleet))
        .await
        .unwrap_err();
    assert_eq!(err.clause, Clause::LbPolicyReadBack, "{err}");
    assert!(err.detail.contains("conformance_sticky=user-"), "{err}");
    assert!(err.detail.contains("a sticky split keeps one"), "{err}");
}
