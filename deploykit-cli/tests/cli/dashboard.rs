//! `deploykit dashboard` over real HTTP on 127.0.0.1, without a browser:
//! the pages, and every security rule (token, cookie, origin, host,
//! read-only, no secret rendered). The browser test is in
//! `dashboard_browser.rs`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::{answering, simulated, Env};

/// `deploykit dashboard` on a free loopback port, killed on drop.
pub(crate) struct Dash {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub(crate) addr: String,
    /// Everything it printed before serving.
    pub(crate) banner: String,
}

impl Drop for Dash {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Dash {
    pub(crate) fn start(env: &Env, extra: &[&str]) -> Dash {
        let mut child = Process::new(assert_cmd::cargo::cargo_bin("deploykit"))
            .current_dir(env.path())
            .args(["dashboard", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env_remove("DEPLOYKIT_CONFIG")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start deploykit dashboard");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut first = String::new();
        out.read_line(&mut first).expect("first line");
        let addr = first
            .trim()
            .rsplit("http://")
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| panic!("no address in `{first}`"))
            .to_owned();
        let mut banner = first.clone();
        // The token notice: one line, or two when the token is new.
        let mut line = String::new();
        out.read_line(&mut line).expect("second line");
        banner.push_str(&line);
        if line.trim_end().ends_with(':') {
            line.clear();
            out.read_line(&mut line).expect("the token line");
            banner.push_str(&line);
        }
        // Keep reading so a later print never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut sink = String::new();
            let _ = out.read_to_string(&mut sink);
        });
        Dash { child, addr, banner }
    }

