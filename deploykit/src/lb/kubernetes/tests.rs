//! The driver against a scripted API server (tower-test's mock in place of
//! kube's HTTP stack): every request's method, path and body asserted
//! exactly, answered with fixtures shaped as the API server answers
//! (`fixtures/`).

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;

use super::*;
use crate::routing::{Match, Mirror, Rule, Split, ValueMatch};

type Handle = mock::Handle<Request<Body>, Response<Body>>;

const VS: &str = include_str!("fixtures/virtualservice.json");
const ROUTE: &str = include_str!("fixtures/httproute.json");
const CONFLICT: &str = include_str!("fixtures/conflict-409.json");
const NOT_FOUND: &str = include_str!("fixtures/notfound-404.json");
const FORBIDDEN: &str = include_str!("fixtures/forbidden-403.json");

const VS_PATH: &str = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/web";
const VS_PATCH: &str =
    "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/web?&fieldManager=deploykit";
const ROUTE_PATH: &str = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web";
const ROUTE_PATCH: &str =
    "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/web?&fieldManager=deploykit";

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

fn w(s: &str, p: u8) -> GroupWeight {
    GroupWeight {
        group: g(s),
        percent: p,
    }
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

/// Takes the next request, checks its method and path (with query),
/// answers `status` with `body`, and returns the request's JSON body (null
/// when it has none).
async fn answer(h: &mut Handle, method: &str, path: &str, status: u16, body: &str) -> Value {
    exchange(h, method, path, |_| (status, body.to_string())).await
}

/// Takes the next PATCH, answers it with `object` patched as the API server
/// would at resourceVersion `rv`, and returns the patch.
async fn patch(h: &mut Handle, path: &str, object: &str, rv: &str) -> Value {
    exchange(h, "PATCH", path, |p| (200, patched(object, p, rv))).await
}

/// Like [`answer`], with the answer computed from the request body.
async fn exchange(
    h: &mut Handle,
    method: &str,
    path: &str,
    reply: impl FnOnce(&Value) -> (u16, String),
) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(30), h.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request came; expected {method} {path}"))
        .unwrap_or_else(|| panic!("the client was dropped; expected {method} {path}"));
    assert_eq!(
        (req.method().as_str(), req.uri().to_string().as_str()),
        (method, path)
    );
    if method == "PATCH" {
        assert_eq!(req.headers()["content-type"], "application/merge-patch+json");
    }
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let sent = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let (status, body) = reply(&sent);
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.as_bytes().to_vec()))
            .unwrap(),
    );
    sent
}

/// Asserts the driver sends nothing more.
async fn no_more(h: &mut Handle) {
    if let Ok(Some((req, _))) = tokio::time::timeout(Duration::from_secs(30), h.next_request()).await {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
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

/// `object` after `patch`, at resourceVersion `rv`, as the API server
/// answers it.
fn patched(object: &str, patch: &Value, rv: &str) -> String {
    let mut o: Value = serde_json::from_str(object).unwrap();
    let mut p = patch.clone();
    p["metadata"]["resourceVersion"] = json!(rv);
    merge(&mut o, &p);
    o.to_string()
}

fn admin_route() -> Value {
    json!({"match": [{"uri": {"prefix": "/admin"}}], "name": "admin", "route": [{"destination": {"host": "admin"}}]})
}

#[tokio::test(start_paused = true)]
async fn istio_weights_keep_unmanaged_destinations_and_fields_and_share_the_rest_in_proportion() {
    let (c, mut h) = client();
    let lb = istio(c);
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.set_weights(&[w("stable", 80), w("canary", 20)]).await }
    });
    assert_eq!(answer(&mut h, "GET", VS_PATH, 200, VS).await, Value::Null);
    let body = patch(&mut h, VS_PATCH, VS, "4712").await;
    // web-legacy (not deploykit's) keeps its 10; the managed groups share
    // 90 as 80:20, the canary destination is added, timeout and retries stay.
    let expected = json!({
        "metadata": {"resourceVersion": "4711"},
        "spec": {"http": [
            admin_route(),
            {
                "match": [{"uri": {"prefix": "/"}}],
                "name": "deploykit",
                "retries": {"attempts": 3, "perTryTimeout": "2s"},
                "route": [
                    {"destination": {"host": "web", "subset": "stable"}, "weight": 72},
                    {"destination": {"host": "web-legacy", "port": {"number": 8080}}, "weight": 10},
                    {"destination": {"host": "web", "subset": "canary"}, "weight": 18}
                ],
                "timeout": "5s"
            }
        ]}
    });
    assert_eq!(body, expected);
    answer(&mut h, "GET", VS_PATH, 200, &patched(VS, &body, "4712")).await;
    call.await.unwrap().unwrap();
    drop(lb);
    no_more(&mut h).await;
}

