//! Routing rules on HAProxy: map files changed through the runtime API, no
//! reload.
//!
//! Each rule reads one map file, named by what it looks at and how it
//! compares: `<map_dir>/<backend>.<header|cookie|query>.<name>.<exact|prefix|regex>.map`.
//! haproxy.cfg loads it with one `use_backend` line (see [`config_line`]),
//! whose key is the request value and whose value is the group's backend
//! `<backend>__<group>` (servers that `track` the main backend's servers,
//! so drains and maintenance follow). A change writes every map deploykit
//! owns as a new version (`prepare map`, `add map @N`, `commit map @N`:
//! each map swaps atomically), then reads each back with `show map`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{socket_word, RuntimeApi};
use crate::error::DriverError;
use crate::routing::{Match, TrafficPolicy, ValueMatch};

/// The map file a rule reads.
pub(super) fn map_file(dir: &Path, backend: &str, m: &Match) -> PathBuf {
    let (kind, name) = match m {
        Match::Header { name, .. } => ("header", name.to_ascii_lowercase()),
        Match::Cookie { name, .. } => ("cookie", name.clone()),
        Match::Query { name, .. } => ("query", name.clone()),
    };
    let how = match m.value() {
        ValueMatch::Exact(_) => "exact",
        ValueMatch::Prefix(_) => "prefix",
        ValueMatch::Regex(_) => "regex",
    };
    dir.join(format!("{backend}.{kind}.{name}.{how}.map"))
}

/// The haproxy.cfg line (frontend) that routes by `m` through its map.
pub fn config_line(dir: &Path, backend: &str, m: &Match) -> String {
    let fetch = match m {
        Match::Header { name, .. } => format!("req.fhdr({})", name.to_ascii_lowercase()),
        Match::Cookie { name, .. } => format!("req.cook({name})"),
        Match::Query { name, .. } => format!("url_param({name})"),
    };
    let conv = match m.value() {
        ValueMatch::Exact(_) => "map_str",
        ValueMatch::Prefix(_) => "map_beg",
        ValueMatch::Regex(_) => "map_reg",
    };
    let file = map_file(dir, backend, m);
    let expr = format!("{fetch},{conv}({})", file.display());
    format!("use_backend %[{expr}] if {{ {expr} -m found }}")
}

/// The entries each owned map should hold for `policy` (every loaded map
/// under `dir`, empty when no rule uses it).
pub(super) fn desired(
    dir: &Path,
    backend: &str,
    policy: Option<&TrafficPolicy>,
    loaded: &BTreeSet<PathBuf>,
) -> Result<BTreeMap<PathBuf, Vec<(String, String)>>, DriverError> {
    let mut want: BTreeMap<PathBuf, Vec<(String, String)>> = loaded
        .iter()
        .filter(|f| f.starts_with(dir))
        .map(|f| (f.clone(), Vec::new()))
        .collect();
    for (i, rule) in policy.map_or(&[][..], |p| p.rules.as_slice()).iter().enumerate() {
        let file = map_file(dir, backend, &rule.matches);
        let Some(entries) = want.get_mut(&file) else {
            return Err(DriverError::new(format!(
                "rules[{i}] needs the HAProxy map {}, which HAProxy has not loaded; add to the frontend \
                 in haproxy.cfg (and create the file empty): `{}`",
                file.display(),
                config_line(dir, backend, &rule.matches)
            )));
        };
        let key = rule.matches.value().text();
        if key.contains(';') {
            return Err(DriverError::new(format!(
                "rules[{i}]: the value {key} contains ';', which the HAProxy runtime API reads as the end \
                 of a command; match it with a regex (e.g. \\x3b)"
            )));
        }
        // Two rules on one map with the same key: the first decides.
        if !entries.iter().any(|(k, _)| k == key) {
            entries.push((key.to_string(), format!("{backend}__{}", rule.group)));
        }
    }
    Ok(want)
}

/// The map files HAProxy has loaded (`show map`).
pub(super) async fn loaded_maps(api: &RuntimeApi) -> Result<BTreeSet<PathBuf>, DriverError> {
    let out = api.command("show map").await?;
    Ok(out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let start = l.find('(')? + 1;
            let end = start + l[start..].find(')')?;
            Some(PathBuf::from(&l[start..end]))
        })
        .collect())
}

