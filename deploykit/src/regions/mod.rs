//! Multi-region deployments: ordered waves of regions, each region deployed
//! by its own strategy plan, gated, and rolled back selectively.
//!
//! A region is a fleet of its own — its instances, its load balancer, its
//! metrics — and a [`RegionsPlan`] is a plain value like a [`Plan`]: waves
//! (run one after another) → regions (at most
//! [`max_parallel`](Rollout::max_parallel) at once) → each region's own
//! strategy plan. A dry run prints it; tests compare it.
//!
//! [`run`] walks the waves. A region passes its gate when its own run
//! succeeds *and* its instances stay healthy for the whole
//! [`soak`](Rollout::soak) that follows its wave: a canary that passes its
//! analysis and then falls over a minute later stops the rollout before the
//! next wave, where a 50-region fleet is cheapest to save. Success is
//! judged only from the reports of the runs this call started, never from
//! a fleet that happened to be healthy before it.
//!
//! When a region fails, no further region starts (in this wave or any
//! later one), and [`OnFailure`] says what returns:
//!
//! | `on_failure`      | returned to the previous release                     | Nomad's multiregion `on_failure` |
//! |-------------------|------------------------------------------------------|----------------------------------|
//! | `stop`            | only what the failed region's own run undid          | the default (empty): the failed region and those after it fail |
//! | `rollback-region` | the failed region, also when it failed its soak      | `fail_local` with `auto_revert`, except that later regions never start |
//! | `rollback-wave`   | every region of the failing wave                     | no counterpart                   |
//! | `rollback-all`    | every region this run deployed, newest first         | `fail_all` with `auto_revert`    |
//!
//! ```
//! use deploykit::regions::{OnFailure, RegionName, Rollout};
//! # fn main() -> deploykit::Result<()> {
//! let names: Vec<RegionName> = ["canary", "eu-1", "eu-2", "us-1", "us-2"]
//!     .into_iter()
//!     .map(RegionName::new)
//!     .collect::<Result<_, _>>()?;
//! let rollout = Rollout {
//!     waves: vec![vec!["canary".into()], vec!["eu-*".into()], vec!["us-*".into()]],
//!     on_failure: OnFailure::RollbackWave,
//!     ..Rollout::default()
//! };
//! let waves = rollout.waves_for(&names)?;
//! assert_eq!(waves[1].iter().map(|r| r.as_str()).collect::<Vec<_>>(), ["eu-1", "eu-2"]);
//! # Ok(())
//! # }
//! ```

mod engine;
mod fleet;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::names::ReleaseId;
use crate::plan::{Plan, Projection};

pub use engine::{
    run, Hold, RegionEvent, RegionEventKind, RegionEventLog, RegionEvents, RegionReport, RegionRunner,
    RegionState, RegionsOutcome, RegionsReport,
};
pub use fleet::{probe, ExecutorRegions};

/// A region's name: `[A-Za-z0-9._-]`, as every name that reaches a path
/// (each region keeps its own state directory).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegionName(String);

impl RegionName {
    /// A checked region name.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] (field `region`) when it breaks the name rules
    /// of [`validate_name`](crate::names::validate_name).
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        crate::names::validate_name("region", &name)?;
        Ok(Self(name))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for RegionName {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

impl From<RegionName> for String {
    fn from(r: RegionName) -> String {
        r.0
    }
}

impl fmt::Display for RegionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a failed region returns to its previous release (see the table in
/// the [module documentation](self)). In every case no further region
/// starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Stop: the failed region keeps what its own run left (a failed run
    /// has rolled itself back; a region that failed its soak stays on the
    /// new release for an operator to judge); every other region stays.
    #[default]
    Stop,
    /// Return the failed region, whether its run or its soak failed.
    RollbackRegion,
    /// Return every region of the failing wave (regions still running are
    /// cancelled, which rolls them back).
    RollbackWave,
    /// Return every region this run deployed, the newest wave first.
    RollbackAll,
}

impl fmt::Display for OnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnFailure::Stop => "stop",
            OnFailure::RollbackRegion => "rollback-region",
            OnFailure::RollbackWave => "rollback-wave",
            OnFailure::RollbackAll => "rollback-all",
        })
    }
}

/// The `[rollout]` of a multi-region configuration: the order of the
/// regions and the gates between them. Its serde form is that section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rollout {
    /// The waves, in order; each a list of region names or globs (`*` any
    /// run of characters, `?` one), e.g. `[["canary"], ["eu-*"], ["us-*"]]`.
    /// Empty: one wave per region, in the order the regions are written.
    pub waves: Vec<Vec<String>>,
    /// How many regions of a wave deploy at once (at least 1).
    pub max_parallel: usize,
    /// How long the regions of a wave must stay healthy after they all
    /// deployed, before the next wave starts (and before the run counts as
    /// done after the last wave). 0: no soak.
    #[serde(with = "crate::duration_text")]
    pub soak: Duration,
    /// How often a soak probes each region's instances.
    #[serde(with = "crate::duration_text")]
    pub soak_interval: Duration,
    /// What a failure returns.
    pub on_failure: OnFailure,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            waves: Vec::new(),
            max_parallel: 1,
            soak: Duration::ZERO,
            soak_interval: Duration::from_secs(5),
            on_failure: OnFailure::Stop,
        }
    }
}

