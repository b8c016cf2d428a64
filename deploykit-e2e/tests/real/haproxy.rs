//! The HAProxy driver against a real HAProxy and real demo-app processes.

use std::path::Path;
use std::time::Duration;

use deploykit::lb::haproxy::ServerAdmin;
use deploykit::lb::HaproxyLoadBalancer;
use deploykit::{Backend, Group, GroupWeight, LoadBalancer};

use crate::harness::{
    backend, eventually, free_port, share, temp_dir, DemoApp, DemoOpts, HaServer, Haproxy, Http,
};

/// HAProxy, the driver and demo apps wired together in a temp dir.
pub(crate) struct HaproxySetup {
    pub(crate) apps: Vec<DemoApp>,
    pub(crate) backends: Vec<Backend>,
    pub(crate) lb: HaproxyLoadBalancer,
    pub(crate) haproxy: Haproxy,
    pub(crate) http: Http,
    pub(crate) dir: tempfile::TempDir,
}

/// The driver for HAProxy's socket in `dir`, backend `app`.
pub(crate) fn driver(dir: &Path, backends: &[Backend]) -> HaproxyLoadBalancer {
    HaproxyLoadBalancer::builder()
        .socket(Haproxy::socket(dir))
        .backend_name("app")
        .backends(backends.iter().cloned())
        .build()
        .expect("build the HAProxy driver")
}

impl HaproxySetup {
    /// Starts one demo app per `(version, group, extra flags)`, servers
    /// `i-1…` of backend `app`, then HAProxy in front of them.
    pub(crate) async fn start(binary: &Path, apps: &[(&str, &str, &[&str])]) -> HaproxySetup {
        let mut started = Vec::new();
        let mut backends = Vec::new();
        let mut servers = Vec::new();
        for (i, (version, group, extra)) in apps.iter().enumerate() {
            let app = DemoApp::start(DemoOpts::new(version).track(group).args(extra)).await;
            let id = format!("i-{}", i + 1);
            backends.push(backend(&id, app.addr, group));
            servers.push(HaServer {
                name: id,
                addr: app.addr,
                weight: 1,
            });
            started.push(app);
        }
        let dir = temp_dir("deploykit-haproxy");
        let port = free_port();
        let cfg = Haproxy::config(dir.path(), port, "app", &servers);
        let haproxy = Haproxy::start(binary, dir.path(), port, &cfg).await;
        let lb = driver(dir.path(), &backends);
        lb.check().await.expect("HAProxy knows every server");
        HaproxySetup {
            apps: started,
            backends,
            lb,
            haproxy,
            http: Http::new(),
            dir,
        }
    }

    pub(crate) async fn count(&self, n: usize) -> std::collections::BTreeMap<String, usize> {
        self.http.count_versions(&self.haproxy.url("/"), n).await
    }

    async fn admin_of(&self, id: &str) -> ServerAdmin {
        let servers = self.lb.api().servers_state("app").await.unwrap();
        servers.iter().find(|s| s.name == id).unwrap().admin()
    }
}

#[tokio::test]
async fn drain_moves_traffic_away_and_enable_brings_it_back() {
    let bin = crate::require_binary!("haproxy");
    let s = HaproxySetup::start(&bin, &[("v1", "default", &[]), ("v2", "default", &[])]).await;
    let both = s.count(20).await;
    assert_eq!(
        (both.get("v1"), both.get("v2")),
        (Some(&10), Some(&10)),
        "{both:?}"
    );

    s.lb.drain(&s.backends[1]).await.expect("drain i-2");
    assert_eq!(s.admin_of("i-2").await, ServerAdmin::Drain);
    assert_eq!(s.count(20).await.get("v1"), Some(&20));
    assert_eq!(s.lb.active_connections(&s.backends[1]).await.unwrap(), Some(0));

    s.lb.enable(&s.backends[1]).await.expect("enable i-2");
    assert_eq!(s.admin_of("i-2").await, ServerAdmin::Ready);
    let back = s.count(20).await;
    assert_eq!(
        (back.get("v1"), back.get("v2")),
        (Some(&10), Some(&10)),
        "{back:?}"
    );

    s.lb.disable(&s.backends[0]).await.expect("disable i-1");
    assert_eq!(s.admin_of("i-1").await, ServerAdmin::Maint);
    assert_eq!(s.count(10).await.get("v2"), Some(&10));
    s.lb.enable(&s.backends[0]).await.unwrap();
    s.lb.enable(&s.backends[0]).await.unwrap(); // idempotent
    assert_eq!(s.count(10).await.get("v1"), Some(&5));
}

