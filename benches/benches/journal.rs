//! The cost of the crash-safe journal: a rolling deployment over fake
//! instances with no event sink, with an in-memory event log, and with the
//! `deploykit::state` journal (JSON lines, group commit: one `write` and one
//! `fdatasync` for every record queued when a flush starts), side by side in
//! one run, with the journal's records per flush. Waits are virtual, so the wall time is the
//! executor's own work plus the journal's I/O.
//!
//! Run: `cargo bench -p deploykit-benches --bench journal`
//! (the journal is written under `$TMPDIR`, default `/tmp`: its disk decides
//! the fsync cost).

use std::sync::Arc;
use std::time::{Duration, Instant};

use deploykit::state::{FlushStats, JournalHeader, RunKind, StateDir};
use deploykit::{CountOrPercent, EventLog, EventSink, Executor, ReleaseId, Rolling, RunOptions, Strategy};
use deploykit_testkit::FakeFleet;

#[derive(Clone, Copy, PartialEq)]
enum Sink {
    None,
    Memory,
    Journal,
}

fn once(instances: usize, sink: Sink, run: usize) -> (Duration, u64, Option<FlushStats>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    rt.block_on(async {
        let fleet = FakeFleet::new(instances).without_op_log();
        let exec_for_plan = Executor::builder()
            .instances(fleet.instances())
            .load_balancer(Arc::new(fleet.load_balancer()))
            .build()
            .expect("executor");
        let strategy = Rolling {
            batch_size: CountOrPercent::Count(10),
            ..Rolling::default()
        };
        let release = ReleaseId::new("v2").expect("valid");
        let snapshot = exec_for_plan.snapshot().await.expect("snapshot");
        let plan = strategy.plan(&snapshot, &release).expect("plan");
        let state = StateDir::open(dir.path(), "bench").expect("state dir");
        let journal = (sink == Sink::Journal).then(|| {
            let mut h = JournalHeader::new(
                format!("run-{run}"),
                "bench",
                RunKind::Deploy,
                deploykit::StrategyKind::Rolling,
                release.clone(),
                plan.previous.clone(),
            );
            h.plan = Some(plan.clone());
            Arc::new(state.create_journal(h).expect("journal"))
        });
        let mut b = Executor::builder()
            .instances(fleet.instances())
            .load_balancer(Arc::new(fleet.load_balancer()));
        let log = EventLog::new();
        match sink {
            Sink::None => {}
            Sink::Memory => b = b.events(Arc::new(log.clone())),
            Sink::Journal => b = b.events(journal.clone().expect("journal") as Arc<dyn EventSink>),
        }
        let exec = b.build().expect("executor");
        let start = Instant::now();
        let report = exec
            .run(&plan, RunOptions::default().with_id("bench"))
            .await
            .expect("runs");
        let wall = start.elapsed();
        assert!(report.is_success(), "{report}");
        let records = match (&journal, sink) {
            (Some(j), _) => j.records(),
            (None, Sink::Memory) => log.events().len() as u64,
            _ => 0,
        };
        (wall, records, journal.map(|j| j.flush_stats()))
    })
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let instances = 200;
    let runs = 5;
    let mut rows = Vec::new();
    let mut flushes = Vec::new();
    for (name, sink) in [
        ("no sink", Sink::None),
        ("in-memory log", Sink::Memory),
        ("journal (durable)", Sink::Journal),
    ] {
        let mut walls = Vec::new();
        let mut records = 0;
        for run in 0..runs {
            let (w, r, stats) = once(instances, sink, run);
            walls.push(w);
            records = r;
            if let Some(s) = stats {
                flushes.push((s.flushes(), s.median(), s.max()));
            }
        }
        rows.push((name, median(walls), records));
    }
    println!("rolling deployment of {instances} fake instances, batch 10, median of {runs} runs");
    println!(
        "{:<18} {:>12} {:>9} {:>14}",
        "sink", "wall", "records", "per record"
    );
    let base = rows[0].1;
    for (name, wall, records) in &rows {
        let per = if *records > 0 {
            format!(
                "{:.1} µs",
                wall.saturating_sub(base).as_secs_f64() * 1e6 / *records as f64
            )
        } else {
            "-".into()
        };
        println!(
            "{name:<18} {:>10.1}ms {records:>9} {per:>14}",
            wall.as_secs_f64() * 1000.0
        );
    }
    for (n, median, max) in flushes {
        println!("journal run: {n} flushes, records per flush median {median}, max {max}");
    }
    println!(
        "journal / no sink: {:.1}x",
        rows[2].1.as_secs_f64() / rows[0].1.as_secs_f64().max(1e-9)
    );
}
