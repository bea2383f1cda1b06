//! [`GgufTokenizer`]: the tokenizer stored in a GGUF file's metadata, with llama.cpp's ids.
//!
//! The tokenizer is rebuilt from the `tokenizer.ggml.*` keys as a Hugging Face
//! [`tokenizers::Tokenizer`], set up so that its ids equal llama.cpp's `llama_tokenize` with
//! `parse_special = true` for the same text:
//!
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE from `tokens` and `merges`. The
//!   pre-tokenizer is the list of regexes llama.cpp uses for the `tokenizer.ggml.pre` name
//!   (see `pre_tokenizer.rs`), each a `Split` with the `Isolated` behaviour, followed by the
//!   byte-level mapping without its own regex. Duplicate merges keep their first rank, as in
//!   llama.cpp.
//! - `tokenizer.ggml.model = "llama"`: SentencePiece BPE from `tokens` and `scores`: merges
//!   are derived from the scores (see `sentencepiece.rs`), unknown characters fall back to the
//!   `<0xXX>` byte tokens, spaces become `▁` and, when `tokenizer.ggml.add_space_prefix` is
//!   on (the default), a `▁` is put before the text and after every special token, as
//!   llama.cpp does.
//!
//! Control, user-defined and unknown-type tokens (`token_type` 3, 4 and 2), and the tokens
//! llama.cpp treats as end-of-generation by their text, are added as atomic tokens: in text
//! they always match as one token, never split by BPE. BOS is prepended on
//! [`encode`](GgufTokenizer::encode) with `add_special` when the file's
//! `tokenizer.ggml.add_bos_token` says so (or llama.cpp's default for the vocabulary when it
//! says nothing); likewise EOS with `tokenizer.ggml.add_eos_token`.
//!
//! Decoding does not go through `tokenizers`: each token's bytes are precomputed the way
//! llama.cpp's `token_to_piece(special = true)` computes them (byte-level characters mapped
//! back to bytes, `▁` to a space, `<0xXX>` to its byte, control tokens to their text), so that
//! [`TokenStream`] can emit text as soon as it is complete UTF-8, whatever the tokens split.
//! Special tokens decode to their text; callers stop on [`GgufTokenizer::eos_ids`] before
//! decoding an end token. For SentencePiece vocabularies the one space the encoder put at the
//! start, and after each special token, is removed again, so `decode(encode(s)) == s`.
//!
//! A byte the vocabulary cannot spell (SmolLM2's lacks 21 of the 256, among them 0xF1, the
//! lead byte of U+40000..U+7FFFF) is dropped, exactly as llama.cpp drops it; text containing
//! one does not survive a round trip, in either implementation.
//!
//! Not supported (refused with an error naming the file): the other tokenizer models
//! (`bert`, `t5`, `rwkv`, ...), and `tokenizer.ggml.pre` values whose llama.cpp regexes we do
//! not reproduce (the list is in the error).

mod byte_level;
mod pre_tokenizer;
mod sentencepiece;
mod stream;

use std::fmt;
use std::path::PathBuf;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::error::EngineError;
use crate::gguf::{GgufError, GgufFile};
use crate::grammar::GrammarCache;

pub use stream::{StreamState, TokenStream};

/// Token texts llama.cpp treats as end-of-generation whatever their declared type
/// (`llama_vocab::impl::load`, "maintain a list of tokens that cause end-of-generation").
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

/// Token texts llama.cpp picks an end-of-turn token from when the file names none.
const EOT_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "<end_of_utterance>",
];

/// A tokenizer could not be built, or could not encode or decode.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Reading the metadata failed (missing key, wrong type, ...).
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// The metadata describes a tokenizer this crate cannot build.
    #[error("model file {}: {problem}", path.display())]
    Invalid {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong or unsupported.
        problem: String,
    },
    /// The text could not be tokenized.
    #[error("cannot tokenize the text: {0}")]
    Encode(String),
    /// A token id outside the vocabulary was given to decode.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    UnknownId {
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
}

