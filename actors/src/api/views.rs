//! What `GET /state` and the actor-tree endpoints serve, as typed views: the router and the
//! cluster layer fill them in, the API serializes them. The JSON shape is part of the API
//! (`canopy state`, the dashboard and scripts read it), so it changes only on purpose.

use canopy_runtime::introspect::ActorReport;
use serde::{Deserialize, Serialize};

/// `GET /state`: a standalone node's instances, or the cluster's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StateView {
    /// A node in a cluster: the cluster as this node sees it.
    Cluster(Box<ClusterState>),
    /// A standalone node: its own instances.
    Local(LocalState),
}

/// One node's own instances and runners.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalState {
    /// Its instances.
    pub instances: Vec<LocalInstanceView>,
}

/// One instance on this node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalInstanceView {
    /// The instance id.
    pub instance: String,
    /// Its model.
    pub model: String,
    /// Its runner's status (`Idle`, `Loading`, `Ready`, ...).
    pub status: String,
    /// The runner's pid.
    pub pid: Option<u32>,
    /// Runner restarts so far.
    pub restarts: u32,
    /// The last runner failure.
    pub last_failure: Option<String>,
}

/// The cluster as one node sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// This node's id.
    pub node: String,
    /// The leader's id, if there is one.
    pub master: Option<String>,
    /// The election term.
    pub term: u64,
    /// Whether this node sees a quorum.
    pub quorum: bool,
    /// The version of the newest plan this node has.
    pub plan_version: Option<u64>,
    /// This node and every live member.
    pub nodes: Vec<NodeView>,
    /// Every instance the plan holds that is not deleted.
    pub instances: Vec<InstanceView>,
    /// This node's own instances.
    pub local: LocalState,
}

/// A live member of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its id.
    pub id: String,
    /// Its cluster address.
    pub cluster_addr: Option<String>,
    /// Its HTTP API address, as it reported it.
    pub api: Option<String>,
    /// Memory it reported free for new instances, in bytes.
    pub mem_available: Option<u64>,
    /// Whether it leads.
    pub master: bool,
    /// Whether it is the node answering.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// An instance of the cluster's plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    /// The instance id.
    pub id: String,
    /// Its model.
    pub model: String,
    /// The node it is assigned to (none while it waits to be placed again).
    pub node: Option<String>,
    /// `active`, or `failed: <reason>`.
    pub state: String,
    /// Its runner's status as its node reports it (`Placing` before the first report).
    pub status: String,
    /// The runner's pid.
    pub pid: Option<u32>,
    /// Runner restarts.
    pub restarts: u32,
    /// The last runner failure.
    pub last_failure: Option<String>,
    /// Placement attempts since it was last Ready.
    pub attempts: u32,
}

/// `GET /v1/cluster/actors`: every node's actor tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterActors {
    /// This node first, then every live member.
    pub nodes: Vec<NodeActors>,
}

/// One node's actor tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeActors {
    /// The node's id.
    pub node: String,
    /// Whether it leads.
    pub master: bool,
    /// Its tree (none when it could not be asked).
    pub tree: Option<ActorReport>,
    /// Why its tree is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
