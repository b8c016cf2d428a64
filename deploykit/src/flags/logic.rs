//! JSONLogic targeting rules, compiled once when a flag file is loaded and
//! evaluated per request without re-parsing: the standard operators plus
//! flagd's `fractional`, `sem_ver`, `starts_with` and `ends_with`.
//!
//! Compiling reports every problem with its JSON path. Some problems make a
//! rule unusable (an unknown operator, a `$ref` to no evaluator: evaluating
//! the flag then answers `PARSE_ERROR`, as flagd does); the others (an
//! operator given the wrong number of arguments, an unknown `sem_ver`
//! comparison, a fractional weight that is not a whole number) evaluate to
//! `null`, as in flagd, so the flag falls back to its default variant.
//! Writes refuse both kinds.

use std::borrow::Cow;

use serde_json::{Map, Number, Value};

use super::hash;
use super::semver::{SemverOp, Version};
use super::{Problem, ProblemKind};

/// The key under which flagd exposes evaluation properties to rules.
const FLAGD: &str = "$flagd";

/// A compiled rule.
#[derive(Debug, Clone)]
pub(crate) enum Expr {
    Lit(Value),
    Array(Vec<Expr>),
    Var {
        path: VarPath,
        default: Option<Box<Expr>>,
    },
    Op(Op, Vec<Expr>),
    /// A rule that is known to evaluate to `null` (its problem was reported).
    Null,
}

/// The path of a `var`, split once at compile time when it is a literal.
#[derive(Debug, Clone)]
pub(crate) enum VarPath {
    Static(Vec<String>),
    Dynamic(Box<Expr>),
}

/// Every operator deploykit evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    If,
    Eq,
    StrictEq,
    Ne,
    StrictNe,
    Not,
    NotNot,
    Or,
    And,
    Gt,
    Ge,
    Lt,
    Le,
    Max,
    Min,
    Add,
    Sub,
    Mul,
    Div,
    Mod,
    Cat,
    Substr,
    In,
    Merge,
    Missing,
    MissingSome,
    Map,
    Filter,
    All,
    Some,
    None,
    Reduce,
    Log,
    Fractional,
    SemVer,
    StartsWith,
    EndsWith,
}

/// Operator names, for lookups and "did you mean" hints.
const OPS: &[(&str, Op)] = &[
    ("if", Op::If),
    ("?:", Op::If),
    ("==", Op::Eq),
    ("===", Op::StrictEq),
    ("!=", Op::Ne),
    ("!==", Op::StrictNe),
    ("!", Op::Not),
    ("!!", Op::NotNot),
    ("or", Op::Or),
    ("and", Op::And),
    (">", Op::Gt),
    (">=", Op::Ge),
    ("<", Op::Lt),
    ("<=", Op::Le),
    ("max", Op::Max),
    ("min", Op::Min),
    ("+", Op::Add),
    ("-", Op::Sub),
    ("*", Op::Mul),
    ("/", Op::Div),
    ("%", Op::Mod),
    ("cat", Op::Cat),
    ("substr", Op::Substr),
    ("in", Op::In),
    ("merge", Op::Merge),
    ("missing", Op::Missing),
    ("missing_some", Op::MissingSome),
    ("map", Op::Map),
    ("filter", Op::Filter),
    ("all", Op::All),
    ("some", Op::Some),
    ("none", Op::None),
    ("reduce", Op::Reduce),
    ("log", Op::Log),
    ("fractional", Op::Fractional),
    ("sem_ver", Op::SemVer),
    ("starts_with", Op::StartsWith),
    ("ends_with", Op::EndsWith),
];

