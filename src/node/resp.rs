//! The RESP door (`--resp-listen`): the Redis protocol for `nc`,
//! `redis-cli`, `redis-benchmark` and Redis libraries. Connections, their
//! bounds and sessions are here; what each command does is in
//! [`super::resp_commands`]; the protocol itself in [`crate::resp`].
//!
//! Any node serves any key: writes go through the one write entry point
//! ([`Node::write`], forwarded to the key's first live replica like a gRPC
//! write); no MOVED redirects. Commands of one connection run one after
//! another and their replies go back in order, so a client may pipeline
//! as many as it likes (the socket's buffers and [`Bounds`] bound them).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Node;
use super::access_gate::Guard;
use super::resp_commands::{Session, execute};
use crate::quorum::Consistency;
use crate::resp::{Bounds, Parser, Reply};

/// Connections served at once; one more is closed at once.
const MAX_RESP_CONNECTIONS: usize = 256;

/// A connection that sends nothing for this long is closed (Redis has no
/// such default; a store that bounds every resource does).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// What a door shares with its connections.
struct Door {
    guard: Guard,
    node: OnceLock<Arc<Node>>,
    consistency: Consistency,
    next_id: std::sync::atomic::AtomicU64,
}

/// The RESP door while it serves.
pub struct RespDoor {
    door: Arc<Door>,
    serving: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl RespDoor {
    /// Listens on `address` and serves, with `guard`'s TLS and tokens
    /// (`AUTH`), reading and writing at `consistency` unless a connection
    /// asks for another. Until [`RespDoor::attach`], every command
    /// answers `-LOADING`. The error names the flag.
    pub async fn open(
        address: SocketAddr,
        guard: &Guard,
        consistency: Consistency,
    ) -> crate::error::Result<Self> {
        let listener = TcpListener::bind(address).await.map_err(|e| {
            crate::error::Error::InvalidArgument(format!(
                "--resp-listen {address}: cannot listen: {e}"
            ))
        })?;
        let door = Arc::new(Door {
            guard: guard.clone(),
            node: OnceLock::new(),
            consistency,
            next_id: std::sync::atomic::AtomicU64::new(1),
        });
        let stop = CancellationToken::new();
        let serving = tokio::spawn(serve(door.clone(), listener, stop.clone()));
        Ok(Self {
            door,
            serving,
            stop,
        })
    }

    /// From now on the door serves `node`.
    pub fn attach(&self, node: &Arc<Node>) {
        let _ = self.door.node.set(node.clone());
    }

    /// Stops taking connections and closes the open ones between commands
    /// (a command in progress finishes and is answered first; the door
    /// waits up to 5 s for that).
    pub async fn close(self) {
        self.stop.cancel();
        let _ = (&mut { self }.serving).await;
    }
}

impl Drop for RespDoor {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(door: Arc<Door>, listener: TcpListener, stop: CancellationToken) {
    let address = listener.local_addr().ok();
    tracing::info!(address = ?address, tls = door.guard.tls.is_some(), "serving RESP (the Redis protocol)");
    match door.guard.tls.clone() {
        Some(tls) => {
            let config = move || tls.server_config();
            let connections =
                super::secure::tls_incoming_with(listener, config).filter_map(|c| async { c.ok() });
            accept_loop(door, connections, stop).await
        }
        None => {
            let connections = super::serve::accepted(listener, "RESP").map(|(stream, _)| stream);
            accept_loop(door, connections, stop).await
        }
    }
}

async fn accept_loop<IO>(
    door: Arc<Door>,
    connections: impl futures::Stream<Item = IO> + Send,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_RESP_CONNECTIONS));
    let tasks = tokio_util::task::TaskTracker::new();
    let mut connections = std::pin::pin!(connections);
    loop {
        let connection = tokio::select! {
            _ = stop.cancelled() => break,
            next = connections.next() => match next {
                Some(connection) => connection,
                None => break,
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // dropped: closed at once
        };
        let (door, stop) = (door.clone(), stop.clone());
        tasks.spawn(async move {
            let _slot = slot;
            connection_loop(&door, connection, &stop).await;
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
}

/// One piece: receiving, answering and waiting are one state machine over
/// the same buffer, parser and deadline; split, each part would need all
/// of them.
///
/// Serves one connection until the client quits, breaks the protocol,
/// goes idle, is too slow to finish a command it began or to read its
/// replies, or the door closes (between commands: one in progress
/// finishes and is answered).
async fn connection_loop<IO: AsyncRead + AsyncWrite + Unpin>(
    door: &Door,
    mut io: IO,
    stop: &CancellationToken,
) {
    let id = door
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut session = Session::new(id, door.consistency, door.guard.auth.clone());
    let mut parser = Parser::default();
    let mut buffer = BytesMut::with_capacity(16 << 10);
    let mut out = Vec::with_capacity(16 << 10);
    // When the command being received began (or last made progress).
    let mut began = tokio::time::Instant::now();
    loop {
        // Every whole command buffered, in order; replies go out as they
        // pile up, so a client that pipelines without reading is held back
        // by its own socket, not by this node's memory.
        loop {
            let bounds = bounds(door, session.authenticated());
            let command = match parser.next(&mut buffer, bounds) {
                Ok(Some(command)) => command,
                Ok(None) => break,
                Err(broken) => {
                    Reply::error(format!("ERR {}", broken.0)).encode(session.version, &mut out);
                    let _ = send(&mut io, &out).await;
                    return;
                }
            };
            began = tokio::time::Instant::now();
            let reply = match door.node.get() {
                Some(node) => execute(node, &mut session, command).await,
                None => Reply::error(
                    "LOADING DKVS is opening its data dir or joining the cluster; retry shortly",
                ),
            };
            reply.encode(session.version, &mut out);
            if session.quit || stop.is_cancelled() {
                let _ = send(&mut io, &out).await;
                return;
            }
            if out.len() >= FLUSH_BYTES {
                if send(&mut io, &out).await.is_err() {
                    return;
                }
                out.clear();
            }
        }
        if !out.is_empty() {
            if send(&mut io, &out).await.is_err() {
                return;
            }
            out.clear();
        }
        // Idle between commands; a command begun must arrive whole within
        // the body timeout of its first byte (or of the last command it
        // followed), however slowly its bytes trickle in.
        let idle = parser.is_idle(&buffer);
        if idle {
            began = tokio::time::Instant::now();
        }
        let deadline = match (idle, door.node.get()) {
            (false, Some(node)) => {
                began + Duration::from_millis(node.config.request_body_timeout_ms)
            }
            _ => began + IDLE_TIMEOUT,
        };
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, io.read_buf(&mut buffer)) => read,
            _ = stop.cancelled() => return,
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {
                let why = if idle {
                    "ERR idle for too long: the connection is closed"
                } else {
                    "ERR the rest of the command did not arrive in time: the connection is closed"
                };
                Reply::error(why).encode(session.version, &mut out);
                let _ = send(&mut io, &out).await;
                return;
            }
        }
    }
}

/// Replies are written once this many bytes are waiting.
const FLUSH_BYTES: usize = 64 << 10;

/// A client that does not take its replies within this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

async fn send<IO: AsyncWrite + Unpin>(io: &mut IO, bytes: &[u8]) -> std::io::Result<()> {
    match tokio::time::timeout(WRITE_TIMEOUT, io.write_all(bytes)).await {
        Ok(written) => written,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not read its replies",
        )),
    }
}

/// The node's bounds on one command: a value up to `--max-value-bytes`
/// (and a little over, so that the node itself refuses it with a message),
/// at most 16 MiB of arguments in all. Before AUTH, when tokens are on,
/// as Redis does: 10 arguments of 16 KiB.
fn bounds(door: &Door, authenticated: bool) -> Bounds {
    if !authenticated {
        return Bounds {
            max_bulk: 16 << 10,
            max_args: 10,
            max_inline: 16 << 10,
            max_command: 64 << 10,
        };
    }
    let max_value = door
        .node
        .get()
        .map_or(1 << 20, |node| node.limits.max_value_bytes);
    Bounds {
        max_bulk: max_value.saturating_add(1024),
        max_args: 1 << 16,
        max_inline: 64 << 10,
        max_command: (16 << 20).max(max_value.saturating_add(64 << 10)),
    }
}
