//! The fake fleet, its instances and its load balancer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use deploykit::chaos::ProcessSignal;
use deploykit::routing::{Capabilities, TrafficPolicy};
use deploykit::{
    Address, Backend, DriverError, Group, GroupWeight, Health, Instance, InstanceId, LoadBalancer, ReleaseId,
};
use tokio::time::Instant;

/// An operation of the fakes that faults and latency can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// [`Instance::stop`] (graceful).
    Stop,
    /// [`Instance::force_stop`].
    ForceStop,
    /// [`Instance::install`].
    Install,
    /// [`Instance::restore`].
    Restore,
    /// [`Instance::start`].
    Start,
    /// [`Instance::health`].
    Health,
    /// [`LoadBalancer::drain`] of this instance.
    Drain,
    /// [`LoadBalancer::enable`] of this instance.
    Enable,
    /// [`LoadBalancer::disable`] of this instance.
    Disable,
}

/// When a scripted fault fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// On every call.
    Always,
    /// On the k-th call only (1-based).
    OnCall(u32),
    /// On the k-th call and every later one (1-based).
    FromCall(u32),
    /// On the first n calls, as a *transient* error (the executor retries).
    Transient(u32),
    /// Whenever the instance's current release is not the one it started
    /// with: "the new release is bad here". Restoring the old release heals
    /// it.
    NewRelease,
    /// Whenever the instance's current release is this one.
    OnRelease(ReleaseId),
}

impl Fault {
    /// Whether the fault fires on the `n`-th call (1-based) of an operation
    /// whose instance runs `release` and started on `initial`: `None` when it
    /// does not, `Some(transient)` when it does.
    pub(crate) fn fires(
        &self,
        n: u32,
        release: Option<&ReleaseId>,
        initial: Option<&ReleaseId>,
    ) -> Option<bool> {
        match self {
            Fault::Always => Some(false),
            Fault::OnCall(k) => (n == *k).then_some(false),
            Fault::FromCall(k) => (n >= *k).then_some(false),
            Fault::Transient(k) => (n <= *k).then_some(true),
            Fault::NewRelease => (release != initial).then_some(false),
            Fault::OnRelease(r) => (release == Some(r)).then_some(false),
        }
    }

    /// [`fires`](Self::fires) for operations that concern no release (a
    /// switch, a record): release faults never fire there.
    pub(crate) fn fires_on_call(&self, n: u32) -> Option<bool> {
        match self {
            Fault::NewRelease | Fault::OnRelease(_) => None,
            other => other.fires(n, None, None),
        }
    }
}

/// A scripted driver error, transient or permanent.
pub(crate) fn scripted_error(transient: bool, msg: String) -> DriverError {
    if transient {
        DriverError::transient(msg)
    } else {
        DriverError::new(msg)
    }
}

/// The drain timeout the checker assumes unless told otherwise: the
/// executor's default.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// One operation a fake performed, for tests that check order and
/// concurrency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpRecord {
    /// When (since the fleet was created, on the `tokio` clock).
    pub at: Duration,
    /// The instance.
    pub instance: InstanceId,
    /// The operation.
    pub op: Op,
    /// Whether it succeeded (for health: whether it answered healthy).
    pub ok: bool,
}

/// A change of the fake load balancer's routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutingChange {
    /// The backend stopped receiving new requests.
    Drained(InstanceId),
    /// The backend was taken out at once.
    Disabled(InstanceId),
    /// The backend was put back.
    Enabled(InstanceId),
    /// Traffic split between groups (percent).
    Weights(BTreeMap<Group, u8>),
    /// The backend's traffic sent to another address (a chaos drill's
    /// fault proxy), or back to its own with `None`.
    Rerouted {
        /// The backend.
        instance: InstanceId,
        /// Where its traffic goes now; `None`: its own address.
        via: Option<deploykit::Address>,
    },
    /// A routing policy applied through
    /// [`LoadBalancer::apply_policy`] (one that is more than weights or a
    /// switch; those are recorded as [`Weights`](Self::Weights)).
    Policy(TrafficPolicy),
}

/// One entry of the routing history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingEntry {
    /// When (since the fleet was created).
    pub at: Duration,
    /// What changed.
    pub change: RoutingChange,
}

