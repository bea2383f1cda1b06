//! Who sent a message: every message between nodes is sealed under the key of the session it
//! travels on, and opened only with the key of the session its sender authenticated.
//!
//! `ractor_cluster` hands a remote message to the local actor without saying which session
//! brought it, so a sender id written in the message is only a claim: a member could write
//! another member's id (and send a plan as the leader, or beats in a dead peer's name). The
//! patched `ractor_cluster` (see `vendor/README.md`) derives a key for each session from its
//! mutual handshake — an HMAC of the cookie over both nodes' names and both random nonces — that
//! only the two ends of that session know. [`Sessions`] holds the key of each peer's live
//! session and the `ractor_cluster` node id of that session:
//!
//! - [`Sessions::seal`] wraps an outgoing message in a [`Sealed`] frame (sender, receiver, body,
//!   HMAC-SHA256 under the session key), and [`Sessions::route`] names the session whose remote
//!   actors are the peer's (another member cannot stand in for a peer by joining its process
//!   group);
//! - [`Sessions::open`] verifies a frame with the key of the session its claimed sender
//!   authenticated: a forged sender, a frame for another node, or garbage is refused with a
//!   typed [`SealError`] and counted ([`SealStats`]).
//!
//! Messages a node sends itself are sealed with a random key of this process.
//!
//! Decision: this is an application-level seal rather than a change to how `ractor_cluster`
//! delivers messages, because the session key is all the application needs and a
//! per-message HMAC costs about a microsecond per kilobyte. What it does not do: it does not
//! number messages, so an attacker who can read the traffic *and* holds the cookie could replay
//! a frame; with `--tls-*` (encrypted sessions) nobody can read the traffic.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::identity::NodeId;

/// The domain label of a sealed frame's MAC.
const LABEL: &[u8] = b"canopy/sealed-envelope/v1";

/// A session key (32 bytes); `Debug` does not print it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SessionKey([u8; 32]);

impl SessionKey {
    /// Wraps key bytes.
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn random() -> Self {
        let mut bytes = [0u8; 32];
        rand::fill(&mut bytes);
        Self(bytes)
    }

    fn mac(&self, from: &NodeId, to: &NodeId, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes a key of any length");
        for field in [
            LABEL,
            from.as_str().as_bytes(),
            to.as_str().as_bytes(),
            body,
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// Where messages to one peer go: its session's key and `ractor_cluster` node id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The session key.
    pub key: SessionKey,
    /// The `ractor_cluster` node id of the session (the `node()` of the peer's remote actors).
    pub session: u64,
}

/// A message as it crosses between nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The sender.
    pub from: NodeId,
    /// The receiver.
    pub to: NodeId,
    /// The message (an encoded [`Envelope`](super::wire::Envelope)).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// HMAC-SHA256 of the above under the session key.
    #[serde(with = "serde_bytes")]
    pub mac: Vec<u8>,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// Not a sealed frame.
    #[error("undecodable frame: {0}")]
    Undecodable(String),
    /// Addressed to another node.
    #[error("a frame for node {0}, not this node")]
    NotForMe(NodeId),
    /// The claimed sender has no authenticated session with this node.
    #[error("a frame claiming to be from {0}, which has no session with this node")]
    UnknownSender(NodeId),
    /// The MAC does not match the claimed sender's session key: a forged sender or a damaged
    /// frame.
    #[error("a frame claiming to be from {0} whose seal does not match that node's session")]
    BadSeal(NodeId),
    /// A sealed frame could not be encoded (never expected).
    #[error("cannot encode a frame: {0}")]
    Encode(String),
}

/// How many frames were refused, by reason.
#[derive(Debug, Default)]
pub struct SealStats {
    /// [`SealError::Undecodable`].
    pub undecodable: AtomicU64,
    /// [`SealError::NotForMe`].
    pub not_for_me: AtomicU64,
    /// [`SealError::UnknownSender`].
    pub unknown_sender: AtomicU64,
    /// [`SealError::BadSeal`].
    pub bad_seal: AtomicU64,
}

impl SealStats {
    /// Every refusal so far.
    pub fn total(&self) -> u64 {
        [
            &self.undecodable,
            &self.not_for_me,
            &self.unknown_sender,
            &self.bad_seal,
        ]
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
    }

