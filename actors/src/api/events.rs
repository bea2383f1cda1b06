//! `GET /v1/events`: the node's event stream (see [`crate::events`]), every node's events
//! included in a cluster.
//!
//! Query parameters, all optional:
//! - `since=ID`: only events after local id `ID` (an SSE client that reconnects sends the
//!   `Last-Event-ID` header instead, which wins);
//! - `follow=false`: answer the held events as one JSON object (`events`, `missed`, `next`)
//!   instead of a stream;
//! - `node=ID` (a node id or its first characters) and `kind=K[,K...]`: only those;
//! - `limit=N` (with `follow=false`): at most N events (default and cap 10,000).
//!
//! The stream sends each event as `id: <id>` with the event's JSON as `data:`, after the
//! held history, then each new event as it happens; `event: missed` with `{"missed": N}`
//! tells a reader that N events after its cursor were dropped before it read them. A node
//! outside a cluster serves its own events.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::json;

use super::error::ApiError;
use super::state::AppState;
use super::stream::sse;
use crate::events::{Event, Followed};

/// Most events one `follow=false` answer carries.
const MAX_LIMIT: usize = 10_000;

/// What to serve.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct EventQuery {
    since: u64,
    follow: bool,
    node: Option<String>,
    kinds: Option<Vec<String>>,
    limit: usize,
}

impl EventQuery {
    /// Reads the query string and the `Last-Event-ID` header; an unknown or malformed
    /// parameter is a 400 that names it.
    fn parse(params: &HashMap<String, String>, headers: &HeaderMap) -> Result<Self, ApiError> {
        let mut q = EventQuery {
            follow: true,
            limit: MAX_LIMIT,
            ..Default::default()
        };
        for (key, value) in params {
            let bad = |what: &str| {
                ApiError::invalid_param(
                    key.clone(),
                    format!("`{key}` must be {what}, not `{value}`"),
                    "invalid_value",
                )
            };
            match key.as_str() {
                "since" => q.since = value.parse().map_err(|_| bad("an event id"))?,
                "follow" => q.follow = value.parse().map_err(|_| bad("true or false"))?,
                "node" if !value.is_empty() => q.node = Some(value.to_ascii_lowercase()),
                "kind" if !value.is_empty() => {
                    q.kinds = Some(value.split(',').map(|k| k.trim().to_string()).collect())
                }
                "limit" => {
                    q.limit = value
                        .parse::<usize>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| bad(&format!("a number from 1 to {MAX_LIMIT}")))?
                }
                "node" | "kind" => {}
                other => {
                    return Err(ApiError::invalid_param(
                        other.to_string(),
                        format!(
                            "unknown query parameter `{other}`; known: since, follow, node, kind, limit"
                        ),
                        "unknown_parameter",
                    ));
                }
            }
        }
        if let Some(id) = headers.get("last-event-id") {
            q.since = id
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "Last-Event-ID",
                        "the Last-Event-ID header must be an event id",
                        "invalid_value",
                    )
                })?;
        }
        Ok(q)
    }

    fn wants(&self, event: &Event) -> bool {
        self.node
            .as_ref()
            .is_none_or(|n| event.node.starts_with(n.as_str()))
            && self
                .kinds
                .as_ref()
                .is_none_or(|k| k.iter().any(|k| k == event.body.kind()))
    }
}

/// `GET /v1/events`.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "operations",
    params(
        ("since" = Option<u64>, Query, description = "Only events after this local id"),
        ("follow" = Option<bool>, Query, description = "`false`: one JSON object instead of a stream"),
        ("node" = Option<String>, Query, description = "Only this node's (an id or its first characters)"),
        ("kind" = Option<String>, Query, description = "Only these kinds (comma-separated)"),
        ("limit" = Option<u64>, Query, description = "With `follow=false`: at most this many"),
    ),
    responses(
        (status = 200, description = "The events: an SSE stream, or with `follow=false` \
         `{\"events\", \"missed\", \"next\"}`",
         content((Object = "application/json"), (String = "text/event-stream"))),
        crate::api::openapi::OpenAiErrors,
    )
)]
pub(crate) async fn events(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let query = Arc::new(EventQuery::parse(&params, &headers)?);
    let Some(log) = state.backend.events() else {
        return Err(ApiError::unknown_url("GET", "/v1/events"));
    };
    if !query.follow {
        let read = log.read(query.since, MAX_LIMIT);
        let events: Vec<serde_json::Value> = read
            .events
            .iter()
            .filter(|e| query.wants(e))
            .take(query.limit)
            .map(|e| e.to_json())
            .collect();
        let next = read.next;
        return Ok(
            Json(json!({ "events": events, "missed": read.missed, "next": next })).into_response(),
        );
    }
    let closing = state.closing.clone();
    let stream = log
        .follow(query.since)
        .filter_map(move |item| {
            let query = query.clone();
            async move {
                match item {
                    Followed::Event(e) if query.wants(&e) => Some(Ok::<_, Infallible>(
                        SseEvent::default()
                            .id(e.id.to_string())
                            .data(e.to_json().to_string()),
                    )),
                    Followed::Event(_) => None,
                    Followed::Missed(n) => Some(Ok(SseEvent::default()
                        .event("missed")
                        .data(json!({ "missed": n }).to_string()))),
                }
            }
        })
        .take_until(async move { closing.cancelled().await });
    Ok(sse(stream, state.config.keepalive))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_query_is_read_and_bad_parameters_are_named() {
        let q = EventQuery::parse(
            &params(&[
                ("since", "7"),
                ("follow", "false"),
                ("kind", "runner_failed,member_left"),
            ]),
            &HeaderMap::new(),
        )
        .unwrap();
        assert_eq!(q.since, 7);
        assert!(!q.follow);
        assert_eq!(q.kinds.as_deref().unwrap().len(), 2);
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", "42".parse().unwrap());
        assert_eq!(
            EventQuery::parse(&params(&[("since", "7")]), &headers)
                .unwrap()
                .since,
            42
        );
        for bad in [
            params(&[("since", "x")]),
            params(&[("follow", "maybe")]),
            params(&[("limit", "0")]),
            params(&[("sinse", "1")]),
        ] {
            let err = EventQuery::parse(&bad, &HeaderMap::new()).unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
            let key = bad.keys().next().unwrap().clone();
            assert!(format!("{err:?}").contains(&key), "{err:?}");
        }
    }
}
