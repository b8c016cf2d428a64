//! The statistical judges of the canary analysis, end to end through the
//! executor on the fakes, in virtual time.

use std::sync::Arc;
use std::time::Duration;

use deploykit::analysis::{AnalysisMetric, CheckOutcome, Evidence};
use deploykit::judge::{Classification, Counts, Distribution, ErrorRateJudge, LatencyJudge, Measured};
use deploykit::{Canary, Event, EventKind, EventLog, Executor, Metric, OutcomeKind, ReleaseId};
use deploykit_testkit::{FakeFleet, FakeMetrics};

/// Both tracks at 0.3 % errors and 120 ms p99 on the threshold metrics,
/// so only the judges can tell the canary apart.
fn base() -> FakeMetrics {
    FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.003)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, 0.003)
        .set("canary", Metric::LatencyP99, 0.12)
}

/// `requests` per check with `errors` of them failed.
fn counts(requests: f64, errors: f64) -> impl Fn(Duration, Duration) -> Measured<Counts> {
    move |_, _| Measured::Value(Counts { requests, errors })
}

/// 400 latencies spread evenly over 100 ms from `from` seconds.
fn latencies(from: f64) -> impl Fn(Duration, Duration) -> Measured<Distribution> {
    move |_, _| {
        Measured::Value(Distribution::from_samples(
            (0..400).map(|i| from + 0.1 * f64::from(i) / 400.0),
        ))
    }
}

fn canary(error_judge: ErrorRateJudge, latency_judge: LatencyJudge) -> Canary {
    let mut c = Canary {
        stages: vec![10, 100],
        stage_duration: Duration::from_secs(120),
        ..Canary::default()
    };
    c.analysis.error_judge = error_judge;
    c.analysis.latency_judge = latency_judge;
    c
}

async fn deploy(metrics: FakeMetrics, canary: &Canary) -> (OutcomeKind, Vec<Event>) {
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]);
    let log = EventLog::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(log.clone()))
        .metrics(Arc::new(metrics))
        .build()
        .expect("valid executor");
    let report = exec
        .deploy(canary, &ReleaseId::new("v2").unwrap())
        .await
        .expect("deployment starts");
    (report.outcome, log.events())
}

