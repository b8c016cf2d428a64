//! `[strategy.canary] flag = …` through the CLI on simulated instances: the
//! flag file's split follows the stages, and a rollback (automatic or
//! `deploykit rollback`) kills the flag, notified; journals and `history` show it.

use deploykit::flags::{Context, FlagSet};
use serde_json::Value;

use crate::util::Env;

const FLAGS: &str = r#"{
  "flags": {
    "new-checkout": {
      "state": "ENABLED",
      "variants": { "on": true, "off": false },
      "defaultVariant": "off"
    }
  }
}
"#;

fn config(prom: &str, port: u16, extra: &str) -> String {
    format!(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
        [[instances]]\nid = \"stable-1\"\naddress = \"127.0.0.1:{port}\"\ngroup = \"stable\"\n\n\
        [[instances]]\nid = \"canary-1\"\naddress = \"127.0.0.1:{}\"\ngroup = \"canary\"\n\n\
        [load_balancer]\nkind = \"simulated\"\n\n\
        [metrics]\nprometheus = \"{prom}\"\nerror_rate = \"errors{{track=\\\"{{group}}\\\"}}\"\n\
        latency_p99 = \"latency{{track=\\\"{{group}}\\\"}}\"\nrequest_count = \"requests{{track=\\\"{{group}}\\\"}}\"\n\n\
        [strategy]\nkind = \"canary\"\n\n\
        [strategy.canary]\nstages = [20, 100]\nstage_duration = \"200ms\"\ncheck_interval = \"100ms\"\n\
        flag = \"new-checkout\"\nhealth_interval = \"20ms\"\ndrain_timeout = \"1s\"\n\n\
        [timeouts]\ndrain_poll = \"20ms\"\n{extra}",
        port + 1
    )
}

fn setup(prom: &str, port: u16, extra: &str) -> Env {
    let env = Env::new(&config(prom, port, extra));
    std::fs::write(env.path().join("flags.json"), FLAGS).unwrap();
    env.ok(&["deploy", "v1", "--strategy", "recreate"], 0);
    env
}

/// The share of 2,000 targeting keys the flag file now serves `on`, percent.
fn on_percent(env: &Env) -> usize {
    let set = FlagSet::parse(&std::fs::read_to_string(env.path().join("flags.json")).unwrap()).unwrap();
    let on = (0..2_000)
        .filter(|k| {
            let mut ctx = Context::new();
            ctx.insert("targetingKey".into(), Value::String(format!("user-{k}")));
            set.evaluate("new-checkout", &ctx).value == Some(Value::Bool(true))
        })
        .count();
    on * 100 / 2_000
}

/// The flag changes journaled, as `split 20` / `kill`, with who made them.
fn changes(env: &Env) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(env.state().join("flags.jsonl")).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|r| {
            let what = match r["action"].as_str().unwrap() {
                "split" => format!("split {}", r["percent"]),
                other => other.to_owned(),
            };
            (what, r["who"].as_str().unwrap().to_owned())
        })
        .collect()
}

fn steps(journal: &[Value], kind: &str) -> usize {
    journal
        .iter()
        .filter(|r| r["event"] == "step_finished" && r["step"] == kind)
        .count()
}

#[test]
fn the_split_follows_the_stages_and_deploykit_rollback_kills_the_flag() {
    let prom = crate::util::prometheus(|r| if r.contains("requests") { 1000.0 } else { 0.001 });
    let env = setup(&prom, 18_311, "");
    let out = env.ok(&["deploy", "v2"], 0);
    let what: Vec<String> = changes(&env).into_iter().map(|c| c.0).collect();
    assert_eq!(what, ["split 20", "split 100"], "{out}");
    assert!(changes(&env).iter().all(|(_, who)| who.starts_with("deploy ")));
    assert_eq!(on_percent(&env), 100);
    assert_eq!(steps(&env.newest_journal(), "flag_share"), 2);

    env.ok(&["rollback"], 0);
    let what: Vec<String> = changes(&env).into_iter().map(|c| c.0).collect();
    assert_eq!(what, ["split 20", "split 100", "kill"]);
    assert_eq!(on_percent(&env), 0, "everyone gets the safe variant");
    assert_eq!(steps(&env.newest_journal(), "flag_kill"), 1);
    let history = env.ok(&["history"], 0);
    assert!(
        history.contains("flag changes:") && history.contains("kill"),
        "{history}"
    );
}