impl Op {
    /// The accepted argument counts (inclusive), `None` for no upper bound.
    fn arity(self) -> (usize, Option<usize>) {
        match self {
            Op::Not | Op::NotNot | Op::Log => (1, Some(1)),
            Op::Eq | Op::StrictEq | Op::Ne | Op::StrictNe | Op::Gt | Op::Ge | Op::In | Op::Mod => {
                (2, Some(2))
            }
            Op::Div | Op::Map | Op::Filter | Op::All | Op::Some | Op::None => (2, Some(2)),
            Op::StartsWith | Op::EndsWith => (2, Some(2)),
            Op::Lt | Op::Le => (2, Some(3)),
            Op::Substr => (2, Some(3)),
            Op::Reduce | Op::SemVer => (3, Some(3)),
            Op::MissingSome => (2, Some(2)),
            Op::Sub => (1, Some(2)),
            Op::Fractional | Op::Max | Op::Min | Op::Or | Op::And | Op::If => (1, None),
            Op::Add | Op::Mul | Op::Cat | Op::Merge | Op::Missing => (0, None),
        }
    }
}

/// Compiles rules, collecting problems.
pub(crate) struct Compiler<'a> {
    pub(crate) evaluators: Option<&'a Map<String, Value>>,
    pub(crate) flag: &'a str,
    pub(crate) variants: &'a Map<String, Value>,
    pub(crate) problems: &'a mut Vec<Problem>,
    /// `$ref`s being expanded, to refuse a cycle.
    refs: Vec<String>,
}

impl<'a> Compiler<'a> {
    pub(crate) fn new(
        evaluators: Option<&'a Map<String, Value>>,
        flag: &'a str,
        variants: &'a Map<String, Value>,
        problems: &'a mut Vec<Problem>,
    ) -> Self {
        Compiler {
            evaluators,
            flag,
            variants,
            problems,
            refs: Vec::new(),
        }
    }

    fn problem(&mut self, path: &str, kind: ProblemKind) {
        self.problems.push(Problem {
            flag: Some(self.flag.to_owned()),
            path: path.to_owned(),
            kind,
        });
    }

