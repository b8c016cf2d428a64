//! Routing policies (header, cookie and query rules, sticky splits,
//! mirroring) against a real nginx and real demo apps, which say in
//! `x-app-track` which group served each answer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use deploykit::lb::NginxLoadBalancer;
use deploykit::routing::{Match, Mirror, Rule, Split, Sticky, TrafficPolicy, ValueMatch};
use deploykit::{Backend, Group, GroupWeight, LoadBalancer, PreflightFailure};

use crate::harness::{backend, eventually, free_port, temp_dir, DemoApp, DemoOpts, Http, Nginx};

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

fn stable_only() -> Vec<GroupWeight> {
    vec![GroupWeight {
        group: g("stable"),
        percent: 100,
    }]
}

/// `DIR/location.conf`: the location include deploykit owns.
pub(crate) fn location_file(dir: &Path) -> std::path::PathBuf {
    dir.join("location.conf")
}

/// nginx.conf with the location include in place of `proxy_pass`.
pub(crate) fn write_routing_config(dir: &Path, port: u16) {
    let d = dir.display();
    let conf = format!(
        r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body_temp;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    include {d}/upstream.conf;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            include {d}/location.conf;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream off;
        }}
    }}
}}
"#
    );
    std::fs::write(Nginx::conf(dir), conf).expect("write nginx.conf");
}

/// nginx in front of one demo app per group: `stable` (v1), `canary` (v2),
/// `shadow` (v3), with routing on.
pub(crate) struct RoutingSetup {
    apps: Vec<DemoApp>,
    pub(crate) backends: Vec<Backend>,
    pub(crate) lb: NginxLoadBalancer,
    pub(crate) nginx: Nginx,
    http: Http,
    _dir: tempfile::TempDir,
}

impl RoutingSetup {
    pub(crate) async fn start(binary: &Path) -> RoutingSetup {
        let mut apps = Vec::new();
        let mut backends: Vec<Backend> = Vec::new();
        for (i, (version, group)) in [("v1", "stable"), ("v2", "canary"), ("v3", "shadow")]
            .iter()
            .enumerate()
        {
            let app = DemoApp::start(DemoOpts::new(version).track(group)).await;
            backends.push(backend(&format!("i-{}", i + 1), app.addr, group));
            apps.push(app);
        }
        let dir = temp_dir("deploykit-routing");
        let port = free_port();
        write_routing_config(dir.path(), port);
        let lb = crate::nginx::builder(binary, dir.path(), &backends)
            .location_include(location_file(dir.path()))
            .build()
            .expect("build the nginx driver with routing");
        lb.install().await.expect("install both owned files");
        let nginx = Nginx::start(binary, dir.path(), port).await;
        lb.preflight()
            .await
            .expect("preflight with the location include wired");
        // Everything on stable first: the starting point of every test.
        lb.set_weights(&stable_only())
            .await
            .expect("all traffic on stable");
        RoutingSetup {
            apps,
            backends,
            lb,
            nginx,
            http: Http::new(),
            _dir: dir,
        }
    }

    /// Which track answered each of `n` requests to `path` with `headers`.
    async fn tracks(&self, path: &str, headers: &[(&str, &str)], n: usize) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let a = self
                .http
                .send("GET", &self.nginx.url(path), headers)
                .await
                .expect("request through nginx");
            assert_eq!(a.status, 200, "{a:?}\nnginx stderr:\n{}", self.nginx.stderr());
            let track = a.headers.get("x-app-track").cloned().unwrap_or_default();
            *counts.entry(track).or_insert(0) += 1;
        }
        counts
    }
}

fn only(track: &str, n: usize) -> BTreeMap<String, usize> {
    BTreeMap::from([(track.to_string(), n)])
}

