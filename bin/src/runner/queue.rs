//! [`JobQueue`]: the work waiting for (or being done by) the worker thread.
//!
//! The stdin reader pushes jobs and cancels tasks; the worker takes them. Every generate task
//! the worker has taken (running, or waiting in the worker for a place in the batch) stays
//! known to the queue with its cancellation flag until the worker [finishes](JobQueue::finish)
//! it, so a `Cancel` either flags a taken task (the engine sees it before its next step) or
//! takes a queued task out before the worker ever sees it (the reader answers it `Done {
//! Cancelled }` at once). Closing the queue (shutdown, or the supervisor gone) flags every
//! taken task, hands back the queued ones, and makes the worker's next
//! [`next`](JobQueue::next) return `None`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use canopy_proto::{GenerateRequest, LoadSpec, TaskId};

/// One unit of work for the worker.
#[derive(Debug)]
pub enum Job {
    /// Load (or replace) the model.
    Load(LoadSpec),
    /// Run a generate task.
    Generate(Task),
}

/// A generate task and its cancellation flag.
#[derive(Debug)]
pub struct Task {
    /// The supervisor's id for the task.
    pub id: TaskId,
    /// What to generate (boxed: a request with its sampling options is large, and jobs move
    /// through the queue by value).
    pub request: Box<GenerateRequest>,
    /// Set when the task is cancelled; the worker's sink reports it to the engine.
    pub cancel: Arc<AtomicBool>,
}

