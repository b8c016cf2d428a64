//! Simulated instances and load balancer whose state is kept in files, so it
//! survives the `deploykit` process: for trying deploykit without servers
//! (`simulated = true`, `load_balancer.kind = "simulated"`) and for the
//! crash-recovery tests, which kill the CLI mid-deployment and check what
//! it left behind.
//!
//! Each instance is `<state>/simulated/<id>.json`
//! (`{"release":"v2","installed":["v1","v2"],"running":true}`); the load
//! balancer is `<state>/simulated/lb.json`
//! (`{"out_of_rotation":["web-2"],"weights":{},"live":"blue"}`). Every change
//! is written atomically (a temporary file renamed over the old one) but not
//! `fsync`ed: the state survives a killed `deploykit` process, which is what
//! trying deploykit and the crash tests need, but not a power cut, which
//! may lose the last changes of a simulated fleet. The journal stays
//! durable as for real instances.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use deploykit::{
    Backend, DriverError, Group, GroupWeight, Health, Instance, LoadBalancer, ReleaseId, SmokeCheck,
    SmokeTester,
};
use serde::{Deserialize, Serialize};

/// What a simulated instance keeps on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SimInstanceState {
    pub(crate) release: Option<ReleaseId>,
    pub(crate) installed: Vec<ReleaseId>,
    pub(crate) running: bool,
}

fn read<T: Default + for<'de> Deserialize<'de>>(path: &Path) -> Result<T, DriverError> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map_err(|e| DriverError::new(format!("{} is corrupt", path.display())).with_source(e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(DriverError::new(format!("cannot read {}", path.display())).with_source(e)),
    }
}

/// Writes `v` to `path`, creating its directory on the first write (so a
/// command that only reads leaves no state behind).
fn write<T: Serialize>(path: &Path, v: &T) -> Result<(), DriverError> {
    let bytes = serde_json::to_vec(v).expect("state serializes");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| DriverError::new(format!("cannot create {}", dir.display())).with_source(e))?;
    }
    deploykit::state::write_atomic_unsynced(path, &bytes)
        .map_err(|e| DriverError::new(format!("cannot write {}", path.display())).with_source(e))
}

/// Runs a read-modify-write of a state file under `lock` on a blocking
/// thread, so that the steps of a batch do not wait for each other's file
/// operations (and their journal records share flushes). The lock is held
/// until the write ends, even if the caller gives up waiting: a dropped
/// call never lets another change interleave.
async fn update_blocking(
    lock: Arc<tokio::sync::Mutex<()>>,
    f: impl FnOnce() -> Result<(), DriverError> + Send + 'static,
) -> Result<(), DriverError> {
    let guard = lock.lock_owned().await;
    tokio::task::spawn_blocking(move || {
        let _guard = guard;
        f()
    })
    .await
    .map_err(|e| DriverError::new("the simulated state update did not finish").with_source(e))?
}

/// The directory of the simulated state.
pub(crate) fn dir(state_root: &Path) -> PathBuf {
    state_root.join("simulated")
}

