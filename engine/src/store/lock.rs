//! [`PullLock`]: one pull of a model at a time across threads and processes, and the cleanup
//! of what crashed pulls leave behind.
//!
//! The lock is a file `.FILE.lock` next to the model file, created with `O_EXCL`
//! (`create_new`) and holding the owner's process id; dropping the guard deletes it. A waiter
//! polls until the file is gone. If its owner is dead (a pull that was killed), the lock is
//! stale and is broken. Process liveness is checked with `kill(pid, 0)` on Unix; elsewhere a
//! lock counts as stale only once it is older than the longest wait.
//!
//! The lock saves duplicate downloads; it is not what keeps the store correct. Every pull writes
//! its own temporary file and moves it into place with an atomic rename only after the sha256
//! matched, so even two pulls that both got past the lock (two waiters breaking the same stale
//! lock at the same instant) cannot leave a corrupt model file: the last rename wins, and both
//! files are the same bytes.
//!
//! Scratch entries carry their creator's process id (`.FILE.PID.…`), so [`remove_leftovers`]
//! can delete those of dead processes without touching a live download.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::StoreError;
use super::progress::Progress;

/// How often a waiter looks at the lock again.
const POLL: Duration = Duration::from_millis(100);

/// How old an empty or unreadable lock file must be before it counts as stale (its owner died
/// between creating it and writing its process id).
const EMPTY_LOCK_GRACE: Duration = Duration::from_secs(30);

/// Holds the pull lock of one model file; releases it on drop.
#[derive(Debug)]
pub(crate) struct PullLock {
    path: PathBuf,
}

impl PullLock {
    /// The lock file guarding `file_name` in `dir`.
    pub(crate) fn path_for(dir: &Path, file_name: &str) -> PathBuf {
        dir.join(format!(".{file_name}.lock"))
    }

    /// Takes the lock at `path`, waiting up to `max_wait` for a live owner to release it.
    pub(crate) fn acquire(
        path: &Path,
        max_wait: Duration,
        progress: &mut dyn Progress,
    ) -> Result<Self, StoreError> {
        let started = Instant::now();
        let mut waiting = false;
        let result = loop {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    let pid = std::process::id();
                    if let Err(e) = writeln!(file, "{pid}") {
                        let _ = fs::remove_file(path);
                        break Err(StoreError::io("write the lock file", path, e));
                    }
                    break Ok(Self {
                        path: path.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => break Err(StoreError::io("create the lock file", path, e)),
            }
            let holder = fs::read_to_string(path).unwrap_or_default();
            if is_stale(path, &holder, max_wait) {
                tracing::warn!(lock = %path.display(), holder = holder.trim(), "breaking a stale pull lock");
                // Only remove it if it is still the same stale lock (another waiter may have
                // broken it and taken a fresh one meanwhile).
                if fs::read_to_string(path).unwrap_or_default() == holder {
                    let _ = fs::remove_file(path);
                }
                continue;
            }
            if started.elapsed() >= max_wait {
                let holder = match holder.trim() {
                    "" => "unknown".to_owned(),
                    pid => pid.to_owned(),
                };
                break Err(StoreError::Locked {
                    path: path.to_path_buf(),
                    holder,
                    waited_secs: started.elapsed().as_secs(),
                });
            }
            if !waiting {
                waiting = true;
                tracing::info!(lock = %path.display(), holder = holder.trim(), "waiting for another pull of this model");
                progress.start(
                    None,
                    &format!(
                        "waiting for another pull of this model (process {})",
                        holder.trim()
                    ),
                );
            }
            std::thread::sleep(POLL);
        };
        if waiting {
            progress.finish();
        }
        result
    }
}

impl Drop for PullLock {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(lock = %self.path.display(), error = %e, "could not remove the pull lock");
        }
    }
}

/// Whether the lock at `path`, whose content is `holder`, belongs to nobody alive.
fn is_stale(path: &Path, holder: &str, max_wait: Duration) -> bool {
    match holder.trim().parse::<u32>() {
        Ok(pid) => match process_alive(pid) {
            Some(alive) => !alive,
            None => older_than(path, max_wait),
        },
        Err(_) => older_than(path, EMPTY_LOCK_GRACE),
    }
}

