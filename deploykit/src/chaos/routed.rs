//! Fault proxies placed for the time of a fault: [`RoutedFaults`] starts
//! a [`FaultProxy`] on loopback in front of an instance, points the load
//! balancer at it ([`LoadBalancer::reroute`]) before the fault starts, and
//! points it back at the instance once the instance's last fault ends.
//!
//! Why only for the fault, not a proxy in front of every instance from the
//! start: the proxies live in the deploying process. A balancer that sent
//! every request through them would lose the whole fleet when that process
//! dies; one that detours only the faulted instances, only during a fault,
//! loses at most those — and the detour is never recorded, so the next
//! driver (a resume, a rollback) sends their traffic home with its first
//! change.
//!
//! Order matters both ways: on the way in, the proxy forwards cleanly
//! until the balancer confirmed the detour, and only then is the fault
//! switched on; on the way out, the fault is switched off first, so the
//! requests still in flight through the proxy while the balancer turns
//! back are forwarded unharmed. A proxy is kept (forwarding, no fault)
//! until the `RoutedFaults` is dropped, so connections the balancer's old
//! workers still hold finish, and its counters stay readable.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use super::proxy::{FaultId, FaultProxy, Origin};
use super::{ChaosError, Fault, FaultInjector};
use crate::error::DriverError;
use crate::names::{Address, InstanceId};
use crate::traits::{Backend, LoadBalancer};

#[derive(Debug)]
struct Detour {
    backend: Backend,
    proxy: Arc<FaultProxy>,
    active: HashMap<Fault, FaultId>,
    /// Whether the balancer sends the instance's traffic to the proxy now.
    rerouted: bool,
    /// Every status an HTTP-error fault of this proxy answered with, so the
    /// exposition shows a series from 0 before the first injected answer.
    statuses: BTreeSet<u16>,
}

/// A [`FaultInjector`] that puts a [`FaultProxy`] between the load balancer
/// and an instance for the time of its faults. Cheap to clone.
///
/// ```no_run
/// # async fn f(lb: std::sync::Arc<dyn deploykit::LoadBalancer>) -> deploykit::Result<()> {
/// use std::sync::Arc;
/// use deploykit::chaos::RoutedFaults;
///
/// let faults = RoutedFaults::new(lb.clone(), "127.0.0.1".parse().unwrap())?;
/// let executor = deploykit::Executor::builder()
///     .load_balancer(lb)
///     .fault_injector(Arc::new(faults.clone()))
///     // instances, metrics, …
///     .build()?;
/// // After the run, whatever happened: every instance's traffic goes home.
/// faults.restore().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RoutedFaults {
    lb: Arc<dyn LoadBalancer>,
    listen: IpAddr,
    detours: Arc<tokio::sync::Mutex<BTreeMap<InstanceId, Detour>>>,
    record: Option<PathBuf>,
}

impl RoutedFaults {
    /// Proxies listen on `listen` (a loopback address, where the balancer
    /// must be able to reach them: it runs on this machine), and `lb` is
    /// told where each faulted instance's traffic goes.
    ///
    /// # Errors
    /// [`ChaosError::NotLoopback`] when `listen` is not a loopback address.
    pub fn new(lb: Arc<dyn LoadBalancer>, listen: IpAddr) -> Result<Self, ChaosError> {
        if !listen.is_loopback() {
            return Err(ChaosError::NotLoopback(SocketAddr::new(listen, 0)));
        }
        Ok(Self {
            lb,
            listen,
            detours: Arc::default(),
            record: None,
        })
    }

    /// Keeps `path` (JSON: instance id → proxy address) listing every
    /// detour that may be live — written before the balancer is pointed at
    /// a proxy, rewritten once it is pointed back — so that a later process
    /// can undo the detours of one that died during a fault
    /// ([`undo_recorded`]). Without it nothing is written.
    pub fn record_to(mut self, path: impl Into<PathBuf>) -> Self {
        self.record = Some(path.into());
        self
    }

