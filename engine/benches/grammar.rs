//! What grammar-constrained decoding costs (`just bench-grammar`): the default model (or
//! `CANOPY_BENCH_MODEL`) through `CandleEngine` on `CANOPY_BENCH_THREADS` threads (default 2),
//! greedy, each row the median of `CANOPY_BENCH_REPS` runs (default 5):
//!
//! - **first constrained request**: the extra time of the first JSON-schema request on a
//!   freshly loaded engine over an unconstrained one of the same prompt and length (both with
//!   the prompt in the prefix cache), which is
//!   building the grammar compiler over the vocabulary (once per tokenizer) and compiling
//!   the schema;
//! - **per request**: the same extra time once the compiler exists (compiling the schema, or
//!   a forced tool call's Lark grammar, and the masks of a short answer);
//! - **per token**: the time between tokens of a 96-token answer, free and under a JSON
//!   schema whose one string field lets the model write freely, so that the difference is
//!   the mask's own cost.
//!
//! Numbers only: nothing here asserts a speed.

use std::error::Error;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use canopy_engine::candle_engine::Backend;
use canopy_engine::{CandleEngine, Engine, GenerateSink};
use canopy_proto::{
    ChatMessage, Constraint, GenerateParams, GenerateRequest, LoadSpec, Phase, Prompt, TokenChunk,
    ToolSpec,
};

type BoxError = Box<dyn Error + Send + Sync>;

/// When each token arrived.
#[derive(Default)]
struct Times {
    tokens: Vec<Instant>,
}

impl GenerateSink for Times {
    fn phase(&mut self, _: Phase) {}
    fn chunk(&mut self, chunk: TokenChunk) -> ControlFlow<()> {
        if !chunk.token_ids.is_empty() {
            self.tokens.push(Instant::now());
        }
        ControlFlow::Continue(())
    }
    fn cancelled(&self) -> bool {
        false
    }
}

const FREE_TEXT: &str = r#"{"type": "object", "properties": {"story": {"type": "string"}},
    "required": ["story"], "additionalProperties": false}"#;

const PERSON: &str = r#"{"type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150}},
    "required": ["name", "age"], "additionalProperties": false}"#;

fn request(
    constraint: Option<Constraint>,
    max_tokens: u32,
    tools: Vec<ToolSpec>,
) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Chat(vec![ChatMessage::new(
            "user",
            "Tell me a long story about a cat, as JSON.",
        )]),
        params: GenerateParams {
            max_tokens,
            temperature: 0.0,
            constraint,
            ..GenerateParams::default()
        },
        tools,
    }
}

fn run(
    engine: &mut CandleEngine,
    request: &GenerateRequest,
) -> Result<(Duration, Times), BoxError> {
    let mut times = Times::default();
    let started = Instant::now();
    engine.generate(request, &mut times)?;
    Ok((started.elapsed(), times))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Milliseconds between a run's tokens, past its first.
fn per_token_ms(times: &Times) -> f64 {
    let n = times.tokens.len();
    if n < 2 {
        return f64::NAN;
    }
    (times.tokens[n - 1] - times.tokens[0]).as_secs_f64() * 1e3 / (n - 1) as f64
}

fn load(spec: &LoadSpec) -> Result<CandleEngine, BoxError> {
    let mut engine = CandleEngine::new(Backend::Cpu);
    engine.load(spec, &mut |_, _| {})?;
    engine.warm_up()?;
    Ok(engine)
}

fn main() -> Result<(), BoxError> {
    let model = match std::env::var_os("CANOPY_BENCH_MODEL").filter(|p| !p.is_empty()) {
        Some(path) => path.into(),
        None => canopy_store::ensure_default_model()?,
    };
    let threads: u32 = std::env::var("CANOPY_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let reps: usize = std::env::var("CANOPY_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
        .max(1);
    let spec = LoadSpec {
        model: model.display().to_string(),
        layer_start: None,
        layer_end: None,
        threads: Some(threads),
        parallel: Some(1),
    };
    let schema = || Some(Constraint::JsonSchema(PERSON.into()));
    let tool = ToolSpec {
        name: "get_weather".into(),
        description: Some("The current weather in a city.".into()),
        parameters: r#"{"type": "object", "properties": {"city": {"type": "string"}},
            "required": ["city"]}"#
            .into(),
    };

    // The first constrained request of a fresh engine, against an unconstrained one. Every
    // pair is timed with the prompt already in the prefix cache (an untimed free run first),
    // so that both skip the same prefill.
    let mut first = Vec::new();
    for _ in 0..reps {
        let mut engine = load(&spec)?;
        run(&mut engine, &request(None, 8, Vec::new()))?;
        let (free, _) = run(&mut engine, &request(None, 8, Vec::new()))?;
        let (constrained, _) = run(&mut engine, &request(schema(), 8, Vec::new()))?;
        first.push((constrained.as_secs_f64() - free.as_secs_f64()) * 1e3);
    }

    let mut engine = load(&spec)?;
    run(&mut engine, &request(schema(), 8, Vec::new()))?;
    let (mut schema_extra, mut tool_extra) = (Vec::new(), Vec::new());
    let (mut free_tok, mut masked_tok) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let (free, _) = run(&mut engine, &request(None, 8, Vec::new()))?;
        let (constrained, _) = run(&mut engine, &request(schema(), 8, Vec::new()))?;
        schema_extra.push((constrained.as_secs_f64() - free.as_secs_f64()) * 1e3);
        let forced = request(
            Some(Constraint::ToolCall(vec![tool.clone()])),
            8,
            vec![tool.clone()],
        );
        let plain_tools = request(None, 8, vec![tool.clone()]);
        run(&mut engine, &plain_tools)?;
        let (free, _) = run(&mut engine, &plain_tools)?;
        let (constrained, _) = run(&mut engine, &forced)?;
        tool_extra.push((constrained.as_secs_f64() - free.as_secs_f64()) * 1e3);
        let (_, free) = run(&mut engine, &request(None, 96, Vec::new()))?;
        let (_, masked) = run(
            &mut engine,
            &request(
                Some(Constraint::JsonSchema(FREE_TEXT.into())),
                96,
                Vec::new(),
            ),
        )?;
        free_tok.push(per_token_ms(&free));
        masked_tok.push(per_token_ms(&masked));
    }

    println!(
        "grammar benchmark: {} on {threads} threads, greedy, median of {reps}",
        model.display()
    );
    println!("| what | ms |");
    println!("|---|---|");
    println!(
        "| first JSON-schema request of a fresh engine, over a free one (8 tokens) | {:.1} |",
        median(first)
    );
    println!(
        "| a JSON-schema request once the compiler exists, over a free one (8 tokens) | {:.1} |",
        median(schema_extra)
    );
    println!(
        "| a forced tool call, over a free request with the same tools (8 tokens) | {:.1} |",
        median(tool_extra)
    );
    let (free, masked) = (median(free_tok), median(masked_tok));
    println!("| per token, free (96 tokens) | {free:.2} |");
    println!("| per token, under a JSON schema (96 tokens) | {masked:.2} |");
    println!("| the mask's cost per token | {:.2} |", masked - free);
    Ok(())
}