#[tokio::test(start_paused = true)]
async fn istio_a_live_policy_is_not_written_again() {
    let (c, mut h) = client();
    let lb = istio(c);
    // The fixture already sends all of deploykit's share (90) to stable.
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.switch_to(&g("stable")).await }
    });
    answer(&mut h, "GET", VS_PATH, 200, VS).await;
    call.await.unwrap().unwrap();
    drop(lb);
    no_more(&mut h).await;
}

#[tokio::test(start_paused = true)]
async fn istio_conflict_rereads_and_patches_the_new_version() {
    let (c, mut h) = client();
    let lb = istio(c);
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.set_weights(&[w("stable", 80), w("canary", 20)]).await }
    });
    answer(&mut h, "GET", VS_PATH, 200, VS).await;
    let first = answer(&mut h, "PATCH", VS_PATCH, 409, CONFLICT).await;
    assert_eq!(first["metadata"]["resourceVersion"], "4711");
    // Meanwhile someone gave web-legacy 20: the retry is computed from that.
    let mut theirs: Value = serde_json::from_str(VS).unwrap();
    theirs["metadata"]["resourceVersion"] = json!("4713");
    theirs["spec"]["http"][1]["route"][1]["weight"] = json!(20);
    theirs["spec"]["http"][1]["route"][0]["weight"] = json!(80);
    let theirs = theirs.to_string();
    answer(&mut h, "GET", VS_PATH, 200, &theirs).await;
    let second = patch(&mut h, VS_PATCH, &theirs, "4714").await;
    assert_eq!(second["metadata"]["resourceVersion"], "4713");
    assert_eq!(
        second["spec"]["http"][1]["route"],
        json!([
            {"destination": {"host": "web", "subset": "stable"}, "weight": 64},
            {"destination": {"host": "web-legacy", "port": {"number": 8080}}, "weight": 20},
            {"destination": {"host": "web", "subset": "canary"}, "weight": 16}
        ])
    );
    answer(&mut h, "GET", VS_PATH, 200, &patched(&theirs, &second, "4714")).await;
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn istio_conflicts_without_end_give_up_transiently_after_five_writes() {
    let (c, mut h) = client();
    let lb = istio(c);
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.set_weights(&[w("stable", 50), w("canary", 50)]).await }
    });
    for _ in 0..5 {
        answer(&mut h, "GET", VS_PATH, 200, VS).await;
        answer(&mut h, "PATCH", VS_PATCH, 409, CONFLICT).await;
    }
    let e = call.await.unwrap().unwrap_err();
    assert!(e.is_transient(), "{e}");
    assert!(
        e.message()
            .contains("VirtualService shop/web changed under deploykit 5 times in a row"),
        "{e}"
    );
    drop(lb);
    no_more(&mut h).await;
}

#[tokio::test(start_paused = true)]
async fn istio_read_back_that_does_not_show_the_change_fails() {
    let (c, mut h) = client();
    let lb = istio(c);
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.set_weights(&[w("stable", 80), w("canary", 20)]).await }
    });
    answer(&mut h, "GET", VS_PATH, 200, VS).await;
    patch(&mut h, VS_PATCH, VS, "4712").await;
    // A webhook (or another writer) put the old routes back.
    answer(&mut h, "GET", VS_PATH, 200, VS).await;
    let e = call.await.unwrap().unwrap_err();
    assert!(
        e.message()
            .contains("read back after the patch does not route as asked"),
        "{e}"
    );
}

