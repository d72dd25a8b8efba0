//! The load of `DKVSClient bench`: a closed-loop, YCSB-style generator.
//!
//! `concurrency` workers each run one request at a time, back to back, for
//! `--duration` or until `--ops` requests are done. Every request's latency
//! goes into an HDR histogram (microseconds), so percentiles are exact to
//! three significant digits however long the run. Workloads follow YCSB:
//! A = 50% reads / 50% updates, B = 95/5, C = reads only, W = updates only.
//! Keys are drawn uniformly or from YCSB's scrambled zipfian distribution
//! (a few hot keys). Requests go to a [`Target`] (see `targets.rs`): the
//! smart client (PUT to a replica that coordinates, GET coordinated by the
//! client), or with `--via-node` each node in turn, which coordinates both.
//!
//! The key generator and the workload mix are pure and unit-tested; the
//! runner is a thin async shell.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use xxhash_rust::xxh3::xxh3_64;

/// xorshift64*: a small, fast generator for choosing keys and operations.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// YCSB's zipfian generator (Gray et al., "Quickly generating billion-record
/// synthetic databases"), constant 0.99, with ranks scrambled by a hash so
/// the hot keys are spread over the key space.
#[derive(Clone, Debug)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    pub const THETA: f64 = 0.99;

    pub fn new(items: u64) -> Self {
        let items = items.max(1);
        let theta = Self::THETA;
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(items);
        let zeta2 = zeta(2.min(items));
        let eta = (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan);
        Self {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
        }
    }

    /// A rank in [0, items): 0 is the most popular.
    pub fn rank(&self, u: f64) -> u64 {
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        rank.min(self.items - 1)
    }

    /// A key index in [0, items), hot ranks scattered.
    pub fn next(&self, rng: &mut Rng) -> u64 {
        xxh3_64(&self.rank(rng.next_f64()).to_le_bytes()) % self.items
    }
}

/// How keys are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Distribution {
    Uniform,
    Zipfian,
}

/// The operation mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// 50% reads, 50% updates.
    A,
    /// 95% reads, 5% updates.
    B,
    /// Reads only.
    C,
    /// Updates only.
    W,
}

impl Workload {
    /// Fraction of operations that are reads.
    pub fn read_fraction(self) -> f64 {
        match self {
            Workload::A => 0.5,
            Workload::B => 0.95,
            Workload::C => 1.0,
            Workload::W => 0.0,
        }
    }
}

/// One operation to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read(u64),
    Update(u64),
}

/// Draws operations for one worker.
#[derive(Clone, Debug)]
pub struct OpGenerator {
    rng: Rng,
    keys: u64,
    read_fraction: f64,
    zipfian: Option<Arc<Zipfian>>,
}

impl OpGenerator {
    pub fn new(seed: u64, keys: u64, workload: Workload, zipfian: Option<Arc<Zipfian>>) -> Self {
        Self {
            rng: Rng::new(seed),
            keys: keys.max(1),
            read_fraction: workload.read_fraction(),
            zipfian,
        }
    }

    pub fn next_op(&mut self) -> Op {
        let key = match &self.zipfian {
            Some(z) => z.next(&mut self.rng),
            None => self.rng.next_u64() % self.keys,
        };
        if self.rng.next_f64() < self.read_fraction {
            Op::Read(key)
        } else {
            Op::Update(key)
        }
    }
}

/// The key name for index `i`.
pub fn key_name(i: u64) -> String {
    format!("user{i:010}")
}

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    /// Requests that succeeded.
    pub ok: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Wall time of the measured phase.
    pub elapsed: Duration,
    /// Latency of successful requests, microseconds.
    pub latency_us: Histogram<u64>,
    /// The first few error messages.
    pub sample_errors: Vec<String>,
}

