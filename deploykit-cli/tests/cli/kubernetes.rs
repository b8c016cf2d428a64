//! `kind = "istio"` end to end: the binary, its kubeconfig handling and
//! kube's HTTP client against a small API server on 127.0.0.1 that keeps
//! one VirtualService (GET, and merge-patch PATCH checked against its
//! resourceVersion, as the real one does).

use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use crate::util::Env;

const PATH: &str = "/apis/networking.istio.io/v1/namespaces/shop/virtualservices/web";

/// Applies a JSON merge patch (RFC 7386).
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

struct FakeApi {
    url: String,
    object: Arc<Mutex<Value>>,
    patches: Arc<Mutex<Vec<Value>>>,
}

fn status(code: u16, reason: &str, message: &str) -> String {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
    .to_string()
}

fn fake_api(object: Value) -> FakeApi {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let object = Arc::new(Mutex::new(object));
    let patches = Arc::new(Mutex::new(Vec::new()));
    let (obj, log) = (object.clone(), patches.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            if reader.read_line(&mut request).unwrap_or(0) == 0 {
                continue;
            }
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let mut parts = request.split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = target.split('?').next().unwrap_or("");
            let mut o = obj.lock().unwrap();
            let (code, answer) = match (method, path == PATH) {
                (_, false) => (
                    404,
                    status(
                        404,
                        "NotFound",
                        "the server could not find the requested resource",
                    ),
                ),
                ("GET", true) => (200, o.to_string()),
                ("PATCH", true) => {
                    let p: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    log.lock().unwrap().push(p.clone());
                    if p["metadata"]["resourceVersion"] != o["metadata"]["resourceVersion"] {
                        (409, status(409, "Conflict", "the object has been modified"))
                    } else {
                        merge(&mut o, &p);
                        let next = o["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap()
                            .parse::<u64>()
                            .unwrap()
                            + 1;
                        o["metadata"]["resourceVersion"] = json!(next.to_string());
                        (200, o.to_string())
                    }
                }
                _ => (405, status(405, "MethodNotAllowed", "no")),
            };
            drop(o);
            let _ = write!(
                stream,
                "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                answer.len()
            );
        }
    });
    FakeApi { url, object, patches }
}

fn weights(api: &FakeApi) -> Value {
    api.object.lock().unwrap()["spec"]["http"][1]["route"].clone()
}

#[test]
fn blue_green_switches_an_istio_virtualservice_through_a_kubeconfig() {
    let api = fake_api(json!({
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "100", "uid": "1c9e"},
        "spec": {
            "hosts": ["shop.example.com"],
            "http": [
                {"name": "admin", "route": [{"destination": {"host": "admin"}}]},
                {"name": "deploykit", "timeout": "5s", "route": [
                    {"destination": {"host": "web", "subset": "blue"}, "weight": 100}
                ]}
            ]
        }
    }));
    let cfg = "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"blue-1\"\naddress = \"127.0.0.1:18491\"\ngroup = \"blue\"\n\n\
        [[instances]]\nid = \"green-1\"\naddress = \"127.0.0.1:18492\"\ngroup = \"green\"\n\n\
        [load_balancer]\nkind = \"istio\"\nnamespace = \"shop\"\nresource = \"web\"\n\
        kubeconfig = \"kube/config\"\ncontext = \"fake\"\n\
        services.blue = { service = \"web\", subset = \"blue\" }\n\
        services.green = { service = \"web\", subset = \"green\" }\n\n\
        [strategy]\nkind = \"blue-green\"\n\n\
        [strategy.blue-green]\nhealth_interval = \"50ms\"\nhealthy_deadline = \"5s\"\nwarmup_requests = 1\nkeep_old = \"0s\"\n";
    let env = Env::new(cfg);
    std::fs::create_dir(env.path().join("kube")).unwrap();
    std::fs::write(
        env.path().join("kube/config"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: nobody\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: nobody\n\
             current-context: fake\n",
            api.url
        ),
    )
    .unwrap();

    env.ok(&["validate"], 0);
    env.ok(&["setup"], 0);
    assert!(api.patches.lock().unwrap().is_empty(), "setup only reads");

    env.ok(&["deploy", "v1"], 0);
    assert_eq!(
        weights(&api),
        json!([
            {"destination": {"host": "web", "subset": "blue"}, "weight": 0},
            {"destination": {"host": "web", "subset": "green"}, "weight": 100}
        ])
    );
    env.ok(&["deploy", "v2"], 0);
    assert_eq!(
        weights(&api),
        json!([
            {"destination": {"host": "web", "subset": "blue"}, "weight": 100},
            {"destination": {"host": "web", "subset": "green"}, "weight": 0}
        ])
    );
    let o = api.object.lock().unwrap().clone();
    // Only the managed route changed; every write named the version it read.
    assert_eq!(
        o["spec"]["http"][0],
        json!({"name": "admin", "route": [{"destination": {"host": "admin"}}]})
    );
    assert_eq!(o["spec"]["http"][1]["timeout"], "5s");
    assert_eq!(o["spec"]["hosts"], json!(["shop.example.com"]));
    let patches = api.patches.lock().unwrap().clone();
    assert!(!patches.is_empty());
    for p in &patches {
        assert!(p["metadata"]["resourceVersion"].is_string(), "{p}");
        assert_eq!(
            p.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["metadata", "spec"],
            "{p}"
        );
    }
    assert_eq!(
        o["metadata"]["resourceVersion"],
        json!((100 + patches.len()).to_string()),
        "every patch applied, none refused"
    );
}

#[test]
fn an_unreachable_api_server_refuses_the_deployment_naming_the_object() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"blue-1\"\naddress = \"127.0.0.1:18493\"\ngroup = \"blue\"\n\n\
        [[instances]]\nid = \"green-1\"\naddress = \"127.0.0.1:18494\"\ngroup = \"green\"\n\n\
        [load_balancer]\nkind = \"istio\"\nnamespace = \"shop\"\nresource = \"web\"\nkubeconfig = \"kubeconfig\"\n\
        services.blue = { service = \"web\", subset = \"blue\" }\n\
        services.green = { service = \"web\", subset = \"green\" }\n\n\
        [strategy]\nkind = \"blue-green\"\n";
    let env = Env::new(cfg);
    std::fs::write(
        env.path().join("kubeconfig"),
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
             current-context: c\n"
        ),
    )
    .unwrap();
    let (code, out, err) = env.run(&["deploy", "v1"]);
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("could not read VirtualService shop/web"),
        "{out}\n{err}"
    );
    // Said once, by deploykit, not again by kube's own log line.
    assert!(!err.contains(" ERROR "), "{err}");
}
