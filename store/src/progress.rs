//! [`Progress`]: how the store reports a long pull to whoever shows it.
//!
//! A pull goes through phases: waiting for another process's pull, running pip (no byte count),
//! copying or downloading bytes (a known total), verifying a file already on disk. Each phase is
//! one `start` .. `advance`* .. `finish`. The engine knows nothing about terminals: the binary
//! implements this with an `indicatif` bar, tests and library callers use [`NoProgress`].

/// Receives the phases and byte counts of a pull.
pub trait Progress {
    /// A phase begins: `total` is its size in bytes, or `None` when it has no byte count
    /// (a spinner, not a bar); `message` says what is happening.
    fn start(&mut self, total: Option<u64>, message: &str);
    /// `bytes` more bytes of the current phase are done.
    fn advance(&mut self, bytes: u64);
    /// The current phase is over (whether it succeeded or not).
    fn finish(&mut self);
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&mut self, _total: Option<u64>, _message: &str) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self) {}
}
