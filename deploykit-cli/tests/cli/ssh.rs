//! The CLI on SSH instances: real `sshd` daemons on loopback addresses (the
//! lab of the testkit's real-server tests), releases streamed over SSH,
//! processes started and stopped over SSH.

#[path = "../../../deploykit-e2e/tests/real/sshd.rs"]
mod sshd;

use crate::util::Env;

/// Writes a deploykit.toml for one instance per host of `lab` (processes
/// `sleep 600` started over SSH, releases under `<env>/instances/<id>`);
/// returns that root.
fn write_config(lab: &sshd::SshLab, env: &Env) -> std::path::PathBuf {
    let root = env.path().join("instances");
    let mut cfg = format!(
        "app = \"shop\"\nreleases = \"builds\"\n\n[instance_defaults]\nroot = \"{}/{{id}}\"\n\
         command = [\"sleep\", \"600\"]\nhealth = \"service\"\nstop_grace = \"2s\"\n\
         ssh_key = \"{}\"\nssh_known_hosts = \"{}\"\n\n",
        root.display(),
        lab.client_key.display(),
        lab.known_hosts.display()
    );
    for (i, h) in lab.hosts.iter().enumerate() {
        cfg.push_str(&format!(
            "[[instances]]\nid = \"web-{}\"\naddress = \"{}:8080\"\nhost = \"ssh://{}@{}:{}\"\n\n",
            i + 1,
            h.ip,
            lab.user,
            h.ip,
            h.port
        ));
    }
    cfg.push_str(
        "[load_balancer]\nkind = \"simulated\"\n\n[strategy.rolling]\nhealth_interval = \"100ms\"\n\
         stabilisation = \"50ms\"\ndrain_timeout = \"1s\"\n\n[timeouts]\ndrain_poll = \"50ms\"\n",
    );
    std::fs::write(env.path().join("deploykit.toml"), cfg).unwrap();
    root
}

#[test]
fn deploy_status_and_rollback_on_ssh_instances() {
    let Some(lab) = sshd::SshLab::start(2) else { return };
    let env = Env::new("");
    env.releases(&["v1", "v2"]);
    let root = write_config(&lab, &env);
    env.ok(&["validate"], 0);
    let plan = env.ok(&["plan", "v1"], 0);
    assert!(plan.contains("web-2 (none -> v1)"), "{plan}");
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id).as_deref(), Some("v2"), "{id}");
        assert!(env.local_running(id), "{id} runs (started over SSH)");
        assert_eq!(
            std::fs::read_to_string(root.join(id).join("current/VERSION")).unwrap(),
            "v2"
        );
    }
    let status = env.ok(&["status"], 0);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("web-2") && l.contains("v2") && l.contains("healthy")),
        "{status}"
    );
    env.ok(&["rollback"], 0);
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id).as_deref(), Some("v1"), "{id}");
        assert!(env.local_running(id), "{id}");
    }
}

/// The CLI killed (as by `kill -9`) at each step of an SSH instance's
/// replacement: the next run reconnects, `status` reads what each host
/// runs over SSH, and `rollback` / `deploy --resume` (in turn) bring both
/// hosts to one release, running, every instance in rotation.
#[test]
fn ssh_instances_recover_from_a_crash_at_each_step() {
    let Some(lab) = sshd::SshLab::start(2) else { return };
    let env = Env::new("");
    env.releases(&["v1", "v2"]);
    let root = write_config(&lab, &env);
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    let journal = env.newest_journal();
    let at = |step: &str, id: &str| {
        journal
            .iter()
            .position(|r| r["event"] == "step_finished" && r["step"] == step && r["instance"] == id)
            .unwrap_or_else(|| panic!("no {step} of {id}"))
            + 1
    };
    let points = [
        ("drain", "web-1"),
        ("stop", "web-1"),
        ("install", "web-1"),
        ("start", "web-1"),
        ("enable", "web-1"),
        ("stop", "web-2"),
    ];
    let mut current = "v2";
    for (k, (step, id)) in points.into_iter().enumerate() {
        let n = at(step, id);
        let target = if current == "v1" { "v2" } else { "v1" };
        let out = env
            .cmd()
            .env("DEPLOYKIT_TEST_ABORT_AFTER_RECORD", n.to_string())
            .args(["-q", "deploy", target])
            .output()
            .unwrap();
        assert!(!out.status.success(), "after {step} of {id}: not interrupted");
        let s: serde_json::Value = serde_json::from_str(env.ok(&["--json", "status"], 0).trim()).unwrap();
        assert_eq!(
            s["deployment"]["history"]["outcome"], "interrupted",
            "after {step} of {id}: {s}"
        );
        for (i, each) in ["web-1", "web-2"].iter().enumerate() {
            assert_eq!(
                s["instances"][i]["release"].as_str().map(str::to_string),
                env.local_release(each),
                "after {step} of {id}: status reads what {each} runs over SSH"
            );
        }
        let expect = if k % 2 == 0 {
            env.ok(&["-q", "rollback"], 0);
            current
        } else {
            env.ok(&["-q", "deploy", "--resume"], 0);
            target
        };
        for each in ["web-1", "web-2"] {
            assert_eq!(
                env.local_release(each).as_deref(),
                Some(expect),
                "after {step} of {id}: {each}"
            );
            assert!(env.local_running(each), "after {step} of {id}: {each} runs");
            assert_eq!(
                std::fs::read_to_string(root.join(each).join("current/VERSION")).unwrap(),
                expect
            );
        }
        assert!(
            env.out_of_rotation().is_empty(),
            "after {step} of {id}: out of rotation: {:?}",
            env.out_of_rotation()
        );
        current = expect;
    }
}

#[test]
fn a_changed_or_unknown_host_key_is_reported_once_with_the_fix_the_cli_offers() {
    let Some(lab) = sshd::SshLab::start(1) else { return };
    let env = Env::new("");
    env.releases(&["v1"]);
    write_config(&lab, &env);
    let h = &lab.hosts[0];
    let other = lab.other_key_line("impostor");
    std::fs::write(&lab.known_hosts, format!("[{}]:{} {other}\n", h.ip, h.port)).unwrap();
    let (code, out, err) = env.run(&["deploy", "v1"]);
    assert_ne!(code, 0, "{out}\n{err}");
    let all = format!("{out}{err}");
    assert_eq!(
        all.matches("HOST KEY MISMATCH").count(),
        1,
        "reported once:\n{all}"
    );
    assert!(all.contains("ssh-keygen -R"), "{all}");
    std::fs::write(&lab.known_hosts, "").unwrap();
    let (code, out, err) = env.run(&["deploy", "v1"]);
    assert_ne!(code, 0, "{out}\n{err}");
    let all = format!("{out}{err}");
    assert_eq!(
        all.matches("unknown host key").count(),
        1,
        "reported once:\n{all}"
    );
    assert!(all.contains("ssh-keyscan"), "{all}");
    assert!(
        !all.to_lowercase().contains("trust-on-first-use")
            && !all.to_lowercase().contains("trust on first use"),
        "the CLI has no such option:\n{all}"
    );
}
