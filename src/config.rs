//! Node configuration: command-line flags, optionally read from a file.
//!
//! Every setting is a `DKVSServer` flag. `--config FILE` reads the same
//! settings from a file of `name = value` lines (the flag names without the
//! leading dashes; `#` starts a comment; values may be quoted, as in TOML).
//! Flags given on the command line override the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use clap::builder::TypedValueParser;

use crate::storage::{Engine, FsyncPolicy};

/// Default tokens per node on the ring.
pub const DEFAULT_VNODES: usize = 256;
/// Default replication factor N.
pub const DEFAULT_REPLICAS: usize = 3;
/// Default key limit, in bytes of UTF-8.
pub const DEFAULT_MAX_KEY_BYTES: usize = 1024;
/// Default value limit: 1 MiB.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;

/// One DKVS storage node.
#[derive(Clone, Debug, Parser)]
#[command(name = "DKVSServer", version, about, long_about = None, args_override_self = true)]
pub struct ServerConfig {
    /// Address to listen on, e.g. 127.0.0.1:7001.
    #[arg(long)]
    pub listen: SocketAddr,

    /// Address peers and clients reach this node at, exactly as it appears in
    /// --peers (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,

    /// Comma-separated addresses of every cluster member; this node's own
    /// address may be included. Every node must be given the same list.
    #[arg(long, value_delimiter = ',', default_value = "")]
    pub peers: Vec<String>,

    /// Directory for this node's data (created if missing).
    /// Default: ./data/<listen address>.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,

    /// Replication factor N: replicas per key (capped at the member count).
    #[arg(long, default_value_t = DEFAULT_REPLICAS, value_parser = clap::value_parser!(u32).range(1..=64).map(|v| v as usize))]
    pub replicas: usize,

    /// Virtual nodes (ring tokens) per member. Every node must use the same value.
    #[arg(long, default_value_t = DEFAULT_VNODES, value_parser = clap::value_parser!(u32).range(1..=65536).map(|v| v as usize))]
    pub vnodes: usize,

    /// Read settings from this file (`name = value` lines, flag names);
    /// command-line flags override it.
    #[arg(long)]
    pub config: Option<PathBuf>,

    /// Storage engine: `log` (append-only log, every key indexed in memory;
    /// fastest) or `fjall` (LSM tree; keys need not fit in memory). A data
    /// dir keeps the engine it was created with.
    #[arg(long, value_enum, default_value_t = Engine::Log)]
    pub storage_engine: Engine,

    /// When writes reach stable storage: `periodic` (handed to the OS before
    /// the ack, so a crash or SIGKILL loses nothing; fsync every
    /// --fsync-interval-ms) or `always` (fsync before every ack).
    #[arg(long, value_enum, default_value_t = FsyncPolicy::Periodic)]
    pub fsync: FsyncPolicy,

    /// Background fsync interval for --fsync periodic, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub fsync_interval_ms: u64,

    /// Deadline of each node-to-node call, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub rpc_timeout_ms: u64,

    /// Deadline of a whole client request coordinated by this node, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=3_600_000))]
    pub request_timeout_ms: u64,

    /// How often each node sends every peer a heartbeat, in milliseconds.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub heartbeat_interval_ms: u64,

    /// Failure-detector threshold: a peer whose phi (suspicion level) reaches
    /// this is believed down. 8 convicts a silent peer about a second after
    /// its last heartbeat at the default interval; higher is more tolerant.
    #[arg(long, default_value_t = 8.0, value_parser = parse_phi_threshold)]
    pub phi_threshold: f64,

    /// Most hints (writes kept for replicas that are down) this node holds.
    #[arg(long, default_value_t = 100_000)]
    pub max_hints: u64,

    /// Most bytes of hints this node holds (besides --max-hints): a hint
    /// that would exceed it is refused, and anti-entropy repairs its replica.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_hint_bytes: u64,