/// Whether `name` matches `pattern`: `*` any run of characters (also
/// none), `?` exactly one.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // The classic two-pointer match with one backtrack point: linear for
    // the short names of regions.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && (p[i] == '?' || p[i] == n[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some((i, j));
            i += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|c| *c == '*')
}

impl Rollout {
    /// Checks the numbers: [`max_parallel`](Self::max_parallel) and
    /// [`soak_interval`](Self::soak_interval) at least 1.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field (`rollout.max_parallel`,
    /// `rollout.soak_interval`).
    pub fn validate(&self) -> Result<()> {
        if self.max_parallel == 0 {
            return Err(Error::invalid(
                "rollout.max_parallel",
                "is 0; deploy at least 1 region at a time",
            ));
        }
        if self.soak_interval.is_zero() {
            return Err(Error::invalid(
                "rollout.soak_interval",
                "is 0; give a positive duration such as \"5s\"",
            ));
        }
        Ok(())
    }

    /// The waves of `regions` (in the order they are written): each wave's
    /// regions in the order of its patterns, then of `regions`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming `rollout.waves[w][p]` for a pattern
    /// that matches no region or a region an earlier wave already has, and
    /// `rollout.waves` for a region no wave names (every region must be
    /// placed on purpose). A glob only takes regions no earlier wave has,
    /// so a last wave of `["*"]` means every other region.
    pub fn waves_for(&self, regions: &[RegionName]) -> Result<Vec<Vec<RegionName>>> {
        self.validate()?;
        if self.waves.is_empty() {
            return Ok(regions.iter().map(|r| vec![r.clone()]).collect());
        }
        let all = regions
            .iter()
            .map(RegionName::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut placed: BTreeMap<&RegionName, usize> = BTreeMap::new();
        let mut out = Vec::new();
        for (w, wave) in self.waves.iter().enumerate() {
            if wave.is_empty() {
                return Err(Error::invalid(
                    format!("rollout.waves[{w}]"),
                    "is an empty wave; name at least one region or remove it",
                ));
            }
            let mut this = Vec::new();
            for (k, pattern) in wave.iter().enumerate() {
                let field = format!("rollout.waves[{w}][{k}]");
                // A glob takes the regions no earlier wave placed, so
                // `["*"]` last means "every other region"; a name is exact.
                let is_glob = pattern.contains(['*', '?']);
                let matched: Vec<&RegionName> = regions
                    .iter()
                    .filter(|r| glob(pattern, r.as_str()))
                    .filter(|r| !is_glob || placed.get(r).is_none_or(|earlier| *earlier == w))
                    .collect();
                if matched.is_empty() {
                    let left = if is_glob {
                        " that no earlier wave deploys"
                    } else {
                        ""
                    };
                    return Err(Error::invalid(
                        field,
                        format!("\"{pattern}\" matches no region{left}; the regions are {all}"),
                    ));
                }
                for r in matched {
                    match placed.get(r) {
                        Some(earlier) if *earlier == w => {}
                        Some(earlier) => {
                            return Err(Error::invalid(
                                field,
                                format!(
                                    "{r} is already in wave {}; put every region in one wave",
                                    earlier + 1
                                ),
                            ))
                        }
                        None => {
                            placed.insert(r, w);
                            this.push(r.clone());
                        }
                    }
                }
            }
            out.push(this);
        }
        if let Some(r) = regions.iter().find(|r| !placed.contains_key(r)) {
            return Err(Error::invalid(
                "rollout.waves",
                format!("region {r} is in no wave; add it (or a pattern matching it) to a wave"),
            ));
        }
        Ok(out)
    }
}

/// Keeps only `subset` of `waves` (a `deploy --regions` choice), dropping
/// waves left empty; the order stays the rollout's.
///
/// # Errors
/// [`Error::InvalidInput`] (field `regions`) when `subset` names a region
/// no wave has, or is empty.
pub fn select(waves: Vec<Vec<RegionName>>, subset: &[RegionName]) -> Result<Vec<Vec<RegionName>>> {
    if subset.is_empty() {
        return Err(Error::invalid("regions", "is empty; name at least one region"));
    }
    let known: BTreeSet<&RegionName> = waves.iter().flatten().collect();
    if let Some(r) = subset.iter().find(|r| !known.contains(r)) {
        let all = known.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ");
        return Err(Error::invalid(
            "regions",
            format!("{r} is not a configured region; the regions are {all}"),
        ));
    }
    let keep: BTreeSet<&RegionName> = subset.iter().collect();
    Ok(waves
        .into_iter()
        .map(|w| w.into_iter().filter(|r| keep.contains(r)).collect::<Vec<_>>())
        .filter(|w| !w.is_empty())
        .collect())
}

/// One region's part of a [`RegionsPlan`]: its own strategy plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionPlan {
    /// The region.
    pub region: RegionName,
    /// What its strategy plans for its fleet.
    pub plan: Plan,
}

