//! `DKVSServer --force-new-layout --allow-data-loss`: when a majority of
//! the members is lost for good, no layout change can commit any more (not
//! even the removes that would heal the cluster). This starts a new layout
//! from one survivor, offline, as etcd's `--force-new-cluster` does: the
//! survivor becomes the only member and every other member goes on the
//! removed list (see [`crate::layout::Layout::force_survivor`]). Nodes of
//! the old lineage cannot verify the new layout (their voters are mostly
//! gone) and are refused by its fences: they must be wiped and join. It
//! is refused while half or more of the voters of the layout it holds
//! answer (each member is asked three times over about 10 s: one still
//! booting is not lost), and when any member serves a newer layout (this
//! node is behind, not a survivor), so a flag left in a service unit
//! cannot split a healthy cluster.

use std::sync::Arc;
use std::time::Duration;

use crate::config::ServerConfig;
use crate::error::{Error, Result};
use crate::layout::paxos::LayoutState;
use crate::net::{Dialer, PeerPool};
use crate::serving::layout_file::{LayoutStore, layout_hash};

/// How long each other member is given to answer, how many times it is
/// asked, and the pause between rounds (about 10 s in all).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_ROUNDS: usize = 3;
const PROBE_PAUSE: Duration = Duration::from_secs(3);

/// The other members of `held` that answer, asked [`PROBE_ROUNDS`]
/// times (a member still booting after a power loss must not count as
/// lost); refused when one serves a newer layout.
async fn probe(
    held: &crate::layout::Layout,
    me: &str,
    dialer: Arc<dyn Dialer>,
) -> Result<Vec<String>> {
    let peers = PeerPool::new(dialer, 64 << 20);
    peers.set_cluster_id(held.cluster_id);
    let others: Vec<&String> = held
        .members
        .iter()
        .map(|m| &m.address)
        .filter(|a| *a != me)
        .collect();
    let mut answering: Vec<String> = Vec::new();
    for round in 0..PROBE_ROUNDS {
        if round > 0 {
            tokio::time::sleep(PROBE_PAUSE).await;
        }
        for other in &others {
            let Ok(theirs) = peers.fetch_layout(other, PROBE_TIMEOUT).await else {
                continue;
            };
            if theirs.version > held.version {
                return Err(Error::FailedPrecondition(format!(
                    "--force-new-layout refused: {other} serves layout v{}, newer than this node's v{}: \
                     the cluster goes on without this node (it is behind, not the survivor of a lost majority). \
                     Remove the flag",
                    theirs.version, held.version
                )));
            }
            if !answering.contains(other) {
                answering.push((*other).clone());
            }
        }
    }
    Ok(answering)
}

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
    let answering = probe(&held, &me, dialer).await?;
    let alive_voters = voters
        .iter()
        .filter(|v| **v == me || answering.contains(v))
        .count();
    if alive_voters * 2 >= voters.len() {
        return Err(Error::FailedPrecondition(format!(
            "--force-new-layout refused: {alive_voters} of the {} voters of layout v{} answer ({}{me}), half or more: \
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
