//! `deploykit drill` and `[[strategy.canary.chaos]]` through the CLI on
//! simulated instances: the verdicts, with their evidence, decide the exit
//! code.

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
fn a_drill_needs_chaos_entries_and_bad_entries_name_the_key() {
    let prom = crate::util::prometheus(|_| 0.001);
    let env = Env::new(&config(&prom, 18_335, ""));
    let (code, _, err) = env.run(&["drill", "v2"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("strategy.canary.chaos") && err.contains("has no entry"),
        "{err}"
    );

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
