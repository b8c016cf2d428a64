//! The flagd flag-definition document: parsed into typed flags with every
//! problem reported at its JSON path.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::logic::{self, segment, Compiler, Expr, Scope};
use super::{Context, ErrorCode, EvalError, Evaluation, FlagError, Problem, ProblemKind, Reason};

/// Whether a flag is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FlagState {
    /// Evaluated normally.
    Enabled,
    /// Every evaluation answers `DISABLED` and the caller's own default.
    Disabled,
}

/// The JSON type shared by a flag's variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariantType {
    /// `true` / `false`.
    Boolean,
    /// Text.
    String,
    /// An integer or a float.
    Number,
    /// A JSON object.
    Object,
}

impl VariantType {
    /// The type of `v`, `None` for `null` and arrays (not flag values).
    pub fn of(v: &Value) -> Option<VariantType> {
        match v {
            Value::Bool(_) => Some(VariantType::Boolean),
            Value::String(_) => Some(VariantType::String),
            Value::Number(_) => Some(VariantType::Number),
            Value::Object(_) => Some(VariantType::Object),
            Value::Null | Value::Array(_) => None,
        }
    }

    /// The word used in messages.
    pub fn word(self) -> &'static str {
        match self {
            VariantType::Boolean => "boolean",
            VariantType::String => "string",
            VariantType::Number => "number",
            VariantType::Object => "object",
        }
    }
}

/// The metadata key naming a flag's safe variant (the one `kill` switches
/// to); without it the safe variant is the `defaultVariant`.
pub const SAFE_VARIANT_KEY: &str = "safeVariant";

/// One flag of a flag file.
#[derive(Debug, Clone)]
pub struct Flag {
    key: String,
    state: FlagState,
    variants: Map<String, Value>,
    default_variant: Option<String>,
    metadata: Map<String, Value>,
    targeting: Targeting,
    raw: Value,
}

#[derive(Debug, Clone)]
enum Targeting {
    None,
    Rule(Expr),
    /// A rule that cannot be evaluated at all (flagd answers `PARSE_ERROR`).
    Broken(String),
}

impl Flag {
    /// The flag's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Enabled or disabled.
    pub fn state(&self) -> FlagState {
        self.state
    }

    /// Variant names and values.
    pub fn variants(&self) -> &Map<String, Value> {
        &self.variants
    }

    /// The variant served when no rule matches, if any.
    pub fn default_variant(&self) -> Option<&str> {
        self.default_variant.as_deref()
    }

    /// The flag's metadata.
    pub fn metadata(&self) -> &Map<String, Value> {
        &self.metadata
    }

    /// Whether the flag has a targeting rule.
    pub fn has_targeting(&self) -> bool {
        !matches!(self.targeting, Targeting::None)
    }

    /// The variant `kill` switches to: the metadata's `safeVariant` when
    /// set, else the `defaultVariant`.
    pub fn safe_variant(&self) -> Option<&str> {
        self.metadata
            .get(SAFE_VARIANT_KEY)
            .and_then(Value::as_str)
            .or(self.default_variant.as_deref())
    }

    /// The flag as written in the file.
    pub fn raw(&self) -> &Value {
        &self.raw
    }

    /// The type of the flag's values (of its first variant).
    pub fn value_type(&self) -> Option<VariantType> {
        self.variants.values().next().and_then(VariantType::of)
    }

