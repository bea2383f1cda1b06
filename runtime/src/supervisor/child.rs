//! The supervisor's record of one child: its spec, its running instance (if any), and the
//! bookkeeping that drives restarts (generation, restart count, backoff).

use ractor::{ActorCell, ActorId};

use super::messages::ChildInfo;
use super::spec::ChildSpec;
use crate::restart::{Backoff, BackoffState, RestartWindow};

/// One child of a supervisor.
pub(crate) struct Child {
    /// How to start, restart and stop it.
    pub(crate) spec: ChildSpec,
    /// The running instance. `None` while stopped, waiting for a restart, or after a
    /// normal exit of a transient child. Cleared *before* the supervisor stops an instance,
    /// so the exit event of an instance the supervisor stopped itself matches no child and
    /// cannot trigger a restart.
    pub(crate) cell: Option<ActorCell>,
    /// Changes whenever the child is started, stopped or scheduled for a restart; a
    /// scheduled restart that carries an older generation is stale and is ignored.
    pub(crate) generation: u64,
    /// Whether a delayed restart is scheduled for the current generation.
    pub(crate) restart_pending: bool,
    /// Starts after the first one.
    pub(crate) restart_count: u32,
    /// Whether it has ever been started (its first start is not a restart).
    pub(crate) started_once: bool,
    /// Delay sequence of its restarts.
    pub(crate) backoff: BackoffState,
    /// Its own restart window, when its spec has its own intensity.
    pub(crate) window: Option<RestartWindow>,
    /// Why it was given up (its own budget spent), until it is started again.
    pub(crate) gave_up: Option<String>,
    /// How its last instance ended (or failed to start), for the give-up reason.
    pub(crate) last_exit: Option<String>,
}

impl Child {
    /// A child that has not been started yet; `default_backoff` applies unless the spec has
    /// its own.
    pub(crate) fn new(spec: ChildSpec, default_backoff: Backoff, generation: u64) -> Self {
        let backoff = BackoffState::new(spec.backoff.unwrap_or(default_backoff));
        let window = spec.intensity.map(RestartWindow::new);
        Self {
            spec,
            cell: None,
            generation,
            restart_pending: false,
            restart_count: 0,
            started_once: false,
            backoff,
            window,
            gave_up: None,
            last_exit: None,
        }
    }

    /// The child's id.
    pub(crate) fn id(&self) -> &str {
        &self.spec.id
    }

    /// Whether `actor` is this child's running instance.
    pub(crate) fn is_instance(&self, actor: ActorId) -> bool {
        self.cell
            .as_ref()
            .is_some_and(|cell| cell.get_id() == actor)
    }

    /// The report of this child.
    pub(crate) fn info(&self) -> ChildInfo {
        ChildInfo {
            id: self.spec.id.clone(),
            cell: self.cell.clone(),
            restart: self.spec.restart,
            restart_count: self.restart_count,
            running: self.cell.is_some(),
            restart_pending: self.restart_pending,
            gave_up: self.gave_up.clone(),
        }
    }
}