    fn count(&self, err: &SealError) {
        let counter = match err {
            SealError::Undecodable(_) | SealError::Encode(_) => &self.undecodable,
            SealError::NotForMe(_) => &self.not_for_me,
            SealError::UnknownSender(_) => &self.unknown_sender,
            SealError::BadSeal(_) => &self.bad_seal,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The live sessions' keys, shared by the cluster actor (which installs and removes them),
/// the inbox (which opens frames) and every sender (see the module docs).
#[derive(Debug)]
pub struct Sessions {
    me: NodeId,
    local: SessionKey,
    routes: RwLock<HashMap<NodeId, Route>>,
    stats: SealStats,
}

impl Sessions {
    /// No sessions yet, and a fresh key for this node's messages to itself.
    pub fn new(me: NodeId) -> Self {
        Self {
            me,
            local: SessionKey::random(),
            routes: RwLock::new(HashMap::new()),
            stats: SealStats::default(),
        }
    }

    /// This node.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// The session with `peer` authenticated with `key` on `ractor_cluster` session `session`
    /// (replacing any older one).
    pub fn install(&self, peer: NodeId, key: SessionKey, session: u64) {
        self.write().insert(peer, Route { key, session });
    }

    /// The session `session` with `peer` ended: its key is forgotten unless a newer session
    /// replaced it already.
    pub fn remove(&self, peer: &NodeId, session: u64) {
        let mut routes = self.write();
        if routes.get(peer).is_some_and(|r| r.session == session) {
            routes.remove(peer);
        }
    }

    /// Forgets `peer`'s session, whichever it is.
    pub fn forget(&self, peer: &NodeId) {
        self.write().remove(peer);
    }

    /// The live session with `peer`, if any.
    pub fn route(&self, peer: &NodeId) -> Option<Route> {
        self.read().get(peer).copied()
    }

    /// Refusals so far.
    pub fn stats(&self) -> &SealStats {
        &self.stats
    }

    fn key_of(&self, peer: &NodeId) -> Option<SessionKey> {
        if *peer == self.me {
            Some(self.local)
        } else {
            self.route(peer).map(|r| r.key)
        }
    }

    /// Seals `body` for `to` (this node or a peer with a live session).
    pub fn seal(&self, to: &NodeId, body: Vec<u8>) -> Result<Vec<u8>, SealError> {
        let key = self
            .key_of(to)
            .ok_or_else(|| SealError::UnknownSender(to.clone()))?;
        let mac = key
            .mac(&self.me, to, &body)
            .finalize()
            .into_bytes()
            .to_vec();
        let sealed = Sealed {
            from: self.me.clone(),
            to: to.clone(),
            body,
            mac,
        };
        rmp_serde::to_vec_named(&sealed).map_err(|e| SealError::Encode(e.to_string()))
    }

    /// Opens a frame: its sender (authenticated) and body, or why it was refused (counted).
    pub fn open(&self, bytes: &[u8]) -> Result<(NodeId, Vec<u8>), SealError> {
        let opened = self.try_open(bytes);
        if let Err(err) = &opened {
            self.stats.count(err);
        }
        opened
    }

    fn try_open(&self, bytes: &[u8]) -> Result<(NodeId, Vec<u8>), SealError> {
        let sealed: Sealed =
            rmp_serde::from_slice(bytes).map_err(|e| SealError::Undecodable(e.to_string()))?;
        if sealed.to != self.me {
            return Err(SealError::NotForMe(sealed.to));
        }
        let key = self
            .key_of(&sealed.from)
            .ok_or_else(|| SealError::UnknownSender(sealed.from.clone()))?;
        key.mac(&sealed.from, &sealed.to, &sealed.body)
            .verify_slice(&sealed.mac)
            .map_err(|_| SealError::BadSeal(sealed.from.clone()))?;
        Ok((sealed.from, sealed.body))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeId, Route>> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<NodeId, Route>> {
        self.routes.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> NodeId {
        format!("{n:032x}").parse().expect("id")
    }

    /// Two nodes `a` and `b` sharing one session key, and a third `m` with its own session to
    /// each.
    fn trio() -> (Sessions, Sessions, Sessions) {
        let (a, b, m) = (
            Sessions::new(id(1)),
            Sessions::new(id(2)),
            Sessions::new(id(3)),
        );
        let ab = SessionKey::new([7; 32]);
        let am = SessionKey::new([8; 32]);
        let bm = SessionKey::new([9; 32]);
        a.install(id(2), ab, 10);
        b.install(id(1), ab, 20);
        a.install(id(3), am, 11);
        m.install(id(1), am, 30);
        b.install(id(3), bm, 21);
        m.install(id(2), bm, 31);
        (a, b, m)
    }

    #[test]
    fn a_sealed_frame_opens_with_its_sender_and_body() {
        let (a, b, _) = trio();
        let frame = a.seal(&id(2), b"hello".to_vec()).expect("seals");
        assert_eq!(b.open(&frame), Ok((id(1), b"hello".to_vec())));
        let to_self = a.seal(&id(1), b"me".to_vec()).expect("seals");
        assert_eq!(a.open(&to_self), Ok((id(1), b"me".to_vec())));
        assert_eq!(b.stats().total(), 0);
    }

    #[test]
    fn a_member_cannot_send_in_another_members_name() {
        let (a, _, m) = trio();
        // m writes b's id as the sender of a frame it seals with its own session key.
        let mut forged: Sealed =
            rmp_serde::from_slice(&m.seal(&id(1), b"plan".to_vec()).expect("seals"))
                .expect("decodes");
        forged.from = id(2);
        let bytes = rmp_serde::to_vec_named(&forged).expect("encodes");
        assert_eq!(a.open(&bytes), Err(SealError::BadSeal(id(2))));
        assert_eq!(a.stats().bad_seal.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn frames_for_other_nodes_unknown_senders_tampering_and_garbage_are_refused() {
        let (a, b, m) = trio();
        let for_b = a.seal(&id(2), b"x".to_vec()).expect("seals");
        assert_eq!(m.open(&for_b), Err(SealError::NotForMe(id(2))));

        let stranger = Sessions::new(id(4));
        stranger.install(id(1), SessionKey::new([1; 32]), 5);
        let frame = stranger.seal(&id(1), b"x".to_vec()).expect("seals");
        assert_eq!(a.open(&frame), Err(SealError::UnknownSender(id(4))));

        let mut tampered: Sealed =
            rmp_serde::from_slice(&a.seal(&id(2), b"abc".to_vec()).expect("seals"))
                .expect("decodes");
        tampered.body[0] ^= 1;
        let bytes = rmp_serde::to_vec_named(&tampered).expect("encodes");
        assert_eq!(b.open(&bytes), Err(SealError::BadSeal(id(1))));

        assert!(matches!(
            b.open(&[0xc1, 0, 1]),
            Err(SealError::Undecodable(_))
        ));
        assert!(matches!(b.open(&[]), Err(SealError::Undecodable(_))));
        assert_eq!(b.stats().total(), 3);
    }

    #[test]
    fn a_session_that_ended_no_longer_opens_frames_but_a_newer_one_survives_the_old_ones_end() {
        let (a, b, _) = trio();
        b.remove(&id(1), 999);
        let frame = a.seal(&id(2), b"x".to_vec()).expect("seals");
        assert!(
            b.open(&frame).is_ok(),
            "removing another session changes nothing"
        );
        b.remove(&id(1), 20);
        assert_eq!(b.open(&frame), Err(SealError::UnknownSender(id(1))));
        assert!(b.route(&id(1)).is_none());
    }
}
