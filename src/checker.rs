//! A history checker: did the cluster keep its promises to its clients?
//!
//! A Jepsen-style test runs concurrent clients against the cluster while
//! nodes die and stall, records every operation (its client, key, start and
//! end time, and what it returned), and judges the history afterwards. This
//! module is that judge: a pure function from a history to a [`Report`], so
//! the fault-injection test and a `DKVSClient check` command share it.
//!
//! **Values are identities.** Every PUT in a history writes a value nobody
//! else writes to that key, so a read names the write it observed without
//! trusting the store's versions. A DELETE writes no value; a read that finds
//! nothing is matched to a delete by the tombstone's version when the read
//! reports one (the acknowledged delete with that version, or else any
//! indeterminate delete), and otherwise to *any* delete that began before the
//! read ended, or to the key's initial, empty state. Where a read has several
//! explanations the checker takes the most favourable one: it only reports
//! what no explanation excuses.
//!
//! **A write that failed may still take effect, at any later time** (a
//! paused coordinator can wake up and finish it long after the client gave
//! up). An indeterminate write therefore never *completes*: it is treated as
//! ending at infinity. Only acknowledged writes complete, at their end.
//!
//! The definitions, for ops on one key (`a < b` on ticks is strict, so ops
//! with equal times overlap and are never ordered):
//!
//! * **Invented read**: a read returns a value no PUT to its key wrote, a
//!   value whose PUT is known to have failed, a value whose PUT began only
//!   after the read ended, or a tombstone version no DELETE could carry.
//! * **Version mismatch**: a read returns a write's value (or tombstone) with
//!   a version other than the one the write was acknowledged with; a version
//!   two acknowledged writes got; an unacknowledged write's value at two
//!   versions; or "not found" at a PUT's version. Each means one write
//!   was stored twice, or two writes as one.
//! * **Stale read**: a read `r` that returns write `w` is stale if some
//!   acknowledged write `w2` began after `w` completed and completed before
//!   `r` began (`w.end < w2.start`, `w2.end < r.start`). A read that finds
//!   nothing is stale when an acknowledged write completed before it began
//!   and every delete that began before the read ended had completed before
//!   that write began. When versions are known, DKVS promises more (newest
//!   version wins): a read that returns a version below that of a write
//!   acknowledged before it began is stale too.
//! * **Lost write**: a stale read that began after every write to its key
//!   had ended: on a quiet key nothing can excuse it, so an acknowledged
//!   write is gone. A test reads every key once the cluster has healed to
//!   look for these.
//! * **Non-monotonic read**: reads `r1` and `r2` with `r1.end < r2.start`
//!   (any clients: DKVS promises that reads never go back) where `r2`
//!   returns something older than `r1` did. Older in real time: `r1`
//!   returned write `w1` and `r2` an acknowledged write `w2` with
//!   `w2.end < w1.start`, or `r2` found nothing and every delete that began
//!   before `r2` ended had completed before `w1` began. Older in versions:
//!   both versions known and `r2`'s is lower. Writes that overlap are never
//!   ordered by time, so either order of concurrent writes passes.
//!
//! Each check is a binary search over running maxima, per key: ordering the
//! acknowledged writes by end and keeping the latest start (and highest
//! version) seen so far answers "which write completed before this read
//! began and is newest?" in `O(log n)`, so a history of `n` ops costs
//! `O(n log n)`.
//!
//! It is one file (past the house limit of about 600 lines)
//! because it is one concept: the history types, the definitions above and
//! the per-key index they all share are read together, and each definition
//! is pinned by a small hand-written history in the tests below.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::clock::Version;

/// A point in time: any monotonic count (the nemesis test uses microseconds
/// since its start). Only the order of ticks matters.
pub type Tick = u64;

/// The effective end of a write that may take effect at any later time.
const NEVER: Tick = Tick::MAX;

/// One recorded operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    /// The client that issued it (named in descriptions only).
    pub client: usize,
    /// The key it touched.
    pub key: String,
    /// When the client sent it.
    pub start: Tick,
    /// When the client had its answer, or gave up.
    pub end: Tick,
    /// What it was and how it ended.
    pub action: Action,
}

/// An operation and its outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// A PUT of a value no other PUT to this key writes.
    Put {
        /// The value written.
        value: Vec<u8>,
        /// How the write ended.
        outcome: WriteOutcome,
    },
    /// A DELETE (a write of "no value").
    Delete {
        /// How the write ended.
        outcome: WriteOutcome,
    },
    /// A GET.
    Get {
        /// What it returned.
        outcome: ReadOutcome,
    },
}

/// How a PUT or DELETE ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Acknowledged with this version.
    Acked(Version),
    /// Failed in a way that may have taken effect (a timeout, a lost
    /// connection, too few acks): it may become visible at any later time.
    Indeterminate,
    /// Known never to have taken effect (refused before any replica got it).
    Failed,
}

