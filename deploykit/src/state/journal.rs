//! The deployment journal: JSON lines, each on disk before the step it records acts.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::lock::Holder;
use crate::error::{Error, Result};
use crate::event::{Event, EventKind, EventSink, StepResult};
use crate::kinds::{StepKind, StrategyKind};
use crate::names::{InstanceId, ReleaseId};
use crate::plan::Plan;
use crate::report::OutcomeKind;

/// What a journalled run was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// A deployment of a release.
    Deploy,
    /// The continuation of an interrupted deployment.
    Resume,
    /// A rollback to the releases recorded before a deployment.
    Rollback,
}

/// The first record of a journal: what the run is about to do, and what
/// every instance ran before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHeader {
    /// Format version (1).
    pub version: u32,
    /// The run's id (also the journal's file name).
    pub deployment: String,
    /// The application.
    pub app: String,
    /// Deploy, resume or rollback.
    pub kind: RunKind,
    /// The strategy (`rolling`, `blue-green`, …; `rollback` for rollbacks).
    pub strategy: StrategyKind,
    /// The release the run moves the fleet to.
    pub release: ReleaseId,
    /// Each instance's release before the run: what a rollback returns it to.
    pub previous: BTreeMap<InstanceId, Option<ReleaseId>>,
    /// The plan, when the run has one up front (the dry-run text is
    /// `plan.to_string()`).
    #[serde(default)]
    pub plan: Option<Plan>,
    /// The deployment a resume or rollback acts on.
    #[serde(default)]
    pub acts_on: Option<String>,
    /// When the run started, milliseconds since the Unix epoch (for
    /// people; the order of journals is [`sequence`](Self::sequence)'s).
    pub started_at_ms: u64,
    /// The run's place in the state directory's order, set by
    /// [`StateDir::create_journal`](super::StateDir::create_journal): the
    /// wall clock can be stepped back, a counter cannot. `None` in journals
    /// written before the counter existed, which sort before all others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// The process that ran it.
    pub pid: u32,
    /// The machine it ran on.
    pub host: String,
    /// The source commit the release was built from, when the deployment
    /// was started with one (`deploy --commit`, `watch`): commit time to
    /// live time is the lead time of a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<SourceCommit>,
    /// A drill: a canary broken on purpose (`deploykit drill`) to prove
    /// the gates fire. Its rollback is the expected outcome, so the DORA
    /// figures leave it out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drill: bool,
}

/// A source commit a release was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceCommit {
    /// The full commit id (hexadecimal).
    pub sha: String,
    /// When the change was committed, seconds since the Unix epoch, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_s: Option<i64>,
}

impl SourceCommit {
    /// A commit id: 7 to 64 hexadecimal digits (SHA-1 or SHA-256 object
    /// names, or an abbreviation).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `commit` when `sha` is anything else.
    pub fn new(sha: &str, time_s: Option<i64>) -> Result<Self> {
        let ok = (7..=64).contains(&sha.len()) && sha.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok {
            return Err(Error::invalid(
                "commit",
                format!(
                    "`{}` is not a commit id: give 7 to 64 hexadecimal digits",
                    sha.escape_default()
                ),
            ));
        }
        Ok(Self {
            sha: sha.to_ascii_lowercase(),
            time_s,
        })
    }
}

impl JournalHeader {
    /// A header for a run starting now in this process.
    pub fn new(
        deployment: impl Into<String>,
        app: impl Into<String>,
        kind: RunKind,
        strategy: StrategyKind,
        release: ReleaseId,
        previous: BTreeMap<InstanceId, Option<ReleaseId>>,
    ) -> Self {
        Self {
            version: 1,
            deployment: deployment.into(),
            app: app.into(),
            kind,
            strategy,
            release,
            previous,
            plan: None,
            acts_on: None,
            started_at_ms: super::now_ms(),
            sequence: None,
            pid: std::process::id(),
            host: super::host_name(),
            commit: None,
            drill: false,
        }
    }
}

/// The last record of a finished run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalOutcome {
    /// How it ended.
    pub outcome: OutcomeKind,
    /// Why, when not a success.
    #[serde(default)]
    pub reason: Option<String>,
    /// How long it took.
    pub duration_ms: u64,
}

/// One line of a journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
pub enum JournalRecord {
    /// The first line.
    Header(JournalHeader),
    /// An event of the executor.
    Event(Event),
    /// The last line of a finished run.
    Finished(JournalOutcome),
}

/// Writes a journal with group commit. As an [`EventSink`] it records every
/// event of the executor: [`emit`](EventSink::emit) queues the record, and
/// [`durable`](EventSink::durable), which the executor awaits before each
/// step acts, returns once everything queued is written and `fdatasync`ed.
/// One writer thread per journal waits until records stop arriving (no new
/// one for 0.1 ms, 1 ms at most) and writes whatever is queued in one
/// `write` and one `fdatasync`, so the records of steps starting together
/// (a batch of a rolling deployment) share a flush. A step therefore waits
/// at least 0.1 ms longer than the flush itself.
///
/// A failed write or flush fails every wait from then on (what the file
/// holds after a failed `fdatasync` is unknown, so nothing more is written
/// to it): the executor then starts no further rollout step. Records that
/// could not be written are counted ([`write_errors`](Self::write_errors)).
/// Keep the state directory on a local filesystem.
pub struct Journal {
    path: PathBuf,
    header: JournalHeader,
    shared: Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("records", &self.records())
            .finish_non_exhaustive()
    }
}

