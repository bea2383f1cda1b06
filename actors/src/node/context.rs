//! [`NodeContext`]: what the node gives a user's child actor, so that an actor that follows
//! the node's events, registers with introspection and places models takes a screenful.
//!
//! ```ignore
//! let builder = Node::builder(config);
//! let ctx = builder.context(); // one per child: it holds that child's place in the events
//! let node = builder
//!     .child(ChildSpec::actor("my-actor", || MyActor, ctx))
//!     .start()
//!     .await?;
//!
//! // In MyActor (type Msg = Followed), every incarnation:
//! async fn pre_start(&self, myself: ActorRef<Followed>, ctx: NodeContext) -> ... {
//!     let registration = ctx.register(&myself, "my-actor");
//!     let following = ctx.follow(&myself, Some); // keep both in the state
//!     ...
//! }
//! async fn handle(&self, _: ActorRef<Followed>, item: Followed, state: &mut State) -> ... {
//!     // ... act on the event, then:
//!     if let Followed::Event(event) = &item {
//!         state.ctx.ack(event.id);
//!     }
//! }
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use canopy_runtime::introspect::{self, Registration};
use futures::StreamExt;
use ractor::{ActorCell, ActorRef, Message};
use serde_json::json;
use tokio::task::JoinHandle;

use super::builder::Placer;
use super::router::ModelRouter;
use crate::api::Metrics;
use crate::events::{EventLog, Followed};

/// What the node gives one of its user actors: the node's placer, router, metrics and event
/// log, the introspection registration, and a subscription to the node's events that
/// survives the actor's restarts.
///
/// Get one from [`NodeBuilder::context`](super::NodeBuilder::context) (before the node
/// starts, for a child added with [`NodeBuilder::child`](super::NodeBuilder::child)) or
/// [`NodeHandle::context`](super::NodeHandle::context), and put it in the child's start
/// arguments: every incarnation gets a clone, and **clones share one cursor** (the id of the
/// last event the actor acknowledged, kept outside the actor). So:
///
/// - [`follow`](Self::follow) delivers every event after the last acknowledged one, in
///   order, then each new one: an event recorded while the actor is down or being restarted
///   is delivered to the next incarnation, and so is one that was delivered to an
///   incarnation that ended before acknowledging it.
/// - [`ack`](Self::ack) after handling an event: an acknowledged event is never delivered
///   again. Delivery is *at least once*: an incarnation that ends between handling an event
///   and acknowledging it has that event delivered again to the next one (acknowledge
///   before acting for *at most once*). An actor that fails on an event, incarnation after
///   incarnation, is stopped by its restart budget; acknowledge it before failing to skip it.
/// - Events that the node's bounded history dropped before they could be delivered (the
///   actor was down or behind for longer than the history holds) arrive as one
///   [`Followed::Missed`] with their count.
///
/// One context per child, and one [`follow`](Self::follow) per incarnation: two followers
/// sharing a cursor would acknowledge each other's events. In a cluster the log holds every
/// node's events (filter on [`Event::node`](crate::events::Event::node) for this node's own).
/// Cheap to clone.
#[derive(Clone)]
pub struct NodeContext {
    placer: Placer,
    router: ModelRouter,
    metrics: Metrics,
    acked: Arc<AtomicU64>,
}

impl std::fmt::Debug for NodeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeContext")
            .field("acked", &self.acked())
            .finish_non_exhaustive()
    }
}

impl NodeContext {
    /// A context whose subscription starts after the newest event the node holds now.
    pub(super) fn new(placer: Placer, router: ModelRouter, metrics: Metrics) -> Self {
        let acked = Arc::new(AtomicU64::new(router.events().last_id()));
        Self {
            placer,
            router,
            metrics,
            acked,
        }
    }

    /// Starts and stops model instances on this node.
    pub fn placer(&self) -> &Placer {
        &self.placer
    }

    /// The node's routing table: its instances and their state (also the API's backend).
    pub fn router(&self) -> &ModelRouter {
        &self.router
    }

    /// The node's metrics (what `/metrics` serves).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The node's event log: what `GET /v1/events` serves, and where a user actor can record
    /// events of its own ([`EventLog::note`]).
    pub fn events(&self) -> &EventLog {
        self.router.events()
    }

    /// Registers the actor `cell` with introspection as `kind`, so that `canopy inspect`,
    /// `/state` and the dashboard show it in the node's tree. Its details say where its
    /// subscription stands (`events_acked`); replace them with
    /// [`Registration::set_details`]. Call it in `pre_start` and keep the registration in the
    /// actor's state: dropping it, however the actor ends, deregisters the actor.
    pub fn register(&self, cell: &ActorCell, kind: impl Into<String>) -> Registration {
        let registration = introspect::register(cell, kind);
        let acked = self.acked.clone();
        registration.set_details(Arc::new(
            move || json!({ "events_acked": acked.load(Ordering::Acquire) }),
        ));
        registration
    }

