//! The Kubernetes driver against a small in-memory API server (kube's
//! client over a tower-test mock): the load-balancer conformance suite for
//! Istio and Gateway API.
#![cfg(feature = "kubernetes")]

use deploykit::lb::kubernetes::{KubeBackend, KubernetesTraffic, TrafficApi};
use deploykit::{Address, Backend, Group, InstanceId};
use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

const VS: &str = include_str!("../../src/lb/kubernetes/fixtures/virtualservice.json");
const ROUTE: &str = include_str!("../../src/lb/kubernetes/fixtures/httproute.json");
const CONFLICT: &str = include_str!("../../src/lb/kubernetes/fixtures/conflict-409.json");

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

fn client() -> (kube::Client, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(svc, "default"), handle)
}

fn istio(client: kube::Client) -> KubernetesTraffic {
    KubernetesTraffic::builder(TrafficApi::Istio)
        .client(client)
        .namespace("shop")
        .resource("web")
        .backend(g("stable"), KubeBackend::service("web").subset("stable"))
        .backend(g("canary"), KubeBackend::service("web").subset("canary"))
        .backend(g("shadow"), KubeBackend::service("web-shadow"))
        .build()
        .unwrap()
}

fn gateway(client: kube::Client) -> KubernetesTraffic {
    KubernetesTraffic::builder(TrafficApi::GatewayApi)
        .client(client)
        .namespace("shop")
        .resource("web")
        .backend(g("stable"), KubeBackend::service("web-stable").port(8080))
        .backend(g("canary"), KubeBackend::service("web-canary").port(8080))
        .backend(g("exp"), KubeBackend::service("web-exp").port(8080))
        .backend(g("shadow"), KubeBackend::service("web-shadow").port(8080))
        .build()
        .unwrap()
}

/// Applies a JSON merge patch (RFC 7386) the way the API server does.
fn merge(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().unwrap();
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// A small API server in memory: GET answers the object, PATCH applies a
/// merge patch when its `resourceVersion` is the object's (409 otherwise)
/// and bumps the version, as the real one does.
async fn serve(mut h: Handle, mut object: Value) {
    let mut version: u64 = object["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    while let Some((req, send)) = h.next_request().await {
        let method = req.method().as_str().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let (status, body) = match method.as_str() {
            "GET" => (200, object.to_string()),
            "PATCH" => {
                let p: Value = serde_json::from_slice(&bytes).unwrap();
                if p["metadata"]["resourceVersion"] != object["metadata"]["resourceVersion"] {
                    (409, CONFLICT.to_string())
                } else {
                    merge(&mut object, &p);
                    version += 1;
                    object["metadata"]["resourceVersion"] = json!(version.to_string());
                    (200, object.to_string())
                }
            }
            other => panic!("the driver sent {other}"),
        };
        send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(body.into_bytes()))
                .unwrap(),
        );
    }
}

fn backends_of(groups: &[&str]) -> Vec<Backend> {
    groups
        .iter()
        .enumerate()
        .map(|(i, grp)| Backend {
            id: InstanceId::new(format!("web-{i}")).unwrap(),
            address: Address::parse(&format!("10.0.0.{}:8080", i + 1)).unwrap(),
            group: g(grp),
        })
        .collect()
}

fn suite() -> deploykit_testkit::conformance::LoadBalancerSuite {
    // Traffic only: no per-instance routing, no connection counts, and the
    // driver knows groups, not instances.
    deploykit_testkit::conformance::LoadBalancerSuite::default()
        .without_connection_counts()
        .without_per_backend_routing()
        .without_backend_list()
}

#[tokio::test(start_paused = true)]
async fn istio_passes_the_load_balancer_conformance_suite() {
    let (c, h) = client();
    // Without web-legacy, so that one group can take all traffic.
    let mut object: Value = serde_json::from_str(VS).unwrap();
    object["spec"]["http"][1]["route"] =
        json!([{"destination": {"host": "web", "subset": "stable"}, "weight": 100}]);
    tokio::spawn(serve(h, object));
    let lb = istio(c);
    let done = suite()
        .run(&lb, &backends_of(&["stable", "canary", "shadow"]))
        .await
        .unwrap_or_else(|f| panic!("{f}"));
    use deploykit_testkit::conformance::Clause;
    for c in [
        Clause::LbWeightsReadBack,
        Clause::LbPolicyReadBack,
        Clause::LbPolicyUnsupportedRefused,
        Clause::LbPolicyInvalidRefused,
        Clause::LbPolicyCancelSafe,
    ] {
        assert!(done.passed.contains(&c), "{c} not checked:\n{done}");
    }
}

#[tokio::test(start_paused = true)]
async fn gateway_api_passes_the_load_balancer_conformance_suite() {
    let (c, h) = client();
    let mut object: Value = serde_json::from_str(ROUTE).unwrap();
    object["spec"]["rules"][1]["backendRefs"] = json!([{"name": "web-stable", "port": 8080}]);
    tokio::spawn(serve(h, object));
    let lb = gateway(c);
    suite()
        .run(&lb, &backends_of(&["stable", "canary", "exp", "shadow"]))
        .await
        .unwrap_or_else(|f| panic!("{f}"));
}
