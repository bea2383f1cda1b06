//! The bookkeeping of cross-node streams at both ends, free of the cluster transport so
//! that it can be tested alone.
//!
//! A request that arrives at one node (the *origin*) and runs on an instance on another (the
//! *host*) travels as follows: the origin opens a stream under a random key ([`Streams`]) and
//! calls the host with `Submit`; the host registers the task under `(origin, key)`
//! ([`Served`]) before it starts it, answers, and [`forward`]s the task's events to the origin
//! as `Event`s, with a `Progress` whenever it had nothing to forward for a while.
//!
//! Every stream ends, whatever fails:
//! - a task that fails on the host is an `Event` with `Failed`, as it would be locally;
//! - a host that cannot send an event to the origin stops: it cancels the task (dropping its
//!   handle), tries once to tell the origin ([`RunnerError::StreamLost`]), and the origin's
//!   deadline covers the case where that does not arrive either;
//! - the origin ends a stream it has heard nothing about for its deadline
//!   ([`Streams::expire`]), and a stream whose host left the cluster ([`Streams::lose_hosts`]);
//! - a `Cancel` always finds the host's task: the host registers the task synchronously when
//!   it takes the `Submit` in, and the origin only ever sends a `Cancel` for a key after the
//!   `Submit` that carries it, on the same session.
//!
//! Messages about a key the origin does not know (an ended stream's late or duplicate events,
//! or a peer's guesses) and messages from a node that does not host the stream are dropped:
//! [`Delivery`] says which it was, for the caller to log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use canopy_runtime::cluster::NodeId;
use tokio::sync::{Notify, mpsc};
use tokio::task::AbortHandle;

use super::super::protocol::{AppMsg, encode};
use crate::runner::{RunnerError, TaskEvent, TaskHandle};

/// A stream this node sent to another node, as the origin holds it.
struct Stream {
    host: NodeId,
    tx: mpsc::UnboundedSender<TaskEvent>,
    /// Whether any output arrived (a task that produced nothing may be retried).
    started: bool,
    /// When the host last said anything about it (or when it was opened).
    heard: Instant,
    /// Notified when the stream ends because its host left (while its `Submit` is under
    /// way, the origin waits on this besides the host's answer).
    lost: Arc<Notify>,
}

/// What became of a message about a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Taken: handed to the stream's consumer, or counted as news from its host.
    Taken,
    /// Handed to the consumer, and it ended the stream.
    Ended,
    /// No stream has that key: it ended already (a late or duplicate message), or this node
    /// never sent one.
    Unknown,
    /// The stream is hosted by another node than the sender.
    NotTheHost,
}

/// The streams this node sent to other nodes, by key.
#[derive(Default)]
pub(super) struct Streams {
    streams: HashMap<u64, Stream>,
}

impl Streams {
    /// Whether a stream has `key`.
    pub(super) fn contains(&self, key: u64) -> bool {
        self.streams.contains_key(&key)
    }

    /// Opens stream `key`, hosted by `host`, whose events go to `tx`; its deadline runs from
    /// `now`. What it returns is notified if the host leaves ([`Streams::lose_hosts`]).
    pub(super) fn open(
        &mut self,
        key: u64,
        host: NodeId,
        tx: mpsc::UnboundedSender<TaskEvent>,
        now: Instant,
    ) -> Arc<Notify> {
        let lost = Arc::new(Notify::new());
        self.streams.insert(
            key,
            Stream {
                host,
                tx,
                started: false,
                heard: now,
                lost: lost.clone(),
            },
        );
        lost
    }

    /// Closes stream `key` without a word to its consumer (it is gone, or never got the
    /// stream); returns the stream's host.
    pub(super) fn close(&mut self, key: u64) -> Option<NodeId> {
        self.streams.remove(&key).map(|s| s.host)
    }

