//! The placement planner: every decision the leader makes about where instances run, with
//! no I/O. It is fed the node reports, placement and deletion requests, the live members and
//! the time; it changes the [`Plan`] and hands back what to do ([`Ready`]: answers to
//! placement requests, and the plan to publish). [`super::master::MasterActor`] only feeds
//! it and carries out what it hands back, so every rule below is unit-tested with a fake
//! clock and no cluster.
//!
//! - **Taking office** ([`Planner::new`]) starts from the newest plan this node has seen,
//!   and [`Planner::tick`] *adopts* whatever the workers report running that the plan does
//!   not know (or that the plan placed on a node that left). Re-election therefore never
//!   stops an instance: a worker only stops an instance the plan deletes or assigns to
//!   another node. The first plan is published once every live member has reported (or
//!   after [`REPORT_GRACE`]), so that it carries their statuses: until then every node serves
//!   from the old leader's plan, and a model with a Ready instance stays routable.
//! - **Placement** puts an instance on the live node with enough free memory (reported by
//!   the node, minus what the plan promised it and it does not yet report) that runs the
//!   fewest instances; ties go to the node with more free memory, then the smaller id.
//! - **Re-placement**: an instance whose node left the cluster, or whose node reports it
//!   cannot run it, is placed again elsewhere after a backoff (1 s doubling to 30 s), within
//!   a budget of [`RETRY_BUDGET`] attempts that resets once the instance has been Ready for
//!   [`STABLE_FOR`] (an instance that loads, serves a moment and dies again, over and over,
//!   spends its budget and fails with the reason instead of cycling forever).
//! - **A placement request** is answered when every new instance is Ready, or with the
//!   first failure (the instances are then deleted again: a placement either happens or is
//!   reported as failed, never left half-done). A request that arrives while a live node has
//!   not reported yet (it just joined) waits for its report, up to [`REPORT_GRACE`].
//! - **Deleted instances** stay in the plan for [`PRUNE_AFTER`] after no live node reports
//!   them, so every node sees the deletion and stops them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_proto::RunnerStatus;
use canopy_runtime::cluster::NodeId;
use canopy_runtime::restart::Backoff;

use super::ModelResolver;
use super::protocol::{
    AppMsg, DeleteAnswer, InstanceReport, MAX_INSTANCES_PER_NODE, MAX_PLAN_BYTES,
    MAX_PLAN_INSTANCES, NodeReport, OversizedReport, PlaceAnswer, PlaceError, PlaceRequest, Placed,
    Plan, PlanNode, PlanState, PlannedInstance, encode, need_bytes,
};

/// Placement attempts of one instance before it is marked failed.
pub const RETRY_BUDGET: u32 = 5;
/// How long an instance must stay Ready before its failed attempts are forgotten.
pub const STABLE_FOR: Duration = Duration::from_secs(60);
/// How often the plan is published even when nothing changed (a node that missed one
/// publication catches up within this).
pub const REPUBLISH: Duration = Duration::from_secs(1);
/// How long a placement request waits for a live node's first report.
pub const REPORT_GRACE: Duration = Duration::from_secs(3);
/// How long a deleted instance stays in the plan once no live node reports it.
pub const PRUNE_AFTER: Duration = Duration::from_secs(30);

/// The wait before re-placing an instance after its `attempts`-th failed attempt: 1 s
/// doubling, at most 30 s.
fn backoff() -> Backoff {
    Backoff::doubling(Duration::from_secs(1), Duration::from_secs(30))
}

/// Names one placement request, so the planner's answer can find the client waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(pub u64);

/// The cluster as the planner sees it at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// This node (the leader).
    pub me: NodeId,
    /// Every live member, this node included.
    pub alive: Vec<NodeId>,
    /// The leader's term.
    pub term: u64,
}

impl Members {
    /// This node and its live peers, in `term`.
    pub fn new(me: NodeId, peers: impl IntoIterator<Item = NodeId>, term: u64) -> Self {
        let mut alive = vec![me.clone()];
        alive.extend(peers.into_iter().filter(|p| *p != me));
        Self { me, alive, term }
    }

    fn contains(&self, node: &NodeId) -> bool {
        self.alive.contains(node)
    }
}

/// What a step of the planner hands back for the caller to carry out.
#[derive(Debug, Default)]
pub struct Ready {
    /// Answers to placement requests, by ticket.
    pub answers: Vec<(Ticket, PlaceAnswer)>,
    /// The plan to send to every live member: it changed, or [`REPUBLISH`] has passed.
    pub publish: Option<Plan>,
}

/// A placement waiting for its instances to be Ready.
#[derive(Debug)]
struct Pending {
    ticket: Ticket,
    ids: Vec<String>,
    deadline: Instant,
    wait_secs: u64,
}

/// A placement request waiting for a live node's first report.
#[derive(Debug)]
struct Deferred {
    ticket: Ticket,
    request: PlaceRequest,
    since: Instant,
}

/// When an instance waiting to be placed again may be, and the nodes that failed it.
#[derive(Debug)]
struct Retry {
    next: Instant,
    excluded: Vec<NodeId>,
}

/// The leader's placement state and rules (see the module docs).
pub struct Planner {
    models: Arc<dyn ModelResolver>,
    plan: Plan,
    reports: HashMap<NodeId, NodeReport>,
    pending: Vec<Pending>,
    deferred: Vec<Deferred>,
    retries: HashMap<String, Retry>,
    /// Since when each instance with failed attempts has been Ready.
    ready_since: HashMap<String, Instant>,
    /// When each deleted instance was first seen deleted.
    deleted: HashMap<String, Instant>,
    answers: Vec<(Ticket, PlaceAnswer)>,
    dirty: bool,
    published: Option<Instant>,
    /// When this planner first stepped ([`Planner::tick`] or [`Planner::ready`]).
    took_office: Option<Instant>,
    /// Whether every live member had reported when the plan was first published.
    heard_everyone: bool,
}

