//! `ClusterAgent`: this node's side of the cluster protocol.
//!
//! It reads the application messages peers send (see [`AppMsg`]) and:
//! - reports this node's instances and free memory to the leader every half second;
//! - accepts plans from the current leader only (a plan with a lower term than this node
//!   knows is a stale master's and is ignored), and reconciles this node with them: starts
//!   the instances assigned here, stops those the plan deletes or assigns elsewhere, and
//!   leaves running whatever the plan does not mention (the master adopts it);
//! - serves tasks other nodes route here and streams their events back, and fails the
//!   streams it sent to a node that leaves the cluster;
//! - runs the [`MasterActor`] as its child while this node is the leader, and stops it the
//!   moment it is not.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_runtime::cluster::{ClusterView, Incoming, NodeId};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use ractor_cluster::RactorMessage;
use tokio::sync::mpsc;

use super::ModelResolver;
use super::ResolveError;
use super::master::{MasterActor, MasterArgs, MasterMsg};
use super::protocol::{
    self, AppMsg, DeleteAnswer, InstanceReport, NodeReport, PlaceAnswer, PlaceError, Plan,
    PlanState, decode, encode, need_bytes,
};
use super::shared::Shared;
use crate::node::{ModelRouter, Placer};

const REPORT_EVERY: Duration = Duration::from_millis(500);

/// What the agent is started with (cloneable: a restarted agent reuses it).
#[derive(Clone)]
pub struct AgentArgs {
    /// Shared cluster state (and the cluster handle).
    pub shared: Shared,
    /// Application messages from peers (taken by each incarnation in turn).
    pub incoming: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Incoming>>>,
    /// This node's router.
    pub router: ModelRouter,
    /// Starts and stops instances here.
    pub placer: Placer,
    /// Resolves model names to files.
    pub resolver: Arc<dyn ModelResolver>,
    /// The API's address, once it listens.
    pub api: Arc<Mutex<Option<SocketAddr>>>,
    /// Memory this node offers to instances (`--memory`), if capped.
    pub memory_limit: Option<u64>,
}

/// Messages of the [`ClusterAgent`].
#[derive(RactorMessage)]
pub enum AgentMsg {
    /// A message from a peer.
    Incoming(Incoming),
    /// The view changed.
    View(ClusterView),
    /// Time to report.
    Report,
    /// Starting an instance finished.
    Started(String, Result<(), String>),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The agent's state.
pub struct AgentState {
    args: AgentArgs,
    master: Option<ActorRef<MasterMsg>>,
    starting: HashSet<String>,
    /// Instances this node could not run, with why (reported until the plan moves them).
    errors: HashMap<String, (String, String)>,
    /// The members of the last view seen.
    members: HashSet<NodeId>,
    _tasks: Vec<AbortOnDrop>,
    _registration: canopy_runtime::introspect::Registration,
}

/// The actor (see the module docs).
pub struct ClusterAgent;

/// Memory the kernel says is available (`MemAvailable`), in bytes.
fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb * 1024)
}

impl AgentState {
    fn me(&self) -> NodeId {
        self.args.shared.cluster().me().clone()
    }

    fn report(&mut self) {
        let view = self.args.shared.cluster().view();
        let Some(leader) = view.leader.clone() else {
            return;
        };
        let local = self.args.router.local_instances();
        let mut instances: Vec<InstanceReport> = Vec::new();
        let mut committed = 0;
        for i in &local {
            committed += need_bytes(self.args.resolver.size_hint(&i.source));
            instances.push(InstanceReport {
                id: i.id.clone(),
                model: i.model.clone(),
                source: i.source.clone(),
                status: i.status,
                pid: i.pid,
                restarts: i.restarts,
                last_failure: i.last_failure.clone(),
                error: i.load_error.clone().or_else(|| i.gave_up.clone()),
            });
        }
        for (id, (model, error)) in &self.errors {
            if !instances.iter().any(|r| &r.id == id) {
                instances.push(InstanceReport {
                    id: id.clone(),
                    model: model.clone(),
                    source: model.clone(),
                    status: canopy_proto::RunnerStatus::Failed,
                    pid: None,
                    restarts: 0,
                    last_failure: Some(error.clone()),
                    error: Some(error.clone()),
                });
            }
        }
        // Rounded to 16 MiB, so that small fluctuations do not change the plan.
        let available = mem_available() & !((16 << 20) - 1);
        let mem_available = match self.args.memory_limit {
            Some(limit) => available.min(limit.saturating_sub(committed)),
            None => available,
        };
        let report = NodeReport {
            node: self.me(),
            api: self.args.api.lock().ok().and_then(|a| *a),
            mem_available,
            instances,
        };
        let msg = match encode(&AppMsg::Report(report)) {
            Ok(msg) => msg,
            Err(err) => {
                tracing::error!(%err, "cannot report to the leader");
                return;
            }
        };
        if let Err(err) = self.args.shared.cluster().send(&leader, msg) {
            tracing::debug!(%err, "cannot report to the leader");
        }
    }

