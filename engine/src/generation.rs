//! The generation loop every GGUF engine shares: sampling, EOS, max tokens, stop sequences
//! (through [`StopFilter`]), whole-UTF-8 streaming, phases and cancellation between tokens.
//! An engine supplies only its forward pass.

use std::ops::ControlFlow;

use candle_core::Tensor;
use canopy_proto::{
    FinishReason, GenerateParams, GenerateRequest, Phase, Prompt, TokenChunk, Usage,
};

use crate::chat::ChatTemplate;
use crate::sampling::Sampler;
use crate::stop::StopFilter;
use crate::tokenizer::GgufTokenizer;
use crate::{Engine, EngineError, GenerateOutcome, GenerateSink};

/// The text a prompt stands for: plain text as it is, a chat rendered with the model's
/// template (the assistant's turn opened).
pub(crate) fn prompt_text(template: &ChatTemplate, prompt: &Prompt) -> Result<String, EngineError> {
    match prompt {
        Prompt::Text(text) => Ok(text.clone()),
        Prompt::Chat(messages) => Ok(template.render(messages, true)?),
    }
}

/// Warms a loaded engine up: a 2-token generation whose output goes nowhere.
pub(crate) fn warm_up(engine: &mut dyn Engine) -> Result<(), EngineError> {
    struct Quiet;
    impl GenerateSink for Quiet {
        fn phase(&mut self, _: Phase) {}
        fn chunk(&mut self, _: TokenChunk) -> ControlFlow<()> {
            ControlFlow::Continue(())
        }
        fn cancelled(&self) -> bool {
            false
        }
    }
    let request = GenerateRequest {
        prompt: Prompt::Text("Hello".into()),
        params: GenerateParams {
            max_tokens: 2,
            ..GenerateParams::default()
        },
    };
    engine.generate(&request, &mut Quiet).map(|_| ())
}

/// Generates after the encoded `prompt`, in a model that holds at most `room` positions.
///
/// `forward(tokens, pos)` runs the model over `tokens` placed from position `pos` (the KV
/// cache must be empty before the call) and returns the last position's logits.
pub(crate) fn run_generation(
    prompt: &[u32],
    room: usize,
    params: &GenerateParams,
    tokenizer: &GgufTokenizer,
    sink: &mut dyn GenerateSink,
    mut forward: impl FnMut(&[u32], usize) -> Result<Tensor, EngineError>,
) -> Result<GenerateOutcome, EngineError> {
    if prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    if prompt.len() >= room {
        return Err(EngineError::ContextLengthExceeded {
            prompt_tokens: prompt.len(),
            max_context: room,
        });
    }
    let max_tokens = (params.max_tokens as usize).min(room - prompt.len());
    let mut sampler = Sampler::new(params)?;
    let mut stream = tokenizer.stream();
    let mut stops = StopFilter::new(&params.stop);
    let usage = |completion: usize| Usage {
        prompt_tokens: prompt.len() as u32,
        completion_tokens: completion as u32,
    };

    sink.phase(Phase::Prefill);
    let mut logits = forward(prompt, 0)?;
    let mut generated = 0usize;
    let mut finish = FinishReason::Length;
    while generated < max_tokens {
        if sink.cancelled() {
            finish = FinishReason::Cancelled;
            break;
        }
        let next = sampler.sample(&logits)?;
        if tokenizer.is_eos(next) {
            finish = FinishReason::Stop;
            break;
        }
        generated += 1;
        let piece = stream.push(next).unwrap_or_default();
        let (text, stopped) = stops.push(&piece);
        let chunk = TokenChunk {
            index: (generated - 1) as u32,
            text,
            token_ids: vec![next],
        };
        if let ControlFlow::Break(()) = sink.chunk(chunk) {
            finish = FinishReason::Cancelled;
            break;
        }
        if stopped {
            finish = FinishReason::Stop;
            break;
        }
        if generated == 1 {
            sink.phase(Phase::Decode);
        }
        if generated < max_tokens {
            let pos = prompt.len() + generated - 1;
            logits = forward(&[next], pos)?;
        }
    }
    if finish != FinishReason::Cancelled {
        // Whatever was held back (a partial stop sequence, an unfinished character).
        let rest = {
            let tail = stream.finish();
            let (mut out, _) = stops.push(&tail);
            out.push_str(&stops.finish());
            out
        };
        if !rest.is_empty() {
            let _ = sink.chunk(TokenChunk {
                index: generated as u32,
                text: rest,
                token_ids: Vec::new(),
            });
        }
    }
    Ok(GenerateOutcome {
        finish_reason: finish,
        usage: usage(generated),
    })
}
