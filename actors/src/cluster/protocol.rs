//! The application messages nodes exchange over the cluster (MessagePack inside
//! `canopy_runtime::cluster` envelopes), and the replicated cluster state they carry.
//!
//! Every node reports its instances to the leader ([`NodeReport`]); the leader answers with
//! the [`Plan`]: where every instance should run, its state, and the statuses the reports
//! told. Every node keeps the newest plan it has seen, which is what lets any node route a
//! request to any Ready instance, serve `GET /state`, and — if it becomes leader — pick up
//! where the old leader stopped without killing anything.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use canopy_proto::{GenerateRequest, RunnerStatus};
use canopy_runtime::cluster::identity::NodeId;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::SubmitError;
use crate::events::Event;
pub use crate::placement::{
    MAX_INSTANCES_PER_REQUEST, MAX_MODEL_LEN, PlaceError, PlaceRequest, Placed,
};
use crate::runner::TaskEvent;

/// One instance as the node running it reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceReport {
    /// The instance id (unique in the cluster).
    pub id: String,
    /// The model it serves.
    pub model: String,
    /// What it loads (a path or a catalogue name), so that it can run elsewhere too.
    pub source: String,
    /// Its runner's status.
    pub status: RunnerStatus,
    /// The runner's pid.
    pub pid: Option<u32>,
    /// Runner restarts so far.
    pub restarts: u32,
    /// The last runner failure.
    pub last_failure: Option<String>,
    /// Why the instance cannot run on this node (its model cannot be resolved or loaded
    /// here); the leader places it elsewhere or fails the placement.
    pub error: Option<String>,
}

/// Most instances one node may be assigned.
pub const MAX_INSTANCES_PER_NODE: usize = 64;
/// Most live (not deleted) instances the plan may hold.
pub const MAX_PLAN_INSTANCES: usize = 1024;
/// Largest encoded plan the leader publishes, in bytes: well under `ractor_cluster`'s 16 MiB
/// frame, so that no placement can make the plan undeliverable (and partition the cluster).
pub const MAX_PLAN_BYTES: usize = 4 * 1024 * 1024;
/// Most instances one node's report may list; a larger report is dropped.
pub const MAX_REPORTED_INSTANCES: usize = 256;
/// Longest instance id, model or source a report may carry, in bytes; a report with a longer
/// one is dropped (ids are a model name plus a short suffix, so twice [`MAX_MODEL_LEN`]).
pub const MAX_REPORTED_NAME_LEN: usize = 2 * MAX_MODEL_LEN;
/// Longest failure text (`last_failure`, `error`) kept from a report, in bytes; longer ones
/// are cut (a runner's stderr tail can be long, and a report must stay small).
pub const MAX_REPORTED_TEXT_LEN: usize = 4096;

/// What a node tells the leader about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    /// The node.
    pub node: NodeId,
    /// Its HTTP API address.
    pub api: Option<SocketAddr>,
    /// Memory it can still give to new instances, in bytes.
    pub mem_available: u64,
    /// Its instances (those placed by a plan and those it started itself).
    pub instances: Vec<InstanceReport>,
}

impl NodeReport {
    /// The report with its failure texts cut to [`MAX_REPORTED_TEXT_LEN`], or why it is
    /// refused: more than [`MAX_REPORTED_INSTANCES`] instances, or an id, model or source
    /// longer than [`MAX_REPORTED_NAME_LEN`]. The leader copies reports into the plan, so an
    /// unbounded one could make the plan too large to deliver.
    pub fn bounded(mut self) -> Result<NodeReport, OversizedReport> {
        if self.instances.len() > MAX_REPORTED_INSTANCES {
            return Err(OversizedReport(format!(
                "it lists {} instances; a node may run at most {MAX_REPORTED_INSTANCES}",
                self.instances.len()
            )));
        }
        for i in &mut self.instances {
            let longest = i.id.len().max(i.model.len()).max(i.source.len());
            if longest > MAX_REPORTED_NAME_LEN {
                return Err(OversizedReport(format!(
                    "an instance's id, model or source is {longest} bytes long; the limit is \
                     {MAX_REPORTED_NAME_LEN}"
                )));
            }
            for text in [&mut i.last_failure, &mut i.error].into_iter().flatten() {
                cut(text, MAX_REPORTED_TEXT_LEN);
            }
        }
        Ok(self)
    }
}

