//! The dashboard's pages as HTML: every value from a journal, a flag file
//! or the fleet goes through [`esc`], and nothing from the configuration
//! but instance ids, groups and addresses is shown (no webhook URL, no
//! metrics credential).

use std::collections::BTreeMap;
use std::fmt::Write;

use deploykit::analysis::{CheckOutcome, Measurement};
use deploykit::state::{utc_datetime, HistoryEntry, HistoryOutcome, JournalSummary};
use deploykit::stats::exposition::DORA_WINDOW_MS;
use deploykit::stats::{self, DeploymentRecord, Dora};
use deploykit::{Event, EventKind, StepResult};
use serde_json::Value;

use super::svg;
use crate::stats::human_ms;

/// `text` safe inside HTML text and quoted attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` as one query-string or path segment.
pub(crate) fn url_part(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Who is looking, for the header and for which buttons to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Viewer {
    /// Signed in (cookie or Bearer): actions are offered.
    SignedIn,
    /// Not signed in: reading only; the sign-in link is offered.
    Anonymous,
    /// The dashboard runs with `--read-only`: no actions exist.
    ReadOnly,
}

/// A whole page around `body`.
pub(crate) fn layout(title: &str, viewer: Viewer, body: &str) -> String {
    let who = match viewer {
        Viewer::SignedIn => "<form method=\"post\" action=\"/logout\" class=\"inline\"><span class=\"badge ok\">signed in</span> <button type=\"submit\">Sign out</button></form>",
        Viewer::Anonymous => "<span class=\"badge\">read-only</span> <a href=\"/login\">Sign in to act</a>",
        Viewer::ReadOnly => "<span class=\"badge\">read-only dashboard</span>",
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · deploykit</title><link rel=\"icon\" href=\"/assets/favicon.svg\" type=\"image/svg+xml\">\
         <link rel=\"stylesheet\" href=\"/assets/style.css\"><script src=\"/assets/live.js\" defer></script></head>\
         <body><header><strong>deploykit</strong><nav><a href=\"/\">Deployments</a><a href=\"/fleet\">Fleet</a>\
         <a href=\"/history\">History</a><a href=\"/flags\">Flags</a></nav><div class=\"who\">{who}</div></header>\
         <main><h1>{t}</h1>{body}</main></body></html>\n",
        t = esc(title)
    )
}

/// An error or notice box.
pub(crate) fn notice(class: &str, text: &str) -> String {
    format!("<p class=\"notice {class}\" role=\"status\">{}</p>", esc(text))
}

/// The word a filter uses for an outcome (`rolled_back`).
pub(crate) fn outcome_slug(o: HistoryOutcome) -> String {
    serde_json::to_value(o)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn outcome_class(o: HistoryOutcome) -> &'static str {
    match o {
        HistoryOutcome::Succeeded => "ok",
        HistoryOutcome::Degraded | HistoryOutcome::InProgress => "warn",
        HistoryOutcome::RolledBack => "bad",
        HistoryOutcome::RollbackFailed | HistoryOutcome::Interrupted => "bad strong",
    }
}

fn badge(o: HistoryOutcome) -> String {
    format!(
        "<span class=\"badge {}\">{}</span>",
        outcome_class(o),
        esc(&o.to_string())
    )
}

fn when(ms: u64) -> String {
    format!("{} UTC", utc_datetime(ms / 1000))
}

fn secs(ms: u64) -> String {
    format!("{:.1} s", ms as f64 / 1000.0)
}

/// The filters of the deployments page.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub(crate) struct Filters {
    /// An outcome slug, or empty for any.
    #[serde(default)]
    pub(crate) outcome: String,
    /// A strategy name, or empty for any.
    #[serde(default)]
    pub(crate) strategy: String,
    /// Part of the release name, or empty.
    #[serde(default)]
    pub(crate) release: String,
}

impl Filters {
    fn keeps(&self, e: &HistoryEntry) -> bool {
        (self.outcome.is_empty() || outcome_slug(e.outcome) == self.outcome)
            && (self.strategy.is_empty() || e.strategy.to_string() == self.strategy)
            && (self.release.is_empty() || e.release.as_str().contains(self.release.as_str()))
    }

    /// As a query string (`outcome=…&strategy=…`), for the live stream.
    pub(crate) fn query(&self) -> String {
        format!(
            "outcome={}&strategy={}&release={}",
            url_part(&self.outcome),
            url_part(&self.strategy),
            url_part(&self.release)
        )
    }
}

const OUTCOMES: [HistoryOutcome; 6] = [
    HistoryOutcome::InProgress,
    HistoryOutcome::Succeeded,
    HistoryOutcome::Degraded,
    HistoryOutcome::RolledBack,
    HistoryOutcome::RollbackFailed,
    HistoryOutcome::Interrupted,
];
const STRATEGIES: [&str; 4] = ["rolling", "recreate", "blue-green", "canary"];

