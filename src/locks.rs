//! Locks that survive a panic elsewhere.
//!
//! Every std mutex in DKVS guards state that stays consistent between
//! statements (a map, a counter, a cursor), so a thread that panicked while
//! holding one leaves nothing half-done: the next holder takes the lock
//! anyway instead of spreading the panic. [`Locked::locked`] says so once.

use std::sync::{Mutex, MutexGuard};

pub(crate) trait Locked<T> {
    /// The guard, even if a previous holder panicked.
    fn locked(&self) -> MutexGuard<'_, T>;
}

impl<T> Locked<T> for Mutex<T> {
    fn locked(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
