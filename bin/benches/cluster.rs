//! Cluster benchmark: real `canopy node` processes, each in a network namespace of its own on
//! a private bridge (the end-to-end tests' `common::netns` fabric), finding each other by
//! multicast discovery. Prints numbers; asserts nothing. Needs root (for the namespaces);
//! without it, it says so and exits 0.
//!
//! `cargo bench -p canopy --bench cluster` (or `just bench-cluster`). Environment:
//! - `CANOPY_BENCH_REPS` (default 5): repetitions of every measurement (median and max are
//!   reported; a repetition that timed out is counted apart, not in the statistics).
//!
//! Measured (every repetition on fresh namespaces, data dirs and discovery namespace; the
//! scripted engine except for the last item):
//! - **formation** of 2 and of 3 nodes: every node is spawned at once; the time from the
//!   first spawn until every node's `/state` lists all nodes and all name one master
//!   (process start, discovery, connection, election). The 3-node clusters of the next three
//!   items are formed the same way, and their formation times are counted too;
//! - **peer failure, kill -9**: in a formed 3-node cluster, one node that is not the master
//!   gets SIGKILL; the time until both survivors list 2 nodes (its TCP sessions close at once);
//! - **peer failure, SIGSTOP**: the same with SIGSTOP: the frozen node's connections stay
//!   open, so only the heartbeats' silence reveals it (then it is SIGKILLed);
//! - **master failover**: the master gets SIGKILL; the time until both survivors name the
//!   same new master;
//! - **cross-node request vs local**, with the real default model: nodes A and B
//!   (`--threads 2`), one instance placed on B only (`POST /instances` with B's id). The same
//!   greedy streaming chat request (fixed prompt, `max_tokens` 128) goes alternately to B's
//!   own API (local) and to A's (routed to B over the cluster), after one unmeasured request
//!   each. TTFT = request sent -> first non-empty `delta.content`; decode tokens/s = (n - 1) /
//!   (last - first) over the n non-empty content chunks.
//!
//! Times are observed by polling `/state` every 20 ms (HTTP from this process, through each
//! node's namespace), so they include up to one poll interval plus the poll's own latency.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::netns::{NodeCluster, NsNode, formed, state};
use common::tail;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

/// How often the cluster's state is polled.
const POLL: Duration = Duration::from_millis(20);
/// The longest any one observed transition may take before the repetition is given up.
const LIMIT: Duration = Duration::from_secs(30);
/// The real model of the cross-node measurement.
const MODEL: &str = "smollm2-135m-instruct";
/// The prompt of the cross-node measurement.
const PROMPT: &str = "Write a short story about a lighthouse keeper.";
/// `max_tokens` of the cross-node measurement.
const MAX_TOKENS: u64 = 128;