    /// Writes the record of `detours` plus `also` (a detour about to be
    /// made); removes it when there is none.
    fn write_record(
        &self,
        detours: &BTreeMap<InstanceId, Detour>,
        also: Option<&InstanceId>,
    ) -> Result<(), DriverError> {
        let Some(path) = &self.record else {
            return Ok(());
        };
        let live: BTreeMap<String, String> = detours
            .iter()
            .filter(|(id, d)| d.rerouted || Some(*id) == also)
            .map(|(id, d)| (id.to_string(), d.proxy.addr().to_string()))
            .collect();
        let result = if live.is_empty() {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            let json = serde_json::to_vec(&live).expect("a map of strings serializes");
            crate::state::atomic::write_atomic(path, &json)
        };
        result.map_err(|e| {
            DriverError::new(format!(
                "recording the fault proxies' detours in {}: {e}",
                path.display()
            ))
        })
    }

    /// Ends every fault and points the balancer back at every instance it
    /// still sends through a proxy: the last word of a run, whatever its
    /// outcome. Each failure is returned, naming the instance (a detour that
    /// could not be undone keeps going through a clean proxy while this
    /// process lives).
    ///
    /// * Idempotent: yes. Cancel-safe: yes (a detour left is undone by the
    ///   next call).
    pub async fn restore(&self) -> Vec<(InstanceId, DriverError)> {
        let mut detours = self.detours.lock().await;
        let mut failed = Vec::new();
        for (id, d) in detours.iter_mut() {
            d.proxy.clear();
            d.active.clear();
            if d.rerouted {
                match self.lb.reroute(&d.backend, None).await {
                    Ok(()) => d.rerouted = false,
                    Err(e) => failed.push((id.clone(), e)),
                }
            }
        }
        if let Err(e) = self.write_record(&detours, None) {
            tracing::warn!(error = %e, "could not update the record of detours");
        }
        failed
    }

    /// The instances whose traffic goes through a proxy now.
    pub async fn rerouted(&self) -> Vec<InstanceId> {
        let detours = self.detours.lock().await;
        detours
            .iter()
            .filter(|(_, d)| d.rerouted)
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The proxies' counters as OpenMetrics text families (without the
    /// closing `# EOF`, so they can join another exposition), labelled with the
    /// instance (`instance_id`) and its `group`:
    /// `deploykit_fault_proxy_requests_total`,
    /// `deploykit_fault_proxy_responses_total` by `code` and `origin`
    /// (`upstream`: the instance's own answer; `injected`: a fault's;
    /// `proxy`: a `502` for an instance that could not be reached),
    /// `deploykit_fault_proxy_throttled_total` (requests a bandwidth fault
    /// slowed), and `deploykit_fault_proxy_rerouted` (1 while the balancer sends the
    /// instance's traffic through its proxy). Empty before the first fault.
    pub async fn exposition(&self) -> String {
        let detours = self.detours.lock().await;
        if detours.is_empty() {
            return String::new();
        }
        let labels = |d: &Detour| format!("instance_id=\"{}\",group=\"{}\"", d.backend.id, d.backend.group);
        let mut out = String::new();
        out.push_str(
            "# HELP deploykit_fault_proxy_requests Requests a deploykit fault proxy received.\n\
             # TYPE deploykit_fault_proxy_requests counter\n",
        );
        for d in detours.values() {
            let _ = writeln!(
                out,
                "deploykit_fault_proxy_requests_total{{{}}} {}",
                labels(d),
                d.proxy.stats().requests
            );
        }
        out.push_str(
            "# HELP deploykit_fault_proxy_responses Answers of a deploykit fault proxy by status code and origin (upstream, injected, proxy).\n\
             # TYPE deploykit_fault_proxy_responses counter\n",
        );
        for d in detours.values() {
            let mut answers = d.proxy.answers();
            for s in &d.statuses {
                answers.entry((Origin::Injected, *s)).or_insert(0);
            }
            for ((origin, code), n) in answers {
                let _ = writeln!(
                    out,
                    "deploykit_fault_proxy_responses_total{{{},code=\"{code}\",origin=\"{}\"}} {n}",
                    labels(d),
                    origin.as_str()
                );
            }
        }
        out.push_str(
            "# HELP deploykit_fault_proxy_throttled Requests whose bodies a deploykit fault proxy's bandwidth limit slowed.\n\
             # TYPE deploykit_fault_proxy_throttled counter\n",
        );
        for d in detours.values() {
            let _ = writeln!(
                out,
                "deploykit_fault_proxy_throttled_total{{{}}} {}",
                labels(d),
                d.proxy.stats().throttled
            );
        }
        out.push_str(
            "# HELP deploykit_fault_proxy_rerouted 1 while the load balancer sends the instance's traffic through its fault proxy.\n\
             # TYPE deploykit_fault_proxy_rerouted gauge\n",
        );
        for d in detours.values() {
            let _ = writeln!(
                out,
                "deploykit_fault_proxy_rerouted{{{}}} {}",
                labels(d),
                u8::from(d.rerouted)
            );
        }
        out
    }
}

/// The first socket address `address` resolves to.
async fn resolve(address: &Address) -> Result<SocketAddr, DriverError> {
    let host = address
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let found = tokio::net::lookup_host((host.as_str(), address.port()))
        .await
        .map_err(|e| DriverError::new(format!("{address} does not resolve: {e}")))?
        .next();
    found.ok_or_else(|| DriverError::new(format!("{address} resolves to no address")))
}

#[async_trait]
impl FaultInjector for RoutedFaults {
    /// Starts the instance's proxy (once), detours the balancer to it
    /// (once), then switches the fault on.
    async fn inject(&self, instance: &Backend, fault: &Fault) -> Result<(), DriverError> {
        let mut detours = self.detours.lock().await;
        if !detours.contains_key(&instance.id) {
            let upstream = resolve(&instance.address).await?;
            let proxy = FaultProxy::start(SocketAddr::new(self.listen, 0), upstream)
                .await
                .map_err(|e| DriverError::new(format!("fault proxy of {}", instance.id)).with_source(e))?;
            detours.insert(
                instance.id.clone(),
                Detour {
                    backend: instance.clone(),
                    proxy: Arc::new(proxy),
                    active: HashMap::new(),
                    rerouted: false,
                    statuses: BTreeSet::new(),
                },
            );
        }
        let d = detours.get_mut(&instance.id).expect("inserted above");
        if d.active.contains_key(fault) {
            return Ok(());
        }
        if !d.rerouted {
            let via = Address::parse(&d.proxy.addr().to_string())
                .map_err(|e| DriverError::new(format!("the fault proxy's address: {e}")))?;
            // Recorded before it is made: a crash in between leaves a record
            // whose undoing is harmless, never a detour nobody knows of.
            self.write_record(&detours, Some(&instance.id))?;
            let d = detours.get_mut(&instance.id).expect("inserted above");
            self.lb.reroute(instance, Some(&via)).await?;
            d.rerouted = true;
        }
        let d = detours.get_mut(&instance.id).expect("inserted above");
        let id = d
            .proxy
            .add(*fault)
            .map_err(|e| DriverError::new(format!("fault proxy of {}", instance.id)).with_source(e))?;
        if let Fault::HttpError { status, .. } = fault {
            d.statuses.insert(*status);
        }
        d.active.insert(*fault, id);
        Ok(())
    }