fn checks(events: &[Event]) -> Vec<(CheckOutcome, Vec<Evidence>)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AnalysisResult { result, evidence, .. } => Some((result.clone(), evidence.clone())),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn the_sequential_judge_rolls_back_on_counts_and_says_why() {
    // The windowed rates look alike; the counts since the last check show
    // the canary erring 5 % against stable's 0.3 %.
    let metrics = base()
        .script_counts("canary", counts(150.0, 8.0))
        .script_counts("stable", counts(2850.0, 9.0));
    let (outcome, events) = deploy(
        metrics,
        &canary(ErrorRateJudge::Sequential, LatencyJudge::Threshold),
    )
    .await;
    assert_eq!(outcome, OutcomeKind::RolledBack);
    let checks = checks(&events);
    let (first, evidence) = &checks[0];
    assert!(
        matches!(first, CheckOutcome::Fail { metric: AnalysisMetric::ErrorRateSequential, stage: 1, value, threshold }
            if *value >= 200.0 && *threshold == 200.0),
        "{first:?}"
    );
    assert_eq!(checks.len(), 1, "rolled back at the first check: {checks:?}");
    let Some(Evidence::Sequential(seq)) = evidence.first() else {
        panic!("{evidence:?}")
    };
    assert!(seq.rejected);
    assert_eq!(seq.classification(), Classification::High);
    let words = evidence[0].to_string();
    assert!(
        words.starts_with("sequential error-rate test: canary 8 error(s) in 150 request(s) (5.33 %), stable 9 in 2850 (0.32 %); rate ratio 16.89"),
        "{words}"
    );
    assert!(first.to_string().contains("sequential test"), "{first}");
    // The journal records events as JSON: the statistics are in it.
    let json = serde_json::to_string(
        &events
            .iter()
            .find(|e| matches!(e.kind, EventKind::AnalysisResult { .. }))
            .unwrap(),
    )
    .unwrap();
    assert!(
        json.contains("\"judge\":\"sequential\"") && json.contains("\"e_value\""),
        "{json}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_judges_pass_a_good_canary_and_keep_their_evidence() {
    let metrics = base()
        .script_counts("canary", counts(1000.0, 3.0))
        .script_counts("stable", counts(9000.0, 27.0))
        .script_latency("canary", latencies(0.1))
        .script_latency("stable", latencies(0.1));
    let (outcome, events) = deploy(
        metrics,
        &canary(ErrorRateJudge::Sequential, LatencyJudge::MannWhitney),
    )
    .await;
    assert_eq!(outcome, OutcomeKind::Succeeded);
    let checks = checks(&events);
    assert!(checks.len() >= 8, "{checks:?}");
    for (outcome, evidence) in &checks {
        assert_eq!(*outcome, CheckOutcome::Pass);
        assert!(
            matches!(evidence.as_slice(), [Evidence::Sequential(s), Evidence::MannWhitney(m), Evidence::Score { score, .. }]
                if !s.rejected && m.classification == Classification::Pass && *score == 100.0),
            "{evidence:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_mann_whitney_judge_rolls_back_a_slower_canary() {
    // +100 ms on a 150 ms median; p99 stays under the 500 ms threshold.
    let metrics = base()
        .script_latency("canary", latencies(0.2))
        .script_latency("stable", latencies(0.1));
    let (outcome, events) = deploy(
        metrics,
        &canary(ErrorRateJudge::Threshold, LatencyJudge::MannWhitney),
    )
    .await;
    assert_eq!(outcome, OutcomeKind::RolledBack);
    let checks = checks(&events);
    let (first, evidence) = &checks[0];
    assert!(
        matches!(
            first,
            CheckOutcome::Fail {
                metric: AnalysisMetric::LatencyDistribution,
                stage: 1,
                ..
            }
        ),
        "{first:?}"
    );
    assert_eq!(
        first.to_string(),
        "canary latency distribution (Mann-Whitney): canary mean 1.67x stable's, above the allowed 1.10x at stage 1"
    );
    let words: Vec<String> = evidence.iter().map(ToString::to_string).collect();
    assert!(
        words[0].contains("shift +100.0 ms") && words[0].ends_with(": high"),
        "{words:?}"
    );
    assert_eq!(words[1], "score 50 of 100 (passes at 95, fails below 75)");
}

#[tokio::test(start_paused = true)]
async fn a_judge_without_data_is_never_a_pass() {
    // Sequential judge selected, but nothing answers counts (past the
    // monitoring check, which would refuse this setup up front).
    let mut c = canary(ErrorRateJudge::Sequential, LatencyJudge::Threshold);
    c.analysis.monitoring_check = false;
    let (outcome, events) = deploy(base(), &c).await;
    assert_eq!(outcome, OutcomeKind::RolledBack);
    let checks = checks(&events);
    assert_eq!(checks.len(), 4, "the inconclusive limit: {checks:?}");
    for (o, _) in &checks {
        assert!(
            matches!(o, CheckOutcome::NoData { reason } if reason == "canary request and error counts has no data"),
            "{o:?}"
        );
    }
}

/// Four stable and one canary fake; the deployment's start result and the
/// fleet, to see what was touched.
async fn try_deploy(
    metrics: FakeMetrics,
    canary: &Canary,
) -> (deploykit::Result<deploykit::Report>, FakeFleet) {
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]);
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(metrics))
        .build()
        .expect("valid executor");
    let r = exec.deploy(canary, &ReleaseId::new("v2").unwrap()).await;
    (r, fleet)
}

