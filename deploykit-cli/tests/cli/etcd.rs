//! The etcd state backend against a real 3-member etcd cluster on loopback,
//! started by each test in a temp dir: two `deploykit` processes with their
//! own working directories (two "machines") share one fleet of local
//! instances and one etcd. Lock contention and `--lock-wait`, a holder
//! killed with `kill -9` and resumed from the other machine, a holder
//! stalled past its lease (`SIGSTOP`) that can then write nothing (and is
//! rolled back from the other machine), one
//! member killed mid-deployment, and a lost quorum.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// etcd, or the test fails (CI installs it; elsewhere `apt-get install
/// etcd-server etcd-client`).
fn etcd_bin(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} is not installed: apt-get install etcd-server etcd-client (scripts/test does)");
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

/// A 3-member etcd cluster on 127.0.0.1, stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    members: Vec<Member>,
    /// More `etcd` flags for every member.
    extra: Vec<String>,
    /// The certificates when clients must use TLS and a certificate.
    tls: Option<Certs>,
}

impl Cluster {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Self {
        Self::start_inner(extra, None)
    }

    /// A cluster whose client endpoints are https:// and ask every client
    /// for a certificate `certs` signed.
    fn start_tls(certs: Certs) -> Self {
        let c = &certs;
        let extra = [
            "--cert-file",
            &c.path("server.pem"),
            "--key-file",
            &c.path("server.key"),
            "--client-cert-auth",
            "--trusted-ca-file",
            &c.path("ca.pem"),
        ]
        .map(str::to_string);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        Self::start_inner(&extra, Some(certs))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn start_inner(extra: &[&str], tls: Option<Certs>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ports = crate::util::free_ports(6);
        let members: Vec<Member> = (0..3)
            .map(|n| Member {
                name: format!("m{}", n + 1),
                client: ports[2 * n],
                peer: ports[2 * n + 1],
                child: None,
            })
            .collect();
        let mut c = Self {
            dir,
            members,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
        };
        for i in 0..3 {
            c.start_member(i);
        }
        c.wait_healthy();
        c
    }

    fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect();
        let m = &self.members[i];
        let scheme = self.scheme();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .unwrap();
        let child = Command::new(etcd_bin("etcd"))
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &self.dir.path().join(&m.name).display().to_string(),
                "--listen-client-urls",
                &format!("{scheme}://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("{scheme}://127.0.0.1:{}", m.client),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-token",
                "deploykit-test",
                "--initial-cluster-state",
                "new",
                // Fast elections: a test waits for a leader in well under a second.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .args(&self.extra)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://127.0.0.1:{}", self.scheme(), m.client))
            .collect()
    }

    fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(etcd_bin("etcdctl"));
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg("--command-timeout=2s");
        if let Some(c) = &self.tls {
            cmd.arg(format!("--cacert={}", c.path("ca.pem")))
                .arg(format!("--cert={}", c.path("client.pem")))
                .arg(format!("--key={}", c.path("client.key")));
        }
        cmd.args(args).output().expect("run etcdctl")
    }

    /// Waits (at most 30 s) until the cluster commits a write.
    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.etcdctl(&["put", "/ready", "yes"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not come up: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// How many keys are under `prefix`.
    fn count(&self, prefix: &str) -> u64 {
        let out = self.etcdctl(&["get", prefix, "--prefix", "--keys-only"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count() as u64
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let text =
                std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name))).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("--- {} (last lines)\n", m.name));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}

/// One fleet of local instances (shared directories) and two machines,
/// each a working directory with its own configuration and state directory.
struct Fleet {
    shared: tempfile::TempDir,
    machines: [tempfile::TempDir; 2],
    ids: Vec<String>,
}

const LOCK_TTL: &str = "2s";

impl Fleet {
    fn new(cluster: &Cluster, instances: usize) -> Self {
        Self::with_endpoints(&cluster.endpoints(), instances)
    }

    /// A fleet whose configuration lists `endpoints` as the etcd members.
    fn with_endpoints(endpoints: &[String], instances: usize) -> Self {
        Self::with_state(endpoints, instances, "")
    }

