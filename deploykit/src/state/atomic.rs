//! Replacing a file atomically, for every file deploykit rewrites in place:
//! the nginx upstream include file, the blue-green live record and the
//! control files.
//!
//! The new content goes to a temporary file in the target's own directory
//! (same filesystem, so the rename is atomic), created exclusively under a
//! random name: `O_CREAT | O_EXCL` (and `O_NOFOLLOW`) refuse any path that
//! already exists, a planted symlink included, so the write can never go
//! through a link to some other file. The file is `fsync`ed, renamed over
//! the target and the directory `fsync`ed, so a reader — or a restart after
//! a power cut — sees the old content or the new one, never a mix.
//!
//! The new file keeps the permission bits of the file it replaces (an
//! operator's `chmod` survives every rewrite); a file created for the first
//! time gets `0666` minus the umask, as any new file.

use std::collections::hash_map::RandomState;
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// How many random names are tried before giving up: a name is only taken
/// when something was planted at it or by a vanishingly rare collision.
const NAME_ATTEMPTS: u32 = 16;

/// Writes `bytes` to `path` atomically (see the module documentation).
///
/// On an error before the rename, the temporary file is removed and `path`
/// is untouched. An error from the final `fsync` of the directory comes
/// after the rename: `path` then holds the new content, which a power cut
/// might still undo.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (dir, name) = split(path)?;
    write_atomic_with(path, bytes, random_names(&dir, name))
}

/// [`write_atomic`] without either `fsync`: the exclusive temporary file and
/// the rename still give a reader, or the next process after a crash of
/// this one, the old content or the new, but a power cut may lose the
/// change or, on some filesystems, leave an empty file.
pub(crate) fn write_atomic_unsynced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let (dir, name) = split(path)?;
    replace(path, bytes, random_names(&dir, name), false)
}

/// [`write_atomic`] with the candidate temporary names given, so that tests
/// can plant something at the first one.
fn write_atomic_with(path: &Path, bytes: &[u8], names: impl IntoIterator<Item = PathBuf>) -> io::Result<()> {
    replace(path, bytes, names, true)
}

/// Writes a temporary file, renames it over `path`, and `fsync`s both when
/// `sync` says so.
fn replace(
    path: &Path,
    bytes: &[u8],
    names: impl IntoIterator<Item = PathBuf>,
    sync: bool,
) -> io::Result<()> {
    let (dir, _) = split(path)?;
    // Only a regular file's mode is kept: a symlink at `path` is replaced by
    // the new file, as `rename` does, and says nothing about the mode wanted.
    let mode = std::fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| m.permissions());
    let (tmp, mut file) = create_exclusive(&dir, names)?;
    let written = (|| {
        if let Some(mode) = mode {
            file.set_permissions(mode)?;
        }
        file.write_all(bytes)?;
        if sync {
            file.sync_all()?;
        }
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if sync {
        File::open(&dir)?.sync_all()?;
    }
    Ok(())
}

/// The directory `path` is in (`.` for a bare name) and its file name.
fn split(path: &Path) -> io::Result<(PathBuf, &OsStr)> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Creates `path` holding `bytes` (written and flushed), failing with
/// `AlreadyExists` when it exists: the file appears complete, never empty,
/// to a reader listing the directory. Returns it open for writing at its
/// end.
pub(crate) fn create_new_with(path: &Path, bytes: &[u8]) -> io::Result<File> {
    let (dir, name) = split(path)?;
    let (tmp, mut file) = create_exclusive(&dir, random_names(&dir, name))?;
    let linked = file
        .write_all(bytes)
        .and_then(|()| file.sync_data())
        .and_then(|()| std::fs::hard_link(&tmp, path));
    // The temporary name goes whatever happened; the link (if made) stays.
    let _ = std::fs::remove_file(&tmp);
    linked?;
    File::open(&dir).and_then(|d| d.sync_all())?;
    Ok(file)
}

/// Hidden names beside the target, `.<name>.<16 random hex>.deploykit-tmp`:
/// the suffix keeps them out of globs such as nginx's `include *.conf`.
fn random_names(dir: &Path, name: &OsStr) -> impl Iterator<Item = PathBuf> {
    let dir = dir.to_path_buf();
    let name = name.to_string_lossy().into_owned();
    // std's RandomState is keyed from the OS's random source, so the names
    // cannot be guessed ahead.
    let keys = RandomState::new();
    (0..NAME_ATTEMPTS).map(move |attempt| {
        let mut h = keys.build_hasher();
        h.write_u32(attempt);
        h.write_u32(std::process::id());
        dir.join(format!(".{name}.{:016x}.deploykit-tmp", h.finish()))
    })
}

/// Creates the first of `names` that does not exist yet, exclusively.
fn create_exclusive(dir: &Path, names: impl IntoIterator<Item = PathBuf>) -> io::Result<(PathBuf, File)> {
    for tmp in names {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.custom_flags(libc::O_NOFOLLOW);
        }
        match options.open(&tmp) {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!(
            "every temporary name tried in {} was taken; remove stale `.*.deploykit-tmp` files there",
            dir.display()
        ),
    ))
}

