//! Client writes a node forwards to their keys' first live replicas
//! (`Replica.ForwardWrites`), batched per peer as replica calls are (see
//! [`super::pipe`]): under load one RPC carries many forwards, which is
//! what keeps the extra hop of a write that entered at the wrong node
//! cheap. The receiver coordinates each write of a batch concurrently,
//! each within its own deadline, and answers each in order.
//!
//! What a forward's caller learns ([`ForwardFailure`]) is exact about
//! whether the write may have been applied: a batch that provably never
//! reached a handler (no connection, canceled before sending, refused by
//! the receiver's gate or load shedding, an unknown call) was not taken,
//! and its writes may be coordinated elsewhere; once a batch may have been
//! taken, each write's answer (with its outcome) is final, and no answer in
//! time is `unknown`.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::pipe::{Batched, PIPE_CAPACITY, run_batches};
use super::{PeerChannel, describe_status};
use crate::error::{Error, Outcome};
use crate::pb;
use crate::pb::replica_client::ReplicaClient;
use crate::quorum::{Consistency, WriteAck};

/// Forward batches in flight to one peer at once: each waits for its
/// slowest write round, so more than a replica pipe's.
const FORWARD_BATCHES_IN_FLIGHT: usize = 8;

/// A client write one node hands to the key's first live replica.
#[derive(Clone, Debug)]
pub struct ForwardedWrite {
    pub key: String,
    /// `None` for a delete.
    pub value: Option<bytes::Bytes>,
    pub consistency: Consistency,
    /// The layout version the forwarder placed the key with.
    pub layout_version: u64,
}

/// Why a forwarded write has no acknowledgement.
#[derive(Debug)]
pub enum ForwardFailure {
    /// Provably not applied by the receiver, nor ever to be: the request
    /// never left this node, or the receiver refused it before any handler
    /// ran. The forwarder may coordinate the write itself.
    NotTaken(String),
    /// The receiver's answer, with the outcome it reported (unknown when it
    /// reported none), or no answer in time (unknown): the forwarder's
    /// answer to its client.
    Answered(Error),
}

type ForwardAnswer = oneshot::Sender<Result<WriteAck, ForwardFailure>>;

/// One forward waiting in a pipe.
pub(super) struct ForwardItem {
    write: ForwardedWrite,
    /// When its caller stops waiting.
    deadline: Instant,
    answer: ForwardAnswer,
}

impl Batched for ForwardItem {
    fn value_bytes(&self) -> usize {
        self.write.value.as_ref().map_or(0, |v| v.len())
    }

    fn abandoned(&self) -> bool {
        self.answer.is_closed()
    }
}

/// Forwards to one peer, batched.
pub struct ForwardPipe {
    /// The peer's address, for messages.
    to: String,
    queue: mpsc::Sender<ForwardItem>,
}

impl ForwardPipe {
    pub(super) fn start(client: ReplicaClient<PeerChannel>, to: &str) -> Self {
        let (queue, incoming) = mpsc::channel::<ForwardItem>(PIPE_CAPACITY);
        let peer = to.to_string();
        tokio::spawn(run_batches(
            incoming,
            FORWARD_BATCHES_IN_FLIGHT,
            move |batch| send_forwards(client.clone(), peer.clone(), batch),
        ));
        Self {
            to: to.to_string(),
            queue,
        }
    }

    /// Forwards `write`, waiting at most `budget` for its answer.
    pub(super) async fn forward(
        &self,
        write: ForwardedWrite,
        budget: Duration,
    ) -> Result<WriteAck, ForwardFailure> {
        let deadline = Instant::now() + budget;
        let (answer, answered) = oneshot::channel();
        let item = ForwardItem {
            write,
            deadline,
            answer,
        };
        if self.queue.send(item).await.is_err() {
            return Err(ForwardFailure::NotTaken(format!(
                "the pipe to {} is closed",
                self.to
            )));
        }
        // The receiver answers within the deadline; the caller's own timer
        // for it (which says more) goes off first.
        match tokio::time::timeout_at(deadline + ANSWER_SLACK, answered).await {
            Ok(Ok(result)) => result,
            // The batch's task ended without answering (the node stops).
            Ok(Err(_)) => Err(ForwardFailure::Answered(Error::Indeterminate(format!(
                "the forward to {} ended without an answer: it may or may not have been applied",
                self.to
            )))),
            Err(_) => Err(no_answer_in_time(&self.to, budget)),
        }
    }
}

