//! The HTTP door (`--http-listen`, DESIGN "HTTP"): Prometheus metrics and
//! health for load balancers, beside the gRPC port.
//!
//! * `GET /metrics`: the Prometheus text format ([`super::metrics`]); with
//!   `--auth-file`, only for a bearer token of the `read` role or above.
//! * `GET /health/live`: 200 while the process answers.
//! * `GET /health/ready`: 200 when the node serves reads and writes
//!   ([`readiness`]), else 503; one line says why, `?verbose` lists every
//!   check. Load shedding does not make a node unready: a load balancer
//!   that took busy nodes out would push their load onto the rest.
//!
//! Served with the node's TLS when it has one (same certificates, same
//! reloading), on hyper's HTTP/1.1 and HTTP/2 with a deadline for a
//! request's headers and a bound on open connections, so a slow or
//! flooding client costs little. Stops with the node.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Node;
use super::access_gate::Guard;
use crate::security::auth::{Role, bearer_token};

/// Longest a client may take to send a request's headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Most HTTP connections open at once; past it a new one is closed at once.
const MAX_HTTP_CONNECTIONS: usize = 256;

/// One readiness check: its name, and why it fails (none: it passes).
pub(super) struct Check {
    pub(super) name: &'static str,
    pub(super) failing: Option<String>,
}

/// The checks `/health/ready` makes, in order.
pub(super) struct Readiness(pub(super) Vec<Check>);

impl Readiness {
    pub(super) fn is_ready(&self) -> bool {
        self.0.iter().all(|c| c.failing.is_none())
    }
}

/// Whether `node` serves reads and writes: it has started serving (heard
/// from its peers, caught up with the newest layout, agreed on the cluster
/// id), is not stopping, holds its data (a new data dir caught up, not
/// joining), and no peer serves a newer layout than it.
pub(super) fn readiness(node: &Node) -> Readiness {
    let view = node.cluster.placement();
    let held = view.version();
    let stopping = node.shutdown.is_cancelled() || node.removal.notice().is_some();
    let joining = view
        .layout()
        .and_then(|l| l.member(&node.me.address))
        .is_some_and(|m| m.role == crate::layout::Role::Joining);
    let newer = node.heartbeats.newest_layout_reported(held);
    Readiness(vec![
        Check {
            name: "started",
            failing: (!node.is_serving())
                .then(|| "starting: waiting to hear from its peers and agree on the layout".into()),
        },
        Check {
            name: "not stopping",
            failing: stopping.then(|| match node.removal.notice() {
                Some(notice) => format!("stopping: {notice}"),
                None => "stopping: draining requests".into(),
            }),
        },
        Check {
            name: "caught up",
            failing: node.replica.read_refusal().or_else(|| {
                joining.then(|| format!("joining: receiving its ranges (layout v{held})"))
            }),
        },
        Check {
            name: "layout current",
            failing: newer.map(|(version, from)| {
                format!("{from} serves layout v{version}; this node serves v{held}")
            }),
        },
    ])
}

/// What the HTTP door's handlers share.
struct Door {
    node: Arc<Node>,
    guard: Guard,
    registry: prometheus_client::registry::Registry,
}

/// The router of the HTTP door.
fn router(node: Arc<Node>, guard: Guard) -> Router {
    let door = Arc::new(Door {
        registry: super::metrics::registry(&node),
        node,
        guard,
    });
    Router::new()
        .route("/health/live", get(|| async { "live\n" }))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this node serves /metrics, /health/live and /health/ready\n",
            )
        })
        .with_state(door)
}

async fn ready(State(door): State<Arc<Door>>, request: Request) -> Response {
    let verbose = request.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "verbose" || p.starts_with("verbose="))
    });
    let readiness = readiness(&door.node);
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = match readiness.0.iter().find_map(|c| c.failing.as_ref()) {
        None => "ready\n".to_string(),
        Some(why) => format!("not ready: {why}\n"),
    };
    if verbose {
        for check in &readiness.0 {
            match &check.failing {
                None => body.push_str(&format!("[+] {} ok\n", check.name)),
                Some(why) => body.push_str(&format!("[-] {} failed: {why}\n", check.name)),
            }
        }
    }
    (status, body).into_response()
}

