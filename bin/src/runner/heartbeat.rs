//! The heartbeat: a plain OS thread that sends `Heartbeat { seq }` every interval.
//!
//! It is independent of the work loop on purpose: a runner busy in a long prefill still beats,
//! while a runner whose process is frozen (SIGSTOP, a deadlock that takes the whole process, an
//! injected freeze) stops beating, and its supervisor kills it. The beat is scheduled at a fixed
//! rate (it does not drift by the time a frame takes to write); after a late wake-up it resumes
//! from now instead of sending a burst.
//!
//! An injected freeze ([`FaultHooks::freeze_heartbeat`]) silences the beat for good while the
//! thread stays alive.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use canopy_engine::FaultHooks;
use canopy_proto::FromRunner;

use super::outbox::Outbox;

/// A running heartbeat thread; [`stop`](Heartbeat::stop) ends it.
pub struct Heartbeat {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Heartbeat {
    /// Beats once now, on the caller's thread, then every `interval` from a thread of its own.
    ///
    /// The first beat is written before this returns, so it precedes on the pipe every frame
    /// the caller writes afterwards (`Idle`, `Ready`): a supervisor that saw the runner ready
    /// has seen a beat, and a runner frozen right after that is judged by the heartbeat
    /// timeout rather than by the longer start-up grace, however late the thread is scheduled.
    pub fn spawn(
        outbox: Arc<Outbox>,
        interval: Duration,
        hooks: FaultHooks,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let mut seq = 0u64;
        if !hooks.heartbeat_frozen() {
            outbox.send(&FromRunner::Heartbeat { seq });
            seq += 1;
        }
        let mut next = Instant::now();
        let thread = thread::Builder::new()
            .name("heartbeat".to_string())
            .spawn(move || {
                loop {
                    next += interval;
                    let now = Instant::now();
                    if next <= now {
                        next = now + interval;
                    }
                    match stopped.recv_timeout(next - now) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
                    }
                    if !hooks.heartbeat_frozen() {
                        outbox.send(&FromRunner::Heartbeat { seq });
                        seq += 1;
                    }
                }
                tracing::debug!(beats = seq, "heartbeat stopped");
            })?;
        Ok(Self { stop, thread })
    }

    /// Stops the heartbeat and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            tracing::error!("the heartbeat thread panicked");
        }
    }
}
