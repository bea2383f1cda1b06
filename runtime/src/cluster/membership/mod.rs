//! `ClusterActor`: this node's membership in the cluster, on `ractor_cluster`.
//!
//! It owns the `NodeServer` (bound to the explicit address it is given, authenticated by the
//! cluster cookie), the node's [inbox](super::wire::InboxMsg) (the one actor other nodes talk
//! to, found through the process group `canopy.inbox.<node id>`), discovery, the dialing of
//! static and discovered peers with backoff, one [`PeerMonitor`] per connected peer, and the
//! [`Election`]. What it knows is published as a [`ClusterView`] on a watch channel;
//! application messages from peers arrive as [`Incoming`] on a channel the domain actors read,
//! and [`ClusterHandle`] sends them.
//!
//! Peers and deaths:
//! - a session that ends (the peer process died: its TCP connection closed) removes the peer
//!   at once;
//! - a peer that goes silent (frozen, or its link cut without a FIN) is declared dead by its
//!   `PeerMonitor`, which stops the session; the monitor's failure reaches this actor as an
//!   ordinary `ActorFailed`;
//! - either way the peer leaves the view, the election runs again, and the peer is dialed
//!   again (if this node is the side that dials it) with exponential backoff up to 5 s.
//!
//! Authentication: the (patched) `ractor_cluster` handshake is mutual and bound to both node
//! names and both nonces, so a session is authenticated only when both sides hold the cookie
//! and each is who it names; a connection that closes before it authenticates never becomes a
//! member, and the handshake logs why it refused it. Every message is [sealed](super::seal)
//! under its session's key: a member cannot send in another node's name, and messages to a
//! peer go to the remote actors of that peer's own session. Beats with an implausible term
//! ([`MAX_TERM`]) are dropped, and the tables of addresses learned from beacons and beats are
//! bounded ([`MAX_KNOWN`]) and forget nodes not heard from for [`KNOWN_TTL`].
//!
//! The rooms: `view` (what the node knows: [`ClusterView`]), `handle` (sending to peers:
//! [`ClusterHandle`]), `inbox` (receiving from peers), `session` (`NodeServer` session events
//! and what each does to the state), `dial` (which addresses to dial, and when); this file
//! holds the actor, its state, the election and the peer table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use ractor_cluster::node::{
    NodeConnectionMode, NodeServer, NodeServerMessage, NodeServerSessionInformation,
    NodeSessionMessage,
};
use ractor_cluster::{IncomingEncryptionMode, RactorMessage};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::discovery::{
    Announcer, BeaconInfo, Discovered, Discovery, DiscoveryConfig, DiscoveryKey, DiscoveryStats,
    should_dial,
};
use super::election::{Candidate, Election};
use super::identity::NodeId;
use super::peer::{PeerHeartbeat, PeerMsg};
use super::seal::Sessions;
use super::wire::{Beat, InboxMsg, inbox_group};

mod dial;
mod handle;
mod inbox;
mod session;
mod view;

use dial::{Dial, backoff};
pub(crate) use handle::peer_inbox;
pub use handle::{ClusterError, ClusterHandle, Incoming};
use inbox::{Inbox, InboxArgs, RateLimit};
pub use session::SessionEvent;
use session::{Subscription, handle_session};
pub use view::{ClusterView, Member, MembershipEvent};

/// The highest term a beat may carry. Terms grow by one per election, so a real cluster never
/// comes near it; a larger one is a forged or corrupt beat, dropped before it can overflow the
/// election's arithmetic.
pub const MAX_TERM: u64 = 1 << 48;
/// Most addresses remembered from beacons and beats (the oldest is forgotten first).
pub const MAX_KNOWN: usize = 1024;
/// A node not heard from (by beacon or beat) for this long is forgotten.
pub const KNOWN_TTL: Duration = Duration::from_secs(120);

/// How a node joins the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's persistent id.
    pub node_id: NodeId,
    /// The address the `NodeServer` listens on (never "all interfaces" unless asked).
    pub listen: SocketAddr,
    /// The cluster cookie.
    pub cookie: String,
    /// Election priority (higher leads).
    pub priority: i32,
    /// When this node started (unix ms): its seniority in the election.
    pub started_ms: u64,
    /// Static peers to dial (`--peer`), for networks without multicast.
    pub peers: Vec<SocketAddr>,
    /// Multicast discovery, if enabled.
    pub discovery: Option<DiscoveryConfig>,
    /// Peer heartbeats.
    pub heartbeat: PeerHeartbeat,
    /// Quorum: the smallest component that may elect a leader (`--expect`).
    pub expect: Option<usize>,
    /// Bound on one TCP connect to a peer (the TLS handshake included).
    pub dial_timeout: Duration,
    /// Mutual TLS around every session, if on: peers without a certificate from the
    /// cluster's CA are refused before the cookie handshake.
    pub tls: Option<super::tls::ClusterTls>,
}

