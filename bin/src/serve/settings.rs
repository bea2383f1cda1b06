//! Settling the configuration: flags, then `CANOPY_*` variables (both through clap), then
//! the TOML file, then defaults; the first that sets a value wins. Values are checked here,
//! whichever layer they came from.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use canopy_actors::api::{ApiConfig, ApiKey};

use super::args::{ServeArgs, check_parallel};
use super::{DEFAULT_CLUSTER_PORT, DEFAULT_PORT};
use crate::security;

/// Reads a configuration file: the keys are the flags' names (see [`ServeArgs`]).
fn load_file(path: &Path) -> anyhow::Result<ServeArgs> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text)
        .with_context(|| format!("the config file {} is not valid", path.display()))
}

/// The settled configuration, after flags, environment, file and defaults.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Settings {
    pub(super) addr: SocketAddr,
    pub(super) model: Option<String>,
    pub(super) instances: usize,
    pub(super) threads: Option<u32>,
    pub(super) parallel: Option<u32>,
    pub(super) engine: Option<String>,
    /// `None`: each runner's parallel plus `DEFAULT_QUEUE`.
    pub(super) max_queue: Option<usize>,
    pub(super) model_dir: Option<PathBuf>,
    pub(super) cluster: Option<ClusterSettings>,
    pub(super) nodes: usize,
    pub(super) api_key: Option<ApiKey>,
    pub(super) insecure_no_api_key: bool,
    pub(super) allowed_hosts: Vec<String>,
    pub(super) model_path_allow: Vec<PathBuf>,
    pub(super) max_connections: usize,
    pub(super) header_timeout: Duration,
    /// `--stall-timeout`: the most time between two tokens of a running request; `None`:
    /// the runner supervisor's default.
    pub(super) stall_timeout: Option<Duration>,
}

/// The cluster part of the settings (None when standalone).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ClusterSettings {
    pub(super) listen: SocketAddr,
    pub(super) cookie: Option<String>,
    pub(super) data_dir: PathBuf,
    pub(super) peers: Vec<SocketAddr>,
    pub(super) expect: Option<usize>,
    pub(super) priority: i32,
    pub(super) namespace: String,
    pub(super) discovery: bool,
    pub(super) memory: Option<u64>,
    /// Mutual TLS for cluster sessions, if on.
    pub(super) tls: Option<TlsFiles>,
}

/// The three files of cluster TLS.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TlsFiles {
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
    pub(super) ca: PathBuf,
}

impl TlsFiles {
    /// All three or none (a configuration file can give one alone; the flags cannot).
    fn of(
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        ca: Option<PathBuf>,
    ) -> anyhow::Result<Option<Self>> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Self { cert, key, ca })),
            (cert, key, ca) => {
                let missing: Vec<&str> = [
                    ("tls_cert", cert.is_none()),
                    ("tls_key", key.is_none()),
                    ("tls_ca", ca.is_none()),
                ]
                .iter()
                .filter(|(_, m)| *m)
                .map(|(name, _)| *name)
                .collect();
                anyhow::bail!(
                    "cluster TLS needs tls_cert, tls_key and tls_ca together; missing: {}",
                    missing.join(", ")
                )
            }
        }
    }
}

/// The default cluster address: the first non-loopback IPv4 address of an interface that is
/// up, else loopback.
fn default_cluster_host() -> IpAddr {
    let found = nix::ifaddrs::getifaddrs().ok().and_then(|addrs| {
        addrs
            .filter(|a| {
                a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
                    && !a
                        .flags
                        .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
            })
            .find_map(|a| {
                a.address
                    .as_ref()
                    .and_then(|s| s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())))
            })
    });
    found.unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

