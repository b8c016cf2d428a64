//! The strategies built on routing policies: [`Ramped`], [`Shadow`],
//! [`DarkLaunch`] and [`Experiment`]. Each is canary-shaped — the same groups, analysis,
//! health checks, rollback and finalize as [`Canary`], which each holds as
//! its `base` — and differs only in how traffic reaches the canary between
//! its deployment and the promotion of stable.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::canary::timeout_ms;
use super::Canary;
use crate::error::{Error, Result};
use crate::experiment::ExperimentRules;
use crate::names::{Group, InstanceId, ReleaseId};
use crate::plan::{ExperimentArm, FleetSnapshot, Plan, RampDown, RampDownStep, Stage, Step, Unit};
use crate::routing::{Mirror, RoutingError, Rule, Split, Sticky, TrafficPolicy};
use crate::traits::{GroupWeight, Strategy};

/// More steps than this make a plan nobody reads: lengthen `step_interval`.
const MAX_RAMP_STEPS: u128 = 1000;

/// A ramp-down takes one step per check interval, up to this many: more
/// would not be seen by the analysis, and ten already reads as a slope.
const MAX_RAMP_DOWN_STEPS: u32 = 10;

/// How a ramp's share grows between `from` and `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RampCurve {
    /// The same number of percent every step.
    #[default]
    Linear,
    /// The same factor every step: small steps while few users see the
    /// release, big ones once it has proved itself.
    Exponential,
}

/// Ramped deployment: the canary's share of traffic rises along a curve,
/// from [`from`](Self::from) % to [`to`](Self::to) % over
/// [`duration`](Self::duration), a step every
/// [`step_interval`](Self::step_interval), with the canary analysis running
/// all the way; a breach rolls back at once (all traffic to stable), or,
/// with [`ramp_down`](Self::ramp_down), steps the share down first.
///
/// The plan holds one stage per step of the curve, each a weight change and
/// an analysis for one `step_interval` (steps that round to the same
/// percent are merged), so the dry run shows the projected curve. The last
/// point, `to`, is held one `step_interval` too: the ramp takes `duration`
/// plus one interval. Everything else — groups, analysis, health, gates,
/// the flag it carries, the finalize — is [`base`](Self::base)'s; a ramp
/// promotes automatically whatever `base.promotion` says.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use deploykit::{RampCurve, Ramped};
/// let ramp = Ramped {
///     from: 10,
///     to: 100,
///     duration: Duration::from_secs(300),
///     step_interval: Duration::from_secs(60),
///     curve: RampCurve::Linear,
///     ..Ramped::default()
/// };
/// let points: Vec<u8> = ramp.schedule()?.iter().map(|(p, _)| *p).collect();
/// assert_eq!(points, [10, 28, 46, 64, 82, 100]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ramped {
    /// Groups, analysis, health, gates and finalize (the CLI fills it from
    /// `[strategy.canary]`).
    #[serde(skip)]
    pub base: Canary,
    /// The canary's share at the first step, 1-99 percent. Default 1.
    pub from: u8,
    /// The canary's share at the end, above `from`, at most 100. Default 100.
    pub to: u8,
    /// How long the share takes to rise from `from` to `to`. Default 30 min.
    #[serde(with = "crate::duration_text")]
    pub duration: Duration,
    /// Time between two steps; at most `duration`, at least the analysis's
    /// `check_interval`. Default 1 min.
    #[serde(with = "crate::duration_text")]
    pub step_interval: Duration,
    /// Linear (default) or exponential.
    pub curve: RampCurve,
    /// After a breach that is not critical, step the canary's share down
    /// to 0 over this long, one step per `check_interval` (at most 10),
    /// the analysis checking all the way, then roll back; `None` (the
    /// default) rolls back at once. At least `check_interval`.
    #[serde(
        with = "crate::duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub ramp_down: Option<Duration>,
    /// A failed check at this many times its limit or more is critical:
    /// traffic is cut at once even with `ramp_down`, before or during the
    /// ramp-down. At least 1. Default 2.
    pub ramp_down_critical: f64,
}

/// The settings are compared as plain values; [`Ramped::validate`] refuses
/// a NaN `ramp_down_critical`, so equality is total for every checked value.
impl Eq for Ramped {}

impl Default for Ramped {
    fn default() -> Self {
        Self {
            base: Canary::default(),
            from: 1,
            to: 100,
            duration: Duration::from_secs(30 * 60),
            step_interval: Duration::from_secs(60),
            curve: RampCurve::Linear,
            ramp_down: None,
            ramp_down_critical: 2.0,
        }
    }
}

impl Ramped {
    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: `from` (outside 1-99), `to`
    /// (not above `from`, or above 100), `duration` or `step_interval` (0,
    /// or an interval longer than the duration or shorter than the
    /// analysis's `check_interval`, or more than 1000 steps), `ramp_down`
    /// (shorter than `check_interval`, or with a flag), `ramp_down_critical`
    /// (below 1 or not a number), or a field of [`base`](Self::base)
    /// ([`Canary::validate`]).
    pub fn validate(&self) -> Result<()> {
        self.base.validate()?;
        if !(1..=99).contains(&self.from) {
            return Err(Error::invalid(
                "from",
                format!(
                    "{} is outside 1-99; the ramp starts with a small share, e.g. 1",
                    self.from
                ),
            ));
        }
        if self.to <= self.from || self.to > 100 {
            return Err(Error::invalid(
                "to",
                format!(
                    "{} is not above from ({}) and at most 100; the ramp ends with the canary's final share, e.g. 100",
                    self.to, self.from
                ),
            ));
        }
        if self.duration.is_zero() {
            return Err(Error::invalid(
                "duration",
                "is 0; give the ramp time to be judged, e.g. \"30m\"",
            ));
        }
        if self.step_interval.is_zero() {
            return Err(Error::invalid("step_interval", "is 0; step e.g. every \"1m\""));
        }
        if self.step_interval > self.duration {
            return Err(Error::invalid(
                "step_interval",
                format!(
                    "{} is longer than duration ({}); shorten it or lengthen the ramp",
                    crate::duration_text::format(self.step_interval),
                    crate::duration_text::format(self.duration)
                ),
            ));
        }
        if self.duration.as_millis() / self.step_interval.as_millis().max(1) > MAX_RAMP_STEPS {
            return Err(Error::invalid(
                "step_interval",
                format!(
                    "makes more than {MAX_RAMP_STEPS} steps over {}; lengthen it",
                    crate::duration_text::format(self.duration)
                ),
            ));
        }
        if self.base.check_interval > self.step_interval {
            return Err(Error::invalid(
                "step_interval",
                format!(
                    "{} is shorter than the analysis's check_interval ({}), so a step would end unchecked; lengthen it or check more often",
                    crate::duration_text::format(self.step_interval),
                    crate::duration_text::format(self.base.check_interval)
                ),
            ));
        }
        if let Some(down) = self.ramp_down {
            if down < self.base.check_interval {
                return Err(Error::invalid(
                    "ramp_down",
                    format!(
                        "{} is shorter than the analysis's check_interval ({}), so no step down would be checked; lengthen it, or omit it to roll back at once",
                        crate::duration_text::format(down),
                        crate::duration_text::format(self.base.check_interval)
                    ),
                ));
            }
            if let Some(flag) = &self.base.flag {
                return Err(Error::invalid(
                    "ramp_down",
                    format!(
                        "cannot step down the share of flag {flag}, which follows the weights; omit ramp_down (the flag is killed at once on a breach) or the flag"
                    ),
                ));
            }
        }
        if !(self.ramp_down_critical >= 1.0 && self.ramp_down_critical.is_finite()) {
            return Err(Error::invalid(
                "ramp_down_critical",
                format!(
                    "{} is not a number of at least 1; a breach this many times over its limit cuts traffic at once, e.g. 2",
                    self.ramp_down_critical
                ),
            ));
        }
        Ok(())
    }

