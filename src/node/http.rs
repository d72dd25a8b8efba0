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
//! The door opens before the node opens its data dir or joins (so a
//! liveness probe passes while a large data dir is scanned; readiness says
//! "opening"), and closes after the node has drained. Served with the
//! node's TLS when it has one (same certificates, same reloading; ALPN
//! offers HTTP/1.1 beside h2), on hyper's HTTP/1.1 and HTTP/2, with a
//! deadline for a request's headers, a bound on connections in all and per
//! host, and a longest life per connection, so a slow, silent or flooding
//! client costs little. Scrapes are rendered one at a time, off the async
//! threads, and an answer is reused for a second.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
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

/// Most HTTP connections open at once, and from one host; past either a
/// new one is closed at once.
const MAX_HTTP_CONNECTIONS: usize = 256;
const MAX_HTTP_CONNECTIONS_PER_HOST: usize = 32;

/// Longest an HTTP connection serves: then it is asked to close (requests
/// in progress finish, for [`CLOSE_GRACE`] at most). A client that says
/// nothing holds a slot no longer than this.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Most requests in progress on one HTTP/2 connection.
const MAX_STREAMS: u32 = 16;

/// How long a rendered `/metrics` answer is reused.
const SCRAPE_REUSE: Duration = Duration::from_secs(1);

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
    // Only peers believed up count: a peer that told of a newer layout
    // and died must not hold every node unready.
    let newer = node.heartbeats.newest_layout_reported_by(held, |peer| {
        node.cluster
            .liveness
            .healths([peer])
            .first()
            .is_some_and(|h| h.up)
    });
    Readiness(vec![
        Check {
            name: "not stopping",
            failing: stopping.then(|| match node.removal.notice() {
                Some(notice) => format!("stopping: {notice}"),
                None => "stopping: draining requests".into(),
            }),
        },
        Check {
            name: "started",
            failing: (!node.is_serving() && !stopping)
                .then(|| "starting: waiting to hear from its peers and agree on the layout".into()),
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

/// The readiness of a door whose node is not open yet.
fn opening() -> Readiness {
    Readiness(vec![Check {
        name: "opened",
        failing: Some("opening: the node is opening its data dir or joining the cluster".into()),
    }])
}

/// What the HTTP door's handlers share.
struct Door {
    guard: Guard,
    /// The node, once it is open.
    node: OnceLock<Attached>,
    /// The last `/metrics` text and when it was rendered; held while one
    /// renders, so scrapes render one at a time.
    scraped: tokio::sync::Mutex<Option<(tokio::time::Instant, Arc<str>)>>,
}

/// An open node and its metrics.
struct Attached {
    node: Arc<Node>,
    registry: prometheus_client::registry::Registry,
}

/// The router of the HTTP door.
fn router(door: Arc<Door>) -> Router {
    Router::new()
        .route("/health/live", get(|| async { "live\n" }))
        .route("/health/ready", get(ready))
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/v1/cluster", get(cluster))
        .route("/v1/replicas/{*key}", get(replicas))
        .route("/v1/kv", get(list))
        .route("/v1/kv/", axum::routing::any(kv))
        .route("/v1/kv/{*key}", axum::routing::any(kv))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: this node serves / (the dashboard), /v1/kv/{key}, /v1/kv?prefix=, /v1/replicas/{key}, /v1/cluster, /metrics, /health/live and /health/ready\n",
            )
        })
        .with_state(door)
}

async fn ready(State(door): State<Arc<Door>>, request: Request) -> Response {
    let verbose = request.uri().query().is_some_and(|q| {
        q.split('&')
            .any(|p| p == "verbose" || p.starts_with("verbose="))
    });
    let readiness = match door.node.get() {
        Some(attached) => readiness(&attached.node),
        None => opening(),
    };
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

/// `/v1/kv/{key}` ([`super::http_kv`]), once the node is open.
async fn kv(State(door): State<Arc<Door>>, request: Request) -> Response {
    match door.node.get() {
        Some(attached) => super::http_kv::kv(&attached.node, &door.guard, request).await,
        None => opening_answer(matches!(
            *request.method(),
            axum::http::Method::PUT | axum::http::Method::DELETE
        )),
    }
}

/// The live dashboard: one self-contained page (no build step, nothing
/// fetched from elsewhere: the policy forbids it) that polls this node's
/// `/v1/cluster` and `/metrics`. Always served; its data needs a `read`
/// token when tokens are on, which the page asks for once per tab.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        DASHBOARD,
    )
        .into_response()
}

/// `GET /v1/kv?prefix=` ([`super::http_list`]), once the node is open.
async fn list(State(door): State<Arc<Door>>, request: Request) -> Response {
    match door.node.get() {
        Some(attached) => super::http_list::list(&attached.node, &door.guard, request).await,
        None => opening_answer(false),
    }
}

/// `GET /v1/cluster` ([`super::http_kv::cluster`]), once the node is open.
async fn cluster(State(door): State<Arc<Door>>, request: Request) -> Response {
    match door.node.get() {
        Some(attached) => super::http_kv::cluster(&attached.node, &door.guard, &request),
        None => opening_answer(false),
    }
}

/// `GET /v1/replicas/{key}` ([`super::http_kv::replicas`]), once the node
/// is open.
async fn replicas(State(door): State<Arc<Door>>, request: Request) -> Response {
    match door.node.get() {
        Some(attached) => super::http_kv::replicas(&attached.node, &door.guard, request).await,
        None => opening_answer(false),
    }
}

