//! Promote or abort a deployment running in another process.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::atomic::write_atomic;
use crate::error::{Error, Result};
use crate::promotion::PromotionHandle;

/// A command for a running deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlCommand {
    /// Promote the canary stage that waits.
    Promote,
    /// Abort the deployment (it rolls back).
    Abort,
}

/// The command last sent, as kept in `control.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlRequest {
    /// Increases with every command sent.
    pub seq: u64,
    /// The deployment it is meant for.
    pub deployment: String,
    /// What to do.
    pub command: ControlCommand,
    /// The stage a promotion approves when it was recorded while no
    /// process ran the deployment (see
    /// [`ControlFile::record_promotion`]); `None` for a request to a
    /// running deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<usize>,
}

impl ControlRequest {
    /// The stage this request approves for a later `deploy --resume` of
    /// `deployment`: a promotion recorded for it while no process ran.
    pub fn recorded_promotion(&self, deployment: &str) -> Option<usize> {
        match (self.command, self.stage) {
            (ControlCommand::Promote, Some(stage)) if self.deployment == deployment => Some(stage),
            _ => None,
        }
    }
}

/// What the running deployment did with a command, kept in
/// `control-ack.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlAck {
    /// The request's `seq`.
    pub seq: u64,
    /// `promoted`, `not_waiting` (no stage waited: nothing done) or
    /// `aborted`.
    pub result: String,
}

/// The control file of an application's state directory: a one-slot
/// mailbox, written atomically, that a running deployment polls.
///
/// The sender ([`send`](Self::send)) writes a numbered request; the
/// deployment's watcher ([`watch`](Self::watch)) applies each new request
/// meant for it to its [`PromotionHandle`] and writes an acknowledgement the
/// sender can wait for ([`wait_ack`](Self::wait_ack)). Two senders racing
/// may both pick the same number; the later write wins and the other is
/// never acknowledged (it times out), so nothing is applied twice.
#[derive(Debug, Clone)]
pub struct ControlFile {
    request: PathBuf,
    ack: PathBuf,
}

impl ControlFile {
    pub(super) fn new(root: &Path) -> Self {
        Self {
            request: root.join("control.json"),
            ack: root.join("control-ack.json"),
        }
    }

    fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// The last request written, if any.
    pub fn last_request(&self) -> Option<ControlRequest> {
        Self::read(&self.request)
    }