fn select(name: &str, label: &str, current: &str, options: &[(String, String)]) -> String {
    let mut s = format!("<label>{label} <select name=\"{name}\"><option value=\"\">any</option>");
    for (value, text) in options {
        let sel = if value == current { " selected" } else { "" };
        let _ = write!(s, "<option value=\"{}\"{sel}>{}</option>", esc(value), esc(text));
    }
    s.push_str("</select></label>");
    s
}

/// The deployments page: the filter form and the live table.
pub(crate) fn deployments(entries: &[HistoryEntry], f: &Filters, problems: &[String]) -> String {
    let outcomes: Vec<(String, String)> = OUTCOMES
        .iter()
        .map(|o| (outcome_slug(*o), o.to_string()))
        .collect();
    let strategies: Vec<(String, String)> = STRATEGIES
        .iter()
        .map(|s| (s.to_string(), s.to_string()))
        .collect();
    let mut s = String::from("<form method=\"get\" action=\"/\" class=\"filters\">");
    s.push_str(&select("outcome", "Outcome", &f.outcome, &outcomes));
    s.push_str(&select("strategy", "Strategy", &f.strategy, &strategies));
    let _ = write!(
        s,
        "<label>Release <input name=\"release\" value=\"{}\" size=\"12\"></label> <button type=\"submit\">Filter</button></form>",
        esc(&f.release)
    );
    let _ = write!(
        s,
        "<section id=\"live\" data-live=\"/live/deployments?{}\">{}</section>",
        esc(&f.query()),
        deployments_table(entries, f, problems)
    );
    s
}

/// The table of the deployments page (what its live stream sends).
pub(crate) fn deployments_table(entries: &[HistoryEntry], f: &Filters, problems: &[String]) -> String {
    let mut s = String::new();
    for p in problems {
        s.push_str(&notice("bad", p));
    }
    let mut rows: Vec<&HistoryEntry> = entries.iter().rev().filter(|e| f.keeps(e)).collect();
    if rows.is_empty() {
        s.push_str("<p class=\"empty\">No deployment matches.</p>");
        return s;
    }
    let older = rows.len().saturating_sub(ROWS);
    rows.truncate(ROWS);
    s.push_str(
        "<table class=\"deployments\"><thead><tr><th>Deployment</th><th>Kind</th><th>Strategy</th><th>Release</th>\
         <th>Outcome</th><th>Started</th><th>Duration</th><th>Reason</th></tr></thead><tbody>",
    );
    for e in rows {
        let _ = write!(
            s,
            "<tr data-id=\"{id}\"><td><a href=\"/deployments/{href}\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            crate::output::run_kind(e.kind),
            esc(&e.strategy.to_string()),
            esc(e.release.as_str()),
            badge(e.outcome),
            when(e.started_at_ms),
            secs(e.duration_ms),
            esc(e.reason.as_deref().unwrap_or_default()),
            id = esc(&e.id),
            href = url_part(&e.id),
        );
    }
    s.push_str("</tbody></table>");
    if older > 0 {
        let _ = write!(
            s,
            "<p class=\"empty\">{older} older run(s) not shown: narrow the list with the filters, or see <code>deploykit history</code>.</p>"
        );
    }
    s
}

/// The newest runs a table shows.
const ROWS: usize = 200;