/// Why the leader refused a node's report: it is larger than a report may be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OversizedReport(pub String);

/// Cuts `text` to at most `max` bytes, at a character boundary.
fn cut(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// The lifecycle of a planned instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlanState {
    /// It should run on its node.
    Active,
    /// It was deleted; any node still running it stops it.
    Deleted,
    /// Placement gave up (retry budget spent, or a client's placement failed).
    Failed {
        /// Why.
        reason: String,
    },
}

/// Where one instance should run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedInstance {
    /// The model id clients use.
    pub model: String,
    /// What a node resolves to run it (the placement request's model: a catalogue name or
    /// a path).
    pub source: String,
    /// The node it is assigned to (None while waiting to be placed again).
    pub node: Option<NodeId>,
    /// Its lifecycle state.
    pub state: PlanState,
    /// Placement attempts since it last became Ready.
    pub attempts: u32,
    /// The `request_id` of the placement that made it, if the client gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

/// A node as the plan lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanNode {
    /// Its HTTP API address.
    pub api: Option<SocketAddr>,
    /// Memory it reported free for new instances.
    pub mem_available: u64,
}

/// The cluster state the leader publishes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The leader's term.
    pub term: u64,
    /// Bumped by the leader on every change within its term.
    pub version: u64,
    /// The leader.
    pub leader: NodeId,
    /// Every instance, by id.
    pub instances: BTreeMap<String, PlannedInstance>,
    /// The latest report of each live node's instances.
    pub reports: BTreeMap<NodeId, Vec<InstanceReport>>,
    /// The live nodes.
    pub nodes: BTreeMap<NodeId, PlanNode>,
}

impl Plan {
    /// An empty plan.
    pub fn empty(leader: NodeId) -> Self {
        Self {
            term: 0,
            version: 0,
            leader,
            instances: BTreeMap::new(),
            reports: BTreeMap::new(),
            nodes: BTreeMap::new(),
        }
    }

    /// Whether `self` is newer than `other`.
    pub fn newer_than(&self, other: &Plan) -> bool {
        (self.term, self.version) > (other.term, other.version)
    }

    /// The reported state of instance `id` on the node it is assigned to.
    pub fn status_of(&self, id: &str) -> Option<(&NodeId, &InstanceReport)> {
        let node = self.instances.get(id)?.node.as_ref()?;
        let report = self.reports.get(node)?.iter().find(|r| r.id == id)?;
        Some((node, report))
    }
}

/// Everything a node sends another over the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AppMsg {
    /// Worker to leader: this node's instances and memory.
    Report(NodeReport),
    /// Leader to everyone: the plan.
    Plan(Box<Plan>),
    /// Any node to the leader (call; answer [`PlaceAnswer`]).
    Place(PlaceRequest),
    /// Any node to the leader (call; answer [`DeleteAnswer`]).
    Delete {
        /// The instance.
        instance: String,
    },
    /// Origin to the node hosting an instance of `model` (call; answer [`SubmitAnswer`]):
    /// run a task there and stream its events back as [`AppMsg::Event`].
    Submit {
        /// The origin's key for the stream.
        key: u64,
        /// The model.
        model: String,
        /// The request.
        request: GenerateRequest,
    },
    /// Host to origin: an event of stream `key`.
    Event {
        /// The stream.
        key: u64,
        /// The event.
        event: TaskEvent,
    },
    /// Origin to host: the client went away; cancel stream `key`.
    Cancel {
        /// The stream.
        key: u64,
    },
    /// Any node to any node (call; answer: the actor tree as JSON text).
    Actors,
    /// Any node to every member: events of its own as they happen, and the answer to
    /// [`AppMsg::EventsSince`] (at most [`crate::events::MAX_EVENTS_PER_MESSAGE`] events).
    Events {
        /// The events, oldest first.
        events: Vec<Event>,
    },
    /// Any node to a peer: send me your own events after sequence number `after` of your
    /// incarnation `incarnation` (all you hold, for another or no incarnation).
    EventsSince {
        /// The peer's incarnation the asking node knows of.
        incarnation: Option<u64>,
        /// The last of that incarnation's sequence numbers the asking node holds.
        after: u64,
    },
    /// Host to origin: stream `key`'s task is still running here, though it has had nothing
    /// to forward for a while (a long prefill, a queue); it keeps the origin's deadline for
    /// the stream from running out (see `cluster::shared`).
    Progress {
        /// The stream.
        key: u64,
    },
}

