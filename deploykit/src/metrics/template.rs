//! A query template with `{group}` and `{window}` placeholders, filled only
//! from validated values.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::names::Group;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Group,
    Window,
}

/// A metrics query with two placeholders: `{group}` (the track, a validated
/// [`Group`] name: `[A-Za-z0-9._-]` only, so it cannot break out of a quoted
/// PromQL label value) and `{window}` (the analysis window as a Prometheus
/// duration, e.g. `300s`).
///
/// PromQL's own braces (`metric{label="x"}`) are left alone; a brace pair
/// around a bare word that is not a placeholder (`{grup}`) is refused, as it
/// is never valid PromQL and almost certainly a typo.
///
/// ```
/// use std::time::Duration;
/// use deploykit::metrics::QueryTemplate;
/// use deploykit::Group;
///
/// let t = QueryTemplate::parse(
///     "queries.error_rate",
///     r#"sum(rate(http_requests_total{track="{group}"}[{window}]))"#,
/// )?;
/// let q = t.render(&Group::new("canary")?, Duration::from_secs(300));
/// assert_eq!(q, r#"sum(rate(http_requests_total{track="canary"}[300s]))"#);
/// assert!(QueryTemplate::parse("q", "up{job=\"{grup}\"}").is_err());
/// # Ok::<(), deploykit::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryTemplate {
    text: String,
    parts: Vec<Part>,
}

impl QueryTemplate {
    /// Parses and checks `text`, naming `field` in errors.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] when the text is empty, has no `{group}`
    /// (the query would not tell the tracks apart), or has an unknown
    /// `{placeholder}`.
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        if text.trim().is_empty() {
            return Err(Error::invalid(
                field,
                "is empty; write a PromQL query using {group} and {window}",
            ));
        }
        let mut parts = Vec::new();
        let mut rest = text;
        let mut literal = String::new();
        let mut has_group = false;
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let word_len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            let word = &after[..word_len];
            if after[word_len..].starts_with('}') && !word.is_empty() {
                let part = match word {
                    "group" => {
                        has_group = true;
                        Part::Group
                    }
                    "window" => Part::Window,
                    other => {
                        return Err(Error::invalid(
                            field,
                            format!("has the unknown placeholder {{{other}}}; the placeholders are {{group}} and {{window}}"),
                        ))
                    }
                };
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(part);
                rest = &after[word_len + 1..];
            } else {
                literal.push('{');
                rest = after;
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        if !has_group {
            return Err(Error::invalid(
                field,
                "has no {group} placeholder, so it cannot tell the canary from stable; select the track with e.g. track=\"{group}\"",
            ));
        }
        Ok(Self {
            text: text.to_string(),
            parts,
        })
    }

    /// Fills the placeholders.
    pub fn render(&self, group: &Group, window: Duration) -> String {
        let window = prom_duration(window);
        let mut out = String::with_capacity(self.text.len() + 16);
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Group => out.push_str(group.as_str()),
                Part::Window => out.push_str(&window),
            }
        }
        out
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// A duration as Prometheus writes it: whole seconds as `300s`, otherwise
/// milliseconds (`1500ms`); never below `1ms`.
pub(crate) fn prom_duration(d: Duration) -> String {
    let ms = d.as_millis().max(1);
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

impl fmt::Display for QueryTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Serialize for QueryTemplate {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for QueryTemplate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse("query", &s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_placeholders_and_keeps_promql_braces() {
        let t = QueryTemplate::parse(
            "q",
            r#"histogram_quantile(0.99, sum by (le) (rate(x_bucket{track="{group}"}[{window}]))) or {group}"#,
        )
        .unwrap();
        let g = Group::new("canary-2").unwrap();
        assert_eq!(
            t.render(&g, Duration::from_millis(1500)),
            r#"histogram_quantile(0.99, sum by (le) (rate(x_bucket{track="canary-2"}[1500ms]))) or canary-2"#
        );
        assert_eq!(prom_duration(Duration::from_secs(10)), "10s");
        assert_eq!(prom_duration(Duration::ZERO), "1ms");
    }

    #[test]
    fn refuses_bad_templates_naming_the_field() {
        for (text, needle) in [
            ("", "is empty"),
            ("sum(rate(x[5m]))", "no {group}"),
            (r#"x{track="{grup}"}"#, "unknown placeholder {grup}"),
            (r#"x{track="{group}"}[{windw}]"#, "unknown placeholder {windw}"),
        ] {
            let e = QueryTemplate::parse("metrics.queries.error_rate", text)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("metrics.queries.error_rate") && e.contains(needle),
                "{text}: {e}"
            );
        }
        // A brace that is PromQL, not a placeholder, is fine.
        QueryTemplate::parse("q", r#"x{track="{group}",code=~"5.."}"#).unwrap();
        QueryTemplate::parse("q", r#"x{} or y{track="{group}"}"#).unwrap();
    }

    #[test]
    fn serde_round_trip_validates() {
        let t: QueryTemplate = serde_json::from_str(r#""up{track=\"{group}\"}""#).unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), r#""up{track=\"{group}\"}""#);
        assert!(serde_json::from_str::<QueryTemplate>(r#""up{x=\"{nope}\"}""#).is_err());
    }
}
