//! `ModelRouter`: the node's [`Backend`]: which instances exist, which are Ready, and where a
//! task goes.
//!
//! The router never holds an `ActorRef` to a runner supervisor: a supervisor restarted by the
//! worker is a new actor. It finds the live one by name (`runner:<instance>` in ractor's
//! registry) at each request, and knows each instance's status from the supervisors'
//! [`RunnerEvent`]s, which each supervisor hands to the router's
//! [`observer`](ModelRouter::observer) before it broadcasts them (so the table is never behind
//! what a client saw), and answering `/ready` or picking an instance never waits on an actor. A task goes to the Ready instance of its model with the fewest tasks handed out by
//! this router (ties broken round-robin); an instance at capacity is skipped, and when every
//! Ready instance is full the request is `Busy`.

use crate::events::{EventBody, EventLog};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use canopy_proto::{GenerateRequest, RunnerStatus};
use canopy_runtime::introspect::ActorReport;
use futures::FutureExt;
use futures::future::BoxFuture;
use ractor::{ActorCell, ActorRef};
use tokio::sync::watch;

use super::describe::Describer;
use crate::api::{
    Backend, ClusterActors, ClusterState, LocalInstanceView, LocalState, Metrics, ModelDetails,
    ModelInfo, StateView, SubmitError,
};
use crate::placement::{PlaceError, PlaceRequest, Placed};
use crate::runner::{RunnerError, RunnerEvent, RunnerMsg, RunnerObserver, TaskHandle};

/// Instances on other nodes: what the cluster layer plugs into the router so that a request
/// for a model with no Ready instance here is served by one elsewhere.
pub trait Remote: Send + Sync + 'static {
    /// Models with an instance on another node.
    fn models(&self) -> Vec<ModelInfo>;

    /// Whether a model has a Ready instance on another node.
    fn ready(&self) -> bool;

    /// Submits a task to a Ready instance of `model` on another node.
    fn submit(
        &self,
        model: &str,
        request: GenerateRequest,
    ) -> BoxFuture<'static, Result<TaskHandle, SubmitError>>;

    /// The cluster's state for `GET /state`, given this node's own.
    fn state(&self, local: LocalState) -> BoxFuture<'static, ClusterState>;

    /// Every node's actor tree, given this node's own.
    fn actors(&self, local: Option<ActorReport>) -> BoxFuture<'static, ClusterActors>;

    /// Places instances through the cluster's leader (`POST /instances`).
    fn place(&self, request: PlaceRequest) -> BoxFuture<'static, Result<Vec<Placed>, PlaceError>>;

    /// Deletes an instance through the cluster's leader (`DELETE /instances/{id}`).
    fn delete(&self, instance: String) -> BoxFuture<'static, Result<(), PlaceError>>;
}

/// One instance on this node, as the cluster layer reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalInstance {
    /// The instance id.
    pub id: String,
    /// Its model.
    pub model: String,
    /// Its runner's status.
    pub status: RunnerStatus,
    /// The runner's pid.
    pub pid: Option<u32>,
    /// Runner restarts.
    pub restarts: u32,
    /// The last runner failure.
    pub last_failure: Option<String>,
    /// Why its model could not be loaded, if that happened.
    pub load_error: Option<String>,
    /// Why its runner supervisor gave up (the runner died more often than its restart
    /// intensity allows), until a new one starts it.
    pub gave_up: Option<String>,
    /// What it loads (a path or a catalogue name).
    pub source: String,
}

/// The registry name of the runner supervisor of `instance` on the node tagged `node_tag`
/// (ractor's registry is process-wide; the tag keeps two nodes in one process apart).
pub fn runner_actor_name(node_tag: &str, instance: &str) -> String {
    format!("runner:{node_tag}:{instance}")
}

/// One placed instance, as the router sees it.
#[derive(Debug, Clone)]
struct Instance {
    model: String,
    status: RunnerStatus,
    pid: Option<u32>,
    restarts: u32,
    placed_at: u64,
    last_failure: Option<String>,
    load_error: Option<String>,
    gave_up: Option<String>,
    source: String,
}

