//! Simulated instances and load balancer whose state is kept in files, so it
//! survives the `deploykit` process: for trying deploykit without servers
//! (`simulated = true`, `load_balancer.kind = "simulated"`) and for the
//! crash-recovery tests, which kill the CLI mid-deployment and check what
//! it left behind.
//!
//! The instances' state is one append-only log per fleet,
//! `<state>/simulated/instances.log` (see [`crate::sim_log`]: a line per
//! change, appended without `fsync`). The load balancer is
//! `<state>/simulated/lb.json`
//! (`{"out_of_rotation":["web-2"],"weights":{},"live":"blue"}`), replaced
//! atomically (a temporary file renamed over the old one) without `fsync`.
//! Either way the state survives a killed `deploykit` process, which is
//! what trying deploykit and the crash tests need, but not a power cut,
//! which may lose the last changes of a simulated fleet. The journal stays
//! durable as for real instances.
//!
//! The load balancer's changes are written together ([`FileQueue`], group
//! commit as the journal's): a call queues its change and waits; one writer
//! applies every change queued meanwhile, in order, replaces the file once,
//! and then answers all the calls together. The 100 drains of a batch thus
//! finish together and their journal records share a flush, where calls
//! answered one at a time would each need a flush of their own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use deploykit::{
    Backend, DriverError, Group, GroupWeight, Health, Instance, LoadBalancer, ReleaseId, SmokeCheck,
    SmokeTester,
};
use serde::{Deserialize, Serialize};

use crate::sim_log::FleetLog;

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

/// A change to one state file's content; an `Err` refuses the change (the
/// file keeps what the changes before it made).
type Change<S> = Box<dyn FnOnce(&mut S) -> Result<(), DriverError> + Send>;

/// A queued change and where to answer its call.
struct Pending<S> {
    path: PathBuf,
    change: Change<S>,
    answer: tokio::sync::oneshot::Sender<Result<(), DriverError>>,
}

/// What a failed read or write of a file was, copied into the answer of
/// every change that file carried.
#[derive(Debug, Clone)]
struct FileFailure {
    message: String,
    cause: Option<String>,
}

impl FileFailure {
    fn of(e: &DriverError) -> Self {
        Self {
            message: e.to_string(),
            cause: std::error::Error::source(e).map(ToString::to_string),
        }
    }

    fn error(&self) -> DriverError {
        let e = DriverError::new(self.message.clone());
        match &self.cause {
            Some(c) => e.with_source(std::io::Error::other(c.clone())),
            None => e,
        }
    }
}

/// The changes waiting for the writer, and whether it runs.
struct QueueState<S> {
    pending: Vec<Pending<S>>,
    writing: bool,
    /// Changes ever queued, so that a test can wait until all its calls have.
    #[cfg(test)]
    queued: usize,
    /// Rounds of the writer, so that a test can count them.
    #[cfg(test)]
    rounds: usize,
}

/// Group commit for state files of type `S` (see the module doc): cheap
/// to clone, every clone shares the queue and the writer.
pub(crate) struct FileQueue<S> {
    shared: Arc<QueueShared<S>>,
}

impl<S> Clone for FileQueue<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<S> std::fmt::Debug for FileQueue<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileQueue").finish_non_exhaustive()
    }
}

struct QueueShared<S> {
    state: std::sync::Mutex<QueueState<S>>,
    /// Files replaced so far (counted before the calls are answered).
    writes: std::sync::atomic::AtomicUsize,
    /// Held by a test to keep the writer waiting before it writes.
    #[cfg(test)]
    gate: tokio::sync::Mutex<()>,
}