    /// Compiles a targeting rule; `result` says whether its value names a
    /// variant (so literal strings there are checked against the variants).
    pub(crate) fn compile(&mut self, value: &Value, path: &str, result: bool) -> Expr {
        match value {
            Value::Array(items) => Expr::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.compile(v, &format!("{path}[{i}]"), false))
                    .collect(),
            ),
            Value::Object(map) if map.len() == 1 => {
                let (name, args) = map.iter().next().expect("one entry");
                self.operation(name, args, &format!("{path}.{}", segment(name)), result)
            }
            Value::String(s) if result => {
                if !self.variants.contains_key(s) {
                    let known = self.variants.keys().cloned().collect();
                    self.problem(
                        path,
                        ProblemKind::UnknownVariant {
                            variant: s.clone(),
                            known,
                        },
                    );
                }
                Expr::Lit(value.clone())
            }
            other => Expr::Lit(other.clone()),
        }
    }

    fn operation(&mut self, name: &str, args: &Value, path: &str, result: bool) -> Expr {
        if name == "$ref" {
            return self.reference(args, path, result);
        }
        if name == "var" {
            return self.var(args, path);
        }
        let Some(&(_, op)) = OPS.iter().find(|(n, _)| *n == name) else {
            let hint = OPS
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| n.len() > 1)
                .min_by_key(|n| levenshtein(n, name))
                .filter(|n| levenshtein(n, name) <= 2)
                .map(str::to_owned);
            self.problem(
                path,
                ProblemKind::UnknownOperator {
                    operator: name.to_owned(),
                    hint,
                },
            );
            return Expr::Null;
        };
        // A single non-array argument is shorthand for a list of one.
        let raw: Vec<&Value> = match args {
            Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        let (min, max) = op.arity();
        if raw.len() < min || max.is_some_and(|m| raw.len() > m) {
            self.problem(
                path,
                ProblemKind::Arity {
                    operator: name.to_owned(),
                    expected: match max {
                        Some(m) if m == min => format!("{min}"),
                        Some(m) => format!("{min} to {m}"),
                        None => format!("at least {min}"),
                    },
                    found: raw.len(),
                },
            );
            return Expr::Null;
        }
        let arg_path = |i: usize| match args {
            Value::Array(_) => format!("{path}[{i}]"),
            _ => path.to_owned(),
        };
        let compiled: Vec<Expr> = match op {
            Op::If => raw
                .iter()
                .enumerate()
                // Branches (odd positions and the last one) are results.
                .map(|(i, v)| {
                    let branch = i % 2 == 1 || i + 1 == raw.len();
                    self.compile(v, &arg_path(i), result && branch)
                })
                .collect(),
            Op::Fractional => return self.fractional(&raw, path, result),
            _ => raw
                .iter()
                .enumerate()
                .map(|(i, v)| self.compile(v, &arg_path(i), false))
                .collect(),
        };
        if op == Op::SemVer {
            if let Value::String(cmp) = raw[1] {
                if SemverOp::parse(cmp).is_none() {
                    self.problem(
                        &arg_path(1),
                        ProblemKind::SemverOperator {
                            operator: cmp.clone(),
                        },
                    );
                    return Expr::Null;
                }
            }
            for i in [0, 2] {
                if let Value::String(v) = raw[i] {
                    if Version::parse(v).is_none() {
                        self.problem(&arg_path(i), ProblemKind::NotAVersion { value: v.clone() });
                    }
                }
            }
        }
        Expr::Op(op, compiled)
    }

    fn reference(&mut self, args: &Value, path: &str, result: bool) -> Expr {
        let Value::String(name) = args else {
            self.problem(
                path,
                ProblemKind::WrongType {
                    expected: "the name of an evaluator in `$evaluators`",
                },
            );
            return Expr::Null;
        };
        let Some(rule) = self.evaluators.and_then(|e| e.get(name)) else {
            let known = self
                .evaluators
                .map(|e| e.keys().cloned().collect())
                .unwrap_or_default();
            self.problem(
                path,
                ProblemKind::UnknownRef {
                    name: name.clone(),
                    known,
                },
            );
            return Expr::Null;
        };
        if self.refs.contains(name) {
            self.problem(path, ProblemKind::RefCycle { name: name.clone() });
            return Expr::Null;
        }
        self.refs.push(name.clone());
        let expr = self.compile(rule, &format!("$.$evaluators.{}", segment(name)), result);
        self.refs.pop();
        expr
    }

    fn var(&mut self, args: &Value, path: &str) -> Expr {
        let (key, default) = match args {
            Value::Array(items) if items.is_empty() => (&Value::Null, None),
            Value::Array(items) => (&items[0], items.get(1)),
            other => (other, None),
        };
        let default = default.map(|d| Box::new(self.compile(d, &format!("{path}[1]"), false)));
        let path = match key {
            Value::String(s) if s.is_empty() => VarPath::Static(Vec::new()),
            Value::String(s) => VarPath::Static(s.split('.').map(str::to_owned).collect()),
            Value::Number(n) => VarPath::Static(vec![n.to_string()]),
            Value::Null => VarPath::Static(Vec::new()),
            other => VarPath::Dynamic(Box::new(self.compile(other, path, false))),
        };
        Expr::Var { path, default }
    }

    fn fractional(&mut self, raw: &[&Value], path: &str, result: bool) -> Expr {
        let at = |i: usize| format!("{path}[{i}]");
        let mut out = Vec::with_capacity(raw.len());
        // The first argument is the bucketing value unless it is already a
        // bucket (`[variant, weight]`): then the targeting key is used.
        let first_is_bucket = matches!(raw[0], Value::Array(_));
        let start = if first_is_bucket {
            out.push(Expr::Null);
            0
        } else {
            out.push(self.compile(raw[0], &at(0), false));
            1
        };
        if raw.len() == start {
            self.problem(path, ProblemKind::NoBuckets);
            return Expr::Null;
        }
        let mut total: i64 = 0;
        let mut literal_total = true;
        for (i, bucket) in raw.iter().enumerate().skip(start) {
            let Value::Array(parts) = bucket else {
                self.problem(
                    &at(i),
                    ProblemKind::WrongType {
                        expected: "a bucket `[variant, weight]`",
                    },
                );
                return Expr::Null;
            };
            if parts.is_empty() || parts.len() > 2 {
                self.problem(
                    &at(i),
                    ProblemKind::WrongType {
                        expected: "a bucket `[variant, weight]`",
                    },
                );
                return Expr::Null;
            }
            let name = self.compile(&parts[0], &format!("{}[0]", at(i)), result);
            let weight = match parts.get(1) {
                None | Some(Value::Null) => Expr::Lit(Value::from(1)),
                Some(Value::Number(n)) => {
                    match n.as_f64() {
                        Some(w) if w.fract() == 0.0 && (0.0..=f64::from(i32::MAX)).contains(&w) => {
                            total += w as i64
                        }
                        // Evaluated as flagd does (a negative weight counts
                        // as 0, a fraction makes the rule null), refused on write.
                        _ => self.problem(
                            &format!("{}[1]", at(i)),
                            ProblemKind::Weight {
                                weight: n.to_string(),
                            },
                        ),
                    }
                    Expr::Lit(Value::Number(n.clone()))
                }
                Some(other) => {
                    literal_total = false;
                    self.compile(other, &format!("{}[1]", at(i)), false)
                }
            };
            out.push(Expr::Array(vec![name, weight]));
        }
        if literal_total && total == 0 {
            self.problem(path, ProblemKind::WeightsSumToZero);
        }
        if total > i64::from(i32::MAX) {
            self.problem(
                path,
                ProblemKind::Weight {
                    weight: total.to_string(),
                },
            );
            return Expr::Null;
        }
        Expr::Op(Op::Fractional, out)
    }
}

