//! The journal through the CLI: `deploykit deploy` of a rolling update over
//! N simulated instances (batch 100), journal durable (one `write` and one
//! `fdatasync` per group of records), timed from process start to exit.
//! Prints the wall time and the journal's records per flush, which the CLI
//! logs at `info` when it finishes the journal.
//!
//! With `etcd` among the arguments, each size also runs with `[state]
//! backend = "etcd"` against a real 3-member etcd cluster on loopback
//! (started here, `/usr/bin/etcd`): there a "flush" is one fenced etcd
//! transaction (a raft commit), and the CLI logs the same line.
//!
//! Run (the CLI binary must be built first; the state directory goes under
//! `$TMPDIR`, default `/tmp`, whose disk decides the flush cost, and etcd's
//! members keep their WAL there too):
//!
//! ```text
//! cargo build --release -p deploykit-cli
//! cargo bench -p deploykit-benches --bench journal_cli [-- 10000 1000] [etcd]
//! ```
//!
//! The binary is `$DEPLOYKIT_BIN`, else `$CARGO_TARGET_DIR/release/deploykit`,
//! else `target/release/deploykit` of the workspace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use deploykit_benches::etcd::Cluster;

fn binary() -> PathBuf {
    if let Some(b) = std::env::var_os("DEPLOYKIT_BIN") {
        return PathBuf::from(b);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release").join("deploykit")
}

/// Where the journal goes: the local state directory, or etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Local,
    Etcd,
}

fn config(n: usize, state: State, endpoints: &[String]) -> String {
    let mut c =
        String::from("app = \"shop\"\nstate_dir = \"state\"\n\n[instance_defaults]\nsimulated = true\n\n");
    if state == State::Etcd {
        let list: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        // A prefix per size: each run starts from an empty history.
        c.push_str(&format!(
            "[state]\nbackend = \"etcd\"\nendpoints = [{}]\nprefix = \"/bench-{n}\"\n\n",
            list.join(", ")
        ));
    }
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    let cluster = args.iter().any(|a| a == "etcd").then(|| {
        let cluster = Cluster::start();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(cluster.wait_ready());
        cluster
    });
    let states: &[State] = if cluster.is_some() {
        &[State::Local, State::Etcd]
    } else {
        &[State::Local]
    };
    let endpoints = cluster.as_ref().map(|c| c.endpoints.clone()).unwrap_or_default();
    println!(
        "deploykit deploy, rolling, batch 100, simulated instances, journal durable ({})",
        bin.display()
    );
    println!(
        "{:>6} {:>9} {:>4} {:>10} {:>9} {:>8} {:>14} {:>11}",
        "state", "instances", "run", "wall", "records", "flushes", "median/flush", "max/flush"
    );
    for n in sizes {
        for &state in states {
            let dir = tempfile::tempdir().expect("temp dir");
            std::fs::write(dir.path().join("deploykit.toml"), config(n, state, &endpoints)).expect("config");
            // The first deployment installs v1 everywhere; the timed ones replace it.
            deploy(&bin, dir.path(), "v1");
            for (run, release) in ["v2", "v3", "v4"].into_iter().enumerate() {
                let (wall, line) = deploy(&bin, dir.path(), release);
                println!(
                    "{:>6} {n:>9} {:>4} {:>8.2} s {:>9} {:>8} {:>14} {:>11}",
                    match state {
                        State::Local => "local",
                        State::Etcd => "etcd",
                    },
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
}
