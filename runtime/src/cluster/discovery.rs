//! Zero-configuration discovery of the nodes on one LAN, by authenticated UDP multicast beacons.
//!
//! Every node sends a small beacon to a multicast group (by default `239.255.41.95:52416`,
//! in the administratively scoped range, TTL 1 so it never leaves the link) every `interval`,
//! and listens on the same group. A beacon says "node `node_id`, started at `started_ms`, accepts
//! cluster connections on `addr`", stamped with the sender's clock and a random nonce and
//! authenticated with an HMAC under a key only holders of the cluster cookie can derive.
//! [`Discovery::recv`] hands out the authentic, fresh, first-seen beacons of other nodes; the
//! cluster actor decides whom to dial ([`should_dial`]) and dedups against the sessions it has.
//!
//! Decisions:
//!
//! - **Wire format**: MessagePack with named fields ([`Beacon`]), starting with a magic string and
//!   a version ([`BEACON_VERSION`] = 2), at most [`MAX_BEACON_LEN`] bytes. Decoding
//!   ([`decode_beacon`]) is a pure function that rejects anything else with a typed
//!   [`BeaconError`]; version 1 (unauthenticated) beacons are refused with
//!   [`BeaconError::UnsupportedVersion`].
//! - **Authentication**: every field of a beacon (magic, version, namespace tag, node id, address,
//!   start time, timestamp, nonce) is covered by `mac`, an HMAC-SHA256 under the
//!   [`DiscoveryKey`]. The MAC is computed over a transcript rather than over the MessagePack
//!   bytes, so that it does not depend on how an encoder lays the fields out: the label
//!   `canopy-beacon-mac-v2`, then each field as its 8-byte big-endian length followed by its
//!   bytes (integers big-endian; the address as a family byte `4`/`6`, the IP octets and the
//!   big-endian port). It is checked in constant time ([`hmac::Mac::verify_slice`]) before
//!   anything else in the beacon is believed; a mismatch is [`BeaconError::BadMac`].
//! - **Key derivation**: `key = HMAC-SHA256(key: cookie, message: "canopy-discovery-v2:" +
//!   namespace)` ([`DiscoveryKey::derive`]). A node without the cookie can neither forge a beacon
//!   nor learn the cookie from one (HMAC is a PRF: the key reveals nothing about the cookie,
//!   and a MAC nothing about the key); the namespace in the derivation means a beacon of one
//!   namespace does not verify in another even under the same cookie. The key's `Debug` prints no
//!   key bytes, and its memory is overwritten when it is dropped.
//! - **Freshness**: a beacon carries `ts_ms`, the sender's wall clock in milliseconds since the
//!   Unix epoch; one more than [`FRESHNESS_WINDOW`] (30 s) away from the local clock, in either
//!   direction, is dropped as [`BeaconError::Stale`]. Nodes' clocks must agree to within that
//!   (NTP does); a stale-beacon warning with the skew says when they do not.
//! - **Replay**: a beacon also carries a random 16-byte `nonce`, fresh for every beacon sent. A
//!   [`ReplayCache`] remembers the `(node_id, nonce)` of every authentic, fresh beacon; the same
//!   pair again is dropped as [`BeaconError::Replayed`]. An entry is kept until its beacon would
//!   be stale anyway (`max(ts_ms, arrival) + window`), and at most [`REPLAY_CACHE_CAPACITY`]
//!   (4096) entries are kept: when full, the entry closest to expiry goes first. Only beacons that
//!   passed the MAC and freshness checks are entered, so an attacker without the key cannot fill
//!   the cache. The capacity covers about 4096 / 30 = 136 nodes beaconing once a second; in a
//!   larger cluster on one LAN, a beacon evicted early can be replayed within its window, which
//!   only repeats a true announcement of a real node.
//! - **What a LAN attacker can still do**: replaying a captured beacon within the window is
//!   blocked by the nonce cache, and after it by the window; but an attacker can drop or delay
//!   beacons (delay within the window: the beacon is still true, only late), flood the port
//!   (every datagram costs at most a decode and one HMAC, and is counted), and read beacons:
//!   they are authenticated, not encrypted, so node ids, cluster addresses, start times and the
//!   namespace tag are visible. The cluster handshake itself is authenticated separately (see
//!   `membership`), so even a dial caused by a beacon cannot admit a node without the cookie.
//! - **Counting**: every datagram that is not an accepted beacon is counted by reason in
//!   [`DiscoveryStats`] (cheap to clone, shared with `ClusterHandle`), and logged rate-limited:
//!   bad MACs, stale, replayed and other-version beacons at `warn` (each is an attack or a
//!   misconfiguration: another cookie, skewed clocks, an old node), garbage and beacons of other
//!   namespaces at `debug`.
//! - **Namespaces**: a beacon carries the first 16 bytes of `sha256("canopy-namespace:" + name)`
//!   ([`namespace_hash`]) rather than the name, so that two clusters on one LAN ignore each other
//!   without broadcasting their names. It is a partition, not a secret: the cookie authenticates.
//!   A beacon of another namespace is dropped before its MAC is checked (it is not an attack, and
//!   it could not verify: the key depends on the namespace).
//! - **Socket**: bound to `0.0.0.0:<group port>` with `SO_REUSEADDR` and `SO_REUSEPORT`, so that
//!   several nodes on one host (or one network namespace) share the port and all receive every
//!   beacon; the group is joined on, and beacons leave from, the configured interface address
//!   (`IP_MULTICAST_IF`), so no multicast route is needed; loopback of multicast is on so nodes on
//!   one host hear each other.
//! - **Loopback**: `lo` has no `MULTICAST` flag on Linux, so discovery refuses a loopback
//!   interface with [`DiscoveryError::Loopback`]; the caller warns and relies on `--peer`.
//! - **Failures while running are not fatal**: a send error (a link that is down, no route) or a
//!   receive error is logged at `debug` and the loop goes on; beacons resume when the network
//!   does.
//! - **Delivery semantics**: every valid beacon of another node of the same namespace is reported,
//!   i.e. about one [`Discovered`] per peer per interval, with no deduplication here (every beacon
//!   sent has a fresh nonce). The channel is bounded ([`CHANNEL_CAPACITY`]) and filled with
//!   `try_send`: when the consumer is slow, new beacons are dropped rather than blocking the
//!   receive loop. Since peers repeat their beacon every interval, nothing is lost for good.
//! - **Own beacons** (same `node_id`) are skipped. One with our id but another address or start
//!   time means a second node uses our identity (a copied data directory): that is logged at
//!   `warn`, rate-limited (only for authentic beacons, so it cannot be forged).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;

/// The default multicast group and port of the beacons.
pub const DEFAULT_GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 41, 95), 52416);
/// The default discovery namespace.
pub const DEFAULT_NAMESPACE: &str = "canopy";
/// The default interval between two beacons of one node.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// The magic string every beacon starts with.
pub const BEACON_MAGIC: &str = "canopy-beacon";
/// The beacon format version this build sends and accepts (2: authenticated).
pub const BEACON_VERSION: u32 = 2;
/// The largest datagram accepted as a beacon, in bytes.
pub const MAX_BEACON_LEN: usize = 1024;
/// How many discovered beacons may wait for [`Discovery::recv`] before new ones are dropped.
pub const CHANNEL_CAPACITY: usize = 64;
/// How far a beacon's timestamp may be from the local clock, either way, to be accepted.
pub const FRESHNESS_WINDOW: Duration = Duration::from_secs(30);
/// How many `(node_id, nonce)` pairs the [`ReplayCache`] of a running discovery keeps.
pub const REPLAY_CACHE_CAPACITY: usize = 4096;
/// The length of a beacon's nonce, in bytes.
pub const NONCE_LEN: usize = 16;
/// The length of a beacon's MAC (HMAC-SHA256), in bytes.
pub const MAC_LEN: usize = 32;

