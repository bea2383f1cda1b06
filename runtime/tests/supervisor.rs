//! The OTP supervisor semantics of `runtime::supervisor`, modelled on Erlang's
//! `supervisor_SUITE`: strategies, restart types, intensity and escalation, restart delay,
//! ordered shutdown, nesting and the runtime child API.
//!
//! Test children report their life on a channel ([`Ev`]); the tests wait on it (with a
//! timeout), so they synchronise on what happened rather than on sleeps. Sleeps appear only
//! to assert that nothing (more) happens.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use canopy_runtime::restart::{Backoff, Intensity};
use canopy_runtime::supervisor::{
    ChildInfo, ChildSpec, Restart, Shutdown, Strategy, Supervisor, SupervisorArgs, SupervisorError,
    SupervisorMsg,
};
use ractor::{
    Actor, ActorCell, ActorProcessingErr, ActorRef, ActorStatus, SpawnErr, SupervisionEvent,
};
use ractor_cluster::RactorMessage;
use tokio::sync::mpsc;

/// How long to wait for something that must happen.
const WAIT: Duration = Duration::from_secs(5);
/// How long to watch for something that must not happen.
const QUIET: Duration = Duration::from_millis(150);

// ---------------------------------------------------------------------------------------
// A test child
// ---------------------------------------------------------------------------------------

/// What a test child reports.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    /// `pre_start` succeeded.
    Started(String),
    /// `post_stop` ran (so not after a failure or a kill).
    Stopped(String),
    /// It is inside a handler that sleeps and so ignores stop requests.
    Hanging(String),
}

fn started(id: &str) -> Ev {
    Ev::Started(id.to_owned())
}

fn stopped(id: &str) -> Ev {
    Ev::Stopped(id.to_owned())
}

/// A child that fails, stops or hangs on request, and refuses to start while `fail_start`
/// is set.
struct Worker;

#[derive(Clone)]
struct WorkerArgs {
    id: String,
    events: mpsc::UnboundedSender<Ev>,
    fail_start: Arc<AtomicBool>,
    start_attempts: Arc<AtomicUsize>,
}

#[derive(RactorMessage)]
enum WorkerMsg {
    /// Return an error from the handler: `ActorFailed`.
    Fail,
    /// Stop with this reason: `ActorTerminated`.
    Stop(Option<String>),
    /// Sleep in the handler (stop requests wait behind it).
    Hang(Duration),
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerArgs;
    type Arguments = WorkerArgs;

    async fn pre_start(
        &self,
        _: ActorRef<WorkerMsg>,
        args: WorkerArgs,
    ) -> Result<WorkerArgs, ActorProcessingErr> {
        args.start_attempts.fetch_add(1, Ordering::SeqCst);
        if args.fail_start.load(Ordering::SeqCst) {
            return Err(format!("{} refuses to start", args.id).into());
        }
        let _ = args.events.send(Ev::Started(args.id.clone()));
        Ok(args)
    }

    async fn post_stop(
        &self,
        _: ActorRef<WorkerMsg>,
        state: &mut WorkerArgs,
    ) -> Result<(), ActorProcessingErr> {
        let _ = state.events.send(Ev::Stopped(state.id.clone()));
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        msg: WorkerMsg,
        state: &mut WorkerArgs,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            WorkerMsg::Fail => return Err(format!("{} was asked to fail", state.id).into()),
            WorkerMsg::Stop(reason) => myself.stop(reason),
            WorkerMsg::Hang(duration) => {
                let _ = state.events.send(Ev::Hanging(state.id.clone()));
                tokio::time::sleep(duration).await;
            }
        }
        Ok(())
    }
}

/// The test's view of its children: the event channel and the knobs.
struct Harness {
    tx: mpsc::UnboundedSender<Ev>,
    rx: mpsc::UnboundedReceiver<Ev>,
    start_attempts: Arc<AtomicUsize>,
}

