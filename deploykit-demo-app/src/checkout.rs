//! `/api/checkout`: the old or the new checkout flow, chosen by a feature
//! flag read from a flagd file or an OFREP server, so a flag change is
//! observable over HTTP.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use deploykit::flags::{Context, FlagSet};
use serde_json::{json, Value};

use std::sync::atomic::Ordering;

use axum::http::StatusCode;

use crate::{DemoConfig, Shared, VariantCodeLabels, VariantLabels};

/// Where the flag comes from.
#[derive(Debug)]
pub(crate) enum FlagSource {
    None,
    File {
        path: PathBuf,
        cache: Mutex<Option<(FileStamp, Arc<FlagSet>)>>,
    },
    Ofrep {
        url: String,
        client: reqwest::Client,
    },
}

type FileStamp = (u64, SystemTime, u64);

impl FlagSource {
    pub(crate) fn new(config: &DemoConfig) -> Self {
        match (&config.flags_file, &config.ofrep_url) {
            (Some(path), _) => FlagSource::File {
                path: path.clone(),
                cache: Mutex::new(None),
            },
            (None, Some(url)) => FlagSource::Ofrep {
                url: url.trim_end_matches('/').to_owned(),
                client: reqwest::Client::builder()
                    .timeout(std::time::Duration::from_secs(5))
                    .build()
                    .unwrap_or_default(),
            },
            (None, None) => FlagSource::None,
        }
    }

    /// The flags of the file, re-read when its size, time or inode changed.
    fn file_flags(
        path: &PathBuf,
        cache: &Mutex<Option<(FileStamp, Arc<FlagSet>)>>,
    ) -> Result<Arc<FlagSet>, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        #[cfg(unix)]
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let ino = 0;
        let stamp = (meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), ino);
        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, set)) = cache.as_ref() {
            if *s == stamp {
                return Ok(set.clone());
            }
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        match FlagSet::parse(&text) {
            Ok(set) => {
                let set = Arc::new(set);
                *cache = Some((stamp, set.clone()));
                Ok(set)
            }
            // A file caught half-written by a non-atomic editor: keep the last good flags.
            Err(e) => cache
                .as_ref()
                .map(|(_, s)| s.clone())
                .ok_or_else(|| e.to_string()),
        }
    }

    /// `(value, variant, reason)` of `flag` for `ctx`, or why not.
    async fn evaluate(&self, flag: &str, ctx: Context) -> Result<(Value, Option<String>, String), String> {
        match self {
            FlagSource::None => Err("no flag source (--flags-file or --ofrep-url)".into()),
            FlagSource::File { path, cache } => {
                let set = Self::file_flags(path, cache)?;
                let e = set.evaluate(flag, &ctx);
                if let Some(err) = e.error {
                    return Err(format!("{}: {}", err.code.as_str(), err.detail));
                }
                Ok((
                    e.value.unwrap_or(Value::Null),
                    e.variant,
                    e.reason.as_str().to_owned(),
                ))
            }
            FlagSource::Ofrep { url, client } => {
                let body = json!({ "context": ctx }).to_string();
                let resp = client
                    .post(format!("{url}/ofrep/v1/evaluate/flags/{flag}"))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("OFREP request failed: {}", e.without_url()))?;
                let text = resp
                    .text()
                    .await
                    .map_err(|e| format!("OFREP answer unreadable: {}", e.without_url()))?;
                let v: Value =
                    serde_json::from_str(&text).map_err(|e| format!("OFREP answer is not JSON: {e}"))?;
                if let Some(code) = v.get("errorCode").and_then(Value::as_str) {
                    return Err(format!(
                        "{code}: {}",
                        v.get("errorDetails").and_then(Value::as_str).unwrap_or("")
                    ));
                }
                Ok((
                    v.get("value").cloned().unwrap_or(Value::Null),
                    v.get("variant").and_then(Value::as_str).map(str::to_owned),
                    v.get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or("UNKNOWN")
                        .to_owned(),
                ))
            }
        }
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty() && s != "off" && s != "false",
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::Null => false,
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// `GET /api/checkout?user=…&…`.
pub(crate) async fn checkout(
    State(s): State<Shared>,
    Query(params): Query<BTreeMap<String, String>>,
) -> Response {
    let started = std::time::Instant::now();
    s.delay().await;
    let mut ctx = Context::new();
    for (k, v) in params {
        let key = if k == "user" { "targetingKey".to_owned() } else { k };
        ctx.insert(key, Value::String(v));
    }
    let flag = &s.config.checkout_flag;
    // The old flow is the safe answer whenever the flag cannot be read.
    let (new_flow, label, body) = match s.flags.evaluate(flag, ctx).await {
        Ok((value, variant, reason)) => (
            truthy(&value),
            variant.clone().unwrap_or_else(|| "none".to_owned()),
            json!({
                "flow": if truthy(&value) { "new" } else { "old" },
                "flag": flag,
                "variant": variant,
                "reason": reason,
            }),
        ),
        Err(error) => (
            false,
            "none".to_owned(),
            json!({ "flow": "old", "flag": flag, "variant": null, "reason": "ERROR", "error": error }),
        ),
    };
    let fails = new_flow && {
        let n = s.new_flow_requests.fetch_add(1, Ordering::SeqCst) + 1;
        let rate = s.config.checkout_error_rate_new;
        // As for `/`: exactly floor(n * rate) of the first n new-flow checkouts fail.
        ((n as f64) * rate).floor() > (((n - 1) as f64) * rate).floor()
    };
    let code = if fails {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    s.checkout_requests
        .get_or_create(&VariantCodeLabels {
            code: code.as_u16().to_string(),
            variant: label.clone(),
        })
        .inc();
    s.checkout_durations
        .get_or_create(&VariantLabels { variant: label })
        .observe(started.elapsed().as_secs_f64());
    if fails {
        let body = json!({ "flow": "new", "flag": flag, "error": "injected error" });
        return (code, [("content-type", "application/json")], format!("{body}\n")).into_response();
    }
    let converted = s.visit();
    let mut body = body;
    body["converted"] = Value::Bool(converted);
    ([("content-type", "application/json")], format!("{body}\n")).into_response()
}
