//! Sticky splits through a real HAProxy: the runtime map of hash buckets
//! (`deploykit::lb::haproxy::sticky_config`), demo apps that name their
//! group in `x-app-track`, simulated users that keep their cookie or send
//! their id, and keep-alive load that never retries running throughout.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use deploykit::lb::HaproxyLoadBalancer;
use deploykit::routing::{RequestKey, Split, Sticky, TrafficPolicy};
use deploykit::{Group, GroupWeight, LoadBalancer};

use crate::harness::{backend, free_port, temp_dir, DemoApp, DemoOpts, Haproxy, Http};
use crate::load::{Client, LoadGen, Sample};

/// deploykit's sticky cookie in these tests.
const COOKIE: &str = "dk_user";

fn cookie() -> Sticky {
    Sticky::Cookie { name: COOKIE.into() }
}

fn by_user_header() -> Sticky {
    Sticky::Key(RequestKey::Header("x-user-id".into()))
}

fn sticky_split(shares: &[(&str, u8)], sticky: Sticky) -> TrafficPolicy {
    TrafficPolicy {
        rules: Vec::new(),
        split: Split {
            weights: shares
                .iter()
                .map(|(g, p)| GroupWeight {
                    group: Group::new(*g).unwrap(),
                    percent: *p,
                })
                .collect(),
            sticky: Some(sticky),
        },
        mirror: None,
    }
}

