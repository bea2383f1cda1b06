//! Cluster membership on `ractor_cluster`: node identity and cookie, discovery, one
//! `PeerMonitor` per peer with an application-level heartbeat, and the election.
//!
//! - [`identity`]: the node's data dir, persistent node id and cluster cookie.
//! - [`discovery`]: UDP multicast beacons, so nodes on one LAN find each other.
//! - [`membership`]: the `ClusterActor` (the `NodeServer`, dialing, sessions, the view).
//! - [`peer`]: `PeerMonitor`, one per connected peer, with heartbeats.
//! - [`election`]: which node leads, fenced by a term that only grows.
//! - [`wire`]: what crosses between nodes.
//! - [`chunk`]: large messages cut into chunks, so that no frame holds the beats up.
//! - [`seal`]: every message sealed under its session's key, so its sender is authenticated.
//! - [`tls`]: optional mutual TLS around every session (`--tls-cert/--tls-key/--tls-ca`).

pub mod chunk;
pub mod discovery;
pub mod election;
pub mod identity;
pub mod membership;
pub mod peer;
pub mod seal;
pub mod tls;
pub mod wire;

pub use identity::NodeId;
pub use membership::{
    ClusterActor, ClusterArgs, ClusterConfig, ClusterError, ClusterHandle, ClusterMsg, ClusterView,
    DialFailure, Incoming, Member, MembershipEvent, cluster_channels, now_ms,
};