/// A short, readable id stem for a model: its file name without `.gguf`, lower-case,
/// `[a-z0-9.-]` only.
fn slug(model: &str) -> String {
    let name = std::path::Path::new(model)
        .file_name()
        .map_or_else(|| model.to_string(), |s| s.to_string_lossy().into_owned());
    let stem = match name.len().checked_sub(5) {
        Some(cut) if name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case(".gguf") => {
            &name[..cut]
        }
        _ => &name[..],
    };
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

fn is_up(report: &InstanceReport) -> bool {
    matches!(report.status, RunnerStatus::Ready | RunnerStatus::Running)
}

impl Planner {
    /// Takes office: starts from `plan` (the newest this node has seen; `None` for a new
    /// cluster) in the members' term, with version 0.
    pub fn new(plan: Option<Plan>, members: &Members, models: Arc<dyn ModelResolver>) -> Self {
        let mut plan = plan.unwrap_or_else(|| Plan::empty(members.me.clone()));
        plan.leader = members.me.clone();
        plan.term = members.term;
        plan.version = 0;
        Self {
            models,
            plan,
            reports: HashMap::new(),
            pending: Vec::new(),
            deferred: Vec::new(),
            retries: HashMap::new(),
            ready_since: HashMap::new(),
            deleted: HashMap::new(),
            answers: Vec::new(),
            dirty: true,
            published: None,
            took_office: None,
            heard_everyone: false,
        }
    }

    /// The plan as it stands.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Takes a node's report (bounded: see [`NodeReport::bounded`]); a refused one changes
    /// nothing and the error says why.
    pub fn report(&mut self, report: NodeReport) -> Result<(), OversizedReport> {
        let report = report.bounded()?;
        self.reports.insert(report.node.clone(), report);
        Ok(())
    }

    /// Takes a placement request. It is answered through [`Planner::ready`]: at once when it
    /// is refused, else when its instances are Ready or one fails.
    pub fn place(
        &mut self,
        ticket: Ticket,
        request: PlaceRequest,
        members: &Members,
        now: Instant,
    ) {
        self.note_members(members, now);
        self.place_or_defer(
            Deferred {
                ticket,
                request,
                since: now,
            },
            members,
            now,
        );
    }

    /// Deletes an instance: every node running it stops it.
    pub fn delete(&mut self, id: &str) -> DeleteAnswer {
        match self.plan.instances.get_mut(id) {
            Some(p) if p.state != PlanState::Deleted => {
                p.state = PlanState::Deleted;
                self.retries.remove(id);
                self.dirty = true;
                tracing::info!(instance = %id, "deleted");
                Ok(())
            }
            _ => Err(PlaceError::NoSuchInstance(id.to_string())),
        }
    }

    /// One round: follows the term, adopts what runs, re-places what lost its node or failed,
    /// answers the placements that are done, and retries the deferred ones.
    pub fn tick(&mut self, members: &Members, now: Instant) {
        self.note_members(members, now);
        if members.term > self.plan.term {
            self.plan.term = members.term;
            self.plan.version = 0;
            self.dirty = true;
        }
        self.reports.retain(|node, _| members.contains(node));
        self.adopt(members);
        let ids: Vec<String> = self.plan.instances.keys().cloned().collect();
        for id in ids {
            self.follow(&id, members, now);
        }
        let plan = &self.plan;
        self.ready_since
            .retain(|id, _| plan.instances.contains_key(id));
        self.answer_pending(now);
        self.mirror_reports();
        for deferred in std::mem::take(&mut self.deferred) {
            self.place_or_defer(deferred, members, now);
        }
    }

    /// What to carry out now: the answers decided since the last call, and the plan when it
    /// changed or is due to be republished (its version is bumped on a change).
    pub fn ready(&mut self, now: Instant) -> Ready {
        self.prune(now);
        // A new leader's first plan waits for every live member's report (up to the grace):
        // published earlier, it would carry no statuses, and nodes would stop routing to
        // instances that are Ready. Until then every node keeps serving from the old plan.
        let since = *self.took_office.get_or_insert(now);
        let holding = self.published.is_none()
            && !self.heard_everyone
            && now.duration_since(since) < REPORT_GRACE;
        let due = self
            .published
            .is_none_or(|at| now.duration_since(at) >= REPUBLISH);
        let publish = (!holding && (self.dirty || due)).then(|| {
            if self.dirty {
                self.plan.version += 1;
                self.dirty = false;
            }
            self.published = Some(now);
            self.plan.clone()
        });
        Ready {
            answers: std::mem::take(&mut self.answers),
            publish,
        }
    }

    /// Leaves office: every placement still waiting is answered [`PlaceError::NoLeader`].
    pub fn abdicate(&mut self) -> Vec<(Ticket, PlaceAnswer)> {
        let mut answers = std::mem::take(&mut self.answers);
        let waiting = self
            .pending
            .drain(..)
            .map(|p| p.ticket)
            .chain(self.deferred.drain(..).map(|d| d.ticket));
        answers.extend(waiting.map(|t| (t, Err(PlaceError::NoLeader))));
        answers
    }

    /// Notes when this planner took office and whether every live member has reported yet.
    fn note_members(&mut self, members: &Members, now: Instant) {
        self.took_office.get_or_insert(now);
        if !self.heard_everyone {
            self.heard_everyone = self.all_reported(members);
        }
    }

    /// Whether every live member has reported.
    fn all_reported(&self, members: &Members) -> bool {
        members.alive.iter().all(|n| self.reports.contains_key(n))
    }

    /// Adopts what a live node reports running that the plan does not know, or that the plan
    /// assigned to no node or to a node that left.
    fn adopt(&mut self, members: &Members) {
        let mut adopted = Vec::new();
        for (node, report) in &self.reports {
            for inst in report.instances.iter().filter(|i| i.error.is_none()) {
                let orphan = match self.plan.instances.get(&inst.id) {
                    None => true,
                    Some(p) => {
                        p.state == PlanState::Active
                            && p.node.as_ref().is_none_or(|n| !members.contains(n))
                    }
                };
                if orphan {
                    adopted.push((inst.clone(), node.clone()));
                }
            }
        }
        // Reports are a map: adopt in a fixed order, so that two nodes reporting one id end
        // the same way every time (the smaller node id wins).
        adopted.sort_by(|a, b| (&a.0.id, &b.1).cmp(&(&b.0.id, &a.1)));
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
                    request: None,
                });
            entry.node = Some(node);
            self.dirty = true;
        }
    }

    /// Follows one active instance: re-places it when its node left or cannot run it, resets
    /// its attempts once it is Ready, places it when it waits for a node and its backoff is
    /// over.
    fn follow(&mut self, id: &str, members: &Members, now: Instant) {
        let Some(p) = self.plan.instances.get(id).cloned() else {
            return;
        };
        if p.state != PlanState::Active {
            return;
        }
        let mut next = p.clone();
        let up = p
            .node
            .as_ref()
            .and_then(|node| self.reported(node, id))
            .is_some_and(|r| r.error.is_none() && is_up(r));
        if !up {
            // Stability counts from the latest time it came up.
            self.ready_since.remove(id);
        }
        match &p.node {
            Some(node) if !members.contains(node) => {
                tracing::warn!(instance = %id, node = %node.short(), "its node left the cluster: placing it again");
                next.node = None;
                self.retry(id, now);
            }
            Some(node) => match self.reported(node, id) {
                Some(r) if r.error.is_some() => {
                    let reason = r.error.clone().unwrap_or_default();
                    tracing::warn!(instance = %id, node = %node.short(), %reason, "a node cannot run the instance");
                    next.node = None;
                    self.failed_attempt(
                        id,
                        &mut next,
                        now,
                        Some(node),
                        format!("node {}: {reason}", node.short()),
                    );
                }
                Some(r) if is_up(r) => {
                    let since = *self.ready_since.entry(id.to_string()).or_insert(now);
                    if now.duration_since(since) >= STABLE_FOR {
                        next.attempts = 0;
                        self.retries.remove(id);
                        self.ready_since.remove(id);
                    }
                }
                _ => {}
            },
            None if self.retry(id, now).next <= now => {
                let excluded = self.retry(id, now).excluded.clone();
                let chosen = self
                    .choose(&p.source, None, &excluded, members)
                    .or_else(|_| self.choose(&p.source, None, &[], members));
                match chosen {
                    Ok(node) => {
                        tracing::info!(instance = %id, node = %node.short(), "placing");
                        next.node = Some(node);
                    }
                    Err(err) => {
                        tracing::warn!(instance = %id, %err, attempts = next.attempts + 1, "cannot place the instance now");
                        self.failed_attempt(id, &mut next, now, None, err.to_string());
                    }
                }
            }
            None => {}
        }
        if next != p {
            self.plan.instances.insert(id.to_string(), next);
            self.dirty = true;
        }
    }

    /// The retry record of `id`, made when it has none (placeable at once).
    fn retry(&mut self, id: &str, now: Instant) -> &mut Retry {
        self.retries.entry(id.to_string()).or_insert(Retry {
            next: now,
            excluded: Vec::new(),
        })
    }

    /// Counts a failed attempt of `next`: the next one waits a backoff and avoids `node`;
    /// the instance fails for good when its budget is spent or a client waits for it.
    fn failed_attempt(
        &mut self,
        id: &str,
        next: &mut PlannedInstance,
        now: Instant,
        node: Option<&NodeId>,
        reason: String,
    ) {
        next.attempts += 1;
        let wait = backoff().delay(next.attempts);
        let retry = self.retry(id, now);
        retry.next = now + wait;
        retry.excluded.extend(node.cloned());
        if self.is_pending(id) || next.attempts >= RETRY_BUDGET {
            next.state = PlanState::Failed { reason };
        }
    }

    fn reported(&self, node: &NodeId, id: &str) -> Option<&InstanceReport> {
        self.reports
            .get(node)?
            .instances
            .iter()
            .find(|r| r.id == id)
    }

    fn is_pending(&self, id: &str) -> bool {
        self.pending.iter().any(|p| p.ids.iter().any(|i| i == id))
    }

    /// Memory still free on `node` after what the plan promised it and it does not report;
    /// `None` until the node has reported.
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
            .map(|(_, p)| need_bytes(self.models.size_hint(&p.source)))
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

    /// The best node for one instance of `model` (see the module docs), or why there is none.
    fn choose(
        &self,
        model: &str,
        only: Option<&NodeId>,
        excluded: &[NodeId],
        members: &Members,
    ) -> Result<NodeId, PlaceError> {
        let need = need_bytes(self.models.size_hint(model));
        if let Some(only) = only
            && !members.contains(only)
        {
            return Err(PlaceError::UnknownNode(only.to_string()));
        }
        let mut best_free = 0;
        let mut best: Option<(usize, std::cmp::Reverse<u64>, &NodeId)> = None;
        let mut full = false;
        for node in &members.alive {
            if only.is_some_and(|o| o != node) || excluded.contains(node) {
                continue;
            }
            let count = self.count_on(node);
            if count >= MAX_INSTANCES_PER_NODE {
                full = true;
                continue;
            }
            let Some(free) = self.free_on(node) else {
                continue;
            };
            best_free = best_free.max(free);
            if free < need {
                continue;
            }
            let candidate = (count, std::cmp::Reverse(free), node);
            if best.is_none_or(|b| candidate < b) {
                best = Some(candidate);
            }
        }
        match best {
            Some((_, _, node)) => Ok(node.clone()),
            None if full => Err(PlaceError::Invalid(format!(
                "no candidate node can take another instance: those with room already run {MAX_INSTANCES_PER_NODE}, the most one node may run"
            ))),
            None => Err(PlaceError::NoRoom {
                model: model.to_string(),
                needed: need,
                best: best_free,
            }),
        }
    }

    /// Answers the placements whose instances are all Ready, or one failed, or whose wait is
    /// over (a failed placement's instances are deleted).
    fn answer_pending(&mut self, now: Instant) {
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
                ready &= p
                    .node
                    .as_ref()
                    .and_then(|n| self.reported(n, id))
                    .is_some_and(is_up);
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
                self.answers.push((pending.ticket, Err(err)));
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
                self.answers.push((pending.ticket, Ok(placed)));
            } else {
                self.pending.push(pending);
            }
        }
    }

    /// Copies the live nodes' addresses, memory and instance reports into the plan.
    fn mirror_reports(&mut self) {
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
        let reports: BTreeMap<NodeId, Vec<InstanceReport>> = self
            .reports
            .iter()
            .map(|(id, r)| (id.clone(), r.instances.clone()))
            .collect();
        if nodes != self.plan.nodes || reports != self.plan.reports {
            self.plan.nodes = nodes;
            self.plan.reports = reports;
            self.dirty = true;
        }
    }

    /// Removes deleted instances deleted for [`PRUNE_AFTER`] that no live node reports, so
    /// the plan does not grow with every placement ever made.
    fn prune(&mut self, now: Instant) {
        let reported: HashSet<&str> = self
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

    /// Places `deferred` now if every live node has reported (or its grace is over), else
    /// keeps it for the next tick.
    fn place_or_defer(&mut self, deferred: Deferred, members: &Members, now: Instant) {
        if !self.all_reported(members) && now.duration_since(deferred.since) < REPORT_GRACE {
            self.deferred.push(deferred);
        } else {
            let Deferred {
                ticket, request, ..
            } = deferred;
            if let Err(err) = self.place_now(ticket, request, members, now) {
                tracing::warn!(%err, "placement refused");
                self.answers.push((ticket, Err(err)));
            }
        }
    }

    /// Assigns every instance of `request` a node, or none of them.
    fn place_now(
        &mut self,
        ticket: Ticket,
        request: PlaceRequest,
        members: &Members,
        now: Instant,
    ) -> Result<(), PlaceError> {
        request.validate()?;
        let live = self
            .plan
            .instances
            .values()
            .filter(|p| p.state != PlanState::Deleted)
            .count();
        if live + request.instances > MAX_PLAN_INSTANCES {
            return Err(PlaceError::Invalid(format!(
                "the cluster has {live} instances; {} more would pass the limit of {MAX_PLAN_INSTANCES}",
                request.instances
            )));
        }
        let model = self.models.model_id(&request.model);
        if let Some(key) = &request.request_id {
            let mut existing: Vec<String> = self
                .plan
                .instances
                .iter()
                .filter(|(_, p)| p.request.as_ref() == Some(key) && p.state != PlanState::Deleted)
                .map(|(id, _)| id.clone())
                .collect();
            if !existing.is_empty() {
                existing.sort();
                let same = existing.len() == request.instances
                    && existing
                        .iter()
                        .all(|id| self.plan.instances[id].source == request.model);
                if !same {
                    return Err(PlaceError::Invalid(format!(
                        "`request_id` {key:?} belongs to another placement ({} instances of {}); use a new key",
                        existing.len(),
                        self.plan.instances[&existing[0]].source
                    )));
                }
                tracing::info!(request_id = %key, instances = existing.len(), "a placement retried: answering with the instances it made");
                self.pending.push(Pending {
                    ticket,
                    ids: existing,
                    deadline: now + Duration::from_secs(request.wait_secs),
                    wait_secs: request.wait_secs,
                });
                return Ok(());
            }
        }
        let mut chosen = Vec::new();
        let undo = |plan: &mut Plan, chosen: &[String]| {
            for id in chosen {
                plan.instances.remove(id);
            }
        };
        for _ in 0..request.instances {
            let node = match self.choose(&request.model, request.node.as_ref(), &[], members) {
                Ok(node) => node,
                Err(err) => {
                    undo(&mut self.plan, &chosen);
                    return Err(err);
                }
            };
            let id = loop {
                let id = format!("{}-{:06x}", slug(&model), rand::random::<u32>() & 0xff_ffff);
                if !self.plan.instances.contains_key(&id) {
                    break id;
                }
            };
            // Promise the memory at once, so the next instance of this request counts it.
            self.plan.instances.insert(
                id.clone(),
                PlannedInstance {
                    model: model.clone(),
                    source: request.model.clone(),
                    node: Some(node),
                    state: PlanState::Active,
                    attempts: 0,
                    request: request.request_id.clone(),
                },
            );
            chosen.push(id);
        }
        let size = plan_bytes(&self.plan);
        if size > MAX_PLAN_BYTES {
            undo(&mut self.plan, &chosen);
            return Err(PlaceError::Invalid(format!(
                "placing this would make the cluster's plan {size} bytes, more than the {MAX_PLAN_BYTES} it may be"
            )));
        }
        tracing::info!(model = %model, instances = chosen.len(), "placing");
        self.dirty = true;
        self.pending.push(Pending {
            ticket,
            ids: chosen,
            deadline: now + Duration::from_secs(request.wait_secs),
            wait_secs: request.wait_secs,
        });
        Ok(())
    }
}

