//! A canary carrying a feature flag: the flag's share follows the stages,
//! and every rollback kills it. Virtual time, fakes, a real flag file.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use deploykit::flags::{FlagChangeKind, FlagError, FlagStore, FlagSwitch};
use deploykit::{Canary, Error, EventLog, Executor, Metric, Observation, OutcomeKind, ReleaseId};
use deploykit_testkit::{FakeFleet, FakeMetrics};

const FLAGS: &str = r#"{
  "flags": {
    "new-checkout": {
      "state": "ENABLED",
      "variants": { "on": true, "off": false },
      "defaultVariant": "off"
    }
  }
}
"#;

fn healthy() -> FakeMetrics {
    FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, 0.001)
        .set("canary", Metric::LatencyP99, 0.12)
}

fn flagged() -> Canary {
    Canary {
        stages: vec![10, 50, 100],
        stage_duration: Duration::from_secs(60),
        check_interval: Duration::from_secs(30),
        flag: Some("new-checkout".into()),
        ..Canary::default()
    }
}

fn executor(fleet: &FakeFleet, metrics: FakeMetrics, flags: Arc<dyn FlagSwitch>) -> Executor {
    Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(EventLog::new()))
        .metrics(Arc::new(metrics))
        .flag_switch(flags)
        .build()
        .unwrap()
}

fn fleet() -> FakeFleet {
    FakeFleet::with_groups(&[("stable", 2), ("canary", 1)])
}

fn v2() -> ReleaseId {
    ReleaseId::new("v2").unwrap()
}

fn store(dir: &tempfile::TempDir) -> FlagStore {
    let file = dir.path().join("flags.json");
    std::fs::write(&file, FLAGS).unwrap();
    FlagStore::new(file, dir.path().join("flags.jsonl"))
}

/// The changes the store journaled, as `split N` / `kill`.
fn journaled(store: &FlagStore) -> Vec<String> {
    store
        .history()
        .unwrap()
        .into_iter()
        .map(|r| match r.kind {
            FlagChangeKind::Split { variant, percent } => format!("split {variant} {percent}"),
            other => other.name().to_owned(),
        })
        .collect()
}

/// Share of 10,000 targeting keys served `on` by the flag file as it is.
fn on_share(store: &FlagStore) -> f64 {
    let set = store.load().unwrap();
    let on = (0..10_000)
        .filter(|k| {
            let mut ctx = deploykit::flags::Context::new();
            ctx.insert("targetingKey".into(), format!("user-{k}").into());
            set.evaluate("new-checkout", &ctx).value == Some(serde_json::Value::Bool(true))
        })
        .count();
    on as f64 / 10_000.0
}

#[tokio::test(start_paused = true)]
async fn the_flag_share_follows_the_stages_and_stays_on_after_success() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let fleet = fleet();
    let exec = executor(&fleet, healthy(), Arc::new(store.clone()));
    let report = exec.deploy(&flagged(), &v2()).await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{report}");
    assert_eq!(journaled(&store), ["split on 10", "split on 50", "split on 100"]);
    let who = store.history().unwrap()[0].who.clone();
    assert!(who.starts_with("deploy "), "{who}");
    assert_eq!(on_share(&store), 1.0);
}

#[tokio::test(start_paused = true)]
async fn a_breach_kills_the_flag_after_its_share_was_raised() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    let fleet = fleet();
    // Bad once stage 2 (50 %) is under way; stage 1's last check is at 60 s.
    let metrics = healthy().script("canary", Metric::ErrorRate, |t| {
        Observation::Value(if t <= Duration::from_secs(60) { 0.001 } else { 0.05 })
    });
    let exec = executor(&fleet, metrics, Arc::new(store.clone()));
    let report = exec.deploy(&flagged(), &v2()).await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    assert_eq!(journaled(&store), ["split on 10", "split on 50", "kill"]);
    let kill = store.history().unwrap().pop().unwrap();
    assert_eq!(
        kill.why.as_deref(),
        Some("the deployment carrying it rolled back")
    );
    assert_eq!(on_share(&store), 0.0, "everyone gets the safe variant");
}

/// A switch whose shares fail from the `fail_from`-th on, recording calls.
#[derive(Debug, Default)]
struct Flaky {
    fail_from: usize,
    kill_fails: bool,
    calls: Mutex<Vec<String>>,
}

