//! Helpers for tests against real servers: finding binaries, free loopback
//! ports, demo-app instances, nginx and HAProxy started in temp dirs, and a
//! small HTTP client that counts who answered.
//!
//! Everything listens on 127.0.0.1 only, every wait has a deadline, and every
//! process is killed when its guard drops.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout, Instant};

/// Generous bound for a server to come up.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// Finds `name` on `PATH`, `/usr/sbin` or `/sbin`. When missing it panics,
/// in CI or not: the test command (`scripts/test`) installs every server,
/// so a missing one is a broken setup, never a reason to pass silently.
/// (`Option` keeps the call sites' shape.)
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/sbin".into());
    dirs.push("/usr/local/sbin".into());
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    panic!("{name} is not installed: real-server tests never skip (scripts/test installs it; or apt-get install {name})");
}

/// Returns the path of `name`; panics when it is missing.
#[macro_export]
macro_rules! require_binary {
    ($name:expr) => {
        match $crate::harness::find_binary($name) {
            Some(p) => p,
            None => return,
        }
    };
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// Ports already handed out in this test process: tests run concurrently,
/// and a port one test picked (and closed) must not be picked by another
/// before the first test's server binds it.
static HANDED_OUT: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// `n` distinct loopback TCP ports that were free a moment ago and were
/// never handed out before in this process (all listeners are held until
/// every port is picked, so none repeats).
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut listeners = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if handed.insert(port) {
            ports.push(port);
        }
        listeners.push(l);
    }
    ports
}

/// A fresh temp dir, removed on drop.
pub fn temp_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create a temp dir")
}

