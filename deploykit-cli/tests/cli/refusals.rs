//! What is refused before anything is touched: each case exits 2 (bad
//! input) naming what to fix, and the fleet, the state directory and the
//! releases are as they were.

use crate::util::{assert_has, local, rejects, simulated, Env};

/// Two simulated instances in the environments blue and green, with no
/// load balancer and the rolling strategy: valid as written.
fn two_environments_without_a_balancer() -> String {
    "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
     [[instances]]\nid = \"blue-1\"\naddress = \"127.0.0.1:18091\"\ngroup = \"blue\"\n\n\
     [[instances]]\nid = \"green-1\"\naddress = \"127.0.0.1:18092\"\ngroup = \"green\"\n\n\
     [strategy.rolling]\nhealth_interval = \"20ms\"\nstabilisation = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
     [timeouts]\ndrain_poll = \"20ms\"\n"
        .to_string()
}

#[test]
fn a_strategy_override_gets_the_checks_of_the_file() {
    let env = Env::new(&two_environments_without_a_balancer());
    env.ok(&["deploy", "v1"], 0);
    let journals = env.journal_count();
    for (strategy, names) in [
        (
            "blue-green",
            ["--strategy blue-green", "load_balancer.kind", "switches traffic"],
        ),
        ("canary", ["--strategy canary", "group", "canary"]),
    ] {
        let (code, out, err) = env.run(&["deploy", "v2", "--strategy", strategy]);
        assert_eq!(
            code, 2,
            "deploy --strategy {strategy}\nstdout: {out}\nstderr: {err}"
        );
        for n in names {
            assert!(err.contains(n), "expected {n:?} in:\n{err}");
        }
        let (code, _, err) = env.run(&["plan", "v2", "--strategy", strategy]);
        assert_eq!(code, 2, "plan --strategy {strategy}: {err}");
    }
    for id in ["blue-1", "green-1"] {
        assert_eq!(env.sim(id)["release"], "v1", "{id} was touched");
        assert_eq!(env.sim(id)["running"], true, "{id} was stopped");
    }
    assert_eq!(
        env.journal_count(),
        journals,
        "a refused deployment left a journal"
    );
    // The same override where it fits still runs.
    env.ok(&["deploy", "v2", "--strategy", "recreate"], 0);
}

/// Every duration key of the file, as (key path, where it is written).
const DURATION_KEYS: [(&str, &str); 33] = [
    ("instances[0].stop_grace", "instance"),
    ("instances[0].health_timeout", "instance"),
    (
        "load_balancer.reload_timeout",
        "[load_balancer]\nkind = \"nginx\"\ninclude_file = \"up.conf\"",
    ),
    (
        "load_balancer.timeout",
        "[load_balancer]\nkind = \"haproxy\"\nsocket = \"admin.sock\"",
    ),
    ("instance_defaults.stop_grace", "[instance_defaults]"),
    (
        "metrics.timeout",
        "[metrics]\nprometheus = \"http://127.0.0.1:9090\"",
    ),
    ("smoke_checks[0].timeout", "[[smoke_checks]]\npath = \"/\""),
    ("notifications.timeout", "[notifications]"),
    ("retry.backoff", "[retry]"),
    ("timeouts.stop", "[timeouts]"),
    ("timeouts.force_stop", "[timeouts]"),
    ("timeouts.install", "[timeouts]"),
    ("timeouts.restore", "[timeouts]"),
    ("timeouts.start", "[timeouts]"),
    ("timeouts.health_probe", "[timeouts]"),
    ("timeouts.load_balancer", "[timeouts]"),
    ("timeouts.query", "[timeouts]"),
    ("timeouts.drain_poll", "[timeouts]"),
    ("strategy.rolling.health_interval", "[strategy.rolling]"),
    ("strategy.rolling.drain_timeout", "[strategy.rolling]"),
    ("strategy.rolling.stabilisation", "[strategy.rolling]"),
    ("strategy.recreate.health_interval", "[strategy.recreate]"),
    ("strategy.recreate.drain_timeout", "[strategy.recreate]"),
    ("strategy.blue-green.healthy_deadline", "[strategy.blue-green]"),
    ("strategy.blue-green.health_interval", "[strategy.blue-green]"),
    ("strategy.blue-green.keep_old", "[strategy.blue-green]"),
    ("strategy.canary.stage_duration", "[strategy.canary]"),
    ("strategy.canary.check_interval", "[strategy.canary]"),
    ("strategy.canary.latency_threshold", "[strategy.canary]"),
    ("strategy.canary.window", "[strategy.canary]"),
    ("strategy.canary.health_interval", "[strategy.canary]"),
    ("strategy.canary.drain_timeout", "[strategy.canary]"),
    (
        "strategy.canary.promotion_timeout",
        "[strategy.canary]\npromotion = \"manual\"",
    ),
];

