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
//!
//! A sticky split works the same way: haproxy.cfg hashes the user's key
//! (deploykit's cookie, or a header, cookie, query parameter or the client
//! address) into one of 100 buckets and looks the bucket up in the map
//! `<map_dir>/<backend>.sticky.<how>.map` (see [`sticky_config`]), whose
//! entries are bucket ranges (`0:29 app__canary`, `30:99 app__stable`).
//! Groups take their ranges in the order of their names, so a share change
//! moves only the users of the buckets that changed hands; an empty map
//! (every plain split or switch empties it) leaves requests to the weights.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::{socket_word, RuntimeApi};
use crate::error::DriverError;
use crate::routing::{Match, RequestKey, Sticky, TrafficPolicy, ValueMatch};
use crate::traits::GroupWeight;

/// How many buckets a sticky split hashes users into: one per percent, the
/// precision of a share.
const BUCKETS: u32 = 100;

/// How long deploykit's sticky cookie lives, in seconds (30 days, as nginx's).
const STICKY_COOKIE_MAX_AGE: u32 = 30 * 24 * 3600;

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

/// The map file a sticky split reads: named by what it hashes.
pub fn sticky_map_file(dir: &Path, backend: &str, sticky: &Sticky) -> PathBuf {
    let how = match sticky {
        Sticky::Cookie { name } => format!("cookie.{name}"),
        Sticky::Key(RequestKey::Header(h)) => format!("key-header.{}", h.to_ascii_lowercase()),
        Sticky::Key(RequestKey::Cookie(c)) => format!("key-cookie.{c}"),
        Sticky::Key(RequestKey::Query(q)) => format!("key-query.{q}"),
        Sticky::Key(RequestKey::ClientAddress) => "key-address".to_string(),
    };
    dir.join(format!("{backend}.sticky.{how}.map"))
}