/// A sentence for an event, for the timeline.
fn describe(kind: &EventKind) -> String {
    let on = |i: &Option<deploykit::InstanceId>| i.as_ref().map(|i| format!(" on {i}")).unwrap_or_default();
    let rb = |r: bool| if r { "rollback: " } else { "" };
    match kind {
        EventKind::DeploymentStarted {
            strategy,
            release,
            instances,
            stages,
        } => {
            format!("{strategy} deployment of {release} started: {instances} instance(s), {stages} stage(s)")
        }
        EventKind::StageStarted {
            stage,
            of,
            name,
            rollback,
            ..
        } => {
            format!("{}stage {} of {of} started: {name}", rb(*rollback), stage + 1)
        }
        EventKind::StepStarted {
            step,
            instance,
            rollback,
            ..
        } => format!("{}{step} started{}", rb(*rollback), on(instance)),
        EventKind::StepFinished {
            step,
            instance,
            rollback,
            duration_ms,
            result,
            ..
        } => {
            let r = match result {
                StepResult::Ok => "ok".to_string(),
                StepResult::Warning(w) => format!("warning: {w}"),
                StepResult::Failed(f) => format!("failed: {f}"),
            };
            format!(
                "{}{step} finished{} in {} ({r})",
                rb(*rollback),
                on(instance),
                secs(*duration_ms)
            )
        }
        EventKind::StageFinished {
            name,
            rollback,
            duration_ms,
            failed,
            ..
        } => {
            format!(
                "{}stage {name} finished in {}, {failed} failed",
                rb(*rollback),
                secs(*duration_ms)
            )
        }
        EventKind::InstanceFailed {
            instance,
            step,
            reason,
        } => format!("{instance} failed at {step}: {reason}"),
        EventKind::InstanceRestored { instance, release } => format!(
            "{instance} restored to {}",
            release
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "no release".into())
        ),
        EventKind::InstanceUnrecoverable { instance, reason } => {
            format!("{instance} could not be restored: {reason}")
        }
        EventKind::RollbackStarted { reason, instances } => {
            format!("rollback started ({} instance(s)): {reason}", instances.len())
        }
        EventKind::WarmUpProgress {
            group,
            sent,
            total,
            failed,
        } => {
            format!("warm-up of {group}: {sent} of {total} requests, {failed} failed")
        }
        EventKind::AnalysisResult {
            result, group: Some(g), ..
        } => format!("analysis of treatment {g}: {}", result.without_stage()),
        EventKind::AnalysisResult {
            stage,
            weight,
            result,
            ..
        } => format!("analysis at stage {stage} ({weight} %): {result}"),
        EventKind::StageProgress {
            stage,
            of,
            weight,
            percent,
            ..
        } => {
            format!("canary stage {stage} of {of} at {weight} %: {percent} % of its time held")
        }
        EventKind::AwaitingPromotion { stage, weight, .. } => {
            format!("canary stage {stage} at {weight} % waits for promotion")
        }
        EventKind::Promoted { stage } => format!("canary stage {stage} promoted"),
        EventKind::ReleaseBackedUp { group, releases } => {
            format!("releases of {group} backed up ({} instance(s))", releases.len())
        }
        EventKind::Warning { instance, message } => format!("warning{}: {message}", on(instance)),
        EventKind::CanaryUnhealthy {
            stage,
            weight,
            instance,
            failures,
            detail,
        } => format!(
            "canary {instance} failed {failures} health probe(s) in a row at stage {stage} ({weight} %): {detail}"
        ),
        EventKind::DeploymentFinished {
            outcome,
            succeeded,
            failed,
            duration_ms,
            reason,
        } => format!(
            "finished: {} in {}, {succeeded} succeeded, {failed} failed{}",
            HistoryOutcome::from(*outcome),
            secs(*duration_ms),
            reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
        ),
        _ => "an event this dashboard does not describe".into(),
    }
}

fn event_class(kind: &EventKind) -> &'static str {
    match kind {
        EventKind::StepFinished {
            result: StepResult::Failed(_),
            ..
        }
        | EventKind::InstanceFailed { .. }
        | EventKind::InstanceUnrecoverable { .. }
        | EventKind::CanaryUnhealthy { .. }
        | EventKind::RollbackStarted { .. } => "bad",
        EventKind::StepFinished {
            result: StepResult::Warning(_),
            ..
        }
        | EventKind::Warning { .. } => "warn",
        EventKind::AwaitingPromotion { .. } => "wait",
        _ => "",
    }
}

/// What the deployment page needs besides the journal.
#[derive(Debug, Clone)]
pub(crate) struct RunView<'a> {
    pub(crate) journal: &'a JournalSummary,
    pub(crate) entry: HistoryEntry,
    /// Other runs acting on this deployment (resumes, rollbacks).
    pub(crate) related: Vec<HistoryEntry>,
    pub(crate) viewer: Viewer,
    /// A notice to show (after an action).
    pub(crate) notice: Option<(String, String)>,
}

/// One deployment: the summary above, the live part below.
pub(crate) fn deployment(v: &RunView<'_>) -> String {
    let e = &v.entry;
    let mut s = String::new();
    if let Some((class, text)) = &v.notice {
        s.push_str(&notice(class, text));
    }
    let _ = write!(
        s,
        "<dl class=\"summary\"><dt>Kind</dt><dd>{}</dd><dt>Strategy</dt><dd>{}</dd><dt>Release</dt><dd>{}</dd><dt>Started</dt><dd>{}</dd><dt>Host</dt><dd>{}</dd>",
        crate::output::run_kind(e.kind),
        esc(&e.strategy.to_string()),
        esc(e.release.as_str()),
        when(e.started_at_ms),
        esc(&v.journal.header.host)
    );
    if let Some(c) = &e.commit {
        let _ = write!(s, "<dt>Commit</dt><dd><code>{}</code></dd>", esc(&c.sha));
    }
    s.push_str("</dl>");
    if !v.related.is_empty() {
        s.push_str("<p>Related runs: ");
        for r in &v.related {
            let _ = write!(
                s,
                "<a href=\"/deployments/{}\">{} ({})</a> ",
                url_part(&r.id),
                esc(&r.id),
                crate::output::run_kind(r.kind)
            );
        }
        s.push_str("</p>");
    }
    let _ = write!(
        s,
        "<section id=\"live\" data-live=\"/live/deployments/{}\">{}</section>",
        url_part(&e.id),
        deployment_live(v)
    );
    s
}