impl Harness {
    fn new() -> Self {
        init_tracing();
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx,
            start_attempts: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// A permanent worker child with a short shutdown timeout.
    fn worker(&self, id: &str) -> ChildSpec {
        self.worker_with(id, Arc::new(AtomicBool::new(false)))
    }

    /// A worker that refuses to start while `fail_start` is set.
    fn worker_with(&self, id: &str, fail_start: Arc<AtomicBool>) -> ChildSpec {
        let args = WorkerArgs {
            id: id.to_owned(),
            events: self.tx.clone(),
            fail_start,
            start_attempts: self.start_attempts.clone(),
        };
        ChildSpec::actor(id, || Worker, args)
            .with_shutdown(Shutdown::Timeout(Duration::from_secs(2)))
    }

    /// The next event.
    async fn next(&mut self) -> Ev {
        match tokio::time::timeout(WAIT, self.rx.recv()).await {
            Ok(Some(ev)) => ev,
            Ok(None) => panic!("event channel closed"),
            Err(_) => panic!("no event within {WAIT:?}"),
        }
    }

    /// The next events are exactly `expected`, in this order.
    async fn expect(&mut self, expected: &[Ev]) {
        let mut seen = Vec::with_capacity(expected.len());
        for _ in expected {
            seen.push(self.next().await);
        }
        assert_eq!(seen, expected);
    }

    /// Nothing happens for a while.
    async fn expect_quiet(&mut self) {
        if let Ok(ev) = tokio::time::timeout(QUIET, self.rx.recv()).await {
            panic!("unexpected event {ev:?}");
        }
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// ---------------------------------------------------------------------------------------
// A parent that reports its children's deaths (to observe escalation)
// ---------------------------------------------------------------------------------------

/// How a watched supervisor ended.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    IntensityExceeded { max_restarts: u32, child: String },
    OtherFailure(String),
    Terminated(Option<String>),
}

struct Watcher;

#[derive(RactorMessage)]
enum WatcherMsg {}

impl Actor for Watcher {
    type Msg = WatcherMsg;
    type State = mpsc::UnboundedSender<Seen>;
    type Arguments = mpsc::UnboundedSender<Seen>;

    async fn pre_start(
        &self,
        _: ActorRef<WatcherMsg>,
        tx: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(tx)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<WatcherMsg>,
        evt: SupervisionEvent,
        tx: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let seen = match evt {
            SupervisionEvent::ActorFailed(_, err) => match err.downcast_ref::<SupervisorError>() {
                Some(SupervisorError::IntensityExceeded {
                    max_restarts,
                    child,
                    ..
                }) => Seen::IntensityExceeded {
                    max_restarts: *max_restarts,
                    child: child.clone(),
                },
                _ => Seen::OtherFailure(err.to_string()),
            },
            SupervisionEvent::ActorTerminated(_, _, reason) => Seen::Terminated(reason),
            _ => return Ok(()),
        };
        let _ = tx.send(seen);
        Ok(())
    }
}

/// Spawns a watcher and, linked to it, a supervisor.
async fn spawn_watched(
    args: SupervisorArgs,
) -> (
    ActorRef<SupervisorMsg>,
    ActorRef<WatcherMsg>,
    mpsc::UnboundedReceiver<Seen>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (watcher, _) = Actor::spawn(None, Watcher, tx)
        .await
        .expect("watcher starts");
    let (sup, _) = Actor::spawn_linked(None, Supervisor, args, watcher.get_cell())
        .await
        .expect("supervisor starts");
    (sup, watcher, rx)
}

async fn next_seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(seen)) => seen,
        Ok(None) => panic!("watcher channel closed"),
        Err(_) => panic!("watcher saw nothing within {WAIT:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Immediate restarts, generous intensity.
fn args(strategy: Strategy) -> SupervisorArgs {
    SupervisorArgs::new(strategy)
        .with_backoff(Backoff::none())
        .with_intensity(Intensity {
            max_restarts: 10,
            period: Duration::from_secs(10),
        })
}

async fn spawn_sup(args: SupervisorArgs) -> ActorRef<SupervisorMsg> {
    let (sup, _) = Actor::spawn(None, Supervisor, args)
        .await
        .expect("supervisor starts");
    sup
}

async fn children(sup: &ActorRef<SupervisorMsg>) -> Vec<ChildInfo> {
    ractor::call_t!(sup, SupervisorMsg::WhichChildren, 5_000).expect("supervisor answers")
}

fn info<'a>(children: &'a [ChildInfo], id: &str) -> &'a ChildInfo {
    children
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no child {id} in {children:?}"))
}

fn cell(children: &[ChildInfo], id: &str) -> ActorCell {
    info(children, id)
        .cell
        .clone()
        .unwrap_or_else(|| panic!("child {id} is not running"))
}

fn ids(children: &[ChildInfo]) -> Vec<&str> {
    children.iter().map(|c| c.id.as_str()).collect()
}