#[tokio::test]
async fn drain_is_confirmed_only_after_in_flight_requests_finish() {
    let bin = crate::require_binary!("haproxy");
    let slow: &[&str] = &["--latency-ms", "1500"];
    let s = HaproxySetup::start(&bin, &[("v1", "default", slow), ("v2", "default", slow)]).await;
    let url = s.haproxy.url("/");
    let in_flight: Vec<_> = (0..4)
        .map(|_| {
            let http = s.http.clone();
            let url = url.clone();
            tokio::spawn(async move { http.get(&url).await })
        })
        .collect();
    // Wait until both apps are answering two requests each.
    eventually(
        Duration::from_secs(10),
        "2 requests in flight on each app",
        || async {
            let mut n = Vec::new();
            for app in &s.apps {
                n.push(app.in_flight(&s.http).await);
            }
            (n == [2, 2]).then_some(())
        },
    )
    .await;
    s.lb.drain(&s.backends[1]).await.expect("drain i-2");
    let busy = s.lb.active_connections(&s.backends[1]).await.unwrap();
    assert_eq!(busy, Some(2), "two requests still in flight on i-2");
    let mut versions = Vec::new();
    for r in in_flight {
        let a = r.await.unwrap().expect("in-flight request through HAProxy");
        assert_eq!(a.status, 200);
        versions.push(a.version.unwrap());
    }
    versions.sort();
    assert_eq!(versions, ["v1", "v1", "v2", "v2"]);
    eventually(Duration::from_secs(10), "drain of i-2 confirmed", || async {
        s.lb.active_connections(&s.backends[1])
            .await
            .unwrap()
            .filter(|n| *n == 0)
    })
    .await;
}

#[tokio::test]
async fn weights_split_traffic_between_groups() {
    let bin = crate::require_binary!("haproxy");
    let s = HaproxySetup::start(&bin, &[("v1", "stable", &[]), ("v2", "canary", &[])]).await;
    let w = |stable, canary| {
        [
            GroupWeight {
                group: Group::new("stable").unwrap(),
                percent: stable,
            },
            GroupWeight {
                group: Group::new("canary").unwrap(),
                percent: canary,
            },
        ]
    };
    s.lb.set_weights(&w(95, 5)).await.expect("95/5");
    let c = s.count(400).await;
    let canary = share(&c, "v2");
    assert!(
        (canary - 0.05).abs() <= 0.02,
        "canary share {canary} at 5 %: {c:?}"
    );
    assert_eq!(s.lb.live_group().await.unwrap(), None);

    s.lb.set_weights(&w(50, 50)).await.expect("50/50");
    let c = s.count(200).await;
    let canary = share(&c, "v2");
    assert!(
        (canary - 0.5).abs() <= 0.05,
        "canary share {canary} at 50 %: {c:?}"
    );

    s.lb.set_weights(&w(100, 0)).await.expect("100/0");
    let servers = s.lb.api().servers_state("app").await.unwrap();
    assert_eq!(servers.iter().find(|x| x.name == "i-2").unwrap().weight, 0);
    assert_eq!(s.count(20).await.get("v1"), Some(&20));
    assert_eq!(
        s.lb.live_group().await.unwrap(),
        Some(Group::new("stable").unwrap())
    );
}

#[tokio::test]
async fn switch_moves_all_traffic_between_groups() {
    let bin = crate::require_binary!("haproxy");
    let s = HaproxySetup::start(
        &bin,
        &[
            ("v1", "blue", &[]),
            ("v1", "blue", &[]),
            ("v2", "green", &[]),
            ("v2", "green", &[]),
        ],
    )
    .await;
    let blue = Group::new("blue").unwrap();
    let green = Group::new("green").unwrap();
    s.lb.switch_to(&blue).await.unwrap();
    assert_eq!(s.count(20).await.get("v1"), Some(&20));
    assert_eq!(s.lb.live_group().await.unwrap(), Some(blue.clone()));
    s.lb.switch_to(&green).await.unwrap();
    assert_eq!(s.count(20).await.get("v2"), Some(&20));
    assert_eq!(s.lb.live_group().await.unwrap(), Some(green.clone()));
    s.lb.switch_to(&blue).await.unwrap();
    assert_eq!(s.count(20).await.get("v1"), Some(&20));
}

