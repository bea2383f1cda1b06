//! [`ScriptedEngine`]: a deterministic **test** engine. It loads no model and does no inference.
//!
//! It exists so that supervision and chaos tests can drive a real runner process through every
//! situation the supervisor must survive (slow loads, failed loads, slow prefill, errors,
//! crashes, `exit(0)`, hangs, frozen heartbeats) with nothing but a load spec and a prompt.
//! Never select it for real traffic.
//!
//! - **Loading**: the `LoadSpec::model` string is parsed as a [`ScriptedModel`]
//!   (`scripted` or `scripted:layers=N,layer_ms=M,fail`). Each simulated layer takes `layer_ms`
//!   and reports progress after it. `LoadSpec::layer_start` / `layer_end`, when given, pick a
//!   sub-range of the layers, as a shard would.
//! - **Generating**: the prompt's plain text is a [`Script`] of directives (`tokens=N`,
//!   `delay_ms=M`, `prefill_ms=M`, `error_after=K`, `exit_after=K:CODE`, `abort_after=K`,
//!   `hang_after=K`, `freeze_after=K`, `max_context=N`; other words are ignored). Token `i`
//!   is the chunk
//!   `"{i} "` with token id `i`. Prompt usage counts whitespace-separated words; a prompt of
//!   more words than `max_context=N` fails with [`EngineError::ContextLengthExceeded`] before
//!   prefill, as a real engine refuses a prompt longer than its context.
//!   It streams `min(N, max_tokens)` tokens and finishes with `Length` when `N > max_tokens`,
//!   `Stop` otherwise (so a prompt without `tokens=` streams `max_tokens` tokens and stops with
//!   `Stop`). Stop sequences and sampling parameters are ignored; asked for log-probabilities,
//!   it reports each token with probability 1 (log-probability 0), its only alternative.
//! - **Phases**: `Prefill` is reported before the first token (which a real model produces at
//!   the end of prefill), `Decode` before the second.
//! - **Cancellation** is checked between tokens and every ≤10 ms while sleeping.
//! - **Faults** that count tokens fire once that many tokens were streamed (`K = 0`: before the
//!   first), including after the last token.

mod model_spec;
mod script;

use std::ops::ControlFlow;
use std::thread;
use std::time::{Duration, Instant};

use canopy_proto::{
    FinishReason, GenerateRequest, LoadSpec, Phase, TokenChunk, TokenLogprob, TopLogprob, Usage,
};

use crate::{Engine, EngineError, FaultHooks, GenerateOutcome, GenerateSink};

pub use model_spec::{DEFAULT_LAYERS, SCRIPTED_MODEL_PREFIX, ScriptedModel};
pub use script::Script;

/// The longest a scripted sleep goes without looking at the cancellation flag.
const CANCEL_POLL: Duration = Duration::from_millis(10);

/// The deterministic test engine; see the [module docs](self) for what it simulates.
#[derive(Debug, Default)]
pub struct ScriptedEngine {
    hooks: FaultHooks,
    model: Option<ScriptedModel>,
}

impl ScriptedEngine {
    /// An engine with no model loaded and private fault hooks (so `freeze_after` freezes
    /// nothing that anyone watches).
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine with no model loaded that pulls the host's fault switches (`freeze_after`
    /// freezes the host's heartbeat).
    pub fn with_hooks(hooks: FaultHooks) -> Self {
        Self { hooks, model: None }
    }

    /// The loaded model, if any.
    pub fn model(&self) -> Option<&ScriptedModel> {
        self.model.as_ref()
    }

