//! The deployment journal: JSON lines, each `fsync`ed as it is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

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

/// Writes a journal. As an [`EventSink`] it records every event of the
/// executor; each record is written and `fsync`ed before `emit` returns, so
/// the step the event announces starts only once it is on disk.
///
/// `emit` blocks for the `fsync` (milliseconds on local disks): keep the
/// state directory on a local filesystem. A write that fails is logged and
/// counted ([`write_errors`](Self::write_errors)); it does not stop the
/// deployment, whose outcome is then reported without a complete journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    header: JournalHeader,
    file: Mutex<File>,
    records: std::sync::atomic::AtomicU64,
    write_errors: std::sync::atomic::AtomicU64,
}

impl Journal {
    pub(super) fn create(path: &Path, header: JournalHeader) -> Result<Self> {
        let mut options = OpenOptions::new();
        options.append(true).create_new(true);
        #[cfg(unix)]
        {
            // `create_new` already refuses any existing path; O_NOFOLLOW
            // states that a symlink is never written through.
            use std::os::unix::fs::OpenOptionsExt;
            options.custom_flags(libc::O_NOFOLLOW);
        }
        let file = options.open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Error::invalid(
                "deployment",
                format!(
                    "a journal {} exists already; use another deployment id",
                    path.display()
                ),
            ),
            _ => Error::io(format!("creating the journal {}", path.display()), e),
        })?;
        if let Some(dir) = path.parent() {
            // Make the new file's directory entry durable too.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io(format!("syncing {}", dir.display()), e))?;
        }
        let journal = Self {
            path: path.to_path_buf(),
            header: header.clone(),
            file: Mutex::new(file),
            records: Default::default(),
            write_errors: Default::default(),
        };
        journal
            .write(&JournalRecord::Header(header))
            .map_err(|e| Error::io(format!("writing the journal {}", path.display()), e))?;
        Ok(journal)
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header written first.
    pub fn header(&self) -> &JournalHeader {
        &self.header
    }

    /// Records written so far (the header counts).
    pub fn records(&self) -> u64 {
        self.records.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records that could not be written.
    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn write(&self, record: &JournalRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().expect("journal poisoned");
        file.write_all(&line)?;
        file.sync_data()?;
        self.records.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// Writes the outcome: the run is over.
    ///
    /// # Errors
    /// [`Error::Io`] when it cannot be written.
    pub fn finish(&self, outcome: JournalOutcome) -> Result<()> {
        self.write(&JournalRecord::Finished(outcome))
            .map_err(|e| Error::io(format!("writing the journal {}", self.path.display()), e))
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

impl EventSink for Journal {
    fn emit(&self, event: &Event) {
        if let Err(e) = self.write(&JournalRecord::Event(event.clone())) {
            self.write_errors
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(journal = %self.path.display(), error = %e, "cannot write the journal");
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
            release: h.release.clone(),
            outcome,
            started_at_ms: h.started_at_ms,
            duration_ms,
            reason,
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
