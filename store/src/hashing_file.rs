//! [`HashingFile`]: a temporary file in the store that hashes and counts what is written to it.
//!
//! Every download lands in one of these, next to its final place (same directory, so the final
//! rename is atomic). Its name carries the writer's process id (`.FILE.PID.XXXXXX.part`) so that
//! a later pull can tell the leftovers of a crashed process from a live download (see
//! [`super::lock`]). Dropping it unpersisted deletes the file: a failed or corrupt download
//! leaves nothing behind.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tempfile::NamedTempFile;

use super::StoreError;
use super::progress::Progress;

/// The size of the copy buffer and of the file's write buffer.
const CHUNK: usize = 1 << 20;

/// A temporary file being filled, with the sha256 and length of what went in so far.
pub(crate) struct HashingFile {
    file: BufWriter<NamedTempFile>,
    hasher: Sha256,
    written: u64,
}

/// A [`HashingFile`] whose writing is over: flushed and synced to disk.
pub(crate) struct WrittenFile {
    /// The temporary file, deleted on drop unless persisted.
    pub temp: NamedTempFile,
    /// The sha256 of its bytes, lowercase hex.
    pub sha256: String,
    /// Its length in bytes.
    pub size: u64,
}

impl HashingFile {
    /// Creates an empty temporary file in `dir` whose name starts with `prefix`.
    pub(crate) fn create_in(dir: &Path, prefix: &str) -> Result<Self, StoreError> {
        let mut builder = tempfile::Builder::new();
        builder.prefix(prefix).suffix(".part");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // A model file is not secret: readable by all, like any downloaded file.
            builder.permissions(std::fs::Permissions::from_mode(0o644));
        }
        let temp = builder
            .tempfile_in(dir)
            .map_err(|e| StoreError::io("create a temporary file in", dir, e))?;
        Ok(Self {
            file: BufWriter::with_capacity(CHUNK, temp),
            hasher: Sha256::new(),
            written: 0,
        })
    }

    /// The temporary file's path (for error messages).
    pub(crate) fn path(&self) -> PathBuf {
        self.file.get_ref().path().to_path_buf()
    }

    /// Copies `reader` into the file, advancing `progress` per chunk. Reads at most
    /// `limit + 1` bytes, so an endless or oversized source fails the size check instead of
    /// filling the disk. Errors of `reader` are mapped by `read_error`.
    pub(crate) fn copy_from(
        &mut self,
        reader: &mut dyn Read,
        limit: u64,
        progress: &mut dyn Progress,
        read_error: &dyn Fn(io::Error) -> StoreError,
    ) -> Result<(), StoreError> {
        let mut reader = reader.take(limit.saturating_add(1));
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(e)),
            };
            let chunk = &buf[..n];
            self.file
                .write_all(chunk)
                .map_err(|e| StoreError::io("write", self.path(), e))?;
            self.hasher.update(chunk);
            self.written += n as u64;
            progress.advance(n as u64);
        }
    }

    /// Flushes and syncs the file, and returns it with its hash and length.
    pub(crate) fn finish(self) -> Result<WrittenFile, StoreError> {
        let path = self.path();
        let temp = self
            .file
            .into_inner()
            .map_err(|e| StoreError::io("write", &path, e.into_error()))?;
        temp.as_file()
            .sync_all()
            .map_err(|e| StoreError::io("sync", &path, e))?;
        Ok(WrittenFile {
            temp,
            sha256: hex(&self.hasher.finalize()),
            size: self.written,
        })
    }
}

/// The sha256 (lowercase hex) and length of the file at `path`, reporting progress.
pub(crate) fn hash_file(
    path: &Path,
    progress: &mut dyn Progress,
) -> Result<(String, u64), StoreError> {
    let mut file = File::open(path).map_err(|e| StoreError::io("open", path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StoreError::io("read", path, e)),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
        progress.advance(n as u64);
    }
    Ok((hex(&hasher.finalize()), size))
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoProgress;

    const HELLO_SHA: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn hashes_and_counts_what_is_copied_and_caps_the_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut out = HashingFile::create_in(dir.path(), ".t.").expect("create");
        let mut src: &[u8] = b"hello";
        out.copy_from(&mut src, 5, &mut NoProgress, &|e| {
            StoreError::io("read", "x", e)
        })
        .expect("copy");
        let done = out.finish().expect("finish");
        assert_eq!((done.sha256.as_str(), done.size), (HELLO_SHA, 5));
        assert_eq!(
            hash_file(done.temp.path(), &mut NoProgress)
                .expect("hash")
                .0,
            HELLO_SHA
        );

        let mut big = HashingFile::create_in(dir.path(), ".t.").expect("create");
        let mut endless = io::repeat(7);
        big.copy_from(&mut endless, 10, &mut NoProgress, &|e| {
            StoreError::io("read", "x", e)
        })
        .expect("copy");
        assert_eq!(big.finish().expect("finish").size, 11);
    }

    #[test]
    fn a_dropped_file_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = HashingFile::create_in(dir.path(), ".t.").expect("create");
        let path = out.path();
        assert!(path.exists());
        drop(out);
        assert!(!path.exists());
    }
}
