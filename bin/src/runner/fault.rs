//! Fault injection for chaos tests: [`FaultSpec`] (what to break) and [`FaultInjector`] (when).
//!
//! Off unless `--fault SPEC` / `CANOPY_RUNNER_FAULT=SPEC` is given. A spec is a comma-separated
//! list of:
//!
//! | key                               | fault                                                           |
//! |-----------------------------------|-----------------------------------------------------------------|
//! | `crash-after-tokens=N`            | SIGKILL this process once N chunks were sent (like an OOM kill) |
//! | `exit0-after-tokens=N`            | `exit(0)` abruptly once N chunks were sent                      |
//! | `freeze-heartbeat-after-tokens=N` | stop heartbeats once N chunks were sent; work carries on        |
//! | `stall-after-tokens=N`            | wedge the work loop once N chunks were sent; heartbeats go on   |
//! | `crash-on-load`                   | SIGKILL this process when a load starts (after `Status(Loading)`) |
//! | `crash-on-generate`               | SIGKILL this process when a generate task starts, before any token |
//! | `once=PATH`                       | fire only if PATH does not exist, creating it when firing       |
//!
//! Chunks are counted over the process lifetime, across tasks, N ≥ 1. `once` makes a restarted
//! runner healthy: the first fault that fires creates the marker, and no fault fires while the
//! marker exists (so with `once`, at most one fault fires per marker, whatever the spec lists).
//! The marker is created with `create_new`, so two runners racing on one marker fire once.
//!
//! The heartbeat freeze goes through the shared [`FaultHooks`], the same switch the scripted
//! engine's `freeze_after` directive pulls.

use std::fmt;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::Duration;

use canopy_engine::FaultHooks;

/// Why a fault spec could not be parsed.
#[derive(Debug, thiserror::Error)]
pub enum FaultSpecError {
    /// A key that is not a known fault.
    #[error("unknown fault {key:?}; known faults: {KNOWN_KEYS}")]
    UnknownKey {
        /// The key as written.
        key: String,
    },
    /// A known key with a missing or bad value.
    #[error("bad value for fault {key:?}: {reason}")]
    BadValue {
        /// The key as written.
        key: String,
        /// What was expected.
        reason: String,
    },
    /// A key given twice.
    #[error("fault {key:?} is given twice")]
    Duplicate {
        /// The key as written.
        key: String,
    },
    /// Only `once` was given: nothing to inject.
    #[error("`once` needs a fault to guard; known faults: {KNOWN_KEYS}")]
    NothingToInject,
}

const KNOWN_KEYS: &str = "crash-after-tokens=N, exit0-after-tokens=N, \
    freeze-heartbeat-after-tokens=N, stall-after-tokens=N, crash-on-load, crash-on-generate, once=PATH";

/// The faults to inject, parsed from `--fault`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultSpec {
    /// SIGKILL after this many chunks.
    pub crash_after_tokens: Option<u64>,
    /// `exit(0)` after this many chunks.
    pub exit0_after_tokens: Option<u64>,
    /// Freeze the heartbeat after this many chunks.
    pub freeze_heartbeat_after_tokens: Option<u64>,
    /// Wedge the work loop after this many chunks.
    pub stall_after_tokens: Option<u64>,
    /// SIGKILL when a load starts.
    pub crash_on_load: bool,
    /// SIGKILL when a generate task starts.
    pub crash_on_generate: bool,
    /// Fire only while this marker file does not exist; create it when firing.
    pub once: Option<PathBuf>,
}

impl FaultSpec {
    /// Whether the spec injects anything (an empty spec, e.g. an empty environment variable,
    /// does not).
    pub fn is_armed(&self) -> bool {
        self.crash_after_tokens.is_some()
            || self.exit0_after_tokens.is_some()
            || self.freeze_heartbeat_after_tokens.is_some()
            || self.stall_after_tokens.is_some()
            || self.crash_on_load
            || self.crash_on_generate
    }
}

impl FromStr for FaultSpec {
    type Err = FaultSpecError;

