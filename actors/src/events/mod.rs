//! The node's event stream: every runner event, supervisor restart and escalation,
//! membership change, election and placement, of this node and (in a cluster) of every other
//! node, in one bounded, resumable log.
//!
//! - Each node records its own events with a sequence number of its own incarnation
//!   ([`Event::seq`]) and sends them to every member; a node that sees a gap in a peer's
//!   sequence, or a peer that just joined, asks that peer for what it still holds
//!   ([`EventLog::own_since`]), so a node's events are seen through any other node.
//! - Every event a node holds, its own or a peer's, gets a local id ([`Event::id`]) in
//!   arrival order: the cursor `GET /v1/events?since=ID` and [`EventLog::follow`] resume
//!   from. A reader that resumes misses nothing that is still held, and is told how many
//!   events it missed when some were dropped meanwhile.
//! - The history is bounded by count and by bytes ([`Limits`]); the oldest events go first,
//!   counted in `canopy_events_dropped_total`.

mod body;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use body::EventBody;

/// Longest text a node keeps of an event a peer sent, in bytes (longer ones are cut).
pub const MAX_EVENT_TEXT: usize = 2048;
/// Most stderr lines a node keeps of a peer's runner failure.
pub const MAX_STDERR_LINES: usize = 20;
/// Longest actor path a node keeps of a peer's event.
pub const MAX_PATH_LEN: usize = 256;
/// Most events one message to a peer carries (a history answer is cut to this).
pub const MAX_EVENTS_PER_MESSAGE: usize = 512;
/// Most peer incarnations whose last sequence number is remembered.
const MAX_ORIGINS: usize = 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Its id in the log of the node that serves it (the `since` cursor). A peer's event
    /// gets a new id where it arrives.
    #[serde(default)]
    pub id: u64,
    /// The node it happened on (its node id; `local` on a node outside a cluster).
    pub node: String,
    /// That node's incarnation (a random number drawn at its start), so that a restarted
    /// node's sequence numbers are not taken for old ones.
    pub incarnation: u64,
    /// Its number among its node's events of this incarnation, from 1.
    pub seq: u64,
    /// When (unix ms, the node's clock).
    pub time_ms: u64,
    /// The actor it is about (`worker/<instance>`, `cluster`, `master`, ...).
    pub path: String,
    /// What happened.
    #[serde(flatten)]
    pub body: EventBody,
}

impl Event {
    /// The event as the API serves it: its fields, plus `failure` and a readable `message`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("failure".into(), self.body.is_failure().into());
            map.insert("message".into(), self.body.message().into());
        }
        value
    }

    /// One readable line: the time of day (UTC), the node's short id, the actor and the
    /// message, e.g. `17:20:01.123Z 1a2b3c4d worker/m-0: runner of m-0 (pid 42) ...`.
    pub fn line(&self) -> String {
        line(
            self.time_ms,
            &self.node,
            &self.path,
            &self.body.message(),
            self.body.is_failure(),
        )
    }

    /// An approximation of what the event costs to hold, in bytes.
    fn cost(&self) -> usize {
        serde_json::to_vec(self).map_or(512, |v| v.len()) + 64
    }
}

/// The line [`Event::line`] prints, from an event's parts (also for events read as JSON).
pub fn line(time_ms: u64, node: &str, path: &str, message: &str, failure: bool) -> String {
    let day_ms = time_ms % 86_400_000;
    let (h, m, s, ms) = (
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000,
    );
    let node = node.get(..8).unwrap_or(node);
    let mark = if failure { " FAILURE" } else { "" };
    format!("{h:02}:{m:02}:{s:02}.{ms:03}Z {node} {path}:{mark} {message}")
}

/// How much history a node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most events.
    pub max_events: usize,
    /// Most bytes (as [`Event`]s serialise to JSON, plus a small overhead each).
    pub max_bytes: usize,
}