impl From<TokenizerError> for EngineError {
    fn from(err: TokenizerError) -> Self {
        match err {
            TokenizerError::Gguf(e) => e.into(),
            TokenizerError::Invalid { path, problem } => EngineError::InvalidModel {
                model: path.display().to_string(),
                reason: format!("tokenizer: {problem}"),
            },
            TokenizerError::Encode(msg) => EngineError::InvalidRequest(msg),
            e @ TokenizerError::UnknownId { .. } => EngineError::Generate(e.to_string()),
        }
    }
}

/// Which kind of vocabulary the file holds (`tokenizer.ggml.model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VocabKind {
    /// `gpt2`: byte-level BPE with a merge list.
    ByteLevelBpe,
    /// `llama`: SentencePiece BPE with scores and byte-fallback tokens.
    SentencePiece,
}

/// A token's type, from `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// 0, or any value llama.cpp does not know.
    Undefined,
    /// 1: ordinary text.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (`<|im_start|>`, `<s>`, ...).
    Control,
    /// 4: a user-defined token, matched atomically but decoded as text.
    UserDefined,
    /// 5: an unused slot.
    Unused,
    /// 6: a byte-fallback token `<0xXX>`.
    Byte,
}

impl TokenType {
    fn from_gguf(value: i32) -> Self {
        match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }

    /// Matched as one token in text, never split by BPE.
    fn is_atomic(self) -> bool {
        matches!(self, Self::Unknown | Self::Control | Self::UserDefined)
    }
}

/// The tokenizer of a GGUF model: encode text to llama.cpp's ids, decode ids to text.
#[derive(Clone)]
pub struct GgufTokenizer {
    inner: Tokenizer,
    kind: VocabKind,
    pre: String,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    pieces: Vec<Box<[u8]>>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    eos_ids: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    grammar: GrammarCache,
}

impl fmt::Debug for GgufTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufTokenizer")
            .field("kind", &self.kind)
            .field("pre", &self.pre)
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos_ids", &self.eos_ids)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

