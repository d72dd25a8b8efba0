//! Who a node is: its member id and its instance id.
//!
//! A member has two identities. Its **member id** is its place on the ring
//! (a hash of its address): it decides which keys the node replicates, and
//! it stays the same when the machine behind the address is replaced. Its
//! **instance id** is random, created with its data dir and kept there: it
//! is what [`crate::clock::Version::node_id`] carries. A node whose data dir
//! was lost comes back at the same address as a *new instance*, so it never
//! issues a version its predecessor issued (its clock restarted from
//! nothing), and its peers can tell it apart from the node they knew.
//!
//! That matters for reads. An empty replica that answers a quorum read
//! counts as a replica that does not hold the key: two such answers out of
//! three, and a read misses an acknowledged write. So a node with a fresh
//! data dir first asks every peer it shares token ranges with which
//! instance they knew at its address (heartbeats carry it both ways). If
//! any knew another, the node is a replacement: it answers no replica reads
//! until it has completed one full anti-entropy pass with every such peer.
//! The state is persisted, so a crash during the catch-up resumes it.
//! Peers record the instance they know at each address, durably, and adopt
//! a new one only once it says it serves reads. A node learns only from the
//! answers to its *own* heartbeats, sent to the address it dialled: a ping
//! it receives could claim any sender, so it only prompts a heartbeat back.
//! A fresh node whose peer never answers (a new cluster where one member
//! never starts) opens once at least half its peers answered and the rest
//! are believed down.
//!
//! [`ReadGate`] is the pure state machine; [`Identity`] persists it.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::clock::InstanceId;
use crate::error::Result;
use crate::locks::Locked;
use crate::storage::Storage;

/// Metadata: this data dir's instance id.
const INSTANCE_ID: &str = "instance_id";
/// Metadata: 0 once the node may answer replica reads; 1 while its
/// identity is unverified; 2 while it is catching up as a replacement.
const READ_GATE: &str = "read_gate";
/// Metadata prefix: the instance id known at a peer's address.
const PEER_INSTANCE: &str = "peer_instance:";

/// Whether this node may answer replica reads, and what it waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadGate {
    /// Answers replica reads.
    Open,
    /// A fresh data dir: waiting to hear, from every peer it shares ranges
    /// with, which instance it knew at this address.
    Unverified {
        /// Peers that said they knew no other instance here.
        heard: BTreeSet<String>,
    },
    /// A replacement: waiting for one full anti-entropy pass with every
    /// peer it shares ranges with.
    CatchingUp {
        /// Peers synced with since the catch-up began.
        synced: BTreeSet<String>,
    },
}

impl ReadGate {
    /// Persisted form (see [`READ_GATE`]).
    fn code(&self) -> u64 {
        match self {
            ReadGate::Open => 0,
            ReadGate::Unverified { .. } => 1,
            ReadGate::CatchingUp { .. } => 2,
        }
    }

    fn from_code(code: u64) -> Self {
        match code {
            0 => ReadGate::Open,
            1 => ReadGate::Unverified {
                heard: BTreeSet::new(),
            },
            _ => ReadGate::CatchingUp {
                synced: BTreeSet::new(),
            },
        }
    }

    /// `peer` said it knew instance `known` at this address (0: none).
    /// `peers` are those this node shares ranges with.
    pub fn heard(
        &mut self,
        peer: &str,
        known: InstanceId,
        me: InstanceId,
        peers: &BTreeSet<String>,
    ) {
        if let ReadGate::Unverified { heard } = self {
            if !known.is_none() && known != me {
                *self = ReadGate::CatchingUp {
                    synced: BTreeSet::new(),
                };
                return;
            }
            heard.insert(peer.to_string());
            if peers.is_subset(heard) {
                *self = ReadGate::Open;
            }
        }
    }

    /// Opens an unverified gate once at least half the peers said they
    /// knew no other instance here and every other peer is believed down
    /// (`down`): a new cluster whose member never starts must still serve
    /// reads. A catch-up is not excused this way: a peer that is down may
    /// hold the only other copy of a write the lost instance acknowledged.
    pub fn settle(&mut self, down: &BTreeSet<String>, peers: &BTreeSet<String>) {
        if let ReadGate::Unverified { heard } = self {
            let answered = heard.intersection(peers).count();
            if answered * 2 >= peers.len()
                && peers.iter().all(|p| heard.contains(p) || down.contains(p))
            {
                *self = ReadGate::Open;
            }
        }
    }

