//! What a supervisor needs to know about one child: how to start it ([`ChildSpec::start`]),
//! when to restart it ([`Restart`]) and how to stop it ([`Shutdown`]). This is Erlang's
//! `child_spec()` map.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use ractor::{Actor, ActorCell, SpawnErr};

use super::actor::Supervisor;
use super::args::SupervisorArgs;
use super::exit::ChildExit;
use crate::restart::{Backoff, Intensity};

/// The future a [`StartFn`] returns: the started child's cell, or why it could not start.
pub type StartFuture = BoxFuture<'static, Result<ActorCell, SpawnErr>>;

/// Starts one instance of a child.
///
/// It is given the supervisor's cell and must spawn the child **linked to it** (for instance
/// with `Actor::spawn_linked(None, actor, args, supervisor)`), so that the child's exit reaches
/// the supervisor as a supervision event. The future resolves once the child has finished its
/// `pre_start`; the supervisor waits for it, as OTP's `start_link` does.
pub type StartFn = Arc<dyn Fn(ActorCell) -> StartFuture + Send + Sync>;

/// When a child that has exited is restarted (Erlang's `restart` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Restart {
    /// Always restarted, whatever the exit reason.
    #[default]
    Permanent,
    /// Restarted only after an abnormal exit (see [`ChildExit`] for what counts as normal).
    /// After a normal exit the spec stays in the supervisor, not running.
    Transient,
    /// Never restarted. When it exits, or is stopped because a sibling's failure restarts its
    /// group (`OneForAll`, `RestForOne`), its spec is removed, exactly as OTP does.
    Temporary,
}

impl Restart {
    /// Whether a child of this restart type is restarted after exiting with `exit`.
    pub fn should_restart(self, exit: &ChildExit) -> bool {
        match self {
            Restart::Permanent => true,
            Restart::Transient => !exit.is_normal(),
            Restart::Temporary => false,
        }
    }
}

/// How a child is stopped by its supervisor (Erlang's `shutdown` key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Killed at once (`ActorCell::kill`): no `post_stop`, in-flight handlers are cancelled.
    BrutalKill,
    /// Asked to stop (`ActorCell::stop` with reason `"shutdown"`); killed if it has not
    /// stopped after this long.
    Timeout(Duration),
    /// Asked to stop and waited for without limit. Meant for children that are supervisors
    /// themselves, which bound their own children's shutdown.
    Infinity,
}

impl Default for Shutdown {
    /// OTP's default for workers: 5 seconds.
    fn default() -> Self {
        Shutdown::Timeout(Duration::from_secs(5))
    }
}

/// The specification of one supervised child.
#[derive(Clone)]
pub struct ChildSpec {
    /// The child's id, unique among the children of one supervisor.
    pub id: String,
    /// Starts one instance of the child, linked to the supervisor.
    pub start: StartFn,
    /// When the child is restarted.
    pub restart: Restart,
    /// How the child is stopped.
    pub shutdown: Shutdown,
    /// Restart delay for this child; `None` uses the supervisor's [`SupervisorArgs::backoff`].
    pub backoff: Option<Backoff>,
    /// This child's own restart budget; `None` counts its restarts against the supervisor's
    /// [`SupervisorArgs::intensity`]. See [`ChildSpec::with_intensity`].
    pub intensity: Option<Intensity>,
}

impl ChildSpec {
    /// A permanent child with the default shutdown (5 s timeout) started by `start`.
    pub fn new<F>(id: impl Into<String>, start: F) -> Self
    where
        F: Fn(ActorCell) -> StartFuture + Send + Sync + 'static,
    {
        Self {
            id: id.into(),
            start: Arc::new(start),
            restart: Restart::default(),
            shutdown: Shutdown::default(),
            backoff: None,
            intensity: None,
        }
    }

    /// A child that is an actor of type `A`: every (re)start spawns `make_actor()` linked to
    /// the supervisor, unnamed, with a clone of `args`.
    pub fn actor<A, F>(id: impl Into<String>, make_actor: F, args: A::Arguments) -> Self
    where
        A: Actor,
        F: Fn() -> A + Send + Sync + 'static,
        A::Arguments: Clone + Sync,
    {
        let make_actor = Arc::new(make_actor);
        Self::new(id, move |supervisor: ActorCell| -> StartFuture {
            let actor = make_actor();
            let args = args.clone();
            Box::pin(async move {
                let (actor_ref, _handle) = A::spawn_linked(None, actor, args, supervisor).await?;
                Ok(actor_ref.get_cell())
            })
        })
    }

    /// A child that is itself a [`Supervisor`] (OTP's `type => supervisor`): its shutdown is
    /// [`Shutdown::Infinity`], so that it can stop its own children in order.
    pub fn supervisor(id: impl Into<String>, args: SupervisorArgs) -> Self {
        Self::actor(id, || Supervisor, args).with_shutdown(Shutdown::Infinity)
    }

    /// Sets the restart type.
    pub fn with_restart(mut self, restart: Restart) -> Self {
        self.restart = restart;
        self
    }

    /// Sets how the child is stopped.
    pub fn with_shutdown(mut self, shutdown: Shutdown) -> Self {
        self.shutdown = shutdown;
        self
    }

    /// Sets a restart delay for this child only.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }

    /// Gives this child a restart budget of its own, so that a child that keeps failing cannot
    /// take its siblings down: its restarts are counted in its own window, not the
    /// supervisor's, and one more than `intensity` allows *gives the child up* (it stays
    /// stopped, [`ChildInfo::gave_up`](super::ChildInfo::gave_up) says why, and
    /// [`SupervisorMsg::RestartChild`](super::SupervisorMsg::RestartChild) or deleting it is
    /// the owner's call) instead of failing the supervisor. Meant for `OneForOne`
    /// supervisors of independent children (Canopy's worker gives each model instance one);
    /// under `OneForAll`/`RestForOne` the child's group is still restarted with it.
    pub fn with_intensity(mut self, intensity: Intensity) -> Self {
        self.intensity = Some(intensity);
        self
    }
}

impl fmt::Debug for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildSpec")
            .field("id", &self.id)
            .field("restart", &self.restart)
            .field("shutdown", &self.shutdown)
            .field("backoff", &self.backoff)
            .field("intensity", &self.intensity)
            .finish_non_exhaustive()
    }
}
