//! `deploykit top`: a live, read-only terminal view of the newest run —
//! stages, instances, canary weights and the last analysis values —
//! redrawn from its journal twice a second. It reads the state directory
//! only (never the lock, the control file or an instance), so it can run
//! beside a deployment in any terminal, an SSH session included; `q` quits.

use std::io::IsTerminal;
use std::time::Duration;

use clap::Args;
use deploykit::analysis::CheckOutcome;
use deploykit::state::{utc_datetime, HistoryOutcome, StateBackend};
use deploykit::stats::{DeploymentRecord, InstanceFate};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Gauge, Paragraph, Row, Table};
use ratatui::Frame;

use crate::cmd::Ctx;
use crate::exit;
use crate::stats::human_ms;

/// `deploykit top`.
#[derive(Debug, Args)]
pub(crate) struct TopArgs {
    /// How often to read the journal again, e.g. `500ms`, `2s`.
    #[arg(long, default_value = "500ms", value_parser = parse_interval)]
    interval: Duration,
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let d = deploykit::parse_duration("interval", text).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(50) || d > Duration::from_secs(60) {
        return Err(format!("{text} is outside 50ms to 60s"));
    }
    Ok(d)
}

/// What one frame shows: the newest run, or why there is none.
#[derive(Debug)]
pub(crate) struct View {
    app: String,
    run: Option<DeploymentRecord>,
    /// A journal that could not be read, said once per frame.
    problem: Option<String>,
}

impl View {
    /// The newest run of `app` in `state` as its journal says now.
    pub(crate) async fn load(app: &str, state: &dyn StateBackend) -> Self {
        let app = app.to_string();
        let read = async { Ok::<_, deploykit::Error>((state.latest().await?, state.holder().await?)) }.await;
        match read {
            Ok((latest, holder)) => Self {
                app,
                run: latest.map(|j| DeploymentRecord::from_journal(&j, holder.as_ref())),
                problem: None,
            },
            Err(e) => Self {
                app,
                run: None,
                problem: Some(e.to_string()),
            },
        }
    }
}

/// `deploykit top`.
pub(crate) fn top(ctx: Ctx, args: TopArgs) -> anyhow::Result<u8> {
    if !std::io::stdout().is_terminal() {
        eprintln!(
            "deploykit: error: top draws on a terminal; from a script use `deploykit status` or `deploykit stats --json`"
        );
        return Ok(exit::BAD_INPUT);
    }
    let mut terminal = ratatui::try_init()?;
    let rt = crate::cmd::runtime()?;
    let result = follow(&mut terminal, &rt, &ctx, args.interval);
    ratatui::restore();
    result?;
    Ok(exit::SUCCESS)
}

fn follow(
    terminal: &mut ratatui::DefaultTerminal,
    rt: &tokio::runtime::Runtime,
    ctx: &Ctx,
    interval: Duration,
) -> anyhow::Result<()> {
    loop {
        let view = rt.block_on(View::load(&ctx.cfg.raw.app, ctx.backend.as_ref()));
        terminal.draw(|f| draw(f, &view))?;
        // Keys are read as they come; the journal once per interval.
        let until = std::time::Instant::now() + interval;
        while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(k) = event::read()? {
                let ctrl_c = k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c');
                if k.kind == KeyEventKind::Press
                    && (matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c)
                {
                    return Ok(());
                }
            }
        }
    }
}

fn outcome_style(o: HistoryOutcome) -> Style {
    match o {
        HistoryOutcome::Succeeded => Style::new().fg(Color::Green),
        HistoryOutcome::InProgress => Style::new().fg(Color::Cyan),
        HistoryOutcome::Degraded | HistoryOutcome::RolledBack => Style::new().fg(Color::Yellow),
        HistoryOutcome::RollbackFailed | HistoryOutcome::Interrupted => {
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
        }
    }
}

