//! Feature flags: how fast deploykit evaluates and switches them.
//!
//! 1. In-process evaluations per second on one thread (one core): a
//!    `fractional` 25/75 split, a segment rule, and a `$ref` + `sem_ver`
//!    rule, over 4,096 distinct targeting keys.
//! 2. The kill switch's write: `FlagStore::apply(Kill)` (lock, validate,
//!    atomic replace with fsync, journal line with fsync), median.
//! 3. With the CLI binary built: OFREP single-flag requests per second
//!    against `deploykit flags serve` (keep-alive HTTP/1.1 clients on
//!    loopback), and the kill switch's time to effect — from the start of
//!    `kill` to the first bulk answer that shows it — at the default
//!    250 ms poll interval.
//!
//! Run:
//! ```text
//! cargo build --release -p deploykit-cli   # for part 3 only
//! cargo bench -p deploykit-benches --bench flags
//! ```
//! The binary is `$DEPLOYKIT_BIN`, else `$CARGO_TARGET_DIR/release/deploykit`,
//! else `target/release/deploykit` of the workspace; without it part 3 is
//! skipped (and says so).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deploykit::flags::{Context, FlagChange, FlagChangeKind, FlagSet, FlagStore};
use serde_json::Value;

const FILE: &str = r#"{
  "flags": {
    "split": { "state": "ENABLED", "variants": { "on": true, "off": false }, "defaultVariant": "off",
      "targeting": { "fractional": [["on", 25], ["off", 75]] } },
    "segment": { "state": "ENABLED", "variants": { "on": true, "off": false }, "defaultVariant": "off",
      "targeting": { "if": [{ "==": [{ "var": "segment" }, "internal"] }, "on", null] } },
    "versioned": { "state": "ENABLED", "variants": { "new": "new", "old": "old" }, "defaultVariant": "old",
      "targeting": { "if": [{ "and": [{ "$ref": "staff" }, { "sem_ver": [{ "var": "app_version" }, ">=", "2.1.0"] }] }, "new", "old"] } }
  },
  "$evaluators": { "staff": { "ends_with": [{ "var": "email" }, "@example.com"] } }
}"#;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn contexts() -> Vec<Context> {
    (0..4096)
        .map(|n| {
            let mut c = Context::new();
            c.insert("targetingKey".into(), format!("user-{n}").into());
            c.insert(
                "segment".into(),
                if n % 10 == 0 { "internal" } else { "public" }.into(),
            );
            c.insert(
                "email".into(),
                format!("u{n}@{}", if n % 3 == 0 { "example.com" } else { "mail.test" }).into(),
            );
            c.insert("app_version".into(), format!("2.{}.0", n % 4).into());
            c
        })
        .collect()
}

fn evals_per_second(set: &FlagSet, flag: &str, ctxs: &[Context]) -> (f64, usize) {
    const N: usize = 2_000_000;
    let mut hits = 0usize;
    let start = Instant::now();
    for i in 0..N {
        let e = set.evaluate(flag, &ctxs[i % ctxs.len()]);
        hits +=
            usize::from(matches!(e.value, Some(Value::Bool(true))) || e.variant.as_deref() == Some("new"));
    }
    (N as f64 / start.elapsed().as_secs_f64(), hits)
}

fn binary() -> PathBuf {
    if let Some(b) = std::env::var_os("DEPLOYKIT_BIN") {
        return b.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release").join("deploykit")
}

/// One keep-alive client: POSTs `body` to `path` until `until`; returns the count.
fn hammer(addr: &str, path: &str, body: &str, until: Instant) -> u64 {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut n = 0;
    while Instant::now() < until {
        s.write_all(req.as_bytes()).expect("send");
        let mut len = 0usize;
        let mut status = String::new();
        reader.read_line(&mut status).expect("status");
        assert!(status.contains(" 200 "), "{status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("header");
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("length");
            }
            if line == "\r\n" {
                break;
            }
        }
        let mut b = vec![0; len];
        reader.read_exact(&mut b).expect("body");
        n += 1;
    }
    n
}

fn post_once(addr: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    raw
}

