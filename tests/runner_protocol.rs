//! The `canopy runner` process, driven over its real stdin/stdout.
//!
//! Each test spawns the binary with piped stdio, speaks frames to it, and checks what comes
//! back. A reader thread decodes stdout into a channel and every wait has a timeout, so a
//! misbehaving runner fails a test instead of hanging it; every spawned runner is killed when
//! its test ends.

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use canopy_proto::{
    BatchStats, FinishReason, FromRunner, GenerateParams, GenerateRequest, HANDSHAKE_MAGIC,
    Handshake, LoadSpec, MAX_FRAME_LEN, PROTOCOL_VERSION, Phase, Prompt, RunnerStatus,
    TaskErrorKind, TaskId, ToRunner, Usage, read_frame, write_frame,
};

/// The longest any single expectation waits.
const WAIT: Duration = Duration::from_secs(10);

/// A spawned runner with a decoded view of its stdout.
struct Runner {
    child: Child,
    stdin: Option<ChildStdin>,
    frames: Receiver<FromRunner>,
}

impl Runner {
    fn spawn(extra_args: &[&str], fault: Option<&str>) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_canopy"));
        command
            .arg("runner")
            .args(["--engine", "scripted", "--heartbeat-ms", "20"])
            .args(extra_args)
            .env_remove("CANOPY_RUNNER_FAULT")
            .env_remove("CANOPY_RUNNER_HEARTBEAT_MS")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(spec) = fault {
            command.env("CANOPY_RUNNER_FAULT", spec);
        }
        if std::env::var_os("CANOPY_LOG").is_none() {
            // The runner's stderr is not captured by the test harness; keep it quiet unless
            // asked (CANOPY_LOG=debug cargo test ...).
            command.env("CANOPY_LOG", "warn");
        }
        let mut child = command.spawn().expect("spawn canopy runner");
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let (tx, frames) = mpsc::channel();
        thread::spawn(move || {
            while let Ok(Some(frame)) = read_frame::<FromRunner, _>(&mut stdout, MAX_FRAME_LEN) {
                if tx.send(frame).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            frames,
        }
    }

    /// Spawns a runner and completes the handshake.
    fn started(extra_args: &[&str], fault: Option<&str>) -> Self {
        let mut runner = Self::spawn(extra_args, fault);
        runner.send(&ToRunner::Handshake(Handshake::ours()));
        match runner.next() {
            FromRunner::Handshake(theirs) => {
                assert!(theirs.check().is_ok(), "{theirs:?}");
                assert_eq!(theirs.pid, runner.child.id());
            }
            other => panic!("expected the runner's handshake, got {other:?}"),
        }
        assert_eq!(runner.next(), FromRunner::Status(RunnerStatus::Idle));
        runner
    }

    /// Spawns, handshakes and loads `model`, waiting for `Ready`.
    fn ready(model: &str, fault: Option<&str>) -> Self {
        let mut runner = Self::started(&[], fault);
        runner.send(&ToRunner::Load(load_spec(model)));
        runner.until(|f| f == &FromRunner::Status(RunnerStatus::Ready));
        runner
    }

    fn send(&mut self, msg: &ToRunner) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        write_frame(stdin, msg, MAX_FRAME_LEN).expect("write a frame to the runner");
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(bytes).expect("write bytes to the runner");
        stdin.flush().expect("flush");
    }

    fn generate(&mut self, task_id: TaskId, prompt: &str, max_tokens: u32) {
        self.send(&ToRunner::Generate {
            task_id,
            request: GenerateRequest {
                tools: Vec::new(),
                prompt: Prompt::Text(prompt.to_string()),
                params: GenerateParams {
                    max_tokens,
                    ..GenerateParams::default()
                },
            },
        });
    }

    /// The next frame that is neither a heartbeat nor a batch report (see
    /// `batch_reports_follow_the_load_and_every_task` for those).
    fn next(&self) -> FromRunner {
        loop {
            match self.next_any() {
                FromRunner::Heartbeat { .. } | FromRunner::Batch(_) => continue,
                frame => return frame,
            }
        }
    }

    /// The next frame, heartbeats included.
    fn next_any(&self) -> FromRunner {
        match self.frames.recv_timeout(WAIT) {
            Ok(frame) => frame,
            Err(RecvTimeoutError::Timeout) => panic!("no frame from the runner within {WAIT:?}"),
            Err(RecvTimeoutError::Disconnected) => panic!("the runner's stdout ended"),
        }
    }

