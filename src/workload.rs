//! A Jepsen-style workload whose every operation is recorded for the
//! [`crate::checker`]: concurrent workers PUT (each a value of its own),
//! DELETE and GET a few keys through a [`Client`], and a final pass reads
//! every key at ALL once faults have healed.
//!
//! Used by the nemesis and partition tests, the deterministic simulation
//! and `DKVSClient check`. Time is tokio's, so it runs on simulated time
//! too, and one seed fixes each worker's choices.

use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use crate::checker::{Op, ReadOutcome, Tick, WriteOutcome};
use crate::client::Client;
use crate::error::{Error, Outcome};
use crate::locks::Locked;
use crate::record::Record;

/// xorshift64*: a small deterministic generator.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`. The seed goes through splitmix64 first:
    /// xorshift needs a state that is not zero, and `seed | 1` made seeds
    /// 2k and 2k+1 one and the same sequence.
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// What the workers record: the history, and why operations failed.
#[derive(Default, Debug)]
pub struct History {
    /// Every operation, in the order it finished.
    pub ops: Vec<Op>,
    /// The error of each failed operation: (op index, error).
    pub errors: Vec<(usize, String)>,
}

/// Where workers record, shared.
#[derive(Clone, Default)]
pub struct Recorder(Arc<Mutex<History>>);

impl Recorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `op`, with the error that made it fail, if any.
    pub fn record(&self, op: Op, error: Option<String>) {
        let mut history = self.0.locked();
        if let Some(error) = error {
            let index = history.ops.len();
            history.errors.push((index, error));
        }
        history.ops.push(op);
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.0.locked().ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Operations recorded so far that failed (or were indeterminate).
    pub fn failures(&self) -> usize {
        self.0.locked().errors.len()
    }

    /// The history so far (the recorder is left empty).
    pub fn take(&self) -> History {
        std::mem::take(&mut *self.0.locked())
    }
}

/// The keys and the mix of one workload.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Keys `{prefix}key-0` .. `{prefix}key-{keys-1}`.
    pub keys: u64,
    /// Put before every key: empty in tests, whose clusters start empty;
    /// `DKVSClient check` names its keys after its run, so that it touches
    /// no key of a cluster's users and no value an earlier run left.
    pub prefix: &'static str,
    /// Percent of operations that are PUTs; DELETEs are another 5%, the
    /// rest GETs.
    pub put_percent: u64,
    /// Ticks (microseconds) are counted from here.
    pub t0: Instant,
    /// Where ticks come from instead, when workers run on clocks that do
    /// not agree (a simulation's hosts: its global simulated time).
    pub clock: Option<fn() -> Tick>,
}

impl Workload {
    pub fn new(keys: u64) -> Self {
        Self {
            keys,
            prefix: "",
            put_percent: 45,
            t0: Instant::now(),
            clock: None,
        }
    }

    /// Microseconds since `t0`: the checker's clock.
    pub fn tick(&self) -> Tick {
        match self.clock {
            Some(clock) => clock(),
            None => self.t0.elapsed().as_micros() as Tick,
        }
    }

    pub fn key(&self, k: u64) -> String {
        format!("{}key-{k}", self.prefix)
    }

    /// Runs worker `id` until `until`: random operations on random keys,
    /// every one recorded. Every PUT writes a value of its own (the checker
    /// tells writes apart by their values). A failed write is what its
    /// outcome says ([`write_outcome_of`]): known not to have taken effect,
    /// or indeterminate, since it may still take effect.
    pub async fn run_worker(
        &self,
        id: usize,
        client: &Client,
        seed: u64,
        until: Instant,
        recorder: &Recorder,
    ) {
        let mut rng = Rng::new(seed);
        let mut sequence = 0u64;
        while Instant::now() < until {
            let key = self.key(rng.below(self.keys));
            let roll = rng.below(100);
            let start = self.tick();
            let (op, error) = if roll < self.put_percent {
                sequence += 1;
                let value = format!("c{id}-{sequence}").into_bytes();
                let (outcome, error) = match client.put(&key, value.clone()).await {
                    Ok(ack) => (WriteOutcome::Acked(ack.version), None),
                    Err(error) => (write_outcome_of(&error), Some(error.to_string())),
                };
                (Op::put(id, key, value, start, self.tick(), outcome), error)
            } else if roll < self.put_percent + 5 {
                let (outcome, error) = match client.delete(&key).await {
                    Ok(ack) => (WriteOutcome::Acked(ack.version), None),
                    Err(error) => (write_outcome_of(&error), Some(error.to_string())),
                };
                (Op::delete(id, key, start, self.tick(), outcome), error)
            } else {
                let (outcome, error) = match client.get_record(&key).await {
                    Ok(record) => (read_outcome(record), None),
                    Err(error) => (ReadOutcome::Failed, Some(error.to_string())),
                };
                (Op::get(id, key, start, self.tick(), outcome), error)
            };
            recorder.record(op, error);
        }
    }

    /// Reads every key once through `reader` (a client at ALL, once faults
    /// have healed), recorded as worker `id`. These reads begin after every
    /// write has ended, so a stale one is a lost write. Answers the first
    /// error, if a read failed.
    pub async fn final_reads(
        &self,
        id: usize,
        reader: &Client,
        recorder: &Recorder,
    ) -> Result<(), String> {
        for k in 0..self.keys {
            let key = self.key(k);
            let start = self.tick();
            match reader.get_record(&key).await {
                Ok(record) => {
                    let op = Op::get(id, key, start, self.tick(), read_outcome(record));
                    recorder.record(op, None);
                }
                Err(error) => return Err(format!("final read of {key}: {error}")),
            }
        }
        Ok(())
    }
}

/// How a write that failed with `error` is recorded: failed when its
/// outcome is `not-applied` (the checker then flags any read of its value
/// as invented), indeterminate otherwise.
pub fn write_outcome_of(error: &Error) -> WriteOutcome {
    match error.outcome() {
        Outcome::NotApplied => WriteOutcome::Failed,
        Outcome::Applied | Outcome::Unknown => WriteOutcome::Indeterminate,
    }
}

/// A read's outcome from the client's answer.
pub fn read_outcome(record: Option<Record>) -> ReadOutcome {
    match record {
        None => ReadOutcome::NotFound { version: None },
        Some(Record {
            version,
            value: None,
            ..
        }) => ReadOutcome::NotFound {
            version: Some(version),
        },
        Some(Record {
            version,
            value: Some(value),
            ..
        }) => ReadOutcome::Found {
            value: value.to_vec(),
            version: Some(version),
        },
    }
}

#[cfg(test)]
mod rng_tests {
    use super::Rng;

    #[test]
    fn neighbouring_seeds_give_different_sequences() {
        for seed in [0u64, 2, 42, 20_000] {
            let (mut a, mut b) = (Rng::new(seed), Rng::new(seed + 1));
            assert_ne!(a.next_u64(), b.next_u64(), "seeds {seed} and {}", seed + 1);
        }
    }
}
