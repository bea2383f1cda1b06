//! Hostile cluster peers against real `canopy node` processes on loopback (issue #13, "Let no
//! one in").
//!
//! Every test starts real nodes (`--peer` on 127.0.0.1, the cookie in `CANOPY_COOKIE`, the
//! scripted engine) and attacks them from this process, then checks through `/state` that the
//! nodes' membership, master, term and instances are what they were, and that `/health` still
//! answers. What each test covers:
//!
//! - [`no_cookie_and_own_name_are_refused`]: a rogue `ractor_cluster::NodeServer` with a wrong
//!   cookie dials a node (refused, `wrong_cookie`); a rogue with the *right* cookie that claims
//!   the node's own name is refused too (`own_name`). Neither appears in membership.
//! - [`a_relayed_handshake_authenticates_neither_session`]: the reflection relay, built
//!   faithfully at the wire level (hand-written length-prefixed protobuf, no cookie): node A
//!   dials the rogue (A has `--peer` pointing at it) while the rogue dials A under a made-up
//!   name X; the rogue hands A, on A's outgoing session, A's own server challenge (value and
//!   nonce) under the name X, and relays A's answer back into its incoming session. Under the
//!   old `sha256(challenge ‖ cookie)` digest, or under a nonce-only HMAC, the relayed answer
//!   would be valid and the incoming session would authenticate (the rogue would receive a
//!   `ServerAck`); the test asserts that it does not, that A says why (`wrong_cookie`), and
//!   that the reflected digest does not authenticate A's outgoing session either. The second
//!   half tries the only name alignment that would make the relayed proof match (X = A's own
//!   name, and the rogue presenting A's name back to A): both sides refuse it (`own_name`).
//! - [`an_insider_cannot_act_in_another_name_as_the_leader_or_break_the_term`]: a rogue that
//!   *has* the cookie joins a two-node cluster (that is expected: it has the cookie; its own
//!   correctly sealed beats make it a member, which is the positive control showing the test
//!   speaks the wire format) and then
//!   - (a) sends beats naming the other real node as their sender — forged under its own
//!     session key (a bad seal), and sealed in its own name but with another sender inside —
//!     that, if believed, would make that node the master with a bogus address: the master
//!     and the address never change, and the nodes log the refusals;
//!   - (b) sends plans in its own name (as the leader, and naming the real leader inside) and
//!     forged in the leader's name, assigning an instance to the follower with a huge
//!     version: no node takes it (instances unchanged);
//!   - (c) sends a beat with term `u64::MAX`: master and term unchanged, term < 2^48;
//!   - (f) sends beats in its own name claiming the top election rank (started at 0, the
//!     highest priority): a member's rank and address are fixed for its session, so the
//!     master does not change;
//!   - (e) sends an undecodable frame, a frame for another node, an unknown message variant and
//!     a call with garbage, and raw TCP garbage (an 8 EiB length prefix, random bytes) to the
//!     cluster port: nothing changes and the rogue's own session survives what it can;
//!   - (d) a stream event for a stream hosted on another node: a second rogue R2 (also with the
//!     cookie) injects a chunk into a stream that rogue R1 hosts (R1 reports a Ready
//!     instance of a model only it serves, the leader adopts it, a client streams from the
//!     real node A, A sends R1 the task and its key). R2 knows the key (it is R1's), so
//!     only the host check stands between it and the client: the client sees R1's text and
//!     never R2's, and A logs the drop. (A stream hosted on a real node cannot be targeted
//!     with a known key: its key is random and never leaves the two real nodes; R2 also
//!     sends events for the key's neighbours and for keys 1, 2, 3, as a counter would.)
//! - [`a_one_mebibyte_model_name_is_refused_and_nothing_flaps`]: `POST /instances` with a
//!   1 MiB model name (refused by the body limit, 413, or by validation, 400) and with a
//!   model name just under the body limit (400 from validation): the plan does not grow and
//!   membership stays stable for 3 s.
//! - [`an_insider_cannot_take_another_members_name`]: a cookie holder claiming the leader A's
//!   name dials the follower B; B keeps the real A's ready session (the vendored
//!   `NodeServerState::elect` in `vendor/ractor_cluster/src/node.rs`), so the seal's sender
//!   check is not only as strong as the name a cookie holder chooses.
//! - [`tls_nodes_form_serve_across_and_refuse_peers_without_the_cas_certificate`]: two nodes
//!   with certificates from `canopy cluster certs` form over mutual TLS while a silent TCP
//!   connection is held open on the first one's cluster port (a TLS handshake that never
//!   comes must not stop the listener), and a request to the second streams from an instance
//!   on the first; a node with the cookie but no TLS, and one with a certificate from another
//!   CA, never become members.
//!
//! Each defence was removed in turn in a scratch copy (names out of the handshake proof, the
//! seal's MAC check, the sender check, `MAX_TERM`, the plan's leader check, the stream's host
//! check): each made its test fail.
//!
//! Refusals are checked through the nodes' logs (the inbox logs at most one refusal per 10 s,
//! so each kind is aimed at a node that has not logged one yet) and through
//! `canopy_cluster_refused_frames_total` in `/metrics`.

use crate::common;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::{NodeProcess, eventually, holds_for, tail};
use canopy_actors::cluster::protocol::{
    AppMsg, InstanceReport, NodeReport, Plan, PlanState, PlannedInstance, SubmitAnswer, decode,
    encode,
};
use canopy_actors::runner::TaskEvent;
use canopy_proto::{FinishReason, RunnerStatus, TokenChunk, Usage};
use canopy_runtime::cluster::NodeId;
use canopy_runtime::cluster::seal::{SessionKey, Sessions};
use canopy_runtime::cluster::wire::{Beat, Envelope, InboxMsg, inbox_group};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::node::{NodeServer, NodeServerSessionInformation};
use ractor_cluster::{NodeEventSubscription, NodeServerMessage};
use serde_json::{Value, json};

const COOKIE: &str = "hostile-test-cookie";

/// Cross-node streams against a host that goes quiet or freezes (uses the rogue below).
mod stream_deadlines;

// ---------------------------------------------------------------------------------------------
// Real nodes.

/// A real `canopy node` and its cluster address.
struct Node {
    proc: NodeProcess,
    cluster: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Starts `canopy node` on loopback with `cookie`, dialing `peers`; waits for `/health`.
    fn start(cookie: &str, peers: &[SocketAddr]) -> Node {
        Node::start_as(None, cookie, peers)
    }

    /// [`Node::start`], with the node id `id` (written to its data dir first) if given.
    fn start_as(id: Option<&str>, cookie: &str, peers: &[SocketAddr]) -> Node {
        Node::start_with(id, cookie, peers, &[])
    }

