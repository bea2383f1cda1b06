//! `canopy up` and `canopy node`: start a node and serve until Ctrl-C.
//!
//! `canopy up` is the main job: fetch the default model on first use (progress bar, sha256
//! verified, cached under the user's cache dir), start a node with its whole supervision tree,
//! place one instance of the model, and serve the OpenAI-compatible API on 127.0.0.1:52415.
//! `canopy node` is the same without placing a model unless `--model` is given.
//!
//! Configuration comes from flags, then `CANOPY_*` environment variables, then an optional
//! TOML file (`--config`, or `$CANOPY_CONFIG`), then defaults: the first one that sets a value
//! wins. Every key of the file has the flag's name with `_` for `-`:
//!
//! ```toml
//! host = "127.0.0.1"
//! port = 52415
//! model = "smollm2-135m-instruct"   # a catalogue name, or a path to a GGUF file
//! instances = 1
//! threads = 2
//! parallel = 8                      # sequences each runner generates at once
//! engine = "candle"
//! ```
//!
//! Ctrl-C (or SIGTERM) stops the node in order: user actors, the API (open streams get a
//! bounded grace), then the worker, whose runners are asked to exit and are killed only if
//! they do not. Then the process exits 0. A node that fails on its own exits 1 with the reason.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use canopy_actors::api::{ApiConfig, ApiKey};
use canopy_actors::cluster::{ClusterSetup, ModelResolver};
use canopy_actors::node::{Node, NodeConfig, Placement, RunnerDefaults};
use canopy_actors::runner::{RunnerCommand, RunnerEvent};
use canopy_engine::store::ModelStore;
use canopy_proto::{LoadSpec, RunnerStatus};
use canopy_runtime::cluster::ClusterConfig;
use canopy_runtime::cluster::discovery::DiscoveryConfig;
use clap::Args;
use serde::Deserialize;

use crate::model::BarProgress;
use crate::security::{self, ModelPaths};

/// The API port, exo's.
pub const DEFAULT_PORT: u16 = 52415;

/// The cluster port.
pub const DEFAULT_CLUSTER_PORT: u16 = 52416;

