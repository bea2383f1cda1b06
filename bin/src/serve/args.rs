//! The options of `canopy up` and `canopy node`, and the parsers of their values (sizes,
//! seconds, sequence counts), shared by the flags, the `CANOPY_*` variables and the file.
//!
//! The same struct is the configuration file: every flag is a key, with the flag's name and
//! `_` for `-` (`--max-queue` is `max_queue`, `--peer` is `peer`, a list for repeatable
//! flags), and its value goes through the flag's parser (`memory = "8G"`,
//! `header_timeout = 2.5`). Only `config` itself is not a key.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Deserializer};

/// Options of `canopy up` and `canopy node` (and the keys of the configuration file).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// Address the HTTP API listens on [default: 127.0.0.1].
    #[arg(long, env = "CANOPY_HOST")]
    pub(super) host: Option<IpAddr>,
    /// Port of the HTTP API [default: 52415].
    #[arg(long, env = "CANOPY_PORT")]
    pub(super) port: Option<u16>,
    /// The model to serve: a catalogue name or alias, or the path of a GGUF file
    /// [`up` default: the default model].
    #[arg(long, env = "CANOPY_MODEL")]
    pub(super) model: Option<String>,
    /// How many instances of the model to place [default: 1].
    #[arg(long, env = "CANOPY_INSTANCES")]
    pub(super) instances: Option<usize>,
    /// CPU threads per runner [default: all cores].
    #[arg(long, env = "CANOPY_THREADS")]
    pub(super) threads: Option<u32>,
    /// Sequences each runner generates at once (continuous batching), 1 to 256 [default:
    /// chosen from memory and cores].
    #[arg(long, env = "CANOPY_PARALLEL", value_parser = parse_parallel)]
    #[serde(deserialize_with = "parallel_value")]
    pub(super) parallel: Option<u32>,
    /// The engine runners host [default: the runner's default].
    #[arg(long, env = "CANOPY_ENGINE")]
    pub(super) engine: Option<String>,
    /// Most requests queued or running per instance before 429 [default: the runner's
    /// --parallel plus 16].
    #[arg(long, env = "CANOPY_MAX_QUEUE")]
    pub(super) max_queue: Option<usize>,
    /// The model store directory [default: the user's cache directory, canopy/models].
    #[arg(long, env = "CANOPY_MODEL_DIR")]
    pub(super) model_dir: Option<PathBuf>,
    /// A TOML configuration file (flags and CANOPY_* variables override it).
    #[arg(long, env = "CANOPY_CONFIG")]
    #[serde(skip)]
    pub(super) config: Option<PathBuf>,
    /// Run alone: no cluster membership, no discovery, no data dir.
    #[arg(long, env = "CANOPY_STANDALONE")]
    pub(super) standalone: bool,
    /// Address the cluster listens on [default: this machine's first non-loopback IPv4
    /// address, else 127.0.0.1].
    #[arg(long, env = "CANOPY_CLUSTER_HOST")]
    pub(super) cluster_host: Option<IpAddr>,
    /// Port the cluster listens on [default: 52416].
    #[arg(long, env = "CANOPY_CLUSTER_PORT")]
    pub(super) cluster_port: Option<u16>,
    /// The cluster cookie; nodes with another cookie are refused [default: generated once
    /// and kept in the data dir's `cookie` file]. Other local users can read a command
    /// line: prefer --cookie-file or the variable.
    #[arg(long, env = "CANOPY_COOKIE", hide_env_values = true)]
    pub(super) cookie: Option<String>,
    /// A file holding the cluster cookie (e.g. a copy of another node's data-dir `cookie`).
    #[arg(long, env = "CANOPY_COOKIE_FILE")]
    pub(super) cookie_file: Option<PathBuf>,
    /// This node's TLS certificate (PEM) for cluster sessions: with --tls-key and --tls-ca,
    /// every session is mutual TLS and peers without a certificate from that CA are
    /// refused. Make them with `canopy cluster certs`.
    #[arg(long, env = "CANOPY_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub(super) tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM; keep it mode 0600).
    #[arg(long, env = "CANOPY_TLS_KEY", requires_all = ["tls_cert", "tls_ca"])]
    pub(super) tls_key: Option<PathBuf>,
    /// The cluster CA's certificate (PEM): the only issuer peers' certificates are accepted
    /// from.
    #[arg(long, env = "CANOPY_TLS_CA", requires_all = ["tls_cert", "tls_key"])]
    pub(super) tls_ca: Option<PathBuf>,
    /// The key clients must send as `Authorization: Bearer KEY` (or `x-api-key: KEY`) on
    /// every endpoint but /health [default: none, and then the API serves loopback only]. Other local users
    /// can read a command line: prefer --api-key-file or the variable.
    #[arg(long, env = "CANOPY_API_KEY", hide_env_values = true)]
    pub(super) api_key: Option<String>,
    /// A file holding the API key (keep it mode 0600).
    #[arg(long, env = "CANOPY_API_KEY_FILE")]
    pub(super) api_key_file: Option<PathBuf>,
    /// Serve the API on a non-loopback --host without an API key: anyone who can reach the
    /// address can use the node.
    #[arg(long, env = "CANOPY_INSECURE_NO_API_KEY")]
    pub(super) insecure_no_api_key: bool,
    /// A host name clients may reach this node's API by, besides IP addresses and
    /// localhost (other names are refused, against DNS rebinding); repeatable; `*` for any.
    #[arg(
        long = "allowed-host",
        env = "CANOPY_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    #[serde(rename = "allowed_host", alias = "allowed_hosts")]
    pub(super) allowed_hosts: Vec<String>,
    /// A directory whose GGUF files placement requests (`POST /instances`) may name by
    /// path; repeatable [default: only the model store].
    #[arg(
        long = "model-path-allow",
        env = "CANOPY_MODEL_PATH_ALLOW",
        value_delimiter = ','
    )]
    #[serde(alias = "model_path_allows")]
    pub(super) model_path_allow: Vec<PathBuf>,
    /// Most HTTP connections served at once; more are answered 503 [default: 1024].
    #[arg(long, env = "CANOPY_MAX_CONNECTIONS")]
    pub(super) max_connections: Option<usize>,
    /// Seconds a connection may take to send a request's headers (an idle keep-alive
    /// connection included) before it is closed [default: 10].
    #[arg(long, env = "CANOPY_HEADER_TIMEOUT", value_parser = parse_seconds)]
    #[serde(deserialize_with = "seconds_value")]
    pub(super) header_timeout: Option<Duration>,
    /// Seconds a running request may go without a new token (one batch step) before its
    /// runner is taken for wedged: the runner is killed and restarted, and every request in
    /// its batch gets its error (or its one retry, if it had no token yet) [default: 60].
    #[arg(long, env = "CANOPY_STALL_TIMEOUT", value_parser = parse_seconds)]
    #[serde(deserialize_with = "seconds_value")]
    pub(super) stall_timeout: Option<Duration>,
    /// Where the node keeps its identity and cookie [default: the user's data dir, canopy].
    #[arg(long, env = "CANOPY_DATA_DIR")]
    pub(super) data_dir: Option<PathBuf>,
    /// A node to join at HOST:PORT (its cluster address); repeatable. For networks without
    /// multicast.
    #[arg(long = "peer", env = "CANOPY_PEERS", value_delimiter = ',')]
    #[serde(rename = "peer", alias = "peers")]
    pub(super) peers: Vec<SocketAddr>,
    /// Quorum: no master is elected in a group of fewer than N connected nodes.
    #[arg(long, env = "CANOPY_EXPECT")]
    pub(super) expect: Option<usize>,
    /// Election priority: the highest leads (then the oldest node) [default: 0].
    #[arg(long, env = "CANOPY_PRIORITY", allow_negative_numbers = true)]
    pub(super) priority: Option<i32>,
    /// Discovery namespace: nodes only join others of the same namespace [default: canopy].
    #[arg(long, env = "CANOPY_NAMESPACE")]
    pub(super) namespace: Option<String>,
    /// Do not send or listen for multicast discovery beacons (use --peer).
    #[arg(long, env = "CANOPY_NO_DISCOVERY")]
    pub(super) no_discovery: bool,
    /// Memory this node offers to model instances, e.g. 8G or 512M [default: what the
    /// kernel reports available].
    #[arg(long, env = "CANOPY_MEMORY", value_parser = parse_bytes)]
    #[serde(deserialize_with = "bytes_value")]
    pub(super) memory: Option<u64>,
    /// `up` only: start a local cluster of N nodes on loopback (this process is the first;
    /// the others are child processes on the next API and cluster ports).
    #[arg(long, env = "CANOPY_NODES")]
    pub(super) nodes: Option<usize>,
}