/// What a GET returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// A value, with its version when the reader learns it.
    Found {
        /// The value read.
        value: Vec<u8>,
        /// Its version, if known.
        version: Option<Version>,
    },
    /// Nothing: never written, or deleted (then `version` is the tombstone's,
    /// if known).
    NotFound {
        /// The tombstone's version, if there is one and it is known.
        version: Option<Version>,
    },
    /// The read failed; it says nothing about the data.
    Failed,
}

impl Op {
    /// A PUT of `value` to `key`.
    pub fn put(
        client: usize,
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        start: Tick,
        end: Tick,
        outcome: WriteOutcome,
    ) -> Self {
        let value = value.into();
        let action = Action::Put { value, outcome };
        Self::new(client, key, start, end, action)
    }

    /// A DELETE of `key`.
    pub fn delete(
        client: usize,
        key: impl Into<String>,
        start: Tick,
        end: Tick,
        outcome: WriteOutcome,
    ) -> Self {
        Self::new(client, key, start, end, Action::Delete { outcome })
    }

    /// A GET of `key`.
    pub fn get(
        client: usize,
        key: impl Into<String>,
        start: Tick,
        end: Tick,
        outcome: ReadOutcome,
    ) -> Self {
        Self::new(client, key, start, end, Action::Get { outcome })
    }

    fn new(client: usize, key: impl Into<String>, start: Tick, end: Tick, action: Action) -> Self {
        Self {
            client,
            key: key.into(),
            start,
            end,
            action,
        }
    }

    /// The outcome of a write; `None` for a GET.
    fn write_outcome(&self) -> Option<WriteOutcome> {
        match &self.action {
            Action::Put { outcome, .. } | Action::Delete { outcome } => Some(*outcome),
            Action::Get { .. } => None,
        }
    }

    /// The version an acknowledged write got.
    fn acked_version(&self) -> Option<Version> {
        match self.write_outcome() {
            Some(WriteOutcome::Acked(version)) => Some(version),
            _ => None,
        }
    }

    /// When a write completed: its end if acknowledged, never otherwise.
    fn effective_end(&self) -> Tick {
        match self.write_outcome() {
            Some(WriteOutcome::Acked(_)) => self.end,
            _ => NEVER,
        }
    }

    /// The version a successful GET returned, if it says.
    fn read_version(&self) -> Option<Version> {
        match &self.action {
            Action::Get {
                outcome: ReadOutcome::Found { version, .. } | ReadOutcome::NotFound { version },
            } => *version,
            _ => None,
        }
    }
}

/// The kinds of broken promise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViolationKind {
    /// A read missed a write acknowledged before it began.
    Stale,
    /// A read on a quiet key missed an acknowledged write: the write is lost.
    LostWrite,
    /// A read returned something older than an earlier read did.
    NonMonotonic,
    /// A read returned something no write could have produced.
    Invented,
    /// A value appeared with a version its write did not get.
    VersionMismatch,
    /// The history breaks the checker's assumptions (a value written twice,
    /// an op that ends before it starts): a bug in the workload.
    Malformed,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::Stale => "stale read",
            ViolationKind::LostWrite => "lost write",
            ViolationKind::NonMonotonic => "non-monotonic read",
            ViolationKind::Invented => "invented read",
            ViolationKind::VersionMismatch => "version mismatch",
            ViolationKind::Malformed => "malformed history",
        })
    }
}

/// One broken promise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// What kind.
    pub kind: ViolationKind,
    /// The ops involved, as indices into the history; the offending read first.
    pub ops: Vec<usize>,
    /// What happened, naming the ops.
    pub description: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.description)
    }
}

/// The verdict on a history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Operations in the history.
    pub ops: usize,
    /// Acknowledged writes and answered reads.
    pub ok: usize,
    /// Failed reads and writes known not to have taken effect.
    pub failed: usize,
    /// Writes that failed but may have taken effect.
    pub indeterminate: usize,
    /// Every broken promise found, key by key.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Whether the history keeps every promise.
    pub fn is_valid(&self) -> bool {
        self.violations.is_empty()
    }

    /// Successful operations over all operations (indeterminate writes count
    /// as failures); 1 for an empty history.
    pub fn availability(&self) -> f64 {
        if self.ops == 0 {
            1.0
        } else {
            self.ok as f64 / self.ops as f64
        }
    }

    /// How many violations of `kind` were found.
    pub fn count(&self, kind: ViolationKind) -> usize {
        self.violations.iter().filter(|v| v.kind == kind).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ops: {} ok, {} failed, {} indeterminate ({:.2}% available); {} violations",
            self.ops,
            self.ok,
            self.failed,
            self.indeterminate,
            self.availability() * 100.0,
            self.violations.len()
        )
    }
}