#[tokio::test]
async fn header_cookie_and_query_rules_send_matching_requests_to_their_group_and_no_others() {
    let bin = crate::require_binary!("nginx");
    let s = RoutingSetup::start(&bin).await;
    let rule = |matches| Rule {
        matches,
        group: g("canary"),
    };
    let policy = TrafficPolicy {
        rules: vec![
            rule(Match::Header {
                name: "X-Canary".into(),
                value: ValueMatch::Exact("always".into()),
            }),
            rule(Match::Cookie {
                name: "beta".into(),
                value: ValueMatch::Prefix("yes".into()),
            }),
            rule(Match::Query {
                name: "variant".into(),
                value: ValueMatch::Regex("^b[0-9]?$".into()),
            }),
        ],
        split: Split {
            weights: stable_only(),
            sticky: None,
        },
        mirror: None,
    };
    let reloads = s.lb.reloads();
    s.lb.apply_policy(&policy).await.expect("apply the rules");
    assert_eq!(s.lb.reloads(), reloads + 1, "one reload per change");
    // The same policy again is nothing to do.
    s.lb.apply_policy(&policy).await.expect("apply again");
    assert_eq!(s.lb.reloads(), reloads + 1, "an unchanged policy reloads nothing");
    assert_eq!(s.lb.live_group().await.unwrap(), None);

    let n = 50;
    assert_eq!(
        s.tracks("/", &[("x-canary", "always")], n).await,
        only("canary", n)
    );
    assert_eq!(s.tracks("/", &[], n).await, only("stable", n));
    // Values compare exactly and case-sensitively.
    assert_eq!(
        s.tracks("/", &[("x-canary", "Always")], n).await,
        only("stable", n)
    );
    assert_eq!(
        s.tracks("/", &[("x-canary", "always!")], n).await,
        only("stable", n)
    );
    assert_eq!(
        s.tracks("/", &[("cookie", "a=1; beta=yes-please")], n).await,
        only("canary", n)
    );
    assert_eq!(
        s.tracks("/", &[("cookie", "beta=no")], n).await,
        only("stable", n)
    );
    assert_eq!(s.tracks("/?variant=b2", &[], n).await, only("canary", n));
    assert_eq!(s.tracks("/?variant=bb", &[], n).await, only("stable", n));

    // A plain split replaces the policy: the header no longer routes.
    s.lb.set_weights(&stable_only()).await.unwrap();
    assert_eq!(
        s.tracks("/", &[("x-canary", "always")], n).await,
        only("stable", n)
    );
}

