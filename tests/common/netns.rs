//! A network-namespace test fabric for multi-node end-to-end tests.
//!
//! A [`Fabric`] of `n` nodes is `n + 1` network namespaces: one "switch" namespace holding a
//! Linux bridge `br0` (multicast snooping off, so multicast is flooded like broadcast), and
//! one namespace per node with `lo` up and a veth `eth0` at `10.213.0.(i+1)/24`, whose peer
//! `v{i}` is a port of the bridge. That is all: no default route and no other route than the
//! kernel's connected `10.213.0.0/24`, so the nodes reach each other and nothing else (no
//! internet). Nothing is added to the root namespace (no interface, address or route), and
//! names are unique per fabric (`cnpy{pid}x{counter}-s`, `cnpy{pid}x{counter}-n{i}`), so
//! fabrics run concurrently in one test process and across processes.
//!
//! Because each node has its own namespace, every node may listen on the same port.
//!
//! The test process stays in the root namespace. It starts programs inside a node with
//! [`Fabric::command`] (`ip netns exec`, which execs: the child's pid is the program's pid)
//! and opens sockets inside a node with [`Fabric::in_ns`] / [`in_netns`] (a fresh thread that
//! `setns(2)`s into the namespace; a socket belongs to the namespace it was created in, even
//! after that thread is gone). [`NsNode`] is a `canopy` process inside a node, with HTTP
//! helpers that go through its namespace.
//!
//! [`Fabric::cut`] / [`Fabric::heal`] take the switch-side veth of a node down / up: a
//! partition of that node from every other one (its own loopback traffic, and so its own API
//! as seen through [`NsNode`], keeps working).
//!
//! Dropping a [`Fabric`] SIGKILLs every process still inside its namespaces (a node's runners
//! included, even when reparented) and deletes the namespaces; the veths and the bridge go with
//! them. The first fabric of a test process also removes namespaces left by earlier test
//! processes that died without cleaning up (named after a pid that is no longer alive).
//!
//! Everything needs root; [`Fabric::new`] returns `None` (and says "skipping") without it.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use super::{alive, model_dir};

/// The first three octets of every fabric's node addresses (`10.213.0.0/24`).
pub const SUBNET: [u8; 3] = [10, 213, 0];

/// The prefix of every namespace a fabric creates (`cnpy{pid}x{counter}-...`).
pub const NETNS_PREFIX: &str = "cnpy";

/// Where `ip netns` keeps its named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The HTTP timeout of [`NsNode`] requests unless [`NsNode::set_timeout`] changes it.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(60);

/// A switch namespace with a bridge and `n` node namespaces wired to it (see the module docs).
pub struct Fabric {
    /// `cnpy{pid}x{counter}-`: every namespace of this fabric starts with it.
    prefix: String,
    /// The switch namespace (holds `br0` and the `v{i}` ports).
    switch: String,
    /// The node namespaces, by index.
    nodes: Vec<String>,
    /// Every namespace created so far (what `Drop` removes).
    created: Vec<String>,
}

impl Fabric {
    /// Creates a fabric of `nodes` nodes (1 to 253).
    ///
    /// # Panics
    ///
    /// When `nodes` is out of range, when the process is not root (tests that need a fabric
    /// are ignored, with that reason, in a build that is not root: see `tests/main.rs`), or
    /// when the namespaces cannot be made or wired (no `ip`, no veth or bridge support: a
    /// broken environment that a test should not hide). What was created is removed first.
    pub fn new(nodes: usize) -> Fabric {
        assert!(
            (1..=253).contains(&nodes),
            "a fabric has 1 to 253 nodes, not {nodes}"
        );
        if let Err(why) = Fabric::available() {
            panic!("{why}");
        }
        static REAP: Once = Once::new();
        REAP.call_once(reap_stale_namespaces);

        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "{NETNS_PREFIX}{}x{}-",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut fabric = Fabric {
            switch: format!("{prefix}s"),
            nodes: (0..nodes).map(|i| format!("{prefix}n{i}")).collect(),
            prefix,
            created: Vec::new(),
        };
        let names: Vec<String> = std::iter::once(fabric.switch.clone())
            .chain(fabric.nodes.iter().cloned())
            .collect();
        for name in names {
            if let Err(e) = run_ip(&["netns", "add", &name], None) {
                drop(fabric); // removes those already created
                panic!("cannot create network namespace {name}: {e}");
            }
            fabric.created.push(name);
        }
        if let Err(e) = fabric.wire() {
            drop(fabric); // removes the namespaces
            panic!("cannot wire the network namespaces (veth/bridge): {e}");
        }
        fabric
    }

