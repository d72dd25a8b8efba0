//! `startServers.sh` run for real by tests: against the debug binaries cargo
//! built for the tests (`DKVS_BIN_DIR`, so nothing is built in release),
//! with its run and data dirs in a temp dir and its ports below the OS's
//! ephemeral range, so it touches neither `./run` nor the ports other tests
//! are given. Every node it started is stopped when the `Script` is dropped,
//! pass or fail.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};

/// One cluster directory and port range, and the script run against them.
pub struct Script {
    /// Holds `run/` and `data/`.
    pub dir: tempfile::TempDir,
    /// Nodes listen on base+1, base+2, ...
    pub base_port: u16,
    /// The `startServers.sh` that is run.
    script: PathBuf,
}

impl Script {
    /// The repository's `startServers.sh`, with run and data dirs in a temp
    /// dir and 5 free ports.
    pub fn new() -> Self {
        Script {
            dir: tempfile::tempdir().expect("tempdir"),
            base_port: free_base_port(5),
            script: repo_script(),
        }
    }

    /// `startServers.sh` linked into a temp dir and run from there: the
    /// cluster's root is that dir, so the script prints paths (`run/...`,
    /// `data/...`) as it does in a clone of the repository. Nodes listen on
    /// `base_port`+1, +2, ...
    pub fn rooted_in_temp_dir(base_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("startServers.sh");
        std::os::unix::fs::symlink(repo_script(), &script).expect("link startServers.sh");
        Script {
            dir,
            base_port,
            script,
        }
    }

    /// The directory the cluster lives in.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the test binaries are (`DKVSServer`, `DKVSClient`).
    pub fn bin_dir() -> PathBuf {
        Path::new(env!("CARGO_BIN_EXE_DKVSServer"))
            .parent()
            .expect("binary dir")
            .to_path_buf()
    }

    /// The environment `startServers.sh` reads, pointing at this cluster.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DKVS_BIN_DIR", Self::bin_dir().display().to_string()),
            ("DKVS_RUN_DIR", self.run_dir().display().to_string()),
            ("DKVS_DATA_DIR", self.data_dir().display().to_string()),
            ("DKVS_BASE_PORT", self.base_port.to_string()),
        ]
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("bash");
        command
            .arg(&self.script)
            .args(args)
            .envs(self.env())
            .env_remove("DKVS_SERVER_FLAGS")
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run startServers.sh")
    }

    pub fn run_with_flags(&self, args: &[&str], flags: &str) -> Output {
        self.command(args)
            .env("DKVS_SERVER_FLAGS", flags)
            .output()
            .expect("run startServers.sh")
    }

    pub fn port(&self, node: u16) -> u16 {
        self.base_port + node
    }

    /// The pids in the run dir's pid files.
    pub fn pids(&self) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(self.run_dir()) else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let pids = self.pids();
        // A node frozen by a test (SIGSTOP) would sit out the SIGTERM of
        // `stop` until its grace period ends: thaw every node first.
        for pid in &pids {
            signal(*pid, "-CONT");
        }
        let stopped = self.run(&["stop"]);
        let said = String::from_utf8_lossy(&stopped.stdout);
        if said.contains("did not stop") {
            eprintln!("startServers.sh stop: {said}");
        }
        // If the script itself is what failed, kill what it started by pid.
        for pid in pids {
            signal(pid, "-KILL");
        }
    }
}

fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn repo_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("startServers.sh")
}

/// A base port below the ephemeral range (where the OS picks ports for the
/// other tests) whose next `count` ports are free now.
/// Tests in one file run in parallel in one process, so each call starts
/// its search at a range of its own.
pub fn free_base_port(count: u16) -> u16 {
    static CALLS: AtomicU16 = AtomicU16::new(0);
    let own = CALLS.fetch_add(1, Ordering::Relaxed);
    let start = (std::process::id() % 1000) as u16 * 10 + own * 10;
    (0..1000u16)
        .map(|i| 20_000 + (start + i * 10) % 10_000)
        .find(|&base| ports_free(base, count))
        .expect("a free port range")
}

/// Whether ports base+1 ..= base+count of 127.0.0.1 are free now, and the
/// HTTP and RESP ports `startServers.sh` gives those nodes (each port plus
/// 1000, plus 2000).
pub fn ports_free(base: u16, count: u16) -> bool {
    (1..=count).all(|i| {
        [0, 1000, 2000]
            .iter()
            .all(|offset| TcpListener::bind(("127.0.0.1", base + offset + i)).is_ok())
    })
}