    /// Also with the lines `state` in `[state]`.
    fn with_state(endpoints: &[String], instances: usize, state: &str) -> Self {
        let shared = tempfile::tempdir().unwrap();
        for r in ["v1", "v2", "v3"] {
            let d = shared.path().join("builds").join(r);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("VERSION"), r).unwrap();
        }
        let ids: Vec<String> = (1..=instances).map(|i| format!("web-{i}")).collect();
        let mut cfg = format!(
            "app = \"shop\"\nreleases = \"{0}/builds\"\n\n[instance_defaults]\nroot = \"{0}/instances/{{id}}\"\n\
             command = [\"sleep\", \"600\"]\nhealth = \"service\"\nstop_grace = \"2s\"\n\n",
            shared.path().display()
        );
        for (n, id) in ids.iter().enumerate() {
            cfg.push_str(&format!(
                "[[instances]]\nid = \"{id}\"\naddress = \"127.0.0.1:{}\"\n\n",
                18480 + n
            ));
        }
        let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
        cfg.push_str(&format!(
            "[state]\nbackend = \"etcd\"\nendpoints = [{}]\nlock_ttl = \"{LOCK_TTL}\"\nrequest_timeout = \"1s\"\n{state}\n\
             [strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"600ms\"\ndrain_timeout = \"1s\"\n\n\
             [timeouts]\ndrain_poll = \"50ms\"\n",
            endpoints.join(", ")
        ));
        let machines = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        for m in &machines {
            std::fs::write(m.path().join("deploykit.toml"), &cfg).unwrap();
        }
        Self {
            shared,
            machines,
            ids,
        }
    }

    fn cmd(&self, machine: usize) -> Command {
        let mut c = Command::new(assert_cmd::cargo::cargo_bin("deploykit"));
        c.current_dir(self.machines[machine].path())
            .env_remove("RUST_LOG")
            .env_remove("DEPLOYKIT_TEST_ABORT_AFTER_RECORD")
            .env_remove("DEPLOYKIT_CONFIG");
        c
    }