/// Checks a history (ops in any order; each is named by its index).
pub fn check(history: &[Op]) -> Report {
    let mut report = Report {
        ops: history.len(),
        ..Report::default()
    };
    let mut by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, op) in history.iter().enumerate() {
        match &op.action {
            Action::Put { outcome, .. } | Action::Delete { outcome } => match outcome {
                WriteOutcome::Acked(_) => report.ok += 1,
                WriteOutcome::Indeterminate => report.indeterminate += 1,
                WriteOutcome::Failed => report.failed += 1,
            },
            Action::Get {
                outcome: ReadOutcome::Failed,
            } => report.failed += 1,
            Action::Get { .. } => report.ok += 1,
        }
        if op.end < op.start {
            report.violations.push(Violation {
                kind: ViolationKind::Malformed,
                ops: vec![i],
                description: format!("{} ends before it starts", describe(history, i)),
            });
        }
        by_key.entry(op.key.as_str()).or_default().push(i);
    }
    for ops in by_key.values() {
        let mut key = KeyChecker::new(history, ops, &mut report.violations);
        key.check(ops);
        report.violations.append(&mut key.violations);
    }
    report
}

/// What a read observed, as far as the history tells.
#[derive(Clone, Copy, Debug)]
enum Seen {
    /// This write (a PUT by value, or a DELETE by its tombstone's version).
    Write(usize),
    /// Nothing: the initial state or some delete.
    Nothing,
}

/// An acknowledged write, in order of end, with running maxima up to it.
struct Completed {
    /// When it completed.
    end: Tick,
    /// The latest start among writes completed so far, and that write.
    latest_start: (Tick, usize),
    /// The highest version among writes completed so far, and that write.
    highest_version: (Version, usize),
}

/// A delete that may have taken effect, in order of start, with a running
/// maximum up to it.
struct Begun {
    /// When it began.
    start: Tick,
    /// The latest effective end among deletes begun so far, and that delete.
    latest_end: (Tick, usize),
}

/// A successful read, in order of end, with running maxima up to it.
struct EarlierRead {
    /// When it ended.
    end: Tick,
    /// The latest start of a write returned by reads so far: (start, read, write).
    latest_write: Option<(Tick, usize, usize)>,
    /// The highest version returned by reads so far, and that read.
    highest_version: Option<(Version, usize)>,
}

/// The acknowledged writes `acked`, ordered by end, each with the running
/// maxima up to it.
fn completed_by_end(history: &[Op], mut acked: Vec<usize>) -> Vec<Completed> {
    acked.sort_by_key(|&i| history[i].end);
    let mut completed: Vec<Completed> = Vec::with_capacity(acked.len());
    for i in acked {
        let op = &history[i];
        let version = op.acked_version().unwrap_or_default();
        let (latest_start, highest_version) = match completed.last() {
            Some(last) => (
                last.latest_start.max((op.start, i)),
                last.highest_version.max((version, i)),
            ),
            None => ((op.start, i), (version, i)),
        };
        completed.push(Completed {
            end: op.end,
            latest_start,
            highest_version,
        });
    }
    completed
}

/// The deletes that may have taken effect, ordered by start, each with the
/// latest effective end up to it.
fn begun_by_start(history: &[Op], mut deletes: Vec<usize>) -> Vec<Begun> {
    deletes.sort_by_key(|&i| history[i].start);
    let mut begun: Vec<Begun> = Vec::with_capacity(deletes.len());
    for i in deletes {
        let op = &history[i];
        let mine = (op.effective_end(), i);
        let latest_end = begun.last().map_or(mine, |last| last.latest_end.max(mine));
        begun.push(Begun {
            start: op.start,
            latest_end,
        });
    }
    begun
}

/// The checks for one key.
struct KeyChecker<'a> {
    /// The whole history; ops are named by their index in it.
    history: &'a [Op],
    /// This key's PUTs by value.
    put_of_value: HashMap<&'a [u8], usize>,
    /// This key's acknowledged writes by version.
    write_of_version: HashMap<Version, usize>,
    /// Acknowledged writes ordered by end.
    completed: Vec<Completed>,
    /// Deletes that may have taken effect, ordered by start.
    deletes: Vec<Begun>,
    /// When the key's last write ended (any outcome): reads after it see a
    /// quiet key.
    quiet_after: Option<Tick>,
    /// The version each unacknowledged PUT was first read at, and that read.
    seen_at: HashMap<usize, (Version, usize)>,
    /// What this key breaks.
    violations: Vec<Violation>,
}

