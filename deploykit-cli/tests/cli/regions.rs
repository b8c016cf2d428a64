//! Multi-region files on simulated instances: waves in order, a failing
//! region and `on_failure`, `--regions`, `status` per region, and
//! `rollback --region` / `--all`.

use serde_json::Value;

use crate::util::{json_lines, Env};

/// Three regions of two simulated instances each, behind their own
/// simulated load balancers; `bad` regions answer 500 on v2.
fn three_regions(bad: &[&str], rollout: &str) -> String {
    let mut c = String::from(
        "app = \"shop\"\n\n[instance_defaults]\nsimulated = true\n\n\
         [strategy.rolling]\nmax_failures = 0\nhealth_retries = 2\nhealth_interval = \"50ms\"\n\
         stabilisation = \"50ms\"\ndrain_timeout = \"1s\"\n\n[timeouts]\ndrain_poll = \"50ms\"\n\n",
    );
    for (k, r) in ["r-1", "r-2", "r-3"].iter().enumerate() {
        c.push_str(&format!(
            "[[regions]]\nname = \"{r}\"\n[regions.load_balancer]\nkind = \"simulated\"\n"
        ));
        for i in 1..=2 {
            c.push_str(&format!(
                "[[regions.instances]]\nid = \"{r}-web-{i}\"\naddress = \"127.0.0.1:{}\"\n",
                18300 + k * 10 + i
            ));
            if bad.contains(r) {
                c.push_str("simulate_unhealthy = [\"v2\"]\n");
            }
        }
        c.push('\n');
    }
    c.push_str(rollout);
    c
}

const WAVES: &str = "[rollout]\nwaves = [[\"r-1\"], [\"r-2\"], [\"r-3\"]]\n";

impl Env {
    fn region_state(&self, region: &str) -> std::path::PathBuf {
        self.state().join("regions").join(region)
    }

    /// The release a simulated instance of `region` runs, from the
    /// region's own state.
    fn region_release(&self, region: &str, id: &str) -> String {
        let p = self.region_state(region).join("simulated").join("instances.log");
        let log = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let mut found = None;
        for line in log.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            if v["id"] == id {
                found = v["release"].as_str().map(str::to_string);
            }
        }
        found.unwrap_or_else(|| panic!("{} has no release for {id}:\n{log}", p.display()))
    }

    fn region_on(&self, region: &str, release: &str) -> bool {
        (1..=2).all(|i| self.region_release(region, &format!("{region}-web-{i}")) == release)
    }
}

#[test]
fn waves_deploy_in_order_and_status_shows_every_region() {
    let env = Env::new(&three_regions(
        &[],
        "[rollout]\nwaves = [[\"r-1\"], [\"r-*\"]]\nmax_parallel = 2\nsoak = \"200ms\"\nsoak_interval = \"50ms\"\n",
    ));
    env.ok(&["deploy", "v1"], 0);
    let out = env.ok(&["deploy", "v2"], 0);
    let at = |s: &str| out.find(s).unwrap_or_else(|| panic!("no {s:?} in:\n{out}"));
    assert!(at("wave 1: r-1") < at("region r-1: deployed"));
    assert!(at("region r-1: deployed") < at("wave 1: deployed and held"));
    assert!(at("wave 1: deployed and held") < at("wave 2: r-2, r-3"));
    assert!(at("wave 2: soaking for 200ms") < at("wave 2: deployed and held"));
    assert!(out.contains("multi-region deployment of v2: succeeded"), "{out}");
    for r in ["r-1", "r-2", "r-3"] {
        assert!(env.region_on(r, "v2"), "{r}");
    }
    let status = env.ok(&["status"], 0);
    assert!(
        status.contains("last multi-region run: v2: succeeded"),
        "{status}"
    );
    assert!(status.contains("== region r-2 (wave 2) =="), "{status}");
    let s: Value = serde_json::from_str(&env.ok(&["status", "--json"], 0)).unwrap();
    let regions = s["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 3);
    for r in regions {
        assert_eq!(
            r["status"]["deployment"]["history"]["outcome"], "succeeded",
            "{r}"
        );
        assert!(r["status"]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["release"] == "v2"));
    }
    assert_eq!(s["last_rollout"]["regions"]["r-3"], "deployed");
    // One region's history is its own.
    let h = env.ok(&["--region", "r-2", "history"], 0);
    assert!(h.contains("v2"), "{h}");
}

