//! Introspection: what every live actor of this process says about itself.
//!
//! Each actor that wants to be seen registers itself with [`register`] when it starts,
//! naming its *kind* (`node`, `supervisor`, `runner-supervisor`, `process`, ...) and,
//! optionally, a [`Details`] function that reports live facts as JSON (a runner's pid, its
//! heartbeat age, its current task). The returned [`Registration`] removes the entry when it
//! is dropped, so an actor that dies, however it dies, disappears with its state.
//! Supervisors [`annotate`] the children they start with the child's id and restart count.
//!
//! [`tree`] walks ractor's real supervision links down from a root actor and joins them with
//! the registrations, so the tree shown by `canopy inspect` is exactly what runs: nothing is
//! hard-coded. Remote actors (another node's actors, as seen through a cluster session) are
//! left out: they show in their own node's tree. An actor that did not register still
//! appears, with kind `actor`. Mailbox depth
//! is not reported: ractor does not expose the length of an actor's message queue.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use ractor::{ActorCell, ActorId};
use serde::{Deserialize, Serialize};

/// A function that reports an actor's live details as JSON.
pub type Details = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

struct Entry {
    kind: String,
    started_at: Instant,
    child_id: Option<String>,
    restarts: u32,
    details: Option<Details>,
}

fn registry() -> &'static Mutex<HashMap<ActorId, Entry>> {
    static REGISTRY: OnceLock<Mutex<HashMap<ActorId, Entry>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

fn with_registry<T>(f: impl FnOnce(&mut HashMap<ActorId, Entry>) -> T) -> T {
    let mut guard = match registry().lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    };
    f(&mut guard)
}

/// Keeps an actor registered; dropping it (with the actor's state) deregisters the actor.
#[derive(Debug)]
pub struct Registration {
    id: ActorId,
}

impl Registration {
    /// Sets or replaces the live-details function.
    pub fn set_details(&self, details: Details) {
        with_registry(|r| {
            if let Some(e) = r.get_mut(&self.id) {
                e.details = Some(details);
            }
        });
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        with_registry(|r| r.remove(&self.id));
    }
}

/// Registers `cell` as an actor of `kind`. Keep the returned guard in the actor's state.
pub fn register(cell: &ActorCell, kind: impl Into<String>) -> Registration {
    let id = cell.get_id();
    with_registry(|r| {
        let entry = r.entry(id).or_insert_with(|| Entry {
            kind: String::new(),
            started_at: Instant::now(),
            child_id: None,
            restarts: 0,
            details: None,
        });
        entry.kind = kind.into();
    });
    Registration { id }
}

/// Records, for a child its supervisor just started, its id within the supervisor and how
/// many times it has been restarted. Only registered actors keep annotations (an actor
/// registers in `pre_start`, which has run by the time its supervisor annotates it), so
/// nothing is left behind for actors that never deregister.
pub fn annotate(cell: &ActorCell, child_id: &str, restarts: u32) {
    with_registry(|r| {
        if let Some(entry) = r.get_mut(&cell.get_id()) {
            entry.child_id = Some(child_id.to_string());
            entry.restarts = restarts;
        }
    });
}

/// One actor in the tree, as `canopy inspect` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorReport {
    /// ractor's actor id (`node.local-id`).
    pub id: String,
    /// The actor's registered name, if any.
    pub name: Option<String>,
    /// Its id within its supervisor, if a supervisor started it.
    pub child_id: Option<String>,
    /// What kind of actor it is (`actor` when it did not register).
    pub kind: String,
    /// ractor's status (`Running`, `Stopping`, ...).
    pub status: String,
    /// Milliseconds since it registered.
    pub uptime_ms: Option<u64>,
    /// Times its supervisor restarted it.
    pub restarts: u32,
    /// Live details reported by the actor itself.
    pub details: serde_json::Value,
    /// Its linked children.
    pub children: Vec<ActorReport>,
}

/// The live tree below (and including) `root`.
pub fn tree(root: &ActorCell) -> ActorReport {
    let cell_report = |cell: &ActorCell| {
        // Details functions run outside the registry lock: they may take other locks.
        let (kind, uptime_ms, child_id, restarts, details) =
            with_registry(|r| match r.get(&cell.get_id()) {
                Some(e) => (
                    e.kind.clone(),
                    Some(e.started_at.elapsed().as_millis() as u64),
                    e.child_id.clone(),
                    e.restarts,
                    e.details.clone(),
                ),
                None => ("actor".to_string(), None, None, 0, None),
            });
        ActorReport {
            id: cell.get_id().to_string(),
            name: cell.get_name(),
            child_id,
            kind,
            status: format!("{:?}", cell.get_status()),
            uptime_ms,
            restarts,
            details: details.map_or(serde_json::Value::Null, |f| f()),
            // Remote actors (stand-ins for another node's actors, children of a cluster
            // session) belong to that node's tree, not this one's.
            children: cell
                .get_children()
                .iter()
                .filter(|c| c.get_id().is_local())
                .map(tree)
                .collect(),
        }
    };
    cell_report(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ractor::{Actor, ActorProcessingErr, ActorRef};

    struct Leaf;

    impl Actor for Leaf {
        type Msg = ();
        type State = Registration;
        type Arguments = ();

        async fn pre_start(
            &self,
            myself: ActorRef<()>,
            _: (),
        ) -> Result<Registration, ActorProcessingErr> {
            let reg = register(&myself.get_cell(), "leaf");
            reg.set_details(Arc::new(|| serde_json::json!({ "answer": 42 })));
            Ok(reg)
        }
    }

    struct Root;

    impl Actor for Root {
        type Msg = ();
        type State = Registration;
        type Arguments = ();

        async fn pre_start(
            &self,
            myself: ActorRef<()>,
            _: (),
        ) -> Result<Registration, ActorProcessingErr> {
            let reg = register(&myself.get_cell(), "root");
            let (leaf, _) = Actor::spawn_linked(None, Leaf, (), myself.get_cell()).await?;
            annotate(&leaf.get_cell(), "leaf-1", 2);
            Ok(reg)
        }
    }

    #[tokio::test]
    async fn tree_follows_links_and_registrations() {
        let (root, handle) = Actor::spawn(Some("introspect-root".into()), Root, ())
            .await
            .expect("root starts");
        let report = tree(&root.get_cell());
        assert_eq!(report.kind, "root");
        assert_eq!(report.name.as_deref(), Some("introspect-root"));
        assert_eq!(report.children.len(), 1);
        let leaf = &report.children[0];
        assert_eq!(leaf.kind, "leaf");
        assert_eq!(leaf.child_id.as_deref(), Some("leaf-1"));
        assert_eq!(leaf.restarts, 2);
        assert_eq!(leaf.details["answer"], 42);
        let leaf_id = root.get_cell().get_children()[0].get_id();
        root.stop(None);
        let _ = handle.await;
        assert!(
            with_registry(|r| !r.contains_key(&leaf_id)),
            "dead actors deregister"
        );
    }
}