/// One demo app per group (`stable`, `canary`, `beta`) behind HAProxy with
/// a group backend each and both sticky maps loaded, as
/// docs/load-balancers.md has the user write them; all traffic on stable.
struct Setup {
    _apps: Vec<DemoApp>,
    backends: Vec<deploykit::Backend>,
    lb: HaproxyLoadBalancer,
    haproxy: Haproxy,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn start(bin: &Path) -> Setup {
        let groups = ["stable", "canary", "beta"];
        let mut apps = Vec::new();
        for g in groups {
            apps.push(DemoApp::start(DemoOpts::new(&format!("v-{g}")).track(g)).await);
        }
        let backends: Vec<_> = groups
            .iter()
            .zip(&apps)
            .map(|(g, a)| backend(&format!("{g}-1"), a.addr, g))
            .collect();
        let dir = temp_dir("dk-sticky-haproxy-");
        let maps = dir.path().join("maps");
        std::fs::create_dir_all(&maps).unwrap();
        let lines = crate::routing::frontend_lines(&maps, [], &[cookie(), by_user_header()]);
        let mut servers = String::new();
        let mut group_backends = String::new();
        for b in &backends {
            servers.push_str(&format!(
                "    server {} {} weight 1 check inter 100ms\n",
                b.id, b.address
            ));
            group_backends.push_str(&format!(
                "backend app__{}\n    server {} {} track app/{}\n",
                b.group, b.id, b.address, b.id
            ));
        }
        let port = free_port();
        // `retries 0` and no redispatch: a request HAProxy sent to a server
        // that could not answer fails, so the load sees it.
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
{servers}{group_backends}"#,
            sock = Haproxy::socket(dir.path()).display(),
        );
        let haproxy = Haproxy::start(bin, dir.path(), port, &cfg).await;
        let lb = HaproxyLoadBalancer::builder()
            .socket(Haproxy::socket(dir.path()))
            .backend_name("app")
            .backends(backends.iter().cloned())
            .map_dir(&maps)
            .build()
            .unwrap();
        lb.check()
            .await
            .expect("HAProxy knows every server and group backend");
        lb.switch_to(&Group::new("stable").unwrap())
            .await
            .expect("all traffic to stable");
        Setup {
            _apps: apps,
            backends,
            lb,
            haproxy,
            dir,
        }
    }

    /// Keep-alive load that never retries, 100 GETs a second, without any
    /// sticky key: each request hashes a fresh id.
    fn load(&self) -> LoadGen {
        LoadGen::open_loop(
            &self.haproxy.url("/"),
            100,
            Duration::from_secs(120),
            true,
            Client::NonRetrying,
        )
    }

    /// `users` simulated users at once, each on its own keep-alive
    /// connection sending `requests` GETs with `headers(user)`: the groups
    /// each user reached, and the cookie HAProxy handed it (if any).
    async fn users(
        &self,
        users: usize,
        requests: usize,
        headers: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Vec<(BTreeSet<String>, Option<String>)> {
        let url = self.haproxy.url("/");
        let mut tasks = Vec::new();
        for u in 0..users {
            let (url, hs) = (url.clone(), headers(u));
            tasks.push(tokio::spawn(async move {
                let http = Http::without_retries(true);
                let mut hs = hs;
                let (mut seen, mut handed) = (BTreeSet::new(), None);
                for _ in 0..requests {
                    let refs: Vec<(&str, &str)> = hs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                    let a = http.send("GET", &url, &refs).await.expect("GET through HAProxy");
                    assert_eq!(a.status, 200, "{a:?}");
                    seen.insert(a.headers["x-app-track"].clone());
                    // A browser sends the cookie back; a second one for a
                    // user who sends it would re-deal that user.
                    if let Some(c) = a.headers.get("set-cookie") {
                        assert!(handed.is_none(), "a second cookie for user {u}: {c}");
                        let pair = c.split(';').next().unwrap_or_default().to_string();
                        hs.push(("cookie".into(), pair.clone()));
                        handed = Some(pair);
                    }
                }
                (seen, handed)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("a simulated user"));
        }
        out
    }
}

/// Asserts that the load ran and not one of its requests failed.
fn assert_no_failed_request(samples: &[Sample], haproxy: &Haproxy) {
    let failed: Vec<_> = samples
        .iter()
        .filter_map(|s| s.outcome.as_ref().err().map(|e| (s.at, e)))
        .collect();
    assert!(samples.len() >= 100, "only {} requests", samples.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}\nHAProxy:\n{}",
        failed.len(),
        samples.len(),
        haproxy.stderr()
    );
}

fn on(per_user: &[(BTreeSet<String>, Option<String>)], group: &str) -> usize {
    per_user.iter().filter(|(s, _)| s.contains(group)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sticky_cookie_split_through_real_haproxy_keeps_users_moves_only_moved_buckets_and_rolls_back_at_once(
) {
    let bin = crate::require_binary!("haproxy");
    let s = Setup::start(&bin).await;
    let load = s.load();

    s.lb.apply_policy(&sticky_split(&[("stable", 70), ("canary", 30)], cookie()))
        .await
        .expect("apply the sticky split");
    assert_eq!(s.lb.live_group().await.unwrap(), None, "two groups are live");
    // 200 users × 50 requests: the first answer hands out the cookie, the
    // user sends it back, and every answer comes from one group.
    let first = s.users(200, 50, |_| Vec::new()).await;
    let split: Vec<_> = first.iter().filter(|(seen, _)| seen.len() != 1).collect();
    assert!(split.is_empty(), "users served by two groups: {split:?}");
    assert!(first.iter().all(|(_, c)| c.is_some()), "a user got no cookie");
    let canary = on(&first, "canary");
    // 30 % of 200 = 60 users; 20 is three standard deviations (6.5).
    assert!(
        (40..=80).contains(&canary),
        "{canary} of 200 users on the 30 % canary"
    );

    // 30 -> 50 %: the canary's buckets 0-29 grow to 0-49, so every canary
    // user stays and only stable users move, about 20 % of all users.
    s.lb.apply_policy(&sticky_split(&[("stable", 50), ("canary", 50)], cookie()))
        .await
        .expect("widen the sticky split");
    let cookies: Vec<String> = first.iter().map(|(_, c)| c.clone().unwrap()).collect();
    let again = s
        .users(200, 10, |u| vec![("cookie".into(), cookies[u].clone())])
        .await;
    let mut moved = 0;
    for (u, ((before, _), (after, handed))) in first.iter().zip(&again).enumerate() {
        assert_eq!(after.len(), 1, "user {u} served by {after:?}");
        assert!(handed.is_none(), "user {u} sent its cookie and got another");
        if before != after {
            assert!(
                before.contains("stable") && after.contains("canary"),
                "user {u} moved from {before:?} to {after:?}: only stable's buckets 30-49 changed hands"
            );
            moved += 1;
        }
    }
    // 20 % of 200 = 40 users; 20 is 3.5 standard deviations (5.7).
    assert!(
        (20..=60).contains(&moved),
        "{moved} of 200 users moved for a 20 % shift"
    );

    // Rollback: a switch to stable empties the map, so every user, with a
    // cookie or without, reaches stable alone, and nobody gets a cookie.
    s.lb.switch_to(&Group::new("stable").unwrap())
        .await
        .expect("roll back");
    assert_eq!(
        s.lb.live_group().await.unwrap(),
        Some(Group::new("stable").unwrap())
    );
    let back = s
        .users(200, 5, |u| {
            if u % 2 == 0 {
                vec![("cookie".into(), cookies[u].clone())]
            } else {
                Vec::new()
            }
        })
        .await;
    for (u, (seen, handed)) in back.iter().enumerate() {
        assert_eq!(
            seen,
            &BTreeSet::from(["stable".to_string()]),
            "user {u} after the rollback"
        );
        assert_eq!(handed, &None, "user {u} got a cookie with no split live");
    }
    let samples = load.stop().await;
    assert_no_failed_request(&samples, &s.haproxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_group_split_sticky_by_a_user_header_through_real_haproxy_keeps_each_user_in_proportion() {
    let bin = crate::require_binary!("haproxy");
    let s = Setup::start(&bin).await;
    let load = s.load();
    s.lb.apply_policy(&sticky_split(
        &[("stable", 50), ("canary", 30), ("beta", 20)],
        by_user_header(),
    ))
    .await
    .expect("apply the three-group split");
    let per_user = s
        .users(200, 50, |u| vec![("x-user-id".into(), format!("user-{u}"))])
        .await;
    for (u, (seen, handed)) in per_user.iter().enumerate() {
        assert_eq!(seen.len(), 1, "user-{u} served by {seen:?}");
        assert_eq!(handed, &None, "a key split hands out no cookie");
    }
    // Three standard deviations of 200 users' binomial counts: 50 % ±21,
    // 30 % ±19, 20 % ±17.
    for (group, want, tol) in [("stable", 100, 21), ("canary", 60, 19), ("beta", 40, 17)] {
        let n = on(&per_user, group);
        assert!(
            n.abs_diff(want) <= tol,
            "{n} of 200 users on {group}, expected {want} ± {tol}"
        );
    }
    // A plain split empties the map: every user follows the weights.
    s.lb.set_weights(&[GroupWeight {
        group: Group::new("beta").unwrap(),
        percent: 100,
    }])
    .await
    .expect("all to beta");
    let after = s
        .users(20, 5, |u| vec![("x-user-id".into(), format!("user-{u}"))])
        .await;
    assert!(
        after
            .iter()
            .all(|(seen, _)| seen == &BTreeSet::from(["beta".to_string()])),
        "a plain split replaces the sticky one: {after:?}"
    );
    let samples = load.stop().await;
    assert_no_failed_request(&samples, &s.haproxy);

    // A process that died between writing the map and the weights left
    // the map filled: the driver of a later process (a resume, a rollback)
    // reads it from HAProxy and sees no single live group.
    let later = || {
        HaproxyLoadBalancer::builder()
            .socket(Haproxy::socket(s.dir.path()))
            .backend_name("app")
            .backends(s.backends.iter().cloned())
            .map_dir(s.dir.path().join("maps"))
            .build()
            .unwrap()
    };
    assert_eq!(
        later().live_group().await.unwrap(),
        Some(Group::new("beta").unwrap())
    );
    let map = deploykit::lb::haproxy::sticky_map_file(&s.dir.path().join("maps"), "app", &by_user_header());
    let api = s.lb.api();
    let version = api
        .command(&format!("prepare map {}", map.display()))
        .await
        .unwrap();
    let version = version.trim().trim_start_matches("New version created:").trim();
    let out = api
        .command(&format!(
            "add map @{version} {m} 0:99 app__stable;commit map @{version} {m}",
            m = map.display()
        ))
        .await
        .unwrap();
    assert_eq!(out.trim(), "", "{out}");
    assert_eq!(later().live_group().await.unwrap(), None);
}
