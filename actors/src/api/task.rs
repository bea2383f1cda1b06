//! One request's task on the node: its submission, its single transparent retry, and the
//! accounting of its tokens (time to first token, tokens generated, prompt tokens).
//!
//! A runner that dies before a task produced anything has not shown the client anything
//! either, so the task can be run again elsewhere (or on the restarted runner) without the
//! client noticing. [`ChatTask`] submits a request and allows exactly one such retry: it
//! waits up to `retry_wait` for an instance of the model to be Ready again, then resubmits.
//! Any other failure, a second failure, or a failure after output, is final.
//!
//! Streams use the same retry: until the first token arrives a stream has only sent its role
//! chunk (and keep-alive comments, which also keep the connection open during the wait), so
//! a retried stream is indistinguishable from a slow one.

use std::time::{Duration, Instant};

use canopy_proto::{GenerateRequest, TokenChunk, Usage};

use super::backend::SubmitError;
use super::error::ApiError;
use super::state::AppState;
use crate::runner::{RunnerError, TaskHandle};

/// A request's task, whether it produced output, and whether its retry is spent.
pub(crate) struct ChatTask {
    state: AppState,
    model: String,
    request: GenerateRequest,
    received: Instant,
    produced: bool,
    retried: bool,
}

/// Whether `err` is a runner death before the task produced anything.
fn died_before_output(err: &RunnerError) -> bool {
    matches!(
        err,
        RunnerError::RunnerFailed { started: false, .. }
            | RunnerError::PeerLost { started: false, .. }
    )
}

impl ChatTask {
    /// A task of `request` for `model`, not yet submitted; `received` is when the HTTP
    /// request arrived (time to first token counts from there).
    pub(crate) fn new(
        state: AppState,
        model: String,
        request: GenerateRequest,
        received: Instant,
    ) -> Self {
        Self {
            state,
            model,
            request,
            received,
            produced: false,
            retried: false,
        }
    }

    /// Accounts for a chunk of output.
    pub(crate) fn on_chunk(&mut self, chunk: &TokenChunk) {
        if !self.produced {
            self.produced = true;
            self.state
                .metrics
                .time_to_first_token(&self.model, self.received.elapsed());
        }
        self.state
            .metrics
            .tokens_generated(&self.model, chunk.token_ids.len());
    }

    /// Accounts for the task's end.
    pub(crate) fn on_done(&self, usage: Usage) {
        self.state
            .metrics
            .prompt_tokens(&self.model, usage.prompt_tokens);
    }

    /// The model asked for.
    pub(crate) fn model(&self) -> &str {
        &self.model
    }

    /// Submits the task to a Ready instance (no waiting for one); a runner that dies before
    /// acknowledging it spends the retry.
    pub(crate) async fn start(&mut self) -> Result<TaskHandle, ApiError> {
        match self.submit(None).await {
            Ok(handle) => Ok(handle),
            Err(SubmitError::Runner(err)) => self.retry(err).await,
            Err(err) => Err(ApiError::from_submit(&err)),
        }
    }

    /// Handles a failure of the running task: a fresh handle if the failure allows the
    /// retry (a runner death, nothing produced, retry not spent), else the client's error.
    pub(crate) async fn retry(&mut self, err: RunnerError) -> Result<TaskHandle, ApiError> {
        if self.produced || self.retried || !died_before_output(&err) {
            return Err(ApiError::from_runner(&err));
        }
        self.retried = true;
        let wait = self.state.config.retry_wait;
        tracing::warn!(model = %self.model, error = %err, wait_s = wait.as_secs_f64(),
            "runner died before the task produced output; retrying once");
        self.state.metrics.retry(&self.model);
        self.submit(Some(wait)).await.map_err(|retry_err| {
            ApiError::from_runner(&err)
                .context(format!("retried once; that failed too: {retry_err}"))
        })
    }

    async fn submit(&self, wait_ready: Option<Duration>) -> Result<TaskHandle, SubmitError> {
        self.state
            .backend
            .submit(&self.model, self.request.clone(), wait_ready)
            .await
    }
}
