//! [`Describer`]: the facts of a placed model's file for the API (`Backend::model_details`,
//! behind the Ollama API's `/api/tags`, `/api/show` and `/api/ps`).
//!
//! The facts come from the file's GGUF header (read with the engine's own reader, never its
//! tensors), once per version of the file: they are cached by path and re-read when the
//! file's size or modification time changes. The file's sha256 is computed once per version
//! too, on a blocking thread in the background, because hashing a model of gigabytes takes
//! seconds: until it is done the facts carry no digest. A source that is not a readable GGUF
//! file (a test engine's model name) has no facts; that is not an error.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use canopy_engine::gguf::GgufFile;
use sha2::{Digest, Sha256};

use crate::api::ModelFile;

/// The GGUF key of the chat template.
const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// Reads and caches model files' facts. Cheap to clone (the cache is shared).
#[derive(Clone, Default)]
pub(crate) struct Describer {
    cache: Arc<Mutex<HashMap<PathBuf, Entry>>>,
}

/// One version of one file.
#[derive(Clone)]
struct Entry {
    len: u64,
    modified: SystemTime,
    facts: Arc<ModelFile>,
    sha256: Arc<OnceLock<String>>,
}

impl Describer {
    /// The facts of the file at `source`, or `None` when it is not a readable GGUF file.
    pub(crate) async fn describe(&self, source: &str) -> Option<ModelFile> {
        let path = PathBuf::from(source);
        let meta = tokio::fs::metadata(&path).await.ok()?;
        if !meta.is_file() {
            return None;
        }
        let len = meta.len();
        let modified = meta.modified().unwrap_or(UNIX_EPOCH);
        let cached = self
            .lock()
            .get(&path)
            .filter(|e| e.len == len && e.modified == modified)
            .cloned();
        let entry = match cached {
            Some(entry) => entry,
            None => {
                let read = path.clone();
                let facts = match tokio::task::spawn_blocking(move || read_facts(&read)).await {
                    Ok(Ok(facts)) => facts,
                    Ok(Err(err)) => {
                        tracing::debug!(path = %path.display(), error = %err,
                            "model file not described");
                        return None;
                    }
                    Err(err) => {
                        tracing::warn!(path = %path.display(), error = %err,
                            "describing a model file failed");
                        return None;
                    }
                };
                let entry = Entry {
                    len,
                    modified,
                    facts: Arc::new(ModelFile {
                        size_bytes: len,
                        modified: modified
                            .duration_since(UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs()),
                        ..facts
                    }),
                    sha256: Arc::new(OnceLock::new()),
                };
                hash_in_background(path.clone(), entry.sha256.clone());
                self.lock().insert(path, entry.clone());
                entry
            }
        };
        let mut facts = (*entry.facts).clone();
        facts.sha256 = entry.sha256.get().cloned();
        Some(facts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Entry>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The header's facts (size, time and digest are filled in by the caller).
fn read_facts(path: &Path) -> Result<ModelFile, canopy_engine::gguf::GgufError> {
    let file = GgufFile::open_any_architecture(path)?;
    let family = file.architecture().map(str::to_string);
    let context_length = file
        .u32_opt(&file.arch_key("context_length"))
        .ok()
        .flatten()
        .map(u64::from);
    let quantization = file
        .u32_opt("general.file_type")
        .ok()
        .flatten()
        .and_then(file_type_name)
        .map(str::to_string);
    let chat_template = file
        .string_opt(CHAT_TEMPLATE_KEY)
        .ok()
        .flatten()
        .map(str::to_string);
    let mut metadata = file.scalar_metadata();
    metadata.remove(CHAT_TEMPLATE_KEY);
    Ok(ModelFile {
        format: "gguf".to_string(),
        family,
        parameters: file.parameter_count(),
        quantization,
        context_length,
        chat_template,
        metadata,
        ..ModelFile::default()
    })
}

/// Hashes `path` on a blocking thread and stores the digest in `slot`.
fn hash_in_background(path: PathBuf, slot: Arc<OnceLock<String>>) {
    tokio::task::spawn_blocking(move || match sha256_of(&path) {
        Ok(digest) => {
            let _ = slot.set(digest);
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), error = %err, "cannot hash a model file");
        }
    });
}

/// The sha256 of a file, lowercase hex.
fn sha256_of(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// llama.cpp's name of a `general.file_type` (its `LLAMA_FTYPE_MOSTLY_*` values).
fn file_type_name(file_type: u32) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_types_have_llama_cpp_names() {
        assert_eq!(file_type_name(3), Some("Q4_1"));
        assert_eq!(file_type_name(15), Some("Q4_K_M"));
        assert_eq!(file_type_name(1000), None);
    }

    #[tokio::test]
    async fn a_file_that_is_not_gguf_has_no_facts() {
        let dir = std::env::temp_dir().join(format!("canopy-describe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("not.gguf");
        std::fs::write(&path, b"hello").expect("write");
        let describer = Describer::default();
        assert_eq!(describer.describe(&path.display().to_string()).await, None);
        assert_eq!(describer.describe("scripted").await, None);
        assert_eq!(
            sha256_of(&path).expect("hash"),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
