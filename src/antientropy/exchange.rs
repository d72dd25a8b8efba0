//! One anti-entropy exchange with a peer: compare roots, then leaves, then
//! list each differing range on both sides and copy what differs, through
//! write-if-newer. Copies both ways are fenced by the layout version the
//! ranges were listed at: the side storing one refuses it unless it
//! replicates the key at the layout it serves (`replica/fence.rs`).

use std::sync::atomic::Ordering;

use super::{
    AntiEntropy, COPY_CONCURRENCY, MAX_RANGES_PER_ROUND, differing, plan, root, window_end,
};
use crate::clock::{Version, wall_clock_ms};
use crate::error::{Error, Result};
use crate::fanout::{FanOut, Stragglers, Tally};
use crate::net::RangeQuery;
use crate::net::{ReplicaError, ReplicaHandle};
use crate::placement::Placement;
use crate::record::Record;
use crate::replica::{RangeEntry, WriteOutcome, storage_key};

/// Keys of this node's own listing per window (the peer's pages are its
/// --max-page-entries).
const MY_PAGE_ENTRIES: usize = crate::config::DEFAULT_MAX_PAGE_ENTRIES;

use super::SyncPlan;

impl AntiEntropy {
    /// Compares the tree shared with `peer` and copies what differs.
    /// Answers how many keys were copied; an error when any part of the
    /// exchange failed (after doing the rest), so only a complete exchange
    /// counts as one.
    pub async fn exchange_with(&self, view: &Placement, peer: &str) -> Result<u64> {
        self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
        let mine = self.leaves_with(view, peer);
        let query = RangeQuery {
            asker: view.me().to_string(),
            range_count: view.range_count() as u32,
            layout_version: view.version(),
            for_listing: false,
        };
        let (peers, timeout) = (&self.cluster.peers, self.cluster.rpc_timeout);
        let (their_root, _) = peers.range_digests(peer, timeout, &query, false).await?;
        if their_root == root(&mine) {
            self.stats.in_sync.fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        }
        let (_, theirs) = peers.range_digests(peer, timeout, &query, true).await?;
        let mut repaired = 0;
        let differing = differing(&mine, &theirs);
        let mut incomplete = differing.len().saturating_sub(MAX_RANGES_PER_ROUND);
        for range in differing.into_iter().take(MAX_RANGES_PER_ROUND) {
            // One failing range (too large, timed out) must not stop the others.
            match self.exchange_range(peer, range, &query).await {
                Ok(copied) => repaired += copied,
                Err(why) => {
                    incomplete += 1;
                    tracing::debug!(peer, range, %why, "anti-entropy skipped a range");
                }
            }
        }
        self.stats
            .keys_repaired
            .fetch_add(repaired, Ordering::Relaxed);
        if incomplete > 0 {
            return Err(Error::Unavailable(format!(
                "{incomplete} differing ranges not fully synced ({repaired} keys copied)"
            )));
        }
        Ok(repaired)
    }

    /// Lists one differing range on both sides and copies what differs,
    /// one window at a time: a page of each side's listing, cut where the
    /// nearer page ends, so neither listing is ever held whole.
    async fn exchange_range(&self, peer: &str, range: usize, query: &RangeQuery) -> Result<u64> {
        // Listed against this node's layout now, as the digests were.
        let query = RangeQuery {
            layout_version: self.cluster.placement().version(),
            ..query.clone()
        };
        let (peers, timeout) = (&self.cluster.peers, self.cluster.rpc_timeout);
        let (mut after, mut copied, mut refused, mut differed) = (Vec::new(), 0, 0, false);
        loop {
            let theirs = peers
                .range_entries_page(peer, timeout, &query, range, &after)
                .await?;
            let (mine, mine_next) =
                self.replica
                    .range_entries_page(range, &after, MY_PAGE_ENTRIES, usize::MAX)?;
            let end = window_end(mine_next.as_deref(), theirs.next.as_deref());
            let within = |key: &str| end.as_ref().is_none_or(|end| storage_key(key) <= *end);
            let mine: Vec<RangeEntry> = mine.into_iter().filter(|e| within(&e.key)).collect();
            let their_entries: Vec<RangeEntry> = theirs
                .entries
                .into_iter()
                .filter(|e| within(&e.key))
                .collect();
            refused += theirs.refused.iter().filter(|key| within(key)).count();
            let plan = plan(&mine, &their_entries, self.collectable(wall_clock_ms()));
            if !plan.pull.is_empty() || !plan.push.is_empty() {
                differed = true;
                copied += self.copy(peer, plan, query.layout_version).await?;
            }
            match end {
                Some(end) if end > after => after = end,
                Some(_) => {
                    return Err(Error::Unavailable(format!(
                        "{peer}: the listing of range {range} did not advance"
                    )));
                }
                None => break,
            }
        }
        // Digests differ but the listings agree: this node's digest of the
        // range is off (a recount raced a write): count it again.
        if !differed {
            let replica = self.replica.clone();
            crate::seams::blocking(move || replica.recount_range(range))
                .await
                .map_err(|e| Error::Internal(format!("range recount: {e}")))??;
        }
        if refused > 0 {
            // Not a complete exchange: a replacement must not count it.
            return Err(Error::Unavailable(format!(
                "{refused} of the peer's entries were beyond --max-clock-skew-ms and not copied"
            )));
        }
        Ok(copied)
    }