/// How often the queued records were flushed, for benchmarks and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Records written by each flush (one `write` and one `fdatasync`), in
    /// order.
    pub records_per_flush: Vec<u32>,
}

impl FlushStats {
    /// Flushes made.
    pub fn flushes(&self) -> usize {
        self.records_per_flush.len()
    }

    /// The median records per flush (0 without flushes).
    pub fn median(&self) -> u32 {
        let mut v = self.records_per_flush.clone();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }

    /// The most records one flush wrote.
    pub fn max(&self) -> u32 {
        self.records_per_flush.iter().copied().max().unwrap_or(0)
    }
}

/// The state the callers and the writer thread share.
#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer: records were queued, or the journal closes.
    queued: Condvar,
    /// Wakes blocking waiters after each flush.
    flushed: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    /// Serialized records not yet handed to the writer.
    buf: Vec<u8>,
    /// Records queued so far (the header counts).
    appended: u64,
    /// Records handed to the writer.
    taken: u64,
    /// Records on disk.
    durable: u64,
    /// Records that could not be written.
    write_errors: u64,
    /// The first failed write or flush; every wait fails from then on.
    failed: Option<(std::io::ErrorKind, String)>,
    /// The journal is dropped: write what is queued and stop.
    closing: bool,
    /// Async waiters: each is told once the records up to its target are
    /// on disk (only those, so a flush wakes no one it does not concern).
    waiters: Vec<(u64, tokio::sync::oneshot::Sender<()>)>,
    stats: FlushStats,
    /// Test hook: the next flush fails as a full disk would.
    #[cfg(test)]
    fail_next_flush: bool,
    /// Test hook: the writer waits while this is set.
    #[cfg(test)]
    held: bool,
}

impl Queue {
    #[cfg(test)]
    fn held(&self) -> bool {
        self.held
    }