    /// The way down from a stage at `weight` % after a breach that is not
    /// critical: `None` without [`ramp_down`](Self::ramp_down). The share
    /// falls linearly from `weight` towards 0 over `ramp_down`, one step
    /// per `check_interval` (at most 10); steps that round to the same
    /// percent are merged, and the rollback takes the last step to 0; a
    /// share of 1 % has no step below it, so it is cut at once.
    pub fn ramp_down_at(&self, weight: u8) -> Option<RampDown> {
        let total = self.ramp_down?;
        let n = u32::try_from(total.as_millis() / self.base.check_interval.as_millis().max(1))
            .unwrap_or(MAX_RAMP_DOWN_STEPS)
            .clamp(1, MAX_RAMP_DOWN_STEPS);
        let hold = total / n;
        let mut steps: Vec<RampDownStep> = Vec::new();
        for k in 1..=n {
            // n steps below `weight`, evenly spaced, the (n+1)th being 0.
            let p = (f64::from(weight) * f64::from(n + 1 - k) / f64::from(n + 1)).round() as u8;
            if p == 0 || p >= weight {
                continue;
            }
            match steps.last_mut() {
                Some(last) if last.percent == p => last.hold += hold,
                _ => steps.push(RampDownStep {
                    percent: p,
                    weights: self.base.weights(p),
                    hold,
                }),
            }
        }
        // A share too small to step down from is simply cut.
        (!steps.is_empty()).then_some(RampDown {
            steps,
            critical: self.ramp_down_critical,
        })
    }

    /// The canary's intended share `t` after the ramp started, as the
    /// continuous curve says (before rounding to whole percent and to
    /// steps): `from` at 0, `to` from `duration` on.
    pub fn share_at(&self, t: Duration) -> f64 {
        let x = (t.as_secs_f64() / self.duration.as_secs_f64().max(f64::MIN_POSITIVE)).clamp(0.0, 1.0);
        let (from, to) = (f64::from(self.from), f64::from(self.to));
        match self.curve {
            RampCurve::Linear => from + (to - from) * x,
            RampCurve::Exponential => from * (to / from).powf(x),
        }
    }

    /// The steps of the ramp: each a whole percent and how long it is held,
    /// in order; the first is `from`, the last `to`.
    ///
    /// # Errors
    /// As [`validate`](Self::validate).
    pub fn schedule(&self) -> Result<Vec<(u8, Duration)>> {
        self.validate()?;
        let n = u32::try_from(self.duration.as_millis() / self.step_interval.as_millis())
            .unwrap_or(1)
            .max(1);
        let mut out: Vec<(u8, Duration)> = Vec::new();
        for k in 0..=n {
            let t = self.duration.mul_f64(f64::from(k) / f64::from(n));
            // Rounded and kept within from..=to, so a step never overshoots.
            let p = self
                .share_at(t)
                .round()
                .clamp(f64::from(self.from), f64::from(self.to)) as u8;
            match out.last_mut() {
                Some((last, hold)) if *last == p => *hold += self.step_interval,
                _ => out.push((p, self.step_interval)),
            }
        }
        Ok(out)
    }
}

impl Strategy for Ramped {
    fn kind(&self) -> crate::StrategyKind {
        crate::StrategyKind::Ramped
    }

    fn plan(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        let schedule = self.schedule()?;
        let base = &self.base;
        let of = schedule.len();
        base.shaped_plan(self.kind(), fleet, release, true, |analysis| {
            schedule
                .iter()
                .enumerate()
                .map(|(k, (w, hold))| {
                    let stage = k + 1;
                    let mut steps = vec![Step::SetWeights {
                        weights: base.weights(*w),
                    }];
                    if let Some(flag) = &base.flag {
                        steps.push(Step::FlagShare {
                            flag: flag.clone(),
                            variant: base.flag_variant.clone(),
                            percent: *w,
                        });
                    }
                    steps.push(Step::Analyze {
                        stage,
                        of,
                        weight: *w,
                        duration: *hold,
                        analysis: analysis.clone(),
                        chaos: base.chaos_steps(stage),
                        ramp_down: self.ramp_down_at(*w),
                    });
                    Stage {
                        if_winner: None,
                        name: format!("ramp {w}% ({stage}/{of})"),
                        units: vec![Unit {
                            instance: None,
                            steps,
                        }],
                    }
                })
                .collect()
        })
    }
}

/// What a [`Shadow`] deployment does once the shadow passed its analysis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShadowThen {
    /// Tear the shadow down: stable keeps its release, the shadow
    /// instances end stopped. A test of the release under real traffic.
    #[default]
    Teardown,
    /// Hand over to the canary: the canary stages of
    /// [`base`](Shadow::base) with real traffic, then stable promoted.
    Canary,
}

/// Shadow deployment: the new release runs on the canary group as a
/// shadow that receives a mirrored copy of [`percent`](Self::percent) % of
/// the requests whose method is listed; clients are only ever answered by
/// stable. The shadow's own error rate and latency (its metrics, from the
/// mirrored requests) are compared with stable's for
/// [`duration`](Self::duration) by [`base`](Self::base)'s analysis; a
/// breach rolls back. Then the mirror ends and, as [`then`](Self::then)
/// says, the shadow is torn down or the deployment goes on as a canary.
///
/// Mirroring needs a load balancer that can copy requests (nginx with
/// `location_include`); any other is refused before anything is touched.
/// Methods that may change state (`POST`, …) are mirrored only with
/// [`allow_unsafe_methods`](Self::allow_unsafe_methods): the shadow would
/// act on real users' writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Shadow {
    /// Groups, analysis, health, gates and finalize (the CLI fills it from
    /// `[strategy.canary]`); its canary group is the shadow.
    #[serde(skip)]
    pub base: Canary,
    /// Percent of the eligible requests copied, 1-100. Default 100.
    pub percent: u8,
    /// Methods copied. Default `GET`, `HEAD`.
    pub methods: Vec<String>,
    /// Allow copying methods that may change state. Default false.
    pub allow_unsafe_methods: bool,
    /// Send request bodies with the copies. Default true.
    pub request_body: bool,
    /// How long the shadow is judged. Default 10 min.
    #[serde(with = "crate::duration_text")]
    pub duration: Duration,
    /// After a passed analysis: tear down (default) or go on as a canary.
    pub then: ShadowThen,
}

