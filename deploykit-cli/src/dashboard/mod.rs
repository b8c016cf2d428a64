//! `deploykit dashboard`: the deployments, one deployment live, the fleet,
//! the history and the flags in a browser, served by axum from the state
//! directory and the flag file. Every page is plain server-rendered HTML
//! and SVG; one small script of our own (no CDN: the machine may be
//! offline) swaps in the live parts that server-sent events carry.
//!
//! Promote and abort go through the state directory's control file, as
//! `deploykit promote` and `abort` do; flag changes go through the
//! `FlagStore`, as `deploykit flags set` does (validated as a whole file,
//! atomic, journaled). Who may do what is in [`auth`].

mod auth;
mod page;
mod svg;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use deploykit::flags::{FlagChange, FlagChangeKind, FlagStore};
use deploykit::recovery::{self, PromotionRecord};
use deploykit::state::{
    ControlCommand, HistoryEntry, JournalSummary, LocalBackend, StateBackend as _, StateDir, StateLock,
};

use crate::cmd::Global;
use crate::config::{self, Loaded};
use crate::exit;
use auth::{Credential, Gate, Need, Refusal};
use page::Viewer;

/// `deploykit dashboard`.
#[derive(Debug, Args)]
pub(crate) struct DashboardArgs {
    /// The address to serve on. Off loopback, every page needs the token.
    #[arg(long, default_value = "127.0.0.1:3100")]
    listen: SocketAddr,
    /// Serve no actions at all and keep no token (loopback only).
    #[arg(long)]
    read_only: bool,
}

/// The token file in the state directory.
const TOKEN_FILE: &str = "dashboard-token";

/// What every handler reads.
#[derive(Clone)]
struct App {
    cfg: Arc<Loaded>,
    state: StateDir,
    flags: FlagStore,
    gate: Gate,
    cache: Arc<EntryCache>,
    /// Cancelled on Ctrl-C: the live streams end, so the graceful shutdown
    /// (which waits for every connection) does not wait for open tabs.
    stop: tokio_util::sync::CancellationToken,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("app", &self.state.app())
            .finish_non_exhaustive()
    }
}

/// Starts the dashboard and serves until Ctrl-C.
pub(crate) fn run(g: Global, args: DashboardArgs) -> anyhow::Result<u8> {
    let cfg = config::load(&g.config)?;
    if cfg.raw.state.backend == config::StateBackendKind::Etcd {
        // It reads this machine's state directory, where an etcd setup
        // keeps no journal: it would show no deployment and promote none.
        return Err(deploykit::Error::invalid(
            "state.backend",
            "the dashboard reads this machine's state directory, and with backend = \"etcd\" the deployments \
             are in etcd: it would show none of them. `deploykit status`, `history`, `stats`, `top` and \
             `promote` read and act on etcd",
        )
        .into());
    }
    if args.read_only && !args.listen.ip().is_loopback() {
        return Err(deploykit::Error::invalid(
            "--listen",
            format!(
                "{} is not a loopback address and --read-only keeps no token: anyone who reaches it would read every deployment; drop --read-only (every page then needs the token) or listen on 127.0.0.1",
                args.listen
            ),
        )
        .into());
    }
    let flags = crate::flags::FlagsCtx::load(&g, None)?.store;
    let state = if args.read_only {
        StateDir::at(cfg.state_base(), &cfg.raw.app)?
    } else {
        StateDir::open(cfg.state_base(), &cfg.raw.app)?
    };
    let token = match args.read_only {
        true => None,
        false => {
            let path = state.root().join(TOKEN_FILE);
            let (token, created) = auth::load_or_create(&path)?;
            Some((token, created, path))
        }
    };
    crate::cmd::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener.local_addr()?;
        outln!("dashboard of {} on http://{addr}", cfg.raw.app);
        match &token {
            Some((t, true, path)) => outln!(
                "actions (promote, abort, flag changes) need this token, shown only now and kept in {}:\n{}",
                path.display(),
                t.secret()
            ),
            Some((_, false, path)) => outln!(
                "actions (promote, abort, flag changes) need the token kept in {}",
                path.display()
            ),
            None => outln!("read-only: no action is served"),
        }
        let app = App {
            cfg: Arc::new(cfg),
            state,
            flags,
            gate: Gate {
                token: token.map(|(t, _, _)| t),
                addr,
            },
            cache: Arc::default(),
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let stop = app.stop.clone();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                let _ = tokio::signal::ctrl_c().await;
                stop.cancel();
            }
        });
        axum::serve(listener, router(app))
            .with_graceful_shutdown(stop.cancelled_owned())
            .await?;
        Ok(exit::SUCCESS)
    })
}

