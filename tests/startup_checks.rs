//! Bad setups are refused at start with real processes: exit 2 and a
//! message naming the flag (addresses, duplicates, values out of range, N
//! and vnodes other than the cluster's, a data dir holding other files);
//! an old DKVS data dir is adopted; the data dir and its files are the
//! owner's only.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestCluster, free_address};

/// The previous release's data dirs (tests/upgrade.rs).
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/release-89231f2"
);
/// The fixture's members, in order.
const FIXTURE_ADDRESSES: &str = "127.77.0.1:7001,127.77.0.2:7001,127.77.0.3:7001";
const MARKER: &str = "DKVS-DATA-DIR";

/// Runs DKVSServer with `args` and `--data-dir data_dir`, expecting it to
/// exit by itself: its exit code and what it printed.
fn run_to_exit(args: &[&str], data_dir: &Path) -> (Option<i32>, String) {
    common::run_server_to_exit(args, data_dir)
}

/// Expects `args` refused with exit 2 and every one of `said` in the message.
fn refused(args: &[&str], said: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("node");
    let (code, output) = run_to_exit(args, &data_dir);
    assert_eq!(code, Some(2), "{args:?}: {output}");
    for part in said {
        assert!(output.contains(part), "{args:?}: {part:?} not in: {output}");
    }
    // Refused before anything was written.
    assert!(!data_dir.join("layout").exists(), "{args:?} wrote a layout");
}

#[test]
fn a_peers_or_join_entry_that_is_not_host_port_is_refused() {
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "127.0.0.1:0,127.0.0.2",
        ],
        &["--peers entry \"127.0.0.2\"", "port is missing"],
    );
    refused(
        &["--listen", "127.0.0.1:0", "--join", "::1:7001"],
        &["--join entry \"::1:7001\"", "[address]:port"],
    );
    refused(
        &["--listen", "127.0.0.1:0", "--join", "seed:http"],
        &["--join entry \"seed:http\"", "not a number"],
    );
}

#[test]
fn a_duplicate_address_is_refused() {
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--peers",
            "127.0.0.1:0,127.0.0.1:7002,127.0.0.1:7002",
        ],
        &["--peers names 127.0.0.1:7002 twice"],
    );
    refused(
        &[
            "--listen",
            "127.0.0.1:0",
            "--join",
            "127.0.0.1:7002, 127.0.0.1:7002",
        ],
        &["--join names 127.0.0.1:7002 twice"],
    );
}

#[test]
fn values_out_of_range_are_refused_naming_the_flag() {
    let base = ["--listen", "127.0.0.1:0"];
    for (flag, value, said) in [
        ("--phi-threshold", "NaN", "is not in 0 < phi"),
        ("--phi-threshold", "inf", "is not in 0 < phi"),
        ("--phi-threshold", "-1", ""),
        ("--heartbeat-interval-ms", "0", ""),
        ("--anti-entropy-interval", "-5", ""),
        ("--fsync-interval-ms", "0", ""),
        ("--max-value-bytes", "300000000", "one gRPC message"),
        ("--max-value-bytes", "5000000000", ""),
    ] {
        let setting = format!("{flag}={value}");
        let args = [base[0], base[1], setting.as_str()];
        refused(&args, &[flag, said]);
    }
    // The same from a config file, naming its line.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:0\"\nphi-threshold = nan\n").expect("write");
    let file = file.display().to_string();
    refused(&["--config", &file], &["phi-threshold", "line 2"]);
}

/// A member restarted with other --replicas or --vnodes than its cluster
/// was started with is refused, saying which flag and the cluster's value;
/// with the cluster's values it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_with_other_replicas_or_vnodes_says_which_flag_differs() {
    let mut cluster = TestCluster::start(1).await;
    for (flag, value, cluster_value) in [("--replicas", "2", "3"), ("--vnodes", "16", "256")] {
        cluster.kill(0);
        cluster.add_flags(0, &[flag, value]);
        cluster.start_only(0);
        let status = cluster.wait_exit(0, Duration::from_secs(20)).await;
        let log = cluster.log_of(0);
        assert_eq!(status.code(), Some(2), "{log}");
        let expected = format!(
            "{flag} {value} differs from this node's cluster, which uses {flag} {cluster_value}"
        );
        assert!(log.contains(&expected), "{log}");
        // Back to the cluster's value: it serves again.
        cluster.drop_flag(0, flag);
        cluster.restart(0).await;
    }
}

