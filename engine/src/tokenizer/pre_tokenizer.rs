//! The pre-tokenizer a GGUF file names in `tokenizer.ggml.pre`, as llama.cpp defines it.
//!
//! llama.cpp (`src/llama-vocab.cpp`, `llm_tokenizer_bpe`) maps each `tokenizer.ggml.pre`
//! name to a list of regular expressions that are applied in turn: each one splits every
//! piece left by the one before into matches and the text between them, and all of those
//! become pieces. That is exactly a sequence of Hugging Face `Split` pre-tokenizers with the
//! `Isolated` behaviour, which is what `PreTokenizerSpec::regexes` feeds.
//!
//! Only the names whose llama.cpp regexes we reproduce and have checked against
//! `llama-tokenize` are accepted (the `TABLE` below); any other name is refused with an error
//! rather than tokenized almost right.

/// GPT-2's split: contractions, letters, numbers, other symbols, whitespace.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";

/// Llama 3's split (llama.cpp's case-insensitive-contraction adaptation).
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2's split: Llama 3's with single digits.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// How one family of `tokenizer.ggml.pre` values pre-tokenizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PreTokenizerSpec {
    /// llama.cpp's name for the family (`LLAMA_VOCAB_PRE_TYPE_*`), for logs.
    pub family: &'static str,
    /// The regexes, applied in order.
    pub regexes: &'static [&'static str],
    /// Whether a whole pre-token that is in the vocabulary skips the merges.
    pub ignore_merges: bool,
    /// llama.cpp's default for adding BOS when the file does not say.
    pub add_bos_default: bool,
}

const SPEC_DEFAULT: PreTokenizerSpec = PreTokenizerSpec {
    family: "default",
    regexes: &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
    ignore_merges: false,
    add_bos_default: false,
};

const SPEC_LLAMA3: PreTokenizerSpec = PreTokenizerSpec {
    family: "llama3",
    regexes: &[LLAMA3],
    ignore_merges: true,
    add_bos_default: true,
};

const SPEC_DBRX: PreTokenizerSpec = PreTokenizerSpec {
    family: "dbrx",
    regexes: &[LLAMA3],
    ignore_merges: false,
    add_bos_default: false,
};

const SPEC_GPT2: PreTokenizerSpec = PreTokenizerSpec {
    family: "gpt2",
    regexes: &[GPT2],
    ignore_merges: false,
    add_bos_default: false,
};

const SPEC_STARCODER: PreTokenizerSpec = PreTokenizerSpec {
    family: "starcoder",
    regexes: &[r"\p{N}", GPT2],
    ignore_merges: false,
    add_bos_default: false,
};

const SPEC_QWEN2: PreTokenizerSpec = PreTokenizerSpec {
    family: "qwen2",
    regexes: &[QWEN2],
    ignore_merges: false,
    add_bos_default: false,
};

const SPEC_FALCON: PreTokenizerSpec = PreTokenizerSpec {
    family: "falcon",
    regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
    ignore_merges: false,
    add_bos_default: false,
};

/// Every accepted `tokenizer.ggml.pre` value, with its family.
const TABLE: &[(&str, PreTokenizerSpec)] = &[
    ("default", SPEC_DEFAULT),
    // LLAMA_VOCAB_PRE_TYPE_LLAMA3
    ("llama3", SPEC_LLAMA3),
    ("llama-v3", SPEC_LLAMA3),
    ("llama-bpe", SPEC_LLAMA3),
    ("falcon3", SPEC_LLAMA3),
    ("falcon-h1", SPEC_LLAMA3),
    ("pixtral", SPEC_LLAMA3),
    ("midm-2.0", SPEC_LLAMA3),
    ("lfm2", SPEC_LLAMA3),
    // LLAMA_VOCAB_PRE_TYPE_DBRX / SMAUG: the Llama 3 regex, merges always applied
    ("dbrx", SPEC_DBRX),
    ("smaug-bpe", SPEC_DBRX),
    // LLAMA_VOCAB_PRE_TYPE_GPT2 and the families that share its regex
    ("gpt-2", SPEC_GPT2),
    ("phi-2", SPEC_GPT2),
    ("mpt", SPEC_GPT2),
    ("olmo", SPEC_GPT2),
    ("jais", SPEC_GPT2),
    ("trillion", SPEC_GPT2),
    ("gigachat", SPEC_GPT2),
    ("a.x-4.0", SPEC_GPT2),
    ("mellum", SPEC_GPT2),
    // LLAMA_VOCAB_PRE_TYPE_STARCODER and the families that share its regexes
    ("starcoder", SPEC_STARCODER),
    ("refact", SPEC_STARCODER),
    ("command-r", SPEC_STARCODER),
    ("smollm", SPEC_STARCODER),
    ("codeshell", SPEC_STARCODER),
    ("exaone", SPEC_STARCODER),
    ("minerva-7b", SPEC_STARCODER),
    // LLAMA_VOCAB_PRE_TYPE_QWEN2 / STABLELM2
    ("qwen2", SPEC_QWEN2),
    ("deepseek-r1-qwen", SPEC_QWEN2),
    ("stablelm2", SPEC_QWEN2),
    // LLAMA_VOCAB_PRE_TYPE_FALCON
    ("falcon", SPEC_FALCON),
];

/// The accepted `tokenizer.ggml.pre` values, comma-separated, for error messages.
pub(crate) fn supported_list() -> String {
    TABLE
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The spec for a `tokenizer.ggml.pre` value; `None` if it is not supported. A file without
/// the key gets llama.cpp's `default` (and a warning, as in llama.cpp).
pub(crate) fn spec_for(pre: Option<&str>) -> Option<PreTokenizerSpec> {
    match pre {
        None | Some("") => {
            tracing::warn!(
                "GGUF file has no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer \
                 (generation quality may suffer; llama.cpp warns the same)"
            );
            Some(SPEC_DEFAULT)
        }
        Some(name) => TABLE.iter().find(|(n, _)| *n == name).map(|(_, s)| *s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_regex_compiles() {
        for (name, spec) in TABLE {
            for re in spec.regexes {
                assert!(fancy_regex_compiles(re), "{name}: {re}");
            }
        }
    }

    fn fancy_regex_compiles(re: &str) -> bool {
        tokenizers::pre_tokenizers::split::Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(re.to_string()),
            tokenizers::SplitDelimiterBehavior::Isolated,
            false,
        )
        .is_ok()
    }

    #[test]
    fn smollm_splits_digits_first() {
        let spec = spec_for(Some("smollm")).expect("smollm is supported");
        assert_eq!(spec.regexes.first(), Some(&r"\p{N}"));
        assert!(spec_for(Some("no-such-pre")).is_none());
    }
}