/// The answer to [`AppMsg::Place`].
pub type PlaceAnswer = Result<Vec<Placed>, PlaceError>;
/// The answer to [`AppMsg::Delete`].
pub type DeleteAnswer = Result<(), PlaceError>;
/// The answer to [`AppMsg::Submit`].
pub type SubmitAnswer = Result<(), SubmitError>;

/// Why a message or an answer could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The value does not encode (a bug, never a peer's doing).
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// The type.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The bytes are not the expected message (a bad or hostile peer, or another version).
    #[error("undecodable {what}: {reason}")]
    Decode {
        /// The type expected.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// Encodes a message or an answer.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, ProtocolError> {
    rmp_serde::to_vec_named(value).map_err(|e| ProtocolError::Encode {
        what: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

/// Decodes a message or an answer; garbage is an error naming what was expected.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ProtocolError> {
    rmp_serde::from_slice(bytes).map_err(|e| ProtocolError::Decode {
        what: std::any::type_name::<T>(),
        reason: e.to_string(),
    })
}

/// Answers a call with `answer`. An answer that does not encode is logged and not sent, so
/// the caller's call fails (and it reports that) rather than reading an empty answer.
/// `false` when nothing was sent (or the caller is gone).
pub fn reply<T: Serialize>(port: ractor::RpcReplyPort<Vec<u8>>, answer: &T) -> bool {
    match encode(answer) {
        Ok(bytes) => port.send(bytes).is_ok(),
        Err(err) => {
            tracing::error!(%err, "cannot answer a call");
            false
        }
    }
}

/// The memory one instance of a model is assumed to need: its file plus a quarter (KV cache
/// and activations) plus 64 MiB for the runner process; 64 MiB when the size is unknown.
pub fn need_bytes(file_size: Option<u64>) -> u64 {
    const BASE: u64 = 64 * 1024 * 1024;
    file_size.map_or(BASE, |s| s + s / 4 + BASE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(instances: Vec<InstanceReport>) -> NodeReport {
        NodeReport {
            node: NodeId::random(),
            api: None,
            mem_available: 0,
            instances,
        }
    }

    fn instance(id: &str, failure: &str) -> InstanceReport {
        InstanceReport {
            id: id.to_string(),
            model: "m".to_string(),
            source: "m".to_string(),
            status: RunnerStatus::Ready,
            pid: None,
            restarts: 0,
            last_failure: Some(failure.to_string()),
            error: None,
        }
    }

    #[test]
    fn reports_are_bounded() {
        let ok = report(vec![instance("m-0", &"é".repeat(5000))])
            .bounded()
            .expect("a long failure is cut, not refused");
        let failure = ok.instances[0].last_failure.as_deref().unwrap_or_default();
        assert!(failure.len() <= MAX_REPORTED_TEXT_LEN && failure.len() > 4000);
        assert!(
            report(vec![instance(&"x".repeat(MAX_REPORTED_NAME_LEN + 1), "")])
                .bounded()
                .is_err()
        );
        assert!(
            report(vec![instance("m-0", ""); MAX_REPORTED_INSTANCES + 1])
                .bounded()
                .is_err()
        );
    }

    #[test]
    fn a_plan_at_the_instance_limit_fits_in_its_frame_budget() {
        // The worst plan the limits allow: every instance with the longest model name.
        let leader: NodeId = "0123456789abcdef0123456789abcdef".parse().expect("id");
        let mut plan = Plan::empty(leader.clone());
        for n in 0..MAX_PLAN_INSTANCES {
            plan.instances.insert(
                format!("{}-{n:06x}", "m".repeat(MAX_MODEL_LEN)),
                PlannedInstance {
                    model: "m".repeat(MAX_MODEL_LEN),
                    source: "m".repeat(MAX_MODEL_LEN),
                    node: Some(leader.clone()),
                    state: PlanState::Active,
                    attempts: 0,
                    request: None,
                },
            );
        }
        let size = encode(&AppMsg::Plan(Box::new(plan)))
            .expect("encodes")
            .len();
        assert!(size < MAX_PLAN_BYTES, "{size} bytes");
    }
}