/// Options of `canopy up` and `canopy node`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address the HTTP API listens on [default: 127.0.0.1].
    #[arg(long, env = "CANOPY_HOST")]
    host: Option<IpAddr>,
    /// Port of the HTTP API [default: 52415].
    #[arg(long, env = "CANOPY_PORT")]
    port: Option<u16>,
    /// The model to serve: a catalogue name or alias, or the path of a GGUF file
    /// [`up` default: the default model].
    #[arg(long, env = "CANOPY_MODEL")]
    model: Option<String>,
    /// How many instances of the model to place [default: 1].
    #[arg(long, env = "CANOPY_INSTANCES")]
    instances: Option<usize>,
    /// CPU threads per runner [default: all cores].
    #[arg(long, env = "CANOPY_THREADS")]
    threads: Option<u32>,
    /// Sequences each runner generates at once (continuous batching), 1 to 256 [default:
    /// chosen from memory and cores].
    #[arg(long, env = "CANOPY_PARALLEL", value_parser = parse_parallel)]
    parallel: Option<u32>,
    /// The engine runners host [default: the runner's default].
    #[arg(long, env = "CANOPY_ENGINE")]
    engine: Option<String>,
    /// Most requests queued or running per instance before 429 [default: the runner's
    /// --parallel plus 16].
    #[arg(long, env = "CANOPY_MAX_QUEUE")]
    max_queue: Option<usize>,
    /// The model store directory [default: the user's cache directory, canopy/models].
    #[arg(long, env = "CANOPY_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// A TOML configuration file (flags and CANOPY_* variables override it).
    #[arg(long, env = "CANOPY_CONFIG")]
    config: Option<PathBuf>,
    /// Run alone: no cluster membership, no discovery, no data dir.
    #[arg(long, env = "CANOPY_STANDALONE")]
    standalone: bool,
    /// Address the cluster listens on [default: this machine's first non-loopback IPv4
    /// address, else 127.0.0.1].
    #[arg(long, env = "CANOPY_CLUSTER_HOST")]
    cluster_host: Option<IpAddr>,
    /// Port the cluster listens on [default: 52416].
    #[arg(long, env = "CANOPY_CLUSTER_PORT")]
    cluster_port: Option<u16>,
    /// The cluster cookie; nodes with another cookie are refused [default: generated once
    /// and kept in the data dir's `cookie` file]. Other local users can read a command
    /// line: prefer --cookie-file or the variable.
    #[arg(long, env = "CANOPY_COOKIE", hide_env_values = true)]
    cookie: Option<String>,
    /// A file holding the cluster cookie (e.g. a copy of another node's data-dir `cookie`).
    #[arg(long, env = "CANOPY_COOKIE_FILE")]
    cookie_file: Option<PathBuf>,
    /// The key clients must send as `Authorization: Bearer KEY` on every endpoint but
    /// /health [default: none, and then the API serves loopback only]. Other local users
    /// can read a command line: prefer --api-key-file or the variable.
    #[arg(long, env = "CANOPY_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// A file holding the API key (keep it mode 0600).
    #[arg(long, env = "CANOPY_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,
    /// Serve the API on a non-loopback --host without an API key: anyone who can reach the
    /// address can use the node.
    #[arg(long, env = "CANOPY_INSECURE_NO_API_KEY")]
    insecure_no_api_key: bool,
    /// A host name clients may reach this node's API by, besides IP addresses and
    /// localhost (other names are refused, against DNS rebinding); repeatable; `*` for any.
    #[arg(
        long = "allowed-host",
        env = "CANOPY_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
    /// A directory whose GGUF files placement requests (`POST /instances`) may name by
    /// path; repeatable [default: only the model store].
    #[arg(
        long = "model-path-allow",
        env = "CANOPY_MODEL_PATH_ALLOW",
        value_delimiter = ','
    )]
    model_path_allow: Vec<PathBuf>,
    /// Most HTTP connections served at once; more are answered 503 [default: 1024].
    #[arg(long, env = "CANOPY_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Seconds a connection may take to send a request's headers (an idle keep-alive
    /// connection included) before it is closed [default: 10].
    #[arg(long, env = "CANOPY_HEADER_TIMEOUT", value_parser = parse_seconds)]
    header_timeout: Option<Duration>,
    /// Where the node keeps its identity and cookie [default: the user's data dir, canopy].
    #[arg(long, env = "CANOPY_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// A node to join at HOST:PORT (its cluster address); repeatable. For networks without
    /// multicast.
    #[arg(long = "peer", env = "CANOPY_PEERS", value_delimiter = ',')]
    peers: Vec<SocketAddr>,
    /// Quorum: no master is elected in a group of fewer than N connected nodes.
    #[arg(long, env = "CANOPY_EXPECT")]
    expect: Option<usize>,
    /// Election priority: the highest leads (then the oldest node) [default: 0].
    #[arg(long, env = "CANOPY_PRIORITY", allow_negative_numbers = true)]
    priority: Option<i32>,
    /// Discovery namespace: nodes only join others of the same namespace [default: canopy].
    #[arg(long, env = "CANOPY_NAMESPACE")]
    namespace: Option<String>,
    /// Do not send or listen for multicast discovery beacons (use --peer).
    #[arg(long, env = "CANOPY_NO_DISCOVERY")]
    no_discovery: bool,
    /// Memory this node offers to model instances, e.g. 8G or 512M [default: what the
    /// kernel reports available].
    #[arg(long, env = "CANOPY_MEMORY", value_parser = parse_bytes)]
    memory: Option<u64>,
    /// `up` only: start a local cluster of N nodes on loopback (this process is the first;
    /// the others are child processes on the next API and cluster ports).
    #[arg(long, env = "CANOPY_NODES")]
    nodes: Option<usize>,
}

/// Parses a positive number of seconds, e.g. `10` or `0.5`.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("`{text}`: give between 0 and 86400 seconds"))
    }
}

/// The most sequences a runner may be asked to batch.
const MAX_PARALLEL: u32 = 256;

/// Parses and checks `--parallel` (1 to [`MAX_PARALLEL`]).
fn parse_parallel(text: &str) -> Result<u32, String> {
    let n: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number of sequences"))?;
    check_parallel(n)
}

