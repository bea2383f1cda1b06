//! Stopping one child the way its [`Shutdown`] says: ask, wait up to the timeout, then kill.

use std::time::Duration;

use ractor::{ActorCell, RactorErr};

use super::spec::Shutdown;

/// The stop reason a supervisor gives the children it stops (a normal reason, see
/// [`ChildExit`](super::ChildExit)).
pub const SHUTDOWN_REASON: &str = "shutdown";

/// How long to wait for a killed child to finish its cleanup. A kill cancels whatever the
/// child is doing, so this only guards against a runtime that is wedged.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Stops `cell` (the running instance of child `id`) according to `shutdown` and returns
/// once it has stopped, or once it was killed and [`KILL_WAIT`] has passed.
pub(crate) async fn shutdown_child(id: &str, cell: &ActorCell, shutdown: Shutdown) {
    match shutdown {
        Shutdown::BrutalKill => kill(id, cell).await,
        Shutdown::Infinity => {
            tracing::debug!(child = id, "stopping child (no timeout)");
            // An error means the child is gone already.
            let _ = cell
                .stop_and_wait(Some(SHUTDOWN_REASON.to_owned()), None)
                .await;
        }
        Shutdown::Timeout(timeout) => {
            tracing::debug!(child = id, ?timeout, "stopping child");
            match cell
                .stop_and_wait(Some(SHUTDOWN_REASON.to_owned()), Some(timeout))
                .await
            {
                Ok(()) => {}
                Err(RactorErr::Timeout) => {
                    tracing::warn!(
                        child = id,
                        ?timeout,
                        "child did not stop within its shutdown timeout; killing it"
                    );
                    kill(id, cell).await;
                }
                // The stop could not be delivered: the child is already stopping or gone.
                Err(_) => wait_gone(id, cell).await,
            }
        }
    }
}

/// Kills `cell` and waits (bounded) for it to be gone.
async fn kill(id: &str, cell: &ActorCell) {
    tracing::debug!(child = id, "killing child");
    match cell.kill_and_wait(Some(KILL_WAIT)).await {
        Ok(()) => {}
        Err(RactorErr::Timeout) => {
            tracing::error!(child = id, wait = ?KILL_WAIT, "killed child has not stopped");
        }
        Err(_) => wait_gone(id, cell).await,
    }
}

/// Waits (bounded) for a child that could not be signalled, because it is already on its way
/// out, to be gone.
async fn wait_gone(id: &str, cell: &ActorCell) {
    if cell.wait(Some(KILL_WAIT)).await.is_err() {
        tracing::error!(child = id, wait = ?KILL_WAIT, "child is neither reachable nor stopped");
    }
}