    /// Fires the faults scripted to happen once `streamed` tokens were streamed.
    fn fire_faults(&self, script: &Script, streamed: u32) -> Result<(), EngineError> {
        if script.freeze_after == Some(streamed) {
            tracing::warn!(streamed, "scripted fault: freezing the heartbeat");
            self.hooks.freeze_heartbeat();
        }
        if script.error_after == Some(streamed) {
            tracing::warn!(streamed, "scripted fault: failing the generation");
            return Err(EngineError::Generate(format!(
                "scripted error after {streamed} tokens"
            )));
        }
        if let Some((_, code)) = script.exit_after.filter(|(after, _)| *after == streamed) {
            tracing::warn!(streamed, code, "scripted fault: exiting the process");
            std::process::exit(code);
        }
        if script.abort_after == Some(streamed) {
            tracing::warn!(streamed, "scripted fault: killing the process with SIGKILL");
            kill_own_process();
        }
        if script.hang_after == Some(streamed) {
            tracing::warn!(streamed, "scripted fault: wedging the work loop forever");
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        }
        Ok(())
    }
}

impl Engine for ScriptedEngine {
    fn load(
        &mut self,
        spec: &LoadSpec,
        progress: &mut dyn FnMut(u32, u32),
    ) -> Result<(), EngineError> {
        self.model = None;
        let model = ScriptedModel::parse(&spec.model)?;
        let start = spec.layer_start.unwrap_or(0);
        let end = spec.layer_end.unwrap_or(model.layers);
        if start > end || end > model.layers {
            return Err(EngineError::InvalidModel {
                model: spec.model.clone(),
                reason: format!(
                    "layer range {start}..{end} does not fit the model's {} layers",
                    model.layers
                ),
            });
        }
        let total = end - start;
        tracing::info!(model = %spec.model, layers = total, "scripted engine: loading");
        for done in 1..=total {
            thread::sleep(model.layer_time);
            progress(done, total);
        }
        if model.fail {
            return Err(EngineError::LoadFailed {
                model: spec.model.clone(),
                reason: "the scripted model is set to fail loading".to_string(),
            });
        }
        self.model = Some(model);
        tracing::info!(model = %spec.model, "scripted engine: loaded");
        Ok(())
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        sink: &mut dyn GenerateSink,
    ) -> Result<GenerateOutcome, EngineError> {
        if self.model.is_none() {
            return Err(EngineError::NotLoaded);
        }
        let text = request.prompt.to_plain_text();
        let script = Script::parse(&text)?;
        let max_tokens = request.params.max_tokens;
        let wanted = script.tokens.unwrap_or(max_tokens);
        let (count, finish_reason) = if wanted > max_tokens {
            (max_tokens, FinishReason::Length)
        } else {
            (wanted, FinishReason::Stop)
        };
        let mut usage = Usage {
            prompt_tokens: u32::try_from(text.split_whitespace().count()).unwrap_or(u32::MAX),
            completion_tokens: 0,
        };
        let cancelled = |usage| {
            tracing::debug!(?usage, "scripted engine: cancelled");
            Ok(GenerateOutcome {
                finish_reason: FinishReason::Cancelled,
                usage,
            })
        };
        if let Some(max_context) = script.max_context {
            let prompt_tokens = usage.prompt_tokens as usize;
            if prompt_tokens > max_context {
                return Err(EngineError::ContextLengthExceeded {
                    prompt_tokens,
                    max_context,
                });
            }
        }
        tracing::debug!(?script, count, "scripted engine: generating");

        sink.phase(Phase::Prefill);
        if sleep_unless_cancelled(script.prefill, sink) {
            return cancelled(usage);
        }
        // Faults fire straight after the K-th chunk is handed over, before any cancel check:
        // a scripted wedge or exit must not lose a race against a cancel sent in reply to
        // that very chunk.
        self.fire_faults(&script, 0)?;
        for index in 0..count {
            if sink.cancelled() {
                return cancelled(usage);
            }
            if index == 1 {
                sink.phase(Phase::Decode);
            }
            if sleep_unless_cancelled(script.delay, sink) {
                return cancelled(usage);
            }
            let text = format!("{index} ");
            // The script leaves no choice: each token has probability 1.
            let logprobs = match request.params.logprobs {
                None => Vec::new(),
                Some(k) => vec![TokenLogprob {
                    token: index,
                    bytes: text.clone().into_bytes(),
                    logprob: 0.0,
                    top: (k > 0)
                        .then(|| TopLogprob {
                            token: index,
                            bytes: text.clone().into_bytes(),
                            logprob: 0.0,
                        })
                        .into_iter()
                        .collect(),
                }],
            };
            let flow = sink.chunk(TokenChunk {
                index,
                text,
                token_ids: vec![index],
                logprobs,
            });
            usage.completion_tokens = index + 1;
            self.fire_faults(&script, index + 1)?;
            if flow == ControlFlow::Break(()) {
                return cancelled(usage);
            }
        }
        Ok(GenerateOutcome {
            finish_reason,
            usage,
        })
    }
}

