//! `stats` and `postmortem` on a simulated canary fleet: one deployment
//! with a commit time that went live, one canary that failed its analysis
//! and rolled back.

use serde_json::Value;

use crate::util::{json_lines, Env};

/// A canary fleet (one stable, one canary instance) whose Prometheus
/// stand-in gives the canary a 50 % error rate: every canary deployment
/// rolls back at its first check.
fn failing_canary() -> Env {
    let prom =
        crate::util::prometheus(
            |request| match (request.contains("errors"), request.contains("canary")) {
                (true, true) => 0.5,
                (true, false) => 0.001,
                _ => 0.05,
            },
        );
    Env::new(&format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18396\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18397\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n\
        [metrics]\nprometheus = \"{prom}\"\nerror_rate = \"errors{{track=\\\"{{group}}\\\"}}\"\n\
        latency_p99 = \"latency{{track=\\\"{{group}}\\\"}}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [50, 100]\nstage_duration = \"200ms\"\ncheck_interval = \"100ms\"\n\
        error_threshold = 0.2\nratio_significance = 0\n\
        health_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    ))
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// v1 by recreate with a commit made 10 minutes ago, then v2 by canary,
/// rolled back; returns the env and the canary's id.
fn two_deployments() -> (Env, String) {
    let env = failing_canary();
    let committed = (now_s() - 600).to_string();
    env.ok(
        &[
            "deploy",
            "v1",
            "--strategy",
            "recreate",
            "--commit",
            "abcdef1234",
            "--commit-time",
            &committed,
        ],
        0,
    );
    env.ok(&["deploy", "v2"], 1);
    let history = json_lines(&env.ok(&["history", "--json"], 0));
    let id = history
        .iter()
        .find(|h| h["release"] == "v2")
        .and_then(|h| h["id"].as_str())
        .expect("the canary in the history")
        .to_string();
    (env, id)
}

#[test]
fn stats_counts_the_dora_figures_of_the_journals() {
    let (env, canary) = two_deployments();
    let doc: Value = serde_json::from_str(&env.ok(&["stats", "--json"], 0)).unwrap();
    let dora = &doc["dora"];
    assert_eq!(dora["deployments"], 2, "{doc}");
    assert_eq!(dora["live"], 1, "{doc}");
    assert_eq!(dora["failed"], 1, "{doc}");
    assert_eq!(dora["change_failure_rate"], 0.5, "{doc}");
    let lead = dora["lead_time"]["median_ms"].as_u64().unwrap();
    assert!(
        (600_000..700_000).contains(&lead),
        "commit 10 minutes before live: {lead}"
    );
    assert_eq!(
        dora["recovery_time"]["count"], 1,
        "the canary rolled itself back: {doc}"
    );
    let runs = doc["deployments"].as_array().unwrap();
    let c = runs.iter().find(|r| r["id"] == canary.as_str()).unwrap();
    assert_eq!(c["outcome"], "rolled_back");
    let check = &c["checks"][0];
    assert_eq!(check["outcome"]["result"], "fail", "{c}");
    let error_rate = check["measurements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["metric"] == "error_rate")
        .expect("the error rate measured");
    assert_eq!(
        (error_rate["value"].as_f64(), error_rate["threshold"].as_f64()),
        (Some(0.5), Some(0.2))
    );

    let text = env.ok(&["stats", "--since", "1d"], 0);
    for part in [
        "DORA",
        "deployment frequency",
        "(1 of 2 deployment(s) went live)",
        "change failure rate    50.0% (1 failed)",
        "lead time for changes  10m",
        "deployments a day, last 1 day(s)",
        "rolled back",
        "canary checks: 0 passed, 1 failed",
    ] {
        assert!(text.contains(part), "missing {part:?} in:\n{text}");
    }
}

#[test]
fn stats_refuses_a_window_that_is_not_a_duration() {
    let env = failing_canary();
    let (code, _, err) = env.run(&["stats", "--since", "lately"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--since") && err.contains("30d"), "{err}");
    let out = env.ok(&["stats"], 0);
    assert!(out.contains("no runs recorded"), "{out}");
}

#[test]
fn postmortem_writes_the_decision_values_recovery_and_timeline() {
    let (env, canary) = two_deployments();
    let md = env.ok(&["postmortem", &canary], 0);
    for part in [
        &format!("# Post-mortem: deployment {canary} of shop (rolled back)") as &str,
        "| release | v2 |",
        "## The decision that stopped it",
        "canary error rate",
        "at stage 1 with 50% of traffic",
        "### Analysis values (value / limit)",
        "| **fail** |",
        "0.5000 / 0.2000",
        "by its own rollback",
        "## Instances affected (1 of 2)",
        "| canary-1 | v1 | restored |",
        "## Timeline (UTC)",
        "rollback of 1 instance(s) started",
    ] {
        assert!(md.contains(part), "missing {part:?} in:\n{md}");
    }
    let json: Value = serde_json::from_str(&env.ok(&["postmortem", &canary, "--json"], 0)).unwrap();
    assert_eq!(json["deployment"]["id"], canary.as_str());
    assert!(json["recovery_ms"].as_u64().is_some(), "{json}");
    assert!(json["timeline"].as_array().unwrap().len() >= 4, "{json}");

    // A deployment that went live has no post-mortem; an unknown id names
    // the ids there are.
    let history = json_lines(&env.ok(&["history", "--json"], 0));
    let live = history[0]["id"].as_str().unwrap();
    let (code, _, err) = env.run(&["postmortem", live]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("succeeded") && err.contains("post-mortem"), "{err}");
    let (code, _, err) = env.run(&["postmortem", "nope"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no deployment `nope`") && err.contains(&canary),
        "{err}"
    );
}

/// `GET path` on 127.0.0.1:`port`: (status line and headers, body).
pub(crate) fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    (head.to_string(), body.to_string())
}

/// A port nothing listens on right now.
pub(crate) fn free_port() -> u16 {
    crate::util::free_port()
}

#[test]
fn deploy_serves_metrics_while_it_runs() {
    let prom = crate::util::prometheus(|_| 0.001);
    let env = Env::new(&format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18391\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18392\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [20, 100]\nstage_duration = \"300ms\"\ncheck_interval = \"100ms\"\n\
        promotion = \"manual\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    ));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);

    // A port in use is refused before anything is touched.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let journals = env.journal_count();
    let (code, _, err) = env.run(&["deploy", "v2", "--metrics-listen", &addr]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("metrics-listen") && err.contains("cannot listen"),
        "{err}"
    );
    assert_eq!(env.journal_count(), journals, "no run started");
    drop(taken);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut deploy = env.spawn_deploy_with(
        "v2",
        &["--metrics-listen", &listen],
        "the wait for promotion",
        |r| r["event"] == "awaiting_promotion",
    );
    let (head, body) = http_get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("application/openmetrics-text"),
        "{head}"
    );
    let id = env.newest_journal()[0]["deployment"]
        .as_str()
        .unwrap()
        .to_string();
    for line in [
        "deploykit_deployments_total{app=\"shop\",kind=\"deploy\",strategy=\"recreate\",outcome=\"succeeded\"} 1".to_string(),
        "deploykit_deployment_in_progress{app=\"shop\"} 1".into(),
        "deploykit_canary_status{name=\"shop\",namespace=\"shop\"} 0".into(),
        "deploykit_canary_weight{name=\"shop\",namespace=\"shop\",workload=\"shop\",track=\"canary\"} 20".into(),
        "deploykit_canary_weight{name=\"shop\",namespace=\"shop\",workload=\"shop-primary\",track=\"stable\"} 80".into(),
        format!("deploykit_analysis_value{{app=\"shop\",deployment=\"{id}\",metric=\"error_rate\"}} 0.001"),
        format!("deploykit_analysis_threshold{{app=\"shop\",deployment=\"{id}\",metric=\"error_rate\"}} 0.01"),
        // The canary instance runs v2 while stable keeps v1.
        "deploykit_instances{app=\"shop\",release=\"v1\"} 1".into(),
        "deploykit_instances{app=\"shop\",release=\"v2\"} 1".into(),
    ] {
        assert!(body.lines().any(|l| l == line), "missing `{line}` in:\n{body}");
    }
    assert!(body.ends_with("# EOF\n"), "{body}");
    let (head, _) = http_get(port, "/nothing");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    env.ok(&["promote"], 0);
    assert_eq!(deploy.wait().unwrap().code(), Some(0));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the endpoint ends with the run"
    );
}

/// Prometheus on PATH or /usr/bin; a missing one fails the test, in CI or
/// not (scripts/test installs it).
fn prometheus_binary() -> std::path::PathBuf {
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/bin".into());
    dirs.into_iter()
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
        .expect("prometheus is not installed: CLI tests never skip (scripts/test installs it)")
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A real Prometheus scraping 127.0.0.1:`target` every second; killed on drop.
struct RealPrometheus {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for RealPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RealPrometheus {
    fn start(target: u16) -> Self {
        Self::start_with(target, "")
    }

    /// As [`RealPrometheus::start`], with `extra` (indented YAML) added to
    /// the scrape job.
    fn start_with(target: u16, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: deploykit\n    scrape_interval: 1s\n    \
                 scrape_timeout: 900ms\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n{extra}"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = std::process::Command::new(prometheus_binary())
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn prometheus");
        Self { child, port, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of the first sample `query` returns, once it returns one,
    /// waiting at most 60 s.
    fn wait_for(&self, query: &str) -> f64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut last = String::new();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                let (_, body) = http_get(self.port, &format!("/api/v1/query?query={}", encode(query)));
                if let Ok(v) = serde_json::from_str::<Value>(body.trim()) {
                    if let Some(s) = v["data"]["result"][0]["value"][1].as_str() {
                        return s.parse().unwrap();
                    }
                }
                last = body;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no answer to {query} within 60 s; last: {last}\nprometheus log:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

#[test]
fn a_real_prometheus_scrapes_a_run_and_counts_the_deployments() {
    let prom = crate::util::prometheus(|_| 0.001);
    let env = Env::new(&format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18393\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18394\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [30, 100]\nstage_duration = \"300ms\"\ncheck_interval = \"100ms\"\n\
        promotion = \"manual\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    ));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    env.ok(&["deploy", "v2", "--strategy", "rolling"], 0);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut deploy = env.spawn_deploy_with(
        "v3",
        &["--metrics-listen", &listen],
        "the wait for promotion",
        |r| r["event"] == "awaiting_promotion",
    );
    let prometheus = RealPrometheus::start(port);
    assert_eq!(
        prometheus.wait_for("sum(deploykit_deployments_total{app=\"shop\",kind=\"deploy\"})"),
        2.0,
        "the two deployments before this one"
    );
    assert_eq!(
        prometheus.wait_for("deploykit_canary_weight{track=\"canary\"}"),
        30.0
    );
    assert_eq!(prometheus.wait_for("deploykit_deployment_in_progress"), 1.0);
    assert_eq!(
        prometheus.wait_for("deploykit_analysis_threshold{metric=\"error_rate\"}"),
        0.01
    );
    env.ok(&["promote"], 0);
    assert_eq!(deploy.wait().unwrap().code(), Some(0));
}

#[test]
fn postmortem_of_an_interrupted_deployment_names_the_rollback_that_recovered_it() {
    let env = Env::new(&crate::util::simulated(2, ""));
    env.ok(&["deploy", "v1"], 0);
    // The process dies (as kill -9) once 6 journal records are on disk.
    let out = env
        .cmd()
        .env("DEPLOYKIT_TEST_ABORT_AFTER_RECORD", "6")
        .args(["-q", "deploy", "v2"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the deployment was not interrupted");
    env.ok(&["rollback"], 0);
    let history = json_lines(&env.ok(&["history", "--json"], 0));
    let interrupted = history
        .iter()
        .find(|h| h["release"] == "v2")
        .and_then(|h| h["id"].as_str())
        .unwrap()
        .to_string();
    let rollback = history
        .iter()
        .find(|h| h["kind"] == "rollback")
        .and_then(|h| h["id"].as_str())
        .unwrap()
        .to_string();
    let md = env.ok(&["postmortem", &interrupted], 0);
    for part in [
        format!("# Post-mortem: deployment {interrupted} of shop (interrupted)"),
        format!(", by run {rollback})"),
        format!("| {rollback} | rollback of v1 started (rollback) |"),
        format!("| {rollback} | rollback ended: succeeded |"),
        "## Instances affected (1 of 2)".to_string(),
        "| web-1 | v1 | in progress |".to_string(),
    ] {
        assert!(md.contains(&part), "missing {part:?} in:\n{md}");
    }
    let doc: Value = serde_json::from_str(&env.ok(&["stats", "--json"], 0)).unwrap();
    assert_eq!(doc["dora"]["failed"], 1, "{doc}");
    assert_eq!(doc["dora"]["unrecovered"], 0, "the rollback recovered it: {doc}");
    assert_eq!(doc["dora"]["recovery_time"]["count"], 1, "{doc}");
}

#[test]
fn a_real_prometheus_scrapes_the_dashboard_with_the_token_file() {
    let env = Env::new(&crate::util::simulated(2, ""));
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    let dash = crate::dashboard::Dash::start(&env, &[]);
    let port: u16 = dash.addr.rsplit(':').next().unwrap().parse().unwrap();
    // As docs/dashboard.md says to scrape a dashboard off loopback; on
    // loopback a wrong token is refused too, so this proves the file works.
    let token_file = env.state().join("dashboard-token");
    let prometheus = RealPrometheus::start_with(
        port,
        &format!(
            "    authorization:\n      credentials_file: {}\n",
            token_file.display()
        ),
    );
    assert_eq!(prometheus.wait_for("up{job=\"deploykit\"} == 1"), 1.0);
    assert_eq!(
        prometheus.wait_for("sum(deploykit_deployments_total{app=\"shop\",kind=\"deploy\"})"),
        2.0
    );
}

/// The text of the `<tr id="ID">` row of an HTML page.
fn row(html: &str, id: &str) -> String {
    let at = html
        .find(&format!("<tr id=\"{id}\">"))
        .unwrap_or_else(|| panic!("no row {id} in {html}"));
    let rest = &html[at..];
    rest[..rest.find("</tr>").expect("the row ends")].to_owned()
}

#[test]
fn the_dashboard_history_shows_the_dora_figures_of_stats() {
    let (env, _) = two_deployments();
    let doc: Value = serde_json::from_str(&env.ok(&["stats", "--json"], 0)).unwrap();
    let dora = &doc["dora"];
    let d = crate::dashboard::Dash::start(&env, &[]);
    let page = crate::dashboard::get(&d, "/history");
    assert_eq!(page.status, 200, "{}", page.body);
    let html = page.body;
    assert!(html.contains("DORA, last 30 days"), "{html}");
    let frequency = row(&html, "dora-frequency");
    assert!(
        frequency.contains(&format!(
            "({} of {} deployment(s) went live)",
            dora["live"], dora["deployments"]
        )),
        "{frequency}; stats: {dora}"
    );
    let failure = row(&html, "dora-failure-rate");
    assert!(
        failure.contains("50.0 % (1 of 2 failed"),
        "{failure}; stats: {dora}"
    );
    assert_eq!(dora["change_failure_rate"], 0.5);
    let lead = row(&html, "dora-lead-time");
    let lead_min = dora["lead_time"]["median_ms"].as_u64().unwrap() / 60_000;
    assert!(
        lead.contains(&format!("<td>{lead_min}m ")) && lead.contains("(1 with a commit time;"),
        "{lead}; stats: {dora}"
    );
    let recovery = row(&html, "dora-recovery");
    assert!(
        recovery.contains("(1 recovered, 0 not yet;"),
        "{recovery}; stats: {dora}"
    );
    // Today's bar counts as the figures do: both deployments, one failed.
    assert!(html.contains(": 2 deployment(s), 1 failed</title>"), "{html}");
}
