//! `deploykit validate`: each malformed configuration gets its own precise
//! message (and exit code 2) before anything is touched.

use crate::util::{assert_has, rejects, simulated, Env};

const BASE_INSTANCE: &str =
    "[[instances]]\nid = \"web-1\"\naddress = \"127.0.0.1:18081\"\nsimulated = true\n";

#[test]
fn a_valid_configuration_passes() {
    let env = Env::new(&simulated(3, ""));
    let out = env.ok(&["validate"], 0);
    assert!(
        out.contains("valid (3 instance(s), strategy rolling, load balancer simulated)"),
        "{out}"
    );
    let json = env.ok(&["--json", "validate"], 0);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["instances"], 3);
}

#[test]
fn a_missing_file_is_bad_input() {
    let env = Env::new("");
    let (code, _, err) = env.run(&["--config", "nope.toml", "validate"]);
    assert_eq!(code, 2);
    assert_has(&err, &["nope.toml", "cannot read the configuration", "--config"]);
}

#[test]
fn syntax_errors_give_line_and_column() {
    let err = rejects("app = \"shop\"\n\n[[instances]]\nid = \"web-1\naddress = 1\n");
    assert_has(&err, &["deploykit.toml:4:"]);
}

#[test]
fn a_misspelt_field_suggests_the_right_one() {
    let err = rejects(&simulated(2, "[strategy.rolling]\nbatchsize = 2\n"));
    assert_has(
        &err,
        &["unknown field `batchsize` in [strategy.rolling]; did you mean `batch_size`?"],
    );
    // With a line and column pointing at it.
    let line = simulated(2, "[strategy.rolling]\nbatchsize = 2\n")
        .lines()
        .position(|l| l.starts_with("batchsize"))
        .unwrap()
        + 1;
    assert_has(&err, &[&format!("deploykit.toml:{line}:1:")]);
}

#[test]
fn a_misspelt_top_level_table_is_named() {
    let err = rejects(&format!(
        "app = \"shop\"\n{BASE_INSTANCE}\n[notification]\ntimeout = \"5s\"\n"
    ));
    assert_has(
        &err,
        &["unknown field `notification`", "did you mean `notifications`?"],
    );
}

#[test]
fn an_unknown_strategy_suggests_the_closest() {
    let err = rejects(&simulated(2, "[strategy]\nkind = \"rollin\"\n"));
    assert_has(
        &err,
        &["unknown value `rollin` in [strategy]; did you mean `rolling`?"],
    );
}

#[test]
fn duplicate_instance_ids_are_refused() {
    let err = rejects(&format!(
        "app = \"shop\"\n{BASE_INSTANCE}{}",
        BASE_INSTANCE.replace("18081", "18082")
    ));
    assert_has(
        &err,
        &["invalid instances[1].id: web-1 is used by an earlier instance"],
    );
}

#[test]
fn unsafe_instance_ids_are_refused() {
    let err = rejects(&format!(
        "app = \"shop\"\n{}",
        BASE_INSTANCE.replace("web-1", "web 1; rm -rf /")
    ));
    assert_has(&err, &["invalid instances[0].id", "contains the character ' '"]);
}

#[test]
fn bad_and_duplicate_addresses_are_refused() {
    let err = rejects(&format!(
        "app = \"shop\"\n{}",
        BASE_INSTANCE.replace("127.0.0.1:18081", "nowhere")
    ));
    assert_has(&err, &["invalid instances[0].address"]);
    let err = rejects(&format!(
        "app = \"shop\"\n{BASE_INSTANCE}{}",
        BASE_INSTANCE.replace("web-1", "web-2")
    ));
    assert_has(
        &err,
        &["invalid instances[1].address: 127.0.0.1:18081 is also the address of web-1"],
    );
}