/// The haproxy.cfg lines (frontend, in this order) that route a sticky
/// split through its map; the `http-request` and `http-after-response`
/// lines go before every `use_backend` line (HAProxy runs them first
/// anyway), the last line, `use_backend`, after the rules' so rules win: the key hashed into a bucket (`xxh32`, `mod(100)`), the bucket
/// looked up with `map_int`, the group's backend used when the map has it.
/// For [`Sticky::Cookie`] a request without the cookie gets a fresh random
/// id (`uuid`) as its key, and its answer sets the cookie (`Path=/`,
/// 30 days, `HttpOnly`, `SameSite=Lax`) while a split is live; a key the
/// request lacks leaves it to the weights.
pub fn sticky_config(dir: &Path, backend: &str, sticky: &Sticky) -> Vec<String> {
    let file = sticky_map_file(dir, backend, sticky);
    // One set of variables per map, so two sticky keys in one frontend
    // never read each other's values.
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let var: String = format!("txn.dk_{stem}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (key, group, new) = (format!("{var}.key"), format!("{var}.group"), format!("{var}.new"));
    let lookup = format!("xxh32,mod({BUCKETS}),map_int({})", file.display());
    let mut lines = Vec::new();
    match sticky {
        Sticky::Cookie { name } => {
            lines.push(format!(
                "http-request set-var({key}) req.cook({name}) if {{ req.cook({name}) -m len 1: }}"
            ));
            lines.push(format!(
                "http-request set-var({key}) uuid,set-var({new}) unless {{ var({key}) -m found }}"
            ));
            lines.push(format!("http-request set-var({group}) var({key}),{lookup}"));
            lines.push(format!(
                "http-after-response add-header Set-Cookie \"{name}=%[var({new})]; Path=/; \
                 Max-Age={STICKY_COOKIE_MAX_AGE}; HttpOnly; SameSite=Lax\" if {{ var({new}) -m found }} \
                 {{ var({group}) -m found }}"
            ));
        }
        Sticky::Key(k) => {
            let fetch = match k {
                RequestKey::Header(h) => format!("req.fhdr({})", h.to_ascii_lowercase()),
                RequestKey::Cookie(c) => format!("req.cook({c})"),
                RequestKey::Query(q) => format!("url_param({q})"),
                RequestKey::ClientAddress => "src".to_string(),
            };
            let present = match k {
                RequestKey::ClientAddress => String::new(),
                _ => format!(" if {{ {fetch} -m len 1: }}"),
            };
            lines.push(format!("http-request set-var({group}) {fetch},{lookup}{present}"));
        }
    }
    lines.push(format!(
        "use_backend %[var({group})] if {{ var({group}) -m found }}"
    ));
    lines
}

/// The sticky map's entries for `weights`: each group with a share gets a
/// range of buckets as wide as its share, in the order of group names.
fn bucket_ranges(backend: &str, weights: &[GroupWeight]) -> Vec<(String, String)> {
    let mut groups: Vec<&GroupWeight> = weights.iter().filter(|w| w.percent > 0).collect();
    groups.sort_by(|a, b| a.group.cmp(&b.group));
    let mut from = 0u32;
    let mut out = Vec::new();
    for w in groups {
        // Shares are whole percents summing to 100: one bucket per percent.
        let width = u32::from(w.percent) * BUCKETS / 100;
        out.push((
            format!("{from}:{}", from + width - 1),
            format!("{backend}__{}", w.group),
        ));
        from += width;
    }
    out
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
    if let Some((sticky, policy)) = policy.and_then(|p| p.split.sticky.as_ref().map(|s| (s, p))) {
        let file = sticky_map_file(dir, backend, sticky);
        let Some(entries) = want.get_mut(&file) else {
            return Err(DriverError::new(format!(
                "split.sticky needs the HAProxy map {}, which HAProxy has not loaded; add to the frontend \
                 in haproxy.cfg (the http-request and http-after-response lines before every use_backend \
                 line, the use_backend line after the rules'; create the file empty): `{}`",
                file.display(),
                sticky_config(dir, backend, sticky).join("`, `")
            )));
        };
        *entries = bucket_ranges(backend, &policy.split.weights);
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

    fn split(shares: &[(&str, u8)], sticky: Sticky) -> TrafficPolicy {
        TrafficPolicy {
            rules: Vec::new(),
            split: crate::routing::Split {
                weights: shares
                    .iter()
                    .map(|(g, p)| GroupWeight {
                        group: Group::new(*g).unwrap(),
                        percent: *p,
                    })
                    .collect(),
                sticky: Some(sticky),
            },
            mirror: None,
        }
    }

    #[test]
    fn a_sticky_cookie_split_hashes_the_cookie_or_a_fresh_id_it_hands_out() {
        let dir = Path::new("/etc/haproxy/dk");
        let sticky = Sticky::Cookie {
            name: "dk_app".into(),
        };
        let file = "/etc/haproxy/dk/app.sticky.cookie.dk_app.map";
        assert_eq!(sticky_map_file(dir, "app", &sticky), Path::new(file));
        let v = "txn.dk_app.sticky.cookie.dk_app";
        assert_eq!(
            sticky_config(dir, "app", &sticky),
            vec![
                format!("http-request set-var({v}.key) req.cook(dk_app) if {{ req.cook(dk_app) -m len 1: }}"),
                format!("http-request set-var({v}.key) uuid,set-var({v}.new) unless {{ var({v}.key) -m found }}"),
                format!("http-request set-var({v}.group) var({v}.key),xxh32,mod(100),map_int({file})"),
                format!(
                    "http-after-response add-header Set-Cookie \"dk_app=%[var({v}.new)]; Path=/; Max-Age=2592000; \
                     HttpOnly; SameSite=Lax\" if {{ var({v}.new) -m found }} {{ var({v}.group) -m found }}"
                ),
                format!("use_backend %[var({v}.group)] if {{ var({v}.group) -m found }}"),
            ]
        );
    }

    #[test]
    fn a_sticky_key_split_hashes_the_request_value_and_names_variables_haproxy_accepts() {
        let dir = Path::new("/etc/haproxy/dk");
        let sticky = Sticky::Key(RequestKey::Header("X-User-Id".into()));
        let file = "/etc/haproxy/dk/my-app.sticky.key-header.x-user-id.map";
        let v = "txn.dk_my_app.sticky.key_header.x_user_id";
        assert_eq!(
            sticky_config(dir, "my-app", &sticky),
            vec![
                format!(
                    "http-request set-var({v}.group) req.fhdr(x-user-id),xxh32,mod(100),map_int({file}) \
                     if {{ req.fhdr(x-user-id) -m len 1: }}"
                ),
                format!("use_backend %[var({v}.group)] if {{ var({v}.group) -m found }}"),
            ]
        );
        let addr = sticky_config(dir, "app", &Sticky::Key(RequestKey::ClientAddress));
        assert_eq!(
            addr[0],
            "http-request set-var(txn.dk_app.sticky.key_address.group) \
             src,xxh32,mod(100),map_int(/etc/haproxy/dk/app.sticky.key-address.map)"
        );
    }

    #[test]
    fn each_group_takes_a_range_of_buckets_as_wide_as_its_share_in_name_order() {
        let dir = Path::new("/d");
        let sticky = Sticky::Cookie { name: "dk".into() };
        let file = sticky_map_file(dir, "app", &sticky);
        let loaded = BTreeSet::from([file.clone()]);
        let entries = |shares: &[(&str, u8)]| {
            let p = split(shares, sticky.clone());
            desired(dir, "app", Some(&p), &loaded)
                .unwrap()
                .remove(&file)
                .unwrap()
        };
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(
            entries(&[("stable", 70), ("canary", 30)]),
            pairs(&[("0:29", "app__canary"), ("30:99", "app__stable")])
        );
        // Canary 30 -> 50: only buckets 30-49 change hands.
        assert_eq!(
            entries(&[("stable", 50), ("canary", 50)]),
            pairs(&[("0:49", "app__canary"), ("50:99", "app__stable")])
        );
        // A group at 0 % gets no bucket; three groups share them all.
        assert_eq!(
            entries(&[
                ("control", 34),
                ("treatment_a", 33),
                ("treatment_b", 33),
                ("old", 0)
            ]),
            pairs(&[
                ("0:33", "app__control"),
                ("34:66", "app__treatment_a"),
                ("67:99", "app__treatment_b")
            ])
        );
        // Any policy without a sticky split empties the map.
        let plain = TrafficPolicy::switch(&Group::new("stable").unwrap());
        assert_eq!(
            desired(dir, "app", Some(&plain), &loaded).unwrap()[&file],
            Vec::new()
        );
        assert_eq!(desired(dir, "app", None, &loaded).unwrap()[&file], Vec::new());
    }

    #[test]
    fn a_sticky_split_without_its_map_loaded_names_the_lines_to_add() {
        let dir = Path::new("/d");
        let p = split(
            &[("stable", 50), ("canary", 50)],
            Sticky::Key(RequestKey::Query("uid".into())),
        );
        let e = desired(dir, "app", Some(&p), &BTreeSet::new()).unwrap_err();
        assert!(
            e.message()
                .starts_with("split.sticky needs the HAProxy map /d/app.sticky.key-query.uid.map")
                && e.message()
                    .contains("url_param(uid),xxh32,mod(100),map_int(/d/app.sticky.key-query.uid.map)")
                && e.message()
                    .contains("use_backend %[var(txn.dk_app.sticky.key_query.uid.group)]"),
            "{e}"
        );
    }
}
