//! # deploykit
//!
//! Move a new release onto a fleet of instances without dropping a request —
//! rolling, blue-green, canary, or recreate — and roll back by itself when
//! the new release is unhealthy.
//!
//! ## The one idea: strategies compile to plans, one executor runs them
//!
//! A [`Strategy`] looks at the fleet and returns a [`Plan`]: a plain value
//! listing [`Stage`]s (run in order), each holding [`Unit`]s (run
//! concurrently), each a sequence of [`Step`]s (drain, stop, install, start,
//! await-healthy, enable, pause, …). Because a plan is data you can print it
//! before anything runs (a dry run), compare it in tests, and reason about
//! it. One [`Executor`] runs any plan against four small traits:
//!
//! * [`Instance`] — one machine or process that runs a release;
//! * [`LoadBalancer`] — what routes traffic to instances;
//! * [`MetricsSource`] — error rate and latency per group, for canaries;
//! * [`Strategy`] — what turns a fleet into a plan.
//!
//! The executor applies timeouts and retries once, emits a typed [`Event`]
//! stream, restores a failed instance to its previous release, aborts when
//! the failure budget is spent, rolls back every instance already moved, and
//! honours a [`CancellationToken`](tokio_util::sync::CancellationToken) by
//! rolling back. The outcome is a [`Report`] that says exactly which
//! instance runs what.
//!
//! Every wait goes through `tokio::time`, so tests run hours of deployment in
//! virtual time with `#[tokio::test(start_paused = true)]`.
//!
//! ## Example
//!
//! A rolling deployment, two instances at a time, on the in-memory fleet of
//! `deploykit-testkit`:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use deploykit::{CountOrPercent, Executor, ReleaseId, Rolling, RunOptions};
//! use deploykit_testkit::FakeFleet;
//!
//! let fleet = FakeFleet::new(6); // i-1 … i-6 on release v1, behind a fake LB
//! let executor = Executor::builder()
//!     .instances(fleet.instances())
//!     .load_balancer(Arc::new(fleet.load_balancer()))
//!     .build()?;
//! let rolling = Rolling { batch_size: CountOrPercent::Count(2), ..Rolling::default() };
//!
//! // Dry run: the plan is a value.
//! let plan = deploykit::Strategy::plan(&rolling, &executor.snapshot().await?, &ReleaseId::new("v2")?)?;
//! assert_eq!(plan.stages.len(), 5); // 3 batches, 2 stabilisation pauses
//!
//! let report = executor.run(&plan, RunOptions::default()).await?;
//! assert!(report.is_success());
//! assert!(fleet.releases().values().all(|r| r.as_str() == "v2"));
//! # Ok(())
//! # }
//! ```
//!
//! ## Durable state: lock, journal, history
//!
//! [`state::StateDir`] keeps what must survive the process that deploys: a
//! lock so two deployments of one application never run at once (the holder
//! is named to whoever is refused), a journal — an [`EventSink`] that
//! writes every event as a JSON line and `fsync`s it before the step goes
//! on, after a header with the plan and each instance's previous release —
//! and the history derived from the journals. After a crash the journal
//! says which instances were left part-way and what each ran before, which
//! is what resuming and rolling back need; the `deploykit` CLI is built on
//! it. The same lock, journal, live record and control channel sit behind
//! one trait, [`state::StateBackend`]: the state directory
//! ([`state::LocalBackend`]), or etcd (`EtcdBackend`, feature `etcd`), shared
//! by every machine that deploys, with a leased lock and writes fenced by its
//! token (docs/state.md).
//!
//! ## Recovery
//!
//! [`recovery`] turns those journals back into plans: [`recovery::resume`]
//! finishes an interrupted deployment (instances left part-way are redone
//! from the start), [`recovery::rollback`] returns every instance to the
//! release it ran before. Both read the journals and a fleet snapshot and
//! return a [`Plan`] for the executor; plans, events and journals name
//! strategies and steps as [`StrategyKind`] and [`StepKind`].
//!
//! ## Guarantees
//!
//! * Bad input ([`Error::InvalidInput`]) is reported before anything is
//!   touched, naming the field and the fix.
//! * Names that reach a command line or a config file are validated types
//!   ([`InstanceId`], [`ReleaseId`], [`Group`], [`Address`]).
//! * A deployment that aborts leaves every instance on its previous release;
//!   one that finishes within its failure budget is reported as
//!   [`OutcomeKind::Degraded`], never as a plain success.
//!
//! ## Multi-region
//!
//! [`regions`] deploys several fleets in ordered waves: a
//! [`regions::RegionsPlan`] (waves → regions → each region's own plan) is a
//! value like a [`Plan`]; [`regions::run`] walks it at most `max_parallel`
//! regions at a time, soaks each wave, and on a failure returns what
//! [`regions::OnFailure`] says, judging every region only from the report
//! of the run it started (`docs/regions.md`).
//!
//! ## Routing beyond weights
//!
//! [`routing::TrafficPolicy`] is one routing vocabulary: ordered header,
//! cookie and query rules, a default split (optionally sticky per user) and
//! mirroring to a shadow group. [`LoadBalancer::apply_policy`] applies one;
//! [`LoadBalancer::capabilities`] says what a driver can compile, and a
//! policy beyond it is refused before anything is touched
//! (`docs/routing.md`).
//!
//! Four strategies are built on policies, each canary-shaped: [`Ramped`]
//! (the share rises along a linear or exponential curve), [`Shadow`]
//! (mirrored copies only, judged by the shadow's own metrics),
//! [`DarkLaunch`] (reachable only through rules until promoted) and
//! [`Experiment`] (an A/B test decided by conversions with the always-valid
//! test of [`experiment`]). [`Plan::check_routing`] refuses a plan whose
//! policies the load balancer cannot apply, and the executor runs it before
//! anything is touched.
//!
//! ## Feature flags
//!
//! [`flags`] manages feature flags in flagd's flag-definition format (so
//! every OpenFeature SDK reads the same file): parse with every problem at
//! its JSON path, evaluate (JSONLogic with flagd's `fractional`, `sem_ver`,
//! `starts_with`, `ends_with`), change through [`flags::FlagStore`]
//! (validated, atomic, journaled), and roll a variant out stage by stage
//! under the canary analysis with [`flags::FlagRollout`], which switches
//! the flag to its safe variant on a breach.
//!
//! ## Real instances
//!
//! [`instance`] holds the [`Instance`] drivers that touch machines:
//! [`instance::LocalInstance`] (processes on this machine) and
//! `instance::SshInstance` (feature `ssh`, one libssh2 session per host,
//! host keys checked against known_hosts), both with a Capistrano-style
//! release layout (`releases/<id>`, an atomically swapped `current`,
//! `shared/`), process or systemd control, and HTTP health probes.
//! `docs/hosts.md` tells how to point them at real hosts safely.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

