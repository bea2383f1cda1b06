//! What an event says: [`EventBody`], one variant per thing that can happen, each with the
//! facts an operator needs and a one-line reading of it.

use canopy_runtime::cluster::MembershipEvent;
use canopy_runtime::supervisor::{SupervisorEvent, SupervisorEventKind};
use serde::{Deserialize, Serialize};

use crate::runner::RunnerEvent;

/// What happened. Serialised with a `kind` tag (`runner_failed`, `member_left`, ...) next to
/// the variant's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// A runner process started (its first start or a restart).
    RunnerStarted {
        /// The instance.
        instance: String,
        /// The runner's pid.
        pid: u32,
        /// Restarts so far.
        restarts: u32,
    },
    /// A runner's status changed (`Loading`, `Ready`, `Failed`, ...).
    RunnerStatus {
        /// The instance.
        instance: String,
        /// The new status.
        status: String,
    },
    /// A runner could not load its model.
    RunnerLoadFailed {
        /// The instance.
        instance: String,
        /// The runner's message.
        error: String,
    },
    /// A runner process died.
    RunnerFailed {
        /// The instance.
        instance: String,
        /// How it died (`exited with code 3`, `killed by signal 9`, `missed heartbeats`...).
        reason: String,
        /// The pid that died.
        pid: u32,
        /// The last lines of its stderr.
        stderr_tail: Vec<String>,
        /// Tasks failed by this death.
        failed_tasks: usize,
        /// Whether a restart follows (false: its supervisor gives up).
        will_restart: bool,
    },
    /// A supervisor restarts a child that exited.
    ChildRestarted {
        /// The supervisor's kind (`node`, `worker`).
        supervisor: String,
        /// The child.
        child: String,
        /// How it exited.
        exit: String,
    },
    /// A child exited abnormally and its restart type says not to restart it.
    ChildStopped {
        /// The supervisor's kind.
        supervisor: String,
        /// The child.
        child: String,
        /// How it exited.
        exit: String,
    },
    /// A child spent its own restart budget: it stays stopped, its siblings run on.
    ChildGaveUp {
        /// The supervisor's kind.
        supervisor: String,
        /// The child.
        child: String,
        /// Why.
        why: String,
    },
    /// A supervisor exceeded its restart intensity: it stopped its children and failed.
    SupervisorEscalated {
        /// The supervisor's kind.
        supervisor: String,
        /// The child whose restart was one too many.
        child: String,
        /// Why.
        why: String,
    },
    /// A peer became a member of this node's cluster view.
    MemberJoined {
        /// The peer's node id.
        peer: String,
        /// Its cluster address.
        addr: String,
    },
    /// A member left this node's view.
    MemberLeft {
        /// The peer's node id.
        peer: String,
        /// Why (its connection closed, it missed its heartbeats).
        why: String,
    },
    /// The leader this node follows changed.
    LeaderChanged {
        /// The term.
        term: u64,
        /// The new leader's node id (`None`: no quorum, no leader).
        leader: Option<String>,
    },
    /// The master placed a new instance.
    InstancePlaced {
        /// The instance.
        instance: String,
        /// Its model.
        model: String,
        /// The node it runs on (`None`: waiting for one).
        node: Option<String>,
    },
    /// The master moved an instance to another node (its node left or could not run it), or
    /// took it off a node to place it again.
    InstanceMoved {
        /// The instance.
        instance: String,
        /// Its model.
        model: String,
        /// Where it was.
        from: Option<String>,
        /// Where it goes (`None`: waiting for a node).
        to: Option<String>,
    },
    /// The master gave an instance up.
    PlacementFailed {
        /// The instance.
        instance: String,
        /// Its model.
        model: String,
        /// Why.
        reason: String,
    },
    /// An instance was deleted.
    InstanceRemoved {
        /// The instance.
        instance: String,
        /// Its model.
        model: String,
    },
    /// An event of a user's actor (see [`EventLog::note`](super::EventLog::note)).
    Note {
        /// What it is about, in the actor's words.
        message: String,
        /// Whether it is a failure (marked as one on the dashboard's timeline).
        failure: bool,
    },
}

/// The first 8 characters of a node id (as the logs print them).
fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

impl EventBody {
    /// The event a runner supervisor's event makes, with its instance (`None` for the batch
    /// reports, which are state, not events).
    pub fn from_runner(event: &RunnerEvent) -> Option<(&str, EventBody)> {
        let body = match event {
            RunnerEvent::StatusChanged { instance, status } => (
                instance,
                EventBody::RunnerStatus {
                    instance: instance.clone(),
                    status: format!("{status:?}"),
                },
            ),
            RunnerEvent::Started {
                instance,
                pid,
                restarts,
            } => (
                instance,
                EventBody::RunnerStarted {
                    instance: instance.clone(),
                    pid: *pid,
                    restarts: *restarts,
                },
            ),
            RunnerEvent::LoadFailed { instance, error } => (
                instance,
                EventBody::RunnerLoadFailed {
                    instance: instance.clone(),
                    error: error.clone(),
                },
            ),
            RunnerEvent::RunnerFailed {
                instance,
                reason,
                pid,
                stderr_tail,
                failed_tasks,
                will_restart,
            } => (
                instance,
                EventBody::RunnerFailed {
                    instance: instance.clone(),
                    reason: reason.to_string(),
                    pid: *pid,
                    stderr_tail: stderr_tail.clone(),
                    failed_tasks: *failed_tasks,
                    will_restart: *will_restart,
                },
            ),
            RunnerEvent::BatchChanged { .. } => return None,
        };
        Some((body.0.as_str(), body.1))
    }

