//! Storage-engine evaluation for DKVS: fjall 3.x vs redb 4.x.
//!
//! Standalone crate (see the empty `[workspace]` in Cargo.toml). Run with
//!
//!     cargo run --release --manifest-path tools/bench/storage-eval/Cargo.toml -- [options]
//!
//! Options (all optional):
//!   --ops N            ops for non-fsync-per-write cases (default 200000)
//!   --sync-ops N       ops for the fsync-per-write cases (default 50000)
//!   --gets N           random point gets (default = --ops)
//!   --batch N          group-commit batch size (default 1000)
//!   --interval-ms N    background fsync interval for the "flush + periodic fsync" case (default 10)
//!   --max-secs S       time cap per fsync-per-put case; the case stops early
//!                      after S seconds and reports the ops actually done (default 8)
//!   --kill-n N         puts before SIGKILL in the kill test (default 2001; 0 = skip it)
//!   --dir PATH         directory in which scratch databases are created
//!                      (default: <crate>/target/bench-data; must be on a real disk, not tmpfs)
//!   --only fjall|redb  run only one engine
//!   --api-demo-only    only run the compiled fjall API demo (api_demo.rs) and exit

mod api_demo;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY_LEN: usize = 16;
const VAL_LEN: usize = 100;

// ---------------------------------------------------------------- config

#[derive(Clone, Debug)]
struct Cfg {
    ops: usize,
    sync_ops: usize,
    gets: usize,
    batch: usize,
    interval_ms: u64,
    max_secs: f64,
    kill_n: u64,
    dir: PathBuf,
    fjall: bool,
    redb: bool,
}

fn parse_args() -> (Cfg, bool) {
    let mut cfg = Cfg {
        ops: 200_000,
        sync_ops: 50_000,
        gets: 0,
        batch: 1_000,
        interval_ms: 10,
        kill_n: 2_001,
        max_secs: 8.0,
        dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("bench-data"),
        fjall: true,
        redb: true,
    };
    let mut demo_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("missing value for {a}"));
        match a.as_str() {
            "--ops" => cfg.ops = val().parse().expect("--ops"),
            "--sync-ops" => cfg.sync_ops = val().parse().expect("--sync-ops"),
            "--gets" => cfg.gets = val().parse().expect("--gets"),
            "--batch" => cfg.batch = val().parse().expect("--batch"),
            "--interval-ms" => cfg.interval_ms = val().parse().expect("--interval-ms"),
            "--max-secs" => cfg.max_secs = val().parse().expect("--max-secs"),
            "--kill-n" => cfg.kill_n = val().parse().expect("--kill-n"),
            "--dir" => cfg.dir = PathBuf::from(val()),
            "--only" => match val().as_str() {
                "fjall" => cfg.redb = false,
                "redb" => cfg.fjall = false,
                o => panic!("--only fjall|redb, got {o}"),
            },
            "--api-demo-only" => demo_only = true,
            "-h" | "--help" => {
                println!("see the doc comment at the top of src/main.rs");
                std::process::exit(0);
            }
            o => panic!("unknown argument {o}"),
        }
    }
    if cfg.gets == 0 {
        cfg.gets = cfg.ops;
    }
    assert!(cfg.batch > 0);
    (cfg, demo_only)
}

// ---------------------------------------------------------------- data

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// 16-byte key: 8 pseudo-random bytes (so inserts land in random order) + the
/// index (so keys are unique).
fn key(i: u64) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..8].copy_from_slice(&splitmix64(i).to_be_bytes());
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