    fn from_str(spec: &str) -> Result<Self, FaultSpecError> {
        let mut parsed = FaultSpec::default();
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) = match item.split_once('=') {
                Some((key, value)) => (key.trim(), Some(value.trim())),
                None => (item, None),
            };
            let duplicate = || FaultSpecError::Duplicate {
                key: key.to_string(),
            };
            let slot = match key {
                "crash-after-tokens" => &mut parsed.crash_after_tokens,
                "exit0-after-tokens" => &mut parsed.exit0_after_tokens,
                "freeze-heartbeat-after-tokens" => &mut parsed.freeze_heartbeat_after_tokens,
                "stall-after-tokens" => &mut parsed.stall_after_tokens,
                "crash-on-load" => {
                    if value.is_some() {
                        return Err(bad_value(key, "takes no value"));
                    }
                    if parsed.crash_on_load {
                        return Err(duplicate());
                    }
                    parsed.crash_on_load = true;
                    continue;
                }
                "crash-on-generate" => {
                    if value.is_some() {
                        return Err(bad_value(key, "takes no value"));
                    }
                    if parsed.crash_on_generate {
                        return Err(duplicate());
                    }
                    parsed.crash_on_generate = true;
                    continue;
                }
                "once" => {
                    let path = value
                        .filter(|v| !v.is_empty())
                        .ok_or_else(|| bad_value(key, "expected once=PATH"))?;
                    if parsed.once.replace(PathBuf::from(path)).is_some() {
                        return Err(duplicate());
                    }
                    continue;
                }
                _ => {
                    return Err(FaultSpecError::UnknownKey {
                        key: key.to_string(),
                    });
                }
            };
            let count = value
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|n| *n >= 1)
                .ok_or_else(|| bad_value(key, "expected a whole number of chunks, at least 1"))?;
            if slot.replace(count).is_some() {
                return Err(duplicate());
            }
        }
        if parsed.once.is_some() && !parsed.is_armed() {
            return Err(FaultSpecError::NothingToInject);
        }
        Ok(parsed)
    }
}

fn bad_value(key: &str, reason: &str) -> FaultSpecError {
    FaultSpecError::BadValue {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

impl fmt::Display for FaultSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let counted = [
            ("crash-after-tokens", self.crash_after_tokens),
            ("exit0-after-tokens", self.exit0_after_tokens),
            (
                "freeze-heartbeat-after-tokens",
                self.freeze_heartbeat_after_tokens,
            ),
            ("stall-after-tokens", self.stall_after_tokens),
        ];
        let mut items: Vec<String> = counted
            .iter()
            .filter_map(|(key, n)| n.map(|n| format!("{key}={n}")))
            .collect();
        if self.crash_on_load {
            items.push("crash-on-load".to_string());
        }
        if self.crash_on_generate {
            items.push("crash-on-generate".to_string());
        }
        if let Some(path) = &self.once {
            items.push(format!("once={}", path.display()));
        }
        f.write_str(&items.join(","))
    }
}

/// Fires the armed faults at the right moments; a no-op when nothing is armed.
#[derive(Debug)]
pub struct FaultInjector {
    spec: FaultSpec,
    hooks: FaultHooks,
    chunks_sent: AtomicU64,
}

impl FaultInjector {
    /// An injector for `spec` (`None`: inject nothing) pulling the switches in `hooks`.
    pub fn new(spec: Option<FaultSpec>, hooks: FaultHooks) -> Self {
        Self {
            spec: spec.unwrap_or_default(),
            hooks,
            chunks_sent: AtomicU64::new(0),
        }
    }

    /// Called when a load starts.
    pub fn on_load_started(&self) {
        if self.spec.crash_on_load && self.claim("crash-on-load") {
            kill_own_process();
        }
    }

    /// Called when a generate task starts running, before its first token.
    pub fn on_generate_started(&self) {
        if self.spec.crash_on_generate && self.claim("crash-on-generate") {
            kill_own_process();
        }
    }

    /// Called after each chunk frame was sent; may not return (crash, exit, stall).
    pub fn on_chunk_sent(&self) {
        let sent = self.chunks_sent.fetch_add(1, Ordering::SeqCst) + 1;
        let at = |threshold: Option<u64>| threshold == Some(sent);
        if at(self.spec.freeze_heartbeat_after_tokens) && self.claim("freeze-heartbeat") {
            self.hooks.freeze_heartbeat();
        }
        if at(self.spec.crash_after_tokens) && self.claim("crash-after-tokens") {
            kill_own_process();
        }
        if at(self.spec.exit0_after_tokens) && self.claim("exit0-after-tokens") {
            std::process::exit(0);
        }
        if at(self.spec.stall_after_tokens) && self.claim("stall-after-tokens") {
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        }
    }

    /// Decides whether a fault may fire now (the `once` marker), and logs it when it does.
    fn claim(&self, fault: &str) -> bool {
        if let Some(marker) = &self.spec.once {
            match OpenOptions::new().write(true).create_new(true).open(marker) {
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                    tracing::info!(fault, marker = %marker.display(), "fault already fired once; skipping");
                    return false;
                }
                Err(err) => {
                    tracing::error!(
                        fault, marker = %marker.display(), %err,
                        "cannot create the fault's once-marker; not firing (it would fire on every restart)"
                    );
                    return false;
                }
            }
        }
        tracing::warn!(fault, "fault injection: firing");
        true
    }
}

