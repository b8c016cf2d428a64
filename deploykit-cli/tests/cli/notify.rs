//! Webhook notifications against small HTTP servers on 127.0.0.1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::util::{simulated, Env};

#[derive(Clone)]
pub(crate) enum Behaviour {
    Ok,
    Error500,
    Hang,
    /// Answers `307 Temporary Redirect` to this URL.
    Redirect(String),
}

/// What a test server recorded, one entry per request.
pub(crate) type Recorded = Arc<Mutex<Vec<String>>>;

/// A one-thread HTTP server recording request bodies; returns its URL.
pub(crate) fn server(behaviour: Behaviour) -> (String, Arc<Mutex<Vec<String>>>) {
    let (url, bodies, _) = server_with_heads(behaviour);
    (url, bodies)
}

/// As [`server`], recording each request's lines before its body too.
pub(crate) fn server_with_heads(behaviour: Behaviour) -> (String, Recorded, Recorded) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let seen_heads = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                head.push_str(&line);
                let l = line.to_ascii_lowercase();
                if let Some(v) = l.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            let _ = reader.read_exact(&mut body);
            seen_heads.lock().unwrap().push(head);
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&body).into_owned());
            match &behaviour {
                Behaviour::Ok => {
                    let _ = stream
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                }
                Behaviour::Error500 => {
                    let _ = stream
                        .write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                }
                Behaviour::Hang => std::thread::sleep(Duration::from_secs(30)),
                Behaviour::Redirect(to) => {
                    let _ = stream.write_all(
                        format!(
                            "HTTP/1.1 307 Temporary Redirect\r\nlocation: {to}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                }
            }
        }
    });
    (url, bodies, heads)
}

#[test]
fn a_grafana_webhook_posts_annotations_with_the_token_from_the_environment() {
    let (url, bodies, heads) = server_with_heads(Behaviour::Ok);
    let extra = format!(
        "[instance_defaults]\nsimulated = true\nsimulate_unhealthy = [\"v3\"]\n\
         [strategy.rolling]\nmax_failures = 0\nhealth_retries = 1\nhealth_interval = \"20ms\"\nstabilisation = \"20ms\"\n\
         [[notifications.webhooks]]\nurl = \"{url}\"\nformat = \"grafana\"\ntoken_env = \"DK_TEST_GRAFANA_TOKEN\"\n"
    );
    let env = Env::new(&simulated(2, &extra).replacen("[instance_defaults]\nsimulated = true\n\n", "", 1));
    let before = deploykit_now_ms();
    env.cmd()
        .env("DK_TEST_GRAFANA_TOKEN", "glsa_secret")
        .args(["deploy", "v2"])
        .assert()
        .code(0);
    env.cmd()
        .env("DK_TEST_GRAFANA_TOKEN", "glsa_secret")
        .args(["deploy", "v3"])
        .assert()
        .code(1);
    let bodies: Vec<Value> = bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    assert_eq!(bodies.len(), 4, "{bodies:?}");
    for h in heads.lock().unwrap().iter() {
        assert!(
            h.to_ascii_lowercase()
                .contains("authorization: bearer glsa_secret"),
            "{h}"
        );
    }
    // The start is a point; the end a region from the start to the end.
    let (start, end) = (&bodies[0], &bodies[1]);
    let t0 = start["time"].as_u64().unwrap();
    assert!(t0 >= before, "{start}");
    assert!(start.get("timeEnd").is_none(), "{start}");
    assert_eq!(end["time"].as_u64(), Some(t0), "{end}");
    assert!(end["timeEnd"].as_u64().unwrap() >= t0, "{end}");
    let tags: Vec<&str> = end["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for t in [
        "deploykit",
        "app:shop",
        "strategy:rolling",
        "release:v2",
        "event:success",
        "outcome:succeeded",
    ] {
        assert!(tags.contains(&t), "{tags:?}");
    }
    assert!(end["text"].as_str().unwrap().contains("v2: succeeded"), "{end}");
    let rolled_back = &bodies[3];
    assert!(
        rolled_back["text"].as_str().unwrap().contains("reason:"),
        "{rolled_back}"
    );

    // A token_env that is not a variable name is refused before anything runs.
    let bad = Env::new(&simulated(
        1,
        &format!(
            "[[notifications.webhooks]]\nurl = \"{url}\"\nformat = \"grafana\"\ntoken_env = \"$TOKEN\"\n"
        ),
    ));
    let (code, _, err) = bad.run(&["deploy", "v2"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("notifications.webhooks[0].token_env"), "{err}");
}

fn deploykit_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn webhooks_get_start_success_and_rollback_in_both_formats() {
    let (json_url, json_bodies) = server(Behaviour::Ok);
    let (slack_url, slack_bodies) = server(Behaviour::Ok);
    let extra = format!(
        "[instance_defaults]\nsimulated = true\nsimulate_unhealthy = [\"v3\"]\n\
         [strategy.rolling]\nmax_failures = 0\nhealth_retries = 1\nhealth_interval = \"20ms\"\nstabilisation = \"20ms\"\n\
         [[notifications.webhooks]]\nurl = \"{json_url}\"\n\
         [[notifications.webhooks]]\nurl = \"{slack_url}\"\nformat = \"slack\"\non = [\"success\", \"rollback\"]\n"
    );
    let env = Env::new(&simulated(2, &extra).replacen("[instance_defaults]\nsimulated = true\n\n", "", 1));
    env.ok(&["deploy", "v2"], 0);
    env.ok(&["deploy", "v3"], 1);
    let json: Vec<Value> = json_bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    let events: Vec<(&str, &str)> = json
        .iter()
        .map(|v| (v["event"].as_str().unwrap(), v["release"].as_str().unwrap()))
        .collect();
    assert_eq!(
        events,
        [
            ("start", "v2"),
            ("success", "v2"),
            ("start", "v3"),
            ("rollback", "v3")
        ]
    );
    assert_eq!(json[1]["app"], "shop");
    assert_eq!(json[1]["strategy"], "rolling");
    assert_eq!(json[1]["outcome"], "succeeded");
    assert!(json[1]["duration_ms"].is_u64());
    assert!(
        json[3]["reason"].as_str().unwrap().contains("failure budget"),
        "{}",
        json[3]
    );
    let slack: Vec<Value> = slack_bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    assert_eq!(slack.len(), 2, "{slack:?}");
    assert!(
        slack[0]["text"].as_str().unwrap().contains("`v2` succeeded"),
        "{}",
        slack[0]
    );
    assert!(
        slack[1]["text"].as_str().unwrap().contains("was rolled back"),
        "{}",
        slack[1]
    );
}

#[test]
fn failing_webhooks_never_fail_the_deployment() {
    let (err_url, err_bodies) = server(Behaviour::Error500);
    let (hang_url, _) = server(Behaviour::Hang);
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hook", l.local_addr().unwrap())
    };
    let extra = format!(
        "[notifications]\ntimeout = \"300ms\"\n\
         [[notifications.webhooks]]\nurl = \"{err_url}\"\n\
         [[notifications.webhooks]]\nurl = \"{hang_url}\"\n\
         [[notifications.webhooks]]\nurl = \"{closed}\"\n"
    );
    let env = Env::new(&simulated(2, &extra));
    env.ok(&["deploy", "v2"], 0);
    assert_eq!(env.sim("web-1")["release"], "v2");
    assert_eq!(err_bodies.lock().unwrap().len(), 2, "start and success were sent");
}

