use std::collections::BTreeMap;
use std::path::PathBuf;

use super::*;
use crate::analysis::{AnalysisMetric, CheckOutcome, Measurement};
use crate::report::OutcomeKind;
use crate::state::{JournalOutcome, JournalSummary};

const DAY: u64 = 86_400_000;

fn i(name: &str) -> InstanceId {
    InstanceId::new(name).unwrap()
}

fn rel(name: &str) -> ReleaseId {
    ReleaseId::new(name).unwrap()
}

/// A run moving web-1 and web-2 to `release`; before it they ran the
/// release before it (v1 before v2, v2 before v3).
fn header(id: &str, kind: RunKind, strategy: StrategyKind, release: &str, at: u64) -> JournalHeader {
    let before = match release {
        "v3" => "v2",
        _ => "v1",
    };
    let previous: BTreeMap<_, _> = [(i("web-1"), Some(rel(before))), (i("web-2"), Some(rel(before)))].into();
    let mut h = JournalHeader::new(id, "shop", kind, strategy, rel(release), previous);
    h.started_at_ms = at;
    h
}

fn ev(elapsed_ms: u64, kind: EventKind) -> Event {
    Event {
        elapsed_ms,
        deployment: "d".into(),
        kind,
    }
}

fn enabled(at: u64, instance: &str) -> [Event; 2] {
    [
        ev(
            at,
            EventKind::StepStarted {
                stage: 0,
                step: StepKind::Enable,
                instance: Some(i(instance)),
                rollback: false,
            },
        ),
        ev(
            at + 10,
            EventKind::StepFinished {
                stage: 0,
                step: StepKind::Enable,
                instance: Some(i(instance)),
                rollback: false,
                duration_ms: 10,
                attempts: 1,
                result: StepResult::Ok,
            },
        ),
    ]
}

fn journal(header: JournalHeader, events: Vec<Event>, outcome: Option<(OutcomeKind, u64)>) -> JournalSummary {
    JournalSummary {
        path: PathBuf::from(format!("/j/{}.jsonl", header.deployment)),
        header,
        events,
        finished: outcome.map(|(outcome, duration_ms)| JournalOutcome {
            outcome,
            reason: (outcome != OutcomeKind::Succeeded).then(|| "canary error rate 5% above 1%".into()),
            duration_ms,
        }),
    }
}

fn succeeded(id: &str, at: u64) -> DeploymentRecord {
    let mut events = enabled(100, "web-1").to_vec();
    events.extend(enabled(200, "web-2"));
    DeploymentRecord::from_journal(
        &journal(
            header(id, RunKind::Deploy, StrategyKind::Rolling, "v2", at),
            events,
            Some((OutcomeKind::Succeeded, 60_000)),
        ),
        None,
    )
}

/// A canary that failed its second check at 120 s and rolled back by 150 s.
fn rolled_back_canary(id: &str, at: u64) -> DeploymentRecord {
    let check = |elapsed, result, value: f64| {
        ev(
            elapsed,
            EventKind::AnalysisResult {
                stage: 1,
                weight: 10,
                result,
                consecutive_inconclusive: 0,
                evidence: Vec::new(),
                measurements: vec![Measurement {
                    metric: AnalysisMetric::ErrorRate,
                    value,
                    threshold: 0.01,
                }],
                group: None,
            },
        )
    };
    let events = vec![
        ev(
            0,
            EventKind::StageStarted {
                stage: 0,
                of: 2,
                name: "canary 10%".into(),
                instances: vec![i("web-1")],
                rollback: false,
            },
        ),
        enabled(10, "web-1")[0].clone(),
        enabled(10, "web-1")[1].clone(),
        check(60_000, CheckOutcome::Pass, 0.002),
        check(
            120_000,
            CheckOutcome::Fail {
                metric: AnalysisMetric::ErrorRate,
                value: 0.05,
                threshold: 0.01,
                stage: 1,
            },
            0.05,
        ),
        ev(
            120_001,
            EventKind::RollbackStarted {
                reason: "canary error rate 5% above 1%".into(),
                instances: vec![i("web-1")],
            },
        ),
        ev(
            150_000,
            EventKind::InstanceRestored {
                instance: i("web-1"),
                release: Some(rel("v1")),
            },
        ),
    ];
    DeploymentRecord::from_journal(
        &journal(
            header(id, RunKind::Deploy, StrategyKind::Canary, "v3", at),
            events,
            Some((OutcomeKind::RolledBack, 150_000)),
        ),
        None,
    )
}