#[test]
fn a_breach_rolls_back_and_kills_the_flag() {
    // The canary errs at 5 % against stable's 0.1 %.
    let prom = crate::util::prometheus(|r| match (r.contains("requests"), r.contains("canary")) {
        (true, _) => 1000.0,
        (false, true) if r.contains("errors") => 0.05,
        _ => 0.001,
    });
    let (hook, bodies) = crate::notify::server(crate::notify::Behaviour::Ok);
    let env = setup(
        &prom,
        18_313,
        &format!("\n[notifications]\n[[notifications.webhooks]]\nurl = \"{hook}\"\non = [\"flag\"]\n"),
    );
    let (code, out, err) = env.run(&["deploy", "v2"]);
    assert_eq!(code, 1, "{out}{err}");
    let what: Vec<String> = changes(&env).into_iter().map(|c| c.0).collect();
    assert_eq!(what, ["split 20", "kill"], "{out}{err}");
    assert_eq!(on_percent(&env), 0);
    assert_eq!(env.sim("stable-1")["release"], "v1");
    // The kill is notified like `deploykit flags kill`.
    let notices: Vec<Value> = bodies
        .lock()
        .unwrap()
        .iter()
        .map(|b| serde_json::from_str(b).unwrap())
        .collect();
    let kills: Vec<&Value> = notices
        .iter()
        .filter(|n| n["event"] == "flag" && n["action"] == "kill")
        .collect();
    assert_eq!(kills.len(), 1, "{notices:?}");
    assert_eq!(kills[0]["flag"], "new-checkout");
    assert_eq!(kills[0]["variant"], "off");
}

#[test]
fn an_unknown_flag_refuses_the_deployment_with_nothing_touched() {
    let prom = crate::util::prometheus(|_| 0.001);
    let env = setup(&prom, 18_315, "");
    std::fs::write(
        env.path().join("flags.json"),
        FLAGS.replace("new-checkout", "other"),
    )
    .unwrap();
    let (code, out, err) = env.run(&["deploy", "v2"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("no flag `new-checkout`"), "{err}");
    assert_eq!(env.sim("canary-1")["release"], "v1");
    assert!(changes(&env).is_empty());
}

#[test]
fn validate_checks_the_canary_flag_against_the_flag_file() {
    let env = Env::new(&config("http://127.0.0.1:9", 18_317, ""));
    // No flag file at all.
    let (code, out, err) = env.run(&["validate"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("strategy.canary.flag") && err.contains("flags.json"),
        "{err}"
    );
    let refused = |flags: &str, why: &str| {
        std::fs::write(env.path().join("flags.json"), flags).unwrap();
        let (code, out, err) = env.run(&["validate"]);
        assert_eq!(code, 2, "{why}: {out}{err}");
        assert!(err.contains("strategy.canary.flag"), "{why}: {err}");
        err
    };
    let err = refused(&FLAGS.replace("new-checkout", "other"), "unknown flag");
    assert!(err.contains("no flag `new-checkout`"), "{err}");
    let err = refused(
        &FLAGS.replace("\"on\": true", "\"beta\": true"),
        "no such variant",
    );
    assert!(
        err.contains("`on` is not one of its variants (beta, off)"),
        "{err}"
    );
    let err = refused(
        &FLAGS.replace("\"defaultVariant\": \"off\"", "\"defaultVariant\": \"on\""),
        "the variant is the safe one",
    );
    assert!(err.contains("`on` is its safe variant"), "{err}");
    // `plan` refuses it the same way, touching nothing.
    let (code, out, err) = env.run(&["plan", "v2"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("`on` is its safe variant"), "{err}");
    assert!(
        !env.state().exists(),
        "refused commands create no state directory"
    );

    std::fs::write(env.path().join("flags.json"), FLAGS).unwrap();
    let out = env.ok(&["validate"], 0);
    assert!(out.contains("valid"), "{out}");
    // A flag the canary does not carry is not looked for.
    std::fs::remove_file(env.path().join("flags.json")).unwrap();
    let plain = config("http://127.0.0.1:9", 18_317, "").replace("flag = \"new-checkout\"\n", "");
    std::fs::write(env.path().join("deploykit.toml"), plain).unwrap();
    env.ok(&["validate"], 0);
}
