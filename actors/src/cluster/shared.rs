//! What the cluster layer shares between its actor and the router: the newest plan this node
//! has seen, the streams of tasks it sent to other nodes, the tasks it serves for other
//! nodes, and [`ClusterRoutes`], the router's [`Remote`].
//!
//! A cross-node stream always ends (the private `streams` module says how): the host
//! forwards its task's failure like its output, stops and cancels the task when it cannot
//! send, and sends [`AppMsg::Progress`] every [`PROGRESS_EVERY`] it has nothing else to send;
//! the origin ends a stream it heard nothing about for [`STREAM_DEADLINE`] with
//! [`RunnerError::StreamLost`], and one whose host left the cluster with `PeerLost`.

mod streams;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use canopy_proto::{GenerateRequest, RunnerStatus};
use canopy_runtime::cluster::{ClusterHandle, ClusterView, NodeId};
use canopy_runtime::introspect::ActorReport;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::protocol::{
    self, AppMsg, DeleteAnswer, PlaceAnswer, PlaceError, PlaceRequest, Placed, Plan, PlanState,
    SubmitAnswer, decode, encode,
};
use crate::api::{
    ClusterActors, ClusterState, InstanceView, LocalState, ModelInfo, NodeActors, NodeView,
    SubmitError,
};
use crate::node::{ModelRouter, Remote};
use crate::runner::{RunnerError, TaskEvent, TaskHandle};
use streams::{Delivery, Forwarded, Served, Streams};

/// How long a node waits for another to acknowledge a task.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(65);

