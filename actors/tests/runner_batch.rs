//! What a `RunnerSupervisor` does with its runner's batch reports, task errors and task
//! limit, driven without a model: the "runner" is a `sleep` process that says nothing, and
//! the test injects the runner's frames into the supervisor's mailbox
//! (`RunnerMsg::FromRunner` of generation 1, then 2 after a restart), exactly as its stdout
//! reader would. Real runners are covered by `tests/runner_supervision.rs`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_actors::runner::{
    DEFAULT_QUEUE, RestartPolicy, RunnerConfig, RunnerError, RunnerEvent, RunnerMsg,
    RunnerObserver, RunnerSnapshot, RunnerSupervisor, RunnerSupervisorArgs, StallTimeouts,
    TaskEvent, TaskHandle,
};
use canopy_proto::{
    BatchStats, FromRunner, GenerateParams, GenerateRequest, LoadSpec, Prompt, RunnerStatus,
    TaskErrorKind,
};
use canopy_runtime::process::{CommandLine, HeartbeatPolicy};
use canopy_runtime::restart::{Backoff, Intensity};
use ractor::{Actor, ActorRef};
use tokio::sync::broadcast;

const WAIT: Duration = Duration::from_secs(10);

fn config(max_tasks: Option<usize>) -> RunnerConfig {
    let command = CommandLine::new("sleep").args(["60"]);
    let load = LoadSpec {
        model: "silent".to_string(),
        layer_start: None,
        layer_end: None,
        threads: None,
        parallel: None,
    };
    let mut config = RunnerConfig::new("batch-instance", command, load);
    // The silent runner never beats nor answers: nothing may kill it but the test.
    config.heartbeat = HeartbeatPolicy {
        timeout: Duration::from_secs(60),
        startup_grace: Duration::from_secs(60),
        check_every: Duration::from_millis(50),
    };
    config.stall = StallTimeouts {
        handshake: Duration::from_secs(60),
        check_every: Duration::from_millis(50),
        ..StallTimeouts::default()
    };
    config.restart = RestartPolicy {
        intensity: Intensity {
            max_restarts: 3,
            period: Duration::from_secs(60),
        },
        backoff: Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
            factor: 2.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(30),
        },
    };
    config.shutdown_grace = Duration::from_millis(200);
    config.max_tasks = max_tasks;
    config
}

struct Harness {
    sup: ActorRef<RunnerMsg>,
    events: broadcast::Receiver<RunnerEvent>,
    observed: Arc<Mutex<Vec<RunnerEvent>>>,
    generation: u64,
}

impl Harness {
    async fn start(config: RunnerConfig) -> Self {
        let (events_tx, events) = broadcast::channel(1024);
        let observed = Arc::new(Mutex::new(Vec::new()));
        let log = observed.clone();
        let observer: RunnerObserver = Arc::new(move |event: &RunnerEvent| {
            log.lock().expect("observed").push(event.clone());
        });
        let (sup, _) = Actor::spawn(
            None,
            RunnerSupervisor,
            RunnerSupervisorArgs {
                config,
                events: events_tx,
                observer: Some(observer),
            },
        )
        .await
        .expect("the supervisor starts");
        let harness = Self {
            sup,
            events,
            observed,
            generation: 1,
        };
        harness.frame(FromRunner::Status(RunnerStatus::Ready));
        harness
    }

    /// Feeds the supervisor a frame of the current runner, as its reader would.
    fn frame(&self, frame: FromRunner) {
        self.sup
            .cast(RunnerMsg::FromRunner(self.generation, frame))
            .expect("the supervisor is alive");
    }

    async fn snapshot(&self) -> RunnerSnapshot {
        ractor::call_t!(self.sup, RunnerMsg::Snapshot, 5_000).expect("snapshot")
    }

