//! Serde helpers for a `Duration` as a person writes it in a configuration
//! file: `"500ms"`, `"30s"`, `"5m"`, `"1h"` (see [`parse_duration`]), or a
//! whole number of seconds.
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

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

use crate::strategy::parse_duration;

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

/// Reads `"30s"`-style text or a whole number of seconds.
///
/// # Errors
/// A custom error saying how to write a duration, for anything else.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Secs(u64),
        Text(String),
    }
    match Repr::deserialize(d)? {
        Repr::Secs(s) => Ok(Duration::from_secs(s)),
        Repr::Text(t) => parse_duration("duration", &t).map_err(|_| {
            serde::de::Error::custom(format!(
                "{t:?} is not a duration; write e.g. \"30s\", \"500ms\", \"5m\" or \"1h\""
            ))
        }),
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

#[cfg(test)]
mod tests {
    use super::*;

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
