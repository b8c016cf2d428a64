//! Entry points of the `config` and `webhook` fuzz targets in `fuzz/`
//! (which compile this crate's sources as a module, the CLI having no
//! library target), and the test that replays their corpora on stable.
//! Each panics when a property of the parser's answer does not hold.

use std::path::Path;

use axum::http::{HeaderMap, HeaderValue};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::gitops_webhook::{verify, Rejection, Secret};

/// Splits at the first newline (the whole input is the tail when there is
/// none).
fn split_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&[], data),
    }
}

/// `deploykit.toml` through the whole loading path (TOML, types, every
/// semantic check): an error says something and points into the file; an
/// accepted file has instances with distinct ids and loads the same twice.
pub(crate) fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("deploykit.toml");
    match crate::config::parse(path, text) {
        Ok(loaded) => {
            assert!(
                !loaded.instances.is_empty(),
                "a file without instances was accepted"
            );
            let mut ids: Vec<_> = loaded.instances.iter().map(|i| &i.id).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), loaded.instances.len(), "two instances share an id");
            let again = crate::config::parse(path, text).expect("a file accepted once is accepted again");
            assert_eq!(
                format!("{:?}", again.instances),
                format!("{:?}", loaded.instances)
            );
        }
        Err(e) => {
            assert!(!e.message.trim().is_empty(), "an error without a message");
            if let Some((line, col)) = e.at {
                assert!(line >= 1 && col >= 1, "line and column are 1-based");
                assert!(
                    line <= text.split('\n').count(),
                    "the error points past the end of the file"
                );
            }
            if !text.contains("Some(") {
                assert!(
                    !e.message.contains("Some("),
                    "Rust debug output in an error: {}",
                    e.message
                );
            }
        }
    }
}

/// A webhook request: the first line is the shared secret, the second a
/// header selector byte (GitHub, Gitea, Forgejo) and the signature header's
/// value, the rest the body. Only the HMAC-SHA256 of the body with the
/// secret is accepted, and it always is.
pub(crate) fn webhook(data: &[u8]) {
    let (secret, rest) = split_line(data);
    let (signature, body) = split_line(rest);
    let Some((&which, value)) = signature.split_first() else {
        return;
    };
    let names = ["x-hub-signature-256", "x-gitea-signature", "x-forgejo-signature"];
    let name = names[usize::from(which) % names.len()];
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    let expected = hex::encode(mac.finalize().into_bytes());
    let key = Secret::new(secret.to_vec());
    if let Ok(value) = HeaderValue::from_bytes(value) {
        let mut headers = HeaderMap::new();
        headers.insert(name, value.clone());
        match verify(&key, &headers, body) {
            Ok(()) => {
                let text = value.to_str().expect("an accepted signature is text").trim();
                let hex_part = if name == names[0] {
                    text.strip_prefix("sha256=")
                        .expect("GitHub's signature has its prefix")
                } else {
                    text
                };
                assert_eq!(
                    hex_part.to_ascii_lowercase(),
                    expected,
                    "a wrong signature was accepted"
                );
            }
            Err(Rejection::Missing) => panic!("the signature header was there"),
            Err(Rejection::Malformed | Rejection::Mismatch) => {}
        }
    }
    let good = if name == names[0] {
        format!("sha256={expected}")
    } else {
        expected
    };
    let mut headers = HeaderMap::new();
    headers.insert(name, HeaderValue::from_str(&good).unwrap());
    assert_eq!(
        verify(&key, &headers, body),
        Ok(()),
        "the right signature was refused"
    );
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Runs `check` on every file of `fuzz/corpus/<target>`, naming the file
    /// when it panics; an empty or missing corpus fails (it is committed).
    fn replay(target: &str, check: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} has no corpus files", dir.display());
        for path in files {
            let bytes = std::fs::read(&path).unwrap();
            if let Err(e) = std::panic::catch_unwind(|| check(&bytes)) {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("{} fails the {target} target: {why}", path.display());
            }
        }
    }

    #[test]
    fn the_config_corpus_replays() {
        replay("config", super::config);
    }

    #[test]
    fn the_webhook_corpus_replays() {
        replay("webhook", super::webhook);
    }
}