    /// Polls the snapshot until `ok` holds.
    async fn snapshot_until(&self, ok: impl Fn(&RunnerSnapshot) -> bool) -> RunnerSnapshot {
        let deadline = Instant::now() + WAIT;
        loop {
            let snap = self.snapshot().await;
            if ok(&snap) {
                return snap;
            }
            assert!(Instant::now() < deadline, "never: {snap:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The next broadcast event that `pick` accepts.
    async fn event<T>(&mut self, pick: impl Fn(RunnerEvent) -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the event in time")
                .expect("the channel is open");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    }

    fn submit(&self) -> tokio::task::JoinHandle<Result<TaskHandle, RunnerError>> {
        let sup = self.sup.clone();
        tokio::spawn(async move {
            let request = GenerateRequest {
                tools: Vec::new(),
                prompt: Prompt::Text("hello".to_string()),
                params: GenerateParams::default(),
            };
            ractor::call_t!(sup, |reply| RunnerMsg::Submit { request, reply }, 5_000)
                .expect("the supervisor answers")
        })
    }

    async fn stop(self) {
        self.sup.stop(None);
        let deadline = Instant::now() + WAIT;
        while self.sup.get_status() != ractor::ActorStatus::Stopped {
            assert!(Instant::now() < deadline, "the supervisor never stopped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn stats(parallel: u32, running: u32, queued: u32) -> BatchStats {
    BatchStats {
        parallel,
        running,
        queued,
        last_step_rows: running,
        kv_bytes: 5 << 20,
        kv_capacity_bytes: 100 << 20,
        prefix_hits: 2,
        prefix_reused_tokens: 64,
        prefilled_tokens: 300,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_reports_reach_the_snapshot_events_and_introspection_until_the_runner_dies() {
    let mut h = Harness::start(config(None)).await;
    let snap = h.snapshot_until(|s| s.status == RunnerStatus::Ready).await;
    assert_eq!(snap.batch, None, "nothing reported yet");
    assert_eq!(snap.max_tasks, 1 + DEFAULT_QUEUE, "parallel 1 until told");

    let report = stats(4, 3, 1);
    h.frame(FromRunner::Batch(report));
    let seen = h
        .event(|e| match e {
            RunnerEvent::BatchChanged { instance, stats } => Some((instance, stats)),
            _ => None,
        })
        .await;
    assert_eq!(seen, ("batch-instance".to_string(), report));
    assert!(
        h.observed
            .lock()
            .expect("observed")
            .iter()
            .any(|e| matches!(e, RunnerEvent::BatchChanged { stats, .. } if *stats == report)),
        "the observer saw it too"
    );
    let snap = h.snapshot_until(|s| s.batch.is_some()).await;
    assert_eq!(snap.batch, Some(report));
    assert_eq!(
        snap.max_tasks,
        4 + DEFAULT_QUEUE,
        "room for the batch plus a queue"
    );

    let tree = serde_json::to_value(canopy_runtime::introspect::tree(&h.sup.get_cell()))
        .expect("tree as JSON");
    let batch = &tree["details"]["batch"];
    assert_eq!(batch["parallel"], 4, "{tree}");
    assert_eq!(batch["running"], 3, "{tree}");
    assert_eq!(batch["queued"], 1, "{tree}");
    assert_eq!(batch["kv_bytes"], 5 << 20, "{tree}");
    assert_eq!(batch["kv_capacity_bytes"], 100 << 20, "{tree}");
    assert_eq!(batch["prefix_hits"], 2, "{tree}");
    assert_eq!(batch["prefix_reused_tokens"], 64, "{tree}");
    assert_eq!(tree["details"]["max_tasks"], 4 + DEFAULT_QUEUE, "{tree}");

    // The runner dies: its report goes with it, and the restarted one has none yet.
    let pid = snap.pid.expect("a pid");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    h.event(|e| matches!(e, RunnerEvent::RunnerFailed { .. }).then_some(()))
        .await;
    let snap = h.snapshot_until(|s| s.pid.is_some_and(|p| p != pid)).await;
    assert_eq!(snap.batch, None, "{snap:?}");
    assert_eq!(snap.max_tasks, 1 + DEFAULT_QUEUE);
    let tree = serde_json::to_value(canopy_runtime::introspect::tree(&h.sup.get_cell()))
        .expect("tree as JSON");
    assert!(tree["details"]["batch"].is_null(), "{tree}");

    // Frames of the dead generation are ignored; the new one's count.
    h.frame(FromRunner::Batch(stats(8, 0, 0)));
    h.generation = 2;
    h.frame(FromRunner::Status(RunnerStatus::Ready));
    h.frame(FromRunner::Batch(stats(2, 0, 0)));
    let snap = h.snapshot_until(|s| s.batch.is_some()).await;
    assert_eq!(snap.batch.map(|b| b.parallel), Some(2));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_context_length_error_fails_only_its_task() {
    let mut h = Harness::start(config(None)).await;
    h.snapshot_until(|s| s.status == RunnerStatus::Ready).await;
    let submitted = h.submit();
    h.snapshot_until(|s| s.awaiting_ack == 1).await;
    h.frame(FromRunner::Ack { task_id: 1 });
    let mut handle = tokio::time::timeout(WAIT, submitted)
        .await
        .expect("acknowledged in time")
        .expect("the submitter ran")
        .expect("accepted");
    h.frame(FromRunner::Started { task_id: 1 });
    h.frame(FromRunner::TaskError {
        task_id: 1,
        error: "the prompt has 9000 tokens; this model instance holds at most 8192 positions"
            .to_string(),
        kind: TaskErrorKind::ContextLengthExceeded,
    });
    let event = tokio::time::timeout(WAIT, handle.next())
        .await
        .expect("the task ends in time");
    match event {
        Some(TaskEvent::Failed(RunnerError::TaskFailed { kind, message, .. })) => {
            assert_eq!(kind, TaskErrorKind::ContextLengthExceeded);
            assert!(message.contains("9000 tokens"), "{message}");
        }
        other => panic!("expected a task failure, got {other:?}"),
    }
    let snap = h.snapshot().await;
    assert_eq!(snap.status, RunnerStatus::Ready, "the runner is fine");
    assert_eq!(snap.restarts, 0);
    assert_eq!(snap.in_flight + snap.pending + snap.awaiting_ack, 0);
    while let Ok(event) = h.events.try_recv() {
        assert!(
            !matches!(event, RunnerEvent::RunnerFailed { .. }),
            "a task error is no runner failure: {event:?}"
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_task_limit_counts_queued_and_running_tasks() {
    let h = Harness::start(config(Some(2))).await;
    h.snapshot_until(|s| s.status == RunnerStatus::Ready).await;
    // A large batch does not raise an explicit limit.
    h.frame(FromRunner::Batch(stats(8, 0, 0)));
    let snap = h.snapshot_until(|s| s.batch.is_some()).await;
    assert_eq!(snap.max_tasks, 2);

    let first = h.submit();
    h.snapshot_until(|s| s.awaiting_ack == 1).await;
    h.frame(FromRunner::Ack { task_id: 1 });
    h.frame(FromRunner::Started { task_id: 1 });
    let _running = first.await.expect("ran").expect("accepted");
    let second = h.submit();
    h.snapshot_until(|s| s.awaiting_ack == 1).await;
    h.frame(FromRunner::Ack { task_id: 2 });
    let _queued = second.await.expect("ran").expect("accepted");
    let snap = h
        .snapshot_until(|s| s.in_flight == 1 && s.pending == 1)
        .await;
    assert_eq!(snap.max_tasks, 2);
    match h.submit().await.expect("ran") {
        Err(RunnerError::QueueFull { max: 2, .. }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_requested_parallel_sizes_the_limit_until_the_runner_reports_its_own() {
    let mut config = config(None);
    config.load.parallel = Some(6);
    let h = Harness::start(config).await;
    let snap = h.snapshot_until(|s| s.status == RunnerStatus::Ready).await;
    assert_eq!(snap.max_tasks, 6 + DEFAULT_QUEUE);
    let tree = serde_json::to_value(canopy_runtime::introspect::tree(&h.sup.get_cell()))
        .expect("tree as JSON");
    assert_eq!(tree["details"]["parallel_requested"], 6, "{tree}");
    // An engine that cannot batch runs one, and says so.
    h.frame(FromRunner::Batch(stats(1, 0, 0)));
    let snap = h.snapshot_until(|s| s.batch.is_some()).await;
    assert_eq!(snap.max_tasks, 1 + DEFAULT_QUEUE);
    h.stop().await;
}
