//! Chaos: faults injected on purpose, to prove that a deployment's gate
//! fires when it should.
//!
//! A canary whose analysis can never fail — metric queries that match
//! nothing, thresholds too loose — promotes a broken release as happily as a
//! good one. The only proof that the gate works is to break a canary on
//! purpose and watch it roll back. This module holds the faults
//! ([`Fault`]) and the tools that inject them:
//!
//! * network faults, through a [`FaultProxy`] placed in front of an
//!   instance: latency with jitter, a share of requests answered with a
//!   `5xx`, connection resets, requests held until they time out, bodies
//!   streamed at a bandwidth limit;
//! * process faults, through [`Instance::signal`](crate::Instance::signal):
//!   `SIGKILL`, or `SIGSTOP` followed by `SIGCONT` when the fault ends.
//!
//! A canary carries its chaos as [`ChaosSpec`]s (`[[strategy.canary.chaos]]`
//! in `deploykit.toml`): which fault, on which track, how long into which
//! stage, and what the deployment is expected to do about it — roll back
//! within a budget, or carry on. The executor injects each during its
//! stage's analysis ([`FaultInjector`] for network faults,
//! [`Instance::signal`](crate::Instance::signal) for process faults) and
//! clears it when its duration or the stage ends; [`verdicts`] reads the
//! run's events and says, entry by entry, whether the expectation held and
//! on what evidence. A chaos entry that did not cause the rollback it
//! expected is a failed verification, never a success.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::analysis::CheckOutcome;
use crate::error::DriverError;
use crate::event::{Event, EventKind};
use crate::names::InstanceId;
use crate::report::OutcomeKind;
use crate::traits::Backend;

pub mod drill;
#[cfg(feature = "chaos")]
mod proxy;
#[cfg(feature = "chaos")]
mod routed;

#[cfg(feature = "chaos")]
#[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
pub use proxy::{FaultId, FaultProxy, Origin, ProxyFaults, ProxyStats};
#[cfg(feature = "chaos")]
#[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
pub use routed::{undo_recorded, RoutedFaults};

/// One fault.
///
/// Its serde form names the kind in `kind` and its parameters beside it,
/// e.g. `{ kind = "http-error", status = 503, percent = 5 }`; durations are
/// written as in the rest of the configuration (`"200ms"`, `"5s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// Delay `percent` % of requests by `delay` plus up to `jitter` more.
    Latency {
        /// The fixed part of the delay.
        #[serde(with = "crate::duration_text")]
        delay: Duration,
        /// The most added at random on top of `delay`. Default 0.
        #[serde(default, with = "crate::duration_text")]
        jitter: Duration,
        /// The share of requests delayed, 1–100. Default 100.
        #[serde(default = "all")]
        percent: u8,
    },
    /// Answer `percent` % of requests with `status` instead of forwarding them.
    HttpError {
        /// The status, 500–599. Default 503.
        #[serde(default = "service_unavailable")]
        status: u16,
        /// The share of requests failed, 1–100.
        percent: u8,
    },
    /// Stream the bodies of `percent` % of requests, and of their answers,
    /// at no more than `rate` each way.
    Bandwidth {
        /// The most bytes per second, e.g. `"64KiB/s"` or `65536`.
        rate: ByteRate,
        /// The share of requests slowed, 1–100. Default 100.
        #[serde(default = "all")]
        percent: u8,
    },
    /// Reset (TCP RST) `percent` % of new connections at once.
    Reset {
        /// The share of connections reset, 1–100. Default 100.
        #[serde(default = "all")]
        percent: u8,
    },
    /// Hold every request unanswered, then close its connection after
    /// `after` (0: hold until the client gives up). In a
    /// `[[strategy.canary.chaos]]` entry, whose own `after` is when the
    /// fault starts, this hold is written `delay`.
    Timeout {
        /// How long a request is held. Default 0.
        #[serde(default, with = "crate::duration_text")]
        after: Duration,
    },
    /// `SIGKILL` the instance's process (it stays dead: a crash).
    Kill,
    /// `SIGSTOP` the instance's process, `SIGCONT` when the fault ends (a
    /// hang: connections open, nothing answered).
    Pause,
}

fn all() -> u8 {
    100
}

