//! Network chaos through the `deploykit` binary: real nginx in front of
//! three demo apps run by the CLI, a real Prometheus scraping the apps and
//! the CLI's `--metrics-listen` (where the fault proxies' counters are),
//! and load running through nginx while `deploykit drill` injects a fault
//! into the canary through a fault proxy the CLI sets up.
//!
//! The `deploykit` binary is the one `cargo test --workspace` builds next
//! to this test binary (`scripts/test` runs those tests first); a missing
//! one fails the test, naming the command that builds it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use deploykit::Metric;
use tokio::time::{sleep, timeout, Instant};

use crate::harness::{
    deploykit_binary, find_binary, free_ports, make_release, temp_dir, Haproxy, Http, Nginx,
};
use crate::load::LoadGen;
use crate::prometheus::{wait_for_value, PromServer};

/// Errors the canary served, its own and those a fault proxy injected in
/// front of it, over all it was asked: the rate a canary with network
/// chaos is judged on (docs/chaos.md).
const ERROR_RATE: &str = r#"((sum(rate(http_requests_total{track="{group}",code=~"5.."}[{window}])) or vector(0)) + (sum(rate(deploykit_fault_proxy_responses_total{group="{group}",origin="injected"}[{window}])) or vector(0))) / (sum(rate(http_requests_total{track="{group}"}[{window}])) + (sum(rate(deploykit_fault_proxy_responses_total{group="{group}",origin="injected"}[{window}])) or vector(0)))"#;

/// The load balancer in front of the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lb {
    Nginx,
    Haproxy,
}

/// The running balancer, stopped on drop.
enum Balancer {
    Nginx(Nginx),
    Haproxy(Haproxy),
}

impl Balancer {
    fn url(&self, path: &str) -> String {
        match self {
            Balancer::Nginx(n) => n.url(path),
            Balancer::Haproxy(h) => h.url(path),
        }
    }
}

/// A fleet of three demo apps (two stable, one canary) on v1 behind real
/// nginx or HAProxy, deployed by the CLI, with Prometheus scraping the apps and the
/// CLI's metrics port, and load running through nginx.
struct Fleet {
    dir: tempfile::TempDir,
    bin: PathBuf,
    metrics_port: u16,
    app_ports: Vec<u16>,
    prom: PromServer,
    load: Option<LoadGen>,
    lb: Lb,
    _balancer: Balancer,
}

