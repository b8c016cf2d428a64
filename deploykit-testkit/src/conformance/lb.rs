//! The [`LoadBalancer`] contract.

use std::time::Duration;

use deploykit::{
    Address, Backend, DriverError, Group, GroupWeight, InstanceId, LoadBalancer, PreflightFailure,
};

use deploykit::routing::{RoutingError, TrafficPolicy};

use super::policy::{self, PolicyCase, Probe, ProbeRequest, TrafficProbe};
use super::{cancel_after, eventually, must, Clause, Conformance, ConformanceFailure};

/// The load-balancer suite, with what the driver under test can and cannot
/// do. [`Default`] expects everything: connection counts, per-backend
/// routing, traffic splits and a `live_group` read-back.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use deploykit::Instance;
/// use deploykit_testkit::{conformance::LoadBalancerSuite, FakeFleet};
///
/// // Open connections that close 5 s after the drain: the suite waits them out.
/// let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)])
///     .connections("i-1", 3, Duration::from_secs(5));
/// let backends: Vec<_> = fleet.instances().iter().map(|i| i.backend().clone()).collect();
/// LoadBalancerSuite::default()
///     .deadline(Duration::from_secs(10))
///     .run(&fleet.load_balancer(), &backends)
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct LoadBalancerSuite {
    connection_counts: bool,
    per_backend: bool,
    splits: bool,
    live_group: bool,
    backend_list: bool,
    unreachable: bool,
    deadline: Duration,
    interval: Duration,
    cancel_points: Vec<Duration>,
    probe: Option<Probe>,
}

impl Default for LoadBalancerSuite {
    fn default() -> Self {
        Self {
            connection_counts: true,
            per_backend: true,
            splits: true,
            live_group: true,
            backend_list: true,
            unreachable: false,
            deadline: Duration::from_secs(30),
            interval: Duration::from_millis(50),
            cancel_points: vec![
                Duration::ZERO,
                Duration::from_millis(1),
                Duration::from_millis(10),
            ],
            probe: None,
        }
    }
}

/// Runs the [`LoadBalancerSuite::default`] suite against `lb` with
/// `backends` (the backends `lb` was built with; at least one).
///
/// # Errors
/// The first [`ConformanceFailure`] found.
pub async fn load_balancer<L: LoadBalancer + ?Sized>(
    lb: &L,
    backends: &[Backend],
) -> Result<Conformance, ConformanceFailure> {
    LoadBalancerSuite::default().run(lb, backends).await
}

impl LoadBalancerSuite {
    /// The driver answers `None` from `active_connections` (it cannot
    /// count): drains are not waited for.
    pub fn without_connection_counts(mut self) -> Self {
        self.connection_counts = false;
        self
    }

    /// `drain`, `enable` and `disable` have no effect (a switch that routes
    /// whole groups, such as a symlink): they must succeed, and nothing
    /// more is checked of them.
    pub fn without_per_backend_routing(mut self) -> Self {
        self.per_backend = false;
        self
    }

    /// The driver sends all traffic to one group or none: splits other than
    /// 100/0 are not asked for.
    pub fn without_splits(mut self) -> Self {
        self.splits = false;
        self
    }

    /// `live_group` always answers `None` (the trait's default): changes
    /// are made but not read back.
    pub fn without_live_group(mut self) -> Self {
        self.live_group = false;
        self
    }

    /// The driver is not given its backends (it routes whatever it is
    /// asked to): a backend it was never given cannot be refused.
    pub fn without_backend_list(mut self) -> Self {
        self.backend_list = false;
        self
    }

    /// The balancer behind the driver is down (stopped, or its socket
    /// gone): instead of the contract of a working balancer, the suite
    /// checks that the driver says so — `preflight` fails (with
    /// [`PreflightFailure::Unreachable`](deploykit::PreflightFailure) when
    /// it says what it found) and every change fails rather than
    /// succeeding while routing nothing.
    pub fn unreachable(mut self) -> Self {
        self.unreachable = true;
        self
    }

    /// How long a drain may take to reach 0 connections (default 30 s).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// After how long each cancelled call is dropped (default: after one
    /// poll, 1 ms and 10 ms), so a real driver is cut at several points of
    /// its work.
    pub fn cancel_points(mut self, points: impl IntoIterator<Item = Duration>) -> Self {
        self.cancel_points = points.into_iter().collect();
        self
    }

