//! A tower layer that lets a request reach the services only when a rule
//! admits it, and otherwise answers the rule's status at once (no handler
//! runs). The access gate (credentials) and the cluster gate (cluster ids)
//! are two such rules.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A rule a request must pass before any handler runs.
pub(super) trait Admit: Clone {
    /// Admits `request` (it may tag it for the handler), or answers why not.
    fn admit<B>(&self, request: &mut http::Request<B>) -> Result<(), tonic::Status>;
}

/// Wraps the services in a [`Gate`] applying `rule`.
#[derive(Clone)]
pub(super) struct GateLayer<R>(pub(super) R);

impl<S, R: Clone> tower::Layer<S> for GateLayer<R> {
    type Service = Gate<S, R>;

    fn layer(&self, inner: S) -> Gate<S, R> {
        Gate {
            inner,
            rule: self.0.clone(),
        }
    }
}

/// The service [`GateLayer`] wraps around the router.
#[derive(Clone)]
pub(super) struct Gate<S, R> {
    inner: S,
    rule: R,
}

impl<S, R, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Gate<S, R>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    R: Admit,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        match self.rule.admit(&mut request) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(refusal) => {
                let response = refusal.into_http::<ResBody>();
                Box::pin(async move { Ok(response) })
            }
        }
    }
}
