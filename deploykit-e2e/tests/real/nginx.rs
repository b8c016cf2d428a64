//! The nginx driver against a real nginx and real demo-app processes.

use std::path::Path;
use std::time::Duration;

use deploykit::lb::NginxLoadBalancer;
use deploykit::{Address, Backend, Group, GroupWeight, LoadBalancer};

use crate::harness::{
    backend, children_of, eventually, free_port, share, sigkill, temp_dir, DemoApp, DemoOpts, Http, Nginx,
};

/// nginx, the driver and demo apps wired together in a temp dir.
pub(crate) struct NginxSetup {
    pub(crate) apps: Vec<DemoApp>,
    pub(crate) backends: Vec<Backend>,
    pub(crate) lb: NginxLoadBalancer,
    pub(crate) nginx: Nginx,
    pub(crate) http: Http,
    pub(crate) dir: tempfile::TempDir,
}

/// The driver for an nginx prefix dir laid out by [`Nginx::write_config`].
pub(crate) fn driver(binary: &Path, dir: &Path, backends: &[Backend]) -> NginxLoadBalancer {
    builder(binary, dir, backends)
        .build()
        .expect("build the nginx driver")
}

/// [`driver`]'s builder, for tests that change a setting.
pub(crate) fn builder(binary: &Path, dir: &Path, backends: &[Backend]) -> deploykit::lb::nginx::NginxBuilder {
    NginxLoadBalancer::builder()
        .upstream("app")
        .include_file(Nginx::upstream_file(dir))
        .binary(binary)
        .prefix(format!("{}/", dir.display()))
        .config_file(Nginx::conf(dir))
        .error_log_stderr(true)
        .pid_file(Nginx::pid_file(dir))
        .backends(backends.iter().cloned())
}

impl NginxSetup {
    /// Starts one demo app per `(version, group, extra flags)`, ids `i-1…`,
    /// then nginx in front of them.
    pub(crate) async fn start(binary: &Path, apps: &[(&str, &str, &[&str])]) -> NginxSetup {
        let mut started = Vec::new();
        let mut backends = Vec::new();
        for (i, (version, group, extra)) in apps.iter().enumerate() {
            let app = DemoApp::start(DemoOpts::new(version).track(group).args(extra)).await;
            backends.push(backend(&format!("i-{}", i + 1), app.addr, group));
            started.push(app);
        }
        let dir = temp_dir("deploykit-nginx");
        let port = free_port();
        Nginx::write_config(dir.path(), port);
        let lb = driver(binary, dir.path(), &backends);
        lb.install().await.expect("install the first upstream file");
        let nginx = Nginx::start(binary, dir.path(), port).await;
        NginxSetup {
            apps: started,
            backends,
            lb,
            nginx,
            // A new connection per request: counts show how nginx routes new
            // connections, not which worker an old keep-alive one landed on.
            http: Http::with_keep_alive(false),
            dir,
        }
    }

    pub(crate) async fn count(&self, n: usize) -> std::collections::BTreeMap<String, usize> {
        self.http.count_versions(&self.nginx.url("/"), n).await
    }

    pub(crate) fn upstream_text(&self) -> String {
        std::fs::read_to_string(Nginx::upstream_file(self.dir.path())).unwrap()
    }
}

#[tokio::test]
async fn drain_moves_traffic_away_and_enable_brings_it_back() {
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(&bin, &[("v1", "default", &[]), ("v2", "default", &[])]).await;
    let both = s.count(20).await;
    assert_eq!(
        (both.get("v1"), both.get("v2")),
        (Some(&10), Some(&10)),
        "{both:?}"
    );

    s.lb.drain(&s.backends[1]).await.expect("drain i-2");
    assert!(s
        .upstream_text()
        .contains(&format!("server {} down; # i-2", s.apps[1].addr)));
    let drained = s.count(20).await;
    assert_eq!(drained.get("v1"), Some(&20), "{drained:?}");
    let left = eventually(Duration::from_secs(10), "drain of i-2 confirmed", || async {
        s.lb.active_connections(&s.backends[1])
            .await
            .unwrap()
            .filter(|n| *n == 0)
    })
    .await;
    assert_eq!(left, 0);

    s.lb.enable(&s.backends[1]).await.expect("enable i-2");
    assert_eq!(s.lb.active_connections(&s.backends[1]).await.unwrap(), None);
    let back = s.count(20).await;
    assert_eq!(
        (back.get("v1"), back.get("v2")),
        (Some(&10), Some(&10)),
        "{back:?}"
    );

    // disable is as sharp as drain for nginx; enable again restores.
    s.lb.disable(&s.backends[0]).await.expect("disable i-1");
    assert_eq!(s.count(10).await.get("v2"), Some(&10));
    s.lb.enable(&s.backends[0]).await.unwrap();
    // Idempotent: a second enable changes nothing and succeeds.
    s.lb.enable(&s.backends[0]).await.unwrap();
    assert_eq!(s.count(10).await.get("v1"), Some(&5));
}

