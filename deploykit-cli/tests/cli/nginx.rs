//! The CLI through a real nginx started in a temp dir: deploys, and
//! recovery after the CLI is killed while an instance is drained.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{local, Env};

/// nginx on PATH, /usr/sbin or /sbin; a missing nginx fails the test, in
/// CI or not.
pub(crate) fn nginx_binary() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin".into(), "/sbin".into()]);
    if let Some(p) = dirs.into_iter().map(|d| d.join("nginx")).find(|p| p.is_file()) {
        return Some(p);
    }
    panic!("nginx is not installed: CLI tests never skip (scripts/test installs it)")
}

/// nginx in `dir` (config, pid, logs, temp paths), killed on drop.
pub(crate) struct Nginx(Child, PathBuf);

impl Nginx {
    /// `DIR/nginx.conf`: listens on `port` and proxies to upstream `app`,
    /// read from `DIR/upstream.conf` (deploykit's file) when `include` is
    /// true, or from an inline block naming `servers` when it is not (a
    /// config that never reads deploykit's file).
    fn write_conf(dir: &Path, port: u16, include: bool, servers: &[u16]) {
        let d = dir.display();
        let upstream = if include {
            format!("include {d}/upstream.conf;")
        } else {
            let list: String = servers
                .iter()
                .map(|p| format!(" server 127.0.0.1:{p};"))
                .collect();
            format!("upstream app {{{list} }}")
        };
        std::fs::write(
            dir.join("nginx.conf"),
            format!(
                "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 64; }}\nhttp {{\n  access_log off;\n\
                 client_body_temp_path {d}/cb; proxy_temp_path {d}/px; fastcgi_temp_path {d}/fc;\n\
                 uwsgi_temp_path {d}/uw; scgi_temp_path {d}/sc;\n  {upstream}\n\
                 server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://app; }} }}\n}}\n"
            ),
        )
        .unwrap();
    }

    /// Writes the config and an upstream file with `servers`, starts nginx.
    pub(crate) fn start(binary: &Path, dir: &Path, port: u16, servers: &[u16]) -> Self {
        Self::write_conf(dir, port, true, servers);
        let list: String = servers
            .iter()
            .map(|p| format!("  server 127.0.0.1:{p};\n"))
            .collect();
        std::fs::write(dir.join("upstream.conf"), format!("upstream app {{\n{list}}}\n")).unwrap();
        Self::launch(binary, dir, port)
    }

