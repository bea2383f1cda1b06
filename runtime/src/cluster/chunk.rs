//! Large application messages travel in chunks, not as one frame.
//!
//! `ractor_cluster` sends each message as one length-prefixed frame on the session's TCP
//! stream, and a frame is written whole: a multi-megabyte plan holds every beat queued behind
//! it for as long as the link takes to carry it, and a frame past the transport's 16 MiB limit
//! closes the session. [`ClusterHandle::send`](super::ClusterHandle::send) therefore cuts a
//! payload over [`CHUNK_BYTES`] into chunks of at most that size, each sealed on its own, so
//! that beats and small messages interleave with them; the receiving inbox puts them back
//! together with a [`Reassembly`] and hands the whole payload on as if it had come in one
//! piece.
//!
//! A session delivers in order, so the chunks of a message arrive in order: a chunk out of
//! order, or one that disagrees with its message's chunk count, drops that message. What a
//! peer can make the receiver hold is bounded: a message is at most [`MAX_MESSAGE_BYTES`],
//! a peer has at most [`MAX_PARTIAL_PER_PEER`] messages in reassembly (a new one beyond that
//! drops its oldest), and a message not completed within [`PARTIAL_TTL`] is dropped.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::identity::NodeId;

/// The largest chunk (and the largest payload sent as one frame).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// The largest application message a node sends or reassembles.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;

/// Messages one peer may have in reassembly at once.
pub const MAX_PARTIAL_PER_PEER: usize = 4;

/// How long a message may take to arrive whole.
pub const PARTIAL_TTL: Duration = Duration::from_secs(30);

/// Cuts `payload` into chunks of at most [`CHUNK_BYTES`] (one chunk for a small payload).
pub fn split(payload: &[u8]) -> Vec<&[u8]> {
    if payload.is_empty() {
        return vec![payload];
    }
    payload.chunks(CHUNK_BYTES).collect()
}

/// Why a chunk was dropped (its message with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The chunk count is zero or says the message would pass [`MAX_MESSAGE_BYTES`].
    #[error(
        "a chunked message of {total} chunks is larger than the {MAX_MESSAGE_BYTES}-byte limit"
    )]
    TooLarge {
        /// The chunk count the peer announced.
        total: u32,
    },
    /// A chunk is larger than [`CHUNK_BYTES`], or empty in a message of several chunks.
    #[error("a chunk of {len} bytes (chunks are 1 to {CHUNK_BYTES} bytes)")]
    BadChunk {
        /// Its size.
        len: usize,
    },
    /// A chunk that is not the next one of its message (or names another chunk count).
    #[error("chunk {index} of {total} of message {id} came out of order; the message is dropped")]
    OutOfOrder {
        /// The message.
        id: u64,
        /// The chunk's index.
        index: u32,
        /// The chunk count it named.
        total: u32,
    },
}

struct Partial {
    id: u64,
    total: u32,
    next: u32,
    bytes: Vec<u8>,
    started: Instant,
}

/// Chunked messages being put back together, per sending peer.
#[derive(Default)]
pub struct Reassembly {
    partial: HashMap<NodeId, Vec<Partial>>,
}

impl Reassembly {
    /// A reassembly with nothing in it.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes chunk `index` of `total` of message `id` from `from`: the whole payload when this
    /// was its last chunk, `None` while more are due, an error when the chunk (and with it the
    /// message) is dropped.
    pub fn add(
        &mut self,
        from: &NodeId,
        id: u64,
        index: u32,
        total: u32,
        bytes: Vec<u8>,
        now: Instant,
    ) -> Result<Option<Vec<u8>>, ChunkError> {
        self.expire(now);
        if total == 0 || total as usize > MAX_MESSAGE_BYTES.div_ceil(CHUNK_BYTES) {
            return Err(ChunkError::TooLarge { total });
        }
        if bytes.len() > CHUNK_BYTES || (bytes.is_empty() && total > 1) {
            self.drop_message(from, id);
            return Err(ChunkError::BadChunk { len: bytes.len() });
        }
        let out_of_order = ChunkError::OutOfOrder { id, index, total };
        let partials = self.partial.entry(from.clone()).or_default();
        let at = partials.iter().position(|p| p.id == id);
        let partial = match at {
            Some(at) if partials[at].next == index && partials[at].total == total => {
                &mut partials[at]
            }
            Some(at) => {
                partials.remove(at);
                return Err(out_of_order);
            }
            None if index != 0 => return Err(out_of_order),
            None => {
                if partials.len() >= MAX_PARTIAL_PER_PEER {
                    partials.remove(0);
                }
                partials.push(Partial {
                    id,
                    total,
                    next: 0,
                    bytes: Vec::new(),
                    started: now,
                });
                partials.last_mut().expect("just pushed")
            }
        };
        partial.bytes.extend_from_slice(&bytes);
        partial.next += 1;
        if partial.bytes.len() > MAX_MESSAGE_BYTES {
            self.drop_message(from, id);
            return Err(ChunkError::TooLarge { total });
        }
        if partial.next < partial.total {
            return Ok(None);
        }
        let at = partials
            .iter()
            .position(|p| p.id == id)
            .expect("the partial just completed");
        let done = partials.remove(at);
        if partials.is_empty() {
            self.partial.remove(from);
        }
        Ok(Some(done.bytes))
    }

    /// Bytes held in reassembly, over every peer.
    pub fn held_bytes(&self) -> usize {
        self.partial
            .values()
            .flat_map(|ps| ps.iter().map(|p| p.bytes.len()))
            .sum()
    }

    fn drop_message(&mut self, from: &NodeId, id: u64) {
        if let Some(partials) = self.partial.get_mut(from) {
            partials.retain(|p| p.id != id);
        }
    }

