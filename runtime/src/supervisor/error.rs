//! The errors of the supervisor: the escalation it fails with, and the answers to requests
//! that cannot be carried out.

use std::time::Duration;

use ractor::SpawnErr;

/// Why a supervisor failed, or refused a request.
///
/// When the restart intensity is exceeded the supervisor fails with
/// [`SupervisorError::IntensityExceeded`]; its parent receives `ActorFailed` and gets the value
/// back with `err.downcast_ref::<SupervisorError>()`.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// More than `max_restarts` restarts within `period`: the supervisor stopped its
    /// children and gave up, so that the failure climbs the supervision tree.
    #[error(
        "supervisor gave up: more than {max_restarts} restarts within {period:?} \
         (the last child to need one was `{child}`)"
    )]
    IntensityExceeded {
        /// The configured limit.
        max_restarts: u32,
        /// The configured window.
        period: Duration,
        /// The child whose exit (or failed restart) crossed the limit.
        child: String,
    },
    /// A child could not be started (its start function returned an error).
    #[error("child `{id}` failed to start: {source}")]
    StartFailed {
        /// The child's id.
        id: String,
        /// What the start function reported.
        #[source]
        source: SpawnErr,
    },
    /// Two children with the same id.
    #[error("a child with id `{0}` already exists in this supervisor; child ids must be unique")]
    DuplicateChild(String),
    /// No child with this id.
    #[error("this supervisor has no child with id `{0}`")]
    NoSuchChild(String),
    /// The request needs a stopped child, and this one is running.
    #[error("child `{0}` is running; terminate it first")]
    ChildRunning(String),
}
