//! [`PullLock`]: one pull of a model at a time across threads and processes, and the cleanup
//! of what crashed pulls leave behind.
//!
//! The lock is an exclusive advisory lock (`flock`, through `std::fs::File::try_lock`: the one
//! cross-process lock Canopy uses, the data directory's too) on a file `.FILE.lock` next to
//! the model file. The kernel drops it when its holder exits, however it exits, so a killed
//! pull never leaves a stale lock. The holder writes its process id into the file, so that a
//! waiter can say whom it waits for. Dropping the guard removes the file and then releases the
//! lock; a waiter that got the lock of a file already removed (it opened it before the
//! removal) notices that the path no longer names what it locked and tries again.
//!
//! The lock saves duplicate downloads; it is not what keeps the store correct. Every pull writes
//! its own temporary file and moves it into place with an atomic rename only after the sha256
//! matched, so two pulls that both wrote cannot leave a corrupt model file: the last rename
//! wins, and both files are the same bytes.
//!
//! Scratch entries carry their creator's process id (`.FILE.PID.…`), so [`remove_leftovers`]
//! can delete those of dead processes without touching a live download.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;
use super::progress::Progress;

/// How often a waiter tries the lock again.
const POLL: Duration = Duration::from_millis(100);

/// Holds the pull lock of one model file; releases it on drop.
#[derive(Debug)]
pub(crate) struct PullLock {
    path: PathBuf,
    file: Option<File>,
}

/// Whether `file` is still the file at `path` (not removed or replaced since it was opened).
#[cfg(unix)]
fn still_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Whether `file` is still the file at `path` (not removed or replaced since it was opened).
#[cfg(not(unix))]
fn still_at(_: &File, path: &Path) -> bool {
    path.exists()
}

impl PullLock {
    /// The lock file guarding `file_name` in `dir`.
    pub(crate) fn path_for(dir: &Path, file_name: &str) -> PathBuf {
        dir.join(format!(".{file_name}.lock"))
    }

    /// Takes the lock at `path`, waiting up to `max_wait` for its holder to release it.
    pub(crate) fn acquire(
        path: &Path,
        max_wait: Duration,
        progress: &mut dyn Progress,
    ) -> Result<Self, StoreError> {
        let started = Instant::now();
        let mut waiting = false;
        let result = loop {
            let file = match OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
            {
                Ok(file) => file,
                Err(e) => break Err(StoreError::io("open the lock file", path, e)),
            };
            match file.try_lock() {
                Ok(()) if still_at(&file, path) => break Self::hold(path, file),
                // The holder removed it between our open and our lock: try the new one.
                Ok(()) => continue,
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => {
                    break Err(StoreError::io("lock the lock file", path, e));
                }
            }
            let holder = fs::read_to_string(path).unwrap_or_default();
            let holder = match holder.trim() {
                "" => "unknown".to_owned(),
                pid => pid.to_owned(),
            };
            if started.elapsed() >= max_wait {
                break Err(StoreError::Locked {
                    path: path.to_path_buf(),
                    holder,
                    waited_secs: started.elapsed().as_secs(),
                });
            }
            if !waiting {
                waiting = true;
                tracing::info!(lock = %path.display(), %holder, "waiting for another pull of this model");
                progress.start(
                    None,
                    &format!("waiting for another pull of this model (process {holder})"),
                );
            }
            std::thread::sleep(POLL);
        };
        if waiting {
            progress.finish();
        }
        result
    }

    /// Writes this process's id into the locked `file`.
    fn hold(path: &Path, mut file: File) -> Result<Self, StoreError> {
        let written = file
            .set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()));
        if let Err(e) = written {
            return Err(StoreError::io("write the lock file", path, e));
        }
        Ok(Self {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }
}

impl Drop for PullLock {
    fn drop(&mut self) {
        // Remove first, release after: whoever locks the removed file next sees it is gone.
        if let Err(e) = fs::remove_file(&self.path) {
            tracing::warn!(lock = %self.path.display(), error = %e, "could not remove the pull lock");
        }
        drop(self.file.take());
    }
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
    use crate::NoProgress;

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

    #[test]
    fn a_lock_file_left_behind_holds_nothing() {
        // A pull killed before it could remove its lock file leaves the file, but not the
        // lock: the kernel released that with the process.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = PullLock::path_for(dir.path(), "m.gguf");
        std::fs::write(&path, format!("{DEAD_PID}\n")).expect("write");
        let _lock =
            PullLock::acquire(&path, Duration::from_secs(5), &mut NoProgress).expect("lock");
        let held = std::fs::read_to_string(&path).expect("read");
        assert_eq!(held.trim(), std::process::id().to_string());
    }

    #[test]
    fn a_waiter_gets_the_lock_when_its_holder_lets_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = PullLock::path_for(dir.path(), "m.gguf");
        let lock = PullLock::acquire(&path, Duration::from_secs(5), &mut NoProgress).expect("lock");
        let waiter = {
            let path = path.clone();
            std::thread::spawn(move || {
                PullLock::acquire(&path, Duration::from_secs(10), &mut NoProgress).map(|l| {
                    let held = std::fs::read_to_string(&path).expect("read");
                    drop(l);
                    held
                })
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        drop(lock);
        let held = waiter.join().expect("joins").expect("the waiter locks");
        assert_eq!(held.trim(), std::process::id().to_string());
        assert!(!path.exists());
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
