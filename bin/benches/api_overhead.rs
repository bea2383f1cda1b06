//! API overhead benchmark: time to first token, decode tokens/s and total latency of the same
//! greedy chat request, once with the engine called directly and once through a whole node
//! (HTTP API actor -> router -> runner supervisor -> runner process -> engine). The difference
//! is what the actor and HTTP layers cost. Prints numbers; asserts nothing.
//!
//! `cargo bench -p canopy --bench api_overhead` (or `just bench-api`). Environment:
//! - `CANOPY_BENCH_REPS` (default 5): measured repetitions per path (medians are reported);
//!   one extra, unmeasured repetition per path warms both up first;
//! - `CANOPY_BENCH_GEN_TOKENS` (default 128): `max_tokens` of the request;
//! - `CANOPY_BENCH_THREADS` (default 2): CPU threads of both engines;
//! - `CANOPY_BENCH_MODEL`: a GGUF file instead of the default model (downloaded if missing).
//!
//! Both paths run the same build, model file, prompt and thread count:
//! - **direct**: a [`CandleEngine`] in this process, `load` + `warm_up` as a runner does, then
//!   `generate` with a sink that timestamps every non-empty output piece;
//! - **through the API**: a node started in this process with one instance of the model; its
//!   runner is a child process (`canopy runner`, this build's binary). Requests go over
//!   loopback HTTP with a blocking client: streamed (`stream: true`, SSE; the arrival of every
//!   non-empty `delta.content` is timestamped) and not streamed (total latency only).
//!
//! Repetitions alternate between the paths (direct, API streamed, API non-streamed, ...) so
//! that background load drifts into all of them alike.
//!
//! Definitions, identical on both paths: TTFT = first non-empty piece - start (request send
//! for the API); decode tokens/s = (n - 1) / (last piece - first piece) over the n non-empty
//! pieces (one piece per token except for rare held-back partial characters); total =
//! start -> generation returned (direct) / `[DONE]` read or JSON body read (API). Overhead %
//! is how much worse the API path is than the direct one (positive = slower through the API).
//! Greedy decoding (temperature 0) makes the texts comparable; the benchmark prints whether
//! they match. A second table shows each path's best repetition, which other work on a busy
//! machine disturbs less than the median (the load average is printed before and after).

