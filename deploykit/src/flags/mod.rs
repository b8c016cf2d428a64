//! Feature flags in flagd's flag-definition format: load, validate,
//! evaluate, change safely.
//!
//! deploykit does not invent a flag format: a flag file is flagd's JSON
//! (`flags` → `state`, `variants`, `defaultVariant`, `targeting` as
//! JSONLogic, shared `$evaluators` used through `$ref`), so any OpenFeature
//! SDK with the flagd provider in file mode reads the same file deploykit
//! manages, and `deploykit flags serve` answers the OpenFeature Remote
//! Evaluation Protocol over it.
//!
//! ## Percentage splits: one pinned bucketing scheme
//!
//! flagd's `fractional` operator has bucketed users in more than one way
//! over time. deploykit implements the current one (flagd-testbed's
//! `fractional-v2`): the bucketing value — by default the flag key followed
//! by the targeting key — is hashed with MurmurHash3 x86 32-bit (seed 0),
//! and the hash `h` picks the bucket `(h × total weight) >> 32`, walking the
//! buckets in order. With `[["on", 5], ["off", 95]]` a user whose hash is
//! `0x0A00_0000` lands at `(167772160 × 100) >> 32 = 3`, inside `on`'s
//! `[0, 5)`; the same user stays in `on` when the split grows to 25 %, so a
//! rollout only ever adds users.
//!
//! ## Errors carry the flag and the JSON path
//!
//! [`FlagSet::parse`] reads any flag file and lists its [`Problem`]s (an
//! unknown default variant, a weight that is not a whole number, an unknown
//! operator, variants of different types …), each naming the flag and
//! the JSON path. Every write ([`FlagStore`]) refuses a file with any
//! problem before touching the old one.
//!
//! ## Example
//!
//! ```
//! use deploykit::flags::{Context, FlagSet, Reason};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let flags = FlagSet::parse(r#"{ "flags": { "new-checkout": {
//!     "state": "ENABLED",
//!     "variants": { "on": true, "off": false },
//!     "defaultVariant": "off",
//!     "targeting": { "if": [ { "==": [ { "var": "segment" }, "internal" ] }, "on" ] }
//! } } }"#)?;
//! flags.validate()?;
//!
//! let mut ctx = Context::new();
//! ctx.insert("targetingKey".into(), "user-1".into());
//! ctx.insert("segment".into(), "internal".into());
//! let e = flags.evaluate("new-checkout", &ctx);
//! assert_eq!(e.variant.as_deref(), Some("on"));
//! assert_eq!(e.reason, Reason::TargetingMatch);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::PathBuf;

use serde_json::{Map, Value};

mod hash;
mod logic;
mod model;
mod ofrep;
mod rollout;
mod semver;
mod store;
mod switch;

pub use model::{Flag, FlagSet, FlagState, VariantType, SAFE_VARIANT_KEY};
pub use ofrep::{ofrep_context, OfrepRequestError};
pub use rollout::{FlagRollout, RolloutEvent, RolloutOutcome};
pub use store::{FlagChange, FlagChangeKind, FlagChangeRecord, FlagStore};
pub use switch::FlagSwitch;

/// An evaluation context: `targetingKey` and any attributes (user id,
/// segment, country, app version …).
pub type Context = Map<String, Value>;

/// Why an evaluation answered what it did (OpenFeature's reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    /// No targeting rule: the default variant.
    Static,
    /// The targeting rule chose the variant.
    TargetingMatch,
    /// The rule chose nothing: the default variant (or, without one, the
    /// caller's own default).
    Default,
    /// The flag is disabled: the caller's own default.
    Disabled,
    /// The evaluation failed (see [`Evaluation::error`]).
    Error,
}

impl Reason {
    /// The protocol's spelling, e.g. `TARGETING_MATCH`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Static => "STATIC",
            Reason::TargetingMatch => "TARGETING_MATCH",
            Reason::Default => "DEFAULT",
            Reason::Disabled => "DISABLED",
            Reason::Error => "ERROR",
        }
    }
}

/// OpenFeature's error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// No flag with this key.
    FlagNotFound,
    /// The flag's rule cannot be evaluated.
    ParseError,
    /// The value is not of the type asked for.
    TypeMismatch,
    /// The request's context is not acceptable.
    InvalidContext,
    /// Anything else (a rule returning an unknown variant).
    General,
}