#[test]
fn a_data_dir_holding_other_files_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("notes.txt"), "mine\n").expect("write");
    std::fs::create_dir(dir.path().join("photos")).expect("mkdir");
    // A dedicated disk's lost+found is no reason to refuse.
    std::fs::create_dir(dir.path().join("lost+found")).expect("mkdir");
    let (code, output) = run_to_exit(
        &["--listen", "127.0.0.1:0", "--peers", "127.0.0.1:0"],
        dir.path(),
    );
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains("--data-dir")
            && output.contains("notes.txt, photos")
            && !output.contains("lost+found,"),
        "{output}"
    );
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["lost+found", "notes.txt", "photos"]);
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

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Every path under `dir` (itself included) whose mode is not 0700 for a
/// dir or 0600 for a file.
#[cfg(unix)]
fn not_private(dir: &Path) -> Vec<(PathBuf, u32)> {
    let mut wrong = Vec::new();
    if mode(dir) != 0o700 {
        wrong.push((dir.to_path_buf(), mode(dir)));
    }
    for entry in std::fs::read_dir(dir).expect("list") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            wrong.extend(not_private(&path));
        } else if mode(&path) != 0o600 {
            wrong.push((path.clone(), mode(&path)));
        }
    }
    wrong
}

/// A data dir of the release before the marker (the upgrade fixture, its
/// files made readable by all) is adopted: marked, and made private.
#[cfg(unix)]
#[test]
fn an_old_dkvs_data_dir_is_adopted_and_made_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("node1");
    copy_dir(&Path::new(FIXTURE).join("node1"), &data_dir);
    for path in [data_dir.join("layout"), data_dir.clone()] {
        let open = std::fs::Permissions::from_mode(if path.is_dir() { 0o755 } else { 0o644 });
        std::fs::set_permissions(&path, open).expect("chmod");
    }
    assert!(!data_dir.join(MARKER).exists());
    let mut node = Command::new(env!("CARGO_BIN_EXE_DKVSServer"))
        .args([
            "--listen",
            &free_address(),
            "--advertise",
            "127.77.0.1:7001",
        ])
        .args(["--peers", FIXTURE_ADDRESSES])
        .arg("--data-dir")
        .arg(&data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn DKVSServer");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !data_dir.join(MARKER).exists() {
        assert!(
            node.try_wait().expect("wait").is_none(),
            "the node exited instead of adopting its data dir"
        );
        assert!(Instant::now() < deadline, "no marker after 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let still_running = node.try_wait().expect("wait").is_none();
    let _ = node.kill();
    let _ = node.wait();
    assert!(still_running, "the node exited after adopting its data dir");
    let marker = std::fs::read_to_string(data_dir.join(MARKER)).expect("marker");
    assert!(marker.contains("format 1"), "{marker}");
    assert_eq!(not_private(&data_dir), []);
}

/// A new node's data dir is 0700 and every file in it 0600, with either
/// engine, once it has written something.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_data_dir_and_its_files_are_the_owners_only() {
    for engine in ["log", "fjall"] {
        let cluster = TestCluster::start_with(1, &["--storage-engine", engine]).await;
        let client = cluster.client().await;
        for i in 0..20 {
            client
                .put(&format!("key{i}"), b"value".to_vec())
                .await
                .expect("put");
        }
        let data_dir = &cluster.nodes[0].data_dir;
        assert!(data_dir.join(MARKER).exists(), "{engine}: no marker");
        assert_eq!(not_private(data_dir), [], "{engine}");
    }
}

/// A joiner learns N and vnodes from the cluster, so other flags only make
/// it warn while it joins; once it is a full member, a start with them is
/// refused like any member's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_with_other_replicas_warns_then_is_refused_once_a_member() {
    let mut cluster = TestCluster::start(1).await;
    let joiner = cluster.spawn_joiner(0, free_address(), &["--replicas", "2"]);
    let address = cluster.nodes[joiner].address.clone();
    let member = common::eventually(Duration::from_secs(60), async || {
        let layout = cluster
            .membership(0)
            .await
            .get_layout(dkvs::pb::GetLayoutRequest {})
            .await
            .map_err(|status| status.to_string())?
            .into_inner();
        let active = layout
            .members
            .iter()
            .any(|m| m.address == address && m.role == dkvs::pb::LayoutRole::Active as i32);
        if active && layout.previous.is_empty() {
            Ok(layout)
        } else {
            Err(format!(
                "not a settled member yet: layout v{}",
                layout.version
            ))
        }
    })
    .await;
    assert_eq!(member.replicas, 3);
    let log = cluster.log_of(joiner);
    assert!(
        log.contains("--replicas 2 differs") && log.contains("This node is joining"),
        "{log}"
    );
    assert!(
        cluster.exited(joiner).is_none(),
        "the joiner stopped: {log}"
    );
    cluster.kill(joiner);
    cluster.start_only(joiner);
    let status = cluster.wait_exit(joiner, Duration::from_secs(20)).await;
    let log = cluster.log_of(joiner);
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("which uses --replicas 3"), "{log}");
}
