//! `/metrics`: the Prometheus exposition of the state directory's journals
//! ([`deploykit::stats::exposition`]) and, during a run with network
//! chaos, the fault proxies' counters
//! ([`deploykit::chaos::RoutedFaults::exposition`]), served during a run by
//! `deploy --metrics-listen` and usable by any other server of the CLI
//! through [`router`].

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use deploykit::state::StateDir;
use deploykit::stats::{self, exposition};

/// A router answering `GET /metrics` from the journals of `state`.
pub(crate) fn router(state: StateDir) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .with_state(Arc::new(state))
}

/// The exposition text of `state`'s journals now.
///
/// # Errors
/// Those of [`stats::load`] (the journal directory cannot be listed).
pub(crate) fn render(state: &StateDir) -> deploykit::Result<String> {
    let loaded = stats::load(state)?;
    Ok(exposition::render(
        state.app(),
        &loaded.records,
        deploykit::state::now_ms(),
        exposition::DORA_WINDOW_MS,
    ))
}

async fn metrics(axum::extract::State(state): axum::extract::State<Arc<StateDir>>) -> Response {
    answer(StateDir::clone(&state)).await
}

/// The `/metrics` answer for `state`: the exposition, or a 500 naming what
/// could not be read. The dashboard serves it behind its read check.
pub(crate) async fn answer(state: StateDir) -> Response {
    // Reading the journals is file I/O: off the async workers.
    let rendered = tokio::task::spawn_blocking(move || render(&state)).await;
    match rendered {
        Ok(Ok(mut text)) => {
            // The fault proxies of a run with network chaos count what
            // they injected, which the instances' own metrics never see.
            let proxies = crate::wire::proxy_exposition().await;
            let at = text.rfind("# EOF").unwrap_or(text.len());
            text.insert_str(at, &proxies);
            ([(header::CONTENT_TYPE, exposition::CONTENT_TYPE)], text).into_response()
        }
        Ok(Err(e)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the journals: {e}\n"),
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "the metrics task failed\n").into_response(),
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

/// Serves [`router`] on `listener` until `stop` resolves.
pub(crate) async fn serve(
    listener: std::net::TcpListener,
    state: StateDir,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop)
        .await
}
