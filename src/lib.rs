//! DKVS: a Dynamo-style distributed key-value store.
//!
//! Reading order, from the pure core outwards:
//!
//! * [`ring`] — consistent hashing with virtual nodes; preference lists.
//! * [`clock`] — versions and the Lamport clock that issues them.
//! * [`record`] — one version of a key (value or tombstone), its encoding and
//!   the merge rule.
//! * [`quorum`] — quorum arithmetic and the bookkeeping of one quorum call.
//! * [`storage`] — the storage trait, fjall and in-memory engines.
//! * [`replica`] — one node's store: write-if-newer, counts, the clock.
//! * [`net`] — the network seam: dialing peers, calling replicas.
//! * [`coordinator`] — quorum writes and reads, read repair.
//! * [`node`] — the gRPC services and the server's life cycle.
//! * [`client`] — the smart client.
//! * [`config`], [`limits`], [`error`], [`pb`] — settings, input limits, the
//!   error type, and the protobuf edge.

pub mod antientropy;
pub mod background;
pub mod checker;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod hints;
pub mod identity;
pub mod limits;
pub mod liveness;
pub mod net;
pub mod node;
pub mod pb;
pub mod placement;
pub mod quorum;
pub mod record;
pub mod replica;
pub mod ring;
pub mod storage;

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
