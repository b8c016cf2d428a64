//! Durable deployment state on the machine running deploykit: a lock so two
//! deployments of one application never run at once, a journal of every
//! step, the history derived from the journals, and a control file through
//! which another process promotes or aborts a running canary.
//!
//! Everything lives in one directory per application, `<base>/<app>/`:
//!
//! ```text
//! <base>/<app>/lock                  who holds the deployment lock (a flock on <base>/<app>)
//! <base>/<app>/journal/<seq>-<id>.jsonl  one journal per deployment, rollback or resume
//! <base>/<app>/sequence              the last journal's sequence number
//! <base>/<app>/control.json          the last promote/abort command sent
//! <base>/<app>/control-ack.json      what the running deployment did with it
//! <base>/<app>/live.json             the blue-green live record (FileLiveStore)
//! ```
//!
//! * [`DeployLock`] — an advisory lock (`flock` through
//!   [`File::try_lock`](std::fs::File::try_lock)) on the directory
//!   `<base>/<app>` itself, so removing or replacing a file cannot free it,
//!   with the holder (pid, host, start time, deployment) written into
//!   `lock`. The kernel
//!   releases the lock when the holder dies, even by `kill -9`; a holder
//!   record left behind by a dead process is reported as *stale* and taken
//!   over.
//! * [`Journal`] — JSON lines, each `fsync`ed before the step it records
//!   goes on: a [header](JournalHeader) (deployment id, strategy, release,
//!   plan, the previous release of every instance), then every [`Event`](crate::Event)
//!   the executor emits, then the outcome. A crash at any point leaves a
//!   journal that says which instances were touched and what each ran
//!   before — what `status`, `--resume` and `rollback` read. Journals are
//!   ordered by a sequence number kept in the state directory, never by the
//!   wall clock: a clock stepped back would otherwise put a journal dated
//!   in the future after a later, interrupted one and hide it.
//! * [`HistoryEntry`] — one line of history per journal.
//! * [`ControlFile`] — promote or abort a deployment running in another
//!   process.
//!
//! The same four things behind one trait, [`StateBackend`]: the files above
//! ([`LocalBackend`]), or etcd (`EtcdBackend`, feature `etcd`), where
//! every machine that deploys sees them, with a leased lock and fenced
//! writes.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use deploykit::state::{LockAttempt, StateDir};
//!
//! let base = tempfile::tempdir()?;
//! let state = StateDir::open(base.path(), "shop")?;
//! let LockAttempt::Acquired { lock, stale } = state.try_lock("deploy v2")? else { panic!() };
//! assert!(stale.is_none());
//! // A second attempt (from this or any other process) is refused and names the holder.
//! match state.try_lock("deploy v3")? {
//!     LockAttempt::Held(holder) => assert_eq!(holder.pid, std::process::id()),
//!     LockAttempt::Acquired { .. } => unreachable!(),
//! }
//! drop(lock);
//! assert!(matches!(state.try_lock("deploy v3")?, LockAttempt::Acquired { .. }));
//! # Ok(())
//! # }
//! ```

pub(crate) mod atomic;
mod backend;
mod control;
mod digest;
#[cfg(feature = "etcd")]
mod etcd;
mod journal;
pub(crate) use journal::parse_line as fuzz_journal_line;
mod lock;
mod marker;

use std::path::{Path, PathBuf};

pub use backend::{Fence, HeldLock, JournalWriter, LocalBackend, StateBackend, StateLock};
pub use control::{ControlAck, ControlCommand, ControlFile, ControlRequest};
pub use digest::release_digest;
#[cfg(feature = "etcd")]
#[cfg_attr(docsrs, doc(cfg(feature = "etcd")))]
pub use etcd::{EtcdBackend, EtcdConfig, EtcdTls};
pub use journal::{
    FlushStats, HistoryEntry, HistoryOutcome, Journal, JournalHeader, JournalOutcome, JournalRecord,
    JournalSummary, RunKind, SourceCommit,
};
pub use lock::{utc_datetime, DeployLock, Holder, LockAttempt};
pub use marker::{claim, claim_for, release, ClaimRefused, InstanceMarker};

use crate::error::{Error, Result};