impl GgufTokenizer {
    /// Builds the tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        let invalid = |problem: String| TokenizerError::Invalid {
            path: file.path().to_path_buf(),
            problem,
        };
        let model = file.string("tokenizer.ggml.model")?;
        let kind = match model {
            "gpt2" => VocabKind::ByteLevelBpe,
            "llama" => VocabKind::SentencePiece,
            other => {
                return Err(invalid(format!(
                    "unsupported tokenizer model {other:?} (tokenizer.ggml.model); supported: \
                     \"gpt2\" (byte-level BPE) and \"llama\" (SentencePiece BPE)"
                )));
            }
        };
        let tokens: Vec<String> = file
            .string_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_string)
            .collect();
        if tokens.is_empty() {
            return Err(invalid("tokenizer.ggml.tokens is empty".to_string()));
        }
        let n = tokens.len();
        let mut types: Vec<TokenType> = match file.get("tokenizer.ggml.token_type") {
            Some(_) => file
                .i32_array("tokenizer.ggml.token_type")?
                .into_iter()
                .map(TokenType::from_gguf)
                .collect(),
            None => vec![TokenType::Normal; n],
        };
        if types.len() != n {
            return Err(invalid(format!(
                "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {n}",
                types.len()
            )));
        }
        // llama.cpp forces end-of-generation-looking tokens to be control tokens.
        for (token, ty) in tokens.iter().zip(types.iter_mut()) {
            if EOG_TEXTS.contains(&token.as_str()) && *ty != TokenType::Control {
                tracing::debug!(token, "treating end-of-generation token as a control token");
                *ty = TokenType::Control;
            }
        }

        let id_key = |key: &str| -> Result<Option<u32>, TokenizerError> {
            let id = file.u32_opt(key)?;
            match id {
                Some(id) if (id as usize) >= n => Err(invalid(format!(
                    "{key} = {id} is outside the vocabulary of {n} tokens"
                ))),
                other => Ok(other),
            }
        };
        let (default_bos, default_eos, default_unk) = match kind {
            VocabKind::SentencePiece => (Some(1), Some(2), Some(0)),
            VocabKind::ByteLevelBpe => (None, None, None),
        };
        let bos = id_key("tokenizer.ggml.bos_token_id")?.or(default_bos.filter(|&i| i < n as u32));
        let eos = id_key("tokenizer.ggml.eos_token_id")?.or(default_eos.filter(|&i| i < n as u32));
        let unk =
            id_key("tokenizer.ggml.unknown_token_id")?.or(default_unk.filter(|&i| i < n as u32));
        let pad = id_key("tokenizer.ggml.padding_token_id")?;
        let eom = id_key("tokenizer.ggml.eom_token_id")?;
        let eot = match id_key("tokenizer.ggml.eot_token_id")? {
            Some(id) => Some(id),
            None => tokens
                .iter()
                .position(|t| EOT_TEXTS.contains(&t.as_str()))
                .and_then(|i| u32::try_from(i).ok()),
        };
        let mut eos_ids: Vec<u32> = tokens
            .iter()
            .enumerate()
            .filter(|(_, t)| EOG_TEXTS.contains(&t.as_str()))
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .chain([eos, eot, eom].into_iter().flatten())
            .collect();
        eos_ids.sort_unstable();
        eos_ids.dedup();

        let pre = file.string_opt("tokenizer.ggml.pre")?;
        let (inner, pre_name, add_bos_default, add_space_prefix) = match kind {
            VocabKind::ByteLevelBpe => {
                let spec = pre_tokenizer::spec_for(pre).ok_or_else(|| {
                    invalid(format!(
                        "unsupported pre-tokenizer {:?} (tokenizer.ggml.pre); supported: {}",
                        pre.unwrap_or_default(),
                        pre_tokenizer::supported_list()
                    ))
                })?;
                let merges = file.string_array("tokenizer.ggml.merges")?;
                let inner = build_byte_level(&tokens, &merges, spec).map_err(invalid)?;
                let name = pre.unwrap_or("default").to_string();
                (inner, name, spec.add_bos_default, false)
            }
            VocabKind::SentencePiece => {
                let scores = match file.get("tokenizer.ggml.scores") {
                    Some(_) => file.f32_array("tokenizer.ggml.scores")?,
                    None => vec![0.0; n],
                };
                if scores.len() != n {
                    return Err(invalid(format!(
                        "tokenizer.ggml.scores has {} entries but tokenizer.ggml.tokens has {n}",
                        scores.len()
                    )));
                }
                let add_space_prefix = file
                    .bool_opt("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                let unk_text = unk.and_then(|id| tokens.get(id as usize)).cloned();
                let inner = build_sentencepiece(&tokens, &scores, unk_text, add_space_prefix)
                    .map_err(invalid)?;
                (inner, "sentencepiece".to_string(), true, add_space_prefix)
            }
        };
        let mut inner = inner;
        add_atomic_tokens(&mut inner, &tokens, &types).map_err(invalid)?;

        let add_bos = file
            .bool_opt("tokenizer.ggml.add_bos_token")?
            .unwrap_or(add_bos_default);
        let add_eos = file
            .bool_opt("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false);
        if add_bos && bos.is_none() {
            return Err(invalid(
                "tokenizer.ggml.add_bos_token is set but there is no tokenizer.ggml.bos_token_id"
                    .to_string(),
            ));
        }
        if add_eos && eos.is_none() {
            return Err(invalid(
                "tokenizer.ggml.add_eos_token is set but there is no tokenizer.ggml.eos_token_id"
                    .to_string(),
            ));
        }

        let pieces = tokens
            .iter()
            .zip(&types)
            .map(|(token, &ty)| piece_bytes(kind, token, ty).into_boxed_slice())
            .collect();

        let tokenizer = Self {
            inner,
            kind,
            pre: pre_name,
            tokens,
            types,
            pieces,
            bos,
            eos,
            eot,
            pad,
            unk,
            eos_ids,
            add_bos,
            add_eos,
            add_space_prefix,
            grammar: GrammarCache::default(),
        };
        tracing::debug!(path = %file.path().display(), tokenizer = ?tokenizer, "built tokenizer");
        Ok(tokenizer)
    }

    /// Tokenizes `text`. Special tokens written in the text (`<|im_start|>`, ...) become their
    /// ids, as llama.cpp's `parse_special = true`. With `add_special`, BOS (and EOS) are added
    /// when the model asks for them ([`add_bos`](Self::add_bos)).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        out.extend_from_slice(ids);
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Turns ids back into text. Special tokens decode to their text; bytes that do not form
    /// valid UTF-8 become U+FFFD. An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut stream = self.stream();
        let mut text = String::new();
        for &id in ids {
            if self.piece(id).is_none() {
                return Err(TokenizerError::UnknownId {
                    id,
                    vocab_size: self.vocab_size(),
                });
            }
            if let Some(chunk) = stream.push(id) {
                text.push_str(&chunk);
            }
        }
        text.push_str(&stream.finish());
        Ok(text)
    }

    /// An incremental decoder over this tokenizer (see [`TokenStream`]).
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream::new(self)
    }

    /// The ids that end generation: EOS, EOT, EOM and the tokens llama.cpp recognises as
    /// end-of-generation by their text (`<|im_end|>`, `<|eot_id|>`, `<|endoftext|>`, ...).
    /// Sorted, without duplicates.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` ends generation (is in [`eos_ids`](Self::eos_ids)).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.binary_search(&id).is_ok()
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token named by the file, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The end-of-turn token: named by the file, or found by its text as llama.cpp does.
    pub fn eot_id(&self) -> Option<u32> {
        self.eot
    }

    /// The padding token, if the file names one.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// The unknown token, if the vocabulary has one.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether [`encode`](Self::encode) with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`encode`](Self::encode) with `add_special` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// The number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The vocabulary's spelling of token `id` (byte-level or `▁` form), if it exists.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of the token spelled `text` in the vocabulary, if any.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id(text)
    }

    /// The type of token `id`, if it exists.
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }

    /// Whether `id` is a control or unknown token (not text).
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.token_type(id),
            Some(TokenType::Control | TokenType::Unknown)
        )
    }

    /// The grammar compiler over this vocabulary (structured output), built on first use.
    pub(crate) fn grammar_cache(&self) -> &GrammarCache {
        &self.grammar
    }

    /// The bytes token `id` decodes to, if it exists.
    pub fn piece(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(|p| &p[..])
    }

    /// The kind of vocabulary.
    pub fn kind(&self) -> VocabKind {
        self.kind
    }

    /// The pre-tokenizer name (`tokenizer.ggml.pre`, or `sentencepiece`).
    pub fn pre_tokenizer(&self) -> &str {
        &self.pre
    }

    /// The underlying Hugging Face tokenizer (it does not add BOS/EOS; see
    /// [`encode`](Self::encode)).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Whether the decoder should drop one leading space after a start or a special token.
    fn strips_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Whether text after this token got a `▁` prefix from the encoder.
    fn is_atomic(&self, id: u32) -> bool {
        self.token_type(id).is_some_and(TokenType::is_atomic)
    }
}

