//! Opening GGUF files: the default model opens and reads; bad files (missing, empty,
//! truncated, wrong magic, unsupported version or architecture) fail with a message that
//! names the file and says what is wrong.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use canopy_engine::EngineError;
use canopy_engine::gguf::{GgufError, GgufFile, GgufProblem, SUPPORTED_ARCHITECTURES, write_file};

/// Opens `path` expecting an error; checks that the message names the file and contains
/// every one of `words`.
fn open_err(path: &Path, words: &[&str]) -> GgufError {
    let err = GgufFile::open(path).expect_err("opening must fail");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "message must name the file: {msg}"
    );
    for word in words {
        assert!(msg.contains(word), "message must say {word:?}: {msg}");
    }
    err
}

fn write_bytes(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.path().join(name);
    let mut file = std::fs::File::create(&path).expect("create");
    file.write_all(bytes).expect("write");
    path
}

/// A small valid GGUF file with the given architecture and one 2x32 f32 tensor.
fn synthetic(dir: &tempfile::TempDir, name: &str, arch: Option<&str>) -> PathBuf {
    let path = dir.path().join(name);
    let tensor = Tensor::ones((2, 32), DType::F32, &Device::Cpu).expect("tensor");
    let qtensor = QTensor::quantize(&tensor, GgmlDType::F32).expect("qtensor");
    let arch_value = arch.map(|a| Value::String(a.to_string()));
    let layers = Value::U32(2);
    let name_value = Value::String("tiny".to_string());
    let mut metadata: Vec<(&str, &Value)> = vec![("general.name", &name_value)];
    if let Some(arch_value) = &arch_value {
        metadata.push(("general.architecture", arch_value));
        metadata.push(("bert.block_count", &layers));
    }
    write_file(&path, &metadata, &[("weight", &qtensor)]).expect("write gguf");
    path
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nope.gguf");
    let err = open_err(&path, &["no such file"]);
    assert!(matches!(err.problem, GgufProblem::NotFound));
}

#[test]
fn directory_instead_of_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = open_err(dir.path(), &["not a regular file"]);
    assert!(matches!(err.problem, GgufProblem::NotAFile));
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_bytes(&dir, "empty.gguf", b"");
    let err = open_err(&path, &["empty"]);
    assert!(matches!(err.problem, GgufProblem::Empty));
}

#[test]
fn wrong_magic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_bytes(&dir, "page.gguf", b"<!DOCTYPE html><html>not found</html>");
    let err = open_err(&path, &["not a GGUF file", "\"GGUF\"", "HTML"]);
    assert!(matches!(err.problem, GgufProblem::BadMagic { .. }));

    let path = write_bytes(&dir, "zeros.gguf", &[0u8; 64]);
    open_err(&path, &["not a GGUF file", "\\x00"]);
}

#[test]
fn unsupported_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&7u32.to_le_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    let path = write_bytes(&dir, "v7.gguf", &bytes);
    open_err(&path, &["unsupported GGUF version 7"]);

    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_be_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    let path = write_bytes(&dir, "big-endian.gguf", &bytes);
    open_err(&path, &["big-endian"]);
}

#[test]
fn header_cut_short() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_bytes(&dir, "stub.gguf", b"GGUF\x03\x00");
    let err = open_err(&path, &["truncated"]);
    assert!(matches!(err.problem, GgufProblem::Truncated { .. }));
}

#[test]
fn truncated_copy_of_the_model() {
    let model = common::model_path();
    let bytes = std::fs::read(&model).expect("read model");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_bytes(&dir, "first-mb.gguf", &bytes[..1 << 20]);
    let err = open_err(&path, &["truncated", "interrupted download"]);
    assert!(matches!(err.problem, GgufProblem::Truncated { .. }));
}

#[test]
fn truncated_tensor_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic(&dir, "whole.gguf", Some("llama"));
    GgufFile::open(&path).expect("the whole file opens");
    let bytes = std::fs::read(&path).expect("read");
    let cut = write_bytes(&dir, "cut.gguf", &bytes[..bytes.len() - 10]);
    open_err(
        &cut,
        &["truncated", "tensor", "\"weight\"", "bytes missing"],
    );
}

