//! What a node counts for Prometheus (`GET /metrics`, DESIGN "HTTP").
//!
//! The hot paths only add to atomics kept in arrays made up front: a
//! client request is counted in [`RequestMetrics`] (indexed by operation,
//! consistency, gRPC code and outcome) and a node-to-node call in the
//! [`PeerCalls`] its channel was made with. No lock is taken and nothing is
//! allocated per request; a series is looked up by index, never by a map
//! of label values. Everything else a node already keeps (hints, repairs,
//! anti-entropy, the layout, its peers' phi) is read when Prometheus
//! scrapes, by collectors that encode it on the spot ([`gauge`],
//! [`counter`]). Names follow Prometheus's conventions: a `dkvs_` prefix,
//! base units (`_seconds`, `_bytes`), `_total` for counters; a key is never
//! a label.

pub mod process;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::locks::Locked;

/// `Content-Type` of `GET /metrics`: the Prometheus text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds of the latency buckets, in seconds: from half a
/// millisecond (a local replica write) to ten seconds (a request's whole
/// default budget and then some).
pub const BUCKETS_SECONDS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram that records with two atomic additions and no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket (not cumulative); the last is above every
    /// bound (+Inf).
    counts: [AtomicU64; BUCKETS_SECONDS.len() + 1],
    /// Sum of the observations, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(nanos)].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn encode(&self, encoder: &mut MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut buckets = [(0.0, 0); BUCKETS_SECONDS.len() + 1];
        for (i, bucket) in buckets.iter_mut().enumerate() {
            let bound = BUCKETS_SECONDS.get(i).copied().unwrap_or(f64::INFINITY);
            *bucket = (bound, self.counts[i].load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }
}

/// The bucket an observation of `nanos` falls in (the first whose bound
/// is not below it).
fn bucket_of(nanos: u64) -> usize {
    const BOUNDS_NANOS: [u64; BUCKETS_SECONDS.len()] = {
        let mut bounds = [0; BUCKETS_SECONDS.len()];
        let mut i = 0;
        while i < bounds.len() {
            bounds[i] = (BUCKETS_SECONDS[i] * 1e9) as u64;
            i += 1;
        }
        bounds
    };
    BOUNDS_NANOS
        .iter()
        .position(|&bound| nanos <= bound)
        .unwrap_or(BOUNDS_NANOS.len())
}

/// A client-facing operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Get,
    Put,
    Delete,
    /// The smart client's batch of single-replica reads (`ReplicaRead.Batch`).
    ReplicaRead,
}

impl Operation {
    const ALL: [Operation; 4] = [
        Operation::Get,
        Operation::Put,
        Operation::Delete,
        Operation::ReplicaRead,
    ];

    /// The consistency most of its requests ask for: QUORUM (the
    /// default), ONE for the smart client's single-replica reads.
    fn usual_consistency(self) -> &'static str {
        match self {
            Operation::ReplicaRead => "one",
            _ => "quorum",
        }
    }

    /// The outcome its successes carry: writes say `applied`, reads none.
    fn success_outcome(self) -> &'static str {
        match self {
            Operation::Put | Operation::Delete => "applied",
            Operation::Get | Operation::ReplicaRead => "none",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Operation::Get => "get",
            Operation::Put => "put",
            Operation::Delete => "delete",
            Operation::ReplicaRead => "replica_read",
        }
    }
}

/// The consistency a request asked for, as a label: "one", "quorum"
/// (also the default), "all", "any", or "invalid" (refused).
pub const CONSISTENCIES: [&str; 5] = ["one", "quorum", "all", "any", "invalid"];

/// The outcome a write-like answer carried (DESIGN "Outcomes"); reads
/// carry none ("none").
pub const OUTCOMES: [&str; 4] = ["none", "applied", "not_applied", "unknown"];

/// gRPC status codes by number, as labels.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The name of gRPC code `code` (UNKNOWN for a number no code has).
pub fn code_name(code: i32) -> &'static str {
    usize::try_from(code)
        .ok()
        .and_then(|c| CODES.get(c))
        .copied()
        .unwrap_or("UNKNOWN")
}

const OPERATIONS: usize = Operation::ALL.len();
const ANSWERS: usize = CODES.len() * OUTCOMES.len();

/// One client request's answer, for [`RequestMetrics::record`].
#[derive(Clone, Copy, Debug)]
pub struct Answered {
    pub operation: Operation,
    /// Index into [`CONSISTENCIES`].
    pub consistency: usize,
    /// The gRPC code, as a number (0 = OK).
    pub code: i32,
    /// Index into [`OUTCOMES`].
    pub outcome: usize,
}