fn check_parallel(n: u32) -> Result<u32, String> {
    if (1..=MAX_PARALLEL).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "parallel must be between 1 and {MAX_PARALLEL} (sequences each runner generates at \
             once), got {n}"
        ))
    }
}

/// Parses `512M`, `8G`, `1.5GiB`, `1048576`: a byte count with an optional binary suffix.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (try 512M or 8G)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` (use K, M, G or T)")),
    };
    Ok((number * scale as f64) as u64)
}

/// The configuration file's keys (all optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    host: Option<IpAddr>,
    port: Option<u16>,
    model: Option<String>,
    instances: Option<usize>,
    threads: Option<u32>,
    parallel: Option<u32>,
    engine: Option<String>,
    max_queue: Option<usize>,
    model_dir: Option<PathBuf>,
}

impl FileConfig {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the config file {}", path.display()))?;
        toml::from_str(&text)
            .with_context(|| format!("the config file {} is not valid", path.display()))
    }
}

/// The settled configuration, after flags, environment, file and defaults.
#[derive(Debug, Clone, PartialEq)]
struct Settings {
    addr: SocketAddr,
    model: Option<String>,
    instances: usize,
    threads: Option<u32>,
    parallel: Option<u32>,
    engine: Option<String>,
    /// `None`: each runner's parallel plus `DEFAULT_QUEUE`.
    max_queue: Option<usize>,
    model_dir: Option<PathBuf>,
    cluster: Option<ClusterSettings>,
    nodes: usize,
    api_key: Option<ApiKey>,
    insecure_no_api_key: bool,
    allowed_hosts: Vec<String>,
    model_path_allow: Vec<PathBuf>,
    max_connections: usize,
    header_timeout: Duration,
}

/// The cluster part of the settings (None when standalone).
#[derive(Debug, Clone, PartialEq)]
struct ClusterSettings {
    listen: SocketAddr,
    cookie: Option<String>,
    data_dir: PathBuf,
    peers: Vec<SocketAddr>,
    expect: Option<usize>,
    priority: i32,
    namespace: String,
    discovery: bool,
    memory: Option<u64>,
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
    fn resolve(args: ServeArgs, default_model: Option<&str>) -> anyhow::Result<Self> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let host = args
            .host
            .or(file.host)
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let port = args.port.or(file.port).unwrap_or(DEFAULT_PORT);
        let api_key = security::api_key(args.api_key.as_deref(), args.api_key_file.as_deref())?;
        security::check_exposure(host, api_key.is_some(), args.insecure_no_api_key)?;
        let api_defaults = ApiConfig::default();
        let max_connections = args.max_connections.unwrap_or(api_defaults.max_connections);
        if max_connections == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        let instances = args.instances.or(file.instances).unwrap_or(1);
        if instances == 0 {
            anyhow::bail!("--instances must be at least 1");
        }
        let parallel = match args.parallel.or(file.parallel) {
            Some(n) => Some(check_parallel(n).map_err(|e| anyhow::anyhow!("--parallel: {e}"))?),
            None => None,
        };
        let nodes = args.nodes.unwrap_or(1);
        if nodes == 0 {
            anyhow::bail!("--nodes must be at least 1");
        }
        let cluster = if args.standalone {
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
            addr: SocketAddr::new(host, port),
            model: args
                .model
                .or(file.model)
                .or(default_model.map(str::to_string)),
            instances,
            threads: args.threads.or(file.threads),
            parallel,
            engine: args.engine.or(file.engine),
            max_queue: args.max_queue.or(file.max_queue).map(|n| n.max(1)),
            model_dir: args.model_dir.or(file.model_dir),
        })
    }
}

