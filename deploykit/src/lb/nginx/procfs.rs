//! The nginx master and its worker generations, read from `/proc`: how a
//! reload is confirmed and how a drain is counted. Processes are
//! identified by pid *and* start time, so a reused pid is never mistaken
//! for an old worker. Linux-only.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use tokio::time::{sleep, Instant};

use crate::error::DriverError;

/// A process identified by pid and start time (so a reused pid differs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Proc {
    pub(super) pid: u32,
    pub(super) start: u64,
}

/// The running master named in the pid file.
pub(super) fn master(pid_file: &Path) -> Result<Proc, DriverError> {
    let text = std::fs::read_to_string(pid_file).map_err(|e| {
        DriverError::new(format!(
            "nginx is not running: cannot read its pid file {}: {e}",
            pid_file.display()
        ))
    })?;
    if text.trim().is_empty() {
        // `nginx -t` creates the pid file empty when nginx is not running.
        return Err(DriverError::new(format!(
            "nginx is not running: its pid file {} is empty",
            pid_file.display()
        )));
    }
    let pid: u32 = text.trim().parse().map_err(|_| {
        DriverError::new(format!(
            "nginx pid file {} holds {:?}, not a pid",
            pid_file.display(),
            text.trim()
        ))
    })?;
    match proc_stat(pid) {
        Some(st) if st.state != 'Z' => Ok(Proc { pid, start: st.start }),
        _ => Err(DriverError::new(format!(
            "the nginx master (pid {pid} from {}) is not running",
            pid_file.display()
        ))),
    }
}

/// The master's children once it has a worker that is not shutting
/// down and the set has not changed for a moment. A master that has
/// only just started may still be forking its first workers: a reload
/// sent then would let those late workers — which route by the *old*
/// file — pass for the new generation, and the change would be
/// confirmed before it took. Bounded by the reload timeout.
pub(super) async fn settled_generation(
    master: &Proc,
    timeout: Duration,
) -> Result<BTreeSet<Proc>, DriverError> {
    const SETTLE: Duration = Duration::from_millis(20);
    let deadline = crate::wait::later(Instant::now(), timeout);
    let mut seen = children_of(master.pid);
    loop {
        sleep(SETTLE).await;
        if !is_alive(master) {
            return Err(DriverError::new(format!(
                "the nginx master (pid {}) exited before the change; nothing was changed",
                master.pid
            )));
        }
        let now = children_of(master.pid);
        let serving = now.iter().any(|p| !is_shutting_down(p.pid));
        if serving && now == seen {
            return Ok(now);
        }
        if Instant::now() >= deadline {
            let why = if serving {
                "its worker processes kept changing (workers crashing, or another reload under way)"
            } else {
                "it has no worker process; deploykit needs nginx running with `master_process on` \
                 (the default)"
            };
            return Err(DriverError::new(format!(
                "the nginx master (pid {}) had no settled worker processes within {:.1}s: {why}; \
                 nothing was changed",
                master.pid,
                timeout.as_secs_f64()
            )));
        }
        seen = now;
    }
}

/// Waits until the reload sent to `master` took: a new generation of
/// workers runs under the same master and every worker of the generation
/// `before` has exited or is shutting down. Bounded by `timeout`.
///
/// # Errors
/// The master is gone, or no new generation took over within `timeout`.
pub(super) async fn confirm_reload(
    master: &Proc,
    before: &BTreeSet<Proc>,
    timeout: Duration,
) -> Result<(), DriverError> {
    let deadline = crate::wait::later(Instant::now(), timeout);
    loop {
        if !is_alive(master) {
            return Err(DriverError::new(format!(
                "the nginx master (pid {}) is gone: the reload did not take",
                master.pid
            )));
        }
        let now = children_of(master.pid);
        let new_generation = now.iter().any(|p| !before.contains(p));
        // The master waits ~100 ms after starting the new workers before
        // it tells the old ones to quit; until then they still accept
        // and route by the old file. An old worker told to quit retitles
        // itself before it closes its listeners and idle connections.
        let old_quitting = before.iter().all(|p| !is_alive(p) || is_shutting_down(p.pid));
        if new_generation && old_quitting {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(DriverError::new(format!(
                "nginx started no new workers within {:.1}s of the reload: the reload did not take \
                 (see nginx's error log); the previous upstream file is back in place",
                timeout.as_secs_f64()
            )));
        }
        sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Debug, Clone, Copy)]
struct ProcStat {
    state: char,
    ppid: u32,
    start: u64,
}

/// `/proc/<pid>/stat`: state, parent and start time.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

fn parse_stat(text: &str) -> Option<ProcStat> {
    // The command name (field 2) is in parentheses and may contain spaces
    // and ')': the fields after the last ')' are fixed.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        ppid: f.get(1)?.parse().ok()?,
        // Field 22 overall: index 19 after the name.
        start: f.get(19)?.parse().ok()?,
    })
}

/// Whether the process is still the same, live (not zombie) process.
pub(super) fn is_alive(p: &Proc) -> bool {
    matches!(proc_stat(p.pid), Some(s) if s.start == p.start && s.state != 'Z')
}

/// Whether an nginx worker has retitled itself "worker process is shutting
/// down" (it has stopped accepting and closes idle connections).
fn is_shutting_down(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).contains("shutting down"))
        .unwrap_or(false)
}

/// Live (not zombie) children of `parent`.
fn children_of(parent: u32) -> BTreeSet<Proc> {
    let mut out = BTreeSet::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(st) = proc_stat(pid) {
            if st.ppid == parent && st.state != 'Z' {
                out.insert(Proc { pid, start: st.start });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_parses_names_with_parentheses() {
        let s = "1234 (a) b) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        let st = parse_stat(s).unwrap();
        assert_eq!((st.state, st.ppid, st.start), ('S', 1, 98765));
        let me = proc_stat(std::process::id()).unwrap();
        assert_ne!(me.state, 'Z');
    }
}