fn service_unavailable() -> u16 {
    503
}

/// The kind of a [`Fault`], for messages and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// [`Fault::Latency`].
    Latency,
    /// [`Fault::HttpError`].
    HttpError,
    /// [`Fault::Bandwidth`].
    Bandwidth,
    /// [`Fault::Reset`].
    Reset,
    /// [`Fault::Timeout`].
    Timeout,
    /// [`Fault::Kill`].
    Kill,
    /// [`Fault::Pause`].
    Pause,
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::Latency => "latency",
            FaultKind::HttpError => "http-error",
            FaultKind::Bandwidth => "bandwidth",
            FaultKind::Reset => "reset",
            FaultKind::Timeout => "timeout",
            FaultKind::Kill => "kill",
            FaultKind::Pause => "pause",
        })
    }
}

impl Fault {
    /// Its kind.
    pub fn kind(&self) -> FaultKind {
        match self {
            Fault::Latency { .. } => FaultKind::Latency,
            Fault::HttpError { .. } => FaultKind::HttpError,
            Fault::Bandwidth { .. } => FaultKind::Bandwidth,
            Fault::Reset { .. } => FaultKind::Reset,
            Fault::Timeout { .. } => FaultKind::Timeout,
            Fault::Kill => FaultKind::Kill,
            Fault::Pause => FaultKind::Pause,
        }
    }

    /// Whether it acts on the process (signals) rather than on traffic.
    pub fn is_process_fault(&self) -> bool {
        matches!(self, Fault::Kill | Fault::Pause)
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`ChaosError::Invalid`] naming `percent` (outside 1–100), `status`
    /// (outside 500–599), `delay` (0) or `rate` (0).
    pub fn validate(&self) -> Result<(), ChaosError> {
        let percent = |p: u8| {
            if (1..=100).contains(&p) {
                Ok(())
            } else {
                Err(ChaosError::invalid(
                    "percent",
                    format!("{p} is outside 1-100; give the share of requests the fault hits, e.g. 5"),
                ))
            }
        };
        match *self {
            Fault::Latency {
                delay, percent: p, ..
            } => {
                if delay.is_zero() {
                    return Err(ChaosError::invalid(
                        "delay",
                        "is 0; give the latency to add, e.g. \"200ms\"",
                    ));
                }
                percent(p)
            }
            Fault::HttpError { status, percent: p } => {
                if !(500..=599).contains(&status) {
                    return Err(ChaosError::invalid(
                        "status",
                        format!("{status} is not a server error; use 500-599, e.g. 503"),
                    ));
                }
                percent(p)
            }
            Fault::Bandwidth { rate, percent: p } => {
                if rate.bytes_per_second() == 0 {
                    return Err(ChaosError::invalid(
                        "rate",
                        "is 0, which would stall every body forever; give the bandwidth left, e.g. \"64KiB/s\"",
                    ));
                }
                percent(p)
            }
            Fault::Reset { percent: p } => percent(p),
            Fault::Timeout { .. } | Fault::Kill | Fault::Pause => Ok(()),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = crate::duration_text::format;
        match *self {
            Fault::Latency {
                delay,
                jitter,
                percent,
            } => {
                write!(f, "+{} latency", d(delay))?;
                if !jitter.is_zero() {
                    write!(f, " (jitter up to {})", d(jitter))?;
                }
                write!(f, " on {percent}% of requests")
            }
            Fault::HttpError { status, percent } => write!(f, "{status} for {percent}% of requests"),
            Fault::Bandwidth { rate, percent } => {
                write!(f, "bandwidth limited to {rate} on {percent}% of requests")
            }
            Fault::Reset { percent } => write!(f, "reset of {percent}% of connections"),
            Fault::Timeout { after } if after.is_zero() => f.write_str("every request held unanswered"),
            Fault::Timeout { after } => write!(f, "every request held {} then dropped", d(after)),
            Fault::Kill => f.write_str("SIGKILL of the process"),
            Fault::Pause => f.write_str("SIGSTOP of the process (SIGCONT at the end)"),
        }
    }
}

/// A bandwidth: bytes per second.
///
/// Written as an integer of bytes per second (`65536`) or as text with a
/// unit and an optional `/s`: `B`, `KB` (1000), `KiB` (1024), `MB`, `MiB`,
/// `GB`, `GiB`, e.g. `"64KiB/s"`; written back as text in the largest unit
/// that divides it.
///
/// ```
/// use deploykit::chaos::ByteRate;
/// let rate: ByteRate = "64KiB/s".parse().unwrap();
/// assert_eq!(rate.bytes_per_second(), 65_536);
/// assert_eq!(rate.to_string(), "64KiB/s");
/// assert!("64 kbit/s".parse::<ByteRate>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRate(u64);

/// The units a [`ByteRate`] is written in, largest first within each family.
const RATE_UNITS: [(&str, u64); 7] = [
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
    ("GB", 1_000_000_000),
    ("MB", 1_000_000),
    ("KB", 1_000),
    ("B", 1),
];

impl ByteRate {
    /// `bytes` per second.
    pub const fn new(bytes: u64) -> Self {
        ByteRate(bytes)
    }

