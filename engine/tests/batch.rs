//! Continuous batching with the real default model through `CandleEngine` (`BatchEngine`):
//!
//! - **batch invariance** (property test): any set of 2–6 requests (short and ~150-token chat
//!   prompts, some sharing a system prompt, some identical; greedy, seeded sampling and a stop
//!   sequence; 1–23 tokens), each joining at a random step, gives every request the same token
//!   ids, text and outcome as running it alone with `Engine::generate`, and a solo run repeated
//!   once the prefix cache holds its prompt gives the same again;
//! - cancellation (`BatchSink::cancelled`) and `leave` end one sequence as `Cancelled` (its
//!   output a prefix of its solo output) and leave the others bit-identical to their solo runs;
//! - chunked prefill: a ~600-token prompt joining beside decoding sequences takes several
//!   steps, never more than the step's row budget, while the decoding sequences get a token at
//!   every one of them, and its output equals its solo output;
//! - the prefix cache: the same prompt again reuses all but its last position (counted in
//!   `report()`), with the same output; a prompt longer than the context is refused at `join`
//!   (`ContextLengthExceeded`) without disturbing the batch;
//! - admission: with `parallel = 2`, a third request waits (`Admission::Wait`) until a
//!   sequence finishes, then joins and runs like its solo run.
//!
//! The batched forward's logits against the reference single-sequence forward are checked in
//! `tests/shards.rs`.

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::{Mutex, MutexGuard, OnceLock};

use canopy_engine::{
    Admission, BatchSink, CandleEngine, Engine, EngineError, GenerateOutcome, SeqId,
    candle_engine::Backend,
};
use canopy_proto::{
    ChatMessage, FinishReason, GenerateParams, GenerateRequest, LoadSpec, Phase, Prompt, TokenChunk,
};
use common::{Collect, chat, spec};
use proptest::prelude::*;

/// Highest sequence id the tests use (see [`lock`]).
const MAX_ID: SeqId = 64;

fn load(spec: &LoadSpec) -> CandleEngine {
    let mut engine = CandleEngine::new(Backend::Cpu);
    engine
        .load(spec, &mut |_, _| {})
        .expect("the default model loads");
    engine
}

fn model() -> String {
    common::model_path().display().to_string()
}

/// One engine (default load spec) for the whole file; tests take turns.
fn engine() -> &'static Mutex<CandleEngine> {
    static ENGINE: OnceLock<Mutex<CandleEngine>> = OnceLock::new();
    ENGINE.get_or_init(|| Mutex::new(load(&spec(&model()))))
}

/// The shared engine, with an empty batch even if a failed test left sequences in it.
fn lock() -> MutexGuard<'static, CandleEngine> {
    let mut engine = engine().lock().unwrap_or_else(|p| p.into_inner());
    let batch = engine.batching().expect("a CPU engine batches");
    for id in 0..=MAX_ID {
        batch.leave(id);
    }
    assert_eq!(batch.active(), 0, "a sequence outside the test ids");
    engine
}

/// A system prompt of about 120 tokens that several requests share.
const SYSTEM: &str = "You are the trail assistant of a hiking club in the hills above a small \
    river town. Answer members' questions about routes, gear, weather and safety in plain \
    language. Keep answers short and practical. The club's routes are: the River Path (easy, \
    six kilometres, flat, along the east bank to the old mill), the Ridge Loop (moderate, \
    twelve kilometres, three hundred metres of climbing, views of the valley), and the High \
    Traverse (hard, twenty kilometres, exposed in places, only in dry weather). Members must \
    carry water, a map and a charged phone on every route.";

/// A user message of about 150 tokens on its own.
const LONG_QUESTION: &str = "I am planning my first long walk with the club next month and I \
    would like some advice. I have walked in the park near my house most weekends this year, \
    usually for an hour or two, but never on hills or on rough ground. My boots are new and I \
    have only worn them twice. I do not know how much water to carry, whether I need walking \
    poles, what to eat on the way, or how to tell whether the weather is going to turn. I am \
    also a little worried about keeping up with the group on the climbs, and about what \
    happens if I get tired halfway round. Which route would you suggest, and how should I \
    prepare for it over the next four weeks?";

