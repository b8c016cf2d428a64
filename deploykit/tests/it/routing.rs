//! Routing policies on the testkit's fake load balancer: weights and
//! switches are policies too, through the trait's default `apply_policy`.

use std::collections::BTreeMap;

use deploykit::routing::{Match, Mirror, Rule, TrafficPolicy, ValueMatch};
use deploykit::{Group, GroupWeight, LoadBalancer};
use deploykit_testkit::FakeFleet;

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_fake_balancer_applies_weight_and_switch_policies_and_refuses_the_rest_untouched() {
    let fleet = FakeFleet::with_groups(&[("stable", 2), ("canary", 1)]);
    let lb = fleet.load_balancer();
    let split = [
        GroupWeight {
            group: g("stable"),
            percent: 75,
        },
        GroupWeight {
            group: g("canary"),
            percent: 25,
        },
    ];
    lb.apply_policy(&TrafficPolicy::weights(&split)).await.unwrap();
    assert_eq!(
        lb.weights(),
        Some(BTreeMap::from([(g("stable"), 75), (g("canary"), 25)]))
    );
    lb.apply_policy(&TrafficPolicy::switch(&g("canary")))
        .await
        .unwrap();
    assert_eq!(fleet.live_group(), Some(g("canary")));

    let before = (lb.weights(), fleet.live_group());
    let rules = TrafficPolicy {
        rules: vec![Rule {
            matches: Match::Cookie {
                name: "beta".into(),
                value: ValueMatch::Exact("yes".into()),
            },
            group: g("canary"),
        }],
        ..TrafficPolicy::weights(&split)
    };
    let e = lb.apply_policy(&rules).await.unwrap_err();
    assert!(e.message().contains("cannot route by cookie"), "{e}");
    let mirror = TrafficPolicy {
        mirror: Some(Mirror::new(g("canary"), 10)),
        ..TrafficPolicy::switch(&g("stable"))
    };
    let e = lb.apply_policy(&mirror).await.unwrap_err();
    assert!(e.message().contains("cannot mirror requests"), "{e}");
    assert_eq!(
        (lb.weights(), fleet.live_group()),
        before,
        "a refused policy changed routing"
    );
}
