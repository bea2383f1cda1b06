//! Canopy's own llama forward pass, shardable by layers for pipeline-parallel inference.
//!
//! candle's `quantized_llama` runs a whole model and exposes no per-layer forward, so this
//! module rebuilds the llama forward from candle's public pieces (`QMatMul`, `RmsNorm`,
//! `rope_i`, softmax) around a layer range: a [`LlamaShard`] owns layers `i..j`, the embedding
//! if it is first, the final norm and head if it is last, and its own KV cache. Chained shards
//! give bit-identical logits to one shard over the whole model, and with the default options
//! the whole model is bit-identical to candle's `quantized_llama` (the tests in
//! `engine/tests/shards.rs` check both).
//!
//! One concept per file:
//!
//! - [`config`] — [`LlamaConfig`], hyper-parameters from GGUF metadata;
//! - [`weights`] — [`WeightReader`], reads named, shape-checked tensors;
//! - [`embedding`] — [`QuantizedEmbedding`], the token table kept quantized;
//! - [`rope`] — [`RotaryEmbedding`], cos/sin tables;
//! - [`kv_cache`] — [`KvCache`], written in place, grown on demand on CPU;
//! - [`projection`] — [`Projection`], fused Q/K/V and gate/up matmuls;
//! - [`linear`] — [`linear::Linear`], one quantized matmul, by the fastest exact kernel;
//! - [`q4_1`], [`q8_0`] — Canopy's CPU kernels for Q4_1 and Q8_0 weights, bit-identical to
//!   candle's (Q4_1 weights are kept only in the kernel's layout, one copy);
//! - [`attention`], [`mlp`], [`block`] — one transformer layer ([`GqaMode`]);
//! - [`sequence`], [`row_attention`] — the batched forward's per-sequence caches
//!   ([`SequenceCache`]) and its attention kernel, which makes a row's result independent of
//!   the batch around it;
//! - [`options`] — [`LoadOptions`];
//! - [`head`] — [`OutputHead`], final norm and vocabulary projection;
//! - [`shard`] — [`LlamaShard`], the layer range and its forward;
//! - [`error`] — [`LlamaError`].
//!
//! Determinism: on CPU every matmul output element is one dot product computed by one thread
//! (candle's quantized matmul splits the *outputs* across its thread pool, never the inner
//! dimension), so results do not depend on the thread count (`CANDLE_NUM_THREADS` /
//! `RAYON_NUM_THREADS`); `engine/tests/shards.rs` checks this by running the forward in child
//! processes with 1, 2 and 3 threads.

pub mod attention;
pub mod block;
pub mod config;
mod cpu_matmul;
pub mod embedding;
pub mod error;
pub mod head;
pub mod kv_cache;
pub mod linear;
pub mod mlp;
pub mod options;
pub mod projection;
pub mod q4_1;
pub mod q8_0;
pub mod rope;
pub mod row_attention;
pub mod sequence;
pub mod shard;
pub mod weights;

pub use attention::{Attention, GqaMode};
pub use block::TransformerBlock;
pub use config::{LlamaConfig, RopeScaling};
pub use embedding::QuantizedEmbedding;
pub use error::LlamaError;
pub use head::OutputHead;
pub use kv_cache::KvCache;
pub use mlp::Mlp;
pub use options::{DEFAULT_MAX_CONTEXT, LoadOptions};
pub use projection::Projection;
pub use rope::RotaryEmbedding;
pub use row_attention::Span;
pub use sequence::SequenceCache;
pub use shard::{LlamaShard, ShardInput};
pub use weights::WeightReader;