#[tokio::test]
async fn a_sticky_cookie_split_keeps_200_users_on_one_group_each_in_proportion() {
    let bin = crate::require_binary!("nginx");
    let s = RoutingSetup::start(&bin).await;
    let policy = TrafficPolicy {
        rules: Vec::new(),
        split: Split {
            weights: vec![
                GroupWeight {
                    group: g("stable"),
                    percent: 70,
                },
                GroupWeight {
                    group: g("canary"),
                    percent: 30,
                },
            ],
            sticky: Some(Sticky::Cookie {
                name: "dk_user".into(),
            }),
        },
        mirror: None,
    };
    s.lb.apply_policy(&policy).await.expect("apply the sticky split");

    let url = s.nginx.url("/");
    let user = |http: Http, url: String| async move {
        let first = http.send("GET", &url, &[]).await.expect("first request");
        let cookie = first
            .headers
            .get("set-cookie")
            .and_then(|c| c.split(';').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no sticky cookie handed out: {first:?}"));
        assert!(cookie.starts_with("dk_user="), "{cookie}");
        let mut tracks = BTreeSet::from([first.headers["x-app-track"].clone()]);
        for _ in 1..50 {
            let a = http
                .send("GET", &url, &[("cookie", &cookie)])
                .await
                .expect("request");
            assert_eq!(a.status, 200);
            assert!(
                !a.headers.contains_key("set-cookie"),
                "a cookie again for a known user: {a:?}"
            );
            tracks.insert(a.headers["x-app-track"].clone());
        }
        tracks
    };
    let mut per_user = Vec::new();
    for batch in 0..10 {
        let tasks: Vec<_> = (0..20)
            .map(|_| tokio::spawn(user(s.http.clone(), url.clone())))
            .collect();
        for t in tasks {
            per_user.push(t.await.unwrap_or_else(|e| panic!("user of batch {batch}: {e}")));
        }
    }
    assert_eq!(per_user.len(), 200);
    let moved: Vec<_> = per_user.iter().filter(|t| t.len() != 1).collect();
    assert!(moved.is_empty(), "users served by two groups: {moved:?}");
    let on_canary = per_user.iter().filter(|t| t.contains("canary")).count();
    // 30 % of 200 = 60 users; 20 is three standard deviations (6.5).
    assert!(
        (40..=80).contains(&on_canary),
        "{on_canary} of 200 users on the 30 % canary"
    );
}

/// Three groups in one sticky split (nginx renders one `split_clients` on
/// deploykit's cookie): 200 users of 50 requests each stay on one group
/// each, in proportion.
#[tokio::test]
async fn a_three_group_sticky_split_keeps_200_users_on_one_group_each_in_proportion() {
    let bin = crate::require_binary!("nginx");
    let s = RoutingSetup::start(&bin).await;
    let split = [("stable", 50u8), ("canary", 30), ("shadow", 20)];
    let policy = TrafficPolicy {
        rules: Vec::new(),
        split: Split {
            weights: split
                .iter()
                .map(|(group, percent)| GroupWeight {
                    group: g(group),
                    percent: *percent,
                })
                .collect(),
            sticky: Some(Sticky::Cookie {
                name: "dk_variant".into(),
            }),
        },
        mirror: None,
    };
    s.lb.apply_policy(&policy)
        .await
        .expect("apply the three-group split");

    let url = s.nginx.url("/");
    let user = |http: Http, url: String| async move {
        let first = http.send("GET", &url, &[]).await.expect("first request");
        assert_eq!(first.status, 200, "{first:?}");
        let cookie = first
            .headers
            .get("set-cookie")
            .and_then(|c| c.split(';').next())
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no sticky cookie handed out: {first:?}"));
        let mut tracks = BTreeSet::from([first.headers["x-app-track"].clone()]);
        for _ in 1..50 {
            let a = http
                .send("GET", &url, &[("cookie", &cookie)])
                .await
                .expect("request");
            assert_eq!(a.status, 200, "{a:?}");
            tracks.insert(a.headers["x-app-track"].clone());
        }
        tracks
    };
    let mut per_user = Vec::new();
    for batch in 0..10 {
        let tasks: Vec<_> = (0..20)
            .map(|_| tokio::spawn(user(s.http.clone(), url.clone())))
            .collect();
        for t in tasks {
            per_user.push(t.await.unwrap_or_else(|e| panic!("user of batch {batch}: {e}")));
        }
    }
    assert_eq!(per_user.len(), 200);
    let moved: Vec<_> = per_user.iter().filter(|t| t.len() != 1).collect();
    assert!(moved.is_empty(), "users served by two groups: {moved:?}");
    for (group, percent) in split {
        let users = per_user.iter().filter(|t| t.contains(group)).count();
        eprintln!("{group}: {users} of 200 users at {percent} %");
        // Each user's cookie is random, so a group's count is binomial over
        // 200 users: four standard deviations (at most 28 users, at 50 %)
        // either way of its share.
        let p = f64::from(percent) / 100.0;
        let expected = 200.0 * p;
        let four_sd = 4.0 * (200.0 * p * (1.0 - p)).sqrt();
        assert!(
            (users as f64 - expected).abs() <= four_sd,
            "{users} of 200 users on {group} ({percent} %, expected {expected} ± {four_sd:.0})"
        );
    }
}

#[tokio::test]
async fn a_split_sticky_by_a_user_header_keeps_each_user_on_one_group() {
    let bin = crate::require_binary!("nginx");
    let s = RoutingSetup::start(&bin).await;
    let policy = TrafficPolicy {
        rules: Vec::new(),
        split: Split {
            weights: vec![
                GroupWeight {
                    group: g("stable"),
                    percent: 50,
                },
                GroupWeight {
                    group: g("canary"),
                    percent: 50,
                },
            ],
            sticky: Some(Sticky::Key(deploykit::routing::RequestKey::Header(
                "x-user-id".into(),
            ))),
        },
        mirror: None,
    };
    s.lb.apply_policy(&policy).await.expect("apply the sticky split");
    let mut on_canary = 0;
    for user in 0..200 {
        let id = format!("user-{user}");
        let seen = s.tracks("/", &[("x-user-id", &id)], 10).await;
        assert_eq!(seen.len(), 1, "{id} was served by {seen:?}");
        on_canary += usize::from(seen.contains_key("canary"));
    }
    // 50 % of 200 = 100 users; 30 is over four standard deviations (7.1).
    assert!(
        (70..=130).contains(&on_canary),
        "{on_canary} of 200 users on the 50 % canary"
    );
}

/// `http_requests_total` of `app` by status code, from its `/metrics`.
async fn requests_by_code(http: &Http, app: &DemoApp) -> BTreeMap<String, u64> {
    let text = http.get(&app.url("/metrics")).await.expect("GET /metrics").body;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("http_requests_total{")) {
        let code = line
            .split("code=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or("");
        let n: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *out.entry(code.to_string()).or_insert(0) += n as u64;
    }
    out
}

#[tokio::test]
async fn mirroring_copies_about_percent_of_gets_to_the_shadow_never_posts_and_clients_see_only_stable() {
    let bin = crate::require_binary!("nginx");
    let s = RoutingSetup::start(&bin).await;
    let policy = TrafficPolicy {
        mirror: Some(Mirror::new(g("shadow"), 50)),
        ..TrafficPolicy::weights(&stable_only())
    };
    s.lb.apply_policy(&policy).await.expect("apply the mirror");
    let shadow = &s.apps[2];
    let before = requests_by_code(&s.http, shadow).await;

    // POSTs first: if one were mirrored it would arrive before the GETs'.
    for _ in 0..60 {
        let a = s.http.send("POST", &s.nginx.url("/"), &[]).await.expect("POST");
        // The demo app answers POST / with 405; what matters is who answered.
        assert_eq!(
            a.headers.get("x-app-track").map(String::as_str),
            Some("stable"),
            "{a:?}"
        );
    }
    let gets = 400;
    assert_eq!(s.tracks("/", &[], gets).await, only("stable", gets));

    // 50 % of 400 = 200 copies; 50 is five standard deviations (10).
    // The baseline scrape itself counts as one 200.
    let copies = eventually(
        Duration::from_secs(10),
        "the mirrored GETs reach the shadow",
        || async {
            let now = requests_by_code(&s.http, shadow).await;
            let delta = now.get("200").copied().unwrap_or(0) - before.get("200").copied().unwrap_or(0) - 1;
            (150..=250).contains(&delta).then_some((delta, now))
        },
    )
    .await;
    let (copied, now) = copies;
    assert_eq!(
        now.get("405").copied().unwrap_or(0),
        before.get("405").copied().unwrap_or(0),
        "POSTs were mirrored ({copied} GET copies)"
    );
}

#[tokio::test]
async fn a_location_include_nginx_does_not_read_fails_the_preflight_as_not_wired() {
    let bin = crate::require_binary!("nginx");
    let app = DemoApp::start(DemoOpts::new("v1")).await;
    let backends = [backend("i-1", app.addr, "stable")];
    let dir = temp_dir("deploykit-routing");
    let port = free_port();
    // The usual config: proxy_pass, no location include.
    Nginx::write_config(dir.path(), port);
    let lb = crate::nginx::builder(&bin, dir.path(), &backends)
        .location_include(location_file(dir.path()))
        .build()
        .unwrap();
    lb.install()
        .await
        .expect("install: nginx -t passes, the file is just unused");
    let _nginx = Nginx::start(&bin, dir.path(), port).await;
    let e = lb.preflight().await.unwrap_err();
    assert_eq!(e.preflight_failure(), Some(PreflightFailure::NotWired), "{e}");
    assert!(
        e.message().contains("location.conf") && e.message().contains("proxy_pass"),
        "{e}"
    );
}

#[tokio::test]
async fn haproxy_applies_split_policies_under_load_without_a_failed_request_and_refuses_mirroring_touching_nothing(
) {
    let bin = crate::require_binary!("haproxy");
    let s = crate::haproxy::HaproxySetup::start(&bin, &[("v1", "stable", &[]), ("v2", "canary", &[])]).await;
    let url = s.haproxy.url("/");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (http, url, stop) = (Http::without_retries(true), url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http.get(&url).await {
                    Ok(a) if a.status == 200 => ok += 1,
                    Ok(a) => failed.push(format!("status {}", a.status)),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    let split = |stable, canary| {
        TrafficPolicy::weights(&[
            GroupWeight {
                group: g("stable"),
                percent: stable,
            },
            GroupWeight {
                group: g("canary"),
                percent: canary,
            },
        ])
    };
    s.lb.apply_policy(&split(50, 50))
        .await
        .expect("50/50 as a policy");
    // HAProxy's own weights say the split is exact. What one client sees
    // beside the load's requests in round robin depends on how the two
    // interleave (it saw 178 of 200 on one side), so it only has to be
    // answered by the two groups and nothing else.
    let weights: Vec<u32> =
        s.lb.api()
            .servers_state("app")
            .await
            .unwrap()
            .iter()
            .map(|x| x.weight)
            .collect();
    assert!(
        weights.len() == 2 && weights[0] == weights[1] && weights[0] > 0,
        "{weights:?}"
    );
    let c = s.count(200).await;
    assert_eq!(
        c.get("v1").unwrap_or(&0) + c.get("v2").unwrap_or(&0),
        200,
        "{c:?}"
    );
    s.lb.apply_policy(&TrafficPolicy::switch(&g("canary")))
        .await
        .expect("switch as a policy");
    assert_eq!(s.count(50).await.get("v2"), Some(&50));
    assert_eq!(s.lb.live_group().await.unwrap(), Some(g("canary")));

    let before = s.lb.api().servers_state("app").await.unwrap();
    let mirror = TrafficPolicy {
        mirror: Some(Mirror::new(g("stable"), 10)),
        ..TrafficPolicy::switch(&g("canary"))
    };
    let e = s.lb.apply_policy(&mirror).await.unwrap_err();
    assert!(
        e.message()
            .contains("the haproxy load balancer cannot mirror requests")
            && e.message().contains("HAProxy 2.6 has no built-in mirroring")
            && e.message().contains("nginx"),
        "{e}"
    );
    assert_eq!(
        s.lb.api().servers_state("app").await.unwrap(),
        before,
        "a refused policy changed HAProxy"
    );
    assert_eq!(s.count(50).await.get("v2"), Some(&50));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0, "the load sent nothing");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
}

#[tokio::test]
async fn haproxy_rules_route_through_runtime_maps_under_load_without_a_failed_request() {
    let bin = crate::require_binary!("haproxy");
    let stable = DemoApp::start(DemoOpts::new("v1").track("stable")).await;
    let canary = DemoApp::start(DemoOpts::new("v2").track("canary")).await;
    let backends = [
        backend("i-1", stable.addr, "stable"),
        backend("i-2", canary.addr, "canary"),
    ];
    let dir = temp_dir("deploykit-haproxy-routing");
    let maps = dir.path().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let rule = |matches| Rule {
        matches,
        group: g("canary"),
    };
    let rules = vec![
        rule(Match::Header {
            name: "x-canary".into(),
            value: ValueMatch::Exact("always".into()),
        }),
        rule(Match::Cookie {
            name: "beta".into(),
            value: ValueMatch::Exact("yes".into()),
        }),
        rule(Match::Query {
            name: "variant".into(),
            value: ValueMatch::Regex(r"^b\d$".into()),
        }),
    ];
    let (haproxy, lb) = haproxy_with_maps(
        &bin,
        dir.path(),
        &maps,
        &backends,
        rules.iter().map(|r| &r.matches),
        &[],
    )
    .await;
    lb.check()
        .await
        .expect("HAProxy knows every server and every group backend");
    lb.set_weights(&stable_only()).await.expect("all on stable");

    let url = haproxy.url("/");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (http, url, stop) = (Http::without_retries(true), url.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http.get(&url).await {
                    Ok(a) if a.status == 200 => ok += 1,
                    Ok(a) => failed.push(format!("status {}", a.status)),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    let http = Http::new();
    let tracks = |path: &'static str, headers: &'static [(&'static str, &'static str)]| {
        let (http, base) = (http.clone(), haproxy.url(""));
        async move {
            let mut counts = BTreeMap::new();
            for _ in 0..40 {
                let a = http
                    .send("GET", &format!("{base}{path}"), headers)
                    .await
                    .expect("request through HAProxy");
                assert_eq!(a.status, 200, "{a:?}");
                *counts.entry(a.headers["x-app-track"].clone()).or_insert(0) += 1;
            }
            counts
        }
    };

    let policy = TrafficPolicy {
        rules: rules.clone(),
        split: Split {
            weights: stable_only(),
            sticky: None,
        },
        mirror: None,
    };
    lb.apply_policy(&policy).await.expect("apply the rules");
    lb.apply_policy(&policy)
        .await
        .expect("apply again: nothing to send");
    assert_eq!(lb.live_group().await.unwrap(), None);
    assert_eq!(tracks("/", &[("x-canary", "always")]).await, only("canary", 40));
    assert_eq!(tracks("/", &[]).await, only("stable", 40));
    assert_eq!(tracks("/", &[("x-canary", "Always")]).await, only("stable", 40));
    assert_eq!(tracks("/", &[("cookie", "beta=yes")]).await, only("canary", 40));
    assert_eq!(tracks("/", &[("cookie", "beta=no")]).await, only("stable", 40));
    assert_eq!(tracks("/?variant=b7", &[]).await, only("canary", 40));
    assert_eq!(tracks("/?variant=bb", &[]).await, only("stable", 40));

    // A rule whose map HAProxy did not load is refused, naming the line to
    // add, and the live rules stay.
    let unloaded = TrafficPolicy {
        rules: vec![rule(Match::Header {
            name: "x-other".into(),
            value: ValueMatch::Prefix("a".into()),
        })],
        ..policy.clone()
    };
    let e = lb.apply_policy(&unloaded).await.unwrap_err();
    assert!(
        e.message().contains("use_backend %[req.fhdr(x-other),map_beg("),
        "{e}"
    );
    assert_eq!(tracks("/", &[("x-canary", "always")]).await, only("canary", 40));

    // A plain split replaces the rules: the maps are emptied.
    lb.set_weights(&stable_only()).await.unwrap();
    assert_eq!(tracks("/", &[("x-canary", "always")]).await, only("stable", 40));
    assert_eq!(lb.live_group().await.unwrap(), Some(g("stable")));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0, "the load sent nothing");
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}\nHAProxy stderr:\n{}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)],
        haproxy.stderr()
    );
}

