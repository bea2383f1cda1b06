//! The tasks of a request with several choices (`n`, or several prompts on
//! `/v1/completions`): started so that capacity takes all of them or none, and so that the
//! choices of one prompt share its prefill.
//!
//! The choices of one prompt are the same tokens up to their first sampled one. The first
//! choice is submitted alone; once it has produced its first event (its prompt is in its KV
//! cache), the others are submitted, and the runner's batch copies the prompt's positions
//! from the running sequence instead of prefilling them again (see the engine's `batch`).
//! Different prompts start side by side. Any refusal (429 at capacity, no instance) is the
//! answer, and dropping the handles already had cancels their tasks; a client error the
//! runner finds in the first choice (a prompt longer than the context) is answered with its
//! 400 without submitting the others.

use std::time::Instant;

use canopy_proto::GenerateRequest;
use futures::future::try_join_all;

use super::error::ApiError;
use super::state::AppState;
use super::task::ChatTask;
use crate::runner::{TaskEvent, TaskHandle};

/// A started choice: its task, its handle, and its first event when it was waited for.
pub(crate) struct Started {
    /// The task (its retry and accounting).
    pub(crate) task: ChatTask,
    /// Its events.
    pub(crate) handle: TaskHandle,
    /// Its first event, already taken from `handle`.
    pub(crate) first: Option<TaskEvent>,
}

/// Starts `requests`, consecutive groups of `per_prompt` of which share a prompt; in order.
pub(crate) async fn start(
    state: &AppState,
    model: &str,
    requests: Vec<GenerateRequest>,
    per_prompt: usize,
    received: Instant,
) -> Result<Vec<Started>, ApiError> {
    let per_prompt = per_prompt.max(1);
    let mut groups: Vec<Vec<GenerateRequest>> = Vec::new();
    for (i, request) in requests.into_iter().enumerate() {
        if i.is_multiple_of(per_prompt) {
            groups.push(Vec::new());
        }
        if let Some(group) = groups.last_mut() {
            group.push(request);
        }
    }
    let started = try_join_all(
        groups
            .into_iter()
            .map(|group| start_group(state, model, group, received)),
    )
    .await?;
    Ok(started.into_iter().flatten().collect())
}

async fn start_one(
    state: &AppState,
    model: &str,
    request: GenerateRequest,
    received: Instant,
) -> Result<Started, ApiError> {
    let mut task = ChatTask::new(state.clone(), model.to_string(), request, received);
    let handle = task.start().await?;
    Ok(Started {
        task,
        handle,
        first: None,
    })
}

/// The choices of one prompt: the first, then (after its first event) the others.
async fn start_group(
    state: &AppState,
    model: &str,
    mut group: Vec<GenerateRequest>,
    received: Instant,
) -> Result<Vec<Started>, ApiError> {
    let rest = group.split_off(1.min(group.len()));
    let Some(first) = group.pop() else {
        return Ok(Vec::new());
    };
    let mut lead = start_one(state, model, first, received).await?;
    if rest.is_empty() {
        return Ok(vec![lead]);
    }
    lead.first = tokio::select! {
        event = lead.handle.next() => event,
        () = state.closing.cancelled() => return Err(ApiError::shutting_down()),
    };
    if let Some(TaskEvent::Failed(err)) = &lead.first {
        let api_err = ApiError::from_runner(err);
        if api_err.is_client_error() {
            return Err(api_err);
        }
    }
    let others = try_join_all(
        rest.into_iter()
            .map(|request| start_one(state, model, request, received)),
    )
    .await?;
    let mut all = vec![lead];
    all.extend(others);
    Ok(all)
}
