//! A fake [`SmokeTester`]: scripted check and warm-up failures, and
//! refused connections from the instances a [`FakeFleet`] has stopped.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deploykit::{Backend, InstanceId, SmokeCheck, SmokeTester};

use crate::fleet::{FakeFleet, Shared};

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