/// The state directory of one application: `<base>/<app>/`.
#[derive(Debug, Clone)]
pub struct StateDir {
    app: String,
    root: PathBuf,
}

impl StateDir {
    /// Opens (creating it if needed) the state directory of `app` under
    /// `base`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `app`) for a name outside
    /// `[A-Za-z0-9._-]`; [`Error::Io`] when the directory cannot be created.
    pub fn open(base: impl AsRef<Path>, app: &str) -> Result<Self> {
        let dir = Self::at(base, app)?;
        dir.create()?;
        Ok(dir)
    }

    /// The state directory of `app` under `base`, not created: reading a
    /// missing one finds no lock and no journals, and
    /// [`try_lock`](Self::try_lock) creates it. For commands that may be
    /// refused or only read, which then leave nothing behind.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `app`) for a name outside
    /// `[A-Za-z0-9._-]`.
    pub fn at(base: impl AsRef<Path>, app: &str) -> Result<Self> {
        crate::names::validate_name("app", app)?;
        Ok(Self {
            app: app.to_string(),
            root: base.as_ref().join(app),
        })
    }

    /// Creates the directory and its journal directory if needed.
    fn create(&self) -> Result<()> {
        let journal = self.journal_dir();
        std::fs::create_dir_all(&journal)
            .map_err(|e| Error::io(format!("creating the state directory {}", journal.display()), e))
    }

    /// The application's name.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// `<base>/<app>`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blue-green live record is kept (for a
    /// [`FileLiveStore`](crate::bluegreen_state::FileLiveStore)).
    pub fn live_record_path(&self) -> PathBuf {
        self.root.join("live.json")
    }

    /// The directory of the journals.
    pub fn journal_dir(&self) -> PathBuf {
        self.root.join("journal")
    }

    /// Tries to take the deployment lock without waiting; `purpose` (e.g.
    /// `deploy v2`) is recorded for whoever is refused.
    ///
    /// Creates the state directory first if it does not exist.
    ///
    /// # Errors
    /// [`Error::Io`] when the state directory cannot be created, opened or
    /// locked, or the lock file recording the holder cannot be written (the
    /// lock is then not taken).
    pub fn try_lock(&self, purpose: &str) -> Result<LockAttempt> {
        self.create()?;
        lock::try_lock(&self.root, purpose)
    }

    /// Who holds the lock now, if anyone (a live holder: the lock is tested,
    /// not taken).
    ///
    /// A state directory that does not exist has none.
    ///
    /// # Errors
    /// [`Error::Io`] when the state directory cannot be opened.
    pub fn holder(&self) -> Result<Option<Holder>> {
        if !self.root.exists() {
            // Nobody can hold a lock on a directory that is not there.
            return Ok(None);
        }
        lock::current_holder(&self.root)
    }

    /// Starts a new journal with `header` (written and `fsync`ed before this
    /// returns), numbered after every journal before it: `header.sequence`
    /// is set to one more than the highest of the `sequence` file and the
    /// journals present, the file is named `<sequence>-<id>.jsonl`, and the
    /// `sequence` file is updated atomically first. Call it while holding
    /// the [lock](Self::try_lock), which makes the numbering race-free.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `deployment`) when the id is not a
    /// valid name, or one with that id exists; [`Error::Io`] when it cannot
    /// be written; [`Error::Inconsistent`] when the `sequence` file does not
    /// hold a number.
    pub fn create_journal(&self, mut header: JournalHeader) -> Result<Journal> {
        crate::names::validate_name("deployment", &header.deployment)?;
        let mut last = self.read_sequence()?;
        for (path, h) in self.headers()? {
            if h.deployment == header.deployment {
                return Err(Error::invalid(
                    "deployment",
                    format!(
                        "a journal {} exists already; use another deployment id",
                        path.display()
                    ),
                ));
            }
            last = last.max(h.sequence.unwrap_or(0));
        }
        let sequence = last + 1;
        let file = self.root.join(SEQUENCE_FILE);
        write_atomic(&file, format!("{sequence}\n").as_bytes())
            .map_err(|e| Error::io(format!("writing {}", file.display()), e))?;
        header.sequence = Some(sequence);
        Journal::create(
            &self
                .journal_dir()
                .join(format!("{sequence:010}-{}.jsonl", header.deployment)),
            header,
        )
    }