#[test]
fn one_endpoint_written_two_ways_is_a_duplicate_address() {
    for (first, second) in [
        ("[::1]:8080", "[0:0::1]:8080"),
        ("[::1]:8080", "[0000::1]:8080"),
        ("localhost:8080", "127.0.0.1:8080"),
        ("[::1]:8080", "localhost:8080"),
        ("127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"),
        ("web-1.internal:8080", "WEB-1.Internal.:8080"),
    ] {
        let err = rejects(&format!(
            "app = \"shop\"\n{}{}",
            BASE_INSTANCE.replace("127.0.0.1:18081", first),
            BASE_INSTANCE
                .replace("web-1", "web-2")
                .replace("127.0.0.1:18081", second)
        ));
        assert_has(
            &err,
            &[&format!(
                "invalid instances[1].address: {second} is also the address of web-1 (written {first})"
            )],
        );
    }
    // Another port, or another loopback family, is another endpoint.
    let env = Env::new(&format!(
        "app = \"shop\"\n{}{}{}",
        BASE_INSTANCE.replace("127.0.0.1:18081", "[::1]:8080"),
        BASE_INSTANCE
            .replace("web-1", "web-2")
            .replace("127.0.0.1:18081", "127.0.0.1:8080"),
        BASE_INSTANCE
            .replace("web-1", "web-3")
            .replace("127.0.0.1:18081", "[::1]:8081"),
    ));
    env.ok(&["validate"], 0);
}

#[test]
fn canary_stages_must_increase() {
    let err = rejects(&simulated(
        2,
        "[strategy]\nkind = \"canary\"\n[strategy.canary]\nstages = [5, 50, 25]\n",
    ));
    assert_has(
        &err,
        &["invalid strategy.canary.stages[2]: 25 does not increase on the stage before (50)"],
    );
    let err = rejects(&simulated(
        2,
        "[strategy]\nkind = \"canary\"\n[strategy.canary]\nstages = [5, 250]\n",
    ));
    assert_has(&err, &["invalid strategy.canary.stages[1]: 250 is outside 1-100"]);
}

#[test]
fn canary_thresholds_are_checked() {
    let err = rejects(&simulated(
        2,
        "[strategy]\nkind = \"canary\"\n[strategy.canary]\nerror_threshold = 1.5\n",
    ));
    assert_has(
        &err,
        &["invalid strategy.canary.error_threshold: 1.5 is not a fraction from 0 to 1"],
    );
}

#[test]
fn canary_needs_its_groups_and_metrics() {
    let err = rejects(&simulated(2, "[strategy]\nkind = \"canary\"\n"));
    assert_has(&err, &["invalid instances: no instance is in the group stable"]);
}

#[test]
fn meaning_errors_point_at_the_key() {
    let config = simulated(
        2,
        "[strategy]\nkind = \"canary\"\n[strategy.canary]\nstages = [5, 50, 25]\n",
    );
    let (line, col) = config
        .lines()
        .enumerate()
        .find_map(|(n, l)| l.find("25]").map(|c| (n + 1, c + 1)))
        .unwrap();
    let err = rejects(&config);
    assert_has(
        &err,
        &[&format!(
            "deploykit.toml:{line}:{col}: invalid strategy.canary.stages[2]"
        )],
    );
    // A value of the wrong type is named by its key.
    let err = rejects("app = \"shop\"\n[[instances]]\nid = \"web-1\"\naddress = 1\n");
    assert_has(
        &err,
        &["deploykit.toml:4:11: invalid instances[0].address: invalid type: integer `1`"],
    );
}

#[test]
fn every_analysis_setting_is_read() {
    let err = rejects(&simulated(
        2,
        "[strategy]\nkind = \"canary\"\n[strategy.canary]\nratio_significance = -1\n",
    ));
    assert_has(
        &err,
        &["invalid strategy.canary.ratio_significance: -1 must be a number >= 0"],
    );
}

#[test]
fn judge_settings_are_read_and_checked_by_key() {
    let err = rejects(&simulated(
        2,
        "[strategy]\nkind = \"canary\"\n[strategy.canary]\nerror_judge = \"sequential\"\n\
         [strategy.canary.sequential]\nalpha = 0\n",
    ));
    assert_has(
        &err,
        &["invalid strategy.canary.sequential.alpha: 0 must be a probability between 0 and 0.5"],
    );
    let err = rejects(&simulated(
        2,
        "[strategy]\nkind = \"canary\"\n[strategy.canary]\nlatency_judge = \"mann_whitney\"\n\
         [strategy.canary.score]\npass = 70\nmarginal = 80\n",
    ));
    assert_has(
        &err,
        &["invalid strategy.canary.score.marginal: 80 is above pass (70)"],
    );
    let err = rejects(&simulated(
        2,
        "[strategy]\nkind = \"canary\"\n[strategy.canary]\nlatency_judge = \"kayenta\"\n",
    ));
    // Serde names the value and the choices; the location points at the key.
    assert_has(
        &err,
        &["unknown value `kayenta` in [strategy.canary]; expected one of: threshold, mann_whitney"],
    );
}