/// The README's Rust examples run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;

pub mod analysis;
pub mod bluegreen_state;
pub mod chaos;
mod duration_ms;
pub mod duration_text;
mod error;
mod event;
mod executor;
pub mod experiment;
pub mod flags;
#[doc(hidden)]
pub mod fuzzing;
mod gate;
pub mod instance;
pub mod integration;
pub mod judge;
mod kinds;
pub mod lb;
pub mod metrics;
pub mod monitoring;
pub mod names;
mod plan;
mod promotion;
pub mod recovery;
pub mod regions;
mod report;
pub mod routing;
mod secret_url;
pub mod smoke;
pub mod state;
pub mod stats;
pub mod strategy;
mod traits;
mod wait;

pub use error::{DriverError, Error, PreflightFailure, Result};
pub use event::{Event, EventKind, EventLog, EventSink, Fanout, StepResult};
pub use executor::{run_id, Executor, ExecutorBuilder, Preflight, Retry, RunOptions, Timeouts};
pub use kinds::{StepKind, StrategyKind};
pub use lb::NoLoadBalancer;
pub use names::{Address, Group, InstanceId, ReleaseId};
pub use plan::{
    compensation_steps, idle_steps, retirement_steps, AbortFailure, AbortStep, AbortWhen, ExperimentArm,
    FailurePolicy, FleetSnapshot, HealthCheck, InstanceProgress, InstanceSnapshot, InstanceUndo, Plan,
    Projection, RampDown, RampDownStep, Stage, Step, Unit,
};
pub use promotion::{PromotionHandle, PromotionState};
pub use report::{check_subject, InstanceReport, InstanceStatus, OutcomeKind, Report, StageCheck};
pub use secret_url::SecretUrl;
#[cfg(feature = "http")]
pub use smoke::HttpSmokeTester;
pub use smoke::{SmokeCheck, SmokeTester};
pub use strategy::{parse_duration, BlueGreen, BlueGreenReport, CountOrPercent, KeepOld, Recreate, Rolling};
pub use strategy::{Canary, DarkLaunch, Experiment, Promotion, RampCurve, Ramped, Shadow, ShadowThen};
pub use traits::{
    Backend, GroupWeight, Health, Instance, LoadBalancer, Metric, MetricsSource, Observation, Strategy,
};