    #[cfg(not(test))]
    fn held(&self) -> bool {
        false
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic never happens under this lock (no user code runs there).
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How long the writer waits for another record before it flushes: longer
/// than it takes the tasks woken together to queue theirs, far shorter than
/// a flush (0.2 ms to several ms on a disk).
const GATHER_QUIET: std::time::Duration = std::time::Duration::from_micros(100);

/// The longest the writer gathers records before it flushes, however fast
/// they keep arriving.
const GATHER_AT_MOST: std::time::Duration = std::time::Duration::from_millis(1);

/// The writer thread: each turn waits until records stop arriving (at most
/// [`GATHER_AT_MOST`]), takes everything queued and writes it with one
/// `write` and one `fdatasync`.
fn write_loop(shared: &Shared, mut file: File) {
    loop {
        let (buf, upto, records) = {
            let mut q = shared.lock();
            while (q.buf.is_empty() && !q.closing) || q.held() {
                q = shared.queued.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.buf.is_empty() {
                return;
            }
            // While records keep arriving, wait for them to stop: the steps
            // answered together (a batch's) queue theirs within microseconds
            // of each other, and one flush for all of them is worth a short
            // wait where one flush each costs a disk round trip each.
            let deadline = std::time::Instant::now() + GATHER_AT_MOST;
            let mut seen = q.appended;
            while !q.closing && std::time::Instant::now() < deadline {
                q = shared
                    .queued
                    .wait_timeout(q, GATHER_QUIET)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                if q.appended == seen {
                    break;
                }
                seen = q.appended;
            }
            let records = q.appended - q.taken;
            q.taken = q.appended;
            (std::mem::take(&mut q.buf), q.appended, records)
        };
        #[cfg(test)]
        let injected = std::mem::take(&mut shared.lock().fail_next_flush);
        #[cfg(not(test))]
        let injected = false;
        let failed_before = shared.lock().failed.is_some();
        let written = if failed_before {
            Err(std::io::Error::other("an earlier write failed"))
        } else if injected {
            Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "no space left on device (test hook)",
            ))
        } else {
            file.write_all(&buf).and_then(|()| file.sync_data())
        };
        let mut q = shared.lock();
        match written {
            Ok(()) => {
                q.durable = upto;
                q.stats
                    .records_per_flush
                    .push(u32::try_from(records).unwrap_or(u32::MAX));
            }
            Err(e) => {
                q.write_errors += records;
                if q.failed.is_none() {
                    q.failed = Some((e.kind(), e.to_string()));
                }
            }
        }
        let (durable, failed) = (q.durable, q.failed.is_some());
        let (ready, waiting) = std::mem::take(&mut q.waiters)
            .into_iter()
            .partition(|(target, _)| failed || *target <= durable);
        q.waiters = waiting;
        drop(q);
        let ready: Vec<(u64, tokio::sync::oneshot::Sender<()>)> = ready;
        for (_, tx) in ready {
            // A closed receiver is a waiter that gave up.
            let _ = tx.send(());
        }
        shared.flushed.notify_all();
    }
}

impl Journal {
    pub(super) fn create(path: &Path, header: JournalHeader) -> Result<Self> {
        // The header is in the file when it appears, so a reader (`status`,
        // another process) never finds an empty journal.
        let mut line = serde_json::to_vec(&JournalRecord::Header(header.clone()))
            .map_err(|e| Error::io("serializing the journal header", std::io::Error::other(e)))?;
        line.push(b'\n');
        let file = super::atomic::create_new_with(path, &line).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::invalid(
                "deployment",
                format!(
                    "a journal {} exists already; use another deployment id",
                    path.display()
                ),
            ),
            _ => Error::io(format!("creating the journal {}", path.display()), e),
        })?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                appended: 1,
                taken: 1,
                durable: 1,
                stats: FlushStats {
                    records_per_flush: vec![1],
                },
                ..Queue::default()
            }),
            queued: Condvar::new(),
            flushed: Condvar::new(),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("deploykit-journal".into())
                .spawn(move || write_loop(&shared, file))
                .map_err(|e| Error::io("starting the journal writer thread", e))?
        };
        Ok(Self {
            path: path.to_path_buf(),
            header,
            shared,
            writer: Some(writer),
        })
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header written first.
    pub fn header(&self) -> &JournalHeader {
        &self.header
    }

    /// Records queued so far, in order (the header counts); each is on disk
    /// once a [`sync`](Self::sync) or [`durable`](EventSink::durable) that
    /// started after it returned `Ok`.
    pub fn records(&self) -> u64 {
        self.shared.lock().appended
    }

    /// Records that could not be written.
    pub fn write_errors(&self) -> u64 {
        self.shared.lock().write_errors
    }

    /// Records per flush so far.
    pub fn flush_stats(&self) -> FlushStats {
        self.shared.lock().stats.clone()
    }

    /// Queues one record.
    fn queue(&self, record: &JournalRecord) {
        let line = serde_json::to_vec(record);
        let mut q = self.shared.lock();
        match line {
            Ok(mut line) if q.failed.is_none() => {
                line.push(b'\n');
                q.buf.extend_from_slice(&line);
                q.appended += 1;
                drop(q);
                self.shared.queued.notify_one();
            }
            Ok(_) => {
                // Nothing more is written after a failure.
                q.appended += 1;
                q.write_errors += 1;
            }
            Err(e) => {
                // Unreachable for these types; counted rather than lost.
                q.write_errors += 1;
                drop(q);
                tracing::error!(journal = %self.path.display(), error = %e, "cannot serialize a journal record");
            }
        }
    }

    /// The error for a wait on a failed journal.
    fn failure(&self, (kind, message): &(std::io::ErrorKind, String)) -> Error {
        Error::io(
            format!("writing the journal {}", self.path.display()),
            std::io::Error::new(*kind, message.clone()),
        )
    }

    /// Blocks until every record queued so far is on disk.
    ///
    /// Idempotent. Blocks the calling thread for one flush (milliseconds on
    /// a local disk); from async code prefer [`durable`](EventSink::durable).
    ///
    /// # Errors
    /// [`Error::Io`] when a write or flush failed (this one or an earlier
    /// one): the file then holds the records before the failure, and no
    /// later record is written.
    pub fn sync(&self) -> Result<()> {
        let mut q = self.shared.lock();
        let target = q.appended;
        loop {
            if let Some(f) = &q.failed {
                return Err(self.failure(f));
            }
            if q.durable >= target {
                return Ok(());
            }
            q = self.shared.flushed.wait(q).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Queues `event` and waits until it is on disk: the step it announces
    /// may then act.
    ///
    /// Not idempotent (each call is one more record). Cancel-safe: dropping
    /// the future leaves the record queued, and it is written all the same.
    ///
    /// # Errors
    /// As [`sync`](Self::sync).
    pub async fn append(&self, event: &Event) -> Result<()> {
        self.emit(event);
        self.durable().await
    }

    /// Writes the outcome: the run is over (blocks until it is on disk).
    ///
    /// # Errors
    /// [`Error::Io`] when it, or a record before it, could not be written.
    pub fn finish(&self, outcome: JournalOutcome) -> Result<()> {
        self.queue(&JournalRecord::Finished(outcome));
        let synced = self.sync();
        let stats = self.flush_stats();
        tracing::info!(
            journal = %self.path.display(),
            records = self.records(),
            flushes = stats.flushes(),
            median_records_per_flush = stats.median(),
            max_records_per_flush = stats.max(),
            "journal written"
        );
        synced
    }

    /// Test hook: the next flush fails as on a full disk.
    #[cfg(test)]
    pub(crate) fn fail_next_flush(&self) {
        self.shared.lock().fail_next_flush = true;
    }

    /// Test hook: the writer thread waits (`true`) or goes on (`false`).
    #[cfg(test)]
    fn hold_writer(&self, held: bool) {
        self.shared.lock().held = held;
        self.shared.queued.notify_one();
    }
}

impl Drop for Journal {
    /// Writes what is still queued, then stops the writer.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.queued.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Journal {
    /// Removes the journal of a run that never started (its executor
    /// refused the plan before touching anything), so that no interrupted
    /// deployment is left behind for `status`, `deploy` and `rollback` to
    /// trip over. Only a journal holding nothing but its header is removed;
    /// one with events is kept, because something did happen.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be removed.
    pub fn discard_unstarted(&self) -> Result<bool> {
        if self.records() > 1 || self.write_errors() > 0 {
            return Ok(false);
        }
        std::fs::remove_file(&self.path)
            .map_err(|e| Error::io(format!("removing the journal {}", self.path.display()), e))?;
        Ok(true)
    }
}

#[async_trait::async_trait]
impl EventSink for Journal {
    /// Queues the record without waiting for the disk.
    fn emit(&self, event: &Event) {
        self.queue(&JournalRecord::Event(event.clone()));
    }

    /// Waits until every record queued so far is on disk.
    async fn durable(&self) -> Result<()> {
        let target;
        let told = {
            let mut q = self.shared.lock();
            target = q.appended;
            if let Some(f) = &q.failed {
                return Err(self.failure(f));
            }
            if q.durable >= target {
                return Ok(());
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            q.waiters.push((target, tx));
            rx
        };
        // The writer answers every waiter before it stops, so a closed
        // channel is as good as an answer: the state below says which.
        let _ = told.await;
        let q = self.shared.lock();
        match &q.failed {
            Some(f) if q.durable < target => Err(self.failure(f)),
            _ => Ok(()),
        }
    }
}

/// A journal read back.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalSummary {
    /// The file.
    pub path: PathBuf,
    /// The header.
    pub header: JournalHeader,
    /// Every event, in order.
    pub events: Vec<Event>,
    /// The outcome, when the run finished.
    pub finished: Option<JournalOutcome>,
}

/// How a run ended, for the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryOutcome {
    /// Every instance runs the new release.
    Succeeded,
    /// Finished within the failure budget, not a success.
    Degraded,
    /// Failed and rolled back cleanly.
    RolledBack,
    /// Rollback failed: unknown state.
    RollbackFailed,
    /// The process stopped (crash, `kill -9`) before the run ended.
    Interrupted,
    /// Still running (its process holds the lock).
    InProgress,
}

