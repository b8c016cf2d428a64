//! A fault proxy on loopback: an HTTP/1.1 proxy in front of one instance
//! that forwards every request unchanged until faults are added, then
//! delays, fails, resets, holds or slows down a chosen share of requests.
//!
//! Place it permanently between the load balancer and the instance (the
//! balancer's backend address is the proxy's) and switch faults on and off
//! with [`FaultProxy::add`] and [`FaultProxy::clear`]: with no fault it is a
//! plain proxy, so the same balancer configuration serves a drill and a
//! normal day.
//!
//! Each downstream connection gets one upstream connection, opened at its
//! first forwarded request, so keep-alive on both sides behaves as it would
//! without the proxy; an upstream that cannot be reached, or that closes a
//! connection mid-request (a killed process), is answered `502`.
//!
//! Which requests a fault hits is deterministic: a fault of `p` percent hits
//! request `n` (counted per fault from 0) when `⌊(n+1)·p/100⌋ > ⌊n·p/100⌋`,
//! so 5 % is exactly one request in twenty — a test can count on it, and a
//! drill injects exactly what it says.
//!
//! A bandwidth fault paces the request body and the answer's body of each
//! request it hits, each way at its rate, in steps of 20 ms worth of bytes
//! (a token bucket one step deep, waiting on tokio's timer). It is decided
//! when the request arrives, but ends with the fault: once
//! [`FaultProxy::remove`] or [`FaultProxy::clear`] took it away, bodies in
//! flight go on unthrottled from their next step.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use async_trait::async_trait;

use super::{ChaosError, Fault, FaultInjector};
use crate::error::DriverError;
use crate::names::InstanceId;
use crate::traits::Backend;

/// A fault active on a proxy, as [`FaultProxy::add`] returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct FaultId(u64);

/// What a proxy did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests received.
    pub requests: u64,
    /// Requests forwarded to the upstream and answered by it.
    pub forwarded: u64,
    /// Requests answered with an injected error status.
    pub injected_errors: u64,
    /// Requests delayed by an injected latency.
    pub delayed: u64,
    /// Connections reset on purpose.
    pub resets: u64,
    /// Requests held unanswered until their connection was closed.
    pub held: u64,
    /// Requests whose bodies a bandwidth fault slowed down.
    pub throttled: u64,
    /// Requests answered `502` because the upstream failed.
    pub upstream_failures: u64,
}

/// How one of a proxy's answers came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// The instance's own answer, forwarded.
    Upstream,
    /// An answer a fault made up (an injected `5xx`).
    Injected,
    /// The proxy's `502`: the instance could not be reached or hung up.
    Proxy,
}

impl Origin {
    /// The word used in metrics labels: `upstream`, `injected`, `proxy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Upstream => "upstream",
            Origin::Injected => "injected",
            Origin::Proxy => "proxy",
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    requests: AtomicU64,
    forwarded: AtomicU64,
    injected_errors: AtomicU64,
    delayed: AtomicU64,
    resets: AtomicU64,
    held: AtomicU64,
    throttled: AtomicU64,
    upstream_failures: AtomicU64,
}

#[derive(Debug)]
struct Active {
    fault: Fault,
    /// Requests (or connections, for a reset) this fault has looked at.
    seen: u64,
    /// True until the fault is removed: bodies a bandwidth fault slows
    /// down read it to stop pacing when the fault ends.
    live: Arc<AtomicBool>,
}

