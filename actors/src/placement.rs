//! What a placement is, on every side of it: the request (`POST /instances` parses into a
//! [`PlaceRequest`]; the leader's planner takes the same type off the wire), what it answers
//! ([`Placed`]), and the one error type ([`PlaceError`]) that the planner, the cluster call
//! and the router return and that the API alone maps to HTTP. It depends on nothing else in
//! the crate, so the API, the node and the cluster layer all use it without importing each
//! other.

use canopy_runtime::cluster::identity::NodeId;
use serde::{Deserialize, Serialize};

/// Longest model name (a catalogue name or a path) a placement request may carry, in bytes.
pub const MAX_MODEL_LEN: usize = 512;
/// Most instances one placement request may ask for.
pub const MAX_INSTANCES_PER_REQUEST: usize = 64;
/// The longest a placement may wait for its instances to be Ready, in seconds.
pub const MAX_WAIT_SECS: u64 = 3600;
/// Longest `request_id` a placement request may carry, in bytes.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// A request to place instances of a model (`POST /instances`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlaceRequest {
    /// The model: a catalogue name or a path every chosen node can read.
    pub model: String,
    /// How many instances.
    pub instances: usize,
    /// A node to place them on (default: the leader chooses by free memory).
    pub node: Option<NodeId>,
    /// How long to wait for them to be Ready, in seconds.
    pub wait_secs: u64,
    /// The client's key for this placement: a request with the key of a placement that
    /// exists (or is under way) answers with that placement's instances instead of placing
    /// more, so a client may retry a placement whose answer it lost (a master that died
    /// between placing and answering) without duplicating it.
    #[serde(default)]
    pub request_id: Option<String>,
}

impl PlaceRequest {
    /// Checks the request's bounds: a model name of at most [`MAX_MODEL_LEN`] bytes without
    /// control characters, 1 to [`MAX_INSTANCES_PER_REQUEST`] instances, and a wait of 1 to
    /// [`MAX_WAIT_SECS`] seconds. The leader checks every request it takes off the wire.
    pub fn validate(&self) -> Result<(), PlaceError> {
        if self.model.is_empty() {
            return Err(PlaceError::Invalid("`model` is empty".into()));
        }
        if self.model.len() > MAX_MODEL_LEN {
            return Err(PlaceError::Invalid(format!(
                "`model` is {} bytes long; the limit is {MAX_MODEL_LEN}",
                self.model.len()
            )));
        }
        if self.model.chars().any(char::is_control) {
            return Err(PlaceError::Invalid(
                "`model` contains control characters".into(),
            ));
        }
        if self.instances == 0 || self.instances > MAX_INSTANCES_PER_REQUEST {
            return Err(PlaceError::Invalid(format!(
                "`instances` must be 1 to {MAX_INSTANCES_PER_REQUEST}, not {}",
                self.instances
            )));
        }
        if let Some(key) = &self.request_id
            && (key.is_empty()
                || key.len() > MAX_REQUEST_ID_LEN
                || !key.chars().all(|c| c.is_ascii_graphic()))
        {
            return Err(PlaceError::Invalid(format!(
                "`request_id` must be 1 to {MAX_REQUEST_ID_LEN} printable ASCII characters without spaces"
            )));
        }
        if self.wait_secs == 0 || self.wait_secs > MAX_WAIT_SECS {
            return Err(PlaceError::Invalid(format!(
                "`wait` must be 1 to {MAX_WAIT_SECS} seconds, not {}",
                self.wait_secs
            )));
        }
        Ok(())
    }
}

/// One placed instance, as `POST /instances` answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placed {
    /// The instance id.
    pub id: String,
    /// The node it runs on.
    pub node: NodeId,
}

/// Why a placement or deletion failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum PlaceError {
    /// No node has the memory the model needs.
    #[error(
        "no node has enough free memory for {model}: it needs {needed} bytes, the most any node has is {best} bytes"
    )]
    NoRoom {
        /// The model.
        model: String,
        /// Bytes needed.
        needed: u64,
        /// The most any node offered.
        best: u64,
    },
    /// The requested node is not a live member.
    #[error("node {0} is not a live member of the cluster")]
    UnknownNode(String),
    /// A node could not start or load the instance.
    #[error("placing {instance} failed: {reason}")]
    Failed {
        /// The instance.
        instance: String,
        /// The node.
        node: String,
        /// Why.
        reason: String,
    },
    /// The instances did not become Ready in time (they were removed again).
    #[error("the instances did not become ready within {0} s (they were removed)")]
    Timeout(u64),
    /// No such instance.
    #[error("no instance {0}")]
    NoSuchInstance(String),
    /// The cluster has no leader now (no quorum, or an election is under way).
    #[error(
        "the cluster has no leader right now (an election is under way, or fewer nodes than --expect are connected); try again"
    )]
    NoLeader,
    /// This node runs standalone: placing needs the cluster.
    #[error(
        "this node runs standalone (--standalone): placing and deleting instances needs the cluster; start it without --standalone, or use --model at start"
    )]
    Standalone,
    /// The node's backend cannot place instances at all.
    #[error("this backend cannot place instances")]
    Unsupported,
    /// A bad request.
    #[error("{0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(model: &str, instances: usize) -> PlaceRequest {
        PlaceRequest {
            model: model.to_string(),
            instances,
            node: None,
            wait_secs: 1,
            request_id: None,
        }
    }

    #[test]
    fn placement_requests_are_bounded() {
        assert_eq!(request("qwen2.5-0.5b", 1).validate(), Ok(()));
        assert_eq!(
            request(&"m".repeat(MAX_MODEL_LEN), MAX_INSTANCES_PER_REQUEST).validate(),
            Ok(())
        );
        for bad in [
            request(&"m".repeat(1 << 20), 1),
            request(&"m".repeat(MAX_MODEL_LEN + 1), 1),
            request("", 1),
            request("a\nb", 1),
            request("m", 0),
            request("m", MAX_INSTANCES_PER_REQUEST + 1),
            PlaceRequest {
                wait_secs: u64::MAX,
                ..request("m", 1)
            },
            PlaceRequest {
                wait_secs: 0,
                ..request("m", 1)
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(PlaceError::Invalid(_))),
                "{:?} passed",
                &bad.model[..bad.model.len().min(8)]
            );
        }
    }
}
