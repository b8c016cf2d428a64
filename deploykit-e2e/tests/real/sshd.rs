//! A lab of real OpenSSH `sshd` "hosts" on loopback for SSH instance tests
//! and benchmarks: distinct 127.0.0.x addresses and ports, a generated host
//! key, a temp `authorized_keys` and a temp known_hosts — all in one temp
//! dir, every daemon killed on drop. Also a TCP proxy that can cut a
//! connection after a number of uploaded bytes.
//!
//! Used by `tests/real/ssh.rs` and by the `ssh` benchmark (included there
//! with `#[path]`).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Where sshd and ssh-keygen are looked for.
pub(crate) fn find(name: &str) -> Option<PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
    ] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    None
}

/// `Some((sshd, ssh-keygen))`; panics when OpenSSH is missing, in CI or
/// not (`scripts/test` installs it).
pub(crate) fn openssh() -> Option<(PathBuf, PathBuf)> {
    match (find("sshd"), find("ssh-keygen")) {
        (Some(d), Some(k)) => Some((d, k)),
        _ => {
            panic!("sshd or ssh-keygen is not installed: real-server tests never skip (scripts/test installs openssh-server)")
        }
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Generates an ed25519 key pair at `path` (+ `.pub`) and returns the public
/// key line.
pub(crate) fn keygen(keygen: &Path, path: &Path) -> String {
    run(Command::new(keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "deploykit-test", "-f"])
        .arg(path));
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

/// One sshd "host".
#[derive(Debug)]
pub(crate) struct SshdHost {
    /// The daemon (`sshd -D -e`).
    child: Child,
    /// Its loopback address.
    pub(crate) ip: String,
    /// Its port.
    pub(crate) port: u16,
    /// Where its stderr goes.
    pub(crate) log: PathBuf,
}

impl Drop for SshdHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Several sshd hosts sharing a host key, a client key and a known_hosts.
#[derive(Debug)]
pub(crate) struct SshLab {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) hosts: Vec<SshdHost>,
    pub(crate) client_key: PathBuf,
    pub(crate) known_hosts: PathBuf,
    pub(crate) host_key_line: String,
    pub(crate) user: String,
    keygen: PathBuf,
}

impl SshLab {
    /// Starts `n` sshd daemons on 127.0.0.(20+i), each on a free port, and
    /// writes their keys into the lab's known_hosts. `None` when OpenSSH is
    /// missing outside CI.
    pub(crate) fn start(n: usize) -> Option<SshLab> {
        Self::start_with(n, false)
    }

    /// [`start`](Self::start), with the login's own `HOME` when
    /// `login_home` (so its shell start-up files run for every command, as
    /// on a host nobody tuned), else an empty one.
    pub(crate) fn start_with(n: usize, login_home: bool) -> Option<SshLab> {
        let (sshd, keygen_bin) = openssh()?;
        let dir = tempfile::Builder::new().prefix("dk-sshd-").tempdir().unwrap();
        let d = dir.path();
        // sshd's privilege separation directory.
        if !Path::new("/run/sshd").exists() {
            std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (sshd needs it)");
        }
        // The login shell (bash) sources ~/.bashrc for every SSH command;
        // an empty HOME keeps the machine's rc files (slow here) out of the
        // measurements. `SetEnv HOME=` below points there.
        std::fs::create_dir_all(d.join("home")).unwrap();
        let host_pub = keygen(&keygen_bin, &d.join("host_key"));
        let client_pub = keygen(&keygen_bin, &d.join("client_key"));
        std::fs::write(d.join("authorized_keys"), &client_pub).unwrap();
        let user = current_user();
        let host_key_line = host_pub.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
        let mut known = String::new();
        let mut hosts = Vec::new();
        for i in 0..n {
            let ip = format!("127.0.0.{}", 20 + i);
            let port = free_port_on(&ip);
            let config = d.join(format!("sshd_config-{i}"));
            std::fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress {ip}\nHostKey {dir}/host_key\nPidFile {dir}/sshd-{i}.pid\n\
                     AuthorizedKeysFile {dir}/authorized_keys\nPermitRootLogin prohibit-password\nStrictModes no\n\
                     UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                     MaxSessions 50\nMaxStartups 100\nLogLevel ERROR\n{home}",
                    dir = d.display(),
                    home = if login_home {
                        String::new()
                    } else {
                        format!("SetEnv HOME={}/home\n", d.display())
                    }
                ),
            )
            .unwrap();
            let log = d.join(format!("sshd-{i}.log"));
            let child = Command::new(&sshd)
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("spawn sshd");
            known.push_str(&format!("[{ip}]:{port} {host_key_line}\n"));
            hosts.push(SshdHost { child, ip, port, log });
        }
        let known_hosts = d.join("known_hosts");
        std::fs::write(&known_hosts, known).unwrap();
        let lab = SshLab {
            client_key: d.join("client_key"),
            known_hosts,
            host_key_line,
            user,
            keygen: keygen_bin,
            hosts,
            dir,
        };
        for h in &lab.hosts {
            lab.wait_listening(h);
        }
        Some(lab)
    }

    fn wait_listening(&self, h: &SshdHost) {
        let addr: SocketAddr = format!("{}:{}", h.ip, h.port).parse().unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if Instant::now() > end {
                panic!(
                    "sshd did not listen on {addr} within 20 s; its log:\n{}",
                    std::fs::read_to_string(&h.log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Generates another key pair (e.g. to fake a changed host key) and
    /// returns its public key line (type and key).
    pub(crate) fn other_key_line(&self, name: &str) -> String {
        let line = keygen(&self.keygen, &self.dir.path().join(name));
        line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    /// The builder of an `SshHost` for host `i` (or `port` instead of its
    /// own, e.g. a proxy's), with the lab's key and known_hosts.
    pub(crate) fn host_builder(&self, i: usize, port: Option<u16>) -> deploykit::instance::SshHostBuilder {
        let h = &self.hosts[i];
        deploykit::instance::SshHost::builder(h.ip.clone())
            .port(port.unwrap_or(h.port))
            .user(self.user.clone())
            .key_file(&self.client_key)
            .known_hosts(&self.known_hosts)
            .timeout(Duration::from_secs(20))
    }
}

fn current_user() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A port free on `ip` a moment ago.
pub(crate) fn free_port_on(ip: &str) -> u16 {
    let l = std::net::TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    l.local_addr().unwrap().port()
}

/// A TCP proxy on `ip` that forwards to `upstream`. It cuts a connection
/// (both directions) once the client has sent more than `cut_after` bytes
/// on it (`u64::MAX` = never; changeable at any time), and
/// [`cut_existing`](Self::cut_existing) cuts every open connection.
#[derive(Debug)]
pub(crate) struct CuttingProxy {
    pub(crate) port: u16,
    pub(crate) cut_after: Arc<AtomicU64>,
    /// Connections cut so far.
    pub(crate) cuts: Arc<AtomicU64>,
    /// Connections accepted so far.
    pub(crate) accepted: Arc<AtomicU64>,
    /// Bytes the clients sent so far, over all connections.
    pub(crate) sent: Arc<AtomicU64>,
    kill: tokio::sync::broadcast::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        let _ = self.kill.send(());
        self.task.abort();
    }
}

impl CuttingProxy {
    pub(crate) async fn start(ip: &str, upstream: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_after = Arc::new(AtomicU64::new(u64::MAX));
        let cuts = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let total = Arc::new(AtomicU64::new(0));
        let (kill, _) = tokio::sync::broadcast::channel::<()>(16);
        let (limit, counter, acc, killer) = (cut_after.clone(), cuts.clone(), accepted.clone(), kill.clone());
        let sent_total = total.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let (limit, counter, sent_total) = (limit.clone(), counter.clone(), sent_total.clone());
                let mut killed = killer.subscribe();
                tokio::spawn(async move {
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let down = tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    });
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = tokio::select! {
                            r = cr.read(&mut buf) => match r {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            },
                            _ = killed.recv() => {
                                counter.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                        };
                        sent += n as u64;
                        sent_total.fetch_add(n as u64, Ordering::SeqCst);
                        if sent > limit.load(Ordering::SeqCst) {
                            counter.fetch_add(1, Ordering::SeqCst);
                            break; // drop both halves: the connection is cut
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    down.abort();
                });
            }
        });
        CuttingProxy {
            port,
            cut_after,
            cuts,
            accepted,
            sent: total,
            kill,
            task,
        }
    }

    /// Cuts every connection open now; later ones pass.
    pub(crate) fn cut_existing(&self) {
        let _ = self.kill.send(());
    }
}