#[derive(Debug)]
pub(crate) struct InstanceState {
    pub(crate) backend: Backend,
    /// The release it had when the fleet was built: what `NewRelease`
    /// faults compare with.
    pub(crate) initial: Option<ReleaseId>,
    /// The release the checker expects a rollback to return to: `initial`
    /// until [`FakeFleet::baseline`] moves it.
    pub(crate) baseline: Option<ReleaseId>,
    /// The *installed* current release (the `current` symlink): what
    /// [`Instance::current_release`] answers and [`Instance::start`] runs.
    pub(crate) release: Option<ReleaseId>,
    /// The release the running process serves, `None` when stopped; it
    /// changes only on start and stop, so an engine that installs without
    /// restarting leaves the old release serving.
    pub(crate) serving: Option<ReleaseId>,
    pub(crate) installed: BTreeSet<ReleaseId>,
    pub(crate) running: bool,
    /// Frozen by a `SIGSTOP`: running, but answering nothing.
    pub(crate) paused: bool,
    /// Passed a health probe since it last started.
    pub(crate) ready: bool,
    pub(crate) enabled: bool,
    pub(crate) initially_enabled: bool,
    pub(crate) draining: bool,
    pub(crate) calls: HashMap<Op, u32>,
    pub(crate) faults: Vec<(Op, Fault)>,
    /// Open connections and how long they last after a drain.
    pub(crate) connections: u64,
    pub(crate) drain_takes: Duration,
    pub(crate) drained_at: Option<Instant>,
}

#[derive(Debug)]
pub(crate) struct World {
    pub(crate) epoch: Instant,
    pub(crate) order: Vec<InstanceId>,
    pub(crate) instances: BTreeMap<InstanceId, InstanceState>,
    /// `None`: every group receives traffic.
    pub(crate) weights: Option<BTreeMap<Group, u8>>,
    /// Groups the live policy's rules or mirror send requests to, whatever
    /// their share.
    pub(crate) reached: BTreeSet<Group>,
    /// What [`LoadBalancer::capabilities`] declares.
    pub(crate) capabilities: Capabilities,
    pub(crate) latency: HashMap<Op, Duration>,
    pub(crate) ops: Vec<OpRecord>,
    pub(crate) routing: Vec<RoutingEntry>,
    /// Live violations of "the LB routes only to running, healthy
    /// instances".
    pub(crate) routing_violations: Vec<String>,
    /// Live violations of "an instance is stopped only once its drain is
    /// confirmed (no connection left) or the drain timeout passed".
    pub(crate) drain_violations: Vec<String>,
    /// How long a deployment may wait for a drain before it stops the
    /// instance with connections still open.
    pub(crate) drain_timeout: Duration,
    pub(crate) record_ops: bool,
    /// Scripted faults of [`LoadBalancer::switch_to`], counted over all
    /// switches.
    pub(crate) switch_faults: Vec<Fault>,
    pub(crate) switch_calls: u32,
    /// Scripted faults of [`LoadBalancer::set_weights`], counted over all
    /// calls.
    pub(crate) weight_faults: Vec<Fault>,
    pub(crate) weight_calls: u32,
    /// Scripted faults of [`LoadBalancer::preflight`].
    pub(crate) preflight_faults: Vec<Fault>,
    pub(crate) preflight_calls: u32,
    /// What a scripted preflight fault says it found.
    pub(crate) preflight_kind: Option<deploykit::PreflightFailure>,
}

impl World {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The group's share, or 100 when a rule or the mirror of the live
    /// policy sends requests to it (then it receives traffic at 0 %).
    pub(crate) fn group_weight(&self, g: &Group) -> u8 {
        if self.reached.contains(g) {
            return 100;
        }
        match &self.weights {
            None => 100,
            Some(w) => w.get(g).copied().unwrap_or(0),
        }
    }

    pub(crate) fn in_rotation(&self, s: &InstanceState) -> bool {
        s.enabled && !s.draining && self.group_weight(&s.backend.group) > 0
    }

    /// Checks the one instance `id` after a change: in rotation implies
    /// running and healthy.
    fn check_routing(&mut self, id: &InstanceId, what: &str) {
        let s = &self.instances[id];
        if self.in_rotation(s) && !(s.running && s.ready) {
            let why = if s.running { "not healthy" } else { "stopped" };
            let msg = format!(
                "at {:?}: {id} is in rotation but {why} (after {what})",
                self.epoch.elapsed()
            );
            self.routing_violations.push(msg);
        }
    }

    /// Checks the one instance `id` before it stops: connections still open
    /// are allowed only once the drain timeout has passed since its drain
    /// (or when it was disabled, which cuts them on purpose).
    fn check_drained(&mut self, id: &InstanceId, what: &str) {
        let s = &self.instances[id];
        if !s.running {
            return;
        }
        let open = open_connections(s);
        if open == 0 {
            return;
        }
        // A disable cuts connections on purpose (recreate, quarantine), and
        // an instance whose group gets no traffic was never asked to drain.
        let cut = !s.enabled;
        if cut || self.group_weight(&s.backend.group) == 0 && !s.draining {
            return;
        }
        let why = match s.drained_at {
            None => "it was never drained".to_string(),
            Some(t) if t.elapsed() < self.drain_timeout => format!(
                "its drain started {:?} before, less than the drain timeout of {:?}",
                t.elapsed(),
                self.drain_timeout
            ),
            Some(_) => return,
        };
        let msg = format!(
            "at {:?}: {id} was stopped ({what}) with {open} connection(s) open: {why}",
            self.epoch.elapsed()
        );
        self.drain_violations.push(msg);
    }

