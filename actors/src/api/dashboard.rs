//! The web dashboard every node serves at `/`: nodes, instances, the live actor tree, the
//! event timeline, throughput / queue / time-to-first-token charts and a chat panel.
//!
//! Everything it loads is embedded in the binary (`dashboard/`: the page, its script and
//! style, and the vendored uPlot chart library, see `dashboard/vendor/README.md`), so it works
//! offline and needs no build step. A page keeps one event stream open (`GET /v1/events`) and
//! polls one endpoint, `GET /v1/dashboard`, every two seconds: this node's `/state`, every
//! node's actor tree and a few counters the charts are drawn from.
//!
//! With an API key, `/` without credentials answers a login form; its `POST /dashboard/login`
//! checks the key and sets an `HttpOnly`, `SameSite=Strict` session cookie derived from the
//! key (so changing the key logs every browser out), which the guard accepts like the key
//! itself. The static assets and the login are the only routes served without the key; they
//! hold no data.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::config::ApiKey;
use super::state::AppState;

/// The session cookie's name.
const COOKIE: &str = "canopy_session";

const INDEX: &str = include_str!("dashboard/index.html");
const LOGIN: &str = include_str!("dashboard/login.html");

/// The embedded assets: name, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/app.css"),
    ),
    (
        "uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/vendor/uplot/uPlot.iife.min.js"),
    ),
    (
        "uPlot.min.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/vendor/uplot/uPlot.min.css"),
    ),
];

/// Whether `path` is served without the API key: `/health`, the login and the static assets.
pub(crate) fn is_public(path: &str) -> bool {
    path == "/health" || path == "/dashboard/login" || path.starts_with("/dashboard/assets/")
}

/// The session token for `key`: what the login's cookie holds.
pub(crate) fn session_token(key: &ApiKey) -> String {
    let mut hash = Sha256::new();
    hash.update(b"canopy-dashboard-session\n");
    hash.update(key.expose().as_bytes());
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `cookie` is the session token of `key` (compared in constant time).
pub(crate) fn session_matches(key: &ApiKey, cookie: &str) -> bool {
    session_token(key)
        .as_bytes()
        .ct_eq(cookie.as_bytes())
        .into()
}

/// The session cookie's value, if the request carries one.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

fn html(body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The login form (`failed`: after a wrong key).
pub(crate) fn login_page(failed: bool) -> Response {
    let mut response = html(LOGIN);
    if failed {
        *response.status_mut() = StatusCode::UNAUTHORIZED;
        response
            .headers_mut()
            .insert("x-canopy-login", HeaderValue::from_static("failed"));
    }
    response
}

/// `GET /`: the dashboard.
#[utoipa::path(
    get,
    path = "/",
    tag = "dashboard",
    responses(
        (status = 200, description = "The dashboard (or its login page)", content_type = "text/html", body = String),
        crate::api::openapi::OpenAiErrors,
    )
)]
pub(crate) async fn index() -> Response {
    html(INDEX)
}

/// `GET /dashboard/assets/{name}`.
#[utoipa::path(
    get,
    path = "/dashboard/assets/{name}",
    tag = "dashboard",
    params(("name" = String, Path, description = "The asset's file name")),
    responses(
        (status = 200, description = "The asset", body = String),
        (status = 404, description = "No such asset", content_type = "text/plain", body = String),
        (status = 401, description = "A missing or wrong API key", body = super::error::ErrorBody<'static>),
        (status = 403, description = "A Host header the node does not answer", body = super::error::ErrorBody<'static>),
    )
)]
pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, body)) => (
            [
                (header::CONTENT_TYPE, *kind),
                (header::CACHE_CONTROL, "max-age=300"),
            ],
            *body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}

