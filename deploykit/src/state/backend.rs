//! Where the deployment state lives: the [`StateBackend`] trait (lock,
//! journal, live record, control channel) and its local implementation,
//! the files of a [`StateDir`].
//!
//! A deployment needs four things to outlive its process and to be seen by
//! every other command: the lock (one deployment at a time), the journal
//! (what each step did, read by `status`, `--resume` and `rollback`), the
//! blue-green live record, and the control channel (`promote`, `abort`).
//! [`LocalBackend`] keeps them in files on the machine that deploys;
//! `EtcdBackend` (feature `etcd`) keeps them in
//! etcd, where every operator and CI runner sees them.
//!
//! A lock taken through a backend is a [`HeldLock`] with a [`Fence`]: a
//! token that only the current holder's writes carry, and a signal that
//! turns on when the lock is lost. Every write a backend makes on the
//! holder's behalf (journal records, the live record, control
//! acknowledgements) is refused once the fence is lost, so a process that
//! stalled past its lease can write nothing.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use deploykit::state::{LocalBackend, StateBackend, StateDir, StateLock};
//!
//! let base = tempfile::tempdir()?;
//! let backend = LocalBackend::new(StateDir::at(base.path(), "shop")?);
//! let StateLock::Acquired(lock) = backend.try_lock("deploy v2").await? else { panic!() };
//! match backend.try_lock("deploy v3").await? {
//!     StateLock::Held(holder) => assert_eq!(holder.purpose, "deploy v2"),
//!     StateLock::Acquired(_) => unreachable!(),
//! }
//! assert!(lock.fence().lost().is_none());
//! lock.release().await;
//! assert!(backend.holder().await?.is_none());
//! # Ok(())
//! # }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    ControlAck, ControlCommand, DeployLock, Holder, Journal, JournalHeader, JournalOutcome, JournalScan,
    JournalSummary, LockAttempt, StateDir,
};
use crate::bluegreen_state::{FileLiveStore, LiveStore};
use crate::error::{Error, Result};
use crate::event::EventSink;
use crate::promotion::PromotionHandle;

/// The fencing side of a held lock: the token the holder's writes carry,
/// and whether the lock is still held.
///
/// Cheap to clone; every clone sees the loss at once.
#[derive(Debug, Clone)]
pub struct Fence {
    token: i64,
    lost: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl Fence {
    /// A fence for a lock just taken, with fencing token `token`.
    pub(crate) fn new(token: i64) -> Self {
        Self {
            token,
            lost: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }

    /// The fencing token: the etcd lock key's create revision (it grows
    /// with every new holder), 0 for a local lock (the kernel's `flock`
    /// needs none).
    pub fn token(&self) -> i64 {
        self.token
    }

    /// Why the lock was lost, once it was; `None` while it is held.
    pub fn lost(&self) -> Option<String> {
        self.lost.borrow().clone()
    }

    /// Declares the lock lost (the first reason given is kept): every write
    /// through this fence fails from now on.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn declare_lost(&self, why: impl Into<String>) {
        let why = why.into();
        self.lost.send_if_modified(|v| match v {
            None => {
                *v = Some(why);
                true
            }
            Some(_) => false,
        });
    }

    /// Waits until the lock is lost and returns why; pending forever while
    /// it is held (a local lock is never lost).
    ///
    /// Cancel-safe.
    pub async fn wait_lost(&self) -> String {
        let mut rx = self.lost.subscribe();
        let why = rx.wait_for(Option::is_some).await.ok().and_then(|w| w.clone());
        match why {
            Some(why) => why,
            // Unreachable: this fence keeps the sender.
            None => std::future::pending().await,
        }
    }

    /// `Ok` while the lock is held; [`Error::LockLost`] after.
    ///
    /// # Errors
    /// [`Error::LockLost`] with why it was lost.
    pub fn check(&self) -> Result<()> {
        match self.lost() {
            None => Ok(()),
            Some(why) => Err(Error::LockLost(why)),
        }
    }
}

/// Releases a held lock: the backend's half of a [`HeldLock`].
#[async_trait]
pub(crate) trait LockGuard: Send + Sync + std::fmt::Debug {
    /// Releases the lock now (best effort: a lock that cannot be released
    /// expires with its lease, or with the process for a local one).
    async fn release(self: Box<Self>);
}

/// A deployment lock taken through a [`StateBackend`]: held while the value
/// lives; [`release`](Self::release) lets go of it at once.
#[derive(Debug)]
pub struct HeldLock {
    holder: Holder,
    stale: Option<Holder>,
    fence: Fence,
    guard: Box<dyn LockGuard>,
}

impl HeldLock {
    pub(crate) fn new(
        holder: Holder,
        stale: Option<Holder>,
        fence: Fence,
        guard: Box<dyn LockGuard>,
    ) -> Self {
        Self {
            holder,
            stale,
            fence,
            guard,
        }
    }

