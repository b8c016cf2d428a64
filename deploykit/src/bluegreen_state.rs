//! Durable blue-green state: which environment is live (the first one when
//! nothing is recorded), and the
//! reconciliation of that record with what the load balancer routes to.
//!
//! The record is a small JSON document:
//!
//! ```json
//! {"version":1,"live":"blue","switching_to":"green"}
//! ```
//!
//! `switching_to` is written *before* a switch and cleared by the record
//! written after it, so a deployment that stops between the switch and the
//! record (a crash, a full disk) leaves evidence of what it was doing. On
//! start, [`reconcile`] compares the record with
//! [`LoadBalancer::live_group`]:
//!
//! | record | load balancer says | result |
//! | --- | --- | --- |
//! | none | cannot tell | the first environment (blue) |
//! | none | `g` | `g` (recorded) |
//! | `live: a` | cannot tell, no switch pending | `a` |
//! | `live: a`, switching to `b` | cannot tell | **refused**: nobody knows whether the switch happened |
//! | `live: a` | `a` | `a` (a pending switch that did not happen is cleared) |
//! | `live: a`, switching to `b` | `b` | `b` (the switch happened; recorded) |
//! | `live: a`, no switch to `b` pending | `b` | **refused**: someone changed one of the two |
//! | any | a group that is no environment | **refused** |
//!
//! A refusal is [`Error::Inconsistent`] naming both sides and the fix
//! ([`adopt`] records what the operator says is right).
//!
//! [`FileLiveStore`] keeps the record in a file written atomically: a
//! temporary file in the same directory, `fsync`, `rename` over the old one,
//! `fsync` of the directory. A reader sees the old or the new record, never
//! a torn one, also after a power cut.

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{DriverError, Error, Result};
use crate::names::Group;
use crate::traits::LoadBalancer;

/// What is recorded about the blue-green environments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveRecord {
    /// Format version (1).
    #[serde(default = "one")]
    pub version: u32,
    /// The environment that receives all traffic.
    pub live: Group,
    /// Set just before a switch to this environment; cleared once the switch
    /// is recorded as done (or undone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switching_to: Option<Group>,
}

fn one() -> u32 {
    1
}

impl LiveRecord {
    /// `live` is live, no switch pending.
    pub fn live(live: Group) -> Self {
        Self {
            version: 1,
            live,
            switching_to: None,
        }
    }

    /// `live` is live and a switch to `to` is about to happen.
    pub fn switching(live: Group, to: Group) -> Self {
        Self {
            version: 1,
            live,
            switching_to: Some(to),
        }
    }
}

/// Where the [`LiveRecord`] is kept: a file ([`FileLiveStore`]), or the
/// testkit's scriptable fake.
#[async_trait]
pub trait LiveStore: Send + Sync + Debug {
    /// Where the record lives, for error messages (a path).
    fn describe(&self) -> String;

    /// Reads the record; `None` when none was ever written.
    ///
    /// * Idempotent: yes (read-only).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed. An unreadable or corrupt record is a
    ///   permanent error: deploykit does not guess which environment is
    ///   live.
    async fn load(&self) -> Result<Option<LiveRecord>, DriverError>;

    /// Replaces the record atomically.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; the old or the new record is in place, never a
    ///   mix.
    /// * On failure: the old record is still in place.
    async fn save(&self, record: &LiveRecord) -> Result<(), DriverError>;
}

/// The record in a JSON file, replaced atomically (temp file, `fsync`,
/// `rename`, `fsync` of the directory).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use deploykit::bluegreen_state::{FileLiveStore, LiveRecord, LiveStore};
/// use deploykit::Group;
///
/// let dir = std::env::temp_dir().join(format!("dk-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let store = FileLiveStore::new(dir.join("live.json"));
/// assert_eq!(store.load().await?, None);
/// store.save(&LiveRecord::live(Group::new("green")?)).await?;
/// assert_eq!(store.load().await?.unwrap().live.as_str(), "green");
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct FileLiveStore {
    path: PathBuf,
}

impl FileLiveStore {
    /// A store at `path` (the directory must exist; the file need not).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl LiveStore for FileLiveStore {
    fn describe(&self) -> String {
        format!("state file {}", self.path.display())
    }