    /// Brings this node in line with `plan`.
    fn reconcile(&mut self, myself: &ActorRef<AgentMsg>, plan: &Plan) {
        let me = self.me();
        // Load failures and runners that kept dying: stop the instance (its supervisor would
        // retry a file that cannot load, or a runner that keeps dying here) and report the
        // error until the plan moves it to another node.
        for i in self.args.router.local_instances() {
            let error = match (&i.load_error, &i.gave_up) {
                (Some(error), _) => format!("cannot load the model: {error}"),
                (None, Some(why)) => why.clone(),
                (None, None) => continue,
            };
            self.errors.insert(i.id.clone(), (i.model.clone(), error));
            self.stop(&i.id);
        }
        for (id, p) in &plan.instances {
            let mine = p.state == PlanState::Active && p.node.as_ref() == Some(&me);
            let here = self.args.router.has_instance(id);
            if mine && !here && !self.starting.contains(id) && !self.errors.contains_key(id) {
                self.start(myself, id.clone(), p.model.clone(), p.source.clone());
            } else if here && !mine {
                tracing::info!(instance = %id, "the plan moves or deletes this instance: stopping it here");
                self.stop(id);
            }
        }
        self.errors.retain(|id, _| {
            plan.instances
                .get(id)
                .is_some_and(|p| p.state == PlanState::Active && p.node.as_ref() == Some(&me))
        });
    }

    fn start(&mut self, myself: &ActorRef<AgentMsg>, id: String, model: String, source: String) {
        tracing::info!(instance = %id, %model, "starting an instance the plan assigns here");
        self.starting.insert(id.clone());
        let resolver = self.args.resolver.clone();
        let placer = self.args.placer.clone();
        let myself = myself.clone();
        tokio::spawn(async move {
            let resolved = {
                tokio::task::spawn_blocking(move || resolver.resolve(&source))
                    .await
                    .unwrap_or_else(|e| {
                        Err(ResolveError::Other(format!(
                            "resolving the model panicked: {e}"
                        )))
                    })
            };
            let outcome = match resolved {
                Ok(load) => placer
                    .start(&id, &model, load)
                    .await
                    .map_err(|e| e.to_string()),
                Err(err) => Err(err.to_string()),
            };
            let _ = myself.cast(AgentMsg::Started(id, outcome));
        });
    }

    fn stop(&self, id: &str) {
        let placer = self.args.placer.clone();
        let id = id.to_string();
        // Forget it for routing at once; the runner stops in the background.
        tokio::spawn(async move {
            if let Err(err) = placer.stop(&id).await {
                tracing::warn!(instance = %id, %err, "could not stop an instance");
            }
        });
    }

    /// Takes in the events a peer sent of its own, and asks it for any it missed.
    fn absorb_events(&self, from: &NodeId, events: Vec<crate::events::Event>) {
        if events.len() > crate::events::MAX_EVENTS_PER_MESSAGE {
            tracing::warn!(peer = %from.short(), events = events.len(), "dropped an oversized event message");
            return;
        }
        for gap in self.args.router.events().absorb(from.as_str(), events) {
            self.ask_events(from, Some(gap.incarnation), gap.after);
        }
    }

