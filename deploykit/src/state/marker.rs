//! Deployment markers on instances: which deployment holds an instance.
//!
//! The [lock](super::DeployLock) keeps two deployments of one state
//! directory apart; two copies of a configuration with different state
//! directories each take their own lock and could change the same
//! instances at once. So a deployment also writes a marker on every
//! instance (through [`Instance::set_marker`]) before its first step and
//! removes it at the end; another state directory finding a marker refuses
//! before touching anything, naming the holder.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::lock::Holder;
use super::StateDir;
use crate::error::{DriverError, Error, Result};
use crate::names::InstanceId;
use crate::traits::Instance;

/// What a marker on an instance records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceMarker {
    /// The deployment (or rollback) holding the instance.
    pub deployment: String,
    /// Its state directory (`<base>/<app>`), absolute when it could be
    /// resolved.
    pub state_dir: PathBuf,
    /// Its process, as in the lock file.
    pub holder: Holder,
}

impl InstanceMarker {
    /// A marker for `deployment`, run by the holder of `state`'s lock.
    pub fn new(deployment: impl Into<String>, state: &StateDir, holder: &Holder) -> Self {
        Self {
            deployment: deployment.into(),
            state_dir: canonical(state),
            holder: holder.clone(),
        }
    }

    /// A marker for `deployment`, run by `holder` of the state that
    /// `identity` names: the same on every machine sharing that state (an
    /// [`StateBackend::identity`](super::StateBackend::identity)), so a run
    /// from another machine with the same shared state finishes it.
    pub fn for_state(deployment: impl Into<String>, identity: PathBuf, holder: &Holder) -> Self {
        Self {
            deployment: deployment.into(),
            state_dir: identity,
            holder: holder.clone(),
        }
    }

    /// Whether the marker was written from `state` (whose lock the caller
    /// holds, so its deployment is over or is the caller's).
    pub fn is_from(&self, state: &StateDir) -> bool {
        self.state_dir == canonical(state)
    }
}

fn canonical(state: &StateDir) -> PathBuf {
    std::fs::canonicalize(state.root()).unwrap_or_else(|_| state.root().to_path_buf())
}

/// Why [`claim`] refused.
#[derive(Debug)]
pub enum ClaimRefused {
    /// Another state directory's deployment holds `instance`.
    Held {
        /// The instance.
        instance: InstanceId,
        /// Its marker.
        marker: InstanceMarker,
        /// Whether that deployment's process runs: `Some(true)` can never
        /// be taken over; `Some(false)` (it died) and `None` (on another
        /// machine) can, with `take_over`.
        alive: Option<bool>,
    },
    /// The marker on `instance` is not one deploykit wrote.
    Unreadable {
        /// The instance.
        instance: InstanceId,
        /// The marker's text (shortened).
        text: String,
    },
}

impl std::fmt::Display for ClaimRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClaimRefused::Held {
                instance,
                marker,
                alive,
            } => {
                write!(
                    f,
                    "instance {instance} is held by deployment {} of the state directory {} ({})",
                    marker.deployment,
                    marker.state_dir.display(),
                    marker.holder
                )?;
                match alive {
                    Some(true) => write!(f, ", which is running; wait for it to finish"),
                    Some(false) => write!(
                        f,
                        ", whose process is gone; finish it from that state directory (`deploykit deploy --resume` or \
                         `rollback` with its configuration), or take the instances over with `--take-over`"
                    ),
                    None => write!(
                        f,
                        ", on another machine; make sure it is not running, then take the instances over with `--take-over`"
                    ),
                }
            }
            ClaimRefused::Unreadable { instance, text } => write!(
                f,
                "instance {instance} has a deployment marker deploykit cannot read ({text:?}); \
                 take the instances over with `--take-over` if no other deployment runs"
            ),
        }
    }
}

/// Marks every instance as held by `mine`, unless another state directory's
/// deployment holds one: then nothing is written and the first such holder
/// is returned. A marker of `mine`'s own state directory (left by a run
/// that died) is replaced; so is any dead or unknown holder's when
/// `take_over` is set. A live holder is never taken over.
///
/// # Errors
/// [`Error::Driver`] when a marker cannot be read or written; the markers
/// already written are removed again (best effort).
pub async fn claim(
    instances: &[Arc<dyn Instance>],
    state: &StateDir,
    mine: &InstanceMarker,
    take_over: bool,
) -> Result<std::result::Result<(), ClaimRefused>> {
    claim_for(instances, &canonical(state), mine, take_over).await
}

/// As [`claim`], for the state named `identity` (see
/// [`InstanceMarker::for_state`]): a marker naming `identity` is this
/// state's own.
///
/// # Errors
/// As [`claim`].
pub async fn claim_for(
    instances: &[Arc<dyn Instance>],
    identity: &std::path::Path,
    mine: &InstanceMarker,
    take_over: bool,
) -> Result<std::result::Result<(), ClaimRefused>> {
    let found = futures::future::join_all(instances.iter().map(|i| i.marker())).await;
    for (inst, found) in instances.iter().zip(found) {
        let Some(text) = found? else { continue };
        let instance = inst.backend().id.clone();
        match serde_json::from_str::<InstanceMarker>(&text) {
            Ok(m) if m.state_dir == identity => {}
            Ok(marker) => {
                let alive = marker.holder.is_alive();
                if alive == Some(true) || !take_over {
                    return Ok(Err(ClaimRefused::Held {
                        instance,
                        marker,
                        alive,
                    }));
                }
                tracing::warn!(%instance, deployment = %marker.deployment, "taking over an instance held by a deployment that is not running");
            }
            Err(_) if take_over => {}
            Err(_) => {
                return Ok(Err(ClaimRefused::Unreadable {
                    instance,
                    text: text.chars().take(80).collect(),
                }))
            }
        }
    }
    let text = serde_json::to_string(mine).expect("a marker serializes");
    let written = futures::future::join_all(instances.iter().map(|i| i.set_marker(Some(&text)))).await;
    if let Some(e) = written.into_iter().find_map(|r| r.err()) {
        release(instances, mine).await;
        return Err(Error::Driver(e));
    }
    Ok(Ok(()))
}