    /// Hands `event` about stream `key`, sent by `from`, to the stream's consumer: only the
    /// stream's host may feed or end it. A final event (`Done`, `Failed`) closes the stream.
    pub(super) fn deliver(
        &mut self,
        from: &NodeId,
        key: u64,
        event: TaskEvent,
        now: Instant,
    ) -> Delivery {
        let Some(stream) = self.streams.get_mut(&key) else {
            return Delivery::Unknown;
        };
        if stream.host != *from {
            return Delivery::NotTheHost;
        }
        stream.heard = now;
        let end = matches!(event, TaskEvent::Done { .. } | TaskEvent::Failed(_));
        if matches!(event, TaskEvent::Chunk(_)) {
            stream.started = true;
        }
        // A consumer that is gone is noticed by the stream's watcher, which cancels it.
        let _ = stream.tx.send(event);
        if end {
            self.streams.remove(&key);
            Delivery::Ended
        } else {
            Delivery::Taken
        }
    }

    /// Takes the host's word (`from`) that stream `key`'s task still runs.
    pub(super) fn progress(&mut self, from: &NodeId, key: u64, now: Instant) -> Delivery {
        match self.streams.get_mut(&key) {
            None => Delivery::Unknown,
            Some(stream) if stream.host != *from => Delivery::NotTheHost,
            Some(stream) => {
                stream.heard = now;
                Delivery::Taken
            }
        }
    }

    /// Starts stream `key`'s deadline again from `now` (when its host took the task: the
    /// host forwards nothing before it answers, and the answer may take a while).
    pub(super) fn restart_deadline(&mut self, key: u64, now: Instant) {
        if let Some(stream) = self.streams.get_mut(&key) {
            stream.heard = stream.heard.max(now);
        }
    }

    /// When stream `key`'s deadline of `limit` runs out if its host says nothing more; `None`
    /// when there is no such stream (any more).
    pub(super) fn deadline(&self, key: u64, limit: Duration) -> Option<Instant> {
        self.streams.get(&key).map(|s| s.heard + limit)
    }

    /// Ends stream `key` if its host has said nothing about it for `limit` up to `now`: its
    /// consumer gets [`RunnerError::StreamLost`]. Returns the host (to cancel the task there)
    /// when it did.
    pub(super) fn expire(&mut self, key: u64, now: Instant, limit: Duration) -> Option<NodeId> {
        let silent = now.saturating_duration_since(self.streams.get(&key)?.heard);
        if silent < limit {
            return None;
        }
        let stream = self.streams.remove(&key)?;
        let _ = stream.tx.send(TaskEvent::Failed(RunnerError::StreamLost {
            node: stream.host.to_string(),
            reason: format!(
                "it sent nothing about the task for {} s (the deadline is {} s)",
                silent.as_secs(),
                limit.as_secs()
            ),
        }));
        Some(stream.host)
    }

    /// Ends every stream whose host is not `present` (it left the cluster): its consumer gets
    /// [`RunnerError::PeerLost`], and its `lost` is notified. Returns the hosts of the streams
    /// it ended.
    pub(super) fn lose_hosts(&mut self, present: impl Fn(&NodeId) -> bool) -> Vec<NodeId> {
        let lost: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, s)| !present(&s.host))
            .map(|(k, _)| *k)
            .collect();
        let mut hosts = Vec::with_capacity(lost.len());
        for key in lost {
            if let Some(s) = self.streams.remove(&key) {
                let _ = s.tx.send(TaskEvent::Failed(RunnerError::PeerLost {
                    node: s.host.to_string(),
                    started: s.started,
                }));
                s.lost.notify_one();
                hosts.push(s.host);
            }
        }
        hosts
    }
}

/// The tasks this node serves for other nodes, by origin and key.
#[derive(Default)]
pub(super) struct Served {
    tasks: HashMap<(NodeId, u64), (u64, AbortHandle)>,
    serial: u64,
}

impl Served {
    /// Whether a task is served for `origin` under `key`.
    pub(super) fn contains(&self, origin: &NodeId, key: u64) -> bool {
        self.tasks.contains_key(&(origin.clone(), key))
    }

