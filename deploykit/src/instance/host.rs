//! Where commands run: this machine ([`LocalHost`]) or an SSH host
//! (`SshHost`, feature `ssh`).

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use super::cmd::{script, Command, Output};
use crate::error::DriverError;

/// A machine that runs [`Command`]s and receives release directories.
///
/// The release layout and the service controls are written once against
/// this trait, so a local instance and an SSH instance do exactly the same
/// things.
#[async_trait]
pub trait Host: Send + Sync + Debug {
    /// A short description for messages (`local`, `ssh deploy@10.0.0.5:22`).
    fn describe(&self) -> String;

    /// Runs `cmd` and waits for it. A non-zero exit is not an error here
    /// (see [`Output::check`]).
    ///
    /// * Idempotent: as the command is.
    /// * Cancel-safe: dropping the future abandons the command (locally it
    ///   is killed; remotely the channel is closed).
    /// * On failure: the command may or may not have run; a transient error
    ///   says the connection failed.
    async fn run(&self, cmd: &Command) -> Result<Output, DriverError>;

    /// Copies the local directory `source` to the directory `dest` on the
    /// host (an absolute path that must not exist yet; its parent exists),
    /// and verifies the copy.
    ///
    /// * Idempotent: no — call it with a fresh `dest`.
    /// * Cancel-safe: yes; a cancelled copy leaves a partial `dest` that
    ///   the caller discards.
    /// * On failure: `dest` may exist partially.
    async fn put_dir(&self, source: &Path, dest: &str) -> Result<(), DriverError>;
}

/// How a [`LocalHost`] puts a release directory in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CopyMode {
    /// Copy every file (`cp -a`).
    #[default]
    Copy,
    /// Hard-link every file (`cp -al`): fast and small, but the release
    /// shares inodes with the source, so the source must never be modified
    /// in place (and must be on the same filesystem).
    HardLink,
}

/// This machine: commands run with `tokio::process`, directories are copied
/// or hard-linked with `cp`.
#[derive(Debug, Clone, Default)]
pub struct LocalHost {
    copy_mode: CopyMode,
    timeout: Option<Duration>,
}

impl LocalHost {
    /// A local host that copies release directories.
    pub fn new() -> Self {
        Self::default()
    }

    /// How release directories are put in place (default: copy).
    pub fn copy_mode(mut self, mode: CopyMode) -> Self {
        self.copy_mode = mode;
        self
    }

    /// Kills any command still running after `timeout` (default: none; the
    /// executor's step timeouts apply).
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

#[async_trait]
impl Host for LocalHost {
    fn describe(&self) -> String {
        "local".to_string()
    }

    async fn run(&self, cmd: &Command) -> Result<Output, DriverError> {
        cmd.run_local_with_timeout(self.timeout).await
    }

    async fn put_dir(&self, source: &Path, dest: &str) -> Result<(), DriverError> {
        let src = path_str(source)?;
        let flags = match self.copy_mode {
            CopyMode::Copy => "-a",
            CopyMode::HardLink => "-al",
        };
        // `cp -a src/. dest` copies the contents of src into a new dest.
        let cmd = script(r#"set -e; mkdir -- "$3"; cp "$1" -- "$2/." "$3/""#).args([flags, &src, dest]);
        self.run(&cmd).await?.check("copying the release")?;
        Ok(())
    }
}

pub(crate) fn path_str(p: &Path) -> Result<String, DriverError> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| DriverError::new(format!("the path {} is not UTF-8; rename it", p.display())))
}

/// Where the files of a release come from, on the machine running
/// deploykit. Used by local and SSH instances alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseSource {
    /// `<dir>/<release-id>/` holds each release.
    Directory(PathBuf),
    /// A fixed directory per release id.
    Paths(Vec<(crate::names::ReleaseId, PathBuf)>),
}

impl ReleaseSource {
    /// `<dir>/<release-id>/` holds each release.
    pub fn directory(dir: impl Into<PathBuf>) -> Self {
        ReleaseSource::Directory(dir.into())
    }