impl Default for Shadow {
    fn default() -> Self {
        let m = Mirror::new(Canary::default().canary_group, 100);
        Self {
            base: Canary::default(),
            percent: m.percent,
            methods: m.methods,
            allow_unsafe_methods: m.allow_unsafe_methods,
            request_body: m.request_body,
            duration: Duration::from_secs(600),
            then: ShadowThen::Teardown,
        }
    }
}

impl Shadow {
    /// The policy of the shadow phase: every client request to stable, the
    /// copies to the shadow.
    pub fn policy(&self) -> TrafficPolicy {
        TrafficPolicy {
            rules: Vec::new(),
            split: Split {
                weights: vec![GroupWeight {
                    group: self.base.stable_group.clone(),
                    percent: 100,
                }],
                sticky: None,
            },
            mirror: Some(Mirror {
                to: self.base.canary_group.clone(),
                percent: self.percent,
                methods: self.methods.clone(),
                allow_unsafe_methods: self.allow_unsafe_methods,
                request_body: self.request_body,
            }),
        }
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: `percent` (outside 1-100),
    /// `methods` (empty, not a method, or a state-changing one without
    /// `allow_unsafe_methods`), `duration` (0, or shorter than the
    /// analysis's `check_interval`), or a field of [`base`](Self::base).
    pub fn validate(&self) -> Result<()> {
        self.base.validate()?;
        if let Err(e) = self.policy().validate() {
            return Err(match e {
                RoutingError::Invalid { field, message } => {
                    Error::invalid(field.trim_start_matches("mirror."), message)
                }
                other => other.into(),
            });
        }
        if self.duration.is_zero() || self.duration < self.base.check_interval {
            return Err(Error::invalid(
                "duration",
                format!(
                    "{} is shorter than check_interval ({}); judge the shadow for several checks, e.g. \"10m\"",
                    crate::duration_text::format(self.duration),
                    crate::duration_text::format(self.base.check_interval)
                ),
            ));
        }
        Ok(())
    }
}

impl Strategy for Shadow {
    fn kind(&self) -> crate::StrategyKind {
        crate::StrategyKind::Shadow
    }

    fn plan(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        self.validate()?;
        let base = &self.base;
        let canary = self.then == ShadowThen::Canary;
        let of = 1 + if canary { base.stages.len() } else { 0 };
        base.shaped_plan(self.kind(), fleet, release, canary, |analysis| {
            let mut stages = vec![Stage {
                if_winner: None,
                name: format!(
                    "shadow {}% of {} to {}",
                    self.percent,
                    self.methods.join(","),
                    base.canary_group
                ),
                units: vec![Unit {
                    instance: None,
                    steps: vec![
                        Step::ApplyPolicy {
                            policy: self.policy(),
                        },
                        Step::Analyze {
                            stage: 1,
                            of,
                            weight: 0,
                            duration: self.duration,
                            analysis: analysis.clone(),
                            chaos: base.chaos_steps(1),
                            ramp_down: None,
                        },
                    ],
                }],
            }];
            if canary {
                stages.extend(base.widen(&[], 2, of, analysis));
            }
            stages
        })
    }
}

/// Dark launch: the new release is deployed to the canary group with no
/// share of public traffic, reachable only through [`rules`](Self::rules)
/// (a header internal testers send, a cookie of a beta segment). The
/// deployment then waits for `deploykit promote` (the executor's
/// [`PromotionHandle`](crate::PromotionHandle)) while the canary analysis
/// runs; a breach, or no promotion within [`timeout`](Self::timeout), rolls
/// back. Once promoted it widens through [`base`](Self::base)'s canary
/// stages, the rules still in place, and promotes stable.
///
/// The rules need a load balancer that routes per request (nginx with
/// `location_include`, HAProxy with `map_dir`); any other is refused
/// before anything is touched. Feature flags are not needed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DarkLaunch {
    /// Groups, analysis, health, gates, the stages after the promotion and
    /// finalize (the CLI fills it from `[strategy.canary]`).
    #[serde(skip)]
    pub base: Canary,
    /// The requests that reach the new release while it is dark, each
    /// rule's group the canary group. At least one.
    pub rules: Vec<Rule>,
    /// Roll back when no promotion comes within this long; `None` waits
    /// until promoted or aborted.
    #[serde(
        with = "crate::duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout: Option<Duration>,
}