    /// One full anti-entropy exchange with `peer` completed.
    pub fn synced(&mut self, peer: &str, peers: &BTreeSet<String>) {
        if let ReadGate::CatchingUp { synced } = self {
            synced.insert(peer.to_string());
            if peers.is_subset(synced) {
                *self = ReadGate::Open;
            }
        }
    }

    /// The peers this node shares ranges with changed to `peers`: a gate
    /// whose peers have all answered (or synced) opens; one with new peers
    /// waits for them too.
    pub fn reconsider(&mut self, peers: &BTreeSet<String>) {
        let done = match self {
            ReadGate::Open => return,
            ReadGate::Unverified { heard } => peers.is_subset(heard),
            ReadGate::CatchingUp { synced } => peers.is_subset(synced),
        };
        if done {
            *self = ReadGate::Open;
        }
    }

    /// Why replica reads are refused, or `None` when they are answered.
    pub fn refusal(&self, peers: &BTreeSet<String>) -> Option<String> {
        match self {
            ReadGate::Open => None,
            ReadGate::Unverified { heard } => Some(format!(
                "this node's data dir is new and it has not yet heard from {} of the {} peers it shares ranges with whether they knew another instance at its address",
                peers.difference(heard).count(),
                peers.len()
            )),
            ReadGate::CatchingUp { synced } => Some(format!(
                "this node replaced an instance its peers knew (its data dir is new) and is catching up by anti-entropy: {} of {} peers synced",
                synced.intersection(peers).count(),
                peers.len()
            )),
        }
    }
}

/// A random 64-bit id, never 0.
fn random_id() -> InstanceId {
    loop {
        let id = crate::seams::random_u64();
        if id != 0 {
            return InstanceId(id);
        }
    }
}

/// The data dir's instance id, created now if it has none, as
/// [`Identity::open`] would create it (the gate first, then the id; a
/// fresh data dir's gate unverified), so that a node can name its instance
/// in the request that makes it a member, before the node is built.
pub fn reserve_instance_id(storage: &dyn Storage, data_dir_is_fresh: bool) -> Result<InstanceId> {
    if let Some(id) = storage.get_meta(INSTANCE_ID)? {
        return Ok(InstanceId(id));
    }
    let id = random_id();
    let gate = if data_dir_is_fresh {
        ReadGate::from_code(1)
    } else {
        ReadGate::Open
    };
    storage.put_meta_durable(READ_GATE, gate.code())?;
    storage.put_meta_durable(INSTANCE_ID, id.0)?;
    Ok(id)
}

/// This node's identities, its read gate and the instances it knows at its
/// peers' addresses, persisted in the data dir.
pub struct Identity {
    /// Random, created with the data dir; stamped into versions.
    pub instance_id: InstanceId,
    /// Peers this node shares token ranges with, under the layout served
    /// (std mutex: read or replaced whole).
    peers: Mutex<BTreeSet<String>>,
    /// See [`ReadGate`] (std mutex: held for a state change and, rarely, a
    /// durable metadata write).
    gate: Mutex<ReadGate>,
    /// Where the state is kept.
    storage: std::sync::Arc<dyn Storage>,
}

impl Identity {
    /// Loads (or, for a fresh data dir, creates) the identity. `peers`:
    /// the members this node shares token ranges with.
    pub fn open(
        storage: std::sync::Arc<dyn Storage>,
        peers: BTreeSet<String>,
        data_dir_is_fresh: bool,
    ) -> Result<Self> {
        let (instance_id, gate) = match storage.get_meta(INSTANCE_ID)? {
            Some(id) => {
                // The gate is written before the id: an id without a gate
                // means the gate's entry was damaged. Catch up to be safe.
                let gate = ReadGate::from_code(storage.get_meta(READ_GATE)?.unwrap_or(2));
                (InstanceId(id), gate)
            }
            None => {
                let id = random_id();
                // A data dir written before instance ids existed is not a
                // replacement: it keeps answering reads.
                let gate = if data_dir_is_fresh && !peers.is_empty() {
                    ReadGate::from_code(1)
                } else {
                    ReadGate::Open
                };
                storage.put_meta_durable(READ_GATE, gate.code())?;
                storage.put_meta_durable(INSTANCE_ID, id.0)?;
                (id, gate)
            }
        };
        let identity = Self {
            instance_id,
            peers: Mutex::new(peers),
            gate: Mutex::new(gate),
            storage,
        };
        // With no peer to ask (one member), there is nothing to wait for.
        identity.update(|gate, peers| {
            if peers.is_empty() {
                *gate = ReadGate::Open;
            }
        })?;
        Ok(identity)
    }

