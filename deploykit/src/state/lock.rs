//! The deployment lock.
//!
//! The lock is an advisory `flock` on the application's state directory
//! itself (`<base>/<app>`), not on a file in it. A file's name can be
//! removed or replaced while its lock is held, and the next process would
//! then lock a new file and run beside the first; the directory cannot be
//! replaced that way, because it is never empty (it holds `journal/`), so
//! every process that writes journals there locks the same inode. Only
//! removing or renaming the whole state directory gets around it, and that
//! removes the running deployment's journal too. The directory must be on a
//! local filesystem: NFS emulates `flock` with byte-range locks, which a
//! directory opened read-only cannot take, so locking fails there with an
//! error rather than silently.
//!
//! The holder (pid, host, start time, purpose) is recorded in the file
//! `lock` inside the directory, written only while the directory lock is
//! held: it says who holds the lock, it is not the lock. A missing or
//! unreadable record makes the holder "unknown", never the lock free.

use std::fmt;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Who holds (or held) the deployment lock, as recorded in the lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The holder's process id.
    pub pid: u32,
    /// The process's start time in clock ticks since boot (field 22 of
    /// `/proc/<pid>/stat`), so a reused pid is not taken for the holder.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// The machine it runs on.
    pub host: String,
    /// When it took the lock, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// What it is doing (`deploy v2`, `rollback`).
    pub purpose: String,
}

impl Holder {
    pub(crate) fn me(purpose: &str) -> Self {
        let pid = std::process::id();
        Self {
            pid,
            pid_start: process_start(pid),
            host: super::host_name(),
            started_at_ms: super::now_ms(),
            purpose: purpose.to_string(),
        }
    }

    /// Whether the recorded process still runs: `Some(true|false)` on this
    /// host, `None` when it is on another host (deploykit cannot tell).
    pub fn is_alive(&self) -> Option<bool> {
        if self.host != super::host_name() {
            return None;
        }
        match (process_start(self.pid), self.pid_start) {
            (None, _) => Some(false),
            (Some(now), Some(then)) => Some(now == then),
            (Some(_), None) => Some(true),
        }
    }
}

impl fmt::Display for Holder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.pid == 0 {
            // No record to show: pid 0 and 1970 would only mislead.
            return write!(f, "an unknown process ({})", self.purpose);
        }
        let secs = self.started_at_ms / 1000;
        write!(
            f,
            "pid {} on {} ({}), started at {} (unix time {secs})",
            self.pid,
            self.host,
            self.purpose,
            format_utc(secs)
        )
    }
}

/// The result of [`StateDir::try_lock`](super::StateDir::try_lock).
#[derive(Debug)]
pub enum LockAttempt {
    /// The lock is ours until the [`DeployLock`] is dropped.
    Acquired {
        /// The lock.
        lock: DeployLock,
        /// A holder recorded by a process that died without releasing the
        /// lock cleanly (a crash, `kill -9`): its deployment was
        /// interrupted, and its journal says how far it got.
        stale: Option<Holder>,
    },
    /// Another process holds the lock.
    Held(Holder),
}

/// The deployment lock of one application: held while the value lives.
/// Dropping it clears the holder record and releases the lock; a process
/// that dies releases it too (the kernel drops the `flock`), leaving its
/// record behind as evidence.
#[derive(Debug)]
pub struct DeployLock {
    /// The state directory, `flock`ed: the lock itself.
    dir: File,
    /// The holder record.
    file: File,
    path: PathBuf,
    holder: Holder,
}

impl DeployLock {
    /// The holder record written into the lock file (this process).
    pub fn holder(&self) -> &Holder {
        &self.holder
    }

    /// The file recording the holder; the lock itself is a `flock` on the
    /// state directory ([`StateDir::root`](super::StateDir::root)), so
    /// removing this file does not release it.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for DeployLock {
    fn drop(&mut self) {
        // A clean release leaves an empty file: a record found later means
        // its holder died holding it.
        let _ = self.file.set_len(0);
        let _ = self.file.sync_all();
        let _ = self.dir.unlock();
    }
}

/// The name of the holder record inside the state directory.
const RECORD: &str = "lock";

fn open_dir(dir: &Path) -> Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_DIRECTORY);
    }
    options
        .open(dir)
        .map_err(|e| Error::io(format!("opening the state directory {}", dir.display()), e))
}

