//! Grammar-constrained decoding (structured output), through the `llguidance` crate.
//!
//! A request's [`Constraint`] (a JSON schema, or any JSON object) is compiled by llguidance
//! into a grammar over the model's own tokens. Before each draw, the grammar's mask says which
//! tokens keep the output inside the grammar; the sampler sets every other token's logit to
//! minus infinity (see [`crate::sampling`]), so the output always parses. An end-of-generation
//! token is allowed only where the grammar may end, and once the grammar is complete nothing
//! else is: the generation then ends with `FinishReason::Stop`. The token budget still
//! applies: a generation cut by `max_tokens` (finish reason `length`) can be unfinished JSON,
//! as with every other server.
//!
//! The token trie llguidance works on is built once per tokenizer, on the first constrained
//! request (about a tenth of a second for a 49k-token vocabulary), and shared by every
//! sequence after it. Control and unknown tokens (`<|im_end|>`, `<s>`, ...) enter it as special
//! tokens, which a grammar never produces as text.

use std::sync::{Arc, OnceLock};

use canopy_proto::Constraint;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};

use crate::EngineError;
use crate::tokenizer::{GgufTokenizer, TokenType};

/// The byte that marks a special token in llguidance's trie.
const SPECIAL: u8 = 0xff;

/// A tokenizer's grammar compiler, built on first use and shared by its clones.
#[derive(Clone, Default)]
pub(crate) struct GrammarCache(Arc<OnceLock<Result<Arc<ParserFactory>, String>>>);

impl std::fmt::Debug for GrammarCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("GrammarCache")
            .field(&self.0.get().map(|r| r.is_ok()))
            .finish()
    }
}

impl GrammarCache {
    fn factory(&self, tokenizer: &GgufTokenizer) -> Result<Arc<ParserFactory>, EngineError> {
        self.0
            .get_or_init(|| build_factory(tokenizer).map(Arc::new))
            .clone()
            .map_err(|e| EngineError::Generate(format!("cannot build the grammar compiler: {e}")))
    }
}

/// The end-of-generation token the trie reports.
fn eos_of(tokenizer: &GgufTokenizer) -> Option<u32> {
    tokenizer
        .eos_id()
        .or_else(|| tokenizer.eos_ids().first().copied())
}

fn build_factory(tokenizer: &GgufTokenizer) -> Result<ParserFactory, String> {
    let started = std::time::Instant::now();
    let vocab = tokenizer.vocab_size();
    let eos = eos_of(tokenizer)
        .ok_or("the model has no end-of-generation token, so no grammar can end")?;
    let words: Vec<Vec<u8>> = (0..vocab as u32)
        .map(|id| {
            let piece = tokenizer.piece(id).unwrap_or_default();
            match tokenizer.token_type(id) {
                Some(TokenType::Control | TokenType::Unknown | TokenType::Unused) => {
                    let mut word = vec![SPECIAL];
                    word.extend_from_slice(tokenizer.token(id).unwrap_or_default().as_bytes());
                    word
                }
                _ => piece.to_vec(),
            }
        })
        .collect();
    let info = TokRxInfo {
        vocab_size: vocab as u32,
        tok_eos: eos,
        tok_bos: tokenizer.bos_id(),
        tok_pad: tokenizer.pad_id(),
        tok_unk: tokenizer.unk_id(),
        tok_end_of_turn: tokenizer.eot_id(),
    };
    let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    tracing::debug!(vocab, took = ?started.elapsed(), "built the grammar compiler");
    Ok(factory)
}

/// The grammar of a constraint, as llguidance reads it.
///
/// JSON is written in one layout, `{"a": 1, "b": [2, 3]}` (a space after `:` and `,`, no
/// other whitespace, as Python's `json.dumps`): with free whitespace a small model at a high
/// temperature can spend its whole budget on blanks between valid tokens.
fn grammar_of(constraint: &Constraint) -> Result<TopLevelGrammar, EngineError> {
    let schema = match constraint {
        Constraint::JsonObject => serde_json::json!({"type": "object"}),
        Constraint::JsonSchema(text) => schema_of(text, "the JSON schema")?,
        Constraint::ToolCall(tools) => return tool_call_grammar(tools),
    };
    Ok(TopLevelGrammar::from_json_schema(laid_out(schema)))
}

/// A JSON schema given as text: an object, or `true` (anything).
fn schema_of(text: &str, what: &str) -> Result<serde_json::Value, EngineError> {
    match serde_json::from_str::<serde_json::Value>(text)
        .map_err(|e| EngineError::InvalidRequest(format!("{what} is not JSON: {e}")))?
    {
        serde_json::Value::Bool(true) => Ok(serde_json::json!({})),
        schema @ serde_json::Value::Object(_) => Ok(schema),
        _ => Err(EngineError::InvalidRequest(format!(
            "{what} must be an object (or true)"
        ))),
    }
}

