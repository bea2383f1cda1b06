//! Shared harness of the end-to-end tests: start a real `canopy` process, talk HTTP to it,
//! stop it, and check that nothing it started is left behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

/// A free loopback port (bound and released; good enough on a test machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `n` free consecutive loopback ports; returns the first.
pub fn free_run(n: u16) -> u16 {
    loop {
        let p = free_port();
        if p < 65000 && (1..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", p + i)).is_ok()) {
            return p;
        }
    }
}

/// Whether `pid` is a live process (zombies count as dead).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits up to `limit` for `pid` to be gone.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    eventually(limit, "the process to end", || !alive(pid)).is_ok()
}

/// The shared model cache of the test suite (downloaded once per machine by the first test
/// that needs it; `CANOPY_MODEL_DIR` overrides it).
pub fn model_dir() -> PathBuf {
    std::env::var_os("CANOPY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs_cache().join("canopy").join("models"))
}

fn dirs_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Collects `child`'s piped stdout and stderr, line by line, into one shared log (read it
/// while the child runs or after it ends).
pub fn capture_output(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let streams = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for stream in streams.into_iter().flatten() {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
    }
    log
}

/// A running `canopy` node process.
pub struct NodeProcess {
    pub child: Option<Child>,
    pub base: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl NodeProcess {
    /// Starts `canopy <args>` on a free port with `env`, and waits until `/ready` answers 200
    /// (or `/health` when `wait_ready` is false).
    pub fn start(args: &[&str], env: &[(&str, &str)], wait_ready: bool) -> Self {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy"));
        cmd.args(args)
            .args(["--port", &port.to_string(), "--host", "127.0.0.1"])
            .env("CANOPY_MODEL_DIR", model_dir())
            .env("CANOPY_LOG", "info")
            .env("CANOPY_STANDALONE", "true")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("canopy starts");
        let log = capture_output(&mut child);
        let mut node = Self {
            child: Some(child),
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let path = if wait_ready { "/ready" } else { "/health" };
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Ok((200, _)) = node.get(path) {
                return node;
            }
            if let Some(status) = node.exited() {
                panic!("canopy exited early ({status}); log:\n{}", node.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "node not ready in time; log:\n{}",
                node.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// How the node exited, if it has (reaping it).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .into()
    }

    /// A client of the node at `base` that this test did not start (nothing to kill or read).
    pub fn client(base: String) -> Self {
        Self {
            child: None,
            base,
            log: std::sync::Arc::default(),
        }
    }

    /// GET `path`: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String), ureq::Error> {
        let mut r = Self::agent().get(format!("{}{path}", self.base)).call()?;
        let status = r.status().as_u16();
        Ok((status, r.body_mut().read_to_string().unwrap_or_default()))
    }

    /// POST a raw body to `path`: (status, body).
    pub fn post_raw(&self, path: &str, body: &[u8]) -> (u16, String) {
        let mut r = Self::agent()
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/json")
            .send(body)
            .expect("request sent");
        let status = r.status().as_u16();
        (status, r.body_mut().read_to_string().unwrap_or_default())
    }

    /// POST JSON: (status, parsed body).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post_raw(path, body.to_string().as_bytes());
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// POST a streaming chat request; calls `on_event` with each SSE `data:` payload and the
    /// instant it arrived. Returns the status.
    pub fn stream(&self, body: &Value, mut on_event: impl FnMut(&str, Instant)) -> u16 {
        let r = Self::agent()
            .post(format!("{}/v1/chat/completions", self.base))
            .send_json(body)
            .expect("request sent");
        let status = r.status().as_u16();
        let reader = BufReader::new(r.into_body().into_reader());
        for line in reader.lines().map_while(Result::ok) {
            if let Some(data) = line.strip_prefix("data: ") {
                on_event(data, Instant::now());
            }
        }
        status
    }

    /// The runner pids the node's actor tree reports.
    pub fn runner_pids(&self) -> Vec<u32> {
        let (_, body) = self.get("/v1/actors").expect("actors");
        let tree: Value = serde_json::from_str(&body).expect("json tree");
        let mut pids = Vec::new();
        collect_pids(&tree, &mut pids);
        pids
    }

    /// Sends SIGINT and waits for a clean exit; asserts exit code 0 and no runner left.
    pub fn interrupt_and_check(mut self) {
        let runners = self.runner_pids();
        let mut child = self.child.take().expect("child");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT");
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "canopy did not exit after SIGINT"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "exit status {status}; log:\n{}",
            self.log_text()
        );
        for pid in runners {
            assert!(
                wait_gone(pid, Duration::from_secs(5)),
                "runner {pid} left behind"
            );
        }
    }
}

fn collect_pids(actor: &Value, out: &mut Vec<u32>) {
    if actor["kind"] == "process"
        && let Some(pid) = actor["details"]["pid"].as_u64()
    {
        out.push(pid as u32);
    }
    if let Some(children) = actor["children"].as_array() {
        for c in children {
            collect_pids(c, out);
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Child::kill is a no-op for a child already reaped, so a recycled pid is never
            // signalled.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The live processes whose environment holds `key=value` (zombies excluded). Start a node
/// with a unique tag in its environment: its runners inherit it, so this finds every process
/// the node started, even after they were reparented.
pub fn processes_with_env(key: &str, value: &str) -> Vec<u32> {
    let needle = format!("{key}={value}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|environ| {
                environ
                    .split(|&b| b == 0)
                    .any(|var| var == needle.as_bytes())
            })
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// A tag unique to this test process and call, for [`processes_with_env`].
pub fn unique_tag(what: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
pub mod netns;

/// Polls `ok` every 50 ms until it holds: how long that took, or (after `limit`) an error
/// saying what was awaited, for the caller to add its logs to. The one waiting loop of the
/// tests, with [`eventually_some`].
pub fn eventually(
    limit: Duration,
    what: &str,
    mut ok: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    eventually_some(limit, what, || ok().then_some(())).map(|()| start.elapsed())
}

/// Polls `probe` every 50 ms until it gives a value, or (after `limit`) an error saying what
/// was awaited.
pub fn eventually_some<T>(
    limit: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if start.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// [`eventually_some`] for async probes (tokio tests): polls `probe` every 20 ms until it gives
/// a value, or (after `limit`) an error saying what was awaited.
pub async fn eventually_async<T>(
    limit: Duration,
    what: &str,
    mut probe: impl AsyncFnMut() -> Option<T>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if start.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `ok` every 50 ms for `limit`, panicking with its reason the first time it fails.
pub fn holds_for(limit: Duration, mut ok: impl FnMut() -> Result<(), String>) {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Err(why) = ok() {
            panic!("{why}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The sum of every sample of metric `name` (all label sets) in Prometheus text; 0 when the
/// metric is absent. `name` is the whole name (`canopy_runner_restarts_total`), not a prefix;
/// with labels (`canopy_discovery_beacons_total{outcome="stale"}`) it is that one series.
pub fn metric(text: &str, name: &str) -> f64 {
    let labelled = name.contains('{');
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || (!labelled && rest.starts_with('{')))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A chat completion request: one user message `content` to `model`.
pub fn chat_body(model: &str, content: &str, max_tokens: u32, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{ "role": "user", "content": content }],
        "max_tokens": max_tokens,
        "stream": stream,
    })
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The default model's id in the API.
pub const MODEL: &str = "smollm2-135m-instruct";

/// The `openai` client the Python tests install.
pub const OPENAI_REQUIREMENT: &str = "openai>=1.40,<4";

/// Serialises the tests that decode with the real model: two models decoding at once on a
/// small machine only slow each other down.
static REAL_MODEL: Mutex<()> = Mutex::new(());

/// This test's turn with the real model (held until the guard drops).
pub fn real_model_turn() -> std::sync::MutexGuard<'static, ()> {
    REAL_MODEL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serialises the creation of the Python venvs (two tests may want the same one).
static VENVS: Mutex<()> = Mutex::new(());

/// A Python with `requirement` (a pip requirement, pinned) installed, in a venv under
/// `target/<name>`, made on first use (`python3 -m venv`, then `pip install`); `None`, with
/// the reason printed, when there is no `python3` or pip cannot reach the package index.
/// A venv whose install completed is reused as long as the requirement is the same.
pub fn python_venv(name: &str, requirement: &str) -> Option<PathBuf> {
    let _venvs = VENVS.lock().unwrap_or_else(|e| e.into_inner());
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .to_path_buf();
    let venv = target.join(name);
    let python = venv.join("bin").join("python");
    let marker = venv.join(".canopy-installed");
    if std::fs::read_to_string(&marker).is_ok_and(|r| r == requirement) {
        return Some(python);
    }
    let _ = std::fs::remove_dir_all(&venv);
    let created = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output();
    match created {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "SKIPPED: `python3 -m venv` failed, so {requirement} cannot be installed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Err(err) => {
            eprintln!("SKIPPED: no python3 ({err}), so {requirement} cannot be run");
            return None;
        }
    }
    let mut pip = Command::new(&python);
    pip.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        requirement,
    ]);
    let offline = [
        "NewConnectionError",
        "Network is unreachable",
        "Temporary failure in name resolution",
        "Failed to establish a new connection",
        "ConnectTimeout",
        "ProxyError",
        "No matching distribution found",
    ];
    install(pip, requirement, &offline, &marker).then_some(python)
}

/// Runs the `install` command of `spec`: true once it succeeded (and `marker` records the
/// spec); false, with the reason printed, when it failed for one of the `offline` reasons
/// (the registry cannot be reached); a panic with its output on any other failure.
fn install(mut install: Command, spec: &str, offline: &[&str], marker: &Path) -> bool {
    let t = Instant::now();
    let out = install.output().expect("the installer runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let offline = offline.iter().any(|s| log.contains(s));
        assert!(offline, "installing {spec} failed:\n{log}");
        eprintln!("SKIPPED: the registry cannot be reached to install {spec}:\n{log}");
        return false;
    }
    eprintln!("installed {spec} in {:?}", t.elapsed());
    std::fs::write(marker, spec).expect("marker");
    true
}

/// A Node.js package `spec` (`name@version`, pinned) installed with npm under
/// `target/<dir>` (its `node_modules`), made on first use; `None`, with the reason printed,
/// when there is no `node`/`npm` or npm cannot reach the registry. An install that completed
/// is reused as long as the spec is the same.
pub fn node_package(dir: &str, spec: &str) -> Option<PathBuf> {
    let _installs = VENVS.lock().unwrap_or_else(|e| e.into_inner());
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .to_path_buf();
    let prefix = target.join(dir);
    let marker = prefix.join(".canopy-installed");
    if std::fs::read_to_string(&marker).is_ok_and(|r| r == spec) {
        return Some(prefix);
    }
    for tool in ["node", "npm"] {
        if let Err(err) = Command::new(tool).arg("--version").output() {
            eprintln!("SKIPPED: no {tool} ({err}), so {spec} cannot be run");
            return None;
        }
    }
    let _ = std::fs::remove_dir_all(&prefix);
    std::fs::create_dir_all(&prefix).expect("the package directory");
    let mut npm = Command::new("npm");
    npm.args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
        .arg(&prefix)
        .arg(spec);
    let offline = [
        "ENOTFOUND",
        "EAI_AGAIN",
        "ECONNREFUSED",
        "ETIMEDOUT",
        "ENETUNREACH",
    ];
    install(npm, spec, &offline, &marker).then_some(prefix)
}

/// Runs the script `tests/node/<script>` with `node` and `args`, its packages from
/// `prefix` (see [`node_package`]); as [`run_python_checks`].
pub fn run_node_checks(
    prefix: &Path,
    script: &str,
    args: &[&str],
    limit: Duration,
    node: &NodeProcess,
) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/node")
        .join(script);
    let mut command = Command::new("node");
    command
        .env("NODE_PATH", prefix.join("node_modules"))
        .arg(&path);
    run_checks(command, script, args, limit, node);
}

/// Runs the script `tests/python/<script>` with `python` and `args`, killing it after
/// `limit`; panics with its output and the node's log unless it exits 0 and prints
/// `every check passed`.
pub fn run_python_checks(
    python: &Path,
    script: &str,
    args: &[&str],
    limit: Duration,
    node: &NodeProcess,
) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/python")
        .join(script);
    let mut command = Command::new(python);
    command.arg(&path);
    run_checks(command, script, args, limit, node);
}

/// Runs `command` (a checks script) with `args` as [`run_python_checks`] describes.
fn run_checks(
    mut command: Command,
    script: &str,
    args: &[&str],
    limit: Duration,
    node: &NodeProcess,
) {
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the script starts");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("the script's output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "{script} failed ({}); node log:\n{}",
        out.status,
        node.log_text()
    );
    assert!(stdout.contains("every check passed"), "{stdout}");
}

/// `canopy up --nodes N --engine scripted --model scripted` on free loopback ports: node 0
/// hosts the instance, the others route to it. Killed (with its runners, through the node's
/// death signal) when dropped, unless [`LocalCluster::stop`] stopped it first.
pub struct LocalCluster {
    child: Option<std::process::Child>,
    api: u16,
    tag: String,
    _dir: tempfile::TempDir,
}

impl LocalCluster {
    /// Starts `nodes` nodes with `env`, and waits until the last one is ready.
    pub fn start(nodes: u16, env: &[(&str, &str)]) -> Self {
        let (api, cluster) = (free_run(nodes), free_run(nodes));
        let dir = tempfile::tempdir().expect("tempdir");
        let tag = unique_tag("local-cluster");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy"));
        cmd.args(["up", "--nodes", &nodes.to_string()])
            .args(["--engine", "scripted", "--model", "scripted"])
            .args([
                "--port",
                &api.to_string(),
                "--cluster-port",
                &cluster.to_string(),
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env("CANOPY_TEST_TAG", &tag)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let cluster = Self {
            child: Some(cmd.spawn().expect("canopy up starts")),
            api,
            tag,
            _dir: dir,
        };
        let last = cluster.base(nodes - 1);
        let agent = NodeProcess::agent();
        eventually(Duration::from_secs(60), "the last node to be ready", || {
            agent
                .get(format!("{last}/ready"))
                .call()
                .is_ok_and(|r| r.status() == 200)
        })
        .expect("the local cluster ready");
        cluster
    }

    /// Node `i`'s API URL.
    pub fn base(&self, i: u16) -> String {
        format!("http://127.0.0.1:{}", self.api + i)
    }

    /// The pids of its processes (nodes and runners) now.
    pub fn processes(&self) -> Vec<u32> {
        processes_with_env("CANOPY_TEST_TAG", &self.tag)
    }

    /// Ctrl-C: asserts that `canopy up` exits 0 and every node and runner is gone within 30 s.
    pub fn stop(mut self) {
        let processes = self.processes();
        if let Some(mut child) = self.child.take() {
            kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).expect("SIGINT");
            let status = eventually_some(Duration::from_secs(60), "canopy up to exit", || {
                child.try_wait().expect("wait")
            })
            .expect("canopy up exits");
            assert!(status.success(), "{status}");
        }
        for pid in processes {
            assert!(wait_gone(pid, Duration::from_secs(30)), "{pid} left behind");
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
