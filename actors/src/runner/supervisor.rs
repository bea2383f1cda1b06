//! The `RunnerSupervisor` actor: one runner process, its tasks, its restarts.
//! See the module docs of `runner` for the behaviour.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_proto::{FromRunner, RunnerStatus, TaskId, ToRunner};
use canopy_runtime::introspect::{self, Registration};
use canopy_runtime::process::{
    FailureReason, ProcessFailed, ProcessMsg, ProcessSpec, spawn_process,
};
use canopy_runtime::restart::{BackoffState, RestartWindow};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use super::config::RunnerConfig;
use super::io::{spawn_reader, spawn_writer};
use super::messages::{
    RunnerError, RunnerEvent, RunnerMsg, RunnerSnapshot, RunnerSupervisorError, TaskEvent,
};
use super::tasks::{Follow, TaskState, TaskTable};

/// The actor; spawn it with [`RunnerSupervisorArgs`].
#[derive(Debug, Default, Clone, Copy)]
pub struct RunnerSupervisor;

/// Start-up arguments of a [`RunnerSupervisor`].
#[derive(Clone)]
pub struct RunnerSupervisorArgs {
    /// The instance to run.
    pub config: RunnerConfig,
    /// Where [`RunnerEvent`]s are broadcast.
    pub events: broadcast::Sender<RunnerEvent>,
    /// Called with every event, on the supervisor's own task and before it is broadcast:
    /// what must never lag behind the supervisor (the node's routing table, so that `/ready`
    /// and routing never see a dead runner as ready once a client has seen it fail).
    pub observer: Option<RunnerObserver>,
}

/// A synchronous listener to a runner supervisor's events (see
/// [`RunnerSupervisorArgs::observer`]); it must be quick and must not block.
pub type RunnerObserver = Arc<dyn Fn(&RunnerEvent) + Send + Sync>;

/// How long a dead runner's output may take to close (delivering the frames it wrote before
/// dying) before its tasks are failed anyway: a grandchild holding the pipe open must not delay
/// the failure.
const DRAIN_GRACE: Duration = Duration::from_millis(250);

/// The live runner process of one generation.
struct Runner {
    process: ActorRef<ProcessMsg>,
    pid: u32,
    to_runner: mpsc::UnboundedSender<ToRunner>,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    started_at: Instant,
    last_beat: Arc<Mutex<Option<Instant>>>,
    /// Set when the process died while its output may still hold frames: how it died, and
    /// its stderr tail. Its tasks fail once the output closes (or [`DRAIN_GRACE`] passes).
    dying: Option<(FailureReason, Vec<String>)>,
    /// Whether [`RunnerMsg::OutputClosed`] has been handled: every frame the reader delivered
    /// has been too.
    output_closed: bool,
}

impl Runner {
    fn send(&self, msg: ToRunner) {
        // A closed channel means the runner is dying; its death is reported separately.
        let _ = self.to_runner.send(msg);
    }

    fn kill(&self, reason: FailureReason) {
        let _ = self.process.send_message(ProcessMsg::Kill { reason });
    }
}

/// State of a [`RunnerSupervisor`].
pub struct RunnerSupervisorState {
    config: RunnerConfig,
    events: broadcast::Sender<RunnerEvent>,
    observer: Option<RunnerObserver>,
    status: RunnerStatus,
    generation: u64,
    runner: Option<Runner>,
    tasks: TaskTable,
    /// The runner's last report of its batch (sequences, KV memory, prefix cache).
    batch: Option<canopy_proto::BatchStats>,
    next_task: TaskId,
    restarts: u32,
    window: RestartWindow,
    backoff: BackoffState,
    /// When the runner last made progress outside tasks (spawn, handshake, load progress).
    progress_at: Instant,
    stall_timer: Option<JoinHandle<()>>,
    /// What introspection shows, refreshed after every message.
    view: Arc<Mutex<View>>,
    _registration: Registration,
}