/// A valid one-instance file with `key = value` written where `table` says.
fn with_duration(key: &str, table: &str, value: &str) -> String {
    let name = key.rsplit('.').next().unwrap();
    let mut c = String::from(
        "app = \"shop\"\n\n[[instances]]\nid = \"web-1\"\naddress = \"127.0.0.1:18081\"\nsimulated = true\n",
    );
    if table == "instance" {
        c.push_str(&format!("{name} = {value}\n"));
    } else {
        c.push_str(&format!("\n{table}\n{name} = {value}\n"));
    }
    c
}

#[test]
fn every_duration_key_has_one_upper_bound_in_every_form() {
    for (key, table) in DURATION_KEYS {
        // Each key is valid with a plain value, so the refusals below are the
        // bound's.
        let env = Env::new(&with_duration(key, table, "\"2s\""));
        env.ok(&["validate"], 0);
        for value in [
            "18446744073709551615",
            "9223372036854775807",
            "31536001",
            "\"8761h\"",
            "\"1e9s\"",
        ] {
            let env = Env::new(&with_duration(key, table, value));
            let (code, out, err) = env.run(&["validate"]);
            assert_eq!(code, 2, "{key} = {value}\nstdout: {out}\nstderr: {err}");
            assert!(
                err.contains(&format!("invalid {key}:")),
                "{key} = {value}: the key is not named in:\n{err}"
            );
            if value != "\"1e9s\"" {
                assert!(
                    err.contains("8760h (365 days)"),
                    "{key} = {value}: the bound is not named in:\n{err}"
                );
            }
            assert!(!err.contains("panicked"), "{err}");
        }
        // The bound itself is accepted, written either way.
        for value in ["31536000", "\"8760h\""] {
            let env = Env::new(&with_duration(key, table, value));
            let (code, _, err) = env.run(&["validate"]);
            assert!(code == 0 || !err.contains("8760h"), "{key} = {value}: {err}");
        }
    }
}

#[test]
fn a_release_that_does_not_exist_is_refused_before_the_first_step() {
    let env = Env::new(&local(2, ""));
    env.releases(&["v1"]);
    env.ok(&["deploy", "v1"], 0);
    let journals = env.journal_count();
    let (code, out, err) = env.run(&["deploy", "v99"]);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    let missing = env.path().join("builds").join("v99");
    assert!(
        err.contains(&missing.display().to_string()),
        "the path is not named in:\n{err}"
    );
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id).as_deref(), Some("v1"), "{id} was touched");
        assert!(env.local_running(id), "{id} was stopped");
    }
    assert!(env.out_of_rotation().is_empty(), "an instance was drained");
    assert_eq!(
        env.journal_count(),
        journals,
        "a refused deployment left a journal"
    );
}

#[test]
fn the_filesystem_root_is_not_an_instance_root() {
    for root in ["/", "//", "/.", "/./"] {
        let err = rejects(&local(1, "").replace("root = \"instances/{id}\"", &format!("root = \"{root}\"")));
        assert_has(
            &err,
            &["invalid instances[0].root:", "filesystem root", "/srv/shop/{id}"],
        );
    }
}

