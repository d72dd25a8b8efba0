//! TLS material from PEM files, made into rustls configs (ring provider).
//!
//! A node has one certificate (its chain), one key and one CA file
//! (`--tls-cert`, `--tls-key`, `--tls-ca`). From them [`NodeTls`] builds
//! both sides at once: the server config that asks for, but does not
//! require, a client certificate (clients without one still reach the
//! client-facing services; the node-to-node ones then refuse them), and the
//! client config a node dials its peers with, presenting the same
//! certificate.
//!
//! Rotation: [`NodeTls::reload_if_changed`] rereads the files and, when
//! their bytes differ from the last load, builds new configs and swaps them
//! in whole. Each new connection takes the configs current when it starts;
//! working connections keep theirs, so nothing is dropped. Files that do not
//! load (a half-written certificate, a key that does not match) leave the
//! old configs in place, and the error says which file and why.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::reload::Reloadable;

/// The scheme of the SAN URI that names a node in its certificate:
/// `dkvs-node:HOST:PORT`, the address it serves at (as its layout names it).
pub const NODE_NAME_PREFIX: &str = "dkvs-node:";

/// HTTP/2 over TLS: both sides say so in ALPN.
const ALPN_H2: &[u8] = b"h2";

/// The files a node's TLS comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The node's certificate chain (PEM, its own certificate first).
    pub cert: PathBuf,
    /// The certificate's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The CA certificates that node and client certificates chain to (PEM).
    pub ca: PathBuf,
}

/// The file contents a set of configs was built from.
#[derive(Clone, PartialEq, Eq)]
struct Loaded {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

/// Server and client configs built from one load of the files.
pub struct Configs {
    /// For accepting connections.
    pub server: Arc<ServerConfig>,
    /// For dialing peers (presents this node's certificate).
    pub client: Arc<ClientConfig>,
}

/// A node's TLS: the configs of the files' current contents.
pub struct NodeTls {
    files: TlsFiles,
    /// The configs new connections take, and the contents they came from.
    configs: Reloadable<Configs, Loaded>,
    /// The node address every certificate loaded must name (none: any).
    node_name: Option<String>,
}

impl NodeTls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(files: TlsFiles) -> Result<NodeTls, String> {
        let loaded = read_files(&files)?;
        let configs = build(&files, &loaded)?;
        Ok(NodeTls {
            files,
            configs: Reloadable::new(configs, loaded),
            node_name: None,
        })
    }

    /// Loads the files for the node at `address`: the certificate must name
    /// it (`dkvs-node:ADDRESS`), now and at every reload, or peers would
    /// refuse it (or take it for another node).
    pub fn load_for_node(files: TlsFiles, address: &str) -> Result<NodeTls, String> {
        let mut tls = NodeTls::load(files)?;
        tls.configs
            .with_loaded(|loaded| check_names(&tls.files, loaded, address))?;
        tls.node_name = Some(address.to_string());
        Ok(tls)
    }

    /// The files this TLS comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// The configs for a connection starting now.
    pub fn current(&self) -> Arc<Configs> {
        self.configs.current()
    }

    /// The server config for a connection accepted now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    /// The client config for a peer dialed now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.current().client.clone()
    }

    /// Rereads the files and swaps in new configs if their contents changed.
    /// `Ok(true)`: swapped; `Ok(false)`: unchanged (or refused before); an
    /// error leaves the current configs in place.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let fresh = read_files(&self.files)?;
        self.configs.offer(fresh, |fresh| {
            let configs = build(&self.files, fresh)?;
            if let Some(address) = &self.node_name {
                check_names(&self.files, fresh, address)?;
            }
            Ok(configs)
        })
    }
}

/// How a client dials with TLS: a fixed config (the CLI: the CA only), or a
/// node's current one (presents the node's certificate; follows rotation).
#[derive(Clone)]
pub enum ClientTls {
    Fixed(Arc<ClientConfig>),
    Node(Arc<NodeTls>),
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientTls::Fixed(_) => f.write_str("ClientTls::Fixed"),
            ClientTls::Node(node) => write!(f, "ClientTls::Node({:?})", node.files().cert),
        }
    }
}

