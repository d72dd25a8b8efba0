//! The messages nodes exchange that belong to no lower module, as plain
//! Rust types, and their protobuf forms. The protocols (heartbeats, joins'
//! streaming) speak these; only `net` and the services (`node`) see the
//! generated code.

use bytes::Bytes;

use crate::clock::{InstanceId, SkewBound};
use crate::error::{Error, Result};
use crate::layout::progress::ProgressReport;
use crate::pb;
use crate::record::Record;
use crate::ring::MemberId;

/// A node's counts, as its heartbeats' answers carry them and
/// `Cluster.Status` shows them (the fields are `NodeStats`'s in the proto).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeStats {
    pub live_keys: u64,
    pub tombstones: u64,
    /// The node's hybrid logical clock.
    pub hlc: u64,
    pub uptime_ms: u64,
    pub read_repairs: u64,
    pub blocking_read_repairs: u64,
    pub hints_pending: u64,
    pub hints_delivered: u64,
    pub anti_entropy_exchanges: u64,
    pub anti_entropy_in_sync: u64,
    pub anti_entropy_keys_repaired: u64,
    pub tombstones_purged: u64,
    pub future_records: u64,
    pub tombstone_gc_skipped: u64,
    pub damaged_entries_skipped: u64,
    /// Requests refused because a budget was spent, since start.
    pub requests_shed: u64,
    /// Connections closed as they arrived (`--max-connections`), since start.
    pub connections_refused: u64,
    /// Bytes in the data dir (measured with a quota only), and whether the
    /// quota is reached.
    pub data_bytes: u64,
    pub data_quota_reached: bool,
    /// Client writes forwarded to their key's first live replica, and
    /// writes coordinated for a node that forwarded them, since start.
    pub writes_forwarded: u64,
    pub forwarded_writes_coordinated: u64,
}

/// A heartbeat (`Liveness.Ping`): who sends it, what it knows, its clock.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ping {
    /// The sender's address, as it appears in `--peers`.
    pub from: String,
    pub instance_id: InstanceId,
    /// The instance the sender knows at the receiver's address (0: none).
    pub known_instance_id: InstanceId,
    pub serves_reads: bool,
    pub hlc: u64,
    pub layout_version: u64,
    /// The hash of the layout the sender serves (0: unknown).
    pub layout_hash: u64,
    /// The sender's join progress, while it is joining.
    pub progress: Option<ProgressReport>,
    /// The sender's cluster id (0: none yet).
    pub cluster_id: u64,
}

/// The answer to a [`Ping`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pong {
    /// The answering node's member id (its ring position).
    pub member_id: MemberId,
    pub instance_id: InstanceId,
    pub known_instance_id: InstanceId,
    pub serves_reads: bool,
    pub hlc: u64,
    /// Its wall clock (ms since the Unix epoch), for the clock skew.
    pub wall_ms: u64,
    pub stats: Option<NodeStats>,
    pub layout_version: u64,
    /// The hash of the layout the answering node serves (0: unknown).
    pub layout_hash: u64,
    /// The answering node's cluster id (0: none yet).
    pub cluster_id: u64,
}

/// What a joining node asks a source for (`Membership.StreamRecords`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamRequest {
    /// The join's layout version: the source answers once it serves it.
    pub layout_version: u64,
    /// Hash intervals, each `first..=last`.
    pub intervals: Vec<(u64, u64)>,
    /// Resume after this storage key (empty: from the start).
    pub after: Vec<u8>,
    /// The asking node's cluster id (stamped by the peer pool when 0).
    pub cluster_id: u64,
}

/// One chunk of a stream: records, and the intervals finished so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamChunk {
    pub records: Vec<(String, Record)>,
    pub intervals_done: u32,
}

impl From<NodeStats> for pb::NodeStats {
    fn from(s: NodeStats) -> Self {
        Self {
            live_keys: s.live_keys,
            tombstones: s.tombstones,
            lamport: s.hlc,
            uptime_ms: s.uptime_ms,
            read_repairs: s.read_repairs,
            blocking_read_repairs: s.blocking_read_repairs,
            hints_pending: s.hints_pending,
            hints_delivered: s.hints_delivered,
            anti_entropy_exchanges: s.anti_entropy_exchanges,
            anti_entropy_in_sync: s.anti_entropy_in_sync,
            anti_entropy_keys_repaired: s.anti_entropy_keys_repaired,
            tombstones_purged: s.tombstones_purged,
            future_records: s.future_records,
            tombstone_gc_skipped: s.tombstone_gc_skipped,
            damaged_entries_skipped: s.damaged_entries_skipped,
            requests_shed: s.requests_shed,
            connections_refused: s.connections_refused,
            data_bytes: s.data_bytes,
            data_quota_reached: s.data_quota_reached,
            writes_forwarded: s.writes_forwarded,
            forwarded_writes_coordinated: s.forwarded_writes_coordinated,
        }
    }
}