    /// [`Node::start_as`], with more flags.
    fn start_with(id: Option<&str>, cookie: &str, peers: &[SocketAddr], extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        if let Some(id) = id {
            std::fs::write(dir.path().join("node-id"), format!("{id}\n")).expect("node-id");
        }
        let port = common::free_port();
        let cluster = SocketAddr::from(([127, 0, 0, 1], common::free_port()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy"));
        cmd.args(["node", "--engine", "scripted", "--no-discovery"])
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--cluster-host", "127.0.0.1"])
            .args(["--cluster-port", &cluster.port().to_string()])
            .arg("--data-dir")
            .arg(dir.path())
            .env("CANOPY_COOKIE", cookie)
            .env("CANOPY_MODEL_DIR", common::model_dir())
            .env("CANOPY_LOG", "info")
            .env_remove("CANOPY_STANDALONE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for p in peers {
            cmd.args(["--peer", &p.to_string()]);
        }
        cmd.args(extra);
        let mut child = cmd.spawn().expect("canopy starts");
        let log = common::capture_output(&mut child);
        let proc = NodeProcess {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let node = Node {
            proc,
            cluster,
            _dir: dir,
        };
        let up = eventually(Duration::from_secs(30), "the node to come up", || {
            node.healthy() || !common::alive(node.proc.pid())
        });
        assert!(
            up.is_ok() && node.healthy(),
            "node did not come up; log:\n{}",
            node.log()
        );
        node
    }

    fn healthy(&self) -> bool {
        matches!(self.proc.get("/health"), Ok((200, _)))
    }

    fn log(&self) -> String {
        self.proc.log_text()
    }

    fn state(&self) -> Value {
        match self.proc.get("/state") {
            Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
            _ => Value::Null,
        }
    }

    fn id(&self) -> NodeId {
        self.state()["node"]
            .as_str()
            .expect("node id")
            .parse()
            .expect("a node id")
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot::of(&self.state())
    }
}

/// What an attack must not change: membership (with each member's cluster address), master,
/// term and the plan's instances.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    members: BTreeMap<String, String>,
    master: Option<String>,
    term: u64,
    instances: BTreeSet<String>,
}

impl Snapshot {
    fn of(state: &Value) -> Snapshot {
        let members = state["nodes"]
            .as_array()
            .map(|nodes| {
                nodes
                    .iter()
                    .map(|n| {
                        (
                            n["id"].as_str().unwrap_or_default().to_string(),
                            n["cluster_addr"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let instances = state["instances"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|i| {
                        format!(
                            "{}@{}",
                            i["id"].as_str().unwrap_or_default(),
                            i["node"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Snapshot {
            members,
            master: state["master"].as_str().map(str::to_string),
            term: state["term"].as_u64().unwrap_or(0),
            instances,
        }
    }
}

fn logs(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| format!("--- node {i}:\n{}", tail(&n.log(), 40)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Starts A, then B dialing A, and waits until both see each other and follow A.
fn two_node_cluster() -> (Node, Node) {
    two_node_cluster_as(None, None)
}

/// [`two_node_cluster`] with chosen node ids.
fn two_node_cluster_as(a_id: Option<&str>, b_id: Option<&str>) -> (Node, Node) {
    let a = Node::start_as(a_id, COOKIE, &[]);
    let b = Node::start_as(b_id, COOKIE, &[a.cluster]);
    let a_id = a.id().to_string();
    let formed = eventually(Duration::from_secs(15), "the cluster to form", || {
        let (sa, sb) = (a.snapshot(), b.snapshot());
        sa.members.len() == 2
            && sb.members.len() == 2
            && sa.master.as_deref() == Some(a_id.as_str())
            && sb.master.as_deref() == Some(a_id.as_str())
            && sa.term == sb.term
            && sa.term > 0
    });
    if let Err(why) = formed {
        panic!("{why}\n{}", logs(&[&a, &b]));
    }
    (a, b)
}

/// Asserts `node` still serves `/health` and shows `before`.
fn assert_unchanged(node: &Node, before: &Snapshot, what: &str) {
    assert!(node.healthy(), "{what}: /health failed\n{}", node.log());
    let now = node.snapshot();
    assert_eq!(
        &now,
        before,
        "{what} changed the node's view\n{}",
        node.log()
    );
    assert!(now.term < 1 << 48, "{what}: term {}", now.term);
}

// ---------------------------------------------------------------------------------------------
// A rogue `ractor_cluster` node in this process.

/// A session event the rogue's `NodeServer` reported.
#[derive(Debug, Clone)]
struct Event {
    kind: &'static str,
    peer: Option<String>,
}

struct Recorder {
    events: Arc<Mutex<Vec<Event>>>,
    sessions: Arc<Sessions>,
}

impl Recorder {
    fn record(&self, kind: &'static str, ses: &NodeServerSessionInformation) {
        self.events.lock().expect("events").push(Event {
            kind,
            peer: ses.peer_name.as_ref().map(|n| n.name.clone()),
        });
    }
}

fn peer_of(ses: &NodeServerSessionInformation) -> Option<NodeId> {
    ses.peer_name.as_ref()?.name.split('@').next()?.parse().ok()
}

impl NodeEventSubscription for Recorder {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        self.record("opened", &ses);
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        if let Some(peer) = peer_of(&ses) {
            self.sessions.remove(&peer, ses.node_id);
        }
        self.record("disconnected", &ses);
    }
    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        // The session key, exactly as a real node installs it (membership.rs).
        if let (Some(peer), Some(key)) = (peer_of(&ses), ses.session_key) {
            self.sessions
                .install(peer, SessionKey::new(*key.as_bytes()), ses.node_id);
        }
        self.record("authenticated", &ses);
    }
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        self.record("ready", &ses);
    }
}

/// The rogue's own inbox (so that real nodes can send it beats, plans and tasks): it answers
/// every task it is sent with "accepted" and hands its stream key to the test.
struct RogueInbox;

struct RogueInboxState {
    sessions: Arc<Sessions>,
    submits: std::sync::mpsc::Sender<(NodeId, u64)>,
}

impl Actor for RogueInbox {
    type Msg = InboxMsg;
    type State = RogueInboxState;
    type Arguments = RogueInboxState;

    async fn pre_start(
        &self,
        _: ActorRef<InboxMsg>,
        args: RogueInboxState,
    ) -> Result<RogueInboxState, ActorProcessingErr> {
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<InboxMsg>,
        msg: InboxMsg,
        state: &mut RogueInboxState,
    ) -> Result<(), ActorProcessingErr> {
        if let InboxMsg::Call(bytes, reply) = msg
            && let Ok((from, body)) = state.sessions.open(&bytes)
            && let Ok(Envelope::App { payload, .. }) = Envelope::decode(&body)
            && let Ok(AppMsg::Submit { key, .. }) = decode::<AppMsg>(&payload)
        {
            let _ = reply.send(encode(&SubmitAnswer::Ok(())).expect("encodes"));
            let _ = state.submits.send((from, key));
        }
        Ok(())
    }
}

/// What the rogue puts in its beats.
#[derive(Clone)]
struct BeatPlan {
    term: u64,
    leader: Option<NodeId>,
    /// The seniority it claims (default: when it joined; self-reported, like every node's).
    started_ms: Option<u64>,
}

/// A rogue node: a vendored `NodeServer` with some cookie and name, its session keys, and
/// (once [`Rogue::join`]ed) its own inbox and beats.
struct Rogue {
    id: NodeId,
    addr: SocketAddr,
    server: ActorRef<NodeServerMessage>,
    sessions: Arc<Sessions>,
    events: Arc<Mutex<Vec<Event>>>,
    beat: Arc<Mutex<BeatPlan>>,
    peers: Arc<Mutex<Vec<NodeId>>>,
    submits: Option<std::sync::mpsc::Receiver<(NodeId, u64)>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    inbox: Option<ActorRef<InboxMsg>>,
}

fn random_id() -> NodeId {
    format!("{:032x}", rand_u128()).parse().expect("id")
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut out = 0u128;
    for _ in 0..2 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(out);
        h.write_u64(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
        );
        out = (out << 64) | u128::from(h.finish());
    }
    out
}

fn now_ms() -> u64 {
    canopy_runtime::cluster::now_ms()
}

impl Rogue {
    /// Starts a `NodeServer` named `<id>@127.0.0.1` with `cookie`.
    async fn start(cookie: &str, id: NodeId) -> Rogue {
        let port = common::free_port();
        let server = NodeServer::new(
            port,
            cookie.to_string(),
            id.to_string(),
            "127.0.0.1".to_string(),
            None,
            None,
        )
        .with_listen_addr([127, 0, 0, 1].into());
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .expect("the rogue's node server starts");
        let sessions = Arc::new(Sessions::new(id.clone()));
        let events = Arc::new(Mutex::new(Vec::new()));
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "rogue".into(),
                subscription: Box::new(Recorder {
                    events: events.clone(),
                    sessions: sessions.clone(),
                }),
            })
            .expect("subscribe");
        Rogue {
            id,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            server,
            sessions,
            events,
            beat: Arc::new(Mutex::new(BeatPlan {
                term: 0,
                leader: None,
                started_ms: None,
            })),
            peers: Arc::new(Mutex::new(Vec::new())),
            submits: None,
            tasks: Vec::new(),
            inbox: None,
        }
    }

    fn events(&self) -> Vec<Event> {
        self.events.lock().expect("events").clone()
    }

    /// Dials `addr` (the TCP connect and the start of the handshake).
    async fn dial(&self, addr: SocketAddr) {
        tokio::time::timeout(
            Duration::from_secs(3),
            ractor_cluster::client_connect(&self.server, addr),
        )
        .await
        .expect("dial in time")
        .expect("TCP connect");
    }

    /// Waits up to `limit` for an event of `kind` (from a peer whose name starts with
    /// `peer`, if given).
    async fn wait_event(&self, kind: &str, peer: Option<&str>, limit: Duration) -> Option<Event> {
        common::eventually_async(limit, kind, async || {
            self.events().into_iter().find(|e| {
                e.kind == kind
                    && peer.is_none_or(|p| e.peer.as_deref().is_some_and(|n| n.starts_with(p)))
            })
        })
        .await
        .ok()
    }

    /// Starts the rogue's inbox and its beats (every 200 ms, to every connected peer, as
    /// [`BeatPlan`] says): from now on it looks like a member to the real nodes.
    async fn become_member(&mut self) {
        let (tx, rx) = std::sync::mpsc::channel();
        let (inbox, _) = Actor::spawn(
            None,
            RogueInbox,
            RogueInboxState {
                sessions: self.sessions.clone(),
                submits: tx,
            },
        )
        .await
        .expect("inbox");
        ractor::pg::join(inbox_group(&self.id), vec![inbox.get_cell()]);
        self.inbox = Some(inbox);
        self.submits = Some(rx);
        let (id, addr, sessions, plan, peers) = (
            self.id.clone(),
            self.addr,
            self.sessions.clone(),
            self.beat.clone(),
            self.peers.clone(),
        );
        let started_ms = now_ms();
        self.tasks.push(tokio::spawn(async move {
            let mut seq = 0;
            loop {
                seq += 1;
                let plan = plan.lock().expect("plan").clone();
                let peers = peers.lock().expect("peers").clone();
                for peer in peers {
                    let beat = Envelope::Beat(Beat {
                        from: id.clone(),
                        seq,
                        addr,
                        started_ms: plan.started_ms.unwrap_or(started_ms),
                        priority: 0,
                        term: plan.term,
                        leader: plan.leader.clone(),
                    });
                    let _ = cast_to(&sessions, &peer, &sessions, beat);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }));
    }

    /// Dials `node` and waits until the session is ready and the node's inbox is known here.
    async fn join(&mut self, node: &Node, id: &NodeId) {
        self.dial(node.cluster).await;
        let ready = self
            .wait_event("ready", Some(id.as_str()), Duration::from_secs(5))
            .await;
        assert!(
            ready.is_some(),
            "the rogue's session to {} never became ready: {:?}\n{}",
            id.short(),
            self.events(),
            tail(&node.log(), 30)
        );
        common::eventually_async(Duration::from_secs(5), "the peer's inbox", async || {
            remote_inbox(&self.sessions, id)
        })
        .await
        .unwrap_or_else(|why| panic!("{why}: no inbox of {} here", id.short()));
        self.peers.lock().expect("peers").push(id.clone());
    }

    async fn stop(mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        if let Some(inbox) = self.inbox.take() {
            inbox.stop(None);
        }
        self.server.stop(None);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The inbox of `peer` as the session `sessions` holds with it (the remote actor on that
/// session, not another session's copy).
fn remote_inbox(sessions: &Sessions, peer: &NodeId) -> Option<ActorRef<InboxMsg>> {
    let route = sessions.route(peer)?;
    ractor::pg::get_members(&inbox_group(peer))
        .into_iter()
        .find(|c| !c.get_id().is_local() && c.get_id().node() == route.session)
        .map(ActorRef::from)
}

/// Seals `envelope` with `sealer` (whose `me` is the claimed sender; its keys decide the MAC)
/// and casts it to `to`'s inbox through the session `route` holds.
fn cast_to(route: &Sessions, to: &NodeId, sealer: &Sessions, envelope: Envelope) -> bool {
    let Some(inbox) = remote_inbox(route, to) else {
        return false;
    };
    let Ok(bytes) = sealer.seal(to, envelope.encode().expect("encodes")) else {
        return false;
    };
    inbox.cast(InboxMsg::Cast(bytes)).is_ok()
}

/// Casts raw bytes (sealed or not) to `to`'s inbox through `route`'s session.
fn cast_raw(route: &Sessions, to: &NodeId, bytes: Vec<u8>) -> bool {
    remote_inbox(route, to).is_some_and(|inbox| inbox.cast(InboxMsg::Cast(bytes)).is_ok())
}

/// A [`Sessions`] that seals in `claimed`'s name with `key` (the rogue's own session key with
/// `to`): a forgery.
fn forger(claimed: &NodeId, to: &NodeId, key: SessionKey) -> Sessions {
    let s = Sessions::new(claimed.clone());
    s.install(to.clone(), key, 0);
    s
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

// ---------------------------------------------------------------------------------------------
// 1. No cookie, and someone else's name.

#[test]
fn no_cookie_and_own_name_are_refused() {
    let rt = runtime();
    let (a, b) = two_node_cluster();
    let a_id = a.id();
    let (before_a, before_b) = (a.snapshot(), b.snapshot());

    // A wrong cookie: the handshake fails, the rogue never authenticates nor appears.
    let rogue_id = random_id();
    let rogue = rt.block_on(Rogue::start("not-the-cookie", rogue_id.clone()));
    rt.block_on(rogue.dial(a.cluster));
    let gone = rt.block_on(rogue.wait_event("disconnected", None, Duration::from_secs(5)));
    assert!(
        gone.is_some(),
        "the session was not closed: {:?}",
        rogue.events()
    );
    assert!(
        !rogue.events().iter().any(|e| e.kind == "authenticated"),
        "a rogue without the cookie authenticated: {:?}",
        rogue.events()
    );
    assert!(
        eventually(Duration::from_secs(3), "the refusal in A's log", || a
            .log()
            .contains("different cookie"))
        .is_ok(),
        "A did not log the refusal\n{}",
        tail(&a.log(), 30)
    );
    assert!(rogue.sessions.route(&a_id).is_none());
    rt.block_on(rogue.stop());

    // The right cookie but A's own name: refused on both sides of the handshake.
    let impostor = rt.block_on(Rogue::start(COOKIE, a_id.clone()));
    rt.block_on(impostor.dial(a.cluster));
    let gone = rt.block_on(impostor.wait_event("disconnected", None, Duration::from_secs(5)));
    assert!(gone.is_some(), "not closed: {:?}", impostor.events());
    assert!(
        !impostor.events().iter().any(|e| e.kind == "authenticated"),
        "a node claiming A's own name authenticated with A: {:?}",
        impostor.events()
    );
    assert!(
        eventually(
            Duration::from_secs(3),
            "the own-name refusal in A's log",
            || a.log().contains("claims this node's own name")
        )
        .is_ok(),
        "A did not log the own-name refusal\n{}",
        tail(&a.log(), 30)
    );
    rt.block_on(impostor.stop());

    std::thread::sleep(Duration::from_millis(600));
    assert_unchanged(&a, &before_a, "the wrong-cookie and own-name rogues");
    assert_unchanged(&b, &before_b, "the wrong-cookie and own-name rogues");
    assert!(!a.state().to_string().contains(rogue_id.as_str()));
    assert!(!b.state().to_string().contains(rogue_id.as_str()));
}

// ---------------------------------------------------------------------------------------------
// 2. The reflection relay, on the wire.

/// Hand-written protobuf, just enough for the handshake (`vendor/ractor_cluster/src/protocol`).
mod pb {
    pub fn varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    pub fn uint(tag: u32, v: u64, out: &mut Vec<u8>) {
        varint(u64::from(tag << 3), out);
        varint(v, out);
    }

    pub fn bytes(tag: u32, b: &[u8], out: &mut Vec<u8>) {
        varint(u64::from((tag << 3) | 2), out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }

    /// A field's value: a varint or length-delimited bytes.
    #[derive(Debug, Clone)]
    pub enum Field {
        Int(u64),
        Bytes(Vec<u8>),
    }

    fn read_varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Some(v);
            }
        }
        None
    }

    /// The fields of a message, in order.
    pub fn parse(b: &[u8]) -> Option<Vec<(u32, Field)>> {
        let mut i = 0;
        let mut out = Vec::new();
        while i < b.len() {
            let key = read_varint(b, &mut i)?;
            let (tag, wire) = ((key >> 3) as u32, key & 7);
            match wire {
                0 => out.push((tag, Field::Int(read_varint(b, &mut i)?))),
                2 => {
                    let len = read_varint(b, &mut i)? as usize;
                    let v = b.get(i..i + len)?.to_vec();
                    i += len;
                    out.push((tag, Field::Bytes(v)));
                }
                _ => return None,
            }
        }
        Some(out)
    }

    pub fn get_bytes(fields: &[(u32, Field)], tag: u32) -> Option<Vec<u8>> {
        fields.iter().find_map(|(t, f)| match f {
            Field::Bytes(b) if *t == tag => Some(b.clone()),
            _ => None,
        })
    }

    pub fn get_int(fields: &[(u32, Field)], tag: u32) -> Option<u64> {
        fields.iter().find_map(|(t, f)| match f {
            Field::Int(v) if *t == tag => Some(*v),
            _ => None,
        })
    }
}

/// The handshake messages (`auth.proto`'s `AuthenticationMessage` oneof), wrapped in the
/// `NetworkMessage` (`auth = 1`).
#[derive(Debug)]
enum Auth {
    Name(String),
    ServerStatus(u64),
    Challenge {
        name: String,
        challenge: u64,
        nonce: Vec<u8>,
    },
    ChallengeReply {
        challenge: u64,
        digest: Vec<u8>,
        nonce: Vec<u8>,
    },
    Ack(Vec<u8>),
    Other,
}

fn flags() -> Vec<u8> {
    let mut f = Vec::new();
    pb::uint(1, 1, &mut f);
    f
}

impl Auth {
    fn encode(&self) -> Vec<u8> {
        let (tag, body) = match self {
            Auth::Name(name) => {
                let mut m = Vec::new();
                pb::bytes(1, name.as_bytes(), &mut m);
                pb::bytes(2, &flags(), &mut m);
                pb::bytes(3, b"127.0.0.1:1", &mut m);
                pb::uint(4, (rand_u128() as u64) | 1, &mut m);
                (1, m)
            }
            Auth::ServerStatus(status) => {
                let mut m = Vec::new();
                if *status != 0 {
                    pb::uint(1, *status, &mut m);
                }
                (2, m)
            }
            Auth::Challenge {
                name,
                challenge,
                nonce,
            } => {
                let mut m = Vec::new();
                pb::bytes(1, name.as_bytes(), &mut m);
                pb::bytes(2, &flags(), &mut m);
                pb::uint(3, *challenge, &mut m);
                pb::bytes(4, b"127.0.0.1:1", &mut m);
                pb::bytes(5, nonce, &mut m);
                (4, m)
            }
            Auth::ChallengeReply {
                challenge,
                digest,
                nonce,
            } => {
                let mut m = Vec::new();
                pb::uint(1, *challenge, &mut m);
                pb::bytes(2, digest, &mut m);
                pb::bytes(3, nonce, &mut m);
                (5, m)
            }
            Auth::Ack(digest) => {
                let mut m = Vec::new();
                pb::bytes(1, digest, &mut m);
                (6, m)
            }
            Auth::Other => unreachable!("never sent"),
        };
        let mut auth = Vec::new();
        pb::bytes(tag, &body, &mut auth);
        let mut net = Vec::new();
        pb::bytes(1, &auth, &mut net);
        net
    }

    fn decode(frame: &[u8]) -> Option<Auth> {
        let net = pb::parse(frame)?;
        let auth = pb::parse(&pb::get_bytes(&net, 1)?)?;
        let (tag, body) = auth.first()?.clone();
        let pb::Field::Bytes(body) = body else {
            return None;
        };
        let m = pb::parse(&body)?;
        let text = |t| String::from_utf8(pb::get_bytes(&m, t).unwrap_or_default()).ok();
        Some(match tag {
            1 => Auth::Name(text(1)?),
            2 => Auth::ServerStatus(pb::get_int(&m, 1).unwrap_or(0)),
            4 => Auth::Challenge {
                name: text(1)?,
                challenge: pb::get_int(&m, 3).unwrap_or(0),
                nonce: pb::get_bytes(&m, 5).unwrap_or_default(),
            },
            5 => Auth::ChallengeReply {
                challenge: pb::get_int(&m, 1).unwrap_or(0),
                digest: pb::get_bytes(&m, 2).unwrap_or_default(),
                nonce: pb::get_bytes(&m, 3).unwrap_or_default(),
            },
            6 => Auth::Ack(pb::get_bytes(&m, 1).unwrap_or_default()),
            _ => Auth::Other,
        })
    }
}

/// One raw cluster connection: `u64` big-endian length, then the protobuf.
struct Wire(TcpStream);

impl Wire {
    fn new(stream: TcpStream) -> Wire {
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        Wire(stream)
    }

    fn send(&mut self, msg: &Auth) {
        let body = msg.encode();
        let mut frame = (body.len() as u64).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        // A peer that already hung up is not an error here: what it did is checked after.
        let _ = self.0.write_all(&frame);
    }

    /// The next handshake message; `None` when the peer closed the connection (or said
    /// nothing for 3 s).
    fn recv(&mut self) -> Option<Auth> {
        let mut len = [0u8; 8];
        self.0.read_exact(&mut len).ok()?;
        let len = u64::from_be_bytes(len) as usize;
        assert!(len < 1 << 20, "a handshake frame of {len} bytes");
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).ok()?;
        Some(Auth::decode(&body).expect("a handshake message"))
    }
}

#[test]
fn a_relayed_handshake_authenticates_neither_session() {
    // The rogue's listener, which A dials as a static peer.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let rogue_addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(false).expect("blocking");
    let a = Node::start(COOKIE, &[rogue_addr]);
    let b = Node::start(COOKIE, &[a.cluster]);
    let a_id = a.id();
    assert!(
        eventually(Duration::from_secs(15), "the cluster to form", || a
            .snapshot()
            .members
            .len()
            == 2
            && b.snapshot().master == Some(a_id.to_string()))
        .is_ok(),
        "cluster did not form\n{}",
        logs(&[&a, &b])
    );
    let (before_a, before_b) = (a.snapshot(), b.snapshot());
    let accept = |listener: &TcpListener| {
        let (tx, rx) = std::sync::mpsc::channel();
        let l = listener.try_clone().expect("clone");
        std::thread::spawn(move || {
            let _ = tx.send(l.accept().map(|(s, _)| s));
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("A dialed the rogue")
            .expect("accept")
    };

    // S2: A dials the rogue; A is the client and names itself.
    let mut s2 = Wire::new(accept(&listener));
    let Some(Auth::Name(a_name)) = s2.recv() else {
        panic!("A did not open with its name");
    };
    assert!(a_name.starts_with(a_id.as_str()), "{a_name}");

    // S1: the rogue dials A under a made-up name X; A (server) challenges it.
    let x_name = format!("{}@127.0.0.1", random_id());
    let mut s1 = Wire::new(TcpStream::connect(a.cluster).expect("connect"));
    s1.send(&Auth::Name(x_name.clone()));
    let status = s1.recv();
    assert!(
        matches!(status, Some(Auth::ServerStatus(0))),
        "A's status: {status:?}"
    );
    let Some(Auth::Challenge {
        name: server_name,
        challenge,
        nonce: a_nonce,
    }) = s1.recv()
    else {
        panic!("A sent no challenge");
    };
    assert_eq!(server_name, a_name);
    assert_eq!(a_nonce.len(), 32, "A's challenge carries its nonce");

    // On S2 the rogue plays the server X and hands A its own challenge (value and nonce).
    s2.send(&Auth::ServerStatus(0));
    s2.send(&Auth::Challenge {
        name: x_name.clone(),
        challenge,
        nonce: a_nonce.clone(),
    });
    let Some(Auth::ChallengeReply {
        challenge: a_challenge,
        digest,
        nonce: a_client_nonce,
    }) = s2.recv()
    else {
        panic!("A did not answer the reflected challenge");
    };
    // Relay A's answer into S1: the same nonces; only the names (and who proves) differ.
    s1.send(&Auth::ChallengeReply {
        challenge: a_challenge,
        digest: digest.clone(),
        nonce: a_client_nonce,
    });
    let answer = s1.recv();
    assert!(
        answer.is_none(),
        "the relayed answer was accepted: A answered {answer:?}"
    );
    // And A's own digest, reflected as the server's proof, does not fool A's client side.
    s2.send(&Auth::Ack(digest));
    let answer = s2.recv();
    assert!(
        answer.is_none(),
        "A went on after a reflected ack: {answer:?}"
    );
    let log = || a.log();
    assert!(
        eventually(Duration::from_secs(3), "the condition", || log()
            .contains("different cookie")
            && log().contains("the server's proof does not match"))
        .is_ok(),
        "A did not log both refusals\n{}",
        tail(&a.log(), 30)
    );

    // The only alignment under which A's proof would fit: X = A's own name on S1, and A's
    // name presented back to A on S2. Both ends refuse it before any proof is made.
    let mut s1 = Wire::new(TcpStream::connect(a.cluster).expect("connect"));
    s1.send(&Auth::Name(a_name.clone()));
    let answer = s1.recv();
    assert!(answer.is_none(), "A went on with its own name: {answer:?}");
    let mut s2 = Wire::new(accept(&listener));
    assert!(matches!(s2.recv(), Some(Auth::Name(_))));
    s2.send(&Auth::ServerStatus(0));
    s2.send(&Auth::Challenge {
        name: a_name.clone(),
        challenge,
        nonce: a_nonce,
    });
    let answer = s2.recv();
    assert!(
        answer.is_none(),
        "A answered a challenge in its own name: {answer:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), "the condition", || a
            .log()
            .contains("claims this node's own name")
            && a.log().contains("presents this node's own name"))
        .is_ok(),
        "A did not log the own-name refusals\n{}",
        tail(&a.log(), 30)
    );

    drop((s1, s2));
    std::thread::sleep(Duration::from_millis(300));
    assert_unchanged(&a, &before_a, "the relay");
    assert_unchanged(&b, &before_b, "the relay");
    assert!(!a.state().to_string().contains(&x_name[..32]));
}

// ---------------------------------------------------------------------------------------------
// 3. An insider: the cookie, a fresh name.

/// A plan naming `leader`, term `term` and a version above any real one, that puts an
/// instance `forged-instance` of the scripted model on `node`.
fn forged_plan(leader: &NodeId, term: u64, node: &NodeId) -> Vec<u8> {
    let mut plan = Plan::empty(leader.clone());
    plan.term = term;
    plan.version = 1 << 40;
    plan.instances.insert(
        "forged-instance".into(),
        PlannedInstance {
            model: "scripted".into(),
            source: "scripted".into(),
            node: Some(node.clone()),
            state: PlanState::Active,
            attempts: 0,
            request: None,
        },
    );
    encode(&AppMsg::Plan(Box::new(plan))).expect("encodes")
}

/// Makes `rogue` report to `leader`, every 300 ms until it is dropped, a Ready instance
/// `instance` of `model` that only it serves (the leader adopts it).
fn report_ready_forever(
    rt: &tokio::runtime::Runtime,
    rogue: &mut Rogue,
    leader: &NodeId,
    instance: &str,
    model: &str,
) {
    let report = encode(&AppMsg::Report(NodeReport {
        node: rogue.id.clone(),
        api: None,
        mem_available: 0,
        instances: vec![InstanceReport {
            id: instance.into(),
            model: model.into(),
            source: model.into(),
            status: RunnerStatus::Ready,
            pid: None,
            restarts: 0,
            last_failure: None,
            error: None,
        }],
    }))
    .expect("encodes");
    let (sessions, id, leader) = (rogue.sessions.clone(), rogue.id.clone(), leader.clone());
    rogue.tasks.push(rt.spawn(async move {
        loop {
            let report = Envelope::App {
                from: id.clone(),
                payload: report.clone(),
            };
            let _ = cast_to(&sessions, &leader, &sessions, report);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }));
}

/// A rogue with the cookie that dials `nodes`, beats like a (junior, priority 0) member
/// following `leader` at `term`, and is seen as a member by every one of them.
fn insider(
    rt: &tokio::runtime::Runtime,
    nodes: &[(&Node, NodeId)],
    leader: &NodeId,
    term: u64,
) -> Rogue {
    let mut rogue = rt.block_on(Rogue::start(COOKIE, random_id()));
    *rogue.beat.lock().expect("beat") = BeatPlan {
        term,
        leader: Some(leader.clone()),
        started_ms: None,
    };
    rt.block_on(rogue.become_member());
    for (node, id) in nodes {
        rt.block_on(rogue.join(node, id));
    }
    for (node, _) in nodes {
        let id = rogue.id.to_string();
        assert!(
            eventually(Duration::from_secs(5), "the condition", || node
                .snapshot()
                .members
                .contains_key(&id))
            .is_ok(),
            "the insider's own, correctly sealed beats did not make it a member\n{}",
            tail(&node.log(), 30)
        );
    }
    rogue
}

/// The key of `rogue`'s live session with `peer`.
fn key_with(rogue: &Rogue, peer: &NodeId) -> SessionKey {
    rogue.sessions.route(peer).expect("a session").key
}

#[test]
fn an_insider_cannot_act_in_another_name_as_the_leader_or_break_the_term() {
    let rt = runtime();
    let _guard = rt.enter();
    let (a, b) = two_node_cluster();
    let (a_id, b_id) = (a.id(), b.id());
    let term = a.snapshot().term;
    // Joining is expected (it has the cookie); its own beats make it a member.
    let mut r1 = insider(&rt, &[(&a, a_id.clone()), (&b, b_id.clone())], &a_id, term);
    std::thread::sleep(Duration::from_millis(300));
    let (before_a, before_b) = (a.snapshot(), b.snapshot());
    assert_eq!(before_a.master.as_deref(), Some(a_id.as_str()));
    assert_eq!(before_b.master.as_deref(), Some(a_id.as_str()));
    assert_eq!(before_a.members.len(), 3, "{before_a:?}");

    // (a) Beats in the other real node's name that, if believed, would make it the master
    // (highest priority) with a bogus address. To A: forged under the rogue's own session
    // key (a bad seal). To B: sealed in the rogue's name, naming A inside.
    let bogus: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let beat_as = |who: &NodeId| {
        Envelope::Beat(Beat {
            from: who.clone(),
            seq: 1 << 30,
            addr: bogus,
            started_ms: 0,
            priority: i32::MAX,
            term: term + 1,
            leader: Some(who.clone()),
        })
    };
    let as_b = forger(&b_id, &a_id, key_with(&r1, &a_id));
    holds_for(Duration::from_millis(1500), || {
        assert!(cast_to(&r1.sessions, &a_id, &as_b, beat_as(&b_id)));
        assert!(cast_to(&r1.sessions, &b_id, &r1.sessions, beat_as(&a_id)));
        let (sa, sb) = (a.snapshot(), b.snapshot());
        if sa != before_a || sb != before_b {
            return Err(format!("a forged beat moved a node: {sa:?} / {sb:?}"));
        }
        Ok(())
    });
    assert!(
        eventually(Duration::from_secs(2), "the condition", || a
            .log()
            .contains("whose seal does not match"))
        .is_ok(),
        "A did not log the bad seal\n{}",
        tail(&a.log(), 20)
    );
    assert!(
        eventually(Duration::from_secs(2), "the condition", || b
            .log()
            .contains("as its sender"))
        .is_ok(),
        "B did not log the sender mismatch\n{}",
        tail(&b.log(), 20)
    );

    // (b) Plans: in the rogue's own name (as leader, and naming A as leader inside), and
    // forged in A's name; each would put an instance on B with a version above A's.
    let as_a = forger(&a_id, &b_id, key_with(&r1, &b_id));
    for _ in 0..3 {
        for (sealer, plan) in [
            (&*r1.sessions, forged_plan(&r1.id, term, &b_id)),
            (&*r1.sessions, forged_plan(&a_id, term, &b_id)),
            (&as_a, forged_plan(&a_id, term, &b_id)),
        ] {
            let from = sealer.me().clone();
            assert!(cast_to(
                &r1.sessions,
                &b_id,
                sealer,
                Envelope::App {
                    from,
                    payload: plan
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(800));
    // The plan forged in A's name does not open under B's session with the rogue: B counts it.
    let (_, metrics) = b.proc.get("/metrics").expect("B's metrics");
    assert!(
        common::metric(&metrics, "canopy_cluster_refused_frames_total") >= 1.0,
        "B did not count the frames it refused:\n{metrics}"
    );
    for node in [&a, &b] {
        assert!(
            !node.state().to_string().contains("forged-instance"),
            "a plan from a node that does not lead was taken\n{}",
            tail(&node.log(), 20)
        );
    }
    assert_unchanged(&a, &before_a, "(a) forged beats and (b) forged plans");
    assert_unchanged(&b, &before_b, "(a) forged beats and (b) forged plans");

    // Sends the beat five times to both real nodes, 100 ms apart, in the rogue's own name
    // (correctly sealed), then checks that neither node changed and that both said why.
    let beat_storm = |beat: Beat, what: &str, logged: &str| {
        for _ in 0..5 {
            for peer in [&a_id, &b_id] {
                let beat = Envelope::Beat(beat.clone());
                assert!(cast_to(&r1.sessions, peer, &r1.sessions, beat));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        assert_unchanged(&a, &before_a, what);
        assert_unchanged(&b, &before_b, what);
        for node in [&a, &b] {
            assert!(node.log().contains(logged), "{}", tail(&node.log(), 20));
        }
    };

    // (c) A beat at the top of the term space.
    beat_storm(
        Beat {
            from: r1.id.clone(),
            seq: 1,
            addr: r1.addr,
            started_ms: now_ms(),
            priority: 0,
            term: u64::MAX,
            leader: Some(a_id.clone()),
        },
        "(c) a beat with term u64::MAX",
        "dropped a beat with an implausible term",
    );

    // (f) Beats with a sane term that claim the top of the election (started at 0, the
    // highest priority): a member's rank is fixed for its session, so the claim changes
    // nothing.
    beat_storm(
        Beat {
            from: r1.id.clone(),
            seq: 1,
            addr: r1.addr,
            started_ms: 0,
            priority: i32::MAX,
            term,
            leader: Some(r1.id.clone()),
        },
        "(f) beats that raise the sender's rank",
        "changes the peer's start time, priority or address",
    );

    // (e) Garbage: an undecodable frame, a frame sealed for B sent to A, an unknown message
    // variant, a call with garbage, and raw TCP garbage on a fresh connection.
    let inbox_a = remote_inbox(&r1.sessions, &a_id).expect("A's inbox");
    assert!(cast_raw(&r1.sessions, &a_id, vec![0xc1, 0xff, 0x00, 0x13]));
    let for_b = r1
        .sessions
        .seal(&b_id, beat_as(&r1.id).encode().expect("encodes"))
        .expect("seals");
    assert!(cast_raw(&r1.sessions, &a_id, for_b));
    let _ = inbox_a
        .get_cell()
        .send_serialized(ractor::message::SerializedMessage::Cast {
            variant: "NoSuchVariant".into(),
            args: vec![0xde, 0xad],
            metadata: None,
        });
    let answer = rt.block_on(inbox_a.call(
        |reply| InboxMsg::Call(b"not a sealed frame".to_vec(), reply),
        Some(Duration::from_millis(500)),
    ));
    assert!(
        !matches!(answer, Ok(ractor::rpc::CallResult::Success(_))),
        "a garbage call was answered"
    );
    for garbage in [u64::MAX.to_be_bytes().to_vec(), vec![0x5a; 4096]] {
        let mut tcp = TcpStream::connect(a.cluster).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let _ = tcp.write_all(&garbage);
        let mut buf = [0u8; 64];
        let closed = matches!(tcp.read(&mut buf), Ok(0) | Err(_));
        assert!(closed, "A kept a connection that sent garbage");
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        a.snapshot().members.contains_key(r1.id.as_str()),
        "the rogue's own session did not survive its garbage"
    );
    assert_unchanged(&a, &before_a, "(e) garbage");
    assert_unchanged(&b, &before_b, "(e) garbage");

    // (d) A stream hosted by R1, attacked by a second insider R2 that knows its key.
    // R1 reports a Ready instance of a model only it serves; the leader adopts it.
    report_ready_forever(&rt, &mut r1, &a_id, "rogue-instance", "rogue-model");
    assert!(
        eventually(Duration::from_secs(5), "the condition", || a
            .state()
            .to_string()
            .contains("rogue-instance"))
        .is_ok(),
        "the leader did not adopt the rogue's instance\n{}",
        tail(&a.log(), 20)
    );
    // R2: another insider. Its node server first burns a few session numbers, so that its
    // sessions' remote actors here never share an id with R1's.
    let r2 = {
        let burn = TcpListener::bind("127.0.0.1:0").expect("bind");
        let burn_addr = burn.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in burn.incoming().take(4) {
                drop(s);
            }
        });
        let mut r2 = rt.block_on(Rogue::start(COOKIE, random_id()));
        for _ in 0..4 {
            rt.block_on(r2.dial(burn_addr));
        }
        *r2.beat.lock().expect("beat") = BeatPlan {
            term,
            leader: Some(a_id.clone()),
            started_ms: None,
        };
        rt.block_on(r2.become_member());
        rt.block_on(r2.join(&a, &a_id));
        r2
    };
    let client = {
        let base = a.proc.base.clone();
        std::thread::spawn(move || {
            let node = NodeProcess::client(base);
            let mut text = String::new();
            let status = node.stream(
                &json!({
                    "model": "rogue-model",
                    "stream": true,
                    "max_tokens": 8,
                    "messages": [{ "role": "user", "content": "hello" }],
                }),
                |data, _| {
                    if let Ok(v) = serde_json::from_str::<Value>(data)
                        && let Some(t) = v["choices"][0]["delta"]["content"].as_str()
                    {
                        text.push_str(t);
                    }
                },
            );
            (status, text)
        })
    };
    let (origin, key) = r1
        .submits
        .as_ref()
        .expect("inbox")
        .recv_timeout(Duration::from_secs(10))
        .expect("A sent R1 the task");
    assert_eq!(origin, a_id);
    let chunk = |text: &str| {
        TaskEvent::Chunk(TokenChunk {
            index: 0,
            text: text.into(),
            token_ids: vec![1],
            logprobs: Vec::new(),
        })
    };
    let done = TaskEvent::Done {
        finish_reason: FinishReason::Stop,
        usage: Usage {
            prompt_tokens: 1,
            completion_tokens: 1,
        },
    };
    let event = |from: &NodeId, key: u64, event: TaskEvent| Envelope::App {
        from: from.clone(),
        payload: encode(&AppMsg::Event { key, event }).expect("encodes"),
    };
    // R2 injects into R1's stream, tries to end it, and guesses at other keys.
    for k in [key, key.wrapping_add(1), key.wrapping_sub(1), 1, 2, 3] {
        assert!(cast_to(
            &r2.sessions,
            &a_id,
            &r2.sessions,
            event(&r2.id, k, chunk("INJECTED"))
        ));
    }
    assert!(cast_to(
        &r2.sessions,
        &a_id,
        &r2.sessions,
        event(&r2.id, key, done.clone())
    ));
    std::thread::sleep(Duration::from_millis(300));
    // The host's own events go through.
    assert!(cast_to(
        &r1.sessions,
        &a_id,
        &r1.sessions,
        event(&r1.id, key, chunk("from the host"))
    ));
    assert!(cast_to(
        &r1.sessions,
        &a_id,
        &r1.sessions,
        event(&r1.id, key, done)
    ));
    let (status, text) = client.join().expect("client");
    assert_eq!(status, 200);
    assert_eq!(
        text, "from the host",
        "the client saw another node's events"
    );
    assert!(
        a.log()
            .contains("dropped an event for a stream another node serves"),
        "{}",
        tail(&a.log(), 20)
    );
    let (after_a, after_b) = (a.snapshot(), b.snapshot());
    assert_eq!(after_a.master, before_a.master);
    assert_eq!(after_b.master, before_b.master);
    assert_eq!((after_a.term, after_b.term), (term, term));

    rt.block_on(r2.stop());
    rt.block_on(r1.stop());
    assert!(a.healthy() && b.healthy());
}

/// An insider with the cookie claims the leader A's name towards the follower B. The session
/// election of `ractor_cluster` (`vendor/ractor_cluster/src/node.rs`, `elect_sessions`) alone
/// would let an incoming connection in A's name displace B's authenticated outgoing session to
/// A when A's name sorts after B's, so the impostor would hold B's session key for A and its
/// beats and plans in A's name would be believed; the vendored patch makes a ready session an
/// incumbent that a later session for the same name never displaces.
#[test]
fn an_insider_cannot_take_another_members_name() {
    let rt = runtime();
    let _guard = rt.enter();
    // A's name sorts after B's: the election of `elect_sessions` prefers B's incoming
    // connections from "A".
    let (a, b) = two_node_cluster_as(Some(&"f".repeat(32)), Some(&"1".repeat(32)));
    let (a_id, b_id) = (a.id(), b.id());
    let (before_a, before_b) = (a.snapshot(), b.snapshot());
    let mut impostor = rt.block_on(Rogue::start(COOKIE, a_id.clone()));
    *impostor.beat.lock().expect("beat") = BeatPlan {
        term: before_b.term,
        leader: Some(a_id.clone()),
        started_ms: Some(0),
    };
    rt.block_on(impostor.become_member());
    rt.block_on(impostor.dial(b.cluster));
    let joined = rt
        .block_on(impostor.wait_event("ready", Some(b_id.as_str()), Duration::from_secs(2)))
        .is_some();
    if joined
        && eventually(Duration::from_secs(2), "the condition", || {
            remote_inbox(&impostor.sessions, &b_id).is_some()
        })
        .is_ok()
    {
        impostor.peers.lock().expect("peers").push(b_id.clone());
        std::thread::sleep(Duration::from_millis(600));
        for _ in 0..5 {
            let plan = Envelope::App {
                from: a_id.clone(),
                payload: forged_plan(&a_id, b.snapshot().term, &b_id),
            };
            let _ = cast_to(&impostor.sessions, &b_id, &impostor.sessions, plan);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let b_state = b.state().to_string();
    rt.block_on(impostor.stop());
    assert!(
        !b_state.contains("forged-instance"),
        "B took the impostor's plan as A's\n{}",
        tail(&b.log(), 30)
    );
    assert!(
        !joined,
        "B authenticated a second session in A's name (the impostor's)\n{}",
        tail(&b.log(), 30)
    );
    assert_unchanged(&b, &before_b, "an insider in A's name");
    assert_unchanged(&a, &before_a, "an insider in A's name");
}

// ---------------------------------------------------------------------------------------------
// 4. A 1 MiB model name.

#[test]
fn a_one_mebibyte_model_name_is_refused_and_nothing_flaps() {
    let (a, b) = two_node_cluster();
    let (before_a, before_b) = (a.snapshot(), b.snapshot());
    let flaps = |n: &Node| n.log().matches("peer left the cluster").count();
    let (flaps_a, flaps_b) = (flaps(&a), flaps(&b));
    // Exactly as the issue has it: past the API's 1 MiB body limit (413), or refused by the
    // placement's own bound (400): either way refused.
    let body = format!(r#"{{"model": "{}", "instances": 6}}"#, "x".repeat(1 << 20));
    // The node may answer before it has read the whole body and close the connection, which
    // the client can see as a failed send: that is a refusal too.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let status = agent
        .post(format!("{}/instances", b.proc.base))
        .header("Content-Type", "application/json")
        .send(body.as_bytes())
        .map(|r| r.status().as_u16());
    assert!(
        matches!(status, Ok(400 | 413) | Err(_)),
        "a 1 MiB model name was not refused: {status:?}"
    );
    // A name that fits the body limit reaches the placement, which refuses it: 400.
    let body = format!(
        r#"{{"model": "{}", "instances": 6}}"#,
        "x".repeat((1 << 20) - 64)
    );
    for node in [&a, &b] {
        let (status, answer) = node.proc.post_raw("/instances", body.as_bytes());
        assert_eq!(status, 400, "{}", &answer[..answer.len().min(300)]);
    }
    // The plan does not grow, and the sessions do not flap.
    holds_for(Duration::from_secs(3), || {
        let (sa, sb) = (a.snapshot(), b.snapshot());
        if sa != before_a || sb != before_b {
            return Err(format!("the view changed: {sa:?} / {sb:?}"));
        }
        Ok(())
    });
    assert_eq!(
        (flaps(&a), flaps(&b)),
        (flaps_a, flaps_b),
        "{}",
        logs(&[&a, &b])
    );
    assert_unchanged(&a, &before_a, "a 1 MiB model name");
    assert_unchanged(&b, &before_b, "a 1 MiB model name");
    assert!(a.state()["plan_version"] == b.state()["plan_version"]);
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS.

/// Runs `canopy cluster certs --dir DIR --node NAME...`; returns each node's three flags.
fn make_certs(dir: &std::path::Path, nodes: &[&str]) -> Vec<Vec<String>> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy"));
    cmd.args(["cluster", "certs", "--dir"]).arg(dir);
    for n in nodes {
        cmd.args(["--node", n]);
    }
    let out = cmd.output().expect("canopy cluster certs runs");
    assert!(
        out.status.success(),
        "canopy cluster certs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = |name: &str| dir.join(name).display().to_string();
    nodes
        .iter()
        .map(|n| {
            vec![
                "--tls-cert".into(),
                path(&format!("{n}.pem")),
                "--tls-key".into(),
                path(&format!("{n}-key.pem")),
                "--tls-ca".into(),
                path("ca.pem"),
            ]
        })
        .collect()
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn tls_nodes_form_serve_across_and_refuse_peers_without_the_cas_certificate() {
    let certs = tempfile::tempdir().expect("tempdir");
    let other_ca = tempfile::tempdir().expect("tempdir");
    let flags = make_certs(certs.path(), &["a", "b"]);
    let foreign = make_certs(other_ca.path(), &["x"]);

    let a = Node::start_with(None, COOKIE, &[], &strs(&flags[0]));
    // A peer that opens a TCP connection and never starts TLS: the listener must go on
    // accepting others while this one waits for its handshake.
    let silent = TcpStream::connect(a.cluster).expect("connect");
    let b = Node::start_with(None, COOKIE, &[a.cluster], &strs(&flags[1]));
    let a_id = a.id().to_string();
    let formed = eventually(Duration::from_secs(20), "the TLS cluster to form", || {
        let (sa, sb) = (a.snapshot(), b.snapshot());
        sa.members.len() == 2 && sb.members.len() == 2 && sb.master.as_deref() == Some(&a_id)
    });
    if let Err(why) = formed {
        panic!("{why}\n{}", logs(&[&a, &b]));
    }
    assert!(
        a.log().contains("cluster sessions use mutual TLS"),
        "{}",
        a.log()
    );

    // The data path works through TLS: an instance on A, a request to B.
    let (status, placed) = a.proc.post(
        "/instances",
        &json!({"model": "scripted", "node": a_id, "wait": 30}),
    );
    assert_eq!(status, 201, "{placed}\n{}", logs(&[&a, &b]));
    // B routes to it once the plan that carries A's Ready instance reaches it (within the
    // republish period).
    let routed = eventually(
        Duration::from_secs(10),
        "B to route to A's instance",
        || {
            b.proc
                .post(
                    "/v1/chat/completions",
                    &common::chat_body("scripted", "hi", 2, false),
                )
                .0
                == 200
        },
    );
    assert!(routed.is_ok(), "{}", logs(&[&a, &b]));
    let mut text = String::new();
    let status = b.proc.stream(
        &common::chat_body("scripted", "hello over tls", 6, true),
        |event, _| {
            if let Ok(v) = serde_json::from_str::<Value>(event)
                && let Some(t) = v["choices"][0]["delta"]["content"].as_str()
            {
                text.push_str(t);
            }
        },
    );
    assert_eq!(status, 200, "{}", logs(&[&a, &b]));
    assert!(!text.is_empty(), "no text streamed\n{}", logs(&[&a, &b]));

    // The cookie alone is not enough, and neither is a certificate from another CA.
    let before = a.snapshot();
    let plain = Node::start_with(None, COOKIE, &[a.cluster], &[]);
    let intruder = Node::start_with(None, COOKIE, &[a.cluster], &strs(&foreign[0]));
    holds_for(Duration::from_secs(4), || {
        for node in [&a, &b] {
            let now = node.snapshot();
            if now.members != before.members {
                return Err(format!("membership changed: {now:?}"));
            }
        }
        for outsider in [&plain, &intruder] {
            let members = outsider.snapshot().members.len();
            if members > 1 {
                return Err(format!("an outsider has {members} members"));
            }
        }
        Ok(())
    });
    assert!(a.healthy() && b.healthy());
    // Each refusal names its cause: the intruder's dial says its TLS handshake failed (A's
    // certificate is not from the CA it trusts), and A says the plain node does not speak TLS.
    assert!(
        intruder.log().contains("TLS handshake with a peer failed"),
        "the intruder did not say why it cannot join\n{}",
        logs(&[&intruder])
    );
    assert!(
        a.log().contains("does not speak TLS"),
        "A did not say why the plain node was refused\n{}",
        logs(&[&a])
    );
    drop(silent);
}
