//! The messages a supervisor understands, and the reports it answers with (Erlang's
//! `which_children`, `start_child`, `terminate_child`, `restart_child`, `delete_child`,
//! `count_children`).

use ractor::{ActorCell, RpcReplyPort};
use ractor_cluster::RactorMessage;

use super::error::SupervisorError;
use super::spec::{ChildSpec, Restart};

/// A message to a [`Supervisor`](super::Supervisor).
#[derive(RactorMessage)]
pub enum SupervisorMsg {
    /// Reports every child, in start order.
    WhichChildren(RpcReplyPort<Vec<ChildInfo>>),
    /// Adds a child at the end of the start order and starts it. A child that fails to start
    /// is not added (the reply says why).
    StartChild(ChildSpec, RpcReplyPort<Result<ActorCell, SupervisorError>>),
    /// Stops a child (with its [`Shutdown`](super::Shutdown)) without restarting it. Its spec
    /// stays, so it can be restarted with [`SupervisorMsg::RestartChild`], except for a
    /// temporary child, whose spec is removed.
    TerminateChild(String, RpcReplyPort<Result<(), SupervisorError>>),
    /// Starts a child that is not running (terminated, exited normally as a transient, or
    /// waiting for a delayed restart). A failure here is reported, not escalated.
    RestartChild(String, RpcReplyPort<Result<ActorCell, SupervisorError>>),
    /// Removes the spec of a child that is not running.
    DeleteChild(String, RpcReplyPort<Result<(), SupervisorError>>),
    /// Reports restart counters.
    Stats(RpcReplyPort<SupervisorStats>),
    /// A delayed restart came due. Sent by the supervisor to itself; the ticket cannot be
    /// built outside this module, and a stale one is ignored.
    RestartDue(RestartTicket),
}

/// One child, as reported by [`SupervisorMsg::WhichChildren`].
#[derive(Debug, Clone)]
pub struct ChildInfo {
    /// The child's id.
    pub id: String,
    /// The running instance, if any.
    pub cell: Option<ActorCell>,
    /// The child's restart type.
    pub restart: Restart,
    /// How many times this child has been started again after its first start (by its own
    /// restarts, its group's restarts, or [`SupervisorMsg::RestartChild`]).
    pub restart_count: u32,
    /// Whether an instance is running (`cell.is_some()`).
    pub running: bool,
    /// Whether a delayed restart is scheduled.
    pub restart_pending: bool,
    /// Why the child was given up, if it was: it failed more often than its own restart
    /// budget allows ([`ChildSpec::with_intensity`](super::ChildSpec::with_intensity)) and
    /// is not restarted until asked.
    pub gave_up: Option<String>,
}

/// Counters of a supervisor, as reported by [`SupervisorMsg::Stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SupervisorStats {
    /// Restart attempts since the supervisor started: one per child exit that called for a
    /// restart and one per retry after a failed restart (a `OneForAll` restart of five
    /// children counts once). This is what the intensity limit counts.
    pub restarts: u64,
    /// Restart attempts inside the current intensity window.
    pub recent_restarts: usize,
    /// Children (specs) the supervisor holds.
    pub children: usize,
    /// Children with a running instance.
    pub running: usize,
}

/// A scheduled restart of a group of children, each pinned to the generation it had when
/// the restart was scheduled: if the child has changed since (restarted by another path,
/// terminated, deleted), that entry is stale and is skipped.
#[derive(Debug, Clone)]
pub struct RestartTicket {
    pub(crate) entries: Vec<(String, u64)>,
}
