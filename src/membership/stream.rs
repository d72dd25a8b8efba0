//! Streaming a joining node's ranges.
//!
//! The joining node groups the hash intervals it will replicate by their
//! old replica set, and for each group merges, through write-if-newer, the
//! records of every reachable old replica — at least N−W+1 of them, so a
//! write acknowledged by W old replicas is on one it read. A source answers
//! only once it serves the join's layout version: from then on its fence
//! refuses writes placed with the layout before, and those that passed the
//! fence earlier were applied before it moved on, so a scan that starts
//! after it cannot miss one. Writes placed with the new layout reach the
//! joining node directly.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::time::Instant;

use super::{Membership, MoveProgress};
use crate::error::{Error, Result};
use crate::fanout::{FanOut, Stragglers, Tally};
use crate::layout::Layout;
use crate::net::RecordChunks;
use crate::net::messages::{StreamChunk, StreamRequest};
use crate::quorum::Consistency;
use crate::replica::ReplicaStore;
use crate::serving::ClusterView;

/// Records and bytes in one chunk of a stream.
const CHUNK_RECORDS: usize = 1024;
const CHUNK_BYTES: usize = 1 << 20;
/// Most intervals one request may name.
const MAX_INTERVALS: usize = 1 << 20;
/// Most intervals a joining node names in one request: a group with more
/// is streamed as several (sources refuse more than --max-batch-items,
/// at least 1024).
const INTERVALS_PER_REQUEST: usize = 1024;
/// How long a joining node waits for a source to serve the join's layout
/// before it streams from the other old replicas instead.
const SOURCE_CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// The stream a source answers `Membership.StreamRecords` with.
pub type RecordStream = Pin<Box<dyn Stream<Item = Result<StreamChunk>> + Send>>;

/// `Membership.StreamRecords` on a source: every record in the requested
/// hash intervals, in chunks, once this node serves the join's layout.
pub fn stream_source(
    replica: Arc<ReplicaStore>,
    cluster: Arc<ClusterView>,
    request: StreamRequest,
) -> Result<RecordStream> {
    let serving = replica.layout_version();
    if serving < request.layout_version {
        let (cluster, wanted) = (cluster.clone(), request.layout_version);
        tokio::spawn(async move { cluster.catch_up(wanted, "").await });
        return Err(Error::Unavailable(format!(
            "this node serves layout v{serving}, not yet the join's v{}; retry in a moment",
            request.layout_version
        )));
    }
    // A replacement still catching up may miss writes its predecessor
    // acknowledged: handing its partial data to a joiner (or counting it
    // among the N−W+1 sources) could lose them once the old owners drop
    // theirs.
    if let Some(why) = replica.read_refusal() {
        return Err(Error::Unavailable(format!(
            "this node cannot be a source for a join yet: {why}"
        )));
    }
    if request.intervals.len() > MAX_INTERVALS {
        return Err(Error::InvalidArgument(format!(
            "{} intervals in one stream request (at most {MAX_INTERVALS})",
            request.intervals.len()
        )));
    }
    if let Some(bad) = request.intervals.iter().find(|(first, last)| first > last) {
        return Err(Error::InvalidArgument(format!(
            "interval {}..={} is empty (first > last)",
            bad.0, bad.1
        )));
    }
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        for (index, &(first, last)) in request.intervals.iter().enumerate() {
            let mut after: Vec<u8> = if index == 0 {
                request.after.to_vec()
            } else {
                Vec::new()
            };
            loop {
                // A scan is storage work: off the async threads.
                let (scanner, from) = (replica.clone(), after.clone());
                let read = crate::seams::blocking(move || {
                    scanner.records_in(first, last, &from, CHUNK_RECORDS, CHUNK_BYTES)
                })
                .await
                .map_err(|e| Error::Internal(format!("stream scan: {e}")))
                .and_then(|read| read);
                let (records, resume) = match read {
                    Ok(read) => read,
                    Err(error) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                };
                let chunk = StreamChunk {
                    records,
                    intervals_done: (index + usize::from(resume.is_none())) as u32,
                };
                if sender.send(Ok(chunk)).await.is_err() {
                    return; // the joining node went away
                }
                match resume {
                    Some(key) => after = key,
                    None => break,
                }
            }
        }
    });
    Ok(Box::pin(futures::stream::unfold(
        receiver,
        |mut receiver| async move { receiver.recv().await.map(|item| (item, receiver)) },
    )))
}