impl<'a> KeyChecker<'a> {
    fn new(history: &'a [Op], ops: &[usize], violations: &mut Vec<Violation>) -> Self {
        let mut put_of_value = HashMap::new();
        let mut write_of_version: HashMap<Version, usize> = HashMap::new();
        let mut acked = Vec::new();
        let mut deletes = Vec::new();
        let mut quiet_after = None;
        for &i in ops {
            let op = &history[i];
            let Some(outcome) = op.write_outcome() else {
                continue;
            };
            quiet_after = quiet_after.max(Some(op.end));
            if let Action::Put { value, .. } = &op.action
                && let Some(first) = put_of_value.insert(value.as_slice(), i)
            {
                violations.push(Violation {
                    kind: ViolationKind::Malformed,
                    ops: vec![i, first],
                    description: format!(
                        "{} and {} write the same value; the checker needs unique values",
                        describe(history, first),
                        describe(history, i)
                    ),
                });
            }
            if let WriteOutcome::Acked(version) = outcome {
                acked.push(i);
                if let Some(first) = write_of_version.insert(version, i) {
                    violations.push(Violation {
                        kind: ViolationKind::VersionMismatch,
                        ops: vec![i, first],
                        description: format!(
                            "{} and {} were acknowledged with the same version",
                            describe(history, first),
                            describe(history, i)
                        ),
                    });
                }
            }
            if matches!(op.action, Action::Delete { .. }) && outcome != WriteOutcome::Failed {
                deletes.push(i);
            }
        }
        let completed = completed_by_end(history, acked);
        let begun = begun_by_start(history, deletes);
        Self {
            history,
            put_of_value,
            write_of_version,
            completed,
            deletes: begun,
            quiet_after,
            seen_at: HashMap::new(),
            violations: Vec::new(),
        }
    }

    fn check(&mut self, ops: &[usize]) {
        let mut reads = Vec::new();
        for &i in ops {
            if let Action::Get { outcome } = &self.history[i].action
                && *outcome != ReadOutcome::Failed
                && let Some(seen) = self.resolve(i)
            {
                self.check_fresh(i, seen);
                reads.push((i, seen));
            }
        }
        self.check_monotonic(reads);
    }

    /// Names what read `r` observed; `None` (after recording why) when no
    /// write explains it.
    fn resolve(&mut self, r: usize) -> Option<Seen> {
        let Action::Get { outcome } = &self.history[r].action else {
            return None;
        };
        match outcome {
            ReadOutcome::Failed => None,
            ReadOutcome::Found { value, version } => self.resolve_value(r, value, *version),
            ReadOutcome::NotFound { version: None } => Some(Seen::Nothing),
            ReadOutcome::NotFound {
                version: Some(version),
            } => self.resolve_tombstone(r, *version),
        }
    }

    /// Names the PUT whose `value` read `r` returned (at `version`, if
    /// the read reported one).
    fn resolve_value(&mut self, r: usize, value: &[u8], version: Option<Version>) -> Option<Seen> {
        let history = self.history;
        let read = &history[r];
        let Some(&w) = self.put_of_value.get(value) else {
            self.flag(
                ViolationKind::Invented,
                vec![r],
                format!(
                    "{} returned a value no PUT to its key wrote",
                    describe(history, r)
                ),
            );
            return None;
        };
        let write = &history[w];
        if write.write_outcome() == Some(WriteOutcome::Failed) {
            self.flag(
                ViolationKind::Invented,
                vec![r, w],
                format!(
                    "{} returned the value of {}, which never took effect",
                    describe(history, r),
                    describe(history, w)
                ),
            );
            return None;
        }
        if write.start > read.end {
            self.flag(
                ViolationKind::Invented,
                vec![r, w],
                format!(
                    "{} returned the value of {}, which began after the read ended",
                    describe(history, r),
                    describe(history, w)
                ),
            );
            return None;
        }
        if let Some(version) = version {
            self.check_version(r, w, version);
        }
        Some(Seen::Write(w))
    }

    /// Names the DELETE whose tombstone read `r` returned at `version`.
    fn resolve_tombstone(&mut self, r: usize, version: Version) -> Option<Seen> {
        let history = self.history;
        let read = &history[r];
        match self.write_of_version.get(&version).copied() {
            Some(w) if matches!(history[w].action, Action::Put { .. }) => {
                self.flag(
                    ViolationKind::VersionMismatch,
                    vec![r, w],
                    format!(
                        "{} returned a tombstone at the version {} was acknowledged with",
                        describe(history, r),
                        describe(history, w)
                    ),
                );
                None
            }
            Some(w) if history[w].start > read.end => {
                self.flag(
                    ViolationKind::Invented,
                    vec![r, w],
                    format!(
                        "{} returned the tombstone of {}, which began after the read ended",
                        describe(history, r),
                        describe(history, w)
                    ),
                );
                None
            }
            Some(w) => Some(Seen::Write(w)),
            // Some indeterminate delete begun in time may carry it.
            None if self
                .latest_delete_begun_before(read.end)
                .is_some_and(|(end, _)| end == NEVER) =>
            {
                Some(Seen::Nothing)
            }
            None => {
                self.flag(
                    ViolationKind::Invented,
                    vec![r],
                    format!(
                        "{} returned a tombstone no DELETE could have written",
                        describe(history, r)
                    ),
                );
                None
            }
        }
    }