    /// Whether this process can make fabrics: `Err` says why not (it is not root).
    pub fn available() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if euid == 0 {
            Ok(())
        } else {
            Err(format!("network-namespace tests need root (euid {euid})"))
        }
    }

    /// Creates the bridge, the veth pairs and the addresses.
    fn wire(&self) -> Result<(), String> {
        let mut switch = String::from(
            "link add br0 type bridge mcast_snooping 0\n\
             link set br0 up\n",
        );
        for (i, ns) in self.nodes.iter().enumerate() {
            switch.push_str(&format!(
                "link add v{i} type veth peer name eth0 netns {ns}\n\
                 link set v{i} master br0\n\
                 link set v{i} up\n"
            ));
        }
        run_ip(&["-n", &self.switch, "-batch", "-"], Some(&switch))?;
        for (i, ns) in self.nodes.iter().enumerate() {
            let node = format!(
                "link set lo up\n\
                 addr add {}/24 dev eth0\n\
                 link set eth0 up\n",
                self.addr(i)
            );
            run_ip(&["-n", ns, "-batch", "-"], Some(&node))?;
        }
        Ok(())
    }

    /// How many nodes the fabric has.
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }

    /// The namespace name of node `i`.
    pub fn ns(&self, i: usize) -> &str {
        &self.nodes[i]
    }

    /// The namespace name of the switch.
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// The prefix every namespace of this fabric starts with (for [`leftover_namespaces`]).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The address of node `i`: `10.213.0.(i+1)`.
    pub fn addr(&self, i: usize) -> Ipv4Addr {
        assert!(
            i < self.nodes.len(),
            "node {i} of a {}-node fabric",
            self.nodes.len()
        );
        node_addr(i)
    }

    /// A command that runs `program` inside node `i`'s namespace (`ip netns exec <ns>
    /// <program>`; `ip` execs it, so the child's pid is the program's pid and signals sent to
    /// it reach the program). Add arguments, environment and stdio as usual.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns(i)]).arg(program);
        cmd
    }

    /// Runs `f` on a fresh thread inside node `i`'s namespace and returns its result; sockets
    /// that `f` opens belong to that namespace (and stay there after `f` returns).
    ///
    /// # Panics
    ///
    /// When the thread cannot enter the namespace, or when `f` panics (with `f`'s payload).
    pub fn in_ns<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> T {
        in_netns(self.ns(i), f).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The live processes inside node `i`'s namespace.
    pub fn pids(&self, i: usize) -> Vec<u32> {
        pids_in_netns(self.ns(i))
    }

    /// Partitions node `i` from every other node: its switch port `v{i}` goes down.
    ///
    /// # Panics
    ///
    /// When `ip` fails.
    pub fn cut(&self, i: usize) {
        self.set_port(i, "down");
    }

    /// Undoes [`Fabric::cut`]: the switch port `v{i}` goes up again (forwarding at once: the
    /// bridge runs no STP), and node `i`'s neighbour (ARP) cache is flushed, so that an entry
    /// left unresolved by an attempt during the cut does not delay traffic until the kernel's
    /// next 1 s probe. (Segments sent during the cut are lost as on a real network: a TCP
    /// connection recovers on its own retransmit timer.)
    ///
    /// # Panics
    ///
    /// When `ip` fails.
    pub fn heal(&self, i: usize) {
        self.set_port(i, "up");
        let ns = self.ns(i);
        if let Err(e) = run_ip(&["-n", ns, "neigh", "flush", "dev", "eth0"], None) {
            panic!("flushing the neighbour cache of {ns}: {e}");
        }
    }

    fn set_port(&self, i: usize, state: &str) {
        assert!(
            i < self.nodes.len(),
            "node {i} of a {}-node fabric",
            self.nodes.len()
        );
        let port = format!("v{i}");
        if let Err(e) = run_ip(&["-n", &self.switch, "link", "set", &port, state], None) {
            panic!("setting {port} {state} in {}: {e}", self.switch);
        }
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        for ns in &self.created {
            kill_all_in_netns(ns);
        }
        delete_namespaces(&self.created);
    }
}

/// The address of node `i` of any fabric: `10.213.0.(i+1)`.
pub fn node_addr(i: usize) -> Ipv4Addr {
    let host = u8::try_from(i + 1).unwrap_or(u8::MAX);
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], host)
}

/// The named network namespaces (`ip netns list`) whose name starts with `prefix`.
pub fn leftover_namespaces(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect();
    names.sort();
    names
}