#[test]
fn retries_are_settable_and_checked() {
    let env = Env::new(&simulated(1, "[retry]\nattempts = 5\nbackoff = \"200ms\"\n"));
    env.ok(&["validate"], 0);
    let config = simulated(1, "[retry]\nattempts = 0\n");
    let line = config.lines().position(|l| l.starts_with("attempts")).unwrap() + 1;
    let err = rejects(&config);
    assert_has(
        &err,
        &[&format!("deploykit.toml:{line}:1: invalid retry.attempts: is 0")],
    );
}

#[test]
fn nested_library_settings_are_named_by_their_keys() {
    for kind in ["rolling", "recreate", "canary"] {
        let err = rejects(&simulated(
            2,
            &format!("[strategy]\nkind = \"{kind}\"\n[strategy.{kind}]\nhealth_retries = 0\n"),
        ));
        assert_has(
            &err,
            &[&format!(
                "invalid strategy.{kind}.health_retries: is 0; at least 1 probe is needed"
            )],
        );
    }
}

#[test]
fn a_zero_batch_is_refused() {
    let err = rejects(&simulated(2, "[strategy.rolling]\nbatch_size = 0\n"));
    assert_has(&err, &["invalid strategy.rolling.batch_size: is 0"]);
}

#[test]
fn bad_durations_point_at_the_value() {
    let err = rejects(&simulated(
        2,
        "[strategy.rolling]\ndrain_timeout = \"5 minutes\"\n",
    ));
    assert_has(&err, &["\"5 minutes\" is not a duration", "deploykit.toml:"]);
}

#[test]
fn routing_keys_belong_to_their_driver() {
    let base = format!("app = \"shop\"\n{BASE_INSTANCE}");
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"haproxy\"\nsocket = \"/run/h.sock\"\nlocation_include = \"/x/l.conf\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.location_include: belongs to kind = \"nginx\", but kind is \"haproxy\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"nginx\"\ninclude_file = \"/x/u.conf\"\nmap_dir = \"/etc/haproxy/dk\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.map_dir: belongs to kind = \"haproxy\", but kind is \"nginx\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"haproxy\"\nsocket = \"/run/h.sock\"\nmirror_timeout = \"200ms\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.mirror_timeout: belongs to kind = \"nginx\", but kind is \"haproxy\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"nginx\"\ninclude_file = \"/x/u.conf\"\nup_timeout = \"10s\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.up_timeout: belongs to kind = \"haproxy\", but kind is \"nginx\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"nginx\"\ninclude_file = \"/x/u.conf\"\nmirror_timeout = \"0s\"\n"
    ));
    assert_has(&err, &["invalid load_balancer.mirror_timeout: is 0"]);
}

#[test]
fn load_balancer_fields_must_fit_the_kind() {
    let base = format!("app = \"shop\"\n{BASE_INSTANCE}");
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"nginx\"\nupstream = \"shop\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.include_file: is required for kind = \"nginx\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"simulated\"\nsocket = \"/run/haproxy.sock\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.socket: belongs to kind = \"haproxy\", but kind is \"simulated\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"simulated\"\ndrain = \"upstream-retry\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.drain: belongs to kind = \"nginx\", but kind is \"simulated\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"nginx\"\ninclude_file = \"/x/u.conf\"\ndrain = \"retry\"\n"
    ));
    assert_has(
        &err,
        &[
            "deploykit.toml:9:9: unknown value `retry` in [load_balancer]",
            "expected one of: reload, upstream-retry",
        ],
    );
}

#[test]
fn exactly_one_service_control() {
    let err = rejects(&format!(
        "app = \"shop\"\nreleases = \"b\"\n{}command = [\"./app\"]\nroot = \"/srv/x\"\n",
        BASE_INSTANCE
    ));
    assert_has(
        &err,
        &["invalid instances[0].command: more than one of command, systemd_unit and simulated"],
    );
    let err = rejects("app = \"shop\"\n[[instances]]\nid = \"web-1\"\naddress = \"127.0.0.1:1\"\n");
    assert_has(
        &err,
        &["invalid instances[0].command: none of command, systemd_unit and simulated"],
    );
}

