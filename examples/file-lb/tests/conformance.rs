//! The example driver passes the testkit's conformance suite.

use deploykit::{Address, Backend, Group, InstanceId};
use deploykit_example_file_lb::FileLoadBalancer;
use deploykit_testkit::conformance::LoadBalancerSuite;

fn backend(id: &str, port: u16, group: &str) -> Backend {
    let (id, group) = (InstanceId::new(id).unwrap(), Group::new(group).unwrap());
    Backend {
        id,
        address: Address::parse(&format!("127.0.0.1:{port}")).unwrap(),
        group,
    }
}

#[tokio::test]
async fn the_file_load_balancer_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let backends = vec![backend("web-1", 8001, "blue"), backend("web-2", 8002, "green")];
    let lb = FileLoadBalancer::new(dir.path().join("routes"), backends.clone()).unwrap();
    // The proxy keeps the connections: the driver cannot count them.
    let suite = LoadBalancerSuite::default().without_connection_counts();
    let done = suite.run(&lb, &backends).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.skipped.len(), 1, "{done}");
}
