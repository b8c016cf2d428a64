//! Validated names: instance ids, release ids, group (track / environment)
//! names and backend addresses.
//!
//! Every name that can end up in a command line, a load-balancer config file
//! or a runtime-API command passes through one of these types first, so the
//! drivers never see an unchecked string. The rules are deliberately narrow:
//! `[A-Za-z0-9._-]`, 1–128 characters, no `..`, no leading `-` (which a
//! command would read as an option) and no leading `.` (hidden names are
//! deploykit's own, such as the `.partial-*` uploads its cleanup removes).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

const MAX_NAME_LEN: usize = 128;

/// Checks `value` against the name rules and returns a [`Error::InvalidInput`]
/// naming `field` when it breaks one.
///
/// # Errors
/// When `value` is empty, longer than 128 characters, contains `..`, starts
/// with `-` or `.`, or has a character outside `[A-Za-z0-9._-]`.
pub fn validate_name(field: &str, value: &str) -> Result<()> {
    let fail = |problem: String| {
        Err(Error::invalid(
            field,
            format!("{problem}; use 1-{MAX_NAME_LEN} characters from [A-Za-z0-9._-], not starting with '-' or '.'"),
        ))
    };
    if value.is_empty() {
        return fail("is empty".into());
    }
    if value.len() > MAX_NAME_LEN {
        return fail(format!("is {} characters long", value.len()));
    }
    if value == "." || value == ".." || value.contains("..") {
        return fail(format!("{value:?} contains '..'"));
    }
    if value.starts_with('-') {
        return fail(format!("{value:?} starts with '-'"));
    }
    if value.starts_with('.') {
        return fail(format!(
            "{value:?} starts with '.' (hidden names are deploykit's own, e.g. partial uploads)"
        ));
    }
    if let Some(bad) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return fail(format!("{value:?} contains the character {bad:?}"));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps `value`.
            ///
            /// # Errors
            /// [`Error::InvalidInput`] naming the field when `value` breaks the
            /// name rules of [this module](crate::names).
            pub fn new(value: impl Into<String>) -> Result<Self> {
                let value = value.into();
                validate_name($field, &value)?;
                Ok(Self(value))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// The id of one instance, unique within a fleet (`web-1`, `i-0abc`).
    InstanceId,
    "instance id"
);
name_type!(
    /// The id of a release (`v2.3.1`, `2026-11-27_1200`, a commit hash).
    ReleaseId,
    "release id"
);
name_type!(
    /// A group of instances that traffic is routed to as a whole: a canary
    /// *track* (`stable`, `canary`) or a blue-green *environment* (`blue`,
    /// `green`).
    Group,
    "group"
);

impl Group {
    /// The default group of an instance that names none.
    pub fn default_group() -> Self {
        Self("default".into())
    }
}

/// A validated `host:port` address of a backend.
///
/// The host is an IPv4 address, an IPv6 address in brackets (`[::1]`), or a
/// DNS name of letters, digits, `-` and `.`; the port is 1–65535. Nothing
/// else (spaces, `;`, `{`, newlines, …) gets through, so an address can be
/// rendered into a load-balancer config file safely.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct Address {
    host: String,
    port: u16,
}

impl Address {
    /// Parses and validates `host:port`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for the field `address` when the text is not a
    /// valid `host:port`.
    pub fn parse(value: &str) -> Result<Self> {
        let bad = |why: &str| {
            Err(Error::invalid(
                "address",
                format!("{value:?} {why}; write host:port, e.g. 10.0.0.5:8080 or [::1]:8080 or web-1.internal:8080"),
            ))
        };
        let (host, port) = if let Some(rest) = value.strip_prefix('[') {
            let Some((h, p)) = rest.split_once("]:") else {
                return bad("is not [ipv6]:port");
            };
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return bad("has an invalid IPv6 address");
            }
            (format!("[{h}]"), p)
        } else {
            let Some((h, p)) = value.rsplit_once(':') else {
                return bad("has no port");
            };
            let host_ok = !h.is_empty()
                && h.len() <= 253
                && !h.starts_with(['-', '.'])
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
            if !host_ok {
                return bad("has an invalid host");
            }
            (h.to_string(), p)
        };
        let port: u16 = match p_parse(port) {
            Some(p) => p,
            None => return bad("has an invalid port (must be 1-65535)"),
        };
        Ok(Self { host, port })
    }

    /// The host part (IPv6 hosts keep their brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The endpoints this address reaches, for telling whether two
    /// addresses written differently are one: an IP address in its
    /// canonical form (`[0:0::1]` is `[::1]`, `[::ffff:127.0.0.1]` is
    /// `127.0.0.1`), `localhost` as both `127.0.0.1` and `[::1]` (it resolves
    /// to either), any other name in lower case without a trailing dot.
    /// Names are not resolved: two names of one machine are not caught.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        let port = self.port;
        let ip = |ip: IpAddr| Endpoint::Ip(SocketAddr::new(ip.to_canonical(), port));
        let bare = self.host.trim_start_matches('[').trim_end_matches(']');
        if let Ok(addr) = bare.parse::<IpAddr>() {
            return vec![ip(addr)];
        }
        let name = self.host.trim_end_matches('.').to_ascii_lowercase();
        if name == "localhost" {
            return vec![
                ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                ip(IpAddr::V6(Ipv6Addr::LOCALHOST)),
            ];
        }
        vec![Endpoint::Name { host: name, port }]
    }

    /// Whether `self` and `other` reach a common endpoint (see
    /// [`endpoints`](Self::endpoints)): `[::1]:80` and `[0000::1]:80` do,
    /// `localhost:80` and `127.0.0.1:80` do, `[::1]:80` and `[::1]:81` do not.
    pub fn same_endpoint(&self, other: &Address) -> bool {
        let theirs = other.endpoints();
        self.endpoints().iter().any(|e| theirs.contains(e))
    }
}

