//! An Erlang/OTP-style supervisor on top of ractor's links.
//!
//! ractor delivers a child's death to its parent as a supervision event, but leaves the
//! decision to the parent. [`Supervisor`] makes OTP's decision:
//!
//! - **Children** are described by [`ChildSpec`]s: an id, a start function that spawns the
//!   child linked to the supervisor ([`ChildSpec::actor`] builds one for any `Actor`), a
//!   [`Restart`] type and a [`Shutdown`]. They start in order when the supervisor starts;
//!   if one fails to start, those already started are stopped (in reverse order) and the
//!   supervisor's `spawn` fails with [`SupervisorError::StartFailed`].
//! - **Restart types**: permanent children are always restarted, transient ones only after
//!   an abnormal exit (see [`ChildExit`] for exactly which exits are normal), temporary ones
//!   never; a temporary child's spec is removed when it exits.
//! - **Strategies** ([`Strategy`]): one_for_one restarts the child alone; one_for_all stops
//!   every other child (reverse start order) and restarts all (start order); rest_for_one
//!   does the same for the child and those started after it. Temporary children caught in
//!   such a group restart are stopped and removed, not restarted; group members that were
//!   not running (terminated by request, or transient after a normal exit) are started with
//!   the group. Both as in OTP.
//! - **Intensity** ([`Intensity`]): every restart attempt is recorded, including each retry
//!   after a child failed to *start* again. One more than `max_restarts` within `period`
//!   makes the supervisor stop all its children in reverse start order and then fail with
//!   [`SupervisorError::IntensityExceeded`], so its own parent sees `ActorFailed` (and can
//!   `downcast_ref::<SupervisorError>()` it). A child that can never start therefore
//!   escalates instead of looping forever.
//! - **Restart delay** ([`Backoff`], per child): exponential with jitter, reset once the
//!   child stayed up `reset_after`. A non-zero delay is a message the supervisor schedules to
//!   itself; it keeps serving requests meanwhile. Every start, stop and schedule gives the
//!   child a new generation, and a scheduled restart whose generation is no longer current
//!   (the child was restarted by a group restart, terminated, deleted, ...) is ignored, so a
//!   child is never started twice. The delay of a group restart is the failed child's.
//! - **Shutdown**: children are stopped one at a time in reverse start order, each asked to
//!   stop (reason `"shutdown"`) and killed if it has not stopped within its
//!   [`Shutdown::Timeout`] ([`Shutdown::BrutalKill`] kills at once, [`Shutdown::Infinity`]
//!   waits, for child supervisors). This happens in `post_stop` when the supervisor is
//!   stopped, and before it fails on escalation. If the supervisor is *killed*, ractor kills
//!   its children at once, unordered; there is no way around that.
//! - **Own stops are not deaths**: the supervisor forgets a child's instance before it stops
//!   it, so the exit event of an instance it stopped itself matches no child and restarts
//!   nothing. The same goes for an exit event that arrives after the child was already
//!   replaced.
//! - **Nesting**: a supervisor is an `Actor` like any other; [`ChildSpec::supervisor`] makes
//!   one a child of another (with `Shutdown::Infinity`, as OTP does for supervisors).
//!
//! Starting a child is synchronous, as in OTP: the supervisor waits for the child's
//! `pre_start` and handles nothing else meanwhile, so a child whose `pre_start` hangs hangs
//! its supervisor, and a child must not `call` its supervisor from its `pre_start` (that
//! call can only time out). Restarts after a zero delay happen inside the handler of the
//! exit event.
//!
//! At runtime the supervisor answers [`SupervisorMsg`]s: `WhichChildren`, `StartChild`,
//! `TerminateChild`, `RestartChild`, `DeleteChild` and `Stats`.

mod actor;
mod args;
mod child;
mod error;
mod exit;
mod messages;
mod observer;
mod shutdown;
mod spec;
mod state;
mod strategy;

pub use self::actor::Supervisor;
pub use self::args::SupervisorArgs;
pub use self::error::SupervisorError;
pub use self::exit::{ChildExit, is_normal_stop_reason};
pub use self::messages::{ChildInfo, RestartTicket, SupervisorMsg, SupervisorStats};
pub use self::observer::{Observer, SupervisorEvent, SupervisorEventKind};
pub use self::shutdown::SHUTDOWN_REASON;
pub use self::spec::{ChildSpec, Restart, Shutdown, StartFn, StartFuture};
pub use self::state::SupervisorState;
pub use self::strategy::Strategy;
pub use crate::restart::{Backoff, Intensity};
