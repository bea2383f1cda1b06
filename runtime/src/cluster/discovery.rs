//! Zero-configuration discovery of the nodes on one LAN, by UDP multicast beacons.
//!
//! Every node sends a small beacon to a multicast group (by default `239.255.41.95:52416`,
//! in the administratively scoped range, TTL 1 so it never leaves the link) every `interval`,
//! and listens on the same group. A beacon says "node `node_id`, started at `started_ms`, accepts
//! cluster connections on `addr`". [`Discovery::recv`] hands out the beacons of other nodes; the
//! cluster actor decides whom to dial ([`should_dial`]) and dedups against the sessions it has.
//!
//! Decisions:
//!
//! - **Wire format**: MessagePack with named fields ([`Beacon`]), starting with a magic string and
//!   a version, at most [`MAX_BEACON_LEN`] bytes. Decoding ([`decode_beacon`]) is a pure function
//!   that rejects anything else with a typed [`BeaconError`]; the receive loop logs rejected
//!   datagrams at `debug`, rate-limited, so a flood of garbage neither panics nor fills the logs.
//! - **Namespaces**: a beacon carries the first 16 bytes of `sha256("canopy-namespace:" + name)`
//!   ([`namespace_hash`]) rather than the name, so that two clusters on one LAN ignore each other
//!   without broadcasting their names. It is a partition, not a secret: the cookie authenticates.
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
//!   i.e. about one [`Discovered`] per peer per interval, with no deduplication here. The channel
//!   is bounded ([`CHANNEL_CAPACITY`]) and filled with `try_send`: when the consumer is slow, new
//!   beacons are dropped rather than blocking the receive loop. Since peers repeat their beacon
//!   every interval, nothing is lost for good.
//! - **Own beacons** (same `node_id`) are skipped. One with our id but another address or start
//!   time means a second node uses our identity (a copied data directory): that is logged at
//!   `warn`, rate-limited.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
/// The beacon format version this build sends and accepts.
pub const BEACON_VERSION: u32 = 1;
/// The largest datagram accepted as a beacon, in bytes.
pub const MAX_BEACON_LEN: usize = 1024;
/// How many discovered beacons may wait for [`Discovery::recv`] before new ones are dropped.
pub const CHANNEL_CAPACITY: usize = 64;

/// The prefix hashed with the namespace name, see [`namespace_hash`].
const NAMESPACE_HASH_PREFIX: &str = "canopy-namespace:";
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
    pub namespace: [u8; 16],
    /// The sender's node id.
    pub node_id: String,
    /// The sender's cluster listen address.
    pub addr: SocketAddr,
    /// The sender's start time, in milliseconds since the Unix epoch.
    pub started_ms: u64,
}