#[derive(Default)]
struct Table {
    instances: BTreeMap<String, Instance>,
}

/// The node's routing table and [`Backend`]. Cheap to clone.
#[derive(Clone)]
pub struct ModelRouter {
    table: Arc<Mutex<Table>>,
    /// Bumped on every status change, so waiters for readiness wake up.
    changed: watch::Sender<u64>,
    next: Arc<AtomicUsize>,
    root: Arc<Mutex<Option<ActorCell>>>,
    submit_timeout: Duration,
    tag: Arc<str>,
    remote: Arc<Mutex<Option<Arc<dyn Remote>>>>,
    metrics: Metrics,
    describer: Describer,
    events: EventLog,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ModelRouter {
    /// An empty router that feeds `metrics` with the runner events it observes (see
    /// [`observer`](Self::observer)).
    pub fn new(metrics: Metrics, node_tag: String) -> Self {
        let (changed, _) = watch::channel(0);
        Self {
            table: Arc::new(Mutex::new(Table::default())),
            changed,
            next: Arc::new(AtomicUsize::new(0)),
            root: Arc::new(Mutex::new(None)),
            submit_timeout: Duration::from_secs(60),
            tag: node_tag.into(),
            remote: Arc::new(Mutex::new(None)),
            metrics,
            describer: Describer::default(),
            events: EventLog::default(),
        }
    }

    /// The node's event log (runner events are recorded in it by [`observer`](Self::observer)).
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// What this node's runner supervisors call with each of their events, before they
    /// broadcast it: the routing table (and so `/ready` and routing) and the metrics follow
    /// a supervisor in step, never behind it.
    pub fn observer(&self) -> RunnerObserver {
        let router = self.clone();
        Arc::new(move |event: &RunnerEvent| {
            router.metrics.runner_event(event);
            // A Ready runner turns Running and back with every request: state, not events.
            let busy_toggle = match event {
                RunnerEvent::StatusChanged { instance, status } => {
                    let before = router.lock().instances.get(instance).map(|i| i.status);
                    let idle_or_busy = |s: Option<RunnerStatus>| {
                        matches!(s, Some(RunnerStatus::Ready | RunnerStatus::Running))
                    };
                    idle_or_busy(before) && idle_or_busy(Some(*status))
                }
                _ => false,
            };
            router.observe(event);
            if !busy_toggle && let Some((instance, body)) = EventBody::from_runner(event) {
                router.events.record(format!("worker/{instance}"), body);
            }
        })
    }

    /// The registry name of `instance`'s runner supervisor on this node.
    pub fn actor_name(&self, instance: &str) -> String {
        runner_actor_name(&self.tag, instance)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        match self.table.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The node's root actor, once started.
    pub(crate) fn root_cell(&self) -> Option<ActorCell> {
        self.root.lock().ok().and_then(|r| r.clone())
    }

    /// Sets the actor whose tree `GET /v1/actors` reports (the node's root).
    pub fn set_root(&self, root: ActorCell) {
        if let Ok(mut r) = self.root.lock() {
            *r = Some(root);
        }
    }

    /// Plugs in the instances of other nodes.
    pub fn set_remote(&self, remote: Arc<dyn Remote>) {
        if let Ok(mut r) = self.remote.lock() {
            *r = Some(remote);
        }
        self.notify_changed();
    }

    fn remote(&self) -> Option<Arc<dyn Remote>> {
        self.remote.lock().ok().and_then(|r| r.clone())
    }

    /// Wakes requests waiting for a Ready instance (the cluster calls it when remote
    /// statuses change).
    pub fn notify_changed(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    /// Whether `instance` is placed on this node.
    pub fn has_instance(&self, instance: &str) -> bool {
        self.lock().instances.contains_key(instance)
    }

    /// This node's instances.
    pub fn local_instances(&self) -> Vec<LocalInstance> {
        self.lock()
            .instances
            .iter()
            .map(|(id, i)| LocalInstance {
                id: id.clone(),
                model: i.model.clone(),
                status: i.status,
                pid: i.pid,
                restarts: i.restarts,
                last_failure: i.last_failure.clone(),
                load_error: i.load_error.clone(),
                gave_up: i.gave_up.clone(),
                source: i.source.clone(),
            })
            .collect()
    }

    /// The live tree of this node's actors (none before the node's supervisor is up).
    pub fn local_actors(&self) -> Option<ActorReport> {
        let root = self.root.lock().ok().and_then(|r| r.clone())?;
        Some(canopy_runtime::introspect::tree(&root))
    }

    /// Records a newly placed instance of `model`, loaded from `source` (a path or a
    /// catalogue name: what another node would resolve to run it too).
    pub fn add_instance(&self, instance: &str, model: &str, source: &str) {
        self.lock().instances.insert(
            instance.to_string(),
            Instance {
                model: model.to_string(),
                status: RunnerStatus::Idle,
                pid: None,
                restarts: 0,
                placed_at: now_secs(),
                last_failure: None,
                load_error: None,
                gave_up: None,
                source: source.to_string(),
            },
        );
        self.changed.send_modify(|n| *n += 1);
    }

    /// Forgets an instance (it was removed), its per-instance gauges included.
    pub fn remove_instance(&self, instance: &str) {
        self.lock().instances.remove(instance);
        self.metrics.forget_instance(instance);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Marks an instance failed for good (its supervisor gave up).
    pub fn instance_failed(&self, instance: &str, why: &str) {
        if let Some(i) = self.lock().instances.get_mut(instance) {
            i.status = RunnerStatus::Failed;
            i.last_failure = Some(why.to_string());
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn observe(&self, event: &RunnerEvent) {
        if matches!(event, RunnerEvent::BatchChanged { .. }) {
            // Batch reports change neither readiness nor routing: nobody to wake.
            return;
        }
        {
            let mut table = self.lock();
            match event {
                RunnerEvent::StatusChanged { instance, status } => {
                    if let Some(i) = table.instances.get_mut(instance) {
                        i.status = *status;
                    }
                }
                RunnerEvent::Started {
                    instance,
                    pid,
                    restarts,
                } => {
                    if let Some(i) = table.instances.get_mut(instance) {
                        i.pid = Some(*pid);
                        i.restarts = *restarts;
                        i.gave_up = None;
                    }
                }
                RunnerEvent::LoadFailed { instance, error } => {
                    if let Some(i) = table.instances.get_mut(instance) {
                        i.status = RunnerStatus::Failed;
                        i.pid = None;
                        i.load_error = Some(error.clone());
                        i.last_failure = Some(format!("cannot load the model: {error}"));
                    }
                }
                RunnerEvent::RunnerFailed {
                    instance,
                    reason,
                    will_restart,
                    ..
                } => {
                    if let Some(i) = table.instances.get_mut(instance) {
                        i.status = RunnerStatus::Failed;
                        i.pid = None;
                        i.last_failure = Some(reason.to_string());
                        if !will_restart {
                            i.gave_up = Some(format!("its runner kept dying: {reason}"));
                        }
                    }
                }
                RunnerEvent::BatchChanged { .. } => {}
            }
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Ready instances of `model`, rotated for round-robin; `Err` if the model is unknown.
    fn candidates(&self, model: &str) -> Result<Vec<String>, SubmitError> {
        let table = self.lock();
        let mut known = false;
        let mut ready = Vec::new();
        for (name, i) in &table.instances {
            if i.model == model {
                known = true;
                if matches!(i.status, RunnerStatus::Ready | RunnerStatus::Running) {
                    ready.push(name.clone());
                }
            }
        }
        if !known {
            return Err(SubmitError::UnknownModel(model.to_string()));
        }
        if !ready.is_empty() {
            let k = self.next.fetch_add(1, Ordering::Relaxed) % ready.len();
            ready.rotate_left(k);
        }
        Ok(ready)
    }

    async fn submit_now(
        &self,
        model: &str,
        request: &GenerateRequest,
    ) -> Result<TaskHandle, SubmitError> {
        let local = self.submit_local(model, request).await;
        let Some(remote) = self.remote() else {
            return local;
        };
        match local {
            Err(
                ref why @ (SubmitError::UnknownModel(_)
                | SubmitError::NoReadyInstance(_)
                | SubmitError::Busy(_)),
            ) => match remote.submit(model, request.clone()).await {
                Ok(handle) => Ok(handle),
                // Nothing elsewhere either: the local verdict stands, unless the model is
                // only known elsewhere.
                Err(SubmitError::UnknownModel(_)) => local,
                Err(remote_err) => match why {
                    SubmitError::UnknownModel(_) => Err(remote_err),
                    SubmitError::Busy(_) => local,
                    _ => Err(remote_err),
                },
            },
            other => other,
        }
    }

    /// Submits to a Ready instance of `model` on this node only (what a task routed here
    /// from another node uses, so that it never travels further).
    pub async fn submit_local(
        &self,
        model: &str,
        request: &GenerateRequest,
    ) -> Result<TaskHandle, SubmitError> {
        let candidates = self.candidates(model)?;
        if candidates.is_empty() {
            return Err(SubmitError::NoReadyInstance(model.to_string()));
        }
        let mut busy = false;
        for instance in candidates {
            let Some(cell) = ractor::registry::where_is(self.actor_name(&instance)) else {
                continue;
            };
            let actor: ActorRef<RunnerMsg> = cell.into();
            let request = request.clone();
            let answer = actor
                .call(
                    |reply| RunnerMsg::Submit { request, reply },
                    Some(self.submit_timeout),
                )
                .await;
            match answer {
                Ok(ractor::rpc::CallResult::Success(Ok(handle))) => return Ok(handle),
                Ok(ractor::rpc::CallResult::Success(Err(RunnerError::QueueFull { .. }))) => {
                    busy = true;
                }
                Ok(ractor::rpc::CallResult::Success(Err(RunnerError::NotReady { .. }))) => {}
                Ok(ractor::rpc::CallResult::Success(Err(err))) => {
                    return Err(SubmitError::Runner(err));
                }
                // A timeout (or, for a remote actor, a closed channel) or a dead actor:
                // try the next instance.
                Ok(_) | Err(_) => {
                    tracing::warn!(%instance, "runner supervisor did not answer a submit");
                }
            }
        }
        if busy {
            Err(SubmitError::Busy(model.to_string()))
        } else {
            Err(SubmitError::NoReadyInstance(model.to_string()))
        }
    }

    async fn submit_waiting(
        self,
        model: String,
        request: GenerateRequest,
        wait_ready: Option<Duration>,
    ) -> Result<TaskHandle, SubmitError> {
        let Some(wait) = wait_ready else {
            return self.submit_now(&model, &request).await;
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = self.changed.subscribe();
        loop {
            changed.mark_unchanged();
            match self.submit_now(&model, &request).await {
                Err(SubmitError::NoReadyInstance(_)) => {}
                other => return other,
            }
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(SubmitError::NoReadyInstance(model));
            }
        }
    }

    /// Every `every`, asks each runner supervisor for its snapshot and records the age of its
    /// runner's last heartbeat in `metrics`; ends when `alive` returns false.
    pub(crate) async fn report_heartbeat_lag(
        self,
        metrics: Metrics,
        every: Duration,
        alive: impl Fn() -> bool,
    ) {
        let mut tick = tokio::time::interval(every);
        while alive() {
            tick.tick().await;
            let names: Vec<String> = self.lock().instances.keys().cloned().collect();
            for instance in names {
                let Some(cell) = ractor::registry::where_is(self.actor_name(&instance)) else {
                    continue;
                };
                let actor: ActorRef<RunnerMsg> = cell.into();
                if let Ok(ractor::rpc::CallResult::Success(snap)) =
                    actor.call(RunnerMsg::Snapshot, Some(every)).await
                    && let Some(age) = snap.last_heartbeat_age
                {
                    metrics.heartbeat_lag(&instance, age);
                }
            }
        }
    }

    /// This node's instances, for `GET /state`.
    pub fn local_state(&self) -> LocalState {
        let table = self.lock();
        let instances = table
            .instances
            .iter()
            .map(|(name, i)| LocalInstanceView {
                instance: name.clone(),
                model: i.model.clone(),
                status: i.status.to_string(),
                pid: i.pid,
                restarts: i.restarts,
                last_failure: i.last_failure.clone(),
            })
            .collect();
        LocalState { instances }
    }
}

impl Backend for ModelRouter {
    fn models(&self) -> Vec<ModelInfo> {
        let table = self.lock();
        let mut models: BTreeMap<String, ModelInfo> = BTreeMap::new();
        for i in table.instances.values() {
            let ready = matches!(i.status, RunnerStatus::Ready | RunnerStatus::Running);
            let entry = models.entry(i.model.clone()).or_insert_with(|| ModelInfo {
                id: i.model.clone(),
                created: i.placed_at,
                owned_by: "canopy".into(),
                ready: false,
            });
            entry.ready |= ready;
            entry.created = entry.created.min(i.placed_at);
        }
        drop(table);
        if let Some(remote) = self.remote() {
            for m in remote.models() {
                let entry = models.entry(m.id.clone()).or_insert_with(|| m.clone());
                entry.ready |= m.ready;
                entry.created = entry.created.min(m.created);
            }
        }
        models.into_values().collect()
    }

    fn ready(&self) -> bool {
        let local = self
            .lock()
            .instances
            .values()
            .any(|i| matches!(i.status, RunnerStatus::Ready | RunnerStatus::Running));
        local || self.remote().is_some_and(|r| r.ready())
    }

    fn submit(
        &self,
        model: &str,
        request: GenerateRequest,
        wait_ready: Option<Duration>,
    ) -> BoxFuture<'static, Result<TaskHandle, SubmitError>> {
        self.clone()
            .submit_waiting(model.to_string(), request, wait_ready)
            .boxed()
    }

    fn model_details(&self, model: &str) -> BoxFuture<'static, Option<ModelDetails>> {
        let info = self.models().into_iter().find(|m| m.id == model);
        // A local instance's source, preferring a Ready one (all of a model's instances
        // normally load the same file).
        let source = {
            let table = self.lock();
            let mut of_model: Vec<&Instance> = table
                .instances
                .values()
                .filter(|i| i.model == model)
                .collect();
            of_model
                .sort_by_key(|i| !matches!(i.status, RunnerStatus::Ready | RunnerStatus::Running));
            of_model.first().map(|i| i.source.clone())
        };
        let describer = self.describer.clone();
        async move {
            let info = info?;
            let file = match source {
                Some(source) => describer.describe(&source).await,
                None => None,
            };
            Some(ModelDetails { info, file })
        }
        .boxed()
    }

    fn state(&self) -> BoxFuture<'static, StateView> {
        let local = self.local_state();
        match self.remote() {
            Some(remote) => remote
                .state(local)
                .map(|cluster| StateView::Cluster(Box::new(cluster)))
                .boxed(),
            None => async move { StateView::Local(local) }.boxed(),
        }
    }

    fn actors(&self) -> BoxFuture<'static, Option<ActorReport>> {
        let tree = self.local_actors();
        async move { tree }.boxed()
    }

    fn events(&self) -> Option<EventLog> {
        Some(self.events.clone())
    }

    fn cluster_actors(&self) -> Option<BoxFuture<'static, ClusterActors>> {
        let tree = self.local_actors();
        self.remote().map(|r| r.actors(tree))
    }

    fn place(&self, request: PlaceRequest) -> BoxFuture<'static, Result<Vec<Placed>, PlaceError>> {
        match self.remote() {
            Some(remote) => remote.place(request),
            None => async { Err(PlaceError::Standalone) }.boxed(),
        }
    }

    fn delete_instance(&self, instance: String) -> BoxFuture<'static, Result<(), PlaceError>> {
        match self.remote() {
            Some(remote) => remote.delete(instance),
            None => async { Err(PlaceError::Standalone) }.boxed(),
        }
    }
}
