//! `canopy chat`: a small terminal client for a running node.
//!
//! With a prompt argument it asks once and prints the answer as it streams; without one it
//! reads prompts line by line (history kept, `/reset` clears it, Ctrl-D ends). The model
//! defaults to the first one the node lists in `/v1/models`.

use std::io::{BufRead, Write};

use anyhow::Context;
use clap::Args;
use serde_json::{Value, json};

use crate::client::{DEFAULT_URL, get_json, post_lines};

/// Options of `canopy chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    /// Ask this once and exit (otherwise: an interactive session).
    prompt: Option<String>,
    /// The node's API URL.
    #[arg(long, env = "CANOPY_URL", default_value = DEFAULT_URL)]
    url: String,
    /// The model [default: the first model the node serves].
    #[arg(long)]
    model: Option<String>,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Sampling seed.
    #[arg(long)]
    seed: Option<u64>,
}

/// Streams one answer to stdout; returns its full text.
fn ask(args: &ChatArgs, model: &str, messages: &[Value]) -> anyhow::Result<String> {
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
    });
    if let Some(seed) = args.seed {
        body["seed"] = json!(seed);
    }
    let mut answer = String::new();
    let stdout = std::io::stdout();
    post_lines(&args.url, "/v1/chat/completions", &body, |line| {
        let Some(data) = line.strip_prefix("data: ") else {
            return Ok(());
        };
        if data == "[DONE]" {
            return Ok(());
        }
        let event: Value = serde_json::from_str(data).context("the node sent a malformed event")?;
        if let Some(message) = event["error"]["message"].as_str() {
            anyhow::bail!("the node reported an error: {message}");
        }
        if let Some(text) = event["choices"][0]["delta"]["content"].as_str() {
            answer.push_str(text);
            let mut out = stdout.lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        Ok(())
    })?;
    println!();
    Ok(answer)
}

/// Runs `canopy chat`.
pub fn run(args: ChatArgs) -> anyhow::Result<()> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => get_json(&args.url, "/v1/models")?["data"][0]["id"]
            .as_str()
            .map(str::to_string)
            .context("the node serves no model yet")?,
    };
    let mut history: Vec<Value> = Vec::new();
    if let Some(system) = &args.system {
        history.push(json!({"role": "system", "content": system}));
    }
    if let Some(prompt) = &args.prompt {
        history.push(json!({"role": "user", "content": prompt}));
        ask(&args, &model, &history)?;
        return Ok(());
    }
    eprintln!(
        "chatting with {model} at {} (/reset clears the history, Ctrl-D ends)",
        args.url
    );
    let stdin = std::io::stdin();
    loop {
        eprint!("> ");
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if line == "/reset" {
            history.retain(|m| m["role"] == "system");
            continue;
        }
        history.push(json!({"role": "user", "content": line}));
        match ask(&args, &model, &history) {
            Ok(answer) => history.push(json!({"role": "assistant", "content": answer})),
            Err(err) => {
                history.pop();
                eprintln!("error: {err:#}");
            }
        }
    }
}
