//! What this node knows about the cluster: the live members and the election's outcome.

use std::net::SocketAddr;

use serde::Serialize;

use crate::cluster::identity::NodeId;

/// A connected, live peer as the view reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// The peer.
    pub id: NodeId,
    /// Its cluster address.
    pub addr: SocketAddr,
    /// Its start time (unix ms).
    pub started_ms: u64,
    /// Its priority.
    pub priority: i32,
}

/// What this node knows about the cluster now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    /// This node.
    pub me: NodeId,
    /// This node's cluster address.
    pub addr: SocketAddr,
    /// The highest term known.
    pub term: u64,
    /// The leader this node follows (possibly itself).
    pub leader: Option<NodeId>,
    /// Whether the component is large enough to elect (always true without `--expect`).
    pub quorum: bool,
    /// The live peers (this node excluded), sorted by id.
    pub members: Vec<Member>,
}

impl ClusterView {
    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        self.leader.as_ref() == Some(&self.me)
    }

    /// Whether `id` is this node or a live peer.
    pub fn contains(&self, id: &NodeId) -> bool {
        *id == self.me || self.members.iter().any(|m| m.id == *id)
    }
}