impl Settings {
    pub(super) fn resolve(args: ServeArgs, default_model: Option<&str>) -> anyhow::Result<Self> {
        let args = match &args.config {
            Some(path) => {
                let file = load_file(path)?;
                args.over(file)
            }
            None => args,
        };
        let host = args.host.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let port = args.port.unwrap_or(DEFAULT_PORT);
        let api_key = security::api_key(args.api_key.as_deref(), args.api_key_file.as_deref())?;
        security::check_exposure(host, api_key.is_some(), args.insecure_no_api_key)?;
        let api_defaults = ApiConfig::default();
        let max_connections = args.max_connections.unwrap_or(api_defaults.max_connections);
        if max_connections == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        let instances = args.instances.unwrap_or(1);
        if instances == 0 {
            anyhow::bail!("--instances must be at least 1");
        }
        let parallel = match args.parallel {
            Some(n) => Some(check_parallel(n).map_err(|e| anyhow::anyhow!("--parallel: {e}"))?),
            None => None,
        };
        let nodes = args.nodes.unwrap_or(1);
        if nodes == 0 {
            anyhow::bail!("--nodes must be at least 1");
        }
        let cluster = if args.standalone {
            if args.tls_cert.is_some() || args.tls_key.is_some() || args.tls_ca.is_some() {
                anyhow::bail!(
                    "--tls-cert/--tls-key/--tls-ca secure the cluster: drop --standalone or them"
                );
            }
            None
        } else {
            let local = nodes > 1;
            let cluster_host = args.cluster_host.unwrap_or_else(|| {
                if local {
                    IpAddr::from([127, 0, 0, 1])
                } else {
                    default_cluster_host()
                }
            });
            Some(ClusterSettings {
                listen: SocketAddr::new(
                    cluster_host,
                    args.cluster_port.unwrap_or(DEFAULT_CLUSTER_PORT),
                ),
                cookie: security::cookie(args.cookie, args.cookie_file.as_deref())?,
                data_dir: args
                    .data_dir
                    .unwrap_or_else(canopy_runtime::cluster::identity::default_data_dir),
                peers: args.peers,
                expect: args.expect,
                priority: args.priority.unwrap_or(0),
                namespace: args.namespace.unwrap_or_else(|| "canopy".into()),
                discovery: !args.no_discovery && !local,
                memory: args.memory,
                tls: TlsFiles::of(args.tls_cert, args.tls_key, args.tls_ca)?,
            })
        };
        Ok(Self {
            cluster,
            nodes,
            api_key,
            insecure_no_api_key: args.insecure_no_api_key,
            allowed_hosts: args.allowed_hosts,
            model_path_allow: args.model_path_allow,
            max_connections,
            header_timeout: args.header_timeout.unwrap_or(api_defaults.header_timeout),
            stall_timeout: args.stall_timeout,
            addr: SocketAddr::new(host, port),
            model: args.model.or(default_model.map(str::to_string)),
            instances,
            threads: args.threads,
            parallel,
            engine: args.engine,
            max_queue: args.max_queue.map(|n| n.max(1)),
            model_dir: args.model_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            standalone: true,
            ..ServeArgs::default()
        }
    }

    #[test]
    fn defaults_apply_when_nothing_is_set() {
        let s = Settings::resolve(args(), Some("default")).expect("settles");
        assert_eq!(s.addr, "127.0.0.1:52415".parse().expect("addr"));
        assert_eq!(s.model.as_deref(), Some("default"));
        assert_eq!(s.instances, 1);
    }

    #[test]
    fn flags_beat_the_file_and_the_file_beats_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("canopy.toml");
        std::fs::write(&path, "port = 6000\nhost = \"127.0.0.2\"\ninstances = 2\n").expect("write");
        let mut a = args();
        a.config = Some(path);
        a.port = Some(7000);
        let s = Settings::resolve(a, None).expect("settles");
        assert_eq!(s.addr, "127.0.0.2:7000".parse().expect("addr"));
        assert_eq!(s.instances, 2);
        assert_eq!(s.model, None);
    }

