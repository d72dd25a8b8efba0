//! Node configuration: command-line flags, optionally read from a file.
//!
//! Every setting is a `DKVSServer` flag. `--config FILE` reads the same
//! settings from a TOML file whose keys are the flag names without the
//! leading dashes (`_` may stand for `-`):
//!
//! ```toml
//! listen = "127.0.0.1:7001"
//! peers = ["127.0.0.1:7001", "127.0.0.1:7002"]  # or "a,b", as on the command line
//! replicas = 3
//! phi-threshold = 8.0
//! fsync = "always"
//! ```
//!
//! Strings are quoted, numbers are not. Each setting becomes a `--name=value`
//! argument checked by the flag's own clap parser, so the ranges live in one
//! place; a problem (TOML syntax, an unknown key, a value of the wrong type or
//! out of range, a `config` key) is reported with the file and line. Flags
//! given on the command line replace the file's settings.

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

    /// Read settings from this TOML file (keys are the flag names, e.g.
    /// `listen = "127.0.0.1:7001"`); command-line flags override it.
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
                    file_to_args(&text).map_err(|e| file_error(format!("{path} {e}")))?;
                // A flag on the command line replaces the file's setting,
                // a list (--peers) too, which clap would append to.
                let on_command_line = <Self as clap::CommandFactory>::command()
                    .ignore_errors(true)
                    .try_get_matches_from(&args)
                    .ok();
                let given = |id: &clap::Id| {
                    on_command_line.as_ref().is_some_and(|matches| {
                        matches.value_source(id.as_str())
                            == Some(clap::parser::ValueSource::CommandLine)
                    })
                };
                // Program name, the file's settings, then the command line.
                let mut merged = vec![args[0].clone()];
                merged.extend(
                    from_file
                        .into_iter()
                        .filter(|(id, _)| !given(id))
                        .map(|(_, argument)| argument),
                );
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
/// Only used to read a line of the old format for the message that says how
/// to fix it.
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

/// A problem in the config file, at a line (and column, when TOML gives one).
#[derive(Debug)]
struct FileError {
    line: usize,
    column: Option<usize>,
    message: String,
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}", self.line)?;
        if let Some(column) = self.column {
            write!(f, ", column {column}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// The 1-based line and column (in characters) of byte offset `at` of `text`.
fn position(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = &text.as_bytes()[..at];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = text
        .get(line_start..at)
        .map_or(at - line_start, |part| part.chars().count())
        + 1;
    (line, column)
}

/// Line `number` (1-based) of `text`, without its line break.
fn line_of(text: &str, number: usize) -> &str {
    text.lines().nth(number.saturating_sub(1)).unwrap_or("")
}

/// What TOML value a flag takes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A flag without a value: `true` or `false`.
    Switch,
    /// A whole number (clap parses it and checks its range).
    Integer,
    /// A number, with or without a fraction.
    Number,
    /// A string (addresses, paths, names such as `always`).
    Text,
    /// A comma-separated list: an array of strings, or one string.
    List,
}

impl Kind {
    fn of(arg: &clap::Arg) -> Kind {
        use std::any::TypeId;
        if !arg.get_action().takes_values() {
            return Kind::Switch;
        }
        if arg.get_value_delimiter().is_some() {
            return Kind::List;
        }
        let id = arg.get_value_parser().type_id();
        let integers = [
            TypeId::of::<u8>(),
            TypeId::of::<u16>(),
            TypeId::of::<u32>(),
            TypeId::of::<u64>(),
            TypeId::of::<usize>(),
            TypeId::of::<i8>(),
            TypeId::of::<i16>(),
            TypeId::of::<i32>(),
            TypeId::of::<i64>(),
            TypeId::of::<isize>(),
        ];
        if integers.iter().any(|t| id == *t) {
            Kind::Integer
        } else if id == TypeId::of::<f64>() || id == TypeId::of::<f32>() {
            Kind::Number
        } else {
            Kind::Text
        }
    }

    fn wanted(self) -> &'static str {
        match self {
            Kind::Switch => "true or false",
            Kind::Integer => "a whole number",
            Kind::Number => "a number",
            Kind::Text => "a string",
            Kind::List => "an array of strings (or one comma-separated string)",
        }
    }
}

