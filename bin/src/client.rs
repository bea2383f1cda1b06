//! A small blocking HTTP client for the CLI commands that talk to a running node
//! (`canopy inspect`, `canopy chat`): JSON GETs, and POSTs whose answer is read as it comes.
//! When the node has an API key, the client sends `CANOPY_API_KEY`, or the key in the file
//! `CANOPY_API_KEY_FILE` names, as a bearer token.

use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;

/// The node URL used when none is given.
pub const DEFAULT_URL: &str = "http://127.0.0.1:52415";

fn agent(timeout: Option<Duration>) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(timeout)
        .build()
        .into()
}

/// The key to send, from `CANOPY_API_KEY` or the file `CANOPY_API_KEY_FILE` names.
fn api_key() -> anyhow::Result<Option<String>> {
    if let Some(key) = std::env::var("CANOPY_API_KEY")
        .ok()
        .filter(|k| !k.is_empty())
    {
        return Ok(Some(key.trim().to_string()));
    }
    match std::env::var_os("CANOPY_API_KEY_FILE") {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            canopy_runtime::cluster::identity::read_secret_file(&path)
                .map(Some)
                .with_context(|| format!("cannot read the API key file {}", path.display()))
        }
        None => Ok(None),
    }
}

/// `request` with the bearer token, if there is a key.
fn authorized<B>(request: ureq::RequestBuilder<B>) -> anyhow::Result<ureq::RequestBuilder<B>> {
    Ok(match api_key()? {
        Some(key) => request.header("Authorization", format!("Bearer {key}")),
        None => request,
    })
}

/// Turns a non-2xx answer into an error carrying the server's message.
fn check(
    url: &str,
    mut response: ureq::http::Response<ureq::Body>,
) -> anyhow::Result<ureq::http::Response<ureq::Body>> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = response.body_mut().read_to_string().unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    if status == 401 {
        anyhow::bail!(
            "{url} answered {status}: {message} (set CANOPY_API_KEY or CANOPY_API_KEY_FILE)"
        )
    }
    anyhow::bail!("{url} answered {status}: {message}")
}

/// GETs `base` + `path` and parses the JSON answer.
pub fn get_json(base: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let response = authorized(agent(Some(Duration::from_secs(10))).get(&url))?
        .call()
        .with_context(|| {
            format!("cannot reach a Canopy node at {base} (is it running? try --url)")
        })?;
    let mut response = check(&url, response)?;
    let body = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("cannot read the answer of {url}"))?;
    serde_json::from_str(&body).with_context(|| format!("{url} did not answer JSON"))
}

/// GETs `base` + `path` and hands each line of the answer to `line` as it arrives (for
/// streams: no overall timeout).
pub fn get_lines(
    base: &str,
    path: &str,
    line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let sent = authorized(agent(None).get(&url))?.call();
    read_lines(base, &url, sent, line)
}

/// POSTs JSON to `base` + `path` and hands each line of the answer to `line` as it arrives.
pub fn post_lines(
    base: &str,
    path: &str,
    body: &serde_json::Value,
    line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let sent = authorized(agent(None).post(&url))?.send_json(body);
    read_lines(base, &url, sent, line)
}

/// Hands each line of the answer `sent` got from `url` to `line` as it arrives.
fn read_lines(
    base: &str,
    url: &str,
    sent: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    mut line: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let response = sent.with_context(|| {
        format!("cannot reach a Canopy node at {base} (is it running? try --url)")
    })?;
    let response = check(url, response)?;
    let reader = std::io::BufReader::new(response.into_body().into_reader());
    for l in reader.lines() {
        let l = l.with_context(|| format!("the connection to {url} broke"))?;
        line(&l)?;
    }
    Ok(())
}