#[tokio::test(start_paused = true)]
async fn istio_rules_and_mirror_become_named_routes_before_the_managed_one_and_go_again() {
    let (c, mut h) = client();
    let lb = istio(c);
    let mut mirror = Mirror::new(g("shadow"), 5);
    mirror.methods = vec!["GET".into(), "HEAD".into()];
    let policy = TrafficPolicy {
        rules: vec![Rule {
            matches: Match::Header {
                name: "X-Canary".into(),
                value: ValueMatch::Exact("always".into()),
            },
            group: g("canary"),
        }],
        split: Split {
            weights: vec![w("stable", 90), w("canary", 10)],
            sticky: None,
        },
        mirror: Some(mirror),
    };
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.apply_policy(&policy).await }
    });
    answer(&mut h, "GET", VS_PATH, 200, VS).await;
    let body = patch(&mut h, VS_PATCH, VS, "4712").await;
    let common = json!({"retries": {"attempts": 3, "perTryTimeout": "2s"}, "timeout": "5s"});
    let split = json!([
        {"destination": {"host": "web", "subset": "stable"}, "weight": 81},
        {"destination": {"host": "web-legacy", "port": {"number": 8080}}, "weight": 10},
        {"destination": {"host": "web", "subset": "canary"}, "weight": 9}
    ]);
    let to_canary = json!([{"destination": {"host": "web", "subset": "canary"}, "weight": 100}]);
    let header = json!({"x-canary": {"exact": "always"}});
    let with = |extra: Value| {
        let mut r = common.clone();
        merge(&mut r, &extra);
        r
    };
    let expected = json!({
        "metadata": {"resourceVersion": "4711"},
        "spec": {"http": [
            admin_route(),
            with(json!({
                "name": "deploykit-match-0-mirror",
                "match": [
                    {"uri": {"prefix": "/"}, "headers": header, "method": {"exact": "GET"}},
                    {"uri": {"prefix": "/"}, "headers": header, "method": {"exact": "HEAD"}}
                ],
                "route": to_canary,
                "mirror": {"host": "web-shadow"},
                "mirrorPercentage": {"value": 5.0}
            })),
            with(json!({
                "name": "deploykit-match-0",
                "match": [{"uri": {"prefix": "/"}, "headers": header}],
                "route": to_canary
            })),
            with(json!({
                "name": "deploykit-mirror",
                "match": [
                    {"uri": {"prefix": "/"}, "method": {"exact": "GET"}},
                    {"uri": {"prefix": "/"}, "method": {"exact": "HEAD"}}
                ],
                "route": split,
                "mirror": {"host": "web-shadow"},
                "mirrorPercentage": {"value": 5.0}
            })),
            with(json!({"name": "deploykit", "match": [{"uri": {"prefix": "/"}}], "route": split}))
        ]}
    });
    assert_eq!(body, expected);
    let now = patched(VS, &body, "4712");
    answer(&mut h, "GET", VS_PATH, 200, &now).await;
    call.await.unwrap().unwrap();

    // With the rule routes in place nobody has all traffic.
    let live = tokio::spawn({
        let lb = lb.clone();
        async move { lb.live_group().await }
    });
    answer(&mut h, "GET", VS_PATH, 200, &now).await;
    assert_eq!(live.await.unwrap().unwrap(), None);

    // A plain switch removes every derived route, found by name.
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.switch_to(&g("stable")).await }
    });
    answer(&mut h, "GET", VS_PATH, 200, &now).await;
    let body = patch(&mut h, VS_PATCH, &now, "4713").await;
    assert_eq!(
        body["spec"]["http"],
        json!([
            admin_route(),
            with(
                json!({"name": "deploykit", "match": [{"uri": {"prefix": "/"}}], "route": [
                    {"destination": {"host": "web", "subset": "stable"}, "weight": 90},
                    {"destination": {"host": "web-legacy", "port": {"number": 8080}}, "weight": 10},
                    {"destination": {"host": "web", "subset": "canary"}, "weight": 0}
                ]})
            )
        ])
    );
    answer(&mut h, "GET", VS_PATH, 200, &patched(&now, &body, "4713")).await;
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn istio_live_group_is_the_one_group_with_weight() {
    let (c, mut h) = client();
    let lb = istio(c);
    let mut only_stable: Value = serde_json::from_str(VS).unwrap();
    only_stable["spec"]["http"][1]["route"][1]["weight"] = json!(0);
    only_stable["spec"]["http"][1]["route"][0]["weight"] = json!(100);
    for (object, want) in [
        (VS.to_string(), None),
        (only_stable.to_string(), Some(g("stable"))),
    ] {
        let live = tokio::spawn({
            let lb = lb.clone();
            async move { lb.live_group().await }
        });
        answer(&mut h, "GET", VS_PATH, 200, &object).await;
        // The fixture's web-legacy takes 10 %: no group of deploykit has all.
        assert_eq!(live.await.unwrap().unwrap(), want);
    }
}