#[test]
fn unknown_placeholders_are_refused_naming_the_known_ones() {
    let cases = [
        (
            "root = \"instances/{id}\"",
            "root = \"instances/{idd}\"",
            "instances[0].root",
            "{idd}",
        ),
        (
            "command = [\"sleep\", \"600\"]",
            "command = [\"sleep\", \"600\", \"{relase}\"]",
            "instances[0].command",
            "{relase}",
        ),
        (
            "command = [\"sleep\", \"600\"]",
            "command = [\"sleep\", \"600\"]\nenv = { V = \"{prot}\" }",
            "instances[0].env",
            "{prot}",
        ),
    ];
    for (from, to, key, bad) in cases {
        let config = local(1, "").replace(from, to);
        assert!(config.contains(bad), "{config}");
        let err = rejects(&config);
        assert_has(&err, &[&format!("invalid {key}:"), bad, "{id}", "{port}"]);
    }
    // What the instance fills in at start, and a shell's ${VAR}, stay.
    let env = Env::new(&local(1, "").replace(
        "command = [\"sleep\", \"600\"]",
        "command = [\"sh\", \"-c\", \"exec sleep 600 # ${HOME} {release} {release_dir} {root} {port}\"]",
    ));
    env.ok(&["validate"], 0);
}

#[test]
fn a_fractional_batch_size_says_what_is_expected() {
    let err = rejects(&local(2, "[strategy.rolling]\nbatch_size = 1.5\n"));
    assert_has(
        &err,
        &[
            "invalid strategy.rolling.batch_size:",
            "1.5 is not a whole number",
            "\"25%\"",
        ],
    );
    assert!(!err.contains("variant") && !err.contains("untagged"), "{err}");
}

