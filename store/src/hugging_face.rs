//! The Hugging Face source: one HTTPS GET of `{endpoint}/{repo}/resolve/main/{file}`.
//!
//! The endpoint is `HF_ENDPOINT` when set (mirrors, a local test server), else the public hub.
//! The body is streamed into the store's temporary file with a byte progress bar and hashed on
//! the way; redirects (the hub answers with one to its CDN) are followed. Connecting and each
//! read have timeouts, so a dead connection fails the source instead of hanging the pull.
//!
//! Not verified from Canopy's build machines, which reach package registries only; the hash
//! check refuses whatever does not match the catalogue.

use std::time::Duration;

use super::StoreError;
use super::hashing_file::HashingFile;
use super::progress::Progress;
use super::source::FetchEnv;

/// The public Hugging Face hub, used when `HF_ENDPOINT` is not set.
pub(crate) const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How long connecting, waiting for the response head, and each read may take.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Downloads `file` of `repo` into `out`.
pub(crate) fn fetch(
    env: &FetchEnv<'_>,
    repo: &str,
    file: &str,
    out: &mut HashingFile,
    progress: &mut dyn Progress,
) -> Result<(), StoreError> {
    let url = format!(
        "{}/{repo}/resolve/main/{file}",
        env.hf_endpoint.trim_end_matches('/')
    );
    let http_error = |reason: String| StoreError::Http {
        url: url.clone(),
        reason,
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(TIMEOUT))
        .timeout_recv_response(Some(TIMEOUT))
        .timeout_per_read(Some(TIMEOUT))
        .user_agent(concat!("canopy/", env!("CARGO_PKG_VERSION")))
        .build()
        .into();
    tracing::info!(%url, "downloading from Hugging Face");
    progress.start(None, &format!("connecting for {file}"));
    let response = agent.get(&url).call();
    progress.finish();
    let response = response.map_err(|e| http_error(e.to_string()))?;

    let total = response
        .body()
        .content_length()
        .unwrap_or(env.expected_size);
    progress.start(Some(total), &format!("downloading {file}"));
    let mut body = response.into_body().into_reader();
    let copied = out.copy_from(&mut body, env.expected_size, progress, &|e| {
        http_error(e.to_string())
    });
    progress.finish();
    copied
}