impl ClusterConfig {
    /// A configuration with default heartbeats, no peers and no discovery.
    pub fn new(node_id: NodeId, listen: SocketAddr, cookie: String) -> Self {
        Self {
            node_id,
            listen,
            cookie,
            priority: 0,
            started_ms: now_ms(),
            peers: Vec::new(),
            discovery: None,
            heartbeat: PeerHeartbeat::default(),
            expect: None,
            dial_timeout: Duration::from_secs(2),
            tls: None,
        }
    }
}

/// Milliseconds since the unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What the cluster actor is started with (cloneable: a restarted actor reuses it).
#[derive(Clone)]
pub struct ClusterArgs {
    /// The configuration.
    pub config: ClusterConfig,
    /// Where application messages from peers go.
    pub incoming: mpsc::UnboundedSender<Incoming>,
    view: Arc<watch::Sender<ClusterView>>,
    events: tokio::sync::broadcast::Sender<MembershipEvent>,
    sessions: Arc<Sessions>,
    discovery_stats: DiscoveryStats,
}

/// Creates the arguments of a [`ClusterActor`], the handle to talk through it, and the
/// receiver of application messages.
pub fn cluster_channels(
    config: ClusterConfig,
) -> (
    ClusterArgs,
    ClusterHandle,
    mpsc::UnboundedReceiver<Incoming>,
) {
    let (incoming, rx) = mpsc::unbounded_channel();
    let view = ClusterView {
        me: config.node_id.clone(),
        addr: config.listen,
        term: 0,
        leader: None,
        quorum: config.expect.is_none_or(|n| n <= 1),
        members: Vec::new(),
    };
    let (view_tx, view_rx) = watch::channel(view);
    let events = tokio::sync::broadcast::channel(256).0;
    let sessions = Arc::new(Sessions::new(config.node_id.clone()));
    let discovery_stats = DiscoveryStats::new();
    let handle = ClusterHandle {
        me: config.node_id.clone(),
        view: view_rx,
        events: events.clone(),
        sessions: sessions.clone(),
        discovery: discovery_stats.clone(),
    };
    (
        ClusterArgs {
            config,
            incoming,
            view: Arc::new(view_tx),
            events,
            sessions,
            discovery_stats,
        },
        handle,
        rx,
    )
}

/// Why a dial failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DialFailure {
    /// The TCP connection opened but the TLS handshake failed (a certificate from another
    /// CA, or a peer without TLS): a configuration error worth a warning.
    Tls(String),
    /// No connection (refused, unreachable, no answer in time).
    Connect(String),
}

/// Messages of the [`ClusterActor`].
#[derive(RactorMessage)]
pub enum ClusterMsg {
    /// Periodic work: dial, elect, publish.
    Tick,
    /// A beacon from another node.
    Discovered(Discovered),
    /// A session event from the `NodeServer`.
    Session(SessionEvent),
    /// A beat from a peer (via the inbox).
    Beat(Beat),
    /// A dial attempt to `addr` finished.
    Dialed(SocketAddr, Result<(), DialFailure>),
    /// The current view.
    View(RpcReplyPort<ClusterView>),
}

struct Peer {
    session: ActorRef<NodeSessionMessage>,
    /// The `ractor_cluster` node id of the session.
    session_node: u64,
    monitor: ActorRef<PeerMsg>,
    beat: Option<Beat>,
    _session_registration: crate::introspect::Registration,
}

struct SessionInfo {
    authenticated: bool,
    peer_addr: String,
}

/// The cluster actor's state.
pub struct ClusterState {
    args: ClusterArgs,
    server: ActorRef<NodeServerMessage>,
    inbox: ActorRef<InboxMsg>,
    discovery: Option<JoinHandle<()>>,
    announcer: Option<Announcer>,
    election: Election,
    _server_registration: crate::introspect::Registration,
    beat: Arc<watch::Sender<Beat>>,
    peers: HashMap<NodeId, Peer>,
    sessions: HashMap<ActorId, SessionInfo>,
    /// Cluster addresses learned from beacons and beats, and when each was last heard.
    known: HashMap<NodeId, (SocketAddr, Instant)>,
    dials: HashMap<SocketAddr, Dial>,
    /// Beats refused for their term, and for changing their sender's rank or address, are
    /// logged at most once per interval each.
    term_refusals: RateLimit,
    rank_refusals: RateLimit,
    /// Why each peer dropped since the last published view was dropped.
    departed: HashMap<NodeId, String>,
    registration: crate::introspect::Registration,
}

