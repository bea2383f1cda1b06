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
use canopy_actors::api::ApiConfig;
use canopy_actors::node::{Node, NodeConfig, Placement, RunnerDefaults};
use canopy_actors::runner::{RunnerCommand, RunnerEvent};
use canopy_engine::store::ModelStore;
use canopy_proto::{LoadSpec, RunnerStatus};
use clap::Args;
use serde::Deserialize;

use crate::model::BarProgress;

/// The API port, exo's.
pub const DEFAULT_PORT: u16 = 52415;

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
    /// The engine runners host [default: the runner's default].
    #[arg(long, env = "CANOPY_ENGINE")]
    engine: Option<String>,
    /// Most requests queued or running per instance before 429 [default: 16].
    #[arg(long, env = "CANOPY_MAX_QUEUE")]
    max_queue: Option<usize>,
    /// The model store directory [default: the user's cache directory, canopy/models].
    #[arg(long, env = "CANOPY_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// A TOML configuration file (flags and CANOPY_* variables override it).
    #[arg(long, env = "CANOPY_CONFIG")]
    config: Option<PathBuf>,
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
    engine: Option<String>,
    max_queue: usize,
    model_dir: Option<PathBuf>,
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
        let instances = args.instances.or(file.instances).unwrap_or(1);
        if instances == 0 {
            anyhow::bail!("--instances must be at least 1");
        }
        Ok(Self {
            addr: SocketAddr::new(host, port),
            model: args
                .model
                .or(file.model)
                .or(default_model.map(str::to_string)),
            instances,
            threads: args.threads.or(file.threads),
            engine: args.engine.or(file.engine),
            max_queue: args.max_queue.or(file.max_queue).unwrap_or(16).max(1),
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

/// Runs `canopy up` (`default_model = Some(..)`) or `canopy node` (`None`).
pub fn run(args: ServeArgs, default_model: Option<&str>) -> anyhow::Result<()> {
    let settings = Settings::resolve(args, default_model)?;
    let store = match &settings.model_dir {
        Some(dir) => ModelStore::open(dir.clone()),
        None => ModelStore::open_default().map_err(|e| anyhow::anyhow!("{e}"))?,
    };
    let model = match (&settings.model, settings.engine.as_deref()) {
        // The model store holds GGUF files; other engines (the scripted test engine) name
        // their models themselves.
        (Some(name), Some(engine)) if engine != "candle" => {
            Some((name.clone(), PathBuf::from(name)))
        }
        (Some(name), _) => Some(fetch_model(name, &store)?),
        (None, _) => None,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(serve(settings, model))
}

async fn serve(settings: Settings, model: Option<(String, PathBuf)>) -> anyhow::Result<()> {
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
            },
            instances: settings.instances,
        })
        .collect();
    let config = NodeConfig {
        api: ApiConfig {
            addr: settings.addr,
            ..ApiConfig::default()
        },
        runners,
        placements,
    };
    let mut node = Node::builder(config).start().await?;
    let mut events = node.runner_events();
    let addr = node.api_addr().await?;
    let base = format!("http://{addr}");

    if let Some((id, _)) = &model {
        eprintln!("loading {id}...");
        // Wait for the first instance to be Ready (or the node to fail) before saying so.
        let ready = async {
            loop {
                match events.recv().await {
                    Ok(RunnerEvent::StatusChanged {
                        status: RunnerStatus::Ready,
                        ..
                    }) => return true,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return false,
                }
            }
        };
        tokio::select! {
            _ = ready => {}
            outcome = node.wait() => return node_ended(outcome),
            _ = shutdown_signal() => return stop(node).await,
        }
        println!("Canopy is serving {id} at {base}/v1");
        println!("try:");
        println!(
            "  curl {base}/v1/chat/completions -H 'Content-Type: application/json' \\\n    -d '{{\"model\": \"{id}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'"
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
            engine: None,
            max_queue: None,
            model_dir: None,
            config: None,
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
}