impl Default for Limits {
    /// 10,000 events, 8 MiB.
    fn default() -> Self {
        Self {
            max_events: 10_000,
            max_bytes: 8 << 20,
        }
    }
}

/// What a read of the log found.
#[derive(Debug, Clone, Default)]
pub struct Read {
    /// The events after the cursor, oldest first.
    pub events: Vec<Arc<Event>>,
    /// Events after the cursor that are no longer held (dropped for room).
    pub missed: u64,
    /// The cursor to read from next (the last id returned, or the cursor given).
    pub next: u64,
}

/// An item of [`EventLog::follow`]; also a message an actor can receive (see
/// [`NodeContext::follow`](crate::node::NodeContext::follow)).
#[derive(Debug, Clone, ractor_cluster::RactorMessage)]
pub enum Followed {
    /// The next event.
    Event(Arc<Event>),
    /// This many events after the cursor were dropped before they could be read.
    Missed(u64),
}

struct LogState {
    node: String,
    incarnation: u64,
    next_seq: u64,
    events: VecDeque<(Arc<Event>, usize)>,
    /// The id the next event gets; the held events' ids are `next_id - events.len()..`.
    next_id: u64,
    bytes: usize,
    limits: Limits,
    /// What is held of each peer incarnation.
    origins: HashMap<(String, u64), Held>,
}

impl LogState {
    fn first_id(&self) -> u64 {
        self.next_id - self.events.len() as u64
    }

    fn push(&mut self, mut event: Event) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        event.id = id;
        let cost = event.cost();
        self.bytes += cost;
        self.events.push_back((Arc::new(event), cost));
        id
    }

    /// Drops the oldest events until the limits hold; returns how many went.
    fn trim(&mut self) -> u64 {
        let mut dropped = 0;
        while self.events.len() > self.limits.max_events
            || (self.bytes > self.limits.max_bytes && self.events.len() > 1)
        {
            if let Some((_, cost)) = self.events.pop_front() {
                self.bytes -= cost;
                dropped += 1;
            }
        }
        dropped
    }

    fn read(&self, since: u64, limit: usize) -> Read {
        // A cursor past the newest id comes from an earlier run of this node: start over.
        let since = if since >= self.next_id { 0 } else { since };
        let first = self.first_id();
        let start = since.saturating_add(1).max(first);
        let missed = first.saturating_sub(since.saturating_add(1));
        let skip = (start - first) as usize;
        let events: Vec<Arc<Event>> = self
            .events
            .iter()
            .skip(skip)
            .take(limit)
            .map(|(e, _)| e.clone())
            .collect();
        let next = events.last().map_or(since.max(start - 1), |e| e.id);
        Read {
            events,
            missed,
            next,
        }
    }
}

/// The sequence numbers held of one peer incarnation: every one up to `contiguous`, and those
/// in `above` (arrived past a gap), plus the local id of the newest arrival (for ageing out).
#[derive(Debug, Default)]
struct Held {
    contiguous: u64,
    above: std::collections::BTreeSet<u64>,
    newest_id: u64,
}

/// Most sequence numbers held past a gap per incarnation; past it the gap is given up.
const MAX_ABOVE_GAP: usize = 4096;

impl Held {
    fn has(&self, seq: u64) -> bool {
        seq <= self.contiguous || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        self.above.insert(seq);
        while self.above.remove(&(self.contiguous + 1)) {
            self.contiguous += 1;
        }
        if self.above.len() > MAX_ABOVE_GAP {
            // Too far behind to fill the gap: take the oldest held number as the new floor.
            if let Some(first) = self.above.pop_first() {
                self.contiguous = first;
            }
            while self.above.remove(&(self.contiguous + 1)) {
                self.contiguous += 1;
            }
        }
    }
}

/// A peer's incarnation whose events this node is missing some of: ask `node` for its own
/// events after `after` (see [`EventLog::absorb`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The peer.
    pub node: String,
    /// Its incarnation.
    pub incarnation: u64,
    /// The last of its sequence numbers this node holds.
    pub after: u64,
}

