//! [`SecretUrl`]: a configured URL that may carry credentials, printed
//! only with them hidden.
//!
//! Operators write credentials into URLs (`http://user:password@prom:9090`,
//! a Slack webhook whose path *is* the token, `?api_key=…`). Every message,
//! log line, journal record and notice that names such a URL goes through
//! this type's `Display`, so a secret never reaches them; only the HTTP
//! client sees the text as written ([`SecretUrl::expose`]).

use std::fmt;

use serde::Deserialize;

/// A URL whose `Display` and `Debug` hide the userinfo (`user:password@`),
/// the query string's values and the fragment, and — for URLs whose path
/// is itself a token, like webhooks — the path.
///
/// ```
/// use deploykit::SecretUrl;
/// let prom = SecretUrl::new("http://user:s3cret@prom:9090/api?key=abc&x");
/// assert_eq!(prom.to_string(), "http://***@prom:9090/api?key=***&***");
/// let hook = SecretUrl::new("https://hooks.example.com/services/T0/B1/XYZ").secret_path();
/// assert_eq!(hook.to_string(), "https://hooks.example.com/…");
/// assert_eq!(hook.expose(), "https://hooks.example.com/services/T0/B1/XYZ");
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct SecretUrl {
    raw: String,
    hide_path: bool,
}

impl SecretUrl {
    /// Wraps `raw` as written; it is not checked here (the user of the URL
    /// parses it and names its own field in the error).
    pub fn new(raw: impl Into<String>) -> Self {
        Self {
            raw: raw.into(),
            hide_path: false,
        }
    }

    /// Hides the path and query too, printing `scheme://host/…` only: for
    /// URLs that carry the token in the path (Slack, Mattermost, Teams).
    #[must_use]
    pub fn secret_path(mut self) -> Self {
        self.hide_path = true;
        self
    }

    /// The URL as written, credentials included: for the HTTP client only,
    /// never for a message.
    pub fn expose(&self) -> &str {
        &self.raw
    }

    /// The printable form (what `Display` writes).
    pub fn redacted(&self) -> String {
        let (scheme, rest) = match self.raw.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, self.raw.as_str()),
        };
        // The userinfo ends at the last `@` before the path, query or
        // fragment; a password containing `/` is over-redacted, never shown.
        let end = rest.find(['?', '#']).unwrap_or(rest.len());
        let rest = match rest[..end].rfind('@') {
            Some(at) => format!("***{}", &rest[at..]),
            None => rest.to_string(),
        };
        let (before_fragment, fragment) = match rest.split_once('#') {
            Some((b, _)) => (b, Some("***")),
            None => (rest.as_str(), None),
        };
        let (before_query, query) = match before_fragment.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (before_fragment, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(slash) => before_query.split_at(slash),
            None => (before_query, ""),
        };
        let mut out = String::with_capacity(self.raw.len());
        if let Some(s) = scheme {
            out.push_str(s);
            out.push_str("://");
        }
        out.push_str(authority);
        if self.hide_path {
            if !(path.is_empty() || path == "/") || query.is_some() || fragment.is_some() {
                out.push_str("/…");
            } else {
                out.push_str(path);
            }
            return out;
        }
        out.push_str(path);
        if let Some(q) = query {
            out.push('?');
            let pairs: Vec<String> = q
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((k, _)) => format!("{k}=***"),
                    None if pair.is_empty() => String::new(),
                    None => "***".to_string(),
                })
                .collect();
            out.push_str(&pairs.join("&"));
        }
        if let Some(f) = fragment {
            out.push('#');
            out.push_str(f);
        }
        out
    }
}

impl From<String> for SecretUrl {
    fn from(raw: String) -> Self {
        Self::new(raw)
    }
}

impl From<&str> for SecretUrl {
    fn from(raw: &str) -> Self {
        Self::new(raw)
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SecretUrl").field(&self.redacted()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_query_values_and_fragments_are_hidden() {
        for (raw, shown) in [
            ("http://127.0.0.1:9090", "http://127.0.0.1:9090"),
            ("http://127.0.0.1:9090/prom/", "http://127.0.0.1:9090/prom/"),
            ("http://user:s3cret@127.0.0.1:9090", "http://***@127.0.0.1:9090"),
            ("http://user@h/p", "http://***@h/p"),
            ("https://a:b@c@h:1/x?y=z", "https://***@h:1/x?y=***"),
            ("http://user:pa/ss@h:1/", "http://***@h:1/"),
            ("http://h/?token=abc&flag&&k=", "http://h/?token=***&***&&k=***"),
            ("http://h/#s3cret", "http://h/#***"),
            ("localhost:9090", "localhost:9090"),
            ("user:s3cret@localhost:9090", "***@localhost:9090"),
        ] {
            let u = SecretUrl::new(raw);
            assert_eq!(u.to_string(), shown, "{raw}");
            assert_eq!(format!("{u:?}"), format!("SecretUrl({shown:?})"), "{raw}");
            assert_eq!(u.expose(), raw);
        }
    }

    #[test]
    fn a_secret_path_shows_the_origin_only() {
        for (raw, shown) in [
            (
                "https://hooks.slack.com/services/T0/B1/XYZ",
                "https://hooks.slack.com/…",
            ),
            ("https://h:8443/?token=abc", "https://h:8443/…"),
            ("https://u:p@h/", "https://***@h/"),
            ("https://h", "https://h"),
        ] {
            let u = SecretUrl::new(raw).secret_path();
            assert_eq!(u.to_string(), shown, "{raw}");
            assert!(!format!("{u:?}").contains("XYZ"));
        }
    }

    #[test]
    fn deserializes_from_a_string() {
        let u: SecretUrl = serde_json::from_str(r#""http://u:p@h/""#).unwrap();
        assert_eq!(u.expose(), "http://u:p@h/");
        assert_eq!(u.to_string(), "http://***@h/");
    }
}
