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
//!   `5xx`, connection resets, requests held until they time out;
//! * process faults, through [`Instance::signal`](crate::Instance::signal):
//!   `SIGKILL`, or `SIGSTOP` followed by `SIGCONT` when the fault ends.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(feature = "chaos")]
mod proxy;

#[cfg(feature = "chaos")]
#[cfg_attr(docsrs, doc(cfg(feature = "chaos")))]
pub use proxy::{FaultId, FaultProxy, ProxyStats};

/// One fault.
///
/// Its serde form names the kind in `kind` and its parameters beside it,
/// e.g. `{ kind = "http-error", status = 503, percent = 5 }`; durations are
/// written as in the rest of the configuration (`"200ms"`, `"5s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Reset (TCP RST) `percent` % of new connections at once.
    Reset {
        /// The share of connections reset, 1–100. Default 100.
        #[serde(default = "all")]
        percent: u8,
    },
    /// Hold every request unanswered, then close its connection after
    /// `after` (0: hold until the client gives up).
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
    /// (outside 500–599) or `delay` (0).
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
            Fault::Reset { percent } => write!(f, "reset of {percent}% of connections"),
            Fault::Timeout { after } if after.is_zero() => f.write_str("every request held unanswered"),
            Fault::Timeout { after } => write!(f, "every request held {} then dropped", d(after)),
            Fault::Kill => f.write_str("SIGKILL of the process"),
            Fault::Pause => f.write_str("SIGSTOP of the process (SIGCONT at the end)"),
        }
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
    fn invalid(field: &str, message: impl Into<String>) -> Self {
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
