//! Who this node is: its identity and cluster cookie, persisted in its data directory.
//!
//! A node keeps a small data directory (by default `$XDG_DATA_HOME/canopy`, see
//! [`default_data_dir`]) holding:
//!
//! - `lock`: an empty file on which the node holds an exclusive advisory lock (`flock`, through
//!   `std::fs::File::try_lock`, the one cross-process lock Canopy uses) for as
//!   long as its [`DataDir`] lives. Two nodes sharing one directory would be two nodes with one
//!   id, which breaks membership and the election, so the second one is refused with
//!   [`IdentityError::InUse`]. `flock` locks die with the process, so a crashed node never leaves
//!   a stale lock behind, and they are per open file description, so the check also holds
//!   between two `DataDir`s of one process.
//! - `node-id`: the node's [`NodeId`], 128 random bits as 32 lowercase hex characters, created on
//!   first use and kept forever after, so a restarted node is recognised as the same node.
//! - `cookie`: the shared secret of the cluster (ractor_cluster's cookie authentication), created
//!   on first use unless one is given on the command line. It is written with mode 0600.
//!
//! Decisions:
//!
//! - Files are written atomically (a temporary file in the same directory, `fsync`, `rename`,
//!   then a best-effort `fsync` of the directory), so a crash never leaves a half-written id.
//! - A file that exists but does not parse is an error that names the file and says how to fix
//!   it, never silently replaced: replacing an id would make the node a stranger to its cluster,
//!   replacing a cookie would lock it out.
//! - Node ids are case-insensitive on input and always lowercase once parsed, so that comparing
//!   ids (the election, [`super::discovery::should_dial`]) compares canonical strings.
//! - A cookie given explicitly is validated (non-empty, at most [`MAX_COOKIE_LEN`] bytes,
//!   printable ASCII without whitespace) and never written to disk: the user manages it.
//! - [`Cookie`]'s `Debug` does not print the secret, so it can be logged with `?cookie`.

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};

/// Name of the lock file inside the data directory.
pub const LOCK_FILE: &str = "lock";
/// Name of the file holding the node id inside the data directory.
pub const NODE_ID_FILE: &str = "node-id";
/// Name of the file holding the generated cookie inside the data directory.
pub const COOKIE_FILE: &str = "cookie";
/// Number of hex characters in a [`NodeId`] (128 bits).
pub const NODE_ID_LEN: usize = 32;
/// Number of characters of a freshly generated cookie.
pub const GENERATED_COOKIE_LEN: usize = 32;
/// Longest cookie accepted, in bytes.
pub const MAX_COOKIE_LEN: usize = 256;

/// Files in the data directory are tiny; reading stops after this many bytes so that a wrong
/// file (say a log) in place of `node-id` is reported as corrupt instead of read whole.
const MAX_FILE_READ: u64 = 4096;

/// Why the data directory, the node id or the cookie could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Another node (in this or another process) holds the data directory's lock.
    #[error(
        "the data directory {path} is already in use by another canopy node; two nodes cannot \
         share a data directory (it holds the node's identity): pass another --data-dir"
    )]
    InUse {
        /// The directory.
        path: PathBuf,
    },
    /// The lock file could not be opened or locked for a reason other than contention.
    #[error("cannot lock {path}: {source}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file of the data directory could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// A file of the data directory could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The `node-id` file exists but does not hold a valid id.
    #[error(
        "the node id file {path} is corrupt ({reason}); delete it to give this node a new \
         identity (the cluster will then see it as a new node)"
    )]
    CorruptNodeId {
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        reason: String,
    },
    /// The `cookie` file exists but does not hold a valid cookie.
    #[error(
        "the cookie file {path} is corrupt ({reason}); delete it to generate a new cookie (every \
         node of the cluster must then be given the new one), or pass --cookie"
    )]
    CorruptCookie {
        /// The file.
        path: PathBuf,
        /// What is wrong with its content.
        reason: String,
    },
    /// A cookie given by the user is not acceptable.
    #[error("invalid cookie: {reason}")]
    InvalidCookie {
        /// What is wrong with it.
        reason: String,
    },
}