    /// Checks routing with real requests too: after every policy change,
    /// `probe` sends the requests of each [`PolicyCase`] through the
    /// balancer and must see the group the policy routes them to (and,
    /// after a refused policy, the group that was live before).
    pub fn traffic_probe(mut self, probe: TrafficProbe) -> Self {
        self.probe = Some(Probe(probe));
        self
    }

    /// Runs the suite against `lb`, built with `backends`. Every backend is
    /// enabled and the first backend's group is live when it returns `Ok`.
    ///
    /// # Errors
    /// The first [`ConformanceFailure`] found.
    ///
    /// # Panics
    /// When `backends` is empty.
    pub async fn run<L: LoadBalancer + ?Sized>(
        &self,
        lb: &L,
        backends: &[Backend],
    ) -> Result<Conformance, ConformanceFailure> {
        assert!(
            !backends.is_empty(),
            "the load-balancer suite needs at least one backend the balancer was built with"
        );
        let mut groups: Vec<Group> = Vec::new();
        for b in backends {
            if !groups.contains(&b.group) {
                groups.push(b.group.clone());
            }
        }
        let mut done = Conformance::default();
        if self.unreachable {
            unreachable(lb, &backends[0], &groups, &mut done).await?;
            return Ok(done);
        }
        let run = Run {
            suite: self,
            lb,
            groups: &groups,
        };

        must(Clause::LbPreflight, "preflight", lb.preflight().await)?;
        must(Clause::LbPreflight, "a second preflight", lb.preflight().await)?;
        done.pass(Clause::LbPreflight);

        for b in backends {
            must(
                Clause::LbEnableIdempotent,
                &format!("enable({})", b.id),
                lb.enable(b).await,
            )?;
            must(
                Clause::LbEnableIdempotent,
                &format!("a second enable({})", b.id),
                lb.enable(b).await,
            )?;
        }
        done.pass(Clause::LbEnableIdempotent);

        run.switches(&mut done).await?;
        run.weights(&mut done).await?;
        run.policies(&mut done).await?;
        run.per_backend(&backends[0], &mut done).await?;

        for b in backends {
            must(
                Clause::LbEnableIdempotent,
                &format!("enable({})", b.id),
                lb.enable(b).await,
            )?;
        }
        must(
            Clause::LbSwitchIdempotent,
            "switch_to",
            lb.switch_to(&groups[0]).await,
        )?;
        Ok(done)
    }
}

/// The checks of [`LoadBalancerSuite::unreachable`].
async fn unreachable<L: LoadBalancer + ?Sized>(
    lb: &L,
    b: &Backend,
    groups: &[Group],
    done: &mut Conformance,
) -> Result<(), ConformanceFailure> {
    let c = Clause::LbUnreachableRefused;
    match lb.preflight().await {
        Ok(()) => return Err(ConformanceFailure::new(c, "preflight succeeded")),
        Err(e) => match e.preflight_failure() {
            None | Some(PreflightFailure::Unreachable) => {}
            Some(other) => {
                return Err(ConformanceFailure::new(
                    c,
                    format!("preflight says the balancer is {other}, not unreachable: {e}"),
                ))
            }
        },
    }
    let g = &groups[groups.len() - 1];
    let calls: [(String, Result<(), DriverError>); 4] = [
        (format!("drain({})", b.id), lb.drain(b).await),
        (format!("disable({})", b.id), lb.disable(b).await),
        (
            format!("set_weights(100 % to {g})"),
            lb.set_weights(&all_to(groups, g)).await,
        ),
        (format!("switch_to({g})"), lb.switch_to(g).await),
    ];
    for (call, r) in calls {
        if r.is_ok() {
            return Err(ConformanceFailure::new(
                c,
                format!("{call} succeeded, but nothing could have been changed"),
            ));
        }
    }
    done.pass(c);
    Ok(())
}

struct Run<'a, L: ?Sized> {
    suite: &'a LoadBalancerSuite,
    lb: &'a L,
    groups: &'a [Group],
}

fn all_to(groups: &[Group], live: &Group) -> Vec<GroupWeight> {
    groups
        .iter()
        .map(|g| GroupWeight {
            group: g.clone(),
            percent: if g == live { 100 } else { 0 },
        })
        .collect()
}

