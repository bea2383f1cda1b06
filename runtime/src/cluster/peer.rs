//! `PeerMonitor`: one actor per connected peer, with an application-level heartbeat.
//!
//! `ractor_cluster` has no heartbeat timeout: a frozen peer (SIGSTOP, a cut link without a
//! FIN) stays "connected" forever. The monitor sends this node's [`Beat`] to the peer's inbox
//! every `interval` and expects the peer's beats back. When none has arrived for `timeout`,
//! it stops the peer's `NodeSession` — which kills every remote actor of that peer in this
//! process and drops the peer from the process groups — and then fails itself with
//! [`PeerDown`], so its parent (the `ClusterActor`) gets an ordinary death signal and
//! reconnects later.
//!
//! Beats are sent from the monitor's own timer; nothing waits on a reply, so a slow peer never
//! slows the monitor. A beat that arrives is stamped on arrival in the monitor's mailbox.

use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use ractor_cluster::RactorMessage;
use ractor_cluster::node::NodeSessionMessage;
use tokio::sync::watch;

use super::identity::NodeId;
use super::seal::Sessions;
use super::wire::{Beat, Envelope, InboxMsg};

/// Heartbeat settings between peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerHeartbeat {
    /// How often a beat is sent to each peer.
    pub interval: Duration,
    /// A peer silent for this long is declared dead.
    pub timeout: Duration,
}

impl Default for PeerHeartbeat {
    /// 200 ms beats, dead after 1.5 s of silence: well under the 5 s target, and seven
    /// missed beats in a row before a false positive on a loaded machine.
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(200),
            timeout: Duration::from_millis(1500),
        }
    }
}

/// Why a peer monitor ended: its peer went silent.
#[derive(Debug, Clone, thiserror::Error)]
#[error("peer {peer} sent no heartbeat for {silent_ms} ms")]
pub struct PeerDown {
    /// The peer.
    pub peer: NodeId,
    /// How long it had been silent.
    pub silent_ms: u64,
}

/// Messages of a [`PeerMonitor`].
#[derive(RactorMessage)]
pub enum PeerMsg {
    /// A beat from the peer arrived.
    Beat(Beat),
    /// Time to send a beat and check the peer's.
    Tick,
}

/// What a monitor is started with.
pub struct PeerArgs {
    /// The peer.
    pub peer: NodeId,
    /// The peer's session (stopped when the peer goes silent).
    pub session: ActorRef<NodeSessionMessage>,
    /// Heartbeat settings.
    pub heartbeat: PeerHeartbeat,
    /// The beat this node sends now (the cluster actor keeps it current).
    pub beat: watch::Receiver<Beat>,
    /// The session keys (beats are sealed like every message).
    pub sessions: std::sync::Arc<Sessions>,
}

/// The monitor's state.
pub struct PeerState {
    args: PeerArgs,
    seq: u64,
    last_beat: Instant,
    beats: u64,
    /// When the last beat came (unix ms), for introspection.
    heard: std::sync::Arc<std::sync::atomic::AtomicU64>,
    _registration: crate::introspect::Registration,
}

/// The actor (see the module docs).
pub struct PeerMonitor;

impl Actor for PeerMonitor {
    type Msg = PeerMsg;
    type State = PeerState;
    type Arguments = PeerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PeerMsg>,
        args: PeerArgs,
    ) -> Result<PeerState, ActorProcessingErr> {
        let registration = crate::introspect::register(&myself.get_cell(), "peer-monitor");
        let peer = args.peer.to_string();
        let heard = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            super::membership::now_ms(),
        ));
        let last = heard.clone();
        registration.set_details(std::sync::Arc::new(move || {
            let age = super::membership::now_ms()
                .saturating_sub(last.load(std::sync::atomic::Ordering::Relaxed));
            serde_json::json!({ "peer": peer, "heartbeat_age_ms": age })
        }));
        myself.send_interval(args.heartbeat.interval, || PeerMsg::Tick);
        Ok(PeerState {
            args,
            seq: 0,
            // The peer gets a full timeout from the start to send its first beat.
            last_beat: Instant::now(),
            beats: 0,
            heard,
            _registration: registration,
        })
    }

    async fn handle(
        &self,
        _: ActorRef<PeerMsg>,
        msg: PeerMsg,
        state: &mut PeerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PeerMsg::Beat(_) => {
                state.last_beat = Instant::now();
                state.beats += 1;
                state.heard.store(
                    super::membership::now_ms(),
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            PeerMsg::Tick => {
                let silent = state.last_beat.elapsed();
                if silent >= state.args.heartbeat.timeout {
                    let down = PeerDown {
                        peer: state.args.peer.clone(),
                        silent_ms: silent.as_millis() as u64,
                    };
                    tracing::warn!(peer = %state.args.peer.short(), silent_ms = down.silent_ms,
                        "peer missed its heartbeats: dropping its session");
                    state.args.session.stop(Some("heartbeat missed".into()));
                    return Err(down.into());
                }
                let peer = &state.args.peer;
                if let Some(inbox) = super::membership::peer_inbox(&state.args.sessions, peer) {
                    state.seq += 1;
                    let mut beat = state.args.beat.borrow().clone();
                    beat.seq = state.seq;
                    let sealed = Envelope::Beat(beat)
                        .encode()
                        .map_err(|e| e.to_string())
                        .and_then(|body| {
                            state
                                .args
                                .sessions
                                .seal(peer, body)
                                .map_err(|e| e.to_string())
                        });
                    match sealed {
                        Ok(bytes) => {
                            let _ = inbox.cast(InboxMsg::Cast(bytes));
                        }
                        Err(err) => {
                            tracing::warn!(peer = %peer.short(), %err, "cannot send a beat")
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