    /// The event a supervisor's report makes.
    pub fn from_supervisor(event: SupervisorEvent) -> EventBody {
        let SupervisorEvent {
            supervisor,
            child,
            kind,
        } = event;
        match kind {
            SupervisorEventKind::Restarting { exit } => EventBody::ChildRestarted {
                supervisor,
                child,
                exit,
            },
            SupervisorEventKind::NotRestarted { exit } => EventBody::ChildStopped {
                supervisor,
                child,
                exit,
            },
            SupervisorEventKind::GaveUp { why } => EventBody::ChildGaveUp {
                supervisor,
                child,
                why,
            },
            SupervisorEventKind::Escalated { why } => EventBody::SupervisorEscalated {
                supervisor,
                child,
                why,
            },
        }
    }

    /// The event a membership change makes.
    pub fn from_membership(event: MembershipEvent) -> EventBody {
        match event {
            MembershipEvent::Joined { peer, addr } => EventBody::MemberJoined {
                peer: peer.to_string(),
                addr: addr.to_string(),
            },
            MembershipEvent::Left { peer, why } => EventBody::MemberLeft {
                peer: peer.to_string(),
                why,
            },
            MembershipEvent::Leader { term, leader } => EventBody::LeaderChanged {
                term,
                leader: leader.map(|l| l.to_string()),
            },
        }
    }

