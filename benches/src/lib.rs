//! Benchmarks of deploykit; see `benches/`. What several benchmarks share
//! lives here.

pub mod etcd {
    //! A real etcd cluster for the benchmarks of the etcd state backend.

    use std::process::{Child, Command, Stdio};

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("a port")
            .local_addr()
            .expect("an address")
            .port()
    }

    /// A 3-member etcd cluster on loopback (`/usr/bin/etcd`, data in a temp
    /// dir); killed when dropped.
    #[derive(Debug)]
    pub struct Cluster {
        children: Vec<Child>,
        /// The members' client URLs, `http://127.0.0.1:PORT`.
        pub endpoints: Vec<String>,
        _dir: tempfile::TempDir,
    }

    impl Cluster {
        /// Starts the three members; they elect a leader shortly after.
        ///
        /// # Panics
        /// When `/usr/bin/etcd` cannot be started (`apt-get install
        /// etcd-server`).
        pub fn start() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
            let initial: Vec<String> = ports
                .iter()
                .enumerate()
                .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
                .collect();
            let children = ports
                .iter()
                .enumerate()
                .map(|(i, (c, p))| {
                    Command::new("/usr/bin/etcd")
                        .args(["--name", &format!("m{i}")])
                        .args([
                            "--data-dir",
                            &dir.path().join(format!("m{i}")).display().to_string(),
                        ])
                        .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
                        .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
                        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
                        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{p}")])
                        .args(["--initial-cluster", &initial.join(",")])
                        .args(["--initial-cluster-state", "new"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("etcd in /usr/bin (apt-get install etcd-server)")
                })
                .collect();
            let endpoints = ports
                .iter()
                .map(|(c, _)| format!("http://127.0.0.1:{c}"))
                .collect();
            Self {
                children,
                endpoints,
                _dir: dir,
            }
        }

        /// Waits (at most 30 s) until the cluster answers a read through
        /// the etcd backend, i.e. has a leader.
        ///
        /// # Panics
        /// When it does not within 30 s.
        pub async fn wait_ready(&self) {
            use deploykit::state::{EtcdBackend, EtcdConfig, StateBackend};
            let etcd =
                EtcdBackend::new("ready", EtcdConfig::new(self.endpoints.clone())).expect("etcd backend");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while etcd.holder().await.is_err() {
                assert!(std::time::Instant::now() < deadline, "etcd did not come up");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }

    impl Drop for Cluster {
        fn drop(&mut self) {
            for c in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