/// `POST /dashboard/login` (a form with `key`): sets the session cookie and goes to `/`, or
/// shows the form again after a wrong key.
#[utoipa::path(
    post,
    path = "/dashboard/login",
    tag = "dashboard",
    request_body(content = String, content_type = "application/x-www-form-urlencoded",
                 description = "`key=...`"),
    responses(
        (status = 303, description = "To `/`, with the session cookie"),
        (status = 200, description = "The login form again, after a wrong key",
         content_type = "text/html", body = String),
        crate::api::openapi::OpenAiErrors,
    )
)]
pub(crate) async fn login(State(state): State<AppState>, body: String) -> Response {
    let Some(key) = &state.config.api_key else {
        return redirect("/", None);
    };
    let given = form_value(&body, "key").unwrap_or_default();
    if !key.matches(given.trim().as_bytes()) {
        return login_page(true);
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        session_token(key)
    );
    redirect("/", Some(cookie))
}

fn redirect(to: &'static str, cookie: Option<String>) -> Response {
    let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response();
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        response.headers_mut().insert(header::SET_COOKIE, c);
    }
    response
}

/// The value of `name` in a form-urlencoded body.
fn form_value(body: &str, name: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The sum of every series of metric `name` in Prometheus text `text`.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `GET /v1/dashboard`: what the dashboard polls: this node's state, every node's actor tree
/// (this node's alone outside a cluster), and the counters its charts are drawn from.
#[utoipa::path(
    get,
    path = "/v1/dashboard",
    tag = "dashboard",
    responses((status = 200, description = "What the dashboard shows", body = Object), crate::api::openapi::OpenAiErrors)
)]
pub(crate) async fn dashboard(State(state): State<AppState>) -> Json<Value> {
    let view = state.backend.state().await;
    let actors = match state.backend.cluster_actors() {
        Some(all) => serde_json::to_value(all.await).unwrap_or(Value::Null),
        None => {
            let tree = state.backend.actors().await;
            json!({ "nodes": [{ "node": "local", "master": false, "tree": tree }] })
        }
    };
    let text = state.metrics.encode().unwrap_or_default();
    let m = |name: &str| metric_sum(&text, name);
    let node = state
        .backend
        .events()
        .map(|log| log.origin().0)
        .unwrap_or_else(|| "local".into());
    Json(json!({
        "node": node,
        "time_ms": canopy_runtime::cluster::now_ms(),
        "state": view,
        "actors": actors,
        "stats": {
            "tokens_generated": m("canopy_tokens_generated_total"),
            "requests": m("canopy_http_requests_total"),
            "ttft_sum": m("canopy_time_to_first_token_seconds_sum"),
            "ttft_count": m("canopy_time_to_first_token_seconds_count"),
            "running": m("canopy_batch_running"),
            "queued": m("canopy_batch_queued"),
            "events_dropped": m("canopy_events_dropped_total"),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_cookies_and_metrics_are_read() {
        assert_eq!(
            form_value("a=1&key=ab%2Fc+d", "key").as_deref(),
            Some("ab/c d")
        );
        assert_eq!(form_value("key=%zz%4", "key").as_deref(), Some("%zz%4"));
        assert_eq!(form_value("a=1", "key"), None);
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, "x=1; canopy_session=abc".parse().unwrap());
        assert_eq!(session_cookie(&headers).as_deref(), Some("abc"));
        let text =
            "# HELP x\nfoo_total{a=\"1\"} 2\nfoo_total{a=\"2\"} 3.5\nfoo_total_x 9\nfoo_total 1\n";
        assert_eq!(metric_sum(text, "foo_total"), 6.5);
    }

    #[test]
    fn a_session_token_depends_on_the_key_and_only_public_paths_skip_it() {
        let a = ApiKey::new("0123456789abcdef0123").unwrap();
        let b = ApiKey::new("0123456789abcdef0124").unwrap();
        assert_ne!(session_token(&a), session_token(&b));
        assert!(session_matches(&a, &session_token(&a)));
        assert!(!session_matches(&b, &session_token(&a)));
        assert!(!session_matches(&a, ""));
        assert_eq!(session_token(&a).len(), 64);
        assert!(is_public("/dashboard/assets/app.js"));
        assert!(is_public("/health"));
        for private in ["/", "/v1/events", "/v1/dashboard", "/state", "/dashboard/x"] {
            assert!(!is_public(private), "{private}");
        }
    }

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        for (name, _, _) in ASSETS {
            assert!(
                INDEX.contains(&format!("/dashboard/assets/{name}")),
                "the page does not load {name}"
            );
        }
    }
}