impl ClientTls {
    /// A client that trusts the CA certificates in `ca` and presents none.
    pub fn for_ca(ca: &Path) -> Result<ClientTls, String> {
        let bytes = read(ca, "CA file")?;
        let roots = roots(&bytes, ca)?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ClientTls::Fixed(Arc::new(config)))
    }

    /// The config for a connection starting now.
    pub fn config(&self) -> Arc<ClientConfig> {
        match self {
            ClientTls::Fixed(config) => config.clone(),
            ClientTls::Node(node) => node.client_config(),
        }
    }
}

/// The node address a certificate names (its `dkvs-node:` SAN URI), if
/// any. The certificate's chain is not checked here: pass only
/// certificates the TLS handshake verified.
pub fn node_named_in(certificate: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(certificate).ok()?;
    parsed
        .valid_uri_names()
        .find_map(|uri| uri.strip_prefix(NODE_NAME_PREFIX))
        .filter(|address| !address.is_empty())
        .map(str::to_string)
}

/// Whether the certificate in `loaded` names the node at `address`.
fn check_names(files: &TlsFiles, loaded: &Loaded, address: &str) -> Result<(), String> {
    let chain = certificates(&loaded.cert, &files.cert)?;
    let named = chain.first().and_then(node_named_in);
    if named.as_deref() == Some(address) {
        return Ok(());
    }
    Err(format!(
        "--tls-cert {} must name this node as the SAN URI dkvs-node:{address} (its address as \
         peers know it: --advertise, else --listen), so peers accept it; it names {}",
        files.cert.display(),
        named.map_or("no node".to_string(), |n| format!("dkvs-node:{n}"))
    ))
}

/// The one crypto provider: ring (the lightest build, and the only backend
/// in the tree). rustls 0.23.48 marks it deprecated for lacking post-quantum
/// key exchange; moving to aws-lc-rs is a build-cost decision for later.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the {what} {}: {e}", path.display()))
}

fn read_files(files: &TlsFiles) -> Result<Loaded, String> {
    Ok(Loaded {
        cert: read(&files.cert, "certificate (--tls-cert)")?,
        key: read(&files.key, "key (--tls-key)")?,
        ca: read(&files.ca, "CA file (--tls-ca)")?,
    })
}

/// The certificates in a PEM file's bytes; at least one.
fn certificates(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{} is not a PEM certificate file: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(certs)
}

fn roots(bytes: &[u8], path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(bytes, path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

fn build(files: &TlsFiles, loaded: &Loaded) -> Result<Configs, String> {
    // Each error names the flag too: the path alone does not say which
    // of the three files an operator mixed up.
    let chain = certificates(&loaded.cert, &files.cert).map_err(|e| format!("--tls-cert: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(&loaded.key).map_err(|e| {
        format!(
            "--tls-key: {} is not a PEM private key (PKCS#8, SEC1 or PKCS#1): {e}",
            files.key.display()
        )
    })?;
    let roots = Arc::new(roots(&loaded.ca, &files.ca).map_err(|e| format!("--tls-ca: {e}"))?);
    let mismatch = |e: rustls::Error| {
        format!(
            "the key {} does not go with the certificate {}: {e}",
            files.key.display(),
            files.cert.display()
        )
    };
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| format!("{}: {e}", files.ca.display()))?;
    let mut server = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(mismatch)?;
    server.alpn_protocols = vec![ALPN_H2.to_vec()];
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(mismatch)?;
    client.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_that_are_not_pem_are_refused_with_the_file_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let garbage = dir.path().join("cert.pem");
        std::fs::write(&garbage, b"\x00\x01 not a certificate").expect("write");
        let files = TlsFiles {
            cert: garbage.clone(),
            key: garbage.clone(),
            ca: garbage.clone(),
        };
        let error = NodeTls::load(files).err().expect("refused");
        assert!(error.contains("cert.pem"), "{error}");
        let missing = TlsFiles {
            cert: dir.path().join("absent.pem"),
            key: garbage.clone(),
            ca: garbage,
        };
        let error = NodeTls::load(missing).err().expect("refused");
        assert!(
            error.contains("cannot read") && error.contains("absent.pem"),
            "{error}"
        );
    }

    #[test]
    fn a_certificate_that_does_not_parse_names_no_node() {
        assert_eq!(
            node_named_in(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            None
        );
        assert_eq!(node_named_in(&CertificateDer::from(Vec::new())), None);
    }
}