/// Options that never follow a symlink at the last component: a link
/// planted at `lock` would otherwise have its target truncated (or, if
/// dangling, created).
fn no_follow(options: &mut OpenOptions) -> &mut OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    options
}

/// Opens the holder record for rewriting, creating it if needed; only
/// called with the directory lock held.
///
/// # Errors
/// [`Error::Refused`] when `path` is a symbolic link, [`Error::Io`] when it
/// cannot be opened.
fn open_record(path: &Path) -> Result<File> {
    no_follow(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false),
    )
    .open(path)
    .map_err(|e| {
        #[cfg(unix)]
        if e.raw_os_error() == Some(libc::ELOOP) {
            return Error::Refused(format!(
                "the lock file {} is a symbolic link, and deploykit never writes its state through a link \
                     (it would overwrite the link's target); remove it and run the command again",
                path.display()
            ));
        }
        Error::io(format!("opening the lock file {}", path.display()), e)
    })
}

/// The holder recorded at `path`, if there is a readable record (a symlink
/// is not one).
fn read_record(path: &Path) -> Option<Holder> {
    read_holder(&mut no_follow(OpenOptions::new().read(true)).open(path).ok()?)
}

fn read_holder(file: &mut File) -> Option<Holder> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.trim()).ok()
}

/// The holder reported when the lock is held but its record is missing or
/// unreadable (removed by hand, or not written yet).
fn unknown_holder() -> Holder {
    Holder {
        pid: 0,
        pid_start: None,
        host: "unknown".into(),
        started_at_ms: 0,
        purpose: "the lock file recording the holder is missing or not written yet".into(),
    }
}

/// Takes the lock on the state directory `dir` and records the holder in
/// `dir/lock`.
pub(super) fn try_lock(dir: &Path, purpose: &str) -> Result<LockAttempt> {
    let locked = open_dir(dir)?;
    let path = dir.join(RECORD);
    match locked.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Ok(LockAttempt::Held(
                read_record(&path).unwrap_or_else(unknown_holder),
            ));
        }
        Err(TryLockError::Error(e)) => {
            return Err(Error::io(
                format!("locking the state directory {}", dir.display()),
                e,
            ));
        }
    }
    // From here an error drops `locked`, which closes it and releases the lock.
    let mut file = open_record(&path)?;
    let stale = read_holder(&mut file);
    let holder = Holder::me(purpose);
    let bytes = serde_json::to_vec(&holder).expect("a holder serializes");
    let write = (|| {
        file.set_len(0)?;
        file.seek(SeekFrom::Start(0))?;
        file.write_all(&bytes)?;
        file.write_all(b"\n")?;
        file.sync_all()
    })();
    write.map_err(|e| Error::io(format!("writing the lock file {}", path.display()), e))?;
    if let Some(s) = &stale {
        tracing::info!(holder = %s, "took over a stale deployment lock: its holder died without releasing it");
    }
    Ok(LockAttempt::Acquired {
        lock: DeployLock {
            dir: locked,
            file,
            path,
            holder,
        },
        stale,
    })
}

/// Who holds the lock on the state directory `dir`, testing the lock
/// without keeping it and without writing anything.
pub(super) fn current_holder(dir: &Path) -> Result<Option<Holder>> {
    let locked = open_dir(dir)?;
    match locked.try_lock() {
        Ok(()) => {
            let _ = locked.unlock();
            Ok(None)
        }
        Err(TryLockError::WouldBlock) => Ok(Some(
            read_record(&dir.join(RECORD)).unwrap_or_else(unknown_holder),
        )),
        Err(TryLockError::Error(e)) => Err(Error::io(format!("testing the lock on {}", dir.display()), e)),
    }
}

/// The start time of `pid` in clock ticks since boot, `None` when no such
/// process runs (or it is a zombie).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split
    // after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// `YYYY-MM-DD HH:MM:SS UTC` for Unix seconds.
