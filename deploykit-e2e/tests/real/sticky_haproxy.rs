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
    assert!(samples.len() >= 50, "only {} requests", samples.len());
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
    // The users finish in well under a second on a fast machine: the load
    // runs on a moment after the last change, so it is there to see it.
    tokio::time::sleep(Duration::from_secs(1)).await;
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
    // The users finish in well under a second on a fast machine: the load
    // runs on a moment after the last change, so it is there to see it.
    tokio::time::sleep(Duration::from_secs(1)).await;
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

/// One demo app of `track` converting `rate` of its checkouts, run from
/// its release directory.
fn converting_spec(port: u16, track: &str, rate: &str) -> deploykit::instance::ProcessSpec {
    deploykit::instance::ProcessSpec::new([
        "./deploykit-demo-app".to_string(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--version".into(),
        "{release}".into(),
        "--track".into(),
        track.into(),
        "--conversion-rate".into(),
        rate.into(),
    ])
    .unwrap()
    .grace(Duration::from_secs(5))
}

/// An A/B experiment end to end through HAProxy: the control converting
/// 5 % and the treatment 30 % (demo apps run from their releases), a real
/// Prometheus scraping their counters, 30 sticky users checking out on
/// keep-alive connections that never retry. The treatment wins, every user
/// moves to it, stable is replaced, and not one checkout fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_better_converting_treatment_wins_through_real_haproxy_on_real_prometheus_failing_no_checkout() {
    use deploykit::instance::{LocalInstance, ReleaseSource};
    use deploykit::{Canary, EventKind, EventLog, Executor, Experiment, Instance, Metric, ReleaseId};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    let bin = crate::require_binary!("haproxy");
    let prom_bin = crate::require_binary!("prometheus");
    let dir = temp_dir("dk-experiment-haproxy-");
    let builds = dir.path().join("builds");
    for r in ["v1", "v2"] {
        crate::harness::make_release(&builds, r);
    }
    let (mut instances, mut targets) = (Vec::new(), Vec::new());
    for (name, group, rate) in [("stable-1", "stable", "0.05"), ("canary-1", "canary", "0.30")] {
        let port = free_port();
        targets.push(format!("127.0.0.1:{port}"));
        let inst = LocalInstance::builder(name, format!("127.0.0.1:{port}"))
            .group(group)
            .root(dir.path().join(name).to_str().unwrap())
            .source(ReleaseSource::directory(&builds))
            .process(converting_spec(port, group, rate))
            .build()
            .unwrap();
        inst.install(&ReleaseId::new("v1").unwrap()).await.unwrap();
        if group == "stable" {
            inst.start().await.unwrap();
            crate::local::wait_healthy(&inst).await;
        }
        instances.push(Arc::new(inst));
    }
    let _kill = crate::harness::KillOnDrop(
        instances
            .iter()
            .map(|i| std::path::PathBuf::from(i.layout().root()))
            .collect(),
    );
    let maps = dir.path().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    let sticky = Sticky::Cookie {
        name: "dk_variant".into(),
    };
    let lines = crate::routing::frontend_lines(&maps, [], std::slice::from_ref(&sticky));
    let (s, c) = (&targets[0], &targets[1]);
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
    server stable-1 {s} weight 1 check inter 100ms
    server canary-1 {c} weight 1 check inter 100ms
backend app__stable
    server stable-1 {s} track app/stable-1
backend app__canary
    server canary-1 {c} track app/canary-1
"#,
        sock = Haproxy::socket(dir.path()).display(),
    );
    let haproxy = Haproxy::start(&bin, dir.path(), port, &cfg).await;
    let lb = HaproxyLoadBalancer::builder()
        .socket(Haproxy::socket(dir.path()))
        .backend_name("app")
        .backends(instances.iter().map(|i| i.backend().clone()))
        .map_dir(&maps)
        .build()
        .unwrap();
    // What every canary-shaped run leaves: the canary stopped, out of the split.
    lb.switch_to(&Group::new("stable").unwrap())
        .await
        .expect("all traffic to stable");
    let prom = crate::prometheus::PromServer::start(&prom_bin, dir.path(), &targets).await;
    let log = EventLog::new();
    let exec = Executor::builder()
        .instances(instances.iter().map(|i| i.clone() as Arc<dyn Instance>))
        .load_balancer(Arc::new(lb) as Arc<dyn LoadBalancer>)
        .metrics(Arc::new(prom.source()))
        .events(Arc::new(log.clone()))
        .drain_poll(Duration::from_millis(20))
        .build()
        .unwrap();
    let mut base = Canary {
        check_interval: Duration::from_secs(1),
        health: deploykit::HealthCheck {
            retries: 200,
            interval: Duration::from_millis(50),
        },
        drain_timeout: Duration::from_secs(2),
        ..Canary::default()
    };
    base.analysis.window = Duration::from_secs(5);
    // A fresh treatment needs two scrapes before rate() answers.
    base.analysis.inconclusive_limit = 10;
    let experiment = Experiment {
        base,
        treatment_percent: 50,
        sticky,
        duration: Duration::from_secs(25),
        rules: deploykit::experiment::ExperimentRules {
            min_detectable_effect: 0.05,
            min_samples: 200,
            ..Default::default()
        },
        treatments: Vec::new(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let url = haproxy.url("/api/checkout");
    // Keep-alive and never a retry: HAProxy changes maps and weights
    // without a reload, so no connection is closed under a user.
    let http = Http::without_retries(true);
    let t0 = tokio::time::Instant::now();
    let users: Vec<_> = (0..30)
        .map(|n| {
            tokio::spawn(crate::experiment::user(
                http.clone(),
                url.clone(),
                n,
                stop.clone(),
                t0,
            ))
        })
        .collect();
    let source = prom.source();
    let w = experiment.base.analysis.window;
    for metric in [Metric::ErrorRate, Metric::LatencyP99] {
        crate::prometheus::wait_for_value(&source, metric, "stable", w).await;
    }
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while crate::prometheus::wait_for_value(&source, Metric::RequestCount, "stable", w).await <= 0.0 {
        assert!(
            tokio::time::Instant::now() < end,
            "no stable requests counted within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let report = exec
        .deploy(&experiment, &ReleaseId::new("v2").unwrap())
        .await
        .expect("the deployment ran");
    stop.store(true, Ordering::SeqCst);
    let mut failed = Vec::new();
    for u in users {
        failed.extend(u.await.expect("a user"));
    }
    let readings: Vec<_> = log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::ExperimentReading { reading, .. } => Some(reading),
            _ => None,
        })
        .collect();
    assert!(report.is_success(), "{report}\nreadings: {readings:?}");
    let last = readings.last().expect("at least one experiment reading");
    assert_eq!(
        last.verdict,
        deploykit::experiment::Verdict::TreatmentWins,
        "{readings:?}"
    );
    // The tallies are the demo apps' own, split by HAProxy: about 5 % and 30 %.
    assert!(
        last.control.visits >= 200.0 && last.treatment.visits >= 200.0,
        "{last:?}"
    );
    assert!((0.02..0.10).contains(&last.control.rate()), "{last:?}");
    assert!((0.20..0.40).contains(&last.treatment.rate()), "{last:?}");
    assert!(
        failed.is_empty(),
        "{} checkouts failed: {failed:?}\nevents: {}\nHAProxy:\n{}",
        failed.len(),
        crate::prometheus::dump(&log),
        haproxy.stderr()
    );
    // Promoted: every answer through HAProxy now comes from v2.
    let served = versions_of(&Http::new(), &haproxy.url("/"), 10).await;
    assert!(served.iter().all(|v| v == "v2"), "{served:?}");
    eprintln!(
        "decided after {} readings: control {:.0}/{:.0}, treatment {:.0}/{:.0}",
        readings.len(),
        last.control.conversions,
        last.control.visits,
        last.treatment.conversions,
        last.treatment.visits
    );
    for i in &instances {
        let _ = i.stop().await;
    }
}

/// The versions of `n` answers through `url`.
async fn versions_of(http: &Http, url: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let a = http.get(url).await.expect("GET through HAProxy");
        out.push(a.version.unwrap_or_default());
    }
    out
}
