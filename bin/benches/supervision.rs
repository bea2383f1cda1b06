//! Supervision benchmarks: how fast a death is noticed, whether a busy machine causes false
//! alarms, and what a local actor message costs. Prints numbers; asserts nothing.
//!
//! `cargo bench -p canopy --bench supervision` (or `just bench`). Environment:
//! - `CANOPY_BENCH_KILL_TRIALS` (default 200): kill -9 trials;
//! - `CANOPY_BENCH_STOP_TRIALS` (default 10): SIGSTOP trials;
//! - `CANOPY_BENCH_SATURATE_SECS` (default 300): length of the saturated false-positive run
//!   (0 skips it).

use std::time::{Duration, Instant};

use canopy_actors::runner::{
    RestartPolicy, RunnerCommand, RunnerConfig, RunnerEvent, RunnerMsg, RunnerSupervisor,
    RunnerSupervisorArgs, TaskEvent,
};
use canopy_proto::{GenerateParams, GenerateRequest, LoadSpec, Prompt, RunnerStatus};
use canopy_runtime::process::FailureReason;
use canopy_runtime::restart::{Backoff, Intensity};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;
use tokio::sync::broadcast;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config() -> RunnerConfig {
    let load = LoadSpec {
        model: "scripted".into(),
        layer_start: None,
        layer_end: None,
        threads: None,
        parallel: None,
    };
    let mut config = RunnerConfig::new(
        "bench",
        RunnerCommand::canopy(env!("CARGO_BIN_EXE_canopy")).args(["--engine", "scripted"]),
        load,
    );
    config.restart = RestartPolicy {
        intensity: Intensity {
            max_restarts: 100_000,
            period: Duration::from_secs(1),
        },
        backoff: Backoff::none(),
    };
    config
}

async fn start(config: RunnerConfig) -> (ActorRef<RunnerMsg>, broadcast::Receiver<RunnerEvent>) {
    let (tx, rx) = broadcast::channel(4096);
    let (sup, _) = Actor::spawn(
        None,
        RunnerSupervisor,
        RunnerSupervisorArgs {
            config,
            events: tx,
            observer: None,
        },
    )
    .await
    .expect("supervisor starts");
    (sup, rx)
}

async fn until_ready(events: &mut broadcast::Receiver<RunnerEvent>) -> u32 {
    let mut pid = 0;
    loop {
        match events.recv().await.expect("events") {
            RunnerEvent::Started { pid: p, .. } => pid = p,
            RunnerEvent::StatusChanged {
                status: RunnerStatus::Ready,
                ..
            } => return pid,
            _ => {}
        }
    }
}

async fn until_failed(events: &mut broadcast::Receiver<RunnerEvent>) -> FailureReason {
    loop {
        if let RunnerEvent::RunnerFailed { reason, .. } = events.recv().await.expect("events") {
            return reason;
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{name}: n={} median={:.2} ms p99={:.2} ms min={:.2} ms max={:.2} ms",
        samples.len(),
        percentile(&samples, 0.5).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples[0].as_secs_f64() * 1e3,
        samples[samples.len() - 1].as_secs_f64() * 1e3,
    );
}

async fn kill_to_failure(trials: u64) {
    let (sup, mut events) = start(config()).await;
    let mut samples = Vec::new();
    for _ in 0..trials {
        let pid = until_ready(&mut events).await;
        let t0 = Instant::now();
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill");
        let reason = until_failed(&mut events).await;
        samples.push(t0.elapsed());
        assert_eq!(reason, FailureReason::Signaled { signal: 9 });
    }
    report("kill -9 -> RunnerFailed event", samples);
    sup.stop(None);
}

async fn sigstop_to_heartbeat_missed(trials: u64) {
    let (sup, mut events) = start(config()).await;
    let mut samples = Vec::new();
    for _ in 0..trials {
        let pid = until_ready(&mut events).await;
        let t0 = Instant::now();
        kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).expect("stop");
        let reason = until_failed(&mut events).await;
        samples.push(t0.elapsed());
        assert!(matches!(reason, FailureReason::HeartbeatMissed { .. }));
    }
    report(
        "SIGSTOP -> HeartbeatMissed (default: beat 100 ms, timeout 1 s)",
        samples,
    );
    sup.stop(None);
}