/// A path segment for `key`: `.key`-style when plain, `["key"]` otherwise.
pub(crate) fn segment(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'$')
    {
        key.to_owned()
    } else {
        format!("[{}]", Value::String(key.to_owned()))
    }
}

pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// What `var` reads from: the evaluation context (with flagd's `$flagd`
/// properties) or, inside `map`/`filter`/…, the current item.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Scope<'a> {
    Root {
        ctx: &'a Map<String, Value>,
        flag_key: &'a str,
    },
    Item(&'a Value),
}

type V<'a> = Cow<'a, Value>;

impl<'a> Scope<'a> {
    fn lookup(&self, path: &[String]) -> Option<V<'a>> {
        match *self {
            Scope::Item(v) => walk(v, path).map(Cow::Borrowed),
            Scope::Root { ctx, flag_key } => {
                let Some((first, rest)) = path.split_first() else {
                    let mut whole = ctx.clone();
                    whole.insert(FLAGD.to_owned(), flagd_props(flag_key));
                    return Some(Cow::Owned(Value::Object(whole)));
                };
                if first == FLAGD {
                    return walk(&flagd_props(flag_key), rest).map(|v| Cow::Owned(v.clone()));
                }
                walk(ctx.get(first)?, rest).map(Cow::Borrowed)
            }
        }
    }
}

fn flagd_props(flag_key: &str) -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::json!({ "flagKey": flag_key, "timestamp": now })
}

fn walk<'v>(mut v: &'v Value, path: &[String]) -> Option<&'v Value> {
    for seg in path {
        v = match v {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// JSONLogic truthiness (JavaScript's).
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0 && !f.is_nan()),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => true,
    }
}

fn to_number(v: &Value) -> f64 {
    match v {
        Value::Null => 0.0,
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) if s.trim().is_empty() => 0.0,
        Value::String(s) => s.trim().parse().unwrap_or(f64::NAN),
        Value::Array(a) if a.is_empty() => 0.0,
        Value::Array(a) if a.len() == 1 => to_number(&a[0]),
        _ => f64::NAN,
    }
}

fn num(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)
    }
}

/// The text JavaScript would make of `v` (numbers without a trailing `.0`).
pub(crate) fn text(v: &Value) -> Cow<'_, str> {
    match v {
        Value::String(s) => Cow::Borrowed(s),
        Value::Null => Cow::Borrowed("null"),
        Value::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Cow::Owned((f as i64).to_string()),
            _ => Cow::Owned(n.to_string()),
        },
        other => Cow::Owned(other.to_string()),
    }
}

fn loose_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Null, _) | (_, Value::Null) => false,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Array(_) | Value::Object(_), _) | (_, Value::Array(_) | Value::Object(_)) => false,
        _ => to_number(a) == to_number(b),
    }
}

fn strict_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(_) | Value::Object(_), _) => false,
        _ => a == b,
    }
}