pub(crate) fn format_utc(secs: u64) -> String {
    format!("{} UTC", utc_datetime(secs))
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for Unix seconds (civil-from-days, Howard
/// Hinnant's algorithm), for times a person reads.
pub fn utc_datetime(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(format_utc(951_825_600), "2000-02-29 12:00:00 UTC");
        assert_eq!(utc_datetime(1_798_761_599), "2026-12-31 23:59:59");
    }

    #[test]
    fn second_lock_is_refused_naming_the_holder_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let LockAttempt::Acquired { lock, stale } = try_lock(dir.path(), "deploy v2").unwrap() else {
            panic!("first lock refused")
        };
        assert!(stale.is_none());
        match try_lock(dir.path(), "deploy v3").unwrap() {
            LockAttempt::Held(h) => {
                assert_eq!(h.pid, std::process::id());
                assert_eq!(h.purpose, "deploy v2");
                assert_eq!(h.is_alive(), Some(true));
                let text = h.to_string();
                assert!(
                    text.contains(&format!("pid {}", std::process::id())) && text.contains("UTC"),
                    "{text}"
                );
            }
            LockAttempt::Acquired { .. } => panic!("second lock granted"),
        }
        assert_eq!(current_holder(dir.path()).unwrap().unwrap().purpose, "deploy v2");
        drop(lock);
        assert_eq!(current_holder(dir.path()).unwrap(), None);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        let LockAttempt::Acquired { stale, .. } = try_lock(dir.path(), "deploy v3").unwrap() else {
            panic!("lock not granted after release")
        };
        assert!(stale.is_none(), "a cleanly released lock is not stale");
    }

    #[test]
    fn removing_or_replacing_the_lock_file_does_not_release_the_lock() {
        let base = tempfile::tempdir().unwrap();
        let state = crate::state::StateDir::open(base.path(), "shop").unwrap();
        let LockAttempt::Acquired { lock, .. } = state.try_lock("deploy v2").unwrap() else {
            panic!("first lock refused")
        };
        let file = state.root().join("lock");
        std::fs::remove_file(&file).unwrap();
        match state.try_lock("rollback").unwrap() {
            LockAttempt::Held(h) => assert_eq!(
                h.to_string(),
                "an unknown process (the lock file recording the holder is missing or not written yet)"
            ),
            LockAttempt::Acquired { .. } => {
                panic!("a second lock was granted after the lock file was removed")
            }
        }
        std::fs::write(&file, "").unwrap();
        assert!(
            matches!(state.try_lock("rollback").unwrap(), LockAttempt::Held(_)),
            "a second lock was granted on a new lock file"
        );
        assert!(state.holder().unwrap().is_some());
        drop(lock);
        assert_eq!(state.holder().unwrap(), None);
        assert!(matches!(
            state.try_lock("rollback").unwrap(),
            LockAttempt::Acquired { .. }
        ));
    }

    #[cfg(unix)]
    #[test]
    fn a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched() {
        let base = tempfile::tempdir().unwrap();
        let state = crate::state::StateDir::open(base.path(), "shop").unwrap();
        let victim = base.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let file = state.root().join("lock");
        std::os::unix::fs::symlink(&victim, &file).unwrap();
        let e = state.try_lock("deploy v2").unwrap_err().to_string();
        assert!(
            e.contains(&file.display().to_string()) && e.contains("symbolic link") && e.contains("remove it"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // A dangling link would create its target: refused too.
        let created = base.path().join("created-through-link");
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&created, &file).unwrap();
        assert!(state.try_lock("deploy v2").is_err());
        assert!(!created.exists());
        // Reading who holds the lock does not go through the link either.
        assert_eq!(state.holder().unwrap(), None);
        assert!(!created.exists());
    }

    #[test]
    fn a_record_left_by_a_dead_process_is_reported_stale() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        // A holder record whose flock is gone (its process died): pid 1's
        // start time never matches this made-up one.
        let dead = Holder {
            pid: 1,
            pid_start: Some(u64::MAX),
            host: crate::state::host_name(),
            started_at_ms: 1_700_000_000_000,
            purpose: "deploy v2".into(),
        };
        assert_eq!(dead.is_alive(), Some(false));
        std::fs::write(&path, serde_json::to_string(&dead).unwrap()).unwrap();
        let LockAttempt::Acquired { stale, lock } = try_lock(dir.path(), "rollback").unwrap() else {
            panic!("a stale lock must be taken over")
        };
        assert_eq!(stale, Some(dead));
        assert_eq!(lock.holder().purpose, "rollback");
        let remote = Holder {
            host: "some-other-host.invalid".into(),
            ..lock.holder().clone()
        };
        assert_eq!(remote.is_alive(), None);
    }
}
