//! The crash matrix: `deploykit deploy` is killed (abort, as by `kill -9`)
//! right after each journal record in turn; each time `status` must show
//! the interrupted deployment and what each instance runs, and
//! both `deploy --resume` and `rollback` (the crash repeated for each) must
//! bring the fleet to one release with the load balancer consistent.

use serde_json::Value;

use crate::util::{local, Env};

const HOOK: &str = "DEPLOYKIT_TEST_ABORT_AFTER_RECORD";

fn crash_at(env: &Env, n: usize, release: &str) {
    let out = env
        .cmd()
        .env(HOOK, n.to_string())
        .args(["-q", "deploy", release])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "record {n}: the deployment was not interrupted\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn status(env: &Env) -> Value {
    serde_json::from_str(env.ok(&["--json", "status"], 0).trim()).unwrap()
}

#[test]
fn rolling_on_local_instances_recovers_from_a_crash_after_every_record() {
    let env = Env::new(&local(2, ""));
    env.releases(&["v1", "v2"]);
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    // Every deployment between two releases writes the same records.
    let total = env.newest_journal().len();
    assert!(
        total >= 30,
        "a 2-instance rolling deployment writes {total} records"
    );
    let ids = ["web-1", "web-2"];
    let mut current = "v2";
    for (n, resume) in (1..total).flat_map(|n| [(n, true), (n, false)]) {
        let target = if current == "v1" { "v2" } else { "v1" };
        crash_at(&env, n, target);
        let s = status(&env);
        assert_eq!(
            s["deployment"]["history"]["outcome"], "interrupted",
            "record {n}: {s}"
        );
        assert_eq!(
            s["lock"],
            Value::Null,
            "record {n}: the dead process's lock is released"
        );
        for (i, id) in ids.iter().enumerate() {
            let shown = s["instances"][i]["release"].as_str().unwrap().to_string();
            assert_eq!(
                Some(shown),
                env.local_release(id),
                "record {n}: status shows what {id} runs"
            );
        }
        if n == 1 && resume {
            // A new deployment is refused until this one is resumed or
            // rolled back.
            let (code, _, err) = env.run(&["deploy", "v3"]);
            assert_eq!(code, 3, "{err}");
            assert!(
                err.contains("was interrupted") && err.contains("--resume"),
                "{err}"
            );
        }
        let expect = if resume {
            env.ok(&["-q", "deploy", "--resume"], 0);
            target
        } else {
            env.ok(&["-q", "rollback"], 0);
            current
        };
        let how = if resume { "resume" } else { "rollback" };
        for id in ids {
            assert_eq!(
                env.local_release(id).as_deref(),
                Some(expect),
                "record {n}, {how}: {id}"
            );
            assert!(env.local_running(id), "record {n}, {how}: {id} is not running");
            // The process itself, not only the `current` symlink.
            assert_eq!(
                env.local_serving(id).as_deref(),
                Some(expect),
                "record {n}, {how}: {id}'s process"
            );
        }
        assert!(
            env.out_of_rotation().is_empty(),
            "record {n}: out of rotation: {:?}",
            env.out_of_rotation()
        );
        let s = status(&env);
        assert_eq!(
            s["deployment"]["history"]["outcome"], "succeeded",
            "record {n}: {s}"
        );
        current = expect;
    }
    // Nothing is interrupted any more: nothing to resume.
    let (code, _, err) = env.run(&["deploy", "--resume"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("nothing to resume"), "{err}");
}

#[test]
fn blue_green_recovers_from_a_crash_after_every_record() {
    let cfg = "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"blue-1\"\naddress = \"127.0.0.1:18191\"\ngroup = \"blue\"\n\n\
        [[instances]]\nid = \"blue-2\"\naddress = \"127.0.0.1:18192\"\ngroup = \"blue\"\n\n\
        [[instances]]\nid = \"green-1\"\naddress = \"127.0.0.1:18193\"\ngroup = \"green\"\n\n\
        [[instances]]\nid = \"green-2\"\naddress = \"127.0.0.1:18194\"\ngroup = \"green\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n\
        [strategy]\nkind = \"blue-green\"\n\n\
        [strategy.blue-green]\nhealth_interval = \"20ms\"\nhealthy_deadline = \"5s\"\nwarmup_requests = 2\nkeep_old = \"0s\"\n";
    let env = Env::new(cfg);
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    let total = env.newest_journal().len();
    assert!(total >= 20, "a blue-green deployment writes {total} records");
    let mut current = "v2";
    for (n, resume) in (1..total).flat_map(|n| [(n, true), (n, false)]) {
        let target = if current == "v1" { "v2" } else { "v1" };
        let live_before = env.lb()["live"].as_str().unwrap().to_string();
        crash_at(&env, n, target);
        let s = status(&env);
        assert_eq!(
            s["deployment"]["history"]["outcome"], "interrupted",
            "record {n}: {s}"
        );
        let expect = if resume {
            env.ok(&["-q", "deploy", "--resume"], 0);
            target
        } else {
            env.ok(&["-q", "rollback"], 0);
            current
        };
        let live = env.lb()["live"].as_str().unwrap().to_string();
        let recorded: Value =
            serde_json::from_slice(&std::fs::read(env.state().join("live.json")).unwrap()).unwrap();
        assert_eq!(
            recorded["live"],
            live.as_str(),
            "record {n}: the record agrees with the load balancer"
        );
        assert_eq!(
            recorded.get("switching_to"),
            None,
            "record {n}: no switch left pending"
        );
        if expect == current {
            assert_eq!(
                live, live_before,
                "record {n}: a rollback leaves the old environment live"
            );
        } else {
            assert_ne!(live, live_before, "record {n}: a resumed deployment switches");
        }
        for i in 1..=2 {
            let id = format!("{live}-{i}");
            assert_eq!(env.sim(&id)["release"], expect, "record {n}: {id}");
            assert_eq!(env.sim(&id)["running"], true, "record {n}: {id}");
        }
        let s = status(&env);
        assert_eq!(
            s["deployment"]["history"]["outcome"], "succeeded",
            "record {n}: {s}"
        );
        current = expect;
    }
}

#[test]
fn canary_recovers_from_a_crash_at_every_other_record() {
    let prom = crate::util::answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18391\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"stable-2\"\naddress = \"127.0.0.1:18392\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18393\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [50, 100]\nstage_duration = \"100ms\"\ncheck_interval = \"50ms\"\n\
        health_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [strategy.rolling]\nhealth_interval = \"20ms\"\nstabilisation = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    env.ok(&["deploy", "v2"], 0);
    let total = env.newest_journal().len();
    assert!(total >= 30, "a canary deployment writes {total} records");
    let mut current = "v2";
    for (n, resume) in (1..total).step_by(2).flat_map(|n| [(n, true), (n, false)]) {
        let target = if current == "v1" { "v2" } else { "v1" };
        crash_at(&env, n, target);
        let s = status(&env);
        assert_eq!(
            s["deployment"]["history"]["outcome"], "interrupted",
            "record {n}: {s}"
        );
        let expect = if resume {
            env.ok(&["-q", "deploy", "--resume"], 0);
            target
        } else {
            env.ok(&["-q", "rollback"], 0);
            current
        };
        for id in ["stable-1", "stable-2"] {
            assert_eq!(env.sim(id)["release"], expect, "record {n}: {id}");
            assert_eq!(env.sim(id)["running"], true, "record {n}: {id}");
        }
        assert_eq!(
            env.sim("canary-1")["running"],
            false,
            "record {n}: the canary ends stopped"
        );
        let lb = env.lb();
        assert!(
            env.out_of_rotation().iter().all(|i| i == "canary-1"),
            "record {n}: {lb}"
        );
        assert_eq!(
            lb["weights"]["stable"], 100,
            "record {n}: all traffic to stable: {lb}"
        );
        current = expect;
    }
}

#[test]
fn a_recovery_that_is_itself_killed_can_be_run_again() {
    let env = Env::new(&crate::util::simulated(
        3,
        "[strategy.rolling]\nbatch_size = 2\nhealth_interval = \"20ms\"\nstabilisation = \"20ms\"\ndrain_timeout = \"1s\"\n",
    ));
    env.ok(&["deploy", "v1"], 0);
    env.ok(&["deploy", "v2"], 0);
    let total = env.newest_journal().len();
    let mut current = "v2";
    let mut k = 0;
    let mut killed = 0;
    for n in (2..total).step_by(4) {
        for m in [2, 5, 9] {
            let target = if current == "v1" { "v2" } else { "v1" };
            crash_at(&env, n, target);
            let (args, expect): (&[&str], &str) = if k % 2 == 0 {
                (&["-q", "deploy", "--resume"], target)
            } else {
                (&["-q", "rollback"], current)
            };
            k += 1;
            // The recovery is killed too, then run again to the end.
            let out = env.cmd().env(HOOK, m.to_string()).args(args).output().unwrap();
            let finished = out.status.success();
            // Every recovery writes its header and start record: a kill
            // after record 2 always lands.
            assert!(
                m > 2 || !finished,
                "records {n}/{m} ({args:?}): the recovery was not killed"
            );
            killed += usize::from(!finished);
            if !finished {
                let s = status(&env);
                assert_eq!(
                    s["deployment"]["history"]["outcome"], "interrupted",
                    "records {n}/{m}: {s}"
                );
                env.ok(args, 0);
            }
            for i in 1..=3 {
                let id = format!("web-{i}");
                assert_eq!(
                    env.sim(&id)["release"],
                    expect,
                    "records {n}/{m} ({args:?}): {id}"
                );
                assert_eq!(env.sim(&id)["running"], true, "records {n}/{m} ({args:?}): {id}");
            }
            assert!(
                env.out_of_rotation().is_empty(),
                "records {n}/{m}: {:?}",
                env.out_of_rotation()
            );
            current = expect;
        }
    }
    assert!(
        killed * 2 > k,
        "only {killed} of {k} recoveries were really killed"
    );
    // A rollback after a finished rollback changes nothing.
    env.ok(&["-q", "rollback"], 0);
    env.ok(&["-q", "rollback"], 0);
    let releases: Vec<_> = (1..=3)
        .map(|i| env.sim(&format!("web-{i}"))["release"].clone())
        .collect();
    assert!(releases.iter().all(|r| r == &releases[0]), "{releases:?}");
    assert!(env.out_of_rotation().is_empty());
}

#[test]
fn a_journal_dated_in_the_future_does_not_hide_a_later_crash() {
    // The clock was a year ahead during the v2 deployment and was then
    // stepped back: the v3 deployment killed afterwards starts "earlier".
    let env = Env::new(&crate::util::simulated(2, ""));
    env.ok(&["-q", "deploy", "v2"], 0);
    let dir = env.state().join("journal");
    let v2 = std::fs::read_dir(&dir).unwrap().next().unwrap().unwrap().path();
    let text = std::fs::read_to_string(&v2).unwrap();
    let (first, rest) = text.split_once('\n').unwrap();
    let mut header: Value = serde_json::from_str(first).unwrap();
    let future = header["started_at_ms"].as_u64().unwrap() + 365 * 24 * 3600 * 1000;
    header["started_at_ms"] = future.into();
    std::fs::write(&v2, format!("{header}\n{rest}")).unwrap();
    crash_at(&env, 3, "v3");
    let (code, _, err) = env.run(&["deploy", "v4"]);
    assert_eq!(code, 3, "the interrupted v3 deployment refuses a new one: {err}");
    assert!(err.contains("was interrupted") && err.contains("v3"), "{err}");
    let s = status(&env);
    assert_eq!(s["deployment"]["history"]["release"], "v3", "{s}");
    assert_eq!(s["deployment"]["history"]["outcome"], "interrupted", "{s}");
    let history = env.ok(&["--json", "history"], 0);
    let last = crate::util::json_lines(&history).pop().unwrap();
    assert_eq!(
        last["release"], "v3",
        "history lists the crashed run last: {history}"
    );
}

#[test]
fn a_second_state_dir_cannot_deploy_instances_another_deployment_holds() {
    // Two copies of one configuration with different state directories:
    // each has its own lock, so only a marker on the instances stops them.
    let env = Env::new(&local(
        2,
        "[strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"1500ms\"\ndrain_timeout = \"1s\"\n",
    ));
    env.releases(&["v1", "v2", "v3"]);
    let text = std::fs::read_to_string(env.path().join("deploykit.toml")).unwrap();
    std::fs::write(
        env.path().join("copy.toml"),
        format!("state_dir = \"copy-state\"\n{text}"),
    )
    .unwrap();
    let marker = |id: &str| env.path().join("instances").join(id).join(".deploykit-marker");
    env.ok(&["-q", "deploy", "v1"], 0);
    assert!(
        !marker("web-1").exists(),
        "a finished deployment removes its markers"
    );

    let mut first = env.spawn_deploy("v2", "the first instance's wait", |r| {
        r["event"] == "step_started"
    });
    let (code, out, err) = env.run(&["--config", "copy.toml", "deploy", "v3"]);
    assert_eq!(code, 4, "refused while the first runs\n{out}\n{err}");
    assert!(
        err.contains("web-1") && err.contains("-v2") && err.contains(".deploykit"),
        "names the instance, the holding deployment and its state directory: {err}"
    );
    assert!(
        !env.path().join("copy-state/shop/journal").exists()
            || std::fs::read_dir(env.path().join("copy-state/shop/journal"))
                .unwrap()
                .count()
                == 0,
        "the refused deployment started nothing"
    );
    assert_eq!(first.wait().unwrap().code(), Some(0));
    assert_eq!(env.local_release("web-2").as_deref(), Some("v2"));
    assert!(!marker("web-1").exists() && !marker("web-2").exists());

    // A deployment killed part-way leaves its markers: its own state
    // directory takes them over; another needs --take-over.
    crash_at(&env, 6, "v3");
    assert!(marker("web-1").exists(), "the killed deployment's marker stays");
    let (code, out, err) = env.run(&["--config", "copy.toml", "deploy", "v3"]);
    assert_eq!(code, 4, "{out}\n{err}");
    assert!(err.contains("--take-over"), "{err}");
    env.ok(&["-q", "deploy", "--resume"], 0);
    assert!(!marker("web-1").exists());
    crash_at(&env, 6, "v1");
    env.ok(&["-q", "--config", "copy.toml", "deploy", "v2", "--take-over"], 0);
    assert_eq!(env.local_release("web-1").as_deref(), Some("v2"));
    assert!(!marker("web-1").exists() && !marker("web-2").exists());
}

/// `kill -9` of a ramped deployment mid-ramp: `deploy --resume` goes on
/// from the last step whose analysis passed — not from the first, never
/// above the step being judged when it died — and finishes the ramp.
#[test]
fn a_ramp_killed_mid_way_resumes_from_its_last_passed_step() {
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
        [strategy.ramped]\nfrom = 20\nto = 100\nduration = \"2s\"\nstep_interval = \"500ms\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let weights = |journal: &[Value]| -> Vec<u64> {
        journal
            .iter()
            .filter(|r| r["event"] == "analysis_result")
            .filter_map(|r| r["weight"].as_u64())
            .collect()
    };
    // The ramp is 20, 40, 60, 80, 100 %: killed while 60 % is judged, so
    // the 40 % step had passed.
    let mut deploy = env.spawn_deploy("v2", "the ramp's 60 % step", |r| {
        r["event"] == "analysis_result" && r["weight"] == 60
    });
    deploy.kill().expect("SIGKILL");
    deploy.wait().unwrap();
    let killed = weights(&env.newest_journal());
    assert!(killed.contains(&40) && killed.contains(&60), "{killed:?}");
    let s = status(&env);
    assert_eq!(s["deployment"]["history"]["outcome"], "interrupted", "{s}");

    env.ok(&["-q", "deploy", "--resume"], 0);
    let journal = env.newest_journal();
    assert_eq!(journal[0]["kind"], "resume", "{}", journal[0]);
    let resumed = weights(&journal);
    let first = *resumed.first().expect("the resume analyses the ramp");
    assert!(
        first == 40 || first == 60,
        "the resume starts at the last approved step, not at 20 % nor above the one judged: {resumed:?}"
    );
    assert!(
        resumed.windows(2).all(|w| w[0] <= w[1]) && resumed.last() == Some(&100),
        "then climbs the rest of the ramp: {resumed:?}"
    );
    assert_eq!(env.sim("stable-1")["release"], "v2");
    assert_eq!(env.sim("canary-1")["running"], false, "the canary ends stopped");
    let lb = env.lb();
    assert_eq!(lb["weights"]["stable"], 100, "all traffic to stable: {lb}");
    assert_eq!(
        env.newest_journal().last().map(|r| r["outcome"].clone()),
        Some(Value::from("succeeded"))
    );
}