#[tokio::test]
async fn missing_socket_unknown_backend_and_unknown_server_are_named() {
    let bin = crate::require_binary!("haproxy");
    let s = HaproxySetup::start(&bin, &[("v1", "default", &[])]).await;

    let nowhere = s.dir.path().join("no-such.sock");
    let lb = HaproxyLoadBalancer::builder()
        .socket(&nowhere)
        .backends(s.backends.iter().cloned())
        .build()
        .unwrap();
    let err = lb.drain(&s.backends[0]).await.unwrap_err().to_string();
    assert!(
        err.contains(&nowhere.display().to_string()) && err.contains("does not exist"),
        "{err}"
    );

    // A path that is not a socket at all.
    let plain = s.dir.path().join("plain-file");
    std::fs::write(&plain, "").unwrap();
    let lb = HaproxyLoadBalancer::builder()
        .socket(&plain)
        .backends(s.backends.iter().cloned())
        .build()
        .unwrap();
    let err = lb.check().await.unwrap_err().to_string();
    assert!(err.contains(&plain.display().to_string()), "{err}");

    let lb = HaproxyLoadBalancer::builder()
        .socket(Haproxy::socket(s.dir.path()))
        .backend_name("nope")
        .backends(s.backends.iter().cloned())
        .build()
        .unwrap();
    let err = lb.drain(&s.backends[0]).await.unwrap_err().to_string();
    assert!(err.contains("no backend nope"), "{err}");
    let err = lb.check().await.unwrap_err().to_string();
    assert!(err.contains("no backend nope"), "{err}");

    let ghost = backend("i-9", "127.0.0.1:1".parse().unwrap(), "default");
    let lb = driver(s.dir.path(), &[s.backends[0].clone(), ghost.clone()]);
    let err = lb.check().await.unwrap_err().to_string();
    assert!(err.contains("has no server i-9"), "{err}");
    let err = lb.drain(&ghost).await.unwrap_err().to_string();
    assert!(err.contains("i-9"), "{err}");
    // Nothing was changed on the real server.
    assert_eq!(s.admin_of("i-1").await, ServerAdmin::Ready);

    // A server the driver does not manage is refused by name.
    let err = s.lb.enable(&ghost).await.unwrap_err().to_string();
    assert!(err.contains("i-9"), "{err}");

    // Names with spaces or ';' never reach the socket.
    let err =
        s.lb.api()
            .servers_state("app;shutdown")
            .await
            .unwrap_err()
            .to_string();
    assert!(err.contains("cannot be sent"), "{err}");
    // The runtime API still answers with every server: nothing was sent.
    let servers = s.lb.api().servers_state("app").await.unwrap();
    assert_eq!(servers.len(), s.backends.len(), "{servers:?}");
    assert_eq!(s.count(5).await.get("v1"), Some(&5), "HAProxy still serves");
}

#[tokio::test]
async fn a_static_algorithm_refuses_weights_with_a_hint() {
    let bin = crate::require_binary!("haproxy");
    let a = DemoApp::start(DemoOpts::new("v1").track("stable")).await;
    let b = DemoApp::start(DemoOpts::new("v2").track("canary")).await;
    let dir = temp_dir("deploykit-haproxy-static");
    let port = free_port();
    let servers = [
        HaServer {
            name: "i-1".into(),
            addr: a.addr,
            weight: 1,
        },
        HaServer {
            name: "i-2".into(),
            addr: b.addr,
            weight: 1,
        },
    ];
    let cfg =
        Haproxy::config(dir.path(), port, "app", &servers).replace("balance roundrobin", "balance static-rr");
    let _h = Haproxy::start(&bin, dir.path(), port, &cfg).await;
    let backends = [backend("i-1", a.addr, "stable"), backend("i-2", b.addr, "canary")];
    let lb = driver(dir.path(), &backends);
    let err = lb
        .set_weights(&[
            GroupWeight {
                group: Group::new("stable").unwrap(),
                percent: 90,
            },
            GroupWeight {
                group: Group::new("canary").unwrap(),
                percent: 10,
            },
        ])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("roundrobin"), "{err}");
}

