//! [`FaultHooks`]: host-level fault switches that a host shares with its engine.
//!
//! Chaos tests need a runner whose heartbeat stops while its work carries on (a "frozen but
//! busy" process). The heartbeat belongs to the host (the runner), not to the engine, yet the
//! [`ScriptedEngine`](crate::ScriptedEngine)'s `freeze_after` directive must be able to trigger
//! it. Rather than make the engine depend on the host, the host creates a `FaultHooks`, keeps
//! one clone for its heartbeat thread, and hands another to the engine. Real engines ignore it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shared, cloneable switches for injected host-level faults. All clones see the same state.
#[derive(Debug, Clone, Default)]
pub struct FaultHooks {
    heartbeat_frozen: Arc<AtomicBool>,
}

impl FaultHooks {
    /// Fresh hooks with every fault off.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stops the host's heartbeat for good (the host keeps working otherwise).
    pub fn freeze_heartbeat(&self) {
        if !self.heartbeat_frozen.swap(true, Ordering::SeqCst) {
            tracing::warn!("fault injection: heartbeat frozen");
        }
    }

    /// Whether [`freeze_heartbeat`](Self::freeze_heartbeat) was called on any clone.
    pub fn heartbeat_frozen(&self) -> bool {
        self.heartbeat_frozen.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_freeze_switch() {
        let hooks = FaultHooks::new();
        let engine_side = hooks.clone();
        assert!(!hooks.heartbeat_frozen());
        engine_side.freeze_heartbeat();
        assert!(hooks.heartbeat_frozen());
    }
}
