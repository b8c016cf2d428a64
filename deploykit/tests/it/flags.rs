//! deploykit::flags against flagd's published evaluator vectors (the
//! flagd-testbed gherkin scenarios, run step by step), and the properties a
//! percentage rollout relies on.

use std::collections::BTreeMap;
use std::path::Path;

use deploykit::flags::{Context, FlagSet, VariantType};
use serde_json::Value;

const TESTBED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/flagd-testbed");

/// Tags of scenarios that do not apply: the former bucketing scheme.
const SKIPPED_TAGS: &[&str] = &["@fractional-v1"];

#[derive(Debug, Clone)]
struct Scenario {
    file: String,
    name: String,
    steps: Vec<String>,
    /// Data tables attached to steps, by step index.
    tables: BTreeMap<usize, Vec<Vec<String>>>,
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(|c| c.trim().replace("\\\"", "\"")).collect()
}

/// Expands a feature file into concrete scenarios (outlines × example rows).
fn scenarios(file: &str, text: &str) -> Vec<Scenario> {
    #[derive(Default)]
    struct Outline {
        name: String,
        tags: Vec<String>,
        steps: Vec<String>,
        tables: BTreeMap<usize, Vec<Vec<String>>>,
        header: Option<Vec<String>>,
        rows_tags: Vec<String>,
        is_outline: bool,
    }
    let mut out = Vec::new();
    let mut feature_tags: Vec<String> = Vec::new();
    let mut pending: Vec<String> = Vec::new();
    let mut background: Vec<String> = Vec::new();
    let mut in_background = false;
    let mut cur: Option<Outline> = None;
    let mut in_examples = false;
    let flush = |cur: &mut Option<Outline>, out: &mut Vec<Scenario>, background: &[String]| {
        if let Some(o) = cur.take() {
            if !o.is_outline {
                let skip = o.tags.iter().any(|t| SKIPPED_TAGS.contains(&t.as_str()));
                if !skip {
                    let steps: Vec<String> = background.iter().cloned().chain(o.steps.clone()).collect();
                    let shift = background.len();
                    out.push(Scenario {
                        file: file.to_owned(),
                        name: o.name.clone(),
                        steps,
                        tables: o.tables.iter().map(|(k, v)| (k + shift, v.clone())).collect(),
                    });
                }
            }
        }
    };
    for raw in text.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with('@') {
            pending.extend(line.split_whitespace().map(str::to_owned));
            continue;
        }
        if line.starts_with("Feature:") {
            feature_tags = std::mem::take(&mut pending);
            continue;
        }
        if line.starts_with("Background:") {
            in_background = true;
            continue;
        }
        if let Some(name) = line
            .strip_prefix("Scenario Outline:")
            .or_else(|| line.strip_prefix("Scenario:"))
        {
            flush(&mut cur, &mut out, &background);
            in_background = false;
            in_examples = false;
            let mut tags = feature_tags.clone();
            tags.append(&mut pending);
            cur = Some(Outline {
                name: name.trim().to_owned(),
                tags,
                is_outline: line.starts_with("Scenario Outline:"),
                ..Outline::default()
            });
            continue;
        }
        if line.starts_with("Examples") {
            let o = cur.as_mut().expect("Examples inside a scenario");
            o.header = None;
            o.rows_tags = std::mem::take(&mut pending);
            in_examples = true;
            continue;
        }
        if line.starts_with('|') {
            let row = cells(line);
            let o = cur.as_mut().expect("a table inside a scenario");
            if in_examples {
                match &o.header {
                    None => o.header = Some(row),
                    Some(header) => {
                        let tags: Vec<&String> = o.tags.iter().chain(&o.rows_tags).collect();
                        if tags.iter().any(|t| SKIPPED_TAGS.contains(&t.as_str())) {
                            continue;
                        }
                        let fill = |s: &str| {
                            header
                                .iter()
                                .zip(&row)
                                .fold(s.to_owned(), |s, (h, v)| s.replace(&format!("<{h}>"), v))
                        };
                        let steps: Vec<String> = background
                            .iter()
                            .cloned()
                            .chain(o.steps.iter().map(|s| fill(s)))
                            .collect();
                        out.push(Scenario {
                            file: file.to_owned(),
                            name: format!("{} [{}]", o.name, row.join(", ")),
                            steps,
                            tables: o
                                .tables
                                .iter()
                                .map(|(k, v)| (k + background.len(), v.clone()))
                                .collect(),
                        });
                    }
                }
            } else {
                let at = o.steps.len() - 1;
                o.tables.entry(at).or_default().push(row);
            }
            continue;
        }
        let step = ["Given ", "When ", "Then ", "And ", "But "]
            .iter()
            .find_map(|k| line.strip_prefix(k))
            .unwrap_or_else(|| panic!("{file}: cannot read line `{line}`"))
            .to_owned();
        if in_background {
            background.push(step);
        } else {
            cur.as_mut().expect("a step inside a scenario").steps.push(step);
        }
    }
    flush(&mut cur, &mut out, &background);
    out
}