impl std::fmt::Display for HistoryOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HistoryOutcome::Succeeded => "succeeded",
            HistoryOutcome::Degraded => "degraded",
            HistoryOutcome::RolledBack => "rolled back",
            HistoryOutcome::RollbackFailed => "ROLLBACK FAILED",
            HistoryOutcome::Interrupted => "INTERRUPTED",
            HistoryOutcome::InProgress => "in progress",
        })
    }
}

impl From<OutcomeKind> for HistoryOutcome {
    fn from(o: OutcomeKind) -> Self {
        match o {
            OutcomeKind::Succeeded => HistoryOutcome::Succeeded,
            OutcomeKind::Degraded => HistoryOutcome::Degraded,
            OutcomeKind::RolledBack => HistoryOutcome::RolledBack,
            OutcomeKind::RollbackFailed => HistoryOutcome::RollbackFailed,
        }
    }
}

/// What [`salvage`] found on a line.
struct Salvaged {
    /// A torn record preceded the one parsed.
    is_torn: bool,
}

/// Parses a journal line. A write that failed part-way leaves a record
/// without its newline, so the next record written lands on the same line:
/// when the whole line does not parse, the last record starting after the
/// torn one is tried (every record starts with `{"record":`).
fn salvage(line: &str) -> (Salvaged, serde_json::Result<JournalRecord>) {
    let whole = serde_json::from_str::<JournalRecord>(line);
    if whole.is_ok() {
        return (Salvaged { is_torn: false }, whole);
    }
    match line.rfind("{\"record\":").filter(|&at| at > 0) {
        Some(at) => match serde_json::from_str::<JournalRecord>(&line[at..]) {
            Ok(r) => (Salvaged { is_torn: true }, Ok(r)),
            Err(_) => (Salvaged { is_torn: false }, whole),
        },
        None => (Salvaged { is_torn: false }, whole),
    }
}

/// A journal line as reading a journal parses it, torn or not.
pub(crate) fn parse_line(line: &str) -> Option<JournalRecord> {
    salvage(line).1.ok()
}

/// One past (or running) deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// The run's id.
    pub id: String,
    /// Deploy, resume or rollback.
    pub kind: RunKind,
    /// The strategy.
    pub strategy: StrategyKind,
    /// The release.
    pub release: ReleaseId,
    /// How it ended.
    pub outcome: HistoryOutcome,
    /// When it started, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// How long it took (until the last record, for an interrupted run).
    pub duration_ms: u64,
    /// Why, when not a success.
    pub reason: Option<String>,
    /// The source commit deployed, when the run was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<SourceCommit>,
}

