//! The [`Supervisor`] actor: ractor's lifecycle hooks and message handling, delegating the
//! restart machinery to [`SupervisorState`].

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::args::SupervisorArgs;
use super::error::SupervisorError;
use super::exit::ChildExit;
use super::messages::SupervisorMsg;
use super::spec::Restart;
use super::state::SupervisorState;

/// An OTP-style supervisor. Spawn it with [`SupervisorArgs`]; it starts the children in
/// order in `pre_start` (so `spawn` returns once they are all up, or fails after stopping
/// the ones already started), restarts them under its [`Strategy`](super::Strategy), and
/// stops them in reverse start order when it stops or gives up.
#[derive(Debug, Clone, Copy, Default)]
pub struct Supervisor;

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut state = SupervisorState::new(&args);
        state.registration = Some(crate::introspect::register(
            &myself.get_cell(),
            args.kind.as_deref().unwrap_or("supervisor"),
        ));
        for spec in args.children {
            state.push(spec)?;
        }
        for idx in 0..state.len() {
            if let Err(source) = state.start_child(&myself, idx).await {
                let id = state.child_id(idx).to_owned();
                tracing::error!(child = %id, %source, "child failed to start; supervisor start fails");
                state.shutdown_all().await;
                return Err(Box::new(SupervisorError::StartFailed { id, source }));
            }
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        tracing::debug!("supervisor stopping; stopping children in reverse start order");
        state.shutdown_all().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        // A reply port whose caller has gone away is not the supervisor's problem, hence
        // the ignored send results.
        match msg {
            SupervisorMsg::WhichChildren(reply) => {
                let _ = reply.send(state.which_children());
            }
            SupervisorMsg::Stats(reply) => {
                let _ = reply.send(state.stats());
            }
            SupervisorMsg::StartChild(spec, reply) => {
                let result = match state.push(spec) {
                    Ok(idx) => match state.start_child(&myself, idx).await {
                        Ok(cell) => Ok(cell),
                        Err(source) => {
                            let id = state.child_id(idx).to_owned();
                            state.remove(idx);
                            tracing::warn!(child = %id, %source, "dynamic child failed to start");
                            Err(SupervisorError::StartFailed { id, source })
                        }
                    },
                    Err(err) => Err(err),
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::TerminateChild(id, reply) => {
                let result = match state.position(&id) {
                    Some(idx) => {
                        state.stop_child(idx).await;
                        if state.restart_type(idx) == Restart::Temporary {
                            state.remove(idx);
                        }
                        Ok(())
                    }
                    None => Err(SupervisorError::NoSuchChild(id)),
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::RestartChild(id, reply) => {
                let result = match state.position(&id) {
                    Some(idx) if state.is_running(idx) => Err(SupervisorError::ChildRunning(id)),
                    Some(idx) => state
                        .start_child(&myself, idx)
                        .await
                        .map_err(|source| SupervisorError::StartFailed { id, source }),
                    None => Err(SupervisorError::NoSuchChild(id)),
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::DeleteChild(id, reply) => {
                let result = match state.position(&id) {
                    Some(idx) if state.is_running(idx) => Err(SupervisorError::ChildRunning(id)),
                    Some(idx) => {
                        state.remove(idx);
                        Ok(())
                    }
                    None => Err(SupervisorError::NoSuchChild(id)),
                };
                let _ = reply.send(result);
            }
            SupervisorMsg::RestartDue(ticket) => state.restart_due(&myself, ticket).await?,
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (Some(exit), Some(actor)) = (ChildExit::from_event(&event), event.actor_cell()) else {
            return Ok(());
        };
        match state.position_of_instance(actor.get_id()) {
            Some(idx) => state.child_exited(&myself, idx, exit).await,
            None => {
                // An instance this supervisor stopped itself, or one already replaced.
                tracing::debug!(actor = %actor.get_id(), %exit, "exit of a former child ignored");
                Ok(())
            }
        }
    }
}
