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

/// A change of the membership or of the election, as this node saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum MembershipEvent {
    /// A peer became a live member (its session is up and its first beat arrived).
    Joined {
        /// The peer.
        peer: NodeId,
        /// Its cluster address.
        addr: SocketAddr,
    },
    /// A live member left: its connection closed, or it missed its heartbeats.
    Left {
        /// The peer.
        peer: NodeId,
        /// Why this node dropped it.
        why: String,
    },
    /// The leader this node follows changed (elected, or none while without quorum).
    Leader {
        /// The new term.
        term: u64,
        /// The new leader (`None`: no quorum).
        leader: Option<NodeId>,
    },
}

impl MembershipEvent {
    /// The events that lead from view `old` to view `new`; `why` tells why a member that is
    /// gone was dropped.
    pub fn diff(
        old: &ClusterView,
        new: &ClusterView,
        why: impl Fn(&NodeId) -> String,
    ) -> Vec<MembershipEvent> {
        let mut events = Vec::new();
        for m in &old.members {
            if !new.members.iter().any(|n| n.id == m.id) {
                events.push(MembershipEvent::Left {
                    peer: m.id.clone(),
                    why: why(&m.id),
                });
            }
        }
        for m in &new.members {
            if !old.members.iter().any(|o| o.id == m.id) {
                events.push(MembershipEvent::Joined {
                    peer: m.id.clone(),
                    addr: m.addr,
                });
            }
        }
        if old.leader != new.leader || (new.leader.is_some() && old.term != new.term) {
            events.push(MembershipEvent::Leader {
                term: new.term,
                leader: new.leader.clone(),
            });
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(me: &NodeId, term: u64, leader: Option<&NodeId>, members: &[&NodeId]) -> ClusterView {
        ClusterView {
            me: me.clone(),
            addr: "127.0.0.1:1".parse().unwrap(),
            term,
            leader: leader.cloned(),
            quorum: true,
            members: members
                .iter()
                .map(|id| Member {
                    id: (*id).clone(),
                    addr: "127.0.0.1:2".parse().unwrap(),
                    started_ms: 1,
                    priority: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn a_diff_tells_joins_departures_with_their_reason_and_new_leaders() {
        let (a, b, c) = (NodeId::random(), NodeId::random(), NodeId::random());
        let old = view(&a, 1, Some(&b), &[&b]);
        let new = view(&a, 2, Some(&a), &[&c]);
        let events = MembershipEvent::diff(&old, &new, |id| format!("{} went", id.short()));
        assert_eq!(
            events,
            vec![
                MembershipEvent::Left {
                    peer: b.clone(),
                    why: format!("{} went", b.short())
                },
                MembershipEvent::Joined {
                    peer: c.clone(),
                    addr: "127.0.0.1:2".parse().unwrap()
                },
                MembershipEvent::Leader {
                    term: 2,
                    leader: Some(a.clone())
                },
            ]
        );
        assert!(MembershipEvent::diff(&new, &new, |_| String::new()).is_empty());
    }
}