/// A multi-region deployment as a value: waves → regions → plans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionsPlan {
    /// The release every region moves to.
    pub release: ReleaseId,
    /// The waves, in order; each the plans of its regions.
    pub waves: Vec<Vec<RegionPlan>>,
    /// How many regions of a wave deploy at once.
    pub max_parallel: usize,
    /// How long a wave must hold after it deployed.
    #[serde(with = "crate::duration_ms")]
    pub soak: Duration,
    /// How often a soak probes.
    #[serde(with = "crate::duration_ms")]
    pub soak_interval: Duration,
    /// What a failure returns.
    pub on_failure: OnFailure,
}

impl RegionsPlan {
    /// The plan of `waves` (from [`Rollout::waves_for`]) with each region's
    /// plan from `plan_of`.
    ///
    /// # Errors
    /// The first error of `plan_of`, or [`Error::InvalidInput`] when a plan
    /// deploys another release than `release` (field `regions.<name>`) or
    /// `rollout` does not [`validate`](Rollout::validate).
    pub fn build(
        rollout: &Rollout,
        release: &ReleaseId,
        waves: &[Vec<RegionName>],
        mut plan_of: impl FnMut(&RegionName) -> Result<Plan>,
    ) -> Result<Self> {
        rollout.validate()?;
        let mut out = Vec::new();
        for wave in waves {
            let mut plans = Vec::new();
            for region in wave {
                let plan = plan_of(region)?;
                if plan.release != *release {
                    return Err(Error::invalid(
                        format!("regions.{region}"),
                        format!("its plan deploys {}, not {release}", plan.release),
                    ));
                }
                plans.push(RegionPlan {
                    region: region.clone(),
                    plan,
                });
            }
            out.push(plans);
        }
        Ok(Self {
            release: release.clone(),
            waves: out,
            max_parallel: rollout.max_parallel,
            soak: rollout.soak,
            soak_interval: rollout.soak_interval,
            on_failure: rollout.on_failure,
        })
    }

    /// Every region's plan, wave by wave.
    pub fn regions(&self) -> impl Iterator<Item = &RegionPlan> {
        self.waves.iter().flatten()
    }

    /// The projected duration: per wave, its regions in rounds of
    /// `max_parallel` (each round as long as its longest plan), then the
    /// soak.
    pub fn projected_duration(&self) -> Projection {
        let mut min = Duration::ZERO;
        let mut max = Duration::ZERO;
        for wave in &self.waves {
            for round in wave.chunks(self.max_parallel.max(1)) {
                let p: Vec<Projection> = round.iter().map(|r| r.plan.projected_duration()).collect();
                min += p.iter().map(|p| p.min).max().unwrap_or_default();
                max += p.iter().map(|p| p.max).max().unwrap_or_default();
            }
            min += self.soak;
            max += self.soak;
        }
        Projection { min, max }
    }
}

