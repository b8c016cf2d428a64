//! A rolling deployment over three real processes on this machine: each
//! instance has its own Capistrano-style layout in a temp dir, deploykit
//! starts the app detached from `current`, probes `GET /health`, stops it
//! with SIGTERM, swaps the `current` symlink, and starts the new release.
//!
//! The application deployed is this very binary (run with `serve`, it is
//! the `deploykit-demo-app` app), so the example needs nothing else.
//!
//! Run: `cargo run -p deploykit-examples --example local_processes`

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use deploykit::instance::{LocalInstance, ProcessSpec, ReleaseSource};
use deploykit::{
    CountOrPercent, EventKind, Executor, HealthCheck, Instance, NoLoadBalancer, ReleaseId, Rolling,
};
use deploykit_demo_app::{serve, DemoConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.get(1).map(String::as_str) == Some("serve") {
        // The application being deployed.
        let config = DemoConfig::try_parse_from(&args[1..])?;
        return Ok(rt.block_on(serve(config))?);
    }
    let dir = std::env::temp_dir().join(format!("deploykit-example-{}", std::process::id()));
    let result = rt.block_on(deploy(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// A "build": `<builds>/<id>/app` (this binary) and a VERSION file.
fn build_release(builds: &Path, id: &str) -> anyhow::Result<()> {
    let dir = builds.join(id);
    std::fs::create_dir_all(&dir)?;
    std::os::unix::fs::symlink(std::env::current_exe()?, dir.join("app"))?;
    std::fs::write(dir.join("VERSION"), format!("{id}\n"))?;
    Ok(())
}

/// `GET /` with the standard library: the body is the version serving.
fn version_at(addr: &str) -> String {
    let fetch = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text.rsplit("\r\n\r\n").next().unwrap_or("").trim().to_string())
    };
    fetch().unwrap_or_else(|e| format!("(no answer: {e})"))
}

async fn deploy(dir: &Path) -> anyhow::Result<()> {
    let builds = dir.join("builds");
    for v in ["v1", "v2"] {
        build_release(&builds, v)?;
    }
    let mut instances = Vec::new();
    for i in 1..=3 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        let spec = ProcessSpec::new([
            "./app",
            "serve",
            "--listen",
            addr.as_str(),
            "--version",
            "{release}",
        ])?
        .grace(Duration::from_secs(10));
        let inst = LocalInstance::builder(format!("web-{i}"), addr.clone())
            .root(dir.join(format!("web-{i}")).to_str().expect("temp dir is UTF-8"))
            .source(ReleaseSource::directory(&builds))
            .process(spec)
            .link("log")
            .build()?;
        instances.push((Arc::new(inst), addr));
    }

    // Day zero: every instance on v1.
    for (inst, _) in &instances {
        inst.install(&ReleaseId::new("v1")?).await?;
        inst.start().await?;
    }
    for (inst, addr) in &instances {
        while !inst.health().await?.is_healthy() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        println!("{} at {addr} serves {}", inst.backend().id, version_at(addr));
    }

    let executor = Executor::builder()
        .instances(instances.iter().map(|(i, _)| i.clone() as Arc<dyn Instance>))
        .load_balancer(Arc::new(NoLoadBalancer))
        .events(Arc::new(|e: &deploykit::Event| match &e.kind {
            EventKind::StageStarted { name, .. } => println!("[{:>6} ms] {name}", e.elapsed_ms),
            EventKind::StepFinished {
                step,
                instance: Some(i),
                duration_ms,
                ..
            } => println!("[{:>6} ms]   {i}: {step} ({duration_ms} ms)", e.elapsed_ms),
            _ => {}
        }))
        .build()?;
    let rolling = Rolling {
        batch_size: CountOrPercent::Count(1),
        health: HealthCheck {
            retries: 50,
            interval: Duration::from_millis(100),
        },
        // Nothing in front of the instances to drain.
        drain_timeout: Duration::from_millis(100),
        stabilisation: Some(Duration::from_millis(200)),
        ..Rolling::default()
    };
    let report = executor.deploy(&rolling, &ReleaseId::new("v2")?).await?;
    println!("outcome: {:?} in {:?}", report.outcome, report.duration);
    for (inst, addr) in &instances {
        let current = std::fs::read_link(Path::new(inst.layout().root()).join("current"))?;
        println!(
            "{}: current -> {}, serves {}",
            inst.backend().id,
            current.display(),
            version_at(addr)
        );
    }
    for (inst, _) in &instances {
        inst.stop().await?;
    }
    anyhow::ensure!(report.is_success(), "the deployment did not succeed: {report:?}");
    Ok(())
}
