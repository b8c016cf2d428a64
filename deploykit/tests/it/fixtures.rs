//! Journals written by the 0.1 CLI (`tests/fixtures/journal-v1`, see its
//! README) are still read, and recovered from, both ways.

use std::path::{Path, PathBuf};

use deploykit::state::RunKind;
use deploykit::{Error, Group, GroupWeight, LoadBalancer as _, StepKind, StrategyKind};
use deploykit_testkit::FakeLiveStore;
use serde_json::Value;

use crate::crash::{block_on, g, v, How, World};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/journal-v1")
        .join(name)
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

/// A world in the state the fixture `name` recorded: its journals in the
/// state directory, the fakes running, stopped and routed as the simulated
/// instances and load balancer were.
async fn world(name: &str, kind: StrategyKind, n: usize) -> World {
    let src = dir(name);
    let mut w = World::new(kind, n, 1);
    for entry in std::fs::read_dir(src.join("journal")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, w.state.journal_dir().join(path.file_name().unwrap())).unwrap();
    }
    let lb = w.fleet.load_balancer();
    let out: Vec<String> =
        serde_json::from_value(json(&src.join("simulated/lb.json"))["out_of_rotation"].clone()).unwrap();
    for inst in w.fleet.instances() {
        let id = inst.backend().id.clone();
        let sim = json(&src.join(format!("simulated/{id}.json")));
        for installed in sim["installed"].as_array().unwrap() {
            w.fleet = w
                .fleet
                .clone()
                .on_release(id.as_str(), installed.as_str().unwrap());
        }
        w.fleet = w
            .fleet
            .clone()
            .on_release(id.as_str(), sim["release"].as_str().unwrap());
        if out.iter().any(|o| o == id.as_str()) {
            lb.disable(inst.backend()).await.unwrap();
        }
        if sim["running"] == false {
            inst.stop().await.unwrap();
        }
    }
    let lb_state = json(&src.join("simulated/lb.json"));
    if let Some(live) = lb_state["live"].as_str() {
        lb.switch_to(&g(live)).await.unwrap();
    }
    let weights: Vec<GroupWeight> = lb_state["weights"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(group, p)| GroupWeight {
            group: Group::new(group).unwrap(),
            percent: p.as_u64().unwrap() as u8,
        })
        .collect();
    if !weights.is_empty() {
        lb.set_weights(&weights).await.unwrap();
    }
    if src.join("live.json").exists() {
        let rec = json(&src.join("live.json"));
        let live = rec["live"].as_str().unwrap();
        w.store = match rec["switching_to"].as_str() {
            Some(to) => FakeLiveStore::recording_switch(live, to),
            None => FakeLiveStore::recording(live),
        };
    }
    w
}

/// Reads the fixture, checks what its journals say, then recovers it `how`.
fn recover(name: &str, kind: StrategyKind, n: usize, how: How) {
    block_on(async {
        let w = world(name, kind, n).await;
        let latest = w.state.latest().unwrap().expect("a journal");
        assert_eq!(latest.header.version, 1);
        assert!(!latest.is_finished(), "{name}: interrupted");
        let chain = w
            .state
            .chain(
                latest
                    .header
                    .acts_on
                    .as_deref()
                    .unwrap_or(&latest.header.deployment),
            )
            .unwrap();
        assert_eq!(chain[0].header.strategy, kind, "{name}");
        assert_eq!(chain[0].header.release, v("v3"), "{name}");
        assert!(!latest.events.is_empty(), "{name}: events are read");
        let expect = match how {
            How::Resume => "v3",
            How::Rollback => "v2",
        };
        if how == How::Resume && latest.header.kind == RunKind::Rollback {
            // An interrupted rollback is finished by rolling back again.
            let recorded = deploykit::recovery::Recorded::load(&w.state, &latest).unwrap();
            let snap = w.exec(None).snapshot().await.unwrap();
            let e = deploykit::recovery::resume(&recorded, &snap, &Default::default(), None).unwrap_err();
            assert!(matches!(e, Error::Refused(_)), "{name}: {e}");
            return;
        }
        let (report, _) = w.recover(how).await;
        if let Some(r) = &report {
            assert!(r.is_success(), "{name} {how:?}:\n{r}");
        }
        w.assert_settled(expect, Some(&g("blue")), how, &format!("{name} {how:?}"));
    })
}