/// Byte-level BPE with llama.cpp's pre-tokenizer regexes.
fn build_byte_level(
    tokens: &[String],
    merges: &[&str],
    spec: pre_tokenizer::PreTokenizerSpec,
) -> Result<Tokenizer, String> {
    let vocab = vocab_map(tokens);
    let mut seen = std::collections::HashSet::new();
    let mut merge_pairs = Vec::with_capacity(merges.len());
    for (rank, merge) in merges.iter().enumerate() {
        // llama.cpp splits at the first space after the first byte.
        let split = merge
            .bytes()
            .enumerate()
            .skip(1)
            .find(|&(_, b)| b == b' ')
            .map(|(i, _)| i)
            .ok_or_else(|| format!("tokenizer.ggml.merges[{rank}] = {merge:?} has no space"))?;
        let (left, right) = (&merge[..split], &merge[split + 1..]);
        // llama.cpp keeps the first rank of a duplicated merge.
        if seen.insert((left, right)) {
            merge_pairs.push((left.to_string(), right.to_string()));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merge_pairs)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| format!("invalid BPE vocabulary or merges: {e}"))?;
    let mut pre: Vec<PreTokenizerWrapper> = Vec::with_capacity(spec.regexes.len() + 1);
    for regex in spec.regexes {
        let split = Split::new(
            SplitPattern::Regex((*regex).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| format!("pre-tokenizer regex {regex:?} does not compile: {e}"))?;
        pre.push(split.into());
    }
    pre.push(ByteLevel::new(false, false, false).into());
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(pre)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    tracing::debug!(family = spec.family, "byte-level BPE pre-tokenizer");
    Ok(tokenizer)
}

/// SentencePiece BPE: merges from scores, byte fallback, `▁` for spaces.
fn build_sentencepiece(
    tokens: &[String],
    scores: &[f32],
    unk: Option<String>,
    add_space_prefix: bool,
) -> Result<Tokenizer, String> {
    let vocab = vocab_map(tokens);
    let merges = sentencepiece::merges_from_scores(tokens, scores, &vocab);
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| format!("invalid SentencePiece vocabulary: {e}"))?;
    let mut normalizers = Vec::new();
    if add_space_prefix {
        normalizers.push(Prepend::new("▁".to_string()).into());
    }
    normalizers.push(
        Replace::new(" ", "▁")
            .map_err(|e| format!("cannot build the space normalizer: {e}"))?
            .into(),
    );
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NormalizerSequence::new(normalizers)))
        .map_err(|e| format!("cannot set the normalizer: {e}"))?;
    Ok(tokenizer)
}