/// SIGKILLs this whole process, as the kernel's OOM killer would.
fn kill_own_process() -> ! {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    if let Err(err) = kill(Pid::this(), Signal::SIGKILL) {
        tracing::error!(%err, "cannot SIGKILL our own process; aborting instead");
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<FaultSpec, String> {
        spec.parse::<FaultSpec>().map_err(|e| e.to_string())
    }

    #[test]
    fn empty_spec_is_not_armed() {
        assert_eq!(parse(""), Ok(FaultSpec::default()));
        assert_eq!(parse(" , "), Ok(FaultSpec::default()));
        assert!(!FaultSpec::default().is_armed());
    }

    #[test]
    fn parses_every_key() {
        let spec = parse(
            "crash-after-tokens=3, exit0-after-tokens=4,freeze-heartbeat-after-tokens=5,\
             stall-after-tokens=6,crash-on-load,once=/tmp/canopy-marker",
        );
        assert_eq!(
            spec,
            Ok(FaultSpec {
                crash_after_tokens: Some(3),
                exit0_after_tokens: Some(4),
                freeze_heartbeat_after_tokens: Some(5),
                stall_after_tokens: Some(6),
                crash_on_load: true,
                crash_on_generate: false,
                once: Some(PathBuf::from("/tmp/canopy-marker")),
            })
        );
    }

    #[test]
    fn display_round_trips() {
        let text = "crash-after-tokens=3,stall-after-tokens=6,crash-on-load,once=/tmp/m";
        let spec = parse(text);
        assert_eq!(spec.as_ref().map(ToString::to_string).as_deref(), Ok(text));
    }

    #[test]
    fn rejects_bad_specs_clearly() {
        let cases = [
            (
                "crash-after-tokenz=3",
                "unknown fault \"crash-after-tokenz\"",
            ),
            ("crash-after-tokens", "expected a whole number"),
            ("crash-after-tokens=0", "at least 1"),
            (
                "stall-after-tokens=x",
                "bad value for fault \"stall-after-tokens\"",
            ),
            ("crash-on-load=yes", "takes no value"),
            ("once=", "expected once=PATH"),
            ("once=/tmp/m", "needs a fault"),
            ("crash-on-load,crash-on-load", "given twice"),
            ("exit0-after-tokens=1,exit0-after-tokens=2", "given twice"),
        ];
        for (spec, want) in cases {
            let err = parse(spec).err().unwrap_or_default();
            assert!(err.contains(want), "{spec:?}: {err:?} lacks {want:?}");
        }
    }

    #[test]
    fn unknown_key_lists_known_ones() {
        let err = parse("boom").err().unwrap_or_default();
        assert!(err.contains("crash-on-load"), "{err}");
    }

    #[test]
    fn freeze_fires_at_its_chunk_through_the_shared_hooks() {
        let hooks = FaultHooks::new();
        let spec = parse("freeze-heartbeat-after-tokens=2").ok();
        let injector = FaultInjector::new(spec, hooks.clone());
        injector.on_chunk_sent();
        assert!(!hooks.heartbeat_frozen());
        injector.on_chunk_sent();
        assert!(hooks.heartbeat_frozen());
    }

    #[test]
    fn once_marker_lets_a_fault_fire_only_once() {
        let marker = std::env::temp_dir().join(format!(
            "canopy-fault-test-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = std::fs::remove_file(&marker);
        let spec = parse(&format!(
            "freeze-heartbeat-after-tokens=1,once={}",
            marker.display()
        ))
        .ok();

        let first = FaultHooks::new();
        FaultInjector::new(spec.clone(), first.clone()).on_chunk_sent();
        assert!(first.heartbeat_frozen());
        assert!(marker.exists());

        let restarted = FaultHooks::new();
        FaultInjector::new(spec, restarted.clone()).on_chunk_sent();
        assert!(!restarted.heartbeat_frozen());
        let _ = std::fs::remove_file(&marker);
    }

    #[test]
    fn unarmed_injector_does_nothing() {
        let hooks = FaultHooks::new();
        let injector = FaultInjector::new(None, hooks.clone());
        injector.on_load_started();
        for _ in 0..10 {
            injector.on_chunk_sent();
        }
        assert!(!hooks.heartbeat_frozen());
    }
}
