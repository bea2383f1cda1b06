//! [`ClusterHandle`]: how the domain actors send application messages to other nodes (cast
//! and call, sealed for the peer's own session) and read the view.

use std::sync::Arc;
use std::time::Duration;

use ractor::{ActorRef, RpcReplyPort};
use tokio::sync::watch;

use super::ClusterView;
use crate::cluster::chunk::{CHUNK_BYTES, MAX_MESSAGE_BYTES, split};
use crate::cluster::discovery::{DiscoveryCounts, DiscoveryStats};
use crate::cluster::identity::NodeId;
use crate::cluster::seal::Sessions;
use crate::cluster::wire::{Envelope, InboxMsg, inbox_group};

/// An application message from a peer (or from this node to itself).
pub struct Incoming {
    /// The sender.
    pub from: NodeId,
    /// The application's bytes.
    pub payload: Vec<u8>,
    /// Where to answer, for a call.
    pub reply: Option<RpcReplyPort<Vec<u8>>>,
}

/// Why a message to a peer could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    /// The peer is not connected (or its inbox is not known yet).
    #[error("node {0} is not connected")]
    NotConnected(NodeId),
    /// The peer did not answer in time, or its session closed while waiting (ractor can
    /// report a remote timeout either way).
    #[error("node {0} did not answer in time")]
    Timeout(NodeId),
    /// The message could not be encoded or sealed.
    #[error("cannot encode a message for node {node}: {reason}")]
    Encode {
        /// The peer.
        node: NodeId,
        /// Why.
        reason: String,
    },
    /// The message could not be sent.
    #[error("cannot send to node {node}: {reason}")]
    Send {
        /// The peer.
        node: NodeId,
        /// Why.
        reason: String,
    },
}

/// Sends application messages to other nodes and reads the view. Cheap to clone.
#[derive(Clone)]
pub struct ClusterHandle {
    pub(super) me: NodeId,
    pub(super) view: watch::Receiver<ClusterView>,
    pub(super) events: tokio::sync::broadcast::Sender<super::MembershipEvent>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) discovery: DiscoveryStats,
}

/// The inbox of `peer` reached through `peer`'s own authenticated session (not a member of its
/// process group that another node advertised), or this node's own inbox.
pub(crate) fn peer_inbox(sessions: &Sessions, peer: &NodeId) -> Option<ActorRef<InboxMsg>> {
    let members = ractor::pg::get_members(&inbox_group(peer));
    if peer == sessions.me() {
        return members
            .into_iter()
            .find(|c| c.get_id().is_local())
            .map(ActorRef::from);
    }
    let route = sessions.route(peer)?;
    members
        .into_iter()
        .find(|c| !c.get_id().is_local() && c.get_id().node() == route.session)
        .map(ActorRef::from)
}

impl ClusterHandle {
    /// This node's id.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The current view.
    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// A receiver that wakes on every change of the view.
    pub fn subscribe(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// A receiver of membership and election changes from now on (joins, departures with
    /// their reason, new leaders).
    pub fn membership_events(&self) -> tokio::sync::broadcast::Receiver<super::MembershipEvent> {
        self.events.subscribe()
    }

    fn inbox(&self, to: &NodeId) -> Result<ActorRef<InboxMsg>, ClusterError> {
        peer_inbox(&self.sessions, to).ok_or_else(|| ClusterError::NotConnected(to.clone()))
    }

    fn envelope(&self, to: &NodeId, payload: Vec<u8>) -> Result<Vec<u8>, ClusterError> {
        self.seal(
            to,
            Envelope::App {
                from: self.me.clone(),
                payload,
            },
        )
    }

    fn seal(&self, to: &NodeId, envelope: Envelope) -> Result<Vec<u8>, ClusterError> {
        let encode = |reason: String| ClusterError::Encode {
            node: to.clone(),
            reason,
        };
        let body = envelope.encode().map_err(|e| encode(e.to_string()))?;
        self.sessions.seal(to, body).map_err(|e| match e {
            crate::cluster::seal::SealError::UnknownSender(_) => {
                ClusterError::NotConnected(to.clone())
            }
            other => encode(other.to_string()),
        })
    }

    /// Messages from peers refused so far because their seal did not check out (a forged
    /// sender, a frame for another node, garbage).
    pub fn refused_frames(&self) -> u64 {
        self.sessions.stats().total()
    }

    /// Discovery datagrams refused so far (forged or altered beacons, beacons of another
    /// cookie, stale or replayed ones, other versions, garbage); beacons of another discovery
    /// namespace are not counted. Zero when discovery is off.
    pub fn dropped_beacons(&self) -> u64 {
        self.discovery.dropped()
    }

    /// The discovery counters by reason (accepted beacons included).
    pub fn discovery_counts(&self) -> DiscoveryCounts {
        self.discovery.snapshot()
    }

    /// Sends `payload` to node `to` (possibly this node) without waiting. A payload over
    /// [`CHUNK_BYTES`] goes to another node in chunks (see [`crate::cluster::chunk`]); one
    /// over [`MAX_MESSAGE_BYTES`] is refused.
    pub fn send(&self, to: &NodeId, payload: Vec<u8>) -> Result<(), ClusterError> {
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(ClusterError::Encode {
                node: to.clone(),
                reason: format!(
                    "a message of {} bytes; the limit is {MAX_MESSAGE_BYTES}",
                    payload.len()
                ),
            });
        }
        let inbox = self.inbox(to)?;
        let cast = |bytes: Vec<u8>| {
            inbox
                .cast(InboxMsg::Cast(bytes))
                .map_err(|e| ClusterError::Send {
                    node: to.clone(),
                    reason: e.to_string(),
                })
        };
        if payload.len() <= CHUNK_BYTES || to == &self.me {
            return cast(self.envelope(to, payload)?);
        }
        let id = rand::random::<u64>();
        let parts = split(&payload);
        let total = parts.len() as u32;
        for (index, part) in parts.into_iter().enumerate() {
            cast(self.seal(
                to,
                Envelope::Chunk {
                    from: self.me.clone(),
                    id,
                    index: index as u32,
                    total,
                    bytes: part.to_vec(),
                },
            )?)?;
        }
        Ok(())
    }

    /// Sends `payload` to node `to` and waits up to `timeout` for its answer.
    pub async fn call(
        &self,
        to: &NodeId,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClusterError> {
        let inbox = self.inbox(to)?;
        let bytes = self.envelope(to, payload)?;
        match inbox
            .call(|reply| InboxMsg::Call(bytes, reply), Some(timeout))
            .await
        {
            Ok(ractor::rpc::CallResult::Success(answer)) => Ok(answer),
            Ok(_) => Err(ClusterError::Timeout(to.clone())),
            Err(e) => Err(ClusterError::Send {
                node: to.clone(),
                reason: e.to_string(),
            }),
        }
    }
}
