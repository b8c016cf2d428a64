//! The [`Instance`] contract.

use std::time::Duration;

use deploykit::{Health, Instance, ReleaseId};

use super::{cancel_after, eventually, must, Clause, Conformance, ConformanceFailure};

/// The instance suite, with what the driver under test keeps. [`Default`]
/// expects a deployment marker that reads back.
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use deploykit::ReleaseId;
/// use deploykit_testkit::{conformance::InstanceSuite, FakeFleet};
///
/// let fleet = FakeFleet::new(1);
/// let releases = [ReleaseId::new("v1")?, ReleaseId::new("v2")?];
/// // The fake keeps no deployment marker.
/// let checked = InstanceSuite::default()
///     .without_markers()
///     .run(&fleet.instance("i-1"), &releases)
///     .await?;
/// assert_eq!(checked.skipped.len(), 1);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct InstanceSuite {
    markers: bool,
    deadline: Duration,
    interval: Duration,
    cancel_points: Vec<Duration>,
}

impl Default for InstanceSuite {
    fn default() -> Self {
        Self {
            markers: true,
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

/// Runs the [`InstanceSuite::default`] suite against `inst` with
/// `releases` (at least two releases the instance can install and run).
///
/// # Errors
/// The first [`ConformanceFailure`] found.
pub async fn instance<I: Instance + ?Sized>(
    inst: &I,
    releases: &[ReleaseId],
) -> Result<Conformance, ConformanceFailure> {
    InstanceSuite::default().run(inst, releases).await
}

impl InstanceSuite {
    /// The instance keeps no deployment marker (the trait's default):
    /// `set_marker` must succeed, and nothing is read back.
    pub fn without_markers(mut self) -> Self {
        self.markers = false;
        self
    }

    /// How long a started instance may take to become healthy, and a
    /// stopped one to stop answering healthy (default 30 s).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// After how long each cancelled call is dropped (default: after one
    /// poll, 1 ms and 10 ms).
    pub fn cancel_points(mut self, points: impl IntoIterator<Item = Duration>) -> Self {
        self.cancel_points = points.into_iter().collect();
        self
    }

    /// Runs the suite against `inst`, which must be able to install and
    /// run each of `releases`. The instance is left stopped, on one of
    /// `releases`, with the marker it had.
    ///
    /// # Errors
    /// The first [`ConformanceFailure`] found.
    ///
    /// # Panics
    /// When `releases` has fewer than two releases.
    pub async fn run<I: Instance + ?Sized>(
        &self,
        inst: &I,
        releases: &[ReleaseId],
    ) -> Result<Conformance, ConformanceFailure> {
        assert!(
            releases.len() >= 2 && releases[0] != releases[1],
            "the instance suite needs two different releases the instance can install and run"
        );
        let (a, b) = (&releases[0], &releases[1]);
        let run = Run { suite: self, inst };
        let mut done = Conformance::default();
        let backend = inst.backend().clone();

        let first = must(
            Clause::InstanceCurrentReleaseReadOnly,
            "current_release",
            inst.current_release().await,
        )?;
        let second = must(
            Clause::InstanceCurrentReleaseReadOnly,
            "a second current_release",
            inst.current_release().await,
        )?;
        if first != second {
            return Err(ConformanceFailure::new(
                Clause::InstanceCurrentReleaseReadOnly,
                format!("two reads in a row gave {} then {}", show(&first), show(&second)),
            ));
        }
        done.pass(Clause::InstanceCurrentReleaseReadOnly);

        run.stop_twice(Clause::InstanceStopIdempotent, "stop").await?;

        run.install(Clause::InstanceInstallReadBack, a).await?;
        run.install(Clause::InstanceInstallReadBack, a).await?;
        done.pass(Clause::InstanceInstallReadBack);

        must(Clause::InstanceStartHealthy, "start", inst.start().await)?;
        run.healthy(Clause::InstanceStartHealthy, "start").await?;
        must(Clause::InstanceStartHealthy, "a second start", inst.start().await)?;
        run.healthy(Clause::InstanceStartHealthy, "a second start")
            .await?;
        done.pass(Clause::InstanceStartHealthy);

        run.stop_twice(Clause::InstanceStopIdempotent, "stop").await?;
        done.pass(Clause::InstanceStopIdempotent);
        match must(
            Clause::InstanceConnectionsAfterStop,
            "active_connections after stop",
            inst.active_connections().await,
        )? {
            Some(0) | None => done.pass(Clause::InstanceConnectionsAfterStop),
            Some(n) => {
                return Err(ConformanceFailure::new(
                    Clause::InstanceConnectionsAfterStop,
                    format!("a stopped instance reports {n} requests in flight"),
                ))
            }
        }

        run.install(Clause::InstanceRestoreReadBack, b).await?;
        run.restore(Clause::InstanceRestoreReadBack, a).await?;
        run.restore(Clause::InstanceRestoreReadBack, a).await?;
        run.restore(Clause::InstanceRestoreReadBack, b).await?;
        done.pass(Clause::InstanceRestoreReadBack);

        let never = ReleaseId::new("conformance-never-installed").expect("a valid release id");
        match inst.restore(&never).await {
            Ok(()) => {
                return Err(ConformanceFailure::new(
                    Clause::InstanceRestoreUnknownFails,
                    format!("restore({never}) succeeded, but it was never installed"),
                ))
            }
            Err(e) if e.is_transient() => {
                return Err(ConformanceFailure::new(
                    Clause::InstanceRestoreUnknownFails,
                    format!("restore({never}) failed as transient (retrying cannot help): {e}"),
                ))
            }
            Err(_) => {
                run.expect_current(Clause::InstanceRestoreUnknownFails, "a refused restore", b)
                    .await?
            }
        }
        done.pass(Clause::InstanceRestoreUnknownFails);

        must(Clause::InstanceForceStopIdempotent, "start", inst.start().await)?;
        run.healthy(Clause::InstanceForceStopIdempotent, "start").await?;
        must(
            Clause::InstanceForceStopIdempotent,
            "force_stop",
            inst.force_stop().await,
        )?;
        must(
            Clause::InstanceForceStopIdempotent,
            "a second force_stop",
            inst.force_stop().await,
        )?;
        run.not_healthy(Clause::InstanceForceStopIdempotent, "force_stop")
            .await?;
        done.pass(Clause::InstanceForceStopIdempotent);

        run.markers(&mut done).await?;

        let mut current = b.clone();
        for p in &self.cancel_points {
            let target = if current == *a { b } else { a };
            let call = format!("install({target}) dropped after {p:?}");
            cancel_after(*p, inst.install(target)).await;
            let got = must(
                Clause::InstanceInstallCancelSafe,
                &format!("current_release after {call}"),
                inst.current_release().await,
            )?;
            if got.as_ref() != Some(&current) && got.as_ref() != Some(target) {
                return Err(ConformanceFailure::new(
                    Clause::InstanceInstallCancelSafe,
                    format!(
                        "after {call}, the current release is {}, neither {current} nor {target}",
                        show(&got)
                    ),
                ));
            }
            run.install(Clause::InstanceInstallCancelSafe, target).await?;
            current = target.clone();
        }
        must(
            Clause::InstanceInstallCancelSafe,
            "start after cancelled installs",
            inst.start().await,
        )?;
        run.healthy(
            Clause::InstanceInstallCancelSafe,
            "start after cancelled installs",
        )
        .await?;
        run.stop_twice(Clause::InstanceInstallCancelSafe, "stop").await?;
        done.pass(Clause::InstanceInstallCancelSafe);

        for p in &self.cancel_points {
            let call = format!("start dropped after {p:?}");
            cancel_after(*p, inst.start()).await;
            must(
                Clause::InstanceStartStopCancelSafe,
                &format!("start after {call}"),
                inst.start().await,
            )?;
            run.healthy(
                Clause::InstanceStartStopCancelSafe,
                &format!("start after {call}"),
            )
            .await?;
            let call = format!("stop dropped after {p:?}");
            cancel_after(*p, inst.stop()).await;
            run.stop_twice(Clause::InstanceStartStopCancelSafe, &format!("stop after {call}"))
                .await?;
        }
        done.pass(Clause::InstanceStartStopCancelSafe);

        if inst.backend() != &backend {
            return Err(ConformanceFailure::new(
                Clause::InstanceBackendStable,
                format!(
                    "backend() was {} at {} and is now {}",
                    backend.id,
                    backend.address,
                    inst.backend().id
                ),
            ));
        }
        done.pass(Clause::InstanceBackendStable);
        Ok(done)
    }
}

fn show(r: &Option<ReleaseId>) -> String {
    r.as_ref().map_or_else(|| "none".to_owned(), |r| r.to_string())
}

struct Run<'a, I: ?Sized> {
    suite: &'a InstanceSuite,
    inst: &'a I,
}

impl<I: Instance + ?Sized> Run<'_, I> {
    async fn expect_current(
        &self,
        clause: Clause,
        after: &str,
        want: &ReleaseId,
    ) -> Result<(), ConformanceFailure> {
        let got = must(
            clause,
            &format!("current_release after {after}"),
            self.inst.current_release().await,
        )?;
        if got.as_ref() != Some(want) {
            return Err(ConformanceFailure::new(
                clause,
                format!(
                    "after {after}, the current release is {}, expected {want}",
                    show(&got)
                ),
            ));
        }
        Ok(())
    }

    async fn install(&self, clause: Clause, r: &ReleaseId) -> Result<(), ConformanceFailure> {
        let call = format!("install({r})");
        must(clause, &call, self.inst.install(r).await)?;
        self.expect_current(clause, &call, r).await
    }

    async fn restore(&self, clause: Clause, r: &ReleaseId) -> Result<(), ConformanceFailure> {
        let call = format!("restore({r})");
        must(clause, &call, self.inst.restore(r).await)?;
        self.expect_current(clause, &call, r).await
    }

    async fn stop_twice(&self, clause: Clause, call: &str) -> Result<(), ConformanceFailure> {
        must(clause, call, self.inst.stop().await)?;
        must(clause, &format!("a second {call}"), self.inst.stop().await)?;
        self.not_healthy(clause, call).await
    }

    async fn healthy(&self, clause: Clause, after: &str) -> Result<(), ConformanceFailure> {
        let inst = self.inst;
        eventually(self.suite.deadline, self.suite.interval, || async move {
            match inst.health().await {
                Ok(Health::Healthy) => Ok(()),
                Ok(Health::Unhealthy(why)) => Err(format!("unhealthy: {why}")),
                Err(e) => Err(format!("the probe failed: {e}")),
            }
        })
        .await
        .map_err(|last| {
            ConformanceFailure::new(
                clause,
                format!(
                    "not healthy within {:?} after {after}; last probe: {last}",
                    self.suite.deadline
                ),
            )
        })
    }

    async fn not_healthy(&self, clause: Clause, after: &str) -> Result<(), ConformanceFailure> {
        let inst = self.inst;
        eventually(self.suite.deadline, self.suite.interval, || async move {
            match inst.health().await {
                Ok(Health::Healthy) => Err(()),
                Ok(Health::Unhealthy(_)) | Err(_) => Ok(()),
            }
        })
        .await
        .map_err(|()| {
            ConformanceFailure::new(
                clause,
                format!("still answers healthy {:?} after {after}", self.suite.deadline),
            )
        })
    }

    async fn markers(&self, done: &mut Conformance) -> Result<(), ConformanceFailure> {
        let c = Clause::InstanceMarkerReadBack;
        let inst = self.inst;
        let before = must(c, "marker", inst.marker().await)?;
        if !self.suite.markers {
            must(c, "set_marker", inst.set_marker(before.as_deref()).await)?;
            done.skip(c, "the instance keeps no deployment marker");
            return Ok(());
        }
        let text = "deploykit-conformance";
        for (call, set) in [
            ("set_marker", Some(text)),
            ("a second set_marker", Some(text)),
            ("set_marker(None)", None),
            ("a second set_marker(None)", None),
        ] {
            must(c, call, inst.set_marker(set).await)?;
            let got = must(c, &format!("marker after {call}"), inst.marker().await)?;
            if got.as_deref() != set {
                return Err(ConformanceFailure::new(
                    c,
                    format!(
                        "after {call}, marker reads {}, expected {}",
                        got.as_deref().unwrap_or("none"),
                        set.unwrap_or("none")
                    ),
                ));
            }
        }
        must(
            c,
            "set_marker back to the marker found",
            inst.set_marker(before.as_deref()).await,
        )?;
        done.pass(c);
        Ok(())
    }
}
