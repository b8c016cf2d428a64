//! The simulated instances' state as one append-only log per fleet,
//! `<state>/simulated/instances.log`: one JSON line per changed instance
//! (`{"id":"web-1","release":"v2","installed":["v1","v2"],"running":true}`),
//! the last line of an id wins.
//!
//! Why a log: replacing a file per change (write, then `rename`) cost about
//! 0.9 ms per change on ext4, three changes per instance, so 10,000
//! instances spent ~27 s renaming; appending the lines of a whole batch is
//! one `write`.
//!
//! Guarantees: a call returns once its line has been written (`O_APPEND`,
//! no `fsync`), so the state survives a killed `deploykit` process but not
//! a power cut, as the per-instance files did. A process killed in the
//! middle of a `write` can leave a last line without its newline: readers
//! ignore it (the change it carried never returned to its caller). A
//! corrupt line before the last is an error naming its line. The first
//! write of each process compacts the log (one line per instance, written
//! to a temporary file renamed over the log), which also drops a torn last
//! line before anything is appended after it; reading never writes, so a
//! read-only command touches nothing.
//!
//! Changes are written together, as the journal's group commit: a call
//! queues its change and waits; one writer applies every change queued
//! meanwhile, appends one line per changed instance in one `write`, and
//! answers the calls together, so a batch's steps go on together and
//! their journal records share a flush.
//!
//! Older versions kept `<state>/simulated/<id>.json` per instance: an id
//! the log does not know is read from there, and the next compaction moves
//! it into the log and removes the file.
//!
//! Assumption: one process writes at a time (the state directory's lock),
//! as for every other state file.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use deploykit::{DriverError, ReleaseId};

use crate::sim::SimInstanceState;

/// The log's file name in the simulated state directory.
pub(crate) const LOG_FILE: &str = "instances.log";

/// One line of the log as written: an instance's whole state.
#[derive(serde::Serialize)]
struct LineOut<'a> {
    id: &'a str,
    release: &'a Option<ReleaseId>,
    installed: &'a [ReleaseId],
    running: bool,
}

/// One line of the log as read.
#[derive(serde::Deserialize)]
struct LineIn {
    id: String,
    release: Option<ReleaseId>,
    installed: Vec<ReleaseId>,
    running: bool,
}

/// A change to one instance's state; an `Err` refuses it (the state keeps
/// what the changes before it made).
type Change = Box<dyn FnOnce(&mut SimInstanceState) -> Result<(), DriverError> + Send>;

/// A queued change and where to answer its call.
struct Pending {
    id: String,
    change: Change,
    answer: tokio::sync::oneshot::Sender<Result<(), DriverError>>,
}

/// What the log holds in memory.
struct Inner {
    /// The folded state once read; `None` for an id known to have none.
    fleet: Option<HashMap<String, Option<SimInstanceState>>>,
    /// Ids read from an old per-instance file, removed at compaction.
    imported: Vec<String>,
    /// The log open for appending, once this process has compacted it.
    file: Option<Arc<std::fs::File>>,
    pending: Vec<Pending>,
    writing: bool,
    /// Changes ever queued, so that a test can wait until all its calls have.
    #[cfg(test)]
    queued: usize,
    /// Rounds of the writer, so that a test can count them.
    #[cfg(test)]
    rounds: usize,
}

struct Shared {
    dir: PathBuf,
    inner: std::sync::Mutex<Inner>,
    /// Held by a test to keep the writer waiting before it writes.
    #[cfg(test)]
    gate: tokio::sync::Mutex<()>,
}

/// The state log of one simulated fleet: cheap to clone, every clone
/// shares the state, the queue and the writer.
#[derive(Clone)]
pub(crate) struct FleetLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for FleetLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLog")
            .field("dir", &self.shared.dir)
            .finish_non_exhaustive()
    }
}

fn corrupt(path: &Path, line: usize, e: serde_json::Error) -> DriverError {
    DriverError::new(format!(
        "{} is corrupt at line {line}; remove the file to start the simulated fleet afresh",
        path.display()
    ))
    .with_source(e)
}

