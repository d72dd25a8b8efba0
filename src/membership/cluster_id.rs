//! Agreeing on the cluster id before serving clients.
//!
//! A node answers client requests only once it holds a layout with a
//! cluster id that a majority of the first members confirm:
//!
//! * without an id (a cluster started without `--cluster-token`, or a data
//!   dir from a release before cluster ids), the first member by address
//!   this node believes up proposes the change that assigns a random one
//!   (or `--cluster-token`'s), through the normal Paxos [`Membership::propose`];
//!   the change that commits was accepted by a majority, so once a node
//!   holds it, the id is agreed;
//! * a first layout that has an id (`--cluster-token`) is confirmed by
//!   fetching the layout of each first member: a majority (this node
//!   included) must hold the same first layout (its hash), or a later one
//!   of the same cluster. It never waits for more than a majority.
//!
//! Any later version with an id was committed by a majority, so a node
//! restarted with one is agreed at once; so is a node that confirmed its
//! first layout before a restart (it keeps the id it agreed on in its
//! data dir, [`AGREED_META`]). Until agreed, health is NOT_SERVING and
//! client requests are refused with UNAVAILABLE.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::Membership;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::layout::cluster_id::{random_id, show};
use crate::locks::Locked;
use crate::serving::layout_file::layout_hash;
use crate::storage::Storage;

/// The storage meta entry holding the cluster id this node agreed on.
pub const AGREED_META: &str = "cluster_id_agreed";

/// How often a node still waiting says so in its log.
const WAITING_LOG_EVERY: Duration = Duration::from_secs(5);

/// Whether this node's cluster id is agreed, and what it waits for.
pub struct Agreement {
    /// True once agreed; never false again.
    agreed: tokio::sync::watch::Sender<bool>,
    /// The id to assign when the layout has none: --cluster-token's (0: a
    /// random one).
    wish: AtomicU64,
    /// What this node waits for, and when that was last logged (std mutex:
    /// one update).
    waiting: Mutex<(String, Option<Instant>)>,
    /// Where the agreed id is kept across restarts (none: in memory only).
    kept_in: std::sync::OnceLock<Arc<dyn Storage>>,
}

impl Default for Agreement {
    fn default() -> Self {
        Self {
            agreed: tokio::sync::watch::Sender::new(false),
            wish: AtomicU64::new(0),
            waiting: Mutex::new((String::new(), None)),
            kept_in: std::sync::OnceLock::new(),
        }
    }
}

impl Agreement {
    fn waiting(&self, why: String) {
        let mut waiting = self.waiting.locked();
        let now = Instant::now();
        let due = waiting
            .1
            .is_none_or(|at| now.saturating_duration_since(at) >= WAITING_LOG_EVERY);
        if due || waiting.0 != why {
            tracing::info!("not answering clients yet: {why}");
            waiting.1 = Some(now);
        }
        waiting.0 = why;
    }

    fn agree(&self, layout: &Layout) {
        if !*self.agreed.borrow() {
            if let Some(storage) = self.kept_in.get()
                && let Err(why) = storage.put_meta_durable(AGREED_META, layout.cluster_id)
            {
                tracing::warn!(%why, "cannot record the agreed cluster id; a restart confirms it again");
            }
            tracing::info!(
                cluster_id = show(layout.cluster_id),
                version = layout.version,
                "the cluster id is agreed: answering clients"
            );
            self.agreed.send_replace(true);
        }
    }
}

impl Membership {
    /// Sets the id to assign when the layout has none (--cluster-token's).
    pub fn wish_cluster_id(&self, id: u64) {
        self.agreement.wish.store(id, Ordering::Relaxed);
    }

    /// Keeps the agreed cluster id in `storage` from now on; agreed at once
    /// when `storage` holds the id of the layout served (agreed before a
    /// restart).
    pub fn keep_agreement_in(&self, storage: Arc<dyn Storage>) -> Result<()> {
        let kept = storage.get_meta(AGREED_META)?;
        let layout = self.layout();
        let _ = self.agreement.kept_in.set(storage);
        // Agreed before a restart, or a layout a majority committed.
        if layout.cluster_id != 0 && (kept == Some(layout.cluster_id) || layout.version > 1) {
            self.agreement.agree(&layout);
        }
        Ok(())
    }

