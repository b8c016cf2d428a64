//! deploykit against Ansible, side by side, on the same 16 loopback `sshd`
//! hosts running the demo app: a rolling deployment in batches of 4 — stop,
//! switch `current` to a release already on the host, start, wait for
//! `/health` (polled every 200 ms) — with no load balancer.
//!
//! Ansible (ansible-core from PyPI) is installed by the bench into a venv
//! under `<target>/bench-ansible/venv` on the first run (needs `python3`
//! with `venv` and network access to PyPI) and reused afterwards; without
//! it only deploykit is measured. Its playbook runs the same four tasks with
//! `serial: 4` and Ansible's defaults otherwise (OpenSSH with ControlPersist,
//! no pipelining, 5 forks).
//!
//! Both tools deploy alternately (deploykit, Ansible, deploykit, …), each
//! switching the fleet to the other of two releases, `BENCH_ROUNDS` times
//! (default 3); the bench prints the medians, the ratio and deploykit's
//! median time per step.
//!
//! Run: `cargo bench -p deploykit-e2e --bench ssh_vs_ansible`
//! (`BENCH_ROUNDS=N`, `BENCH_HOSTS=N` to change the defaults). The lab
//! gives the login an empty `HOME`, so no shell start-up file runs;
//! `BENCH_LOGIN_RC=1` keeps the login's own `HOME`, whose `~/.bashrc` then
//! runs for every remote command of both tools — a per-command cost that
//! multiplies with the round trips.

#[path = "../tests/real/sshd.rs"]
mod sshd;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deploykit::instance::{ProcessSpec, ReleaseSource, SshInstance};
use deploykit::{
    CountOrPercent, Event, EventKind, EventLog, Executor, HealthCheck, Instance, NoLoadBalancer, ReleaseId,
    Rolling,
};

