//! What the cluster layer shares between its actor and the router: the newest plan this node
//! has seen, the streams of tasks it sent to other nodes, the tasks it serves for other
//! nodes, and [`ClusterRoutes`], the router's [`Remote`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use canopy_proto::{GenerateRequest, RunnerStatus};
use canopy_runtime::cluster::{ClusterHandle, ClusterView, NodeId};
use canopy_runtime::introspect::ActorReport;
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

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

/// How long a node waits for another to acknowledge a task.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(65);

struct Stream {
    host: NodeId,
    tx: mpsc::UnboundedSender<TaskEvent>,
    started: bool,
}

#[derive(Default)]
struct Inner {
    plan: Option<Plan>,
    streams: HashMap<u64, Stream>,
    served: HashMap<(NodeId, u64), AbortHandle>,
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
        let mut inner = self.lock();
        let end = matches!(event, TaskEvent::Done { .. } | TaskEvent::Failed(_));
        match inner.streams.get_mut(&key) {
            Some(stream) if stream.host == *from => {}
            Some(_) => {
                tracing::warn!(peer = %from.short(), "dropped an event for a stream another node serves");
                return;
            }
            None => return,
        }
        if let Some(stream) = inner.streams.get_mut(&key) {
            if matches!(event, TaskEvent::Chunk(_)) {
                stream.started = true;
            }
            let _ = stream.tx.send(event);
        }
        if end {
            inner.streams.remove(&key);
        }
    }

    /// Fails every stream served by a node that is no longer in `view`, and stops serving
    /// every task for an origin that is gone.
    pub fn forget_lost(&self, view: &ClusterView) {
        let mut inner = self.lock();
        let lost: Vec<u64> = inner
            .streams
            .iter()
            .filter(|(_, s)| !view.contains(&s.host))
            .map(|(k, _)| *k)
            .collect();
        for key in lost {
            if let Some(s) = inner.streams.remove(&key) {
                tracing::warn!(node = %s.host.short(), "a node serving a task left: failing the task");
                let _ = s.tx.send(TaskEvent::Failed(RunnerError::PeerLost {
                    node: s.host.to_string(),
                    started: s.started,
                }));
            }
        }
        inner.served.retain(|(origin, _), task| {
            let keep = view.contains(origin);
            if !keep {
                task.abort();
            }
            keep
        });
    }

    /// Serves a task another node sent here: submits it locally, answers, and forwards its
    /// events to `origin` until it ends or `origin` cancels it.
    pub fn serve(
        &self,
        origin: NodeId,
        key: u64,
        model: String,
        request: GenerateRequest,
        reply: ractor::RpcReplyPort<Vec<u8>>,
    ) {
        let shared = self.clone();
        tokio::spawn(async move {
            let handle = match shared.router.submit_local(&model, &request).await {
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
            let forward = {
                let shared = shared.clone();
                let origin = origin.clone();
                tokio::spawn(async move {
                    let mut handle: TaskHandle = handle;
                    while let Some(event) = handle.next().await {
                        let end = matches!(event, TaskEvent::Done { .. } | TaskEvent::Failed(_));
                        let (msg, end) = match encode(&AppMsg::Event { key, event }) {
                            Ok(msg) => (msg, end),
                            Err(err) => {
                                // End the origin's stream with the reason rather than leave
                                // it waiting for events that will never come.
                                tracing::error!(%err, "cannot forward a task event");
                                let failed = TaskEvent::Failed(RunnerError::TaskFailed {
                                    instance: model.clone(),
                                    message: err.to_string(),
                                    kind: canopy_proto::TaskErrorKind::Internal,
                                });
                                match encode(&AppMsg::Event { key, event: failed }) {
                                    Ok(msg) => (msg, true),
                                    Err(_) => break,
                                }
                            }
                        };
                        if shared.cluster.send(&origin, msg).is_err() || end {
                            break;
                        }
                    }
                    shared.lock().served.remove(&(origin, key));
                })
            };
            shared
                .lock()
                .served
                .insert((origin, key), forward.abort_handle());
        });
    }

    /// Cancels a task served here for `origin`.
    pub fn cancel_served(&self, origin: NodeId, key: u64) {
        if let Some(task) = self.lock().served.remove(&(origin, key)) {
            task.abort();
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
                if key != 0 && !self.lock().streams.contains_key(&key) {
                    break key;
                }
            };
            let (tx, rx) = mpsc::unbounded_channel();
            self.lock().streams.insert(
                key,
                Stream {
                    host: host.clone(),
                    tx: tx.clone(),
                    started: false,
                },
            );
            let msg = AppMsg::Submit {
                key,
                model: model.clone(),
                request: request.clone(),
            };
            let answer: Result<SubmitAnswer, String> =
                call_peer(&self.cluster, &host, &msg, SUBMIT_TIMEOUT).await;
            match answer {
                Ok(Ok(())) => {
                    let shared = self.clone();
                    tokio::spawn(async move {
                        tx.closed().await;
                        let gone = shared.lock().streams.remove(&key);
                        if let Some(stream) = gone
                            && let Ok(msg) = encode(&AppMsg::Cancel { key })
                        {
                            let _ = shared.cluster.send(&stream.host, msg);
                        }
                    });
                    return Ok(TaskHandle {
                        task_id: key,
                        events: rx,
                    });
                }
                Ok(Err(err)) => {
                    self.lock().streams.remove(&key);
                    match err {
                        SubmitError::Busy(_) => busy = true,
                        SubmitError::NoReadyInstance(_) | SubmitError::UnknownModel(_) => {}
                        other => return Err(other),
                    }
                }
                Err(err) => {
                    self.lock().streams.remove(&key);
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
