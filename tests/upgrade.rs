//! Upgrades: the data dirs a 3-node cluster of the previous release wrote
//! (`tests/fixtures/release-89231f2`, made by
//! `tools/make-upgrade-fixture.sh`) open and serve with the current
//! `DKVSServer`, and a data file of an unknown format version is refused at
//! start with a message naming it.
//!
//! The fixture's layout names its members' addresses (a member's ring
//! position is a hash of its address), so its cluster runs on the addresses
//! it was written at: 127.77.0.1-3:7001, loopback addresses nothing else
//! here uses. The test checks they are free first. The refusal tests listen
//! on an OS-chosen port: a node refuses before it serves anything.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{TestCluster, eventually};
use dkvs::client::ClientOptions;
use dkvs::quorum::Consistency;

/// The previous release's data dirs and manifest.
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/release-89231f2"
);
/// The fixture's members: `node1`..`node3` of the fixture, in order.
const ADDRESSES: [&str; 3] = ["127.77.0.1:7001", "127.77.0.2:7001", "127.77.0.3:7001"];
/// Long enough for the fixture's hints to be delivered, not dropped as
/// expired, however old the fixture is (and the tombstone grace must exceed
/// the hint age).
const HINT_AGE: &[&str] = &[
    "--max-hint-age-secs",
    "3153600000",
    "--tombstone-grace",
    "6307200000",
];

/// A key's value in the manifest, or `None` when it was deleted.
type Expected = BTreeMap<String, Option<Vec<u8>>>;

/// The manifest: `live <key> <value>`, `live-repeat <key> <part> <times>`,
/// `deleted <key>`, tab-separated; `#` starts a comment.
fn manifest() -> Expected {
    let text = std::fs::read_to_string(Path::new(FIXTURE).join("manifest.tsv"))
        .expect("read the fixture's manifest");
    let mut expected = Expected::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let fields: Vec<&str> = line.split('\t').collect();
        let value = match fields.as_slice() {
            ["live", _, value] => Some(value.as_bytes().to_vec()),
            ["live-repeat", _, part, times] => {
                Some(part.repeat(times.parse().expect("times")).into_bytes())
            }
            ["deleted", _] => None,
            _ => panic!("bad manifest line: {line:?}"),
        };
        expected.insert(fields[1].to_string(), value);
    }
    expected
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("list fixture") {
        let entry = entry.expect("fixture entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy fixture file");
        }
    }
}

/// Copies of the fixture's data dirs in `dir`, with their addresses.
fn fixture_copy(dir: &Path) -> Vec<(String, PathBuf)> {
    ADDRESSES
        .iter()
        .enumerate()
        .map(|(i, address)| {
            let name = format!("node{}", i + 1);
            let data_dir = dir.join(&name);
            copy_dir(&Path::new(FIXTURE).join(&name), &data_dir);
            (address.to_string(), data_dir)
        })
        .collect()
}

fn check_addresses_free() {
    for address in ADDRESSES {
        if let Err(error) = std::net::TcpListener::bind(address) {
            panic!(
                "cannot bind {address}: {error}. The upgrade test runs the fixture's cluster on \
                 127.77.0.1-3:7001 (its layout names them); stop whatever uses these addresses \
                 (another run of this test?) and try again"
            );
        }
    }
}

/// Every key of `expected` read at QUORUM: the mismatches, as text.
async fn mismatches(client: &dkvs::client::Client, expected: &Expected) -> Vec<String> {
    let mut wrong = Vec::new();
    for (key, value) in expected {
        match client.get(key).await {
            Ok(read) if read.as_deref() == value.as_deref() => {}
            Ok(read) => wrong.push(format!(
                "{key}: read {:?}, expected {:?}",
                read.map(|v| v.len()),
                value.as_ref().map(Vec::len)
            )),
            Err(error) => wrong.push(format!("{key}: {error}")),
        }
    }
    wrong
}

/// What node `i`'s own store holds, key by key, against `expected`
/// (a deleted key: a tombstone, or nothing once it is purged).
async fn replica_mismatches(cluster: &TestCluster, i: usize, expected: &Expected) -> Vec<String> {
    let mut wrong = Vec::new();
    for (key, value) in expected {
        let record = cluster.replica_record(i, key).await;
        let held = record.filter(|r| !r.tombstone).map(|r| r.value.to_vec());
        if held != *value {
            wrong.push(format!(
                "{key}: holds {:?} bytes, expected {:?}",
                held.map(|v| v.len()),
                value.as_ref().map(Vec::len)
            ));
        }
    }
    wrong
}

/// The layout node `i` serves.
async fn layout_of(cluster: &TestCluster, i: usize) -> dkvs::pb::Layout {
    cluster
        .membership(i)
        .await
        .get_layout(dkvs::pb::GetLayoutRequest {})
        .await
        .expect("GetLayout")
        .into_inner()
}

