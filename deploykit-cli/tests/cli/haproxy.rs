//! The CLI through a real HAProxy (runtime API over its admin socket):
//! deploys, and recovery after the CLI is killed at several steps, with
//! every server's admin state read back from HAProxy.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deploykit::lb::haproxy::{RuntimeApi, ServerAdmin};

use crate::util::{local, Env};

fn haproxy_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin".into(), "/sbin".into()]);
    if let Some(p) = dirs.into_iter().map(|d| d.join("haproxy")).find(|p| p.is_file()) {
        return Some(p);
    }
    panic!("haproxy is not installed: CLI tests never skip (scripts/test installs it)")
}

/// HAProxy in `dir`, killed on drop.
struct Haproxy(Child);

impl Haproxy {
    fn start(binary: &Path, dir: &Path, port: u16, servers: &[(&str, u16)]) -> Self {
        let sock = dir.join("haproxy.sock");
        let mut cfg = format!(
            "global\n    stats socket {} mode 600 level admin\n    stats timeout 30s\n\
             defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n\
             frontend fe\n    bind 127.0.0.1:{port}\n    default_backend app\n\
             backend app\n    balance roundrobin\n",
            sock.display()
        );
        for (name, p) in servers {
            cfg.push_str(&format!("    server {name} 127.0.0.1:{p} weight 100\n"));
        }
        std::fs::write(dir.join("haproxy.cfg"), cfg).unwrap();
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(dir.join("haproxy.cfg"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn haproxy");
        let end = Instant::now() + Duration::from_secs(20);
        while !sock.exists() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < end, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Haproxy(child)
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admin_states(socket: &Path) -> Vec<(String, ServerAdmin)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let api = RuntimeApi::new(socket, Duration::from_secs(5));
    let mut v: Vec<(String, ServerAdmin)> = rt
        .block_on(api.servers_state("app"))
        .expect("servers state")
        .into_iter()
        .map(|s| (s.name.clone(), s.admin()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn free_port() -> u16 {
    crate::util::free_port()
}

/// `local(2, extra)` on ports `base`+1 and `base`+2, behind the HAProxy
/// runtime socket `sock` (backend `app`).
fn haproxy_config(sock: &Path, base: u16, extra: &str) -> String {
    local(2, extra)
        .replace("18181", &(base + 1).to_string())
        .replace("18182", &(base + 2).to_string())
        .replace(
            "[load_balancer]\nkind = \"simulated\"\n",
            &format!(
                "[load_balancer]\nkind = \"haproxy\"\nsocket = \"{}\"\nbackend = \"app\"\n",
                sock.display()
            ),
        )
}

#[test]
fn deploy_and_crash_recovery_through_real_haproxy() {
    let Some(bin) = haproxy_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("haproxy.sock");
    let port = free_port();
    let extra = "[strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"50ms\"\ndrain_timeout = \"1s\"\n\n";
    let cfg = haproxy_config(&sock, 18580, extra);
    let env = Env::new(&cfg);
    env.releases(&["v1", "v2"]);
    let _haproxy = Haproxy::start(&bin, dir.path(), port, &[("web-1", 18581), ("web-2", 18582)]);
    let all_ready = vec![
        ("web-1".to_string(), ServerAdmin::Ready),
        ("web-2".to_string(), ServerAdmin::Ready),
    ];
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    assert_eq!(admin_states(&sock), all_ready);
    let journal = env.newest_journal();
    let at = |step: &str, id: &str| {
        journal
            .iter()
            .position(|r| r["event"] == "step_finished" && r["step"] == step && r["instance"] == id)
            .unwrap_or_else(|| panic!("no {step} of {id}"))
            + 1
    };
    // Killed with web-1 drained, stopped, installed, and web-2 drained; each
    // time rolled back and resumed in turn.
    let points = [
        at("drain", "web-1"),
        at("stop", "web-1"),
        at("install", "web-1"),
        at("drain", "web-2"),
    ];
    let mut current = "v2";
    for (k, n) in points.into_iter().enumerate() {
        let target = if current == "v1" { "v2" } else { "v1" };
        let out = env
            .cmd()
            .env("DEPLOYKIT_TEST_ABORT_AFTER_RECORD", n.to_string())
            .args(["-q", "deploy", target])
            .output()
            .unwrap();
        assert!(!out.status.success(), "record {n}: not interrupted");
        assert_ne!(
            admin_states(&sock),
            all_ready,
            "record {n}: a server is out of rotation after the crash"
        );
        let expect = if k % 2 == 0 {
            env.ok(&["-q", "rollback"], 0);
            current
        } else {
            env.ok(&["-q", "deploy", "--resume"], 0);
            target
        };
        assert_eq!(
            admin_states(&sock),
            all_ready,
            "record {n}: every server back in rotation"
        );
        for id in ["web-1", "web-2"] {
            assert_eq!(env.local_release(id).as_deref(), Some(expect), "record {n}: {id}");
            assert!(env.local_running(id), "record {n}: {id}");
        }
        current = expect;
    }
}

#[test]
fn an_instance_haproxy_does_not_know_is_refused_before_anything_is_touched() {
    let Some(bin) = haproxy_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("haproxy.sock");
    let port = free_port();
    let cfg = haproxy_config(&sock, 18680, "");
    let env = Env::new(&cfg);
    env.releases(&["v1"]);
    // HAProxy's backend has web-1 only: web-2 could never be drained.
    let _haproxy = Haproxy::start(&bin, dir.path(), port, &[("web-1", 18681)]);

    let (code, out, err) = env.run(&["setup"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(err.contains("HAProxy backend app has no server web-2"), "{err}");
    let (code, out, _) = env.run(&["--json", "setup"]);
    assert_eq!(code, 3);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ready"], false, "{v}");
    assert_eq!(v["load_balancer"], "haproxy", "{v}");
    assert!(v["error"].as_str().unwrap().contains("no server web-2"), "{v}");

    let (code, out, err) = env.run(&["deploy", "v1"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        err.contains("haproxy load balancer failed its preflight check, so nothing was touched")
            && err.contains("has no server web-2"),
        "{err}"
    );
    assert_eq!(
        admin_states(&sock),
        vec![("web-1".to_string(), ServerAdmin::Ready)]
    );
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id), None, "{id} untouched");
    }
    assert_eq!(env.journal_count(), 0, "no journal left behind");
    let status = env.ok(&["status"], 0);
    assert!(!status.contains("interrupted"), "{status}");
}