    /// Bytes per second.
    pub const fn bytes_per_second(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, size) = RATE_UNITS
            .iter()
            .find(|(_, size)| self.0 != 0 && self.0.is_multiple_of(*size))
            .copied()
            .unwrap_or(("B", 1));
        write!(f, "{}{unit}/s", self.0 / size)
    }
}

/// Why a text is not a [`ByteRate`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("\"{0}\" is not a bandwidth; give bytes per second as an integer or with a unit, e.g. \"64KiB/s\", \"1MB/s\" or 65536")]
pub struct ByteRateError(String);

impl std::str::FromStr for ByteRate {
    type Err = ByteRateError;

    fn from_str(text: &str) -> Result<Self, ByteRateError> {
        let bad = || ByteRateError(text.to_owned());
        let t = text.trim();
        let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
        let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(digits);
        let number: u64 = number.parse().map_err(|_| bad())?;
        let unit = unit.trim();
        let size = if unit.is_empty() {
            1
        } else {
            RATE_UNITS
                .iter()
                .find(|(u, _)| u.eq_ignore_ascii_case(unit))
                .map(|(_, size)| *size)
                .ok_or_else(bad)?
        };
        number.checked_mul(size).map(ByteRate).ok_or_else(bad)
    }
}

impl Serialize for ByteRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteRate;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes per second, e.g. \"64KiB/s\" or 65536")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteRate, E> {
                Ok(ByteRate(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteRate, E> {
                u64::try_from(v).map(ByteRate).map_err(|_| {
                    E::custom(format!(
                        "{v} is negative; give bytes per second, e.g. \"64KiB/s\""
                    ))
                })
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteRate, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A signal sent to an instance's process by a process fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ProcessSignal {
    /// `SIGKILL`: the process dies at once, without cleanup.
    Kill,
    /// `SIGSTOP`: the process freezes; its sockets stay open.
    Stop,
    /// `SIGCONT`: a stopped process goes on.
    Cont,
}

impl ProcessSignal {
    /// The name `kill -s` takes.
    pub fn name(self) -> &'static str {
        match self {
            ProcessSignal::Kill => "KILL",
            ProcessSignal::Stop => "STOP",
            ProcessSignal::Cont => "CONT",
        }
    }
}

impl fmt::Display for ProcessSignal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SIG{}", self.name())
    }
}

/// What went wrong setting up or injecting a fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChaosError {
    /// A fault's parameter is not acceptable.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The field, e.g. `percent`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A fault proxy was asked to listen off loopback.
    #[error("the fault proxy listens on loopback only (127.0.0.0/8 or ::1), not {0}; give e.g. 127.0.0.1:0")]
    NotLoopback(SocketAddr),
    /// A process fault was given to a proxy.
    #[error("{0} is a process fault; send it with Instance::signal, not through a proxy")]
    NotANetworkFault(FaultKind),
    /// A socket operation failed.
    #[error("{action}: {source}")]
    Io {
        /// What was being done.
        action: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl ChaosError {
    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Self {
        ChaosError::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl From<ChaosError> for crate::Error {
    fn from(e: ChaosError) -> Self {
        match e {
            ChaosError::Invalid { field, message } => crate::Error::InvalidInput { field, message },
            other => crate::Error::Refused(other.to_string()),
        }
    }
}

/// Which track a chaos entry hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChaosTarget {
    /// The canary instances (the new release).
    #[default]
    Canary,
    /// The stable instances (the current release).
    Stable,
}

impl fmt::Display for ChaosTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChaosTarget::Canary => "canary",
            ChaosTarget::Stable => "stable",
        })
    }
}

