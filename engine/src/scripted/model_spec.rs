//! [`ScriptedModel`]: the "model" a [`ScriptedEngine`](crate::ScriptedEngine) loads, parsed from
//! a `LoadSpec::model` string.
//!
//! Grammar: `scripted` or `scripted:OPTION[,OPTION...]`, where an option is one of
//!
//! | option        | meaning                                             | default |
//! |---------------|-----------------------------------------------------|---------|
//! | `layers=N`    | the simulated model has N layers                    | 4       |
//! | `layer_ms=M`  | loading each layer takes M milliseconds             | 0       |
//! | `fail`        | loading fails after the layers were "loaded"        | off     |
//!
//! Anything else is an error, so that a typo in a test does not silently test something else.

use std::fmt;
use std::time::Duration;

use crate::EngineError;

/// The prefix every scripted model string starts with.
pub const SCRIPTED_MODEL_PREFIX: &str = "scripted";

/// Layers a scripted model has unless `layers=N` says otherwise.
pub const DEFAULT_LAYERS: u32 = 4;

/// A simulated model: how many layers it has, how slowly it loads, whether loading fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptedModel {
    /// Number of simulated layers.
    pub layers: u32,
    /// Time to load each layer.
    pub layer_time: Duration,
    /// Whether loading ends in an error.
    pub fail: bool,
}

impl Default for ScriptedModel {
    fn default() -> Self {
        Self {
            layers: DEFAULT_LAYERS,
            layer_time: Duration::ZERO,
            fail: false,
        }
    }
}

impl ScriptedModel {
    /// Parses a model string such as `scripted:layers=3,layer_ms=20`.
    pub fn parse(model: &str) -> Result<Self, EngineError> {
        let invalid = |reason: String| EngineError::InvalidModel {
            model: model.to_string(),
            reason,
        };
        let options = match model.strip_prefix(SCRIPTED_MODEL_PREFIX) {
            Some("") => return Ok(Self::default()),
            Some(rest) => rest.strip_prefix(':').ok_or_else(|| {
                invalid(format!(
                    "the scripted engine expects `{SCRIPTED_MODEL_PREFIX}` or \
                     `{SCRIPTED_MODEL_PREFIX}:layers=N,layer_ms=M,fail`"
                ))
            })?,
            None => {
                return Err(invalid(format!(
                    "the scripted engine only loads models named `{SCRIPTED_MODEL_PREFIX}` or \
                     `{SCRIPTED_MODEL_PREFIX}:layers=N,layer_ms=M,fail` (is the runner using \
                     the wrong engine?)"
                )));
            }
        };
        let mut parsed = Self::default();
        for option in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            match option.split_once('=') {
                None if option == "fail" => parsed.fail = true,
                Some(("layers", value)) => {
                    parsed.layers = value.trim().parse().map_err(|_| {
                        invalid(format!("`layers` needs a whole number, got {value:?}"))
                    })?;
                }
                Some(("layer_ms", value)) => {
                    let ms: u64 = value.trim().parse().map_err(|_| {
                        invalid(format!(
                            "`layer_ms` needs a whole number of milliseconds, got {value:?}"
                        ))
                    })?;
                    parsed.layer_time = Duration::from_millis(ms);
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown option {option:?}; known options: layers=N, layer_ms=M, fail"
                    )));
                }
            }
        }
        Ok(parsed)
    }
}

impl fmt::Display for ScriptedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCRIPTED_MODEL_PREFIX}:layers={},layer_ms={}",
            self.layers,
            self.layer_time.as_millis()
        )?;
        if self.fail {
            f.write_str(",fail")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_name_gives_defaults() {
        let model = ScriptedModel::parse("scripted").ok();
        assert_eq!(model, Some(ScriptedModel::default()));
    }

    #[test]
    fn parses_every_option() {
        let model = ScriptedModel::parse("scripted:layers=7, layer_ms=15,fail").ok();
        assert_eq!(
            model,
            Some(ScriptedModel {
                layers: 7,
                layer_time: Duration::from_millis(15),
                fail: true,
            })
        );
    }

    #[test]
    fn display_round_trips() {
        let model = ScriptedModel {
            layers: 2,
            layer_time: Duration::from_millis(5),
            fail: true,
        };
        assert_eq!(ScriptedModel::parse(&model.to_string()).ok(), Some(model));
    }

    #[test]
    fn rejects_other_models_naming_them() {
        for bad in [
            "/models/smollm.gguf",
            "scriptedx",
            "scripted:layers=x",
            "scripted:fial",
        ] {
            let err = ScriptedModel::parse(bad).err().map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
    }
}
