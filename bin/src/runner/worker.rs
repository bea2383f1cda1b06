//! The worker: the one thread that drives the engine, from the [`JobQueue`].
//!
//! For a load it reports `Status(Loading)`, a `LoadProgress` per layer, `Status(Loaded)`, runs
//! the warm-up, then `Status(Ready)` and a `Batch` report; a failed load or warm-up is
//! `LoadFailed` and `Status(Failed)`, and the runner stays up to be told to load again.
//!
//! A generate task reports `Started`, `Status(Running)`, a `Progress` per phase, a `Chunk` per
//! piece of output, and exactly one of `Done` or `TaskError`; then `Status(Ready)` once nothing
//! else is queued or running. A task that arrives before a model is loaded (or after loading
//! failed) ends with `TaskError("model not loaded")` without starting.
//!
//! **Batching engines** ([`Engine::batching`]) run many tasks at once: the worker takes every
//! queued task, admits tasks into the engine's batch in arrival order while it has room
//! (`Started` when a task joins; the rest wait, still cancellable), runs one batched step,
//! answers the tasks that ended, and repeats. A cancelled task leaves the batch before the
//! next step; the others go on. A load waits until the batch is empty. Other engines run one
//! task at a time through [`Engine::generate`]. Either way a `Batch` frame reports the running
//! and queued tasks, KV memory and prefix-cache counters whenever they change (at most a few
//! times a second while only the counters move).
//!
//! The worker stops when the queue is closed (after answering every task it had taken);
//! dropping its `done` sender tells the stdin reader it has stopped.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use canopy_engine::{Admission, BatchReport, BatchSink, Engine, EngineError, GenerateSink, SeqId};
use canopy_proto::{
    BatchStats, FinishReason, FromRunner, LoadSpec, Phase, RunnerStatus, TaskErrorKind, TaskId,
    TokenChunk, Usage,
};

use super::fault::FaultInjector;
use super::outbox::Outbox;
use super::queue::{Job, JobQueue, Take, Task};

/// Least time between two `Batch` frames that differ only in counters.
const STATS_EVERY: Duration = Duration::from_millis(250);

/// The worker's state: the engine and whether it holds a usable model.
pub struct Worker {
    engine: Box<dyn Engine>,
    loaded: bool,
    outbox: Arc<Outbox>,
    queue: Arc<JobQueue>,
    faults: Arc<FaultInjector>,
    /// Tasks taken from the queue that wait for a place in the batch.
    waiting: VecDeque<Task>,
    /// Tasks in the batch, with their cancellation flags.
    running: HashMap<TaskId, Arc<AtomicBool>>,
    /// The last `Batch` frame sent, and when.
    reported: Option<(BatchStats, Instant)>,
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
            waiting: VecDeque::new(),
            running: HashMap::new(),
            reported: None,
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

