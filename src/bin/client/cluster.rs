//! `DKVSClient cluster ...`: membership. `cluster wait` waits until a
//! layout change is over; `cluster abort` undoes a join in progress.
//!
//! A change is over when the newest layout any member serves has no change
//! in progress (no member joining, no old replica sets still written:
//! [`dkvs::layout::Layout::in_progress`]) and every live member serves it.
//! Every member is asked for `Cluster.Status` on each poll: the newest
//! layout is the highest version any of them answers, and what a member
//! serves is what it answers itself, or, when the client cannot reach it,
//! what the members it heartbeats with last heard. A member the others
//! believe down does not hold the verdict up (it learns the layout when it
//! is back), but it holds up the change itself: a move settles only once
//! every member serves the finished join.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dkvs::client::ClientOptions;
use dkvs::net::{PeerPool, call_within};
use dkvs::pb;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::time::Instant;

use crate::Outcome;
use crate::status::{duration, percent};

/// How often the members are asked.
const POLL: Duration = Duration::from_millis(500);
/// How often a progress line is printed when stderr is not a terminal
/// (and whenever the layout version changes).
const PROGRESS_LINE_EVERY: Duration = Duration::from_secs(10);

// A plain comment: a doc comment here would replace the subcommand's
// description in --help.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Wait until a layout change is over: exit 0, or 3 at --timeout-secs.
    ///
    /// Over means no change is in progress, every member that is up
    /// serves the newest layout, and each has dropped the data moved away
    /// from it. Asks every member for its status twice a
    /// second. Progress goes to stderr, the verdict to stdout. A member
    /// believed down does not hold up the verdict, but a join does not
    /// settle until every member serves it.
    #[command(name = "wait")]
    Wait(WaitArgs),
    /// Undo the change in progress (a join) while reads have not moved.
    ///
    /// Allowed while a node is still joining, also when it is dead, wiped
    /// or never came up: the layout drops it and lists its instance as
    /// removed (if it comes back, it stops). Once it finished joining,
    /// refused: run `cluster wait` for the move to settle. Exit 0 when
    /// aborted; 3 when refused (nothing to abort, reads moved) or no node
    /// answered; 4 when the outcome is unknown.
    #[command(name = "abort")]
    Abort,
    /// Decommission a live member: its ranges move to the others, then it
    /// exits 0.
    ///
    /// The member becomes LEAVING; every member that takes one of its
    /// ranges streams it; reads move; once every member serves the move it
    /// settles, the member goes on the removed list and exits 0 by itself
    /// (restart-on-failure policies leave it down). Returns once the change
    /// is committed (--wait: once the member exited). Refused (exit 3) when
    /// fewer than N members would be left (--force to run with fewer
    /// copies), when another change is in progress, and when the member is
    /// believed down (use `cluster remove`). 4 when the outcome is unknown.
    #[command(name = "leave")]
    Leave(LeaveArgs),
    /// Drop a dead member: the survivors rebuild its ranges.
    ///
    /// Each range it held is streamed to the members that take it from at
    /// least N-W+1 surviving replicas (so no acknowledged write is lost);
    /// when fewer survive the remove is refused naming the ranges, unless
    /// --allow-data-loss. A member believed up is refused (use `cluster
    /// leave`) unless --force. Accepted while another change is in
    /// progress (it goes on without the member); removing a member still
    /// joining aborts its join. Exit 0 once committed, 3 when refused, 4
    /// when the outcome is unknown.
    #[command(name = "remove")]
    Remove(RemoveArgs),
    /// Show what a change would do, changing nothing.
    ///
    /// Prints what would move (ranges and an estimate of keys and bytes,
    /// from which member to which), which ranges would have fewer than W
    /// replicas up during the move, or why the change would be refused
    /// (exit 3). Judged from the layout and the liveness of the node that
    /// answers, by the same rules the change itself uses.
    #[command(name = "plan")]
    Plan(PlanArgs),
}

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// The change: join, leave, remove or replace.
    #[arg(value_enum)]
    change: PlanKind,
    /// The member (or, for join, the new node), HOST:PORT.
    address: String,
    /// As `cluster leave|remove --force`.
    #[arg(long)]
    force: bool,
    /// As `cluster remove --allow-data-loss`.
    #[arg(long)]
    allow_data_loss: bool,
    /// For replace: the new node's address (as its --listen would be).
    #[arg(long, default_value = "new-node:7000")]
    with: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PlanKind {
    Join,
    Leave,
    Remove,
    Replace,
}

