//! A full `deploykit deploy` of `kind = "experiment"` through the CLI
//! binary: two local demo-app instances the CLI starts from release
//! directories (v1 converting 5 % of checkouts, v2 30 %), a real nginx
//! splitting users sticky through its location include, a real Prometheus
//! scraping the apps' counters, and 30 users checking out through nginx.
//! The CLI finds v2 the winner, promotes it, prints the statistics and
//! exits 0.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deploykit::Metric;
use serde_json::Value;
use tokio::time::{sleep, Instant};

use crate::experiment::user;
use crate::harness::{
    deploykit_binary, free_ports, make_release, temp_dir, Haproxy, Http, KillOnDrop, Nginx,
};
use crate::prometheus::{wait_for_value, PromServer};
use crate::routing::write_routing_config;

/// Release `id` in `builds`: the demo app and a `run` script starting it
/// converting `rate` of its checkouts — the business metric is the
/// release's, so the promoted stable converts as the treatment did.
fn release(builds: &Path, id: &str, rate: &str) {
    make_release(builds, id);
    let run = builds.join(id).join("run");
    std::fs::write(
        &run,
        format!("#!/bin/sh\nexec \"$(dirname \"$0\")/deploykit-demo-app\" --conversion-rate {rate} \"$@\"\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
}

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

/// The records of the newest journal under `state`.
fn newest_journal(state: &Path) -> Vec<Value> {
    let dir = state.join("shop").join("journal");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("the journal directory")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let text = std::fs::read_to_string(files.last().expect("a journal")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

#[tokio::test]
async fn a_cli_experiment_on_real_nginx_and_prometheus_promotes_the_better_release() {
    let nginx_bin = crate::require_binary!("nginx");
    let prom_bin = crate::require_binary!("prometheus");
    let bin = deploykit_binary();
    let dir = temp_dir("dk-cli-experiment-");
    let d = dir.path();
    let builds = d.join("builds");
    release(&builds, "v1", "0.05");
    release(&builds, "v2", "0.30");
    let ports = free_ports(3);
    let (stable, canary, port) = (ports[0], ports[1], ports[2]);
    write_routing_config(d, port);
    let _kill = KillOnDrop(vec![d.join("instances/stable-1"), d.join("instances/canary-1")]);
    let instance = |id: &str, port: u16, group: &str| {
        format!(
            "[[instances]]\nid = \"{id}\"\naddress = \"127.0.0.1:{port}\"\ngroup = \"{group}\"\n\
             command = [\"./run\", \"--listen\", \"{{address}}\", \"--version\", \"{{release}}\", \"--track\", \"{group}\"]\n\n"
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
         [strategy]\nkind = \"experiment\"\n\n\
         [strategy.canary]\ncheck_interval = \"1s\"\nwindow = \"5s\"\ninconclusive_limit = 10\n\
         health_retries = 200\nhealth_interval = \"50ms\"\ndrain_timeout = \"2s\"\n\n\
         [strategy.experiment]\ntreatment_percent = 50\nduration = \"25s\"\nalpha = 0.05\n\
         min_detectable_effect = 0.05\nmin_samples = 200\n\n\
         [strategy.rolling]\nhealth_retries = 200\nhealth_interval = \"50ms\"\nstabilisation = \"100ms\"\ndrain_timeout = \"2s\"\n\n\
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

    // `setup` writes both owned includes (nginx is not running yet: exit 3),
    // then nginx starts on them.
    let (code, out, err) = cli(&bin, d, &["setup"]).await;
    assert!(
        d.join("upstream.conf").is_file() && d.join("location.conf").is_file(),
        "setup exited {code}:\n{out}{err}"
    );
    let nginx = Nginx::start(&nginx_bin, d, port).await;
    let (code, out, err) = cli(&bin, d, &["-q", "deploy", "v1", "--strategy", "recreate"]).await;
    assert_eq!(code, 0, "v1 everywhere:\n{out}{err}");

    let stop = Arc::new(AtomicBool::new(false));
    let http = Http::new();
    let url = nginx.url("/api/checkout");
    let users: Vec<_> = (0..30)
        .map(|n| tokio::spawn(user(http.clone(), url.clone(), n, stop.clone(), Instant::now())))
        .collect();
    // The monitoring check before the experiment needs stable's metrics.
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

    let started = Instant::now();
    let (code, out, err) = cli(&bin, d, &["deploy", "v2"]).await;
    let took = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let mut failed = 0;
    for u in users {
        failed += u.await.expect("a user").len();
    }
    eprintln!("deploy v2 took {took:?}; {failed} checkouts failed\n{out}");
    assert_eq!(code, 0, "the experiment promotes v2:\n{out}{err}");
    // The report shows the statistics the decision was made on.
    assert!(out.contains("SUCCEEDED"), "{out}");
    assert!(
        out.contains("experiment (the treatment wins): control ") && out.contains("p = "),
        "{out}"
    );

    // The journal holds every reading; the last decided it on the apps'
    // own counters: about 5 % and 30 %.
    let journal = newest_journal(&d.join(".deploykit"));
    let readings: Vec<&Value> = journal
        .iter()
        .filter(|r| r["event"] == "experiment_reading")
        .collect();
    let last = &readings.last().expect("experiment readings in the journal")["reading"];
    assert_eq!(last["verdict"]["verdict"], "treatment_wins", "{last}");
    let rate = |v: &Value| v["conversions"].as_f64().unwrap() / v["visits"].as_f64().unwrap();
    assert!(
        last["control"]["visits"].as_f64().unwrap() >= 200.0
            && last["treatment"]["visits"].as_f64().unwrap() >= 200.0,
        "{last}"
    );
    assert!((0.02..0.10).contains(&rate(&last["control"])), "{last}");
    assert!((0.20..0.40).contains(&rate(&last["treatment"])), "{last}");

    // Promoted: every answer through nginx comes from v2 now.
    let mut served = Vec::new();
    for _ in 0..10 {
        let a = http.get(&nginx.url("/")).await.expect("GET through nginx");
        served.push(a.body.trim().to_string());
    }
    assert!(served.iter().all(|b| b == "v2"), "{served:?}");
}

/// The `[[instances]]` entry of a local demo app run from its release.
fn instance_toml(id: &str, port: u16, group: &str) -> String {
    format!(
        "[[instances]]\nid = \"{id}\"\naddress = \"127.0.0.1:{port}\"\ngroup = \"{group}\"\n\
         command = [\"./run\", \"--listen\", \"{{address}}\", \"--version\", \"{{release}}\", \"--track\", \"{group}\"]\n\n"
    )
}

/// deploykit.toml of app `shop` with `instances`, `load_balancer` (its
/// fields after `[load_balancer]`), Prometheus at `prometheus` and
/// `experiment` (the fields and tables after `[strategy.experiment]`).
fn experiment_config(instances: &str, load_balancer: &str, prometheus: &str, experiment: &str) -> String {
    format!(
        "app = \"shop\"\nreleases = \"builds\"\n\n\
         [instance_defaults]\nroot = \"instances/{{id}}\"\nstop_grace = \"5s\"\n\n\
         {instances}\
         [load_balancer]\n{load_balancer}\n\
         [metrics]\nprometheus = \"{prometheus}\"\n\n\
         [strategy]\nkind = \"experiment\"\n\n\
         [strategy.canary]\ncheck_interval = \"1s\"\nwindow = \"5s\"\ninconclusive_limit = 10\n\
         health_retries = 200\nhealth_interval = \"50ms\"\ndrain_timeout = \"2s\"\n\n\
         [strategy.rolling]\nhealth_retries = 200\nhealth_interval = \"50ms\"\nstabilisation = \"100ms\"\ndrain_timeout = \"2s\"\n\n\
         [strategy.recreate]\nhealth_retries = 200\nhealth_interval = \"50ms\"\ndrain_timeout = \"2s\"\n\n\
         [timeouts]\ndrain_poll = \"20ms\"\n\n\
         [strategy.experiment]\nduration = \"25s\"\nalpha = 0.05\nmin_detectable_effect = 0.05\nmin_samples = 200\n{experiment}"
    )
}

/// Waits until Prometheus has stable's error rate, latency and a request
/// counted: the monitoring check before an experiment needs them.
async fn wait_for_stable_metrics(prom: &PromServer) {
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
}

/// Stops the users and gathers their failed checkouts.
async fn stop_users(
    stop: &AtomicBool,
    users: Vec<tokio::task::JoinHandle<Vec<crate::experiment::Failure>>>,
) -> Vec<crate::experiment::Failure> {
    stop.store(true, Ordering::SeqCst);
    let mut failed = Vec::new();
    for u in users {
        failed.extend(u.await.expect("a user"));
    }
    failed
}

/// Three variants through the CLI: the control (stable, v1) and treatment
/// canary-b (v2, the release deployed) converting 5 %, canary-c on v3
/// (`release = "v3"`) converting 30 %. `deploykit deploy v2` prints every
/// reading with all three variants, finds canary-c the winner, moves
/// stable to v3, names v3 in `history`, exits 0, and fails not one
/// checkout of users that never retry.
#[tokio::test]
async fn a_cli_experiment_with_two_treatments_on_real_nginx_promotes_the_winner_to_its_release() {
    let nginx_bin = crate::require_binary!("nginx");
    let prom_bin = crate::require_binary!("prometheus");
    let bin = deploykit_binary();
    let dir = temp_dir("dk-cli-variants-");
    let d = dir.path();
    let builds = d.join("builds");
    release(&builds, "v1", "0.05");
    release(&builds, "v2", "0.05");
    release(&builds, "v3", "0.30");
    let ports = free_ports(4);
    let port = ports[3];
    write_routing_config(d, port);
    let arms = [
        ("stable-1", "stable"),
        ("canary-b-1", "canary-b"),
        ("canary-c-1", "canary-c"),
    ];
    let _kill = KillOnDrop(arms.iter().map(|(id, _)| d.join("instances").join(id)).collect());
    let instances: String = arms
        .iter()
        .zip(&ports)
        .map(|((id, group), p)| instance_toml(id, *p, group))
        .collect();
    let targets: Vec<String> = ports[..3].iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let prom = PromServer::start(&prom_bin, d, &targets).await;
    let ds = d.display();
    let lb = format!(
        "kind = \"nginx\"\ninclude_file = \"{ds}/upstream.conf\"\nlocation_include = \"{ds}/location.conf\"\n\
         upstream = \"app\"\nnginx_binary = \"{}\"\nnginx_config = \"{ds}/nginx.conf\"\nnginx_prefix = \"{ds}\"\npid_file = \"{ds}/nginx.pid\"\n",
        nginx_bin.display()
    );
    let treatments = "\n[[strategy.experiment.treatments]]\ngroup = \"canary-b\"\npercent = 33\n\n\
                      [[strategy.experiment.treatments]]\ngroup = \"canary-c\"\nrelease = \"v3\"\npercent = 33\n";
    std::fs::write(
        d.join("deploykit.toml"),
        experiment_config(&instances, &lb, &prom.url(""), treatments),
    )
    .unwrap();

    let (code, out, err) = cli(&bin, d, &["setup"]).await;
    assert!(
        d.join("upstream.conf").is_file() && d.join("location.conf").is_file(),
        "setup exited {code}:\n{out}{err}"
    );
    let nginx = Nginx::start(&nginx_bin, d, port).await;
    let (code, out, err) = cli(&bin, d, &["-q", "deploy", "v1", "--strategy", "recreate"]).await;
    assert_eq!(code, 0, "v1 everywhere:\n{out}{err}");

    let stop = Arc::new(AtomicBool::new(false));
    // A new connection per checkout and never a retry: every nginx reload
    // closes idle keep-alive connections, which a client that never
    // retries would count whatever deploykit does.
    let http = Http::without_retries(false);
    let url = nginx.url("/api/checkout");
    let users: Vec<_> = (0..30)
        .map(|n| tokio::spawn(user(http.clone(), url.clone(), n, stop.clone(), Instant::now())))
        .collect();
    wait_for_stable_metrics(&prom).await;

    let started = Instant::now();
    let (code, out, err) = cli(&bin, d, &["deploy", "v2"]).await;
    let took = started.elapsed();
    let failed = stop_users(&stop, users).await;
    eprintln!(
        "deploy v2 took {took:?}; {} checkouts failed\n{out}",
        failed.len()
    );
    assert_eq!(code, 0, "the experiment promotes canary-c:\n{out}{err}");
    assert!(out.contains("SUCCEEDED"), "{out}");
    // Every reading names all three variants with their statistics.
    let readings: Vec<&str> = out.lines().filter(|l| l.contains("]   experiment at ")).collect();
    assert!(!readings.is_empty(), "no reading printed:\n{out}");
    for r in &readings {
        assert!(
            r.contains("control stable ")
                && r.contains("; canary-b (v2) ")
                && r.contains("; canary-c (v3) ")
                && r.contains("Holm-adjusted p = "),
            "a reading without every variant: {r}"
        );
    }
    assert!(
        out.contains("experiment decided: canary-c wins") && out.contains("then stable to v3"),
        "{out}"
    );
    // Each instance is named with the release it serves, not the one deployed.
    assert!(
        out.contains("✓ canary-b-1 serving v2")
            && out.contains("✓ canary-c-1 serving v3")
            && out.contains("✓ stable-1 serving v3"),
        "{out}"
    );
    assert!(
        failed.is_empty(),
        "{} checkouts failed: {failed:?}\n{out}{err}",
        failed.len()
    );

    // The journal records the decision once, naming the winner's release.
    let journal = newest_journal(&d.join(".deploykit"));
    let decided: Vec<&Value> = journal
        .iter()
        .filter(|r| r["event"] == "experiment_decided")
        .collect();
    assert_eq!(decided.len(), 1, "{journal:?}");
    assert_eq!(decided[0]["winner"], "canary-c", "{}", decided[0]);
    assert_eq!(decided[0]["release"], "v3", "{}", decided[0]);

    // Stable runs v3 now; the treatment groups are stopped.
    let (code, out, err) = cli(&bin, d, &["status", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let status: Value = serde_json::from_str(&out).expect("status --json");
    let stable = status["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == "stable-1")
        .expect("stable-1 in status");
    assert_eq!(stable["release"], "v3", "{out}");
    assert_eq!(status["deployment"]["history"]["release"], "v3", "{out}");
    let (code, out, err) = cli(&bin, d, &["history"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let newest = out.lines().find(|l| l.contains("experiment")).unwrap_or_default();
    assert!(newest.contains("v3"), "history does not name v3:\n{out}");
    let mut served = Vec::new();
    for _ in 0..10 {
        let a = Http::new().get(&nginx.url("/")).await.expect("GET through nginx");
        served.push(a.body.trim().to_string());
    }
    assert!(served.iter().all(|b| b == "v3"), "{served:?}");
}

/// A shop of two local demo apps (stable-1 on v1 converting 5 %, canary-1
/// whose v2 converts 30 %) behind a real HAProxy with a group backend each,
/// the sticky split's map lines in haproxy.cfg when `map_lines`, a real
/// Prometheus, and deploykit.toml with `map_dir` for an A/B experiment.
struct HaproxyShop {
    dir: tempfile::TempDir,
    haproxy: Haproxy,
    prom: PromServer,
    /// The driver, to read HAProxy's state as deploykit left it.
    lb: deploykit::lb::HaproxyLoadBalancer,
}

impl HaproxyShop {
    async fn start(bin: &Path, prom_bin: &Path, map_lines: bool) -> HaproxyShop {
        let dir = temp_dir("dk-cli-haproxy-experiment-");
        let d = dir.path();
        let builds = d.join("builds");
        release(&builds, "v1", "0.05");
        release(&builds, "v2", "0.30");
        let ports = free_ports(3);
        let (stable, canary, port) = (ports[0], ports[1], ports[2]);
        let maps = d.join("maps");
        std::fs::create_dir_all(&maps).unwrap();
        let sticky = deploykit::routing::Sticky::Cookie {
            name: "dk_variant".into(),
        };
        // The lines `deploykit::lb::haproxy::sticky_config` gives, as
        // docs/load-balancers.md has the user paste them.
        let lines = if map_lines {
            crate::routing::frontend_lines(&maps, [], std::slice::from_ref(&sticky))
        } else {
            String::new()
        };
        let cfg = format!(
            r#"global
    stats socket {sock} mode 600 level admin
    stats timeout 30s
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout queue 10s
frontend fe
    bind 127.0.0.1:{port}
{lines}    default_backend app
backend app
    balance roundrobin
    retries 0
    server stable-1 127.0.0.1:{stable} weight 1 check inter 100ms
    server canary-1 127.0.0.1:{canary} weight 1 check inter 100ms
backend app__stable
    server stable-1 127.0.0.1:{stable} track app/stable-1
backend app__canary
    server canary-1 127.0.0.1:{canary} track app/canary-1
"#,
            sock = Haproxy::socket(d).display(),
        );
        let haproxy = Haproxy::start(bin, d, port, &cfg).await;
        let targets = [format!("127.0.0.1:{stable}"), format!("127.0.0.1:{canary}")];
        let prom = PromServer::start(prom_bin, d, &targets).await;
        let instances =
            instance_toml("stable-1", stable, "stable") + &instance_toml("canary-1", canary, "canary");
        let lb = format!(
            "kind = \"haproxy\"\nsocket = \"{}\"\nbackend = \"app\"\nmap_dir = \"{}\"\n",
            Haproxy::socket(d).display(),
            maps.display()
        );
        std::fs::write(
            d.join("deploykit.toml"),
            experiment_config(&instances, &lb, &prom.url(""), "treatment_percent = 50\n"),
        )
        .unwrap();
        let backends = [
            crate::harness::backend("stable-1", ([127, 0, 0, 1], stable).into(), "stable"),
            crate::harness::backend("canary-1", ([127, 0, 0, 1], canary).into(), "canary"),
        ];
        let lb = deploykit::lb::HaproxyLoadBalancer::builder()
            .socket(Haproxy::socket(d))
            .backend_name("app")
            .backends(backends)
            .build()
            .unwrap();
        HaproxyShop {
            dir,
            haproxy,
            prom,
            lb,
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Guards that kill the demo apps the CLI started, whatever happens.
    fn kill_on_drop(&self) -> KillOnDrop<PathBuf> {
        KillOnDrop(vec![
            self.path().join("instances/stable-1"),
            self.path().join("instances/canary-1"),
        ])
    }

    /// Each server of backend `app`: name, weight and admin state bits.
    async fn servers(&self) -> Vec<(String, u32, u32)> {
        self.lb
            .api()
            .servers_state("app")
            .await
            .expect("show servers state")
            .iter()
            .map(|s| (s.name.clone(), s.weight, s.admin_bits))
            .collect()
    }
}

/// An A/B experiment through HAProxy's sticky split, run by the binary:
/// `validate` and `plan` accept the configuration with `map_dir`,
/// `deploy v2` decides on real Prometheus tallies and promotes v2, and 30
/// keep-alive users that never retry fail not one checkout (HAProxy
/// changes its maps and weights without a reload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_experiment_through_real_haproxys_sticky_split_promotes_the_winner_failing_no_checkout() {
    let haproxy_bin = crate::require_binary!("haproxy");
    let prom_bin = crate::require_binary!("prometheus");
    let bin = deploykit_binary();
    let shop = HaproxyShop::start(&haproxy_bin, &prom_bin, true).await;
    let _kill = shop.kill_on_drop();
    let d = shop.path();
    for args in [&["validate"][..], &["plan", "v2"]] {
        let (code, out, err) = cli(&bin, d, args).await;
        assert_eq!(code, 0, "{args:?} refused the configuration:\n{out}{err}");
    }
    let (code, out, err) = cli(&bin, d, &["-q", "deploy", "v1", "--strategy", "recreate"]).await;
    assert_eq!(code, 0, "v1 everywhere:\n{out}{err}");

    let stop = Arc::new(AtomicBool::new(false));
    let http = Http::without_retries(true);
    let url = shop.haproxy.url("/api/checkout");
    let users: Vec<_> = (0..30)
        .map(|n| tokio::spawn(user(http.clone(), url.clone(), n, stop.clone(), Instant::now())))
        .collect();
    wait_for_stable_metrics(&shop.prom).await;

    let started = Instant::now();
    let (code, out, err) = cli(&bin, d, &["deploy", "v2"]).await;
    let took = started.elapsed();
    let failed = stop_users(&stop, users).await;
    eprintln!(
        "deploy v2 took {took:?}; {} checkouts failed\n{out}",
        failed.len()
    );
    assert_eq!(code, 0, "the experiment promotes v2:\n{out}{err}");
    assert!(
        out.contains("SUCCEEDED") && out.contains("experiment (the treatment wins): control "),
        "{out}"
    );
    assert!(
        failed.is_empty(),
        "{} checkouts failed: {failed:?}\n{out}{err}\nHAProxy:\n{}",
        failed.len(),
        shop.haproxy.stderr()
    );
    // The deciding reading holds HAProxy's split of the apps' own
    // counters: about 5 % and 30 %.
    let journal = newest_journal(&d.join(".deploykit"));
    let last = &journal
        .iter()
        .rfind(|r| r["event"] == "experiment_reading")
        .expect("experiment readings in the journal")["reading"];
    assert_eq!(last["verdict"]["verdict"], "treatment_wins", "{last}");
    let rate = |v: &Value| v["conversions"].as_f64().unwrap() / v["visits"].as_f64().unwrap();
    assert!((0.02..0.10).contains(&rate(&last["control"])), "{last}");
    assert!((0.20..0.40).contains(&rate(&last["treatment"])), "{last}");
    let mut served = Vec::new();
    for _ in 0..10 {
        let a = Http::new()
            .get(&shop.haproxy.url("/"))
            .await
            .expect("GET through HAProxy");
        served.push(a.body.trim().to_string());
    }
    assert!(served.iter().all(|b| b == "v2"), "{served:?}");
}

/// The same configuration with haproxy.cfg lacking the sticky split's map
/// lines: `deploy v2` is refused before anything is touched (exit 3), the
/// message names the lines to add, HAProxy's servers keep their weights
/// and states, and both instances still run v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_experiment_whose_sticky_map_haproxy_has_not_loaded_is_refused_before_anything_is_touched() {
    let haproxy_bin = crate::require_binary!("haproxy");
    let prom_bin = crate::require_binary!("prometheus");
    let bin = deploykit_binary();
    let shop = HaproxyShop::start(&haproxy_bin, &prom_bin, false).await;
    let _kill = shop.kill_on_drop();
    let d = shop.path();
    let (code, out, err) = cli(&bin, d, &["-q", "deploy", "v1", "--strategy", "recreate"]).await;
    assert_eq!(code, 0, "v1 everywhere:\n{out}{err}");
    // Traffic until stable's metrics are in: the monitoring check would
    // refuse first otherwise.
    let stop = Arc::new(AtomicBool::new(false));
    let url = shop.haproxy.url("/api/checkout");
    let users: Vec<_> = (0..5)
        .map(|n| tokio::spawn(user(Http::new(), url.clone(), n, stop.clone(), Instant::now())))
        .collect();
    wait_for_stable_metrics(&shop.prom).await;
    let before = shop.servers().await;
    let runs_before = std::fs::read_dir(d.join(".deploykit/shop/journal"))
        .unwrap()
        .count();

    let (code, out, err) = cli(&bin, d, &["deploy", "v2"]).await;
    stop_users(&stop, users).await;
    // Exit 3 as for every failed load-balancer preflight (docs/cli.md):
    // HAProxy's running configuration, not deploykit.toml, lacks the lines.
    assert_eq!(code, 3, "a refusal:\n{out}{err}");
    assert!(
        err.contains("nothing was touched")
            && err.contains("app.sticky.cookie.dk_variant.map")
            && err.contains("use_backend %[var(txn.dk_app.sticky.cookie.dk_variant.group)]"),
        "the message names the lines to add:\n{err}"
    );
    assert_eq!(
        before,
        shop.servers().await,
        "a refused deployment changed HAProxy"
    );
    let runs_after = std::fs::read_dir(d.join(".deploykit/shop/journal"))
        .unwrap()
        .count();
    assert_eq!(runs_before, runs_after, "a refused deployment was journaled");
    let (code, out, err) = cli(&bin, d, &["status", "--json"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let status: Value = serde_json::from_str(&out).expect("status --json");
    for i in status["instances"].as_array().unwrap() {
        assert_eq!(i["release"], "v1", "{out}");
    }
}