impl RunnerSupervisorState {
    /// Refreshes the introspection view.
    fn publish(&self) {
        if let Ok(mut view) = self.view.lock() {
            view.snapshot = self.snapshot();
            view.last_beat = self.runner.as_ref().map(|r| r.last_beat.clone());
            view.runner_started = self.runner.as_ref().map(|r| r.started_at);
        }
    }

    fn set_status(&mut self, status: RunnerStatus) {
        if self.status != status {
            tracing::info!(instance = %self.config.instance, from = %self.status, to = %status, "runner status");
            self.status = status;
            self.emit(RunnerEvent::StatusChanged {
                instance: self.config.instance.clone(),
                status,
            });
        }
    }

    /// Tells the observer, then broadcasts.
    fn emit(&self, event: RunnerEvent) {
        if let Some(observer) = &self.observer {
            observer(&event);
        }
        let _ = self.events.send(event);
    }

    fn snapshot(&self) -> RunnerSnapshot {
        let runner = self.runner.as_ref();
        RunnerSnapshot {
            instance: self.config.instance.clone(),
            status: self.status,
            pid: runner.map(|r| r.pid),
            restarts: self.restarts,
            awaiting_ack: self.tasks.count(TaskState::AwaitingAck),
            pending: self.tasks.count(TaskState::Pending),
            in_flight: self.tasks.count(TaskState::Running),
            current_task: self.tasks.running(),
            last_heartbeat_age: runner
                .and_then(|r| r.last_beat.lock().ok().and_then(|b| *b))
                .map(|b| b.elapsed()),
            uptime: runner.map(|r| r.started_at.elapsed()),
            batch: self.batch,
            max_tasks: self.max_tasks(),
        }
    }

    /// The task limit now (explicit, or from the runner's `parallel`).
    fn max_tasks(&self) -> usize {
        self.config.task_limit(self.batch.map(|b| b.parallel))
    }

    fn process_spec(&self) -> ProcessSpec {
        let mut spec =
            ProcessSpec::new(self.config.command.clone()).heartbeat(self.config.heartbeat);
        if let Some(threads) = self.config.load.threads {
            // The engine's thread pools size themselves from these at first use.
            for var in ["CANDLE_NUM_THREADS", "RAYON_NUM_THREADS"] {
                spec.command
                    .env
                    .push((var.into(), threads.to_string().into()));
            }
        }
        spec.stderr_tail_lines = self.config.stderr_tail_lines;
        spec
    }
}

impl RunnerSupervisor {
    /// Spawns a new runner process (the next generation) and opens the protocol.
    async fn start_runner(
        myself: &ActorRef<RunnerMsg>,
        state: &mut RunnerSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.generation += 1;
        let generation = state.generation;
        let (process, io, _) = spawn_process(None, state.process_spec(), myself.get_cell()).await?;
        let last_beat = Arc::new(Mutex::new(None));
        let reader = spawn_reader(
            io.stdout,
            generation,
            process.clone(),
            myself.clone(),
            last_beat.clone(),
        );
        let (to_runner, writer) = spawn_writer(io.stdin, generation, myself.clone());
        let runner = Runner {
            process,
            pid: io.pid,
            to_runner,
            reader,
            writer,
            started_at: Instant::now(),
            last_beat,
            dying: None,
            output_closed: false,
        };
        runner.send(ToRunner::Handshake(canopy_proto::Handshake::ours()));
        tracing::info!(instance = %state.config.instance, pid = io.pid, generation, "runner started");
        // A new process reports its own batch; the last one's is history.
        state.batch = None;
        state.emit(RunnerEvent::Started {
            instance: state.config.instance.clone(),
            pid: io.pid,
            restarts: state.restarts,
        });
        state.runner = Some(runner);
        state.progress_at = Instant::now();
        state.backoff.started(Instant::now());
        state.set_status(RunnerStatus::Idle);
        Ok(())
    }

