//! Entry points for the fuzz targets in `fuzz/` and for the test that
//! replays their corpora on stable Rust: each takes arbitrary bytes, runs
//! one parser of outside input, and panics when a property of its answer
//! does not hold (not only when the parser itself panics).
//!
//! Hidden from the documentation: these are not an API, they let the fuzz
//! crate reach parsers that stay private to their drivers.

use serde_json::Value;

/// Splits the input at its first newline: the head steers the target (a
/// mode byte, an HTTP status), the rest is the text under test.
fn split_head(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&[], data),
    }
}

/// HAProxy's `show stat` CSV (`mode` 0) and `show servers state` (any other
/// first byte), as the driver reads them from the admin socket.
#[cfg(feature = "haproxy")]
pub fn haproxy(data: &[u8]) {
    use crate::lb::haproxy::{parse_servers_state, parse_stat_csv};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let has_header = text.lines().any(|l| l.starts_with("# "));
    if mode % 2 == 0 {
        match parse_stat_csv(text) {
            Ok(rows) => {
                assert!(
                    has_header,
                    "a `show stat` answer without a header line was accepted"
                );
                let header = text.lines().find_map(|l| l.strip_prefix("# ")).unwrap();
                let names: Vec<&str> = header.split(',').collect();
                let data_lines = text
                    .lines()
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .count();
                assert_eq!(rows.len(), data_lines, "one row per data line");
                for row in &rows {
                    for key in row.keys() {
                        assert!(!key.is_empty(), "an empty column name became a key");
                        assert!(
                            names.contains(&key.as_str()),
                            "a key that is not in the header: {key}"
                        );
                    }
                }
            }
            Err(_) => assert!(!has_header, "a `show stat` answer with a header line was refused"),
        }
    } else if let Ok(servers) = parse_servers_state(text) {
        assert!(
            has_header,
            "a `show servers state` answer without a header line was accepted"
        );
        for s in &servers {
            assert!(
                !s.name.is_empty() && !s.name.contains(char::is_whitespace),
                "a server name is one whitespace-free field"
            );
            assert!(text.contains(&s.name), "the server name comes from the answer");
        }
    }
}

/// A Prometheus `/api/v1/query` answer: the first line is the HTTP status,
/// the rest the body, read both as a single value and as histogram buckets.
#[cfg(feature = "prometheus")]
pub fn prometheus(data: &[u8]) {
    use crate::judge::Measured;
    use crate::metrics::prometheus::{parse_buckets, parse_response};
    use crate::Observation;
    let (head, body) = split_head(data);
    let status = std::str::from_utf8(head)
        .ok()
        .and_then(|h| h.trim().parse::<u16>().ok())
        .unwrap_or(200);
    let Ok(body) = std::str::from_utf8(body) else {
        return;
    };
    let ok_status = (200..300).contains(&status);
    match parse_response(status, body) {
        Observation::Value(v) => {
            assert!(
                v.is_finite(),
                "a value is finite, NaN and infinities are no data: {v}"
            );
            assert!(ok_status, "an error status (HTTP {status}) gave a value");
        }
        Observation::NoData => assert!(ok_status, "an error status (HTTP {status}) gave no data"),
        Observation::ProviderError(m) => assert!(!m.is_empty(), "a provider error says what is wrong"),
    }
    match parse_buckets(status, body) {
        Measured::Value(d) => {
            assert!(ok_status, "an error status (HTTP {status}) gave a distribution");
            assert!(d.count() > 0.0, "an empty distribution is no data");
            for (at, n) in &d.points {
                assert!(!at.is_nan() && *n > 0.0, "a point is a bound with requests at it");
            }
        }
        Measured::NoData => assert!(ok_status, "an error status (HTTP {status}) gave no data"),
        Measured::ProviderError(m) => assert!(!m.is_empty(), "a provider error says what is wrong"),
    }
}

/// The nginx driver's `# deploykit-state:` comment line: a line that
/// parses survives writing and reading back unchanged.
#[cfg(feature = "nginx")]
pub fn nginx_state_line(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    crate::lb::nginx::fuzz_state_line(text);
}

/// A journal line: the deployment journal's when the first byte is even,
/// the flag change journal's when it is odd.
pub fn journal(data: &[u8]) {
    match data.split_first() {
        Some((mode, rest)) if mode % 2 == 0 => journal_line(rest),
        Some((_, rest)) => flag_journal_line(rest),
        None => {}
    }
}

/// A deployment journal line (possibly torn: two records on one line): a
/// record that parses is written back to the same record, on one line.
fn journal_line(data: &[u8]) {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(record) = crate::state::fuzz_journal_line(line) {
        let again = serde_json::to_string(&record).expect("a parsed record serializes");
        assert!(!again.contains('\n'), "a record is written on one line");
        let back: crate::state::JournalRecord =
            serde_json::from_str(&again).expect("a written record parses");
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&record).unwrap(),
            "a record reads back as written"
        );
    }
}

