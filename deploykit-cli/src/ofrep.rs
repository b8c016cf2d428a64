//! `deploykit flags serve`: the OpenFeature Remote Evaluation Protocol over
//! a flag file, reloaded when the file changes.
//!
//! The file is polled (size, modification time, then a hash of the content)
//! rather than watched: polling works the same on every filesystem,
//! catches an atomic rename, and bounds the time until a change (a kill
//! switch) is served by one poll interval. A file that stops parsing is
//! refused and the last good one stays served.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use clap::Args;
use deploykit::flags::{Context, ErrorCode, Evaluation, FlagSet};
use serde_json::{json, Value};

use crate::exit;
use crate::flags::FlagsCtx;

/// `deploykit flags serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// The address to listen on (port 0: any free port, printed).
    #[arg(long, default_value = "127.0.0.1:8016")]
    listen: SocketAddr,
    /// Allow an address that is not loopback: anyone who can reach it can
    /// read every flag and its variants.
    #[arg(long)]
    allow_remote: bool,
    /// How often the file is checked for changes, e.g. 250ms, 1s.
    #[arg(long, default_value = "250ms", value_parser = poll_interval)]
    poll_interval: Duration,
}

fn poll_interval(s: &str) -> Result<Duration, String> {
    let d = deploykit::parse_duration("--poll-interval", s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(10) || d > Duration::from_secs(60) {
        return Err("use 10ms to 60s".into());
    }
    Ok(d)
}

/// The flags being served and the fingerprint of the text they came from.
#[derive(Debug)]
struct Snapshot {
    set: FlagSet,
    content: u64,
}

#[derive(Debug, Clone)]
struct Shared {
    current: Arc<RwLock<Arc<Snapshot>>>,
}

impl Shared {
    fn get(&self) -> Arc<Snapshot> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

pub(crate) fn serve(ctx: &FlagsCtx, args: ServeArgs) -> anyhow::Result<u8> {
    if !args.listen.ip().is_loopback() && !args.allow_remote {
        return Err(deploykit::Error::invalid(
            "--listen",
            format!(
                "{} is not a loopback address: anyone who reaches it reads every flag; pass --allow-remote to serve it anyway",
                args.listen
            ),
        )
        .into());
    }
    let file = ctx.store.file().to_owned();
    let text = std::fs::read(&file).map_err(|source| deploykit::flags::FlagError::Io {
        action: "reading the flag file",
        path: file.clone(),
        source,
    })?;
    let set = FlagSet::parse(&String::from_utf8_lossy(&text))?;
    for p in set.problems() {
        eprintln!("deploykit: warning: {p}");
    }
    let shared = Shared {
        current: Arc::new(RwLock::new(Arc::new(Snapshot {
            set,
            content: fingerprint(&text),
        }))),
    };
    crate::cmd::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener.local_addr()?;
        outln!("serving {} over OFREP on http://{addr}", file.display());
        tokio::spawn(reload(file, shared.clone(), args.poll_interval));
        let app = router(shared);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        Ok(exit::SUCCESS)
    })
}

/// Polls `file` and swaps in each new version that parses.
async fn reload(file: std::path::PathBuf, shared: Shared, every: Duration) {
    // The inode too: an atomic replace within one timestamp tick, same size,
    // is still a new file.
    let stamp = |m: &std::fs::Metadata| {
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(m);
        #[cfg(not(unix))]
        let ino = 0u64;
        (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH), ino)
    };
    let mut last = std::fs::metadata(&file).ok().map(|m| stamp(&m));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = std::fs::metadata(&file).ok().map(|m| stamp(&m));
        if now == last {
            continue;
        }
        last = now;
        let Ok(text) = tokio::fs::read(&file).await else {
            tracing::warn!(file = %file.display(), "the flag file cannot be read; still serving the last version");
            continue;
        };
        let content = fingerprint(&text);
        if content == shared.get().content {
            continue;
        }
        match FlagSet::parse(&String::from_utf8_lossy(&text)) {
            Ok(set) => {
                for p in set.problems() {
                    tracing::warn!(problem = %p, "flag file problem");
                }
                *shared.current.write().unwrap_or_else(|p| p.into_inner()) =
                    Arc::new(Snapshot { set, content });
                tracing::info!(file = %file.display(), "flag file reloaded");
            }
            Err(e) => {
                tracing::error!(file = %file.display(), error = %e, "the flag file does not parse; still serving the last version");
            }
        }
    }
}

fn router(shared: Shared) -> Router {
    Router::new()
        .route("/ofrep/v1/evaluate/flags/{key}", post(one))
        .route("/ofrep/v1/evaluate/flags", post(bulk))
        .with_state(shared)
}

/// The request's `context`, or the reason it is not acceptable.
fn context_of(body: &[u8]) -> Result<Context, String> {
    deploykit::flags::ofrep_context(body).map_err(|e| e.to_string())
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// An evaluation in OFREP's shape: a success (`value` absent when the
/// caller's own default applies) or a failure (`errorCode`).
pub(crate) fn evaluation_json(e: &Evaluation) -> Value {
    let mut out = json!({ "key": e.key, "metadata": e.metadata });
    let obj = out.as_object_mut().expect("an object");
    match &e.error {
        Some(err) => {
            obj.insert("errorCode".into(), err.code.as_str().into());
            obj.insert("errorDetails".into(), err.detail.clone().into());
        }
        None => {
            obj.insert("reason".into(), e.reason.as_str().into());
            if let Some(v) = &e.variant {
                obj.insert("variant".into(), v.clone().into());
            }
            if let Some(v) = &e.value {
                obj.insert("value".into(), v.clone());
            }
        }
    }
    out
}

async fn one(State(shared): State<Shared>, Path(key): Path<String>, body: Bytes) -> Response {
    let ctx = match context_of(&body) {
        Ok(c) => c,
        Err(detail) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({ "key": key, "errorCode": ErrorCode::InvalidContext.as_str(), "errorDetails": detail }),
            )
        }
    };
    let e = shared.get().set.evaluate(&key, &ctx);
    let status = match e.error.as_ref().map(|e| e.code) {
        None => StatusCode::OK,
        Some(ErrorCode::FlagNotFound) => StatusCode::NOT_FOUND,
        Some(_) => StatusCode::BAD_REQUEST,
    };
    json_response(status, evaluation_json(&e))
}

async fn bulk(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let ctx = match context_of(&body) {
        Ok(c) => c,
        Err(detail) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                json!({ "errorCode": ErrorCode::InvalidContext.as_str(), "errorDetails": detail }),
            )
        }
    };
    let snap = shared.get();
    // The answer depends on the flags and on the context, so both make the tag.
    let mut h = DefaultHasher::new();
    snap.content.hash(&mut h);
    Value::Object(ctx.clone()).to_string().hash(&mut h);
    let etag = format!("\"{:016x}\"", h.finish());
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    let tag = HeaderValue::from_str(&etag).expect("hex in quotes is a valid header");
    if matches {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, tag)]).into_response();
    }
    let flags: Vec<Value> = snap
        .set
        .flags()
        .map(|f| evaluation_json(&f.evaluate(&ctx)))
        .collect();
    let mut r = json_response(StatusCode::OK, json!({ "flags": flags }));
    r.headers_mut().insert(header::ETAG, tag);
    r
}