    #[test]
    fn cluster_tls_needs_all_three_files_and_a_cluster() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("canopy.toml");
        std::fs::write(&path, "tls_cert = \"node.pem\"\ntls_ca = \"ca.pem\"\n").expect("write");
        let mut a = ServeArgs {
            config: Some(path.clone()),
            data_dir: Some(dir.path().into()),
            ..ServeArgs::default()
        };
        let err = format!(
            "{:#}",
            Settings::resolve(a.clone(), None).expect_err("no key")
        );
        assert!(err.contains("missing: tls_key"), "{err}");
        a.tls_key = Some("node-key.pem".into());
        let s = Settings::resolve(a.clone(), None).expect("settles");
        let tls = s.cluster.expect("a cluster").tls.expect("tls on");
        assert_eq!(tls.cert, PathBuf::from("node.pem"));
        assert_eq!(tls.key, PathBuf::from("node-key.pem"));
        a.standalone = true;
        let err = format!("{:#}", Settings::resolve(a, None).expect_err("standalone"));
        assert!(err.contains("--standalone"), "{err}");
    }

    #[test]
    fn a_bad_config_file_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("canopy.toml");
        std::fs::write(&path, "prot = 6000\n").expect("write");
        let mut a = args();
        a.config = Some(path.clone());
        let err = Settings::resolve(a, None).expect_err("unknown key");
        assert!(format!("{err:#}").contains("prot"), "{err:#}");
        assert!(format!("{err:#}").contains(&path.display().to_string()));
    }

    #[test]
    fn parallel_comes_from_flags_or_the_file_and_is_checked() {
        let s = Settings::resolve(args(), None).expect("settles");
        assert_eq!(s.parallel, None, "the engine chooses by default");
        assert_eq!(s.max_queue, None, "the queue follows parallel by default");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("canopy.toml");
        std::fs::write(&path, "parallel = 4\n").expect("write");
        let mut a = args();
        a.config = Some(path.clone());
        assert_eq!(
            Settings::resolve(a.clone(), None)
                .expect("settles")
                .parallel,
            Some(4)
        );
        a.parallel = Some(8);
        assert_eq!(
            Settings::resolve(a, None).expect("settles").parallel,
            Some(8)
        );

        std::fs::write(&path, "parallel = 0\n").expect("write");
        let mut a = args();
        a.config = Some(path);
        let err = format!(
            "{:#}",
            Settings::resolve(a, None).expect_err("0 is refused")
        );
        assert!(err.contains("between 1 and 256"), "{err}");
    }

    #[test]
    fn every_flag_is_a_key_of_the_file_with_the_flags_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("canopy.toml");
        std::fs::write(
            &path,
            r#"
cookie = "from-the-file"
cluster_port = 6001
peer = ["127.0.0.3:6001", "127.0.0.4:6001"]
allowed_host = ["canopy.example"]
header_timeout = 2.5
stall_timeout = 5
memory = "1G"
max_connections = 9
priority = -2
namespace = "lab"
no_discovery = true
"#,
        )
        .expect("write");
        let mut a = args();
        a.standalone = false;
        a.config = Some(path.clone());
        a.priority = Some(3);
        let s = Settings::resolve(a.clone(), None).expect("settles");
        let c = s.cluster.as_ref().expect("a cluster");
        assert_eq!(c.cookie.as_deref(), Some("from-the-file"));
        assert_eq!(c.listen.port(), 6001);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.priority, 3, "the flag wins");
        assert_eq!(c.namespace, "lab");
        assert!(!c.discovery);
        assert_eq!(c.memory, Some(1 << 30));
        assert_eq!(s.allowed_hosts, ["canopy.example"]);
        assert_eq!(s.header_timeout, Duration::from_millis(2500));
        assert_eq!(s.stall_timeout, Some(Duration::from_secs(5)));
        assert_eq!(s.max_connections, 9);

        // A flag's list replaces the file's.
        a.peers = vec!["127.0.0.9:1".parse().expect("addr")];
        let s = Settings::resolve(a, None).expect("settles");
        assert_eq!(s.cluster.expect("a cluster").peers.len(), 1);

        // The file's values go through the flags' parsers.
        for (bad, says) in [
            ("memory = \"8X\"", "unknown size unit"),
            ("header_timeout = 0", "between 0 and 86400"),
            ("parallel = 300", "between 1 and 256"),
            ("config = \"other.toml\"", "config"),
            ("peer = \"not an address\"", "peer"),
        ] {
            std::fs::write(&path, bad).expect("write");
            let mut a = args();
            a.config = Some(path.clone());
            let err = format!("{:#}", Settings::resolve(a, None).expect_err(bad));
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