fn toml_type(value: &toml::de::DeValue<'_>) -> &'static str {
    use toml::de::DeValue;
    match value {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A TOML integer as decimal digits (TOML also allows 0x, 0o and 0b).
fn decimal(integer: &toml::de::DeInteger<'_>) -> Option<String> {
    i128::from_str_radix(integer.as_str(), integer.radix())
        .ok()
        .map(|n| n.to_string())
}

/// A string in TOML syntax, for messages that show how to write a value.
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The value of setting `key` (flag `arg`) as the text of a command-line
/// value; `None` for a switch set to `false` (left out). `raw` is how the
/// value is written in the file.
fn value_text(
    key: &str,
    kind: Kind,
    value: &toml::de::DeValue<'_>,
    raw: &str,
) -> Result<Option<String>, String> {
    use toml::de::DeValue;
    let text = match (kind, value) {
        (Kind::Switch, DeValue::Boolean(on)) => return Ok(on.then(String::new)),
        (Kind::Integer | Kind::Number, DeValue::Integer(integer)) => {
            decimal(integer).ok_or_else(|| format!("`{key} = {raw}`: the number is too large"))?
        }
        (Kind::Number, DeValue::Float(float)) => float.as_str().to_string(),
        (Kind::Text | Kind::List, DeValue::String(text)) => text.to_string(),
        (Kind::List, DeValue::Array(items)) => {
            let mut texts = Vec::with_capacity(items.len());
            for item in items.iter() {
                match item.get_ref() {
                    DeValue::String(text) if !text.contains(',') => texts.push(text.to_string()),
                    DeValue::String(text) => {
                        return Err(format!(
                            "`{key}`: an item of the array contains a comma ({}); give each as its own string",
                            quoted(text)
                        ));
                    }
                    other => {
                        return Err(format!(
                            "`{key}` takes {}, but an item of the array is {}: write {key} = [\"a\", \"b\"]",
                            kind.wanted(),
                            toml_type(other)
                        ));
                    }
                }
            }
            texts.join(",")
        }
        (_, other) => {
            let hint = match (kind, other) {
                (Kind::Integer | Kind::Number, DeValue::String(text))
                    if text.trim().parse::<f64>().is_ok() =>
                {
                    format!(": write {key} = {} (numbers take no quotes)", text.trim())
                }
                (
                    Kind::Text | Kind::List,
                    DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_),
                ) => {
                    format!(": quote it, {key} = {}", quoted(raw))
                }
                _ => String::new(),
            };
            return Err(format!(
                "`{key}` takes {}, not {}{hint}",
                kind.wanted(),
                toml_type(other)
            ));
        }
    };
    Ok(Some(text))
}

/// Checks one setting's value with the flag's own clap parser (the ranges
/// live there), so that a bad value is reported at its line in the file.
fn check_with_clap(arg: &clap::Arg, argument: &str) -> Result<(), String> {
    clap::Command::new("DKVSServer")
        .no_binary_name(true)
        .arg(arg.clone().required(false))
        .try_get_matches_from([argument])
        .map(drop)
        .map_err(|error| {
            let rendered = error.render().to_string();
            let message = rendered.strip_prefix("error: ").unwrap_or(&rendered);
            let message = message
                .split_once("\n\nFor more information")
                .map_or(message, |(message, _)| message);
            message.trim_end().to_string()
        })
}

/// For a TOML syntax error on a line of the old `name = value` format, whose
/// strings were not quoted (`listen = 127.0.0.1:7001`): a message that shows
/// the line as TOML. `None` if the line is not such a line.
fn unquoted_value_hint(command: &clap::Command, line: &str) -> Option<String> {
    let (name, value) = strip_comment(line).split_once('=')?;
    let (name, value) = (name.trim(), value.trim());
    let flag = name.replace('_', "-");
    let takes_text = command
        .get_arguments()
        .find(|arg| arg.get_long() == Some(flag.as_str()))
        .is_some_and(|arg| matches!(Kind::of(arg), Kind::Text | Kind::List));
    if !takes_text
        || value.is_empty()
        || value.contains('=')
        || value.starts_with(['"', '\'', '[', '{'])
    {
        return None;
    }
    if toml::de::DeValue::parse(value).is_ok() {
        return None;
    }
    Some(format!(
        "`{name} = {value}` is not TOML; quote strings: {name} = {}",
        quoted(value)
    ))
}

/// Reads a TOML config file into `--name=value` arguments, each with the id
/// of its flag. Keys are the flag names (`_` may stand for `-`); every error
/// names the line.
fn file_to_args(text: &str) -> Result<Vec<(clap::Id, String)>, FileError> {
    let command = <ServerConfig as clap::CommandFactory>::command();
    let document = toml::de::DeTable::parse(text).map_err(|error| {
        let (line, column) = error.span().map_or((1, None), |span| {
            let (line, column) = position(text, span.start);
            (line, Some(column))
        });
        let source = line_of(text, line);
        match unquoted_value_hint(&command, source) {
            Some(message) => FileError {
                line,
                column: None,
                message,
            },
            None => FileError {
                line,
                column,
                message: format!(
                    "`{}`: {} (the file is TOML: `name = value` lines, strings in double quotes)",
                    source.trim(),
                    error.message().trim_end()
                ),
            },
        }
    })?;
    // In the order of the file, so that the first problem is the one reported.
    let mut entries: Vec<_> = document.get_ref().iter().collect();
    entries.sort_by_key(|(key, _)| key.span().start);
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut args = Vec::new();
    for (key, value) in entries {
        let (line, _) = position(text, key.span().start);
        let error = |message: String| FileError {
            line,
            column: None,
            message,
        };
        let written: &str = key.get_ref();
        let name = written.replace('_', "-");
        if name == "config" {
            return Err(error(format!(
                "`{written}`: a config file cannot name another (--config is a command-line flag)"
            )));
        }
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(name.as_str()))
            .filter(|_| name != "help" && name != "version")
            .ok_or_else(|| {
                error(format!(
                    "unknown setting `{written}` (settings are DKVSServer's flag names, see DKVSServer --help)"
                ))
            })?;
        if let Some((_, first)) = seen.iter().find(|(seen, _)| *seen == name) {
            return Err(error(format!(
                "`{written}` sets --{name} again (already set on line {first})"
            )));
        }
        seen.push((name.clone(), line));
        let raw = text.get(value.span()).unwrap_or("").trim();
        let Some(value) =
            value_text(written, Kind::of(arg), value.get_ref(), raw).map_err(error)?
        else {
            continue;
        };
        let argument = if value.is_empty() && Kind::of(arg) == Kind::Switch {
            format!("--{name}")
        } else {
            format!("--{name}={value}")
        };
        check_with_clap(arg, &argument).map_err(error)?;
        args.push((arg.get_id().clone(), argument));
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

    /// Parses `--config FILE` (FILE holding `text`) followed by `flags`;
    /// an error is returned as the message DKVSServer prints.
    fn with_file(text: &str, flags: &[&str]) -> Result<ServerConfig, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).expect("write");
        let path = path.to_str().expect("utf-8 path").to_string();
        let mut list = vec!["DKVSServer", "--config", &path];
        list.extend_from_slice(flags);
        ServerConfig::from_arg_list(args(&list))
            .map_err(|error| error.to_string().replace(&path, "node.toml"))
    }

    #[test]
    fn a_switch_is_true_or_false() {
        use toml::de::DeValue;
        let on = value_text("x", Kind::Switch, &DeValue::Boolean(true), "true");
        assert_eq!(on, Ok(Some(String::new())));
        let off = value_text("x", Kind::Switch, &DeValue::Boolean(false), "false");
        assert_eq!(off, Ok(None));
        let error = value_text("x", Kind::Switch, &DeValue::String("yes".into()), "\"yes\"")
            .expect_err("a string");
        assert!(error.contains("takes true or false"), "{error}");
    }

    #[test]
    fn a_toml_file_sets_every_kind_of_value() {
        let config = with_file(
            r#"# a node
listen = "127.0.0.1:7001"
peers = ["127.0.0.1:7002", "127.0.0.1:7003"]   # an array
data_dir = 'data/n1'
replicas = 5
vnodes = 0x40              # hex is TOML too
phi_threshold = 9.5        # `_` or `-`
heartbeat-interval-ms = 250
fsync = "always"
storage-engine = "fjall"
max-hint-bytes = 1_000_000
"#,
            &[],
        )
        .expect("parse");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(
            config.member_addresses(),
            args(&["127.0.0.1:7001", "127.0.0.1:7002", "127.0.0.1:7003"])
        );
        assert_eq!(config.data_dir(), PathBuf::from("data/n1"));
        assert_eq!(config.replicas, 5);
        assert_eq!(config.vnodes, 64);
        assert_eq!(config.phi_threshold, 9.5);
        assert_eq!(config.heartbeat_interval_ms, 250);
        assert_eq!(config.fsync, FsyncPolicy::Always);
        assert_eq!(config.storage_engine, Engine::Fjall);
        assert_eq!(config.max_hint_bytes, 1_000_000);
        // Peers may also be one comma-separated string, as on the command line;
        // a whole number is a number where a fraction is allowed.
        let config = with_file(
            "listen = \"127.0.0.1:7001\"\npeers = \"127.0.0.1:7002, 127.0.0.1:7003\"\nphi-threshold = 12\n",
            &[],
        )
        .expect("parse");
        assert_eq!(config.member_addresses().len(), 3);
        assert_eq!(config.phi_threshold, 12.0);
    }

    #[test]
    fn config_file_is_overridden_by_flags() {
        let config = with_file(
            "listen = \"127.0.0.1:7001\"\nreplicas = 5\nvnodes = 64\npeers = [\"127.0.0.1:7002\"]\n",
            &["--replicas", "2", "--peers=127.0.0.1:7009"],
        )
        .expect("parse");
        assert_eq!(config.listen.to_string(), "127.0.0.1:7001");
        assert_eq!(config.replicas, 2);
        assert_eq!(config.vnodes, 64);
        assert_eq!(
            config.member_addresses(),
            args(&["127.0.0.1:7001", "127.0.0.1:7009"])
        );
    }

    /// The error for `text`, which must name `line` of node.toml.
    fn file_error(text: &str, line: &str) -> String {
        let error = with_file(text, &[]).expect_err(text);
        assert!(error.contains(&format!("node.toml {line}")), "{error}");
        assert_eq!(error.matches("node.toml").count(), 1, "{error}");
        error
    }

    #[test]
    fn an_unknown_setting_names_its_line() {
        let error = file_error("listen = \"127.0.0.1:7001\"\n\nbogus_flag = 1\n", "line 3:");
        assert!(error.contains("unknown setting `bogus_flag`"), "{error}");
        // --help and --version are no settings.
        file_error("help = true\n", "line 1:");
    }

    #[test]
    fn a_syntax_error_names_its_line_and_column() {
        let error = file_error(
            "listen = \"127.0.0.1:7001\"\nreplicas = = 3\n",
            "line 2, column 12:",
        );
        assert!(error.contains("`replicas = = 3`"), "{error}");
        let error = file_error("# a node\ndata_dir = \"d\n", "line 2, column");
        assert!(error.contains("string"), "{error}");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_line() {
        let error = file_error("listen = \"127.0.0.1:7001\"\nreplicas = \"3\"\n", "line 2:");
        assert!(
            error.contains("`replicas` takes a whole number, not a string: write replicas = 3"),
            "{error}"
        );
        let error = file_error("listen = 7001\n", "line 1:");
        assert!(
            error.contains("`listen` takes a string, not an integer: quote it, listen = \"7001\""),
            "{error}"
        );
        let error = file_error(
            "listen = \"127.0.0.1:7001\"\nphi-threshold = true\n",
            "line 2:",
        );
        assert!(error.contains("takes a number, not a boolean"), "{error}");
        let error = file_error(
            "listen = \"127.0.0.1:7001\"\npeers = [\"127.0.0.1:7002\", 7003]\n",
            "line 2:",
        );
        assert!(
            error.contains("an item of the array is an integer"),
            "{error}"
        );
        let error = file_error("listen = \"127.0.0.1:7001\"\n[peers]\na = 1\n", "line 2:");
        assert!(error.contains("not a table"), "{error}");
    }

    #[test]
    fn a_value_out_of_range_names_the_range_and_its_line() {
        let error = file_error("listen = \"127.0.0.1:7001\"\n\nvnodes = 0\n", "line 3:");
        assert!(error.contains("0 is not in 1..=65536"), "{error}");
        let error = file_error(
            "listen = \"127.0.0.1:7001\"\nphi_threshold = 0.0\n",
            "line 2:",
        );
        assert!(error.contains("0 < phi <= 1000000"), "{error}");
        let error = file_error(
            "listen = \"127.0.0.1:7001\"\nfsync = \"sometimes\"\n",
            "line 2:",
        );
        assert!(
            error.contains("[possible values: always, periodic]"),
            "{error}"
        );
        file_error("listen = \"localhost\"\n", "line 1:");
    }

    #[test]
    fn a_config_file_cannot_name_another_nor_set_a_flag_twice() {
        let error = file_error(
            "listen = \"127.0.0.1:7001\"\nconfig = \"other.toml\"\n",
            "line 2:",
        );
        assert!(error.contains("cannot name another"), "{error}");
        let error = file_error(
            "phi-threshold = 8.0\nlisten = \"127.0.0.1:7001\"\nphi_threshold = 9.0\n",
            "line 3:",
        );
        assert!(error.contains("already set on line 1"), "{error}");
    }

    #[test]
    fn a_hash_inside_a_string_is_part_of_the_value() {
        let config = with_file(
            "listen = \"127.0.0.1:7001\"\ndata_dir = \"d#x\"  # the data\n",
            &[],
        )
        .expect("parse");
        assert_eq!(config.data_dir(), PathBuf::from("d#x"));
    }

    #[test]
    fn the_old_unquoted_format_is_refused_with_the_fix() {
        let error = file_error("# a node\nlisten = 127.0.0.1:7001\n", "line 2:");
        assert!(
            error.contains(
                "`listen = 127.0.0.1:7001` is not TOML; quote strings: listen = \"127.0.0.1:7001\""
            ),
            "{error}"
        );
        let error = file_error(
            "listen = \"127.0.0.1:7001\"\nfsync = always   # fsync before every ack\n",
            "line 2:",
        );
        assert!(
            error.contains("`fsync = always` is not TOML; quote strings: fsync = \"always\""),
            "{error}"
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