/// Sleeps for `duration` in slices of at most [`CANCEL_POLL`]; returns true (early) when the
/// sink reports the task cancelled.
fn sleep_unless_cancelled(duration: Duration, sink: &dyn GenerateSink) -> bool {
    let deadline = Instant::now() + duration;
    loop {
        if sink.cancelled() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        thread::sleep(left.min(CANCEL_POLL));
    }
}

/// Kills this whole process with SIGKILL, as the kernel's OOM killer would.
fn kill_own_process() -> ! {
    #[cfg(unix)]
    {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        if let Err(err) = kill(Pid::this(), Signal::SIGKILL) {
            tracing::error!(%err, "cannot SIGKILL our own process; aborting instead");
        }
    }
    // Not reached on unix once the signal is delivered; elsewhere the closest equivalent.
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use canopy_proto::{GenerateParams, Prompt};

    use super::*;

    /// Records everything the engine reports; cancels after `break_after` chunks, or when the
    /// shared flag is set.
    #[derive(Default)]
    struct RecordingSink {
        phases: Vec<Phase>,
        chunks: Vec<TokenChunk>,
        break_after: Option<usize>,
        cancel: Arc<AtomicBool>,
    }

    impl GenerateSink for RecordingSink {
        fn phase(&mut self, phase: Phase) {
            self.phases.push(phase);
        }

        fn chunk(&mut self, chunk: TokenChunk) -> ControlFlow<()> {
            self.chunks.push(chunk);
            if Some(self.chunks.len()) == self.break_after {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        }

        fn cancelled(&self) -> bool {
            self.cancel.load(Ordering::SeqCst)
        }
    }

    fn request(prompt: &str, max_tokens: u32) -> GenerateRequest {
        GenerateRequest {
            tools: Vec::new(),
            prompt: Prompt::Text(prompt.to_string()),
            params: GenerateParams {
                max_tokens,
                ..GenerateParams::default()
            },
        }
    }

    fn load_spec(model: &str) -> LoadSpec {
        LoadSpec {
            model: model.to_string(),
            layer_start: None,
            layer_end: None,
            threads: None,
            parallel: None,
        }
    }

    fn loaded_engine() -> ScriptedEngine {
        let mut engine = ScriptedEngine::new();
        let loaded = engine.load(&load_spec("scripted:layers=1"), &mut |_, _| {});
        assert!(loaded.is_ok(), "{loaded:?}");
        engine
    }

    fn run(
        engine: &mut ScriptedEngine,
        prompt: &str,
        max_tokens: u32,
        sink: &mut RecordingSink,
    ) -> Result<GenerateOutcome, EngineError> {
        engine.generate(&request(prompt, max_tokens), sink)
    }

    #[test]
    fn load_reports_progress_per_layer() {
        let mut engine = ScriptedEngine::new();
        let mut seen = Vec::new();
        let loaded = engine.load(&load_spec("scripted:layers=3"), &mut |done, total| {
            seen.push((done, total));
        });
        assert!(loaded.is_ok(), "{loaded:?}");
        assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);
        assert_eq!(engine.model().map(|m| m.layers), Some(3));
    }

    #[test]
    fn load_honours_a_layer_range() {
        let mut engine = ScriptedEngine::new();
        let mut spec = load_spec("scripted:layers=8");
        spec.layer_start = Some(2);
        spec.layer_end = Some(5);
        let mut seen = Vec::new();
        let loaded = engine.load(&spec, &mut |done, total| seen.push((done, total)));
        assert!(loaded.is_ok(), "{loaded:?}");
        assert_eq!(seen, vec![(1, 3), (2, 3), (3, 3)]);

        spec.layer_end = Some(9);
        let err = engine.load(&spec, &mut |_, _| {});
        assert!(
            matches!(err, Err(EngineError::InvalidModel { .. })),
            "{err:?}"
        );
    }

    #[test]
    fn failing_load_leaves_no_model() {
        let mut engine = loaded_engine();
        let mut layers = 0;
        let err = engine.load(&load_spec("scripted:layers=2,fail"), &mut |_, _| {
            layers += 1
        });
        assert!(
            matches!(err, Err(EngineError::LoadFailed { .. })),
            "{err:?}"
        );
        assert_eq!(layers, 2);
        assert!(engine.model().is_none());
        let mut sink = RecordingSink::default();
        let err = run(&mut engine, "tokens=1", 8, &mut sink);
        assert!(matches!(err, Err(EngineError::NotLoaded)), "{err:?}");
    }

    #[test]
    fn load_rejects_a_real_model_naming_it() {
        let mut engine = ScriptedEngine::new();
        let err = engine.load(&load_spec("/m/smollm.gguf"), &mut |_, _| {});
        let text = err.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(text.contains("\"/m/smollm.gguf\""), "{text}");
    }

    #[test]
    fn generate_before_load_is_not_loaded() {
        let mut sink = RecordingSink::default();
        let err = run(&mut ScriptedEngine::new(), "tokens=1", 8, &mut sink);
        assert!(matches!(err, Err(EngineError::NotLoaded)), "{err:?}");
    }

    #[test]
    fn streams_the_scripted_tokens() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        let outcome = run(&mut engine, "say tokens=5 please", 16, &mut sink).ok();
        assert_eq!(
            outcome,
            Some(GenerateOutcome {
                finish_reason: FinishReason::Stop,
                usage: Usage {
                    prompt_tokens: 3,
                    completion_tokens: 5
                },
            })
        );
        assert_eq!(sink.phases, vec![Phase::Prefill, Phase::Decode]);
        let texts: Vec<_> = sink.chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, vec!["0 ", "1 ", "2 ", "3 ", "4 "]);
        for (i, chunk) in sink.chunks.iter().enumerate() {
            assert_eq!(chunk.index as usize, i);
            assert_eq!(chunk.token_ids, vec![i as u32]);
        }
    }

    #[test]
    fn caps_at_max_tokens_with_length() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        let outcome = run(&mut engine, "tokens=10", 4, &mut sink).ok();
        assert_eq!(outcome.map(|o| o.finish_reason), Some(FinishReason::Length));
        assert_eq!(sink.chunks.len(), 4);
    }

    #[test]
    fn defaults_to_max_tokens() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        let outcome = run(&mut engine, "hello", 3, &mut sink).ok();
        assert_eq!(outcome.map(|o| o.finish_reason), Some(FinishReason::Stop));
        assert_eq!(sink.chunks.len(), 3);
    }

    #[test]
    fn zero_tokens_still_prefills() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        let outcome = run(&mut engine, "tokens=0", 3, &mut sink).ok();
        assert_eq!(outcome.map(|o| o.finish_reason), Some(FinishReason::Stop));
        assert_eq!(sink.phases, vec![Phase::Prefill]);
        assert!(sink.chunks.is_empty());
    }

    #[test]
    fn chat_prompts_are_scripts_too() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        let request = GenerateRequest {
            tools: Vec::new(),
            prompt: Prompt::Chat(vec![
                canopy_proto::ChatMessage::new("system", "be brief".to_string()),
                canopy_proto::ChatMessage::new("user", "tokens=2".to_string()),
            ]),
            params: GenerateParams::default(),
        };
        let outcome = engine.generate(&request, &mut sink).ok();
        assert_eq!(outcome.map(|o| o.usage.prompt_tokens), Some(3));
        assert_eq!(sink.chunks.len(), 2);
    }

    #[test]
    fn error_after_fails_after_k_tokens() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        let err = run(&mut engine, "tokens=5 error_after=2", 8, &mut sink);
        assert!(matches!(err, Err(EngineError::Generate(_))), "{err:?}");
        assert_eq!(sink.chunks.len(), 2);

        let mut sink = RecordingSink::default();
        let err = run(&mut engine, "tokens=2 error_after=2", 8, &mut sink);
        assert!(matches!(err, Err(EngineError::Generate(_))), "{err:?}");
        assert_eq!(sink.chunks.len(), 2);
    }

    #[test]
    fn a_prompt_longer_than_max_context_is_refused_before_prefill() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        let err = run(&mut engine, "one two three max_context=3", 8, &mut sink);
        assert!(
            matches!(
                err,
                Err(EngineError::ContextLengthExceeded {
                    prompt_tokens: 4,
                    max_context: 3
                })
            ),
            "{err:?}"
        );
        assert!(sink.phases.is_empty());
        let mut sink = RecordingSink::default();
        let outcome = run(&mut engine, "tokens=2 max_context=2", 8, &mut sink);
        assert!(outcome.is_ok(), "{outcome:?}");
    }

    #[test]
    fn bad_directive_is_an_invalid_request() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        let err = run(&mut engine, "tokens=lots", 8, &mut sink);
        assert!(
            matches!(err, Err(EngineError::InvalidRequest(_))),
            "{err:?}"
        );
        assert!(sink.phases.is_empty());
    }

    #[test]
    fn break_from_the_sink_cancels() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink {
            break_after: Some(3),
            ..RecordingSink::default()
        };
        let outcome = run(&mut engine, "tokens=10", 16, &mut sink).ok();
        assert_eq!(
            outcome.map(|o| o.finish_reason),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(outcome.map(|o| o.usage.completion_tokens), Some(3));
        assert_eq!(sink.chunks.len(), 3);
    }

    #[test]
    fn cancel_flag_interrupts_a_long_delay() {
        let mut engine = loaded_engine();
        let cancel = Arc::new(AtomicBool::new(false));
        let mut sink = RecordingSink {
            cancel: Arc::clone(&cancel),
            ..RecordingSink::default()
        };
        let canceller = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            cancel.store(true, Ordering::SeqCst);
        });
        let started = Instant::now();
        let outcome = run(&mut engine, "tokens=3 delay_ms=60000", 16, &mut sink).ok();
        assert!(canceller.join().is_ok());
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            outcome.map(|o| o.finish_reason),
            Some(FinishReason::Cancelled)
        );
        assert!(sink.chunks.is_empty());
    }

    #[test]
    fn cancel_during_prefill() {
        let mut engine = loaded_engine();
        let mut sink = RecordingSink::default();
        sink.cancel.store(true, Ordering::SeqCst);
        let outcome = run(&mut engine, "tokens=3 prefill_ms=60000", 16, &mut sink).ok();
        assert_eq!(
            outcome.map(|o| o.finish_reason),
            Some(FinishReason::Cancelled)
        );
        assert_eq!(sink.phases, vec![Phase::Prefill]);
    }

    #[test]
    fn freeze_after_flips_the_host_hook_and_keeps_streaming() {
        let hooks = FaultHooks::new();
        let mut engine = ScriptedEngine::with_hooks(hooks.clone());
        let loaded = engine.load(&load_spec("scripted"), &mut |_, _| {});
        assert!(loaded.is_ok());
        let mut sink = RecordingSink::default();
        let outcome = run(&mut engine, "tokens=4 freeze_after=2", 16, &mut sink).ok();
        assert!(hooks.heartbeat_frozen());
        assert_eq!(outcome.map(|o| o.finish_reason), Some(FinishReason::Stop));
        assert_eq!(sink.chunks.len(), 4);
    }
}
