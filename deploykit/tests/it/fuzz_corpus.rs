//! The fuzz corpora of `fuzz/corpus/<target>` replayed on stable through
//! the same functions the fuzz targets call, so every input the fuzzers
//! kept (and every crash they found, once fixed) is checked in each run.

use std::path::{Path, PathBuf};

use deploykit::fuzzing;

/// Runs `check` on every file of the target's corpus, naming the file
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
fn haproxy() {
    replay("haproxy", fuzzing::haproxy);
}

#[test]
fn prometheus() {
    replay("prometheus", fuzzing::prometheus);
}

#[test]
fn nginx_state() {
    replay("nginx_state", fuzzing::nginx_state_line);
}

#[test]
fn journal() {
    replay("journal", fuzzing::journal);
}

#[test]
fn flags() {
    replay("flags", fuzzing::flag_file);
}

#[test]
fn ofrep() {
    replay("ofrep", fuzzing::ofrep_request);
}

#[test]
fn query_template() {
    replay("query_template", fuzzing::query_template);
}