    /// Pulls what the peer holds newer and pushes what this node holds
    /// newer, [`COPY_CONCURRENCY`] keys at a time, each batch one fan-out;
    /// every copy placed with layout `layout_version`.
    async fn copy(&self, peer: &str, plan: SyncPlan, layout_version: u64) -> Result<u64> {
        let remote = self.cluster.peers.replica_handle(peer, None)?;
        let timeout = self.cluster.rpc_timeout;
        let mut copies = Copies::default();
        for chunk in plan.pull.chunks(COPY_CONCURRENCY) {
            let mut reads = FanOut::new(Stragglers::Abandon);
            for (index, key) in chunk.iter().enumerate() {
                let (remote, key) = (remote.clone(), key.clone());
                reads.send(
                    index,
                    async move { remote.read_for_repair(&key, timeout).await },
                );
            }
            let mut pulled = Pulled {
                keys: chunk,
                records: Vec::new(),
                failed: &mut copies.failed,
                asked: chunk.len(),
                answered: 0,
            };
            reads.collect(&mut pulled, None).await;
            for (key, record) in pulled.records {
                // Against the layout served now: it may have moved on.
                let view = self.cluster.placement();
                if self
                    .replica
                    .write_copy(layout_version, &view, key, &record)?
                    .applied
                {
                    copies.copied += 1;
                }
            }
        }
        let pushed = self.push(&remote, layout_version, &plan.push).await?;
        copies.copied += pushed.copied;
        copies.failed.extend(pushed.failed);
        if let Some(first) = copies.failed.first() {
            return Err(Error::Unavailable(format!(
                "{} of the keys to copy failed ({} copied), e.g. {first}",
                copies.failed.len(),
                copies.copied
            )));
        }
        Ok(copies.copied)
    }
}

impl AntiEntropy {
    /// Pushes this node's records of `keys` to the peer `remote`, as copies
    /// placed with layout `layout_version`, [`COPY_CONCURRENCY`] at a time.
    /// Answers how many the peer stored, and each key it did not confirm
    /// holding at the pushed version or a newer one.
    pub(super) async fn push(
        &self,
        remote: &ReplicaHandle,
        layout_version: u64,
        keys: &[String],
    ) -> Result<Copies> {
        let mut remote = remote.clone();
        remote.layout_version = layout_version;
        let timeout = self.cluster.rpc_timeout;
        let mut copies = Copies::default();
        for chunk in keys.chunks(COPY_CONCURRENCY) {
            // Every write is waited for; only a shutdown stops the batch
            // early, and a copy left unsent is made again next round.
            let mut writes = FanOut::new(Stragglers::Abandon);
            let mut versions = Vec::with_capacity(chunk.len());
            for key in chunk {
                if let Some(record) = self.replica.read(key)? {
                    let (remote, key) = (remote.clone(), key.clone());
                    versions.push(record.version);
                    writes.send(versions.len() - 1, async move {
                        remote.write_copy(&key, &record, timeout).await
                    });
                }
            }
            let mut pushed = Pushed {
                copies: &mut copies,
                versions: &versions,
                answered: 0,
            };
            writes.collect(&mut pushed, None).await;
        }
        Ok(copies)
    }
}

/// What one exchange copied, and the keys it could not.
#[derive(Default)]
pub(super) struct Copies {
    pub(super) copied: u64,
    pub(super) failed: Vec<String>,
}

/// One batch of reads from the peer: the records to merge here.
struct Pulled<'a> {
    keys: &'a [String],
    records: Vec<(&'a str, Record)>,
    failed: &'a mut Vec<String>,
    asked: usize,
    answered: usize,
}

impl Tally<Result<Option<Record>, ReplicaError>> for Pulled<'_> {
    type Verdict = ();

    fn record(&mut self, index: usize, reply: Result<Option<Record>, ReplicaError>) {
        self.answered += 1;
        let key = &self.keys[index];
        match reply {
            Ok(Some(record)) => self.records.push((key.as_str(), record)),
            Ok(None) => {}
            Err(why) => self
                .failed
                .push(format!("key {}: {why}", crate::metrics::key_hash(key))),
        }
    }

    /// Every key of the batch answered.
    fn verdict(&self) -> Option<()> {
        (self.answered == self.asked).then_some(())
    }
}

/// One batch of writes to the peer.
struct Pushed<'a> {
    copies: &'a mut Copies,
    /// The version pushed, per write.
    versions: &'a [Version],
    answered: usize,
}

impl Tally<Result<WriteOutcome, ReplicaError>> for Pushed<'_> {
    type Verdict = ();

    fn record(&mut self, index: usize, reply: Result<WriteOutcome, ReplicaError>) {
        self.answered += 1;
        let pushed = self.versions.get(index).copied().unwrap_or_default();
        match reply {
            Ok(outcome) if outcome.applied => self.copies.copied += 1,
            // Not stored because it holds the version, or a newer one.
            Ok(outcome) if outcome.held >= pushed => {}
            Ok(outcome) => self.copies.failed.push(format!(
                "it answered holding {} below the {pushed} pushed",
                outcome.held
            )),
            Err(why) => self.copies.failed.push(why.to_string()),
        }
    }

    /// Every write of the batch answered.
    fn verdict(&self) -> Option<()> {
        (self.answered == self.versions.len()).then_some(())
    }
}
