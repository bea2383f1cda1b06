//! The generation loop every GGUF engine shares: sampling, EOS, max tokens, stop sequences
//! (through [`StopFilter`]), grammar constraints (through [`Grammar`]), whole-UTF-8 streaming,
//! phases and cancellation between tokens.
//! An engine supplies only its forward pass.

use std::ops::ControlFlow;

use candle_core::Tensor;
use canopy_proto::{
    FinishReason, GenerateParams, GenerateRequest, Phase, Prompt, TokenChunk, TokenLogprob,
    ToolSpec, TopLogprob, Usage,
};

use crate::chat::ChatTemplate;
use crate::grammar::Grammar;
use crate::sampling::{Logprobs, Sampler};
use crate::stop::StopFilter;
use crate::tokenizer::{GgufTokenizer, StreamState};
use crate::{Engine, EngineError, GenerateOutcome, GenerateSink};

/// The text a prompt stands for: plain text as it is, a chat rendered with the model's
/// template (the assistant's turn opened, `tools` shown to the model).
pub(crate) fn prompt_text(
    template: &ChatTemplate,
    prompt: &Prompt,
    tools: &[ToolSpec],
) -> Result<String, EngineError> {
    match prompt {
        Prompt::Text(text) => Ok(text.clone()),
        Prompt::Chat(messages) => Ok(template.render_with_tools(messages, tools, true)?),
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
        tools: Vec::new(),
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
    let mut decoder = Decoder::new(prompt.len(), room, params, tokenizer)?;
    sink.phase(Phase::Prefill);
    if let Some(outcome) = decoder.finished_before_start(sink) {
        return Ok(outcome);
    }
    let mut logits = forward(prompt, 0)?;
    loop {
        match decoder.advance(&logits, tokenizer, sink)? {
            Next::Feed(token) => logits = forward(&[token], decoder.position() - 1)?,
            Next::Finished(outcome) => return Ok(outcome),
        }
    }
}

/// What a sequence needs after [`Decoder::advance`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Run this token through the model (at position [`Decoder::position`] `- 1`) and hand the
    /// logits back.
    Feed(u32),
    /// The generation ended.
    Finished(GenerateOutcome),
}

/// One generation's decoding state, between forwards: sampling, end-of-generation, the token
/// budget, stop sequences, whole-UTF-8 streaming and phase reports. It owns everything it
/// needs (no borrows), so a batch can hold one per sequence; the solo loop
/// ([`run_generation`]) and the batch ([`crate::batch`]) both drive generations through it,
/// so a sequence is decoded the same way whichever runs it.
#[derive(Debug)]
pub(crate) struct Decoder {
    prompt_len: usize,
    max_tokens: usize,
    sampler: Sampler,
    stream: StreamState,
    stops: StopFilter,
    grammar: Option<Grammar>,
    generated: usize,
}

impl Decoder {
    /// Checks the prompt against the model's `room` (positions) and the parameters.
    pub(crate) fn new(
        prompt_len: usize,
        room: usize,
        params: &GenerateParams,
        tokenizer: &GgufTokenizer,
    ) -> Result<Self, EngineError> {
        if prompt_len == 0 {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt_len >= room {
            return Err(EngineError::ContextLengthExceeded {
                prompt_tokens: prompt_len,
                max_context: room,
            });
        }
        let sampler = Sampler::new(params)?;
        let vocab = tokenizer.vocab_size();
        if let Some(id) = sampler.biased_tokens().find(|&id| id as usize >= vocab) {
            return Err(EngineError::InvalidRequest(format!(
                "logit_bias names token {id}, but the model's vocabulary has {vocab} tokens \
                 (0 to {})",
                vocab.saturating_sub(1)
            )));
        }
        let grammar = params
            .constraint
            .as_ref()
            .map(|c| Grammar::new(tokenizer, c))
            .transpose()?;
        Ok(Self {
            prompt_len,
            max_tokens: (params.max_tokens as usize).min(room - prompt_len),
            sampler,
            stream: StreamState::new(tokenizer),
            stops: StopFilter::new(&params.stop),
            grammar,
            generated: 0,
        })
    }

    /// Positions the sequence occupies once its last sampled token is fed.
    pub(crate) fn position(&self) -> usize {
        self.prompt_len + self.generated
    }

    /// Most positions the sequence can ever occupy (prompt plus its token budget).
    pub(crate) fn max_positions(&self) -> usize {
        self.prompt_len + self.max_tokens
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len as u32,
            completion_tokens: self.generated as u32,
        }
    }

