//! Key listings (`KeyValue.List`, `GET /v1/kv?prefix=`, `DKVSClient
//! list`): the async shell around [`order`].
//!
//! A listing walks the ring in storage-key order (each key's hash, then the
//! key), one stretch of a token range at a time. Each stretch is read from
//! as many of its replicas as the consistency asks (QUORUM: N/2+1, which
//! meets every set of W replicas that acknowledged a write), one page of
//! each, merged: the newest version of a key wins, deleted keys are left
//! out, and the window ends where the nearest page stopped, so a key is
//! never reported from a listing that may be incomplete. A call returns at
//! most `limit` keys and a cursor (a position, valid across layout
//! changes); it reads at most [`WINDOWS_PER_CALL`] windows, so a call on a
//! sparse prefix may return fewer keys, even none, with a cursor. Every
//! node holds at most one page per replica asked at a time.

pub mod order;

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::net::RangeQuery;
use crate::placement::Placement;
use crate::quorum::Consistency;
use crate::replica::ReplicaStore;
use crate::serving::ClusterView;

pub use order::{Listed, Position};
use order::{ReplicaPage, Stretch, merge, next_stretch};

/// Windows (one page per replica asked) one call reads at most; the
/// call's time budget usually ends it first on a large cluster. An empty
/// stretch costs one small call per replica asked.
pub const WINDOWS_PER_CALL: usize = 1024;

/// The most keys one call returns.
pub const MAX_LIMIT: usize = 10_000;

/// What a client asks.
#[derive(Clone, Debug)]
pub struct ListRequest {
    /// Only keys that start with it.
    pub prefix: String,
    /// At most this many keys (1..=[`MAX_LIMIT`]).
    pub limit: usize,
    /// Where to resume (the previous page's cursor).
    pub from: Position,
    pub consistency: Consistency,
}

/// One page of a listing.
#[derive(Clone, Debug)]
pub struct ListPage {
    pub keys: Vec<Listed>,
    /// Where the next page starts; `None`: the listing is complete.
    pub next: Option<Position>,
}

/// Lists keys for one node.
pub struct Lister<'a> {
    pub cluster: &'a ClusterView,
    pub replica: &'a ReplicaStore,
    /// Entries per page asked of each replica (`--max-page-entries`).
    pub page_entries: usize,
    /// How long one call may read before it returns what it has.
    pub budget: Duration,
}

impl Lister<'_> {
    /// One page of the listing `request` asks for.
    pub async fn list(&self, request: &ListRequest) -> Result<ListPage> {
        let limit = request.limit.clamp(1, MAX_LIMIT);
        let started = Instant::now();
        let (mut at, mut keys) = (request.from.clone(), Vec::new());
        for _ in 0..WINDOWS_PER_CALL {
            let view = self.cluster.placement();
            let stretch = next_stretch(view.ring(), &at);
            let pages = self.pages(&view, stretch, &at, request.consistency).await?;
            let window = merge(&pages, stretch, &at, &request.prefix);
            let room = limit - keys.len();
            if window.keys.len() > room {
                keys.extend(window.keys.into_iter().take(room));
                let last = keys.last().map(|l: &Listed| Position::after_key(&l.key));
                return Ok(ListPage { keys, next: last });
            }
            keys.extend(window.keys);
            match window.next {
                Some(next) => at = next,
                None => return Ok(ListPage { keys, next: None }),
            }
            if keys.len() == limit || started.elapsed() >= self.budget {
                break;
            }
        }
        Ok(ListPage {
            keys,
            next: Some(at),
        })
    }

    /// A page of `stretch` after `at` from as many of its replicas as
    /// `consistency` needs: this node first when it is one, then those
    /// believed up, then the others.
    async fn pages(
        &self,
        view: &Placement,
        stretch: Stretch,
        at: &Position,
        consistency: Consistency,
    ) -> Result<Vec<ReplicaPage>> {
        let mut replicas: Vec<&str> = view
            .ring()
            .range_replicas(stretch.range, view.replicas())
            .into_iter()
            .map(|m| m.address.as_str())
            .collect();
        let need = consistency.required(replicas.len());
        replicas.sort_by_key(|&a| (!view.is_me(a), !self.cluster.liveness.is_up(a)));
        let (mut pages, mut failures) = (Vec::new(), Vec::new());
        for replica in replicas {
            if pages.len() == need {
                break;
            }
            match self.page(view, replica, stretch.range, at).await {
                Ok(page) => pages.push(page),
                Err(why) => failures.push(format!("{replica}: {why}")),
            }
        }
        if pages.len() < need {
            return Err(Error::Unavailable(format!(
                "listing token range {}: {} of the {need} replicas needed answered ({}); ask again with the same cursor",
                stretch.range,
                pages.len(),
                failures.join("; ")
            )));
        }
        Ok(pages)
    }

    /// One replica's page of `range` after `at`, listed against `view`'s
    /// layout (a replica serving another refuses).
    async fn page(
        &self,
        view: &Placement,
        replica: &str,
        range: usize,
        at: &Position,
    ) -> Result<ReplicaPage> {
        if view.is_me(replica) {
            // Behind the read gate (a new data dir catching up): its
            // pages would vouch for keys it does not hold yet.
            if let Some(why) = self.replica.read_refusal() {
                return Err(Error::Unavailable(why));
            }
            // On the ring of the view's layout, checked under one lock.
            let (entries, next) = self.replica.range_entries_page_of(
                view.version(),
                range,
                at.as_bytes(),
                self.page_entries,
                usize::MAX,
            )?;
            return Ok(ReplicaPage { entries, next });
        }
        let query = RangeQuery {
            asker: view.me().to_string(),
            range_count: view.range_count() as u32,
            layout_version: view.version(),
            for_listing: true,
        };
        let page = self
            .cluster
            .peers
            .range_entries_page(
                replica,
                self.cluster.rpc_timeout,
                &query,
                range,
                at.as_bytes(),
            )
            .await?;
        // Entries it holds beyond the clock-skew bound are not listed by
        // it: another replica (or none) must answer for those keys.
        if !page.refused.is_empty() {
            return Err(Error::Unavailable(format!(
                "it holds {} keys of this range with versions beyond the clock-skew bound",
                page.refused.len()
            )));
        }
        // An honest page stops at its last entry: any other stop (shorter
        // than a storage key, or past what it listed) would end the
        // stretch early or make the listing crawl.
        if let Some(next) = &page.next {
            let last = page
                .entries
                .last()
                .map(|e| crate::storage::storage_key(&e.key));
            if last.as_ref() != Some(next) {
                return Err(Error::Unavailable(
                    "its page stopped somewhere other than at its last entry".into(),
                ));
            }
        }
        Ok(ReplicaPage {
            entries: page.entries,
            next: page.next,
        })
    }
}