fn router(app: App) -> Router {
    Router::new()
        .route("/", get(deployments))
        .route("/deployments/{id}", get(deployment))
        .route("/deployments/{id}/{action}", post(control))
        .route("/live/deployments", get(live_deployments))
        .route("/live/deployments/{id}", get(live_deployment))
        .route("/fleet", get(fleet))
        .route("/history", get(history))
        .route("/flags", get(flags))
        .route("/metrics", get(metrics))
        .route("/flags/{key}", post(change_flag))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/{name}", get(asset))
        .route("/favicon.ico", get(favicon))
        .fallback(not_found)
        .with_state(app)
}

/// Headers every answer carries: no framing, no sniffing, scripts and
/// styles only from this server.
fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    r
}

fn html(status: StatusCode, body: String) -> Response {
    secure(
        (
            status,
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
    )
}

fn refused(r: &Refusal) -> Response {
    let mut resp = html(
        r.status(),
        page::layout("Refused", Viewer::Anonymous, &page::notice("bad", &r.to_string())),
    );
    if r.status() == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"deploykit\""),
        );
    }
    resp
}

fn see_other(to: &str) -> Response {
    secure((StatusCode::SEE_OTHER, [(header::LOCATION, to.to_owned())]).into_response())
}

impl App {
    /// The request's viewer, or the refusal to answer with.
    fn viewer(&self, headers: &HeaderMap, need: Need) -> Result<Viewer, Refusal> {
        match self.gate.check(headers, need) {
            Ok(_) if self.gate.token.is_none() => Ok(Viewer::ReadOnly),
            Ok(Some(_)) => Ok(Viewer::SignedIn),
            Ok(None) => Ok(Viewer::Anonymous),
            Err(r) => Err(r),
        }
    }
}

/// Runs file reads off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("a dashboard read does not panic")
}

fn internal(e: impl std::fmt::Display) -> Response {
    html(
        StatusCode::INTERNAL_SERVER_ERROR,
        page::layout("Error", Viewer::Anonymous, &page::notice("bad", &e.to_string())),
    )
}

/// The order of the state directory's journals: by sequence number, the
/// unnumbered (older) ones first by start time, then id.
type Order = (Option<u64>, u64, String);

/// The history entries of finished runs, by journal file and length: a
/// finished journal never changes, so the live list re-reads only the
/// running one instead of every journal on each change.
#[derive(Debug, Default)]
struct EntryCache(std::sync::Mutex<std::collections::HashMap<PathBuf, (u64, HistoryEntry, Order)>>);

/// Every run's history entry (oldest first) and the unreadable journals.
fn entries(state: &StateDir, cache: &EntryCache) -> deploykit::Result<(Vec<HistoryEntry>, Vec<String>)> {
    let dir = match std::fs::read_dir(state.journal_dir()) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), Vec::new())),
        Err(e) => {
            return Err(deploykit::Error::io(
                format!("listing {}", state.journal_dir().display()),
                e,
            ))
        }
    };
    let holder = state.holder()?;
    let mut rows: Vec<(Order, HistoryEntry)> = Vec::new();
    let mut problems = Vec::new();
    let mut cached = cache.0.lock().unwrap_or_else(|p| p.into_inner());
    let mut present = std::collections::HashSet::new();
    for entry in dir.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
            continue;
        }
        let len = entry.metadata().map(|m| m.len()).unwrap_or(0);
        present.insert(path.clone());
        if let Some((l, e, o)) = cached.get(&path) {
            if *l == len {
                rows.push((o.clone(), e.clone()));
                continue;
            }
        }
        match JournalSummary::read(&path) {
            Ok(j) => {
                let h = &j.header;
                let order = (h.sequence, h.started_at_ms, h.deployment.clone());
                let e = j.history_entry(holder.as_ref());
                if j.is_finished() {
                    cached.insert(path, (len, e.clone(), order.clone()));
                }
                rows.push((order, e));
            }
            Err(e) => problems.push(e.to_string()),
        }
    }
    cached.retain(|p, _| present.contains(p));
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    problems.sort();
    Ok((rows.into_iter().map(|(_, e)| e).collect(), problems))
}

