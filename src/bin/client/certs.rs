//! `DKVSClient certs`: a certificate authority and node certificates for a
//! secure cluster (DESIGN.md's "Security").
//!
//! A node dials its peers by the addresses in its layout and checks each
//! peer's certificate against that host; it also presents its own
//! certificate as a TLS client certificate, and a peer takes it for a node
//! only if it chains to the CA and names `dkvs-node:<its address>` (its
//! `--advertise`, else `--listen`, as the peer lists spell it).
//! So a node certificate carries that URI, the host as an IP or DNS name
//! (plus `localhost` and 127.0.0.1 for a loopback host, so local tools can
//! dial it either way), and both the serverAuth and clientAuth usages.
//!
//! The CA is made once per directory and reused after: `startServers.sh
//! add` signs one more node's certificate with the CA the running cluster
//! already trusts. A CA made elsewhere (openssl, a company CA) works too,
//! as long as its key is PKCS#8 PEM.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use clap::Args;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::Outcome;

/// File names in `--dir`.
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca-key.pem";
/// A new CA outlives the node certificates it signs: they are renewed with
/// it, it is not (a new CA means new certificates on every node at once).
const CA_DAYS_MIN: u32 = 3650;
/// How far back a certificate's validity starts, for clocks a little behind.
const NOT_BEFORE_SLACK: Duration = Duration::hours(1);

const CERTS_HELP: &str = "\
Files written in DIR:
  ca.pem, ca-key.pem              the CA (made only when DIR has no ca.pem;
                                  otherwise ca-key.pem signs the new nodes)
  node-HOST-PORT.pem              a node's certificate, and its key in
  node-HOST-PORT-key.pem          (an IPv6 host's ':' become '_')
Keys are written with mode 0600. A new CA is valid for 10 years (or --days
if longer); node certificates for --days, at most as long as the CA.

Each node certificate names dkvs-node:HOST:PORT (exactly the node's address
as its peers know it: --advertise, else --listen), HOST as an IP address or
DNS name (plus localhost and 127.0.0.1 for a loopback HOST), and may serve
TLS and act as a TLS client. Start the node with:
  DKVSServer --listen HOST:PORT --tls-cert DIR/node-HOST-PORT.pem \\
    --tls-key DIR/node-HOST-PORT-key.pem --tls-ca DIR/ca.pem ...
and give clients DIR/ca.pem (--tls-ca or DKVS_TLS_CA).

An existing node certificate is never replaced unless --force is given (a
running node picks the new one up on SIGHUP or when its files change).
Exit codes: 0 written; 2 bad input (address, days, an unusable CA, a file
that exists); 5 the files could not be written.";

/// `DKVSClient certs --dir DIR [--node HOST:PORT]... [--days N] [--force]`.
#[derive(Debug, Args)]
#[command(after_help = CERTS_HELP)]
pub struct CertsArgs {
    /// Directory for the CA and the certificates (made, mode 0700, if missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// A node's address (--advertise, else --listen) to make a certificate for: 127.0.0.1:7001,
    /// [::1]:7001, db1.example.com:7001. Repeat for several nodes.
    #[arg(long = "node", value_name = "HOST:PORT")]
    pub nodes: Vec<String>,
    /// How long node certificates are valid, in days.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=36500))]
    pub days: u32,
    /// Replace node certificates that already exist (never the CA).
    #[arg(long)]
    pub force: bool,
}

/// Why `certs` wrote nothing (or stopped part way).
#[derive(Debug, PartialEq, Eq)]
pub enum CertsError {
    /// Bad input: an address, an unusable CA, a file in the way (exit 2).
    Usage(String),
    /// The files could not be written (exit 5).
    Io(String),
}

/// Runs `certs` and prints what it wrote, or the error.
pub fn run(args: &CertsArgs) -> Outcome {
    let now = OffsetDateTime::now_utc();
    match make(args, now) {
        Ok(lines) => {
            let mut out = std::io::stdout().lock();
            for line in lines {
                let _ = writeln!(out, "{line}");
            }
            Outcome::Done
        }
        Err(CertsError::Usage(message)) => {
            eprintln!("certs: {message}");
            Outcome::Failed(2)
        }
        Err(CertsError::Io(message)) => {
            eprintln!("certs: {message}");
            Outcome::Failed(5)
        }
    }
}

/// Makes or loads the CA in `args.dir`, then each node's certificate;
/// returns the lines telling what was written.
fn make(args: &CertsArgs, now: OffsetDateTime) -> Result<Vec<String>, CertsError> {
    let mut nodes: Vec<NodeAddress> = Vec::new();
    let mut seen = BTreeSet::new();
    for text in &args.nodes {
        let node = NodeAddress::parse(text).map_err(CertsError::Usage)?;
        if seen.insert(node.text.clone()) {
            nodes.push(node);
        }
    }
    let dir = &args.dir;
    if !args.force {
        refuse_existing(dir, &nodes)?;
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| CertsError::Io(format!("cannot create {}: {e}", dir.display())))?;

    let mut lines = Vec::new();
    let ca = match Ca::load(dir, now)? {
        Some(ca) => {
            lines.push(format!(
                "using the CA in {} (valid until {})",
                dir.join(CA_CERT_FILE).display(),
                ca.not_after.date()
            ));
            ca
        }
        None => {
            let ca = Ca::make(dir, args.days.max(CA_DAYS_MIN), now)?;
            lines.push(format!(
                "made a CA: {} (give it to clients and nodes; valid until {}) and {} (its key: keep it secret)",
                dir.join(CA_CERT_FILE).display(),
                ca.not_after.date(),
                dir.join(CA_KEY_FILE).display()
            ));
            ca
        }
    };
    for node in &nodes {
        lines.push(write_node(dir, &ca, node, args.days, now)?);
    }
    Ok(lines)
}

/// Refuses before writing anything when a node's files exist already.
fn refuse_existing(dir: &Path, nodes: &[NodeAddress]) -> Result<(), CertsError> {
    for node in nodes {
        let (cert, key) = node.files(dir);
        for path in [cert, key] {
            if path.exists() {
                return Err(CertsError::Usage(format!(
                    "{} already exists: nothing written. Pass --force to replace the certificate of {} \
                     (a running node picks the new one up on SIGHUP), or use another --dir",
                    path.display(),
                    node.text
                )));
            }
        }
    }
    Ok(())
}

/// A node's address (`--advertise`, else `--listen`), as given, and its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAddress {
    /// Exactly as given: the certificate names `dkvs-node:<text>`.
    pub text: String,
    pub host: Host,
    pub port: u16,
}

