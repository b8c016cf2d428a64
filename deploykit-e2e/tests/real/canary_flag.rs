//! A canary carrying a feature flag, through real processes: nginx weights,
//! demo apps run by `LocalInstance` that serve `/api/checkout` from a
//! flagd file, and a real Prometheus judging the canary. The flag's share
//! follows the stages (read back from the file while the run goes on); the
//! new flow of the canary release errs, its error rate crosses the limit at
//! the second stage, and the rollback kills the flag, so every user then
//! gets the old flow.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploykit::flags::{Context, FlagChangeKind, FlagSet, FlagStore};
use deploykit::{Canary, EventLog, LoadBalancer, OutcomeKind, ReleaseId};
use serde_json::Value;
use tokio::time::sleep;

use crate::harness::{free_port, temp_dir, Http, Nginx};
use crate::prometheus::{real_canary, CanaryFleet};

const FLAGS: &str = r#"{
  "flags": {
    "new-checkout": {
      "state": "ENABLED",
      "variants": { "on": true, "off": false },
      "defaultVariant": "off"
    }
  }
}
"#;

/// The percent of 2,000 targeting keys the flag file serves `on` now.
fn on_percent(file: &std::path::Path) -> Option<f64> {
    let set = FlagSet::parse(&std::fs::read_to_string(file).ok()?).ok()?;
    let on = (0..2_000)
        .filter(|k| {
            let mut ctx = Context::new();
            ctx.insert("targetingKey".into(), Value::String(format!("user-{k}")));
            set.evaluate("new-checkout", &ctx).value == Some(Value::Bool(true))
        })
        .count();
    Some((on as f64) * 100.0 / 2_000.0)
}

#[tokio::test]
async fn a_canary_carrying_a_flag_shares_it_by_stage_and_a_breach_kills_it() {
    let prom_bin = crate::require_binary!("prometheus");
    let nginx_bin = crate::require_binary!("nginx");
    let tmp = temp_dir("deploykit-canary-flag");
    let file = tmp.path().join("flags.json");
    std::fs::write(&file, FLAGS).unwrap();
    let store = FlagStore::new(&file, tmp.path().join("flags.jsonl"));

    // Every instance reads the flag (the flag gates the new flow wherever
    // it runs); the canary's new flow always fails, so its error rate is
    // the flag's share: 20 % at the first stage, 50 % at the second.
    let flags = file.to_str().unwrap().to_owned();
    let fleet = CanaryFleet::start(&prom_bin, tmp.path(), |track| {
        let mut args = vec!["--flags-file".to_owned(), flags.clone()];
        if track == "canary" {
            args.extend(["--checkout-error-rate-new".to_owned(), "1".to_owned()]);
        }
        args
    })
    .await;
    let port = free_port();
    Nginx::write_config(tmp.path(), port);
    let lb = crate::nginx::driver(&nginx_bin, tmp.path(), &fleet.backends);
    lb.install().await.expect("install the upstream file");
    let nginx = Nginx::start(&nginx_bin, tmp.path(), port).await;
    let checkout = nginx.url("/api/checkout");

    // Load through nginx: a new user every 4 ms, counting new-flow answers.
    let stop = Arc::new(AtomicBool::new(false));
    let new_flow = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, new_flow, url) = (stop.clone(), new_flow.clone(), checkout.clone());
        tokio::spawn(async move {
            let http = Http::new();
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                if let Ok(a) = http.get(&format!("{url}?user=u{n}")).await {
                    if a.body.contains(r#""flow":"new""#) {
                        new_flow.fetch_add(1, Ordering::SeqCst);
                    }
                }
                sleep(Duration::from_millis(4)).await;
            }
        })
    };
    // The flag file read back while the run goes on: each distinct share.
    let sampler = {
        let (stop, file) = (stop.clone(), file.clone());
        tokio::spawn(async move {
            // Bucketing 2,000 keys lands within a few points of the split:
            // each reading is named by the nearest multiple of 10, and its
            // distance from it is kept to be checked.
            let (mut shares, mut off_by) = (Vec::<u32>::new(), 0f64);
            loop {
                // One more reading after the run ended, so a kill in its
                // last 100 ms is seen too.
                let last = stop.load(Ordering::SeqCst);
                if let Some(p) = on_percent(&file) {
                    let near = (p / 10.0).round() * 10.0;
                    off_by = off_by.max((p - near).abs());
                    if shares.last() != Some(&(near as u32)) {
                        shares.push(near as u32);
                    }
                }
                if last {
                    break;
                }
                sleep(Duration::from_millis(100)).await;
            }
            (shares, off_by)
        })
    };

    let log = EventLog::new();
    let executor = fleet
        .executor(Arc::new(lb) as Arc<dyn LoadBalancer>, &log)
        .flag_switch(Arc::new(FlagStore::new(&file, tmp.path().join("flags.jsonl"))))
        .build()
        .expect("build the executor");
    let mut canary = Canary {
        flag: Some("new-checkout".into()),
        ..real_canary(vec![20, 50, 100])
    };
    let rules = &mut canary.analysis;
    rules.window = Duration::from_secs(5);
    // 20 % passes, 50 % breaches, with margin for the sampling noise of a
    // few hundred requests and for the window still holding the previous
    // stage; the relative rule starts at the same limit, since stable
    // (whose new flow works) errs not at all.
    rules.error_threshold = 0.35;
    rules.ratio_floor = 0.35;
    rules.min_requests = 40;

    fleet.wait_for_stable_metrics(rules.window).await;
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        executor.deploy(&canary, &ReleaseId::new("v2").unwrap()),
    )
    .await
    .expect("the deployment ends within 60 s")
    .expect("the deployment ran");
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();
    let (shares, off_by) = sampler.await.unwrap();
    let events = || {
        log.events()
            .iter()
            .map(|e| format!("{:>6} {:?}", e.elapsed_ms, e.kind))
            .collect::<Vec<_>>()
            .join("\n")
    };

    assert_eq!(
        report.outcome,
        OutcomeKind::RolledBack,
        "{report}\n{}\n{}",
        events(),
        fleet.prom.log_text()
    );
    assert!(
        report.to_string().contains("error rate"),
        "rolled back by the error rate: {report}"
    );
    // The split followed the stages until the breach, then the kill.
    assert_eq!(shares, [0, 20, 50, 0], "{report}\n{}", events());
    assert!(off_by <= 3.5, "a reading {off_by} points from its split");
    let actions: Vec<String> = store
        .history()
        .unwrap()
        .iter()
        .map(|r| match &r.kind {
            FlagChangeKind::Split { percent, .. } => format!("split {percent}"),
            other => other.name().to_owned(),
        })
        .collect();
    assert_eq!(actions, ["split 20", "split 50", "kill"]);
    assert!(
        new_flow.load(Ordering::SeqCst) > 0,
        "some users got the new flow before the kill"
    );

    // Every user now gets the old flow, through nginx.
    let http = Http::new();
    for n in 0..200 {
        let a = http.get(&format!("{checkout}?user=after{n}")).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        let v: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["flow"], "old", "{}", a.body);
        assert_eq!(v["variant"], "off", "{}", a.body);
    }
    fleet.stop().await;
    drop(nginx);
}