/// Removes `mine`'s markers (only those naming its deployment). Never
/// fails: a marker that cannot be removed is logged, and the next run from
/// the same state directory replaces it.
pub async fn release(instances: &[Arc<dyn Instance>], mine: &InstanceMarker) {
    let done = futures::future::join_all(instances.iter().map(|i| async move {
        let ours = match i.marker().await? {
            Some(text) => serde_json::from_str::<InstanceMarker>(&text)
                .is_ok_and(|m| m.deployment == mine.deployment && m.state_dir == mine.state_dir),
            None => false,
        };
        if ours {
            i.set_marker(None).await?;
        }
        Ok::<(), DriverError>(())
    }))
    .await;
    for (i, r) in instances.iter().zip(done) {
        if let Err(e) = r {
            tracing::warn!(instance = %i.backend().id, error = %e, "cannot remove the deployment marker");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::names::{Address, Group, ReleaseId};
    use crate::traits::{Backend, Health};

    /// An instance that only keeps a marker.
    #[derive(Debug)]
    struct Marked {
        backend: Backend,
        marker: Mutex<Option<String>>,
    }

    fn marked(id: &str) -> Arc<Marked> {
        Arc::new(Marked {
            backend: Backend {
                id: InstanceId::new(id).unwrap(),
                address: Address::parse("127.0.0.1:9").unwrap(),
                group: Group::default_group(),
            },
            marker: Mutex::new(None),
        })
    }

    #[async_trait]
    impl Instance for Marked {
        fn backend(&self) -> &Backend {
            &self.backend
        }
        async fn current_release(&self) -> Result<Option<ReleaseId>, DriverError> {
            Ok(None)
        }
        async fn stop(&self) -> Result<(), DriverError> {
            Ok(())
        }
        async fn force_stop(&self) -> Result<(), DriverError> {
            Ok(())
        }
        async fn install(&self, _: &ReleaseId) -> Result<(), DriverError> {
            Ok(())
        }
        async fn restore(&self, _: &ReleaseId) -> Result<(), DriverError> {
            Ok(())
        }
        async fn start(&self) -> Result<(), DriverError> {
            Ok(())
        }
        async fn health(&self) -> Result<Health, DriverError> {
            Ok(Health::Healthy)
        }
        async fn marker(&self) -> Result<Option<String>, DriverError> {
            Ok(self.marker.lock().unwrap().clone())
        }
        async fn set_marker(&self, marker: Option<&str>) -> Result<(), DriverError> {
            *self.marker.lock().unwrap() = marker.map(str::to_string);
            Ok(())
        }
    }

    fn holder(pid: u32) -> Holder {
        serde_json::from_value(serde_json::json!({
            "pid": pid, "host": super::super::host_name(), "started_at_ms": 1, "purpose": "deploy v2"
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn another_state_dirs_live_holder_is_refused_a_dead_one_only_without_take_over() {
        let base = tempfile::tempdir().unwrap();
        let (a, b) = (
            StateDir::open(base.path(), "shop").unwrap(),
            StateDir::open(base.path().join("copy"), "shop").unwrap(),
        );
        let (one, two) = (marked("i-1"), marked("i-2"));
        let fleet: Vec<Arc<dyn Instance>> = vec![one.clone(), two.clone()];
        let live = InstanceMarker::new("d-a", &a, &holder(std::process::id()));
        claim(&fleet, &a, &live, false).await.unwrap().unwrap();
        assert!(one.marker.lock().unwrap().as_deref().unwrap().contains("d-a"));

        let theirs = InstanceMarker::new("d-b", &b, &holder(std::process::id()));
        for take_over in [false, true] {
            let refused = claim(&fleet, &b, &theirs, take_over).await.unwrap().unwrap_err();
            assert!(
                matches!(
                    &refused,
                    ClaimRefused::Held {
                        alive: Some(true),
                        ..
                    }
                ),
                "{refused}"
            );
            assert!(refused.to_string().contains("d-a") && refused.to_string().contains("running"));
        }
        assert!(
            two.marker.lock().unwrap().as_deref().unwrap().contains("d-a"),
            "nothing written"
        );

        // The same state directory replaces its own marker (its lock is held).
        let again = InstanceMarker::new("d-a2", &a, &holder(std::process::id()));
        claim(&fleet, &a, &again, false).await.unwrap().unwrap();
        // A dead holder: no process has the largest pid.
        let dead = InstanceMarker::new("d-dead", &a, &holder(u32::MAX));
        let text = serde_json::to_string(&dead).unwrap();
        one.set_marker(Some(&text)).await.unwrap();
        two.set_marker(Some(&text)).await.unwrap();
        let refused = claim(&fleet, &b, &theirs, false).await.unwrap().unwrap_err();
        assert!(refused.to_string().contains("--take-over"), "{refused}");
        claim(&fleet, &b, &theirs, true).await.unwrap().unwrap();
        // Release removes only the markers naming this deployment.
        one.set_marker(Some(&text)).await.unwrap();
        release(&fleet, &theirs).await;
        assert!(one.marker.lock().unwrap().is_some());
        assert!(two.marker.lock().unwrap().is_none());
    }
}
