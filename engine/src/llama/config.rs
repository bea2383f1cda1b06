//! [`LlamaConfig`]: the hyper-parameters of a llama-architecture model, read from GGUF
//! metadata.
//!
//! Keys are read under the architecture's prefix (`llama.block_count`, ...). Required keys
//! that are absent are reported by name ([`LlamaError::MissingMetadata`]); optional ones fall
//! back to the defaults llama.cpp uses:
//!
//! | field | key | default |
//! |---|---|---|
//! | `n_layer` | `llama.block_count` | required |
//! | `n_embd` | `llama.embedding_length` | required |
//! | `n_ff` | `llama.feed_forward_length` | required |
//! | `n_head` | `llama.attention.head_count` | required |
//! | `n_head_kv` | `llama.attention.head_count_kv` | `n_head` |
//! | `head_dim` | `llama.attention.key_length` | `n_embd / n_head` |
//! | `rms_norm_eps` | `llama.attention.layer_norm_rms_epsilon` | required |
//! | `rope_freq_base` | `llama.rope.freq_base` | 10000 |
//! | `rope_dim` | `llama.rope.dimension_count` | `head_dim` |
//! | `rope_scaling` | `llama.rope.scaling.type` + `.factor` (or `llama.rope.scale_linear`) | none |
//! | `context_length` | `llama.context_length` | required |
//! | `vocab_size` | `llama.vocab_size` | rows of `token_embd.weight` (or `output.weight`), else `tokenizer.ggml.tokens` length |
//!
//! Partial rotary embeddings (`rope_dim < head_dim`), grouped heads that do not divide evenly
//! and scaling schemes other than linear (YaRN, LongRoPE) are refused at load time rather than
//! producing wrong outputs. Llama-3-style frequency factors (`rope_freqs.weight`) are a tensor,
//! not metadata; the shard loader picks them up.

use candle_core::quantized::gguf_file::{Content, Value};

use super::error::{LlamaError, Result};

/// The only architecture this forward implements.
pub const LLAMA_ARCHITECTURE: &str = "llama";

/// How rotary position embeddings are stretched for contexts longer than training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Positions are used as they are.
    None,
    /// Positions are divided by `factor` (a.k.a. position interpolation).
    Linear {
        /// The divisor (> 0).
        factor: f32,
    },
}

/// Hyper-parameters of a llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Number of query heads.
    pub n_head: usize,
    /// Number of key/value heads (grouped-query attention when smaller than `n_head`).
    pub n_head_kv: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Hidden width of the feed-forward network.
    pub n_ff: usize,
    /// Epsilon of the RMS norms.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding's frequencies.
    pub rope_freq_base: f32,
    /// Number of rotated dimensions of each head (equal to `head_dim`).
    pub rope_dim: usize,
    /// Context-extension scaling of the rotary embedding.
    pub rope_scaling: RopeScaling,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// Number of tokens in the vocabulary (rows of the embedding and of the output head).
    pub vocab_size: usize,
}

impl LlamaConfig {
    /// Reads the configuration from a GGUF file's metadata.
    ///
    /// Fails with [`LlamaError::UnsupportedArchitecture`] for anything but `llama`, with
    /// [`LlamaError::MissingMetadata`] naming the first required key that is absent, and with
    /// [`LlamaError::BadMetadata`] for values that are of the wrong type or inconsistent.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = Metadata(content);
        let arch = md.string("general.architecture")?;
        if arch != LLAMA_ARCHITECTURE {
            return Err(LlamaError::UnsupportedArchitecture { arch });
        }
        let key = |suffix: &str| format!("{arch}.{suffix}");

        let n_layer = md.positive(&key("block_count"))?;
        let n_embd = md.positive(&key("embedding_length"))?;
        let n_ff = md.positive(&key("feed_forward_length"))?;
        let n_head = md.positive(&key("attention.head_count"))?;
        let n_head_kv = md
            .optional_positive(&key("attention.head_count_kv"))?
            .unwrap_or(n_head);
        let context_length = md.positive(&key("context_length"))?;
        let rms_norm_eps = md.float(&key("attention.layer_norm_rms_epsilon"))?;
        if !(rms_norm_eps.is_finite() && rms_norm_eps > 0.0) {
            return Err(bad(
                &key("attention.layer_norm_rms_epsilon"),
                format!("{rms_norm_eps} is not a positive number"),
            ));
        }