    fn record(&mut self, id: &InstanceId, op: Op, ok: bool) {
        if self.record_ops {
            let at = self.now();
            self.ops.push(OpRecord {
                at,
                instance: id.clone(),
                op,
                ok,
            });
        }
    }

    /// Counts the call and says whether a fault fires, and whether it is
    /// transient.
    fn fault(&mut self, id: &InstanceId, op: Op) -> Option<bool> {
        let s = self.instances.get_mut(id).expect("fake instance exists");
        let n = {
            let c = s.calls.entry(op).or_insert(0);
            *c += 1;
            *c
        };
        for (fop, fault) in &s.faults {
            if *fop != op {
                continue;
            }
            // A health probe asks the running process; every other call
            // concerns the installed release.
            let release = if op == Op::Health {
                s.serving.as_ref()
            } else {
                s.release.as_ref()
            };
            let fires = fault.fires(n, release, s.initial.as_ref());
            if fires.is_some() {
                return fires;
            }
        }
        None
    }
}

/// The shared world of a fake fleet. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Shared(pub(crate) Arc<Mutex<World>>);

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, World> {
        self.0.lock().expect("fake world poisoned")
    }

    async fn latency(&self, op: Op) {
        let d = self.lock().latency.get(&op).copied();
        if let Some(d) = d {
            tokio::time::sleep(d).await;
        }
    }
}

fn scripted(op: Op, id: &InstanceId, transient: bool) -> DriverError {
    scripted_error(transient, format!("scripted {op:?} fault on {id}"))
}

/// A fleet of fake instances behind a fake load balancer.
///
/// Built fluently, then handed to an executor with
/// [`instances`](Self::instances) and
/// [`load_balancer`](Self::load_balancer). Cheap to clone; every clone sees
/// the same world.
///
/// Instances are named `i-1` … `i-n`, listen on `127.0.0.1:20001` … (never
/// contacted), belong to the group `default`, and run release `v1`.
#[derive(Debug, Clone)]
pub struct FakeFleet {
    shared: Shared,
}

impl FakeFleet {
    /// `n` running, healthy instances on release `v1`, all in rotation.
    pub fn new(n: usize) -> Self {
        let groups = [(Group::default_group(), n)];
        Self::with_groups(&groups)
    }

    /// Instances in several groups (for canary tracks or blue-green
    /// environments): e.g. `[("blue", 3), ("green", 3)]`. Ids continue
    /// across groups (`i-1` … `i-6`).
    pub fn with_groups<G: AsRef<str>>(groups: &[(G, usize)]) -> Self {
        let mut instances = BTreeMap::new();
        let mut order = Vec::new();
        let v1 = ReleaseId::new("v1").expect("valid");
        let mut k = 0usize;
        for (g, n) in groups {
            let group = Group::new(g.as_ref()).expect("fake group names are valid");
            for _ in 0..*n {
                k += 1;
                let id = InstanceId::new(format!("i-{k}")).expect("valid");
                let port = 20000 + (k % 40000);
                let address = Address::parse(&format!("127.0.0.1:{port}")).expect("valid");
                order.push(id.clone());
                instances.insert(
                    id.clone(),
                    InstanceState {
                        backend: Backend {
                            id,
                            address,
                            group: group.clone(),
                        },
                        initial: Some(v1.clone()),
                        baseline: Some(v1.clone()),
                        release: Some(v1.clone()),
                        serving: Some(v1.clone()),
                        installed: [v1.clone()].into(),
                        running: true,
                        paused: false,
                        ready: true,
                        enabled: true,
                        initially_enabled: true,
                        draining: false,
                        calls: HashMap::new(),
                        faults: Vec::new(),
                        connections: 0,
                        drain_takes: Duration::ZERO,
                        drained_at: None,
                    },
                );
            }
        }
        Self {
            shared: Shared(Arc::new(Mutex::new(World {
                epoch: Instant::now(),
                order,
                instances,
                weights: None,
                reached: BTreeSet::new(),
                capabilities: Capabilities::weights_and_switch(),
                latency: HashMap::new(),
                ops: Vec::new(),
                routing: Vec::new(),
                routing_violations: Vec::new(),
                drain_violations: Vec::new(),
                drain_timeout: DEFAULT_DRAIN_TIMEOUT,
                record_ops: true,
                switch_faults: Vec::new(),
                switch_calls: 0,
                weight_faults: Vec::new(),
                weight_calls: 0,
                preflight_faults: Vec::new(),
                preflight_calls: 0,
                preflight_kind: None,
            }))),
        }
    }