impl fmt::Display for RegionsPlan {
    /// The waves and each region's plan in summary; the regions' full plans
    /// print with their own `Display`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "multi-region deployment of {}: {} wave(s), at most {} region(s) at once, soak {}, on failure: {}",
            self.release,
            self.waves.len(),
            self.max_parallel,
            crate::duration_text::format(self.soak),
            self.on_failure
        )?;
        for (w, wave) in self.waves.iter().enumerate() {
            let names: Vec<&str> = wave.iter().map(|r| r.region.as_str()).collect();
            writeln!(f, "wave {}: {}", w + 1, names.join(", "))?;
            for r in wave {
                let instances = r.plan.instances().len();
                writeln!(
                    f,
                    "  {}: {} plan, {} instance(s) to move, {} stage(s)",
                    r.region,
                    r.plan.strategy,
                    instances,
                    r.plan.stages.len()
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<RegionName> {
        list.iter().map(|n| RegionName::new(*n).unwrap()).collect()
    }

    fn strs(waves: &[Vec<RegionName>]) -> Vec<Vec<&str>> {
        waves
            .iter()
            .map(|w| w.iter().map(RegionName::as_str).collect())
            .collect()
    }

    #[test]
    fn globs_match_star_and_question_mark() {
        assert!(glob("us-*", "us-east-1"));
        assert!(glob("us-*", "us-"));
        assert!(!glob("us-*", "eu-1"));
        assert!(glob("eu-?", "eu-1"));
        assert!(!glob("eu-?", "eu-10"));
        assert!(glob("*-1", "eu-1"));
        assert!(glob("*", "anything"));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b*c", "axxbyy"));
        assert!(glob("canary", "canary"));
        assert!(!glob("canary", "canary-2"));
    }

    #[test]
    fn waves_follow_the_patterns_and_keep_every_region_once() {
        let regions = names(&["canary", "eu-1", "eu-2", "us-1", "us-2"]);
        let r = Rollout {
            waves: vec![
                vec!["canary".into()],
                vec!["eu-2".into(), "eu-*".into()],
                vec!["us-*".into()],
            ],
            ..Rollout::default()
        };
        let w = r.waves_for(&regions).unwrap();
        assert_eq!(
            strs(&w),
            vec![vec!["canary"], vec!["eu-2", "eu-1"], vec!["us-1", "us-2"]]
        );
    }

    #[test]
    fn a_glob_takes_only_the_regions_no_earlier_wave_has() {
        let regions = names(&["canary", "eu-1", "eu-2", "us-1"]);
        let r = Rollout {
            waves: vec![vec!["canary".into()], vec!["eu-1".into()], vec!["*".into()]],
            ..Rollout::default()
        };
        let w = r.waves_for(&regions).unwrap();
        assert_eq!(strs(&w), vec![vec!["canary"], vec!["eu-1"], vec!["eu-2", "us-1"]]);
        let nothing_left = Rollout {
            waves: vec![vec!["eu-*".into()], vec!["eu-?".into()], vec!["*".into()]],
            ..Rollout::default()
        };
        let e = nothing_left.waves_for(&regions).unwrap_err().to_string();
        assert!(
            e.contains("rollout.waves[1][0]") && e.contains("no earlier wave"),
            "{e}"
        );
    }

    #[test]
    fn no_waves_means_one_region_at_a_time_in_written_order() {
        let regions = names(&["b", "a"]);
        let w = Rollout::default().waves_for(&regions).unwrap();
        assert_eq!(strs(&w), vec![vec!["b"], vec!["a"]]);
    }

    #[test]
    fn a_pattern_matching_nothing_is_refused_naming_it() {
        let regions = names(&["eu-1"]);
        let r = Rollout {
            waves: vec![vec!["eu-1".into(), "ap-*".into()]],
            ..Rollout::default()
        };
        let e = r.waves_for(&regions).unwrap_err().to_string();
        assert!(
            e.contains("rollout.waves[0][1]") && e.contains("ap-*") && e.contains("eu-1"),
            "{e}"
        );
    }

    #[test]
    fn a_region_in_two_waves_or_in_none_is_refused() {
        let regions = names(&["eu-1", "eu-2", "us-1"]);
        let twice = Rollout {
            waves: vec![
                vec!["eu-1".into()],
                vec!["eu-1".into(), "us-1".into()],
                vec!["eu-2".into()],
            ],
            ..Rollout::default()
        };
        let e = twice.waves_for(&regions).unwrap_err().to_string();
        assert!(
            e.contains("rollout.waves[1][0]") && e.contains("eu-1 is already in wave 1"),
            "{e}"
        );
        let missing = Rollout {
            waves: vec![vec!["eu-*".into()]],
            ..Rollout::default()
        };
        let e = missing.waves_for(&regions).unwrap_err().to_string();
        assert!(e.contains("us-1 is in no wave"), "{e}");
    }

    #[test]
    fn zero_parallelism_is_refused() {
        let r = Rollout {
            max_parallel: 0,
            ..Rollout::default()
        };
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("rollout.max_parallel"));
    }

    #[test]
    fn a_subset_keeps_the_wave_order_and_refuses_unknown_regions() {
        let waves = vec![names(&["canary"]), names(&["eu-1", "eu-2"]), names(&["us-1"])];
        let s = select(waves.clone(), &names(&["us-1", "eu-2"])).unwrap();
        assert_eq!(strs(&s), vec![vec!["eu-2"], vec!["us-1"]]);
        let e = select(waves, &names(&["ap-1"])).unwrap_err().to_string();
        assert!(e.contains("ap-1 is not a configured region"), "{e}");
    }

    #[test]
    fn the_serde_form_reads_kebab_case_failure_modes_and_text_durations() {
        let r: Rollout = serde_json::from_str(
            r#"{"waves": [["a"]], "max_parallel": 2, "soak": "5m", "on_failure": "rollback-wave"}"#,
        )
        .unwrap();
        assert_eq!(r.on_failure, OnFailure::RollbackWave);
        assert_eq!(r.soak, Duration::from_secs(300));
        assert_eq!(r.soak_interval, Duration::from_secs(5));
    }
}