    /// Pins the content of `release` (its [`release_digest`]) on its first
    /// deployment from this state directory, and refuses a later one whose
    /// content differs: instances that hold the release already would keep
    /// (or switch back to) the old content, since a release is installed
    /// once per name. Call it holding the [lock](Self::try_lock), before the
    /// first step.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `release`) naming the release, both
    /// digests and the fix (a new release name); [`Error::Io`] when the
    /// record cannot be read or written.
    pub fn pin_release(&self, release: &crate::ReleaseId, digest: &str) -> Result<()> {
        let dir = self.root.join("releases");
        let file = dir.join(format!("{release}.sha256"));
        match std::fs::read_to_string(&file) {
            Ok(pinned) if pinned.trim() == digest => Ok(()),
            Ok(pinned) => Err(Error::invalid(
                "release",
                format!(
                    "{release} changed since it was first deployed (sha256 {}…, now {}…), but instances that hold \
                     {release} would keep its old content; deploy the new build under a new release name \
                     (e.g. {release}-2), or remove {} if no instance holds {release} any more",
                    pinned.trim().chars().take(12).collect::<String>(),
                    digest.chars().take(12).collect::<String>(),
                    file.display()
                ),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
                write_atomic(&file, format!("{digest}\n").as_bytes())
                    .map_err(|e| Error::io(format!("writing {}", file.display()), e))
            }
            Err(e) => Err(Error::io(format!("reading {}", file.display()), e)),
        }
    }

    /// The number in the `sequence` file (0 when there is none yet).
    fn read_sequence(&self) -> Result<u64> {
        let file = self.root.join(SEQUENCE_FILE);
        match std::fs::read_to_string(&file) {
            Ok(text) => text.trim().parse().map_err(|_| {
                Error::Inconsistent(format!(
                    "{} does not hold a number ({:?}); write the highest sequence of the journals \
                     (the number their file names start with) into it",
                    file.display(),
                    text.chars().take(40).collect::<String>()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(Error::io(format!("reading {}", file.display()), e)),
        }
    }

    /// The header of every journal whose first line is readable.
    fn headers(&self) -> Result<Vec<(PathBuf, JournalHeader)>> {
        use std::io::BufRead;
        let mut out = Vec::new();
        for path in self.journal_paths()? {
            let Ok(file) = std::fs::File::open(&path) else {
                continue;
            };
            let mut first = String::new();
            if std::io::BufReader::new(file).read_line(&mut first).is_err() {
                continue;
            }
            if let Ok(JournalRecord::Header(h)) = serde_json::from_str(&first) {
                out.push((path, h));
            }
        }
        Ok(out)
    }

    fn journal_paths(&self) -> Result<Vec<PathBuf>> {
        let dir = self.journal_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Opened with `at` before the first run.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
                out.push(path);
            }
        }
        Ok(out)
    }

    /// Every journal, oldest first: by sequence number; journals written
    /// before sequence numbers existed come first, by start time, then id.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be listed;
    /// [`Error::Inconsistent`] when a journal has no readable header.
    pub fn journals(&self) -> Result<Vec<JournalSummary>> {
        let mut scan = self.scan_journals()?;
        match scan.unreadable.is_empty() {
            true => Ok(scan.journals),
            false => Err(scan.unreadable.swap_remove(0).error),
        }
    }

    /// Every readable journal, oldest first (as [`journals`](Self::journals)),
    /// and every unreadable one with why: for commands that report rather
    /// than act (`status`, `history`), which should show what they can.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be listed.
    pub fn scan_journals(&self) -> Result<JournalScan> {
        let mut journals = Vec::new();
        let mut unreadable = Vec::new();
        let mut paths = self.journal_paths()?;
        paths.sort();
        for path in paths {
            match JournalSummary::read(&path) {
                Ok(j) => journals.push(j),
                Err(error) => unreadable.push(UnreadableJournal { path, error }),
            }
        }
        journals.sort_by(|a, b| order(&a.header).cmp(&order(&b.header)));
        Ok(JournalScan { journals, unreadable })
    }

    /// The journal of `deployment` and of every resume and rollback that
    /// acted on it, oldest first.
    ///
    /// # Errors
    /// As [`journals`](Self::journals).
    pub fn chain(&self, deployment: &str) -> Result<Vec<JournalSummary>> {
        Ok(self
            .journals()?
            .into_iter()
            .filter(|j| j.header.deployment == deployment || j.header.acts_on.as_deref() == Some(deployment))
            .collect())
    }

    /// The newest journal, if any.
    ///
    /// Only the newest journal is read in full; the others' first lines
    /// (their headers) decide which it is, so that every `deploy` does not
    /// parse the whole history (a journal of 10,000 instances has 140,000
    /// records). A corrupt line after the header of an older journal is
    /// therefore not reported here; [`journals`](Self::journals) reports it.
    ///
    /// # Errors
    /// [`Error::Io`] when the directory or the newest journal cannot be
    /// read; [`Error::Inconsistent`] when a journal has no readable header,
    /// or the newest has a corrupt line before its last.
    pub fn latest(&self) -> Result<Option<JournalSummary>> {
        let mut paths = self.journal_paths()?;
        paths.sort();
        let mut newest: Option<(JournalHeader, PathBuf)> = None;
        for path in paths {
            let header = match JournalSummary::read_header(&path) {
                Some(h) => h,
                // The full read names what is wrong (or salvages the header).
                None => JournalSummary::read(&path)?.header,
            };
            // `>=`: of equal orders the last path wins, as in `journals`.
            if newest.as_ref().is_none_or(|(n, _)| order(&header) >= order(n)) {
                newest = Some((header, path));
            }
        }
        newest.map(|(_, path)| JournalSummary::read(&path)).transpose()
    }

    /// The history: one entry per journal, oldest first. A journal without
    /// an outcome is [`HistoryOutcome::InProgress`] while the lock is held
    /// by its process, else [`HistoryOutcome::Interrupted`].
    ///
    /// # Errors
    /// As [`journals`](Self::journals).
    pub fn history(&self) -> Result<Vec<HistoryEntry>> {
        let holder = self.holder()?;
        Ok(self
            .journals()?
            .iter()
            .map(|j| j.history_entry(holder.as_ref()))
            .collect())
    }

    /// The control file of this application.
    pub fn control(&self) -> ControlFile {
        ControlFile::new(&self.root)
    }
}

/// What [`StateDir::scan_journals`] found.
#[derive(Debug)]
pub struct JournalScan {
    /// The readable journals, oldest first.
    pub journals: Vec<JournalSummary>,
    /// The journals that could not be read (empty, no header, a corrupt
    /// line), by file name.
    pub unreadable: Vec<UnreadableJournal>,
}

/// A journal [`StateDir::scan_journals`] could not read.
#[derive(Debug)]
pub struct UnreadableJournal {
    /// The file.
    pub path: PathBuf,
    /// Why (its message names the file and the fix).
    pub error: Error,
}

/// The file holding the last journal's sequence number.
const SEQUENCE_FILE: &str = "sequence";

/// A journal's place in the order: unnumbered (older) journals first, by
/// time; then by sequence.
fn order(h: &JournalHeader) -> (Option<u64>, u64, &str) {
    (h.sequence, h.started_at_ms, &h.deployment)
}

/// This machine's host name (from `/proc/sys/kernel/hostname`, else the
/// `HOSTNAME` variable, else `unknown`).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// Milliseconds since the Unix epoch, on the wall clock (0 before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// Writes `bytes` to `path` atomically: a temporary file beside it created
/// exclusively under a random name (never through a planted symlink),
/// `fsync`, `rename`, `fsync` of the directory. A reader sees the old or the
/// new content, never a mix, also after a crash or a power cut. The new file
/// keeps the permission bits of the one it replaces.
///
/// # Errors
/// The I/O error; the old content is then still in place and no temporary
/// file is left, unless only the final `fsync` of the directory failed (the
/// new content is then in place but might not survive a power cut).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    atomic::write_atomic(path, bytes)
}

/// As [`write_atomic`], without the two `fsync`s: for files that must
/// survive a killed process but not a power cut (the simulated instances'
/// state). A reader, or the next process after a crash, still sees the old
/// or the new content, never a mix; a power cut may lose the last changes.
///
/// # Errors
/// The I/O error; the old content is then still in place and no temporary
/// file is left.
pub fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    atomic::write_atomic_unsynced(path, bytes)
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_journal_is_never_written_through_a_symlink() {
        let base = tempfile::tempdir().unwrap();
        let state = StateDir::open(base.path(), "shop").unwrap();
        let victim = base.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let created = base.path().join("created-through-link");
        // At the names the journals get: numbered 1 and 2 (the first
        // attempt's number is used up even though it fails).
        std::os::unix::fs::symlink(&victim, state.journal_dir().join("0000000001-d1.jsonl")).unwrap();
        std::os::unix::fs::symlink(&created, state.journal_dir().join("0000000002-d2.jsonl")).unwrap();
        for id in ["d1", "d2"] {
            let header: JournalHeader = serde_json::from_value(serde_json::json!({
                "version": 1, "deployment": id, "app": "shop", "kind": "deploy",
                "strategy": "rolling", "release": "v2", "previous": {},
                "started_at_ms": 1, "pid": 1, "host": "h"
            }))
            .unwrap();
            assert!(state.create_journal(header).is_err(), "{id}");
        }
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!created.exists());
    }