#[test]
fn a_record_holds_the_checks_stages_instances_and_rollback_reason() {
    let r = rolled_back_canary("c1", 5 * DAY);
    assert_eq!(r.outcome, HistoryOutcome::RolledBack);
    assert_eq!(r.checks.len(), 2);
    assert_eq!(r.checks[0].measurements[0].value, 0.002);
    assert_eq!(
        r.rollback_reason.as_deref(),
        Some("canary error rate 5% above 1%")
    );
    assert_eq!(
        r.failed_at_elapsed_ms,
        Some(120_000),
        "the failed check, not the rollback"
    );
    assert_eq!(r.stages.len(), 1);
    assert_eq!(r.stages[0].name, "canary 10%");
    let fates: Vec<_> = r
        .instances
        .iter()
        .map(|i| (i.instance.to_string(), i.fate))
        .collect();
    assert_eq!(
        fates,
        [
            ("web-1".to_string(), InstanceFate::Restored),
            ("web-2".to_string(), InstanceFate::Untouched)
        ]
    );
    assert_eq!(r.canary_weight, Some(0), "a rolled-back canary has no traffic");
    let last = r.last_measurements();
    assert_eq!(last.len(), 1);
    assert_eq!(last[0].value, 0.05, "the last check's value");
}

#[test]
fn an_unfinished_run_is_in_progress_only_while_its_process_holds_the_lock() {
    let j = journal(
        header("r", RunKind::Deploy, StrategyKind::Rolling, "v2", 0),
        enabled(100, "web-1").to_vec(),
        None,
    );
    let dead = DeploymentRecord::from_journal(&j, None);
    assert_eq!(dead.outcome, HistoryOutcome::Interrupted);
    assert_eq!(dead.failed_at_elapsed_ms, Some(110));
    assert_eq!(dead.finished_at_ms(), Some(110));
    let holder = Holder {
        pid: j.header.pid,
        pid_start: None,
        host: j.header.host.clone(),
        started_at_ms: 0,
        purpose: "deploy".into(),
    };
    let live = DeploymentRecord::from_journal(&j, Some(&holder));
    assert_eq!(live.outcome, HistoryOutcome::InProgress);
    assert_eq!(live.finished_at_ms(), None);
    assert_eq!(live.failed_at_elapsed_ms, None);
}

#[test]
fn dora_counts_frequency_failure_rate_lead_and_recovery_time() {
    let mut records = Vec::new();
    for n in 0..8 {
        records.push(succeeded(&format!("s{n}"), DAY + n * DAY / 2));
    }
    records.push(rolled_back_canary("c1", 2 * DAY));
    records.push(rolled_back_canary("c2", 3 * DAY));
    // Sorted as load() sorts them: by start here.
    records.sort_by_key(|r| r.started_at_ms);
    // The newest success carries a commit made 10 minutes before it went live.
    let last = records.iter_mut().rev().find(|r| r.id.starts_with('s')).unwrap();
    let live_at_s = i64::try_from(last.finished_at_ms().unwrap() / 1000).unwrap();
    last.commit = Some(SourceCommit::new("abcdef1", Some(live_at_s - 600)).unwrap());

    let d = dora(&records, 0, 5 * DAY);
    assert_eq!(d.deployments, 10);
    assert_eq!(d.live, 8);
    assert_eq!(d.failed, 2);
    assert!(
        (d.deployments_per_day - 1.6).abs() < 1e-9,
        "{}",
        d.deployments_per_day
    );
    assert_eq!(d.change_failure_rate, Some(0.2));
    assert_eq!(
        d.recovery_time.unwrap().median_ms,
        30_000,
        "from the failed check to the end of the rollback"
    );
    assert_eq!(d.unrecovered, 0);
    let lead = d.lead_time.unwrap();
    assert_eq!((lead.count, lead.median_ms), (1, 600_000));

    // The window leaves out what started before it.
    let later = dora(&records, 3 * DAY, 5 * DAY);
    assert_eq!(later.deployments, 5, "c2 and the successes from day 3 on");
    assert_eq!(later.failed, 1);
}