#[tokio::test]
async fn haproxy_with_routing_rules_on_but_no_group_backends_fails_the_preflight_naming_the_lines() {
    let bin = crate::require_binary!("haproxy");
    let app = DemoApp::start(DemoOpts::new("v1")).await;
    let backends = [backend("i-1", app.addr, "stable")];
    let dir = temp_dir("deploykit-haproxy-routing");
    let _haproxy = crate::harness::Haproxy::start_for(&bin, dir.path(), free_port(), &backends).await;
    let lb = deploykit::lb::HaproxyLoadBalancer::builder()
        .socket(crate::harness::Haproxy::socket(dir.path()))
        .backend_name("app")
        .backends(backends.iter().cloned())
        .map_dir(dir.path().join("maps"))
        .build()
        .unwrap();
    let e = lb.preflight().await.unwrap_err();
    assert_eq!(e.preflight_failure(), Some(PreflightFailure::NotWired), "{e}");
    let want = format!("HAProxy has no backend app__stable: add to haproxy.cfg `backend app__stable` with `server i-1 {} track app/i-1`", app.addr);
    assert!(e.message().starts_with(&want), "{e}");
}

/// HAProxy in front of `backends` (i-1 on stable, i-2 on canary) with a
/// group backend each, one `use_backend` line per match and the lines of
/// each sticky split, every map loaded (empty) at start, as
/// `docs/load-balancers.md` has the user write them; and the driver for it
/// with `map_dir = maps`.
pub(crate) async fn haproxy_with_maps<'a>(
    bin: &Path,
    dir: &Path,
    maps: &Path,
    backends: &[Backend],
    matches: impl IntoIterator<Item = &'a Match>,
    stickies: &[Sticky],
) -> (crate::harness::Haproxy, deploykit::lb::HaproxyLoadBalancer) {
    let lines = frontend_lines(maps, matches, stickies);
    let port = free_port();
    let cfg = format!(
        r#"global
    stats socket {sock} mode 600 level admin
    stats timeout 30s
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout queue 10s
frontend fe
    bind 127.0.0.1:{port}
{lines}    default_backend app
backend app
    balance roundrobin
    retries 0
    server i-1 {s} weight 1 check inter 1s
    server i-2 {c} weight 1 check inter 1s
backend app__stable
    server i-1 {s} track app/i-1
backend app__canary
    server i-2 {c} track app/i-2
"#,
        sock = crate::harness::Haproxy::socket(dir).display(),
        s = backends[0].address,
        c = backends[1].address,
    );
    let haproxy = crate::harness::Haproxy::start(bin, dir, port, &cfg).await;
    let lb = deploykit::lb::HaproxyLoadBalancer::builder()
        .socket(crate::harness::Haproxy::socket(dir))
        .backend_name("app")
        .backends(backends.iter().cloned())
        .map_dir(maps)
        .build()
        .unwrap();
    (haproxy, lb)
}