impl Fleet {
    async fn start(lb: Lb, canary: &str) -> Fleet {
        let bin = deploykit_binary();
        let lb_bin = find_binary(match lb {
            Lb::Nginx => "nginx",
            Lb::Haproxy => "haproxy",
        })
        .expect("the balancer");
        let prom_bin = find_binary("prometheus").expect("prometheus");
        let dir = temp_dir("deploykit-chaos-cli");
        let d = dir.path();
        let builds = d.join("builds");
        make_release(&builds, "v1");
        make_release(&builds, "v2");
        let ports = free_ports(5);
        let (app_ports, lb_port, metrics_port) = (ports[..3].to_vec(), ports[3], ports[4]);

        let mut config = format!(
            "app = \"shop\"\nreleases = \"{builds}\"\n\n[instance_defaults]\nroot = \"{root}/{{id}}\"\n\
             health = \"http\"\nhealth_path = \"/health\"\nstop_grace = \"5s\"\n\n",
            builds = builds.display(),
            root = d.join("instances").display()
        );
        for (i, (port, track)) in app_ports.iter().zip(["stable", "stable", "canary"]).enumerate() {
            config.push_str(&format!(
                "[[instances]]\nid = \"i-{n}\"\naddress = \"127.0.0.1:{port}\"\ngroup = \"{track}\"\n\
                 command = [\"./deploykit-demo-app\", \"--listen\", \"127.0.0.1:{port}\", \"--version\", \"{{release}}\", \"--track\", \"{track}\"]\n\n",
                n = i + 1
            ));
        }
        config.push_str(&match lb {
            Lb::Nginx => format!(
                "[load_balancer]\nkind = \"nginx\"\ninclude_file = \"{inc}\"\nnginx_prefix = \"{d}/\"\n\
                 nginx_config = \"{conf}\"\npid_file = \"{pid}\"\nnginx_binary = \"{nb}\"\n\n",
                inc = Nginx::upstream_file(d).display(),
                d = d.display(),
                conf = Nginx::conf(d).display(),
                pid = Nginx::pid_file(d).display(),
                nb = lb_bin.display()
            ),
            Lb::Haproxy => format!(
                "[load_balancer]\nkind = \"haproxy\"\nsocket = \"{}\"\nbackend = \"app\"\n\n",
                Haproxy::socket(d).display()
            ),
        });
        // Prometheus scrapes the apps and the CLI's metrics port, each
        // down until the CLI starts it.
        let mut targets: Vec<String> = app_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        targets.push(format!("127.0.0.1:{metrics_port}"));
        let prom = PromServer::start(&prom_bin, d, &targets).await;
        config.push_str(&format!(
            "[metrics]\nprometheus = \"{prom_url}\"\nerror_rate = '{ERROR_RATE}'\ntimeout = \"5s\"\n\n\
             [strategy]\nkind = \"canary\"\n\n[strategy.recreate]\nhealth_interval = \"50ms\"\n\n\
             [strategy.canary]\ncheck_interval = \"1s\"\nhealth_interval = \"50ms\"\ndrain_timeout = \"5s\"\n\
             window = \"10s\"\ninconclusive_limit = 8\n{canary}\n\n[timeouts]\ndrain_poll = \"20ms\"\n",
            prom_url = prom.url("")
        ));
        std::fs::write(d.join("deploykit.toml"), &config).expect("write deploykit.toml");

        let backends: Vec<deploykit::Backend> = app_ports
            .iter()
            .zip(["stable", "stable", "canary"])
            .enumerate()
            .map(|(i, (port, track))| deploykit::Backend {
                id: deploykit::InstanceId::new(format!("i-{}", i + 1)).unwrap(),
                address: deploykit::Address::parse(&format!("127.0.0.1:{port}")).unwrap(),
                group: deploykit::Group::new(track).unwrap(),
            })
            .collect();
        let balancer = match lb {
            Lb::Nginx => {
                // nginx starts on deploykit's upstream file (every instance in).
                Nginx::write_config(d, lb_port);
                crate::nginx::driver(&lb_bin, d, &backends)
                    .install()
                    .await
                    .expect("install the upstream file");
                Balancer::Nginx(Nginx::start(&lb_bin, d, lb_port).await)
            }
            Lb::Haproxy => Balancer::Haproxy(Haproxy::start_for(&lb_bin, d, lb_port, &backends).await),
        };

        let (code, out, err) = run(&bin, d, &["deploy", "v1", "--strategy", "recreate"]).await;
        assert_eq!(code, 0, "deploy v1\n{out}\n{err}");

        let load = LoadGen::start_retrying(&balancer.url("/"), 100, Duration::from_secs(40));
        // Stable traffic in Prometheus before the drill's monitoring check.
        let source = prom.source();
        let end = Instant::now() + Duration::from_secs(20);
        while wait_for_value(&source, Metric::RequestCount, "stable", Duration::from_secs(10)).await <= 0.0 {
            assert!(
                Instant::now() < end,
                "no stable requests in Prometheus within 20 s"
            );
            sleep(Duration::from_millis(200)).await;
        }
        Fleet {
            dir,
            bin,
            metrics_port,
            app_ports,
            prom,
            load: Some(load),
            lb,
            _balancer: balancer,
        }
    }

    async fn drill(&self) -> (i32, String, String) {
        let listen = format!("127.0.0.1:{}", self.metrics_port);
        run(
            &self.bin,
            self.dir.path(),
            &["drill", "v2", "--metrics-listen", &listen],
        )
        .await
    }