async fn deployments(State(app): State<App>, headers: HeaderMap, Query(f): Query<page::Filters>) -> Response {
    let viewer = match app.viewer(&headers, Need::Read) {
        Ok(v) => v,
        Err(r) => return refused(&r),
    };
    let state = app.state.clone();
    let cache = app.cache.clone();
    match blocking(move || entries(&state, &cache)).await {
        Ok((e, problems)) => html(
            StatusCode::OK,
            page::layout("Deployments", viewer, &page::deployments(&e, &f, &problems)),
        ),
        Err(e) => internal(e),
    }
}

/// What a deployment's page shows after an action (`?done=promoted`).
#[derive(Debug, Default, serde::Deserialize)]
struct Done {
    #[serde(default)]
    done: String,
}

/// The journal of run `id` alone, found by its file name
/// (`<sequence>-<id>.jsonl`, or `<id>.jsonl` from before sequence numbers):
/// the live stream re-renders it on every change, and reading every other
/// journal each time would cost as much as the whole history.
fn one_journal(state: &StateDir, id: &str) -> deploykit::Result<Option<JournalSummary>> {
    let Ok(dir) = std::fs::read_dir(state.journal_dir()) else {
        return Ok(None);
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) else {
            continue;
        };
        let numbered = stem.split_once('-').is_some_and(|(seq, rest)| {
            rest == id && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit())
        });
        // Journals are regular files; a link is never followed.
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if (numbered || stem == id) && is_file {
            let j = JournalSummary::read(&entry.path())?;
            if j.header.deployment == id {
                return Ok(Some(j));
            }
        }
    }
    Ok(None)
}

/// The live part of run `id`'s page.
fn render_live(state: &StateDir, id: &str, viewer: Viewer) -> deploykit::Result<Option<String>> {
    let Some(journal) = one_journal(state, id)? else {
        return Ok(None);
    };
    let holder = state.holder()?;
    let v = page::RunView {
        journal: &journal,
        entry: journal.history_entry(holder.as_ref()),
        related: Vec::new(),
        viewer,
        notice: None,
    };
    Ok(Some(page::deployment_live(&v)))
}

/// Run `id`'s whole page.
fn render_run(state: &StateDir, id: &str, viewer: Viewer, done: &str) -> deploykit::Result<Option<String>> {
    let scan = state.scan_journals()?;
    let holder = state.holder()?;
    let Some(journal) = scan.journals.iter().find(|j| j.header.deployment == id) else {
        return Ok(None);
    };
    let related = scan
        .journals
        .iter()
        .filter(|j| j.header.acts_on.as_deref() == Some(id))
        .map(|j| j.history_entry(holder.as_ref()))
        .collect();
    let notice = match done {
        "promoted" => Some((
            "ok".to_owned(),
            "Promoted: the canary goes on to its next stage.".to_owned(),
        )),
        "aborted" => Some((
            "warn".to_owned(),
            "Aborted: the deployment rolls back.".to_owned(),
        )),
        "recorded" => Some((
            "ok".to_owned(),
            "Promotion recorded: no deploykit runs this deployment; `deploykit deploy --resume` goes on past the wait."
                .to_owned(),
        )),
        _ => None,
    };
    let v = page::RunView {
        journal,
        entry: journal.history_entry(holder.as_ref()),
        related,
        viewer,
        notice,
    };
    Ok(Some(page::layout(
        &format!("Deployment {id}"),
        viewer,
        &page::deployment(&v),
    )))
}

async fn deployment(
    State(app): State<App>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(d): Query<Done>,
) -> Response {
    let viewer = match app.viewer(&headers, Need::Read) {
        Ok(v) => v,
        Err(r) => return refused(&r),
    };
    let state = app.state.clone();
    let id2 = id.clone();
    match blocking(move || render_run(&state, &id2, viewer, &d.done)).await {
        Ok(Some(body)) => html(StatusCode::OK, body),
        Ok(None) => html(
            StatusCode::NOT_FOUND,
            page::layout(
                "Not found",
                viewer,
                &page::notice("bad", &format!("no deployment {id} is recorded")),
            ),
        ),
        Err(e) => internal(e),
    }
}