    /// Starts nginx on the files already in `dir`.
    fn launch(binary: &Path, dir: &Path, port: u16) -> Self {
        let d = dir.display();
        let child = Command::new(binary)
            .args([
                "-p",
                &format!("{d}/"),
                "-c",
                &format!("{d}/nginx.conf"),
                "-e",
                "stderr",
                "-g",
                "daemon off;",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let end = Instant::now() + Duration::from_secs(20);
        // `nginx -t` leaves an empty pid file behind: wait for the pid.
        let has_pid = || {
            std::fs::read_to_string(dir.join("nginx.pid"))
                .map(|t| !t.trim().is_empty())
                .unwrap_or(false)
        };
        while !has_pid() || std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "nginx did not start: {}",
                std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx(child, dir.to_path_buf())
    }

    pub(crate) fn upstream(&self) -> String {
        std::fs::read_to_string(self.1.join("upstream.conf")).unwrap()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM to the master is a fast shutdown that takes the workers.
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end && self.0.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> u16 {
    crate::util::free_port()
}

/// `local(2, extra)` on ports `base`+1 and `base`+2, with the nginx load
/// balancer of `dir` swapped in.
fn nginx_config(bin: &Path, dir: &Path, base: u16, extra: &str) -> String {
    let d = dir.display();
    local(2, extra)
        .replace("18181", &(base + 1).to_string())
        .replace("18182", &(base + 2).to_string())
        .replace(
        "[load_balancer]\nkind = \"simulated\"\n",
        &format!(
            "[load_balancer]\nkind = \"nginx\"\ninclude_file = \"{d}/upstream.conf\"\nupstream = \"app\"\n\
             nginx_binary = \"{}\"\nnginx_config = \"{d}/nginx.conf\"\nnginx_prefix = \"{d}\"\npid_file = \"{d}/nginx.pid\"\n",
            bin.display()
        ),
    )
}

#[test]
fn setup_writes_the_missing_include_file_then_checks_nginx() {
    let Some(bin) = nginx_binary() else { return };
    let ngx_dir = tempfile::tempdir().unwrap();
    let dir = ngx_dir.path();
    let port = free_port();
    let env = Env::new(&nginx_config(&bin, dir, 18180, ""));
    Nginx::write_conf(dir, port, true, &[]);
    let include = dir.join("upstream.conf");
    assert!(!include.exists());

    // nginx cannot start without its include; setup writes it (checked
    // with `nginx -t`) and says nginx is not running yet.
    let (code, out, err) = env.run(&["setup"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("written with 2 server(s) in rotation"), "{out}");
    assert!(
        err.contains("load balancer nginx is not ready") && err.contains("not running"),
        "{err}"
    );
    let text = std::fs::read_to_string(&include).unwrap();
    assert!(text.contains("Managed by deploykit"), "{text}");
    assert!(
        text.contains("127.0.0.1:18181") && text.contains("127.0.0.1:18182"),
        "{text}"
    );
    assert!(!text.contains(" down"), "every server in rotation:\n{text}");

    let _nginx = Nginx::launch(&bin, dir, port);
    let out = env.ok(&["setup"], 0);
    assert!(out.contains("exists, left as it is"), "{out}");
    assert!(out.contains("load balancer nginx: ready"), "{out}");
    assert_eq!(
        std::fs::read_to_string(&include).unwrap(),
        text,
        "an existing file is left alone"
    );
}

/// One `GET /` through nginx on `port`: the body.
fn get(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// A fresh setup renders only what can serve: a canary-shaped strategy's
/// canary group (stopped between deployments) and blue-green's idle
/// environment are `down` in the first file nginx reads, so no request
/// reaches them before the first deployment.
#[test]
fn setup_keeps_the_canary_and_the_idle_environment_out_of_rotation() {
    let Some(bin) = nginx_binary() else { return };
    for (kind, serving, out) in [("canary", "stable", "canary"), ("blue-green", "blue", "green")] {
        let ngx_dir = tempfile::tempdir().unwrap();
        let dir = ngx_dir.path();
        let d = dir.display();
        // Both answer, so a request nginx sent to the one left out would show.
        let port_of = |url: String| url.rsplit(':').next().unwrap().parse::<u16>().unwrap();
        let serving_port = port_of(crate::util::answering(match serving {
            "stable" => "\"stable\"",
            _ => "\"blue\"",
        }));
        let out_port = port_of(crate::util::answering(match out {
            "canary" => "\"canary\"",
            _ => "\"green\"",
        }));
        let cfg = format!(
            "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
             [[instances]]\nid = \"{serving}-1\"\naddress = \"127.0.0.1:{serving_port}\"\ngroup = \"{serving}\"\n\n\
             [[instances]]\nid = \"{out}-1\"\naddress = \"127.0.0.1:{out_port}\"\ngroup = \"{out}\"\n\n\
             [load_balancer]\nkind = \"nginx\"\ninclude_file = \"{d}/upstream.conf\"\nupstream = \"app\"\n\
             nginx_binary = \"{}\"\nnginx_config = \"{d}/nginx.conf\"\nnginx_prefix = \"{d}\"\npid_file = \"{d}/nginx.pid\"\n\n\
             [metrics]\nprometheus = \"http://127.0.0.1:9\"\n\n[strategy]\nkind = \"{kind}\"\n",
            bin.display()
        );
        let env = Env::new(&cfg);
        let port = free_port();
        Nginx::write_conf(dir, port, true, &[]);
        let (code, stdout, err) = env.run(&["setup"]);
        assert_eq!(code, 3, "{kind}: written, nginx not running yet\n{stdout}{err}");
        assert!(
            stdout.contains(&format!(
                "1 of 2 server(s) in rotation, group {out} out until a deployment"
            )),
            "{kind}: {stdout}"
        );
        let text = std::fs::read_to_string(dir.join("upstream.conf")).unwrap();
        let line = |p: u16| {
            text.lines()
                .find(|l| l.contains(&format!("127.0.0.1:{p}")))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(line(out_port).contains(" down"), "{kind}: {out} is out:\n{text}");
        assert!(
            !line(serving_port).contains(" down"),
            "{kind}: {serving} serves:\n{text}"
        );

        let _nginx = Nginx::launch(&bin, dir, port);
        let again = env.ok(&["setup"], 0);
        assert!(again.contains("exists, left as it is"), "{again}");
        let answers: Vec<String> = (0..40).map(|_| get(port)).collect();
        assert!(
            answers.iter().all(|a| *a == format!("\"{serving}\"")),
            "{kind}: every request reaches {serving}, none {out}: {answers:?}"
        );
    }
}

#[test]
fn the_upstream_defaults_to_app() {
    let Some(bin) = nginx_binary() else { return };
    let ngx_dir = tempfile::tempdir().unwrap();
    let dir = ngx_dir.path();
    let cfg = nginx_config(&bin, dir, 18180, "");
    assert!(cfg.contains("upstream = \"app\"\n"));
    let env = Env::new(&cfg.replace("upstream = \"app\"\n", ""));
    env.ok(&["validate"], 0);
    Nginx::write_conf(dir, free_port(), true, &[]);
    let (code, out, err) = env.run(&["setup"]);
    assert_eq!(code, 3, "written, but nginx is not running:\n{out}{err}");
    let text = std::fs::read_to_string(dir.join("upstream.conf")).unwrap();
    assert!(text.contains("upstream app {"), "{text}");
}

#[test]
fn a_deploy_the_preflight_refuses_touches_nothing_and_leaves_no_journal() {
    let Some(bin) = nginx_binary() else { return };
    let ngx_dir = tempfile::tempdir().unwrap();
    let dir = ngx_dir.path();
    let port = free_port();
    let cfg = nginx_config(&bin, dir, 18380, "");
    let env = Env::new(&cfg);
    env.releases(&["v1"]);
    let _nginx = Nginx::start(&bin, dir, port, &[18381, 18382]);
    // nginx's config on disk no longer reads deploykit's file: changing it
    // would route nothing.
    Nginx::write_conf(dir, port, false, &[18381, 18382]);
    let before = std::fs::read_to_string(dir.join("upstream.conf")).unwrap();

    let (code, out, err) = env.run(&["deploy", "v1"]);
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        err.contains("failed its preflight check, so nothing was touched")
            && err.contains("does not include the upstream file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("upstream.conf")).unwrap(),
        before
    );
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id), None, "{id} untouched");
        assert!(!env.local_running(id), "{id} untouched");
    }
    assert_eq!(env.journal_count(), 0, "no journal left behind");
    let status = env.ok(&["status"], 0);
    assert!(!status.contains("interrupted"), "{status}");

    // Fixed: the same deployment runs.
    Nginx::write_conf(dir, port, true, &[]);
    env.ok(&["-q", "deploy", "v1"], 0);
    assert_eq!(env.local_release("web-1").as_deref(), Some("v1"));
}

/// A tiny HTTP server (perl is part of every Debian system) that answers
/// every request with the release it runs from: the name of its working
/// directory, the release directory.
pub(crate) const SERVER_PL: &str = r#"use strict; use IO::Socket::INET; use Cwd;
my $release = (split m{/}, getcwd())[-1];
my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $ARGV[0], Listen => 64, ReuseAddr => 1)
    or die "listen on $ARGV[0]: $!";
$SIG{TERM} = sub { exit 0 };
while (my $c = $s->accept) {
    while (my $l = <$c>) { last if $l =~ /^\r?\n$/ }
    print $c "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n$release\n";
    close $c;
}
"#;

/// The releases answering `n` requests through nginx on `port`.
pub(crate) fn served_through(port: u16, n: usize) -> std::collections::BTreeMap<String, usize> {
    use std::io::{Read, Write};
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..n {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\nHost: app\r\n\r\n").unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let key = if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") {
            body.trim().to_string()
        } else {
            head.lines().next().unwrap_or("no answer").to_string()
        };
        *seen.entry(key).or_insert(0) += 1;
    }
    seen
}

#[test]
fn deploy_crash_and_rollback_through_real_nginx() {
    let Some(bin) = nginx_binary() else { return };
    let ngx_dir = tempfile::tempdir().unwrap();
    let d = ngx_dir.path().display().to_string();
    let extra = "[strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"50ms\"\ndrain_timeout = \"2s\"\n\n";
    // `local(2, …)` serves on 127.0.0.1:18181-18182.
    // Instances that listen and say which release answers, probed over HTTP.
    let cfg = nginx_config(&bin, ngx_dir.path(), 18180, extra).replace(
        "command = [\"sleep\", \"600\"]\nhealth = \"service\"",
        "command = [\"perl\", \"server.pl\", \"{port}\"]\nhealth = \"http\"",
    );
    assert!(cfg.contains("server.pl"), "{cfg}");
    let env = Env::new(&cfg);
    env.releases(&["v1", "v2"]);
    for r in ["v1", "v2"] {
        std::fs::write(env.path().join("builds").join(r).join("server.pl"), SERVER_PL).unwrap();
    }
    let port = free_port();
    let nginx = Nginx::start(&bin, ngx_dir.path(), port, &[18181, 18182]);
    env.ok(&["deploy", "v1"], 0);
    assert_eq!(served_through(port, 10).get("v1"), Some(&10));
    env.ok(&["deploy", "v2"], 0);
    assert_eq!(served_through(port, 10).get("v2"), Some(&10));
    let text = nginx.upstream();
    assert!(
        text.contains("Managed by deploykit"),
        "the driver renders the file: {text}"
    );
    assert!(
        text.contains("127.0.0.1:18181") && text.contains("127.0.0.1:18182"),
        "{text}"
    );
    assert!(
        !text.contains(" down"),
        "every server is back in rotation:\n{text}"
    );
    // Kill the CLI right after web-1's drain was recorded: nginx has it
    // down; the rollback must bring it back.
    let journal = env.newest_journal();
    let n = journal
        .iter()
        .position(|r| r["event"] == "step_finished" && r["step"] == "stop" && r["instance"] == "web-1")
        .expect("a stop of web-1")
        + 1;
    let out = env
        .cmd()
        .env("DEPLOYKIT_TEST_ABORT_AFTER_RECORD", n.to_string())
        .args(["-q", "deploy", "v1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text = nginx.upstream();
    assert!(
        text.contains("127.0.0.1:18181 down"),
        "web-1 is out of rotation after the crash:\n{text}"
    );
    assert!(!env.local_running("web-1"), "web-1 was stopped before the crash");
    env.ok(&["-q", "rollback"], 0);
    let text = nginx.upstream();
    assert!(!text.contains(" down"), "the rollback put web-1 back:\n{text}");
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id).as_deref(), Some("v2"), "{id}");
        assert!(env.local_running(id), "{id}");
    }
    // What clients get through nginx, not only what deploykit reports.
    let seen = served_through(port, 10);
    assert_eq!(seen.get("v2"), Some(&10), "{seen:?}");
    let status = Command::new(&bin)
        .args([
            "-p",
            &format!("{d}/"),
            "-c",
            &format!("{d}/nginx.conf"),
            "-e",
            "stderr",
            "-t",
        ])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&status.stderr)
    );
}