/// The prefix hashed with the namespace name, see [`namespace_hash`].
const NAMESPACE_HASH_PREFIX: &str = "canopy-namespace:";
/// The prefix of the namespace in the key derivation, see [`DiscoveryKey::derive`].
const KEY_DERIVATION_PREFIX: &str = "canopy-discovery-v2:";
/// The first field of the MAC transcript of a beacon.
const MAC_LABEL: &[u8] = b"canopy-beacon-mac-v2";
/// Log lines about ignored datagrams allowed per [`LOG_WINDOW`].
const LOG_BURST: u32 = 10;
/// The window of the log rate limit.
const LOG_WINDOW: Duration = Duration::from_secs(10);
/// Pause after a receive error, so that a persistent one cannot spin the loop.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Where and how beacons are sent and received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// The multicast group and port (default [`DEFAULT_GROUP`]).
    pub group: SocketAddrV4,
    /// The local address beacons leave from and on whose interface the group is joined.
    pub interface: Ipv4Addr,
    /// Only nodes of the same namespace see each other (default [`DEFAULT_NAMESPACE`]).
    pub namespace: String,
    /// Time between two beacons of this node (default [`DEFAULT_INTERVAL`]).
    pub interval: Duration,
}

impl DiscoveryConfig {
    /// The default group, namespace and interval, on `interface`.
    pub fn new(interface: Ipv4Addr) -> DiscoveryConfig {
        DiscoveryConfig {
            group: DEFAULT_GROUP,
            interface,
            namespace: DEFAULT_NAMESPACE.to_owned(),
            interval: DEFAULT_INTERVAL,
        }
    }
}

/// The key beacons are authenticated with (32 bytes), derived from the cluster cookie and the
/// discovery namespace. Its `Debug` does not print it; its bytes are overwritten on drop.
#[derive(Clone)]
pub struct DiscoveryKey([u8; 32]);

impl DiscoveryKey {
    /// `HMAC-SHA256(key: cookie, message: "canopy-discovery-v2:" + namespace)`.
    pub fn derive(cookie: &str, namespace: &str) -> DiscoveryKey {
        let mut mac = new_hmac(cookie.as_bytes());
        mac.update(KEY_DERIVATION_PREFIX.as_bytes());
        mac.update(namespace.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(&mac.finalize().into_bytes());
        DiscoveryKey(key)
    }
}

impl std::fmt::Debug for DiscoveryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiscoveryKey(<redacted>)")
    }
}

impl Drop for DiscoveryKey {
    fn drop(&mut self) {
        for byte in &mut self.0 {
            // SAFETY: `byte` is a valid, aligned, exclusive reference; a volatile write is not
            // optimised away, so the key does not outlive the value in memory.
            unsafe { std::ptr::write_volatile(byte, 0) };
        }
    }
}

/// An HMAC-SHA256 under `key` (HMAC takes a key of any length).
fn new_hmac(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length")
}

/// What this node announces about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BeaconInfo {
    /// This node's id.
    pub node_id: String,
    /// The address this node accepts cluster connections on.
    pub addr: SocketAddr,
    /// When this node started, in milliseconds since the Unix epoch: a peer whose `started_ms`
    /// changed has restarted.
    pub started_ms: u64,
}

/// A beacon of another node of the same namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Discovered {
    /// The peer's node id.
    pub node_id: String,
    /// The address the peer accepts cluster connections on (dial this one).
    pub addr: SocketAddr,
    /// When the peer started, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// The source address of the datagram (for logs; may differ from `addr`).
    pub from: SocketAddr,
}

/// One beacon as it travels on the wire (MessagePack with named fields).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Beacon {
    /// Always [`BEACON_MAGIC`].
    pub magic: String,
    /// Always [`BEACON_VERSION`] for this build.
    pub version: u32,
    /// [`namespace_hash`] of the sender's namespace.
    #[serde(with = "serde_bytes")]
    pub namespace: [u8; 16],
    /// The sender's node id.
    pub node_id: String,
    /// The sender's cluster listen address.
    pub addr: SocketAddr,
    /// The sender's start time, in milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// When the beacon was sent, by the sender's clock, in milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// Random, fresh for every beacon sent (see [`ReplayCache`]).
    #[serde(with = "serde_bytes")]
    pub nonce: [u8; NONCE_LEN],
    /// HMAC-SHA256 of all the other fields under the [`DiscoveryKey`] (see the module docs for
    /// the transcript); all zero until [`Beacon::seal`].
    #[serde(with = "serde_bytes")]
    pub mac: [u8; MAC_LEN],
}

impl Beacon {
    /// The beacon announcing `me` in `namespace`, stamped `ts_ms`, with a random nonce and no MAC
    /// yet (see [`Beacon::seal`]).
    pub fn new(namespace: &str, me: &BeaconInfo, ts_ms: u64) -> Beacon {
        Beacon {
            magic: BEACON_MAGIC.to_owned(),
            version: BEACON_VERSION,
            namespace: namespace_hash(namespace),
            node_id: me.node_id.clone(),
            addr: me.addr,
            started_ms: me.started_ms,
            ts_ms,
            nonce: rand::random(),
            mac: [0; MAC_LEN],
        }
    }

    /// [`Beacon::new`], sealed under `key`.
    pub fn sealed(namespace: &str, me: &BeaconInfo, ts_ms: u64, key: &DiscoveryKey) -> Beacon {
        let mut beacon = Beacon::new(namespace, me, ts_ms);
        beacon.seal(key);
        beacon
    }

    /// Sets `mac` to the MAC of the other fields under `key`.
    pub fn seal(&mut self, key: &DiscoveryKey) {
        let mac = self.transcript(key).finalize().into_bytes();
        self.mac.copy_from_slice(&mac);
    }

    /// Checks `mac` against the other fields under `key`, in constant time.
    pub fn verify(&self, key: &DiscoveryKey) -> Result<(), BeaconError> {
        self.transcript(key)
            .verify_slice(&self.mac)
            .map_err(|_| BeaconError::BadMac {
                node_id: self.node_id.clone(),
            })
    }

    /// The HMAC of the transcript of every field but `mac` (see the module docs).
    fn transcript(&self, key: &DiscoveryKey) -> Hmac<Sha256> {
        let mut addr = Vec::with_capacity(19);
        match self.addr {
            SocketAddr::V4(v4) => {
                addr.push(4);
                addr.extend_from_slice(&v4.ip().octets());
            }
            SocketAddr::V6(v6) => {
                addr.push(6);
                addr.extend_from_slice(&v6.ip().octets());
            }
        }
        addr.extend_from_slice(&self.addr.port().to_be_bytes());
        let mut mac = new_hmac(&key.0);
        for field in [
            MAC_LABEL,
            self.magic.as_bytes(),
            &self.version.to_be_bytes(),
            &self.namespace,
            self.node_id.as_bytes(),
            &addr,
            &self.started_ms.to_be_bytes(),
            &self.ts_ms.to_be_bytes(),
            &self.nonce,
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        mac
    }
}

/// The first fields of a beacon, decoded first so that a beacon of another version is reported
/// as such rather than as undecodable.
#[derive(Deserialize)]
struct BeaconHeader {
    magic: String,
    version: u32,
}

/// Why a datagram is not an acceptable beacon.
#[derive(Debug, thiserror::Error)]
pub enum BeaconError {
    /// The datagram is larger than [`MAX_BEACON_LEN`].
    #[error("datagram of {len} bytes or more exceeds the beacon limit of {MAX_BEACON_LEN} bytes")]
    Oversize {
        /// Its length (for a truncated datagram, the length received).
        len: usize,
    },
    /// The datagram is not MessagePack of the expected shape.
    #[error("undecodable beacon: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    /// This node's beacon could not be encoded.
    #[error("cannot encode beacon: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The datagram is MessagePack but not a canopy beacon.
    #[error("not a canopy beacon (magic {0:?})")]
    WrongMagic(String),
    /// The beacon is of a version this build does not speak (version 1 beacons are not
    /// authenticated and are refused).
    #[error(
        "unsupported beacon version {0} (this build speaks only version {BEACON_VERSION}, \
         authenticated: upgrade the sender)"
    )]
    UnsupportedVersion(u32),
    /// The beacon has an empty node id.
    #[error("beacon without a node id")]
    EmptyNodeId,
    /// The beacon belongs to another discovery namespace (not an error of the sender: two
    /// clusters share the LAN).
    #[error("beacon of another discovery namespace")]
    OtherNamespace,
    /// The beacon's MAC does not verify under this node's discovery key: the sender has a
    /// different cookie, or the beacon is forged or was altered.
    #[error(
        "beacon claiming node {node_id:?} failed authentication (a node with a different \
         cookie, or a forged or altered beacon)"
    )]
    BadMac {
        /// The node id the beacon claims (not authenticated).
        node_id: String,
    },
    /// The beacon's timestamp is too far from the local clock.
    #[error(
        "stale beacon of node {node_id:?}: its timestamp is {skew_ms} ms off the local clock, \
         beyond the {window_s} s window (clocks out of sync, or an old beacon replayed)"
    )]
    Stale {
        /// The sender's node id.
        node_id: String,
        /// The beacon's timestamp minus the local clock, in ms (negative: in the past).
        skew_ms: i64,
        /// The freshness window, in seconds.
        window_s: u64,
    },
    /// An authentic beacon seen before (same node id and nonce): a replay.
    #[error("replayed beacon of node {node_id:?} (its nonce was seen before)")]
    Replayed {
        /// The sender's node id.
        node_id: String,
    },
}