/// Whether the file at `path` was last modified more than `age` ago (false if unknown).
fn older_than(path: &Path, age: Duration) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|elapsed| elapsed > age)
}

/// Whether process `pid` exists; `None` where that cannot be known.
#[cfg(unix)]
fn process_alive(pid: u32) -> Option<bool> {
    use nix::errno::Errno;
    use nix::sys::signal::kill;
    use nix::unistd::Pid;

    if pid == std::process::id() {
        return Some(true);
    }
    let Ok(raw) = i32::try_from(pid) else {
        return Some(false);
    };
    if raw <= 0 {
        return Some(false);
    }
    match kill(Pid::from_raw(raw), None) {
        Ok(()) => Some(true),
        Err(Errno::ESRCH) => Some(false),
        // EPERM: it exists but belongs to someone else.
        Err(_) => Some(true),
    }
}

/// Whether process `pid` exists; `None` where that cannot be known.
#[cfg(not(unix))]
fn process_alive(pid: u32) -> Option<bool> {
    if pid == std::process::id() {
        Some(true)
    } else {
        None
    }
}

/// The prefix of this process's scratch entries for `file_name`: `.FILE.PID.`.
pub(crate) fn scratch_prefix(file_name: &str) -> String {
    format!(".{file_name}.{}.", std::process::id())
}

/// Deletes the scratch entries (`.FILE.PID.…` files and directories) for `file_name` in `dir`
/// whose process is dead. Call it while holding the pull lock. Failures are only logged.
pub(crate) fn remove_leftovers(dir: &Path, file_name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{file_name}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some(pid) = rest
            .split_once('.')
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if process_alive(pid) != Some(false) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed the leftover of a crashed pull")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the leftover of a crashed pull")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NoProgress;

    /// A process id that is certainly not running: the largest Linux allows is 2^22.
    const DEAD_PID: u32 = 99_999_999;

    #[test]
    fn the_lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = PullLock::path_for(dir.path(), "m.gguf");
        let lock = PullLock::acquire(&path, Duration::from_secs(5), &mut NoProgress).expect("lock");
        let held = std::fs::read_to_string(&path).expect("read");
        assert_eq!(held.trim(), std::process::id().to_string());
        let second = PullLock::acquire(&path, Duration::from_millis(300), &mut NoProgress);
        assert!(
            matches!(second, Err(StoreError::Locked { .. })),
            "{second:?}"
        );
        drop(lock);
        assert!(!path.exists());
        PullLock::acquire(&path, Duration::from_secs(5), &mut NoProgress).expect("relock");
    }

    #[cfg(unix)]
    #[test]
    fn a_lock_of_a_dead_process_is_broken() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = PullLock::path_for(dir.path(), "m.gguf");
        std::fs::write(&path, format!("{DEAD_PID}\n")).expect("write");
        let _lock =
            PullLock::acquire(&path, Duration::from_secs(5), &mut NoProgress).expect("lock");
        let held = std::fs::read_to_string(&path).expect("read");
        assert_eq!(held.trim(), std::process::id().to_string());
    }

    #[cfg(unix)]
    #[test]
    fn leftovers_of_dead_processes_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dead_file = dir.path().join(format!(".m.gguf.{DEAD_PID}.abc.part"));
        let dead_dir = dir.path().join(format!(".m.gguf.{DEAD_PID}.pipxyz"));
        let live_file = dir
            .path()
            .join(format!("{}abc.part", scratch_prefix("m.gguf")));
        let other_model = dir.path().join(format!(".n.gguf.{DEAD_PID}.abc.part"));
        let lock = PullLock::path_for(dir.path(), "m.gguf");
        std::fs::write(&dead_file, b"x").expect("write");
        std::fs::create_dir(&dead_dir).expect("mkdir");
        std::fs::write(dead_dir.join("w.whl"), b"x").expect("write");
        for path in [&live_file, &other_model, &lock] {
            std::fs::write(path, b"x").expect("write");
        }
        remove_leftovers(dir.path(), "m.gguf");
        assert!(!dead_file.exists() && !dead_dir.exists());
        assert!(live_file.exists() && other_model.exists() && lock.exists());
    }
}
