//! Compiled (and executed, with assertions) demonstration of the fjall 3.x API
//! surface that DKVS needs. Every snippet in docs/STORAGE.md is copied from here.

use fjall::{
    Database, Keyspace, KeyspaceCreateOptions, OptimisticTxDatabase, OwnedWriteBatch,
    PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace, Slice, UserValue,
};
use std::path::Path;

// --- (iii) handles are Send + Sync + Clone (checked at compile time) --------
fn assert_send_sync_clone<T: Send + Sync + Clone + 'static>() {}
fn assert_send_sync<T: Send + Sync + 'static>() {}
fn assert_send<T: Send + 'static>() {}

pub fn compile_time_checks() {
    assert_send_sync_clone::<Database>(); // Arc<DatabaseInner> inside
    assert_send_sync_clone::<Keyspace>(); // Arc<KeyspaceInner> inside
    assert_send_sync_clone::<SingleWriterTxDatabase>();
    assert_send_sync_clone::<SingleWriterTxKeyspace>();
    assert_send_sync_clone::<OptimisticTxDatabase>();
    assert_send_sync_clone::<Slice>(); // = UserKey = UserValue
    assert_send_sync::<fjall::Error>();
    assert_send::<fjall::Iter>(); // iterators can move across threads / .await points
    // redb, for comparison
    assert_send_sync::<redb::Database>(); // not Clone: wrap in Arc
}

/// Atomic compare-and-set built on the single-writer transactional database.
/// `expected == None` means "key must be absent"; `new == None` means delete.
/// Returns Ok(true) if the swap happened.
pub fn compare_and_set(
    db: &SingleWriterTxDatabase,
    ks: &SingleWriterTxKeyspace,
    key: &[u8],
    expected: Option<&[u8]>,
    new: Option<&[u8]>,
) -> fjall::Result<bool> {
    let mut tx = db.write_tx(); // takes the single-writer lock
    let current: Option<UserValue> = tx.get(ks, key)?; // `Readable::get`
    if current.as_deref() != expected {
        tx.rollback();
        return Ok(false);
    }
    match new {
        Some(v) => tx.insert(ks, key, v),
        None => tx.remove(ks, key),
    }
    tx.commit()?;
    Ok(true)
}