/// The prompt pool of the property test: `(system prompt, user message)`.
const POOL: &[(Option<&str>, &str)] = &[
    (None, "What is 2+2? Reply with just the number."),
    (None, "Write a haiku about trees."),
    (Some(SYSTEM), "Which route is best for a beginner?"),
    (Some(SYSTEM), "What should I pack for the Ridge Loop?"),
    (None, LONG_QUESTION),
    (Some(SYSTEM), LONG_QUESTION),
    (None, "Tell me a long story."),
    (None, "Count from one to one hundred in words."),
];

fn pooled(prompt: usize, params: GenerateParams) -> GenerateRequest {
    let (system, user) = POOL[prompt];
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(ChatMessage::new("system", system));
    }
    messages.push(ChatMessage::new("user", user));
    GenerateRequest {
        tools: Vec::new(),
        prompt: Prompt::Chat(messages),
        params,
    }
}

/// Sampling parameters of the property test.
fn params(kind: usize, max_tokens: u32) -> GenerateParams {
    let base = GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    };
    let sampled = |seed| GenerateParams {
        temperature: 0.7,
        seed,
        ..base.clone()
    };
    match kind {
        0 => base,
        1 => sampled(42),
        2 => sampled(7),
        3 => sampled(1234),
        _ => GenerateParams {
            stop: vec![".".into()],
            ..base
        },
    }
}

/// What one generation streamed and how it ended.
#[derive(Debug, Clone, PartialEq)]
struct Run {
    ids: Vec<u32>,
    text: String,
    outcome: GenerateOutcome,
}

/// `request` alone, through `Engine::generate`.
fn solo(engine: &mut CandleEngine, request: &GenerateRequest) -> Run {
    let mut sink = Collect::default();
    let outcome = engine.generate(request, &mut sink).expect("solo run");
    assert_eq!(sink.phases.first(), Some(&Phase::Prefill));
    Run {
        ids: sink.ids(),
        text: sink.text(),
        outcome,
    }
}

/// A batch sink that keeps every sequence's chunks with the step they came at; sequences in
/// `cancel_from` are reported cancelled from that step on.
#[derive(Default)]
struct Streams {
    /// The step running now (set by [`drive`]).
    step: usize,
    chunks: HashMap<SeqId, Vec<(usize, TokenChunk)>>,
    phases: HashMap<SeqId, Vec<Phase>>,
    cancel_from: HashMap<SeqId, usize>,
}

impl BatchSink for Streams {
    fn phase(&mut self, id: SeqId, phase: Phase) {
        self.phases.entry(id).or_default().push(phase);
    }

    fn chunk(&mut self, id: SeqId, chunk: TokenChunk) -> ControlFlow<()> {
        self.chunks.entry(id).or_default().push((self.step, chunk));
        ControlFlow::Continue(())
    }

    fn cancelled(&self, id: SeqId) -> bool {
        self.cancel_from.get(&id).is_some_and(|&s| self.step >= s)
    }
}

impl Streams {
    fn chunks(&self, id: SeqId) -> impl Iterator<Item = &(usize, TokenChunk)> {
        self.chunks.get(&id).into_iter().flatten()
    }

    fn ids(&self, id: SeqId) -> Vec<u32> {
        self.chunks(id)
            .flat_map(|(_, c)| c.token_ids.iter().copied())
            .collect()
    }

    fn text(&self, id: SeqId) -> String {
        self.chunks(id).map(|(_, c)| c.text.as_str()).collect()
    }

    /// Tokens sequence `id` got at `step`.
    fn tokens_at(&self, id: SeqId, step: usize) -> usize {
        self.chunks(id)
            .filter(|(s, _)| *s == step)
            .map(|(_, c)| c.token_ids.len())
            .sum()
    }

    /// The step of sequence `id`'s first token.
    fn first_token_step(&self, id: SeqId) -> Option<usize> {
        self.chunks(id)
            .find(|(_, c)| !c.token_ids.is_empty())
            .map(|(s, _)| *s)
    }