#[test]
fn instances_are_required() {
    let err = rejects("app = \"shop\"\n");
    assert_has(
        &err,
        &["invalid instances: no instances; add at least one [[instances]] table"],
    );
}

#[test]
fn webhook_urls_are_checked() {
    let err = rejects(&simulated(
        1,
        "[[notifications.webhooks]]\nurl = \"ftp://example.invalid/x\"\n",
    ));
    assert_has(
        &err,
        // The path may be the webhook's token, so the message shows the
        // scheme and host only.
        &["invalid notifications.webhooks[0].url: \"ftp://example.invalid/…\" is not an http(s) URL"],
    );
}

#[test]
fn blue_green_needs_both_environments() {
    let err = rejects(&simulated(2, "[strategy]\nkind = \"blue-green\"\n"));
    assert_has(
        &err,
        &["invalid instances: no instance is in the environment blue"],
    );
}

#[test]
fn ssh_hosts_and_roots_are_checked() {
    let err = rejects("app = \"shop\"\nreleases = \"b\"\n[[instances]]\nid = \"web-1\"\naddress = \"127.0.0.1:1\"\ncommand = [\"./app\"]\nroot = \"/srv/x\"\nhost = \"ssh://deploy@-oProxyCommand=x\"\n");
    assert_has(
        &err,
        &["invalid instances[0].host", "is neither \"local\" nor an SSH URL"],
    );
    let err = rejects("app = \"shop\"\nreleases = \"b\"\n[[instances]]\nid = \"web-1\"\naddress = \"127.0.0.1:1\"\ncommand = [\"./app\"]\nroot = \"/srv/../etc\"\n");
    assert_has(&err, &["invalid instances[0].root", "contains '..'"]);
}

#[test]
fn two_instances_in_one_root_on_one_machine_are_refused() {
    let two = |root1: &str, host1: &str, root2: &str, host2: &str| {
        format!(
            "app = \"shop\"\nreleases = \"b\"\n[instance_defaults]\ncommand = [\"./app\"]\n\
             [[instances]]\nid = \"web-1\"\naddress = \"127.0.0.1:1\"\nroot = \"{root1}\"\nhost = \"{host1}\"\n\
             [[instances]]\nid = \"web-2\"\naddress = \"127.0.0.1:2\"\nroot = \"{root2}\"\nhost = \"{host2}\"\n"
        )
    };
    for (root1, host1, root2, host2, machine) in [
        (
            "instances/shared",
            "local",
            "instances/shared",
            "local",
            "this machine",
        ),
        ("/srv/shop", "local", "/srv//shop/./", "local", "this machine"),
        (
            "/srv/shop",
            "ssh://a@web.internal",
            "/srv/shop",
            "ssh://b@WEB.internal.:22",
            "web.internal:22",
        ),
        (
            "/srv/shop",
            "ssh://a@127.0.0.1:2222",
            "/srv/shop/",
            "ssh://b@127.0.0.1:2222",
            "127.0.0.1:2222",
        ),
    ] {
        let err = rejects(&two(root1, host1, root2, host2));
        assert_has(
            &err,
            &[
                &format!(
                    "invalid instances[1].root: {root2:?} on {machine} is the root of web-1 too ({root1:?})"
                ),
                "give each instance its own root, e.g. root = \"/srv/shop/{id}\"",
            ],
        );
    }
    // Another root, or the same root on another machine, is fine.
    for (root1, host1, root2, host2) in [
        ("/srv/shop/1", "local", "/srv/shop/2", "local"),
        (
            "/srv/shop",
            "ssh://a@web-1.internal",
            "/srv/shop",
            "ssh://a@web-2.internal",
        ),
        (
            "/srv/shop",
            "ssh://a@web.internal:2201",
            "/srv/shop",
            "ssh://a@web.internal:2202",
        ),
        ("/srv/shop", "local", "/srv/shop", "ssh://a@web.internal"),
    ] {
        Env::new(&two(root1, host1, root2, host2)).ok(&["validate"], 0);
    }
}

