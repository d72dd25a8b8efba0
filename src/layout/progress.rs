//! How far a join has got: what a joining node reports in its heartbeats
//! and its status, and what the streaming of its ranges updates.

use std::sync::Arc;

use tokio::time::Instant;

use crate::locks::Locked;

/// A joining node's progress, shared by the streaming that updates it and
/// the heartbeats and status that report it.
#[derive(Clone, Default)]
pub struct JoinProgress(Arc<std::sync::Mutex<Option<MoveProgress>>>);

impl JoinProgress {
    /// The progress now (`None`: not joining).
    pub fn get(&self) -> Option<MoveProgress> {
        self.0.locked().clone()
    }

    /// The progress, to update in place.
    pub fn locked(&self) -> std::sync::MutexGuard<'_, Option<MoveProgress>> {
        self.0.locked()
    }
}

/// A joining node's progress.
#[derive(Clone, Debug)]
pub struct MoveProgress {
    pub layout_version: u64,
    /// Records newly stored here so far, and their bytes.
    pub keys_moved: u64,
    pub bytes_moved: u64,
    /// Records received from all sources (each key comes from several).
    pub records_received: u64,
    /// Of the hash space this node receives, the fraction streamed.
    pub done_share: f64,
    /// Hash intervals (about one per token range) streamed, and in all.
    pub ranges_done: u32,
    pub ranges_total: u32,
    pub started: Instant,
    /// Since when streaming has failed round after round, and the last
    /// failure (`None`: not stalled).
    pub stalled: Option<(String, Instant)>,
}

impl Default for MoveProgress {
    fn default() -> Self {
        Self {
            layout_version: 0,
            keys_moved: 0,
            bytes_moved: 0,
            records_received: 0,
            done_share: 0.0,
            ranges_done: 0,
            ranges_total: 0,
            started: Instant::now(),
            stalled: None,
        }
    }
}

impl MoveProgress {
    /// Estimated keys, bytes and milliseconds left, from the rate so far
    /// (`None` until something was streamed).
    pub fn remaining(&self) -> Option<(u64, u64, u64)> {
        if self.done_share >= 1.0 {
            return Some((0, 0, 0));
        }
        // Too early to extrapolate: nothing moved yet, or under 1% done.
        if self.keys_moved == 0 || self.done_share < 0.01 {
            return None;
        }
        let left = (1.0 - self.done_share) / self.done_share;
        let elapsed = self.started.elapsed().as_millis() as f64;
        Some((
            (self.keys_moved as f64 * left) as u64,
            (self.bytes_moved as f64 * left) as u64,
            (elapsed * left) as u64,
        ))
    }
}

/// A join's progress as reported to others (in heartbeats and
/// `Cluster.Status`): the counts, and the estimates made when it was sent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProgressReport {
    pub layout_version: u64,
    pub keys_moved: u64,
    pub bytes_moved: u64,
    /// Of the hash space the node receives, the share done, in millionths.
    pub done_ppm: u32,
    /// Estimates from the rate so far (0: not yet known).
    pub keys_remaining: u64,
    pub bytes_remaining: u64,
    pub eta_ms: u64,
    pub ranges_done: u32,
    pub ranges_total: u32,
    /// How long streaming has been failing (0: not stalled), and why.
    pub stalled_ms: u64,
    pub stalled_why: String,
}

/// The longest stall reason reported (bytes).
pub const STALLED_WHY_MAX: usize = 300;

/// `why` cut to at most [`STALLED_WHY_MAX`] bytes, on a char boundary.
pub fn bounded_why(why: &str) -> String {
    let mut end = why.len().min(STALLED_WHY_MAX);
    while !why.is_char_boundary(end) {
        end -= 1;
    }
    why[..end].to_string()
}

impl MoveProgress {
    /// Notes a failed streaming round (the stall starts at the first).
    pub fn stall(&mut self, why: &str) {
        let since = self
            .stalled
            .as_ref()
            .map_or_else(Instant::now, |(_, since)| *since);
        self.stalled = Some((bounded_why(why), since));
    }

    /// The progress as reported now.
    pub fn report(&self) -> ProgressReport {
        let (keys_remaining, bytes_remaining, eta_ms) = self.remaining().unwrap_or((0, 0, 0));
        ProgressReport {
            layout_version: self.layout_version,
            keys_moved: self.keys_moved,
            bytes_moved: self.bytes_moved,
            done_ppm: (self.done_share.clamp(0.0, 1.0) * 1_000_000.0) as u32,
            keys_remaining,
            bytes_remaining,
            eta_ms,
            ranges_done: self.ranges_done,
            ranges_total: self.ranges_total,
            stalled_ms: self
                .stalled
                .as_ref()
                .map_or(0, |(_, since)| since.elapsed().as_millis().max(1) as u64),
            stalled_why: self
                .stalled
                .as_ref()
                .map(|(why, _)| why.clone())
                .unwrap_or_default(),
        }
    }
}