    fn run(&self, id: SeqId, outcome: GenerateOutcome) -> Run {
        Run {
            ids: self.ids(id),
            text: self.text(id),
            outcome,
        }
    }
}

/// A request of a batched run: it joins at step `at` (or as soon after as it is admitted) and
/// is taken out with `leave` at step `leave_at`.
struct Planned {
    id: SeqId,
    at: usize,
    request: GenerateRequest,
    leave_at: Option<usize>,
}

impl Planned {
    fn new(id: SeqId, at: usize, request: GenerateRequest) -> Self {
        Self {
            id,
            at,
            request,
            leave_at: None,
        }
    }
}

/// What a batched run gave.
struct Batched {
    results: HashMap<SeqId, Result<GenerateOutcome, EngineError>>,
    /// Rows of each step's forward (`report().last_step_rows` after it).
    rows: Vec<usize>,
    /// Where each request joined: `(step, admissions answered Wait before)`.
    joined: HashMap<SeqId, (usize, usize)>,
    /// The step each joined request ended at.
    ended: HashMap<SeqId, usize>,
}

/// Runs `plan` through the engine's batch, one `step` at a time, until every request ended.
fn drive(engine: &mut CandleEngine, plan: &[Planned], sink: &mut Streams) -> Batched {
    let batch = engine.batching().expect("a CPU engine batches");
    let mut waits: HashMap<SeqId, usize> = HashMap::new();
    let mut out = Batched {
        results: HashMap::new(),
        rows: Vec::new(),
        joined: HashMap::new(),
        ended: HashMap::new(),
    };
    let mut step = 0;
    while out.results.len() < plan.len() {
        assert!(step < 2_000, "the batch does not finish");
        for p in plan {
            if p.at > step || out.joined.contains_key(&p.id) || out.results.contains_key(&p.id) {
                continue;
            }
            match batch.join(p.id, &p.request) {
                Ok(Admission::Joined) => {
                    let waited = waits.get(&p.id).copied().unwrap_or(0);
                    out.joined.insert(p.id, (step, waited));
                }
                Ok(Admission::Wait) => *waits.entry(p.id).or_default() += 1,
                Err(err) => {
                    out.results.insert(p.id, Err(err));
                }
            }
        }
        for p in plan {
            if p.leave_at == Some(step)
                && let Some(outcome) = batch.leave(p.id)
            {
                assert!(out.results.insert(p.id, Ok(outcome)).is_none());
                out.ended.insert(p.id, step);
            }
        }
        sink.step = step;
        for finished in batch.step(sink) {
            let again = out.results.insert(finished.id, finished.result);
            assert!(again.is_none(), "sequence {} finished twice", finished.id);
            out.ended.insert(finished.id, step);
        }
        out.rows.push(batch.report().last_step_rows);
        step += 1;
    }
    assert_eq!(batch.active(), 0, "every sequence left the batch");
    out
}

/// The outcome of sequence `id` of a batched run, which must have succeeded.
fn outcome(batched: &Batched, id: SeqId) -> GenerateOutcome {
    match &batched.results[&id] {
        Ok(outcome) => *outcome,
        Err(err) => panic!("sequence {id} failed: {err}"),
    }
}

/// Asserts that a cancelled sequence streamed a prefix of its solo run.
fn assert_cancelled_prefix(got: &Run, alone: &Run, what: &str) {
    assert_eq!(got.outcome.finish_reason, FinishReason::Cancelled, "{what}");
    assert!(
        alone.ids.starts_with(&got.ids),
        "{what}: {:?} is not a prefix of {:?}",
        got.ids,
        alone.ids
    );
    assert!(
        alone.text.starts_with(&got.text),
        "{what}: {:?} is not a prefix of {:?}",
        got.text,
        alone.text
    );
    assert_eq!(
        got.outcome.usage.completion_tokens as usize,
        got.ids.len(),
        "{what}"
    );
}

