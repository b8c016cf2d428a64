//! The strategies' serde form: the `[strategy.<kind>]` sections of
//! `deploykit.toml`, so the CLI reads its file straight into [`Rolling`],
//! [`Recreate`], [`BlueGreen`] and [`Canary`].
//!
//! The form is flat where the structs nest (`health_retries` for
//! `health.retries`, `error_threshold` for `analysis.error_threshold`,
//! `promotion = "manual"` with `promotion_timeout`), because that is how the
//! file has always been written; [`config_key`] maps a validation error's
//! field onto the key. Durations are `"30s"`-style text or whole seconds
//! ([`crate::duration_text`]). Every field is optional and defaults to the
//! struct's `Default`; unknown keys are refused.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::{BlueGreen, Canary, CountOrPercent, KeepOld, Promotion, Recreate, Rolling};
use crate::analysis::{AnalysisRules, HealthWatch};
use crate::judge::{ErrorRateJudge, LatencyJudge, MannWhitneySettings, ScoreThresholds, SequentialSettings};
use crate::names::Group;
use crate::plan::HealthCheck;

/// The key of a strategy section that a validation error's `field` names:
/// `health.retries` is written `health_retries`, `analysis.window` is
/// written `window`, `promotion.timeout` is written `promotion_timeout`;
/// every other field is written as named.
///
/// ```
/// assert_eq!(deploykit::strategy::config_key("analysis.error_threshold"), "error_threshold");
/// assert_eq!(deploykit::strategy::config_key("health.retries"), "health_retries");
/// assert_eq!(deploykit::strategy::config_key("stages[2]"), "stages[2]");
/// ```
pub fn config_key(field: &str) -> String {
    const NESTED: [(&str, &str); 3] = [
        ("health.", "health_"),
        ("analysis.", ""),
        ("promotion.timeout", "promotion_timeout"),
    ];
    for (nested, flat) in NESTED {
        if let Some(rest) = field.strip_prefix(nested) {
            return format!("{flat}{rest}");
        }
    }
    field.to_string()
}

/// `[strategy.rolling]`.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RollingDoc {
    batch_size: CountOrPercent,
    max_failures: CountOrPercent,
    health_retries: u32,
    #[serde(with = "crate::duration_text")]
    health_interval: Duration,
    #[serde(with = "crate::duration_text")]
    drain_timeout: Duration,
    #[serde(
        with = "crate::duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    stabilisation: Option<Duration>,
}

impl Default for RollingDoc {
    fn default() -> Self {
        Rolling::default().into()
    }
}

impl From<Rolling> for RollingDoc {
    fn from(r: Rolling) -> Self {
        Self {
            batch_size: r.batch_size,
            max_failures: r.max_failures,
            health_retries: r.health.retries,
            health_interval: r.health.interval,
            drain_timeout: r.drain_timeout,
            stabilisation: r.stabilisation,
        }
    }
}

impl From<RollingDoc> for Rolling {
    fn from(d: RollingDoc) -> Self {
        Self {
            batch_size: d.batch_size,
            max_failures: d.max_failures,
            health: HealthCheck {
                retries: d.health_retries,
                interval: d.health_interval,
            },
            drain_timeout: d.drain_timeout,
            stabilisation: d.stabilisation,
        }
    }
}

/// `[strategy.recreate]`.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RecreateDoc {
    health_retries: u32,
    #[serde(with = "crate::duration_text")]
    health_interval: Duration,
    #[serde(with = "crate::duration_text")]
    drain_timeout: Duration,
}

/// Plans and configurations without a flag serialise as they did before
/// canaries carried flags.
fn is_default_flag_variant(v: &str) -> bool {
    *v == Canary::default().flag_variant
}

impl Default for RecreateDoc {
    fn default() -> Self {
        Recreate::default().into()
    }
}