    /// The runner of the current generation died: release every waiter, report, and
    /// restart or give up.
    fn on_runner_death(
        myself: &ActorRef<RunnerMsg>,
        state: &mut RunnerSupervisorState,
        reason: FailureReason,
        stderr_tail: Vec<String>,
    ) -> Result<(), ActorProcessingErr> {
        let pid = match state.runner.take() {
            Some(runner) => {
                runner.reader.abort();
                runner.writer.abort();
                runner.pid
            }
            None => 0,
        };
        let instance = state.config.instance.clone();
        state.batch = None;
        // The status and the report go out before the tasks are failed: whoever sees a task
        // fail and asks again finds the instance already marked failed, never still ready.
        state.set_status(RunnerStatus::Failed);
        let now = Instant::now();
        let will_restart = state.window.record(now);
        let failed_tasks = state.tasks.len();
        tracing::error!(
            %instance, pid, %reason, failed_tasks, will_restart,
            stderr_tail = %stderr_tail.join("\n"),
            "runner failed"
        );
        state.emit(RunnerEvent::RunnerFailed {
            instance: instance.clone(),
            reason: reason.clone(),
            pid,
            stderr_tail: stderr_tail.clone(),
            failed_tasks,
            will_restart,
        });
        state.tasks.fail_all(|started| RunnerError::RunnerFailed {
            instance: instance.clone(),
            reason: reason.clone(),
            stderr_tail: stderr_tail.clone(),
            started,
        });
        if !will_restart {
            return Err(Box::new(RunnerSupervisorError::GaveUp {
                instance,
                restarts: state.restarts,
                last: reason,
            }));
        }
        state.restarts += 1;
        let delay = state.backoff.next_delay(now);
        let generation = state.generation;
        tracing::info!(%instance, delay_ms = delay.as_millis() as u64, "restarting runner");
        myself.send_after(delay, move || RunnerMsg::Restart(generation));
        Ok(())
    }

    fn on_frame(
        myself: &ActorRef<RunnerMsg>,
        state: &mut RunnerSupervisorState,
        event: FromRunner,
    ) -> Result<(), ActorProcessingErr> {
        let follow = match event {
            FromRunner::Handshake(theirs) => {
                if let Some(runner) = &state.runner {
                    match theirs.check() {
                        Ok(()) => {
                            state.progress_at = Instant::now();
                            runner.send(ToRunner::Load(state.config.load.clone()));
                        }
                        Err(err) => runner.kill(FailureReason::Killed {
                            why: format!("bad handshake: {err}"),
                        }),
                    }
                }
                Follow::Nothing
            }
            FromRunner::Heartbeat { .. } => Follow::Nothing,
            FromRunner::Status(status) => {
                state.progress_at = Instant::now();
                state.set_status(status);
                Follow::Nothing
            }
            FromRunner::LoadProgress { done, total } => {
                tracing::debug!(instance = %state.config.instance, done, total, "loading");
                state.progress_at = Instant::now();
                Follow::Nothing
            }
            FromRunner::LoadFailed { error } => {
                let instance = state.config.instance.clone();
                tracing::error!(%instance, %error, "runner could not load its model");
                state.set_status(RunnerStatus::Failed);
                state.emit(RunnerEvent::LoadFailed {
                    instance: instance.clone(),
                    error: error.clone(),
                });
                state.tasks.fail_all(|_| RunnerError::NotReady {
                    instance: instance.clone(),
                    status: RunnerStatus::Failed,
                });
                // Our failure kills the linked process actor, which kills the runner.
                let _ = myself;
                return Err(Box::new(RunnerSupervisorError::LoadFailed {
                    instance,
                    error,
                }));
            }
            FromRunner::Ack { task_id } => state.tasks.acked(task_id),
            FromRunner::Started { task_id } => {
                state.tasks.started(task_id);
                Follow::Nothing
            }
            FromRunner::Progress { task_id, phase } => {
                state.tasks.progress(task_id, phase);
                Follow::Nothing
            }
            FromRunner::Chunk { task_id, chunk } => state.tasks.chunk(task_id, chunk),
            FromRunner::Done {
                task_id,
                finish_reason,
                usage,
            } => {
                state.tasks.finish(
                    task_id,
                    TaskEvent::Done {
                        finish_reason,
                        usage,
                    },
                );
                Follow::Nothing
            }
            FromRunner::TaskError {
                task_id,
                error,
                kind,
            } => {
                tracing::debug!(instance = %state.config.instance, task_id, ?kind, %error, "task error");
                // A task error is the task's end, not the runner's: the runner stays up, and
                // nothing here counts it as a runner failure.
                let err = RunnerError::TaskFailed {
                    instance: state.config.instance.clone(),
                    message: error,
                    kind,
                };
                state.tasks.finish(task_id, TaskEvent::Failed(err));
                Follow::Nothing
            }
            FromRunner::Batch(stats) => {
                state.batch = Some(stats);
                state.emit(RunnerEvent::BatchChanged {
                    instance: state.config.instance.clone(),
                    stats,
                });
                Follow::Nothing
            }
        };
        if let (Follow::Cancel(task_id), Some(runner)) = (follow, &state.runner) {
            tracing::debug!(task_id, "consumer gone; cancelling task");
            runner.send(ToRunner::Cancel { task_id });
        }
        Ok(())
    }