impl From<pb::NodeStats> for NodeStats {
    fn from(s: pb::NodeStats) -> Self {
        Self {
            live_keys: s.live_keys,
            tombstones: s.tombstones,
            hlc: s.lamport,
            uptime_ms: s.uptime_ms,
            read_repairs: s.read_repairs,
            blocking_read_repairs: s.blocking_read_repairs,
            hints_pending: s.hints_pending,
            hints_delivered: s.hints_delivered,
            anti_entropy_exchanges: s.anti_entropy_exchanges,
            anti_entropy_in_sync: s.anti_entropy_in_sync,
            anti_entropy_keys_repaired: s.anti_entropy_keys_repaired,
            tombstones_purged: s.tombstones_purged,
            future_records: s.future_records,
            tombstone_gc_skipped: s.tombstone_gc_skipped,
            damaged_entries_skipped: s.damaged_entries_skipped,
            requests_shed: s.requests_shed,
            connections_refused: s.connections_refused,
            data_bytes: s.data_bytes,
            data_quota_reached: s.data_quota_reached,
            writes_forwarded: s.writes_forwarded,
            forwarded_writes_coordinated: s.forwarded_writes_coordinated,
        }
    }
}

impl From<Ping> for pb::PingRequest {
    fn from(p: Ping) -> Self {
        Self {
            from: p.from,
            instance_id: p.instance_id.0,
            known_instance_id: p.known_instance_id.0,
            serves_reads: p.serves_reads,
            hlc: p.hlc,
            layout_version: p.layout_version,
            layout_hash: p.layout_hash,
            r#move: p.progress.map(pb::MoveProgress::from),
            cluster_id: p.cluster_id,
        }
    }
}

impl From<pb::PingRequest> for Ping {
    fn from(p: pb::PingRequest) -> Self {
        Self {
            from: p.from,
            instance_id: InstanceId(p.instance_id),
            known_instance_id: InstanceId(p.known_instance_id),
            serves_reads: p.serves_reads,
            hlc: p.hlc,
            layout_version: p.layout_version,
            layout_hash: p.layout_hash,
            progress: p.r#move.map(ProgressReport::from),
            cluster_id: p.cluster_id,
        }
    }
}

impl From<Pong> for pb::PingResponse {
    fn from(p: Pong) -> Self {
        Self {
            node_id: p.member_id.0,
            instance_id: p.instance_id.0,
            known_instance_id: p.known_instance_id.0,
            serves_reads: p.serves_reads,
            hlc: p.hlc,
            wall_ms: p.wall_ms,
            stats: p.stats.map(pb::NodeStats::from),
            layout_version: p.layout_version,
            layout_hash: p.layout_hash,
            cluster_id: p.cluster_id,
        }
    }
}

impl From<pb::PingResponse> for Pong {
    fn from(p: pb::PingResponse) -> Self {
        Self {
            member_id: MemberId(p.node_id),
            instance_id: InstanceId(p.instance_id),
            known_instance_id: InstanceId(p.known_instance_id),
            serves_reads: p.serves_reads,
            hlc: p.hlc,
            wall_ms: p.wall_ms,
            stats: p.stats.map(NodeStats::from),
            layout_version: p.layout_version,
            layout_hash: p.layout_hash,
            cluster_id: p.cluster_id,
        }
    }
}

impl From<StreamRequest> for pb::StreamRequest {
    fn from(r: StreamRequest) -> Self {
        Self {
            layout_version: r.layout_version,
            intervals: r
                .intervals
                .into_iter()
                .map(|(first, last)| pb::HashInterval { first, last })
                .collect(),
            after: Bytes::from(r.after),
            cluster_id: r.cluster_id,
        }
    }
}

impl From<pb::StreamRequest> for StreamRequest {
    fn from(r: pb::StreamRequest) -> Self {
        Self {
            layout_version: r.layout_version,
            intervals: r.intervals.into_iter().map(|i| (i.first, i.last)).collect(),
            after: r.after.to_vec(),
            cluster_id: r.cluster_id,
        }
    }
}

impl From<&StreamChunk> for pb::StreamChunk {
    fn from(c: &StreamChunk) -> Self {
        Self {
            records: c
                .records
                .iter()
                .map(|(key, record)| pb::StreamedRecord {
                    key: key.clone(),
                    record: Some(record.into()),
                })
                .collect(),
            intervals_done: c.intervals_done,
        }
    }
}

/// A chunk from a source, every record checked: a record that is missing,
/// keyless or beyond the skew bound fails the chunk.
pub fn stream_chunk_from(chunk: pb::StreamChunk, bound: SkewBound) -> Result<StreamChunk> {
    let mut records = Vec::with_capacity(chunk.records.len());
    for streamed in chunk.records {
        let record = streamed
            .record
            .ok_or_else(|| Error::Unavailable("a streamed record has no record".into()))
            .and_then(|r| pb::record_from(r, bound))
            .map_err(|why| Error::Unavailable(format!("sent a bad record: {why}")))?;
        if streamed.key.is_empty() {
            return Err(Error::Unavailable("sent a record without a key".into()));
        }
        records.push((streamed.key, record));
    }
    Ok(StreamChunk {
        records,
        intervals_done: chunk.intervals_done,
    })
}