impl Beacon {
    /// The beacon announcing `me` in `namespace`.
    pub fn new(namespace: &str, me: &BeaconInfo) -> Beacon {
        Beacon {
            magic: BEACON_MAGIC.to_owned(),
            version: BEACON_VERSION,
            namespace: namespace_hash(namespace),
            node_id: me.node_id.clone(),
            addr: me.addr,
            started_ms: me.started_ms,
        }
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
    TooLarge {
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
    /// The beacon is of a version this build does not speak.
    #[error("unsupported beacon version {0} (this build speaks version {BEACON_VERSION})")]
    UnsupportedVersion(u32),
    /// The beacon has an empty node id.
    #[error("beacon without a node id")]
    EmptyNodeId,
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
        return Err(BeaconError::TooLarge { len: bytes.len() });
    }
    Ok(bytes)
}

/// Decodes and checks one datagram: size, format, magic, version and a non-empty node id.
/// The namespace and the node id are the caller's to check.
pub fn decode_beacon(bytes: &[u8]) -> Result<Beacon, BeaconError> {
    if bytes.len() > MAX_BEACON_LEN {
        return Err(BeaconError::TooLarge { len: bytes.len() });
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
    /// Opens the multicast socket and starts sending and receiving beacons in background tasks.
    /// Must be called inside a tokio runtime.
    pub async fn start(
        config: DiscoveryConfig,
        me: BeaconInfo,
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
        let beacon = encode_beacon(&Beacon::new(&config.namespace, &me))?;
        let socket = Arc::new(open_socket(&config)?);
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        tracing::info!(
            group = %config.group,
            interface = %config.interface,
            namespace = %config.namespace,
            interval = ?config.interval,
            node_id = %me.node_id,
            addr = %me.addr,
            "multicast discovery started"
        );
        let announce = Arc::new(tokio::sync::Notify::new());
        let sender = tokio::spawn(send_loop(
            Arc::clone(&socket),
            config.group,
            beacon,
            config.interval,
            Arc::clone(&announce),
        ));
        let receiver = tokio::spawn(receive_loop(
            socket,
            namespace_hash(&config.namespace),
            me,
            tx,
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

/// Sends `beacon` to `group` every `interval`, starting now, and out of turn when `announce`
/// is notified (at most once per [`MIN_ANNOUNCE_SPACING`]); errors are logged and retried.
async fn send_loop(
    socket: Arc<UdpSocket>,
    group: SocketAddrV4,
    beacon: Vec<u8>,
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
        let Err(error) = socket.send_to(&beacon, SocketAddr::V4(group)).await else {
            continue;
        };
        if limiter.allow() {
            tracing::debug!(%group, %error, "sending a discovery beacon failed; retrying next interval");
        }
    }
}

/// Receives datagrams, keeps the valid beacons of other nodes of `namespace` and forwards them.
async fn receive_loop(
    socket: Arc<UdpSocket>,
    namespace: [u8; 16],
    me: BeaconInfo,
    tx: mpsc::Sender<Discovered>,
) {
    // One byte more than the limit, to tell an oversized (truncated) datagram from a full one.
    let mut buf = vec![0u8; MAX_BEACON_LEN + 1];
    let mut ignored = LogLimiter::new();
    let mut foreign = LogLimiter::new();
    let mut impostor = LogLimiter::new();
    let mut dropped = LogLimiter::new();
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                if ignored.allow() {
                    tracing::debug!(%error, "receiving a discovery datagram failed");
                }
                tokio::time::sleep(RECV_ERROR_BACKOFF).await;
                continue;
            }
        };
        let beacon = match decode_beacon(&buf[..len]) {
            Ok(beacon) => beacon,
            Err(error) => {
                if ignored.allow() {
                    tracing::debug!(%from, len, %error, "ignoring a datagram on the discovery port");
                }
                continue;
            }
        };
        if beacon.namespace != namespace {
            if foreign.allow() {
                tracing::debug!(%from, node_id = %beacon.node_id, "ignoring a beacon of another discovery namespace");
            }
            continue;
        }
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
                    tracing::debug!(node_id = %discovered.node_id, "discovery consumer is slow; dropping a beacon");
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

    fn random_port() -> u16 {
        rand::random_range(40000..60000)
    }

    fn info(node_id: &str, port: u16) -> BeaconInfo {
        BeaconInfo {
            node_id: node_id.to_owned(),
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            started_ms: 1_700_000_000_000 + u64::from(port),
        }
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
        let beacon = Beacon::new("canopy", &info("aaaa", 7000));
        let bytes = encode_beacon(&beacon).unwrap();
        assert!(bytes.len() <= MAX_BEACON_LEN);
        assert_eq!(decode_beacon(&bytes).unwrap(), beacon);
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
        assert!(matches!(
            decode_beacon(&oversized),
            Err(BeaconError::TooLarge { .. })
        ));

        let mut beacon = Beacon::new("canopy", &info("aaaa", 7000));
        beacon.magic = "exo-beacon".to_owned();
        let bytes = rmp_serde::to_vec_named(&beacon).unwrap();
        assert!(matches!(
            decode_beacon(&bytes),
            Err(BeaconError::WrongMagic(_))
        ));

        let mut beacon = Beacon::new("canopy", &info("aaaa", 7000));
        beacon.version = 2;
        let bytes = rmp_serde::to_vec_named(&beacon).unwrap();
        assert!(matches!(
            decode_beacon(&bytes),
            Err(BeaconError::UnsupportedVersion(2))
        ));

        let beacon = Beacon::new("canopy", &info("", 7000));
        let bytes = rmp_serde::to_vec_named(&beacon).unwrap();
        assert!(matches!(
            decode_beacon(&bytes),
            Err(BeaconError::EmptyNodeId)
        ));

        // A truncated beacon.
        let bytes = encode_beacon(&Beacon::new("canopy", &info("aaaa", 7000))).unwrap();
        assert!(decode_beacon(&bytes[..bytes.len() / 2]).is_err());

        // Every prefix and byte flip of a valid beacon is handled without a panic.
        for i in 0..bytes.len() {
            let _ = decode_beacon(&bytes[..i]);
            let mut flipped = bytes.clone();
            flipped[i] ^= 0xff;
            let _ = decode_beacon(&flipped);
        }
    }

    #[test]
    fn own_oversized_beacon_is_refused() {
        let me = info(&"x".repeat(2000), 7000);
        let beacon = Beacon::new("canopy", &me);
        assert!(matches!(
            encode_beacon(&beacon),
            Err(BeaconError::TooLarge { .. })
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
        let err = Discovery::start(
            DiscoveryConfig::new(Ipv4Addr::LOCALHOST),
            info("aaaa", 7000),
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
            Discovery::start(config, info("aaaa", 7000)).await,
            Err(DiscoveryError::InvalidConfig { .. })
        ));
        let mut config = DiscoveryConfig::new(Ipv4Addr::new(192, 0, 2, 2));
        config.group = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 5000);
        assert!(matches!(
            Discovery::start(config, info("aaaa", 7000)).await,
            Err(DiscoveryError::InvalidConfig { .. })
        ));
    }

    #[tokio::test]
    async fn two_nodes_discover_each_other() {
        let Some(interface) = multicast_interface() else {
            eprintln!("skipping: no non-loopback multicast-capable IPv4 interface on this host");
            return;
        };
        let port = random_port();
        let namespace = format!("test-{}", rand::random::<u64>());
        let config = test_config(interface, port, &namespace);
        let (a_info, b_info) = (info("aaaa", 7001), info("bbbb", 7002));
        let mut a = Discovery::start(config.clone(), a_info.clone())
            .await
            .unwrap();
        let mut b = Discovery::start(config, b_info.clone()).await.unwrap();

        // Garbage on the port is ignored and does not stop the receive loop.
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
    }

    #[tokio::test]
    async fn other_namespaces_are_invisible() {
        let Some(interface) = multicast_interface() else {
            eprintln!("skipping: no non-loopback multicast-capable IPv4 interface on this host");
            return;
        };
        let port = random_port();
        let ns1 = format!("test-{}", rand::random::<u64>());
        let ns2 = format!("test-{}", rand::random::<u64>());
        let mut a = Discovery::start(test_config(interface, port, &ns1), info("aaaa", 7001))
            .await
            .unwrap();
        let _a2 = Discovery::start(test_config(interface, port, &ns1), info("cccc", 7003))
            .await
            .unwrap();
        let mut b = Discovery::start(test_config(interface, port, &ns2), info("bbbb", 7002))
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
}