#[derive(Debug, clap::Args)]
pub struct LeaveArgs {
    /// The member, HOST:PORT as `DKVSClient status` lists it.
    address: String,
    /// Leave even when fewer than N members are left, or when the member
    /// is believed down.
    #[arg(long)]
    force: bool,
    /// Wait until the member has exited (its data moved and settled).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds (exit 3).
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

#[derive(Debug, clap::Args)]
pub struct RemoveArgs {
    /// The member, HOST:PORT as `DKVSClient status` lists it.
    address: String,
    /// Remove it even when it is believed up.
    #[arg(long)]
    force: bool,
    /// Rebuild ranges from fewer than N-W+1 surviving copies: writes
    /// acknowledged only by the lost replicas are gone for good.
    #[arg(long)]
    allow_data_loss: bool,
}

#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Give up after this many seconds (exit 3); 0 waits without limit.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// Runs a `cluster` command against the members reachable from `seeds`.
pub async fn run(command: ClusterCommand, seeds: &[String], options: &ClientOptions) -> Outcome {
    let rpc_timeout = options.rpc_timeout;
    let peers = Arc::new(options.peer_pool());
    match command {
        ClusterCommand::Wait(args) => wait(&peers, seeds, rpc_timeout, args).await,
        ClusterCommand::Abort => change(&peers, seeds, rpc_timeout, Change::Abort).await,
        ClusterCommand::Leave(args) => {
            let address = args.address.clone();
            let outcome = change(
                &peers,
                seeds,
                rpc_timeout,
                Change::Leave {
                    address: args.address,
                    force: args.force,
                },
            )
            .await;
            if !matches!(outcome, Outcome::Done) || !args.wait {
                return outcome;
            }
            wait_gone(&peers, seeds, rpc_timeout, &address, args.timeout_secs).await
        }
        ClusterCommand::Plan(args) => plan(&peers, seeds, rpc_timeout, args).await,
        ClusterCommand::Remove(args) => {
            let change_asked = Change::Remove {
                address: args.address,
                force: args.force,
                allow_data_loss: args.allow_data_loss,
            };
            change(&peers, seeds, rpc_timeout, change_asked).await
        }
    }
}

/// `cluster plan`: the layout the change would commit, and what it would
/// move, from the newest layout the seeds answer and the liveness its
/// node sees.
async fn plan(
    peers: &Arc<PeerPool>,
    seeds: &[String],
    rpc_timeout: Duration,
    args: PlanArgs,
) -> Outcome {
    let answers = ask_all(peers, seeds, rpc_timeout).await;
    let Some(status) = answers
        .values()
        .filter_map(|a| a.as_ref().ok())
        .max_by_key(|s| s.layout.as_ref().map_or(0, |l| l.version))
    else {
        eprintln!("error: no node answered: nothing to plan from");
        return Outcome::Failed(3);
    };
    let layout = match status.layout.clone().map(pb::layout_from) {
        Some(Ok(layout)) => layout,
        Some(Err(why)) => {
            eprintln!(
                "error: the layout {} serves does not check: {why}",
                status.address
            );
            return Outcome::Failed(3);
        }
        None => {
            eprintln!(
                "error: {} keeps no layout (a fixed member list): nothing can change",
                status.address
            );
            return Outcome::Failed(3);
        }
    };
    let up = |address: &str| {
        status
            .members
            .iter()
            .any(|m| m.address == address && m.state != pb::MemberState::Down as i32)
    };
    let address = args.address.as_str();
    let refused = |why: String| {
        println!("would be refused: {why}");
        Outcome::Failed(3)
    };
    let next = match args.change {
        PlanKind::Join => layout.begin_join(address),
        PlanKind::Leave => {
            if layout.is_member(address) && !up(address) && !args.force {
                return refused(format!(
                    "{address} is believed down, so it cannot hand its data over: use `cluster remove {address}`"
                ));
            }
            layout.begin_leave(address, args.force)
        }
        PlanKind::Remove => {
            if layout.is_member(address) && up(address) && !args.force {
                return refused(format!(
                    "{address} is up as {} sees it: use `cluster leave {address}` (its data moves first)",
                    status.address
                ));
            }
            layout.begin_remove(address, args.allow_data_loss, up)
        }
        PlanKind::Replace => layout.begin_replace(
            address,
            &args.with,
            dkvs::clock::InstanceId::NONE,
            args.force,
            up,
        ),
    };
    let next = match next {
        Ok(next) => next,
        Err(why) => return refused(why.to_string()),
    };
    print!("{}", plan_text(status, &layout, &next, &up));
    Outcome::Done
}

/// What `cluster plan` prints for the change from `layout` to `next`.
fn plan_text(
    status: &pb::StatusResponse,
    layout: &dkvs::layout::Layout,
    next: &dkvs::layout::Layout,
    up: &dyn Fn(&str) -> bool,
) -> String {
    let plan = dkvs::layout::plan::plan(next, up);
    let (n_old, _) = next.n_old_new();
    // Estimates: the distinct keys (and bytes) are each member's counts
    // summed over its N copies.
    let stats: Vec<&pb::NodeStats> = status
        .members
        .iter()
        .filter_map(|m| m.stats.as_ref())
        .collect();
    let keys = stats.iter().map(|s| s.live_keys).sum::<u64>() as f64 / n_old.max(1) as f64;
    let data = stats.iter().map(|s| s.data_bytes).sum::<u64>() as f64 / n_old.max(1) as f64;
    let mut text = format!(
        "Plan (nothing changed): {} (layout v{} -> v{}), as {} sees the cluster\n",
        next.change_name(),
        layout.version,
        next.version,
        status.address
    );
    let bytes = if data >= 1.0 {
        format!(", ~{}", estimate_bytes(plan.share_moved * data))
    } else {
        String::new()
    };
    text.push_str(&format!(
        "Moves {:.1}% of the key space (~{} keys{bytes}), streamed to the members that take it:\n",
        plan.share_moved * 100.0,
        (plan.share_moved * keys).round() as u64,
    ));
    text.push_str(&transfers_table(&plan, n_old, keys, data));
    if plan.transfers.is_empty() {
        text.push_str("  (nothing: every member that stays already holds every key it will)\n");
    }
    if plan.thin.is_empty() {
        text.push_str("Every range keeps W replicas up during the move.\n");
    } else {
        let share: f64 = plan.thin.iter().map(|t| t.slice.share()).sum();
        text.push_str(&format!(
            "{} range(s) ({:.1}% of the keys) have fewer than W replicas up during the move: QUORUM requests to them fail until members are back, e.g.\n",
            plan.thin.len(),
            share * 100.0
        ));
        for thin in plan.thin.iter().take(3) {
            let (first, last) = thin.slice.intervals[0];
            text.push_str(&format!(
                "  {first:016x}..={last:016x}: old {} ({} up), new {} ({} up)\n",
                thin.slice.old.join(", "),
                thin.old_up,
                thin.slice.new.join(", "),
                thin.new_up
            ));
        }
    }
    if !next.written_off.is_empty() {
        text.push_str(&format!(
            "--allow-data-loss writes off the copies of {}: writes only they acknowledged are lost.\n",
            next.written_off.join(", ")
        ));
    }
    text
}

/// `cluster plan`'s table: per receiving member, what it takes and from
/// whom, with estimates from `keys` and `data` (the distinct keys and bytes).
fn transfers_table(
    plan: &dkvs::layout::plan::ChangePlan,
    n_old: usize,
    keys: f64,
    data: f64,
) -> String {
    let mut text = String::new();
    text.push_str(&format!(
        "  {:<22} {:>6} {:>7} {:>8} {:>10}  {}\n",
        "TO", "RANGES", "SHARE", "~KEYS", "~BYTES", "FROM"
    ));
    for transfer in &plan.transfers {
        let from = if transfer.from_giver {
            format!("{} (giving them up)", transfer.from.join(", "))
        } else {
            format!(
                "{} of each range's old replicas: {}",
                n_old - n_old / 2,
                transfer.from.join(", ")
            )
        };
        text.push_str(&format!(
            "  {:<22} {:>6} {:>6.1}% {:>8} {:>10}  {}\n",
            transfer.to,
            transfer.intervals,
            transfer.share * 100.0,
            (transfer.share * keys).round() as u64,
            estimate_bytes(transfer.share * data),
            from
        ));
    }
    text
}

/// An estimate of bytes, `?` when the members report none.
fn estimate_bytes(bytes: f64) -> String {
    if bytes < 1.0 {
        "?".into()
    } else {
        crate::status::bytes(bytes as u64)
    }
}

/// Whom to ask to commit `change`, in order: the voting members of the
/// newest layout the seeds answered (the seeds when none), the member the
/// change is about last (and never for its own remove).
fn voters_to_ask(
    answers: &BTreeMap<String, Result<pb::StatusResponse, String>>,
    seeds: &[String],
    change: &Change,
) -> Vec<String> {
    let mut asked: Vec<String> = match newest_layout(answers) {
        Some(layout) => layout
            .members
            .iter()
            .filter(|m| {
                m.role == pb::LayoutRole::Active as i32 || m.role == pb::LayoutRole::Leaving as i32
            })
            .map(|m| m.address.clone())
            .collect(),
        None => seeds.to_vec(),
    };
    if let Some(subject) = change.subject() {
        // Ask the others first: a remove is refused by its subject, and a
        // leaver is as good as any but may be on its way out.
        asked.sort_by_key(|a| a == subject);
        if matches!(change, Change::Remove { .. }) {
            asked.retain(|a| a != subject);
        }
    }
    asked
}

/// A membership change the client asks a member to commit.
enum Change {
    Abort,
    Leave {
        address: String,
        force: bool,
    },
    Remove {
        address: String,
        force: bool,
        allow_data_loss: bool,
    },
}

impl Change {
    fn name(&self) -> &'static str {
        match self {
            Change::Abort => "abort",
            Change::Leave { .. } => "leave",
            Change::Remove { .. } => "remove",
        }
    }