/// The entries of one map, in order (`show map <file>`).
pub(super) async fn entries(api: &RuntimeApi, file: &Path) -> Result<Vec<(String, String)>, DriverError> {
    let f = file_word(file)?;
    let out = api.command(&format!("show map {f}")).await?;
    let mut list = Vec::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some(_ptr), Some(k), Some(v)) => list.push((k.to_string(), v.to_string())),
            _ => {
                return Err(DriverError::new(format!(
                    "unexpected answer to `show map {f}`: {line}"
                )))
            }
        }
    }
    Ok(list)
}

/// Replaces the entries of `file` with `want` as one new version, then
/// reads them back.
pub(super) async fn write_map(
    api: &RuntimeApi,
    file: &Path,
    want: &[(String, String)],
) -> Result<(), DriverError> {
    let f = file_word(file)?;
    let out = api.command(&format!("prepare map {f}")).await?;
    let version = out
        .trim()
        .strip_prefix("New version created:")
        .map(str::trim)
        .filter(|v| v.chars().all(|c| c.is_ascii_digit()) && !v.is_empty())
        .ok_or_else(|| DriverError::new(format!("HAProxy refused `prepare map {f}`: {}", out.trim())))?
        .to_string();
    let mut cmds: Vec<String> = Vec::new();
    for (k, v) in want {
        socket_word("HAProxy map value", v)?;
        cmds.push(format!("add map @{version} {f} {} {v}", escape(k)));
    }
    cmds.push(format!("commit map @{version} {f}"));
    let out = api.command(&cmds.join(";")).await?;
    let msg: Vec<&str> = out.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if !msg.is_empty() {
        return Err(DriverError::new(format!(
            "HAProxy rejected the new entries of map {f}: {}",
            msg.join("; ")
        )));
    }
    let got = entries(api, file).await?;
    let mut a = got.clone();
    let mut b = want.to_vec();
    a.sort();
    b.sort();
    if a != b {
        return Err(DriverError::new(format!(
            "HAProxy did not take the change of map {f}: it holds {} entries, expected {}",
            got.len(),
            want.len()
        )));
    }
    Ok(())
}

fn file_word(file: &Path) -> Result<String, DriverError> {
    let f = file.display().to_string();
    socket_word("HAProxy map file", &f)?;
    Ok(f)
}

/// A key for the runtime API's command line, where a backslash escapes the
/// next character.
fn escape(key: &str) -> String {
    key.replace('\\', "\\\\")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Rule;
    use crate::Group;

    fn header(value: ValueMatch, group: &str) -> Rule {
        Rule {
            matches: Match::Header {
                name: "X-Canary".into(),
                value,
            },
            group: Group::new(group).unwrap(),
        }
    }

    #[test]
    fn each_rule_reads_the_map_of_its_kind_and_comparison() {
        let dir = Path::new("/etc/haproxy/dk");
        let m = header(ValueMatch::Exact("always".into()), "canary").matches;
        assert_eq!(
            map_file(dir, "app", &m),
            Path::new("/etc/haproxy/dk/app.header.x-canary.exact.map")
        );
        assert_eq!(
            config_line(dir, "app", &m),
            "use_backend %[req.fhdr(x-canary),map_str(/etc/haproxy/dk/app.header.x-canary.exact.map)] \
             if { req.fhdr(x-canary),map_str(/etc/haproxy/dk/app.header.x-canary.exact.map) -m found }"
        );
    }

    #[test]
    fn a_rule_without_its_map_loaded_names_the_line_to_add_and_unused_maps_are_emptied() {
        let dir = Path::new("/etc/haproxy/dk");
        let exact = PathBuf::from("/etc/haproxy/dk/app.header.x-canary.exact.map");
        let other = PathBuf::from("/etc/haproxy/dk/app.cookie.beta.exact.map");
        let loaded = BTreeSet::from([
            exact.clone(),
            other.clone(),
            PathBuf::from("/etc/haproxy/geo.map"),
        ]);
        let policy = TrafficPolicy {
            rules: vec![header(ValueMatch::Exact("always".into()), "canary")],
            ..TrafficPolicy::switch(&Group::new("stable").unwrap())
        };
        let want = desired(dir, "app", Some(&policy), &loaded).unwrap();
        assert_eq!(
            want,
            BTreeMap::from([
                (exact, vec![("always".to_string(), "app__canary".to_string())]),
                (other, Vec::new()),
            ])
        );
        let policy = TrafficPolicy {
            rules: vec![header(ValueMatch::Regex("^a".into()), "canary")],
            ..policy
        };
        let e = desired(dir, "app", Some(&policy), &loaded).unwrap_err();
        assert!(
            e.message().contains("app.header.x-canary.regex.map") && e.message().contains("map_reg("),
            "{e}"
        );
    }
}
