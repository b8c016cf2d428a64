//! The journal through the CLI: `deploykit deploy` of a rolling update over
//! N simulated instances (batch 100), journal durable (one `write` and one
//! `fdatasync` per group of records), timed from process start to exit.
//! Prints the wall time and the journal's records per flush, which the CLI
//! logs at `info` when it finishes the journal.
//!
//! Run (the CLI binary must be built first; the state directory goes under
//! `$TMPDIR`, default `/tmp`, whose disk decides the flush cost):
//!
//! ```text
//! cargo build --release -p deploykit-cli
//! cargo bench -p deploykit-benches --bench journal_cli [-- 10000 1000]
//! ```
//!
//! The binary is `$DEPLOYKIT_BIN`, else `$CARGO_TARGET_DIR/release/deploykit`,
//! else `target/release/deploykit` of the workspace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn binary() -> PathBuf {
    if let Some(b) = std::env::var_os("DEPLOYKIT_BIN") {
        return PathBuf::from(b);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release").join("deploykit")
}

fn config(n: usize) -> String {
    let mut c =
        String::from("app = \"shop\"\nstate_dir = \"state\"\n\n[instance_defaults]\nsimulated = true\n\n");
    for i in 1..=n {
        c.push_str(&format!(
            "[[instances]]\nid = \"web-{i}\"\naddress = \"10.{}.{}.{}:8080\"\n\n",
            i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    c.push_str(
        "[load_balancer]\nkind = \"simulated\"\n\n[strategy.rolling]\nbatch_size = 100\n\
         health_interval = \"10ms\"\nstabilisation = \"0s\"\ndrain_timeout = \"1s\"\n\n\
         [timeouts]\ndrain_poll = \"10ms\"\n",
    );
    c
}

/// One `deploy`: wall time and the journal's flush line.
fn deploy(bin: &Path, dir: &Path, release: &str) -> (Duration, String) {
    let start = Instant::now();
    let out = Command::new(bin)
        .current_dir(dir)
        .args(["--config", "deploykit.toml", "--quiet", "deploy", release])
        .env("RUST_LOG", "deploykit::state=info")
        .env("NO_COLOR", "1")
        .output()
        .expect("runs the deploykit binary");
    let wall = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy {release} failed: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("journal written"))
        .unwrap_or("")
        .to_string();
    (wall, line)
}

/// `key=value` from a log line.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or("?")
        .to_string()
}

fn main() {
    let bin = binary();
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release -p deploykit-cli` first, or set DEPLOYKIT_BIN",
        bin.display()
    );
    let sizes: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    println!(
        "deploykit deploy, rolling, batch 100, simulated instances, journal durable ({})",
        bin.display()
    );
    println!(
        "{:>9} {:>4} {:>10} {:>9} {:>8} {:>14} {:>11}",
        "instances", "run", "wall", "records", "flushes", "median/flush", "max/flush"
    );
    for n in sizes {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("deploykit.toml"), config(n)).expect("config");
        // The first deployment installs v1 everywhere; the timed ones replace it.
        deploy(&bin, dir.path(), "v1");
        for (run, release) in ["v2", "v3", "v4"].into_iter().enumerate() {
            let (wall, line) = deploy(&bin, dir.path(), release);
            println!(
                "{n:>9} {:>4} {:>8.2} s {:>9} {:>8} {:>14} {:>11}",
                run + 1,
                wall.as_secs_f64(),
                field(&line, "records"),
                field(&line, "flushes"),
                field(&line, "median_records_per_flush"),
                field(&line, "max_records_per_flush"),
            );
        }
    }
}