    /// The member the change is about (not asked to commit a remove of
    /// itself).
    fn subject(&self) -> Option<&str> {
        match self {
            Change::Abort => None,
            Change::Leave { address, .. } | Change::Remove { address, .. } => Some(address),
        }
    }

    /// Asks `client`'s node to commit the change: the layout it committed.
    async fn ask(
        &self,
        client: &mut pb::cluster_client::ClusterClient<dkvs::net::ClientChannel>,
    ) -> Result<pb::Layout, tonic::Status> {
        let layout = match self {
            Change::Abort => client.abort(pb::AbortRequest {}).await?.into_inner().layout,
            Change::Leave { address, force } => {
                client
                    .leave(pb::LeaveRequest {
                        address: address.clone(),
                        force: *force,
                    })
                    .await?
                    .into_inner()
                    .layout
            }
            Change::Remove {
                address,
                force,
                allow_data_loss,
            } => {
                client
                    .remove(pb::RemoveRequest {
                        address: address.clone(),
                        force: *force,
                        allow_data_loss: *allow_data_loss,
                    })
                    .await?
                    .into_inner()
                    .layout
            }
        };
        Ok(layout.unwrap_or_default())
    }
}

/// `cluster leave --wait`: polls until the newest layout lists `address`
/// as removed and it no longer answers (it exited).
async fn wait_gone(
    peers: &Arc<PeerPool>,
    seeds: &[String],
    rpc_timeout: Duration,
    address: &str,
    timeout_secs: u64,
) -> Outcome {
    let began = Instant::now();
    let limit = Duration::from_secs(timeout_secs.max(1));
    let mut asked: Vec<String> = seeds.to_vec();
    asked.push(address.to_string());
    loop {
        let answers = ask_all(peers, &asked, rpc_timeout).await;
        let newest = newest_layout(&answers).cloned();
        if let Some(layout) = &newest {
            asked = layout.members.iter().map(|m| m.address.clone()).collect();
            asked.push(address.to_string());
            let removed = layout.removed.iter().any(|r| r.address == address);
            let answering = answers.get(address).is_some_and(|a| a.is_ok());
            if removed && !answering {
                println!(
                    "{address} left: its ranges moved and it exited, layout v{} (waited {:.1} s)",
                    layout.version,
                    began.elapsed().as_secs_f64()
                );
                return Outcome::Done;
            }
        }
        if began.elapsed() >= limit {
            let why = newest.map_or("no layout known".to_string(), |l| {
                format!("layout v{}: {}", l.version, l.change)
            });
            println!("{address} has not left after {timeout_secs} s (--timeout-secs): {why}");
            return Outcome::Unsettled;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// How long the node asked to change the layout may take to commit it
/// (its Paxos rounds retry while proposals collide or members are slow).
const CHANGE_DEADLINE: Duration = Duration::from_secs(60);

/// `cluster abort|leave|remove`: learns the layout from the seeds, then
/// asks its voting members in turn (a joiner does not vote; the member a
/// change is about last) until one answers; transport failures move on to
/// the next.
async fn change(
    peers: &Arc<PeerPool>,
    seeds: &[String],
    rpc_timeout: Duration,
    change: Change,
) -> Outcome {
    let answers = ask_all(peers, seeds, rpc_timeout).await;
    let asked = voters_to_ask(&answers, seeds, &change);
    let mut failures = Vec::new();
    for address in &asked {
        let mut client = match peers.cluster_client(address) {
            Ok(client) => client,
            Err(why) => {
                failures.push(format!("{address}: {why}"));
                continue;
            }
        };
        let status = match tokio::time::timeout(CHANGE_DEADLINE, change.ask(&mut client)).await {
            Ok(Ok(layout)) => {
                let done = match change {
                    Change::Abort => "aborted",
                    Change::Leave { .. } => "leaving",
                    Change::Remove { .. } => "removing",
                };
                println!(
                    "{done}: {} (layout v{}, committed by {address})",
                    layout.change, layout.version
                );
                return Outcome::Done;
            }
            Ok(Err(status)) => status,
            Err(_) => {
                eprintln!(
                    "error: {address} did not answer within {} s: the {} may or may not have committed (outcome unknown); check `DKVSClient status`",
                    CHANGE_DEADLINE.as_secs(),
                    change.name()
                );
                return Outcome::Failed(4);
            }
        };
        // Not answered by DKVS (the node is down or unreachable): next.
        let from_dkvs = status
            .metadata()
            .get(dkvs::error::COORDINATOR_ERROR_HEADER)
            .is_some();
        if status.code() == tonic::Code::Unavailable && !from_dkvs {
            failures.push(format!("{address}: {}", status.message()));
            continue;
        }
        let error = dkvs::Error::Remote {
            code: status.code(),
            message: status.message().to_string(),
            outcome: dkvs::error::Outcome::of(status.metadata()),
        };
        eprintln!("error: {error}");
        return Outcome::Failed(crate::exit_code(&error, crate::Kind::Write));
    }
    eprintln!(
        "error: no node could be asked to {} (nothing changed): {}",
        change.name(),
        failures.join("; ")
    );
    Outcome::Failed(3)
}

/// `cluster wait`: polls every member until the change is over or the
/// timeout passes.
async fn wait(
    peers: &Arc<PeerPool>,
    seeds: &[String],
    rpc_timeout: Duration,
    args: WaitArgs,
) -> Outcome {
    let began = Instant::now();
    let limit = (args.timeout_secs > 0).then(|| Duration::from_secs(args.timeout_secs));
    let mut progress = Progress::new();
    // Whom to ask: the seeds until a layout is known, then its members.
    let mut asked: Vec<String> = seeds.to_vec();
    loop {
        let answers = ask_all(&peers, &asked, rpc_timeout).await;
        if let Some(layout) = newest_layout(&answers) {
            asked = layout.members.iter().map(|m| m.address.clone()).collect();
        }
        let waited = began.elapsed();
        match judge(&answers) {
            Verdict::Settled(settled) => {
                progress.clear();
                println!("{} (waited {:.1} s)", settled.line(), waited.as_secs_f64());
                return Outcome::Done;
            }
            Verdict::Waiting(waiting) => {
                if let Some(limit) = limit
                    && waited >= limit
                {
                    progress.clear();
                    println!(
                        "not settled after {} s (--timeout-secs): {}",
                        limit.as_secs(),
                        waiting.why
                    );
                    return Outcome::Unsettled;
                }
                progress.show(waited, &waiting);
            }
        }
        let pause = match limit {
            Some(limit) => POLL.min(limit.saturating_sub(began.elapsed())),
            None => POLL,
        };
        tokio::time::sleep(pause).await;
    }
}

/// Each address's `Cluster.Status`, or why it did not answer; asked at
/// once, each within `rpc_timeout`.
async fn ask_all(
    peers: &Arc<PeerPool>,
    addresses: &[String],
    rpc_timeout: Duration,
) -> BTreeMap<String, Result<pb::StatusResponse, String>> {
    let mut asks: FuturesUnordered<_> = addresses
        .iter()
        .map(|address| {
            let (peers, address) = (peers.clone(), address.clone());
            async move {
                let answer = match peers.cluster_client(&address) {
                    Ok(mut client) => call_within(rpc_timeout, client.status(pb::StatusRequest {}))
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (address, answer)
            }
        })
        .collect();
    let mut answers = BTreeMap::new();
    while let Some((address, answer)) = asks.next().await {
        answers.insert(address, answer);
    }
    answers
}

/// The newest layout any answer carries.
fn newest_layout(
    answers: &BTreeMap<String, Result<pb::StatusResponse, String>>,
) -> Option<&pb::Layout> {
    answers
        .values()
        .filter_map(|a| a.as_ref().ok()?.layout.as_ref())
        .max_by_key(|l| l.version)
}

/// What one poll's answers say.
#[derive(Debug, PartialEq)]
enum Verdict {
    Settled(Settled),
    Waiting(Waiting),
}

/// No change in progress, and every live member serves `version`.
#[derive(Debug, PartialEq)]
struct Settled {
    version: u64,
    /// The layout's last change, in words.
    change: String,
    /// Members serving it, and members believed down.
    serving: usize,
    down: Vec<String>,
}

impl Settled {
    fn line(&self) -> String {
        if self.version == 0 {
            return format!(
                "settled: these nodes keep no layout (a fixed member list), served by {} members",
                self.serving
            );
        }
        let served = if self.down.is_empty() {
            format!("served by all {} members", self.serving)
        } else {
            format!(
                "served by the {} live members; believed down: {} (a member learns the layout when it is back)",
                self.serving,
                self.down.join(", ")
            )
        };
        format!(
            "settled: layout v{} ({}), {served}",
            self.version, self.change
        )
    }
}

/// Not over yet, and why, in one line.
#[derive(Debug, PartialEq)]
struct Waiting {
    /// The newest layout version known (0: none).
    version: u64,
    why: String,
}

/// Judges one poll: settled, or what is still waited for.
fn judge(answers: &BTreeMap<String, Result<pb::StatusResponse, String>>) -> Verdict {
    let answered: Vec<&pb::StatusResponse> =
        answers.values().filter_map(|a| a.as_ref().ok()).collect();
    if answered.is_empty() {
        let failures: Vec<String> = answers
            .iter()
            .filter_map(|(address, a)| a.as_ref().err().map(|why| format!("{address}: {why}")))
            .collect();
        return Verdict::Waiting(Waiting {
            version: 0,
            why: format!("no node answered: {}", failures.join("; ")),
        });
    }
    let Some(layout) = newest_layout(answers) else {
        // Nodes from before layouts: the member list cannot change.
        return Verdict::Settled(Settled {
            version: 0,
            change: String::new(),
            serving: answered.len(),
            down: Vec::new(),
        });
    };
    let version = layout.version;
    let waiting = |why: String| Verdict::Waiting(Waiting { version, why });
    let in_progress = match pb::layout_from(layout.clone()) {
        Ok(checked) => checked.in_progress().map(str::to_string),
        Err(why) => return waiting(format!("layout v{version} does not check: {why}")),
    };
    // How the members that serve the newest layout see each member.
    let current: Vec<&pb::StatusResponse> = answered
        .iter()
        .copied()
        .filter(|s| s.layout.as_ref().is_some_and(|l| l.version == version))
        .collect();
    let Roll {
        serving,
        behind,
        down,
    } = roll(layout, answers, &current);
    if let Some(change) = in_progress {
        return waiting(in_progress_why(layout, &change, &current, behind, &down));
    }
    if !behind.is_empty() {
        return waiting(format!(
            "layout v{version} ({}): {}",
            layout.change,
            behind.join(", ")
        ));
    }
    if let Some(why) = moved_data_left(layout, &current) {
        return waiting(format!("layout v{version} ({}): {why}", layout.change));
    }
    if let Some(why) = members_not_settled(layout, answers) {
        return waiting(format!("layout v{version} ({}): {why}", layout.change));
    }
    Verdict::Settled(Settled {
        version,
        change: layout.change.clone(),
        serving,
        down,
    })
}

/// Why a change in progress is not over: its progress, what it waits for,
/// the members behind it and those believed down.
fn in_progress_why(
    layout: &pb::Layout,
    change: &str,
    current: &[&pb::StatusResponse],
    behind: Vec<String>,
    down: &[String],
) -> String {
    let version = layout.version;
    let mut parts = vec![format!("layout v{version}, change in progress: {change}")];
    parts.extend(moves(current));
    if !layout.previous.is_empty() {
        parts.push(format!("settles once every member serves v{version}"));
    } else if let Ok(checked) = pb::layout_from(layout.clone()) {
        let waiting = checked.waiting_for_streams();
        // A join's streaming shows in its progress line already.
        let shrinking = checked.members.iter().any(|m| !m.role.holds_after());
        if shrinking && !waiting.is_empty() {
            parts.push(format!(
                "waiting for {} to stream the ranges they take",
                waiting.join(", ")
            ));
        }
    }
    parts.extend(behind);
    // A member being removed is down by design: nothing waits for it.
    let removing = |address: &str| {
        layout
            .members
            .iter()
            .any(|m| m.address == address && m.role == pb::LayoutRole::Removing as i32)
    };
    parts.extend(
        down.iter()
            .filter(|address| !removing(address))
            .map(|address| format!("{address} is believed down (the change waits for it)")),
    );
    parts.join("; ")
}

/// The members serving `layout` that still hold data moved away from them
/// (they drop it once its new owners confirmed holding it). A layout that
/// never changed (v1) has none.
fn moved_data_left(layout: &pb::Layout, current: &[&pb::StatusResponse]) -> Option<String> {
    if layout.version <= 1 {
        return None;
    }
    let holding: Vec<&str> = current
        .iter()
        .filter(|s| s.cleaned_up_layout < layout.version)
        .map(|s| s.address.as_str())
        .collect();
    (!holding.is_empty()).then(|| {
        format!(
            "{} still hold{} data moved away (handed to its new owners, then dropped)",
            holding.join(", "),
            if holding.len() == 1 { "s" } else { "" }
        )
    })
}

/// What members that serve the newest layout still wait for: a read gate
/// still closed (a new data dir catching up), or an instance the layout
/// does not name yet.
fn members_not_settled(
    layout: &pb::Layout,
    answers: &BTreeMap<String, Result<pb::StatusResponse, String>>,
) -> Option<String> {
    let catching_up: Vec<&str> = answers
        .values()
        .filter_map(|a| a.as_ref().ok())
        .filter(|s| s.catching_up)
        .map(|s| s.address.as_str())
        .collect();
    if !catching_up.is_empty() {
        return Some(format!(
            "{} catching up (a new data dir: no replica reads until it has synced with its peers)",
            catching_up.join(", ")
        ));
    }
    let unnamed = unnamed_instances(layout, answers);
    (!unnamed.is_empty()).then(|| {
        format!(
            "the instance of {} is not named yet (the first members are named once all are seen; a member that lost its data dir, once it answers)",
            unnamed.join(", ")
        )
    })
}

/// The members that answered as another instance than the one `layout`
/// names for them (none yet, or a lost data dir): they do not vote until
/// the `instances named` change the others propose.
fn unnamed_instances(
    layout: &pb::Layout,
    answers: &BTreeMap<String, Result<pb::StatusResponse, String>>,
) -> Vec<String> {
    layout
        .members
        .iter()
        .filter(|member| {
            answers
                .get(&member.address)
                .and_then(|answer| answer.as_ref().ok())
                .is_some_and(|own| own.instance_id != 0 && own.instance_id != member.instance_id)
        })
        .map(|member| member.address.clone())
        .collect()
}

/// Where each member of the newest layout stands.
struct Roll {
    /// Members serving the layout.
    serving: usize,
    /// Members behind it, each with what it serves.
    behind: Vec<String>,
    /// Members every view believes down.
    down: Vec<String>,
}

/// Where each member of `layout` stands: what it answered itself, or for
/// one unreachable from here, how the `current` answers (those serving
/// `layout`) see it.
fn roll(
    layout: &pb::Layout,
    answers: &BTreeMap<String, Result<pb::StatusResponse, String>>,
    current: &[&pb::StatusResponse],
) -> Roll {
    let version = layout.version;
    let mut serving = 0;
    let mut behind = Vec::new();
    let mut down = Vec::new();
    for member in &layout.members {
        let address = &member.address;
        let views: Vec<&pb::Member> = current
            .iter()
            .flat_map(|s| s.members.iter())
            .filter(|m| m.address == *address)
            .collect();
        let served = match answers.get(address) {
            // What it answered itself.
            Some(Ok(own)) => own.layout.as_ref().map_or(0, |l| l.version),
            // Unreachable from here: down if every view says so, else
            // what its heartbeats last said.
            _ if !views.is_empty()
                && views
                    .iter()
                    .all(|m| m.state == pb::MemberState::Down as i32) =>
            {
                down.push(address.clone());
                continue;
            }
            _ => views.iter().map(|m| m.layout_version).max().unwrap_or(0),
        };
        if served >= version {
            serving += 1;
        } else if served == 0 {
            behind.push(format!("{address} has not answered"));
        } else {
            behind.push(format!("{address} serves v{served}"));
        }
    }
    Roll {
        serving,
        behind,
        down,
    }
}

/// Each joining node's progress, freshest report first per node.
fn moves(current: &[&pb::StatusResponse]) -> Vec<String> {
    let mut freshest: BTreeMap<&str, &pb::MoveProgress> = BTreeMap::new();
    for progress in current.iter().flat_map(|s| s.moves.iter()) {
        let known = freshest.entry(&progress.address).or_insert(progress);
        if progress.age_ms < known.age_ms {
            *known = progress;
        }
    }
    freshest
        .values()
        .map(|p| {
            let left = if p.done_ppm > 0 && p.done_ppm < 1_000_000 {
                format!(", ~{} left", duration(p.eta_ms))
            } else {
                String::new()
            };
            let stalled = if p.stalled_ms > 0 {
                format!(
                    "; streaming to {} stalled {}: {}",
                    p.address,
                    duration(p.stalled_ms),
                    p.stalled_why
                )
            } else {
                String::new()
            };
            format!(
                "{} {} moved ({} keys{left}){stalled}",
                p.address,
                percent(p.done_ppm),
                p.keys_moved
            )
        })
        .collect()
}

/// Progress on stderr: a redrawn line on a terminal, else a line when the
/// layout version changes and every [`PROGRESS_LINE_EVERY`].
struct Progress {
    bar: Option<crate::progress::Bar>,
    /// The version and time of the last printed line.
    last: Option<(u64, Duration)>,
}

impl Progress {
    fn new() -> Self {
        let bar = crate::progress::Bar::on_terminal(
            "cluster wait {spinner} [{elapsed_precise}] {wide_msg}",
            None,
        );
        if let Some(bar) = &bar {
            bar.tick_every(Duration::from_millis(200));
        }
        Progress { bar, last: None }
    }

    fn show(&mut self, waited: Duration, waiting: &Waiting) {
        if let Some(bar) = &self.bar {
            bar.set_message(waiting.why.clone());
            return;
        }
        let due = match self.last {
            None => true,
            Some((version, at)) => version != waiting.version || waited >= at + PROGRESS_LINE_EVERY,
        };
        if due {
            eprintln!("cluster wait: {} s: {}", waited.as_secs(), waiting.why);
            self.last = Some((waiting.version, waited));
        }
    }

    fn clear(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(version: u64, members: &[(&str, pb::LayoutRole)], previous: &[&str]) -> pb::Layout {
        pb::Layout {
            version,
            replicas: 3,
            vnodes: 1,
            members: members
                .iter()
                .enumerate()
                .map(|(i, (address, role))| pb::LayoutMember {
                    address: address.to_string(),
                    member_id: dkvs::ring::member_id_for(address).0,
                    role: *role as i32,
                    tokens: vec![(i as u64 + 1) << 40],
                    ..Default::default()
                })
                .collect(),
            previous: previous.iter().map(|s| s.to_string()).collect(),
            change: format!("change {version}"),
            ..Default::default()
        }
    }

    fn status(
        address: &str,
        layout: &pb::Layout,
        members: &[(&str, pb::MemberState, u64)],
    ) -> pb::StatusResponse {
        pb::StatusResponse {
            address: address.into(),
            layout: Some(layout.clone()),
            cleaned_up_layout: layout.version,
            members: members
                .iter()
                .map(|(address, state, layout_version)| pb::Member {
                    address: address.to_string(),
                    state: *state as i32,
                    layout_version: *layout_version,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    use pb::LayoutRole::{Active, Joining};
    use pb::MemberState::{Down, Up};

    type Answers = BTreeMap<String, Result<pb::StatusResponse, String>>;

    fn answers(list: Vec<(&str, Result<pb::StatusResponse, String>)>) -> Answers {
        list.into_iter().map(|(a, s)| (a.to_string(), s)).collect()
    }

    fn why(verdict: Verdict) -> String {
        match verdict {
            Verdict::Waiting(waiting) => waiting.why,
            Verdict::Settled(settled) => panic!("settled: {settled:?}"),
        }
    }

    #[test]
    fn settled_when_every_member_serves_the_newest_layout_without_a_change() {
        let v4 = layout(4, &[("a", Active), ("b", Active)], &[]);
        let seen = [("a", Up, 4), ("b", Up, 4)];
        let all = answers(vec![
            ("a", Ok(status("a", &v4, &seen))),
            ("b", Ok(status("b", &v4, &seen))),
        ]);
        let Verdict::Settled(settled) = judge(&all) else {
            panic!("not settled")
        };
        assert_eq!(
            settled.line(),
            "settled: layout v4 (change 4), served by all 2 members"
        );
    }

    #[test]
    fn a_member_still_holding_moved_data_is_waited_for() {
        let v4 = layout(4, &[("a", Active), ("b", Active)], &[]);
        let seen = [("a", Up, 4), ("b", Up, 4)];
        let mut holding = status("b", &v4, &seen);
        holding.cleaned_up_layout = 3;
        let all = answers(vec![("a", Ok(status("a", &v4, &seen))), ("b", Ok(holding))]);
        assert_eq!(
            why(judge(&all)),
            "layout v4 (change 4): b still holds data moved away (handed to its new owners, then dropped)"
        );
    }

    #[test]
    fn a_member_the_layout_does_not_name_as_its_instance_is_waited_for() {
        let v4 = layout(4, &[("a", Active), ("b", Active)], &[]);
        let seen = [("a", Up, 4), ("b", Up, 4)];
        let mut b = status("b", &v4, &seen);
        b.instance_id = 7;
        let all = answers(vec![("a", Ok(status("a", &v4, &seen))), ("b", Ok(b))]);
        assert!(
            why(judge(&all))
                .starts_with("layout v4 (change 4): the instance of b is not named yet"),
            "{}",
            why(judge(&all))
        );
    }

    #[test]
    fn a_member_still_catching_up_is_waited_for() {
        let v4 = layout(4, &[("a", Active), ("b", Active)], &[]);
        let seen = [("a", Up, 4), ("b", Up, 4)];
        let mut b = status("b", &v4, &seen);
        b.catching_up = true;
        let all = answers(vec![("a", Ok(status("a", &v4, &seen))), ("b", Ok(b))]);
        assert!(
            why(judge(&all)).starts_with("layout v4 (change 4): b catching up"),
            "{}",
            why(judge(&all))
        );
    }

    #[test]
    fn a_member_still_on_an_older_layout_is_waited_for() {
        let v3 = layout(3, &[("a", Active), ("b", Active)], &[]);
        let v4 = layout(4, &[("a", Active), ("b", Active)], &[]);
        let all = answers(vec![
            ("a", Ok(status("a", &v4, &[("a", Up, 4), ("b", Up, 3)]))),
            ("b", Ok(status("b", &v3, &[("a", Up, 4), ("b", Up, 3)]))),
        ]);
        assert_eq!(why(judge(&all)), "layout v4 (change 4): b serves v3");
    }

    #[test]
    fn a_member_unreachable_from_the_client_counts_by_what_the_others_heard() {
        let v4 = layout(4, &[("a", Active), ("b", Active), ("c", Active)], &[]);
        let seen = [("a", Up, 4), ("b", Up, 4), ("c", Up, 3)];
        let all = answers(vec![
            ("a", Ok(status("a", &v4, &seen))),
            ("b", Ok(status("b", &v4, &seen))),
            ("c", Err("unreachable".into())),
        ]);
        assert_eq!(why(judge(&all)), "layout v4 (change 4): c serves v3");
        // Believed down by every member that serves v4: not waited for.
        let seen = [("a", Up, 4), ("b", Up, 4), ("c", Down, 3)];
        let all = answers(vec![
            ("a", Ok(status("a", &v4, &seen))),
            ("b", Ok(status("b", &v4, &seen))),
            ("c", Err("unreachable".into())),
        ]);
        let Verdict::Settled(settled) = judge(&all) else {
            panic!("not settled")
        };
        assert_eq!(settled.down, ["c"]);
        assert!(
            settled
                .line()
                .contains("served by the 2 live members; believed down: c")
        );
    }

    #[test]
    fn a_join_is_in_progress_until_the_move_settles() {
        let v2 = layout(2, &[("a", Active), ("b", Active), ("j", Joining)], &[]);
        let mut seen = status("a", &v2, &[("a", Up, 2), ("b", Down, 1), ("j", Up, 2)]);
        seen.moves.push(pb::MoveProgress {
            address: "j".into(),
            keys_moved: 120,
            done_ppm: 400_000,
            eta_ms: 9_000,
            ..Default::default()
        });
        let all = answers(vec![
            ("a", Ok(seen)),
            ("b", Err("unreachable".into())),
            ("j", Ok(status("j", &v2, &[]))),
        ]);
        assert_eq!(
            why(judge(&all)),
            "layout v2, change in progress: change 2; j 40.0% moved (120 keys, ~9s left); b is believed down (the change waits for it)"
        );
        // Finished joining: the old replica sets still get writes.
        let v3 = layout(
            3,
            &[("a", Active), ("b", Active), ("j", Active)],
            &["a", "b"],
        );
        let seen = [("a", Up, 3), ("b", Up, 2), ("j", Up, 3)];
        let all = answers(vec![
            ("a", Ok(status("a", &v3, &seen))),
            ("b", Ok(status("b", &v2, &seen))),
        ]);
        assert_eq!(
            why(judge(&all)),
            "layout v3, change in progress: change 3; settles once every member serves v3; b serves v2"
        );
    }

    #[test]
    fn no_answer_is_waited_for_and_says_why() {
        let all = answers(vec![
            ("a", Err("unreachable (tcp connect error)".into())),
            ("b", Err("no answer within 3000 ms".into())),
        ]);
        assert_eq!(
            why(judge(&all)),
            "no node answered: a: unreachable (tcp connect error); b: no answer within 3000 ms"
        );
    }
}
