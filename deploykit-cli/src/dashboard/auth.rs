//! Who may do what on the dashboard.
//!
//! Reading is open on a loopback address and needs the token anywhere
//! else; every action (promote, abort, a flag change) needs the token,
//! given as `Authorization: Bearer TOKEN` or as the session cookie the
//! sign-in form sets. The cookie holds an HMAC of the token, not the token,
//! and is `SameSite=Strict; HttpOnly`.
//!
//! Cross-site request forgery is refused three ways: nothing changes on a
//! GET; a POST whose `Origin` is not this server's own is refused; and a
//! POST authenticated by the cookie must carry `Origin` (or
//! `Sec-Fetch-Site: same-origin`), which every browser sends, so only a
//! non-browser client with the Bearer token may omit both. On a loopback
//! address the `Host` header must name the loopback address too, so a
//! page that re-binds its DNS name to 127.0.0.1 cannot read the dashboard.

use std::fmt;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use axum::http::{header, HeaderMap, StatusCode};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "deploykit_session";

/// The action token and the session value derived from it.
#[derive(Clone)]
pub(crate) struct Token {
    secret: String,
    session: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(redacted)")
    }
}

impl Token {
    fn new(secret: String) -> Self {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(b"deploykit dashboard session v1");
        let session = hex::encode(mac.finalize().into_bytes());
        Self { secret, session }
    }

    /// The token itself, to print the one time it is created.
    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }

    /// The session cookie's value.
    pub(crate) fn session(&self) -> &str {
        &self.session
    }
}

/// Reads the token kept at `path`, or creates one (32 random bytes, hex,
/// in a file only its owner reads) when there is none. The flag says
/// whether it was created now.
///
/// # Errors
/// When the file cannot be read or written, or holds no usable token.
pub(crate) fn load_or_create(path: &Path) -> anyhow::Result<(Token, bool)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let t = text.trim();
            if t.len() < 32 || !t.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(deploykit::Error::invalid(
                    "dashboard token",
                    format!(
                        "{} does not hold a token (at least 32 letters or digits); delete it and a new one is generated on the next start",
                        path.display()
                    ),
                )
                .into());
            }
            Ok((Token::new(t.to_owned()), false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .map_err(|e| anyhow::anyhow!("reading /dev/urandom for the dashboard token: {e}"))?;
            let secret = hex::encode(bytes);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| anyhow::anyhow!("creating the dashboard token {}: {e}", path.display()))?;
            f.write_all(format!("{secret}\n").as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| anyhow::anyhow!("writing the dashboard token {}: {e}", path.display()))?;
            Ok((Token::new(secret), true))
        }
        Err(e) => Err(anyhow::anyhow!(
            "reading the dashboard token {}: {e}",
            path.display()
        )),
    }
}

/// Equal bytes, in a time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential {
    /// `Authorization: Bearer` with the token.
    Bearer,
    /// The session cookie.
    Cookie,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No token and no session cookie.
    SignInNeeded,
    /// A token or cookie that is not this dashboard's.
    WrongToken,
    /// The request comes from another site (or says nothing of its origin
    /// while relying on the cookie).
    CrossOrigin(String),
    /// The `Host` header names another server (DNS rebinding).
    WrongHost(String),
    /// The dashboard was started with `--read-only`.
    ReadOnly,
}

impl Refusal {
    /// 401 for missing or wrong credentials, 403 for the rest.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Refusal::SignInNeeded | Refusal::WrongToken => StatusCode::UNAUTHORIZED,
            Refusal::CrossOrigin(_) | Refusal::WrongHost(_) | Refusal::ReadOnly => StatusCode::FORBIDDEN,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::SignInNeeded => f.write_str(
                "this needs the dashboard token: sign in with it, or send `Authorization: Bearer TOKEN`",
            ),
            Refusal::WrongToken => {
                f.write_str("that is not this dashboard's token (or the session is from an older token)")
            }
            Refusal::CrossOrigin(why) => write!(f, "refused as a cross-site request: {why}"),
            Refusal::WrongHost(host) => write!(
                f,
                "the Host header `{host}` is not this dashboard's address; open it by its loopback address"
            ),
            Refusal::ReadOnly => {
                f.write_str("this dashboard was started with --read-only: it changes nothing")
            }
        }
    }
}

