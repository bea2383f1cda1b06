//! The configuration a supervisor is started with: strategy, restart intensity, restart
//! backoff and the initial children (Erlang's `sup_flags()` plus the child list).

use super::observer::Observer;
use super::spec::ChildSpec;
use super::strategy::Strategy;
use crate::restart::{Backoff, Intensity};

/// Start arguments of a [`Supervisor`](super::Supervisor).
///
/// Defaults: [`Strategy::OneForOne`], [`Intensity::default`] (3 restarts in 60 s),
/// [`Backoff::default`] (100 ms doubling to 10 s, 20 % jitter, reset after 30 s up), no
/// children.
#[derive(Debug, Clone, Default)]
pub struct SupervisorArgs {
    /// Which children are restarted together.
    pub strategy: Strategy,
    /// How many restarts are tolerated in how long before the supervisor gives up.
    pub intensity: Intensity,
    /// The restart delay of children whose spec has no backoff of its own.
    pub backoff: Backoff,
    /// The initial children, started in this order and stopped in the reverse order.
    pub children: Vec<ChildSpec>,
    /// The kind this supervisor reports to introspection (`None`: `supervisor`), e.g.
    /// `node` or `worker` for the supervisors that play those roles.
    pub kind: Option<String>,
    /// Told of every restart, give-up and escalation (`None`: only the logs are).
    pub observer: Option<Observer>,
}

impl SupervisorArgs {
    /// Defaults with the given strategy.
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            ..Self::default()
        }
    }

    /// Sets the restart intensity.
    pub fn with_intensity(mut self, intensity: Intensity) -> Self {
        self.intensity = intensity;
        self
    }

    /// Sets the default restart delay.
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the kind reported to introspection.
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = Some(kind.into());
        self
    }

    /// Tells `observer` of every restart, give-up and escalation of this supervisor.
    pub fn with_observer(mut self, observer: Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Appends a child (started after the ones already added).
    pub fn with_child(mut self, child: ChildSpec) -> Self {
        self.children.push(child);
        self
    }
}