    /// Runs `deploykit args…` on `machine`: (exit code, stdout, stderr),
    /// bounded by 120 s.
    fn run(&self, machine: usize, args: &[&str]) -> (i32, String, String) {
        let child = self
            .cmd(machine)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_bounded(child, Duration::from_secs(120), args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, machine: usize, args: &[&str]) -> String {
        let (code, out, err) = self.run(machine, args);
        assert_eq!(
            code, 0,
            "deploykit {args:?} on machine {machine}: exit {code}\n{out}\n{err}"
        );
        out
    }

    fn spawn(&self, machine: usize, args: &[&str]) -> Child {
        self.cmd(machine)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// The release `id`'s `current` symlink points at.
    fn release(&self, id: &str) -> Option<String> {
        let link = std::fs::read_link(self.shared.path().join("instances").join(id).join("current")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    /// Waits (at most 60 s) until `n` instances run `release`; `child` must
    /// not end before.
    fn wait_for_instances(&self, child: &mut Child, release: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let done = self
                .ids
                .iter()
                .filter(|id| self.release(id).as_deref() == Some(release))
                .count();
            if done >= n {
                return;
            }
            if let Ok(Some(s)) = child.try_wait() {
                panic!("the deployment ended ({s}) before {n} instance(s) ran {release}");
            }
            assert!(Instant::now() < deadline, "{n} instance(s) never ran {release}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn assert_fleet_on(&self, release: &str) {
        for id in &self.ids {
            assert_eq!(self.release(id).as_deref(), Some(release), "{id}");
            let pid = std::fs::read_to_string(self.shared.path().join("instances").join(id).join("app.pid"))
                .unwrap_or_else(|e| panic!("{id}: no pid file: {e}"));
            let pid = pid.split_whitespace().next().unwrap();
            assert!(Path::new(&format!("/proc/{pid}")).exists(), "{id} is not running");
        }
    }

    fn status(&self, machine: usize) -> Value {
        serde_json::from_str(self.ok(machine, &["--json", "status"]).trim()).unwrap()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for id in &self.ids {
            let p = self.shared.path().join("instances").join(id).join("app.pid");
            if let Ok(text) = std::fs::read_to_string(p) {
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

fn wait_bounded(mut child: Child, bound: Duration, what: &[&str]) -> std::process::Output {
    let deadline = Instant::now() + bound;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("deploykit {what:?} did not end within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
}

#[test]
fn a_second_machine_is_refused_naming_the_holder_waits_with_lock_wait_and_resumes_after_kill_9() {
    let cluster = Cluster::start();
    let fleet = Fleet::new(&cluster, 4);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    fleet.assert_fleet_on("v1");

    // Machine 0 deploys v2; machine 1 sees it, is refused naming it, and
    // cannot start another deployment.
    let mut holder = fleet.spawn(0, &["-q", "deploy", "v2"]);
    fleet.wait_for_instances(&mut holder, "v2", 1);
    let s = fleet.status(1);
    assert_eq!(s["deployment"]["history"]["outcome"], "in_progress", "{s}");
    assert_eq!(s["lock"]["pid"], holder.id(), "{s}");
    let (code, _, err) = fleet.run(1, &["deploy", "v3"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("holds the lock")
            && err.contains(&format!("pid {}", holder.id()))
            && err.contains("deploy v2"),
        "{err}"
    );

    // kill -9: the lease expires within its TTL, and machine 1, queued
    // behind it with --lock-wait, resumes and finishes.
    signal(&holder, nix::sys::signal::Signal::SIGKILL);
    let _ = holder.wait();
    assert_ne!(
        fleet
            .ids
            .iter()
            .filter(|id| fleet.release(id).as_deref() == Some("v2"))
            .count(),
        4
    );
    let (code, out, err) = fleet.run(1, &["--lock-wait", "30s", "deploy", "--resume"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        err.contains("waiting for the lock") && err.contains("deploy v2"),
        "{err}"
    );
    assert!(err.contains("died without releasing it"), "{err}");
    fleet.assert_fleet_on("v2");

    // Both machines read one history: the interrupted run and its resume.
    for m in [0, 1] {
        let out = fleet.ok(m, &["--json", "history"]);
        let kinds: Vec<(String, String)> = out
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .map(|v| {
                (
                    v["kind"].as_str().unwrap().to_string(),
                    v["outcome"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("deploy".into(), "succeeded".into()),
                ("deploy".into(), "interrupted".into()),
                ("resume".into(), "succeeded".into())
            ],
            "machine {m}"
        );
    }
    assert!(fleet.status(0)["lock"].is_null());
}

#[test]
fn a_holder_stalled_past_its_lease_can_write_nothing_and_says_so() {
    let cluster = Cluster::start();
    let fleet = Fleet::new(&cluster, 4);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    let mut holder = fleet.spawn(0, &["-q", "deploy", "v2"]);
    fleet.wait_for_instances(&mut holder, "v2", 1);
    signal(&holder, nix::sys::signal::Signal::SIGSTOP);
    // A request sent just before the stop may still land.
    std::thread::sleep(Duration::from_millis(300));
    let records = cluster.count("/deploykit/shop/records/");
    // The lease expires: machine 1 sees no holder and an interrupted run.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fleet.status(1)["lock"].is_null() {
        assert!(
            Instant::now() < deadline,
            "the stalled holder's lease never expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fleet.status(1)["deployment"]["history"]["outcome"], "interrupted");
    signal(&holder, nix::sys::signal::Signal::SIGCONT);
    let out = wait_bounded(holder, Duration::from_secs(60), &["deploy", "v2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("lost the deployment lock") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        cluster.count("/deploykit/shop/records/"),
        records,
        "the stalled holder wrote journal records after its lease expired:\n{err}"
    );
    // The other machine rolls it back: the fleet returns to v1.
    fleet.ok(1, &["-q", "rollback"]);
    fleet.assert_fleet_on("v1");
}

#[test]
fn a_member_lost_mid_deployment_is_survived_and_a_lost_quorum_stops_the_run_until_it_returns() {
    let mut cluster = Cluster::start();
    let fleet = Fleet::new(&cluster, 4);
    fleet.ok(0, &["-q", "deploy", "v1"]);

    // One member of three killed: the run goes on and finishes.
    let mut run = fleet.spawn(0, &["-q", "deploy", "v2"]);
    fleet.wait_for_instances(&mut run, "v2", 1);
    cluster.kill_member(0);
    let out = wait_bounded(run, Duration::from_secs(90), &["deploy", "v2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.assert_fleet_on("v2");

    // A second member killed: no quorum. The run stops without touching
    // anything more, and says so.
    let mut run = fleet.spawn(0, &["-q", "deploy", "v3"]);
    fleet.wait_for_instances(&mut run, "v3", 1);
    cluster.kill_member(1);
    let out = wait_bounded(run, Duration::from_secs(90), &["deploy", "v3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("lost the deployment lock"), "{err}");
    let on_v3 = fleet
        .ids
        .iter()
        .filter(|id| fleet.release(id).as_deref() == Some("v3"))
        .count();
    assert!(
        (1..4).contains(&on_v3),
        "{on_v3} instance(s) on v3 after the stop"
    );

    // Quorum back: the other machine resumes and finishes.
    cluster.start_member(0);
    cluster.start_member(1);
    cluster.wait_healthy();
    let (code, out, err) = fleet.run(1, &["--lock-wait", "30s", "deploy", "--resume"]);
    assert_eq!(code, 0, "{out}\n{err}\n{}", cluster.logs());
    fleet.assert_fleet_on("v3");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, and a second CA that signed nothing etcd trusts; made with
/// `openssl` in a temp dir for each test.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .current_dir(dir.path())
                .args(args)
                .output()
                .expect("run openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (k, pem, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=deploykit test {ca}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(key);
            args.extend([
                "-keyout",
                &k,
                "-out",
                &pem,
                "-days",
                "2",
                "-subj",
                &subj,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            openssl(&args);
        }
        for (name, usage) in [("server", "serverAuth,clientAuth"), ("client", "clientAuth")] {
            let mut args = vec!["req"];
            args.extend(key);
            let (k, csr, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("/CN=deploykit test {name}"),
            );
            args.extend(["-keyout", &k, "-out", &csr, "-subj", &subj]);
            openssl(&args);
            let ext = format!("{name}.ext");
            std::fs::write(
                dir.path().join(&ext),
                format!(
                    "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
                     keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
                ),
            )
            .unwrap();
            openssl(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.pem"),
            ]);
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[test]
fn over_tls_with_a_client_certificate_and_refused_without_one_or_with_another_ca() {
    let certs = Certs::new();
    let state = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        certs.path("ca.pem"),
        certs.path("client.pem"),
        certs.path("client.key")
    );
    let cluster = Cluster::start_tls(certs);
    let endpoints = cluster.endpoints();
    assert!(endpoints.iter().all(|e| e.starts_with("https://")));
    let fleet = Fleet::with_state(&endpoints, 2, &state);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    fleet.assert_fleet_on("v1");
    // The other machine reads the shared history over TLS too.
    let history = crate::util::json_lines(&fleet.ok(1, &["--json", "history"]));
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["outcome"], "succeeded", "{history:?}");
    assert!(cluster.count("/deploykit/shop/journals/") == 1);

    let certs = cluster.tls.as_ref().unwrap();
    let config = fleet.machines[1].path().join("deploykit.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    let refused = |what: &str, text: String, parts: &[&str]| {
        std::fs::write(&config, text).unwrap();
        let (code, out, err) = fleet.run(1, &["-q", "deploy", "v2"]);
        assert_eq!(code, 3, "{what}: {out}\n{err}");
        crate::util::assert_has(&err, parts);
        assert!(!err.contains("Error(") && !err.contains("(()"), "{what}: {err}");
        assert!(
            fleet
                .ids
                .iter()
                .all(|id| fleet.release(id).as_deref() == Some("v1")),
            "{what}: an instance left v1"
        );
    };
    // No client certificate: etcd refuses the connection (as an alert, or
    // by closing it under the first request).
    refused(
        "no client certificate",
        good.replace(&format!("cert_file = \"{}\"\n", certs.path("client.pem")), "")
            .replace(&format!("key_file = \"{}\"\n", certs.path("client.key")), ""),
        &["etcd at https://127.0.0.1:"],
    );
    // Another CA: the members' certificates are not trusted.
    refused(
        "another CA",
        good.replace(&certs.path("ca.pem"), &certs.path("other-ca.pem")),
        &["etcd at https://127.0.0.1:", "certificate", "state.ca_file"],
    );
    std::fs::write(&config, &good).unwrap();
    assert_eq!(cluster.count("/deploykit/shop/journals/"), 1);

    // A key file that holds no key: exit 2 naming the key, before the
    // state is touched.
    std::fs::write(
        &config,
        good.replace(&certs.path("client.key"), &certs.path("client.pem")),
    )
    .unwrap();
    let (code, _, err) = fleet.run(1, &["validate"]);
    assert_eq!(code, 2, "{err}");
    crate::util::assert_has(&err, &["state.key_file", "client.pem", "no PEM private key"]);
}

/// A member that takes connections and never answers, as a member does
/// while it restarts or its cluster elects a leader.
fn hung_member() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_member_that_hangs_costs_one_attempt_not_the_command() {
    let cluster = Cluster::start();
    // Listed first: every fresh process asks it first.
    let mut endpoints = vec![hung_member()];
    endpoints.extend(cluster.endpoints());
    let fleet = Fleet::with_endpoints(&endpoints, 2);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    fleet.assert_fleet_on("v1");
    let history = crate::util::json_lines(&fleet.ok(1, &["--json", "history"]));
    assert_eq!(history.len(), 1, "{history:?}");
    assert_eq!(history[0]["release"], "v1", "{history:?}");
    assert_eq!(history[0]["outcome"], "succeeded", "{history:?}");
}

#[test]
fn bad_state_settings_are_refused_naming_the_key_before_anything_is_touched() {
    let base = crate::util::simulated(1, "");
    for (state, parts) in [
        (
            "[state]\nendpoints = [\"http://127.0.0.1:2379\"]\n",
            &["state.endpoints", "backend = \"etcd\""][..],
        ),
        ("[state]\nbackend = \"etcd\"\n", &["state.endpoints", "http://"][..]),
        (
            "[state]\nbackend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\n",
            &["state.ca_file", "https://", "ca_file = "][..],
        ),
        (
            "[state]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\nca_file = \"ca.pem\"\n",
            &["state.endpoints", "https://host:port"][..],
        ),
        (
            "[state]\nbackend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"ca.pem\"\n\
             cert_file = \"client.pem\"\n",
            &["state.key_file", "key_file = "][..],
        ),
        (
            "[state]\nbackend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\ncert_file = \"client.pem\"\n\
             key_file = \"client.key\"\n",
            &["state.ca_file"][..],
        ),
        (
            "[state]\nbackend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\nca_file = \"no-such-ca.pem\"\n",
            &["state.ca_file", "cannot read", "no-such-ca.pem"][..],
        ),
        ("[state]\nca_file = \"ca.pem\"\n", &["state.ca_file", "backend = \"etcd\""][..]),
        (
            "[state]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\nlock_ttl = \"1s\"\n",
            &["state.lock_ttl", "2s to 10m"][..],
        ),
        (
            "[state]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\nprefix = \"x y\"\n",
            &["state.prefix"][..],
        ),
        (
            "[state]\nbackend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\nusername = \"u\"\npassword_env = \"A-B\"\n",
            &["state.password_env"][..],
        ),
        ("[state]\nbackend = \"zookeeper\"\n", &["zookeeper", "[state]", "local, etcd"][..]),
    ] {
        let err = crate::util::rejects(&format!("{base}\n{state}"));
        crate::util::assert_has(&err, parts);
    }
}

#[test]
fn the_etcd_password_comes_from_its_variable_and_is_never_printed() {
    let env = crate::util::Env::new(&format!(
        "{}\n[state]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:9\"]\nrequest_timeout = \"200ms\"\n\
         username = \"deployer\"\npassword_env = \"DK_TEST_ETCD_PASSWORD\"\n",
        crate::util::simulated(1, "")
    ));
    let (code, _, err) = env.run(&["history"]);
    assert_eq!(code, 2, "{err}");
    crate::util::assert_has(&err, &["state.password_env", "DK_TEST_ETCD_PASSWORD", "not set"]);
    // Nothing listens on port 9: the error names the endpoint, never the
    // password.
    let out = env
        .cmd()
        .env("DK_TEST_ETCD_PASSWORD", "s3cret-pa55")
        .args(["history"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("127.0.0.1:9") && !err.contains("s3cret-pa55"),
        "{err}"
    );
    // The cause in words, not the client library's debug form.
    assert!(
        err.contains("Connection refused") && !err.contains("Error(") && !err.contains("(()"),
        "{err}"
    );
}

/// `abort` and `status` on a second machine reach the running deployment of
/// the first through etcd's control channel: the holder acknowledges, rolls
/// back and exits 1, and both machines read the rolled-back run.
#[test]
fn an_abort_from_the_other_machine_rolls_the_holder_back() {
    let cluster = Cluster::start();
    let fleet = Fleet::new(&cluster, 6);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    fleet.assert_fleet_on("v1");

    let mut holder = fleet.spawn(0, &["-q", "deploy", "v2"]);
    fleet.wait_for_instances(&mut holder, "v2", 1);
    let (code, out, err) = fleet.run(1, &["abort"]);
    assert_eq!(code, 0, "abort from machine 1: {out}\n{err}");
    let done = wait_bounded(holder, Duration::from_secs(60), &["deploy", "v2"]);
    assert_eq!(
        done.status.code(),
        Some(1),
        "the aborted deployment: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    fleet.assert_fleet_on("v1");
    for m in [0, 1] {
        let out = fleet.ok(m, &["--json", "history"]);
        let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!(
            (last["release"].as_str(), last["outcome"].as_str()),
            (Some("v2"), Some("rolled_back")),
            "machine {m}: {out}"
        );
    }
    assert!(fleet.status(1)["lock"].is_null());

    // With nothing running, an abort from either machine says so (exit 2).
    let (code, _, err) = fleet.run(1, &["abort"]);
    assert_eq!(code, 2, "{err}");
}

/// `n` simulated instances, rolling in batches of 100, state in `cluster`.
fn simulated_on(cluster: &Cluster, app: &str, n: usize) -> crate::util::Env {
    let endpoints: Vec<String> = cluster.endpoints().iter().map(|e| format!("\"{e}\"")).collect();
    let cfg = crate::util::simulated(
        n,
        &format!(
            "[state]\nbackend = \"etcd\"\nendpoints = [{}]\nlock_ttl = \"{LOCK_TTL}\"\nrequest_timeout = \"1s\"\n",
            endpoints.join(", ")
        ),
    )
    .replace("app = \"shop\"", &format!("app = \"{app}\""))
    .replace("[strategy.rolling]\n", "[strategy.rolling]\nbatch_size = 100\n");
    crate::util::Env::new(&cfg)
}

#[test]
fn records_share_transactions_and_a_header_etcd_refuses_fails_at_once() {
    // 256 KiB: the plan of 200 instances (~80 KiB) fits, that of 1,000
    // (~400 KiB) does not.
    let cluster = Cluster::start_with(&["--max-request-bytes", "262144"]);

    // Group commit: the records of a batch's steps share transactions.
    let env = simulated_on(&cluster, "small", 200);
    let out = env
        .cmd()
        .env("RUST_LOG", "deploykit::state=info")
        .args(["-q", "deploy", "v1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", cluster.logs());
    let line = err
        .lines()
        .find(|l| l.contains("journal written"))
        .unwrap_or_else(|| panic!("{err}"));
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    let (records, flushes) = (field("records"), field("flushes"));
    assert!(records > 2_000, "{line}");
    assert!(
        flushes * 10 <= records && field("median_records_per_flush") >= 10,
        "records are committed in groups, not one by one: {line}"
    );
    assert!(
        field("max_records_per_flush") <= 100,
        "at most 100 per transaction: {line}"
    );

    // A journal header etcd refuses as too large fails the run at once,
    // naming the limit, with no instance touched and the lock released.
    let env = simulated_on(&cluster, "big", 1_000);
    let started = Instant::now();
    let (code, out, err) = env.run(&["deploy", "v1"]);
    assert_eq!(code, 3, "{out}\n{err}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "refused, not retried: {:?}",
        started.elapsed()
    );
    assert!(
        err.contains("--max-request-bytes") && err.contains("KiB") && err.contains("request is too large"),
        "{err}"
    );
    let status: Value = serde_json::from_str(env.ok(&["--json", "status"], 0).trim()).unwrap();
    assert!(status["lock"].is_null(), "{status}");
    assert!(
        status["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["release"] == "none"),
        "no instance was touched: {}",
        status["instances"][0]
    );
}

/// `deploykit watch` on two machines sharing one etcd: a stable and a
/// canary instance (behind each machine's simulated load balancer: only
/// the lock and the journals are shared), `main` deployed rolling, the
/// repository (a bare one pushed to from a clone) and the releases in the
/// shared directory.
fn gitops_fleet(cluster: &Cluster) -> (Fleet, crate::gitops::Repo) {
    let fleet = Fleet::new(cluster, 2);
    let repo = crate::gitops::Repo::at(fleet.shared.path());
    let prom = crate::util::answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    for m in &fleet.machines {
        let p = m.path().join("deploykit.toml");
        let cfg = std::fs::read_to_string(&p)
            .unwrap()
            .replace("id = \"web-1\"\n", "id = \"web-1\"\ngroup = \"stable\"\n")
            .replace("id = \"web-2\"\n", "id = \"web-2\"\ngroup = \"canary\"\n");
        let extra = format!(
            "\n[metrics]\nprometheus = \"{prom}\"\n\n\
             [load_balancer]\nkind = \"simulated\"\n\n\
             [strategy.canary]\npromotion = \"manual\"\nstages = [50, 100]\nstage_duration = \"100ms\"\n\
             check_interval = \"50ms\"\nhealth_interval = \"50ms\"\ndrain_timeout = \"1s\"\n\n\
             [gitops]\nrepository = \"{}/origin.git\"\ninterval = \"300ms\"\njitter = \"100ms\"\n\n\
             [[gitops.branches]]\npattern = \"main\"\nstrategy = \"rolling\"\n",
            fleet.shared.path().display()
        );
        std::fs::write(&p, format!("{cfg}{extra}")).unwrap();
    }
    (fleet, repo)
}

/// A running `deploykit watch` on one machine, its output lines collected.
struct Watcher {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Watcher {
    fn start(fleet: &Fleet, machine: usize) -> Self {
        let mut child = crate::gitops::isolated(fleet.cmd(machine), fleet.shared.path())
            .args(["watch"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for l in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (at most 60 s) for an output line containing `text`.
    fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.seen.iter().any(|l| l.contains(text)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => panic!(
                    "watch never printed {text:?}; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The watcher's record of `sha` on `machine` (null when none).
fn commit_record(fleet: &Fleet, machine: usize, sha: &str) -> Value {
    let p = fleet.machines[machine]
        .path()
        .join(".deploykit/shop/gitops/commits.json");
    std::fs::read(p)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .map(|v| v["commits"][sha].clone())
        .unwrap_or(Value::Null)
}

/// Waits (at most 90 s) until `machine` recorded `sha`.
fn until_commit_recorded(fleet: &Fleet, machine: usize, sha: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let r = commit_record(fleet, machine, sha);
        if !r.is_null() {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "machine {machine} never recorded {sha}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The runs of the shared history that deployed `sha`.
fn runs_of(fleet: &Fleet, machine: usize, sha: &str) -> Vec<Value> {
    fleet
        .ok(machine, &["--json", "history"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["commit"]["sha"] == sha)
        .collect()
}

/// `deploykit deploy release --strategy canary` on `machine`, once it
/// waits for its manual promotion (holding the lock).
fn waiting_canary(fleet: &Fleet, machine: usize, release: &str) -> Child {
    waiting_canary_with(fleet, machine, release, &[])
}

/// [`waiting_canary`] with more `deploy` arguments.
fn waiting_canary_with(fleet: &Fleet, machine: usize, release: &str, more: &[&str]) -> Child {
    use std::io::BufRead;
    let mut child = fleet
        .cmd(machine)
        .args(["--json", "deploy", release, "--strategy", "canary"])
        .args(more)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.as_mut().unwrap();
    let mut lines = std::io::BufReader::new(out).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err);
            let _ = child.wait();
            panic!("the manual canary ended before waiting for its promotion: {err}");
        };
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v["event"] == "awaiting_promotion" {
            return child;
        }
    }
}

#[test]
fn stats_postmortem_metrics_and_top_on_another_machine_read_the_journals_in_etcd() {
    let cluster = Cluster::start();
    let (fleet, _repo) = gitops_fleet(&cluster);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    // Machine 0's v2 killed part-way and rolled back from machine 1: a
    // failure to look into.
    let mut run = fleet.spawn(0, &["-q", "deploy", "v2"]);
    fleet.wait_for_instances(&mut run, "v2", 1);
    let _ = run.kill();
    let _ = run.wait();
    fleet.ok(1, &["-q", "--lock-wait", "30s", "rollback"]);
    assert_eq!(fleet.release("web-1").as_deref(), Some("v1"));

    // Machine 1's own state directory holds none of these runs.
    let stats: Value = serde_json::from_str(&fleet.ok(1, &["--json", "stats"])).unwrap();
    let runs = stats["deployments"].as_array().expect("deployments");
    let find = |release: &str| {
        runs.iter()
            .find(|r| r["release"] == release && r["kind"] == "deploy")
            .unwrap_or_else(|| panic!("no deployment of {release} in {stats}"))
    };
    assert_eq!(find("v1")["outcome"], "succeeded", "{stats}");
    let failed = find("v2");
    assert_ne!(failed["outcome"], "succeeded", "{stats}");
    assert_eq!(stats["dora"]["deployments"], 2, "{stats}");
    let id = failed["id"].as_str().unwrap();
    let pm = fleet.ok(1, &["postmortem", id]);
    assert!(pm.contains(id) && pm.contains("v2"), "{pm}");

    // A run on machine 1 serves /metrics of the shared journals, its own
    // included, and top there follows it.
    let port = crate::stats::free_port();
    let listen = format!("127.0.0.1:{port}");
    let canary = waiting_canary_with(&fleet, 1, "v3", &["--metrics-listen", &listen]);
    let (head, body) = crate::stats::http_get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let count = |outcome: &str| {
        body.lines()
            .filter(|l| {
                l.starts_with("deploykit_deployments_total{")
                    && l.contains("kind=\"deploy\"")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(count("succeeded"), 1.0, "{body}");
    assert!(
        body.contains("deploykit_deployment_in_progress{app=\"shop\"} 1"),
        "{body}"
    );

    let tmux = crate::top::Tmux::new();
    let started = tmux
        .cmd()
        .args(["new-session", "-d", "-s", "top", "-x", "120", "-y", "40", "-c"])
        .arg(fleet.machines[1].path())
        .args(["-e", "TERM=xterm-256color"])
        .arg(assert_cmd::cargo::cargo_bin("deploykit"))
        .args(["top", "--interval", "100ms"])
        .output()
        .unwrap();
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    tmux.wait_for(&["deploykit top · shop", "canary of v3", "waits for promotion"]);
    fleet.ok(0, &["promote"]);
    let out = wait_bounded(canary, Duration::from_secs(60), &["deploy", "v3"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tmux.wait_for(&["canary of v3", "succeeded"]);

    // The dashboard reads only a local state directory: refused, naming
    // the key, rather than showing an empty fleet.
    let (code, _, err) = fleet.run(1, &["dashboard"]);
    assert_eq!(code, 2, "{err}");
    crate::util::assert_has(&err, &["state.backend", "etcd", "deploykit status"]);
}

#[test]
fn a_promote_for_a_holder_killed_while_waiting_is_recorded_once_its_lease_expires_and_resumed_elsewhere() {
    let cluster = Cluster::start();
    let (fleet, _repo) = gitops_fleet(&cluster);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    let mut canary = waiting_canary(&fleet, 0, "v2");
    // The wait is in the shared journal (the output may run a moment ahead).
    let deadline = Instant::now() + Duration::from_secs(10);
    while fleet.status(1)["deployment"]["awaiting_promotion"].is_null() {
        assert!(Instant::now() < deadline, "the wait never reached the journal");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = canary.kill();
    let _ = canary.wait();
    // At once, while its lease still holds the lock: the request gets no
    // answer, the lease expires, and the promotion is recorded.
    let out = fleet.ok(1, &["promote"]);
    assert!(
        out.contains("promotion of stage") && out.contains("recorded"),
        "{out}"
    );
    // A second promote records the same approval.
    assert_eq!(fleet.ok(0, &["promote"]), out);
    // The other machine resumes past the wait and moves stable to v2.
    fleet.ok(1, &["-q", "deploy", "--resume"]);
    assert_eq!(fleet.release("web-1").as_deref(), Some("v2"));
    let history = crate::util::json_lines(&fleet.ok(0, &["--json", "history"]));
    let last = history.last().unwrap();
    assert_eq!(
        (last["release"].as_str(), last["outcome"].as_str()),
        (Some("v2"), Some("succeeded")),
        "{history:?}"
    );
}

#[test]
fn a_manual_deployment_holding_the_etcd_lock_makes_watch_on_another_machine_wait_then_deploy() {
    let cluster = Cluster::start();
    let (fleet, repo) = gitops_fleet(&cluster);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    // Machine 0: a manual canary that waits for its promotion holds the lock.
    let manual = waiting_canary(&fleet, 0, "v2");
    let c1 = repo.commit("one");
    repo.push("main");
    // Machine 1 watches: it finds the lock taken and tries again.
    let mut w = Watcher::start(&fleet, 1);
    w.wait_for("another deployment holds the lock");
    assert!(runs_of(&fleet, 0, &c1).is_empty(), "deployed while locked");
    assert_eq!(commit_record(&fleet, 1, &c1), Value::Null);
    assert_eq!(fleet.release("web-1").as_deref(), Some("v1"));

    fleet.ok(0, &["promote"]);
    let out = wait_bounded(manual, Duration::from_secs(60), &["deploy", "v2"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rec = until_commit_recorded(&fleet, 1, &c1);
    assert_eq!(rec["status"], "deployed", "{rec}");
    fleet.assert_fleet_on(crate::gitops::short(&c1));
    // One history on both machines: v1, the manual v2, then the commit,
    // which started only once v2 had ended.
    for m in [0, 1] {
        let h: Vec<Value> = fleet
            .ok(m, &["--json", "history"])
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let releases: Vec<&str> = h.iter().map(|v| v["release"].as_str().unwrap()).collect();
        assert_eq!(releases, ["v1", "v2", crate::gitops::short(&c1)], "machine {m}");
        let v2_end = h[1]["started_at_ms"].as_u64().unwrap() + h[1]["duration_ms"].as_u64().unwrap();
        assert!(h[2]["started_at_ms"].as_u64().unwrap() >= v2_end, "{h:?}");
        assert_eq!(h[2]["commit"]["sha"], c1.as_str());
        assert_eq!(rec["deployment"], h[2]["id"], "{rec}");
    }
}

#[test]
fn two_watchers_on_two_machines_sharing_etcd_deploy_each_commit_once() {
    let cluster = Cluster::start();
    let (fleet, repo) = gitops_fleet(&cluster);
    fleet.ok(0, &["-q", "deploy", "v1"]);
    let c1 = repo.commit("one");
    repo.push("main");
    let watchers = [Watcher::start(&fleet, 0), Watcher::start(&fleet, 1)];
    let mut sha = c1;
    for push in 1..=2 {
        if push == 2 {
            // A second push while both watch.
            sha = repo.commit("two");
            repo.push("main");
        }
        let recs = [
            until_commit_recorded(&fleet, 0, &sha),
            until_commit_recorded(&fleet, 1, &sha),
        ];
        let runs = runs_of(&fleet, 0, &sha);
        assert_eq!(
            runs.len(),
            1,
            "push {push} deployed {} times: {runs:?}",
            runs.len()
        );
        assert_eq!(runs[0]["outcome"], "succeeded", "{runs:?}");
        let mut statuses: Vec<&str> = recs.iter().map(|r| r["status"].as_str().unwrap()).collect();
        statuses.sort();
        assert_eq!(statuses, ["already_deployed", "deployed"], "{recs:?}");
        // Both records name the one run.
        for r in &recs {
            assert_eq!(r["deployment"], runs[0]["id"], "{r}");
        }
        let other = recs.iter().find(|r| r["status"] == "already_deployed").unwrap();
        assert!(
            other["reason"]
                .as_str()
                .unwrap()
                .contains(runs[0]["id"].as_str().unwrap()),
            "{other}"
        );
        fleet.assert_fleet_on(crate::gitops::short(&sha));
    }
    drop(watchers);

    // A watcher started afresh on a machine that has no record of its own
    // (here: machine 1 with its record removed) deploys nothing again.
    std::fs::remove_file(
        fleet.machines[1]
            .path()
            .join(".deploykit/shop/gitops/commits.json"),
    )
    .unwrap();
    let before = fleet.ok(0, &["--json", "history"]).lines().count();
    let (code, out, err) = {
        let o = crate::gitops::isolated(fleet.cmd(1), fleet.shared.path())
            .args(["watch", "--once"])
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert_eq!(fleet.ok(0, &["--json", "history"]).lines().count(), before);
    let rec = commit_record(&fleet, 1, &sha);
    assert_eq!(rec["status"], "already_deployed", "{rec}");
}
