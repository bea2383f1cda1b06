//! [`Outbox`]: the one writer of protocol frames to the supervisor.
//!
//! Three threads talk to the supervisor (the stdin reader, the heartbeat, the worker), so every
//! frame goes through one mutex-protected writer and is flushed before the lock is released:
//! frames never interleave and never sit in a buffer.
//!
//! The outbox also remembers the last [`RunnerStatus`] it sent, so that status frames go out
//! only on a change, and so that nothing but `Shutdown` can follow `ShuttingDown` (a worker
//! finishing its last task must not announce `Ready` to a supervisor that asked us to stop).
//!
//! If a frame cannot be written, the supervisor has closed our stdout: it is gone or no longer
//! listening, and every later frame would fail too. The outbox logs it and exits the process
//! (code 0, as for a closed stdin). A frame that cannot be *encoded* is a bug; the process exits
//! with [`EXIT_INTERNAL`] so that the supervisor fails the work rather than
//! waiting for a frame that will never come.

use std::io::Write;
use std::sync::{Mutex, MutexGuard, PoisonError};

use canopy_proto::{FromRunner, MAX_FRAME_LEN, ProtoError, RunnerStatus, write_frame};

use super::{EXIT_INTERNAL, EXIT_SUPERVISOR_GONE};

/// The shared, serialising frame writer.
pub struct Outbox {
    inner: Mutex<Inner>,
}

struct Inner {
    writer: Box<dyn Write + Send>,
    status: Option<RunnerStatus>,
}

impl Outbox {
    /// An outbox writing frames to `writer`.
    pub fn new(writer: impl Write + Send + 'static) -> Self {
        Self {
            inner: Mutex::new(Inner {
                writer: Box::new(writer),
                status: None,
            }),
        }
    }

    /// Writes and flushes one frame; exits the process if that is impossible (see module docs).
    pub fn send(&self, msg: &FromRunner) {
        let mut inner = self.lock();
        if let Err(err) = write_frame(&mut inner.writer, msg, MAX_FRAME_LEN) {
            fail(&err);
        }
    }

    /// Reports `status` if it differs from the last one reported. After `ShuttingDown` only
    /// `Shutdown` is reported.
    pub fn status(&self, status: RunnerStatus) {
        let mut inner = self.lock();
        let allowed = match inner.status {
            Some(last) if last == status => false,
            Some(RunnerStatus::ShuttingDown | RunnerStatus::Shutdown) => {
                status == RunnerStatus::Shutdown
            }
            _ => true,
        };
        if !allowed {
            return;
        }
        tracing::debug!(%status, "status changed");
        if let Err(err) = write_frame(
            &mut inner.writer,
            &FromRunner::Status(status),
            MAX_FRAME_LEN,
        ) {
            fail(&err);
        }
        inner.status = Some(status);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere exits the process (see the runner's panic hook), so a poisoned
        // lock only means "someone panicked mid-frame"; the writer itself is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn fail(err: &ProtoError) -> ! {
    match err {
        ProtoError::Io(io) => {
            tracing::info!(%io, "cannot write to the supervisor (stdout closed); exiting");
            std::process::exit(EXIT_SUPERVISOR_GONE);
        }
        other => {
            tracing::error!(err = %other, "cannot encode a protocol frame; exiting");
            std::process::exit(EXIT_INTERNAL);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use canopy_proto::read_frame;

    use super::*;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn frames(buf: &SharedBuf) -> Vec<FromRunner> {
        let bytes = buf.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let mut reader = bytes.as_slice();
        let mut out = Vec::new();
        while let Ok(Some(frame)) = read_frame(&mut reader, MAX_FRAME_LEN) {
            out.push(frame);
        }
        out
    }

    #[test]
    fn status_goes_out_only_on_change() {
        let buf = SharedBuf::default();
        let outbox = Outbox::new(buf.clone());
        outbox.status(RunnerStatus::Idle);
        outbox.status(RunnerStatus::Idle);
        outbox.status(RunnerStatus::Loading);
        assert_eq!(
            frames(&buf),
            vec![
                FromRunner::Status(RunnerStatus::Idle),
                FromRunner::Status(RunnerStatus::Loading)
            ]
        );
    }

    #[test]
    fn only_shutdown_follows_shutting_down() {
        let buf = SharedBuf::default();
        let outbox = Outbox::new(buf.clone());
        outbox.status(RunnerStatus::ShuttingDown);
        outbox.status(RunnerStatus::Ready);
        outbox.status(RunnerStatus::Shutdown);
        outbox.status(RunnerStatus::Ready);
        assert_eq!(
            frames(&buf),
            vec![
                FromRunner::Status(RunnerStatus::ShuttingDown),
                FromRunner::Status(RunnerStatus::Shutdown)
            ]
        );
    }

    #[test]
    fn frames_from_many_threads_never_interleave() {
        let buf = SharedBuf::default();
        let outbox = Arc::new(Outbox::new(buf.clone()));
        let writers: Vec<_> = (0..4u64)
            .map(|t| {
                let outbox = Arc::clone(&outbox);
                std::thread::spawn(move || {
                    for i in 0..200 {
                        outbox.send(&FromRunner::Heartbeat { seq: t * 1000 + i });
                    }
                })
            })
            .collect();
        for writer in writers {
            assert!(writer.join().is_ok());
        }
        assert_eq!(frames(&buf).len(), 800);
    }
}