    /// This process, as recorded for whoever is refused.
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// A holder that died without releasing the lock (a crash, `kill -9`,
    /// a lease that expired): its run was interrupted.
    pub fn stale(&self) -> Option<&Holder> {
        self.stale.as_ref()
    }

    /// The fence every write on this lock's behalf checks.
    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// Releases the lock now.
    ///
    /// Idempotent in effect (the lock is gone after it, whatever happened
    /// before); never fails: a lock that cannot be released expires.
    pub async fn release(self) {
        self.guard.release().await;
    }
}

/// The result of [`StateBackend::try_lock`].
#[derive(Debug)]
pub enum StateLock {
    /// The lock is ours.
    Acquired(HeldLock),
    /// Another process holds it.
    Held(Holder),
}

/// A journal being written through a [`StateBackend`]: an [`EventSink`]
/// whose [`durable`](EventSink::durable) returns once the records are in
/// the backend (on disk, or committed by etcd's quorum).
#[async_trait]
pub trait JournalWriter: EventSink + std::fmt::Debug {
    /// The header written first.
    fn header(&self) -> &JournalHeader;

    /// Where the journal is, for people (a path, or an etcd key).
    fn location(&self) -> String;

    /// Records queued so far (the header counts).
    fn records(&self) -> u64;

    /// Records that could not be written.
    fn write_errors(&self) -> u64;

    /// Waits until every record queued so far is written.
    ///
    /// Idempotent. Cancel-safe: the records stay queued.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::StateStore`] when a write failed (every
    /// later one fails too); [`Error::LockLost`] when the lock was lost.
    async fn sync(&self) -> Result<()>;

    /// Writes the outcome: the run is over.
    ///
    /// Not idempotent (a second call is a second outcome record).
    ///
    /// # Errors
    /// As [`sync`](Self::sync).
    async fn finish(&self, outcome: JournalOutcome) -> Result<()>;

    /// Removes the journal when it holds nothing but its header (the run
    /// was refused before its first step); returns whether it did.
    ///
    /// Idempotent. On failure the journal is still there, and reads as an
    /// interrupted run that never started.
    ///
    /// # Errors
    /// When it cannot be removed.
    async fn discard_unstarted(&self) -> Result<bool>;
}

/// Where an application's deployment state lives: its lock, journals, live
/// record and control channel.
///
/// Reads never need the lock; every write on behalf of a run needs its
/// [`HeldLock`], and is refused once that lock is lost.
#[async_trait]
pub trait StateBackend: Send + Sync + std::fmt::Debug {
    /// Where the state is, for people: a directory, or etcd endpoints and a
    /// prefix. Never credentials.
    fn describe(&self) -> String;

    /// The name deployment markers on instances carry, the same for every
    /// machine sharing this state (see
    /// [`InstanceMarker::for_state`](super::InstanceMarker::for_state)).
    fn identity(&self) -> PathBuf;

    /// Whether nothing was ever recorded (no journal, and for a local state
    /// directory, no directory: commands that would only be refused leave
    /// nothing behind).
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    ///
    /// # Errors
    /// When the state cannot be read.
    async fn is_unused(&self) -> Result<bool>;

    /// Tries to take the deployment lock without waiting; `purpose`
    /// (`deploy v2`) is shown to whoever is refused.
    ///
    /// * Idempotent: no (a second call from the holder is refused).
    /// * Cancel-safe: yes; a lock taken by a cancelled call is released
    ///   when its lease expires (etcd) or at once (local).
    /// * On failure: the lock is not taken.
    ///
    /// # Errors
    /// When the state cannot be reached or written.
    async fn try_lock(&self, purpose: &str) -> Result<StateLock>;

    /// Who holds the lock now, if anyone.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    ///
    /// # Errors
    /// When the state cannot be read.
    async fn holder(&self) -> Result<Option<Holder>>;