    fn edit(self, id: &str, f: impl FnOnce(&mut InstanceState)) -> Self {
        {
            let mut w = self.shared.lock();
            let id = InstanceId::new(id).expect("valid instance id");
            let s = w
                .instances
                .get_mut(&id)
                .unwrap_or_else(|| panic!("FakeFleet has no instance {id}"));
            f(s);
        }
        self
    }

    /// Scripts `fault` on `op` for instance `id`. Faults are checked in the
    /// order added; the first that fires wins.
    pub fn fault(self, id: &str, op: Op, fault: Fault) -> Self {
        self.edit(id, |s| s.faults.push((op, fault)))
    }

    /// The new release never gets healthy on `id` (its old release stays
    /// healthy, so restoring works).
    pub fn fail_health(self, id: &str) -> Self {
        self.fault(id, Op::Health, Fault::NewRelease)
    }

    /// Starting `id` on the new release fails.
    pub fn fail_start(self, id: &str) -> Self {
        self.fault(id, Op::Start, Fault::NewRelease)
    }

    /// Installing on `id` always fails.
    pub fn fail_install(self, id: &str) -> Self {
        self.fault(id, Op::Install, Fault::Always)
    }

    /// The graceful stop of `id` always fails (the executor must force-stop).
    pub fn fail_stop(self, id: &str) -> Self {
        self.fault(id, Op::Stop, Fault::Always)
    }

    /// Draining `id` always fails.
    pub fn fail_drain(self, id: &str) -> Self {
        self.fault(id, Op::Drain, Fault::Always)
    }

    /// Enabling `id` always fails.
    pub fn fail_enable(self, id: &str) -> Self {
        self.fault(id, Op::Enable, Fault::Always)
    }

    /// Every call of `op` (on any instance) takes `latency` of (virtual)
    /// time.
    pub fn latency(self, op: Op, latency: Duration) -> Self {
        self.shared.lock().latency.insert(op, latency);
        self
    }

    /// `id` holds `n` open connections that close `drain_takes` after it is
    /// drained.
    pub fn connections(self, id: &str, n: u64, drain_takes: Duration) -> Self {
        self.edit(id, |s| {
            s.connections = n;
            s.drain_takes = drain_takes;
        })
    }

    /// `id` starts with no release, stopped and out of rotation (a fresh
    /// machine).
    pub fn fresh(self, id: &str) -> Self {
        self.edit(id, |s| {
            s.initial = None;
            s.baseline = None;
            s.release = None;
            s.serving = None;
            s.installed.clear();
            s.running = false;
            s.ready = false;
            s.enabled = false;
            s.initially_enabled = false;
        })
    }

    /// `id` starts on `release` instead of `v1`.
    pub fn on_release(self, id: &str, release: &str) -> Self {
        let r = ReleaseId::new(release).expect("valid release id");
        self.edit(id, |s| {
            s.initial = Some(r.clone());
            s.baseline = Some(r.clone());
            s.release = Some(r.clone());
            s.serving = s.running.then(|| r.clone());
            s.installed.insert(r);
        })
    }

    /// All traffic goes to `group` from the start (blue-green: the live
    /// environment), as if [`LoadBalancer::switch_to`] had been called
    /// before the test.
    pub fn live(self, group: &str) -> Self {
        let g = Group::new(group).expect("valid group");
        self.shared.lock().weights = Some([(g, 100)].into());
        self
    }

    /// [`LoadBalancer::switch_to`] fails as scripted: `OnCall(k)` /
    /// `FromCall(k)` count switches (1-based), `Transient(n)` fails the
    /// first n as transient, `Always` every one; release faults never fire.
    /// A failed switch changes nothing.
    pub fn fail_switch(self, fault: Fault) -> Self {
        self.shared.lock().switch_faults.push(fault);
        self
    }

    /// [`LoadBalancer::set_weights`] fails as scripted (counted over all
    /// weight changes, 1-based, as for [`fail_switch`](Self::fail_switch)).
    /// A failed change changes nothing.
    pub fn fail_weights(self, fault: Fault) -> Self {
        self.shared.lock().weight_faults.push(fault);
        self
    }

    /// The fake load balancer declares `caps` and applies any policy they
    /// cover through [`LoadBalancer::apply_policy`], recording it as
    /// [`RoutingChange::Policy`]; by default it declares weights and switch
    /// only, as a driver without per-request routing.
    pub fn routing_capabilities(self, caps: Capabilities) -> Self {
        self.shared.lock().capabilities = caps;
        self
    }

