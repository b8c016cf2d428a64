//! Fakes for blue-green deployments: a scriptable smoke tester and a
//! scriptable live-state store.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deploykit::bluegreen_state::{LiveRecord, LiveStore};
use deploykit::{Backend, DriverError, Group, InstanceId, SmokeCheck, SmokeTester};

use crate::fleet::{scripted_error, FakeFleet, Fault, Shared};

#[derive(Debug, Default)]
struct SmokeState {
    /// (instance, path) → what comes back instead of the expected answer.
    failures: Vec<(InstanceId, String, String)>,
    /// Every n-th warm-up request (counted over all instances) fails.
    warm_fail_every: Option<u32>,
    latency: Duration,
    checks: Vec<(InstanceId, String)>,
    warm: BTreeMap<InstanceId, u32>,
    warm_calls: u32,
}

/// A [`SmokeTester`] for a [`FakeFleet`]: a check or warm-up request to an
/// instance that is not running fails as a refused connection; otherwise it
/// passes unless scripted to fail. Records every call. Cheap to clone.
///
/// ```
/// # use deploykit_testkit::{FakeFleet, FakeSmokeTester};
/// let fleet = FakeFleet::with_groups(&[("blue", 1), ("green", 1)]);
/// let smoke = FakeSmokeTester::for_fleet(&fleet)
///     .fail_check("i-2", "/api/db/ping", "got status 200 with body \"db down\"")
///     .fail_every_warm_request(10);
/// ```
#[derive(Debug, Clone)]
pub struct FakeSmokeTester {
    fleet: Option<Shared>,
    state: Arc<Mutex<SmokeState>>,
}

impl Default for FakeSmokeTester {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeSmokeTester {
    /// A tester where every check and request passes (it sees no fleet).
    pub fn new() -> Self {
        Self {
            fleet: None,
            state: Arc::default(),
        }
    }

    /// A tester that sees `fleet`: stopped instances refuse connections.
    pub fn for_fleet(fleet: &FakeFleet) -> Self {
        Self {
            fleet: Some(fleet.shared().clone()),
            state: Arc::default(),
        }
    }

    /// The check of `path` on `instance` fails, answering `answer`.
    pub fn fail_check(self, instance: &str, path: &str, answer: &str) -> Self {
        let id = InstanceId::new(instance).expect("valid instance id");
        self.state
            .lock()
            .expect("poisoned")
            .failures
            .push((id, path.into(), answer.into()));
        self
    }

    /// Every `n`-th warm-up request fails.
    pub fn fail_every_warm_request(self, n: u32) -> Self {
        self.state.lock().expect("poisoned").warm_fail_every = Some(n.max(1));
        self
    }

    /// Every call takes `d` of (virtual) time.
    pub fn latency(self, d: Duration) -> Self {
        self.state.lock().expect("poisoned").latency = d;
        self
    }

    /// Every check made so far: (instance, path), in order.
    pub fn checks(&self) -> Vec<(InstanceId, String)> {
        self.state.lock().expect("poisoned").checks.clone()
    }

    /// Warm-up requests received per instance.
    pub fn warm_requests(&self) -> BTreeMap<InstanceId, u32> {
        self.state.lock().expect("poisoned").warm.clone()
    }

    fn refused(&self, b: &Backend) -> Option<String> {
        let shared = self.fleet.as_ref()?;
        let w = shared.lock();
        match w.instances.get(&b.id) {
            Some(s) if s.running => None,
            _ => Some(format!("no answer from http://{}: connection refused", b.address)),
        }
    }
}

#[async_trait]
impl SmokeTester for FakeSmokeTester {
    async fn check(&self, backend: &Backend, check: &SmokeCheck) -> Result<(), String> {
        let latency = self.state.lock().expect("poisoned").latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut s = self.state.lock().expect("poisoned");
        s.checks.push((backend.id.clone(), check.path.clone()));
        if let Some(refused) = self.refused(backend) {
            return Err(refused);
        }
        match s
            .failures
            .iter()
            .find(|(id, path, _)| id == &backend.id && path == &check.path)
        {
            Some((_, _, answer)) => Err(answer.clone()),
            None => Ok(()),
        }
    }