impl Report {
    pub fn throughput(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// A human-readable summary.
    pub fn text(&self, label: &str) -> String {
        format!(
            "{label}: {ok} ok, {errors} errors in {secs:.1} s = {tput:.0} ops/s\n  latency ms: p50 {p50:.2}  p95 {p95:.2}  p99 {p99:.2}  p99.9 {p999:.2}  max {max:.2}\n",
            ok = self.ok,
            errors = self.errors,
            secs = self.elapsed.as_secs_f64(),
            tput = self.throughput(),
            p50 = self.ms(0.50),
            p95 = self.ms(0.95),
            p99 = self.ms(0.99),
            p999 = self.ms(0.999),
            max = self.latency_us.max() as f64 / 1000.0,
        )
    }

    /// One JSON object (numbers and a label only, so no escaping library).
    pub fn json(&self, label: &str) -> String {
        let label: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || "-_ .=/".contains(*c))
            .collect();
        format!(
            "{{\"label\":\"{label}\",\"ok\":{},\"errors\":{},\"seconds\":{:.3},\"ops_per_sec\":{:.1},\"p50_ms\":{:.3},\"p95_ms\":{:.3},\"p99_ms\":{:.3},\"p999_ms\":{:.3},\"max_ms\":{:.3}}}",
            self.ok,
            self.errors,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            self.ms(0.50),
            self.ms(0.95),
            self.ms(0.99),
            self.ms(0.999),
            self.latency_us.max() as f64 / 1000.0
        )
    }
}

