//! The HTTP API of a Canopy node: OpenAI-compatible chat and legacy completions, Ollama's
//! API, Anthropic's Messages API, the model list, health/readiness probes, Prometheus metrics
//! and introspection, served by the [`ApiActor`] with axum.
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/chat/completions` | a `chat.completion`, or an SSE stream of `chat.completion.chunk`s ending in `data: [DONE]` |
//! | `POST /v1/completions` | a `text_completion` (raw prompt, no chat template; one choice per prompt), or an SSE stream of them ending in `data: [DONE]` |
//! | `POST /api/chat`, `POST /api/generate`, `GET /api/tags`, `POST /api/show`, `GET /api/ps`, `GET /api/version` | Ollama's API (NDJSON streams by default, `{"error": "..."}` errors; see `ollama`) |
//! | `POST /v1/messages` | Anthropic's Messages API: a `message`, or an SSE stream of named events (`message_start` ... `message_stop`); see `anthropic` |
//! | `GET /v1/models`, `GET /v1/models/{model}` | models with a placed instance (OpenAI list / model shape, plus `ready`) |
//! | `GET /health` | 200 while the process serves |
//! | `GET /ready` | 200 when an instance of some model is Ready, else 503 |
//! | `GET /metrics` | Prometheus text ([`Metrics`]) |
//! | `GET /state`, `GET /v1/actors` | instances and runners ([`StateView`]), and the actor tree, from the [`Backend`] |
//!
//! Every error, including a malformed body, an unknown route or a body over the limit, is
//! answered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}` (see `error`
//! for the status mapping), except under `/api/`, where Ollama's clients expect
//! `{"error": "message"}`, and on `/v1/messages`, where Anthropic's expect `{"type": "error",
//! "error": {"type", "message"}}` (same statuses). The API reaches the rest of the node only through the
//! [`Backend`] trait.
//!
//! Security (see `guard`, `server` and `extract`): with an API key set, every route but
//! `/health` needs `Authorization: Bearer <key>` or `x-api-key: <key>` (Anthropic's
//! clients send the latter) (401); a `Host` header that is not an IP
//! literal, `localhost` or an allowed name is a 403 (DNS rebinding); JSON endpoints demand
//! `Content-Type: application/json` (415), so a web page cannot post to them without a CORS
//! preflight, which is never granted; headers must arrive within `header_timeout`, bodies
//! within `body_timeout` (408); connections past `max_connections` are answered 503; an
//! oversized body is read and discarded (up to `drain_limit`) so the client sees its 413.
//!
//! Reliability decisions:
//! - a request's task belongs to its handler, and for streams to the SSE body: a client
//!   that disconnects drops the `TaskHandle`, which cancels the task in the runner;
//! - a runner that dies before a task produced output costs the client nothing: the task is
//!   retried once, after waiting up to `retry_wait` for a Ready instance (streams too, since
//!   nothing but the role chunk has been sent); any later or second failure reaches the
//!   client at once, as a 502 (or an SSE error event followed by `[DONE]`);
//! - capacity: tasks queue in the runner supervisors up to their `max_tasks` (counting tasks
//!   queued and running at the runner; by default its batch's `parallel` plus 16 waiting);
//!   beyond that the request is answered 429 with `Retry-After`;
//! - a client error the runner finds (a prompt longer than the context) is a 400, never
//!   retried and never a runner failure, for streams too as long as no token was sent;
//! - shutdown is bounded: open requests get `shutdown_timeout` to finish, then are ended
//!   (503, or an SSE error event and `[DONE]`), which cancels their tasks.

mod actor;
mod anthropic;
mod backend;
mod chat;
mod choices;
mod completion_request;
mod completions;
mod config;
mod dashboard;
mod error;
mod events;
mod extract;
mod guard;
mod metrics;
mod models;
mod observe;
mod ollama;
mod openapi;
mod ops;
mod output;
mod request;
mod response;
mod routes;
mod server;
mod state;
mod stream;
mod task;
mod tools;
mod views;

pub use actor::{ApiActor, ApiActorError, ApiArgs, ApiMsg, ApiState, CLOSE_GRACE};
pub use backend::{Backend, ModelDetails, ModelFile, ModelInfo, SubmitError};
pub use config::{ApiConfig, ApiKey, ApiKeyError, MAX_API_KEY_LEN, MIN_API_KEY_LEN};
pub use metrics::Metrics;
pub use routes::router;
pub use server::{OVERFLOW_DEADLINE, OVERFLOW_SLOTS};
pub use views::{
    ClusterActors, ClusterState, InstanceView, LocalInstanceView, LocalState, NodeActors, NodeView,
    StateView,
};