impl Active {
    fn new(fault: Fault) -> Self {
        Self {
            fault,
            seen: 0,
            live: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.live.store(false, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    faults: Mutex<BTreeMap<FaultId, Active>>,
    next_id: AtomicU64,
    counters: Counters,
    /// Seed of the jitter's generator, advanced per delayed request.
    jitter_state: AtomicU64,
    /// Answers by origin and status code.
    answers: Mutex<BTreeMap<(Origin, u16), u64>>,
}

impl Shared {
    fn answered(&self, origin: Origin, status: StatusCode) {
        let mut a = self.answers.lock().expect("answers poisoned");
        *a.entry((origin, status.as_u16())).or_insert(0) += 1;
    }
}

/// What a fault decided for one request.
enum Decision {
    Forward,
    Fail(StatusCode),
    Hold(Duration),
}

/// Whether the `n`-th look (from 0) of a `percent` fault hits.
fn hits(n: u64, percent: u8) -> bool {
    let p = u64::from(percent.min(100));
    (n + 1) * p / 100 > n * p / 100
}

/// splitmix64: a small, good-enough generator for jitter (not for secrets).
fn next_random(state: &AtomicU64) -> u64 {
    let mut z = state
        .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Shared {
    /// Whether a new connection is to be reset.
    fn reset_connection(&self) -> bool {
        let mut faults = self.faults.lock().expect("faults poisoned");
        let mut reset = false;
        for a in faults.values_mut() {
            if let Fault::Reset { percent } = a.fault {
                reset |= hits(a.seen, percent);
                a.seen += 1;
            }
        }
        reset
    }

    /// The delay to add, what to do with one request, and the bandwidth
    /// faults that hit it.
    fn decide(&self) -> (Duration, Decision, Vec<Limit>) {
        let mut faults = self.faults.lock().expect("faults poisoned");
        let mut delay = Duration::ZERO;
        let mut decision = Decision::Forward;
        let mut limits = Vec::new();
        for a in faults.values_mut() {
            match a.fault {
                Fault::Latency {
                    delay: fixed,
                    jitter,
                    percent,
                } => {
                    if hits(a.seen, percent) {
                        let extra = if jitter.is_zero() {
                            Duration::ZERO
                        } else {
                            let nanos = u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX);
                            Duration::from_nanos(next_random(&self.jitter_state) % nanos.saturating_add(1))
                        };
                        delay += fixed + extra;
                    }
                    a.seen += 1;
                }
                Fault::HttpError { status, percent } => {
                    if hits(a.seen, percent) && matches!(decision, Decision::Forward) {
                        decision = Decision::Fail(
                            StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                        );
                    }
                    a.seen += 1;
                }
                Fault::Bandwidth { rate, percent } => {
                    if hits(a.seen, percent) {
                        limits.push(Limit {
                            rate: rate.bytes_per_second(),
                            live: Arc::clone(&a.live),
                        });
                    }
                    a.seen += 1;
                }
                Fault::Timeout { after } => decision = Decision::Hold(after),
                Fault::Reset { .. } | Fault::Kill | Fault::Pause => {}
            }
        }
        (delay, decision, limits)
    }
}

/// One bandwidth fault as a body it hits sees it.
#[derive(Debug, Clone)]
struct Limit {
    /// Bytes per second, more than 0.
    rate: u64,
    /// False once the fault is removed.
    live: Arc<AtomicBool>,
}

/// How much time a body's pacing step is worth: short enough that a
/// stream looks smooth, long enough that the timer's millisecond grain
/// does not slow fast rates down.
const STEP: Duration = Duration::from_millis(1000 / STEPS_PER_SECOND);
const STEPS_PER_SECOND: u64 = 50;

/// A body paced at the lowest rate of the bandwidth faults still active
/// among those that hit its request; unthrottled once none is.
///
/// Each step lets out one step's worth of bytes and moves the earliest
/// time of the next step on by the time those bytes take at the rate; at
/// most one step of unused time is kept as credit, so the body never
/// bursts past two steps' worth. Dropping it mid-wait (a cancel) drops the
/// rest of the body and nothing else.
#[derive(Debug)]
struct Throttled {
    inner: ProxyBody,
    limits: Vec<Limit>,
    /// Bytes read from `inner` and not yet let out.
    pending: Bytes,
    /// The earliest time the next step may go out.
    next_at: tokio::time::Instant,
    sleep: Pin<Box<tokio::time::Sleep>>,
}

impl Throttled {
    fn new(inner: ProxyBody, limits: Vec<Limit>) -> Self {
        let now = tokio::time::Instant::now();
        Self {
            inner,
            limits,
            pending: Bytes::new(),
            next_at: now,
            sleep: Box::pin(tokio::time::sleep_until(now)),
        }
    }

    /// The lowest rate among the faults still active, if any is.
    fn rate(&self) -> Option<u64> {
        self.limits
            .iter()
            .filter(|l| l.live.load(Ordering::Relaxed))
            .map(|l| l.rate)
            .min()
    }
}

/// How long `bytes` take at `rate` bytes per second.
fn time_for(bytes: usize, rate: u64) -> Duration {
    let nanos = (bytes as u128 * 1_000_000_000) / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

impl Body for Throttled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            match std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.pending = data,
                    // Trailers carry no bandwidth to speak of.
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                end_or_error => return Poll::Ready(end_or_error),
            }
        }
        let Some(rate) = this.rate() else {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut this.pending)))));
        };
        if this.next_at > tokio::time::Instant::now() {
            this.sleep.as_mut().reset(this.next_at);
            std::task::ready!(this.sleep.as_mut().poll(cx));
        }
        let now = tokio::time::Instant::now();
        let step = usize::try_from(rate / STEPS_PER_SECOND)
            .unwrap_or(usize::MAX)
            .max(1);
        let out = this.pending.split_to(step.min(this.pending.len()));
        let start = this.next_at.max(now.checked_sub(STEP).unwrap_or(now));
        this.next_at = start + time_for(out.len(), rate);
        Poll::Ready(Some(Ok(Frame::data(out))))
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        hint.set_lower(hint.lower() + pending);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