#[tokio::test(start_paused = true)]
async fn monitoring_that_matches_nothing_is_refused_before_anything_is_touched() {
    // The stable error rate matches nothing and stable served no requests.
    let metrics =
        FakeMetrics::new()
            .set("stable", Metric::LatencyP99, 0.12)
            .set("stable", Metric::RequestCount, 0.0);
    let (r, fleet) = try_deploy(metrics, &Canary::default()).await;
    let e = r.expect_err("refused");
    assert!(matches!(e, deploykit::Error::Refused(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("stable error rate answered no data")
            && msg.contains(
                "stable request count is 0 — no requests reached the stable track in the last 300s"
            )
            && msg.contains("nothing was touched"),
        "{msg}"
    );
    assert!(!msg.contains("p99"), "the p99 query answered: {msg}");
    assert!(fleet.ops().is_empty(), "touched: {:?}", fleet.ops());
}

#[tokio::test(start_paused = true)]
async fn monitoring_checks_what_the_selected_judges_read() {
    // The thresholds' queries answer (and the counts follow from the
    // request count and error rate), but nothing answers the latency
    // distribution the Mann-Whitney judge reads.
    let metrics = base().set("stable", Metric::RequestCount, 5000.0);
    let mut c = canary(ErrorRateJudge::Sequential, LatencyJudge::MannWhitney);
    let (r, fleet) = try_deploy(metrics, &c).await;
    let msg = r.expect_err("refused").to_string();
    assert!(
        msg.contains("stable latency distribution (Mann-Whitney judge) answered no data")
            && !msg.contains("request and error counts"),
        "{msg}"
    );
    assert!(fleet.ops().is_empty());
    // Turned off, the deployment starts (and the analysis, finding no
    // data, rolls back as before).
    c.analysis.monitoring_check = false;
    let metrics = base().set("stable", Metric::RequestCount, 5000.0);
    let (r, _) = try_deploy(metrics, &c).await;
    assert_eq!(r.expect("starts").outcome, OutcomeKind::RolledBack);
}

#[tokio::test(start_paused = true)]
async fn the_report_keeps_the_deciding_check_and_its_evidence_per_stage() {
    let metrics = base()
        .script_counts("canary", counts(150.0, 8.0))
        .script_counts("stable", counts(2850.0, 9.0));
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]);
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(metrics))
        .build()
        .unwrap();
    let c = canary(ErrorRateJudge::Sequential, LatencyJudge::Threshold);
    let report = exec.deploy(&c, &ReleaseId::new("v2").unwrap()).await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::RolledBack);
    assert_eq!(
        report.checks.len(),
        1,
        "only stage 1 was analysed: {:?}",
        report.checks
    );
    let check = &report.checks[0];
    assert_eq!((check.stage, check.weight), (1, 10));
    assert!(matches!(
        check.result,
        CheckOutcome::Fail {
            metric: AnalysisMetric::ErrorRateSequential,
            ..
        }
    ));
    assert!(
        matches!(check.evidence.first(), Some(Evidence::Sequential(s)) if s.rejected),
        "{:?}",
        check.evidence
    );
    // The final summary a person reads carries the statistic in words.
    let text = report.to_string();
    assert!(text.contains("  canary stage 1 (10%): "), "{text}");
    assert!(
        text.contains("    sequential error-rate test: canary 8 error(s) in 150 request(s) (5.33 %)"),
        "{text}"
    );
    // And the JSON form keeps it typed.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["checks"][0]["evidence"][0]["judge"], "sequential", "{json}");
}

#[tokio::test(start_paused = true)]
async fn a_promoted_canary_reports_the_last_check_of_every_stage() {
    let metrics = base()
        .script_counts("canary", counts(1000.0, 3.0))
        .script_counts("stable", counts(9000.0, 27.0))
        .script_latency("canary", latencies(0.1))
        .script_latency("stable", latencies(0.1));
    let fleet = FakeFleet::with_groups(&[("stable", 4), ("canary", 1)]);
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .metrics(Arc::new(metrics))
        .build()
        .unwrap();
    let c = canary(ErrorRateJudge::Sequential, LatencyJudge::MannWhitney);
    let report = exec.deploy(&c, &ReleaseId::new("v2").unwrap()).await.unwrap();
    assert_eq!(report.outcome, OutcomeKind::Succeeded, "{:?}", report.reason);
    let stages: Vec<(usize, u8)> = report.checks.iter().map(|c| (c.stage, c.weight)).collect();
    assert_eq!(stages, vec![(1, 10), (2, 100)]);
    for check in &report.checks {
        assert_eq!(check.result, CheckOutcome::Pass);
        assert_eq!(
            check.evidence.len(),
            3,
            "sequential, Mann-Whitney and score: {:?}",
            check.evidence
        );
    }
}
