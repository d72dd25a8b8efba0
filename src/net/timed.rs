//! Node-to-node calls timed for Prometheus, per peer and call
//! (`dkvs_peer_call_duration_seconds`, `dkvs_peer_calls_failed_total`).
//!
//! [`TimedChannel`] sits under every node-only client (see
//! [`super::PeerChannel`]): it starts a clock when a call is sent and stops
//! it when the answer's headers arrive (for a stream, its first headers),
//! counting a call failed when no answer came (also when the call was
//! dropped first: its deadline ran out) or the headers carry a gRPC status
//! other than OK (an error answered before any message). The
//! series were made with the channel, once per peer: a call only finds its
//! slot by its path among a fixed list, and adds to atomics.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use tokio::time::Instant;
use tonic::body::Body;
use tonic::transport::Channel;
use tower::Service;

use crate::metrics::{CallStats, PeerCalls};

/// A peer's channel whose calls are timed (none: not timed, as in the
/// smart client).
#[derive(Clone, Debug)]
pub struct TimedChannel {
    pub(super) inner: Channel,
    pub(super) calls: Option<Arc<PeerCalls>>,
}

impl Service<http::Request<Body>> for TimedChannel {
    type Response = http::Response<Body>;
    type Error = tonic::transport::Error;
    type Future = Timed<<Channel as Service<http::Request<Body>>>::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let timing = self.calls.as_ref().map(|calls| Timing {
            index: crate::metrics::call_index(request.uri().path()),
            calls: calls.clone(),
            started: Instant::now(),
        });
        Timed {
            inner: self.inner.call(request),
            timing,
        }
    }
}

/// Which call is being timed, and since when.
struct Timing {
    calls: Arc<PeerCalls>,
    index: usize,
    started: Instant,
}

impl Timing {
    fn stats(&self) -> &CallStats {
        self.calls.by_index(self.index)
    }
}

/// A call's answer, timed.
pub struct Timed<F> {
    inner: F,
    timing: Option<Timing>,
}

impl<F> Drop for Timed<F> {
    /// A call dropped before its answer (its deadline ran out, or its
    /// caller gave up) counts as failed, with the time it took.
    fn drop(&mut self) {
        if let Some(timing) = self.timing.take() {
            let stats = timing.stats();
            stats.duration.observe(timing.started.elapsed());
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl<F> Future for Timed<F>
where
    F: Future<Output = Result<http::Response<Body>, tonic::transport::Error>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answer = std::task::ready!(Pin::new(&mut self.inner).poll(cx));
        if let Some(timing) = self.timing.take() {
            let stats = timing.stats();
            stats.duration.observe(timing.started.elapsed());
            let failed = match &answer {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .is_some_and(|status| status.as_bytes() != b"0"),
                Err(_) => true,
            };
            if failed {
                stats.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Poll::Ready(answer)
    }
}
