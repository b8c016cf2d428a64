//! A blue-green switch for setups without a load balancer: a `live` symlink
//! that points at the live environment's directory, swapped atomically.
//!
//! Whatever serves traffic (a web server's document root, a process manager
//! that follows the link, a reverse proxy that reads it) follows `live`.
//! [`switch_to`](LoadBalancer::switch_to) replaces the link atomically: a
//! new symlink is created under a temporary name in the same directory and
//! renamed over `live` (`rename(2)` replaces the old link in one step, so a
//! reader sees the old or the new target, never no link), then the
//! directory is `fsync`ed. [`live_group`](LoadBalancer::live_group) reads
//! the link back.
//!
//! A symlink routes all traffic to one place: it cannot drain single
//! backends or split traffic. Per-backend calls succeed without effect
//! (a backend of the idle environment gets no traffic anyway), and
//! [`set_weights`](LoadBalancer::set_weights) accepts only a split that
//! sends 100 % to one group.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;

use crate::error::{DriverError, Error, Result};
use crate::names::Group;
use crate::traits::{Backend, GroupWeight, LoadBalancer};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A `live` symlink switched between one directory per environment.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use deploykit::lb::SymlinkSwitch;
/// use deploykit::{Group, LoadBalancer};
///
/// let root = std::env::temp_dir().join(format!("dk-symlink-doc-{}", std::process::id()));
/// for env in ["blue", "green"] {
///     std::fs::create_dir_all(root.join(env))?;
/// }
/// let switch = SymlinkSwitch::builder(root.join("live"))
///     .environment(Group::new("blue")?, root.join("blue"))
///     .environment(Group::new("green")?, root.join("green"))
///     .build()?;
/// assert_eq!(switch.live_group().await?, None); // no link yet
/// switch.switch_to(&Group::new("green")?).await?;
/// assert_eq!(std::fs::read_link(root.join("live"))?, root.join("green"));
/// assert_eq!(switch.live_group().await?.unwrap().as_str(), "green");
/// # std::fs::remove_dir_all(&root)?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SymlinkSwitch {
    link: PathBuf,
    targets: BTreeMap<Group, PathBuf>,
}

/// Builds a [`SymlinkSwitch`]; [`build`](Self::build) checks everything.
#[derive(Debug, Clone)]
pub struct SymlinkSwitchBuilder {
    link: PathBuf,
    targets: Vec<(Group, PathBuf)>,
}

impl SymlinkSwitch {
    /// A switch for the symlink at `link` (e.g. `/srv/app/live`).
    pub fn builder(link: impl Into<PathBuf>) -> SymlinkSwitchBuilder {
        SymlinkSwitchBuilder {
            link: link.into(),
            targets: Vec::new(),
        }
    }

    /// The link's path.
    pub fn link(&self) -> &Path {
        &self.link
    }
}

impl SymlinkSwitchBuilder {
    /// The directory `group`'s traffic goes to when it is live.
    pub fn environment(mut self, group: Group, dir: impl Into<PathBuf>) -> Self {
        self.targets.push((group, dir.into()));
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `link` (relative, or its parent
    /// directory missing) or `environments` (fewer than one, a group given
    /// twice, a relative directory).
    pub fn build(self) -> Result<SymlinkSwitch> {
        if !self.link.is_absolute() {
            return Err(Error::invalid(
                "link",
                format!(
                    "{} is relative; give an absolute path, e.g. /srv/app/live",
                    self.link.display()
                ),
            ));
        }
        match self.link.parent() {
            Some(p) if p.is_dir() => {}
            _ => {
                return Err(Error::invalid(
                    "link",
                    format!(
                        "the directory of {} does not exist; create it first",
                        self.link.display()
                    ),
                ))
            }
        }
        if self.link.file_name().is_none() {
            return Err(Error::invalid("link", "has no file name; e.g. /srv/app/live"));
        }
        if self.targets.is_empty() {
            return Err(Error::invalid(
                "environments",
                "none given; add each environment's directory with .environment(group, dir)",
            ));
        }
        let mut targets = BTreeMap::new();
        for (group, dir) in self.targets {
            if !dir.is_absolute() {
                return Err(Error::invalid(
                    "environments",
                    format!(
                        "the directory of {group}, {}, is relative; give an absolute path",
                        dir.display()
                    ),
                ));
            }
            if targets.insert(group.clone(), dir).is_some() {
                return Err(Error::invalid(
                    "environments",
                    format!("{group} is given twice; give each environment once"),
                ));
            }
        }
        Ok(SymlinkSwitch {
            link: self.link,
            targets,
        })
    }
}

/// Points `link` at `target` atomically: temp symlink, rename, fsync dir.
fn swap_link(link: &Path, target: &Path) -> std::io::Result<()> {
    let dir = link.parent().unwrap_or(Path::new("/"));
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "live".into());
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp.{}.{n}", std::process::id()));
    let result = (|| {
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, link)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

async fn blocking<T: Send + 'static>(
    what: String,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, DriverError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DriverError::new(format!("{what} panicked: {e}")))?
        .map_err(|e| DriverError::new(what).with_source(e))
}

#[async_trait]
impl LoadBalancer for SymlinkSwitch {
    fn name(&self) -> &str {
        "symlink"
    }