/// Resolves a model name or path to a file, downloading catalogue models on first use.
/// Returns the id clients use for it and its path.
fn fetch_model(name: &str, store: &ModelStore) -> anyhow::Result<(String, PathBuf)> {
    let as_path = Path::new(name);
    if as_path.exists() {
        let id = as_path
            .file_stem()
            .map_or_else(|| name.to_string(), |s| s.to_string_lossy().into_owned());
        return Ok((id, as_path.to_path_buf()));
    }
    let entry = store.entry(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let id = entry.name.clone();
    if store.local(entry).ok().flatten().is_none() {
        eprintln!("downloading {id} (first run only)...");
    }
    let path = store
        .ensure(&id, &mut BarProgress::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok((id, path))
}

/// Whether `engine` (None: the runner's default) loads GGUF files, so that model names go
/// through the model store; the scripted test engine names its models itself.
fn engine_reads_gguf(engine: Option<&str>) -> bool {
    engine != Some("scripted")
}

/// Resolves placement requests' model names with the model store (downloading catalogue
/// models on first use), or as paths of files under the store or a `--model-path-allow`
/// directory ([`ModelPaths`]); with a non-candle engine, names pass through as they are.
struct StoreResolver {
    store: ModelStore,
    /// Where model files named by path may be.
    paths: ModelPaths,
    engine: Option<String>,
    threads: Option<u32>,
    parallel: Option<u32>,
}

impl StoreResolver {
    fn passthrough(&self) -> bool {
        !engine_reads_gguf(self.engine.as_deref())
    }
}

impl ModelResolver for StoreResolver {
    fn resolve(&self, model: &str) -> Result<LoadSpec, String> {
        let path = if self.passthrough() {
            PathBuf::from(model)
        } else if let Ok(entry) = self.store.entry(model) {
            let id = entry.name.clone();
            self.store
                .ensure(&id, &mut BarProgress::default())
                .map_err(|e| e.to_string())?
        } else {
            self.paths
                .check(model)
                .ok_or_else(|| ModelPaths::refusal(model))?
        };
        Ok(LoadSpec {
            model: path.display().to_string(),
            layer_start: None,
            layer_end: None,
            threads: self.threads,
            parallel: self.parallel,
        })
    }

    fn size_hint(&self, model: &str) -> Option<u64> {
        if self.passthrough() {
            return None;
        }
        if let Ok(entry) = self.store.entry(model) {
            return Some(entry.size_bytes);
        }
        let path = self.paths.check(model)?;
        std::fs::metadata(path).ok().map(|m| m.len())
    }

    fn model_id(&self, model: &str) -> String {
        if self.passthrough() {
            return model.to_string();
        }
        if let Ok(entry) = self.store.entry(model) {
            return entry.name.clone();
        }
        match self.paths.check(model) {
            Some(path) => path
                .file_stem()
                .map_or_else(|| model.to_string(), |s| s.to_string_lossy().into_owned()),
            None => model.to_string(),
        }
    }
}

/// Runs `canopy up` (`default_model = Some(..)`) or `canopy node` (`None`).
pub fn run(args: ServeArgs, default_model: Option<&str>) -> anyhow::Result<()> {
    let mut settings = Settings::resolve(args, default_model)?;
    let store = match &settings.model_dir {
        Some(dir) => ModelStore::open(dir.clone()),
        None => ModelStore::open_default().map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let model = match (&settings.model, settings.engine.as_deref()) {
        // The model store holds GGUF files; other engines (the scripted test engine) name
        // their models themselves.
        (Some(name), engine) if !engine_reads_gguf(engine) => {
            Some((name.clone(), PathBuf::from(name)))
        }
        (Some(name), _) => Some(fetch_model(name, &store)?),
        (None, _) => None,
    };
    let resolver = StoreResolver {
        paths: ModelPaths::new(store.dir(), &settings.model_path_allow),
        store,
        engine: settings.engine.clone(),
        threads: settings.threads,
        parallel: settings.parallel,
    };
    let local_nodes = match (&mut settings.cluster, settings.nodes) {
        (Some(cluster), nodes) if nodes > 1 => {
            if cluster.cookie.is_none() {
                let dir = canopy_runtime::cluster::identity::DataDir::open(&cluster.data_dir)?;
                cluster.cookie = Some(dir.cookie(None)?.value);
            }
            let mut passthrough = Vec::new();
            if let Some(engine) = &settings.engine {
                passthrough.extend(["--engine".to_string(), engine.clone()]);
            }
            if let Some(threads) = settings.threads {
                passthrough.extend(["--threads".to_string(), threads.to_string()]);
            }
            if let Some(parallel) = settings.parallel {
                passthrough.extend(["--parallel".to_string(), parallel.to_string()]);
            }
            if let Some(dir) = &settings.model_dir {
                passthrough.extend(["--model-dir".to_string(), dir.display().to_string()]);
            }
            if let Some(max_queue) = settings.max_queue {
                passthrough.extend(["--max-queue".to_string(), max_queue.to_string()]);
            }
            for host in &settings.allowed_hosts {
                passthrough.extend(["--allowed-host".to_string(), host.clone()]);
            }
            for dir in &settings.model_path_allow {
                passthrough.extend(["--model-path-allow".to_string(), dir.display().to_string()]);
            }
            passthrough.extend([
                "--max-connections".to_string(),
                settings.max_connections.to_string(),
            ]);
            passthrough.extend([
                "--header-timeout".to_string(),
                settings.header_timeout.as_secs_f64().to_string(),
            ]);
            if settings.insecure_no_api_key {
                passthrough.push("--insecure-no-api-key".to_string());
            }
            for i in 1..nodes {
                cluster.peers.push(SocketAddr::new(
                    cluster.listen.ip(),
                    cluster.listen.port() + i as u16,
                ));
            }
            Some(crate::local_cluster::spawn(
                &crate::local_cluster::LocalPlan {
                    api: settings.addr,
                    cluster: cluster.listen,
                    cookie: cluster.cookie.as_deref().unwrap_or_default(),
                    api_key: settings.api_key.as_ref().map(ApiKey::expose),
                    data_dir: &cluster.data_dir,
                    nodes,
                    passthrough,
                },
            )?)
        }
        (None, nodes) if nodes > 1 => anyhow::bail!("--nodes needs the cluster: drop --standalone"),
        _ => None,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let outcome = runtime.block_on(serve(settings, model, resolver));
    if let Some(nodes) = local_nodes {
        nodes.stop();
    }
    outcome
}

/// Opens the data dir and builds the cluster setup.
fn cluster_setup(
    cluster: &ClusterSettings,
    resolver: StoreResolver,
) -> anyhow::Result<(ClusterSetup, canopy_runtime::cluster::identity::DataDir)> {
    use canopy_runtime::cluster::identity::DataDir;
    let dir = DataDir::open(&cluster.data_dir)?;
    let node_id = dir.node_id()?;
    let cookie = dir.cookie(cluster.cookie.as_deref())?;
    if cookie.generated {
        eprintln!(
            "generated a cluster cookie, kept in {} (mode 0600): for other nodes to join, copy \
             that file to them and start them with --cookie-file PATH",
            cluster
                .data_dir
                .join(canopy_runtime::cluster::identity::COOKIE_FILE)
                .display()
        );
    }
    let mut config = ClusterConfig::new(node_id, cluster.listen, cookie.value);
    config.peers = cluster.peers.clone();
    config.expect = cluster.expect;
    config.priority = cluster.priority;
    if cluster.discovery {
        match cluster.listen.ip() {
            IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() => {
                let mut discovery = DiscoveryConfig::new(v4);
                discovery.namespace = cluster.namespace.clone();
                config.discovery = Some(discovery);
            }
            _ => tracing::warn!(
                listen = %cluster.listen,
                "multicast discovery needs a non-loopback IPv4 cluster address (--cluster-host); only --peer addresses are dialed"
            ),
        }
    }
    Ok((
        ClusterSetup {
            config,
            resolver: std::sync::Arc::new(resolver),
            memory_limit: cluster.memory,
        },
        dir,
    ))
}

async fn serve(
    settings: Settings,
    model: Option<(String, PathBuf)>,
    resolver: StoreResolver,
) -> anyhow::Result<()> {
    let mut command = RunnerCommand::current_exe().context("cannot find the canopy executable")?;
    if let Some(engine) = &settings.engine {
        command = command.args(["--engine", engine.as_str()]);
    }
    let mut runners = RunnerDefaults::new(command);
    runners.max_tasks = settings.max_queue;
    let placements = model
        .iter()
        .map(|(id, path)| Placement {
            model: id.clone(),
            load: LoadSpec {
                model: path.display().to_string(),
                layer_start: None,
                layer_end: None,
                threads: settings.threads,
                parallel: settings.parallel,
            },
            instances: settings.instances,
        })
        .collect();
    let config = NodeConfig {
        api: ApiConfig {
            addr: settings.addr,
            api_key: settings.api_key.clone(),
            allowed_hosts: settings.allowed_hosts.clone(),
            max_connections: settings.max_connections,
            header_timeout: settings.header_timeout,
            ..ApiConfig::default()
        },
        runners,
        placements,
    };
    let mut builder = Node::builder(config);
    // The data dir stays locked while the node runs.
    let mut _data_dir = None;
    if let Some(cluster) = &settings.cluster {
        let (setup, dir) = cluster_setup(cluster, resolver)?;
        eprintln!(
            "node {} joining the cluster at {}",
            setup.config.node_id, setup.config.listen
        );
        builder = builder.cluster(setup);
        _data_dir = Some(dir);
    }
    let mut node = builder.start().await?;
    let mut events = node.runner_events();
    let addr = node.api_addr().await?;
    let base = format!("http://{addr}");

    if let Some((id, _)) = &model {
        eprintln!("loading {id}...");
        // Wait for the first instance to be Ready (or the node to fail) before saying so.
        // A model that cannot load at all (a garbage file, a backend without its device) is
        // said at once, with the runner's reason, rather than after the restarts run out.
        let ready = async {
            loop {
                match events.recv().await {
                    Ok(RunnerEvent::StatusChanged {
                        status: RunnerStatus::Ready,
                        ..
                    }) => return Ok(()),
                    Ok(RunnerEvent::LoadFailed { error, .. }) => return Err(error),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return Ok(()),
                }
            }
        };
        tokio::select! {
            loaded = ready => {
                if let Err(error) = loaded {
                    let _ = node.shutdown(Duration::from_secs(30)).await;
                    anyhow::bail!("cannot load {id}: {error}");
                }
            }
            outcome = node.wait() => return node_ended(outcome),
            _ = shutdown_signal() => return stop(node).await,
        }
        println!("Canopy is serving {id} at {base}/v1");
        println!("try:");
        let auth = if settings.api_key.is_some() {
            " -H \"Authorization: Bearer $CANOPY_API_KEY\""
        } else {
            ""
        };
        println!(
            "  curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n    -d '{{\"model\": \"{id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"
        );
    } else {
        println!("Canopy node is up; API at {base} (no model placed)");
    }
    println!("inspect the actor tree with: canopy inspect --url {base}");

    tokio::select! {
        outcome = node.wait() => node_ended(outcome),
        _ = shutdown_signal() => stop(node).await,
    }
}

fn node_ended(outcome: Result<(), String>) -> anyhow::Result<()> {
    match outcome {
        Ok(()) => Ok(()),
        Err(reason) => Err(anyhow::anyhow!("the node failed: {reason}")),
    }
}

async fn stop(node: canopy_actors::node::NodeHandle) -> anyhow::Result<()> {
    eprintln!("shutting down...");
    node.shutdown(Duration::from_secs(60))
        .await
        .context("the node did not stop in time")?;
    eprintln!("stopped");
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs {
            host: None,
            port: None,
            model: None,
            instances: None,
            threads: None,
            parallel: None,
            engine: None,
            max_queue: None,
            model_dir: None,
            config: None,
            standalone: true,
            cluster_host: None,
            cluster_port: None,
            cookie: None,
            cookie_file: None,
            api_key: None,
            api_key_file: None,
            insecure_no_api_key: false,
            allowed_hosts: Vec::new(),
            model_path_allow: Vec::new(),
            max_connections: None,
            header_timeout: None,
            data_dir: None,
            peers: Vec::new(),
            expect: None,
            priority: None,
            namespace: None,
            no_discovery: false,
            memory: None,
            nodes: None,
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

        for bad in ["0", "257", "many"] {
            let err = parse_parallel(bad).expect_err(bad);
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert_eq!(parse_parallel("256"), Ok(256));
    }
}
