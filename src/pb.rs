//! Generated protobuf types, and their conversion to and from domain types.
//!
//! Protobuf types stay at the edge: requests are converted (and validated)
//! here on arrival, and a missing or malformed field becomes
//! `INVALID_ARGUMENT` with a message naming it.
//!
//! Every version that arrives from the network — in a replica write or
//! batch, a stored hint, a read result, an anti-entropy listing, a write's
//! answer, a heartbeat — becomes a domain [`clock::Version`] only through
//! [`version_from`] or [`record_from`], which refuse one further ahead of the
//! wall clock than `--max-clock-skew-ms`. There is deliberately no `From`
//! for it: one bogus version merged into clocks and spread by repair would
//! stop every write in the cluster.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("dkvs.v1");

/// Encoded descriptors of `dkvs.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dkvs_descriptor");

use crate::clock;
use crate::error::Error;
use crate::quorum;
use crate::record;
use crate::replica;

impl From<clock::Version> for Version {
    fn from(v: clock::Version) -> Self {
        Self {
            lamport: v.hlc,
            node_id: v.instance_id.0,
        }
    }
}

/// A version from the network, within `bound`; `what` names the field
/// in the error.
pub fn version_from(
    v: Option<Version>,
    bound: clock::SkewBound,
    what: &str,
) -> Result<clock::Version, Error> {
    let v = v.ok_or_else(|| Error::InvalidArgument(format!("{what} is required")))?;
    let version = clock::Version::new(v.lamport, v.node_id);
    bound.refuse_now(version, &format!("{what}: "))?;
    Ok(version)
}

impl From<&record::Record> for Record {
    fn from(r: &record::Record) -> Self {
        Self {
            version: Some(r.version.into()),
            tombstone: r.is_tombstone(),
            value: r.value.clone().unwrap_or_default(),
            deleted_at_ms: r.deleted_at_ms,
        }
    }
}

/// A version a coordinator reported to the smart client, to show or
/// compare, never to store or merge into a clock (the client has none), so
/// it is not checked against the client's own clock.
pub fn reported_version(v: Option<Version>, what: &str) -> Result<clock::Version, Error> {
    let v = v.ok_or_else(|| Error::Internal(format!("the coordinator answered without {what}")))?;
    Ok(clock::Version::new(v.lamport, v.node_id))
}

/// A record from the network, its version within `bound`.
pub fn record_from(r: Record, bound: clock::SkewBound) -> Result<record::Record, Error> {
    let version = version_from(r.version, bound, "record.version")?;
    if r.tombstone {
        if !r.value.is_empty() {
            return Err(Error::InvalidArgument(
                "a tombstone record must not carry a value".into(),
            ));
        }
        Ok(record::Record::tombstone_at(version, r.deleted_at_ms))
    } else {
        Ok(record::Record::value(version, r.value))
    }
}

/// Reads the consistency field of a read request: ANY is refused.
pub fn read_consistency_from(raw: i32) -> Result<quorum::Consistency, Error> {
    match consistency_from(raw)? {
        quorum::Consistency::Any => Err(Error::InvalidArgument(
            "consistency ANY applies to writes only; read at ONE, QUORUM or ALL".into(),
        )),
        other => Ok(other),
    }
}

/// Reads the consistency field of a request: unspecified means QUORUM.
pub fn consistency_from(raw: i32) -> Result<quorum::Consistency, Error> {
    match Consistency::try_from(raw) {
        Ok(Consistency::Unspecified | Consistency::Quorum) => Ok(quorum::Consistency::Quorum),
        Ok(Consistency::One) => Ok(quorum::Consistency::One),
        Ok(Consistency::All) => Ok(quorum::Consistency::All),
        Ok(Consistency::Any) => Ok(quorum::Consistency::Any),
        Err(_) => Err(Error::InvalidArgument(format!(
            "unknown consistency {raw}; use 0 (default, QUORUM), 1 (ONE), 2 (QUORUM), 3 (ALL) or 4 (ANY, writes only)"
        ))),
    }
}

impl From<quorum::Consistency> for Consistency {
    fn from(c: quorum::Consistency) -> Self {
        match c {
            quorum::Consistency::One => Consistency::One,
            quorum::Consistency::Quorum => Consistency::Quorum,
            quorum::Consistency::All => Consistency::All,
            quorum::Consistency::Any => Consistency::Any,
        }
    }
}

