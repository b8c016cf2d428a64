//! A flag rollout judged by a real Prometheus: the demo app serves
//! `/api/checkout` from a flagd file, its new flow (variant `on`) errs, and
//! the per-variant PromQL breach kills the flag; clients then get the old
//! flow. Prometheus scrapes every second; stages are seconds long.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploykit::analysis::AnalysisRules;
use deploykit::flags::{FlagChangeKind, FlagRollout, FlagStore, RolloutEvent, RolloutOutcome};
use deploykit::metrics::prometheus::Prometheus;
use deploykit::Metric;
use serde_json::Value;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;

use crate::harness::{temp_dir, DemoApp, DemoOpts, Http};
use crate::prometheus::{wait_for_value, PromServer};

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

#[tokio::test]
async fn a_failing_variant_is_killed_by_a_real_prometheus_breach() {
    let bin = crate::require_binary!("prometheus");
    let dir = temp_dir("deploykit-flag-rollout");
    let file = dir.path().join("flags.json");
    std::fs::write(&file, FLAGS).unwrap();
    let store = FlagStore::new(&file, dir.path().join("flags.jsonl"));
    // Half of the new flow's answers are 500s; the old flow never errs.
    let app = DemoApp::start(DemoOpts::new("v1").args(&[
        "--flags-file",
        file.to_str().unwrap(),
        "--checkout-error-rate-new",
        "0.5",
    ]))
    .await;
    let prom_server = PromServer::start(&bin, dir.path(), &[app.addr.to_string()]).await;
    let prom = Prometheus::builder(prom_server.url(""))
        .timeout(Duration::from_secs(5))
        .error_rate(
            r#"(sum(rate(checkout_requests_total{code=~"5..",variant="{group}"}[{window}])) or vector(0)) / sum(rate(checkout_requests_total{variant="{group}"}[{window}]))"#,
        )
        .latency_p99(
            r#"histogram_quantile(0.99, sum by (le) (rate(checkout_request_duration_seconds_bucket{variant="{group}"}[{window}])))"#,
        )
        .request_count(r#"sum(increase(checkout_requests_total{variant="{group}"}[{window}]))"#)
        .build()
        .unwrap();

    // Load: a new user every 10 ms, counting the new-flow answers.
    let stop = Arc::new(AtomicBool::new(false));
    let new_flow = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, new_flow, url) = (stop.clone(), new_flow.clone(), app.url("/api/checkout"));
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
                sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let window = Duration::from_secs(5);
    // The safe variant has data before the rollout starts.
    wait_for_value(&prom, Metric::ErrorRate, "off", window).await;

    let rollout = FlagRollout {
        flag: "new-checkout".into(),
        variant: "on".into(),
        stages: vec![20, 100],
        stage_duration: Duration::from_secs(15),
        interval: Duration::from_secs(1),
        rules: AnalysisRules {
            window,
            // The `on` series appear only once the split is written and scraped.
            inconclusive_limit: 10,
            ..AnalysisRules::default()
        },
        who: "e2e".into(),
    };
    let mut events = Vec::new();
    let outcome = tokio::time::timeout(
        Duration::from_secs(60),
        rollout.run(&store, &prom, &CancellationToken::new(), |e| events.push(e)),
    )
    .await
    .expect("the rollout ends within 60 s")
    .expect("the rollout runs");
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    let RolloutOutcome::Killed { stage, reason } = &outcome else {
        panic!("not killed: {outcome:?}\n{events:?}\n{}", prom_server.log_text());
    };
    assert_eq!(*stage, 1, "killed at the 20 % stage: {events:?}");
    assert!(
        reason.contains("error rate"),
        "killed by the error-rate breach: {reason}"
    );
    assert!(
        new_flow.load(Ordering::SeqCst) > 0,
        "some users got the new flow before the kill"
    );
    assert!(events.iter().any(|e| matches!(e, RolloutEvent::Killed { .. })));
    let actions: Vec<&'static str> = store
        .history()
        .unwrap()
        .iter()
        .map(|r| match &r.kind {
            FlagChangeKind::Split { percent: 20, .. } => "split 20",
            other => other.name(),
        })
        .collect();
    assert_eq!(actions, ["split 20", "kill"]);

    // Every client now gets the old flow.
    let http = Http::new();
    for n in 0..200 {
        let a = http
            .get(&app.url(&format!("/api/checkout?user=after{n}")))
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        let v: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(v["flow"], "old", "{}", a.body);
        assert_eq!(v["variant"], "off", "{}", a.body);
    }
}