/// Runs `f` on a fresh thread inside the named namespace `ns` and returns its result; sockets
/// that `f` opens belong to that namespace. Errors when the namespace cannot be entered; a panic
/// of `f` is passed on.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let path = format!("{NETNS_DIR}/{ns}");
    let file = File::open(&path).map_err(|e| format!("opening {path}: {e}"))?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn_scoped(scope, move || {
                setns(&file, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("setns into {path}: {e}"))?;
                Ok(f())
            })
            .map_err(|e| format!("spawning a thread for {ns}: {e}"))?;
        match handle.join() {
            Ok(result) => result,
            Err(payload) => std::panic::resume_unwind(payload),
        }
    })
}

/// The live processes whose network namespace is the named namespace `ns` (what `ip netns pids`
/// prints; zombies hold no namespace and are not listed).
pub fn pids_in_netns(ns: &str) -> Vec<u32> {
    let Ok(target) = std::fs::metadata(format!("{NETNS_DIR}/{ns}")) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == target.dev() && m.ino() == target.ino())
        })
        .collect()
}

/// SIGKILLs every process inside `ns` until none is left (a few seconds at most; never this
/// process).
fn kill_all_in_netns(ns: &str) {
    let me = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids: Vec<u32> = pids_in_netns(ns).into_iter().filter(|&p| p != me).collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = kill(Pid::from_raw(raw), Signal::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Deletes the named namespaces (errors are reported, not raised: this runs in `Drop`).
fn delete_namespaces(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let batch: String = names.iter().map(|n| format!("netns del {n}\n")).collect();
    if let Err(e) = run_ip(&["-force", "-batch", "-"], Some(&batch)) {
        eprintln!("netns fabric: deleting {names:?}: {e}");
    }
}

/// Removes the fabric namespaces of test processes that are gone (named `cnpy{pid}x...` with a
/// dead pid, or with this process's pid before this process created any), killing what runs in
/// them.
fn reap_stale_namespaces() {
    let me = std::process::id();
    let stale: Vec<String> = leftover_namespaces(NETNS_PREFIX)
        .into_iter()
        .filter(|name| {
            let digits: String = name[NETNS_PREFIX.len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits
                .parse::<u32>()
                .is_ok_and(|owner| owner == me || !alive(owner))
        })
        .collect();
    for ns in &stale {
        kill_all_in_netns(ns);
    }
    if !stale.is_empty() {
        eprintln!("netns fabric: removing stale namespaces {stale:?}");
        delete_namespaces(&stale);
    }
}

/// Runs `ip <args>` (feeding `stdin` when given) and maps a failure to its stderr.
fn run_ip(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running ip: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A write error shows up as ip's own failure below.
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A running `canopy` process inside a node of a [`Fabric`]; SIGKILLed and reaped on drop.
///
/// It holds the namespace name, not the fabric: HTTP goes through [`in_netns`], to the node's
/// own address (loopback traffic inside its namespace, so it works while the node is cut off).
pub struct NsNode {
    child: Option<Child>,
    pid: u32,
    index: usize,
    ns: String,
    addr: Ipv4Addr,
    api_port: u16,
    log: Arc<Mutex<String>>,
    timeout: Duration,
}

impl NsNode {
    /// Starts `canopy <args>` inside node `i` of `fabric`, with `CANOPY_LOG=info` and the test
    /// suite's `CANOPY_MODEL_DIR` unless `env` sets them, stdin null, and stdout/stderr captured
    /// into [`NsNode::log_text`]. `api_port` is where the caller told it to listen (pass
    /// `--host`/`--port` in `args` yourself); it only builds [`NsNode::base`]. Does not wait:
    /// see [`NsNode::wait_http`].
    ///
    /// # Panics
    ///
    /// When the process cannot be started.
    pub fn spawn(
        fabric: &Fabric,
        i: usize,
        args: &[String],
        env: &[(String, String)],
        api_port: u16,
    ) -> NsNode {
        let mut cmd = fabric.command(i, env!("CARGO_BIN_EXE_canopy"));
        cmd.args(args)
            .env("CANOPY_MODEL_DIR", model_dir())
            .env("CANOPY_LOG", "info")
            // The API listens on the namespace's address, which only this test's fabric
            // reaches; the API key has its own tests (tests/api_security.rs).
            .env("CANOPY_INSECURE_NO_API_KEY", "true")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting canopy in {}: {e}", fabric.ns(i)));
        let log = super::capture_output(&mut child);
        NsNode {
            pid: child.id(),
            child: Some(child),
            index: i,
            ns: fabric.ns(i).to_string(),
            addr: fabric.addr(i),
            api_port,
            log,
            timeout: DEFAULT_HTTP_TIMEOUT,
        }
    }

    /// Sets the global timeout of each HTTP request (default [`DEFAULT_HTTP_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The node's index in its fabric.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The node's namespace name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The node's address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The node's API port.
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// `http://{addr}:{api_port}`.
    pub fn base(&self) -> String {
        format!("http://{}:{}", self.addr, self.api_port)
    }

    /// The process id (of `canopy` itself: `ip netns exec` execs).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn agent(timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into()
    }

    /// Runs `f` inside the node's namespace.
    fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        in_netns(&self.ns, f)
    }

    fn get_with(&self, path: &str, timeout: Duration) -> Result<(u16, String), String> {
        let url = format!("{}{path}", self.base());
        self.in_ns(|| {
            let mut r = Self::agent(timeout)
                .get(&url)
                .call()
                .map_err(|e| format!("GET {url}: {e}"))?;
            let status = r.status().as_u16();
            Ok((status, r.body_mut().read_to_string().unwrap_or_default()))
        })?
    }

    /// GET `path`: (status, body), or why no answer came.
    pub fn get(&self, path: &str) -> Result<(u16, String), String> {
        self.get_with(path, self.timeout)
    }

    /// POST JSON to `path`: (status, parsed body), or why no answer came. A body that is not
    /// JSON comes back as a JSON string.
    pub fn try_post(&self, path: &str, body: &Value) -> Result<(u16, Value), String> {
        let url = format!("{}{path}", self.base());
        let timeout = self.timeout;
        self.in_ns(|| {
            let mut r = Self::agent(timeout)
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.to_string().as_bytes())
                .map_err(|e| format!("POST {url}: {e}"))?;
            let status = r.status().as_u16();
            let text = r.body_mut().read_to_string().unwrap_or_default();
            Ok((
                status,
                serde_json::from_str(&text).unwrap_or(Value::String(text)),
            ))
        })?
    }

    /// POST JSON to `path`: (status, parsed body).
    ///
    /// # Panics
    ///
    /// When no answer comes (with the node's log).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.try_post(path, body)
            .unwrap_or_else(|e| panic!("{e}; log of node {}:\n{}", self.index, self.log_text()))
    }

    /// DELETE `path`: (status, body).
    ///
    /// # Panics
    ///
    /// When no answer comes (with the node's log).
    pub fn delete(&self, path: &str) -> (u16, String) {
        let url = format!("{}{path}", self.base());
        let timeout = self.timeout;
        let result = self.in_ns(|| {
            let mut r = Self::agent(timeout)
                .delete(&url)
                .call()
                .map_err(|e| format!("DELETE {url}: {e}"))?;
            let status = r.status().as_u16();
            Ok((status, r.body_mut().read_to_string().unwrap_or_default()))
        });
        result
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{e}; log of node {}:\n{}", self.index, self.log_text()))
    }

    /// POSTs a streaming chat request to `/v1/chat/completions`; calls `on_event` with each SSE
    /// `data: ` payload and the instant it arrived. Returns the status.
    ///
    /// # Panics
    ///
    /// When the request cannot be sent (with the node's log).
    pub fn stream(&self, body: &Value, mut on_event: impl FnMut(&str, Instant) + Send) -> u16 {
        self.stream_while(body, |data, at| {
            on_event(data, at);
            true
        })
    }

    /// Like [`NsNode::stream`], but stops reading (and drops the connection: the client goes
    /// away) as soon as `on_event` returns false.
    ///
    /// # Panics
    ///
    /// When the request cannot be sent (with the node's log).
    pub fn stream_while(
        &self,
        body: &Value,
        mut on_event: impl FnMut(&str, Instant) -> bool + Send,
    ) -> u16 {
        let url = format!("{}/v1/chat/completions", self.base());
        let timeout = self.timeout;
        let result = self.in_ns(|| {
            let r = Self::agent(timeout)
                .post(&url)
                .send_json(body)
                .map_err(|e| format!("POST {url}: {e}"))?;
            let status = r.status().as_u16();
            let reader = BufReader::new(r.into_body().into_reader());
            for line in reader.lines().map_while(Result::ok) {
                if let Some(data) = line.strip_prefix("data: ")
                    && !on_event(data, Instant::now())
                {
                    break;
                }
            }
            Ok(status)
        });
        result
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("{e}; log of node {}:\n{}", self.index, self.log_text()))
    }

    /// Polls GET `path` until it answers `status` (true), the process exits or `limit` passes
    /// (false).
    pub fn wait_http(&self, path: &str, status: u16, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let per_try = left.clamp(Duration::from_millis(200), Duration::from_secs(5));
            if let Ok((got, _)) = self.get_with(path, per_try)
                && got == status
            {
                return true;
            }
            if self.exited() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) -> nix::Result<()> {
        if self.child.is_none() {
            return Err(nix::errno::Errno::ESRCH);
        }
        let pid = i32::try_from(self.pid).map_err(|_| nix::errno::Errno::ESRCH)?;
        kill(Pid::from_raw(pid), signal)
    }

    /// Whether the process is gone (exited, killed, or a zombie not reaped yet).
    pub fn exited(&self) -> bool {
        self.child.is_none() || !alive(self.pid)
    }

    /// Waits up to `limit` for the process to exit and reaps it: its exit status, or `None`
    /// when it is still running (or was reaped before).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return None,
            }
        }
    }

    /// SIGKILLs the process and reaps it (its children are left to [`Fabric`]'s drop).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NsNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The API port of every node a [`NodeCluster`] starts (each node has a namespace of its own).
