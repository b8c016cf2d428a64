//! Serde helpers for a `Duration` as a person writes it in a configuration
//! file: `"500ms"`, `"30s"`, `"5m"`, `"1h"` (see [`parse_duration`]), or a
//! whole number of seconds; in either form at most [`MAX`].
//!
//! The strategies' serde form (the `[strategy.*]` sections of
//! `deploykit.toml`) uses these; plans and journals keep whole milliseconds,
//! which is why a bare number here means seconds and there milliseconds.
//!
//! ```
//! use std::time::Duration;
//! #[derive(serde::Deserialize)]
//! struct Section {
//!     #[serde(with = "deploykit::duration_text")]
//!     timeout: Duration,
//! }
//! let s: Section = serde_json::from_str(r#"{"timeout": "1.5s"}"#).unwrap();
//! assert_eq!(s.timeout, Duration::from_millis(1500));
//! let s: Section = serde_json::from_str(r#"{"timeout": 30}"#).unwrap();
//! assert_eq!(s.timeout, Duration::from_secs(30));
//! assert_eq!(deploykit::duration_text::format(Duration::from_secs(300)), "5m");
//! ```

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserializer, Serializer};

use crate::strategy::parse_duration;

/// The longest duration a configuration may hold, in every form: 365 days.
/// Anything longer is a typo, and the bound keeps every deadline and sum
/// computed from configured durations far from overflowing.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The refusal of `written` (text or a number of seconds) as longer than
/// [`MAX`].
pub(crate) fn too_long(written: &str) -> String {
    format!(
        "{written} is longer than 8760h (365 days), the longest duration accepted; \
         write e.g. \"30s\", \"5m\" or \"24h\""
    )
}

/// `secs` whole seconds, when at most [`MAX`].
///
/// # Errors
/// The message of [`too_long`].
pub(crate) fn from_secs(secs: u64) -> Result<Duration, String> {
    if secs > MAX.as_secs() {
        return Err(too_long(&format!("{secs} seconds")));
    }
    Ok(Duration::from_secs(secs))
}

/// Writes `d` in the largest unit that holds it exactly: `"1h"`, `"5m"`,
/// `"30s"`, `"500ms"`; anything finer as fractional seconds.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}s", d.as_secs_f64())
    } else if ms == 0 {
        "0s".into()
    } else if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Serializes as [`format()`] writes it.
///
/// # Errors
/// Those of the serializer.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

/// Reads `"30s"`-style text or a whole number of seconds, at most [`MAX`].
///
/// # Errors
/// A custom error saying how to write a duration, for anything else (a
/// negative or fractional number, text that is no duration, or one longer
/// than [`MAX`]).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    d.deserialize_any(DurationVisitor)
}

/// What [`deserialize`] reads, with a message per wrong form rather than
/// serde's "did not match any variant".
struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a duration such as \"30s\", \"500ms\", \"5m\" or a whole number of seconds")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
        from_secs(v).map_err(E::custom)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "{v} is negative; write a duration such as \"30s\" or a whole number of seconds"
            ))),
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Duration, E> {
        Err(E::custom(too_long(&format!("{v} seconds"))))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Duration, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) if v > 0 => self.visit_u128(v.unsigned_abs()),
            Err(_) => self.visit_i64(-1),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Duration, E> {
        Err(E::custom(format!(
            "{v} is not a whole number of seconds; write a fraction as text, e.g. \"{v}s\" or \"500ms\""
        )))
    }

    fn visit_str<E: de::Error>(self, t: &str) -> Result<Duration, E> {
        parse_duration("duration", t).map_err(|e| match e {
            crate::Error::InvalidInput { message, .. } => E::custom(message),
            other => E::custom(other),
        })
    }
}

/// The same for an `Option<Duration>` (absent or `null` for `None`).
pub mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes `Some` as [`format()`](super::format()) writes it, `None` as
    /// nothing.
    ///
    /// # Errors
    /// Those of the serializer.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&super::format(*d)),
            None => s.serialize_none(),
        }
    }

    /// Reads what [`deserialize`](super::deserialize) reads, or nothing.
    ///
    /// # Errors
    /// As [`deserialize`](super::deserialize).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(deserialize_with = "super::deserialize")] Duration);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

/// The same for a setting a person may turn off: `"off"` (or `false`) is
/// `None`, written back as `"off"`; anything else reads as
/// [`deserialize`] reads it.
///
/// ```
/// use std::time::Duration;
/// #[derive(serde::Deserialize)]
/// struct Section {
///     #[serde(with = "deploykit::duration_text::or_off")]
///     every: Option<Duration>,
/// }
/// let s: Section = serde_json::from_str(r#"{"every": "off"}"#).unwrap();
/// assert_eq!(s.every, None);
/// let s: Section = serde_json::from_str(r#"{"every": "2s"}"#).unwrap();
/// assert_eq!(s.every, Some(Duration::from_secs(2)));
/// ```
pub mod or_off {
    use std::fmt;
    use std::time::Duration;