    async fn load(&self) -> Result<Option<LiveRecord>, DriverError> {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read(&path))
            .await
            .map_err(|e| DriverError::new(format!("reading the state file panicked: {e}")))?;
        let bytes = match read {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(
                    DriverError::new(format!("cannot read the state file {}", self.path.display()))
                        .with_source(e),
                )
            }
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            DriverError::new(format!(
                "the state file {} is not a valid record (expected e.g. {{\"live\":\"blue\"}}); \
                 fix it, or remove it and let deploykit reconcile with the load balancer",
                self.path.display()
            ))
            .with_source(e)
        })
    }

    async fn save(&self, record: &LiveRecord) -> Result<(), DriverError> {
        let bytes = serde_json::to_vec(record)
            .map_err(|e| DriverError::new("cannot serialize the live record").with_source(e))?;
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || crate::state::atomic::write_atomic(&path, &bytes))
            .await
            .map_err(|e| DriverError::new(format!("writing the state file panicked: {e}")))?
            .map_err(|e| {
                DriverError::new(format!("cannot write the state file {}", self.path.display()))
                    .with_source(e)
            })
    }
}

/// How [`reconcile`] decided which environment is live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Nothing recorded and the load balancer cannot tell: the first
    /// environment.
    Default,
    /// The record, confirmed by the load balancer (or not contradicted by
    /// one that cannot tell).
    Recorded,
    /// Nothing recorded; the load balancer's live group was recorded.
    FromLoadBalancer,
    /// A switch was pending in the record and the load balancer shows it
    /// happened; the record was completed.
    CompletedSwitch,
    /// A switch was pending in the record and the load balancer shows it did
    /// not happen; the pending mark was cleared.
    AbandonedSwitch,
    /// Read without reconciling, for a dry run ([`peek`]): the record, else
    /// the load balancer, else the first environment. Nothing was written.
    Unconfirmed,
}

/// The live environment, as [`reconcile`] (or, read-only, [`peek`]) found
/// it: the only value a blue-green plan is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Reconciled {
    /// The live environment.
    pub live: Group,
    /// How that was decided.
    pub resolution: Resolution,
}

/// Decides which of `environments` is live from the `store`'s record and
/// the load balancer's [`live_group`](LoadBalancer::live_group), as the
/// [module docs](self) tabulate. Writes the record when it resolves a
/// pending switch or adopts the load balancer's group; otherwise touches
/// nothing.
///
/// # Errors
/// * [`Error::Inconsistent`] when the record and the load balancer disagree
///   and cannot be told apart, or either names a group that is not one of
///   `environments`.
/// * [`Error::Driver`] when the record or the load balancer cannot be read.
pub async fn reconcile(
    store: &dyn LiveStore,
    lb: &dyn LoadBalancer,
    environments: &[Group; 2],
) -> Result<Reconciled> {
    let record = store.load().await?;
    let routed = lb.live_group().await?;
    let known = |g: &Group| environments.contains(g);
    let envs = format!("{} and {}", environments[0], environments[1]);
    if let Some(g) = &routed {
        if !known(g) {
            return Err(Error::Inconsistent(format!(
                "the load balancer {} sends all traffic to the group {g}, which is not one of the environments ({envs}); \
                 fix the environment names or the load balancer",
                lb.name()
            )));
        }
    }
    if let Some(r) = &record {
        for g in std::iter::once(&r.live).chain(r.switching_to.iter()) {
            if !known(g) {
                return Err(Error::Inconsistent(format!(
                    "the {} names the group {g}, which is not one of the environments ({envs}); \
                     fix the environment names, or adopt the right environment",
                    store.describe()
                )));
            }
        }
    }
    let done = |live: Group, resolution| Ok(Reconciled { live, resolution });
    match (record, routed) {
        (None, None) => done(environments[0].clone(), Resolution::Default),
        (None, Some(g)) => {
            store.save(&LiveRecord::live(g.clone())).await?;
            done(g, Resolution::FromLoadBalancer)
        }
        (Some(r), None) => match r.switching_to {
            None => done(r.live, Resolution::Recorded),
            Some(to) => Err(Error::Inconsistent(format!(
                "the {} says a switch from {} to {to} was under way, and the load balancer {} cannot tell \
                 which environment receives traffic; check which one does and adopt it",
                store.describe(),
                r.live,
                lb.name()
            ))),
        },
        (Some(r), Some(g)) if g == r.live => {
            if r.switching_to.is_some() {
                store.save(&LiveRecord::live(g.clone())).await?;
                done(g, Resolution::AbandonedSwitch)
            } else {
                done(g, Resolution::Recorded)
            }
        }
        (Some(r), Some(g)) if r.switching_to.as_ref() == Some(&g) => {
            store.save(&LiveRecord::live(g.clone())).await?;
            done(g, Resolution::CompletedSwitch)
        }
        (Some(r), Some(g)) => Err(Error::Inconsistent(format!(
            "the {} says {} is live, but the load balancer {} sends all traffic to {g}, and no switch to {g} \
             was recorded, so deploykit cannot tell which is right; if {g} is right, adopt it \
             (deploykit::bluegreen_state::adopt); otherwise switch the load balancer back to {}",
            store.describe(),
            r.live,
            lb.name(),
            r.live
        ))),
    }
}

