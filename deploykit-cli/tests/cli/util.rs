//! Test environments: a temp dir with a deploykit.toml, helpers to run the
//! binary and to read what the simulated and local instances hold.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use assert_cmd::Command;
use serde_json::Value;

/// A temp directory with a configuration; kills the processes its local
/// instances started when dropped.
pub(crate) struct Env {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) app: String,
}

impl Env {
    pub(crate) fn new(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("deploykit.toml"), config).expect("write config");
        Self {
            dir,
            app: "shop".into(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `deploykit` in the directory, with logging quiet unless asked.
    pub(crate) fn cmd(&self) -> Command {
        let mut c = Command::cargo_bin("deploykit").expect("the deploykit binary");
        c.current_dir(self.path())
            .env_remove("RUST_LOG")
            .env_remove("DEPLOYKIT_TEST_ABORT_AFTER_RECORD")
            .env_remove("DEPLOYKIT_CONFIG")
            .timeout(std::time::Duration::from_secs(120));
        c
    }

    /// Runs `deploykit args…` and returns (exit code, stdout, stderr).
    pub(crate) fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cmd().args(args).output().expect("run deploykit");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs and asserts the exit code, with every output in the message.
    pub(crate) fn ok(&self, args: &[&str], code: i32) -> String {
        let (c, out, err) = self.run(args);
        assert_eq!(
            c, code,
            "deploykit {args:?} exited {c}\nstdout:\n{out}\nstderr:\n{err}"
        );
        out
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.path().join(".deploykit").join(&self.app)
    }

    /// A simulated instance's state, folded from the fleet's log as the
    /// CLI reads it: the last whole line of `id` wins, a last line without
    /// its newline (a write cut by a kill) is ignored.
    pub(crate) fn sim(&self, id: &str) -> Value {
        let p = self.state().join("simulated").join("instances.log");
        let log = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let whole = &log[..log.rfind('\n').map_or(0, |end| end + 1)];
        let mut found = None;
        for (n, line) in whole.lines().enumerate() {
            let mut v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{} line {}: {e}: {line}", p.display(), n + 1));
            if v["id"] == id {
                v.as_object_mut().expect("a JSON object").remove("id");
                found = Some(v);
            }
        }
        found.unwrap_or_else(|| panic!("{} has no line for {id}:\n{log}", p.display()))
    }

    /// The simulated load balancer's state.
    pub(crate) fn lb(&self) -> Value {
        let p = self.state().join("simulated").join("lb.json");
        std::fs::read(&p)
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or_else(|_| serde_json::json!({"out_of_rotation": [], "weights": {}, "live": null}))
    }

    /// Instances the simulated load balancer has out of rotation.
    pub(crate) fn out_of_rotation(&self) -> Vec<String> {
        self.lb()["out_of_rotation"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    }

    /// A local instance's current release (the `current` symlink).
    pub(crate) fn local_release(&self, id: &str) -> Option<String> {
        let link = std::fs::read_link(self.path().join("instances").join(id).join("current")).ok()?;
        Some(link.file_name()?.to_string_lossy().into_owned())
    }

    /// The release a local instance's running process serves: the release
    /// directory its working directory resolves to (`/proc/<pid>/cwd`),
    /// which a later switch of `current` does not change.
    pub(crate) fn local_serving(&self, id: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.path().join("instances").join(id).join("app.pid")).ok()?;
        let pid = text.split_whitespace().next()?;
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        Some(cwd.file_name()?.to_string_lossy().into_owned())
    }

    /// Whether a local instance's process runs (pid file, /proc, start time).
    pub(crate) fn local_running(&self, id: &str) -> bool {
        let Ok(text) = std::fs::read_to_string(self.path().join("instances").join(id).join("app.pid")) else {
            return false;
        };
        let mut it = text.split_whitespace();
        let (Some(pid), Some(start)) = (it.next(), it.next()) else {
            return false;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return false;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[0] != "Z" && f.get(19) == Some(&start)
    }

    /// Every journal record of the newest journal.
    pub(crate) fn newest_journal(&self) -> Vec<Value> {
        let dir = self.state().join("journal");
        // Only `*.jsonl`: a journal being created is written under a hidden
        // temporary name first, which may be empty or gone by the next read.
        let mut files: Vec<(PathBuf, (Option<u64>, u64))> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).unwrap();
                let h: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
                let key = (h["sequence"].as_u64(), h["started_at_ms"].as_u64().unwrap());
                (p, key)
            })
            .collect();
        // The state directory's order: by sequence number, unnumbered
        // (older) journals first by time.
        files.sort_by_key(|(_, key)| *key);
        let text = std::fs::read_to_string(&files.last().unwrap().0).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// How many journals the state directory holds (finished ones, as
    /// [`newest_journal`](Self::newest_journal) reads them).
    pub(crate) fn journal_count(&self) -> usize {
        std::fs::read_dir(self.state().join("journal"))
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
                })
                .count()
            })
            .unwrap_or(0)
    }

    /// Starts `deploykit -q deploy <release>` in the background and waits,
    /// bounded by 60 s, until its journal (a new one) holds a record
    /// `reached` accepts — e.g. the pause between batches — so that another
    /// process can act on the running deployment. stderr is piped.
    pub(crate) fn spawn_deploy(
        &self,
        release: &str,
        what: &str,
        reached: impl Fn(&Value) -> bool,
    ) -> std::process::Child {
        self.spawn_deploy_with(release, &[], what, reached)
    }

    /// As [`spawn_deploy`](Self::spawn_deploy), with more arguments.
    pub(crate) fn spawn_deploy_with(
        &self,
        release: &str,
        extra: &[&str],
        what: &str,
        reached: impl Fn(&Value) -> bool,
    ) -> std::process::Child {
        let before = self.journal_count();
        let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("deploykit"))
            .current_dir(self.path())
            .env_remove("RUST_LOG")
            .env_remove("DEPLOYKIT_TEST_ABORT_AFTER_RECORD")
            .env_remove("DEPLOYKIT_CONFIG")
            .args(["-q", "deploy", release])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn deploykit deploy");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !(self.journal_count() == before + 1 && self.newest_journal().iter().any(&reached)) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the deployment ended ({status}) before {what}");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the deployment never reached {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        child
    }

    /// Writes release directories `builds/<r>/VERSION`.
    pub(crate) fn releases(&self, names: &[&str]) {
        for r in names {
            let d = self.path().join("builds").join(r);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("VERSION"), r).unwrap();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.path().join("instances")) else {
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

/// A configuration of `n` simulated instances behind the simulated load
/// balancer, with fast waits, plus `extra` TOML.
pub(crate) fn simulated(n: usize, extra: &str) -> String {
    let mut c = String::from("app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n");
    for i in 1..=n {
        c.push_str(&format!(
            "[[instances]]\nid = \"web-{i}\"\naddress = \"127.0.0.1:{}\"\n\n",
            18080 + i
        ));
    }
    c.push_str("[load_balancer]\nkind = \"simulated\"\n\n");
    c.push_str(&fast_rolling(extra));
    c
}

/// A configuration of `n` local instances running `sleep` (healthy while
/// the process runs), releases from `builds/`, behind the simulated load
/// balancer.
pub(crate) fn local(n: usize, extra: &str) -> String {
    let mut c = String::from(
        "app = \"shop\"\nreleases = \"builds\"\n\n[instance_defaults]\nroot = \"instances/{id}\"\n\
         command = [\"sleep\", \"600\"]\nhealth = \"service\"\nstop_grace = \"2s\"\n\n",
    );
    for i in 1..=n {
        c.push_str(&format!(
            "[[instances]]\nid = \"web-{i}\"\naddress = \"127.0.0.1:{}\"\n\n",
            18180 + i
        ));
    }
    c.push_str("[load_balancer]\nkind = \"simulated\"\n\n");
    c.push_str(&fast_rolling(extra));
    c
}

fn fast_rolling(extra: &str) -> String {
    let mut c = String::new();
    if !extra.contains("[strategy.rolling]") {
        c.push_str("[strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"50ms\"\ndrain_timeout = \"1s\"\n\n");
    }
    if !extra.contains("[timeouts]") {
        c.push_str("[timeouts]\ndrain_poll = \"50ms\"\n\n");
    }
    c.push_str(extra);
    c
}

/// Parses every stdout line as JSON.
pub(crate) fn json_lines(out: &str) -> Vec<Value> {
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A Prometheus stand-in on 127.0.0.1 answering each instant query with
/// the one sample `value(request line)` until the test process ends;
/// returns its base URL.
pub(crate) fn prometheus(value: fn(&str) -> f64) -> String {
    serving(move |request| {
        format!(
            r#"{{"status":"success","data":{{"resultType":"vector","result":[{{"metric":{{}},"value":[1700000000,"{}"]}}]}}}}"#,
            value(request)
        )
    })
}

/// A tiny HTTP server on 127.0.0.1 answering every request with `body`
/// (200, JSON) until the test process ends; returns its base URL.
pub(crate) fn answering(body: &'static str) -> String {
    serving(move |_| body.to_string())
}

/// A tiny HTTP server on 127.0.0.1 answering each request with
/// `body(request line)` (200, JSON); returns its base URL.
fn serving(body: impl Fn(&str) -> String + Send + 'static) -> String {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
            }
            let body = body(&request);
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

/// `validate` of `config`: stderr, asserting exit 2 and that no state
/// directory was created.
pub(crate) fn rejects(config: &str) -> String {
    let env = Env::new(config);
    let (code, out, err) = env.run(&["validate"]);
    assert_eq!(
        code, 2,
        "expected exit 2 for:\n{config}\nstdout: {out}\nstderr: {err}"
    );
    assert!(
        !env.path().join(".deploykit").exists(),
        "validate touched the state directory"
    );
    err
}

/// Asserts that `err` contains every one of `parts`.
pub(crate) fn assert_has(err: &str, parts: &[&str]) {
    for p in parts {
        assert!(err.contains(p), "expected {p:?} in:\n{err}");
    }
}

/// Every port handed out in this test process: tests run in parallel, and
/// a port given up by one could otherwise be given to another.
static HANDED_OUT: Mutex<std::collections::BTreeSet<u16>> = Mutex::new(std::collections::BTreeSet::new());

/// `n` free ports on 127.0.0.1, none handed out before in this process:
/// every listener is held until all are chosen, so the kernel cannot give
/// one port twice.
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if handed.insert(port) {
            ports.push(port);
        }
        held.push(l);
    }
    ports
}

/// One free port, as [`free_ports`].
pub(crate) fn free_port() -> u16 {
    free_ports(1)[0]
}
