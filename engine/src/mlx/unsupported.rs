//! The stand-in [`MlxEngine`] of `mlx` builds for targets MLX does not run on: every `load`
//! fails with the reason, so `--engine mlx` is named and explained rather than unknown.

use canopy_proto::{GenerateRequest, LoadSpec};

use crate::{Engine, EngineError, GenerateOutcome, GenerateSink};

/// The MLX engine of a build whose target MLX does not run on (see the [module docs](super)):
/// it loads nothing and says why.
#[derive(Debug, Default)]
pub struct MlxEngine {
    _private: (),
}

impl MlxEngine {
    /// An engine with no model loaded (none ever will be on this target).
    pub fn new() -> Self {
        Self::default()
    }
}

impl Engine for MlxEngine {
    fn load(
        &mut self,
        spec: &LoadSpec,
        _progress: &mut dyn FnMut(u32, u32),
    ) -> Result<(), EngineError> {
        Err(EngineError::LoadFailed {
            model: spec.model.clone(),
            reason: format!(
                "the mlx engine needs macOS on Apple Silicon (this build's target: {}-{}); \
                 use `--engine candle` here",
                std::env::consts::ARCH,
                std::env::consts::OS
            ),
        })
    }

    fn warm_up(&mut self) -> Result<(), EngineError> {
        Err(EngineError::NotLoaded)
    }

    fn generate(
        &mut self,
        _request: &GenerateRequest,
        _sink: &mut dyn GenerateSink,
    ) -> Result<GenerateOutcome, EngineError> {
        Err(EngineError::NotLoaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_names_the_target_and_what_is_needed() {
        let spec = LoadSpec {
            model: "model.gguf".into(),
            layer_start: None,
            layer_end: None,
            threads: None,
            parallel: None,
        };
        let err = MlxEngine::new()
            .load(&spec, &mut |_, _| {})
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("needs macOS on Apple Silicon"), "{err}");
        assert!(err.contains(std::env::consts::OS), "{err}");
    }
}
