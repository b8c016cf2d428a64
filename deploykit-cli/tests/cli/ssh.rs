//! The CLI on SSH instances: real `sshd` daemons on loopback addresses (the
//! lab of the testkit's real-server tests), releases streamed over SSH,
//! processes started and stopped over SSH.

#[path = "../../../deploykit-testkit/tests/real/sshd.rs"]
mod sshd;

use crate::util::Env;

#[test]
fn deploy_status_and_rollback_on_ssh_instances() {
    let Some(lab) = sshd::SshLab::start(2) else { return };
    let env = Env::new("");
    env.releases(&["v1", "v2"]);
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
