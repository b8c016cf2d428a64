//! SSH instances against real OpenSSH `sshd` daemons on loopback:
//!
//! 1. per-command round trip over one reused ssh2 session, versus spawning
//!    the `ssh` binary per command (plain, and with ControlMaster
//!    multiplexing), interleaved round by round;
//! 2. time to install a 50 MB release (incompressible) to 8 hosts
//!    concurrently (tar over one exec channel + remote `sha256sum -c` +
//!    symlink swap), next to 1 host alone.
//!
//! Run: `cargo bench -p deploykit-e2e --bench ssh`
//! (`BENCH_ROUNDS=N` for more rounds; default 5).

#[path = "../tests/real/sshd.rs"]
mod sshd;

use std::path::Path;
use std::process::Command as Proc;
use std::sync::Arc;
use std::time::Instant;

use deploykit::instance::{Command, Host, ProcessSpec, ReleaseSource, SshInstance};
use deploykit::{Instance, ReleaseId};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn ssh_args(lab: &sshd::SshLab, i: usize) -> Vec<String> {
    let h = &lab.hosts[i];
    vec![
        "-i".into(),
        lab.client_key.display().to_string(),
        "-o".into(),
        format!("UserKnownHostsFile={}", lab.known_hosts.display()),
        "-o".into(),
        "BatchMode=yes".into(),
        "-o".into(),
        "StrictHostKeyChecking=yes".into(),
        "-p".into(),
        h.port.to_string(),
        format!("{}@{}", lab.user, h.ip),
    ]
}

fn ssh_binary(lab: &sshd::SshLab, extra: &[String]) -> f64 {
    let t = Instant::now();
    let st = Proc::new("ssh")
        .args(extra)
        .args(ssh_args(lab, 0))
        .arg("true")
        .status()
        .expect("ssh");
    assert!(st.success());
    t.elapsed().as_secs_f64() * 1e3
}

fn make_big_release(dir: &Path, name: &str, bytes: usize) {
    let rel = dir.join(name);
    std::fs::create_dir_all(&rel).unwrap();
    // Incompressible: xorshift bytes.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ name.len() as u64;
    let mut data = vec![0u8; bytes];
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    std::fs::write(rel.join("payload.bin"), data).unwrap();
    std::fs::write(rel.join("VERSION"), name).unwrap();
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let Some(lab) = sshd::SshLab::start(8) else {
        eprintln!("sshd not installed; nothing measured");
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // 1. Per-command round trip.
    let host = lab.host_builder(0, None).build().unwrap();
    rt.block_on(host.connect()).unwrap();
    let cm_path = lab.dir.path().join("cm");
    let cm = vec![
        "-o".to_string(),
        "ControlMaster=auto".into(),
        "-o".into(),
        format!("ControlPath={}", cm_path.display()),
        "-o".into(),
        "ControlPersist=120".into(),
    ];
    ssh_binary(&lab, &cm); // opens the master
    let (mut reused, mut spawned, mut muxed) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        for _ in 0..20 {
            let t = Instant::now();
            let out = rt.block_on(host.run(&Command::new("true"))).unwrap();
            assert!(out.success());
            reused.push(t.elapsed().as_secs_f64() * 1e3);
        }
        for _ in 0..5 {
            spawned.push(ssh_binary(&lab, &[]));
        }
        for _ in 0..10 {
            muxed.push(ssh_binary(&lab, &cm));
        }
    }
    let _ = Proc::new("ssh")
        .args(&cm)
        .args(["-O", "exit"])
        .args(ssh_args(&lab, 0))
        .output();
    let (r, s, m) = (
        median(reused.clone()),
        median(spawned.clone()),
        median(muxed.clone()),
    );
    println!("per-command round trip (`true`), {rounds} rounds interleaved:");
    println!(
        "  ssh2, one reused session      median {r:7.2} ms  ({} commands)",
        reused.len()
    );
    println!(
        "  `ssh` binary per command      median {s:7.2} ms  ({} commands)  = {:.1}x",
        spawned.len(),
        s / r
    );
    println!(
        "  `ssh` binary + ControlMaster  median {m:7.2} ms  ({} commands)  = {:.1}x",
        muxed.len(),
        m / r
    );

    // 2. Install 50 MB to 8 hosts concurrently, and to 1 host alone.
    let builds = lab.dir.path().join("builds");
    let size = 50 * 1000 * 1000;
    let install_rounds = rounds.min(3);
    for k in 0..install_rounds * 2 {
        make_big_release(&builds, &format!("r{k}"), size);
    }
    let instances: Vec<Arc<SshInstance>> = (0..8)
        .map(|i| {
            let root = lab.dir.path().join(format!("host-{i}/app"));
            Arc::new(
                SshInstance::builder(
                    lab.host_builder(i, None).build().unwrap(),
                    format!("h{i}"),
                    format!("{}:9", lab.hosts[i].ip),
                )
                .root(root.to_str().unwrap())
                .source(ReleaseSource::directory(&builds))
                .process(ProcessSpec::new(["true"]).unwrap())
                .keep(2)
                .build()
                .unwrap(),
            )
        })
        .collect();
    rt.block_on(async {
        for i in &instances {
            i.host().connect().await.unwrap();
        }
    });
    let (mut eight, mut one) = (Vec::new(), Vec::new());
    for k in 0..install_rounds {
        let rel = ReleaseId::new(format!("r{}", 2 * k)).unwrap();
        let t = Instant::now();
        rt.block_on(async {
            let futs = instances.iter().map(|i| {
                let rel = rel.clone();
                async move { i.install(&rel).await }
            });
            for r in futures::future::join_all(futs).await {
                r.unwrap();
            }
        });
        eight.push(t.elapsed().as_secs_f64());
        let rel = ReleaseId::new(format!("r{}", 2 * k + 1)).unwrap();
        let t = Instant::now();
        rt.block_on(instances[0].install(&rel)).unwrap();
        one.push(t.elapsed().as_secs_f64());
    }
    let (e, o) = (median(eight), median(one));
    let mb = size as f64 / 1e6;
    println!(
        "install a {mb:.0} MB release (tar over one channel, sha256sum -c, swap), {install_rounds} rounds:"
    );
    println!(
        "  8 hosts concurrently  median {e:6.2} s  ({:.0} MB/s aggregate)",
        8.0 * mb / e
    );
    println!("  1 host alone          median {o:6.2} s  ({:.0} MB/s)", mb / o);
}