    /// The local directory holding `release`.
    ///
    /// # Errors
    /// A permanent [`DriverError`] when the release is unknown or its
    /// directory does not exist.
    pub fn locate(&self, release: &crate::names::ReleaseId) -> Result<PathBuf, DriverError> {
        let path = match self {
            ReleaseSource::Directory(dir) => dir.join(release.as_str()),
            ReleaseSource::Paths(map) => map
                .iter()
                .find(|(id, _)| id == release)
                .map(|(_, p)| p.clone())
                .ok_or_else(|| {
                    DriverError::new(format!(
                        "release {release} is not in the release source; add its directory"
                    ))
                })?,
        };
        if !path.is_dir() {
            return Err(DriverError::new(format!(
                "release {release}: the source directory {} does not exist",
                path.display()
            )));
        }
        Ok(path)
    }

    /// Checks, before anything is touched, that `release` can be installed
    /// the way `transfer` says: its directory exists and every file and
    /// directory in it can be read; for [`Transfer::Stream`] also that the
    /// tar stream can be built from it. Reads only; an install checks again.
    ///
    /// # Errors
    /// [`Error::InvalidInput`](crate::Error::InvalidInput) (field
    /// `release`) naming the path at fault and the fix.
    pub fn check(&self, release: &crate::names::ReleaseId, transfer: Transfer) -> crate::Result<PathBuf> {
        let bad = |m: String| crate::Error::invalid("release", m);
        let path = self.locate(release).map_err(|e| bad(e.message().to_string()))?;
        check_tree(&path, Path::new(""), transfer).map_err(bad)?;
        Ok(path)
    }
}

/// How a release reaches its instances, which decides what it may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transfer {
    /// Copied or hard-linked on this machine (`cp -a`): anything `cp`
    /// copies.
    Local,
    /// Streamed as a tar to an SSH host: regular files, directories and
    /// symlinks only, with UTF-8 names that hold no newline, carriage
    /// return or backslash, and no top-level `.deploykit.sha256` (the
    /// manifest the stream adds).
    Stream,
}

/// The manifest a release stream adds (`instance::MANIFEST` with the `ssh`
/// feature), so no release file may take its name.
pub(crate) const STREAM_MANIFEST: &str = ".deploykit.sha256";

/// Whether a release file at `rel` (relative, UTF-8) can travel in the
/// tar stream with its manifest, whose lines a newline, carriage return
/// or backslash would break.
pub(crate) fn streamable_name(rel: &str) -> bool {
    !rel.contains(['\n', '\r', '\\']) && rel != STREAM_MANIFEST
}