/// One request of the property test: `(prompt, params kind, max_tokens, join step)`.
fn planned_request() -> impl Strategy<Value = (usize, usize, u32, usize)> {
    (0..POOL.len(), 0..5usize, 1..24u32, 0..10usize)
}

proptest! {
    #![proptest_config(ProptestConfig {
        max_shrink_iters: 8,
        ..ProptestConfig::with_cases(6)
    })]

    #[test]
    fn batched_requests_match_their_solo_runs(
        requests in prop::collection::vec(planned_request(), 2..=6)
    ) {
        let mut engine = lock();
        let plan: Vec<Planned> = requests
            .iter()
            .enumerate()
            .map(|(i, &(prompt, kind, max_tokens, at))| {
                Planned::new(i as SeqId, at, pooled(prompt, params(kind, max_tokens)))
            })
            .collect();
        // The batch first, so that its prompts are mostly prefilled (not taken from the prefix
        // cache), beside each other and beside decoding sequences.
        let mut sink = Streams::default();
        let batched = drive(&mut engine, &plan, &mut sink);
        let alone: Vec<Run> = plan.iter().map(|p| solo(&mut engine, &p.request)).collect();
        for (p, alone) in plan.iter().zip(&alone) {
            let got = sink.run(p.id, outcome(&batched, p.id));
            prop_assert_eq!(&got, alone, "request {} {:?} batched", p.id, requests[p.id as usize]);
            prop_assert_eq!(
                sink.phases.get(&p.id).and_then(|p| p.first()),
                Some(&Phase::Prefill)
            );
        }
        // The solo runs left their caches behind: run again, they reuse them and give the same.
        let hits = engine.batching().expect("batches").report().prefix_hits;
        for (p, alone) in plan.iter().zip(&alone) {
            let again = solo(&mut engine, &p.request);
            prop_assert_eq!(&again, alone, "request {} alone again", p.id);
        }
        let after = engine.batching().expect("batches").report().prefix_hits;
        prop_assert!(after > hits, "repeated prompts reused no prefix");
    }
}

fn greedy(max_tokens: u32) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    }
}

fn sampled(max_tokens: u32, seed: u64) -> GenerateParams {
    GenerateParams {
        max_tokens,
        temperature: 0.7,
        seed,
        ..GenerateParams::default()
    }
}

#[test]
fn a_cancelled_sequence_ends_and_the_others_are_unchanged() {
    let mut engine = lock();
    let plan = vec![
        Planned::new(1, 0, chat("Tell me a long story.", greedy(10))),
        Planned::new(2, 0, pooled(2, sampled(10, 42))),
        Planned::new(3, 1, chat("Write a haiku about trees.", sampled(10, 7))),
        Planned {
            leave_at: Some(5),
            ..Planned::new(
                4,
                0,
                chat("Count from one to one hundred in words.", greedy(10)),
            )
        },
    ];
    let mut sink = Streams {
        cancel_from: HashMap::from([(2, 4)]),
        ..Streams::default()
    };
    let batched = drive(&mut engine, &plan, &mut sink);
    let alone: Vec<Run> = plan.iter().map(|p| solo(&mut engine, &p.request)).collect();
    for run in &alone {
        assert!(run.ids.len() > 6, "a request ends too early: {run:?}");
    }
    for (p, alone) in plan.iter().zip(&alone) {
        let got = sink.run(p.id, outcome(&batched, p.id));
        match p.id {
            2 => {
                assert_cancelled_prefix(&got, alone, "cancelled through the sink");
                // Cancelled before step 4 ran: the tokens of steps 0..4 (the first comes with
                // the prompt's forward at step 0).
                assert_eq!(got.ids.len(), 4, "{got:?}");
            }
            4 => {
                assert_cancelled_prefix(&got, alone, "taken out with leave");
                assert_eq!(got.ids.len(), 5, "{got:?}");
            }
            _ => assert_eq!(&got, alone, "request {} beside the cancelled ones", p.id),
        }
    }
    let batch = engine.batching().expect("batches");
    assert_eq!(
        batch.leave(4),
        None,
        "a sequence that left is not in the batch"
    );
}