impl From<Recreate> for RecreateDoc {
    fn from(r: Recreate) -> Self {
        Self {
            health_retries: r.health.retries,
            health_interval: r.health.interval,
            drain_timeout: r.drain_timeout,
        }
    }
}

impl From<RecreateDoc> for Recreate {
    fn from(d: RecreateDoc) -> Self {
        Self {
            health: HealthCheck {
                retries: d.health_retries,
                interval: d.health_interval,
            },
            drain_timeout: d.drain_timeout,
        }
    }
}

/// `[strategy.blue-green]`. The smoke checks are not part of it: they keep
/// their own form (the file's top-level `[[smoke_checks]]`) and default to
/// [`SmokeCheck::defaults`](crate::SmokeCheck::defaults).
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct BlueGreenDoc {
    environments: [Group; 2],
    #[serde(with = "crate::duration_text")]
    healthy_deadline: Duration,
    #[serde(with = "crate::duration_text")]
    health_interval: Duration,
    warmup_requests: u32,
    warmup_path: String,
    #[serde(with = "keep_old")]
    keep_old: KeepOld,
}

impl Default for BlueGreenDoc {
    fn default() -> Self {
        BlueGreen::default().into()
    }
}

impl From<BlueGreen> for BlueGreenDoc {
    fn from(b: BlueGreen) -> Self {
        Self {
            environments: b.environments,
            healthy_deadline: b.healthy_deadline,
            health_interval: b.health_interval,
            warmup_requests: b.warmup_requests,
            warmup_path: b.warmup_path,
            keep_old: b.keep_old,
        }
    }
}

impl From<BlueGreenDoc> for BlueGreen {
    fn from(d: BlueGreenDoc) -> Self {
        Self {
            environments: d.environments,
            healthy_deadline: d.healthy_deadline,
            health_interval: d.health_interval,
            warmup_requests: d.warmup_requests,
            warmup_path: d.warmup_path,
            keep_old: d.keep_old,
            ..BlueGreen::default()
        }
    }
}

/// `keep_old`: a duration (`"30s"` or whole seconds) or
/// `"until-next-deployment"`; the older `{"for": <ms>}` and
/// `"until_next_deployment"` forms are still read.
mod keep_old {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::KeepOld;
    use crate::strategy::DurationTextError;

    const UNTIL_NEXT: &str = "until-next-deployment";

    pub(super) fn serialize<S: Serializer>(k: &KeepOld, s: S) -> Result<S::Ok, S::Error> {
        match k {
            KeepOld::For(d) => crate::duration_text::serialize(d, s),
            KeepOld::UntilNextDeployment => s.serialize_str(UNTIL_NEXT),
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<KeepOld, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Secs(u64),
            Text(String),
            Tagged(KeepOld),
        }
        match Repr::deserialize(d)? {
            Repr::Secs(s) => crate::duration_text::from_secs(s)
                .map(KeepOld::For)
                .map_err(serde::de::Error::custom),
            Repr::Text(t) if t == UNTIL_NEXT || t == "until_next_deployment" => {
                Ok(KeepOld::UntilNextDeployment)
            }
            Repr::Text(t) => match crate::strategy::parse_duration_text(&t) {
                Ok(d) => Ok(KeepOld::For(d)),
                Err(DurationTextError::TooLong) => {
                    Err(serde::de::Error::custom(crate::duration_text::too_long(&t)))
                }
                Err(DurationTextError::Malformed) => Err(serde::de::Error::custom(format!(
                    "{t:?} is neither a duration (e.g. \"30s\") nor \"{UNTIL_NEXT}\""
                ))),
            },
            Repr::Tagged(k) => Ok(k),
        }
    }
}

/// A canary stage's percent, read as any integer so that `250` is refused
/// as "outside 1-100" rather than as "not a u8".
#[derive(Serialize)]
#[serde(transparent)]
struct StagePercent(u8);