/// `schema` with the one JSON layout every constrained output uses.
fn laid_out(mut schema: serde_json::Value) -> serde_json::Value {
    JsonCompileOptions {
        item_separator: ", ".into(),
        key_separator: ": ".into(),
        whitespace_flexible: false,
        ..JsonCompileOptions::default()
    }
    .apply_to(&mut schema);
    schema
}

/// The grammar of exactly one call of one of `tools`, as the model writes calls (see
/// [`crate::tools`]): `<tool_call>\n{"name": "NAME", "arguments": ARGS}\n</tool_call>`, the
/// name one of the tools' and the arguments valid against that tool's parameter schema (an
/// object when the tool has no schema).
fn tool_call_grammar(tools: &[canopy_proto::ToolSpec]) -> Result<TopLevelGrammar, EngineError> {
    use crate::tools::{CALL_CLOSE, CALL_OPEN};
    if tools.is_empty() {
        return Err(EngineError::InvalidRequest(
            "a forced tool call needs at least one tool".into(),
        ));
    }
    // Lark's string literals are JSON strings.
    let literal = |text: &str| serde_json::Value::String(text.to_string()).to_string();
    let mut lark = format!(
        "start: {} call {}\ncall: {}\n",
        literal(&format!("{CALL_OPEN}\n")),
        literal(&format!("\n{CALL_CLOSE}")),
        (0..tools.len())
            .map(|i| format!("call_{i}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    for (i, tool) in tools.iter().enumerate() {
        let what = format!("the parameters of tool '{}'", tool.name);
        let mut schema = schema_of(&tool.parameters, &what)?;
        if schema.as_object().is_some_and(|o| o.is_empty()) {
            schema = serde_json::json!({"type": "object"});
        }
        let name = serde_json::Value::String(tool.name.clone()).to_string();
        lark.push_str(&format!(
            "call_{i}: {} args_{i} \"}}\"\nargs_{i}: %json {}\n",
            literal(&format!("{{\"name\": {name}, \"arguments\": ")),
            laid_out(schema)
        ));
    }
    Ok(TopLevelGrammar::from_lark(lark))
}

/// One sequence's grammar state.
pub(crate) struct Grammar {
    matcher: Matcher,
    eos: u32,
    vocab: usize,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar")
            .field("stopped", &self.matcher.is_stopped())
            .finish_non_exhaustive()
    }
}

/// Which tokens the grammar allows at one position.
pub(crate) struct Mask {
    allowed: SimpleVob,
    eos: u32,
    vocab: usize,
}

impl Mask {
    /// Whether `token` is allowed; `is_eos` says whether it ends the generation (any of the
    /// model's end tokens is allowed where the grammar may end).
    pub(crate) fn allows(&self, token: u32, is_eos: bool) -> bool {
        if is_eos {
            self.allowed.is_allowed(self.eos)
        } else {
            (token as usize) < self.vocab && self.allowed.is_allowed(token)
        }
    }
}

impl Grammar {
    /// The grammar of `constraint` over `tokenizer`'s tokens; an invalid schema is
    /// [`EngineError::InvalidRequest`].
    pub(crate) fn new(
        tokenizer: &GgufTokenizer,
        constraint: &Constraint,
    ) -> Result<Self, EngineError> {
        let grammar = grammar_of(constraint)?;
        let factory = tokenizer.grammar_cache().factory(tokenizer)?;
        let parser = factory.create_parser(grammar).map_err(|e| {
            EngineError::InvalidRequest(format!("the output format cannot be used: {e}"))
        })?;
        Ok(Self {
            matcher: Matcher::new(Ok(parser)),
            eos: eos_of(tokenizer).unwrap_or_default(),
            vocab: tokenizer.vocab_size(),
        })
    }

    /// The tokens allowed next.
    pub(crate) fn mask(&mut self) -> Result<Mask, EngineError> {
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| EngineError::Generate(format!("the grammar failed: {e}")))?;
        Ok(Mask {
            allowed,
            eos: self.eos,
            vocab: self.vocab,
        })
    }

    /// Moves past `token`, which the last mask allowed.
    pub(crate) fn consume(&mut self, token: u32) -> Result<(), EngineError> {
        self.matcher
            .consume_token(token)
            .map_err(|e| EngineError::Generate(format!("the grammar failed: {e}")))
    }

    /// Whether the grammar is complete (nothing but the end may follow).
    pub(crate) fn is_complete(&mut self) -> bool {
        self.matcher.is_stopped()
    }
}