/// Which environment is live, read without reconciling or writing anything:
/// the record, else the load balancer's live group, else the first
/// environment. For a dry run; a deployment reconciles ([`reconcile`]).
///
/// # Errors
/// A record or load balancer that cannot be read.
pub async fn peek(
    store: &dyn LiveStore,
    lb: &dyn LoadBalancer,
    environments: &[Group; 2],
) -> Result<Reconciled> {
    let live = match store.load().await? {
        Some(r) => r.live,
        None => lb.live_group().await?.unwrap_or_else(|| environments[0].clone()),
    };
    Ok(Reconciled {
        live,
        resolution: Resolution::Unconfirmed,
    })
}

/// Checks, before a plan that switches away from `from` touches anything,
/// that `from` really is live: the record (if any) says so with no switch
/// pending, and the load balancer (if it can tell) routes to it. This keeps
/// a blue-green plan that went stale (made from a dry run's [`peek`], or
/// before someone else switched) from preparing the live environment.
///
/// # Errors
/// [`Error::Inconsistent`] naming what disagrees; [`Error::Driver`] when the
/// record or the load balancer cannot be read.
pub async fn expect_live(store: &dyn LiveStore, lb: &dyn LoadBalancer, from: &Group) -> Result<()> {
    let fix = "plan with BlueGreen::deploy or BlueGreen::rollback, which reconcile the record with the load balancer first";
    if let Some(r) = store.load().await? {
        if &r.live != from || r.switching_to.is_some() {
            return Err(Error::Inconsistent(format!(
                "the plan switches traffic away from {from}, but the {} says {} is live{}; {fix}",
                store.describe(),
                r.live,
                r.switching_to
                    .map(|t| format!(" with a switch to {t} pending"))
                    .unwrap_or_default()
            )));
        }
    }
    if let Some(g) = lb.live_group().await? {
        if &g != from {
            return Err(Error::Inconsistent(format!(
                "the plan switches traffic away from {from}, but the load balancer {} sends all traffic to {g}; {fix}",
                lb.name()
            )));
        }
    }
    Ok(())
}

/// Records `live` as the live environment, whatever was recorded: the
/// operator's answer to a refused [`reconcile`]. Does not touch the load
/// balancer.
///
/// # Errors
/// [`Error::InvalidInput`] (field `environment`) when `live` is not one of
/// `environments`; [`Error::Driver`] when the record cannot be written.
pub async fn adopt(store: &dyn LiveStore, environments: &[Group; 2], live: &Group) -> Result<()> {
    if !environments.contains(live) {
        return Err(Error::invalid(
            "environment",
            format!(
                "{live} is not one of the environments ({} and {})",
                environments[0], environments[1]
            ),
        ));
    }
    store.save(&LiveRecord::live(live.clone())).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Group {
        Group::new(s).unwrap()
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dk-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn file_store_round_trips_and_leaves_no_temp_files() {
        let dir = tmpdir("rt");
        let store = FileLiveStore::new(dir.join("live.json"));
        assert_eq!(store.load().await.unwrap(), None);
        store
            .save(&LiveRecord::switching(g("blue"), g("green")))
            .await
            .unwrap();
        store.save(&LiveRecord::live(g("green"))).await.unwrap();
        let r = store.load().await.unwrap().unwrap();
        assert_eq!(r, LiveRecord::live(g("green")));
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["live.json"]);
        let text = std::fs::read_to_string(dir.join("live.json")).unwrap();
        assert_eq!(text, r#"{"version":1,"live":"green"}"#);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn corrupt_or_invalid_records_are_errors_naming_the_file() {
        let dir = tmpdir("bad");
        let path = dir.join("live.json");
        let store = FileLiveStore::new(&path);
        for bad in ["{not json", r#"{"live":"a b"}"#, r#"{"live":"../x"}"#] {
            std::fs::write(&path, bad).unwrap();
            let e = store.load().await.unwrap_err().to_string();
            assert!(
                e.contains("live.json") && e.contains("not a valid record"),
                "{bad}: {e}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn save_into_a_missing_directory_fails_and_says_where() {
        let store = FileLiveStore::new("/nonexistent-deploykit-dir/live.json");
        let e = store.save(&LiveRecord::live(g("blue"))).await.unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent-deploykit-dir/live.json"),
            "{e}"
        );
    }
}
