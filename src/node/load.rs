//! Load shedding: a request either takes a slot at once or is refused at
//! once, never queued.
//!
//! Every request but health and reflection takes a slot from a node-wide
//! budget, and a client request also from its connection's
//! (`--max-requests-per-connection`): client requests from `--max-client-requests`,
//! node-to-node requests (replication, heartbeats, membership) from their
//! own `--max-node-requests`, so a flood of clients cannot starve
//! heartbeats into false convictions. A request past a budget is answered
//! UNAVAILABLE before any handler runs, with outcome `not-applied` and a
//! `retry-after-ms` hint, which the smart client honours with jittered
//! backoff. The slot is given back when the answer is complete (or the
//! caller went away). Connections past `--max-connections` are closed as
//! they arrive ([`limit_connections`]).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

use crate::error::Outcome;
use crate::locks::Locked;
use crate::security::access::{self, Door};

use crate::net::shed::RETRY_AFTER_HEADER;

/// The budgets (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadLimits {
    pub per_connection: usize,
    pub client_requests: usize,
    pub node_requests: usize,
    pub connections: usize,
}

/// Which budget refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Budget {
    Connection,
    Clients,
    /// Client writes another node forwarded (`Replica.ForwardWrites`):
    /// client requests, from the clients' budget, but on a node's
    /// connection (no per-connection budget), so that a flood of clients
    /// entering at other nodes cannot starve heartbeats either.
    Forwarded,
    Nodes,
}

impl Budget {
    fn flag(self) -> &'static str {
        match self {
            Budget::Connection => "--max-requests-per-connection",
            Budget::Clients | Budget::Forwarded => "--max-client-requests",
            Budget::Nodes => "--max-node-requests",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Budget::Connection => "requests in progress on this connection",
            Budget::Clients | Budget::Forwarded => "client requests in progress on this node",
            Budget::Nodes => "node-to-node requests in progress on this node",
        }
    }
}

/// How long a refused caller should wait: a connection over its budget has
/// its own answers coming soon (short); a node over its budget needs its
/// load to drain (longer, and longer the more it is refusing).
pub fn retry_after(budget: Budget, refused_lately: u64) -> Duration {
    let base = match budget {
        Budget::Connection => 20,
        Budget::Clients | Budget::Forwarded | Budget::Nodes => 50,
    };
    Duration::from_millis(base * (1 + refused_lately.min(1_000) / 100))
}

/// The node's request counters.
pub struct Load {
    limits: LoadLimits,
    clients: AtomicUsize,
    nodes: AtomicUsize,
    /// In-progress requests per connection (by the peer's address); an
    /// entry goes when its count does.
    connections: std::sync::Mutex<HashMap<SocketAddr, usize>>,
    /// Connections served now.
    open_connections: AtomicUsize,
    /// Requests refused since start, and connections closed at arrival.
    requests_shed: AtomicU64,
    connections_refused: AtomicU64,
    /// Refusals since the last warning, and when it was (ms since start).
    refused_since_warning: AtomicU64,
    last_warning_ms: AtomicU64,
    epoch: std::time::Instant,
}

/// How often a node that sheds says so in its log, at most.
const WARNING_INTERVAL_MS: u64 = 10_000;

/// A taken slot; given back on drop.
pub struct Slot {
    load: Arc<Load>,
    budget: Budget,
    connection: Option<SocketAddr>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = match self.budget {
            Budget::Nodes => &self.load.nodes,
            _ => &self.load.clients,
        };
        counter.fetch_sub(1, Ordering::Relaxed);
        if let Some(address) = self.connection {
            let mut connections = self.load.connections.locked();
            if let Some(count) = connections.get_mut(&address) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    connections.remove(&address);
                }
            }
        }
    }
}