    fn header(id: &str, started_at_ms: u64) -> JournalHeader {
        let mut h = JournalHeader::new(
            id,
            "shop",
            RunKind::Deploy,
            crate::StrategyKind::Rolling,
            crate::ReleaseId::new("v2").unwrap(),
            Default::default(),
        );
        h.started_at_ms = started_at_ms;
        h
    }

    #[test]
    fn journals_are_ordered_by_sequence_not_by_the_clock() {
        let base = tempfile::tempdir().unwrap();
        let state = StateDir::open(base.path(), "shop").unwrap();
        // Written before sequence numbers existed: first, by time.
        for (id, at) in [("old-b", 2_000), ("old-a", 1_000)] {
            let h = serde_json::to_string(&JournalRecord::Header(header(id, at))).unwrap();
            std::fs::write(state.journal_dir().join(format!("{id}.jsonl")), h + "\n").unwrap();
        }
        let now = now_ms();
        let future = state
            .create_journal(header("future", now + 365 * 86_400_000))
            .unwrap();
        future
            .finish(JournalOutcome {
                outcome: crate::OutcomeKind::Succeeded,
                reason: None,
                duration_ms: 1,
            })
            .unwrap();
        let crashed = state.create_journal(header("crashed", now)).unwrap();
        assert_eq!(future.header().sequence, Some(1));
        assert_eq!(crashed.header().sequence, Some(2));
        assert!(
            crashed.path().ends_with("0000000002-crashed.jsonl"),
            "{}",
            crashed.path().display()
        );
        drop((future, crashed));
        let order: Vec<String> = state
            .journals()
            .unwrap()
            .into_iter()
            .map(|j| j.header.deployment)
            .collect();
        assert_eq!(order, ["old-a", "old-b", "future", "crashed"]);
        let latest = state.latest().unwrap().unwrap();
        assert_eq!(latest.header.deployment, "crashed");
        assert!(!latest.is_finished());
        assert_eq!(
            std::fs::read_to_string(state.root().join("sequence")).unwrap(),
            "2\n"
        );
    }