#[tokio::test]
async fn a_server_at_another_address_than_its_instance_fails_the_check() {
    let bin = crate::require_binary!("haproxy");
    let s = HaproxySetup::start(&bin, &[("v1", "default", &[])]).await;
    let real = s.backends[0].address.clone();
    // The instance's configured address differs from the server's by its
    // port only: the driver would drain i-1 while traffic goes elsewhere.
    let moved = backend(
        "i-1",
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        "default",
    );
    let lb = driver(s.dir.path(), std::slice::from_ref(&moved));
    let err = lb.preflight().await.unwrap_err().to_string();
    assert!(
        err.contains("i-1") && err.contains(&real.to_string()) && err.contains(&moved.address.to_string()),
        "both addresses are named: {err}"
    );
    // The same instance written as localhost is the same server.
    let mut localhost = s.backends[0].clone();
    localhost.address = deploykit::Address::parse(&format!("localhost:{}", real.port())).unwrap();
    driver(s.dir.path(), &[localhost])
        .preflight()
        .await
        .expect("localhost is 127.0.0.1");
    assert_eq!(s.admin_of("i-1").await, ServerAdmin::Ready, "nothing changed");
}

/// Network chaos through real HAProxy: a fault proxy detours one server
/// while a keep-alive client's connections are pooled by HAProxy, half of
/// the traffic then gets the injected 500 all the same (HAProxy reuses
/// idle connections to a server's old address, so the detour is a server
/// of its own), and clearing the fault sends the server home, which the
/// driver's check confirms.
#[tokio::test]
async fn a_fault_proxy_detours_a_server_for_its_fault_and_clearing_it_sends_the_server_home() {
    use deploykit::chaos::{Fault, FaultInjector, RoutedFaults};
    let bin = crate::require_binary!("haproxy");
    let s = HaproxySetup::start(&bin, &[("v1", "default", &[]), ("v2", "default", &[])]).await;
    // HAProxy now holds idle connections to both servers.
    let warm = s.count(20).await;
    assert_eq!(
        (warm.get("v1"), warm.get("v2")),
        (Some(&10), Some(&10)),
        "{warm:?}"
    );
    let lb: std::sync::Arc<dyn LoadBalancer> = std::sync::Arc::new(s.lb.clone());
    let faults = RoutedFaults::new(lb, "127.0.0.1".parse().unwrap()).unwrap();
    let fault = Fault::HttpError {
        status: 500,
        percent: 100,
    };
    faults.inject(&s.backends[1], &fault).await.expect("inject");
    let servers = s.lb.api().servers_state("app").await.unwrap();
    let i2 = servers.iter().find(|x| x.name == "i-2").unwrap();
    let detour = servers
        .iter()
        .find(|x| x.name == "i-2.dk-detour")
        .expect("a detour server");
    assert_eq!(
        (i2.weight, i2.port, detour.weight),
        (0, Some(s.apps[1].addr.port()), 1),
        "i-2 keeps its address at weight 0, its detour has its weight: {servers:?}"
    );
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..20 {
        let a = s.http.get(&s.haproxy.url("/")).await.expect("an answer");
        let key = format!("{} {}", a.status, a.version.unwrap_or_default());
        *statuses.entry(key).or_insert(0) += 1;
    }
    assert_eq!(
        statuses,
        std::collections::BTreeMap::from([("200 v1".to_owned(), 10), ("500 ".to_owned(), 10)]),
        "round robin over i-1 and i-2's proxy, pooled connections included"
    );
    // Weights set during the detour reach the detour server.
    s.lb.set_weights(&[deploykit::GroupWeight {
        group: deploykit::Group::new("default").unwrap(),
        percent: 100,
    }])
    .await
    .expect("weights during a detour");
    let servers = s.lb.api().servers_state("app").await.unwrap();
    let w = |n: &str| servers.iter().find(|x| x.name == n).map(|x| x.weight);
    assert_eq!(w("i-2"), Some(0), "{servers:?}");
    assert_eq!(
        w("i-2.dk-detour"),
        w("i-1"),
        "the detour carries i-2's new weight: {servers:?}"
    );
    faults.clear(&s.backends[1], &fault).await.expect("clear");
    s.lb.check()
        .await
        .expect("every server at its instance's address again");
    let servers = s.lb.api().servers_state("app").await.unwrap();
    assert!(
        servers
            .iter()
            .all(|x| x.name != "i-2.dk-detour" || x.admin() == ServerAdmin::Maint),
        "the detour left rotation: {servers:?}"
    );
    let back = s.count(20).await;
    assert_eq!(
        (back.get("v1"), back.get("v2")),
        (Some(&10), Some(&10)),
        "{back:?}"
    );
}

