//! [`Node::builder`]: assembles a node's supervision tree, and [`NodeHandle`] to run it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use canopy_proto::LoadSpec;
use canopy_runtime::restart::Intensity;
use canopy_runtime::supervisor::{
    ChildSpec, Observer, Restart, Shutdown, Strategy, Supervisor, SupervisorArgs, SupervisorError,
    SupervisorEvent, SupervisorMsg,
};
use futures::FutureExt;
use ractor::{Actor, ActorCell, ActorRef, SupervisionEvent};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::config::{NodeConfig, Placement, RunnerDefaults};
use super::context::NodeContext;
use super::router::ModelRouter;
use crate::api::{ApiActor, ApiArgs, ApiMsg, Backend, Metrics};
use crate::cluster::{AgentArgs, ClusterAgent, ClusterRoutes, ClusterSetup, Shared};
use crate::events::{EventBody, EventLog};
use crate::runner::{RunnerEvent, RunnerSupervisor, RunnerSupervisorArgs};

/// The restart budget of each model instance under the worker: a runner supervisor that gives
/// up is started afresh up to 3 times in 5 minutes, then the instance is given up alone.
pub const INSTANCE_INTENSITY: Intensity = Intensity {
    max_restarts: 3,
    period: Duration::from_secs(300),
};
use canopy_runtime::cluster::{ClusterActor, ClusterHandle, cluster_channels};

/// Why a node could not start or be driven.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The supervision tree did not start (e.g. the API address is taken, a runner could not
    /// be spawned).
    #[error("the node could not start: {0}")]
    Start(String),
    /// A placement was refused.
    #[error("cannot place {instance}: {reason}")]
    Place {
        /// The instance.
        instance: String,
        /// Why.
        reason: String,
    },
    /// The node is not running any more.
    #[error("the node is not running")]
    Gone,
    /// The node's supervision tree failed on its own (a child escalated past its restart
    /// intensity, or the root itself failed).
    #[error("the node failed: {0}")]
    Failed(String),
}

/// Entry point: `Node::builder(config)`.
#[derive(Debug, Clone, Copy)]
pub struct Node;

impl Node {
    /// A builder for a node with `config`.
    pub fn builder(config: NodeConfig) -> NodeBuilder {
        static NODES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let events = broadcast::channel(1024).0;
        let metrics = Metrics::new();
        let tag = NODES
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_string();
        let router = ModelRouter::new(metrics.clone(), tag);
        metrics.register(
            "events_dropped",
            "Events dropped from this node's bounded history for room",
            router.events().dropped_counter(),
        );
        NodeBuilder {
            config,
            children: Vec::new(),
            events,
            router,
            metrics,
            cluster: None,
        }
    }
}

/// Assembles a node; add your own actors with [`NodeBuilder::child`].
pub struct NodeBuilder {
    config: NodeConfig,
    children: Vec<ChildSpec>,
    events: broadcast::Sender<RunnerEvent>,
    router: ModelRouter,
    metrics: Metrics,
    cluster: Option<ClusterSetup>,
}

/// Receives the node root's death, so the handle can report how the node ended.
struct Watcher;

impl Actor for Watcher {
    type Msg = ();
    type State = Option<tokio::sync::oneshot::Sender<Result<(), String>>>;
    type Arguments = tokio::sync::oneshot::Sender<Result<(), String>>;

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ractor::ActorProcessingErr> {
        Ok(Some(tx))
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        evt: SupervisionEvent,
        tx: &mut Self::State,
    ) -> Result<(), ractor::ActorProcessingErr> {
        let outcome = match evt {
            SupervisionEvent::ActorFailed(_, err) => Some(Err(err.to_string())),
            SupervisionEvent::ActorTerminated(..) => Some(Ok(())),
            _ => None,
        };
        if let Some(outcome) = outcome {
            if let Some(tx) = tx.take() {
                let _ = tx.send(outcome);
            }
            myself.stop(None);
        }
        Ok(())
    }
}

fn runner_child(
    instance: &str,
    load: LoadSpec,
    defaults: &RunnerDefaults,
    events: &broadcast::Sender<RunnerEvent>,
    router: &ModelRouter,
) -> ChildSpec {
    let args = RunnerSupervisorArgs {
        config: defaults.instance(instance, load),
        events: events.clone(),
        observer: Some(router.observer()),
    };
    let name = router.actor_name(instance);
    ChildSpec::new(name.clone(), move |sup: ActorCell| {
        let args = args.clone();
        let name = name.clone();
        async move {
            let (actor, _) = Actor::spawn_linked(Some(name), RunnerSupervisor, args, sup).await?;
            Ok(actor.get_cell())
        }
        .boxed()
    })
    .with_restart(Restart::Transient)
    // Each instance has its own restart budget: one that keeps failing is given up alone
    // (it stays Failed with its reason; in a cluster the planner moves it), never the worker
    // and with it every other instance of the node.
    .with_intensity(INSTANCE_INTENSITY)
    // A runner supervisor stops its runner gracefully in its own post_stop.
    .with_shutdown(Shutdown::Timeout(Duration::from_secs(15)))
}

