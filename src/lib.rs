//! DKVS: a Dynamo-style distributed key-value store.
//!
//! Reading order, from the pure core outwards (`docs/ARCHITECTURE.md`
//! draws the map, the layers, and follows a PUT and a GET through it). Each
//! layer imports only from those above it in this list; `tests/architecture.rs`
//! fails on an import cycle, and on protobuf outside the edges.
//!
//! The pure core, synchronous and unit-tested:
//!
//! * [`ring`] — consistent hashing with virtual nodes; preference lists;
//!   member ids.
//! * [`clock`] — versions, instance ids, the hybrid logical clock, the skew
//!   bound.
//! * [`record`] — one version of a key (value or tombstone), its encoding and
//!   the merge rule.
//! * [`quorum`] — quorum arithmetic, the tallies of quorum calls, and the
//!   write round as a state machine.
//! * [`paxos`] — single-decree Paxos for any value: ballots, the proposer
//!   as a state machine.
//! * `fanout` — the one way to ask many nodes: send, tally, stragglers.
//! * [`layout`] — the member list the cluster agreed on, version by version;
//!   the three steps of a join and their progress; Paxos's acceptor rules.
//! * `placement` — one swappable snapshot of a layout version: read ring,
//!   write rings, N and this node.
//! * `liveness` — the phi accrual detector, shared.
//! * [`checker`] — the history checker tests and `DKVSClient` use, and
//!   [`workload`], the recorded workload it judges.
//! * [`security`] — who may call what (the doors), client tokens and
//!   roles, TLS material from PEM files and its reloading.
//! * [`config`], `limits`, [`error`], `locks` — settings, input limits, the
//!   error type, the one way a mutex is taken.
//! * [`logs`] — `--log-format json`, one object per line.
//! * [`metrics`] — what a node counts for Prometheus: lock-free request and
//!   node-to-node call series, and the encoders of scrape-time values.
//!
//! Local state:
//!
//! * [`storage`] — the engine trait; log, fjall and in-memory engines.
//! * `identity` — this node's instance id, the instances it knows at its
//!   peers' addresses, and the read gate.
//! * [`replica`] — one node's store: write-if-newer, counts, digests, clock.
//!
//! The wire:
//!
//! * [`resp`] — the Redis protocol, pure: requests parsed (bounded),
//!   replies encoded.
//! * [`pb`] — the generated protobuf code and the conversions of the core's
//!   types.
//! * [`net`] — dialing peers, the batching replica pipe, call deadlines,
//!   and every other node-to-node call in Rust types.
//!
//! The protocols (Rust types only):
//!
//! * [`serving`] — the layout this node serves and its one owner (adoption,
//!   the fence, the placement swap, catching up), the file it is kept in,
//!   and `ClusterView`, what the protocols share.
//! * `coordinator` — quorum reads and writes, read repair.
//! * `hints` — hinted handoff: the store, where hints go, delivery.
//! * `antientropy` — background exchanges and tombstone collection.
//! * `listing` — key listings: a cursor over the ring, each stretch read
//!   from enough replicas that no acknowledged key is missed.
//! * `heartbeat` — pings, their answers, what peers report.
//! * [`membership`] — adopting layouts, proposing changes, joins and their
//!   streaming.
//! * `background` — bounded background tasks.
//! * `workers` — the periodic worker runner, and each worker's report.
//!
//! The edges:
//!
//! * [`node`] — wiring, and the gRPC services and server (they convert
//!   requests and answers).
//! * [`client`] — the smart client.

pub(crate) mod antientropy;
pub(crate) mod background;
pub mod checker;
pub mod client;
pub mod clock;
pub mod config;
pub(crate) mod coordinator;
pub mod error;
pub(crate) mod fanout;
pub(crate) mod heartbeat;
pub(crate) mod hints;
pub(crate) mod identity;
pub mod layout;
pub(crate) mod limits;
pub(crate) mod listing;
pub(crate) mod liveness;
pub(crate) mod locks;
pub mod logs;
pub mod membership;
pub mod metrics;
pub mod net;
pub mod node;
pub mod paxos;
pub mod pb;
pub(crate) mod placement;
pub mod quorum;
pub mod record;
pub mod replica;
pub mod resp;
pub mod ring;
pub mod seams;
pub mod security;
pub mod serving;
pub mod storage;
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