impl ErrorCode {
    /// The protocol's spelling, e.g. `FLAG_NOT_FOUND`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::FlagNotFound => "FLAG_NOT_FOUND",
            ErrorCode::ParseError => "PARSE_ERROR",
            ErrorCode::TypeMismatch => "TYPE_MISMATCH",
            ErrorCode::InvalidContext => "INVALID_CONTEXT",
            ErrorCode::General => "GENERAL",
        }
    }
}

/// A failed evaluation's code and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalError {
    /// The code.
    pub code: ErrorCode,
    /// What went wrong.
    pub detail: String,
}

/// The result of evaluating one flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// The flag's key.
    pub key: String,
    /// The value, `None` when the caller's own default applies (disabled,
    /// no default variant, or an error).
    pub value: Option<Value>,
    /// The variant chosen, if any.
    pub variant: Option<String>,
    /// Why.
    pub reason: Reason,
    /// The error, when `reason` is [`Reason::Error`].
    pub error: Option<EvalError>,
    /// The flag's metadata.
    pub metadata: Map<String, Value>,
}

impl Evaluation {
    /// This evaluation checked against the type the caller expects: a value
    /// of another type becomes a `TYPE_MISMATCH` error.
    pub fn expecting(mut self, expected: VariantType) -> Evaluation {
        if let Some(found) = self.value.as_ref().and_then(VariantType::of) {
            if found != expected {
                self.error = Some(EvalError {
                    code: ErrorCode::TypeMismatch,
                    detail: format!(
                        "flag `{}` is a {} flag, not a {} flag",
                        self.key,
                        found.word(),
                        expected.word()
                    ),
                });
                self.reason = Reason::Error;
                self.value = None;
                self.variant = None;
            }
        }
        self
    }
}

/// One problem in a flag file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The flag, when the problem is inside one.
    pub flag: Option<String>,
    /// The JSON path, e.g. `$.flags.new-checkout.targeting.fractional[1][1]`.
    pub path: String,
    /// What is wrong.
    pub kind: ProblemKind,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.flag {
            Some(flag) => write!(f, "flag `{flag}` at {}: {}", self.path, self.kind),
            None => write!(f, "at {}: {}", self.path, self.kind),
        }
    }
}

/// What is wrong in a flag file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProblemKind {
    /// A required field is absent.
    Missing {
        /// The field.
        field: &'static str,
    },
    /// A field flagd does not know (often a typo).
    UnknownField {
        /// The field.
        field: String,
        /// The fields allowed here.
        allowed: &'static str,
    },
    /// A value of the wrong JSON type.
    WrongType {
        /// What is expected.
        expected: &'static str,
    },
    /// `state` is neither `ENABLED` nor `DISABLED`.
    State {
        /// The value found, as JSON.
        found: String,
    },
    /// `variants` is empty.
    NoVariants,
    /// Two variants hold values of different types.
    VariantTypeMismatch {
        /// The variant at fault.
        variant: String,
        /// Its type.
        found: &'static str,
        /// The first variant, which sets the type.
        first: String,
        /// The first variant's type.
        expected: &'static str,
    },
    /// `defaultVariant` names no variant.
    UnknownDefaultVariant {
        /// The name.
        variant: String,
        /// The variants.
        known: Vec<String>,
    },
    /// A rule (or `safeVariant`) names no variant.
    UnknownVariant {
        /// The name.
        variant: String,
        /// The variants.
        known: Vec<String>,
    },
    /// An operator JSONLogic and flagd do not have.
    UnknownOperator {
        /// The operator.
        operator: String,
        /// The closest known operator.
        hint: Option<String>,
    },
    /// An operator given the wrong number of arguments.
    Arity {
        /// The operator.
        operator: String,
        /// The counts it takes.
        expected: String,
        /// The count given.
        found: usize,
    },
    /// `$ref` to an evaluator that `$evaluators` does not have.
    UnknownRef {
        /// The name.
        name: String,
        /// The evaluators.
        known: Vec<String>,
    },
    /// An evaluator that refers to itself through `$ref`.
    RefCycle {
        /// The evaluator.
        name: String,
    },
    /// A `sem_ver` comparison that does not exist.
    SemverOperator {
        /// The operator.
        operator: String,
    },
    /// A literal that `sem_ver` cannot read as a version.
    NotAVersion {
        /// The text.
        value: String,
    },
    /// A `fractional` weight that is not a whole number in `0..=2147483647`.
    Weight {
        /// The weight.
        weight: String,
    },
    /// `fractional` weights that add up to zero.
    WeightsSumToZero,
    /// `fractional` with no bucket.
    NoBuckets,
}

