//! The death-signal contract of `runtime::process`, pinned down with real child processes
//! (`sh` scripts): every way a child can end maps to the supervision event docs/ARCHITECTURE.md names.

use std::time::Duration;

use canopy_runtime::process::{
    CommandLine, FailureReason, HeartbeatPolicy, ProcessFailed, ProcessMsg, ProcessSpec,
    spawn_process,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// What a probe saw happen to its child.
#[derive(Debug)]
enum Seen {
    Failed(Option<ProcessFailed>),
    Terminated(Option<String>),
}

/// A parent actor that reports its children's deaths on a channel.
struct Probe;

#[derive(RactorMessage)]
enum ProbeMsg {}

impl Actor for Probe {
    type Msg = ProbeMsg;
    type State = mpsc::UnboundedSender<Seen>;
    type Arguments = mpsc::UnboundedSender<Seen>;

    async fn pre_start(
        &self,
        _: ActorRef<ProbeMsg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<ProbeMsg>,
        evt: SupervisionEvent,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(_, err) => {
                let failed = err.downcast_ref::<ProcessFailed>().cloned();
                let _ = tx.send(Seen::Failed(failed));
            }
            SupervisionEvent::ActorTerminated(_, _, reason) => {
                let _ = tx.send(Seen::Terminated(reason));
            }
            _ => {}
        }
        Ok(())
    }
}

struct Harness {
    probe: ActorRef<ProbeMsg>,
    seen: mpsc::UnboundedReceiver<Seen>,
}

impl Harness {
    async fn new() -> Self {
        let (tx, seen) = mpsc::unbounded_channel();
        let (probe, _) = Actor::spawn(None, Probe, tx).await.expect("probe starts");
        Self { probe, seen }
    }

    async fn next(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(10), self.seen.recv())
            .await
            .expect("a supervision event within 10 s")
            .expect("probe alive")
    }

    async fn failure(&mut self) -> ProcessFailed {
        match self.next().await {
            Seen::Failed(Some(f)) => f,
            other => panic!("expected a ProcessFailed, got {other:?}"),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.probe.stop(None);
    }
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec::new(CommandLine::new("sh").args(["-c", script]))
}

