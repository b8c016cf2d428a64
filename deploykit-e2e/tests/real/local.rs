//! `LocalInstance` with `process` control against real demo-app processes:
//! install into the release layout, start detached, health over HTTP,
//! SIGTERM stop, SIGKILL escalation, restore, and a rolling deployment.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::{CountOrPercent, Executor, HealthCheck, Instance, NoLoadBalancer, ReleaseId, Rolling};
use tokio::time::{sleep, Instant};

pub(crate) use crate::harness::make_release;
use crate::harness::{free_port, temp_dir, Http};

/// The process spec that runs the demo app from the release directory,
/// listening on `port` and reporting the release id as its version.
pub(crate) fn demo_spec(port: u16) -> ProcessSpec {
    ProcessSpec::new([
        "./deploykit-demo-app".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--version".into(),
        "{release}".into(),
    ])
    .unwrap()
    .grace(Duration::from_secs(10))
}

fn id(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

/// Polls `health()` until healthy or a generous deadline passes.
pub(crate) async fn wait_healthy(inst: &dyn Instance) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match inst.health().await {
            Ok(h) if h.is_healthy() => return,
            other if Instant::now() >= end => panic!("{} never got healthy: {other:?}", inst.backend().id),
            _ => sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn version_at(port: u16) -> Result<String, String> {
    let a = Http::new().get(&format!("http://127.0.0.1:{port}/")).await?;
    Ok(a.body.trim().to_string())
}

pub(crate) fn local_instance(name: &str, port: u16, root: &Path, builds: &Path) -> LocalInstance {
    LocalInstance::builder(name, format!("127.0.0.1:{port}"))
        .root(root.to_str().unwrap())
        .source(ReleaseSource::directory(builds))
        .process(demo_spec(port))
        .link("log")
        .keep(3)
        .build()
        .unwrap()
}

/// Stops the instance when dropped, so a failing test leaves no process.
pub(crate) struct StopOnDrop(pub(crate) Arc<LocalInstance>);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let pidfile = format!("{}/app.pid", self.0.layout().root());
        if let Ok(text) = std::fs::read_to_string(pidfile) {
            if let Some(pid) = text.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()) {
                crate::harness::sigkill(pid);
            }
        }
    }
}

#[tokio::test]
async fn local_process_lifecycle_install_start_stop_restore() {
    let tmp = temp_dir("dk-local-");
    let builds = tmp.path().join("builds");
    for v in ["v1", "v2"] {
        make_release(&builds, v);
    }
    let port = free_port();
    let inst = Arc::new(local_instance("web-1", port, &tmp.path().join("web-1"), &builds));
    let _guard = StopOnDrop(inst.clone());

    assert_eq!(inst.current_release().await.unwrap(), None);
    // Starting with nothing installed is a clear error.
    let err = inst.start().await.unwrap_err().to_string();
    assert!(
        err.contains("web-1") && err.contains("no release is installed"),
        "{err}"
    );
    // Stopping what never ran succeeds.
    inst.stop().await.unwrap();

    inst.install(&id("v1")).await.unwrap();
    assert_eq!(inst.current_release().await.unwrap(), Some(id("v1")));
    assert!(!inst.is_running().await.unwrap());
    inst.start().await.unwrap();
    wait_healthy(inst.as_ref()).await;
    assert_eq!(version_at(port).await.unwrap(), "v1");
    assert!(inst.is_running().await.unwrap());
    let pid1 = std::fs::read_to_string(tmp.path().join("web-1/app.pid")).unwrap();
    // start is idempotent: the same process keeps running.
    inst.start().await.unwrap();
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("web-1/app.pid")).unwrap(),
        pid1
    );

    // The process is detached in its own session: its session id is its pid.
    let pid: i32 = pid1.split_whitespace().next().unwrap().parse().unwrap();
    let sid = nix::unistd::getsid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    assert_eq!(sid.as_raw(), pid, "the app must lead its own session");

    // Installing while running only swaps `current`; the running process is
    // unaffected until restarted.
    inst.install(&id("v2")).await.unwrap();
    assert_eq!(inst.current_release().await.unwrap(), Some(id("v2")));
    assert_eq!(version_at(port).await.unwrap(), "v1");

    inst.stop().await.unwrap(); // SIGTERM: the demo app exits gracefully
    assert!(!inst.is_running().await.unwrap());
    assert!(version_at(port).await.is_err(), "nothing may listen after stop");
    assert!(!tmp.path().join("web-1/app.pid").exists());
    inst.stop().await.unwrap(); // idempotent

    // Something else answering on the port does not make a stopped
    // instance healthy.
    let impostor = crate::harness::DemoApp::start(crate::harness::DemoOpts::new("impostor").port(port)).await;
    let h = inst.health().await.unwrap();
    assert!(
        matches!(&h, deploykit::Health::Unhealthy(m) if m.contains("not running")),
        "{h:?}"
    );
    impostor.stop().await;

    inst.start().await.unwrap();
    wait_healthy(inst.as_ref()).await;
    assert_eq!(version_at(port).await.unwrap(), "v2");
    inst.stop().await.unwrap();

    // Restore swaps back; the next start runs the old release.
    inst.restore(&id("v1")).await.unwrap();
    assert_eq!(inst.current_release().await.unwrap(), Some(id("v1")));
    inst.start().await.unwrap();
    wait_healthy(inst.as_ref()).await;
    assert_eq!(version_at(port).await.unwrap(), "v1");
    inst.force_stop().await.unwrap();
    assert!(!inst.is_running().await.unwrap());

    // The app's output went to the log file under the root.
    let log = std::fs::read_to_string(tmp.path().join("web-1/app.log")).unwrap();
    assert!(log.contains("listening on"), "{log}");
    // Restoring a release that was never installed is refused.
    let err = inst.restore(&id("v9")).await.unwrap_err().to_string();
    assert!(err.contains("v9") && err.contains("not installed"), "{err}");
}