/// The data directory used when none is given: `$XDG_DATA_HOME/canopy`, else
/// `~/.local/share/canopy` (the platform's data directory elsewhere), else `/tmp/canopy`.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir()
        .map(|dir| dir.join("canopy"))
        .unwrap_or_else(|| PathBuf::from("/tmp/canopy"))
}

/// The identity of a node: 32 lowercase hex characters (128 random bits), stable across
/// restarts because it is kept in the node's [`DataDir`].
///
/// Parsing ([`FromStr`], deserialisation) accepts upper- or lowercase hex and stores lowercase.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct NodeId(String);

impl NodeId {
    /// A fresh random id.
    pub fn random() -> NodeId {
        NodeId(format!("{:032x}", rand::random::<u128>()))
    }

    /// The id as a string (32 lowercase hex characters).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 8 characters, enough to tell nodes apart in logs.
    pub fn short(&self) -> &str {
        &self.0[..8]
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A string that is not a valid [`NodeId`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid node id: {reason}")]
pub struct ParseNodeIdError {
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for NodeId {
    type Err = ParseNodeIdError;

    fn from_str(s: &str) -> Result<NodeId, ParseNodeIdError> {
        if s.len() != NODE_ID_LEN {
            return Err(ParseNodeIdError {
                reason: format!(
                    "expected {NODE_ID_LEN} hex characters, found {} characters",
                    s.chars().count()
                ),
            });
        }
        if let Some(bad) = s.chars().find(|c| !c.is_ascii_hexdigit()) {
            return Err(ParseNodeIdError {
                reason: format!("expected only hex characters, found {bad:?}"),
            });
        }
        Ok(NodeId(s.to_ascii_lowercase()))
    }
}

impl TryFrom<String> for NodeId {
    type Error = ParseNodeIdError;

    fn try_from(s: String) -> Result<NodeId, ParseNodeIdError> {
        s.parse()
    }
}

impl From<NodeId> for String {
    fn from(id: NodeId) -> String {
        id.0
    }
}

/// The cluster cookie: the shared secret every node of one cluster must have.
///
/// `Debug` prints the cookie redacted; use `value` where the secret itself is needed.
#[derive(Clone, PartialEq, Eq)]
pub struct Cookie {
    /// The secret.
    pub value: String,
    /// True when the cookie was generated just now (first start with this data directory and no
    /// `--cookie`): the binary prints it so the user can pass it to the other nodes.
    pub generated: bool,
}

impl fmt::Debug for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cookie")
            .field("value", &"<redacted>")
            .field("generated", &self.generated)
            .finish()
    }
}

/// Checks that `value` is acceptable as a cookie: non-empty, at most [`MAX_COOKIE_LEN`] bytes,
/// printable ASCII without whitespace. The error says what is wrong, without the value.
pub(crate) fn validate_cookie(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("the cookie is empty".to_owned());
    }
    if value.len() > MAX_COOKIE_LEN {
        return Err(format!(
            "the cookie is {} bytes long, the limit is {MAX_COOKIE_LEN}",
            value.len()
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(
            "the cookie must be printable ASCII without whitespace or control characters"
                .to_owned(),
        );
    }
    Ok(())
}

/// A node's data directory, locked for the lifetime of this value.
///
/// Open it once at start-up with [`DataDir::open`] and keep it alive as long as the node runs:
/// dropping it releases the lock.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    /// The open lock file; its lock is released when it is closed.
    _lock: File,
}

impl DataDir {
    /// Creates `path` (mode 0700, parents included) if needed and locks it.
    ///
    /// Fails with [`IdentityError::InUse`] when another live `DataDir` (in any process) holds it.
    pub fn open(path: impl AsRef<Path>) -> Result<DataDir, IdentityError> {
        let path = path.as_ref().to_path_buf();
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(|source| IdentityError::CreateDir {
                path: path.clone(),
                source,
            })?;

        let lock_path = path.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|source| IdentityError::Lock {
                path: lock_path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(IdentityError::InUse { path }),
            Err(TryLockError::Error(source)) => {
                return Err(IdentityError::Lock {
                    path: lock_path,
                    source,
                });
            }
        }
        tracing::debug!(path = %path.display(), "data directory opened and locked");
        Ok(DataDir { path, _lock: file })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This node's id: read from `node-id`, or created there (and logged) on first use.
    pub fn node_id(&self) -> Result<NodeId, IdentityError> {
        let path = self.path.join(NODE_ID_FILE);
        match read_small(&path)? {
            Some(content) => {
                content
                    .trim()
                    .parse()
                    .map_err(|e: ParseNodeIdError| IdentityError::CorruptNodeId {
                        path,
                        reason: e.reason,
                    })
            }
            None => {
                let id = NodeId::random();
                write_atomically(&path, format!("{id}\n").as_bytes(), 0o644)?;
                tracing::info!(node_id = %id, path = %path.display(), "created a new node id");
                Ok(id)
            }
        }
    }

    /// The cluster cookie.
    ///
    /// With `given`, that cookie is validated and returned (`generated: false`) and nothing is
    /// written. Without, the cookie is read from `cookie`, or generated there (mode 0600) on first
    /// use (`generated: true`).
    pub fn cookie(&self, given: Option<&str>) -> Result<Cookie, IdentityError> {
        if let Some(value) = given {
            validate_cookie(value).map_err(|reason| IdentityError::InvalidCookie { reason })?;
            return Ok(Cookie {
                value: value.to_owned(),
                generated: false,
            });
        }
        let path = self.path.join(COOKIE_FILE);
        match read_small(&path)? {
            Some(content) => {
                let value = content.trim();
                validate_cookie(value).map_err(|reason| IdentityError::CorruptCookie {
                    path: path.clone(),
                    reason,
                })?;
                warn_if_readable_by_others(&path);
                Ok(Cookie {
                    value: value.to_owned(),
                    generated: false,
                })
            }
            None => {
                let value: String = rand::rng()
                    .sample_iter(Alphanumeric)
                    .take(GENERATED_COOKIE_LEN)
                    .map(char::from)
                    .collect();
                write_atomically(&path, format!("{value}\n").as_bytes(), 0o600)?;
                tracing::info!(path = %path.display(), "generated a new cluster cookie");
                Ok(Cookie {
                    value,
                    generated: true,
                })
            }
        }
    }
}

/// Reads a secret the user keeps in a file (`--cookie-file`, `--api-key-file`): at most
/// 4 KiB, surrounding whitespace trimmed; warns when other users may read the file.
pub fn read_secret_file(path: &Path) -> Result<String, IdentityError> {
    match read_small(path)? {
        Some(content) => {
            warn_if_readable_by_others(path);
            Ok(content.trim().to_owned())
        }
        None => Err(IdentityError::Read {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::NotFound, "no such file"),
        }),
    }
}

/// Reads a small text file; `None` when it does not exist.
fn read_small(path: &Path) -> Result<Option<String>, IdentityError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(IdentityError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_READ)
        .read_to_end(&mut bytes)
        .map_err(|source| IdentityError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    // Invalid UTF-8 becomes replacement characters, which the validators then reject with a
    // message about the content rather than an I/O error.
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

/// Writes `contents` to `path` atomically with the given mode: temporary file in the same
/// directory, fsync, rename over `path`, best-effort fsync of the directory.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), IdentityError> {
    let write_err = |source| IdentityError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have narrowed the mode; never widen it, but make 0600 exact.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(write_err(e));
    }
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Logs a warning when a secret file can be read by the group or others.
fn warn_if_readable_by_others(path: &Path) {
    let Ok(meta) = fs::metadata(path) else {
        return;
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{mode:o}"),
            "this secret file is accessible to other users; run `chmod 600` on it"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_persists_across_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let first = {
            let data = DataDir::open(&dir).unwrap();
            let id = data.node_id().unwrap();
            assert_eq!(id, data.node_id().unwrap());
            id
        };
        let data = DataDir::open(&dir).unwrap();
        assert_eq!(first, data.node_id().unwrap());
        assert_eq!(first.as_str().len(), NODE_ID_LEN);
        assert_eq!(first.short(), &first.as_str()[..8]);
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "data dir mode {mode:o}");
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    }

    #[test]
    fn lock_refuses_a_second_open_until_the_first_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let first = DataDir::open(tmp.path()).unwrap();
        let err = DataDir::open(tmp.path()).unwrap_err();
        assert!(matches!(err, IdentityError::InUse { .. }), "{err:?}");
        assert!(err.to_string().contains("--data-dir"), "{err}");
        drop(first);
        DataDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn corrupt_node_id_names_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(tmp.path()).unwrap();
        let path = tmp.path().join(NODE_ID_FILE);
        for content in ["not an id\n", "0123456789abcdef0123456789abcdeg", ""] {
            fs::write(&path, content).unwrap();
            let err = data.node_id().unwrap_err();
            assert!(
                matches!(err, IdentityError::CorruptNodeId { .. }),
                "{err:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("delete"), "{msg}");
        }
        // Surrounding whitespace and uppercase are tolerated; the id comes out lowercase.
        fs::write(&path, "  0123456789ABCDEF0123456789abcdef \n").unwrap();
        assert_eq!(
            data.node_id().unwrap().as_str(),
            "0123456789abcdef0123456789abcdef"
        );
    }

    #[test]
    fn node_id_parsing_and_serde() {
        assert!("0123456789abcdef0123456789abcdef".parse::<NodeId>().is_ok());
        assert!("0123456789abcdef".parse::<NodeId>().is_err());
        assert!(
            "0123456789abcdef0123456789abcdez"
                .parse::<NodeId>()
                .is_err()
        );
        assert!("é123456789abcdef0123456789abcde".parse::<NodeId>().is_err());
        let id = NodeId::random();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<NodeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<NodeId>("\"nope\"").is_err());
    }