/// Waits until the supervisor has seen child `id` exit (it is not running).
async fn wait_not_running(sup: &ActorRef<SupervisorMsg>, id: &str) -> ChildInfo {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = children(sup).await;
        let child = info(&now, id);
        if !child.running {
            return child.clone();
        }
        assert!(Instant::now() < deadline, "child {id} is still running");
        tokio::task::yield_now().await;
    }
}

fn send(cell: &ActorCell, msg: WorkerMsg) {
    cell.send_message(msg).expect("child is alive");
}

async fn stop_sup(sup: &ActorRef<SupervisorMsg>) {
    sup.stop_and_wait(None, Some(WAIT))
        .await
        .expect("supervisor stops");
}

/// The suite proper, in a module named so that `cargo test supervisor` selects it.
mod supervisor {
    use super::*;

    // ---------------------------------------------------------------------------------------
    // Strategies
    // ---------------------------------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_for_one_restarts_only_the_failed_child() {
        let mut h = Harness::new();
        let sup = spawn_sup(
            args(Strategy::OneForOne)
                .with_child(h.worker("a"))
                .with_child(h.worker("b"))
                .with_child(h.worker("c")),
        )
        .await;
        h.expect(&[started("a"), started("b"), started("c")]).await;
        let before = children(&sup).await;

        send(&cell(&before, "b"), WorkerMsg::Fail);
        h.expect(&[started("b")]).await;
        h.expect_quiet().await;

