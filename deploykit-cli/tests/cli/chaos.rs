//! `deploykit drill` and `[[strategy.canary.chaos]]` through the CLI on
//! simulated instances: the verdicts, with their evidence, decide the exit
//! code.

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::util::Env;

fn config(prom: &str, port: u16, chaos: &str) -> String {
    format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:{port}\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:{}\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n\
        [metrics]\nprometheus = \"{prom}\"\nerror_rate = \"errors{{track=\\\"{{group}}\\\"}}\"\n\
        latency_p99 = \"latency{{track=\\\"{{group}}\\\"}}\"\nrequest_count = \"requests{{track=\\\"{{group}}\\\"}}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [20, 100]\nstage_duration = \"300ms\"\ncheck_interval = \"100ms\"\n\
        health_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n{chaos}\n\
        [timeouts]\ndrain_poll = \"20ms\"\n",
        port + 1
    )
}

const KILL_EXPECT_ROLLBACK: &str =
    "[[strategy.canary.chaos]]\nstage = 1\nkind = \"kill\"\nexpect = \"rollback\"\nwithin = \"30s\"\n";

fn setup(prom: &str, port: u16, chaos: &str) -> Env {
    let env = Env::new(&config(prom, port, chaos));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    env
}

#[test]
fn a_drill_whose_gate_rolls_back_in_time_passes_and_prints_the_evidence() {
    // The canary errs at 5 % against stable's 0.1 %: the first check fails.
    let prom = crate::util::prometheus(|r| match (r.contains("requests"), r.contains("canary")) {
        (true, _) => 1000.0,
        (false, true) if r.contains("errors") => 0.05,
        _ => 0.001,
    });
    let env = setup(&prom, 18_331, KILL_EXPECT_ROLLBACK);
    let (code, out, err) = env.run(&["drill", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ROLLED BACK"), "{out}");
    assert!(
        out.contains(
            "chaos[0] SIGKILL of the process on canary in stage 1, expect rollback: PASSED — rolled back"
        ),
        "{out}"
    );
    assert!(
        out.contains("  injected at ") && out.contains(" into canary-1"),
        "{out}"
    );
    assert!(
        out.contains("  first failing check at ") && out.contains("canary error rate"),
        "{out}"
    );
    assert!(out.contains("  rollback done at "), "{out}");
    assert_eq!(env.sim("stable-1")["release"], "v1");
    // The journal keeps the injection.
    let journal = env.newest_journal();
    assert!(
        journal
            .iter()
            .any(|r| r["event"] == "chaos_injected" && r["fault"]["kind"] == "kill"),
        "{journal:?}"
    );
}

#[test]
fn a_drill_whose_gate_never_fires_exits_5_and_says_so() {
    // The metrics never see the fault: the canary is promoted.
    let prom = crate::util::prometheus(|r| if r.contains("requests") { 1000.0 } else { 0.001 });
    let env = setup(&prom, 18_333, KILL_EXPECT_ROLLBACK);
    let (code, out, err) = env.run(&["drill", "v2"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(out.contains("SUCCEEDED"), "{out}");
    assert!(out.contains("FAILED — the gate did not fire"), "{out}");
    // The same entries make a plain deploy a drill too; --json gives the verdicts as data.
    let (code, out, _) = env.run(&["--json", "deploy", "v3"]);
    assert_eq!(code, 5, "{out}");
    let verdicts = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("chaos_verdicts").is_some())
        .expect("a chaos_verdicts line");
    assert_eq!(verdicts["chaos_verdicts"][0]["passed"], false);
    assert_eq!(verdicts["chaos_verdicts"][0]["spec"]["kind"], "kill");
}

#[test]
fn bad_entries_name_the_key() {
    let prom = crate::util::prometheus(|_| 0.001);
    let env = Env::new(&config(
        &prom,
        18_337,
        "[[strategy.canary.chaos]]\nstage = 1\nkind = \"kill\"\nexpect = \"rollback\"\n",
    ));
    let (code, _, err) = env.run(&["validate"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("chaos[0].within") && err.contains("is missing"),
        "{err}"
    );
}

/// The state directory of the one test whose Prometheus stand-in reads the
/// simulated fleet.
static FLEET_STATE: OnceLock<PathBuf> = OnceLock::new();

/// Whether `canary-1` runs, from the simulated fleet's log (its last whole
/// line wins).
fn canary_running() -> bool {
    let Some(state) = FLEET_STATE.get() else {
        return true;
    };
    let log = std::fs::read_to_string(state.join("simulated").join("instances.log")).unwrap_or_default();
    let whole = &log[..log.rfind('\n').map_or(0, |end| end + 1)];
    whole
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["id"] == "canary-1")
        .is_none_or(|v| v["running"] != false)
}

#[test]
fn a_drill_of_the_current_release_passes_and_deploy_drill_deploys_after_it() {
    // A canary that is down answers errors, as a dead process behind a
    // balancer does; one that runs is as good as stable.
    let prom = crate::util::prometheus(|r| {
        if r.contains("requests") {
            1000.0
        } else if r.contains("canary") && r.contains("errors") && !canary_running() {
            0.05
        } else {
            0.001
        }
    });
    // Stages of 1 s: the default fault comes 300 ms in, after two checks.
    let env = Env::new(&config(&prom, 18_341, "").replace("\"300ms\"", "\"1s\""));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    FLEET_STATE.set(env.state()).unwrap();
    let (code, out, err) = env.run(&["drill"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "chaos[0] SIGKILL of the process on canary in stage 1, expect rollback: PASSED — rolled back"
        ),
        "{out}"
    );
    assert!(out.contains(" into canary-1 (checks passed before it: "), "{out}");
    assert!(!out.contains("(checks passed before it: 0)"), "{out}");
    assert!(
        out.contains("  first failing check at ") && out.contains("canary error rate 5.000 %"),
        "{out}"
    );
    // The drill deployed v1, the release the fleet runs, and left it so.
    let journal = env.newest_journal();
    assert_eq!(journal[0]["release"], "v1", "{:?}", journal[0]);
    assert_eq!(env.sim("stable-1")["release"], "v1");
    assert_eq!(env.sim("canary-1")["release"], "v1");
    // Its journal says it was a drill, and its rollback is no change failure.
    assert_eq!(journal[0]["drill"], true, "{:?}", journal[0]);
    let (code, stats, err) = env.run(&["stats"]);
    assert_eq!(code, 0, "{stats}{err}");
    assert!(
        stats.contains("change failure rate    0.0% (0 failed)"),
        "{stats}"
    );
    assert!(
        stats.contains("drills: 1 (1 rolled back by their gates; left out of the figures above)"),
        "{stats}"
    );

    // deploy --drill: the same drill first, then the release.
    let (code, out, err) = env.run(&["deploy", "v2", "--drill"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("drill passed: deploying v2"), "{out}");
    assert!(out.contains("PASSED"), "{out}");
    assert_eq!(env.sim("stable-1")["release"], "v2");
    assert_eq!(env.newest_journal()[0]["release"], "v2");
}

#[test]
fn a_drill_whose_gate_never_fires_fails_and_deploy_drill_touches_nothing_of_the_release() {
    let prom = crate::util::prometheus(|r| if r.contains("requests") { 1000.0 } else { 0.001 });
    // Metrics blind to the kill and the health watch turned off: nothing
    // can see the dead canary.
    let entry = "health_watch = \"off\"\n[[strategy.canary.chaos]]\nstage = 1\nafter = \"150ms\"\nkind = \"kill\"\nexpect = \"rollback\"\nwithin = \"1s\"\n";
    let env = setup(&prom, 18_343, entry);
    // The client probe counts what users would have seen: here a balancer
    // address nothing listens on, so every request fails.
    let (code, out, err) = env.run(&["drill", "--probe", "http://127.0.0.1:9/"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(out.contains("FAILED — the gate did not fire"), "{out}");
    let probe = out
        .lines()
        .find(|l| l.starts_with("client probe: "))
        .unwrap_or_else(|| panic!("no probe line: {out}"));
    let words: Vec<&str> = probe.split_whitespace().collect();
    let (sent, failed) = (words[2].parse::<u64>().unwrap(), words[6].parse::<u64>().unwrap());
    assert!(sent > 0 && failed == sent, "{probe}");
    assert!(
        probe.contains("requests to http://127.0.0.1:9/,") && probe.ends_with("(100.0%)"),
        "{probe}"
    );
    // A probe that answers: none failed; --json carries the counts.
    let ok = crate::util::answering("{}");
    let (code, out, _) = env.run(&["--json", "drill", "--probe", &ok]);
    assert_eq!(code, 5, "{out}");
    let line = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("chaos_verdicts").is_some())
        .expect("a chaos_verdicts line");
    assert!(line["probe"]["requests"].as_u64().unwrap() > 0, "{line}");
    assert_eq!(line["probe"]["failed"], 0, "{line}");
    let (code, _, err) = env.run(&["drill", "--probe", "127.0.0.1:8080"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid --probe: \"127.0.0.1:8080\" is not an http(s) URL"),
        "{err}"
    );
    // Flags of the default fault would be ignored beside entries: refused.
    let (code, _, err) = env.run(&["drill", "--within", "5s"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid --within: sets the default fault"), "{err}");

    let journals = env.journal_count();
    let (code, out, err) = env.run(&["deploy", "v2", "--drill"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        err.contains(
            "the drill did not pass, so v2 was not deployed; nothing of that deployment was touched"
        ),
        "{err}"
    );
    // One journal more: the drill's, of v1.
    assert_eq!(env.journal_count(), journals + 1);
    assert_eq!(env.newest_journal()[0]["release"], "v1");
    assert_eq!(env.sim("stable-1")["release"], "v1");
}

#[test]
fn a_drill_whose_gate_can_never_fire_fails_before_anything_is_touched() {
    // Queries that match nothing: an empty result for every query.
    let prom = crate::util::answering(r#"{"status":"success","data":{"resultType":"vector","result":[]}}"#);
    let env = setup(&prom, 18_345, "");
    let journals = env.journal_count();
    let (code, out, err) = env.run(&["drill"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        err.contains("drill FAILED before anything was touched: the gate can never fire on real evidence: ")
            && err.contains(r#"stable error rate (query `errors{track="stable"}`) answered no data"#),
        "{err}"
    );
    assert_eq!(env.journal_count(), journals, "a journal was written");

    // Error rules that no error rate can break.
    let prom = crate::util::prometheus(|_| 0.001);
    let env = Env::new(&config(&prom, 18_347, "").replace(
        "stages = [20, 100]\n",
        "stages = [20, 100]\nerror_threshold = 1.0\nratio_floor = 1.0\n",
    ));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let (code, out, err) = env.run(&["drill"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        err.contains("the gate can never fire on errors: error_threshold is 100% and ratio_floor is 100%"),
        "{err}"
    );
    // Nothing deployed yet: no current release to drill.
    let env = Env::new(&config(&prom, 18_349, ""));
    let (code, _, err) = env.run(&["drill"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid release: stable-1 (stable) runs no release yet"),
        "{err}"
    );
}

#[test]
fn the_health_watch_is_on_by_default_and_off_turns_it_off() {
    // Metrics blind to the kill; the stage outlasts two probes 1 s apart.
    let prom = crate::util::prometheus(|r| if r.contains("requests") { 1000.0 } else { 0.001 });
    let entry = "[[strategy.canary.chaos]]\nstage = 1\nafter = \"150ms\"\nkind = \"kill\"\nexpect = \"rollback\"\nwithin = \"5s\"\n";
    let long = |c: String| c.replace("stage_duration = \"300ms\"", "stage_duration = \"4s\"");
    let env = Env::new(&long(config(&prom, 18_351, entry)));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let (code, out, err) = env.run(&["drill", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("canary canary-1 failed 2 health probe(s) in a row, 1s apart, during stage 1 (20%)"),
        "{out}"
    );
    assert!(out.contains("expect rollback: PASSED"), "{out}");

    // The same with the watch off: the kill goes unseen and the drill fails.
    let off = format!("health_watch = \"off\"\n{entry}");
    let env = Env::new(&long(config(&prom, 18_353, &off)));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let (code, out, err) = env.run(&["drill", "v2"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(out.contains("FAILED — the gate did not fire"), "{out}");
    assert!(!out.contains("health probe(s)"), "{out}");

    // Anything but a duration or "off" is refused, naming the key.
    let bad = format!("health_watch = \"sometimes\"\n{entry}");
    let env = Env::new(&config(&prom, 18_355, &bad));
    let (code, _, err) = env.run(&["validate"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("health_watch") && err.contains("\"off\""), "{err}");
}

#[test]
fn with_the_health_watch_a_drill_whose_metrics_never_see_the_kill_passes() {
    // The metrics that never see the fault, as above; the health watch
    // probes the killed canary directly and rolls back.
    let prom = crate::util::prometheus(|r| if r.contains("requests") { 1000.0 } else { 0.001 });
    let watch = format!("health_watch = \"20ms\"\n{KILL_EXPECT_ROLLBACK}");
    let env = setup(&prom, 18_339, &watch);
    let (code, out, err) = env.run(&["drill", "v2"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ROLLED BACK"), "{out}");
    assert!(
        out.contains("canary canary-1 failed 2 health probe(s) in a row, 20ms apart, during stage 1 (20%)"),
        "{out}"
    );
    assert!(out.contains("expect rollback: PASSED"), "{out}");
    // The verdict's evidence is the watch, and the journal keeps its event.
    assert!(
        out.contains("  first failing check at ")
            && out.contains(": canary canary-1 failed 2 health probe(s) in a row"),
        "{out}"
    );
    assert!(
        env.newest_journal()
            .iter()
            .any(|r| r["event"] == "canary_unhealthy" && r["instance"] == "canary-1"),
        "no canary_unhealthy in the journal"
    );
    assert_eq!(env.sim("stable-1")["release"], "v1");
}

#[test]
fn a_network_fault_detours_the_canary_through_a_loopback_proxy_for_its_stage_only() {
    // Healthy metrics: the canary carries on, as the entry expects.
    let prom = crate::util::prometheus(|r| if r.contains("requests") { 1000.0 } else { 0.001 });
    let chaos =
        "[[strategy.canary.chaos]]\nstage = 1\nkind = \"latency\"\ndelay = \"5ms\"\nexpect = \"continue\"\n";
    let config =
        config(&prom, 18_339, chaos).replace("stage_duration = \"300ms\"", "stage_duration = \"2s\"");
    let env = Env::new(&config);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let child = env.spawn_deploy("v2", "the fault's injection", |r| r["event"] == "chaos_injected");
    // While the fault lasts the balancer sends canary-1's traffic to a
    // proxy on loopback, not to canary-1's own address.
    let via = env.lb()["via"]["canary-1"].as_str().map(str::to_owned);
    let out = child.wait_with_output().expect("the deployment ends");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let via = via.expect("canary-1 detoured during its fault");
    assert!(via.starts_with("127.0.0.1:") && via != "127.0.0.1:18340", "{via}");
    // Afterwards every instance is reached at its own address again.
    assert!(env.lb().get("via").is_none(), "{}", env.lb());
    let journal = env.newest_journal();
    assert!(
        journal
            .iter()
            .any(|r| r["event"] == "chaos_injected" && r["fault"]["kind"] == "latency"),
        "{journal:?}"
    );
    assert!(
        journal.iter().any(|r| r["event"] == "chaos_cleared"),
        "{journal:?}"
    );
}

#[test]
fn a_network_fault_behind_a_balancer_that_cannot_detour_is_refused_naming_the_entry() {
    let prom = crate::util::prometheus(|_| 0.001);
    let istio = |chaos: &str| {
        config(&prom, 18_341, chaos).replace(
            "[load_balancer]\nkind = \"simulated\"\n",
            "[load_balancer]\nkind = \"istio\"\nnamespace = \"shop\"\nresource = \"web\"\n\
             services.stable = { service = \"web\", subset = \"stable\" }\n\
             services.canary = { service = \"web\", subset = \"canary\" }\n",
        )
    };
    let env = Env::new(&istio(
        "[[strategy.canary.chaos]]\nstage = 1\nkind = \"kill\"\nexpect = \"rollback\"\nwithin = \"30s\"\n\n\
         [[strategy.canary.chaos]]\nstage = 1\nkind = \"http-error\"\npercent = 50\nexpect = \"rollback\"\nwithin = \"30s\"\n",
    ));
    let (code, _, err) = env.run(&["validate"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("strategy.canary.chaos[1].kind")
            && err.contains("\"http-error\" is a network fault")
            && err.contains("load_balancer.kind \"istio\" cannot point a backend at one"),
        "{err}"
    );
    // A process fault needs no detour: the same balancer takes it.
    let env = Env::new(&istio(KILL_EXPECT_ROLLBACK));
    env.ok(&["validate"], 0);
}

#[test]
fn a_run_killed_during_a_network_fault_leaves_a_record_and_the_rollback_sends_the_canary_home() {
    let prom = crate::util::prometheus(|r| if r.contains("requests") { 1000.0 } else { 0.001 });
    let chaos =
        "[[strategy.canary.chaos]]\nstage = 1\nkind = \"latency\"\ndelay = \"5ms\"\nexpect = \"continue\"\n";
    let config =
        config(&prom, 18_343, chaos).replace("stage_duration = \"300ms\"", "stage_duration = \"30s\"");
    let env = Env::new(&config);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let mut child = env.spawn_deploy("v2", "the fault's injection", |r| r["event"] == "chaos_injected");
    // SIGKILL mid-fault: the detour stays, the proxy is gone with the process.
    child.kill().expect("kill deploykit");
    let _ = child.wait();
    assert!(env.lb()["via"]["canary-1"].is_string(), "{}", env.lb());
    assert!(env.state().join("chaos-detours.json").exists());
    let (code, _, err) = env.run(&["-q", "rollback"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(
            "canary-1's traffic still went to the fault proxy of a run that ended during a network fault"
        ),
        "{err}"
    );
    assert!(env.lb().get("via").is_none(), "{}", env.lb());
    assert!(!env.state().join("chaos-detours.json").exists());
}

/// The state directory of the test whose Prometheus stand-in reads the
/// simulated balancer's detours.
static DETOUR_STATE: OnceLock<PathBuf> = OnceLock::new();

/// Whether `canary-1`'s traffic goes through a fault proxy that injects
/// errors now: the simulated balancer detours it and the run has recorded
/// the injection (the detour comes first, so a check between the two must
/// not see errors yet).
fn canary_faulted() -> bool {
    let Some(state) = DETOUR_STATE.get() else {
        return false;
    };
    let detoured = std::fs::read(state.join("simulated").join("lb.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|lb| lb["via"]["canary-1"].is_string());
    let injected = std::fs::read_dir(state.join("journal")).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "jsonl"))
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("\"chaos_injected\"")))
    });
    detoured && injected
}

#[test]
fn a_drill_with_the_http_error_fault_detours_the_canary_through_a_proxy_and_passes() {
    // The canary errs once the fault proxy injects, as Prometheus would see
    // the proxy's 503s.
    let prom = crate::util::prometheus(|r| {
        if r.contains("requests") {
            1000.0
        } else if r.contains("canary") && r.contains("errors") && canary_faulted() {
            0.5
        } else {
            0.001
        }
    });
    let env = Env::new(&config(&prom, 18_345, "").replace("\"300ms\"", "\"1s\""));
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    DETOUR_STATE.set(env.state()).unwrap();
    let (code, out, err) = env.run(&["drill", "--fault", "http-error"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("expect rollback: PASSED — rolled back"), "{out}");
    assert!(out.contains("canary error rate 50.000 %"), "{out}");
    let journal = env.newest_journal();
    assert!(
        journal
            .iter()
            .any(|r| r["event"] == "chaos_injected" && r["fault"]["kind"] == "http-error"),
        "no http-error injection in the journal"
    );
    // The detour ended with the run: every instance at its own address.
    assert!(env.lb().get("via").is_none(), "{}", env.lb());
    assert_eq!(env.sim("stable-1")["release"], "v1");
}

#[test]
fn validate_takes_a_bandwidth_entry_and_refuses_a_bad_rate_naming_the_key() {
    let prom = crate::util::prometheus(|_| 0.001);
    let bandwidth = |rate: &str| {
        format!(
            "[[strategy.canary.chaos]]\nstage = 1\nkind = \"bandwidth\"\nrate = {rate}\nexpect = \"continue\"\n"
        )
    };
    let env = Env::new(&config(&prom, 18_391, &bandwidth("\"64KiB/s\"")));
    env.ok(&["validate"], 0);
    let env = Env::new(&config(&prom, 18_391, &bandwidth("\"0KiB/s\"")));
    let (code, _, err) = env.run(&["validate"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("chaos[0].rate") && err.contains("is 0"), "{err}");
    let env = Env::new(&config(&prom, 18_391, &bandwidth("\"64 kbit/s\"")));
    let (code, _, err) = env.run(&["validate"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("rate") && err.contains("\"64 kbit/s\" is not a bandwidth"),
        "{err}"
    );
}

#[test]
fn a_bandwidth_fault_detours_the_canary_through_a_loopback_proxy_like_the_other_network_faults() {
    let prom = crate::util::prometheus(|r| if r.contains("requests") { 1000.0 } else { 0.001 });
    let chaos = "[[strategy.canary.chaos]]\nstage = 1\nkind = \"bandwidth\"\nrate = \"1MiB/s\"\nexpect = \"continue\"\n";
    let config =
        config(&prom, 18_393, chaos).replace("stage_duration = \"300ms\"", "stage_duration = \"2s\"");
    let env = Env::new(&config);
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    let child = env.spawn_deploy("v2", "the fault's injection", |r| r["event"] == "chaos_injected");
    let via = env.lb()["via"]["canary-1"].as_str().map(str::to_owned);
    let out = child.wait_with_output().expect("the deployment ends");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let via = via.expect("canary-1 detoured during its fault");
    assert!(via.starts_with("127.0.0.1:") && via != "127.0.0.1:18394", "{via}");
    assert!(env.lb().get("via").is_none(), "{}", env.lb());
    let journal = env.newest_journal();
    assert!(
        journal.iter().any(|r| r["event"] == "chaos_injected"
            && r["fault"]["kind"] == "bandwidth"
            && r["fault"]["rate"] == "1MiB/s"),
        "{journal:?}"
    );
    assert!(
        journal.iter().any(|r| r["event"] == "chaos_cleared"),
        "{journal:?}"
    );
}