/// Waits until a TCP connection to `addr` succeeds, or panics after
/// `deadline` with `what` and `context()` in the message.
pub async fn wait_for_port(addr: SocketAddr, deadline: Duration, what: &str, context: impl Fn() -> String) {
    let end = Instant::now() + deadline;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if Instant::now() >= end {
            panic!(
                "{what} did not listen on {addr} within {deadline:?}\n{}",
                context()
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM to a process.
pub fn sigterm(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32")),
        nix::sys::signal::Signal::SIGTERM,
    );
}

/// Sends SIGKILL to a process.
pub fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid fits i32")),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Kills whatever process each instance root's pid file (`<root>/app.pid`)
/// names when dropped: a test that panics leaves no demo app behind.
pub struct KillOnDrop<P: AsRef<Path>>(pub Vec<P>);

impl<P: AsRef<Path>> Drop for KillOnDrop<P> {
    fn drop(&mut self) {
        for root in &self.0 {
            if let Ok(t) = std::fs::read_to_string(root.as_ref().join("app.pid")) {
                if let Some(pid) = t.split_whitespace().next().and_then(|p| p.parse().ok()) {
                    sigkill(pid);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Demo app

/// Makes `<dir>/<id>/` holding a symlink to the demo-app binary and a
/// `VERSION` file: what a build step would leave.
pub fn make_release(dir: &Path, id: &str) {
    let rel = dir.join(id);
    std::fs::create_dir_all(&rel).unwrap();
    std::os::unix::fs::symlink(demo_app_binary(), rel.join("deploykit-demo-app")).unwrap();
    std::fs::write(rel.join("VERSION"), format!("{id}\n")).unwrap();
}

/// Path of the demo-app binary built with this test.
pub fn demo_app_binary() -> &'static str {
    env!("CARGO_BIN_EXE_e2e-demo-app")
}

/// How to start one demo-app instance.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// Listen address; `None` picks a free port.
    pub port: Option<u16>,
    /// `--version`.
    pub version: String,
    /// `--track`.
    pub track: String,
    /// Extra flags.
    pub extra: Vec<String>,
}

impl DemoOpts {
    /// Version `version`, track `stable`, a free port.
    pub fn new(version: &str) -> Self {
        Self {
            port: None,
            version: version.into(),
            track: "stable".into(),
            extra: Vec::new(),
        }
    }
    /// Sets the track.
    pub fn track(mut self, t: &str) -> Self {
        self.track = t.into();
        self
    }
    /// Sets the port.
    pub fn port(mut self, p: u16) -> Self {
        self.port = Some(p);
        self
    }
    /// Adds flags.
    pub fn args(mut self, a: &[&str]) -> Self {
        self.extra.extend(a.iter().map(|s| s.to_string()));
        self
    }
}

/// A running demo-app process; killed on drop.
#[derive(Debug)]
pub struct DemoApp {
    /// The process.
    pub child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its version.
    pub version: String,
}

impl DemoApp {
    /// Starts the demo app and waits until it prints its listen address.
    pub async fn start(opts: DemoOpts) -> DemoApp {
        let listen = format!("127.0.0.1:{}", opts.port.unwrap_or(0));
        let mut cmd = Command::new(demo_app_binary());
        cmd.args([
            "--listen",
            &listen,
            "--version",
            &opts.version,
            "--track",
            &opts.track,
        ])
        .args(&opts.extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn deploykit-demo-app");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = timeout(START_DEADLINE, lines.next_line())
            .await
            .unwrap_or_else(|_| {
                panic!("demo app {opts:?} did not report its address within {START_DEADLINE:?}")
            })
            .expect("read demo app stdout")
            .unwrap_or_else(|| panic!("demo app {opts:?} exited before listening"));
        let addr: SocketAddr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line from demo app: {line:?}"))
            .parse()
            .expect("demo app address");
        // Keep draining stdout so the app never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        DemoApp {
            child,
            addr,
            version: opts.version,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("demo app still running")
    }

    /// `http://addr`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Requests the app is answering now (`http_requests_in_flight` of
    /// its `/metrics`).
    pub async fn in_flight(&self, http: &Http) -> u64 {
        let m = http.get(&self.url("/metrics")).await.expect("GET /metrics").body;
        m.lines()
            .find_map(|l| l.strip_prefix("http_requests_in_flight "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no http_requests_in_flight in /metrics:\n{m}"))
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub async fn stop(mut self) -> std::process::ExitStatus {
        sigterm(self.pid());
        timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("demo app did not exit within 15 s of SIGTERM")
            .expect("wait for demo app")
    }
}

// ---------------------------------------------------------------------------
// HTTP client

/// A small pooled HTTP/1.1 client.
#[derive(Debug, Clone)]
pub struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
}

/// One answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// `x-app-version`, if present.
    pub version: Option<String>,
    /// The body as text.
    pub body: String,
    /// All headers, lowercase names.
    pub headers: BTreeMap<String, String>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

impl Http {
    /// A client with keep-alive connections.
    pub fn new() -> Self {
        Self::with_keep_alive(true)
    }

    /// A client that keeps connections alive (`true`) or opens a new
    /// connection for every request (`false`).
    pub fn with_keep_alive(keep_alive: bool) -> Self {
        Self::build(keep_alive, true)
    }

    /// As [`Http::with_keep_alive`], but a request that could not be
    /// written on a pooled connection the server had closed fails instead
    /// of being resent on a new one (hyper's default): every failure shows.
    pub fn without_retries(keep_alive: bool) -> Self {
        Self::build(keep_alive, false)
    }

    fn build(keep_alive: bool, resend_unsent: bool) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(Duration::from_secs(5));
        builder.retry_canceled_requests(resend_unsent);
        if !keep_alive {
            builder.pool_max_idle_per_host(0);
        }
        Self {
            client: builder.build(connector),
        }
    }

    /// GET `url` with a 10 s bound; `Err` for transport errors.
    pub async fn get(&self, url: &str) -> Result<Answer, String> {
        self.send("GET", url, &[]).await
    }

    /// `method` `url` with extra request `headers` (empty body), 10 s
    /// bound; `Err` for transport errors, whose text keeps hyper's error
    /// kind (`IncompleteMessage`, …) for [`crate::load::closed_before_response`].
    pub async fn send(&self, method: &str, url: &str, headers: &[(&str, &str)]) -> Result<Answer, String> {
        let mut req = hyper::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| format!("bad request {method} {url}: {e}"))?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("{method} {url}: {e:?}"))?;
            let status = resp.status().as_u16();
            let headers: BTreeMap<String, String> = resp
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{method} {url} body: {e}"))?
                .to_bytes();
            Ok(Answer {
                status,
                version: headers.get("x-app-version").cloned(),
                body: String::from_utf8_lossy(&body).into_owned(),
                headers,
            })
        };
        timeout(Duration::from_secs(10), fut)
            .await
            .map_err(|_| format!("{method} {url}: no answer within 10 s"))?
    }

    /// GETs `url` `n` times and counts answers by `x-app-version` (`error:`
    /// plus status or `transport` for failures).
    pub async fn count_versions(&self, url: &str, n: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let key = match self.get(url).await {
                Ok(a) if (200..300).contains(&a.status) => a.version.unwrap_or_else(|| "none".into()),
                Ok(a) => format!("error:{}", a.status),
                Err(_) => "error:transport".into(),
            };
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }
}

/// The share (0.0–1.0) of `key` in `counts`.
pub fn share(counts: &BTreeMap<String, usize>, key: &str) -> f64 {
    let total: usize = counts.values().sum();
    if total == 0 {
        return 0.0;
    }
    counts.get(key).copied().unwrap_or(0) as f64 / total as f64
}

// ---------------------------------------------------------------------------
// nginx

/// A real nginx master started in a temp dir (`-p DIR -c DIR/nginx.conf -e
/// stderr -g 'daemon off;'`); killed on drop.
#[derive(Debug)]
pub struct Nginx {
    /// The master process.
    pub child: Option<Child>,
    /// The nginx binary.
    pub binary: PathBuf,
    /// The prefix dir (config, pid, logs, temp paths).
    pub dir: PathBuf,
    /// The listen port on 127.0.0.1.
    pub port: u16,
    /// Where nginx's stderr goes.
    pub stderr_log: PathBuf,
}

impl Nginx {
    /// `DIR/nginx.conf`.
    pub fn conf(dir: &Path) -> PathBuf {
        dir.join("nginx.conf")
    }
    /// `DIR/nginx.pid`.
    pub fn pid_file(dir: &Path) -> PathBuf {
        dir.join("nginx.pid")
    }
    /// `DIR/upstream.conf`: the include file deploykit owns.
    pub fn upstream_file(dir: &Path) -> PathBuf {
        dir.join("upstream.conf")
    }

    /// Writes `DIR/nginx.conf`: one server on 127.0.0.1:`port` proxying to
    /// the upstream `app` from `DIR/upstream.conf` (plus `DIR/conf.d/*.conf`),
    /// with pid, logs and every temp path under DIR. nginx never retries a
    /// request on another server (`proxy_next_upstream off`).
    pub fn write_config(dir: &Path, port: u16) {
        Self::write_config_with(dir, port, "proxy_next_upstream off;");
    }

    /// [`Nginx::write_config`] for `drain = "upstream-retry"`: a failed
    /// connect is retried on the next server, soon.
    pub fn write_config_retrying(dir: &Path, port: u16) {
        Self::write_config_with(
            dir,
            port,
            "proxy_next_upstream error timeout;\n            proxy_connect_timeout 1s;",
        );
    }

    fn write_config_with(dir: &Path, port: u16, retry: &str) {
        let d = dir.display();
        let conf = format!(
            r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body_temp;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    include {d}/upstream.conf;
    include {d}/conf.d/*.conf;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            {retry}
        }}
    }}
}}
"#
        );
        std::fs::create_dir_all(dir.join("conf.d")).expect("create conf.d");
        std::fs::write(Self::conf(dir), conf).expect("write nginx.conf");
    }

    /// The global arguments every nginx invocation of a test uses.
    pub fn global_args(dir: &Path) -> Vec<String> {
        vec![
            "-p".into(),
            format!("{}/", dir.display()),
            "-c".into(),
            Self::conf(dir).display().to_string(),
            "-e".into(),
            "stderr".into(),
        ]
    }

    /// Starts nginx on an existing `DIR/nginx.conf` (and include) and waits
    /// until it accepts connections on `port`.
    pub async fn start(binary: &Path, dir: &Path, port: u16) -> Nginx {
        Self::start_with(binary, dir, port, "daemon off;").await
    }

    /// [`Nginx::start`] with `globals` (`-g`, e.g. `"daemon off;
    /// master_process off;"`) instead of just `daemon off;`.
    pub async fn start_with(binary: &Path, dir: &Path, port: u16, globals: &str) -> Nginx {
        let stderr_log = dir.join("nginx.stderr");
        let err = std::fs::File::create(&stderr_log).expect("create nginx.stderr");
        let child = Command::new(binary)
            .args(Self::global_args(dir))
            .args(["-g", globals])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn nginx");
        let n = Nginx {
            child: Some(child),
            binary: binary.into(),
            dir: dir.into(),
            port,
            stderr_log,
        };
        let log = n.stderr_log.clone();
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            START_DEADLINE,
            "nginx",
            move || std::fs::read_to_string(&log).unwrap_or_default(),
        )
        .await;
        // The pid file is written by the master before workers accept; an
        // earlier `nginx -t` (the driver's install) leaves it empty.
        let end = Instant::now() + START_DEADLINE;
        while std::fs::read_to_string(Self::pid_file(dir))
            .map(|t| t.trim().is_empty())
            .unwrap_or(true)
        {
            assert!(Instant::now() < end, "nginx wrote no pid file");
            sleep(Duration::from_millis(20)).await;
        }
        n
    }

    /// `http://127.0.0.1:port/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The master pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).expect("nginx running")
    }

    /// What nginx wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            if let Some(pid) = c.id() {
                // The master's SIGKILL leaves workers behind: stop them fast
                // first (SIGTERM to the master = fast shutdown).
                sigterm(pid);
                let end = std::time::Instant::now() + Duration::from_secs(3);
                while Path::new(&format!("/proc/{pid}")).exists()
                    && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .map(|s| !s.contains(") Z "))
                        .unwrap_or(false)
                    && std::time::Instant::now() < end
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        // kill_on_drop SIGKILLs the master if it is still there.
        self.child.take();
    }
}

// ---------------------------------------------------------------------------
// HAProxy

/// A real HAProxy started in a temp dir (`-db -f cfg`, admin socket
/// `DIR/haproxy.sock`); killed on drop.
#[derive(Debug)]
pub struct Haproxy {
    /// The process.
    pub child: Child,
    /// The dir with `haproxy.cfg` and `haproxy.sock`.
    pub dir: PathBuf,
    /// The frontend port on 127.0.0.1.
    pub port: u16,
    /// stderr of HAProxy.
    pub stderr_log: PathBuf,
}

/// One server line of a test HAProxy backend.
#[derive(Debug, Clone)]
pub struct HaServer {
    /// Server name.
    pub name: String,
    /// Address.
    pub addr: SocketAddr,
    /// Initial weight.
    pub weight: u16,
}

impl Haproxy {
    /// `DIR/haproxy.sock`.
    pub fn socket(dir: &Path) -> PathBuf {
        dir.join("haproxy.sock")
    }

    /// Renders a config: frontend on 127.0.0.1:`port`, backend `backend`
    /// (roundrobin) with `servers`.
    pub fn config(dir: &Path, port: u16, backend: &str, servers: &[HaServer]) -> String {
        let mut s = format!(
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
    default_backend {backend}
backend {backend}
    balance roundrobin
    retries 0
"#,
            sock = Self::socket(dir).display()
        );
        for srv in servers {
            s.push_str(&format!(
                "    server {} {} weight {}\n",
                srv.name, srv.addr, srv.weight
            ));
        }
        s
    }

    /// Starts HAProxy with backend `app` holding one server per backend
    /// (named by its id, weight 1), as the driver expects.
    pub async fn start_for(binary: &Path, dir: &Path, port: u16, backends: &[deploykit::Backend]) -> Haproxy {
        let servers: Vec<HaServer> = backends
            .iter()
            .map(|b| HaServer {
                name: b.id.to_string(),
                addr: b.address.to_string().parse().expect("a loopback socket address"),
                weight: 1,
            })
            .collect();
        let cfg = Self::config(dir, port, "app", &servers);
        Self::start(binary, dir, port, &cfg).await
    }

    /// Starts HAProxy with `DIR/haproxy.cfg` holding `config` and waits
    /// until it accepts connections and its socket exists.
    pub async fn start(binary: &Path, dir: &Path, port: u16, config: &str) -> Haproxy {
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, config).expect("write haproxy.cfg");
        let stderr_log = dir.join("haproxy.stderr");
        let err = std::fs::File::create(&stderr_log).expect("create haproxy.stderr");
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn haproxy");
        let log = stderr_log.clone();
        wait_for_port(
            SocketAddr::from(([127, 0, 0, 1], port)),
            START_DEADLINE,
            "haproxy",
            move || std::fs::read_to_string(&log).unwrap_or_default(),
        )
        .await;
        let end = Instant::now() + START_DEADLINE;
        while !Self::socket(dir).exists() {
            assert!(Instant::now() < end, "haproxy created no admin socket");
            sleep(Duration::from_millis(20)).await;
        }
        Haproxy {
            child,
            dir: dir.into(),
            port,
            stderr_log,
        }
    }

    /// `http://127.0.0.1:port/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// What HAProxy wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------
// Fleet helpers

/// A deploykit backend for a demo app on `addr`.
pub fn backend(id: &str, addr: SocketAddr, group: &str) -> deploykit::Backend {
    deploykit::Backend {
        id: deploykit::InstanceId::new(id).expect("instance id"),
        address: deploykit::Address::parse(&addr.to_string()).expect("address"),
        group: deploykit::Group::new(group).expect("group"),
    }
}

/// Live child pids of `parent` (from /proc).
pub fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() != Some(&"Z") && f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Polls `f` every 20 ms until it returns `Some`, or panics with `what`
/// after `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() >= end {
            panic!("{what}: not within {deadline:?}");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// The `deploykit` binary the workspace's tests built beside this one.
/// Cargo gives a package's tests the paths of its own binaries only, so
/// this one is found in the target directory; a missing or stale one fails
/// the test rather than testing old code.
pub(crate) fn deploykit_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join("deploykit");
    let fix = "build it first: `cargo build -p deploykit-cli` (scripts/test does, before this suite)";
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing; {fix}", bin.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let newest = ["deploykit/src", "deploykit-cli/src"]
        .iter()
        .map(|d| newest_file(&root.join(d)))
        .max()
        .expect("sources");
    assert!(
        newest <= built,
        "{} is older than the sources; {fix}",
        bin.display()
    );
    bin
}

/// The newest modification time of a file under `dir`.
fn newest_file(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).expect("read a source directory") {
        let e = e.expect("a directory entry");
        let t = if e.file_type().expect("a file type").is_dir() {
            newest_file(&e.path())
        } else {
            e.metadata()
                .and_then(|m| m.modified())
                .expect("a modification time")
        };
        newest = newest.max(t);
    }
    newest
}
