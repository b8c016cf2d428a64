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

use std::sync::Arc;
use std::time::{Duration, Instant};

use deploykit::state::{
    EtcdBackend, EtcdConfig, JournalHeader, JournalWriter, LocalBackend, RunKind, StateBackend, StateDir,
    StateLock,
};
use deploykit::{Event, EventKind, ReleaseId};
use deploykit_benches::etcd::Cluster;

const RECORDS: usize = 500;
const RUNS: usize = 5;

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
        cluster.wait_ready().await;
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
