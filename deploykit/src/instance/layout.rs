//! The release layout on an instance (Capistrano-style):
//!
//! ```text
//! <root>/releases/<id>/      one directory per installed release
//! <root>/current  -> releases/<id>    the active release (symlink)
//! <root>/previous -> releases/<id>    what `current` pointed at before the last swap
//! <root>/shared/<path>/      kept across releases, symlinked into each one
//! ```
//!
//! A release is uploaded into `releases/.partial-<id>-<nonce>/`, verified,
//! given its shared links, then renamed to `releases/<id>/` — so a directory
//! named after a release id is always complete. `current` is swapped
//! atomically: a new symlink is made under a temporary name and renamed over
//! `current` (`rename(2)` replaces it in one step). Pruning keeps the newest
//! `keep` releases (by install time) and never deletes the current or the
//! previous one.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::cmd::script;
use super::host::Host;
use crate::error::{DriverError, Error, Result};
use crate::names::ReleaseId;

/// The default number of releases kept on an instance.
pub const DEFAULT_KEEP: usize = 5;

/// Checks an absolute directory path used on a host.
pub(crate) fn validate_root(field: &str, path: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::invalid(
            field,
            format!("{path:?} {why}; use an absolute path such as /srv/app without '..', newlines or NUL"),
        ))
    };
    if !path.starts_with('/') {
        return bad("is not absolute");
    }
    if path.len() > 1 && path.ends_with('/') {
        return bad("ends with '/'");
    }
    if path.chars().any(|c| c == '\0' || c == '\n' || c == '\r') {
        return bad("contains a control character");
    }
    if path.split('/').any(|c| c == "..") {
        return bad("contains '..'");
    }
    Ok(())
}

/// Checks a path relative to the release directory (a linked shared path).
fn validate_relative(field: &str, path: &str) -> Result<()> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && !c.starts_with('-')
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("{path:?} is not a plain relative path; use components of [A-Za-z0-9._-] separated by '/', e.g. log or storage/uploads"),
        ))
    }
}

/// The release layout of one instance: where it lives, which shared paths
/// are linked into each release, how many releases are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseLayout {
    root: String,
    linked: Vec<String>,
    keep: usize,
}

impl ReleaseLayout {
    /// A layout rooted at `root` (absolute), keeping [`DEFAULT_KEEP`]
    /// releases and linking no shared paths.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `root` when it is not an absolute, plain
    /// path.
    pub fn new(root: impl Into<String>) -> Result<Self> {
        let root = root.into();
        validate_root("root", &root)?;
        Ok(Self {
            root,
            linked: Vec::new(),
            keep: DEFAULT_KEEP,
        })
    }

    /// Keeps the newest `keep` releases (at least 2: the current and the
    /// previous one are never deleted anyway).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `keep` when it is below 2.
    pub fn keep(mut self, keep: usize) -> Result<Self> {
        if keep < 2 {
            return Err(Error::invalid(
                "keep",
                format!("{keep} is too few; keep at least 2 releases (the current and the previous one)"),
            ));
        }
        self.keep = keep;
        Ok(self)
    }

    /// Links `<root>/shared/<path>` (a directory, created when missing) into
    /// every release at `<path>`, replacing whatever the release has there.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for `linked path` when `path` is not a plain
    /// relative path.
    pub fn link(mut self, path: impl Into<String>) -> Result<Self> {
        let path = path.into();
        validate_relative("linked path", &path)?;
        self.linked.push(path);
        Ok(self)
    }

    /// The root directory.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// How many releases are kept.
    pub fn kept(&self) -> usize {
        self.keep
    }

    /// `<root>/releases/<id>`.
    pub fn release_dir(&self, release: &ReleaseId) -> String {
        format!("{}/releases/{release}", self.root)
    }

    /// `<root>/<name>` (for the pid and log files of the process control).
    pub(crate) fn file(&self, name: &str) -> String {
        format!("{}/{name}", self.root)
    }

    /// The release `current` points at, or `None` when there is no
    /// `current` symlink yet.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes. On failure: nothing
    ///   changed.
    ///
    /// # Errors
    /// When the host cannot be reached, or `current` points somewhere that is
    /// not `releases/<valid id>`.
    pub async fn current(&self, host: &dyn Host) -> Result<Option<ReleaseId>, DriverError> {
        self.read_link(host, "current").await
    }

