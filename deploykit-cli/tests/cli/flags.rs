//! `deploykit flags …`: validation and refusals, the kill switch (journal,
//! history, webhook), and OFREP over real HTTP on 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::notify::{server, Behaviour};
use crate::util::{assert_has, simulated, Env};

const FLAGS: &str = r#"{
  "flags": {
    "new-checkout": {
      "state": "ENABLED",
      "variants": { "on": true, "off": false },
      "defaultVariant": "off",
      "targeting": { "if": [ { "==": [ { "var": "segment" }, "internal" ] }, "on", null ] }
    },
    "banner": {
      "state": "ENABLED",
      "variants": { "red": "red", "blue": "blue" },
      "defaultVariant": "blue"
    }
  }
}
"#;

fn env(extra_config: &str) -> Env {
    let env = Env::new(&simulated(2, extra_config));
    std::fs::write(env.path().join("flags.json"), FLAGS).expect("write flags");
    env
}

#[test]
fn validate_exits_2_naming_each_flag_and_json_path() {
    let env = env("");
    std::fs::write(
        env.path().join("bad.json"),
        r#"{ "flags": { "x": { "state": "ENABLED", "variants": { "a": 1, "b": "two" }, "defaultVariant": "c",
             "targeting": { "fractional": [["a", 50.5], ["b", 50]] } } } }"#,
    )
    .expect("write");
    let (code, _, err) = env.run(&["flags", "validate", "bad.json"]);
    assert_eq!(code, 2, "{err}");
    assert_has(
        &err,
        &[
            "flag `x` at $.flags.x.variants.b: variant `b` is a string but `a` is a number",
            "flag `x` at $.flags.x.defaultVariant: default variant `c` is not a variant",
            "flag `x` at $.flags.x.targeting.fractional[0][1]: weight 50.5 is not a whole number",
        ],
    );
    let out = env.ok(&["flags", "validate"], 0);
    assert!(out.contains("flags.json: valid"), "{out}");
    std::fs::write(env.path().join("torn.json"), "{ \"flags\": {").expect("write");
    let (code, _, err) = env.run(&["flags", "validate", "torn.json"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["torn.json", "not JSON at line 1"]);
}