impl Load {
    pub fn new(limits: LoadLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            clients: AtomicUsize::new(0),
            nodes: AtomicUsize::new(0),
            connections: std::sync::Mutex::new(HashMap::new()),
            open_connections: AtomicUsize::new(0),
            requests_shed: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            refused_since_warning: AtomicU64::new(0),
            last_warning_ms: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
        })
    }

    /// Requests refused since start.
    pub fn requests_shed(&self) -> u64 {
        self.requests_shed.load(Ordering::Relaxed)
    }

    /// Connections closed at arrival since start.
    pub fn connections_refused(&self) -> u64 {
        self.connections_refused.load(Ordering::Relaxed)
    }

    /// Takes a slot for a request of `budget` (clients' or nodes') from
    /// `connection`, or says which budget is spent.
    pub fn admit(
        self: &Arc<Self>,
        budget: Budget,
        connection: Option<SocketAddr>,
    ) -> Result<Slot, Budget> {
        // A node's connection carries everything it coordinates: only the
        // node budget bounds it.
        let connection = connection.filter(|_| budget == Budget::Clients);
        if let Some(address) = connection {
            let mut connections = self.connections.locked();
            let count = connections.entry(address).or_insert(0);
            if *count >= self.limits.per_connection {
                drop(connections);
                return Err(self.refused(Budget::Connection));
            }
            *count += 1;
        }
        let (counter, limit) = match budget {
            Budget::Nodes => (&self.nodes, self.limits.node_requests),
            _ => (&self.clients, self.limits.client_requests),
        };
        // Counted by the slot from here: dropping it gives both back.
        let slot = Slot {
            load: self.clone(),
            budget,
            connection,
        };
        if counter.fetch_add(1, Ordering::Relaxed) >= limit {
            drop(slot);
            return Err(self.refused(budget));
        }
        Ok(slot)
    }

    fn refused(&self, budget: Budget) -> Budget {
        self.requests_shed.fetch_add(1, Ordering::Relaxed);
        let refused = self.refused_since_warning.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.epoch.elapsed().as_millis() as u64 + WARNING_INTERVAL_MS;
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARNING_INTERVAL_MS
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refused_since_warning.store(0, Ordering::Relaxed);
            tracing::warn!(
                refused,
                budget = budget.flag(),
                "shedding load: refused {refused} request(s) in the last {} s; the last one because \
                 {} reached {}",
                WARNING_INTERVAL_MS / 1000,
                budget.what(),
                budget.flag()
            );
        }
        budget
    }

    /// The refusal for `budget`: UNAVAILABLE, not applied, with a hint.
    pub(super) fn refusal(&self, budget: Budget) -> tonic::Status {
        let limit = match budget {
            Budget::Connection => self.limits.per_connection,
            Budget::Clients | Budget::Forwarded => self.limits.client_requests,
            Budget::Nodes => self.limits.node_requests,
        };
        let wait = retry_after(budget, self.refused_since_warning.load(Ordering::Relaxed));
        let mut status = tonic::Status::unavailable(format!(
            "node overloaded: {limit} {} ({}); refused before any work and not applied: \
             retry after {} ms, or send fewer requests at once",
            budget.what(),
            budget.flag(),
            wait.as_millis()
        ));
        Outcome::NotApplied.set_on(status.metadata_mut());
        if let Ok(value) = wait.as_millis().to_string().parse() {
            status.metadata_mut().insert(RETRY_AFTER_HEADER, value);
        }
        status
    }
}

/// The path of `Replica.ForwardWrites`.
const FORWARD_WRITE_PATH: &str = "/dkvs.v1.Replica/ForwardWrites";

/// The budget a path takes from, if any (health and reflection take none).
fn budget_of(path: &str) -> Option<Budget> {
    match access::door_of(path) {
        Door::Open => None,
        Door::Client(_) => Some(Budget::Clients),
        Door::Node if path == FORWARD_WRITE_PATH => Some(Budget::Forwarded),
        Door::Node | Door::AnyNode => Some(Budget::Nodes),
    }
}

/// The peer address of the connection a request came on.
fn connection_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(|info| info.remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr)
        })
}

/// Wraps the services in a [`Shed`].
#[derive(Clone)]
pub(super) struct LoadLayer(pub(super) Arc<Load>);

impl<S> tower::Layer<S> for LoadLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            load: self.0.clone(),
        }
    }
}

/// Takes a slot for every request, or refuses it (see the module doc).
#[derive(Clone)]
pub(super) struct Shed<S> {
    inner: S,
    load: Arc<Load>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Shed<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ReqBody: http_body::Body + Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let Some(budget) = budget_of(request.uri().path()) else {
            return Box::pin(self.inner.call(request));
        };
        match self.load.admit(budget, connection_of(&request)) {
            Ok(slot) => {
                let answer = self.inner.call(request);
                Box::pin(async move {
                    let answer = answer.await;
                    drop(slot);
                    answer
                })
            }
            Err(spent) => {
                let response = self.load.refusal(spent).into_http::<ResBody>();
                let body = request.into_body();
                Box::pin(async move {
                    drain(body).await;
                    Ok(response)
                })
            }
        }
    }
}

/// Most of a refused request's body read before answering, in bytes and time.
const DRAIN_BYTES: usize = 64 << 10;
const DRAIN_TIME: Duration = Duration::from_millis(500);

/// Reads a refused request's body to its end (a little, briefly) before the
/// refusal goes out. Answered before its body has arrived, a stream must be
/// reset, and HTTP/2 closes a connection (GOAWAY ENHANCE_YOUR_CALM) after
/// 1024 such resets: a shedding node would cut off the connections it
/// sheds, failing the calls in flight on them.
async fn drain<B: http_body::Body>(body: B) {
    let mut body = std::pin::pin!(body);
    let mut read = 0;
    let reading = async {
        while read <= DRAIN_BYTES {
            match futures::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, bytes::Buf::remaining);
                }
                _ => return,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, reading).await;
}