impl<'de> Deserialize<'de> for StagePercent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = i64::deserialize(d)?;
        u8::try_from(v).map(StagePercent).map_err(|_| {
            serde::de::Error::custom(format!(
                "{v} is outside 1-100; each stage is the canary's percent of traffic"
            ))
        })
    }
}

/// `promotion`: `"auto"` or `"manual"` (with `promotion_timeout`).
#[derive(Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum PromotionMode {
    Auto,
    Manual,
}

/// `[strategy.canary]`.
#[derive(Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct CanaryDoc {
    stages: Vec<StagePercent>,
    #[serde(with = "crate::duration_text")]
    stage_duration: Duration,
    #[serde(with = "crate::duration_text")]
    check_interval: Duration,
    stable_group: Group,
    canary_group: Group,
    promotion: PromotionMode,
    #[serde(
        with = "crate::duration_text::option",
        skip_serializing_if = "Option::is_none"
    )]
    promotion_timeout: Option<Duration>,
    error_threshold: f64,
    #[serde(with = "crate::duration_text")]
    latency_threshold: Duration,
    max_error_ratio: f64,
    ratio_floor: f64,
    ratio_significance: f64,
    min_requests: u64,
    inconclusive_limit: u32,
    #[serde(with = "crate::duration_text")]
    window: Duration,
    error_judge: ErrorRateJudge,
    latency_judge: LatencyJudge,
    sequential: SequentialSettings,
    mann_whitney: MannWhitneySettings,
    score: ScoreThresholds,
    monitoring_check: bool,
    #[serde(with = "crate::duration_text::or_off")]
    health_watch: Option<Duration>,
    #[serde(skip_serializing_if = "Option::is_none")]
    health_watch_failures: Option<u32>,
    finalize_batch: usize,
    health_retries: u32,
    #[serde(with = "crate::duration_text")]
    health_interval: Duration,
    #[serde(with = "crate::duration_text")]
    drain_timeout: Duration,
    #[serde(skip_serializing_if = "Option::is_none")]
    flag: Option<String>,
    #[serde(skip_serializing_if = "is_default_flag_variant")]
    flag_variant: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    chaos: Vec<crate::chaos::ChaosSpec>,
}

impl Default for CanaryDoc {
    fn default() -> Self {
        Canary::default().into()
    }
}

impl From<Canary> for CanaryDoc {
    fn from(c: Canary) -> Self {
        let (promotion, promotion_timeout) = match c.promotion {
            Promotion::Auto => (PromotionMode::Auto, None),
            Promotion::Manual { timeout } => (PromotionMode::Manual, timeout),
        };
        let a = c.analysis;
        Self {
            stages: c.stages.into_iter().map(StagePercent).collect(),
            stage_duration: c.stage_duration,
            check_interval: c.check_interval,
            stable_group: c.stable_group,
            canary_group: c.canary_group,
            promotion,
            promotion_timeout,
            error_threshold: a.error_threshold,
            latency_threshold: a.latency_threshold,
            max_error_ratio: a.max_error_ratio,
            ratio_floor: a.ratio_floor,
            ratio_significance: a.ratio_significance,
            min_requests: a.min_requests,
            inconclusive_limit: a.inconclusive_limit,
            window: a.window,
            error_judge: a.error_judge,
            latency_judge: a.latency_judge,
            sequential: a.sequential,
            mann_whitney: a.mann_whitney,
            score: a.score,
            monitoring_check: a.monitoring_check,
            health_watch: a.health_watch.map(|w| w.interval),
            health_watch_failures: a
                .health_watch
                .map(|w| w.failures)
                .filter(|n| *n != HealthWatch::DEFAULT_FAILURES),
            finalize_batch: c.finalize_batch,
            health_retries: c.health.retries,
            health_interval: c.health.interval,
            drain_timeout: c.drain_timeout,
            flag: c.flag,
            flag_variant: c.flag_variant,
            chaos: c.chaos,
        }
    }
}

