//! The async shell of a secured node: accepting TLS connections, and
//! reloading certificates and tokens when their files change or on SIGHUP.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::access_gate::Guard;
use crate::locks::Locked;
use crate::security::tls::NodeTls;

/// Longest a TLS handshake may take: a client that opens a connection and
/// says nothing holds a slot this long, never the accept loop.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections finished handshaking, waiting for the server to take them.
const ACCEPTED_BACKLOG: usize = 64;

/// Most handshakes in progress at once, and from one host. Past either, a
/// new connection is closed at once (the accept loop never waits), so
/// silent connections from one host cannot keep others out, and a flood
/// from many costs this many tasks at most.
const MAX_HANDSHAKES: usize = 1024;
const MAX_HANDSHAKES_PER_HOST: usize = 64;

/// How often the certificate and token files are checked for changes.
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// TLS connections accepted on `listener`, with Nagle's algorithm off. Each
/// handshake runs in its own task with a deadline, so a slow or silent
/// client delays only itself; a failed one is logged (at debug: a port
/// scanner or a plaintext client) and dropped. Each handshake takes the
/// server config current when the connection arrived. The accept loop ends
/// when the server drops the stream.
pub fn tls_incoming(
    listener: TcpListener,
    tls: Arc<NodeTls>,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
    tls_incoming_with(listener, move || tls.server_config())
}

/// [`tls_incoming`], each handshake with the config `config` gives then
/// (the HTTP door: the node's, with HTTP/1.1 beside h2 in its ALPN).
pub(super) fn tls_incoming_with(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
) -> impl Stream<Item = std::io::Result<TlsStream<TcpStream>>> + Send + 'static {
    let (ready, taken) = tokio::sync::mpsc::channel(ACCEPTED_BACKLOG);
    tokio::spawn(accept_loop(listener, config, ready));
    futures::stream::unfold(taken, |mut taken| async move {
        let connection = taken.recv().await?;
        Some((Ok(connection), taken))
    })
}

async fn accept_loop(
    listener: TcpListener,
    config: impl Fn() -> Arc<rustls::ServerConfig>,
    ready: tokio::sync::mpsc::Sender<TlsStream<TcpStream>>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let per_host = HostSlots::new(MAX_HANDSHAKES_PER_HOST);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = ready.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // A connection that went away before it was taken costs
                // nothing; out of file descriptors, say: back off instead
                // of spinning.
                use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted};
                if !matches!(
                    error.kind(),
                    ConnectionAborted | ConnectionReset | Interrupted
                ) {
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
        };
        let (Ok(permit), Some(slot)) = (
            handshakes.clone().try_acquire_owned(),
            per_host.claim(peer.ip()),
        ) else {
            tracing::debug!(%peer, "too many TLS handshakes in progress: connection closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(config());
        let ready = ready.clone();
        tokio::spawn(async move {
            let _held = (permit, slot);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(connection)) => {
                    let _ = ready.send(connection).await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                }
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Handshakes (or connections) in progress per host, at most `max` each.
#[derive(Clone)]
pub(super) struct HostSlots {
    counts: Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>,
    max: usize,
}

/// One handshake's place in [`HostSlots`], given back when dropped.
pub(super) struct HostSlot {
    slots: HostSlots,
    host: IpAddr,
}

impl HostSlots {
    pub(super) fn new(max: usize) -> Self {
        Self {
            counts: Arc::default(),
            max,
        }
    }

    /// A slot for one more from `host`, unless it has `max` already.
    pub(super) fn claim(&self, host: IpAddr) -> Option<HostSlot> {
        let mut counts = self.counts.locked();
        let count = counts.entry(host).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(HostSlot {
            slots: self.clone(),
            host,
        })
    }
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.locked();
        if let Some(count) = counts.get_mut(&self.host) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.host);
            }
        }
    }
}

/// Rereads the certificate and token files every
/// [`RELOAD_CHECK_INTERVAL`] and on SIGHUP, until `shutdown`; a file that
/// changed and loads is used for new connections and requests from then on;
/// one that does not load is reported and the old one kept.
pub fn spawn_reloader(
    guard: &Guard,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    if !guard.is_on() {
        return None;
    }
    let guard = guard.clone();
    Some(tokio::spawn(async move {
        let mut hangups = hangup_signals();
        loop {
            let hangup = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RELOAD_CHECK_INTERVAL) => false,
                _ = next_hangup(&mut hangups) => true,
            };
            if hangup {
                tracing::info!("SIGHUP: rereading certificates and tokens");
            }
            reload(&guard);
        }
    }))
}

fn reload(guard: &Guard) {
    if let Some(tls) = &guard.tls {
        match tls.reload_if_changed() {
            Ok(true) => tracing::info!(
                cert = %tls.files().cert.display(),
                "TLS certificates reloaded: new connections use them"
            ),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "TLS files changed but do not load; keeping the old ones")
            }
        }
    }
    if let Some(auth) = &guard.auth {
        match auth.reload_if_changed() {
            Ok(true) => tracing::info!(
                file = %auth.path().display(),
                tokens = auth.tokens().len(),
                "auth file reloaded"
            ),
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "the auth file changed but does not load; keeping the old tokens")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_gets_a_bounded_number_of_handshakes_and_slots_come_back() {
        let slots = HostSlots::new(MAX_HANDSHAKES_PER_HOST);
        let host: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let held: Vec<HostSlot> = (0..MAX_HANDSHAKES_PER_HOST)
            .map(|_| slots.claim(host).expect("under the limit"))
            .collect();
        assert!(slots.claim(host).is_none());
        assert!(slots.claim(other).is_some());
        drop(held);
        assert!(slots.claim(host).is_some());
        assert!(slots.counts.locked().is_empty());
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

#[cfg(unix)]
fn hangup_signals() -> Hangups {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(signals) => Some(signals),
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGHUP; files are still checked for changes");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signals() -> Hangups {}

#[cfg(unix)]
async fn next_hangup(hangups: &mut Hangups) {
    match hangups {
        Some(signals) => {
            if signals.recv().await.is_none() {
                std::future::pending::<()>().await
            }
        }
        None => std::future::pending::<()>().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangups) {
    std::future::pending::<()>().await
}