fn less(a: &Value, b: &Value, or_equal: bool) -> bool {
    if let (Value::String(x), Value::String(y)) = (a, b) {
        return if or_equal { x <= y } else { x < y };
    }
    let (x, y) = (to_number(a), to_number(b));
    if or_equal {
        x <= y
    } else {
        x < y
    }
}

const NULL: Value = Value::Null;

/// Evaluates `expr` in `scope`.
pub(crate) fn eval<'a>(expr: &'a Expr, scope: Scope<'a>) -> V<'a> {
    match expr {
        Expr::Lit(v) => Cow::Borrowed(v),
        Expr::Null => Cow::Borrowed(&NULL),
        Expr::Array(items) => Cow::Owned(Value::Array(
            items.iter().map(|e| eval(e, scope).into_owned()).collect(),
        )),
        Expr::Var { path, default } => {
            let found = match path {
                VarPath::Static(p) => scope.lookup(p),
                VarPath::Dynamic(e) => {
                    let key = eval(e, scope);
                    let key = text(&key);
                    let p: Vec<String> = if key.is_empty() {
                        Vec::new()
                    } else {
                        key.split('.').map(str::to_owned).collect()
                    };
                    scope.lookup(&p)
                }
            };
            match (found, default) {
                (Some(v), _) if !v.is_null() => v,
                (_, Some(d)) => eval(d, scope),
                (found, None) => found.unwrap_or(Cow::Borrowed(&NULL)),
            }
        }
        Expr::Op(op, args) => apply(*op, args, scope),
    }
}