impl JournalSummary {
    /// Reads a journal. A torn last line (the process died while writing
    /// it) is ignored; any other unreadable line is an error.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be read; [`Error::Inconsistent`]
    /// when it has no header or a corrupt line before the last.
    pub fn read(path: &Path) -> Result<Self> {
        let file =
            File::open(path).map_err(|e| Error::io(format!("reading the journal {}", path.display()), e))?;
        let lines: Vec<String> = BufReader::new(file)
            .lines()
            .collect::<std::io::Result<_>>()
            .map_err(|e| Error::io(format!("reading the journal {}", path.display()), e))?;
        let mut header = None;
        let mut events = Vec::new();
        let mut finished = None;
        let count = lines.len();
        for (n, line) in lines.iter().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let (salvaged, parsed) = salvage(line);
            if salvaged.is_torn {
                tracing::warn!(journal = %path.display(), line = n + 1, "ignoring a torn record before another on the same line");
            }
            match parsed {
                Ok(JournalRecord::Header(h)) if header.is_none() => header = Some(h),
                Ok(JournalRecord::Header(_)) => {
                    return Err(Error::Inconsistent(format!(
                        "the journal {} has a second header at line {}",
                        path.display(),
                        n + 1
                    )))
                }
                Ok(JournalRecord::Event(e)) => events.push(e),
                Ok(JournalRecord::Finished(o)) => finished = Some(o),
                Err(_) if n + 1 == count => {
                    tracing::warn!(journal = %path.display(), "ignoring a torn last line");
                }
                Err(e) => {
                    return Err(Error::Inconsistent(format!(
                        "the journal {} has a corrupt line {}: {e}; move the file aside to continue",
                        path.display(),
                        n + 1
                    )))
                }
            }
        }
        let header = header.ok_or_else(|| {
            Error::Inconsistent(format!(
                "the journal {} has no header; move the file aside to continue",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            header,
            events,
            finished,
        })
    }

    /// The header alone, from the first line, without reading the rest:
    /// `None` when that line is not a readable header (then only
    /// [`read`](Self::read) can say what is wrong with the file).
    pub(super) fn read_header(path: &Path) -> Option<JournalHeader> {
        let file = File::open(path).ok()?;
        let first = BufReader::new(file)
            .lines()
            .map_while(std::io::Result::ok)
            .find(|l| !l.trim().is_empty())?;
        match serde_json::from_str::<JournalRecord>(&first) {
            Ok(JournalRecord::Header(h)) => Some(h),
            _ => None,
        }
    }

    /// Whether the run ended (an outcome was recorded).
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }

    /// Instances any step (rollout or restore) was started on.
    pub fn touched(&self) -> BTreeSet<InstanceId> {
        self.events
            .iter()
            .filter_map(|e| match &e.kind {
                EventKind::StepStarted {
                    instance: Some(i), ..
                } => Some(i.clone()),
                _ => None,
            })
            .collect()
    }

    /// Instances whose last recorded step is not a completed `enable` or a
    /// restore: a run that stopped there left them drained, stopped or
    /// half-replaced.
    pub fn unsettled(&self) -> BTreeSet<InstanceId> {
        Self::unsettled_across(std::slice::from_ref(self))
    }

    /// As [`unsettled`](Self::unsettled), over the events of several
    /// journals in order (a deployment and the resumes and rollbacks that
    /// acted on it): an instance left part-way by one run and not yet
    /// touched by the next is still unsettled.
    pub fn unsettled_across(journals: &[JournalSummary]) -> BTreeSet<InstanceId> {
        let mut state: BTreeMap<InstanceId, bool> = BTreeMap::new();
        for e in journals.iter().flat_map(|j| &j.events) {
            match &e.kind {
                EventKind::StepStarted {
                    instance: Some(i), ..
                } => {
                    state.insert(i.clone(), false);
                }
                EventKind::StepFinished {
                    instance: Some(i),
                    step,
                    result: StepResult::Ok | StepResult::Warning(_),
                    ..
                } if *step == StepKind::Enable => {
                    state.insert(i.clone(), true);
                }
                EventKind::InstanceRestored { instance, .. } => {
                    state.insert(instance.clone(), true);
                }
                _ => {}
            }
        }
        state
            .into_iter()
            .filter(|(_, settled)| !settled)
            .map(|(i, _)| i)
            .collect()
    }

    /// Whether a step of `kind` finished well outside any rollback (e.g.
    /// `record_live`: a blue-green switch was recorded).
    pub fn step_done(&self, kind: StepKind) -> bool {
        self.events.iter().any(|e| {
            matches!(&e.kind, EventKind::StepFinished { step, rollback: false, result: StepResult::Ok, .. } if *step == kind)
        })
    }

    /// The last event's time since the start, in milliseconds.
    pub fn last_elapsed_ms(&self) -> u64 {
        self.events.iter().map(|e| e.elapsed_ms).max().unwrap_or(0)
    }

    /// The last event, if any.
    pub fn last_event(&self) -> Option<&Event> {
        self.events.last()
    }

    /// The canary stage waiting for a manual promotion now, if the last
    /// promotion-related event says one waits.
    pub fn awaiting_promotion(&self) -> Option<usize> {
        let mut waiting = None;
        for e in &self.events {
            match &e.kind {
                EventKind::AwaitingPromotion { stage, .. } => waiting = Some(*stage),
                EventKind::Promoted { .. }
                | EventKind::RollbackStarted { .. }
                | EventKind::DeploymentFinished { .. } => waiting = None,
                _ => {}
            }
        }
        waiting
    }

