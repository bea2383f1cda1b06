//! The MLX engine ([`MlxEngine`], `--engine mlx`): llama-family GGUF models run with Apple's
//! MLX through [`mlx-rs`](https://crates.io/crates/mlx-rs), on the GPU (Metal) of an Apple
//! Silicon Mac.
//!
//! # Gating
//!
//! The engine is behind the `mlx` cargo feature, and mlx-rs is a dependency only on macOS on
//! Apple Silicon (`cfg(all(target_os = "macos", target_arch = "aarch64"))`), so
//! `cargo build --features mlx` (and `--all-features`) still builds everywhere else:
//!
//! | build | `EngineKind::Mlx` | what `--engine mlx` does |
//! |---|---|---|
//! | no `mlx` feature | absent | "unknown engine \"mlx\"; known engines: …" |
//! | `mlx`, macOS on Apple Silicon | present | the real engine (Metal GPU, else CPU) |
//! | `mlx`, any other target | present | a stub whose `load` fails: "the mlx engine needs macOS on Apple Silicon (this build's target: …)" |
//! | `mlx` + `RUSTFLAGS="--cfg mlx_linux"`, not macOS | present | the real engine on MLX's CPU backend (testing only) |
//!
//! The stub is deliberate: a feature-on build that cannot run MLX still names the engine and
//! says why it cannot load, instead of pretending it has never heard of it.
//!
//! `mlx_linux` exists so that the engine can be developed and tested off a Mac. mlx-rs 0.33's
//! `mlx-sys` does not build on Linux as published; it needs a patched `mlx-sys` (bindings for
//! `float16_t` off ARM, no `std::format`, linking a prebuilt `libmlx.so` from the `mlx[cpu]`
//! Python wheel through `MLX_SYSTEM_DIR`) placed with `[patch.crates-io]` in a scratch copy of
//! the workspace, and a stand-in for the macOS-only `mach_approximate_time` that mlx-rs's
//! random module links against (it lives in this module, compiled only under `mlx_linux`).
//!
//! # What it runs
//!
//! The same files as the candle engine (llama architecture, GGUF), reusing the crate's pieces:
//! [`GgufFile`](crate::gguf::GgufFile) opens and validates the file, the tokenizer
//! ([`GgufTokenizer`](crate::tokenizer::GgufTokenizer)) and chat template
//! ([`ChatTemplate`](crate::chat::ChatTemplate)) come from its metadata, the hyper-parameters
//! from [`LlamaConfig`](crate::llama::LlamaConfig), and tokens are picked by
//! [`Sampler`](crate::sampling::Sampler). Only the forward is MLX's (`MlxLlama`):
//!
//! - weights (`weights`): Q4_0, Q4_1 and Q8_0 matrices stay quantized, repacked into MLX's
//!   affine layout (group size 32) and multiplied with `quantized_matmul`; F32, F16 and BF16
//!   tensors are used as stored. Any other type (K-quants, Q5_x, IQ…) is refused at load with
//!   an error naming the tensor and its type.
//! - attention (`model`): grouped-query attention through MLX's fused
//!   `scaled_dot_product_attention`, RoPE through `fast::rope` in the *traditional*
//!   (interleaved pairs) convention that llama GGUF files are permuted for, with linear
//!   scaling and llama-3 `rope_freqs.weight` factors; RMS norms through `fast::rms_norm`.
//! - KV cache (`kv_cache`): grown in steps of 256 positions and written in place, capped at
//!   `min(context_length, 4096)` like the candle engine.
//!
//! Activations are f32 throughout. candle's CPU matmuls quantize activations to Q8_1
//! (llama.cpp's scheme) and MLX's do not, so the two engines' logits differ slightly (up to
//! ~0.8 on the default model, where MLX is within 1e-4 of a float64 forward); greedy output
//! agrees except where two tokens are nearly tied (see `engine/tests/mlx.rs`).
//!
//! MLX's own GGUF reader (`mlx_rs::io::GgufFile`) is not used: it reads every tensor at once
//! (no per-layer progress), its handle is thread-affine, and it runs its C parser on files
//! this crate has not validated; reading through the crate's `GgufFile` keeps one set of
//! checks and error messages for both engines.
//!
//! # Limitations
//!
//! - Whole models only: a [`LoadSpec`](canopy_proto::LoadSpec) with a layer range is refused
//!   (pipeline shards run on the candle engine).
//! - `LoadSpec::threads` is ignored: MLX has no thread-count setting.
//! - Speed off a Mac says nothing: the CPU backend of the Linux `mlx[cpu]` wheel multiplies
//!   quantized matrices with scalar code on one thread (~3 GFLOP/s), about ten times slower
//!   than the candle engine. The engine is meant for Metal.
//! - Q4_0/Q4_1/Q8_0 scales and biases are kept in f32 (exact, no per-matmul conversion):
//!   8 bytes per 32 weights, 18-33% more memory than the GGUF blocks (Q8_0 to Q4_0).

/// Compiles the items only where the real engine builds (the targets mlx-rs is a dependency
/// on; see the module docs).
macro_rules! where_mlx_runs {
    ($($item:item)*) => {
        $(
            #[cfg(any(
                all(target_os = "macos", target_arch = "aarch64"),
                all(mlx_linux, not(target_os = "macos"))
            ))]
            $item
        )*
    };
}

where_mlx_runs! {
    mod engine;
    pub mod kv_cache;
    pub mod model;
    pub mod weights;

    pub use engine::MlxEngine;
    pub use model::MlxLlama;

    /// Turns an MLX error into the text of an [`EngineError`](crate::EngineError).
    fn mlx_error(context: &str, err: impl std::fmt::Display) -> String {
        format!("{context}: MLX error: {err}")
    }
}

#[cfg(all(mlx_linux, not(target_os = "macos")))]
mod linux_shim;

#[cfg(not(any(
    all(target_os = "macos", target_arch = "aarch64"),
    all(mlx_linux, not(target_os = "macos"))
)))]
mod unsupported;
#[cfg(not(any(
    all(target_os = "macos", target_arch = "aarch64"),
    all(mlx_linux, not(target_os = "macos"))
)))]
pub use unsupported::MlxEngine;

/// Whether this build runs the real MLX engine (macOS on Apple Silicon, or the `mlx_linux`
/// test opt-in); when false, [`MlxEngine`] is a stub whose `load` fails with the reason.
pub const AVAILABLE: bool = cfg!(any(
    all(target_os = "macos", target_arch = "aarch64"),
    all(mlx_linux, not(target_os = "macos"))
));
