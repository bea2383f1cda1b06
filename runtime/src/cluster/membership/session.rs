//! `NodeServer` session events: the subscription that installs session keys before a
//! session is ready, and what the cluster actor does when a session opens, authenticates,
//! becomes ready or ends.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::node::{NodeEventSubscription, NodeServerSessionInformation};

use super::{ClusterMsg, ClusterState, Peer, SessionInfo, peer_id};
use crate::cluster::peer::{PeerArgs, PeerMonitor};
use crate::cluster::seal::{SessionKey, Sessions};

/// A `NodeServer` session event.
#[derive(Debug)]
pub enum SessionEvent {
    /// A connection opened.
    Opened(NodeServerSessionInformation),
    /// It authenticated.
    Authenticated(NodeServerSessionInformation),
    /// It finished its state exchange.
    Ready(NodeServerSessionInformation),
    /// It closed.
    Disconnected(NodeServerSessionInformation),
}

/// Forwards the `NodeServer`'s session events to the cluster actor, and installs and removes
/// session keys at once: the `NodeServer` calls it before the session tells the peer it is
/// ready, so the key is in place before the peer's first message can arrive.
pub(super) struct Subscription {
    pub(super) cluster: ActorRef<ClusterMsg>,
    pub(super) sessions: Arc<Sessions>,
}

impl NodeEventSubscription for Subscription {
    fn node_session_opened(&self, ses: NodeServerSessionInformation) {
        let _ = self
            .cluster
            .cast(ClusterMsg::Session(SessionEvent::Opened(ses)));
    }
    fn node_session_disconnected(&self, ses: NodeServerSessionInformation) {
        if let Some(id) = peer_id(&ses) {
            self.sessions.remove(&id, ses.node_id);
        }
        let _ = self
            .cluster
            .cast(ClusterMsg::Session(SessionEvent::Disconnected(ses)));
    }
    fn node_session_authenticated(&self, ses: NodeServerSessionInformation) {
        match (peer_id(&ses), ses.session_key) {
            (Some(id), Some(key)) if &id != self.sessions.me() => {
                self.sessions
                    .install(id, SessionKey::new(*key.as_bytes()), ses.node_id);
            }
            _ => {}
        }
        let _ = self
            .cluster
            .cast(ClusterMsg::Session(SessionEvent::Authenticated(ses)));
    }
    fn node_session_ready(&self, ses: NodeServerSessionInformation) {
        let _ = self
            .cluster
            .cast(ClusterMsg::Session(SessionEvent::Ready(ses)));
    }
}