#[test]
fn crash_matrix_through_real_nginx() {
    let Some(bin) = nginx_binary() else { return };
    let ngx_dir = tempfile::tempdir().unwrap();
    let extra = "[strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"50ms\"\ndrain_timeout = \"2s\"\n\n";
    let cfg = nginx_config(&bin, ngx_dir.path(), 18280, extra).replace(
        "command = [\"sleep\", \"600\"]\nhealth = \"service\"",
        "command = [\"perl\", \"server.pl\", \"{port}\"]\nhealth = \"http\"",
    );
    let env = Env::new(&cfg);
    env.releases(&["v1", "v2"]);
    for r in ["v1", "v2"] {
        std::fs::write(env.path().join("builds").join(r).join("server.pl"), SERVER_PL).unwrap();
    }
    let port = free_port();
    let nginx = Nginx::start(&bin, ngx_dir.path(), port, &[18281, 18282]);
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    let total = env.newest_journal().len();
    let mut current = "v2";
    // Every third record (each nginx change is a confirmed reload; the
    // full matrix runs on the simulated load balancer in crash.rs), resuming
    // and rolling back in turn.
    for (k, n) in (1..total).step_by(3).enumerate() {
        let target = if current == "v1" { "v2" } else { "v1" };
        let out = env
            .cmd()
            .env("DEPLOYKIT_TEST_ABORT_AFTER_RECORD", n.to_string())
            .args(["-q", "deploy", target])
            .output()
            .unwrap();
        assert!(!out.status.success(), "record {n}: not interrupted");
        let expect = if k % 2 == 0 {
            env.ok(&["-q", "deploy", "--resume"], 0);
            target
        } else {
            env.ok(&["-q", "rollback"], 0);
            current
        };
        let text = nginx.upstream();
        assert!(
            !text.contains(" down"),
            "record {n}: a server left out of rotation:\n{text}"
        );
        for id in ["web-1", "web-2"] {
            assert_eq!(env.local_release(id).as_deref(), Some(expect), "record {n}: {id}");
            assert!(env.local_running(id), "record {n}: {id} not running");
        }
        let seen = served_through(port, 6);
        assert_eq!(seen.get(expect), Some(&6), "record {n}: clients got {seen:?}");
        current = expect;
    }
}