#[test]
fn a_bad_change_is_refused_with_exit_2_and_the_file_untouched() {
    let env = env("");
    let before = std::fs::read(env.path().join("flags.json")).expect("read");
    let (code, _, err) = env.run(&["flags", "set", "new-checkout", "--default", "maybe"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["`maybe` is not a variant"]);
    let (code, _, err) = env.run(&[
        "flags",
        "set",
        "new-checkout",
        "--targeting",
        r#"{"if": [{"stars_with": [{"var": "id"}, "a"]}, "on"]}"#,
    ]);
    assert_eq!(code, 2, "{err}");
    assert_has(
        &err,
        &[
            "$.flags.new-checkout.targeting.if[0].stars_with",
            "did you mean `starts_with`",
        ],
    );
    assert_eq!(
        std::fs::read(env.path().join("flags.json")).expect("read"),
        before
    );
    assert!(
        !env.path().join(".deploykit/shop/flags.jsonl").exists(),
        "a refused change was journaled"
    );
}

#[test]
fn evaluate_takes_context_pairs() {
    let env = env("");
    let out = env.ok(
        &[
            "flags",
            "evaluate",
            "new-checkout",
            "--context",
            "targetingKey=u1",
            "--context",
            "segment=internal",
        ],
        0,
    );
    assert!(
        out.contains("new-checkout = true  (variant on, TARGETING_MATCH)"),
        "{out}"
    );
    let out = env.ok(
        &[
            "--json",
            "flags",
            "evaluate",
            "new-checkout",
            "-C",
            "segment=public",
        ],
        0,
    );
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        (v["value"].clone(), v["reason"].clone()),
        (Value::Bool(false), Value::from("DEFAULT"))
    );
    let (code, _, err) = env.run(&["flags", "evaluate", "nope"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["FLAG_NOT_FOUND"]);
}

#[test]
fn kill_is_journaled_shown_in_history_notified_and_idempotent() {
    let (url, bodies) = server(Behaviour::Ok);
    let env = env(&format!(
        "[notifications]\ntimeout = \"5s\"\n[[notifications.webhooks]]\nurl = \"{url}\"\non = [\"flag\"]\n"
    ));
    env.ok(
        &[
            "flags",
            "set",
            "new-checkout",
            "--split",
            "on=30",
            "--reason",
            "stage 1",
        ],
        0,
    );
    let out = env.ok(&["flags", "kill", "new-checkout", "--reason", "errors up"], 0);
    assert!(out.contains("new-checkout: kill (journaled)"), "{out}");
    let flags: Value =
        serde_json::from_slice(&std::fs::read(env.path().join("flags.json")).expect("read")).expect("json");
    assert_eq!(flags["flags"]["new-checkout"]["defaultVariant"], "off");
    assert!(flags["flags"]["new-checkout"].get("targeting").is_none());
    let out = env.ok(&["flags", "kill", "new-checkout"], 0);
    assert!(out.contains("already so, nothing written"), "{out}");

    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "one notice for one kill: {bodies:?}");
    let notice: Value = serde_json::from_str(&bodies[0]).expect("json body");
    assert_eq!(notice["event"], "flag");
    assert_eq!(notice["action"], "kill");
    assert_eq!(notice["flag"], "new-checkout");
    assert_eq!(notice["variant"], "off");
    assert_eq!(notice["reason"], "errors up");

    let out = env.ok(&["history"], 0);
    assert_has(
        &out,
        &[
            "flag changes:",
            "new-checkout",
            "split",
            "kill",
            "errors up",
            "enabled off",
        ],
    );
    let out = env.ok(&["--json", "history"], 0);
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let kinds: Vec<&str> = lines
        .iter()
        .filter(|l| l["kind"] == "flag")
        .filter_map(|l| l["action"].as_str())
        .collect();
    assert_eq!(kinds, ["split", "kill"]);
    let kill = lines.iter().find(|l| l["action"] == "kill").expect("kill line");
    assert!(kill["before"]["targeting"]["fractional"].is_array(), "{kill}");
}

