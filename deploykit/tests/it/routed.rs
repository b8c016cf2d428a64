//! The strategies built on routing policies — ramped, shadow, dark launch —
//! on the fakes, in virtual time.

use std::sync::Arc;
use std::time::Duration;

use deploykit::routing::{Capabilities, Capability, Match, Rule, ValueMatch};
use deploykit::{
    Canary, DarkLaunch, Error, EventKind, EventLog, Executor, Group, Metric, Observation, OutcomeKind,
    PromotionHandle, RampCurve, Ramped, ReleaseId, Report, Shadow, Strategy,
};
use deploykit_testkit::{FakeFleet, FakeMetrics, RoutingChange};

const STABLE: [&str; 2] = ["i-1", "i-2"];
const CANARY: &str = "i-3";

fn g(s: &str) -> Group {
    Group::new(s).unwrap()
}

fn v(s: &str) -> ReleaseId {
    ReleaseId::new(s).unwrap()
}

struct Setup {
    fleet: FakeFleet,
    exec: Executor,
    log: EventLog,
    handle: PromotionHandle,
}

/// Two stable instances and one canary on `v1`, behind a fake balancer
/// declaring `caps`.
fn setup(caps: Capabilities, metrics: FakeMetrics) -> Setup {
    let fleet = FakeFleet::with_groups(&[("stable", 2), ("canary", 1)]).routing_capabilities(caps);
    let log = EventLog::new();
    let handle = PromotionHandle::new();
    let exec = Executor::builder()
        .instances(fleet.instances())
        .load_balancer(Arc::new(fleet.load_balancer()))
        .events(Arc::new(log.clone()))
        .metrics(Arc::new(metrics))
        .promotion(handle.clone())
        .build()
        .expect("valid executor");
    Setup {
        fleet,
        exec,
        log,
        handle,
    }
}

fn every_capability() -> Capabilities {
    Capabilities::of(Capability::ALL)
}

/// Both groups healthy, stable serving requests.
fn healthy() -> FakeMetrics {
    FakeMetrics::new()
        .set("stable", Metric::ErrorRate, 0.001)
        .set("stable", Metric::LatencyP99, 0.12)
        .set("stable", Metric::RequestCount, 28_500.0)
        .set("canary", Metric::ErrorRate, 0.001)
        .set("canary", Metric::LatencyP99, 0.12)
}

/// Healthy, except that the canary fails half its requests from `at` on.
fn breaks_at(at: Duration) -> FakeMetrics {
    healthy().script("canary", Metric::ErrorRate, move |t| {
        Observation::Value(if t >= at { 0.5 } else { 0.001 })
    })
}

/// A base canary checking every 10 s, with stages 50 → 100 after a
/// shadow or a dark launch.
fn base() -> Canary {
    Canary {
        check_interval: Duration::from_secs(10),
        stage_duration: Duration::from_secs(60),
        stages: vec![50, 100],
        ..Canary::default()
    }
}

fn beta() -> Rule {
    Rule {
        matches: Match::Header {
            name: "x-beta".into(),
            value: ValueMatch::Exact("1".into()),
        },
        group: g("canary"),
    }
}

impl Setup {
    async fn deploy(&self, s: &dyn Strategy) -> Report {
        self.exec.deploy(s, &v("v2")).await.expect("deployment starts")
    }

