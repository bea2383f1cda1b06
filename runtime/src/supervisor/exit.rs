//! How a child's death is classified: a *normal* exit (the child was asked to finish, or
//! finished on its own with no complaint) or an *abnormal* one. Only the difference matters:
//! [`Restart::Transient`](super::Restart::Transient) children are restarted after abnormal
//! exits only.
//!
//! The rules, mirroring Erlang's `normal`, `shutdown` and `{shutdown, Term}`:
//!
//! | supervision event | classification |
//! |---|---|
//! | `ActorFailed(_, err)` (a handler returned `Err`, or panicked) | abnormal |
//! | `ActorTerminated` with no reason (`myself.stop(None)`) | normal |
//! | `ActorTerminated` with reason `"normal"`, `"shutdown"` or `"shutdown:<anything>"` | normal |
//! | `ActorTerminated` with reason `"Drained"` (ractor's `drain`: finish the queue, then stop) | normal |
//! | `ActorTerminated` with any other reason, e.g. `"killed"` (someone called `kill`) | abnormal |

use std::fmt;

use ractor::{ActorProcessingErr, SupervisionEvent};

/// The reason ractor gives a child that was stopped with `drain`.
const DRAINED: &str = "Drained";

/// How a supervised child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildExit {
    /// The child stopped normally (see the module docs for which reasons count).
    Normal {
        /// The stop reason, if one was given.
        reason: Option<String>,
    },
    /// The child failed, or stopped with a reason that is not a normal one.
    Abnormal {
        /// The error or stop reason, as text.
        reason: String,
    },
}

impl ChildExit {
    /// Classifies an `ActorTerminated` event's reason.
    pub fn from_terminated(reason: Option<&str>) -> Self {
        if is_normal_stop_reason(reason) {
            ChildExit::Normal {
                reason: reason.map(str::to_owned),
            }
        } else {
            ChildExit::Abnormal {
                reason: reason.unwrap_or_default().to_owned(),
            }
        }
    }

    /// Classifies an `ActorFailed` event's error: always abnormal.
    pub fn from_failed(err: &ActorProcessingErr) -> Self {
        ChildExit::Abnormal {
            reason: err.to_string(),
        }
    }

    /// Classifies a supervision event; `None` for events that are not a death
    /// (`ActorStarted`, process-group changes).
    pub fn from_event(event: &SupervisionEvent) -> Option<Self> {
        match event {
            SupervisionEvent::ActorTerminated(_, _, reason) => {
                Some(Self::from_terminated(reason.as_deref()))
            }
            SupervisionEvent::ActorFailed(_, err) => Some(Self::from_failed(err)),
            _ => None,
        }
    }

    /// Whether this is a normal exit.
    pub fn is_normal(&self) -> bool {
        matches!(self, ChildExit::Normal { .. })
    }
}

impl fmt::Display for ChildExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildExit::Normal { reason: None } => write!(f, "normal exit"),
            ChildExit::Normal {
                reason: Some(reason),
            } => write!(f, "normal exit ({reason})"),
            ChildExit::Abnormal { reason } => write!(f, "abnormal exit ({reason})"),
        }
    }
}

/// Whether an `ActorTerminated` reason counts as a normal exit: none, `"normal"`,
/// `"shutdown"`, `"shutdown:<anything>"` or `"Drained"`.
pub fn is_normal_stop_reason(reason: Option<&str>) -> bool {
    match reason {
        None => true,
        Some(reason) => {
            reason == "normal"
                || reason == "shutdown"
                || reason.starts_with("shutdown:")
                || reason == DRAINED
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_reasons() {
        for reason in [
            None,
            Some("normal"),
            Some("shutdown"),
            Some("shutdown: node leaving"),
            Some("Drained"),
        ] {
            assert!(ChildExit::from_terminated(reason).is_normal(), "{reason:?}");
        }
    }

    #[test]
    fn abnormal_reasons() {
        for reason in ["killed", "boom", "shutdownx", "Normal", ""] {
            assert!(
                !ChildExit::from_terminated(Some(reason)).is_normal(),
                "{reason:?}"
            );
        }
        let err: ActorProcessingErr = "boom".into();
        assert_eq!(
            ChildExit::from_failed(&err),
            ChildExit::Abnormal {
                reason: "boom".into()
            }
        );
    }
}
