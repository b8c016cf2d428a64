//! Every command's happy path, on simulated and on local instances; lock
//! contention; `--json` parsed back.

use deploykit::state::{LockAttempt, StateDir};

use crate::util::{json_lines, local, simulated, Env};

#[test]
fn every_command_has_help() {
    let env = Env::new("");
    for cmd in [
        "deploy",
        "plan",
        "status",
        "rollback",
        "promote",
        "abort",
        "history",
        "recommend",
        "validate",
        "demo",
        "completions",
    ] {
        // `demo` is a subcommand only with the (default) `demo` feature.
        if cmd == "demo" && cfg!(not(feature = "demo")) {
            continue;
        }
        let out = env.ok(&[cmd, "--help"], 0);
        assert!(out.contains("Usage: deploykit"), "{cmd}: {out}");
    }
    let out = env.ok(&["--help"], 0);
    assert!(
        out.contains("4 another deployment holds") || out.contains("Exit codes"),
        "{out}"
    );
}

#[test]
fn completions_are_generated() {
    let env = Env::new("");
    let out = env.ok(&["completions", "bash"], 0);
    assert!(out.contains("_deploykit()") && out.contains("rollback"), "{out}");
}

#[test]
fn plan_shows_steps_batches_and_duration_and_touches_nothing() {
    let env = Env::new(&simulated(
        5,
        "[strategy.rolling]\nbatch_size = 2\nhealth_interval = \"10s\"\nstabilisation = \"5s\"\n",
    ));
    let out = env.ok(&["plan", "v2"], 0);
    assert!(
        out.contains("plan: rolling deployment of v2 to 5 instance(s) in 5 stage(s)"),
        "{out}"
    );
    assert!(out.contains("batch sizes: 2, 2, 1"), "{out}");
    assert!(out.contains("projected duration: 10s to"), "{out}");
    assert!(out.contains("install v2 on web-5"), "{out}");
    // Nothing was installed.
    assert!(!env.state().join("simulated").join("instances.log").exists());
    let json = env.ok(&["--json", "plan", "v2", "--strategy", "recreate"], 0);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["plan"]["strategy"], "recreate");
    assert_eq!(v["batch_sizes"], serde_json::json!([5, 5, 5, 5]));
    assert!(v["projected_duration_ms"]["max"].as_u64().unwrap() > 0);
}

