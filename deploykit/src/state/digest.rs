//! Release content digests: a release directory rebuilt under a name
//! already deployed would not be installed again (an instance that holds
//! `releases/<id>/` switches back to it), so its first deployment pins
//! the content's digest in the state directory and a later one with other
//! content is refused.

use std::path::Path;

use sha2::{Digest, Sha256};

/// SHA-256 over a release directory: every entry's relative path and kind,
/// a file's executable bit and content, a symlink's target, in name order.
/// Times and owners are left out (a fresh checkout of the same files has
/// the same digest).
///
/// # Errors
/// The I/O error of an entry that cannot be read.
pub fn release_digest(dir: &Path) -> std::io::Result<String> {
    let mut hasher = Sha256::new();
    walk(dir, dir, &mut hasher)?;
    Ok(format!("{:x}", hasher.finalize()))
}

fn walk(root: &Path, dir: &Path, hasher: &mut Sha256) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let rel = path.strip_prefix(root).unwrap_or(&path);
        let meta = std::fs::symlink_metadata(&path)?;
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update([0]);
        if meta.file_type().is_symlink() {
            hasher.update(b"l");
            hasher.update(std::fs::read_link(&path)?.as_os_str().as_encoded_bytes());
        } else if meta.is_dir() {
            hasher.update(b"d");
            walk(root, &path, hasher)?;
        } else {
            #[cfg(unix)]
            let exec = {
                use std::os::unix::fs::PermissionsExt;
                meta.permissions().mode() & 0o111 != 0
            };
            #[cfg(not(unix))]
            let exec = false;
            hasher.update(if exec { b"x" } else { b"f" });
            hasher.update(meta.len().to_le_bytes());
            let mut file = std::fs::File::open(&path)?;
            std::io::copy(&mut file, hasher)?;
        }
        hasher.update([0]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_content_names_and_the_executable_bit_only() {
        let a = tempfile::tempdir().unwrap();
        std::fs::create_dir(a.path().join("bin")).unwrap();
        std::fs::write(a.path().join("bin/app"), "v1").unwrap();
        std::fs::write(a.path().join("VERSION"), "v1").unwrap();
        let first = release_digest(a.path()).unwrap();
        assert_eq!(first.len(), 64);
        assert_eq!(release_digest(a.path()).unwrap(), first, "stable");
        std::fs::write(a.path().join("VERSION"), "v2").unwrap();
        let changed = release_digest(a.path()).unwrap();
        assert_ne!(changed, first);
        std::fs::rename(a.path().join("VERSION"), a.path().join("VERSION2")).unwrap();
        assert_ne!(release_digest(a.path()).unwrap(), changed, "a rename counts");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let before = release_digest(a.path()).unwrap();
            std::fs::set_permissions(a.path().join("bin/app"), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            assert_ne!(
                release_digest(a.path()).unwrap(),
                before,
                "the executable bit counts"
            );
        }
    }
}