    /// Hints older than this many seconds are dropped instead of delivered
    /// (anti-entropy repairs what they carried).
    #[arg(long, default_value_t = 3 * 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_hint_age_secs: u64,

    /// How often hints are offered to replicas that are back, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..=3_600_000))]
    pub hint_delivery_interval_ms: u64,

    /// Seconds between anti-entropy rounds: each node compares its hash tree
    /// over shared token ranges with every live peer and copies what differs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub anti_entropy_interval: u64,

    /// Seconds a tombstone is kept after its delete before it may be purged
    /// (only once every replica of the key holds it). Its age comes from the
    /// physical part of its version. Must exceed --max-hint-age-secs + 2 x
    /// --max-clock-skew-ms + the heartbeat interval, so that no hint and no
    /// write that begins after a purge can be stamped below the tombstone,
    /// whichever node coordinates it.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub tombstone_grace: u64,

    /// Largest clock difference tolerated between nodes, in milliseconds.
    /// A version whose wall-clock part is further ahead of this node's wall
    /// clock is refused (so one bad clock or message cannot drag the
    /// cluster's clocks into the future), and a node whose own clock would
    /// run that far ahead refuses to stamp writes. Keep hosts in sync with
    /// NTP; a node warns when a peer's clock is half this far off.
    #[arg(long, default_value_t = crate::clock::DEFAULT_MAX_CLOCK_SKEW_MS, value_parser = clap::value_parser!(u64).range(1..=86_400_000))]
    pub max_clock_skew_ms: u64,

    /// Threads serving requests (default: one per CPU). 1 runs the whole
    /// node on one thread (tokio's current-thread runtime): no hand-offs
    /// between threads, the fastest choice when several nodes share a small
    /// machine's cores (a local cluster, a benchmark). Disk syncs and
    /// compaction run on their own threads either way.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024).map(|v| v as usize))]
    pub worker_threads: Option<usize>,

    /// Longest key accepted, in bytes of UTF-8.
    #[arg(long, default_value_t = DEFAULT_MAX_KEY_BYTES, value_parser = clap::value_parser!(u32).range(1..=65_536).map(|v| v as usize))]
    pub max_key_bytes: usize,

    /// Largest value accepted, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_VALUE_BYTES, value_parser = clap::value_parser!(u32).range(1..=(256 << 20)).map(|v| v as usize))]
    pub max_value_bytes: usize,
}

impl ServerConfig {
    /// Parses the process arguments, merging `--config FILE` if given.
    /// Errors (and `--help`) are clap errors: `error.exit()` prints them and
    /// exits with clap's codes (2 for usage errors, 0 for help).
    pub fn from_args() -> Result<Self, clap::Error> {
        Self::from_arg_list(std::env::args().collect())
    }