#[tokio::test]
async fn drain_is_confirmed_only_after_in_flight_requests_finish() {
    let bin = crate::require_binary!("nginx");
    let slow: &[&str] = &["--latency-ms", "1500"];
    let s = NginxSetup::start(&bin, &[("v1", "default", slow), ("v2", "default", slow)]).await;
    // Four slow requests in flight, two on each backend.
    let url = s.nginx.url("/");
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
    // The old worker is still busy with i-2's requests: not drained yet.
    let busy = s.lb.active_connections(&s.backends[1]).await.unwrap();
    assert!(
        matches!(busy, Some(n) if n > 0),
        "drain reported before requests finished: {busy:?}"
    );
    let mut versions = Vec::new();
    for r in in_flight {
        let a = r.await.unwrap().expect("in-flight request through nginx");
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
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(&bin, &[("v1", "stable", &[]), ("v2", "canary", &[])]).await;
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
    assert!(s.upstream_text().contains("down; # i-2"), "{}", s.upstream_text());
    assert!(!s.upstream_text().contains("weight=0"));
    assert_eq!(s.count(20).await.get("v1"), Some(&20));
    assert_eq!(
        s.lb.live_group().await.unwrap(),
        Some(Group::new("stable").unwrap())
    );

    let err = s.lb.set_weights(&w(60, 30)).await.unwrap_err();
    assert!(err.message().contains("sum to 90"), "{err}");
}

#[tokio::test]
async fn switch_moves_all_traffic_between_groups() {
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(
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

    // A group with no enabled backend cannot go live: the old one stays.
    s.lb.disable(&s.backends[0]).await.unwrap();
    s.lb.disable(&s.backends[1]).await.unwrap();
    let err = s.lb.switch_to(&blue).await.unwrap_err();
    assert!(
        err.message().contains("blue") && err.message().contains("no enabled"),
        "{err}"
    );
    assert_eq!(s.count(10).await.get("v2"), Some(&10));
}

#[tokio::test]
async fn bad_addresses_never_reach_the_file() {
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(&bin, &[("v1", "default", &[])]).await;
    let before = s.upstream_text();
    for bad in [
        "127.0.0.1:80; include /etc/passwd",
        "127.0.0.1 :80",
        "a{b:80",
        "127.0.0.1:80\nserver evil:80",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "127.0.0.1",
    ] {
        let err = Address::parse(bad).unwrap_err().to_string();
        assert!(err.contains("address"), "{bad:?}: {err}");
        // Nor through deserialisation, the other way in.
        let json = serde_json::json!({"id": "i-9", "address": bad, "group": "default"});
        assert!(serde_json::from_value::<Backend>(json).is_err(), "{bad:?}");
    }
    // A backend the driver does not know is refused by name, file untouched.
    let stranger = backend("i-9", "127.0.0.1:1".parse().unwrap(), "default");
    let err = s.lb.drain(&stranger).await.unwrap_err();
    assert!(err.message().contains("i-9"), "{err}");
    assert_eq!(s.upstream_text(), before);
}

#[tokio::test]
async fn a_rejected_config_keeps_the_old_one_live_with_nginx_message() {
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(&bin, &[("v1", "default", &[]), ("v2", "default", &[])]).await;
    let before = s.upstream_text();
    // Someone breaks another part of the config: `nginx -t` of the whole
    // config now fails, so the driver must not reload.
    std::fs::write(s.dir.path().join("conf.d/broken.conf"), "no_such_directive on;\n").unwrap();
    let err = s.lb.drain(&s.backends[1]).await.unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("nginx rejected"), "{msg}");
    assert!(
        msg.contains("unknown directive \"no_such_directive\""),
        "nginx's own message: {msg}"
    );
    assert_eq!(s.upstream_text(), before, "the previous file is back");
    let c = s.count(20).await;
    assert_eq!(
        (c.get("v1"), c.get("v2")),
        (Some(&10), Some(&10)),
        "old config still live: {c:?}"
    );
    // Fixed: the same drain now works.
    std::fs::remove_file(s.dir.path().join("conf.d/broken.conf")).unwrap();
    s.lb.drain(&s.backends[1]).await.unwrap();
    assert_eq!(s.count(10).await.get("v1"), Some(&10));
}

#[tokio::test]
async fn a_reload_without_a_master_is_detected() {
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(&bin, &[("v1", "default", &[]), ("v2", "default", &[])]).await;
    let before = s.upstream_text();
    let master = s.nginx.pid();
    // The port and pid file are there before the master forks its workers.
    let workers = eventually(Duration::from_secs(10), "nginx has workers", || async {
        let w = children_of(master);
        (!w.is_empty()).then_some(w)
    })
    .await;
    sigkill(master);
    eventually(Duration::from_secs(5), "nginx master gone", || async {
        let st = std::fs::read_to_string(format!("/proc/{master}/stat")).unwrap_or_default();
        (st.is_empty() || st.contains(") Z ")).then_some(())
    })
    .await;
    let err = s.lb.drain(&s.backends[1]).await.unwrap_err();
    // The orphaned workers would keep serving the old config.
    for w in workers {
        sigkill(w);
    }
    let msg = err.to_string();
    assert!(
        msg.contains("not running") && msg.contains(&master.to_string()),
        "{msg}"
    );
    assert_eq!(s.upstream_text(), before, "nothing changed");
}

/// A reload can only be confirmed by a new generation of worker processes.
/// An nginx without them (`master_process off`) — like a master still
/// forking its first workers — gives nothing to confirm by: the driver
/// refuses before it touches the file, instead of calling the change done
/// while the old config still routes.
#[tokio::test]
async fn an_nginx_without_worker_processes_is_refused_before_any_change() {
    let bin = crate::require_binary!("nginx");
    let a = DemoApp::start(DemoOpts::new("v1")).await;
    let b = DemoApp::start(DemoOpts::new("v2")).await;
    let backends = [
        backend("i-1", a.addr, "default"),
        backend("i-2", b.addr, "default"),
    ];
    let dir = temp_dir("deploykit-nginx");
    let port = free_port();
    Nginx::write_config(dir.path(), port);
    let lb = builder(&bin, dir.path(), &backends)
        .reload_timeout(Duration::from_secs(1))
        .build()
        .unwrap();
    lb.install().await.unwrap();
    let nginx = Nginx::start_with(&bin, dir.path(), port, "daemon off; master_process off;").await;
    let before = std::fs::read_to_string(Nginx::upstream_file(dir.path())).unwrap();

    // The preflight check every deployment makes finds it first.
    let err = lb.preflight().await.unwrap_err();
    assert!(err.message().contains("master_process on"), "{err}");
    let err = lb.drain(&backends[1]).await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("master_process on") && msg.contains("nothing was changed"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read_to_string(Nginx::upstream_file(dir.path())).unwrap(),
        before,
        "the file was not touched"
    );
    // Both backends still serve: nginx was never reloaded.
    let c = Http::with_keep_alive(false)
        .count_versions(&nginx.url("/"), 20)
        .await;
    assert_eq!((c.get("v1"), c.get("v2")), (Some(&10), Some(&10)), "{c:?}");
}

/// The preflight check the executor runs before a deployment: nginx runs,
/// accepts its config, and reads deploykit's include file.
#[tokio::test]
async fn preflight_checks_nginx_runs_and_reads_the_include_file() {
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(&bin, &[("v1", "default", &[])]).await;
    s.lb.preflight()
        .await
        .expect("a running nginx that includes the file");

    let conf = Nginx::conf(s.dir.path());
    let good = std::fs::read_to_string(&conf).unwrap();
    let include_line = format!("include {}/upstream.conf;", s.dir.path().display());
    assert!(good.contains(&include_line));
    // The upstream defined inline instead: deploykit's file is never read.
    let inline = format!("upstream app {{ server {}; }}", s.apps[0].addr);
    std::fs::write(&conf, good.replace(&include_line, &inline)).unwrap();
    let err = s.lb.preflight().await.unwrap_err();
    assert!(
        err.message().contains("does not include the upstream file"),
        "{err}"
    );

    std::fs::write(&conf, &good).unwrap();
    let include = Nginx::upstream_file(s.dir.path());
    let text = std::fs::read_to_string(&include).unwrap();
    std::fs::remove_file(&include).unwrap();
    let err = s.lb.preflight().await.unwrap_err();
    assert!(
        err.message().contains("does not exist") && err.message().contains("deploykit setup"),
        "{err}"
    );
    std::fs::write(&include, text).unwrap();
    s.lb.preflight().await.expect("fixed");
}

/// `drain = "upstream-retry"` relies on nginx retrying a refused connect on
/// the next server: the preflight refuses a config that turns that off,
/// naming the file and line, and accepts nginx's default retry.
#[tokio::test]
async fn upstream_retry_preflight_refuses_a_config_without_connect_retries() {
    let bin = crate::require_binary!("nginx");
    let app = DemoApp::start(DemoOpts::new("v1")).await;
    let backends = [backend("i-1", app.addr, "default")];
    let dir = temp_dir("deploykit-nginx-retry");
    let port = free_port();
    // `proxy_next_upstream off;`, as the reload-drain tests use.
    Nginx::write_config(dir.path(), port);
    let lb = builder(&bin, dir.path(), &backends)
        .drain_mode(deploykit::lb::nginx::DrainMode::UpstreamRetry)
        .build()
        .unwrap();
    lb.install().await.expect("install");
    let nginx = Nginx::start(&bin, dir.path(), port).await;
    let err = lb.preflight().await.unwrap_err().to_string();
    let conf = Nginx::conf(dir.path());
    assert!(
        err.contains("drain = \"upstream-retry\"")
            && err.contains(&format!("{}:", conf.display()))
            && err.contains("`proxy_next_upstream off;`"),
        "{err}"
    );
    Nginx::write_config_retrying(dir.path(), port);
    lb.preflight().await.unwrap_or_else(|e| {
        panic!(
            "the retrying config is accepted: {e}\nnginx stderr:\n{}",
            nginx.stderr()
        )
    });
    // The rendered upstream never marks a server failed and keeps
    // connections to the servers alive.
    let text = std::fs::read_to_string(Nginx::upstream_file(dir.path())).unwrap();
    assert!(
        text.contains(&format!("server {} max_fails=0; # i-1", app.addr)) && text.contains("keepalive"),
        "{text}"
    );
}

/// A setup switched from `drain = "reload"` to `"upstream-retry"` reloads
/// once, at its first change, to render `max_fails=0` in; after that
/// drains and enables reload nothing, and traffic keeps flowing.
#[tokio::test]
async fn switching_to_upstream_retry_reloads_once_then_never() {
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(&bin, &[("v1", "default", &[]), ("v1", "default", &[])]).await;
    Nginx::write_config_retrying(s.dir.path(), s.nginx.port);
    let lb = builder(&bin, s.dir.path(), &s.backends)
        .drain_mode(deploykit::lb::nginx::DrainMode::UpstreamRetry)
        .build()
        .unwrap();
    lb.preflight().await.expect("the retrying config passes");
    assert!(!s.upstream_text().contains("max_fails"));
    lb.drain(&s.backends[1]).await.expect("drain i-2");
    assert_eq!(lb.reloads(), 1, "the first change renders the mode in");
    let text = s.upstream_text();
    assert!(
        text.contains(&format!("server {} max_fails=0; # i-2", s.apps[1].addr)),
        "{text}"
    );
    // The drain is confirmed once the workers of the generation before
    // that one reload have exited, which takes a moment on a busy machine.
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = lb.active_connections(&s.backends[1]).await.unwrap();
        if n == Some(0) {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "the drain of i-2 is not confirmed: {n:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    lb.enable(&s.backends[1]).await.expect("enable i-2");
    lb.drain(&s.backends[0]).await.expect("drain i-1");
    lb.enable(&s.backends[0]).await.expect("enable i-1");
    assert_eq!(lb.reloads(), 1, "drains and enables reload nothing");
    assert_eq!(s.upstream_text(), text);
    assert_eq!(s.count(20).await.get("v1"), Some(&20));
}

/// A chaos detour (`reroute`) sends a backend's traffic elsewhere (here a
/// third app standing in for a fault proxy) and back; a driver built after
/// a crash during the detour does not adopt it: its first change renders
/// the backend at its own address again.
#[tokio::test]
async fn a_detour_moves_a_backends_traffic_and_a_later_driver_sends_it_home() {
    let bin = crate::require_binary!("nginx");
    let s = NginxSetup::start(&bin, &[("v1", "default", &[]), ("v2", "default", &[])]).await;
    let stand_in = DemoApp::start(DemoOpts::new("proxy")).await;
    let via = Address::parse(&stand_in.addr.to_string()).unwrap();
    s.lb.reroute(&s.backends[1], Some(&via))
        .await
        .expect("detour i-2");
    let detoured = s.count(20).await;
    assert_eq!(
        (detoured.get("v1"), detoured.get("proxy")),
        (Some(&10), Some(&10)),
        "{detoured:?}"
    );
    s.lb.reroute(&s.backends[1], None).await.expect("send i-2 home");
    let home = s.count(20).await;
    assert_eq!(
        (home.get("v1"), home.get("v2")),
        (Some(&10), Some(&10)),
        "{home:?}"
    );

    // Detoured again, then the process "dies": a new driver over the same
    // file sends i-2's traffic home with its first change.
    s.lb.reroute(&s.backends[1], Some(&via))
        .await
        .expect("detour i-2");
    let later = driver(&bin, s.dir.path(), &s.backends);
    later
        .set_weights(&[GroupWeight {
            group: Group::new("default").unwrap(),
            percent: 100,
        }])
        .await
        .expect("the later driver's first change");
    assert!(
        s.upstream_text()
            .contains(&format!("server {} weight=", s.apps[1].addr)),
        "{}",
        s.upstream_text()
    );
    let after = s.count(20).await;
    assert_eq!(
        (after.get("v1"), after.get("v2")),
        (Some(&10), Some(&10)),
        "{after:?}"
    );
}