/// `incoming` with at most `--max-connections` connections served at once:
/// one past it is closed as it arrives (and counted), so the client sees
/// the connection end before any request and tries another node.
pub fn limit_connections<I, IO, IE>(
    incoming: I,
    load: Arc<Load>,
) -> impl Stream<Item = Result<Counted<IO>, std::io::Error>> + Send
where
    I: Stream<Item = Result<IO, IE>> + Send,
    IO: Send,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    incoming
        .map(move |accepted| {
            let io = match accepted {
                Ok(io) => io,
                Err(error) => return Some(Err(std::io::Error::other(error.into()))),
            };
            let open = load.open_connections.fetch_add(1, Ordering::Relaxed);
            let counted = Counted {
                io,
                load: load.clone(),
            };
            if open >= load.limits.connections {
                drop(counted);
                let refused = load.connections_refused.fetch_add(1, Ordering::Relaxed) + 1;
                if refused.is_power_of_two() {
                    tracing::warn!(
                        refused,
                        limit = load.limits.connections,
                        "too many connections (--max-connections): closed a new one at once \
                         ({refused} so far)"
                    );
                }
                return None;
            }
            Some(Ok(counted))
        })
        .filter_map(futures::future::ready)
}

/// A served connection, counted until it closes.
pub struct Counted<IO> {
    io: IO,
    load: Arc<Load>,
}

impl<IO> Drop for Counted<IO> {
    fn drop(&mut self) {
        self.load.open_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LoadLimits {
        LoadLimits {
            per_connection: 2,
            client_requests: 3,
            node_requests: 2,
            connections: 10,
        }
    }

    fn at(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    #[test]
    fn a_connection_past_its_budget_is_refused_and_others_are_not() {
        let load = Load::new(limits());
        let a = load.admit(Budget::Clients, at(1)).expect("first");
        let b = load.admit(Budget::Clients, at(1)).expect("second");
        assert_eq!(
            load.admit(Budget::Clients, at(1)).err(),
            Some(Budget::Connection)
        );
        let c = load
            .admit(Budget::Clients, at(2))
            .expect("another connection");
        // The node's client budget (3) is spent now.
        assert_eq!(
            load.admit(Budget::Clients, at(3)).err(),
            Some(Budget::Clients)
        );
        // Node-to-node requests have their own, and no connection budget.
        let n = load.admit(Budget::Nodes, at(4)).expect("a node");
        let m = load.admit(Budget::Nodes, at(4)).expect("a node");
        assert_eq!(load.admit(Budget::Nodes, at(5)).err(), Some(Budget::Nodes));
        drop((a, b, c, n, m));
        assert_eq!(load.clients.load(Ordering::Relaxed), 0);
        assert_eq!(load.nodes.load(Ordering::Relaxed), 0);
        assert!(
            load.connections.locked().is_empty(),
            "entries go with their slots"
        );
        assert_eq!(load.requests_shed(), 3);
        load.admit(Budget::Clients, at(1))
            .expect("budgets come back");
    }

    #[test]
    fn a_refusal_is_unavailable_not_applied_with_a_hint_naming_the_flag() {
        let load = Load::new(limits());
        let status = load.refusal(Budget::Clients);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(Outcome::of(status.metadata()), Some(Outcome::NotApplied));
        assert!(
            status.message().contains("--max-client-requests"),
            "{}",
            status.message()
        );
        let hint: u64 = status
            .metadata()
            .get(RETRY_AFTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("a retry hint");
        assert!(hint >= 20);
    }

    #[test]
    fn health_and_reflection_take_no_slot() {
        assert_eq!(budget_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(budget_of("/dkvs.v1.KeyValue/Put"), Some(Budget::Clients));
        assert_eq!(budget_of("/dkvs.v1.Liveness/Ping"), Some(Budget::Nodes));
        assert_eq!(budget_of("/dkvs.v1.Replica/Write"), Some(Budget::Nodes));
        assert_eq!(
            budget_of("/dkvs.v1.Replica/ForwardWrites"),
            Some(Budget::Forwarded)
        );
        assert_eq!(budget_of("nonsense"), Some(Budget::Nodes));
    }

    #[test]
    fn hints_grow_with_the_refusals() {
        assert!(retry_after(Budget::Clients, 500) > retry_after(Budget::Clients, 0));
        assert!(retry_after(Budget::Clients, u64::MAX) <= Duration::from_millis(50 * 11));
    }
}
