//! `deploykit watch` against a real git repository: a bare repository in
//! the test's temp dir, pushed to from a working clone, and simulated
//! instances (so a deployment takes a fraction of a second).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::util::{answering, assert_has, rejects, Env};

/// A bare repository `origin.git` and its clone `work/` inside a
/// directory, with git isolated from the machine's and the user's
/// configuration.
pub(crate) struct Repo {
    root: PathBuf,
}

impl Repo {
    fn new(env: &Env) -> Self {
        Self::at(env.path())
    }

    /// The repositories in `root`.
    pub(crate) fn at(root: &Path) -> Self {
        let r = Self {
            root: root.to_path_buf(),
        };
        r.git(
            root,
            &["init", "--quiet", "--bare", "--initial-branch=main", "origin.git"],
        );
        r.git(root, &["clone", "--quiet", "origin.git", "work"]);
        r.git(&r.work(), &["config", "user.name", "Test"]);
        r.git(&r.work(), &["config", "user.email", "test@example.invalid"]);
        r.git(&r.work(), &["checkout", "--quiet", "-b", "main"]);
        r
    }

    fn work(&self) -> PathBuf {
        self.root.join("work")
    }

    fn git(&self, dir: &Path, args: &[&str]) -> String {
        let out = isolated(Command::new("git"), &self.root)
            .current_dir(dir)
            .args(args)
            .output()
            .expect("git must be installed to run these tests (scripts/test installs it)");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Commits a file `app.txt` holding `text` on the current branch and
    /// returns the commit id.
    pub(crate) fn commit(&self, text: &str) -> String {
        std::fs::write(self.work().join("app.txt"), text).unwrap();
        self.git(&self.work(), &["add", "app.txt"]);
        self.git(&self.work(), &["commit", "--quiet", "-m", text]);
        self.git(&self.work(), &["rev-parse", "HEAD"])
    }

    pub(crate) fn push(&self, branch: &str) {
        self.git(
            &self.work(),
            &["push", "--quiet", "origin", &format!("HEAD:refs/heads/{branch}")],
        );
    }

    fn switch(&self, branch: &str) {
        self.git(&self.work(), &["checkout", "--quiet", "-B", branch]);
    }
}

pub(crate) fn isolated(mut c: Command, home: &Path) -> Command {
    c.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE");
    c
}

pub(crate) fn short(sha: &str) -> &str {
    &sha[..12]
}

/// Two stable instances and a canary behind the simulated load balancer, a
/// Prometheus stand-in that finds the canary healthy, fast waits, and the
/// `[gitops]` section `gitops` (rules and gates).
fn config(gitops: &str) -> String {
    let prom = answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    format!(
        "app = \"shop\"\nreleases = \"releases\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18391\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"stable-2\"\naddress = \"127.0.0.1:18392\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18393\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"recreate\"\n\n\
        [strategy.rolling]\nhealth_interval = \"20ms\"\nstabilisation = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [strategy.canary]\nstages = [50, 100]\nstage_duration = \"100ms\"\ncheck_interval = \"50ms\"\n\
        health_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n\n\
        [gitops]\nrepository = \"origin.git\"\ninterval = \"1h\"\n\n{gitops}"
    )
}

const RULES: &str = "[[gitops.branches]]\npattern = \"main\"\nstrategy = \"canary\"\n\n\
    [[gitops.branches]]\npattern = \"feature/*\"\nstrategy = \"rolling\"\n\n";

/// `deploykit` in the environment with git isolated as in [`Repo`].
fn deploykit(env: &Env, args: &[&str]) -> (i32, String, String) {
    let mut c = env.cmd();
    c.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", env.path())
        .env("XDG_CONFIG_HOME", env.path().join(".config"));
    let out = c.args(args).output().expect("run deploykit");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn watch_once(env: &Env) -> String {
    let (code, out, err) = deploykit(env, &["watch", "--once"]);
    assert_eq!(
        code, 0,
        "watch --once exited {code}\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

/// `<state>/gitops/commits.json`.
fn records(env: &Env) -> Value {
    let p = env.state().join("gitops").join("commits.json");
    std::fs::read(&p)
        .map(|b| serde_json::from_slice(&b).unwrap())
        .unwrap_or(Value::Null)
}

fn record(env: &Env, sha: &str) -> Value {
    records(env)["commits"][sha].clone()
}

/// Every journal's header, oldest first.
fn headers(env: &Env) -> Vec<Value> {
    let Ok(dir) = std::fs::read_dir(env.state().join("journal")) else {
        return Vec::new();
    };
    let mut out: Vec<Value> = dir
        .map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            serde_json::from_str(text.lines().next().unwrap()).unwrap()
        })
        .collect();
    out.sort_by_key(|h| h["sequence"].as_u64());
    out
}

#[test]
fn a_push_to_main_deploys_that_commit_as_a_canary_and_a_restart_does_not_redeploy_it() {
    let env = Env::new(&config(RULES));
    let repo = Repo::new(&env);
    // Canary needs a stable release to compare with.
    env.ok(&["deploy", "v0"], 0);
    let c1 = repo.commit("one");
    repo.push("main");
    watch_once(&env);
    let rec = record(&env, &c1);
    assert_eq!(rec["status"], "deployed", "{rec}");
    assert_eq!(rec["strategy"], "canary");
    assert_eq!(rec["release"], short(&c1));
    let h = headers(&env);
    let last = h.last().unwrap();
    assert_eq!(last["strategy"], "canary");
    assert_eq!(last["release"], short(&c1));
    assert_eq!(last["commit"]["sha"], c1.as_str());
    assert!(
        last["commit"]["time_s"].as_i64().unwrap() > 1_600_000_000,
        "{last}"
    );
    assert_eq!(rec["deployment"], last["deployment"]);
    for id in ["stable-1", "stable-2"] {
        assert_eq!(env.sim(id)["release"], short(&c1), "{id}");
    }
    // The release is the commit's tree.
    let exported = env.path().join("releases").join(short(&c1)).join("app.txt");
    assert_eq!(std::fs::read_to_string(&exported).unwrap(), "one");
    // The history carries the commit too (the lead time's start).
    let (_, out, _) = deploykit(&env, &["--json", "history"]);
    let newest: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(newest["commit"]["sha"], c1.as_str());

    // A restarted watcher finds the commit deployed: no new run.
    let runs = env.journal_count();
    watch_once(&env);
    assert_eq!(env.journal_count(), runs, "a deployed commit was deployed again");
    assert_eq!(record(&env, &c1)["status"], "deployed");
}

#[test]
fn a_feature_branch_is_deployed_rolling_and_an_unmatched_branch_is_recorded_not_deployed() {
    let env = Env::new(&config(RULES));
    let repo = Repo::new(&env);
    repo.switch("feature/x");
    let fx = repo.commit("feature");
    repo.push("feature/x");
    repo.switch("docs");
    let doc = repo.commit("docs only");
    repo.push("docs");
    watch_once(&env);
    let rec = record(&env, &fx);
    assert_eq!(rec["status"], "deployed", "{rec}");
    assert_eq!(rec["strategy"], "rolling");
    assert_eq!(rec["branch"], "feature/x");
    let h = headers(&env);
    assert_eq!(h.len(), 1, "only the feature branch is deployed: {h:?}");
    assert_eq!(h[0]["strategy"], "rolling");
    assert_eq!(h[0]["commit"]["sha"], fx.as_str());
    for id in ["stable-1", "stable-2", "canary-1"] {
        assert_eq!(env.sim(id)["release"], short(&fx), "{id}");
    }
    let rec = record(&env, &doc);
    assert_eq!(rec["status"], "not_deployed", "{rec}");
    assert!(rec["reason"].as_str().unwrap().contains("docs"), "{rec}");
}

#[test]
fn a_failing_gate_rolls_back_and_is_recorded_with_its_output_and_not_retried() {
    let gate = "[[gitops.gates]]\nname = \"integration\"\ncommand = [\"sh\", \"-c\", \
        \"echo checking $DEPLOYKIT_TARGET_URLS; grep -q good app.txt || { echo 'checkout broken' >&2; exit 3; }\"]\n";
    let env = Env::new(&config(&format!("{RULES}{gate}")));
    let repo = Repo::new(&env);
    repo.switch("feature/x");
    let good = repo.commit("good");
    repo.push("feature/x");
    watch_once(&env);
    assert_eq!(record(&env, &good)["status"], "deployed");

    let bad = repo.commit("bad");
    repo.push("feature/x");
    watch_once(&env);
    let rec = record(&env, &bad);
    assert_eq!(rec["status"], "gate_failed", "{rec}");
    assert_eq!(rec["gate"]["name"], "integration");
    assert_eq!(rec["gate"]["exit_code"], 3);
    let tail = rec["gate"]["output_tail"].as_str().unwrap();
    assert_has(tail, &["checking http://127.0.0.1:18391", "checkout broken"]);
    assert!(rec["reason"].as_str().unwrap().contains("rolled back"), "{rec}");
    // The fleet is back on the good commit, by a recorded rollback.
    for id in ["stable-1", "stable-2", "canary-1"] {
        assert_eq!(env.sim(id)["release"], short(&good), "{id}");
    }
    assert_eq!(headers(&env).last().unwrap()["kind"], "rollback");

    // Not retried by a restart; retried with --retry-failed.
    let runs = env.journal_count();
    watch_once(&env);
    assert_eq!(env.journal_count(), runs, "a failed commit was retried");
    let (code, out, err) = deploykit(&env, &["watch", "--once", "--retry-failed"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(
        env.journal_count(),
        runs + 2,
        "retried: a deployment and its rollback"
    );
}

#[test]
fn a_failing_gate_before_promotion_stops_the_canary_before_any_traffic() {
    let gate = "[[gitops.gates]]\nname = \"canary-suite\"\nwhen = \"before-promotion\"\n\
        command = [\"sh\", \"-c\", \"echo against $DEPLOYKIT_TARGET_URLS; exit 5\"]\n";
    let env = Env::new(&config(&format!("{RULES}{gate}")));
    let repo = Repo::new(&env);
    env.ok(&["deploy", "v0"], 0);
    let c1 = repo.commit("one");
    repo.push("main");
    watch_once(&env);
    let rec = record(&env, &c1);
    assert_eq!(rec["status"], "failed", "{rec}");
    let reason = rec["reason"].as_str().unwrap();
    assert_has(
        reason,
        &[
            "gate canary-suite failed against canary",
            "exit code 5",
            "against http://127.0.0.1:18393",
        ],
    );
    assert!(!reason.contains("18391"), "only the canary is a target: {reason}");
    let journal = env.newest_journal();
    let stages: Vec<&str> = journal
        .iter()
        .filter(|r| r["event"] == "stage_started")
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert!(stages.contains(&"gate canary-suite on canary"), "{stages:?}");
    assert!(
        !stages.iter().any(|s| s.starts_with("canary ")),
        "no traffic stage started: {stages:?}"
    );
    for id in ["stable-1", "stable-2"] {
        assert_eq!(env.sim(id)["release"], "v0", "{id} untouched");
    }
    assert_eq!(env.sim("canary-1")["running"], false);
}

#[test]
fn a_build_command_makes_the_release_and_a_failing_build_is_recorded() {
    let build =
        "build = [\"sh\", \"-c\", \"grep -q broken app.txt && { echo 'compile error' >&2; exit 1; }; \
        mkdir -p out && cp app.txt out/ && echo $DEPLOYKIT_COMMIT > out/BUILT\"]\nbuild_output = \"out\"\n\n";
    let env = Env::new(&config(&format!("{build}{RULES}")));
    let repo = Repo::new(&env);
    repo.switch("feature/x");
    let c1 = repo.commit("one");
    repo.push("feature/x");
    watch_once(&env);
    assert_eq!(record(&env, &c1)["status"], "deployed");
    let release = env.path().join("releases").join(short(&c1));
    assert_eq!(std::fs::read_to_string(release.join("BUILT")).unwrap().trim(), c1);
    assert_eq!(std::fs::read_to_string(release.join("app.txt")).unwrap(), "one");
    // The build ran in a scratch export that is gone, not in the repository.
    assert!(!release.join("out").exists());

    let c2 = repo.commit("broken");
    repo.push("feature/x");
    let runs = env.journal_count();
    watch_once(&env);
    let rec = record(&env, &c2);
    assert_eq!(rec["status"], "failed", "{rec}");
    assert_has(rec["reason"].as_str().unwrap(), &["build", "compile error"]);
    assert_eq!(env.journal_count(), runs, "nothing was deployed");
    let left: Vec<_> = std::fs::read_dir(env.path().join("releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        left,
        [short(&c1)],
        "no release, partial or not, for the failed build"
    );
    assert_eq!(env.sim("stable-1")["release"], short(&c1));
}

#[test]
fn sigterm_stops_an_idle_watcher_cleanly() {
    let env = Env::new(&config(&format!(
        "webhook_secret_env = \"HOOK_SECRET\"\n\n{RULES}"
    )));
    let _repo = Repo::new(&env);
    let mut w = watching(&env);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = w.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "watch did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn after_a_canary_the_gates_target_what_serves_the_release_not_the_stopped_canary() {
    // The gate runs in releases/<short>/, so ../../ is the environment's
    // directory.
    let gate = "[[gitops.gates]]\nname = \"e2e\"\n\
        command = [\"sh\", \"-c\", \"echo $DEPLOYKIT_TARGET_URLS > ../../targets.txt\"]\n";
    let env = Env::new(&config(&format!("{RULES}{gate}")));
    let repo = Repo::new(&env);
    env.ok(&["deploy", "v0"], 0);
    let c1 = repo.commit("one");
    repo.push("main");
    watch_once(&env);
    assert_eq!(record(&env, &c1)["status"], "deployed");
    let targets = std::fs::read_to_string(env.path().join("targets.txt")).unwrap();
    assert_eq!(
        targets.trim(),
        "http://127.0.0.1:18391 http://127.0.0.1:18392",
        "the stable instances serve the release; the canary is stopped"
    );
}

#[test]
fn two_quick_pushes_deploy_only_the_newest_and_record_the_other_as_skipped() {
    let env = Env::new(&config(RULES));
    let repo = Repo::new(&env);
    repo.switch("feature/x");
    let first = repo.commit("first");
    repo.push("feature/x");
    watch_once(&env);
    assert_eq!(record(&env, &first)["status"], "deployed");
    // Two pushes while the watcher is busy (or stopped).
    let second = repo.commit("second");
    repo.push("feature/x");
    let third = repo.commit("third");
    repo.push("feature/x");
    let runs = env.journal_count();
    watch_once(&env);
    assert_eq!(env.journal_count(), runs + 1, "one deployment for two pushes");
    assert_eq!(record(&env, &third)["status"], "deployed");
    let rec = record(&env, &second);
    assert_eq!(rec["status"], "skipped", "{rec}");
    assert!(rec["reason"].as_str().unwrap().contains(short(&third)), "{rec}");
    assert_eq!(env.sim("stable-1")["release"], short(&third));
}

#[test]
fn a_deployment_holding_the_lock_makes_the_watcher_wait_not_fail() {
    let env =
        Env::new(&config(RULES).replace("[strategy.canary]", "[strategy.canary]\npromotion = \"manual\""));
    let repo = Repo::new(&env);
    env.ok(&["deploy", "v0"], 0);
    // A manual canary that waits for promotion holds the lock.
    let mut manual = env.spawn_deploy_with("v1", &["--strategy", "canary"], "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    let c1 = repo.commit("one");
    repo.push("feature/x");
    let (code, out, err) = deploykit(&env, &["watch", "--once"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("lock"), "{out}");
    assert_eq!(
        record(&env, &c1),
        Value::Null,
        "a commit refused by the lock is not recorded"
    );
    env.ok(&["promote"], 0);
    assert_eq!(manual.wait().unwrap().code(), Some(0));
    watch_once(&env);
    assert_eq!(record(&env, &c1)["status"], "deployed");
}

/// A running `deploykit watch --webhook 127.0.0.1:0`, its webhook address
/// read from its log.
struct Watching {
    child: Child,
    addr: String,
    log: mpsc::Receiver<String>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn watching(env: &Env) -> Watching {
    let mut child = isolated(
        Command::new(assert_cmd::cargo::cargo_bin("deploykit")),
        env.path(),
    )
    .current_dir(env.path())
    .env_remove("RUST_LOG")
    .env_remove("DEPLOYKIT_CONFIG")
    .env("HOOK_SECRET", "s3cret")
    .args(["watch", "--webhook", "127.0.0.1:0"])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn deploykit watch");
    let stderr = child.stderr.take().unwrap();
    let (tx, log) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = log
            .recv_timeout(Duration::from_secs(60))
            .expect("watch never said where its webhook listens");
        if let Some(a) = line.split("listening on http://").nth(1) {
            break a.trim().to_string();
        }
    };
    Watching { child, addr, log }
}

/// POSTs `body` with `headers` to the webhook; the status code.
fn post(addr: &str, headers: &[(&str, String)], body: &str) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "POST /hook HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer}"))
}

fn sign(secret: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Waits, bounded by 60 s, until the commit has a record.
fn until_recorded(env: &Env, sha: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = record(env, sha);
        if !r.is_null() {
            return r;
        }
        assert!(Instant::now() < deadline, "{sha} was never recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_signed_webhook_wakes_the_watcher_and_an_unsigned_or_forged_one_gets_401() {
    let env = Env::new(&config(&format!(
        "webhook_secret_env = \"HOOK_SECRET\"\n\n{RULES}"
    )));
    let repo = Repo::new(&env);
    repo.switch("feature/x");
    let c1 = repo.commit("one");
    repo.push("feature/x");
    let w = watching(&env);
    // The first poll happens at start.
    assert_eq!(until_recorded(&env, &c1)["status"], "deployed");

    let c2 = repo.commit("two");
    repo.push("feature/x");
    let body = r#"{"ref":"refs/heads/feature/x"}"#;
    assert_eq!(post(&w.addr, &[], body), 401);
    let forged = format!("sha256={}", sign("wrong", body));
    assert_eq!(post(&w.addr, &[("X-Hub-Signature-256", forged)], body), 401);
    assert_eq!(
        post(&w.addr, &[("X-Gitea-Signature", sign("wrong", body))], body),
        401
    );
    // Each refusal is logged (before its answer, so the lines are in the
    // pipe already; the reader thread may lag), naming no secret.
    let mut logged = Vec::new();
    let refusals = |l: &[String]| l.iter().filter(|x| x.contains("webhook: refused")).count();
    while refusals(&logged) < 3 {
        match w.log.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => logged.push(line),
            Err(_) => panic!("fewer than 3 refusals logged: {logged:?}"),
        }
    }
    logged.extend(w.log.try_iter());
    assert_eq!(refusals(&logged), 3, "{logged:?}");
    assert!(!logged.iter().any(|l| l.contains("s3cret")), "{logged:?}");
    // The poll interval is an hour: only a wake-up can deploy c2, and the
    // refused requests caused none.
    assert_eq!(record(&env, &c2), Value::Null);

    let signed = format!("sha256={}", sign("s3cret", body));
    assert_eq!(post(&w.addr, &[("X-Hub-Signature-256", signed)], body), 202);
    assert_eq!(until_recorded(&env, &c2)["status"], "deployed");
    assert_eq!(env.sim("stable-1")["release"], short(&c2));

    // Gitea's style wakes it too.
    let c3 = repo.commit("three");
    repo.push("feature/x");
    assert_eq!(
        post(&w.addr, &[("X-Gitea-Signature", sign("s3cret", body))], body),
        202
    );
    assert_eq!(until_recorded(&env, &c3)["status"], "deployed");
}

#[test]
fn watch_configuration_is_checked_before_anything_is_touched() {
    let base = config(RULES);
    let regions = base.replace(
        "pattern = \"feature/*\"\nstrategy = \"rolling\"\n",
        "pattern = \"*\"\nstrategy = \"rolling\"\nregions = [\"staging\"]\n",
    );
    assert_has(
        &rejects(&regions),
        &["gitops.branches[1].regions", "no [[regions]]"],
    );
    let dash = base.replace("pattern = \"main\"", "pattern = \"-main\"");
    assert_has(
        &rejects(&dash),
        &["gitops.branches[0].pattern", "not a branch pattern"],
    );
    let no_releases = base.replace("releases = \"releases\"\n", "");
    assert_has(&rejects(&no_releases), &["releases", "[gitops]"]);
    let twice = format!("{base}[[gitops.gates]]\nname = \"it\"\ncommand = [\"true\"]\n\n[[gitops.gates]]\nname = \"it\"\ncommand = [\"true\"]\n");
    assert_has(&rejects(&twice), &["gitops.gates[1].name"]);
    let blue_green = base.replace("strategy = \"canary\"", "strategy = \"blue-green\"");
    assert_has(
        &rejects(&blue_green),
        &["gitops.branches[0].strategy", "blue-green"],
    );
    let build = format!(
        "{}build = [\"make\"]\n\n{RULES}",
        base.split(RULES).next().unwrap()
    );
    assert_has(&rejects(&build), &["gitops.build_output"]);

    // --webhook without a secret: exit 2, nothing created.
    let env = Env::new(&base);
    let (code, out, err) = deploykit(&env, &["watch", "--webhook", "127.0.0.1:0"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert_has(&err, &["webhook_secret_env"]);
    assert!(!env.path().join(".deploykit").exists());
    // A commit id that is not one is refused by deploy.
    let (code, _, err) = deploykit(&env, &["deploy", "v1", "--commit", "not-hex"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["commit"]);
}

/// Waits, bounded by 60 s, until the newest journal deploys `release` and
/// waits for a promotion.
fn until_awaiting_promotion(env: &Env, release: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = if env.journal_count() > 0 {
            env.newest_journal()
        } else {
            Vec::new()
        };
        let ours = j.first().is_some_and(|h| h["release"] == release);
        if ours && j.iter().any(|r| r["event"] == "awaiting_promotion") {
            return;
        }
        assert!(Instant::now() < deadline, "{release} never waited for promotion");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pushes_during_a_deployment_are_queued_and_only_the_newest_follows() {
    let env = Env::new(
        &config(&format!("webhook_secret_env = \"HOOK_SECRET\"\n\n{RULES}"))
            .replace("[strategy.canary]", "[strategy.canary]\npromotion = \"manual\""),
    );
    let repo = Repo::new(&env);
    env.ok(&["deploy", "v0"], 0);
    let w = watching(&env);
    let body = r#"{"ref":"refs/heads/main"}"#;
    let signed = || vec![("X-Hub-Signature-256", format!("sha256={}", sign("s3cret", body)))];
    let c1 = repo.commit("one");
    repo.push("main");
    assert_eq!(post(&w.addr, &signed(), body), 202);
    // The canary of c1 holds, waiting for a promotion: a deployment runs.
    until_awaiting_promotion(&env, short(&c1));
    let c2 = repo.commit("two");
    repo.push("main");
    let c3 = repo.commit("three");
    repo.push("main");
    // A burst of wake-ups while it runs.
    for _ in 0..3 {
        assert_eq!(post(&w.addr, &signed(), body), 202);
    }
    assert_eq!(
        record(&env, &c2),
        Value::Null,
        "nothing recorded while c1 deploys"
    );
    env.ok(&["promote"], 0);
    assert_eq!(until_recorded(&env, &c1)["status"], "deployed");
    until_awaiting_promotion(&env, short(&c3));
    env.ok(&["promote"], 0);
    assert_eq!(until_recorded(&env, &c3)["status"], "deployed");
    assert_eq!(record(&env, &c2)["status"], "skipped");
    let deployed: Vec<String> = headers(&env)
        .iter()
        .filter_map(|h| h["commit"]["sha"].as_str().map(str::to_string))
        .collect();
    assert_eq!(deployed, [c1, c3], "c2 was never deployed");
}

/// Three regions — `staging`, then `eu` and `us` — of a stable instance
/// pair and a canary each, behind their own simulated load balancers, with
/// the fast waits of [`config`], the rules `main` → canary everywhere and
/// `feature/*` → rolling to staging, and `extra` in `[gitops]`.
fn regions_config(extra: &str) -> String {
    let base = config("");
    let (head, _) = base.split_once("[[instances]]").unwrap();
    let (_, tail) = base.split_once("[metrics]").unwrap();
    let (middle, _) = tail.split_once("[gitops]").unwrap();
    let mut c = format!("{head}[metrics]{middle}");
    for (k, r) in ["staging", "eu", "us"].iter().enumerate() {
        c.push_str(&format!(
            "[[regions]]\nname = \"{r}\"\n[regions.load_balancer]\nkind = \"simulated\"\n"
        ));
        for (i, (id, group)) in [
            ("stable-1", "stable"),
            ("stable-2", "stable"),
            ("canary-1", "canary"),
        ]
        .iter()
        .enumerate()
        {
            c.push_str(&format!(
                "[[regions.instances]]\nid = \"{r}-{id}\"\naddress = \"127.0.0.1:{}\"\ngroup = \"{group}\"\n",
                18500 + k * 10 + i
            ));
        }
        c.push('\n');
    }
    c.push_str("[rollout]\nwaves = [[\"staging\"], [\"eu\", \"us\"]]\n\n");
    c.push_str(&format!(
        "[gitops]\nrepository = \"origin.git\"\ninterval = \"1h\"\n{extra}\n\
         [[gitops.branches]]\npattern = \"main\"\nstrategy = \"canary\"\n\n\
         [[gitops.branches]]\npattern = \"feature/*\"\nstrategy = \"rolling\"\nregions = [\"staging\"]\n"
    ));
    c
}

/// The release a simulated instance of `region` runs, from the region's
/// own state directory.
fn region_release(env: &Env, region: &str, id: &str) -> String {
    let p = env
        .state()
        .join("regions")
        .join(region)
        .join("simulated")
        .join("instances.log");
    let log = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|v| v["id"] == format!("{region}-{id}"))
        .and_then(|v| v["release"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{} has no release for {region}-{id}:\n{log}", p.display()))
}

/// Every journal header of `region`, oldest first.
fn region_headers(env: &Env, region: &str) -> Vec<Value> {
    let dir = env.state().join("regions").join(region).join("journal");
    let mut out: Vec<Value> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
            serde_json::from_str(text.lines().next().unwrap()).unwrap()
        })
        .collect();
    out.sort_by_key(|h| h["sequence"].as_u64());
    out
}

fn targets_written(env: &Env) -> Vec<String> {
    std::fs::read_to_string(env.path().join("targets.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_feature_branch_goes_to_staging_only_and_main_goes_to_every_region_as_a_canary() {
    // Also: main fast-forwarded to the feature's commit takes it to the
    // regions it has not reached.
    // The gate runs in releases/<short>/: ../../ is the environment's directory.
    let gate = "\n[[gitops.gates]]\nname = \"e2e\"\n\
        command = [\"sh\", \"-c\", \"echo $DEPLOYKIT_REGIONS: $DEPLOYKIT_TARGET_URLS >> ../../targets.txt\"]\n";
    let env = Env::new(&regions_config(gate));
    let repo = Repo::new(&env);
    // Every region runs v0 first, so a canary has a stable release to
    // compare with.
    env.ok(&["deploy", "v0"], 0);

    repo.switch("feature/x");
    let fx = repo.commit("feature");
    repo.push("feature/x");
    watch_once(&env);
    let rec = record(&env, &fx);
    assert_eq!(rec["status"], "deployed", "{rec}");
    assert_eq!(rec["strategy"], "rolling");
    assert_eq!(rec["regions"], serde_json::json!(["staging"]), "{rec}");
    let staging = region_headers(&env, "staging");
    let last = staging.last().unwrap();
    assert_eq!(last["strategy"], "rolling");
    assert_eq!(last["commit"]["sha"], fx.as_str());
    assert_eq!(
        rec["deployments"],
        serde_json::json!({"staging": last["deployment"]}),
        "{rec}"
    );
    for id in ["stable-1", "stable-2", "canary-1"] {
        assert_eq!(region_release(&env, "staging", id), short(&fx), "staging {id}");
    }
    // The other regions are untouched: still v0, no journal but v0's.
    for r in ["eu", "us"] {
        for id in ["stable-1", "stable-2"] {
            assert_eq!(region_release(&env, r, id), "v0", "{r} {id}");
        }
        let h = region_headers(&env, r);
        assert_eq!(h.len(), 1, "{r} ran only v0: {h:?}");
        assert_eq!(h[0]["release"], "v0");
    }
    // The gate saw the staging instances only.
    assert_eq!(
        targets_written(&env),
        ["staging: http://127.0.0.1:18500 http://127.0.0.1:18501 http://127.0.0.1:18502"]
    );

    // main fast-forwarded to that commit: it goes on to the regions it has
    // not reached, as main's rule says (a canary); staging is not redeployed.
    repo.push("main");
    let staging_runs = region_headers(&env, "staging").len();
    watch_once(&env);
    let rec = record(&env, &fx);
    assert_eq!(rec["status"], "deployed", "{rec}");
    assert_eq!(rec["branch"], "main");
    assert_eq!(rec["strategy"], "canary");
    assert_eq!(
        rec["regions"],
        serde_json::json!(["staging", "eu", "us"]),
        "{rec}"
    );
    let staging = region_headers(&env, "staging");
    assert_eq!(staging.len(), staging_runs, "staging was deployed again");
    assert_eq!(
        rec["deployments"]["staging"],
        staging.last().unwrap()["deployment"]
    );
    for r in ["eu", "us"] {
        let h = region_headers(&env, r);
        let last = h.last().unwrap();
        assert_eq!(h.len(), 2, "{r}: {h:?}");
        assert_eq!(last["strategy"], "canary", "{r}");
        assert_eq!(last["commit"]["sha"], fx.as_str(), "{r}");
        assert_eq!(rec["deployments"][r], last["deployment"], "{r}: {rec}");
        for id in ["stable-1", "stable-2"] {
            assert_eq!(region_release(&env, r, id), short(&fx), "{r} {id}");
        }
    }
    assert_eq!(
        targets_written(&env)[1],
        "eu us: http://127.0.0.1:18510 http://127.0.0.1:18511 http://127.0.0.1:18520 http://127.0.0.1:18521"
    );
    // Another poll finds nothing left to do.
    let runs: usize = ["staging", "eu", "us"]
        .iter()
        .map(|r| region_headers(&env, r).len())
        .sum();
    watch_once(&env);
    let after: usize = ["staging", "eu", "us"]
        .iter()
        .map(|r| region_headers(&env, r).len())
        .sum();
    assert_eq!(after, runs);

    repo.switch("main");
    let c1 = repo.commit("release one");
    repo.push("main");
    watch_once(&env);
    let rec = record(&env, &c1);
    assert_eq!(rec["status"], "deployed", "{rec}");
    assert_eq!(rec["strategy"], "canary");
    assert_eq!(
        rec["regions"],
        serde_json::json!(["staging", "eu", "us"]),
        "{rec}"
    );
    for r in ["staging", "eu", "us"] {
        let h = region_headers(&env, r);
        let last = h.last().unwrap();
        assert_eq!(last["strategy"], "canary", "{r}");
        assert_eq!(last["commit"]["sha"], c1.as_str(), "{r}");
        assert_eq!(rec["deployments"][r], last["deployment"], "{r}: {rec}");
        for id in ["stable-1", "stable-2"] {
            assert_eq!(region_release(&env, r, id), short(&c1), "{r} {id}");
        }
    }
    // After the canaries, the stable instances of every region serve it.
    assert_eq!(
        targets_written(&env)[2],
        "staging eu us: http://127.0.0.1:18500 http://127.0.0.1:18501 \
         http://127.0.0.1:18510 http://127.0.0.1:18511 http://127.0.0.1:18520 http://127.0.0.1:18521"
    );
    let status = env.ok(&["status"], 0);
    assert!(
        status.contains(&format!("last multi-region run: {}: succeeded", short(&c1))),
        "{status}"
    );
}

#[test]
fn a_failing_gate_after_a_regional_deployment_rolls_back_only_the_regions_it_went_to() {
    let gate = "\n[[gitops.gates]]\nname = \"integration\"\n\
        command = [\"sh\", \"-c\", \"grep -q good app.txt || { echo 'staging broken' >&2; exit 4; }\"]\n";
    let env = Env::new(&regions_config(gate));
    let repo = Repo::new(&env);
    env.ok(&["deploy", "v0"], 0);
    repo.switch("feature/x");
    let bad = repo.commit("bad");
    repo.push("feature/x");
    watch_once(&env);
    let rec = record(&env, &bad);
    assert_eq!(rec["status"], "gate_failed", "{rec}");
    assert_eq!(rec["gate"]["exit_code"], 4);
    assert_has(rec["gate"]["output_tail"].as_str().unwrap(), &["staging broken"]);
    assert!(rec["reason"].as_str().unwrap().contains("rolled back"), "{rec}");
    let staging = region_headers(&env, "staging");
    assert_eq!(staging.last().unwrap()["kind"], "rollback", "{staging:?}");
    for id in ["stable-1", "stable-2", "canary-1"] {
        assert_eq!(region_release(&env, "staging", id), "v0", "staging {id}");
    }
    for r in ["eu", "us"] {
        assert_eq!(
            region_headers(&env, r).len(),
            1,
            "{r} was neither deployed nor rolled back"
        );
    }
}

#[test]
fn regions_of_a_rule_are_checked_against_the_file_when_it_is_loaded() {
    let base = regions_config("");
    let unknown = base.replace("regions = [\"staging\"]", "regions = [\"stagin\"]");
    assert_has(
        &rejects(&unknown),
        &[
            "gitops.branches[1].regions",
            "stagin is not a region",
            "staging, eu, us",
        ],
    );
    let empty = base.replace("regions = [\"staging\"]", "regions = []");
    assert_has(&rejects(&empty), &["gitops.branches[1].regions", "empty"]);
    let twice = base.replace("regions = [\"staging\"]", "regions = [\"eu\", \"eu\"]");
    assert_has(&rejects(&twice), &["gitops.branches[1].regions", "twice"]);
    // Refused before anything is touched.
    let env = Env::new(&unknown);
    let (code, out, err) = deploykit(&env, &["watch", "--once"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert_has(&err, &["gitops.branches[1].regions"]);
    assert!(!env.path().join(".deploykit").exists());
    assert!(!env.path().join("releases").exists());
}

#[test]
fn a_watcher_without_its_record_deploys_nothing_the_shared_history_shows_deployed() {
    let gate =
        "[[gitops.gates]]\nname = \"integration\"\ncommand = [\"sh\", \"-c\", \"grep -q good app.txt\"]\n";
    let env = Env::new(&config(&format!("{RULES}{gate}")));
    let repo = Repo::new(&env);
    repo.switch("feature/x");
    repo.commit("good");
    repo.push("feature/x");
    watch_once(&env);
    let bad = repo.commit("bad");
    repo.push("feature/x");
    watch_once(&env);
    let rec = record(&env, &bad);
    assert_eq!(rec["status"], "gate_failed", "{rec}");
    assert!(rec["reason"].as_str().unwrap().ends_with("rolled back"), "{rec}");
    let h = headers(&env);
    let deployed = h.iter().rfind(|h| h["kind"] == "deploy").unwrap()["deployment"].clone();
    let rollback = h.last().unwrap();
    assert_eq!(rollback["kind"], "rollback");
    let rollback = rollback["deployment"].clone();

    // As a watcher on another machine sharing the state would: no record
    // of its own, only the shared journals.
    std::fs::remove_file(env.state().join("gitops").join("commits.json")).unwrap();
    let runs = env.journal_count();
    watch_once(&env);
    assert_eq!(env.journal_count(), runs, "the commit was deployed again");
    let rec = record(&env, &bad);
    assert_eq!(rec["status"], "already_deployed", "{rec}");
    assert_eq!(rec["deployment"], deployed);
    assert_has(
        rec["reason"].as_str().unwrap(),
        &[
            deployed.as_str().unwrap(),
            &format!("rolled back by {}", rollback.as_str().unwrap()),
        ],
    );

    // A commit deployed by hand with --commit is not deployed again either.
    let good = repo.commit("good again");
    env.ok(&["deploy", "v9", "--commit", &good], 0);
    repo.push("feature/x");
    let runs = env.journal_count();
    watch_once(&env);
    assert_eq!(env.journal_count(), runs);
    assert_eq!(record(&env, &good)["status"], "already_deployed");
}

#[test]
fn a_region_held_by_a_deployment_of_its_own_makes_the_watcher_wait_not_fail() {
    let env = Env::new(
        &regions_config("").replace("[strategy.canary]", "[strategy.canary]\npromotion = \"manual\""),
    );
    let repo = Repo::new(&env);
    env.ok(&["deploy", "v0"], 0);
    // A manual canary in staging alone, waiting for its promotion, holds
    // staging's lock (not the file's).
    let mut manual = std::process::Command::new(assert_cmd::cargo::cargo_bin("deploykit"))
        .current_dir(env.path())
        .env_remove("DEPLOYKIT_CONFIG")
        .args([
            "-q",
            "--region",
            "staging",
            "deploy",
            "v1",
            "--strategy",
            "canary",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let waiting = region_headers(&env, "staging").len() == 2 && {
            let dir = env.state().join("regions/staging/journal");
            std::fs::read_dir(dir).unwrap().any(|e| {
                std::fs::read_to_string(e.unwrap().path())
                    .unwrap()
                    .contains("\"awaiting_promotion\"")
            })
        };
        if waiting {
            break;
        }
        assert!(manual.try_wait().unwrap().is_none(), "the manual canary ended");
        assert!(Instant::now() < deadline, "the manual canary never waited");
        std::thread::sleep(Duration::from_millis(50));
    }
    repo.switch("feature/x");
    let fx = repo.commit("feature");
    repo.push("feature/x");
    let (code, out, err) = deploykit(&env, &["watch", "--once"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_has(&err, &["region staging", "holds its lock"]);
    assert!(out.contains("trying again at the next poll"), "{out}");
    assert_eq!(
        record(&env, &fx),
        Value::Null,
        "a commit refused by a lock is not recorded"
    );
    assert_eq!(region_headers(&env, "staging").len(), 2);

    env.ok(&["--region", "staging", "promote"], 0);
    assert_eq!(manual.wait().unwrap().code(), Some(0));
    watch_once(&env);
    assert_eq!(record(&env, &fx)["status"], "deployed");
    for id in ["stable-1", "stable-2"] {
        assert_eq!(region_release(&env, "staging", id), short(&fx), "{id}");
        assert_eq!(region_release(&env, "eu", id), "v0", "{id}");
    }
}

#[test]
fn a_commit_deployed_to_a_region_by_hand_goes_on_to_the_other_regions_only() {
    let env = Env::new(&regions_config(""));
    let repo = Repo::new(&env);
    env.ok(&["deploy", "v0"], 0);
    let c1 = repo.commit("one");
    // Deployed to staging by hand, with its commit: the watcher has no
    // record of it, only staging's journal.
    env.ok(
        &[
            "deploy",
            short(&c1),
            "--commit",
            &c1,
            "--regions",
            "staging",
            "--strategy",
            "rolling",
        ],
        0,
    );
    assert_eq!(region_headers(&env, "staging").len(), 2);
    repo.push("main");
    let out = watch_once(&env);
    assert!(
        out.contains("staging deployed this commit already: left out"),
        "{out}"
    );
    let rec = record(&env, &c1);
    assert_eq!(rec["status"], "deployed", "{rec}");
    assert_eq!(
        region_headers(&env, "staging").len(),
        2,
        "staging was deployed again"
    );
    for r in ["eu", "us"] {
        let h = region_headers(&env, r);
        assert_eq!(h.len(), 2, "{r}: {h:?}");
        assert_eq!(h[1]["commit"]["sha"], c1.as_str(), "{r}");
        assert_eq!(h[1]["strategy"], "canary", "{r}");
    }
    // Every region has it now: a watcher without its record deploys nothing.
    std::fs::remove_file(env.state().join("gitops").join("commits.json")).unwrap();
    watch_once(&env);
    assert_eq!(record(&env, &c1)["status"], "already_deployed");
    for r in ["staging", "eu", "us"] {
        assert_eq!(region_headers(&env, r).len(), 2, "{r}");
    }
}