/// The host part of a node address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Dns(String),
}

impl NodeAddress {
    /// Parses `HOST:PORT`, with an IPv6 host in brackets.
    pub fn parse(text: &str) -> Result<NodeAddress, String> {
        let usage = || {
            format!(
                "bad node address '{text}': expected HOST:PORT, e.g. 127.0.0.1:7001, [::1]:7001 or db1.example.com:7001"
            )
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(usage)?;
        let port = match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return Err(format!("{}: the port must be 1 to 65535", usage())),
        };
        let host = if let Some(inner) = host.strip_prefix('[') {
            let inner = inner.strip_suffix(']').ok_or_else(usage)?;
            match inner.parse::<std::net::Ipv6Addr>() {
                Ok(ip) => Host::Ip(IpAddr::V6(ip)),
                Err(_) => return Err(format!("{}: '{inner}' is not an IPv6 address", usage())),
            }
        } else if host.contains(':') {
            return Err(format!(
                "{}: write an IPv6 host in brackets, e.g. [{host}]:{port}",
                usage()
            ));
        } else if let Ok(ip) = host.parse::<Ipv4Addr>() {
            Host::Ip(IpAddr::V4(ip))
        } else if is_dns_name(host) {
            Host::Dns(host.to_string())
        } else {
            return Err(format!(
                "{}: '{host}' is neither an IPv4 address nor a DNS name",
                usage()
            ));
        };
        Ok(NodeAddress {
            text: text.to_string(),
            host,
            port,
        })
    }

    /// Whether the host is this machine's loopback.
    fn is_loopback(&self) -> bool {
        match &self.host {
            Host::Ip(ip) => ip.is_loopback(),
            Host::Dns(name) => name.eq_ignore_ascii_case("localhost"),
        }
    }