    /// A serial number for the next task to [`insert`](Served::insert).
    pub(super) fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    /// Registers `task`, of number `serial`, as the task served for `origin` under `key` (the
    /// caller checked that there is none).
    pub(super) fn insert(&mut self, origin: NodeId, key: u64, serial: u64, task: AbortHandle) {
        self.tasks.insert((origin, key), (serial, task));
    }

    /// The task of `serial`, served for `origin` under `key`, ended by itself: forgets it (and
    /// not another task registered under the same key since).
    pub(super) fn finished(&mut self, origin: &NodeId, key: u64, serial: u64) {
        let id = (origin.clone(), key);
        if self.tasks.get(&id).is_some_and(|(s, _)| *s == serial) {
            self.tasks.remove(&id);
        }
    }

    /// Stops the task served for `origin` under `key`; whether there was one.
    pub(super) fn cancel(&mut self, origin: &NodeId, key: u64) -> bool {
        match self.tasks.remove(&(origin.clone(), key)) {
            Some((_, task)) => {
                task.abort();
                true
            }
            None => false,
        }
    }

    /// Stops every task served for an origin that is not `present`; how many it stopped.
    pub(super) fn keep_origins(&mut self, present: impl Fn(&NodeId) -> bool) -> usize {
        let before = self.tasks.len();
        self.tasks.retain(|(origin, _), (_, task)| {
            let keep = present(origin);
            if !keep {
                task.abort();
            }
            keep
        });
        before - self.tasks.len()
    }

    /// How many tasks are served.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.tasks.len()
    }
}

/// How [`forward`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Forwarded {
    /// The task's final event went to the origin (or, for an event that does not encode, a
    /// failure saying so in its place).
    Ended,
    /// The task's stream ended without a final event; the origin was told so.
    Vanished,
    /// A message to the origin could not be sent (why); the task was cancelled, and the
    /// origin was told if that could still be sent.
    SendFailed(String),
}