fn show(g: &Option<Group>) -> String {
    g.as_ref().map_or_else(|| "none".to_owned(), |g| g.to_string())
}

impl<L: LoadBalancer + ?Sized> Run<'_, L> {
    /// Reads `live_group` back and compares it with `want`.
    async fn expect_live(
        &self,
        clause: Clause,
        after: &str,
        want: Option<&Group>,
    ) -> Result<(), ConformanceFailure> {
        if !self.suite.live_group {
            return Ok(());
        }
        let got = must(
            clause,
            &format!("live_group after {after}"),
            self.lb.live_group().await,
        )?;
        if got.as_ref() != want {
            return Err(ConformanceFailure::new(
                clause,
                format!(
                    "after {after}, live_group is {}, expected {}",
                    show(&got),
                    show(&want.cloned())
                ),
            ));
        }
        Ok(())
    }

    async fn live(&self, clause: Clause, after: &str) -> Result<Option<Group>, ConformanceFailure> {
        must(
            clause,
            &format!("live_group after {after}"),
            self.lb.live_group().await,
        )
    }

    /// The group after `g` (or `g` itself when there is one group).
    fn other(&self, g: &Group) -> Group {
        self.groups.iter().find(|o| *o != g).unwrap_or(g).clone()
    }

    async fn switches(&self, done: &mut Conformance) -> Result<(), ConformanceFailure> {
        for g in self.groups {
            let call = format!("switch_to({g})");
            must(Clause::LbSwitchReadBack, &call, self.lb.switch_to(g).await)?;
            self.expect_live(Clause::LbSwitchReadBack, &call, Some(g)).await?;
            let again = format!("a second switch_to({g})");
            must(Clause::LbSwitchIdempotent, &again, self.lb.switch_to(g).await)?;
            self.expect_live(Clause::LbSwitchIdempotent, &again, Some(g))
                .await?;
        }
        self.record(done, Clause::LbSwitchReadBack);
        done.pass(Clause::LbSwitchIdempotent);

        let mut live = self.groups[self.groups.len() - 1].clone();
        for p in &self.suite.cancel_points {
            let target = self.other(&live);
            let call = format!("switch_to({target}) dropped after {p:?}");
            cancel_after(*p, self.lb.switch_to(&target)).await;
            if self.suite.live_group {
                let got = self.live(Clause::LbSwitchCancelSafe, &call).await?;
                if got.as_ref() != Some(&live) && got.as_ref() != Some(&target) {
                    return Err(ConformanceFailure::new(
                        Clause::LbSwitchCancelSafe,
                        format!(
                            "after {call}, live_group is {}, neither {live} nor {target}",
                            show(&got)
                        ),
                    ));
                }
            }
            let next = format!("switch_to({target}) after {call}");
            must(
                Clause::LbSwitchCancelSafe,
                &next,
                self.lb.switch_to(&target).await,
            )?;
            self.expect_live(Clause::LbSwitchCancelSafe, &next, Some(&target))
                .await?;
            live = target;
        }
        self.record(done, Clause::LbSwitchCancelSafe);
        Ok(())
    }

    async fn weights(&self, done: &mut Conformance) -> Result<(), ConformanceFailure> {
        let g0 = &self.groups[0];
        let call = format!("set_weights(100 % to {g0})");
        must(
            Clause::LbWeightsReadBack,
            &call,
            self.lb.set_weights(&all_to(self.groups, g0)).await,
        )?;
        self.expect_live(Clause::LbWeightsReadBack, &call, Some(g0))
            .await?;
        if self.suite.splits && self.groups.len() >= 2 {
            let g1 = &self.groups[1];
            let split = vec![
                GroupWeight {
                    group: g0.clone(),
                    percent: 50,
                },
                GroupWeight {
                    group: g1.clone(),
                    percent: 50,
                },
            ];
            let call = format!("set_weights({g0} 50 %, {g1} 50 %)");
            must(
                Clause::LbWeightsReadBack,
                &call,
                self.lb.set_weights(&split).await,
            )?;
            self.expect_live(Clause::LbWeightsReadBack, &call, None).await?;
            let call = format!("set_weights(100 % to {g1})");
            must(
                Clause::LbWeightsReadBack,
                &call,
                self.lb.set_weights(&all_to(self.groups, g1)).await,
            )?;
            self.expect_live(Clause::LbWeightsReadBack, &call, Some(g1))
                .await?;
            let call = format!("set_weights(100 % to {g0})");
            must(
                Clause::LbWeightsReadBack,
                &call,
                self.lb.set_weights(&all_to(self.groups, g0)).await,
            )?;
            self.expect_live(Clause::LbWeightsReadBack, &call, Some(g0))
                .await?;
        }
        self.record(done, Clause::LbWeightsReadBack);

        // Shares that do not sum to 100 are bad input: a driver may refuse
        // them, and then retrying cannot help and nothing may have changed.
        let bad: Vec<GroupWeight> = match self.groups {
            [a, b, ..] => vec![
                GroupWeight {
                    group: a.clone(),
                    percent: 70,
                },
                GroupWeight {
                    group: b.clone(),
                    percent: 70,
                },
            ],
            [a] => vec![GroupWeight {
                group: a.clone(),
                percent: 50,
            }],
            [] => Vec::new(),
        };
        match self.lb.set_weights(&bad).await {
            Err(e) if e.is_transient() => {
                return Err(ConformanceFailure::new(
                    Clause::LbFailedWeightsKeepSplit,
                    format!("set_weights with shares summing to 140 or 50 failed as transient (retrying cannot help): {e}"),
                ))
            }
            Err(_) => {
                self.expect_live(Clause::LbFailedWeightsKeepSplit, "a refused set_weights", Some(g0))
                    .await?;
                self.record(done, Clause::LbFailedWeightsKeepSplit);
            }
            Ok(()) => {
                done.skip(Clause::LbFailedWeightsKeepSplit, "the driver accepts shares that do not sum to 100");
                must(Clause::LbWeightsReadBack, &call, self.lb.set_weights(&all_to(self.groups, g0)).await)?;
            }
        }

        let mut live = g0.clone();
        for p in &self.suite.cancel_points {
            let target = self.other(&live);
            let call = format!("set_weights(100 % to {target}) dropped after {p:?}");
            cancel_after(*p, self.lb.set_weights(&all_to(self.groups, &target))).await;
            if self.suite.live_group {
                let got = self.live(Clause::LbWeightsCancelSafe, &call).await?;
                if got.as_ref() != Some(&live) && got.as_ref() != Some(&target) {
                    return Err(ConformanceFailure::new(
                        Clause::LbWeightsCancelSafe,
                        format!(
                            "after {call}, live_group is {}, neither {live} nor {target}",
                            show(&got)
                        ),
                    ));
                }
            }
            let next = format!("set_weights(100 % to {target}) after {call}");
            must(
                Clause::LbWeightsCancelSafe,
                &next,
                self.lb.set_weights(&all_to(self.groups, &target)).await,
            )?;
            self.expect_live(Clause::LbWeightsCancelSafe, &next, Some(&target))
                .await?;
            live = target;
        }
        self.record(done, Clause::LbWeightsCancelSafe);
        must(
            Clause::LbSwitchIdempotent,
            &format!("switch_to({g0})"),
            self.lb.switch_to(g0).await,
        )?;
        Ok(())
    }

    /// Passes `c`, or records why it could not be checked without a
    /// `live_group` read-back.
    fn record(&self, done: &mut Conformance, c: Clause) {
        if self.suite.live_group {
            done.pass(c);
        } else {
            done.skip(c, "the driver cannot read back its live group");
        }
    }

    async fn drained(&self, clause: Clause, b: &Backend, after: &str) -> Result<(), ConformanceFailure> {
        if !self.suite.connection_counts {
            must(
                clause,
                &format!("active_connections({})", b.id),
                self.lb.active_connections(b).await,
            )?;
            return Ok(());
        }
        let lb = self.lb;
        let seen = eventually(self.suite.deadline, self.suite.interval, || async move {
            match lb.active_connections(b).await {
                Ok(Some(0)) => Ok(()),
                Ok(Some(n)) => Err(format!("{n} connections still open")),
                Ok(None) => Err("no count (None)".to_owned()),
                Err(e) => Err(format!("active_connections failed: {e}")),
            }
        })
        .await;
        seen.map_err(|last| {
            ConformanceFailure::new(
                clause,
                format!(
                    "{} after {after} did not reach 0 within {:?}: last answer: {last}",
                    b.id, self.suite.deadline
                ),
            )
        })
    }

    async fn per_backend(&self, b: &Backend, done: &mut Conformance) -> Result<(), ConformanceFailure> {
        let lb = self.lb;
        let id = &b.id;
        if !self.suite.per_backend {
            must(
                Clause::LbDrainIdempotent,
                &format!("drain({id})"),
                lb.drain(b).await,
            )?;
            must(
                Clause::LbDisableIdempotent,
                &format!("disable({id})"),
                lb.disable(b).await,
            )?;
            must(
                Clause::LbEnableIdempotent,
                &format!("enable({id})"),
                lb.enable(b).await,
            )?;
            let why = "the driver routes whole groups, not single backends";
            for c in [
                Clause::LbDrainIdempotent,
                Clause::LbDrainCompletes,
                Clause::LbDisableIdempotent,
                Clause::LbUnknownBackendRefused,
                Clause::LbDrainCancelSafe,
            ] {
                done.skip(c, why);
            }
            return Ok(());
        }

        must(
            Clause::LbDrainIdempotent,
            &format!("drain({id})"),
            lb.drain(b).await,
        )?;
        must(
            Clause::LbDrainIdempotent,
            &format!("a second drain({id})"),
            lb.drain(b).await,
        )?;
        done.pass(Clause::LbDrainIdempotent);
        self.drained(Clause::LbDrainCompletes, b, "drain").await?;
        if self.suite.connection_counts {
            done.pass(Clause::LbDrainCompletes);
        } else {
            done.skip(Clause::LbDrainCompletes, "the driver cannot count connections");
        }
        must(
            Clause::LbEnableIdempotent,
            &format!("enable({id}) after a drain"),
            lb.enable(b).await,
        )?;

        must(
            Clause::LbDisableIdempotent,
            &format!("disable({id})"),
            lb.disable(b).await,
        )?;
        must(
            Clause::LbDisableIdempotent,
            &format!("a second disable({id})"),
            lb.disable(b).await,
        )?;
        must(
            Clause::LbDisableIdempotent,
            &format!("enable({id}) after disable"),
            lb.enable(b).await,
        )?;
        done.pass(Clause::LbDisableIdempotent);

        let unknown = Backend {
            id: InstanceId::new("conformance-unknown-backend").expect("a valid id"),
            address: Address::parse("127.0.0.1:9").expect("a valid address"),
            group: b.group.clone(),
        };
        match lb.drain(&unknown).await {
            _ if !self.suite.backend_list => done.skip(
                Clause::LbUnknownBackendRefused,
                "the driver is not given its backends",
            ),
            Ok(()) => {
                return Err(ConformanceFailure::new(
                    Clause::LbUnknownBackendRefused,
                    format!(
                        "drain({}) succeeded, but the balancer was never given it",
                        unknown.id
                    ),
                ))
            }
            Err(e) if e.is_transient() => {
                return Err(ConformanceFailure::new(
                    Clause::LbUnknownBackendRefused,
                    format!(
                        "drain({}) failed as transient (retrying cannot help): {e}",
                        unknown.id
                    ),
                ))
            }
            Err(_) => done.pass(Clause::LbUnknownBackendRefused),
        }

        for p in &self.suite.cancel_points {
            let call = format!("drain({id}) dropped after {p:?}");
            cancel_after(*p, lb.drain(b)).await;
            must(
                Clause::LbDrainCancelSafe,
                &format!("enable({id}) after {call}"),
                lb.enable(b).await,
            )?;
            must(
                Clause::LbDrainCancelSafe,
                &format!("drain({id}) after {call}"),
                lb.drain(b).await,
            )?;
            self.drained(Clause::LbDrainCancelSafe, b, &call).await?;
            must(
                Clause::LbDrainCancelSafe,
                &format!("enable({id}) after {call}"),
                lb.enable(b).await,
            )?;
        }
        done.pass(Clause::LbDrainCancelSafe);
        Ok(())
    }
}

