//! `canopy runner`: the child process that hosts one inference engine for a supervisor.
//!
//! A runner speaks the supervisor <-> runner protocol of `canopy_proto::runner`: length-prefixed
//! MessagePack frames, [`ToRunner`] on stdin and [`FromRunner`] on stdout; stderr carries logs.
//! It is plain blocking code on OS threads:
//!
//! - the **main thread** (this module) reads frames from stdin and reacts at once: `Ack`s a
//!   task as soon as it is queued, cancels tasks, runs the shutdown;
//! - the **heartbeat** thread ([`heartbeat`]) beats every `--heartbeat-ms`, independent of the
//!   work, so a busy runner still beats and a frozen one does not;
//! - the **worker** thread ([`worker`]) drives the engine one job at a time from the
//!   [`queue`];
//! - every frame goes through one [`outbox`], so frames never interleave.
//!
//! Exit codes: `0` after a requested `Shutdown`, or when the supervisor is gone (stdin closed,
//! stdout closed, parent dead); `2` on a protocol error (bad handshake, wrong version, a frame
//! that does not decode, a frame out of place) or bad arguments (clap's usage error code);
//! `1` on an internal error; `101` on a panic in any thread (a panicking engine must not leave
//! a half-dead runner behind). Faults injected for tests ([`fault`]) may end it any other way.
//!
//! Shutdown: `Status(ShuttingDown)`, every queued and running task is cancelled (each ends with
//! `Done { Cancelled }`), the worker gets up to [`SHUTDOWN_GRACE`] to finish its current token,
//! then `Status(Shutdown)` and exit 0. A closed stdin cancels the work and exits 0 at once:
//! nobody is listening any more.

mod args;
mod fault;
mod heartbeat;
mod outbox;
mod parent;
mod queue;
mod stdio;
mod worker;

use std::io::Read;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::Context;
use canopy_engine::FaultHooks;
use canopy_proto::{
    FinishReason, FromRunner, Handshake, MAX_FRAME_LEN, RunnerStatus, TaskId, ToRunner, Usage,
    read_frame,
};

pub use args::RunnerArgs;

use fault::{FaultInjector, FaultSpec};
use heartbeat::Heartbeat;
use outbox::Outbox;
use queue::{Cancelled, Job, JobQueue, Task};
use worker::Worker;

/// Exit code when the supervisor is gone (stdin or stdout closed, parent dead).
pub const EXIT_SUPERVISOR_GONE: i32 = 0;
/// Exit code of an internal error (a frame that cannot be encoded).
pub const EXIT_INTERNAL: i32 = 1;
/// Exit code of a panic in any runner thread.
pub const EXIT_PANIC: i32 = 101;

/// How long a shutdown waits for the worker to stop before exiting anyway.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How a runner ended (when it ended by itself rather than by a fault).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunnerExit {
    /// The supervisor asked for a shutdown and it completed.
    Shutdown,
    /// The supervisor went away (stdin closed, or our parent died).
    SupervisorGone,
    /// The supervisor broke the protocol (bad handshake, undecodable or misplaced frame).
    ProtocolError,
}

impl RunnerExit {
    /// The process exit code for this ending.
    pub fn code(self) -> i32 {
        match self {
            RunnerExit::Shutdown => 0,
            RunnerExit::SupervisorGone => EXIT_SUPERVISOR_GONE,
            RunnerExit::ProtocolError => 2,
        }
    }
}

/// Runs the runner until shutdown, a protocol error, or the supervisor going away.
pub fn run(args: RunnerArgs) -> anyhow::Result<RunnerExit> {
    parent::die_with_parent();
    if parent::parent_is_gone() {
        tracing::warn!("our parent died before we started; exiting");
        return Ok(RunnerExit::SupervisorGone);
    }
    exit_on_panic();

    let hooks = FaultHooks::new();
    let fault = args.fault.clone().filter(FaultSpec::is_armed);
    if let Some(spec) = &fault {
        tracing::warn!(%spec, "FAULT INJECTION ARMED: this runner will break on purpose");
    }
    let faults = Arc::new(FaultInjector::new(fault, hooks.clone()));
    let engine = args.engine.create(hooks.clone());

    let protocol_out =
        stdio::take_protocol_stdout().context("cannot set up stdout for protocol frames")?;
    let outbox = Arc::new(Outbox::new(protocol_out));
    let mut stdin = std::io::stdin().lock();
    tracing::info!(engine = %args.engine, pid = std::process::id(), "runner started");

    if let Some(exit) = handshake(&mut stdin, &outbox) {
        return Ok(exit);
    }
    let heartbeat = Heartbeat::spawn(Arc::clone(&outbox), args.heartbeat_interval(), hooks)
        .context("cannot start the heartbeat thread")?;
    outbox.status(RunnerStatus::Idle);
    let queue = Arc::new(JobQueue::new());
    let (worker_done, worker_stopped) = mpsc::channel();
    Worker::new(engine, Arc::clone(&outbox), Arc::clone(&queue), faults)
        .spawn(worker_done)
        .context("cannot start the worker thread")?;

    let serve = Serve {
        outbox,
        queue,
        worker_stopped,
    };
    Ok(serve.run(&mut stdin, heartbeat))
}