const RELEASES: [&str; 2] = ["a", "b"];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A release directory: the demo app (a symlink to the binary built with
/// this bench) and a VERSION file.
fn make_release(builds: &Path, name: &str) {
    let rel = builds.join(name);
    std::fs::create_dir_all(&rel).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_e2e-demo-app"), rel.join("deploykit-demo-app")).unwrap();
    std::fs::write(rel.join("VERSION"), format!("{name}\n")).unwrap();
}

/// The target directory (`CARGO_TARGET_DIR`, else the workspace's).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// `ansible-playbook` from a venv under the target directory, created on
/// first use; `None` (after saying why) when it cannot be installed.
fn ansible_playbook() -> Option<PathBuf> {
    let venv = target_dir().join("bench-ansible/venv");
    let bin = venv.join("bin/ansible-playbook");
    if bin.is_file() {
        return Some(bin);
    }
    eprintln!("installing ansible-core into {} (once)…", venv.display());
    let ok = Proc::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Proc::new(venv.join("bin/pip"))
            .args(["install", "-q", "ansible-core"])
            .status()
            .is_ok_and(|s| s.success());
    if ok && bin.is_file() {
        Some(bin)
    } else {
        eprintln!("!!!!! ansible-core could not be installed (python3 -m venv; pip install ansible-core): measuring deploykit only");
        None
    }
}

const PLAYBOOK: &str = r#"- hosts: app
  gather_facts: false
  serial: 4
  tasks:
    - name: stop
      shell: |
        if [ -f {{ root }}/app.pid ]; then
          pid=$(cut -d' ' -f1 {{ root }}/app.pid)
          kill -TERM "$pid" 2>/dev/null || true
          while [ "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null || echo Z)" != Z ]; do sleep 0.02; done
          rm -f {{ root }}/app.pid
        fi
    - name: switch current
      file:
        src: "releases/{{ version }}"
        dest: "{{ root }}/current"
        state: link
        force: true
    - name: start
      shell: |
        cd {{ root }}/current
        setsid ./deploykit-demo-app --listen {{ address }} --version {{ version }} >>{{ root }}/app.log 2>&1 </dev/null &
        echo "$! $(cut -d' ' -f22 /proc/$!/stat)" > {{ root }}/app.pid
    - name: wait for /health
      uri:
        url: "http://{{ address }}/health"
      register: health
      until: health.status == 200
      retries: 100
      delay: 0.2
"#;

struct Host {
    address: String,
    root: String,
}

/// The inventory and playbook for the lab; returns the inventory path.
fn write_ansible_files(lab: &sshd::SshLab, hosts: &[Host]) -> (PathBuf, PathBuf) {
    let d = lab.dir.path();
    let mut inv = String::from("[app]\n");
    for (i, h) in hosts.iter().enumerate() {
        let s = &lab.hosts[i];
        writeln!(
            inv,
            "h{i} ansible_host={} ansible_port={} root={} address={}",
            s.ip, s.port, h.root, h.address
        )
        .unwrap();
    }
    writeln!(
        inv,
        "[app:vars]\nansible_user={}\nansible_ssh_private_key_file={}\n\
         ansible_ssh_common_args='-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes'\n\
         ansible_python_interpreter=/usr/bin/python3",
        lab.user,
        lab.client_key.display(),
        lab.known_hosts.display()
    )
    .unwrap();
    let inventory = d.join("inventory.ini");
    std::fs::write(&inventory, inv).unwrap();
    let playbook = d.join("deploy.yml");
    std::fs::write(&playbook, PLAYBOOK).unwrap();
    (inventory, playbook)
}

fn run_ansible(bin: &Path, lab: &sshd::SshLab, files: &(PathBuf, PathBuf), version: &str) -> f64 {
    let d = lab.dir.path();
    let t = Instant::now();
    let out = Proc::new(bin)
        .arg("-i")
        .arg(&files.0)
        .arg(&files.1)
        .args(["-e", &format!("version={version}")])
        .env("ANSIBLE_LOCAL_TEMP", d.join("ansible-local"))
        .env("ANSIBLE_CONTROL_PATH_DIR", d.join("cp"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
        .output()
        .expect("ansible-playbook");
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "ansible-playbook failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn main() {
    let rounds = env_usize("BENCH_ROUNDS", 3).max(1);
    let n = env_usize("BENCH_HOSTS", 16).clamp(1, 200);
    let login_rc = std::env::var("BENCH_LOGIN_RC").is_ok_and(|v| v == "1");
    let Some(lab) = sshd::SshLab::start_with(n, login_rc) else {
        eprintln!("sshd not installed; nothing measured");
        return;
    };
    let ansible = ansible_playbook();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let builds = lab.dir.path().join("builds");
    for r in RELEASES {
        make_release(&builds, r);
    }
    let mut hosts = Vec::new();
    let mut instances: Vec<Arc<dyn Instance>> = Vec::new();
    for i in 0..n {
        let ip = &lab.hosts[i].ip;
        let address = format!("{ip}:{}", sshd::free_port_on(ip));
        let root = lab.dir.path().join(format!("host-{i}/app"));
        let root = root.to_str().unwrap().to_string();
        let spec = ProcessSpec::new([
            "./deploykit-demo-app".to_string(),
            "--listen".into(),
            address.clone(),
            "--version".into(),
            "{release}".into(),
        ])
        .unwrap()
        .grace(Duration::from_secs(10));
        let inst = SshInstance::builder(
            lab.host_builder(i, None).build().unwrap(),
            format!("web-{}", i + 1),
            &address,
        )
        .root(root.clone())
        .source(ReleaseSource::directory(&builds))
        .process(spec)
        .build()
        .unwrap();
        instances.push(Arc::new(inst));
        hosts.push(Host { address, root });
    }
    // Both releases on every host, the first one running.
    rt.block_on(async {
        let setup = instances.iter().map(|i| async move {
            for r in RELEASES.iter().rev() {
                i.install(&ReleaseId::new(*r).unwrap()).await.unwrap();
            }
            i.start().await.unwrap();
        });
        futures::future::join_all(setup).await;
    });
    let files = write_ansible_files(&lab, &hosts);
    let strategy = Rolling {
        batch_size: CountOrPercent::Count(4),
        max_failures: CountOrPercent::Count(1),
        health: HealthCheck {
            retries: 100,
            interval: Duration::from_millis(200),
        },
        // No load balancer: nothing to drain, and Ansible does not wait.
        drain_timeout: Duration::ZERO,
        stabilisation: Some(Duration::ZERO),
    };
    let mut version = 0;
    let mut next = || {
        version = 1 - version;
        RELEASES[version]
    };
    let (mut dk, mut an) = (Vec::new(), Vec::new());
    let mut steps: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut retries = 0u32;
    for round in 0..rounds {
        let log = EventLog::new();
        let exec = Executor::builder()
            .instances(instances.iter().cloned())
            .load_balancer(Arc::new(NoLoadBalancer))
            .events(Arc::new(log.clone()))
            .build()
            .unwrap();
        let release = ReleaseId::new(next()).unwrap();
        let t = Instant::now();
        let report = rt.block_on(exec.deploy(&strategy, &release)).unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert!(report.is_success(), "deploykit {release}: {report:?}");
        dk.push(secs);
        for e in log.events() {
            if let Event {
                kind:
                    EventKind::StepFinished {
                        step,
                        duration_ms,
                        attempts,
                        ..
                    },
                ..
            } = e
            {
                steps
                    .entry(step.to_string())
                    .or_default()
                    .push(duration_ms as f64 / 1e3);
                retries += attempts.saturating_sub(1);
            }
        }
        print!("round {}: deploykit {secs:6.2} s", round + 1);
        if let Some(bin) = &ansible {
            let secs = run_ansible(bin, &lab, &files, next());
            an.push(secs);
            print!("   ansible {secs:6.2} s");
        }
        println!();
    }
    let d = median(dk);
    println!(
        "rolling deployment of {n} SSH hosts, batches of 4, health every 200 ms, {rounds} rounds (median){}:",
        if login_rc {
            ", login shell start-up files on"
        } else {
            ""
        }
    );
    println!("  deploykit  {d:6.2} s");
    if ansible.is_some() {
        let a = median(an);
        println!("  ansible    {a:6.2} s");
        println!("  ratio      {:6.3} (deploykit / ansible)", d / a);
    }
    println!("deploykit per step (median over all instances and rounds; {retries} retried attempts):");
    for (step, v) in steps {
        println!("  {step:<14} {:7.3} s", median(v));
    }
    rt.block_on(async {
        for i in &instances {
            let _ = i.stop().await;
        }
    });
}