#[tokio::test(start_paused = true)]
async fn a_missing_route_and_a_forbidden_patch_say_what_to_fix() {
    let (c, mut h) = client();
    let lb = KubernetesTraffic::builder(TrafficApi::Istio)
        .client(c)
        .namespace("shop")
        .resource("web")
        .route("canary")
        .backend(g("stable"), KubeBackend::service("web").subset("stable"))
        .build()
        .unwrap();
    let pre = tokio::spawn({
        let lb = lb.clone();
        async move { lb.preflight().await }
    });
    answer(&mut h, "GET", VS_PATH, 200, VS).await;
    let e = pre.await.unwrap().unwrap_err();
    assert_eq!(
        e.message(),
        "VirtualService shop/web has no http route named canary; add `name: canary` to the http route \
         deploykit should manage (docs/kubernetes.md)"
    );
    assert_eq!(e.preflight_failure(), Some(PreflightFailure::NotWired));

    let (c, mut h) = client();
    let lb = istio(c);
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.set_weights(&[w("stable", 50), w("canary", 50)]).await }
    });
    answer(&mut h, "GET", VS_PATH, 200, VS).await;
    answer(&mut h, "PATCH", VS_PATCH, 403, FORBIDDEN).await;
    let e = call.await.unwrap().unwrap_err();
    assert!(!e.is_transient());
    assert!(
        e.message().starts_with(
            "the API server refused to patch VirtualService shop/web: virtualservices.networking.istio.io \"web\" is forbidden"
        ),
        "{e}"
    );
    assert!(
        e.message()
            .ends_with("(get and patch on virtualservices.networking.istio.io)"),
        "{e}"
    );
    drop(lb);
    no_more(&mut h).await;
}

#[tokio::test(start_paused = true)]
async fn gateway_weights_are_proportions_for_three_groups_and_keep_unmanaged_refs() {
    let (c, mut h) = client();
    let lb = gateway(c);
    let call = tokio::spawn({
        let lb = lb.clone();
        async move {
            lb.set_weights(&[w("stable", 50), w("canary", 30), w("exp", 20)])
                .await
        }
    });
    answer(&mut h, "GET", ROUTE_PATH, 200, ROUTE).await;
    let body = patch(&mut h, ROUTE_PATCH, ROUTE, "816").await;
    let original: Value = serde_json::from_str(ROUTE).unwrap();
    let expected = json!({
        "metadata": {"resourceVersion": "815"},
        "spec": {"rules": [
            original["spec"]["rules"][0],
            {
                "backendRefs": [
                    {"group": "", "kind": "Service", "name": "web-stable", "port": 8080, "weight": 50},
                    {"group": "", "kind": "Service", "name": "web-legacy", "port": 8080, "weight": 1},
                    {"name": "web-canary", "port": 8080, "weight": 30},
                    {"name": "web-exp", "port": 8080, "weight": 20}
                ],
                "filters": original["spec"]["rules"][1]["filters"],
                "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                "name": "deploykit"
            }
        ]}
    });
    assert_eq!(body, expected);
    answer(&mut h, "GET", ROUTE_PATH, 200, &patched(ROUTE, &body, "816")).await;
    call.await.unwrap().unwrap();
    drop(lb);
    no_more(&mut h).await;
}

