//! Waiting for a condition: one poll loop, bounded by the caller.
//!
//! Every wait in deploykit has the same shape — ask, and if the answer is
//! not yet the one wanted, sleep and ask again until a bound is reached or
//! the deployment is cancelled. [`poll_until`] is that loop, written once,
//! so each caller only says what to ask ([`ControlFlow::Break`] when done,
//! [`ControlFlow::Continue`] with what it saw otherwise) and how long to try.
//!
//! The probe is always asked at least once, even when the bound has already
//! passed: a wait of zero still looks once, as an operator expects.
//!
//! A hold that checks as it goes (a canary stage: wait the whole time, fail
//! at the first bad check) is the other shape; [`every`] runs it on a fixed
//! schedule.

use std::future::Future;
use std::ops::ControlFlow;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long [`poll_until`] keeps asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bound {
    /// Until this instant; the last sleep is shortened so a probe runs
    /// right at the deadline.
    Deadline(Instant),
    /// At most this many probes (at least one is made), `interval` apart.
    Probes(u32),
}

impl Bound {
    /// A deadline `after` from now.
    pub(crate) fn after(after: Duration) -> Self {
        Bound::Deadline(later(Instant::now(), after))
    }
}

/// `at + d`, or an instant a century away when that does not fit: a wait
/// that long never ends on its own anyway, and adding must not panic.
pub(crate) fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .unwrap_or_else(|| at + Duration::from_secs(100 * 365 * 24 * 60 * 60))
}

/// Why [`poll_until`] stopped without the probe saying done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum WaitError<L> {
    /// The token was cancelled during a sleep.
    Cancelled {
        /// Probes made.
        probes: u32,
    },
    /// The bound was reached; `last` is what the last probe saw.
    Exhausted {
        /// Probes made.
        probes: u32,
        /// What the last probe returned.
        last: L,
    },
}

/// A probe's value and how many probes it took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Waited<T> {
    /// What the probe returned when done.
    pub(crate) value: T,
    /// Probes made, the last included.
    pub(crate) probes: u32,
}

/// Asks `probe` until it breaks, then every `interval` until `bound` (with a
/// deadline, at least 1 ms apart so the clock moves); sleeps end early when `cancel` (if any) is cancelled. A probe
/// already running is never interrupted: bound each probe yourself (a
/// driver timeout), so one slow answer cannot outlive the wait by much.
pub(crate) async fn poll_until<T, L, F, Fut>(
    bound: Bound,
    interval: Duration,
    cancel: Option<&CancellationToken>,
    mut probe: F,
) -> Result<Waited<T>, WaitError<L>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ControlFlow<T, L>>,
{
    let mut probes = 0u32;
    loop {
        probes += 1;
        let last = match probe().await {
            ControlFlow::Break(value) => return Ok(Waited { value, probes }),
            ControlFlow::Continue(last) => last,
        };
        let wait = match bound {
            Bound::Deadline(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return Err(WaitError::Exhausted { probes, last });
                }
                interval.max(Duration::from_millis(1)).min(deadline - now)
            }
            Bound::Probes(max) if probes >= max => return Err(WaitError::Exhausted { probes, last }),
            Bound::Probes(_) => interval,
        };
        if !sleep(wait, cancel).await {
            return Err(WaitError::Cancelled { probes });
        }
    }
}

