//! Running the server until a shutdown signal, then shutting down gracefully.

use std::future::Future;

use tokio::net::TcpListener;

use super::state::ServerState;

/// Serves [`router`](super::router) on `listener` until `shutdown` resolves.
///
/// Then it stops accepting connections, marks the server as shutting down (GET /health answers
/// 503), calls [`Backend::shutdown`](crate::request::Backend::shutdown) so the engine admits no
/// new requests and finishes the running ones, and returns once every in-flight response,
/// streams included, is complete.
pub async fn serve(
    listener: TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = super::router(state.clone());
    let shutdown = async move {
        shutdown.await;
        state.begin_shutdown();
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM: the usual `shutdown` for [`serve`].
///
/// If a handler cannot be installed, that signal is not waited for (the other one still is),
/// rather than shutting down at once.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
