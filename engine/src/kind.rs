//! [`EngineKind`]: which engine a runner hosts, chosen by name on the command line.

use std::fmt;
use std::str::FromStr;

use crate::candle_engine::{Backend, CandleEngine};
use crate::{Engine, EngineError, FaultHooks, ScriptedEngine};

/// The engines this build offers.
///
/// Parsed from its name (`"scripted"`); an unknown name is an
/// [`EngineError::UnknownEngine`] that lists the known ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// [`CandleEngine`] on the CPU: llama-family GGUF models (the default).
    Candle,
    /// [`CandleEngine`](crate::CandleEngine) on the first CUDA GPU (`cuda` feature builds).
    #[cfg(feature = "cuda")]
    CandleCuda,
    /// [`MlxEngine`](crate::mlx::MlxEngine): Apple MLX on an Apple Silicon Mac (`mlx` feature
    /// builds; elsewhere its `load` fails and says why).
    #[cfg(feature = "mlx")]
    Mlx,
    /// [`ScriptedEngine`]: the deterministic test engine (no model).
    Scripted,
}

impl EngineKind {
    /// Every engine this build offers, in the order they are listed to users.
    pub const ALL: &'static [EngineKind] = &[
        EngineKind::Candle,
        #[cfg(feature = "cuda")]
        EngineKind::CandleCuda,
        #[cfg(feature = "mlx")]
        EngineKind::Mlx,
        EngineKind::Scripted,
    ];

    /// The engine's name as accepted by [`FromStr`] (and shown by [`Display`](fmt::Display)).
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Candle => "candle",
            #[cfg(feature = "cuda")]
            EngineKind::CandleCuda => "candle-cuda",
            #[cfg(feature = "mlx")]
            EngineKind::Mlx => "mlx",
            EngineKind::Scripted => "scripted",
        }
    }

    /// Creates an engine of this kind, with no model loaded yet.
    ///
    /// `hooks` are the host's fault switches; only test engines use them.
    pub fn create(self, hooks: FaultHooks) -> Box<dyn Engine> {
        match self {
            EngineKind::Candle => Box::new(CandleEngine::new(Backend::Cpu)),
            #[cfg(feature = "cuda")]
            EngineKind::CandleCuda => Box::new(CandleEngine::new(Backend::Cuda)),
            #[cfg(feature = "mlx")]
            EngineKind::Mlx => Box::new(crate::mlx::MlxEngine::new()),
            EngineKind::Scripted => Box::new(ScriptedEngine::with_hooks(hooks)),
        }
    }
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for EngineKind {
    type Err = EngineError;

    fn from_str(name: &str) -> Result<Self, EngineError> {
        EngineKind::ALL
            .iter()
            .copied()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| EngineError::UnknownEngine {
                name: name.to_string(),
                known: EngineKind::ALL
                    .iter()
                    .map(|kind| kind.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_names() {
        assert_eq!(
            "scripted".parse::<EngineKind>().ok(),
            Some(EngineKind::Scripted)
        );
        for kind in EngineKind::ALL {
            assert_eq!(kind.to_string().parse::<EngineKind>().ok(), Some(*kind));
        }
    }

    #[test]
    fn unknown_name_lists_known_ones() {
        let err = "llama".parse::<EngineKind>().err().map(|e| e.to_string());
        let err = err.unwrap_or_default();
        assert!(
            err.starts_with("unknown engine \"llama\"; known engines: candle, "),
            "{err}"
        );
        assert!(err.ends_with("scripted"), "{err}");
    }
}