    /// Read `r` returned PUT `w`'s value at `version`.
    fn check_version(&mut self, r: usize, w: usize, version: Version) {
        let history = self.history;
        if let Some(acked) = history[w].acked_version() {
            if acked != version {
                self.flag(
                    ViolationKind::VersionMismatch,
                    vec![r, w],
                    format!(
                        "{} returned the value of {} at another version: written twice",
                        describe(history, r),
                        describe(history, w)
                    ),
                );
            }
            return;
        }
        if let Some(&other) = self.write_of_version.get(&version) {
            self.flag(
                ViolationKind::VersionMismatch,
                vec![r, w, other],
                format!(
                    "{} returned the value of {} at the version {} was acknowledged with",
                    describe(history, r),
                    describe(history, w),
                    describe(history, other)
                ),
            );
            return;
        }
        match self.seen_at.get(&w).copied() {
            None => {
                self.seen_at.insert(w, (version, r));
            }
            Some((first, _)) if first == version => {}
            Some((_, earlier)) => self.flag(
                ViolationKind::VersionMismatch,
                vec![r, earlier, w],
                format!(
                    "{} and {} returned the value of {} at different versions: written twice",
                    describe(history, earlier),
                    describe(history, r),
                    describe(history, w)
                ),
            ),
        }
    }

    /// Stale reads and lost writes.
    fn check_fresh(&mut self, r: usize, seen: Seen) {
        let history = self.history;
        let read = &history[r];
        let Some(before) = self.completed_before(read.start) else {
            return;
        };
        let kind = if self.quiet_after.is_some_and(|quiet| quiet < read.start) {
            ViolationKind::LostWrite
        } else {
            ViolationKind::Stale
        };
        let (latest_start, newer) = before.latest_start;
        let (highest, highest_write) = before.highest_version;
        match seen {
            Seen::Write(w) if history[w].effective_end() < latest_start => {
                let description = format!(
                    "{} returned {}, but {} began after it completed and was acknowledged before the read began",
                    describe(history, r),
                    describe(history, w),
                    describe(history, newer)
                );
                self.flag(kind, vec![r, w, newer], description);
            }
            Seen::Nothing
                if self
                    .latest_delete_begun_before(read.end)
                    .is_none_or(|(end, _)| end < latest_start) =>
            {
                let description = format!(
                    "{} found nothing, but {} was acknowledged before the read began and no DELETE explains it",
                    describe(history, r),
                    describe(history, newer)
                );
                self.flag(kind, vec![r, newer], description);
            }
            _ => {
                if read.read_version().is_some_and(|version| version < highest) {
                    let description = format!(
                        "{} returned an older version than {}, acknowledged before the read began",
                        describe(history, r),
                        describe(history, highest_write)
                    );
                    self.flag(kind, vec![r, highest_write], description);
                }
            }
        }
    }

    /// Reads never go back.
    fn check_monotonic(&mut self, mut reads: Vec<(usize, Seen)>) {
        let history = self.history;
        reads.sort_by_key(|&(r, _)| history[r].end);
        let mut earlier: Vec<EarlierRead> = Vec::with_capacity(reads.len());
        for &(r, seen) in &reads {
            let read = &history[r];
            let mine = match seen {
                Seen::Write(w) => Some((history[w].start, r, w)),
                Seen::Nothing => None,
            };
            let version = read.read_version().map(|v| (v, r));
            let (latest_write, highest_version) = match earlier.last() {
                Some(last) => (
                    last.latest_write.max(mine),
                    last.highest_version.max(version),
                ),
                None => (mine, version),
            };
            earlier.push(EarlierRead {
                end: read.end,
                latest_write,
                highest_version,
            });
        }
        for &(r2, seen) in &reads {
            let read = &history[r2];
            let before = earlier.partition_point(|e| e.end < read.start);
            let Some(before) = before.checked_sub(1).map(|b| &earlier[b]) else {
                continue;
            };
            if let Some((w1_start, r1, w1)) = before.latest_write {
                let older = match seen {
                    Seen::Write(w2) => history[w2].effective_end() < w1_start,
                    Seen::Nothing => self
                        .latest_delete_begun_before(read.end)
                        .is_none_or(|(end, _)| end < w1_start),
                };
                if older {
                    let what = match seen {
                        Seen::Write(w2) => format!("returned {}", describe(history, w2)),
                        Seen::Nothing => "found nothing".to_string(),
                    };
                    let description = format!(
                        "{} {what}, older than {} that {} returned before it began",
                        describe(history, r2),
                        describe(history, w1),
                        describe(history, r1)
                    );
                    self.flag(ViolationKind::NonMonotonic, vec![r2, r1, w1], description);
                    continue;
                }
            }
            if let (Some(version), Some((highest, r1))) =
                (read.read_version(), before.highest_version)
                && version < highest
            {
                let description = format!(
                    "{} returned an older version than {} did before it began",
                    describe(history, r2),
                    describe(history, r1)
                );
                self.flag(ViolationKind::NonMonotonic, vec![r2, r1], description);
            }
        }
    }