#[test]
fn journals_of_the_first_release_name_their_steps_as_typed_kinds() {
    block_on(async {
        let w = world("rolling-interrupted", StrategyKind::Rolling, 3).await;
        let latest = w.state.latest().unwrap().unwrap();
        assert_eq!(latest.header.strategy, StrategyKind::Rolling);
        assert_eq!(
            latest.header.plan.as_ref().unwrap().strategy,
            StrategyKind::Rolling
        );
        // Killed with i-1 finished and i-2 installed but not started.
        assert!(latest.step_done(StepKind::Enable));
        assert_eq!(
            latest
                .unsettled()
                .into_iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>(),
            ["i-2"]
        );
    })
}

#[test]
fn rolling_journal_of_the_first_release_is_recovered() {
    recover("rolling-interrupted", StrategyKind::Rolling, 3, How::Resume);
    recover("rolling-interrupted", StrategyKind::Rolling, 3, How::Rollback);
}

#[test]
fn interrupted_rollback_journal_of_the_first_release_is_recovered() {
    recover(
        "rolling-rollback-interrupted",
        StrategyKind::Rolling,
        3,
        How::Resume,
    );
    recover(
        "rolling-rollback-interrupted",
        StrategyKind::Rolling,
        3,
        How::Rollback,
    );
}

#[test]
fn recreate_journal_of_the_first_release_is_recovered() {
    recover("recreate-interrupted", StrategyKind::Recreate, 3, How::Resume);
    recover("recreate-interrupted", StrategyKind::Recreate, 3, How::Rollback);
}

#[test]
fn blue_green_journals_of_the_first_release_are_recovered() {
    for name in ["blue-green-before-switch", "blue-green-after-switch"] {
        recover(name, StrategyKind::BlueGreen, 2, How::Resume);
        recover(name, StrategyKind::BlueGreen, 2, How::Rollback);
    }
}

#[test]
fn canary_journals_of_the_first_release_are_recovered() {
    for name in ["canary-analysing", "canary-finalizing"] {
        recover(name, StrategyKind::Canary, 2, How::Resume);
        recover(name, StrategyKind::Canary, 2, How::Rollback);
    }
}

#[test]
fn every_record_of_the_first_release_is_written_back_unchanged() {
    // The typed strategy and step kinds serialize to the words the first
    // release wrote: reading a record and writing it again changes nothing.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal-v1");
    let mut lines = 0;
    let mut renamed = 0;
    for fixture in std::fs::read_dir(&base).unwrap() {
        let journals = fixture.unwrap().path().join("journal");
        if !journals.is_dir() {
            continue;
        }
        for journal in std::fs::read_dir(journals).unwrap() {
            let path = journal.unwrap().path();
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let record: deploykit::state::JournalRecord =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{}: {e}\n{line}", path.display()));
                let written = serde_json::to_value(&record).unwrap();
                let mut original: Value = serde_json::from_str(line).unwrap();
                // The one form that changed: the first release's blue-green
                // policy is now the abort-all policy with idle undo.
                if let Some(plan) = original
                    .get_mut("plan")
                    .filter(|p| p["policy"]["policy"] == "blue_green")
                {
                    plan["policy"] = serde_json::json!({"policy": "abort_all"});
                    plan["instance_undo"] = "idle".into();
                    renamed += 1;
                }
                assert_eq!(written, original, "{}", path.display());
                lines += 1;
            }
        }
    }
    assert!(lines >= 250, "only {lines} records read");
    assert!(renamed >= 2, "the blue-green fixtures hold the old policy");
}
