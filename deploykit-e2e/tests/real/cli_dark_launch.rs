//! A dark launch through the `deploykit` binary, killed (`SIGKILL`) while
//! it waits for its promotion: `deploykit promote` with no process running
//! records the promotion, and `deploy --resume` goes on past the wait
//! without asking again, its timeout counted from the first wait. Real
//! nginx (header rule through its location include), local demo-app
//! instances the CLI starts, and a real Prometheus for the analysis.

use std::path::Path;
use std::time::Duration;

use deploykit::Metric;
use serde_json::Value;
use tokio::time::{sleep, Instant};

use crate::harness::{deploykit_binary, free_ports, make_release, temp_dir, Http, KillOnDrop, Nginx};
use crate::load::{Client, LoadGen};
use crate::prometheus::{wait_for_value, PromServer};
use crate::routing::write_routing_config;

/// Runs the CLI in `dir`; its exit code, stdout and stderr.
async fn cli(bin: &Path, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(bin)
        .current_dir(dir)
        .env_remove("DEPLOYKIT_CONFIG")
        .env_remove("RUST_LOG")
        .args(args)
        .output()
        .await
        .expect("run deploykit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The journals under `state`, oldest first, each as its records.
fn journals(state: &Path) -> Vec<Vec<Value>> {
    let dir = state.join("shop").join("journal");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    files.retain(|p: &std::path::PathBuf| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn a_killed_dark_launch_promoted_while_down_goes_on_when_resumed() {
    let nginx_bin = crate::require_binary!("nginx");
    let prom_bin = crate::require_binary!("prometheus");
    let bin = deploykit_binary();
    let dir = temp_dir("dk-cli-dark-");
    let d = dir.path();
    let builds = d.join("builds");
    for r in ["v1", "v2"] {
        make_release(&builds, r);
    }
    let ports = free_ports(3);
    let (stable, canary, port) = (ports[0], ports[1], ports[2]);
    write_routing_config(d, port);
    let _kill = KillOnDrop(vec![d.join("instances/stable-1"), d.join("instances/canary-1")]);
    let instance = |id: &str, port: u16, group: &str| {
        format!(
            "[[instances]]\nid = \"{id}\"\naddress = \"127.0.0.1:{port}\"\ngroup = \"{group}\"\n\
             command = [\"./deploykit-demo-app\", \"--listen\", \"{{address}}\", \"--version\", \"{{release}}\", \"--track\", \"{group}\"]\n\n"
        )
    };
    let ds = d.display();
    let config = format!(
        "app = \"shop\"\nreleases = \"builds\"\n\n\
         [instance_defaults]\nroot = \"instances/{{id}}\"\nstop_grace = \"5s\"\n\n\
         {}{}\
         [load_balancer]\nkind = \"nginx\"\ninclude_file = \"{ds}/upstream.conf\"\nlocation_include = \"{ds}/location.conf\"\n\
         upstream = \"app\"\nnginx_binary = \"{}\"\nnginx_config = \"{ds}/nginx.conf\"\nnginx_prefix = \"{ds}\"\npid_file = \"{ds}/nginx.pid\"\n\n\
         [metrics]\nprometheus = \"PROMETHEUS\"\n\n\
         [strategy]\nkind = \"dark-launch\"\n\n\
         [strategy.canary]\nstages = [100]\nstage_duration = \"4s\"\ncheck_interval = \"1s\"\nwindow = \"5s\"\ninconclusive_limit = 10\n\
         health_retries = 200\nhealth_interval = \"50ms\"\ndrain_timeout = \"2s\"\n\n\
         [strategy.dark-launch]\nrules = [{{ header = \"x-beta\", exact = \"1\", group = \"canary\" }}]\ntimeout = \"120s\"\n\n\
         [strategy.recreate]\nhealth_retries = 200\nhealth_interval = \"50ms\"\ndrain_timeout = \"2s\"\n\n\
         [timeouts]\ndrain_poll = \"20ms\"\n",
        instance("stable-1", stable, "stable"),
        instance("canary-1", canary, "canary"),
        nginx_bin.display(),
    );
    let targets = [format!("127.0.0.1:{stable}"), format!("127.0.0.1:{canary}")];
    let prom = PromServer::start(&prom_bin, d, &targets).await;
    std::fs::write(
        d.join("deploykit.toml"),
        config.replace("PROMETHEUS", &prom.url("")),
    )
    .unwrap();
    let (code, out, err) = cli(&bin, d, &["setup"]).await;
    assert!(
        d.join("location.conf").is_file(),
        "setup exited {code}:\n{out}{err}"
    );
    let nginx = Nginx::start(&nginx_bin, d, port).await;
    let (code, out, err) = cli(&bin, d, &["-q", "deploy", "v1", "--strategy", "recreate"]).await;
    assert_eq!(code, 0, "v1 everywhere:\n{out}{err}");

    // Traffic for the analysis, a new connection per request.
    let url = nginx.url("/");
    let load = LoadGen::open_loop(&url, 50, Duration::from_secs(90), false, Client::NonRetrying);
    let source = prom.source();
    let w = Duration::from_secs(5);
    for metric in [Metric::ErrorRate, Metric::LatencyP99] {
        wait_for_value(&source, metric, "stable", w).await;
    }
    let end = Instant::now() + Duration::from_secs(20);
    while wait_for_value(&source, Metric::RequestCount, "stable", w).await <= 0.0 {
        assert!(Instant::now() < end, "no stable requests counted within 20 s");
        sleep(Duration::from_millis(200)).await;
    }

    // The dark launch, killed while it waits for its promotion.
    let mut deploy = tokio::process::Command::new(&bin)
        .current_dir(d)
        .env_remove("DEPLOYKIT_CONFIG")
        .env_remove("RUST_LOG")
        .args(["-q", "deploy", "v2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn deploykit deploy");
    let state = d.join(".deploykit");
    let waits = |j: &Vec<Value>| j.iter().any(|r| r["event"] == "awaiting_promotion");
    let end = Instant::now() + Duration::from_secs(60);
    while !journals(&state).last().is_some_and(waits) {
        assert!(
            deploy.try_wait().unwrap().is_none(),
            "the dark launch ended before it waited"
        );
        assert!(
            Instant::now() < end,
            "the dark launch never waited for its promotion"
        );
        sleep(Duration::from_millis(50)).await;
    }
    let http = Http::without_retries(false);
    for _ in 0..10 {
        let tester = http.send("GET", &url, &[("x-beta", "1")]).await.expect("tester");
        assert_eq!(
            tester.version.as_deref(),
            Some("v2"),
            "testers reach the dark release: {tester:?}"
        );
        let public = http.get(&url).await.expect("public");
        assert_eq!(
            public.version.as_deref(),
            Some("v1"),
            "the public does not: {public:?}"
        );
    }
    deploy.start_kill().expect("SIGKILL");
    deploy.wait().await.unwrap();
    // Down for 3 s: the resumed wait must count them (and the redeploy).
    sleep(Duration::from_secs(3)).await;

    let (code, out, err) = cli(&bin, d, &["promote"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("promotion of stage 1 recorded"), "{out}");

    let (code, out, err) = cli(&bin, d, &["deploy", "--resume"]).await;
    let _ = load.stop().await;
    assert_eq!(
        code, 0,
        "the resume goes on past the recorded promotion:\n{out}{err}"
    );
    assert!(
        out.contains("stage 1 was promoted while no deploykit ran"),
        "{out}"
    );
    let all = journals(&state);
    let resumed = all.last().expect("the resume's journal");
    assert_eq!(resumed[0]["kind"], "resume", "{}", resumed[0]);
    let wait = resumed
        .iter()
        .find(|r| r["event"] == "awaiting_promotion")
        .expect("the resume announces the wait");
    let left = wait["timeout_ms"].as_u64().expect("a timeout");
    eprintln!("the resumed wait had {left} ms left of 120000");
    assert!(
        left <= 117_000,
        "the timeout counts from the first wait, not afresh: {left} ms left of 120 s"
    );
    let at = |event: &str| resumed.iter().position(|r| r["event"] == event);
    assert!(
        at("awaiting_promotion") < at("promoted") && at("promoted").is_some(),
        "{resumed:?}"
    );
    assert_eq!(
        resumed.last().map(|r| r["outcome"].clone()),
        Some(Value::from("succeeded")),
        "{out}"
    );
    for _ in 0..10 {
        let a = http.get(&url).await.expect("GET through nginx");
        assert_eq!(a.version.as_deref(), Some("v2"), "promoted: {a:?}");
    }
}
