//! The gate every request passes before any route: the `Host` check, then the API key.
//!
//! - **`Host`** (against DNS rebinding: a web page whose name the attacker re-points at
//!   127.0.0.1 talks to the node with its own name in `Host`): accepted are IP literals
//!   (v4, or v6 in brackets), `localhost` and `*.localhost` (browsers resolve those
//!   themselves), and the names the operator allows (`ApiConfig::allowed_hosts`, `*` for
//!   any). Anything else, more than one `Host` header included, is a 403. A request without
//!   `Host` (HTTP/1.0 tools) passes: browsers always send one.
//! - **API key**: when the node has one, every request but `GET /health` and the
//!   dashboard's static assets and login must carry `Authorization: Bearer <key>` (or
//!   `x-api-key: <key>`, which Anthropic-style clients send, or the dashboard's session
//!   cookie, which its login sets: `SameSite=Strict`, so no other site's page sends it);
//!   `GET /` without it answers the dashboard's login form; no key or a wrong one is a 401 with `WWW-Authenticate: Bearer`, before routing,
//!   so that an unauthenticated client cannot even tell which routes exist. The comparison
//!   takes the same time wherever the keys differ ([`ApiKey::matches`]).
//!
//! Cross-site request forgery is the third leg, held by the body extractor: a JSON endpoint
//! refuses any other `Content-Type` (415), and a page can only send `application/json`
//! cross-origin after a CORS preflight, which this API never grants.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;

use super::config::ApiKey;
use super::error::ApiError;
use super::routes::error_for;
use super::state::AppState;

/// The middleware (install with `axum::middleware::from_fn_with_state`).
pub(crate) async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    if let Err(host) = check_host(request.headers(), &state.config.allowed_hosts) {
        return error_for(path, ApiError::foreign_host(&host));
    }
    if let Some(key) = &state.config.api_key
        && !super::dashboard::is_public(path)
        && let Err(err) = check_key(request.headers(), key)
    {
        if path == "/" {
            // A browser without the dashboard's cookie: the login form, nothing else.
            return super::dashboard::login_page(false);
        }
        let mut response = error_for(path, err);
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"canopy\""),
        );
        return response;
    }
    next.run(request).await
}

/// `Ok` when the `Host` header is absent or names a host this node answers to; else the
/// offending value (lossy) for the error message.
fn check_host(headers: &HeaderMap, allowed: &[String]) -> Result<(), String> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let Some(value) = hosts.next() else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
    if hosts.next().is_some() {
        return Err(text);
    }
    if host_allowed(&text, allowed) {
        Ok(())
    } else {
        Err(text)
    }
}

/// Whether the `Host` header value `host` (a name or address, maybe with `:port`) is one
/// this node answers to.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal, `[::1]` or `[::1]:port`.
        return rest.split_once(']').is_some_and(|(addr, tail)| {
            addr.parse::<std::net::Ipv6Addr>().is_ok()
                && (tail.is_empty() || valid_port(tail.strip_prefix(':')))
        });
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if valid_port(Some(port)) => name,
        Some(_) => return false,
        None => host,
    };
    if name.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() {
        return false;
    }
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    allowed.iter().any(|a| {
        a == "*" || {
            let a = a.trim();
            a.strip_suffix('.').unwrap_or(a).eq_ignore_ascii_case(&name)
        }
    })
}

fn valid_port(port: Option<&str>) -> bool {
    port.is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

/// `Ok` when the request carries `key` as a bearer token or in `x-api-key`.
fn check_key(headers: &HeaderMap, key: &ApiKey) -> Result<(), ApiError> {
    let bearer = headers
        .get_all(header::AUTHORIZATION)
        .iter()
        .filter_map(|v| {
            let v = v.as_bytes();
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| v[7..].trim_ascii())
        });
    let x_api_key = headers
        .get_all("x-api-key")
        .iter()
        .map(|v| v.as_bytes().trim_ascii());
    let mut presented = false;
    // The dashboard's session cookie (a browser's EventSource cannot send headers).
    if let Some(token) = super::dashboard::session_cookie(headers) {
        presented = true;
        if super::dashboard::session_matches(key, &token) {
            return Ok(());
        }
    }
    for candidate in bearer.chain(x_api_key) {
        presented = true;
        if key.matches(candidate) {
            return Ok(());
        }
    }
    if !presented && headers.contains_key(header::AUTHORIZATION) {
        // `Authorization: Basic ...` and the like: a credential, but not ours.
        presented = true;
    }
    Err(ApiError::unauthorized(presented))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    #[test]
    fn ip_literals_localhost_and_allowed_names_pass() {
        let allowed = vec!["gpu-box.lan".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:52415",
            "192.168.1.20:80",
            "[::1]",
            "[::1]:52415",
            "localhost",
            "LOCALHOST:8080",
            "app.localhost:1",
            "localhost.",
            "gpu-box.lan:52415",
            "GPU-BOX.LAN",
        ] {
            assert!(host_allowed(ok, &allowed), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:52415",
            "127.0.0.1.evil.example",
            "localhost.evil.example",
            "gpu-box.lan.evil",
            "[::1",
            "[nope]:80",
            "127.0.0.1:port",
            "127.0.0.1:123456",
            "",
            ":80",
        ] {
            assert!(!host_allowed(bad, &allowed), "{bad}");
        }
        assert!(host_allowed("anything.example", &["*".to_string()]));
    }

    #[test]
    fn two_host_headers_are_refused_and_none_passes() {
        assert!(check_host(&headers(&[]), &[]).is_ok());
        assert!(check_host(&headers(&[("host", "127.0.0.1")]), &[]).is_ok());
        assert!(
            check_host(
                &headers(&[("host", "127.0.0.1"), ("host", "evil.example")]),
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn the_key_is_taken_from_bearer_or_x_api_key() {
        let key = ApiKey::new("0123456789abcdef").expect("key");
        let ok = |h: &[(&'static str, &'static str)]| check_key(&headers(h), &key).is_ok();
        assert!(ok(&[("authorization", "Bearer 0123456789abcdef")]));
        assert!(ok(&[("authorization", "bearer  0123456789abcdef ")]));
        assert!(ok(&[("x-api-key", "0123456789abcdef")]));
        assert!(!ok(&[]));
        assert!(!ok(&[("authorization", "Bearer 0123456789abcdeF")]));
        assert!(!ok(&[("authorization", "Basic 0123456789abcdef")]));
        assert!(!ok(&[("authorization", "0123456789abcdef")]));
        let missing = check_key(&headers(&[]), &key).expect_err("no key");
        let wrong =
            check_key(&headers(&[("authorization", "Bearer nope")]), &key).expect_err("wrong key");
        assert_ne!(missing, wrong, "the message says which");
        assert_eq!(missing.status(), 401);
    }
}