#[tokio::test]
async fn a_reused_pid_is_not_taken_for_the_app() {
    let tmp = temp_dir("dk-local-pid-");
    let builds = tmp.path().join("builds");
    make_release(&builds, "v1");
    let port = free_port();
    let inst = local_instance("web-1", port, &tmp.path().join("web-1"), &builds);
    inst.install(&id("v1")).await.unwrap();
    // A pid file naming a live process (this test) with another start time.
    std::fs::write(
        tmp.path().join("web-1/app.pid"),
        format!("{} 1\n", std::process::id()),
    )
    .unwrap();
    assert!(!inst.is_running().await.unwrap());
    // stop must not signal that process (we would not survive SIGTERM).
    inst.stop().await.unwrap();
    inst.force_stop().await.unwrap();
}

#[tokio::test]
async fn stop_escalates_to_sigkill_after_the_grace_period() {
    let tmp = temp_dir("dk-local-kill-");
    let builds = tmp.path().join("builds");
    make_release(&builds, "v1");
    let inst = Arc::new(
        LocalInstance::builder("stubborn", "127.0.0.1:9")
            .root(tmp.path().join("root").to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            // Ignores SIGTERM (and so does its child `sleep`).
            .process(
                ProcessSpec::new([
                    "sh",
                    "-c",
                    "trap '' TERM; echo \"started in $PWD with $MARK\"; sleep 120",
                ])
                .unwrap()
                .env("MARK", "{release} 'quoted' $(not run)")
                .unwrap()
                .grace(Duration::from_millis(300)),
            )
            .health(deploykit::instance::HealthProbe::ServiceActive)
            .build()
            .unwrap(),
    );
    let _guard = StopOnDrop(inst.clone());
    inst.install(&id("v1")).await.unwrap();
    inst.start().await.unwrap();
    assert!(inst.health().await.unwrap().is_healthy());
    let pid: i32 = std::fs::read_to_string(tmp.path().join("root/app.pid"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Started in the release directory, with the environment (placeholders
    // replaced, nothing else interpreted).
    let dir = std::fs::canonicalize(tmp.path().join("root/releases/v1")).unwrap();
    let expected = format!("started in {} with v1 'quoted' $(not run)", dir.display());
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let log = std::fs::read_to_string(tmp.path().join("root/app.log")).unwrap_or_default();
        if log.contains(&expected) {
            break;
        }
        assert!(Instant::now() < end, "{expected:?} not in the log: {log}");
        sleep(Duration::from_millis(20)).await;
    }
    inst.stop().await.unwrap();
    assert!(!inst.is_running().await.unwrap());
    assert!(!inst.health().await.unwrap().is_healthy());
    // The whole process group is gone, the ignored SIGTERM notwithstanding.
    let gone = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), None).is_err()
        || std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.rsplit(") ").next().unwrap_or("").starts_with('Z'))
            .unwrap_or(true);
    assert!(gone, "process group {pid} survived stop");
}

#[tokio::test]
async fn rolling_deployment_over_local_processes() {
    let tmp = temp_dir("dk-local-roll-");
    let builds = tmp.path().join("builds");
    for v in ["v1", "v2"] {
        make_release(&builds, v);
    }
    let mut insts = Vec::new();
    let mut guards = Vec::new();
    for i in 1..=3 {
        let port = free_port();
        let inst = Arc::new(local_instance(
            &format!("web-{i}"),
            port,
            &tmp.path().join(format!("web-{i}")),
            &builds,
        ));
        inst.install(&id("v1")).await.unwrap();
        inst.start().await.unwrap();
        guards.push(StopOnDrop(inst.clone()));
        insts.push((inst, port));
    }
    for (inst, _) in &insts {
        wait_healthy(inst.as_ref()).await;
    }
    let exec = Executor::builder()
        .instances(insts.iter().map(|(i, _)| i.clone() as Arc<dyn Instance>))
        .load_balancer(Arc::new(NoLoadBalancer))
        .build()
        .unwrap();
    let rolling = Rolling {
        batch_size: CountOrPercent::Count(2),
        health: HealthCheck {
            retries: 100,
            interval: Duration::from_millis(100),
        },
        drain_timeout: Duration::from_millis(100),
        stabilisation: Some(Duration::from_millis(10)),
        ..Rolling::default()
    };
    let report = exec.deploy(&rolling, &id("v2")).await.unwrap();
    assert!(report.is_success(), "{report:?}");
    for (inst, port) in &insts {
        assert_eq!(inst.current_release().await.unwrap(), Some(id("v2")));
        assert_eq!(version_at(*port).await.unwrap(), "v2");
        assert_eq!(
            std::fs::read_link(format!("{}/previous", inst.layout().root()))
                .unwrap()
                .to_str(),
            Some("releases/v1")
        );
    }
    for (inst, _) in &insts {
        inst.stop().await.unwrap();
    }
}
