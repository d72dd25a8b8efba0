//! The log engine against a hostile disk, with real DKVSServer processes: a
//! flipped byte in a data file costs at most the entry it hits.

mod common;

use std::path::{Path, PathBuf};

use common::{TestCluster, get_request, put_request};

/// The newest segment of the log engine in `data_dir`.
fn newest_segment(data_dir: &Path) -> PathBuf {
    let log = data_dir.join("log");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&log)
        .expect("list the log dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    segments.pop().expect("a segment")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_newest_segment_costs_at_most_one_key() {
    const KEYS: usize = 3000;
    let mut cluster = TestCluster::start(1).await;
    let value = "v".repeat(100);
    let mut writers = Vec::new();
    for task in 0..8 {
        let mut kv = cluster.kv(0).await;
        let value = value.clone();
        writers.push(tokio::spawn(async move {
            for i in (task..KEYS).step_by(8) {
                kv.put(put_request(&format!("key{i:05}"), &value))
                    .await
                    .expect("acknowledged put");
            }
        }));
    }
    for writer in writers {
        writer.await.expect("writer");
    }
    cluster.kill(0);

    let segment = newest_segment(&cluster.nodes[0].data_dir);
    let mut bytes = std::fs::read(&segment).expect("read segment");
    assert!(bytes.len() > 3000 * 100, "{} bytes", bytes.len());
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    std::fs::write(&segment, &bytes).expect("write segment");

    cluster.restart(0).await;
    let mut kv = cluster.kv(0).await;
    let mut lost = Vec::new();
    for i in 0..KEYS {
        let key = format!("key{i:05}");
        let found = kv.get(get_request(&key)).await.expect("get").into_inner();
        if found.found {
            assert_eq!(found.value, value.as_bytes(), "{key}");
        } else {
            lost.push(key);
        }
    }
    let skipped = cluster.sum_stats(0, |s| s.damaged_entries_skipped).await;
    assert!(
        lost.len() <= 1,
        "{} of {KEYS} acknowledged keys lost after one flipped byte: {:?}...",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(skipped, 1, "the damaged entry is reported in stats");
}