    /// Switches the fault off, and once the instance has none left, points
    /// the balancer back at the instance.
    async fn clear(&self, instance: &Backend, fault: &Fault) -> Result<(), DriverError> {
        let mut detours = self.detours.lock().await;
        let Some(d) = detours.get_mut(&instance.id) else {
            return Ok(());
        };
        if let Some(id) = d.active.remove(fault) {
            d.proxy.remove(id);
        }
        if d.active.is_empty() && d.rerouted {
            self.lb.reroute(instance, None).await?;
            d.rerouted = false;
            self.write_record(&detours, None)?;
        }
        Ok(())
    }
}

/// Points the balancer back at every instance that `path` (written by
/// [`RoutedFaults::record_to`]) lists as detoured — the leftovers of a
/// process that died during a network fault, whose proxies died with it —
/// then removes the record. Ids not among `backends` are skipped. Returns
/// the instances pointed back.
///
/// * Idempotent: yes. Cancel-safe: yes (the record stays until every
///   instance is back).
///
/// # Errors
/// The record cannot be read or parsed, or a balancer call fails (the
/// record is kept, so the next call tries again).
pub async fn undo_recorded(
    lb: &dyn LoadBalancer,
    path: &Path,
    backends: &[Backend],
) -> Result<Vec<InstanceId>, DriverError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DriverError::new(format!("reading {}: {e}", path.display()))),
    };
    let live: BTreeMap<String, String> = serde_json::from_slice(&bytes)
        .map_err(|e| DriverError::new(format!("{} is not a record of detours: {e}", path.display())))?;
    let mut undone = Vec::new();
    for id in live.keys() {
        if let Some(b) = backends.iter().find(|b| b.id.as_str() == id) {
            lb.reroute(b, None).await?;
            undone.push(b.id.clone());
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DriverError::new(format!("removing {}: {e}", path.display())))
        }
        _ => Ok(undone),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::names::Group;
    use crate::traits::GroupWeight;

    /// A balancer that records where each backend's traffic is sent, and
    /// can be told to refuse.
    #[derive(Debug, Default)]
    struct Recording {
        calls: Mutex<Vec<(String, Option<String>)>>,
        refuse: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl LoadBalancer for Recording {
        fn name(&self) -> &str {
            "recording"
        }
        async fn drain(&self, _: &Backend) -> Result<(), DriverError> {
            Ok(())
        }
        async fn active_connections(&self, _: &Backend) -> Result<Option<u64>, DriverError> {
            Ok(None)
        }
        async fn enable(&self, _: &Backend) -> Result<(), DriverError> {
            Ok(())
        }
        async fn disable(&self, _: &Backend) -> Result<(), DriverError> {
            Ok(())
        }
        async fn set_weights(&self, _: &[GroupWeight]) -> Result<(), DriverError> {
            Ok(())
        }
        async fn switch_to(&self, _: &Group) -> Result<(), DriverError> {
            Ok(())
        }
        async fn reroute(&self, b: &Backend, via: Option<&Address>) -> Result<(), DriverError> {
            if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(DriverError::new("refused"));
            }
            let mut calls = self.calls.lock().unwrap();
            calls.push((b.id.to_string(), via.map(ToString::to_string)));
            Ok(())
        }
    }

    fn backend(id: &str) -> Backend {
        Backend {
            id: InstanceId::new(id).unwrap(),
            // Nothing listens there: only injected answers are asked for.
            address: Address::parse("127.0.0.1:9").unwrap(),
            group: Group::new("canary").unwrap(),
        }
    }

    /// One `GET /` on a fresh connection; the status code.
    async fn status(addr: &str) -> u16 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: app\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).await.unwrap();
        text.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    const ERRORS: Fault = Fault::HttpError {
        status: 500,
        percent: 100,
    };
    const SLOW: Fault = Fault::Latency {
        delay: std::time::Duration::from_millis(1),
        jitter: std::time::Duration::ZERO,
        percent: 100,
    };

    #[tokio::test]
    async fn the_exposition_counts_the_requests_a_bandwidth_limit_slowed() {
        let lb = Arc::new(Recording::default());
        let faults = RoutedFaults::new(lb.clone(), "127.0.0.1".parse().unwrap()).unwrap();
        let limit = Fault::Bandwidth {
            rate: crate::chaos::ByteRate::new(1 << 20),
            percent: 50,
        };
        faults.inject(&backend("c-1"), &limit).await.unwrap();
        let via = lb.calls.lock().unwrap()[0].1.clone().expect("a detour");
        // Nobody listens behind c-1: the proxy answers 502 either way.
        for _ in 0..4 {
            assert_eq!(status(&via).await, 502);
        }
        let text = faults.exposition().await;
        assert!(
            text.contains(r#"deploykit_fault_proxy_throttled_total{instance_id="c-1",group="canary"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE deploykit_fault_proxy_throttled counter\n"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn the_balancer_is_detoured_once_for_the_faults_of_an_instance_and_sent_back_after_the_last() {
        let lb = Arc::new(Recording::default());
        let faults = RoutedFaults::new(lb.clone(), "127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(faults.exposition().await, "");
        faults.inject(&backend("c-1"), &ERRORS).await.unwrap();
        faults.inject(&backend("c-1"), &ERRORS).await.unwrap();
        faults.inject(&backend("c-1"), &SLOW).await.unwrap();
        let via = {
            let calls = lb.calls.lock().unwrap();
            assert_eq!(calls.len(), 1, "one detour for two faults: {calls:?}");
            assert_eq!(calls[0].0, "c-1");
            calls[0].1.clone().expect("a detour")
        };
        assert!(via.starts_with("127.0.0.1:"), "{via}");
        assert_eq!(faults.rerouted().await, vec![InstanceId::new("c-1").unwrap()]);
        // The balancer's traffic to the proxy gets the injected answer.
        assert_eq!(status(&via).await, 500);
        let text = faults.exposition().await;
        assert!(
            text.contains(r#"deploykit_fault_proxy_responses_total{instance_id="c-1",group="canary",code="500",origin="injected"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"deploykit_fault_proxy_requests_total{instance_id="c-1",group="canary"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"deploykit_fault_proxy_rerouted{instance_id="c-1",group="canary"} 1"#),
            "{text}"
        );
        // One fault left: still detoured; none left: sent back.
        faults.clear(&backend("c-1"), &ERRORS).await.unwrap();
        assert_eq!(lb.calls.lock().unwrap().len(), 1);
        faults.clear(&backend("c-1"), &SLOW).await.unwrap();
        faults.clear(&backend("c-1"), &SLOW).await.unwrap();
        assert_eq!(
            lb.calls.lock().unwrap().last().cloned(),
            Some(("c-1".to_owned(), None))
        );
        assert_eq!(lb.calls.lock().unwrap().len(), 2);
        assert!(faults.rerouted().await.is_empty());
        // The proxy stays, clean: what the balancer's old connections send
        // still reaches the instance (here: nobody, so the proxy's 502).
        assert_eq!(status(&via).await, 502);
        let text = faults.exposition().await;
        assert!(text.contains(r#"code="502",origin="proxy"} 1"#), "{text}");
        assert!(
            text.contains(r#"deploykit_fault_proxy_rerouted{instance_id="c-1",group="canary"} 0"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn restore_sends_every_detoured_instance_back_and_a_refused_detour_injects_nothing() {
        let lb = Arc::new(Recording::default());
        let faults = RoutedFaults::new(lb.clone(), "127.0.0.1".parse().unwrap()).unwrap();
        faults.inject(&backend("c-1"), &ERRORS).await.unwrap();
        faults.inject(&backend("c-2"), &ERRORS).await.unwrap();
        assert!(faults.restore().await.is_empty());
        let back: Vec<_> = lb.calls.lock().unwrap()[2..].to_vec();
        assert_eq!(back, vec![("c-1".to_owned(), None), ("c-2".to_owned(), None)]);
        assert!(faults.restore().await.is_empty());
        assert_eq!(
            lb.calls.lock().unwrap().len(),
            4,
            "restoring twice sends nothing more"
        );

        lb.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        let e = faults.inject(&backend("c-3"), &ERRORS).await.unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
        assert!(faults.rerouted().await.is_empty());
        let text = faults.exposition().await;
        assert!(
            !text.contains(r#"instance_id="c-3",group="canary",code="500""#),
            "no fault was switched on: {text}"
        );
    }

    #[tokio::test]
    async fn a_recorded_detour_outlives_its_process_and_a_later_one_undoes_it() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("detours.json");
        let lb = Arc::new(Recording::default());
        let faults = RoutedFaults::new(lb.clone(), "127.0.0.1".parse().unwrap())
            .unwrap()
            .record_to(&record);
        faults.inject(&backend("c-1"), &ERRORS).await.unwrap();
        let text = std::fs::read_to_string(&record).unwrap();
        assert!(text.contains("\"c-1\":\"127.0.0.1:"), "{text}");
        faults.clear(&backend("c-1"), &ERRORS).await.unwrap();
        assert!(!record.exists(), "no detour left, no record");
        // The process "dies" during a fault: its record says so.
        faults.inject(&backend("c-1"), &ERRORS).await.unwrap();
        drop(faults);
        let later = Recording::default();
        let undone = undo_recorded(&later, &record, &[backend("c-1"), backend("c-2")])
            .await
            .unwrap();
        assert_eq!(undone, vec![InstanceId::new("c-1").unwrap()]);
        assert_eq!(*later.calls.lock().unwrap(), vec![("c-1".to_owned(), None)]);
        assert!(!record.exists());
        assert!(undo_recorded(&later, &record, &[backend("c-1")])
            .await
            .unwrap()
            .is_empty());
    }

    #[test]
    fn proxies_listen_on_loopback_only() {
        let lb: Arc<dyn LoadBalancer> = Arc::new(Recording::default());
        let e = RoutedFaults::new(lb, "0.0.0.0".parse().unwrap()).unwrap_err();
        assert!(matches!(e, ChaosError::NotLoopback(_)), "{e}");
    }
}