/// `body`, paced when bandwidth faults hit its request.
fn paced(body: ProxyBody, limits: &[Limit]) -> ProxyBody {
    if limits.is_empty() {
        body
    } else {
        Throttled::new(body, limits.to_vec()).boxed()
    }
}

type ProxyBody = BoxBody<Bytes, hyper::Error>;

fn plain(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(text.as_bytes()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// A running fault proxy. Dropping it (or [`shutdown`](Self::shutdown))
/// stops accepting and closes every connection it holds.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use deploykit::chaos::{Fault, FaultProxy};
///
/// let upstream = "127.0.0.1:9".parse()?; // the instance's address
/// let proxy = FaultProxy::start("127.0.0.1:0".parse()?, upstream).await?;
/// // The load balancer sends this instance's traffic to proxy.addr().
/// let id = proxy.add(Fault::HttpError { status: 503, percent: 5 })?;
/// assert_eq!(proxy.faults().len(), 1);
/// proxy.remove(id);
/// assert!(proxy.faults().is_empty());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on `listen` (a loopback address; port 0 picks one) and
    /// forwards to `upstream`.
    ///
    /// # Errors
    /// [`ChaosError::NotLoopback`] when `listen` is not on 127.0.0.0/8 or
    /// `::1` (a fault proxy is a test and drill tool, never a public
    /// listener); [`ChaosError::Io`] when the address cannot be bound.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr) -> Result<Self, ChaosError> {
        if !listen.ip().is_loopback() {
            return Err(ChaosError::NotLoopback(listen));
        }
        let listener = TcpListener::bind(listen).await.map_err(|source| ChaosError::Io {
            action: format!("binding the fault proxy to {listen}"),
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| ChaosError::Io {
            action: "reading the fault proxy's address".into(),
            source,
        })?;
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(1),
            counters: Counters::default(),
            jitter_state: AtomicU64::new(u64::from(addr.port())),
            answers: Mutex::new(BTreeMap::new()),
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop.clone()));
        Ok(Self { addr, shared, stop })
    }

    /// Where the proxy listens: the address to give the load balancer.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where it forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// Starts `fault` for requests (or connections) from now on.
    ///
    /// # Errors
    /// [`ChaosError::NotANetworkFault`] for a process fault
    /// ([`Fault::Kill`], [`Fault::Pause`]), which a proxy cannot inject;
    /// [`ChaosError::Invalid`] for a fault that does not validate.
    pub fn add(&self, fault: Fault) -> Result<FaultId, ChaosError> {
        fault.validate()?;
        if fault.is_process_fault() {
            return Err(ChaosError::NotANetworkFault(fault.kind()));
        }
        let id = FaultId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        self.shared
            .faults
            .lock()
            .expect("faults poisoned")
            .insert(id, Active::new(fault));
        Ok(id)
    }

    /// Ends one fault; requests held by a [`Fault::Timeout`] stay held until
    /// their own time is up, bodies slowed by a [`Fault::Bandwidth`] go on
    /// unthrottled from their next step. Idempotent.
    pub fn remove(&self, id: FaultId) {
        self.shared.faults.lock().expect("faults poisoned").remove(&id);
    }

    /// Ends every fault. Idempotent.
    pub fn clear(&self) {
        self.shared.faults.lock().expect("faults poisoned").clear();
    }

    /// The active faults, oldest first.
    pub fn faults(&self) -> Vec<(FaultId, Fault)> {
        let faults = self.shared.faults.lock().expect("faults poisoned");
        faults.iter().map(|(id, a)| (*id, a.fault)).collect()
    }

    /// What the proxy did so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyStats {
            connections: get(&c.connections),
            requests: get(&c.requests),
            forwarded: get(&c.forwarded),
            injected_errors: get(&c.injected_errors),
            delayed: get(&c.delayed),
            resets: get(&c.resets),
            held: get(&c.held),
            throttled: get(&c.throttled),
            upstream_failures: get(&c.upstream_failures),
        }
    }

    /// The answers given so far, by origin and status code: what a
    /// metrics exposition of the proxy counts.
    pub fn answers(&self) -> BTreeMap<(Origin, u16), u64> {
        self.shared.answers.lock().expect("answers poisoned").clone()
    }

    /// Stops accepting and closes every connection. Idempotent.
    pub fn shutdown(&self) {
        self.stop.cancel();
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A [`FaultInjector`] over one [`FaultProxy`] per instance: what the
/// executor is given when the load balancer reaches the chosen instances
/// through proxies. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ProxyFaults {
    proxies: HashMap<InstanceId, Arc<FaultProxy>>,
    active: Arc<Mutex<HashMap<(InstanceId, Fault), FaultId>>>,
}