/// The part of a deployment's page that its live stream replaces.
pub(crate) fn deployment_live(v: &RunView<'_>) -> String {
    let e = &v.entry;
    let j = v.journal;
    let mut s = String::new();
    let _ = write!(
        s,
        "<p class=\"state\">Outcome: <span id=\"outcome\">{}</span> after <span class=\"num\">{}</span>{}</p>",
        badge(e.outcome),
        secs(e.duration_ms),
        e.reason.as_ref().map(|r| format!(": {}", esc(r))).unwrap_or_default()
    );
    // Progress: the stage now, and the last canary progress.
    let mut stage_now = None;
    let mut progress = None;
    let mut weights = Vec::new();
    let mut checks = Vec::new();
    let mut failed_checks = Vec::new();
    let mut instances: BTreeMap<String, (String, &'static str)> = BTreeMap::new();
    for ev in &j.events {
        match &ev.kind {
            EventKind::StageStarted {
                stage,
                of,
                name,
                rollback,
                ..
            } => stage_now = Some((*stage + 1, *of, name.clone(), *rollback)),
            EventKind::StageProgress {
                stage,
                of,
                weight,
                percent,
                ..
            } => {
                progress = Some((*stage, *of, *weight, *percent));
                weights.push((ev.elapsed_ms, *weight));
            }
            EventKind::AwaitingPromotion { weight, .. } => weights.push((ev.elapsed_ms, *weight)),
            EventKind::AnalysisResult {
                stage,
                weight,
                result,
                measurements,
                group,
                ..
            } => {
                // A treatment's check holds no canary stage or share.
                let (stage, weight, text) = match group {
                    Some(g) => (
                        format!("treatment {g}"),
                        "–".to_owned(),
                        result.without_stage().to_string(),
                    ),
                    None => {
                        weights.push((ev.elapsed_ms, *weight));
                        (stage.to_string(), format!("{weight} %"), result.to_string())
                    }
                };
                checks.push(check_point(ev.elapsed_ms, result, measurements));
                failed_checks.push((
                    ev.elapsed_ms,
                    stage,
                    weight,
                    result.clone(),
                    text,
                    measurements.as_slice(),
                ));
            }
            EventKind::StepStarted {
                step,
                instance: Some(i),
                rollback,
                ..
            } => {
                let what = format!("{}{step}…", if *rollback { "rollback " } else { "" });
                instances.insert(i.to_string(), (what, "warn"));
            }
            EventKind::StepFinished {
                step,
                instance: Some(i),
                rollback,
                result,
                ..
            } => {
                let (what, class) = match result {
                    StepResult::Ok => (format!("{step} ok"), "ok"),
                    StepResult::Warning(w) => (format!("{step}: {w}"), "warn"),
                    StepResult::Failed(f) => (format!("{step} failed: {f}"), "bad"),
                };
                let what = format!("{}{what}", if *rollback { "rollback " } else { "" });
                instances.insert(i.to_string(), (what, class));
            }
            EventKind::InstanceRestored { instance, release } => {
                let r = release
                    .as_ref()
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "no release".into());
                instances.insert(instance.to_string(), (format!("restored to {r}"), "warn"));
            }
            EventKind::InstanceUnrecoverable { instance, reason } => {
                instances.insert(instance.to_string(), (format!("unrecoverable: {reason}"), "bad"));
            }
            _ => {}
        }
    }
    if let Some((n, of, name, rollback)) = &stage_now {
        let _ = write!(
            s,
            "<p class=\"stage\" id=\"stage\">{}Stage {n} of {of}: {}</p>",
            if *rollback { "Rollback: " } else { "" },
            esc(name)
        );
    }
    if let Some((stage, of, weight, percent)) = progress {
        let _ = write!(
            s,
            "<p>Canary stage {stage} of {of} at <strong id=\"weight\">{weight} %</strong> of traffic; <progress max=\"100\" value=\"{percent}\">{percent} %</progress> {percent} % of the stage held</p>"
        );
    }
    if e.outcome == HistoryOutcome::InProgress {
        s.push_str(&actions(v));
    }
    let end = j.last_elapsed_ms().max(e.duration_ms);
    if !weights.is_empty() {
        s.push_str("<h2>Canary weight</h2>");
        s.push_str(&svg::weight_chart(&weights, end));
    }
    if !checks.is_empty() {
        s.push_str("<h2>Analysis</h2>");
        s.push_str(&svg::checks_chart(&checks, end));
        s.push_str("<table class=\"checks\"><thead><tr><th>At</th><th>Stage</th><th>Weight</th><th>Result</th><th>Measured (limit)</th></tr></thead><tbody>");
        for (at, stage, weight, r, text, measured) in &failed_checks {
            let class = match r {
                CheckOutcome::Pass => "ok",
                CheckOutcome::Fail { .. } => "bad",
                _ => "warn",
            };
            let _ = write!(
                s,
                "<tr class=\"{class}\"><td class=\"num\">{}</td><td>{}</td><td>{weight}</td><td>{}</td><td>{}</td></tr>",
                secs(*at),
                esc(stage),
                esc(text),
                measured_text(measured)
            );
        }
        s.push_str("</tbody></table>");
    }
    if !instances.is_empty() {
        s.push_str("<h2>Instances</h2><table class=\"instances\"><thead><tr><th>Instance</th><th>Last step</th></tr></thead><tbody>");
        for (id, (what, class)) in &instances {
            let _ = write!(
                s,
                "<tr><td>{}</td><td class=\"{class}\">{}</td></tr>",
                esc(id),
                esc(what)
            );
        }
        s.push_str("</tbody></table>");
    }
    s.push_str("<h2>Timeline</h2>");
    let lines: Vec<&Event> = timeline(&j.events).collect();
    let hidden = lines.len().saturating_sub(TIMELINE);
    if hidden > 0 {
        let _ = write!(
            s,
            "<p class=\"empty\">{hidden} earlier event(s) not shown: the journal <code>{}</code> holds them all.</p>",
            esc(&j.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
        );
    }
    s.push_str("<ol class=\"timeline\">");
    for ev in &lines[hidden..] {
        let _ = write!(
            s,
            "<li class=\"{}\"><span class=\"num\">{}</span> {}</li>",
            event_class(&ev.kind),
            secs(ev.elapsed_ms),
            esc(&describe(&ev.kind))
        );
    }
    s.push_str("</ol>");
    s
}

/// The timeline's last lines shown: a run of thousands of instances has
/// hundreds of thousands of events, which no page should carry.
const TIMELINE: usize = 400;

/// The events worth a line: step starts are left out (each has its end).
fn timeline(events: &[Event]) -> impl Iterator<Item = &Event> {
    events
        .iter()
        .filter(|e| !matches!(e.kind, EventKind::StepStarted { .. }))
}

fn actions(v: &RunView<'_>) -> String {
    let waiting = v.journal.awaiting_promotion();
    let id = url_part(&v.entry.id);
    let mut s = match waiting {
        Some(stage) => notice(
            "wait",
            &format!("Canary stage {stage} waits for a manual promotion."),
        ),
        None => String::new(),
    };
    s.push_str(&match v.viewer {
        Viewer::ReadOnly => String::new(),
        Viewer::Anonymous => format!(
            "<p class=\"actions\">{}<a href=\"/login\">Sign in</a> to promote or abort.</p>",
            if waiting.is_some() {
                "The canary waits for a promotion. "
            } else {
                ""
            }
        ),
        Viewer::SignedIn => {
            let mut s = String::from("<div class=\"actions\">");
            if let Some(stage) = waiting {
                let _ = write!(
                    s,
                    "<form method=\"post\" action=\"/deployments/{id}/promote\" class=\"inline\"><button type=\"submit\" id=\"promote\" class=\"primary\">Promote canary stage {stage}</button></form> "
                );
            }
            let _ = write!(
                s,
                "<form method=\"post\" action=\"/deployments/{id}/abort\" class=\"inline\"><button type=\"submit\" id=\"abort\" class=\"danger\">Abort and roll back</button></form></div>"
            );
            s
        }
    });
    s
}

/// One instance on the fleet page.
#[derive(Debug, Clone)]
pub(crate) struct InstanceRow {
    pub(crate) id: String,
    pub(crate) group: String,
    pub(crate) address: String,
    pub(crate) release: String,
    pub(crate) health: String,
    pub(crate) healthy: bool,
    /// `None` when the balancer cannot tell.
    pub(crate) in_rotation: Option<bool>,
}

/// The fleet page.
pub(crate) fn fleet(rows: &[InstanceRow], live: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(l) = live {
        let _ = write!(s, "<p>Live environment: <strong>{}</strong></p>", esc(l));
    }
    let mut by_release: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows {
        *by_release.entry(r.release.as_str()).or_default() += 1;
    }
    s.push_str("<p class=\"releases\">");
    for (release, n) in &by_release {
        let _ = write!(s, "<span class=\"badge\">{}: {n}</span> ", esc(release));
    }
    s.push_str("</p><table class=\"fleet\"><thead><tr><th>Instance</th><th>Group</th><th>Address</th><th>Release</th><th>Health</th><th>Rotation</th></tr></thead><tbody>");
    for r in rows {
        let rotation = match r.in_rotation {
            Some(true) => "in",
            Some(false) => "out",
            None => "unknown",
        };
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{rotation}</td></tr>",
            esc(&r.id),
            esc(&r.group),
            esc(&r.address),
            esc(&r.release),
            if r.healthy { "ok" } else { "bad" },
            esc(&r.health)
        );
    }
    s.push_str("</tbody></table>");
    s
}