fn alive(pid: u32) -> bool {
    // A zombie still answers kill(0); the owner task reaps, so "gone" means reaped.
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

async fn wait_gone(pid: u32) {
    for _ in 0..200 {
        if !alive(pid) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("process {pid} is still alive");
}

#[tokio::test]
async fn detects_non_zero_exit_with_stderr_tail() {
    let mut h = Harness::new().await;
    let (_actor, io, _) = spawn_process(
        None,
        sh("echo 'first line' >&2; echo 'out of memory, giving up' >&2; exit 3"),
        h.probe.get_cell(),
    )
    .await
    .expect("spawns");
    let failed = h.failure().await;
    assert_eq!(failed.reason, FailureReason::Exited { code: 3 });
    assert_eq!(failed.pid, io.pid);
    assert_eq!(
        failed.stderr_tail,
        vec![
            "first line".to_string(),
            "out of memory, giving up".to_string()
        ]
    );
}

#[tokio::test]
async fn detects_death_by_sigkill() {
    let mut h = Harness::new().await;
    let (_actor, io, _) = spawn_process(None, sh("sleep 30"), h.probe.get_cell())
        .await
        .expect("spawns");
    kill(Pid::from_raw(io.pid as i32), Signal::SIGKILL).expect("kill");
    let failed = h.failure().await;
    assert_eq!(failed.reason, FailureReason::Signaled { signal: 9 });
}

#[tokio::test]
async fn unexpected_exit_zero_is_a_failure() {
    let mut h = Harness::new().await;
    spawn_process(None, sh("exit 0"), h.probe.get_cell())
        .await
        .expect("spawns");
    assert_eq!(h.failure().await.reason, FailureReason::UnexpectedExit);
}

#[tokio::test]
async fn requested_shutdown_is_not_a_failure() {
    let mut h = Harness::new().await;
    // The child exits 0 when its stdin says so: our stand-in for a protocol Shutdown.
    let (actor, mut io, _) = spawn_process(None, sh("read line; exit 0"), h.probe.get_cell())
        .await
        .expect("spawns");
    io.stdin.write_all(b"shutdown\n").await.expect("write");
    actor
        .send_message(ProcessMsg::Shutdown {
            grace: Duration::from_secs(5),
        })
        .expect("send");
    match h.next().await {
        Seen::Terminated(reason) => assert_eq!(reason.as_deref(), Some("shutdown")),
        other => panic!("expected a normal termination, got {other:?}"),
    }
    wait_gone(io.pid).await;
}

#[tokio::test]
async fn shutdown_escalates_to_sigterm_then_sigkill() {
    let mut h = Harness::new().await;
    let mut spec = sh("trap '' TERM; while true; do sleep 0.05; done");
    spec.term_grace = Duration::from_millis(200);
    let (actor, io, _) = spawn_process(None, spec, h.probe.get_cell())
        .await
        .expect("spawns");
    let start = std::time::Instant::now();
    actor
        .send_message(ProcessMsg::Shutdown {
            grace: Duration::from_millis(100),
        })
        .expect("send");
    match h.next().await {
        Seen::Terminated(reason) => assert_eq!(reason.as_deref(), Some("shutdown")),
        other => panic!("expected a normal termination, got {other:?}"),
    }
    assert!(start.elapsed() >= Duration::from_millis(300));
    wait_gone(io.pid).await;
}

#[tokio::test]
async fn heartbeat_timeout_detects_a_sigstopped_child() {
    let mut h = Harness::new().await;
    let policy = HeartbeatPolicy {
        timeout: Duration::from_millis(300),
        startup_grace: Duration::from_secs(5),
        check_every: Duration::from_millis(20),
    };
    let spec = sh("while true; do echo beat; sleep 0.05; done").heartbeat(policy);
    let (actor, io, _) = spawn_process(None, spec, h.probe.get_cell())
        .await
        .expect("spawns");
    // Feed the actor a heartbeat for every line the child prints.
    let feeder = {
        let actor = actor.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(io.stdout).lines();
            while let Ok(Some(_)) = lines.next_line().await {
                let _ = actor.send_message(ProcessMsg::Heartbeat);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        h.seen.try_recv().is_err(),
        "a beating child must not be declared dead"
    );
    let stopped_at = std::time::Instant::now();
    kill(Pid::from_raw(io.pid as i32), Signal::SIGSTOP).expect("stop");
    let failed = h.failure().await;
    match failed.reason {
        FailureReason::HeartbeatMissed { last_seen } => {
            assert!(last_seen >= Duration::from_millis(300), "{last_seen:?}")
        }
        other => panic!("expected HeartbeatMissed, got {other:?}"),
    }
    assert!(stopped_at.elapsed() < Duration::from_secs(3));
    wait_gone(io.pid).await;
    feeder.abort();
}

#[tokio::test]
async fn kill_with_reason_reports_that_reason() {
    let mut h = Harness::new().await;
    let (actor, io, _) = spawn_process(None, sh("sleep 30"), h.probe.get_cell())
        .await
        .expect("spawns");
    actor
        .send_message(ProcessMsg::Kill {
            reason: FailureReason::Stalled {
                phase: "decode".into(),
            },
        })
        .expect("send");
    assert_eq!(
        h.failure().await.reason,
        FailureReason::Stalled {
            phase: "decode".into()
        }
    );
    wait_gone(io.pid).await;
}

#[tokio::test]
async fn no_orphan_when_the_actor_is_killed_or_stopped() {
    let h = Harness::new().await;
    let (actor, io, handle) = spawn_process(None, sh("sleep 30"), h.probe.get_cell())
        .await
        .expect("spawns");
    actor.kill();
    let _ = handle.await;
    wait_gone(io.pid).await;

    let mut spec = sh("trap '' TERM; while true; do sleep 0.05; done");
    spec.term_grace = Duration::from_millis(100);
    let (actor, io, _) = spawn_process(None, spec, h.probe.get_cell())
        .await
        .expect("spawns");
    actor
        .stop_and_wait(None, Some(Duration::from_secs(5)))
        .await
        .expect("stops");
    wait_gone(io.pid).await;
}

#[tokio::test]
async fn missing_program_fails_to_spawn_with_a_clear_error() {
    let h = Harness::new().await;
    let err = spawn_process(
        None,
        ProcessSpec::new(CommandLine::new("/nonexistent/canopy-runner")),
        h.probe.get_cell(),
    )
    .await
    .expect_err("must fail");
    assert!(
        err.to_string().contains("/nonexistent/canopy-runner"),
        "{err}"
    );
}