/// The size of the plan as it is published (a plan that does not encode counts as too large).
fn plan_bytes(plan: &Plan) -> usize {
    encode(&AppMsg::Plan(Box::new(plan.clone()))).map_or(usize::MAX, |b| b.len())
}

#[cfg(test)]
mod tests {
    //! The placement rules on a fake clock: every test drives the planner by hand with
    //! reports, requests and instants, and checks the plan and the answers it hands back.

    use super::*;
    use crate::cluster::ResolveError;
    use canopy_proto::LoadSpec;

    const MIB: u64 = 1024 * 1024;

    /// Every model is `size` bytes; ids are the names.
    struct Models {
        size: u64,
    }

    impl ModelResolver for Models {
        fn resolve(&self, _: &str) -> Result<LoadSpec, ResolveError> {
            Err(ResolveError::Other("the planner never resolves".into()))
        }
        fn size_hint(&self, _: &str) -> Option<u64> {
            Some(self.size)
        }
        fn model_id(&self, model: &str) -> String {
            model.to_string()
        }
    }

    fn node(n: u8) -> NodeId {
        format!("{n:02x}{}", "0".repeat(30))
            .parse()
            .expect("a node id")
    }

    /// The memory one instance of the test model takes (100 MiB file).
    fn need() -> u64 {
        need_bytes(Some(100 * MIB))
    }

