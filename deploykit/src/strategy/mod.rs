//! The strategies: each compiles a fleet and a release into a [`Plan`](crate::Plan).
//!
//! * [`Rolling`] — batches of instances, drained and replaced concurrently
//!   within a batch, with a failure budget; an abort rolls every moved
//!   instance back, so the fleet ends on one release.
//! * [`Canary`] — a canary track takes a growing share of traffic, stage
//!   by stage, gated by metric analysis; promoted to stable or rolled back.
//! * [`Recreate`] — stop all, install, start all: the baseline with downtime.
//! * [`BlueGreen`] — prepare, smoke-test and warm up the idle environment,
//!   switch all traffic at once, roll back instantly.
//! * [`Ramped`] — a canary whose share rises along a linear or exponential
//!   curve, a small step every interval, analysed all the way.
//! * [`Shadow`] — the new release takes mirrored copies of requests only
//!   (clients are answered by stable), judged by its own metrics.
//! * [`DarkLaunch`] — the new release is reachable only through routing
//!   rules (testers, a segment) until promoted, then widens like a canary.
//! * [`Experiment`] — an A/B test: both releases side by side, sticky per
//!   user, decided by conversions with an always-valid sequential test.

mod blue_green;
mod canary;
mod file;
mod recreate;
mod rolling;
mod routed;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use blue_green::{BlueGreen, BlueGreenReport, KeepOld};
pub use canary::{Canary, Promotion};
pub use file::config_key;
pub use recreate::Recreate;
pub use rolling::Rolling;
pub use routed::{DarkLaunch, Experiment, RampCurve, Ramped, Shadow, ShadowThen, Treatment};

use crate::error::{Error, Result};
use crate::names::ReleaseId;
use crate::plan::FleetSnapshot;

/// A number of instances, given as a count or as a percent of a total.
///
/// Parses from `"3"` or `"25%"`. A percent rounds down and, where it is used
/// as a batch size, never below 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub enum CountOrPercent {
    /// An absolute count.
    Count(usize),
    /// A percent (0–100) of the total.
    Percent(u8),
}

impl CountOrPercent {
    /// Resolves against `total`: a count as is, a percent rounded down.
    pub fn of(self, total: usize) -> usize {
        match self {
            CountOrPercent::Count(n) => n,
            CountOrPercent::Percent(p) => total * usize::from(p) / 100,
        }
    }

    /// Parses `"3"` or `"25%"`, naming `field` in the error.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for anything but a non-negative whole number
    /// or a whole percent from 0 to 100.
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        let t = text.trim();
        if let Some(p) = t.strip_suffix('%') {
            match p.trim().parse::<u8>() {
                Ok(v) if v <= 100 => Ok(CountOrPercent::Percent(v)),
                _ => Err(Error::invalid(
                    field,
                    format!("{text:?} is not a percent from 0% to 100%; write e.g. \"25%\""),
                )),
            }
        } else {
            t.parse::<usize>().map(CountOrPercent::Count).map_err(|_| {
                Error::invalid(
                    field,
                    format!("{text:?} is not a whole number >= 0 or a percent; write e.g. \"2\" or \"25%\""),
                )
            })
        }
    }
}

impl fmt::Display for CountOrPercent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CountOrPercent::Count(n) => write!(f, "{n}"),
            CountOrPercent::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl From<CountOrPercent> for String {
    fn from(c: CountOrPercent) -> String {
        c.to_string()
    }
}

impl FromStr for CountOrPercent {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse("value", s)
    }
}

impl<'de> Deserialize<'de> for CountOrPercent {
    /// A whole number, or text as [`parse`](Self::parse) reads it; every
    /// other form gets a message saying what is expected (not serde's "did
    /// not match any variant").
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(CountOrPercentVisitor)
    }
}

struct CountOrPercentVisitor;

impl serde::de::Visitor<'_> for CountOrPercentVisitor {
    type Value = CountOrPercent;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a whole number >= 0 or a percent like \"25%\"")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<CountOrPercent, E> {
        usize::try_from(v).map(CountOrPercent::Count).map_err(|_| {
            E::custom(format!(
                "{v} is too large; use a whole number of instances or a percent like \"25%\""
            ))
        })
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<CountOrPercent, E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => Err(E::custom(format!(
                "{v} is negative; use a whole number >= 0 or a percent like \"25%\""
            ))),
        }
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<CountOrPercent, E> {
        Err(E::custom(format!(
            "{v} is not a whole number; use a whole number of instances (e.g. 2) or a percent like \"25%\""
        )))
    }

    fn visit_str<E: serde::de::Error>(self, t: &str) -> std::result::Result<CountOrPercent, E> {
        CountOrPercent::parse("value", t).map_err(|e| match e {
            Error::InvalidInput { message, .. } => E::custom(message),
            other => E::custom(other),
        })
    }
}