#[test]
fn a_batch_larger_than_the_fleet_is_a_warning() {
    let env = Env::new(&simulated(2, "[strategy.rolling]\nbatch_size = 5\n"));
    for args in [&["validate"][..], &["plan", "v1"], &["deploy", "v1"]] {
        let (code, out, err) = env.run(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        assert!(
            err.contains("warning")
                && err.contains("strategy.rolling.batch_size is 5, but the fleet has 2 instance(s)"),
            "{args:?}: {err}"
        );
    }
    let (_, _, err) = env.run(&["-q", "validate"]);
    assert!(!err.contains("warning"), "{err}");
    let env = Env::new(&simulated(2, "[strategy.rolling]\nbatch_size = 2\n"));
    let (_, _, err) = env.run(&["validate"]);
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn a_configuration_that_is_no_regular_file_or_too_large_is_refused() {
    let env = Env::new("");
    let (code, _, err) = env.run(&["--config", "/dev/zero", "validate"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["/dev/zero", "not a regular file", "--config"]);
    // A FIFO would block the open itself.
    let fifo = env.path().join("fifo.toml");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let (code, _, err) = env.run(&["--config", "fifo.toml", "validate"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["fifo.toml", "not a regular file"]);
    let big = env.path().join("big.toml");
    std::fs::write(&big, format!("app = \"shop\"\n#{}\n", "x".repeat(1 << 20))).unwrap();
    let (code, _, err) = env.run(&["--config", "big.toml", "validate"]);
    assert_eq!(code, 2, "{err}");
    assert_has(&err, &["big.toml", "larger than 1 MiB"]);
}

/// Runs `deploykit args…` with stdout a pipe nobody reads (`… | head`
/// after head exited): (exit code, stderr).
fn into_a_closed_pipe(env: &Env, args: &[&str]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("deploykit"))
        .current_dir(env.path())
        .env_remove("RUST_LOG")
        .env_remove("DEPLOYKIT_CONFIG")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_closed_stdout_ends_quietly_and_never_stops_a_deployment() {
    let env = Env::new(&simulated(3, ""));
    let (code, err) = into_a_closed_pipe(&env, &["deploy", "v1"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    for id in ["web-1", "web-2", "web-3"] {
        assert_eq!(env.sim(id)["release"], "v1", "the deployment finished");
    }
    for args in [
        &["status"][..],
        &["history"],
        &["plan", "v2"],
        &["--json", "status"],
        &["completions", "bash"],
    ] {
        let (code, err) = into_a_closed_pipe(&env, args);
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn refused_and_read_only_commands_create_no_state() {
    let env = Env::new(&simulated(2, ""));
    let state = env.path().join(".deploykit");
    for (args, code) in [
        (&["plan", "v1"][..], 0),
        (&["status"], 0),
        (&["--json", "status"], 0),
        (&["history"], 0),
        (&["deploy", "no such release!"], 2),
        (&["deploy", "v1", "--strategy", "blue-green"], 2),
        (&["promote"], 2),
        (&["rollback"], 2),
        (&["deploy", "--resume"], 2),
    ] {
        env.ok(args, code);
        assert!(!state.exists(), "deploykit {args:?} created {}", state.display());
    }
    // A deployment creates it.
    env.ok(&["deploy", "v1"], 0);
    assert!(state.join("shop").join("journal").is_dir());
}

/// Two stable instances and a canary behind the simulated balancer (weights
/// and switches only), healthy metrics, and `strategy` as the kind.
fn routed(strategy: &str, section: &str) -> String {
    let prom = crate::util::answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18591\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"stable-2\"\naddress = \"127.0.0.1:18592\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18593\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"{strategy}\"\n\n\
        [strategy.canary]\nstages = [50, 100]\nstage_duration = \"200ms\"\ncheck_interval = \"100ms\"\n\
        health_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n{section}\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    )
}

#[test]
fn a_strategy_the_balancer_cannot_route_is_refused_at_plan_and_deploy_naming_the_alternative() {
    for (strategy, section, parts) in [
        (
            "shadow",
            "[strategy.shadow]\npercent = 20\nduration = \"1s\"\n",
            &[
                "stage 'shadow 20% of GET,HEAD to canary'",
                "the simulated load balancer cannot mirror requests to a shadow group",
                "use the nginx driver",
                "nothing was touched",
            ][..],
        ),
        (
            "dark-launch",
            "[strategy.dark-launch]\nrules = [{ header = \"x-beta\", exact = \"1\", group = \"canary\" }]\n",
            &[
                "stage 'dark launch to header x-beta = 1 only'",
                "the simulated load balancer cannot route by request header",
                "use the nginx or HAProxy driver",
            ][..],
        ),
    ] {
        let env = Env::new(&routed(strategy, section));
        env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
        let journals = env.journal_count();
        for command in ["plan", "deploy"] {
            let (code, out, err) = env.run(&[command, "v2"]);
            assert_eq!(code, 2, "{command} {strategy}\nstdout: {out}\nstderr: {err}");
            assert_has(&err, parts);
        }
        for id in ["stable-1", "stable-2", "canary-1"] {
            assert_eq!(env.sim(id)["release"], "v1", "{id} was touched");
            assert_eq!(env.sim(id)["running"], true, "{id} was stopped");
        }
        assert_eq!(
            env.journal_count(),
            journals,
            "a refused deployment left a journal"
        );
    }
}

#[test]
fn routed_strategy_sections_name_the_key_at_fault() {
    for (strategy, section, key) in [
        ("ramped", "[strategy.ramped]\nfrom = 0\n", "strategy.ramped.from"),
        (
            "ramped",
            "[strategy.ramped]\nduration = \"1s\"\nstep_interval = \"50ms\"\n",
            "strategy.ramped.step_interval",
        ),
        (
            "shadow",
            "[strategy.shadow]\nmethods = [\"GET\", \"POST\"]\n",
            "strategy.shadow.methods",
        ),
        (
            "ramped",
            "[strategy.ramped]\nramp_down = \"10ms\"\n",
            "strategy.ramped.ramp_down",
        ),
        (
            "ramped",
            "[strategy.ramped]\nramp_down = \"1m\"\nramp_down_critical = 0.5\n",
            "strategy.ramped.ramp_down_critical",
        ),
        ("dark-launch", "", "strategy.dark-launch.rules"),
    ] {
        let err = rejects(&routed(strategy, section));
        assert_has(&err, &[key]);
    }
}
