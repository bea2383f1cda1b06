//! Remote actor messaging between two cluster nodes: two [`ClusterActor`]s in this process,
//! joined by static peers over real TCP on loopback, so every message crosses a
//! `ractor_cluster` session (serialization, the socket, deserialization, the remote inbox).
//! Prints numbers; asserts nothing.
//!
//! `cargo bench -p canopy-runtime --bench cluster_messaging` (or `just bench-messaging`).
//!
//! Measured on a multi-thread tokio runtime with 2 workers:
//! - **call round trip**: `ClusterHandle::call` from node A to node B with a 64-byte payload,
//!   echoed back by a task reading B's `Incoming` channel; 200 unmeasured warm-up calls, then
//!   2000 sequential calls: median, p90, p99 and max in µs, and calls/s (2000 / total time);
//! - the same call round trip to A's own inbox (`handle.call(handle.me(), ..)`), which skips
//!   the network: the difference is what the TCP session costs;
//! - **cast throughput**: `ClusterHandle::send` of 200 000 64-byte casts (and 20 000 of 4 KiB)
//!   from A to B as fast as the sender can issue them, timed from the first send until B's
//!   reader has counted the last one: messages/s and MB/s (payload bytes only, 10^6 bytes).
//!
//! A cast phase that does not complete within 30 s (a message lost, for instance because the
//! flood delayed heartbeats long enough for the session to be declared dead) is reported as
//! such with the count that arrived.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use canopy_runtime::cluster::{
    ClusterActor, ClusterConfig, ClusterHandle, ClusterMsg, Incoming, NodeId, cluster_channels,
};
use ractor::{Actor, ActorRef};
use tokio::sync::{Notify, mpsc};

/// Payload of the round-trip calls and the small casts.
const SMALL: usize = 64;
/// Payload of the large casts.
const LARGE: usize = 4096;
/// Unmeasured calls before each round-trip series.
const WARM_UP_CALLS: usize = 200;
/// Measured calls per round-trip series.
const CALLS: usize = 2000;
/// Small casts per throughput run.
const SMALL_CASTS: u64 = 200_000;
/// Large casts per throughput run.
const LARGE_CASTS: u64 = 20_000;
/// How long one call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a cast phase may take before it is reported as incomplete.
const CAST_LIMIT: Duration = Duration::from_secs(30);

/// A free loopback address (bound and released).
fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

/// One cluster node of the benchmark.
struct Node {
    /// The `ClusterActor`.
    actor: ActorRef<ClusterMsg>,
    /// Sends messages and reads the view.
    handle: ClusterHandle,
    /// Casts the node's reader has counted since the last reset.
    casts: Arc<AtomicU64>,
    /// The count at which the reader signals `done` (0: never).
    target: Arc<AtomicU64>,
    /// Signalled when `casts` reaches `target`.
    done: Arc<Notify>,
}

/// Starts a node listening on `listen` that dials `peers`, and a reader task that echoes
/// every call's payload back and counts casts.
async fn start(listen: SocketAddr, peers: Vec<SocketAddr>) -> Node {
    let mut config = ClusterConfig::new(NodeId::random(), listen, "bench-cookie".to_string());
    config.peers = peers;
    let (args, handle, incoming) = cluster_channels(config);
    let (actor, _) = Actor::spawn(None, ClusterActor, args)
        .await
        .expect("cluster starts");
    let casts = Arc::new(AtomicU64::new(0));
    let target = Arc::new(AtomicU64::new(0));
    let done = Arc::new(Notify::new());
    tokio::spawn(read(incoming, casts.clone(), target.clone(), done.clone()));
    Node {
        actor,
        handle,
        casts,
        target,
        done,
    }
}

/// The reader of a node's application messages: answers calls with their own payload, counts
/// casts and signals `done` when the count reaches `target`.
async fn read(
    mut incoming: mpsc::UnboundedReceiver<Incoming>,
    casts: Arc<AtomicU64>,
    target: Arc<AtomicU64>,
    done: Arc<Notify>,
) {
    while let Some(msg) = incoming.recv().await {
        match msg.reply {
            Some(reply) => {
                let _ = reply.send(msg.payload);
            }
            None => {
                let n = casts.fetch_add(1, Ordering::Relaxed) + 1;
                if n == target.load(Ordering::Relaxed) {
                    done.notify_one();
                }
            }
        }
    }
}

/// Round-trip statistics of one call series, in microseconds.
struct RoundTrips {
    /// Median.
    median: f64,
    /// 90th percentile.
    p90: f64,
    /// 99th percentile.
    p99: f64,
    /// Slowest.
    max: f64,
    /// Calls per second over the whole series.
    rate: f64,
    /// Calls that failed (not counted in the statistics).
    failed: usize,
}

/// The `q` quantile (nearest rank) of sorted `v`.
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Calls node `to` through `from` `WARM_UP_CALLS` times unmeasured, then `CALLS` times
/// measured, one at a time, with a `SMALL`-byte payload.
async fn round_trips(from: &ClusterHandle, to: &NodeId) -> RoundTrips {
    let payload = vec![0xA5u8; SMALL];
    let mut failed = 0;
    for _ in 0..WARM_UP_CALLS {
        if from.call(to, payload.clone(), CALL_TIMEOUT).await.is_err() {
            failed += 1;
        }
    }
    let mut micros = Vec::with_capacity(CALLS);
    let series = Instant::now();
    for _ in 0..CALLS {
        let t = Instant::now();
        match from.call(to, payload.clone(), CALL_TIMEOUT).await {
            Ok(answer) if answer.len() == SMALL => {
                micros.push(t.elapsed().as_secs_f64() * 1e6);
            }
            _ => failed += 1,
        }
    }
    let total = series.elapsed();
    micros.sort_by(f64::total_cmp);
    RoundTrips {
        median: quantile(&micros, 0.5),
        p90: quantile(&micros, 0.9),
        p99: quantile(&micros, 0.99),
        max: micros.last().copied().unwrap_or(f64::NAN),
        rate: micros.len() as f64 / total.as_secs_f64(),
        failed,
    }
}

