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
    /// When the running attempt was acknowledged by a runner.
    acknowledged: Option<Instant>,
    /// When the first output arrived.
    first_output: Option<Instant>,
    produced: bool,
    retried: bool,
}

/// Where a finished task's time went, for APIs that report it (Ollama's durations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Timings {
    /// From the HTTP request's arrival to the end of the task.
    pub(crate) total: Duration,
    /// From the request's arrival until a runner acknowledged the task (finding an
    /// instance, queueing, a retry's wait): the model itself is always loaded already.
    pub(crate) load: Duration,
    /// From the acknowledgement to the first output (queueing in the batch and prefill).
    pub(crate) prompt_eval: Duration,
    /// From the first output to the end (decoding).
    pub(crate) eval: Duration,
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
            acknowledged: None,
            first_output: None,
            produced: false,
            retried: false,
        }
    }

    /// Accounts for a chunk of output.
    pub(crate) fn on_chunk(&mut self, chunk: &TokenChunk) {
        if !self.produced {
            self.produced = true;
            self.first_output = Some(Instant::now());
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

    /// Where the task's time went, measured now (call it when the task is done).
    pub(crate) fn timings(&self) -> Timings {
        let now = Instant::now();
        let acknowledged = self
            .acknowledged
            .unwrap_or(self.received)
            .max(self.received);
        let first = self.first_output.unwrap_or(now).max(acknowledged);
        Timings {
            total: now.duration_since(self.received),
            load: acknowledged.duration_since(self.received),
            prompt_eval: first.duration_since(acknowledged),
            eval: now.saturating_duration_since(first),
        }
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

    async fn submit(&mut self, wait_ready: Option<Duration>) -> Result<TaskHandle, SubmitError> {
        let handle = self
            .state
            .backend
            .submit(&self.model, self.request.clone(), wait_ready)
            .await?;
        self.acknowledged = Some(Instant::now());
        Ok(handle)
    }
}