impl DarkLaunch {
    /// The policy while dark: the rules to the canary, everyone else to
    /// stable.
    pub fn policy(&self) -> TrafficPolicy {
        TrafficPolicy {
            rules: self.rules.clone(),
            split: Split {
                weights: vec![GroupWeight {
                    group: self.base.stable_group.clone(),
                    percent: 100,
                }],
                sticky: None,
            },
            mirror: None,
        }
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: `rules` (empty),
    /// `rules[i].group` (not the canary group), `rules[i].header` (or
    /// `.cookie`, `.query`, a malformed name or value), `timeout` (0), or a
    /// field of [`base`](Self::base).
    pub fn validate(&self) -> Result<()> {
        self.base.validate()?;
        if self.rules.is_empty() {
            return Err(Error::invalid(
                "rules",
                "is empty; say who sees the dark release, e.g. { header = \"x-beta\", exact = \"1\", group = \"canary\" }",
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            if r.group != self.base.canary_group {
                return Err(Error::invalid(
                    format!("rules[{i}].group"),
                    format!(
                        "is {}; a dark launch's rules send requests to the canary group ({})",
                        r.group, self.base.canary_group
                    ),
                ));
            }
        }
        self.policy().validate()?;
        if self.timeout.is_some_and(|t| t.is_zero()) {
            return Err(Error::invalid(
                "timeout",
                "is 0; it would roll back at once; omit it to wait until promoted",
            ));
        }
        Ok(())
    }
}

impl Strategy for DarkLaunch {
    fn kind(&self) -> crate::StrategyKind {
        crate::StrategyKind::DarkLaunch
    }

    fn plan(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        self.validate()?;
        let base = &self.base;
        let of = 1 + base.stages.len();
        let who: Vec<String> = self.rules.iter().map(|r| r.matches.to_string()).collect();
        base.shaped_plan(self.kind(), fleet, release, true, |analysis| {
            let mut stages = vec![Stage {
                if_winner: None,
                name: format!("dark launch to {} only", who.join(" or ")),
                units: vec![Unit {
                    instance: None,
                    steps: vec![
                        Step::ApplyPolicy {
                            policy: self.policy(),
                        },
                        Step::AwaitPromotion {
                            stage: 1,
                            weight: 0,
                            timeout_ms: timeout_ms(self.timeout),
                            analysis: analysis.clone(),
                        },
                    ],
                }],
            }];
            stages.extend(base.widen(&self.rules, 2, of, analysis));
            stages
        })
    }
}

/// A/B experiment: the new release (the treatment, on the canary group)
/// and the current one (the control, stable) are served side by side, each
/// user kept on one by [`sticky`](Self::sticky), the treatment to
/// [`treatment_percent`](Self::treatment_percent) % of users. Every check
/// interval the canary guardrails run (a breach rolls back) and the visits
/// and conversions of both since the start
/// ([`MetricsSource::observe_tally`](crate::MetricsSource::observe_tally))
/// go into an always-valid sequential test ([`crate::experiment`]), which
/// can be read at every check without the bias of peeking. The treatment
/// winning promotes it: every user moves to the treatment (the sticky split
/// ends), then stable moves to the release; the control winning rolls back
/// and keeps the control; no significant difference within
/// [`duration`](Self::duration) does what
/// [`ExperimentRules::on_no_difference`] says (by default keep the control). Each reading is an
/// [`EventKind::ExperimentReading`](crate::EventKind::ExperimentReading)
/// (tallies, effect, p-value), and the rollback's reason carries the last.
///
/// The sticky split needs a load balancer that can keep users on one group
/// (nginx with `location_include`, HAProxy with `map_dir`); any other is
/// refused before anything is touched.
///
/// **Several treatments.** With [`treatments`](Self::treatments) the
/// control (stable) is compared with each treatment group, each serving
/// its own release, by the Holm-corrected test
/// ([`crate::experiment::ManySequential`]); guardrails are checked for
/// every treatment and a breach of any rolls the whole experiment back.
/// The plan holds one promotion branch per treatment
/// ([`Stage::if_winner`]): when a treatment wins, the winner is journaled
/// ([`EventKind::ExperimentDecided`](crate::EventKind::ExperimentDecided))
/// before anything acts on it, every user moves to it, stable's instances
/// move to its release, and every treatment group ends drained and
/// stopped. No winner keeps the control; `on_no_difference = promote` is
/// refused with more than one treatment (which one would be a guess).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use deploykit::strategy::Treatment;
/// use deploykit::{Experiment, Group, ReleaseId};
/// let e = Experiment {
///     treatments: vec![
///         Treatment::new(Group::new("canary-b")?, 25),
///         Treatment::new(Group::new("canary-c")?, 25).release(ReleaseId::new("v3")?),
///     ],
///     ..Experiment::default()
/// };
/// e.validate()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Experiment {
    /// Groups, guardrails (the analysis), health, gates and finalize.
    pub base: Canary,
    /// The users on the treatment, 1-99 percent. Default 50. Unused with
    /// [`treatments`](Self::treatments).
    pub treatment_percent: u8,
    /// Several treatments, each a group of its own with its release and
    /// share of users; the control (stable) gets the rest. Empty (the
    /// default): one treatment, `base.canary_group` on the deployed
    /// release at `treatment_percent`.
    pub treatments: Vec<Treatment>,
    /// What keeps a user on one variant. Default a cookie `dk_variant` the
    /// load balancer sets.
    pub sticky: Sticky,
    /// The longest the experiment runs. Default 1 hour.
    pub duration: Duration,
    /// How the test decides.
    pub rules: ExperimentRules,
}

impl Default for Experiment {
    fn default() -> Self {
        Self {
            base: Canary::default(),
            treatment_percent: 50,
            sticky: Sticky::Cookie {
                name: "dk_variant".into(),
            },
            duration: Duration::from_secs(3600),
            rules: ExperimentRules::default(),
            treatments: Vec::new(),
        }
    }
}

/// One treatment of an [`Experiment`] with several: a group of its own
/// instances, the release they serve and the share of users it gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Treatment {
    /// The group serving it; its instances serve nothing else.
    pub group: Group,
    /// The release it serves; `None` (the default) is the release being
    /// deployed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseId>,
    /// Its share of users, 1-99 percent.
    pub percent: u8,
}

impl Treatment {
    /// A treatment of `group` on the deployed release with `percent` % of
    /// the users.
    pub fn new(group: Group, percent: u8) -> Self {
        Self {
            group,
            release: None,
            percent,
        }
    }

    /// Serves `release` instead of the deployed release.
    pub fn release(mut self, release: ReleaseId) -> Self {
        self.release = Some(release);
        self
    }
}

impl Experiment {
    /// The policy while the experiment runs: a sticky split over the
    /// control and every treatment.
    pub fn policy(&self) -> TrafficPolicy {
        let weights = if self.treatments.is_empty() {
            self.base.weights(self.treatment_percent)
        } else {
            let taken: u32 = self.treatments.iter().map(|t| u32::from(t.percent)).sum();
            let mut w = vec![GroupWeight {
                group: self.base.stable_group.clone(),
                percent: u8::try_from(100_u32.saturating_sub(taken)).unwrap_or(0),
            }];
            w.extend(self.treatments.iter().map(|t| GroupWeight {
                group: t.group.clone(),
                percent: t.percent,
            }));
            w
        };
        TrafficPolicy {
            rules: Vec::new(),
            split: Split {
                weights,
                sticky: Some(self.sticky.clone()),
            },
            mirror: None,
        }
    }

    /// The weights with every user on `to` (stable when `None`) and no
    /// other group served.
    fn all_to(&self, to: Option<&Group>) -> Vec<GroupWeight> {
        let to = to.unwrap_or(&self.base.stable_group);
        std::iter::once(&self.base.stable_group)
            .chain(self.treatments.iter().map(|t| &t.group))
            .map(|g| GroupWeight {
                group: g.clone(),
                percent: if g == to { 100 } else { 0 },
            })
            .collect()
    }

    /// Checks the keys of [`treatments`](Self::treatments).
    fn validate_treatments(&self) -> Result<()> {
        let n = self.treatments.len();
        let mut sum = 0_u32;
        for (i, t) in self.treatments.iter().enumerate() {
            if !(1..=99).contains(&t.percent) {
                return Err(Error::invalid(
                    format!("treatments[{i}].percent"),
                    format!(
                        "{} is outside 1-99; give the treatment a share of users, e.g. 25",
                        t.percent
                    ),
                ));
            }
            sum += u32::from(t.percent);
            if t.group == self.base.stable_group {
                return Err(Error::invalid(
                    format!("treatments[{i}].group"),
                    format!(
                        "is the stable group ({}), the control; give each treatment a group of its own, e.g. \"canary-b\"",
                        t.group
                    ),
                ));
            }
            if let Some(j) = self.treatments[..i].iter().position(|o| o.group == t.group) {
                return Err(Error::invalid(
                    format!("treatments[{i}].group"),
                    format!(
                        "{} is also treatments[{j}]'s group; each treatment needs a group of its own",
                        t.group
                    ),
                ));
            }
            if let Some(j) = self.treatments[..i].iter().position(|o| o.release == t.release) {
                return Err(Error::invalid(
                    format!("treatments[{i}].release"),
                    match &t.release {
                        Some(r) => format!("{r} is also treatments[{j}]'s release; two treatments of one release compare nothing, merge them"),
                        None => format!("is not set, as treatments[{j}]'s: both would serve the deployed release; give one its own release, e.g. release = \"v3\""),
                    },
                ));
            }
        }
        if sum > 99 {
            return Err(Error::invalid(
                "treatments",
                format!("the treatments' percents add up to {sum}; the control (stable) needs users too, keep the sum at most 99"),
            ));
        }
        if n > 1 && self.rules.on_no_difference == crate::experiment::NoDifference::Promote {
            return Err(Error::invalid(
                "on_no_difference",
                format!("is promote, but with {n} treatments no difference does not say which to promote; use keep-control"),
            ));
        }
        if self.base.flag.is_some() {
            return Err(Error::invalid(
                "flag",
                "cannot be carried by an experiment with several treatments (one flag share cannot follow several groups); omit it",
            ));
        }
        Ok(())
    }