    /// Whether this node's cluster id is agreed (it serves clients).
    pub fn is_agreed(&self) -> bool {
        *self.agreement.agreed.borrow()
    }

    /// Completes once this node's cluster id is agreed.
    pub async fn agreed(&self) {
        let mut agreed = self.agreement.agreed.subscribe();
        let _ = agreed.wait_for(|agreed| *agreed).await;
    }

    /// `Err(Unavailable)` saying what this node waits for, until its
    /// cluster id is agreed.
    pub fn refuse_until_agreed(&self) -> Result<()> {
        if self.is_agreed() {
            return Ok(());
        }
        let why = self.agreement.waiting.locked().0.clone();
        Err(Error::Unavailable(format!(
            "this node does not serve clients yet: its cluster id is not agreed ({}); retry shortly or ask another node",
            if why.is_empty() { "starting" } else { &why }
        )))
    }

    /// One step towards an agreed cluster id (see the module doc); nothing
    /// once agreed.
    pub(super) async fn cluster_id_step(&self) {
        if self.is_agreed() {
            return;
        }
        let layout = self.layout();
        if layout.cluster_id == 0 {
            self.assign_cluster_id(&layout).await;
        }
        let layout = self.layout();
        if layout.cluster_id == 0 {
            return;
        }
        if layout.version > 1 {
            self.agreement.agree(&layout);
            return;
        }
        self.confirm_first_layout(&layout).await;
    }

    /// The first member this node believes up proposes the id.
    async fn assign_cluster_id(&self, layout: &Layout) {
        if !self.is_first_up(layout) {
            self.agreement.waiting(format!(
                "layout v{} has no cluster id; waiting for the first member up to assign one",
                layout.version
            ));
            return;
        }
        let id = match self.agreement.wish.load(Ordering::Relaxed) {
            0 => random_id(crate::seams::random_u64()),
            wish => wish,
        };
        match self
            .propose(|l| l.assign_cluster_id(id), |l| l.cluster_id != 0)
            .await
        {
            Ok(assigned) => tracing::info!(
                cluster_id = show(assigned.cluster_id),
                version = assigned.version,
                "cluster id assigned"
            ),
            Err(why) => self
                .agreement
                .waiting(format!("cannot assign a cluster id yet: {why}")),
        }
    }

    /// A first layout with an id (a token's): agreed once a majority of its
    /// members hold it (the same hash), or a later layout of the cluster.
    async fn confirm_first_layout(&self, layout: &Layout) {
        let hash = layout_hash(layout);
        let (peers, timeout) = (&self.cluster.peers, self.cluster.rpc_timeout);
        let others: Vec<&str> = layout
            .members
            .iter()
            .map(|m| m.address.as_str())
            .filter(|a| *a != self.me.address)
            .collect();
        let fetched =
            futures::future::join_all(others.iter().map(|a| peers.fetch_layout(a, timeout))).await;
        let mut confirmed = 1;
        let mut differ = Vec::new();
        for (address, answer) in others.iter().zip(fetched) {
            match answer {
                Ok(theirs)
                    if theirs.cluster_id == layout.cluster_id
                        && (theirs.version > 1 || layout_hash(&theirs) == hash) =>
                {
                    confirmed += 1
                }
                Ok(theirs) => differ.push(format!(
                    "{address} holds layout v{} of cluster {}",
                    theirs.version,
                    show(theirs.cluster_id)
                )),
                Err(_) => {}
            }
        }
        let majority = layout.members.len() / 2 + 1;
        if confirmed >= majority {
            self.agreement.agree(layout);
            return;
        }
        let mut why = format!(
            "{confirmed} of {} first members confirm layout v1 of cluster {}, {majority} needed",
            layout.members.len(),
            show(layout.cluster_id)
        );
        if !differ.is_empty() {
            why.push_str(&format!(
                " ({}: were they started with other --peers or --cluster-token?)",
                differ.join("; ")
            ));
        }
        self.agreement.waiting(why);
    }
}
