//! What crosses between nodes: the one cluster-visible actor message type of a node
//! ([`InboxMsg`]) and the MessagePack envelope its byte payloads carry.
//!
//! `ractor_cluster` serializes a message variant by its fields' `BytesConvertable`, whose
//! `from_bytes` cannot fail. So every field here is a plain `Vec<u8>`, and the real content
//! is an [`Envelope`] encoded with rmp-serde: a peer that sends garbage produces a typed
//! [`WireError`] in the receiving inbox, which logs it and drops the message, never a panic.
//! Every envelope travels [sealed](super::seal) under its session's key: the `from` fields
//! below must equal the sender the seal authenticated, or the message is dropped.

use std::net::SocketAddr;

use ractor::RpcReplyPort;
use ractor_cluster::RactorClusterMessage;
use serde::{Deserialize, Serialize};

use super::identity::NodeId;

/// The process group every node's inbox joins, suffixed with the node's id.
pub const INBOX_GROUP_PREFIX: &str = "canopy.inbox.";

/// The process-group name of node `id`'s inbox.
pub fn inbox_group(id: &NodeId) -> String {
    format!("{INBOX_GROUP_PREFIX}{id}")
}

/// The message type of a node's inbox: the only actor other nodes talk to.
#[derive(RactorClusterMessage)]
pub enum InboxMsg {
    /// A one-way MessagePack [`Envelope`].
    Cast(Vec<u8>),
    /// A MessagePack [`Envelope`] that expects MessagePack bytes back.
    #[rpc]
    Call(Vec<u8>, RpcReplyPort<Vec<u8>>),
}

/// A node's heartbeat to one peer; it also carries what the election needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beat {
    /// The sender.
    pub from: NodeId,
    /// Counts up from 1 for each beat the sender sends to this peer.
    pub seq: u64,
    /// The sender's cluster listen address.
    pub addr: SocketAddr,
    /// When the sender started (unix milliseconds): its seniority.
    pub started_ms: u64,
    /// The sender's election priority (higher wins).
    pub priority: i32,
    /// The highest term the sender knows.
    pub term: u64,
    /// Who the sender believes leads, if anyone.
    pub leader: Option<NodeId>,
}

/// The content of every inter-node message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Envelope {
    /// A heartbeat.
    Beat(Beat),
    /// An application message (the domain actors' own MessagePack).
    App {
        /// The sender.
        from: NodeId,
        /// The application's bytes.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// One piece of an application message too large for one frame (see
    /// [`chunk`](super::chunk)).
    Chunk {
        /// The sender.
        from: NodeId,
        /// The message (random per message).
        id: u64,
        /// This chunk's place, from 0.
        index: u32,
        /// How many chunks the message has.
        total: u32,
        /// This chunk's bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
}

/// A message from another node that could not be understood.
#[derive(Debug, thiserror::Error)]
#[error("undecodable message from a peer: {0}")]
pub struct WireError(String);

impl Envelope {
    /// Encodes the envelope.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        rmp_serde::to_vec_named(self).map_err(|e| WireError(e.to_string()))
    }

    /// The sender the envelope names.
    pub fn from(&self) -> &NodeId {
        match self {
            Envelope::Beat(beat) => &beat.from,
            Envelope::App { from, .. } | Envelope::Chunk { from, .. } => from,
        }
    }

    /// Decodes an envelope; garbage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        rmp_serde::from_slice(bytes).map_err(|e| WireError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_garbage_is_an_error() {
        let id: NodeId = "0123456789abcdef0123456789abcdef".parse().expect("id");
        let beat = Envelope::Beat(Beat {
            from: id.clone(),
            seq: 7,
            addr: "10.0.0.1:52416".parse().expect("addr"),
            started_ms: 5,
            priority: 0,
            term: 3,
            leader: Some(id.clone()),
        });
        assert_eq!(
            Envelope::decode(&beat.encode().expect("encodes")).expect("decodes"),
            beat
        );
        let app = Envelope::App {
            from: id,
            payload: vec![0, 255, 3],
        };
        assert_eq!(
            Envelope::decode(&app.encode().expect("encodes")).expect("decodes"),
            app
        );
        assert!(Envelope::decode(&[0xc1, 0xff, 0x00]).is_err());
        assert!(Envelope::decode(&[]).is_err());
    }
}
