//! `canopy-store`: the model store: a catalogue of known models and the directory they are
//! downloaded into. It is its own crate, apart from the engines, so that downloading code
//! builds unoptimised and quickly (the engine builds at opt-level 3 even in dev) and the
//! engine does not carry an HTTP client.
//!
//! `canopy model pull NAME` / `list` / `rm` / `path` are thin wrappers around [`ModelStore`].
//! Engines never download anything themselves: they get a path from
//! [`ModelStore::resolve`] (or [`ModelStore::ensure`]), and a path to any GGUF file on disk
//! always works, catalogue or not.
//!
//! Where models go: `CANOPY_MODEL_DIR` if set, else `canopy/models` in the user's cache
//! directory (`~/.cache/canopy/models` on Linux). See [`ModelStore::default_dir`].
//!
//! What the store promises:
//!
//! - a file in the store under a catalogue name has that entry's exact size and sha256: every
//!   download is verified before an atomic rename puts it in place, and a corrupt one is
//!   deleted and refused ([`StoreError::DownloadCorrupt`]);
//! - sources are tried in catalogue order, and a failure of each is kept for the final error
//!   ([`StoreError::PullFailed`]);
//! - two pulls of one model, in threads or processes, do not both download, and cannot corrupt
//!   each other (see the `lock` module);
//! - errors say what to do next (which command to run, which variable to set).
//!
//! Files, one concept each: [`catalogue`] (what is known), [`source`] (where it comes from)
//! with `pip` and `hugging_face` (how), `hashing_file` (the verified temporary file),
//! `lock` (one pull at a time), [`progress`] (how a pull reports), [`model_store`] (the
//! store itself), [`error`].

pub mod catalogue;
pub mod error;
mod hashing_file;
mod hugging_face;
mod lock;
pub mod model_store;
mod pip;
pub mod progress;
pub mod source;

pub use catalogue::{Catalogue, CatalogueEntry, DEFAULT_MODEL};
pub use error::{SourceFailure, StoreError};
pub use model_store::{
    HF_ENDPOINT_ENV, LocalModel, MODEL_DIR_ENV, ModelStore, PYTHON_ENV, ensure_default_model,
};
pub use progress::{NoProgress, Progress};
pub use source::Source;