    fn check_stalls(state: &RunnerSupervisorState) {
        let Some(runner) = &state.runner else {
            return;
        };
        let limits = state.config.stall;
        let age = state.progress_at.elapsed();
        let phase = match state.status {
            RunnerStatus::Idle if age > limits.handshake => Some("handshake".to_string()),
            RunnerStatus::Loading | RunnerStatus::Loaded if age > limits.loading => {
                Some("loading".to_string())
            }
            _ => None,
        };
        let phase = phase.or_else(|| {
            state
                .tasks
                .stalled(Instant::now(), &limits)
                .map(|(task_id, phase, age)| {
                    tracing::warn!(task_id, %phase, age_ms = age.as_millis() as u64, "task stalled");
                    phase
                })
        });
        if let Some(phase) = phase {
            runner.kill(FailureReason::Stalled { phase });
        }
    }

    /// Handles one message.
    async fn handle_msg(
        myself: &ActorRef<RunnerMsg>,
        msg: RunnerMsg,
        state: &mut RunnerSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RunnerMsg::Submit { request, reply } => {
                let instance = state.config.instance.clone();
                // Tasks queued or running at the runner (and those not yet acknowledged).
                let max = state.max_tasks();
                match (&state.runner, state.status) {
                    (Some(_), RunnerStatus::Ready | RunnerStatus::Running)
                        if state.tasks.len() >= max =>
                    {
                        let _ = reply.send(Err(RunnerError::QueueFull { instance, max }));
                    }
                    (Some(runner), RunnerStatus::Ready | RunnerStatus::Running) => {
                        let task_id = state.next_task;
                        state.next_task += 1;
                        state.tasks.submit(task_id, reply);
                        runner.send(ToRunner::Generate { task_id, request });
                    }
                    (_, status) => {
                        let _ = reply.send(Err(RunnerError::NotReady { instance, status }));
                    }
                }
            }
            RunnerMsg::Cancel { task_id } => {
                if state.tasks.cancel(task_id)
                    && let Some(runner) = &state.runner
                {
                    runner.send(ToRunner::Cancel { task_id });
                }
            }
            RunnerMsg::Snapshot(reply) => {
                let _ = reply.send(state.snapshot());
            }
            RunnerMsg::FromRunner(generation, event) => {
                if generation == state.generation && state.runner.is_some() {
                    Self::on_frame(myself, state, event)?;
                }
            }
            RunnerMsg::OutputClosed(generation) => {
                if generation == state.generation
                    && let Some(runner) = state.runner.as_mut()
                {
                    runner.output_closed = true;
                    if let Some((reason, tail)) = runner.dying.take() {
                        Self::on_runner_death(myself, state, reason, tail)?;
                    }
                }
            }
            RunnerMsg::DrainOver(generation) => {
                if generation == state.generation
                    && let Some((reason, tail)) = state.runner.as_mut().and_then(|r| r.dying.take())
                {
                    Self::on_runner_death(myself, state, reason, tail)?;
                }
            }
            RunnerMsg::ProtocolError(generation, error) => {
                if generation == state.generation
                    && let Some(runner) = &state.runner
                {
                    tracing::error!(instance = %state.config.instance, %error, "runner broke the protocol");
                    runner.kill(FailureReason::Killed {
                        why: format!("protocol error: {error}"),
                    });
                }
            }
            RunnerMsg::Restart(generation) => {
                if generation == state.generation
                    && state.runner.is_none()
                    && let Err(err) = Self::start_runner(myself, state).await
                {
                    // A runner that cannot even be spawned counts as another failure.
                    Self::on_runner_death(
                        myself,
                        state,
                        FailureReason::Killed {
                            why: format!("cannot start runner: {err}"),
                        },
                        Vec::new(),
                    )?;
                }
            }
            RunnerMsg::CheckStalls => {
                let abandoned = state.tasks.abandoned();
                if let Some(runner) = &state.runner {
                    for task_id in abandoned {
                        tracing::debug!(task_id, "consumer gone before any output; cancelling");
                        runner.send(ToRunner::Cancel { task_id });
                    }
                }
                Self::check_stalls(state);
            }
        }
        Ok(())
    }

    /// A death (or normal stop) of a linked actor.
    fn supervision_event(
        myself: &ActorRef<RunnerMsg>,
        event: SupervisionEvent,
        state: &mut RunnerSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let current = state.runner.as_ref().map(|r| r.process.get_id());
        match event {
            SupervisionEvent::ActorFailed(cell, err) if Some(cell.get_id()) == current => {
                let (reason, tail) = match err.downcast_ref::<ProcessFailed>() {
                    Some(failed) => (failed.reason.clone(), failed.stderr_tail.clone()),
                    None => (
                        FailureReason::Killed {
                            why: err.to_string(),
                        },
                        Vec::new(),
                    ),
                };
                // ractor delivers a supervision event before the messages already queued, so
                // the runner's last frames (a chunk written just before it died) may still be
                // on their way, even when the reader has finished: wait for its OutputClosed,
                // which comes after them.
                match state.runner.as_mut() {
                    Some(runner) if !runner.output_closed => {
                        runner.dying = Some((reason, tail));
                        let generation = state.generation;
                        myself.send_after(DRAIN_GRACE, move || RunnerMsg::DrainOver(generation));
                        Ok(())
                    }
                    _ => Self::on_runner_death(myself, state, reason, tail),
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, why) if Some(cell.get_id()) == current => {
                // Only we ask a runner to stop, and then we are stopping too; anything else
                // is a failure.
                Self::on_runner_death(
                    myself,
                    state,
                    FailureReason::Killed {
                        why: format!(
                            "runner process actor stopped: {}",
                            why.unwrap_or_else(|| "no reason".into())
                        ),
                    },
                    Vec::new(),
                )
            }
            _ => Ok(()),
        }
    }
}