/// The intervals of one old replica set.
struct Group {
    sources: Vec<String>,
    /// The one old replica that gives these ranges up, when exactly one
    /// does: every acknowledged write is on W old replicas, so it is either
    /// on W that stay, or on the giver and W−1 that stay; streaming from the
    /// giver alone then leaves it on W new replicas.
    giver: Option<String>,
    intervals: Vec<(u64, u64)>,
    /// Fraction of the hash space each interval is.
    shares: Vec<f64>,
}

/// Fraction of the 2^64 hash space in `first..=last`.
fn share(first: u64, last: u64) -> f64 {
    ((last - first) as f64 + 1.0) / 18_446_744_073_709_551_616.0
}

/// What this node gains under `layout` (the slices whose target set has
/// it and whose old set does not), grouped by old replica set. Members
/// being removed are no source: they are down.
fn plan(layout: &Layout, me: &str) -> (Vec<Group>, u32) {
    type Key = (Vec<String>, Option<String>);
    let mut groups: BTreeMap<Key, Vec<(u64, u64)>> = BTreeMap::new();
    for slice in layout.slices() {
        if !slice.new.iter().any(|a| a == me) || slice.old.iter().any(|a| a == me) {
            continue;
        }
        let (giver, sources) = (layout.giver_of(&slice), layout.sources_of(&slice));
        groups
            .entry((sources, giver))
            .or_default()
            .extend(slice.intervals);
    }
    let intervals_total: usize = groups.values().map(Vec::len).sum();
    let groups = groups
        .into_iter()
        .flat_map(|((sources, giver), mut intervals)| {
            intervals.sort_unstable();
            intervals
                .chunks(INTERVALS_PER_REQUEST)
                .map(|intervals| Group {
                    sources: sources.clone(),
                    giver: giver.clone(),
                    intervals: intervals.to_vec(),
                    shares: intervals.iter().map(|&(f, l)| share(f, l)).collect(),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    (groups, intervals_total as u32)
}

/// The old replicas of one group that finished streaming it.
struct Sources<'a> {
    names: &'a [String],
    answered: usize,
    merged: usize,
    failures: Vec<String>,
}

impl<'a> Sources<'a> {
    fn new(names: &'a [String]) -> Self {
        Self {
            names,
            answered: 0,
            merged: 0,
            failures: Vec::new(),
        }
    }
}

impl Tally<Result<()>> for Sources<'_> {
    type Verdict = ();

    fn record(&mut self, index: usize, reply: Result<()>) {
        self.answered += 1;
        match reply {
            Ok(()) => self.merged += 1,
            Err(why) => self.failures.push(format!("{}: {why}", self.names[index])),
        }
    }

    /// Decided once every source finished, whatever it said.
    fn verdict(&self) -> Option<()> {
        (self.answered == self.names.len()).then_some(())
    }
}

/// Paces a join to `--stream-rate` records per second.
struct Pace {
    rate: u64,
    started: Instant,
    records: u64,
}

impl Pace {
    async fn take(&mut self, records: u64) {
        self.records += records;
        if self.rate == 0 {
            return;
        }
        let due = self.started + Duration::from_secs_f64(self.records as f64 / self.rate as f64);
        tokio::time::sleep_until(due).await;
    }
}

impl Membership {
    /// Copies every range this node will replicate under `layout` from the
    /// old replicas. `Ok` once every group was merged from enough of them.
    pub(super) async fn stream_all(self: &Arc<Self>, layout: &Layout) -> Result<()> {
        let me = self.me.address.clone();
        let (groups, ranges_total) = plan(layout, &me);
        let (n_old, _) = layout.n_old_new();
        let needed_sources = n_old - Consistency::Quorum.required(n_old) + 1;
        let written_off = &layout.written_off;
        let started = Instant::now();
        {
            let mut progress = self.progress.locked();
            // A stall lasts across attempts until one succeeds.
            let stalled = progress.as_ref().and_then(|p| p.stalled.clone());
            *progress = Some(MoveProgress {
                layout_version: layout.version,
                ranges_total,
                started,
                stalled,
                ..MoveProgress::default()
            });
        }
        let pace = Arc::new(tokio::sync::Mutex::new(Pace {
            rate: self.stream_rate,
            started,
            records: 0,
        }));
        let mut done_share = 0.0;
        let mut done_intervals = 0usize;
        for group in groups {
            let (share, intervals) = (group.shares.iter().sum::<f64>(), group.intervals.len());
            let done = (done_share, done_intervals);
            // A range held by a member whose copies --allow-data-loss
            // wrote off is rebuilt from the others (all of them that are
            // left); every other range needs N−W+1 sources.
            let left = group
                .sources
                .iter()
                .filter(|s| !written_off.contains(s))
                .count();
            let needed = if left < group.sources.len() {
                needed_sources.min(left)
            } else {
                needed_sources
            };
            self.copy_group(layout.version, group, &pace, done, needed)
                .await?;
            done_share += share;
            done_intervals += intervals;
        }
        self.report_streamed(layout.version, ranges_total, started);
        Ok(())
    }

    /// Copies one group of ranges for layout `version`: from the replica
    /// giving them up when it is up and can, else from every old replica,
    /// `Ok` once `needed_sources` of them finished. `done` is the share of
    /// the hash space and the intervals streamed before it.
    async fn copy_group(
        self: &Arc<Self>,
        version: u64,
        group: Group,
        pace: &Arc<tokio::sync::Mutex<Pace>>,
        done: (f64, usize),
        needed_sources: usize,
    ) -> Result<()> {
        let (done_share, done_intervals) = done;
        let group = Arc::new(group);
        let stream_from = |source: &String| {
            self.clone().stream_group(
                source.clone(),
                version,
                group.clone(),
                pace.clone(),
                done_share,
                done_intervals,
            )
        };
        if let Some(giver) = &group.giver
            && self.cluster.liveness.is_up(giver)
        {
            match stream_from(giver).await {
                Ok(()) => return Ok(()),
                Err(why) => tracing::warn!(
                    %giver, %why,
                    "the replica giving up these ranges could not stream them; streaming from every old replica instead"
                ),
            }
        }
        // Every old replica streams to the end (each merge is useful);
        // the group counts once enough of them finished.
        let mut streams = FanOut::new(Stragglers::Abandon);
        for (index, source) in group.sources.iter().enumerate() {
            streams.send(index, stream_from(source));
        }
        let mut merged = Sources::new(&group.sources);
        streams.collect(&mut merged, None).await;
        let needed = needed_sources.min(group.sources.len());
        if merged.merged < needed {
            return Err(Error::Unavailable(format!(
                "streamed a range group from {} of its old replicas, {needed} needed (so no acknowledged write is missed): {}",
                merged.merged,
                merged.failures.join("; ")
            )));
        }
        if !merged.failures.is_empty() {
            tracing::warn!(failures = %merged.failures.join("; "), merged = merged.merged, "some old replicas could not stream; enough others did");
        }
        Ok(())
    }

    /// Marks the join's progress complete and logs how fast it went.
    fn report_streamed(&self, version: u64, ranges_total: u32, started: Instant) {
        let (keys, records) = match self.progress.locked().as_mut() {
            Some(progress) => {
                progress.done_share = 1.0;
                progress.ranges_done = ranges_total;
                progress.stalled = None;
                (progress.keys_moved, progress.records_received)
            }
            None => (0, 0),
        };
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            version,
            seconds,
            keys,
            records,
            keys_per_sec = (keys as f64 / seconds.max(1e-3)) as u64,
            records_per_sec = (records as f64 / seconds.max(1e-3)) as u64,
            "joining: every range streamed"
        );
    }

    /// Opens `source`'s stream of `request`. A source not yet serving the
    /// join's layout says so: ask again, for a bounded time (one that
    /// cannot adopt it, its disk full, must not stall the join: the other
    /// old replicas stream instead).
    async fn open_stream(&self, source: &str, request: StreamRequest) -> Result<RecordChunks> {
        let (peers, timeout) = (&self.cluster.peers, self.cluster.rpc_timeout * 4);
        let give_up = Instant::now() + SOURCE_CATCH_UP_WAIT;
        loop {
            match peers.stream_records(source, timeout, request.clone()).await {
                Ok(stream) => return Ok(stream),
                Err(why) if crate::net::is_not_serving_yet(&why) && Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(why) => return Err(why),
            }
        }
    }

    /// Merges one group's intervals from `source`.
    async fn stream_group(
        self: Arc<Self>,
        source: String,
        version: u64,
        group: Arc<Group>,
        pace: Arc<tokio::sync::Mutex<Pace>>,
        done_before: f64,
        intervals_before: usize,
    ) -> Result<()> {
        let request = StreamRequest {
            layout_version: version,
            intervals: group.intervals.clone(),
            after: Vec::new(),
            cluster_id: 0,
        };
        let mut stream = self.open_stream(&source, request).await?;
        let idle = self.cluster.rpc_timeout * 10;
        let mut intervals_done = 0usize;
        loop {
            let chunk = match stream.next(idle).await? {
                Some(chunk) => chunk,
                // Complete only if the source said it finished every
                // interval: a stream cut short can also end cleanly.
                None if intervals_done == group.intervals.len() => break,
                None => {
                    return Err(Error::Unavailable(format!(
                        "the stream ended after {intervals_done} of {} intervals",
                        group.intervals.len()
                    )));
                }
            };
            let records = chunk.records;
            intervals_done = intervals_done.max(chunk.intervals_done as usize);
            pace.lock().await.take(records.len() as u64).await;
            // Off the async threads: a node runs its heartbeats and
            // requests there, and a chunk is a thousand writes.
            let replica = self.replica.clone();
            let (records, outcomes) = crate::seams::blocking(move || {
                let outcomes = replica.write_many(records.iter().map(|(k, r)| (k.as_str(), r)));
                (records, outcomes)
            })
            .await
            .map_err(|e| Error::Internal(format!("applying a streamed chunk: {e}")))?;
            let (mut keys, mut bytes) = (0u64, 0u64);
            for ((key, record), outcome) in records.iter().zip(outcomes) {
                if outcome?.applied {
                    keys += 1;
                    bytes += (key.len() + record.value.as_ref().map_or(0, |v| v.len())) as u64;
                }
            }
            let finished: f64 = group.shares
                [..(chunk.intervals_done as usize).min(group.shares.len())]
                .iter()
                .sum();
            if let Some(progress) = self.progress.locked().as_mut() {
                progress.keys_moved += keys;
                progress.records_received += records.len() as u64;
                progress.bytes_moved += bytes;
                progress.done_share = progress.done_share.max(done_before + finished);
                progress.ranges_done = progress
                    .ranges_done
                    .max((intervals_before + intervals_done.min(group.intervals.len())) as u32);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_stream_request_names_more_intervals_than_any_source_accepts() {
        let addresses: Vec<String> = (1..=4).map(|i| format!("127.0.0.1:700{i}")).collect();
        let layout = Layout::bootstrap(&addresses, 3, 4096)
            .begin_join("127.0.0.1:7005")
            .expect("join");
        let (groups, intervals) = plan(&layout, "127.0.0.1:7005");
        assert!(
            intervals as usize > 4 * INTERVALS_PER_REQUEST,
            "{intervals}"
        );
        const { assert!(INTERVALS_PER_REQUEST <= crate::config::MIN_MAX_BATCH_ITEMS) };
        for group in &groups {
            assert!(group.intervals.len() <= INTERVALS_PER_REQUEST);
            assert_eq!(group.intervals.len(), group.shares.len());
        }
        assert_eq!(
            intervals as usize,
            groups.iter().map(|g| g.intervals.len()).sum::<usize>()
        );
    }

    #[test]
    fn a_joiner_receives_about_its_share_from_the_old_replicas() {
        let addresses: Vec<String> = (1..=4).map(|i| format!("127.0.0.1:700{i}")).collect();
        let layout = Layout::bootstrap(&addresses, 3, 64)
            .begin_join("127.0.0.1:7005")
            .expect("join");
        let (groups, intervals) = plan(&layout, "127.0.0.1:7005");
        assert_eq!(
            intervals as usize,
            groups.iter().map(|g| g.intervals.len()).sum::<usize>()
        );
        let total: f64 = groups.iter().flat_map(|g| g.shares.iter()).sum();
        // With N = 3 of 5 members, the newcomer replicates about 3/5.
        assert!((total - 0.6).abs() < 0.15, "share {total}");
        for group in &groups {
            assert_eq!(group.sources.len(), 3, "every old replica is a source");
            assert!(!group.sources.contains(&"127.0.0.1:7005".to_string()));
            // One new replica in a set of three: exactly one old one leaves.
            let giver = group
                .giver
                .as_ref()
                .expect("one replica gives the range up");
            assert!(group.sources.contains(giver));
        }
        // The intervals are exactly the newcomer's: every key hash in them
        // has it among its replicas in the target ring.
        let target = layout.target_ring();
        for group in &groups {
            for &(first, last) in &group.intervals {
                for hash in [first, last, first / 2 + last / 2] {
                    let replicas = target.range_replicas(target.range_of(hash), 3);
                    assert!(replicas.iter().any(|m| m.address == "127.0.0.1:7005"));
                }
            }
        }
    }
}