    #[test]
    fn latest_reads_only_the_newest_journal_in_full_and_agrees_with_journals() {
        let base = tempfile::tempdir().unwrap();
        let state = StateDir::open(base.path(), "shop").unwrap();
        let finished = JournalOutcome {
            outcome: crate::OutcomeKind::Succeeded,
            reason: None,
            duration_ms: 1,
        };
        let now = now_ms();
        let old = state.create_journal(header("old", now)).unwrap();
        old.finish(finished.clone()).unwrap();
        let new = state.create_journal(header("new", now - 1_000)).unwrap();
        new.finish(finished).unwrap();
        let (old_path, new_path) = (old.path().to_path_buf(), new.path().to_path_buf());
        drop((old, new));
        let full = state.journals().unwrap().pop().unwrap();
        let latest = state.latest().unwrap().unwrap();
        assert_eq!(latest, full, "the same newest journal, read the same way");
        assert_eq!(latest.header.deployment, "new");
        assert!(latest.is_finished());

        // A corrupt line inside the older journal: `journals` reports it,
        // `latest` never reads that far.
        let mut text = std::fs::read_to_string(&old_path).unwrap();
        text.insert_str(text.find('\n').unwrap() + 1, "not json\n");
        std::fs::write(&old_path, &text).unwrap();
        assert!(state.journals().is_err());
        assert_eq!(state.latest().unwrap().unwrap().header.deployment, "new");

        // The newest journal is read in full: its corrupt line is an error.
        let mut text = std::fs::read_to_string(&new_path).unwrap();
        text.insert_str(text.find('\n').unwrap() + 1, "not json\n");
        std::fs::write(&new_path, &text).unwrap();
        let e = state.latest().unwrap_err().to_string();
        assert!(e.contains("corrupt line 2"), "{e}");

        // A journal without a readable header is an error, as before.
        std::fs::write(&new_path, "junk\n{}\n").unwrap();
        let e = state.latest().unwrap_err().to_string();
        assert!(e.contains("corrupt line 1"), "{e}");
        std::fs::write(&new_path, "").unwrap();
        let e = state.latest().unwrap_err().to_string();
        assert!(e.contains("no header"), "{e}");
    }