/// Starts and stops model instances on this node (under its worker supervisor). The node
/// handle places through it, and so does the cluster layer. Cheap to clone.
#[derive(Clone)]
pub struct Placer {
    router: ModelRouter,
    runners: RunnerDefaults,
    events: broadcast::Sender<RunnerEvent>,
}

impl Placer {
    async fn worker(&self) -> Result<ActorRef<SupervisorMsg>, NodeError> {
        let root: ActorRef<SupervisorMsg> = self.router.root_cell().ok_or(NodeError::Gone)?.into();
        supervisor_child(&root, "worker").await.map(ActorRef::from)
    }

    /// Starts instance `instance` of `model`, loading `load`, under the worker. Answers once
    /// the runner supervisor has started (its runner loads in the background).
    pub async fn start(
        &self,
        instance: &str,
        model: &str,
        load: LoadSpec,
    ) -> Result<(), NodeError> {
        let worker = self.worker().await?;
        self.router.add_instance(instance, model, &load.model);
        let spec = runner_child(instance, load, &self.runners, &self.events, &self.router);
        let answer = worker
            .call(
                |reply| SupervisorMsg::StartChild(spec, reply),
                Some(Duration::from_secs(60)),
            )
            .await;
        match answer {
            Ok(ractor::rpc::CallResult::Success(Ok(_))) => Ok(()),
            Ok(ractor::rpc::CallResult::Success(Err(err))) => {
                self.router.remove_instance(instance);
                Err(NodeError::Place {
                    instance: instance.to_string(),
                    reason: supervisor_error(err),
                })
            }
            _ => {
                self.router.remove_instance(instance);
                Err(NodeError::Gone)
            }
        }
    }

    /// Stops instance `instance` (its runner is asked to exit, then killed if it does not)
    /// and forgets it.
    pub async fn stop(&self, instance: &str) -> Result<(), NodeError> {
        let worker = self.worker().await?;
        let id = self.router.actor_name(instance);
        let limit = Some(Duration::from_secs(30));
        let _ = worker
            .call(
                |reply| SupervisorMsg::TerminateChild(id.clone(), reply),
                limit,
            )
            .await;
        let _ = worker
            .call(|reply| SupervisorMsg::DeleteChild(id.clone(), reply), limit)
            .await;
        self.router.remove_instance(instance);
        Ok(())
    }
}

impl NodeBuilder {
    /// A placer for this node, available before start (for actors added with
    /// [`NodeBuilder::child`] that start and stop instances).
    pub fn placer(&self) -> Placer {
        Placer {
            router: self.router.clone(),
            runners: self.config.runners.clone(),
            events: self.events.clone(),
        }
    }

    /// Makes the node a member of a cluster: it starts the cluster actor (membership,
    /// discovery, heartbeats, election) and the cluster agent (reports, plans, the master
    /// while elected, remote tasks), and its router serves models placed on other nodes.
    pub fn cluster(mut self, setup: ClusterSetup) -> Self {
        self.cluster = Some(setup);
        self
    }

    /// The node's router, available before start.
    pub fn router(&self) -> ModelRouter {
        self.router.clone()
    }

    /// Adds a user actor to the node's tree, after the built-in children. It is supervised
    /// one_for_one under the node with the restart type and shutdown of its spec, and shows
    /// in `canopy inspect` if it registers itself (see [`NodeContext::register`]).
    pub fn child(mut self, spec: ChildSpec) -> Self {
        self.children.push(spec);
        self
    }

    /// A context for one user actor (put it in the arguments of the child's spec): the node's
    /// placer, router, metrics and event log, and an event subscription that starts at the
    /// node's first event and resumes, in every incarnation of the actor, after the last
    /// event it acknowledged. Make one per child; see [`NodeContext`].
    pub fn context(&self) -> NodeContext {
        NodeContext::new(self.placer(), self.router.clone(), self.metrics.clone())
    }

    /// The node's event log, available before the node starts (see [`crate::events`]).
    pub fn events(&self) -> EventLog {
        self.router.events().clone()
    }

    /// The node's runner-event channel, available before the node starts so that a user
    /// actor's start function can capture it and subscribe in every incarnation. (It misses
    /// what happens while the actor is down; [`NodeBuilder::context`] does not.)
    pub fn runner_events(&self) -> broadcast::Sender<RunnerEvent> {
        self.events.clone()
    }

