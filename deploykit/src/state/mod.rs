//! Durable deployment state on the machine running deploykit: a lock so two
//! deployments of one application never run at once, a journal of every
//! step, the history derived from the journals, and a control file through
//! which another process promotes or aborts a running canary.
//!
//! Everything lives in one directory per application, `<base>/<app>/`:
//!
//! ```text
//! <base>/<app>/lock                  who holds the deployment lock (a flock on <base>/<app>)
//! <base>/<app>/journal/<id>.jsonl    one journal per deployment, rollback or resume
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
//!   before — what `status`, `--resume` and `rollback` read.
//! * [`HistoryEntry`] — one line of history per journal.
//! * [`ControlFile`] — promote or abort a deployment running in another
//!   process.
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
mod control;
mod journal;
mod lock;

use std::path::{Path, PathBuf};

pub use control::{ControlAck, ControlCommand, ControlFile, ControlRequest};
pub use journal::{
    FlushStats, HistoryEntry, HistoryOutcome, Journal, JournalHeader, JournalOutcome, JournalRecord,
    JournalSummary, RunKind,
};
pub use lock::{DeployLock, Holder, LockAttempt};

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
        crate::names::validate_name("app", app)?;
        let root = base.as_ref().join(app);
        let journal = root.join("journal");
        std::fs::create_dir_all(&journal)
            .map_err(|e| Error::io(format!("creating the state directory {}", journal.display()), e))?;
        Ok(Self {
            app: app.to_string(),
            root,
        })
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
    /// # Errors
    /// [`Error::Io`] when the state directory cannot be opened or locked, or
    /// the lock file recording the holder cannot be written (the lock is
    /// then not taken).
    pub fn try_lock(&self, purpose: &str) -> Result<LockAttempt> {
        lock::try_lock(&self.root, purpose)
    }

    /// Who holds the lock now, if anyone (a live holder: the lock is tested,
    /// not taken).
    ///
    /// # Errors
    /// [`Error::Io`] when the state directory cannot be opened.
    pub fn holder(&self) -> Result<Option<Holder>> {
        lock::current_holder(&self.root)
    }

    /// Starts a new journal with `header` (written and `fsync`ed before this
    /// returns).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `deployment`) when the id is not a
    /// valid name, or one with that id exists; [`Error::Io`] when it cannot
    /// be written.
    pub fn create_journal(&self, header: JournalHeader) -> Result<Journal> {
        crate::names::validate_name("deployment", &header.deployment)?;
        Journal::create(
            &self.journal_dir().join(format!("{}.jsonl", header.deployment)),
            header,
        )
    }

    /// Every journal, oldest first (by start time, then id).
    ///
    /// # Errors
    /// [`Error::Io`] when the directory cannot be listed;
    /// [`Error::Inconsistent`] when a journal has no readable header.
    pub fn journals(&self) -> Result<Vec<JournalSummary>> {
        let dir = self.journal_dir();
        let entries =
            std::fs::read_dir(&dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) == Some("jsonl") {
                out.push(JournalSummary::read(&path)?);
            }
        }
        out.sort_by(|a, b| {
            (a.header.started_at_ms, &a.header.deployment)
                .cmp(&(b.header.started_at_ms, &b.header.deployment))
        });
        Ok(out)
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
    /// # Errors
    /// As [`journals`](Self::journals).
    pub fn latest(&self) -> Result<Option<JournalSummary>> {
        Ok(self.journals()?.pop())
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

/// Milliseconds since the Unix epoch, on the wall clock.
pub(crate) fn now_ms() -> u64 {
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
        std::os::unix::fs::symlink(&victim, state.journal_dir().join("d1.jsonl")).unwrap();
        std::os::unix::fs::symlink(&created, state.journal_dir().join("d2.jsonl")).unwrap();
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
}