    fn busy(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    fn run(mut self) {
        loop {
            let job = if self.busy() {
                match self.queue.try_next() {
                    Take::Job(job) => Some(job),
                    Take::Empty | Take::Closed => None,
                }
            } else {
                match self.queue.next() {
                    Some(job) => Some(job),
                    None => break,
                }
            };
            match job {
                Some(Job::Load(spec)) => {
                    self.drain_batch();
                    self.load(&spec);
                }
                Some(Job::Generate(task)) => {
                    if self.loaded && self.engine.batching().is_some() {
                        self.waiting.push_back(task);
                    } else {
                        let id = task.id;
                        self.report(true, 1);
                        self.generate(task);
                        self.queue.finish(id);
                        self.report(true, 0);
                    }
                }
                None => {
                    self.admit();
                    if !self.running.is_empty() {
                        self.step();
                    }
                    self.report(false, 0);
                }
            }
            if !self.busy() && self.queue.idle() && self.loaded {
                self.outbox.status(RunnerStatus::Ready);
            }
        }
        tracing::debug!("worker stopped");
    }

    /// Runs the batch until every running task has ended (admitting nothing new).
    fn drain_batch(&mut self) {
        while !self.running.is_empty() {
            self.step();
        }
    }

    /// Admits waiting tasks into the batch in arrival order while it has room.
    fn admit(&mut self) {
        while let Some(task) = self.waiting.front() {
            let (id, cancelled) = (task.id, task.cancel.load(Ordering::SeqCst));
            if cancelled {
                self.waiting.pop_front();
                self.done(id, FinishReason::Cancelled, Usage::default());
                self.queue.finish(id);
                continue;
            }
            let Some(batch) = self.engine.batching() else {
                // The model went away (a failed reload): nothing can run.
                self.waiting.pop_front();
                self.task_error(id, &EngineError::NotLoaded);
                self.queue.finish(id);
                continue;
            };
            match batch.join(id, &task.request) {
                Ok(Admission::Joined) => {
                    let Some(task) = self.waiting.pop_front() else {
                        break;
                    };
                    tracing::debug!(task_id = id, "task joined the batch");
                    self.outbox.send(&FromRunner::Started { task_id: id });
                    self.outbox.status(RunnerStatus::Running);
                    self.running.insert(id, task.cancel);
                    self.faults.on_generate_started();
                }
                Ok(Admission::Wait) if self.running.is_empty() => {
                    // Nothing running will ever make room: refuse rather than wait forever.
                    self.waiting.pop_front();
                    let err = EngineError::InvalidRequest(
                        "the request needs more KV memory than this instance has".into(),
                    );
                    self.task_error(id, &err);
                    self.queue.finish(id);
                }
                Ok(Admission::Wait) => break,
                Err(err) => {
                    self.waiting.pop_front();
                    tracing::warn!(task_id = id, %err, "task refused");
                    self.task_error(id, &err);
                    self.queue.finish(id);
                }
            }
        }
    }

    /// One batched step; answers the tasks that ended.
    fn step(&mut self) {
        let Some(batch) = self.engine.batching() else {
            for (id, _) in std::mem::take(&mut self.running) {
                Self::send_task_error(&self.outbox, id, &EngineError::NotLoaded);
                self.queue.finish(id);
            }
            return;
        };
        let mut sink = BatchTasks {
            outbox: &self.outbox,
            running: &self.running,
            faults: &self.faults,
        };
        let finished = batch.step(&mut sink);
        for ended in finished {
            let id: TaskId = ended.id;
            self.running.remove(&id);
            match ended.result {
                Ok(outcome) => self.done(id, outcome.finish_reason, outcome.usage),
                Err(err) => {
                    tracing::warn!(task_id = id, %err, "task failed");
                    self.task_error(id, &err);
                }
            }
            self.queue.finish(id);
        }
    }

    /// Sends a `Batch` frame if anything changed: at once when the tasks did (or `force`),
    /// otherwise at most every [`STATS_EVERY`]. `solo_running` is a non-batching engine's
    /// running task (0 or 1).
    fn report(&mut self, force: bool, solo_running: usize) {
        if !self.loaded {
            return;
        }
        let queued = self.waiting.len() + self.queue.queued();
        let report = match self.engine.batching() {
            Some(batch) => batch.report(),
            None => BatchReport {
                parallel: 1,
                running: solo_running,
                ..BatchReport::default()
            },
        };
        let stats = BatchStats {
            parallel: report.parallel as u32,
            running: report.running as u32,
            queued: queued as u32,
            last_step_rows: report.last_step_rows as u32,
            kv_bytes: report.kv_bytes,
            kv_capacity_bytes: report.kv_capacity_bytes,
            prefix_hits: report.prefix_hits,
            prefix_reused_tokens: report.prefix_reused_tokens,
            prefilled_tokens: report.prefilled_tokens,
        };
        let send = match &self.reported {
            None => true,
            Some((last, _)) if *last == stats => false,
            Some((last, at)) => {
                force
                    || last.running != stats.running
                    || last.queued != stats.queued
                    || at.elapsed() >= STATS_EVERY
            }
        };
        if send {
            self.outbox.send(&FromRunner::Batch(stats));
            self.reported = Some((stats, Instant::now()));
        }
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
                self.reported = None;
                self.report(true, 0);
            }
            Err(err) => {
                tracing::error!(model = %spec.model, %err, "load failed");
                self.outbox.send(&FromRunner::LoadFailed {
                    error: err.to_string(),
                });
                self.outbox.status(RunnerStatus::Failed);
            }
        }
    }

    fn generate(&mut self, task: Task) {
        let task_id = task.id;
        if !self.loaded {
            tracing::warn!(task_id, "generate before a model is loaded");
            self.task_error(task_id, &EngineError::NotLoaded);
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
                self.task_error(task_id, &err);
            }
        }
    }

    fn task_error(&self, task_id: TaskId, err: &EngineError) {
        Self::send_task_error(&self.outbox, task_id, err);
    }

    fn send_task_error(outbox: &Outbox, task_id: TaskId, err: &EngineError) {
        outbox.send(&FromRunner::TaskError {
            task_id,
            error: err.to_string(),
            kind: error_kind(err),
        });
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

/// Turns what a batch reports about its sequences into frames, and tells it which tasks were
/// cancelled.
struct BatchTasks<'a> {
    outbox: &'a Outbox,
    running: &'a HashMap<TaskId, Arc<AtomicBool>>,
    faults: &'a FaultInjector,
}

impl BatchSink for BatchTasks<'_> {
    fn phase(&mut self, id: SeqId, phase: Phase) {
        self.outbox
            .send(&FromRunner::Progress { task_id: id, phase });
    }

    fn chunk(&mut self, id: SeqId, chunk: TokenChunk) -> ControlFlow<()> {
        self.outbox.send(&FromRunner::Chunk { task_id: id, chunk });
        self.faults.on_chunk_sent();
        if self.cancelled(id) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn cancelled(&self, id: SeqId) -> bool {
        self.running
            .get(&id)
            .is_none_or(|flag| flag.load(Ordering::SeqCst))
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