/// A cheap summary of the state directory that changes whenever a journal
/// grows or the lock changes hands: the live streams re-render on change.
fn fingerprint(state: &StateDir) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Ok(dir) = std::fs::read_dir(state.journal_dir()) {
        let mut entries: Vec<(std::ffi::OsString, u64)> = dir
            .flatten()
            .map(|e| (e.file_name(), e.metadata().map(|m| m.len()).unwrap_or(0)))
            .collect();
        entries.sort();
        entries.hash(&mut h);
    }
    if let Ok(Some(holder)) = state.holder() {
        (holder.pid, holder.host, holder.started_at_ms).hash(&mut h);
    }
    h.finish()
}

/// Server-sent events: `render` again each time the state directory
/// changes (polled every 300 ms), the first at once.
fn live(app: App, render: impl Fn(&StateDir) -> Option<String> + Send + Sync + 'static) -> Response {
    let render = Arc::new(render);
    let stream = futures::stream::unfold(None::<u64>, move |last| {
        let state = app.state.clone();
        let render = render.clone();
        let stop = app.stop.clone();
        async move {
            loop {
                if stop.is_cancelled() {
                    return None;
                }
                let s = state.clone();
                let r = render.clone();
                let (fp, body) = blocking(move || {
                    let fp = fingerprint(&s);
                    (fp, (Some(fp) != last).then(|| r(&s)).flatten())
                })
                .await;
                if let Some(body) = body {
                    return Some((
                        Ok::<_, Infallible>(SseEvent::default().event("update").data(body)),
                        Some(fp),
                    ));
                }
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_millis(300)) => {}
                }
            }
        }
    });
    secure(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

async fn live_deployments(
    State(app): State<App>,
    headers: HeaderMap,
    Query(f): Query<page::Filters>,
) -> Response {
    if let Err(r) = app.viewer(&headers, Need::Read) {
        return refused(&r);
    }
    let cache = app.cache.clone();
    live(app, move |state| {
        entries(state, &cache)
            .ok()
            .map(|(e, problems)| page::deployments_table(&e, &f, &problems))
    })
}

async fn live_deployment(State(app): State<App>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let viewer = match app.viewer(&headers, Need::Read) {
        Ok(v) => v,
        Err(r) => return refused(&r),
    };
    live(app, move |state| render_live(state, &id, viewer).ok().flatten())
}

/// Why a control request was not sent.
fn not_controllable(
    state: &StateDir,
    id: &str,
    command: ControlCommand,
) -> deploykit::Result<Option<String>> {
    if state.holder()?.is_none() {
        return Ok(Some(format!(
            "deployment {id} is not running (no deployment holds the lock)"
        )));
    }
    let Some(running) = state.latest()?.filter(|j| !j.is_finished()) else {
        return Ok(Some(format!("deployment {id} is not running")));
    };
    if running.header.deployment != id {
        return Ok(Some(format!(
            "deployment {id} is not the one running ({} is)",
            running.header.deployment
        )));
    }
    if command == ControlCommand::Promote && running.awaiting_promotion().is_none() {
        return Ok(Some(format!(
            "deployment {id} is not waiting for a promotion (only a canary with promotion = \"manual\" waits)"
        )));
    }
    Ok(None)
}

async fn control(
    State(app): State<App>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Response {
    let viewer = match app.viewer(&headers, Need::Act) {
        Ok(v) => v,
        Err(r) => return refused(&r),
    };
    let command = match action.as_str() {
        "promote" => ControlCommand::Promote,
        "abort" => ControlCommand::Abort,
        _ => return not_found().await,
    };
    if command == ControlCommand::Promote {
        let state = app.state.clone();
        match blocking(move || state.holder()).await {
            Err(e) => return internal(e),
            // No process runs it: recorded for its `deploy --resume`, as
            // `deploykit promote` does.
            Ok(None) => return record_promotion(&app, viewer, &id).await,
            Ok(Some(_)) => {}
        }
    }
    let state = app.state.clone();
    let id2 = id.clone();
    let refused = blocking(move || not_controllable(&state, &id2, command)).await;
    let conflict = |text: String| {
        html(
            StatusCode::CONFLICT,
            page::layout(&format!("Deployment {id}"), viewer, &page::notice("bad", &text)),
        )
    };
    match refused {
        Err(e) => return internal(e),
        Ok(Some(why)) => return conflict(why),
        Ok(None) => {}
    }
    let control = app.state.control();
    let seq = match control.send(&id, command) {
        Ok(s) => s,
        Err(e) => return internal(e),
    };
    match control
        .wait_ack(seq, Duration::from_secs(10))
        .await
        .map(|a| a.result)
    {
        Some(r) if r == "promoted" || r == "aborted" => {
            see_other(&format!("/deployments/{}?done={r}", page::url_part(&id)))
        }
        Some(_) => conflict(format!(
            "deployment {id} answered that nothing was waiting for a promotion"
        )),
        None => html(
            StatusCode::GATEWAY_TIMEOUT,
            page::layout(
                &format!("Deployment {id}"),
                viewer,
                &page::notice("bad", &format!("deployment {id} did not acknowledge within 10 s")),
            ),
        ),
    }
}

/// A promotion of deployment `id` while no deploykit process runs it:
/// under the state lock, recorded when the interrupted deployment `id`
/// waited for one (the library's [`recovery::record_promotion`], which
/// `deploykit promote` calls too); refused, recording nothing, otherwise.
async fn record_promotion(app: &App, viewer: Viewer, id: &str) -> Response {
    let conflict = |text: String| {
        html(
            StatusCode::CONFLICT,
            page::layout(&format!("Deployment {id}"), viewer, &page::notice("bad", &text)),
        )
    };
    let backend = LocalBackend::new(app.state.clone());
    let lock = match backend.try_lock("promote").await {
        Ok(StateLock::Acquired(lock)) => lock,
        Ok(StateLock::Held(h)) => {
            return conflict(format!(
                "{h} took the lock of this application meanwhile; reload the page and promote again if the deployment still waits"
            ))
        }
        Err(e) => return internal(e),
    };
    let recorded = recovery::record_promotion(&backend, &lock, Some(id)).await;
    lock.release().await;
    match recorded {
        Err(e) => internal(e),
        Ok(PromotionRecord::Recorded { .. }) => {
            see_other(&format!("/deployments/{}?done=recorded", page::url_part(id)))
        }
        Ok(PromotionRecord::NotWaiting { .. }) => conflict(format!(
            "the interrupted deployment {id} was not waiting for a promotion \
             (only a canary with promotion = \"manual\" and a dark launch wait); \
             `deploykit deploy --resume` continues it, `deploykit rollback` undoes it"
        )),
        Ok(PromotionRecord::OtherDeployment { interrupted }) => conflict(format!(
            "deployment {id} is not running, and the interrupted deployment is {interrupted}"
        )),
        Ok(_) => conflict(format!(
            "deployment {id} is neither running nor interrupted: nothing waits for a promotion"
        )),
    }
}

async fn fleet(State(app): State<App>, headers: HeaderMap) -> Response {
    let viewer = match app.viewer(&headers, Need::Read) {
        Ok(v) => v,
        Err(r) => return refused(&r),
    };
    // The dashboard reads the local state directory (as every page here).
    let store = Arc::new(deploykit::bluegreen_state::FileLiveStore::new(
        app.state.live_record_path(),
    ));
    let built = match crate::wire::fleet(&app.cfg, &app.state, store, None) {
        Ok(f) => f,
        Err(e) => return internal(crate::error_text(&e)),
    };
    let probe = Duration::from_secs(5);
    let sim_lb = (app.cfg.raw.load_balancer.kind == config::LbKind::Simulated)
        .then(|| {
            crate::sim::SimLoadBalancer::new(app.state.root())
                .ok()
                .and_then(|l| l.state().ok())
        })
        .flatten();
    // Every instance at once: a slow one costs the probe timeout once.
    let rows = futures::future::join_all(built.executor.instances().iter().map(|i| {
        let sim_lb = &sim_lb;
        async move {
            let b = i.backend();
            let release = match tokio::time::timeout(probe, i.current_release()).await {
                Ok(Ok(r)) => r.map(|r| r.to_string()).unwrap_or_else(|| "none".into()),
                Ok(Err(e)) => format!("unknown ({e})"),
                Err(_) => "unknown (timed out)".into(),
            };
            let (health, healthy) = match tokio::time::timeout(probe, i.health()).await {
                Ok(Ok(h)) if h.is_healthy() => ("healthy".to_string(), true),
                Ok(Ok(deploykit::Health::Unhealthy(why))) => (format!("unhealthy: {why}"), false),
                Ok(Ok(_)) => ("unknown".to_string(), false),
                Ok(Err(e)) => (format!("unreachable: {e}"), false),
                Err(_) => ("unreachable: timed out".into(), false),
            };
            page::InstanceRow {
                id: b.id.to_string(),
                group: b.group.to_string(),
                address: b.address.to_string(),
                release,
                health,
                healthy,
                in_rotation: sim_lb
                    .as_ref()
                    .map(|l| !l.out_of_rotation.contains(b.id.as_str())),
            }
        }
    }))
    .await;
    let live = deploykit::bluegreen_state::FileLiveStore::new(app.state.live_record_path());
    let live = deploykit::bluegreen_state::LiveStore::load(&live)
        .await
        .ok()
        .flatten();
    html(
        StatusCode::OK,
        page::layout(
            "Fleet",
            viewer,
            &page::fleet(&rows, live.as_ref().map(|l| l.live.as_str())),
        ),
    )
}

async fn history(State(app): State<App>, headers: HeaderMap) -> Response {
    let viewer = match app.viewer(&headers, Need::Read) {
        Ok(v) => v,
        Err(r) => return refused(&r),
    };
    let state = app.state.clone();
    let journal = crate::flags::flag_journal(&app.state);
    let cache = app.cache.clone();
    let read = blocking(move || -> anyhow::Result<_> {
        let (e, _) = entries(&state, &cache)?;
        let records = deploykit::stats::load(&state)?.records;
        let changes = FlagStore::new(PathBuf::new(), journal).history()?;
        Ok((e, records, changes))
    })
    .await;
    match read {
        Ok((e, records, changes)) => html(
            StatusCode::OK,
            page::layout(
                "History",
                viewer,
                &page::history(&e, &records, &changes, deploykit::state::now_ms()),
            ),
        ),
        Err(e) => internal(crate::error_text(&e)),
    }
}

/// The Prometheus exposition of the journals, as `deploy --metrics-listen`
/// serves it, readable by whoever may read the pages (off loopback a
/// scraper sends the token as `Authorization: Bearer`).
async fn metrics(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = app.viewer(&headers, Need::Read) {
        return refused(&r);
    }
    secure(crate::metrics_http::answer(crate::metrics_http::Journals::Local(app.state.clone())).await)
}

async fn flags_page(
    app: &App,
    viewer: Viewer,
    status: StatusCode,
    message: Option<(&str, &str)>,
) -> Response {
    let store = app.flags.clone();
    match blocking(move || store.load()).await {
        Ok(set) => html(
            status,
            page::layout("Flags", viewer, &page::flags(&set, viewer, message)),
        ),
        Err(e) => html(
            StatusCode::OK,
            page::layout(
                "Flags",
                viewer,
                &page::notice("bad", &format!("the flag file cannot be read: {e}")),
            ),
        ),
    }
}

async fn flags(State(app): State<App>, headers: HeaderMap) -> Response {
    match app.viewer(&headers, Need::Read) {
        Ok(viewer) => flags_page(&app, viewer, StatusCode::OK, None).await,
        Err(r) => refused(&r),
    }
}

/// A flag form's fields.
#[derive(Debug, serde::Deserialize)]
struct FlagForm {
    action: String,
    #[serde(default)]
    variant: String,
    #[serde(default)]
    targeting: String,
    #[serde(default)]
    reason: String,
}

async fn change_flag(
    State(app): State<App>,
    headers: HeaderMap,
    Path(key): Path<String>,
    Form(form): Form<FlagForm>,
) -> Response {
    let viewer = match app.viewer(&headers, Need::Act) {
        Ok(v) => v,
        Err(r) => return refused(&r),
    };
    let kind = match form.action.as_str() {
        "enable" => Ok(FlagChangeKind::State { enabled: true }),
        "disable" => Ok(FlagChangeKind::State { enabled: false }),
        "kill" => Ok(FlagChangeKind::Kill),
        "default" => Ok(FlagChangeKind::Default {
            variant: form.variant.clone(),
        }),
        "targeting" if form.targeting.trim().is_empty() => Ok(FlagChangeKind::Targeting { rule: None }),
        "targeting" => serde_json::from_str(&form.targeting)
            .map(|rule| FlagChangeKind::Targeting { rule: Some(rule) })
            .map_err(|e| format!("targeting: not JSON ({e}); nothing was changed")),
        other => Err(format!(
            "action: `{other}` is not one of enable, disable, kill, default, targeting"
        )),
    };
    let kind = match kind {
        Ok(k) => k,
        Err(text) => return flags_page(&app, viewer, StatusCode::BAD_REQUEST, Some(("bad", &text))).await,
    };
    let change = FlagChange {
        flag: key.clone(),
        kind,
        who: format!("dashboard@{}", deploykit::state::host_name()),
        why: Some(form.reason.trim().to_owned()).filter(|r| !r.is_empty()),
    };
    let store = app.flags.clone();
    let asked = change.clone();
    match blocking(move || store.apply(&change)).await {
        Ok(record) => {
            // The kill switch is announced as `deploykit flags kill` does;
            // a kill that changed nothing announces nothing.
            if let (FlagChangeKind::Kill, Some(r)) = (&asked.kind, &record) {
                let notice = crate::notify::FlagNotice {
                    app: app.cfg.raw.app.clone(),
                    flag: key.clone(),
                    action: "kill".into(),
                    who: asked.who.clone(),
                    reason: asked.why.clone(),
                    variant: r
                        .after
                        .get("defaultVariant")
                        .and_then(|v| v.as_str())
                        .map(str::to_owned),
                };
                crate::notify::Notifier::new(&app.cfg.raw.notifications)
                    .send_flag(&notice)
                    .await;
            }
            see_other(&format!("/flags#flag-{}", page::url_part(&key)))
        }
        Err(e) => {
            let text = format!("{key}: {e}; nothing was changed");
            flags_page(&app, viewer, StatusCode::BAD_REQUEST, Some(("bad", &text))).await
        }
    }
}

async fn login_page(State(app): State<App>, headers: HeaderMap) -> Response {
    let viewer = match app.viewer(&headers, Need::Read) {
        Ok(v) => v,
        // Off loopback the sign-in page is the one page open to all.
        Err(Refusal::SignInNeeded) => Viewer::Anonymous,
        Err(r) => return refused(&r),
    };
    if viewer == Viewer::ReadOnly {
        return refused(&Refusal::ReadOnly);
    }
    html(
        StatusCode::OK,
        page::layout("Sign in", viewer, &page::login(None)),
    )
}

/// The sign-in form's field.
#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(app): State<App>, headers: HeaderMap, Form(form): Form<LoginForm>) -> Response {
    let Some(token) = &app.gate.token else {
        return refused(&Refusal::ReadOnly);
    };
    // A sign-in from another site would plant the attacker's session.
    if let Err(r) = app.gate.same_origin(&headers, Some(Credential::Cookie)) {
        return refused(&r);
    }
    let mut bearer = HeaderMap::new();
    if let Some(h) = headers.get(header::HOST) {
        bearer.insert(header::HOST, h.clone());
    }
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", form.token.trim())) {
        bearer.insert(header::AUTHORIZATION, v);
    }
    match app.gate.credential(&bearer) {
        Ok(Some(_)) => {
            let mut r = see_other("/");
            let cookie = format!(
                "{}={}; Path=/; HttpOnly; SameSite=Strict",
                auth::COOKIE,
                token.session()
            );
            r.headers_mut().insert(
                header::SET_COOKIE,
                HeaderValue::from_str(&cookie).expect("hex is a valid header"),
            );
            r
        }
        _ => html(
            StatusCode::UNAUTHORIZED,
            page::layout(
                "Sign in",
                Viewer::Anonymous,
                &page::login(Some(&Refusal::WrongToken.to_string())),
            ),
        ),
    }
}