/// What a chaos entry expects the deployment to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The analysis fails and the rollback completes within `within` of the
    /// injection.
    Rollback,
    /// The deployment carries on: no rollback.
    Continue,
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Rollback => "rollback",
            Expect::Continue => "continue",
        })
    }
}

/// One `[[strategy.canary.chaos]]` entry: a fault injected into a canary
/// stage, and the reaction expected.
///
/// ```
/// use deploykit::chaos::{ChaosSpec, Expect, Fault};
/// let spec: ChaosSpec = serde_json::from_str(
///     r#"{"stage": 2, "kind": "http-error", "percent": 5, "duration": "60s",
///         "expect": "rollback", "within": "90s"}"#,
/// ).unwrap();
/// assert_eq!(spec.fault, Fault::HttpError { status: 503, percent: 5 });
/// assert_eq!(spec.expect, Expect::Rollback);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "ChaosDoc", into = "ChaosDoc")]
pub struct ChaosSpec {
    /// The canary stage (1-based) whose analysis the fault runs in.
    pub stage: usize,
    /// How long into the stage the fault starts. Default 0.
    pub after: Duration,
    /// How long the fault lasts; `None` (the default): until the stage
    /// ends. A fault never outlives its stage.
    pub duration: Option<Duration>,
    /// The track hit. Default the canary.
    pub target: ChaosTarget,
    /// The fault.
    pub fault: Fault,
    /// What the deployment is expected to do.
    pub expect: Expect,
    /// With [`Expect::Rollback`]: the rollback must be complete this long
    /// after the injection at the latest. Required then.
    pub within: Option<Duration>,
}

/// The written form of a [`ChaosSpec`]: the fault's parameters beside the
/// entry's own keys, every key known (serde's `flatten` would let a typo
/// such as `precent` pass unnoticed).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChaosDoc {
    stage: usize,
    #[serde(default, with = "crate::duration_text")]
    after: Duration,
    #[serde(
        default,
        with = "crate::duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    duration: Option<Duration>,
    #[serde(default)]
    target: ChaosTarget,
    kind: FaultKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    percent: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(
        default,
        with = "crate::duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    delay: Option<Duration>,
    #[serde(
        default,
        with = "crate::duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    jitter: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate: Option<ByteRate>,
    expect: Expect,
    #[serde(
        default,
        with = "crate::duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    within: Option<Duration>,
}

impl TryFrom<ChaosDoc> for ChaosSpec {
    type Error = String;

    fn try_from(d: ChaosDoc) -> Result<Self, String> {
        let kind = d.kind;
        let refuse = |key: &str, set: bool| {
            if set {
                Err(format!("{key} does not apply to kind = \"{kind}\"; remove it"))
            } else {
                Ok(())
            }
        };
        if kind != FaultKind::Bandwidth {
            refuse("rate", d.rate.is_some())?;
        }
        let fault = match kind {
            FaultKind::Latency => {
                refuse("status", d.status.is_some())?;
                Fault::Latency {
                    delay: d.delay.ok_or(
                        "kind = \"latency\" needs delay, the latency to add, e.g. delay = \"200ms\"",
                    )?,
                    jitter: d.jitter.unwrap_or_default(),
                    percent: d.percent.unwrap_or(100),
                }
            }
            FaultKind::HttpError => {
                refuse("delay", d.delay.is_some())?;
                refuse("jitter", d.jitter.is_some())?;
                Fault::HttpError {
                    status: d.status.unwrap_or(503),
                    percent: d.percent.ok_or(
                        "kind = \"http-error\" needs percent, the share of requests failed, e.g. percent = 5",
                    )?,
                }
            }
            FaultKind::Bandwidth => {
                refuse("status", d.status.is_some())?;
                refuse("delay", d.delay.is_some())?;
                refuse("jitter", d.jitter.is_some())?;
                Fault::Bandwidth {
                    rate: d.rate.ok_or(
                        "kind = \"bandwidth\" needs rate, the most bytes per second, e.g. rate = \"64KiB/s\"",
                    )?,
                    percent: d.percent.unwrap_or(100),
                }
            }
            FaultKind::Reset => {
                refuse("status", d.status.is_some())?;
                refuse("delay", d.delay.is_some())?;
                refuse("jitter", d.jitter.is_some())?;
                Fault::Reset {
                    percent: d.percent.unwrap_or(100),
                }
            }
            FaultKind::Timeout => {
                refuse("status", d.status.is_some())?;
                refuse("percent", d.percent.is_some())?;
                refuse("jitter", d.jitter.is_some())?;
                Fault::Timeout {
                    after: d.delay.unwrap_or_default(),
                }
            }
            FaultKind::Kill | FaultKind::Pause => {
                refuse("status", d.status.is_some())?;
                refuse("percent", d.percent.is_some())?;
                refuse("delay", d.delay.is_some())?;
                refuse("jitter", d.jitter.is_some())?;
                if kind == FaultKind::Kill {
                    Fault::Kill
                } else {
                    Fault::Pause
                }
            }
        };
        Ok(ChaosSpec {
            stage: d.stage,
            after: d.after,
            duration: d.duration,
            target: d.target,
            fault,
            expect: d.expect,
            within: d.within,
        })
    }
}

