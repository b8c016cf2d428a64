//! `deploykit dashboard` in a real browser: Debian's chromium, headless,
//! driven through chromedriver on 127.0.0.1 with fantoccini. One browser
//! session walks every page (no console error on any), watches a
//! deployment started by the CLI in another process appear and finish
//! without a reload, is refused a promotion without the token, signs in and
//! promotes the canary, and changes a flag that `deploykit flags serve`
//! then answers differently over OFREP. Screenshots land in
//! `target/tmp/dashboard-screenshots/`.
//!
//! scripts/test installs `chromium` and `chromium-driver`; without them
//! the test fails under `CI=true` and is skipped (with a note) elsewhere.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::dashboard::{manual_canary_with, newest_id, token, Dash, FLAGS};
use crate::util::Env;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    crate::util::free_port()
}

/// One JSON request to a local HTTP server (`Value::Null`: no body); the
/// answer's status and body, read up to its `Content-Length` (chromedriver
/// keeps the connection open).
fn json_request(addr: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let body = match body {
        Value::Null => String::new(),
        b => b.to_string(),
    };
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line).expect("the status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut length = None;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).expect("a header line");
        if line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse::<usize>().ok();
            }
        }
    }
    let mut raw = Vec::new();
    match length {
        Some(n) => {
            raw.resize(n, 0);
            r.read_exact(&mut raw).expect("the body");
        }
        None => {
            r.read_to_end(&mut raw).expect("the body");
        }
    }
    (status, serde_json::from_slice(&raw).unwrap_or(Value::Null))
}

