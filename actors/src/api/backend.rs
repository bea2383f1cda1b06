//! The boundary between the HTTP API and the rest of the node.
//!
//! The API never talks to `RunnerSupervisor`s directly: it asks a [`Backend`], which knows
//! which model instances exist, which are Ready, and how to route a task to one of them. The
//! node plugs in an implementation that routes to its `RunnerSupervisor`s (and, later, to
//! remote instances); the tests plug in a scripted fake. Everything the API serves about the
//! cluster (`/v1/models`, `/ready`, `/state`, `/v1/actors`, and the Ollama API's
//! `/api/tags`, `/api/show`, `/api/ps`) comes from here.

use std::collections::BTreeMap;
use std::time::Duration;

use canopy_proto::GenerateRequest;
use canopy_runtime::introspect::ActorReport;
use futures::future::BoxFuture;
use serde::Serialize;

use super::views::{ClusterActors, StateView};
use crate::placement::{PlaceError, PlaceRequest, Placed};
use crate::runner::{RunnerError, TaskHandle};

/// A model the node can serve, as listed by `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelInfo {
    /// The model's id, as clients name it in `model`.
    pub id: String,
    /// When the model was first placed (unix seconds).
    pub created: u64,
    /// Who owns it (OpenAI's `owned_by`; Canopy uses `"canopy"` unless told otherwise).
    pub owned_by: String,
    /// Whether at least one instance of it is Ready now.
    pub ready: bool,
}

/// What is known about a model beyond [`ModelInfo`]: its file, when it is on this node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelDetails {
    /// The model as `GET /v1/models` lists it.
    pub info: ModelInfo,
    /// Its file, when an instance of it on this node loads one this node can read (none for
    /// models served only by other nodes, or loaded by name by a test engine).
    pub file: Option<ModelFile>,
}

/// A model file's facts, read from the file itself (its GGUF header).
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct ModelFile {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Last modification (unix seconds).
    pub modified: u64,
    /// The file's sha256 (lowercase hex), once computed: hashing a large file takes a while,
    /// so it runs in the background the first time the file is described, and is absent
    /// until it is done.
    pub sha256: Option<String>,
    /// The file format (`gguf`).
    pub format: String,
    /// `general.architecture` (`llama`).
    pub family: Option<String>,
    /// Weights in the file (all tensors' elements).
    pub parameters: u64,
    /// The quantization of most weights (from `general.file_type`: `Q4_1`, `F16`, ...).
    pub quantization: Option<String>,
    /// The context the model was trained for (`<architecture>.context_length`).
    pub context_length: Option<u64>,
    /// The chat template's Jinja source (`tokenizer.chat_template`), if the file has one.
    pub chat_template: Option<String>,
    /// The file's scalar metadata (numbers, booleans, strings; not arrays), by key; the chat
    /// template is not repeated here.
    pub metadata: BTreeMap<String, serde_json::Value>,
}

/// Why a task could not be submitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum SubmitError {
    /// No instance of this model is placed anywhere (HTTP 404).
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    /// The model is placed, but no instance of it is Ready (or none became Ready within the
    /// wait the caller allowed) (HTTP 503).
    #[error("no instance of model `{0}` is ready")]
    NoReadyInstance(String),
    /// Every Ready instance of the model is at capacity (HTTP 429).
    #[error("every instance of model `{0}` is at capacity")]
    Busy(String),
    /// The chosen runner refused or lost the task.
    #[error(transparent)]
    Runner(#[from] RunnerError),
}

/// What the API needs from the node.
///
/// Every future must resolve in bounded time: the API adds no timeout of its own around
/// [`Backend::submit`] beyond what it asks for with `wait_ready`, so a backend that waits
/// for an acknowledgement must bound that wait itself (the `RunnerSupervisor`'s stall
/// timeouts already do).
pub trait Backend: Send + Sync + 'static {
    /// Models with at least one placed instance.
    fn models(&self) -> Vec<ModelInfo>;

    /// Whether any instance of any model is Ready.
    fn ready(&self) -> bool;

    /// Submits a task to a Ready instance of `model` and resolves once the instance has
    /// acknowledged it.
    ///
    /// With `wait_ready = None` it fails at once with [`SubmitError::NoReadyInstance`] when
    /// no instance is Ready; with `Some(d)` it first waits up to `d` for one to become Ready
    /// (the API uses this to retry a task whose runner died before producing anything).
    /// Dropping the returned [`TaskHandle`] cancels the task; dropping the future before it
    /// resolves must not leave a task running either.
    fn submit(
        &self,
        model: &str,
        request: GenerateRequest,
        wait_ready: Option<Duration>,
    ) -> BoxFuture<'static, Result<TaskHandle, SubmitError>>;

    /// What is known about `model` (`None`: no instance of it is placed). The default knows
    /// only what [`Backend::models`] says; a node that can read its models' files adds them.
    fn model_details(&self, model: &str) -> BoxFuture<'static, Option<ModelDetails>> {
        let details = self
            .models()
            .into_iter()
            .find(|m| m.id == model)
            .map(|info| ModelDetails { info, file: None });
        Box::pin(async move { details })
    }

    /// The node's instances and runners with their statuses, as served by `GET /state`.
    fn state(&self) -> BoxFuture<'static, StateView>;

    /// The live actor tree, as served by `GET /v1/actors` (none before the node's
    /// supervisor is up).
    fn actors(&self) -> BoxFuture<'static, Option<ActorReport>>;

    /// Every node's actor tree (`GET /v1/cluster/actors`); `None` without a cluster.
    fn cluster_actors(&self) -> Option<BoxFuture<'static, ClusterActors>> {
        None
    }

    /// The node's event log (`GET /v1/events`); `None`: this backend keeps no events.
    fn events(&self) -> Option<crate::events::EventLog> {
        None
    }

    /// Places model instances (`POST /instances`), answering once they are Ready.
    fn place(&self, request: PlaceRequest) -> BoxFuture<'static, Result<Vec<Placed>, PlaceError>> {
        let _ = request;
        Box::pin(async { Err(PlaceError::Unsupported) })
    }

    /// Deletes an instance (`DELETE /instances/{id}`).
    fn delete_instance(&self, instance: String) -> BoxFuture<'static, Result<(), PlaceError>> {
        let _ = instance;
        Box::pin(async { Err(PlaceError::Unsupported) })
    }
}
