//! `sem_ver` comparisons with flagd's rules: an optional `v`/`V` prefix,
//! `1` and `1.2` read as `1.0.0` and `1.2.0`, pre-releases sort before their
//! release, build metadata is ignored, and anything else is no version.

use std::cmp::Ordering;

/// A parsed semantic version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    major: u64,
    minor: u64,
    patch: u64,
    pre: Vec<String>,
}

impl Version {
    /// Parses `text`, or `None` when it is not a version.
    pub(crate) fn parse(text: &str) -> Option<Version> {
        let text = text.strip_prefix(['v', 'V']).unwrap_or(text);
        let (text, _build) = match text.split_once('+') {
            Some((t, b)) if valid_idents(b, false) => (t, b),
            Some(_) => return None,
            None => (text, ""),
        };
        let (core, pre) = match text.split_once('-') {
            Some((c, p)) if valid_idents(p, true) => (c, p.split('.').map(str::to_owned).collect()),
            Some(_) => return None,
            None => (text, Vec::new()),
        };
        let mut parts = core.split('.');
        let major = number(parts.next()?)?;
        let minor = parts.next().map(number).unwrap_or(Some(0))?;
        let patch = parts.next().map(number).unwrap_or(Some(0))?;
        let short = core.split('.').count() < 3;
        // A shorthand (`1`, `1.2`) cannot carry a pre-release or build suffix.
        if parts.next().is_some() || (short && (!pre.is_empty() || text.len() != core.len())) {
            return None;
        }
        Some(Version {
            major,
            minor,
            patch,
            pre,
        })
    }

    fn cmp_major(&self, other: &Version) -> Ordering {
        self.major.cmp(&other.major)
    }

    fn cmp_minor(&self, other: &Version) -> Ordering {
        (self.major, self.minor).cmp(&(other.major, other.minor))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.major, self.minor, self.patch)
            .cmp(&(other.major, other.minor, other.patch))
            .then_with(|| match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                (false, false) => cmp_pre(&self.pre, &other.pre),
            })
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

fn cmp_pre(a: &[String], b: &[String]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            (Ok(_), Err(_)) => Ordering::Less,
            (Err(_), Ok(_)) => Ordering::Greater,
            (Err(_), Err(_)) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.len().cmp(&b.len())
}

/// A numeric identifier: digits, no leading zero.
fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok()
}

fn valid_idents(s: &str, numeric_no_leading_zero: bool) -> bool {
    s.split('.').all(|id| {
        !id.is_empty()
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !(numeric_no_leading_zero
                && id.len() > 1
                && id.starts_with('0')
                && id.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The comparison operators of `sem_ver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SemverOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    /// `^`: same major version.
    Major,
    /// `~`: same major and minor version.
    Minor,
}

impl SemverOp {
    /// The operator spelled `text`, if it is one.
    pub(crate) fn parse(text: &str) -> Option<SemverOp> {
        Some(match text {
            "=" => SemverOp::Eq,
            "!=" => SemverOp::Ne,
            "<" => SemverOp::Lt,
            "<=" => SemverOp::Le,
            ">" => SemverOp::Gt,
            ">=" => SemverOp::Ge,
            "^" => SemverOp::Major,
            "~" => SemverOp::Minor,
            _ => return None,
        })
    }

    /// Every operator's spelling, for error messages.
    pub(crate) const ALL: &'static str = "=, !=, <, <=, >, >=, ^, ~";

    pub(crate) fn holds(self, a: &Version, b: &Version) -> bool {
        match self {
            SemverOp::Eq => a == b,
            SemverOp::Ne => a != b,
            SemverOp::Lt => a < b,
            SemverOp::Le => a <= b,
            SemverOp::Gt => a > b,
            SemverOp::Ge => a >= b,
            SemverOp::Major => a.cmp_major(b) == Ordering::Equal,
            SemverOp::Minor => a.cmp_minor(b) == Ordering::Equal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap_or_else(|| panic!("{s} should parse"))
    }

    #[test]
    fn shorthand_prefix_and_build_metadata() {
        assert_eq!(v("1"), v("1.0.0"));
        assert_eq!(v("V1.2"), v("1.2.0"));
        assert_eq!(v("1.0.0+build").cmp(&v("1.0.0+other")), Ordering::Equal);
        assert!(Version::parse("2.0.0.0").is_none());
        assert!(Version::parse("not-a-version").is_none());
        assert!(Version::parse("01.0.0").is_none());
    }

    #[test]
    fn prereleases_sort_before_their_release() {
        assert!(v("2.0.0-alpha") < v("2.0.0"));
        assert!(v("1.0.0-alpha") < v("1.0.0-alpha.1"));
        assert!(v("1.0.0-alpha.1") < v("1.0.0-beta"));
        assert!(v("1.0.0-2") < v("1.0.0-10"));
    }

    #[test]
    fn caret_and_tilde() {
        assert!(SemverOp::Major.holds(&v("3.1.0"), &v("3.0.0")));
        assert!(!SemverOp::Minor.holds(&v("3.1.0"), &v("3.0.0")));
        assert!(SemverOp::Minor.holds(&v("3.0.1"), &v("3.0.0")));
    }
}
