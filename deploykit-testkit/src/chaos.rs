//! [`FakeFaults`]: the network faults of a chaos drill, in memory, seen by
//! [`FakeMetrics`](crate::FakeMetrics) through
//! [`FakeMetrics::with_faults`](crate::FakeMetrics::with_faults).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deploykit::chaos::{Fault, FaultInjector};
use deploykit::{Backend, DriverError, Group, InstanceId};

/// A [`FaultInjector`] that remembers which faults are active on which
/// instance, and what was ever injected. Cheap to clone.
///
/// Its effect on metrics is the simplest that makes a gate fire: while an
/// `http-error` fault of `p` % is active on an instance of a group, the
/// group's error rate rises by `p / 100` times the share of the group's
/// faulted instances that [`FakeMetrics::with_faults`](crate::FakeMetrics::with_faults)
/// is told about; a latency fault adds its delay to the group's p99; a
/// bandwidth fault adds the time an answer of
/// [`with_answer_bytes`](Self::with_answer_bytes) bytes takes at its rate
/// (nothing unless told: the fake cannot know how big the answers are).
#[derive(Debug, Clone, Default)]
pub struct FakeFaults {
    active: Arc<Mutex<Vec<(Backend, Fault)>>>,
    history: Arc<Mutex<Vec<(InstanceId, Fault)>>>,
    answer_bytes: u64,
}

impl FakeFaults {
    /// No fault active.
    pub fn new() -> Self {
        Self::default()
    }

    /// The answers whose p99 a bandwidth fault slows are `bytes` long.
    pub fn with_answer_bytes(mut self, bytes: u64) -> Self {
        self.answer_bytes = bytes;
        self
    }

    /// The active faults: instance and fault.
    pub fn active(&self) -> Vec<(InstanceId, Fault)> {
        let a = self.active.lock().expect("fake faults poisoned");
        a.iter().map(|(b, f)| (b.id.clone(), *f)).collect()
    }

    /// Every injection so far, in order.
    pub fn injected(&self) -> Vec<(InstanceId, Fault)> {
        self.history.lock().expect("fake faults poisoned").clone()
    }

    /// The error rate added to `group` when it has `instances` instances.
    pub fn added_error_rate(&self, group: &Group, instances: usize) -> f64 {
        let a = self.active.lock().expect("fake faults poisoned");
        let sum: f64 = a
            .iter()
            .filter(|(b, _)| &b.group == group)
            .map(|(_, f)| match f {
                Fault::HttpError { percent, .. } => f64::from(*percent) / 100.0,
                Fault::Reset { percent } => f64::from(*percent) / 100.0,
                Fault::Timeout { .. } => 1.0,
                _ => 0.0,
            })
            .sum();
        (sum / instances.max(1) as f64).min(1.0)
    }

    /// The latency added to `group`'s p99.
    pub fn added_latency(&self, group: &Group) -> Duration {
        let a = self.active.lock().expect("fake faults poisoned");
        a.iter()
            .filter(|(b, _)| &b.group == group)
            .map(|(_, f)| match f {
                Fault::Latency { delay, jitter, .. } => *delay + *jitter,
                Fault::Bandwidth { rate, .. } => {
                    Duration::from_secs_f64(self.answer_bytes as f64 / rate.bytes_per_second().max(1) as f64)
                }
                _ => Duration::ZERO,
            })
            .max()
            .unwrap_or_default()
    }
}

#[async_trait]
impl FaultInjector for FakeFaults {
    async fn inject(&self, instance: &Backend, fault: &Fault) -> Result<(), DriverError> {
        let mut a = self.active.lock().expect("fake faults poisoned");
        if !a.iter().any(|(b, f)| b.id == instance.id && f == fault) {
            a.push((instance.clone(), *fault));
            self.history
                .lock()
                .expect("fake faults poisoned")
                .push((instance.id.clone(), *fault));
        }
        Ok(())
    }

    async fn clear(&self, instance: &Backend, fault: &Fault) -> Result<(), DriverError> {
        let mut a = self.active.lock().expect("fake faults poisoned");
        a.retain(|(b, f)| !(b.id == instance.id && f == fault));
        Ok(())
    }
}