    fn ask_events(&self, to: &NodeId, incarnation: Option<u64>, after: u64) {
        match encode(&AppMsg::EventsSince { incarnation, after }) {
            Ok(msg) => {
                if let Err(err) = self.args.shared.cluster().send(to, msg) {
                    tracing::debug!(%err, "cannot ask a peer for its events");
                }
            }
            Err(err) => tracing::error!(%err, "cannot ask a peer for its events"),
        }
    }

    fn send_events(&self, to: &NodeId, events: Vec<crate::events::Event>) {
        send_events(self.args.shared.cluster(), std::slice::from_ref(to), events);
    }

    async fn follow_view(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        view: &ClusterView,
    ) -> Result<(), ActorProcessingErr> {
        self.args.shared.forget_lost(view);
        // A member new to this agent may hold events this node has not seen (it was here
        // before this node, or events went while a session was down): ask for its history.
        let members: HashSet<NodeId> = view.members.iter().map(|m| m.id.clone()).collect();
        for id in members.difference(&self.members) {
            self.ask_events(id, None, 0);
        }
        self.members = members;
        if view.is_leader() && self.master.is_none() {
            let (master, _) = Actor::spawn_linked(
                None,
                MasterActor,
                MasterArgs {
                    cluster: self.args.shared.cluster().clone(),
                    plan: self.args.shared.plan(),
                    resolver: self.args.resolver.clone(),
                    events: self.args.router.events().clone(),
                },
                myself.get_cell(),
            )
            .await?;
            self.master = Some(master);
        } else if !view.is_leader()
            && let Some(master) = self.master.take()
        {
            tracing::info!("no longer the leader: stopping the master");
            master.stop(None);
        }
        self.args.router.notify_changed();
        Ok(())
    }

    fn incoming(&mut self, myself: &ActorRef<AgentMsg>, msg: Incoming) {
        let Incoming {
            from,
            payload,
            reply,
        } = msg;
        let msg: AppMsg = match decode(&payload) {
            Ok(msg) => msg,
            Err(err) => {
                tracing::warn!(peer = %from.short(), %err, "dropped a message from a peer");
                return;
            }
        };
        match (msg, reply) {
            (AppMsg::Report(report), _) => {
                if report.node != from {
                    tracing::warn!(peer = %from.short(), node = %report.node.short(),
                        "dropped a report a node sent in another node's name");
                    return;
                }
                if let Some(master) = &self.master {
                    let _ = master.cast(MasterMsg::Report(report));
                }
            }
            (AppMsg::Plan(plan), _) => {
                let view = self.args.shared.cluster().view();
                if view.leader.as_ref() != Some(&from)
                    || plan.leader != from
                    || plan.term < view.term
                {
                    tracing::debug!(peer = %from.short(), term = plan.term, "ignored a plan from a node that does not lead");
                    return;
                }
                if self.args.shared.offer_plan((*plan).clone()) {
                    self.reconcile(myself, &plan);
                }
            }
            (AppMsg::Place(request), Some(reply)) => match &self.master {
                Some(master) => {
                    let _ = master.cast(MasterMsg::Place(request, reply));
                }
                None => {
                    protocol::reply(reply, &PlaceAnswer::Err(PlaceError::NoLeader));
                }
            },
            (AppMsg::Delete { instance }, Some(reply)) => match &self.master {
                Some(master) => {
                    let _ = master.cast(MasterMsg::Delete(instance, reply));
                }
                None => {
                    protocol::reply(reply, &DeleteAnswer::Err(PlaceError::NoLeader));
                }
            },
            (
                AppMsg::Submit {
                    key,
                    model,
                    request,
                },
                Some(reply),
            ) => {
                self.args.shared.serve(from, key, model, request, reply);
            }
            (AppMsg::Event { key, event }, _) => self.args.shared.deliver(&from, key, event),
            (AppMsg::Progress { key }, _) => self.args.shared.progress(&from, key),
            (AppMsg::Cancel { key }, _) => self.args.shared.cancel_served(from, key),
            (AppMsg::Events { events }, _) => self.absorb_events(&from, events),
            (AppMsg::EventsSince { incarnation, after }, _) => {
                let events = self.args.router.events().own_since(incarnation, after);
                if !events.is_empty() {
                    self.send_events(&from, events);
                }
            }
            (AppMsg::Actors, Some(reply)) => {
                // The tree travels as JSON text: its actors' details are free-form JSON.
                match serde_json::to_string(&self.args.router.local_actors()) {
                    Ok(tree) => {
                        protocol::reply(reply, &tree);
                    }
                    Err(err) => tracing::warn!(%err, "cannot encode the actor tree"),
                }
            }
            (other, None) => {
                tracing::warn!(peer = %from.short(), msg = ?std::mem::discriminant(&other), "a call was sent as a cast; dropped");
            }
        }
    }
}

