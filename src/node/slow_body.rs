//! A bound on how long a request's body may take to arrive
//! (`--request-body-timeout-ms`).
//!
//! HTTP/2 lets a caller send a request's headers and then trickle its body
//! a byte at a time, or never finish it: each such request holds a stream,
//! a task and a buffer on the node for as long as the caller likes. gRPC
//! deadlines do not help (the caller chooses them, or sends none), nor do
//! HTTP/2 keepalives (the connection is alive), and tonic's
//! `Server::timeout` bounds the whole call, which would also cut the long
//! answers of `StreamRecords`. So each request body gets a deadline counted
//! from its headers: a body not complete by then fails with
//! DEADLINE_EXCEEDED naming the flag (not CANCELLED: tonic reads a
//! request body that fails with CANCELLED as one that ended, and would
//! answer "Missing request message"), tonic answers the call with that
//! status before any handler ran (a Put or Delete so refused says
//! `dkvs-outcome: not-applied`), and the stream is reset. Bodies that arrive whole with
//! their headers (nearly all) never arm a timer.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// Wraps every request body in a [`TimedBody`] with `timeout`.
#[derive(Clone, Copy, Debug)]
pub struct SlowBodyLayer {
    /// How long a body may take, from the request's headers.
    pub timeout: Duration,
}

impl<S> tower::Layer<S> for SlowBodyLayer {
    type Service = SlowBody<S>;

    fn layer(&self, inner: S) -> SlowBody<S> {
        SlowBody {
            inner,
            timeout: self.timeout,
        }
    }
}

/// The service [`SlowBodyLayer`] wraps around the router.
#[derive(Clone, Debug)]
pub struct SlowBody<S> {
    /// The router (and the layers inside this one).
    inner: S,
    /// See [`SlowBodyLayer::timeout`].
    timeout: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for SlowBody<S>
where
    S: tower::Service<http::Request<tonic::body::Body>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> S::Future {
        let timeout = self.timeout;
        let deadline = Instant::now() + timeout;
        self.inner.call(request.map(|body| {
            tonic::body::Body::new(TimedBody {
                body: Box::pin(body),
                deadline,
                timeout,
                timer: None,
                done: false,
            })
        }))
    }
}

/// A request body that fails once its deadline passes before its end.
struct TimedBody<B> {
    /// The body as it arrives.
    body: Pin<Box<B>>,
    /// When the body must be complete.
    deadline: Instant,
    /// The flag's value (for the message).
    timeout: Duration,
    /// Armed the first time the body is not ready: most bodies never wait.
    timer: Option<Pin<Box<Sleep>>>,
    /// The body ended (or failed): the deadline no longer applies.
    done: bool,
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.body.as_mut().poll_frame(cx) {
            Poll::Ready(frame) => {
                if !matches!(frame, Some(Ok(_))) {
                    self.done = true;
                    self.timer = None;
                }
                return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
            }
            Poll::Pending => {}
        }
        let deadline = self.deadline;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.done = true;
        self.timer = None;
        let timeout_ms = self.timeout.as_millis();
        tracing::warn!(
            timeout_ms,
            "dropped a request whose body arrived too slowly"
        );
        Poll::Ready(Some(Err(Box::new(tonic::Status::deadline_exceeded(
            format!(
                "the request body did not arrive within {timeout_ms} ms of its headers (--request-body-timeout-ms)"
            ),
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    /// A body that sends one frame, then nothing, forever.
    fn stalled() -> http_body_util::StreamBody<
        futures::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>,
    > {
        let first = futures::stream::iter([Ok(Frame::data(Bytes::from_static(b"abc")))]);
        let stream = futures::StreamExt::chain(first, futures::stream::pending());
        http_body_util::StreamBody::new(futures::StreamExt::boxed(stream))
    }

    fn timed<B>(body: B, timeout: Duration) -> TimedBody<B> {
        TimedBody {
            body: Box::pin(body),
            deadline: Instant::now() + timeout,
            timeout,
            timer: None,
            done: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_at_its_deadline_naming_the_flag() {
        let started = Instant::now();
        let mut body = timed(stalled(), Duration::from_millis(500));
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"abc")));
        let error = body
            .frame()
            .await
            .expect("an error")
            .expect_err("timed out");
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        let status = error.downcast::<tonic::Status>().expect("a status");
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert!(
            status.message().contains("--request-body-timeout-ms"),
            "{status}"
        );
        assert!(body.frame().await.is_none(), "nothing after the failure");
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_body_passes_and_never_arms_a_timer() {
        let whole = http_body_util::Full::new(Bytes::from_static(b"whole"));
        let mut body = timed(whole, Duration::from_millis(1));
        tokio::time::advance(Duration::from_secs(5)).await;
        let frame = body.frame().await.expect("a frame").expect("data");
        assert_eq!(frame.into_data().ok(), Some(Bytes::from_static(b"whole")));
        assert!(body.frame().await.is_none());
        assert!(body.timer.is_none());
    }
}
