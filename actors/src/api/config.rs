//! Settings of the HTTP API.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How the API listens and how it treats requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// The exact address to listen on (port 0 picks a free port; ask the actor for
    /// the real one with `ApiMsg::LocalAddr`). Nothing else is bound.
    pub addr: SocketAddr,
    /// Largest accepted request body in bytes; larger ones get 413.
    pub body_limit: usize,
    /// How long a request whose runner died before producing anything waits for an instance
    /// of its model to be Ready again before its single retry is given up.
    pub retry_wait: Duration,
    /// Interval of the keep-alive comments on SSE streams.
    pub keepalive: Duration,
    /// `max_tokens` when the request sets neither `max_tokens` nor `max_completion_tokens`.
    pub default_max_tokens: u32,
    /// How long stopping the actor waits for open connections (e.g. streams) to finish
    /// before it drops them.
    pub shutdown_timeout: Duration,
    /// When set, every request but `GET /health` must carry `Authorization: Bearer <key>`
    /// (or `x-api-key: <key>`, as Anthropic's clients send it).
    pub api_key: Option<ApiKey>,
    /// Host names (without port, compared case-insensitively) accepted in the `Host` header
    /// besides IP literals and `localhost`; `*` accepts any. Defends against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// How long a connection may take to send a request's headers, an idle keep-alive
    /// connection included; then it is closed.
    pub header_timeout: Duration,
    /// How long reading a request's body may take; then the request gets 408.
    pub body_timeout: Duration,
    /// Most connections served at once; the next ones are answered 503 and closed.
    pub max_connections: usize,
    /// How much of an oversized body is read (and discarded) so that a client that writes
    /// its whole body before reading still sees the 413; past it the connection is closed.
    pub drain_limit: usize,
}

impl Default for ApiConfig {
    /// Loopback port 8080, 1 MiB bodies, 60 s retry wait, 15 s keep-alives, 256 tokens by
    /// default, 5 s to shut down, no API key, 10 s for headers, 30 s for a body, 1024
    /// connections, up to 64 MiB of an oversized body drained.
    fn default() -> Self {
        Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            body_limit: 1024 * 1024,
            retry_wait: Duration::from_secs(60),
            keepalive: Duration::from_secs(15),
            default_max_tokens: 256,
            shutdown_timeout: Duration::from_secs(5),
            api_key: None,
            allowed_hosts: Vec::new(),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            max_connections: 1024,
            drain_limit: 64 * 1024 * 1024,
        }
    }
}

/// The shortest API key accepted.
pub const MIN_API_KEY_LEN: usize = 16;
/// The longest API key accepted.
pub const MAX_API_KEY_LEN: usize = 512;

/// A secret clients present as `Authorization: Bearer <key>`. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

/// Why a string is not usable as an API key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    /// Shorter than [`MIN_API_KEY_LEN`].
    #[error(
        "the API key is {0} characters long; use at least {MIN_API_KEY_LEN} (e.g. the output of \
         `openssl rand -hex 32`)"
    )]
    TooShort(usize),
    /// Longer than [`MAX_API_KEY_LEN`].
    #[error("the API key is {0} characters long; at most {MAX_API_KEY_LEN} are accepted")]
    TooLong(usize),
    /// Holds a character a header value cannot carry (a space, a control character or
    /// non-ASCII).
    #[error(
        "the API key holds a space, a control or a non-ASCII character; use printable ASCII only"
    )]
    BadCharacter,
}

impl ApiKey {
    /// Checks `key` (surrounding whitespace, e.g. a key file's final newline, is trimmed).
    pub fn new(key: &str) -> Result<ApiKey, ApiKeyError> {
        let key = key.trim();
        if key.len() < MIN_API_KEY_LEN {
            return Err(ApiKeyError::TooShort(key.len()));
        }
        if key.len() > MAX_API_KEY_LEN {
            return Err(ApiKeyError::TooLong(key.len()));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ApiKeyError::BadCharacter);
        }
        Ok(ApiKey(key.into()))
    }

    /// The key itself (to send it, e.g. from the CLI client).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the key, in time independent of where they differ and of
    /// the key's length (both sides are hashed first).
    pub fn matches(&self, presented: &[u8]) -> bool {
        let ours = Sha256::digest(self.0.as_bytes());
        let theirs = Sha256::digest(presented);
        ours.as_slice().ct_eq(theirs.as_slice()).into()
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_checked_and_never_printed() {
        let key = ApiKey::new("  0123456789abcdef0123\n").expect("a good key");
        assert_eq!(key.expose(), "0123456789abcdef0123");
        assert!(key.matches(b"0123456789abcdef0123"));
        assert!(!key.matches(b"0123456789abcdef012"));
        assert!(!key.matches(b""));
        assert!(!format!("{key:?}").contains("0123"));
        assert_eq!(ApiKey::new("short"), Err(ApiKeyError::TooShort(5)));
        assert_eq!(
            ApiKey::new("0123456789 abcdef0123"),
            Err(ApiKeyError::BadCharacter)
        );
        assert_eq!(
            ApiKey::new(&"k".repeat(600)),
            Err(ApiKeyError::TooLong(600))
        );
    }
}
