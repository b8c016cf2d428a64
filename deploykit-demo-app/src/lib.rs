//! # deploykit-demo-app
//!
//! A small real HTTP application that deploykit's real-server tests,
//! examples and benchmarks deploy behind real nginx and HAProxy.
//!
//! The binary `deploykit-demo-app` runs [`serve`] with [`DemoConfig`] parsed
//! from its command line:
//!
//! ```text
//! deploykit-demo-app --listen 127.0.0.1:18080 --version v2 --track canary \
//!     [--error-rate 0.1] [--latency-ms 20] [--unhealthy] [--startup-delay-ms 500] \
//!     [--conversion-rate 0.05] [--pid-file app.pid]
//! ```
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /` | `200` with body `<version>\n` (or `500` for the `--error-rate` fraction of requests) |
//! | `GET /health` | `200 ok`, or `503 unhealthy` with `--unhealthy` |
//! | `GET /api/status` | `200` JSON: version, track, requests served, requests in flight |
//! | `GET /api/db/ping` | `200 ok` |
//! | `GET /api/blob?bytes=N` | `200` with `N` bytes of `x` (at most 64 MiB; more, or no `N`: `400`): a body big enough to see a bandwidth limit |
//! | `GET /api/checkout?user=u1&segment=internal` | `200` JSON `{"flow": "new" or "old", "flag", "variant", "reason"}`: the flag `--checkout-flag` (`new-checkout`) evaluated from `--flags-file` or through `--ofrep-url`, with `user` as the targeting key and every other parameter as a context attribute; `old` when no flag source is set or the evaluation fails; with `--checkout-error-rate-new P`, that fraction of new-flow answers is `500`; every answered checkout is a visit, and the `--conversion-rate` fraction of them (evenly spread) converts: `"converted": true` |
//! | `GET /metrics` | Prometheus text: `http_requests_total{code,track,version}`, `http_request_duration_seconds{track,version}`, `http_requests_in_flight`, and for `/api/checkout` per flag variant `checkout_requests_total{code,variant}` and `checkout_request_duration_seconds{variant}` (`variant="none"` when the flag could not be evaluated); per track `checkout_visits_total{track,version}` and `checkout_conversions_total{track,version}` (an A/B experiment's conversion rate is their ratio) |
//!
//! Every answer carries the headers `x-app-version` and `x-app-track`, so a
//! client behind a load balancer can count who served it.
//!
//! On SIGTERM (or SIGINT) the app stops accepting connections, finishes the
//! requests in flight, and exits with status 0 — the graceful stop a
//! zero-downtime deployment relies on.
//!
//! Once listening it prints one line `listening on <addr>` to stdout (useful
//! with `--listen 127.0.0.1:0`), and writes its pid to `--pid-file` if given.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Why the app could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DemoError {
    /// A flag's value cannot be sent as an HTTP header value (it carries a
    /// control character, such as a newline).
    #[error("--{flag} {value:?} cannot be sent in an HTTP header")]
    HeaderValue {
        /// The flag, without the dashes: `version` or `track`.
        flag: &'static str,
        /// The value given.
        value: String,
    },
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address from `--listen`.
        addr: SocketAddr,
        /// What the bind said.
        #[source]
        source: std::io::Error,
    },
    /// The bound address cannot be read back.
    #[error("cannot read the bound address")]
    LocalAddr(#[source] std::io::Error),
    /// The pid file cannot be written.
    #[error("cannot write the pid file {}", path.display())]
    PidFile {
        /// The path from `--pid-file`.
        path: PathBuf,
        /// What the write said.
        #[source]
        source: std::io::Error,
    },
    /// The server failed while serving.
    #[error("server error")]
    Serve(#[source] std::io::Error),
}

/// The demo app's settings (its command line).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "deploykit-demo-app",
    about = "A small HTTP app for deploykit's real-server tests"
)]
pub struct DemoConfig {
    /// Address to listen on (`127.0.0.1:0` picks a free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The version the app reports (body of `/`, header `x-app-version`).
    #[arg(long = "version", default_value = "v1")]
    pub app_version: String,
    /// The track (`stable`, `canary`, `blue`, …) the app reports.
    #[arg(long, default_value = "stable")]
    pub track: String,
    /// Fraction (0.0–1.0) of `GET /` requests answered with 500, spread
    /// evenly (deterministic: with 0.25, every 4th request fails).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,
    /// Extra latency added to `/` and `/api/*` answers, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Answer `/health` with 503.
    #[arg(long)]
    pub unhealthy: bool,
    /// Wait this long before binding the listen address, in milliseconds (a
    /// slow start).
    #[arg(long, default_value_t = 0)]
    pub startup_delay_ms: u64,
    /// Write the process id to this file once listening.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// `/api/checkout` evaluates its flag from this flagd flag file
    /// (re-read when it changes).
    #[arg(long, conflicts_with = "ofrep_url")]
    pub flags_file: Option<PathBuf>,
    /// `/api/checkout` evaluates its flag through this OFREP server
    /// (`http://127.0.0.1:8016`).
    #[arg(long)]
    pub ofrep_url: Option<String>,
    /// The flag `/api/checkout` evaluates: truthy means the new flow.
    #[arg(long, default_value = "new-checkout")]
    pub checkout_flag: String,
    /// Fraction (0.0–1.0) of `/api/checkout` requests served the new flow
    /// that are answered with 500, spread evenly (a bad variant to kill).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub checkout_error_rate_new: f64,
    /// Fraction (0.0–1.0) of answered `/api/checkout` requests that count
    /// as a conversion, spread evenly (with 0.1, every 10th converts): a
    /// business metric for A/B experiments.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub conversion_rate: f64,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number; give a fraction such as 0.05"))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(format!("{v} is outside 0.0-1.0; give a fraction such as 0.05"));
    }
    Ok(v)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CodeLabels {
    code: String,
    track: String,
    version: String,
}

/// `/api/checkout` requests by the flag variant that chose the flow
/// (`none` when the flag could not be evaluated).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VariantCodeLabels {
    code: String,
    variant: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VariantLabels {
    variant: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TrackLabels {
    track: String,
    version: String,
}

#[derive(Debug)]
struct AppState {
    config: DemoConfig,
    version_header: HeaderValue,
    track_header: HeaderValue,
    registry: Registry,
    requests: Family<CodeLabels, Counter>,
    durations: Family<TrackLabels, Histogram>,
    /// Where `/api/checkout` reads its flag.
    flags: checkout::FlagSource,
    checkout_requests: Family<VariantCodeLabels, Counter>,
    checkout_durations: Family<VariantLabels, Histogram>,
    /// New-flow checkouts seen, for the error-rate spacing.
    new_flow_requests: AtomicU64,
    /// `GET /` requests seen, for the error-rate spacing.
    root_requests: AtomicU64,
    served: AtomicU64,
    in_flight: AtomicU64,
    /// Requests in flight, not counting `/metrics` scrapes.
    in_flight_gauge: Gauge,
    /// Answered checkouts and the conversions among them.
    checkout_visits: Family<TrackLabels, Counter>,
    checkout_conversions: Family<TrackLabels, Counter>,
    /// Answered checkouts seen, for the conversion spacing.
    visits_seen: AtomicU64,
}

type Shared = Arc<AppState>;

mod checkout;

impl AppState {
    fn new(config: DemoConfig) -> Result<Self, DemoError> {
        let header = |flag: &'static str, v: &str| {
            HeaderValue::from_str(v).map_err(|_| DemoError::HeaderValue {
                flag,
                value: v.to_string(),
            })
        };
        let version_header = header("version", &config.app_version)?;
        let track_header = header("track", &config.track)?;
        let mut registry = Registry::default();
        let requests = Family::<CodeLabels, Counter>::default();
        let durations = Family::<TrackLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 14))) as fn() -> Histogram,
        );
        registry.register("http_requests", "HTTP requests served", requests.clone());
        let in_flight_gauge = Gauge::default();
        registry.register(
            "http_requests_in_flight",
            "HTTP requests being answered, not counting /metrics scrapes",
            in_flight_gauge.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to answer HTTP requests",
            durations.clone(),
        );
        let checkout_requests = Family::<VariantCodeLabels, Counter>::default();
        registry.register(
            "checkout_requests",
            "/api/checkout requests by flag variant",
            checkout_requests.clone(),
        );
        let checkout_durations = Family::<VariantLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.001, 2.0, 14))) as fn() -> Histogram,
        );
        registry.register(
            "checkout_request_duration_seconds",
            "Time to answer /api/checkout, by flag variant",
            checkout_durations.clone(),
        );
        let checkout_visits = Family::<TrackLabels, Counter>::default();
        registry.register(
            "checkout_visits",
            "/api/checkout requests answered (the denominator of the conversion rate)",
            checkout_visits.clone(),
        );
        let checkout_conversions = Family::<TrackLabels, Counter>::default();
        registry.register(
            "checkout_conversions",
            "/api/checkout requests that converted (--conversion-rate)",
            checkout_conversions.clone(),
        );
        let flags = checkout::FlagSource::new(&config);
        Ok(Self {
            checkout_visits,
            checkout_conversions,
            visits_seen: AtomicU64::new(0),
            flags,
            checkout_requests,
            checkout_durations,
            new_flow_requests: AtomicU64::new(0),
            config,
            version_header,
            track_header,
            registry,
            requests,
            durations,
            root_requests: AtomicU64::new(0),
            served: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            in_flight_gauge,
        })
    }

    /// Counts an answered checkout; whether it converted. Deterministic,
    /// as the error rate: exactly floor(n * rate) of the first n convert.
    fn visit(&self) -> bool {
        let labels = TrackLabels {
            track: self.config.track.clone(),
            version: self.config.app_version.clone(),
        };
        self.checkout_visits.get_or_create(&labels).inc();
        let n = self.visits_seen.fetch_add(1, Ordering::SeqCst) + 1;
        let rate = self.config.conversion_rate;
        let converted = ((n as f64) * rate).floor() > (((n - 1) as f64) * rate).floor();
        if converted {
            self.checkout_conversions.get_or_create(&labels).inc();
        }
        converted
    }

    async fn delay(&self) {
        if self.config.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(self.config.latency_ms)).await;
        }
    }
}

/// Builds the app's router (for embedding the app in a test process).
///
/// # Errors
/// [`DemoError::HeaderValue`] when the version or track cannot be sent as
/// an HTTP header value.
pub fn router(config: DemoConfig) -> Result<Router, DemoError> {
    let state: Shared = Arc::new(AppState::new(config)?);
    Ok(Router::new()
        .route("/", get(root))
        .route("/health", get(health))
        .route("/api/status", get(status))
        .route("/api/db/ping", get(db_ping))
        .route("/api/blob", get(blob))
        .route("/metrics", get(metrics))
        .route("/api/checkout", get(checkout::checkout))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state))
}

/// Counts, times and labels every answer.
async fn observe(State(s): State<Shared>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let scrape = req.uri().path() == "/metrics";
    s.in_flight.fetch_add(1, Ordering::SeqCst);
    if !scrape {
        s.in_flight_gauge.inc();
    }
    let mut resp = next.run(req).await;
    if !scrape {
        s.in_flight_gauge.dec();
    }
    s.in_flight.fetch_sub(1, Ordering::SeqCst);
    s.served.fetch_add(1, Ordering::SeqCst);
    let headers = resp.headers_mut();
    headers.insert("x-app-version", s.version_header.clone());
    headers.insert("x-app-track", s.track_header.clone());
    s.requests
        .get_or_create(&CodeLabels {
            code: resp.status().as_u16().to_string(),
            track: s.config.track.clone(),
            version: s.config.app_version.clone(),
        })
        .inc();
    s.durations
        .get_or_create(&TrackLabels {
            track: s.config.track.clone(),
            version: s.config.app_version.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    resp
}

async fn root(State(s): State<Shared>) -> Response {
    s.delay().await;
    let n = s.root_requests.fetch_add(1, Ordering::SeqCst) + 1;
    let rate = s.config.error_rate;
    // Request n fails when it crosses the next multiple of 1/rate: exactly
    // floor(n * rate) of the first n requests fail.
    let fails = ((n as f64) * rate).floor() > (((n - 1) as f64) * rate).floor();
    if fails {
        (StatusCode::INTERNAL_SERVER_ERROR, "injected error\n").into_response()
    } else {
        (StatusCode::OK, format!("{}\n", s.config.app_version)).into_response()
    }
}

/// The largest body `/api/blob` sends: enough for any bandwidth test,
/// small enough that a typo cannot exhaust the test machine's memory.
const MAX_BLOB: usize = 64 << 20;

async fn blob(
    axum::extract::Query(params): axum::extract::Query<std::collections::BTreeMap<String, String>>,
) -> Response {
    match params.get("bytes").and_then(|b| b.parse::<usize>().ok()) {
        Some(n) if n <= MAX_BLOB => (StatusCode::OK, vec![b'x'; n]).into_response(),
        _ => (
            StatusCode::BAD_REQUEST,
            "give bytes=N, the body's size, at most 67108864\n",
        )
            .into_response(),
    }
}

async fn health(State(s): State<Shared>) -> Response {
    if s.config.unhealthy {
        (StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}

async fn status(State(s): State<Shared>) -> Response {
    s.delay().await;
    let body = format!(
        "{{\"version\":{:?},\"track\":{:?},\"requests\":{},\"in_flight\":{}}}\n",
        s.config.app_version,
        s.config.track,
        s.served.load(Ordering::SeqCst),
        // This request itself is in flight; report the others.
        s.in_flight.load(Ordering::SeqCst).saturating_sub(1),
    );
    ([("content-type", "application/json")], body).into_response()
}

async fn db_ping(State(s): State<Shared>) -> Response {
    s.delay().await;
    (StatusCode::OK, "ok\n").into_response()
}

async fn metrics(State(s): State<Shared>) -> Response {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, &s.registry) {
        Ok(()) => (
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            out,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Runs the app until SIGTERM or SIGINT, then stops accepting, finishes the
/// requests in flight and returns.
///
/// # Errors
/// A [`DemoError`] naming what failed: a flag value that cannot be used,
/// the address that cannot be bound, the pid file that cannot be written,
/// or the server failing.
pub async fn serve(config: DemoConfig) -> Result<(), DemoError> {
    if config.startup_delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(config.startup_delay_ms)).await;
    }
    let listen = config.listen;
    let pid_file = config.pid_file.clone();
    let app = router(config)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| DemoError::Listen { addr: listen, source })?;
    let bound = listener.local_addr().map_err(DemoError::LocalAddr)?;
    if let Some(path) = pid_file {
        if let Err(source) = std::fs::write(&path, format!("{}\n", std::process::id())) {
            return Err(DemoError::PidFile { path, source });
        }
    }
    println!("listening on {bound}");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(DemoError::Serve)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the app cannot stop gracefully; wait
            // forever and let a kill end it.
            std::future::pending::<()>().await;
        }
    }
}

/// Parses the command line into a [`DemoConfig`] and runs [`serve`] on a
/// two-thread runtime: the whole `deploykit-demo-app` binary, a library
/// function so that a crate whose tests need the binary can build it under
/// its own name (Cargo gives tests the path of their own package's binaries
/// only).
pub fn run() -> std::process::ExitCode {
    let config = <DemoConfig as clap::Parser>::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("deploykit-demo-app: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The cause chain on one line: "cannot listen on …: Address in use".
            let mut line = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                line.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("deploykit-demo-app: {line}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_parse_and_bad_rates_are_rejected() {
        let c = DemoConfig::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:0",
            "--version",
            "v9",
            "--track",
            "canary",
            "--error-rate",
            "0.25",
            "--latency-ms",
            "7",
            "--unhealthy",
        ])
        .unwrap();
        assert_eq!(c.app_version, "v9");
        assert_eq!(c.track, "canary");
        assert_eq!(c.error_rate, 0.25);
        assert_eq!(c.latency_ms, 7);
        assert!(c.unhealthy);
        let err = DemoConfig::try_parse_from(["x", "--error-rate", "1.5"]).unwrap_err();
        assert!(err.to_string().contains("outside 0.0-1.0"), "{err}");
    }

    #[tokio::test]
    async fn a_tenth_of_checkouts_convert_and_metrics_count_them_per_track() {
        let c =
            DemoConfig::try_parse_from(["x", "--track", "b", "--version", "v2", "--conversion-rate", "0.1"])
                .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
            listener,
            router(c).unwrap(),
        )));
        let client = reqwest::Client::new();
        let mut converted = 0;
        for _ in 0..50 {
            let body = client
                .get(format!("{base}/api/checkout?user=u1"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["converted"] == true {
                converted += 1;
            }
        }
        assert_eq!(converted, 5);
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            text.contains("checkout_visits_total{track=\"b\",version=\"v2\"} 50"),
            "{text}"
        );
        assert!(
            text.contains("checkout_conversions_total{track=\"b\",version=\"v2\"} 5"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_blob_has_the_size_asked_and_a_bad_size_is_refused() {
        let c = DemoConfig::try_parse_from(["x"]).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
            listener,
            router(c).unwrap(),
        )));
        let client = reqwest::Client::new();
        let r = client
            .get(format!("{base}/api/blob?bytes=300000"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), 300_000);
        assert!(body.iter().all(|b| *b == b'x'));
        for bad in ["", "?bytes=lots", "?bytes=67108865"] {
            let r = client.get(format!("{base}/api/blob{bad}")).send().await.unwrap();
            assert_eq!(r.status(), 400, "{bad}");
        }
    }

    #[test]
    fn header_unsafe_versions_are_rejected() {
        let c = DemoConfig::try_parse_from(["x", "--version", "v1\nx"]).unwrap();
        let err = router(c).unwrap_err().to_string();
        assert!(err.contains("--version"), "{err}");
    }
}