/// Days shown in the history's per-day chart.
const DAYS: u64 = 14;

/// The history page: the DORA figures, deployments per day, durations as
/// bars, then every run and flag change.
pub(crate) fn history(
    entries: &[HistoryEntry],
    records: &[DeploymentRecord],
    flag_changes: &[deploykit::flags::FlagChangeRecord],
    now_ms: u64,
) -> String {
    let mut s = String::new();
    s.push_str(&dora_panel(records, now_ms));
    // Each day's bar is that day's DORA window, so it counts deployments
    // and failed changes exactly as the figures above and `deploykit stats`.
    let day_ms = 86_400_000;
    let today = now_ms / day_ms;
    let per_day: Vec<(u64, Dora)> = (0..DAYS)
        .rev()
        .map(|ago| {
            let day = today.saturating_sub(ago);
            (day, stats::dora(records, day * day_ms, (day + 1) * day_ms))
        })
        .collect();
    if per_day.iter().any(|(_, d)| d.deployments > 0) {
        let bars: Vec<svg::Bar> = per_day
            .iter()
            .map(|(day, d)| svg::Bar {
                label: format!(
                    "{}: {} deployment(s), {} failed",
                    &utc_datetime(day * 86_400)[..10],
                    d.deployments,
                    d.failed
                ),
                value: d.deployments as f64,
                class: if d.failed > 0 { "warn" } else { "ok" },
            })
            .collect();
        let _ = write!(s, "<h2>Deployments per day, last {DAYS} days</h2>");
        s.push_str(&svg::bars("Deployments per day", &bars, ""));
    }
    let recent: Vec<&HistoryEntry> = entries
        .iter()
        .rev()
        .take(40)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if !recent.is_empty() {
        let bars: Vec<svg::Bar> = recent
            .iter()
            .map(|e| svg::Bar {
                label: format!("{} {} {}: {}", e.id, e.strategy, e.release, e.outcome),
                value: e.duration_ms as f64 / 1000.0,
                class: outcome_class(e.outcome).split(' ').next().unwrap_or("ok"),
            })
            .collect();
        s.push_str("<h2>Duration of the last runs</h2>");
        s.push_str(&svg::bars(
            "Duration of each run, coloured by outcome",
            &bars,
            "s",
        ));
    }
    s.push_str("<h2>Runs</h2>");
    s.push_str(&deployments_table(entries, &Filters::default(), &[]));
    s.push_str("<h2>Flag changes</h2>");
    if flag_changes.is_empty() {
        s.push_str("<p class=\"empty\">No flag change recorded.</p>");
        return s;
    }
    s.push_str("<table class=\"flag-changes\"><thead><tr><th>When</th><th>Who</th><th>Flag</th><th>Action</th><th>Why</th></tr></thead><tbody>");
    for c in flag_changes.iter().rev() {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            when(c.at_ms),
            esc(&c.who),
            esc(&c.flag),
            c.kind.name(),
            esc(c.why.as_deref().unwrap_or_default())
        );
    }
    s.push_str("</tbody></table>");
    s
}