/// Sends `events` to each of `to`.
fn send_events(
    cluster: &canopy_runtime::cluster::ClusterHandle,
    to: &[NodeId],
    events: Vec<crate::events::Event>,
) {
    if to.is_empty() || events.is_empty() {
        return;
    }
    let msg = match encode(&AppMsg::Events { events }) {
        Ok(msg) => msg,
        Err(err) => {
            tracing::error!(%err, "cannot send events");
            return;
        }
    };
    for node in to {
        if let Err(err) = cluster.send(node, msg.clone()) {
            tracing::debug!(%err, peer = %node.short(), "cannot send events");
        }
    }
}

impl Actor for ClusterAgent {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        args: AgentArgs,
    ) -> Result<AgentState, ActorProcessingErr> {
        let registration =
            canopy_runtime::introspect::register(&myself.get_cell(), "cluster-agent");
        let reader = {
            let incoming = args.incoming.clone();
            let myself = myself.clone();
            tokio::spawn(async move {
                let mut incoming = incoming.lock().await;
                while let Some(msg) = incoming.recv().await {
                    if myself.cast(AgentMsg::Incoming(msg)).is_err() {
                        break;
                    }
                }
            })
        };
        let watcher = {
            let mut views = args.shared.cluster().subscribe();
            let myself = myself.clone();
            tokio::spawn(async move {
                loop {
                    let view = views.borrow_and_update().clone();
                    if myself.cast(AgentMsg::View(view)).is_err() {
                        break;
                    }
                    if views.changed().await.is_err() {
                        break;
                    }
                }
            })
        };
        // This node's own events go to every member as they happen.
        let publisher = {
            let cluster = args.shared.cluster().clone();
            let own = args
                .router
                .events()
                .follow_own(args.router.events().last_id());
            tokio::spawn(async move {
                use futures::StreamExt;
                let mut batches = Box::pin(own.ready_chunks(crate::events::MAX_EVENTS_PER_MESSAGE));
                while let Some(batch) = batches.next().await {
                    let members: Vec<NodeId> =
                        cluster.view().members.into_iter().map(|m| m.id).collect();
                    let events = batch.iter().map(|e| (**e).clone()).collect();
                    send_events(&cluster, &members, events);
                }
            })
        };
        myself.send_interval(REPORT_EVERY, || AgentMsg::Report);
        Ok(AgentState {
            args,
            master: None,
            starting: HashSet::new(),
            errors: HashMap::new(),
            members: HashSet::new(),
            _tasks: vec![
                AbortOnDrop(reader),
                AbortOnDrop(watcher),
                AbortOnDrop(publisher),
            ],
            _registration: registration,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        msg: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Incoming(msg) => state.incoming(&myself, msg),
            AgentMsg::View(view) => state.follow_view(&myself, &view).await?,
            AgentMsg::Report => state.report(),
            AgentMsg::Started(id, outcome) => {
                state.starting.remove(&id);
                if let Err(err) = outcome {
                    tracing::warn!(instance = %id, %err, "cannot run the instance here");
                    let model = state
                        .args
                        .shared
                        .plan()
                        .and_then(|p| p.instances.get(&id).map(|i| i.model.clone()))
                        .unwrap_or_default();
                    state.errors.insert(id, (model, err));
                    state.report();
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<AgentMsg>,
        evt: SupervisionEvent,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = &evt
            && state
                .master
                .as_ref()
                .is_some_and(|m| m.get_id() == cell.get_id())
        {
            tracing::error!(%err, "the master failed; starting it again");
            state.master = None;
            let view = state.args.shared.cluster().view();
            state.follow_view(&myself, &view).await?;
        }
        Ok(())
    }
}
