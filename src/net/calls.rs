//! Node-to-node calls in plain Rust types: each dials the peer, sends the
//! protobuf form, waits at most `timeout`, and answers the checked Rust
//! form. The protocols (layout agreement, joins, heartbeats, hinted
//! handoff, anti-entropy) call these and never see the generated code.
//! Replica reads and writes go through [`super::ReplicaHandle`] instead.

use std::time::Duration;

use super::messages::{Ping, Pong, StreamChunk, StreamRequest, stream_chunk_from};
use super::{PeerChannel, PeerPool, call_within, describe_status};
use crate::clock::{InstanceId, SkewBound};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::layout::paxos::Ballot;
use crate::layout::verify::Vouch;
use crate::paxos::{Accepted, Promise};
use crate::pb;
use crate::record::Record;
use crate::replica::RangeEntry;

/// Which of the asking node's token ranges a digest or listing call is
/// about: both sides must see the same ring.
#[derive(Clone, Debug)]
pub struct RangeQuery {
    /// The asking node's address, as it appears in `--peers`.
    pub asker: String,
    pub range_count: u32,
    pub layout_version: u64,
    /// A key listing's (the peer refuses while its read gate is closed).
    pub for_listing: bool,
}

/// One page of a peer's range listing.
#[derive(Debug, Default)]
pub struct RangeEntriesPage {
    /// The entries whose version is within the skew bound.
    pub entries: Vec<RangeEntry>,
    /// The keys of the others (neither pulled nor answered with a push).
    pub refused: Vec<String>,
    /// The storage key the next page starts after (`None`: the range is done).
    pub next: Option<Vec<u8>>,
}

impl PeerPool {
    /// The cluster id node-to-node calls carry (0: none yet).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the cluster id node-to-node calls carry: the layout owner's,
    /// or a joiner's --cluster-token.
    pub fn set_cluster_id(&self, id: u64) {
        self.cluster_id
            .store(id, std::sync::atomic::Ordering::Relaxed);
    }

    /// `Membership.GetLayout`: the layout `address` serves, checked whole.
    pub async fn fetch_layout(&self, address: &str, timeout: Duration) -> Result<Layout> {
        let mut client = self.membership_client(address)?;
        let layout = call_within(timeout, client.get_layout(pb::GetLayoutRequest {})).await?;
        pb::layout_from(layout)
            .map_err(|why| Error::Unavailable(format!("{address} sent a bad layout: {why}")))
    }