    /// Evaluates the flag for `ctx` (see [`FlagSet::evaluate`]).
    pub fn evaluate(&self, ctx: &Context) -> Evaluation {
        let resolved = |variant: &str, reason: Reason| Evaluation {
            key: self.key.clone(),
            value: self.variants.get(variant).cloned(),
            variant: Some(variant.to_owned()),
            reason,
            error: None,
            metadata: self.metadata.clone(),
        };
        let without = |reason: Reason, error: Option<EvalError>| Evaluation {
            key: self.key.clone(),
            value: None,
            variant: None,
            reason,
            error,
            metadata: self.metadata.clone(),
        };
        if self.state == FlagState::Disabled {
            return without(Reason::Disabled, None);
        }
        let default = |reason: Reason| match &self.default_variant {
            Some(v) if self.variants.contains_key(v) => resolved(v, reason),
            // A file written by another tool may name a variant it lacks:
            // an error, not a variant without a value.
            Some(v) => without(
                Reason::Error,
                Some(EvalError {
                    code: ErrorCode::General,
                    detail: format!(
                        "the default variant `{v}` of `{}` is not one of its variants",
                        self.key
                    ),
                }),
            ),
            // No default variant: the caller's own default applies.
            None => without(Reason::Default, None),
        };
        let rule = match &self.targeting {
            Targeting::None => return default(Reason::Static),
            Targeting::Broken(why) => {
                return without(
                    Reason::Error,
                    Some(EvalError {
                        code: ErrorCode::ParseError,
                        detail: why.clone(),
                    }),
                )
            }
            Targeting::Rule(rule) => rule,
        };
        let out = logic::eval(
            rule,
            Scope::Root {
                ctx,
                flag_key: &self.key,
            },
        );
        let name = match &*out {
            Value::Null => return default(Reason::Default),
            Value::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
            Value::Bool(_) | Value::Number(_) => logic::text(&out),
            _ => {
                return without(
                    Reason::Error,
                    Some(EvalError {
                        code: ErrorCode::General,
                        detail: format!(
                            "the targeting rule of `{}` returned an object or array, not a variant name",
                            self.key
                        ),
                    }),
                )
            }
        };
        if self.variants.contains_key(&*name) {
            resolved(&name, Reason::TargetingMatch)
        } else {
            without(
                Reason::Error,
                Some(EvalError {
                    code: ErrorCode::General,
                    detail: format!(
                        "the targeting rule of `{}` returned `{name}`, which is not one of its variants",
                        self.key
                    ),
                }),
            )
        }
    }
}

/// A parsed flag file: every flag, ready to evaluate, and every problem
/// found (see [`FlagSet::problems`]).
#[derive(Debug, Clone)]
pub struct FlagSet {
    flags: BTreeMap<String, Arc<Flag>>,
    problems: Vec<Problem>,
    doc: Value,
}

impl FlagSet {
    /// Parses a flag file's text.
    ///
    /// # Errors
    ///
    /// [`FlagError::Syntax`] when the text is not JSON, [`FlagError::Invalid`]
    /// when it is not a flag file at all (no `flags` object). Problems in
    /// single flags are not errors here: they are listed by
    /// [`problems`](Self::problems) and refused by [`validate`](Self::validate),
    /// so that a server can keep serving a file written by another tool.
    pub fn parse(text: &str) -> Result<FlagSet, FlagError> {
        let doc: Value = serde_json::from_str(text).map_err(|e| FlagError::Syntax {
            line: e.line(),
            column: e.column(),
            message: e.to_string(),
        })?;
        FlagSet::from_value(doc)
    }

