//! `MasterActor`: runs only on the elected node. It keeps the [`Plan`] — where every model
//! instance should run — and publishes it to every node.
//!
//! - **Taking office** it starts from the newest plan this node has seen (every node keeps
//!   the leader's broadcasts), and it *adopts* whatever the workers report running that the
//!   plan does not know. Re-election therefore never stops an instance: a worker only stops
//!   an instance the plan explicitly deletes or assigns to another node.
//! - **Placement** puts an instance on the live node with enough free memory (reported by
//!   the node, minus what is already promised to it) that runs the fewest instances.
//! - **Re-placement**: an instance whose node left the cluster, or whose node reports it
//!   cannot run it, is placed again elsewhere after a backoff (1 s doubling to 30 s), within
//!   a budget of [`RETRY_BUDGET`] attempts that resets once the instance is Ready.
//! - **`POST /instances`** is answered when every new instance is Ready, or with the first
//!   failure (the instances are then deleted again: a placement either happens or is
//!   reported as failed, never left half-done).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_proto::RunnerStatus;
use canopy_runtime::cluster::{ClusterHandle, NodeId};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::RactorMessage;

use super::ModelResolver;
use super::protocol::{
    AppMsg, MAX_INSTANCES_PER_NODE, MAX_PLAN_BYTES, MAX_PLAN_INSTANCES, NodeReport, PlaceAnswer,
    PlaceError, PlaceRequest, Placed, Plan, PlanNode, PlanState, PlannedInstance, encode,
    need_bytes,
};

/// Placement attempts of one instance before it is marked failed.
pub const RETRY_BUDGET: u32 = 5;

/// How often the master reconciles and (at least) republishes the plan.
const TICK: Duration = Duration::from_millis(500);
const REPUBLISH: Duration = Duration::from_secs(1);
/// How long a placement waits for a live node's first report.
const REPORT_GRACE: Duration = Duration::from_secs(3);

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
}

struct Pending {
    ids: Vec<String>,
    reply: RpcReplyPort<Vec<u8>>,
    deadline: Instant,
    wait_secs: u64,
}

struct Retry {
    next: Instant,
    excluded: Vec<NodeId>,
}

/// The master's state.
pub struct MasterState {
    args: MasterArgs,
    plan: Plan,
    reports: HashMap<NodeId, NodeReport>,
    pending: Vec<Pending>,
    /// Placement requests that arrived before every live node had reported (a node that
    /// just joined): retried on each tick, for up to [`REPORT_GRACE`].
    deferred: Vec<(PlaceRequest, RpcReplyPort<Vec<u8>>, Instant)>,
    retries: HashMap<String, Retry>,
    /// When each deleted instance was first seen deleted (pruned from the plan after
    /// [`PRUNE_AFTER`] once no live node reports it).
    deleted: HashMap<String, Instant>,
    dirty: bool,
    published: Instant,
    _registration: canopy_runtime::introspect::Registration,
}

/// The actor (see the module docs).
pub struct MasterActor;

/// How long a deleted instance stays in the plan (so every node sees it deleted and stops it)
/// before it is pruned, once no live node reports it any more.
const PRUNE_AFTER: Duration = Duration::from_secs(30);

fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.min(5)).min(Duration::from_secs(30))
}

