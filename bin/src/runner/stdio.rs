//! Keeps stdout for protocol frames only.
//!
//! The runner's stdout is the supervisor's frame stream: one stray `println!` (from us, or
//! from an inference library that prints progress) would corrupt it. So at start the runner
//! moves the pipe to a private, close-on-exec descriptor used only by the
//! [`Outbox`](super::outbox::Outbox), and points descriptor 1 at stderr, where the supervisor
//! keeps anything printed as log text.

use std::fs::File;
use std::os::fd::AsFd;

use nix::unistd::dup2_stdout;

/// Takes the process's stdout for protocol frames and redirects descriptor 1 to stderr.
pub fn take_protocol_stdout() -> std::io::Result<File> {
    // `try_clone_to_owned` duplicates with F_DUPFD_CLOEXEC onto a descriptor >= 3.
    let protocol = std::io::stdout().as_fd().try_clone_to_owned()?;
    dup2_stdout(std::io::stderr())?;
    Ok(File::from(protocol))
}
