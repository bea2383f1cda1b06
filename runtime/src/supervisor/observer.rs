//! What a supervisor tells an observer: each restart, give-up and escalation, as it happens
//! (the node turns them into events of its event stream).

use std::fmt;
use std::sync::Arc;

/// What happened to a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorEventKind {
    /// The child exited and is restarted (now, or after its backoff delay).
    Restarting {
        /// How it exited.
        exit: String,
    },
    /// The child exited and is not restarted (its restart type says so); only abnormal
    /// exits are told.
    NotRestarted {
        /// How it exited.
        exit: String,
    },
    /// The child spent its own restart budget and stays stopped; its siblings are untouched.
    GaveUp {
        /// Why (the budget and the last exit).
        why: String,
    },
    /// The supervisor's own restart intensity was exceeded: it stops every child and fails,
    /// and its parent decides what comes next.
    Escalated {
        /// Why.
        why: String,
    },
}

/// One thing a supervisor did about a child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupervisorEvent {
    /// The supervisor's kind (`node`, `worker`, `supervisor`).
    pub supervisor: String,
    /// The child's id.
    pub child: String,
    /// What happened.
    pub kind: SupervisorEventKind,
}

/// A callback a supervisor tells its events to. It runs inside the supervisor's handler, so
/// it must return at once (record or send, never wait). Cheap to clone.
#[derive(Clone)]
pub struct Observer(Arc<dyn Fn(SupervisorEvent) + Send + Sync>);

impl Observer {
    /// An observer that calls `f` with each event.
    pub fn new(f: impl Fn(SupervisorEvent) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Tells `event`.
    pub fn tell(&self, event: SupervisorEvent) {
        (self.0)(event)
    }
}

impl fmt::Debug for Observer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Observer")
    }
}