fn no_answer_in_time(to: &str, waited: Duration) -> ForwardFailure {
    ForwardFailure::Answered(Error::DeadlineExceeded(format!(
        "no answer within {} ms from {to}, the key's first replica, which this node forwarded \
         it to: it may or may not have been applied",
        waited.as_millis()
    )))
}

/// Sends one batch of forwards and hands each caller its answer.
async fn send_forwards(
    mut client: ReplicaClient<PeerChannel>,
    to: String,
    batch: Vec<ForwardItem>,
) {
    let now = Instant::now();
    let wall = crate::clock::wall_clock_ms();
    let mut writes = Vec::with_capacity(batch.len());
    let mut answers = Vec::with_capacity(batch.len());
    let mut longest = Duration::ZERO;
    for item in batch {
        let left = item.deadline.saturating_duration_since(now);
        if left < MIN_LEFT {
            let _ = item.answer.send(Err(no_answer_in_time(&to, left)));
            continue;
        }
        longest = longest.max(left);
        let left_ms = left.as_millis().min(u32::MAX as u128) as u32;
        writes.push(pb::ForwardedWrite {
            key: item.write.key,
            value: item.write.value,
            consistency: pb::Consistency::from(item.write.consistency) as i32,
            layout_version: item.write.layout_version,
            timeout_ms: left_ms,
            deadline_unix_ms: wall.saturating_add(u64::from(left_ms)),
        });
        answers.push(item.answer);
    }
    if answers.is_empty() {
        return;
    }
    // Each write's deadline is its own (the receiver bounds each by it);
    // the batch as a whole waits a little longer, so that a caller's own
    // timer, which says more, answers a write that ran out.
    let mut request = tonic::Request::new(pb::ForwardWritesRequest { writes });
    request.set_timeout(longest + ANSWER_SLACK);
    let sent = tokio::time::timeout(longest + ANSWER_SLACK, client.forward_writes(request)).await;
    let reply = match sent {
        Ok(Ok(reply)) => reply.into_inner(),
        Ok(Err(status)) => {
            for answer in answers {
                let _ = answer.send(Err(batch_failure(&status, &to, longest)));
            }
            return;
        }
        Err(_) => {
            for answer in answers {
                let _ = answer.send(Err(no_answer_in_time(&to, longest)));
            }
            return;
        }
    };
    let mut results = reply.results.into_iter();
    for answer in answers {
        let _ = answer.send(result_of(results.next(), &to));
    }
}

/// How much longer than a forward's deadline its caller's answer is
/// waited for.
const ANSWER_SLACK: Duration = Duration::from_millis(20);

/// Less time than this left for a forward: not sent (the caller is about to
/// give up).
const MIN_LEFT: Duration = Duration::from_millis(2);

/// What a failed batch call means for each of its writes.
fn batch_failure(status: &tonic::Status, to: &str, waited: Duration) -> ForwardFailure {
    if super::never_sent(status)
        || super::shed::shed_wait(status).is_some()
        || refused_before_any_handler(status)
    {
        return ForwardFailure::NotTaken(format!("{to}: {}", describe_status(status)));
    }
    // tonic's own timer for the call's grpc-timeout.
    if super::is_tonic_timeout(status) {
        return no_answer_in_time(to, waited);
    }
    ForwardFailure::Answered(Error::Remote {
        code: status.code(),
        message: format!("{} (forwarded to {to})", status.message()),
        outcome: Some(Outcome::of(status.metadata()).unwrap_or(Outcome::Unknown)),
    })
}

/// One write's answer in a batch reply (`None`: the reply has none for it).
fn result_of(
    result: Option<pb::ForwardedWriteResult>,
    to: &str,
) -> Result<WriteAck, ForwardFailure> {
    let bad = |why: String| {
        ForwardFailure::Answered(Error::Indeterminate(format!(
            "{to}, which coordinated it, answered badly ({why}): it may or may not have been applied"
        )))
    };
    let Some(result) = result else {
        return Err(bad("the answer is missing this write".into()));
    };
    if let Some(ack) = result.ack {
        return pb::write_ack(ack.version, ack.acks).map_err(|e| bad(e.to_string()));
    }
    let code = tonic::Code::from(result.code);
    if code == tonic::Code::Ok {
        return Err(bad("neither an acknowledgement nor an error".into()));
    }
    Err(ForwardFailure::Answered(Error::Remote {
        code,
        message: format!("{} (coordinated by {to})", result.message),
        outcome: Some(Outcome::from_name(&result.outcome).unwrap_or(Outcome::Unknown)),
    }))
}

