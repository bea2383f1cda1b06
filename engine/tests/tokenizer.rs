//! The GGUF tokenizer against llama.cpp: ids for hard strings from a committed table of
//! `llama-tokenize` output (tests/data/tokenizer_llamacpp.json, made by
//! tests/data/gen_tokenizer_table.sh), decoding, streaming, and round trips.

mod common;

use std::path::PathBuf;
use std::sync::LazyLock;

use canopy_engine::gguf::GgufFile;
use canopy_engine::tokenizer::{GgufTokenizer, TokenType, VocabKind};
use proptest::prelude::*;
use serde_json::Value;

static TOKENIZER: LazyLock<GgufTokenizer> = LazyLock::new(|| {
    let file = GgufFile::open(common::model_path()).expect("open the default model");
    GgufTokenizer::from_gguf(&file).expect("build its tokenizer")
});

fn table() -> Value {
    let path = common::data_path("tokenizer_llamacpp.json");
    let text = std::fs::read_to_string(&path).expect("read the llama.cpp table");
    serde_json::from_str(&text).expect("parse the llama.cpp table")
}

struct Case {
    text: String,
    ids: Vec<u32>,
}

fn cases(section: &Value) -> Vec<Case> {
    section["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().expect("text").to_string(),
            ids: c["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|id| id.as_u64().expect("id") as u32)
                .collect(),
        })
        .collect()
}

/// Compares `tokenizer` with every case of a table section; returns the mismatches.
fn mismatches(tokenizer: &GgufTokenizer, section: &Value) -> Vec<String> {
    cases(section)
        .into_iter()
        .filter_map(|case| {
            let ours = tokenizer.encode(&case.text, true).expect("encode");
            (ours != case.ids).then(|| {
                format!(
                    "{:?}\n   llama.cpp: {:?}\n   ours:      {:?}",
                    case.text, case.ids, ours
                )
            })
        })
        .collect()
}

#[test]
fn ids_equal_llama_cpp_for_hard_strings() {
    let table = table();
    let section = &table["model"];
    assert!(cases(section).len() >= 30, "the table has the hard strings");
    let bad = mismatches(&TOKENIZER, section);
    assert!(
        bad.is_empty(),
        "{} of {} strings tokenize differently from llama.cpp:\n{}",
        bad.len(),
        cases(section).len(),
        bad.join("\n")
    );
}

/// The same table for llama.cpp's own vocabulary-only test files (Llama 2 SentencePiece,
/// Llama 3, GPT-2, Qwen2, StarCoder, Falcon, ...). They ship in the llama-cpp-python sdist,
/// not in this repository: point `CANOPY_LLAMACPP_VOCAB_DIR` at its `vendor/llama.cpp/models`.
#[test]
#[ignore = "needs CANOPY_LLAMACPP_VOCAB_DIR (llama.cpp's models/ggml-vocab-*.gguf)"]
fn ids_equal_llama_cpp_for_other_vocabularies() {
    let dir = PathBuf::from(
        std::env::var_os("CANOPY_LLAMACPP_VOCAB_DIR").expect("CANOPY_LLAMACPP_VOCAB_DIR is set"),
    );
    let table = table();
    let mut report = Vec::new();
    for section in table["llama_cpp_vocabs"].as_array().expect("vocabs") {
        let name = section["file"].as_str().expect("file");
        let file = GgufFile::open_any_architecture(dir.join(name)).expect("open vocab file");
        let tokenizer = GgufTokenizer::from_gguf(&file).expect("build tokenizer");
        let bad = mismatches(&tokenizer, section);
        if !bad.is_empty() {
            report.push(format!(
                "== {name}: {} mismatches\n{}",
                bad.len(),
                bad.join("\n")
            ));
        }
    }
    assert!(report.is_empty(), "{}", report.join("\n"));
}

#[test]
fn vocabulary_facts_of_the_default_model() {
    let tok = &*TOKENIZER;
    assert_eq!(tok.kind(), VocabKind::ByteLevelBpe);
    assert_eq!(tok.pre_tokenizer(), "smollm");
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert!(!tok.add_bos(), "SmolLM2 does not add BOS");
    // <|endoftext|> and <|im_end|> both end generation, as in llama.cpp.
    assert_eq!(tok.eos_ids(), &[0, 2]);
    assert!(tok.is_eos(2) && !tok.is_eos(1));
    assert_eq!(tok.token(1), Some("<|im_start|>"));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_type(1), Some(TokenType::Control));
    assert!(tok.is_special(1));
    assert!(!tok.is_special(tok.token_id("Hello").expect("Hello")));
}