#[test]
fn the_app_name_is_a_safe_name() {
    let err = rejects(&format!("app = \"../shop\"\n{BASE_INSTANCE}"));
    assert_has(&err, &["invalid app"]);
}

#[test]
fn metrics_queries_must_select_a_group() {
    let err = rejects(&simulated(
        1,
        "[metrics]\nprometheus = \"http://127.0.0.1:9090\"\nerror_rate = \"sum(rate(http_requests_total[5m]))\"\n",
    ));
    assert_has(&err, &["invalid metrics.error_rate"]);
    let err = rejects(&simulated(1, "[metrics]\nprometheus = \"localhost:9090\"\n"));
    assert_has(
        &err,
        &["invalid metrics.prometheus: \"localhost:9090\" is not an http(s) URL"],
    );
}

#[test]
fn driver_settings_are_settable_and_belong_to_their_driver() {
    let local = "app = \"shop\"\nreleases = \"builds\"\n\n[[instances]]\nid = \"web-1\"\n\
                 address = \"127.0.0.1:18081\"\nroot = \"srv/web-1\"\ncommand = [\"./app\"]\n\
                 health_timeout = \"2s\"\nhealth_body_contains = \"ok\"\n";
    let nginx = format!(
        "{local}\n[load_balancer]\nkind = \"nginx\"\ninclude_file = \"up.conf\"\n\
         reload_timeout = \"20s\"\nidle_groups_as_backup = true\n"
    );
    Env::new(&nginx).ok(&["validate"], 0);
    // `backend` defaults to `app`, as the docs say.
    let haproxy =
        format!("{local}\n[load_balancer]\nkind = \"haproxy\"\nsocket = \"admin.sock\"\ntimeout = \"3s\"\n");
    Env::new(&haproxy).ok(&["validate"], 0);

    let err = rejects(&format!(
        "{local}\n[load_balancer]\nkind = \"haproxy\"\nsocket = \"admin.sock\"\nbackend = \"app\"\nreload_timeout = \"20s\"\n"
    ));
    assert_has(&err, &["load_balancer.reload_timeout", "kind = \"nginx\""]);
    let err = rejects(&nginx.replace("reload_timeout = \"20s\"", "reload_timeout = 0"));
    assert_has(&err, &["load_balancer.reload_timeout", "is 0"]);
    let err = rejects(&format!("{local}ssh_gzip = false\n"));
    assert_has(&err, &["instances[0].ssh_gzip", "not on an SSH host"]);
    let err = rejects(&format!("{local}health_timeout = 0\n").replace("health_timeout = \"2s\"\n", ""));
    assert_has(&err, &["instances[0].health_timeout", "is 0"]);
}

#[test]
fn kubernetes_kinds_name_the_missing_or_bad_key() {
    let base = format!("app = \"shop\"\n{BASE_INSTANCE}");
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"istio\"\nresource = \"web\"\nservices.stable = {{ service = \"web\", subset = \"stable\" }}\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.namespace: is required for kind = \"istio\"; e.g. namespace = \"shop\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"gateway-api\"\nnamespace = \"shop\"\nresource = \"web\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.services: is required for kind = \"gateway-api\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"gateway-api\"\nnamespace = \"shop\"\nresource = \"web\"\n\
         services.stable = {{ service = \"web-stable\" }}\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.services.stable.port: is missing; a Gateway API backendRef to a Service needs its port"],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"istio\"\nnamespace = \"Shop\"\nresource = \"web\"\n\
         services.stable = {{ service = \"web\" }}\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.namespace: 'Shop' is not a DNS-1123 label"],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"istio\"\nnamespace = \"shop\"\nresource = \"web\"\nsocket = \"/run/h.sock\"\n\
         services.stable = {{ service = \"web\" }}\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.socket: belongs to kind = \"haproxy\", but kind is \"istio\""],
    );
    let err = rejects(&format!(
        "{base}[load_balancer]\nkind = \"nginx\"\ninclude_file = \"/x/u.conf\"\nnamespace = \"shop\"\n"
    ));
    assert_has(
        &err,
        &["invalid load_balancer.namespace: belongs to kind = \"istio\", but kind is \"nginx\""],
    );
}