    /// `Some` when the generation ends without any forward (a zero token budget).
    pub(crate) fn finished_before_start(
        &mut self,
        sink: &mut dyn GenerateSink,
    ) -> Option<GenerateOutcome> {
        (self.max_tokens == 0).then(|| self.finish(FinishReason::Length, sink))
    }

    /// Ends the generation as cancelled (its consumer is gone).
    pub(crate) fn cancel(&mut self) -> GenerateOutcome {
        GenerateOutcome {
            finish_reason: FinishReason::Cancelled,
            usage: self.usage(),
        }
    }

    /// Takes the logits of the last fed position: samples the next token, streams it, and
    /// says whether to feed it or that the generation ended.
    pub(crate) fn advance(
        &mut self,
        logits: &Tensor,
        tokenizer: &GgufTokenizer,
        sink: &mut dyn GenerateSink,
    ) -> Result<Next, EngineError> {
        if sink.cancelled() {
            return Ok(Next::Finished(self.cancel()));
        }
        let mask = self.grammar.as_mut().map(Grammar::mask).transpose()?;
        let allowed = mask
            .as_ref()
            .map(|m| move |id: u32| m.allows(id, tokenizer.is_eos(id)));
        let sampled = self
            .sampler
            .sample_masked(logits, allowed.as_ref().map(|f| f as &dyn Fn(u32) -> bool))?;
        let next = sampled.token;
        if tokenizer.is_eos(next) {
            return Ok(Next::Finished(self.finish(FinishReason::Stop, sink)));
        }
        if let Some(grammar) = &mut self.grammar {
            grammar.consume(next)?;
        }
        self.generated += 1;
        let piece = self.stream.push(tokenizer, next).unwrap_or_default();
        let (text, stopped) = self.stops.push(&piece);
        let chunk = TokenChunk {
            index: (self.generated - 1) as u32,
            text,
            token_ids: vec![next],
            logprobs: sampled
                .logprobs
                .map(|l| vec![token_logprob(tokenizer, next, l)])
                .unwrap_or_default(),
        };
        if let ControlFlow::Break(()) = sink.chunk(chunk) {
            return Ok(Next::Finished(self.cancel()));
        }
        if let Some(index) = stopped {
            let reason = FinishReason::StopSequence(index);
            return Ok(Next::Finished(self.finish(reason, sink)));
        }
        if self.grammar.as_mut().is_some_and(Grammar::is_complete) {
            return Ok(Next::Finished(self.finish(FinishReason::Stop, sink)));
        }
        if self.generated == 1 {
            sink.phase(Phase::Decode);
        }
        if self.generated < self.max_tokens {
            Ok(Next::Feed(next))
        } else {
            Ok(Next::Finished(self.finish(FinishReason::Length, sink)))
        }
    }

    /// Ends the generation, streaming whatever was held back (a partial stop sequence, an
    /// unfinished character).
    fn finish(&mut self, reason: FinishReason, sink: &mut dyn GenerateSink) -> GenerateOutcome {
        let rest = {
            let tail = self.stream.finish();
            let (mut out, _) = self.stops.push(&tail);
            out.push_str(&self.stops.finish());
            out
        };
        if !rest.is_empty() {
            let _ = sink.chunk(TokenChunk {
                index: self.generated as u32,
                text: rest,
                token_ids: Vec::new(),
                logprobs: Vec::new(),
            });
        }
        GenerateOutcome {
            finish_reason: reason,
            usage: self.usage(),
        }
    }
}

/// A sampled token's log-probabilities as the protocol carries them, with each token's bytes.
fn token_logprob(tokenizer: &GgufTokenizer, token: u32, logprobs: Logprobs) -> TokenLogprob {
    let bytes = |id: u32| tokenizer.piece(id).map(<[u8]>::to_vec).unwrap_or_default();
    TokenLogprob {
        token,
        bytes: bytes(token),
        logprob: logprobs.chosen,
        top: logprobs
            .top
            .into_iter()
            .map(|(id, logprob)| TopLogprob {
                token: id,
                bytes: bytes(id),
                logprob,
            })
            .collect(),
    }
}