    pub(crate) fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The token kept in the state directory.
pub(crate) fn token(env: &Env) -> String {
    std::fs::read_to_string(env.state().join("dashboard-token"))
        .expect("the token file")
        .trim()
        .to_owned()
}

/// An HTTP/1.1 answer.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One request with `Host: addr`; `body` as a form when given.
pub(crate) fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut req = format!("{method} {path} HTTP/1.1\r\nconnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if method == "POST" {
        req.push_str(&format!(
            "content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n",
            body.len()
        ));
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
        .unwrap_or_else(|| panic!("no status in {raw}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

pub(crate) fn get(d: &Dash, path: &str) -> Answer {
    request(&d.addr, "GET", path, None, &[])
}

/// A canary of 2 stable and 1 canary simulated instances, promoted by
/// hand, with a healthy Prometheus stand-in.
pub(crate) fn manual_canary() -> Env {
    manual_canary_with("300ms")
}

/// As [`manual_canary`], each stage held `stage_duration`.
pub(crate) fn manual_canary_with(stage_duration: &str) -> Env {
    let prom = answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18391\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"stable-2\"\naddress = \"127.0.0.1:18392\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18393\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [20, 100]\nstage_duration = \"{stage_duration}\"\ncheck_interval = \"100ms\"\n\
        promotion = \"manual\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    env
}

/// The running deployment's id (the newest journal's).
pub(crate) fn newest_id(env: &Env) -> String {
    env.newest_journal()[0]["deployment"]
        .as_str()
        .expect("a deployment id")
        .to_owned()
}

fn promoted(env: &Env) -> bool {
    env.newest_journal().iter().any(|r| r["event"] == "promoted")
}

pub(crate) const FLAGS: &str = r#"{
  "flags": {
    "new-checkout": {
      "state": "ENABLED",
      "variants": { "on": true, "off": false },
      "defaultVariant": "off"
    }
  }
}
"#;

#[test]
fn every_page_renders_a_finished_deployment_with_security_headers() {
    let env = Env::new(&simulated(2, ""));
    std::fs::write(env.path().join("flags.json"), FLAGS).expect("write flags");
    env.ok(&["deploy", "v1"], 0);
    let id = newest_id(&env);
    let d = Dash::start(&env, &[]);
    let list = get(&d, "/");
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(
        list.body.contains(&format!("href=\"/deployments/{id}\"")),
        "{}",
        list.body
    );
    let csp = list.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    let one = get(&d, &format!("/deployments/{id}"));
    assert_eq!(one.status, 200, "{}", one.body);
    for part in [
        "succeeded",
        "web-1",
        "web-2",
        "Timeline",
        "data-live=\"/live/deployments/",
    ] {
        assert!(one.body.contains(part), "no `{part}` in {}", one.body);
    }
    let fleet = get(&d, "/fleet");
    assert_eq!(fleet.status, 200, "{}", fleet.body);
    assert!(
        fleet.body.contains("web-2") && fleet.body.contains("v1"),
        "{}",
        fleet.body
    );
    let history = get(&d, "/history");
    assert_eq!(history.status, 200);
    assert!(
        history.body.contains("<svg"),
        "the duration chart: {}",
        history.body
    );
    let flags = get(&d, "/flags");
    assert_eq!(flags.status, 200);
    assert!(flags.body.contains("new-checkout"), "{}", flags.body);
    assert!(
        !flags.body.contains("Kill switch"),
        "actions are not offered to a reader"
    );
    // Filters: nothing rolled back.
    let none = get(&d, "/?outcome=rolled_back");
    assert!(
        !none.body.contains(&format!("href=\"/deployments/{id}\"")),
        "{}",
        none.body
    );
    assert_eq!(get(&d, "/assets/live.js").status, 200);
    assert_eq!(get(&d, "/deployments/no-such-run").status, 404);
}

#[test]
fn the_token_is_printed_once_and_kept_private() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new(&simulated(1, ""));
    let first = Dash::start(&env, &[]);
    let t = token(&env);
    assert!(
        first.banner.contains(&t),
        "the first start shows the token: {}",
        first.banner
    );
    let mode = std::fs::metadata(env.state().join("dashboard-token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    drop(first);
    let second = Dash::start(&env, &[]);
    assert!(
        !second.banner.contains(&t),
        "a later start does not: {}",
        second.banner
    );
    assert!(second.banner.contains("dashboard-token"), "{}", second.banner);
    assert_eq!(token(&env), t, "the token is kept");
}

/// The promote button while no deploykit runs the deployment records the
/// promotion, as `deploykit promote` does, for its `deploy --resume`; for
/// an interrupted deployment that was not waiting it refuses (409) and
/// records nothing.
#[test]
fn promote_with_no_process_running_is_recorded_for_the_resume() {
    let prom = answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    // The timeout only bounds the test: a lost promotion rolls back (exit 1)
    // instead of waiting for ever.
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18395\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18396\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [20, 100]\nstage_duration = \"300ms\"\ncheck_interval = \"100ms\"\n\
        promotion = \"manual\"\npromotion_timeout = \"30s\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let control = env.path().join(".deploykit/shop/control.json");
    let d = Dash::start(&env, &[]);
    let bearer = format!("Bearer {}", token(&env));
    let promote = |id: &str| {
        request(
            &d.addr,
            "POST",
            &format!("/deployments/{id}/promote"),
            Some(""),
            &[("authorization", &bearer)],
        )
    };

    // Killed before its wait: refused, nothing recorded.
    let mut deploy = env.spawn_deploy("v2", "the canary's first step", |r| r["event"] == "step_started");
    deploy.kill().expect("SIGKILL");
    deploy.wait().unwrap();
    let id = newest_id(&env);
    let a = promote(&id);
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(a.body.contains("was not waiting for a promotion"), "{}", a.body);
    assert!(!control.exists(), "a refused promote records nothing");
    env.ok(&["-q", "rollback"], 0);
    let a = promote(&id);
    assert_eq!(a.status, 409, "rolled back, nothing waits: {}", a.body);
    assert!(a.body.contains("nothing waits for a promotion"), "{}", a.body);
    assert!(!control.exists());

    // Killed while it waits: the button records the promotion.
    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    deploy.kill().expect("SIGKILL");
    deploy.wait().unwrap();
    let id = newest_id(&env);
    let journals = env.journal_count();
    let a = promote(&id);
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(
        a.header("location"),
        Some(format!("/deployments/{id}?done=recorded").as_str())
    );
    let page = get(&d, &format!("/deployments/{id}?done=recorded"));
    assert!(page.body.contains("Promotion recorded"), "{}", page.body);
    assert_eq!(
        env.journal_count(),
        journals,
        "recorded beside the journals, not as a run"
    );
    let recorded: Value = serde_json::from_slice(&std::fs::read(&control).unwrap()).unwrap();
    assert_eq!(recorded["command"], "promote", "{recorded}");
    assert_eq!(recorded["deployment"], id.as_str(), "{recorded}");
    assert_eq!(recorded["stage"], 1, "{recorded}");

    let (code, out, err) = env.run(&["deploy", "--resume"]);
    assert_eq!(
        code, 0,
        "the resume goes on past the recorded promotion\n{out}\n{err}"
    );
    assert!(
        out.contains("stage 1 was promoted while no deploykit ran"),
        "{out}"
    );
    assert_eq!(env.sim("stable-1")["release"], "v2");
    let a = promote(&id);
    assert_eq!(a.status, 409, "finished, nothing waits: {}", a.body);
}

#[test]
fn promote_needs_the_token_and_the_same_origin_and_nothing_changes_without() {
    let env = manual_canary();
    let d = Dash::start(&env, &[]);
    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    let id = newest_id(&env);
    let path = format!("/deployments/{id}/promote");
    let origin = d.origin();
    let t = token(&env);
    // No state change on GET.
    let g = get(&d, &path);
    assert_eq!(g.status, 405, "{}", g.body);
    // No credential at all.
    let a = request(&d.addr, "POST", &path, Some(""), &[("origin", &origin)]);
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Bearer")));
    // A wrong token.
    let a = request(
        &d.addr,
        "POST",
        &path,
        Some(""),
        &[("authorization", "Bearer 0123456789abcdef0123456789abcdef")],
    );
    assert_eq!(a.status, 401, "{}", a.body);
    // A forged cross-site form post without credentials.
    let a = request(
        &d.addr,
        "POST",
        &path,
        Some(""),
        &[("origin", "http://evil.example")],
    );
    assert_eq!(a.status, 403, "{}", a.body);
    // The right session cookie from another site, or with no origin.
    let session = {
        let a = request(
            &d.addr,
            "POST",
            "/login",
            Some(&format!("token={t}")),
            &[("origin", &origin)],
        );
        assert_eq!(a.status, 303, "{}", a.body);
        let c = a.header("set-cookie").expect("a session cookie").to_owned();
        c.split(';').next().unwrap().to_owned()
    };
    let a = request(
        &d.addr,
        "POST",
        &path,
        Some(""),
        &[("cookie", &session), ("origin", "http://evil.example")],
    );
    assert_eq!(a.status, 403, "{}", a.body);
    let a = request(&d.addr, "POST", &path, Some(""), &[("cookie", &session)]);
    assert_eq!(a.status, 403, "{}", a.body);
    // A rebound host name, with the right token.
    let bearer = format!("Bearer {t}");
    let a = request(
        &d.addr,
        "POST",
        &path,
        Some(""),
        &[("host", "attacker.example"), ("authorization", &bearer)],
    );
    assert_eq!(a.status, 403, "{}", a.body);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!promoted(&env), "nothing refused reached the deployment");
    assert!(deploy.try_wait().unwrap().is_none(), "the canary still waits");
    // The Bearer token promotes.
    let a = request(&d.addr, "POST", &path, Some(""), &[("authorization", &bearer)]);
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(
        a.header("location"),
        Some(format!("/deployments/{id}?done=promoted").as_str())
    );
    assert_eq!(
        deploy.wait().unwrap().code(),
        Some(0),
        "the promoted canary finishes"
    );
    assert!(promoted(&env));
    // Passing checks are drawn and listed at their measured values: the
    // Prometheus stand-in answers 0.001 for canary and stable alike, so the
    // closest rule is the relative one (limit 2 x stable's 0.001): 0.5x.
    let page = get(&d, &format!("/deployments/{id}"));
    assert!(
        page.body.contains("canary error rate 0.001000 (0.01000)"),
        "{}",
        page.body
    );
    assert!(
        page.body.contains("<circle class=\"pass\"")
            && page.body.contains("<title>pass: 0.50x the threshold</title>"),
        "{}",
        page.body
    );
    // Nothing waits any more.
    let a = request(&d.addr, "POST", &path, Some(""), &[("authorization", &bearer)]);
    assert_eq!(a.status, 409, "{}", a.body);
}

#[test]
fn sign_in_sets_a_strict_http_only_cookie_that_changes_a_flag_through_the_store() {
    let env = Env::new(&simulated(1, ""));
    std::fs::write(env.path().join("flags.json"), FLAGS).expect("write flags");
    let d = Dash::start(&env, &[]);
    let origin = d.origin();
    let t = token(&env);
    let wrong = request(
        &d.addr,
        "POST",
        "/login",
        Some("token=nope"),
        &[("origin", &origin)],
    );
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("set-cookie").is_none());
    let a = request(
        &d.addr,
        "POST",
        "/login",
        Some(&format!("token={t}")),
        &[("origin", &origin)],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    let cookie = a.header("set-cookie").expect("a cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(!cookie.contains(&t), "the cookie is not the token: {cookie}");
    let session = cookie.split(';').next().unwrap().to_owned();
    // A signed-in reader is offered the actions.
    let page = request(&d.addr, "GET", "/flags", None, &[("cookie", &session)]);
    assert!(page.body.contains("Kill switch"), "{}", page.body);
    let a = request(
        &d.addr,
        "POST",
        "/flags/new-checkout",
        Some("action=disable&reason=from+the+dashboard"),
        &[("cookie", &session), ("origin", &origin)],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(env.path().join("flags.json")).unwrap()).unwrap();
    assert_eq!(file["flags"]["new-checkout"]["state"], "DISABLED");
    let history = env.ok(&["--json", "history"], 0);
    assert!(
        history.contains("\"disable\"")
            && history.contains("dashboard@")
            && history.contains("from the dashboard"),
        "journaled with who and why: {history}"
    );
}

#[test]
fn a_flag_change_the_library_refuses_changes_nothing() {
    let env = Env::new(&simulated(1, ""));
    std::fs::write(env.path().join("flags.json"), FLAGS).expect("write flags");
    let d = Dash::start(&env, &[]);
    let bearer = format!("Bearer {}", token(&env));
    let before = std::fs::read_to_string(env.path().join("flags.json")).unwrap();
    // A default that is not a variant.
    let a = request(
        &d.addr,
        "POST",
        "/flags/new-checkout",
        Some("action=default&variant=maybe"),
        &[("authorization", &bearer)],
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body.contains("maybe") && a.body.contains("nothing was changed"),
        "{}",
        a.body
    );
    // Targeting that is not JSON.
    let a = request(
        &d.addr,
        "POST",
        "/flags/new-checkout",
        Some("action=targeting&targeting=%7Bnot+json"),
        &[("authorization", &bearer)],
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("targeting: not JSON"), "{}", a.body);
    // A rule the library's validation refuses: it serves no such variant.
    let rule: String = r#"{"if":[true,"maybe",null]}"#
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let a = request(
        &d.addr,
        "POST",
        "/flags/new-checkout",
        Some(&format!("action=targeting&targeting={rule}")),
        &[("authorization", &bearer)],
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(a.body.contains("is not a variant"), "{}", a.body);
    assert_eq!(
        std::fs::read_to_string(env.path().join("flags.json")).unwrap(),
        before
    );
}

#[test]
fn read_only_serves_no_action_and_refuses_a_non_loopback_address() {
    let env = manual_canary();
    let (code, _, err) = env.run(&["dashboard", "--read-only", "--listen", "0.0.0.0:0"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--listen") && err.contains("not a loopback address"),
        "{err}"
    );
    let d = Dash::start(&env, &["--read-only"]);
    assert!(!env.state().join("dashboard-token").exists(), "no token is kept");
    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    let id = newest_id(&env);
    let page = get(&d, &format!("/deployments/{id}"));
    assert!(page.body.contains("waits for promotion"), "{}", page.body);
    assert!(!page.body.contains("id=\"promote\""), "no button: {}", page.body);
    let a = request(
        &d.addr,
        "POST",
        &format!("/deployments/{id}/abort"),
        Some(""),
        &[("authorization", "Bearer anything"), ("origin", &d.origin())],
    );
    assert_eq!(a.status, 403, "{}", a.body);
    std::thread::sleep(Duration::from_millis(300));
    assert!(deploy.try_wait().unwrap().is_none(), "still waiting");
    env.ok(&["abort"], 0);
    assert_eq!(
        deploy.wait().unwrap().code(),
        Some(1),
        "aborted by the CLI, rolled back"
    );
}

#[test]
fn no_secret_of_the_configuration_is_rendered() {
    let hook = "https://hooks.example.invalid/services/T0/B1/SUPERSECRETHOOK";
    let env = Env::new(&simulated(
        2,
        &format!(
            "[notifications]\ntimeout = \"100ms\"\n\n[[notifications.webhooks]]\nurl = \"{hook}\"\non = [\"failure\"]\n\n\
             [metrics]\nprometheus = \"http://scraper:PROMPASSWORD@127.0.0.1:9/\"\n"
        ),
    ));
    env.ok(&["deploy", "v1"], 0);
    let id = newest_id(&env);
    let d = Dash::start(&env, &[]);
    for path in [
        "/",
        &format!("/deployments/{id}"),
        "/fleet",
        "/history",
        "/flags",
        "/login",
        "/metrics",
    ] {
        let a = get(&d, path);
        assert_eq!(a.status, 200, "{path}: {}", a.body);
        for secret in ["SUPERSECRETHOOK", "PROMPASSWORD", &token(&env)] {
            assert!(!a.body.contains(secret), "{path} shows `{secret}`: {}", a.body);
        }
    }
}

#[test]
fn the_live_stream_sends_the_deployment_as_it_changes() {
    let env = manual_canary();
    let d = Dash::start(&env, &[]);
    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    let id = newest_id(&env);
    let mut s = TcpStream::connect(&d.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET /live/deployments/{id} HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\n\r\n",
        d.addr
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut seen = String::new();
    let mut line = String::new();
    // The first event: the canary waits.
    while !seen.contains("waits for promotion") {
        line.clear();
        assert!(
            r.read_line(&mut line).expect("an event line") > 0,
            "stream ended: {seen}"
        );
        seen.push_str(&line);
    }
    assert!(seen.contains("text/event-stream"), "{seen}");
    assert!(seen.contains("event: update"), "{seen}");
    env.ok(&["promote"], 0);
    // A later event: the deployment finished.
    while !seen.contains("badge ok\">succeeded") {
        line.clear();
        assert!(
            r.read_line(&mut line).expect("an event line") > 0,
            "stream ended: {seen}"
        );
        seen.push_str(&line);
    }
    assert_eq!(deploy.wait().unwrap().code(), Some(0));
}

#[test]
fn abort_with_the_token_rolls_the_running_canary_back() {
    let env = manual_canary();
    let d = Dash::start(&env, &[]);
    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    let id = newest_id(&env);
    let bearer = format!("Bearer {}", token(&env));
    // Another run's id is refused: only the running deployment is acted on.
    let a = request(
        &d.addr,
        "POST",
        "/deployments/not-this-one/abort",
        Some(""),
        &[("authorization", &bearer)],
    );
    assert_eq!(a.status, 409, "{}", a.body);
    assert!(deploy.try_wait().unwrap().is_none(), "still waiting");
    let a = request(
        &d.addr,
        "POST",
        &format!("/deployments/{id}/abort"),
        Some(""),
        &[("authorization", &bearer)],
    );
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(
        a.header("location"),
        Some(format!("/deployments/{id}?done=aborted").as_str())
    );
    assert_eq!(deploy.wait().unwrap().code(), Some(1), "aborted and rolled back");
    for i in ["stable-1", "stable-2"] {
        assert_eq!(env.sim(i)["release"], "v1", "{i} is back on v1");
    }
    let page = get(&d, &format!("/deployments/{id}"));
    assert!(page.body.contains("rolled back"), "{}", page.body);
}

#[test]
fn the_kill_switch_in_the_dashboard_is_journaled_and_notified_once() {
    let (url, bodies) = crate::notify::server(crate::notify::Behaviour::Ok);
    let env = Env::new(&simulated(
        1,
        &format!("[notifications]\ntimeout = \"5s\"\n[[notifications.webhooks]]\nurl = \"{url}\"\non = [\"flag\"]\n"),
    ));
    // The flag serves `on` to everyone by its targeting; the kill removes it.
    let flags = FLAGS.replace(
        "\"defaultVariant\": \"off\"",
        "\"defaultVariant\": \"off\", \"targeting\": { \"if\": [true, \"on\", null] }",
    );
    std::fs::write(env.path().join("flags.json"), flags).expect("write flags");
    let d = Dash::start(&env, &[]);
    let bearer = format!("Bearer {}", token(&env));
    for _ in 0..2 {
        let a = request(
            &d.addr,
            "POST",
            "/flags/new-checkout",
            Some("action=kill&reason=errors+up"),
            &[("authorization", &bearer)],
        );
        assert_eq!(a.status, 303, "{}", a.body);
    }
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(env.path().join("flags.json")).unwrap()).unwrap();
    assert!(file["flags"]["new-checkout"].get("targeting").is_none(), "{file}");
    let bodies = bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1, "one notice for one effective kill: {bodies:?}");
    let notice: Value = serde_json::from_str(&bodies[0]).expect("a JSON body");
    assert_eq!(
        (
            notice["action"].as_str(),
            notice["variant"].as_str(),
            notice["reason"].as_str()
        ),
        (Some("kill"), Some("off"), Some("errors up"))
    );
    assert!(
        notice["who"]
            .as_str()
            .is_some_and(|w| w.starts_with("dashboard@")),
        "{notice}"
    );
}

#[test]
fn ctrl_c_stops_the_dashboard_while_a_live_stream_is_open() {
    let env = Env::new(&simulated(1, ""));
    env.ok(&["deploy", "v1"], 0);
    let mut d = Dash::start(&env, &[]);
    let mut s = TcpStream::connect(&d.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET /live/deployments HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\n\r\n",
        d.addr
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !line.starts_with("event: update") {
        line.clear();
        assert!(
            r.read_line(&mut line).expect("an event line") > 0,
            "the stream ended early"
        );
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("SIGINT");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = d.child.try_wait().expect("the dashboard process") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard did not stop within 30 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

/// The sum of every `name{...} value` sample in an exposition.
fn sample_sum(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next())
        .map(|v| v.parse::<f64>().expect("a sample value"))
        .sum()
}

#[test]
fn metrics_answers_the_deployment_count_behind_the_read_check() {
    let env = Env::new(&simulated(2, ""));
    env.ok(&["deploy", "v1"], 0);
    let d = Dash::start(&env, &[]);
    let one = get(&d, "/metrics");
    assert_eq!(one.status, 200, "{}", one.body);
    assert!(
        one.header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{:?}",
        one.headers
    );
    assert_eq!(
        sample_sum(&one.body, "deploykit_deployments_total"),
        1.0,
        "{}",
        one.body
    );
    // A deployment made while the dashboard serves is counted on the next scrape.
    env.ok(&["deploy", "v2"], 0);
    let two = get(&d, "/metrics");
    assert_eq!(
        sample_sum(&two.body, "deploykit_deployments_total"),
        2.0,
        "{}",
        two.body
    );
    assert!(two.body.contains("outcome=\"succeeded\""), "{}", two.body);
    // The same rules as the pages: a wrong token or a foreign Host is refused.
    let t = token(&env);
    let wrong = request(
        &d.addr,
        "GET",
        "/metrics",
        None,
        &[("authorization", "Bearer nope")],
    );
    assert_eq!(wrong.status, 401, "{}", wrong.body);
    assert!(!wrong.body.contains("deploykit_deployments_total"));
    let rebound = request(&d.addr, "GET", "/metrics", None, &[("host", "evil.example:80")]);
    assert_eq!(rebound.status, 403, "{}", rebound.body);
    let bearer = format!("Bearer {t}");
    let right = request(&d.addr, "GET", "/metrics", None, &[("authorization", &bearer)]);
    assert_eq!(right.status, 200, "{}", right.body);
    assert!(!right.body.contains(&t), "the token is never rendered");
}