#[test]
fn a_drill_is_left_out_of_the_dora_figures_and_is_no_recovery() {
    let mut drill_header = header("d1", RunKind::Deploy, StrategyKind::Canary, "v2", 2 * DAY);
    drill_header.drill = true;
    let drilled = DeploymentRecord::from_journal(
        &journal(drill_header, Vec::new(), Some((OutcomeKind::RolledBack, 60_000))),
        None,
    );
    assert!(drilled.drill);
    let mut passing_drill = succeeded("d2", 3 * DAY + 1);
    passing_drill.drill = true;
    let records = vec![
        succeeded("s1", DAY),
        drilled,
        rolled_back_canary("c1", 3 * DAY),
        passing_drill,
    ];
    let d = dora(&records, 0, 5 * DAY);
    assert_eq!(
        (d.deployments, d.failed),
        (2, 1),
        "the drills are not deployments"
    );
    assert_eq!(d.change_failure_rate, Some(0.5));
    // c1 rolled back cleanly: its own rollback is its recovery, not the
    // drill that succeeded after it.
    assert_eq!(d.recovery_time.unwrap().median_ms, 30_000);
    #[cfg(feature = "exposition")]
    {
        let text = exposition::render("shop", &records, 5 * DAY, 5 * DAY);
        assert!(text.contains(r#"kind="drill""#), "{text}");
    }
}

#[test]
fn an_interrupted_deployment_recovers_when_a_later_run_succeeds() {
    let interrupted = DeploymentRecord::from_journal(
        &journal(
            header("i1", RunKind::Deploy, StrategyKind::Rolling, "v2", 1000),
            enabled(100, "web-1").to_vec(),
            None,
        ),
        None,
    );
    let mut rollback = DeploymentRecord::from_journal(
        &journal(
            header("rb", RunKind::Rollback, StrategyKind::Rollback, "v1", 61_000),
            Vec::new(),
            Some((OutcomeKind::Succeeded, 9_000)),
        ),
        None,
    );
    rollback.acts_on = Some("i1".into());
    let d = dora(std::slice::from_ref(&interrupted), 0, DAY);
    assert_eq!((d.failed, d.unrecovered), (1, 1));
    assert_eq!(d.recovery_time, None);
    let d = dora(&[interrupted, rollback], 0, DAY);
    assert_eq!(d.deployments, 1, "a rollback run is not a deployment");
    // Failed at 1000 + 110 ms (its last record), whole again at 70,000.
    assert_eq!(d.recovery_time.unwrap().median_ms, 70_000 - 1_110);
}

#[test]
fn fleet_releases_follow_updates_and_restores() {
    let records = vec![succeeded("s1", 0), rolled_back_canary("c1", DAY)];
    let fleet = fleet_releases(&records);
    assert_eq!(
        fleet[&i("web-1")],
        Some(rel("v2")),
        "restored to what it ran before c1"
    );
    assert_eq!(fleet[&i("web-2")], Some(rel("v2")));
}

#[test]
fn duration_summary_takes_the_middle_of_an_even_count() {
    let s = DurationSummary::of(vec![40, 10, 30, 20]).unwrap();
    assert_eq!((s.count, s.median_ms, s.min_ms, s.max_ms), (4, 25, 10, 40));
    assert_eq!(DurationSummary::of(Vec::new()), None);
}

#[cfg(feature = "exposition")]
#[test]
fn the_exposition_has_flagger_names_counts_and_analysis_values() {
    let records = vec![succeeded("s1", DAY), rolled_back_canary("c1", 2 * DAY)];
    let text = exposition::render("shop", &records, 3 * DAY, exposition::DORA_WINDOW_MS);
    for line in [
        "deploykit_deployments_total{app=\"shop\",kind=\"deploy\",strategy=\"rolling\",outcome=\"succeeded\"} 1",
        "deploykit_deployments_total{app=\"shop\",kind=\"deploy\",strategy=\"canary\",outcome=\"rolled_back\"} 1",
        "deploykit_canary_status{name=\"shop\",namespace=\"shop\"} 2",
        "deploykit_canary_weight{name=\"shop\",namespace=\"shop\",workload=\"shop\",track=\"canary\"} 0",
        "deploykit_canary_weight{name=\"shop\",namespace=\"shop\",workload=\"shop-primary\",track=\"stable\"} 100",
        "deploykit_canary_total{namespace=\"shop\"} 1",
        "deploykit_canary_duration_seconds_count{name=\"shop\",namespace=\"shop\"} 1",
        "deploykit_analysis_value{app=\"shop\",deployment=\"c1\",metric=\"error_rate\"} 0.05",
        "deploykit_analysis_threshold{app=\"shop\",deployment=\"c1\",metric=\"error_rate\"} 0.01",
        "deploykit_analysis_checks_total{app=\"shop\",result=\"pass\"} 1",
        "deploykit_analysis_checks_total{app=\"shop\",result=\"fail\"} 1",
        "deploykit_instances{app=\"shop\",release=\"v2\"} 2",
        "deploykit_dora_change_failure_rate{app=\"shop\"} 0.5",
        "deploykit_deployment_in_progress{app=\"shop\"} 0",
        "deploykit_deployment_duration_seconds_count{app=\"shop\",strategy=\"rolling\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
    assert!(
        !text.contains("deploykit_dora_lead_time_seconds{"),
        "no lead time without commit times:\n{text}"
    );
}

/// The Grafana dashboard in docs/ queries only series the exposition
/// renders, through the portable `${DS_PROMETHEUS}` input.
#[cfg(feature = "exposition")]
#[test]
fn the_grafana_dashboard_queries_only_exported_series() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/grafana-dashboard.json")).expect("valid JSON");
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let mut records = vec![succeeded("s1", DAY), rolled_back_canary("c1", 2 * DAY)];
    records[0].commit = Some(SourceCommit::new("abcdef1", Some(0)).unwrap());
    let text = exposition::render("shop", &records, 3 * DAY, exposition::DORA_WINDOW_MS);
    let families: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let exported = |series: &str| {
        families.iter().any(|(family, kind)| {
            let suffixes: &[&str] = match *kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            suffixes.iter().any(|s| series == format!("{family}{s}"))
        })
    };
    let mut queries = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
        for t in p["targets"].as_array().unwrap() {
            assert_eq!(t["datasource"]["uid"], "${DS_PROMETHEUS}", "{}", p["title"]);
            queries.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for a in dashboard["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            queries.push(e.to_string());
        }
    }
    let mut seen = 0;
    for q in &queries {
        for (at, _) in q.match_indices("deploykit_") {
            let series: String = q[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(exported(&series), "{series} (in `{q}`) is not exported:\n{text}");
            seen += 1;
        }
    }
    assert!(seen >= 15, "the dashboard reads {seen} series");
}