    /// Sends `command` to the deployment `deployment`; returns the request
    /// number to wait for.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn send(&self, deployment: &str, command: ControlCommand) -> Result<u64> {
        self.write(deployment, command, None)
    }

    /// Records a promotion of `stage` for `deployment`, which no process
    /// runs: the request stays in the file (a running deployment's watch
    /// never replays it) until the next request replaces it, and a
    /// `deploy --resume` of `deployment` reads it
    /// ([`recorded_promotion`](Self::recorded_promotion)). Call it under
    /// the state lock, so no resume starts between the check that the
    /// deployment waits and the write.
    ///
    /// # Errors
    /// [`Error::Io`] when the file cannot be written.
    pub fn record_promotion(&self, deployment: &str, stage: usize) -> Result<u64> {
        self.write(deployment, ControlCommand::Promote, Some(stage))
    }

    /// The stage a promotion recorded for `deployment` while no process
    /// ran approves, if the last request is one.
    pub fn recorded_promotion(&self, deployment: &str) -> Option<usize> {
        self.last_request()?.recorded_promotion(deployment)
    }

    fn write(&self, deployment: &str, command: ControlCommand, stage: Option<usize>) -> Result<u64> {
        let seq = self.last_request().map(|r| r.seq).unwrap_or(0) + 1;
        let req = ControlRequest {
            seq,
            deployment: deployment.to_string(),
            command,
            stage,
        };
        let bytes = serde_json::to_vec(&req).expect("a request serializes");
        write_atomic(&self.request, &bytes)
            .map_err(|e| Error::io(format!("writing {}", self.request.display()), e))?;
        Ok(seq)
    }

    /// Waits (polling every 100 ms, at most `timeout`) for the
    /// acknowledgement of request `seq`.
    pub async fn wait_ack(&self, seq: u64, timeout: Duration) -> Option<ControlAck> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ack) = Self::read::<ControlAck>(&self.ack) {
                if ack.seq == seq {
                    return Some(ack);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls the file every `every` and applies each new request for
    /// `deployment` to `handle`, acknowledging it. Requests written before
    /// the watch began are ignored. Runs until the task is aborted.
    pub fn watch(
        &self,
        deployment: String,
        handle: PromotionHandle,
        every: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let mut seen = this.last_request().map(|r| r.seq).unwrap_or(0);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(req) = this.last_request() else { continue };
                if req.seq <= seen {
                    continue;
                }
                seen = req.seq;
                if req.deployment != deployment {
                    continue;
                }
                let result = match req.command {
                    ControlCommand::Promote if handle.promote() => "promoted",
                    ControlCommand::Promote => "not_waiting",
                    ControlCommand::Abort => {
                        handle.abort();
                        "aborted"
                    }
                };
                tracing::info!(seq = req.seq, command = ?req.command, result, "control request applied");
                let ack = ControlAck {
                    seq: req.seq,
                    result: result.into(),
                };
                let bytes = serde_json::to_vec(&ack).expect("an ack serializes");
                if let Err(e) = write_atomic(&this.ack, &bytes) {
                    tracing::warn!(error = %e, "cannot write the control acknowledgement");
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_promotion_sent_through_the_file_reaches_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlFile::new(dir.path());
        // A request from before the watch is not replayed.
        control.send("d1", ControlCommand::Abort).unwrap();
        let handle = PromotionHandle::new();
        let task = control.watch("d1".into(), handle.clone(), Duration::from_millis(10));
        let (_rx, _) = handle.begin_wait(2);
        let seq = control.send("d1", ControlCommand::Promote).unwrap();
        assert_eq!(seq, 2);
        let ack = control.wait_ack(seq, Duration::from_secs(10)).await.unwrap();
        assert_eq!(ack.result, "promoted");
        assert_eq!(handle.state().promotions, 1);
        assert!(!handle.state().aborted);
        // A request for another deployment is not applied.
        let other = control.send("d0", ControlCommand::Abort).unwrap();
        assert!(control
            .wait_ack(other, Duration::from_millis(300))
            .await
            .is_none());
        assert!(!handle.state().aborted);
        let seq = control.send("d1", ControlCommand::Abort).unwrap();
        assert_eq!(
            control
                .wait_ack(seq, Duration::from_secs(10))
                .await
                .unwrap()
                .result,
            "aborted"
        );
        assert!(handle.state().aborted);
        task.abort();
    }

    #[tokio::test]
    async fn a_recorded_promotion_stays_for_its_deployment_and_is_never_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlFile::new(dir.path());
        assert_eq!(control.recorded_promotion("d1"), None);
        // A promotion sent to a running deployment is no record for a resume.
        control.send("d1", ControlCommand::Promote).unwrap();
        assert_eq!(control.recorded_promotion("d1"), None);
        let seq = control.record_promotion("d1", 1).unwrap();
        assert_eq!(seq, 2);
        assert_eq!(control.recorded_promotion("d1"), Some(1));
        assert_eq!(control.recorded_promotion("d0"), None);
        // The resumed run's watch does not apply it a second time.
        let handle = PromotionHandle::new();
        let task = control.watch("d1".into(), handle.clone(), Duration::from_millis(10));
        let (_rx, _) = handle.begin_wait(1);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(handle.state().promotions, 0);
        assert!(control.wait_ack(seq, Duration::from_millis(100)).await.is_none());
        task.abort();
        // A later request replaces the record.
        control.send("d1", ControlCommand::Abort).unwrap();
        assert_eq!(control.recorded_promotion("d1"), None);
    }
}