async fn logout(State(app): State<App>, headers: HeaderMap) -> Response {
    if let Err(r) = app.gate.same_origin(&headers, Some(Credential::Cookie)) {
        return refused(&r);
    }
    let mut r = see_other("/");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
            auth::COOKIE
        ))
        .expect("a valid header"),
    );
    r
}

const STYLE: &str = include_str!("style.css");
const LIVE_JS: &str = include_str!("live.js");
const FAVICON: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\"><rect width=\"16\" height=\"16\" rx=\"3\" fill=\"#2563eb\"/><path d=\"M4 8h8M8 4v8\" stroke=\"#fff\" stroke-width=\"2\"/></svg>";

async fn asset(Path(name): Path<String>) -> Response {
    let (ty, body) = match name.as_str() {
        "style.css" => ("text/css; charset=utf-8", STYLE),
        "live.js" => ("text/javascript; charset=utf-8", LIVE_JS),
        "favicon.svg" => ("image/svg+xml", FAVICON),
        _ => return not_found().await,
    };
    secure(
        (
            [(header::CONTENT_TYPE, ty), (header::CACHE_CONTROL, "max-age=300")],
            body,
        )
            .into_response(),
    )
}

async fn favicon() -> Response {
    secure(([(header::CONTENT_TYPE, "image/svg+xml")], FAVICON).into_response())
}