    use serde::de::{self, Visitor};
    use serde::{Deserializer, Serializer};

    use super::DurationVisitor;

    /// The word that turns the setting off.
    pub const OFF: &str = "off";

    /// Serializes `Some` as [`format()`](super::format()) writes it, `None`
    /// as `"off"`.
    ///
    /// # Errors
    /// Those of the serializer.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format(*d)),
            None => s.serialize_str(OFF),
        }
    }

    /// Reads `"off"` or `false` as `None`, a duration as `Some`.
    ///
    /// # Errors
    /// As [`deserialize`](super::deserialize), and `true` (which says on,
    /// but not how often).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(OrOff)
    }

    struct OrOff;

    impl Visitor<'_> for OrOff {
        type Value = Option<Duration>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"1s\" or \"500ms\", or \"off\"")
        }

        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            if v {
                Err(E::custom(
                    "true does not say how often; write a duration such as \"1s\", or \"off\"",
                ))
            } else {
                Ok(None)
            }
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            DurationVisitor.visit_u64(v).map(Some)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            DurationVisitor.visit_i64(v).map(Some)
        }

        fn visit_u128<E: de::Error>(self, v: u128) -> Result<Self::Value, E> {
            DurationVisitor.visit_u128(v).map(Some)
        }

        fn visit_i128<E: de::Error>(self, v: i128) -> Result<Self::Value, E> {
            DurationVisitor.visit_i128(v).map(Some)
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            DurationVisitor.visit_f64(v).map(Some)
        }

        fn visit_str<E: de::Error>(self, t: &str) -> Result<Self::Value, E> {
            if t.trim().eq_ignore_ascii_case(OFF) {
                return Ok(None);
            }
            DurationVisitor
                .visit_str(t)
                .map(Some)
                .map_err(|e: E| E::custom(format!("{e}; or \"off\" to turn it off")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Section {
        #[serde(with = "super")]
        #[allow(dead_code)]
        t: Duration,
    }

    fn refusal(json: &str) -> String {
        serde_json::from_str::<Section>(&format!("{{\"t\": {json}}}"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn one_bound_in_every_form() {
        for json in ["31536000", "\"8760h\"", "\"525600m\""] {
            let s: Section = serde_json::from_str(&format!("{{\"t\": {json}}}")).unwrap();
            assert_eq!(s.t, MAX, "{json}");
        }
        for json in ["31536001", "18446744073709551615", "\"8761h\"", "\"31536001s\""] {
            let e = refusal(json);
            assert!(e.contains("longer than 8760h (365 days)"), "{json}: {e}");
        }
        assert!(refusal("-5").contains("-5 is negative"), "{}", refusal("-5"));
        let e = refusal("1.5");
        assert!(
            e.contains("not a whole number of seconds") && e.contains("\"1.5s\""),
            "{e}"
        );
        assert!(!refusal("true").contains("variant"), "{}", refusal("true"));
    }

    #[derive(Debug, serde::Deserialize, serde::Serialize)]
    struct Switch {
        #[serde(with = "super::or_off")]
        t: Option<Duration>,
    }

    #[test]
    fn off_reads_and_writes_as_off_and_anything_else_as_a_duration() {
        let read = |json: &str| serde_json::from_str::<Switch>(&format!("{{\"t\": {json}}}")).map(|s| s.t);
        assert_eq!(read("\"off\"").unwrap(), None);
        assert_eq!(read("false").unwrap(), None);
        assert_eq!(read("\"1s\"").unwrap(), Some(Duration::from_secs(1)));
        assert_eq!(read("2").unwrap(), Some(Duration::from_secs(2)));
        let e = read("true").unwrap_err().to_string();
        assert!(e.contains("true does not say how often"), "{e}");
        let e = read("\"often\"").unwrap_err().to_string();
        assert!(e.contains("or \"off\" to turn it off"), "{e}");
        assert!(read("-1").unwrap_err().to_string().contains("-1 is negative"));
        for t in [None, Some(Duration::from_millis(500))] {
            let text = serde_json::to_string(&Switch { t }).unwrap();
            assert_eq!(read(&text[5..text.len() - 1]).unwrap(), t, "{text}");
        }
        assert_eq!(
            serde_json::to_string(&Switch { t: None }).unwrap(),
            r#"{"t":"off"}"#
        );
    }

    #[test]
    fn formats_round_trip() {
        for ms in [
            0, 1, 500, 1000, 1500, 30_000, 90_000, 300_000, 3_600_000, 5_400_000,
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(parse_duration("d", &format(d)).unwrap(), d, "{}", format(d));
        }
        assert_eq!(format(Duration::from_millis(90_000)), "90s");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    }
}
