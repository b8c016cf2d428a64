//! How a deployment moves a feature flag: a canary carrying a flag sets the
//! flag's share after each traffic stage ([`Step::FlagShare`](crate::Step))
//! and kills it on any rollback ([`Step::FlagKill`](crate::Step)), so the
//! code path behind the flag is exposed exactly as much as the release.

use std::fmt::Debug;

use async_trait::async_trait;

use super::{FlagChange, FlagChangeKind, FlagError, FlagStore};

/// What the executor changes feature flags through.
///
/// [`FlagStore`] implements it (validated, atomic, journaled writes); the
/// CLI wraps the store to notify as well.
#[async_trait]
pub trait FlagSwitch: Send + Sync + Debug {
    /// Whether `variant` of `flag` can be rolled out: the flag exists, has
    /// the variant and a safe variant to fall back to. The executor asks
    /// before a run, so a wrong name refuses the deployment with nothing
    /// touched.
    ///
    /// Idempotent; reads only. On failure nothing changed.
    fn check(&self, flag: &str, variant: &str) -> Result<(), FlagError>;

    /// Serves `variant` of `flag` to `percent` % of its targeting keys and
    /// the flag's safe variant to the rest; `deployment` names who asks.
    ///
    /// - **Idempotent:** setting the same share twice changes nothing the
    ///   second time (and journals nothing).
    /// - **Cancel-safe:** the write is one atomic file replacement; a
    ///   dropped call leaves the old split or the new one.
    /// - **On failure:** the flag is as it was; the executor fails the step
    ///   and rolls back, which kills the flag.
    async fn share(&self, flag: &str, variant: &str, percent: u8, deployment: &str) -> Result<(), FlagError>;

    /// The kill switch: everyone gets the safe variant of `flag`; `why` is
    /// journaled.
    ///
    /// - **Idempotent:** killing a killed flag changes nothing.
    /// - **Cancel-safe:** as [`share`](Self::share).
    /// - **On failure:** the flag is as it was; the executor reports the
    ///   rollback as failed, since the new code path may still be served.
    async fn kill(&self, flag: &str, deployment: &str, why: &str) -> Result<(), FlagError>;
}

#[async_trait]
impl FlagSwitch for FlagStore {
    fn check(&self, flag: &str, variant: &str) -> Result<(), FlagError> {
        let set = self.load()?;
        set.validate()?;
        let f = set
            .get(flag)
            .ok_or_else(|| FlagError::UnknownFlag { key: flag.to_owned() })?;
        if !f.variants().contains_key(variant) {
            let known: Vec<&str> = f.variants().keys().map(String::as_str).collect();
            return Err(FlagError::BadChange {
                key: flag.to_owned(),
                message: format!(
                    "`{variant}` is not one of its variants ({}); set [strategy.canary] flag_variant to one of them",
                    known.join(", ")
                ),
            });
        }
        match f.safe_variant() {
            None => Err(FlagError::NoSafeVariant { key: flag.to_owned() }),
            Some(safe) if safe == variant => Err(FlagError::BadChange {
                key: flag.to_owned(),
                message: format!(
                    "`{variant}` is its safe variant, what a rollback switches to; roll out another one, or set `metadata.{}`",
                    super::SAFE_VARIANT_KEY
                ),
            }),
            Some(_) => Ok(()),
        }
    }

    async fn share(&self, flag: &str, variant: &str, percent: u8, deployment: &str) -> Result<(), FlagError> {
        let change = FlagChange {
            flag: flag.to_owned(),
            kind: FlagChangeKind::Split {
                variant: variant.to_owned(),
                percent,
            },
            who: format!("deploy {deployment}"),
            why: Some(format!("canary stage at {percent}%")),
        };
        self.apply_blocking(change).await
    }

    async fn kill(&self, flag: &str, deployment: &str, why: &str) -> Result<(), FlagError> {
        let change = FlagChange {
            flag: flag.to_owned(),
            kind: FlagChangeKind::Kill,
            who: format!("deploy {deployment}"),
            why: Some(why.to_owned()),
        };
        self.apply_blocking(change).await
    }
}

impl FlagStore {
    /// [`apply`](Self::apply) off the async threads (it blocks on file I/O
    /// and the lock).
    async fn apply_blocking(&self, change: FlagChange) -> Result<(), FlagError> {
        let store = self.clone();
        match tokio::task::spawn_blocking(move || store.apply(&change)).await {
            Ok(r) => r.map(|_| ()),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