    /// The release an experiment with several treatments chose (its
    /// winner's), which stable moves to instead of the header's.
    pub fn decided_release(&self) -> Option<&ReleaseId> {
        self.events.iter().rev().find_map(|e| match &e.kind {
            EventKind::ExperimentDecided { release, .. } => Some(release),
            _ => None,
        })
    }

    /// The history line of this run. `holder` is the current lock holder:
    /// an unfinished run whose process holds it is in progress.
    pub fn history_entry(&self, holder: Option<&Holder>) -> HistoryEntry {
        let h = &self.header;
        let (outcome, duration_ms, reason) = match &self.finished {
            Some(o) => (o.outcome.into(), o.duration_ms, o.reason.clone()),
            None => {
                let running = holder.is_some_and(|x| x.pid == h.pid && x.host == h.host);
                if running {
                    (HistoryOutcome::InProgress, self.last_elapsed_ms(), None)
                } else {
                    let last = self
                        .last_event()
                        .map(|e| format!("the process stopped after: {}", describe(&e.kind)))
                        .unwrap_or_else(|| "the process stopped before the first step".into());
                    (HistoryOutcome::Interrupted, self.last_elapsed_ms(), Some(last))
                }
            }
        };
        HistoryEntry {
            id: h.deployment.clone(),
            kind: h.kind,
            strategy: h.strategy,
            release: self.decided_release().unwrap_or(&h.release).clone(),
            outcome,
            started_at_ms: h.started_at_ms,
            duration_ms,
            reason,
            commit: h.commit.clone(),
        }
    }
}

