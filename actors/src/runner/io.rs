//! The two tasks that move frames between a `RunnerSupervisor` and its runner's pipes.
//!
//! The reader decodes `FromRunner` frames from the runner's stdout. Heartbeats go straight
//! to the process actor's watchdog (never through the supervisor's mailbox, so a busy
//! supervisor cannot make a healthy runner look dead); everything else goes to the
//! supervisor, tagged with the runner's generation so that late frames of a dead runner are
//! recognised and ignored. A malformed frame is reported as a protocol error.
//!
//! The writer owns the runner's stdin and writes `ToRunner` frames fed through a channel, so
//! the supervisor never blocks on a full pipe (a frozen runner stops reading).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use canopy_proto::{FrameCodec, FromRunner, ToRunner};
use canopy_runtime::process::ProcessMsg;
use futures::{SinkExt, StreamExt};
use ractor::ActorRef;
use tokio::process::{ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite};

use super::messages::RunnerMsg;

/// Starts the reader task for one runner generation.
pub(super) fn spawn_reader(
    stdout: ChildStdout,
    generation: u64,
    process: ActorRef<ProcessMsg>,
    supervisor: ActorRef<RunnerMsg>,
    last_beat: Arc<Mutex<Option<Instant>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut frames = FramedRead::new(stdout, FrameCodec::<FromRunner, ToRunner>::new());
        while let Some(frame) = frames.next().await {
            match frame {
                Ok(FromRunner::Heartbeat { .. }) => {
                    if let Ok(mut beat) = last_beat.lock() {
                        *beat = Some(Instant::now());
                    }
                    if process.send_message(ProcessMsg::Heartbeat).is_err() {
                        break;
                    }
                }
                Ok(event) => {
                    if supervisor
                        .send_message(RunnerMsg::FromRunner(generation, event))
                        .is_err()
                    {
                        break;
                    }
                }
                Err(err) => {
                    let _ = supervisor
                        .send_message(RunnerMsg::ProtocolError(generation, err.to_string()));
                    break;
                }
            }
        }
        // After every frame it delivered: a dead runner's tasks are failed only once what it
        // wrote before dying has reached them.
        let _ = supervisor.send_message(RunnerMsg::OutputClosed(generation));
    })
}

/// Starts the writer task; frames sent on the returned channel are written in order.
pub(super) fn spawn_writer(
    stdin: ChildStdin,
    generation: u64,
    supervisor: ActorRef<RunnerMsg>,
) -> (mpsc::UnboundedSender<ToRunner>, JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<ToRunner>();
    let task = tokio::spawn(async move {
        let mut sink = FramedWrite::new(stdin, FrameCodec::<FromRunner, ToRunner>::new());
        while let Some(msg) = rx.recv().await {
            if let Err(err) = sink.send(msg).await {
                // A closed pipe means the runner is dying; its exit is reported by the process
                // actor. Anything else (an unencodable frame) is worth a protocol error.
                if !matches!(&err, canopy_proto::ProtoError::Io(_)) {
                    let _ = supervisor
                        .send_message(RunnerMsg::ProtocolError(generation, err.to_string()));
                }
                break;
            }
        }
    });
    (tx, task)
}
