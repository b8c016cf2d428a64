//! What is refused before anything is touched: each case exits 2 (bad
//! input) naming what to fix, and the fleet, the state directory and the
//! releases are as they were.

use crate::util::Env;

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
