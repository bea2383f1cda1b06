//! The supervisor's state and the restart machinery that acts on it: starting children,
//! stopping them in order, applying the strategy after an exit, counting restarts against
//! the intensity, scheduling delayed restarts and escalating.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures::FutureExt;
use ractor::concurrency::JoinHandle;
use ractor::{
    ActorCell, ActorId, ActorProcessingErr, ActorRef, ActorStatus, MessagingErr, SpawnErr,
};

use super::args::SupervisorArgs;
use super::child::Child;
use super::error::SupervisorError;
use super::exit::ChildExit;
use super::messages::{ChildInfo, RestartTicket, SupervisorMsg, SupervisorStats};
use super::observer::{Observer, SupervisorEvent, SupervisorEventKind};
use super::shutdown::shutdown_child;
use super::spec::{ChildSpec, Restart};
use super::strategy::Strategy;
use crate::restart::{Backoff, Intensity, RestartWindow};

/// The state of a running [`Supervisor`](super::Supervisor). Opaque: ask the supervisor
/// with [`SupervisorMsg::WhichChildren`] or [`SupervisorMsg::Stats`].
pub struct SupervisorState {
    strategy: Strategy,
    intensity: Intensity,
    backoff: Backoff,
    window: RestartWindow,
    /// In start order.
    children: Vec<Child>,
    restarts: u64,
    next_generation: u64,
    /// Timers of scheduled restarts, aborted when the supervisor shuts down.
    timers: Vec<JoinHandle<Result<(), MessagingErr<SupervisorMsg>>>>,
    /// This supervisor's introspection entry (removed when the state is dropped).
    pub(crate) registration: Option<crate::introspect::Registration>,
    /// Told of restarts, give-ups and escalations, with this supervisor's kind.
    observer: Option<(Observer, String)>,
}

impl SupervisorState {
    /// A state with no children yet.
    pub(crate) fn new(args: &SupervisorArgs) -> Self {
        Self {
            strategy: args.strategy,
            intensity: args.intensity,
            backoff: args.backoff,
            window: RestartWindow::new(args.intensity),
            children: Vec::with_capacity(args.children.len()),
            restarts: 0,
            next_generation: 0,
            timers: Vec::new(),
            registration: None,
            observer: args.observer.clone().map(|o| {
                let kind = args.kind.clone().unwrap_or_else(|| "supervisor".into());
                (o, kind)
            }),
        }
    }

    fn tell(&self, child: &str, kind: SupervisorEventKind) {
        if let Some((observer, supervisor)) = &self.observer {
            observer.tell(SupervisorEvent {
                supervisor: supervisor.clone(),
                child: child.to_owned(),
                kind,
            });
        }
    }

    fn fresh_generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    /// Where the child `id` is in the start order.
    pub(crate) fn position(&self, id: &str) -> Option<usize> {
        self.children.iter().position(|child| child.id() == id)
    }

    /// Which child `actor` is the running instance of.
    pub(crate) fn position_of_instance(&self, actor: ActorId) -> Option<usize> {
        self.children
            .iter()
            .position(|child| child.is_instance(actor))
    }

    /// Appends a child (not started) and returns its position.
    pub(crate) fn push(&mut self, spec: ChildSpec) -> Result<usize, SupervisorError> {
        if self.position(&spec.id).is_some() {
            return Err(SupervisorError::DuplicateChild(spec.id));
        }
        let generation = self.fresh_generation();
        self.children
            .push(Child::new(spec, self.backoff, generation));
        Ok(self.children.len() - 1)
    }

    /// Removes the child at `idx` (which must not be running).
    pub(crate) fn remove(&mut self, idx: usize) {
        let child = self.children.remove(idx);
        tracing::debug!(child = child.id(), "child spec removed");
    }

    /// Reports every child, in start order.
    pub(crate) fn which_children(&self) -> Vec<ChildInfo> {
        self.children.iter().map(Child::info).collect()
    }

    /// The counters.
    pub(crate) fn stats(&self) -> SupervisorStats {
        SupervisorStats {
            restarts: self.restarts,
            recent_restarts: self.window.recent(),
            children: self.children.len(),
            running: self.children.iter().filter(|c| c.cell.is_some()).count(),
        }
    }

    /// How many children (specs) there are.
    pub(crate) fn len(&self) -> usize {
        self.children.len()
    }

    /// The id of the child at `idx`.
    pub(crate) fn child_id(&self, idx: usize) -> &str {
        self.children[idx].id()
    }

    /// Whether the child at `idx` has a running instance.
    pub(crate) fn is_running(&self, idx: usize) -> bool {
        self.children[idx].cell.is_some()
    }