/// Something that can serve the benchmark's reads and updates.
pub trait Target: Send + Sync + 'static {
    /// Reads key `key`.
    fn read(&self, key: String) -> impl std::future::Future<Output = Result<(), String>> + Send;
    /// Writes `value` under `key`.
    fn update(
        &self,
        key: String,
        value: bytes::Bytes,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// How long or how much to run.
#[derive(Clone, Copy, Debug)]
pub enum Limit {
    Duration(Duration),
    Ops(u64),
}

/// What the workers of one run share: how many requests they began, when
/// to stop, and the limit.
#[derive(Clone)]
struct Quota {
    /// Requests begun (counted before each is sent).
    done: Arc<AtomicU64>,
    /// Set once the run is over.
    stop: Arc<AtomicBool>,
    /// When to stop, for a run of a duration.
    deadline: Option<Instant>,
    /// Most requests, for a run of a count (else unbounded).
    budget: u64,
}

/// An empty latency histogram: 1 µs to 60 s, three significant digits.
fn latency_histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs `concurrency` closed-loop workers against `target`. `progress` is
/// called about five times a second with the requests done so far.
pub async fn run<T: Target>(
    target: Arc<T>,
    generators: Vec<OpGenerator>,
    value: bytes::Bytes,
    limit: Limit,
    progress: impl Fn(u64) + Send + 'static,
) -> Report {
    let started = Instant::now();
    let quota = Quota {
        done: Arc::new(AtomicU64::new(0)),
        stop: Arc::new(AtomicBool::new(false)),
        deadline: match limit {
            Limit::Duration(d) => Some(started + d),
            Limit::Ops(_) => None,
        },
        budget: match limit {
            Limit::Ops(n) => n,
            Limit::Duration(_) => u64::MAX,
        },
    };
    let workers: Vec<_> = generators
        .into_iter()
        .map(|generator| {
            let (target, value, quota) = (target.clone(), value.clone(), quota.clone());
            tokio::spawn(closed_loop(target, generator, value, quota))
        })
        .collect();
    let ticker = {
        let (done, stop, budget) = (quota.done.clone(), quota.stop.clone(), quota.budget);
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                progress(done.load(Ordering::Relaxed).min(budget));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut report = Report {
        ok: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latency_us: latency_histogram(),
        sample_errors: Vec::new(),
    };
    for worker in workers {
        if let Ok((histogram, ok, errors, samples)) = worker.await {
            let _ = report.latency_us.add(&histogram);
            report.ok += ok;
            report.errors += errors;
            report.sample_errors.extend(
                samples
                    .into_iter()
                    .take(3 - report.sample_errors.len().min(3)),
            );
        }
    }
    report.elapsed = started.elapsed();
    quota.stop.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    report
}

/// One worker: sends the requests of `generator` one after another until
/// the quota is spent. Returns the latencies of the successful requests,
/// how many succeeded and failed, and the first few errors.
async fn closed_loop<T: Target>(
    target: Arc<T>,
    mut generator: OpGenerator,
    value: bytes::Bytes,
    quota: Quota,
) -> (Histogram<u64>, u64, u64, Vec<String>) {
    let mut histogram = latency_histogram();
    let (mut ok, mut errors, mut sample_errors) = (0u64, 0u64, Vec::new());
    loop {
        if quota.stop.load(Ordering::Relaxed) || quota.deadline.is_some_and(|d| Instant::now() >= d)
        {
            break;
        }
        if quota.done.fetch_add(1, Ordering::Relaxed) >= quota.budget {
            break;
        }
        let op = generator.next_op();
        let begun = Instant::now();
        let result = match op {
            Op::Read(k) => target.read(key_name(k)).await,
            Op::Update(k) => target.update(key_name(k), value.clone()).await,
        };
        match result {
            Ok(()) => {
                ok += 1;
                let _ = histogram.record((begun.elapsed().as_micros() as u64).max(1));
            }
            Err(error) => {
                errors += 1;
                if sample_errors.len() < 3 {
                    sample_errors.push(error);
                }
            }
        }
    }
    (histogram, ok, errors, sample_errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_mix_reads_and_updates_as_named() {
        for (workload, expected) in [
            (Workload::A, 0.5),
            (Workload::B, 0.95),
            (Workload::C, 1.0),
            (Workload::W, 0.0),
        ] {
            let mut generator = OpGenerator::new(7, 1000, workload, None);
            let reads = (0..100_000)
                .filter(|_| matches!(generator.next_op(), Op::Read(_)))
                .count();
            let fraction = reads as f64 / 100_000.0;
            assert!(
                (fraction - expected).abs() < 0.01,
                "{workload:?}: {fraction}"
            );
        }
    }

    #[test]
    fn uniform_keys_cover_the_space_evenly() {
        let mut generator = OpGenerator::new(3, 10, Workload::C, None);
        let mut counts = [0u32; 10];
        for _ in 0..100_000 {
            let (Op::Read(k) | Op::Update(k)) = generator.next_op();
            counts[k as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (9_000..11_000).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn zipfian_keys_are_skewed_and_in_range() {
        let zipfian = Arc::new(Zipfian::new(10_000));
        let mut generator = OpGenerator::new(5, 10_000, Workload::C, Some(zipfian));
        let mut counts = std::collections::HashMap::new();
        for _ in 0..200_000 {
            let (Op::Read(k) | Op::Update(k)) = generator.next_op();
            assert!(k < 10_000);
            *counts.entry(k).or_insert(0u32) += 1;
        }
        let mut sorted: Vec<u32> = counts.values().copied().collect();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let top_ten: u32 = sorted.iter().take(10).sum();
        // With theta 0.99 over 10k keys the 10 hottest take roughly a quarter.
        assert!(
            top_ten > 200_000 / 6,
            "top 10 keys got only {top_ten} of 200000"
        );
        assert!(
            counts.len() > 2_000,
            "the tail is still visited ({} keys)",
            counts.len()
        );
    }

    #[test]
    fn reports_render_percentiles() {
        let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("bounds");
        for us in 1..=1000 {
            latency.record(us).expect("record");
        }
        let report = Report {
            ok: 1000,
            errors: 2,
            elapsed: Duration::from_secs(2),
            latency_us: latency,
            sample_errors: vec![],
        };
        assert_eq!(report.throughput(), 500.0);
        let json = report.json("A \"quoted\"");
        assert!(
            json.starts_with("{\"label\":\"A quoted\",\"ok\":1000,\"errors\":2"),
            "{json}"
        );
        assert!(json.contains("\"p99_ms\":0.99"), "{json}");
        assert!(report.text("A").contains("p50 0.50"));
    }
}
