//! Mutual TLS for cluster sessions (`--tls-cert`, `--tls-key`, `--tls-ca`).
//!
//! Without TLS every cluster session is authenticated (the cookie handshake binds both
//! nodes, both nonces and the direction, and every message is sealed with the session's
//! key: see [`super::seal`]) but travels in clear: anyone on the path reads prompts,
//! generated text and plans. With TLS on, every session runs inside TLS 1.2/1.3 with
//! certificates checked on both sides:
//!
//! - the server (the node dialed) presents its certificate, and the client accepts it only
//!   when the cluster's CA signed it for the name [`SERVER_NAME`];
//! - the client presents its own certificate, and the server accepts it only when the same
//!   CA signed it: a peer without a certificate from the cluster's CA never reaches the
//!   cookie handshake.
//!
//! Every node certificate carries the one name [`SERVER_NAME`] rather than a host name or an
//! address: nodes dial each other by address (static peers, discovery beacons), addresses
//! change (DHCP), and a certificate bound to one would break a node that moved. The CA's
//! signature is the credential that admits a peer to the transport; which node a peer is
//! stays the cookie handshake's job, as without TLS. `canopy cluster certs` makes a CA and
//! node certificates with that name.
//!
//! The crypto provider is named explicitly (ring): the dependency tree enables more than
//! one, and rustls refuses to guess.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The name every node certificate is issued for, and the name a dialing node checks.
pub const SERVER_NAME: &str = "canopy-node";

/// Why TLS could not be set up from the given files.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no PEM object of the expected kind, or a malformed one.
    #[error("{what}: {reason}")]
    Pem {
        /// Which file (certificate, key, CA).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration (e.g. the key does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The CA certificates cannot verify clients.
    #[error("the CA cannot verify peers: {0}")]
    Verifier(String),
}

/// PEM data of the three parts, as read from files or given directly.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsPem {
    /// This node's certificate chain (its certificate first).
    pub cert: Vec<u8>,
    /// This node's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Vec<u8>,
    /// The cluster CA's certificate(s): the only issuer peers are accepted from.
    pub ca: Vec<u8>,
}

impl fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsPem")
            .field("cert", &format_args!("{} bytes", self.cert.len()))
            .field("key", &"<hidden>")
            .field("ca", &format_args!("{} bytes", self.ca.len()))
            .finish()
    }
}

impl TlsPem {
    /// Reads the three files.
    pub fn read(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let read = |what: &'static str, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_path_buf(),
                source,
            })
        };
        Ok(Self {
            cert: read("certificate", cert)?,
            key: read("key", key)?,
            ca: read("CA certificate", ca)?,
        })
    }
}

/// The TLS side of a node's cluster sessions: an acceptor for sessions peers open and a
/// connector for the ones this node dials, both mutual and both trusting only the cluster CA.
#[derive(Clone)]
pub struct ClusterTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterTls(mutual, cluster CA)")
    }
}

fn certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        });
    }
    Ok(certs)
}

impl ClusterTls {
    /// Builds the acceptor and the connector from PEM data.
    pub fn new(pem: &TlsPem) -> Result<Self, TlsError> {
        let chain = certificates("certificate", &pem.cert)?;
        let ca = certificates("CA certificate", &pem.ca)?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|e| TlsError::Pem {
                what: "CA certificate",
                reason: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let key = || {
            PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| TlsError::Pem {
                what: "key",
                reason: format!("no usable private key in it: {e}"),
            })
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key()?)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key()?)?;
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    /// Accepts sessions peers open (for the `NodeServer`).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Opens sessions this node dials.
    pub fn connector(&self) -> TlsConnector {
        self.connector.clone()
    }

    /// The name a dialed peer's certificate must carry ([`SERVER_NAME`]).
    pub fn server_name() -> ServerName<'static> {
        ServerName::try_from(SERVER_NAME).expect("SERVER_NAME is a valid DNS name")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Ca {
        pem: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca() -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn node(ca: &Ca, name: &str) -> TlsPem {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(vec![name.to_string()]).expect("params");
        let cert = params.signed_by(&key, &ca.issuer).expect("signed");
        TlsPem {
            cert: cert.pem().into_bytes(),
            key: key.serialize_pem().into_bytes(),
            ca: ca.pem.clone().into_bytes(),
        }
    }

    /// Runs one TLS connection from `client` to `server` over loopback; Ok when both sides
    /// completed the handshake and a byte went through.
    async fn connect(server: &ClusterTls, client: &ClusterTls) -> Result<(), String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = server.acceptor();
        let accept = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok::<u8, String>(byte[0])
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let dialed = client
            .connector()
            .connect(ClusterTls::server_name(), tcp)
            .await;
        let client_side = match dialed {
            Ok(mut tls) => {
                let sent = tls.write_all(&[7]).await.and(tls.flush().await);
                sent.map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        let server_side = accept.await.unwrap();
        match (client_side, server_side) {
            (Ok(()), Ok(7)) => Ok(()),
            (c, s) => Err(format!("client: {c:?}, server: {s:?}")),
        }
    }

    #[tokio::test]
    async fn two_nodes_of_one_ca_connect_both_ways() {
        let ca = ca();
        let a = ClusterTls::new(&node(&ca, SERVER_NAME)).unwrap();
        let b = ClusterTls::new(&node(&ca, SERVER_NAME)).unwrap();
        connect(&a, &b).await.unwrap();
        connect(&b, &a).await.unwrap();
    }

    #[tokio::test]
    async fn a_peer_of_another_ca_is_refused_both_ways() {
        let (ours, theirs) = (ca(), ca());
        let a = ClusterTls::new(&node(&ours, SERVER_NAME)).unwrap();
        // A certificate for the right name, from the wrong CA, trusting ours.
        let mut pem = node(&theirs, SERVER_NAME);
        pem.ca = ours.pem.clone().into_bytes();
        let intruder = ClusterTls::new(&pem).unwrap();
        assert!(connect(&a, &intruder).await.is_err());
        assert!(connect(&intruder, &a).await.is_err());
    }

    #[tokio::test]
    async fn a_server_certificate_for_another_name_is_refused() {
        let ca = ca();
        let a = ClusterTls::new(&node(&ca, SERVER_NAME)).unwrap();
        let other = ClusterTls::new(&node(&ca, "somewhere-else")).unwrap();
        let err = connect(&other, &a).await.unwrap_err();
        assert!(
            err.contains("NotValidForName") || err.contains("name"),
            "{err}"
        );
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let ca = ca();
        let good = node(&ca, SERVER_NAME);
        let mut no_cert = good.clone();
        no_cert.cert = b"not a certificate".to_vec();
        let err = ClusterTls::new(&no_cert).unwrap_err().to_string();
        assert!(err.starts_with("certificate: no PEM certificate"), "{err}");
        let mut no_key = good.clone();
        no_key.key = good.cert.clone();
        let err = ClusterTls::new(&no_key).unwrap_err().to_string();
        assert!(err.starts_with("key: no usable private key"), "{err}");
        let mut wrong_key = good.clone();
        wrong_key.key = KeyPair::generate().unwrap().serialize_pem().into_bytes();
        assert!(ClusterTls::new(&wrong_key).is_err());
        let err = TlsPem::read(
            Path::new("/nonexistent/cert.pem"),
            Path::new("/k"),
            Path::new("/c"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("cannot read certificate /nonexistent/cert.pem"),
            "{err}"
        );
        // Debug never shows the key.
        assert!(!format!("{good:?}").contains("PRIVATE"));
    }
}