    /// The acknowledged writes that completed before `t`, summarised.
    fn completed_before(&self, t: Tick) -> Option<&Completed> {
        let count = self.completed.partition_point(|c| c.end < t);
        count.checked_sub(1).map(|last| &self.completed[last])
    }

    /// Of the deletes begun before `t`, the latest effective end and that delete.
    fn latest_delete_begun_before(&self, t: Tick) -> Option<(Tick, usize)> {
        let count = self.deletes.partition_point(|d| d.start < t);
        count
            .checked_sub(1)
            .map(|last| self.deletes[last].latest_end)
    }

    fn flag(&mut self, kind: ViolationKind, ops: Vec<usize>, description: String) {
        self.violations.push(Violation {
            kind,
            ops,
            description,
        });
    }
}

/// One op, for a person: `#12 (client 3, 100..250: PUT k="v" acked at 5@…)`.
pub fn describe(history: &[Op], i: usize) -> String {
    let op = &history[i];
    let written = |outcome: &WriteOutcome| match outcome {
        WriteOutcome::Acked(version) => format!("acked at {version}"),
        WriteOutcome::Indeterminate => "indeterminate".to_string(),
        WriteOutcome::Failed => "failed".to_string(),
    };
    let at = |version: &Option<Version>| version.map_or(String::new(), |v| format!(" at {v}"));
    let what = match &op.action {
        Action::Put { value, outcome } => {
            format!("PUT {}={} {}", op.key, show(value), written(outcome))
        }
        Action::Delete { outcome } => format!("DELETE {} {}", op.key, written(outcome)),
        Action::Get { outcome } => match outcome {
            ReadOutcome::Found { value, version } => {
                format!("GET {} -> {}{}", op.key, show(value), at(version))
            }
            ReadOutcome::NotFound { version: None } => format!("GET {} -> not found", op.key),
            ReadOutcome::NotFound { version } => {
                format!("GET {} -> tombstone{}", op.key, at(version))
            }
            ReadOutcome::Failed => format!("GET {} failed", op.key),
        },
    };
    format!(
        "#{i} (client {}, {}..{}: {what})",
        op.client, op.start, op.end
    )
}

