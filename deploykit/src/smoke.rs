//! Smoke checks and warm-up requests against instances that receive no live
//! traffic yet, so a broken environment fails before the switch and a cold one
//! is warm when it gets traffic.
//!
//! A [`SmokeCheck`] is one HTTP `GET`: a path, the status expected, and
//! optionally a substring the body must contain, each with its own timeout.
//! The defaults are three checks ([`SmokeCheck::defaults`]):
//! `/health`, `/api/status`, and `/api/db/ping` whose body contains `ok`.
//!
//! The executor runs checks through the small [`SmokeTester`] trait, so the
//! testkit can script answers in virtual time; [`HttpSmokeTester`] (feature
//! `http`, on by default) is the real one, on `reqwest`.

use std::fmt::Debug;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::traits::Backend;

/// One HTTP check: `GET path` must answer `expect_status`, and its body must
/// contain `body_contains` when given, within `timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmokeCheck {
    /// The path, starting with `/` (a query string is allowed).
    pub path: String,
    /// The status the answer must have. Default 200.
    #[serde(default = "ok_status")]
    pub expect_status: u16,
    /// A substring the body must contain, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    /// Upper bound of the whole request, in milliseconds in serialized form.
    /// Default 5 s.
    #[serde(with = "crate::duration_ms", default = "default_timeout")]
    pub timeout: Duration,
}

fn ok_status() -> u16 {
    200
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl SmokeCheck {
    /// `GET path` expecting 200 within 5 s.
    pub fn get(path: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            expect_status: 200,
            body_contains: None,
            timeout: default_timeout(),
        }
    }

    /// The same check, also requiring `text` in the body.
    pub fn containing(mut self, text: impl Into<String>) -> Self {
        self.body_contains = Some(text.into());
        self
    }

    /// The default checks, which cover the process, the application and its
    /// database: `GET /health`, `GET /api/status`, and `GET /api/db/ping`
    /// whose body contains `ok`.
    pub fn defaults() -> Vec<SmokeCheck> {
        vec![
            SmokeCheck::get("/health"),
            SmokeCheck::get("/api/status"),
            SmokeCheck::get("/api/db/ping").containing("ok"),
        ]
    }

    /// Checks the fields; `field` names the check in errors (e.g.
    /// `smoke_checks[2]`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a path that does not start with `/` or
    /// has a character outside printable ASCII, a space or a `#`; a status
    /// outside 100–599; a zero timeout.
    pub fn validate(&self, field: &str) -> Result<()> {
        validate_path(&format!("{field}.path"), &self.path)?;
        if !(100..=599).contains(&self.expect_status) {
            return Err(Error::invalid(
                format!("{field}.expect_status"),
                format!(
                    "{} is not an HTTP status; use 100-599, e.g. 200",
                    self.expect_status
                ),
            ));
        }
        if self.timeout.is_zero() {
            return Err(Error::invalid(
                format!("{field}.timeout"),
                "is 0; give each check time to answer, e.g. 5s",
            ));
        }
        Ok(())
    }

    /// What the check expects, for messages: `GET /api/db/ping -> 200
    /// containing "ok"`.
    pub fn describe(&self) -> String {
        match &self.body_contains {
            Some(t) => format!("GET {} -> {} containing {t:?}", self.path, self.expect_status),
            None => format!("GET {} -> {}", self.path, self.expect_status),
        }
    }
}

/// Checks an HTTP path used against an instance: it starts with `/` and has
/// only printable ASCII other than space and `#`, so it can only name a path
/// on the instance's own address.
///
/// # Errors
/// [`Error::InvalidInput`] for `field` otherwise.
pub fn validate_path(field: &str, path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::invalid(
            field,
            format!("{path:?} does not start with '/'; write e.g. \"/health\""),
        ));
    }
    if let Some(c) = path.chars().find(|c| !c.is_ascii_graphic() || *c == '#') {
        return Err(Error::invalid(
            field,
            format!("{path:?} contains {c:?}; use printable ASCII without spaces or '#' (percent-encode)"),
        ));
    }
    Ok(())
}

/// Runs smoke checks and warm-up requests against one instance.
///
/// The executor bounds each call with the check's timeout (smoke) or its
/// warm-up timeout, by dropping the future.
#[async_trait]
pub trait SmokeTester: Send + Sync + Debug {
    /// Runs `check` against `backend`. `Err` says what came back (status,
    /// body excerpt, or why no answer came).
    ///
    /// * Idempotent: yes (a `GET`).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn check(&self, backend: &Backend, check: &SmokeCheck) -> std::result::Result<(), String>;