    /// The `kind` tag it is serialised with.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::RunnerStarted { .. } => "runner_started",
            EventBody::RunnerStatus { .. } => "runner_status",
            EventBody::RunnerLoadFailed { .. } => "runner_load_failed",
            EventBody::RunnerFailed { .. } => "runner_failed",
            EventBody::ChildRestarted { .. } => "child_restarted",
            EventBody::ChildStopped { .. } => "child_stopped",
            EventBody::ChildGaveUp { .. } => "child_gave_up",
            EventBody::SupervisorEscalated { .. } => "supervisor_escalated",
            EventBody::MemberJoined { .. } => "member_joined",
            EventBody::MemberLeft { .. } => "member_left",
            EventBody::LeaderChanged { .. } => "leader_changed",
            EventBody::InstancePlaced { .. } => "instance_placed",
            EventBody::InstanceMoved { .. } => "instance_moved",
            EventBody::PlacementFailed { .. } => "placement_failed",
            EventBody::InstanceRemoved { .. } => "instance_removed",
            EventBody::Note { .. } => "note",
        }
    }

    /// Whether it tells of a failure (a death, a give-up, a departure, a failed placement).
    pub fn is_failure(&self) -> bool {
        match self {
            EventBody::RunnerLoadFailed { .. }
            | EventBody::RunnerFailed { .. }
            | EventBody::ChildStopped { .. }
            | EventBody::ChildGaveUp { .. }
            | EventBody::SupervisorEscalated { .. }
            | EventBody::MemberLeft { .. }
            | EventBody::PlacementFailed { .. } => true,
            EventBody::RunnerStatus { status, .. } => status == "Failed",
            EventBody::Note { failure, .. } => *failure,
            _ => false,
        }
    }

    /// Whether an operator watching a terminal wants it by default (failures, restarts,
    /// membership and leaders; not every status change).
    pub fn is_notable(&self) -> bool {
        !matches!(
            self,
            EventBody::RunnerStatus { .. } | EventBody::RunnerStarted { restarts: 0, .. }
        )
    }

    /// One readable line.
    pub fn message(&self) -> String {
        match self {
            EventBody::RunnerStarted {
                instance,
                pid,
                restarts: 0,
            } => format!("runner of {instance} started (pid {pid})"),
            EventBody::RunnerStarted {
                instance,
                pid,
                restarts,
            } => format!("runner of {instance} restarted (pid {pid}, restart {restarts})"),
            EventBody::RunnerStatus { instance, status } => format!("{instance} is {status}"),
            EventBody::RunnerLoadFailed { instance, error } => {
                format!("{instance} cannot load its model: {error}")
            }
            EventBody::RunnerFailed {
                instance,
                reason,
                pid,
                failed_tasks,
                will_restart,
                ..
            } => format!(
                "runner of {instance} (pid {pid}) {reason}; {failed_tasks} task{} failed; {}",
                if *failed_tasks == 1 { "" } else { "s" },
                if *will_restart {
                    "restarting it"
                } else {
                    "giving up"
                }
            ),
            EventBody::ChildRestarted {
                supervisor,
                child,
                exit,
            } => format!("{supervisor} restarts {child}: {exit}"),
            EventBody::ChildStopped {
                supervisor,
                child,
                exit,
            } => format!("{supervisor}: {child} stopped and is not restarted: {exit}"),
            EventBody::ChildGaveUp {
                supervisor,
                child,
                why,
            } => format!("{supervisor} gave {child} up: {why}"),
            EventBody::SupervisorEscalated {
                supervisor,
                child,
                why,
            } => format!("{supervisor} failed after restarting {child} too often: {why}"),
            EventBody::MemberJoined { peer, addr } => {
                format!("node {} joined ({addr})", short(peer))
            }
            EventBody::MemberLeft { peer, why } => format!("node {} left: {why}", short(peer)),
            EventBody::LeaderChanged {
                term,
                leader: Some(leader),
            } => format!("node {} leads (term {term})", short(leader)),
            EventBody::LeaderChanged { term, leader: None } => {
                format!("no leader (term {term}): not enough nodes for a quorum")
            }
            EventBody::InstancePlaced {
                instance,
                model,
                node,
            } => match node {
                Some(node) => format!("placed {instance} ({model}) on node {}", short(node)),
                None => format!("placed {instance} ({model}), waiting for a node"),
            },
            EventBody::InstanceMoved {
                instance, from, to, ..
            } => match (from, to) {
                (Some(from), Some(to)) => {
                    format!(
                        "moved {instance} from node {} to {}",
                        short(from),
                        short(to)
                    )
                }
                (Some(from), None) => {
                    format!(
                        "{instance} left node {}, waiting to be placed again",
                        short(from)
                    )
                }
                (None, Some(to)) => format!("placed {instance} again on node {}", short(to)),
                (None, None) => format!("{instance} is waiting for a node"),
            },
            EventBody::PlacementFailed {
                instance, reason, ..
            } => format!("gave {instance} up: {reason}"),
            EventBody::InstanceRemoved { instance, model } => {
                format!("removed {instance} ({model})")
            }
            EventBody::Note { message, .. } => message.clone(),
        }
    }

    /// The body with every text cut to `max` bytes and at most `max_lines` stderr lines: what
    /// a node keeps of an event a peer sent.
    pub(crate) fn bounded(mut self, max: usize, max_lines: usize) -> Self {
        let cut = |s: &mut String| {
            if s.len() > max {
                let mut end = max;
                while !s.is_char_boundary(end) {
                    end -= 1;
                }
                s.truncate(end);
            }
        };
        match &mut self {
            EventBody::RunnerStarted { instance, .. } => cut(instance),
            EventBody::RunnerStatus { instance, status } => {
                cut(instance);
                cut(status);
            }
            EventBody::RunnerLoadFailed { instance, error } => {
                cut(instance);
                cut(error);
            }
            EventBody::RunnerFailed {
                instance,
                reason,
                stderr_tail,
                ..
            } => {
                cut(instance);
                cut(reason);
                let skip = stderr_tail.len().saturating_sub(max_lines);
                stderr_tail.drain(..skip);
                stderr_tail.iter_mut().for_each(cut);
            }
            EventBody::ChildRestarted {
                supervisor,
                child,
                exit,
            }
            | EventBody::ChildStopped {
                supervisor,
                child,
                exit,
            } => {
                cut(supervisor);
                cut(child);
                cut(exit);
            }
            EventBody::ChildGaveUp {
                supervisor,
                child,
                why,
            }
            | EventBody::SupervisorEscalated {
                supervisor,
                child,
                why,
            } => {
                cut(supervisor);
                cut(child);
                cut(why);
            }
            EventBody::MemberJoined { peer, addr } => {
                cut(peer);
                cut(addr);
            }
            EventBody::MemberLeft { peer, why } => {
                cut(peer);
                cut(why);
            }
            EventBody::LeaderChanged { leader, .. } => {
                if let Some(l) = leader {
                    cut(l);
                }
            }
            EventBody::InstancePlaced {
                instance,
                model,
                node,
            } => {
                cut(instance);
                cut(model);
                if let Some(n) = node {
                    cut(n);
                }
            }
            EventBody::InstanceMoved {
                instance,
                model,
                from,
                to,
            } => {
                cut(instance);
                cut(model);
                for n in [from, to].into_iter().flatten() {
                    cut(n);
                }
            }
            EventBody::PlacementFailed {
                instance,
                model,
                reason,
            } => {
                cut(instance);
                cut(model);
                cut(reason);
            }
            EventBody::InstanceRemoved { instance, model } => {
                cut(instance);
                cut(model);
            }
            EventBody::Note { message, .. } => cut(message),
        }
        self
    }
}