/// The cluster id every node of `cluster` serves, once they all serve the
/// same non-zero one.
async fn agreed_cluster_id(cluster: &TestCluster) -> u64 {
    eventually(Duration::from_secs(20), async || {
        let mut ids = Vec::new();
        for i in 0..cluster.nodes.len() {
            ids.push(layout_of(cluster, i).await.cluster_id);
        }
        if ids[0] != 0 && ids.iter().all(|&id| id == ids[0]) {
            Ok(ids[0])
        } else {
            Err(format!("cluster ids {ids:x?}"))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_previous_releases_data_dirs_open_and_serve() {
    check_addresses_free();
    let dir = tempfile::tempdir().expect("tempdir");
    let members = fixture_copy(dir.path());
    let mut extra = vec!["--worker-threads", "1"];
    extra.extend_from_slice(HINT_AGE);
    let mut cluster = TestCluster::start_on(dir, &members, &extra).await;
    // The old release's layout has no cluster id and names no instance:
    // one layout change gives every node the same id, and the next names
    // every member's instance, without the operator doing anything (the
    // cluster is started once every member is named).
    let cluster_id = agreed_cluster_id(&cluster).await;
    let assigned = layout_of(&cluster, 0).await;
    assert!(
        assigned.change == "instances named"
            && assigned.members.len() == 3
            && assigned.members.iter().all(|m| m.instance_id != 0),
        "v{}: {}",
        assigned.version,
        assigned.change
    );
    let mut expected = manifest();
    assert!(
        expected.len() > 300,
        "{} keys in the manifest",
        expected.len()
    );

    // Every key reads back at QUORUM (node3 was killed while some were
    // written: the other two hold them).
    let client = cluster.client().await;
    let wrong = mismatches(&client, &expected).await;
    assert!(wrong.is_empty(), "after the upgrade: {wrong:#?}");

    // The hints nodes 1 and 2 kept for node3 are read and delivered.
    eventually(Duration::from_secs(20), async || {
        let delivered = cluster.sum_stats(|s| s.hints_delivered).await;
        let pending = cluster.sum_stats(|s| s.hints_pending).await;
        if delivered > 0 && pending == 0 {
            Ok(())
        } else {
            Err(format!("{delivered} hints delivered, {pending} pending"))
        }
    })
    .await;

    // New writes and deletes, acknowledged by every replica (so node 1,
    // killed below, holds them all).
    let all = cluster
        .client_with(ClientOptions {
            consistency: Consistency::All,
            ..ClientOptions::default()
        })
        .await;
    let mut changes: Vec<(String, Option<Vec<u8>>)> = (0..50)
        .map(|i| {
            (
                format!("after-upgrade-{i:02}"),
                Some(format!("new-{i}").into_bytes()),
            )
        })
        .collect();
    changes.push(("k000".into(), Some(b"v5-k000".to_vec())));
    changes.push(("k255".into(), Some(b"v5-k255".to_vec()))); // deleted before
    changes.push(("k001".into(), None));
    changes.push(("h000".into(), None)); // delivered as a hint
    for (key, value) in changes {
        match &value {
            Some(value) => all.put(&key, value.clone()).await.map(drop),
            None => all.delete(&key).await.map(drop),
        }
        .unwrap_or_else(|error| panic!("write {key} after the upgrade: {error}"));
        expected.insert(key, value);
    }
    let wrong = mismatches(&client, &expected).await;
    assert!(wrong.is_empty(), "after new writes: {wrong:#?}");

    // A node killed with SIGKILL restarts from its upgraded dir with
    // everything: the old release's entries and the new ones.
    cluster.kill(0);
    cluster.restart(0).await;
    assert_eq!(
        agreed_cluster_id(&cluster).await,
        cluster_id,
        "the id survives a restart"
    );
    let wrong = replica_mismatches(&cluster, 0, &expected).await;
    assert!(
        wrong.is_empty(),
        "node1 after SIGKILL and restart: {wrong:#?}"
    );
    let wrong = mismatches(&cluster.client().await, &expected).await;
    assert!(wrong.is_empty(), "after the restart: {wrong:#?}");

    let status = Command::new(env!("CARGO_BIN_EXE_DKVSClient"))
        .args(["--nodes", &ADDRESSES.join(","), "status"])
        .output()
        .expect("run DKVSClient status");
    let table = String::from_utf8_lossy(&status.stdout);
    assert_eq!(
        status.status.code(),
        Some(0),
        "{table}{}",
        String::from_utf8_lossy(&status.stderr)
    );
    for address in ADDRESSES {
        assert!(table.contains(address), "{address} missing:\n{table}");
    }
}

/// Runs `DKVSServer` on the fixture copy `data_dir` (as node1, on a port
/// the OS picks) and answers its exit code and output once it exits.
fn refused_start(data_dir: &Path) -> (Option<i32>, String) {
    let peers = ADDRESSES.join(",");
    common::run_server_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--advertise",
            ADDRESSES[0],
            "--peers",
            &peers,
        ],
        data_dir,
    )
}

#[test]
fn a_log_segment_of_an_unknown_format_version_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("node1");
    copy_dir(&Path::new(FIXTURE).join("node1"), &data_dir);
    // What a later format looks like: another version in the `DKVSLG`
    // header, entries framed with another marker.
    let segment = data_dir.join("log").join("0000000000000001.log");
    let mut bytes = std::fs::read(&segment).expect("read segment");
    assert_eq!(&bytes[..8], b"DKVSLG\x02\x00", "a format-2 segment");
    bytes[6..8].copy_from_slice(&3u16.to_le_bytes());
    bytes[8..12].copy_from_slice(b"NEW!");
    std::fs::write(&segment, &bytes).expect("write segment");
    let (code, output) = refused_start(&data_dir);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(&segment.display().to_string()) && output.contains("format version 3"),
        "{output}"
    );
}

#[test]
fn a_layout_file_of_an_unknown_format_version_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("node1");
    copy_dir(&Path::new(FIXTURE).join("node1"), &data_dir);
    let layout = data_dir.join("layout");
    let mut bytes = std::fs::read(&layout).expect("read layout");
    assert!(bytes.starts_with(b"DKVSLAYOUT1\n"), "a version-1 layout");
    bytes[10] = b'2';
    std::fs::write(&layout, &bytes).expect("write layout");
    let (code, output) = refused_start(&data_dir);
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains(&layout.display().to_string()) && output.contains("format version 2"),
        "{output}"
    );
}
