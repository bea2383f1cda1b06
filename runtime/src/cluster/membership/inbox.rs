//! The node's inbox: the one actor other nodes talk to. It opens sealed envelopes, checks
//! who sent them, and hands beats to the cluster actor and application messages to the
//! domain actors.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc;

use super::{ClusterMsg, Incoming};
use crate::cluster::chunk::Reassembly;
use crate::cluster::seal::Sessions;
use crate::cluster::wire::{Envelope, InboxMsg};

/// The node's inbox: decodes envelopes from peers and hands them on.
pub(super) struct Inbox;

pub(super) struct InboxArgs {
    pub(super) cluster: ActorRef<ClusterMsg>,
    pub(super) incoming: mpsc::UnboundedSender<Incoming>,
    pub(super) sessions: Arc<Sessions>,
    pub(super) refusals: RateLimit,
    /// Chunked messages being put back together.
    pub(super) chunks: Reassembly,
}

/// At most one warning per interval.
pub(super) struct RateLimit {
    pub(super) every: Duration,
    pub(super) last: Option<Instant>,
    pub(super) suppressed: u64,
}

impl RateLimit {
    pub(super) fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// Whether to log now, and how many were not logged since the last time.
    pub(super) fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl Actor for Inbox {
    type Msg = InboxMsg;
    type State = (InboxArgs, crate::introspect::Registration);
    type Arguments = InboxArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<InboxMsg>,
        args: InboxArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok((
            args,
            crate::introspect::register(&myself.get_cell(), "inbox"),
        ))
    }

    async fn handle(
        &self,
        _: ActorRef<InboxMsg>,
        msg: InboxMsg,
        (args, _): &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (bytes, reply) = match msg {
            InboxMsg::Cast(bytes) => (bytes, None),
            InboxMsg::Call(bytes, reply) => (bytes, Some(reply)),
        };
        let body = match args.sessions.open(&bytes) {
            Ok((from, body)) => match Envelope::decode(&body) {
                Ok(envelope) if *envelope.from() == from => Ok(envelope),
                Ok(envelope) => Err(format!(
                    "a message from {} names {} as its sender",
                    from.short(),
                    envelope.from().short()
                )),
                Err(err) => Err(err.to_string()),
            },
            Err(err) => Err(err.to_string()),
        };
        match body {
            Ok(Envelope::Beat(beat)) => {
                let _ = args.cluster.cast(ClusterMsg::Beat(beat));
            }
            Ok(Envelope::App { from, payload }) => {
                let _ = args.incoming.send(Incoming {
                    from,
                    payload,
                    reply,
                });
            }
            Ok(Envelope::Chunk { from, .. }) if reply.is_some() => {
                if let Some(suppressed) = args.refusals.allow() {
                    tracing::warn!(peer = %from.short(), suppressed, "refused a chunk sent as a call (chunks are casts)");
                }
            }
            Ok(Envelope::Chunk {
                from,
                id,
                index,
                total,
                bytes,
            }) => match args
                .chunks
                .add(&from, id, index, total, bytes, Instant::now())
            {
                Ok(Some(payload)) => {
                    let _ = args.incoming.send(Incoming {
                        from,
                        payload,
                        reply: None,
                    });
                }
                Ok(None) => {}
                Err(err) => {
                    if let Some(suppressed) = args.refusals.allow() {
                        tracing::warn!(peer = %from.short(), %err, suppressed, "dropped a chunked message from a peer");
                    }
                }
            },
            Err(err) => {
                if let Some(suppressed) = args.refusals.allow() {
                    tracing::warn!(%err, suppressed, "refused a message from a peer");
                }
            }
        }
        Ok(())
    }
}