/// The Get answer for the newest record found.
pub fn get_response(record: Option<record::Record>) -> GetResponse {
    match record {
        Some(record::Record {
            version,
            value: Some(value),
            ..
        }) => GetResponse {
            found: true,
            value,
            version: Some(version.into()),
        },
        Some(record::Record {
            version,
            value: None,
            ..
        }) => GetResponse {
            found: false,
            value: Default::default(),
            version: Some(version.into()),
        },
        None => GetResponse::default(),
    }
}

/// A coordinator's answer to a write, as the smart client reports it.
pub fn write_ack(version: Option<Version>, acks: u32) -> Result<quorum::WriteAck, Error> {
    let version = reported_version(version, "a version")?;
    Ok(quorum::WriteAck {
        version,
        acks: acks as usize,
    })
}

/// The record a node's `KeyValue.Get` answered (a tombstone when the key
/// was deleted, `None` when no replica knows it).
pub fn record_from_get_response(reply: GetResponse) -> Result<Option<record::Record>, Error> {
    let version = |v| reported_version(Some(v), "a version");
    match (reply.found, reply.version) {
        (true, Some(v)) => Ok(Some(record::Record::value(version(v)?, reply.value))),
        (false, Some(v)) => Ok(Some(record::Record::tombstone(version(v)?))),
        (false, None) => Ok(None),
        (true, None) => Err(Error::Internal(
            "the coordinator answered a found key without its version".into(),
        )),
    }
}

impl From<replica::RangeEntry> for RangeEntry {
    fn from(e: replica::RangeEntry) -> Self {
        Self {
            key: e.key,
            version: Some(e.version.into()),
            tombstone: e.tombstone,
            deleted_at_ms: e.deleted_at_ms,
        }
    }
}

