//! Typed names of strategies and steps, as they appear in plans, events and
//! journals.
//!
//! Both serialize to the same words the journal has always held
//! (`"blue-green"`, `"await_healthy"`, …), so journals written before these
//! types existed are read unchanged; code matches on variants, never on
//! strings.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What produced a plan: one of the four strategies, or a plan worked out
/// to recover from what a journal says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StrategyKind {
    /// Batches, drained and replaced in turn ([`Rolling`](crate::Rolling)).
    #[serde(rename = "rolling")]
    Rolling,
    /// Everything stopped, replaced and started at once
    /// ([`Recreate`](crate::Recreate)).
    #[serde(rename = "recreate")]
    Recreate,
    /// Prepare the idle environment, then switch traffic
    /// ([`BlueGreen`](crate::BlueGreen)).
    #[serde(rename = "blue-green")]
    BlueGreen,
    /// A canary track taking a growing share of traffic
    /// ([`Canary`](crate::Canary)).
    #[serde(rename = "canary")]
    Canary,
    /// A canary whose share rises along a curve, step by step
    /// ([`Ramped`](crate::Ramped)).
    #[serde(rename = "ramped")]
    Ramped,
    /// The new release takes mirrored copies of requests only, judged by
    /// its own metrics ([`Shadow`](crate::Shadow)).
    #[serde(rename = "shadow")]
    Shadow,
    /// The new release is reachable only through routing rules until
    /// promoted ([`DarkLaunch`](crate::DarkLaunch)).
    #[serde(rename = "dark-launch")]
    DarkLaunch,
    /// Two variants side by side, sticky per user, decided by a business
    /// metric ([`Experiment`](crate::Experiment)).
    #[serde(rename = "experiment")]
    Experiment,
    /// Returns instances to the releases a journal recorded
    /// ([`recovery`](crate::recovery)).
    #[serde(rename = "rollback")]
    Rollback,
    /// Makes the previous blue-green environment live again
    /// ([`BlueGreen::rollback`](crate::BlueGreen::rollback)).
    #[serde(rename = "blue-green-rollback")]
    BlueGreenRollback,
    /// Stops the blue-green environment no longer live.
    #[serde(rename = "blue-green-retire")]
    BlueGreenRetire,
}

impl StrategyKind {
    /// The word used in plans, events, journals and the CLI (`rolling`,
    /// `blue-green`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            StrategyKind::Rolling => "rolling",
            StrategyKind::Recreate => "recreate",
            StrategyKind::BlueGreen => "blue-green",
            StrategyKind::Canary => "canary",
            StrategyKind::Ramped => "ramped",
            StrategyKind::Shadow => "shadow",
            StrategyKind::DarkLaunch => "dark-launch",
            StrategyKind::Experiment => "experiment",
            StrategyKind::Rollback => "rollback",
            StrategyKind::BlueGreenRollback => "blue-green-rollback",
            StrategyKind::BlueGreenRetire => "blue-green-retire",
        }
    }
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The kind of a [`Step`](crate::Step), without its parameters: what events
/// and journals name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
#[allow(missing_docs)] // Each names the `Step` variant of the same name.
pub enum StepKind {
    Drain,
    AwaitDrained,
    Disable,
    Stop,
    Install,
    Restore,
    Start,
    AwaitHealthy,
    Enable,
    Pause,
    SetWeights,
    SwitchTo,
    Analyze,
    AwaitPromotion,
    BackupRelease,
    AwaitHealthyWithin,
    SmokeTest,
    WarmUp,
    RecordSwitching,
    RecordLive,
    Gate,
    FlagShare,
    FlagKill,
    ApplyPolicy,
    Experiment,
}

impl StepKind {
    /// The word used in events and journals (`drain`, `await_healthy`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Drain => "drain",
            StepKind::AwaitDrained => "await_drained",
            StepKind::Disable => "disable",
            StepKind::Stop => "stop",
            StepKind::Install => "install",
            StepKind::Restore => "restore",
            StepKind::Start => "start",
            StepKind::AwaitHealthy => "await_healthy",
            StepKind::Enable => "enable",
            StepKind::Pause => "pause",
            StepKind::SetWeights => "set_weights",
            StepKind::SwitchTo => "switch_to",
            StepKind::Analyze => "analyze",
            StepKind::AwaitPromotion => "await_promotion",
            StepKind::BackupRelease => "backup_release",
            StepKind::AwaitHealthyWithin => "await_healthy_within",
            StepKind::SmokeTest => "smoke_test",
            StepKind::WarmUp => "warm_up",
            StepKind::RecordSwitching => "record_switching",
            StepKind::RecordLive => "record_live",
            StepKind::Gate => "gate",
            StepKind::FlagShare => "flag_share",
            StepKind::FlagKill => "flag_kill",
            StepKind::ApplyPolicy => "apply_policy",
            StepKind::Experiment => "experiment",
        }
    }
}

impl fmt::Display for StepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl From<StepKind> for String {
    fn from(k: StepKind) -> Self {
        k.as_str().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialized_names_are_the_display_names() {
        for k in [
            StrategyKind::Rolling,
            StrategyKind::Recreate,
            StrategyKind::BlueGreen,
            StrategyKind::Canary,
            StrategyKind::Rollback,
            StrategyKind::BlueGreenRollback,
            StrategyKind::BlueGreenRetire,
        ] {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{k}\""));
            assert_eq!(serde_json::from_str::<StrategyKind>(&json).unwrap(), k);
        }
        for k in [
            StepKind::Drain,
            StepKind::AwaitDrained,
            StepKind::Disable,
            StepKind::Stop,
            StepKind::Install,
            StepKind::Restore,
            StepKind::Start,
            StepKind::AwaitHealthy,
            StepKind::Enable,
            StepKind::Pause,
            StepKind::SetWeights,
            StepKind::SwitchTo,
            StepKind::Analyze,
            StepKind::AwaitPromotion,
            StepKind::BackupRelease,
            StepKind::AwaitHealthyWithin,
            StepKind::SmokeTest,
            StepKind::WarmUp,
            StepKind::RecordSwitching,
            StepKind::RecordLive,
            StepKind::Gate,
            StepKind::FlagShare,
            StepKind::FlagKill,
        ] {
            let json = serde_json::to_string(&k).unwrap();
            assert_eq!(json, format!("\"{k}\""));
            assert_eq!(serde_json::from_str::<StepKind>(&json).unwrap(), k);
        }
    }

    #[test]
    fn an_unknown_strategy_name_is_refused() {
        assert!(serde_json::from_str::<StrategyKind>("\"blue_green\"").is_err());
    }
}
