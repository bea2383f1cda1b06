//! `canopy up --nodes N`: a local cluster on loopback for trying Canopy out.
//!
//! This process is node 0; nodes 1..N are `canopy node` child processes on the next API and
//! cluster ports, each with its own data dir under the first one's (`local-<i>`), all with
//! the same cookie and API key (passed in their environment, never on their command line)
//! and every other node as a static peer (multicast does not work on
//! loopback). The children get a parent-death signal, so they never outlive this process;
//! on a normal stop they get SIGTERM and a grace period, then SIGKILL.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The child nodes of a local cluster.
pub struct LocalNodes {
    children: Vec<Child>,
}

/// What the first node runs with, as far as the others need to know.
pub struct LocalPlan<'a> {
    /// Node 0's API address.
    pub api: std::net::SocketAddr,
    /// Node 0's cluster address.
    pub cluster: std::net::SocketAddr,
    /// The shared cookie (given to the children in their environment, not their argv).
    pub cookie: &'a str,
    /// The API key, if the API has one (environment too).
    pub api_key: Option<&'a str>,
    /// Node 0's data dir.
    pub data_dir: &'a std::path::Path,
    /// How many nodes in all.
    pub nodes: usize,
    /// Flags passed on to every child (engine, threads, model dir...).
    pub passthrough: Vec<String>,
}

/// Starts nodes 1..N.
pub fn spawn(plan: &LocalPlan<'_>) -> anyhow::Result<LocalNodes> {
    let exe = std::env::current_exe().context("cannot find the canopy executable")?;
    let cluster_addr =
        |i: usize| std::net::SocketAddr::new(plan.cluster.ip(), plan.cluster.port() + i as u16);
    let mut nodes = LocalNodes {
        children: Vec::new(),
    };
    for i in 1..plan.nodes {
        let mut cmd = Command::new(&exe);
        cmd.arg("node")
            .args(["--host", &plan.api.ip().to_string()])
            .args(["--port", &(plan.api.port() + i as u16).to_string()])
            .args(["--cluster-host", &plan.cluster.ip().to_string()])
            .args(["--cluster-port", &cluster_addr(i).port().to_string()])
            .arg("--data-dir")
            .arg(plan.data_dir.join(format!("local-{i}")))
            .arg("--no-discovery")
            .args(&plan.passthrough)
            .env_remove("CANOPY_NODES")
            .env_remove("CANOPY_MODEL")
            .env_remove("CANOPY_PORT")
            .env_remove("CANOPY_CLUSTER_PORT")
            .env_remove("CANOPY_DATA_DIR")
            .env_remove("CANOPY_TLS_CERT")
            .env_remove("CANOPY_TLS_KEY")
            .env_remove("CANOPY_TLS_CA")
            // The settings the children need are passed as flags: a config file named in
            // the environment would hand them node 0's model and addresses too.
            .env_remove("CANOPY_CONFIG")
            // Secrets travel in the environment, which only the same user (and root) can
            // read, never in argv, which every local user can.
            .env_remove("CANOPY_COOKIE_FILE")
            .env_remove("CANOPY_API_KEY_FILE")
            .env("CANOPY_COOKIE", plan.cookie)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for j in (0..plan.nodes).filter(|&j| j != i) {
            cmd.args(["--peer", &cluster_addr(j).to_string()]);
        }
        match plan.api_key {
            Some(key) => cmd.env("CANOPY_API_KEY", key),
            None => cmd.env_remove("CANOPY_API_KEY"),
        };
        if std::env::var_os("CANOPY_LOG").is_none() {
            cmd.env("CANOPY_LOG", "warn");
        }
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start local node {i}"))?;
        eprintln!(
            "local node {i}: API http://{}:{}, cluster {}",
            plan.api.ip(),
            plan.api.port() + i as u16,
            cluster_addr(i)
        );
        nodes.children.push(child);
    }
    Ok(nodes)
}

impl LocalNodes {
    /// Stops every child: SIGTERM, up to 30 s, then SIGKILL.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        for child in &self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for child in &mut self.children {
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        self.children.clear();
    }
}

impl Drop for LocalNodes {
    fn drop(&mut self) {
        self.stop_all();
    }
}