/// The names in `dir`, sorted: for tests that check no temp file is left.
#[cfg(test)]
pub(crate) fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn content_is_replaced_and_no_temp_file_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.conf");
        write_atomic(&target, b"first\n").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"first\n");
        write_atomic(&target, b"second, longer than the first\n").unwrap();
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"second, longer than the first\n"
        );
        write_atomic(&target, b"").unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"");
        assert_eq!(entries(dir.path()), ["app.conf"]);
    }

    #[test]
    fn the_unsynced_variant_also_replaces_through_a_fresh_file() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("web-1.json");
        write_atomic_unsynced(&target, b"{\"running\":false}").unwrap();
        let mut reader = std::fs::File::open(&target).unwrap();
        write_atomic_unsynced(&target, b"{\"running\":true}").unwrap();
        // A reader holding the old file still reads it whole: the new
        // content is a new file renamed over the name, not written in place.
        let mut old = String::new();
        std::io::Read::read_to_string(&mut reader, &mut old).unwrap();
        assert_eq!(old, "{\"running\":false}");
        assert_eq!(std::fs::read(&target).unwrap(), b"{\"running\":true}");
        assert_eq!(entries(dir.path()), ["web-1.json"]);
    }

    #[test]
    fn a_reader_holding_the_old_file_still_sees_the_old_content() {
        // Replaced by rename, not rewritten in place: an open handle keeps
        // the whole old content, never a mix of old and new.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("live.json");
        write_atomic(&target, b"old content").unwrap();
        let held = File::open(&target).unwrap();
        write_atomic(&target, b"new").unwrap();
        assert_eq!(std::io::read_to_string(held).unwrap(), "old content");
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
    }

    #[cfg(unix)]
    #[test]
    fn the_replaced_files_mode_is_kept_and_a_new_file_gets_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.conf");
        std::fs::write(&target, "old").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&target, b"new").unwrap();
        let mode = std::fs::metadata(&target).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o640);

        // A new file: 0666 minus the umask, exactly as `File::create` gives.
        let reference = dir.path().join("reference");
        File::create(&reference).unwrap();
        let fresh = dir.path().join("fresh.json");
        write_atomic(&fresh, b"x").unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode(),
            std::fs::metadata(&reference).unwrap().permissions().mode()
        );
    }

    #[test]
    fn a_failed_write_removes_its_temp_file_and_leaves_the_target() {
        // A directory where the file should be: the rename fails after the
        // temp file was written.
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("app.conf");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), "kept").unwrap();
        assert!(write_atomic(&target, b"new").is_err());
        assert!(target.is_dir());
        assert_eq!(std::fs::read_to_string(target.join("inside")).unwrap(), "kept");
        assert_eq!(entries(dir.path()), ["app.conf"]);
        // A missing directory fails before anything is created.
        let e = write_atomic(&dir.path().join("no/such/dir/x"), b"x").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[cfg(unix)]
    #[test]
    fn a_symlink_planted_at_a_temp_name_is_skipped_and_its_victim_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let target = dir.path().join("app.conf");
        let planted = dir.path().join(".app.conf.planted.deploykit-tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        // A dangling link is refused too (O_EXCL): it would create the victim.
        let dangling = dir.path().join(".app.conf.dangling.deploykit-tmp");
        let would_be_created = dir.path().join("created-through-link");
        std::os::unix::fs::symlink(&would_be_created, &dangling).unwrap();
        let fresh = dir.path().join(".app.conf.fresh.deploykit-tmp");
        write_atomic_with(
            &target,
            b"upstream app {}\n",
            [planted.clone(), dangling.clone(), fresh.clone()],
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!would_be_created.exists());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "upstream app {}\n");
        assert!(std::fs::symlink_metadata(&planted)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!fresh.exists());
        // Every name taken: an error naming the directory, target untouched.
        let e = write_atomic_with(&target, b"other", [planted, dangling]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "upstream app {}\n");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    }

    #[test]
    fn temp_names_are_hidden_random_and_outside_conf_globs() {
        let dir = Path::new("/etc/nginx/conf.d");
        let a: Vec<PathBuf> = random_names(dir, OsStr::new("app.conf")).collect();
        let b: Vec<PathBuf> = random_names(dir, OsStr::new("app.conf")).collect();
        assert_eq!(a.len(), NAME_ATTEMPTS as usize);
        assert_ne!(a[0], b[0]);
        for p in &a {
            let n = p.file_name().unwrap().to_string_lossy();
            assert!(
                n.starts_with(".app.conf.") && n.ends_with(".deploykit-tmp"),
                "{n}"
            );
            assert_eq!(p.parent(), Some(dir));
        }
    }

    #[test]
    fn a_new_file_appears_with_its_content_and_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.jsonl");
        let mut f = create_new_with(&path, b"header\n").unwrap();
        f.write_all(b"next\n").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"header\nnext\n");
        let again = create_new_with(&path, b"other\n").unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"header\nnext\n", "left as it was");
        assert_eq!(entries(dir.path()), ["j.jsonl"], "no temporary file left");
    }
}