/// Parses a positive number of seconds, e.g. `10` or `0.5`.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if secs.is_finite() && secs > 0.0 && secs <= 86_400.0 {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("`{text}`: give between 0 and 86400 seconds"))
    }
}

/// The most sequences a runner may be asked to batch.
const MAX_PARALLEL: u32 = 256;

/// Parses and checks `--parallel` (1 to [`MAX_PARALLEL`]).
fn parse_parallel(text: &str) -> Result<u32, String> {
    let n: u32 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a whole number of sequences"))?;
    check_parallel(n)
}

pub(super) fn check_parallel(n: u32) -> Result<u32, String> {
    if (1..=MAX_PARALLEL).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "parallel must be between 1 and {MAX_PARALLEL} (sequences each runner generates at \
             once), got {n}"
        ))
    }
}

/// Parses `512M`, `8G`, `1.5GiB`, `1048576`: a byte count with an optional binary suffix.
fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (try 512M or 8G)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` (use K, M, G or T)")),
    };
    Ok((number * scale as f64) as u64)
}

/// A file value that may be a number or a text (`header_timeout = 2.5` or `"2.5"`,
/// `memory = 1073741824` or `"1G"`), handed to the flag's parser as text.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Integer(u64),
    Float(f64),
    Text(String),
}

impl NumberOrText {
    fn text(self) -> String {
        match self {
            NumberOrText::Integer(n) => n.to_string(),
            NumberOrText::Float(n) => n.to_string(),
            NumberOrText::Text(t) => t,
        }
    }
}

/// Runs a file value through a flag's parser.
fn parsed<'de, D, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
{
    let value = NumberOrText::deserialize(d)?;
    parse(&value.text())
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn parallel_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    parsed(d, parse_parallel)
}

fn seconds_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    parsed(d, parse_seconds)
}

fn bytes_value<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    parsed(d, parse_bytes)
}

impl ServeArgs {
    /// These options (flags and variables) over `file`'s: a value set here wins, a list given
    /// here replaces the file's, a switch is on when either turns it on.
    pub(super) fn over(self, file: ServeArgs) -> ServeArgs {
        fn list<T>(mine: Vec<T>, file: Vec<T>) -> Vec<T> {
            if mine.is_empty() { file } else { mine }
        }
        ServeArgs {
            host: self.host.or(file.host),
            port: self.port.or(file.port),
            model: self.model.or(file.model),
            instances: self.instances.or(file.instances),
            threads: self.threads.or(file.threads),
            parallel: self.parallel.or(file.parallel),
            engine: self.engine.or(file.engine),
            max_queue: self.max_queue.or(file.max_queue),
            model_dir: self.model_dir.or(file.model_dir),
            config: self.config,
            standalone: self.standalone || file.standalone,
            cluster_host: self.cluster_host.or(file.cluster_host),
            cluster_port: self.cluster_port.or(file.cluster_port),
            cookie: self.cookie.or(file.cookie),
            cookie_file: self.cookie_file.or(file.cookie_file),
            tls_cert: self.tls_cert.or(file.tls_cert),
            tls_key: self.tls_key.or(file.tls_key),
            tls_ca: self.tls_ca.or(file.tls_ca),
            api_key: self.api_key.or(file.api_key),
            api_key_file: self.api_key_file.or(file.api_key_file),
            insecure_no_api_key: self.insecure_no_api_key || file.insecure_no_api_key,
            allowed_hosts: list(self.allowed_hosts, file.allowed_hosts),
            model_path_allow: list(self.model_path_allow, file.model_path_allow),
            max_connections: self.max_connections.or(file.max_connections),
            header_timeout: self.header_timeout.or(file.header_timeout),
            stall_timeout: self.stall_timeout.or(file.stall_timeout),
            data_dir: self.data_dir.or(file.data_dir),
            peers: list(self.peers, file.peers),
            expect: self.expect.or(file.expect),
            priority: self.priority.or(file.priority),
            namespace: self.namespace.or(file.namespace),
            no_discovery: self.no_discovery || file.no_discovery,
            memory: self.memory.or(file.memory),
            nodes: self.nodes.or(file.nodes),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_is_checked() {
        for bad in ["0", "257", "many"] {
            let err = parse_parallel(bad).expect_err(bad);
            assert!(err.contains(bad), "{bad}: {err}");
        }
        assert_eq!(parse_parallel("256"), Ok(256));
    }

    #[test]
    fn sizes_and_seconds_parse() {
        assert_eq!(parse_bytes("512M"), Ok(512 << 20));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert!(parse_bytes("8X").is_err());
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_seconds("0").is_err());
    }
}
