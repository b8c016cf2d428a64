//! A fake [`LiveStore`]: the blue-green live record in memory, with
//! scriptable load and save failures.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use deploykit::bluegreen_state::{LiveRecord, LiveStore};
use deploykit::{DriverError, Group};

use crate::fleet::{scripted_error, Fault};

#[derive(Debug, Default)]
struct StoreState {
    record: Option<LiveRecord>,
    saves: Vec<LiveRecord>,
    save_calls: u32,
    save_faults: Vec<Fault>,
    fail_load: bool,
}

/// An in-memory [`LiveStore`] with scriptable failures. Cheap to clone;
/// clones share the record.
#[derive(Debug, Clone, Default)]
pub struct FakeLiveStore {
    state: Arc<Mutex<StoreState>>,
}

impl FakeLiveStore {
    /// An empty store (nothing recorded).
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that already records `live` as live.
    pub fn recording(live: &str) -> Self {
        let s = Self::new();
        s.state.lock().expect("poisoned").record =
            Some(LiveRecord::live(Group::new(live).expect("valid group")));
        s
    }

    /// A store that records `live` as live and a switch to `to` under way.
    pub fn recording_switch(live: &str, to: &str) -> Self {
        let s = Self::new();
        s.state.lock().expect("poisoned").record = Some(LiveRecord::switching(
            Group::new(live).expect("valid group"),
            Group::new(to).expect("valid group"),
        ));
        s
    }

    /// Saves fail as scripted (`OnCall`, `FromCall`, `Always`, `Transient`
    /// count save calls; release faults never fire).
    pub fn fail_save(self, fault: Fault) -> Self {
        self.state.lock().expect("poisoned").save_faults.push(fault);
        self
    }

    /// Removes every scripted fault (the disk has space again).
    pub fn heal(&self) {
        let mut s = self.state.lock().expect("poisoned");
        s.save_faults.clear();
        s.fail_load = false;
    }

    /// Loads fail (an unreadable record).
    pub fn fail_load(self) -> Self {
        self.state.lock().expect("poisoned").fail_load = true;
        self
    }

    /// The record now.
    pub fn record(&self) -> Option<LiveRecord> {
        self.state.lock().expect("poisoned").record.clone()
    }

    /// The live environment recorded now.
    pub fn live(&self) -> Option<Group> {
        self.record().map(|r| r.live)
    }

    /// Every record saved successfully, in order.
    pub fn saves(&self) -> Vec<LiveRecord> {
        self.state.lock().expect("poisoned").saves.clone()
    }
}

#[async_trait]
impl LiveStore for FakeLiveStore {
    fn describe(&self) -> String {
        "fake live store".into()
    }

    async fn load(&self) -> Result<Option<LiveRecord>, DriverError> {
        let s = self.state.lock().expect("poisoned");
        if s.fail_load {
            return Err(DriverError::new("scripted load fault: the record cannot be read"));
        }
        Ok(s.record.clone())
    }

    async fn save(&self, record: &LiveRecord) -> Result<(), DriverError> {
        let mut s = self.state.lock().expect("poisoned");
        s.save_calls += 1;
        let n = s.save_calls;
        if let Some(transient) = s.save_faults.iter().find_map(|f| f.fires_on_call(n)) {
            let msg = format!("scripted save fault on call {n}: disk full");
            return Err(scripted_error(transient, msg));
        }
        s.record = Some(record.clone());
        s.saves.push(record.clone());
        Ok(())
    }
}
