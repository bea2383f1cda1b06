//! End-to-end supervision of real `canopy runner` processes by a `RunnerSupervisor`.
//!
//! Each test starts a supervisor (under a probe parent actor that records supervision events)
//! whose runner is the real `canopy` binary with the scripted test engine, then makes the
//! runner die, freeze or wedge in one of the ways docs/ARCHITECTURE.md's death-signal table lists, and
//! checks what every party sees: the task streams, the broadcast events, the parent, and the
//! OS (no process left behind).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, alive};
use canopy_actors::runner::{
    RestartPolicy, RunnerCommand, RunnerConfig, RunnerError, RunnerEvent, RunnerMsg,
    RunnerObserver, RunnerSnapshot, RunnerSupervisor, RunnerSupervisorArgs, RunnerSupervisorError,
    StallTimeouts, TaskEvent, TaskHandle,
};
use canopy_proto::{FinishReason, GenerateParams, GenerateRequest, LoadSpec, Prompt, RunnerStatus};
use canopy_runtime::process::{CommandLine, FailureReason, HeartbeatPolicy};
use canopy_runtime::restart::{Backoff, Intensity};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;
use tokio::sync::{broadcast, mpsc};

const WAIT: Duration = Duration::from_secs(20);

/// What the supervisor's parent saw.
#[derive(Debug)]
enum ParentSaw {
    Failed(String, Option<RunnerSupervisorError>),
    Terminated,
}

struct Parent;

#[derive(RactorMessage)]
enum ParentMsg {}

impl Actor for Parent {
    type Msg = ParentMsg;
    type State = mpsc::UnboundedSender<ParentSaw>;
    type Arguments = mpsc::UnboundedSender<ParentSaw>;

    async fn pre_start(
        &self,
        _: ActorRef<ParentMsg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<ParentMsg>,
        evt: SupervisionEvent,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let _ = match evt {
            SupervisionEvent::ActorFailed(_, err) => tx.send(ParentSaw::Failed(
                err.to_string(),
                err.downcast_ref::<RunnerSupervisorError>().cloned(),
            )),
            SupervisionEvent::ActorTerminated(..) => tx.send(ParentSaw::Terminated),
            _ => Ok(()),
        };
        Ok(())
    }
}

fn config(model: &str) -> RunnerConfig {
    let command = RunnerCommand::canopy(env!("CARGO_BIN_EXE_canopy")).args([
        "--engine",
        "scripted",
        "--heartbeat-ms",
        "50",
    ]);
    let load = LoadSpec {
        model: model.to_string(),
        layer_start: None,
        layer_end: None,
        threads: None,
        parallel: None,
    };
    let mut config = RunnerConfig::new("test-instance", command, load);
    config.heartbeat = HeartbeatPolicy {
        timeout: Duration::from_millis(800),
        startup_grace: Duration::from_secs(10),
        check_every: Duration::from_millis(20),
    };
    config.stall = StallTimeouts {
        handshake: Duration::from_secs(10),
        loading: Duration::from_secs(10),
        prefill: Duration::from_secs(5),
        decode: Duration::from_secs(5),
        check_every: Duration::from_millis(50),
    };
    config.restart = RestartPolicy {
        intensity: Intensity {
            max_restarts: 3,
            period: Duration::from_secs(60),
        },
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            factor: 2.0,
            jitter: 0.1,
            reset_after: Duration::from_secs(30),
        },
    };
    config.shutdown_grace = Duration::from_secs(2);
    config
}

struct Harness {
    parent: ActorRef<ParentMsg>,
    parent_saw: mpsc::UnboundedReceiver<ParentSaw>,
    sup: ActorRef<RunnerMsg>,
    events: broadcast::Receiver<RunnerEvent>,
    /// What the supervisor's synchronous observer was handed, in order.
    observed: Arc<Mutex<Vec<RunnerEvent>>>,
    pids: HashSet<u32>,
}