use std::io::BufRead;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use canopy_actors::api::ApiConfig;
use canopy_actors::node::{Node, NodeConfig, Placement, RunnerDefaults};
use canopy_actors::runner::RunnerCommand;
use canopy_engine::candle_engine::Backend;
use canopy_engine::{CandleEngine, Engine, GenerateSink};
use canopy_proto::{
    ChatMessage, GenerateParams, GenerateRequest, LoadSpec, Phase, Prompt, TokenChunk,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const PROMPT: &str = "Write a short story about a lighthouse keeper.";
const MODEL_ID: &str = "smollm2";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One measured generation.
#[derive(Debug, Clone)]
struct Run {
    /// Start -> first non-empty piece (`None` for non-streamed API requests).
    ttft: Option<Duration>,
    /// (pieces - 1) / (last - first), tokens per second (`None` when not streamed or < 2 pieces).
    rate: Option<f64>,
    /// Start -> done.
    total: Duration,
    /// Non-empty pieces seen (0 for non-streamed API requests).
    pieces: usize,
    /// Completion tokens as reported (engine outcome / API usage).
    completion_tokens: Option<u64>,
    /// The generated text.
    text: String,
}

/// Timestamps of the non-empty pieces of one stream, relative to `start`.
struct Pieces {
    start: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    count: usize,
    text: String,
}

impl Pieces {
    fn new(start: Instant) -> Self {
        Self {
            start,
            first: None,
            last: None,
            count: 0,
            text: String::new(),
        }
    }

    fn push(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.count += 1;
        self.text.push_str(text);
    }

    fn into_run(self, total: Duration, completion_tokens: Option<u64>) -> Run {
        let rate = match (self.first, self.last) {
            (Some(first), Some(last)) if self.count >= 2 && last > first => {
                Some((self.count - 1) as f64 / (last - first).as_secs_f64())
            }
            _ => None,
        };
        Run {
            ttft: self.first.map(|f| f - self.start),
            rate,
            total,
            pieces: self.count,
            completion_tokens,
            text: self.text,
        }
    }
}

impl GenerateSink for Pieces {
    fn phase(&mut self, _: Phase) {}

    fn chunk(&mut self, chunk: TokenChunk) -> ControlFlow<()> {
        self.push(&chunk.text);
        ControlFlow::Continue(())
    }

    fn cancelled(&self) -> bool {
        false
    }
}

fn direct_run(engine: &mut CandleEngine, max_tokens: u32) -> Result<Run, BoxError> {
    let request = GenerateRequest {
        tools: Vec::new(),
        prompt: Prompt::Chat(vec![ChatMessage::new("user", PROMPT)]),
        params: GenerateParams {
            max_tokens,
            temperature: 0.0,
            seed: 0,
            ..GenerateParams::default()
        },
    };
    let start = Instant::now();
    let mut sink = Pieces::new(start);
    let outcome = engine.generate(&request, &mut sink)?;
    let total = start.elapsed();
    Ok(sink.into_run(total, Some(u64::from(outcome.usage.completion_tokens))))
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

fn request_body(max_tokens: u32, stream: bool) -> serde_json::Value {
    let mut body = serde_json::json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": PROMPT}],
        "temperature": 0,
        "seed": 0,
        "max_tokens": max_tokens,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = serde_json::json!({"include_usage": true});
    }
    body
}

fn api_stream_run(agent: &ureq::Agent, base: &str, max_tokens: u32) -> Result<Run, BoxError> {
    let url = format!("{base}/v1/chat/completions");
    let body = request_body(max_tokens, true);
    let start = Instant::now();
    let response = agent.post(&url).send_json(&body)?;
    if !response.status().is_success() {
        return Err(format!("{url} answered {}", response.status()).into());
    }
    let mut pieces = Pieces::new(start);
    let mut completion_tokens = None;
    let reader = std::io::BufReader::new(response.into_body().into_reader());
    for line in reader.lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let event: serde_json::Value = serde_json::from_str(data)?;
        if let Some(error) = event.get("error") {
            return Err(format!("the stream failed: {error}").into());
        }
        if let Some(text) = event["choices"][0]["delta"]["content"].as_str() {
            pieces.push(text);
        }
        if let Some(n) = event["usage"]["completion_tokens"].as_u64() {
            completion_tokens = Some(n);
        }
    }
    let total = start.elapsed();
    Ok(pieces.into_run(total, completion_tokens))
}

fn api_json_run(agent: &ureq::Agent, base: &str, max_tokens: u32) -> Result<Run, BoxError> {
    let url = format!("{base}/v1/chat/completions");
    let body = request_body(max_tokens, false);
    let start = Instant::now();
    let mut response = agent.post(&url).send_json(&body)?;
    let status = response.status();
    let text = response.body_mut().read_to_string()?;
    let total = start.elapsed();
    if !status.is_success() {
        return Err(format!("{url} answered {status}: {text}").into());
    }
    let answer: serde_json::Value = serde_json::from_str(&text)?;
    Ok(Run {
        ttft: None,
        rate: None,
        total,
        pieces: 0,
        completion_tokens: answer["usage"]["completion_tokens"].as_u64(),
        text: answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    })
}

