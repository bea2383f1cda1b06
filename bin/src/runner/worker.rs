//! The worker: the one thread that drives the engine, a job at a time, from the [`JobQueue`].
//!
//! For a load it reports `Status(Loading)`, a `LoadProgress` per layer, `Status(Loaded)`, runs
//! the warm-up, then `Status(Ready)`; a failed load or warm-up is `LoadFailed` and
//! `Status(Failed)`, and the runner stays up to be told to load again.
//!
//! For a generate task it reports `Started`, `Status(Running)`, a `Progress` per phase, a
//! `Chunk` per piece of output, and exactly one of `Done` or `TaskError`; then `Status(Ready)`
//! once nothing else is queued. A task that arrives before a model is loaded (or after loading
//! failed) ends with `TaskError("model not loaded")` without starting.
//!
//! The worker stops when the queue is closed; dropping its `done` sender tells the stdin
//! reader it has stopped.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::{self, JoinHandle};

use canopy_engine::{Engine, EngineError, GenerateSink};
use canopy_proto::{
    FinishReason, FromRunner, LoadSpec, Phase, RunnerStatus, TaskErrorKind, TaskId, TokenChunk,
    Usage,
};

use super::fault::FaultInjector;
use super::outbox::Outbox;
use super::queue::{Job, JobQueue, Task};

/// The worker's state: the engine and whether it holds a usable model.
pub struct Worker {
    engine: Box<dyn Engine>,
    loaded: bool,
    outbox: Arc<Outbox>,
    queue: Arc<JobQueue>,
    faults: Arc<FaultInjector>,
}

impl Worker {
    /// A worker for `engine`, which has no model loaded yet.
    pub fn new(
        engine: Box<dyn Engine>,
        outbox: Arc<Outbox>,
        queue: Arc<JobQueue>,
        faults: Arc<FaultInjector>,
    ) -> Self {
        Self {
            engine,
            loaded: false,
            outbox,
            queue,
            faults,
        }
    }

    /// Runs the worker on its own thread until the queue closes; `done` is dropped when it
    /// stops.
    pub fn spawn(self, done: Sender<()>) -> std::io::Result<JoinHandle<()>> {
        thread::Builder::new()
            .name("worker".to_string())
            .spawn(move || {
                let _done = done;
                self.run();
            })
    }

    fn run(mut self) {
        while let Some(job) = self.queue.next() {
            match job {
                Job::Load(spec) => self.load(&spec),
                Job::Generate(task) => self.generate(task),
            }
            if self.queue.finish_current() && self.loaded {
                self.outbox.status(RunnerStatus::Ready);
            }
        }
        tracing::debug!("worker stopped");
    }

    fn load(&mut self, spec: &LoadSpec) {
        tracing::info!(model = %spec.model, "loading");
        self.loaded = false;
        self.outbox.status(RunnerStatus::Loading);
        self.faults.on_load_started();
        let outbox = &self.outbox;
        let result = self
            .engine
            .load(spec, &mut |done, total| {
                tracing::debug!(done, total, "load progress");
                outbox.send(&FromRunner::LoadProgress { done, total });
            })
            .and_then(|()| {
                outbox.status(RunnerStatus::Loaded);
                self.engine.warm_up()
            });
        match result {
            Ok(()) => {
                tracing::info!(model = %spec.model, "model ready");
                self.loaded = true;
                self.outbox.status(RunnerStatus::Ready);
            }
            Err(err) => {
                tracing::error!(model = %spec.model, %err, "load failed");
                self.outbox.send(&FromRunner::LoadFailed {
                    error: err.to_string(),
                    kind: error_kind(&err),
                });
                self.outbox.status(RunnerStatus::Failed);
            }
        }
    }

    fn generate(&mut self, task: Task) {
        let task_id = task.id;
        if !self.loaded {
            tracing::warn!(task_id, "generate before a model is loaded");
            self.outbox.send(&FromRunner::TaskError {
                task_id,
                error: EngineError::NotLoaded.to_string(),
                kind: TaskErrorKind::Internal,
            });
            return;
        }
        tracing::debug!(task_id, "task started");
        self.outbox.send(&FromRunner::Started { task_id });
        self.outbox.status(RunnerStatus::Running);
        self.faults.on_generate_started();
        if task.cancel.load(Ordering::SeqCst) {
            self.done(task_id, FinishReason::Cancelled, Usage::default());
            return;
        }
        let mut sink = TaskSink {
            task_id,
            outbox: &self.outbox,
            cancel: &task.cancel,
            faults: &self.faults,
        };
        match self.engine.generate(&task.request, &mut sink) {
            Ok(outcome) => self.done(task_id, outcome.finish_reason, outcome.usage),
            Err(err) => {
                tracing::warn!(task_id, %err, "task failed");
                self.outbox.send(&FromRunner::TaskError {
                    task_id,
                    error: err.to_string(),
                });
            }
        }
    }

    fn done(&self, task_id: TaskId, finish_reason: FinishReason, usage: Usage) {
        tracing::debug!(task_id, ?finish_reason, ?usage, "task done");
        self.outbox.send(&FromRunner::Done {
            task_id,
            finish_reason,
            usage,
        });
    }
}

/// Turns what the engine reports about one task into frames, and tells it about cancellation.
struct TaskSink<'a> {
    task_id: TaskId,
    outbox: &'a Outbox,
    cancel: &'a AtomicBool,
    faults: &'a FaultInjector,
}

impl GenerateSink for TaskSink<'_> {
    fn phase(&mut self, phase: Phase) {
        self.outbox.send(&FromRunner::Progress {
            task_id: self.task_id,
            phase,
        });
    }

    fn chunk(&mut self, chunk: TokenChunk) -> ControlFlow<()> {
        self.outbox.send(&FromRunner::Chunk {
            task_id: self.task_id,
            chunk,
        });
        self.faults.on_chunk_sent();
        if self.cancelled() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// Whose fault a failed task was, for the API's status code.
fn error_kind(err: &EngineError) -> TaskErrorKind {
    match err {
        EngineError::ContextLengthExceeded { .. } => TaskErrorKind::ContextLengthExceeded,
        EngineError::InvalidRequest(_) => TaskErrorKind::InvalidRequest,
        _ => TaskErrorKind::Internal,
    }
}
