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
    /// Starts beating now, then every `interval`.
    pub fn spawn(
        outbox: Arc<Outbox>,
        interval: Duration,
        hooks: FaultHooks,
    ) -> std::io::Result<Self> {
        let (stop, stopped) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("heartbeat".to_string())
            .spawn(move || {
                let mut seq = 0u64;
                let mut next = Instant::now();
                loop {
                    if !hooks.heartbeat_frozen() {
                        outbox.send(&FromRunner::Heartbeat { seq });
                        seq += 1;
                    }
                    next += interval;
                    let now = Instant::now();
                    if next <= now {
                        next = now + interval;
                    }
                    match stopped.recv_timeout(next - now) {
                        Err(RecvTimeoutError::Timeout) => {}
                        Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
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