/// 100-byte pseudo-random (incompressible) value.
fn value(i: u64) -> [u8; VAL_LEN] {
    let mut v = [0u8; VAL_LEN];
    let mut s = i ^ 0xDEAD_BEEF;
    for chunk in v.chunks_mut(8) {
        s = splitmix64(s);
        let b = s.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    v
}

fn scratch(cfg: &Cfg, name: &str) -> tempfile::TempDir {
    std::fs::create_dir_all(&cfg.dir).expect("create bench dir");
    tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(&cfg.dir)
        .expect("tempdir")
}

// ---------------------------------------------------------------- results

#[derive(Default)]
struct Results {
    // case -> engine -> (ops/s, note)
    // rows are printed sorted by label (labels start with a1, a2, b1, ...)
    rows: BTreeMap<String, BTreeMap<&'static str, String>>,
}

impl Results {
    fn put(&mut self, case: &str, engine: &'static str, ops: usize, el: Duration) {
        let rate = ops as f64 / el.as_secs_f64();
        let cell = fmt_rate(rate);
        println!(
            "  {engine:<5} {ops:>7} ops {:>7.3}s {:>11} ops/s  {case}",
            el.as_secs_f64(),
            fmt_rate(rate)
        );
        std::io::stdout().flush().ok();
        self.rows.entry(case.to_string()).or_default().insert(engine, cell);
    }

    fn print_table(&self) {
        println!();
        println!("| case | fjall ops/s | redb ops/s |");
        println!("|---|---:|---:|");
        for (case, r) in &self.rows {
            let f = r
                .get("fjall")
                .or_else(|| r.get("raw"))
                .map(String::as_str)
                .unwrap_or("n/a");
            let d = r
                .get("redb")
                .or_else(|| r.get("raw"))
                .map(String::as_str)
                .unwrap_or("n/a");
            println!("| {case} | {f} | {d} |");
        }
        println!(
            "\n(*) redb Durability::None is NOT equivalent to fjall PersistMode::Buffer: a None commit \
             only updates redb's in-memory commit slot (pages may stay in redb's userspace write \
             buffer), so it is lost on a process kill as well as on power loss. redb has no \
             'survives SIGKILL but not power loss' level."
        );
    }
}

fn fmt_rate(r: f64) -> String {
    let n = r.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

// ---------------------------------------------------------------- baseline

/// Raw hardware baseline: append one 116-byte record to a file and fdatasync.
fn raw_fsync_baseline(cfg: &Cfg, res: &mut Results) {
    let dir = scratch(cfg, "raw");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("log"))
        .unwrap();
    let rec = [7u8; KEY_LEN + VAL_LEN];
    let (n, el) = sync_loop(cfg, |_| {
        f.write_all(&rec).unwrap();
        f.sync_data().unwrap();
    });
    res.put("a0 baseline, no engine: append 116 B to a plain file + fdatasync", "raw", n, el);
}

/// Runs `f(0..sync_ops)` but stops early once `max_secs` have elapsed, so a
/// slow disk cannot blow up the total run time. Returns (ops done, elapsed).
fn sync_loop(cfg: &Cfg, mut f: impl FnMut(u64)) -> (usize, Duration) {
    let cap = Duration::from_secs_f64(cfg.max_secs);
    let t = Instant::now();
    let mut i = 0u64;
    while i < cfg.sync_ops as u64 {
        f(i);
        i += 1;
        if i.is_multiple_of(64) && t.elapsed() >= cap {
            break;
        }
    }
    (i as usize, t.elapsed())
}

// ---------------------------------------------------------------- fjall

mod fj {
    use super::*;
    use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};

    pub fn open(path: &Path, manual_journal_persist: bool) -> (Database, Keyspace) {
        let db = Database::builder(path)
            .manual_journal_persist(manual_journal_persist)
            .open()
            .expect("fjall open");
        // NB: there are TWO `manual_journal_persist` flags in fjall 3.1: the
        // DatabaseBuilder one only governs `db.batch()` and transactions; plain
        // `Keyspace::insert/remove` consult the keyspace's own CreateOptions
        // flag (stored in the meta keyspace when the keyspace is created).
        let ks = db
            .keyspace("kv", || {
                KeyspaceCreateOptions::default().manual_journal_persist(manual_journal_persist)
            })
            .expect("keyspace");
        (db, ks)
    }

    pub fn run(cfg: &Cfg, res: &mut Results) {
        const E: &str = "fjall";

        // (a) per-write durable: insert + persist(SyncAll)
        {
            let dir = scratch(cfg, "fjall-a");
            let (db, ks) = open(dir.path(), false);
            let (n, el) = sync_loop(cfg, |i| {
                ks.insert(key(i), value(i)).unwrap();
                db.persist(PersistMode::SyncAll).unwrap();
            });
            res.put("a1 per-put fsync: fjall insert+persist(SyncAll) / redb 1 txn per put, Immediate", E, n, el);
        }
        // (a') per-write durable: insert + persist(SyncData)
        {
            let dir = scratch(cfg, "fjall-a2");
            let (db, ks) = open(dir.path(), false);
            let (n, el) = sync_loop(cfg, |i| {
                ks.insert(key(i), value(i)).unwrap();
                db.persist(PersistMode::SyncData).unwrap();
            });
            res.put("a2 per-put fdatasync: fjall insert+persist(SyncData)", E, n, el);
        }
        // (b) per-write flushed to OS (survives SIGKILL, not power loss).
        // With the default config (manual_journal_persist = false) `insert`
        // itself already does journal.persist(PersistMode::Buffer), i.e. a
        // write(2) of the BufWriter into the page cache. An explicit
        // db.persist(Buffer) afterwards is a no-op (buffer already clean).
        {
            let dir = scratch(cfg, "fjall-b");
            let (_db, ks) = open(dir.path(), false);
            let t = Instant::now();
            for i in 0..cfg.ops as u64 {
                ks.insert(key(i), value(i)).unwrap();
            }
            res.put("b1 per-put flush to OS, no fsync: fjall insert (default = Buffer) / redb 1 txn per put, None (*)", E, cfg.ops, t.elapsed());
        }
        {
            let dir = scratch(cfg, "fjall-b1");
            let (db, ks) = open(dir.path(), false);
            let t = Instant::now();
            for i in 0..cfg.ops as u64 {
                ks.insert(key(i), value(i)).unwrap();
                db.persist(PersistMode::Buffer).unwrap();
            }
            res.put("b2 per-put flush to OS: fjall insert + explicit persist(Buffer)", E, cfg.ops, t.elapsed());
        }
        // (b'') flush-to-OS per write + background fsync thread every N ms.
        {
            let dir = scratch(cfg, "fjall-b2");
            let (db, ks) = open(dir.path(), false);
            let stop = Arc::new(AtomicBool::new(false));
            let syncer = {
                let db = db.clone();
                let stop = stop.clone();
                let iv = Duration::from_millis(cfg.interval_ms);
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(iv);
                        db.persist(PersistMode::SyncData).unwrap();
                        n += 1;
                    }
                    n
                })
            };
            let t = Instant::now();
            for i in 0..cfg.ops as u64 {
                ks.insert(key(i), value(i)).unwrap();
            }
            let el = t.elapsed();
            stop.store(true, Ordering::Relaxed);
            let nsync = syncer.join().unwrap();
            res.put(
                &format!("b3 per-put flush to OS + fsync every {} ms: fjall bg thread persist(SyncData) / redb None + Immediate commit every interval (*)", cfg.interval_ms),
                E,
                cfg.ops,
                el,
            );
            println!("         (background syncer ran {nsync} fsyncs)");
        }
        // never: manual_journal_persist(true), no persist at all (data sits in
        // an 8 KiB userspace BufWriter until it fills; lost on SIGKILL)
        {
            let dir = scratch(cfg, "fjall-n");
            let (_db, ks) = open(dir.path(), true);
            let t = Instant::now();
            for i in 0..cfg.ops as u64 {
                ks.insert(key(i), value(i)).unwrap();
            }
            res.put("b4 never flush, never fsync: fjall manual_journal_persist(true) on db + keyspace, no persist", E, cfg.ops, t.elapsed());
        }
        // (e) read-modify-write per put inside one write transaction
        // (what a Dynamo-style put that merges versions needs), flushed to OS.
        {
            use fjall::{Readable, SingleWriterTxDatabase};
            let dir = scratch(cfg, "fjall-e");
            let db = SingleWriterTxDatabase::builder(dir.path()).open().unwrap();
            let ks = db.keyspace("kv", KeyspaceCreateOptions::default).unwrap();
            let t = Instant::now();
            for i in 0..cfg.ops as u64 {
                let k = key(i);
                let mut tx = db.write_tx(); // default durability: Buffer
                let cur = tx.get(&ks, k).unwrap();
                assert!(cur.is_none());
                tx.insert(&ks, k, value(i));
                tx.commit().unwrap();
            }
            res.put("e1 per-put read-modify-write txn (get+insert+commit), flush to OS, no fsync: fjall SingleWriterTxDatabase / redb None (*)", E, cfg.ops, t.elapsed());
            let (n, el) = sync_loop(cfg, |i| {
                let k = key(i % cfg.ops as u64); // update an existing key
                let mut tx = db.write_tx();
                let cur = tx.get(&ks, k).unwrap();
                assert!(cur.is_some());
                tx.insert(&ks, k, value(i + 1));
                tx.commit().unwrap();
                db.persist(PersistMode::SyncAll).unwrap();
            });
            res.put("e2 per-put read-modify-write txn + fsync: fjall tx + persist(SyncAll) / redb Immediate", E, n, el);
        }
        // (c) group commit: 1000 inserts then one fsync
        {
            let dir = scratch(cfg, "fjall-c");
            let (db, ks) = open(dir.path(), false);
            let t = Instant::now();
            let mut i = 0u64;
            while (i as usize) < cfg.ops {
                let end = (i + cfg.batch as u64).min(cfg.ops as u64);
                for j in i..end {
                    ks.insert(key(j), value(j)).unwrap();
                }
                db.persist(PersistMode::SyncAll).unwrap();
                i = end;
            }
            res.put(
                &format!("c1 group commit, {} puts + 1 fsync: fjall insert x N + persist(SyncAll)", cfg.batch),
                E,
                cfg.ops,
                t.elapsed(),
            );
        }
        // (c') group commit via atomic WriteBatch (OwnedWriteBatch) + one fsync.
        // Reuse this loaded DB for the get benchmarks.
        {
            let dir = scratch(cfg, "fjall-c2");
            let (db, ks) = open(dir.path(), false);
            let t = Instant::now();
            let mut i = 0u64;
            while (i as usize) < cfg.ops {
                let end = (i + cfg.batch as u64).min(cfg.ops as u64);
                let mut b = db.batch().durability(Some(PersistMode::SyncAll));
                for j in i..end {
                    b.insert(&ks, key(j), value(j));
                }
                b.commit().unwrap();
                i = end;
            }
            res.put(
                &format!("c2 group commit, {} puts + 1 fsync: fjall WriteBatch + SyncAll / redb 1 txn of {}, Immediate", cfg.batch, cfg.batch),
                E,
                cfg.ops,
                t.elapsed(),
            );

            // (d) random point gets over the loaded data
            let gets = gets_plan(cfg);
            let t = Instant::now();
            let mut found = 0usize;
            for &i in &gets {
                if let Some(v) = ks.get(key(i)).unwrap() {
                    debug_assert_eq!(&*v, &value(i)[..]);
                    found += v.len() / VAL_LEN;
                }
            }
            assert_eq!(found, gets.len());
            res.put("d1 random get, 1 thread, right after load: fjall (data in memtable) / redb (1 read txn per get)", E, gets.len(), t.elapsed());

            // flush memtable to an on-disk table, then read again
            ks.rotate_memtable_and_wait().unwrap();
            let t = Instant::now();
            let mut found = 0usize;
            for &i in &gets {
                if ks.get(key(i)).unwrap().is_some() {
                    found += 1;
                }
            }
            assert_eq!(found, gets.len());
            res.put("d2 random get, 1 thread: fjall after memtable flushed to disk table", E, gets.len(), t.elapsed());

            // reopen (cold block cache, warm OS page cache)
            drop(ks);
            drop(db);
            let (_db, ks) = open(dir.path(), false);
            let t = Instant::now();
            let mut found = 0usize;
            for &i in &gets {
                if ks.get(key(i)).unwrap().is_some() {
                    found += 1;
                }
            }
            assert_eq!(found, gets.len());
            res.put("d3 random get, 1 thread, after close+reopen (engine cache cold, OS cache warm)", E, gets.len(), t.elapsed());
        }
    }
}

