//! The one error type of DKVS, its mapping to gRPC status codes, and the
//! outcome of a write-like request it stands for.
//!
//! Every failure a caller can see is one of these variants, and
//! [`Error::code`] and [`Error::outcome`] are the only places that pick
//! status codes and outcomes (`From<Error> for tonic::Status` puts both on
//! the wire), so the same failure always reaches the user with the same
//! code, the same outcome and a message that says what to do about it.
//!
//! The outcome answers the one question a caller of a write must get right
//! before retrying: did it take effect? `not-applied` means certainly not
//! (retry freely); `unknown` means it may have, or may still, take effect
//! (read before retrying; never retry blindly). Only what was refused
//! before anything reached a replica is `not-applied`: once a write left
//! the coordinator, a replica may hold it even when the coordinator saw it
//! fail.

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Metadata key set on statuses produced by a DKVS coordinator (as opposed
/// to transport failures), so that a smart client knows whether trying
/// another node could help.
pub const COORDINATOR_ERROR_HEADER: &str = "dkvs-coordinator-error";

/// On a stale-layout refusal: the layout version the refusing node serves.
pub const LAYOUT_VERSION_HEADER: &str = "dkvs-layout-version";

/// Metadata key of the outcome of a write-like request: `applied`,
/// `not-applied` or `unknown` ([`Outcome`]). On a failure it travels with
/// the status (gRPC trailers); on a successful Put or Delete in the
/// response headers, because tonic 0.14 sends only `grpc-status` in the
/// trailers of a successful unary call (a tonic client sees headers and
/// trailers merged in the response's metadata either way).
pub const OUTCOME_HEADER: &str = "dkvs-outcome";

/// Whether a write-like request took effect (DESIGN.md, "Outcomes").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It took effect (acknowledged by W replicas).
    Applied,
    /// It certainly did not take effect, and will not: retrying is safe.
    NotApplied,
    /// It may have taken effect, or may still: read before retrying.
    Unknown,
}

impl Outcome {
    /// The wire name, as in the `dkvs-outcome` metadata.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::NotApplied => "not-applied",
            Outcome::Unknown => "unknown",
        }
    }

    /// The outcome a wire name stands for.
    pub fn from_name(name: &str) -> Option<Outcome> {
        [Outcome::Applied, Outcome::NotApplied, Outcome::Unknown]
            .into_iter()
            .find(|o| o.name() == name)
    }

    /// The outcome `metadata` carries, if any (and if it is one of ours).
    pub fn of(metadata: &MetadataMap) -> Option<Outcome> {
        Outcome::from_name(metadata.get(OUTCOME_HEADER)?.to_str().ok()?)
    }

    /// Sets the `dkvs-outcome` entry of `metadata` to this outcome.
    pub fn set_on(self, metadata: &mut MetadataMap) {
        metadata.insert(OUTCOME_HEADER, MetadataValue::from_static(self.name()));
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

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

    /// Too few replicas answered for the requested consistency. For a
    /// write, `sent` tells "refused before anything was sent" (too few
    /// replicas believed up: not applied) from "sent, and too few
    /// acknowledged" (a replica may hold it: outcome unknown).
    #[error(
        "{operation} failed at consistency {consistency}: {acks} of {needed} required replicas answered ({replicas} replicas for this key){}{}{}",
        format_roll_call(.roll_call, .sent),
        format_failures(.failures),
        format_write_outcome(.operation, .sent)
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
        /// Whether the request was sent to any replica. A write that was
        /// not (too few replicas believed up to reach the quorum) was
        /// refused and is not applied.
        sent: bool,
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

    /// A node could not be reached (smart client side), or refused the
    /// request before anything reached a replica: nothing took effect
    /// (outcome `not-applied`). On the client write path a failure after a
    /// write was sent is [`Error::QuorumNotReached`] with `sent`,
    /// [`Error::Superseded`] or [`Error::Indeterminate`] instead. Node-to-node
    /// paths (hint delivery, anti-entropy, a layout proposal that gave up)
    /// also use it after sending; no caller reads an outcome there yet.
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

    /// The node's data dir is at or over `--max-data-bytes`: a new value
    /// was refused (deletes still work); taken again once it is below.
    #[error("data quota reached: {0}")]
    QuotaReached(String),

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

    /// The caller did not say who it is, or what it said is not known here
    /// (no token, an unknown one, no node certificate where one is needed).
    #[error("{0}")]
    Unauthenticated(String),

    /// The caller is known but may not do this (a token's role too weak, a
    /// node certificate naming an address that is not a member).
    #[error("{0}")]
    PermissionDenied(String),

    /// A node's failure answer that no variant above stands for, as the
    /// smart client received it: the status code, its message, and the
    /// outcome the node reported (`None`: it said none).
    #[error("{message}")]
    Remote {
        /// The status code the node answered.
        code: Code,
        /// The status message.
        message: String,
        /// The node's `dkvs-outcome`, if it sent one.
        outcome: Option<Outcome>,
    },
}