/// A run killed during a detour leaves the detour server in rotation; a
/// driver built afterwards (the next deploykit command) gives the
/// instance's own server its traffic back with its first change.
#[tokio::test]
async fn a_driver_built_after_a_crash_mid_detour_ends_the_detour_with_its_first_change() {
    let bin = crate::require_binary!("haproxy");
    let s = HaproxySetup::start(&bin, &[("v1", "default", &[]), ("v2", "default", &[])]).await;
    // The "proxy" is the first app: a detour that is easy to see.
    let via = s.backends[0].address.clone();
    s.lb.reroute(&s.backends[1], Some(&via)).await.expect("detour");
    let during = s.count(20).await;
    assert_eq!(during.get("v1"), Some(&20), "{during:?}");
    let next = driver(s.dir.path(), &s.backends);
    next.enable(&s.backends[1]).await.expect("the first change");
    let servers = next.api().servers_state("app").await.unwrap();
    let detour = servers
        .iter()
        .find(|x| x.name == "i-2.dk-detour")
        .expect("detour server");
    let i2 = servers.iter().find(|x| x.name == "i-2").unwrap();
    assert_eq!(
        (detour.admin(), i2.weight),
        (ServerAdmin::Maint, 1),
        "the detour left rotation, i-2 has its weight back: {servers:?}"
    );
    let back = s.count(20).await;
    assert_eq!(
        (back.get("v1"), back.get("v2")),
        (Some(&10), Some(&10)),
        "{back:?}"
    );
}

/// A bandwidth limit through real HAProxy: the detoured server's 256 KiB
/// downloads come through its fault proxy at 128 KiB/s (about 2 s), whole,
/// while the other server's are untouched; clearing the fault sends the
/// server home.
#[tokio::test]
async fn a_bandwidth_limit_on_a_detoured_server_slows_its_downloads_through_haproxy() {
    use deploykit::chaos::{ByteRate, Fault, FaultInjector, RoutedFaults};
    let bin = crate::require_binary!("haproxy");
    let s = HaproxySetup::start(&bin, &[("v1", "default", &[]), ("v2", "default", &[])]).await;
    let lb: std::sync::Arc<dyn LoadBalancer> = std::sync::Arc::new(s.lb.clone());
    let faults = RoutedFaults::new(lb, "127.0.0.1".parse().unwrap()).unwrap();
    let fault = Fault::Bandwidth {
        rate: ByteRate::new(128 * 1024),
        percent: 100,
    };
    faults.inject(&s.backends[1], &fault).await.expect("inject");
    let url = s.haproxy.url("/api/blob?bytes=262144");
    let mut took = std::collections::BTreeMap::new();
    // Round robin reaches both servers within a few downloads (the detour
    // server joins the rotation where HAProxy's scheduler puts it).
    for _ in 0..6 {
        if took.len() == 2 {
            break;
        }
        let t = std::time::Instant::now();
        let a = s.http.get(&url).await.expect("an answer");
        assert_eq!((a.status, a.body.len()), (200, 262_144), "{:?}", a.version);
        took.insert(a.version.unwrap_or_default(), t.elapsed());
    }
    assert_eq!(took.len(), 2, "one download from each server: {took:?}");
    assert!(took["v2"] >= Duration::from_millis(1_500), "{took:?}");
    faults.clear(&s.backends[1], &fault).await.expect("clear");
    s.lb.check()
        .await
        .expect("every server at its instance's address again");
}