fn gets_plan(cfg: &Cfg) -> Vec<u64> {
    let n = cfg.ops as u64;
    (0..cfg.gets as u64).map(|i| splitmix64(i ^ 0x5555) % n).collect()
}

// ---------------------------------------------------------------- redb

mod rd {
    use super::*;
    use redb::{Database, Durability, ReadableDatabase, TableDefinition};

    pub const T: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

    fn open(path: &Path) -> Database {
        let db = Database::create(path.join("db.redb")).expect("redb create");
        // create the table up front
        let w = db.begin_write().unwrap();
        w.open_table(T).unwrap();
        w.commit().unwrap();
        db
    }

    fn put_txn(db: &Database, dur: Durability, range: std::ops::Range<u64>) {
        let mut w = db.begin_write().unwrap();
        w.set_durability(dur).unwrap();
        {
            let mut t = w.open_table(T).unwrap();
            for i in range {
                t.insert(&key(i)[..], &value(i)[..]).unwrap();
            }
        }
        w.commit().unwrap();
    }

    pub fn run(cfg: &Cfg, res: &mut Results) {
        const E: &str = "redb";
        // (a) one committed write txn per put, default durability (Immediate)
        {
            let dir = scratch(cfg, "redb-a");
            let db = open(dir.path());
            let (n, el) = sync_loop(cfg, |i| {
                put_txn(&db, Durability::Immediate, i..i + 1);
            });
            res.put("a1 per-put fsync: fjall insert+persist(SyncAll) / redb 1 txn per put, Immediate", E, n, el);
        }
        // (b) Durability::None per put. NOTE: in redb this does NOT survive a
        // process kill: the commit slot is only updated in memory and pages
        // may sit in redb's userspace write buffer. Closest thing redb has.
        {
            let dir = scratch(cfg, "redb-b");
            let db = open(dir.path());
            let t = Instant::now();
            for i in 0..cfg.ops as u64 {
                put_txn(&db, Durability::None, i..i + 1);
            }
            res.put("b1 per-put flush to OS, no fsync: fjall insert (default = Buffer) / redb 1 txn per put, None (*)", E, cfg.ops, t.elapsed());
            // make it durable before drop so the drop isn't measured weirdly
            put_txn(&db, Durability::Immediate, 0..0);
        }
        // (b'') Durability::None per put + an Immediate commit every N ms
        {
            let dir = scratch(cfg, "redb-b2");
            let db = open(dir.path());
            let iv = Duration::from_millis(cfg.interval_ms);
            let mut last = Instant::now();
            let mut nsync = 0u64;
            let t = Instant::now();
            for i in 0..cfg.ops as u64 {
                let dur = if last.elapsed() >= iv {
                    last = Instant::now();
                    nsync += 1;
                    Durability::Immediate
                } else {
                    Durability::None
                };
                put_txn(&db, dur, i..i + 1);
            }
            let el = t.elapsed();
            res.put(
                &format!("b3 per-put flush to OS + fsync every {} ms: fjall bg thread persist(SyncData) / redb None + Immediate commit every interval (*)", cfg.interval_ms),
                E,
                cfg.ops,
                el,
            );
            println!("         ({nsync} Immediate commits; redb: None commits in between are lost on SIGKILL)");
        }
        // (e) read-modify-write per put in one write txn
        {
            use redb::ReadableTable;
            let dir = scratch(cfg, "redb-e");
            let db = open(dir.path());
            let rmw = |i: u64, v: u64, dur: Durability, present: bool| {
                let mut w = db.begin_write().unwrap();
                w.set_durability(dur).unwrap();
                {
                    let mut t = w.open_table(T).unwrap();
                    let k = key(i);
                    let cur = t.get(&k[..]).unwrap().map(|g| g.value().to_vec());
                    assert_eq!(cur.is_some(), present);
                    t.insert(&k[..], &value(v)[..]).unwrap();
                }
                w.commit().unwrap();
            };
            let t = Instant::now();
            for i in 0..cfg.ops as u64 {
                rmw(i, i, Durability::None, false);
            }
            res.put("e1 per-put read-modify-write txn (get+insert+commit), flush to OS, no fsync: fjall SingleWriterTxDatabase / redb None (*)", E, cfg.ops, t.elapsed());
            let (n, el) = sync_loop(cfg, |i| {
                rmw(i % cfg.ops as u64, i + 1, Durability::Immediate, true);
            });
            res.put("e2 per-put read-modify-write txn + fsync: fjall tx + persist(SyncAll) / redb Immediate", E, n, el);
        }
        // (c) group commit: one txn of `batch` puts, Immediate
        {
            let dir = scratch(cfg, "redb-c");
            let db = open(dir.path());
            let t = Instant::now();
            let mut i = 0u64;
            while (i as usize) < cfg.ops {
                let end = (i + cfg.batch as u64).min(cfg.ops as u64);
                put_txn(&db, Durability::Immediate, i..end);
                i = end;
            }
            res.put(
                &format!("c2 group commit, {} puts + 1 fsync: fjall WriteBatch + SyncAll / redb 1 txn of {}, Immediate", cfg.batch, cfg.batch),
                E,
                cfg.ops,
                t.elapsed(),
            );

            // (d) random point gets: one read txn per get (what a server would do)
            let gets = gets_plan(cfg);
            let t = Instant::now();
            let mut found = 0usize;
            for &i in &gets {
                let r = db.begin_read().unwrap();
                let tbl = r.open_table(T).unwrap();
                if let Some(v) = tbl.get(&key(i)[..]).unwrap() {
                    found += v.value().len() / VAL_LEN;
                }
            }
            assert_eq!(found, gets.len());
            res.put("d1 random get, 1 thread, right after load: fjall (data in memtable) / redb (1 read txn per get)", E, gets.len(), t.elapsed());

            // same, but one long-lived read txn for all gets
            let t = Instant::now();
            let mut found = 0usize;
            {
                let r = db.begin_read().unwrap();
                let tbl = r.open_table(T).unwrap();
                for &i in &gets {
                    if tbl.get(&key(i)[..]).unwrap().is_some() {
                        found += 1;
                    }
                }
            }
            assert_eq!(found, gets.len());
            res.put("d4 random get, 1 thread: redb one long-lived read txn for all gets", E, gets.len(), t.elapsed());

            drop(db);
            let db = Database::create(dir.path().join("db.redb")).unwrap();
            let t = Instant::now();
            let mut found = 0usize;
            for &i in &gets {
                let r = db.begin_read().unwrap();
                let tbl = r.open_table(T).unwrap();
                if tbl.get(&key(i)[..]).unwrap().is_some() {
                    found += 1;
                }
            }
            assert_eq!(found, gets.len());
            res.put("d3 random get, 1 thread, after close+reopen (engine cache cold, OS cache warm)", E, gets.len(), t.elapsed());
        }
    }
}

