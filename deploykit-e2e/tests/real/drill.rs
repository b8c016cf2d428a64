//! Rollback drills against real servers: the release the fleet runs (v1)
//! deployed as its own canary behind real nginx, scraped by real
//! Prometheus, under load; the canary's demo-app process is killed once
//! checks have passed, and the drill's judge reads the run.

use std::time::Duration;

use deploykit::chaos::drill::{judge, preflight, DrillRefusal};
use deploykit::chaos::Fault;
use deploykit::metrics::prometheus::Prometheus;
use deploykit::{Canary, OutcomeKind};
use tokio::time::{sleep, Instant};

use crate::harness::{temp_dir, DemoApp, DemoOpts, Http};
use crate::prometheus::{canary_run_as, dump, Lb, Mode, PromServer};

/// The drill passes: a check passed before the SIGKILL, the checks after it
/// found no data, and the rollback came within the default budget; the
/// fleet still runs v1, and the load's failed requests are reported.
#[tokio::test]
async fn a_drill_of_the_current_release_behind_nginx_passes_within_budget() {
    let Some(run) = canary_run_as(Lb::Nginx, &[], Vec::new(), Mode::Drill).await else {
        return;
    };
    let r = &run.report;
    assert_eq!(r.outcome, OutcomeKind::RolledBack, "{r}\n{}", dump(&run.log));
    assert_eq!(r.release.as_str(), "v1");
    let v = judge(&run.chaos, &run.log.events());
    assert!(v[0].passed, "{}\n{}", v[0], dump(&run.log));
    assert_eq!(v[0].spec.fault, Fault::Kill);
    assert!(v[0].checks_passed_before > 0, "{}", v[0]);
    let tripped = v[0].tripped.as_ref().expect("a check after the kill");
    assert!(tripped.result.starts_with("no data"), "{}", tripped.result);
    let injected = v[0].injected_at_ms.expect("injected");
    let done = v[0].rolled_back_at_ms.expect("rolled back");
    let budget = v[0].spec.within.expect("a budget");
    assert!(u128::from(done - injected) <= budget.as_millis(), "{}", v[0]);
    // The canary is back on v1 (stopped, as after any canary); stable
    // serves v1 alone.
    assert_eq!(r.instances[2].release.as_ref().map(|r| r.as_str()), Some("v1"));
    assert_eq!(run.after.get("v1"), Some(&100), "{:?}", run.after);
    eprintln!(
        "drill: killed at {:.1}s, first failing check at {:.1}s ({}), rolled back {:.1}s after the kill \
         (budget {}s); {} failed client requests; {:.1}s in all",
        injected as f64 / 1000.0,
        tripped.at_ms as f64 / 1000.0,
        tripped.result,
        (done - injected) as f64 / 1000.0,
        budget.as_secs(),
        run.failed,
        run.took.as_secs_f64()
    );
}

/// Metric templates that match nothing (a typo in the metric's name) are
/// refused before anything is touched, naming each query and what real
/// Prometheus answered, though the demo app serves and is scraped.
#[tokio::test]
async fn a_drill_whose_templates_match_nothing_is_refused_naming_the_query() {
    let bin = crate::require_binary!("prometheus");
    let dir = temp_dir("deploykit-drill-nodata");
    let app = DemoApp::start(DemoOpts::new("v1").track("stable")).await;
    let server = PromServer::start(&bin, dir.path(), &[app.addr.to_string()]).await;
    let canary = Canary {
        check_interval: Duration::from_secs(1),
        ..Canary::default()
    };
    // The same setup with the right templates can fire: the refusal below
    // is about the typo, not about a Prometheus that is not ready.
    let http = Http::new();
    let good = server.source();
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        for _ in 0..20 {
            let _ = http.get(&app.url("/")).await;
        }
        match preflight(&good, &canary, Duration::from_secs(5)).await {
            Ok(()) => break,
            Err(e) => assert!(Instant::now() < end, "the right templates never answered: {e}"),
        }
        sleep(Duration::from_millis(200)).await;
    }
    let typo = Prometheus::builder(server.url(""))
        .error_rate(r#"sum(rate(http_requests_totl{track="{group}",status=~"5.."}[{window}]))"#)
        .request_count(r#"sum(rate(http_requests_totl{track="{group}"}[{window}]))"#)
        .build()
        .unwrap();
    let e = preflight(&typo, &canary, Duration::from_secs(5))
        .await
        .expect_err("templates that match nothing");
    let DrillRefusal::NoData(m) = &e else {
        panic!("not a no-data refusal: {e}");
    };
    let msg = e.to_string();
    assert!(
        msg.starts_with("the gate can never fire on real evidence: "),
        "{msg}"
    );
    assert!(
        msg.contains(r#"stable error rate (query `sum(rate(http_requests_totl{track="stable",status=~"5.."}[300s]))`) answered no data"#),
        "{msg}"
    );
    assert!(
        msg.contains("stable request count (query `sum(rate(http_requests_totl{track=\"stable\"}[300s]))`)"),
        "{msg}"
    );
    // The p99 template is right: only the two typos are named.
    assert_eq!(m.gaps.len(), 2, "{msg}");
}