    /// `node-<host>-<port>`, with an IPv6 host's colons made file-safe.
    pub fn file_stem(&self) -> String {
        let host = match &self.host {
            Host::Ip(IpAddr::V6(ip)) => ip.to_string().replace(':', "_"),
            Host::Ip(ip) => ip.to_string(),
            Host::Dns(name) => name.clone(),
        };
        format!("node-{host}-{}", self.port)
    }

    /// The certificate's and the key's paths in `dir`.
    pub fn files(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let stem = self.file_stem();
        (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}-key.pem")),
        )
    }

    /// The certificate's subject alternative names, in order: the node URI,
    /// the host, then localhost and 127.0.0.1 for a loopback host.
    fn names(&self) -> Vec<Name> {
        let mut names = vec![Name::Uri(format!("dkvs-node:{}", self.text))];
        names.push(match &self.host {
            Host::Ip(ip) => Name::Ip(*ip),
            Host::Dns(name) => Name::Dns(name.clone()),
        });
        if self.is_loopback() {
            for extra in [
                Name::Dns("localhost".into()),
                Name::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ] {
                if !names.iter().any(|n| n.same(&extra)) {
                    names.push(extra);
                }
            }
        }
        names
    }
}

/// One subject alternative name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Name {
    Uri(String),
    Dns(String),
    Ip(IpAddr),
}

impl Name {
    /// Equal, with DNS names compared without case.
    fn same(&self, other: &Name) -> bool {
        match (self, other) {
            (Name::Dns(a), Name::Dns(b)) => a.eq_ignore_ascii_case(b),
            _ => self == other,
        }
    }

    fn to_san(&self) -> Result<SanType, CertsError> {
        let ia5 = |text: &str| {
            text.to_string().try_into().map_err(|_| {
                CertsError::Usage(format!("'{text}' cannot go in a certificate (ASCII only)"))
            })
        };
        Ok(match self {
            Name::Uri(uri) => SanType::URI(ia5(uri)?),
            Name::Dns(name) => SanType::DnsName(ia5(name)?),
            Name::Ip(ip) => SanType::IpAddress(*ip),
        })
    }

    fn describe(&self) -> String {
        match self {
            Name::Uri(uri) => uri.clone(),
            Name::Dns(name) => format!("DNS {name}"),
            Name::Ip(ip) => format!("IP {ip}"),
        }
    }
}

/// A host name a certificate can carry: dot-separated labels of letters,
/// digits and inner hyphens, at most 253 characters, and a last label that
/// is not all digits (that would be a malformed IPv4 address).
fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let label_ok = |label: &str| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(label_ok)
        && name
            .rsplit('.')
            .next()
            .is_some_and(|last| !last.bytes().all(|b| b.is_ascii_digit()))
}

/// The CA that signs node certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate's subject, encoded: a signed certificate's issuer
    /// must be these very bytes to chain to it.
    subject_der: Vec<u8>,
    not_after: OffsetDateTime,
}

