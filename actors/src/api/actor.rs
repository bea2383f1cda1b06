//! `ApiActor`: the node's HTTP server as an actor in the supervision tree.
//!
//! `pre_start` binds exactly the configured address (a failure is a startup error naming
//! it) and spawns the server (`server`: header timeout, connection cap); `post_stop` shuts it down in two bounded steps: first
//! gracefully (no new connections; open requests, streams included, may finish) for up to
//! `shutdown_timeout`, then by ending every request still open (503, or an SSE error event
//! and `[DONE]`, which drops its task handle and so cancels its task) and waiting up to
//! [`CLOSE_GRACE`] more before the server task is aborted. If the server task ends on its own (an error, a panic), the actor fails with
//! [`ApiActorError::ServerExited`], so its supervisor hears of it like of any other death.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::backend::Backend;
use super::config::ApiConfig;
use super::metrics::Metrics;
use super::routes::router;
use super::server::{Limits, serve};

/// How long `post_stop` waits for the server after ending the requests still open.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The actor; spawn it with [`ApiArgs`].
#[derive(Debug, Default, Clone, Copy)]
pub struct ApiActor;

/// Start-up arguments of an [`ApiActor`].
pub struct ApiArgs {
    /// Where and how to serve.
    pub config: ApiConfig,
    /// The node behind the API.
    pub backend: Arc<dyn Backend>,
    /// The metrics `/metrics` serves and the handlers record into.
    pub metrics: Metrics,
}

/// Messages of an [`ApiActor`].
#[derive(RactorMessage)]
pub enum ApiMsg {
    /// The address the server listens on (the real port when the configured one was 0).
    LocalAddr(RpcReplyPort<SocketAddr>),
    /// Internal: the server task ended without being asked to.
    #[doc(hidden)]
    ServerExited(String),
}

/// Why an [`ApiActor`] failed to start or failed later.
#[derive(Debug, thiserror::Error)]
pub enum ApiActorError {
    /// The configured address could not be bound.
    #[error(
        "the HTTP API could not listen on {addr}: {source} (is another process using that \
         port, or is the address not one of this machine's? choose another address)"
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server stopped without being asked to.
    #[error("the HTTP server on {addr} stopped unexpectedly: {reason}")]
    ServerExited {
        /// The address it served.
        addr: SocketAddr,
        /// What ended it.
        reason: String,
    },
}

/// State of an [`ApiActor`].
pub struct ApiState {
    local_addr: SocketAddr,
    /// Starts the graceful shutdown: no new connections.
    shutdown: CancellationToken,
    /// Ends the requests still open.
    closing: CancellationToken,
    server: Option<JoinHandle<()>>,
    shutdown_timeout: Duration,
    /// This actor's introspection entry.
    _registration: canopy_runtime::introspect::Registration,
}

impl Actor for ApiActor {
    type Msg = ApiMsg;
    type State = ApiState;
    type Arguments = ApiArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let registration = canopy_runtime::introspect::register(&myself.get_cell(), "api");
        let addr = args.config.addr;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ApiActorError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| ApiActorError::Bind { addr, source })?;
        let shutdown_timeout = args.config.shutdown_timeout;
        let limits = Limits {
            header_timeout: args.config.header_timeout,
            max_connections: args.config.max_connections,
        };
        let closing = CancellationToken::new();
        let app = router(args.backend, args.metrics, args.config, closing.clone());
        let shutdown = CancellationToken::new();
        let asked = shutdown.clone();
        let serve = serve(listener, app, limits, asked.clone());
        let server = tokio::spawn(async move {
            let outcome = AssertUnwindSafe(serve).catch_unwind().await;
            if asked.is_cancelled() {
                return;
            }
            let reason = match outcome {
                Ok(()) => "the server returned".to_string(),
                Err(_) => "the server task panicked".to_string(),
            };
            tracing::error!(addr = %local_addr, %reason, "HTTP server stopped unexpectedly");
            let _ = myself.send_message(ApiMsg::ServerExited(reason));
        });
        tracing::info!(addr = %local_addr, "HTTP API listening");
        let addr = local_addr.to_string();
        registration.set_details(std::sync::Arc::new(
            move || serde_json::json!({ "addr": addr }),
        ));
        Ok(ApiState {
            local_addr,
            shutdown,
            closing,
            server: Some(server),
            shutdown_timeout,
            _registration: registration,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ApiMsg::LocalAddr(reply) => {
                let _ = reply.send(state.local_addr);
                Ok(())
            }
            ApiMsg::ServerExited(reason) => Err(ApiActorError::ServerExited {
                addr: state.local_addr,
                reason,
            }
            .into()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.shutdown.cancel();
        let Some(mut server) = state.server.take() else {
            return Ok(());
        };
        let addr = state.local_addr;
        if tokio::time::timeout(state.shutdown_timeout, &mut server)
            .await
            .is_err()
        {
            tracing::warn!(%addr, timeout_s = state.shutdown_timeout.as_secs_f64(),
                "requests still open after the shutdown timeout; ending them");
            state.closing.cancel();
            if tokio::time::timeout(CLOSE_GRACE, &mut server)
                .await
                .is_err()
            {
                tracing::warn!(%addr, "connections still open; dropping the server");
                server.abort();
            }
        }
        tracing::info!(%addr, "HTTP API stopped");
        Ok(())
    }
}