/// `deploykit flags serve` on a free loopback port, killed on drop.
struct Served {
    child: Child,
    addr: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(env: &Env, extra: &[&str]) -> Served {
    let mut child = Process::new(assert_cmd::cargo::cargo_bin("deploykit"))
        .current_dir(env.path())
        .args([
            "flags",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--poll-interval",
            "50ms",
        ])
        .args(extra)
        .env_remove("DEPLOYKIT_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start deploykit flags serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("first line");
    let addr = line
        .trim()
        .rsplit("http://")
        .next()
        .filter(|a| a.contains(':'))
        .unwrap_or_else(|| panic!("no address in `{line}`"))
        .to_owned();
    Served { child, addr }
}

/// One HTTP/1.1 POST; returns status, headers (lowercased names) and body.
fn post(
    addr: &str,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

const ONE: &str = "/ofrep/v1/evaluate/flags/new-checkout";
const BULK: &str = "/ofrep/v1/evaluate/flags";

#[test]
fn ofrep_single_and_error_shapes_over_real_http() {
    let env = env("");
    let s = serve(&env, &[]);
    let (code, _, body) = post(
        &s.addr,
        ONE,
        r#"{"context":{"targetingKey":"u1","segment":"internal"}}"#,
        &[],
    );
    assert_eq!(code, 200, "{body}");
    let v = json(&body);
    assert_eq!(
        (v["key"].clone(), v["value"].clone()),
        (Value::from("new-checkout"), Value::Bool(true))
    );
    assert_eq!(
        (v["variant"].clone(), v["reason"].clone()),
        (Value::from("on"), Value::from("TARGETING_MATCH"))
    );

    let (code, _, body) = post(
        &s.addr,
        "/ofrep/v1/evaluate/flags/nope",
        r#"{"context":{"targetingKey":"u1"}}"#,
        &[],
    );
    assert_eq!(code, 404, "{body}");
    let v = json(&body);
    assert_eq!(
        (v["key"].clone(), v["errorCode"].clone()),
        (Value::from("nope"), Value::from("FLAG_NOT_FOUND"))
    );
    assert!(
        v["errorDetails"].as_str().is_some_and(|d| d.contains("nope")),
        "{v}"
    );

    for bad in ["not json", r#"{"ctx":{}}"#, r#"{"context":{"targetingKey":7}}"#] {
        let (code, _, body) = post(&s.addr, ONE, bad, &[]);
        assert_eq!(code, 400, "{bad}: {body}");
        assert_eq!(json(&body)["errorCode"], "INVALID_CONTEXT", "{bad}");
    }
}

#[test]
fn ofrep_bulk_etag_304_and_a_kill_seen_after_reload() {
    let env = env("");
    let s = serve(&env, &[]);
    let ctx = r#"{"context":{"targetingKey":"u1","segment":"internal"}}"#;
    let (code, headers, body) = post(&s.addr, BULK, ctx, &[]);
    assert_eq!(code, 200, "{body}");
    let etag = headers
        .iter()
        .find(|(k, _)| k == "etag")
        .map(|(_, v)| v.clone())
        .expect("an ETag");
    let flags = json(&body)["flags"].as_array().cloned().expect("flags");
    assert_eq!(flags.len(), 2);
    let checkout = flags
        .iter()
        .find(|f| f["key"] == "new-checkout")
        .expect("new-checkout");
    assert_eq!(checkout["value"], true);

    let (code, _, body) = post(&s.addr, BULK, ctx, &[("if-none-match", &etag)]);
    assert_eq!(code, 304, "{body}");
    assert!(body.is_empty());
    // Another context is another answer: no 304 for it.
    let (code, _, _) = post(
        &s.addr,
        BULK,
        r#"{"context":{"targetingKey":"u2"}}"#,
        &[("if-none-match", &etag)],
    );
    assert_eq!(code, 200);

    env.ok(&["flags", "kill", "new-checkout"], 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, _, body) = post(&s.addr, BULK, ctx, &[("if-none-match", &etag)]);
        if code == 200 {
            let flags = json(&body)["flags"].as_array().cloned().expect("flags");
            let checkout = flags
                .iter()
                .find(|f| f["key"] == "new-checkout")
                .expect("new-checkout");
            assert_eq!(
                (checkout["value"].clone(), checkout["reason"].clone()),
                (Value::Bool(false), Value::from("STATIC"))
            );
            break;
        }
        assert_eq!(code, 304);
        assert!(Instant::now() < deadline, "the kill was not served within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_file_that_stops_parsing_is_not_served_the_last_good_one_is() {
    let env = env("");
    let s = serve(&env, &[]);
    std::fs::write(env.path().join("flags.json"), "{ \"flags\": {").expect("write");
    // Give the server several polls to (wrongly) pick it up.
    std::thread::sleep(Duration::from_millis(400));
    let (code, _, body) = post(
        &s.addr,
        ONE,
        r#"{"context":{"targetingKey":"u1","segment":"internal"}}"#,
        &[],
    );
    assert_eq!(
        (code, json(&body)["value"].clone()),
        (200, Value::Bool(true)),
        "{body}"
    );
}

#[test]
fn serve_refuses_a_non_loopback_address_without_allow_remote() {
    let env = env("");
    let (code, _, err) = env.run(&["flags", "serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["--listen", "not a loopback address", "--allow-remote"]);
}

/// The demo app's `/api/checkout`, in this process, evaluating through
/// `url` (OFREP); returns its address.
fn demo_app_through(url: &str) -> String {
    use clap::Parser;
    let config =
        deploykit_demo_app::DemoConfig::try_parse_from(["demo", "--ofrep-url", url]).expect("demo config");
    let router = deploykit_demo_app::router(config).expect("router");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = axum::serve(listener, router).await;
        });
    });
    addr
}

fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

#[test]
fn the_demo_app_sees_a_dark_launch_through_ofrep_for_the_targeted_segment_only() {
    let env = env("");
    env.ok(&["flags", "set", "new-checkout", "--no-targeting"], 0);
    let served = serve(&env, &[]);
    let app = demo_app_through(&format!("http://{}", served.addr));
    let flow = |user: &str, segment: &str| {
        let (code, body) = get(&app, &format!("/api/checkout?user={user}&segment={segment}"));
        assert_eq!(code, 200, "{body}");
        json(&body)["flow"].as_str().expect("flow").to_owned()
    };
    assert_eq!(flow("u1", "internal"), "old");

    env.ok(
        &[
            "flags",
            "set",
            "new-checkout",
            "--targeting",
            r#"{"if": [{"==": [{"var": "segment"}, "internal"]}, "on", null]}"#,
        ],
        0,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while flow("u1", "internal") != "new" {
        assert!(
            Instant::now() < deadline,
            "the change was not seen through OFREP within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(flow("u7", "internal"), "new");
    assert_eq!(flow("u1", "public"), "old");
    assert_eq!(flow("u2", "partner"), "old");
    // A definition that is not an object is refused, not taken for a removal.
    let (code, _, err) = env.run(&["flags", "set", "new-checkout", "--definition", "null"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["a flag definition is a JSON object"]);
    assert_eq!(flow("u1", "internal"), "new");
}

/// The Prometheus stand-in: `on` breaches its error rate, `off` is fine.
fn breaching(request: &str) -> f64 {
    match (request.contains("errs"), request.contains("%22on%22")) {
        (true, true) => 0.05,
        (true, false) => 0.001,
        (false, _) => 0.05,
    }
}

#[test]
fn a_rollout_breaching_on_prometheus_kills_the_flag_journals_and_notifies() {
    let prom = crate::util::prometheus(breaching);
    let (hook, bodies) = server(Behaviour::Ok);
    let env = env(&format!(
        "[metrics]\nprometheus = \"{prom}\"\n\n[flags]\nerror_rate = 'sum(rate(errs{{variant=\"{{variant}}\"}}[{{window}}]))'\nlatency_p99 = 'p99{{variant=\"{{variant}}\"}}'\n\n[notifications]\n[[notifications.webhooks]]\nurl = \"{hook}\"\non = [\"flag\"]\n"
    ));
    env.ok(&["flags", "set", "new-checkout", "--no-targeting"], 0);
    let (code, out, err) = env.run(&[
        "flags",
        "rollout",
        "new-checkout",
        "--variant",
        "on",
        "--stages",
        "10,50,100",
        "--stage-duration",
        "1s",
        "--interval",
        "200ms",
    ]);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_has(
        &out,
        &[
            "stage 1: `on` at 10 %",
            "killed: flag rollout of `on` at 10 %",
            "canary error rate",
        ],
    );
    let flags: Value =
        serde_json::from_slice(&std::fs::read(env.path().join("flags.json")).expect("read")).expect("json");
    assert_eq!(flags["flags"]["new-checkout"]["defaultVariant"], "off");
    assert!(flags["flags"]["new-checkout"].get("targeting").is_none());
    let out = env.ok(&["--json", "history"], 0);
    let actions: Vec<String> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("json"))
        .filter(|l| l["kind"] == "flag")
        .map(|l| l["action"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(actions, ["targeting", "split", "kill"]);
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "{bodies:?}");
    assert_eq!(json(&bodies[0])["action"], "rollout-killed");
}