    /// Starts the node: worker (with the configured placements), API, then user actors.
    pub async fn start(self) -> Result<NodeHandle, NodeError> {
        let placer = self.placer();
        let NodeBuilder {
            config,
            children,
            events,
            router,
            metrics,
            cluster,
        } = self;

        let log = router.events().clone();
        let observer = Observer::new(move |event: SupervisorEvent| {
            let path = format!("{}/{}", event.supervisor, event.child);
            log.record(path, EventBody::from_supervisor(event));
        });
        let mut worker = SupervisorArgs::new(Strategy::OneForOne)
            .with_kind("worker")
            .with_observer(observer.clone())
            .with_intensity(Intensity {
                max_restarts: 3,
                period: Duration::from_secs(300),
            });
        // In a cluster, instance ids must be unique across nodes: they carry the node's id.
        let infix = cluster
            .as_ref()
            .map(|c| format!("{}-", c.config.node_id.short()))
            .unwrap_or_default();
        for placement in &config.placements {
            for n in 0..placement.instances {
                let instance = format!("{}-{infix}{n}", placement.model);
                router.add_instance(&instance, &placement.model, &placement.load.model);
                worker = worker.with_child(runner_child(
                    &instance,
                    placement.load.clone(),
                    &config.runners,
                    &events,
                    &router,
                ));
            }
        }

        let backend: Arc<dyn Backend> = Arc::new(router.clone());
        let api_config = config.api.clone();
        let api_metrics = metrics.clone();
        let api = ChildSpec::new("api", move |sup: ActorCell| {
            let args = ApiArgs {
                config: api_config.clone(),
                backend: backend.clone(),
                metrics: api_metrics.clone(),
            };
            async move {
                let (actor, _) = Actor::spawn_linked(None, ApiActor, args, sup).await?;
                Ok(actor.get_cell())
            }
            .boxed()
        })
        .with_shutdown(Shutdown::Timeout(Duration::from_secs(10)));

        let mut root = SupervisorArgs::new(Strategy::OneForOne)
            .with_kind("node")
            .with_observer(observer)
            .with_child(ChildSpec::supervisor("worker", worker));
        let api_addr = Arc::new(std::sync::Mutex::new(None));
        let mut cluster_handle = None;
        if let Some(setup) = cluster {
            let (args, handle, incoming) = cluster_channels(setup.config.clone());
            router.events().set_node(setup.config.node_id.as_str());
            // Membership and election changes become events (subscribed before the cluster
            // actor starts, so the first join is not missed).
            let mut changes = handle.membership_events();
            let log = router.events().clone();
            tokio::spawn(async move {
                use tokio::sync::broadcast::error::RecvError;
                loop {
                    match changes.recv().await {
                        Ok(change) => {
                            log.record("cluster", EventBody::from_membership(change));
                        }
                        Err(RecvError::Lagged(n)) => {
                            log.note(
                                "cluster",
                                format!(
                                    "{n} membership changes were not recorded (too many at once)"
                                ),
                                true,
                            );
                        }
                        Err(RecvError::Closed) => break,
                    }
                }
            });
            let shared = Shared::new(handle.clone(), router.clone());
            router.set_remote(Arc::new(ClusterRoutes::new(shared.clone())));
            let agent = AgentArgs {
                shared,
                incoming: Arc::new(tokio::sync::Mutex::new(incoming)),
                router: router.clone(),
                placer: placer.clone(),
                resolver: setup.resolver.clone(),
                api: api_addr.clone(),
                memory_limit: setup.memory_limit,
            };
            root = root
                .with_child(ChildSpec::actor("cluster", || ClusterActor, args))
                .with_child(ChildSpec::actor("cluster-agent", || ClusterAgent, agent));
            metrics.watch_cluster(handle.clone());
            cluster_handle = Some(handle);
        }
        root = root.with_child(api);
        for child in children {
            root = root.with_child(child);
        }

        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let (watcher, _) = Actor::spawn(None, Watcher, done_tx)
            .await
            .map_err(|e| NodeError::Start(e.to_string()))?;
        let (root, join) = Actor::spawn_linked(None, Supervisor, root, watcher.get_cell())
            .await
            .map_err(|e| {
                watcher.stop(None);
                NodeError::Start(start_error(e))
            })?;
        router.set_root(root.get_cell());
        {
            let cell = root.get_cell();
            tokio::spawn(router.clone().report_heartbeat_lag(
                metrics.clone(),
                Duration::from_secs(1),
                move || cell.get_status() == ractor::ActorStatus::Running,
            ));
        }

        let handle = NodeHandle {
            root,
            join,
            router,
            events,
            metrics,
            placer,
            cluster: cluster_handle,
            done: Some(done_rx),
        };
        let addr = handle.api_addr().await?;
        if let Ok(mut a) = api_addr.lock() {
            *a = Some(addr);
        }
        Ok(handle)
    }
}