/// One entry of a peer's anti-entropy listing, its version within `bound`.
pub fn range_entry_from(
    e: RangeEntry,
    bound: clock::SkewBound,
) -> Result<replica::RangeEntry, Error> {
    Ok(replica::RangeEntry {
        version: version_from(e.version, bound, "entry version")?,
        key: e.key,
        tombstone: e.tombstone,
        deleted_at_ms: e.deleted_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Versions no node can have issued: far beyond any skew bound.
    fn far_future() -> [Version; 3] {
        let an_hour_ahead = clock::hlc_of_ms(clock::wall_clock_ms() + 3_600_000);
        [1u64 << 62, u64::MAX, an_hour_ahead].map(|lamport| Version {
            lamport,
            node_id: 7,
        })
    }

    /// Every way a version enters from the network goes through these
    /// conversions: replica writes, batches and stored hints (`record_from`,
    /// on the node; tests/versions.rs sends each of those RPCs), read
    /// results and write answers (`record_from`, `version_from`, in the
    /// replica pipe), anti-entropy listings (`range_entry_from`). Each
    /// refuses a far-future version with INVALID_ARGUMENT naming the field.
    #[test]
    fn every_conversion_refuses_a_far_future_version() {
        let bound = clock::SkewBound::default();
        let now = clock::Version::new(clock::hlc_of_ms(clock::wall_clock_ms()), 7);
        for version in far_future() {
            let refused = version_from(Some(version), bound, "held version").unwrap_err();
            assert!(
                matches!(refused, Error::ClockSkew(_) | Error::InvalidArgument(_)),
                "{refused:?}"
            );
            assert!(refused.to_string().contains("held version"), "{refused}");
            let record = Record {
                version: Some(version),
                value: bytes::Bytes::from_static(b"v"),
                ..Default::default()
            };
            assert!(record_from(record, bound).is_err());
            let entry = RangeEntry {
                key: "k".into(),
                version: Some(version),
                ..Default::default()
            };
            assert!(range_entry_from(entry, bound).is_err());
        }
        // A version of now passes each of them.
        assert_eq!(version_from(Some(now.into()), bound, "v").unwrap(), now);
        let entry = RangeEntry {
            key: "k".into(),
            version: Some(now.into()),
            ..Default::default()
        };
        assert_eq!(range_entry_from(entry, bound).unwrap().version, now);
        // A missing version is an error too, not version 0.
        assert!(version_from(None, bound, "v").is_err());
    }

    #[test]
    fn a_tombstone_with_a_value_is_refused() {
        let now = clock::Version::new(clock::hlc_of_ms(clock::wall_clock_ms()), 7);
        let record = Record {
            version: Some(now.into()),
            tombstone: true,
            value: bytes::Bytes::from_static(b"x"),
            ..Default::default()
        };
        assert!(record_from(record, clock::SkewBound::default()).is_err());
    }

    #[test]
    fn get_answers_round_trip_through_the_client_conversion() {
        let v = clock::Version::new(5 << 16, 9);
        let value = record::Record::value(v, bytes::Bytes::from_static(b"x"));
        let back = record_from_get_response(get_response(Some(value.clone()))).unwrap();
        assert_eq!(back.map(|r| (r.version, r.value)), Some((v, value.value)));
        let gone = record_from_get_response(get_response(Some(record::Record::tombstone(v))))
            .unwrap()
            .expect("tombstone");
        assert!(gone.is_tombstone());
        assert_eq!(record_from_get_response(get_response(None)).unwrap(), None);
    }

    #[test]
    fn unknown_consistency_is_invalid_argument() {
        assert_eq!(consistency_from(0).ok(), Some(quorum::Consistency::Quorum));
        assert_eq!(consistency_from(1).ok(), Some(quorum::Consistency::One));
        assert_eq!(consistency_from(3).ok(), Some(quorum::Consistency::All));
        assert!(matches!(
            consistency_from(9),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            consistency_from(-1),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn records_need_a_version_within_the_skew_bound() {
        let bound = clock::SkewBound::default();
        let missing = Record {
            version: None,
            tombstone: false,
            value: Default::default(),
            deleted_at_ms: 0,
        };
        assert!(matches!(
            record_from(missing, bound),
            Err(Error::InvalidArgument(_))
        ));
        let domain = record::Record::value(clock::Version::new(3, 4), &b"v"[..]);
        assert_eq!(record_from(Record::from(&domain), bound).ok(), Some(domain));
        for lamport in [1u64 << 62, u64::MAX] {
            let hostile = record::Record::value(clock::Version::new(lamport, 4), &b"v"[..]);
            let error = record_from(Record::from(&hostile), bound).expect_err("beyond the bound");
            assert!(error.to_string().contains("--max-clock-skew-ms"), "{error}");
        }
        let near = clock::Version::new(clock::hlc_of_ms(clock::wall_clock_ms() + 1000), 4);
        assert_eq!(
            version_from(Some(near.into()), bound, "held").ok(),
            Some(near)
        );
    }
}

// ---- Layouts (membership) ----

impl From<&crate::layout::Layout> for Layout {
    fn from(l: &crate::layout::Layout) -> Self {
        Self {
            version: l.version,
            replicas: l.replicas as u32,
            vnodes: l.vnodes as u32,
            members: l
                .members
                .iter()
                .map(|m| LayoutMember {
                    address: m.address.clone(),
                    member_id: m.member_id.0,
                    role: match m.role {
                        crate::layout::Role::Active => LayoutRole::Active,
                        crate::layout::Role::Joining => LayoutRole::Joining,
                        crate::layout::Role::Leaving => LayoutRole::Leaving,
                        crate::layout::Role::Removing => LayoutRole::Removing,
                    } as i32,
                    tokens: m.tokens.clone(),
                    instance_id: m.instance_id.0,
                })
                .collect(),
            previous: l.previous.clone(),
            change: l.change.clone(),
            cluster_id: l.cluster_id,
            removed: l
                .removed
                .iter()
                .map(|r| RemovedInstance {
                    address: r.address.clone(),
                    instance_id: r.instance_id.0,
                    version: r.version,
                    why: r.why.clone(),
                })
                .collect(),
            streamed: l.streamed.clone(),
            written_off: l.written_off.clone(),
            target_since: l.target_since,
        }
    }
}

/// A layout from the network or disk, checked whole ([`crate::layout::Layout::validate`]).
pub fn layout_from(l: Layout) -> Result<crate::layout::Layout, String> {
    let members = l
        .members
        .into_iter()
        .map(|m| {
            let role = match LayoutRole::try_from(m.role) {
                Ok(LayoutRole::Active) => crate::layout::Role::Active,
                Ok(LayoutRole::Joining) => crate::layout::Role::Joining,
                Ok(LayoutRole::Leaving) => crate::layout::Role::Leaving,
                Ok(LayoutRole::Removing) => crate::layout::Role::Removing,
                _ => {
                    return Err(format!(
                        "member {} has no valid role ({})",
                        m.address, m.role
                    ));
                }
            };
            Ok(crate::layout::LayoutMember {
                address: m.address,
                member_id: crate::ring::MemberId(m.member_id),
                role,
                tokens: m.tokens,
                instance_id: clock::InstanceId(m.instance_id),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut layout = crate::layout::Layout {
        version: l.version,
        replicas: l.replicas as usize,
        vnodes: l.vnodes as usize,
        members,
        previous: l.previous,
        change: l.change,
        cluster_id: l.cluster_id,
        removed: l
            .removed
            .into_iter()
            .map(|r| crate::layout::Removed {
                address: r.address,
                instance_id: clock::InstanceId(r.instance_id),
                version: r.version,
                why: r.why,
            })
            .collect(),
        streamed: l.streamed,
        written_off: l.written_off,
        target_since: l.target_since,
    };
    layout.members.sort_by(|a, b| a.address.cmp(&b.address));
    layout.validate()?;
    Ok(layout)
}

impl From<crate::layout::paxos::Ballot> for Ballot {
    fn from(b: crate::layout::paxos::Ballot) -> Self {
        Self {
            round: b.round,
            proposer: b.proposer,
        }
    }
}

/// An acceptor's answer to a layout prepare, for the proposer.
pub fn promise_from(p: LayoutPromise) -> crate::paxos::Promise<crate::layout::Layout> {
    use crate::paxos::Promise;
    if p.promised {
        return match p.accepted.map(layout_from).transpose() {
            Ok(accepted) => Promise::Yes {
                accepted: accepted.map(|layout| (ballot_from(p.accepted_ballot), layout)),
            },
            Err(why) => Promise::Failed(format!("bad accepted layout: {why}")),
        };
    }
    Promise::No {
        promised: p.promised_ballot.map(|b| ballot_from(Some(b))),
        committed: p.committed.and_then(|l| layout_from(l).ok()),
    }
}

/// An acceptor's answer to a layout accept, for the proposer.
pub fn accepted_from(a: LayoutAccepted) -> crate::paxos::Accepted<crate::layout::Layout> {
    use crate::paxos::Accepted;
    if a.accepted {
        return Accepted::Yes;
    }
    Accepted::No {
        promised: a.promised_ballot.map(|b| ballot_from(Some(b))),
        committed: a.committed.and_then(|l| layout_from(l).ok()),
    }
}

/// An acceptor's promise for `ballot`, on the wire (the inverse of
/// [`promise_from`]).
pub fn layout_promise(
    p: crate::paxos::Promise<crate::layout::Layout>,
    ballot: crate::layout::paxos::Ballot,
) -> LayoutPromise {
    use crate::paxos::Promise;
    match p {
        Promise::Yes { accepted } => LayoutPromise {
            promised: true,
            promised_ballot: Some(ballot.into()),
            accepted_ballot: accepted.as_ref().map(|(b, _)| (*b).into()),
            accepted: accepted.as_ref().map(|(_, l)| l.into()),
            committed: None,
        },
        Promise::No {
            promised,
            committed,
        } => LayoutPromise {
            promised_ballot: promised.map(Ballot::from),
            committed: committed.as_ref().map(Layout::from),
            ..Default::default()
        },
        Promise::Failed(_) => LayoutPromise::default(),
    }
}

/// An acceptor's answer to an accept for `ballot`, on the wire (the
/// inverse of [`accepted_from`]).
pub fn layout_accepted(
    a: crate::paxos::Accepted<crate::layout::Layout>,
    ballot: crate::layout::paxos::Ballot,
) -> LayoutAccepted {
    use crate::paxos::Accepted;
    match a {
        Accepted::Yes => LayoutAccepted {
            accepted: true,
            promised_ballot: Some(ballot.into()),
            committed: None,
        },
        Accepted::No {
            promised,
            committed,
        } => LayoutAccepted {
            promised_ballot: promised.map(Ballot::from),
            committed: committed.as_ref().map(Layout::from),
            ..Default::default()
        },
        Accepted::Failed(_) => LayoutAccepted::default(),
    }
}

impl From<crate::layout::verify::Vouch> for LayoutVouchResponse {
    fn from(v: crate::layout::verify::Vouch) -> Self {
        Self {
            adopted: v.adopted.is_some(),
            adopted_hash: v.adopted.unwrap_or(0),
            accepted: v.accepted.is_some(),
            accepted_ballot: v.accepted.map(|(b, _)| b.into()),
            accepted_hash: v.accepted.map_or(0, |(_, h)| h),
        }
    }
}

impl From<LayoutVouchResponse> for crate::layout::verify::Vouch {
    fn from(v: LayoutVouchResponse) -> Self {
        Self {
            adopted: v.adopted.then_some(v.adopted_hash),
            accepted: v
                .accepted
                .then(|| (ballot_from(v.accepted_ballot), v.accepted_hash)),
        }
    }
}

pub fn ballot_from(b: Option<Ballot>) -> crate::layout::paxos::Ballot {
    b.map(|b| crate::layout::paxos::Ballot {
        round: b.round,
        proposer: b.proposer,
    })
    .unwrap_or_default()
}

impl From<&crate::layout::paxos::LayoutState> for LayoutState {
    fn from(s: &crate::layout::paxos::LayoutState) -> Self {
        let (accepted_ballot, accepted) = match &s.acceptor.accepted {
            Some((ballot, layout)) => (Some((*ballot).into()), Some(layout.into())),
            None => (None, None),
        };
        Self {
            committed: s.committed.as_ref().map(Layout::from),
            acceptor_version: s.acceptor.version,
            promised: Some(s.acceptor.promised.into()),
            accepted_ballot,
            accepted,
            adopted: s
                .adopted
                .pairs()
                .iter()
                .map(|&(version, hash)| LayoutHash { version, hash })
                .collect(),
        }
    }
}

pub fn layout_state_from(s: LayoutState) -> Result<crate::layout::paxos::LayoutState, String> {
    let accepted = match s.accepted {
        Some(layout) => Some((ballot_from(s.accepted_ballot), layout_from(layout)?)),
        None => None,
    };
    Ok(crate::layout::paxos::LayoutState {
        committed: s.committed.map(layout_from).transpose()?,
        acceptor: crate::layout::paxos::Acceptor {
            version: s.acceptor_version,
            promised: ballot_from(s.promised),
            accepted,
        },
        adopted: crate::layout::verify::AdoptedHashes::from_pairs(
            s.adopted.into_iter().map(|h| (h.version, h.hash)).collect(),
        ),
    })
}

impl From<crate::layout::progress::ProgressReport> for MoveProgress {
    /// `address` and `age_ms` are Status's to fill.
    fn from(p: crate::layout::progress::ProgressReport) -> Self {
        Self {
            address: String::new(),
            layout_version: p.layout_version,
            keys_moved: p.keys_moved,
            bytes_moved: p.bytes_moved,
            done_ppm: p.done_ppm,
            keys_remaining: p.keys_remaining,
            bytes_remaining: p.bytes_remaining,
            eta_ms: p.eta_ms,
            ranges_done: p.ranges_done,
            ranges_total: p.ranges_total,
            age_ms: 0,
            stalled_ms: p.stalled_ms,
            stalled_why: p.stalled_why,
        }
    }
}

impl From<MoveProgress> for crate::layout::progress::ProgressReport {
    fn from(p: MoveProgress) -> Self {
        Self {
            layout_version: p.layout_version,
            keys_moved: p.keys_moved,
            bytes_moved: p.bytes_moved,
            done_ppm: p.done_ppm,
            keys_remaining: p.keys_remaining,
            bytes_remaining: p.bytes_remaining,
            eta_ms: p.eta_ms,
            ranges_done: p.ranges_done,
            ranges_total: p.ranges_total,
            stalled_ms: p.stalled_ms,
            // From the network: bounded.
            stalled_why: crate::layout::progress::bounded_why(&p.stalled_why),
        }
    }
}