/// Folds the log's bytes: the last line of each id wins, a last line
/// without its newline (a write cut by a kill) is ignored.
fn fold(path: &Path, bytes: &[u8]) -> Result<HashMap<String, Option<SimInstanceState>>, DriverError> {
    let complete = match bytes.iter().rposition(|b| *b == b'\n') {
        Some(end) => &bytes[..=end],
        None => &[][..],
    };
    let mut fleet = HashMap::new();
    for (n, line) in complete.split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let line: LineIn = serde_json::from_slice(line).map_err(|e| corrupt(path, n + 1, e))?;
        let state = SimInstanceState {
            release: line.release,
            installed: line.installed,
            running: line.running,
        };
        fleet.insert(line.id, Some(state));
    }
    Ok(fleet)
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is consistent between statements, so a panic elsewhere
        // while it was held does not make it unusable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// The folded state, read from the log on first use.
    fn loaded<'a>(
        &self,
        inner: &'a mut Inner,
    ) -> Result<&'a mut HashMap<String, Option<SimInstanceState>>, DriverError> {
        if inner.fleet.is_none() {
            let path = self.path();
            let fleet = match std::fs::read(&path) {
                Ok(bytes) => fold(&path, &bytes)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
                Err(e) => {
                    return Err(DriverError::new(format!("cannot read {}", path.display())).with_source(e))
                }
            };
            inner.fleet = Some(fleet);
        }
        Ok(inner.fleet.as_mut().expect("loaded above"))
    }

    /// `id`'s state: from the log, else from an older version's file.
    fn state(&self, inner: &mut Inner, id: &str) -> Result<SimInstanceState, DriverError> {
        let fleet = self.loaded(inner)?;
        if let Some(known) = fleet.get(id) {
            return Ok(known.clone().unwrap_or_default());
        }
        let legacy = self.dir.join(format!("{id}.json"));
        let found =
            match std::fs::read(&legacy) {
                Ok(b) => Some(serde_json::from_slice::<SimInstanceState>(&b).map_err(|e| {
                    DriverError::new(format!("{} is corrupt", legacy.display())).with_source(e)
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(DriverError::new(format!("cannot read {}", legacy.display())).with_source(e))
                }
            };
        fleet.insert(id.to_owned(), found.clone());
        if found.is_some() {
            inner.imported.push(id.to_owned());
        }
        Ok(found.unwrap_or_default())
    }

    /// Rewrites the log with one line per instance and opens it for
    /// appending; removes the older files it took in.
    fn compact(&self, inner: &mut Inner) -> Result<Arc<std::fs::File>, DriverError> {
        let path = self.path();
        let fleet = self.loaded(inner)?;
        let mut ids: Vec<&String> = fleet
            .iter()
            .filter(|(_, s)| s.is_some())
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        let mut bytes = Vec::with_capacity(ids.len() * 80);
        for id in ids {
            if let Some(state) = &fleet[id] {
                push_line(&mut bytes, id, state);
            }
        }
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| DriverError::new(format!("cannot create {}", self.dir.display())).with_source(e))?;
        deploykit::state::write_atomic_unsynced(&path, &bytes)
            .map_err(|e| DriverError::new(format!("cannot write {}", path.display())).with_source(e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| DriverError::new(format!("cannot open {}", path.display())).with_source(e))?;
        for id in std::mem::take(&mut inner.imported) {
            // Left behind, it is only shadowed by the log: harmless.
            let _ = std::fs::remove_file(self.dir.join(format!("{id}.json")));
        }
        let file = Arc::new(file);
        inner.file = Some(file.clone());
        Ok(file)
    }
}

fn push_line(bytes: &mut Vec<u8>, id: &str, state: &SimInstanceState) {
    let line = LineOut {
        id,
        release: &state.release,
        installed: &state.installed,
        running: state.running,
    };
    serde_json::to_writer(&mut *bytes, &line).expect("state serializes");
    bytes.push(b'\n');
}

impl FleetLog {
    /// The log of the fleet whose simulated state lives in `dir`; touches
    /// nothing until the first read.
    pub(crate) fn new(dir: &Path) -> Self {
        Self {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                inner: std::sync::Mutex::new(Inner {
                    fleet: None,
                    imported: Vec::new(),
                    file: None,
                    pending: Vec::new(),
                    writing: false,
                    #[cfg(test)]
                    queued: 0,
                    #[cfg(test)]
                    rounds: 0,
                }),
                #[cfg(test)]
                gate: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// `id`'s state as its last returned change left it (the default for
    /// an instance never changed). Writes nothing.
    pub(crate) fn state(&self, id: &str) -> Result<SimInstanceState, DriverError> {
        let mut inner = self.shared.lock();
        self.shared.state(&mut inner, id)
    }

    /// Queues `change` to `id`'s state and returns once a write that
    /// includes it has been appended (or the change refused itself). A
    /// failed write fails every change it carried and leaves the state as
    /// it was (the next write compacts the log first, dropping any part of
    /// the failed one). A call dropped while waiting may still have its
    /// change written.
    pub(crate) async fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut SimInstanceState) -> Result<(), DriverError> + Send + 'static,
    ) -> Result<(), DriverError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let start_writer = {
            let mut inner = self.shared.lock();
            inner.pending.push(Pending {
                id: id.to_owned(),
                change: Box::new(change),
                answer,
            });
            #[cfg(test)]
            {
                inner.queued += 1;
            }
            !std::mem::replace(&mut inner.writing, true)
        };
        if start_writer {
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || write_pending(&shared));
        }
        answered.await.unwrap_or_else(|_| {
            Err(DriverError::new(format!(
                "the simulated state of {id} was not written: its writer stopped"
            )))
        })
    }
}

