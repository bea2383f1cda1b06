//! The accept loop: HTTP/1.1 connections with a header timeout and a connection cap.
//!
//! `axum::serve` has neither, so a client could hold a connection forever by never sending
//! its headers, and enough of them exhaust the descriptor limit (after which runner
//! restarts, which need pipes, fail too). Here:
//!
//! - every connection must send each request's headers within `header_timeout`, the wait of
//!   an idle keep-alive connection for its next request included (hyper's
//!   `header_read_timeout`), or it is closed;
//! - at most `max_connections` are served at once; the next ones are answered
//!   `503 too_many_connections` with `Retry-After` and `Connection: close` by a small pool
//!   of [`OVERFLOW_SLOTS`] (each bounded by [`OVERFLOW_DEADLINE`]), and past that pool
//!   closed at once, so an overload is answered, never hung;
//! - a shutdown stops accepting, lets every connection finish its current request
//!   (hyper's graceful shutdown closes idle keep-alives at once) and returns when all have;
//!   dropping the future (the actor aborts it after its grace) drops every connection.
//!
//! Body read timeouts and the lingering close of an oversized body live in the extractor
//! (`extract`), where the body is read.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::response::IntoResponse;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::error::ApiError;

/// Connections answered 503 at once when the cap is reached; past them new ones are closed.
pub const OVERFLOW_SLOTS: usize = 64;
/// How long an over-the-cap connection may take to be answered.
pub const OVERFLOW_DEADLINE: Duration = Duration::from_secs(2);
/// Pause after an accept error that is not about one connection (out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// See `ApiConfig::header_timeout`.
    pub(crate) header_timeout: Duration,
    /// See `ApiConfig::max_connections`.
    pub(crate) max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` is cancelled and every connection has
/// finished.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let mut overflow_builder = http1::Builder::new();
    overflow_builder
        .timer(TokioTimer::new())
        .header_read_timeout(OVERFLOW_DEADLINE)
        .keep_alive(false);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let overflow = Arc::new(Semaphore::new(OVERFLOW_SLOTS));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                if !is_connection_error(&err) {
                    tracing::warn!(%err, "cannot accept an HTTP connection");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(stream);
        if let Ok(permit) = slots.clone().try_acquire_owned() {
            let connection = builder.serve_connection(io, TowerToHyperService::new(app.clone()));
            let stop = shutdown.clone();
            connections.spawn(async move {
                let _permit = permit;
                let mut connection = std::pin::pin!(connection);
                let outcome = tokio::select! {
                    outcome = connection.as_mut() => outcome,
                    _ = stop.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(err) = outcome {
                    tracing::debug!(%peer, %err, "HTTP connection ended with an error");
                }
            });
        } else if let Ok(permit) = overflow.clone().try_acquire_owned() {
            let limit = limits.max_connections;
            tracing::debug!(%peer, limit, "connection cap reached; answering 503");
            let service = hyper::service::service_fn(move |_request| async move {
                Ok::<_, Infallible>(ApiError::too_many_connections(limit).into_response())
            });
            let connection = overflow_builder.serve_connection(io, service);
            connections.spawn(async move {
                let _permit = permit;
                let _ = tokio::time::timeout(OVERFLOW_DEADLINE, connection).await;
            });
        } else {
            tracing::debug!(%peer, "connection cap and overflow pool full; closing");
            drop(io);
        }
    }
    while connections.join_next().await.is_some() {}
}

/// Errors of `accept` that concern one connection only (it was reset before we took it).
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