#[test]
fn unsupported_architecture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic(&dir, "bert.gguf", Some("bert"));
    let err = open_err(&path, &["unsupported architecture \"bert\"", "llama"]);
    assert!(matches!(
        err.problem,
        GgufProblem::UnsupportedArchitecture { ref found, .. } if found == "bert"
    ));
    // Tools that only need metadata can still read it.
    let file = GgufFile::open_any_architecture(&path).expect("any architecture");
    assert_eq!(file.architecture(), Some("bert"));
    assert_eq!(file.u32("bert.block_count").expect("block count"), 2);
}

#[test]
fn corrupt_alignment_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("align0.gguf");
    let arch = Value::String("llama".to_string());
    let zero = Value::U32(0);
    write_file(
        &path,
        &[
            ("general.architecture", &arch),
            ("general.alignment", &zero),
        ],
        &[],
    )
    .expect("write gguf");
    open_err(&path, &["malformed"]);
}

#[test]
fn missing_architecture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic(&dir, "anonymous.gguf", None);
    open_err(&path, &["general.architecture"]);
}

#[test]
fn errors_convert_to_engine_errors_naming_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_bytes(&dir, "empty.gguf", b"");
    let err: EngineError = GgufFile::open(&path).expect_err("empty").into();
    assert!(matches!(err, EngineError::InvalidModel { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("empty"),
        "{msg}"
    );
}

#[test]
fn the_default_model_opens_and_reads() {
    let path = common::model_path();
    let file = GgufFile::open(&path).expect("open the default model");
    assert_eq!(file.architecture(), Some("llama"));
    assert!(SUPPORTED_ARCHITECTURES.contains(&"llama"));
    assert_eq!(file.version(), 3);
    assert_eq!(file.u32(&file.arch_key("block_count")).expect("layers"), 30);
    assert_eq!(file.u32("llama.embedding_length").expect("width"), 576);
    assert!((file.f32("llama.rope.freq_base").expect("rope") - 100000.0).abs() < 1e-3);
    assert_eq!(file.string("tokenizer.ggml.model").expect("model"), "gpt2");
    assert_eq!(
        file.string_array("tokenizer.ggml.tokens")
            .expect("tokens")
            .len(),
        49152
    );
    assert_eq!(
        file.i32_array("tokenizer.ggml.token_type").expect("types")[1],
        3
    );
    assert_eq!(
        file.bool_opt("tokenizer.ggml.add_bos_token")
            .expect("add bos"),
        Some(false)
    );
    assert_eq!(file.u32_opt("no.such.key").expect("absent is fine"), None);

    let missing = file.u32("llama.no_such_key").expect_err("missing key");
    let msg = missing.to_string();
    assert!(
        msg.contains("llama.no_such_key") && msg.contains(&path.display().to_string()),
        "{msg}"
    );
    let wrong = file
        .u32("general.architecture")
        .expect_err("a string is not a u32");
    assert!(wrong.to_string().contains("is a string"), "{wrong}");

    let embeddings = file
        .tensor("token_embd.weight", &Device::Cpu)
        .expect("read the embeddings");
    assert_eq!(embeddings.shape().dims(), &[49152, 576]);
    let err = file
        .tensor("no.such.tensor", &Device::Cpu)
        .expect_err("missing tensor");
    assert!(err.to_string().contains("no.such.tensor"), "{err}");
}

#[test]
fn parameter_count_and_scalar_metadata_describe_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = synthetic(&dir, "tiny.gguf", Some("bert"));
    let file = GgufFile::open_any_architecture(&path).expect("open");
    assert_eq!(file.parameter_count(), 64, "one 2x32 tensor");
    let metadata = file.scalar_metadata();
    assert_eq!(metadata["general.architecture"], "bert");
    assert_eq!(metadata["general.name"], "tiny");
    assert_eq!(metadata["bert.block_count"], 2);

    // The default model: its weights, and no arrays (the vocabulary) among the scalars.
    let file = GgufFile::open(common::model_path()).expect("the default model");
    assert!(
        file.parameter_count() > 100_000_000,
        "{}",
        file.parameter_count()
    );
    let metadata = file.scalar_metadata();
    assert!(!metadata.contains_key("tokenizer.ggml.tokens"));
    assert_eq!(metadata["llama.block_count"], 30);
}