        let after = children(&sup).await;
        assert_eq!(ids(&after), ["a", "b", "c"]);
        assert_eq!(cell(&after, "a").get_id(), cell(&before, "a").get_id());
        assert_eq!(cell(&after, "c").get_id(), cell(&before, "c").get_id());
        assert_ne!(cell(&after, "b").get_id(), cell(&before, "b").get_id());
        assert_eq!(
            after.iter().map(|c| c.restart_count).collect::<Vec<_>>(),
            [0, 1, 0]
        );
        let stats = ractor::call_t!(sup, SupervisorMsg::Stats, 5_000).expect("stats");
        assert_eq!((stats.restarts, stats.running), (1, 3));
        stop_sup(&sup).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_for_all_restarts_every_child() {
        let mut h = Harness::new();
        let sup = spawn_sup(
            args(Strategy::OneForAll)
                .with_child(h.worker("a"))
                .with_child(h.worker("b"))
                .with_child(h.worker("c")),
        )
        .await;
        h.expect(&[started("a"), started("b"), started("c")]).await;
        let before = children(&sup).await;

        send(&cell(&before, "b"), WorkerMsg::Fail);
        // The others stop in reverse start order, then all start in start order.
        h.expect(&[
            stopped("c"),
            stopped("a"),
            started("a"),
            started("b"),
            started("c"),
        ])
        .await;
        // The exits of `a` and `c`, stopped by the supervisor, restart nothing.
        h.expect_quiet().await;

        let after = children(&sup).await;
        for id in ["a", "b", "c"] {
            assert_ne!(
                cell(&after, id).get_id(),
                cell(&before, id).get_id(),
                "{id}"
            );
            assert_eq!(info(&after, id).restart_count, 1, "{id}");
        }
        let stats = ractor::call_t!(sup, SupervisorMsg::Stats, 5_000).expect("stats");
        assert_eq!(stats.restarts, 1, "a group restart counts once");
        stop_sup(&sup).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rest_for_one_restarts_the_failed_child_and_later_ones() {
        let mut h = Harness::new();
        let sup = spawn_sup(
            args(Strategy::RestForOne)
                .with_child(h.worker("a"))
                .with_child(h.worker("b"))
                .with_child(h.worker("c"))
                .with_child(h.worker("d")),
        )
        .await;
        h.expect(&[started("a"), started("b"), started("c"), started("d")])
            .await;
        let before = children(&sup).await;

        send(&cell(&before, "b"), WorkerMsg::Fail);
        h.expect(&[
            stopped("d"),
            stopped("c"),
            started("b"),
            started("c"),
            started("d"),
        ])
        .await;
        h.expect_quiet().await;

        let after = children(&sup).await;
        assert_eq!(cell(&after, "a").get_id(), cell(&before, "a").get_id());
        for id in ["b", "c", "d"] {
            assert_ne!(
                cell(&after, id).get_id(),
                cell(&before, id).get_id(),
                "{id}"
            );
        }
        stop_sup(&sup).await;
    }

    // ---------------------------------------------------------------------------------------
    // Restart types
    // ---------------------------------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn permanent_child_is_restarted_after_normal_and_abnormal_exits() {
        let mut h = Harness::new();
        let sup = spawn_sup(args(Strategy::OneForOne).with_child(h.worker("p"))).await;
        h.expect(&[started("p")]).await;

        send(&cell(&children(&sup).await, "p"), WorkerMsg::Stop(None));
        h.expect(&[stopped("p"), started("p")]).await;

        send(&cell(&children(&sup).await, "p"), WorkerMsg::Fail);
        h.expect(&[started("p")]).await;

        send(
            &cell(&children(&sup).await, "p"),
            WorkerMsg::Stop(Some("shutdown".into())),
        );
        h.expect(&[stopped("p"), started("p")]).await;

        assert_eq!(info(&children(&sup).await, "p").restart_count, 3);
        stop_sup(&sup).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transient_child_is_restarted_after_abnormal_exits_only() {
        let mut h = Harness::new();
        let sup = spawn_sup(
            args(Strategy::OneForOne).with_child(h.worker("t").with_restart(Restart::Transient)),
        )
        .await;
        h.expect(&[started("t")]).await;

        // Abnormal: a failure, a stop with an unknown reason, a kill.
        send(&cell(&children(&sup).await, "t"), WorkerMsg::Fail);
        h.expect(&[started("t")]).await;
        send(
            &cell(&children(&sup).await, "t"),
            WorkerMsg::Stop(Some("boom".into())),
        );
        h.expect(&[stopped("t"), started("t")]).await;
        cell(&children(&sup).await, "t").kill();
        h.expect(&[started("t")]).await;

        // Normal: not restarted, but the spec stays.
        send(
            &cell(&children(&sup).await, "t"),
            WorkerMsg::Stop(Some("shutdown".into())),
        );
        h.expect(&[stopped("t")]).await;
        h.expect_quiet().await;
        let now = children(&sup).await;
        assert_eq!(ids(&now), ["t"]);
        assert!(!info(&now, "t").running);
        assert_eq!(info(&now, "t").restart_count, 3);

        // ... and it can be restarted by hand, then stops normally with no reason.
        ractor::call_t!(sup, SupervisorMsg::RestartChild, 5_000, "t".to_owned())
            .expect("answer")
            .expect("restarted");
        h.expect(&[started("t")]).await;
        send(&cell(&children(&sup).await, "t"), WorkerMsg::Stop(None));
        h.expect(&[stopped("t")]).await;
        h.expect_quiet().await;
        stop_sup(&sup).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn temporary_child_is_never_restarted_and_its_spec_goes() {
        let mut h = Harness::new();
        let sup = spawn_sup(
            args(Strategy::OneForOne)
                .with_child(h.worker("p"))
                .with_child(h.worker("failing").with_restart(Restart::Temporary))
                .with_child(h.worker("finishing").with_restart(Restart::Temporary)),
        )
        .await;
        h.expect(&[started("p"), started("failing"), started("finishing")])
            .await;
        let before = children(&sup).await;

        send(&cell(&before, "failing"), WorkerMsg::Fail);
        send(&cell(&before, "finishing"), WorkerMsg::Stop(None));
        h.expect(&[stopped("finishing")]).await;
        h.expect_quiet().await;

        let after = children(&sup).await;
        assert_eq!(ids(&after), ["p"]);
        assert_eq!(cell(&after, "p").get_id(), cell(&before, "p").get_id());
        stop_sup(&sup).await;
    }

    /// OTP: a temporary child caught in a group restart is terminated and removed, not
    /// restarted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn temporary_bystander_is_removed_by_a_one_for_all_restart() {
        let mut h = Harness::new();
        let sup = spawn_sup(
            args(Strategy::OneForAll)
                .with_child(h.worker("p1"))
                .with_child(h.worker("tmp").with_restart(Restart::Temporary))
                .with_child(h.worker("p2")),
        )
        .await;
        h.expect(&[started("p1"), started("tmp"), started("p2")])
            .await;

        send(&cell(&children(&sup).await, "p1"), WorkerMsg::Fail);
        h.expect(&[stopped("p2"), stopped("tmp"), started("p1"), started("p2")])
            .await;
        h.expect_quiet().await;
        assert_eq!(ids(&children(&sup).await), ["p1", "p2"]);
        stop_sup(&sup).await;
    }

    // ---------------------------------------------------------------------------------------
    // Intensity and escalation
    // ---------------------------------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn too_many_restarts_stop_all_children_and_fail_the_supervisor() {
        let mut h = Harness::new();
        let (sup, watcher, mut seen) = spawn_watched(
            args(Strategy::OneForOne)
                .with_intensity(Intensity {
                    max_restarts: 2,
                    period: Duration::from_secs(10),
                })
                .with_child(h.worker("a"))
                .with_child(h.worker("b"))
                .with_child(h.worker("c")),
        )
        .await;
        h.expect(&[started("a"), started("b"), started("c")]).await;
        let bystanders = children(&sup).await;

        for _ in 0..2 {
            send(&cell(&children(&sup).await, "b"), WorkerMsg::Fail);
            h.expect(&[started("b")]).await;
        }
        send(&cell(&children(&sup).await, "b"), WorkerMsg::Fail);

        // The third restart within the window escalates: the others stop in reverse order ...
        h.expect(&[stopped("c"), stopped("a")]).await;
        // ... and the parent sees the supervisor fail with the typed error.
        assert_eq!(
            next_seen(&mut seen).await,
            Seen::IntensityExceeded {
                max_restarts: 2,
                child: "b".into()
            }
        );
        sup.wait(Some(WAIT)).await.expect("supervisor is gone");
        for id in ["a", "c"] {
            assert_eq!(cell(&bystanders, id).get_status(), ActorStatus::Stopped);
        }
        h.expect_quiet().await;
        watcher.stop(None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_observer_is_told_each_restart_and_the_escalation() {
        use canopy_runtime::supervisor::{Observer, SupervisorEvent, SupervisorEventKind};
        let mut h = Harness::new();
        let told = Arc::new(std::sync::Mutex::new(Vec::<SupervisorEvent>::new()));
        let sink = told.clone();
        let (sup, watcher, mut seen) = spawn_watched(
            args(Strategy::OneForOne)
                .with_kind("worker")
                .with_observer(Observer::new(move |e| sink.lock().unwrap().push(e)))
                .with_intensity(Intensity {
                    max_restarts: 1,
                    period: Duration::from_secs(10),
                })
                .with_child(h.worker("a")),
        )
        .await;
        h.expect(&[started("a")]).await;
        send(&cell(&children(&sup).await, "a"), WorkerMsg::Fail);
        h.expect(&[started("a")]).await;
        send(&cell(&children(&sup).await, "a"), WorkerMsg::Fail);
        assert!(matches!(
            next_seen(&mut seen).await,
            Seen::IntensityExceeded { .. }
        ));
        let told = told.lock().unwrap().clone();
        assert_eq!(told.len(), 2, "{told:?}");
        assert_eq!(
            (told[0].supervisor.as_str(), told[0].child.as_str()),
            ("worker", "a")
        );
        assert!(
            matches!(told[0].kind, SupervisorEventKind::Restarting { .. }),
            "{told:?}"
        );
        assert!(
            matches!(told[1].kind, SupervisorEventKind::Escalated { .. }),
            "{told:?}"
        );
        watcher.stop(None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_that_cannot_restart_hits_the_intensity_limit() {
        let mut h = Harness::new();
        let broken = Arc::new(AtomicBool::new(false));
        let (sup, watcher, mut seen) = spawn_watched(
            SupervisorArgs::new(Strategy::OneForOne)
                .with_intensity(Intensity {
                    max_restarts: 3,
                    period: Duration::from_secs(10),
                })
                // Scheduled (delayed) restarts: 10, 20, 40 ms.
                .with_backoff(Backoff {
                    initial: Duration::from_millis(10),
                    max: Duration::from_secs(1),
                    factor: 2.0,
                    jitter: 0.0,
                    reset_after: Duration::from_secs(30),
                })
                .with_child(h.worker("other"))
                .with_child(h.worker_with("broken", broken.clone())),
        )
        .await;
        h.expect(&[started("other"), started("broken")]).await;
        assert_eq!(h.start_attempts.load(Ordering::SeqCst), 2);

        broken.store(true, Ordering::SeqCst);
        send(&cell(&children(&sup).await, "broken"), WorkerMsg::Fail);

        h.expect(&[stopped("other")]).await;
        assert_eq!(
            next_seen(&mut seen).await,
            Seen::IntensityExceeded {
                max_restarts: 3,
                child: "broken".into()
            }
        );
        // The exit and two failed restarts are within the limit; the third failed start is the
        // fourth restart: 3 restart attempts of `broken` after the 2 initial starts.
        assert_eq!(h.start_attempts.load(Ordering::SeqCst), 2 + 3);
        sup.wait(Some(WAIT)).await.expect("supervisor is gone");
        watcher.stop(None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_with_its_own_budget_is_given_up_alone_and_can_be_restarted() {
        let mut h = Harness::new();
        let broken = Arc::new(AtomicBool::new(false));
        let (sup, watcher, mut seen) = spawn_watched(
            args(Strategy::OneForOne)
                // The supervisor's own budget is smaller than the child's: the child's
                // restarts must not be counted against it.
                .with_intensity(Intensity {
                    max_restarts: 1,
                    period: Duration::from_secs(10),
                })
                .with_child(h.worker("healthy"))
                .with_child(
                    h.worker_with("flaky", broken.clone())
                        .with_restart(Restart::Transient)
                        .with_intensity(Intensity {
                            max_restarts: 2,
                            period: Duration::from_secs(10),
                        }),
                ),
        )
        .await;
        h.expect(&[started("healthy"), started("flaky")]).await;
        let healthy = cell(&children(&sup).await, "healthy");

        // One restart that works, then one whose start fails: the retry of that is the
        // third restart, over the child's own budget.
        send(&cell(&children(&sup).await, "flaky"), WorkerMsg::Fail);
        h.expect(&[started("flaky")]).await;
        broken.store(true, Ordering::SeqCst);
        send(&cell(&children(&sup).await, "flaky"), WorkerMsg::Fail);
        wait_not_running(&sup, "flaky").await;
        let deadline = Instant::now() + WAIT;
        let flaky = loop {
            let now = info(&children(&sup).await, "flaky").clone();
            if now.gave_up.is_some() || Instant::now() > deadline {
                break now;
            }
            tokio::task::yield_now().await;
        };
        let why = flaky.gave_up.clone().expect("given up");
        assert!(why.contains("more than 2 restarts"), "{why}");
        assert!(why.contains("refuses to start"), "{why}");
        assert!(!flaky.running);
        // Nobody else was touched, and the supervisor did not fail.
        h.expect_quiet().await;
        assert_eq!(healthy.get_status(), ActorStatus::Running);
        assert!(seen.try_recv().is_err(), "the supervisor failed");
        assert_eq!(sup.get_status(), ActorStatus::Running);

        // The owner may start it again once the cause is gone; that clears the verdict.
        broken.store(false, Ordering::SeqCst);
        let restarted = ractor::call_t!(sup, SupervisorMsg::RestartChild, 5_000, "flaky".into())
            .expect("answers");
        assert!(restarted.is_ok(), "{restarted:?}");
        h.expect(&[started("flaky")]).await;
        assert_eq!(info(&children(&sup).await, "flaky").gave_up, None);
        stop_sup(&sup).await;
        watcher.stop(None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn supervisors_nest_and_a_failing_child_supervisor_is_restarted() {
        let mut h = Harness::new();
        let inner = SupervisorArgs::new(Strategy::OneForOne)
            .with_backoff(Backoff::none())
            .with_intensity(Intensity {
                max_restarts: 0,
                period: Duration::from_secs(10),
            })
            .with_child(h.worker("x"))
            .with_child(h.worker("y"));
        let top = spawn_sup(
            args(Strategy::OneForOne)
                .with_child(h.worker("w"))
                .with_child(ChildSpec::supervisor("inner", inner)),
        )
        .await;
        h.expect(&[started("w"), started("x"), started("y")]).await;
        let before = children(&top).await;
        let inner_before: ActorRef<SupervisorMsg> = cell(&before, "inner").into();

        // `x` fails; `inner` may not restart anything, so it stops `y` and fails; `top`
        // restarts `inner`, which starts `x` and `y` afresh.
        send(&cell(&children(&inner_before).await, "x"), WorkerMsg::Fail);
        h.expect(&[stopped("y"), started("x"), started("y")]).await;
        h.expect_quiet().await;

        let after = children(&top).await;
        assert_eq!(cell(&after, "w").get_id(), cell(&before, "w").get_id());
        assert_ne!(cell(&after, "inner").get_id(), inner_before.get_id());
        assert_eq!(info(&after, "inner").restart_count, 1);

        // Stopping `top` stops `inner` (which stops `y`, then `x`), then `w`.
        stop_sup(&top).await;
        h.expect(&[stopped("y"), stopped("x"), stopped("w")]).await;
    }

    // ---------------------------------------------------------------------------------------
    // Shutdown
    // ---------------------------------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn children_stop_in_reverse_start_order() {
        let mut h = Harness::new();
        let sup = spawn_sup(
            args(Strategy::OneForOne)
                .with_child(h.worker("a"))
                .with_child(h.worker("b"))
                .with_child(h.worker("c")),
        )
        .await;
        ractor::call_t!(sup, SupervisorMsg::StartChild, 5_000, h.worker("d"))
            .expect("answer")
            .expect("d starts");
        h.expect(&[started("a"), started("b"), started("c"), started("d")])
            .await;

        stop_sup(&sup).await;
        h.expect(&[stopped("d"), stopped("c"), stopped("b"), stopped("a")])
            .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_child_that_ignores_stop_is_killed_after_its_timeout() {
        let mut h = Harness::new();
        let timeout = Duration::from_millis(300);
        let sup = spawn_sup(
            args(Strategy::OneForOne)
                .with_child(
                    h.worker("stubborn")
                        .with_shutdown(Shutdown::Timeout(timeout)),
                )
                .with_child(h.worker("polite"))
                .with_child(h.worker("brutal").with_shutdown(Shutdown::BrutalKill)),
        )
        .await;
        h.expect(&[started("stubborn"), started("polite"), started("brutal")])
            .await;
        let before = children(&sup).await;
        send(
            &cell(&before, "stubborn"),
            WorkerMsg::Hang(Duration::from_secs(60)),
        );
        h.expect(&[Ev::Hanging("stubborn".into())]).await;

        let t0 = Instant::now();
        stop_sup(&sup).await;
        let took = t0.elapsed();

        // `brutal` is killed (no post_stop), `polite` stops, `stubborn` is killed after the
        // timeout (no post_stop either).
        h.expect(&[stopped("polite")]).await;
        h.expect_quiet().await;
        assert!(took >= timeout, "stopped after {took:?}");
        assert!(
            took < timeout + Duration::from_secs(1),
            "stopped after {took:?}"
        );
        for id in ["stubborn", "polite", "brutal"] {
            assert_eq!(cell(&before, id).get_status(), ActorStatus::Stopped, "{id}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn supervisor_start_fails_if_an_initial_child_fails_to_start() {
        let mut h = Harness::new();
        let refuse = Arc::new(AtomicBool::new(true));
        let result = Actor::spawn(
            None,
            Supervisor,
            args(Strategy::OneForOne)
                .with_child(h.worker("a"))
                .with_child(h.worker_with("b", refuse))
                .with_child(h.worker("c")),
        )
        .await;
        let Err(SpawnErr::StartupFailed(err)) = result else {
            panic!("supervisor started although a child could not");
        };
        match err.downcast_ref::<SupervisorError>() {
            Some(SupervisorError::StartFailed { id, .. }) => assert_eq!(id, "b"),
            other => panic!("unexpected error {other:?}"),
        }
        // `a` was started and stopped again; `c` was never started.
        h.expect(&[started("a"), stopped("a")]).await;
        h.expect_quiet().await;
    }

    // ---------------------------------------------------------------------------------------
    // Restart delay
    // ---------------------------------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delayed_restarts_keep_the_supervisor_responsive_and_stale_ones_are_ignored() {
        let mut h = Harness::new();
        let fixed = |delay| Backoff {
            initial: delay,
            max: delay,
            factor: 1.0,
            jitter: 0.0,
            reset_after: Duration::from_secs(30),
        };
        let a_delay = Duration::from_millis(300);
        let b_delay = Duration::from_millis(100);
        let sup = spawn_sup(
            args(Strategy::RestForOne)
                .with_child(h.worker("a").with_backoff(fixed(a_delay)))
                .with_child(h.worker("b").with_backoff(fixed(b_delay))),
        )
        .await;
        h.expect(&[started("a"), started("b")]).await;

        // `b` fails: its restart is scheduled for `b_delay` later, and the supervisor answers
        // meanwhile.
        send(&cell(&children(&sup).await, "b"), WorkerMsg::Fail);
        assert!(wait_not_running(&sup, "b").await.restart_pending);

        // `a` fails before that: rest_for_one schedules `a` and `b` together after `a_delay`,
        // which makes the earlier scheduled restart of `b` stale: when it comes due it must
        // not start `b` (ahead of `a`).
        let t0 = Instant::now();
        send(&cell(&children(&sup).await, "a"), WorkerMsg::Fail);
        h.expect(&[started("a"), started("b")]).await;
        assert!(
            t0.elapsed() >= a_delay,
            "restarted after {:?}",
            t0.elapsed()
        );
        h.expect_quiet().await;

        let now = children(&sup).await;
        assert!(now.iter().all(|c| c.running && !c.restart_pending));
        assert_eq!(info(&now, "a").restart_count, 1);
        assert_eq!(info(&now, "b").restart_count, 1);
        stop_sup(&sup).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn terminating_a_child_cancels_its_scheduled_restart() {
        let mut h = Harness::new();
        let sup = spawn_sup(
            args(Strategy::OneForOne)
                .with_backoff(Backoff {
                    initial: Duration::from_millis(100),
                    max: Duration::from_millis(100),
                    factor: 1.0,
                    jitter: 0.0,
                    reset_after: Duration::from_secs(30),
                })
                .with_child(h.worker("a")),
        )
        .await;
        h.expect(&[started("a")]).await;
        send(&cell(&children(&sup).await, "a"), WorkerMsg::Fail);
        assert!(wait_not_running(&sup, "a").await.restart_pending);
        ractor::call_t!(sup, SupervisorMsg::TerminateChild, 5_000, "a".to_owned())
            .expect("answer")
            .expect("terminated");
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.expect_quiet().await;
        let now = children(&sup).await;
        assert!(!info(&now, "a").running && !info(&now, "a").restart_pending);
        stop_sup(&sup).await;
    }

    // ---------------------------------------------------------------------------------------
    // Runtime child API
    // ---------------------------------------------------------------------------------------

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn children_can_be_started_terminated_restarted_and_deleted_at_runtime() {
        let mut h = Harness::new();
        let sup = spawn_sup(args(Strategy::OneForOne).with_child(h.worker("a"))).await;
        h.expect(&[started("a")]).await;

        // Start.
        let b = ractor::call_t!(sup, SupervisorMsg::StartChild, 5_000, h.worker("b"))
            .expect("answer")
            .expect("b starts");
        h.expect(&[started("b")]).await;
        assert_eq!(b.get_id(), cell(&children(&sup).await, "b").get_id());
        let dup =
            ractor::call_t!(sup, SupervisorMsg::StartChild, 5_000, h.worker("b")).expect("answer");
        assert!(matches!(dup, Err(SupervisorError::DuplicateChild(id)) if id == "b"));
        let refused = ractor::call_t!(
            sup,
            SupervisorMsg::StartChild,
            5_000,
            h.worker_with("c", Arc::new(AtomicBool::new(true)))
        )
        .expect("answer");
        assert!(matches!(refused, Err(SupervisorError::StartFailed { id, .. }) if id == "c"));
        assert_eq!(ids(&children(&sup).await), ["a", "b"]);

        // Terminate: stopped and not restarted, though permanent.
        ractor::call_t!(sup, SupervisorMsg::TerminateChild, 5_000, "b".to_owned())
            .expect("answer")
            .expect("terminated");
        h.expect(&[stopped("b")]).await;
        h.expect_quiet().await;
        assert!(!info(&children(&sup).await, "b").running);

        // Restart.
        ractor::call_t!(sup, SupervisorMsg::RestartChild, 5_000, "b".to_owned())
            .expect("answer")
            .expect("restarted");
        h.expect(&[started("b")]).await;
        let running = ractor::call_t!(sup, SupervisorMsg::RestartChild, 5_000, "b".to_owned())
            .expect("answer");
        assert!(matches!(running, Err(SupervisorError::ChildRunning(_))));

        // Delete.
        let running = ractor::call_t!(sup, SupervisorMsg::DeleteChild, 5_000, "b".to_owned())
            .expect("answer");
        assert!(matches!(running, Err(SupervisorError::ChildRunning(_))));
        ractor::call_t!(sup, SupervisorMsg::TerminateChild, 5_000, "b".to_owned())
            .expect("answer")
            .expect("terminated");
        h.expect(&[stopped("b")]).await;
        ractor::call_t!(sup, SupervisorMsg::DeleteChild, 5_000, "b".to_owned())
            .expect("answer")
            .expect("deleted");
        assert_eq!(ids(&children(&sup).await), ["a"]);
        let missing = ractor::call_t!(sup, SupervisorMsg::TerminateChild, 5_000, "b".to_owned())
            .expect("answer");
        assert!(matches!(missing, Err(SupervisorError::NoSuchChild(_))));

        stop_sup(&sup).await;
        h.expect(&[stopped("a")]).await;
    }
}