    /// [`parse`](Self::parse) for an already parsed document.
    ///
    /// # Errors
    ///
    /// [`FlagError::Invalid`] when the document has no `flags` object.
    pub fn from_value(doc: Value) -> Result<FlagSet, FlagError> {
        let fatal = |path: &str, kind| {
            FlagError::Invalid(vec![Problem {
                flag: None,
                path: path.into(),
                kind,
            }])
        };
        let Value::Object(top) = &doc else {
            return Err(fatal(
                "$",
                ProblemKind::WrongType {
                    expected: "an object with `flags`",
                },
            ));
        };
        let Some(flags) = top.get("flags") else {
            return Err(fatal("$.flags", ProblemKind::Missing { field: "flags" }));
        };
        let Value::Object(flags) = flags else {
            return Err(fatal(
                "$.flags",
                ProblemKind::WrongType {
                    expected: "an object of flags by key",
                },
            ));
        };
        let mut problems = Vec::new();
        let evaluators = match top.get("$evaluators") {
            None => None,
            Some(Value::Object(e)) => Some(e),
            Some(_) => {
                problems.push(Problem {
                    flag: None,
                    path: "$.$evaluators".into(),
                    kind: ProblemKind::WrongType {
                        expected: "an object of rules by name",
                    },
                });
                None
            }
        };
        for key in top.keys() {
            if !["flags", "$evaluators", "$schema", "metadata"].contains(&key.as_str()) {
                problems.push(Problem {
                    flag: None,
                    path: format!("$.{}", segment(key)),
                    kind: ProblemKind::UnknownField {
                        field: key.clone(),
                        allowed: "flags, $evaluators, $schema, metadata",
                    },
                });
            }
        }
        let mut out = BTreeMap::new();
        for (key, raw) in flags {
            if let Some(flag) = parse_flag(key, raw, evaluators, &mut problems) {
                out.insert(key.clone(), Arc::new(flag));
            }
        }
        Ok(FlagSet {
            flags: out,
            problems,
            doc,
        })
    }

    /// Every problem found, each with its flag and JSON path.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// `Ok` when the file has no problem at all: the check every write runs.
    ///
    /// # Errors
    ///
    /// [`FlagError::Invalid`] with every problem.
    pub fn validate(&self) -> Result<(), FlagError> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(FlagError::Invalid(self.problems.clone()))
        }
    }

    /// The flag `key`.
    pub fn get(&self, key: &str) -> Option<&Arc<Flag>> {
        self.flags.get(key)
    }

    /// Every flag, by key.
    pub fn flags(&self) -> impl Iterator<Item = &Arc<Flag>> {
        self.flags.values()
    }

    /// The document as parsed.
    pub fn document(&self) -> &Value {
        &self.doc
    }

    /// Evaluates flag `key` for `ctx` (`targetingKey` and any attributes).
    ///
    /// Never fails: a missing flag or a broken rule is an [`Evaluation`]
    /// with an [`EvalError`], as OpenFeature reports it.
    pub fn evaluate(&self, key: &str, ctx: &Context) -> Evaluation {
        match self.flags.get(key) {
            Some(flag) => flag.evaluate(ctx),
            None => Evaluation {
                key: key.to_owned(),
                value: None,
                variant: None,
                reason: Reason::Error,
                error: Some(EvalError {
                    code: ErrorCode::FlagNotFound,
                    detail: format!("flag `{key}` was not found"),
                }),
                metadata: Map::new(),
            },
        }
    }
}