    /// No effect: a symlink cannot take one backend out.
    async fn drain(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }

    /// Always `None`: a symlink cannot count connections.
    async fn active_connections(&self, _: &Backend) -> Result<Option<u64>, DriverError> {
        Ok(None)
    }

    /// No effect.
    async fn enable(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }

    /// No effect.
    async fn disable(&self, _: &Backend) -> Result<(), DriverError> {
        Ok(())
    }

    /// Accepts only a split that sends 100 % to one group (a switch).
    async fn set_weights(&self, weights: &[GroupWeight]) -> Result<(), DriverError> {
        let live: Vec<_> = weights.iter().filter(|w| w.percent > 0).collect();
        match live.as_slice() {
            [w] if w.percent == 100 => self.switch_to(&w.group).await,
            _ => Err(DriverError::new(
                "a symlink switch cannot split traffic between groups; use nginx or HAProxy for canaries",
            )),
        }
    }

    /// Points the link at `group`'s directory atomically.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; the link points at the old or the new directory.
    /// * On failure: the link is unchanged (the temporary link is removed).
    async fn switch_to(&self, group: &Group) -> Result<(), DriverError> {
        let Some(target) = self.targets.get(group).cloned() else {
            return Err(DriverError::new(format!(
                "the symlink switch has no directory for the group {group}"
            )));
        };
        let link = self.link.clone();
        let what = format!("pointing {} at {}", link.display(), target.display());
        blocking(what, move || swap_link(&link, &target)).await
    }

    /// The group whose directory the link points at; `None` when there is
    /// no link or it points elsewhere.
    async fn live_group(&self) -> Result<Option<Group>, DriverError> {
        let link = self.link.clone();
        let what = format!("reading the link {}", link.display());
        let target = blocking(what, move || match std::fs::read_link(&link) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?;
        Ok(target.and_then(|t| {
            self.targets
                .iter()
                .find(|(_, dir)| **dir == t)
                .map(|(g, _)| g.clone())
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Group {
        Group::new(s).unwrap()
    }

    fn root(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dk-symlink-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        for env in ["blue", "green"] {
            std::fs::create_dir_all(d.join(env)).unwrap();
        }
        d
    }

    fn switch(d: &Path) -> SymlinkSwitch {
        SymlinkSwitch::builder(d.join("live"))
            .environment(g("blue"), d.join("blue"))
            .environment(g("green"), d.join("green"))
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn switches_back_and_forth_and_reads_back() {
        let d = root("rt");
        let s = switch(&d);
        assert_eq!(s.live_group().await.unwrap(), None);
        for env in ["blue", "green", "green", "blue"] {
            s.switch_to(&g(env)).await.unwrap();
            assert_eq!(s.live_group().await.unwrap(), Some(g(env)));
            assert_eq!(std::fs::read_link(d.join("live")).unwrap(), d.join(env));
        }
        // No temporary links are left behind.
        let mut names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["blue", "green", "live"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn unknown_groups_splits_and_foreign_targets() {
        let d = root("bad");
        let s = switch(&d);
        s.switch_to(&g("blue")).await.unwrap();
        let e = s.switch_to(&g("red")).await.unwrap_err();
        assert!(e.to_string().contains("no directory for the group red"), "{e}");
        let split = [
            GroupWeight {
                group: g("blue"),
                percent: 50,
            },
            GroupWeight {
                group: g("green"),
                percent: 50,
            },
        ];
        assert!(s.set_weights(&split).await.is_err());
        assert_eq!(s.live_group().await.unwrap(), Some(g("blue")), "unchanged");
        let all_green = [GroupWeight {
            group: g("green"),
            percent: 100,
        }];
        s.set_weights(&all_green).await.unwrap();
        assert_eq!(s.live_group().await.unwrap(), Some(g("green")));
        // Someone pointed the link elsewhere: cannot tell.
        std::fs::remove_file(d.join("live")).unwrap();
        std::os::unix::fs::symlink("/tmp", d.join("live")).unwrap();
        assert_eq!(s.live_group().await.unwrap(), None);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn builder_errors_name_the_field() {
        let d = root("build");
        let field = |r: Result<SymlinkSwitch>| match r.unwrap_err() {
            Error::InvalidInput { field, .. } => field,
            other => panic!("{other}"),
        };
        assert_eq!(
            field(
                SymlinkSwitch::builder("live")
                    .environment(g("blue"), d.join("blue"))
                    .build()
            ),
            "link"
        );
        assert_eq!(
            field(
                SymlinkSwitch::builder("/nonexistent-dk/live")
                    .environment(g("blue"), d.join("blue"))
                    .build()
            ),
            "link"
        );
        assert_eq!(
            field(SymlinkSwitch::builder(d.join("live")).build()),
            "environments"
        );
        assert_eq!(
            field(
                SymlinkSwitch::builder(d.join("live"))
                    .environment(g("blue"), "blue")
                    .build()
            ),
            "environments"
        );
        assert_eq!(
            field(
                SymlinkSwitch::builder(d.join("live"))
                    .environment(g("blue"), d.join("blue"))
                    .environment(g("blue"), d.join("green"))
                    .build()
            ),
            "environments"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