/// A one-line description of an event, for status and history.
pub(crate) fn describe(kind: &EventKind) -> String {
    let on = |i: &Option<InstanceId>| i.as_ref().map(|i| format!(" on {i}")).unwrap_or_default();
    match kind {
        EventKind::StepStarted {
            step,
            instance,
            rollback,
            ..
        } => {
            format!(
                "{}{step} started{}",
                if *rollback { "rollback " } else { "" },
                on(instance)
            )
        }
        EventKind::StepFinished {
            step,
            instance,
            result,
            rollback,
            ..
        } => {
            let r = match result {
                StepResult::Ok => "ok".to_string(),
                StepResult::Warning(w) => format!("warning: {w}"),
                StepResult::Failed(f) => format!("failed: {f}"),
            };
            format!(
                "{}{step} finished{} ({r})",
                if *rollback { "rollback " } else { "" },
                on(instance)
            )
        }
        EventKind::StageStarted { name, .. } => format!("stage {name} started"),
        EventKind::StageFinished { name, .. } => format!("stage {name} finished"),
        other => serde_json::to_value(other)
            .ok()
            .and_then(|v| v.get("event").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or_else(|| "an event".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StateDir;

    fn rid(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }
    fn iid(s: &str) -> InstanceId {
        InstanceId::new(s).unwrap()
    }

    fn ev(kind: EventKind) -> Event {
        Event {
            elapsed_ms: 5,
            deployment: "d1".into(),
            kind,
        }
    }

    #[test]
    fn only_a_journal_of_a_run_that_never_started_is_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), "shop").unwrap();
        let header = |id: &str| {
            JournalHeader::new(
                id,
                "shop",
                RunKind::Deploy,
                StrategyKind::Rolling,
                rid("v2"),
                BTreeMap::new(),
            )
        };
        let refused = state.create_journal(header("d1")).unwrap();
        assert!(refused.discard_unstarted().unwrap());
        assert!(!refused.path().exists());
        assert_eq!(state.latest().unwrap(), None, "no interrupted deployment is left");

        let started = state.create_journal(header("d2")).unwrap();
        started.emit(&ev(EventKind::StepStarted {
            stage: 0,
            step: StepKind::Drain,
            instance: Some(iid("a")),
            rollback: false,
        }));
        assert!(!started.discard_unstarted().unwrap(), "something happened: kept");
        assert!(started.path().exists());
        assert!(!state.latest().unwrap().unwrap().is_finished());
    }

    #[test]
    fn the_readings_and_the_decision_of_several_treatments_read_back() {
        use crate::experiment::{ExperimentRules, ManySequential, Tally, VariantsReading};
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), "shop").unwrap();
        let header = JournalHeader::new(
            "d1",
            "shop",
            RunKind::Deploy,
            StrategyKind::Experiment,
            rid("v2"),
            BTreeMap::new(),
        );
        let j = state.create_journal(header).unwrap();
        let t = |visits: f64, conversions: f64| Tally { visits, conversions };
        let many = ManySequential::default().read(
            &ExperimentRules::default(),
            t(2000.0, 100.0),
            &[t(2000.0, 100.0), t(2000.0, 300.0)],
        );
        let g = |s: &str| crate::names::Group::new(s).unwrap();
        let reading = VariantsReading::new(
            g("stable"),
            &many,
            &[(g("canary-b"), rid("v2")), (g("canary-c"), rid("v3"))],
        );
        assert_eq!(reading.winner, Some(g("canary-c")));
        let events = vec![
            ev(EventKind::ExperimentVariants {
                reading: reading.clone(),
                experiment_ms: 30_000,
            }),
            ev(EventKind::ExperimentDecided {
                winner: g("canary-c"),
                release: rid("v3"),
            }),
        ];
        for e in &events {
            j.emit(e);
        }
        j.sync().unwrap();
        let s = JournalSummary::read(j.path()).unwrap();
        assert_eq!(s.events.len(), 2);
        // Floats read back to within the last digit JSON keeps.
        let EventKind::ExperimentVariants {
            reading: back,
            experiment_ms: 30_000,
        } = &s.events[0].kind
        else {
            panic!("{:?}", s.events[0]);
        };
        assert_eq!(back.to_string(), reading.to_string());
        assert_eq!((&back.winner, back.control), (&reading.winner, reading.control));
        for (b, r) in back.treatments.iter().zip(&reading.treatments) {
            assert_eq!((&b.group, &b.release), (&r.group, &r.release));
            assert!((b.comparison.effect - r.comparison.effect).abs() < 1e-12);
            assert!((b.comparison.adjusted_p_value - r.comparison.adjusted_p_value).abs() < 1e-12);
        }
        assert_eq!(s.events[1], events[1]);
        // The run moves stable to the winner's release, not the header's.
        assert_eq!(s.history_entry(None).release, rid("v3"));
        let record = crate::stats::DeploymentRecord::from_journal(&s, None);
        assert_eq!(record.release, rid("v3"));
    }

    #[test]
    fn journal_round_trips_and_derives_history() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), "shop").unwrap();
        let previous = BTreeMap::from([(iid("a"), Some(rid("v1"))), (iid("b"), Some(rid("v1")))]);
        let header = JournalHeader::new(
            "d1",
            "shop",
            RunKind::Deploy,
            StrategyKind::Rolling,
            rid("v2"),
            previous.clone(),
        );
        let j = state.create_journal(header.clone()).unwrap();
        assert_eq!(j.records(), 1);
        j.emit(&ev(EventKind::StepStarted {
            stage: 0,
            step: StepKind::Drain,
            instance: Some(iid("a")),
            rollback: false,
        }));
        j.emit(&ev(EventKind::StepFinished {
            stage: 0,
            step: StepKind::Enable,
            instance: Some(iid("a")),
            rollback: false,
            duration_ms: 1,
            attempts: 1,
            result: StepResult::Ok,
        }));
        j.emit(&ev(EventKind::StepStarted {
            stage: 2,
            step: StepKind::Drain,
            instance: Some(iid("b")),
            rollback: false,
        }));
        assert_eq!(j.records(), 4);
        // `emit` only queues; the executor awaits `durable` before a step.
        j.sync().unwrap();
        // Interrupted here: no outcome.
        let s = JournalSummary::read(j.path()).unwrap();
        assert_eq!(
            s.header,
            JournalHeader {
                sequence: Some(1),
                ..header.clone()
            }
        );
        assert_eq!(s.touched(), BTreeSet::from([iid("a"), iid("b")]));
        assert_eq!(s.unsettled(), BTreeSet::from([iid("b")]));
        // A later run that finished b settles it; one that only started a
        // settles nothing more.
        let mut later = s.clone();
        later.events = vec![ev(EventKind::InstanceRestored {
            instance: iid("b"),
            release: Some(rid("v1")),
        })];
        assert!(JournalSummary::unsettled_across(&[s.clone(), later.clone()]).is_empty());
        later.events.push(ev(EventKind::StepStarted {
            stage: 0,
            step: StepKind::Drain,
            instance: Some(iid("a")),
            rollback: true,
        }));
        assert_eq!(
            JournalSummary::unsettled_across(&[s.clone(), later]),
            BTreeSet::from([iid("a")])
        );
        let h = s.history_entry(None);
        assert_eq!(h.outcome, HistoryOutcome::Interrupted);
        assert!(h.reason.unwrap().contains("drain started on b"));
        // A torn last line (a crash mid-write) is ignored.
        std::fs::OpenOptions::new()
            .append(true)
            .open(j.path())
            .unwrap()
            .write_all(b"{\"record\":\"ev")
            .unwrap();
        assert_eq!(JournalSummary::read(j.path()).unwrap().events.len(), 3);
        // A corrupt line in the middle is not.
        let bad = dir.path().join("bad.jsonl");
        let text = std::fs::read_to_string(j.path()).unwrap();
        std::fs::write(
            &bad,
            format!(
                "{}garbage\n{{}}\n",
                text.lines().next().unwrap().to_owned() + "\n"
            ),
        )
        .unwrap();
        let e = JournalSummary::read(&bad).unwrap_err().to_string();
        assert!(e.contains("corrupt line 2"), "{e}");

        let j2 = state
            .create_journal(JournalHeader {
                started_at_ms: header.started_at_ms + 1,
                ..JournalHeader::new(
                    "d2",
                    "shop",
                    RunKind::Rollback,
                    StrategyKind::Rollback,
                    rid("v1"),
                    previous,
                )
            })
            .unwrap();
        j2.finish(JournalOutcome {
            outcome: OutcomeKind::Succeeded,
            reason: None,
            duration_ms: 42,
        })
        .unwrap();
        let history = state.history().unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].id, "d2");
        assert_eq!(history[1].outcome, HistoryOutcome::Succeeded);
        assert_eq!(history[1].duration_ms, 42);
        assert_eq!(state.latest().unwrap().unwrap().header.deployment, "d2");
        // The same id twice is refused.
        let again = JournalHeader::new(
            "d2",
            "shop",
            RunKind::Deploy,
            StrategyKind::Rolling,
            rid("v3"),
            BTreeMap::new(),
        );
        assert!(state.create_journal(again).unwrap_err().is_invalid_input());
    }

    #[test]
    fn every_progress_event_round_trips_through_a_journal_line() {
        // Event fields are flattened next to the kind's own: a kind field
        // named like one of Event's would make the line unreadable.
        for kind in [
            EventKind::StageProgress {
                stage: 1,
                of: 2,
                weight: 20,
                percent: 50,
                elapsed_ms: 150,
                duration_ms: 300,
            },
            EventKind::WarmUpProgress {
                group: crate::names::Group::new("green").unwrap(),
                sent: 3,
                total: 10,
                failed: 1,
            },
            EventKind::DeploymentFinished {
                outcome: OutcomeKind::Succeeded,
                succeeded: 2,
                failed: 0,
                duration_ms: 9,
                reason: None,
            },
        ] {
            let record = JournalRecord::Event(ev(kind));
            let line = serde_json::to_string(&record).unwrap();
            assert_eq!(
                serde_json::from_str::<JournalRecord>(&line).unwrap(),
                record,
                "{line}"
            );
        }
    }

    fn journal(dir: &Path) -> Journal {
        let state = StateDir::open(dir, "shop").unwrap();
        state
            .create_journal(JournalHeader::new(
                "d1",
                "shop",
                RunKind::Deploy,
                StrategyKind::Rolling,
                rid("v2"),
                BTreeMap::new(),
            ))
            .unwrap()
    }

    fn started(i: usize) -> Event {
        ev(EventKind::StepStarted {
            stage: 0,
            step: StepKind::Drain,
            instance: Some(iid(&format!("web-{i}"))),
            rollback: false,
        })
    }

    #[tokio::test]
    async fn concurrent_appends_share_one_flush() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        assert_eq!(j.flush_stats().records_per_flush, vec![1], "the header alone");
        // The writer waits until all 100 are queued, as when a batch's steps
        // start while a flush is under way.
        j.hold_writer(true);
        let events: Vec<Event> = (0..100).map(started).collect();
        let appends = futures::future::join_all(events.iter().map(|e| j.append(e)));
        let release = async {
            while j.records() < 101 {
                tokio::task::yield_now().await;
            }
            j.hold_writer(false);
        };
        let (results, ()) = tokio::join!(appends, release);
        assert!(results.iter().all(Result::is_ok));
        let stats = j.flush_stats();
        assert_eq!(
            stats.records_per_flush,
            vec![1, 100],
            "one flush for the 100 records"
        );
        assert_eq!((stats.flushes(), stats.median(), stats.max()), (2, 100, 100));
        assert_eq!(JournalSummary::read(j.path()).unwrap().events, events);
    }

    #[tokio::test]
    async fn a_record_is_on_disk_before_append_returns() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        j.hold_writer(true);
        let event = started(1);
        let mut append = std::pin::pin!(j.append(&event));
        // Queued but not written: the append must still be waiting.
        for _ in 0..10 {
            assert!(futures::poll!(append.as_mut()).is_pending());
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(JournalSummary::read(j.path()).unwrap().events.is_empty());
        j.hold_writer(false);
        append.await.unwrap();
        // Read back by path, as `status` after a crash would.
        assert_eq!(
            JournalSummary::read(j.path()).unwrap().events,
            vec![event.clone()]
        );
    }

    #[tokio::test]
    async fn a_failed_flush_fails_its_waiters_and_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        j.fail_next_flush();
        let e = j.append(&started(1)).await.unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("no space left"), "{e}");
        // Nothing more is written after a failure, and every wait says so.
        assert!(j.append(&started(2)).await.is_err());
        assert!(j.sync().is_err());
        assert!(j
            .finish(JournalOutcome {
                outcome: OutcomeKind::Succeeded,
                reason: None,
                duration_ms: 1,
            })
            .is_err());
        assert_eq!(j.write_errors(), 3);
        let read = JournalSummary::read(j.path()).unwrap();
        assert!(read.events.is_empty() && read.finished.is_none());
    }

    #[test]
    fn awaiting_promotion_follows_the_events() {
        let s = JournalSummary {
            path: PathBuf::new(),
            header: JournalHeader::new(
                "d",
                "a",
                RunKind::Deploy,
                StrategyKind::Canary,
                rid("v2"),
                BTreeMap::new(),
            ),
            events: vec![ev(EventKind::AwaitingPromotion {
                stage: 2,
                weight: 25,
                timeout_ms: None,
            })],
            finished: None,
        };
        assert_eq!(s.awaiting_promotion(), Some(2));
        let mut promoted = s.clone();
        promoted.events.push(ev(EventKind::Promoted { stage: 2 }));
        assert_eq!(promoted.awaiting_promotion(), None);
    }
}
