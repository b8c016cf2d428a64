//! Zero downtime, measured: open-loop load through real nginx / HAProxy
//! while the real executor replaces 4 demo-app processes v1 → v2, with a
//! keep-alive client that never retries unless a test says otherwise.
//! Rolling must fail no request; recreate must fail some (so the
//! measurement can fail).

use deploykit::lb::nginx::DrainMode;

use crate::load::{run, Client, LbKind, LoadOpts, Outcome, StrategyKind};

/// The p99 latency a rolling deployment may reach: generous, but a request
/// held for a retry loop or a slow drain shows.
const P99_BOUND_MS: f64 = 1000.0;

async fn rolling(lb: LbKind, load: LoadOpts) -> Option<Outcome> {
    let o = run(lb, StrategyKind::Rolling, load).await?;
    let d = o.describe();
    eprintln!("{lb} rolling, {:?} client: {d}", load.client);
    assert!(o.report_success, "{d}");
    // Load really ran during the deployment (not a timing assertion: a
    // deployment of 4 instances takes well over a second of requests).
    assert!(
        o.requests_during_deploy >= 100,
        "too little load during the deployment: {d}"
    );
    assert_eq!(o.final_versions.get("v2"), Some(&100), "{d}");
    Some(o)
}

fn assert_no_failure_and_fast(o: &Outcome) {
    let d = o.describe();
    assert_eq!(o.failures, 0, "rolling deployment failed requests: {d}");
    assert!(
        o.p99_ms <= P99_BOUND_MS,
        "p99 during the deployment above {P99_BOUND_MS} ms: {d}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_upstream_retry_rolling_fails_no_request_of_a_non_retrying_client() {
    let lb = LbKind::Nginx(DrainMode::UpstreamRetry);
    let Some(o) = rolling(lb, LoadOpts::default()).await else {
        return;
    };
    assert_no_failure_and_fast(&o);
    // The whole deployment without a single reload: nginx never closed a
    // client's idle connection.
    assert_eq!(o.reloads, Some(0), "{}", o.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reload_rolling_reloads_twice_per_instance_and_fails_no_request_of_a_retrying_client() {
    // Each reload closes idle client connections under requests already
    // on their way; a client that retries those (browsers do) sees none
    // fail. The non-retrying figures are in the zero_downtime bench.
    let load = LoadOpts {
        client: Client::RetryOnceIfClosed,
        ..LoadOpts::default()
    };
    let Some(o) = rolling(LbKind::Nginx(DrainMode::Reload), load).await else {
        return;
    };
    assert_no_failure_and_fast(&o);
    // Out and back in for each of the 4 instances; nothing more.
    assert_eq!(o.reloads, Some(8), "{}", o.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_reload_rolling_with_a_connection_per_request_fails_no_request() {
    // Without client keep-alive no connection can be closed under a request
    // by a reload: zero failures without any retry.
    let load = LoadOpts {
        keep_alive: false,
        ..LoadOpts::default()
    };
    let Some(o) = rolling(LbKind::Nginx(DrainMode::Reload), load).await else {
        return;
    };
    assert_no_failure_and_fast(&o);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_rolling_fails_no_request_of_a_non_retrying_client() {
    // HAProxy changes state at run time, without a reload: it never closes
    // a client's connection under it.
    let Some(o) = rolling(LbKind::Haproxy, LoadOpts::default()).await else {
        return;
    };
    assert_no_failure_and_fast(&o);
    assert_eq!(o.reloads, None, "{}", o.describe());
}

async fn recreate_fails_requests(lb: LbKind) {
    let Some(o) = run(lb, StrategyKind::Recreate, LoadOpts::default()).await else {
        return;
    };
    let d = o.describe();
    eprintln!("{lb} recreate: {d}");
    assert!(o.report_success, "{d}");
    assert!(
        o.failures > 0,
        "recreate stops every instance at once; the load must see failures: {d}"
    );
    assert_eq!(o.final_versions.get("v2"), Some(&100), "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_recreate_deployment_fails_requests() {
    recreate_fails_requests(LbKind::Nginx(DrainMode::Reload)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_recreate_deployment_fails_requests() {
    recreate_fails_requests(LbKind::Haproxy).await;
}
