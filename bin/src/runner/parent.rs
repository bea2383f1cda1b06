//! Dying with the parent: a runner must never outlive the node that spawned it.
//!
//! On Linux the runner asks the kernel for SIGKILL when its parent dies
//! (`prctl(PR_SET_PDEATHSIG, SIGKILL)`); the supervisor sets the same at spawn, this is belt
//! and braces. Note the kernel's definition of "parent": the *thread* that forked us. A
//! supervisor must therefore spawn runners from a long-lived thread (a tokio worker thread is
//! fine; a `spawn_blocking` thread, which exits when idle, is not).
//!
//! If the parent died before the signal was armed, we have already been re-parented, usually
//! to PID 1; [`parent_is_gone`] catches that. The exception is a container whose PID 1 is
//! `canopy` itself (a legitimate parent): it is recognised by its executable being ours.
//! A dead parent also closes our stdin, which the serve loop treats as "supervisor gone".

/// Arms the parent-death signal (Linux only; elsewhere a no-op).
pub fn die_with_parent() {
    #[cfg(target_os = "linux")]
    if let Err(err) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        tracing::warn!(%err, "cannot arm the parent-death signal; relying on stdin EOF");
    }
}

/// Whether our parent has already died (we were re-parented to init).
pub fn parent_is_gone() -> bool {
    if nix::unistd::getppid().as_raw() != 1 {
        return false;
    }
    !init_is_canopy()
}

/// Whether PID 1 runs our own executable (a container with `canopy` as its entry point).
fn init_is_canopy() -> bool {
    #[cfg(target_os = "linux")]
    {
        match (
            std::fs::read_link("/proc/1/exe"),
            std::fs::read_link("/proc/self/exe"),
        ) {
            (Ok(init), Ok(own)) => init == own,
            _ => false,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}