/// A call to answer, and its answer.
type Answer = (
    tokio::sync::oneshot::Sender<Result<(), DriverError>>,
    Result<(), DriverError>,
);

/// The writer: takes every queued change, appends them in one write,
/// answers, and goes on until nothing is queued.
fn write_pending(shared: &Shared) {
    // A panic while writing would leave `writing` set and every later call
    // waiting: the queued calls are answered (their senders dropped) instead.
    struct OnPanic<'a>(&'a Shared);
    impl Drop for OnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let mut inner = self.0.lock();
                inner.pending.clear();
                inner.writing = false;
            }
        }
    }
    let _on_panic = OnPanic(shared);
    loop {
        #[cfg(test)]
        let _gate = shared.gate.blocking_lock();
        let answers = write_round(shared);
        for (answer, result) in answers {
            // A call that gave up waiting has dropped its receiver.
            let _ = answer.send(result);
        }
        if stop_if_idle(shared) {
            return;
        }
    }
}

/// Whether the queue is empty, in which case the writer stops.
fn stop_if_idle(shared: &Shared) -> bool {
    let mut inner = shared.lock();
    if inner.pending.is_empty() {
        inner.writing = false;
        return true;
    }
    false
}

/// One round: applies the queued changes, appends a line per changed
/// instance, and returns the answers.
fn write_round(shared: &Shared) -> Vec<Answer> {
    let mut inner = shared.lock();
    let round = std::mem::take(&mut inner.pending);
    #[cfg(test)]
    {
        inner.rounds += 1;
    }
    let mut answers = Vec::with_capacity(round.len());
    // The new state of each changed instance, and whether a change to it
    // was accepted (only those are written).
    let mut changed: Vec<(String, SimInstanceState, bool)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut accepted = Vec::with_capacity(round.len());
    for p in round {
        let at = match index.get(&p.id) {
            Some(at) => *at,
            None => match shared.state(&mut inner, &p.id) {
                Ok(s) => {
                    changed.push((p.id.clone(), s, false));
                    index.insert(p.id.clone(), changed.len() - 1);
                    changed.len() - 1
                }
                Err(e) => {
                    answers.push((p.answer, Err(e)));
                    continue;
                }
            },
        };
        let before = changed[at].1.clone();
        match (p.change)(&mut changed[at].1) {
            Ok(()) => {
                changed[at].2 = true;
                accepted.push(p.answer);
            }
            Err(e) => {
                changed[at].1 = before;
                answers.push((p.answer, Err(e)));
            }
        }
    }
    if accepted.is_empty() {
        return answers;
    }
    let mut bytes = Vec::with_capacity(changed.len() * 80);
    for (id, state, _) in changed.iter().filter(|c| c.2) {
        push_line(&mut bytes, id, state);
    }
    let file = match inner.file.clone() {
        Some(f) => Ok(f),
        None => shared.compact(&mut inner),
    };
    // The write runs without the lock, so that reads (health probes) do
    // not wait for it; this writer is the only one, so nothing changes
    // the state meanwhile.
    drop(inner);
    let path = shared.path();
    let result = file.and_then(|f| {
        (&*f)
            .write_all(&bytes)
            .map_err(|e| DriverError::new(format!("cannot append to {}", path.display())).with_source(e))
    });
    let mut inner = shared.lock();
    match &result {
        Ok(()) => {
            let fleet = inner.fleet.as_mut().expect("loaded by the round");
            for (id, state, _) in changed.into_iter().filter(|c| c.2) {
                fleet.insert(id, Some(state));
            }
        }
        // Part of the round may be in the file: the next round compacts
        // from the state in memory, which the round did not change.
        Err(_) => inner.file = None,
    }
    drop(inner);
    let failure = result.as_ref().err().map(|e| {
        (
            e.to_string(),
            std::error::Error::source(e).map(ToString::to_string),
        )
    });
    answers.extend(accepted.into_iter().map(|a| {
        let r = match &failure {
            None => Ok(()),
            Some((message, cause)) => {
                let e = DriverError::new(message.clone());
                Err(match cause {
                    Some(c) => e.with_source(std::io::Error::other(c.clone())),
                    None => e,
                })
            }
        };
        (a, r)
    }));
    answers
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploykit::ReleaseId;

    fn v(s: &str) -> ReleaseId {
        ReleaseId::new(s).expect("release")
    }

    fn install(
        release: &str,
    ) -> impl FnOnce(&mut SimInstanceState) -> Result<(), DriverError> + Send + 'static {
        let r = v(release);
        move |s| {
            if !s.installed.contains(&r) {
                s.installed.push(r.clone());
            }
            s.release = Some(r);
            Ok(())
        }
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join(LOG_FILE))
            .expect("log")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_change_is_in_the_file_when_its_call_returns_and_the_last_line_wins() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = FleetLog::new(dir.path());
        log.update("web-1", install("v1")).await.expect("install");
        log.update("web-1", |s| {
            s.running = true;
            Ok(())
        })
        .await
        .expect("start");
        log.update("web-1", install("v2")).await.expect("install");
        // A fresh reader (another process) folds the file to the last state.
        let other = FleetLog::new(dir.path());
        let s = other.state("web-1").expect("state");
        assert_eq!(s.release, Some(v("v2")));
        assert_eq!(s.installed, [v("v1"), v("v2")]);
        assert!(s.running);
        assert_eq!(lines(dir.path()).len(), 3, "appended, not rewritten");
        assert_eq!(other.state("web-9").expect("state"), SimInstanceState::default());
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_a_corrupt_earlier_line_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(LOG_FILE);
        let whole = "{\"id\":\"web-1\",\"release\":\"v1\",\"installed\":[\"v1\"],\"running\":true}\n";
        std::fs::write(
            &path,
            format!("{whole}{{\"id\":\"web-1\",\"release\":\"v2\",\"inst"),
        )
        .expect("write");
        let s = FleetLog::new(dir.path())
            .state("web-1")
            .expect("torn tail ignored");
        assert_eq!(s.release, Some(v("v1")));
        std::fs::write(&path, format!("{{\"id\":\"web-1\",\"rel\n{whole}")).expect("write");
        let e = FleetLog::new(dir.path())
            .state("web-1")
            .expect_err("corrupt line 1");
        assert!(
            e.to_string().contains("instances.log is corrupt at line 1"),
            "{e}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_write_compacts_the_log_and_drops_a_torn_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = FleetLog::new(dir.path());
        for r in ["v1", "v2", "v3"] {
            log.update("web-1", install(r)).await.expect("install");
            log.update("web-2", install(r)).await.expect("install");
        }
        assert_eq!(lines(dir.path()).len(), 6);
        // A kill in the middle of a write.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .expect("open");
        f.write_all(b"{\"id\":\"web-1\",\"rele").expect("torn");
        // The next process: its first write compacts (one line per
        // instance, the torn bytes gone), then appends.
        let next = FleetLog::new(dir.path());
        next.update("web-2", |s| {
            s.running = true;
            Ok(())
        })
        .await
        .expect("start");
        let after = lines(dir.path());
        assert_eq!(after.len(), 3, "{after:?}");
        assert!(
            after[0].starts_with("{\"id\":\"web-1\"") && after[0].contains("\"v3\""),
            "{after:?}"
        );
        assert!(after[2].contains("\"running\":true"), "{after:?}");
        let s = FleetLog::new(dir.path()).state("web-1").expect("state");
        assert_eq!(s.installed, [v("v1"), v("v2"), v("v3")]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_changes_share_one_append_keep_their_order_and_refusals_fail_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = FleetLog::new(dir.path());
        log.update("web-0", install("v0")).await.expect("first write");
        let gate = log.shared.gate.lock().await;
        let mut calls = Vec::new();
        for i in 0..100 {
            let log = log.clone();
            let id = format!("web-{i}");
            calls.push(tokio::spawn(async move {
                log.update(&id, install("v1")).await?;
                // Queued after the install of the same instance: applied after it.
                log.update(&id, |s| {
                    if s.release.is_none() {
                        return Err(DriverError::new("no release installed"));
                    }
                    s.running = true;
                    Ok(())
                })
                .await
            }));
        }
        let refused = {
            let log = log.clone();
            tokio::spawn(async move { log.update("web-7", |_| Err(DriverError::new("refused"))).await })
        };
        while log.shared.lock().queued < 1 + 100 + 1 {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let rounds_before = log.shared.lock().rounds;
        drop(gate);
        assert_eq!(
            refused.await.expect("joined").expect_err("refused").to_string(),
            "refused"
        );
        for c in calls {
            c.await.expect("joined").expect("install then start");
        }
        assert!(log.shared.lock().rounds > rounds_before);
        let other = FleetLog::new(dir.path());
        for i in 0..100 {
            let s = other.state(&format!("web-{i}")).expect("state");
            assert_eq!(s.release, Some(v("v1")), "web-{i}");
            assert!(s.running, "web-{i}");
        }
        // Every line whole; the 100 installs (and the refusal, which wrote
        // nothing) were one append made before any start was queued, a line
        // per instance; then the 100 starts.
        let all = lines(dir.path());
        assert_eq!(all.len(), 1 + 100 + 100, "{all:#?}");
        for (n, line) in all.iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a whole JSON line");
            assert_eq!(v["running"], n > 100, "line {n}: {line}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_to_one_instance_in_one_round_apply_in_queue_order_as_one_line() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = FleetLog::new(dir.path());
        log.update("web-0", install("v0")).await.expect("first write");
        let gate = log.shared.gate.lock().await;
        let mut calls = Vec::new();
        for (n, r) in ["v1", "v2", "v3"].into_iter().enumerate() {
            let log2 = log.clone();
            calls.push(tokio::spawn(
                async move { log2.update("web-1", install(r)).await },
            ));
            while log.shared.lock().queued < 1 + n + 1 {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        drop(gate);
        for c in calls {
            c.await.expect("joined").expect("install");
        }
        let s = FleetLog::new(dir.path()).state("web-1").expect("state");
        assert_eq!(s.release, Some(v("v3")), "the last queued wins");
        assert_eq!(s.installed, [v("v1"), v("v2"), v("v3")], "applied in queue order");
        assert_eq!(lines(dir.path()).len(), 2, "one line for the round");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_older_per_instance_file_is_read_then_moved_into_the_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let old = dir.path().join("web-3.json");
        std::fs::write(
            &old,
            b"{\"release\":\"v1\",\"installed\":[\"v1\"],\"running\":true}",
        )
        .expect("old file");
        let log = FleetLog::new(dir.path());
        assert_eq!(log.state("web-3").expect("state").release, Some(v("v1")));
        assert!(!dir.path().join(LOG_FILE).exists(), "reading writes nothing");
        log.update("web-3", install("v2")).await.expect("install");
        assert!(!old.exists(), "moved into the log");
        let s = FleetLog::new(dir.path()).state("web-3").expect("state");
        assert_eq!(s.installed, [v("v1"), v("v2")]);
        assert!(s.running);
    }
}
