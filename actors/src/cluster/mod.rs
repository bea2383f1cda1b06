//! The cluster layer of a node: what turns several nodes into one Canopy cluster.
//!
//! ```text
//! node
//! ├── worker ...
//! ├── cluster        (canopy_runtime::cluster::ClusterActor: NodeServer, discovery, election)
//! │   ├── peer-monitor (one per connected peer)
//! │   └── inbox      (the node's one cluster-visible actor)
//! ├── cluster-agent  (ClusterAgent: reports, plans, remote tasks)
//! │   └── master     (MasterActor, only on the elected node)
//! └── api
//! ```
//!
//! Membership, heartbeats and the election are generic and live in `canopy_runtime`; this
//! module adds what is about models: the replicated [`protocol::Plan`], placement and
//! re-placement ([`master`]), reconciliation and remote tasks ([`agent`]), and routing a
//! request to a Ready instance on any node ([`shared::ClusterRoutes`]).

pub mod agent;
pub mod master;
pub mod plan_events;
pub mod planner;
pub mod protocol;
pub mod shared;

use std::sync::Arc;

use canopy_proto::LoadSpec;
use canopy_runtime::cluster::ClusterConfig;

pub use agent::{AgentArgs, AgentMsg, ClusterAgent};
pub use master::{MasterActor, MasterMsg};
pub use shared::{ClusterRoutes, Shared};

/// Turns the model names of placement requests into what a runner loads on this node. The
/// binary implements it with the model store (download on first use, sha256 verified).
pub trait ModelResolver: Send + Sync + 'static {
    /// What a runner loads for `model` on this node; may download, so it is called on a
    /// blocking thread. `Err` says why the model cannot run here.
    fn resolve(&self, model: &str) -> Result<LoadSpec, ResolveError>;

    /// The size of the model's file in bytes, if known without downloading it.
    fn size_hint(&self, model: &str) -> Option<u64>;

    /// The id clients use for `model` (a catalogue alias becomes the catalogue name, a path
    /// its file stem).
    fn model_id(&self, model: &str) -> String;
}

/// Why a model cannot run on this node; the text travels in the node's report to the leader,
/// which places the instance elsewhere or fails the placement with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The name is not a catalogue model, nor a file this node may load.
    #[error("{0}")]
    Unknown(String),
    /// A catalogue model that could not be fetched or verified here.
    #[error("cannot fetch {model}: {reason}")]
    Fetch {
        /// The catalogue name.
        model: String,
        /// Why.
        reason: String,
    },
    /// Resolving failed in another way (the resolver itself panicked, say).
    #[error("{0}")]
    Other(String),
}

/// How a node joins a cluster (see `NodeBuilder::cluster`).
#[derive(Clone)]
pub struct ClusterSetup {
    /// Membership settings.
    pub config: ClusterConfig,
    /// Model names to files.
    pub resolver: Arc<dyn ModelResolver>,
    /// Memory this node offers to instances, if capped (`--memory`).
    pub memory_limit: Option<u64>,
}