#[async_trait]
impl FlagSwitch for Flaky {
    fn check(&self, _: &str, _: &str) -> Result<(), FlagError> {
        Ok(())
    }

    async fn share(&self, flag: &str, _: &str, percent: u8, _: &str) -> Result<(), FlagError> {
        let mut calls = self.calls.lock().unwrap();
        calls.push(format!("share {percent}"));
        if calls.len() >= self.fail_from {
            return Err(FlagError::NoSafeVariant { key: flag.into() });
        }
        Ok(())
    }

    async fn kill(&self, flag: &str, _: &str, _: &str) -> Result<(), FlagError> {
        self.calls.lock().unwrap().push("kill".into());
        if self.kill_fails {
            return Err(FlagError::UnknownFlag { key: flag.into() });
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_flag_change_fails_the_stage_and_rolls_back() {
    let fleet = fleet();
    let flaky = Arc::new(Flaky {
        fail_from: 2,
        ..Flaky::default()
    });
    let exec = executor(&fleet, healthy(), flaky.clone());
    let report = exec.deploy(&flagged(), &v2()).await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    let reason = report.reason.clone().unwrap();
    assert!(
        reason.contains("changing the feature flag new-checkout failed"),
        "{reason}"
    );
    assert_eq!(*flaky.calls.lock().unwrap(), ["share 10", "share 50", "kill"]);
    // The stage that failed never judged its traffic: the canary is back on v1.
    assert_eq!(fleet.release_of("i-3"), Some(ReleaseId::new("v1").unwrap()));
}

#[tokio::test(start_paused = true)]
async fn a_kill_that_fails_fails_the_rollback() {
    let fleet = fleet();
    let flaky = Arc::new(Flaky {
        fail_from: 1,
        kill_fails: true,
        ..Flaky::default()
    });
    let exec = executor(&fleet, healthy(), flaky.clone());
    let report = exec.deploy(&flagged(), &v2()).await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::RollbackFailed, "{report}");
    assert_eq!(*flaky.calls.lock().unwrap(), ["share 10", "kill"]);
}

#[tokio::test(start_paused = true)]
async fn an_unknown_flag_or_variant_is_refused_before_anything_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    for (canary, says) in [
        (
            Canary {
                flag: Some("nope".into()),
                ..flagged()
            },
            "no flag `nope`",
        ),
        (
            Canary {
                flag_variant: "blue".into(),
                ..flagged()
            },
            "`blue` is not one of its variants (off, on)",
        ),
        (
            Canary {
                flag_variant: "off".into(),
                ..flagged()
            },
            "`off` is its safe variant",
        ),
    ] {
        let fleet = fleet();
        let exec = executor(&fleet, healthy(), Arc::new(store.clone()));
        let err = exec.deploy(&canary, &v2()).await.unwrap_err();
        match &err {
            Error::InvalidInput { field, message } => {
                assert_eq!(field, "flag");
                assert!(message.contains(says), "{message}");
            }
            other => panic!("{other}"),
        }
        assert!(fleet.routing_history().is_empty(), "nothing switched");
        assert_eq!(fleet.release_of("i-3"), Some(ReleaseId::new("v1").unwrap()));
    }
    assert!(journaled(&store).is_empty());
    assert_eq!(std::fs::read_to_string(store.file()).unwrap(), FLAGS);
}

#[tokio::test(start_paused = true)]
async fn a_flagged_canary_needs_a_flag_switch() {
    let fleet = fleet();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(healthy()))
        .build()
        .unwrap();
    let err = exec.deploy(&flagged(), &v2()).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if field == "flag_switch"),
        "{err}"
    );
}

#[test]
fn a_canary_without_a_flag_serialises_as_before() {
    let plain = serde_json::to_value(Canary::default()).unwrap();
    assert!(plain.get("flag").is_none() && plain.get("flag_variant").is_none());
    let with: Canary = serde_json::from_str(r#"{"flag": "new-checkout", "flag_variant": "v2"}"#).unwrap();
    assert_eq!(with.flag.as_deref(), Some("new-checkout"));
    assert_eq!(with.flag_variant, "v2");
    let back: Canary = serde_json::from_value(serde_json::to_value(&with).unwrap()).unwrap();
    assert_eq!(back, with);
}