/// How long a host forwards nothing for a task before it tells the origin that the task
/// still runs ([`AppMsg::Progress`]).
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How long the origin of a cross-node stream waits for word from its host (an event or a
/// [`AppMsg::Progress`]) before it ends the stream with
/// [`RunnerError::StreamLost`] and cancels the task.
///
/// The deadline bounds the link and the host's forwarding, not the task: while the task runs,
/// its host sends word at least every [`PROGRESS_EVERY`], however long a prefill or a queue
/// takes, and the runner's own stall timeouts (30 s to acknowledge, 300 s of prefill, 60 s
/// between tokens: `StallTimeouts`) end a task that stops making progress, a failure that is
/// forwarded like any other. So the deadline is seven progress messages missed in a row (a
/// live host, however loaded, misses none: the cluster drops a node whose beats stop for
/// about two seconds), and a quarter of the decode stall, so that a broken stream ends before
/// a stalled runner would be noticed. Without the progress messages it would have to exceed
/// the 300-s prefill stall, and a broken stream would hang that long.
pub const STREAM_DEADLINE: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Inner {
    plan: Option<Plan>,
    streams: Streams,
    served: Served,
}

/// The cluster layer's shared state. Cheap to clone.
#[derive(Clone)]
pub struct Shared {
    cluster: ClusterHandle,
    router: ModelRouter,
    inner: Arc<Mutex<Inner>>,
    rotation: Arc<AtomicUsize>,
}

fn is_ready(status: RunnerStatus) -> bool {
    matches!(status, RunnerStatus::Ready | RunnerStatus::Running)
}

impl Shared {
    /// Shared state for a node talking through `cluster`, serving through `router`.
    pub fn new(cluster: ClusterHandle, router: ModelRouter) -> Self {
        Self {
            cluster,
            router,
            inner: Arc::new(Mutex::new(Inner::default())),
            rotation: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The cluster handle.
    pub fn cluster(&self) -> &ClusterHandle {
        &self.cluster
    }

    /// The newest plan seen.
    pub fn plan(&self) -> Option<Plan> {
        self.lock().plan.clone()
    }

    /// Stores `plan` if it is newer than the one held; returns whether it was.
    pub fn offer_plan(&self, plan: Plan) -> bool {
        let mut inner = self.lock();
        let newer = inner.plan.as_ref().is_none_or(|old| {
            plan.newer_than(old) || plan.leader != old.leader && plan.term >= old.term
        });
        if newer {
            inner.plan = Some(plan);
        }
        drop(inner);
        if newer {
            self.router.notify_changed();
        }
        newer
    }

    /// Hands an event of stream `key`, sent by node `from`, to its waiter: only the node the
    /// stream was sent to may feed or end it.
    pub fn deliver(&self, from: &NodeId, key: u64, event: TaskEvent) {
        let running = matches!(event, TaskEvent::Chunk(_));
        let delivery = self
            .lock()
            .streams
            .deliver(from, key, event, Instant::now());
        self.delivered(from, key, delivery, running);
    }

    /// Takes node `from`'s word that the task of stream `key` still runs there.
    pub fn progress(&self, from: &NodeId, key: u64) {
        let delivery = self.lock().streams.progress(from, key, Instant::now());
        self.delivered(from, key, delivery, true);
    }

    /// Logs a message about a stream that was dropped; a host still `running` a task for a
    /// stream this node no longer has (it ended here: deadline, client gone) is told to
    /// cancel it, so that it does not run to its end for nobody.
    fn delivered(&self, from: &NodeId, key: u64, delivery: Delivery, running: bool) {
        match delivery {
            Delivery::Taken | Delivery::Ended => {}
            Delivery::NotTheHost => {
                tracing::warn!(peer = %from.short(), "dropped an event for a stream another node serves");
            }
            Delivery::Unknown => {
                tracing::debug!(peer = %from.short(), key,
                    "dropped a message about a stream this node does not have (ended, or never sent)");
                if running {
                    self.send_cancel(from, key);
                }
            }
        }
    }

    /// Tells `host` to cancel the task of stream `key` (best effort).
    fn send_cancel(&self, host: &NodeId, key: u64) {
        match encode(&AppMsg::Cancel { key }) {
            Ok(msg) => {
                if let Err(err) = self.cluster.send(host, msg) {
                    tracing::debug!(node = %host.short(), %err, "cannot cancel a task on its host");
                }
            }
            Err(err) => tracing::error!(%err, "cannot cancel a task on its host"),
        }
    }

    /// Fails every stream served by a node that is no longer in `view`, and stops serving
    /// every task for an origin that is gone.
    pub fn forget_lost(&self, view: &ClusterView) {
        let mut inner = self.lock();
        for host in inner.streams.lose_hosts(|n| view.contains(n)) {
            tracing::warn!(node = %host.short(), "a node serving a task left: failing the task");
        }
        let stopped = inner.served.keep_origins(|n| view.contains(n));
        if stopped > 0 {
            tracing::info!(
                tasks = stopped,
                "the origin of tasks served here left: cancelled them"
            );
        }
    }

    /// Serves a task another node sent here: submits it locally, answers, and forwards its
    /// events to `origin` until it ends or `origin` cancels it.
    ///
    /// The task is registered before this returns, so that a `Cancel` the agent handles
    /// after this `Submit` always finds it, however far the task got.
    pub fn serve(
        &self,
        origin: NodeId,
        key: u64,
        model: String,
        request: GenerateRequest,
        reply: ractor::RpcReplyPort<Vec<u8>>,
    ) {
        let mut inner = self.lock();
        if inner.served.contains(&origin, key) {
            drop(inner);
            tracing::warn!(peer = %origin.short(), "refused a task under the key of one served for it already");
            protocol::reply(
                reply,
                &SubmitAnswer::Err(SubmitError::Runner(RunnerError::TaskFailed {
                    instance: model,
                    message: "a task under this stream key is served already".into(),
                    kind: canopy_proto::TaskErrorKind::Internal,
                })),
            );
            return;
        }
        let serial = inner.served.next_serial();
        let shared = self.clone();
        let task = tokio::spawn({
            let origin = origin.clone();
            async move {
                shared.run_served(&origin, key, model, request, reply).await;
                // Not before it is registered: that holds the lock this takes.
                shared.lock().served.finished(&origin, key, serial);
            }
        });
        inner
            .served
            .insert(origin, key, serial, task.abort_handle());
    }

    /// The task `serve` registered: submit, answer, forward.
    async fn run_served(
        &self,
        origin: &NodeId,
        key: u64,
        model: String,
        request: GenerateRequest,
        reply: ractor::RpcReplyPort<Vec<u8>>,
    ) {
        let handle = match self.router.submit_local(&model, &request).await {
            Ok(handle) => handle,
            Err(err) => {
                protocol::reply(reply, &SubmitAnswer::Err(err));
                return;
            }
        };
        if !protocol::reply(reply, &SubmitAnswer::Ok(())) {
            // The origin gave up waiting: dropping the handle cancels the task.
            return;
        }
        let me = self.cluster.view().me;
        let outcome = streams::forward(key, handle, PROGRESS_EVERY, me.as_str(), |msg| {
            self.cluster.send(origin, msg)
        })
        .await;
        if let Forwarded::SendFailed(err) = outcome {
            tracing::warn!(peer = %origin.short(), %err,
                "cannot send a task's output to the node that sent the task: cancelled the task");
        }
    }

    /// Cancels a task served here for `origin`.
    pub fn cancel_served(&self, origin: NodeId, key: u64) {
        if !self.lock().served.cancel(&origin, key) {
            tracing::debug!(peer = %origin.short(), key,
                "a cancel for a task not served here (it ended, or was never sent)");
        }
    }

    async fn submit_remote(
        self,
        model: String,
        request: GenerateRequest,
    ) -> Result<TaskHandle, SubmitError> {
        let view = self.cluster.view();
        let me = view.me.clone();
        let (known, mut hosts) = {
            let inner = self.lock();
            let Some(plan) = &inner.plan else {
                return Err(SubmitError::UnknownModel(model));
            };
            let mut known = false;
            let mut hosts: Vec<NodeId> = Vec::new();
            for (id, planned) in &plan.instances {
                if planned.model != model || planned.state != PlanState::Active {
                    continue;
                }
                known = true;
                if let Some((node, report)) = plan.status_of(id)
                    && *node != me
                    && view.contains(node)
                    && is_ready(report.status)
                    && !hosts.contains(node)
                {
                    hosts.push(node.clone());
                }
            }
            (known, hosts)
        };
        if !known {
            return Err(SubmitError::UnknownModel(model));
        }
        if !hosts.is_empty() {
            let k = self.rotation.fetch_add(1, Ordering::Relaxed) % hosts.len();
            hosts.rotate_left(k);
        }
        let mut busy = false;
        for host in hosts {
            // Unguessable, so that no node can address another node's streams by counting.
            let key = loop {
                let key = rand::random::<u64>();
                if key != 0 && !self.lock().streams.contains(key) {
                    break key;
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            let lost = self
                .lock()
                .streams
                .open(key, host.clone(), tx.clone(), Instant::now());
            let opening = Opening {
                shared: self.clone(),
                key,
                cancel_on_drop: true,
            };
            let msg = AppMsg::Submit {
                key,
                model: model.clone(),
                request: request.clone(),
            };
            // A host that leaves the cluster meanwhile (dies, freezes) answers no more: do not
            // wait out the call's limit for it.
            let answer: Result<SubmitAnswer, String> = tokio::select! {
                answer = call_peer(&self.cluster, &host, &msg, SUBMIT_TIMEOUT) => answer,
                () = lost.notified() => Err("it left the cluster".into()),
            };
            match answer {
                Ok(Ok(())) => {
                    opening.taken();
                    self.lock().streams.restart_deadline(key, Instant::now());
                    tokio::spawn(self.clone().watch(key, tx));
                    return Ok(TaskHandle {
                        task_id: key,
                        events: rx,
                    });
                }
                Ok(Err(err)) => {
                    // Refused: nothing runs there.
                    opening.refused();
                    match err {
                        SubmitError::Busy(_) => busy = true,
                        SubmitError::NoReadyInstance(_) | SubmitError::UnknownModel(_) => {}
                        other => return Err(other),
                    }
                }
                Err(err) => {
                    // The host may have taken the task after all (an answer too late): the
                    // opening's drop cancels it there.
                    drop(opening);
                    tracing::warn!(node = %host.short(), %err, "a node did not take a task");
                }
            }
        }
        if busy {
            Err(SubmitError::Busy(model))
        } else {
            Err(SubmitError::NoReadyInstance(model))
        }
    }

    /// Watches stream `key` (whose consumer holds the receiver of `tx`) until it ends: when
    /// the consumer goes away, it closes the stream and cancels the task at the host; when
    /// the host says nothing about it for [`STREAM_DEADLINE`], it ends it with
    /// `StreamLost` and cancels the task there.
    async fn watch(self, key: u64, tx: mpsc::UnboundedSender<TaskEvent>) {
        loop {
            let Some(deadline) = self.lock().streams.deadline(key, STREAM_DEADLINE) else {
                return;
            };
            tokio::select! {
                () = tx.closed() => {
                    let host = self.lock().streams.close(key);
                    if let Some(host) = host {
                        self.send_cancel(&host, key);
                    }
                    return;
                }
                () = tokio::time::sleep_until(deadline.into()) => {
                    let expired = self
                        .lock()
                        .streams
                        .expire(key, Instant::now(), STREAM_DEADLINE);
                    if let Some(host) = expired {
                        tracing::warn!(node = %host.short(), deadline_s = STREAM_DEADLINE.as_secs(),
                            "a node serving a task sent nothing about it within the deadline: failing the task");
                        self.send_cancel(&host, key);
                        return;
                    }
                }
            }
        }
    }

    fn cluster_state(&self, local: LocalState) -> ClusterState {
        let view = self.cluster.view();
        let plan = self.plan();
        let mut ids: Vec<(&NodeId, std::net::SocketAddr)> = vec![(&view.me, view.addr)];
        ids.extend(view.members.iter().map(|m| (&m.id, m.addr)));
        let nodes = ids
            .into_iter()
            .map(|(id, addr)| {
                let planned = plan.as_ref().and_then(|p| p.nodes.get(id));
                NodeView {
                    id: id.to_string(),
                    cluster_addr: Some(addr.to_string()),
                    api: planned.and_then(|n| n.api).map(|a| a.to_string()),
                    mem_available: planned.map(|n| n.mem_available),
                    master: view.leader.as_ref() == Some(id),
                    is_self: *id == view.me,
                }
            })
            .collect();
        let instances = plan.as_ref().map_or_else(Vec::new, |plan| {
            plan.instances
                .iter()
                .filter(|(_, p)| p.state != PlanState::Deleted)
                .map(|(id, p)| {
                    let report = plan.status_of(id).map(|(_, r)| r);
                    InstanceView {
                        id: id.clone(),
                        model: p.model.clone(),
                        node: p.node.as_ref().map(|n| n.to_string()),
                        state: match &p.state {
                            PlanState::Active => "active".to_string(),
                            PlanState::Deleted => "deleted".to_string(),
                            PlanState::Failed { reason } => format!("failed: {reason}"),
                        },
                        status: report
                            .map_or_else(|| "Placing".to_string(), |r| r.status.to_string()),
                        pid: report.and_then(|r| r.pid),
                        restarts: report.map_or(0, |r| r.restarts),
                        last_failure: report.and_then(|r| r.last_failure.clone()),
                        attempts: p.attempts,
                    }
                })
                .collect()
        });
        ClusterState {
            node: view.me.to_string(),
            master: view.leader.as_ref().map(|l| l.to_string()),
            term: view.term,
            quorum: view.quorum,
            plan_version: plan.as_ref().map(|p| p.version),
            nodes,
            instances,
            local,
        }
    }
}

/// A stream whose `Submit` is under way. Dropped unsettled (the caller stopped waiting, or
/// the call failed), it closes the stream and cancels the task at the host, which may have
/// taken it all the same: `Backend::submit` promises that a dropped submission leaves no task
/// running.
struct Opening {
    shared: Shared,
    key: u64,
    cancel_on_drop: bool,
}

impl Opening {
    /// The host took the task: the stream stays open.
    fn taken(mut self) {
        self.cancel_on_drop = false;
    }

    /// The host refused the task: the stream closes, with nothing to cancel.
    fn refused(mut self) {
        self.cancel_on_drop = false;
        self.shared.lock().streams.close(self.key);
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if self.cancel_on_drop {
            let host = self.shared.lock().streams.close(self.key);
            if let Some(host) = host {
                self.shared.send_cancel(&host, self.key);
            }
        }
    }
}

/// The router's view of other nodes' instances.
#[derive(Clone)]
pub struct ClusterRoutes {
    shared: Shared,
}

impl ClusterRoutes {
    /// Routes over `shared`.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }
}

impl Remote for ClusterRoutes {
    fn models(&self) -> Vec<ModelInfo> {
        let Some(plan) = self.shared.plan() else {
            return Vec::new();
        };
        let mut models: HashMap<String, ModelInfo> = HashMap::new();
        for (id, p) in &plan.instances {
            if p.state != PlanState::Active {
                continue;
            }
            let ready = plan.status_of(id).is_some_and(|(_, r)| is_ready(r.status));
            let entry = models.entry(p.model.clone()).or_insert_with(|| ModelInfo {
                id: p.model.clone(),
                created: canopy_runtime::cluster::now_ms() / 1000,
                owned_by: "canopy".into(),
                ready: false,
            });
            entry.ready |= ready;
        }
        models.into_values().collect()
    }

    fn ready(&self) -> bool {
        let view = self.shared.cluster.view();
        self.shared.plan().is_some_and(|plan| {
            plan.instances.keys().any(|id| {
                plan.status_of(id)
                    .is_some_and(|(node, r)| view.contains(node) && is_ready(r.status))
            })
        })
    }

    fn submit(
        &self,
        model: &str,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<TaskHandle, SubmitError>> {
        self.shared
            .clone()
            .submit_remote(model.to_string(), request)
            .boxed()
    }

    fn state(&self, local: LocalState) -> BoxFuture<'static, ClusterState> {
        let state = self.shared.cluster_state(local);
        async move { state }.boxed()
    }

    fn actors(&self, local: Option<ActorReport>) -> BoxFuture<'static, ClusterActors> {
        let cluster = self.shared.cluster.clone();
        async move {
            let view = cluster.view();
            let mut nodes = vec![NodeActors {
                node: view.me.to_string(),
                master: view.is_leader(),
                tree: local,
                error: None,
            }];
            let calls = view.members.iter().map(|m| {
                let cluster = cluster.clone();
                let id = m.id.clone();
                let master = view.leader.as_ref() == Some(&m.id);
                async move {
                    let answer =
                        call_peer::<String>(&cluster, &id, &AppMsg::Actors, Duration::from_secs(3))
                            .await
                            .and_then(|text| {
                                serde_json::from_str::<Option<ActorReport>>(&text)
                                    .map_err(|e| format!("an undecodable actor tree: {e}"))
                            });
                    let (tree, error) = match answer {
                        Ok(tree) => (tree, None),
                        Err(err) => (None, Some(err)),
                    };
                    NodeActors {
                        node: id.to_string(),
                        master,
                        tree,
                        error,
                    }
                }
            });
            nodes.extend(futures::future::join_all(calls).await);
            ClusterActors { nodes }
        }
        .boxed()
    }

    fn place(&self, request: PlaceRequest) -> BoxFuture<'static, Result<Vec<Placed>, PlaceError>> {
        // Checked where it came in (`POST /instances`) and again by the leader's planner.
        let cluster = self.shared.cluster.clone();
        async move {
            let limit = Duration::from_secs(request.wait_secs + 15);
            ask_leader::<PlaceAnswer>(&cluster, &AppMsg::Place(request), limit, |leader, e| {
                leader_failed(leader, format!("the leader did not answer: {e}"))
            })
            .await?
        }
        .boxed()
    }

    fn delete(&self, instance: String) -> BoxFuture<'static, Result<(), PlaceError>> {
        let cluster = self.shared.cluster.clone();
        async move {
            let msg = AppMsg::Delete { instance };
            ask_leader::<DeleteAnswer>(&cluster, &msg, Duration::from_secs(30), |_, _| {
                PlaceError::NoLeader
            })
            .await?
        }
        .boxed()
    }
}

/// Sends `msg` to `to` and decodes its answer; why there is none (it did not encode, the call
/// failed, the answer is garbled) as text.
async fn call_peer<T: serde::de::DeserializeOwned>(
    cluster: &ClusterHandle,
    to: &NodeId,
    msg: &AppMsg,
    limit: Duration,
) -> Result<T, String> {
    let msg = encode(msg).map_err(|e| e.to_string())?;
    let bytes = cluster
        .call(to, msg, limit)
        .await
        .map_err(|e| e.to_string())?;
    decode(&bytes).map_err(|e| e.to_string())
}

/// A call to the leader about a placement that went wrong for `reason`.
fn leader_failed(leader: &NodeId, reason: String) -> PlaceError {
    PlaceError::Failed {
        instance: "-".into(),
        node: leader.to_string(),
        reason,
    }
}

/// Sends `msg` to the leader and decodes its answer; a call that gets none is
/// `unanswered(leader, why)`.
async fn ask_leader<T: serde::de::DeserializeOwned>(
    cluster: &ClusterHandle,
    msg: &AppMsg,
    limit: Duration,
    unanswered: impl FnOnce(&NodeId, canopy_runtime::cluster::ClusterError) -> PlaceError,
) -> Result<T, PlaceError> {
    let leader = cluster.view().leader.ok_or(PlaceError::NoLeader)?;
    let msg = encode(msg).map_err(|e| leader_failed(&leader, e.to_string()))?;
    let bytes = cluster
        .call(&leader, msg, limit)
        .await
        .map_err(|e| unanswered(&leader, e))?;
    decode(&bytes)
        .map_err(|e| leader_failed(&leader, format!("the leader's answer is garbled: {e}")))
}