/// A flag file (flagd JSON), then every flag evaluated for a few contexts:
/// a syntax error points into the text, and an evaluation's value is one of
/// the flag's variants.
pub fn flag_file(data: &[u8]) {
    use crate::flags::{FlagError, FlagSet, Reason};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let set = match FlagSet::parse(text) {
        Ok(set) => set,
        Err(FlagError::Syntax { line, .. }) => {
            assert!(
                // `split`, not `lines`: an error at the end of a file that
                // ends with a newline is on the empty line after it.
                line >= 1 && line <= text.split('\n').count(),
                "a syntax error on a line of the file"
            );
            return;
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    let _ = set.validate();
    let contexts = [
        serde_json::Map::new(),
        serde_json::json!({"targetingKey": "user-1", "email": "a@example.com", "age": 30, "version": "1.2.3"})
            .as_object()
            .unwrap()
            .clone(),
    ];
    for flag in set.flags() {
        for ctx in &contexts {
            check_evaluation(flag, &flag.evaluate(ctx));
        }
    }
    let missing = set.evaluate("\u{0}no such flag", &contexts[0]);
    assert_eq!(missing.reason, Reason::Error, "a missing flag is an error");
}

fn check_evaluation(flag: &crate::flags::Flag, e: &crate::flags::Evaluation) {
    use crate::flags::Reason;
    assert_eq!(e.key, flag.key());
    assert_eq!(
        e.error.is_some(),
        e.reason == Reason::Error,
        "an error reason carries its error"
    );
    if let Some(v) = &e.variant {
        let value = flag.variants().get(v);
        assert!(value.is_some(), "the variant {v} is one of the flag's variants");
        if let Some(val) = &e.value {
            assert_eq!(Some(val), value, "the value is the variant's value");
        }
    }
}

/// A line of the flag change journal (`flags history`): one that parses is
/// written back to the same record.
fn flag_journal_line(data: &[u8]) {
    use crate::flags::FlagChangeRecord;
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = serde_json::from_str::<FlagChangeRecord>(line) {
        let again = serde_json::to_string(&r).expect("a parsed record serializes");
        let back: FlagChangeRecord = serde_json::from_str(&again).expect("a written record parses");
        assert_eq!(
            serde_json::to_value(&back).unwrap(),
            serde_json::to_value(&r).unwrap(),
            "a record reads back as written"
        );
    }
}

/// An OFREP evaluation request body, then each flag of a set with targeting
/// rules evaluated for the context it carries: any context gives an
/// evaluation that names one of the flag's variants, or a typed error.
pub fn ofrep_request(data: &[u8]) {
    use crate::flags::{ofrep_context, FlagSet, OfrepRequestError};
    let ctx = match ofrep_context(data) {
        Ok(ctx) => ctx,
        Err(e) => {
            if let OfrepRequestError::NotJson(_) = e {
                assert!(
                    serde_json::from_slice::<Value>(data).is_err(),
                    "JSON refused as not JSON"
                );
            }
            return;
        }
    };
    assert!(
        ctx.get("targetingKey").is_none_or(Value::is_string),
        "an accepted context has a string targetingKey"
    );
    static FLAGS: std::sync::OnceLock<FlagSet> = std::sync::OnceLock::new();
    let set = FLAGS.get_or_init(|| FlagSet::parse(OFREP_FLAGS).expect("the fuzz flag set parses"));
    for flag in set.flags() {
        check_evaluation(flag, &flag.evaluate(&ctx));
    }
}

/// Flags whose rules read the context in every way the evaluator knows:
/// fractional rollout, semver, string and numeric comparisons, `in`.
const OFREP_FLAGS: &str = r#"{
  "flags": {
    "rollout": {
      "state": "ENABLED",
      "variants": {"on": true, "off": false},
      "defaultVariant": "off",
      "targeting": {"fractional": [["on", 25], ["off", 75]]}
    },
    "by-version": {
      "state": "ENABLED",
      "variants": {"new": "v2", "old": "v1"},
      "defaultVariant": "old",
      "targeting": {"if": [{"sem_ver": [{"var": "version"}, ">=", "1.2.0"]}, "new", "old"]}
    },
    "by-attrs": {
      "state": "ENABLED",
      "variants": {"a": 1, "b": 2, "c": 3},
      "defaultVariant": "a",
      "targeting": {"if": [
        {"ends_with": [{"var": "email"}, "@example.com"]}, "b",
        {">": [{"var": "age"}, 40]}, "c",
        {"in": [{"var": "country"}, ["de", "fr"]]}, "b",
        null
      ]}
    }
  }
}"#;

/// A metrics query template and a duration text, as config files give
/// them: an accepted template renders with no placeholder left and reads
/// back from its own text; an accepted duration is within the maximum.
pub fn query_template(data: &[u8]) {
    use crate::metrics::QueryTemplate;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(t) = QueryTemplate::parse("fuzz", text) {
        let group = crate::Group::new("canary").unwrap();
        let q = t.render(&group, std::time::Duration::from_secs(300));
        assert!(
            !q.contains("{group}") && !q.contains("{window}"),
            "a placeholder was left: {q}"
        );
        assert!(q.contains("canary"), "the group is in the query");
        assert_eq!(
            QueryTemplate::parse("fuzz", t.as_str()).ok(),
            Some(t),
            "a template reads back"
        );
    }
    if let Ok(d) = crate::strategy::parse_duration_text(text) {
        assert!(
            d <= crate::duration_text::MAX,
            "a duration above the maximum was accepted"
        );
    }
}