        if n_head % n_head_kv != 0 {
            return Err(bad(
                &key("attention.head_count_kv"),
                format!(
                    "{n_head} query heads cannot be grouped evenly over {n_head_kv} key/value heads"
                ),
            ));
        }
        let head_dim = match md.optional_positive(&key("attention.key_length"))? {
            Some(head_dim) => head_dim,
            None => {
                if n_embd % n_head != 0 {
                    return Err(bad(
                        &key("attention.head_count"),
                        format!("embedding width {n_embd} is not divisible by {n_head} heads"),
                    ));
                }
                n_embd / n_head
            }
        };
        let value_length = md.optional_positive(&key("attention.value_length"))?;
        if let Some(value_length) = value_length.filter(|&v| v != head_dim) {
            return Err(bad(
                &key("attention.value_length"),
                format!(
                    "value heads of width {value_length} differ from key heads of width {head_dim}; not supported"
                ),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(bad(
                &key("attention.key_length"),
                format!("head width {head_dim} is odd; rotary embeddings need an even width"),
            ));
        }

        let rope_freq_base = match md.optional_float(&key("rope.freq_base"))? {
            Some(base) if base.is_finite() && base > 0.0 => base as f32,
            Some(base) => {
                return Err(bad(
                    &key("rope.freq_base"),
                    format!("{base} is not a positive number"),
                ));
            }
            None => 10_000.0,
        };
        let rope_dim = md
            .optional_positive(&key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        if rope_dim != head_dim {
            return Err(bad(
                &key("rope.dimension_count"),
                format!(
                    "partial rotary embeddings ({rope_dim} of {head_dim} dimensions) are not supported"
                ),
            ));
        }
        let rope_scaling = rope_scaling(&md, &key)?;

        let tensor_rows = |name: &str| {
            content
                .tensor_infos
                .get(name)
                .and_then(|info| info.shape.dims().first().copied())
        };
        let vocab_size = match md.optional_positive(&key("vocab_size"))? {
            Some(vocab_size) => vocab_size,
            None => match tensor_rows("token_embd.weight").or_else(|| tensor_rows("output.weight"))
            {
                Some(rows) if rows > 0 => rows,
                _ => match content.metadata.get("tokenizer.ggml.tokens") {
                    Some(Value::Array(tokens)) if !tokens.is_empty() => tokens.len(),
                    _ => {
                        return Err(LlamaError::MissingMetadata {
                            key: key("vocab_size"),
                        });
                    }
                },
            },
        };

        Ok(Self {
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            rms_norm_eps,
            rope_freq_base,
            rope_dim,
            rope_scaling,
            context_length,
            vocab_size,
        })
    }

    /// Query heads served by each key/value head.
    pub fn n_rep(&self) -> usize {
        self.n_head / self.n_head_kv
    }
}

/// Reads the rotary scaling keys: `rope.scaling.type` (+ `rope.scaling.factor`), or the older
/// `rope.scale_linear`.
fn rope_scaling(md: &Metadata<'_>, key: &dyn Fn(&str) -> String) -> Result<RopeScaling> {
    let factor_key = key("rope.scaling.factor");
    let factor = md.optional_float(&factor_key)?;
    let linear = |factor: f64, key: &str| {
        if factor.is_finite() && factor > 0.0 {
            Ok(if factor == 1.0 {
                RopeScaling::None
            } else {
                RopeScaling::Linear {
                    factor: factor as f32,
                }
            })
        } else {
            Err(bad(
                key,
                format!("scaling factor {factor} is not a positive number"),
            ))
        }
    };
    match md.optional_string(&key("rope.scaling.type"))?.as_deref() {
        None => match md.optional_float(&key("rope.scale_linear"))? {
            Some(factor) => linear(factor, &key("rope.scale_linear")),
            None => Ok(RopeScaling::None),
        },
        Some("none") => Ok(RopeScaling::None),
        Some("linear") => match factor {
            Some(factor) => linear(factor, &factor_key),
            None => Err(LlamaError::MissingMetadata { key: factor_key }),
        },
        Some(other) => Err(bad(
            &key("rope.scaling.type"),
            format!("rope scaling {other:?} is not supported (only `none` and `linear` are)"),
        )),
    }
}

fn bad(key: &str, reason: String) -> LlamaError {
    LlamaError::BadMetadata {
        key: key.to_string(),
        reason,
    }
}

/// Typed, key-naming access to GGUF metadata.
struct Metadata<'a>(&'a Content);

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .metadata
            .get(key)
            .ok_or_else(|| LlamaError::MissingMetadata {
                key: key.to_string(),
            })
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            other => Err(bad(
                key,
                format!("expected a string, found {:?}", other.value_type()),
            )),
        }
    }

    fn optional_string(&self, key: &str) -> Result<Option<String>> {
        match self.0.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    fn positive(&self, key: &str) -> Result<usize> {
        let value = self.get(key)?;
        let n: Option<i128> = match value {
            Value::U8(v) => Some((*v).into()),
            Value::I8(v) => Some((*v).into()),
            Value::U16(v) => Some((*v).into()),
            Value::I16(v) => Some((*v).into()),
            Value::U32(v) => Some((*v).into()),
            Value::I32(v) => Some((*v).into()),
            Value::U64(v) => Some((*v).into()),
            Value::I64(v) => Some((*v).into()),
            _ => None,
        };
        match n {
            Some(n) if n > 0 => {
                usize::try_from(n).map_err(|_| bad(key, format!("{n} is too large")))
            }
            Some(n) => Err(bad(key, format!("{n} is not a positive number"))),
            None => Err(bad(
                key,
                format!(
                    "expected an integer, found {:?} (per-layer arrays are not supported)",
                    value.value_type()
                ),
            )),
        }
    }

    fn optional_positive(&self, key: &str) -> Result<Option<usize>> {
        match self.0.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.positive(key).map(Some),
        }
    }

    fn float(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            Value::F32(v) => Ok((*v).into()),
            Value::F64(v) => Ok(*v),
            other => Err(bad(
                key,
                format!("expected a float, found {:?}", other.value_type()),
            )),
        }
    }

    fn optional_float(&self, key: &str) -> Result<Option<f64>> {
        match self.0.metadata.get(key) {
            None => Ok(None),
            Some(_) => self.float(key).map(Some),
        }
    }
}