fn apply<'a>(op: Op, args: &'a [Expr], scope: Scope<'a>) -> V<'a> {
    let arg = |i: usize| eval(&args[i], scope);
    let bool_ = |b: bool| Cow::Owned(Value::Bool(b));
    match op {
        Op::If => {
            let mut i = 0;
            while i + 1 < args.len() {
                if truthy(&arg(i)) {
                    return arg(i + 1);
                }
                i += 2;
            }
            if i < args.len() {
                arg(i)
            } else {
                Cow::Borrowed(&NULL)
            }
        }
        Op::Eq => bool_(loose_eq(&arg(0), &arg(1))),
        Op::Ne => bool_(!loose_eq(&arg(0), &arg(1))),
        Op::StrictEq => bool_(strict_eq(&arg(0), &arg(1))),
        Op::StrictNe => bool_(!strict_eq(&arg(0), &arg(1))),
        Op::Not => bool_(!truthy(&arg(0))),
        Op::NotNot => bool_(truthy(&arg(0))),
        Op::Or => {
            let mut last = Cow::Borrowed(&NULL);
            for e in args {
                last = eval(e, scope);
                if truthy(&last) {
                    break;
                }
            }
            last
        }
        Op::And => {
            let mut last = Cow::Borrowed(&NULL);
            for e in args {
                last = eval(e, scope);
                if !truthy(&last) {
                    break;
                }
            }
            last
        }
        Op::Gt => bool_(less(&arg(1), &arg(0), false)),
        Op::Ge => bool_(less(&arg(1), &arg(0), true)),
        Op::Lt | Op::Le => {
            let eq = op == Op::Le;
            let (a, b) = (arg(0), arg(1));
            if args.len() == 3 {
                bool_(less(&a, &b, eq) && less(&b, &arg(2), eq))
            } else {
                bool_(less(&a, &b, eq))
            }
        }
        Op::Max | Op::Min => {
            let nums: Vec<f64> = args.iter().map(|e| to_number(&eval(e, scope))).collect();
            if nums.iter().any(|n| n.is_nan()) {
                return Cow::Borrowed(&NULL);
            }
            let pick = if op == Op::Max { f64::max } else { f64::min };
            Cow::Owned(num(nums.into_iter().reduce(pick).unwrap_or(f64::NAN)))
        }
        Op::Add => Cow::Owned(num(args.iter().map(|e| to_number(&eval(e, scope))).sum())),
        Op::Mul => Cow::Owned(num(args.iter().map(|e| to_number(&eval(e, scope))).product())),
        Op::Sub if args.len() == 1 => Cow::Owned(num(-to_number(&arg(0)))),
        Op::Sub => Cow::Owned(num(to_number(&arg(0)) - to_number(&arg(1)))),
        Op::Div => Cow::Owned(num(to_number(&arg(0)) / to_number(&arg(1)))),
        Op::Mod => Cow::Owned(num(to_number(&arg(0)) % to_number(&arg(1)))),
        Op::Cat => {
            let mut s = String::new();
            for e in args {
                let v = eval(e, scope);
                if !v.is_null() {
                    s.push_str(&text(&v));
                }
            }
            Cow::Owned(Value::String(s))
        }
        Op::Substr => {
            let s: Vec<char> = text(&arg(0)).chars().collect();
            let n = s.len() as i64;
            let start = to_number(&arg(1)) as i64;
            let start = if start < 0 {
                (n + start).max(0)
            } else {
                start.min(n)
            };
            let end = match args.get(2).map(|e| to_number(&eval(e, scope)) as i64) {
                None => n,
                Some(l) if l < 0 => (n + l).max(start),
                Some(l) => (start + l).min(n),
            };
            Cow::Owned(Value::String(
                s[start as usize..end.max(start) as usize].iter().collect(),
            ))
        }
        Op::In => {
            let (needle, hay) = (arg(0), arg(1));
            match &*hay {
                Value::String(h) => bool_(h.contains(&*text(&needle))),
                Value::Array(items) => bool_(items.iter().any(|i| strict_eq(i, &needle))),
                _ => bool_(false),
            }
        }
        Op::Merge => {
            let mut out = Vec::new();
            for e in args {
                match eval(e, scope).into_owned() {
                    Value::Array(a) => out.extend(a),
                    v => out.push(v),
                }
            }
            Cow::Owned(Value::Array(out))
        }
        Op::Missing => Cow::Owned(Value::Array(missing(args, scope))),
        Op::MissingSome => {
            let need = to_number(&arg(0)) as usize;
            let keys = arg(1);
            let keys: Vec<Expr> = match &*keys {
                Value::Array(a) => a.iter().cloned().map(Expr::Lit).collect(),
                _ => Vec::new(),
            };
            let absent = missing_in(&keys, scope);
            if keys.len() - absent.len() >= need {
                Cow::Owned(Value::Array(Vec::new()))
            } else {
                Cow::Owned(Value::Array(absent))
            }
        }
        Op::Map | Op::Filter | Op::All | Op::Some | Op::None => {
            let items = arg(0);
            let Value::Array(items) = &*items else {
                return match op {
                    Op::Map | Op::Filter => Cow::Owned(Value::Array(Vec::new())),
                    Op::All | Op::Some => bool_(false),
                    _ => bool_(true),
                };
            };
            let test = |item: &Value| eval(&args[1], Scope::Item(item)).into_owned();
            match op {
                Op::Map => Cow::Owned(Value::Array(items.iter().map(test).collect())),
                Op::Filter => Cow::Owned(Value::Array(
                    items.iter().filter(|i| truthy(&test(i))).cloned().collect(),
                )),
                Op::All => bool_(!items.is_empty() && items.iter().all(|i| truthy(&test(i)))),
                Op::Some => bool_(items.iter().any(|i| truthy(&test(i)))),
                _ => bool_(!items.iter().any(|i| truthy(&test(i)))),
            }
        }
        Op::Reduce => {
            let items = arg(0);
            let mut acc = arg(2).into_owned();
            if let Value::Array(items) = &*items {
                for item in items {
                    let data = serde_json::json!({ "current": item, "accumulator": acc });
                    acc = eval(&args[1], Scope::Item(&data)).into_owned();
                }
            }
            Cow::Owned(acc)
        }
        Op::Log => arg(0),
        Op::StartsWith | Op::EndsWith => match (&*arg(0), &*arg(1)) {
            (Value::String(s), Value::String(p)) => bool_(if op == Op::StartsWith {
                s.starts_with(p.as_str())
            } else {
                s.ends_with(p.as_str())
            }),
            _ => Cow::Borrowed(&NULL),
        },
        Op::SemVer => {
            let version = |v: &Value| Version::parse(&text(v));
            let cmp = arg(1);
            let (Some(a), Some(cmp), Some(b)) = (
                version(&arg(0)),
                cmp.as_str().and_then(SemverOp::parse),
                version(&arg(2)),
            ) else {
                return Cow::Borrowed(&NULL);
            };
            bool_(cmp.holds(&a, &b))
        }
        Op::Fractional => fractional(args, scope),
    }
}

