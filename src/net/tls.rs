//! Dialing over TLS: tonic channels whose connections are TCP, then a
//! rustls handshake that checks the peer's certificate against the dialed
//! host (an IP SAN for an address, a DNS SAN for a name), then, when a
//! node dials, that the certificate names the node dialed
//! (`dkvs-node:HOST:PORT`), so a node cannot answer for another on its host. Each connection
//! takes the client config current when it is made, so a node's rotated
//! certificate is presented from its next connection on.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint, Uri};

use super::Dialer;
use crate::error::{Error, Result};
use crate::security::tls::{ClientTls, node_named_in};

/// Dials HTTP/2 over TLS.
#[derive(Clone)]
pub struct TlsDialer {
    /// How long to wait for a TCP connection and its handshake.
    pub connect_timeout: Duration,
    /// The client config (and the certificate a node presents).
    pub tls: ClientTls,
}

impl TlsDialer {
    pub fn new(tls: ClientTls) -> Self {
        Self {
            // TCP plus a handshake's round trips.
            connect_timeout: Duration::from_millis(1000),
            tls,
        }
    }
}

impl Dialer for TlsDialer {
    fn dial(&self, address: &str) -> Result<Channel> {
        // http://: the TLS is this connector's, not tonic's.
        let endpoint = Endpoint::from_shared(format!("http://{address}")).map_err(|e| {
            Error::InvalidArgument(format!("{address:?} is not a valid HOST:PORT address: {e}"))
        })?;
        let tls = self.tls.clone();
        let connector = tower::service_fn(move |uri: Uri| {
            let tls = tls.clone();
            async move { connect(uri, tls).await.map(TokioIo::new) }
        });
        Ok(super::with_keepalive(endpoint)
            .connect_timeout(self.connect_timeout)
            .connect_with_connector_lazy(connector))
    }
}

async fn connect(
    uri: Uri,
    tls: ClientTls,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
    let host = uri
        .host()
        .ok_or_else(|| invalid(format!("{uri} names no host")))?;
    let port = uri
        .port_u16()
        .ok_or_else(|| invalid(format!("{uri} names no port")))?;
    // An IPv6 address comes bracketed in a URI.
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(bare.to_string())
        .map_err(|e| invalid(format!("{bare:?} is not a host name TLS can check: {e}")))?;
    let tcp = tokio::net::TcpStream::connect((bare, port)).await?;
    tcp.set_nodelay(true)?;
    let as_node = matches!(tls, ClientTls::Node(_));
    let stream = tokio_rustls::TlsConnector::from(tls.config())
        .connect(name, tcp)
        .await?;
    // The CA signs every node's certificate, and several nodes may share a
    // host: to a node, the one answering must be the node dialed, by name.
    // A client trusts any node (every node coordinates every key), so it
    // may dial a node by any name its certificate carries (a DNS name,
    // `localhost`, a load balancer's).
    if !as_node {
        return Ok(stream);
    }
    let dialed = format!("{host}:{port}");
    let named = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(node_named_in);
    if named.as_deref() != Some(dialed.as_str()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "the node at {dialed} presents a certificate for {}, not dkvs-node:{dialed}: dial nodes by the address their certificates (and the cluster) know them by",
                named.map_or("no node".to_string(), |n| format!("dkvs-node:{n}"))
            ),
        ));
    }
    Ok(stream)
}
