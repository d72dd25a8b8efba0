//! DKVS: a Dynamo-style distributed key-value store.
//!
//! Reading order, from the pure core outwards (`docs/ARCHITECTURE.md`
//! draws the map and follows a PUT and a GET through it):
//!
//! The pure core, synchronous and unit-tested:
//!
//! * [`ring`] — consistent hashing with virtual nodes; preference lists.
//! * [`clock`] — versions, the hybrid logical clock, the skew bound.
//! * [`record`] — one version of a key (value or tombstone), its encoding and
//!   the merge rule.
//! * [`quorum`] — quorum arithmetic and the tally of one quorum call.
//! * [`paxos`] — single-decree Paxos for any value: ballots, the proposer
//!   as a state machine.
//! * [`layout`] — the member list the cluster agreed on, version by version;
//!   the three steps of a join; Paxos's acceptor rules.
//! * `placement` — one swappable snapshot of a layout version: read ring,
//!   write rings, N and this node.
//! * `liveness` — the phi accrual detector, and the heartbeats feeding it.
//! * `antientropy::plan` — hash-tree roots and what to copy.
//! * [`checker`] — the history checker tests and `DKVSClient` use, and
//!   [`workload`], the recorded workload it judges.
//!
//! Storage and the replica:
//!
//! * [`storage`] — the engine trait; log, fjall and in-memory engines.
//! * [`replica`] — one node's store: write-if-newer, counts, digests, clock.
//! * `identity` — member and instance ids, and the read gate.
//!
//! The async shell:
//!
//! * [`net`] — dialing peers, the batching replica pipe, call deadlines.
//! * `fanout` — the one way to ask many nodes: send, tally, stragglers.
//! * `serving` — the layout this node serves and its one owner: adoption,
//!   the fence, the placement swap, catching up.
//! * `cluster` — what the parts below share: the layout owner, peers,
//!   liveness.
//! * `coordinator` — quorum reads and writes, read repair.
//! * `hints` — hinted handoff: the store, where hints go, delivery.
//! * `antientropy` — background sync and tombstone collection.
//! * [`membership`] — adopting layouts, proposing changes, joins and their
//!   streaming.
//! * `background` — bounded background tasks.
//! * `workers` — the periodic worker runner, and each worker's report.
//! * [`node`] — wiring, and the gRPC services and server.
//! * [`client`] — the smart client.
//! * [`config`], `limits`, [`error`], [`pb`] — settings, input limits, the
//!   error type, and the protobuf edge (every conversion lives there).

pub(crate) mod antientropy;
pub(crate) mod background;
pub mod checker;
pub mod client;
pub mod clock;
pub(crate) mod cluster;
pub mod config;
pub(crate) mod coordinator;
pub mod error;
pub(crate) mod fanout;
pub(crate) mod hints;
pub(crate) mod identity;
pub mod layout;
pub(crate) mod limits;
pub(crate) mod liveness;
pub mod membership;
pub mod net;
pub mod node;
pub mod paxos;
pub mod pb;
pub(crate) mod placement;
pub mod quorum;
pub mod record;
pub mod replica;
pub mod ring;
pub mod seams;
pub(crate) mod serving;
pub mod storage;
pub(crate) mod sync;
pub(crate) mod workers;
pub mod workload;

pub use error::{Error, Result};

/// The tokio runtime for `threads` threads: 1 (or 0) runs everything on the
/// calling thread (the current-thread scheduler: no hand-offs between
/// threads), more a work-stealing pool of that size, `None` one worker per
/// CPU.
pub fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads);
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build()
}
