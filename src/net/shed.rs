//! Honouring a node's load shedding: a request it refused because a budget
//! was spent (UNAVAILABLE, `not-applied`, a `retry-after-ms` hint) did
//! nothing, so it is sent again after the hint, jittered, while its caller
//! still waits. So is one HTTP/2 itself refused (REFUSED_STREAM: the
//! server had more streams open than it allows, which happens when a
//! client opens a stream just as the server's count of an answered one has
//! not yet dropped): by the protocol, no work was done.

use std::time::Duration;

use crate::error::Outcome;

/// The trailer a shedding node sets (see `node::load`).
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";

/// The longest wait a hint can ask for.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// The wait after an HTTP/2 REFUSED_STREAM.
const REFUSED_STREAM_WAIT: Duration = Duration::from_millis(10);

/// The wait a node asked for when it shed this request, if it did.
pub fn shed_wait(status: &tonic::Status) -> Option<Duration> {
    if refused_stream(status) {
        return Some(REFUSED_STREAM_WAIT);
    }
    if status.code() != tonic::Code::Unavailable
        || Outcome::of(status.metadata()) != Some(Outcome::NotApplied)
    {
        return None;
    }
    let ms: u64 = status
        .metadata()
        .get(RETRY_AFTER_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(Duration::from_millis(ms).min(MAX_WAIT))
}

/// Whether HTTP/2 refused the call's stream before any work
/// (REFUSED_STREAM from the server).
pub fn refused_stream(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = error.source();
    }
    false
}

/// The least time worth sending a request again with after a shed
/// refusal: a node refuses a write whose `grpc-timeout` leaves it no time.
const MIN_ATTEMPT: Duration = Duration::from_millis(20);

/// Sends a request by `call` until it is answered with anything but a
/// shed refusal, within `budget` in all: each attempt is given what is
/// left of it (the argument), and the pause a refusal asks for (jittered)
/// comes out of it too. `None`: no answer within the budget.
pub async fn call_until_not_shed<T, F, Fut>(
    budget: Duration,
    mut call: F,
) -> Option<Result<T, tonic::Status>>
where
    F: FnMut(Duration) -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let started = tokio::time::Instant::now();
    loop {
        let left = budget.saturating_sub(started.elapsed());
        let answer = tokio::time::timeout(left, call(left)).await.ok()?;
        let wait = match &answer {
            Err(status) => shed_wait(status).map(jittered),
            Ok(_) => None,
        };
        match wait {
            Some(wait) if started.elapsed() + wait + MIN_ATTEMPT < budget => {
                tokio::time::sleep(wait).await;
            }
            _ => return Some(answer),
        }
    }
}

/// `wait`, jittered to between half and one and a half of it, so callers
/// refused together do not come back together.
pub fn jittered(wait: Duration) -> Duration {
    let spread = (crate::seams::random_u64() % 1001) as f64 / 1000.0;
    wait.mul_f64(0.5 + spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shed(ms: &str) -> tonic::Status {
        let mut status = tonic::Status::unavailable("node overloaded");
        Outcome::NotApplied.set_on(status.metadata_mut());
        status
            .metadata_mut()
            .insert(RETRY_AFTER_HEADER, ms.parse().expect("ascii"));
        status
    }

    #[test]
    fn only_a_shed_request_is_retried_and_waits_are_bounded() {
        assert_eq!(shed_wait(&shed("50")), Some(Duration::from_millis(50)));
        assert_eq!(shed_wait(&shed("99999999")), Some(MAX_WAIT));
        assert_eq!(shed_wait(&shed("soon")), None);
        // Without not-applied, it may have been done: never retried.
        let mut unknown = shed("50");
        Outcome::Unknown.set_on(unknown.metadata_mut());
        assert_eq!(shed_wait(&unknown), None);
        assert_eq!(shed_wait(&tonic::Status::unavailable("down")), None);
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        for _ in 0..100 {
            let wait = jittered(Duration::from_millis(100));
            assert!((50..=150).contains(&wait.as_millis()), "{wait:?}");
        }
    }
}
