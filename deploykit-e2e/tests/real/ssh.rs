//! `SshInstance` against real OpenSSH `sshd` daemons on loopback: host-key
//! checks, commands over a reused session, tar uploads verified remotely, a
//! rolling deployment of demo-app releases to 4 hosts with `process`
//! control, a connection cut mid-upload, keepalives between commands, and
//! keep-N pruning.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use deploykit::instance::{Command, Host, HostKeyPolicy, ReleaseSource, SshInstance};
use deploykit::{
    CountOrPercent, Executor, HealthCheck, Instance, InstanceStatus, NoLoadBalancer, OutcomeKind, ReleaseId,
    Retry, Rolling,
};

use crate::harness::{eventually, Http, KillOnDrop};
use crate::local::{make_release, wait_healthy};
use crate::sshd::{free_port_on, CuttingProxy, SshLab};

fn id(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

/// A release with a payload file of `size` bytes besides the demo app.
fn make_release_with_payload(dir: &Path, name: &str, size: usize) {
    make_release(dir, name);
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join(name).join("payload.bin"), data).unwrap();
}

async fn version_at(addr: &str) -> Result<String, String> {
    Ok(Http::new()
        .get(&format!("http://{addr}/"))
        .await?
        .body
        .trim()
        .to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_over_one_reused_session_with_exact_arguments() {
    let Some(lab) = SshLab::start(1) else { return };
    let host = lab.host_builder(0, None).build().unwrap();
    let nasty = ["a b", "it's", "$(touch /tmp/dk-pwned)", "*", "line\nbreak", ""];
    let out = host
        .run(&Command::new("printf").arg("%s|").args(nasty).env("X", "1"))
        .await
        .unwrap()
        .check("printf")
        .unwrap();
    assert_eq!(out.stdout, "a b|it's|$(touch /tmp/dk-pwned)|*|line\nbreak||");
    // Exit status and stderr come back.
    let out = host
        .run(&Command::new("sh").args(["-c", "echo oops >&2; exit 7"]))
        .await
        .unwrap();
    assert_eq!(out.status, Some(7));
    assert_eq!(out.stderr.trim(), "oops");
    // The session is reused: every command's shell is a child of the same
    // per-connection sshd process.
    let ppid = Command::new("sh").args(["-c", "echo $PPID"]);
    let a = host.run(&ppid).await.unwrap().stdout;
    let b = host.run(&ppid).await.unwrap().stdout;
    assert_eq!(a, b, "two commands should share one SSH connection");
    assert!(!Path::new("/tmp/dk-pwned").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_changed_host_keys_are_refused() {
    let Some(lab) = SshLab::start(2) else { return };
    // Changed key: the known_hosts entry for host 0 holds another key.
    let other = lab.other_key_line("impostor");
    let (h0, h1) = (&lab.hosts[0], &lab.hosts[1]);
    let wrong = lab.dir.path().join("known_hosts_wrong");
    std::fs::write(&wrong, format!("[{}]:{} {other}\n", h0.ip, h0.port)).unwrap();
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::TrustOnFirstUse] {
        let host = lab
            .host_builder(0, None)
            .known_hosts(&wrong)
            .host_key_policy(policy)
            .build()
            .unwrap();
        let err = host.connect().await.unwrap_err().to_string();
        assert!(
            err.contains("HOST KEY MISMATCH") && err.contains(&h0.ip),
            "{policy:?}: {err}"
        );
        assert!(
            !err.to_lowercase().contains("authenticat"),
            "must stop before authenticating: {err}"
        );
    }

    // Unknown key: refused by default, naming the fix.
    let empty = lab.dir.path().join("known_hosts_empty");
    std::fs::write(&empty, "").unwrap();
    let strict = lab.host_builder(1, None).known_hosts(&empty).build().unwrap();
    let err = strict.connect().await.unwrap_err().to_string();
    assert!(
        err.contains("unknown host key") && err.contains("SHA256:"),
        "{err}"
    );
    let out = strict.run(&Command::new("true")).await;
    assert!(out.is_err(), "no command may run on an unverified host");

    // Trust on first use records the key; then strict checking accepts it.
    let tofu = lab
        .host_builder(1, None)
        .known_hosts(&empty)
        .host_key_policy(HostKeyPolicy::TrustOnFirstUse)
        .build()
        .unwrap();
    tofu.connect().await.unwrap();
    let recorded = std::fs::read_to_string(&empty).unwrap();
    let key_b64 = lab.host_key_line.split_whitespace().nth(1).unwrap();
    assert!(
        recorded.contains(&format!("[{}]:{}", h1.ip, h1.port)) && recorded.contains(key_b64),
        "{recorded}"
    );
    let strict = lab.host_builder(1, None).known_hosts(&empty).build().unwrap();
    strict.connect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_session_is_reestablished_once() {
    let Some(lab) = SshLab::start(1) else { return };
    let h = &lab.hosts[0];
    let proxy = CuttingProxy::start(&h.ip, format!("{}:{}", h.ip, h.port).parse().unwrap()).await;
    // known_hosts needs the proxy's [ip]:port too.
    let kh = lab.dir.path().join("known_hosts_proxy");
    std::fs::write(&kh, format!("[{}]:{} {}\n", h.ip, proxy.port, lab.host_key_line)).unwrap();
    let host = lab
        .host_builder(0, Some(proxy.port))
        .known_hosts(&kh)
        .build()
        .unwrap();
    host.run(&Command::new("true"))
        .await
        .unwrap()
        .check("true")
        .unwrap();
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1);
    // The connection dies between two steps (server restart, NAT timeout…).
    proxy.cut_existing();
    eventually(Duration::from_secs(10), "the proxy cut the session", || async {
        (proxy.cuts.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    // The next step notices, reconnects once, and succeeds.
    let out = host.run(&Command::new("echo").arg("again")).await.unwrap();
    assert_eq!(out.stdout, "again\n");
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2, "exactly one reconnect");
    // And keeps using the new session.
    host.run(&Command::new("true")).await.unwrap();
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2);

    // When the host stays unreachable, the step fails (after one retry)
    // with an error naming the host.
    proxy.cut_existing();
    proxy.cut_after.store(0, Ordering::SeqCst);
    eventually(
        Duration::from_secs(10),
        "the proxy cut the new session",
        || async { (proxy.cuts.load(Ordering::SeqCst) >= 2).then_some(()) },
    )
    .await;
    let err = host.run(&Command::new("true")).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains(&h.ip) && err.is_transient(), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_go_out_between_commands_and_never_break_one() {
    let Some(lab) = SshLab::start(1) else { return };
    let h = &lab.hosts[0];
    let proxy = CuttingProxy::start(&h.ip, format!("{}:{}", h.ip, h.port).parse().unwrap()).await;
    let kh = lab.dir.path().join("known_hosts_proxy");
    std::fs::write(&kh, format!("[{}]:{} {}\n", h.ip, proxy.port, lab.host_key_line)).unwrap();
    let host = lab
        .host_builder(0, Some(proxy.port))
        .known_hosts(&kh)
        .keepalive(Duration::from_secs(1))
        .build()
        .unwrap();
    // A command quiet for several keepalive periods is not disturbed (with
    // libssh2's own keepalive interval set, it failed: "Timed out waiting
    // on socket").
    let out = host
        .run(&Command::new("sh").args(["-c", "sleep 2.2; echo done"]))
        .await
        .unwrap();
    assert_eq!((out.status, out.stdout.as_str()), (Some(0), "done\n"), "{out:?}");
    // Idle: keepalives go out (the client sends while no command runs)…
    let before = proxy.sent.load(Ordering::SeqCst);
    eventually(Duration::from_secs(10), "a keepalive while idle", || async {
        (proxy.sent.load(Ordering::SeqCst) > before).then_some(())
    })
    .await;
    // …and the session stays the one it was.
    let out = host.run(&Command::new("echo").arg("again")).await.unwrap();
    assert_eq!(out.stdout, "again\n");
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1, "no reconnect");
    assert_eq!(proxy.cuts.load(Ordering::SeqCst), 0);

    // Keepalives off: nothing is sent while idle.
    let quiet = lab
        .host_builder(0, Some(proxy.port))
        .known_hosts(&kh)
        .keepalive(Duration::ZERO)
        .build()
        .unwrap();
    quiet.run(&Command::new("true")).await.unwrap();
    drop(host);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = proxy.sent.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(proxy.sent.load(Ordering::SeqCst), before);
}

pub(crate) fn ssh_instance(
    lab: &SshLab,
    i: usize,
    builds: &Path,
    keep: usize,
) -> (SshInstance, String, String) {
    let ip = lab.hosts[i].ip.clone();
    let port = free_port_on(&ip);
    let address = format!("{ip}:{port}");
    let root = lab
        .dir
        .path()
        .join(format!("host-{i}/app"))
        .to_str()
        .unwrap()
        .to_string();
    let spec = deploykit::instance::ProcessSpec::new([
        "./deploykit-demo-app".to_string(),
        "--listen".into(),
        address.clone(),
        "--version".into(),
        "{release}".into(),
    ])
    .unwrap()
    .env("DEPLOYKIT_TEST_MARK", "release {release}")
    .unwrap()
    .grace(Duration::from_secs(10));
    let inst = SshInstance::builder(
        lab.host_builder(i, None).build().unwrap(),
        format!("web-{}", i + 1),
        &address,
    )
    .root(root.clone())
    .source(ReleaseSource::directory(builds))
    .process(spec)
    .keep(keep)
    .link("log")
    .build()
    .unwrap();
    (inst, address, root)
}

fn releases_on_disk(root: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("{root}/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn fast_rolling() -> Rolling {
    Rolling {
        batch_size: CountOrPercent::Count(2),
        max_failures: CountOrPercent::Count(1),
        health: HealthCheck {
            retries: 100,
            interval: Duration::from_millis(100),
        },
        drain_timeout: Duration::from_millis(50),
        stabilisation: Some(Duration::from_millis(10)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_deployment_to_four_ssh_hosts_with_pruning() {
    let Some(lab) = SshLab::start(4) else { return };
    let builds = lab.dir.path().join("builds");
    for v in ["v1", "v2", "v3"] {
        make_release_with_payload(&builds, v, 256 * 1024);
    }
    let mut insts = Vec::new();
    let mut roots = Vec::new();
    for i in 0..4 {
        let (inst, address, root) = ssh_instance(&lab, i, &builds, 2);
        roots.push(root.clone());
        insts.push((Arc::new(inst), address, root));
    }
    let _kill = KillOnDrop(roots);
    for (inst, _, _) in &insts {
        inst.install(&id("v1")).await.unwrap();
        inst.start().await.unwrap();
    }
    for (inst, address, _) in &insts {
        wait_healthy(inst.as_ref()).await;
        assert_eq!(version_at(address).await.unwrap(), "v1");
    }
    let exec = Executor::builder()
        .instances(insts.iter().map(|(i, _, _)| i.clone() as Arc<dyn Instance>))
        .load_balancer(Arc::new(NoLoadBalancer))
        .build()
        .unwrap();
    for v in ["v2", "v3"] {
        let report = exec.deploy(&fast_rolling(), &id(v)).await.unwrap();
        assert!(report.is_success(), "{v}: {report:?}");
        for (inst, address, root) in &insts {
            assert_eq!(
                std::fs::read_link(format!("{root}/current")).unwrap().to_str(),
                Some(format!("releases/{v}").as_str())
            );
            assert_eq!(inst.current_release().await.unwrap(), Some(id(v)));
            assert_eq!(version_at(address).await.unwrap(), v, "{}", inst.backend().id);
            // The process got its environment through the remote shell line.
            let pid = std::fs::read_to_string(format!("{root}/app.pid")).unwrap();
            let pid = pid.split_whitespace().next().unwrap();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
            let mark = format!("DEPLOYKIT_TEST_MARK=release {v}");
            assert!(
                environ.split(|b| *b == 0).any(|e| e == mark.as_bytes()),
                "{mark} missing from the environment of {pid}"
            );
            // The uploaded payload is intact (checked remotely too).
            assert_eq!(
                std::fs::metadata(format!("{root}/current/payload.bin"))
                    .unwrap()
                    .len(),
                256 * 1024
            );
        }
    }
    // keep = 2: after v3, v1 (neither current nor previous) is gone.
    for (_, _, root) in &insts {
        assert_eq!(releases_on_disk(root), ["v2", "v3"], "{root}");
        assert_eq!(
            std::fs::read_link(format!("{root}/previous")).unwrap().to_str(),
            Some("releases/v2")
        );
    }
    for (inst, _, _) in &insts {
        inst.stop().await.unwrap();
        assert!(!inst.is_running().await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_mid_upload_leaves_the_host_on_its_previous_release() {
    let Some(lab) = SshLab::start(4) else { return };
    let builds = lab.dir.path().join("builds");
    make_release(&builds, "v1");
    // v2 carries 4 MiB: far more than the 512 KiB a connection may send.
    make_release_with_payload(&builds, "v2", 4 << 20);
    let h = &lab.hosts[2];
    let proxy = CuttingProxy::start(&h.ip, format!("{}:{}", h.ip, h.port).parse().unwrap()).await;
    let kh = lab.dir.path().join("known_hosts");
    let mut known = std::fs::read_to_string(&kh).unwrap();
    known.push_str(&format!("[{}]:{} {}\n", h.ip, proxy.port, lab.host_key_line));
    std::fs::write(&kh, known).unwrap();

    let mut insts: Vec<Arc<SshInstance>> = Vec::new();
    let mut roots = Vec::new();
    for i in 0..4 {
        let (inst, _, root) = ssh_instance(&lab, i, &builds, 5);
        let inst = if i == 2 {
            // Host 3 is reached through the cutting proxy.
            SshInstance::builder(
                lab.host_builder(2, Some(proxy.port)).build().unwrap(),
                "web-3",
                inst.backend().address.to_string(),
            )
            .root(root.clone())
            .source(ReleaseSource::directory(&builds))
            .service(inst.service().clone())
            .keep(5)
            .link("log")
            .build()
            .unwrap()
        } else {
            inst
        };
        roots.push(root);
        insts.push(Arc::new(inst));
    }
    let _kill = KillOnDrop(roots.clone());
    for inst in &insts {
        inst.install(&id("v1")).await.unwrap();
        inst.start().await.unwrap();
    }
    for inst in &insts {
        wait_healthy(inst.as_ref()).await;
    }
    // From now on every connection to host 3 is cut after 512 KiB.
    proxy.cut_after.store(512 * 1024, Ordering::SeqCst);

    let exec = Executor::builder()
        .instances(insts.iter().map(|i| i.clone() as Arc<dyn Instance>))
        .load_balancer(Arc::new(NoLoadBalancer))
        .retry(Retry {
            attempts: 2,
            backoff: Duration::from_millis(50),
        })
        .build()
        .unwrap();
    let report = exec.deploy(&fast_rolling(), &id("v2")).await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::Degraded, "{report:?}");
    assert!(proxy.cuts.load(Ordering::SeqCst) >= 1);
    let web3 = report
        .instances
        .iter()
        .find(|r| r.id.as_str() == "web-3")
        .unwrap();
    assert_eq!(web3.status, InstanceStatus::FailedRestored, "{web3:?}");
    let err = web3.error.clone().unwrap_or_default();
    assert!(
        err.contains("web-3") && err.contains(&h.ip),
        "the error must name the host: {err}"
    );
    assert!(err.contains("install"), "{err}");
    // Host 3 is on v1, serving; nothing half-uploaded is left as a release.
    assert_eq!(
        std::fs::read_link(format!("{}/current", roots[2]))
            .unwrap()
            .to_str(),
        Some("releases/v1")
    );
    assert!(!Path::new(&format!("{}/releases/v2", roots[2])).exists());
    proxy.cut_after.store(u64::MAX, Ordering::SeqCst);
    assert_eq!(insts[2].current_release().await.unwrap(), Some(id("v1")));
    assert!(insts[2].is_running().await.unwrap());
    assert_eq!(
        version_at(&insts[2].backend().address.to_string()).await.unwrap(),
        "v1"
    );
    // The others moved.
    for i in [0, 1, 3] {
        assert_eq!(insts[i].current_release().await.unwrap(), Some(id("v2")));
    }
    // With the connection healthy again, the same install succeeds (the
    // stale partial upload is cleaned up by pruning).
    insts[2].install(&id("v2")).await.unwrap();
    assert_eq!(insts[2].current_release().await.unwrap(), Some(id("v2")));
    assert!(!releases_on_disk(&roots[2])
        .iter()
        .any(|r| r.starts_with(".partial")));
    for inst in &insts {
        inst.stop().await.unwrap();
    }
}

/// An `ssh-agent -D` in the lab dir; killed on drop.
struct Agent(std::process::Child);
impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_agent_authentication() {
    let Some(lab) = SshLab::start(1) else { return };
    let (Some(agent_bin), Some(add_bin)) = (crate::sshd::find("ssh-agent"), crate::sshd::find("ssh-add"))
    else {
        panic!(
            "ssh-agent/ssh-add missing: real-server tests never skip (scripts/test installs openssh-client)"
        );
    };
    let sock = lab.dir.path().join("agent.sock");
    let _agent = Agent(
        std::process::Command::new(agent_bin)
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(
            std::time::Instant::now() < end,
            "ssh-agent did not create {}",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // An empty agent: authentication fails, naming the agent.
    let host = lab.host_builder(0, None).agent_socket(&sock).build().unwrap();
    let err = host.connect().await.unwrap_err().to_string();
    assert!(err.contains("authentication") && err.contains("agent"), "{err}");
    // With the key added, the same host connects.
    let st = std::process::Command::new(add_bin)
        .arg("-q")
        .arg(&lab.client_key)
        .env("SSH_AUTH_SOCK", &sock)
        .status()
        .unwrap();
    assert!(st.success());
    let host = lab.host_builder(0, None).agent_socket(&sock).build().unwrap();
    let out = host.run(&Command::new("echo").arg("via agent")).await.unwrap();
    assert_eq!(out.stdout, "via agent\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_upload_idempotent_install_and_restore_over_ssh() {
    let Some(lab) = SshLab::start(1) else { return };
    let builds = lab.dir.path().join("builds");
    make_release_with_payload(&builds, "v1", 300 * 1024);
    make_release_with_payload(&builds, "v2", 300 * 1024);
    // Through a proxy that cuts any connection after 150 KiB: the 300 KiB
    // (very compressible) payload only gets through gzipped.
    let h = &lab.hosts[0];
    let proxy = CuttingProxy::start(&h.ip, format!("{}:{}", h.ip, h.port).parse().unwrap()).await;
    proxy.cut_after.store(150 * 1024, Ordering::SeqCst);
    let kh = lab.dir.path().join("known_hosts");
    let mut known = std::fs::read_to_string(&kh).unwrap();
    known.push_str(&format!("[{}]:{} {}\n", h.ip, proxy.port, lab.host_key_line));
    std::fs::write(&kh, known).unwrap();
    let make = |gzip: bool, root: &str| {
        SshInstance::builder(
            lab.host_builder(0, Some(proxy.port)).gzip(gzip).build().unwrap(),
            "gz-1",
            "127.0.0.20:9",
        )
        .root(root)
        .source(ReleaseSource::directory(&builds))
        .process(deploykit::instance::ProcessSpec::new(["true"]).unwrap())
        .build()
        .unwrap()
    };
    let plain_root = lab.dir.path().join("plain/app").to_str().unwrap().to_string();
    let err = make(false, &plain_root)
        .install(&id("v1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("uploading the release"), "{err}");
    assert!(proxy.cuts.load(Ordering::SeqCst) >= 1);
    let root = lab.dir.path().join("gz/app").to_str().unwrap().to_string();
    let inst = make(true, &root);
    inst.install(&id("v1")).await.unwrap();
    let manifest = std::fs::read_to_string(format!("{root}/releases/v1/.deploykit.sha256")).unwrap();
    assert!(
        manifest.contains("./payload.bin") && manifest.contains("./VERSION"),
        "{manifest}"
    );
    let inode = |p: &str| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
    let before = inode(&format!("{root}/releases/v1/payload.bin"));
    // Installing the current release again changes nothing on disk.
    inst.install(&id("v1")).await.unwrap();
    assert_eq!(inode(&format!("{root}/releases/v1/payload.bin")), before);
    inst.install(&id("v2")).await.unwrap();
    assert_eq!(inst.current_release().await.unwrap(), Some(id("v2")));
    assert_eq!(
        std::fs::read(format!("{root}/current/payload.bin")).unwrap(),
        std::fs::read(builds.join("v2/payload.bin")).unwrap()
    );
    inst.restore(&id("v1")).await.unwrap();
    assert_eq!(inst.current_release().await.unwrap(), Some(id("v1")));
    assert_eq!(inst.installed().await.unwrap(), vec![id("v2"), id("v1")]);
    let err = inst.restore(&id("v7")).await.unwrap_err().to_string();
    assert!(
        err.contains("gz-1") && err.contains("v7") && err.contains("not installed"),
        "{err}"
    );
    // A release missing from the source fails before anything is touched.
    let err = inst.install(&id("v9")).await.unwrap_err().to_string();
    assert!(err.contains("v9") && err.contains("does not exist"), "{err}");
    assert_eq!(inst.current_release().await.unwrap(), Some(id("v1")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_values_reach_the_command_exactly_without_a_command_line() {
    let Some(lab) = SshLab::start(1) else { return };
    let host = lab.host_builder(0, None).build().unwrap();
    let secret = "s3cret 'quoted' $(touch /tmp/dk-pwned) `x` \\ *\nsecond line";
    // The command prints the value it got and the command line of its own
    // shell: the value must arrive exactly and not be on that line.
    let out = host
        .run(
            &Command::new("sh")
                .args([
                    "-c",
                    "printf '%s|' \"$DK_SECRET\"; tr '\\0' ' ' </proc/$$/cmdline",
                ])
                .env("DK_SECRET", secret)
                .env("DK_OTHER", "2")
                .cwd("/tmp"),
        )
        .await
        .unwrap()
        .check("printenv")
        .unwrap();
    let (got, cmdline) = out.stdout.split_once('|').unwrap();
    assert_eq!(got, secret);
    assert!(!cmdline.contains("s3cret"), "{cmdline}");
    assert!(!Path::new("/tmp/dk-pwned").exists());
}