fn wait_ready(agent: &ureq::Agent, base: &str, limit: Duration) -> Result<Duration, BoxError> {
    let start = Instant::now();
    let url = format!("{base}/ready");
    loop {
        if let Ok(response) = agent.get(&url).call()
            && response.status().as_u16() == 200
        {
            return Ok(start.elapsed());
        }
        if start.elapsed() > limit {
            return Err(format!("{url} did not answer 200 within {limit:?}").into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_ms(runs: &[Run], f: impl Fn(&Run) -> Option<Duration>) -> Option<f64> {
    median(runs.iter().filter_map(&f).map(ms).collect())
}

fn median_rate(runs: &[Run]) -> Option<f64> {
    median(runs.iter().filter_map(|r| r.rate).collect())
}

fn fmt_opt(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

/// Prints one table row; `higher_is_better` flips the sign of the overhead (rates).
fn row(metric: &str, direct: Option<f64>, api: Option<f64>, higher_is_better: bool) {
    let overhead = match (direct, api) {
        (Some(d), Some(a)) if d > 0.0 => Some(if higher_is_better {
            (d - a) / d * 100.0
        } else {
            (a - d) / d * 100.0
        }),
        _ => None,
    };
    println!(
        "| {metric:<34} | {:>13} | {:>11} | {:>10} |",
        fmt_opt(direct, 2),
        fmt_opt(api, 2),
        overhead.map_or_else(|| "n/a".into(), |o| format!("{o:+.2}")),
    );
}

fn print_runs(name: &str, runs: &[Run]) {
    for (i, r) in runs.iter().enumerate() {
        println!(
            "  {name} #{i}: ttft={} ms rate={} tok/s total={:.1} ms pieces={} completion_tokens={}",
            fmt_opt(r.ttft.map(ms), 1),
            fmt_opt(r.rate, 2),
            ms(r.total),
            r.pieces,
            r.completion_tokens
                .map_or_else(|| "n/a".into(), |n| n.to_string()),
        );
    }
}

fn short(text: &str) -> String {
    let flat = text.replace('\n', "\\n");
    if flat.chars().count() > 160 {
        format!("{}...", flat.chars().take(160).collect::<String>())
    } else {
        flat
    }
}

fn main() -> Result<(), BoxError> {
    let threads = env_u64("CANOPY_BENCH_THREADS", 2);
    // SAFETY: this is the first thing `main` does after reading the environment: no other
    // thread exists yet (the tokio runtime and the candle/rayon pools start later), so nothing
    // can read the environment concurrently. The candle/rayon pools of this process read these
    // once, on first use; the runner child processes inherit them (and the node also sets them
    // from `LoadSpec::threads`).
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let reps = env_u64("CANOPY_BENCH_REPS", 5).max(1) as usize;
    let max_tokens = env_u64("CANOPY_BENCH_GEN_TOKENS", 128) as u32;
    let model: PathBuf = match std::env::var_os("CANOPY_BENCH_MODEL").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => canopy_store::ensure_default_model()?,
    };
    let model_str = model.to_string_lossy().into_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "api_overhead: model={} threads={threads} reps={reps} max_tokens={max_tokens} cores={cores}",
        model.display()
    );
    println!("prompt (chat, one user message): {PROMPT:?}");
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at start: {}", load.trim());
    }

    // Direct: the engine in this process.
    let mut engine = CandleEngine::new(Backend::Cpu);
    let t = Instant::now();
    engine.load(
        &LoadSpec {
            model: model_str.clone(),
            layer_start: None,
            layer_end: None,
            threads: Some(threads as u32),
            parallel: None,
        },
        &mut |_, _| {},
    )?;
    engine.warm_up()?;
    println!("direct: loaded + warmed up in {:.0} ms", ms(t.elapsed()));

    // Through the API: a node in this process, its runner a child process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let t = Instant::now();
    let handle = rt.block_on(
        Node::builder(NodeConfig {
            api: ApiConfig {
                addr: "127.0.0.1:0".parse()?,
                ..ApiConfig::default()
            },
            runners: RunnerDefaults::new(RunnerCommand::canopy(env!("CARGO_BIN_EXE_canopy"))),
            placements: vec![Placement {
                model: MODEL_ID.into(),
                load: LoadSpec {
                    model: model_str,
                    layer_start: None,
                    layer_end: None,
                    threads: Some(threads as u32),
                    parallel: None,
                },
                instances: 1,
            }],
        })
        .start(),
    )?;
    let addr = rt.block_on(handle.api_addr())?;
    let base = format!("http://{addr}");
    let agent = agent();
    wait_ready(&agent, &base, Duration::from_secs(300))?;
    println!(
        "node: API on {base}, /ready 200 after {:.0} ms",
        ms(t.elapsed())
    );

    let mut direct = Vec::new();
    let mut streamed = Vec::new();
    let mut json = Vec::new();
    // Rep 0 warms every path up and is not measured.
    for rep in 0..=reps {
        let d = direct_run(&mut engine, max_tokens)?;
        let s = api_stream_run(&agent, &base, max_tokens)?;
        let j = api_json_run(&agent, &base, max_tokens)?;
        if rep == 0 {
            println!(
                "warm-up: direct {:.0} ms, API streamed {:.0} ms, API JSON {:.0} ms",
                ms(d.total),
                ms(s.total),
                ms(j.total)
            );
            continue;
        }
        direct.push(d);
        streamed.push(s);
        json.push(j);
    }

    println!();
    println!("per repetition:");
    print_runs("direct      ", &direct);
    print_runs("API streamed", &streamed);
    print_runs("API JSON    ", &json);

    println!();
    println!(
        "medians over {reps} repetitions ({threads} threads each path, max_tokens={max_tokens}):"
    );
    println!(
        "| {:<34} | {:>13} | {:>11} | {:>10} |",
        "metric", "engine direct", "through API", "overhead %"
    );
    println!("|{:-<36}|{:-<15}|{:-<13}|{:-<12}|", "", "", "", "");
    row(
        "TTFT (ms), streamed",
        median_ms(&direct, |r| r.ttft),
        median_ms(&streamed, |r| r.ttft),
        false,
    );
    row(
        "decode tokens/s, streamed",
        median_rate(&direct),
        median_rate(&streamed),
        true,
    );
    row(
        "total latency (ms), streamed",
        median_ms(&direct, |r| Some(r.total)),
        median_ms(&streamed, |r| Some(r.total)),
        false,
    );
    row(
        "total latency (ms), non-streamed",
        median_ms(&direct, |r| Some(r.total)),
        median_ms(&json, |r| Some(r.total)),
        false,
    );

    // The best repetition of each path: less sensitive to other work on a busy machine.
    println!();
    println!("best repetition (min for times, max for tokens/s):");
    println!(
        "| {:<34} | {:>13} | {:>11} | {:>10} |",
        "metric", "engine direct", "through API", "overhead %"
    );
    println!("|{:-<36}|{:-<15}|{:-<13}|{:-<12}|", "", "", "", "");
    let min_ms = |runs: &[Run], f: &dyn Fn(&Run) -> Option<Duration>| {
        runs.iter().filter_map(f).min().map(ms)
    };
    let max_rate = |runs: &[Run]| runs.iter().filter_map(|r| r.rate).reduce(f64::max);
    row(
        "TTFT (ms), streamed",
        min_ms(&direct, &|r| r.ttft),
        min_ms(&streamed, &|r| r.ttft),
        false,
    );
    row(
        "decode tokens/s, streamed",
        max_rate(&direct),
        max_rate(&streamed),
        true,
    );
    row(
        "total latency (ms), streamed",
        min_ms(&direct, &|r| Some(r.total)),
        min_ms(&streamed, &|r| Some(r.total)),
        false,
    );
    row(
        "total latency (ms), non-streamed",
        min_ms(&direct, &|r| Some(r.total)),
        min_ms(&json, &|r| Some(r.total)),
        false,
    );

    // Greedy decoding: every run of every path should produce the same text.
    let reference = &direct[0].text;
    let all: Vec<(&str, &Run)> = direct
        .iter()
        .map(|r| ("direct", r))
        .chain(streamed.iter().map(|r| ("API streamed", r)))
        .chain(json.iter().map(|r| ("API JSON", r)))
        .collect();
    let mismatches: Vec<&(&str, &Run)> = all.iter().filter(|(_, r)| &r.text != reference).collect();
    println!();
    if mismatches.is_empty() {
        println!(
            "text match: yes (all {} runs identical, {} chars, {} completion tokens)",
            all.len(),
            reference.len(),
            direct[0]
                .completion_tokens
                .map_or_else(|| "n/a".into(), |n| n.to_string())
        );
    } else {
        println!(
            "text match: NO ({} of {} runs differ from the first direct run)",
            mismatches.len(),
            all.len()
        );
        for (name, r) in mismatches.iter().take(3) {
            println!("  {name}: {:?}", short(&r.text));
        }
    }
    println!("text: {:?}", short(reference));
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average at end: {}", load.trim());
    }

    let t = Instant::now();
    rt.block_on(handle.shutdown(Duration::from_secs(30)))?;
    println!("node shut down in {:.0} ms", ms(t.elapsed()));
    Ok(())
}