    fn planner(plan: Option<Plan>, members: &Members) -> Planner {
        Planner::new(plan, members, Arc::new(Models { size: 100 * MIB }))
    }

    fn request(instances: usize) -> PlaceRequest {
        PlaceRequest {
            model: "m".into(),
            instances,
            node: None,
            wait_secs: 60,
            request_id: None,
        }
    }

    fn instance(id: &str, status: RunnerStatus, error: Option<&str>) -> InstanceReport {
        InstanceReport {
            id: id.into(),
            model: "m".into(),
            source: "m".into(),
            status,
            pid: None,
            restarts: 0,
            last_failure: None,
            error: error.map(str::to_string),
        }
    }

    fn report(node: NodeId, mem: u64, instances: Vec<InstanceReport>) -> NodeReport {
        NodeReport {
            node,
            api: None,
            mem_available: mem,
            instances,
        }
    }

    /// Reports every instance the plan assigns to `n` with `status` (and the memory left).
    fn report_assigned(p: &mut Planner, n: NodeId, mem: u64, status: RunnerStatus) {
        let instances = p
            .plan()
            .instances
            .iter()
            .filter(|(_, i)| i.node.as_ref() == Some(&n) && i.state == PlanState::Active)
            .map(|(id, _)| instance(id, status, None))
            .collect();
        p.report(report(n, mem, instances)).expect("a small report");
    }

