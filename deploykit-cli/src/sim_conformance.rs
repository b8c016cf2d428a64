//! The testkit's conformance suite against the simulated instance and load
//! balancer, whose state lives in files.

use deploykit::{Address, Backend, Group, InstanceId, LoadBalancer, ReleaseId};
use deploykit_testkit::conformance::{Clause, InstanceSuite, LoadBalancerSuite};

use crate::sim::{SimInstance, SimLoadBalancer};

fn backend(id: &str, group: &str) -> Backend {
    Backend {
        id: InstanceId::new(id).unwrap(),
        address: Address::parse("127.0.0.1:9").unwrap(),
        group: Group::new(group).unwrap(),
    }
}

#[tokio::test]
async fn the_simulated_load_balancer_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let lb = SimLoadBalancer::new(dir.path()).unwrap();
    let backends = [backend("web-1", "blue"), backend("web-2", "green")];
    // It routes whatever it is asked to: it is never given its backends.
    let done = LoadBalancerSuite::default()
        .without_backend_list()
        .run(&lb, &backends)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(done.passed.contains(&Clause::LbWeightsReadBack), "{done}");
    // Routing beyond weights is refused by type, changing nothing.
    for c in [
        Clause::LbPolicyReadBack,
        Clause::LbPolicyUnsupportedRefused,
        Clause::LbPolicyInvalidRefused,
        Clause::LbPolicyCancelSafe,
    ] {
        assert!(done.passed.contains(&c), "{c} not checked:\n{done}");
    }
    assert_eq!(lb.live_group().await.unwrap(), Some(Group::new("blue").unwrap()));
}

/// A split read back as the group with all the traffic: `live_group` once
/// kept the last switch's group after weights moved everything elsewhere.
#[tokio::test]
async fn simulated_weights_are_read_back_by_live_group() {
    let dir = tempfile::tempdir().unwrap();
    let lb = SimLoadBalancer::new(dir.path()).unwrap();
    let (blue, green) = (Group::new("blue").unwrap(), Group::new("green").unwrap());
    lb.switch_to(&blue).await.unwrap();
    let w = |g: &Group, percent| deploykit::GroupWeight {
        group: g.clone(),
        percent,
    };
    lb.set_weights(&[w(&blue, 0), w(&green, 100)]).await.unwrap();
    assert_eq!(lb.live_group().await.unwrap(), Some(green.clone()));
    lb.set_weights(&[w(&blue, 10), w(&green, 90)]).await.unwrap();
    assert_eq!(lb.live_group().await.unwrap(), None);
}

#[tokio::test]
async fn the_simulated_instance_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let inst = SimInstance::new(
        backend("web-1", "default"),
        Vec::new(),
        crate::sim_log::FleetLog::new(dir.path()),
    );
    let releases = [ReleaseId::new("v1").unwrap(), ReleaseId::new("v2").unwrap()];
    // A simulated instance keeps no deployment marker.
    let done = InstanceSuite::default()
        .without_markers()
        .run(&inst, &releases)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.skipped.len(), 1, "{done}");
}