impl ProblemKind {
    /// Whether the rule holding this problem cannot be evaluated at all
    /// (flagd answers `PARSE_ERROR`), rather than evaluating to `null`.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ProblemKind::UnknownOperator { .. }
                | ProblemKind::UnknownRef { .. }
                | ProblemKind::RefCycle { .. }
        )
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names
            .iter()
            .map(|n| format!("`{n}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProblemKind::Missing { field } => write!(f, "`{field}` is missing; add it"),
            ProblemKind::UnknownField { field, allowed } => {
                write!(f, "unknown field `{field}`; the fields here are {allowed}")
            }
            ProblemKind::WrongType { expected } => write!(f, "expected {expected}"),
            ProblemKind::State { found } => write!(f, "state is {found}; use \"ENABLED\" or \"DISABLED\""),
            ProblemKind::NoVariants => write!(f, "no variants; a flag needs at least one"),
            ProblemKind::VariantTypeMismatch { variant, found, first, expected } => write!(
                f,
                "variant `{variant}` is a {found} but `{first}` is a {expected}; all variants of a flag must have one type"
            ),
            ProblemKind::UnknownDefaultVariant { variant, known } => {
                write!(f, "default variant `{variant}` is not a variant; the variants are {}", list(known))
            }
            ProblemKind::UnknownVariant { variant, known } => {
                write!(f, "`{variant}` is not a variant; the variants are {}", list(known))
            }
            ProblemKind::UnknownOperator { operator, hint } => {
                write!(f, "unknown operator `{operator}`")?;
                match hint {
                    Some(h) => write!(f, "; did you mean `{h}`?"),
                    None => write!(f, "; see docs/flags.md for the operators"),
                }
            }
            ProblemKind::Arity { operator, expected, found } => {
                write!(f, "`{operator}` takes {expected} argument(s), {found} given")
            }
            ProblemKind::UnknownRef { name, known } => {
                write!(f, "`$ref` to `{name}`, which `$evaluators` does not define (it defines {})", list(known))
            }
            ProblemKind::RefCycle { name } => write!(f, "evaluator `{name}` refers to itself through `$ref`"),
            ProblemKind::SemverOperator { operator } => write!(
                f,
                "`{operator}` is not a sem_ver comparison; use one of {}",
                semver::SemverOp::ALL
            ),
            ProblemKind::NotAVersion { value } => {
                write!(f, "`{value}` is not a semantic version (e.g. 1.2.3, v2, 1.0.0-beta.1)")
            }
            ProblemKind::Weight { weight } => {
                write!(f, "weight {weight} is not a whole number from 0 to 2147483647 (total included)")
            }
            ProblemKind::WeightsSumToZero => write!(f, "the fractional weights add up to 0; give one bucket a weight"),
            ProblemKind::NoBuckets => write!(f, "fractional needs at least one bucket `[variant, weight]`"),
        }
    }
}

/// What can go wrong reading or changing flags.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlagError {
    /// The text is not JSON.
    #[error("not JSON at line {line}, column {column}: {message}")]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        message: String,
    },
    /// The file has problems; nothing was written.
    #[error("{} problem(s): {}", .0.len(), .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<Problem>),
    /// No flag with this key.
    #[error("no flag `{key}` in the flag file (`deploykit flags list` shows them)")]
    UnknownFlag {
        /// The key.
        key: String,
    },
    /// The flag has no safe variant to switch to.
    #[error(
        "flag `{key}` has no safe variant: set its `defaultVariant` or `metadata.{}`",
        SAFE_VARIANT_KEY
    )]
    NoSafeVariant {
        /// The flag.
        key: String,
    },
    /// A change asked for something the flag does not allow.
    #[error("flag `{key}`: {message}")]
    BadChange {
        /// The flag.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// Reading or writing the flag file or the change journal failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}