pub fn run(dir: &Path) -> fjall::Result<()> {
    compile_time_checks();

    // ---------------------------------------------------------------- (i) open
    let db: Database = Database::builder(dir.join("plain"))
        // .manual_journal_persist(false) // default false: batches/txs are flushed to the OS on commit
        // .cache_size(64 * 1024 * 1024)  // block cache, default 32 MiB
        // .worker_threads(2)             // default min(cores, 4)
        .open()?;
    let ks: Keyspace = db.keyspace("data", KeyspaceCreateOptions::default)?; // create-or-open
    // Keyspace options are a closure, only evaluated when the keyspace is created
    // (they are stored in the meta keyspace; reopening ignores the closure).
    let _tuned: Keyspace = db.keyspace("tuned", || {
        KeyspaceCreateOptions::default()
            .max_memtable_size(16 * 1024 * 1024) // default 64 MiB
            // keyspace-level flag consulted by Keyspace::insert/remove (the
            // DatabaseBuilder flag of the same name only affects batches/txs):
            .manual_journal_persist(false)
    })?;

    // ---------------------------------------------------------------- insert/get/remove
    ks.insert("user:1", "alice")?; // K: Into<UserKey>, V: Into<UserValue>: &str, &[u8], Vec<u8>, [u8; N], ...
    ks.insert(b"user:2".to_vec(), vec![1u8, 2, 3])?;
    ks.insert([0u8; 16], [7u8; 100])?;

    let v: Option<UserValue> = ks.get("user:1")?; // UserValue = fjall::Slice
    let v: UserValue = v.expect("present");
    assert_eq!(&*v, b"alice"); // Slice: Deref<Target = [u8]>
    let as_slice: &[u8] = v.as_ref(); // AsRef<[u8]>, also v.as_slice()
    let owned: Vec<u8> = v.to_vec(); // copy into a Vec<u8>
    assert_eq!(as_slice, owned.as_slice());
    let from_vec: Slice = Slice::from(owned); // Vec<u8> -> Slice without copy
    assert_eq!(from_vec, v);
    assert!(ks.contains_key("user:2")?);
    assert_eq!(ks.size_of("user:1")?, Some(5));

    ks.remove("user:2")?; // writes a tombstone; returns ()
    assert!(ks.get("user:2")?.is_none());

    // ---------------------------------------------------------------- iterate
    for i in 0..10u8 {
        ks.insert(format!("p:{i}"), [i])?;
    }
    // prefix scan: items are `fjall::Guard`; into_inner() -> Result<(UserKey, UserValue)>
    let mut n = 0;
    for guard in ks.prefix("p:") {
        let (k, v): (Slice, Slice) = guard.into_inner()?;
        assert!(k.starts_with(b"p:"));
        assert_eq!(v.len(), 1);
        n += 1;
    }
    assert_eq!(n, 10);
    // range scan (any RangeBounds<K: AsRef<[u8]>>), reversible (DoubleEndedIterator)
    let keys: Vec<Slice> = ks
        .range("p:3".."p:6")
        .rev()
        .map(|g| g.key())
        .collect::<fjall::Result<_>>()?;
    assert_eq!(keys, vec![Slice::from("p:5"), Slice::from("p:4"), Slice::from("p:3")]);
    // values only
    let _vals: Vec<UserValue> = ks.prefix("p:").map(|g| g.value()).collect::<fjall::Result<_>>()?;
    // full scan; note len() is O(n), approximate_len() is O(1)
    assert_eq!(ks.iter().count(), 12); // user:1, [0;16], p:0..p:9
    assert_eq!(ks.len()?, 12);
    let first = ks.first_key_value().expect("non-empty").key()?;
    assert_eq!(&*first, &[0u8; 16]);

    // ---------------------------------------------------------------- snapshot reads
    let snap = db.snapshot(); // cross-keyspace consistent snapshot (Readable)
    ks.insert("user:1", "bob")?;
    assert_eq!(&*snap.get(&ks, "user:1")?.expect("present"), b"alice");
    assert_eq!(&*ks.get("user:1")?.expect("present"), b"bob");
    drop(snap);

    // ---------------------------------------------------------------- (iv) atomic write batch
    let mut batch: OwnedWriteBatch = db.batch(); // default durability: Some(PersistMode::Buffer)
    batch.insert(&ks, "b:1", "x");
    batch.insert(&ks, "b:2", "y");
    batch.remove(&ks, "user:1");
    batch.commit()?; // atomic (all-or-nothing across keyspaces)
    assert!(ks.get("user:1")?.is_none());
    // a batch that is fsynced as part of its commit (group commit in one call):
    let mut batch = db.batch().durability(Some(PersistMode::SyncData));
    batch.insert(&ks, "b:3", "z");
    batch.commit()?;

    // ---------------------------------------------------------------- (ii) durability
    ks.insert("k", "v")?; // default config: already write(2)-flushed to the OS page cache
    db.persist(PersistMode::Buffer)?; // flush userspace journal buffer -> OS (no fsync)
    db.persist(PersistMode::SyncData)?; // + fdatasync of the journal
    db.persist(PersistMode::SyncAll)?; // + fsync of the journal

    // ---------------------------------------------------------------- (iii) share across threads
    let ks2 = ks.clone(); // cheap: Arc clone
    let db2 = db.clone(); // cheap: Arc clone
    std::thread::spawn(move || -> fjall::Result<()> {
        ks2.insert("from-thread", "1")?;
        db2.persist(PersistMode::SyncAll)
    })
    .join()
    .expect("thread")?;
    assert!(ks.contains_key("from-thread")?);

    // ---------------------------------------------------------------- (iv) CAS via transactions
    let txdb = SingleWriterTxDatabase::builder(dir.join("tx")).open()?;
    let tks: SingleWriterTxKeyspace = txdb.keyspace("data", KeyspaceCreateOptions::default)?;
    assert!(compare_and_set(&txdb, &tks, b"c", None, Some(b"v1"))?); // insert-if-absent
    assert!(!compare_and_set(&txdb, &tks, b"c", None, Some(b"v2"))?); // fails: present
    assert!(compare_and_set(&txdb, &tks, b"c", Some(b"v1"), Some(b"v2"))?);
    assert_eq!(&*tks.get("c")?.expect("present"), b"v2");
    // built-in atomic read-modify-write on tx keyspaces:
    let prev: Option<UserValue> = tks.fetch_update("c", |cur| {
        let mut n = cur.map(|s| s.to_vec()).unwrap_or_default();
        n.push(b'!');
        Some(Slice::from(n))
    })?;
    assert_eq!(prev.as_deref(), Some(&b"v2"[..]));
    let new: Option<UserValue> = tks.update_fetch("c", |_cur| Some(Slice::from("v3")))?;
    assert_eq!(new.as_deref(), Some(&b"v3"[..]));

    // optimistic (multi-writer, conflict-checked) transactions
    let odb = OptimisticTxDatabase::builder(dir.join("otx")).open()?;
    let oks = odb.keyspace("data", KeyspaceCreateOptions::default)?;
    let mut tx = odb.write_tx()?;
    let cur = tx.get(&oks, "n")?;
    tx.insert(&oks, "n", if cur.is_none() { "1" } else { "2" });
    match tx.commit()? {
        Ok(()) => {}
        Err(fjall::Conflict) => unreachable!("no concurrent writer here"),
    }
    Ok(())
}