#[test]
fn special_tokens_in_text_are_single_ids() {
    let ids = TOKENIZER
        .encode("<|im_start|>user\nhi<|im_end|>", false)
        .expect("encode");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
}

#[test]
fn decode_inverts_encode_for_the_table_strings() {
    for case in cases(&table()["model"]) {
        let decoded = TOKENIZER.decode(&case.ids).expect("decode");
        assert_eq!(decoded, case.text);
    }
}

#[test]
fn decode_rejects_ids_outside_the_vocabulary() {
    let err = TOKENIZER.decode(&[1, 49152]).expect_err("id out of range");
    let msg = err.to_string();
    assert!(msg.contains("49152"), "{msg}");
}

#[test]
fn stream_emits_only_whole_characters() {
    let text = "👋🏽 👨\u{200d}👩\u{200d}👧 🇫🇷 日本語 naïve";
    let ids = TOKENIZER.encode(text, false).expect("encode");
    let mut stream = TOKENIZER.stream();
    let mut out = String::new();
    let mut held_back = false;
    for &id in &ids {
        match stream.push(id) {
            Some(chunk) => {
                assert!(
                    !chunk.contains('\u{FFFD}'),
                    "{chunk:?} has a broken character"
                );
                out.push_str(&chunk);
            }
            None => held_back = true,
        }
    }
    out.push_str(&stream.finish());
    assert_eq!(out, text);
    assert!(held_back, "some emoji byte tokens must have been held back");
}

#[test]
fn stream_finish_flushes_an_unfinished_character() {
    // The first byte token of a 4-byte emoji on its own.
    let ids = TOKENIZER.encode("👋", false).expect("encode");
    assert!(
        ids.len() > 1,
        "the emoji is split over byte tokens: {ids:?}"
    );
    let mut stream = TOKENIZER.stream();
    assert_eq!(stream.push(ids[0]), None);
    assert!(stream.has_pending());
    assert_eq!(stream.finish(), "\u{FFFD}");
    assert!(!stream.has_pending());
}

/// The character GPT-2's byte-level alphabet writes byte `b` as.
fn byte_level_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + rank).expect("valid code point")
}

/// Bytes the default model's vocabulary cannot spell. llama.cpp drops them when tokenizing,
/// and so do we (e.g. 0xF1, the lead byte of U+40000..U+7FFFF), so no tokenizer can round
/// trip text containing them.
static UNSPELLABLE: LazyLock<Vec<u8>> = LazyLock::new(|| {
    (0..=255u8)
        .filter(|&b| {
            TOKENIZER
                .token_id(&byte_level_char(b).to_string())
                .is_none()
        })
        .collect()
});

fn spellable(text: String) -> String {
    text.chars()
        .filter(|c| {
            let mut buf = [0u8; 4];
            c.encode_utf8(&mut buf)
                .bytes()
                .all(|b| !UNSPELLABLE.contains(&b))
        })
        .collect()
}

#[test]
fn unspellable_bytes_are_dropped_as_llama_cpp_drops_them() {
    // llama-tokenize gives [218, 218, 218] for U+40000 (F1 80 80 80): the F1 is lost.
    assert!(UNSPELLABLE.contains(&0xF1));
    assert_eq!(
        TOKENIZER.encode("\u{40000}", false).expect("encode"),
        vec![218, 218, 218]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn decode_of_encode_is_identity(text in any::<String>().prop_map(spellable)) {
        let ids = TOKENIZER.encode(&text, false).expect("encode");
        prop_assert_eq!(TOKENIZER.decode(&ids).expect("decode"), text);
    }

    #[test]
    fn stream_concatenates_to_the_text(
        text in "\\PC{0,40}|[ \\t\\n\\r]{0,8}|.{0,40}".prop_map(spellable)
    ) {
        let ids = TOKENIZER.encode(&text, false).expect("encode");
        let mut stream = TOKENIZER.stream();
        let mut out = String::new();
        for id in ids {
            if let Some(chunk) = stream.push(id) {
                out.push_str(&chunk);
            }
        }
        out.push_str(&stream.finish());
        prop_assert_eq!(out, text);
    }
}