/// Walks `root/rel` as an install would read it: the first problem, as a
/// message naming the path.
fn check_tree(root: &Path, rel: &Path, transfer: Transfer) -> Result<(), String> {
    let dir = root.join(rel);
    let unreadable =
        |p: &Path, e: std::io::Error| format!("cannot read {}: {e}; fix its permissions", p.display());
    let entries = std::fs::read_dir(&dir).map_err(|e| unreadable(&dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| unreadable(&dir, e))?;
        let path = entry.path();
        let rel_path = rel.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&path).map_err(|e| unreadable(&path, e))?;
        let ft = meta.file_type();
        if transfer == Transfer::Stream {
            let name = rel_path.to_str().ok_or_else(|| {
                format!(
                    "the file name {} is not UTF-8; rename it (releases for SSH hosts travel as a tar)",
                    path.display()
                )
            })?;
            if !streamable_name(name) {
                return Err(format!(
                    "the file name {name:?} in {} has a newline, carriage return or backslash (or is reserved); \
                     rename it (releases for SSH hosts travel as a tar with a manifest)",
                    root.display()
                ));
            }
            if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
                return Err(format!(
                    "{} is neither a file, a directory nor a symlink (a FIFO, socket or device); \
                     remove it from the release (releases for SSH hosts travel as a tar)",
                    path.display()
                ));
            }
        }
        if ft.is_dir() {
            check_tree(root, &rel_path, transfer)?;
        } else if ft.is_file() {
            std::fs::File::open(&path).map_err(|e| unreadable(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[cfg(feature = "ssh")]
    #[test]
    fn the_reserved_name_is_the_manifest_the_stream_adds() {
        assert_eq!(STREAM_MANIFEST, crate::instance::MANIFEST);
    }

    #[test]
    fn a_release_is_checked_before_anything_is_touched() {
        use crate::names::ReleaseId;
        let tmp = tempfile::tempdir().unwrap();
        let source = ReleaseSource::directory(tmp.path());
        let v = |r: &str| ReleaseId::new(r).unwrap();
        let dir = tmp.path().join("v1");
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/app"), "x").unwrap();
        std::os::unix::fs::symlink("bin/app", dir.join("app")).unwrap();
        for t in [Transfer::Local, Transfer::Stream] {
            assert_eq!(source.check(&v("v1"), t).unwrap(), dir);
            let e = source.check(&v("v99"), t).unwrap_err().to_string();
            assert!(
                e.contains("release") && e.contains(&tmp.path().join("v99").display().to_string()),
                "{e}"
            );
        }
        let fifo = tmp.path().join("v2");
        std::fs::create_dir_all(&fifo).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(fifo.join("pipe"))
            .status()
            .unwrap();
        assert!(made.success());
        assert!(
            source.check(&v("v2"), Transfer::Local).is_ok(),
            "cp -a copies a FIFO"
        );
        let e = source.check(&v("v2"), Transfer::Stream).unwrap_err().to_string();
        assert!(e.contains("pipe") && e.contains("FIFO"), "{e}");
        let newline = tmp.path().join("v3");
        std::fs::create_dir_all(newline.join("sub")).unwrap();
        std::fs::write(newline.join("sub/a\nb"), "x").unwrap();
        let e = source.check(&v("v3"), Transfer::Stream).unwrap_err().to_string();
        assert!(e.contains("sub/a\\nb") && e.contains("newline"), "{e}");
        let manifest = tmp.path().join("v4");
        std::fs::create_dir_all(&manifest).unwrap();
        std::fs::write(manifest.join(STREAM_MANIFEST), "x").unwrap();
        assert!(source.check(&v("v4"), Transfer::Stream).is_err());
        let locked = tmp.path().join("v5");
        std::fs::create_dir_all(&locked).unwrap();
        std::fs::write(locked.join("secret"), "x").unwrap();
        std::fs::set_permissions(
            locked.join("secret"),
            std::os::unix::fs::PermissionsExt::from_mode(0o000),
        )
        .unwrap();
        // Root reads a file of mode 0 anyway: then there is nothing to refuse.
        if std::fs::File::open(locked.join("secret")).is_err() {
            let e = source.check(&v("v5"), Transfer::Local).unwrap_err().to_string();
            assert!(e.contains("cannot read") && e.contains("secret"), "{e}");
        }
    }

    #[tokio::test]
    async fn put_dir_copies_or_hard_links_and_source_locates_releases() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("builds/v1");
        std::fs::create_dir_all(src.join("bin")).unwrap();
        std::fs::write(src.join("bin/app"), "x").unwrap();
        std::os::unix::fs::symlink("bin/app", src.join("app")).unwrap();
        for (mode, same_inode) in [(CopyMode::Copy, false), (CopyMode::HardLink, true)] {
            let dest = tmp.path().join(format!("dest-{mode:?}"));
            LocalHost::new()
                .copy_mode(mode)
                .put_dir(&src, dest.to_str().unwrap())
                .await
                .unwrap();
            let (a, b) = (
                std::fs::metadata(src.join("bin/app")).unwrap(),
                std::fs::metadata(dest.join("bin/app")).unwrap(),
            );
            assert_eq!(a.ino() == b.ino(), same_inode, "{mode:?}");
            assert_eq!(
                std::fs::read_link(dest.join("app")).unwrap().to_str(),
                Some("bin/app")
            );
            // The destination must be new.
            let again = LocalHost::new().put_dir(&src, dest.to_str().unwrap()).await;
            assert!(again.is_err());
        }
        let v1 = crate::names::ReleaseId::new("v1").unwrap();
        let source = ReleaseSource::directory(tmp.path().join("builds"));
        assert_eq!(source.locate(&v1).unwrap(), src);
        let v2 = crate::names::ReleaseId::new("v2").unwrap();
        assert!(source.locate(&v2).unwrap_err().to_string().contains("v2"));
        let paths = ReleaseSource::Paths(vec![(v2.clone(), src.clone())]);
        assert_eq!(paths.locate(&v2).unwrap(), src);
        assert!(paths
            .locate(&v1)
            .unwrap_err()
            .to_string()
            .contains("not in the release source"));
    }
}