/// The text from after `marker` to the step's last quote: a value that may
/// itself hold quotes (a JSON object).
fn last_quoted<'s>(step: &'s str, marker: &str) -> &'s str {
    let start = step
        .find(marker)
        .unwrap_or_else(|| panic!("`{marker}` in `{step}`"))
        + marker.len();
    let end = step.rfind('"').expect("a closing quote");
    &step[start..end]
}

/// The quoted strings of a step, in order.
fn quoted(step: &str) -> Vec<String> {
    step.split('"').skip(1).step_by(2).map(str::to_owned).collect()
}

fn typed(kind: &str, text: &str) -> Value {
    match kind {
        "Boolean" => Value::Bool(text == "true"),
        "Integer" => Value::from(text.parse::<i64>().unwrap_or_else(|_| panic!("integer `{text}`"))),
        "Float" => Value::from(text.parse::<f64>().unwrap_or_else(|_| panic!("float `{text}`"))),
        "Object" => serde_json::from_str(text).unwrap_or_else(|e| panic!("object `{text}`: {e}")),
        _ => Value::String(text.to_owned()),
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn run(set: &FlagSet, sc: &Scenario) {
    let at = || format!("{}: {}", sc.file, sc.name);
    let mut flag = None::<(String, String, Value)>;
    let mut ctx = Context::new();
    let mut result = None;
    for (i, step) in sc.steps.iter().enumerate() {
        let q = quoted(step);
        if step == "an evaluator" {
        } else if let Some(kind) = step
            .strip_prefix("a ")
            .and_then(|s| s.split_once("-flag with key"))
            .map(|p| p.0)
        {
            flag = Some((
                q[0].clone(),
                kind.to_owned(),
                typed(kind, last_quoted(step, "fallback value \"")),
            ));
        } else if step.starts_with("a context containing a targeting key") {
            ctx.insert("targetingKey".into(), Value::String(q[0].clone()));
        } else if step.starts_with("a context containing a key") {
            ctx.insert(q[0].clone(), typed(&q[1], &q[2]));
        } else if step.starts_with("a context containing a nested property") {
            ctx.insert(q[0].clone(), serde_json::json!({ q[1].clone(): q[2].clone() }));
        } else if step == "the flag was evaluated with details" {
            let (key, kind, _) = flag.as_ref().unwrap_or_else(|| panic!("{}: no flag", at()));
            let want = match kind.as_str() {
                "Boolean" => VariantType::Boolean,
                "Integer" | "Float" => VariantType::Number,
                "Object" => VariantType::Object,
                _ => VariantType::String,
            };
            result = Some(set.evaluate(key, &ctx).expecting(want));
        } else {
            let r = result
                .as_ref()
                .unwrap_or_else(|| panic!("{}: not evaluated", at()));
            let fallback = &flag.as_ref().expect("flag").2;
            if step.starts_with("the resolved details value should be") {
                let kind = &flag.as_ref().expect("flag").1;
                let want = typed(kind, last_quoted(step, "should be \""));
                let got = r.value.clone().unwrap_or_else(|| fallback.clone());
                assert!(
                    same(&got, &want),
                    "{}: value {got}, expected {want} ({r:?})",
                    at()
                );
            } else if step.starts_with("the reason should be") {
                assert_eq!(r.reason.as_str(), q[0], "{}: {r:?}", at());
            } else if step.starts_with("the error-code should be") {
                let code = r.error.as_ref().map(|e| e.code.as_str());
                assert_eq!(code, Some(q[0].as_str()), "{}: {r:?}", at());
            } else if step == "the resolved metadata is empty" {
                assert!(r.metadata.is_empty(), "{}: {r:?}", at());
            } else if step == "the resolved metadata should contain" {
                let table = &sc.tables[&i];
                for row in &table[1..] {
                    let want = typed(&row[1], &row[2]);
                    let got = r
                        .metadata
                        .get(&row[0])
                        .unwrap_or_else(|| panic!("{}: no metadata {}", at(), row[0]));
                    assert!(
                        same(got, &want),
                        "{}: metadata {} is {got}, expected {want}",
                        at(),
                        row[0]
                    );
                }
            } else {
                panic!("{}: a step this runner does not know: `{step}`", at());
            }
        }
    }
}

#[test]
fn flagd_testbed_evaluator_scenarios_pass() {
    let text = std::fs::read_to_string(Path::new(TESTBED).join("testkit-flags.json")).expect("testbed flags");
    let set = FlagSet::parse(&text).expect("the testbed's flag file parses");
    let mut files: Vec<_> = std::fs::read_dir(TESTBED)
        .expect("testbed dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "feature"))
        .collect();
    files.sort();
    let mut count = 0;
    for path in &files {
        let name = path.file_name().expect("name").to_string_lossy().into_owned();
        for sc in scenarios(&name, &std::fs::read_to_string(path).expect("feature")) {
            run(&set, &sc);
            count += 1;
        }
    }
    // Every feature file read, and their scenarios all ran: a parser that
    // silently dropped some would fall short of this.
    assert_eq!(files.len(), 11);
    assert!(count >= 120, "only {count} scenarios ran");
}

#[test]
fn the_testbed_file_has_the_problems_its_error_scenarios_rely_on() {
    let text = std::fs::read_to_string(Path::new(TESTBED).join("testkit-flags.json")).expect("testbed flags");
    let set = FlagSet::parse(&text).expect("parses");
    let flagged: Vec<&str> = set.problems().iter().filter_map(|p| p.flag.as_deref()).collect();
    for key in [
        "ref-to-nonexistent-evaluator-flag",
        "semver-invalid-operator-flag",
        "starts-with-wrong-args-flag",
        "fractional-zero-weights-flag",
        "fractional-negative-weight-flag",
        "semver-wrong-args-flag",
    ] {
        assert!(
            flagged.contains(&key),
            "{key} should be reported; problems: {:?}",
            set.problems()
        );
    }
    assert!(
        set.validate().is_err(),
        "a file with problems must not be accepted for a write"
    );
}

fn rollout_file(percent: u32) -> FlagSet {
    FlagSet::parse(&format!(
        r#"{{ "flags": {{ "new-checkout": {{
            "state": "ENABLED", "variants": {{ "on": true, "off": false }}, "defaultVariant": "off",
            "targeting": {{ "fractional": [["on", {percent}], ["off", {}]] }} }} }} }}"#,
        100 - percent
    ))
    .expect("parses")
}

