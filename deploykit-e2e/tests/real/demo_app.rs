//! The demo app, started as a real process.

use std::time::Duration;

use crate::harness::{eventually, sigterm, DemoApp, DemoOpts, Http};

#[tokio::test]
async fn routes_answer_with_version_track_and_metrics() {
    let app = DemoApp::start(DemoOpts::new("v7").track("canary")).await;
    let http = Http::new();

    let root = http.get(&app.url("/")).await.unwrap();
    assert_eq!(root.status, 200);
    assert_eq!(root.body.trim(), "v7");
    assert_eq!(root.version.as_deref(), Some("v7"));
    assert_eq!(
        root.headers.get("x-app-track").map(String::as_str),
        Some("canary")
    );

    let health = http.get(&app.url("/health")).await.unwrap();
    assert_eq!((health.status, health.body.trim()), (200, "ok"));

    let ping = http.get(&app.url("/api/db/ping")).await.unwrap();
    assert_eq!(ping.status, 200);
    assert!(ping.body.contains("ok"), "{}", ping.body);

    let status = http.get(&app.url("/api/status")).await.unwrap();
    assert_eq!(status.status, 200);
    assert!(status.body.contains("\"version\":\"v7\""), "{}", status.body);
    assert!(status.body.contains("\"track\":\"canary\""), "{}", status.body);

    let missing = http.get(&app.url("/nope")).await.unwrap();
    assert_eq!(missing.status, 404);

    let metrics = http.get(&app.url("/metrics")).await.unwrap();
    assert_eq!(metrics.status, 200);
    let m = metrics.body;
    assert!(
        m.contains(r#"http_requests_total{code="200",track="canary",version="v7"} 4"#),
        "{m}"
    );
    assert!(
        m.contains(r#"http_requests_total{code="404",track="canary",version="v7"} 1"#),
        "{m}"
    );
    assert!(
        m.contains(r#"http_request_duration_seconds_count{track="canary",version="v7"} 5"#),
        "{m}"
    );
    assert!(m.contains("http_request_duration_seconds_bucket{"), "{m}");
    // The scrape itself is not counted as in flight.
    assert!(m.contains("http_requests_in_flight 0"), "{m}");
}

#[tokio::test]
async fn unhealthy_flag_fails_health_only() {
    let app = DemoApp::start(DemoOpts::new("v1").args(&["--unhealthy"])).await;
    let http = Http::new();
    assert_eq!(http.get(&app.url("/health")).await.unwrap().status, 503);
    assert_eq!(http.get(&app.url("/")).await.unwrap().status, 200);
}

#[tokio::test]
async fn error_rate_fails_that_fraction_of_root_requests() {
    let app = DemoApp::start(DemoOpts::new("v1").args(&["--error-rate", "0.25"])).await;
    let http = Http::new();
    let counts = http.count_versions(&app.url("/"), 40).await;
    assert_eq!(counts.get("error:500"), Some(&10), "{counts:?}");
    assert_eq!(counts.get("v1"), Some(&30), "{counts:?}");
    // Health is not affected.
    assert_eq!(http.get(&app.url("/health")).await.unwrap().status, 200);
}

#[tokio::test]
async fn bad_error_rate_is_rejected_with_the_flag() {
    let out = tokio::process::Command::new(crate::harness::demo_app_binary())
        .args(["--listen", "127.0.0.1:0", "--error-rate", "2"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--error-rate") && err.contains("0.0-1.0"), "{err}");
}

#[tokio::test]
async fn latency_delays_answers() {
    let app = DemoApp::start(DemoOpts::new("v1").args(&["--latency-ms", "300"])).await;
    let http = Http::new();
    // Warm the connection so only the handler's delay is measured.
    http.get(&app.url("/health")).await.unwrap();
    let t = std::time::Instant::now();
    http.get(&app.url("/")).await.unwrap();
    assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
    let t = std::time::Instant::now();
    http.get(&app.url("/health")).await.unwrap();
    assert!(t.elapsed() < Duration::from_millis(300), "health is not delayed");
}

#[tokio::test]
async fn startup_delay_postpones_listening() {
    let port = crate::harness::free_port();
    let t = std::time::Instant::now();
    let app = DemoApp::start(
        DemoOpts::new("v1")
            .port(port)
            .args(&["--startup-delay-ms", "400"]),
    )
    .await;
    assert!(t.elapsed() >= Duration::from_millis(400), "{:?}", t.elapsed());
    assert_eq!(app.addr.port(), port);
}

#[tokio::test]
async fn pid_file_is_written() {
    let dir = crate::harness::temp_dir("demo-pid");
    let pid_file = dir.path().join("app.pid");
    let app = DemoApp::start(DemoOpts::new("v1").args(&["--pid-file", pid_file.to_str().unwrap()])).await;
    let written = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(written.trim(), app.pid().to_string());
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let app = DemoApp::start(DemoOpts::new("v1").args(&["--latency-ms", "700"])).await;
    let http = Http::new();
    let url = app.url("/");
    let pid = app.pid();
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            let http = http.clone();
            let url = url.clone();
            tokio::spawn(async move { http.get(&url).await })
        })
        .collect();
    // Once the app reports the three requests in flight, ask it to stop.
    let metrics = app.url("/metrics");
    eventually(Duration::from_secs(10), "3 requests in flight", || async {
        let m = http.get(&metrics).await.ok()?;
        m.body
            .lines()
            .any(|l| l.trim() == "http_requests_in_flight 3")
            .then_some(())
    })
    .await;
    sigterm(pid);
    // New connections are refused while the old requests (700 ms each)
    // still run.
    eventually(
        Duration::from_secs(5),
        "the app refuses new connections",
        || async {
            tokio::net::TcpStream::connect(app.addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    for r in in_flight {
        let a = r.await.unwrap().expect("in-flight request finished");
        assert_eq!((a.status, a.body.trim()), (200, "v1"));
    }
    let mut app = app;
    let status = tokio::time::timeout(Duration::from_secs(10), app.child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// `/api/checkout` of a real demo app process reading a flagd file: a flag
/// change (made through deploykit's FlagStore) is seen over HTTP by the
/// targeted segment only.
#[tokio::test]
async fn checkout_follows_a_flag_change_for_the_targeted_segment_only() {
    use deploykit::flags::{FlagChange, FlagChangeKind, FlagStore};

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flags.json");
    std::fs::write(
        &file,
        r#"{ "flags": { "new-checkout": { "state": "ENABLED",
            "variants": { "on": true, "off": false }, "defaultVariant": "off" } } }"#,
    )
    .unwrap();
    let app = DemoApp::start(DemoOpts::new("v1").args(&["--flags-file", file.to_str().unwrap()])).await;
    let http = Http::new();
    let flow = |user: &'static str, segment: &'static str| {
        let url = app.url(&format!("/api/checkout?user={user}&segment={segment}"));
        let http = &http;
        async move {
            let r = http.get(&url).await.unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
            v["flow"].as_str().unwrap().to_owned()
        }
    };
    assert_eq!(flow("u1", "internal").await, "old");
    assert_eq!(flow("u2", "public").await, "old");

    let store = FlagStore::new(&file, dir.path().join("flags.jsonl"));
    store
        .apply(&FlagChange {
            flag: "new-checkout".into(),
            kind: FlagChangeKind::Targeting {
                rule: Some(
                    serde_json::json!({ "if": [{ "==": [{ "var": "segment" }, "internal"] }, "on", null] }),
                ),
            },
            who: "test".into(),
            why: Some("dark launch to staff".into()),
        })
        .unwrap();
    // The app re-reads the file on the next request after it changed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while flow("u1", "internal").await != "new" {
        assert!(
            std::time::Instant::now() < deadline,
            "the flag change was not seen within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (user, segment) in [("u1", "internal"), ("u9", "internal")] {
        assert_eq!(flow(user, segment).await, "new", "{user} in {segment}");
    }
    for (user, segment) in [("u1", "public"), ("u2", "public"), ("u3", "partner")] {
        assert_eq!(flow(user, segment).await, "old", "{user} in {segment}");
    }
}