/// A value for a person: quoted, lossy UTF-8, cut at 40 characters.
fn show(value: &[u8]) -> String {
    let text = String::from_utf8_lossy(value);
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(lamport: u64) -> Version {
        Version::new(lamport, 1)
    }

    fn put(value: &str, start: Tick, end: Tick, lamport: u64) -> Op {
        Op::put(0, "k", value, start, end, WriteOutcome::Acked(v(lamport)))
    }

    fn put_unknown(value: &str, start: Tick, end: Tick) -> Op {
        Op::put(0, "k", value, start, end, WriteOutcome::Indeterminate)
    }

    fn delete(start: Tick, end: Tick, lamport: u64) -> Op {
        Op::delete(0, "k", start, end, WriteOutcome::Acked(v(lamport)))
    }

    fn get(value: &str, lamport: Option<u64>, start: Tick, end: Tick) -> Op {
        let outcome = ReadOutcome::Found {
            value: value.into(),
            version: lamport.map(v),
        };
        Op::get(1, "k", start, end, outcome)
    }

    fn get_nothing(lamport: Option<u64>, start: Tick, end: Tick) -> Op {
        let version = lamport.map(v);
        Op::get(1, "k", start, end, ReadOutcome::NotFound { version })
    }

    /// The kinds of violation found, sorted.
    fn kinds(history: &[Op]) -> Vec<ViolationKind> {
        let mut kinds: Vec<_> = check(history).violations.iter().map(|v| v.kind).collect();
        kinds.sort();
        kinds
    }

    #[test]
    fn a_concurrent_history_that_keeps_every_promise_passes() {
        let history = vec![
            get_nothing(None, 0, 2),
            put("a", 1, 10, 1),
            get("a", Some(1), 5, 8), // during the write: fine
            put("b", 12, 30, 2),
            get("a", Some(1), 14, 16), // b not yet acknowledged
            get("b", Some(2), 18, 20), // b already visible
            Op::get(2, "k", 21, 22, ReadOutcome::Failed),
            put_unknown("c", 31, 35),
            delete(40, 50, 4),
            get("b", Some(2), 41, 42), // the delete is still running
            get_nothing(Some(4), 45, 46),
            Op::put(3, "other", "a", 0, 5, WriteOutcome::Acked(v(9))),
            get_nothing(Some(4), 60, 61),
        ];
        let report = check(&history);
        assert!(report.is_valid(), "{:#?}", report.violations);
        assert_eq!(
            (report.ops, report.ok, report.failed, report.indeterminate),
            (13, 11, 1, 1)
        );
        assert!(report.to_string().starts_with("13 ops: 11 ok, 1 failed"));
    }

    #[test]
    fn concurrent_writes_may_land_in_either_order() {
        // a and b overlap; the store may order them either way, and says
        // which by their versions.
        for (a, b, last) in [(1, 2, "b"), (2, 1, "a")] {
            let history = vec![
                put("a", 0, 20, a),
                put("b", 5, 15, b),
                get(last, Some(a.max(b)), 30, 31),
                get(last, Some(a.max(b)), 40, 41),
            ];
            assert!(kinds(&history).is_empty(), "{last} last");
        }
        // Without versions, each read may see either, in any order.
        let history = vec![
            put("a", 0, 20, 1),
            put("b", 5, 15, 2),
            get("b", None, 30, 31),
            get("a", None, 40, 41),
            get("b", None, 50, 51),
        ];
        assert!(kinds(&history).is_empty());
    }

    #[test]
    fn a_read_missing_an_acknowledged_write_is_stale() {
        let history = vec![
            put("a", 0, 10, 1),
            put("b", 20, 30, 2),
            get("a", None, 40, 41),
            put("c", 50, 60, 3),
        ];
        let report = check(&history);
        assert_eq!(kinds(&history), [ViolationKind::Stale]);
        assert_eq!(report.violations[0].ops, [2, 0, 1]);
        assert!(
            report.violations[0]
                .description
                .contains("#1 (client 0, 20..30")
        );
        // Versions catch more: b overlapped a, but got the higher version
        // and was acknowledged before the read began.
        let history = vec![
            put("a", 0, 10, 1),
            put("b", 5, 30, 2),
            get("a", Some(1), 40, 41),
            put("c", 50, 60, 3),
        ];
        assert_eq!(kinds(&history), [ViolationKind::Stale]);
    }

    #[test]
    fn not_found_after_an_acknowledged_put_is_stale_unless_a_delete_explains_it() {
        let mut history = vec![
            put("a", 0, 10, 1),
            get_nothing(None, 20, 21),
            put("b", 30, 40, 2),
        ];
        assert_eq!(kinds(&history), [ViolationKind::Stale]);
        // A delete running alongside the read explains it ...
        history.push(delete(15, 25, 3));
        assert!(kinds(&history).is_empty());
        // ... but not one that completed before the put began.
        let history = vec![
            delete(0, 2, 1),
            put("a", 5, 10, 2),
            get_nothing(None, 20, 21),
            put("b", 30, 40, 3),
        ];
        assert_eq!(kinds(&history), [ViolationKind::Stale]);
    }

    #[test]
    fn an_indeterminate_write_may_appear_arbitrarily_late() {
        let history = vec![
            put("a", 0, 10, 1),
            put_unknown("b", 20, 30),
            put("c", 40, 50, 3),
            get("c", Some(3), 55, 56),
            // b took effect after c, with a higher version: fine.
            get("b", Some(5), 60, 61),
            get("b", Some(5), 100, 101),
        ];
        assert!(kinds(&history).is_empty(), "{:#?}", check(&history));
        // Without versions too.
        let history = vec![
            put("a", 0, 10, 1),
            put_unknown("b", 20, 30),
            put("c", 40, 50, 3),
            get("b", None, 60, 61),
        ];
        assert!(kinds(&history).is_empty());
        // An indeterminate delete may explain a tombstone at any version.
        let history = vec![
            put("a", 0, 10, 1),
            Op::delete(0, "k", 20, 30, WriteOutcome::Indeterminate),
            get_nothing(Some(7), 60, 61),
        ];
        assert!(kinds(&history).is_empty());
    }

    #[test]
    fn a_read_going_back_is_non_monotonic() {
        // In real time: b began after a completed; a read saw b, a later
        // read saw a again. b is not acknowledged, so it is not stale.
        let history = vec![
            put("a", 0, 10, 1),
            put_unknown("b", 15, 50),
            get("b", None, 20, 25),
            get("a", None, 30, 35),
        ];
        let report = check(&history);
        assert_eq!(kinds(&history), [ViolationKind::NonMonotonic]);
        assert_eq!(report.violations[0].ops, [3, 2, 1]);
        // In versions: a and b overlap, b got the higher version.
        let history = vec![
            put("a", 0, 10, 1),
            put("b", 5, 50, 2),
            get("b", Some(2), 20, 25),
            get("a", Some(1), 30, 35),
        ];
        assert_eq!(kinds(&history), [ViolationKind::NonMonotonic]);
        // Finding nothing after a read saw a, with no delete in sight.
        let history = vec![
            put_unknown("a", 0, 10),
            get("a", None, 20, 25),
            get_nothing(None, 30, 35),
        ];
        assert_eq!(kinds(&history), [ViolationKind::NonMonotonic]);
        // Overlapping reads may disagree.
        let history = vec![
            put("a", 0, 10, 1),
            put_unknown("b", 15, 50),
            get("b", None, 20, 25),
            get("a", None, 24, 35),
        ];
        assert!(kinds(&history).is_empty());
    }

    #[test]
    fn a_value_nobody_wrote_is_invented() {
        let history = vec![put("a", 0, 10, 1), get("zzz", Some(1), 20, 21)];
        assert_eq!(kinds(&history), [ViolationKind::Invented]);
        // Written to another key.
        let history = vec![
            Op::put(0, "other", "a", 0, 10, WriteOutcome::Acked(v(1))),
            get("a", None, 20, 21),
        ];
        assert_eq!(kinds(&history), [ViolationKind::Invented]);
        // Read before its write began, or from a write that never happened.
        let history = vec![get("a", None, 0, 1), put("a", 5, 10, 1)];
        assert_eq!(kinds(&history), [ViolationKind::Invented]);
        let history = vec![
            Op::put(0, "k", "a", 0, 10, WriteOutcome::Failed),
            get("a", None, 20, 21),
        ];
        assert_eq!(kinds(&history), [ViolationKind::Invented]);
        // A tombstone without any delete.
        let history = vec![put("a", 0, 10, 1), get_nothing(Some(3), 20, 21)];
        assert_eq!(kinds(&history), [ViolationKind::Invented]);
    }

    #[test]
    fn a_value_at_a_version_its_write_did_not_get_is_a_mismatch() {
        let history = vec![put("a", 0, 10, 1), get("a", Some(3), 20, 21)];
        assert_eq!(kinds(&history), [ViolationKind::VersionMismatch]);
        // An unacknowledged write seen at two versions.
        let history = vec![
            put_unknown("a", 0, 10),
            get("a", Some(3), 20, 21),
            get("a", Some(4), 30, 31),
        ];
        assert_eq!(kinds(&history), [ViolationKind::VersionMismatch]);
        // ... or at another write's version.
        let history = vec![
            put_unknown("a", 0, 10),
            put("b", 0, 10, 3),
            get("a", Some(3), 20, 21),
        ];
        assert_eq!(kinds(&history), [ViolationKind::VersionMismatch]);
        // A tombstone at a PUT's version; two writes with one version.
        let history = vec![put("a", 0, 10, 1), get_nothing(Some(1), 20, 21)];
        assert_eq!(kinds(&history), [ViolationKind::VersionMismatch]);
        let history = vec![put("a", 0, 10, 1), put("b", 20, 30, 1)];
        assert_eq!(kinds(&history), [ViolationKind::VersionMismatch]);
    }

    #[test]
    fn a_stale_read_on_a_quiet_key_is_a_lost_write() {
        let history = vec![
            put("a", 0, 10, 1),
            put("b", 20, 30, 2),
            put_unknown("c", 25, 40),
            get("a", Some(1), 100, 101),
        ];
        assert_eq!(kinds(&history), [ViolationKind::LostWrite]);
        let history = vec![put("a", 0, 10, 1), get_nothing(None, 100, 101)];
        assert_eq!(kinds(&history), [ViolationKind::LostWrite]);
        // The indeterminate c may be what the cluster ends with.
        let history = vec![
            put("a", 0, 10, 1),
            put("b", 20, 30, 2),
            put_unknown("c", 25, 40),
            get("c", Some(3), 100, 101),
        ];
        assert!(kinds(&history).is_empty());
    }

    #[test]
    fn a_workload_that_repeats_a_value_is_malformed() {
        let history = vec![
            put("a", 0, 10, 1),
            put("a", 20, 30, 2),
            Op::get(0, "k", 5, 4, ReadOutcome::Failed),
        ];
        assert_eq!(
            kinds(&history),
            [ViolationKind::Malformed, ViolationKind::Malformed]
        );
    }

    #[test]
    fn a_long_history_checks_clean_and_quickly() {
        // 100k ops over 8 keys: sequential writes, each followed by two reads
        // of what it wrote, and the occasional delete.
        let mut history = Vec::new();
        let mut t = 0;
        for n in 0..25_000u64 {
            let key = format!("k{}", n % 8);
            let written = if n % 10 == 9 {
                history.push(Op::delete(0, &key, t, t + 3, WriteOutcome::Acked(v(n + 1))));
                ReadOutcome::NotFound {
                    version: Some(v(n + 1)),
                }
            } else {
                let value = format!("v{n}");
                history.push(Op::put(
                    0,
                    &key,
                    value.as_str(),
                    t,
                    t + 3,
                    WriteOutcome::Acked(v(n + 1)),
                ));
                ReadOutcome::Found {
                    value: value.into_bytes(),
                    version: Some(v(n + 1)),
                }
            };
            history.push(Op::get(1, &key, t + 1, t + 2, written.clone()));
            history.push(Op::get(2, &key, t + 4, t + 5, written.clone()));
            history.push(Op::get(3, &key, t + 6, t + 7, written));
            t += 10;
        }
        let started = std::time::Instant::now();
        let report = check(&history);
        assert!(report.is_valid(), "{:?}", report.violations.first());
        assert_eq!(report.ops, 100_000);
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }
}
