//! The placement events a new plan makes: what changed for each instance between the plan a
//! master published last and the one it publishes now.

use super::protocol::{Plan, PlanState};
use crate::events::EventBody;

/// The events from `old` (`None`: no plan before) to `new`, in instance-id order.
pub fn placement_events(old: Option<&Plan>, new: &Plan) -> Vec<EventBody> {
    let mut events = Vec::new();
    for (id, now) in &new.instances {
        let before = old.and_then(|p| p.instances.get(id));
        let node = now.node.as_ref().map(|n| n.to_string());
        let instance = id.clone();
        let model = now.model.clone();
        match (before, &now.state) {
            (Some(b), state) if b.state == *state && b.node == now.node => {}
            (_, PlanState::Failed { reason }) => {
                if !matches!(before.map(|b| &b.state), Some(PlanState::Failed { .. })) {
                    events.push(EventBody::PlacementFailed {
                        instance,
                        model,
                        reason: reason.clone(),
                    });
                }
            }
            (None, PlanState::Deleted) => {}
            (Some(b), PlanState::Deleted) => {
                if b.state != PlanState::Deleted {
                    events.push(EventBody::InstanceRemoved { instance, model });
                }
            }
            (None, PlanState::Active) => events.push(EventBody::InstancePlaced {
                instance,
                model,
                node,
            }),
            (Some(b), PlanState::Active) => {
                if b.node != now.node {
                    events.push(EventBody::InstanceMoved {
                        instance,
                        model,
                        from: b.node.as_ref().map(|n| n.to_string()),
                        to: node,
                    });
                } else {
                    // Active again after a failure (a failed placement retried).
                    events.push(EventBody::InstancePlaced {
                        instance,
                        model,
                        node,
                    });
                }
            }
        }
    }
    events
}

#[cfg(test)]
mod tests {
    use canopy_runtime::cluster::NodeId;

    use super::*;
    use crate::cluster::protocol::PlannedInstance;

    fn planned(node: Option<&NodeId>, state: PlanState) -> PlannedInstance {
        PlannedInstance {
            model: "m".into(),
            source: "m".into(),
            node: node.cloned(),
            state,
            attempts: 0,
            request: None,
        }
    }

    #[test]
    fn each_change_of_an_instance_is_one_event_and_a_republished_plan_none() {
        let (a, b) = (NodeId::random(), NodeId::random());
        let mut old = Plan::empty(a.clone());
        old.instances
            .insert("moved".into(), planned(Some(&a), PlanState::Active));
        old.instances
            .insert("kept".into(), planned(Some(&a), PlanState::Active));
        old.instances
            .insert("deleted".into(), planned(Some(&a), PlanState::Active));
        old.instances
            .insert("failed".into(), planned(None, PlanState::Active));
        let mut new = old.clone();
        new.instances
            .insert("new".into(), planned(Some(&b), PlanState::Active));
        new.instances.get_mut("moved").unwrap().node = Some(b.clone());
        new.instances.get_mut("deleted").unwrap().state = PlanState::Deleted;
        new.instances.get_mut("failed").unwrap().state = PlanState::Failed {
            reason: "no node has room".into(),
        };
        let kinds: Vec<(String, &str)> = placement_events(Some(&old), &new)
            .iter()
            .map(|e| (e.message(), e.kind()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("removed deleted (m)".to_string(), "instance_removed"),
                (
                    "gave failed up: no node has room".to_string(),
                    "placement_failed"
                ),
                (
                    format!("moved moved from node {} to {}", a.short(), b.short()),
                    "instance_moved"
                ),
                (
                    format!("placed new (m) on node {}", b.short()),
                    "instance_placed"
                ),
            ]
        );
        assert!(placement_events(Some(&new), &new).is_empty());
        assert_eq!(placement_events(None, &old).len(), 4);
    }
}
