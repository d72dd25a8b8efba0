//! Micro-benchmarks of the pure core and the storage engine:
//! `cargo bench --bench core` (add `-- ring` etc. to filter).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use dkvs::clock::Version;
use dkvs::quorum::{ReadTally, WriteReply, WriteTally};
use dkvs::record::{Record, newest};
use dkvs::replica::ReplicaStore;
use dkvs::ring::{Member, Ring};
use dkvs::storage::{FjallStorage, FsyncPolicy, LogStorage, MemoryStorage, Storage};

fn members(count: usize) -> Vec<Member> {
    (0..count)
        .map(|i| Member::new(format!("10.0.{}.{}:7000", i / 250, i % 250)))
        .collect()
}

fn ring_lookup(c: &mut Criterion) {
    for nodes in [5, 1000] {
        let ring = Ring::new(members(nodes), dkvs::config::DEFAULT_VNODES);
        let keys: Vec<String> = (0..1024).map(|i| format!("user{i:010}")).collect();
        let mut i = 0usize;
        c.bench_function(&format!("ring/preference_list N=3, {nodes} nodes"), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                black_box(ring.preference_list(keys[i].as_bytes(), 3).len())
            })
        });
    }
}

fn version_merge(c: &mut Criterion) {
    let a = Record::value(Version::new(41, 7), &b"0123456789"[..]);
    let b = Record::value(Version::new(42, 3), &b"0123456789"[..]);
    c.bench_function("merge/newest of two records", |bench| {
        bench.iter(|| black_box(newest(Some(black_box(&a)), Some(black_box(&b)))))
    });
    c.bench_function("merge/read tally of 3 replies + repair plan", |bench| {
        bench.iter(|| {
            let mut tally = ReadTally::new(2, 3);
            tally.record(0, "a", Ok(Some(a.clone())));
            tally.record(1, "b", Ok(Some(b.clone())));
            tally.record(2, "c", Ok(None));
            black_box(tally.repair_plan())
        })
    });
    c.bench_function("merge/write tally to W=2", |bench| {
        bench.iter(|| {
            let mut tally = WriteTally::new(b.version, 2, 3);
            tally.record("a", WriteReply::Holds(b.version));
            tally.record("b", WriteReply::Holds(b.version));
            black_box(tally.decision())
        })
    });
}

fn storage(c: &mut Criterion) {
    let value = vec![b'x'; 100];
    let dir = tempfile::tempdir().expect("tempdir");
    let log_dir = tempfile::tempdir().expect("tempdir");
    let engines: Vec<(&str, Arc<dyn Storage>)> = vec![
        (
            "log",
            Arc::new(LogStorage::open(log_dir.path(), FsyncPolicy::Periodic).expect("open log")),
        ),
        (
            "fjall",
            Arc::new(FjallStorage::open(dir.path(), FsyncPolicy::Periodic).expect("open fjall")),
        ),
        ("memory", Arc::new(MemoryStorage::new())),
    ];
    for (name, engine) in engines {
        let ring = Arc::new(Ring::new(members(5), 256));
        let replica = ReplicaStore::open(
            dkvs::clock::InstanceId(1),
            engine,
            ring,
            dkvs::clock::SkewBound::default(),
        )
        .expect("open replica");
        let mut lamport = 0u64;
        c.bench_function(
            &format!("storage/{name} write_if_newer (100 B, flushed to the OS)"),
            |b| {
                b.iter_batched(
                    || {
                        lamport += 1;
                        (
                            format!("user{:010}", lamport % 100_000),
                            Record::value(Version::new(lamport, 1), value.clone()),
                        )
                    },
                    |(key, record)| {
                        black_box(replica.write_if_newer(&key, &record).expect("write"))
                    },
                    BatchSize::SmallInput,
                )
            },
        );
        let batch: Vec<(String, Record)> = (0..100)
            .map(|i| {
                (
                    format!("batch{i:06}"),
                    Record::value(Version::new(u64::MAX / 2, 1), value.clone()),
                )
            })
            .collect();
        c.bench_function(
            &format!("storage/{name} write_many x100 (one flush)"),
            |b| {
                b.iter(|| {
                    black_box(
                        replica
                            .write_many(batch.iter().map(|(k, r)| (k.as_str(), r)))
                            .len(),
                    )
                })
            },
        );
        let mut i = 0u64;
        c.bench_function(&format!("storage/{name} read (hit)"), |b| {
            b.iter(|| {
                i = (i + 7919) % 100_000;
                black_box(replica.read(&format!("user{i:010}")).expect("read"))
            })
        });
    }
}

criterion_group!(benches, ring_lookup, version_merge, storage);
criterion_main!(benches);