    /// Casts to `actor`, in order, every event of the node's log after the last acknowledged
    /// one, then each new one as it is recorded, as the message `to_msg` makes of it (`None`
    /// skips it; an actor whose message type is [`Followed`] passes `Some`). Call it in
    /// `pre_start` and keep the returned [`Following`] in the actor's state; the deliveries
    /// stop when it is dropped, or once the actor is gone.
    pub fn follow<M: Message>(
        &self,
        actor: &ActorRef<M>,
        mut to_msg: impl FnMut(Followed) -> Option<M> + Send + 'static,
    ) -> Following {
        let events = self.events().follow(self.acked());
        let actor = actor.clone();
        Following(tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(item) = events.next().await {
                if let Some(message) = to_msg(item)
                    && actor.cast(message).is_err()
                {
                    break;
                }
            }
        }))
    }

    /// Acknowledges event `id` as handled, and with it every event before it: no later
    /// [`follow`](Self::follow) delivers them again. The cursor only moves forward (an older
    /// id changes nothing) and never past the newest event the node holds.
    pub fn ack(&self, id: u64) {
        let id = id.min(self.events().last_id());
        self.acked.fetch_max(id, Ordering::AcqRel);
    }

    /// The id of the last event acknowledged (where the next [`follow`](Self::follow)
    /// resumes; at first, the newest event the node held when the context was made).
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }
}

/// The deliveries of one [`NodeContext::follow`]: dropping it (with the actor's state,
/// however the actor ends) stops them.
#[derive(Debug)]
pub struct Following(JoinHandle<()>);

impl Drop for Following {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use canopy_runtime::process::CommandLine;
    use ractor::{Actor, ActorProcessingErr, ActorRef};
    use tokio::sync::mpsc;

    use super::*;
    use crate::api::ApiConfig;
    use crate::node::{Node, NodeConfig, RunnerDefaults};

    /// Sends the id of each event it is delivered to the test, and acknowledges it if told to.
    struct Probe;

    type ProbeArgs = (NodeContext, mpsc::UnboundedSender<u64>, bool);

    impl Actor for Probe {
        type Msg = Followed;
        type State = (ProbeArgs, Following);
        type Arguments = ProbeArgs;

        async fn pre_start(
            &self,
            myself: ActorRef<Followed>,
            args: ProbeArgs,
        ) -> Result<Self::State, ActorProcessingErr> {
            let following = args.0.follow(&myself, Some);
            Ok((args, following))
        }

        async fn handle(
            &self,
            _: ActorRef<Followed>,
            item: Followed,
            ((ctx, seen, ack), _): &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            if let Followed::Event(event) = item {
                let _ = seen.send(event.id);
                if *ack {
                    ctx.ack(event.id);
                }
            }
            Ok(())
        }
    }

    fn context() -> NodeContext {
        let config = NodeConfig {
            api: ApiConfig::default(),
            runners: RunnerDefaults::new(CommandLine::new("/nonexistent/canopy")),
            placements: Vec::new(),
        };
        Node::builder(config).context()
    }

    /// Starts a probe (an incarnation of one child) on `ctx`; returns it and what it is
    /// delivered.
    async fn incarnation(
        ctx: &NodeContext,
        ack: bool,
    ) -> (ActorRef<Followed>, mpsc::UnboundedReceiver<u64>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (actor, _) = Actor::spawn(None, Probe, (ctx.clone(), tx, ack))
            .await
            .expect("the probe starts");
        (actor, rx)
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<u64>) -> u64 {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("an event is delivered")
            .expect("the probe runs")
    }

    /// Nothing more is delivered for a while.
    async fn quiet(rx: &mut mpsc::UnboundedReceiver<u64>) {
        let more = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await;
        assert!(more.is_err(), "delivered again: {more:?}");
    }

    #[tokio::test]
    async fn each_incarnation_resumes_after_the_last_acknowledged_event() {
        let ctx = context();
        let log = ctx.events().clone();
        let first = log.note("test", "before the child starts", false);

        let (actor, mut seen) = incarnation(&ctx, true).await;
        assert_eq!(next(&mut seen).await, first, "held events are replayed");
        let second = log.note("test", "while it runs", false);
        assert_eq!(next(&mut seen).await, second);
        quiet(&mut seen).await;
        assert_eq!(ctx.acked(), second);
        actor.kill_and_wait(None).await.expect("the probe dies");

        // Recorded while no incarnation runs: delivered to the next one, and only it.
        let down = log.note("test", "while it is down", false);
        let (actor, mut seen) = incarnation(&ctx, false).await;
        assert_eq!(next(&mut seen).await, down);
        quiet(&mut seen).await;
        actor.kill_and_wait(None).await.expect("the probe dies");

        // That incarnation never acknowledged it: at least once, it is delivered again.
        let (actor, mut seen) = incarnation(&ctx, true).await;
        assert_eq!(next(&mut seen).await, down);
        quiet(&mut seen).await;
        actor
            .stop_and_wait(None, None)
            .await
            .expect("the probe stops");
        assert_eq!(ctx.acked(), down);
    }

    #[tokio::test]
    async fn the_cursor_only_moves_forward_and_never_past_the_newest_event() {
        let ctx = context();
        let copy = ctx.clone();
        let newest = ctx.events().note("test", "one", false);
        ctx.events().note("test", "two", false);
        copy.ack(newest);
        assert_eq!(ctx.acked(), newest, "clones share the cursor");
        ctx.ack(newest - 1);
        assert_eq!(ctx.acked(), newest, "an older id changes nothing");
        ctx.ack(u64::MAX);
        assert_eq!(ctx.acked(), ctx.events().last_id());

        // A context made later starts after what the node holds then.
        assert_eq!(context().acked(), 0);
        let later = NodeContext::new(ctx.placer.clone(), ctx.router.clone(), ctx.metrics.clone());
        assert_eq!(later.acked(), ctx.events().last_id());
        assert_ne!(later.acked(), 0);
    }
}