#[test]
fn a_failing_region_rolls_back_the_others_with_rollback_all_and_the_next_is_never_touched() {
    let env = Env::new(&three_regions(
        &["r-2"],
        &format!("{WAVES}on_failure = \"rollback-all\"\n"),
    ));
    env.ok(&["deploy", "v1", "--regions", "r-1,r-2"], 0);
    let (code, out, err) = env.run(&["deploy", "v2"]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("region r-2: failed"), "{out}");
    assert!(out.contains("region r-1: rolled back"), "{out}");
    assert!(env.region_on("r-1", "v1"));
    assert!(env.region_on("r-2", "v1"));
    // r-3 was never part of any run: not even its state directory exists.
    assert!(!env.region_state("r-3").exists());
    let s: Value = serde_json::from_str(&env.ok(&["status", "--json"], 0)).unwrap();
    assert_eq!(s["last_rollout"]["outcome"], "failed");
    assert_eq!(s["last_rollout"]["regions"]["r-3"], "not started");
}

#[test]
fn stop_leaves_the_earlier_region_deployed() {
    let env = Env::new(&three_regions(&["r-2"], WAVES));
    env.ok(&["deploy", "v1"], 0);
    let r3_runs = std::fs::read_dir(env.region_state("r-3").join("journal"))
        .unwrap()
        .count();
    let out = env.ok(&["deploy", "v2", "--json"], 1);
    let lines = json_lines(&out);
    let events: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l.get("wave").is_some())
        .map(|l| (l["event"].as_str().unwrap(), l["region"].as_str().unwrap_or("")))
        .collect();
    assert!(events.contains(&("region_failed", "r-2")), "{events:?}");
    assert!(
        !events.iter().any(|(e, _)| *e == "rollback_started"),
        "{events:?}"
    );
    assert!(!events.iter().any(|(_, r)| *r == "r-3"), "{events:?}");
    // Each region's own step events name their region too.
    let started: Vec<&str> = lines
        .iter()
        .filter(|l| l["event"] == "deployment_started" && l.get("elapsed_ms").is_some())
        .map(|l| l["region"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(started, ["r-1", "r-2"], "{out}");
    let report = &lines.last().unwrap()["regions_report"];
    assert_eq!(report["outcome"], "failed");
    assert_eq!(report["regions"][1]["state"], "failed");
    assert_eq!(report["regions"][2]["state"], "not_started");
    assert!(env.region_on("r-1", "v2"));
    assert!(env.region_on("r-2", "v1"));
    assert!(env.region_on("r-3", "v1"));
    let after = std::fs::read_dir(env.region_state("r-3").join("journal"))
        .unwrap()
        .count();
    assert_eq!(after, r3_runs, "no run of r-3 was journaled");
}

#[test]
fn a_subset_deploys_only_the_regions_named_and_rollback_returns_one_region_or_all() {
    let env = Env::new(&three_regions(&[], WAVES));
    env.ok(&["deploy", "v1", "--regions", "r-3,r-1"], 0);
    assert!(!env.region_state("r-2").exists());
    env.ok(&["deploy", "v1", "--regions", "r-2"], 0);
    env.ok(&["deploy", "v2"], 0);
    assert!(env.region_on("r-2", "v2"));

    // One region back; the others stay.
    env.ok(&["--region", "r-2", "rollback"], 0);
    assert!(env.region_on("r-2", "v1"));
    assert!(env.region_on("r-1", "v2") && env.region_on("r-3", "v2"));

    // Every region back to its release before its last run (r-2's last
    // run is its rollback to v1, so it stays on v1).
    env.ok(&["rollback", "--all"], 0);
    for r in ["r-1", "r-2", "r-3"] {
        assert!(env.region_on(r, "v1"), "{r}");
    }
}

#[test]
fn the_plan_shows_waves_and_every_regions_plan_and_touches_nothing() {
    let env = Env::new(&three_regions(&[], &format!("{WAVES}soak = \"5m\"\n")));
    let out = env.ok(&["plan", "v2"], 0);
    assert!(out.contains("multi-region deployment of v2: 3 wave(s)"), "{out}");
    assert!(out.contains("wave 3: r-3"), "{out}");
    assert!(out.contains("region r-2:"), "{out}");
    assert!(out.contains("r-2-web-1"), "{out}");
    let j: Value = serde_json::from_str(&env.ok(&["plan", "v2", "--json"], 0)).unwrap();
    assert_eq!(j["regions_plan"]["waves"].as_array().unwrap().len(), 3);
    assert!(j["projected_duration_ms"]["min"].as_u64().unwrap() >= 3 * 300_000);
    assert!(!env.state().exists());
}

#[test]
fn bad_region_settings_are_refused_before_anything_is_touched() {
    let cases = [
        (
            three_regions(&[], "[rollout]\nwaves = [[\"r-1\"], [\"ap-*\"]]\n"),
            vec!["deploy", "v2"],
            "rollout.waves[1][0]",
        ),
        (
            three_regions(&[], "[rollout]\nwaves = [[\"r-1\", \"r-2\"]]\n"),
            vec!["validate"],
            "r-3 is in no wave",
        ),
        (
            three_regions(&[], "[rollout]\nmax_parallel = 0\n"),
            vec!["validate"],
            "rollout.max_parallel",
        ),
        (
            three_regions(&[], "[[instances]]\nid = \"x\"\naddress = \"127.0.0.1:1\"\n"),
            vec!["validate"],
            "[[regions.instances]]",
        ),
        (
            three_regions(&[], WAVES).replace("18311", "nonsense"),
            vec!["validate"],
            "regions[1].instances[0].address",
        ),
        (
            three_regions(&[], WAVES),
            vec!["deploy", "v2", "--regions", "nope"],
            "nope is not a configured region",
        ),
        (three_regions(&[], WAVES), vec!["promote"], "--region"),
        (
            three_regions(&[], WAVES),
            vec!["--region", "nope", "status"],
            "no such region",
        ),
        (three_regions(&[], WAVES), vec!["rollback"], "rollback --all"),
        (
            three_regions(&[], WAVES),
            vec!["deploy", "--resume"],
            "--region NAME deploy --resume",
        ),
    ];
    for (config, args, expect) in cases {
        let env = Env::new(&config);
        let (code, out, err) = env.run(&args);
        assert_eq!(code, 2, "{args:?}: stdout:\n{out}\nstderr:\n{err}");
        assert!(err.contains(expect), "{args:?}: expected {expect:?} in:\n{err}");
        assert!(!env.state().exists(), "{args:?} touched the state directory");
    }
}

/// Regions keep their state in local directories of their own: a file
/// that also asks for etcd is refused by `validate` and `deploy` alike,
/// naming both sections and the fix, before anything is touched.
#[test]
fn regions_with_etcd_state_are_refused_naming_both_sections() {
    let config = format!(
        "{}\n[state]\nbackend = \"etcd\"\nendpoints = [\"http://127.0.0.1:1\"]\n",
        three_regions(&[], WAVES)
    );
    for args in [vec!["validate"], vec!["deploy", "v2"], vec!["rollback", "--all"]] {
        let env = Env::new(&config);
        let (code, out, err) = env.run(&args);
        assert_eq!(code, 2, "{args:?}: stdout:\n{out}\nstderr:\n{err}");
        for expect in ["state.backend", "[[regions]]", "backend = \"local\""] {
            assert!(err.contains(expect), "{args:?}: expected {expect:?} in:\n{err}");
        }
        assert!(!env.state().exists(), "{args:?} touched the state directory");
    }
}

/// Three regions, each with its own real nginx and two local instances
/// that answer with their release (region `r-2`'s exit at once on v2):
/// waves in order, the bad region rolled back by `rollback-region`, the
/// next region never touched, and `rollback --region` returning one region.
#[test]
fn three_regions_behind_their_own_real_nginx() {
    use crate::nginx::{free_port, nginx_binary, served_through, Nginx, SERVER_PL};
    let Some(bin) = nginx_binary() else { return };
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut cfg = String::from(
        "app = \"shop\"\nreleases = \"builds\"\n\n[instance_defaults]\nroot = \"instances/{id}\"\n\
         command = [\"perl\", \"server.pl\", \"{port}\"]\nhealth = \"http\"\nstop_grace = \"2s\"\n\n\
         [strategy.rolling]\nmax_failures = 0\nhealth_retries = 10\nhealth_interval = \"100ms\"\n\
         stabilisation = \"50ms\"\ndrain_timeout = \"2s\"\n\n[timeouts]\ndrain_poll = \"50ms\"\n\n",
    );
    let mut servers = Vec::new();
    for (k, r) in ["r-1", "r-2", "r-3"].iter().enumerate() {
        let d = dirs[k].path().display();
        cfg.push_str(&format!(
            "[[regions]]\nname = \"{r}\"\n[regions.load_balancer]\nkind = \"nginx\"\n\
             include_file = \"{d}/upstream.conf\"\nupstream = \"app\"\nnginx_binary = \"{}\"\n\
             nginx_config = \"{d}/nginx.conf\"\nnginx_prefix = \"{d}\"\npid_file = \"{d}/nginx.pid\"\n",
            bin.display()
        ));
        let mut ports = Vec::new();
        for i in 1..=2 {
            let port = 18400 + 10 * k as u16 + i;
            ports.push(port);
            cfg.push_str(&format!(
                "[[regions.instances]]\nid = \"{r}-web-{i}\"\naddress = \"127.0.0.1:{port}\"\n"
            ));
            if *r == "r-2" {
                cfg.push_str("env = { BAD_ON = \"v2\" }\n");
            }
        }
        servers.push(ports);
        cfg.push('\n');
    }
    cfg.push_str("[rollout]\nwaves = [[\"r-1\"], [\"r-2\"], [\"r-3\"]]\non_failure = \"rollback-region\"\n");
    let env = Env::new(&cfg);
    env.releases(&["v1", "v2"]);
    // The server refuses to start on the release its BAD_ON names.
    let server =
        format!("exit 3 if ($ENV{{BAD_ON}} // '') eq (split m{{/}}, Cwd::getcwd())[-1];\n{SERVER_PL}");
    for r in ["v1", "v2"] {
        std::fs::write(env.path().join("builds").join(r).join("server.pl"), &server).unwrap();
    }
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let nginx: Vec<Nginx> = (0..3)
        .map(|k| Nginx::start(&bin, dirs[k].path(), ports[k], &servers[k]))
        .collect();
    let serving = |k: usize| served_through(ports[k], 6);
    let only = |k: usize, release: &str| {
        let seen = serving(k);
        assert_eq!(
            seen.get(release),
            Some(&6),
            "region r-{} through nginx: {seen:?}",
            k + 1
        );
    };

    env.ok(&["-q", "deploy", "v1"], 0);
    (0..3).for_each(|k| only(k, "v1"));
    let r3_upstream = nginx[2].upstream();
    let r3_journals = std::fs::read_dir(env.region_state("r-3").join("journal"))
        .unwrap()
        .count();

    let (code, out, err) = env.run(&["deploy", "v2"]);
    assert_eq!(code, 1, "stdout:\n{out}\nstderr:\n{err}");
    let at = |s: &str| out.find(s).unwrap_or_else(|| panic!("no {s:?} in:\n{out}"));
    assert!(at("region r-1: deployed") < at("wave 2: r-2"));
    assert!(at("wave 2: r-2") < at("region r-2: failed"));
    assert!(
        !out.contains("wave 3: r-3") && out.contains("wave 3 r-3: not started"),
        "{out}"
    );
    only(0, "v2");
    only(1, "v1");
    only(2, "v1");
    assert_eq!(nginx[2].upstream(), r3_upstream, "r-3's nginx was never touched");
    let now = std::fs::read_dir(env.region_state("r-3").join("journal"))
        .unwrap()
        .count();
    assert_eq!(now, r3_journals, "no run of r-3");

    // r-3 alone, then r-1 rolled back alone.
    env.ok(&["-q", "deploy", "v2", "--regions", "r-3"], 0);
    only(2, "v2");
    env.ok(&["-q", "--region", "r-1", "rollback"], 0);
    only(0, "v1");
    only(1, "v1");
    only(2, "v2");
    drop(nginx);
}