impl ProxyFaults {
    /// No proxies yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `proxy` stands in front of `instance`.
    pub fn with(mut self, instance: InstanceId, proxy: Arc<FaultProxy>) -> Self {
        self.proxies.insert(instance, proxy);
        self
    }

    /// The proxy in front of `instance`.
    pub fn proxy(&self, instance: &InstanceId) -> Option<&Arc<FaultProxy>> {
        self.proxies.get(instance)
    }

    fn proxy_for(&self, instance: &Backend) -> Result<&Arc<FaultProxy>, DriverError> {
        self.proxies.get(&instance.id).ok_or_else(|| {
            DriverError::new(format!(
                "no fault proxy stands in front of {}; put one between the load balancer and it",
                instance.id
            ))
        })
    }
}

#[async_trait]
impl FaultInjector for ProxyFaults {
    async fn inject(&self, instance: &Backend, fault: &Fault) -> Result<(), DriverError> {
        let proxy = self.proxy_for(instance)?;
        let mut active = self.active.lock().expect("proxy faults poisoned");
        let key = (instance.id.clone(), *fault);
        if active.contains_key(&key) {
            return Ok(());
        }
        let id = proxy
            .add(*fault)
            .map_err(|e| DriverError::new(format!("fault proxy of {}", instance.id)).with_source(e))?;
        active.insert(key, id);
        Ok(())
    }

