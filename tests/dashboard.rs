//! End-to-end: the web dashboard in a real browser (Debian's `chromium`, headless, driven
//! through `chromedriver` over WebDriver), on a two-node local cluster with the scripted
//! engine. It checks what a person sees: both nodes and the instance, a chat from the panel
//! streaming tokens, and a runner killed by a fault showing up on the timeline with the restart
//! count going up, all without reloading the page. Screenshots land in `target/dashboard-*.png`.
//!
//! Chromium and chromedriver are installed with apt-get where missing (the suite runs as root
//! in CI); the test is skipped in a build that is not root.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::common;

/// Chromium and chromedriver, installed with apt-get if missing.
fn chromedriver() -> PathBuf {
    let found = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
        })
    };
    if let (Some(driver), Some(_)) = (found("chromedriver"), found("chromium")) {
        return driver;
    }
    eprintln!("installing chromium and chromium-driver with apt-get (once)");
    for args in [
        &["update", "-qq"][..],
        &["install", "-y", "-qq", "chromium", "chromium-driver"][..],
    ] {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("apt-get runs");
        assert!(
            out.status.success(),
            "apt-get {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    found("chromedriver").expect("chromedriver is installed")
}

/// A process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `script` (a JS function body) in the page until it returns something truthy; returns
/// that value.
async fn until(client: &Client, what: &str, script: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let value = client.execute(script, vec![]).await.unwrap_or(Value::Null);
        let truthy = match &value {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            Value::Number(n) => n.as_f64() != Some(0.0),
            _ => true,
        };
        if truthy {
            return value;
        }
        if Instant::now() > deadline {
            let page = client
                .execute("return document.body.innerText", vec![])
                .await
                .unwrap_or_default();
            panic!(
                "timed out waiting for {what}; the page shows:\n{}",
                page.as_str().unwrap_or("")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn screenshot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join(format!("dashboard-{name}.png"));
    std::fs::write(&target, png).expect("screenshot written");
    eprintln!("screenshot: {}", target.display());
}

async fn chat(client: &Client, text: &str) {
    let input = client
        .find(Locator::Css("#chat-input"))
        .await
        .expect("chat input");
    input.send_keys(text).await.expect("typed");
    client
        .find(Locator::Css("#chat-send"))
        .await
        .expect("send button")
        .click()
        .await
        .expect("clicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(canopy_root),
    ignore = "needs root (installs chromium with apt-get); CI runs the suite as root"
)]
async fn the_dashboard_shows_the_cluster_streams_a_chat_and_a_runner_death_live() {
    let driver_bin = chromedriver();
    let dir = tempfile::tempdir().expect("tempdir");
    // The fault fires on a generate while the marker is absent: present now, so the first
    // chat runs; removed later, so the next one kills its runner before its first token (and
    // is retried on the restarted runner).
    let marker = dir.path().join("fired");
    std::fs::write(&marker, "").expect("marker");
    let fault = format!("crash-on-generate,once={}", marker.display());
    let cluster = common::LocalCluster::start(2, &[("CANOPY_RUNNER_FAULT", &fault)]);
    // The second node has no instance of its own: it shows the cluster through the plan.
    let second = cluster.base(1);

    let driver_port = common::free_port();
    let _driver = Killed(
        Command::new(&driver_bin)
            .arg(format!("--port={driver_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts"),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                          "--disable-dev-shm-usage", "--window-size=1400,1200"] }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let mut client = None;
    for _ in 0..50 {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
        {
            Ok(c) => {
                client = Some(c);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let client = client.expect("chromedriver answers");

    let started = Instant::now();
    client
        .goto(&format!("{second}/"))
        .await
        .expect("dashboard loads");
    eprintln!("dashboard loaded in {:?}", started.elapsed());
    client
        .execute("window.__sameDocument = true; return true", vec![])
        .await
        .expect("marked the page");
    let limit = Duration::from_secs(30);
    until(
        &client,
        "both nodes",
        "return document.querySelectorAll('#nodes tbody tr').length === 2",
        limit,
    )
    .await;
    until(
        &client,
        "a master among the nodes",
        "return [...document.querySelectorAll('#nodes tbody tr')].some(r => r.innerText.includes('master'))",
        limit,
    )
    .await;
    let instance = until(
        &client,
        "the instance, Ready",
        "const r = [...document.querySelectorAll('#instances tbody tr')].find(r => r.innerText.includes('Ready')); return r ? r.dataset.instance : null",
        limit,
    )
    .await;
    let instance = instance.as_str().expect("instance id").to_string();
    let restarts_js = format!(
        "const r = document.querySelector('#instances tbody tr[data-instance=\"{instance}\"] .restarts'); return r ? r.innerText : null"
    );
    let before = until(&client, "the restart count", &restarts_js, limit).await;
    assert_eq!(before, json!("0"));
    until(
        &client,
        "the actor tree",
        "return document.querySelector('#tree').innerText.includes('cluster-agent')",
        limit,
    )
    .await;

    // A chat from the panel streams from the instance on the first node.
    until(
        &client,
        "the chat's model",
        "return document.querySelector('#chat-model').value === 'scripted'",
        limit,
    )
    .await;
    chat(&client, "hello from the dashboard").await;
    let answer = until(
        &client,
        "the streamed answer",
        "const a = document.querySelectorAll('#chat-output .assistant'); const b = document.querySelector('#chat-send'); return a.length && !b.disabled ? a[a.length - 1].innerText : null",
        limit,
    )
    .await;
    assert!(
        answer
            .as_str()
            .is_some_and(|a| a.len() > 4 && !a.contains('[')),
        "{answer}"
    );
    screenshot(&client, "chat").await;

    // A runner death: the timeline shows it and the restart count goes up, live.
    std::fs::remove_file(&marker).expect("marker removed");
    chat(&client, "this one kills the runner").await;
    until(
        &client,
        "the runner's death on the timeline",
        "return [...document.querySelectorAll('#events li.failure')].some(l => l.dataset.kind === 'runner_failed')",
        limit,
    )
    .await;
    let after = until(
        &client,
        "the restart count to go up",
        &format!("const r = document.querySelector('#instances tbody tr[data-instance=\"{instance}\"] .restarts'); return r && r.innerText !== '0' ? r.innerText : null"),
        limit,
    )
    .await;
    assert_eq!(after, json!("1"));
    // The killed request had produced nothing: it was retried on the restarted runner.
    let second_answer = until(
        &client,
        "the retried answer",
        "const a = document.querySelectorAll('#chat-output .assistant'); const b = document.querySelector('#chat-send'); return a.length === 2 && !b.disabled ? a[1].innerText : null",
        limit,
    )
    .await;
    assert!(
        second_answer.as_str().is_some_and(|a| !a.contains('[')),
        "{second_answer}"
    );
    let same = client
        .execute("return window.__sameDocument === true", vec![])
        .await
        .expect("asked the page");
    assert_eq!(same, json!(true), "the page was reloaded");
    screenshot(&client, "failure").await;
    client.close().await.expect("browser closed");

    cluster.stop();
}