/// Why discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The interface is a loopback address, where multicast does not work.
    #[error(
        "multicast discovery does not work on the loopback interface {interface}: \
         connect the nodes with --peer <addr> instead"
    )]
    Loopback {
        /// The interface address given.
        interface: Ipv4Addr,
    },
    /// The configuration is unusable.
    #[error("invalid discovery configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },
    /// A step of setting up the multicast socket failed.
    #[error("cannot set up multicast discovery on {group} via {interface} ({step}): {source}")]
    Socket {
        /// The step that failed.
        step: &'static str,
        /// The multicast group.
        group: SocketAddrV4,
        /// The interface address.
        interface: Ipv4Addr,
        /// The underlying error.
        source: io::Error,
    },
    /// This node's own beacon cannot be encoded or is too large (a very long node id).
    #[error("invalid beacon for this node: {0}")]
    Beacon(#[from] BeaconError),
}

/// The namespace tag carried by beacons: the first 16 bytes of
/// `sha256("canopy-namespace:" + namespace)`.
pub fn namespace_hash(namespace: &str) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(NAMESPACE_HASH_PREFIX.as_bytes())
        .chain_update(namespace.as_bytes())
        .finalize();
    let mut tag = [0u8; 16];
    tag.copy_from_slice(&digest[..16]);
    tag
}