/// Calls `tick` on a fixed schedule — `interval` after `start`, then every
/// `interval`, the last call exactly at `start + duration` — with the time
/// elapsed since `start`, until `duration` is over or `tick` breaks (its
/// value is returned). For a hold that checks as it goes (a canary stage)
/// rather than a wait for a condition: the schedule does not drift when a
/// tick takes time. `Err(())` when `cancel` ended a sleep.
pub(crate) async fn every<T, F, Fut>(
    start: Instant,
    duration: Duration,
    interval: Duration,
    cancel: Option<&CancellationToken>,
    mut tick: F,
) -> Result<Option<T>, ()>
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = ControlFlow<T>>,
{
    let interval = interval.max(Duration::from_millis(1));
    let mut elapsed = Duration::ZERO;
    while elapsed < duration {
        let next = elapsed.saturating_add(interval).min(duration);
        let slept = match cancel {
            None => {
                tokio::time::sleep_until(later(start, next)).await;
                true
            }
            Some(c) => tokio::select! {
                _ = tokio::time::sleep_until(later(start, next)) => true,
                _ = c.cancelled() => false,
            },
        };
        if !slept {
            return Err(());
        }
        elapsed = next;
        if let ControlFlow::Break(v) = tick(elapsed).await {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// Sleeps for `d` unless `cancel` is cancelled first; `true` when it slept
/// the whole time.
pub(crate) async fn sleep(d: Duration, cancel: Option<&CancellationToken>) -> bool {
    match cancel {
        None => {
            tokio::time::sleep(d).await;
            true
        }
        Some(c) => tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = c.cancelled() => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn returns_the_first_ready_value_and_counts_probes() {
        let n = Cell::new(0);
        let start = Instant::now();
        let r = poll_until(
            Bound::after(Duration::from_secs(60)),
            Duration::from_secs(5),
            None,
            || {
                n.set(n.get() + 1);
                let k = n.get();
                async move {
                    if k == 3 {
                        ControlFlow::Break("ready")
                    } else {
                        ControlFlow::Continue(k)
                    }
                }
            },
        )
        .await;
        assert_eq!(
            r,
            Ok(Waited {
                value: "ready",
                probes: 3
            })
        );
        assert_eq!(start.elapsed(), Duration::from_secs(10), "two sleeps of 5 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_shortens_the_last_sleep_and_probes_at_the_deadline() {
        let start = Instant::now();
        let seen = std::cell::RefCell::new(Vec::new());
        let r: Result<Waited<()>, _> = poll_until(
            Bound::after(Duration::from_secs(12)),
            Duration::from_secs(5),
            None,
            || {
                seen.borrow_mut().push(start.elapsed().as_secs());
                async { ControlFlow::Continue("not yet") }
            },
        )
        .await;
        assert_eq!(
            r,
            Err(WaitError::Exhausted {
                probes: 4,
                last: "not yet"
            })
        );
        assert_eq!(*seen.borrow(), [0, 5, 10, 12]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_bound_still_probes_once() {
        let r: Result<Waited<()>, _> = poll_until(
            Bound::after(Duration::ZERO),
            Duration::from_secs(1),
            None,
            || async { ControlFlow::Continue(7) },
        )
        .await;
        assert_eq!(r, Err(WaitError::Exhausted { probes: 1, last: 7 }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_bound_makes_that_many_probes_an_interval_apart() {
        let start = Instant::now();
        let r: Result<Waited<()>, _> =
            poll_until(Bound::Probes(3), Duration::from_secs(10), None, || async {
                ControlFlow::Continue(())
            })
            .await;
        assert_eq!(r, Err(WaitError::Exhausted { probes: 3, last: () }));
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(20),
            "no sleep after the last probe"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_ends_the_sleep_at_once() {
        let token = CancellationToken::new();
        let start = Instant::now();
        let canceller = {
            let token = token.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                token.cancel();
            })
        };
        let r: Result<Waited<()>, WaitError<()>> = poll_until(
            Bound::after(Duration::from_secs(600)),
            Duration::from_secs(60),
            Some(&token),
            || async { ControlFlow::Continue(()) },
        )
        .await;
        canceller.await.unwrap();
        assert_eq!(r, Err(WaitError::Cancelled { probes: 1 }));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn every_ticks_on_a_fixed_schedule_that_ends_at_the_duration() {
        let start = Instant::now();
        let seen = std::cell::RefCell::new(Vec::new());
        let r: Result<Option<()>, ()> = every(
            start,
            Duration::from_secs(25),
            Duration::from_secs(10),
            None,
            |elapsed| {
                seen.borrow_mut()
                    .push((elapsed.as_secs(), start.elapsed().as_secs()));
                async {
                    // A slow tick does not push the next one back.
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    ControlFlow::Continue(())
                }
            },
        )
        .await;
        assert_eq!(r, Ok(None));
        assert_eq!(*seen.borrow(), [(10, 10), (20, 20), (25, 25)]);
    }

    #[tokio::test(start_paused = true)]
    async fn every_stops_at_the_first_break_or_cancellation() {
        let start = Instant::now();
        let r = every(
            start,
            Duration::from_secs(60),
            Duration::from_secs(10),
            None,
            |elapsed| async move {
                if elapsed >= Duration::from_secs(20) {
                    ControlFlow::Break(elapsed.as_secs())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .await;
        assert_eq!(r, Ok(Some(20)));
        let token = CancellationToken::new();
        token.cancel();
        let r: Result<Option<()>, ()> = every(
            Instant::now(),
            Duration::from_secs(60),
            Duration::from_secs(10),
            Some(&token),
            |_| async { ControlFlow::Continue(()) },
        )
        .await;
        assert_eq!(r, Err(()));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_token_a_sleep_is_not_cancellable() {
        assert!(sleep(Duration::from_secs(1), None).await);
        let token = CancellationToken::new();
        token.cancel();
        assert!(!sleep(Duration::from_secs(1), Some(&token)).await);
    }
}
