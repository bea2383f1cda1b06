//! What a node lets in: its API key and cookie sources, whether an address may be served
//! without a key, and which model files placement requests may name.
//!
//! - **API key**: `--api-key` / `CANOPY_API_KEY`, or `--api-key-file` / `CANOPY_API_KEY_FILE`
//!   (better: a file is not in any process's argv or environment), never both.
//! - **Exposure**: without a key the API may only listen on a loopback address; any other
//!   address (`0.0.0.0` included) needs a key or an explicit `--insecure-no-api-key`.
//! - **Cookie**: `--cookie` / `CANOPY_COOKIE`, or `--cookie-file` / `CANOPY_COOKIE_FILE`, else
//!   the data dir's `cookie` file (generated there on first use, mode 0600).
//! - **Model paths from the API** ([`ModelPaths`]): a placement request may name a catalogue
//!   model or a file under the model store or a `--model-path-allow` directory, after
//!   resolving symlinks and `..`; anything else gets one answer whether the file exists or
//!   not, so the API reveals nothing about the rest of the file system. (The operator's own
//!   `--model PATH` is not restricted.)

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use canopy_actors::api::ApiKey;
use canopy_runtime::cluster::identity::read_secret_file;

/// The API key from a flag (or its variable) or a file; `None` when neither is given.
pub fn api_key(given: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<ApiKey>> {
    let text = match (given, file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give the API key once: --api-key (CANOPY_API_KEY) or --api-key-file")
        }
        (Some(key), None) => key.to_string(),
        (None, Some(path)) => read_secret_file(path)
            .with_context(|| format!("cannot read the API key file {}", path.display()))?,
        (None, None) => return Ok(None),
    };
    ApiKey::new(&text)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("unusable API key: {e}"))
}

/// The cookie from a flag (or its variable) or a file; `None` means the data dir's.
pub fn cookie(given: Option<String>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    match (given, file) {
        (Some(_), Some(_)) => {
            anyhow::bail!("give the cookie once: --cookie (CANOPY_COOKIE) or --cookie-file")
        }
        (Some(cookie), None) => Ok(Some(cookie)),
        (None, Some(path)) => read_secret_file(path)
            .map(Some)
            .with_context(|| format!("cannot read the cookie file {}", path.display())),
        (None, None) => Ok(None),
    }
}

/// Refuses to serve the API on a non-loopback address without a key, unless `insecure`.
pub fn check_exposure(host: IpAddr, has_key: bool, insecure: bool) -> anyhow::Result<()> {
    if host.is_loopback() || has_key {
        return Ok(());
    }
    if insecure {
        tracing::warn!(
            %host,
            "serving the API without an API key on a non-loopback address \
             (--insecure-no-api-key): anyone who can reach it can use it"
        );
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve the API on {host} without an API key: anyone who can reach that \
         address could place models and read every prompt. Give a key (--api-key-file FILE, \
         or CANOPY_API_KEY), serve on 127.0.0.1, or pass --insecure-no-api-key on a network \
         you trust"
    )
}

/// The directories under which placement requests from the API may name model files.
#[derive(Debug, Clone)]
pub struct ModelPaths {
    roots: Vec<PathBuf>,
}

impl ModelPaths {
    /// The model store's directory and the `--model-path-allow` ones.
    pub fn new(store: &Path, allowed: &[PathBuf]) -> ModelPaths {
        let mut roots = vec![store.to_path_buf()];
        roots.extend(allowed.iter().cloned());
        ModelPaths { roots }
    }

    /// The file `name` names, resolved, if it is a regular file under one of the roots
    /// (after following symlinks and `..`); `None` otherwise, whatever the reason.
    pub fn check(&self, name: &str) -> Option<PathBuf> {
        let path = std::fs::canonicalize(name).ok()?;
        if !path.is_file() {
            return None;
        }
        self.roots
            .iter()
            .filter_map(|root| std::fs::canonicalize(root).ok())
            .any(|root| path.starts_with(&root))
            .then_some(path)
    }

    /// The error for a name that is neither a catalogue model nor an allowed file. It is the
    /// same whether a file of that name exists or not.
    pub fn refusal(name: &str) -> String {
        let shown: String = name.chars().take(200).collect();
        format!(
            "`{shown}` is not a model of the catalogue, nor a GGUF file under the model store \
             or a directory the node allows with --model-path-allow"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_paths_stay_under_their_roots() {
        let store = tempfile::tempdir().expect("store");
        let allowed = tempfile::tempdir().expect("allowed");
        let outside = tempfile::tempdir().expect("outside");
        for dir in [&store, &allowed, &outside] {
            std::fs::write(dir.path().join("m.gguf"), b"GGUF").expect("write");
        }
        let paths = ModelPaths::new(store.path(), &[allowed.path().to_path_buf()]);
        let name = |dir: &tempfile::TempDir| dir.path().join("m.gguf").display().to_string();
        assert!(paths.check(&name(&store)).is_some());
        assert!(paths.check(&name(&allowed)).is_some());
        assert!(paths.check(&name(&outside)).is_none());
        let sneaky = format!("{}/../{}", store.path().display(), name(&outside));
        assert!(
            paths.check(&sneaky).is_none(),
            "`..` does not leave the root"
        );
        std::os::unix::fs::symlink(
            outside.path().join("m.gguf"),
            store.path().join("link.gguf"),
        )
        .expect("symlink");
        let link = store.path().join("link.gguf").display().to_string();
        assert!(paths.check(&link).is_none(), "a symlink out is refused");
        assert!(
            paths.check(&store.path().display().to_string()).is_none(),
            "not a file"
        );
        assert!(paths.check("/etc/passwd").is_none());
    }

    #[test]
    fn exposure_needs_a_key_or_an_explicit_flag() {
        let lan: IpAddr = "192.168.1.5".parse().expect("ip");
        let any: IpAddr = "0.0.0.0".parse().expect("ip");
        assert!(check_exposure("127.0.0.1".parse().expect("ip"), false, false).is_ok());
        assert!(check_exposure("::1".parse().expect("ip"), false, false).is_ok());
        assert!(check_exposure(lan, false, false).is_err());
        assert!(check_exposure(any, false, false).is_err());
        assert!(check_exposure(lan, true, false).is_ok());
        assert!(check_exposure(lan, false, true).is_ok());
    }

    #[test]
    fn secrets_come_from_one_source() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("key");
        std::fs::write(&file, "0123456789abcdef0123\n").expect("write");
        let key = api_key(None, Some(&file)).expect("read").expect("a key");
        assert_eq!(key.expose(), "0123456789abcdef0123");
        assert!(api_key(Some("0123456789abcdef0123"), Some(&file)).is_err());
        assert!(api_key(Some("short"), None).is_err());
        assert!(api_key(None, None).expect("none").is_none());
        let missing = dir.path().join("missing");
        let err = format!("{:#}", api_key(None, Some(&missing)).expect_err("missing"));
        assert!(err.contains("missing"), "{err}");
        assert_eq!(
            cookie(None, Some(&file)).expect("read"),
            Some("0123456789abcdef0123".to_string())
        );
        assert!(cookie(Some("c".into()), Some(&file)).is_err());
    }
}
