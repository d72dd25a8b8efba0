//! The log engine against a hostile disk, with real DKVSServer processes: a
//! flipped byte in a data file costs at most the entry it hits.

mod common;

use std::path::{Path, PathBuf};

use common::{TestCluster, eventually, get_request, put_request};

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
    let skipped = cluster.sum_stats(|s| s.damaged_entries_skipped).await;
    assert!(
        lost.len() <= 1,
        "{} of {KEYS} acknowledged keys lost after one flipped byte: {:?}...",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert_eq!(skipped, 1, "the damaged entry is reported in stats");
}

/// Unmounts a test's filesystem (lazily: a node may still hold files).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Mounts a `size` tmpfs at `dir`, or says why not.
fn mount_tmpfs(dir: &Path, size: &str) -> Result<Unmount, String> {
    let output = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if output.status.success() {
        Ok(Unmount(dir.to_path_buf()))
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_serves_reads_and_loses_nothing_acknowledged() {
    let mut cluster = TestCluster::start(1).await;
    cluster.kill(0);
    // Move the node's data dir onto a 16 MiB filesystem.
    let data_dir = cluster.nodes[0].data_dir.clone();
    let aside = data_dir.with_extension("orig");
    std::fs::rename(&data_dir, &aside).expect("move the data dir aside");
    std::fs::create_dir(&data_dir).expect("mount point");
    let _unmount = match mount_tmpfs(&data_dir, "16m") {
        Ok(unmount) => unmount,
        Err(why) => {
            println!("skipped: cannot mount a small tmpfs ({why})");
            return;
        }
    };
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(aside.join("."))
        .arg(&data_dir)
        .status()
        .expect("cp");
    assert!(copied.success());
    // Ballast, deleted later to free space.
    let ballast = data_dir.join("ballast");
    std::fs::write(&ballast, vec![0u8; 3 << 20]).expect("ballast");
    cluster.restart(0).await;

    let value = "x".repeat(64 << 10);
    let mut kv = cluster.kv(0).await;
    let mut acknowledged = Vec::new();
    let mut refused = None;
    for i in 0..1000 {
        let key = format!("fill{i:04}");
        match kv.put(put_request(&key, &value)).await {
            Ok(_) => acknowledged.push(key),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("the disk filled up");
    println!(
        "{} writes acknowledged, then {:?}: {}",
        acknowledged.len(),
        refused.code(),
        refused.message()
    );
    assert!(
        matches!(
            refused.code(),
            tonic::Code::ResourceExhausted | tonic::Code::Unavailable
        ),
        "{refused:?}"
    );
    assert!(
        refused.message().contains("is full")
            && refused.message().contains(&*data_dir.to_string_lossy()),
        "the refusal names the full data dir: {}",
        refused.message()
    );
    assert!(acknowledged.len() > 100, "{}", acknowledged.len());
    // Still full: refused again; reads and the node go on.
    assert!(kv.put(put_request("still-full", &value)).await.is_err());
    for key in &acknowledged {
        let found = kv.get(get_request(key)).await.expect("get").into_inner();
        assert!(found.found && found.value == value.as_bytes(), "{key}");
    }
    assert!(
        !kv.get(get_request("still-full"))
            .await
            .expect("get")
            .into_inner()
            .found,
        "a refused write is not read back"
    );

    // Space is back: writes are taken again.
    std::fs::remove_file(&ballast).expect("free space");
    eventually(std::time::Duration::from_secs(10), async || {
        kv.put(put_request("after", &value))
            .await
            .map_err(|status| format!("writes not taken after space was freed: {status:?}"))
    })
    .await;
    acknowledged.push("after".into());

    // SIGKILL and restart: every acknowledged write is there.
    cluster.kill(0);
    cluster.restart(0).await;
    let mut kv = cluster.kv(0).await;
    for key in &acknowledged {
        let found = kv.get(get_request(key)).await.expect("get").into_inner();
        assert!(found.found && found.value == value.as_bytes(), "{key} lost");
    }
}