/// Reads and checks the supervisor's handshake, and answers it. Returns how to exit if the
/// conversation cannot go on.
fn handshake(stdin: &mut impl Read, outbox: &Outbox) -> Option<RunnerExit> {
    match read_frame::<ToRunner, _>(stdin, MAX_FRAME_LEN) {
        Ok(Some(ToRunner::Handshake(theirs))) => match theirs.check() {
            Ok(()) => {
                tracing::debug!(supervisor_pid = theirs.pid, "handshake accepted");
                outbox.send(&FromRunner::Handshake(Handshake::ours()));
                None
            }
            Err(err) => {
                tracing::error!(%err, "refusing the supervisor's handshake; exiting");
                // Still say who we are, so the supervisor can report both versions.
                outbox.send(&FromRunner::Handshake(Handshake::ours()));
                Some(RunnerExit::ProtocolError)
            }
        },
        Ok(Some(other)) => {
            tracing::error!(
                frame = frame_name(&other),
                "protocol error: the first frame must be a handshake; exiting"
            );
            Some(RunnerExit::ProtocolError)
        }
        Ok(None) => {
            tracing::info!("stdin closed before the handshake: the supervisor is gone; exiting");
            Some(RunnerExit::SupervisorGone)
        }
        Err(err) => {
            tracing::error!(%err, "protocol error reading the handshake; exiting");
            Some(RunnerExit::ProtocolError)
        }
    }
}

/// The main thread's state after the handshake.
struct Serve {
    outbox: Arc<Outbox>,
    queue: Arc<JobQueue>,
    /// Disconnects when the worker thread ends.
    worker_stopped: Receiver<()>,
}

impl Serve {
    /// Handles frames from stdin until the conversation ends.
    fn run(self, stdin: &mut impl Read, heartbeat: Heartbeat) -> RunnerExit {
        loop {
            let frame = match read_frame::<ToRunner, _>(stdin, MAX_FRAME_LEN) {
                Ok(Some(frame)) => frame,
                Ok(None) => {
                    tracing::info!(
                        "stdin closed: the supervisor is gone; stopping work and exiting"
                    );
                    self.queue.close();
                    return RunnerExit::SupervisorGone;
                }
                Err(err) => {
                    tracing::error!(%err, "protocol error: bad frame from the supervisor; exiting");
                    return RunnerExit::ProtocolError;
                }
            };
            tracing::trace!(frame = frame_name(&frame), "frame received");
            match frame {
                ToRunner::Handshake(_) => {
                    tracing::error!("protocol error: a second handshake; exiting");
                    return RunnerExit::ProtocolError;
                }
                ToRunner::Load(spec) => self.enqueue(Job::Load(spec)),
                ToRunner::Generate { task_id, request } => {
                    // Ack before queueing, so that `Ack` always precedes `Started`.
                    self.outbox.send(&FromRunner::Ack { task_id });
                    self.enqueue(Job::Generate(Task::new(task_id, request)));
                }
                ToRunner::Cancel { task_id } => self.cancel(task_id),
                ToRunner::Shutdown => return self.shutdown(heartbeat),
            }
        }
    }

    fn enqueue(&self, job: Job) {
        // The queue only closes when this thread stops reading, so this cannot fail; answer
        // the task anyway rather than drop it silently.
        if let Err(Job::Generate(task)) = self.queue.push(job) {
            self.cancelled(task.id);
        }
    }

    fn cancel(&self, task_id: TaskId) {
        match self.queue.cancel(task_id) {
            Cancelled::Running => tracing::debug!(task_id, "cancelling the running task"),
            Cancelled::Dequeued(task) => {
                tracing::debug!(task_id, "cancelled a queued task");
                self.cancelled(task.id);
            }
            Cancelled::Unknown => tracing::debug!(task_id, "cancel for an unknown or ended task"),
        }
    }

    /// Answers a task that never ran with `Done { Cancelled }`.
    fn cancelled(&self, task_id: TaskId) {
        self.outbox.send(&FromRunner::Done {
            task_id,
            finish_reason: FinishReason::Cancelled,
            usage: Usage::default(),
        });
    }

    fn shutdown(self, heartbeat: Heartbeat) -> RunnerExit {
        tracing::info!("shutdown requested");
        self.outbox.status(RunnerStatus::ShuttingDown);
        for task in self.queue.close() {
            self.cancelled(task.id);
        }
        match self.worker_stopped.recv_timeout(SHUTDOWN_GRACE) {
            Err(RecvTimeoutError::Timeout) => tracing::warn!(
                grace = ?SHUTDOWN_GRACE,
                "the worker did not stop in time; exiting without it"
            ),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {}
        }
        heartbeat.stop();
        self.outbox.status(RunnerStatus::Shutdown);
        tracing::info!("shut down");
        RunnerExit::Shutdown
    }
}

/// A frame's kind, for logs (frames themselves may hold whole prompts).
fn frame_name(frame: &ToRunner) -> &'static str {
    match frame {
        ToRunner::Handshake(_) => "Handshake",
        ToRunner::Load(_) => "Load",
        ToRunner::Generate { .. } => "Generate",
        ToRunner::Cancel { .. } => "Cancel",
        ToRunner::Shutdown => "Shutdown",
    }
}

/// Makes a panic on any thread end the process (after the usual panic message on stderr), so
/// that the supervisor sees a dead runner instead of one whose worker silently vanished.
fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!("panic in the runner; exiting");
        std::process::exit(EXIT_PANIC);
    }));
}