    /// Starts a new journal with `header`, numbered after every journal
    /// before it, on behalf of `lock`'s holder; the header is written
    /// before this returns.
    ///
    /// * Idempotent: no (one more journal; a second with the same id is
    ///   refused).
    /// * Cancel-safe: yes; a journal created by a cancelled call holds only
    ///   its header and reads as a run that never started.
    /// * On failure: no journal, or one with only its header.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `deployment`) for a bad or taken id;
    /// [`Error::LockLost`]; the backend's write error.
    async fn create_journal(&self, lock: &HeldLock, header: JournalHeader) -> Result<Arc<dyn JournalWriter>>;

    /// Every readable journal oldest first, and every unreadable one with
    /// why.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    ///
    /// # Errors
    /// When the journals cannot be listed.
    async fn scan_journals(&self) -> Result<JournalScan>;

    /// The newest journal, if any.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    ///
    /// # Errors
    /// When it cannot be read.
    async fn latest(&self) -> Result<Option<JournalSummary>>;

    /// The journal of `deployment` and of every resume and rollback that
    /// acted on it, oldest first.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    ///
    /// # Errors
    /// When a journal cannot be read.
    async fn chain(&self, deployment: &str) -> Result<Vec<JournalSummary>>;

    /// The blue-green live record: writes go through `lock`'s fence; with
    /// `None` the store only reads (a save is refused).
    fn live_store(&self, lock: Option<&HeldLock>) -> Arc<dyn LiveStore>;

    /// Sends `command` to the running deployment `deployment`; returns the
    /// request number to wait for.
    ///
    /// * Idempotent: no (each call is a new request).
    /// * Cancel-safe: yes; a request written by a cancelled call is applied
    ///   or ignored, never twice.
    /// * On failure: nothing was sent.
    ///
    /// # Errors
    /// When the request cannot be written.
    async fn send_control(&self, deployment: &str, command: ControlCommand) -> Result<u64>;

    /// Waits, at most `timeout`, for the acknowledgement of request `seq`.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    async fn wait_ack(&self, seq: u64, timeout: Duration) -> Option<ControlAck>;

    /// Records, through `lock`, a promotion of `stage` for `deployment`,
    /// interrupted while it waited for one: a later `deploy --resume` of it
    /// reads the record ([`recorded_promotion`](Self::recorded_promotion))
    /// and goes on past that wait. A running deployment's watch never
    /// applies it.
    ///
    /// * Idempotent: yes in effect (the record is the last request; a
    ///   second call writes the same approval under a new number).
    /// * Cancel-safe: yes; the record is written whole or not at all.
    /// * On failure: nothing was recorded.
    ///
    /// # Errors
    /// When the record cannot be written (or, in etcd, the lock was lost).
    async fn record_promotion(&self, lock: &HeldLock, deployment: &str, stage: usize) -> Result<u64>;

    /// The stage a promotion recorded for `deployment` while no process ran
    /// it approves, if the last control request is one.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes.
    ///
    /// # Errors
    /// When the control channel cannot be read.
    async fn recorded_promotion(&self, deployment: &str) -> Result<Option<usize>>;

    /// Polls the control channel every `every` and applies each new request
    /// for `deployment` to `handle`, acknowledging it through `lock`'s
    /// fence. Runs until the task is aborted.
    fn watch_control(
        &self,
        lock: &HeldLock,
        deployment: String,
        handle: PromotionHandle,
        every: Duration,
    ) -> tokio::task::JoinHandle<()>;
}

/// The state in files on this machine: a [`StateDir`], behaving exactly as
/// it does on its own (`flock`ed directory, `fsync`ed JSON-lines journals,
/// `live.json`, `control.json`).
#[derive(Debug, Clone)]
pub struct LocalBackend {
    dir: StateDir,
}

impl LocalBackend {
    /// The backend of the state directory `dir`.
    pub fn new(dir: StateDir) -> Self {
        Self { dir }
    }

    /// The state directory.
    pub fn dir(&self) -> &StateDir {
        &self.dir
    }
}

/// A local lock: the kernel's `flock`, never lost while the process lives.
#[derive(Debug)]
struct LocalGuard {
    lock: DeployLock,
}

#[async_trait]
impl LockGuard for LocalGuard {
    async fn release(self: Box<Self>) {
        drop(self.lock);
    }
}

#[async_trait]
impl StateBackend for LocalBackend {
    fn describe(&self) -> String {
        format!("state directory {}", self.dir.root().display())
    }

    fn identity(&self) -> PathBuf {
        std::fs::canonicalize(self.dir.root()).unwrap_or_else(|_| self.dir.root().to_path_buf())
    }

    async fn is_unused(&self) -> Result<bool> {
        Ok(!self.dir.root().exists())
    }