    /// Checks the parameters.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field: `treatment_percent`
    /// (outside 1-99), `treatments[i].percent` (outside 1-99),
    /// `treatments` (percents adding up to more than 99),
    /// `treatments[i].group` (stable's, or another treatment's),
    /// `treatments[i].release` (another treatment's), `on_no_difference`
    /// (promote with several treatments), `flag` (with several
    /// treatments), `duration` (shorter than the analysis's
    /// `check_interval`), `sticky` (a bad name), a field of
    /// [`rules`](Self::rules) or of [`base`](Self::base).
    pub fn validate(&self) -> Result<()> {
        self.base.validate()?;
        self.rules.validate()?;
        self.validate_treatments()?;
        if !(1..=99).contains(&self.treatment_percent) {
            return Err(Error::invalid(
                "treatment_percent",
                format!(
                    "{} is outside 1-99; both variants need users, e.g. 50",
                    self.treatment_percent
                ),
            ));
        }
        if self.duration < self.base.check_interval {
            return Err(Error::invalid(
                "duration",
                format!(
                    "{} is shorter than check_interval ({}); run the experiment for many checks, e.g. \"1h\"",
                    crate::duration_text::format(self.duration),
                    crate::duration_text::format(self.base.check_interval)
                ),
            ));
        }
        self.policy().validate().map_err(|e| match e {
            RoutingError::Invalid { message, .. } => Error::invalid("sticky", message),
            other => other.into(),
        })
    }
}

impl Strategy for Experiment {
    fn kind(&self) -> crate::StrategyKind {
        crate::StrategyKind::Experiment
    }