    /// `Membership.LayoutPrepare`: the acceptor's promise, or why there is
    /// none (a future that owns what it needs, to run in a fan-out).
    pub fn layout_prepare(
        &self,
        address: &str,
        timeout: Duration,
        version: u64,
        ballot: Ballot,
        base_hash: u64,
    ) -> impl std::future::Future<Output = Promise<Layout>> + Send + 'static {
        let request = pb::LayoutPrepareRequest {
            version,
            ballot: Some(ballot.into()),
            base_hash,
            cluster_id: self.cluster_id(),
        };
        let call = self.membership_call(address, timeout, move |mut c| async move {
            c.layout_prepare(request).await
        });
        async move {
            match call {
                Ok(call) => call.await.map_or_else(Promise::Failed, pb::promise_from),
                Err(why) => Promise::Failed(why),
            }
        }
    }

    /// `Membership.LayoutAccept`: the acceptor's answer, or why there is
    /// none (a future that owns what it needs, to run in a fan-out).
    pub fn layout_accept(
        &self,
        address: &str,
        timeout: Duration,
        ballot: Ballot,
        layout: &Layout,
        base_hash: u64,
    ) -> impl std::future::Future<Output = Accepted<Layout>> + Send + 'static {
        let request = pb::LayoutAcceptRequest {
            ballot: Some(ballot.into()),
            layout: Some(layout.into()),
            base_hash,
            cluster_id: self.cluster_id(),
        };
        let call = self.membership_call(address, timeout, move |mut c| async move {
            c.layout_accept(request).await
        });
        async move {
            match call {
                Ok(call) => call.await.map_or_else(Accepted::Failed, pb::accepted_from),
                Err(why) => Accepted::Failed(why),
            }
        }
    }

    /// `Membership.LayoutVouch`: what `address` knows about layout
    /// `version` (a future that owns what it needs, to run in a fan-out).
    pub fn layout_vouch(
        &self,
        address: &str,
        timeout: Duration,
        version: u64,
    ) -> impl std::future::Future<Output = std::result::Result<Vouch, String>> + Send + 'static
    {
        let request = pb::LayoutVouchRequest { version };
        let call = self.membership_call(address, timeout, move |mut c| async move {
            c.layout_vouch(request).await
        });
        async move { call?.await.map(Vouch::from) }
    }

    /// `Membership.LayoutCommit`: tells `address` that `layout` is committed.
    pub async fn layout_commit(
        &self,
        address: &str,
        timeout: Duration,
        layout: &Layout,
    ) -> Result<()> {
        let mut client = self.membership_client(address)?;
        call_within(timeout, client.layout_commit(pb::Layout::from(layout))).await?;
        Ok(())
    }

    /// `Membership.Join`: asks `seed` to add `address`; the layout that has
    /// it joining. A seed that refuses (a change in progress) answers
    /// `FailedPrecondition`.
    pub async fn join(&self, seed: &str, timeout: Duration, address: &str) -> Result<Layout> {
        self.join_as(seed, timeout, address, InstanceId::NONE, "")
            .await
    }

    /// [`PeerPool::join`] naming the joiner's instance (its data dir), which
    /// the layout records, and the dead member it replaces (empty: none).
    pub async fn join_as(
        &self,
        seed: &str,
        timeout: Duration,
        address: &str,
        instance: InstanceId,
        replaces: &str,
    ) -> Result<Layout> {
        let mut client = self.membership_client(seed)?;
        let request = pb::JoinRequest {
            address: address.to_string(),
            cluster_id: self.cluster_id(),
            instance_id: instance.0,
            replaces: replaces.to_string(),
        };
        match tokio::time::timeout(timeout, client.join(request)).await {
            Ok(Ok(layout)) => pb::layout_from(layout.into_inner())
                .map_err(|why| Error::Unavailable(format!("{seed} answered a bad layout: {why}"))),
            Ok(Err(status)) if status.code() == tonic::Code::FailedPrecondition => Err(
                Error::FailedPrecondition(format!("{seed} refused the join: {}", status.message())),
            ),
            Ok(Err(status)) => Err(Error::Unavailable(format!(
                "{seed}: {}",
                describe_status(&status)
            ))),
            Err(_) => Err(Error::Unavailable(format!(
                "{seed}: no answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// `Membership.StreamRecords`: opens a stream of `source`'s records.
    /// A source not yet serving the join's layout answers `Unavailable`
    /// saying so ([`is_not_serving_yet`]).
    pub async fn stream_records(
        &self,
        source: &str,
        timeout: Duration,
        mut request: StreamRequest,
    ) -> Result<RecordChunks> {
        let mut client = self.membership_client(source)?;
        if request.cluster_id == 0 {
            request.cluster_id = self.cluster_id();
        }
        match tokio::time::timeout(
            timeout,
            client.stream_records(pb::StreamRequest::from(request)),
        )
        .await
        {
            Ok(Ok(stream)) => Ok(RecordChunks {
                stream: stream.into_inner(),
                bound: self.skew_bound(),
            }),
            // Under mutual TLS a source whose layout does not name this
            // joiner yet refuses it at the door: like a source that has not
            // caught up, it is waited for (see `is_not_serving_yet`).
            Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => {
                Err(Error::Unavailable(format!(
                    "{source} is not yet the join's source: it refused this node ({})",
                    describe_status(&status)
                )))
            }
            Ok(Err(status)) => Err(Error::Unavailable(describe_status(&status))),
            Err(_) => Err(Error::Unavailable("no answer to the stream request".into())),
        }
    }

    /// `Liveness.Ping`: one heartbeat and its answer.
    pub async fn ping(&self, address: &str, timeout: Duration, mut ping: Ping) -> Result<Pong> {
        let mut client = self.liveness_client(address)?;
        if ping.cluster_id == 0 {
            ping.cluster_id = self.cluster_id();
        }
        let answer = call_within(timeout, client.ping(pb::PingRequest::from(ping))).await?;
        Ok(Pong::from(answer))
    }

    /// `Replica.StoreHint`: asks `holder` to keep a hint of `record` for
    /// `target`.
    pub async fn store_hint(
        &self,
        holder: &str,
        timeout: Duration,
        target: &str,
        key: &str,
        record: &Record,
    ) -> Result<()> {
        let mut client = self.replica_client(holder)?;
        let request = pb::StoreHintRequest {
            target: target.to_string(),
            key: key.to_string(),
            record: Some(record.into()),
        };
        call_within(timeout, client.store_hint(request))
            .await
            .map(|_| ())
            .map_err(|why| Error::Unavailable(format!("{holder}: {why}")))
    }

    /// `Replica.RangeDigests`: the root of the tree `peer` shares with the
    /// asker, and (with `leaves`) each shared range's digest.
    pub async fn range_digests(
        &self,
        peer: &str,
        timeout: Duration,
        query: &RangeQuery,
        leaves: bool,
    ) -> Result<(u64, Vec<(usize, u64)>)> {
        let mut client = self.replica_client(peer)?;
        let request = pb::RangeDigestsRequest {
            peer: query.asker.clone(),
            leaves,
            range_count: query.range_count,
            layout_version: query.layout_version,
        };
        let answer = call_within(timeout, client.range_digests(request)).await?;
        let leaves = answer
            .leaves
            .into_iter()
            .map(|leaf| (leaf.range as usize, leaf.digest))
            .collect();
        Ok((answer.root, leaves))
    }

    /// `Replica.RangeEntries`: every key of one range on `peer` with its
    /// version, page after page (each within `timeout`): how many were
    /// listed, and those whose version is within the skew bound (the
    /// others are neither pulled nor answered with a push: the peer must
    /// not spread them).
    pub async fn range_entries(
        &self,
        peer: &str,
        timeout: Duration,
        query: &RangeQuery,
        range: usize,
    ) -> Result<(usize, Vec<RangeEntry>)> {
        let (mut count, mut entries) = (0, Vec::new());
        let mut after = Vec::new();
        loop {
            let page = self
                .range_entries_page(peer, timeout, query, range, &after)
                .await?;
            count += page.entries.len() + page.refused.len();
            entries.extend(page.entries);
            match page.next {
                Some(next) => after = next,
                None => return Ok((count, entries)),
            }
        }
    }

    /// One page of `Replica.RangeEntries` on `peer`: the keys of `range`
    /// after storage key `after` (empty: from the start), as many as the
    /// peer's `--max-page-entries`. A peer of an earlier release answers
    /// the whole range without a cursor: one page.
    pub async fn range_entries_page(
        &self,
        peer: &str,
        timeout: Duration,
        query: &RangeQuery,
        range: usize,
        after: &[u8],
    ) -> Result<RangeEntriesPage> {
        let mut client = self.replica_client(peer)?;
        let request = pb::RangeEntriesRequest {
            range: range as u32,
            range_count: query.range_count,
            layout_version: query.layout_version,
            after: bytes::Bytes::copy_from_slice(after),
            // The peer's --max-page-entries.
            page_size: 0,
            for_listing: query.for_listing,
        };
        let answer = call_within(timeout, client.range_entries(request)).await?;
        let bound = self.skew_bound();
        let mut page = RangeEntriesPage::default();
        for entry in answer.entries {
            let key = entry.key.clone();
            match pb::range_entry_from(entry, bound) {
                Ok(entry) => page.entries.push(entry),
                Err(_) => page.refused.push(key),
            }
        }
        if !answer.next_after.is_empty() {
            // Each page must move on, or the listing would never end.
            if answer.next_after[..] <= *after {
                return Err(Error::Unavailable(format!(
                    "{peer}: its range listing did not advance past its cursor"
                )));
            }
            page.next = Some(answer.next_after.to_vec());
        }
        Ok(page)
    }

    /// One `Membership` call to `address` within `timeout`, as a future
    /// that owns what it needs (to run in a fan-out): its answer, or why
    /// there is none.
    fn membership_call<T, Call, Reply>(
        &self,
        address: &str,
        timeout: Duration,
        call: Call,
    ) -> std::result::Result<
        impl std::future::Future<Output = std::result::Result<T, String>> + Send + 'static,
        String,
    >
    where
        Call:
            FnOnce(pb::membership_client::MembershipClient<PeerChannel>) -> Reply + Send + 'static,
        Reply: std::future::Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>
            + Send,
        T: Send + 'static,
    {
        let client = self
            .membership_client(address)
            .map_err(|e| format!("{address}: {e}"))?;
        let address = address.to_string();
        Ok(async move {
            call_within(timeout, call(client))
                .await
                .map_err(|e| format!("{address}: {e}"))
        })
    }
}

/// Whether a stream request was refused only because the source does not
/// serve the join's layout yet (ask again shortly).
pub fn is_not_serving_yet(error: &Error) -> bool {
    matches!(error, Error::Unavailable(why) if why.contains("not yet the join's"))
}

/// The chunks of one `Membership.StreamRecords` answer.
pub struct RecordChunks {
    stream: tonic::Streaming<pb::StreamChunk>,
    bound: SkewBound,
}

impl RecordChunks {
    /// The next chunk, checked; `None` when the source ended the stream;
    /// an error when it failed or sent nothing for `idle`.
    pub async fn next(&mut self, idle: Duration) -> Result<Option<StreamChunk>> {
        match tokio::time::timeout(idle, self.stream.message()).await {
            Ok(Ok(Some(chunk))) => stream_chunk_from(chunk, self.bound).map(Some),
            Ok(Ok(None)) => Ok(None),
            Ok(Err(status)) => Err(Error::Unavailable(describe_status(&status))),
            Err(_) => Err(Error::Unavailable(format!(
                "the stream stalled for {} ms",
                idle.as_millis()
            ))),
        }
    }
}