fn compact(v: &Value) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// The flags page: each flag with its forms.
pub(crate) fn flags(
    set: &deploykit::flags::FlagSet,
    viewer: Viewer,
    message: Option<(&str, &str)>,
) -> String {
    use deploykit::flags::FlagState;
    let mut s = String::new();
    if let Some((class, text)) = message {
        s.push_str(&notice(class, text));
    }
    for p in set.problems() {
        s.push_str(&notice("warn", &p.to_string()));
    }
    let can_act = viewer == Viewer::SignedIn;
    if viewer == Viewer::Anonymous {
        s.push_str("<p><a href=\"/login\">Sign in</a> to change flags.</p>");
    }
    let mut any = false;
    for flag in set.flags() {
        any = true;
        let key = flag.key();
        let enabled = flag.state() == FlagState::Enabled;
        let default = flag.default_variant().unwrap_or("(none)");
        let _ = write!(
            s,
            "<article class=\"flag\" id=\"flag-{k}\"><h2>{k} <span class=\"badge {c}\" data-state=\"{st}\">{st}</span></h2><dl><dt>Default variant</dt><dd>{d}</dd><dt>Variants</dt><dd>",
            k = esc(key),
            c = if enabled { "ok" } else { "" },
            st = if enabled { "enabled" } else { "disabled" },
            d = esc(default)
        );
        for (name, value) in flag.variants() {
            let _ = write!(
                s,
                "<code>{}</code> = <code>{}</code> ",
                esc(name),
                esc(&compact(value))
            );
        }
        let targeting = flag
            .raw()
            .get("targeting")
            .filter(|t| !t.as_object().is_some_and(|o| o.is_empty()));
        let _ = write!(
            s,
            "</dd><dt>Targeting</dt><dd>{}</dd></dl>",
            match targeting {
                Some(t) => format!("<code>{}</code>", esc(&compact(t))),
                None => "none: everyone gets the default variant".into(),
            }
        );
        if can_act {
            let action = format!("/flags/{}", url_part(key));
            let _ = write!(
                s,
                "<div class=\"forms\"><form method=\"post\" action=\"{action}\" class=\"inline\"><input type=\"hidden\" name=\"action\" value=\"{a}\"><button type=\"submit\" class=\"toggle\">{b}</button></form> \
                 <form method=\"post\" action=\"{action}\" class=\"inline\"><input type=\"hidden\" name=\"action\" value=\"kill\"><button type=\"submit\" class=\"danger kill\">Kill switch</button></form> \
                 <form method=\"post\" action=\"{action}\" class=\"inline\"><input type=\"hidden\" name=\"action\" value=\"default\"><label>Default <select name=\"variant\">",
                a = if enabled { "disable" } else { "enable" },
                b = if enabled { "Disable" } else { "Enable" },
            );
            for name in flag.variants().keys() {
                let sel = if Some(name.as_str()) == flag.default_variant() {
                    " selected"
                } else {
                    ""
                };
                let _ = write!(s, "<option{sel}>{}</option>", esc(name));
            }
            let _ = write!(
                s,
                "</select></label> <button type=\"submit\">Set</button></form>\
                 <form method=\"post\" action=\"{action}\" class=\"targeting\"><input type=\"hidden\" name=\"action\" value=\"targeting\">\
                 <label>Targeting (JSONLogic; empty removes it)<textarea name=\"targeting\" rows=\"3\" cols=\"70\">{}</textarea></label>\
                 <label>Why <input name=\"reason\" size=\"30\"></label> <button type=\"submit\">Save targeting</button></form></div>",
                esc(&targeting.map(compact).unwrap_or_default())
            );
        }
        s.push_str("</article>");
    }
    if !any {
        s.push_str("<p class=\"empty\">The flag file has no flags.</p>");
    }
    s
}

