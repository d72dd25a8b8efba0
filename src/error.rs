//! The one error type of DKVS and its mapping to gRPC status codes.
//!
//! Every failure a caller can see is one of these variants, and
//! `From<Error> for tonic::Status` is the only place that picks status codes,
//! so the same failure always reaches the user with the same code and a
//! message that says what to do about it.

use tonic::{Code, Status};

/// Metadata key set on statuses produced by a DKVS coordinator (as opposed
/// to transport failures), so that a smart client knows whether trying
/// another node could help.
pub const COORDINATOR_ERROR_HEADER: &str = "dkvs-coordinator-error";

/// On a stale-layout refusal: the layout version the refusing node serves.
pub const LAYOUT_VERSION_HEADER: &str = "dkvs-layout-version";

/// The layout version a FAILED_PRECONDITION stale-layout status carries.
pub fn stale_layout_of(status: &Status) -> Option<u64> {
    if status.code() != Code::FailedPrecondition {
        return None;
    }
    status
        .metadata()
        .get(LAYOUT_VERSION_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something DKVS does not accept.
    #[error("{0}")]
    InvalidArgument(String),

    /// Too few replicas answered for the requested consistency.
    #[error(
        "{operation} failed at consistency {consistency}: {acks} of {needed} required replicas answered ({replicas} replicas for this key){}{}",
        format_roll_call(.roll_call),
        format_failures(.failures)
    )]
    QuorumNotReached {
        /// PUT, GET or DELETE.
        operation: &'static str,
        /// The consistency level asked for.
        consistency: &'static str,
        /// Replicas that answered (for writes: that hold the write).
        acks: usize,
        /// Replicas that had to answer.
        needed: usize,
        /// Replicas of the key.
        replicas: usize,
        /// Where each replica stood when the quorum became out of reach.
        roll_call: Box<RollCall>,
        /// Why the replicas that were asked and failed did, one line each.
        failures: Vec<String>,
    },

    /// A concurrent write with a newer version overtook this one after some
    /// replica may have stored it: it is not re-stamped (that would put one
    /// value under two versions), and fails. It may stay visible until the
    /// newer write reaches every replica, ordered before it.
    #[error(
        "{operation} of {key:?} was overtaken by a concurrent write: a replica holds newer version {above}, \
         and this write ({version}) reached {acks} replica(s); it may or may not be visible, ordered before the newer write. \
         Read the key to see which value won"
    )]
    Superseded {
        /// PUT or DELETE.
        operation: &'static str,
        /// The key written.
        key: String,
        /// This write's version.
        version: crate::clock::Version,
        /// The newer version a replica holds.
        above: crate::clock::Version,
        /// Replicas known to hold this write.
        acks: usize,
    },

    /// A version further ahead of this node's wall clock than
    /// `--max-clock-skew-ms` (but not impossibly far): INVALID_ARGUMENT to
    /// a caller, yet not a final refusal between nodes — a clock may be
    /// off and catch up — so a replica batch reports it as a failure (a
    /// hint is kept and waits) rather than a rejection (dropped).
    #[error("{0}")]
    ClockSkew(String),

    /// The request did not finish in time.
    #[error("{0}")]
    DeadlineExceeded(String),

    /// A write's outcome is unknown: the request may have reached a
    /// coordinator (it timed out or the connection broke after it was sent),
    /// so it may or may not have been applied, and may still take effect
    /// later. The smart client never sends such a write to a second
    /// coordinator; the caller decides whether to retry (a retry is a new
    /// write with a new version). gRPC code UNKNOWN: neither success nor a
    /// definite failure.
    #[error("{0}")]
    Indeterminate(String),

    /// A node could not be reached (smart client side).
    #[error("{0}")]
    Unavailable(String),

    /// The local storage engine failed; the node's data directory needs attention.
    #[error("storage error: {0}")]
    Storage(String),

    /// The disk of the data dir is full: this write was refused, nothing
    /// else changed; writes are taken again once there is space.
    #[error(
        "the disk of data dir {dir} is full ({why}); the write was refused. Free space there and retry"
    )]
    DiskFull { dir: String, why: String },

    /// A stored record could not be decoded; another replica's copy will
    /// replace it on the next write or repair.
    #[error("corrupt record for key {key:?}: {why}")]
    CorruptRecord { key: String, why: String },

    /// A bug or an impossible state; the message says which.
    #[error("internal error: {0}")]
    Internal(String),

    /// The caller placed this request with an older layout than the node
    /// serves: fetch the newer layout (`Membership.GetLayout`) and retry.
    #[error(
        "stale layout: the request was placed with layout v{caller}, this node serves v{current}; fetch the newer layout and retry"
    )]
    StaleLayout { caller: u64, current: u64 },

    /// The request cannot run in the cluster's current state (a layout
    /// change refused, say); the message says why.
    #[error("{0}")]
    FailedPrecondition(String),
}