impl Ca {
    /// Makes a CA in `dir`, valid for `days`: the key first, so a `ca.pem`
    /// on disk always has its key next to it.
    fn make(dir: &Path, days: u32, now: OffsetDateTime) -> Result<Ca, CertsError> {
        let key = KeyPair::generate()
            .map_err(|e| CertsError::Io(format!("cannot generate a key: {e}")))?;
        let mut params = CertificateParams::default();
        // A short tag from the key tells one CA from another in logs.
        let tag: String = params.key_identifier(&key)[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("DKVS CA {tag}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "DKVS");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - NOT_BEFORE_SLACK;
        params.not_after = now + Duration::days(i64::from(days));
        let not_after = params.not_after;
        let cert = params
            .self_signed(&key)
            .map_err(|e| CertsError::Io(format!("cannot make the CA certificate: {e}")))?;
        let subject_der = subject_of(cert.der())?;
        write_file(&dir.join(CA_KEY_FILE), &key.serialize_pem(), true)?;
        write_file(&dir.join(CA_CERT_FILE), &cert.pem(), false)?;
        let issuer = Issuer::new(params, key);
        Ok(Ca {
            issuer,
            subject_der,
            not_after,
        })
    }

    /// The CA in `dir`, if `ca.pem` is there: with its key, checked to be a
    /// CA, unexpired, and the key's own certificate.
    fn load(dir: &Path, now: OffsetDateTime) -> Result<Option<Ca>, CertsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        if !cert_path.exists() {
            if key_path.exists() {
                return Err(CertsError::Usage(format!(
                    "{} exists but {} does not (an interrupted run?): restore {CA_CERT_FILE}, \
                     or remove {} to make a new CA",
                    key_path.display(),
                    cert_path.display(),
                    key_path.display()
                )));
            }
            return Ok(None);
        }
        let unusable = |why: String| {
            CertsError::Usage(format!(
                "cannot use the CA in {}: {why}",
                cert_path.display()
            ))
        };
        let pem = fs::read(&cert_path).map_err(|e| unusable(format!("cannot read it: {e}")))?;
        let key_pem = fs::read_to_string(&key_path).map_err(|e| {
            unusable(format!(
                "cannot read its key {}: {e}. Put the CA's key there to sign more nodes, \
                 or use another --dir for a new CA",
                key_path.display()
            ))
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            unusable(format!(
                "{} is not a PKCS#8 PEM key ({e}); convert one with \
                 openssl pkcs8 -topk8 -nocrypt -in KEY -out {}",
                key_path.display(),
                key_path.display()
            ))
        })?;
        let der = pem_to_der(&pem).map_err(unusable)?;
        let (subject_der, not_after) = check_ca(&der, &key, now).map_err(unusable)?;
        let issuer = Issuer::from_ca_cert_der(&der.into(), key)
            .map_err(|e| unusable(format!("cannot sign with it: {e}")))?;
        Ok(Some(Ca {
            issuer,
            subject_der,
            not_after,
        }))
    }
}

/// The DER of the first certificate in a PEM file.
fn pem_to_der(pem: &[u8]) -> Result<Vec<u8>, String> {
    let (_, parsed) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| format!("not a PEM certificate: {e}"))?;
    if parsed.label != "CERTIFICATE" {
        return Err(format!(
            "expected a CERTIFICATE, found a {} block",
            parsed.label
        ));
    }
    Ok(parsed.contents)
}

/// Checks that `der` is a CA certificate, valid at `now`, whose public key
/// is `key`'s; returns its encoded subject and its end of validity.
fn check_ca(
    der: &[u8],
    key: &KeyPair,
    now: OffsetDateTime,
) -> Result<(Vec<u8>, OffsetDateTime), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid certificate: {e}"))?;
    if !cert.is_ca() {
        return Err("it is not a CA certificate (no basicConstraints CA:TRUE)".into());
    }
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(format!(
            "{CA_KEY_FILE} is not the key of this certificate (files from two different CAs?)"
        ));
    }
    let not_after = cert.validity().not_after.to_datetime();
    if not_after <= now {
        return Err(format!(
            "it expired on {}: make a new CA (another --dir) and new certificates for every node",
            not_after.date()
        ));
    }
    Ok((cert.subject().as_raw().to_vec(), not_after))
}

/// The encoded subject of a certificate.
fn subject_of(der: &[u8]) -> Result<Vec<u8>, CertsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertsError::Io(format!("cannot parse a certificate just made: {e}")))?;
    Ok(cert.subject().as_raw().to_vec())
}

/// The encoded issuer of a certificate.
fn issuer_of(der: &[u8]) -> Result<Vec<u8>, CertsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertsError::Io(format!("cannot parse a certificate just made: {e}")))?;
    Ok(cert.issuer().as_raw().to_vec())
}

/// The parameters of `node`'s certificate: its names, both TLS roles,
/// valid for `days` from `now` but not past `until` (the CA's end).
fn node_params(
    node: &NodeAddress,
    days: u32,
    now: OffsetDateTime,
    until: OffsetDateTime,
) -> Result<CertificateParams, CertsError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("dkvs-node {}", node.text));
    params
        .distinguished_name
        .push(DnType::OrganizationName, "DKVS");
    params.subject_alt_names = node
        .names()
        .iter()
        .map(Name::to_san)
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - NOT_BEFORE_SLACK;
    params.not_after = (now + Duration::days(i64::from(days))).min(until);
    Ok(params)
}