impl Harness {
    async fn start(config: RunnerConfig) -> Self {
        let (tx, parent_saw) = mpsc::unbounded_channel();
        let (parent, _) = Actor::spawn(None, Parent, tx).await.expect("parent starts");
        let (events_tx, events) = broadcast::channel(1024);
        let observed = Arc::new(Mutex::new(Vec::new()));
        let log = observed.clone();
        let observer: RunnerObserver = Arc::new(move |event: &RunnerEvent| {
            log.lock().expect("observed").push(event.clone());
        });
        let (sup, _) = Actor::spawn_linked(
            None,
            RunnerSupervisor,
            RunnerSupervisorArgs {
                config,
                events: events_tx,
                observer: Some(observer),
            },
            parent.get_cell(),
        )
        .await
        .expect("supervisor starts");
        Self {
            parent,
            parent_saw,
            sup,
            events,
            observed,
            pids: HashSet::new(),
        }
    }

    /// The next broadcast event, remembering every runner pid seen.
    async fn event(&mut self) -> RunnerEvent {
        let ev = tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event in time")
            .expect("event channel open");
        if let RunnerEvent::Started { pid, .. } = &ev {
            self.pids.insert(*pid);
        }
        ev
    }

    async fn ready(&mut self) {
        loop {
            if let RunnerEvent::StatusChanged {
                status: RunnerStatus::Ready,
                ..
            } = self.event().await
            {
                return;
            }
        }
    }

    async fn failure(&mut self) -> (FailureReason, usize, bool) {
        loop {
            if let RunnerEvent::RunnerFailed {
                reason,
                failed_tasks,
                will_restart,
                ..
            } = self.event().await
            {
                return (reason, failed_tasks, will_restart);
            }
        }
    }

    async fn snapshot(&self) -> RunnerSnapshot {
        self.sup
            .call(RunnerMsg::Snapshot, Some(WAIT))
            .await
            .expect("supervisor alive")
            .answered("snapshot in time")
    }

    async fn submit(&self, script: &str, max_tokens: u32) -> Result<TaskHandle, RunnerError> {
        let request = GenerateRequest {
            tools: Vec::new(),
            prompt: Prompt::Text(script.to_string()),
            params: GenerateParams {
                max_tokens,
                ..GenerateParams::default()
            },
        };
        self.sup
            .call(|reply| RunnerMsg::Submit { request, reply }, Some(WAIT))
            .await
            .expect("supervisor alive")
            .answered("submit answered in time")
    }

    async fn parent_saw(&mut self) -> ParentSaw {
        tokio::time::timeout(WAIT, self.parent_saw.recv())
            .await
            .expect("the parent hears in time")
            .expect("parent alive")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.sup.kill();
        self.parent.kill();
    }
}

trait SuccessOr<T> {
    fn answered(self, what: &str) -> T;
}

impl<T> SuccessOr<T> for ractor::rpc::CallResult<T> {
    fn answered(self, what: &str) -> T {
        match self {
            ractor::rpc::CallResult::Success(v) => v,
            _ => panic!("expected {what}"),
        }
    }
}

async fn next(handle: &mut TaskHandle) -> Option<TaskEvent> {
    tokio::time::timeout(WAIT, handle.next())
        .await
        .expect("a task event in time")
}

/// Reads a task to its end: its chunks' text and its final event.
async fn drain(mut handle: TaskHandle) -> (Vec<String>, TaskEvent) {
    let mut texts = Vec::new();
    loop {
        match next(&mut handle).await {
            Some(TaskEvent::Chunk(c)) => texts.push(c.text),
            Some(last) => {
                assert!(
                    next(&mut handle).await.is_none(),
                    "the stream ends after its final event"
                );
                return (texts, last);
            }
            None => panic!("stream ended without a final event"),
        }
    }
}

async fn assert_gone(pids: impl IntoIterator<Item = u32>) {
    for pid in pids {
        common::eventually_async(Duration::from_secs(10), "the process to end", async || {
            (!alive(pid)).then_some(())
        })
        .await
        .unwrap_or_else(|why| panic!("{why}: process {pid} was left behind"));
    }
}