// ---------------------------------------------------------------- SIGKILL test

/// Empirically checks what survives a SIGKILL: a child process writes N puts
/// with a given policy, reports "ready" on stdout, then blocks; the parent
/// SIGKILLs it, reopens the database and counts the keys that survived.
mod kill_test {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    const MODES: &[(&str, &str)] = &[
        ("fjall-default", "fjall insert, default config (auto PersistMode::Buffer), no fsync"),
        ("fjall-manual", "fjall insert, manual_journal_persist(true) on db + keyspace, never persisted"),
        ("redb-none", "redb 1 txn per put, Durability::None"),
        ("redb-immediate", "redb 1 txn per put, Durability::Immediate"),
    ];

    pub fn child(mode: &str, dir: &Path, n: u64) {
        match mode {
            "fjall-default" | "fjall-manual" => {
                let (_db, ks) = fj::open(dir, mode == "fjall-manual");
                for i in 0..n {
                    ks.insert(key(i), value(i)).unwrap();
                }
                ready_and_block();
            }
            "redb-none" | "redb-immediate" => {
                let db = redb::Database::create(dir.join("db.redb")).unwrap();
                let dur = if mode == "redb-none" {
                    redb::Durability::None
                } else {
                    redb::Durability::Immediate
                };
                for i in 0..n {
                    let mut w = db.begin_write().unwrap();
                    w.set_durability(dur).unwrap();
                    {
                        let mut t = w.open_table(rd::T).unwrap();
                        t.insert(&key(i)[..], &value(i)[..]).unwrap();
                    }
                    w.commit().unwrap();
                }
                ready_and_block();
            }
            m => panic!("unknown mode {m}"),
        }
    }

