//! The cost of one journal record in each state backend: the local
//! `fsync`ed JSON-lines journal against etcd (a real 3-member cluster on
//! loopback, started here in a temp dir), one record per commit (a step
//! waiting for its record alone) and in batches of 10 (the records of a
//! batch of steps starting together, committed in one transaction).
//!
//! Run: `cargo bench -p deploykit-benches --bench state_etcd` (needs `etcd`
//! in /usr/bin: `apt-get install etcd-server`; the local journal is written
//! under `$TMPDIR`, whose disk decides the fsync cost; etcd's members write
//! their WAL there too).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploykit::state::{
    EtcdBackend, EtcdConfig, JournalHeader, JournalWriter, LocalBackend, RunKind, StateBackend, StateDir,
    StateLock,
};
use deploykit::{Event, EventKind, ReleaseId};

const RECORDS: usize = 500;
const RUNS: usize = 5;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a port")
        .local_addr()
        .expect("an address")
        .port()
}

/// A 3-member etcd cluster on loopback; killed when dropped.
struct Cluster {
    children: Vec<Child>,
    endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let children = ports
            .iter()
            .enumerate()
            .map(|(i, (c, p))| {
                Command::new("/usr/bin/etcd")
                    .args(["--name", &format!("m{i}")])
                    .args([
                        "--data-dir",
                        &dir.path().join(format!("m{i}")).display().to_string(),
                    ])
                    .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
                    .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
                    .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
                    .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("etcd in /usr/bin (apt-get install etcd-server)")
            })
            .collect();
        let endpoints = ports
            .iter()
            .map(|(c, _)| format!("http://127.0.0.1:{c}"))
            .collect();
        Self {
            children,
            endpoints,
            _dir: dir,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn header(run: usize) -> JournalHeader {
    JournalHeader::new(
        format!("run-{run}"),
        "bench",
        RunKind::Deploy,
        deploykit::StrategyKind::Rolling,
        ReleaseId::new("v2").expect("valid"),
        Default::default(),
    )
}

fn event(n: usize) -> Event {
    Event {
        deployment: "bench".into(),
        elapsed_ms: n as u64,
        kind: EventKind::Warning {
            instance: None,
            message: format!("record {n}"),
        },
    }
}

/// Microseconds per record: `RECORDS` records, committed every `batch`.
async fn per_record(backend: &dyn StateBackend, run: usize, batch: usize) -> f64 {
    let lock = loop {
        match backend.try_lock("bench").await.expect("lock") {
            StateLock::Acquired(l) => break l,
            StateLock::Held(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let journal: Arc<dyn JournalWriter> = backend.create_journal(&lock, header(run)).await.expect("journal");
    let start = Instant::now();
    for n in 0..RECORDS {
        journal.emit(&event(n));
        if (n + 1) % batch == 0 {
            journal.durable().await.expect("durable");
        }
    }
    journal.durable().await.expect("durable");
    let per = start.elapsed().as_secs_f64() * 1e6 / RECORDS as f64;
    lock.release().await;
    per
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cluster = Cluster::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let local = LocalBackend::new(StateDir::at(dir.path(), "bench").expect("state dir"));
    let etcd = EtcdBackend::new("bench", EtcdConfig::new(cluster.endpoints.clone())).expect("etcd backend");
    rt.block_on(async {
        // Wait (at most 30 s) for the cluster to elect a leader.
        let deadline = Instant::now() + Duration::from_secs(30);
        while etcd.holder().await.is_err() {
            assert!(Instant::now() < deadline, "etcd did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("journal cost per record, {RECORDS} records, median of {RUNS} runs");
        println!("{:<32} {:>14} {:>14}", "backend", "1 per commit", "10 per commit");
        let mut run = 0;
        for (name, backend) in [
            ("local (fdatasync)", &local as &dyn StateBackend),
            ("etcd, 3 members on loopback", &etcd as &dyn StateBackend),
        ] {
            let mut cols = Vec::new();
            for batch in [1, 10] {
                let mut v = Vec::new();
                for _ in 0..RUNS {
                    run += 1;
                    v.push(per_record(backend, run, batch).await);
                }
                cols.push(median(v));
            }
            println!("{name:<32} {:>11.0} µs {:>11.0} µs", cols[0], cols[1]);
        }
    });
}
