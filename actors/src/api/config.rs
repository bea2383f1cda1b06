//! Settings of the HTTP API.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

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
}

impl Default for ApiConfig {
    /// Loopback port 8080, 1 MiB bodies, 60 s retry wait, 15 s keep-alives, 256 tokens by
    /// default, 5 s to shut down.
    fn default() -> Self {
        Self {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            body_limit: 1024 * 1024,
            retry_wait: Duration::from_secs(60),
            keepalive: Duration::from_secs(15),
            default_max_tokens: 256,
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}
