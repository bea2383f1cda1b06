//! `MasterActor`: runs only on the elected node. It owns the [`Planner`] — where every model
//! instance should run, and the rules that decide it (see [`super::planner`]) — feeds it
//! reports, requests, the live members and the time, and carries out what it hands back:
//! answers to the clients waiting on `POST /instances`, and the plan, sent to every node.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_runtime::cluster::ClusterHandle;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;

use crate::events::EventLog;

use super::ModelResolver;
use super::plan_events::placement_events;
use super::planner::{Members, Planner, Ticket};
use super::protocol::{AppMsg, NodeReport, PlaceAnswer, PlaceRequest, Plan, encode, reply};

pub use super::planner::RETRY_BUDGET;

/// How often the master reconciles and (at least) republishes the plan.
const TICK: Duration = Duration::from_millis(500);

/// Messages of the [`MasterActor`].
#[derive(RactorMessage)]
pub enum MasterMsg {
    /// A node's report.
    Report(NodeReport),
    /// Place instances; the answer is an encoded [`PlaceAnswer`].
    Place(PlaceRequest, RpcReplyPort<Vec<u8>>),
    /// Delete an instance; the answer is an encoded `DeleteAnswer`.
    Delete(String, RpcReplyPort<Vec<u8>>),
    /// Reconcile and publish.
    Tick,
}

/// What the master starts with.
#[derive(Clone)]
pub struct MasterArgs {
    /// The cluster.
    pub cluster: ClusterHandle,
    /// The newest plan this node has seen.
    pub plan: Option<Plan>,
    /// Resolves model names (for ids and memory needs).
    pub resolver: Arc<dyn ModelResolver>,
    /// Where placements are recorded as events.
    pub events: EventLog,
}

/// The master's state.
pub struct MasterState {
    cluster: ClusterHandle,
    planner: Planner,
    /// The clients waiting for a placement, by the ticket the planner answers.
    waiting: HashMap<Ticket, RpcReplyPort<Vec<u8>>>,
    next_ticket: u64,
    /// The plan published last (the inherited one at first), to tell what each new one changes.
    published: Option<Plan>,
    events: EventLog,
    _registration: canopy_runtime::introspect::Registration,
}

/// The actor (see the module docs).
pub struct MasterActor;

/// The live members as the planner sees them, from the cluster's view now.
fn members_of(cluster: &ClusterHandle) -> Members {
    let view = cluster.view();
    Members::new(view.me, view.members.into_iter().map(|m| m.id), view.term)
}

impl MasterState {
    /// Answers the clients and publishes the plan to `members`, as the planner says now.
    fn carry_out(&mut self, now: Instant, members: &Members) {
        let ready = self.planner.ready(now);
        self.answer(ready.answers);
        if let Some(plan) = ready.publish {
            for event in placement_events(self.published.as_ref(), &plan) {
                self.events.record("master", event);
            }
            self.published = Some(plan.clone());
            let msg = match encode(&AppMsg::Plan(Box::new(plan))) {
                Ok(msg) => msg,
                Err(err) => {
                    tracing::error!(%err, "cannot publish the plan");
                    return;
                }
            };
            for node in &members.alive {
                if let Err(err) = self.cluster.send(node, msg.clone()) {
                    tracing::debug!(%err, "cannot send the plan");
                }
            }
        }
    }

    fn answer(&mut self, answers: Vec<(Ticket, PlaceAnswer)>) {
        for (ticket, answer) in answers {
            if let Some(port) = self.waiting.remove(&ticket) {
                reply(port, &answer);
            }
        }
    }
}

impl Actor for MasterActor {
    type Msg = MasterMsg;
    type State = MasterState;
    type Arguments = MasterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MasterMsg>,
        args: MasterArgs,
    ) -> Result<MasterState, ActorProcessingErr> {
        let registration = canopy_runtime::introspect::register(&myself.get_cell(), "master");
        let members = members_of(&args.cluster);
        let published = args.plan.clone();
        let planner = Planner::new(args.plan, &members, args.resolver);
        tracing::info!(
            term = members.term,
            instances = planner.plan().instances.len(),
            "master taking office"
        );
        myself.send_interval(TICK, || MasterMsg::Tick);
        Ok(MasterState {
            cluster: args.cluster,
            planner,
            waiting: HashMap::new(),
            next_ticket: 0,
            published,
            events: args.events,
            _registration: registration,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<MasterMsg>,
        state: &mut MasterState,
    ) -> Result<(), ActorProcessingErr> {
        let answers = state.planner.abdicate();
        state.answer(answers);
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<MasterMsg>,
        msg: MasterMsg,
        state: &mut MasterState,
    ) -> Result<(), ActorProcessingErr> {
        let now = Instant::now();
        match msg {
            MasterMsg::Report(report) => {
                let node = report.node.short().to_string();
                if let Err(why) = state.planner.report(report) {
                    tracing::warn!(node = %node, %why, "dropped an oversized report");
                }
            }
            MasterMsg::Place(request, port) => {
                let members = members_of(&state.cluster);
                let ticket = Ticket(state.next_ticket);
                state.next_ticket += 1;
                state.waiting.insert(ticket, port);
                state.planner.place(ticket, request, &members, now);
                state.carry_out(now, &members);
            }
            MasterMsg::Delete(id, port) => {
                reply(port, &state.planner.delete(&id));
                state.carry_out(now, &members_of(&state.cluster));
            }
            MasterMsg::Tick => {
                let members = members_of(&state.cluster);
                state.planner.tick(&members, now);
                state.carry_out(now, &members);
            }
        }
        Ok(())
    }
}