impl TryFrom<CanaryDoc> for Canary {
    type Error = String;

    fn try_from(d: CanaryDoc) -> Result<Self, String> {
        if d.health_watch.is_none() && d.health_watch_failures.is_some() {
            return Err(
                "health_watch_failures is set but health_watch is \"off\"; remove \
                 health_watch = \"off\" to watch the canary's health (every 1s by default), \
                 or remove health_watch_failures"
                    .to_owned(),
            );
        }
        Ok(Self {
            stages: d.stages.into_iter().map(|s| s.0).collect(),
            stage_duration: d.stage_duration,
            check_interval: d.check_interval,
            stable_group: d.stable_group,
            canary_group: d.canary_group,
            analysis: AnalysisRules {
                error_threshold: d.error_threshold,
                latency_threshold: d.latency_threshold,
                max_error_ratio: d.max_error_ratio,
                ratio_floor: d.ratio_floor,
                ratio_significance: d.ratio_significance,
                min_requests: d.min_requests,
                inconclusive_limit: d.inconclusive_limit,
                window: d.window,
                error_judge: d.error_judge,
                latency_judge: d.latency_judge,
                sequential: d.sequential,
                mann_whitney: d.mann_whitney,
                score: d.score,
                monitoring_check: d.monitoring_check,
                health_watch: d.health_watch.map(|interval| HealthWatch {
                    interval,
                    failures: d.health_watch_failures.unwrap_or(HealthWatch::DEFAULT_FAILURES),
                }),
            },
            // A timeout without manual promotion has nothing to bound; it is
            // ignored, as it always was.
            promotion: match d.promotion {
                PromotionMode::Auto => Promotion::Auto,
                PromotionMode::Manual => Promotion::Manual {
                    timeout: d.promotion_timeout,
                },
            },
            health: HealthCheck {
                retries: d.health_retries,
                interval: d.health_interval,
            },
            drain_timeout: d.drain_timeout,
            finalize_batch: d.finalize_batch,
            gates: Vec::new(),
            flag: d.flag,
            flag_variant: d.flag_variant,
            chaos: d.chaos,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flat_form_fills_the_nested_fields() {
        let c: Canary = serde_json::from_str(
            r#"{"stages":[10,100],"ratio_significance":0,"health_retries":5,"health_interval":"2s",
                "promotion":"manual","promotion_timeout":"10m","window":60}"#,
        )
        .unwrap();
        assert_eq!(c.stages, vec![10, 100]);
        assert_eq!(c.analysis.ratio_significance, 0.0);
        assert_eq!(c.analysis.window, Duration::from_secs(60));
        assert_eq!(
            c.health,
            HealthCheck {
                retries: 5,
                interval: Duration::from_secs(2)
            }
        );
        assert_eq!(
            c.promotion,
            Promotion::Manual {
                timeout: Some(Duration::from_secs(600))
            }
        );
        assert_eq!(
            c.analysis.error_threshold,
            Canary::default().analysis.error_threshold
        );
        let r: Rolling = serde_json::from_str(r#"{"health_retries":2,"stabilisation":"50ms"}"#).unwrap();
        assert_eq!(r.health.retries, 2);
        assert_eq!(r.stabilisation, Some(Duration::from_millis(50)));
    }

    #[test]
    fn every_strategy_round_trips() {
        let canary = Canary {
            promotion: Promotion::Manual {
                timeout: Some(Duration::from_secs(90)),
            },
            ..Canary::default()
        };
        let back: Canary = serde_json::from_str(&serde_json::to_string(&canary).unwrap()).unwrap();
        assert_eq!(back, canary);
        let rolling = Rolling {
            stabilisation: Some(Duration::from_millis(1500)),
            ..Rolling::default()
        };
        let back: Rolling = serde_json::from_str(&serde_json::to_string(&rolling).unwrap()).unwrap();
        assert_eq!(back, rolling);
        let back: Recreate =
            serde_json::from_str(&serde_json::to_string(&Recreate::default()).unwrap()).unwrap();
        assert_eq!(back, Recreate::default());
        let bg = BlueGreen {
            keep_old: KeepOld::UntilNextDeployment,
            ..BlueGreen::default()
        };
        let back: BlueGreen = serde_json::from_str(&serde_json::to_string(&bg).unwrap()).unwrap();
        assert_eq!(back, bg);
    }

    /// The key `config_key` gives for the field `validate` named, checked to
    /// be a key of the serde form.
    fn assert_is_key<T: Serialize>(form: &T, e: crate::Error) {
        let crate::Error::InvalidInput { field, .. } = e else {
            panic!("not an input error: {e}")
        };
        let key = config_key(&field);
        let key = key.split('[').next().unwrap();
        let json = serde_json::to_value(form).unwrap();
        assert!(json.get(key).is_some(), "{field} -> {key} is not a key of {json}");
    }

    #[test]
    fn every_field_validation_names_is_a_key_of_the_section() {
        let manual = Canary {
            promotion: Promotion::Manual {
                timeout: Some(Duration::ZERO),
            },
            ..Canary::default()
        };
        let canaries: Vec<fn(&mut Canary)> = vec![
            |c| c.stages.clear(),
            |c| c.stages = vec![0],
            |c| c.stages = vec![5, 5],
            |c| c.stage_duration = Duration::ZERO,
            |c| c.check_interval = Duration::ZERO,
            |c| c.canary_group = c.stable_group.clone(),
            |c| c.finalize_batch = 0,
            |c| c.health.retries = 0,
            |c| {
                c.promotion = Promotion::Manual {
                    timeout: Some(Duration::ZERO),
                }
            },
            |c| c.analysis.error_threshold = 2.0,
            |c| c.analysis.ratio_floor = 2.0,
            |c| c.analysis.latency_threshold = Duration::ZERO,
            |c| c.analysis.max_error_ratio = 0.5,
            |c| c.analysis.ratio_significance = -1.0,
            |c| c.analysis.inconclusive_limit = 0,
            |c| c.analysis.window = Duration::ZERO,
        ];
        for bad in canaries {
            let mut c = Canary::default();
            bad(&mut c);
            assert_is_key(&manual, c.validate().unwrap_err());
        }
        let rollings: Vec<fn(&mut Rolling)> = vec![|r| r.batch_size = CountOrPercent::Count(0), |r| {
            r.health.retries = 0
        }];
        for bad in rollings {
            let mut r = Rolling::default();
            bad(&mut r);
            assert_is_key(&Rolling::default(), r.validate().unwrap_err());
        }
        let mut r = Recreate::default();
        r.health.retries = 0;
        assert_is_key(&Recreate::default(), r.validate().unwrap_err());
        let greens: Vec<fn(&mut BlueGreen)> = vec![
            |b| b.environments[1] = b.environments[0].clone(),
            |b| b.healthy_deadline = Duration::ZERO,
            |b| b.health_interval = Duration::ZERO,
            |b| b.warmup_path = "x".into(),
        ];
        for bad in greens {
            let mut b = BlueGreen::default();
            bad(&mut b);
            assert_is_key(&BlueGreen::default(), b.validate().unwrap_err());
        }
    }

    #[test]
    fn unknown_keys_and_bad_stages_are_refused() {
        let e = serde_json::from_str::<Rolling>(r#"{"batchsize":2}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `batchsize`"), "{e}");
        let e = serde_json::from_str::<Canary>(r#"{"stages":[5,300]}"#).unwrap_err();
        assert!(e.to_string().contains("300 is outside 1-100"), "{e}");
        let e = serde_json::from_str::<BlueGreen>(r#"{"keep_old":"forever"}"#).unwrap_err();
        assert!(e.to_string().contains("\"forever\" is neither a duration"), "{e}");
    }
}