    async fn warm(&self, backend: &Backend, _path: &str) -> Result<(), String> {
        let latency = self.state.lock().expect("poisoned").latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut s = self.state.lock().expect("poisoned");
        s.warm_calls += 1;
        *s.warm.entry(backend.id.clone()).or_insert(0) += 1;
        if let Some(refused) = self.refused(backend) {
            return Err(refused);
        }
        match s.warm_fail_every {
            Some(n) if s.warm_calls.is_multiple_of(n) => Err("status 503".into()),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Default)]
struct StoreState {
    record: Option<LiveRecord>,
    saves: Vec<LiveRecord>,
    save_calls: u32,
    save_faults: Vec<Fault>,
    fail_load: bool,
}

/// An in-memory [`LiveStore`] with scriptable failures. Cheap to clone;
/// clones share the record.
#[derive(Debug, Clone, Default)]
pub struct FakeLiveStore {
    state: Arc<Mutex<StoreState>>,
}

impl FakeLiveStore {
    /// An empty store (nothing recorded).
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that already records `live` as live.
    pub fn recording(live: &str) -> Self {
        let s = Self::new();
        s.state.lock().expect("poisoned").record =
            Some(LiveRecord::live(Group::new(live).expect("valid group")));
        s
    }

    /// A store that records `live` as live and a switch to `to` under way.
    pub fn recording_switch(live: &str, to: &str) -> Self {
        let s = Self::new();
        s.state.lock().expect("poisoned").record = Some(LiveRecord::switching(
            Group::new(live).expect("valid group"),
            Group::new(to).expect("valid group"),
        ));
        s
    }

    /// Saves fail as scripted (`OnCall`, `FromCall`, `Always`, `Transient`
    /// count save calls; release faults never fire).
    pub fn fail_save(self, fault: Fault) -> Self {
        self.state.lock().expect("poisoned").save_faults.push(fault);
        self
    }

    /// Removes every scripted fault (the disk has space again).
    pub fn heal(&self) {
        let mut s = self.state.lock().expect("poisoned");
        s.save_faults.clear();
        s.fail_load = false;
    }

    /// Loads fail (an unreadable record).
    pub fn fail_load(self) -> Self {
        self.state.lock().expect("poisoned").fail_load = true;
        self
    }

    /// The record now.
    pub fn record(&self) -> Option<LiveRecord> {
        self.state.lock().expect("poisoned").record.clone()
    }

    /// The live environment recorded now.
    pub fn live(&self) -> Option<Group> {
        self.record().map(|r| r.live)
    }

    /// Every record saved successfully, in order.
    pub fn saves(&self) -> Vec<LiveRecord> {
        self.state.lock().expect("poisoned").saves.clone()
    }
}

#[async_trait]
impl LiveStore for FakeLiveStore {
    fn describe(&self) -> String {
        "fake live store".into()
    }

    async fn load(&self) -> Result<Option<LiveRecord>, DriverError> {
        let s = self.state.lock().expect("poisoned");
        if s.fail_load {
            return Err(DriverError::new("scripted load fault: the record cannot be read"));
        }
        Ok(s.record.clone())
    }

    async fn save(&self, record: &LiveRecord) -> Result<(), DriverError> {
        let mut s = self.state.lock().expect("poisoned");
        s.save_calls += 1;
        let n = s.save_calls;
        if let Some(transient) = s.save_faults.iter().find_map(|f| f.fires_on_call(n)) {
            let msg = format!("scripted save fault on call {n}: disk full");
            return Err(scripted_error(transient, msg));
        }
        s.record = Some(record.clone());
        s.saves.push(record.clone());
        Ok(())
    }
}