fn user(n: usize) -> Context {
    let mut ctx = Context::new();
    ctx.insert("targetingKey".into(), Value::String(format!("user-{n}")));
    ctx
}

#[test]
fn a_split_is_within_tolerance_over_100_000_keys() {
    for percent in [5, 25, 50] {
        let set = rollout_file(percent);
        set.validate().expect("valid");
        let on = (0..100_000)
            .filter(|&n| set.evaluate("new-checkout", &user(n)).variant.as_deref() == Some("on"))
            .count();
        let expected = 100_000 * percent as usize / 100;
        // 0.5 percentage points: about 10 standard deviations at 50 %.
        assert!(
            on.abs_diff(expected) < 500,
            "{percent} %: {on} of 100000 got `on`"
        );
    }
}

#[test]
fn a_user_keeps_their_variant_across_evaluations_reloads_and_growing_stages() {
    let stages: Vec<FlagSet> = [5, 25, 50, 100].into_iter().map(rollout_file).collect();
    let reloaded = rollout_file(5);
    for n in 0..20_000 {
        let ctx = user(n);
        let first = stages[0].evaluate("new-checkout", &ctx).variant;
        assert_eq!(
            stages[0].evaluate("new-checkout", &ctx).variant,
            first,
            "user-{n} changed between evaluations"
        );
        assert_eq!(
            reloaded.evaluate("new-checkout", &ctx).variant,
            first,
            "user-{n} changed after a reload"
        );
        // A rollout only adds users: once `on`, on in every later stage.
        let mut was_on = false;
        for set in &stages {
            let on = set.evaluate("new-checkout", &ctx).variant.as_deref() == Some("on");
            assert!(on || !was_on, "user-{n} left `on` as the split grew");
            was_on = on;
        }
        assert!(was_on, "user-{n} is not `on` at 100 %");
    }
}

