//! The middleware that counts every request by endpoint and status and times it.
//!
//! The endpoint label is the matched route (`/v1/models/{*model}`, not the raw path), or
//! `unmatched`, so that clients cannot inflate the label set. A streamed response (SSE, or
//! Ollama's NDJSON) is timed until its body ends or is dropped (client gone), not until its
//! headers are sent.

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

use super::metrics::Metrics;
use super::state::AppState;

/// Records the request's duration when dropped (at the end of a streamed body).
struct DurationGuard {
    metrics: Metrics,
    endpoint: String,
    started: Instant,
}

impl Drop for DurationGuard {
    fn drop(&mut self) {
        self.metrics
            .request_duration(&self.endpoint, self.started.elapsed());
    }
}

/// The middleware (install with `axum::middleware::from_fn_with_state`).
pub(crate) async fn observe(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let response = next.run(request).await;
    state.metrics.request(&endpoint, response.status().as_u16());
    let streamed = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| {
            let v = v.as_bytes();
            v.starts_with(b"text/event-stream") || v.starts_with(b"application/x-ndjson")
        });
    let guard = DurationGuard {
        metrics: state.metrics.clone(),
        endpoint,
        started,
    };
    if !streamed {
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |frame| {
        let _ = &guard;
        frame
    });
    Response::from_parts(parts, Body::from_stream(body))
}