fn missing<'a>(args: &'a [Expr], scope: Scope<'a>) -> Vec<Value> {
    // `{"missing": [["a", "b"]]}` is the same as `{"missing": ["a", "b"]}`.
    if let [only] = args {
        if let Value::Array(keys) = &*eval(only, scope) {
            let keys: Vec<Expr> = keys.iter().cloned().map(Expr::Lit).collect();
            return missing_in(&keys, scope);
        }
    }
    missing_in(args, scope)
}

fn missing_in(keys: &[Expr], scope: Scope<'_>) -> Vec<Value> {
    let mut out = Vec::new();
    for k in keys {
        let key = eval(k, scope).into_owned();
        let path: Vec<String> = text(&key).split('.').map(str::to_owned).collect();
        if scope
            .lookup(&path)
            .is_none_or(|v| v.is_null() || v.as_str() == Some(""))
        {
            out.push(key);
        }
    }
    out
}

/// flagd's `fractional`: the bucketing value (by default the flag key
/// followed by the targeting key) is hashed with MurmurHash3 and mapped
/// onto the summed weights with `(hash * total) >> 32`.
fn fractional<'a>(args: &'a [Expr], scope: Scope<'a>) -> V<'a> {
    let (first, buckets) = args.split_first().expect("compiled with a first argument");
    let mut owned_key;
    let first_value = eval(first, scope);
    let key: &str = match (&*first_value, first) {
        (Value::String(s), _) if !matches!(first, Expr::Null) => s,
        (Value::Null, _) => {
            let Scope::Root { ctx, flag_key } = scope else {
                return Cow::Borrowed(&NULL);
            };
            match ctx.get("targetingKey") {
                Some(Value::String(t)) if !t.is_empty() => {
                    owned_key = String::with_capacity(flag_key.len() + t.len());
                    owned_key.push_str(flag_key);
                    owned_key.push_str(t);
                    &owned_key
                }
                _ => return Cow::Borrowed(&NULL),
            }
        }
        _ => return Cow::Borrowed(&NULL),
    };
    let mut weights = [0u32; 16];
    let mut many = Vec::new();
    let weights: &mut [u32] = if buckets.len() <= weights.len() {
        &mut weights[..buckets.len()]
    } else {
        many.resize(buckets.len(), 0);
        &mut many
    };
    let mut total: u64 = 0;
    for (i, b) in buckets.iter().enumerate() {
        let Expr::Array(parts) = b else {
            return Cow::Borrowed(&NULL);
        };
        let w = match &parts[1] {
            Expr::Lit(Value::Number(n)) => n.as_f64().unwrap_or(0.0),
            e => match &*eval(e, scope) {
                Value::Number(n) => n.as_f64().unwrap_or(0.0),
                Value::Null => 1.0,
                _ => return Cow::Borrowed(&NULL),
            },
        };
        if w.fract() != 0.0 {
            return Cow::Borrowed(&NULL);
        }
        // Negative weights (a rollout computed below zero) count as zero.
        let w = w.clamp(0.0, f64::from(i32::MAX)) as u32;
        weights[i] = w;
        total += u64::from(w);
    }
    if total == 0 || total > i32::MAX as u64 {
        return Cow::Borrowed(&NULL);
    }
    let at = hash::bucket(hash::murmur3_32(key.as_bytes()), total as u32);
    let mut end = 0u64;
    for (i, b) in buckets.iter().enumerate() {
        end += u64::from(weights[i]);
        if at < end {
            let Expr::Array(parts) = b else {
                unreachable!("checked above")
            };
            let name = eval(&parts[0], scope);
            return match &*name {
                Value::String(_) | Value::Bool(_) | Value::Number(_) | Value::Null => name,
                _ => Cow::Borrowed(&NULL),
            };
        }
    }
    Cow::Borrowed(&NULL)
}