#[test]
fn validation_names_the_flag_and_the_json_path_of_each_problem() {
    let set = FlagSet::parse(
        r#"{ "flags": {
            "a": { "state": "ENABLED", "variants": { "on": true, "off": "no" }, "defaultVariant": "of" },
            "b": { "state": "ENABLED", "variants": { "x": 1, "y": 2 }, "defaultVariant": "x",
                   "targeting": { "fractional": [["x", 50.5], ["y", 50]] } },
            "c": { "state": "ENABLED", "variants": { "x": 1 }, "defaultVariant": "x",
                   "targeting": { "if": [{ "stars_with": [{ "var": "id" }, "a"] }, "x"] } },
            "d": { "state": "ENABLED", "variants": { "x": 1 }, "defaultVariant": "x",
                   "targeting": { "if": [{ "==": [{ "var": "s" }, "i"] }, "z"] } }
        } }"#,
    )
    .expect("parses");
    let got: Vec<String> = set.problems().iter().map(ToString::to_string).collect();
    let expect = [
        "flag `a` at $.flags.a.variants.on: variant `on` is a boolean but `off` is a string",
        "flag `a` at $.flags.a.defaultVariant: default variant `of` is not a variant; the variants are `off`, `on`",
        "flag `b` at $.flags.b.targeting.fractional[0][1]: weight 50.5 is not a whole number",
        "flag `c` at $.flags.c.targeting.if[0].stars_with: unknown operator `stars_with`; did you mean `starts_with`?",
        "flag `d` at $.flags.d.targeting.if[1]: `z` is not a variant; the variants are `x`",
    ];
    for e in expect {
        assert!(got.iter().any(|g| g.starts_with(e)), "missing `{e}` in {got:#?}");
    }
    assert_eq!(got.len(), expect.len(), "{got:#?}");
    // The unknown operator makes `c` unevaluable; the others still answer.
    let c = set.evaluate("c", &Context::new());
    assert_eq!(c.error.map(|e| e.code.as_str()), Some("PARSE_ERROR"));
}