    #[test]
    fn cookie_is_generated_once_then_reused_with_mode_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(tmp.path()).unwrap();
        let first = data.cookie(None).unwrap();
        assert!(first.generated);
        assert_eq!(first.value.len(), GENERATED_COOKIE_LEN);
        assert!(first.value.bytes().all(|b| b.is_ascii_alphanumeric()));
        let mode = fs::metadata(tmp.path().join(COOKIE_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = data.cookie(None).unwrap();
        assert!(!second.generated);
        assert_eq!(second.value, first.value);
        assert!(!format!("{second:?}").contains(&first.value));
    }

    #[test]
    fn given_cookie_is_validated_and_not_written() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(tmp.path()).unwrap();
        let cookie = data.cookie(Some("s3cret-Cookie!")).unwrap();
        assert_eq!(cookie.value, "s3cret-Cookie!");
        assert!(!cookie.generated);
        assert!(!tmp.path().join(COOKIE_FILE).exists());
        let long = "x".repeat(MAX_COOKIE_LEN + 1);
        for bad in ["", "has space", "tab\there", "ünïcode", long.as_str()] {
            let err = data.cookie(Some(bad)).unwrap_err();
            assert!(
                matches!(err, IdentityError::InvalidCookie { .. }),
                "{err:?}"
            );
        }
        assert!(data.cookie(Some(&"x".repeat(MAX_COOKIE_LEN))).is_ok());
    }

    #[test]
    fn corrupt_cookie_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let data = DataDir::open(tmp.path()).unwrap();
        let path = tmp.path().join(COOKIE_FILE);
        fs::write(&path, "two words\n").unwrap();
        let err = data.cookie(None).unwrap_err();
        assert!(
            matches!(err, IdentityError::CorruptCookie { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));
    }
}