/// Encodes a beacon (MessagePack, named fields); fails if it would exceed [`MAX_BEACON_LEN`].
pub fn encode_beacon(beacon: &Beacon) -> Result<Vec<u8>, BeaconError> {
    let bytes = rmp_serde::to_vec_named(beacon)?;
    if bytes.len() > MAX_BEACON_LEN {
        return Err(BeaconError::Oversize { len: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes and checks the shape of one datagram: size, format, magic, version and a non-empty
/// node id. It does not authenticate: see [`BeaconGuard::check`] for the whole check.
pub fn decode_beacon(bytes: &[u8]) -> Result<Beacon, BeaconError> {
    if bytes.len() > MAX_BEACON_LEN {
        return Err(BeaconError::Oversize { len: bytes.len() });
    }
    let header: BeaconHeader = rmp_serde::from_slice(bytes)?;
    if header.magic != BEACON_MAGIC {
        return Err(BeaconError::WrongMagic(header.magic));
    }
    if header.version != BEACON_VERSION {
        return Err(BeaconError::UnsupportedVersion(header.version));
    }
    let beacon: Beacon = rmp_serde::from_slice(bytes)?;
    if beacon.node_id.is_empty() {
        return Err(BeaconError::EmptyNodeId);
    }
    Ok(beacon)
}

/// The `(node_id, nonce)` pairs of recently accepted beacons, so that a beacon is accepted once
/// (see the module docs): bounded, with entries expiring once their beacon would be stale.
#[derive(Debug)]
pub struct ReplayCache {
    capacity: usize,
    window_ms: u64,
    /// Each pair with its place in `by_expiry`.
    seen: HashMap<(String, [u8; NONCE_LEN]), (u64, u64)>,
    /// `(expiry ms, insertion sequence)` to pair: the first entry is the next to go.
    by_expiry: BTreeMap<(u64, u64), (String, [u8; NONCE_LEN])>,
    next_seq: u64,
}

impl ReplayCache {
    /// An empty cache of at most `capacity` entries, for beacons accepted within `window`.
    pub fn new(capacity: usize, window: Duration) -> ReplayCache {
        ReplayCache {
            capacity,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            seen: HashMap::new(),
            by_expiry: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Records the beacon `(node_id, nonce)` stamped `ts_ms`, arriving at local time `now_ms`:
    /// `true` if it is new, `false` if it was seen before (a replay). Expired entries go first;
    /// when the cache is full, the entry closest to expiry makes room.
    pub fn insert(
        &mut self,
        node_id: &str,
        nonce: [u8; NONCE_LEN],
        ts_ms: u64,
        now_ms: u64,
    ) -> bool {
        self.expire(now_ms);
        let key = (node_id.to_owned(), nonce);
        if self.seen.contains_key(&key) {
            return false;
        }
        if self.capacity == 0 {
            return true;
        }
        while self.seen.len() >= self.capacity {
            let Some((_, oldest)) = self.by_expiry.pop_first() else {
                break;
            };
            self.seen.remove(&oldest);
        }
        let expiry = ts_ms.max(now_ms).saturating_add(self.window_ms);
        let slot = (expiry, self.next_seq);
        self.next_seq = self.next_seq.wrapping_add(1);
        self.by_expiry.insert(slot, key.clone());
        self.seen.insert(key, slot);
        true
    }

    /// Forgets the entries whose beacons are stale at `now_ms`.
    fn expire(&mut self, now_ms: u64) {
        while let Some(entry) = self.by_expiry.first_entry() {
            if entry.key().0 >= now_ms {
                break;
            }
            let pair = entry.remove();
            self.seen.remove(&pair);
        }
    }

    /// How many pairs are remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no pair is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// The whole check of a received datagram: shape ([`decode_beacon`]), namespace, MAC,
/// freshness and replay, in that order (the replay cache only takes authentic, fresh beacons).
#[derive(Debug)]
pub struct BeaconGuard {
    key: DiscoveryKey,
    namespace: [u8; 16],
    window: Duration,
    replay: ReplayCache,
}

impl BeaconGuard {
    /// A guard for beacons of `namespace` under `key`, with the default [`FRESHNESS_WINDOW`]
    /// and a replay cache of [`REPLAY_CACHE_CAPACITY`] entries.
    pub fn new(key: DiscoveryKey, namespace: &str) -> BeaconGuard {
        BeaconGuard {
            key,
            namespace: namespace_hash(namespace),
            window: FRESHNESS_WINDOW,
            replay: ReplayCache::new(REPLAY_CACHE_CAPACITY, FRESHNESS_WINDOW),
        }
    }

    /// Checks `bytes` received at local time `now_ms` (ms since the Unix epoch): the beacon if it
    /// is acceptable, the typed reason if not.
    pub fn check(&mut self, bytes: &[u8], now_ms: u64) -> Result<Beacon, BeaconError> {
        let beacon = decode_beacon(bytes)?;
        if beacon.namespace != self.namespace {
            return Err(BeaconError::OtherNamespace);
        }
        beacon.verify(&self.key)?;
        let skew = i128::from(beacon.ts_ms) - i128::from(now_ms);
        if skew.unsigned_abs() > self.window.as_millis() {
            return Err(BeaconError::Stale {
                node_id: beacon.node_id,
                skew_ms: i64::try_from(skew).unwrap_or(if skew < 0 { i64::MIN } else { i64::MAX }),
                window_s: self.window.as_secs(),
            });
        }
        if !self
            .replay
            .insert(&beacon.node_id, beacon.nonce, beacon.ts_ms, now_ms)
        {
            return Err(BeaconError::Replayed {
                node_id: beacon.node_id,
            });
        }
        Ok(beacon)
    }

    /// The replay cache (for tests and introspection).
    pub fn replay_cache(&self) -> &ReplayCache {
        &self.replay
    }
}

/// Counts of received datagrams by outcome, shared by a running [`Discovery`] and whoever reads
/// them (`ClusterHandle`). Cheap to clone (an `Arc`); all counters only grow.
#[derive(Clone, Debug, Default)]
pub struct DiscoveryStats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    bad_mac: AtomicU64,
    stale: AtomicU64,
    replayed: AtomicU64,
    malformed: AtomicU64,
    oversize: AtomicU64,
    version: AtomicU64,
    other_namespace: AtomicU64,
}

/// A snapshot of [`DiscoveryStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DiscoveryCounts {
    /// Authentic, fresh, first-seen beacons of other nodes.
    pub accepted: u64,
    /// Beacons whose MAC did not verify ([`BeaconError::BadMac`]).
    pub bad_mac: u64,
    /// Beacons outside the freshness window ([`BeaconError::Stale`]).
    pub stale: u64,
    /// Beacons seen before ([`BeaconError::Replayed`]).
    pub replayed: u64,
    /// Datagrams that are not beacons: undecodable, wrong magic, no node id.
    pub malformed: u64,
    /// Datagrams over [`MAX_BEACON_LEN`] ([`BeaconError::Oversize`]).
    pub oversize: u64,
    /// Beacons of another version, e.g. unauthenticated version 1
    /// ([`BeaconError::UnsupportedVersion`]).
    pub version: u64,
    /// Beacons of another discovery namespace (another cluster on the LAN; not counted in
    /// [`DiscoveryCounts::dropped`]).
    pub other_namespace: u64,
}

impl DiscoveryCounts {
    /// The datagrams refused as bad: every reason but another namespace.
    pub fn dropped(&self) -> u64 {
        self.bad_mac
            .saturating_add(self.stale)
            .saturating_add(self.replayed)
            .saturating_add(self.malformed)
            .saturating_add(self.oversize)
            .saturating_add(self.version)
    }
}

impl DiscoveryStats {
    /// Counters at zero.
    pub fn new() -> DiscoveryStats {
        DiscoveryStats::default()
    }

    /// The counts now.
    pub fn snapshot(&self) -> DiscoveryCounts {
        let c = &self.0;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DiscoveryCounts {
            accepted: get(&c.accepted),
            bad_mac: get(&c.bad_mac),
            stale: get(&c.stale),
            replayed: get(&c.replayed),
            malformed: get(&c.malformed),
            oversize: get(&c.oversize),
            version: get(&c.version),
            other_namespace: get(&c.other_namespace),
        }
    }

    /// The datagrams refused as bad so far ([`DiscoveryCounts::dropped`]).
    pub fn dropped(&self) -> u64 {
        self.snapshot().dropped()
    }

    /// Counts one accepted beacon.
    fn accept(&self) {
        self.0.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one datagram refused for `error`; returns the new count of that reason.
    fn drop_for(&self, error: &BeaconError) -> u64 {
        let c = &self.0;
        let counter = match error {
            BeaconError::Oversize { .. } => &c.oversize,
            BeaconError::Decode(_)
            | BeaconError::Encode(_)
            | BeaconError::WrongMagic(_)
            | BeaconError::EmptyNodeId => &c.malformed,
            BeaconError::UnsupportedVersion(_) => &c.version,
            BeaconError::OtherNamespace => &c.other_namespace,
            BeaconError::BadMac { .. } => &c.bad_mac,
            BeaconError::Stale { .. } => &c.stale,
            BeaconError::Replayed { .. } => &c.replayed,
        };
        counter.fetch_add(1, Ordering::Relaxed).saturating_add(1)
    }
}

/// Milliseconds since the Unix epoch by the local clock (0 before it).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether this node should dial `peer`: only one side of each pair dials, the one whose id is
/// smaller (`me < peer`), so two nodes that discover each other at once do not open two sessions.
/// Antisymmetric: for two different ids exactly one side returns true; a node never dials itself.
pub fn should_dial(me: &str, peer: &str) -> bool {
    me < peer
}

/// Running discovery: sends this node's beacon and collects the others'.
///
/// Dropping it stops both background tasks (and closes the socket).
#[derive(Debug)]
pub struct Discovery {
    rx: mpsc::Receiver<Discovered>,
    tasks: Vec<JoinHandle<()>>,
    announce: Arc<tokio::sync::Notify>,
}

/// Asks a running [`Discovery`] to send its beacon now, out of turn. The cluster actor uses
/// it when it hears a node that must dial it (the node with the smaller id) but has not: that
/// node may have started just after our last beacon, and would otherwise wait a whole
/// interval to hear of us. Announcements are coalesced and spaced at least
/// [`MIN_ANNOUNCE_SPACING`] apart, so a flood of beacons cannot turn into a flood of ours.
#[derive(Debug, Clone)]
pub struct Announcer(Arc<tokio::sync::Notify>);

impl Announcer {
    /// Sends this node's beacon as soon as the spacing allows.
    pub fn announce(&self) {
        self.0.notify_one();
    }
}

/// The shortest gap between two beacons sent out of turn.
pub const MIN_ANNOUNCE_SPACING: Duration = Duration::from_millis(100);

impl Discovery {
    /// Opens the multicast socket and starts sending and receiving beacons in background tasks:
    /// beacons are sealed and checked under `key` (derive it with [`DiscoveryKey::derive`] from
    /// the cookie and `config.namespace`), and every received datagram is counted in `stats`.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        config: DiscoveryConfig,
        me: BeaconInfo,
        key: DiscoveryKey,
        stats: DiscoveryStats,
    ) -> Result<Discovery, DiscoveryError> {
        if config.interface.is_loopback() {
            return Err(DiscoveryError::Loopback {
                interface: config.interface,
            });
        }
        if !config.group.ip().is_multicast() {
            return Err(DiscoveryError::InvalidConfig {
                reason: format!("{} is not a multicast address", config.group.ip()),
            });
        }
        if config.interval.is_zero() {
            return Err(DiscoveryError::InvalidConfig {
                reason: "the beacon interval must not be zero".to_owned(),
            });
        }
        // Every beacon has the same size whatever its timestamp and nonce: one that encodes now
        // always will.
        encode_beacon(&Beacon::sealed(&config.namespace, &me, wall_ms(), &key))?;
        let socket = Arc::new(open_socket(&config)?);
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tracing::info!(
            group = %config.group,
            interface = %config.interface,
            namespace = %config.namespace,
            interval = ?config.interval,
            node_id = %me.node_id,
            addr = %me.addr,
            "multicast discovery started (authenticated beacons, version {BEACON_VERSION})"
        );
        let announce = Arc::new(tokio::sync::Notify::new());
        let sender = tokio::spawn(send_loop(
            Arc::clone(&socket),
            config.group,
            Sender {
                namespace: config.namespace.clone(),
                me: me.clone(),
                key: key.clone(),
            },
            config.interval,
            Arc::clone(&announce),
        ));
        let receiver = tokio::spawn(receive_loop(
            socket,
            BeaconGuard::new(key, &config.namespace),
            me,
            tx,
            stats,
        ));
        Ok(Discovery {
            rx,
            tasks: vec![sender, receiver],
            announce,
        })
    }

    /// The next beacon of another node of the same namespace (see the module docs for the
    /// semantics: about one per peer per interval, dropped when this is not called often enough).
    /// See [`Discovery::announcer`] for sending this node's beacon out of turn.
    /// Cancel-safe, so it can be a `tokio::select!` branch. `None` only once discovery has stopped.
    pub async fn recv(&mut self) -> Option<Discovered> {
        self.rx.recv().await
    }

    /// A handle that makes this discovery send its beacon now.
    pub fn announcer(&self) -> Announcer {
        Announcer(Arc::clone(&self.announce))
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Builds the multicast socket described in the module docs.
fn open_socket(config: &DiscoveryConfig) -> Result<UdpSocket, DiscoveryError> {
    let group = config.group;
    let interface = config.interface;
    let err = |step: &'static str| {
        move |source: io::Error| DiscoveryError::Socket {
            step,
            group,
            interface,
            source,
        }
    };
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
        .map_err(err("creating the socket"))?;
    socket
        .set_reuse_address(true)
        .map_err(err("setting SO_REUSEADDR"))?;
    socket
        .set_reuse_port(true)
        .map_err(err("setting SO_REUSEPORT"))?;
    socket
        .set_nonblocking(true)
        .map_err(err("setting non-blocking mode"))?;
    let bind = SocketAddr::from((Ipv4Addr::UNSPECIFIED, group.port()));
    socket
        .bind(&bind.into())
        .map_err(err("binding the group port"))?;
    socket
        .join_multicast_v4(group.ip(), &interface)
        .map_err(err(
            "joining the group (is the address on an interface that is up?)",
        ))?;
    socket
        .set_multicast_if_v4(&interface)
        .map_err(err("setting IP_MULTICAST_IF"))?;
    socket
        .set_multicast_loop_v4(true)
        .map_err(err("setting IP_MULTICAST_LOOP"))?;
    socket
        .set_multicast_ttl_v4(1)
        .map_err(err("setting IP_MULTICAST_TTL"))?;
    UdpSocket::from_std(socket.into()).map_err(err("registering the socket with tokio"))
}

/// What the send loop needs to make a fresh beacon each time.
struct Sender {
    namespace: String,
    me: BeaconInfo,
    key: DiscoveryKey,
}

impl Sender {
    /// This node's beacon, stamped now, with a fresh nonce, sealed.
    fn beacon(&self) -> Result<Vec<u8>, BeaconError> {
        encode_beacon(&Beacon::sealed(
            &self.namespace,
            &self.me,
            wall_ms(),
            &self.key,
        ))
    }
}

/// Sends a fresh beacon to `group` every `interval`, starting now, and out of turn when
/// `announce` is notified (at most once per [`MIN_ANNOUNCE_SPACING`]); errors are logged and
/// retried.
async fn send_loop(
    socket: Arc<UdpSocket>,
    group: SocketAddrV4,
    sender: Sender,
    interval: Duration,
    announce: Arc<tokio::sync::Notify>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut limiter = LogLimiter::new();
    let mut last = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = announce.notified() => {
                let since = last.elapsed();
                if since < MIN_ANNOUNCE_SPACING {
                    tokio::time::sleep(MIN_ANNOUNCE_SPACING - since).await;
                }
            }
        }
        last = tokio::time::Instant::now();
        let beacon = match sender.beacon() {
            Ok(beacon) => beacon,
            Err(error) => {
                // Cannot happen: start() encoded a beacon of the same size.
                if limiter.allow() {
                    tracing::debug!(%error, "cannot encode this node's beacon");
                }
                continue;
            }
        };
        let Err(error) = socket.send_to(&beacon, SocketAddr::V4(group)).await else {
            continue;
        };
        if limiter.allow() {
            tracing::debug!(%group, %error, "sending a discovery beacon failed; retrying next interval");
        }
    }
}

/// One [`LogLimiter`] per kind of dropped datagram, so that a flood of one kind does not hide
/// the others.
struct DropLogs {
    garbage: LogLimiter,
    foreign: LogLimiter,
    version: LogLimiter,
    bad_mac: LogLimiter,
    stale: LogLimiter,
    replayed: LogLimiter,
}

impl DropLogs {
    fn new() -> DropLogs {
        DropLogs {
            garbage: LogLimiter::new(),
            foreign: LogLimiter::new(),
            version: LogLimiter::new(),
            bad_mac: LogLimiter::new(),
            stale: LogLimiter::new(),
            replayed: LogLimiter::new(),
        }
    }

    /// Logs (rate-limited) that a datagram of `len` bytes from `from` was dropped for `error`,
    /// the `count`th of its kind.
    fn log(&mut self, from: SocketAddr, len: usize, error: &BeaconError, count: u64) {
        match error {
            BeaconError::BadMac { .. } => {
                if self.bad_mac.allow() {
                    tracing::warn!(%from, count, "dropped a discovery beacon: {error}");
                }
            }
            BeaconError::Stale { .. } => {
                if self.stale.allow() {
                    tracing::warn!(%from, count, "dropped a discovery beacon: {error}");
                }
            }
            BeaconError::Replayed { .. } => {
                if self.replayed.allow() {
                    tracing::warn!(%from, count, "dropped a discovery beacon: {error}");
                }
            }
            BeaconError::UnsupportedVersion(_) => {
                if self.version.allow() {
                    tracing::warn!(%from, count, "dropped a discovery beacon: {error}");
                }
            }
            BeaconError::OtherNamespace => {
                if self.foreign.allow() {
                    tracing::debug!(%from, count, "ignoring a beacon of another discovery namespace");
                }
            }
            BeaconError::Oversize { .. }
            | BeaconError::Decode(_)
            | BeaconError::Encode(_)
            | BeaconError::WrongMagic(_)
            | BeaconError::EmptyNodeId => {
                if self.garbage.allow() {
                    tracing::debug!(%from, len, count, "ignoring a datagram on the discovery port: {error}");
                }
            }
        }
    }
}

/// Receives datagrams, keeps the beacons of other nodes that pass `guard` and forwards them;
/// counts every outcome in `stats`.
async fn receive_loop(
    socket: Arc<UdpSocket>,
    mut guard: BeaconGuard,
    me: BeaconInfo,
    tx: mpsc::Sender<Discovered>,
    stats: DiscoveryStats,
) {
    // One byte more than the limit, to tell an oversized (truncated) datagram from a full one.
    let mut buf = vec![0u8; MAX_BEACON_LEN + 1];
    let mut errors = LogLimiter::new();
    let mut drops = DropLogs::new();
    let mut impostor = LogLimiter::new();
    let mut dropped = LogLimiter::new();
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                if errors.allow() {
                    tracing::debug!(%error, "receiving a discovery datagram failed");
                }
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        let beacon = match guard.check(&buf[..len], wall_ms()) {
            Ok(beacon) => beacon,
            Err(error) => {
                let count = stats.drop_for(&error);
                drops.log(from, len, &error, count);
                continue;
            }
        };
        if beacon.node_id == me.node_id {
            if (beacon.addr != me.addr || beacon.started_ms != me.started_ms) && impostor.allow() {
                tracing::warn!(
                    %from,
                    node_id = %me.node_id,
                    their_addr = %beacon.addr,
                    "another node announces this node's id: two nodes share one identity \
                     (a copied data directory?); give one of them another --data-dir"
                );
            }
            continue;
        }
        stats.accept();
        let discovered = Discovered {
            node_id: beacon.node_id,
            addr: beacon.addr,
            started_ms: beacon.started_ms,
            from,
        };
        match tx.try_send(discovered) {
            Ok(()) => {}
            Err(TrySendError::Full(discovered)) => {
                if dropped.allow() {
                    tracing::debug!(node_id = ?discovered.node_id, "discovery consumer is slow; dropping a beacon");
                }
            }
            Err(TrySendError::Closed(_)) => return,
        }
    }
}

/// Allows [`LOG_BURST`] log lines per [`LOG_WINDOW`] and counts the rest, so that a flood of
/// datagrams cannot flood the logs.
struct LogLimiter {
    window_start: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    fn new() -> LogLimiter {
        LogLimiter {
            window_start: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether one more line may be logged now.
    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= LOG_WINDOW {
            if self.suppressed > 0 {
                tracing::debug!(
                    suppressed = self.suppressed,
                    "discovery: suppressed log lines about ignored datagrams"
                );
            }
            self.window_start = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < LOG_BURST {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::ifaddrs::getifaddrs;
    use nix::net::if_::InterfaceFlags;

    const COOKIE: &str = "test-cookie";
    const NOW: u64 = 1_750_000_000_000;

    /// A non-loopback IPv4 address of an interface that is up and multicast-capable.
    fn multicast_interface() -> Option<Ipv4Addr> {
        getifaddrs().ok()?.find_map(|ifa| {
            let flags = ifa.flags;
            if !flags.contains(
                InterfaceFlags::IFF_UP
                    | InterfaceFlags::IFF_RUNNING
                    | InterfaceFlags::IFF_MULTICAST,
            ) || flags.contains(InterfaceFlags::IFF_LOOPBACK)
            {
                return None;
            }
            let ip = ifa.address?.as_sockaddr_in()?.ip();
            (!ip.is_loopback()).then_some(ip)
        })
    }

    /// A config on `interface` with a random port and a fast interval, so that concurrent test
    /// runs on one host do not hear each other.
    fn test_config(interface: Ipv4Addr, port: u16, namespace: &str) -> DiscoveryConfig {
        DiscoveryConfig {
            group: SocketAddrV4::new(*DEFAULT_GROUP.ip(), port),
            interface,
            namespace: namespace.to_owned(),
            interval: Duration::from_millis(50),
        }
    }

    /// A multicast-capable interface and a random group port for a real-UDP test, or
    /// `None` (saying the test skips) on a host without such an interface.
    fn multicast_group() -> Option<(Ipv4Addr, u16)> {
        let Some(interface) = multicast_interface() else {
            eprintln!("skipping: no non-loopback multicast-capable IPv4 interface on this host");
            return None;
        };
        Some((interface, rand::random_range(40000..60000)))
    }

    /// A namespace no other test run uses.
    fn fresh_namespace() -> String {
        format!("test-{}", rand::random::<u64>())
    }

    fn info(node_id: &str, port: u16) -> BeaconInfo {
        BeaconInfo {
            node_id: node_id.to_owned(),
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            started_ms: 1_700_000_000_000 + u64::from(port),
        }
    }

    fn key() -> DiscoveryKey {
        DiscoveryKey::derive(COOKIE, "canopy")
    }

    /// A sealed beacon of `node_id` in namespace "canopy", stamped `ts_ms`, encoded.
    fn sealed_bytes(node_id: &str, ts_ms: u64, key: &DiscoveryKey) -> Vec<u8> {
        encode_beacon(&Beacon::sealed("canopy", &info(node_id, 7000), ts_ms, key)).unwrap()
    }

    async fn start(
        config: DiscoveryConfig,
        me: BeaconInfo,
        cookie: &str,
    ) -> Result<Discovery, DiscoveryError> {
        let key = DiscoveryKey::derive(cookie, &config.namespace);
        Discovery::start(config, me, key, DiscoveryStats::new()).await
    }

    /// The first beacon `discovery` reports within `within`.
    async fn next(discovery: &mut Discovery, within: Duration) -> Option<Discovered> {
        tokio::time::timeout(within, discovery.recv())
            .await
            .ok()
            .flatten()
    }

    #[test]
    fn beacon_round_trip() {
        let beacon = Beacon::sealed("canopy", &info("aaaa", 7000), NOW, &key());
        let bytes = encode_beacon(&beacon).unwrap();
        assert!(bytes.len() <= MAX_BEACON_LEN);
        assert_eq!(decode_beacon(&bytes).unwrap(), beacon);
        beacon.verify(&key()).unwrap();
        let mut guard = BeaconGuard::new(key(), "canopy");
        assert_eq!(guard.check(&bytes, NOW).unwrap(), beacon);
        // An IPv6 address round-trips and verifies too.
        let mut me = info("aaaa", 7000);
        me.addr = "[fe80::1]:7000".parse().unwrap();
        let bytes = encode_beacon(&Beacon::sealed("canopy", &me, NOW, &key())).unwrap();
        assert_eq!(guard.check(&bytes, NOW).unwrap().addr, me.addr);
    }

    #[test]
    fn nonces_differ_per_beacon() {
        let a = Beacon::new("canopy", &info("aaaa", 7000), NOW);
        let b = Beacon::new("canopy", &info("aaaa", 7000), NOW);
        assert_ne!(a.nonce, b.nonce);
    }

    #[test]
    fn key_derivation_depends_on_cookie_and_namespace_and_debug_is_redacted() {
        let k = DiscoveryKey::derive(COOKIE, "canopy");
        assert_eq!(k.0, DiscoveryKey::derive(COOKIE, "canopy").0);
        assert_ne!(k.0, DiscoveryKey::derive("other", "canopy").0);
        assert_ne!(k.0, DiscoveryKey::derive(COOKIE, "other").0);
        // The key is not the cookie, nor a plain hash of it.
        assert_ne!(&k.0[..COOKIE.len()], COOKIE.as_bytes());
        let debug = format!("{k:?}");
        assert_eq!(debug, "DiscoveryKey(<redacted>)");
        let hex: String = k.0.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!debug.contains(&hex[..8]));
    }

    #[test]
    fn wrong_key_is_a_bad_mac() {
        let bytes = sealed_bytes("aaaa", NOW, &DiscoveryKey::derive("wrong", "canopy"));
        let mut guard = BeaconGuard::new(key(), "canopy");
        let err = guard.check(&bytes, NOW).unwrap_err();
        assert!(matches!(err, BeaconError::BadMac { .. }), "{err:?}");
        assert!(err.to_string().contains("different cookie"), "{err}");
        // An unsealed beacon (all-zero MAC) is refused too.
        let unsealed = encode_beacon(&Beacon::new("canopy", &info("aaaa", 7000), NOW)).unwrap();
        assert!(matches!(
            guard.check(&unsealed, NOW),
            Err(BeaconError::BadMac { .. })
        ));
        // Refused beacons do not enter the replay cache.
        assert!(guard.replay_cache().is_empty());
    }

    /// Changes one field of a beacon.
    type Tamper = fn(&mut Beacon);

    #[test]
    fn every_tampered_field_is_a_bad_mac() {
        let original = Beacon::sealed("canopy", &info("aaaa", 7000), NOW, &key());
        let tamperings: [(&str, Tamper); 7] = [
            ("node_id", |b| b.node_id = "bbbb".into()),
            ("addr", |b| b.addr = "10.0.0.66:7000".parse().unwrap()),
            ("port", |b| b.addr.set_port(7001)),
            ("started_ms", |b| b.started_ms += 1),
            ("ts_ms", |b| b.ts_ms += 1),
            ("nonce", |b| b.nonce[0] ^= 1),
            ("mac", |b| b.mac[31] ^= 1),
        ];
        for (field, tamper) in tamperings {
            let mut beacon = original.clone();
            tamper(&mut beacon);
            let bytes = encode_beacon(&beacon).unwrap();
            let mut guard = BeaconGuard::new(key(), "canopy");
            assert!(
                matches!(guard.check(&bytes, NOW), Err(BeaconError::BadMac { .. })),
                "tampered {field}"
            );
        }
        // The namespace tag is checked first (another namespace is not an attack), and a
        // re-tagged beacon does not verify under the other namespace's key either.
        let mut beacon = original.clone();
        beacon.namespace = namespace_hash("other");
        let bytes = encode_beacon(&beacon).unwrap();
        assert!(matches!(
            BeaconGuard::new(key(), "canopy").check(&bytes, NOW),
            Err(BeaconError::OtherNamespace)
        ));
        assert!(matches!(
            BeaconGuard::new(DiscoveryKey::derive(COOKIE, "other"), "other").check(&bytes, NOW),
            Err(BeaconError::BadMac { .. })
        ));
        // Every byte flip of a sealed beacon is refused, without a panic.
        let bytes = encode_beacon(&original).unwrap();
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x01;
            assert!(
                BeaconGuard::new(key(), "canopy")
                    .check(&flipped, NOW)
                    .is_err(),
                "flip of byte {i} accepted"
            );
        }
    }

    /// The version 1 wire format (no timestamp, nonce or MAC).
    #[derive(Serialize)]
    struct BeaconV1 {
        magic: String,
        version: u32,
        namespace: [u8; 16],
        node_id: String,
        addr: SocketAddr,
        started_ms: u64,
    }

    #[test]
    fn version_1_is_refused() {
        let v1 = BeaconV1 {
            magic: BEACON_MAGIC.to_owned(),
            version: 1,
            namespace: namespace_hash("canopy"),
            node_id: "aaaa".to_owned(),
            addr: "10.0.0.1:7000".parse().unwrap(),
            started_ms: NOW,
        };
        let bytes = rmp_serde::to_vec_named(&v1).unwrap();
        let err = BeaconGuard::new(key(), "canopy")
            .check(&bytes, NOW)
            .unwrap_err();
        assert!(matches!(err, BeaconError::UnsupportedVersion(1)), "{err:?}");
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn stale_beacons_are_refused_both_ways() {
        let window = u64::try_from(FRESHNESS_WINDOW.as_millis()).unwrap();
        let mut guard = BeaconGuard::new(key(), "canopy");
        for ts in [NOW - window - 1, NOW + window + 1, 0, u64::MAX] {
            let err = guard
                .check(&sealed_bytes("aaaa", ts, &key()), NOW)
                .unwrap_err();
            assert!(matches!(err, BeaconError::Stale { .. }), "{ts}: {err:?}");
        }
        let err = guard
            .check(&sealed_bytes("aaaa", NOW - window - 1, &key()), NOW)
            .unwrap_err();
        assert!(
            matches!(err, BeaconError::Stale { skew_ms, .. } if skew_ms == -(window as i64) - 1),
            "{err:?}"
        );
        let err = guard
            .check(&sealed_bytes("aaaa", NOW + 40_000, &key()), NOW)
            .unwrap_err();
        assert!(err.to_string().contains("40000 ms"), "{err}");
        // Within the window, both ways, is fresh.
        for ts in [NOW - window, NOW + window, NOW - 1, NOW + 1] {
            guard.check(&sealed_bytes("aaaa", ts, &key()), NOW).unwrap();
        }
        // A local clock before the epoch (0) does not panic.
        assert!(guard.check(&sealed_bytes("aaaa", NOW, &key()), 0).is_err());
    }

    #[test]
    fn replays_are_refused() {
        let mut guard = BeaconGuard::new(key(), "canopy");
        let bytes = sealed_bytes("aaaa", NOW, &key());
        guard.check(&bytes, NOW).unwrap();
        let err = guard.check(&bytes, NOW + 1000).unwrap_err();
        assert!(matches!(err, BeaconError::Replayed { .. }), "{err:?}");
        assert!(err.to_string().contains("replayed"), "{err}");
        // Still refused near the end of the window, and stale after it.
        assert!(matches!(
            guard.check(&bytes, NOW + 29_000),
            Err(BeaconError::Replayed { .. })
        ));
        assert!(matches!(
            guard.check(&bytes, NOW + 31_000),
            Err(BeaconError::Stale { .. })
        ));
        // The same nonce under another node id is another beacon (it is not a replay of this
        // one: the MAC binds the id), and a fresh beacon of the same node passes.
        guard
            .check(&sealed_bytes("aaaa", NOW + 500, &key()), NOW + 600)
            .unwrap();
    }

    #[test]
    fn replay_cache_is_bounded_and_expires() {
        let mut cache = ReplayCache::new(REPLAY_CACHE_CAPACITY, FRESHNESS_WINDOW);
        for i in 0..5000u32 {
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..4].copy_from_slice(&i.to_be_bytes());
            assert!(cache.insert("aaaa", nonce, NOW + u64::from(i), NOW));
            assert!(cache.len() <= REPLAY_CACHE_CAPACITY);
        }
        assert_eq!(cache.len(), REPLAY_CACHE_CAPACITY);
        // The latest entries are kept, the earliest-expiring went.
        let nonce_of = |i: u32| {
            let mut nonce = [0u8; NONCE_LEN];
            nonce[..4].copy_from_slice(&i.to_be_bytes());
            nonce
        };
        assert!(!cache.insert("aaaa", nonce_of(4999), NOW + 4999, NOW));
        assert_eq!(cache.len(), REPLAY_CACHE_CAPACITY);
        // Everything expires once its beacon would be stale.
        assert!(cache.insert("bbbb", nonce_of(0), NOW, NOW + 3_600_000));
        assert_eq!(cache.len(), 1);

        // Through the guard too.
        let mut guard = BeaconGuard::new(key(), "canopy");
        for i in 0..5000u64 {
            guard
                .check(&sealed_bytes("aaaa", NOW + i, &key()), NOW + i)
                .unwrap();
            assert!(guard.replay_cache().len() <= REPLAY_CACHE_CAPACITY);
        }
        // A cache of capacity 0 remembers nothing and does not panic.
        let mut empty = ReplayCache::new(0, FRESHNESS_WINDOW);
        assert!(empty.insert("aaaa", nonce_of(1), NOW, NOW));
        assert!(empty.is_empty());
    }

    #[test]
    fn namespace_hash_differs_per_namespace() {
        assert_eq!(namespace_hash("canopy"), namespace_hash("canopy"));
        assert_ne!(namespace_hash("canopy"), namespace_hash("other"));
        assert_ne!(namespace_hash(""), namespace_hash("canopy"));
    }

    #[test]
    fn bad_datagrams_are_rejected() {
        assert!(matches!(decode_beacon(b""), Err(BeaconError::Decode(_))));
        assert!(matches!(
            decode_beacon(b"\xff\x00garbage"),
            Err(BeaconError::Decode(_))
        ));
        let oversized = vec![0x90u8; MAX_BEACON_LEN + 1];
        let err = decode_beacon(&oversized).unwrap_err();
        assert!(matches!(err, BeaconError::Oversize { .. }), "{err:?}");
        assert!(err.to_string().contains("exceeds"), "{err}");
        // An oversized datagram is refused before anything else, whatever it holds.
        let mut padded = sealed_bytes("aaaa", NOW, &key());
        padded.resize(MAX_BEACON_LEN + 1, 0);
        assert!(matches!(
            BeaconGuard::new(key(), "canopy").check(&padded, NOW),
            Err(BeaconError::Oversize { .. })
        ));

        let mut beacon = Beacon::new("canopy", &info("aaaa", 7000), NOW);
        beacon.magic = "exo-beacon".to_owned();
        let bytes = rmp_serde::to_vec_named(&beacon).unwrap();
        assert!(matches!(
            decode_beacon(&bytes),
            Err(BeaconError::WrongMagic(_))
        ));

        let mut beacon = Beacon::new("canopy", &info("aaaa", 7000), NOW);
        beacon.version = 3;
        let bytes = rmp_serde::to_vec_named(&beacon).unwrap();
        assert!(matches!(
            decode_beacon(&bytes),
            Err(BeaconError::UnsupportedVersion(3))
        ));

        let beacon = Beacon::new("canopy", &info("", 7000), NOW);
        let bytes = rmp_serde::to_vec_named(&beacon).unwrap();
        assert!(matches!(
            decode_beacon(&bytes),
            Err(BeaconError::EmptyNodeId)
        ));

        // A truncated beacon.
        let bytes = sealed_bytes("aaaa", NOW, &key());
        assert!(decode_beacon(&bytes[..bytes.len() / 2]).is_err());

        // Every prefix and byte flip of a valid beacon is handled without a panic.
        let mut guard = BeaconGuard::new(key(), "canopy");
        for i in 0..bytes.len() {
            let _ = guard.check(&bytes[..i], NOW);
            let mut flipped = bytes.clone();
            flipped[i] ^= 0xff;
            let _ = guard.check(&flipped, NOW);
        }
    }

    #[test]
    fn stats_count_by_reason() {
        let stats = DiscoveryStats::new();
        let clone = stats.clone();
        let mut guard = BeaconGuard::new(key(), "canopy");
        let inputs = [
            sealed_bytes("aaaa", NOW, &DiscoveryKey::derive("x", "canopy")),
            sealed_bytes("aaaa", NOW - 60_000, &key()),
            vec![0u8; MAX_BEACON_LEN + 1],
            b"junk".to_vec(),
        ];
        for bytes in &inputs {
            let err = guard.check(bytes, NOW).unwrap_err();
            stats.drop_for(&err);
        }
        let bytes = sealed_bytes("aaaa", NOW, &key());
        guard.check(&bytes, NOW).unwrap();
        stats.accept();
        stats.drop_for(&guard.check(&bytes, NOW).unwrap_err());
        stats.drop_for(&BeaconError::UnsupportedVersion(1));
        stats.drop_for(&BeaconError::OtherNamespace);
        let counts = clone.snapshot();
        assert_eq!(
            counts,
            DiscoveryCounts {
                accepted: 1,
                bad_mac: 1,
                stale: 1,
                replayed: 1,
                malformed: 1,
                oversize: 1,
                version: 1,
                other_namespace: 1,
            }
        );
        assert_eq!(counts.dropped(), 6);
        assert_eq!(clone.dropped(), 6);
    }

    #[test]
    fn own_oversized_beacon_is_refused() {
        let me = info(&"x".repeat(2000), 7000);
        let beacon = Beacon::sealed("canopy", &me, NOW, &key());
        assert!(matches!(
            encode_beacon(&beacon),
            Err(BeaconError::Oversize { .. })
        ));
    }

    #[test]
    fn should_dial_is_antisymmetric() {
        let ids = ["0a", "0b", "ff", "1", "10"];
        for a in ids {
            assert!(!should_dial(a, a));
            for b in ids {
                if a != b {
                    assert_ne!(should_dial(a, b), should_dial(b, a), "{a} {b}");
                }
            }
        }
        assert!(should_dial("0a", "0b"));
    }

    #[tokio::test]
    async fn loopback_is_refused_with_a_hint() {
        let err = start(
            DiscoveryConfig::new(Ipv4Addr::LOCALHOST),
            info("aaaa", 7000),
            COOKIE,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, DiscoveryError::Loopback { .. }), "{err:?}");
        assert!(err.to_string().contains("--peer"), "{err}");
    }

    #[tokio::test]
    async fn invalid_config_is_refused() {
        let mut config = DiscoveryConfig::new(Ipv4Addr::new(192, 0, 2, 2));
        config.interval = Duration::ZERO;
        assert!(matches!(
            start(config, info("aaaa", 7000), COOKIE).await,
            Err(DiscoveryError::InvalidConfig { .. })
        ));
        let mut config = DiscoveryConfig::new(Ipv4Addr::new(192, 0, 2, 2));
        config.group = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 5000);
        assert!(matches!(
            start(config, info("aaaa", 7000), COOKIE).await,
            Err(DiscoveryError::InvalidConfig { .. })
        ));
    }

    #[tokio::test]
    async fn two_nodes_discover_each_other() {
        let Some((interface, port)) = multicast_group() else {
            return;
        };
        let namespace = fresh_namespace();
        let config = test_config(interface, port, &namespace);
        let (a_info, b_info) = (info("aaaa", 7001), info("bbbb", 7002));
        let a_stats = DiscoveryStats::new();
        let key = DiscoveryKey::derive(COOKIE, &namespace);
        let mut a = Discovery::start(config.clone(), a_info.clone(), key, a_stats.clone())
            .await
            .unwrap();
        let b_stats = DiscoveryStats::new();
        let key = DiscoveryKey::derive(COOKIE, &namespace);
        let mut b = Discovery::start(config, b_info.clone(), key, b_stats.clone())
            .await
            .unwrap();

        // Garbage on the port is ignored (and counted) and does not stop the receive loop.
        // Both nodes share the port (SO_REUSEPORT), so the kernel hands unicast datagrams from
        // one sender to one of them: the garbage is counted by a or by b.
        let junk = std::net::UdpSocket::bind((interface, 0)).unwrap();
        for _ in 0..20 {
            junk.send_to(b"\x00junk", (interface, port)).unwrap();
        }

        let seen = next(&mut a, Duration::from_secs(3))
            .await
            .expect("a sees b");
        assert_eq!(seen.node_id, b_info.node_id);
        assert_eq!(seen.addr, b_info.addr);
        assert_eq!(seen.started_ms, b_info.started_ms);
        assert_eq!(seen.from.ip(), std::net::IpAddr::V4(interface));
        let seen = next(&mut b, Duration::from_secs(3))
            .await
            .expect("b sees a");
        assert_eq!(seen.node_id, a_info.node_id);
        assert_eq!(seen.addr, a_info.addr);

        // Own beacons are never reported.
        for _ in 0..5 {
            let seen = next(&mut a, Duration::from_secs(1))
                .await
                .expect("a keeps seeing b");
            assert_eq!(seen.node_id, b_info.node_id);
        }
        let counts = a_stats.snapshot();
        assert!(counts.accepted >= 6, "{counts:?}");
        let b_counts = b_stats.snapshot();
        assert!(
            counts.malformed + b_counts.malformed >= 1,
            "{counts:?} {b_counts:?}"
        );
        assert_eq!(
            counts.bad_mac + counts.stale + counts.replayed,
            0,
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn other_namespaces_are_invisible() {
        let Some((interface, port)) = multicast_group() else {
            return;
        };
        let ns1 = fresh_namespace();
        let ns2 = fresh_namespace();
        let mut a = start(
            test_config(interface, port, &ns1),
            info("aaaa", 7001),
            COOKIE,
        )
        .await
        .unwrap();
        let _a2 = start(
            test_config(interface, port, &ns1),
            info("cccc", 7003),
            COOKIE,
        )
        .await
        .unwrap();
        let mut b = start(
            test_config(interface, port, &ns2),
            info("bbbb", 7002),
            COOKIE,
        )
        .await
        .unwrap();

        // a hears its namespace peer, so beacons do flow on this port...
        let seen = next(&mut a, Duration::from_secs(3))
            .await
            .expect("a sees a2");
        assert_eq!(seen.node_id, "cccc");
        // ...but never the node of the other namespace, which hears nobody.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(400);
        while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, a.recv()).await {
            assert_eq!(seen.node_id, "cccc");
        }
        assert_eq!(next(&mut b, Duration::from_millis(200)).await, None);
    }

    #[tokio::test]
    async fn a_node_with_another_cookie_is_not_discovered_and_is_counted() {
        let Some((interface, port)) = multicast_group() else {
            return;
        };
        let namespace = fresh_namespace();
        let config = test_config(interface, port, &namespace);
        let a_stats = DiscoveryStats::new();
        let mut a = Discovery::start(
            config.clone(),
            info("aaaa", 7001),
            DiscoveryKey::derive(COOKIE, &namespace),
            a_stats.clone(),
        )
        .await
        .unwrap();
        let _a2 = start(config.clone(), info("cccc", 7003), COOKIE)
            .await
            .unwrap();
        let mut intruder = start(config, info("bbbb", 7002), "not-the-cookie")
            .await
            .unwrap();

        // a hears its peer of the same cookie, so beacons do flow on this port...
        let seen = next(&mut a, Duration::from_secs(3))
            .await
            .expect("a sees a2");
        assert_eq!(seen.node_id, "cccc");
        // ...but never the node with another cookie, which hears nobody; its beacons are counted.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, a.recv()).await {
            assert_eq!(seen.node_id, "cccc");
        }
        assert_eq!(next(&mut intruder, Duration::from_millis(200)).await, None);
        let counts = a_stats.snapshot();
        assert!(counts.bad_mac >= 1, "{counts:?}");
        assert_eq!(counts.dropped(), counts.bad_mac, "{counts:?}");
        assert!(a_stats.dropped() >= 1);
    }
}