/// The sign-in page.
pub(crate) fn login(message: Option<&str>) -> String {
    let mut s = String::new();
    if let Some(m) = message {
        s.push_str(&notice("bad", m));
    }
    s.push_str(
        "<p>Reading needs no token on a loopback address. Promoting, aborting and changing flags need the token \
         printed when the dashboard first started (kept in the state directory, file <code>dashboard-token</code>).</p>\
         <form method=\"post\" action=\"/login\"><label>Token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\" size=\"66\"></label> \
         <button type=\"submit\" id=\"sign-in\">Sign in</button></form>",
    );
    s
}

/// One check on the analysis chart: a broken rule at its value ÷ threshold,
/// and a pass at its closest rule's (so a pass near its limit shows as
/// near), from the check's measurements; journals written before
/// measurements were recorded draw a pass at no particular height.
fn check_point(at_ms: u64, result: &CheckOutcome, measurements: &[Measurement]) -> svg::CheckPoint {
    let ratio_of = |value: f64, threshold: f64| match threshold {
        t if t > 0.0 => value / t,
        _ if value > 0.0 => f64::INFINITY,
        _ => 0.0,
    };
    let closest = measurements
        .iter()
        .map(|m| ratio_of(m.value, m.threshold))
        .filter(|r| !r.is_nan())
        .reduce(f64::max);
    let (verdict, ratio) = match result {
        CheckOutcome::Fail { value, threshold, .. } => (
            svg::Verdict::Fail,
            Some(ratio_of(*value, *threshold).max(closest.unwrap_or(0.0))),
        ),
        CheckOutcome::Pass => (svg::Verdict::Pass, closest),
        _ => (svg::Verdict::Inconclusive, closest),
    };
    svg::CheckPoint {
        at_ms,
        verdict,
        ratio: ratio.map(|r| r.min(100.0)),
    }
}

/// A check's measurements for its table cell: each value and its limit.
fn measured_text(measured: &[Measurement]) -> String {
    if measured.is_empty() {
        return "<span class=\"empty\">not recorded</span>".into();
    }
    measured
        .iter()
        .map(|m| {
            let class = if m.value > m.threshold { "bad" } else { "ok" };
            format!(
                "<span class=\"{class}\">{} {} ({})</span>",
                esc(&m.metric.to_string()),
                figure(m.value),
                figure(m.threshold)
            )
        })
        .collect::<Vec<_>>()
        .join("<br>")
}

/// A measured figure with four significant digits, without an exponent
/// for the usual magnitudes.
fn figure(v: f64) -> String {
    match v.abs() {
        a if a == 0.0 || !a.is_finite() => format!("{v}"),
        a if a >= 1000.0 => format!("{v:.0}"),
        a if a >= 0.0001 => {
            let digits = (3 - a.log10().floor() as i32).max(0) as usize;
            format!("{v:.digits$}")
        }
        _ => format!("{v:.3e}"),
    }
}