impl From<ChaosSpec> for ChaosDoc {
    fn from(c: ChaosSpec) -> Self {
        let rate = match c.fault {
            Fault::Bandwidth { rate, .. } => Some(rate),
            _ => None,
        };
        let (percent, status, delay, jitter) = match c.fault {
            Fault::Latency {
                delay,
                jitter,
                percent,
            } => (
                Some(percent),
                None,
                Some(delay),
                (!jitter.is_zero()).then_some(jitter),
            ),
            Fault::HttpError { status, percent } => (Some(percent), Some(status), None, None),
            Fault::Reset { percent } | Fault::Bandwidth { percent, .. } => (Some(percent), None, None, None),
            Fault::Timeout { after } => (None, None, (!after.is_zero()).then_some(after), None),
            Fault::Kill | Fault::Pause => (None, None, None, None),
        };
        ChaosDoc {
            stage: c.stage,
            after: c.after,
            duration: c.duration,
            target: c.target,
            kind: c.fault.kind(),
            percent,
            status,
            delay,
            jitter,
            rate,
            expect: c.expect,
            within: c.within,
        }
    }
}

impl ChaosSpec {
    /// Checks the entry against a canary of `stages` stages held
    /// `stage_duration` each; fields are named `chaos[<index>].<field>`.
    ///
    /// # Errors
    /// [`crate::Error::InvalidInput`] naming `stage` (outside
    /// 1–`stages`), `after` (not shorter than the stage), `duration` (0),
    /// `within` (missing with `expect = "rollback"`, or 0), or a fault
    /// parameter (see [`Fault::validate`]).
    pub fn validate(&self, index: usize, stages: usize, stage_duration: Duration) -> crate::Result<()> {
        let field = |f: &str| format!("chaos[{index}].{f}");
        if !(1..=stages).contains(&self.stage) {
            return Err(crate::Error::invalid(
                field("stage"),
                format!(
                    "{} is not a stage of this canary (1-{stages}); name the stage the fault runs in",
                    self.stage
                ),
            ));
        }
        if self.after >= stage_duration {
            return Err(crate::Error::invalid(
                field("after"),
                format!(
                    "{} is not shorter than stage_duration ({}), so the fault would never start; shorten it",
                    crate::duration_text::format(self.after),
                    crate::duration_text::format(stage_duration)
                ),
            ));
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return Err(crate::Error::invalid(
                field("duration"),
                "is 0; give how long the fault lasts, e.g. \"60s\", or omit it to last until the stage ends",
            ));
        }
        match (self.expect, self.within) {
            (Expect::Rollback, None) => {
                return Err(crate::Error::invalid(
                    field("within"),
                    "is missing; with expect = \"rollback\" say how soon after the injection the rollback must be done, e.g. \"90s\"",
                ))
            }
            (_, Some(w)) if w.is_zero() => {
                return Err(crate::Error::invalid(
                    field("within"),
                    "is 0; no rollback is that fast; give a budget, e.g. \"90s\"",
                ))
            }
            _ => {}
        }
        self.fault.validate().map_err(|e| match e {
            ChaosError::Invalid { field: f, message } => crate::Error::invalid(field(&f), message),
            other => other.into(),
        })
    }
}

