//! [`Node::builder`]: assembles a node's supervision tree, and [`NodeHandle`] to run it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use canopy_proto::LoadSpec;
use canopy_runtime::restart::Intensity;
use canopy_runtime::supervisor::{
    ChildSpec, Restart, Shutdown, Strategy, Supervisor, SupervisorArgs, SupervisorError,
    SupervisorMsg,
};
use futures::FutureExt;
use ractor::{Actor, ActorCell, ActorRef, SupervisionEvent};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::config::{NodeConfig, Placement, RunnerDefaults};
use super::router::ModelRouter;
use crate::api::{ApiActor, ApiArgs, ApiMsg, Backend, Metrics};
use crate::runner::{RunnerEvent, RunnerSupervisor, RunnerSupervisorArgs};

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
}

/// Entry point: `Node::builder(config)`.
#[derive(Debug, Clone, Copy)]
pub struct Node;

impl Node {
    /// A builder for a node with `config`.
    pub fn builder(config: NodeConfig) -> NodeBuilder {
        static NODES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NodeBuilder {
            config,
            children: Vec::new(),
            events: broadcast::channel(1024).0,
            tag: NODES
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_string(),
        }
    }
}

/// Assembles a node; add your own actors with [`NodeBuilder::child`].
pub struct NodeBuilder {
    config: NodeConfig,
    children: Vec<ChildSpec>,
    events: broadcast::Sender<RunnerEvent>,
    /// Distinguishes this node's registry names from another node's in the same process.
    tag: String,
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
    name: &str,
    instance: &str,
    load: LoadSpec,
    defaults: &RunnerDefaults,
    events: &broadcast::Sender<RunnerEvent>,
) -> ChildSpec {
    let args = RunnerSupervisorArgs {
        config: defaults.instance(instance, load),
        events: events.clone(),
    };
    let name = name.to_string();
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
    // A runner supervisor stops its runner gracefully in its own post_stop.
    .with_shutdown(Shutdown::Timeout(Duration::from_secs(15)))
}

impl NodeBuilder {
    /// Adds a user actor to the node's tree, after the built-in children. It is supervised
    /// one_for_one under the node with the restart type and shutdown of its spec, and shows
    /// in `canopy inspect` if it registers itself with `canopy_runtime::introspect`.
    pub fn child(mut self, spec: ChildSpec) -> Self {
        self.children.push(spec);
        self
    }

    /// The node's runner-event channel, available before the node starts so that a user
    /// actor's start function can capture it and subscribe in every incarnation.
    pub fn runner_events(&self) -> broadcast::Sender<RunnerEvent> {
        self.events.clone()
    }

    /// Starts the node: worker (with the configured placements), API, then user actors.
    pub async fn start(self) -> Result<NodeHandle, NodeError> {
        let NodeBuilder {
            config,
            children,
            events,
            tag,
        } = self;
        let metrics = Metrics::new();
        let router = ModelRouter::new(&events, metrics.clone(), tag);

        let mut worker = SupervisorArgs::new(Strategy::OneForOne)
            .with_kind("worker")
            .with_intensity(Intensity {
                max_restarts: 3,
                period: Duration::from_secs(300),
            });
        for placement in &config.placements {
            for n in 0..placement.instances {
                let instance = format!("{}-{n}", placement.model);
                router.add_instance(&instance, &placement.model);
                worker = worker.with_child(runner_child(
                    &router.actor_name(&instance),
                    &instance,
                    placement.load.clone(),
                    &config.runners,
                    &events,
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
            .with_child(ChildSpec::supervisor("worker", worker))
            .with_child(api);
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
            runners: config.runners,
            done: Some(done_rx),
        };
        handle.api_addr().await?;
        Ok(handle)
    }
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
    runners: RunnerDefaults,
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

    async fn child(&self, id: &str) -> Result<ActorCell, NodeError> {
        let children = self
            .root
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
        let worker: ActorRef<SupervisorMsg> = self.child("worker").await?.into();
        let mut placed = Vec::new();
        for _ in 0..placement.instances {
            let instance = format!("{}-{}", placement.model, rand::random::<u32>());
            self.router.add_instance(&instance, &placement.model);
            let spec = runner_child(
                &self.router.actor_name(&instance),
                &instance,
                placement.load.clone(),
                &self.runners,
                &self.events,
            );
            let answer = worker
                .call(
                    |reply| SupervisorMsg::StartChild(spec, reply),
                    Some(Duration::from_secs(60)),
                )
                .await;
            match answer {
                Ok(ractor::rpc::CallResult::Success(Ok(_))) => placed.push(instance),
                Ok(ractor::rpc::CallResult::Success(Err(err))) => {
                    self.router.remove_instance(&instance);
                    return Err(NodeError::Place {
                        instance,
                        reason: supervisor_error(err),
                    });
                }
                _ => {
                    self.router.remove_instance(&instance);
                    return Err(NodeError::Gone);
                }
            }
        }
        Ok(placed)
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

    /// Waits until the node ends on its own; `Err` with the reason if it failed.
    /// Cancel-safe: a `wait` dropped before the node ends can be called again.
    pub async fn wait(&mut self) -> Result<(), String> {
        let outcome = match &mut self.done {
            Some(done) => done.await.unwrap_or(Ok(())),
            None => return Ok(()),
        };
        self.done = None;
        outcome
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
