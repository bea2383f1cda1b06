//! [`LoadOptions`]: the knobs of loading a [`LlamaShard`](super::LlamaShard).
//!
//! The defaults give a forward that is bit-identical to candle's `quantized_llama` and a KV
//! cache of `min(context_length, 4096)` positions.

use super::attention::GqaMode;

/// Default upper bound of the KV cache's capacity, whatever the model's context length.
pub const DEFAULT_MAX_CONTEXT: usize = 4096;

/// How to load a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// KV cache capacity in positions; `None` means `min(context_length, 4096)`.
    pub max_context: Option<usize>,
    /// Fuse the Q/K/V and the gate/up matmuls where that is bit-exact (see
    /// [`Projection`](super::Projection)). On by default.
    pub fuse_projections: bool,
    /// How grouped-query attention is computed (see [`GqaMode`]). All shards of one pipeline
    /// must use the same mode.
    pub gqa: GqaMode,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_context: None,
            fuse_projections: true,
            gqa: GqaMode::default(),
        }
    }
}