#[test]
fn dark_launch_enables_a_segment_only() {
    let set = FlagSet::parse(
        r#"{ "flags": { "new-checkout": { "state": "ENABLED", "variants": { "on": true, "off": false },
            "defaultVariant": "off",
            "targeting": { "if": [{ "==": [{ "var": "segment" }, "internal"] }, "on", null] } } } }"#,
    )
    .expect("parses");
    set.validate().expect("valid");
    let mut internal = user(1);
    internal.insert("segment".into(), "internal".into());
    let mut public = user(1);
    public.insert("segment".into(), "public".into());
    assert_eq!(
        set.evaluate("new-checkout", &internal).value,
        Some(Value::Bool(true))
    );
    assert_eq!(
        set.evaluate("new-checkout", &public).value,
        Some(Value::Bool(false))
    );
    assert_eq!(set.evaluate("new-checkout", &public).reason.as_str(), "DEFAULT");
}

mod store {
    use deploykit::flags::{FlagChange, FlagChangeKind, FlagError, FlagStore};
    use serde_json::Value;

    const FILE: &str = r#"{ "flags": { "new-checkout": { "state": "ENABLED",
        "variants": { "on": true, "off": false }, "defaultVariant": "off",
        "targeting": { "fractional": [["on", 25], ["off", 75]] } } } }"#;

    fn setup() -> (tempfile::TempDir, FlagStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("flags.json"), FILE).expect("write");
        let store = FlagStore::new(
            dir.path().join("flags.json"),
            dir.path().join("state/flags.jsonl"),
        );
        (dir, store)
    }

    fn change(kind: FlagChangeKind) -> FlagChange {
        FlagChange {
            flag: "new-checkout".into(),
            kind,
            who: "alice".into(),
            why: Some("test".into()),
        }
    }

    #[test]
    fn kill_is_one_journaled_write_and_idempotent() {
        let (_dir, store) = setup();
        let record = store
            .apply(&change(FlagChangeKind::Kill))
            .expect("kill")
            .expect("a change");
        assert_eq!(record.who, "alice");
        assert!(record.before["targeting"].is_object());
        assert_eq!(record.after["defaultVariant"], "off");
        assert!(record.after.get("targeting").is_none());
        let set = store.load().expect("load");
        let e = set.evaluate("new-checkout", &super::user(7));
        assert_eq!((e.value, e.reason.as_str()), (Some(Value::Bool(false)), "STATIC"));
        // Again: nothing to do, nothing written or journaled.
        assert!(store
            .apply(&change(FlagChangeKind::Kill))
            .expect("kill")
            .is_none());
        assert_eq!(store.history().expect("history").len(), 1);
    }

    #[test]
    fn a_change_that_would_break_the_file_is_refused_and_the_old_file_kept() {
        let (_dir, store) = setup();
        let before = std::fs::read(store.file()).expect("read");
        let bad =
            serde_json::json!({ "state": "ENABLED", "variants": { "on": true }, "defaultVariant": "nope" });
        let err = store
            .apply(&change(FlagChangeKind::Put { definition: bad }))
            .expect_err("refused");
        assert!(matches!(err, FlagError::Invalid(_)), "{err}");
        assert!(
            err.to_string().contains("$.flags.new-checkout.defaultVariant"),
            "{err}"
        );
        let err = store
            .apply(&change(FlagChangeKind::Default {
                variant: "maybe".into(),
            }))
            .expect_err("refused");
        assert!(err.to_string().contains("`maybe` is not a variant"), "{err}");
        assert_eq!(
            std::fs::read(store.file()).expect("read"),
            before,
            "the old file must be untouched"
        );
        assert!(store.history().expect("history").is_empty());
    }

    #[test]
    fn a_malformed_file_on_disk_is_reported_not_overwritten() {
        let (_dir, store) = setup();
        std::fs::write(store.file(), "{ \"flags\": ").expect("write");
        let err = store.apply(&change(FlagChangeKind::Kill)).expect_err("refused");
        assert!(matches!(err, FlagError::Syntax { line: 1, .. }), "{err}");
        assert_eq!(
            std::fs::read_to_string(store.file()).expect("read"),
            "{ \"flags\": "
        );
    }

    #[test]
    fn a_split_writes_a_fractional_rule_against_the_safe_variant() {
        let (_dir, store) = setup();
        store
            .apply(&change(FlagChangeKind::Split {
                variant: "on".into(),
                percent: 50,
            }))
            .expect("split");
        let set = store.load().expect("load");
        assert_eq!(
            set.get("new-checkout").expect("flag").raw()["targeting"],
            serde_json::json!({ "fractional": [["on", 50], ["off", 50]] })
        );
        let history = store.history().expect("history");
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].kind.name(), "split");
    }
}