/// The replicas of a failed quorum call by what they did, with addresses,
/// so a message never names only the dead ones.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RollCall {
    /// Answered (for writes: hold the write).
    pub answered: Vec<String>,
    /// Not asked: believed down by the failure detector.
    pub not_asked: Vec<String>,
    /// Asked, and had not answered when the quorum became out of reach
    /// (alive as far as this node knows: it was not waited for).
    pub waiting: Vec<String>,
}

fn format_roll_call(roll: &RollCall) -> String {
    let mut out = String::new();
    for (label, list) in [
        ("answered", &roll.answered),
        ("not asked (believed down)", &roll.not_asked),
        ("not waited for", &roll.waiting),
    ] {
        if !list.is_empty() {
            out.push_str(&format!("; {label}: {}", list.join(", ")));
        }
    }
    out
}

fn format_failures(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!("; {}", failures.join("; "))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let code = match &error {
            Error::InvalidArgument(_) | Error::ClockSkew(_) => Code::InvalidArgument,
            Error::QuorumNotReached { .. } | Error::Unavailable(_) => Code::Unavailable,
            Error::Superseded { .. } => Code::Aborted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Indeterminate(_) => Code::Unknown,
            Error::CorruptRecord { .. } => Code::DataLoss,
            Error::DiskFull { .. } => Code::ResourceExhausted,
            Error::Storage(_) | Error::Internal(_) => Code::Internal,
            Error::StaleLayout { .. } | Error::FailedPrecondition(_) => Code::FailedPrecondition,
        };
        let mut status = Status::new(code, error.to_string());
        if let Error::StaleLayout { current, .. } = &error {
            status.metadata_mut().insert(
                LAYOUT_VERSION_HEADER,
                tonic::metadata::MetadataValue::from(*current),
            );
        }
        status.metadata_mut().insert(
            COORDINATOR_ERROR_HEADER,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        status
    }
}

impl From<fjall::Error> for Error {
    fn from(error: fjall::Error) -> Self {
        Error::Storage(error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quorum_errors_say_who_answered_and_why_others_did_not() {
        let status = Status::from(Error::QuorumNotReached {
            operation: "PUT",
            consistency: "QUORUM",
            acks: 1,
            needed: 2,
            replicas: 3,
            roll_call: Box::new(RollCall {
                answered: vec!["127.0.0.1:7001".into()],
                not_asked: vec!["127.0.0.1:7004".into()],
                waiting: vec![],
            }),
            failures: vec![
                "127.0.0.1:7002: connection refused".into(),
                "127.0.0.1:7003: timed out after 1000 ms".into(),
            ],
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "PUT failed at consistency QUORUM: 1 of 2 required replicas answered (3 replicas for this key); \
             answered: 127.0.0.1:7001; not asked (believed down): 127.0.0.1:7004; \
             127.0.0.1:7002: connection refused; 127.0.0.1:7003: timed out after 1000 ms"
        );
        assert!(status.metadata().get(COORDINATOR_ERROR_HEADER).is_some());
    }

    #[test]
    fn indeterminate_writes_are_unknown() {
        let status = Status::from(Error::Indeterminate(
            "PUT may or may not have been applied".into(),
        ));
        assert_eq!(status.code(), Code::Unknown);
    }

    #[test]
    fn a_full_disk_is_resource_exhausted_naming_the_data_dir() {
        let status = Status::from(Error::DiskFull {
            dir: "/var/dkvs/log".into(),
            why: "No space left on device (os error 28)".into(),
        });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert!(
            status.message().contains("/var/dkvs/log"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn caller_mistakes_are_invalid_argument() {
        let status = Status::from(Error::InvalidArgument("key is empty".into()));
        assert_eq!(status.code(), Code::InvalidArgument);
    }
}