/// Whether a node refused a call before any handler ran: it has no such
/// method (an older release), or its gate does not admit this node.
fn refused_before_any_handler(status: &tonic::Status) -> bool {
    let not_applied = Outcome::of(status.metadata()) == Some(Outcome::NotApplied);
    match status.code() {
        tonic::Code::Unimplemented => status
            .metadata()
            .get(crate::error::COORDINATOR_ERROR_HEADER)
            .is_none(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => not_applied,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, outcome: Option<Outcome>) -> tonic::Status {
        let mut status = tonic::Status::new(code, "refused");
        if let Some(outcome) = outcome {
            outcome.set_on(status.metadata_mut());
        }
        status
    }

    fn not_taken(failure: &ForwardFailure) -> bool {
        matches!(failure, ForwardFailure::NotTaken(_))
    }

    fn outcome(failure: &ForwardFailure) -> Option<Outcome> {
        match failure {
            ForwardFailure::NotTaken(_) => None,
            ForwardFailure::Answered(error) => Some(error.outcome()),
        }
    }

    #[test]
    fn only_a_batch_no_handler_took_is_coordinated_elsewhere() {
        let waited = Duration::from_millis(100);
        use tonic::Code;
        // The gate refused the forwarder, or the call is unknown there.
        for code in [Code::PermissionDenied, Code::Unauthenticated] {
            let refused = status(code, Some(Outcome::NotApplied));
            assert!(not_taken(&batch_failure(&refused, "b", waited)));
            // Without the gate's not-applied, it may have been a handler's.
            let unsure = status(code, None);
            assert_eq!(
                outcome(&batch_failure(&unsure, "b", waited)),
                Some(Outcome::Unknown)
            );
        }
        assert!(not_taken(&batch_failure(
            &status(Code::Unimplemented, None),
            "b",
            waited
        )));
        // Anything else after the batch may have left: its outcome, or
        // unknown.
        let failed = batch_failure(&status(Code::Unavailable, None), "b", waited);
        assert_eq!(outcome(&failed), Some(Outcome::Unknown));
        let invalid = status(Code::InvalidArgument, Some(Outcome::NotApplied));
        assert_eq!(
            outcome(&batch_failure(&invalid, "b", waited)),
            Some(Outcome::NotApplied)
        );
        let timer = tonic::Status::cancelled("Timeout expired");
        let timed_out = batch_failure(&timer, "b", waited);
        assert!(matches!(
            timed_out,
            ForwardFailure::Answered(Error::DeadlineExceeded(_))
        ));
    }

    #[test]
    fn each_write_gets_its_own_answer_and_a_missing_one_is_unknown() {
        let ack = pb::ForwardedWriteResult {
            ack: Some(pb::ForwardedWriteAck {
                version: Some(crate::clock::Version::new(1 << 20, 7).into()),
                acks: 2,
            }),
            ..Default::default()
        };
        let acked = result_of(Some(ack), "b").expect("applied");
        assert_eq!(acked.acks, 2);
        let refused = pb::ForwardedWriteResult {
            ack: None,
            code: tonic::Code::Unavailable as i32,
            message: "too few replicas".into(),
            outcome: "not-applied".into(),
        };
        let refused = result_of(Some(refused), "b").expect_err("refused");
        assert_eq!(outcome(&refused), Some(Outcome::NotApplied));
        for bad in [
            None,
            Some(pb::ForwardedWriteResult::default()),
            Some(pb::ForwardedWriteResult {
                ack: None,
                code: tonic::Code::Aborted as i32,
                message: "superseded".into(),
                outcome: "perhaps".into(),
            }),
            Some(pb::ForwardedWriteResult {
                ack: Some(pb::ForwardedWriteAck {
                    version: None,
                    acks: 2,
                }),
                ..Default::default()
            }),
        ] {
            let failure = result_of(bad.clone(), "b").expect_err("not an acknowledgement");
            assert_eq!(outcome(&failure), Some(Outcome::Unknown), "{bad:?}");
        }
    }
}