pub const NODE_API_PORT: u16 = 52415;
/// The cluster port of every node a [`NodeCluster`] starts.
pub const NODE_CLUSTER_PORT: u16 = 52416;
/// The cookie of every node a [`NodeCluster`] starts, unless its flags name another.
pub const NODE_COOKIE: &str = "cluster-test-cookie";

/// `canopy node` processes in a [`Fabric`]: a data dir per node and a discovery namespace
/// unique to this cluster, so that the beacons of concurrent tests (or of earlier bench
/// repetitions) never meet.
pub struct NodeCluster {
    /// The namespaces.
    pub fabric: Fabric,
    /// The nodes' data dirs (`node-<i>`) live under it.
    pub dirs: tempfile::TempDir,
    /// The discovery namespace.
    pub namespace: String,
}

impl NodeCluster {
    /// A fresh fabric of `n` nodes whose discovery namespace starts with `label` (panics
    /// where network namespaces cannot be made: see [`Fabric::new`]).
    pub fn new(n: usize, label: &str) -> Self {
        let fabric = Fabric::new(n);
        let namespace = format!("{label}-{}", fabric.prefix());
        Self {
            fabric,
            dirs: tempfile::tempdir().expect("tempdir"),
            namespace,
        }
    }

    /// The flags of `canopy node` for node `i`: its API and cluster addresses, the discovery
    /// namespace, its data dir and [`NODE_COOKIE`] (unless `extra` names a cookie), then
    /// `extra`.
    pub fn node_args(&self, i: usize, extra: &[&str]) -> Vec<String> {
        let addr = self.fabric.addr(i).to_string();
        let dir = self.dirs.path().join(format!("node-{i}"));
        let mut args: Vec<String> = vec![
            "node".into(),
            "--host".into(),
            addr.clone(),
            "--port".into(),
            NODE_API_PORT.to_string(),
            "--cluster-host".into(),
            addr,
            "--cluster-port".into(),
            NODE_CLUSTER_PORT.to_string(),
            "--namespace".into(),
            self.namespace.clone(),
            "--data-dir".into(),
            dir.display().to_string(),
        ];
        if !extra.contains(&"--cookie") {
            args.extend(["--cookie".to_string(), NODE_COOKIE.to_string()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Spawns node `i` with [`NodeCluster::node_args`]; does not wait for it.
    pub fn spawn(&self, i: usize, extra: &[&str]) -> NsNode {
        NsNode::spawn(
            &self.fabric,
            i,
            &self.node_args(i, extra),
            &[],
            NODE_API_PORT,
        )
    }
}

/// A node's `/state` as JSON (`Null` while it does not answer 200).
pub fn state(node: &NsNode) -> serde_json::Value {
    match node.get("/state") {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
        _ => serde_json::Value::Null,
    }
}

/// A node's id, from its `/state`.
pub fn node_id(node: &NsNode) -> String {
    state(node)["node"].as_str().expect("node id").to_string()
}

/// How many other nodes a node sees.
pub fn peers(node: &NsNode) -> usize {
    state(node)["nodes"]
        .as_array()
        .map_or(0, |n| n.len().saturating_sub(1))
}

/// The master a node sees, if any.
pub fn master(node: &NsNode) -> Option<String> {
    state(node)["master"].as_str().map(str::to_string)
}

/// Whether every node lists all of them (itself included) and all name the same master,
/// from one `/state` of each.
pub fn formed(nodes: &[&NsNode]) -> bool {
    let mut masters = std::collections::BTreeSet::new();
    for node in nodes {
        let s = state(node);
        if s["nodes"].as_array().map_or(0, Vec::len) != nodes.len() {
            return false;
        }
        masters.insert(s["master"].as_str().map(str::to_string));
    }
    masters.len() == 1 && masters.first().is_some_and(Option::is_some)
}
