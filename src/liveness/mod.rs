//! Which peers are up: the phi accrual detector ([`detector`], pure),
//! shared. The heartbeats that feed it are `crate::heartbeat`.
//!
//! [`Liveness`] is the detector shared by every part of a node behind one
//! std mutex, held for one lookup or update and never across an await.

pub mod detector;

use crate::locks::Locked;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::time::Instant;

pub use detector::{FailureDetector, PeerHealth};

/// The failure detector, shared.
#[derive(Clone)]
pub struct Liveness(Arc<Mutex<FailureDetector>>);

impl Liveness {
    pub fn new(detector: FailureDetector) -> Self {
        Self(Arc::new(Mutex::new(detector)))
    }

    fn lock(&self) -> MutexGuard<'_, FailureDetector> {
        self.0.locked()
    }

    /// How `address` looks now (this node itself and strangers are up).
    pub fn health(&self, address: &str) -> PeerHealth {
        self.lock().health(address, Instant::now())
    }

    pub fn is_up(&self, address: &str) -> bool {
        self.health(address).up
    }

    /// The health of each of `addresses`, taken at one instant under one lock.
    pub fn healths<'a>(&self, addresses: impl IntoIterator<Item = &'a str>) -> Vec<PeerHealth> {
        let detector = self.lock();
        let now = Instant::now();
        addresses
            .into_iter()
            .map(|address| detector.health(address, now))
            .collect()
    }

    /// Runs `update` on the detector under its lock (heartbeat bookkeeping).
    pub fn update<T>(&self, update: impl FnOnce(&mut FailureDetector) -> T) -> T {
        update(&mut self.lock())
    }
}