impl Task {
    /// A task that is not cancelled yet.
    pub fn new(id: TaskId, request: GenerateRequest) -> Self {
        Self {
            id,
            request: Box::new(request),
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// What [`JobQueue::cancel`] found.
#[derive(Debug)]
pub enum Cancelled {
    /// The task is running; its flag is now set and it will end with `Done { Cancelled }`.
    Running,
    /// The task was still queued and has been taken out; the caller must answer it.
    Dequeued(Task),
    /// No such task (it already ended, or never existed).
    Unknown,
}

/// The shared work queue between the stdin reader and the worker.
#[derive(Default)]
pub struct JobQueue {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Generate tasks the worker has taken and not finished.
    taken: Vec<(TaskId, Arc<AtomicBool>)>,
    closed: bool,
}

/// What [`JobQueue::try_next`] found.
#[derive(Debug)]
pub enum Take {
    /// A job (a generate task is now taken).
    Job(Job),
    /// Nothing queued right now.
    Empty,
    /// The queue is closed.
    Closed,
}

impl JobQueue {
    /// An empty, open queue.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues a job; gives it back if the queue is closed.
    pub fn push(&self, job: Job) -> Result<(), Job> {
        let mut state = self.lock();
        if state.closed {
            return Err(job);
        }
        state.jobs.push_back(job);
        self.wake.notify_one();
        Ok(())
    }

    /// Blocks until a job is available and takes it (a generate task becomes taken); `None`
    /// once the queue is closed.
    pub fn next(&self) -> Option<Job> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(job) = State::take(&mut state) {
                return Some(job);
            }
            state = self
                .wake
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Takes a job if one is queued, without waiting.
    pub fn try_next(&self) -> Take {
        let mut state = self.lock();
        if state.closed {
            return Take::Closed;
        }
        match State::take(&mut state) {
            Some(job) => Take::Job(job),
            None => Take::Empty,
        }
    }

    /// Marks a taken task finished (it has had its last frame).
    pub fn finish(&self, id: TaskId) {
        self.lock().taken.retain(|(taken, _)| *taken != id);
    }

    /// Whether nothing is queued or taken and the queue is still open (the runner is idle).
    pub fn idle(&self) -> bool {
        let state = self.lock();
        state.jobs.is_empty() && state.taken.is_empty() && !state.closed
    }

    /// Generate tasks queued and not yet taken.
    pub fn queued(&self) -> usize {
        let state = self.lock();
        state
            .jobs
            .iter()
            .filter(|job| matches!(job, Job::Generate(_)))
            .count()
    }

    /// Cancels a task wherever it is.
    pub fn cancel(&self, id: TaskId) -> Cancelled {
        let mut state = self.lock();
        if let Some((_, flag)) = state.taken.iter().find(|(taken, _)| *taken == id) {
            flag.store(true, Ordering::SeqCst);
            return Cancelled::Running;
        }
        let position = state
            .jobs
            .iter()
            .position(|job| matches!(job, Job::Generate(task) if task.id == id));
        match position.and_then(|at| state.jobs.remove(at)) {
            Some(Job::Generate(task)) => Cancelled::Dequeued(task),
            _ => Cancelled::Unknown,
        }
    }

    /// Closes the queue: flags every taken task, drops queued loads, and returns the queued
    /// tasks for the caller to answer.
    pub fn close(&self) -> Vec<Task> {
        let mut state = self.lock();
        state.closed = true;
        for (_, flag) in &state.taken {
            flag.store(true, Ordering::SeqCst);
        }
        let tasks = state
            .jobs
            .drain(..)
            .filter_map(|job| match job {
                Job::Generate(task) => Some(task),
                Job::Load(_) => None,
            })
            .collect();
        self.wake.notify_all();
        tasks
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Pops the next job, recording a generate task as taken.
    fn take(&mut self) -> Option<Job> {
        let job = self.jobs.pop_front()?;
        if let Job::Generate(task) = &job {
            self.taken.push((task.id, Arc::clone(&task.cancel)));
        }
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use canopy_proto::{GenerateParams, Prompt};

    use super::*;

    fn task(id: TaskId) -> Job {
        Job::Generate(Task::new(
            id,
            GenerateRequest {
                tools: Vec::new(),
                prompt: Prompt::Text(String::new()),
                params: GenerateParams::default(),
            },
        ))
    }

    fn load() -> Job {
        Job::Load(LoadSpec {
            model: "scripted".to_string(),
            layer_start: None,
            layer_end: None,
            threads: None,
            parallel: None,
        })
    }

    #[test]
    fn cancel_flags_the_running_task_and_dequeues_waiting_ones() {
        let queue = JobQueue::new();
        assert!(queue.push(task(1)).is_ok());
        assert!(queue.push(task(2)).is_ok());
        let Some(Job::Generate(running)) = queue.next() else {
            panic!("expected task 1 to run");
        };
        assert!(matches!(queue.cancel(1), Cancelled::Running));
        assert!(running.cancel.load(Ordering::SeqCst));
        assert!(matches!(queue.cancel(2), Cancelled::Dequeued(t) if t.id == 2));
        assert!(matches!(queue.cancel(2), Cancelled::Unknown));
        queue.finish(1);
        assert!(queue.idle());
        assert!(matches!(queue.cancel(1), Cancelled::Unknown));
    }

    #[test]
    fn close_hands_back_tasks_and_stops_the_worker() {
        let queue = JobQueue::new();
        assert!(queue.push(task(1)).is_ok());
        let Some(Job::Generate(running)) = queue.next() else {
            panic!("expected task 1 to run");
        };
        assert!(queue.push(load()).is_ok());
        assert!(queue.push(task(2)).is_ok());
        let handed_back: Vec<_> = queue.close().into_iter().map(|t| t.id).collect();
        assert_eq!(handed_back, vec![2]);
        assert!(running.cancel.load(Ordering::SeqCst));
        assert!(queue.next().is_none());
        assert!(queue.push(task(3)).is_err());
        assert!(!queue.idle());
        assert!(matches!(queue.try_next(), Take::Closed));
    }

    #[test]
    fn several_taken_tasks_are_cancelled_each_and_counted() {
        let queue = JobQueue::new();
        for id in 1..=3 {
            assert!(queue.push(task(id)).is_ok());
        }
        assert_eq!(queue.queued(), 3);
        let (Take::Job(Job::Generate(a)), Take::Job(Job::Generate(b))) =
            (queue.try_next(), queue.try_next())
        else {
            panic!("expected two tasks");
        };
        assert_eq!(queue.queued(), 1);
        assert!(matches!(queue.cancel(2), Cancelled::Running));
        assert!(b.cancel.load(Ordering::SeqCst));
        assert!(!a.cancel.load(Ordering::SeqCst));
        queue.finish(1);
        queue.finish(2);
        assert!(!queue.idle(), "task 3 is still queued");
        assert!(matches!(queue.try_next(), Take::Job(_)));
        assert!(matches!(queue.try_next(), Take::Empty));
        queue.finish(3);
        assert!(queue.idle());
    }

    #[test]
    fn next_waits_for_a_push() {
        let queue = Arc::new(JobQueue::new());
        let worker = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || matches!(queue.next(), Some(Job::Load(_))))
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(queue.push(load()).is_ok());
        assert!(worker.join().unwrap_or(false));
    }
}