    /// The release `current` pointed at before the last swap, if recorded.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes. On failure: nothing
    ///   changed.
    ///
    /// # Errors
    /// As for [`current`](Self::current).
    pub async fn previous(&self, host: &dyn Host) -> Result<Option<ReleaseId>, DriverError> {
        self.read_link(host, "previous").await
    }

    async fn read_link(&self, host: &dyn Host, name: &str) -> Result<Option<ReleaseId>, DriverError> {
        let out = host
            .run(
                &script(r#"if [ -L "$1/$2" ]; then readlink -- "$1/$2"; fi"#)
                    .args([self.root.as_str(), name]),
            )
            .await?
            .check(&format!("reading {}/{name} on {}", self.root, host.describe()))?;
        let target = out.stdout.trim_end_matches('\n');
        if target.is_empty() {
            return Ok(None);
        }
        let id = target.strip_prefix("releases/").ok_or_else(|| {
            DriverError::new(format!(
                "{}/{name} on {} points at {target:?}, not at releases/<id>; fix the symlink by hand",
                self.root,
                host.describe()
            ))
        })?;
        ReleaseId::new(id).map(Some).map_err(|e| {
            DriverError::new(format!(
                "{}/{name} on {} points at an invalid release",
                self.root,
                host.describe()
            ))
            .with_source(e)
        })
    }

    /// The releases installed (complete directories under `releases/`),
    /// newest first.
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes. On failure: nothing
    ///   changed.
    ///
    /// # Errors
    /// When the host cannot be reached.
    pub async fn installed(&self, host: &dyn Host) -> Result<Vec<ReleaseId>, DriverError> {
        let out = host
            .run(
                &script(r#"if [ -d "$1/releases" ]; then cd -- "$1/releases" && ls -1t; fi"#)
                    .arg(self.root.as_str()),
            )
            .await?
            .check(&format!("listing releases on {}", host.describe()))?;
        Ok(out
            .stdout
            .lines()
            .filter_map(|l| ReleaseId::new(l).ok())
            .collect())
    }

    /// Whether `releases/<id>` exists (complete, since only verified uploads
    /// are renamed there).
    ///
    /// * Idempotent: yes (read-only). Cancel-safe: yes. On failure: nothing
    ///   changed.
    ///
    /// # Errors
    /// When the host cannot be reached.
    pub async fn has(&self, host: &dyn Host, release: &ReleaseId) -> Result<bool, DriverError> {
        let out = host
            .run(&script(r#"test -d "$1/releases/$2""#).args([self.root.as_str(), release.as_str()]))
            .await?;
        match out.status {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            _ => Err(DriverError::new(out.describe_failure("checking for a release"))),
        }
    }

    /// Creates `<root>/releases/` and `<root>/shared/<linked paths>/`, and
    /// returns a fresh staging directory path for uploading `release`.
    ///
    /// * Idempotent: yes. Cancel-safe: yes. On failure: some directories may
    ///   have been created; nothing else changed.
    ///
    /// # Errors
    /// When the directories cannot be created.
    pub async fn prepare(&self, host: &dyn Host, release: &ReleaseId) -> Result<String, DriverError> {
        let cmd = script(
            r#"set -e; root=$1; shift; mkdir -p -- "$root/releases" "$root/shared"
for p in "$@"; do mkdir -p -- "$root/shared/$p"; done"#,
        )
        .arg(self.root.as_str())
        .args(self.linked.iter().map(String::as_str));
        host.run(&cmd)
            .await?
            .check(&format!("preparing {} on {}", self.root, host.describe()))?;
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Ok(format!("{}/releases/.partial-{release}-{nonce:x}", self.root))
    }

    /// Links the shared paths into the uploaded `staging` directory and
    /// renames it to `releases/<id>` (atomic).
    ///
    /// * Idempotent: no (the staging directory is consumed); the installer
    ///   checks [`has`](Self::has) first.
    /// * Cancel-safe: yes; either the staging directory is still there (and
    ///   pruned later) or `releases/<id>` is complete.
    /// * On failure: `releases/<id>` does not exist.
    ///
    /// # Errors
    /// When linking or renaming fails (e.g. `releases/<id>` appeared
    /// meanwhile).
    pub async fn commit(
        &self,
        host: &dyn Host,
        staging: &str,
        release: &ReleaseId,
    ) -> Result<(), DriverError> {
        let cmd = script(
            r#"set -e; root=$1; staging=$2; id=$3; shift 3
for p in "$@"; do
  rm -rf -- "$staging/$p"
  mkdir -p -- "$(dirname -- "$staging/$p")"
  ln -s -- "$root/shared/$p" "$staging/$p"
done
touch -- "$staging"
mv -T -- "$staging" "$root/releases/$id""#,
        )
        .args([self.root.as_str(), staging, release.as_str()])
        .args(self.linked.iter().map(String::as_str));
        host.run(&cmd).await?.check(&format!(
            "moving release {release} into place on {}",
            host.describe()
        ))?;
        Ok(())
    }

    /// Points `current` at `releases/<id>` atomically (symlink under a
    /// temporary name, renamed over `current`), recording the old target as
    /// `previous`. Nothing happens when `current` already points there.
    ///
    /// * Idempotent: yes.
    /// * Cancel-safe: yes; `current` points at either the old or the new
    ///   release.
    /// * On failure: `current` is unchanged.
    ///
    /// # Errors
    /// When `releases/<id>` does not exist or the swap fails.
    pub async fn activate(&self, host: &dyn Host, release: &ReleaseId) -> Result<(), DriverError> {
        let cmd = script(
            r#"set -e; cd -- "$1"; new="releases/$2"
if [ ! -d "$new" ]; then echo "$1/$new is not installed" >&2; exit 3; fi
old=$(readlink current 2>/dev/null || true)
[ "$old" = "$new" ] && exit 0
if [ -n "$old" ]; then ln -sfn -- "$old" .previous.tmp; mv -fT -- .previous.tmp previous; fi
ln -sfn -- "$new" .current.tmp
mv -fT -- .current.tmp current"#,
        )
        .args([self.root.as_str(), release.as_str()]);
        let out = host.run(&cmd).await?;
        if out.status == Some(3) {
            return Err(DriverError::new(format!(
                "release {release} is not installed under {}/releases on {}; install it first",
                self.root,
                host.describe()
            )));
        }
        out.check(&format!("switching current to {release} on {}", host.describe()))?;
        Ok(())
    }

    /// Deletes stale partial uploads and all but the newest `keep` releases,
    /// never the current or the previous one. Returns the releases deleted.
    ///
    /// * Idempotent: yes. Cancel-safe: yes (each release is deleted or not;
    ///   a half-deleted one is no longer current or previous).
    /// * On failure: some old releases may remain.
    ///
    /// # Errors
    /// When listing or deleting fails.
    pub async fn prune(&self, host: &dyn Host) -> Result<Vec<ReleaseId>, DriverError> {
        let cmd = script(PRUNE).args([self.root.clone(), self.keep.to_string()]);
        let out = host
            .run(&cmd)
            .await?
            .check(&format!("pruning old releases on {}", host.describe()))?;
        Ok(release_lines(&out.stdout))
    }

    /// [`activate`](Self::activate) then [`prune`](Self::prune) in one round
    /// trip — when `releases/<id>` is installed; otherwise nothing changes
    /// and [`Switch::NotInstalled`] says so (then upload it first).
    ///
    /// * Idempotent: yes. Cancel-safe: yes, as `activate` and `prune`.
    /// * On failure: `current` is unchanged; a failed prune after the swap
    ///   is returned inside [`Switch::Switched`], not as an error.
    ///
    /// # Errors
    /// When the host cannot be reached or the swap fails.
    pub(crate) async fn switch_if_installed(
        &self,
        host: &dyn Host,
        release: &ReleaseId,
    ) -> Result<Switch, DriverError> {
        let cmd = script(SWITCH).args([self.root.clone(), release.to_string(), self.keep.to_string()]);
        let out = host.run(&cmd).await?;
        match out.status {
            Some(0) => Ok(Switch::Switched {
                pruned: Ok(release_lines(&out.stdout)),
            }),
            Some(10) => Ok(Switch::NotInstalled),
            Some(11) => Ok(Switch::Switched {
                pruned: Err(DriverError::new(out.describe_failure(&format!(
                    "pruning old releases on {}",
                    host.describe()
                )))),
            }),
            _ => Err(DriverError::new(out.describe_failure(&format!(
                "switching current to {release} on {}",
                host.describe()
            )))),
        }
    }
}

/// What [`ReleaseLayout::switch_if_installed`] did.
#[derive(Debug)]
pub(crate) enum Switch {
    /// `releases/<id>` is not there; nothing changed.
    NotInstalled,
    /// `current` points at the release; old releases were pruned (the
    /// ones deleted), or pruning failed after the swap.
    Switched {
        /// The releases deleted, or why pruning failed.
        pruned: Result<Vec<ReleaseId>, DriverError>,
    },
}

fn release_lines(stdout: &str) -> Vec<ReleaseId> {
    stdout.lines().filter_map(|l| ReleaseId::new(l).ok()).collect()
}

/// Prunes in the layout root (the working directory), keeping `$keep`
/// releases: stale partial uploads go, then all but the newest, never the
/// current or the previous one; prints each release deleted.
macro_rules! prune_body {
    () => {
        r#"cd -- releases
cur=$(readlink ../current 2>/dev/null || true); cur=${cur#releases/}
prev=$(readlink ../previous 2>/dev/null || true); prev=${prev#releases/}
for d in .partial-*; do if [ -e "$d" ]; then rm -rf -- "$d"; fi; done
set -f; n=0
ls -1t | while IFS= read -r d; do
  n=$((n+1))
  if [ "$n" -gt "$keep" ] && [ "$d" != "$cur" ] && [ "$d" != "$prev" ]; then rm -rf -- "$d"; echo "$d"; fi
done
"#
    };
}

/// `prune`: root `$1`, keep `$2`.
const PRUNE: &str = concat!(
    r#"set -e; root=$1; keep=$2
cd -- "$root"
"#,
    prune_body!()
);

/// Root `$1`, release `$2`, keep `$3`: exits 10 when `releases/$2` is not
/// installed (nothing changed); else points `current` at it (recording the
/// old target as `previous`, as `activate`) and prunes, exiting 11 when
/// only the pruning failed. The prune runs in a subshell of its own with
/// `set -e`: a `set -e` list tested by `||` would ignore its failures.
const SWITCH: &str = concat!(
    r#"set -e; root=$1; id=$2; keep=$3
cd -- "$root" 2>/dev/null || exit 10
[ -d "releases/$id" ] || exit 10
new="releases/$id"
old=$(readlink current 2>/dev/null || true)
if [ "$old" != "$new" ]; then
  if [ -n "$old" ]; then ln -sfn -- "$old" .previous.tmp; mv -fT -- .previous.tmp previous; fi
  ln -sfn -- "$new" .current.tmp
  mv -fT -- .current.tmp current
fi
set +e
(
set -e
"#,
    prune_body!(),
    r#")
[ "$?" = 0 ] || exit 11"#
);

/// Where a release layout lives: a machine and a root directory. Two
/// instances at one site would share `current`, `previous` and the pid
/// file, so each needs its own; [`first_shared_site`] finds two that do not.
///
/// Roots compare lexically (`/srv//app/./` is `/srv/app`), without resolving
/// symlinks or a relative root against an absolute one; SSH hosts compare
/// as a host and port, any user (one directory whoever logs in), the host
/// without case or a trailing dot, an IP address in its canonical form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LayoutSite {
    /// `None` for this machine, else the SSH host and port.
    machine: Option<(String, u16)>,
    root: PathBuf,
}

impl LayoutSite {
    /// A layout on the machine running deploykit.
    pub fn local(root: impl AsRef<Path>) -> Self {
        Self {
            machine: None,
            root: lexical(root.as_ref()),
        }
    }

    /// A layout on the SSH host `host`, port `port`.
    pub fn ssh(host: &str, port: u16, root: impl AsRef<Path>) -> Self {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let host = match bare.parse::<IpAddr>() {
            Ok(ip) => ip.to_canonical().to_string(),
            Err(_) => host.trim_end_matches('.').to_ascii_lowercase(),
        };
        Self {
            machine: Some((host, port)),
            root: lexical(root.as_ref()),
        }
    }

    /// The machine, as a person reads it: `this machine` or `host:port`.
    pub fn machine(&self) -> String {
        match &self.machine {
            None => "this machine".into(),
            Some((host, port)) if host.contains(':') => format!("[{host}]:{port}"),
            Some((host, port)) => format!("{host}:{port}"),
        }
    }
}

/// `root` without `.` components, repeated or trailing slashes.
fn lexical(root: &Path) -> PathBuf {
    root.components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// The first two items of `sites` at one [`LayoutSite`], in iteration
/// order: `(earlier, later)`; `None` when every site is its own.
pub fn first_shared_site<T: Clone>(sites: impl IntoIterator<Item = (T, LayoutSite)>) -> Option<(T, T)> {
    let mut seen = BTreeMap::new();
    for (item, site) in sites {
        if let Some(earlier) = seen.get(&site) {
            return Some((T::clone(earlier), item));
        }
        seen.insert(site, item);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::host::LocalHost;

    fn id(s: &str) -> ReleaseId {
        ReleaseId::new(s).unwrap()
    }

    #[test]
    fn bad_roots_and_linked_paths_are_refused() {
        for bad in ["relative", "/a/../b", "/a/", "/a\nb", ""] {
            let e = ReleaseLayout::new(bad).unwrap_err().to_string();
            assert!(e.contains("root"), "{bad:?}: {e}");
        }
        let l = ReleaseLayout::new("/srv/app").unwrap();
        for bad in ["/abs", "a/../b", "a//b", "-x", "a b", ".", ""] {
            let e = l.clone().link(bad).unwrap_err().to_string();
            assert!(e.contains("linked path"), "{bad:?}: {e}");
        }
        assert!(l.clone().link("storage/uploads").is_ok());
        assert!(l.keep(1).unwrap_err().to_string().contains("keep"));
    }

    #[test]
    fn one_root_on_one_machine_is_one_site_however_written() {
        let same = [
            (LayoutSite::local("/srv/app"), LayoutSite::local("/srv//app/./")),
            (LayoutSite::local("inst/a"), LayoutSite::local("./inst/a/")),
            (
                LayoutSite::ssh("Web.Internal.", 22, "/srv/app"),
                LayoutSite::ssh("web.internal", 22, "/srv/app/"),
            ),
            (
                LayoutSite::ssh("::ffff:10.0.0.1", 22, "/srv/app"),
                LayoutSite::ssh("10.0.0.1", 22, "/srv/app"),
            ),
        ];
        for (a, b) in same {
            assert_eq!(a, b);
            assert_eq!(first_shared_site([("a", a), ("b", b)]), Some(("a", "b")));
        }
        let apart = [
            (LayoutSite::local("/srv/app/1"), LayoutSite::local("/srv/app/2")),
            (
                LayoutSite::local("/srv/app"),
                LayoutSite::ssh("web", 22, "/srv/app"),
            ),
            (
                LayoutSite::ssh("web", 2201, "/srv/app"),
                LayoutSite::ssh("web", 2202, "/srv/app"),
            ),
        ];
        for (a, b) in apart {
            assert_eq!(first_shared_site([("a", a), ("b", b)]), None);
        }
        let sites = [
            ("a", LayoutSite::local("/x")),
            ("b", LayoutSite::local("/y")),
            ("c", LayoutSite::local("/x/")),
        ];
        assert_eq!(first_shared_site(sites), Some(("a", "c")));
        assert_eq!(LayoutSite::local("/x").machine(), "this machine");
        assert_eq!(LayoutSite::ssh("::1", 22, "/x").machine(), "[::1]:22");
        assert_eq!(LayoutSite::ssh("WEB.", 22, "/x").machine(), "web:22");
    }

    async fn install(layout: &ReleaseLayout, host: &LocalHost, r: &ReleaseId) {
        let staging = layout.prepare(host, r).await.unwrap();
        std::fs::create_dir(&staging).unwrap();
        std::fs::write(format!("{staging}/VERSION"), r.as_str()).unwrap();
        std::fs::create_dir(format!("{staging}/log")).unwrap();
        layout.commit(host, &staging, r).await.unwrap();
        layout.activate(host, r).await.unwrap();
    }

    #[tokio::test]
    async fn swap_previous_restore_shared_and_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("app");
        let layout = ReleaseLayout::new(root.to_str().unwrap())
            .unwrap()
            .keep(2)
            .unwrap()
            .link("log")
            .unwrap();
        let host = LocalHost::new();
        assert_eq!(layout.current(&host).await.unwrap(), None);
        assert!(layout.installed(&host).await.unwrap().is_empty());

        install(&layout, &host, &id("v1")).await;
        assert_eq!(layout.current(&host).await.unwrap(), Some(id("v1")));
        assert_eq!(layout.previous(&host).await.unwrap(), None);
        // The shared path is a symlink into shared/, and survives releases.
        std::fs::write(root.join("current/log/app.log"), "hello").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("shared/log/app.log")).unwrap(),
            "hello"
        );

        install(&layout, &host, &id("v2")).await;
        assert_eq!(
            std::fs::read_link(root.join("current")).unwrap().to_str(),
            Some("releases/v2")
        );
        assert_eq!(layout.previous(&host).await.unwrap(), Some(id("v1")));
        assert_eq!(
            std::fs::read_to_string(root.join("current/log/app.log")).unwrap(),
            "hello"
        );
        // Activating the current release again changes nothing.
        layout.activate(&host, &id("v2")).await.unwrap();
        assert_eq!(layout.previous(&host).await.unwrap(), Some(id("v1")));

        // Restore = swap back.
        layout.activate(&host, &id("v1")).await.unwrap();
        assert_eq!(layout.current(&host).await.unwrap(), Some(id("v1")));
        assert_eq!(layout.previous(&host).await.unwrap(), Some(id("v2")));
        layout.activate(&host, &id("v2")).await.unwrap();

        install(&layout, &host, &id("v3")).await;
        install(&layout, &host, &id("v4")).await;
        // A stale partial upload is cleaned up too.
        std::fs::create_dir(root.join("releases/.partial-v9-1")).unwrap();
        let deleted = layout.prune(&host).await.unwrap();
        assert_eq!(deleted, vec![id("v2"), id("v1")]);
        let mut left: Vec<_> = std::fs::read_dir(root.join("releases"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["v3", "v4"]);

        // The previous release is kept even when it is not among the newest.
        layout.activate(&host, &id("v3")).await.unwrap(); // current v3, previous v4
        install(&layout, &host, &id("v5")).await; // current v5, previous v3
        install(&layout, &host, &id("v6")).await; // current v6, previous v5
        layout.activate(&host, &id("v3")).await.unwrap(); // current v3, previous v6
        let deleted = layout.prune(&host).await.unwrap();
        assert_eq!(deleted, vec![id("v4")]);
        assert_eq!(
            layout.installed(&host).await.unwrap(),
            vec![id("v6"), id("v5"), id("v3")]
        );
    }

    #[tokio::test]
    async fn switch_if_installed_swaps_and_prunes_in_one_go_or_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("app");
        let layout = ReleaseLayout::new(root.to_str().unwrap())
            .unwrap()
            .keep(2)
            .unwrap();
        let host = LocalHost::new();
        // No layout at all yet: not installed, and nothing is created.
        let s = layout.switch_if_installed(&host, &id("v1")).await.unwrap();
        assert!(matches!(s, Switch::NotInstalled), "{s:?}");
        assert!(!root.exists());
        for r in ["v1", "v2", "v3", "v4"] {
            install(&layout, &host, &id(r)).await;
        }
        let s = layout.switch_if_installed(&host, &id("v9")).await.unwrap();
        assert!(matches!(s, Switch::NotInstalled), "{s:?}");
        assert_eq!(layout.current(&host).await.unwrap(), Some(id("v4")));
        std::fs::create_dir(root.join("releases/.partial-v9-1")).unwrap();
        // Newest first: v4 (now previous), v3, v2 (beyond keep = 2: gone),
        // v1 (now current).
        match layout.switch_if_installed(&host, &id("v1")).await.unwrap() {
            Switch::Switched { pruned } => assert_eq!(pruned.unwrap(), vec![id("v2")]),
            other => panic!("{other:?}"),
        }
        assert_eq!(layout.current(&host).await.unwrap(), Some(id("v1")));
        assert_eq!(layout.previous(&host).await.unwrap(), Some(id("v4")));
        assert!(!root.join("releases/.partial-v9-1").exists());
    }

    #[tokio::test]
    async fn activating_a_missing_release_is_refused_and_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let layout = ReleaseLayout::new(tmp.path().to_str().unwrap()).unwrap();
        let host = LocalHost::new();
        install(&layout, &host, &id("v1")).await;
        let err = layout.activate(&host, &id("v2")).await.unwrap_err().to_string();
        assert!(err.contains("v2") && err.contains("not installed"), "{err}");
        assert_eq!(layout.current(&host).await.unwrap(), Some(id("v1")));
        assert!(!layout.has(&host, &id("v2")).await.unwrap());
        assert!(layout.has(&host, &id("v1")).await.unwrap());
    }
}