    #[test]
    fn the_sequence_survives_a_lost_counter_file_and_ids_stay_unique() {
        let base = tempfile::tempdir().unwrap();
        let state = StateDir::open(base.path(), "shop").unwrap();
        drop(state.create_journal(header("a", 5)).unwrap());
        std::fs::remove_file(state.root().join("sequence")).unwrap();
        let b = state.create_journal(header("b", 1)).unwrap();
        assert_eq!(
            b.header().sequence,
            Some(2),
            "numbered after the journals present"
        );
        let e = state.create_journal(header("a", 9)).unwrap_err().to_string();
        assert!(e.contains("deployment") && e.contains("exists already"), "{e}");
        std::fs::write(state.root().join("sequence"), "junk").unwrap();
        let e = state.create_journal(header("c", 9)).unwrap_err().to_string();
        assert!(e.contains("does not hold a number"), "{e}");
    }

    #[test]
    fn a_torn_line_after_the_outcome_leaves_the_run_finished() {
        use std::io::Write;
        let base = tempfile::tempdir().unwrap();
        let state = StateDir::open(base.path(), "shop").unwrap();
        let j = state.create_journal(header("d1", 1)).unwrap();
        j.finish(JournalOutcome {
            outcome: crate::OutcomeKind::Succeeded,
            reason: None,
            duration_ms: 1,
        })
        .unwrap();
        let path = j.path().to_path_buf();
        drop(j);
        for torn in [&b"{\"record\":\"ev"[..], b"ent\",\"elapsed\n"] {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap()
                .write_all(torn)
                .unwrap();
            let history = state.history().unwrap();
            assert_eq!(history[0].outcome, HistoryOutcome::Succeeded, "{torn:?}");
        }
        // A write that failed part-way (a full disk) leaves a torn record
        // without its newline, and the outcome written next lands on the
        // same line: the outcome is still read.
        let text = std::fs::read_to_string(&path).unwrap();
        let mut lines = text.lines();
        let (head, finished) = (lines.next().unwrap(), lines.next().unwrap());
        std::fs::write(
            &path,
            format!("{head}\n{{\"record\":\"event\",\"elap{finished}\n"),
        )
        .unwrap();
        let history = state.history().unwrap();
        assert_eq!(history[0].outcome, HistoryOutcome::Succeeded);
        assert_eq!(history[0].duration_ms, 1);
    }

    #[test]
    fn a_state_dir_opened_at_creates_nothing_and_reads_empty() {
        let base = tempfile::tempdir().unwrap();
        let state = StateDir::at(base.path(), "shop").unwrap();
        assert!(state.journals().unwrap().is_empty());
        assert!(state.history().unwrap().is_empty());
        assert!(state.holder().unwrap().is_none());
        assert!(!base.path().join("shop").exists());
        assert!(StateDir::at(base.path(), "../x").is_err());
    }
}