/// Makes, signs and writes one node's key and certificate (the key first);
/// returns the line saying so.
fn write_node(
    dir: &Path,
    ca: &Ca,
    node: &NodeAddress,
    days: u32,
    now: OffsetDateTime,
) -> Result<String, CertsError> {
    let params = node_params(node, days, now, ca.not_after)?;
    let not_after = params.not_after;
    let key =
        KeyPair::generate().map_err(|e| CertsError::Io(format!("cannot generate a key: {e}")))?;
    let cert = params.signed_by(&key, &ca.issuer).map_err(|e| {
        CertsError::Usage(format!("cannot sign the certificate of {}: {e}", node.text))
    })?;
    // A CA made elsewhere whose name does not survive a round trip through
    // rcgen would sign certificates that chain to nothing.
    if issuer_of(cert.der())? != ca.subject_der {
        return Err(CertsError::Usage(format!(
            "the CA in {}: its subject name cannot be reproduced exactly, so certificates it signs here \
             would not chain to it; make the node certificates with the tool that made the CA",
            dir.join(CA_CERT_FILE).display()
        )));
    }
    let (cert_path, key_path) = node.files(dir);
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    let names: Vec<String> = node.names().iter().map(Name::describe).collect();
    let capped = if not_after < now + Duration::days(i64::from(days)) {
        ", the CA's end"
    } else {
        ""
    };
    Ok(format!(
        "node {}: {} and {} (valid until {}{capped}; names {})",
        node.text,
        cert_path.display(),
        key_path.display(),
        not_after.date(),
        names.join(", ")
    ))
}