fn runner_failed(event: TaskEvent) -> (FailureReason, bool) {
    match event {
        TaskEvent::Failed(RunnerError::RunnerFailed {
            reason, started, ..
        }) => (reason, started),
        other => panic!("expected RunnerFailed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_tasks_and_reports_its_state() {
    let mut h = Harness::start(config("scripted:layers=3")).await;
    h.ready().await;
    let (texts, last) = drain(h.submit("tokens=5", 16).await.expect("accepted")).await;
    assert_eq!(texts, vec!["0 ", "1 ", "2 ", "3 ", "4 "]);
    assert!(
        matches!(last, TaskEvent::Done { finish_reason: FinishReason::Stop, usage } if usage.completion_tokens == 5)
    );
    // The runner reports Ready right after the task's final event; wait for it.
    let snap = common::eventually_async(WAIT, "the runner to be Ready", async || {
        let snap = h.snapshot().await;
        (snap.status == RunnerStatus::Ready).then_some(snap)
    })
    .await
    .expect("Ready again");
    assert_eq!(snap.restarts, 0);
    assert!(snap.pid.is_some_and(alive));
    assert!(
        snap.last_heartbeat_age
            .is_some_and(|age| age < Duration::from_secs(1))
    );
    assert_eq!((snap.awaiting_ack, snap.pending, snap.in_flight), (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detects_non_zero_exit_fails_the_task_and_restarts() {
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let (texts, last) = drain(
        h.submit("tokens=10 exit_after=2:3", 16)
            .await
            .expect("accepted"),
    )
    .await;
    assert_eq!(texts.len(), 2);
    assert_eq!(
        runner_failed(last),
        (FailureReason::Exited { code: 3 }, true)
    );
    let (reason, failed, will_restart) = h.failure().await;
    assert_eq!(
        (reason, failed, will_restart),
        (FailureReason::Exited { code: 3 }, 1, true)
    );
    h.ready().await;
    let (texts, _) = drain(
        h.submit("tokens=3", 16)
            .await
            .expect("accepted after restart"),
    )
    .await;
    assert_eq!(texts.len(), 3);
    assert_eq!(h.snapshot().await.restarts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detects_death_by_sigkill_and_releases_every_waiter_at_once() {
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let mut handles = Vec::new();
    for _ in 0..3 {
        handles.push(
            h.submit("tokens=100000 delay_ms=5", 100000)
                .await
                .expect("accepted"),
        );
    }
    // The first one is running once it streams.
    assert!(matches!(
        next(&mut handles[0]).await,
        Some(TaskEvent::Chunk(_))
    ));
    let snap = h.snapshot().await;
    assert_eq!(snap.in_flight + snap.pending, 3);
    let pid = snap.pid.expect("a runner pid");
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill -9");
    for mut handle in handles {
        let last = loop {
            match next(&mut handle).await {
                Some(TaskEvent::Chunk(_)) => continue,
                Some(last) => break last,
                None => panic!("stream ended without an error"),
            }
        };
        let (reason, _) = runner_failed(last);
        assert_eq!(reason, FailureReason::Signaled { signal: 9 });
        // The observer (the node's routing table) heard of the death before any waiter:
        // a client that retries at once never finds the dead runner still "ready".
        let observed = h.observed.lock().expect("observed").clone();
        let failed_at = observed
            .iter()
            .position(|e| {
                matches!(
                    e,
                    RunnerEvent::StatusChanged {
                        status: RunnerStatus::Failed,
                        ..
                    }
                )
            })
            .expect("the observer saw the Failed status");
        assert!(
            observed[failed_at..].iter().any(|e| matches!(
                e,
                RunnerEvent::RunnerFailed {
                    failed_tasks: 3,
                    ..
                }
            )),
            "{observed:?}"
        );
    }
    let (_, failed, _) = h.failure().await;
    assert_eq!(failed, 3);
    assert_gone([pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexpected_exit_zero_is_a_failure() {
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let (_, last) = drain(
        h.submit("tokens=10 exit_after=1:0", 16)
            .await
            .expect("accepted"),
    )
    .await;
    assert_eq!(runner_failed(last).0, FailureReason::UnexpectedExit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_requested_shutdown_is_not_a_failure() {
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let pid = h.snapshot().await.pid.expect("pid");
    h.sup
        .stop_and_wait(None, Some(WAIT))
        .await
        .expect("stops in time");
    assert!(matches!(h.parent_saw().await, ParentSaw::Terminated));
    let mut statuses = Vec::new();
    while let Ok(ev) = h.events.try_recv() {
        assert!(
            !matches!(ev, RunnerEvent::RunnerFailed { .. }),
            "no failure on shutdown: {ev:?}"
        );
        if let RunnerEvent::StatusChanged { status, .. } = ev {
            statuses.push(status);
        }
    }
    assert_eq!(
        statuses,
        vec![RunnerStatus::ShuttingDown, RunnerStatus::Shutdown]
    );
    assert_gone([pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_timeout_detects_a_sigstopped_runner() {
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let pid = h.snapshot().await.pid.expect("pid");
    let stopped_at = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("SIGSTOP");
    let (reason, _, will_restart) = h.failure().await;
    assert!(
        matches!(reason, FailureReason::HeartbeatMissed { .. }),
        "{reason:?}"
    );
    assert!(will_restart);
    assert!(stopped_at.elapsed() < Duration::from_secs(5));
    assert_gone([pid]).await;
    h.ready().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_heartbeat_with_working_loop_is_detected() {
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let (_, last) = drain(
        h.submit("tokens=100000 delay_ms=5 freeze_after=1", 100000)
            .await
            .expect("accepted"),
    )
    .await;
    assert!(matches!(
        runner_failed(last).0,
        FailureReason::HeartbeatMissed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_timeout_detects_a_wedged_work_loop_with_a_live_heartbeat() {
    let mut cfg = config("scripted");
    cfg.stall.decode = Duration::from_millis(600);
    let mut h = Harness::start(cfg).await;
    h.ready().await;
    let (texts, last) = drain(
        h.submit("tokens=10 hang_after=2", 16)
            .await
            .expect("accepted"),
    )
    .await;
    assert_eq!(texts.len(), 2);
    assert_eq!(
        runner_failed(last),
        (
            FailureReason::Stalled {
                phase: "decode".into()
            },
            true
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_intensity_exceeded_escalates_and_leaves_no_orphans() {
    let mut cfg = config("scripted");
    cfg.command = cfg.command.env("CANOPY_RUNNER_FAULT", "crash-on-load");
    cfg.restart.intensity = Intensity {
        max_restarts: 2,
        period: Duration::from_secs(60),
    };
    let mut h = Harness::start(cfg).await;
    let mut failures = 0;
    loop {
        let (reason, _, will_restart) = h.failure().await;
        assert_eq!(reason, FailureReason::Signaled { signal: 9 });
        failures += 1;
        if !will_restart {
            break;
        }
    }
    assert_eq!(
        failures, 3,
        "two restarts allowed, the third failure escalates"
    );
    match h.parent_saw().await {
        ParentSaw::Failed(_, Some(RunnerSupervisorError::GaveUp { restarts, .. })) => {
            assert_eq!(restarts, 2)
        }
        other => panic!("expected the parent to see GaveUp, got {other:?}"),
    }
    assert_eq!(h.pids.len(), 3);
    assert_gone(h.pids.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_orphan_after_the_supervisor_is_killed() {
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let pid = h.snapshot().await.pid.expect("pid");
    h.sup.kill();
    assert_gone([pid]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_failure_fails_the_supervisor_with_the_runner_error() {
    let mut h = Harness::start(config("scripted:fail")).await;
    match h.parent_saw().await {
        ParentSaw::Failed(msg, Some(RunnerSupervisorError::LoadFailed { error, .. })) => {
            assert!(!error.is_empty(), "{msg}");
        }
        other => panic!("expected LoadFailed, got {other:?}"),
    }
    assert_gone(h.pids.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_sending_garbage_is_killed_as_a_protocol_violation() {
    let mut cfg = config("scripted");
    // A stand-in "runner" that answers with a frame whose body is not MessagePack.
    cfg.command = CommandLine {
        program: "sh".into(),
        args: vec![
            "-c".into(),
            "printf '\\000\\000\\000\\005hello'; sleep 30".into(),
        ],
        env: Vec::new(),
    };
    let mut h = Harness::start(cfg).await;
    let (reason, _, _) = h.failure().await;
    match reason {
        FailureReason::Killed { why } => assert!(why.contains("protocol error"), "{why}"),
        other => panic!("expected a protocol kill, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_task_handle_cancels_it_in_the_runner() {
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let mut handle = h
        .submit("tokens=100000 delay_ms=5", 100000)
        .await
        .expect("accepted");
    assert!(matches!(next(&mut handle).await, Some(TaskEvent::Chunk(_))));
    drop(handle);
    common::eventually_async(WAIT, "the task to end", async || {
        let snap = h.snapshot().await;
        (snap.in_flight == 0 && snap.status == RunnerStatus::Ready).then_some(())
    })
    .await
    .unwrap_or_else(|why| panic!("{why}: task still running"));
    let (texts, _) = drain(h.submit("tokens=2", 16).await.expect("accepted")).await;
    assert_eq!(texts.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_are_refused_while_not_ready_and_beyond_capacity() {
    let mut cfg = config("scripted:layers=2,layer_ms=1500");
    cfg.max_tasks = Some(1);
    let mut h = Harness::start(cfg).await;
    match h.submit("tokens=1", 4).await {
        Err(RunnerError::NotReady { .. }) => {}
        other => panic!("expected NotReady while loading, got {other:?}"),
    }
    h.ready().await;
    let _running = h
        .submit("tokens=100000 delay_ms=5", 100000)
        .await
        .expect("accepted");
    match h.submit("tokens=1", 4).await {
        Err(RunnerError::QueueFull { max: 1, .. }) => {}
        other => panic!("expected QueueFull, got {other:?}"),
    }
}

/// Not a test on its own: the body of the child process that
/// `no_orphan_after_the_node_process_is_sigkilled` starts (this test binary re-executed with
/// `CANOPY_TEST_HOST=1`). It hosts a supervisor, prints the runner's pid and waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_process_for_orphan_test() {
    if std::env::var_os("CANOPY_TEST_HOST").is_none() {
        return;
    }
    let mut h = Harness::start(config("scripted")).await;
    h.ready().await;
    let pid = h.snapshot().await.pid.expect("pid");
    println!("RUNNER_PID={pid}");
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[test]
fn no_orphan_after_the_node_process_is_sigkilled() {
    use std::io::{BufRead, BufReader};
    let mut host = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "runner_supervision::host_process_for_orphan_test",
            "--nocapture",
        ])
        .env("CANOPY_TEST_HOST", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("host starts");
    let stdout = host.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(pid) = line.strip_prefix("RUNNER_PID=") {
                let _ = tx.send(pid.trim().parse::<u32>().ok());
            }
        }
    });
    let pid = match rx.recv_timeout(WAIT) {
        Ok(Some(pid)) => pid,
        other => {
            let _ = host.kill();
            panic!("host did not report its runner: {other:?}");
        }
    };
    assert!(alive(pid));
    host.kill().expect("SIGKILL the host");
    host.wait().expect("reap host");
    assert!(
        common::wait_gone(pid, Duration::from_secs(10)),
        "runner {pid} outlived its SIGKILLed parent"
    );
}