pub(super) async fn handle_session(
    myself: &ActorRef<ClusterMsg>,
    state: &mut ClusterState,
    event: SessionEvent,
) -> Result<(), ActorProcessingErr> {
    match event {
        SessionEvent::Opened(info) => {
            state.sessions.insert(
                info.actor.get_id(),
                SessionInfo {
                    authenticated: false,
                    peer_addr: info.peer_addr.clone(),
                },
            );
        }
        SessionEvent::Authenticated(info) => {
            if let Some(s) = state.sessions.get_mut(&info.actor.get_id()) {
                s.authenticated = true;
            }
        }
        SessionEvent::Ready(info) => {
            let Some(id) = peer_id(&info) else {
                tracing::warn!(addr = %info.peer_addr, "a peer without a valid node id connected; dropping it");
                info.actor.stop(Some("invalid node id".into()));
                return Ok(());
            };
            if id == *state.me() {
                info.actor.stop(Some("connection to self".into()));
                return Ok(());
            }
            if state
                .args
                .sessions
                .route(&id)
                .is_none_or(|r| r.session != info.node_id)
            {
                tracing::warn!(peer = %id.short(), addr = %info.peer_addr,
                    "a session became ready without its handshake's key; dropping it");
                info.actor.stop(Some("no session key".into()));
                return Ok(());
            }
            let handover = state.peers.remove(&id).map(|old| {
                old.monitor.stop(None);
                old.beat
            });
            let (monitor, _) = Actor::spawn_linked(
                None,
                PeerMonitor,
                PeerArgs {
                    peer: id.clone(),
                    session: info.actor.clone(),
                    heartbeat: state.config().heartbeat,
                    beat: state.beat.subscribe(),
                    sessions: state.args.sessions.clone(),
                },
                myself.get_cell(),
            )
            .await?;
            match &handover {
                Some(_) => tracing::debug!(peer = %id.short(), addr = %info.peer_addr,
                    "the peer's new session is ready"),
                None => {
                    tracing::info!(peer = %id.short(), addr = %info.peer_addr, "peer connected")
                }
            }
            let registration = crate::introspect::register(&info.actor.get_cell(), "node-session");
            {
                let (peer, addr) = (id.to_string(), info.peer_addr.clone());
                registration.set_details(Arc::new(
                    move || serde_json::json!({ "peer": peer, "addr": addr }),
                ));
            }
            state.peers.insert(
                id,
                Peer {
                    session: info.actor.clone(),
                    session_node: info.node_id,
                    monitor,
                    // A handed-over peer keeps its pinned rank and address.
                    beat: handover.flatten(),
                    _session_registration: registration,
                },
            );
        }
        SessionEvent::Disconnected(info) => {
            let session = state.sessions.remove(&info.actor.get_id());
            let peer = state
                .peers
                .iter()
                .find(|(_, p)| p.session.get_id() == info.actor.get_id())
                .map(|(id, _)| id.clone());
            match (peer, session) {
                (Some(id), _) if superseded(state, &id, &info) => {
                    // Both nodes dialed at once and the race's winner already authenticated:
                    // the peer stays a member while its winning session gets ready (a
                    // winner that dies too leaves the peer without beats, and its monitor
                    // drops it as usual).
                    tracing::debug!(peer = %id.short(), reason = ?info.exit_reason,
                        "a simultaneous connection replaced this peer's session");
                }
                (Some(id), _) => {
                    state.remove_peer(&id, "its connection closed");
                    state.elect_and_publish();
                }
                (None, Some(s)) if !s.authenticated => {
                    let duplicate = peer_id(&info).is_some_and(|id| state.peers.contains_key(&id));
                    if !duplicate {
                        explain_refusal(&s.peer_addr, info.exit_reason.as_deref());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Whether `info`, the session of member `id` that just ended, was replaced by another session
/// of the same peer that has authenticated already (its key is the one installed now): the
/// loser of a simultaneous connect, stopped here (`duplicate_connection`,
/// `session_election_lost`) or by the peer's own election (then it ends here as a plain closed
/// connection). Either way the peer did not leave.
fn superseded(
    state: &ClusterState,
    id: &crate::cluster::NodeId,
    info: &NodeServerSessionInformation,
) -> bool {
    state
        .args
        .sessions
        .route(id)
        .is_some_and(|route| route.session != info.node_id)
}

/// Logs why a session that never authenticated ended, from the reason its session actor
/// stopped with: a wrong cookie or a node claiming this node's own name is worth a warning; the
/// loser of a simultaneous connect, or a connection closed before the handshake said anything,
/// is an ordinary race.
pub(super) fn explain_refusal(addr: &str, reason: Option<&str>) {
    match reason {
        Some("auth_fail: wrong_cookie") => tracing::warn!(
            addr,
            "refused a cluster connection that did not authenticate: the other node has a different cookie"
        ),
        Some("auth_fail: own_name") => tracing::warn!(
            addr,
            "refused a cluster connection from a node that claims this node's own name"
        ),
        Some("auth_fail: legacy_handshake") => tracing::warn!(
            addr,
            "refused a cluster connection that uses the old handshake without nonces (an older canopy or a plain ractor_cluster node)"
        ),
        Some("auth_fail") => tracing::warn!(
            addr,
            "a cluster handshake failed: the other node refused this one (a different cookie, see that node's log)"
        ),
        Some("duplicate_connection" | "session_election_lost") => {
            tracing::debug!(addr, "a simultaneous cluster connection was settled")
        }
        other => {
            tracing::debug!(addr, reason = ?other, "a cluster connection closed before it authenticated")
        }
    }
}