/// `CANOPY_BENCH_REPS`, default 5 (at least 1).
fn reps() -> usize {
    std::env::var("CANOPY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1)
}

/// The nodes of one repetition: a [`NodeCluster`] whose discovery namespace is unique to it
/// (so beacons of earlier repetitions never meet this one's).
struct Cluster(NodeCluster);

impl Cluster {
    /// A fresh fabric of `n` nodes (needs root: `main` checks first).
    fn new(n: usize) -> Self {
        Cluster(NodeCluster::new(n, "bench"))
    }

    /// Spawns every node at once and waits until they form: the nodes and the formation
    /// time from the first spawn (`None` when they did not form within [`LIMIT`]).
    fn form(&self, extra: &[&str]) -> (Vec<NsNode>, Option<Duration>) {
        let t = Instant::now();
        let nodes: Vec<NsNode> = (0..self.0.fabric.nodes())
            .map(|i| self.0.spawn(i, extra))
            .collect();
        let all: Vec<&NsNode> = nodes.iter().collect();
        let formed = wait(t, "formation", &all, || formed(&all));
        (nodes, formed)
    }
}

/// The node ids a state lists (itself included).
fn listed(state: &Value) -> BTreeSet<String> {
    state["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n["id"].as_str().map(str::to_string))
        .collect()
}

/// The master a state names.
fn master_of(state: &Value) -> Option<String> {
    state["master"].as_str().map(str::to_string)
}

/// Polls `ok` every [`POLL`] until it holds: the time since `since`, or `None` (after
/// printing `what` and the tails of the nodes' logs) when [`LIMIT`] passes first.
fn wait(
    since: Instant,
    what: &str,
    nodes: &[&NsNode],
    mut ok: impl FnMut() -> bool,
) -> Option<Duration> {
    loop {
        if ok() {
            return Some(since.elapsed());
        }
        if since.elapsed() > LIMIT {
            eprintln!("timed out after {LIMIT:?} waiting for {what}");
            for n in nodes {
                eprintln!("--- node {}:\n{}", n.index(), tail(&n.log_text(), 30));
            }
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// The samples of one measured quantity, with the repetitions that timed out.
#[derive(Default)]
struct Samples {
    /// The measured values.
    values: Vec<f64>,
    /// Repetitions that produced no value.
    failed: usize,
}

impl Samples {
    /// Adds a time in milliseconds, or a failure.
    fn time(&mut self, d: Option<Duration>) {
        match d {
            Some(d) => self.values.push(d.as_secs_f64() * 1e3),
            None => self.failed += 1,
        }
    }

    /// The median (mean of the middle two for an even count).
    fn median(&self) -> f64 {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// The largest value.
    fn max(&self) -> f64 {
        self.values.iter().copied().fold(f64::NAN, f64::max)
    }

    /// The smallest value.
    fn min(&self) -> f64 {
        self.values.iter().copied().fold(f64::NAN, f64::min)
    }
}

/// What the three-node failure scenarios do to a formed cluster.
#[derive(Clone, Copy)]
enum Failure {
    /// SIGKILL a node that is not the master; wait for both survivors to list 2 nodes.
    KillPeer,
    /// SIGSTOP a node that is not the master; wait for both survivors to list 2 nodes.
    StopPeer,
    /// SIGKILL the master; wait for both survivors to name one new master.
    KillMaster,
}

/// Forms a 3-node cluster (its formation time goes to `formation`) and measures `failure`
/// on it: the time from the signal to the survivors' agreement.
fn failure_rep(failure: Failure, formation: &mut Samples) -> Option<Duration> {
    let cluster = Cluster::new(3);
    let scripted = ["--engine", "scripted"];
    let (mut nodes, formed) = cluster.form(&scripted);
    formation.time(formed);
    formed?;
    let states: Vec<Value> = nodes.iter().map(state).collect();
    let master = master_of(&states[0])?;
    let ids: Vec<String> = states
        .iter()
        .map(|s| s["node"].as_str().unwrap_or_default().to_string())
        .collect();
    let master_index = ids.iter().position(|id| *id == master)?;
    let victim = match failure {
        Failure::KillMaster => master_index,
        Failure::KillPeer | Failure::StopPeer => (master_index + 1) % 3,
    };
    let signal = match failure {
        Failure::StopPeer => Signal::SIGSTOP,
        Failure::KillPeer | Failure::KillMaster => Signal::SIGKILL,
    };
    let survivors: Vec<&NsNode> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, n)| n)
        .collect();
    let gone = ids[victim].clone();
    let t = Instant::now();
    nodes[victim].signal(signal).ok()?;
    let took = match failure {
        Failure::KillPeer | Failure::StopPeer => {
            wait(t, "the survivors to drop the peer", &survivors, || {
                survivors.iter().all(|n| {
                    let l = listed(&state(n));
                    l.len() == 2 && !l.contains(&gone)
                })
            })
        }
        Failure::KillMaster => wait(t, "a new master", &survivors, || {
            let masters: BTreeSet<Option<String>> =
                survivors.iter().map(|n| master_of(&state(n))).collect();
            masters.len() == 1
                && masters
                    .first()
                    .is_some_and(|m| m.as_ref().is_some_and(|m| *m != gone))
        }),
    };
    nodes[victim].kill();
    took
}

/// One streamed chat request's timings.
struct Stream {
    /// Request sent -> first non-empty content chunk.
    ttft: Option<Duration>,
    /// (n - 1) / (last - first) over the n non-empty content chunks.
    rate: Option<f64>,
    /// Non-empty content chunks.
    chunks: usize,
    /// The generated text.
    text: String,
    /// The HTTP status.
    status: u16,
}

/// The streaming chat request of the cross-node measurement.
fn chat_request() -> Value {
    json!({
        "model": MODEL,
        "stream": true,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "messages": [{ "role": "user", "content": PROMPT }],
    })
}

/// Sends the chat request to `node` and times its content chunks.
fn stream(node: &NsNode) -> Stream {
    let body = chat_request();
    let mut first = None;
    let mut last = None;
    let mut chunks = 0;
    let mut text = String::new();
    let start = Instant::now();
    let status = node.stream(&body, |data, at| {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        if let Some(piece) = v["choices"][0]["delta"]["content"].as_str()
            && !piece.is_empty()
        {
            first.get_or_insert(at);
            last = Some(at);
            chunks += 1;
            text.push_str(piece);
        }
    });
    let rate = match (first, last) {
        (Some(f), Some(l)) if chunks >= 2 && l > f => {
            Some((chunks - 1) as f64 / (l - f).as_secs_f64())
        }
        _ => None,
    };
    Stream {
        ttft: first.map(|f| f - start),
        rate,
        chunks,
        text,
        status,
    }
}

/// The cross-node measurement's results.
#[derive(Default)]
struct CrossNode {
    /// TTFT through B's own API, ms.
    local_ttft: Samples,
    /// TTFT through A's API (routed to B), ms.
    cross_ttft: Samples,
    /// Decode tokens/s through B's own API.
    local_rate: Samples,
    /// Decode tokens/s through A's API.
    cross_rate: Samples,
    /// Placement on B answered (201) after this long, ms.
    placement: Samples,
    /// Content chunks of the first measured local and cross answers.
    chunks: (usize, usize),
    /// Whether every answer had the same text.
    same_text: bool,
    /// Why the measurement did not run, if it did not.
    skipped: Option<String>,
}

/// Runs the cross-node measurement: `reps` requests each way, alternating.
fn cross_node(reps: usize) -> CrossNode {
    let mut out = CrossNode {
        same_text: true,
        ..CrossNode::default()
    };
    let model_file = common::model_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model_file.exists() {
        out.skipped = Some(format!(
            "{} is missing (run `cargo test -p canopy --test e2e node_model::` once)",
            model_file.display()
        ));
        return out;
    }
    let cluster = Cluster::new(2);
    let models = common::model_dir().display().to_string();
    let extra = ["--threads", "2", "--model-dir", &models];
    let (mut nodes, formed) = cluster.form(&extra);
    if formed.is_none() {
        out.skipped = Some("the 2 nodes did not form".into());
        return out;
    }
    for n in &mut nodes {
        n.set_timeout(Duration::from_secs(300));
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    let b_id = state(b)["node"].as_str().unwrap_or_default().to_string();
    let t = Instant::now();
    let (status, body) = a.post("/instances", &json!({ "model": MODEL, "node": b_id }));
    if status != 201 {
        out.skipped = Some(format!("placement on B answered {status}: {body}"));
        return out;
    }
    out.placement.time(Some(t.elapsed()));
    let ready = wait(
        Instant::now(),
        "A to know the model is ready",
        &[a, b],
        || a.get("/ready").is_ok_and(|(s, _)| s == 200),
    );
    if ready.is_none() {
        out.skipped = Some("A never became ready".into());
        return out;
    }
    // One unmeasured request each way warms both paths.
    let warm_local = stream(b);
    let warm_cross = stream(a);
    if warm_local.status != 200 || warm_cross.status != 200 {
        out.skipped = Some(format!(
            "warm-up answered {} (local) / {} (cross)",
            warm_local.status, warm_cross.status
        ));
        return out;
    }
    let reference = warm_local.text;
    for rep in 0..reps {
        for (node, ttft, rate, cross) in [
            (b, &mut out.local_ttft, &mut out.local_rate, false),
            (a, &mut out.cross_ttft, &mut out.cross_rate, true),
        ] {
            let s = stream(node);
            if s.status != 200 {
                eprintln!(
                    "a {} request answered {}",
                    if cross { "cross" } else { "local" },
                    s.status
                );
            }
            ttft.time(s.ttft);
            match s.rate {
                Some(r) => rate.values.push(r),
                None => rate.failed += 1,
            }
            if s.text != reference {
                out.same_text = false;
            }
            if rep == 0 {
                if cross {
                    out.chunks.1 = s.chunks;
                } else {
                    out.chunks.0 = s.chunks;
                }
            }
        }
    }
    out
}

/// Formats a number of milliseconds (or tokens/s), `-` when there is none.
fn num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{v:.1}")
    }
}

/// Prints one row of the table.
fn row(name: &str, unit: &str, s: &Samples) {
    let failed = if s.failed > 0 {
        format!("{} timed out", s.failed)
    } else {
        String::new()
    };
    println!(
        "{:<46} {:>5} {:>3} {:>9} {:>9} {:>9}  {}",
        name,
        unit,
        s.values.len(),
        num(s.median()),
        num(s.min()),
        num(s.max()),
        failed
    );
}

/// Prints every value of `s`, in the order measured.
fn values(name: &str, s: &Samples) {
    let all: Vec<String> = s.values.iter().map(|v| format!("{v:.0}")).collect();
    println!("  {name}: {}", all.join(" "));
}

/// Runs every measurement and prints the table.
fn main() {
    let reps = reps();
    let began = Instant::now();
    // Probe for root (and namespace support) once, before anything else.
    if let Err(why) = common::netns::Fabric::available() {
        println!("skipping: {why}");
        return;
    }

    let scripted = ["--engine", "scripted"];
    let mut form2 = Samples::default();
    let mut form3 = Samples::default();
    for _ in 0..reps {
        form2.time(Cluster::new(2).form(&scripted).1);
    }
    eprintln!("formation of 2 nodes: done ({:.0?})", began.elapsed());
    let mut kill_peer = Samples::default();
    let mut stop_peer = Samples::default();
    let mut failover = Samples::default();
    for _ in 0..reps {
        kill_peer.time(failure_rep(Failure::KillPeer, &mut form3));
        stop_peer.time(failure_rep(Failure::StopPeer, &mut form3));
        failover.time(failure_rep(Failure::KillMaster, &mut form3));
    }
    eprintln!("failure scenarios: done ({:.0?})", began.elapsed());
    let cross = cross_node(reps);
    eprintln!("cross-node requests: done ({:.0?})", began.elapsed());

    println!();
    println!(
        "cluster benchmark: real `canopy node` processes in network namespaces, {reps} repetitions"
    );
    println!(
        "machine: {} CPUs (nproc); state polled every {} ms",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        POLL.as_millis()
    );
    println!();
    println!(
        "{:<46} {:>5} {:>3} {:>9} {:>9} {:>9}",
        "measurement", "unit", "n", "median", "min", "max"
    );
    row("formation, 2 nodes (spawn -> agreed)", "ms", &form2);
    row("formation, 3 nodes (spawn -> agreed)", "ms", &form3);
    row(
        "peer failure kill -9 -> both survivors see 2",
        "ms",
        &kill_peer,
    );
    row(
        "peer failure SIGSTOP -> both survivors see 2",
        "ms",
        &stop_peer,
    );
    row(
        "master kill -9 -> survivors agree on new one",
        "ms",
        &failover,
    );
    match &cross.skipped {
        Some(why) => println!("cross-node vs local request: skipped: {why}"),
        None => {
            row(
                "placement of the model on B (POST -> 201)",
                "ms",
                &cross.placement,
            );
            row("TTFT, local (B's own API)", "ms", &cross.local_ttft);
            row("TTFT, cross-node (A's API -> B)", "ms", &cross.cross_ttft);
            row("decode, local (B's own API)", "tok/s", &cross.local_rate);
            row(
                "decode, cross-node (A's API -> B)",
                "tok/s",
                &cross.cross_rate,
            );
            println!(
                "cross / local (medians): TTFT {:.2}x (+{} ms), decode tokens/s {:.2}x",
                cross.cross_ttft.median() / cross.local_ttft.median(),
                num(cross.cross_ttft.median() - cross.local_ttft.median()),
                cross.cross_rate.median() / cross.local_rate.median()
            );
            println!(
                "model {MODEL}, --threads 2, max_tokens {MAX_TOKENS}, temperature 0; \
                 content chunks local {} / cross {}; same text every time: {}",
                cross.chunks.0,
                cross.chunks.1,
                if cross.same_text { "yes" } else { "NO" }
            );
        }
    }
    println!();
    println!("every sample, in the order measured (ms):");
    values("formation, 2 nodes", &form2);
    values("formation, 3 nodes", &form3);
    values("kill -9 detection", &kill_peer);
    values("SIGSTOP detection", &stop_peer);
    values("master failover", &failover);
    println!();
    println!("total {:.1} s", began.elapsed().as_secs_f64());
}