/// A text of about `words` words (repeated sentences).
fn long_text(words: usize) -> String {
    const SENTENCES: &[&str] = &[
        "The river rises in the hills above the town and runs south through farmland.",
        "In spring the water is high and brown with mud.",
        "By late summer it is clear enough to see the stones on the bottom.",
        "The mill by the bridge burned down twice and was rebuilt each time.",
        "Herons fish in the shallows and an otter is sometimes seen near the weir.",
    ];
    let mut text = String::new();
    let mut count = 0;
    for sentence in SENTENCES.iter().cycle() {
        if count >= words {
            break;
        }
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(sentence);
        count += sentence.split_whitespace().count();
    }
    text
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_while_the_others_decode() {
    let mut engine = lock();
    let long = chat(
        &format!(
            "{}\n\nSummarise the text above in one sentence.",
            long_text(460)
        ),
        greedy(4),
    );
    // The long prompt joins at step 2 and takes two steps or more (512 rows a step, less the
    // two decode rows): the others have 2 tokens by then and 12 to make.
    let plan = vec![
        Planned::new(1, 0, chat("Tell me a long story.", greedy(12))),
        Planned::new(2, 0, pooled(3, sampled(12, 1234))),
        Planned::new(3, 2, long),
    ];
    // The batch first: the long prompt is not in the prefix cache yet (only the chat
    // template's opening, which every chat prompt shares, may be).
    let mut sink = Streams::default();
    let batched = drive(&mut engine, &plan, &mut sink);
    let alone: Vec<Run> = plan.iter().map(|p| solo(&mut engine, &p.request)).collect();
    let prompt_tokens = alone[2].outcome.usage.prompt_tokens as usize;
    assert!(
        (560..1000).contains(&prompt_tokens),
        "the long prompt has {prompt_tokens} tokens"
    );
    for (p, alone) in plan.iter().zip(&alone) {
        let got = sink.run(p.id, outcome(&batched, p.id));
        assert_eq!(&got, alone, "request {} of the chunked-prefill batch", p.id);
    }
    let joined = batched.joined[&3].0;
    let first = sink
        .first_token_step(3)
        .expect("the long prompt got a token");
    assert!(first > joined, "the long prompt ran in one step ({joined})");
    for step in joined..=first {
        assert!(
            batched.rows[step] <= 512,
            "step {step} ran {} rows",
            batched.rows[step]
        );
        for id in [1, 2] {
            assert_eq!(
                sink.tokens_at(id, step),
                1,
                "sequence {id} at step {step}, while the long prompt was prefilled"
            );
        }
    }
}

#[test]
fn a_repeated_prompt_reuses_its_cached_prefix() {
    let mut engine = lock();
    let request = chat(
        "Name three birds that live near rivers, one per line.",
        greedy(12),
    );
    let first = solo(&mut engine, &request);
    let before = engine.batching().expect("batches").report();
    let again = solo(&mut engine, &request);
    let after = engine.batching().expect("batches").report();
    assert_eq!(again, first, "the prefix cache changed the output");
    let prompt = first.outcome.usage.prompt_tokens as u64;
    assert_eq!(after.prefix_hits, before.prefix_hits + 1);
    // All but the last prompt position (whose logits the first token needs).
    assert_eq!(
        after.prefix_reused_tokens - before.prefix_reused_tokens,
        prompt - 1
    );
    assert_eq!(after.prefilled_tokens - before.prefilled_tokens, 1);
    assert!(after.kv_bytes > 0 && after.kv_bytes <= after.kv_capacity_bytes);
}

#[test]
fn a_prompt_longer_than_the_context_is_refused_without_disturbing_the_batch() {
    let mut engine = lock();
    let too_long = chat(&long_text(4_500), greedy(4));
    match engine.generate(&too_long, &mut Collect::default()) {
        Err(EngineError::ContextLengthExceeded {
            prompt_tokens,
            max_context,
        }) => assert!(
            prompt_tokens >= max_context,
            "{prompt_tokens} < {max_context}"
        ),
        other => panic!("a too long prompt alone: {other:?}"),
    }
    let plan = vec![
        Planned::new(1, 0, chat("Tell me a long story.", greedy(6))),
        Planned::new(2, 2, too_long),
        Planned::new(3, 1, pooled(2, sampled(6, 42))),
    ];
    let mut sink = Streams::default();
    let batched = drive(&mut engine, &plan, &mut sink);
    assert!(
        matches!(
            batched.results[&2],
            Err(EngineError::ContextLengthExceeded { .. })
        ),
        "{:?}",
        batched.results[&2]
    );
    assert!(!batched.joined.contains_key(&2));
    assert!(sink.chunks(2).next().is_none() && !sink.phases.contains_key(&2));
    for p in [&plan[0], &plan[2]] {
        let got = sink.run(p.id, outcome(&batched, p.id));
        assert_eq!(got, solo(&mut engine, &p.request), "request {}", p.id);
    }
}

#[test]
fn a_full_batch_answers_wait_until_a_sequence_finishes() {
    let mut engine = load(&LoadSpec {
        parallel: Some(2),
        ..spec(&model())
    });
    let plan = vec![
        Planned::new(
            1,
            0,
            chat("What is 2+2? Reply with just the number.", greedy(3)),
        ),
        Planned::new(2, 0, chat("Tell me a long story.", greedy(16))),
        Planned::new(3, 0, chat("Write a haiku about trees.", sampled(8, 7))),
    ];
    let batch = engine.batching().expect("a CPU engine batches");
    assert_eq!(batch.parallel(), 2);
    assert_eq!(batch.report().parallel, 2);
    let mut sink = Streams::default();
    let batched = drive(&mut engine, &plan, &mut sink);
    assert_eq!(batched.joined[&1], (0, 0));
    assert_eq!(batched.joined[&2], (0, 0));
    let (at, waited) = batched.joined[&3];
    assert!(
        at > 0 && waited == at,
        "request 3 joined at step {at} after {waited} waits"
    );
    // It joined right after the first sequence ended.
    let ended = batched.ended[&1].min(batched.ended[&2]);
    assert_eq!(at, ended + 1);
    for p in &plan {
        let got = sink.run(p.id, outcome(&batched, p.id));
        assert_eq!(got, solo(&mut engine, &p.request), "request {}", p.id);
    }
}

#[test]
fn a_request_copies_the_prefix_a_running_sequence_shares_with_it() {
    let mut engine = lock();
    // A system prompt no earlier test used, so no kept cache holds it.
    let system = "You answer questions about the tide tables of a small harbour town on a \
                  rocky coast, where fishing boats leave before dawn and return at noon; keep \
                  every answer short and never invent times that the tables do not give.";
    let ask = |question: &str, max_tokens| GenerateRequest {
        tools: Vec::new(),
        prompt: Prompt::Chat(vec![
            ChatMessage::new("system", system),
            ChatMessage::new("user", question),
        ]),
        params: greedy(max_tokens),
    };
    let plan = vec![
        Planned::new(1, 0, ask("When is high tide today?", 16)),
        // Joins once the first one's prompt is computed.
        Planned::new(2, 3, ask("Can I walk to the lighthouse at low tide?", 8)),
    ];
    let before = engine.batching().expect("batches").report();
    let mut sink = Streams::default();
    let batched = drive(&mut engine, &plan, &mut sink);
    let after = engine.batching().expect("batches").report();
    // The first request may reuse a few template tokens from a kept cache; the second copies
    // the whole system prompt from the first.
    assert!(after.prefix_hits > before.prefix_hits, "{after:?}");
    assert!(
        after.prefix_reused_tokens - before.prefix_reused_tokens >= 40,
        "the shared system prompt was copied: {before:?} -> {after:?}"
    );
    for p in &plan {
        let alone = solo(&mut engine, &p.request);
        let got = sink.run(p.id, outcome(&batched, p.id));
        assert_eq!(got, alone, "request {} with a copied prefix", p.id);
    }
}