    /// Sends one warm-up `GET path` to `backend`; `Err` when it failed
    /// (failures are counted, not fatal).
    ///
    /// * Idempotent: yes (a `GET`).
    /// * Cancel-safe: yes.
    /// * On failure: nothing changed.
    async fn warm(&self, backend: &Backend, path: &str) -> std::result::Result<(), String>;
}

/// The real [`SmokeTester`]: plain HTTP `GET`s with `reqwest` to
/// `http://<address><path>`. Cheap to clone.
#[cfg(feature = "http")]
#[cfg_attr(docsrs, doc(cfg(feature = "http")))]
#[derive(Debug, Clone)]
pub struct HttpSmokeTester {
    client: reqwest::Client,
}

#[cfg(feature = "http")]
impl HttpSmokeTester {
    /// A tester with its own connection pool; redirects are not followed
    /// (a check sees the instance's own answer).
    ///
    /// # Errors
    /// [`Error::Driver`] when the HTTP client cannot be set up.
    pub fn new() -> Result<Self> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| crate::error::DriverError::new("cannot set up the HTTP client").with_source(e))?;
        Ok(Self { client })
    }

    fn url(backend: &Backend, path: &str) -> String {
        format!("http://{}{path}", backend.address)
    }
}

#[cfg(feature = "http")]
fn excerpt(body: &str) -> String {
    const MAX: usize = 200;
    let body = body.trim();
    if body.len() <= MAX {
        return format!("{body:?}");
    }
    let mut end = MAX;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…", &body[..end])
}

#[cfg(feature = "http")]
#[async_trait]
impl SmokeTester for HttpSmokeTester {
    async fn check(&self, backend: &Backend, check: &SmokeCheck) -> std::result::Result<(), String> {
        let url = Self::url(backend, &check.path);
        let resp = self
            .client
            .get(&url)
            .timeout(check.timeout)
            .send()
            .await
            .map_err(|e| format!("no answer from {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .text()
            .await
            .map_err(|e| format!("status {status} but the body could not be read: {e}"))?;
        let status_ok = status == check.expect_status;
        let body_ok = check
            .body_contains
            .as_ref()
            .is_none_or(|t| body.contains(t.as_str()));
        if status_ok && body_ok {
            Ok(())
        } else {
            Err(format!("got status {status} with body {}", excerpt(&body)))
        }
    }

    async fn warm(&self, backend: &Backend, path: &str) -> std::result::Result<(), String> {
        let resp = self
            .client
            .get(Self::url(backend, path))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        // Read the body so the connection is reused and the app does the work.
        let _ = resp.bytes().await;
        if status.is_server_error() {
            Err(format!("status {}", status.as_u16()))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn _object_safe(_: Box<dyn SmokeTester>) {}

    #[test]
    fn defaults_are_health_status_and_db_ping_and_valid() {
        let d = SmokeCheck::defaults();
        let paths: Vec<_> = d.iter().map(|c| c.path.as_str()).collect();
        assert_eq!(paths, ["/health", "/api/status", "/api/db/ping"]);
        assert_eq!(d[2].body_contains.as_deref(), Some("ok"));
        for (n, c) in d.iter().enumerate() {
            c.validate(&format!("smoke_checks[{n}]")).unwrap();
        }
        assert_eq!(d[2].describe(), "GET /api/db/ping -> 200 containing \"ok\"");
    }

    #[test]
    fn bad_checks_name_the_field() {
        let cases = [
            (SmokeCheck::get("health"), "smoke_checks[0].path"),
            (SmokeCheck::get("/a b"), "smoke_checks[0].path"),
            (SmokeCheck::get("/a\nHost: x"), "smoke_checks[0].path"),
            (SmokeCheck::get("/x#frag"), "smoke_checks[0].path"),
            (
                SmokeCheck {
                    expect_status: 42,
                    ..SmokeCheck::get("/")
                },
                "smoke_checks[0].expect_status",
            ),
            (
                SmokeCheck {
                    timeout: Duration::ZERO,
                    ..SmokeCheck::get("/")
                },
                "smoke_checks[0].timeout",
            ),
        ];
        for (c, field) in cases {
            let e = c.validate("smoke_checks[0]").unwrap_err().to_string();
            assert!(e.contains(field), "{c:?}: {e}");
        }
    }

    #[test]
    fn checks_deserialize_with_defaults() {
        let c: SmokeCheck = serde_json::from_str(r#"{"path":"/api/db/ping","body_contains":"ok"}"#).unwrap();
        assert_eq!(c, SmokeCheck::get("/api/db/ping").containing("ok"));
        assert!(serde_json::from_str::<SmokeCheck>(r#"{"path":"/","bogus":1}"#).is_err());
    }
}
