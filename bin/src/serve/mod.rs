//! `canopy up` and `canopy node`: start a node and serve until Ctrl-C.
//!
//! `canopy up` is the main job: fetch the default model on first use (progress bar, sha256
//! verified, cached under the user's cache dir), start a node with its whole supervision tree,
//! place one instance of the model, and serve the OpenAI-compatible API on 127.0.0.1:52415.
//! `canopy node` is the same without placing a model unless `--model` is given.
//!
//! Configuration comes from flags, then `CANOPY_*` environment variables, then an optional
//! TOML file (`--config`, or `$CANOPY_CONFIG`), then defaults: the first one that sets a value
//! wins. Every flag is a key of the file, with the flag's name and `_` for `-` (see
//! [`args`]):
//!
//! ```toml
//! host = "127.0.0.1"
//! port = 52415
//! model = "smollm2-135m-instruct"   # a catalogue name, or a path to a GGUF file
//! instances = 1
//! threads = 2
//! parallel = 8                      # sequences each runner generates at once
//! engine = "candle"
//! peer = ["10.0.0.2:52416"]
//! memory = "8G"
//! ```
//!
//! The rooms: [`args`] (the options and their parsers), [`settings`] (layering and checks),
//! [`resolver`] (model names to files); this module starts the node, prints the banner and
//! waits for a signal.
//!
//! Ctrl-C (or SIGTERM) stops the node in order: user actors, the API (open streams get a
//! bounded grace), then the worker, whose runners are asked to exit and are killed only if
//! they do not. Then the process exits 0. A node that fails on its own exits 1 with the reason.

mod args;
mod resolver;
mod settings;

pub use args::ServeArgs;
use resolver::{StoreResolver, engine_reads_gguf, fetch_model};
use settings::{ClusterSettings, Settings};

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use canopy_actors::api::{ApiConfig, ApiKey};
use canopy_actors::cluster::ClusterSetup;
use canopy_actors::node::{Node, NodeConfig, Placement, RunnerDefaults};
use canopy_actors::runner::{RunnerCommand, RunnerEvent};
use canopy_proto::{LoadSpec, RunnerStatus};
use canopy_runtime::cluster::ClusterConfig;
use canopy_runtime::cluster::discovery::DiscoveryConfig;
use canopy_store::ModelStore;

use crate::security::ModelPaths;

/// The API port, exo's.
pub const DEFAULT_PORT: u16 = 52415;

/// The cluster port.
pub const DEFAULT_CLUSTER_PORT: u16 = 52416;

/// Runs `canopy up` (`default_model = Some(..)`) or `canopy node` (`None`).
/// Runs `up`/`node`; `json` prints the node's event lines as JSON (`--log-format json`).
pub fn run(args: ServeArgs, default_model: Option<&str>, json: bool) -> anyhow::Result<()> {
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
            if let Some(stall) = settings.stall_timeout {
                passthrough.extend([
                    "--stall-timeout".to_string(),
                    stall.as_secs_f64().to_string(),
                ]);
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
            if let Some(tls) = &cluster.tls {
                // Paths, not secrets: every local node presents the same certificate.
                for (flag, path) in [
                    ("--tls-cert", &tls.cert),
                    ("--tls-key", &tls.key),
                    ("--tls-ca", &tls.ca),
                ] {
                    passthrough.extend([flag.to_string(), path.display().to_string()]);
                }
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
    let outcome = runtime.block_on(serve(settings, model, resolver, json));
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
    if let Some(files) = &cluster.tls {
        use canopy_runtime::cluster::tls::{ClusterTls, TlsPem};
        let pem = TlsPem::read(&files.cert, &files.key, &files.ca)?;
        config.tls = Some(ClusterTls::new(&pem).context("cannot set up cluster TLS")?);
        tracing::info!(cert = %files.cert.display(), ca = %files.ca.display(), "cluster sessions use mutual TLS");
    }
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
    json: bool,
) -> anyhow::Result<()> {
    let mut command = RunnerCommand::current_exe().context("cannot find the canopy executable")?;
    if let Some(engine) = &settings.engine {
        command = command.args(["--engine", engine.as_str()]);
    }
    let mut runners = RunnerDefaults::new(command);
    runners.max_tasks = settings.max_queue;
    if let Some(stall) = settings.stall_timeout {
        runners.stall.decode = stall;
    }
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
    let join_hint = settings.cluster.as_ref().map(|c| {
        format!(
            "join this cluster from another machine: canopy node --peer {} --cookie-file {}",
            c.listen,
            c.data_dir
                .join(canopy_runtime::cluster::identity::COOKIE_FILE)
                .display()
        )
    });
    let mut node = builder.start().await?;
    print_events(node.events().clone(), json);
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
    let key_hint = if settings.api_key.is_some() {
        " (enter the API key when asked)"
    } else {
        ""
    };
    println!("dashboard: {base}/{key_hint}");
    if let Some(hint) = join_hint {
        println!("{hint}");
    }
    println!(
        "inspect the actor tree with: canopy inspect --url {base}; events: canopy events -f --url {base}"
    );

    tokio::select! {
        outcome = node.wait() => node_ended(outcome),
        _ = shutdown_signal() => stop(node).await,
    }
}

/// Prints the node's notable events to stderr as they happen (failures, restarts,
/// membership, elections, placements), one line each, or one JSON object each with `json`.
fn print_events(log: canopy_actors::events::EventLog, json: bool) {
    use canopy_actors::events::Followed;
    use futures::StreamExt;
    tokio::spawn(async move {
        let mut events = Box::pin(log.follow(0));
        while let Some(item) = events.next().await {
            match item {
                Followed::Event(e) if e.body.is_notable() => {
                    if json {
                        eprintln!("{}", e.to_json());
                    } else {
                        eprintln!("{}", e.line());
                    }
                }
                Followed::Event(_) => {}
                Followed::Missed(n) => eprintln!("({n} events went unprinted: too many at once)"),
            }
        }
    });
}

fn node_ended(outcome: Result<(), canopy_actors::node::NodeError>) -> anyhow::Result<()> {
    Ok(outcome?)
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