/// A chaos entry as a canary plan carries it, in its stage's
/// [`Step::Analyze`](crate::Step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosStep {
    /// The entry's index in the canary's `chaos` list.
    pub entry: usize,
    /// The fault.
    pub fault: Fault,
    /// The group whose instances it hits.
    pub group: crate::names::Group,
    /// Milliseconds into the stage it starts.
    pub after_ms: u64,
    /// Milliseconds it lasts; `None`: until the stage ends.
    pub duration_ms: Option<u64>,
}

impl fmt::Display for ChaosStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} on {} after {}",
            self.fault,
            self.group,
            secs(self.after_ms)
        )?;
        if let Some(d) = self.duration_ms {
            write!(f, " for {}", secs(d))?;
        }
        Ok(())
    }
}

/// Injects network faults for the executor: what stands between the load
/// balancer and an instance (a [`FaultProxy`] per instance, or a fake).
/// Process faults do not come here: they go to
/// [`Instance::signal`](crate::Instance::signal).
#[async_trait]
pub trait FaultInjector: Send + Sync + fmt::Debug {
    /// Starts `fault` on `instance`'s traffic.
    ///
    /// * Idempotent: yes; the same fault injected twice is active once.
    /// * Cancel-safe: yes; the fault may or may not be active, and
    ///   [`clear`](Self::clear) ends it either way.
    /// * On failure: the fault is not active.
    async fn inject(&self, instance: &Backend, fault: &Fault) -> Result<(), DriverError>;

    /// Ends `fault` on `instance`'s traffic.
    ///
    /// * Idempotent: yes; clearing a fault that is not active succeeds.
    /// * Cancel-safe: yes.
    /// * On failure: the fault may still be active.
    async fn clear(&self, instance: &Backend, fault: &Fault) -> Result<(), DriverError>;
}

/// The first analysis check after an injection that did not pass (a
/// failed rule, or no data, which is what a killed canary gives), or the
/// canary health watch tripping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrippedCheck {
    /// When, in milliseconds since the deployment started.
    pub at_ms: u64,
    /// The check's result, as a sentence.
    pub result: String,
    /// The statistical judges' evidence, each as a sentence.
    pub evidence: Vec<String>,
}

/// Whether one chaos entry's expectation held, and on what evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChaosVerdict {
    /// The entry's index in the canary's `chaos` list.
    pub entry: usize,
    /// The entry.
    pub spec: ChaosSpec,
    /// When the fault was injected (ms since the start), if it was.
    pub injected_at_ms: Option<u64>,
    /// The instances it hit.
    pub instances: Vec<InstanceId>,
    /// The first check at or after the injection that did not pass: an
    /// analysis check, or the canary health watch.
    pub tripped: Option<TrippedCheck>,
    /// Analysis checks that passed before the injection (a gate that never
    /// passes rolls back with or without the fault).
    #[serde(default)]
    pub checks_passed_before: u32,
    /// When the deployment finished rolled back (ms since the start).
    pub rolled_back_at_ms: Option<u64>,
    /// Whether the expectation held.
    pub passed: bool,
    /// Why, in words.
    pub explanation: String,
}