/// The running child `id` of supervisor `sup`.
async fn supervisor_child(sup: &ActorRef<SupervisorMsg>, id: &str) -> Result<ActorCell, NodeError> {
    let children = sup
        .call(SupervisorMsg::WhichChildren, Some(Duration::from_secs(10)))
        .await
        .map_err(|_| NodeError::Gone)?;
    let ractor::rpc::CallResult::Success(children) = children else {
        return Err(NodeError::Gone);
    };
    children
        .into_iter()
        .find(|c| c.id == id)
        .and_then(|c| c.cell)
        .ok_or(NodeError::Gone)
}

/// The innermost useful message of a start failure (supervisors wrap their children's).
fn start_error(err: ractor::SpawnErr) -> String {
    let mut message = err.to_string();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    while let Some(s) = source {
        message = s.to_string();
        source = s.source();
    }
    message
}

/// A running node.
pub struct NodeHandle {
    root: ActorRef<SupervisorMsg>,
    join: JoinHandle<()>,
    router: ModelRouter,
    events: broadcast::Sender<RunnerEvent>,
    metrics: Metrics,
    placer: Placer,
    cluster: Option<ClusterHandle>,
    done: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
}

impl NodeHandle {
    /// The node's root actor.
    pub fn root(&self) -> &ActorRef<SupervisorMsg> {
        &self.root
    }

    /// The routing table (also the API's backend).
    pub fn router(&self) -> &ModelRouter {
        &self.router
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Subscribes to the runner supervisors' events.
    pub fn runner_events(&self) -> broadcast::Receiver<RunnerEvent> {
        self.events.subscribe()
    }

    /// The node's event log: what `GET /v1/events` serves.
    pub fn events(&self) -> &EventLog {
        self.router.events()
    }

    /// A context for an actor added to the running node (see [`NodeBuilder::context`]); its
    /// event subscription starts after the newest event the node holds now.
    pub fn context(&self) -> NodeContext {
        NodeContext::new(
            self.placer.clone(),
            self.router.clone(),
            self.metrics.clone(),
        )
    }

    async fn child(&self, id: &str) -> Result<ActorCell, NodeError> {
        supervisor_child(&self.root, id).await
    }

    /// Where the API listens (the real port when configured with port 0).
    pub async fn api_addr(&self) -> Result<SocketAddr, NodeError> {
        let api: ActorRef<ApiMsg> = self.child("api").await?.into();
        match api
            .call(ApiMsg::LocalAddr, Some(Duration::from_secs(10)))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(addr)) => Ok(addr),
            _ => Err(NodeError::Gone),
        }
    }

    /// Places `instances` new instances of `model` on this node.
    pub async fn place(&self, placement: Placement) -> Result<Vec<String>, NodeError> {
        let mut placed = Vec::new();
        for _ in 0..placement.instances {
            let instance = format!("{}-{}", placement.model, rand::random::<u32>());
            self.placer
                .start(&instance, &placement.model, placement.load.clone())
                .await?;
            placed.push(instance);
        }
        Ok(placed)
    }

    /// The node's cluster membership, when it has one.
    pub fn cluster(&self) -> Option<&ClusterHandle> {
        self.cluster.as_ref()
    }

    /// The node's placer (starts and stops instances here).
    pub fn placer(&self) -> &Placer {
        &self.placer
    }

    /// Stops the node in order and waits for it (bounded by `timeout`).
    pub async fn shutdown(self, timeout: Duration) -> Result<(), NodeError> {
        self.root
            .stop_and_wait(Some("shutdown".into()), Some(timeout))
            .await
            .map_err(|_| NodeError::Gone)?;
        let _ = self.join.await;
        Ok(())
    }

    /// Waits until the node ends on its own; [`NodeError::Failed`] with the reason if it failed.
    /// Cancel-safe: a `wait` dropped before the node ends can be called again.
    pub async fn wait(&mut self) -> Result<(), NodeError> {
        let outcome = match &mut self.done {
            Some(done) => done.await.unwrap_or(Ok(())),
            None => return Ok(()),
        };
        self.done = None;
        outcome.map_err(NodeError::Failed)
    }
}

fn supervisor_error(err: SupervisorError) -> String {
    let mut message = err.to_string();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(&err);
    while let Some(s) = source {
        message = format!("{message}: {s}");
        source = s.source();
    }
    message
}