/// What the server checks requests against.
#[derive(Debug, Clone)]
pub(crate) struct Gate {
    /// `None` with `--read-only`.
    pub(crate) token: Option<Token>,
    /// The address listened on.
    pub(crate) addr: SocketAddr,
}

/// What a request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Need {
    /// Reading a page.
    Read,
    /// Changing something (only on a POST).
    Act,
}

fn text(headers: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The session cookie's value in a `Cookie` header, if any.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

impl Gate {
    fn loopback(&self) -> bool {
        self.addr.ip().is_loopback()
    }

    /// The credential the request carries, checked; `Ok(None)` when it
    /// carries none.
    pub(crate) fn credential(&self, headers: &HeaderMap) -> Result<Option<Credential>, Refusal> {
        let Some(token) = &self.token else {
            return Ok(None);
        };
        if let Some(auth) = text(headers, header::AUTHORIZATION) {
            return match auth.strip_prefix("Bearer ") {
                Some(given) if same(given.trim(), token.secret()) => Ok(Some(Credential::Bearer)),
                _ => Err(Refusal::WrongToken),
            };
        }
        match cookie(headers) {
            Some(v) if same(v, token.session()) => Ok(Some(Credential::Cookie)),
            Some(_) => Err(Refusal::WrongToken),
            None => Ok(None),
        }
    }

    /// Whether the request came from a page of this dashboard.
    pub(crate) fn same_origin(
        &self,
        headers: &HeaderMap,
        credential: Option<Credential>,
    ) -> Result<(), Refusal> {
        let host = text(headers, header::HOST).unwrap_or_default();
        if let Some(origin) = text(headers, header::ORIGIN) {
            let own = format!("http://{host}");
            return match origin == own {
                true => Ok(()),
                false => Err(Refusal::CrossOrigin(format!(
                    "its Origin is {origin}, not this dashboard ({own})"
                ))),
            };
        }
        match text(headers, "sec-fetch-site") {
            Some("same-origin") => Ok(()),
            Some(site) => Err(Refusal::CrossOrigin(format!("the browser says it is {site}"))),
            None if credential == Some(Credential::Bearer) => Ok(()),
            None => Err(Refusal::CrossOrigin(
                "it carries neither Origin nor Sec-Fetch-Site; a client that is not a browser should send the Bearer token".into(),
            )),
        }
    }

    /// Checks a request: the Host, then the credential `need` asks for.
    /// Returns who it is (`None`: anonymous reader).
    pub(crate) fn check(&self, headers: &HeaderMap, need: Need) -> Result<Option<Credential>, Refusal> {
        if self.loopback() {
            let host = text(headers, header::HOST).unwrap_or_default();
            let port = self.addr.port();
            let ok = [
                format!("127.0.0.1:{port}"),
                format!("localhost:{port}"),
                format!("[::1]:{port}"),
                self.addr.to_string(),
            ]
            .iter()
            .any(|h| h == host);
            if !ok {
                return Err(Refusal::WrongHost(host.to_owned()));
            }
        }
        let credential = self.credential(headers)?;
        match need {
            Need::Read if credential.is_some() || self.loopback() => Ok(credential),
            Need::Read => Err(Refusal::SignInNeeded),
            Need::Act if self.token.is_none() => Err(Refusal::ReadOnly),
            Need::Act => {
                let Some(c) = credential else {
                    // A forged request is told it is forged (403); one
                    // that merely lacks the token is asked for it (401).
                    let bare = self.same_origin(headers, Some(Credential::Bearer));
                    return Err(bare.err().unwrap_or(Refusal::SignInNeeded));
                };
                self.same_origin(headers, Some(c))?;
                Ok(Some(c))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(addr: &str) -> Gate {
        Gate {
            token: Some(Token::new("a".repeat(64))),
            addr: addr.parse().unwrap(),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn reading_on_loopback_is_open_but_acting_needs_the_token() {
        let g = gate("127.0.0.1:3100");
        let h = headers(&[("host", "127.0.0.1:3100")]);
        assert_eq!(g.check(&h, Need::Read), Ok(None));
        let h = headers(&[("host", "127.0.0.1:3100"), ("origin", "http://127.0.0.1:3100")]);
        assert_eq!(g.check(&h, Need::Act), Err(Refusal::SignInNeeded));
    }

    #[test]
    fn a_bearer_token_acts_without_origin_a_cookie_does_not() {
        let g = gate("127.0.0.1:3100");
        let bearer = format!("Bearer {}", "a".repeat(64));
        let h = headers(&[("host", "127.0.0.1:3100"), ("authorization", &bearer)]);
        assert_eq!(g.check(&h, Need::Act), Ok(Some(Credential::Bearer)));
        let c = format!("{COOKIE}={}", g.token.as_ref().unwrap().session());
        let h = headers(&[("host", "127.0.0.1:3100"), ("cookie", &c)]);
        assert!(matches!(g.check(&h, Need::Act), Err(Refusal::CrossOrigin(_))));
        let h = headers(&[
            ("host", "127.0.0.1:3100"),
            ("cookie", &c),
            ("origin", "http://127.0.0.1:3100"),
        ]);
        assert_eq!(g.check(&h, Need::Act), Ok(Some(Credential::Cookie)));
    }

    #[test]
    fn another_origin_is_refused_even_with_the_cookie() {
        let g = gate("127.0.0.1:3100");
        let c = format!("{COOKIE}={}", g.token.as_ref().unwrap().session());
        let h = headers(&[
            ("host", "127.0.0.1:3100"),
            ("cookie", &c),
            ("origin", "http://evil.example"),
        ]);
        assert!(matches!(g.check(&h, Need::Act), Err(Refusal::CrossOrigin(_))));
        let h = headers(&[
            ("host", "127.0.0.1:3100"),
            ("cookie", &c),
            ("sec-fetch-site", "cross-site"),
        ]);
        assert!(matches!(g.check(&h, Need::Act), Err(Refusal::CrossOrigin(_))));
    }

    #[test]
    fn a_wrong_token_or_cookie_is_401() {
        let g = gate("127.0.0.1:3100");
        let h = headers(&[("host", "127.0.0.1:3100"), ("authorization", "Bearer nope")]);
        assert_eq!(g.check(&h, Need::Act), Err(Refusal::WrongToken));
        assert_eq!(Refusal::WrongToken.status(), StatusCode::UNAUTHORIZED);
        let h = headers(&[("host", "127.0.0.1:3100"), ("cookie", "deploykit_session=forged")]);
        assert_eq!(g.check(&h, Need::Read), Err(Refusal::WrongToken));
    }

    #[test]
    fn a_rebound_host_name_is_refused_on_loopback() {
        let g = gate("127.0.0.1:3100");
        let h = headers(&[("host", "attacker.example:3100")]);
        assert!(matches!(g.check(&h, Need::Read), Err(Refusal::WrongHost(_))));
    }

    #[test]
    fn off_loopback_reading_needs_the_token_too() {
        let g = gate("10.0.0.5:3100");
        let h = headers(&[("host", "dash.internal:3100")]);
        assert_eq!(g.check(&h, Need::Read), Err(Refusal::SignInNeeded));
    }

    #[test]
    fn read_only_refuses_every_action() {
        let g = Gate {
            token: None,
            addr: "127.0.0.1:3100".parse().unwrap(),
        };
        let h = headers(&[("host", "127.0.0.1:3100"), ("authorization", "Bearer whatever")]);
        assert_eq!(g.check(&h, Need::Act), Err(Refusal::ReadOnly));
    }

    #[test]
    fn a_token_is_created_once_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dashboard-token");
        let (t1, created) = load_or_create(&p).unwrap();
        assert!(created);
        assert_eq!(t1.secret().len(), 64);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let (t2, created) = load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(t1.secret(), t2.secret());
        assert_ne!(t1.session(), t1.secret(), "the cookie is not the token");
    }
}