/// `GET /metrics`: the text format, for a caller the guard admits.
async fn metrics(State(door): State<Arc<Door>>, request: Request) -> Response {
    if let Some(refused) = refuse_without_read_token(&door.guard, &request) {
        return refused;
    }
    let mut response = crate::metrics::render(&door.registry).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}
/// With `--auth-file`: 401 unless the request carries a known token (every
/// role may read metrics).
fn refuse_without_read_token(guard: &Guard, request: &Request) -> Option<Response> {
    let auth = guard.auth.as_ref()?;
    let unauthorized = |why: &str| {
        let mut response = (StatusCode::UNAUTHORIZED, format!("{why}\n")).into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    };
    match bearer_token(request.headers().get(header::AUTHORIZATION)) {
        Err(why) => Some(unauthorized(&why)),
        Ok(None) => Some(unauthorized(
            "this node requires a token: send `Authorization: Bearer <token>` (the read role or above)",
        )),
        Ok(Some(token)) => match auth.tokens().role_of(token) {
            Some(role) if role >= Role::Read => None,
            _ => Some(unauthorized("unknown token")),
        },
    }
}

/// The HTTP door while it serves.
pub(super) struct HttpDoor {
    serving: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl HttpDoor {
    /// Serves the HTTP door of `node` if `--http-listen` asks for one; the
    /// error names the flag when its address cannot be listened on.
    pub(super) async fn open(
        node: &Arc<Node>,
        guard: &Guard,
    ) -> crate::error::Result<Option<Self>> {
        let Some(address) = node.config.http_listen else {
            return Ok(None);
        };
        let listener = TcpListener::bind(address).await.map_err(|e| {
            crate::error::Error::InvalidArgument(format!(
                "--http-listen {address}: cannot listen: {e}"
            ))
        })?;
        let stop = CancellationToken::new();
        let serving = tokio::spawn(serve(node.clone(), listener, guard.clone(), stop.clone()));
        Ok(Some(Self { serving, stop }))
    }

    /// Stops taking connections, lets requests in progress finish (a few
    /// seconds at most), and waits for that.
    pub(super) async fn close(self) {
        self.stop.cancel();
        let _ = self.serving.await;
    }
}

/// Serves the HTTP door on `listener` until `stop` is cancelled (TLS when
/// the guard has it), then lets requests in progress finish.
async fn serve(node: Arc<Node>, listener: TcpListener, guard: Guard, stop: CancellationToken) {
    let address = listener.local_addr().ok();
    tracing::info!(address = ?address, tls = guard.tls.is_some(), "serving HTTP: /metrics, /health/live, /health/ready");
    let app = router(node, guard.clone());
    match guard.tls.clone() {
        Some(tls) => {
            let connections = super::secure::tls_incoming(listener, tls);
            accept_loop(connections.filter_map(|c| async { c.ok() }), app, stop).await
        }
        None => {
            let connections = futures::stream::unfold(listener, |listener| async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => {
                            let _ = stream.set_nodelay(true);
                            return Some((stream, listener));
                        }
                        Err(error) => {
                            tracing::debug!(%error, "cannot accept an HTTP connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            });
            accept_loop(connections, app, stop).await
        }
    }
}

/// Serves each connection in its own task, at most
/// [`MAX_HTTP_CONNECTIONS`] at once, until `stop`.
async fn accept_loop<IO>(
    connections: impl futures::Stream<Item = IO> + Send,
    app: Router,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
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
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let _slot = slot;
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let serving = builder.serve_connection(TokioIo::new(connection), service);
            let mut serving = std::pin::pin!(serving);
            tokio::select! {
                _ = serving.as_mut() => {}
                _ = stop.cancelled() => {
                    serving.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
                }
            }
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(6), tasks.wait()).await;
}