/// Token text to id; a duplicated text maps to its last id, as in llama.cpp.
fn vocab_map(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .zip(0u32..)
        .map(|(t, i)| (t.clone(), i))
        .collect()
}

/// Registers control, user-defined and unknown tokens so they match atomically.
fn add_atomic_tokens(
    tokenizer: &mut Tokenizer,
    tokens: &[String],
    types: &[TokenType],
) -> Result<(), String> {
    let mut special = Vec::new();
    let mut user = Vec::new();
    for (token, &ty) in tokens.iter().zip(types) {
        if !ty.is_atomic() || token.is_empty() {
            continue;
        }
        let is_special = ty != TokenType::UserDefined;
        let added = AddedToken::from(token.clone(), is_special).normalized(false);
        if is_special {
            special.push(added);
        } else {
            user.push(added);
        }
    }
    tokenizer
        .add_special_tokens(special)
        .map_err(|e| format!("cannot register the special tokens: {e}"))?;
    tokenizer
        .add_tokens(user)
        .map_err(|e| format!("cannot register the user-defined tokens: {e}"))?;
    Ok(())
}

/// The bytes a token decodes to, as llama.cpp's `token_to_piece(special = true)`.
fn piece_bytes(kind: VocabKind, token: &str, ty: TokenType) -> Vec<u8> {
    match ty {
        TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
            token.as_bytes().to_vec()
        }
        TokenType::Byte => byte_token_value(token)
            .map(|b| vec![b])
            .unwrap_or_else(|| token.as_bytes().to_vec()),
        TokenType::Normal => match kind {
            VocabKind::ByteLevelBpe => byte_level::token_to_bytes(token),
            VocabKind::SentencePiece => token.replace('▁', " ").into_bytes(),
        },
        TokenType::Unused | TokenType::Undefined => Vec::new(),
    }
}

/// The byte of a `<0xXX>` token.
fn byte_token_value(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}