    fn plan(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        self.validate()?;
        if !self.treatments.is_empty() {
            return self.plan_treatments(fleet, release);
        }
        let base = &self.base;
        base.shaped_plan(self.kind(), fleet, release, true, |analysis| {
            vec![
                Stage {
                    if_winner: None,
                    name: format!(
                        "experiment: {} % of users on {} ({})",
                        self.treatment_percent, base.canary_group, self.sticky
                    ),
                    units: vec![Unit {
                        instance: None,
                        steps: vec![
                            Step::ApplyPolicy {
                                policy: self.policy(),
                            },
                            Step::Experiment {
                                rules: self.rules,
                                duration: self.duration,
                                analysis: analysis.clone(),
                                ran_for: Duration::ZERO,
                                treatments: Vec::new(),
                            },
                        ],
                    }],
                },
                Stage {
                    if_winner: None,
                    // Reached only when the treatment won: the sticky split
                    // would keep sending the control's users to stable
                    // instances while they are replaced, so they move to the
                    // winner first (as a canary's last stage does).
                    name: format!("all traffic to {} (the winner)", base.canary_group),
                    units: vec![Unit {
                        instance: None,
                        steps: vec![Step::SetWeights {
                            weights: base.weights(100),
                        }],
                    }],
                },
            ]
        })
    }
}

impl Experiment {
    /// The plan of an experiment with several treatments: every treatment
    /// group deployed with its release, one sticky split over the control
    /// and the treatments, the experiment, then one promotion branch per
    /// treatment ([`Stage::if_winner`]; the executor runs the winner's),
    /// and at the end all traffic to stable and every treatment stopped.
    fn plan_treatments(&self, fleet: &FleetSnapshot, release: &ReleaseId) -> Result<Plan> {
        let base = &self.base;
        super::check_fleet(fleet)?;
        let arms: Vec<ExperimentArm> = self
            .treatments
            .iter()
            .map(|t| ExperimentArm {
                group: t.group.clone(),
                release: t.release.clone().unwrap_or_else(|| release.clone()),
            })
            .collect();
        for i in &fleet.instances {
            let g = &i.backend.group;
            if g != &base.stable_group && !arms.iter().any(|a| &a.group == g) {
                let groups: Vec<&str> = arms.iter().map(|a| a.group.as_str()).collect();
                return Err(Error::invalid(
                    "instances",
                    format!(
                        "{} is in group {g}, neither the stable group ({}) nor a treatment's ({}); give every instance one of them",
                        i.backend.id,
                        base.stable_group,
                        groups.join(", ")
                    ),
                ));
            }
        }
        let stable: Vec<_> = fleet.group(&base.stable_group).collect();
        if stable.is_empty() {
            return Err(Error::invalid(
                "instances",
                format!(
                    "no instance is in the stable group {}; an experiment needs the control's instances to compare with and to promote",
                    base.stable_group
                ),
            ));
        }
        for (i, a) in arms.iter().enumerate() {
            if fleet.group(&a.group).next().is_none() {
                return Err(Error::invalid(
                    format!("treatments[{i}].group"),
                    format!(
                        "no instance is in the group {}; put at least one instance in it (group = \"{}\")",
                        a.group, a.group
                    ),
                ));
            }
        }
        let treated: Vec<&crate::plan::InstanceSnapshot> = fleet
            .instances
            .iter()
            .filter(|i| i.backend.group != base.stable_group)
            .collect();
        let release_of = |g: &Group| arms.iter().find(|a| &a.group == g).map(|a| &a.release);
        let unit = |i: &crate::plan::InstanceSnapshot, r: &ReleaseId| Unit {
            instance: Some(i.backend.id.clone()),
            steps: super::replace_steps(&i.backend.id, r, base.health, base.drain_timeout),
        };
        let traffic = |name: String, if_winner: Option<Group>, to: Option<&Group>| Stage {
            if_winner,
            name,
            units: vec![Unit {
                instance: None,
                steps: vec![Step::SetWeights {
                    weights: self.all_to(to),
                }],
            }],
        };
        let mut stages = vec![
            traffic("isolate treatments".into(), None, None),
            Stage {
                if_winner: None,
                name: "deploy treatments".into(),
                units: treated
                    .iter()
                    .map(|i| unit(i, release_of(&i.backend.group).expect("a treatment's instance")))
                    .collect(),
            },
        ];
        for name in &base.gates {
            for a in &arms {
                stages.push(Stage {
                    if_winner: None,
                    name: format!("gate {name} on {}", a.group),
                    units: vec![Unit {
                        instance: None,
                        steps: vec![Step::Gate {
                            name: name.clone(),
                            group: a.group.clone(),
                            release: a.release.clone(),
                        }],
                    }],
                });
            }
        }
        let mut analysis = base.analysis_of();
        analysis.canary = arms[0].group.clone();
        let shares: Vec<String> = self
            .policy()
            .split
            .weights
            .iter()
            .map(|w| format!("{} {} %", w.group, w.percent))
            .collect();
        stages.push(Stage {
            if_winner: None,
            name: format!("experiment: {} ({})", shares.join(", "), self.sticky),
            units: vec![Unit {
                instance: None,
                steps: vec![
                    Step::ApplyPolicy {
                        policy: self.policy(),
                    },
                    Step::Experiment {
                        rules: self.rules,
                        duration: self.duration,
                        analysis,
                        ran_for: Duration::ZERO,
                        treatments: arms.clone(),
                    },
                ],
            }],
        });
        for a in &arms {
            let when = || Some(a.group.clone());
            // Every user to the winner before stable is touched: users
            // pinned to stable would otherwise reach instances being
            // replaced.
            stages.push(traffic(
                format!("all traffic to {} (the winner)", a.group),
                when(),
                Some(&a.group),
            ));
            stages.push(Stage {
                if_winner: when(),
                name: "back up stable".into(),
                units: vec![Unit {
                    instance: None,
                    steps: vec![Step::BackupRelease {
                        group: base.stable_group.clone(),
                    }],
                }],
            });
            let todo: Vec<_> = stable
                .iter()
                .filter(|i| i.release.as_ref() != Some(&a.release))
                .collect();
            let batches: Vec<_> = todo.chunks(base.finalize_batch).collect();
            let n = batches.len();
            for (b, chunk) in batches.into_iter().enumerate() {
                stages.push(Stage {
                    if_winner: when(),
                    name: format!("promote stable {}/{n} to {}", b + 1, a.release),
                    units: chunk.iter().map(|i| unit(i, &a.release)).collect(),
                });
            }
        }
        stages.push(traffic("all traffic to stable".into(), None, None));
        stages.push(Stage {
            if_winner: None,
            name: "stop treatments".into(),
            units: treated
                .iter()
                .map(|i| {
                    let instance = || i.backend.id.clone();
                    Unit {
                        instance: Some(instance()),
                        steps: vec![
                            Step::Drain { instance: instance() },
                            Step::AwaitDrained {
                                instance: instance(),
                                timeout: base.drain_timeout,
                            },
                            Step::Stop { instance: instance() },
                        ],
                    }
                })
                .collect(),
        });
        // Stable instances no branch moves (one treatment, on its release).
        let skipped: Vec<InstanceId> = stable
            .iter()
            .filter(|i| arms.iter().all(|a| i.release.as_ref() == Some(&a.release)))
            .map(|i| i.backend.id.clone())
            .collect();
        Ok(
            Plan::new(self.kind(), release.clone(), super::previous_map(fleet), stages)
                .with_policy(crate::plan::FailurePolicy::AbortAll)
                .with_health(base.health)
                .with_drain_timeout(base.drain_timeout)
                .with_rollback_batch(base.finalize_batch)
                .with_skipped(skipped)
                .with_on_abort(vec![crate::plan::AbortStep::new(Step::SetWeights {
                    weights: self.all_to(None),
                })])
                .with_leave_stopped(treated.iter().map(|i| i.backend.id.clone()).collect()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::InstanceSnapshot;
    use crate::routing::{Match, ValueMatch};
    use crate::traits::Backend;
    use crate::{Address, Group, InstanceId};

    fn fleet(stable: usize, canary: usize) -> FleetSnapshot {
        let mut instances = Vec::new();
        for (g, n) in [("stable", stable), ("canary", canary)] {
            for _ in 0..n {
                let k = instances.len() + 1;
                instances.push(InstanceSnapshot {
                    backend: Backend {
                        id: InstanceId::new(format!("i-{k}")).unwrap(),
                        address: Address::parse(&format!("127.0.0.1:{}", 20000 + k)).unwrap(),
                        group: Group::new(g).unwrap(),
                    },
                    release: Some(ReleaseId::new("v1").unwrap()),
                });
            }
        }
        FleetSnapshot { instances }
    }

    fn v2() -> ReleaseId {
        ReleaseId::new("v2").unwrap()
    }

    fn field(e: Error) -> String {
        match e {
            Error::InvalidInput { field, .. } => field,
            e => panic!("unexpected {e}"),
        }
    }

    /// A base checking every 10 s, for ramps stepping every 10 s.
    fn quick() -> Canary {
        Canary {
            check_interval: Duration::from_secs(10),
            ..Canary::default()
        }
    }

    fn beta_rule() -> Rule {
        Rule {
            matches: Match::Header {
                name: "x-beta".into(),
                value: ValueMatch::Exact("1".into()),
            },
            group: Group::new("canary").unwrap(),
        }
    }

    #[test]
    fn linear_ramp_rises_evenly_and_ends_at_to() {
        let r = Ramped {
            from: 5,
            to: 50,
            duration: Duration::from_secs(90),
            step_interval: Duration::from_secs(10),
            base: quick(),
            ..Ramped::default()
        };
        let s = r.schedule().unwrap();
        let points: Vec<u8> = s.iter().map(|(p, _)| *p).collect();
        assert_eq!(points, [5, 10, 15, 20, 25, 30, 35, 40, 45, 50]);
        assert!(s.iter().all(|(_, hold)| *hold == Duration::from_secs(10)));
        // The ramp takes its duration plus the hold at `to`.
        let total: Duration = s.iter().map(|(_, h)| *h).sum();
        assert_eq!(total, Duration::from_secs(100));
    }

    #[test]
    fn exponential_ramp_multiplies_and_merges_repeated_percents() {
        let r = Ramped {
            from: 1,
            to: 100,
            duration: Duration::from_secs(100),
            step_interval: Duration::from_secs(10),
            curve: RampCurve::Exponential,
            base: quick(),
            ..Ramped::default()
        };
        let s = r.schedule().unwrap();
        let points: Vec<u8> = s.iter().map(|(p, _)| *p).collect();
        // 1 * 100^(k/10): 1, 1.58, 2.51, 3.98, 6.31, 10, 15.8, 25.1, 39.8, 63.1, 100.
        assert_eq!(points, [1, 2, 3, 4, 6, 10, 16, 25, 40, 63, 100]);
        // A linear ramp of 1 % steps over more steps than percents merges
        // equal points into longer holds, never repeats a stage.
        let slow = Ramped {
            from: 1,
            to: 3,
            duration: Duration::from_secs(40),
            step_interval: Duration::from_secs(10),
            base: quick(),
            ..Ramped::default()
        };
        let s = slow.schedule().unwrap();
        assert_eq!(s.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [1, 2, 3]);
        let total: Duration = s.iter().map(|(_, h)| *h).sum();
        assert_eq!(total, Duration::from_secs(50));
    }

    #[test]
    fn ramp_validation_names_the_field() {
        let d = Ramped {
            duration: Duration::from_secs(600),
            ..Ramped::default()
        };
        d.validate().unwrap();
        for (bad, name) in [
            (Ramped { from: 0, ..d.clone() }, "from"),
            (
                Ramped {
                    from: 100,
                    ..d.clone()
                },
                "from",
            ),
            (
                Ramped {
                    from: 50,
                    to: 50,
                    ..d.clone()
                },
                "to",
            ),
            (Ramped { to: 101, ..d.clone() }, "to"),
            (
                Ramped {
                    duration: Duration::ZERO,
                    ..d.clone()
                },
                "duration",
            ),
            (
                Ramped {
                    step_interval: Duration::ZERO,
                    ..d.clone()
                },
                "step_interval",
            ),
            (
                Ramped {
                    step_interval: Duration::from_secs(601),
                    ..d.clone()
                },
                "step_interval",
            ),
            (
                Ramped {
                    step_interval: Duration::from_millis(100),
                    ..d.clone()
                },
                "step_interval",
            ),
            (
                Ramped {
                    step_interval: Duration::from_secs(10),
                    ..d.clone()
                },
                "step_interval",
            ),
        ] {
            assert_eq!(field(bad.validate().unwrap_err()), name);
        }
    }

    #[test]
    fn ramp_down_falls_evenly_below_the_breached_share() {
        let r = Ramped {
            ramp_down: Some(Duration::from_secs(40)),
            base: quick(),
            ..Ramped::default()
        };
        // Four steps of 10 s (one per check) below 50 %: 40, 30, 20, 10.
        let d = r.ramp_down_at(50).unwrap();
        let points: Vec<u8> = d.steps.iter().map(|s| s.percent).collect();
        assert_eq!(points, [40, 30, 20, 10]);
        assert!(d.steps.iter().all(|s| s.hold == Duration::from_secs(10)));
        assert_eq!(d.steps[0].weights, r.base.weights(40));
        assert_eq!(d.critical, 2.0);
        // A small share merges steps that round alike, and keeps the time.
        let d = r.ramp_down_at(3).unwrap();
        let steps: Vec<(u8, Duration)> = d.steps.iter().map(|s| (s.percent, s.hold)).collect();
        assert_eq!(
            steps,
            [(2, Duration::from_secs(20)), (1, Duration::from_secs(20))]
        );
        // 1 % has no step below it; no ramp_down, no way down.
        assert_eq!(r.ramp_down_at(1), None);
        assert_eq!(Ramped::default().ramp_down_at(50), None);
        // At most ten steps however long the way down.
        let long = Ramped {
            ramp_down: Some(Duration::from_secs(3600)),
            ..r.clone()
        };
        assert_eq!(long.ramp_down_at(100).unwrap().steps.len(), 10);
    }

    #[test]
    fn ramp_down_validation_names_the_field() {
        let d = Ramped {
            duration: Duration::from_secs(600),
            ramp_down: Some(Duration::from_secs(60)),
            ..Ramped::default()
        };
        d.validate().unwrap();
        for (bad, name) in [
            (
                Ramped {
                    ramp_down: Some(Duration::from_secs(5)),
                    ..d.clone()
                },
                "ramp_down",
            ),
            (
                Ramped {
                    ramp_down_critical: 0.5,
                    ..d.clone()
                },
                "ramp_down_critical",
            ),
            (
                Ramped {
                    ramp_down_critical: f64::NAN,
                    ..d.clone()
                },
                "ramp_down_critical",
            ),
            (
                Ramped {
                    base: Canary {
                        flag: Some("checkout".into()),
                        ..Canary::default()
                    },
                    ..d.clone()
                },
                "ramp_down",
            ),
        ] {
            assert_eq!(field(bad.validate().unwrap_err()), name);
        }
    }

    #[test]
    fn ramped_plan_is_the_curve_between_deploy_and_promote() {
        let r = Ramped {
            from: 10,
            to: 100,
            duration: Duration::from_secs(180),
            step_interval: Duration::from_secs(60),
            ..Ramped::default()
        };
        let plan = r.plan(&fleet(2, 1), &v2()).unwrap();
        assert_eq!(plan.strategy, crate::StrategyKind::Ramped);
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "isolate canary",
                "deploy canary",
                "ramp 10% (1/4)",
                "ramp 40% (2/4)",
                "ramp 70% (3/4)",
                "ramp 100% (4/4)",
                "back up stable",
                "promote stable 1/2",
                "promote stable 2/2",
                "all traffic to stable",
                "stop canary"
            ]
        );
        assert_eq!(
            plan.stages[3].units[0].steps[1].to_string(),
            "analyze canary stage 2/4 at 40% for 60s (check every 30s)"
        );
        assert_eq!(plan.on_abort[0].to_string(), "set weights stable=100% canary=0%");
        assert!(plan.projected_duration().min >= Duration::from_secs(240));
    }

    #[test]
    fn a_won_experiment_moves_every_user_to_the_winner_before_stable_is_replaced() {
        let plan = Experiment::default().plan(&fleet(1, 1), &v2()).unwrap();
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "isolate canary",
                "deploy canary",
                "experiment: 50 % of users on canary (sticky by cookie dk_variant it sets)",
                "all traffic to canary (the winner)",
                "back up stable",
                "promote stable 1/1",
                "all traffic to stable",
                "stop canary"
            ]
        );
        // The sticky split ends there: users pinned to stable would
        // otherwise reach a group whose only instance is being replaced.
        assert_eq!(
            plan.stages[3].units[0].steps[0].to_string(),
            "set weights stable=0% canary=100%"
        );
    }

