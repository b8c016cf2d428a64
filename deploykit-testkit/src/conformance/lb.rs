//! The [`LoadBalancer`] contract.

use std::time::Duration;

use deploykit::{
    Address, Backend, DriverError, Group, GroupWeight, InstanceId, LoadBalancer, PreflightFailure,
};

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