/// Forwards the events of `handle`, the task served under `key`, through `send` (to the
/// origin), until its final event. When nothing came for `progress_every` it sends a
/// [`AppMsg::Progress`] instead, so that the origin's deadline measures this loop and the
/// link, not how long the task takes (the runner's stall timeouts bound that, and their
/// failure is forwarded like any other). `me` names this node in the errors it sends.
///
/// The first failed send ends it: the task's handle is dropped at once, which cancels the
/// task in its runner, and one [`RunnerError::StreamLost`] is sent (best effort), as the
/// origin's stream has a hole now.
pub(super) async fn forward<E: std::fmt::Display>(
    key: u64,
    mut handle: TaskHandle,
    progress_every: Duration,
    me: &str,
    mut send: impl FnMut(Vec<u8>) -> Result<(), E>,
) -> Forwarded {
    let lost = |reason: String| {
        TaskEvent::Failed(RunnerError::StreamLost {
            node: me.to_string(),
            reason,
        })
    };
    loop {
        let (msg, outcome) = match tokio::time::timeout(progress_every, handle.next()).await {
            Err(_) => (AppMsg::Progress { key }, None),
            Ok(None) => (
                AppMsg::Event {
                    key,
                    event: lost("the task's stream ended without a result".into()),
                },
                Some(Forwarded::Vanished),
            ),
            Ok(Some(event)) => {
                let end = matches!(event, TaskEvent::Done { .. } | TaskEvent::Failed(_));
                (
                    AppMsg::Event { key, event },
                    end.then_some(Forwarded::Ended),
                )
            }
        };
        let (bytes, outcome) = match encode(&msg) {
            Ok(bytes) => (bytes, outcome),
            Err(err) => {
                // End the origin's stream with the reason rather than leave a hole in it.
                tracing::error!(%err, "cannot forward a task event");
                let failed = AppMsg::Event {
                    key,
                    event: lost(format!("a task event does not encode: {err}")),
                };
                match encode(&failed) {
                    Ok(bytes) => (bytes, Some(Forwarded::Ended)),
                    Err(err) => return Forwarded::SendFailed(err.to_string()),
                }
            }
        };
        if let Err(err) = send(bytes) {
            let why = err.to_string();
            drop(handle);
            let failed = AppMsg::Event {
                key,
                event: lost(format!("it could not send the task's output: {why}")),
            };
            if let Ok(bytes) = encode(&failed) {
                let _ = send(bytes);
            }
            return Forwarded::SendFailed(why);
        }
        if let Some(outcome) = outcome {
            return outcome;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::protocol::decode;
    use canopy_proto::{FinishReason, TokenChunk, Usage};
    use std::sync::{Arc, Mutex};

    fn chunk(text: &str) -> TaskEvent {
        TaskEvent::Chunk(TokenChunk {
            index: 0,
            text: text.into(),
            token_ids: vec![1],
            logprobs: Vec::new(),
        })
    }

    fn done() -> TaskEvent {
        TaskEvent::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 1,
            },
        }
    }

    fn opened(
        key: u64,
        host: &NodeId,
        now: Instant,
    ) -> (Streams, mpsc::UnboundedReceiver<TaskEvent>) {
        let mut streams = Streams::default();
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = streams.open(key, host.clone(), tx, now);
        (streams, rx)
    }

    #[test]
    fn only_the_host_feeds_a_stream_and_its_end_closes_it() {
        let (host, other) = (NodeId::random(), NodeId::random());
        let now = Instant::now();
        let (mut streams, mut rx) = opened(7, &host, now);
        assert_eq!(
            streams.deliver(&other, 7, chunk("x"), now),
            Delivery::NotTheHost
        );
        assert_eq!(streams.progress(&other, 7, now), Delivery::NotTheHost);
        assert_eq!(
            streams.deliver(&host, 8, chunk("x"), now),
            Delivery::Unknown
        );
        assert_eq!(streams.deliver(&host, 7, chunk("a"), now), Delivery::Taken);
        assert_eq!(streams.deliver(&host, 7, done(), now), Delivery::Ended);
        assert!(!streams.contains(7));
        // A duplicate or late final event, and late progress, find nothing.
        assert_eq!(streams.deliver(&host, 7, done(), now), Delivery::Unknown);
        assert_eq!(streams.progress(&host, 7, now), Delivery::Unknown);
        assert_eq!(rx.try_recv().ok(), Some(chunk("a")));
        assert_eq!(rx.try_recv().ok(), Some(done()));
        // The table held the only sender: the consumer sees the end of the stream.
        assert!(matches!(
            rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn a_silent_stream_expires_with_stream_lost_and_news_from_its_host_defers_that() {
        let host = NodeId::random();
        let limit = Duration::from_secs(15);
        let t0 = Instant::now();
        let (mut streams, mut rx) = opened(1, &host, t0);
        assert_eq!(streams.deadline(1, limit), Some(t0 + limit));
        assert_eq!(streams.expire(1, t0 + limit / 2, limit), None);
        // The host took the task a while after it was opened: the deadline starts then.
        let taken = t0 + Duration::from_secs(4);
        streams.restart_deadline(1, taken);
        assert_eq!(streams.deadline(1, limit), Some(taken + limit));
        assert_eq!(streams.expire(1, t0 + limit, limit), None);
        // Progress, and any event, push the deadline on; another node's word does not.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(streams.progress(&host, 1, t1), Delivery::Taken);
        assert_eq!(
            streams.progress(&NodeId::random(), 1, t1 + limit),
            Delivery::NotTheHost
        );
        assert_eq!(streams.expire(1, t0 + limit, limit), None);
        let t2 = t1 + Duration::from_secs(5);
        assert_eq!(streams.deliver(&host, 1, chunk("a"), t2), Delivery::Taken);
        assert_eq!(streams.deadline(1, limit), Some(t2 + limit));
        assert_eq!(streams.expire(1, t1 + limit, limit), None);
        assert_eq!(streams.expire(1, t2 + limit, limit), Some(host.clone()));
        assert!(!streams.contains(1));
        assert_eq!(streams.deadline(1, limit), None);
        assert_eq!(rx.try_recv().ok(), Some(chunk("a")));
        match rx.try_recv() {
            Ok(TaskEvent::Failed(RunnerError::StreamLost { node, reason })) => {
                assert_eq!(node, host.to_string());
                assert!(reason.contains("15 s"), "{reason}");
            }
            other => panic!("expected StreamLost, got {other:?}"),
        }
        // Expiring again, or a stream that never was, does nothing.
        assert_eq!(streams.expire(1, t2 + limit * 2, limit), None);
        assert_eq!(streams.expire(2, t2 + limit * 2, limit), None);
    }

    #[tokio::test]
    async fn streams_of_a_host_that_left_fail_with_peer_lost_and_others_go_on() {
        let (gone, stays) = (NodeId::random(), NodeId::random());
        let now = Instant::now();
        let mut streams = Streams::default();
        let (tx, mut lost_rx) = mpsc::unbounded_channel();
        let lost = streams.open(1, gone.clone(), tx, now);
        let (tx, mut kept_rx) = mpsc::unbounded_channel();
        let kept = streams.open(2, stays.clone(), tx, now);
        streams.deliver(&gone, 1, chunk("a"), now);
        assert_eq!(streams.lose_hosts(|n| *n == stays), vec![gone.clone()]);
        assert!(!streams.contains(1) && streams.contains(2));
        assert_eq!(lost_rx.try_recv().ok(), Some(chunk("a")));
        assert_eq!(
            lost_rx.try_recv().ok(),
            Some(TaskEvent::Failed(RunnerError::PeerLost {
                node: gone.to_string(),
                started: true,
            }))
        );
        assert!(kept_rx.try_recv().is_err());
        // The loss is told to whoever waits for the host's answer, even if it starts waiting
        // only now; the other stream's is not.
        tokio::time::timeout(Duration::from_secs(10), lost.notified())
            .await
            .expect("the lost stream's waiter is told");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), kept.notified())
                .await
                .is_err()
        );
        assert_eq!(streams.close(2), Some(stays));
        assert_eq!(streams.close(2), None);
    }

    #[tokio::test]
    async fn a_cancel_stops_the_registered_task_and_a_finished_task_forgets_only_itself() {
        let origin = NodeId::random();
        let mut served = Served::default();
        let task = tokio::spawn(std::future::pending::<()>());
        let serial = served.next_serial();
        served.insert(origin.clone(), 5, serial, task.abort_handle());
        assert!(served.contains(&origin, 5));
        assert!(!served.contains(&NodeId::random(), 5));
        assert!(served.cancel(&origin, 5));
        assert!(task.await.expect_err("aborted").is_cancelled());
        assert!(!served.cancel(&origin, 5), "a second cancel finds nothing");
        // A task under the same key registered since is not forgotten by the old one's end.
        let again = tokio::spawn(std::future::pending::<()>());
        let newer = served.next_serial();
        served.insert(origin.clone(), 5, newer, again.abort_handle());
        served.finished(&origin, 5, serial);
        assert!(served.contains(&origin, 5));
        served.finished(&origin, 5, newer);
        assert!(!served.contains(&origin, 5));
        again.abort();
    }

    #[tokio::test]
    async fn tasks_of_an_origin_that_left_are_stopped() {
        let (gone, stays) = (NodeId::random(), NodeId::random());
        let mut served = Served::default();
        let lost = tokio::spawn(std::future::pending::<()>());
        let kept = tokio::spawn(std::future::pending::<()>());
        let (first, second) = (served.next_serial(), served.next_serial());
        served.insert(gone.clone(), 1, first, lost.abort_handle());
        served.insert(stays.clone(), 1, second, kept.abort_handle());
        assert_eq!(served.keep_origins(|n| *n == stays), 1);
        assert_eq!(served.len(), 1);
        assert!(lost.await.expect_err("aborted").is_cancelled());
        assert!(!kept.is_finished());
        kept.abort();
    }

    /// A task handle fed by the returned sender (the runner's side).
    fn task() -> (mpsc::UnboundedSender<TaskEvent>, TaskHandle) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            tx,
            TaskHandle {
                task_id: 1,
                events: rx,
            },
        )
    }

    /// The messages a [`forward`] sent, decoded, and a sink that fails from the `fail_from`th
    /// message on.
    #[allow(clippy::type_complexity)]
    fn sink(
        fail_from: usize,
    ) -> (
        Arc<Mutex<Vec<AppMsg>>>,
        impl FnMut(Vec<u8>) -> Result<(), String>,
    ) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let log = sent.clone();
        let send = move |bytes: Vec<u8>| {
            let mut log = log.lock().expect("log");
            log.push(decode::<AppMsg>(&bytes).expect("a message"));
            if log.len() >= fail_from {
                Err("no session".to_string())
            } else {
                Ok(())
            }
        };
        (sent, send)
    }

    #[tokio::test]
    async fn forwarding_sends_events_to_the_end() {
        let (tx, handle) = task();
        tx.send(chunk("a")).expect("send");
        tx.send(done()).expect("send");
        let (sent, send) = sink(usize::MAX);
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            forward(9, handle, Duration::from_secs(60), "host", send),
        )
        .await
        .expect("forwarding stops at the final event");
        assert_eq!(outcome, Forwarded::Ended);
        assert_eq!(
            *sent.lock().expect("log"),
            vec![
                AppMsg::Event {
                    key: 9,
                    event: chunk("a")
                },
                AppMsg::Event {
                    key: 9,
                    event: done()
                },
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_send_cancels_the_task_and_tells_the_origin_why() {
        let (tx, handle) = task();
        tx.send(chunk("a")).expect("send");
        tx.send(chunk("b")).expect("send");
        // The runner's side stays open: the task would go on if forwarding did not stop it.
        let (sent, send) = sink(2);
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            forward(9, handle, Duration::from_secs(60), "host", send),
        )
        .await
        .expect("forwarding stops at the failed send");
        assert_eq!(outcome, Forwarded::SendFailed("no session".into()));
        assert!(
            tx.is_closed(),
            "the task's handle was dropped (cancelling it)"
        );
        let sent = sent.lock().expect("log");
        assert_eq!(sent.len(), 3, "{sent:?}");
        match &sent[2] {
            AppMsg::Event {
                key: 9,
                event: TaskEvent::Failed(RunnerError::StreamLost { node, reason }),
            } => {
                assert_eq!(node, "host");
                assert!(reason.contains("no session"), "{reason}");
            }
            other => panic!("expected StreamLost, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_quiet_task_sends_progress_and_a_vanished_one_ends_the_stream() {
        let (tx, handle) = task();
        let (sent, send) = sink(usize::MAX);
        let forwarding = tokio::spawn(forward(3, handle, Duration::from_millis(20), "host", send));
        let progressed = async {
            while !sent
                .lock()
                .expect("log")
                .contains(&AppMsg::Progress { key: 3 })
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), progressed)
            .await
            .expect("a Progress while the task is quiet");
        drop(tx);
        let outcome = tokio::time::timeout(Duration::from_secs(10), forwarding)
            .await
            .expect("forwarding ends")
            .expect("no panic");
        assert_eq!(outcome, Forwarded::Vanished);
        let sent = sent.lock().expect("log");
        assert!(
            matches!(
                sent.last(),
                Some(AppMsg::Event {
                    key: 3,
                    event: TaskEvent::Failed(RunnerError::StreamLost { .. })
                })
            ),
            "{sent:?}"
        );
        // Progress only while nothing else went: every message but the last is one.
        assert!(
            sent[..sent.len() - 1]
                .iter()
                .all(|m| *m == AppMsg::Progress { key: 3 })
        );
    }
}