impl Error {
    /// The gRPC status code of this error: the one mapping of errors to codes.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) | Error::ClockSkew(_) => Code::InvalidArgument,
            Error::QuorumNotReached { .. } | Error::Unavailable(_) => Code::Unavailable,
            Error::Superseded { .. } => Code::Aborted,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Indeterminate(_) => Code::Unknown,
            Error::CorruptRecord { .. } => Code::DataLoss,
            Error::DiskFull { .. } | Error::QuotaReached(_) => Code::ResourceExhausted,
            Error::Storage(_) | Error::Internal(_) => Code::Internal,
            Error::StaleLayout { .. } | Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Remote { code, .. } => *code,
        }
    }

    /// Whether the write-like request that failed with this error took
    /// effect, by DESIGN.md's table: refusals before anything reached a
    /// replica (bad input, too few replicas believed up, a stale layout or
    /// a change in progress) are not applied; everything after a write was
    /// sent (fewer than W acknowledgements, superseded, the deadline, a
    /// replica's full disk) and everything unexpected is unknown. A read
    /// has no outcome: its failures are served without one
    /// ([`Error::into_read_status`]).
    pub fn outcome(&self) -> Outcome {
        match self {
            Error::InvalidArgument(_)
            | Error::ClockSkew(_)
            | Error::Unavailable(_)
            | Error::StaleLayout { .. }
            | Error::FailedPrecondition(_)
            | Error::Unauthenticated(_)
            | Error::PermissionDenied(_)
            | Error::QuotaReached(_) => Outcome::NotApplied,
            Error::QuorumNotReached { sent: false, .. } => Outcome::NotApplied,
            Error::QuorumNotReached { sent: true, .. }
            | Error::Superseded { .. }
            | Error::DeadlineExceeded(_)
            | Error::Indeterminate(_)
            | Error::DiskFull { .. }
            | Error::CorruptRecord { .. }
            | Error::Storage(_)
            | Error::Internal(_) => Outcome::Unknown,
            Error::Remote { outcome, .. } => outcome.unwrap_or(Outcome::Unknown),
        }
    }

    /// The status for a failed read: code and message as for any error,
    /// without a `dkvs-outcome` (a read changes nothing; DESIGN's "—").
    pub fn into_read_status(self) -> Status {
        self.into_status(None)
    }

    /// The status for this error, with `outcome` in its metadata if given.
    fn into_status(self, outcome: Option<Outcome>) -> Status {
        let mut status = Status::new(self.code(), self.to_string());
        if let Error::StaleLayout { current, .. } = &self {
            status
                .metadata_mut()
                .insert(LAYOUT_VERSION_HEADER, MetadataValue::from(*current));
        }
        status
            .metadata_mut()
            .insert(COORDINATOR_ERROR_HEADER, MetadataValue::from_static("1"));
        if let Some(outcome) = outcome {
            outcome.set_on(status.metadata_mut());
        }
        status
    }
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