    fn assigned(p: &Planner, n: &NodeId) -> Vec<String> {
        p.plan()
            .instances
            .iter()
            .filter(|(_, i)| i.node.as_ref() == Some(n) && i.state == PlanState::Active)
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn only_instance(p: &Planner) -> (String, PlannedInstance) {
        assert_eq!(p.plan().instances.len(), 1, "{:?}", p.plan().instances);
        let (id, i) = p.plan().instances.iter().next().expect("one instance");
        (id.clone(), i.clone())
    }

    #[test]
    fn instances_go_to_the_node_with_fewest_and_the_answer_waits_for_ready() {
        let (a, b) = (node(1), node(2));
        let members = Members::new(a.clone(), [b.clone()], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        p.report(report(b.clone(), 8 * need(), vec![])).unwrap();
        p.place(Ticket(7), request(3), &members, now);
        let ready = p.ready(now);
        assert!(ready.answers.is_empty(), "answered before Ready");
        assert!(
            ready.publish.is_some(),
            "the placement is published at once"
        );
        // Both have none: the one with more free memory first; then the emptier one; then
        // both have one and b still has more room.
        assert_eq!(assigned(&p, &a).len(), 1);
        assert_eq!(assigned(&p, &b).len(), 2);

        report_assigned(&mut p, a.clone(), 3 * need(), RunnerStatus::Ready);
        p.tick(&members, now + Duration::from_secs(1));
        assert!(
            p.ready(now).answers.is_empty(),
            "b's instances are not Ready yet"
        );
        report_assigned(&mut p, b.clone(), 6 * need(), RunnerStatus::Running);
        p.tick(&members, now + Duration::from_secs(2));
        let answers = p.ready(now + Duration::from_secs(2)).answers;
        assert_eq!(answers.len(), 1);
        let (ticket, answer) = &answers[0];
        assert_eq!(*ticket, Ticket(7));
        let placed = answer.as_ref().expect("placed");
        assert_eq!(placed.len(), 3);
        assert_eq!(placed.iter().filter(|x| x.node == a).count(), 1);
    }

    #[test]
    fn memory_promised_but_not_reported_counts_against_a_node() {
        let a = node(1);
        let members = Members::new(a.clone(), [], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a.clone(), 2 * need(), vec![])).unwrap();
        p.place(Ticket(1), request(2), &members, now);
        assert!(p.ready(now).answers.is_empty());
        p.place(Ticket(2), request(1), &members, now);
        let answers = p.ready(now).answers;
        assert!(
            matches!(
                &answers[..],
                [(Ticket(2), Err(PlaceError::NoRoom { best: 0, .. }))]
            ),
            "{answers:?}"
        );
    }

    #[test]
    fn no_room_is_refused_at_once_and_leaves_nothing_behind() {
        let (a, b) = (node(1), node(2));
        let members = Members::new(a.clone(), [b.clone()], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a, need() / 2, vec![])).unwrap();
        p.report(report(b, need() - 1, vec![])).unwrap();
        p.place(Ticket(1), request(1), &members, now);
        let answers = p.ready(now).answers;
        match &answers[..] {
            [(Ticket(1), Err(PlaceError::NoRoom { needed, best, .. }))] => {
                assert_eq!((*needed, *best), (need(), need() - 1));
            }
            other => panic!("{other:?}"),
        }
        assert!(p.plan().instances.is_empty());

        // Room for one of two: neither is placed.
        let (c, d) = (node(3), node(4));
        let members = Members::new(c.clone(), [d.clone()], 1);
        let mut p = planner(None, &members);
        p.report(report(c, need(), vec![])).unwrap();
        p.report(report(d, 0, vec![])).unwrap();
        p.place(Ticket(2), request(2), &members, now);
        assert!(matches!(
            &p.ready(now).answers[..],
            [(Ticket(2), Err(PlaceError::NoRoom { .. }))]
        ));
        assert!(p.plan().instances.is_empty(), "half a placement stayed");
    }