/// The frontend lines of `matches`' rules and of the `stickies` splits, in
/// the order docs/load-balancers.md gives (the sticky splits' http-request
/// lines, the rules' use_backend lines, the sticky use_backend lines), each
/// indented; creates every map file they read, empty.
pub(crate) fn frontend_lines<'a>(
    maps: &Path,
    matches: impl IntoIterator<Item = &'a Match>,
    stickies: &[Sticky],
) -> String {
    let (mut first, mut rules, mut last) = (String::new(), String::new(), String::new());
    for m in matches {
        let line = deploykit::lb::haproxy::config_line(maps, "app", m);
        let file = line
            .split_once("map_")
            .and_then(|(_, t)| t.split_once('('))
            .and_then(|(_, t)| t.split_once(')'))
            .map(|(f, _)| f.to_owned())
            .expect("a map file in the use_backend line");
        std::fs::write(file, "").unwrap();
        rules.push_str(&format!("    {line}\n"));
    }
    for sticky in stickies {
        std::fs::write(deploykit::lb::haproxy::sticky_map_file(maps, "app", sticky), "").unwrap();
        for line in deploykit::lb::haproxy::sticky_config(maps, "app", sticky) {
            let to = if line.starts_with("use_backend") {
                &mut last
            } else {
                &mut first
            };
            to.push_str(&format!("    {line}\n"));
        }
    }
    format!("{first}{rules}{last}")
}