/// The outcome of one cast throughput run.
struct Throughput {
    /// Casts sent.
    sent: u64,
    /// Casts the receiver counted.
    received: u64,
    /// Time from the first send until the last cast was counted (or the limit).
    elapsed: Duration,
    /// Time the sender took to issue every cast.
    send_time: Duration,
    /// Sends that returned an error.
    send_errors: u64,
    /// Bytes of payload per cast.
    size: usize,
}

/// Sends `count` casts of `size` bytes from `from` to `to` as fast as possible and waits
/// until `to`'s reader has counted them all (at most `CAST_LIMIT`).
async fn casts(from: &Node, to: &Node, count: u64, size: usize) -> Throughput {
    to.casts.store(0, Ordering::Relaxed);
    to.target.store(count, Ordering::Relaxed);
    let dest = to.handle.me().clone();
    let payload = vec![0x5Au8; size];
    let mut send_errors = 0;
    let start = Instant::now();
    for _ in 0..count {
        if from.handle.send(&dest, payload.clone()).is_err() {
            send_errors += 1;
        }
    }
    let send_time = start.elapsed();
    let completed = tokio::time::timeout(CAST_LIMIT, to.done.notified())
        .await
        .is_ok();
    let elapsed = start.elapsed();
    to.target.store(0, Ordering::Relaxed);
    let received = to.casts.load(Ordering::Relaxed);
    if !completed {
        eprintln!("cast run of {count} x {size} B did not complete: {received} arrived");
    }
    Throughput {
        sent: count,
        received,
        elapsed,
        send_time,
        send_errors,
        size,
    }
}

/// Waits until both nodes see each other (at most 10 s).
async fn wait_joined(a: &Node, b: &Node) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.handle.view().members.len() != 1 || b.handle.view().members.len() != 1 {
        assert!(
            Instant::now() < deadline,
            "the nodes did not join: {:?} / {:?}",
            a.handle.view(),
            b.handle.view()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the inboxes' process groups reach both sides.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a
        .handle
        .call(b.handle.me(), Vec::new(), CALL_TIMEOUT)
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "b's inbox is not reachable from a"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the benchmark and prints its table.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let began = Instant::now();
    let (a_addr, b_addr) = (free_addr(), free_addr());
    let a = start(a_addr, vec![b_addr]).await;
    let b = start(b_addr, vec![a_addr]).await;
    let t = Instant::now();
    wait_joined(&a, &b).await;
    let joined = t.elapsed();

    let remote = round_trips(&a.handle, b.handle.me()).await;
    let local = round_trips(&a.handle, a.handle.me()).await;
    let small = casts(&a, &b, SMALL_CASTS, SMALL).await;
    let large = casts(&a, &b, LARGE_CASTS, LARGE).await;
    let still_joined = a.handle.view().members.len() == 1 && b.handle.view().members.len() == 1;

    a.actor.stop(None);
    b.actor.stop(None);

    println!();
    println!("cluster messaging: 2 nodes in one process, loopback TCP, tokio 2 workers");
    println!(
        "machine: {} CPUs; nodes joined in {:.1} ms",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        joined.as_secs_f64() * 1e3
    );
    println!();
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>9} {:>10} {:>7}",
        "call round trip (64 B)", "median µs", "p90 µs", "p99 µs", "max µs", "calls/s", "failed"
    );
    for (name, r) in [
        ("remote (A -> B over TCP)", &remote),
        ("local (A -> A's own inbox)", &local),
    ] {
        println!(
            "{:<30} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>7}",
            name, r.median, r.p90, r.p99, r.max, r.rate, r.failed
        );
    }
    println!(
        "{:<30} {:>9.1}x",
        "remote / local (median)",
        remote.median / local.median
    );
    println!();
    println!(
        "{:<30} {:>9} {:>9} {:>11} {:>9} {:>10} {:>8}",
        "cast throughput (A -> B)", "sent", "received", "messages/s", "MB/s", "total ms", "send ms"
    );
    for (name, t) in [("64 B casts", &small), ("4 KiB casts", &large)] {
        let secs = t.elapsed.as_secs_f64();
        let rate = t.received as f64 / secs;
        println!(
            "{:<30} {:>9} {:>9} {:>11.0} {:>9.1} {:>10.1} {:>8.1}",
            name,
            t.sent,
            t.received,
            rate,
            rate * t.size as f64 / 1e6,
            secs * 1e3,
            t.send_time.as_secs_f64() * 1e3
        );
        if t.send_errors > 0 {
            println!("  ({} sends failed)", t.send_errors);
        }
    }
    println!();
    println!(
        "nodes still joined after the floods: {}; total {:.1} s",
        if still_joined { "yes" } else { "NO" },
        began.elapsed().as_secs_f64()
    );
}