    /// [`LoadBalancer::preflight`] fails as scripted (counted over all
    /// preflight checks, 1-based, as for [`fail_switch`](Self::fail_switch)),
    /// as a load balancer that cannot be driven would: the executor must
    /// then refuse before touching anything.
    pub fn fail_preflight(self, fault: Fault) -> Self {
        self.shared.lock().preflight_faults.push(fault);
        self
    }

    /// A scripted preflight fault ([`fail_preflight`](Self::fail_preflight))
    /// says it found `kind`, as a driver that can tell would.
    pub fn preflight_failure_kind(self, kind: deploykit::PreflightFailure) -> Self {
        self.shared.lock().preflight_kind = Some(kind);
        self
    }

    /// How many times [`LoadBalancer::preflight`] was called so far.
    pub fn preflight_calls(&self) -> u32 {
        self.shared.lock().preflight_calls
    }

    /// The group receiving all traffic now, if exactly one does.
    pub fn live_group(&self) -> Option<Group> {
        let w = self.shared.lock();
        w.weights.as_ref().and_then(|m| {
            let live: Vec<_> = m.iter().filter(|(_, p)| **p > 0).collect();
            match live.as_slice() {
                [(g, 100)] => Some((*g).clone()),
                _ => None,
            }
        })
    }

    /// The drain timeout of the deployments run on this fleet (default 30 s,
    /// the executor's): stopping an instance with connections still open
    /// sooner than this after its drain is a violation of
    /// [`check`](Self::check).
    pub fn drain_timeout(self, timeout: Duration) -> Self {
        self.shared.lock().drain_timeout = timeout;
        self
    }

    /// Takes each instance's current release as the one a rollback must
    /// return to, for a test that runs several deployments on one fleet
    /// (by default: the release it was built with).
    pub fn baseline(&self) {
        let mut w = self.shared.lock();
        for s in w.instances.values_mut() {
            s.baseline = s.release.clone();
        }
    }

    /// Stops recording [`ops`](Self::ops) (large benchmarks).
    pub fn without_op_log(self) -> Self {
        self.shared.lock().record_ops = false;
        self
    }

    /// The instances, as trait objects for the executor, in fleet order.
    pub fn instances(&self) -> Vec<Arc<dyn Instance>> {
        let w = self.shared.lock();
        w.order
            .iter()
            .map(|id| {
                Arc::new(FakeInstance {
                    shared: self.shared.clone(),
                    backend: w.instances[id].backend.clone(),
                }) as Arc<dyn Instance>
            })
            .collect()
    }

    /// One instance.
    ///
    /// # Panics
    /// When there is no instance `id`.
    pub fn instance(&self, id: &str) -> FakeInstance {
        let w = self.shared.lock();
        let id = InstanceId::new(id).expect("valid instance id");
        FakeInstance {
            shared: self.shared.clone(),
            backend: w.instances[&id].backend.clone(),
        }
    }

    /// The load balancer in front of the fleet.
    pub fn load_balancer(&self) -> FakeLoadBalancer {
        FakeLoadBalancer {
            shared: self.shared.clone(),
        }
    }

    /// Every instance's installed current release (instances with none are
    /// left out).
    pub fn releases(&self) -> BTreeMap<InstanceId, ReleaseId> {
        self.shared
            .lock()
            .instances
            .iter()
            .filter_map(|(id, s)| s.release.clone().map(|r| (id.clone(), r)))
            .collect()
    }

    /// One instance's installed current release (what it runs once
    /// restarted); see [`serving_release`](Self::serving_release).
    pub fn release_of(&self, id: &str) -> Option<ReleaseId> {
        let id = InstanceId::new(id).ok()?;
        self.shared.lock().instances.get(&id)?.release.clone()
    }

    /// The release `id`'s running process serves (`None` when stopped). It
    /// differs from [`release_of`](Self::release_of) when a release was
    /// installed but the instance not restarted.
    pub fn serving_release(&self, id: &str) -> Option<ReleaseId> {
        let id = InstanceId::new(id).ok()?;
        self.shared.lock().instances.get(&id)?.serving.clone()
    }

    /// Whether `id` is running.
    pub fn is_running(&self, id: &str) -> bool {
        let id = InstanceId::new(id).expect("valid");
        self.shared.lock().instances[&id].running
    }

    /// Whether `id`'s process is frozen by a `SIGSTOP`
    /// ([`Instance::signal`]).
    pub fn is_paused(&self, id: &str) -> bool {
        let id = InstanceId::new(id).expect("valid");
        self.shared.lock().instances[&id].paused
    }

    /// Whether the load balancer sends new requests to `id` now.
    pub fn in_rotation(&self, id: &str) -> bool {
        let id = InstanceId::new(id).expect("valid");
        let w = self.shared.lock();
        w.in_rotation(&w.instances[&id])
    }