    async fn try_lock(&self, purpose: &str) -> Result<StateLock> {
        Ok(match self.dir.try_lock(purpose)? {
            LockAttempt::Acquired { lock, stale } => {
                let holder = lock.holder().clone();
                StateLock::Acquired(HeldLock::new(
                    holder,
                    stale,
                    Fence::new(0),
                    Box::new(LocalGuard { lock }),
                ))
            }
            LockAttempt::Held(h) => StateLock::Held(h),
        })
    }

    async fn holder(&self) -> Result<Option<Holder>> {
        self.dir.holder()
    }

    async fn create_journal(
        &self,
        _lock: &HeldLock,
        header: JournalHeader,
    ) -> Result<Arc<dyn JournalWriter>> {
        Ok(Arc::new(self.dir.create_journal(header)?))
    }

    async fn scan_journals(&self) -> Result<JournalScan> {
        self.dir.scan_journals()
    }

    async fn latest(&self) -> Result<Option<JournalSummary>> {
        self.dir.latest()
    }

    async fn chain(&self, deployment: &str) -> Result<Vec<JournalSummary>> {
        self.dir.chain(deployment)
    }

    fn live_store(&self, _lock: Option<&HeldLock>) -> Arc<dyn LiveStore> {
        Arc::new(FileLiveStore::new(self.dir.live_record_path()))
    }

    async fn send_control(&self, deployment: &str, command: ControlCommand) -> Result<u64> {
        self.dir.control().send(deployment, command)
    }

    async fn wait_ack(&self, seq: u64, timeout: Duration) -> Option<ControlAck> {
        self.dir.control().wait_ack(seq, timeout).await
    }

    async fn record_promotion(&self, _lock: &HeldLock, deployment: &str, stage: usize) -> Result<u64> {
        self.dir.control().record_promotion(deployment, stage)
    }

    async fn recorded_promotion(&self, deployment: &str) -> Result<Option<usize>> {
        Ok(self.dir.control().recorded_promotion(deployment))
    }

    fn watch_control(
        &self,
        _lock: &HeldLock,
        deployment: String,
        handle: PromotionHandle,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        self.dir.control().watch(deployment, handle, every)
    }
}

#[async_trait]
impl JournalWriter for Journal {
    fn header(&self) -> &JournalHeader {
        Journal::header(self)
    }

    fn location(&self) -> String {
        self.path().display().to_string()
    }

    fn records(&self) -> u64 {
        Journal::records(self)
    }

    fn write_errors(&self) -> u64 {
        Journal::write_errors(self)
    }

    async fn sync(&self) -> Result<()> {
        Journal::sync(self)
    }

    async fn finish(&self, outcome: JournalOutcome) -> Result<()> {
        Journal::finish(self, outcome)
    }

    async fn discard_unstarted(&self) -> Result<bool> {
        Journal::discard_unstarted(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _obj_safe(_: Box<dyn StateBackend>, _: Box<dyn JournalWriter>) {}

    #[tokio::test]
    async fn the_local_backend_is_the_state_directory() {
        let base = tempfile::tempdir().unwrap();
        let backend = LocalBackend::new(StateDir::at(base.path(), "shop").unwrap());
        assert!(backend.is_unused().await.unwrap());
        let StateLock::Acquired(lock) = backend.try_lock("deploy v2").await.unwrap() else {
            panic!("refused")
        };
        assert!(
            !backend.is_unused().await.unwrap(),
            "the lock creates the directory"
        );
        assert_eq!(lock.fence().token(), 0);
        let header = JournalHeader::new(
            "d1",
            "shop",
            super::super::RunKind::Deploy,
            crate::StrategyKind::Rolling,
            crate::ReleaseId::new("v2").unwrap(),
            Default::default(),
        );
        let journal = backend.create_journal(&lock, header).await.unwrap();
        assert!(
            journal.location().ends_with("0000000001-d1.jsonl"),
            "{}",
            journal.location()
        );
        let latest = backend.latest().await.unwrap().unwrap();
        assert_eq!(latest.header.deployment, "d1");
        assert!(!latest.is_finished());
        assert_eq!(
            backend.holder().await.unwrap().unwrap().purpose,
            "deploy v2",
            "the same lock the state directory reports"
        );
        assert!(journal.discard_unstarted().await.unwrap());
        assert!(backend.latest().await.unwrap().is_none());
        lock.release().await;
        assert!(backend.holder().await.unwrap().is_none());
    }
}