    fn expire(&mut self, now: Instant) {
        self.partial.retain(|_, partials| {
            partials.retain(|p| now.duration_since(p.started) < PARTIAL_TTL);
            !partials.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8) -> NodeId {
        format!("{n:02x}{}", "0".repeat(30)).parse().expect("id")
    }

    fn send(r: &mut Reassembly, from: &NodeId, id: u64, payload: &[u8], now: Instant) -> Vec<u8> {
        let parts = split(payload);
        let total = parts.len() as u32;
        let mut out = None;
        for (i, part) in parts.iter().enumerate() {
            let got = r
                .add(from, id, i as u32, total, part.to_vec(), now)
                .expect("accepted");
            assert_eq!(got.is_some(), i + 1 == parts.len());
            out = got;
        }
        out.expect("complete")
    }

    #[test]
    fn payloads_of_every_size_come_back_whole() {
        let mut r = Reassembly::new();
        let now = Instant::now();
        for len in [
            0,
            1,
            CHUNK_BYTES - 1,
            CHUNK_BYTES,
            CHUNK_BYTES + 1,
            3 * CHUNK_BYTES + 7,
        ] {
            let payload: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            assert_eq!(send(&mut r, &peer(1), len as u64, &payload, now), payload);
        }
        assert_eq!(r.held_bytes(), 0);
        assert_eq!(split(&vec![0; CHUNK_BYTES * 2]).len(), 2);
    }

    #[test]
    fn interleaved_messages_and_peers_do_not_mix() {
        let mut r = Reassembly::new();
        let now = Instant::now();
        let (a, b) = (vec![1u8; CHUNK_BYTES * 2], vec![2u8; CHUNK_BYTES * 2]);
        let (pa, pb) = (split(&a), split(&b));
        assert_eq!(r.add(&peer(1), 1, 0, 2, pa[0].to_vec(), now), Ok(None));
        assert_eq!(r.add(&peer(1), 2, 0, 2, pb[0].to_vec(), now), Ok(None));
        assert_eq!(r.add(&peer(2), 1, 0, 2, pb[0].to_vec(), now), Ok(None));
        assert_eq!(r.add(&peer(1), 1, 1, 2, pa[1].to_vec(), now), Ok(Some(a)));
        assert_eq!(
            r.add(&peer(1), 2, 1, 2, pb[1].to_vec(), now),
            Ok(Some(b.clone()))
        );
        assert_eq!(r.add(&peer(2), 1, 1, 2, pb[1].to_vec(), now), Ok(Some(b)));
    }

    #[test]
    fn out_of_order_oversized_and_stale_chunks_are_dropped() {
        let mut r = Reassembly::new();
        let now = Instant::now();
        let p = peer(1);
        let chunk = vec![0u8; CHUNK_BYTES];
        // A message that does not start at 0, or skips a chunk, or changes its count.
        assert!(matches!(
            r.add(&p, 1, 1, 3, chunk.clone(), now),
            Err(ChunkError::OutOfOrder { .. })
        ));
        assert_eq!(r.add(&p, 2, 0, 3, chunk.clone(), now), Ok(None));
        assert!(r.add(&p, 2, 2, 3, chunk.clone(), now).is_err());
        assert!(
            r.add(&p, 2, 1, 3, chunk.clone(), now).is_err(),
            "the message was dropped"
        );
        assert_eq!(r.add(&p, 3, 0, 3, chunk.clone(), now), Ok(None));
        assert!(r.add(&p, 3, 1, 4, chunk.clone(), now).is_err());
        // Too many chunks announced, a chunk too big, an empty chunk of several.
        let most = (MAX_MESSAGE_BYTES / CHUNK_BYTES) as u32;
        assert!(matches!(
            r.add(&p, 4, 0, most + 1, chunk.clone(), now),
            Err(ChunkError::TooLarge { .. })
        ));
        assert!(matches!(
            r.add(&p, 4, 0, 0, chunk.clone(), now),
            Err(ChunkError::TooLarge { .. })
        ));
        assert!(matches!(
            r.add(&p, 5, 0, 2, vec![0; CHUNK_BYTES + 1], now),
            Err(ChunkError::BadChunk { .. })
        ));
        assert!(matches!(
            r.add(&p, 5, 0, 2, Vec::new(), now),
            Err(ChunkError::BadChunk { .. })
        ));
        assert_eq!(r.held_bytes(), 0);
        // A message not finished within the TTL is forgotten.
        assert_eq!(r.add(&p, 6, 0, 2, chunk.clone(), now), Ok(None));
        let later = now + PARTIAL_TTL;
        assert!(r.add(&p, 6, 1, 2, chunk.clone(), later).is_err());
        assert_eq!(r.held_bytes(), 0);
    }

    #[test]
    fn one_peer_holds_a_bounded_number_of_messages() {
        let mut r = Reassembly::new();
        let now = Instant::now();
        let p = peer(1);
        let chunk = vec![0u8; CHUNK_BYTES];
        for id in 0..(MAX_PARTIAL_PER_PEER as u64 + 3) {
            assert_eq!(r.add(&p, id, 0, 2, chunk.clone(), now), Ok(None));
        }
        assert_eq!(r.held_bytes(), MAX_PARTIAL_PER_PEER * CHUNK_BYTES);
        // The oldest were dropped; the newest complete.
        assert!(r.add(&p, 0, 1, 2, chunk.clone(), now).is_err());
        let newest = MAX_PARTIAL_PER_PEER as u64 + 2;
        assert!(
            r.add(&p, newest, 1, 2, chunk.clone(), now)
                .expect("ok")
                .is_some()
        );
    }
}