    /// How often `op` was called on `id`.
    pub fn calls(&self, id: &str, op: Op) -> u32 {
        let id = InstanceId::new(id).expect("valid");
        self.shared.lock().instances[&id]
            .calls
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    /// Every operation performed so far, in order.
    pub fn ops(&self) -> Vec<OpRecord> {
        self.shared.lock().ops.clone()
    }

    /// Every time the load balancer routed to an instance that was stopped
    /// or not yet healthy, so far (empty when routing was always safe).
    pub fn routing_violations(&self) -> Vec<String> {
        self.shared.lock().routing_violations.clone()
    }

    /// Every time an instance was stopped with connections still open before
    /// its drain was confirmed or timed out, so far.
    pub fn drain_violations(&self) -> Vec<String> {
        self.shared.lock().drain_violations.clone()
    }

    /// The load balancer's routing changes so far, in order.
    pub fn routing_history(&self) -> Vec<RoutingEntry> {
        self.shared.lock().routing.clone()
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }
}

/// One fake instance. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FakeInstance {
    shared: Shared,
    backend: Backend,
}

impl FakeInstance {
    fn id(&self) -> &InstanceId {
        &self.backend.id
    }

    /// Runs an instance operation: latency, fault check, effect, record.
    async fn op<T>(
        &self,
        op: Op,
        effect: impl FnOnce(&mut World, &InstanceId) -> Result<T, DriverError>,
    ) -> Result<T, DriverError> {
        self.shared.latency(op).await;
        let mut w = self.shared.lock();
        let id = self.id();
        if let Some(transient) = w.fault(id, op) {
            w.record(id, op, false);
            return Err(scripted(op, id, transient));
        }
        let r = effect(&mut w, id);
        w.record(id, op, r.is_ok());
        r
    }
}

#[async_trait]
impl Instance for FakeInstance {
    fn backend(&self) -> &Backend {
        &self.backend
    }

    async fn current_release(&self) -> Result<Option<ReleaseId>, DriverError> {
        Ok(self.shared.lock().instances[self.id()].release.clone())
    }

    async fn stop(&self) -> Result<(), DriverError> {
        self.op(Op::Stop, |w, id| {
            w.check_drained(id, "stop");
            let s = w.instances.get_mut(id).expect("exists");
            s.running = false;
            s.paused = false;
            s.ready = false;
            s.serving = None;
            w.check_routing(id, "stop");
            Ok(())
        })
        .await
    }

    async fn force_stop(&self) -> Result<(), DriverError> {
        self.op(Op::ForceStop, |w, id| {
            w.check_drained(id, "force_stop");
            let s = w.instances.get_mut(id).expect("exists");
            s.running = false;
            s.paused = false;
            s.ready = false;
            s.serving = None;
            w.check_routing(id, "force_stop");
            Ok(())
        })
        .await
    }

    async fn install(&self, release: &ReleaseId) -> Result<(), DriverError> {
        self.op(Op::Install, |w, id| {
            let s = w.instances.get_mut(id).expect("exists");
            s.installed.insert(release.clone());
            s.release = Some(release.clone());
            Ok(())
        })
        .await
    }

    async fn restore(&self, release: &ReleaseId) -> Result<(), DriverError> {
        self.op(Op::Restore, |w, id| {
            let s = w.instances.get_mut(id).expect("exists");
            if !s.installed.contains(release) {
                return Err(DriverError::new(format!(
                    "cannot restore {release} on {id}: it was never installed there"
                )));
            }
            s.release = Some(release.clone());
            Ok(())
        })
        .await
    }

    async fn start(&self) -> Result<(), DriverError> {
        self.op(Op::Start, |w, id| {
            let s = w.instances.get_mut(id).expect("exists");
            if s.release.is_none() {
                return Err(DriverError::new(format!("{id} has no release to start")));
            }
            if !s.running {
                s.running = true;
                s.ready = false;
                s.serving = s.release.clone();
            }
            Ok(())
        })
        .await
    }

    async fn health(&self) -> Result<Health, DriverError> {
        self.shared.latency(Op::Health).await;
        let mut w = self.shared.lock();
        let id = self.id().clone();
        let fault = w.fault(&id, Op::Health);
        let s = w.instances.get_mut(&id).expect("exists");
        let health = if !s.running {
            Health::Unhealthy("not running".into())
        } else if s.paused {
            s.ready = false;
            Health::Unhealthy("no answer: the process is stopped (SIGSTOP)".into())
        } else if fault.is_some() {
            s.ready = false;
            Health::Unhealthy("scripted health fault: 503".into())
        } else {
            s.ready = true;
            Health::Healthy
        };
        let ok = health.is_healthy();
        w.record(&id, Op::Health, ok);
        // A running instance that answers unhealthy went bad on its own (a
        // scripted fault, SIGSTOP): like a kill, that is the world's doing,
        // not a routing decision; the instance stays unready, so any routing
        // change that keeps sending it traffic is flagged. A stopped one in
        // rotation is the engine's doing.
        if !ok && !w.instances[&id].running {
            w.check_routing(&id, "failed health probe");
        }
        Ok(health)
    }

