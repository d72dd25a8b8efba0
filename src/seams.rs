//! What a deterministic simulation replaces: the wall clock, randomness,
//! and work handed to tokio's blocking pool.
//!
//! Production installs nothing and gets the machine's wall clock, random
//! ids from std's per-process hasher keys, and `spawn_blocking`. A
//! simulation (tests/simulation.rs, turmoil) installs [`Seams`] once per
//! process before any node starts: a wall clock that follows simulated time,
//! one seeded generator, and blocking work run inline, so one seed replays
//! one run exactly. The wall clock is a plain function, so a simulation that
//! knows which host is running can give each host a skewed clock of its own.
//! Monotonic time needs no seam: every timer and `Instant` in DKVS is
//! tokio's, which a simulation drives.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// The replacements a simulation installs.
#[derive(Clone, Copy, Debug)]
pub struct Seams {
    /// Milliseconds since the Unix epoch.
    pub wall_clock_ms: fn() -> u64,
    /// 64 random bits.
    pub random_u64: fn() -> u64,
    /// Run "blocking" work (fsync, the clock ceiling) on the calling task
    /// instead of tokio's blocking pool, whose threads finish in real time.
    pub inline_blocking: bool,
}

static INSTALLED: OnceLock<Seams> = OnceLock::new();

/// Installs `seams` for the rest of the process; an error if others were
/// installed first (the same ones again are fine).
pub fn install(seams: Seams) -> Result<(), String> {
    let installed = INSTALLED.get_or_init(|| seams);
    let same = installed.wall_clock_ms as usize == seams.wall_clock_ms as usize
        && installed.random_u64 as usize == seams.random_u64 as usize
        && installed.inline_blocking == seams.inline_blocking;
    if same {
        Ok(())
    } else {
        Err("other seams are installed in this process".into())
    }
}

/// Milliseconds since the Unix epoch: the installed clock, or the machine's.
pub(crate) fn wall_clock_ms() -> u64 {
    match INSTALLED.get() {
        Some(seams) => (seams.wall_clock_ms)(),
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// 64 random bits: the installed generator, or std's per-process random
/// hasher keys mixed with the time and the pid (no extra crate).
pub(crate) fn random_u64() -> u64 {
    if let Some(seams) = INSTALLED.get() {
        return (seams.random_u64)();
    }
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Runs `work` off the async threads (tokio's blocking pool), or inline
/// when a simulation asked for it.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if INSTALLED.get().is_some_and(|s| s.inline_blocking) {
        Ok(work())
    } else {
        tokio::task::spawn_blocking(work).await
    }
}

/// Starts `work` off the async threads without waiting for it: on tokio's
/// blocking pool when there is a runtime, inline otherwise (unit tests) or
/// when a simulation asked for it.
pub(crate) fn detach_blocking(work: impl FnOnce() + Send + 'static) {
    let inline = INSTALLED.get().is_some_and(|s| s.inline_blocking);
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if !inline => drop(runtime.spawn_blocking(work)),
        _ => work(),
    }
}
