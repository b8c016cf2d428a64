//! The one error type of the `deploykit` crate.

use std::fmt;

use crate::names::InstanceId;

/// `Result` with [`enum@Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in deploykit.
///
/// Input errors ([`Error::InvalidInput`]) are raised before anything is
/// touched. Errors that happen while a deployment runs are not returned as
/// `Err` by the executor: they become part of the [`Report`](crate::Report),
/// which says which instance failed at which step and what the fleet was left
/// on. `Err` from [`Executor::run`](crate::Executor::run) means the
/// deployment could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value, name or argument is not acceptable. Nothing was
    /// touched.
    #[error("invalid {field}: {message}")]
    InvalidInput {
        /// The field (or argument) at fault, e.g. `batch_size`.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A step of a deployment failed on an instance (or on the load balancer).
    #[error("{step} failed{}: {source}", instance.as_ref().map(|i| format!(" on {i}")).unwrap_or_default())]
    Step {
        /// The step, e.g. `install`.
        step: String,
        /// The instance it ran on, if any.
        instance: Option<InstanceId>,
        /// The driver's error.
        #[source]
        source: DriverError,
    },
    /// A driver (instance, load balancer, metrics source, state store) failed
    /// outside a deployment step.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// Reading or writing local state failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The state recorded on disk and the state found disagree in a way that
    /// deploykit will not guess about.
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
    /// An operation was refused because it could not be done safely; nothing
    /// was changed (e.g. a blue-green rollback whose previous environment
    /// cannot be made healthy).
    #[error("refused: {0}")]
    Refused(String),
    /// A step of the plan asks the load balancer for routing it cannot do,
    /// or names a malformed policy (see
    /// [`Plan::check_routing`](crate::Plan::check_routing)); nothing was
    /// touched.
    #[error("refused: stage '{stage}' {source}; nothing was touched")]
    Routing {
        /// The stage that asks (`on abort` for an abort step).
        stage: String,
        /// What the load balancer cannot do and what to use instead.
        #[source]
        source: crate::routing::RoutingError,
    },
    /// The shared state store (etcd) could not be reached in time, or
    /// answered with an error; `context` says what was being done.
    #[error("{context}: {source}")]
    StateStore {
        /// What was being done (`appending to the journal …`).
        context: String,
        /// The store client's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// This process no longer holds the deployment lock: its lease expired
    /// (the process stalled, or the store was out of reach for longer than
    /// the lease) or another process holds the lock now. The write that
    /// found it out was refused, and nothing more is written.
    #[error("lost the deployment lock: {0}")]
    LockLost(String),
}

impl Error {
    /// An [`Error::InvalidInput`] for `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::InvalidInput {
            field: field.into(),
            message: message.into(),
        }
    }

    /// An [`Error::Io`] with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Whether this error says the deployment lock was lost
    /// ([`Error::LockLost`]): whoever holds it now owns the fleet, so the
    /// run must not touch anything more, not even to roll back.
    pub fn is_lock_lost(&self) -> bool {
        matches!(self, Error::LockLost(_))
    }

    /// Whether this error is bad input (exit code 2 in the CLI): a value
    /// that is not acceptable, or a strategy asking for routing the
    /// configured load balancer cannot do.
    pub fn is_invalid_input(&self) -> bool {
        matches!(self, Error::InvalidInput { .. } | Error::Routing { .. })
    }
}

/// An error reported by a driver: an [`Instance`](crate::Instance),
/// [`LoadBalancer`](crate::LoadBalancer) or
/// [`MetricsSource`](crate::MetricsSource) implementation.
///
/// Drivers say whether the failure is *transient* (worth retrying: a
/// timed-out connection, a busy socket) or *permanent* (a command that ran
/// and failed, a config that does not validate). The executor retries only
/// transient errors, and only for steps whose operation is idempotent.
#[derive(Debug)]
pub struct DriverError {
    message: String,
    transient: bool,
    preflight: Option<PreflightFailure>,
    // Boxed: it is rare, and every `Result` carrying a DriverError stays small.
    routing: Option<Box<crate::routing::RoutingError>>,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// What a failed [`LoadBalancer::preflight`](crate::LoadBalancer::preflight)
/// found, when the driver can say: it decides whether a run that restores a
/// previous state ([`Preflight::Warn`](crate::Preflight::Warn)) may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PreflightFailure {
    /// The balancer does not read what the driver changes (nginx's
    /// configuration does not include the upstream file): every change would
    /// write something nothing reads, possibly a file that is not the
    /// driver's. Refuses every run, rollbacks included.
    NotWired,
    /// The balancer is not running or cannot be reached. A rollback warns and
    /// goes on; its traffic steps fail if it stays so.
    Unreachable,
}

impl fmt::Display for PreflightFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PreflightFailure::NotWired => "not wired",
            PreflightFailure::Unreachable => "unreachable",
        })
    }
}

impl DriverError {
    /// A permanent error with a message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            transient: false,
            preflight: None,
            routing: None,
            source: None,
        }
    }

    /// A transient error (worth retrying) with a message.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            transient: true,
            ..Self::new(message)
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Says what a failed preflight check found.
    pub fn with_preflight_failure(mut self, kind: PreflightFailure) -> Self {
        self.preflight = Some(kind);
        self
    }

    pub(crate) fn with_routing_error(mut self, e: crate::routing::RoutingError) -> Self {
        self.routing = Some(Box::new(e));
        self
    }

    /// Whether retrying may help.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// What a failed preflight check found, when the driver said.
    pub fn preflight_failure(&self) -> Option<PreflightFailure> {
        self.preflight
    }

    /// Why a routing policy was refused, when that is the failure: a
    /// caller can tell an unsupported or invalid policy (nothing touched)
    /// from a balancer that failed while applying one.
    pub fn routing_error(&self) -> Option<&crate::routing::RoutingError> {
        self.routing.as_deref()
    }

    /// The message, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for DriverError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|s| s.as_ref() as &(dyn std::error::Error + 'static))
    }
}

impl From<std::io::Error> for DriverError {
    fn from(e: std::io::Error) -> Self {
        let transient = matches!(
            e.kind(),
            std::io::ErrorKind::TimedOut
                | std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::Interrupted
                | std::io::ErrorKind::WouldBlock
        );
        Self {
            message: "I/O error".into(),
            transient,
            preflight: None,
            routing: None,
            source: Some(Box::new(e)),
        }
    }
}