/// Runs a runner that keeps streaming tokens while every core spins, and counts failures.
async fn saturated_false_positives(secs: u64) {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs: Vec<_> = (0..cores)
        .map(|_| {
            std::process::Command::new("sh")
                .args(["-c", "while :; do :; done"])
                .spawn()
                .expect("cpu hog starts")
        })
        .collect();
    let (sup, mut events) = start(config()).await;
    until_ready(&mut events).await;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut failures = 0u64;
    let mut tokens = 0u64;
    while Instant::now() < deadline {
        let request = GenerateRequest {
            tools: Vec::new(),
            prompt: Prompt::Text("tokens=200 delay_ms=5".into()),
            params: GenerateParams {
                max_tokens: 200,
                ..GenerateParams::default()
            },
        };
        let submitted = sup
            .call(|reply| RunnerMsg::Submit { request, reply }, None)
            .await;
        if let Ok(ractor::rpc::CallResult::Success(Ok(mut handle))) = submitted {
            while let Some(ev) = handle.next().await {
                match ev {
                    TaskEvent::Chunk(_) => tokens += 1,
                    TaskEvent::Failed(_) => failures += 1,
                    TaskEvent::Done { .. } => {}
                }
            }
        } else {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        while let Ok(ev) = events.try_recv() {
            if let RunnerEvent::RunnerFailed { reason, .. } = ev {
                println!("  false positive: {reason}");
            }
        }
    }
    for mut hog in hogs {
        let _ = hog.kill();
        let _ = hog.wait();
    }
    println!(
        "saturated {cores} cores for {secs} s: {failures} false failures, {tokens} tokens streamed"
    );
    sup.stop(None);
}

struct Echo;

#[derive(RactorMessage)]
enum EchoMsg {
    Ping(RpcReplyPort<u64>),
    Cast(u64),
    Count(RpcReplyPort<u64>),
}

impl Actor for Echo {
    type Msg = EchoMsg;
    type State = u64;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<EchoMsg>, _: ()) -> Result<u64, ActorProcessingErr> {
        Ok(0)
    }

    async fn handle(
        &self,
        _: ActorRef<EchoMsg>,
        msg: EchoMsg,
        count: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EchoMsg::Ping(reply) => {
                let _ = reply.send(*count);
            }
            EchoMsg::Cast(n) => *count += n,
            EchoMsg::Count(reply) => {
                let _ = reply.send(*count);
            }
        }
        Ok(())
    }
}

async fn local_messages() {
    let (echo, _) = Actor::spawn(None, Echo, ()).await.expect("echo");
    let n = 100_000;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        let _ = echo.call(EchoMsg::Ping, None).await.expect("call");
        samples.push(t0.elapsed());
    }
    let total: Duration = samples.iter().sum();
    println!(
        "local call round trip: {:.0} calls/s",
        n as f64 / total.as_secs_f64()
    );
    samples.sort();
    println!(
        "local call round trip: median={:.1} us p99={:.1} us",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6
    );

    let casts = 1_000_000u64;
    let t0 = Instant::now();
    for _ in 0..casts {
        echo.cast(EchoMsg::Cast(1)).expect("cast");
    }
    let total = echo.call(EchoMsg::Count, None).await.expect("count");
    let elapsed = t0.elapsed();
    assert!(matches!(total, ractor::rpc::CallResult::Success(c) if c == casts));
    println!(
        "local cast throughput: {:.2} M msgs/s ({casts} casts in {:.0} ms)",
        casts as f64 / elapsed.as_secs_f64() / 1e6,
        elapsed.as_secs_f64() * 1e3
    );
    echo.stop(None);
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    local_messages().await;
    kill_to_failure(env_or("CANOPY_BENCH_KILL_TRIALS", 200)).await;
    sigstop_to_heartbeat_missed(env_or("CANOPY_BENCH_STOP_TRIALS", 10)).await;
    let secs = env_or("CANOPY_BENCH_SATURATE_SECS", 300);
    if secs > 0 {
        saturated_false_positives(secs).await;
    }
}
