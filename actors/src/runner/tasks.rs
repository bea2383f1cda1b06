//! The table of tasks a `RunnerSupervisor` has handed to its runner.
//!
//! A task is *awaiting ack* from submission until the runner acknowledges it (the submitter is
//! still waiting for its reply), *pending* from the ack until the runner starts it, and
//! *in flight* from then until its final event. Every entry holds the sending half of its
//! task's stream, so failing the table means every waiter hears about it at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use canopy_proto::{Phase, TaskId};
use ractor::RpcReplyPort;
use tokio::sync::mpsc;

use super::config::StallTimeouts;
use super::messages::{RunnerError, TaskEvent, TaskHandle};

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TaskState {
    AwaitingAck,
    Pending,
    Running,
}

/// The submitter's reply port and the stream receiver it will be handed at the ack.
type PendingAck = (
    RpcReplyPort<Result<TaskHandle, RunnerError>>,
    mpsc::UnboundedReceiver<TaskEvent>,
);

struct Entry {
    state: TaskState,
    events: mpsc::UnboundedSender<TaskEvent>,
    /// Held until the ack: the receiver the submitter gets, and the port to send it on.
    ack: Option<PendingAck>,
    phase: Phase,
    since: Instant,
    produced: bool,
    cancelled: bool,
}

/// What the supervisor must do after feeding the table a runner event.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Follow {
    Nothing,
    /// The task's consumer is gone: tell the runner to cancel it.
    Cancel(TaskId),
}

/// All tasks of one supervisor.
#[derive(Default)]
pub(super) struct TaskTable {
    tasks: BTreeMap<TaskId, Entry>,
}

impl TaskTable {
    pub(super) fn len(&self) -> usize {
        self.tasks.len()
    }

    pub(super) fn count(&self, state: TaskState) -> usize {
        self.tasks.values().filter(|e| e.state == state).count()
    }

    pub(super) fn running(&self) -> Option<TaskId> {
        self.tasks
            .iter()
            .find(|(_, e)| e.state == TaskState::Running)
            .map(|(id, _)| *id)
    }

    /// Records a submitted task; the submitter is answered at [`TaskTable::acked`].
    pub(super) fn submit(
        &mut self,
        task_id: TaskId,
        reply: RpcReplyPort<Result<TaskHandle, RunnerError>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        self.tasks.insert(
            task_id,
            Entry {
                state: TaskState::AwaitingAck,
                events: tx,
                ack: Some((reply, rx)),
                phase: Phase::Prefill,
                since: Instant::now(),
                produced: false,
                cancelled: false,
            },
        );
    }

    pub(super) fn acked(&mut self, task_id: TaskId) -> Follow {
        let Some(entry) = self.tasks.get_mut(&task_id) else {
            return Follow::Nothing;
        };
        entry.state = TaskState::Pending;
        entry.since = Instant::now();
        if let Some((reply, events)) = entry.ack.take()
            && reply.send(Ok(TaskHandle { task_id, events })).is_err()
        {
            // The submitter gave up waiting: nobody will read this task.
            entry.cancelled = true;
            return Follow::Cancel(task_id);
        }
        Follow::Nothing
    }

    pub(super) fn started(&mut self, task_id: TaskId) {
        if let Some(entry) = self.tasks.get_mut(&task_id) {
            entry.state = TaskState::Running;
            entry.phase = Phase::Prefill;
            entry.since = Instant::now();
        }
    }

    pub(super) fn progress(&mut self, task_id: TaskId, phase: Phase) {
        if let Some(entry) = self.tasks.get_mut(&task_id) {
            entry.phase = phase;
            entry.since = Instant::now();
        }
    }

    /// Forwards a chunk; asks for a cancel when the consumer has gone away.
    pub(super) fn chunk(&mut self, task_id: TaskId, chunk: canopy_proto::TokenChunk) -> Follow {
        let Some(entry) = self.tasks.get_mut(&task_id) else {
            return Follow::Nothing;
        };
        entry.phase = Phase::Decode;
        entry.since = Instant::now();
        entry.produced = true;
        if entry.cancelled {
            return Follow::Nothing;
        }
        if entry.events.send(TaskEvent::Chunk(chunk)).is_err() {
            entry.cancelled = true;
            return Follow::Cancel(task_id);
        }
        Follow::Nothing
    }

    /// Ends a task with its final event.
    pub(super) fn finish(&mut self, task_id: TaskId, last: TaskEvent) {
        if let Some(mut entry) = self.tasks.remove(&task_id) {
            if let Some((reply, _)) = entry.ack.take() {
                // Finished before the ack reached us (e.g. refused by the runner at once).
                let result = match last {
                    TaskEvent::Failed(err) => Err(err),
                    other => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        let _ = tx.send(other);
                        Ok(TaskHandle {
                            task_id,
                            events: rx,
                        })
                    }
                };
                let _ = reply.send(result);
            } else {
                let _ = entry.events.send(last);
            }
        }
    }

    /// Fails every task at once; `error` builds each task's error from whether it had
    /// produced output.
    pub(super) fn fail_all(&mut self, error: impl Fn(bool) -> RunnerError) {
        for (_, mut entry) in std::mem::take(&mut self.tasks) {
            let err = error(entry.produced);
            match entry.ack.take() {
                Some((reply, _)) => {
                    let _ = reply.send(Err(err));
                }
                None => {
                    let _ = entry.events.send(TaskEvent::Failed(err));
                }
            }
        }
    }

    /// Marks a task cancelled by its owner; returns whether it exists.
    pub(super) fn cancel(&mut self, task_id: TaskId) -> bool {
        match self.tasks.get_mut(&task_id) {
            Some(entry) => {
                entry.cancelled = true;
                true
            }
            None => false,
        }
    }

    /// Tasks whose consumer dropped its handle before the task produced anything (a chunk
    /// would have noticed); marks them cancelled and returns them for the runner to cancel.
    pub(super) fn abandoned(&mut self) -> Vec<TaskId> {
        self.tasks
            .iter_mut()
            .filter(|(_, e)| e.ack.is_none() && !e.cancelled && e.events.is_closed())
            .map(|(id, e)| {
                e.cancelled = true;
                *id
            })
            .collect()
    }

    /// The first task stuck past its phase's timeout, with the phase's name.
    pub(super) fn stalled(
        &self,
        now: Instant,
        limits: &StallTimeouts,
    ) -> Option<(TaskId, String, Duration)> {
        self.tasks.iter().find_map(|(id, e)| {
            let age = now.saturating_duration_since(e.since);
            let (limit, phase) = match e.state {
                TaskState::AwaitingAck => (limits.handshake, "ack".to_string()),
                TaskState::Pending => return None,
                TaskState::Running => (
                    match e.phase {
                        Phase::Loading => limits.loading,
                        Phase::Prefill => limits.prefill,
                        Phase::Decode => limits.decode,
                    },
                    e.phase.to_string(),
                ),
            };
            (age > limit).then_some((*id, phase, age))
        })
    }
}