#[test]
fn deploy_status_history_and_rollback_on_simulated_instances() {
    let env = Env::new(&simulated(
        3,
        "[strategy.rolling]\nbatch_size = 2\nhealth_interval = \"50ms\"\nstabilisation = \"50ms\"\n",
    ));
    env.ok(&["deploy", "v1"], 0);
    let out = env.ok(&["deploy", "v2"], 0);
    assert!(out.contains("SUCCEEDED"), "{out}");
    for i in 1..=3 {
        assert_eq!(env.sim(&format!("web-{i}"))["release"], "v2");
        assert_eq!(env.sim(&format!("web-{i}"))["running"], true);
    }
    let status = env.ok(&["status"], 0);
    assert!(status.contains("rolling of v2: succeeded"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("web-3") && l.contains("v2") && l.contains("healthy")),
        "{status}"
    );

    let out = env.ok(&["rollback"], 0);
    assert!(out.contains("web-1: v1") && out.contains("web-3: v1"), "{out}");
    for i in 1..=3 {
        assert_eq!(env.sim(&format!("web-{i}"))["release"], "v1");
        assert_eq!(env.sim(&format!("web-{i}"))["running"], true);
    }
    assert!(env.out_of_rotation().is_empty());

    let history = json_lines(&env.ok(&["--json", "history"], 0));
    let rows: Vec<(String, String, String)> = history
        .iter()
        .map(|h| {
            (
                h["kind"].as_str().unwrap().to_string(),
                h["release"].as_str().unwrap().to_string(),
                h["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("deploy".into(), "v1".into(), "succeeded".into()),
            ("deploy".into(), "v2".into(), "succeeded".into()),
            ("rollback".into(), "v1".into(), "succeeded".into()),
        ]
    );
    let text = env.ok(&["history"], 0);
    assert!(text.contains("outcome") && text.contains("rolling"), "{text}");
}

#[test]
fn a_failing_release_rolls_back_with_exit_1_and_is_in_the_history() {
    let env = Env::new(&simulated(
        3,
        "[instance_defaults]\nsimulated = true\nsimulate_unhealthy = [\"v2\"]\n[strategy.rolling]\nmax_failures = 0\nhealth_retries = 2\nhealth_interval = \"20ms\"\nstabilisation = \"20ms\"\n",
    )
    .replacen("[instance_defaults]\nsimulated = true\n\n", "", 1));
    env.ok(&["deploy", "v1"], 0);
    let (code, out, err) = env.run(&["deploy", "v2"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("ROLLED BACK") || out.contains("rolled back"),
        "{out}"
    );
    for i in 1..=3 {
        assert_eq!(env.sim(&format!("web-{i}"))["release"], "v1");
    }
    let history = json_lines(&env.ok(&["--json", "history"], 0));
    assert_eq!(history[1]["outcome"], "rolled_back");
    assert!(
        history[1]["reason"].as_str().unwrap().contains("failure budget"),
        "{:?}",
        history[1]
    );
}

#[test]
fn json_events_parse_back_with_a_stable_shape() {
    let env = Env::new(&simulated(2, ""));
    let out = env.ok(&["--json", "deploy", "v1"], 0);
    let events = json_lines(&out);
    assert_eq!(events.first().unwrap()["event"], "deployment_started");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "deployment_finished");
    assert_eq!(last["outcome"], "succeeded");
    for e in &events {
        assert!(e["elapsed_ms"].is_u64() && e["deployment"].is_string(), "{e}");
    }
    let steps: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "step_finished" && e["instance"] == "web-1")
        .map(|e| e["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "drain",
            "await_drained",
            "stop",
            "install",
            "start",
            "await_healthy",
            "enable"
        ]
    );
    // The journal holds the same events after its header, and the outcome.
    let journal = env.newest_journal();
    assert_eq!(journal[0]["record"], "header");
    assert_eq!(journal[0]["strategy"], "rolling");
    assert_eq!(journal.len(), events.len() + 2);
    assert_eq!(journal.last().unwrap()["record"], "finished");
}

#[test]
fn status_json_names_release_and_rotation_per_instance() {
    let env = Env::new(&simulated(2, ""));
    env.ok(&["deploy", "v1"], 0);
    let v: serde_json::Value = serde_json::from_str(env.ok(&["--json", "status"], 0).trim()).unwrap();
    assert_eq!(v["app"], "shop");
    assert_eq!(v["lock"], serde_json::Value::Null);
    assert_eq!(v["deployment"]["history"]["outcome"], "succeeded");
    let inst = v["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 2);
    assert!(inst
        .iter()
        .all(|i| i["release"] == "v1" && i["health"] == "healthy" && i["in_rotation"] == true));
}

#[test]
fn status_json_has_the_documented_fields() {
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let env = Env::new(&simulated(1, ""));
    let v: serde_json::Value = serde_json::from_str(env.ok(&["--json", "status"], 0).trim()).unwrap();
    assert_eq!(
        keys(&v),
        [
            "app",
            "deployment",
            "instances",
            "journal_problems",
            "live",
            "load_balancer",
            "lock"
        ]
    );
    assert_eq!(v["journal_problems"], serde_json::json!([]));
    assert_eq!(v["deployment"], serde_json::Value::Null, "no run yet");
    env.ok(&["deploy", "v1"], 0);
    let v: serde_json::Value = serde_json::from_str(env.ok(&["--json", "status"], 0).trim()).unwrap();
    assert_eq!(
        keys(&v["deployment"]),
        ["awaiting_promotion", "history", "previous", "unsettled"]
    );
    assert_eq!(v["deployment"]["previous"]["web-1"], serde_json::Value::Null);
    assert_eq!(
        keys(&v["instances"][0]),
        ["address", "group", "health", "id", "in_rotation", "release"]
    );
    assert_eq!(keys(&v["load_balancer"]), ["live", "out_of_rotation", "weights"]);
}

#[test]
fn a_second_deployment_is_refused_while_the_lock_is_held() {
    let env = Env::new(&simulated(2, ""));
    let state = StateDir::open(env.path().join(".deploykit"), "shop").unwrap();
    let LockAttempt::Acquired { lock, .. } = state.try_lock("deploy v9").unwrap() else {
        panic!("lock not free")
    };
    let (code, out, err) = env.run(&["deploy", "v1"]);
    assert_eq!(code, 4, "{out}\n{err}");
    assert!(
        err.contains(&format!("pid {}", std::process::id()))
            && err.contains("deploy v9")
            && err.contains("UTC"),
        "{err}"
    );
    let (code, _, _) = env.run(&["rollback"]);
    assert_eq!(code, 4);
    // Status shows the holder.
    let status = env.ok(&["status"], 0);
    assert!(status.contains("lock: held by pid"), "{status}");
    drop(lock);
    env.ok(&["deploy", "v1"], 0);
}

#[test]
fn promote_with_nothing_running_is_bad_input() {
    let env = Env::new(&simulated(2, ""));
    let (code, _, err) = env.run(&["promote"]);
    assert_eq!(code, 2);
    assert!(err.contains("no deployment of shop is running"), "{err}");
}

#[test]
fn abort_from_another_process_rolls_the_running_deployment_back() {
    // A long stabilisation pause gives the second process time to act.
    let env = Env::new(&simulated(
        2,
        "[strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"60s\"\n",
    ));
    // Recreate has no pause: v1 everywhere at once.
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    // Wait until the first batch is done and the pause began.
    let mut deploy = env.spawn_deploy("v2", "the pause", |r| {
        r["event"] == "step_started" && r["step"] == "pause"
    });
    let out = env.ok(&["abort"], 0);
    assert!(out.contains("aborted"), "{out}");
    let status = deploy.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "the aborted deployment rolls back and exits 1"
    );
    assert_eq!(env.sim("web-1")["release"], "v1");
    assert_eq!(env.sim("web-2")["release"], "v1");
    assert!(env.out_of_rotation().is_empty());
}

#[test]
fn recommend_follows_the_decision_tree() {
    let env = Env::new("");
    let out = env.ok(&["recommend", "--monitoring", "yes", "--traffic", "2M"], 0);
    assert!(out.contains("recommended strategy: canary"), "{out}");
    assert!(
        out.contains("rollback speed") && out.contains("pre-live testing"),
        "{out}"
    );
    let out = env.ok(
        &["recommend", "--monitoring", "no", "--double-resources", "yes"],
        0,
    );
    assert!(out.contains("recommended strategy: blue-green"), "{out}");
    let v: serde_json::Value = serde_json::from_str(
        env.ok(
            &["recommend", "--json", "--monitoring", "yes", "--traffic", "1000"],
            0,
        )
        .trim(),
    )
    .unwrap();
    assert_eq!(v["strategy"], "rolling");
    assert_eq!(v["comparison"].as_array().unwrap().len(), 9);
    // Not a terminal and an answer missing: bad input naming the flag.
    let (code, _, err) = env.run(&["recommend", "--monitoring", "no"]);
    assert_eq!(code, 2);
    assert!(err.contains("--double-resources"), "{err}");
}

#[test]
fn recommend_reaches_every_leaf_of_the_extended_tree() {
    let env = Env::new("");
    let pick = |args: &[&str]| {
        let mut all = vec!["recommend", "--json"];
        all.extend_from_slice(args);
        let v: serde_json::Value = serde_json::from_str(env.ok(&all, 0).trim()).unwrap();
        (
            v["strategy"].as_str().unwrap().to_owned(),
            v["because"].as_array().unwrap().len(),
        )
    };
    let monitored = ["--monitoring", "yes", "--traffic", "2M"];
    let leaves: [(&[&str], &[&str], &str); 10] = [
        (&monitored, &["--side-effect-free", "yes"], "shadow"),
        (&monitored, &["--testers-first", "yes"], "dark-launch"),
        (&monitored, &["--business-metric", "yes"], "experiment"),
        (&monitored, &["--gradual", "yes"], "ramped"),
        (
            &monitored,
            &["--gradual", "no", "--business-metric", "no"],
            "canary",
        ),
        (
            &["--monitoring", "yes", "--traffic", "500k"],
            &["--gradual", "yes"],
            "rolling",
        ),
        // Too little traffic for an experiment: judged as a canary would be.
        (
            &["--monitoring", "yes", "--traffic", "10k"],
            &["--business-metric", "yes"],
            "rolling",
        ),
        (
            &["--monitoring", "no", "--double-resources", "no"],
            &["--downtime-ok", "yes"],
            "recreate",
        ),
        (
            &["--monitoring", "no", "--double-resources", "no"],
            &["--downtime-ok", "no"],
            "rolling",
        ),
        (
            &["--monitoring", "no", "--double-resources", "yes"],
            &["--downtime-ok", "yes"],
            "blue-green",
        ),
    ];
    for (base, extra, want) in leaves {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        assert_eq!(pick(&args).0, want, "{args:?}");
    }
    // Shadow wins over the later questions; its reason is given.
    let out = env.ok(
        &[
            "recommend",
            "--monitoring",
            "yes",
            "--side-effect-free",
            "yes",
            "--testers-first",
            "yes",
        ],
        0,
    );
    assert!(out.contains("recommended strategy: shadow"), "{out}");
    assert!(out.contains("side-effect free: yes"), "{out}");
    assert!(out.contains("[strategy.shadow]"), "{out}");
    // Shadow and dark launch need no traffic figure; the canary branch does.
    assert_eq!(
        pick(&["--monitoring", "yes", "--testers-first", "yes"]).0,
        "dark-launch"
    );
    let (code, _, err) = env.run(&["recommend", "--monitoring", "yes", "--business-metric", "yes"]);
    assert_eq!(code, 2);
    assert!(err.contains("--traffic"), "{err}");
    let experiment = env.ok(
        &[
            "recommend",
            "--monitoring",
            "yes",
            "--traffic",
            "20k",
            "--business-metric",
            "yes",
        ],
        0,
    );
    assert!(experiment.contains("8,000 visits per variant"), "{experiment}");
    // Old inputs keep their old answers and reasons.
    assert_eq!(pick(&monitored), ("canary".to_owned(), 2));
    assert_eq!(
        pick(&["--monitoring", "no", "--double-resources", "no"]),
        ("rolling".to_owned(), 2)
    );
}

#[cfg(feature = "demo")]
#[test]
fn demo_json_parses_back() {
    let env = Env::new("");
    let events = json_lines(&env.ok(&["--json", "demo", "--instances", "3"], 0));
    assert_eq!(events.last().unwrap()["event"], "deployment_finished");
    assert_eq!(events.last().unwrap()["outcome"], "succeeded");
}

#[test]
fn deploy_plan_status_rollback_on_local_instances() {
    let env = Env::new(&local(2, ""));
    env.releases(&["v1", "v2"]);
    let plan = env.ok(&["plan", "v1"], 0);
    assert!(plan.contains("web-1 (none -> v1)"), "{plan}");
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id).as_deref(), Some("v2"));
        assert!(env.local_running(id), "{id} not running");
        assert_eq!(
            std::fs::read_to_string(env.path().join("instances").join(id).join("current/VERSION")).unwrap(),
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
        assert_eq!(env.local_release(id).as_deref(), Some("v1"));
        assert!(env.local_running(id), "{id} not running after the rollback");
    }
    // A release that does not exist is refused before the first instance is
    // touched (refusals.rs has the details).
    let (code, out, err) = env.run(&["deploy", "v9"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert_eq!(env.local_release("web-1").as_deref(), Some("v1"));
    assert!(env.local_running("web-1"));
}

#[test]
fn blue_green_deploy_and_rollback_on_simulated_environments() {
    let cfg = "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"blue-1\"\naddress = \"127.0.0.1:18091\"\ngroup = \"blue\"\n\n\
        [[instances]]\nid = \"green-1\"\naddress = \"127.0.0.1:18092\"\ngroup = \"green\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n\
        [strategy]\nkind = \"blue-green\"\n\n\
        [strategy.blue-green]\nhealth_interval = \"50ms\"\nhealthy_deadline = \"5s\"\nwarmup_requests = 2\nkeep_old = \"0s\"\n";
    let env = Env::new(cfg);
    env.ok(&["deploy", "v1"], 0);
    assert_eq!(env.lb()["live"], "green");
    env.ok(&["deploy", "v2"], 0);
    assert_eq!(env.lb()["live"], "blue");
    assert_eq!(env.sim("blue-1")["release"], "v2");
    assert_eq!(env.sim("blue-1")["running"], true);
    assert_eq!(
        env.sim("green-1")["running"],
        false,
        "the old environment is stopped after keep_old"
    );
    env.ok(&["rollback"], 0);
    assert_eq!(env.lb()["live"], "green");
    assert_eq!(env.sim("green-1")["release"], "v1");
    assert_eq!(env.sim("green-1")["running"], true);
}

#[test]
fn a_manual_canary_waits_and_is_promoted_from_another_process() {
    // Prometheus stand-in: every query answers 0.001 (0.1 % errors, 1 ms
    // p99): a healthy canary.
    let prom = crate::util::answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18291\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"stable-2\"\naddress = \"127.0.0.1:18292\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18293\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [20, 100]\nstage_duration = \"300ms\"\ncheck_interval = \"100ms\"\n\
        promotion = \"manual\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    let status = env.ok(&["status"], 0);
    assert!(status.contains("canary stage 1 waits for promotion"), "{status}");
    let out = env.ok(&["promote"], 0);
    assert!(out.contains("promoted"), "{out}");
    let code = deploy.wait().unwrap().code();
    assert_eq!(code, Some(0), "the promoted canary finishes");
    for id in ["stable-1", "stable-2"] {
        assert_eq!(env.sim(id)["release"], "v2", "{id}");
        assert_eq!(env.sim(id)["running"], true, "{id}");
    }
    assert_eq!(
        env.sim("canary-1")["running"],
        false,
        "canary instances end stopped"
    );
    let journal = env.newest_journal();
    assert!(journal.iter().any(|r| r["event"] == "promoted"));
}

#[test]
fn ratio_significance_from_the_file_decides_the_canary() {
    // Canary 3 % errors against stable's 1 %, 100 requests each: over the
    // plain 2x ratio (2 %), but within 3 standard deviations of sampling
    // noise at that count (limit about 9 %).
    let prom =
        crate::util::prometheus(
            |request| match (request.contains("requests"), request.contains("canary")) {
                (true, _) => 100.0,
                (false, true) if request.contains("errors") => 0.03,
                (false, false) if request.contains("errors") => 0.01,
                _ => 0.001,
            },
        );
    let deploy = |significance: &str| {
        let cfg = format!(
            "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
            [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18296\"\ngroup = \"stable\"\n\n\
            [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18297\"\ngroup = \"canary\"\n\n\
            [load_balancer]\nkind = \"simulated\"\n\n\
            [metrics]\nprometheus = \"{prom}\"\nerror_rate = \"errors{{track=\\\"{{group}}\\\"}}\"\n\
            latency_p99 = \"latency{{track=\\\"{{group}}\\\"}}\"\nrequest_count = \"requests{{track=\\\"{{group}}\\\"}}\"\n\n\
            [strategy]\nkind = \"canary\"\n\n\
            [strategy.canary]\nstages = [50, 100]\nstage_duration = \"200ms\"\ncheck_interval = \"100ms\"\n\
            error_threshold = 0.2\nratio_significance = {significance}\n\
            health_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
            [timeouts]\ndrain_poll = \"20ms\"\n"
        );
        let env = Env::new(&cfg);
        env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
        let (code, out, err) = env.run(&["deploy", "v2"]);
        (code, format!("{out}{err}"), env)
    };
    let (code, out, env) = deploy("0");
    assert_eq!(code, 1, "compared plainly, 3 % > 2 x 1 % rolls back:\n{out}");
    assert_eq!(env.sim("stable-1")["release"], "v1", "{out}");
    let (code, out, env) = deploy("3");
    assert_eq!(code, 0, "allowing for noise, the canary passes:\n{out}");
    assert_eq!(env.sim("stable-1")["release"], "v2", "{out}");
}

#[test]
fn blue_green_through_a_symlink_switch() {
    let env = Env::new("");
    let root = env.path().display().to_string();
    for e in ["blue", "green"] {
        std::fs::create_dir_all(env.path().join("envs").join(e)).unwrap();
    }
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"blue-1\"\naddress = \"127.0.0.1:18491\"\ngroup = \"blue\"\n\n\
        [[instances]]\nid = \"green-1\"\naddress = \"127.0.0.1:18492\"\ngroup = \"green\"\n\n\
        [load_balancer]\nkind = \"symlink\"\nlink = \"{root}/live\"\n\
        targets = {{ blue = \"envs/blue\", green = \"envs/green\" }}\n\n\
        [strategy]\nkind = \"blue-green\"\n\n\
        [strategy.blue-green]\nhealth_interval = \"20ms\"\nhealthy_deadline = \"5s\"\nwarmup_requests = 1\nkeep_old = \"0s\"\n"
    );
    std::fs::write(env.path().join("deploykit.toml"), cfg).unwrap();
    env.ok(&["deploy", "v1"], 0);
    let live = || std::fs::read_link(env.path().join("live")).unwrap();
    assert_eq!(live(), env.path().join("envs/green"));
    env.ok(&["deploy", "v2"], 0);
    assert_eq!(live(), env.path().join("envs/blue"));
    assert_eq!(env.sim("blue-1")["release"], "v2");
    env.ok(&["rollback"], 0);
    assert_eq!(live(), env.path().join("envs/green"));
    let status = env.ok(&["status"], 0);
    assert!(status.contains("live environment: green"), "{status}");
}

#[test]
fn sigterm_rolls_the_deployment_back_and_records_it() {
    let env = Env::new(&simulated(
        2,
        "[strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"60s\"\n",
    ));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let mut deploy = env.spawn_deploy("v2", "the pause", |r| {
        r["event"] == "step_started" && r["step"] == "pause"
    });
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(deploy.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert_eq!(deploy.wait().unwrap().code(), Some(1));
    assert_eq!(env.sim("web-1")["release"], "v1");
    let history = json_lines(&env.ok(&["--json", "history"], 0));
    assert_eq!(history.last().unwrap()["outcome"], "rolled_back");
    assert!(history.last().unwrap()["reason"]
        .as_str()
        .unwrap()
        .contains("cancelled"));
}

#[test]
fn a_lock_held_by_another_process_than_its_recorded_holder_says_so() {
    let env = Env::new(&simulated(1, ""));
    let state = StateDir::open(env.path().join(".deploykit"), "shop").unwrap();
    let LockAttempt::Acquired { lock, .. } = state.try_lock("deploy v9").unwrap() else {
        panic!("lock not free")
    };
    // The flock is ours, but the record names a process that is gone (as
    // when a child inherited the descriptor of a holder that died).
    let dead = serde_json::json!({
        "pid": 1, "pid_start": u64::MAX, "host": deploykit::state::host_name(),
        "started_at_ms": 1_700_000_000_000u64, "purpose": "deploy v8"
    });
    std::fs::write(lock.path(), dead.to_string()).unwrap();
    let (code, _, err) = env.run(&["deploy", "v1"]);
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("pid 1 on") && err.contains("deploy v8") && err.contains("that process is gone"),
        "{err}"
    );
    drop(lock);
}

#[test]
fn removing_the_lock_file_does_not_let_another_command_in() {
    let env = Env::new(&simulated(1, ""));
    let state = StateDir::open(env.path().join(".deploykit"), "shop").unwrap();
    let LockAttempt::Acquired { lock, .. } = state.try_lock("deploy v9").unwrap() else {
        panic!("lock not free")
    };
    std::fs::remove_file(lock.path()).unwrap();
    for args in [&["deploy", "v1"][..], &["rollback"][..]] {
        let (code, _, err) = env.run(args);
        assert_eq!(code, 4, "{args:?}: {err}");
        assert!(
            err.contains("holds the lock: an unknown process (the lock file recording the holder is missing"),
            "{err}"
        );
    }
    assert!(state.journals().unwrap().is_empty(), "a command ran");
    drop(lock);
}

#[test]
fn logs_go_to_stderr_by_verbosity_and_json_stays_clean() {
    let env = Env::new(&simulated(2, ""));
    let out = env
        .cmd()
        .args(["--json", "-vv", "deploy", "v1"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("DEBUG"),
        "-vv shows debug logs on stderr:\n{stderr}"
    );
    // stdout is only the event stream.
    let events = json_lines(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(events.last().unwrap()["event"], "deployment_finished");
    // RUST_LOG overrides -v; -q prints no progress lines.
    let out = env
        .cmd()
        .env("RUST_LOG", "off")
        .args(["-vv", "-q", "deploy", "v2"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("batch 1/"), "-q hides progress:\n{stdout}");
    assert!(
        stdout.contains("SUCCEEDED"),
        "the final report is printed:\n{stdout}"
    );
}

#[cfg(feature = "demo")]
#[test]
fn a_failure_is_shown_once_by_default_and_logged_with_v() {
    let demo = |extra: &[&str]| {
        let mut args = vec!["demo", "--instances", "3", "--fail-instance", "i-2"];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("deploykit"))
            .env_remove("RUST_LOG")
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (stdout, stderr) = demo(&[]);
    assert_eq!(stdout.matches("i-2 failed:").count(), 1, "{stdout}");
    assert!(
        !stderr.contains("instance failed"),
        "no duplicate log line:\n{stderr}"
    );
    let (_, stderr) = demo(&["-v"]);
    assert!(stderr.contains("instance failed"), "-v logs it:\n{stderr}");
}

#[test]
fn recommend_asks_on_a_terminal() {
    // `script` (util-linux, essential on Debian) gives the command a pty.
    let Some(script) = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!("`script` (util-linux) is missing: install util-linux");
    };
    let bin = assert_cmd::cargo::cargo_bin("deploykit");
    let out = std::process::Command::new(script)
        .args(["-qec", &format!("{} recommend", bin.display()), "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"no\nyes\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("advanced monitoring"),
        "the first question was asked:\n{text}"
    );
    assert!(
        text.contains("twice the instances"),
        "the second question was asked:\n{text}"
    );
    assert!(text.contains("recommended strategy: blue-green"), "{text}");
}

#[test]
fn recommend_asks_the_refining_questions_on_a_terminal() {
    let Some(script) = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
    else {
        panic!("`script` (util-linux) is missing: install util-linux");
    };
    let bin = assert_cmd::cargo::cargo_bin("deploykit");
    // Monitoring yes, side-effect free no, testers first no, 2M requests,
    // business metric no, gradual yes.
    let out = std::process::Command::new(script)
        .args(["-qec", &format!("{} recommend", bin.display()), "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(b"yes\nno\nno\n2M\nno\nyes\n")?;
            c.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for asked in [
        "without real effects",
        "known users",
        "requests a day",
        "is it better?",
        "many small steps",
    ] {
        assert!(text.contains(asked), "{asked:?} was asked:\n{text}");
    }
    assert!(!text.contains("twice the instances"), "{text}");
    assert!(text.contains("recommended strategy: ramped"), "{text}");
}

#[test]
fn an_empty_or_corrupt_journal_does_not_hide_the_fleet() {
    let env = Env::new(&simulated(2, ""));
    env.ok(&["-q", "deploy", "v2"], 0);
    let dir = env.state().join("journal");
    for (name, content) in [
        ("0000000007-empty.jsonl", ""),
        ("0000000008-junk.jsonl", "not json\n{}\n"),
    ] {
        std::fs::write(dir.join(name), content).unwrap();
        let (code, out, err) = env.run(&["status"]);
        assert_eq!(code, 3, "the state is inconsistent\n{out}\n{err}");
        for id in ["web-1", "web-2"] {
            assert!(out.contains(id), "{name}: the fleet is shown\n{out}\n{err}");
        }
        assert!(
            err.contains(name) && err.contains("move the file aside"),
            "{name}: the problem is named with its fix\n{err}"
        );
        let (code, out, err) = env.run(&["--json", "status"]);
        assert_eq!(code, 3, "{out}\n{err}");
        let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(s["instances"].as_array().unwrap().len(), 2, "{s}");
        assert!(s["journal_problems"][0].as_str().unwrap().contains(name), "{s}");
        let (code, out, err) = env.run(&["history"]);
        assert_eq!(code, 3, "{out}\n{err}");
        assert!(
            out.contains("v2") && err.contains(name),
            "the readable runs and the problem\n{out}\n{err}"
        );
        std::fs::remove_file(dir.join(name)).unwrap();
    }
}

#[test]
fn status_and_history_write_nothing_so_a_read_only_state_dir_is_enough() {
    // A command that writes nothing needs no write access: checked by what
    // exists afterwards, which holds for any user (root ignores modes).
    for cfg in [simulated(2, ""), local(1, "")] {
        let env = Env::new(&cfg);
        for args in [
            &["status"][..],
            &["--json", "status"],
            &["history"],
            &["--json", "history"],
        ] {
            let (code, out, err) = env.run(args);
            assert_eq!(code, 0, "{args:?}\n{out}\n{err}");
            assert!(
                !env.path().join(".deploykit").exists(),
                "{args:?} created the state directory"
            );
        }
    }
    let env = Env::new(&simulated(2, ""));
    env.ok(&["-q", "deploy", "v1"], 0);
    let before = tree(env.path());
    env.ok(&["status"], 0);
    env.ok(&["history"], 0);
    assert_eq!(
        tree(env.path()),
        before,
        "status and history changed the state directory"
    );
}

/// Every path under `dir` with its size and modification time.
fn tree(dir: &std::path::Path) -> Vec<(std::path::PathBuf, u64, std::time::SystemTime)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m.len(), m.modified().unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
fn a_release_changed_after_it_was_deployed_is_refused_not_silently_skipped() {
    let env = Env::new(&local(2, ""));
    env.releases(&["v1", "v2"]);
    env.ok(&["-q", "deploy", "v1"], 0);
    env.ok(&["-q", "deploy", "v2"], 0);
    // Rebuilt under the same name: the instances already hold a v1, and
    // would switch back to the old content without a word.
    std::fs::write(env.path().join("builds/v1/VERSION"), "v1, rebuilt").unwrap();
    let (code, out, err) = env.run(&["deploy", "v1"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("v1") && err.contains("changed") && err.contains("new release name"),
        "names the release and the fix: {err}"
    );
    for id in ["web-1", "web-2"] {
        assert_eq!(env.local_release(id).as_deref(), Some("v2"), "{id} untouched");
    }
    // Unchanged content deploys as before, also after the refusal.
    std::fs::write(env.path().join("builds/v1/VERSION"), "v1").unwrap();
    env.ok(&["-q", "deploy", "v1"], 0);
}

#[test]
fn a_ramped_deployment_plans_its_curve_and_climbs_it() {
    let prom = crate::util::answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18391\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18392\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"ramped\"\n\n\
        [strategy.canary]\ncheck_interval = \"100ms\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [strategy.ramped]\nfrom = 20\nto = 100\nduration = \"400ms\"\nstep_interval = \"100ms\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let plan = env.ok(&["plan", "v2"], 0);
    for stage in [
        "ramp 20% (1/5)",
        "ramp 40% (2/5)",
        "ramp 60% (3/5)",
        "ramp 80% (4/5)",
        "ramp 100% (5/5)",
    ] {
        assert!(plan.contains(stage), "{stage} missing from:\n{plan}");
    }
    assert!(!plan.contains("ramp down"), "{plan}");
    let down = Env::new(&cfg.replace(
        "step_interval = \"100ms\"\n",
        "step_interval = \"100ms\"\nramp_down = \"300ms\"\nramp_down_critical = 3\n",
    ));
    let plan = down.ok(&["plan", "v2"], 0);
    assert!(
        plan.contains("at 60% for 0.100s (check every 0.100s); on a breach under 3x its limit, ramp down 45% 30% 15% over 0.300s, then roll back"),
        "{plan}"
    );
    env.ok(&["deploy", "v2"], 0);
    assert_eq!(env.sim("stable-1")["release"], "v2");
    assert_eq!(env.sim("canary-1")["running"], false, "the canary ends stopped");
    let journal = env.newest_journal();
    let weights: Vec<u64> = journal
        .iter()
        .filter(|r| r["event"] == "analysis_result")
        .filter_map(|r| r["weight"].as_u64())
        .collect();
    assert!(
        weights.windows(2).all(|w| w[0] <= w[1]) && weights.contains(&60),
        "{weights:?}"
    );
}

/// 1.5 % errors for the canary (1.5 times the 1 % limit: a breach, not a
/// critical one), 0.1 % for stable.
fn canary_mildly_failing(request: &str) -> f64 {
    if request.contains("%22canary%22") {
        0.015
    } else {
        0.001
    }
}

#[test]
fn a_ramped_deployment_with_ramp_down_steps_down_after_a_mild_breach() {
    let prom = crate::util::prometheus(canary_mildly_failing);
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18395\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18396\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"ramped\"\n\n\
        [strategy.canary]\ncheck_interval = \"100ms\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [strategy.ramped]\nfrom = 20\nto = 100\nduration = \"400ms\"\nstep_interval = \"100ms\"\nramp_down = \"300ms\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let (code, out, err) = env.run(&["deploy", "v2"]);
    assert_eq!(code, 1, "{out}\n{err}");
    crate::util::assert_has(
        &out,
        &[
            "stage 1 breached: canary stepped down to 15% for 100ms",
            "canary stepped down to 5% for 100ms",
            "ramped down from 20% to 5% over 300ms",
        ],
    );
    assert_eq!(env.sim("stable-1")["release"], "v1");
    let journal = env.newest_journal();
    let down: Vec<u64> = journal
        .iter()
        .filter(|r| r["event"] == "ramping_down")
        .filter_map(|r| r["weight"].as_u64())
        .collect();
    assert_eq!(down, [15, 10, 5], "the way down from the breached 20 %");
    // Each step down was checked by the analysis at its own share.
    let checked: Vec<u64> = journal
        .iter()
        .filter(|r| r["event"] == "analysis_result")
        .filter_map(|r| r["weight"].as_u64())
        .collect();
    assert!([15, 10, 5].iter().all(|w| checked.contains(w)), "{checked:?}");
}

/// An experiment on the simulated fleet whose Prometheus stand-in answers
/// `conversions(track)` for the conversions query, 5000 visits and a low
/// error rate otherwise.
fn experiment_config(prom: &str, extra: &str) -> String {
    format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18393\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18394\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"experiment\"\n\n\
        [strategy.canary]\ncheck_interval = \"100ms\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [strategy.experiment]\nduration = \"2s\"\nmin_samples = 500\n{extra}\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    )
}

fn tally_answer(request: &str) -> f64 {
    if request.contains("checkout_visits_total") {
        5000.0
    } else if request.contains("checkout_conversions_total%7Btrack%3D%22canary%22") {
        1500.0
    } else if request.contains("checkout_conversions_total") {
        250.0
    } else {
        0.001
    }
}

#[test]
fn an_experiment_is_refused_at_plan_time_by_a_load_balancer_without_sticky_split() {
    let prom = crate::util::prometheus(tally_answer);
    let env = Env::new(&experiment_config(&prom, ""));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let journals = env.journal_count();
    let (code, _, err) = env.run(&["deploy", "v2"]);
    assert_eq!(code, 2, "{err}");
    crate::util::assert_has(
        &err,
        &[
            "experiment: 50 % of users on canary",
            "cannot keep users on one group",
            "nothing was touched",
        ],
    );
    assert_eq!(env.sim("stable-1")["release"], "v1");
    assert_eq!(
        env.journal_count(),
        journals,
        "a refused deploy leaves no journal"
    );
}

#[test]
fn an_experiment_plan_through_nginx_shows_the_test() {
    let prom = crate::util::prometheus(tally_answer);
    let cfg = experiment_config(&prom, "treatment_percent = 20\nalpha = 0.01\n").replace(
        "[load_balancer]\nkind = \"simulated\"\n",
        "[load_balancer]\nkind = \"nginx\"\ninclude_file = \"upstream.conf\"\nlocation_include = \"location.conf\"\nupstream = \"app\"\n",
    );
    let env = Env::new(&cfg);
    let plan = env.ok(&["plan", "v2"], 0);
    for part in [
        "experiment: 20 % of users on canary",
        "experiment canary (treatment) against stable (control) for at most 2",
        "alpha 0.01 once each has 500 visits",
        "no significant difference: keep the control",
    ] {
        assert!(plan.contains(part), "{part} missing from:\n{plan}");
    }
    let env = Env::new(&cfg.replace("alpha = 0.01\n", "alpha = 0.01\non_no_difference = \"promote\"\n"));
    let plan = env.ok(&["plan", "v2"], 0);
    assert!(
        plan.contains("no significant difference: promote the treatment"),
        "{plan}"
    );
}

/// HAProxy without `map_dir` cannot keep users on one group: `plan` says
/// so naming the key to set; with it, the experiment's sticky split is
/// planned (the maps are checked when a deployment starts).
#[test]
fn an_experiment_through_haproxy_needs_its_map_dir_and_is_planned_with_one() {
    let prom = crate::util::prometheus(tally_answer);
    let haproxy = |extra: &str| {
        experiment_config(&prom, "").replace(
            "[load_balancer]\nkind = \"simulated\"\n",
            &format!("[load_balancer]\nkind = \"haproxy\"\nsocket = \"/run/haproxy/admin.sock\"\nbackend = \"app\"\n{extra}"),
        )
    };
    let env = Env::new(&haproxy(""));
    let (code, _, err) = env.run(&["plan", "v2"]);
    assert_eq!(code, 2, "{err}");
    crate::util::assert_has(
        &err,
        &[
            "experiment: 50 % of users on canary",
            "haproxy",
            "cannot keep users on one group",
            "set load_balancer.map_dir",
        ],
    );
    let env = Env::new(&haproxy("map_dir = \"/etc/haproxy/dk\"\n"));
    let plan = env.ok(&["plan", "v2"], 0);
    assert!(
        plan.contains("experiment: 50 % of users on canary (sticky by cookie"),
        "{plan}"
    );
}

#[test]
fn experiment_settings_are_checked_naming_the_key() {
    let prom = "http://127.0.0.1:9";
    let err = crate::util::rejects(&experiment_config(prom, "treatment_percent = 0\n"));
    crate::util::assert_has(&err, &["strategy.experiment.treatment_percent"]);
    let err = crate::util::rejects(&experiment_config(prom, "visits = \"sum(visits_total)\"\n"));
    crate::util::assert_has(&err, &["strategy.experiment.visits", "{group}"]);
    let err = crate::util::rejects(&experiment_config(
        prom,
        "conversions = \"x{t=\\\"{grup}\\\"}\"\n",
    ));
    crate::util::assert_has(&err, &["strategy.experiment.conversions"]);
    let err = crate::util::rejects(&experiment_config(prom, "alpha = 0.9\n"));
    crate::util::assert_has(&err, &["strategy.experiment.alpha"]);
    let err = crate::util::rejects(&experiment_config(prom, "on_no_difference = \"ship-it\"\n"));
    crate::util::assert_has(
        &err,
        &[
            "unknown value `ship-it` in [strategy.experiment]",
            "expected one of: keep-control, promote",
        ],
    );
    let err = crate::util::rejects(&experiment_config(prom, "color = \"red\"\n"));
    crate::util::assert_has(&err, &["color"]);
    let no_metrics =
        experiment_config(prom, "").replace(&format!("[metrics]\nprometheus = \"{prom}\"\n"), "");
    let err = crate::util::rejects(&no_metrics);
    crate::util::assert_has(&err, &["metrics", "add [metrics]"]);
}

/// `setup` with the simulated load balancer: a canary-shaped strategy's
/// canary group starts out of rotation (a fresh state only); rolling leaves
/// every instance in rotation.
#[test]
fn setup_of_the_simulated_balancer_keeps_the_canary_out() {
    let cfg = |kind: &str| {
        format!(
            "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
            [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18295\"\ngroup = \"stable\"\n\n\
            [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18298\"\ngroup = \"canary\"\n\n\
            [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"http://127.0.0.1:9\"\n\n[strategy]\nkind = \"{kind}\"\n"
        )
    };
    let env = Env::new(&cfg("ramped"));
    let out = env.ok(&["setup"], 0);
    assert!(
        out.contains(
            "simulated load balancer: 1 of 2 server(s) in rotation, group canary out until a deployment"
        ),
        "{out}"
    );
    let lb = env.lb();
    assert_eq!(lb["weights"], serde_json::json!({"stable": 100}), "{lb}");
    // An existing state is the last run's: left alone.
    let out = env.ok(&["setup"], 0);
    assert!(!out.contains("simulated load balancer: 1 of 2"), "{out}");

    let env = Env::new(&cfg("rolling"));
    env.ok(&["setup"], 0);
    assert_eq!(
        env.lb()["weights"],
        serde_json::json!({}),
        "rolling: everyone serves"
    );
}

/// An experiment with two treatments through nginx: stable, canary-b on
/// the deployed release, canary-c on v3.
fn treatments_config(treatments: &str) -> String {
    let prom = "http://127.0.0.1:9";
    experiment_config(prom, "")
        .replace(
            "[[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18394\"\ngroup = \"canary\"\n",
            "[[instances]]\nid = \"b-1\"\naddress = \"127.0.0.1:18394\"\ngroup = \"canary-b\"\n\n\
             [[instances]]\nid = \"c-1\"\naddress = \"127.0.0.1:18395\"\ngroup = \"canary-c\"\n",
        )
        .replace(
            "[load_balancer]\nkind = \"simulated\"\n",
            "[load_balancer]\nkind = \"nginx\"\ninclude_file = \"upstream.conf\"\nlocation_include = \"location.conf\"\nupstream = \"app\"\n",
        )
        .replace("[timeouts]", &format!("{treatments}\n[timeouts]"))
}

const TWO_TREATMENTS: &str = "[[strategy.experiment.treatments]]\ngroup = \"canary-b\"\npercent = 25\n\n\
    [[strategy.experiment.treatments]]\ngroup = \"canary-c\"\nrelease = \"v3\"\npercent = 25\n";

#[test]
fn an_experiment_with_two_treatments_plans_a_branch_per_winner() {
    let env = Env::new(&treatments_config(TWO_TREATMENTS));
    let plan = env.ok(&["plan", "v2"], 0);
    for part in [
        "stage 3: experiment: stable 50 %, canary-b 25 %, canary-c 25 % (sticky by cookie dk_variant it sets)",
        "experiment canary-b (v2), canary-c (v3) (treatments, Holm-corrected) against stable (control)",
        "install v2 on b-1",
        "install v3 on c-1",
        "all traffic to canary-b (the winner) [only if canary-b wins]",
        "promote stable 1/1 to v3 [only if canary-c wins]",
        "-> v3): drain stable-1",
        "-> v2): drain stable-1",
        "stop treatments",
    ] {
        assert!(plan.contains(part), "{part:?} missing from:\n{plan}");
    }
    assert!(!plan.contains("Some(") && !plan.contains("Group("), "{plan}");
}

#[test]
fn experiment_treatments_are_checked_naming_the_key() {
    let cases: [(&str, &[&str]); 7] = [
        (
            "[[strategy.experiment.treatments]]\ngroup = \"canary-b\"\npercent = 60\n\n\
             [[strategy.experiment.treatments]]\ngroup = \"canary-c\"\nrelease = \"v3\"\npercent = 40\n",
            &["strategy.experiment.treatments", "add up to 100", "at most 99"],
        ),
        (
            "[[strategy.experiment.treatments]]\ngroup = \"canary-b\"\npercent = 25\n\n\
             [[strategy.experiment.treatments]]\ngroup = \"canary-c\"\npercent = 25\n",
            &["strategy.experiment.treatments[1].release", "deployed release"],
        ),
        (
            "[[strategy.experiment.treatments]]\ngroup = \"canary-b\"\npercent = 25\n\n\
             [[strategy.experiment.treatments]]\ngroup = \"canary-b\"\nrelease = \"v3\"\npercent = 25\n",
            &[
                "strategy.experiment.treatments[1].group",
                "also treatments[0]'s group",
            ],
        ),
        (
            "[[strategy.experiment.treatments]]\ngroup = \"canary-b\"\npercent = 25\n\n\
             [[strategy.experiment.treatments]]\ngroup = \"canary-d\"\nrelease = \"v3\"\npercent = 25\n",
            &[
                "strategy.experiment.treatments[1].group",
                "no instance is in the group canary-d",
            ],
        ),
        (
            "[[strategy.experiment.treatments]]\ngroup = \"canary-b\"\npercent = 25\nweight = 3\n",
            &["weight"],
        ),
        (
            &TWO_TREATMENTS.replace(
                "[[strategy.experiment.treatments]]\ngroup = \"canary-b\"",
                "treatment_percent = 30\n\n[[strategy.experiment.treatments]]\ngroup = \"canary-b\"",
            ),
            &[
                "strategy.experiment.treatment_percent",
                "remove treatment_percent",
            ],
        ),
        (
            "on_no_difference = \"promote\"\n",
            &["strategy.experiment.on_no_difference", "which to promote"],
        ),
    ];
    for (treatments, parts) in cases {
        let cfg = if treatments.starts_with("on_no_difference") {
            treatments_config(TWO_TREATMENTS)
                .replace("min_samples = 500\n", &format!("min_samples = 500\n{treatments}"))
        } else {
            treatments_config(treatments)
        };
        let err = crate::util::rejects(&cfg);
        crate::util::assert_has(&err, parts);
    }
    // An instance in a group that is neither stable nor a treatment.
    let cfg = treatments_config(TWO_TREATMENTS).replace("group = \"canary-c\"\n\n", "group = \"canary\"\n\n");
    let env = Env::new(&cfg);
    let (code, _, err) = env.run(&["plan", "v2"]);
    assert_eq!(code, 2, "{err}");
    crate::util::assert_has(&err, &["treatments[1].group", "canary-c"]);
}