impl<S> Default for FileQueue<S> {
    fn default() -> Self {
        Self {
            shared: Arc::new(QueueShared {
                state: std::sync::Mutex::new(QueueState {
                    pending: Vec::new(),
                    writing: false,
                    #[cfg(test)]
                    queued: 0,
                    #[cfg(test)]
                    rounds: 0,
                }),
                writes: std::sync::atomic::AtomicUsize::new(0),
                #[cfg(test)]
                gate: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

impl<S> QueueShared<S> {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState<S>> {
        // The queue is consistent between statements, so a panic elsewhere
        // while it was held does not make it unusable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<S> FileQueue<S>
where
    S: Clone + Default + Serialize + for<'de> Deserialize<'de> + Send + 'static,
{
    /// Queues `change` to the file `path` and returns once a write that
    /// includes it has replaced the file (or the change refused itself).
    /// A failed read or write leaves the file as it was and fails every
    /// change it carried; a later write does not carry them. A call dropped
    /// while waiting may still have its change written.
    async fn update(
        &self,
        path: &Path,
        change: impl FnOnce(&mut S) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<(), DriverError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let start_writer = {
            let mut q = self.shared.lock();
            q.pending.push(Pending {
                path: path.to_path_buf(),
                change: Box::new(change),
                answer,
            });
            #[cfg(test)]
            {
                q.queued += 1;
            }
            !std::mem::replace(&mut q.writing, true)
        };
        if start_writer {
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || write_pending(&shared));
        }
        answered.await.unwrap_or_else(|_| {
            Err(DriverError::new(format!(
                "the simulated state {} was not written: its writer stopped",
                path.display()
            )))
        })
    }
}

/// The writer: takes every queued change, writes each file once, answers,
/// and goes on until nothing is queued.
fn write_pending<S>(shared: &QueueShared<S>)
where
    S: Clone + Default + Serialize + for<'de> Deserialize<'de> + Send + 'static,
{
    // A panic while writing would leave `writing` set and every later call
    // waiting: the queued calls are answered (their senders dropped) instead.
    struct OnPanic<'a, S>(&'a QueueShared<S>);
    impl<S> Drop for OnPanic<'_, S> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut q = self.0.lock();
                q.pending.clear();
                q.writing = false;
            }
        }
    }
    let _on_panic = OnPanic(shared);
    loop {
        #[cfg(test)]
        let _gate = shared.gate.blocking_lock();
        let round = {
            let mut q = shared.lock();
            if q.pending.is_empty() {
                q.writing = false;
                return;
            }
            #[cfg(test)]
            {
                q.rounds += 1;
            }
            std::mem::take(&mut q.pending)
        };
        // The changes of each file, in the order they were queued.
        let mut files: Vec<(PathBuf, Vec<Pending<S>>)> = Vec::new();
        let mut index = std::collections::HashMap::new();
        for p in round {
            let at = *index.entry(p.path.clone()).or_insert_with(|| {
                files.push((p.path.clone(), Vec::new()));
                files.len() - 1
            });
            files[at].1.push(p);
        }
        // The answers go out together once the round is written, so that
        // the calls of a batch go on together (and their journal records
        // share a flush) rather than in the order their files were written.
        let answers: Vec<Answer> = files
            .into_iter()
            .flat_map(|(path, changes)| write_file(shared, &path, changes))
            .collect();
        for (answer, result) in answers {
            // A call that gave up waiting has dropped its receiver.
            let _ = answer.send(result);
        }
    }
}

/// A call to answer, and its answer.
type Answer = (
    tokio::sync::oneshot::Sender<Result<(), DriverError>>,
    Result<(), DriverError>,
);

/// Reads `path`, applies `changes` in order and replaces the file once;
/// returns the answer of every change.
fn write_file<S>(shared: &QueueShared<S>, path: &Path, changes: Vec<Pending<S>>) -> Vec<Answer>
where
    S: Clone + Default + Serialize + for<'de> Deserialize<'de>,
{
    // Read again for every round, so that a change made to the file by
    // anything else meanwhile is kept.
    let mut state: S = match read(path) {
        Ok(s) => s,
        Err(e) => {
            let failure = FileFailure::of(&e);
            return changes
                .into_iter()
                .map(|p| (p.answer, Err(failure.error())))
                .collect();
        }
    };
    let mut answers = Vec::with_capacity(changes.len());
    let mut accepted = Vec::with_capacity(changes.len());
    for p in changes {
        let before = state.clone();
        match (p.change)(&mut state) {
            Ok(()) => accepted.push(p.answer),
            Err(e) => {
                state = before;
                answers.push((p.answer, Err(e)));
            }
        }
    }
    if accepted.is_empty() {
        return answers;
    }
    let result = write(path, &state).map_err(|e| FileFailure::of(&e));
    if result.is_ok() {
        shared.writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    answers.extend(
        accepted
            .into_iter()
            .map(|a| (a, result.clone().map_err(|f| f.error()))),
    );
    answers
}

/// The directory of the simulated state.
pub(crate) fn dir(state_root: &Path) -> PathBuf {
    state_root.join("simulated")
}

/// Whether the simulated load balancer has state on disk (a run or a setup
/// wrote it); without it every instance is in rotation.
pub(crate) fn lb_state_exists(state_root: &Path) -> bool {
    dir(state_root).join("lb.json").exists()
}

/// An instance simulated in its fleet's state log.
#[derive(Debug)]
pub(crate) struct SimInstance {
    backend: Backend,
    unhealthy: Vec<ReleaseId>,
    log: FleetLog,
}

impl SimInstance {
    /// An instance whose state is kept in `log`, which the instances of
    /// one fleet share so that a batch's changes are written together.
    pub(crate) fn new(backend: Backend, unhealthy: Vec<ReleaseId>, log: FleetLog) -> Self {
        Self {
            backend,
            unhealthy,
            log,
        }
    }

    pub(crate) fn state(&self) -> Result<SimInstanceState, DriverError> {
        self.log.state(self.backend.id.as_str())
    }

    async fn update(
        &self,
        f: impl FnOnce(&mut SimInstanceState) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<(), DriverError> {
        self.log.update(self.backend.id.as_str(), f).await
    }
}

/// Contracts as the trait's: every method is idempotent and cancel-safe (its
/// change lands in one line of the log, appended in one write with the
/// changes queued with it); a failure leaves the state as it was.
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
    /// A simulated process can be killed (it stops); it cannot be paused.
    async fn signal(&self, signal: deploykit::chaos::ProcessSignal) -> Result<(), DriverError> {
        match signal {
            deploykit::chaos::ProcessSignal::Kill => self.stop().await,
            other => Err(DriverError::new(format!(
                "{} is simulated: it cannot be sent {other}; only kill is simulated",
                self.backend.id
            ))),
        }
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
    /// Instances whose traffic goes through a fault proxy for now, and the
    /// proxy's address.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) via: BTreeMap<String, String>,
}

/// A load balancer simulated in a file.
#[derive(Debug, Clone)]
pub(crate) struct SimLoadBalancer {
    path: PathBuf,
    writes: FileQueue<SimLbState>,
}

impl SimLoadBalancer {
    pub(crate) fn new(state_root: &Path) -> std::io::Result<Self> {
        let dir = dir(state_root);
        Ok(Self {
            path: dir.join("lb.json"),
            writes: FileQueue::default(),
        })
    }

    pub(crate) fn state(&self) -> Result<SimLbState, DriverError> {
        read(&self.path)
    }

    async fn update(&self, f: impl FnOnce(&mut SimLbState) + Send + 'static) -> Result<(), DriverError> {
        self.writes
            .update(&self.path, move |s| {
                f(s);
                Ok(())
            })
            .await
    }
}

/// Contracts as the trait's: every method is idempotent and cancel-safe (its
/// change lands in one atomic file write, shared with the changes queued
/// with it); a failure leaves the file as it was.
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
    async fn reroute(&self, b: &Backend, via: Option<&deploykit::Address>) -> Result<(), DriverError> {
        let id = b.id.to_string();
        let via = via.map(ToString::to_string);
        self.update(move |s| {
            match via {
                Some(a) => s.via.insert(id, a),
                None => s.via.remove(&id),
            };
        })
        .await
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

#[cfg(test)]
mod tests {
    use super::*;
    use deploykit::{Address, InstanceId};

    fn backend(i: usize) -> Backend {
        Backend {
            id: InstanceId::new(format!("web-{i}")).expect("valid id"),
            address: Address::parse(&format!("10.0.{}.{}:8080", i / 250, i % 250 + 1))
                .expect("valid address"),
            group: Group::new("stable").expect("valid group"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_to_one_file_keep_their_order_within_a_round() {
        let root = tempfile::tempdir().expect("temp dir");
        let lb = SimLoadBalancer::new(root.path()).expect("lb");
        let b = backend(7);
        let gate = lb.writes.shared.gate.lock().await;
        let (l1, l2, b1, b2) = (lb.clone(), lb.clone(), b.clone(), b.clone());
        let first = tokio::spawn(async move { l1.disable(&b1).await });
        while lb.writes.shared.lock().queued < 1 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let second = tokio::spawn(async move { l2.enable(&b2).await });
        while lb.writes.shared.lock().queued < 2 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(gate);
        first.await.expect("joined").expect("disable");
        second.await.expect("joined").expect("enable");
        // Disabled then enabled: in rotation, whether they shared a write or not.
        assert!(lb.state().expect("state").out_of_rotation.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_read_fails_every_change_to_that_file_and_leaves_it() {
        let root = tempfile::tempdir().expect("temp dir");
        let lb = SimLoadBalancer::new(root.path()).expect("lb");
        let path = dir(root.path()).join("lb.json");
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(&path, b"not json").expect("corrupt file");
        let gate = lb.writes.shared.gate.lock().await;
        let calls: Vec<_> = (0..10)
            .map(|i| {
                let lb = lb.clone();
                tokio::spawn(async move { lb.drain(&backend(i)).await })
            })
            .collect();
        while lb.writes.shared.lock().queued < 10 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        drop(gate);
        for c in calls {
            let e = c
                .await
                .expect("joined")
                .expect_err("a change over a corrupt file");
            assert!(e.to_string().contains("is corrupt"), "{e}");
        }
        assert_eq!(std::fs::read(&path).expect("read"), b"not json");
        assert_eq!(
            lb.writes.shared.writes.load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }
}