    fn ready_and_block() {
        println!("ready");
        std::io::stdout().flush().unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(60));
        }
    }

    fn count(mode: &str, dir: &Path, n: u64) -> u64 {
        if mode.starts_with("fjall") {
            let (_db, ks) = fj::open(dir, false);
            (0..n).filter(|&i| ks.get(key(i)).unwrap().is_some()).count() as u64
        } else {
            use redb::ReadableDatabase;
            let db = redb::Database::create(dir.join("db.redb")).unwrap();
            let r = db.begin_read().unwrap();
            match r.open_table(rd::T) {
                Ok(t) => (0..n).filter(|&i| t.get(&key(i)[..]).unwrap().is_some()).count() as u64,
                Err(redb::TableError::TableDoesNotExist(_)) => 0,
                Err(e) => panic!("{e}"),
            }
        }
    }

    pub fn run(cfg: &Cfg) {
        let n = cfg.kill_n;
        if n == 0 {
            return;
        }
        println!("SIGKILL test ({n} puts, then kill -9, then reopen and count):");
        let exe = std::env::current_exe().unwrap();
        for (mode, desc) in MODES {
            let dir = scratch(cfg, &format!("kill-{mode}"));
            let mut child = Command::new(&exe)
                .args(["--kill-child", mode, dir.path().to_str().unwrap(), &n.to_string()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "child failed");
            child.kill().unwrap(); // SIGKILL on Unix
            child.wait().unwrap();
            let survived = count(mode, dir.path(), n);
            println!("  {survived:>5}/{n} survived  {mode:<15} {desc}");
        }
    }
}