/// Client requests answered by this node: counts by operation,
/// consistency, code and outcome, and latency by operation and
/// consistency. Every series exists from the start (arrays, no map).
#[derive(Debug)]
pub struct RequestMetrics {
    answers: Vec<AtomicU64>,
    durations: Vec<Histogram>,
}

impl Default for RequestMetrics {
    fn default() -> Self {
        let series = OPERATIONS * CONSISTENCIES.len();
        Self {
            answers: (0..series * ANSWERS).map(|_| AtomicU64::new(0)).collect(),
            durations: (0..series).map(|_| Histogram::default()).collect(),
        }
    }
}

impl RequestMetrics {
    pub fn record(&self, answered: Answered, elapsed: Duration) {
        let series = self.series(answered.operation, answered.consistency);
        let code = usize::try_from(answered.code)
            .ok()
            .filter(|&c| c < CODES.len())
            .unwrap_or(2); // UNKNOWN
        let outcome = answered.outcome.min(OUTCOMES.len() - 1);
        self.answers[series * ANSWERS + code * OUTCOMES.len() + outcome]
            .fetch_add(1, Ordering::Relaxed);
        self.durations[series].observe(elapsed);
    }

    fn series(&self, operation: Operation, consistency: usize) -> usize {
        let operation = Operation::ALL
            .iter()
            .position(|&o| o == operation)
            .unwrap_or(0);
        operation * CONSISTENCIES.len() + consistency.min(CONSISTENCIES.len() - 1)
    }

    /// Requests answered so far with `operation` and gRPC `code`.
    pub fn answered(&self, operation: Operation, code: i32) -> u64 {
        (0..CONSISTENCIES.len())
            .flat_map(|c| (0..OUTCOMES.len()).map(move |o| (c, o)))
            .map(|(c, o)| {
                let series = self.series(operation, c);
                self.answers[series * ANSWERS + code as usize * OUTCOMES.len() + o]
                    .load(Ordering::Relaxed)
            })
            .sum()
    }
}

