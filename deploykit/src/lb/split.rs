//! Turning group percentages into per-server weights, shared by the nginx
//! and HAProxy drivers.

use std::collections::BTreeMap;

use crate::error::DriverError;
use crate::names::Group;
use crate::traits::GroupWeight;

/// Checks a weight request: percents 0–100 that sum to 100, each group
/// named once and known. Returns the map of shares.
pub(crate) fn check_weights(
    weights: &[GroupWeight],
    known: &BTreeMap<Group, usize>,
) -> Result<BTreeMap<Group, u8>, DriverError> {
    let mut out = BTreeMap::new();
    let mut sum: u32 = 0;
    for w in weights {
        if w.percent > 100 {
            return Err(DriverError::new(format!(
                "invalid weights: group {} asks for {} %; give 0-100",
                w.group, w.percent
            )));
        }
        if !known.contains_key(&w.group) {
            let names: Vec<&str> = known.keys().map(Group::as_str).collect();
            return Err(DriverError::new(format!(
                "invalid weights: no backend belongs to group {}; known groups: {}",
                w.group,
                names.join(", ")
            )));
        }
        if out.insert(w.group.clone(), w.percent).is_some() {
            return Err(DriverError::new(format!(
                "invalid weights: group {} is named twice",
                w.group
            )));
        }
        sum += u32::from(w.percent);
    }
    if sum != 100 {
        return Err(DriverError::new(format!(
            "invalid weights: the shares sum to {sum} %, they must sum to 100"
        )));
    }
    Ok(out)
}

/// The weight each in-rotation server of a group gets so that the groups
/// receive their shares: a group with share `p` and `n` servers in rotation
/// gives each `p / n`, scaled so the largest per-server weight is `max`,
/// rounded, never below 1. Groups with share 0 or no server in rotation are
/// absent (their servers get no traffic).
pub(crate) fn per_server_weights(
    shares: &BTreeMap<Group, u8>,
    in_rotation: &BTreeMap<Group, usize>,
    max: u32,
) -> BTreeMap<Group, u32> {
    let raw: Vec<(&Group, f64)> = shares
        .iter()
        .filter(|(_, p)| **p > 0)
        .filter_map(|(g, p)| {
            let n = in_rotation.get(g).copied().unwrap_or(0);
            (n > 0).then(|| (g, f64::from(*p) / n as f64))
        })
        .collect();
    let top = raw.iter().map(|(_, r)| *r).fold(0.0_f64, f64::max);
    if top <= 0.0 {
        return BTreeMap::new();
    }
    raw.into_iter()
        .map(|(g, r)| {
            let w = (r / top * f64::from(max)).round().max(1.0);
            // `w` is in 1..=max, so the cast is exact.
            (g.clone(), w as u32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(s: &str) -> Group {
        Group::new(s).unwrap()
    }

    #[test]
    fn weights_follow_shares_and_server_counts() {
        let shares = BTreeMap::from([(g("stable"), 95), (g("canary"), 5)]);
        let n = BTreeMap::from([(g("stable"), 3), (g("canary"), 1)]);
        let w = per_server_weights(&shares, &n, 256);
        assert_eq!(w[&g("stable")], 256);
        assert_eq!(w[&g("canary")], 40); // 5 / (95/3) * 256 = 40.4
        let canary_share: f64 = 40.0 / (40.0 + 3.0 * 256.0);
        assert!((canary_share - 0.05).abs() < 0.002, "{canary_share}");

        let even = BTreeMap::from([(g("a"), 50), (g("b"), 50)]);
        let w = per_server_weights(&even, &BTreeMap::from([(g("a"), 2), (g("b"), 2)]), 100);
        assert_eq!((w[&g("a")], w[&g("b")]), (100, 100));
    }

    #[test]
    fn zero_share_and_empty_groups_are_left_out() {
        let shares = BTreeMap::from([(g("a"), 100), (g("b"), 0)]);
        let w = per_server_weights(&shares, &BTreeMap::from([(g("a"), 1), (g("b"), 1)]), 10);
        assert_eq!(w.len(), 1);
        let w = per_server_weights(&shares, &BTreeMap::from([(g("b"), 1)]), 10);
        assert!(w.is_empty());
    }

    #[test]
    fn tiny_shares_never_round_to_zero() {
        let shares = BTreeMap::from([(g("a"), 99), (g("b"), 1)]);
        let w = per_server_weights(&shares, &BTreeMap::from([(g("a"), 1), (g("b"), 10)]), 10);
        assert_eq!(w[&g("b")], 1);
    }

    #[test]
    fn bad_weight_requests_are_rejected() {
        let known = BTreeMap::from([(g("a"), 1), (g("b"), 1)]);
        let gw = |s: &str, p| GroupWeight {
            group: g(s),
            percent: p,
        };
        assert!(check_weights(&[gw("a", 60), gw("b", 40)], &known).is_ok());
        let e = check_weights(&[gw("a", 60)], &known).unwrap_err();
        assert!(e.message().contains("sum to 60"), "{e}");
        let e = check_weights(&[gw("c", 100)], &known).unwrap_err();
        assert!(e.message().contains("group c"), "{e}");
        let e = check_weights(&[gw("a", 50), gw("a", 50)], &known).unwrap_err();
        assert!(e.message().contains("twice"), "{e}");
        let e = check_weights(&[gw("a", 101)], &known).unwrap_err();
        assert!(e.message().contains("101"), "{e}");
    }
}
