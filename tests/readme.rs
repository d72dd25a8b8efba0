//! The console samples of README.md and the docs, replayed on a real
//! cluster: the test fails when a command no longer prints what its file
//! shows, volatile parts aside.
//!
//! The files are [`SAMPLE_FILES`], replayed in that order, each with the
//! number of samples it must hold: a sample that moves to another file is
//! still replayed, and one that disappears fails the test until the table
//! says so. A file under `docs/` with a sample but not in the table fails it
//! too. [`links_resolve`] checks that every relative link between these
//! files points at a file (and heading) that exists.
//!
//! A sample is a fenced block right after a comment `<!-- sample: NAME -->`.
//! In it, a line starting with `$ ` is a command (a line ending with `\`
//! continues it on the next line); the lines up to the next command are
//! what it prints, stdout and stderr together, as a terminal shows them.
//! Samples run in file order, in one temp dir that stands for the
//! user's clone (it holds `startServers.sh`, linked, and the cluster's
//! `run/` and `data/`), with `DKVSClient` and `DKVSServer` on `PATH` and
//! `DKVS_NODES` naming the cluster. Their effects carry over: the first
//! sample (README's first) starts the cluster with `./startServers.sh`,
//! later ones kill and restart its nodes.
//!
//! The comment may hold more lines, one setting each:
//!
//! - `before N: SHELL` runs SHELL, unseen, before the sample's Nth command
//!   (from 1); `after: SHELL` after its last. They set up what the sample
//!   shows but cannot type, such as a kill whose target depends on the
//!   ring. Besides the cluster's commands they can use the helpers in
//!   [`HELPERS`]: `replica KEY N` (the address of KEY's Nth replica),
//!   `pid_of ADDRESS`, `wait_state OBSERVER MEMBER UP|DOWN`,
//!   `wait_stats OBSERVER MEMBER` (OBSERVER has MEMBER's counts), `wait_all_up`,
//!   `wait_no_hints`, `wait_keys N` (status's LIVE KEYS add up to N or
//!   more), `wait_moving ADDRESS` (status shows data moving to
//!   it, some keys moved already), `wait_layout V` (status shows every
//!   member on layout vV). Every wait polls with a deadline.
//! - `needs: PROGRAM...`: skip the sample (saying so) when a program is not
//!   installed, e.g. grpcurl.
//! - `tty`: run each command on a terminal (through `script`) and type its
//!   input: the lines that start with `> ` in its output.
//!
//! Before each command the replay waits until every node that runs (and is
//! not frozen) answers SERVING on its health service.
//!
//! Nothing in the samples is specific to this machine or run. The cluster
//! runs on free ports below the OS's ephemeral range and is shown as if its
//! base port were 7000, startServers.sh's default (`127.0.0.1:7001`...;
//! ports 7001 to 7009 in a command are translated back). The ring depends
//! on the members' addresses, so the base port is chosen such that every
//! key a sample asks the replicas of (`replicas KEY`, `replica KEY N`) has
//! the replicas it has on 127.0.0.1:7001..7005: node 5, 3, 1 for `mykey`
//! there and here. The temp dir is shown as `/home/you/dkvs` and the
//! binaries' directory as `/home/you/dkvs/target/release`; the line
//! startServers.sh adds only because the base port is not 7000 is dropped,
//! and trailing blanks are trimmed. That is what `docs/regen-readme.sh`
//! (this test with `DKVS_README_REGEN=1`) writes into each file.
//!
//! Comparing a file with this run then ignores what differs between runs
//! (see [`Normaliser`]): versions, instance and member ids, other long
//! numbers (clocks, ids in JSON), times, pids, `--worker-threads` (cores /
//! nodes), every number in a `status` row and its column padding (key and
//! hint counts depend on which node holds each of the many keys written;
//! phi, skew and uptime on timing), numbers in node log lines, and numbers
//! in JSON fields other than `acks`, `replicas`, `vnodes`, `writeQuorum`
//! and `readQuorum`, everything after the address in a row of data moving
//! to a joining node (`status` during a join), the seconds `cluster wait`
//! waited, and its progress lines (`cluster wait: ...`: how many it prints
//! depends on timing), which are left out of the comparison.
//!
//! `DKVS_TEST_SERVER_FLAGS` does not apply here: the samples show the
//! defaults.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::script::{Script, ports_free};
use dkvs::ring::{Member, Ring};
use regex::{Captures, Regex};

/// Where the samples pretend the clone is.
const DISPLAY_ROOT: &str = "/home/you/dkvs";
/// The base port the samples show (startServers.sh's default).
const DISPLAY_BASE_PORT: u16 = 7000;
/// Ports base+1 ..= base+PORTS are translated; the cluster has 5 nodes and
/// a sample may name a port where nothing listens (7009).
const PORTS: u16 = 9;
/// startServers.sh gives each node an HTTP port this far above its own
/// (`DKVS_HTTP_OFFSET`): 7001 is shown with 8001.
const HTTP_OFFSET: u16 = 1000;
/// And a RESP port this far (`DKVS_RESP_OFFSET`): 7001 is shown with 9001.
const RESP_OFFSET: u16 = 2000;
/// Longest any one command or hidden step may run.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);
/// Longest a node may take to answer SERVING.
const SERVING_DEADLINE: Duration = Duration::from_secs(30);