    fn dump(&self) -> String {
        self.log
            .events()
            .iter()
            .map(|e| format!("{:>9} {:?}", e.elapsed_ms, e.kind))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The canary's share at each traffic change: weights, and the split
    /// of each policy.
    fn canary_shares(&self) -> Vec<(Duration, u8)> {
        self.fleet
            .routing_history()
            .into_iter()
            .filter_map(|r| match r.change {
                RoutingChange::Weights(w) => Some((r.at, w.get(&g("canary")).copied().unwrap_or(0))),
                RoutingChange::Policy(p) => Some((r.at, p.shares().get(&g("canary")).copied().unwrap_or(0))),
                _ => None,
            })
            .collect()
    }

    /// The last traffic change was plain weights: no rule or mirror left.
    fn ends_with_plain_weights(&self) -> bool {
        let last = self
            .fleet
            .routing_history()
            .into_iter()
            .rev()
            .find(|r| matches!(r.change, RoutingChange::Weights(_) | RoutingChange::Policy(_)));
        matches!(last.map(|r| r.change), Some(RoutingChange::Weights(_)))
    }

    fn assert_invariants(&self, report: &Report) {
        let inv = self.fleet.check(report, 1);
        if !inv.is_ok() {
            eprintln!("events:\n{}", self.dump());
        }
        inv.assert_ok();
    }
}

#[tokio::test(start_paused = true)]
async fn a_ramp_follows_its_curve_step_by_step_and_promotes() {
    let s = setup(Capabilities::weights_and_switch(), healthy());
    let ramp = Ramped {
        base: base(),
        from: 10,
        to: 100,
        duration: Duration::from_secs(120),
        step_interval: Duration::from_secs(20),
        curve: RampCurve::Linear,
        ..Ramped::default()
    };
    let report = s.deploy(&ramp).await;
    assert!(report.is_success(), "{report}\n{}", s.dump());
    let shares = s.canary_shares();
    let points: Vec<u8> = shares.iter().map(|(_, p)| *p).collect();
    // Isolation, the seven points of the curve, all traffic back to stable.
    assert_eq!(points, [0, 10, 25, 40, 55, 70, 85, 100, 0]);
    // One step every 20 s: each change 20 s after the one before.
    for pair in shares[1..8].windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, Duration::from_secs(20), "{shares:?}");
    }
    // The observed share at each moment is the curve's, rounded.
    for (at, p) in &shares[1..8] {
        let since = *at - shares[1].0;
        let intended = ramp.share_at(since);
        assert!(
            (f64::from(*p) - intended).abs() <= 0.5,
            "{since:?}: {p} vs {intended}"
        );
    }
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v2")), "{id}");
    }
    assert!(!s.fleet.is_running(CANARY));
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_breach_mid_ramp_rolls_back_at_once_and_goes_no_higher() {
    // The canary breaks 50 s into the deployment: at the third step.
    let s = setup(
        Capabilities::weights_and_switch(),
        breaks_at(Duration::from_secs(50)),
    );
    let ramp = Ramped {
        base: base(),
        from: 10,
        to: 100,
        duration: Duration::from_secs(120),
        step_interval: Duration::from_secs(20),
        curve: RampCurve::Linear,
        ..Ramped::default()
    };
    let report = s.deploy(&ramp).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}\n{}", s.dump());
    let points: Vec<u8> = s.canary_shares().iter().map(|(_, p)| *p).collect();
    assert!(points.iter().all(|p| *p <= 40), "{points:?}");
    assert_eq!(points.last(), Some(&0));
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
        assert!(s.fleet.in_rotation(id));
    }
    assert!(!s.fleet.is_running(CANARY));
    s.assert_invariants(&report);
}

/// The ramp of the two tests above, stepping down over 30 s after a
/// breach that is not critical (three steps, one per 10 s check).
fn ramp_with_ramp_down() -> Ramped {
    Ramped {
        base: base(),
        from: 10,
        to: 100,
        duration: Duration::from_secs(120),
        step_interval: Duration::from_secs(20),
        ramp_down: Some(Duration::from_secs(30)),
        ..Ramped::default()
    }
}

/// Healthy, then from `mild` on the canary fails 1.5 % of requests (1.5
/// times the 1 % limit, under the critical 2 times), and from `critical`
/// on (if ever) half of them.
fn degrades(mild: Duration, critical: Option<Duration>) -> FakeMetrics {
    healthy().script("canary", Metric::ErrorRate, move |t| {
        Observation::Value(match critical {
            Some(c) if t >= c => 0.5,
            _ if t >= mild => 0.015,
            _ => 0.001,
        })
    })
}

