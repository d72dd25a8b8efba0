//! Starting a node that joins: the instance it joins as, the layout it
//! learns first, and the notice it stops with when its join was aborted.

use std::sync::Arc;

use super::{Node, is_fresh};
use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::identity::reserve_instance_id;
use crate::layout::Role;
use crate::net::Dialer;
use crate::serving::layout_file::LayoutStore;
use crate::storage::Storage;

/// How long `--join` asks its seeds: [`crate::membership::JOIN_RETRY_FOR`],
/// or the whole seconds in the environment variable DKVS_JOIN_RETRY_SECS
/// (not a flag: tests shorten it; an operator has no reason to).
fn join_retry_for() -> std::time::Duration {
    std::env::var("DKVS_JOIN_RETRY_SECS")
        .ok()
        .and_then(|secs| secs.trim().parse().ok())
        .map_or(
            crate::membership::JOIN_RETRY_FOR,
            std::time::Duration::from_secs,
        )
}

impl Node {
    /// [`Node::open`] for `DKVSServer`: with `--join` and a data dir that
    /// holds no layout yet, the data dir's instance id is created first and
    /// the seeds are asked to add this node as that instance (see
    /// [`crate::membership::request_join`]). A joiner restarted from its
    /// data dir asks the members for the newest layout before it serves: its
    /// join may have been aborted meanwhile, and then it stops
    /// ([`Node::removal_notice`]).
    pub async fn open_joining(config: ServerConfig, dialer: Arc<dyn Dialer>) -> Result<Arc<Self>> {
        config.validate().map_err(Error::InvalidArgument)?;
        let data_dir = config.data_dir();
        crate::storage::data_dir::prepare(&data_dir)?;
        let storage = Self::open_storage(&config)?;
        let store = LayoutStore::in_dir(&data_dir);
        Self::open_joining_with(config, storage, store, dialer).await
    }

    /// [`Node::open_joining`] over storage and a layout store already open
    /// (a simulation's, kept across its crashes).
    pub async fn open_joining_with(
        config: ServerConfig,
        storage: Arc<dyn Storage>,
        store: LayoutStore,
        dialer: Arc<dyn Dialer>,
    ) -> Result<Arc<Self>> {
        if config.force_new_layout {
            super::recovery::force_new_layout(&config, &store, dialer.clone()).await?;
        }
        let held = store.load()?.is_some_and(|s| s.committed.is_some());
        if held && !config.join_seeds().is_empty() {
            tracing::info!("the data dir holds a layout: rejoining with it (--join ignored)");
        }
        if !held && !config.join_seeds().is_empty() {
            let instance = reserve_instance_id(&*storage, is_fresh(&*storage)?)?;
            let retry_for = join_retry_for();
            Self::join_with_store_as(&config, &store, dialer.clone(), instance, retry_for).await?;
        }
        let node = Self::with_parts(config, storage, store, dialer)?;
        if held {
            node.learn_newest_if_joining().await;
        }
        Ok(node)
    }

    /// A node that is joining in the layout it holds fetches the newest
    /// layout from the members (once each, at most until one is newer).
    async fn learn_newest_if_joining(&self) {
        let layout = self.membership.layout();
        let joining = layout
            .member(&self.me.address)
            .is_some_and(|m| m.role == Role::Joining);
        if joining {
            self.cluster.catch_up(layout.version + 1, "").await;
        }
    }

    /// Why this node stopped serving, if a layout it learned removed its
    /// instance (`DKVSServer` exits 0 with it).
    pub fn removal_notice(&self) -> Option<&str> {
        self.removal.notice()
    }
}