/// A rollback is not refused by a failing preflight: with nginx's include
/// file deleted (nginx still runs the config it loaded), the rollback warns,
/// writes the file again from its state on its first change, and returns
/// the fleet.
#[test]
fn a_rollback_goes_on_when_the_preflight_fails_and_says_why() {
    let Some(bin) = nginx_binary() else { return };
    let ngx_dir = tempfile::tempdir().unwrap();
    let dir = ngx_dir.path();
    let port = free_port();
    let cfg = nginx_config(&bin, dir, 18480, "");
    let env = Env::new(&cfg);
    env.releases(&["v1", "v2"]);
    let _nginx = Nginx::start(&bin, dir, port, &[18481, 18482]);
    env.ok(&["-q", "deploy", "v1"], 0);
    env.ok(&["-q", "deploy", "v2"], 0);
    std::fs::remove_file(dir.join("upstream.conf")).unwrap();

    // A deployment is refused …
    let (code, _, err) = env.run(&["deploy", "v1"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("does not exist"), "{err}");
    // … a rollback is not.
    let (code, out, err) = env.run(&["rollback"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("failed its preflight check; going on because this run restores")
            && out.contains("does not exist"),
        "the warning is shown:\n{out}"
    );
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id).as_deref(), Some("v1"), "{id}");
        assert!(env.local_running(id), "{id}");
    }
    let text = std::fs::read_to_string(dir.join("upstream.conf")).expect("written again");
    assert!(
        text.contains("127.0.0.1:18481") && text.contains("127.0.0.1:18482"),
        "{text}"
    );
    assert!(!text.contains(" down"), "{text}");
}