/// Shell functions for the hidden steps (`before N:`, `after:`).
const HELPERS: &str = r#"
set -euo pipefail
fail() { echo "$*" >&2; exit 1; }
# The pid of the node at HOST:PORT, from its pid file.
pid_of() { cat "run/node-${1##*:}.pid"; }
# The address of KEY's Nth replica.
replica() { DKVSClient replicas "$1" | sed -n "$2s/^[0-9]*\. //p"; }
# Runs a command until it succeeds, for at most 30 s.
wait_for() {
  local deadline=$((SECONDS + 30))
  until "$@"; do
    (( SECONDS < deadline )) || fail "still failing after 30 s: $*"
    sleep 0.1
  done
}
# The STATE column of MEMBER in the status OBSERVER answers.
member_state() { DKVSClient --nodes "$1" status | awk -v m="$2" '$1 == m { print $3 }'; }
is_state() { [[ "$(member_state "$1" "$2")" == "$3" ]]; }
wait_state() { wait_for is_state "$@"; }
# OBSERVER has MEMBER's counts and layout version (an answered heartbeat
# since either restarted), so a status after MEMBER is killed shows them.
has_stats() { DKVSClient --nodes "$1" status | awk -v m="$2" '$1 == m && $5 != "-" { found = 1 } END { exit !found }'; }
wait_stats() { wait_for has_stats "$@"; }
# Every member UP as NODE sees it.
all_up_from() { local s; s=$(DKVSClient --nodes "$1" status) || return 1; ! grep -q ' DOWN ' <<<"$s"; }
wait_all_up() { local n; for n in ${DKVS_NODES//,/ }; do wait_for all_up_from "$n"; done; }
# Every member UP and holding no hint.
no_hints() { DKVSClient status | awk '$1 ~ /^127\./ { if ($3 != "UP" || $7 != "0") bad = 1 } END { exit bad }'; }
wait_no_hints() { wait_for no_hints; }
# Status shows data moving to ADDRESS, some keys moved already.
moving() { DKVSClient status | awk -v a="$1" '$1 == a && $2 ~ /%$/ && $3 > 0 { found = 1 } END { exit !found }'; }
wait_moving() { wait_for moving "$1"; }
# The LIVE KEYS column adds up to at least N (counts arrive with heartbeats).
keys_at_least() { DKVSClient status | awk -v n="$1" '$1 ~ /^127\./ && $5 != "-" { s += $5 } END { exit !(s >= n) }'; }
wait_keys() { wait_for keys_at_least "$1"; }
# Every member serves layout vV (the LAYOUT column, from heartbeats).
on_layout() { DKVSClient status | awk -v v="v$1" '$1 ~ /^127\./ { n++; if ($11 != v) bad = 1 } END { exit bad || !n }'; }
wait_layout() { wait_for on_layout "$1"; }
"#;

/// One command of a sample and what its file shows it printing.
#[derive(Debug)]
struct Step {
    /// The file's line number (from 1) of the command.
    at: usize,
    /// The command's lines as the file has them (`$ ` and continuations).
    lines: Vec<String>,
    /// What the file shows it printing, without trailing blank lines.
    output: Vec<String>,
    /// The blank lines after the output (kept as they are).
    separator: Vec<String>,
}

impl Step {
    /// The shell text of the command.
    fn command(&self) -> String {
        let mut text = self.lines.join("\n");
        text.replace_range(..2, "");
        text
    }

    /// For a `tty` sample: the lines typed at the command's prompt.
    fn typed(&self) -> Vec<String> {
        self.output
            .iter()
            .filter_map(|l| l.strip_prefix("> ").map(str::to_string))
            .collect()
    }
}

/// A marked block of a file.
#[derive(Debug)]
struct Sample {
    name: String,
    /// Index in the file's lines of the opening and of the closing fence.
    open: usize,
    close: usize,
    steps: Vec<Step>,
    before: BTreeMap<usize, Vec<String>>,
    after: Vec<String>,
    needs: Vec<String>,
    tty: bool,
}

/// Finds every marked sample in `file`'s lines.
fn parse(file: &str, lines: &[String]) -> Vec<Sample> {
    let mut samples = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(header) = lines[i].trim().strip_prefix("<!-- sample:") else {
            i += 1;
            continue;
        };
        let at = i + 1;
        // The comment: its first line names the sample; settings follow.
        let mut comment = vec![header.trim().trim_end_matches("-->").trim().to_string()];
        while !lines[i].contains("-->") {
            i += 1;
            assert!(i < lines.len(), "{file} line {at}: unclosed sample comment");
            comment.push(lines[i].trim().trim_end_matches("-->").trim().to_string());
        }
        let name = comment[0].clone();
        assert!(
            !name.is_empty() && !name.contains(' '),
            "{file} line {at}: a sample needs a one-word name, got {name:?}"
        );
        let mut sample = Sample {
            name,
            open: 0,
            close: 0,
            steps: Vec::new(),
            before: BTreeMap::new(),
            after: Vec::new(),
            needs: Vec::new(),
            tty: false,
        };
        for setting in comment[1..].iter().filter(|s| !s.is_empty()) {
            if setting == "tty" {
                sample.tty = true;
            } else if let Some(shell) = setting.strip_prefix("after:") {
                sample.after.push(shell.trim().to_string());
            } else if let Some(programs) = setting.strip_prefix("needs:") {
                sample
                    .needs
                    .extend(programs.split_whitespace().map(str::to_string));
            } else if let Some((n, shell)) = setting
                .strip_prefix("before ")
                .and_then(|rest| rest.split_once(':'))
                && let Ok(n) = n.trim().parse::<usize>()
            {
                sample
                    .before
                    .entry(n)
                    .or_default()
                    .push(shell.trim().to_string());
            } else {
                panic!(
                    "{file} line {at}: sample {}: unknown setting {setting:?} (before N:, after:, needs:, tty)",
                    sample.name
                );
            }
        }
        i += 1;
        while i < lines.len() && lines[i].trim().is_empty() {
            i += 1;
        }
        assert!(
            i < lines.len() && lines[i].starts_with("```"),
            "{file} line {at}: sample {} is not followed by a fenced block",
            sample.name
        );
        sample.open = i;
        i += 1;
        while i < lines.len() && !lines[i].starts_with("```") {
            let line = &lines[i];
            if line.starts_with("$ ") {
                let at = i + 1;
                let mut command = vec![line.clone()];
                while command.last().is_some_and(|l| l.ends_with('\\')) && i + 1 < lines.len() {
                    i += 1;
                    command.push(lines[i].clone());
                }
                sample.steps.push(Step {
                    at,
                    lines: command,
                    output: Vec::new(),
                    separator: Vec::new(),
                });
            } else {
                let Some(step) = sample.steps.last_mut() else {
                    panic!(
                        "{file} line {}: sample {}: output before its first `$ ` command",
                        i + 1,
                        sample.name
                    );
                };
                step.output.push(line.clone());
            }
            i += 1;
        }
        assert!(i < lines.len(), "{file} line {at}: unclosed fence");
        sample.close = i;
        for step in &mut sample.steps {
            while step.output.last().is_some_and(|l| l.trim().is_empty()) {
                step.separator.push(step.output.pop().expect("a line"));
            }
        }
        for &n in sample.before.keys() {
            assert!(
                (1..=sample.steps.len()).contains(&n),
                "{file}: sample {}: `before {n}` but it has {} commands",
                sample.name,
                sample.steps.len()
            );
        }
        samples.push(sample);
        i += 1;
    }
    samples
}

/// Turns what a command printed here into what the docs show, and back for
/// the commands.
struct Display {
    root: PathBuf,
    bins: PathBuf,
    base_port: u16,
    port: Regex,
    display_port: Regex,
    defaults_note: Regex,
}

impl Display {
    fn new(root: &Path, bins: &Path, base_port: u16) -> Self {
        Display {
            root: root.to_path_buf(),
            bins: bins.to_path_buf(),
            base_port,
            port: Regex::new(r"(127\.0\.0\.1:|node-)(\d+)( *)").expect("regex"),
            display_port: Regex::new(r"(127\.0\.0\.1:|node-)([789]0\d\d)\b").expect("regex"),
            defaults_note: Regex::new(r"^\(DKVSClient defaults to 127\.0\.0\.1:7001\.\.7005;")
                .expect("regex"),
        }
    }

    /// What the docs show for `raw`, this run's output.
    fn show(&self, raw: &str) -> Vec<String> {
        let mut text = raw.replace("\r\n", "\n").replace('\r', "");
        let display_bins = format!("{DISPLAY_ROOT}/target/release");
        for bins in paths(&self.bins) {
            text = text.replace(&bins, &display_bins);
        }
        for root in paths(&self.root) {
            text = text.replace(&root, DISPLAY_ROOT);
        }
        let text = self.port.replace_all(&text, |c: &Captures| {
            let port: u32 = c[2].parse().unwrap_or(0);
            let base = u32::from(self.base_port);
            // A node's port, or its HTTP or RESP port (startServers.sh:
            // plus 1000, plus 2000).
            let node = [0, HTTP_OFFSET, RESP_OFFSET]
                .into_iter()
                .map(u32::from)
                .find(|&offset| port > base + offset && port <= base + offset + u32::from(PORTS))
                .map(|offset| port - offset);
            if let Some(node) = node {
                let offset = port - node;
                let shown = (node - base + u32::from(DISPLAY_BASE_PORT) + offset).to_string();
                // Padding after it (a table column) keeps the width.
                let mut pad = c[3].to_string();
                if pad.len() >= 2 {
                    pad.push_str(&" ".repeat(c[2].len().saturating_sub(shown.len())));
                }
                format!("{}{shown}{pad}", &c[1])
            } else {
                c[0].to_string()
            }
        });
        let mut lines: Vec<String> = text
            .lines()
            .filter(|l| !self.defaults_note.is_match(l))
            .map(|l| l.trim_end().to_string())
            .collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }

    /// The command to run for `shown`, a command as the docs show it.
    fn unshow(&self, shown: &str) -> String {
        // The cluster token the docs show is another run's: this cluster's
        // is the one startServers.sh keeps in its run dir.
        let token = std::fs::read_to_string(self.root.join("run").join("cluster-token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        let shown = if token.is_empty() {
            shown.to_string()
        } else {
            Regex::new(r"--cluster-token [0-9a-f]{16}\b")
                .expect("regex")
                .replace_all(shown, format!("--cluster-token {token}").as_str())
                .into_owned()
        };
        let text = shown.replace(
            &format!("{DISPLAY_ROOT}/target/release"),
            &self.bins.display().to_string(),
        );
        let text = text.replace(DISPLAY_ROOT, &self.root.display().to_string());
        self.display_port
            .replace_all(&text, |c: &Captures| {
                let port: u16 = c[2].parse().unwrap_or(0);
                let offset = if port > DISPLAY_BASE_PORT + RESP_OFFSET {
                    RESP_OFFSET
                } else if port > DISPLAY_BASE_PORT + HTTP_OFFSET {
                    HTTP_OFFSET
                } else {
                    0
                };
                let node = port - offset;
                if node > DISPLAY_BASE_PORT && node <= DISPLAY_BASE_PORT + PORTS {
                    format!(
                        "{}{}",
                        &c[1],
                        node - DISPLAY_BASE_PORT + self.base_port + offset
                    )
                } else {
                    c[0].to_string()
                }
            })
            .into_owned()
    }
}

/// A path as given and, if different, with symlinks resolved.
fn paths(path: &Path) -> Vec<String> {
    let mut all = vec![path.display().to_string()];
    if let Ok(real) = path.canonicalize()
        && real != path
    {
        all.insert(0, real.display().to_string());
    }
    all
}

/// Replaces the parts of a sample's output that differ from run to run.
struct Normaliser {
    rules: Vec<(Regex, &'static str)>,
    status_row: Regex,
    status_number: Regex,
    start_row: Regex,
    log_line: Regex,
    log_number: Regex,
    json_number: Regex,
    counted: Regex,
    moving_row: Regex,
    waited: Regex,
}

impl Normaliser {
    fn new() -> Self {
        let rules = [
            // A version: lamport@instance id.
            (r"\b\d+@[0-9a-f]{16}\b", "<version>"),
            // Log timestamps.
            (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "<time>"),
            (r"--worker-threads \d+", "--worker-threads <n>"),
            // `./startServers.sh status`.
            (r"\brunning, pid \d+", "running, pid <pid>"),
            // Member and instance ids in hex.
            (r"\b[0-9a-f]{16}\b", "<id>"),
            // Clocks and ids in decimal.
            (r"\b\d{12,}\b", "<n>"),
        ];
        Normaliser {
            rules: rules
                .into_iter()
                .map(|(re, to)| (Regex::new(re).expect("regex"), to))
                .collect(),
            status_row: Regex::new(r"^127\.0\.0\.1:\d+ +[0-9a-f]{16} +(UP|DOWN|JOINING|LEAVING) ")
                .expect("regex"),
            status_number: Regex::new(r"^[+-]?\d+(\.\d+)?(ms|s)?$").expect("regex"),
            start_row: Regex::new(r"^(\d+ +127\.0\.0\.1:\d+ +)(\d+) +").expect("regex"),
            log_line: Regex::new(r"^\d{4}-\d\d-\d\dT\S+ +(TRACE|DEBUG|INFO|WARN|ERROR) ")
                .expect("regex"),
            log_number: Regex::new(r"=\d+\b").expect("regex"),
            json_number: Regex::new(r#"^(\s*"(\w+)": )"?-?\d+(\.\d+)?([eE][-+]?\d+)?"?(,?)$"#)
                .expect("regex"),
            counted: Regex::new(r"^(acks|replicas|vnodes|writeQuorum|readQuorum)$").expect("regex"),
            moving_row: Regex::new(r"^(127\.0\.0\.1:\d+) +\d+\.\d% .*$").expect("regex"),
            waited: Regex::new(r"\(waited \d+\.\d s\)").expect("regex"),
        }
    }

    fn line(&self, line: &str) -> String {
        let mut line = line.trim_end().to_string();
        if self.status_row.is_match(&line) {
            // Every number (phi, counts, clock, skew, uptime) and the
            // padding that depends on their widths.
            // By column: the second is the member id, hex that can be made
            // of decimal digits only (then it looked like a number).
            line = line
                .split_whitespace()
                .enumerate()
                .map(|(column, w)| {
                    if column == 1 {
                        "<id>"
                    } else if self.status_number.is_match(w) {
                        "#"
                    } else {
                        w
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            // Whether a member's counts are old enough to say so depends
            // on timing (how long its conviction took, say).
            line = line
                .replace("; counts from # ago", "")
                .replace(" counts from # ago", "");
        }
        // A joining node's progress: all of it depends on timing.
        line = self
            .moving_row
            .replace(&line, "${1} <progress>")
            .into_owned();
        line = self.waited.replace(&line, "(waited <n> s)").into_owned();
        if self.log_line.is_match(&line) {
            line = self.log_number.replace_all(&line, "=<n>").into_owned();
        }
        // A pid and the padding that depends on its width.
        line = self.start_row.replace(&line, "${1}<pid> ").into_owned();
        if let Some(c) = self.json_number.captures(&line)
            && !self.counted.is_match(&c[2])
        {
            line = format!("{}<n>{}", &c[1], &c[5]);
        }
        for (re, to) in &self.rules {
            line = re.replace_all(&line, *to).into_owned();
        }
        line
    }

    fn lines(&self, lines: &[String]) -> Vec<String> {
        lines
            .iter()
            .filter(|l| !l.starts_with("cluster wait: "))
            .map(|l| self.line(l))
            .collect()
    }
}

/// The cluster's temp dir and the environment commands run in.
struct Replay {
    /// Drives the health checks' connections. Declared first so that it
    /// is dropped first, closing them: a node stopping on SIGTERM waits
    /// for its connections to close.
    runtime: tokio::runtime::Runtime,
    script: Script,
    display: Display,
    env: Vec<(String, String)>,
}

/// What a command or step printed, stdout and stderr interleaved.
fn run_to_end(mut command: Command, what: &str) -> (Option<i32>, String) {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0);
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = match finished.recv_timeout(COMMAND_DEADLINE) {
        Ok(output) => output,
        Err(_) => {
            kill_group(pid);
            panic!("{what} did not finish within {COMMAND_DEADLINE:?}");
        }
    }
    .unwrap_or_else(|e| panic!("{what}: {e}"));
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn kill_group(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stderr(Stdio::null())
        .status();
}

/// A process whose group is killed when this is dropped (a `script` whose
/// command hangs, should the test fail while it runs).
struct GroupGuard(u32);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

/// The 1-based positions (in port order) of `key`'s replicas on a ring of
/// 127.0.0.1:base+1 ..= base+5 with the default replicas and vnodes.
fn placement(base: u16, key: &str) -> Vec<usize> {
    let addresses: Vec<String> = (1..=5).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let ring = Ring::new(
        addresses.iter().map(|a| Member::new(a.clone())),
        dkvs::config::DEFAULT_VNODES,
    );
    ring.preference_list(key.as_bytes(), dkvs::config::DEFAULT_REPLICAS)
        .iter()
        .map(|m| {
            addresses
                .iter()
                .position(|a| *a == m.address)
                .expect("a member")
                + 1
        })
        .collect()
}

/// The keys whose replicas the samples name: `replicas KEY` in commands,
/// `replica KEY N` in hidden steps.
fn placed_keys(samples: &[&Sample]) -> Vec<String> {
    let in_command =
        Regex::new(r"\bDKVSClient\b[^|;&#\n]*\breplicas\s+([A-Za-z0-9_:.-]+)").expect("regex");
    let in_step = Regex::new(r"\breplica\s+([A-Za-z0-9_:.-]+)\s+\d").expect("regex");
    let mut keys = Vec::new();
    for sample in samples {
        for step in &sample.steps {
            keys.extend(
                in_command
                    .captures_iter(&step.command())
                    .map(|c| c[1].to_string()),
            );
        }
        for hidden in sample.before.values().flatten().chain(&sample.after) {
            keys.extend(in_step.captures_iter(hidden).map(|c| c[1].to_string()));
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

/// A base port below the ephemeral range whose ports are free and on whose
/// ring every key in `keys` has the replicas it has with base 7000.
fn base_port_for(keys: &[String]) -> u16 {
    let wanted: Vec<Vec<usize>> = keys
        .iter()
        .map(|k| placement(DISPLAY_BASE_PORT, k))
        .collect();
    let (low, high) = (10_000u32, 32_000u32 - u32::from(PORTS));
    let start = std::process::id() % (high - low);
    (0..high - low)
        .map(|i| (low + (start + i) % (high - low)) as u16)
        .find(|&base| {
            keys.iter()
                .zip(&wanted)
                .all(|(k, w)| placement(base, k) == *w)
                && ports_free(base, PORTS)
        })
        .unwrap_or_else(|| panic!("no free base port places {keys:?} as on 127.0.0.1:7001..7005"))
}

impl Replay {
    fn new(keys: &[String]) -> Self {
        let script = Script::rooted_in_temp_dir(base_port_for(keys));
        let bins = Script::bin_dir();
        let display = Display::new(script.root(), &bins, script.base_port);
        let nodes: Vec<String> = (1..=5)
            .map(|i| format!("127.0.0.1:{}", script.port(i)))
            .collect();
        let mut env: Vec<(String, String)> = script
            .env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let path = std::env::var("PATH").unwrap_or_default();
        env.push(("PATH".into(), format!("{}:{path}", bins.display())));
        env.push(("DKVS_NODES".into(), nodes.join(",")));
        env.push(("PWD".into(), script.root().display().to_string()));
        // Its own thread keeps the connections answering between checks.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        Replay {
            script,
            display,
            env,
            runtime,
        }
    }

    fn shell(&self, text: &str) -> Command {
        let mut command = Command::new("bash");
        command
            .arg("-c")
            .arg(text)
            .current_dir(self.script.root())
            .env_remove("DKVS_SERVER_FLAGS")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command
    }

    /// Runs a hidden step; a failure ends the test.
    fn hidden(&self, sample: &str, step: &str) {
        let text = format!("{HELPERS}\nexec 2>&1\n{}", self.display.unshow(step));
        let began = Instant::now();
        let (code, output) = run_to_end(self.shell(&text), &format!("sample {sample}: `{step}`"));
        if began.elapsed() > Duration::from_secs(1) {
            eprintln!(
                "readme: sample {sample}: `{step}` took {:.1} s",
                began.elapsed().as_secs_f64()
            );
        }
        assert_eq!(
            code,
            Some(0),
            "sample {sample}: hidden step `{step}` failed:\n{output}"
        );
    }

    /// Runs a command as a user would type it; what it printed, as the docs
    /// would show it.
    fn command(&self, sample: &Sample, step: &Step) -> Vec<String> {
        let command = self.display.unshow(&step.command());
        let raw = if sample.tty {
            self.on_terminal(&sample.name, &command, &step.typed())
        } else {
            let text = format!("exec 2>&1\n{command}");
            run_to_end(
                self.shell(&text),
                &format!("sample {}: `{command}`", sample.name),
            )
            .1
        };
        self.display.show(&raw)
    }

    /// Runs `command` on a terminal (util-linux `script`), typing each of
    /// `typed` once the command prompts (`> `).
    fn on_terminal(&self, sample: &str, command: &str, typed: &[String]) -> String {
        let mut child: Child = {
            let mut terminal = Command::new("script");
            terminal
                .args(["-qec", command, "/dev/null"])
                .current_dir(self.script.root())
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .process_group(0);
            terminal.spawn().unwrap_or_else(|e| {
                panic!("sample {sample}: cannot run `script` (util-linux): {e}")
            })
        };
        let _guard = GroupGuard(child.id());
        let seen = Arc::new(Mutex::new(Vec::<u8>::new()));
        let mut stdout = child.stdout.take().expect("stdout");
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    seen.lock().expect("lock").extend_from_slice(&buffer[..n]);
                }
            })
        };
        let mut stdin = child.stdin.take().expect("stdin");
        let mut answered_from = 0;
        for line in typed {
            let deadline = Instant::now() + COMMAND_DEADLINE;
            loop {
                {
                    let seen = seen.lock().expect("lock");
                    if seen.len() > answered_from && seen.ends_with(b"> ") {
                        answered_from = seen.len();
                        break;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "sample {sample}: `{command}` never prompted for {line:?}; it printed:\n{}",
                    String::from_utf8_lossy(&seen.lock().expect("lock"))
                );
                std::thread::sleep(Duration::from_millis(10));
            }
            stdin
                .write_all(format!("{line}\n").as_bytes())
                .expect("type a line");
            stdin.flush().expect("flush");
        }
        drop(stdin);
        let deadline = Instant::now() + COMMAND_DEADLINE;
        while !reader.is_finished() {
            assert!(
                Instant::now() < deadline,
                "sample {sample}: `{command}` did not end"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.wait();
        String::from_utf8_lossy(&seen.lock().expect("lock")).into_owned()
    }

    /// Waits until every node that runs and is not frozen answers SERVING.
    fn wait_settled(&self) {
        let Ok(entries) = std::fs::read_dir(self.script.run_dir()) else {
            return;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(port) = name
                .strip_prefix("node-")
                .and_then(|n| n.strip_suffix(".pid"))
            else {
                continue;
            };
            let Some(pid) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
            else {
                continue;
            };
            let address = format!("127.0.0.1:{port}");
            let deadline = Instant::now() + SERVING_DEADLINE;
            while runs(pid) && !self.runtime.block_on(common::health_serving(&address)) {
                assert!(
                    Instant::now() < deadline,
                    "node {address} (pid {pid}) not SERVING after {SERVING_DEADLINE:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// The process exists and is neither frozen (SIGSTOP) nor a zombie.
fn runs(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit(") ")
        .next()
        .and_then(|rest| rest.chars().next());
    matches!(state, Some(s) if !matches!(s, 'T' | 't' | 'Z' | 'X'))
}

/// Whether `program` is on PATH.
fn installed(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            let candidate = dir.join(program);
            candidate.is_file()
                && std::fs::metadata(&candidate).is_ok_and(|m| {
                    std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
        })
    })
}

/// A line diff of `expected` (the file) and `actual` (this run), both
/// normalised: `-` the file only, `+` this run only.
fn diff(expected: &[String], actual: &[String]) -> String {
    let (n, m) = (expected.len(), actual.len());
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if expected[i] == actual[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < n || j < m {
        if i < n && j < m && expected[i] == actual[j] {
            out.push_str(&format!("      {}\n", expected[i]));
            i += 1;
            j += 1;
        } else if i < n && (j == m || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("    - {}\n", expected[i]));
            i += 1;
        } else {
            out.push_str(&format!("    + {}\n", actual[j]));
            j += 1;
        }
    }
    out
}

/// The files whose console samples are replayed, in the order they are
/// replayed (the cluster's state carries over from one to the next: the
/// first sample starts it, and the user guide runs before a node joins, so
/// that `mykey` keeps its replicas), each with how many samples it holds.
/// Moving a sample moves a count; removing one must be said here.
const SAMPLE_FILES: &[(&str, usize)] = &[
    ("README.md", 5),
    ("docs/USER-GUIDE.md", 6),
    ("docs/OPERATIONS.md", 10),
];

/// A file of [`SAMPLE_FILES`], read and parsed.
struct SampleFile {
    /// As named in [`SAMPLE_FILES`], relative to the repository.
    name: &'static str,
    path: PathBuf,
    text: String,
    lines: Vec<String>,
    samples: Vec<Sample>,
}

/// The repository's root.
fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Reads and parses every file of [`SAMPLE_FILES`], checking its count,
/// that sample names are unique, and that no other doc holds a sample.
fn sample_files() -> Vec<SampleFile> {
    let files: Vec<SampleFile> = SAMPLE_FILES
        .iter()
        .map(|&(name, count)| {
            let path = repo_root().join(name);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            let samples = parse(name, &lines);
            assert_eq!(
                samples.len(),
                count,
                "{name} holds {} marked sample(s), SAMPLE_FILES in tests/readme.rs says {count}: \
                 a sample that moved must still be replayed, and a removed one must be said there",
                samples.len()
            );
            SampleFile {
                name,
                path,
                text,
                lines,
                samples,
            }
        })
        .collect();
    let mut names: Vec<&str> = files
        .iter()
        .flat_map(|f| f.samples.iter().map(|s| s.name.as_str()))
        .collect();
    names.sort_unstable();
    for pair in names.windows(2) {
        assert_ne!(pair[0], pair[1], "two samples are named {}", pair[0]);
    }
    for doc in markdown_files() {
        let name = doc
            .strip_prefix(repo_root())
            .unwrap_or(&doc)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&doc).unwrap_or_default();
        let marked = text.lines().any(|l| l.trim().starts_with("<!-- sample:"));
        assert!(
            !marked || SAMPLE_FILES.iter().any(|&(f, _)| f == name),
            "{name} has a marked sample but is not in SAMPLE_FILES (tests/readme.rs), so it would not be replayed"
        );
    }
    files
}

/// README.md and every `docs/*.md`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![repo_root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo_root().join("docs"))
        .expect("read docs/")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

#[test]
fn readme_samples_match_what_the_commands_print() {
    let began = Instant::now();
    let regenerate = std::env::var_os("DKVS_README_REGEN").is_some_and(|v| v == "1");
    let mut files = sample_files();
    let all: Vec<&Sample> = files.iter().flat_map(|f| &f.samples).collect();
    let keys = placed_keys(&all);
    let replay = Replay::new(&keys);
    eprintln!(
        "readme: cluster on 127.0.0.1:{}.. (shown as 7001..), where {keys:?} have the replicas they have on 7001..7005",
        replay.script.base_port + 1
    );
    let normaliser = Normaliser::new();
    let mut mismatches = Vec::new();
    let mut skipped = Vec::new();
    // Per file, per sample: the block's new lines, or None to keep it.
    let mut rewritten: Vec<Vec<Option<Vec<String>>>> = Vec::new();
    for file in &files {
        let mut blocks = Vec::new();
        let mut replayed = 0;
        for sample in &file.samples {
            let missing: Vec<&str> = sample
                .needs
                .iter()
                .filter(|p| !installed(p))
                .map(|s| s.as_str())
                .collect();
            if !missing.is_empty() {
                eprintln!(
                    "readme: {} sample {} skipped: {} not installed",
                    file.name,
                    sample.name,
                    missing.join(", ")
                );
                skipped.push(format!("{} {}", file.name, sample.name));
                blocks.push(None);
                continue;
            }
            let started = Instant::now();
            let mut block = Vec::new();
            for (n, step) in sample.steps.iter().enumerate() {
                for hidden in sample.before.get(&(n + 1)).into_iter().flatten() {
                    replay.hidden(&sample.name, hidden);
                }
                replay.wait_settled();
                let printed = replay.command(sample, step);
                let (expected, actual) =
                    (normaliser.lines(&step.output), normaliser.lines(&printed));
                if expected != actual {
                    mismatches.push(format!(
                        "{} line {}, sample {}, command {}: {}\n  (normalised; - {}, + this run)\n{}",
                        file.name,
                        step.at,
                        sample.name,
                        n + 1,
                        step.command(),
                        file.name,
                        diff(&expected, &actual)
                    ));
                }
                block.extend(step.lines.iter().cloned());
                block.extend(printed);
                block.extend(step.separator.iter().cloned());
            }
            for hidden in &sample.after {
                replay.hidden(&sample.name, hidden);
            }
            replay.wait_settled();
            eprintln!(
                "readme: {} sample {} replayed in {:.1} s",
                file.name,
                sample.name,
                started.elapsed().as_secs_f64()
            );
            replayed += 1;
            blocks.push(Some(block));
        }
        eprintln!(
            "readme: {}: {replayed} of {} sample(s) replayed",
            file.name,
            file.samples.len()
        );
        rewritten.push(blocks);
    }
    let total: usize = files.iter().map(|f| f.samples.len()).sum();

    if regenerate {
        for (file, blocks) in files.iter_mut().zip(rewritten) {
            for (sample, block) in file.samples.iter().zip(blocks).rev() {
                if let Some(block) = block {
                    file.lines.splice(sample.open + 1..sample.close, block);
                }
            }
            let mut text = file.lines.join("\n");
            text.push('\n');
            if text != file.text {
                std::fs::write(&file.path, text)
                    .unwrap_or_else(|e| panic!("write {}: {e}", file.path.display()));
            }
        }
        eprintln!(
            "readme: rewrote {} sample(s) of {} in {:.1} s ({} changed beyond volatile parts){}",
            total - skipped.len(),
            files.iter().map(|f| f.name).collect::<Vec<_>>().join(", "),
            began.elapsed().as_secs_f64(),
            mismatches.len(),
            if skipped.is_empty() {
                String::new()
            } else {
                format!("; kept as they were: {}", skipped.join(", "))
            }
        );
        return;
    }
    eprintln!(
        "readme: {} of {total} sample(s) replayed in {:.1} s",
        total - skipped.len(),
        began.elapsed().as_secs_f64()
    );
    assert!(
        mismatches.is_empty(),
        "the docs no longer match what their commands print:\n\n{}\n\
         If the new output is right, regenerate the samples with docs/regen-readme.sh \
         and review the diff (git diff README.md docs/).",
        mismatches.join("\n")
    );
}

/// Every relative link in README.md and docs/*.md (`[text](target)`)
/// names a file that exists and, with `#anchor`, a heading in it (as
/// GitHub spells heading anchors); and no doc names a tracker number.
#[test]
fn links_resolve() {
    let link = Regex::new(r"\]\(([^)\s]+)\)").expect("regex");
    let tracker = Regex::new(r"(?i)\b(issue|ticket)s?\s+#?\d+").expect("regex");
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in markdown_files() {
        let name = file
            .strip_prefix(repo_root())
            .unwrap_or(&file)
            .display()
            .to_string();
        let text = std::fs::read_to_string(&file).expect("read a doc");
        for (n, line) in prose_lines(&text) {
            if let Some(m) = tracker.find(line) {
                broken.push(format!(
                    "{name} line {n}: a tracker number: {:?}",
                    m.as_str()
                ));
            }
            for c in link.captures_iter(line) {
                let target = &c[1];
                if target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((path, anchor)) => (path, Some(anchor)),
                    None => (target, None),
                };
                let resolved = if path.is_empty() {
                    file.clone()
                } else {
                    file.parent().expect("a dir").join(path)
                };
                if !resolved.exists() {
                    broken.push(format!("{name} line {n}: {target}: no such file"));
                    continue;
                }
                if let Some(anchor) = anchor
                    && resolved.extension().is_some_and(|x| x == "md")
                {
                    let target_text = std::fs::read_to_string(&resolved).unwrap_or_default();
                    if !anchors(&target_text).iter().any(|a| a == anchor) {
                        broken.push(format!("{name} line {n}: {target}: no such heading"));
                    }
                }
            }
        }
    }
    eprintln!("readme: {checked} relative link(s) checked");
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// A markdown file's lines outside fenced blocks, with their numbers.
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            lines.push((i + 1, line));
        }
    }
    lines
}

/// The anchors of a markdown file's headings, as GitHub makes them:
/// lower case, punctuation dropped, spaces as `-`, `-1`, `-2`... for
/// repeats.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = Vec::new();
    for (_, line) in prose_lines(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#');
        if !heading.starts_with(' ') {
            continue;
        }
        let slug: String = heading
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        all.push(if *count == 0 {
            slug.clone()
        } else {
            format!("{slug}-{count}")
        });
        *count += 1;
    }
    all
}

#[test]
fn anchors_are_spelled_as_github_spells_them() {
    let text = "# DKVS\n## What a change guarantees, and how\n```\n# not a heading\n```\n\
                ## `DKVSServer` — flags\n## Tests\n## Tests\n";
    assert_eq!(
        anchors(text),
        [
            "dkvs",
            "what-a-change-guarantees-and-how",
            "dkvsserver--flags",
            "tests",
            "tests-1"
        ]
    );
}

/// A status row normalises the same whatever its member id looks like: hex
/// made only of decimal digits once read as a number, and the replay of a
/// README sample failed by chance.
#[test]
fn status_rows_normalise_by_column_whatever_the_member_id() {
    let normaliser = Normaliser::new();
    let row = |id: &str| {
        normaliser.line(&format!(
            "127.0.0.1:7003  {id}  UP    0.4   12  3  117742047113183232  +1ms  5s"
        ))
    };
    let letters = row("8d6e13c84c9ef292");
    assert_eq!(row("1234567890123456"), letters);
    assert_eq!(row("0000000000000001"), letters);
    assert!(letters.contains("<id>"), "{letters}");
}