fn format_roll_call(roll: &RollCall, sent: &bool) -> String {
    let mut out = String::new();
    // Before anything was sent, the replicas the call would have waited
    // for were never asked.
    let waiting = if *sent { "not waited for" } else { "not sent" };
    for (label, list) in [
        ("answered", &roll.answered),
        ("not asked (believed down)", &roll.not_asked),
        (waiting, &roll.waiting),
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

/// What a failed write says about its outcome at the end of its message.
fn format_write_outcome(operation: &str, sent: &bool) -> &'static str {
    match (operation, *sent) {
        ("GET", _) => "",
        (_, false) => {
            "; nothing was sent to a replica (too few are believed up): not applied, safe to retry"
        }
        (_, true) => {
            "; it was sent, so it may or may not have been applied and may still take effect (outcome unknown: read the key before retrying)"
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The status of a failed request: [`Error::code`], the message, and the
/// `dkvs-outcome` of [`Error::outcome`] (a trailer on the wire).
impl From<Error> for Status {
    fn from(error: Error) -> Self {
        let outcome = error.outcome();
        error.into_status(Some(outcome))
    }
}

impl From<crate::clock::Refusal> for Error {
    fn from(refusal: crate::clock::Refusal) -> Self {
        match refusal {
            crate::clock::Refusal::Impossible(why) => Error::InvalidArgument(why),
            crate::clock::Refusal::BeyondBound(why) => Error::ClockSkew(why),
        }
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
            sent: true,
        });
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(
            status.message(),
            "PUT failed at consistency QUORUM: 1 of 2 required replicas answered (3 replicas for this key); \
             answered: 127.0.0.1:7001; not asked (believed down): 127.0.0.1:7004; \
             127.0.0.1:7002: connection refused; 127.0.0.1:7003: timed out after 1000 ms; \
             it was sent, so it may or may not have been applied and may still take effect \
             (outcome unknown: read the key before retrying)"
        );
        assert!(status.metadata().get(COORDINATOR_ERROR_HEADER).is_some());
        assert_eq!(Outcome::of(status.metadata()), Some(Outcome::Unknown));
    }

    /// A quorum error with `sent`, for `operation`.
    fn quorum_error(operation: &'static str, sent: bool) -> Error {
        Error::QuorumNotReached {
            operation,
            consistency: "QUORUM",
            acks: 0,
            needed: 2,
            replicas: 3,
            roll_call: Box::new(RollCall {
                answered: vec![],
                not_asked: vec!["127.0.0.1:7002".into(), "127.0.0.1:7003".into()],
                waiting: vec!["127.0.0.1:7001".into()],
            }),
            failures: vec![],
            sent,
        }
    }

    #[test]
    fn a_write_refused_before_sending_says_it_was_not_applied() {
        let status = Status::from(quorum_error("PUT", false));
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(Outcome::of(status.metadata()), Some(Outcome::NotApplied));
        assert_eq!(
            status.message(),
            "PUT failed at consistency QUORUM: 0 of 2 required replicas answered (3 replicas for this key); \
             not asked (believed down): 127.0.0.1:7002, 127.0.0.1:7003; not sent: 127.0.0.1:7001; \
             nothing was sent to a replica (too few are believed up): not applied, safe to retry"
        );
        // A read says nothing about an outcome, and is served without one.
        let read = quorum_error("GET", true);
        assert!(
            read.to_string().ends_with("not waited for: 127.0.0.1:7001"),
            "{read}"
        );
        assert_eq!(Outcome::of(read.into_read_status().metadata()), None);
    }

    /// Every variant's status code and outcome: DESIGN.md's "Outcomes" table.
    ///
    /// One piece: a table, one row per variant, read side by side with the
    /// one in DESIGN.md.
    #[test]
    fn every_error_has_its_code_and_outcome() {
        use Outcome::{NotApplied, Unknown};
        let version = crate::clock::Version {
            hlc: 1,
            instance_id: crate::clock::InstanceId(1),
        };
        let cases = [
            (
                Error::InvalidArgument("bad".into()),
                Code::InvalidArgument,
                NotApplied,
            ),
            (
                Error::ClockSkew("ahead".into()),
                Code::InvalidArgument,
                NotApplied,
            ),
            (quorum_error("PUT", false), Code::Unavailable, NotApplied),
            (quorum_error("DELETE", true), Code::Unavailable, Unknown),
            (
                Error::Superseded {
                    operation: "PUT",
                    key: "k".into(),
                    version,
                    above: version,
                    acks: 1,
                },
                Code::Aborted,
                Unknown,
            ),
            (
                Error::DeadlineExceeded("late".into()),
                Code::DeadlineExceeded,
                Unknown,
            ),
            (Error::Indeterminate("maybe".into()), Code::Unknown, Unknown),
            (
                Error::Unavailable("refused".into()),
                Code::Unavailable,
                NotApplied,
            ),
            (Error::Storage("io".into()), Code::Internal, Unknown),
            (
                Error::DiskFull {
                    dir: "/d".into(),
                    why: "full".into(),
                },
                Code::ResourceExhausted,
                Unknown,
            ),
            (
                Error::CorruptRecord {
                    key: "k".into(),
                    why: "crc".into(),
                },
                Code::DataLoss,
                Unknown,
            ),
            (Error::Internal("bug".into()), Code::Internal, Unknown),
            (
                Error::StaleLayout {
                    caller: 1,
                    current: 2,
                },
                Code::FailedPrecondition,
                NotApplied,
            ),
            (
                Error::FailedPrecondition("a join is in progress".into()),
                Code::FailedPrecondition,
                NotApplied,
            ),
            (
                Error::Remote {
                    code: Code::ResourceExhausted,
                    message: "quota".into(),
                    outcome: Some(NotApplied),
                },
                Code::ResourceExhausted,
                NotApplied,
            ),
            (
                Error::Remote {
                    code: Code::PermissionDenied,
                    message: "no".into(),
                    outcome: None,
                },
                Code::PermissionDenied,
                Unknown,
            ),
        ];
        for (error, code, outcome) in cases {
            let what = format!("{error:?}");
            assert_eq!((error.code(), error.outcome()), (code, outcome), "{what}");
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{what}");
            let sent = status.metadata().get(OUTCOME_HEADER).map(|v| v.as_bytes());
            assert_eq!(sent, Some(outcome.name().as_bytes()), "{what}");
        }
    }

    #[test]
    fn outcomes_have_their_wire_names() {
        for (outcome, name) in [
            (Outcome::Applied, "applied"),
            (Outcome::NotApplied, "not-applied"),
            (Outcome::Unknown, "unknown"),
        ] {
            assert_eq!(outcome.name(), name);
            assert_eq!(Outcome::from_name(name), Some(outcome));
            let mut metadata = MetadataMap::new();
            outcome.set_on(&mut metadata);
            assert_eq!(Outcome::of(&metadata), Some(outcome));
        }
        assert_eq!(Outcome::from_name("maybe"), None);
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