fn main() {
    let set = FlagSet::parse(FILE).expect("parses");
    set.validate().expect("valid");
    let ctxs = contexts();
    println!("## in-process evaluations, one thread, 2,000,000 per run, 7 runs");
    for flag in ["split", "segment", "versioned"] {
        let runs: Vec<(f64, usize)> = (0..7).map(|_| evals_per_second(&set, flag, &ctxs)).collect();
        let hits = runs[0].1;
        let rate = median(runs.into_iter().map(|r| r.0).collect());
        println!(
            "{flag:<10} median {:>12.0} evaluations/s  ({:.0} ns each; `on` for {:.1} %)",
            rate,
            1e9 / rate,
            hits as f64 / 20_000.0
        );
    }

    println!("\n## kill switch write (lock, validate, atomic replace + fsync, journal + fsync), 21 runs");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = FlagStore::new(dir.path().join("flags.json"), dir.path().join("flags.jsonl"));
    let mut times = Vec::new();
    for _ in 0..21 {
        std::fs::write(store.file(), FILE).expect("write");
        let change = FlagChange {
            flag: "split".into(),
            kind: FlagChangeKind::Kill,
            who: "bench".into(),
            why: None,
        };
        let t = Instant::now();
        store.apply(&change).expect("kill").expect("changed");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!("median {:.2} ms", median(times));

    let bin = binary();
    if !bin.exists() {
        println!(
            "\n## OFREP: skipped, {} is missing (cargo build --release -p deploykit-cli, or DEPLOYKIT_BIN)",
            bin.display()
        );
        return;
    }
    std::fs::write(store.file(), FILE).expect("write");
    let mut child = Command::new(&bin)
        .args(["--config", "none.toml", "flags", "--file"])
        .arg(store.file())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let addr = line.trim().rsplit("http://").next().expect("address").to_owned();
    let body = r#"{"context":{"targetingKey":"user-42","segment":"public"}}"#;
    for clients in [1usize, 4, 16] {
        let mut rates = Vec::new();
        for _ in 0..3 {
            let until = Instant::now() + Duration::from_secs(2);
            let start = Instant::now();
            let total: u64 = std::thread::scope(|s| {
                let hs: Vec<_> = (0..clients)
                    .map(|_| s.spawn(|| hammer(&addr, "/ofrep/v1/evaluate/flags/split", body, until)))
                    .collect();
                hs.into_iter().map(|h| h.join().expect("client")).sum()
            });
            rates.push(total as f64 / start.elapsed().as_secs_f64());
        }
        println!("OFREP single evaluation, {clients:>2} keep-alive clients: median {:.0} requests/s (3 runs of 2 s)", median(rates));
    }
    println!("\n## kill switch time to effect over OFREP (poll interval 250 ms), 20 runs at phases spread over the interval");
    let mut effects = Vec::new();
    let ctx = r#"{"context":{"targetingKey":"user-1"}}"#;
    for i in 0..20u64 {
        // Back to a 100 % `on` split and wait until the server serves it.
        std::fs::write(
            store.file(),
            FILE.replace(r#"[["on", 25], ["off", 75]]"#, r#"[["on", 100], ["off", 0]]"#),
        )
        .expect("write");
        while !post_once(&addr, "/ofrep/v1/evaluate/flags/split", ctx).contains("\"value\":true") {
            std::thread::sleep(Duration::from_millis(5));
        }
        // The kill lands at a different point of the server's poll cycle each run.
        std::thread::sleep(Duration::from_millis(i * 13 % 250));
        let t = Instant::now();
        let change = FlagChange {
            flag: "split".into(),
            kind: FlagChangeKind::Kill,
            who: "bench".into(),
            why: None,
        };
        store.apply(&change).expect("kill");
        while !post_once(&addr, "/ofrep/v1/evaluate/flags/split", ctx).contains("\"value\":false") {
            std::thread::sleep(Duration::from_millis(1));
        }
        effects.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let max = effects.iter().copied().fold(0.0, f64::max);
    println!("median {:.0} ms, max {:.0} ms", median(effects), max);
    let _ = child.kill();
    let _ = child.wait();
}