    fn update(&self, change: impl FnOnce(&mut ReadGate, &BTreeSet<String>)) -> Result<()> {
        let mut gate = self.gate.locked();
        let before = gate.code();
        let peers = self.peers.locked().clone();
        change(&mut gate, &peers);
        if gate.code() != before {
            tracing::info!(state = ?*gate, "read gate changed");
            self.storage.put_meta_durable(READ_GATE, gate.code())?;
        }
        Ok(())
    }

    /// `peer` said it knew instance `known` at this node's address.
    pub fn heard(&self, peer: &str, known: InstanceId) -> Result<()> {
        let unverified = matches!(*self.gate.locked(), ReadGate::Unverified { .. });
        if unverified && !known.is_none() && known != self.instance_id {
            tracing::warn!(
                peer,
                %known,
                me = %self.instance_id,
                "a peer knew another instance at this address: catching up before answering reads"
            );
        }
        let me = self.instance_id;
        self.update(|gate, peers| gate.heard(peer, known, me, peers))
    }

    /// The failure detector believes `down` are down (see
    /// [`ReadGate::settle`]).
    pub fn settle(&self, down: &BTreeSet<String>) -> Result<()> {
        self.update(|gate, peers| gate.settle(down, peers))
    }

    /// A full anti-entropy exchange with `peer` completed.
    pub fn synced(&self, peer: &str) -> Result<()> {
        self.update(|gate, peers| gate.synced(peer, peers))
    }

    /// The layout served changed: the peers this node shares ranges with
    /// are now `peers` (a wiped member restarted with `--peers` starts from
    /// the first layout's members, and learns the later ones here: each may
    /// hold the only other copy of a write).
    pub fn follow_layout(&self, peers: BTreeSet<String>) -> Result<()> {
        *self.peers.locked() = peers;
        self.update(|gate, peers| gate.reconsider(peers))
    }

    /// Why replica reads are refused now, if they are.
    pub fn read_refusal(&self) -> Option<String> {
        let peers = self.peers.locked().clone();
        self.gate.locked().refusal(&peers)
    }

    /// The instance id this node knows at `address` (0: none yet).
    pub fn known_instance(&self, address: &str) -> Result<InstanceId> {
        Ok(self
            .storage
            .get_meta(&format!("{PEER_INSTANCE}{address}"))?
            .map_or(InstanceId::NONE, InstanceId))
    }