fn parse_flag(
    key: &str,
    raw: &Value,
    evaluators: Option<&Map<String, Value>>,
    problems: &mut Vec<Problem>,
) -> Option<Flag> {
    let base = format!("$.flags.{}", segment(key));
    let mut problem = |path: String, kind| {
        problems.push(Problem {
            flag: Some(key.to_owned()),
            path,
            kind,
        });
    };
    let Value::Object(obj) = raw else {
        problem(
            base,
            ProblemKind::WrongType {
                expected: "an object with state, variants, defaultVariant",
            },
        );
        return None;
    };
    for field in obj.keys() {
        if !["state", "variants", "defaultVariant", "targeting", "metadata"].contains(&field.as_str()) {
            problem(
                format!("{base}.{}", segment(field)),
                ProblemKind::UnknownField {
                    field: field.clone(),
                    allowed: "state, variants, defaultVariant, targeting, metadata",
                },
            );
        }
    }
    let state = match obj.get("state") {
        Some(Value::String(s)) if s == "ENABLED" => FlagState::Enabled,
        Some(Value::String(s)) if s == "DISABLED" => FlagState::Disabled,
        Some(other) => {
            problem(
                format!("{base}.state"),
                ProblemKind::State {
                    found: other.to_string(),
                },
            );
            FlagState::Disabled
        }
        None => {
            problem(format!("{base}.state"), ProblemKind::Missing { field: "state" });
            FlagState::Disabled
        }
    };
    let variants = match obj.get("variants") {
        Some(Value::Object(v)) if !v.is_empty() => v.clone(),
        Some(Value::Object(_)) => {
            problem(format!("{base}.variants"), ProblemKind::NoVariants);
            return None;
        }
        Some(_) => {
            problem(
                format!("{base}.variants"),
                ProblemKind::WrongType {
                    expected: "an object of variant values by name",
                },
            );
            return None;
        }
        None => {
            problem(
                format!("{base}.variants"),
                ProblemKind::Missing { field: "variants" },
            );
            return None;
        }
    };
    let mut expected: Option<(String, VariantType)> = None;
    for (name, value) in &variants {
        let path = format!("{base}.variants.{}", segment(name));
        match (VariantType::of(value), &expected) {
            (None, _) => problem(
                path,
                ProblemKind::WrongType {
                    expected: "a boolean, string, number or object",
                },
            ),
            (Some(t), None) => expected = Some((name.clone(), t)),
            (Some(t), Some((first, want))) if t != *want => problem(
                path,
                ProblemKind::VariantTypeMismatch {
                    variant: name.clone(),
                    found: t.word(),
                    first: first.clone(),
                    expected: want.word(),
                },
            ),
            _ => {}
        }
    }
    let default_variant = match obj.get("defaultVariant") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => {
            if !variants.contains_key(d) {
                problem(
                    format!("{base}.defaultVariant"),
                    ProblemKind::UnknownDefaultVariant {
                        variant: d.clone(),
                        known: variants.keys().cloned().collect(),
                    },
                );
            }
            Some(d.clone())
        }
        Some(_) => {
            problem(
                format!("{base}.defaultVariant"),
                ProblemKind::WrongType {
                    expected: "a variant name or null",
                },
            );
            None
        }
    };
    let metadata = match obj.get("metadata") {
        None => Map::new(),
        Some(Value::Object(m)) => {
            for (k, v) in m {
                if !matches!(v, Value::String(_) | Value::Number(_) | Value::Bool(_)) {
                    problem(
                        format!("{base}.metadata.{}", segment(k)),
                        ProblemKind::WrongType {
                            expected: "a string, number or boolean",
                        },
                    );
                }
            }
            if let Some(safe) = m.get(SAFE_VARIANT_KEY) {
                if !safe.as_str().is_some_and(|s| variants.contains_key(s)) {
                    problem(
                        format!("{base}.metadata.{SAFE_VARIANT_KEY}"),
                        ProblemKind::UnknownVariant {
                            variant: logic::text(safe).into_owned(),
                            known: variants.keys().cloned().collect(),
                        },
                    );
                }
            }
            m.clone()
        }
        Some(_) => {
            problem(
                format!("{base}.metadata"),
                ProblemKind::WrongType {
                    expected: "an object",
                },
            );
            Map::new()
        }
    };
    let targeting = match obj.get("targeting") {
        None | Some(Value::Null) => Targeting::None,
        Some(Value::Object(t)) if t.is_empty() => Targeting::None,
        Some(rule @ Value::Object(_)) => {
            let before = problems.len();
            let expr = Compiler::new(evaluators, key, &variants, problems).compile(
                rule,
                &format!("{base}.targeting"),
                true,
            );
            match problems[before..].iter().find(|p| p.kind.is_fatal()) {
                Some(p) => Targeting::Broken(p.to_string()),
                None => Targeting::Rule(expr),
            }
        }
        Some(_) => {
            problems.push(Problem {
                flag: Some(key.to_owned()),
                path: format!("{base}.targeting"),
                kind: ProblemKind::WrongType {
                    expected: "a JSONLogic rule (an object)",
                },
            });
            Targeting::Broken("the targeting rule is not an object".into())
        }
    };
    Some(Flag {
        key: key.to_owned(),
        state,
        variants,
        default_variant,
        metadata,
        targeting,
        raw: raw.clone(),
    })
}
