//! Manual promotion of a canary: the handle an embedding program holds to
//! let a waiting stage go on (or, by not promoting in time, roll it back).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where a deployment waiting for promotion stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PromotionState {
    /// The canary stage (1-based) waiting for a promotion, if one is.
    pub waiting: Option<usize>,
    /// Promotions delivered so far.
    pub promotions: u64,
    /// Whether [`PromotionHandle::abort`] was called.
    pub aborted: bool,
}

/// Promotes or aborts a canary deployment from outside the executor: a
/// terminal command, an HTTP endpoint, a chat bot. Cheap to clone; every
/// clone controls the same deployment(s).
///
/// Give it to the executor with
/// [`ExecutorBuilder::promotion`](crate::ExecutorBuilder::promotion). When a
/// plan pauses for manual promotion (a [`Step::AwaitPromotion`](crate::Step)),
/// [`promote`](Self::promote) lets it go on to the next stage;
/// [`abort`](Self::abort), at any moment, cancels the deployment, which then
/// rolls back.
///
/// ```
/// use deploykit::PromotionHandle;
/// let handle = PromotionHandle::new();
/// // Nothing is waiting yet: a promotion is not stored for later.
/// assert!(!handle.promote());
/// assert_eq!(handle.state().waiting, None);
/// ```
#[derive(Debug, Clone)]
pub struct PromotionHandle {
    state: Arc<watch::Sender<PromotionState>>,
    cancel: Arc<Mutex<Vec<CancellationToken>>>,
    approved: Arc<Mutex<BTreeSet<usize>>>,
}

impl Default for PromotionHandle {
    fn default() -> Self {
        Self::new()
    }
}

impl PromotionHandle {
    /// A handle with nothing waiting.
    pub fn new() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(PromotionState::default())),
            cancel: Arc::default(),
            approved: Arc::default(),
        }
    }

    /// Approves `stage` before it waits: its next wait is promoted as soon
    /// as it is announced. This is how a resumed deployment honours a
    /// promotion recorded while no process ran it
    /// ([`StateBackend::record_promotion`](crate::state::StateBackend::record_promotion));
    /// other stages still wait, and an abort still wins.
    pub fn approve(&self, stage: usize) {
        self.approved
            .lock()
            .expect("promotion handle poisoned")
            .insert(stage);
    }

    /// Promotes the stage that is waiting. Returns `false` (and does
    /// nothing) when no stage is waiting: a promotion is never stored to
    /// skip a later pause.
    pub fn promote(&self) -> bool {
        let mut promoted = false;
        self.state.send_if_modified(|s| {
            if s.waiting.is_some() && !s.aborted {
                s.promotions += 1;
                promoted = true;
            }
            promoted
        });
        promoted
    }

    /// Aborts: cancels every deployment this handle was given to (they roll
    /// back), now or — if none runs yet — as soon as one is built with it.
    pub fn abort(&self) {
        self.state.send_modify(|s| s.aborted = true);
        for t in self.cancel.lock().expect("promotion handle poisoned").iter() {
            t.cancel();
        }
    }

    /// The current state.
    pub fn state(&self) -> PromotionState {
        *self.state.borrow()
    }

    /// Waits until a stage waits for promotion and returns its number
    /// (1-based); at once if one already waits.
    pub async fn wait_for_pause(&self) -> usize {
        let mut rx = self.state.subscribe();
        loop {
            if let Some(stage) = rx.borrow_and_update().waiting {
                return stage;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`; this cannot happen.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Links the handle's abort to an executor's cancellation token.
    pub(crate) fn attach(&self, token: CancellationToken) {
        if self.state().aborted {
            token.cancel();
        }
        self.cancel.lock().expect("promotion handle poisoned").push(token);
    }

    /// Marks `stage` as waiting and returns a receiver plus the promotion
    /// count to wait beyond.
    pub(crate) fn begin_wait(&self, stage: usize) -> (watch::Receiver<PromotionState>, u64) {
        let mut seen = 0;
        let approved = self
            .approved
            .lock()
            .expect("promotion handle poisoned")
            .remove(&stage);
        self.state.send_modify(|s| {
            s.waiting = Some(stage);
            seen = s.promotions;
            if approved && !s.aborted {
                s.promotions += 1;
            }
        });
        (self.state.subscribe(), seen)
    }

    /// Marks no stage as waiting.
    pub(crate) fn end_wait(&self) {
        self.state.send_modify(|s| s.waiting = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn promote_only_while_waiting_and_abort_cancels() {
        let h = PromotionHandle::new();
        assert!(!h.promote());
        let (mut rx, seen) = h.begin_wait(2);
        assert_eq!(h.clone().wait_for_pause().await, 2);
        assert!(h.promote());
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow().promotions, seen + 1);
        h.end_wait();
        assert!(!h.promote());
        let token = CancellationToken::new();
        h.attach(token.clone());
        assert!(!token.is_cancelled());
        h.abort();
        assert!(token.is_cancelled());
        // Attached after the abort: cancelled at once.
        let late = CancellationToken::new();
        h.attach(late.clone());
        assert!(late.is_cancelled());
    }

    #[test]
    fn an_approved_stage_is_promoted_once_when_it_waits() {
        let approved = PromotionHandle::new();
        approved.approve(2);
        let (rx, seen) = approved.begin_wait(1);
        assert_eq!(rx.borrow().promotions, seen, "only the approved stage goes on");
        approved.end_wait();
        let (rx, seen) = approved.begin_wait(2);
        assert_eq!(rx.borrow().promotions, seen + 1);
        approved.end_wait();
        let (rx, seen) = approved.begin_wait(2);
        assert_eq!(rx.borrow().promotions, seen, "an approval is used once");
        drop(rx);
    }
}
