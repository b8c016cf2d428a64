//! `deploykit top` in a real terminal: tmux runs it in a detached session,
//! `capture-pane` reads the screen, `send-keys q` quits it.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::Env;

/// tmux on PATH; a missing tmux fails the test, in CI or not (scripts/test
/// installs it).
fn tmux_binary() -> PathBuf {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("tmux"))
        .find(|p| p.is_file())
        .expect("tmux is not installed: CLI tests never skip (scripts/test installs it)")
}

/// A tmux server of its own (its own socket name), killed on drop.
pub(crate) struct Tmux {
    bin: PathBuf,
    socket: String,
}

impl Tmux {
    pub(crate) fn new() -> Self {
        Self {
            bin: tmux_binary(),
            socket: format!(
                "deploykit-top-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            )
            .replace(['(', ')'], ""),
        }
    }

    pub(crate) fn cmd(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.env_remove("TMUX").args(["-L", &self.socket, "-f", "/dev/null"]);
        c
    }

    /// The visible screen of the session.
    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (at most 60 s) until the screen shows every one of `parts`.
    pub(crate) fn wait_for(&self, parts: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.screen();
            if parts.iter().all(|p| s.contains(p)) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the screen never showed {parts:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn alive(&self) -> bool {
        self.cmd()
            .args(["has-session", "-t", "top"])
            .output()
            .unwrap()
            .status
            .success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

#[test]
fn top_follows_a_running_canary_in_tmux_and_quits_on_q() {
    let prom = crate::util::prometheus(|_| 0.001);
    let env = Env::new(&format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18491\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18492\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [25, 100]\nstage_duration = \"300ms\"\ncheck_interval = \"100ms\"\n\
        promotion = \"manual\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    ));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);

    let tmux = Tmux::new();
    let bin = assert_cmd::cargo::cargo_bin("deploykit");
    let started = tmux
        .cmd()
        .args(["new-session", "-d", "-s", "top", "-x", "120", "-y", "40", "-c"])
        .arg(env.path())
        .args(["-e", "TERM=xterm-256color"])
        .arg(&bin)
        .args(["top", "--interval", "100ms"])
        .output()
        .unwrap();
    assert!(
        started.status.success(),
        "{}",
        String::from_utf8_lossy(&started.stderr)
    );
    tmux.wait_for(&[
        "deploykit top · shop",
        "recreate of v1",
        "succeeded",
        "stage 1/4",
        "stage 4/4",
    ]);

    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    let screen = tmux.wait_for(&[
        "canary of v2",
        "in progress",
        "canary stage 1 waits for promotion",
        "canary 25% · stable 75%",
        "stage 1/",
        "canary-1",
        "last analysis: stage 1 at 25%, pass",
        "canary error rate",
    ]);
    assert!(screen.contains("running"), "{screen}");
    assert!(screen.contains("pending"), "the plan's later stages:\n{screen}");

    env.ok(&["promote"], 0);
    assert_eq!(deploy.wait().unwrap().code(), Some(0));
    tmux.wait_for(&["canary of v2", "succeeded", "canary 100% · stable 0%"]);

    let quit = tmux.cmd().args(["send-keys", "-t", "top", "q"]).output().unwrap();
    assert!(quit.status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    while tmux.alive() {
        assert!(
            Instant::now() < deadline,
            "top did not quit on q:\n{}",
            tmux.screen()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn top_refuses_to_draw_without_a_terminal() {
    let env = Env::new(&crate::util::simulated(1, ""));
    let (code, _, err) = env.run(&["top"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("terminal") && err.contains("deploykit status"),
        "{err}"
    );
}
