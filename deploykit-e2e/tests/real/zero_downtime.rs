//! Zero downtime, measured: load through real nginx / HAProxy while the
//! real executor replaces 4 demo-app processes v1 → v2. Rolling must fail
//! no request; recreate must fail some (so the measurement can fail).

use crate::load::{run, LbKind, LoadOpts, Outcome, StrategyKind};

fn describe(o: &Outcome) -> String {
    format!(
        "requests {} (during deploy {}), failures {} (during deploy {}), retried {}, samples {:?}, \
         rate {:.0}/s, deploy {:?}, final {:?}\nreport: {}",
        o.requests,
        o.requests_during_deploy,
        o.failures,
        o.failures_during_deploy,
        o.retried,
        o.failure_samples,
        o.rate,
        o.deploy,
        o.final_versions,
        o.report
    )
}

async fn rolling_has_zero_failures(lb: LbKind) {
    let Some(o) = run(lb, StrategyKind::Rolling, LoadOpts::default()).await else {
        return;
    };
    let d = describe(&o);
    eprintln!("{lb:?} rolling: {d}");
    assert!(o.report_success, "{d}");
    // Load really ran during the deployment (not a timing assertion: a
    // deployment of 4 instances takes well over a second of requests).
    assert!(
        o.requests_during_deploy >= 100,
        "too little load during the deployment: {d}"
    );
    assert_eq!(o.failures, 0, "rolling deployment failed requests: {d}");
    assert_eq!(o.final_versions.get("v2"), Some(&100), "{d}");
    if lb == LbKind::Haproxy {
        // HAProxy changes state at run time, without a reload: it never
        // closes a client's connection under it.
        assert_eq!(o.retried, 0, "{d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_rolling_with_a_connection_per_request_needs_no_retry() {
    // Without client keep-alive no connection can be closed under a request
    // by a reload: zero failures without any retry.
    let load = LoadOpts {
        keep_alive: false,
        ..LoadOpts::default()
    };
    let Some(o) = run(LbKind::Nginx, StrategyKind::Rolling, load).await else {
        return;
    };
    let d = describe(&o);
    eprintln!("nginx rolling, no keep-alive: {d}");
    assert!(o.report_success, "{d}");
    assert!(
        o.requests_during_deploy >= 100,
        "too little load during the deployment: {d}"
    );
    assert_eq!((o.failures, o.retried), (0, 0), "{d}");
    assert_eq!(o.final_versions.get("v2"), Some(&100), "{d}");
}

async fn recreate_fails_requests(lb: LbKind) {
    let Some(o) = run(lb, StrategyKind::Recreate, LoadOpts::default()).await else {
        return;
    };
    let d = describe(&o);
    eprintln!("{lb:?} recreate: {d}");
    assert!(o.report_success, "{d}");
    assert!(
        o.failures > 0,
        "recreate stops every instance at once; the load must see failures: {d}"
    );
    assert_eq!(o.final_versions.get("v2"), Some(&100), "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_rolling_deployment_fails_no_request() {
    rolling_has_zero_failures(LbKind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_rolling_deployment_fails_no_request() {
    rolling_has_zero_failures(LbKind::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_recreate_deployment_fails_requests() {
    recreate_fails_requests(LbKind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_recreate_deployment_fails_requests() {
    recreate_fails_requests(LbKind::Haproxy).await;
}