/// The actor (see the module docs).
pub struct ClusterActor;

/// The id in a session's peer name (`<node id>@<host>`).
fn peer_id(info: &NodeServerSessionInformation) -> Option<NodeId> {
    let name = &info.peer_name.as_ref()?.name;
    name.split('@').next()?.parse().ok()
}

impl ClusterState {
    fn config(&self) -> &ClusterConfig {
        &self.args.config
    }

    fn me(&self) -> &NodeId {
        &self.args.config.node_id
    }

    fn live_candidates(&self) -> Vec<Candidate> {
        self.peers
            .iter()
            .filter_map(|(id, p)| {
                let b = p.beat.as_ref()?;
                Some(Candidate {
                    id: id.clone(),
                    priority: b.priority,
                    started_ms: b.started_ms,
                    term: b.term,
                    leader: b.leader.clone(),
                })
            })
            .collect()
    }

    fn elect_and_publish(&mut self) {
        let me = Candidate {
            id: self.me().clone(),
            priority: self.config().priority,
            started_ms: self.config().started_ms,
            term: 0,
            leader: None,
        };
        let peers = self.live_candidates();
        let outcome = self.election.decide(&me, &peers);
        self.beat.send_if_modified(|b| {
            let changed = b.term != outcome.term || b.leader != outcome.leader;
            b.term = outcome.term;
            b.leader = outcome.leader.clone();
            changed
        });
        let mut members: Vec<Member> = self
            .peers
            .iter()
            .filter_map(|(id, p)| {
                let b = p.beat.as_ref()?;
                Some(Member {
                    id: id.clone(),
                    addr: b.addr,
                    started_ms: b.started_ms,
                    priority: b.priority,
                })
            })
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let view = ClusterView {
            me: self.me().clone(),
            addr: self.config().listen,
            term: outcome.term,
            leader: outcome.leader,
            quorum: outcome.quorum,
            members,
        };
        let departed = &self.departed;
        let events = &self.args.events;
        self.args.view.send_if_modified(|v| {
            if *v == view {
                false
            } else {
                let why = |id: &NodeId| {
                    departed
                        .get(id)
                        .cloned()
                        .unwrap_or_else(|| "it left the cluster".to_string())
                };
                for event in MembershipEvent::diff(v, &view, why) {
                    let _ = events.send(event);
                }
                *v = view;
                true
            }
        });
        self.departed.clear();
    }

    /// Remembers `id`'s address; the table stays within [`MAX_KNOWN`] and forgets nodes
    /// silent for [`KNOWN_TTL`].
    fn learn(&mut self, id: NodeId, addr: SocketAddr) {
        let now = Instant::now();
        self.known.insert(id, (addr, now));
        if self.known.len() > MAX_KNOWN {
            self.forget_stale(now);
        }
    }

    fn forget_stale(&mut self, now: Instant) {
        let peers = &self.peers;
        self.known.retain(|id, (_, heard)| {
            peers.contains_key(id) || now.duration_since(*heard) < KNOWN_TTL
        });
        while self.known.len() > MAX_KNOWN {
            let oldest = self
                .known
                .iter()
                .filter(|(id, _)| !self.peers.contains_key(*id))
                .min_by_key(|(_, (_, heard))| *heard)
                .map(|(id, _)| id.clone());
            match oldest {
                Some(id) => {
                    self.known.remove(&id);
                }
                None => break,
            }
        }
    }

    fn remove_peer(&mut self, id: &NodeId, why: &str) {
        if let Some(peer) = self.peers.remove(id) {
            self.args.sessions.remove(id, peer.session_node);
            peer.monitor.stop(None);
            tracing::warn!(peer = %id.short(), why, "peer left the cluster");
            self.departed.insert(id.clone(), why.to_string());
            if let Some(b) = &peer.beat
                && let Some(d) = self.dials.get_mut(&b.addr)
            {
                d.next = Instant::now();
            }
        }
    }

    fn details(&self) -> serde_json::Value {
        let view = self.args.view.borrow().clone();
        serde_json::json!({
            "node": self.me().to_string(),
            "addr": self.config().listen.to_string(),
            "term": view.term,
            "leader": view.leader.map(|l| l.to_string()),
            "peers": view.members.iter().map(|m| m.id.to_string()).collect::<Vec<_>>(),
        })
    }
}