    async fn active_connections(&self) -> Result<Option<u64>, DriverError> {
        let w = self.shared.lock();
        Ok(Some(open_connections(&w.instances[self.id()])))
    }

    /// A chaos fault: KILL stops the process where it stands (no drain, no
    /// routing check: the crash is the point), STOP freezes it (health
    /// probes fail) until CONT.
    async fn signal(&self, signal: ProcessSignal) -> Result<(), DriverError> {
        let mut w = self.shared.lock();
        let id = self.id().clone();
        let s = w.instances.get_mut(&id).expect("exists");
        match signal {
            ProcessSignal::Kill => {
                s.running = false;
                s.paused = false;
                s.ready = false;
                s.serving = None;
            }
            ProcessSignal::Stop if !s.running => {
                return Err(DriverError::new(format!(
                    "sending SIGSTOP to {id}: the process is not running"
                )));
            }
            ProcessSignal::Stop => {
                s.paused = true;
                s.ready = false;
            }
            ProcessSignal::Cont => s.paused = false,
        }
        Ok(())
    }
}

fn open_connections(s: &InstanceState) -> u64 {
    match s.drained_at {
        Some(t) if t.elapsed() >= s.drain_takes => 0,
        Some(_) => s.connections,
        None if s.enabled => s.connections,
        None => 0,
    }
}

/// The fake load balancer in front of a [`FakeFleet`]. Records its routing
/// history. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FakeLoadBalancer {
    shared: Shared,
}

impl FakeLoadBalancer {
    async fn change(
        &self,
        op: Op,
        backend: &Backend,
        effect: impl FnOnce(&mut InstanceState),
        change: RoutingChange,
    ) -> Result<(), DriverError> {
        self.shared.latency(op).await;
        let mut w = self.shared.lock();
        let id = &backend.id;
        if !w.instances.contains_key(id) {
            return Err(DriverError::new(format!("unknown backend {id}")));
        }
        if let Some(transient) = w.fault(id, op) {
            w.record(id, op, false);
            return Err(scripted(op, id, transient));
        }
        effect(w.instances.get_mut(id).expect("exists"));
        let at = w.now();
        w.routing.push(RoutingEntry { at, change });
        w.record(id, op, true);
        w.check_routing(id, &format!("{op:?}"));
        Ok(())
    }

    /// The current split, if one was set (`None`: all groups receive
    /// traffic).
    pub fn weights(&self) -> Option<BTreeMap<Group, u8>> {
        self.shared.lock().weights.clone()
    }

    /// The routing policies applied so far (through
    /// [`LoadBalancer::apply_policy`], beyond weights and switches), oldest
    /// first.
    pub fn policies(&self) -> Vec<TrafficPolicy> {
        self.shared
            .lock()
            .routing
            .iter()
            .filter_map(|e| match &e.change {
                RoutingChange::Policy(p) => Some(p.clone()),
                _ => None,
            })
            .collect()
    }

    /// Counts a traffic change against the scripted weight faults.
    fn weight_fault(&self) -> Result<(), DriverError> {
        let mut w = self.shared.lock();
        w.weight_calls += 1;
        let n = w.weight_calls;
        match w.weight_faults.iter().find_map(|f| f.fires_on_call(n)) {
            Some(transient) => Err(scripted_error(
                transient,
                format!("scripted weights fault on change {n}"),
            )),
            None => Ok(()),
        }
    }

    fn set(&self, weights: BTreeMap<Group, u8>) {
        let mut w = self.shared.lock();
        w.reached.clear();
        w.weights = Some(weights.clone());
        let at = w.now();
        w.routing.push(RoutingEntry {
            at,
            change: RoutingChange::Weights(weights),
        });
        let ids: Vec<_> = w.order.clone();
        for id in ids {
            w.check_routing(&id, "weights");
        }
    }
}

#[async_trait]
impl LoadBalancer for FakeLoadBalancer {
    fn name(&self) -> &str {
        "fake"
    }

    async fn drain(&self, backend: &Backend) -> Result<(), DriverError> {
        self.change(
            Op::Drain,
            backend,
            |s| {
                if !s.draining {
                    s.draining = true;
                    s.drained_at = Some(Instant::now());
                }
            },
            RoutingChange::Drained(backend.id.clone()),
        )
        .await
    }