    /// Two stable instances, one of canary-b and one of canary-c, on v1.
    fn three_groups() -> FleetSnapshot {
        let mut f = fleet(2, 0);
        for (k, grp) in [(3, "canary-b"), (4, "canary-c")] {
            f.instances.push(InstanceSnapshot {
                backend: Backend {
                    id: InstanceId::new(format!("i-{k}")).unwrap(),
                    address: Address::parse(&format!("127.0.0.1:{}", 20000 + k)).unwrap(),
                    group: Group::new(grp).unwrap(),
                },
                release: Some(ReleaseId::new("v1").unwrap()),
            });
        }
        f
    }

    fn two_treatments() -> Experiment {
        Experiment {
            treatments: vec![
                Treatment::new(Group::new("canary-b").unwrap(), 20),
                Treatment::new(Group::new("canary-c").unwrap(), 30).release(ReleaseId::new("v3").unwrap()),
            ],
            ..Experiment::default()
        }
    }

    #[test]
    fn an_experiment_with_two_treatments_plans_a_branch_per_winner() {
        let plan = two_treatments().plan(&three_groups(), &v2()).unwrap();
        let names: Vec<String> = plan
            .stages
            .iter()
            .map(|s| match &s.if_winner {
                Some(g) => format!("{} [{g}]", s.name),
                None => s.name.clone(),
            })
            .collect();
        assert_eq!(
            names,
            [
                "isolate treatments",
                "deploy treatments",
                "experiment: stable 50 %, canary-b 20 %, canary-c 30 % (sticky by cookie dk_variant it sets)",
                "all traffic to canary-b (the winner) [canary-b]",
                "back up stable [canary-b]",
                "promote stable 1/2 to v2 [canary-b]",
                "promote stable 2/2 to v2 [canary-b]",
                "all traffic to canary-c (the winner) [canary-c]",
                "back up stable [canary-c]",
                "promote stable 1/2 to v3 [canary-c]",
                "promote stable 2/2 to v3 [canary-c]",
                "all traffic to stable",
                "stop treatments"
            ]
        );
        // Each treatment deployed with its own release.
        let deploy: Vec<String> = plan.stages[1].units[0]
            .steps
            .iter()
            .chain(&plan.stages[1].units[1].steps)
            .filter(|s| matches!(s, Step::Install { .. }))
            .map(|s| s.to_string())
            .collect();
        assert_eq!(deploy, ["install v2 on i-3", "install v3 on i-4"]);
        assert_eq!(
            plan.stages[3].units[0].steps[0].to_string(),
            "set weights stable=0% canary-b=100% canary-c=0%"
        );
        assert_eq!(
            plan.on_abort[0].to_string(),
            "set weights stable=100% canary-b=0% canary-c=0%"
        );
        assert_eq!(plan.leave_stopped.len(), 2);
        // The dry run shows which branch runs when, and each branch's release.
        let shown = plan.to_string();
        assert!(
            shown.contains("stage 10: promote stable 1/2 to v3 [only if canary-c wins] (1 unit(s) at once)")
                && shown.contains("  i-1 (v1 -> v3): ")
                && shown.contains("  i-1 (v1 -> v2): ")
                && shown.contains("experiment canary-b (v2), canary-c (v3) (treatments, Holm-corrected) against stable (control)"),
            "{shown}"
        );
        // One branch counts in the projection, not both.
        let one = Experiment {
            treatments: two_treatments().treatments[..1].to_vec(),
            ..two_treatments()
        };
        let mut f = three_groups();
        f.instances.pop();
        let single = one.plan(&f, &v2()).unwrap();
        assert_eq!(plan.projected_duration().max, single.projected_duration().max);
    }