#[tokio::test(start_paused = true)]
async fn gateway_header_rule_and_mirror_become_named_rules_with_method_matches() {
    let (c, mut h) = client();
    let lb = gateway(c);
    let mut mirror = Mirror::new(g("shadow"), 25);
    mirror.methods = vec!["GET".into()];
    let policy = TrafficPolicy {
        rules: vec![Rule {
            matches: Match::Header {
                name: "x-canary".into(),
                value: ValueMatch::Prefix("yes".into()),
            },
            group: g("canary"),
        }],
        split: Split {
            weights: vec![w("stable", 100)],
            sticky: None,
        },
        mirror: Some(mirror),
    };
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.apply_policy(&policy).await }
    });
    answer(&mut h, "GET", ROUTE_PATH, 200, ROUTE).await;
    let body = patch(&mut h, ROUTE_PATCH, ROUTE, "816").await;
    let original: Value = serde_json::from_str(ROUTE).unwrap();
    let modifier = original["spec"]["rules"][1]["filters"][0].clone();
    let mirror_filter = json!({"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "web-shadow", "port": 8080}, "percent": 25}});
    let path = json!({"type": "PathPrefix", "value": "/"});
    let header = json!([{"type": "RegularExpression", "name": "x-canary", "value": "^yes.*"}]);
    let to_canary = json!([{"name": "web-canary", "port": 8080, "weight": 1}]);
    let split = json!([
        {"group": "", "kind": "Service", "name": "web-stable", "port": 8080, "weight": 100},
        {"group": "", "kind": "Service", "name": "web-legacy", "port": 8080, "weight": 1}
    ]);
    let expected = json!([
        original["spec"]["rules"][0],
        {
            "name": "deploykit-match-0-mirror",
            "matches": [{"path": path, "headers": header, "method": "GET"}],
            "filters": [modifier, mirror_filter],
            "backendRefs": to_canary
        },
        {
            "name": "deploykit-match-0",
            "matches": [{"path": path, "headers": header}],
            "filters": [modifier],
            "backendRefs": to_canary
        },
        {
            "name": "deploykit-mirror",
            "matches": [{"path": path, "method": "GET"}],
            "filters": [modifier, mirror_filter],
            "backendRefs": split
        },
        {
            "name": "deploykit",
            "matches": [{"path": path}],
            "filters": [modifier],
            "backendRefs": split
        }
    ]);
    assert_eq!(body["spec"]["rules"], expected);
    assert_eq!(body["metadata"]["resourceVersion"], "815");
    answer(&mut h, "GET", ROUTE_PATH, 200, &patched(ROUTE, &body, "816")).await;
    call.await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn gateway_refuses_a_header_rule_after_a_query_rule_before_writing() {
    let (c, mut h) = client();
    let lb = gateway(c);
    let rule = |matches, group: &str| Rule {
        matches,
        group: g(group),
    };
    let policy = TrafficPolicy {
        rules: vec![
            rule(
                Match::Query {
                    name: "beta".into(),
                    value: ValueMatch::Exact("1".into()),
                },
                "canary",
            ),
            rule(
                Match::Header {
                    name: "x-exp".into(),
                    value: ValueMatch::Exact("1".into()),
                },
                "exp",
            ),
        ],
        ..TrafficPolicy::switch(&g("stable"))
    };
    let call = tokio::spawn({
        let lb = lb.clone();
        async move { lb.apply_policy(&policy).await }
    });
    answer(&mut h, "GET", ROUTE_PATH, 200, ROUTE).await;
    let e = call.await.unwrap().unwrap_err();
    assert!(
        e.message().starts_with(
            "cannot route rules[1] through HTTPRoute shop/web: Gateway API ranks header matches"
        ),
        "{e}"
    );
    drop(lb);
    no_more(&mut h).await;
}

#[tokio::test(start_paused = true)]
async fn gateway_missing_route_is_not_wired_and_cookies_and_sticky_are_refused_untouched() {
    let (c, mut h) = client();
    let lb = gateway(c);
    let pre = tokio::spawn({
        let lb = lb.clone();
        async move { lb.preflight().await }
    });
    answer(&mut h, "GET", ROUTE_PATH, 404, NOT_FOUND).await;
    let e = pre.await.unwrap().unwrap_err();
    assert!(
        e.message().starts_with(
            "HTTPRoute shop/web does not exist (or its CRD is not installed): httproutes.gateway.networking.k8s.io \"web\" not found"
        ),
        "{e}"
    );
    assert_eq!(e.preflight_failure(), Some(PreflightFailure::NotWired));
    assert!(!e.is_transient());

    let sticky = TrafficPolicy {
        split: Split {
            weights: vec![w("stable", 90), w("canary", 10)],
            sticky: Some(crate::routing::Sticky::Cookie { name: "dk".into() }),
        },
        ..TrafficPolicy::switch(&g("stable"))
    };
    let e = lb.apply_policy(&sticky).await.unwrap_err();
    assert!(
        e.message()
            .starts_with("the gateway-api load balancer cannot keep users on one group"),
        "{e}"
    );
    let cookie = TrafficPolicy {
        rules: vec![Rule {
            matches: Match::Cookie {
                name: "beta".into(),
                value: ValueMatch::Exact("1".into()),
            },
            group: g("canary"),
        }],
        ..TrafficPolicy::switch(&g("stable"))
    };
    let e = lb.apply_policy(&cookie).await.unwrap_err();
    assert!(
        e.message()
            .starts_with("the gateway-api load balancer cannot route by cookie"),
        "{e}"
    );
    let unknown = TrafficPolicy::switch(&g("green"));
    let e = lb.apply_policy(&unknown).await.unwrap_err();
    assert!(e.message().contains("no backend in group green"), "{e}");
    drop(lb);
    no_more(&mut h).await;
}

#[tokio::test]
async fn build_names_the_setting_at_fault() {
    let (c, _h) = client();
    let base = || {
        KubernetesTraffic::builder(TrafficApi::GatewayApi)
            .client(c.clone())
            .namespace("shop")
            .resource("web")
    };
    let cases: [(KubernetesTrafficBuilder, &str); 6] = [
        (
            base().backend(g("stable"), KubeBackend::service("web")),
            "invalid load_balancer.services.stable.port: is missing",
        ),
        (
            base().backend(g("stable"), KubeBackend::service("web").port(80).subset("v1")),
            "invalid load_balancer.services.stable.subset: is an Istio DestinationRule subset",
        ),
        (
            base()
                .namespace("Shop")
                .backend(g("stable"), KubeBackend::service("web").port(80)),
            "invalid load_balancer.namespace: 'Shop' is not a DNS-1123 label",
        ),
        (base(), "invalid load_balancer.services: is empty"),
        (
            base()
                .backend(g("a"), KubeBackend::service("web").port(80))
                .backend(g("b"), KubeBackend::service("web").port(80)),
            "invalid load_balancer.services.b: routes to the same backend as group a",
        ),
        (
            base()
                .route("x_y")
                .backend(g("a"), KubeBackend::service("web").port(80)),
            "invalid load_balancer.route: 'x_y' is not a DNS-1123 label",
        ),
    ];
    for (builder, want) in cases {
        let e = builder.build().unwrap_err().to_string();
        assert!(e.starts_with(want), "{e}\nwanted: {want}");
    }
}

#[tokio::test]
async fn the_driver_claims_what_both_apis_can_route() {
    let (c, _h) = client();
    let caps = istio(c).capabilities();
    for cap in [
        Capability::Weights,
        Capability::Switch,
        Capability::HeaderMatch,
        Capability::QueryMatch,
        Capability::RegexMatch,
        Capability::Mirror,
    ] {
        assert!(caps.supports(cap), "{cap}");
    }
    for cap in [
        Capability::CookieMatch,
        Capability::StickyCookie,
        Capability::StickyKey,
    ] {
        assert!(!caps.supports(cap), "{cap}");
    }
}