/// Draws one frame of `view`.
pub(crate) fn draw(f: &mut Frame<'_>, view: &View) {
    let title = format!(" deploykit top · {} · read-only · q quits ", view.app);
    let Some(run) = &view.run else {
        let text = view.problem.clone().unwrap_or_else(|| {
            "no deployment recorded yet: waiting for one (deploykit deploy RELEASE)".into()
        });
        f.render_widget(
            Paragraph::new(text).block(Block::default().borders(Borders::ALL).title(title)),
            f.area(),
        );
        return;
    };
    let canary = run.canary_weight.is_some();
    let analysis_rows = run.last_measurements().len().max(1) as u16 + 3;
    let [head, traffic, stages, instances, analysis] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Length(if canary { 3 } else { 0 }),
        Constraint::Min(4),
        Constraint::Min(4),
        Constraint::Length(if run.checks.is_empty() { 0 } else { analysis_rows }),
    ])
    .areas(f.area());

    let mut lines = vec![Line::from(vec![
        format!(
            "{} {} · {} of {} · ",
            crate::output::run_kind(run.kind),
            run.id,
            run.strategy,
            run.release
        )
        .into(),
        ratatui::text::Span::styled(run.outcome.to_string(), outcome_style(run.outcome)),
        format!(
            " · {} · started {} UTC",
            human_ms(run.duration_ms),
            utc_datetime(run.started_at_ms / 1000)
        )
        .into(),
    ])];
    if let Some(stage) = run.awaiting_promotion {
        lines.push(Line::styled(
            format!("canary stage {stage} waits for promotion: `deploykit promote` or `deploykit abort`"),
            Style::new().fg(Color::Yellow),
        ));
    } else if let Some(why) = run.rollback_reason.as_ref().or(run.reason.as_ref()) {
        lines.push(Line::styled(why.clone(), Style::new().fg(Color::Yellow)));
    }
    f.render_widget(
        Paragraph::new(lines).block(Block::default().borders(Borders::ALL).title(title)),
        head,
    );

    if let Some(weight) = run.canary_weight {
        let label = match run.canary_stage {
            Some((stage, of)) => format!(
                "canary {weight}% · stable {}% · stage {stage} of {of}",
                100 - weight
            ),
            None => format!("canary {weight}% · stable {}%", 100 - weight),
        };
        f.render_widget(
            Gauge::default()
                .block(Block::default().borders(Borders::ALL).title(" traffic "))
                .gauge_style(Style::new().fg(Color::Cyan))
                .percent(u16::from(weight.min(100)))
                .label(label),
            traffic,
        );
    }

    // Planned stages not started yet come after the rollout's, as pending.
    let started = |i: usize| run.stages.iter().any(|s| !s.rollback && s.index == i);
    let pending = run
        .planned_stages
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            !started(*i) && run.outcome == HistoryOutcome::InProgress && run.rollback_reason.is_none()
        })
        .map(|(i, name)| {
            Row::new(vec![
                format!("stage {}/{}", i + 1, run.planned_stages.len()),
                name.clone(),
                String::new(),
                "pending".to_string(),
            ])
            .style(Style::new().fg(Color::DarkGray))
        });
    let stage_rows: Vec<Row<'_>> = run
        .stages
        .iter()
        .map(|s| {
            let state = match s.duration_ms {
                Some(d) if s.failed > 0 => format!("done in {}, {} failed", human_ms(d), s.failed),
                Some(d) => format!("done in {}", human_ms(d)),
                None if run.outcome == HistoryOutcome::InProgress => "running".into(),
                None => "stopped".into(),
            };
            Row::new(vec![
                format!(
                    "{}stage {}/{}",
                    if s.rollback { "rollback " } else { "" },
                    s.index + 1,
                    s.of
                ),
                s.name.clone(),
                format!("{} instance(s)", s.instances.len()),
                state,
            ])
        })
        .chain(pending)
        .collect();
    let stage_rows = if stage_rows.is_empty() {
        vec![Row::new(vec!["no stage started yet".to_string()])]
    } else {
        stage_rows
    };
    f.render_widget(
        Table::new(
            stage_rows,
            [
                Constraint::Length(20),
                Constraint::Percentage(40),
                Constraint::Length(14),
                Constraint::Percentage(40),
            ],
        )
        .block(Block::default().borders(Borders::ALL).title(" stages ")),
        stages,
    );

    let instance_rows: Vec<Row<'_>> = run
        .instances
        .iter()
        .map(|i| {
            let style = match i.fate {
                InstanceFate::Updated => Style::new().fg(Color::Green),
                InstanceFate::InProgress => Style::new().fg(Color::Cyan),
                InstanceFate::Restored => Style::new().fg(Color::Yellow),
                InstanceFate::Unrecoverable => Style::new().fg(Color::Red),
                InstanceFate::Untouched => Style::new(),
            };
            Row::new(vec![
                i.instance.to_string(),
                i.previous.as_ref().map_or("none", |p| p.as_str()).to_string(),
                i.release_after(run).map_or("none", |p| p.as_str()).to_string(),
                i.fate.to_string(),
                i.failure.clone().unwrap_or_default(),
            ])
            .style(style)
        })
        .collect();
    f.render_widget(
        Table::new(
            instance_rows,
            [
                Constraint::Length(20),
                Constraint::Length(14),
                Constraint::Length(14),
                Constraint::Length(14),
                Constraint::Min(10),
            ],
        )
        .header(
            Row::new(vec!["instance", "before", "after", "state", "failure"])
                .style(Style::new().add_modifier(Modifier::BOLD)),
        )
        .block(Block::default().borders(Borders::ALL).title(" instances ")),
        instances,
    );

    if let Some(last) = run.checks.last() {
        let result = match (&last.outcome, &last.group) {
            (CheckOutcome::Pass, _) => "pass".to_string(),
            (other, Some(_)) => other.without_stage().to_string(),
            (other, None) => other.to_string(),
        };
        // A treatment's check holds no canary stage or share.
        let subject = match &last.group {
            Some(g) => format!("treatment {g}"),
            None => format!("stage {} at {}%", last.stage, last.weight),
        };
        let rows: Vec<Row<'_>> = run
            .last_measurements()
            .into_iter()
            .map(|m| {
                let over = m.value > m.threshold;
                Row::new(vec![
                    m.metric.to_string(),
                    format!("{:.4}", m.value),
                    format!("{:.4}", m.threshold),
                    if over { "over".into() } else { "within".to_string() },
                ])
                .style(if over {
                    Style::new().fg(Color::Red)
                } else {
                    Style::new()
                })
            })
            .collect();
        f.render_widget(
            Table::new(
                rows,
                [
                    Constraint::Percentage(50),
                    Constraint::Length(12),
                    Constraint::Length(12),
                    Constraint::Length(8),
                ],
            )
            .header(
                Row::new(vec!["rule", "value", "limit", ""]).style(Style::new().add_modifier(Modifier::BOLD)),
            )
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(format!(" last analysis: {subject}, {result} ")),
            ),
            analysis,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deploykit::state::{JournalHeader, JournalSummary, RunKind};
    use deploykit::{Event, EventKind, InstanceId, ReleaseId, StrategyKind};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(view: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(110, 30)).unwrap();
        t.draw(|f| draw(f, view)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn a_waiting_canary_shows_its_stage_weight_and_instances() {
        let previous = [(
            InstanceId::new("web-1").unwrap(),
            Some(ReleaseId::new("v1").unwrap()),
        )]
        .into();
        let header = JournalHeader::new(
            "d-v2",
            "shop",
            RunKind::Deploy,
            StrategyKind::Canary,
            ReleaseId::new("v2").unwrap(),
            previous,
        );
        let ev = |kind| Event {
            elapsed_ms: 1500,
            deployment: "d-v2".into(),
            kind,
        };
        let j = JournalSummary {
            path: "/j".into(),
            header: header.clone(),
            events: vec![
                ev(EventKind::StageStarted {
                    stage: 0,
                    of: 2,
                    name: "canary 20%".into(),
                    instances: vec![InstanceId::new("web-1").unwrap()],
                    rollback: false,
                }),
                ev(EventKind::AwaitingPromotion {
                    stage: 1,
                    weight: 20,
                    timeout_ms: None,
                }),
            ],
            finished: None,
        };
        let holder = deploykit::state::Holder {
            pid: header.pid,
            pid_start: None,
            host: header.host.clone(),
            started_at_ms: 0,
            purpose: "deploy".into(),
        };
        let view = View {
            app: "shop".into(),
            run: Some(DeploymentRecord::from_journal(&j, Some(&holder))),
            problem: None,
        };
        let s = screen(&view);
        for part in [
            "deploykit top · shop",
            "deploy d-v2 · canary of v2 · in progress",
            "canary stage 1 waits for promotion",
            "canary 20% · stable 80%",
            "stage 1/2",
            "canary 20%",
            "running",
            "web-1",
        ] {
            assert!(s.contains(part), "missing {part:?} in:\n{s}");
        }
    }

    #[test]
    fn no_journal_says_it_waits_for_one() {
        let s = screen(&View {
            app: "shop".into(),
            run: None,
            problem: None,
        });
        assert!(s.contains("no deployment recorded yet"), "{s}");
    }

    #[test]
    fn the_interval_is_bounded() {
        assert_eq!(parse_interval("2s").unwrap(), Duration::from_secs(2));
        assert!(parse_interval("1ms").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