/// The node's event log. Cheap to clone; every clone is the same log.
#[derive(Clone)]
pub struct EventLog {
    state: Arc<Mutex<LogState>>,
    last: Arc<watch::Sender<u64>>,
    dropped: Counter,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog").finish_non_exhaustive()
    }
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new(Limits::default())
    }
}

impl EventLog {
    /// An empty log of node `local` with `limits`.
    pub fn new(limits: Limits) -> Self {
        Self {
            state: Arc::new(Mutex::new(LogState {
                node: "local".into(),
                incarnation: rand::random::<u64>() >> 11,
                next_seq: 1,
                events: VecDeque::new(),
                next_id: 1,
                bytes: 0,
                limits,
                origins: HashMap::new(),
            })),
            last: Arc::new(watch::channel(0).0),
            dropped: Counter::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Names the node its own events are recorded under (its cluster node id).
    pub fn set_node(&self, node: &str) {
        self.lock().node = node.to_string();
    }

    /// The node its own events are recorded under, and its incarnation.
    pub fn origin(&self) -> (String, u64) {
        let s = self.lock();
        (s.node.clone(), s.incarnation)
    }

    /// The counter of events dropped for room (exported as `canopy_events_dropped_total`).
    pub fn dropped_counter(&self) -> Counter {
        self.dropped.clone()
    }

    /// Records an event of this node about the actor at `path`; returns its id.
    pub fn record(&self, path: impl Into<String>, body: EventBody) -> u64 {
        let (id, dropped) = {
            let mut s = self.lock();
            let event = Event {
                id: 0,
                node: s.node.clone(),
                incarnation: s.incarnation,
                seq: s.next_seq,
                time_ms: canopy_runtime::cluster::now_ms(),
                path: path.into(),
                body,
            };
            s.next_seq += 1;
            let id = s.push(event);
            (id, s.trim())
        };
        self.dropped.inc_by(dropped);
        self.last.send_replace(id);
        id
    }

    /// Records an event of a user's actor: `message`, marked as a failure or not.
    pub fn note(&self, path: impl Into<String>, message: impl Into<String>, failure: bool) -> u64 {
        self.record(
            path,
            EventBody::Note {
                message: message.into(),
                failure,
            },
        )
    }

    /// Takes in events that peer `from` sent of its own: those it sent before are skipped,
    /// events in another node's name are refused (each node sends only its own), texts are
    /// cut to [`MAX_EVENT_TEXT`]. Returns the gaps found: a sequence that does not follow
    /// what this node holds of that incarnation.
    pub fn absorb(&self, from: &str, events: Vec<Event>) -> Vec<Gap> {
        let mut gaps: Vec<Gap> = Vec::new();
        let (last, dropped) = {
            let mut s = self.lock();
            if from == s.node {
                return gaps;
            }
            let mut last = None;
            for mut event in events {
                if event.node != from {
                    tracing::debug!(peer = from, node = %event.node, "refused an event sent in another node's name");
                    continue;
                }
                let key = (event.node.clone(), event.incarnation);
                if event.seq == 0 || s.origins.get(&key).is_some_and(|h| h.has(event.seq)) {
                    continue;
                }
                event.path.truncate(
                    (0..=MAX_PATH_LEN.min(event.path.len()))
                        .rev()
                        .find(|&i| event.path.is_char_boundary(i))
                        .unwrap_or(0),
                );
                event.body = event.body.bounded(MAX_EVENT_TEXT, MAX_STDERR_LINES);
                let seq = event.seq;
                let id = s.push(event);
                let held = s.origins.entry(key).or_default();
                held.insert(seq);
                held.newest_id = id;
                last = Some(id);
            }
            // What is still missing below the newest held number of each sender's incarnation.
            for ((node, incarnation), held) in &s.origins {
                if node == from && !held.above.is_empty() {
                    gaps.push(Gap {
                        node: node.clone(),
                        incarnation: *incarnation,
                        after: held.contiguous,
                    });
                }
            }
            if s.origins.len() > MAX_ORIGINS {
                // Forget the incarnations heard from longest ago.
                let mut by_age: Vec<((String, u64), u64)> = s
                    .origins
                    .iter()
                    .map(|(k, h)| (k.clone(), h.newest_id))
                    .collect();
                by_age.sort_by_key(|(_, id)| *id);
                let excess = s.origins.len() - MAX_ORIGINS;
                for (k, _) in by_age.into_iter().take(excess) {
                    s.origins.remove(&k);
                }
            }
            (last, s.trim())
        };
        self.dropped.inc_by(dropped);
        if let Some(id) = last {
            self.last.send_replace(id);
        }
        gaps
    }

    /// What this node holds of `node`'s incarnation `incarnation`: every sequence number up
    /// to the one returned (0 for none).
    pub fn held_of(&self, node: &str, incarnation: u64) -> u64 {
        self.lock()
            .origins
            .get(&(node.to_string(), incarnation))
            .map_or(0, |h| h.contiguous)
    }

    /// This node's own events after sequence number `after` of `incarnation` (all it holds
    /// of its current incarnation when `incarnation` is another), at most
    /// [`MAX_EVENTS_PER_MESSAGE`], oldest first: the answer to a peer's history request.
    pub fn own_since(&self, incarnation: Option<u64>, after: u64) -> Vec<Event> {
        let s = self.lock();
        let after = if incarnation == Some(s.incarnation) {
            after
        } else {
            0
        };
        let mine: Vec<Event> = s
            .events
            .iter()
            .map(|(e, _)| e)
            .filter(|e| e.node == s.node && e.incarnation == s.incarnation && e.seq > after)
            .map(|e| (**e).clone())
            .collect();
        let skip = mine.len().saturating_sub(MAX_EVENTS_PER_MESSAGE);
        mine.into_iter().skip(skip).collect()
    }

    /// The events after id `since` (at most `limit`), and how many after it were dropped.
    pub fn read(&self, since: u64, limit: usize) -> Read {
        self.lock().read(since, limit)
    }

    /// The id of the newest event (0 for none).
    pub fn last_id(&self) -> u64 {
        *self.last.borrow()
    }

    /// Events held now.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Whether no event is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every event after id `since` that is still held, then each new one as it is recorded,
    /// forever; a [`Followed::Missed`] tells of events dropped before they could be read.
    /// Never lags: a slow reader reads from the log, not from a queue of its own.
    pub fn follow(&self, since: u64) -> impl Stream<Item = Followed> + Send + 'static {
        let log = self.clone();
        let mut changes = self.last.subscribe();
        async_stream::stream! {
            let mut cursor = since;
            loop {
                let read = log.read(cursor, 256);
                if read.missed > 0 {
                    yield Followed::Missed(read.missed);
                }
                let had = !read.events.is_empty();
                cursor = read.next;
                for event in read.events {
                    yield Followed::Event(event);
                }
                if had {
                    continue;
                }
                changes.mark_unchanged();
                if log.last_id() > cursor {
                    continue;
                }
                if changes.changed().await.is_err() {
                    break;
                }
            }
        }
    }

    /// Like [`EventLog::follow`], but only this node's own events (what it sends its peers).
    pub fn follow_own(&self, since: u64) -> impl Stream<Item = Arc<Event>> + Send + 'static {
        use futures::StreamExt;
        let origin = self.origin();
        self.follow(since).filter_map(move |item| {
            let own = match item {
                Followed::Event(e) if e.node == origin.0 && e.incarnation == origin.1 => Some(e),
                _ => None,
            };
            std::future::ready(own)
        })
    }
}

#[cfg(test)]
mod tests;