/// An instance simulated in a file.
#[derive(Debug)]
pub(crate) struct SimInstance {
    backend: Backend,
    path: PathBuf,
    unhealthy: Vec<ReleaseId>,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl SimInstance {
    pub(crate) fn new(
        backend: Backend,
        state_root: &Path,
        unhealthy: Vec<ReleaseId>,
    ) -> std::io::Result<Self> {
        let dir = dir(state_root);
        Ok(Self {
            path: dir.join(format!("{}.json", backend.id)),
            backend,
            unhealthy,
            lock: Arc::default(),
        })
    }

    pub(crate) fn state(&self) -> Result<SimInstanceState, DriverError> {
        read(&self.path)
    }

    async fn update(
        &self,
        f: impl FnOnce(&mut SimInstanceState) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<(), DriverError> {
        let path = self.path.clone();
        update_blocking(self.lock.clone(), move || {
            let mut s: SimInstanceState = read(&path)?;
            f(&mut s)?;
            write(&path, &s)
        })
        .await
    }
}

/// Contracts as the trait's: every method is idempotent and cancel-safe (one
/// atomic file write); a failure leaves the file as it was.
#[async_trait]
impl Instance for SimInstance {
    fn backend(&self) -> &Backend {
        &self.backend
    }
    async fn current_release(&self) -> Result<Option<ReleaseId>, DriverError> {
        Ok(self.state()?.release)
    }
    async fn stop(&self) -> Result<(), DriverError> {
        self.update(|s| {
            s.running = false;
            Ok(())
        })
        .await
    }
    async fn force_stop(&self) -> Result<(), DriverError> {
        self.stop().await
    }
    async fn install(&self, release: &ReleaseId) -> Result<(), DriverError> {
        let release = release.clone();
        self.update(move |s| {
            if !s.installed.contains(&release) {
                s.installed.push(release.clone());
            }
            s.release = Some(release);
            Ok(())
        })
        .await
    }
    async fn restore(&self, release: &ReleaseId) -> Result<(), DriverError> {
        let release = release.clone();
        self.update(move |s| {
            if !s.installed.contains(&release) {
                return Err(DriverError::new(format!(
                    "release {release} was never installed here"
                )));
            }
            s.release = Some(release);
            Ok(())
        })
        .await
    }
    async fn start(&self) -> Result<(), DriverError> {
        self.update(|s| {
            if s.release.is_none() {
                return Err(DriverError::new("no release installed"));
            }
            s.running = true;
            Ok(())
        })
        .await
    }
    async fn health(&self) -> Result<Health, DriverError> {
        let s = self.state()?;
        Ok(match (&s.release, s.running) {
            (_, false) => Health::Unhealthy("not running".into()),
            (Some(r), true) if self.unhealthy.contains(r) => {
                Health::Unhealthy(format!("{r} answers 500 (simulate_unhealthy)"))
            }
            _ => Health::Healthy,
        })
    }
}

/// What the simulated load balancer keeps on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SimLbState {
    pub(crate) out_of_rotation: BTreeSet<String>,
    pub(crate) weights: BTreeMap<String, u8>,
    pub(crate) live: Option<Group>,
}

/// A load balancer simulated in a file.
#[derive(Debug, Clone)]
pub(crate) struct SimLoadBalancer {
    path: PathBuf,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl SimLoadBalancer {
    pub(crate) fn new(state_root: &Path) -> std::io::Result<Self> {
        let dir = dir(state_root);
        Ok(Self {
            path: dir.join("lb.json"),
            lock: Arc::default(),
        })
    }

    pub(crate) fn state(&self) -> Result<SimLbState, DriverError> {
        read(&self.path)
    }

    async fn update(&self, f: impl FnOnce(&mut SimLbState) + Send + 'static) -> Result<(), DriverError> {
        let path = self.path.clone();
        update_blocking(self.lock.clone(), move || {
            let mut s: SimLbState = read(&path)?;
            f(&mut s);
            write(&path, &s)
        })
        .await
    }
}

/// Contracts as the trait's: every method is idempotent and cancel-safe (one
/// atomic file write); a failure leaves the file as it was.
#[async_trait]
impl LoadBalancer for SimLoadBalancer {
    fn name(&self) -> &str {
        "simulated"
    }
    async fn drain(&self, b: &Backend) -> Result<(), DriverError> {
        self.disable(b).await
    }
    async fn active_connections(&self, _: &Backend) -> Result<Option<u64>, DriverError> {
        Ok(Some(0))
    }
    async fn enable(&self, b: &Backend) -> Result<(), DriverError> {
        let id = b.id.to_string();
        self.update(move |s| {
            s.out_of_rotation.remove(&id);
        })
        .await
    }
    async fn disable(&self, b: &Backend) -> Result<(), DriverError> {
        let id = b.id.to_string();
        self.update(move |s| {
            s.out_of_rotation.insert(id);
        })
        .await
    }
    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        // The group with all the traffic is live (none for a split), so
        // `live_group` reads back a split as it reads back a switch.
        let live = match weights
            .iter()
            .filter(|w| w.percent > 0)
            .collect::<Vec<_>>()
            .as_slice()
        {
            [w] if w.percent == 100 => Some(w.group.clone()),
            _ => None,
        };
        let weights: BTreeMap<String, u8> =
            weights.iter().map(|w| (w.group.to_string(), w.percent)).collect();
        self.update(move |s| {
            s.weights = weights;
            s.live = live;
        })
        .await
    }
    async fn switch_to(&self, group: &Group) -> Result<(), DriverError> {
        let group = group.clone();
        self.update(move |s| s.live = Some(group)).await
    }
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        Ok(self.state()?.live)
    }
}

/// Smoke checks and warm-up requests for simulated instances: a simulated
/// instance has no HTTP server, so every check and request passes (an
/// unhealthy simulated release already fails its health probe).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SimSmokeTester;

/// Contracts as the trait's: both methods touch nothing, so they are
/// idempotent and cancel-safe, and never fail.
#[async_trait]
impl SmokeTester for SimSmokeTester {
    async fn check(&self, _: &Backend, _: &SmokeCheck) -> Result<(), String> {
        Ok(())
    }
    async fn warm(&self, _: &Backend, _: &str) -> Result<(), String> {
        Ok(())
    }
}