    #[test]
    fn experiment_treatments_validation_names_the_field() {
        let d = two_treatments();
        d.validate().unwrap();
        let with = |f: &dyn Fn(&mut Experiment)| {
            let mut e = d.clone();
            f(&mut e);
            e
        };
        for (bad, name, says) in [
            (
                with(&|e| e.treatments[1].percent = 0),
                "treatments[1].percent",
                "outside 1-99",
            ),
            (
                with(&|e| e.treatments[1].percent = 80),
                "treatments",
                "add up to 100",
            ),
            (
                with(&|e| e.treatments[0].group = Group::new("stable").unwrap()),
                "treatments[0].group",
                "the control",
            ),
            (
                with(&|e| e.treatments[1].group = Group::new("canary-b").unwrap()),
                "treatments[1].group",
                "also treatments[0]'s group",
            ),
            (
                with(&|e| e.treatments[1].release = None),
                "treatments[1].release",
                "deployed release",
            ),
            (
                with(&|e| e.treatments[0].release = Some(ReleaseId::new("v3").unwrap())),
                "treatments[1].release",
                "v3 is also treatments[0]'s release",
            ),
            (
                with(&|e| e.rules.on_no_difference = crate::experiment::NoDifference::Promote),
                "on_no_difference",
                "which to promote",
            ),
            (
                with(&|e| e.base.flag = Some("checkout".into())),
                "flag",
                "several treatments",
            ),
        ] {
            let e = bad.validate().unwrap_err();
            let text = e.to_string();
            assert_eq!(field(e), name);
            assert!(text.contains(says), "{text}");
        }
        // One treatment may promote on no difference: it is unambiguous.
        with(&|e| {
            e.treatments.truncate(1);
            e.rules.on_no_difference = crate::experiment::NoDifference::Promote;
        })
        .validate()
        .unwrap();
        // The fleet: a treatment group without instances, a stray group.
        let mut f = three_groups();
        f.instances.pop();
        let e = d.plan(&f, &v2()).unwrap_err();
        assert_eq!(field(e), "treatments[1].group");
        let mut f = three_groups();
        f.instances[3].backend.group = Group::new("canary").unwrap();
        let e = d.plan(&f, &v2()).unwrap_err();
        assert_eq!(field(e), "instances");
    }

    #[test]
    fn shadow_plan_mirrors_then_tears_down_or_hands_over() {
        let s = Shadow {
            percent: 50,
            duration: Duration::from_secs(120),
            ..Shadow::default()
        };
        let plan = s.plan(&fleet(2, 1), &v2()).unwrap();
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "isolate canary",
                "deploy canary",
                "shadow 50% of GET,HEAD to canary",
                "all traffic to stable",
                "stop canary"
            ]
        );
        assert_eq!(
            plan.stages[2].units[0].steps[0].to_string(),
            "apply policy: split stable=100%; mirror 50% of GET,HEAD to canary"
        );
        // Teardown moves no stable instance.
        assert!(plan.stages.iter().all(|st| !st.name.starts_with("promote")));
        let handed = Shadow {
            then: ShadowThen::Canary,
            base: Canary {
                stages: vec![50, 100],
                ..Canary::default()
            },
            ..s.clone()
        };
        let plan = handed.plan(&fleet(2, 1), &v2()).unwrap();
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names[2..6],
            [
                "shadow 50% of GET,HEAD to canary",
                "canary 50% (2/3)",
                "canary 100% (3/3)",
                "back up stable"
            ]
        );
    }

    #[test]
    fn shadow_refuses_unsafe_methods_without_opt_in() {
        let s = Shadow {
            methods: vec!["GET".into(), "POST".into()],
            ..Shadow::default()
        };
        let e = s.validate().unwrap_err();
        assert!(e.to_string().contains("allow_unsafe_methods"), "{e}");
        assert_eq!(field(e), "methods");
        Shadow {
            allow_unsafe_methods: true,
            ..s
        }
        .validate()
        .unwrap();
        assert_eq!(
            field(
                Shadow {
                    percent: 0,
                    ..Shadow::default()
                }
                .validate()
                .unwrap_err()
            ),
            "percent"
        );
        assert_eq!(
            field(
                Shadow {
                    duration: Duration::from_secs(5),
                    ..Shadow::default()
                }
                .validate()
                .unwrap_err()
            ),
            "duration"
        );
    }

    #[test]
    fn dark_launch_waits_with_rules_then_widens_keeping_them() {
        let d = DarkLaunch {
            rules: vec![beta_rule()],
            base: Canary {
                stages: vec![25, 100],
                ..Canary::default()
            },
            ..DarkLaunch::default()
        };
        let plan = d.plan(&fleet(2, 1), &v2()).unwrap();
        let names: Vec<&str> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names[2..5],
            [
                "dark launch to header x-beta = 1 only",
                "canary 25% (2/3)",
                "canary 100% (3/3)"
            ]
        );
        assert_eq!(
            plan.stages[2].units[0].steps[0].to_string(),
            "apply policy: header x-beta = 1 -> canary; split stable=100%"
        );
        assert!(matches!(
            plan.stages[2].units[0].steps[1],
            Step::AwaitPromotion {
                stage: 1,
                weight: 0,
                ..
            }
        ));
        assert_eq!(
            plan.stages[3].units[0].steps[0].to_string(),
            "apply policy: header x-beta = 1 -> canary; split stable=75% canary=25%"
        );
    }

    #[test]
    fn dark_launch_validation_names_the_field() {
        assert_eq!(field(DarkLaunch::default().validate().unwrap_err()), "rules");
        let mut r = beta_rule();
        r.group = Group::new("stable").unwrap();
        let d = DarkLaunch {
            rules: vec![beta_rule(), r],
            ..DarkLaunch::default()
        };
        assert_eq!(field(d.validate().unwrap_err()), "rules[1].group");
        let d = DarkLaunch {
            rules: vec![beta_rule()],
            timeout: Some(Duration::ZERO),
            ..DarkLaunch::default()
        };
        assert_eq!(field(d.validate().unwrap_err()), "timeout");
    }
}