impl Collector for RequestMetrics {
    /// Series that never moved are left out, except each operation's OK
    /// count at its usual consistency (so a rate reads 0, not nothing, on
    /// an idle node).
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut requests = encoder.encode_descriptor(
            "dkvs_client_requests",
            "Client requests answered by this node, by operation, consistency, gRPC code and outcome (DESIGN Outcomes).",
            None,
            MetricType::Counter,
        )?;
        for operation in Operation::ALL {
            for (c, consistency) in CONSISTENCIES.iter().enumerate() {
                let series = self.series(operation, c);
                for (code, code_name) in CODES.iter().enumerate() {
                    for (o, outcome) in OUTCOMES.iter().enumerate() {
                        let n = self.answers[series * ANSWERS + code * OUTCOMES.len() + o]
                            .load(Ordering::Relaxed);
                        let always = code == 0
                            && *consistency == operation.usual_consistency()
                            && *outcome == operation.success_outcome();
                        if n == 0 && !always {
                            continue;
                        }
                        let labels = [
                            ("operation", operation.name()),
                            ("consistency", consistency),
                            ("code", code_name),
                            ("outcome", outcome),
                        ];
                        ConstCounter::new(n).encode(requests.encode_family(&labels)?)?;
                    }
                }
            }
        }
        let mut durations = encoder.encode_descriptor(
            "dkvs_client_request_duration_seconds",
            "Time from a client request's arrival to its answer, by operation and consistency.",
            None,
            MetricType::Histogram,
        )?;
        for operation in Operation::ALL {
            for (c, consistency) in CONSISTENCIES.iter().enumerate() {
                let histogram = &self.durations[self.series(operation, c)];
                if histogram.count() == 0 && *consistency != operation.usual_consistency() {
                    continue;
                }
                let labels = [
                    ("operation", operation.name()),
                    ("consistency", consistency),
                ];
                histogram.encode(&mut durations.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The node-to-node calls, by the name [`call_name`] gives them.
pub const CALLS: [&str; 18] = [
    "Replica/Read",
    "Replica/Write",
    "Replica/Batch",
    "Replica/StoreHint",
    "Replica/RangeDigests",
    "Replica/RangeEntries",
    "Replica/Stats",
    "Replica/ForwardWrites",
    "ReplicaRead/Batch",
    "Membership/GetLayout",
    "Membership/LayoutPrepare",
    "Membership/LayoutAccept",
    "Membership/LayoutCommit",
    "Membership/LayoutVouch",
    "Membership/Join",
    "Membership/StreamRecords",
    "Liveness/Ping",
    "other",
];

/// The index in [`CALLS`] of the call a gRPC `path` names
/// (`/dkvs.v1.Replica/Batch` is "Replica/Batch"); "other" when unknown.
pub fn call_index(path: &str) -> usize {
    let name = path.strip_prefix("/dkvs.v1.").unwrap_or(path);
    CALLS
        .iter()
        .position(|&call| call == name)
        .unwrap_or(CALLS.len() - 1)
}

/// One kind of call to one peer.
#[derive(Debug, Default)]
pub struct CallStats {
    /// Time from sending to the answer's headers (for a stream: to its
    /// first headers).
    pub duration: Histogram,
    /// Calls that failed: no answer, or a gRPC status other than OK in the
    /// answer's headers.
    pub failed: AtomicU64,
}

/// The calls this node made to one peer, by kind.
#[derive(Debug)]
pub struct PeerCalls {
    peer: String,
    calls: [CallStats; CALLS.len()],
}

impl PeerCalls {
    /// The stats of the call a gRPC `path` names.
    pub fn call(&self, path: &str) -> &CallStats {
        self.by_index(call_index(path))
    }

    /// The stats of [`CALLS`]`[index]` (past the end: "other").
    pub fn by_index(&self, index: usize) -> &CallStats {
        &self.calls[index.min(CALLS.len() - 1)]
    }
}

/// Node-to-node calls by peer and kind. A peer's series are made with its
/// channel (once per peer); the lock is taken then and when Prometheus
/// scrapes, never per call.
#[derive(Debug, Default)]
pub struct CallMetrics {
    peers: Mutex<Vec<Arc<PeerCalls>>>,
}

impl CallMetrics {
    /// The series of calls to `peer`, made on first use.
    pub fn for_peer(&self, peer: &str) -> Arc<PeerCalls> {
        let mut peers = self.peers.locked();
        if let Some(found) = peers.iter().find(|p| p.peer == peer) {
            return found.clone();
        }
        let made = Arc::new(PeerCalls {
            peer: peer.to_string(),
            calls: std::array::from_fn(|_| CallStats::default()),
        });
        peers.push(made.clone());
        made
    }
}

impl CallMetrics {
    /// Encodes the calls to the peers `shown` says to show (those still
    /// members); only calls made at least once are listed.
    pub fn encode_peers(
        &self,
        encoder: &mut DescriptorEncoder,
        shown: impl Fn(&str) -> bool,
    ) -> Result<(), std::fmt::Error> {
        let peers: Vec<Arc<PeerCalls>> = self
            .peers
            .locked()
            .iter()
            .filter(|p| shown(&p.peer))
            .cloned()
            .collect();
        let mut durations = encoder.encode_descriptor(
            "dkvs_peer_call_duration_seconds",
            "Node-to-node calls this node made, by peer and call: time to the answer's headers.",
            None,
            MetricType::Histogram,
        )?;
        for peer in &peers {
            for (call, stats) in CALLS.iter().zip(&peer.calls) {
                if stats.duration.count() > 0 {
                    let labels = [("peer", peer.peer.as_str()), ("call", call)];
                    stats
                        .duration
                        .encode(&mut durations.encode_family(&labels)?)?;
                }
            }
        }
        let mut failed = encoder.encode_descriptor(
            "dkvs_peer_calls_failed",
            "Node-to-node calls this node made that failed (no answer, or an error status), by peer and call.",
            None,
            MetricType::Counter,
        )?;
        for peer in &peers {
            for (call, stats) in CALLS.iter().zip(&peer.calls) {
                if stats.duration.count() > 0 {
                    let labels = [("peer", peer.peer.as_str()), ("call", call)];
                    let n = stats.failed.load(Ordering::Relaxed);
                    ConstCounter::new(n).encode(failed.encode_family(&labels)?)?;
                }
            }
        }
        Ok(())
    }
}

/// How logs name a key: its ring hash in hex, never the key itself (keys
/// may be personal data; the hash still ties a request's lines together
/// and tells which range it fell in).
pub fn key_hash(key: &str) -> String {
    format!("{:016x}", crate::ring::key_hash(key.as_bytes()))
}

/// Encodes one unlabelled counter (`name` gets `_total`).
pub fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Encodes one unlabelled gauge.
pub fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// Encodes a gauge with one series per label set.
pub fn labelled_gauges(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'static str, String)>, f64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Encodes a counter with one series per label set.
pub fn labelled_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Vec<(&'static str, String)>, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The text `GET /metrics` answers: every collector of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut text = String::with_capacity(16 << 10);
    // Writing to a String does not fail; an encoder error is a bug in a
    // collector and leaves what was written before it.
    if let Err(error) = prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
        tracing::warn!(%error, "a metrics collector failed; the scrape is incomplete");
    }
    text
}

#[cfg(test)]
mod tests;