#[test]
fn rollback_takes_over_a_dead_foreign_deployments_instances_only_with_take_over() {
    let env = Env::new(&local(
        2,
        "[strategy.rolling]\nhealth_interval = \"50ms\"\nstabilisation = \"1500ms\"\ndrain_timeout = \"1s\"\n",
    ));
    env.releases(&["v1", "v2", "v3"]);
    let text = std::fs::read_to_string(env.path().join("deploykit.toml")).unwrap();
    std::fs::write(
        env.path().join("copy.toml"),
        format!("state_dir = \"copy-state\"\n{text}"),
    )
    .unwrap();
    let marker = |id: &str| env.path().join("instances").join(id).join(".deploykit-marker");
    let copy = |args: &[&str]| {
        let mut all = vec!["--config", "copy.toml"];
        all.extend_from_slice(args);
        env.run(&all)
    };
    let copy_journals = || {
        std::fs::read_dir(env.path().join("copy-state/shop/journal"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    // The copy's last deployment is v1 → v2: its rollback brings back v1.
    env.ok(&["-q", "--config", "copy.toml", "deploy", "v1"], 0);
    env.ok(&["-q", "--config", "copy.toml", "deploy", "v2"], 0);
    let journals = copy_journals();

    // A running deployment of the other state directory is never taken over.
    let mut first = env.spawn_deploy("v3", "the first instance's wait", |r| {
        r["event"] == "step_started"
    });
    let (code, out, err) = copy(&["rollback", "--take-over"]);
    assert_eq!(code, 4, "refused while the other deployment runs\n{out}\n{err}");
    assert!(err.contains("which is running"), "{err}");
    assert_eq!(copy_journals(), journals, "the refused rollback recorded nothing");
    assert_eq!(first.wait().unwrap().code(), Some(0));

    // Killed part-way, it leaves its markers: a rollback of the other state
    // directory is refused, naming --take-over, and touches nothing.
    crash_at(&env, 6, "v2");
    assert!(marker("web-1").exists(), "the killed deployment's marker stays");
    let before: Vec<Option<String>> = ["web-1", "web-2"].iter().map(|i| env.local_release(i)).collect();
    let (code, out, err) = copy(&["rollback"]);
    assert_eq!(code, 4, "{out}\n{err}");
    assert!(
        err.contains("web-1") && err.contains("whose process is gone") && err.contains("--take-over"),
        "{err}"
    );
    assert_eq!(copy_journals(), journals);
    let after: Vec<Option<String>> = ["web-1", "web-2"].iter().map(|i| env.local_release(i)).collect();
    assert_eq!(before, after, "the refused rollback touched no instance");

    // With --take-over it rolls back and leaves no marker behind.
    let (code, out, err) = copy(&["rollback", "--take-over"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(env.local_release("web-1").as_deref(), Some("v1"));
    assert_eq!(env.local_release("web-2").as_deref(), Some("v1"));
    assert!(!marker("web-1").exists() && !marker("web-2").exists());
    assert_eq!(copy_journals(), journals + 1);
}

/// A `promote` sent while no deploykit runs the deployment is recorded
/// (under the lock, in the state directory) for its `deploy --resume`,
/// which goes on past that wait without asking again; one for a
/// deployment that was not waiting is refused (exit 2) and records
/// nothing.
#[test]
fn a_promote_sent_while_nothing_runs_is_honoured_by_the_resume() {
    let prom = crate::util::answering(
        r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1700000000,"0.001"]}]}}"#,
    );
    // The timeout only bounds the test: a lost promotion rolls back (exit 1)
    // instead of waiting for ever.
    let cfg = format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:18393\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:18394\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n[metrics]\nprometheus = \"{prom}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [20, 100]\nstage_duration = \"300ms\"\ncheck_interval = \"100ms\"\n\
        promotion = \"manual\"\npromotion_timeout = \"30s\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n"
    );
    let env = Env::new(&cfg);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let control = env.path().join(".deploykit/shop/control.json");
    let (code, _, err) = env.run(&["promote"]);
    assert_eq!(code, 2, "nothing runs nor was interrupted: {err}");
    assert!(err.contains("nothing waits for a promotion"), "{err}");

    // Killed before its wait: refused, nothing recorded.
    let mut deploy = env.spawn_deploy("v2", "the canary's first step", |r| r["event"] == "step_started");
    deploy.kill().expect("SIGKILL");
    deploy.wait().unwrap();
    let (code, _, err) = env.run(&["promote"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("was not waiting for a promotion"), "{err}");
    assert!(!control.exists(), "a refused promote records nothing");
    env.ok(&["-q", "rollback"], 0);

    // Killed while it waits: the promotion is recorded, then honoured.
    let mut deploy = env.spawn_deploy("v2", "the wait for promotion", |r| {
        r["event"] == "awaiting_promotion"
    });
    deploy.kill().expect("SIGKILL");
    deploy.wait().unwrap();
    let journals = env.journal_count();
    let out = env.ok(&["promote"], 0);
    assert!(out.contains("promotion of stage 1 recorded"), "{out}");
    assert_eq!(
        env.journal_count(),
        journals,
        "recorded beside the journals, not as a run"
    );
    let recorded: Value = serde_json::from_slice(&std::fs::read(&control).unwrap()).unwrap();
    assert_eq!(recorded["command"], "promote", "{recorded}");
    assert_eq!(recorded["stage"], 1, "{recorded}");

    let (code, out, err) = env.run(&["deploy", "--resume"]);
    assert_eq!(
        code, 0,
        "the resume goes on past the recorded promotion\n{out}\n{err}"
    );
    assert!(
        out.contains("stage 1 was promoted while no deploykit ran"),
        "{out}"
    );
    let journal = env.newest_journal();
    assert_eq!(journal[0]["kind"], "resume", "{}", journal[0]);
    let at = |event: &str| journal.iter().position(|r| r["event"] == event);
    let (waited, promoted) = (at("awaiting_promotion"), at("promoted"));
    assert!(
        waited.is_some() && promoted.is_some() && waited < promoted,
        "the resumed wait is journaled as promoted: {journal:?}"
    );
    assert!(
        journal
            .iter()
            .any(|r| r["event"] == "analysis_result" && r["weight"] == 100),
        "then the canary's last stage runs"
    );
    assert_eq!(
        journal.last().map(|r| r["outcome"].clone()),
        Some(Value::from("succeeded"))
    );
    assert_eq!(env.sim("stable-1")["release"], "v2");

    // Nothing waits any more.
    let (code, _, err) = env.run(&["promote"]);
    assert_eq!(code, 2, "{err}");
}