    async fn clear(&self, instance: &Backend, fault: &Fault) -> Result<(), DriverError> {
        let proxy = self.proxy_for(instance)?;
        let removed = self
            .active
            .lock()
            .expect("proxy faults poisoned")
            .remove(&(instance.id.clone(), *fault));
        if let Some(id) = removed {
            proxy.remove(id);
        }
        Ok(())
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors or similar: wait a moment rather than spin.
                    tracing::warn!(error = %e, "fault proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        shared.counters.connections.fetch_add(1, Ordering::Relaxed);
        if shared.reset_connection() {
            shared.counters.resets.fetch_add(1, Ordering::Relaxed);
            // A zero linger makes the close send RST instead of FIN.
            let _ = socket_reset(stream);
            continue;
        }
        tokio::spawn(serve_connection(stream, Arc::clone(&shared), stop.clone()));
    }
}

fn socket_reset(stream: TcpStream) -> std::io::Result<()> {
    let std = stream.into_std()?;
    let sock = socket2::SockRef::from(&std);
    sock.set_linger(Some(Duration::ZERO))?;
    drop(std);
    Ok(())
}

/// The upstream connection of one downstream connection.
type Upstream = hyper::client::conn::http1::SendRequest<ProxyBody>;

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>, stop: CancellationToken) {
    let upstream: Arc<tokio::sync::Mutex<Option<Upstream>>> = Arc::new(tokio::sync::Mutex::new(None));
    let conn_stop = stop.child_token();
    let service = hyper::service::service_fn({
        let conn_stop = conn_stop.clone();
        move |req: Request<Incoming>| {
            let shared = Arc::clone(&shared);
            let upstream = Arc::clone(&upstream);
            let conn_stop = conn_stop.clone();
            async move { Ok::<_, Infallible>(handle(req, &shared, &upstream, &conn_stop).await) }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        () = conn_stop.cancelled() => {}
    }
}

async fn handle(
    req: Request<Incoming>,
    shared: &Shared,
    upstream: &tokio::sync::Mutex<Option<Upstream>>,
    conn_stop: &CancellationToken,
) -> Response<ProxyBody> {
    let c = &shared.counters;
    c.requests.fetch_add(1, Ordering::Relaxed);
    let (delay, decision, limits) = shared.decide();
    if !delay.is_zero() {
        c.delayed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(delay).await;
    }
    match decision {
        Decision::Forward => {}
        Decision::Fail(status) => {
            c.injected_errors.fetch_add(1, Ordering::Relaxed);
            shared.answered(Origin::Injected, status);
            return plain(status, "fault injected by deploykit's fault proxy\n");
        }
        Decision::Hold(after) => {
            c.held.fetch_add(1, Ordering::Relaxed);
            if after.is_zero() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(after).await;
            // Closing the connection without an answer is what a timeout
            // looks like; the cancel drops this connection and this future.
            conn_stop.cancel();
            return std::future::pending().await;
        }
    }
    if !limits.is_empty() {
        c.throttled.fetch_add(1, Ordering::Relaxed);
    }
    let req = req.map(|b| paced(b.boxed(), &limits));
    match forward(req, shared.upstream, upstream).await {
        Ok(r) => {
            c.forwarded.fetch_add(1, Ordering::Relaxed);
            shared.answered(Origin::Upstream, r.status());
            r.map(|b| paced(b.boxed(), &limits))
        }
        Err(e) => {
            c.upstream_failures.fetch_add(1, Ordering::Relaxed);
            shared.answered(Origin::Proxy, StatusCode::BAD_GATEWAY);
            tracing::debug!(error = %e, upstream = %shared.upstream, "fault proxy: upstream failed");
            let mut r = plain(StatusCode::BAD_GATEWAY, "upstream failed\n");
            // The upstream connection is gone; so is this one's keep-alive.
            r.headers_mut().insert(
                hyper::header::CONNECTION,
                hyper::header::HeaderValue::from_static("close"),
            );
            r
        }
    }
}

async fn forward(
    req: Request<ProxyBody>,
    addr: SocketAddr,
    slot: &tokio::sync::Mutex<Option<Upstream>>,
) -> Result<Response<Incoming>, Box<dyn std::error::Error + Send + Sync>> {
    let mut slot = slot.lock().await;
    let ready = match slot.as_mut() {
        Some(s) => s.ready().await.is_ok(),
        None => false,
    };
    if !ready {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        *slot = Some(send);
    }
    let send = slot.as_mut().expect("set above");
    Ok(send.send_request(req).await?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use hyper::client::conn::http1::SendRequest;

    #[test]
    fn five_percent_is_exactly_one_in_twenty() {
        let hit: Vec<u64> = (0..100).filter(|n| hits(*n, 5)).collect();
        assert_eq!(hit, vec![19, 39, 59, 79, 99]);
        assert_eq!((0..1000).filter(|n| hits(*n, 100)).count(), 1000);
        assert_eq!((0..1000).filter(|n| hits(*n, 0)).count(), 0);
        assert_eq!((0..1000).filter(|n| hits(*n, 33)).count(), 330);
    }

    /// An upstream answering `200 up <n>` on loopback; the token stops it.
    async fn upstream() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let token = stop.clone();
        let served = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            loop {
                let (s, _) = tokio::select! {
                    r = listener.accept() => r.unwrap(),
                    () = token.cancelled() => return,
                };
                let served = Arc::clone(&served);
                let token = token.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let n = served.fetch_add(1, Ordering::Relaxed);
                        async move {
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!("up {n}")))))
                        }
                    });
                    let conn =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(s), svc);
                    tokio::select! {
                        _ = conn => {}
                        () = token.cancelled() => {}
                    }
                });
            }
        });
        (addr, stop)
    }

    async fn client(addr: SocketAddr) -> SendRequest<Empty<Bytes>> {
        let s = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        send
    }

    async fn get(send: &mut SendRequest<Empty<Bytes>>) -> Result<(u16, String), hyper::Error> {
        send.ready().await?;
        let req = Request::get("/")
            .header("host", "app")
            .body(Empty::new())
            .unwrap();
        let r = send.send_request(req).await?;
        let status = r.status().as_u16();
        let body = r.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    #[tokio::test]
    async fn without_faults_it_forwards_every_request_on_one_kept_alive_connection() {
        let (up, _stop) = upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        let mut c = client(proxy.addr()).await;
        for n in 0..10 {
            assert_eq!(get(&mut c).await.unwrap(), (200, format!("up {n}")));
        }
        let s = proxy.stats();
        assert_eq!(
            (s.connections, s.requests, s.forwarded, s.injected_errors),
            (1, 10, 10, 0)
        );
    }

    #[tokio::test]
    async fn an_http_error_fault_fails_exactly_its_share_and_stops_when_removed() {
        let (up, _stop) = upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        let id = proxy
            .add(Fault::HttpError {
                status: 503,
                percent: 5,
            })
            .unwrap();
        let mut c = client(proxy.addr()).await;
        let mut statuses = Vec::new();
        for _ in 0..100 {
            statuses.push(get(&mut c).await.unwrap().0);
        }
        assert_eq!(statuses.iter().filter(|s| **s == 503).count(), 5, "{statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 95);
        proxy.remove(id);
        for _ in 0..40 {
            assert_eq!(get(&mut c).await.unwrap().0, 200);
        }
        assert_eq!(proxy.stats().injected_errors, 5);
        assert_eq!(
            proxy.answers(),
            BTreeMap::from([((Origin::Upstream, 200), 135), ((Origin::Injected, 503), 5)])
        );
    }

    #[tokio::test]
    async fn a_latency_fault_delays_the_answer_by_at_least_its_delay() {
        let (up, _stop) = upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        proxy
            .add(Fault::Latency {
                delay: Duration::from_millis(150),
                jitter: Duration::from_millis(50),
                percent: 100,
            })
            .unwrap();
        let mut c = client(proxy.addr()).await;
        let t = std::time::Instant::now();
        assert_eq!(get(&mut c).await.unwrap().0, 200);
        assert!(t.elapsed() >= Duration::from_millis(150), "{:?}", t.elapsed());
        assert_eq!(proxy.stats().delayed, 1);
    }

    #[tokio::test]
    async fn a_reset_fault_resets_new_connections() {
        let (up, _stop) = upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        proxy.add(Fault::Reset { percent: 100 }).unwrap();
        let s = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(s))
            .await
            .unwrap();
        let conn = tokio::spawn(conn);
        assert!(get(&mut send).await.is_err(), "a reset connection answered");
        let _ = conn.await;
        proxy.clear();
        let mut c = client(proxy.addr()).await;
        assert_eq!(get(&mut c).await.unwrap().0, 200);
        assert_eq!(proxy.stats().resets, 1);
    }

    #[tokio::test]
    async fn a_timeout_fault_closes_the_connection_without_an_answer() {
        let (up, _stop) = upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        proxy
            .add(Fault::Timeout {
                after: Duration::from_millis(100),
            })
            .unwrap();
        let mut c = client(proxy.addr()).await;
        assert!(get(&mut c).await.is_err(), "a held request was answered");
        assert_eq!(proxy.stats().held, 1);
        assert_eq!(proxy.stats().forwarded, 0);
    }

    #[tokio::test]
    async fn an_upstream_that_goes_away_is_answered_502_and_the_proxy_recovers() {
        let (up, stop) = upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        let mut c = client(proxy.addr()).await;
        assert_eq!(get(&mut c).await.unwrap().0, 200);
        stop.cancel();
        // The upstream's listener and connections close; the next request fails upstream.
        let mut answered = None;
        for _ in 0..50 {
            let mut c = client(proxy.addr()).await;
            match get(&mut c).await {
                Ok((502, _)) => {
                    answered = Some(502);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        assert_eq!(answered, Some(502));
        assert!(proxy.stats().upstream_failures >= 1);
    }

    #[tokio::test]
    async fn proxy_faults_inject_once_clear_and_name_an_instance_without_a_proxy() {
        let (up, _stop) = upstream().await;
        let proxy = Arc::new(
            FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
                .await
                .unwrap(),
        );
        let backend = |id: &str| Backend {
            id: InstanceId::new(id).unwrap(),
            address: crate::names::Address::parse("127.0.0.1:9").unwrap(),
            group: crate::names::Group::new("canary").unwrap(),
        };
        let faults = ProxyFaults::new().with(InstanceId::new("c-1").unwrap(), Arc::clone(&proxy));
        let fault = Fault::HttpError {
            status: 500,
            percent: 100,
        };
        faults.inject(&backend("c-1"), &fault).await.unwrap();
        faults.inject(&backend("c-1"), &fault).await.unwrap();
        assert_eq!(proxy.faults().len(), 1, "injecting twice is active once");
        let mut c = client(proxy.addr()).await;
        assert_eq!(get(&mut c).await.unwrap().0, 500);
        faults.clear(&backend("c-1"), &fault).await.unwrap();
        faults.clear(&backend("c-1"), &fault).await.unwrap();
        assert!(proxy.faults().is_empty());
        assert_eq!(get(&mut c).await.unwrap().0, 200);
        let e = faults.inject(&backend("c-2"), &fault).await.unwrap_err();
        assert!(
            e.to_string().contains("no fault proxy stands in front of c-2"),
            "{e}"
        );
    }

    fn full(bytes: Bytes) -> ProxyBody {
        Full::new(bytes).map_err(|e| match e {}).boxed()
    }

    fn limit(rate: u64) -> Limit {
        Limit {
            rate,
            live: Arc::new(AtomicBool::new(true)),
        }
    }

    /// 256 KiB of a pattern that shows reordering or loss.
    fn quarter_mib() -> Bytes {
        (0..256 * 1024u32)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into()
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttled_body_takes_its_size_over_its_rate_in_small_steps() {
        let data = quarter_mib();
        let mut body = Throttled::new(full(data.clone()), vec![limit(128 * 1024)]);
        let t = tokio::time::Instant::now();
        let mut got = Vec::new();
        let mut frames = 0;
        while let Some(frame) = body.frame().await {
            let chunk = frame.unwrap().into_data().unwrap();
            assert!(chunk.len() <= 128 * 1024 / 50, "a step of {} bytes", chunk.len());
            got.extend_from_slice(&chunk);
            frames += 1;
        }
        // The first step goes at once, each later one a step's time after it.
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(1_950) && took <= Duration::from_millis(2_050),
            "{took:?}"
        );
        assert_eq!(got, data, "the body arrives whole and in order");
        assert!(frames > 50, "{frames} steps");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_goes_on_unthrottled_once_its_fault_ends_and_at_the_lowest_live_rate_meanwhile() {
        let data = quarter_mib();
        let slow = limit(16 * 1024);
        let fast = limit(64 * 1024);
        let mut body = Throttled::new(full(data.clone()), vec![fast.clone(), slow.clone()]);
        let mut got = Vec::new();
        let t = tokio::time::Instant::now();
        for _ in 0..11 {
            got.extend_from_slice(&body.frame().await.unwrap().unwrap().into_data().unwrap());
        }
        // 11 steps at 16 KiB/s: 10 waits of 20 ms.
        assert_eq!(got.len(), 11 * (16 * 1024 / 50));
        assert_eq!(t.elapsed(), Duration::from_millis(200));
        slow.live.store(false, Ordering::Relaxed);
        let t = tokio::time::Instant::now();
        let before = got.len();
        for _ in 0..10 {
            got.extend_from_slice(&body.frame().await.unwrap().unwrap().into_data().unwrap());
        }
        assert_eq!(
            got.len() - before,
            10 * (64 * 1024 / 50),
            "steps at the faster rate"
        );
        assert!(t.elapsed() <= Duration::from_millis(200), "{:?}", t.elapsed());
        fast.live.store(false, Ordering::Relaxed);
        let t = tokio::time::Instant::now();
        while let Some(frame) = body.frame().await {
            got.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert!(t.elapsed() <= STEP, "{:?}", t.elapsed());
        assert_eq!(got, data);
    }

    /// An upstream that answers `GET` with 256 KiB and `POST` with the
    /// number of bytes it received.
    async fn bulk_upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let body = if req.method() == hyper::Method::POST {
                            let n = req.into_body().collect().await?.to_bytes().len();
                            Bytes::from(format!("got {n}"))
                        } else {
                            quarter_mib()
                        };
                        Ok::<_, hyper::Error>(Response::new(Full::new(body)))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_bandwidth_fault_slows_answers_and_uploads_through_the_proxy_to_its_rate() {
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), bulk_upstream().await)
            .await
            .unwrap();
        proxy
            .add(Fault::Bandwidth {
                rate: super::super::ByteRate::new(128 * 1024),
                percent: 100,
            })
            .unwrap();
        let s = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut call = |method: hyper::Method, body: Bytes| {
            let req = Request::builder()
                .method(method)
                .uri("/")
                .header("host", "app")
                .body(Full::new(body))
                .unwrap();
            let sent = send.send_request(req);
            async move {
                let r = sent.await.unwrap();
                let t = std::time::Instant::now();
                let body = r.into_body().collect().await.unwrap().to_bytes();
                (body, t)
            }
        };
        // 256 KiB at 128 KiB/s: about 2 s; the bound below allows for the
        // first step going out at once.
        let t = std::time::Instant::now();
        let (body, _) = call(hyper::Method::GET, Bytes::new()).await;
        let took = t.elapsed();
        assert_eq!(body, quarter_mib());
        assert!(took >= Duration::from_millis(1_500), "{took:?}");
        assert!(took < Duration::from_secs(60), "{took:?}");
        // 128 KiB up at the same rate: about 1 s before the upstream has it all.
        let t = std::time::Instant::now();
        let (body, _) = call(hyper::Method::POST, quarter_mib().slice(..128 * 1024)).await;
        let took = t.elapsed();
        assert_eq!(body, "got 131072");
        assert!(took >= Duration::from_millis(750), "{took:?}");
        assert_eq!(proxy.stats().throttled, 2);
    }

    #[tokio::test]
    async fn a_bandwidth_fault_hits_exactly_its_share_of_requests() {
        let (up, _stop) = upstream().await;
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        let id = proxy
            .add(Fault::Bandwidth {
                rate: super::super::ByteRate::new(1024 * 1024),
                percent: 25,
            })
            .unwrap();
        let mut c = client(proxy.addr()).await;
        for n in 0..8 {
            assert_eq!(get(&mut c).await.unwrap(), (200, format!("up {n}")));
        }
        assert_eq!(proxy.stats().throttled, 2);
        proxy.remove(id);
        assert_eq!(get(&mut c).await.unwrap().0, 200);
        assert_eq!(proxy.stats().throttled, 2);
    }

    #[tokio::test]
    async fn it_refuses_process_faults_bad_parameters_and_public_addresses() {
        let up: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let e = FaultProxy::start("0.0.0.0:0".parse().unwrap(), up)
            .await
            .unwrap_err();
        assert!(matches!(e, ChaosError::NotLoopback(_)), "{e}");
        let proxy = FaultProxy::start("127.0.0.1:0".parse().unwrap(), up)
            .await
            .unwrap();
        let e = proxy.add(Fault::Kill).unwrap_err();
        assert!(e.to_string().contains("kill is a process fault"), "{e}");
        let e = proxy
            .add(Fault::HttpError {
                status: 404,
                percent: 5,
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("invalid status: 404"), "{e}");
        let e = proxy
            .add(Fault::HttpError {
                status: 503,
                percent: 0,
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("invalid percent"), "{e}");
        let e = proxy
            .add(Fault::Bandwidth {
                rate: super::super::ByteRate::new(0),
                percent: 100,
            })
            .unwrap_err();
        assert!(e.to_string().starts_with("invalid rate: is 0"), "{e}");
        assert!(proxy.faults().is_empty());
    }
}