/// A rollback never writes a file nginx does not read: with
/// `include_file` pointed at a copy of a file nginx does not include, the
/// rollback says so and stops before touching an instance or the file.
#[test]
fn a_rollback_refuses_an_include_file_nginx_does_not_read() {
    let Some(bin) = nginx_binary() else { return };
    let ngx_dir = tempfile::tempdir().unwrap();
    let dir = ngx_dir.path();
    let port = free_port();
    let cfg = nginx_config(&bin, dir, 18580, "");
    let env = Env::new(&cfg);
    env.releases(&["v1", "v2"]);
    let _nginx = Nginx::start(&bin, dir, port, &[18581, 18582]);
    env.ok(&["-q", "deploy", "v1"], 0);
    env.ok(&["-q", "deploy", "v2"], 0);
    let bystander = dir.join("passwd");
    let content = "root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/usr/sbin/nologin\n";
    std::fs::write(&bystander, content).unwrap();
    let upstream = dir.join("upstream.conf");
    std::fs::write(
        env.path().join("deploykit.toml"),
        cfg.replace(&upstream.display().to_string(), &bystander.display().to_string()),
    )
    .unwrap();
    let journals = env.journal_count();

    let (code, out, err) = env.run(&["rollback"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("nothing was touched") && err.contains("does not include the upstream file"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&bystander).unwrap(),
        content,
        "the file was written"
    );
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id).as_deref(), Some("v2"), "{id} was touched");
        assert!(env.local_running(id), "{id} was stopped");
    }
    assert_eq!(env.journal_count(), journals, "a refused rollback left a journal");
}