/// chromedriver on a free loopback port, ready.
fn chromedriver(dir: &Path) -> (Killed, String) {
    let port = free_port();
    let child = Process::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .arg(format!("--log-path={}", dir.join("chromedriver.log").display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let child = Killed(child);
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect(&addr).is_ok()
            && json_request(&addr, "GET", "/status", &Value::Null).1["value"]["ready"] == true
        {
            return (child, addr);
        }
        assert!(
            Instant::now() < deadline,
            "chromedriver was not ready within 30 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `deploykit flags serve` (OFREP) on a free loopback port.
fn ofrep(env: &Env) -> (Killed, String) {
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
        .expect("an address")
        .to_owned();
    (Killed(child), addr)
}

fn evaluate(ofrep: &str) -> Value {
    json_request(
        ofrep,
        "POST",
        "/ofrep/v1/evaluate/flags/new-checkout",
        &json!({ "context": { "targetingKey": "u1" } }),
    )
    .1
}

/// The browser's console since the last call (chromedriver's log
/// endpoint empties it as it reads).
fn console(driver: &str, session: &str) -> Vec<Value> {
    let (status, v) = json_request(
        driver,
        "POST",
        &format!("/session/{session}/se/log"),
        &json!({ "type": "browser" }),
    );
    assert_eq!(status, 200, "chromedriver's log endpoint: {v}");
    v["value"].as_array().cloned().unwrap_or_default()
}

struct Browser {
    c: Client,
    driver: String,
    session: String,
    base: String,
    shots: PathBuf,
}

impl Browser {
    async fn open(&self, path: &str) {
        self.c
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    async fn body(&self) -> String {
        self.c.source().await.expect("the page source")
    }

    /// Waits (at most 30 s) until the page's source contains `text`.
    async fn wait_for(&self, text: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let body = self.body().await;
            if body.contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: no `{text}` within 30 s in\n{body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// No error or warning in the console since the last check.
    fn no_console_errors(&self, page: &str) {
        let errors: Vec<Value> = console(&self.driver, &self.session)
            .into_iter()
            .filter(|e| e["level"] == "SEVERE" || e["level"] == "WARNING")
            .collect();
        assert!(errors.is_empty(), "{page}: console errors: {errors:#?}");
    }

    async fn shot(&self, name: &str) {
        let png = self.c.screenshot().await.expect("a screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).expect("write the screenshot");
    }

    /// Clicks the element, finding it again if a live update replaced it
    /// between the find and the click (a stale element), for at most 10 s.
    async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let clicked = match self.c.find(Locator::Css(css)).await {
                Ok(e) => e.click().await,
                Err(e) => Err(e),
            };
            match clicked {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => panic!("click {css}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

fn installed() -> bool {
    let ok = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{CHROMIUM} and {CHROMEDRIVER} are needed (Debian's chromium and chromium-driver; scripts/test installs them)"
        );
        eprintln!(
            "skipped: {CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
        );
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_chromium_follows_promotes_and_changes_flags() {
    if !installed() {
        return;
    }
    // Stages long enough (2 s) that the promoted run is still going when
    // its page has loaded: what follows must arrive over the live stream.
    let env = manual_canary_with("2s");
    std::fs::write(env.path().join("flags.json"), FLAGS).expect("write flags");
    let dash = Dash::start(&env, &[]);
    let (_ofrep, ofrep) = ofrep(&env);
    let profile = tempfile::tempdir().expect("a profile dir");
    let (_driver, driver) = chromedriver(profile.path());
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).expect("the screenshot dir");
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,1000",
                format!("--user-data-dir={}", profile.path().join("profile").display()),
            ],
        },
        "goog:loggingPrefs": { "browser": "ALL" },
    });
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps.as_object().expect("an object").clone())
        .connect(&format!("http://{driver}"))
        .await
        .expect("a chromedriver session");
    let session = c.session_id().await.expect("session id").expect("a session");
    let b = Browser {
        c,
        driver,
        session,
        base: dash.origin(),
        shots,
    };
    let first = newest_id(&env);

    // Every page, read without signing in, with no console error.
    for (path, name, text) in [
        ("/", "deployments", first.as_str()),
        (
            &format!("/deployments/{first}") as &str,
            "deployment-finished",
            "Timeline",
        ),
        ("/fleet", "fleet", "canary-1"),
        ("/history", "history", "Duration of the last runs"),
        ("/flags", "flags-read-only", "new-checkout"),
        ("/login", "sign-in", "Token"),
    ] {
        b.open(path).await;
        b.wait_for(text, path).await;
        b.no_console_errors(path);
        b.shot(name).await;
    }

    // A deployment started by the CLI in another process appears in the
    // open list without a reload.
    b.open("/").await;
    b.wait_for("data-updates", "the live stream's first update").await;
    b.c.execute("window.notReloaded = true;", vec![])
        .await
        .expect("mark the page");
    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    let id = newest_id(&env);
    assert_ne!(id, first);
    b.wait_for(&format!("data-id=\"{id}\""), "the new deployment in the list")
        .await;
    let same_page =
        b.c.execute("return window.notReloaded === true;", vec![])
            .await
            .expect("read the mark");
    assert_eq!(same_page, Value::Bool(true), "the list updated in place");
    b.no_console_errors("/ (live)");
    b.shot("deployments-live").await;

    // Its page, as a reader: it waits; a promotion without the token is
    // refused and changes nothing.
    b.open(&format!("/deployments/{id}")).await;
    b.wait_for("waits for promotion", "the waiting canary").await;
    b.no_console_errors("the waiting deployment");
    let status = b
        .c
        .execute_async(
            "const done = arguments[arguments.length - 1]; fetch(arguments[0], { method: 'POST' }).then(r => done(r.status));",
            vec![json!(format!("/deployments/{id}/promote"))],
        )
        .await
        .expect("a fetch from the page");
    assert_eq!(status, json!(401), "a promotion without the token");
    // The refused fetch is logged as a failed resource: the console
    // checks above would see an error if a page had one.
    let logged = console(&b.driver, &b.session);
    assert!(
        logged
            .iter()
            .any(|e| e["level"] == "SEVERE" && e["message"].as_str().is_some_and(|m| m.contains("401"))),
        "the browser's console is read: {logged:#?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !env.newest_journal().iter().any(|r| r["event"] == "promoted"),
        "the refused promotion changed nothing"
    );
    assert!(
        deploy.try_wait().expect("the deploy process").is_none(),
        "still waiting"
    );

    // Sign in with the token, then promote with the button.
    b.open("/login").await;
    b.c.find(Locator::Id("token"))
        .await
        .expect("the token field")
        .send_keys(&token(&env))
        .await
        .expect("type the token");
    b.click("#sign-in").await;
    b.wait_for("signed in", "signed in").await;
    b.open(&format!("/deployments/{id}")).await;
    b.wait_for("id=\"promote\"", "the promote button").await;
    b.no_console_errors("the deployment, signed in");
    b.shot("deployment-waiting").await;
    b.click("#promote").await;
    b.wait_for("Promoted: the canary goes on", "the promotion notice")
        .await;
    b.c.execute("window.notReloaded = true;", vec![])
        .await
        .expect("mark the page");
    // The rest of the run arrives over the live stream.
    b.wait_for("badge ok\">succeeded", "the finished deployment, live")
        .await;
    let same_page =
        b.c.execute("return window.notReloaded === true;", vec![])
            .await
            .expect("read the mark");
    assert_eq!(
        same_page,
        Value::Bool(true),
        "the deployment page updated in place"
    );
    let updates =
        b.c.execute(
            "return Number(document.getElementById('live').getAttribute('data-updates'));",
            vec![],
        )
        .await
        .expect("count the updates");
    assert!(
        updates.as_f64().is_some_and(|n| n >= 2.0),
        "the run progressed over the live stream after the page loaded: {updates} update(s)"
    );
    b.no_console_errors("the promoted deployment");
    b.shot("deployment-promoted").await;
    assert_eq!(
        deploy.wait().expect("the deploy process").code(),
        Some(0),
        "the promoted canary finishes"
    );
    assert!(env.newest_journal().iter().any(|r| r["event"] == "promoted"));

    // A flag changed in the page changes what OFREP answers.
    assert_eq!(
        evaluate(&ofrep)["value"],
        json!(false),
        "before: {}",
        evaluate(&ofrep)
    );
    b.open("/flags").await;
    b.wait_for("Kill switch", "the flag forms").await;
    b.c.find(Locator::Css(
        "#flag-new-checkout select[name=variant] option:not([selected])",
    ))
    .await
    .expect("the other variant")
    .click()
    .await
    .expect("pick it");
    b.click("#flag-new-checkout form:nth-of-type(3) button").await;
    b.wait_for("Default variant</dt><dd>on</dd>", "the new default")
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while evaluate(&ofrep)["value"] != json!(true) {
        assert!(
            Instant::now() < deadline,
            "OFREP still answers {}",
            evaluate(&ofrep)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.click("#flag-new-checkout button.toggle").await;
    b.wait_for("data-state=\"disabled\"", "the disabled flag").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while evaluate(&ofrep)["reason"] != json!("DISABLED") {
        assert!(
            Instant::now() < deadline,
            "OFREP still answers {}",
            evaluate(&ofrep)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.no_console_errors("/flags after the changes");
    b.shot("flags").await;

    // The pages again with both runs and the flag changes (the
    // screenshots docs/dashboard.md shows).
    for (path, name, text) in [
        ("/", "deployments", id.as_str()),
        ("/fleet", "fleet", "v2"),
        ("/history", "history", "Flag changes"),
    ] {
        b.open(path).await;
        b.wait_for(text, path).await;
        b.no_console_errors(path);
        b.shot(name).await;
    }
    b.c.close().await.expect("close the session");
}