#[test]
fn a_webhook_redirect_is_not_followed_and_is_reported_as_a_failed_delivery() {
    // A 307 keeps the method and body: following it would post the notice
    // to whatever host the first one names.
    let (elsewhere_url, elsewhere_bodies) = server(Behaviour::Ok);
    let (hook_url, hook_bodies) = server(Behaviour::Redirect(elsewhere_url.clone()));
    let extra = format!("[[notifications.webhooks]]\nurl = \"{hook_url}\"\n");
    let env = Env::new(&simulated(2, &extra));
    let (code, out, err) = env.run(&["deploy", "v2"]);
    assert_eq!(code, 0, "a webhook never fails a deployment\n{out}\n{err}");
    assert_eq!(
        hook_bodies.lock().unwrap().len(),
        2,
        "start and success were sent"
    );
    assert!(
        elsewhere_bodies.lock().unwrap().is_empty(),
        "the redirect was followed: {:?}",
        elsewhere_bodies.lock().unwrap()
    );
    let origin = elsewhere_url.trim_end_matches("/hook");
    assert!(
        err.contains("redirect")
            && err.contains("not followed")
            && err.contains("307")
            && err.contains(origin),
        "{err}"
    );
}

#[test]
fn secrets_in_configured_urls_appear_nowhere() {
    // A Prometheus that accepts connections and closes them unanswered: the
    // canary's analysis fails with a connection error, the kind of error
    // whose text carries the URL it was sent to.
    let prom = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                drop(s);
            }
        });
        format!("http://user:s3cret@{addr}")
    };
    let (hook_url, hook_bodies) = server(Behaviour::Ok);
    let hook_url = format!("{hook_url}/T0KENPATH?token=QU3RYSECRET");
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/hooks/DEADT0KEN?key=DEADQU3RY", l.local_addr().unwrap())
    };
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18391\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18392\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\ntimeout = \"1s\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [50, 100]\nstage_duration = \"300ms\"\ncheck_interval = \"100ms\"\n\
        health_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\
        monitoring_check = false\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n\n\
        [notifications]\ntimeout = \"1s\"\n\
        [[notifications.webhooks]]\nurl = \"{hook_url}\"\n\
        [[notifications.webhooks]]\nurl = \"{closed}\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let secrets = ["s3cret", "T0KENPATH", "QU3RYSECRET", "DEADT0KEN", "DEADQU3RY"];
    let mut seen = String::new();
    for (release, verbosity) in [("v2", None), ("v3", Some("-v")), ("v4", Some("-vv"))] {
        let mut args: Vec<&str> = verbosity.into_iter().collect();
        args.extend(["deploy", release]);
        let (code, out, err) = env.run(&args);
        assert_eq!(
            code, 1,
            "the canary cannot be analysed and is rolled back\n{out}\n{err}"
        );
        assert!(
            out.contains("metrics provider error") || err.contains("metrics provider error"),
            "the failure is the metrics provider's\n{out}\n{err}"
        );
        seen.push_str(&format!("deploy {args:?} stdout:\n{out}\nstderr:\n{err}\n"));
    }
    for args in [
        &["history"][..],
        &["status"],
        &["-v", "status"],
        &["--json", "history"],
    ] {
        let (_, out, err) = env.run(args);
        seen.push_str(&format!("{args:?} stdout:\n{out}\nstderr:\n{err}\n"));
    }
    let mut files = vec![env.state()];
    while let Some(p) = files.pop() {
        if p.is_dir() {
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        } else {
            let text = String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned();
            seen.push_str(&format!("file {}:\n{text}\n", p.display()));
        }
    }
    let bodies = hook_bodies.lock().unwrap().join("\n");
    assert!(
        bodies.contains("\"rollback\""),
        "the webhook got the rollback: {bodies}"
    );
    seen.push_str(&format!("webhook bodies:\n{bodies}\n"));
    for s in secrets {
        assert!(!seen.contains(s), "{s:?} leaked:\n{seen}");
    }
    assert!(seen.contains("127.0.0.1"), "the host is still named:\n{seen}");
}
