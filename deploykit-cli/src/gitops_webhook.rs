//! The webhook receiver of `deploykit watch --webhook ADDR`: a push event
//! from GitHub or Gitea wakes the poller at once instead of at its next
//! interval.
//!
//! The payload is never trusted for what to deploy: a request only wakes
//! the poller, which asks the repository itself which commit each branch
//! is on. So a forged request can at worst cause one extra poll, and only
//! with the secret can it do even that: every request must carry an
//! HMAC-SHA256 of its body keyed with the configured secret, in GitHub's
//! `X-Hub-Signature-256: sha256=<hex>` or Gitea's (and Forgejo's)
//! `X-Gitea-Signature: <hex>`, compared in constant time. Anything else is
//! answered 401 with one log line naming the peer and the reason (never the
//! secret or the signature). A burst of pushes is one wake-up: the poller
//! keeps a flag, not a queue.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The shared secret of the webhook; its `Debug` never shows it.
#[derive(Clone)]
pub(crate) struct Secret(Arc<Vec<u8>>);

impl Secret {
    /// A secret from its bytes (already trimmed of a trailing newline).
    pub(crate) fn new(bytes: Vec<u8>) -> Self {
        Self(Arc::new(bytes))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    /// No signature header at all.
    Missing,
    /// A signature header that is not `sha256=<64 hex>` (GitHub) or `<64
    /// hex>` (Gitea).
    Malformed,
    /// A well-formed signature of another secret or another body.
    Mismatch,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rejection::Missing => "no X-Hub-Signature-256 or X-Gitea-Signature header",
            Rejection::Malformed => "the signature header is not an HMAC-SHA256 in hexadecimal",
            Rejection::Mismatch => "the signature does not match the body and the configured secret",
        })
    }
}

/// Checks the signature of `body` against `secret`: GitHub's header first,
/// then Gitea's and Forgejo's.
pub(crate) fn verify(secret: &Secret, headers: &HeaderMap, body: &[u8]) -> Result<(), Rejection> {
    let github = headers.get("x-hub-signature-256").map(|v| (v, true));
    let gitea = headers
        .get("x-gitea-signature")
        .or_else(|| headers.get("x-forgejo-signature"))
        .map(|v| (v, false));
    let (value, prefixed) = github.or(gitea).ok_or(Rejection::Missing)?;
    let text = value.to_str().map_err(|_| Rejection::Malformed)?.trim();
    let hex_text = if prefixed {
        text.strip_prefix("sha256=").ok_or(Rejection::Malformed)?
    } else {
        text
    };
    let given = hex::decode(hex_text).map_err(|_| Rejection::Malformed)?;
    if given.len() != 32 {
        return Err(Rejection::Malformed);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).map_err(|_| Rejection::Mismatch)?;
    mac.update(body);
    // verify_slice compares in constant time.
    mac.verify_slice(&given).map_err(|_| Rejection::Mismatch)
}

#[derive(Clone)]
struct Hook {
    secret: Secret,
    wake: Arc<dyn Fn() + Send + Sync>,
}

async fn receive(
    State(hook): State<Hook>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST a push event\n");
    }
    match verify(&hook.secret, &headers, &body) {
        Ok(()) => {
            (hook.wake)();
            (StatusCode::ACCEPTED, "the poller is woken\n")
        }
        Err(why) => {
            eprintln!("deploykit: webhook: refused a request from {peer}: {why}");
            (StatusCode::UNAUTHORIZED, "bad or missing signature\n")
        }
    }
}

/// Serves the webhook on `listener` until the runtime stops; every
/// correctly signed POST calls `wake`.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    secret: Secret,
    wake: Arc<dyn Fn() + Send + Sync>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let app = axum::Router::new()
        .fallback(receive)
        .with_state(Hook { secret, wake });
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    fn headers(name: &str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        h
    }

    #[test]
    fn a_github_signature_of_the_body_with_the_secret_passes() {
        let s = Secret::new(b"s3cret".to_vec());
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = format!("sha256={}", sign(b"s3cret", body));
        assert_eq!(verify(&s, &headers("X-Hub-Signature-256", &sig), body), Ok(()));
    }

    #[test]
    fn a_gitea_signature_is_bare_hex() {
        let s = Secret::new(b"s3cret".to_vec());
        let body = b"{}";
        let sig = sign(b"s3cret", body);
        assert_eq!(verify(&s, &headers("X-Gitea-Signature", &sig), body), Ok(()));
        // GitHub's header without its prefix is malformed, not accepted.
        assert_eq!(
            verify(&s, &headers("X-Hub-Signature-256", &sig), body),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn another_secret_or_another_body_is_a_mismatch() {
        let s = Secret::new(b"s3cret".to_vec());
        let sig = format!("sha256={}", sign(b"other", b"{}"));
        assert_eq!(
            verify(&s, &headers("X-Hub-Signature-256", &sig), b"{}"),
            Err(Rejection::Mismatch)
        );
        let sig = format!("sha256={}", sign(b"s3cret", b"{}"));
        assert_eq!(
            verify(&s, &headers("X-Hub-Signature-256", &sig), b"{ }"),
            Err(Rejection::Mismatch)
        );
    }

    #[test]
    fn no_signature_or_a_short_one_is_refused() {
        let s = Secret::new(b"s3cret".to_vec());
        assert_eq!(verify(&s, &HeaderMap::new(), b"{}"), Err(Rejection::Missing));
        assert_eq!(
            verify(&s, &headers("X-Hub-Signature-256", "sha256=abcd"), b"{}"),
            Err(Rejection::Malformed)
        );
        assert_eq!(
            verify(&s, &headers("X-Hub-Signature-256", "sha256=zz"), b"{}"),
            Err(Rejection::Malformed)
        );
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let s = Secret::new(b"s3cret".to_vec());
        assert!(!format!("{s:?}").contains("s3cret"));
    }
}