    /// Parses an argument list (program name first), merging `--config FILE`.
    pub fn from_arg_list(args: Vec<String>) -> Result<Self, clap::Error> {
        let file_error = |message: String| {
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, format!("{message}\n"))
        };
        let merged = match config_file_in(&args) {
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| file_error(format!("cannot read --config {path}: {e}")))?;
                let from_file =
                    file_to_args(&text).map_err(|e| file_error(format!("{path}: {e}")))?;
                // Program name, then the file's settings, then the command
                // line: for a repeated flag the last one wins.
                let mut merged = vec![args[0].clone()];
                merged.extend(from_file);
                merged.extend(args.into_iter().skip(1));
                merged
            }
            None => args,
        };
        Self::try_parse_from(merged)
    }

    /// The address this node is known by.
    pub fn advertised_address(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    /// Every member's address, this node's included, without duplicates or blanks.
    pub fn member_addresses(&self) -> Vec<String> {
        let mut members: Vec<String> = self
            .peers
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        members.push(self.advertised_address());
        members.sort();
        members.dedup();
        members
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(|| {
            PathBuf::from("data").join(self.listen.to_string().replace(':', "_"))
        })
    }

    pub fn rpc_timeout(&self) -> Duration {
        Duration::from_millis(self.rpc_timeout_ms.max(1))
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.max(10))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn skew_bound(&self) -> crate::clock::SkewBound {
        crate::clock::SkewBound::new(self.max_clock_skew_ms)
    }

    /// Checks that settings agree with each other. Runs before anything is
    /// opened, so a usage error appears at once even on a large data dir.
    pub fn validate(&self) -> Result<(), String> {
        let floor_ms = self
            .max_hint_age_secs
            .saturating_mul(1000)
            .saturating_add(self.max_clock_skew_ms.saturating_mul(2))
            .saturating_add(self.heartbeat_interval().as_millis() as u64);
        if self.tombstone_grace.saturating_mul(1000) <= floor_ms {
            return Err(format!(
                "--tombstone-grace ({} s) must exceed --max-hint-age-secs ({} s) + 2 x --max-clock-skew-ms ({} ms) \
                 + --heartbeat-interval-ms ({} ms) = {floor_ms} ms, or a late hint, or a write coordinated by a node \
                 whose clock is behind, could be stamped below a purged tombstone and bring the key back",
                self.tombstone_grace,
                self.max_hint_age_secs,
                self.max_clock_skew_ms,
                self.heartbeat_interval().as_millis()
            ));
        }
        Ok(())
    }
}

/// `--phi-threshold`: a positive, finite number.
fn parse_phi_threshold(text: &str) -> Result<f64, String> {
    let value: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if value.is_finite() && value > 0.0 && value <= 1e6 {
        Ok(value)
    } else {
        Err(format!("{value} is not in 0 < phi <= 1000000"))
    }
}

fn config_file_in(args: &[String]) -> Option<String> {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        if arg == "--config" {
            return iter.next().cloned();
        }
        if let Some(path) = arg.strip_prefix("--config=") {
            return Some(path.to_string());
        }
    }
    None
}

/// The line without its comment: `#` starts one outside double quotes.
fn strip_comment(line: &str) -> &str {
    let mut quoted = false;
    for (at, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return &line[..at],
            _ => {}
        }
    }
    line
}