impl Actor for RunnerSupervisor {
    type Msg = RunnerMsg;
    type State = RunnerSupervisorState;
    type Arguments = RunnerSupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RunnerMsg>,
        args: RunnerSupervisorArgs,
    ) -> Result<RunnerSupervisorState, ActorProcessingErr> {
        let RunnerSupervisorArgs {
            config,
            events,
            observer,
        } = args;
        let stall_timer =
            Some(myself.send_interval(config.stall.check_every, || RunnerMsg::CheckStalls));
        let registration = introspect::register(&myself.get_cell(), "runner-supervisor");
        let view = Arc::new(Mutex::new(View {
            snapshot: RunnerSnapshot {
                instance: config.instance.clone(),
                status: RunnerStatus::Idle,
                pid: None,
                restarts: 0,
                awaiting_ack: 0,
                pending: 0,
                in_flight: 0,
                current_task: None,
                last_heartbeat_age: None,
                uptime: None,
                batch: None,
                max_tasks: config.task_limit(None),
            },
            last_beat: None,
            runner_started: None,
            parallel_requested: config.load.parallel,
        }));
        {
            let view = view.clone();
            registration.set_details(Arc::new(move || match view.lock() {
                Ok(v) => v.to_json(),
                Err(_) => serde_json::Value::Null,
            }));
        }
        let mut state = RunnerSupervisorState {
            view,
            _registration: registration,
            window: RestartWindow::new(config.restart.intensity),
            backoff: BackoffState::new(config.restart.backoff),
            config,
            events,
            observer,
            status: RunnerStatus::Idle,
            generation: 0,
            runner: None,
            tasks: TaskTable::default(),
            batch: None,
            next_task: 1,
            restarts: 0,
            progress_at: Instant::now(),
            stall_timer,
        };
        Self::start_runner(&myself, &mut state).await?;
        state.publish();
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<RunnerMsg>,
        msg: RunnerMsg,
        state: &mut RunnerSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let result = Self::handle_msg(&myself, msg, state).await;
        state.publish();
        result
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RunnerMsg>,
        event: SupervisionEvent,
        state: &mut RunnerSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let result = Self::supervision_event(&myself, event, state);
        state.publish();
        result
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<RunnerMsg>,
        state: &mut RunnerSupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(timer) = state.stall_timer.take() {
            timer.abort();
        }
        let instance = state.config.instance.clone();
        state.set_status(RunnerStatus::ShuttingDown);
        state.tasks.fail_all(|_| RunnerError::ShuttingDown {
            instance: instance.clone(),
        });
        if let Some(runner) = state.runner.take() {
            runner.send(ToRunner::Shutdown);
            let _ = runner.process.send_message(ProcessMsg::Shutdown {
                grace: state.config.shutdown_grace,
            });
            let limit = state.config.shutdown_grace + std::time::Duration::from_secs(3);
            if runner.process.get_cell().wait(Some(limit)).await.is_err() {
                tracing::warn!(%instance, "runner did not stop in time; killing it");
                runner.process.kill();
            }
            runner.reader.abort();
            runner.writer.abort();
        }
        state.set_status(RunnerStatus::Shutdown);
        Ok(())
    }
}