/// One endpoint an [`Address`] reaches: the key under which addresses are
/// compared for duplicates.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// An IP address (canonical: IPv4-mapped IPv6 as IPv4) and port.
    Ip(SocketAddr),
    /// A DNS name (lower case, no trailing dot) and port.
    Name {
        /// The name.
        host: String,
        /// The port.
        port: u16,
    },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Ip(a) => write!(f, "{a}"),
            Endpoint::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

fn p_parse(p: &str) -> Option<u16> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => None,
        Ok(v) => Some(v),
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

impl FromStr for Address {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl From<Address> for String {
    fn from(a: Address) -> String {
        a.to_string()
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for ok in ["web-1", "i-0abc", "v2.3.1", "2026_11_27", "a", "release.tar"] {
            assert!(InstanceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn bad_names_are_rejected_with_the_field() {
        for bad in [
            "", "..", ".", "a..b", "-rf", "a b", "a;b", "a/b", "a\nb", "a{b", "ä", "$(x)",
        ] {
            let err = InstanceId::new(bad).unwrap_err().to_string();
            assert!(err.contains("instance id"), "{bad:?}: {err}");
        }
        assert!(InstanceId::new("x".repeat(129)).is_err());
        let err = ReleaseId::new("v1 ; rm").unwrap_err().to_string();
        assert!(err.contains("release id") && err.contains("' '"), "{err}");
    }

    #[test]
    fn names_starting_with_a_dot_are_refused() {
        // Hidden names are deploykit's own (`.partial-*` uploads, which the
        // cleanup removes): a release named so would be deleted as one.
        for bad in [".partial-x", ".v1", ".hidden"] {
            let err = ReleaseId::new(bad).unwrap_err().to_string();
            assert!(
                err.contains("release id")
                    && err.contains("starts with '.'")
                    && err.contains("not starting with '-' or '.'"),
                "{bad:?}: {err}"
            );
            assert!(InstanceId::new(bad).is_err(), "{bad:?}");
        }
        assert!(ReleaseId::new("v1.partial").is_ok());
    }

    #[test]
    fn addresses_parse_and_reject() {
        let a = Address::parse("127.0.0.1:8080").unwrap();
        assert_eq!((a.host(), a.port()), ("127.0.0.1", 8080));
        assert_eq!(Address::parse("[::1]:80").unwrap().to_string(), "[::1]:80");
        assert_eq!(
            Address::parse("web-1.internal:443").unwrap().host(),
            "web-1.internal"
        );
        for bad in [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "127.0.0.1:80a",
            "a b:80",
            "a;b:80",
            "a{:80",
            "a\n:80",
            ":80",
            "-x:80",
            "[zz]:80",
            "host:+80",
        ] {
            let err = Address::parse(bad).unwrap_err().to_string();
            assert!(err.contains("address"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn one_endpoint_written_differently_is_the_same_endpoint() {
        let a = |s: &str| Address::parse(s).unwrap();
        for (x, y) in [
            ("[::1]:8080", "[0:0::1]:8080"),
            ("[::1]:8080", "[0000::1]:8080"),
            ("[0:0::1]:8080", "[0000::1]:8080"),
            ("localhost:8080", "127.0.0.1:8080"),
            ("localhost:8080", "[::1]:8080"),
            ("LocalHost.:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "[::ffff:127.0.0.1]:8080"),
            ("[2001:db8::1]:80", "[2001:0DB8:0:0:0:0:0:1]:80"),
            ("web-1.internal:80", "WEB-1.internal.:80"),
        ] {
            assert!(a(x).same_endpoint(&a(y)), "{x} {y}");
            assert!(a(y).same_endpoint(&a(x)), "{y} {x}");
        }
        for (x, y) in [
            ("[::1]:8080", "[::1]:8081"),
            ("[::1]:8080", "127.0.0.1:8080"),
            ("127.0.0.1:8080", "127.0.0.2:8080"),
            ("localhost:8080", "localhost:8081"),
            ("web-1:80", "web-2:80"),
            ("web-1:80", "10.0.0.1:80"),
        ] {
            assert!(!a(x).same_endpoint(&a(y)), "{x} {y}");
        }
        assert_eq!(a("[0000::1]:80").endpoints()[0].to_string(), "[::1]:80");
        assert_eq!(a("Web.X.:80").endpoints()[0].to_string(), "web.x:80");
    }

    #[test]
    fn serde_round_trip_validates() {
        let id: InstanceId = serde_json::from_str("\"web-1\"").unwrap();
        assert_eq!(id.as_str(), "web-1");
        assert!(serde_json::from_str::<InstanceId>("\"web 1\"").is_err());
        let a: Address = serde_json::from_str("\"10.0.0.1:80\"").unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), "\"10.0.0.1:80\"");
    }
}
