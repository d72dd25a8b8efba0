//! `DKVSServer --force-new-layout --allow-data-loss`: when a majority of
//! the members is lost for good, no layout change can commit any more (not
//! even the removes that would heal the cluster). This starts a new layout
//! from one survivor, offline, as etcd's `--force-new-cluster` does: the
//! survivor becomes the only member and every other member goes on the
//! removed list (see [`crate::layout::Layout::force_survivor`]). It is
//! refused while a majority of the voters this node knows still answers,
//! so a flag left in a service unit cannot split a healthy cluster.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::layout::paxos::LayoutState;
use crate::net::{Dialer, PeerPool};
use crate::serving::layout_file::{LayoutStore, layout_hash};

/// How long each other voter is given to answer before it counts as lost.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Stores the forced layout in `store`, once the held layout's other
/// voters were probed and a majority of them did not answer.
pub async fn force_new_layout(
    config: &ServerConfig,
    store: &LayoutStore,
    dialer: Arc<dyn Dialer>,
) -> Result<()> {
    let Some(held) = store.load()?.and_then(|s| s.committed) else {
        return Err(Error::FailedPrecondition(
            "--force-new-layout: the data dir holds no layout, so there is nothing to recover from; \
             start from a survivor's data dir"
                .into(),
        ));
    };
    let me = config.advertised_address();
    let voters = held.acceptors();
    let peers = PeerPool::new(dialer, 64 << 20);
    peers.set_cluster_id(held.cluster_id);
    let mut answering = Vec::new();
    for voter in voters.iter().filter(|v| **v != me) {
        if peers.fetch_layout(voter, PROBE_TIMEOUT).await.is_ok() {
            answering.push(voter.clone());
        }
    }
    let alive = answering.len() + usize::from(voters.contains(&me));
    if alive * 2 > voters.len() {
        return Err(Error::FailedPrecondition(format!(
            "--force-new-layout refused: {alive} of the {} voters of layout v{} answer ({}{me}), a majority: \
             the cluster is not lost. Use `DKVSClient cluster remove` for dead members, and remove the flag",
            voters.len(),
            held.version,
            answering
                .iter()
                .map(|a| format!("{a}, "))
                .collect::<String>()
        )));
    }
    let forced = held
        .force_survivor(&me, crate::clock::InstanceId::NONE)
        .map_err(|why| Error::FailedPrecondition(why.to_string()))?;
    let dropped: Vec<&str> = forced
        .removed
        .iter()
        .filter(|r| r.version == forced.version)
        .map(|r| r.address.as_str())
        .collect();
    tracing::warn!(
        version = forced.version,
        dropped = %dropped.join(", "),
        "FORCED A NEW LAYOUT (--force-new-layout --allow-data-loss): this node is now the only member; \
         writes only the dropped members held are lost. Wipe the other survivors' data dirs and --join them again, \
         and remove the flag"
    );
    let mut adopted = store.load()?.map(|s| s.adopted).unwrap_or_default();
    adopted.record(forced.version, layout_hash(&forced));
    store.save(&LayoutState {
        committed: Some(forced),
        adopted,
        ..LayoutState::default()
    })
}