    async fn active_connections(&self, backend: &Backend) -> Result<Option<u64>, DriverError> {
        let w = self.shared.lock();
        let s = w
            .instances
            .get(&backend.id)
            .ok_or_else(|| DriverError::new(format!("unknown backend {}", backend.id)))?;
        Ok(Some(open_connections(s)))
    }

    async fn enable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.change(
            Op::Enable,
            backend,
            |s| {
                s.enabled = true;
                s.draining = false;
                s.drained_at = None;
            },
            RoutingChange::Enabled(backend.id.clone()),
        )
        .await
    }

    async fn disable(&self, backend: &Backend) -> Result<(), DriverError> {
        self.change(
            Op::Disable,
            backend,
            |s| {
                s.enabled = false;
                if s.drained_at.is_none() {
                    s.drained_at = Some(Instant::now());
                }
            },
            RoutingChange::Disabled(backend.id.clone()),
        )
        .await
    }

    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        let sum: u32 = weights.iter().map(|w| u32::from(w.percent)).sum();
        if sum != 100 {
            return Err(DriverError::new(format!("weights sum to {sum}, not 100")));
        }
        self.weight_fault()?;
        self.set(weights.iter().map(|w| (w.group.clone(), w.percent)).collect());
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.lock().capabilities.clone()
    }

    /// Weights and switches as [`set_weights`](Self::set_weights) and
    /// [`switch_to`](Self::switch_to) (the default's mapping); any other
    /// policy the declared capabilities cover is recorded as
    /// [`RoutingChange::Policy`] and counted as a weight change (so
    /// [`FakeFleet::fail_weights`] fails it too).
    async fn apply_policy(&self, policy: &TrafficPolicy) -> Result<(), DriverError> {
        self.capabilities().check(self.name(), policy)?;
        if let Some(g) = policy.as_switch() {
            return self.switch_to(g).await;
        }
        if let Some(weights) = policy.as_weights() {
            return self.set_weights(weights).await;
        }
        let known: BTreeMap<Group, ()> = {
            let w = self.shared.lock();
            w.instances
                .values()
                .map(|s| (s.backend.group.clone(), ()))
                .collect()
        };
        deploykit::routing::check_groups(self.name(), policy, &known)?;
        self.weight_fault()?;
        let mut w = self.shared.lock();
        w.weights = Some(policy.shares());
        w.reached = policy
            .rules
            .iter()
            .map(|r| r.group.clone())
            .chain(policy.mirror.iter().map(|m| m.to.clone()))
            .collect();
        let at = w.now();
        w.routing.push(RoutingEntry {
            at,
            change: RoutingChange::Policy(policy.clone()),
        });
        let ids: Vec<_> = w.order.clone();
        for id in ids {
            w.check_routing(&id, "policy");
        }
        Ok(())
    }

    async fn switch_to(&self, group: &Group) -> Result<(), DriverError> {
        {
            let mut w = self.shared.lock();
            w.switch_calls += 1;
            let n = w.switch_calls;
            if let Some(transient) = w.switch_faults.iter().find_map(|f| f.fires_on_call(n)) {
                let msg = format!("scripted switch fault on switch {n} (to {group})");
                return Err(scripted_error(transient, msg));
            }
        }
        self.set([(group.clone(), 100)].into());
        Ok(())
    }

    async fn preflight(&self) -> Result<(), DriverError> {
        let mut w = self.shared.lock();
        w.preflight_calls += 1;
        let n = w.preflight_calls;
        match w.preflight_faults.iter().find_map(|f| f.fires_on_call(n)) {
            Some(transient) => {
                let e = scripted_error(transient, format!("scripted preflight fault on check {n}"));
                Err(match w.preflight_kind {
                    Some(kind) => e.with_preflight_failure(kind),
                    None => e,
                })
            }
            None => Ok(()),
        }
    }

    /// Recorded in the routing history; refused for an unknown backend.
    async fn reroute(&self, backend: &Backend, via: Option<&deploykit::Address>) -> Result<(), DriverError> {
        let mut w = self.shared.lock();
        if !w.instances.contains_key(&backend.id) {
            return Err(DriverError::new(format!("unknown backend {}", backend.id)));
        }
        let at = w.now();
        w.routing.push(RoutingEntry {
            at,
            change: RoutingChange::Rerouted {
                instance: backend.id.clone(),
                via: via.cloned(),
            },
        });
        Ok(())
    }

    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        let w = self.shared.lock();
        Ok(w.weights.as_ref().and_then(|m| {
            let live: Vec<_> = m.iter().filter(|(_, p)| **p > 0).collect();
            match live.as_slice() {
                [(g, 100)] => Some((*g).clone()),
                _ => None,
            }
        }))
    }
}
