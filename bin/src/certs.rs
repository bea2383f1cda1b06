//! `canopy cluster certs`: a cluster CA and node certificates for mutual TLS
//! (`--tls-cert/--tls-key/--tls-ca`).
//!
//! The first run in a directory makes the CA (`ca.pem`, and `ca-key.pem`, which signs node
//! certificates and should stay on the machine that makes them); every run writes one
//! certificate and key per `--node` name (`NAME.pem`, `NAME-key.pem`). A later run in the
//! same directory reuses the CA, so nodes can be added at any time. Keys are written mode
//! 0600 and never overwritten.
//!
//! Every node certificate is issued for the one DNS name
//! [`canopy_runtime::cluster::tls::SERVER_NAME`] (nodes dial each other by address, and
//! addresses change); its subject's common name is the `--node` name, for the operator.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use canopy_runtime::cluster::tls::SERVER_NAME;
use clap::{Args, Subcommand};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Arguments of `canopy cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// What to do.
    #[command(subcommand)]
    command: ClusterCommand,
}

/// The `canopy cluster` subcommands.
#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Makes a cluster CA (first run in DIR) and a TLS certificate and key for each node,
    /// for `--tls-cert DIR/NAME.pem --tls-key DIR/NAME-key.pem --tls-ca DIR/ca.pem`.
    Certs(CertsArgs),
}

/// Arguments of `canopy cluster certs`.
#[derive(Debug, Args)]
struct CertsArgs {
    /// Where the CA and the certificates are kept.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// A node to make a certificate for (letters, digits, `.`, `_`, `-`); repeatable.
    #[arg(long = "node", value_name = "NAME", required = true)]
    nodes: Vec<String>,
    /// Years the certificates are valid for.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=100))]
    years: u16,
}

/// Runs `canopy cluster …`.
pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    match args.command {
        ClusterCommand::Certs(args) => certs(&args),
    }
}

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";

fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !name.starts_with('.')
        && name != "ca";
    if !ok {
        bail!(
            "bad node name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting \
             with '.', and not \"ca\""
        );
    }
    Ok(())
}

fn validity(params: &mut CertificateParams, years: u16) {
    let now = time::OffsetDateTime::now_utc();
    // From a day ago, against clocks a little behind.
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(365 * i64::from(years));
}

/// Writes `contents` to a new file (never over an existing one), mode 0600 when `secret`.
fn write_new(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 });
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists; remove it first to make a new one",
                path.display()
            )
        } else {
            anyhow::anyhow!("cannot create {}: {e}", path.display())
        }
    })?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The CA of `dir`, made (and written) if it is not there yet.
fn ca(dir: &Path, years: u16) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let (cert_path, key_path) = (dir.join(CA_CERT), dir.join(CA_KEY));
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let read = |p: &Path| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            };
            let key = KeyPair::from_pem(&read(&key_path)?)
                .map_err(|e| anyhow::anyhow!("{}: not a private key: {e}", key_path.display()))?;
            let issuer = Issuer::from_ca_cert_pem(&read(&cert_path)?, key).map_err(|e| {
                anyhow::anyhow!("{}: not a CA certificate: {e}", cert_path.display())
            })?;
            eprintln!("using the CA in {}", cert_path.display());
            Ok(issuer)
        }
        (false, false) => {
            let key = KeyPair::generate().context("cannot generate the CA key")?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "Canopy cluster CA");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            validity(&mut params, years);
            let cert = params.self_signed(&key).context("cannot sign the CA")?;
            write_new(&key_path, &key.serialize_pem(), true)?;
            write_new(&cert_path, &cert.pem(), false)?;
            eprintln!(
                "made a new CA: {} (give it to every node) and {} (keep it here: it signs \
                 node certificates)",
                cert_path.display(),
                key_path.display()
            );
            Ok(Issuer::new(params, key))
        }
        (true, false) | (false, true) => bail!(
            "{} holds only one of {CA_CERT} and {CA_KEY}: restore the other, or remove it to \
             make a new CA (then every node needs a new certificate)",
            dir.display()
        ),
    }
}

fn certs(args: &CertsArgs) -> anyhow::Result<()> {
    for name in &args.nodes {
        check_name(name)?;
    }
    for name in &args.nodes {
        for path in [
            args.dir.join(format!("{name}.pem")),
            args.dir.join(format!("{name}-key.pem")),
        ] {
            if path.exists() {
                bail!(
                    "{} already exists; remove it first to make a new one",
                    path.display()
                );
            }
        }
    }
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let issuer = ca(&args.dir, args.years)?;
    for name in &args.nodes {
        let key = KeyPair::generate().context("cannot generate a node key")?;
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.as_str());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Every node is both a TLS server (dialed) and a client (dialing).
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params, args.years);
        let cert = params
            .signed_by(&key, &issuer)
            .with_context(|| format!("cannot sign the certificate of {name}"))?;
        let (cert_path, key_path) = (
            args.dir.join(format!("{name}.pem")),
            args.dir.join(format!("{name}-key.pem")),
        );
        write_new(&key_path, &key.serialize_pem(), true)?;
        write_new(&cert_path, &cert.pem(), false)?;
        println!(
            "{name}: --tls-cert {} --tls-key {} --tls-ca {}",
            cert_path.display(),
            key_path.display(),
            args.dir.join(CA_CERT).display()
        );
    }
    eprintln!(
        "copy each node's two files and {CA_CERT} to it (not {CA_KEY}); a node without a \
         certificate from this CA cannot join"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use canopy_runtime::cluster::tls::{ClusterTls, TlsPem};

    fn args(dir: &Path, nodes: &[&str]) -> CertsArgs {
        CertsArgs {
            dir: dir.to_path_buf(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            years: 10,
        }
    }

    fn load(dir: &Path, name: &str) -> ClusterTls {
        let pem = TlsPem::read(
            &dir.join(format!("{name}.pem")),
            &dir.join(format!("{name}-key.pem")),
            &dir.join(CA_CERT),
        )
        .expect("read");
        ClusterTls::new(&pem).expect("a usable configuration")
    }

    #[test]
    fn makes_a_ca_once_and_nodes_that_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        certs(&args(dir.path(), &["a", "b"])).expect("first run");
        let ca = std::fs::read(dir.path().join(CA_CERT)).expect("ca");
        // A second run adds a node under the same CA.
        certs(&args(dir.path(), &["c"])).expect("second run");
        assert_eq!(std::fs::read(dir.path().join(CA_CERT)).expect("ca"), ca);
        for name in ["a", "b", "c"] {
            load(dir.path(), name);
        }
        use std::os::unix::fs::PermissionsExt;
        for key in [CA_KEY, "a-key.pem", "c-key.pem"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }

    #[test]
    fn never_overwrites_and_checks_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        certs(&args(dir.path(), &["a"])).expect("first run");
        let before = std::fs::read(dir.path().join("a-key.pem")).expect("key");
        let err = certs(&args(dir.path(), &["a"])).expect_err("exists");
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("a-key.pem")).expect("key"),
            before
        );
        for bad in ["", "../x", "a/b", ".hidden", "ca", &"x".repeat(65)] {
            assert!(certs(&args(dir.path(), &[bad])).is_err(), "{bad:?}");
        }
        std::fs::remove_file(dir.path().join(CA_KEY)).expect("rm");
        let err = certs(&args(dir.path(), &["b"])).expect_err("half a CA");
        assert!(err.to_string().contains("only one of"), "{err}");
    }
}