// ---------------------------------------------------------------- main

fn main() {
    // child mode for the SIGKILL test: storage-eval --kill-child <mode> <dir> <n>
    let argv: Vec<String> = std::env::args().collect();
    if argv.len() == 5 && argv[1] == "--kill-child" {
        kill_test::child(&argv[2], Path::new(&argv[3]), argv[4].parse().expect("n"));
        return;
    }
    let (cfg, demo_only) = parse_args();

    // Always run the API demo first: it asserts the API facts reported in docs/STORAGE.md.
    let demo_dir = scratch(&cfg, "api-demo");
    api_demo::run(demo_dir.path()).expect("api demo");
    println!("fjall API demo: OK");
    drop(demo_dir);
    if demo_only {
        return;
    }

    println!(
        "config: ops={} sync_ops={} (capped at {}s per case) gets={} batch={} interval_ms={} dir={} key={}B value={}B",
        cfg.ops,
        cfg.sync_ops,
        cfg.max_secs,
        cfg.gets,
        cfg.batch,
        cfg.interval_ms,
        cfg.dir.display(),
        KEY_LEN,
        VAL_LEN
    );
    let total = Instant::now();
    let mut res = Results::default();
    kill_test::run(&cfg);
    raw_fsync_baseline(&cfg, &mut res);
    if cfg.fjall {
        fj::run(&cfg, &mut res);
    }
    if cfg.redb {
        rd::run(&cfg, &mut res);
    }
    res.print_table();
    println!("\ntotal wall time: {:.1}s", total.elapsed().as_secs_f64());
}