/// The innermost message of an error chain (ractor wraps start failures in layers).
fn innermost(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        message = s.to_string();
        source = s.source();
    }
    message
}

impl Actor for ClusterActor {
    type Msg = ClusterMsg;
    type State = ClusterState;
    type Arguments = ClusterArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ClusterMsg>,
        args: ClusterArgs,
    ) -> Result<ClusterState, ActorProcessingErr> {
        let registration = crate::introspect::register(&myself.get_cell(), "cluster");
        let config = &args.config;
        let server = NodeServer::new(
            config.listen.port(),
            config.cookie.clone(),
            config.node_id.to_string(),
            config.listen.ip().to_string(),
            config
                .tls
                .as_ref()
                .map(|tls| IncomingEncryptionMode::Tls(tls.acceptor())),
            Some(NodeConnectionMode::Isolated),
        )
        .with_listen_addr(config.listen.ip());
        let (server, _) = Actor::spawn_linked(None, server, (), myself.get_cell())
            .await
            .map_err(|e| {
                format!(
                    "cannot listen for cluster connections on {}: {} (another node on this \
                     address? pass another --cluster-port)",
                    config.listen,
                    innermost(&e)
                )
            })?;
        let server_registration = crate::introspect::register(&server.get_cell(), "node-server");
        {
            let listen = config.listen.to_string();
            server_registration
                .set_details(Arc::new(move || serde_json::json!({ "listen": listen })));
        }
        server.cast(NodeServerMessage::SubscribeToEvents {
            id: "canopy-cluster".into(),
            subscription: Box::new(Subscription {
                cluster: myself.clone(),
                sessions: args.sessions.clone(),
            }),
        })?;
        let (inbox, _) = Actor::spawn_linked(
            None,
            Inbox,
            InboxArgs {
                cluster: myself.clone(),
                incoming: args.incoming.clone(),
                sessions: args.sessions.clone(),
                refusals: RateLimit::new(Duration::from_secs(10)),
                chunks: crate::cluster::chunk::Reassembly::new(),
            },
            myself.get_cell(),
        )
        .await?;
        ractor::pg::join(inbox_group(&config.node_id), vec![inbox.get_cell()]);

        let mut announcer = None;
        let discovery = match &config.discovery {
            Some(dc) => {
                let me = BeaconInfo {
                    node_id: config.node_id.to_string(),
                    addr: config.listen,
                    started_ms: config.started_ms,
                };
                let key = DiscoveryKey::derive(&config.cookie, &dc.namespace);
                let stats = args.discovery_stats.clone();
                match Discovery::start(dc.clone(), me, key, stats).await {
                    Ok(mut discovery) => {
                        announcer = Some(discovery.announcer());
                        let myself = myself.clone();
                        Some(tokio::spawn(async move {
                            while let Some(found) = discovery.recv().await {
                                if myself.cast(ClusterMsg::Discovered(found)).is_err() {
                                    break;
                                }
                            }
                        }))
                    }
                    Err(err) => {
                        tracing::warn!(%err, "multicast discovery is off; only --peer addresses are dialed");
                        None
                    }
                }
            }
            None => None,
        };

        let beat = Beat {
            from: config.node_id.clone(),
            seq: 0,
            addr: config.listen,
            started_ms: config.started_ms,
            priority: config.priority,
            term: 0,
            leader: None,
        };
        let election = Election::new(config.node_id.clone(), config.expect);
        myself.send_interval(config.heartbeat.interval, || ClusterMsg::Tick);
        tracing::info!(node = %config.node_id.short(), addr = %config.listen, "cluster membership started");
        let mut state = ClusterState {
            args,
            server,
            inbox,
            discovery,
            announcer,
            election,
            _server_registration: server_registration,
            beat: Arc::new(watch::channel(beat).0),
            peers: HashMap::new(),
            sessions: HashMap::new(),
            known: HashMap::new(),
            dials: HashMap::new(),
            term_refusals: RateLimit::new(Duration::from_secs(10)),
            rank_refusals: RateLimit::new(Duration::from_secs(10)),
            departed: HashMap::new(),
            registration,
        };
        state.elect_and_publish();
        Ok(state)
    }

    async fn post_stop(
        &self,
        _: ActorRef<ClusterMsg>,
        state: &mut ClusterState,
    ) -> Result<(), ActorProcessingErr> {
        if let Some(task) = state.discovery.take() {
            task.abort();
        }
        state.inbox.stop(None);
        state.server.stop(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ClusterMsg>,
        msg: ClusterMsg,
        state: &mut ClusterState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ClusterMsg::Tick => {
                state.forget_stale(Instant::now());
                state.dial(&myself);
                state.elect_and_publish();
                let details = state.details();
                state
                    .registration
                    .set_details(Arc::new(move || details.clone()));
            }
            ClusterMsg::Discovered(found) => {
                let Ok(id) = found.node_id.parse::<NodeId>() else {
                    return Ok(());
                };
                if id != *state.me() {
                    // A node that should dial us but is not connected may not have heard of
                    // us yet: answer with our beacon now rather than at the next interval.
                    if !state.peers.contains_key(&id)
                        && !should_dial(state.me().as_str(), id.as_str())
                        && let Some(announcer) = &state.announcer
                    {
                        announcer.announce();
                    }
                    state.learn(id, found.addr);
                    state.dial(&myself);
                }
            }
            ClusterMsg::Dialed(addr, outcome) => {
                if let Some(dial) = state.dials.get_mut(&addr) {
                    dial.in_flight = false;
                    dial.failures = dial.failures.saturating_add(1);
                    dial.next = Instant::now() + backoff(dial.failures);
                    match outcome {
                        Ok(()) => dial.tls_warned = false,
                        Err(DialFailure::Tls(err)) if !dial.tls_warned => {
                            dial.tls_warned = true;
                            tracing::warn!(
                                %addr,
                                %err,
                                "the TLS handshake with a peer failed; retrying (said once per \
                                 address until a dial succeeds)"
                            );
                        }
                        Err(DialFailure::Tls(err) | DialFailure::Connect(err)) => {
                            tracing::debug!(%addr, %err, "dial failed");
                        }
                    }
                }
            }
            ClusterMsg::Session(event) => handle_session(&myself, state, event).await?,
            ClusterMsg::Beat(beat) => {
                if beat.from == *state.me() {
                    return Ok(());
                }
                if beat.term > MAX_TERM {
                    if let Some(suppressed) = state.term_refusals.allow() {
                        tracing::warn!(peer = %beat.from.short(), term = beat.term, suppressed,
                            "dropped a beat with an implausible term");
                    }
                    return Ok(());
                }
                // A node's rank in the election and its address are fixed for the life of
                // its session: a peer that changes them from one beat to the next (to take
                // the lead back and forth, or to move its address) is not believed.
                let pinned = state.peers.get(&beat.from).and_then(|p| p.beat.as_ref());
                if let Some(first) = pinned
                    && (first.started_ms, first.priority, first.addr)
                        != (beat.started_ms, beat.priority, beat.addr)
                {
                    if let Some(suppressed) = state.rank_refusals.allow() {
                        tracing::warn!(peer = %beat.from.short(), suppressed,
                            "dropped a beat that changes the peer's start time, priority or \
                             address within its session");
                    }
                    return Ok(());
                }
                state.learn(beat.from.clone(), beat.addr);
                if let Some(peer) = state.peers.get_mut(&beat.from) {
                    let first = peer.beat.is_none();
                    let _ = peer.monitor.cast(PeerMsg::Beat(beat.clone()));
                    if let Some(d) = state.dials.get_mut(&beat.addr) {
                        d.failures = 0;
                    }
                    peer.beat = Some(beat);
                    if first {
                        state.elect_and_publish();
                    }
                }
            }
            ClusterMsg::View(reply) => {
                let _ = reply.send(state.args.view.borrow().clone());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<ClusterMsg>,
        evt: SupervisionEvent,
        state: &mut ClusterState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(id) = monitor_of(state, &cell) {
                    state.remove_peer(&id, &err.to_string());
                    state.elect_and_publish();
                } else if cell.get_id() == state.server.get_id()
                    || cell.get_id() == state.inbox.get_id()
                {
                    return Err(format!(
                        "the cluster's {} failed: {err}",
                        cell.get_name().unwrap_or_default()
                    )
                    .into());
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, _)
                if cell.get_id() == state.server.get_id()
                    || cell.get_id() == state.inbox.get_id() =>
            {
                return Err("the cluster's node server or inbox stopped".into());
            }
            _ => {}
        }
        Ok(())
    }
}

fn monitor_of(state: &ClusterState, cell: &ActorCell) -> Option<NodeId> {
    state
        .peers
        .iter()
        .find(|(_, p)| p.monitor.get_id() == cell.get_id())
        .map(|(id, _)| id.clone())
}
