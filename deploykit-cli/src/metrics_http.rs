//! `/metrics`: the Prometheus exposition of the journals, in the state
//! directory or in etcd ([`deploykit::stats::exposition`]) and, during a run with network
//! chaos, the fault proxies' counters
//! ([`deploykit::chaos::RoutedFaults::exposition`]), served during a run by
//! `deploy --metrics-listen` and usable by any other server of the CLI
//! through [`router`].

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use deploykit::state::{StateBackend, StateDir};
use deploykit::stats::{self, exposition};

/// Where `/metrics` reads the journals: this machine's state directory, or
/// the state every machine shares (etcd).
#[derive(Clone)]
pub(crate) enum Journals {
    Local(StateDir),
    Shared {
        app: String,
        backend: Arc<dyn StateBackend>,
    },
}

impl Journals {
    /// The journals a command's context deploys with.
    pub(crate) fn of(ctx: &crate::cmd::Ctx) -> Self {
        match ctx.cfg.raw.state.backend {
            crate::config::StateBackendKind::Local => Self::Local(ctx.state.clone()),
            crate::config::StateBackendKind::Etcd => Self::Shared {
                app: ctx.cfg.raw.app.clone(),
                backend: ctx.backend.clone(),
            },
        }
    }

    /// The exposition text of the journals now.
    ///
    /// # Errors
    /// Those of [`stats::load`] (the journals cannot be listed or read).
    async fn render(self) -> anyhow::Result<String> {
        let (app, loaded) = match self {
            // Reading the journal files is file I/O: off the async workers.
            Self::Local(state) => {
                tokio::task::spawn_blocking(move || stats::load(&state).map(|l| (state.app().to_string(), l)))
                    .await??
            }
            Self::Shared { app, backend } => {
                let loaded = stats::load_from(backend.as_ref()).await?;
                (app, loaded)
            }
        };
        Ok(exposition::render(
            &app,
            &loaded.records,
            deploykit::state::now_ms(),
            exposition::DORA_WINDOW_MS,
        ))
    }
}

/// A router answering `GET /metrics` from `journals`.
pub(crate) fn router(journals: Journals) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state(Arc::new(journals))
}

/// Serves [`router`] on `listener` until `stop` resolves.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    journals: Journals,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(journals))
        .with_graceful_shutdown(stop)
        .await
}

async fn metrics(axum::extract::State(journals): axum::extract::State<Arc<Journals>>) -> Response {
    answer(Journals::clone(&journals)).await
}

/// The `/metrics` answer for `journals`: the exposition, or a 500 naming
/// what could not be read. The dashboard serves it behind its read check.
pub(crate) async fn answer(journals: Journals) -> Response {
    match journals.render().await {
        Ok(mut text) => {
            // The fault proxies of a run with network chaos count what
            // they injected, which the instances' own metrics never see.
            let proxies = crate::wire::proxy_exposition().await;
            let at = text.rfind("# EOF").unwrap_or(text.len());
            text.insert_str(at, &proxies);
            ([(header::CONTENT_TYPE, exposition::CONTENT_TYPE)], text).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the journals: {e:#}\n"),
        )
            .into_response(),
    }
}

/// Binds `addr` now, so that a bad address or a port in use is refused
/// before anything else is touched.
///
/// # Errors
/// The address cannot be bound, naming the flag.
pub(crate) fn bind(flag: &str, addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        anyhow::Error::new(deploykit::Error::invalid(
            flag,
            format!("cannot listen on {addr}: {e}; choose another address or port"),
        ))
    })?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}
