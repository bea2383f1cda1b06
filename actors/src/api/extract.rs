//! `OpenAiJson`: a JSON body extractor whose every rejection is an OpenAI-shaped error.
//!
//! axum's own `Json` answers bad bodies in plain text. This extractor:
//!
//! - demands `Content-Type: application/json` (or `application/<x>+json`), else 415: a
//!   web page can send `text/plain` or a form cross-origin without a CORS preflight, never
//!   JSON, so this is what keeps a page the user opens from driving the API (`curl` needs
//!   `-H 'Content-Type: application/json'`);
//! - enforces the body limit itself (413 as soon as a `Content-Length` announces too much,
//!   or once the streamed body crosses the limit), but first reads and discards what the
//!   client is still sending, up to `drain_limit` bytes and within the body timeout (a
//!   lingering close; a pause of a second in the client's sending ends it): clients that
//!   write their whole body before reading the answer (Python's `http.client`, `requests`)
//!   would otherwise see a broken pipe, not the 413. A body announced larger than
//!   `drain_limit` is answered at once;
//! - gives the whole body `body_timeout` to arrive, else 408;
//! - turns every parse failure into a 400 that names the offending parameter by its JSON
//!   path (through `serde_path_to_error`), e.g. `messages[1].content`.

use axum::extract::{FromRequest, Request};
use axum::http::header;
use futures::StreamExt;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::state::AppState;

/// A request body parsed as JSON into `T`.
#[derive(Debug, Clone)]
pub(crate) struct OpenAiJson<T>(pub(crate) T);

impl<T: DeserializeOwned> FromRequest<AppState> for OpenAiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let config = &state.config;
        let content_type = req.headers().get(header::CONTENT_TYPE);
        if !is_json(content_type) {
            let shown = content_type.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let err = ApiError::not_json(shown.as_deref());
            return Err(
                refuse_after_draining(req, err, config.drain_limit, config.body_timeout).await,
            );
        }
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let limit = config.body_limit;
        if let Some(len) = announced.filter(|&len| len > limit as u64) {
            let err = ApiError::too_large(limit);
            if len > config.drain_limit as u64 {
                // Too much to read just to say no: answer now and close.
                return Err(err);
            }
            return Err(
                refuse_after_draining(req, err, config.drain_limit, config.body_timeout).await,
            );
        }
        let timeout = config.body_timeout;
        let mut stream = req.into_body().into_data_stream();
        let body = match tokio::time::timeout(timeout, read_limited(&mut stream, limit)).await {
            Err(_) => return Err(ApiError::body_timeout(timeout)),
            Ok(Err(err)) => {
                if err.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    drain(&mut stream, config.drain_limit, timeout).await;
                }
                return Err(err);
            }
            Ok(Ok(body)) => body,
        };
        parse(&body).map(OpenAiJson)
    }
}

/// Whether a `Content-Type` value is JSON: `application/json` or `application/<x>+json`,
/// with any parameters (`; charset=utf-8`).
fn is_json(value: Option<&axum::http::HeaderValue>) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

/// Reads and discards the rest of `req`'s body (bounded), then hands back `err`.
async fn refuse_after_draining(
    req: Request,
    err: ApiError,
    limit: usize,
    timeout: std::time::Duration,
) -> ApiError {
    let mut stream = req.into_body().into_data_stream();
    drain(&mut stream, limit, timeout).await;
    err
}

/// Reads and discards up to `limit` bytes of `stream` within `timeout`. If the body is
/// longer or slower, the rest is left unread and the server closes the connection after
/// answering.
async fn drain(
    stream: &mut axum::body::BodyDataStream,
    limit: usize,
    timeout: std::time::Duration,
) {
    let read = async {
        let mut seen = 0usize;
        // A client that stops sending is not waited for: it is reading the answer already.
        while let Ok(Some(Ok(chunk))) = tokio::time::timeout(DRAIN_IDLE, stream.next()).await {
            seen = seen.saturating_add(chunk.len());
            if seen > limit {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(timeout, read).await;
}

/// Reads the whole body, failing with 413 past `limit` bytes.
async fn read_limited(
    stream: &mut axum::body::BodyDataStream,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|err| {
            ApiError::invalid_body(
                format!("Could not read the request body: {err}."),
                "invalid_body",
            )
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::too_large(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// How long draining an oversized body waits for the next chunk before it gives up.
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Parses `body`, which must hold one JSON object, into `T`, naming the offending
/// parameter on failure.
pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // Two steps: syntax first (any trailing garbage included), then the shape, so that the
    // shape's errors carry a path and a JSON array is not taken for a struct.
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|err| invalid_json(&err))?;
    if !value.is_object() {
        return Err(ApiError::invalid_body(
            "The request body must be a JSON object.",
            "invalid_type",
        ));
    }
    serde_path_to_error::deserialize(value).map_err(describe)
}

fn invalid_json(err: &serde_json::Error) -> ApiError {
    ApiError::invalid_body(
        format!(
            "We could not parse the JSON body of your request ({err}). The body must be one \
             JSON object."
        ),
        "invalid_json",
    )
}

/// Turns a deserialisation error (of a well-formed JSON value) into a 400 that names the
/// parameter.
fn describe(err: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let what = err.inner().to_string();
    let path = err.path().to_string();
    let at_root = path == ".";
    if let Some(field) = missing_field(&what) {
        let param = if at_root {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        return ApiError::invalid_param(
            param.clone(),
            format!("Missing required parameter: '{param}'."),
            "missing_required_parameter",
        );
    }
    if at_root {
        return ApiError::invalid_body(format!("Invalid request body: {what}."), "invalid_type");
    }
    ApiError::invalid_param(
        path.clone(),
        format!("Invalid value for '{path}': {what}."),
        "invalid_type",
    )
}

/// The field name of serde's "missing field `x`" message.
fn missing_field(what: &str) -> Option<&str> {
    what.strip_prefix("missing field `")?.strip_suffix('`')
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use axum::body::{Body, Bytes};

    use super::*;

    fn chunked(sizes: &[usize]) -> Request {
        let chunks: Vec<Result<Bytes, Infallible>> = sizes
            .iter()
            .map(|&n| Ok(Bytes::from(vec![b' '; n])))
            .collect();
        Request::new(Body::from_stream(futures::stream::iter(chunks)))
    }

    #[tokio::test]
    async fn a_streamed_body_is_cut_at_the_limit() {
        let mut stream = chunked(&[600, 600]).into_body().into_data_stream();
        let err = read_limited(&mut stream, 1000)
            .await
            .expect_err("over the limit");
        assert_eq!(err.status(), 413);
        let mut stream = chunked(&[500, 500]).into_body().into_data_stream();
        let body = read_limited(&mut stream, 1000).await.expect("at the limit");
        assert_eq!(body.len(), 1000);
    }

    #[test]
    fn json_content_types_are_recognised() {
        use axum::http::HeaderValue;
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json(Some(&HeaderValue::from_static(ok))), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "text/json+plain",
            "",
        ] {
            assert!(!is_json(Some(&HeaderValue::from_static(bad))), "{bad}");
        }
        assert!(!is_json(None));
    }

    #[test]
    fn trailing_garbage_is_invalid_json() {
        let err = parse::<serde_json::Value>(b"{} x").expect_err("garbage");
        assert_eq!(err.status(), 400);
    }
}