    /// The value of an instant PromQL query (0 when it answers nothing).
    async fn query(&self, promql: &str) -> f64 {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let a = Http::new()
            .get(&self.prom.url(&format!("/api/v1/query?query={encoded}")))
            .await
            .expect("query Prometheus");
        let v: serde_json::Value = serde_json::from_str(&a.body).expect("Prometheus answers JSON");
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0)
    }

    /// Where the balancer sends the canary's traffic now.
    async fn canary_address(&self) -> String {
        match self.lb {
            Lb::Nginx => {
                let text = std::fs::read_to_string(Nginx::upstream_file(self.dir.path()))
                    .expect("read the upstream file");
                let line = text
                    .lines()
                    .find(|l| l.ends_with("# i-3"))
                    .expect("i-3's server line");
                let line = line.trim().trim_start_matches("server ");
                line.split([' ', ';']).next().unwrap_or_default().to_owned()
            }
            Lb::Haproxy => {
                let api = deploykit::lb::haproxy::RuntimeApi::new(
                    Haproxy::socket(self.dir.path()),
                    Duration::from_secs(5),
                );
                let servers = api.servers_state("app").await.expect("show servers state");
                // A detour is a server of its own, in rotation in i-3's place.
                let detour = servers.iter().find(|s| {
                    s.name == "i-3.dk-detour" && s.admin() != deploykit::lb::haproxy::ServerAdmin::Maint
                });
                let s = match detour {
                    Some(d) => d,
                    None => servers.iter().find(|s| s.name == "i-3").expect("server i-3"),
                };
                format!("{}:{}", s.address.as_deref().unwrap_or("?"), s.port.unwrap_or(0))
            }
        }
    }

    /// Stops the load; what each failed request got (an injected error
    /// counts).
    async fn stop_load(&mut self) -> Vec<String> {
        match self.load.take() {
            Some(l) => l
                .stop()
                .await
                .into_iter()
                .filter_map(|s| s.outcome.err())
                .collect(),
            None => Vec::new(),
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // The CLI's instances are process groups whose pid files are in
        // their roots; the demo apps must not outlive the test.
        let Ok(entries) = std::fs::read_dir(self.dir.path().join("instances")) else {
            return;
        };
        for e in entries.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path().join("app.pid")) {
                if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// `deploykit args…` in `dir`, bounded; (exit code, stdout, stderr).
async fn run(bin: &Path, dir: &Path, args: &[&str]) -> (i32, String, String) {
    let out = timeout(
        Duration::from_secs(90),
        tokio::process::Command::new(bin)
            .args(args)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .env_remove("DEPLOYKIT_CONFIG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("deploykit {args:?} did not finish within 90 s"))
    .expect("run deploykit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Half of the canary's requests answered 503 by a fault proxy the CLI put
/// in front of it: Prometheus sees the injected errors through the proxy's
/// counters, the analysis fails, the deployment rolls back within its
/// budget, and the drill passes (exit 0). nginx sends the canary's traffic
/// to the canary itself again afterwards.
#[tokio::test]
async fn an_http_error_fault_on_the_canary_through_the_cli_rolls_back_and_the_drill_passes() {
    http_error_drill(Lb::Nginx).await;
}

/// The same drill behind HAProxy, whose server is detoured with `set
/// server … addr` and sent home the same way.
#[tokio::test]
async fn an_http_error_fault_through_the_cli_behind_haproxy_rolls_back_and_the_drill_passes() {
    http_error_drill(Lb::Haproxy).await;
}

async fn http_error_drill(lb: Lb) {
    let mut fleet = Fleet::start(
        lb,
        "stages = [50, 100]\nstage_duration = \"10s\"\n\n[[strategy.canary.chaos]]\nstage = 1\n\
         kind = \"http-error\"\npercent = 50\nexpect = \"rollback\"\nwithin = \"20s\"\n",
    )
    .await;
    let started = Instant::now();
    let (code, out, err) = fleet.drill().await;
    let took = started.elapsed();
    let failed = fleet.stop_load().await;
    assert_eq!(code, 0, "the drill passes\nstdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("ROLLED BACK"), "{out}");
    assert!(
        out.contains(
            "chaos[0] 503 for 50% of requests on canary in stage 1, expect rollback: PASSED — rolled back"
        ),
        "{out}"
    );
    assert!(
        out.contains("  first failing check at ") && out.contains("canary error rate"),
        "{out}"
    );
    // The errors reached Prometheus through the proxy's own counters, and
    // only the canary was detoured.
    // Clients saw the injected 503s and nothing else: the detour there and
    // back lost no request.
    let other: Vec<&String> = failed.iter().filter(|f| *f != "status 503").collect();
    assert!(
        other.is_empty(),
        "requests failed other than by the fault: {other:?}"
    );
    let injected = fleet
        .query(r#"sum(deploykit_fault_proxy_responses_total{instance_id="i-3",group="canary",origin="injected",code="503"})"#)
        .await;
    assert!(injected > 0.0, "no injected 503 counted in Prometheus\n{out}");
    assert_eq!(
        fleet
            .query(r#"count(deploykit_fault_proxy_requests_total{instance_id!="i-3"})"#)
            .await,
        0.0,
        "a stable instance was detoured"
    );
    // The canary is served at its own address again, not at the proxy's.
    assert_eq!(
        fleet.canary_address().await,
        format!("127.0.0.1:{}", fleet.app_ports[2])
    );
    eprintln!(
        "http-error drill through the CLI behind {lb:?}: {:.1}s, {injected} injected 503s counted, {} failed client requests (all 503)",
        took.as_secs_f64(),
        failed.len()
    );
}

/// A small latency added to every canary request (20 ms, under the p99
/// threshold) with `expect = "continue"`: the canary is promoted, the drill
/// passes, and the traffic did go through the proxy.
#[tokio::test]
async fn a_small_latency_fault_through_the_cli_lets_the_canary_carry_on_and_the_drill_passes() {
    let mut fleet = Fleet::start(
        Lb::Nginx,
        "stages = [50, 100]\nstage_duration = \"4s\"\n\n[[strategy.canary.chaos]]\nstage = 1\n\
         kind = \"latency\"\ndelay = \"20ms\"\nexpect = \"continue\"\n",
    )
    .await;
    let (code, out, err) = fleet.drill().await;
    let failed = fleet.stop_load().await;
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    assert_eq!(code, 0, "the drill passes\nstdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("SUCCEEDED"), "{out}");
    assert!(
        out.contains("expect continue: PASSED — the deployment carried on"),
        "{out}"
    );
    let forwarded = fleet
        .query(r#"sum(deploykit_fault_proxy_responses_total{instance_id="i-3",origin="upstream"})"#)
        .await;
    assert!(forwarded > 0.0, "nothing went through the canary's proxy\n{out}");
    assert_eq!(
        fleet.canary_address().await,
        format!("127.0.0.1:{}", fleet.app_ports[2])
    );
}