impl fmt::Display for ChaosVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "chaos[{}] {} on {} in stage {}, expect {}: {} — {}",
            self.entry,
            self.spec.fault,
            self.spec.target,
            self.spec.stage,
            self.spec.expect,
            if self.passed { "PASSED" } else { "FAILED" },
            self.explanation
        )
    }
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// Each chaos entry's verdict, from the events of the run that carried
/// them (in order).
///
/// An entry never injected (its stage not reached, or the injection
/// failed) fails. With [`Expect::Rollback`] it passes when the deployment
/// finished rolled back no later than `within` after the injection; with
/// [`Expect::Continue`], when the deployment did not roll back.
pub fn verdicts(specs: &[ChaosSpec], events: &[Event]) -> Vec<ChaosVerdict> {
    let finished = events.iter().rev().find_map(|e| match &e.kind {
        EventKind::DeploymentFinished { outcome, .. } => Some((e.elapsed_ms, *outcome)),
        _ => None,
    });
    let rolled_back_at = match finished {
        Some((at, OutcomeKind::RolledBack | OutcomeKind::RollbackFailed)) => Some(at),
        _ => None,
    };
    specs
        .iter()
        .enumerate()
        .map(|(entry, spec)| {
            let injected = events.iter().find_map(|e| match &e.kind {
                EventKind::ChaosInjected {
                    entry: n, instances, ..
                } if *n == entry => Some((e.elapsed_ms, instances.clone())),
                _ => None,
            });
            let failure = events.iter().find_map(|e| match &e.kind {
                EventKind::ChaosFailed { entry: n, message } if *n == entry => Some(message.clone()),
                _ => None,
            });
            let tripped = injected.as_ref().and_then(|(at, _)| {
                events.iter().find_map(|e| match &e.kind {
                    EventKind::AnalysisResult { result, evidence, .. }
                        if e.elapsed_ms >= *at && *result != CheckOutcome::Pass =>
                    {
                        Some(TrippedCheck {
                            at_ms: e.elapsed_ms,
                            result: result.to_string(),
                            evidence: evidence.iter().map(ToString::to_string).collect(),
                        })
                    }
                    EventKind::CanaryUnhealthy {
                        instance,
                        failures,
                        detail,
                        ..
                    } if e.elapsed_ms >= *at => Some(TrippedCheck {
                        at_ms: e.elapsed_ms,
                        result: format!(
                            "canary {instance} failed {failures} health probe(s) in a row: {detail}"
                        ),
                        evidence: Vec::new(),
                    }),
                    _ => None,
                })
            });
            let checks_passed_before = injected.as_ref().map_or(0, |(at, _)| {
                let passes = events.iter().filter(|e| {
                    e.elapsed_ms < *at
                        && matches!(
                            &e.kind,
                            EventKind::AnalysisResult {
                                result: CheckOutcome::Pass,
                                ..
                            }
                        )
                });
                u32::try_from(passes.count()).unwrap_or(u32::MAX)
            });
            let (passed, explanation) = match (&injected, spec.expect) {
                (None, _) => (
                    false,
                    match failure {
                        Some(m) => format!("the fault could not be injected: {m}"),
                        None => format!(
                            "the fault was never injected: the deployment did not reach {} into stage {}",
                            crate::duration_text::format(spec.after),
                            spec.stage
                        ),
                    },
                ),
                (Some((at, _)), Expect::Rollback) => {
                    let within = spec.within.unwrap_or_default();
                    let budget = u64::try_from(within.as_millis()).unwrap_or(u64::MAX);
                    match rolled_back_at {
                        Some(done) if done.saturating_sub(*at) <= budget => (
                            true,
                            format!(
                                "rolled back {} after the injection (budget {})",
                                secs(done.saturating_sub(*at)),
                                crate::duration_text::format(within)
                            ),
                        ),
                        Some(done) => (
                            false,
                            format!(
                                "rolled back, but {} after the injection, over the budget of {}",
                                secs(done.saturating_sub(*at)),
                                crate::duration_text::format(within)
                            ),
                        ),
                        None => (
                            false,
                            "the gate did not fire: no rollback followed the injection (check that the \
                             metric queries match the instances' traffic and that the thresholds can fail)"
                                .to_owned(),
                        ),
                    }
                }
                (Some(_), Expect::Continue) => match rolled_back_at {
                    None => (true, "the deployment carried on, as expected".to_owned()),
                    Some(_) => (
                        false,
                        "the deployment rolled back, but was expected to carry on".to_owned(),
                    ),
                },
            };
            ChaosVerdict {
                entry,
                spec: spec.clone(),
                injected_at_ms: injected.as_ref().map(|(at, _)| *at),
                instances: injected.map(|(_, i)| i).unwrap_or_default(),
                tripped,
                checks_passed_before,
                rolled_back_at_ms: rolled_back_at,
                passed,
                explanation,
            }
        })
        .collect()
}