/// Writes `contents` to `path` through a temporary file renamed over it, so
/// a reader never sees half a file; mode 0600 when `secret`, else 0644.
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<(), CertsError> {
    let failed =
        |e: std::io::Error| CertsError::Io(format!("cannot write {}: {e}", path.display()));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&temp);
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if secret { 0o600 } else { 0o644 })
            .open(&temp)?;
        file.write_all(contents.as_bytes())?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if let Err(error) = written {
        let _ = fs::remove_file(&temp);
        return Err(failed(error));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    fn args(dir: &Path, nodes: &[&str]) -> CertsArgs {
        CertsArgs {
            dir: dir.to_path_buf(),
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
            days: 365,
            force: false,
        }
    }

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn read_der(path: &Path) -> Vec<u8> {
        pem_to_der(&fs::read(path).expect("read certificate")).expect("PEM certificate")
    }

    /// The SANs of a certificate, as (kind, text).
    fn sans(der: &[u8]) -> Vec<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse");
        let ext = cert
            .subject_alternative_name()
            .expect("one SAN extension")
            .expect("a SAN extension");
        ext.value
            .general_names
            .iter()
            .map(|name| match name {
                GeneralName::URI(uri) => format!("URI {uri}"),
                GeneralName::DNSName(dns) => format!("DNS {dns}"),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => format!(
                        "IP {}",
                        Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).expect("4"))
                    ),
                    16 => format!(
                        "IP {}",
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).expect("16"))
                    ),
                    _ => format!("IP {bytes:?}"),
                },
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_node_certificate_carries_its_names_and_both_tls_roles_and_chains_to_the_ca() {
        let dir = tempfile::tempdir().expect("tempdir");
        let lines = make(&args(dir.path(), &["127.0.0.1:7001"]), now()).expect("certs");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("made a CA"), "{lines:?}");

        let node = read_der(&dir.path().join("node-127.0.0.1-7001.pem"));
        assert_eq!(
            sans(&node),
            [
                "URI dkvs-node:127.0.0.1:7001",
                "IP 127.0.0.1",
                "DNS localhost"
            ]
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&node).expect("parse");
        let eku = cert
            .extended_key_usage()
            .expect("EKU")
            .expect("EKU present");
        assert!(eku.value.server_auth && eku.value.client_auth);
        assert!(!cert.is_ca());
        let days = (cert.validity().not_after.to_datetime() - now()).whole_days();
        assert!((364..=365).contains(&days), "{days}");

        let ca_der = read_der(&dir.path().join(CA_CERT_FILE));
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).expect("parse CA");
        assert!(ca.is_ca());
        let usage = ca.key_usage().expect("KU").expect("KU present");
        assert!(usage.value.key_cert_sign());
        assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
        cert.verify_signature(Some(ca.public_key()))
            .expect("signed by the CA");
    }

    /// What a node and a client check, with the code they check it with:
    /// webpki chains it to the CA for both TLS roles, it is valid for the
    /// addresses a client dials, and the server reads its node name.
    #[test]
    fn a_node_certificate_passes_the_checks_tls_makes() {
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let dir = tempfile::tempdir().expect("tempdir");
        make(&args(dir.path(), &["127.0.0.1:7001"]), now()).expect("certs");
        let ca = CertificateDer::from(read_der(&dir.path().join(CA_CERT_FILE)));
        let anchors = [webpki::anchor_from_trusted_cert(&ca).expect("CA as anchor")];
        let node = CertificateDer::from(read_der(&dir.path().join("node-127.0.0.1-7001.pem")));
        let cert = webpki::EndEntityCert::try_from(&node).expect("end-entity certificate");
        for usage in [
            webpki::KeyUsage::server_auth(),
            webpki::KeyUsage::client_auth(),
        ] {
            cert.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &[],
                UnixTime::now(),
                usage,
                None,
                None,
            )
            .expect("chains to the CA");
        }
        for name in ["127.0.0.1", "localhost"] {
            let name = ServerName::try_from(name).expect("server name");
            cert.verify_is_valid_for_subject_name(&name)
                .expect("valid for the dialled host");
        }
        let other = ServerName::try_from("10.0.0.7").expect("server name");
        assert!(cert.verify_is_valid_for_subject_name(&other).is_err());
        assert_eq!(
            dkvs::security::tls::node_named_in(&node).as_deref(),
            Some("127.0.0.1:7001")
        );
    }

    #[test]
    fn keys_are_private_and_a_second_run_signs_with_the_same_ca() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        make(&args(dir.path(), &["127.0.0.1:7001"]), now()).expect("first");
        let ca_before = fs::read(dir.path().join(CA_CERT_FILE)).expect("ca");
        let lines = make(
            &args(dir.path(), &["[::1]:7002", "db1.example:7003"]),
            now(),
        )
        .expect("second");
        assert!(lines[0].starts_with("using the CA"), "{lines:?}");
        assert_eq!(
            fs::read(dir.path().join(CA_CERT_FILE)).expect("ca"),
            ca_before
        );
        for key in [
            "ca-key.pem",
            "node-127.0.0.1-7001-key.pem",
            "node-__1-7002-key.pem",
        ] {
            let mode = fs::metadata(dir.path().join(key))
                .expect(key)
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let v6 = read_der(&dir.path().join("node-__1-7002.pem"));
        assert_eq!(
            sans(&v6),
            [
                "URI dkvs-node:[::1]:7002",
                "IP ::1",
                "DNS localhost",
                "IP 127.0.0.1"
            ]
        );
        let named = read_der(&dir.path().join("node-db1.example-7003.pem"));
        assert_eq!(
            sans(&named),
            ["URI dkvs-node:db1.example:7003", "DNS db1.example"]
        );
        let ca_der = read_der(&dir.path().join(CA_CERT_FILE));
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).expect("CA");
        let (_, cert) = x509_parser::parse_x509_certificate(&v6).expect("node");
        cert.verify_signature(Some(ca.public_key()))
            .expect("same CA");
    }

    #[test]
    fn an_existing_node_certificate_is_replaced_only_with_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        make(&args(dir.path(), &["127.0.0.1:7001"]), now()).expect("first");
        let path = dir.path().join("node-127.0.0.1-7001.pem");
        let before = fs::read(&path).expect("cert");
        let refused = make(
            &args(dir.path(), &["127.0.0.1:7002", "127.0.0.1:7001"]),
            now(),
        );
        match refused {
            Err(CertsError::Usage(message)) => assert!(message.contains("--force"), "{message}"),
            other => panic!("{other:?}"),
        }
        assert!(
            !dir.path().join("node-127.0.0.1-7002.pem").exists(),
            "nothing written"
        );
        let mut forced = args(dir.path(), &["127.0.0.1:7001"]);
        forced.force = true;
        make(&forced, now()).expect("forced");
        assert_ne!(fs::read(&path).expect("cert"), before);
    }

    #[test]
    fn an_unusable_ca_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        make(&args(dir.path(), &[]), now()).expect("CA");
        let other = tempfile::tempdir().expect("tempdir");
        make(&args(other.path(), &[]), now()).expect("another CA");
        // The key of another CA.
        fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).expect("copy");
        let Err(CertsError::Usage(message)) = make(&args(dir.path(), &["127.0.0.1:7001"]), now())
        else {
            panic!("a mismatched key was accepted");
        };
        assert!(
            message.contains("is not the key of this certificate"),
            "{message}"
        );
        // No key at all.
        fs::remove_file(dir.path().join(CA_KEY_FILE)).expect("rm");
        let Err(CertsError::Usage(message)) = make(&args(dir.path(), &["127.0.0.1:7001"]), now())
        else {
            panic!("a CA without its key was accepted");
        };
        assert!(message.contains("cannot read its key"), "{message}");
        // Not a certificate.
        fs::write(dir.path().join(CA_CERT_FILE), "hello").expect("write");
        fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).expect("copy");
        let Err(CertsError::Usage(message)) = make(&args(dir.path(), &[]), now()) else {
            panic!("garbage was accepted as a CA");
        };
        assert!(message.contains("not a PEM certificate"), "{message}");
        // A node certificate is not a CA.
        make(&args(other.path(), &["127.0.0.1:7001"]), now()).expect("node");
        fs::copy(
            other.path().join("node-127.0.0.1-7001.pem"),
            dir.path().join(CA_CERT_FILE),
        )
        .expect("copy");
        fs::copy(
            other.path().join("node-127.0.0.1-7001-key.pem"),
            dir.path().join(CA_KEY_FILE),
        )
        .expect("copy");
        let Err(CertsError::Usage(message)) = make(&args(dir.path(), &[]), now()) else {
            panic!("a node certificate was accepted as a CA");
        };
        assert!(message.contains("not a CA certificate"), "{message}");
    }

    #[test]
    fn an_expired_ca_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let long_ago = now() - Duration::days(4000);
        make(&args(dir.path(), &[]), long_ago).expect("an old CA");
        let Err(CertsError::Usage(message)) = make(&args(dir.path(), &["127.0.0.1:7001"]), now())
        else {
            panic!("an expired CA was used");
        };
        assert!(message.contains("expired on"), "{message}");
    }

    #[test]
    fn node_certificates_end_with_their_ca_at_the_latest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let earlier = now() - Duration::days(3600);
        make(&args(dir.path(), &[]), earlier).expect("a CA with 50 days left");
        let lines = make(&args(dir.path(), &["127.0.0.1:7001"]), now()).expect("node");
        assert!(lines[1].contains("the CA's end"), "{lines:?}");
    }

    #[test]
    fn addresses_parse_or_say_what_is_wrong() {
        let ok = |text: &str| NodeAddress::parse(text).expect(text);
        assert_eq!(ok("127.0.0.1:7001").file_stem(), "node-127.0.0.1-7001");
        assert_eq!(ok("[::1]:7001").file_stem(), "node-__1-7001");
        assert_eq!(ok("[fe80::1:2]:9").file_stem(), "node-fe80__1_2-9");
        assert_eq!(
            ok("db-1.example.com:7001").host,
            Host::Dns("db-1.example.com".into())
        );
        assert!(ok("localhost:1").is_loopback());
        assert!(ok("127.0.0.2:1").is_loopback());
        assert!(!ok("10.0.0.7:7001").is_loopback());
        let err = |text: &str| NodeAddress::parse(text).expect_err(text);
        assert!(err("127.0.0.1").contains("expected HOST:PORT"));
        assert!(err("127.0.0.1:0").contains("port must be 1 to 65535"));
        assert!(err("127.0.0.1:70000").contains("port must be 1 to 65535"));
        assert!(err("::1:7001").contains("in brackets"));
        assert!(err("[::g]:7001").contains("not an IPv6 address"));
        assert!(err("[::1:7001").contains("expected HOST:PORT"));
        assert!(err("1.2.3:7001").contains("neither an IPv4 address nor a DNS name"));
        assert!(err("a_b:7001").contains("neither"));
        assert!(err(":7001").contains("neither"));
        assert!(err("-a.example:7001").contains("neither"));
    }
}