/// The call applying `case`, as failure messages name it.
fn describe_policy(case: &PolicyCase) -> String {
    format!("apply_policy({} policy)", case.capability)
}

impl<L: LoadBalancer + ?Sized> Run<'_, L> {
    /// Sends every request of `routes` through the probe, if the suite has
    /// one, and compares the group that answered.
    async fn expect_routes(
        &self,
        clause: Clause,
        after: &str,
        routes: &[(ProbeRequest, Group)],
    ) -> Result<(), ConformanceFailure> {
        let Some(Probe(probe)) = &self.suite.probe else {
            return Ok(());
        };
        for (req, want) in routes {
            match probe(req.clone()).await {
                Ok(got) if got == *want => {}
                Ok(got) => {
                    return Err(ConformanceFailure::new(
                        clause,
                        format!("after {after}, {req} was answered by {got}, expected {want}"),
                    ))
                }
                Err(e) => {
                    return Err(ConformanceFailure::new(
                        clause,
                        format!("after {after}, {req} failed: {e}"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// Sends each of the case's sticky requests three times through the
    /// probe: one group per request, every group of the split reached.
    async fn expect_sticky(&self, after: &str, case: &PolicyCase) -> Result<(), ConformanceFailure> {
        let c = Clause::LbPolicyReadBack;
        let Some(Probe(probe)) = &self.suite.probe else {
            return Ok(());
        };
        let mut reached = std::collections::BTreeSet::new();
        for req in &case.sticky {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..3 {
                let g = probe(req.clone())
                    .await
                    .map_err(|e| ConformanceFailure::new(c, format!("after {after}, {req} failed: {e}")))?;
                seen.insert(g);
            }
            if seen.len() > 1 {
                let names: Vec<&str> = seen.iter().map(Group::as_str).collect();
                return Err(ConformanceFailure::new(
                    c,
                    format!(
                        "after {after}, {req} sent three times reached {}: a sticky split keeps one",
                        names.join(" and ")
                    ),
                ));
            }
            reached.extend(seen);
        }
        if !case.sticky.is_empty() {
            for w in case.policy.split.weights.iter().filter(|w| w.percent > 0) {
                if !reached.contains(&w.group) {
                    return Err(ConformanceFailure::new(
                        c,
                        format!(
                            "after {after}, none of {} users reached {} ({} %)",
                            case.sticky.len(),
                            w.group,
                            w.percent
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The groups `routes`' requests reach, through the probe (empty
    /// without one).
    async fn observed(
        &self,
        clause: Clause,
        after: &str,
        routes: &[(ProbeRequest, Group)],
    ) -> Result<Vec<Group>, ConformanceFailure> {
        let Some(Probe(probe)) = &self.suite.probe else {
            return Ok(Vec::new());
        };
        let mut seen = Vec::new();
        for (req, _) in routes {
            seen.push(
                probe(req.clone()).await.map_err(|e| {
                    ConformanceFailure::new(clause, format!("after {after}, {req} failed: {e}"))
                })?,
            );
        }
        Ok(seen)
    }

    /// Applies `case` twice and reads it back.
    async fn apply_twice(&self, case: &PolicyCase, done: &mut Conformance) -> Result<(), ConformanceFailure> {
        let call = describe_policy(case);
        // What the executor asks before a run applies the policy.
        must(
            Clause::LbPolicyReadBack,
            &call.replacen("apply_policy", "preflight_policy", 1),
            self.lb.preflight_policy(&case.policy).await,
        )?;
        must(
            Clause::LbPolicyIdempotent,
            &call,
            self.lb.apply_policy(&case.policy).await,
        )?;
        self.expect_live(Clause::LbPolicyReadBack, &call, case.live_group().as_ref())
            .await?;
        self.expect_routes(Clause::LbPolicyReadBack, &call, &case.routes)
            .await?;
        self.expect_sticky(&call, case).await?;
        let again = format!("a second {call}");
        must(
            Clause::LbPolicyIdempotent,
            &again,
            self.lb.apply_policy(&case.policy).await,
        )?;
        self.expect_live(Clause::LbPolicyIdempotent, &again, case.live_group().as_ref())
            .await?;
        self.expect_routes(Clause::LbPolicyIdempotent, &again, &case.routes)
            .await?;
        done.pass(Clause::LbPolicyIdempotent);
        Ok(())
    }

    /// After `case` is live, `switch_to` and then `set_weights` must each
    /// replace it: every request of the case goes to the one live group.
    async fn replaced(&self, case: &PolicyCase, g0: &Group, g1: &Group) -> Result<(), ConformanceFailure> {
        let c = Clause::LbPolicyReplaced;
        let everything_to = |g: &Group| -> Vec<(ProbeRequest, Group)> {
            case.routes.iter().map(|(r, _)| (r.clone(), g.clone())).collect()
        };
        let call = format!("switch_to({g1}) after {}", describe_policy(case));
        must(c, &call, self.lb.switch_to(g1).await)?;
        self.expect_live(c, &call, Some(g1)).await?;
        self.expect_routes(c, &call, &everything_to(g1)).await?;
        must(
            c,
            &describe_policy(case),
            self.lb.apply_policy(&case.policy).await,
        )?;
        let call = format!("set_weights(100 % to {g0}) after {}", describe_policy(case));
        must(c, &call, self.lb.set_weights(&all_to(self.groups, g0)).await)?;
        self.expect_live(c, &call, Some(g0)).await?;
        self.expect_routes(c, &call, &everything_to(g0)).await?;
        Ok(())
    }

    /// Checks that `policy` is refused by the error `check` accepts,
    /// permanently, and that the live group (`Some(before)`) and the
    /// routes stay as they were.
    async fn refused(
        &self,
        clause: Clause,
        what: &str,
        policy: &TrafficPolicy,
        before: &Group,
        routes: &[(ProbeRequest, Group)],
        check: impl Fn(&RoutingError) -> Result<(), String>,
    ) -> Result<(), ConformanceFailure> {
        // The executor's check before a run must refuse it the same way.
        let checked = format!("preflight_policy({what})");
        match self.lb.preflight_policy(policy).await {
            Ok(()) => {
                return Err(ConformanceFailure::new(
                    clause,
                    format!("{checked} passed, but the policy must be refused"),
                ))
            }
            Err(e) => match e.routing_error() {
                None => {
                    return Err(ConformanceFailure::new(
                        clause,
                        format!(
                            "{checked} failed without a RoutingError (build the DriverError from it): {e}"
                        ),
                    ))
                }
                Some(r) => {
                    check(r).map_err(|why| ConformanceFailure::new(clause, format!("{checked}: {why}")))?
                }
            },
        }
        let call = format!("apply_policy({what})");
        match self.lb.apply_policy(policy).await {
            Ok(()) => {
                return Err(ConformanceFailure::new(
                    clause,
                    format!("{call} succeeded, but it must be refused"),
                ))
            }
            Err(e) if e.is_transient() => {
                return Err(ConformanceFailure::new(
                    clause,
                    format!("{call} failed as transient (retrying cannot help): {e}"),
                ))
            }
            Err(e) => match e.routing_error() {
                None => {
                    return Err(ConformanceFailure::new(
                        clause,
                        format!("{call} failed without a RoutingError (build the DriverError from it): {e}"),
                    ))
                }
                Some(r) => {
                    check(r).map_err(|why| ConformanceFailure::new(clause, format!("{call}: {why}")))?
                }
            },
        }
        let after = format!("a refused {call}");
        self.expect_live(clause, &after, Some(before)).await?;
        let unchanged: Vec<(ProbeRequest, Group)> =
            routes.iter().map(|(r, _)| (r.clone(), before.clone())).collect();
        self.expect_routes(clause, &after, &unchanged).await
    }

    /// The routing clauses: declared policies applied, read back, replaced
    /// and cancelled; undeclared and invalid ones refused changing nothing.
    async fn policies(&self, done: &mut Conformance) -> Result<(), ConformanceFailure> {
        let policy_clauses = [
            Clause::LbPolicyIdempotent,
            Clause::LbPolicyReadBack,
            Clause::LbPolicyUnsupportedRefused,
            Clause::LbPolicyInvalidRefused,
            Clause::LbPolicyReplaced,
            Clause::LbPolicyCancelSafe,
        ];
        let [g0, g1, ..] = self.groups else {
            for c in policy_clauses {
                done.skip(c, "routing policies need backends in two groups");
            }
            return Ok(());
        };
        let caps = self.lb.capabilities();
        let name = self.lb.name().to_owned();
        let (declared, undeclared): (Vec<PolicyCase>, Vec<PolicyCase>) = policy::policies(self.groups)
            .into_iter()
            .partition(|case| caps.supports(case.capability));

        // What every driver declares: a switch and weights, through
        // apply_policy.
        let plain = policy::plain(
            g0,
            g1,
            self.suite.splits && caps.supports(deploykit::routing::Capability::Weights),
        );
        for case in &plain {
            self.apply_twice(case, done).await?;
        }
        for case in &declared {
            self.apply_twice(case, done).await?;
            self.replaced(case, g0, g1).await?;
        }
        self.record(done, Clause::LbPolicyReadBack);
        if declared.is_empty() {
            // The replacement of a plain policy is what switch_to and
            // set_weights already check.
            must(Clause::LbPolicyReplaced, "switch_to", self.lb.switch_to(g0).await)?;
            self.expect_live(Clause::LbPolicyReplaced, &format!("switch_to({g0})"), Some(g0))
                .await?;
        }
        self.record(done, Clause::LbPolicyReplaced);

        // Refusals, from a state that is not the default, so a driver that
        // resets on refusal is seen.
        must(
            Clause::LbPolicyUnsupportedRefused,
            &format!("switch_to({g1})"),
            self.lb.switch_to(g1).await,
        )?;
        for case in &undeclared {
            let needed = case.policy.required();
            let missing: Vec<_> = needed.iter().filter(|c| !caps.supports(**c)).copied().collect();
            let name = name.as_str();
            self.refused(
                Clause::LbPolicyUnsupportedRefused,
                &format!("{} policy, not declared", case.capability),
                &case.policy,
                g1,
                &case.routes,
                |r| match r {
                    RoutingError::Unsupported { driver, capability, .. } if driver == name && missing.contains(capability) => Ok(()),
                    RoutingError::Unsupported { driver, capability, .. } => Err(format!(
                        "refused as the {driver} load balancer lacking {capability}, expected the {name} load balancer lacking one of {}",
                        missing.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(", ")
                    )),
                    other => Err(format!("refused with {other}, expected RoutingError::Unsupported")),
                },
            )
            .await?;
        }
        done.pass(Clause::LbPolicyUnsupportedRefused);
        let all_routes: Vec<(ProbeRequest, Group)> = policy::policies(self.groups)
            .into_iter()
            .flat_map(|c| c.routes)
            .collect();
        self.refused(
            Clause::LbPolicyInvalidRefused,
            "a header rule whose name has a space",
            &policy::invalid(g0, g1),
            g1,
            &all_routes,
            |r| match r {
                RoutingError::Invalid { .. } => Ok(()),
                other => Err(format!("refused with {other}, expected RoutingError::Invalid")),
            },
        )
        .await?;
        done.pass(Clause::LbPolicyInvalidRefused);
        must(
            Clause::LbPolicyReplaced,
            &format!("switch_to({g0})"),
            self.lb.switch_to(g0).await,
        )?;

        // Cancelled mid-call: the old policy (all to g0) or the new one,
        // never a mix, then the next call finishes it.
        let target = declared.first().unwrap_or(&plain[0]).clone();
        let old: Vec<Group> = target.routes.iter().map(|_| g0.clone()).collect();
        let new: Vec<Group> = target.routes.iter().map(|(_, g)| g.clone()).collect();
        let c = Clause::LbPolicyCancelSafe;
        for p in &self.suite.cancel_points {
            let call = format!("{} dropped after {p:?}", describe_policy(&target));
            cancel_after(*p, self.lb.apply_policy(&target.policy)).await;
            if self.suite.live_group {
                let got = self.live(c, &call).await?;
                let want = target.live_group();
                if got.as_ref() != Some(g0) && got != want {
                    return Err(ConformanceFailure::new(
                        c,
                        format!(
                            "after {call}, live_group is {}, neither {g0} nor {}",
                            show(&got),
                            show(&want)
                        ),
                    ));
                }
            }
            let seen = self.observed(c, &call, &target.routes).await?;
            if self.suite.probe.is_some() && seen != old && seen != new {
                return Err(ConformanceFailure::new(
                    c,
                    format!(
                        "after {call}, requests went to {}: neither the old policy nor the new one",
                        seen.iter().map(Group::as_str).collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            let next = format!("{} after {call}", describe_policy(&target));
            must(c, &next, self.lb.apply_policy(&target.policy).await)?;
            self.expect_live(c, &next, target.live_group().as_ref()).await?;
            self.expect_routes(c, &next, &target.routes).await?;
            let back = format!("switch_to({g0}) after {next}");
            must(c, &back, self.lb.switch_to(g0).await)?;
            self.expect_live(c, &back, Some(g0)).await?;
        }
        self.record(done, c);
        Ok(())
    }
}