    /// The restart type of the child at `idx`.
    pub(crate) fn restart_type(&self, idx: usize) -> Restart {
        self.children[idx].spec.restart
    }

    /// Starts the child at `idx` (which must not be running), linked to `myself`.
    pub(crate) async fn start_child(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        idx: usize,
    ) -> Result<ActorCell, SpawnErr> {
        let supervisor = myself.get_cell();
        let start = self.children[idx].spec.start.clone();
        // A panicking start function is a failed start, not a crash of the supervisor.
        let started = match std::panic::catch_unwind(AssertUnwindSafe(|| start(supervisor.clone())))
        {
            Ok(future) => AssertUnwindSafe(future)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(SpawnErr::StartupFailed("start function panicked".into()))),
            Err(_) => Err(SpawnErr::StartupFailed("start function panicked".into())),
        };
        let cell = started?;
        let id = self.children[idx].id().to_owned();
        ensure_linked(&id, &cell, &supervisor);

        let generation = self.fresh_generation();
        let child = &mut self.children[idx];
        if child.started_once {
            child.restart_count = child.restart_count.saturating_add(1);
        }
        child.started_once = true;
        child.cell = Some(cell.clone());
        child.generation = generation;
        child.restart_pending = false;
        child.gave_up = None;
        child.backoff.started(Instant::now());
        crate::introspect::annotate(&cell, &id, child.restart_count);
        tracing::info!(child = %id, actor = %cell.get_id(), "child started");
        Ok(cell)
    }

    /// Stops the child at `idx`, if it is running, with its [`Shutdown`](super::Shutdown),
    /// and cancels any restart scheduled for it. Its exit event is ignored when it arrives.
    pub(crate) async fn stop_child(&mut self, idx: usize) {
        let generation = self.fresh_generation();
        let child = &mut self.children[idx];
        child.generation = generation;
        child.restart_pending = false;
        if let Some(cell) = child.cell.take() {
            let shutdown = child.spec.shutdown;
            let id = child.spec.id.clone();
            shutdown_child(&id, &cell, shutdown).await;
            tracing::info!(child = %id, "child stopped");
        }
    }

    /// Stops every child in reverse start order and cancels every scheduled restart.
    pub(crate) async fn shutdown_all(&mut self) {
        for timer in self.timers.drain(..) {
            timer.abort();
        }
        for idx in (0..self.children.len()).rev() {
            self.stop_child(idx).await;
        }
    }

    /// Handles the exit of the running instance of the child at `idx`. Returns `Err` when
    /// the supervisor must fail (intensity exceeded; the children are stopped by then).
    pub(crate) async fn child_exited(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        idx: usize,
        exit: ChildExit,
    ) -> Result<(), ActorProcessingErr> {
        let generation = self.fresh_generation();
        let child = &mut self.children[idx];
        child.cell = None;
        child.generation = generation;
        let restart = child.spec.restart;
        if !restart.should_restart(&exit) {
            if exit.is_normal() {
                tracing::info!(child = child.id(), %exit, ?restart, "child exited; not restarting");
            } else {
                tracing::warn!(child = child.id(), %exit, ?restart, "child exited; not restarting");
                let id = child.id().to_owned();
                self.tell(
                    &id,
                    SupervisorEventKind::NotRestarted {
                        exit: exit.to_string(),
                    },
                );
            }
            if restart == Restart::Temporary {
                self.remove(idx);
            }
            return Ok(());
        }
        tracing::warn!(child = child.id(), %exit, "child exited; restarting");
        child.last_exit = Some(exit.to_string());
        let id = child.id().to_owned();
        self.restart(myself, idx).await?;
        // Told after the restart ran, so a give-up or an escalation is told instead.
        if self
            .position(&id)
            .is_some_and(|i| self.children[i].gave_up.is_none())
        {
            self.tell(
                &id,
                SupervisorEventKind::Restarting {
                    exit: exit.to_string(),
                },
            );
        }
        Ok(())
    }

    /// Starts the entries of a scheduled restart that came due; stale entries are skipped.
    pub(crate) async fn restart_due(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        ticket: RestartTicket,
    ) -> Result<(), ActorProcessingErr> {
        match self.start_entries(myself, &ticket.entries).await {
            Ok(()) => Ok(()),
            Err(failed) => self.restart(myself, failed).await,
        }
    }

    /// The child at `failed` needs a restart: count it against the intensity (escalating
    /// if it is exceeded), stop the rest of its strategy's group in reverse start order,
    /// drop the group's temporary children, then start the group in start order, at once or
    /// after the failed child's backoff delay. A child that fails to start needs a restart in
    /// turn, so the loop runs again, until the group is up, a restart is scheduled, or the
    /// intensity is exceeded.
    async fn restart(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        mut failed: usize,
    ) -> Result<(), ActorProcessingErr> {
        loop {
            let now = Instant::now();
            let failed_id = self.children[failed].id().to_owned();
            let child = &mut self.children[failed];
            match child.window.as_mut().map(|w| w.record(now)) {
                Some(true) => {}
                Some(false) => {
                    // Its own budget is spent: give this child up, touch nobody else.
                    let intensity = child.spec.intensity.unwrap_or_default();
                    let why = format!(
                        "more than {} restarts in {:?}; last exit: {}",
                        intensity.max_restarts,
                        intensity.period,
                        child.last_exit.as_deref().unwrap_or("unknown")
                    );
                    tracing::error!(child = %failed_id, %why, "child gave up: not restarting it; its siblings are not touched");
                    child.restart_pending = false;
                    child.gave_up = Some(why.clone());
                    self.tell(&failed_id, SupervisorEventKind::GaveUp { why });
                    return Ok(());
                }
                None if !self.window.record(now) => {
                    return Err(self.escalate(&failed_id).await);
                }
                None => {}
            }
            self.restarts += 1;
            let delay = self.children[failed].backoff.next_delay(now);

            let group = self.strategy.restart_group(failed, self.children.len());
            for idx in group.clone().rev() {
                if self.children[idx].cell.is_some() {
                    self.stop_child(idx).await;
                }
            }

            // OTP: temporary children in the group are not restarted; their specs go.
            let mut entries = Vec::with_capacity(group.len());
            let mut temporaries = Vec::new();
            for idx in group {
                if self.children[idx].spec.restart == Restart::Temporary {
                    temporaries.push(idx);
                    continue;
                }
                let generation = self.fresh_generation();
                let child = &mut self.children[idx];
                child.generation = generation;
                child.restart_pending = !delay.is_zero();
                entries.push((child.spec.id.clone(), generation));
            }
            for idx in temporaries.into_iter().rev() {
                self.remove(idx);
            }

            if !delay.is_zero() {
                tracing::info!(child = %failed_id, ?delay, group = entries.len(), "restart scheduled");
                let ticket = RestartTicket { entries };
                self.timers.retain(|timer| !timer.is_finished());
                self.timers
                    .push(myself.send_after(delay, move || SupervisorMsg::RestartDue(ticket)));
                return Ok(());
            }
            match self.start_entries(myself, &entries).await {
                Ok(()) => return Ok(()),
                Err(idx) => failed = idx,
            }
        }
    }

    /// Starts `entries` in order. Returns the position of the first child that failed to
    /// start (the rest are left unstarted).
    async fn start_entries(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        entries: &[(String, u64)],
    ) -> Result<(), usize> {
        for (id, generation) in entries {
            let Some(idx) = self.position(id) else {
                tracing::debug!(child = %id, "scheduled restart of a deleted child ignored");
                continue;
            };
            let child = &self.children[idx];
            if child.generation != *generation || child.cell.is_some() {
                tracing::debug!(child = %id, "stale scheduled restart ignored");
                continue;
            }
            if let Err(err) = self.start_child(myself, idx).await {
                tracing::warn!(child = %id, %err, "child failed to restart");
                self.children[idx].last_exit = Some(format!("failed to start: {err}"));
                return Err(idx);
            }
        }
        Ok(())
    }

    /// Gives up: stops every child in reverse start order and returns the error the
    /// supervisor fails with.
    async fn escalate(&mut self, child: &str) -> ActorProcessingErr {
        tracing::error!(
            child,
            max_restarts = self.intensity.max_restarts,
            period = ?self.intensity.period,
            "restart intensity exceeded; stopping all children and failing"
        );
        self.shutdown_all().await;
        self.tell(
            child,
            SupervisorEventKind::Escalated {
                why: format!(
                    "more than {} restarts in {:?}",
                    self.intensity.max_restarts, self.intensity.period
                ),
            },
        );
        Box::new(SupervisorError::IntensityExceeded {
            max_restarts: self.intensity.max_restarts,
            period: self.intensity.period,
            child: child.to_owned(),
        })
    }
}

/// Links `cell` to `supervisor` if its start function forgot to, so its exit is seen.
fn ensure_linked(id: &str, cell: &ActorCell, supervisor: &ActorCell) {
    let linked = cell
        .try_get_supervisor()
        .is_some_and(|parent| parent.get_id() == supervisor.get_id());
    // A child that already stopped has unlinked itself after notifying us; leave it.
    if !linked && cell.get_status() < ActorStatus::Stopping {
        tracing::warn!(
            child = id,
            "start function returned an actor not linked to the supervisor; linking it"
        );
        cell.link(supervisor.clone());
    }
}