fn ramping_down(s: &Setup) -> Vec<u8> {
    s.log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::RampingDown { weight, .. } => Some(weight),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_mild_breach_with_ramp_down_steps_the_share_down_before_rolling_back() {
    let s = setup(
        Capabilities::weights_and_switch(),
        degrades(Duration::from_secs(50), None),
    );
    let ramp = ramp_with_ramp_down();
    // The plan shows the way down from each step.
    let plan = ramp
        .plan(&s.exec.snapshot().await.expect("snapshot"), &v("v2"))
        .expect("plan");
    let analyze_40 = plan
        .stages
        .iter()
        .find(|st| st.name.starts_with("ramp 40%"))
        .expect("a 40 % step")
        .units[0]
        .steps[1]
        .to_string();
    assert!(
        analyze_40
            .ends_with("on a breach under 2x its limit, ramp down 30% 20% 10% over 30s, then roll back"),
        "{analyze_40}"
    );
    let report = s.deploy(&ramp).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}\n{}", s.dump());
    let reason = report.reason.clone().unwrap_or_default();
    assert!(reason.contains("canary error rate"), "{reason}");
    assert!(
        reason.contains("ramped down from 40% to 10% over 30s"),
        "{reason}"
    );
    // Up to 40 %, then down a step every 10 s (the analysis checking each),
    // then all traffic to stable.
    let shares = s.canary_shares();
    let points: Vec<u8> = shares.iter().map(|(_, p)| *p).collect();
    assert_eq!(points, [0, 10, 25, 40, 30, 20, 10, 0], "{}", s.dump());
    for pair in shares[3..].windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, Duration::from_secs(10), "{shares:?}");
    }
    assert_eq!(ramping_down(&s), [30, 20, 10]);
    let checks_at: Vec<u8> = s
        .log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::AnalysisResult { weight, .. } => Some(weight),
            _ => None,
        })
        .collect();
    for w in [30, 20, 10] {
        assert!(checks_at.contains(&w), "no check at {w}%: {checks_at:?}");
    }
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
        assert!(s.fleet.in_rotation(id));
    }
    assert!(!s.fleet.is_running(CANARY));
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_critical_breach_cuts_traffic_at_once_even_with_ramp_down() {
    // Half the requests failing is 50 times the limit: no way down.
    let s = setup(
        Capabilities::weights_and_switch(),
        breaks_at(Duration::from_secs(50)),
    );
    let report = s.deploy(&ramp_with_ramp_down()).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    let points: Vec<u8> = s.canary_shares().iter().map(|(_, p)| *p).collect();
    assert_eq!(points, [0, 10, 25, 40, 0], "{}", s.dump());
    assert!(ramping_down(&s).is_empty());
    let reason = report.reason.clone().unwrap_or_default();
    assert!(
        !reason.contains("ramped down") && !reason.contains("ramp-down"),
        "{reason}"
    );

    // Mild first, critical during the way down: the rest is cut at once.
    let s = setup(
        Capabilities::weights_and_switch(),
        degrades(Duration::from_secs(50), Some(Duration::from_secs(65))),
    );
    let report = s.deploy(&ramp_with_ramp_down()).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    let points: Vec<u8> = s.canary_shares().iter().map(|(_, p)| *p).collect();
    assert_eq!(points, [0, 10, 25, 40, 30, 20, 0], "{}", s.dump());
    let reason = report.reason.clone().unwrap_or_default();
    assert!(reason.contains("ramp-down cut short at 20%"), "{reason}");
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
    }
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_shadow_takes_mirrored_copies_only_and_is_torn_down() {
    let s = setup(every_capability(), healthy());
    let shadow = Shadow {
        base: base(),
        percent: 30,
        duration: Duration::from_secs(60),
        ..Shadow::default()
    };
    let report = s.deploy(&shadow).await;
    assert!(report.is_success(), "{report}\n{}", s.dump());
    let policies = s.fleet.load_balancer().policies();
    assert_eq!(policies.len(), 1, "{policies:?}");
    let mirror = policies[0].mirror.as_ref().expect("mirrors");
    assert_eq!((mirror.to.as_str(), mirror.percent), ("canary", 30));
    assert_eq!(mirror.methods, ["GET", "HEAD"]);
    // Clients were never answered by the shadow.
    assert!(
        s.canary_shares().iter().all(|(_, p)| *p == 0),
        "{:?}",
        s.canary_shares()
    );
    // The shadow was judged: checks of its metrics for the whole minute.
    let checks = s
        .log
        .events()
        .iter()
        .filter(|e| matches!(e.kind, EventKind::AnalysisResult { .. }))
        .count();
    assert_eq!(checks, 6, "{}", s.dump());
    // Torn down: stable keeps v1, the shadow is stopped, the mirror gone.
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
        assert!(s.fleet.in_rotation(id));
    }
    assert!(!s.fleet.is_running(CANARY));
    assert!(s.ends_with_plain_weights(), "{:?}", s.fleet.routing_history());
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_failing_shadow_rolls_back_without_a_client_ever_seeing_it() {
    let s = setup(every_capability(), breaks_at(Duration::ZERO));
    let shadow = Shadow {
        base: base(),
        duration: Duration::from_secs(60),
        ..Shadow::default()
    };
    let report = s.deploy(&shadow).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}\n{}", s.dump());
    assert!(s.canary_shares().iter().all(|(_, p)| *p == 0));
    assert_eq!(s.fleet.load_balancer().weights().unwrap()[&g("stable")], 100);
    assert!(!s.fleet.is_running(CANARY));
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_balancer_that_cannot_mirror_refuses_the_shadow_before_anything_is_touched() {
    let s = setup(
        Capabilities::weights_and_switch().with(Capability::HeaderMatch),
        healthy(),
    );
    let shadow = Shadow {
        base: base(),
        duration: Duration::from_secs(60),
        ..Shadow::default()
    };
    let e = s.exec.deploy(&shadow, &v("v2")).await.unwrap_err();
    let Error::Routing { stage, source } = &e else {
        panic!("not a routing refusal: {e}");
    };
    assert_eq!(stage, "shadow 100% of GET,HEAD to canary");
    assert!(matches!(
        source,
        deploykit::routing::RoutingError::Unsupported {
            capability: Capability::Mirror,
            ..
        }
    ));
    let text = e.to_string();
    assert!(
        text.contains("the fake load balancer cannot mirror requests"),
        "{text}"
    );
    assert!(text.contains("nginx"), "names the alternative: {text}");
    assert!(e.is_invalid_input());
    assert!(s.fleet.ops().is_empty(), "{:?}", s.fleet.ops());
    assert!(s.fleet.routing_history().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_dark_launch_serves_only_the_rule_until_promoted_then_widens_keeping_it() {
    let s = setup(every_capability(), healthy());
    let handle = s.handle.clone();
    let operator = tokio::spawn(async move {
        let stage = handle.wait_for_pause().await;
        // The testers take five minutes.
        tokio::time::sleep(Duration::from_secs(300)).await;
        assert!(handle.promote());
        stage
    });
    let dark = DarkLaunch {
        base: Canary {
            stages: vec![50, 100],
            promotion: deploykit::Promotion::Auto,
            ..base()
        },
        rules: vec![beta()],
        timeout: None,
    };
    let report = s.deploy(&dark).await;
    assert!(report.is_success(), "{report}\n{}", s.dump());
    assert_eq!(operator.await.unwrap(), 1);
    let policies = s.fleet.load_balancer().policies();
    assert_eq!(policies.len(), 3, "{policies:?}");
    // Dark: the rule to the canary, no share; then the share widens with
    // the rule kept.
    let shares: Vec<u8> = policies
        .iter()
        .map(|p| p.shares().get(&g("canary")).copied().unwrap_or(0))
        .collect();
    assert_eq!(shares, [0, 50, 100]);
    assert!(policies.iter().all(|p| p.rules == [beta()]));
    // The share rose only after the promotion, 300 s in the dark.
    let history = s.canary_shares();
    let widened = history.iter().find(|(_, p)| *p == 50).unwrap().0;
    // history[0] is the isolation, history[1] the dark policy.
    let dark_at = history[1].0;
    assert!(widened - dark_at >= Duration::from_secs(300), "{history:?}");
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v2")), "{id}");
    }
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_dark_launch_without_promotion_in_time_rolls_back() {
    let s = setup(every_capability(), healthy());
    let dark = DarkLaunch {
        base: base(),
        rules: vec![beta()],
        timeout: Some(Duration::from_secs(120)),
    };
    let report = s.deploy(&dark).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}\n{}", s.dump());
    let reason = report.reason.clone().unwrap_or_default();
    assert!(reason.contains("no promotion"), "{reason}");
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
    }
    // All traffic is back on stable, the rule gone.
    assert!(s.ends_with_plain_weights(), "{:?}", s.fleet.routing_history());
    s.assert_invariants(&report);
}