/// The four DORA figures over the last [`DORA_WINDOW_MS`], as
/// `deploykit stats` and the `/metrics` gauges compute them.
fn dora_panel(records: &[DeploymentRecord], now_ms: u64) -> String {
    let d = stats::dora(records, now_ms.saturating_sub(DORA_WINDOW_MS), now_ms);
    let days = DORA_WINDOW_MS / 86_400_000;
    let mut s = format!("<h2>DORA, last {days} days</h2><table class=\"dora\" id=\"dora\"><tbody>");
    let frequency = format!(
        "{:.2} a day ({} of {} deployment(s) went live)",
        d.deployments_per_day, d.live, d.deployments
    );
    let lead = match d.lead_time {
        Some(l) => format!(
            "{} median ({} with a commit time; {} to {})",
            human_ms(l.median_ms),
            l.count,
            human_ms(l.min_ms),
            human_ms(l.max_ms)
        ),
        None => "unknown: deploy with --commit SHA --commit-time T to measure it".into(),
    };
    let failure = match d.change_failure_rate {
        Some(r) => format!(
            "{:.1} % ({} of {} failed: rolled back, degraded or interrupted)",
            r * 100.0,
            d.failed,
            d.deployments
        ),
        None => "no deployment ended yet".into(),
    };
    let recovery = match d.recovery_time {
        Some(r) => format!(
            "{} median ({} recovered, {} not yet; {} to {})",
            human_ms(r.median_ms),
            r.count,
            d.unrecovered,
            human_ms(r.min_ms),
            human_ms(r.max_ms)
        ),
        None if d.unrecovered > 0 => format!("{} failed deployment(s) not recovered yet", d.unrecovered),
        None => "no failed deployment".into(),
    };
    for (id, name, value) in [
        ("dora-frequency", "Deployment frequency", frequency),
        ("dora-lead-time", "Lead time for changes", lead),
        ("dora-failure-rate", "Change failure rate", failure),
        ("dora-recovery", "Recovery time", recovery),
    ] {
        let _ = write!(s, "<tr id=\"{id}\"><th>{name}</th><td>{}</td></tr>", esc(&value));
    }
    s.push_str("</tbody></table>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploykit::analysis::AnalysisMetric;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn url_parts_keep_only_unreserved_bytes() {
        assert_eq!(url_part("a b/c?d"), "a%20b%2Fc%3Fd");
        assert_eq!(url_part("deploy-20260101-x_y.z"), "deploy-20260101-x_y.z");
    }

    fn measured(metric: AnalysisMetric, value: f64, threshold: f64) -> Measurement {
        Measurement {
            metric,
            value,
            threshold,
        }
    }

    #[test]
    fn a_pass_is_drawn_at_its_rule_closest_to_the_limit() {
        let m = [
            measured(AnalysisMetric::ErrorRate, 0.002, 0.01),
            measured(AnalysisMetric::LatencyP99, 0.4, 0.5),
        ];
        let p = check_point(7, &CheckOutcome::Pass, &m);
        assert_eq!(p.verdict, svg::Verdict::Pass);
        let r = p.ratio.expect("measured");
        assert!((r - 0.8).abs() < 1e-9, "{r}");
        // A journal from before measurements: a pass without a height.
        assert_eq!(check_point(7, &CheckOutcome::Pass, &[]).ratio, None);
    }

    #[test]
    fn a_treatment_check_reads_as_its_group_not_a_canary_stage() {
        let check = |group: Option<&str>| EventKind::AnalysisResult {
            stage: 2,
            weight: if group.is_some() { 0 } else { 20 },
            result: CheckOutcome::NoData {
                reason: "canary error rate has no data".into(),
            },
            consecutive_inconclusive: 1,
            evidence: Vec::new(),
            measurements: Vec::new(),
            group: group.map(|g| g.parse().unwrap()),
        };
        assert_eq!(
            describe(&check(Some("canary-c"))),
            "analysis of treatment canary-c: no data (canary error rate has no data)"
        );
        assert_eq!(
            describe(&check(None)),
            "analysis at stage 2 (20 %): no data (canary error rate has no data)"
        );
    }

    #[test]
    fn the_checks_table_shows_each_value_and_its_limit() {
        let cell = measured_text(&[
            measured(AnalysisMetric::ErrorRate, 0.0012345, 0.01),
            measured(AnalysisMetric::LatencyP99, 0.75, 0.5),
        ]);
        assert!(
            cell.contains("<span class=\"ok\">canary error rate 0.001234 (0.01000)</span>"),
            "{cell}"
        );
        assert!(
            cell.contains("<span class=\"bad\">canary p99 latency 0.7500 (0.5000)</span>"),
            "{cell}"
        );
        assert!(measured_text(&[]).contains("not recorded"));
    }
}
