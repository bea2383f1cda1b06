//! What every request handler shares: the backend, the metrics and the settings.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::backend::Backend;
use super::config::ApiConfig;
use super::metrics::Metrics;

/// The axum state of the API's router.
#[derive(Clone)]
pub(crate) struct AppState {
    /// The node behind the API.
    pub(crate) backend: Arc<dyn Backend>,
    /// Where handlers record what they observe.
    pub(crate) metrics: Metrics,
    /// The API's settings.
    pub(crate) config: Arc<ApiConfig>,
    /// Cancelled when the server gives up waiting for open requests at shutdown: every
    /// request still open then ends at once (503, or an SSE error event and `[DONE]`).
    pub(crate) closing: CancellationToken,
}