/// Parses a duration such as `"30s"`, `"500ms"`, `"5m"`, `"1h"` or a bare
/// number of seconds, naming `field` in the error.
///
/// # Errors
/// [`Error::InvalidInput`] for negative, non-numeric or unit-less-but-
/// fractional text, an unknown unit, or a duration longer than
/// [`duration_text::MAX`](crate::duration_text::MAX).
pub fn parse_duration(field: &str, text: &str) -> Result<Duration> {
    parse_duration_text(text).map_err(|e| {
        Error::invalid(
            field,
            match e {
                DurationTextError::Malformed => {
                    format!("{text:?} is not a duration; write e.g. \"30s\", \"500ms\", \"5m\" or \"1h\"")
                }
                DurationTextError::TooLong => crate::duration_text::too_long(text.trim()),
            },
        )
    })
}

/// Why text is not a duration [`parse_duration`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DurationTextError {
    /// Not a number with a known unit.
    Malformed,
    /// Longer than [`duration_text::MAX`](crate::duration_text::MAX).
    TooLong,
}

/// [`parse_duration`] without the field: what is wrong, as a kind.
pub(crate) fn parse_duration_text(text: &str) -> std::result::Result<Duration, DurationTextError> {
    use DurationTextError::{Malformed, TooLong};
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() || num.starts_with('.') {
        return Err(Malformed);
    }
    let value: f64 = num.parse().map_err(|_| Malformed)?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" => 3600.0,
        _ => return Err(Malformed),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs < 0.0 {
        return Err(Malformed);
    }
    if secs > crate::duration_text::MAX.as_secs_f64() {
        return Err(TooLong);
    }
    Ok(Duration::from_secs_f64(secs))
}

pub(crate) fn previous_map(
    fleet: &FleetSnapshot,
) -> std::collections::BTreeMap<crate::InstanceId, Option<ReleaseId>> {
    fleet
        .instances
        .iter()
        .map(|i| (i.backend.id.clone(), i.release.clone()))
        .collect()
}

/// The steps that replace one instance's release while it is out of
/// rotation: drain → wait until drained (at most `drain_timeout`)
/// → stop → install → start → health → enable. Rolling batches and the
/// canary's update of stable use the same sequence.
pub(crate) fn replace_steps(
    id: &crate::InstanceId,
    release: &ReleaseId,
    health: crate::HealthCheck,
    drain_timeout: Duration,
) -> Vec<crate::Step> {
    use crate::Step;
    let instance = || id.clone();
    vec![
        Step::Drain { instance: instance() },
        Step::AwaitDrained {
            instance: instance(),
            timeout: drain_timeout,
        },
        Step::Stop { instance: instance() },
        Step::Install {
            instance: instance(),
            release: release.clone(),
        },
        Step::Start { instance: instance() },
        Step::AwaitHealthy {
            instance: instance(),
            check: health,
        },
        Step::Enable { instance: instance() },
    ]
}

/// Checks a fleet for what every strategy needs: at least one instance and
/// unique ids.
pub(crate) fn check_fleet(fleet: &FleetSnapshot) -> Result<()> {
    if fleet.instances.is_empty() {
        return Err(Error::invalid(
            "instances",
            "the fleet is empty; add at least one instance",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for i in &fleet.instances {
        if !seen.insert(&i.backend.id) {
            return Err(Error::invalid(
                "instances",
                format!(
                    "the instance id {} appears more than once; give every instance its own id",
                    i.backend.id
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_or_percent_parses() {
        assert_eq!(CountOrPercent::parse("f", "3").unwrap(), CountOrPercent::Count(3));
        assert_eq!(
            CountOrPercent::parse("f", "25%").unwrap(),
            CountOrPercent::Percent(25)
        );
        assert_eq!(CountOrPercent::Percent(25).of(10), 2);
        for bad in ["-1", "abc", "101%", "2.5", "%", ""] {
            let e = CountOrPercent::parse("max_failures", bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains("max_failures"), "{bad}: {e}");
        }
        let v: CountOrPercent = serde_json::from_str("\"10%\"").unwrap();
        assert_eq!(v, CountOrPercent::Percent(10));
        assert!(serde_json::from_str::<CountOrPercent>("-2").is_err());
        assert_eq!(
            serde_json::from_str::<CountOrPercent>("3").unwrap(),
            CountOrPercent::Count(3)
        );
        for (json, says) in [
            ("1.5", "1.5 is not a whole number"),
            ("-2", "-2 is negative"),
            ("true", "a whole number >= 0 or a percent"),
            ("\"1.5\"", "\"1.5\" is not a whole number"),
        ] {
            let e = serde_json::from_str::<CountOrPercent>(json)
                .unwrap_err()
                .to_string();
            assert!(e.contains(says) && !e.contains("variant"), "{json}: {e}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("t", "30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("t", "500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("t", "5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("t", "2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("t", "8760h").unwrap(), crate::duration_text::MAX);
        let e = parse_duration("t", "8761h").unwrap_err().to_string();
        assert!(e.contains("longer than 8760h (365 days)"), "{e}");
        for bad in ["-5s", "abc", "5x", "", "s", ".5s", "8761h", "1e9s"] {
            let e = parse_duration("drain_timeout", bad).unwrap_err().to_string();
            assert!(e.contains("drain_timeout"), "{bad}: {e}");
        }
    }
}