/// Turns `name = value` lines into `--name value` arguments. Every error
/// names the line; names must be flags of `DKVSServer`.
fn file_to_args(text: &str) -> Result<Vec<String>, String> {
    let known: Vec<String> = <ServerConfig as clap::CommandFactory>::command()
        .get_arguments()
        .filter_map(|arg| arg.get_long().map(str::to_string))
        .collect();
    let mut args = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line_no = number + 1;
        let line = strip_comment(line).trim();
        if line.is_empty() {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            return Err(format!(
                "line {line_no}: expected `name = value`, found {line:?}"
            ));
        };
        let name = name.trim().replace('_', "-");
        if name == "config" {
            return Err(format!("line {line_no}: a config file cannot name another"));
        }
        if !known.contains(&name) {
            return Err(format!(
                "line {line_no}: unknown setting {name:?} (settings are DKVSServer's flag names, see DKVSServer --help)"
            ));
        }
        let value = value.trim();
        let value = match value.strip_prefix('"') {
            Some(rest) => rest.strip_suffix('"').ok_or_else(|| {
                format!("line {line_no}: the value of {name:?} opens a quote it does not close")
            })?,
            None => value,
        };
        args.push(format!("--{name}"));
        args.push(value.to_string());
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_and_members() {
        let config = ServerConfig::from_arg_list(args(&[
            "DKVSServer",
            "--listen",
            "127.0.0.1:7001",
            "--peers",
            "127.0.0.1:7002,127.0.0.1:7001, 127.0.0.1:7003",
        ]))
        .expect("parse");
        assert_eq!(config.replicas, 3);
        assert_eq!(config.vnodes, DEFAULT_VNODES);
        assert_eq!(config.fsync, FsyncPolicy::Periodic);
        assert_eq!(
            config.member_addresses(),
            args(&["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
        );
        assert_eq!(config.data_dir(), PathBuf::from("data/127.0.0.1_7001"));
    }

    #[test]
    fn config_file_is_overridden_by_flags() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.conf");
        std::fs::write(
            &path,
            "# a node\nlisten = \"127.0.0.1:7001\"\nreplicas = 5\nvnodes = 64 # fewer\nfsync = always\n",
        )
        .expect("write");
        let config = ServerConfig::from_arg_list(args(&[
            "DKVSServer",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--replicas",
            "2",
        ]))
        .expect("parse");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(config.replicas, 2);
        assert_eq!(config.vnodes, 64);
        assert_eq!(config.fsync, FsyncPolicy::Always);
    }

    #[test]
    fn bad_config_lines_are_reported_with_their_number() {
        let error = file_to_args("listen = x\nnonsense\n").expect_err("bad line");
        assert!(error.contains("line 2"), "{error}");
        let error = file_to_args("listen = x\n\nbogus_flag = 1\n").expect_err("unknown");
        assert!(
            error.contains("line 3") && error.contains("bogus-flag"),
            "{error}"
        );
        let error = file_to_args("data_dir = \"d\n").expect_err("open quote");
        assert!(
            error.contains("line 1") && error.contains("quote"),
            "{error}"
        );
    }

    #[test]
    fn a_hash_inside_quotes_is_part_of_the_value() {
        assert_eq!(
            file_to_args("data_dir = \"d#x\"  # the data\n").expect("parse"),
            args(&["--data-dir", "d#x"])
        );
    }

    #[test]
    fn values_that_make_no_sense_are_refused_with_the_range() {
        for (flag, value) in [
            ("--phi-threshold", "0"),
            ("--phi-threshold", "-1"),
            ("--worker-threads", "0"),
            ("--max-key-bytes", "0"),
            ("--max-value-bytes", "0"),
            ("--rpc-timeout-ms", "0"),
            ("--heartbeat-interval-ms", "0"),
            ("--anti-entropy-interval", "0"),
        ] {
            let error = ServerConfig::from_arg_list(args(&[
                "DKVSServer",
                "--listen",
                "127.0.0.1:7001",
                &format!("{flag}={value}"),
            ]))
            .expect_err(flag);
            assert!(error.to_string().contains(flag), "{flag}: {error}");
        }
    }

    #[test]
    fn tombstone_grace_must_cover_clock_skew_and_hint_age() {
        let parse = |extra: &[&str]| {
            let mut list = vec!["DKVSServer", "--listen", "127.0.0.1:7001"];
            list.extend_from_slice(extra);
            ServerConfig::from_arg_list(args(&list)).expect("parse")
        };
        assert_eq!(parse(&[]).validate(), Ok(()));
        let error = parse(&["--tombstone-grace", "121", "--max-hint-age-secs", "1"])
            .validate()
            .expect_err("1 s + 2 x 60 s skew + heartbeat > 121 s");
        assert!(error.contains("--max-clock-skew-ms"), "{error}");
        assert_eq!(
            parse(&[
                "--tombstone-grace",
                "3",
                "--max-hint-age-secs",
                "1",
                "--max-clock-skew-ms",
                "500"
            ])
            .validate(),
            Ok(())
        );
        let error = parse(&["--tombstone-grace", "100", "--max-hint-age-secs", "100"])
            .validate()
            .expect_err("hint age");
        assert!(error.contains("--max-hint-age-secs"), "{error}");
    }

    #[test]
    fn zero_replicas_is_rejected() {
        let error = ServerConfig::from_arg_list(args(&[
            "DKVSServer",
            "--listen",
            "127.0.0.1:7001",
            "--replicas",
            "0",
        ]))
        .expect_err("zero replicas");
        assert!(error.to_string().contains("replicas"), "{error}");
    }
}