/// Healthy guardrails, and each group's visits (20 a second) and
/// conversions at `control` and `treatment` rates over any window.
fn converting(control: f64, treatment: f64) -> FakeMetrics {
    let tally = |rate: f64| {
        move |_t: Duration, window: Duration| {
            let visits = 20.0 * window.as_secs_f64();
            deploykit::judge::Measured::Value(deploykit::experiment::Tally {
                visits,
                conversions: (visits * rate).round(),
            })
        }
    };
    healthy()
        .script_tally("stable", tally(control))
        .script_tally("canary", tally(treatment))
}

fn experiment() -> deploykit::Experiment {
    deploykit::Experiment {
        base: base(),
        duration: Duration::from_secs(600),
        ..deploykit::Experiment::default()
    }
}

fn readings(s: &Setup) -> Vec<deploykit::experiment::Reading> {
    s.log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::ExperimentReading { reading, .. } => Some(reading),
            _ => None,
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_clearly_better_treatment_wins_the_experiment_and_is_promoted() {
    let s = setup(every_capability(), converting(0.05, 0.08));
    let report = s.deploy(&experiment()).await;
    assert!(report.is_success(), "{report}\n{}", s.dump());
    // The users were split sticky, half and half.
    let policies = s.fleet.load_balancer().policies();
    assert_eq!(policies.len(), 1);
    assert!(policies[0].split.sticky.is_some());
    assert_eq!(policies[0].shares()[&g("canary")], 50);
    let r = readings(&s);
    let last = r.last().expect("readings");
    assert_eq!(last.verdict, deploykit::experiment::Verdict::TreatmentWins);
    assert!(last.p_value <= 0.05 && last.effect > 0.02, "{last:?}");
    // The report carries the reading it was decided on, and shows it.
    assert_eq!(report.experiment.as_ref(), Some(last));
    let shown = report.to_string();
    assert!(
        shown.contains("experiment (the treatment wins): control ") && shown.contains("p = "),
        "{shown}"
    );
    // Decided early: no reading before min_samples, a winner long before
    // the 600 s.
    assert!(r.len() < 20, "{} readings", r.len());
    assert!(r
        .iter()
        .take_while(|x| x.control.visits < 1000.0)
        .all(|x| x.verdict == deploykit::experiment::Verdict::Continue));
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v2")), "{id}");
    }
    // Every user moved to the winner (the sticky split ended) before the
    // first stable instance was drained for the promotion.
    let history = s.fleet.routing_history();
    let all_on_winner = history
        .iter()
        .position(|r| matches!(&r.change, RoutingChange::Weights(w) if w.get(&g("canary")) == Some(&100)))
        .expect("all traffic on the winner");
    let first_stable_drain = history
        .iter()
        .position(|r| matches!(&r.change, RoutingChange::Drained(id) if STABLE.contains(&id.as_str())))
        .expect("stable drained for the promotion");
    assert!(all_on_winner < first_stable_drain, "{history:?}");
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn equal_variants_end_with_no_significant_difference_and_the_control_stays() {
    let s = setup(every_capability(), converting(0.05, 0.05));
    let report = s.deploy(&experiment()).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}\n{}", s.dump());
    let reason = report.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("no significant difference within 600s"),
        "{reason}"
    );
    assert!(
        reason.contains("p = "),
        "the statistics are in the reason: {reason}"
    );
    assert_eq!(readings(&s).len(), 60);
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
    }
    assert!(s.ends_with_plain_weights());
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn equal_variants_promote_the_treatment_when_on_no_difference_says_so() {
    use deploykit::experiment::{ExperimentRules, NoDifference};
    let promote = deploykit::Experiment {
        rules: ExperimentRules {
            on_no_difference: NoDifference::Promote,
            ..ExperimentRules::default()
        },
        ..experiment()
    };
    let s = setup(every_capability(), converting(0.05, 0.05));
    let report = s.deploy(&promote).await;
    assert!(report.is_success(), "{report}\n{}", s.dump());
    // It ran its whole time: no reading ever decided.
    let r = readings(&s);
    assert_eq!(r.len(), 60);
    assert!(r
        .iter()
        .all(|x| x.verdict == deploykit::experiment::Verdict::Continue));
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v2")), "{id}");
    }
    // The promotion without a winner stands out, with its statistics.
    let warned: Vec<String> = s
        .log
        .events()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::Warning { message, .. } => Some(message),
            _ => None,
        })
        .collect();
    assert!(
        warned
            .iter()
            .any(|m| m.contains("no significant difference within 600s")
                && m.contains("on_no_difference = promote")
                && m.contains("p = ")),
        "{warned:?}"
    );
    s.assert_invariants(&report);

    // Too few visits to compare is not "no difference": the control stays.
    let few = deploykit::Experiment {
        rules: ExperimentRules {
            min_samples: 1_000_000,
            ..promote.rules
        },
        ..promote.clone()
    };
    let s = setup(every_capability(), converting(0.05, 0.05));
    let report = s.deploy(&few).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    let reason = report.reason.clone().unwrap_or_default();
    assert!(reason.contains("too few visits"), "{reason}");
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
    }
    s.assert_invariants(&report);
}

#[tokio::test(start_paused = true)]
async fn a_worse_treatment_loses_and_a_guardrail_breach_rolls_back_first() {
    let s = setup(every_capability(), converting(0.05, 0.02));
    let report = s.deploy(&experiment()).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    let reason = report.reason.clone().unwrap_or_default();
    assert!(reason.contains("the control stable wins"), "{reason}");

    // The treatment converts better but fails a fifth of its requests:
    // the guardrail rolls back before any reading.
    let metrics = converting(0.05, 0.10).script("canary", Metric::ErrorRate, |_| Observation::Value(0.2));
    let s = setup(every_capability(), metrics);
    let report = s.deploy(&experiment()).await;
    assert_eq!(report.outcome, OutcomeKind::RolledBack, "{report}");
    assert!(readings(&s).is_empty());
    for id in STABLE {
        assert_eq!(s.fleet.release_of(id), Some(v("v1")), "{id}");
    }
}