async fn not_found() -> Response {
    html(
        StatusCode::NOT_FOUND,
        page::layout(
            "Not found",
            Viewer::Anonymous,
            &page::notice("bad", "no such page"),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unchanged_state_directory_keeps_its_fingerprint_and_a_new_journal_changes_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), "shop").unwrap();
        std::fs::create_dir_all(state.journal_dir()).unwrap();
        let a = fingerprint(&state);
        assert_eq!(a, fingerprint(&state));
        std::fs::write(state.journal_dir().join("x.jsonl"), b"{}\n").unwrap();
        assert_ne!(a, fingerprint(&state));
    }

    fn header(id: &str, sequence: Option<u64>, started: u64) -> String {
        let seq = sequence.map(|s| format!(",\"sequence\":{s}")).unwrap_or_default();
        format!(
            "{{\"record\":\"header\",\"version\":1,\"deployment\":\"{id}\",\"app\":\"shop\",\"kind\":\"deploy\",\"strategy\":\"rolling\",\"release\":\"v2\",\"previous\":{{}},\"started_at_ms\":{started},\"pid\":1,\"host\":\"h\"{seq}}}\n"
        )
    }

    const FINISHED: &str = "{\"record\":\"finished\",\"outcome\":\"succeeded\",\"duration_ms\":5}\n";

    #[test]
    fn entries_come_in_journal_order_and_only_finished_runs_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), "shop").unwrap();
        let j = state.journal_dir();
        std::fs::create_dir_all(&j).unwrap();
        // Sequence numbers decide, not start times; unnumbered runs come first.
        std::fs::write(j.join("0000000002-b.jsonl"), header("b", Some(2), 10) + FINISHED).unwrap();
        std::fs::write(j.join("0000000003-c.jsonl"), header("c", Some(3), 5)).unwrap();
        std::fs::write(j.join("old.jsonl"), header("old", None, 99) + FINISHED).unwrap();
        std::fs::write(j.join("0000000004-bad.jsonl"), "not json\n").unwrap();
        let cache = EntryCache::default();
        let (e, problems) = entries(&state, &cache).unwrap();
        let ids: Vec<&str> = e.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["old", "b", "c"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            cache.0.lock().unwrap().len(),
            2,
            "the running run is read again each time"
        );
        // The running run finishes: its journal grows and is read again.
        let mut c = std::fs::OpenOptions::new()
            .append(true)
            .open(j.join("0000000003-c.jsonl"))
            .unwrap();
        std::io::Write::write_all(&mut c, FINISHED.as_bytes()).unwrap();
        let (e, _) = entries(&state, &cache).unwrap();
        assert_eq!(e[2].outcome, deploykit::state::HistoryOutcome::Succeeded);
        std::fs::remove_file(j.join("0000000002-b.jsonl")).unwrap();
        let (e, _) = entries(&state, &cache).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(
            cache.0.lock().unwrap().len(),
            2,
            "a removed journal leaves the cache"
        );
    }

    #[test]
    fn one_journal_is_found_by_its_file_name_and_checked_by_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path(), "shop").unwrap();
        std::fs::create_dir_all(state.journal_dir()).unwrap();
        let header = |id: &str| {
            format!(
                "{{\"record\":\"header\",\"version\":1,\"deployment\":\"{id}\",\"app\":\"shop\",\"kind\":\"deploy\",\"strategy\":\"rolling\",\"release\":\"v2\",\"previous\":{{}},\"started_at_ms\":1,\"pid\":1,\"host\":\"h\"}}\n"
            )
        };
        std::fs::write(
            state.journal_dir().join("0000000001-17-v1.jsonl"),
            header("17-v1"),
        )
        .unwrap();
        std::fs::write(
            state.journal_dir().join("0000000002-18-v2.jsonl"),
            header("18-v2"),
        )
        .unwrap();
        // A file named for one run but holding another is not that run.
        std::fs::write(
            state.journal_dir().join("0000000003-19-v3.jsonl"),
            header("other"),
        )
        .unwrap();
        let found = one_journal(&state, "18-v2").unwrap().expect("found");
        assert_eq!(found.header.deployment, "18-v2");
        assert!(one_journal(&state, "19-v3").unwrap().is_none());
        assert!(one_journal(&state, "v2").unwrap().is_none());
    }
}