    /// Skips non-heartbeat frames until one matches; returns the skipped ones and the match.
    fn until(&self, wanted: impl Fn(&FromRunner) -> bool) -> (Vec<FromRunner>, FromRunner) {
        let mut skipped = Vec::new();
        loop {
            let frame = self.next();
            if wanted(&frame) {
                return (skipped, frame);
            }
            skipped.push(frame);
        }
    }

    /// Frames (heartbeats included) that arrive within `window`, without failing if none do.
    fn collect_for(&self, window: Duration) -> Vec<FromRunner> {
        let deadline = Instant::now() + window;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.frames.recv_timeout(left) {
                Ok(frame) => frames.push(frame),
                Err(_) => return frames,
            }
        }
    }

    fn close_stdin(&mut self) {
        self.stdin.take();
    }

    /// Waits for the process to exit.
    fn wait(&mut self) -> ExitStatus {
        crate::common::eventually_some(WAIT, "the runner to exit", || {
            self.child.try_wait().expect("try_wait")
        })
        .unwrap_or_else(|why| panic!("{why}"))
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load_spec(model: &str) -> LoadSpec {
    LoadSpec {
        model: model.to_string(),
        layer_start: None,
        layer_end: None,
        threads: None,
        parallel: None,
    }
}

fn is_done(task_id: TaskId) -> impl Fn(&FromRunner) -> bool {
    move |f| matches!(f, FromRunner::Done { task_id: t, .. } | FromRunner::TaskError { task_id: t, .. } if *t == task_id)
}

fn chunk_count(frames: &[FromRunner]) -> usize {
    frames
        .iter()
        .filter(|f| matches!(f, FromRunner::Chunk { .. }))
        .count()
}

fn beats(frames: &[FromRunner]) -> usize {
    frames
        .iter()
        .filter(|f| matches!(f, FromRunner::Heartbeat { .. }))
        .count()
}

fn marker_path(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("canopy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn handshake_load_generate_and_shutdown() {
    let mut runner = Runner::started(&[], None);

    runner.send(&ToRunner::Load(load_spec("scripted:layers=3")));
    let mut load = Vec::new();
    loop {
        let frame = runner.next();
        let ready = frame == FromRunner::Status(RunnerStatus::Ready);
        load.push(frame);
        if ready {
            break;
        }
    }
    assert_eq!(
        load,
        vec![
            FromRunner::Status(RunnerStatus::Loading),
            FromRunner::LoadProgress { done: 1, total: 3 },
            FromRunner::LoadProgress { done: 2, total: 3 },
            FromRunner::LoadProgress { done: 3, total: 3 },
            FromRunner::Status(RunnerStatus::Loaded),
            FromRunner::Status(RunnerStatus::Ready),
        ]
    );

    runner.generate(7, "hello tokens=5", 16);
    assert_eq!(runner.next(), FromRunner::Ack { task_id: 7 });
    assert_eq!(runner.next(), FromRunner::Started { task_id: 7 });
    assert_eq!(runner.next(), FromRunner::Status(RunnerStatus::Running));
    assert_eq!(
        runner.next(),
        FromRunner::Progress {
            task_id: 7,
            phase: Phase::Prefill
        }
    );
    let (between, done) = runner.until(is_done(7));
    let chunks: Vec<_> = between
        .iter()
        .filter_map(|f| match f {
            FromRunner::Chunk { task_id: 7, chunk } => Some(chunk.text.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(chunks, vec!["0 ", "1 ", "2 ", "3 ", "4 "]);
    assert!(between.contains(&FromRunner::Progress {
        task_id: 7,
        phase: Phase::Decode
    }));
    assert_eq!(
        done,
        FromRunner::Done {
            task_id: 7,
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 2,
                completion_tokens: 5
            },
        }
    );
    assert_eq!(runner.next(), FromRunner::Status(RunnerStatus::Ready));

    runner.send(&ToRunner::Shutdown);
    assert_eq!(
        runner.next(),
        FromRunner::Status(RunnerStatus::ShuttingDown)
    );
    assert_eq!(runner.next(), FromRunner::Status(RunnerStatus::Shutdown));
    assert_eq!(runner.wait().code(), Some(0));
}

#[test]
fn heartbeats_flow_with_increasing_seq() {
    let runner = Runner::started(&[], None);
    let seqs: Vec<u64> = runner
        .collect_for(Duration::from_millis(300))
        .into_iter()
        .filter_map(|f| match f {
            FromRunner::Heartbeat { seq } => Some(seq),
            _ => None,
        })
        .collect();
    assert!(seqs.len() >= 3, "{seqs:?}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

#[test]
fn cancel_mid_stream_ends_with_cancelled() {
    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=1000 delay_ms=5", 1000);
    runner.until(|f| matches!(f, FromRunner::Chunk { chunk, .. } if chunk.index == 2));
    runner.send(&ToRunner::Cancel { task_id: 1 });
    let (between, done) = runner.until(is_done(1));
    assert!(
        chunk_count(&between) < 100,
        "{} more chunks",
        chunk_count(&between)
    );
    match done {
        FromRunner::Done {
            finish_reason: FinishReason::Cancelled,
            usage,
            ..
        } => assert!(usage.completion_tokens >= 3 && usage.completion_tokens < 100),
        other => panic!("expected Done(Cancelled), got {other:?}"),
    }
    assert_eq!(runner.next(), FromRunner::Status(RunnerStatus::Ready));
}

#[test]
fn cancel_of_a_queued_task_answers_it_without_running_it() {
    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=1000 delay_ms=5", 1000);
    runner.generate(2, "tokens=5", 16);
    runner.until(|f| f == &FromRunner::Ack { task_id: 2 });
    runner.send(&ToRunner::Cancel { task_id: 2 });
    let (between, done) = runner.until(is_done(2));
    assert!(!between.contains(&FromRunner::Started { task_id: 2 }));
    assert_eq!(
        done,
        FromRunner::Done {
            task_id: 2,
            finish_reason: FinishReason::Cancelled,
            usage: Usage::default()
        }
    );
    runner.send(&ToRunner::Cancel { task_id: 1 });
    runner.until(is_done(1));
    // Cancelling an ended task is harmless.
    runner.send(&ToRunner::Cancel { task_id: 1 });
    runner.generate(3, "tokens=1", 16);
    runner.until(is_done(3));
}

#[test]
fn generate_before_load_is_a_task_error() {
    let mut runner = Runner::started(&[], None);
    runner.generate(4, "tokens=1", 16);
    assert_eq!(runner.next(), FromRunner::Ack { task_id: 4 });
    assert_eq!(
        runner.next(),
        FromRunner::TaskError {
            task_id: 4,
            error: "model not loaded".to_string(),
            kind: TaskErrorKind::Internal,
        }
    );
}

#[test]
fn load_failure_keeps_the_runner_up() {
    let mut runner = Runner::started(&[], None);
    runner.send(&ToRunner::Load(load_spec("scripted:layers=2,fail")));
    let (_, failed) = runner.until(|f| matches!(f, FromRunner::LoadFailed { .. }));
    let FromRunner::LoadFailed { error } = failed else {
        unreachable!()
    };
    assert!(error.contains("scripted:layers=2,fail"), "{error}");
    assert_eq!(runner.next(), FromRunner::Status(RunnerStatus::Failed));

    runner.send(&ToRunner::Load(load_spec("/models/real.gguf")));
    let (_, failed) = runner.until(|f| matches!(f, FromRunner::LoadFailed { .. }));
    assert!(format!("{failed:?}").contains("real.gguf"));

    runner.send(&ToRunner::Load(load_spec("scripted")));
    runner.until(|f| f == &FromRunner::Status(RunnerStatus::Ready));
    runner.generate(1, "tokens=2", 16);
    let (_, done) = runner.until(is_done(1));
    assert!(matches!(done, FromRunner::Done { .. }), "{done:?}");
}

#[test]
fn a_failing_task_does_not_hurt_the_runner() {
    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=5 error_after=2", 16);
    let (between, end) = runner.until(is_done(1));
    assert_eq!(chunk_count(&between), 2);
    assert!(
        matches!(end, FromRunner::TaskError { task_id: 1, .. }),
        "{end:?}"
    );
    runner.generate(2, "tokens=4", 2);
    let (_, end) = runner.until(is_done(2));
    assert!(
        matches!(
            end,
            FromRunner::Done {
                finish_reason: FinishReason::Length,
                ..
            }
        ),
        "{end:?}"
    );
}

#[test]
fn wrong_handshake_version_exits_2() {
    let mut runner = Runner::spawn(&[], None);
    runner.send(&ToRunner::Handshake(Handshake {
        magic: HANDSHAKE_MAGIC.to_string(),
        version: PROTOCOL_VERSION + 1,
        pid: std::process::id(),
    }));
    assert_eq!(runner.wait().code(), Some(2));
}

#[test]
fn wrong_handshake_magic_exits_2() {
    let mut runner = Runner::spawn(&[], None);
    runner.send(&ToRunner::Handshake(Handshake {
        magic: "not-canopy".to_string(),
        version: PROTOCOL_VERSION,
        pid: std::process::id(),
    }));
    assert_eq!(runner.wait().code(), Some(2));
}

#[test]
fn a_first_frame_other_than_handshake_exits_2() {
    let mut runner = Runner::spawn(&[], None);
    runner.send(&ToRunner::Shutdown);
    assert_eq!(runner.wait().code(), Some(2));
}

#[test]
fn garbage_on_stdin_exits_2() {
    let mut runner = Runner::spawn(&[], None);
    runner.send_raw(&[0, 0, 0, 5, 0xc1, 0xc1, 0xc1, 0xc1, 0xc1]);
    assert_eq!(runner.wait().code(), Some(2));
}

#[test]
fn garbage_after_the_handshake_exits_2() {
    let mut runner = Runner::started(&[], None);
    runner.send_raw(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(runner.wait().code(), Some(2));
}

#[test]
fn closed_stdin_exits_0() {
    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=100000 delay_ms=5", 100000);
    runner.until(|f| matches!(f, FromRunner::Chunk { .. }));
    runner.close_stdin();
    assert_eq!(runner.wait().code(), Some(0));
}

#[test]
fn shutdown_cancels_running_and_queued_tasks() {
    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=100000 delay_ms=5", 100000);
    runner.generate(2, "tokens=3", 16);
    runner.until(|f| matches!(f, FromRunner::Chunk { .. }));
    runner.send(&ToRunner::Shutdown);
    let (rest, _) = runner.until(|f| f == &FromRunner::Status(RunnerStatus::Shutdown));
    for task_id in [1, 2] {
        assert!(
            rest.iter().any(|f| matches!(f,
                FromRunner::Done { task_id: t, finish_reason: FinishReason::Cancelled, .. }
                if *t == task_id)),
            "task {task_id} not cancelled: {rest:?}"
        );
    }
    assert!(!rest.contains(&FromRunner::Status(RunnerStatus::Ready)));
    assert_eq!(runner.wait().code(), Some(0));
}

#[test]
fn bad_arguments_exit_2() {
    for args in [
        &["--fault", "explode=1"][..],
        &["--fault", "crash-after-tokens=0"][..],
        &["--engine", "nonsense"][..],
        &["--heartbeat-ms", "0"][..],
    ] {
        let status = Command::new(env!("CARGO_BIN_EXE_canopy"))
            .arg("runner")
            .args(args)
            .env_remove("CANOPY_RUNNER_FAULT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run canopy runner");
        assert_eq!(status.code(), Some(2), "{args:?}");
    }
    // The same spec through the environment.
    let status = Command::new(env!("CARGO_BIN_EXE_canopy"))
        .arg("runner")
        .env("CANOPY_RUNNER_FAULT", "crash-after-tokens=x")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run canopy runner");
    assert_eq!(status.code(), Some(2));
}

#[test]
fn an_empty_fault_variable_arms_nothing() {
    let mut runner = Runner::spawn(&[], Some(""));
    runner.send(&ToRunner::Handshake(Handshake::ours()));
    assert!(matches!(runner.next(), FromRunner::Handshake(_)));
}

#[test]
fn fault_crash_after_tokens_sigkills_once_per_marker() {
    let marker = marker_path("crash-marker");
    let spec = format!("crash-after-tokens=3,once={}", marker.display());
    let mut runner = Runner::ready("scripted", Some(&spec));
    runner.generate(1, "tokens=10", 16);
    let mut chunks = 0;
    while runner.frames.recv_timeout(WAIT).is_ok_and(|f| {
        chunks += usize::from(matches!(f, FromRunner::Chunk { .. }));
        true
    }) {}
    assert_eq!(chunks, 3);
    assert_eq!(runner.wait().signal(), Some(9));
    assert!(marker.exists());

    // The "restarted" runner finds the marker and stays healthy.
    let mut runner = Runner::ready("scripted", Some(&spec));
    runner.generate(1, "tokens=10", 16);
    let (between, done) = runner.until(is_done(1));
    assert_eq!(chunk_count(&between), 10);
    assert!(matches!(done, FromRunner::Done { .. }));
    let _ = std::fs::remove_file(&marker);
}

#[test]
fn fault_exit0_after_tokens_exits_zero_mid_task() {
    let mut runner = Runner::ready("scripted", Some("exit0-after-tokens=2"));
    runner.generate(1, "tokens=10", 16);
    assert_eq!(runner.wait().code(), Some(0));
}

#[test]
fn fault_crash_on_load() {
    let mut runner = Runner::started(&[], Some("crash-on-load"));
    runner.send(&ToRunner::Load(load_spec("scripted")));
    assert_eq!(runner.wait().signal(), Some(9));
}

#[test]
fn fault_freeze_heartbeat_keeps_streaming_without_beats() {
    let mut runner = Runner::ready("scripted", Some("freeze-heartbeat-after-tokens=2"));
    runner.generate(1, "tokens=40 delay_ms=10", 100);
    runner.until(|f| matches!(f, FromRunner::Chunk { chunk, .. } if chunk.index == 10));
    let later = runner.collect_for(Duration::from_millis(200));
    assert_eq!(beats(&later), 0, "{later:?}");
    assert!(chunk_count(&later) > 5, "{later:?}");
}

#[test]
fn fault_stall_keeps_beating_without_chunks() {
    let mut runner = Runner::ready("scripted", Some("stall-after-tokens=2"));
    runner.generate(1, "tokens=40", 100);
    runner.until(|f| matches!(f, FromRunner::Chunk { chunk, .. } if chunk.index == 1));
    let later = runner.collect_for(Duration::from_millis(300));
    assert_eq!(chunk_count(&later), 0, "{later:?}");
    assert!(beats(&later) >= 5, "{later:?}");
    // A wedged worker does not stop a clean EOF exit.
    runner.close_stdin();
    assert_eq!(runner.wait().code(), Some(0));
}

#[test]
fn scripted_exit_and_abort_directives_end_the_process() {
    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=10 exit_after=2:7", 16);
    assert_eq!(runner.wait().code(), Some(7));

    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=10 abort_after=1", 16);
    assert_eq!(runner.wait().signal(), Some(9));
}

#[test]
fn scripted_hang_wedges_the_work_but_not_the_heartbeat() {
    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=10 hang_after=1", 16);
    runner.until(|f| matches!(f, FromRunner::Chunk { .. }));
    runner.send(&ToRunner::Cancel { task_id: 1 });
    let later = runner.collect_for(Duration::from_millis(300));
    assert_eq!(chunk_count(&later), 0, "{later:?}");
    assert!(!later.iter().any(is_done(1)), "{later:?}");
    assert!(beats(&later) >= 5, "{later:?}");
}

#[test]
fn scripted_freeze_directive_silences_the_heartbeat() {
    let mut runner = Runner::ready("scripted", None);
    runner.generate(1, "tokens=40 delay_ms=10 freeze_after=1", 100);
    runner.until(|f| matches!(f, FromRunner::Chunk { chunk, .. } if chunk.index == 10));
    let later = runner.collect_for(Duration::from_millis(150));
    assert_eq!(beats(&later), 0, "{later:?}");
    assert!(chunk_count(&later) > 3, "{later:?}");
}

#[test]
fn batch_reports_follow_the_load_and_every_task() {
    let mut runner = Runner::started(&[], None);
    runner.send(&ToRunner::Load(load_spec("scripted")));
    runner.generate(1, "tokens=3", 16);
    let mut all = Vec::new();
    let mut done = false;
    let deadline = std::time::Instant::now() + WAIT;
    // Until the task is done and a report says nothing runs any more.
    while !(done && all.last().is_some_and(|s: &BatchStats| s.running == 0)) {
        assert!(
            std::time::Instant::now() < deadline,
            "reports so far: {all:?}"
        );
        match runner.next_any() {
            FromRunner::Batch(stats) => all.push(stats),
            FromRunner::Done { task_id: 1, .. } => done = true,
            _ => {}
        }
    }
    assert!(all.iter().all(|s| s.parallel == 1), "{all:?}");
    assert_eq!(
        all.first().map(|s| s.running),
        Some(0),
        "the load's report: {all:?}"
    );
    assert!(
        all.iter().any(|s| s.running == 1),
        "a report while the task ran: {all:?}"
    );
    runner.send(&ToRunner::Shutdown);
}
