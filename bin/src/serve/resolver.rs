//! Model names to files: the model store (download on first use, sha256 verified), or paths
//! under the store or a `--model-path-allow` directory.

use std::path::{Path, PathBuf};

use canopy_actors::cluster::{ModelResolver, ResolveError};
use canopy_proto::LoadSpec;
use canopy_store::ModelStore;

use crate::model::BarProgress;
use crate::security::ModelPaths;

/// Resolves a model name or path to a file, downloading catalogue models on first use.
/// Returns the id clients use for it and its path.
pub(super) fn fetch_model(name: &str, store: &ModelStore) -> anyhow::Result<(String, PathBuf)> {
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
pub(super) fn engine_reads_gguf(engine: Option<&str>) -> bool {
    engine != Some("scripted")
}

/// Resolves placement requests' model names with the model store (downloading catalogue
/// models on first use), or as paths of files under the store or a `--model-path-allow`
/// directory ([`ModelPaths`]); with a non-candle engine, names pass through as they are.
pub(super) struct StoreResolver {
    pub(super) store: ModelStore,
    /// Where model files named by path may be.
    pub(super) paths: ModelPaths,
    pub(super) engine: Option<String>,
    pub(super) threads: Option<u32>,
    pub(super) parallel: Option<u32>,
}

impl StoreResolver {
    fn passthrough(&self) -> bool {
        !engine_reads_gguf(self.engine.as_deref())
    }
}

impl ModelResolver for StoreResolver {
    fn resolve(&self, model: &str) -> Result<LoadSpec, ResolveError> {
        let path = if self.passthrough() {
            PathBuf::from(model)
        } else if let Ok(entry) = self.store.entry(model) {
            let id = entry.name.clone();
            self.store
                .ensure(&id, &mut BarProgress::default())
                .map_err(|e| ResolveError::Fetch {
                    model: id.clone(),
                    reason: e.to_string(),
                })?
        } else {
            self.paths
                .check(model)
                .ok_or_else(|| ResolveError::Unknown(ModelPaths::refusal(model)))?
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