/// What introspection reads: the last published snapshot, plus the live clocks.
struct View {
    snapshot: RunnerSnapshot,
    last_beat: Option<Arc<Mutex<Option<Instant>>>>,
    runner_started: Option<Instant>,
    /// The `parallel` the runner was asked for (`None`: the engine chooses).
    parallel_requested: Option<u32>,
}

impl View {
    /// The introspection details of a runner supervisor, with live heartbeat age and uptime.
    fn to_json(&self) -> serde_json::Value {
        let s = &self.snapshot;
        let beat_age = self
            .last_beat
            .as_ref()
            .and_then(|b| b.lock().ok().and_then(|b| *b))
            .map(|b| b.elapsed().as_millis() as u64);
        serde_json::json!({
            "instance": s.instance,
            "status": s.status.to_string(),
            "pid": s.pid,
            "restarts": s.restarts,
            "awaiting_ack": s.awaiting_ack,
            "pending": s.pending,
            "in_flight": s.in_flight,
            "current_task": s.current_task,
            "max_tasks": s.max_tasks,
            "parallel_requested": self.parallel_requested,
            "last_heartbeat_age_ms": beat_age,
            "runner_uptime_ms": self.runner_started.map(|t| t.elapsed().as_millis() as u64),
            "batch": s.batch.map(|b| batch_json(&b)),
        })
    }
}

/// A runner's batch report as introspection shows it (`details.batch` of a runner
/// supervisor; `canopy inspect` renders it).
fn batch_json(b: &canopy_proto::BatchStats) -> serde_json::Value {
    serde_json::json!({
        "parallel": b.parallel,
        "running": b.running,
        "queued": b.queued,
        "last_step_rows": b.last_step_rows,
        "kv_bytes": b.kv_bytes,
        "kv_capacity_bytes": b.kv_capacity_bytes,
        "prefix_hits": b.prefix_hits,
        "prefix_reused_tokens": b.prefix_reused_tokens,
        "prefilled_tokens": b.prefilled_tokens,
    })
}
