//! The example driver passes the testkit's conformance suite.

use deploykit_example_file_lb::FileLoadBalancer;
use deploykit_testkit::conformance::{backends, Clause, LoadBalancerSuite};

#[tokio::test]
async fn the_file_load_balancer_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let backends = backends(&[
        ("web-1", "127.0.0.1:8001", "blue"),
        ("web-2", "127.0.0.1:8002", "green"),
    ]);
    let lb = FileLoadBalancer::new(dir.path().join("routes"), backends.clone()).unwrap();
    // The proxy keeps the connections: the driver cannot count them.
    let suite = LoadBalancerSuite::default().without_connection_counts();
    let done = suite.run(&lb, &backends).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.skipped.len(), 1, "{done}");
    assert!(
        done.passed.contains(&Clause::LbPolicyUnsupportedRefused),
        "{done}"
    );
}
