//! The election: which node of a connected component leads (runs the master), fenced by a
//! term that only grows.
//!
//! The rule is deterministic, so every node that sees the same members picks the same leader:
//! the highest `priority`, then the most senior (earliest `started_ms`), then the smallest
//! node id. A node that finds itself best takes office with a term one above every term it
//! has seen; a node that is not best follows the best node once that node claims the lead
//! (its beats name itself leader) with a term at least the follower's own. A leader that
//! sees a higher term than its own (another side of a healed partition elected meanwhile)
//! takes a new term above it, so the term of the one leader left is the highest in the
//! component and every message of a stale leader is recognisable by its lower term.
//!
//! With a quorum (`--expect N`), a component smaller than N has no leader at all: the
//! minority side of a partition never elects, and a leader that loses its quorum steps down.
//!
//! Decision where docs/ARCHITECTURE.md is silent: there is no separate election protocol with votes.
//! Peer heartbeats carry (term, leader), which is enough here because membership is already
//! agreed by the heartbeats themselves, and a brief disagreement only delays the lead.

use std::cmp::{Ordering, Reverse};

use serde::{Deserialize, Serialize};

use super::identity::NodeId;

/// What the election knows about one member of the component (this node included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The node.
    pub id: NodeId,
    /// Its priority (higher wins).
    pub priority: i32,
    /// When it started (unix ms; earlier wins).
    pub started_ms: u64,
    /// The highest term it reported.
    pub term: u64,
    /// Whom it believes leads.
    pub leader: Option<NodeId>,
}

impl Candidate {
    fn rank(&self) -> (i32, Reverse<u64>, Reverse<&NodeId>) {
        (self.priority, Reverse(self.started_ms), Reverse(&self.id))
    }
}

/// Orders candidates: `Greater` is the better leader.
pub fn compare(a: &Candidate, b: &Candidate) -> Ordering {
    a.rank().cmp(&b.rank())
}

/// The outcome of one round, as the node publishes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leadership {
    /// The highest term this node knows.
    pub term: u64,
    /// The leader this node follows (itself included), if any.
    pub leader: Option<NodeId>,
    /// Whether the component is at least the expected size.
    pub quorum: bool,
}

/// One node's election state.
#[derive(Debug, Clone)]
pub struct Election {
    me: NodeId,
    expect: Option<usize>,
    term: u64,
    leader: Option<NodeId>,
}

impl Election {
    /// A node that knows no term yet; `expect` is the quorum (component size) if any.
    pub fn new(me: NodeId, expect: Option<usize>) -> Self {
        Self {
            me,
            expect,
            term: 0,
            leader: None,
        }
    }

    /// The current outcome.
    pub fn leadership(&self, members: usize) -> Leadership {
        Leadership {
            term: self.term,
            leader: self.leader.clone(),
            quorum: self.expect.is_none_or(|n| members >= n),
        }
    }

    /// Whether this node leads now.
    pub fn is_leader(&self) -> bool {
        self.leader.as_ref() == Some(&self.me)
    }

    /// Runs one round with `me` (this node) and the live `peers`; returns the outcome.
    pub fn decide(&mut self, me: &Candidate, peers: &[Candidate]) -> Leadership {
        let members = peers.len() + 1;
        let seen = peers.iter().map(|p| p.term).max().unwrap_or(0);
        let quorum = self.expect.is_none_or(|n| members >= n);
        if !quorum {
            self.term = self.term.max(seen);
            if self.leader.is_some() {
                tracing::warn!(
                    members,
                    expect = self.expect,
                    "lost the quorum: no leader until enough nodes are connected"
                );
            }
            self.leader = None;
            return self.leadership(members);
        }
        let best = peers.iter().fold(
            me,
            |best, p| if compare(p, best).is_gt() { p } else { best },
        );
        if best.id == self.me {
            if !self.is_leader() || seen > self.term {
                self.term = self.term.max(seen).saturating_add(1);
                self.leader = Some(self.me.clone());
                tracing::info!(term = self.term, "this node leads the cluster");
            }
        } else {
            self.term = self.term.max(seen);
            let claims = best.leader.as_ref() == Some(&best.id) && best.term >= self.term;
            let next = claims.then(|| best.id.clone());
            if next != self.leader {
                match &next {
                    Some(leader) => {
                        tracing::info!(term = self.term, leader = %leader.short(), "following a new leader")
                    }
                    None => tracing::info!("waiting for the best node to take the lead"),
                }
            }
            self.leader = next;
        }
        self.leadership(members)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        format!("{:032x}", n).parse().expect("id")
    }

    fn cand(n: u8, started_ms: u64) -> Candidate {
        Candidate {
            id: id(n),
            priority: 0,
            started_ms,
            term: 0,
            leader: None,
        }
    }

    #[test]
    fn priority_then_seniority_then_id() {
        let mut a = cand(1, 100);
        let b = cand(2, 50);
        assert!(compare(&b, &a).is_gt(), "older wins");
        a.priority = 1;
        assert!(compare(&a, &b).is_gt(), "priority beats seniority");
        let c = cand(3, 50);
        assert!(compare(&b, &c).is_gt(), "smaller id breaks a tie");
    }

    #[test]
    fn the_best_node_takes_a_term_above_all_it_has_seen_and_others_follow() {
        let (a, mut b) = (cand(1, 10), cand(2, 20));
        b.term = 4;
        let mut ea = Election::new(a.id.clone(), None);
        let l = ea.decide(&a, std::slice::from_ref(&b));
        assert_eq!(l.leader, Some(a.id.clone()));
        assert_eq!(l.term, 5);

        let mut eb = Election::new(b.id.clone(), None);
        eb.term = 4;
        // a has not claimed yet: b waits.
        assert_eq!(eb.decide(&b, std::slice::from_ref(&a)).leader, None);
        let claiming = Candidate {
            term: 5,
            leader: Some(a.id.clone()),
            ..a.clone()
        };
        let l = eb.decide(&b, &[claiming]);
        assert_eq!(l.leader, Some(a.id.clone()));
        assert_eq!(l.term, 5);
    }

    #[test]
    fn a_leader_that_sees_a_higher_term_moves_above_it() {
        let (a, mut b) = (cand(1, 10), cand(2, 20));
        let mut ea = Election::new(a.id.clone(), None);
        assert_eq!(ea.decide(&a, &[]).term, 1);
        b.term = 7;
        b.leader = Some(b.id.clone());
        let l = ea.decide(&a, &[b]);
        assert_eq!(l.term, 8);
        assert_eq!(l.leader, Some(a.id));
    }

    #[test]
    fn a_minority_never_elects_and_a_leader_without_quorum_steps_down() {
        let (a, b) = (cand(1, 10), cand(2, 20));
        let mut ea = Election::new(a.id.clone(), Some(2));
        let l = ea.decide(&a, &[]);
        assert_eq!(l.leader, None);
        assert!(!l.quorum);
        assert_eq!(
            ea.decide(&a, std::slice::from_ref(&b)).leader,
            Some(a.id.clone())
        );
        let l = ea.decide(&a, &[]);
        assert_eq!(l.leader, None);
        assert!(ea.term >= 1, "the term never goes down");
    }

    #[test]
    fn a_stale_claim_with_a_lower_term_is_not_followed() {
        let (a, b) = (cand(1, 10), cand(2, 20));
        let mut eb = Election::new(b.id.clone(), None);
        eb.term = 9;
        let stale = Candidate {
            term: 3,
            leader: Some(a.id.clone()),
            ..a
        };
        assert_eq!(eb.decide(&b, &[stale]).leader, None);
    }
}