/// The answer while the node opens: 503, and not applied for a write.
fn opening_answer(writes: bool) -> Response {
    let mut response = super::http_kv::error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the node is opening its data dir or joining the cluster; retry shortly",
        tonic::Code::Unavailable,
        writes.then_some(crate::error::Outcome::NotApplied),
    );
    super::http_kv::retry_after(&mut response, 1);
    response
}

/// `GET /metrics`: the text format, for a caller the guard admits.
async fn metrics(State(door): State<Arc<Door>>, request: Request) -> Response {
    if let Some(refused) = refuse_without_read_token(&door.guard, &request) {
        return refused;
    }
    if door.node.get().is_none() {
        let opening = "the node is opening its data dir or joining the cluster; no metrics yet\n";
        return (StatusCode::SERVICE_UNAVAILABLE, opening).into_response();
    }
    let text = scrape(door).await;
    let mut response = text.to_string().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    response
}

/// The `/metrics` text: rendered on the blocking pool (it reads files),
/// one scrape at a time, reused for [`SCRAPE_REUSE`].
async fn scrape(door: Arc<Door>) -> Arc<str> {
    let mut scraped = door.scraped.lock().await;
    if let Some((at, text)) = scraped.as_ref()
        && at.elapsed() < SCRAPE_REUSE
    {
        return text.clone();
    }
    let rendering = door.clone();
    let rendered = tokio::task::spawn_blocking(move || {
        rendering
            .node
            .get()
            .map(|attached| crate::metrics::render(&attached.registry))
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default();
    let text: Arc<str> = rendered.into();
    *scraped = Some((tokio::time::Instant::now(), text.clone()));
    text
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

/// The HTTP door (`--http-listen`) while it serves.
pub struct HttpDoor {
    door: Arc<Door>,
    serving: tokio::task::JoinHandle<()>,
    stop: CancellationToken,
}

impl HttpDoor {
    /// Listens on `address` and serves, with `guard`'s TLS and tokens:
    /// until [`HttpDoor::attach`] gives it the node, `/health/live` answers
    /// and the rest says the node is opening. The error names the flag.
    pub async fn open(address: SocketAddr, guard: &Guard) -> crate::error::Result<Self> {
        let listener = TcpListener::bind(address).await.map_err(|e| {
            crate::error::Error::InvalidArgument(format!(
                "--http-listen {address}: cannot listen: {e}"
            ))
        })?;
        let door = Arc::new(Door {
            guard: guard.clone(),
            node: OnceLock::new(),
            scraped: tokio::sync::Mutex::new(None),
        });
        let stop = CancellationToken::new();
        let serving = tokio::spawn(serve(door.clone(), listener, stop.clone()));
        Ok(Self {
            door,
            serving,
            stop,
        })
    }

    /// From now on the door answers for `node`.
    pub fn attach(&self, node: &Arc<Node>) {
        let attached = Attached {
            registry: super::metrics::registry(node),
            node: node.clone(),
        };
        let _ = self.door.node.set(attached);
    }

    /// Stops taking connections, lets requests in progress finish (a few
    /// seconds at most), and waits for that.
    pub async fn close(self) {
        self.stop.cancel();
        let _ = (&mut { self }.serving).await;
    }
}

impl Drop for HttpDoor {
    /// A door dropped without [`HttpDoor::close`] (its server's future was
    /// dropped) stops too.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Serves the door on `listener` until `stop` is cancelled (TLS when the
/// guard has it, with HTTP/1.1 beside h2 in ALPN), then lets requests in
/// progress finish.
async fn serve(door: Arc<Door>, listener: TcpListener, stop: CancellationToken) {
    let address = listener.local_addr().ok();
    let tls = door.guard.tls.clone();
    tracing::info!(address = ?address, tls = tls.is_some(), "serving HTTP: /metrics, /health/live, /health/ready");
    let app = router(door);
    match tls {
        Some(tls) => {
            let config = move || {
                let mut config = (*tls.server_config()).clone();
                config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
                Arc::new(config)
            };
            let connections = super::secure::tls_incoming_with(listener, config);
            let with_hosts = connections.filter_map(|c| async {
                let c = c.ok()?;
                let host = c.get_ref().0.peer_addr().ok()?.ip();
                Some((c, host))
            });
            accept_loop(with_hosts, app, stop).await
        }
        None => {
            let connections =
                super::serve::accepted(listener, "HTTP").map(|(stream, peer)| (stream, peer.ip()));
            accept_loop(connections, app, stop).await
        }
    }
}

/// Serves each connection in its own task, at most
/// [`MAX_HTTP_CONNECTIONS`] at once, until `stop`.
async fn accept_loop<IO>(
    connections: impl futures::Stream<Item = (IO, IpAddr)> + Send,
    app: Router,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HTTP_CONNECTIONS));
    let per_host = super::secure::HostSlots::new(MAX_HTTP_CONNECTIONS_PER_HOST);
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
        let (connection, host) = connection;
        let (Ok(slot), Some(host_slot)) = (slots.clone().try_acquire_owned(), per_host.claim(host))
        else {
            continue; // dropped: closed at once
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            let _slots = (slot, host_slot);
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .keep_alive_interval(Some(Duration::from_secs(10)))
                .keep_alive_timeout(Duration::from_secs(10));
            let serving = builder.serve_connection(TokioIo::new(connection), service);
            let mut serving = std::pin::pin!(serving);
            tokio::select! {
                _ = serving.as_mut() => return,
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(MAX_CONNECTION_AGE) => {}
            }
            serving.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, serving).await;
        });
    }
    tasks.close();
    let _ = tokio::time::timeout(CLOSE_GRACE + Duration::from_secs(1), tasks.wait()).await;
}