fn slug(model: &str) -> String {
    let stem = std::path::Path::new(model)
        .file_stem()
        .map_or_else(|| model.to_string(), |s| s.to_string_lossy().into_owned());
    stem.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

impl MasterState {
    fn alive(&self) -> Vec<NodeId> {
        let view = self.args.cluster.view();
        let mut alive = vec![view.me.clone()];
        alive.extend(view.members.into_iter().map(|m| m.id));
        alive
    }

    /// Memory still free on `node` after what the plan promised it but it has not reported.
    fn free_on(&self, node: &NodeId) -> Option<u64> {
        let report = self.reports.get(node)?;
        let promised: u64 = self
            .plan
            .instances
            .iter()
            .filter(|(id, p)| {
                p.state == PlanState::Active
                    && p.node.as_ref() == Some(node)
                    && !report.instances.iter().any(|r| &r.id == *id)
            })
            .map(|(_, p)| need_bytes(self.args.resolver.size_hint(&p.source)))
            .sum();
        Some(report.mem_available.saturating_sub(promised))
    }

    fn count_on(&self, node: &NodeId) -> usize {
        self.plan
            .instances
            .values()
            .filter(|p| p.state == PlanState::Active && p.node.as_ref() == Some(node))
            .count()
    }

    /// The best node for one instance of `model`, or why there is none.
    fn choose(
        &self,
        model: &str,
        only: Option<&NodeId>,
        excluded: &[NodeId],
    ) -> Result<NodeId, PlaceError> {
        let need = need_bytes(self.args.resolver.size_hint(model));
        let alive = self.alive();
        if let Some(only) = only
            && !alive.contains(only)
        {
            return Err(PlaceError::UnknownNode(only.to_string()));
        }
        let mut best_free = 0;
        let mut best: Option<(usize, u64, NodeId)> = None;
        let mut full = false;
        for node in alive {
            if only.is_some_and(|o| *o != node) || excluded.contains(&node) {
                continue;
            }
            if self.count_on(&node) >= MAX_INSTANCES_PER_NODE {
                full = true;
                continue;
            }
            let Some(free) = self.free_on(&node) else {
                continue;
            };
            best_free = best_free.max(free);
            if free < need {
                continue;
            }
            let count = self.count_on(&node);
            let better = match &best {
                None => true,
                Some((c, f, id)) => {
                    (count, std::cmp::Reverse(free), &node) < (*c, std::cmp::Reverse(*f), id)
                }
            };
            if better {
                best = Some((count, free, node));
            }
        }
        if best.is_none() && full {
            return Err(PlaceError::Invalid(format!(
                "no candidate node can take another instance: those with room already run {MAX_INSTANCES_PER_NODE}, the most one node may run"
            )));
        }
        best.map(|(_, _, node)| node).ok_or(PlaceError::NoRoom {
            model: model.to_string(),
            needed: need,
            best: best_free,
        })
    }

    fn reported(&self, node: &NodeId, id: &str) -> Option<&super::protocol::InstanceReport> {
        self.reports
            .get(node)?
            .instances
            .iter()
            .find(|r| r.id == id)
    }

    fn is_pending(&self, id: &str) -> bool {
        self.pending.iter().any(|p| p.ids.iter().any(|i| i == id))
    }

    fn reconcile(&mut self) {
        let view = self.args.cluster.view();
        if view.term > self.plan.term {
            self.plan.term = view.term;
            self.plan.version = 0;
            self.dirty = true;
        }
        let alive = self.alive();
        self.reports.retain(|node, _| alive.contains(node));

        // Adopt what runs and the plan does not know; take over instances of lost nodes.
        let mut adopted = Vec::new();
        for (node, report) in &self.reports {
            for inst in &report.instances {
                if inst.error.is_some() {
                    continue;
                }
                match self.plan.instances.get(&inst.id) {
                    None => adopted.push((inst.clone(), node.clone())),
                    Some(p)
                        if p.state == PlanState::Active
                            && p.node.as_ref().is_none_or(|n| !alive.contains(n)) =>
                    {
                        adopted.push((inst.clone(), node.clone()))
                    }
                    _ => {}
                }
            }
        }
        for (inst, node) in adopted {
            tracing::info!(instance = %inst.id, node = %node.short(), "adopting a running instance");
            let entry = self
                .plan
                .instances
                .entry(inst.id)
                .or_insert(PlannedInstance {
                    model: inst.model,
                    source: inst.source,
                    node: None,
                    state: PlanState::Active,
                    attempts: 0,
                });
            entry.node = Some(node);
            self.dirty = true;
        }

        // Follow each active instance.
        let now = Instant::now();
        let ids: Vec<String> = self.plan.instances.keys().cloned().collect();
        for id in ids {
            let Some(p) = self.plan.instances.get(&id).cloned() else {
                continue;
            };
            if p.state != PlanState::Active {
                continue;
            }
            let mut next = p.clone();
            match &p.node {
                Some(node) if !alive.contains(node) => {
                    tracing::warn!(instance = %id, node = %node.short(), "its node left the cluster: placing it again");
                    next.node = None;
                    self.retries.entry(id.clone()).or_insert(Retry {
                        next: now,
                        excluded: Vec::new(),
                    });
                }
                Some(node) => match self.reported(node, &id) {
                    Some(r) if r.error.is_some() => {
                        let reason = r.error.clone().unwrap_or_default();
                        tracing::warn!(instance = %id, node = %node.short(), %reason, "a node cannot run the instance");
                        next.attempts += 1;
                        next.node = None;
                        let retry = self.retries.entry(id.clone()).or_insert(Retry {
                            next: now,
                            excluded: Vec::new(),
                        });
                        retry.excluded.push(node.clone());
                        retry.next = now + backoff(next.attempts);
                        if self.is_pending(&id) || next.attempts >= RETRY_BUDGET {
                            next.state = PlanState::Failed {
                                reason: format!("node {}: {reason}", node.short()),
                            };
                        }
                    }
                    Some(r) if matches!(r.status, RunnerStatus::Ready | RunnerStatus::Running) => {
                        next.attempts = 0;
                        self.retries.remove(&id);
                    }
                    _ => {}
                },
                None => {
                    let retry = self.retries.entry(id.clone()).or_insert(Retry {
                        next: now,
                        excluded: Vec::new(),
                    });
                    if retry.next <= now {
                        let excluded = retry.excluded.clone();
                        let chosen = self
                            .choose(&p.source, None, &excluded)
                            .or_else(|_| self.choose(&p.source, None, &[]));
                        match chosen {
                            Ok(node) => {
                                tracing::info!(instance = %id, node = %node.short(), "placing");
                                next.node = Some(node);
                            }
                            Err(err) => {
                                next.attempts += 1;
                                let retry = self.retries.entry(id.clone()).or_insert(Retry {
                                    next: now,
                                    excluded: Vec::new(),
                                });
                                retry.next = now + backoff(next.attempts);
                                tracing::warn!(instance = %id, %err, attempts = next.attempts, "cannot place the instance now");
                                if self.is_pending(&id) || next.attempts >= RETRY_BUDGET {
                                    next.state = PlanState::Failed {
                                        reason: err.to_string(),
                                    };
                                }
                            }
                        }
                    }
                }
            }
            if next != p {
                self.plan.instances.insert(id, next);
                self.dirty = true;
            }
        }

        self.answer_pending();

        // What the plan tells everyone about nodes and statuses.
        let nodes: BTreeMap<NodeId, PlanNode> = self
            .reports
            .iter()
            .map(|(id, r)| {
                (
                    id.clone(),
                    PlanNode {
                        api: r.api,
                        mem_available: r.mem_available,
                    },
                )
            })
            .collect();
        let reports: BTreeMap<NodeId, Vec<_>> = self
            .reports
            .iter()
            .map(|(id, r)| (id.clone(), r.instances.clone()))
            .collect();
        if nodes != self.plan.nodes || reports != self.plan.reports {
            self.plan.nodes = nodes;
            self.plan.reports = reports;
            self.dirty = true;
        }
        self.publish(&alive);
    }

    fn answer_pending(&mut self) {
        let now = Instant::now();
        let mut still = Vec::new();
        for pending in std::mem::take(&mut self.pending) {
            let mut failed = None;
            let mut ready = true;
            for id in &pending.ids {
                let Some(p) = self.plan.instances.get(id) else {
                    failed = Some(PlaceError::NoSuchInstance(id.clone()));
                    break;
                };
                if let PlanState::Failed { reason } = &p.state {
                    failed = Some(PlaceError::Failed {
                        instance: id.clone(),
                        node: p
                            .node
                            .as_ref()
                            .map_or_else(|| "-".to_string(), |n| n.to_string()),
                        reason: reason.clone(),
                    });
                    break;
                }
                let is_ready = p
                    .node
                    .as_ref()
                    .and_then(|n| self.reported(n, id))
                    .is_some_and(|r| {
                        matches!(r.status, RunnerStatus::Ready | RunnerStatus::Running)
                    });
                ready &= is_ready;
            }
            if failed.is_none() && !ready && now >= pending.deadline {
                failed = Some(PlaceError::Timeout(pending.wait_secs));
            }
            if let Some(err) = failed {
                for id in &pending.ids {
                    if let Some(p) = self.plan.instances.get_mut(id) {
                        p.state = PlanState::Deleted;
                    }
                }
                self.dirty = true;
                tracing::warn!(%err, "placement failed");
                let _ = pending.reply.send(encode(&PlaceAnswer::Err(err)));
            } else if ready {
                let placed = pending
                    .ids
                    .iter()
                    .filter_map(|id| {
                        let node = self.plan.instances.get(id)?.node.clone()?;
                        Some(Placed {
                            id: id.clone(),
                            node,
                        })
                    })
                    .collect();
                let _ = pending.reply.send(encode(&PlaceAnswer::Ok(placed)));
            } else {
                still.push(pending);
            }
        }
        self.pending = still;
    }

    /// Removes deleted instances that have been deleted for [`PRUNE_AFTER`] and that no live
    /// node reports any more, so the plan does not grow with every placement ever made.
    fn prune(&mut self) {
        let now = Instant::now();
        let reported: std::collections::HashSet<&str> = self
            .reports
            .values()
            .flat_map(|r| r.instances.iter().map(|i| i.id.as_str()))
            .collect();
        let deleted = &mut self.deleted;
        let before = self.plan.instances.len();
        self.plan.instances.retain(|id, p| {
            if p.state != PlanState::Deleted {
                return true;
            }
            let since = *deleted.entry(id.clone()).or_insert(now);
            now.duration_since(since) < PRUNE_AFTER || reported.contains(id.as_str())
        });
        let plan = &self.plan;
        deleted.retain(|id, _| plan.instances.contains_key(id));
        if self.plan.instances.len() != before {
            tracing::debug!(
                pruned = before - self.plan.instances.len(),
                "pruned deleted instances"
            );
            self.dirty = true;
        }
    }

    fn publish(&mut self, alive: &[NodeId]) {
        self.prune();
        if !self.dirty && self.published.elapsed() < REPUBLISH {
            return;
        }
        if self.dirty {
            self.plan.version += 1;
            self.dirty = false;
        }
        self.published = Instant::now();
        let msg = encode(&AppMsg::Plan(Box::new(self.plan.clone())));
        for node in alive {
            if let Err(err) = self.args.cluster.send(node, msg.clone()) {
                tracing::debug!(%err, "cannot send the plan");
            }
        }
    }

    /// Places now if every live node has reported (or the grace is over), else defers.
    fn place_or_defer(
        &mut self,
        request: PlaceRequest,
        reply: RpcReplyPort<Vec<u8>>,
        since: Instant,
    ) {
        let unreported = self.alive().iter().any(|n| !self.reports.contains_key(n));
        if unreported && since.elapsed() < REPORT_GRACE {
            self.deferred.push((request, reply, since));
        } else {
            self.place(request, reply);
        }
    }

    fn place(&mut self, request: PlaceRequest, reply: RpcReplyPort<Vec<u8>>) {
        if let Err(err) = request.validate() {
            let _ = reply.send(encode(&PlaceAnswer::Err(err)));
            return;
        }
        let live = self
            .plan
            .instances
            .values()
            .filter(|p| p.state != PlanState::Deleted)
            .count();
        if live + request.instances > MAX_PLAN_INSTANCES {
            let err = PlaceError::Invalid(format!(
                "the cluster has {live} instances; {} more would pass the limit of {MAX_PLAN_INSTANCES}",
                request.instances
            ));
            let _ = reply.send(encode(&PlaceAnswer::Err(err)));
            return;
        }
        let model = self.args.resolver.model_id(&request.model);
        let mut chosen = Vec::new();
        for n in 0..request.instances {
            match self.choose(&request.model, request.node.as_ref(), &[]) {
                Ok(node) => {
                    let id = format!("{}-{:06x}", slug(&model), rand::random::<u32>() & 0xff_ffff);
                    // Promise the memory at once, so the next instance of this request
                    // counts it.
                    self.plan.instances.insert(
                        id.clone(),
                        PlannedInstance {
                            model: model.clone(),
                            source: request.model.clone(),
                            node: Some(node.clone()),
                            state: PlanState::Active,
                            attempts: 0,
                        },
                    );
                    chosen.push(id);
                }
                Err(err) => {
                    for id in &chosen {
                        self.plan.instances.remove(id);
                    }
                    tracing::warn!(%err, instance = n, "placement refused");
                    let _ = reply.send(encode(&PlaceAnswer::Err(err)));
                    return;
                }
            }
        }
        let size = encode(&AppMsg::Plan(Box::new(self.plan.clone()))).len();
        if size > MAX_PLAN_BYTES {
            for id in &chosen {
                self.plan.instances.remove(id);
            }
            let err = PlaceError::Invalid(format!(
                "placing this would make the cluster's plan {size} bytes, more than the {MAX_PLAN_BYTES} it may be"
            ));
            tracing::warn!(%err, "placement refused");
            let _ = reply.send(encode(&PlaceAnswer::Err(err)));
            return;
        }
        tracing::info!(model = %model, instances = chosen.len(), "placing");
        self.dirty = true;
        self.pending.push(Pending {
            ids: chosen,
            reply,
            deadline: Instant::now() + Duration::from_secs(request.wait_secs),
            wait_secs: request.wait_secs,
        });
        let alive = self.alive();
        self.publish(&alive);
    }

    fn delete(&mut self, id: String, reply: RpcReplyPort<Vec<u8>>) {
        let answer: Result<(), PlaceError> = match self.plan.instances.get_mut(&id) {
            Some(p) if p.state != PlanState::Deleted => {
                p.state = PlanState::Deleted;
                self.retries.remove(&id);
                self.dirty = true;
                tracing::info!(instance = %id, "deleted");
                Ok(())
            }
            _ => Err(PlaceError::NoSuchInstance(id)),
        };
        let _ = reply.send(encode(&answer));
        let alive = self.alive();
        self.publish(&alive);
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
        let view = args.cluster.view();
        let mut plan = args
            .plan
            .clone()
            .unwrap_or_else(|| Plan::empty(view.me.clone()));
        plan.leader = view.me.clone();
        plan.term = view.term;
        plan.version = 0;
        tracing::info!(
            term = view.term,
            instances = plan.instances.len(),
            "master taking office"
        );
        myself.send_interval(TICK, || MasterMsg::Tick);
        Ok(MasterState {
            args,
            plan,
            reports: HashMap::new(),
            pending: Vec::new(),
            deferred: Vec::new(),
            retries: HashMap::new(),
            deleted: HashMap::new(),
            dirty: true,
            published: Instant::now(),
            _registration: registration,
        })
    }

    async fn post_stop(
        &self,
        _: ActorRef<MasterMsg>,
        state: &mut MasterState,
    ) -> Result<(), ActorProcessingErr> {
        for pending in state.pending.drain(..) {
            let _ = pending
                .reply
                .send(encode(&PlaceAnswer::Err(PlaceError::NoLeader)));
        }
        Ok(())
    }

    async fn handle(
        &self,
        _: ActorRef<MasterMsg>,
        msg: MasterMsg,
        state: &mut MasterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MasterMsg::Report(report) => {
                let node = report.node.short().to_string();
                match report.bounded() {
                    Ok(report) => {
                        state.reports.insert(report.node.clone(), report);
                    }
                    Err(why) => {
                        tracing::warn!(node = %node, %why, "dropped an oversized report");
                    }
                }
            }
            MasterMsg::Place(request, reply) => {
                state.place_or_defer(request, reply, Instant::now())
            }
            MasterMsg::Delete(id, reply) => state.delete(id, reply),
            MasterMsg::Tick => {
                state.reconcile();
                for (request, reply, since) in std::mem::take(&mut state.deferred) {
                    state.place_or_defer(request, reply, since);
                }
            }
        }
        Ok(())
    }
}