    /// `address` says it is instance `instance` and whether it serves
    /// reads: recorded on first sight, replaced only once the new instance
    /// serves reads (until then, this node keeps telling it about the old
    /// one). Answers what was known before.
    pub fn learn_peer(
        &self,
        address: &str,
        instance: InstanceId,
        serves_reads: bool,
    ) -> Result<InstanceId> {
        let known = self.known_instance(address)?;
        if !instance.is_none() && known != instance && (known.is_none() || serves_reads) {
            self.storage
                .put_meta_durable(&format!("{PEER_INSTANCE}{address}"), instance.0)?;
        }
        Ok(known)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use std::sync::Arc;

    fn peers(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_fresh_node_opens_once_every_peer_knew_no_other_instance() {
        let all = peers(&["a", "b"]);
        let mut gate = ReadGate::from_code(1);
        gate.heard("a", InstanceId(0), InstanceId(7), &all);
        assert!(gate.refusal(&all).is_some());
        gate.heard("b", InstanceId(7), InstanceId(7), &all);
        assert_eq!(gate, ReadGate::Open);
    }

    #[test]
    fn a_fresh_node_is_not_held_back_by_a_peer_that_never_starts() {
        let all = peers(&["a", "b", "c", "d"]);
        let mut gate = ReadGate::from_code(1);
        gate.heard("a", InstanceId(0), InstanceId(7), &all);
        gate.settle(&peers(&["b", "c", "d"]), &all);
        assert!(
            gate.refusal(&all).is_some(),
            "one answer of four is too few"
        );
        gate.heard("b", InstanceId(0), InstanceId(7), &all);
        gate.settle(&peers(&["d"]), &all);
        assert!(gate.refusal(&all).is_some(), "c is neither heard nor down");
        gate.settle(&peers(&["c", "d"]), &all);
        assert_eq!(gate, ReadGate::Open);
        // A catch-up waits for every peer, down or not.
        let mut gate = ReadGate::from_code(2);
        gate.synced("a", &all);
        gate.settle(&peers(&["b", "c", "d"]), &all);
        assert!(matches!(gate, ReadGate::CatchingUp { .. }));
    }

    #[test]
    fn a_replacement_catches_up_with_every_peer_before_answering() {
        let all = peers(&["a", "b"]);
        let mut gate = ReadGate::from_code(1);
        gate.heard("a", InstanceId(0), InstanceId(7), &all);
        gate.heard("b", InstanceId(5), InstanceId(7), &all);
        assert!(matches!(gate, ReadGate::CatchingUp { .. }));
        // Hearing more changes nothing; only syncing with both opens it.
        gate.heard("a", InstanceId(0), InstanceId(7), &all);
        gate.synced("a", &all);
        let refusal = gate.refusal(&all).expect("still closed");
        assert!(refusal.contains("1 of 2"), "{refusal}");
        gate.synced("b", &all);
        assert_eq!(gate, ReadGate::Open);
    }

    #[test]
    fn the_gate_follows_the_layout_peers() {
        // A wiped member restarted with --peers knows the first members
        // only; the layout it catches up to adds a member it shares
        // ranges with, which may hold the only other copy of a write.
        let first = peers(&["a", "b"]);
        let later = peers(&["a", "b", "d"]);
        let mut gate = ReadGate::from_code(2);
        gate.synced("a", &first);
        gate.reconsider(&later);
        gate.synced("b", &later);
        assert!(gate.refusal(&later).is_some(), "still waits for d");
        gate.synced("d", &later);
        assert_eq!(gate, ReadGate::Open);
        // Peers that no longer share ranges are not waited for.
        let mut gate = ReadGate::from_code(2);
        gate.synced("a", &first);
        gate.reconsider(&peers(&["a"]));
        assert_eq!(gate, ReadGate::Open);

        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let identity = Identity::open(storage, first, true).expect("open");
        identity.follow_layout(later).expect("follow");
        let refusal = identity.read_refusal().expect("closed");
        assert!(refusal.contains("of the 3 peers"), "{refusal}");
    }

    #[test]
    fn identity_survives_restarts_and_resumes_a_catch_up() {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let all = peers(&["a"]);
        let first = Identity::open(storage.clone(), all.clone(), true).expect("open");
        assert_ne!(first.instance_id, InstanceId::NONE);
        assert!(first.read_refusal().is_some());
        first.heard("a", InstanceId(99)).expect("heard");
        drop(first);
        // Crash during the catch-up: it resumes.
        let again = Identity::open(storage.clone(), all.clone(), false).expect("reopen");
        let refusal = again.read_refusal().expect("still catching up");
        assert!(refusal.contains("catching up"), "{refusal}");
        again.synced("a").expect("synced");
        assert_eq!(again.read_refusal(), None);
        let id = again.instance_id;
        drop(again);
        let last = Identity::open(storage, all, false).expect("reopen");
        assert_eq!((last.instance_id, last.read_refusal()), (id, None));
    }

    #[test]
    fn a_joiner_names_the_instance_its_data_dir_then_opens_with() {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let reserved = reserve_instance_id(&*storage, true).expect("reserve");
        assert_eq!(
            reserve_instance_id(&*storage, true).expect("again"),
            reserved,
            "kept: a joiner that retries names the same instance"
        );
        let identity = Identity::open(storage, peers(&["a"]), false).expect("open");
        assert_eq!(identity.instance_id, reserved);
        assert!(
            identity.read_refusal().is_some(),
            "a fresh data dir still verifies its identity before answering reads"
        );
    }

    #[test]
    fn old_data_dirs_and_single_nodes_answer_at_once() {
        let old: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let identity = Identity::open(old, peers(&["a"]), false).expect("open");
        assert_eq!(identity.read_refusal(), None);
        let single: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let identity = Identity::open(single, BTreeSet::new(), true).expect("open");
        assert_eq!(identity.read_refusal(), None);
    }

    #[test]
    fn peers_adopt_a_new_instance_only_once_it_serves_reads() {
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let me = Identity::open(storage, BTreeSet::new(), true).expect("open");
        assert_eq!(
            me.learn_peer("x", InstanceId(5), false).expect("learn"),
            InstanceId(0)
        );
        assert_eq!(
            me.learn_peer("x", InstanceId(6), false).expect("learn"),
            InstanceId(5)
        );
        assert_eq!(
            me.learn_peer("x", InstanceId(6), false).expect("learn"),
            InstanceId(5),
            "not yet"
        );
        assert_eq!(
            me.learn_peer("x", InstanceId(6), true).expect("learn"),
            InstanceId(5)
        );
        assert_eq!(me.known_instance("x").expect("known"), InstanceId(6));
    }
}
