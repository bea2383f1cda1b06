//! `OpenAiJson`: a JSON body extractor whose every rejection is an OpenAI-shaped error.
//!
//! axum's own `Json` answers bad bodies in plain text and insists on a JSON content type.
//! This extractor instead accepts any content type (so `curl -d` works), enforces the body
//! limit itself (answering 413 as soon as a `Content-Length` announces too much, before
//! reading anything, or once the streamed body crosses the limit), and turns every parse
//! failure into a 400 that names the offending parameter by its JSON path (through
//! `serde_path_to_error`), e.g. `messages[1].content`.

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
        let limit = state.config.body_limit;
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|len| len > limit as u64) {
            return Err(ApiError::too_large(limit));
        }
        let body = read_limited(req, limit).await?;
        parse(&body).map(OpenAiJson)
    }
}

/// Reads the whole body, failing with 413 past `limit` bytes.
async fn read_limited(req: Request, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut stream = req.into_body().into_data_stream();
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
        let err = read_limited(chunked(&[600, 600]), 1000)
            .await
            .expect_err("over the limit");
        assert_eq!(err.status(), 413);
        let body = read_limited(chunked(&[500, 500]), 1000)
            .await
            .expect("at the limit");
        assert_eq!(body.len(), 1000);
    }

    #[test]
    fn trailing_garbage_is_invalid_json() {
        let err = parse::<serde_json::Value>(b"{} x").expect_err("garbage");
        assert_eq!(err.status(), 400);
    }
}