mod rollout {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use deploykit::analysis::AnalysisRules;
    use deploykit::flags::{FlagError, FlagRollout, FlagStore, RolloutEvent, RolloutOutcome};
    use deploykit::{Metric, Observation};
    use deploykit_testkit::FakeMetrics;
    use tokio::time::Instant;
    use tokio_util::sync::CancellationToken;

    const FILE: &str = r#"{ "flags": { "new-checkout": { "state": "ENABLED",
        "variants": { "on": true, "off": false }, "defaultVariant": "off" } } }"#;

    fn setup() -> (tempfile::TempDir, FlagStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("flags.json"), FILE).expect("write");
        let store = FlagStore::new(dir.path().join("flags.json"), dir.path().join("flags.jsonl"));
        (dir, store)
    }

    fn rollout() -> FlagRollout {
        FlagRollout {
            flag: "new-checkout".into(),
            variant: "on".into(),
            stages: vec![5, 25, 50, 100],
            stage_duration: Duration::from_secs(300),
            interval: Duration::from_secs(30),
            rules: AnalysisRules::default(),
            who: "rollout".into(),
        }
    }

    fn healthy() -> FakeMetrics {
        FakeMetrics::new()
            .set("on", Metric::ErrorRate, 0.001)
            .set("on", Metric::LatencyP99, 0.05)
            .set("off", Metric::ErrorRate, 0.001)
    }

    fn actions(store: &FlagStore) -> Vec<String> {
        store
            .history()
            .expect("history")
            .iter()
            .map(|r| r.kind.name().to_owned())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_rollout_walks_every_stage_to_100_percent() {
        let (_dir, store) = setup();
        let started = Instant::now();
        let outcome = rollout()
            .run(&store, &healthy(), &CancellationToken::new(), |_| {})
            .await
            .expect("runs");
        assert_eq!(outcome, RolloutOutcome::Completed);
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(4 * 300),
            "each stage held for its duration"
        );
        assert_eq!(actions(&store), ["split", "split", "split", "split"]);
        let history = store.history().expect("history");
        let percents: Vec<u64> = history
            .iter()
            .map(|r| r.after["targeting"]["fractional"][0][1].as_u64().expect("weight"))
            .collect();
        assert_eq!(percents, [5, 25, 50, 100]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_breach_kills_the_flag_within_one_check_interval() {
        let (_dir, store) = setup();
        // Healthy until 7 min (stage 2, 25 %), then 5 % errors on `on` only.
        let breach = Duration::from_secs(420);
        let metrics = healthy().script("on", Metric::ErrorRate, move |t| {
            Observation::Value(if t < breach { 0.001 } else { 0.05 })
        });
        let epoch = Instant::now();
        let killed_at = Arc::new(Mutex::new(None));
        let seen = killed_at.clone();
        let outcome = rollout()
            .run(&store, &metrics, &CancellationToken::new(), move |e| {
                if let RolloutEvent::Killed { .. } = e {
                    *seen.lock().unwrap() = Some(epoch.elapsed());
                }
            })
            .await
            .expect("runs");
        let RolloutOutcome::Killed { stage, reason } = outcome else {
            panic!("not killed: {outcome:?}")
        };
        assert_eq!(stage, 2);
        assert!(
            reason.contains("25 %") && reason.contains("error rate"),
            "{reason}"
        );
        let at = killed_at.lock().unwrap().expect("a kill event");
        assert!(
            at >= breach && at <= breach + Duration::from_secs(30),
            "killed at {at:?}, breach at {breach:?}"
        );
        assert_eq!(actions(&store), ["split", "split", "kill"]);
        let set = store.load().expect("load");
        let e = set.evaluate("new-checkout", &super::user(3));
        assert_eq!((e.variant.as_deref(), e.reason.as_str()), (Some("off"), "STATIC"));
        assert_eq!(
            store.history().expect("history")[2].why.as_deref(),
            Some(reason.as_str())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stage_without_data_is_never_healthy() {
        let (_dir, store) = setup();
        let mut r = rollout();
        r.rules.inconclusive_limit = 100;
        let outcome = r
            .run(&store, &FakeMetrics::new(), &CancellationToken::new(), |_| {})
            .await
            .expect("runs");
        assert!(
            matches!(outcome, RolloutOutcome::Killed { stage: 1, .. }),
            "{outcome:?}"
        );
        assert_eq!(actions(&store), ["split", "kill"]);
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_kills_the_flag() {
        let (_dir, store) = setup();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(400)).await;
            c.cancel();
        });
        let outcome = rollout()
            .run(&store, &healthy(), &cancel, |_| {})
            .await
            .expect("runs");
        assert_eq!(outcome, RolloutOutcome::Cancelled { stage: 2 });
        assert_eq!(actions(&store), ["split", "split", "kill"]);
    }

    #[tokio::test(start_paused = true)]
    async fn bad_rollouts_are_refused_before_anything_is_written() {
        let (_dir, store) = setup();
        let before = std::fs::read(store.file()).expect("read");
        for (what, r) in [
            (
                "decreasing stages",
                FlagRollout {
                    stages: vec![50, 25],
                    ..rollout()
                },
            ),
            (
                "above 100",
                FlagRollout {
                    stages: vec![5, 150],
                    ..rollout()
                },
            ),
            (
                "the safe variant",
                FlagRollout {
                    variant: "off".into(),
                    ..rollout()
                },
            ),
            (
                "an unknown variant",
                FlagRollout {
                    variant: "maybe".into(),
                    ..rollout()
                },
            ),
            (
                "interval above the stage",
                FlagRollout {
                    interval: Duration::from_secs(600),
                    ..rollout()
                },
            ),
        ] {
            let err = r
                .run(&store, &healthy(), &CancellationToken::new(), |_| {})
                .await
                .expect_err(what);
            assert!(matches!(err, FlagError::BadChange { .. }), "{what}: {err}");
        }
        assert_eq!(std::fs::read(store.file()).expect("read"), before);
        assert!(store.history().expect("history").is_empty());
    }
}

/// Found by the `flags` fuzz target: a default variant the flag does not
/// have was answered as that variant with no value and no error.
#[test]
fn a_default_variant_that_is_not_a_variant_is_an_evaluation_error() {
    let set = FlagSet::parse(
        r#"{"flags":{"f":{"state":"ENABLED","variants":{"on":true,"no":false},"defaultVariant":"off"}}}"#,
    )
    .expect("a flag file with a problem in one flag still parses");
    assert!(set.validate().is_err(), "the problem is listed");
    let e = set.evaluate("f", &Context::new());
    assert_eq!(e.reason, deploykit::flags::Reason::Error);
    assert_eq!(e.variant, None);
    assert_eq!(e.value, None);
    let err = e.error.expect("an error");
    assert_eq!(err.code, deploykit::flags::ErrorCode::General);
    assert!(err.detail.contains("`off`"), "{}", err.detail);
}