    #[test]
    fn bad_requests_and_unknown_nodes_are_refused() {
        let a = node(1);
        let members = Members::new(a.clone(), [], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a, 10 * need(), vec![])).unwrap();
        p.place(Ticket(1), request(0), &members, now);
        let mut elsewhere = request(1);
        elsewhere.node = Some(node(9));
        p.place(Ticket(2), elsewhere, &members, now);
        let answers = p.ready(now).answers;
        assert!(matches!(
            answers[0],
            (Ticket(1), Err(PlaceError::Invalid(_)))
        ));
        assert!(matches!(
            answers[1],
            (Ticket(2), Err(PlaceError::UnknownNode(_)))
        ));
        assert!(p.plan().instances.is_empty());
    }

    #[test]
    fn a_request_waits_for_a_new_nodes_first_report_within_the_grace() {
        let (a, b) = (node(1), node(2));
        let members = Members::new(a.clone(), [b.clone()], 1);
        let now = Instant::now();

        // b reports within the grace: it is considered (and, emptier with more room, chosen).
        let mut p = planner(None, &members);
        p.report(report(a.clone(), need(), vec![])).unwrap();
        p.place(Ticket(1), request(1), &members, now);
        p.tick(&members, now + Duration::from_secs(1));
        assert!(p.plan().instances.is_empty(), "placed before b reported");
        p.report(report(b.clone(), 4 * need(), vec![])).unwrap();
        p.tick(&members, now + Duration::from_secs(2));
        assert_eq!(assigned(&p, &b).len(), 1);

        // b never reports: after the grace the request is placed on what did report.
        let mut p = planner(None, &members);
        p.report(report(a.clone(), need(), vec![])).unwrap();
        p.place(Ticket(1), request(1), &members, now);
        p.tick(&members, now + REPORT_GRACE - Duration::from_millis(1));
        assert!(p.plan().instances.is_empty());
        p.tick(&members, now + REPORT_GRACE);
        assert_eq!(assigned(&p, &a).len(), 1);
    }

    #[test]
    fn taking_office_adopts_what_the_workers_run() {
        let (a, b) = (node(1), node(2));
        let members = Members::new(a.clone(), [b.clone()], 3);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(
            a.clone(),
            0,
            vec![instance("m-1", RunnerStatus::Ready, None)],
        ))
        .unwrap();
        // An instance that cannot run is not adopted.
        p.report(report(
            b.clone(),
            0,
            vec![instance("m-2", RunnerStatus::Failed, Some("no such file"))],
        ))
        .unwrap();
        p.tick(&members, now);
        let (id, adopted) = only_instance(&p);
        assert_eq!(id, "m-1");
        assert_eq!(adopted.node, Some(a));
        assert_eq!(adopted.state, PlanState::Active);
        let plan = p.ready(now).publish.expect("published");
        assert_eq!((plan.term, plan.version, plan.leader), (3, 1, node(1)));
    }

    #[test]
    fn re_election_keeps_every_instance_where_it_runs() {
        let (a, b) = (node(1), node(2));
        let old = Members::new(b.clone(), [a.clone()], 1);
        let mut before = planner(None, &old);
        let now = Instant::now();
        before
            .report(report(a.clone(), 4 * need(), vec![]))
            .unwrap();
        before.report(report(b.clone(), 0, vec![])).unwrap();
        before.place(Ticket(1), request(1), &old, now);
        report_assigned(&mut before, a.clone(), 3 * need(), RunnerStatus::Ready);
        before.tick(&old, now);
        let plan = before.ready(now).publish.expect("published");

        // b is gone; a leads in term 2 from the plan it kept.
        let new = Members::new(a.clone(), [], 2);
        let mut p = planner(Some(plan.clone()), &new);
        report_assigned(&mut p, a.clone(), 3 * need(), RunnerStatus::Ready);
        p.tick(&new, now + Duration::from_secs(1));
        let after = p
            .ready(now + Duration::from_secs(1))
            .publish
            .expect("published");
        assert_eq!((after.term, after.version, &after.leader), (2, 1, &a));
        assert_eq!(after.instances, plan.instances, "an instance moved");
    }

    #[test]
    fn a_lost_nodes_instances_are_placed_again_elsewhere() {
        let (a, b) = (node(1), node(2));
        let both = Members::new(a.clone(), [b.clone()], 1);
        let mut p = planner(None, &both);
        let now = Instant::now();
        p.report(report(a.clone(), need(), vec![])).unwrap();
        p.report(report(b.clone(), 4 * need(), vec![])).unwrap();
        p.place(Ticket(1), request(1), &both, now);
        report_assigned(&mut p, b.clone(), 3 * need(), RunnerStatus::Ready);
        p.tick(&both, now);
        assert_eq!(p.ready(now).answers.len(), 1);

        let alone = Members::new(a.clone(), [], 1);
        p.tick(&alone, now + Duration::from_secs(1));
        assert_eq!(only_instance(&p).1.node, None, "still on the lost node");
        p.tick(&alone, now + Duration::from_secs(2));
        let (_, moved) = only_instance(&p);
        assert_eq!(moved.node, Some(a));
        assert_eq!(moved.attempts, 0, "a lost node is not a failed attempt");
    }

    #[test]
    fn a_failing_instance_backs_off_and_fails_when_its_budget_is_spent() {
        let a = node(1);
        let members = Members::new(a.clone(), [], 1);
        let mut p = planner(None, &members);
        let mut now = Instant::now();
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        p.place(Ticket(1), request(1), &members, now);
        report_assigned(&mut p, a.clone(), 3 * need(), RunnerStatus::Ready);
        p.tick(&members, now);
        assert!(p.ready(now).answers[0].1.is_ok());
        let (id, _) = only_instance(&p);

        for attempt in 1..=RETRY_BUDGET {
            // The node says it cannot run it.
            let failing = instance(&id, RunnerStatus::Failed, Some("disk full"));
            p.report(report(a.clone(), 4 * need(), vec![failing]))
                .unwrap();
            p.tick(&members, now);
            let (_, i) = only_instance(&p);
            assert_eq!(i.attempts, attempt);
            if attempt == RETRY_BUDGET {
                assert!(
                    matches!(&i.state, PlanState::Failed { reason } if reason.contains("disk full")),
                    "{:?}",
                    i.state
                );
                break;
            }
            assert_eq!(i.node, None);
            // Not before its backoff (1 s doubling)...
            let wait = Duration::from_secs(1 << attempt);
            p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
            p.tick(&members, now + wait - Duration::from_millis(1));
            assert_eq!(only_instance(&p).1.node, None, "placed before the backoff");
            // ... then on the only node there is, though it failed it.
            now += wait;
            p.tick(&members, now);
            assert_eq!(only_instance(&p).1.node, Some(a.clone()));
        }

        // A Ready instance starts its budget again.
        let mut p = planner(Some(p.plan().clone()), &members);
        p.plan.instances.values_mut().for_each(|i| {
            i.state = PlanState::Active;
            i.node = Some(a.clone());
        });
        p.report(report(
            a.clone(),
            0,
            vec![instance(&id, RunnerStatus::Ready, None)],
        ))
        .unwrap();
        p.tick(&members, now);
        let attempts = only_instance(&p).1.attempts;
        assert!(attempts > 0, "not yet: it has been Ready for no time");
        p.tick(&members, now + STABLE_FOR / 2);
        assert_eq!(only_instance(&p).1.attempts, attempts);
        p.tick(&members, now + STABLE_FOR);
        assert_eq!(only_instance(&p).1.attempts, 0, "Ready for STABLE_FOR");
    }

    #[test]
    fn an_instance_that_keeps_failing_after_it_is_ready_spends_its_budget() {
        let a = node(1);
        let members = Members::new(a.clone(), [], 1);
        let mut p = planner(None, &members);
        let mut now = Instant::now();
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        p.place(Ticket(1), request(1), &members, now);
        report_assigned(&mut p, a.clone(), 3 * need(), RunnerStatus::Ready);
        p.tick(&members, now);
        assert!(p.ready(now).answers[0].1.is_ok());
        let (id, _) = only_instance(&p);
        // Serve a moment, die, be placed again: over and over.
        for round in 1..=RETRY_BUDGET {
            let dying = instance(&id, RunnerStatus::Failed, Some("its runner kept dying"));
            p.report(report(a.clone(), 4 * need(), vec![dying]))
                .unwrap();
            p.tick(&members, now);
            assert_eq!(only_instance(&p).1.attempts, round);
            if round == RETRY_BUDGET {
                break;
            }
            now += Duration::from_secs(31);
            p.tick(&members, now);
            assert_eq!(only_instance(&p).1.node, Some(a.clone()), "placed again");
            report_assigned(&mut p, a.clone(), 3 * need(), RunnerStatus::Ready);
            p.tick(&members, now);
            now += Duration::from_secs(5);
            p.tick(&members, now);
        }
        assert!(
            matches!(&only_instance(&p).1.state, PlanState::Failed { reason } if reason.contains("kept dying")),
            "{:?}",
            only_instance(&p).1
        );
    }

    #[test]
    fn a_retried_placement_with_its_request_id_never_places_twice() {
        let a = node(1);
        let members = Members::new(a.clone(), [], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a.clone(), 8 * need(), vec![])).unwrap();
        let keyed = |key: &str, instances: usize| PlaceRequest {
            request_id: Some(key.into()),
            ..request(instances)
        };
        p.place(Ticket(1), keyed("k-1", 2), &members, now);
        let first = assigned(&p, &a);
        assert_eq!(first.len(), 2);
        // The client lost the answer (say the master died) and retries: same instances.
        p.place(Ticket(2), keyed("k-1", 2), &members, now);
        assert_eq!(assigned(&p, &a), first, "the retry placed more");
        report_assigned(&mut p, a.clone(), 6 * need(), RunnerStatus::Ready);
        p.tick(&members, now);
        let answers = p.ready(now).answers;
        assert_eq!(answers.len(), 2, "{answers:?}");
        for (_, answer) in &answers {
            let mut ids: Vec<String> = answer
                .clone()
                .expect("placed")
                .into_iter()
                .map(|i| i.id)
                .collect();
            ids.sort();
            assert_eq!(ids, first);
        }
        // The key names that placement: another request under it is refused, clearly.
        p.place(Ticket(3), keyed("k-1", 1), &members, now);
        let answers = p.ready(now).answers;
        assert!(
            matches!(&answers[..], [(Ticket(3), Err(PlaceError::Invalid(why)))] if why.contains("k-1")),
            "{answers:?}"
        );
        // A new leader inherits the keys with the plan.
        let mut next = planner(Some(p.plan().clone()), &members);
        next.report(report(a.clone(), 6 * need(), vec![])).unwrap();
        report_assigned(&mut next, a.clone(), 6 * need(), RunnerStatus::Ready);
        next.place(Ticket(4), keyed("k-1", 2), &members, now);
        assert_eq!(assigned(&next, &a), first);
        // A key of a placement that failed (its instances were deleted) places anew.
        next.place(Ticket(5), keyed("k-2", 1), &members, now);
        let failed = assigned(&next, &a)
            .into_iter()
            .find(|id| !first.contains(id))
            .expect("k-2's instance");
        next.report(report(
            a.clone(),
            6 * need(),
            vec![instance(&failed, RunnerStatus::Failed, Some("cannot load"))],
        ))
        .unwrap();
        next.tick(&members, now);
        let _ = next.ready(now);
        next.place(Ticket(6), keyed("k-2", 1), &members, now);
        let again = assigned(&next, &a);
        // The two of k-1 and a new one of k-2 (the failed one is deleted).
        assert_eq!(again.len(), 3, "{again:?}");
        assert!(!again.contains(&failed), "{again:?}");
        // Keys are checked like every field.
        for bad in ["", "has space", &"k".repeat(129)] {
            next.place(Ticket(7), keyed(bad, 1), &members, now);
            let answers = next.ready(now).answers;
            assert!(
                answers
                    .iter()
                    .any(|(t, a)| *t == Ticket(7) && matches!(a, Err(PlaceError::Invalid(_)))),
                "{bad:?}: {answers:?}"
            );
        }
    }

    #[test]
    fn a_waited_for_placement_fails_at_its_first_error_and_is_removed() {
        let (a, b) = (node(1), node(2));
        let members = Members::new(a.clone(), [b.clone()], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        p.report(report(b.clone(), 4 * need(), vec![])).unwrap();
        p.place(Ticket(5), request(2), &members, now);
        let on_a = assigned(&p, &a);
        p.report(report(
            a.clone(),
            4 * need(),
            vec![instance(
                &on_a[0],
                RunnerStatus::Failed,
                Some("cannot load"),
            )],
        ))
        .unwrap();
        report_assigned(&mut p, b.clone(), 3 * need(), RunnerStatus::Ready);
        p.tick(&members, now);
        let answers = p.ready(now).answers;
        match &answers[..] {
            [
                (
                    Ticket(5),
                    Err(PlaceError::Failed {
                        instance, reason, ..
                    }),
                ),
            ] => {
                assert_eq!(instance, &on_a[0]);
                assert!(reason.contains("cannot load"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            p.plan()
                .instances
                .values()
                .all(|i| i.state == PlanState::Deleted),
            "a failed placement left an instance"
        );
    }

    #[test]
    fn a_placement_not_ready_in_time_times_out_and_is_removed() {
        let a = node(1);
        let members = Members::new(a.clone(), [], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        let mut r = request(1);
        r.wait_secs = 10;
        p.place(Ticket(1), r, &members, now);
        report_assigned(&mut p, a.clone(), 3 * need(), RunnerStatus::Loading);
        p.tick(&members, now + Duration::from_secs(9));
        assert!(p.ready(now).answers.is_empty());
        p.tick(&members, now + Duration::from_secs(10));
        assert!(matches!(
            &p.ready(now).answers[..],
            [(Ticket(1), Err(PlaceError::Timeout(10)))]
        ));
        assert_eq!(only_instance(&p).1.state, PlanState::Deleted);
    }

    #[test]
    fn deleted_instances_are_pruned_once_no_node_reports_them() {
        let a = node(1);
        let members = Members::new(a.clone(), [], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        p.place(Ticket(1), request(1), &members, now);
        report_assigned(&mut p, a.clone(), 3 * need(), RunnerStatus::Ready);
        p.tick(&members, now);
        let (id, _) = only_instance(&p);
        assert_eq!(p.delete(&id), Ok(()));
        assert_eq!(p.delete(&id), Err(PlaceError::NoSuchInstance(id.clone())));
        assert_eq!(
            p.delete("nothing"),
            Err(PlaceError::NoSuchInstance("nothing".into()))
        );
        p.ready(now);
        // Still reported (the node has not stopped it yet): kept past the prune age.
        p.report(report(
            a.clone(),
            0,
            vec![instance(&id, RunnerStatus::Ready, None)],
        ))
        .unwrap();
        p.ready(now + PRUNE_AFTER);
        assert_eq!(only_instance(&p).1.state, PlanState::Deleted);
        // Stopped: pruned.
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        p.ready(now + PRUNE_AFTER + Duration::from_secs(1));
        assert!(p.plan().instances.is_empty());
    }

    #[test]
    fn a_new_leaders_first_plan_waits_for_the_reports() {
        let (a, b) = (node(1), node(2));
        let members = Members::new(a.clone(), [b.clone()], 2);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.tick(&members, now);
        assert!(
            p.ready(now).publish.is_none(),
            "published before any report"
        );
        p.report(report(a.clone(), need(), vec![])).unwrap();
        p.tick(&members, now + Duration::from_millis(500));
        assert!(
            p.ready(now + Duration::from_millis(500)).publish.is_none(),
            "published before b reported"
        );
        p.report(report(
            b.clone(),
            need(),
            vec![instance("m-1", RunnerStatus::Ready, None)],
        ))
        .unwrap();
        p.tick(&members, now + Duration::from_secs(1));
        let first = p
            .ready(now + Duration::from_secs(1))
            .publish
            .expect("published");
        assert_eq!(
            first.reports.len(),
            2,
            "the first plan carries every report"
        );
        assert!(first.status_of("m-1").is_some());

        // A member that never reports holds the first plan back only for the grace.
        let mut p = planner(None, &members);
        p.tick(&members, now);
        p.report(report(a, need(), vec![])).unwrap();
        p.tick(&members, now + REPORT_GRACE - Duration::from_millis(1));
        assert!(
            p.ready(now + REPORT_GRACE - Duration::from_millis(1))
                .publish
                .is_none()
        );
        assert!(p.ready(now + REPORT_GRACE).publish.is_some());
    }

    #[test]
    fn the_plan_is_published_on_change_and_when_due() {
        let a = node(1);
        let members = Members::new(a.clone(), [], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        p.tick(&members, now);
        assert_eq!(p.ready(now).publish.map(|p| p.version), Some(1));
        assert!(p.ready(now + REPUBLISH / 2).publish.is_none());
        let again = p.ready(now + REPUBLISH).publish.expect("republished");
        assert_eq!(again.version, 1, "an unchanged plan keeps its version");
        // A node's memory changed: a change of the plan.
        p.report(report(a, 2 * need(), vec![])).unwrap();
        p.tick(&members, now + REPUBLISH);
        let changed = p
            .ready(now + REPUBLISH)
            .publish
            .expect("a change is published");
        assert_eq!(changed.version, 2);
        assert_eq!(changed.nodes.len(), 1);
        // A newer term starts the versions again.
        p.tick(&Members::new(node(1), [], 2), now + REPUBLISH);
        let newer = p.ready(now + REPUBLISH).publish.expect("published");
        assert_eq!((newer.term, newer.version), (2, 1));
    }

    #[test]
    fn leaving_office_answers_every_waiting_request() {
        let (a, b) = (node(1), node(2));
        let members = Members::new(a.clone(), [b], 1);
        let mut p = planner(None, &members);
        let now = Instant::now();
        p.place(Ticket(1), request(1), &members, now); // deferred: nobody reported
        p.report(report(a.clone(), 4 * need(), vec![])).unwrap();
        p.tick(&members, now + REPORT_GRACE);
        p.place(Ticket(2), request(1), &members, now + REPORT_GRACE); // deferred again
        let mut answers = p.abdicate();
        answers.sort_by_key(|(t, _)| *t);
        assert!(matches!(
            &answers[..],
            [
                (Ticket(1), Err(PlaceError::NoLeader)),
                (Ticket(2), Err(PlaceError::NoLeader))
            ]
        ));
    }

    #[test]
    fn ids_are_readable_and_safe() {
        assert_eq!(slug("/models/Qwen2.5 0.5B_Q4.gguf"), "qwen2.5-0.5b-q4");
        assert_eq!(slug("qwen2.5-0.5b-instruct"), "qwen2.5-0.5b-instruct");
        assert_eq!(slug("é.GGUF"), "-");
    }
}
