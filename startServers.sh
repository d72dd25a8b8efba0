#!/usr/bin/env bash
# Starts (or stops) a local DKVS cluster.
#
#   ./startServers.sh            build (release) and start 5 nodes on 127.0.0.1:7001..7005
#   ./startServers.sh 3          start 3 nodes instead (1 to 50)
#   ./startServers.sh --secure   (or 3 --secure) start a secure cluster: TLS between
#                                everyone and client tokens. Makes, under ./run/secure/,
#                                a CA (ca.pem), one certificate per node (DKVSClient
#                                certs), three tokens (read.token, readwrite.token,
#                                admin.token) and the auth file `tokens` every node
#                                gets; prints the DKVSClient and grpcurl commands that
#                                work against it. The data remembers it: later runs
#                                and `add` keep TLS (and make the added node's
#                                certificate). To go back to plaintext, stop the
#                                cluster and remove its data.
#   ./startServers.sh add        start one more node that joins the running cluster
#                                (DKVSServer --join), on the next free port after the
#                                highest one the script uses; prints its restart command
#   ./startServers.sh add --replace ADDR
#                                the same, taking the place of the dead member ADDR
#                                (DKVSServer --replace: it gets ADDR's ranges; ADDR is
#                                removed in the same change and not started again)
#   ./startServers.sh stop       stop every node this script started, added ones too:
#                                SIGTERM to all at once, SIGKILL to any still running
#                                after 10 s
#   ./startServers.sh status     show which nodes are running
#   ./startServers.sh help       show this text
#
# Data lives under ./data/node-<port>, logs and pids under ./run/.
# Running it again while nodes are up leaves running nodes alone and starts
# the missing ones, added nodes included (./data/added-nodes lists their
# ports; they belong to that data). It refuses to start a cluster of another
# size (or on other ports) while nodes of the running one are up: stop that
# cluster first, or grow it with `add`. `add` first waits (up to 10 minutes,
# showing progress) for a layout change in progress to end, since the cluster
# makes one change at a time. If a node exits while starting, the script shows
# the end of its log at once and exits 1.
#
# A node that left (DKVSClient cluster leave) or was removed (cluster remove)
# exits 0 and says so; the script then lists its port in ./data/gone-nodes
# and neither starts it again nor counts it as failed (`status` shows it as
# gone). To bring that machine back, grow the cluster with `add`.
#
# Binaries are built with `cargo build --release` into cargo's target directory
# (CARGO_TARGET_DIR or build.target-dir are honoured; the script asks cargo).
#
# Environment:
#   DKVS_SERVER_FLAGS  extra flags for every node (e.g. "--fsync always"). The
#                      nodes share this machine's cores, so each gets
#                      --worker-threads cores/nodes (at least 1) unless these
#                      flags set it.
#   DKVS_BASE_PORT     nodes listen on base+1, base+2, ... (default 7000)
#   DKVS_HTTP_OFFSET   each node also serves HTTP (/metrics, /health/live,
#                      /health/ready) on its port plus this: 7001 -> 8001
#                      (default 1000; 0 turns HTTP off)
#   DKVS_RESP_OFFSET   each node also speaks the Redis protocol (redis-cli,
#                      nc) on its port plus this: 7001 -> 9001 (default 2000;
#                      0 turns RESP off)
#   DKVS_RUN_DIR       pid files and logs (default ./run)
#   DKVS_DATA_DIR      node data directories (default ./data)
#   DKVS_BIN_DIR       use DKVSServer and DKVSClient from this directory and
#                      build nothing
set -euo pipefail

cd "$(dirname "$0")"
ROOT=$(pwd)
RUN_DIR=${DKVS_RUN_DIR:-$ROOT/run}
DATA_DIR=${DKVS_DATA_DIR:-$ROOT/data}
HOST=127.0.0.1
BASE_PORT=${DKVS_BASE_PORT:-7000}
EXTRA_FLAGS=${DKVS_SERVER_FLAGS:-}
HTTP_OFFSET=${DKVS_HTTP_OFFSET:-1000}
RESP_OFFSET=${DKVS_RESP_OFFSET:-2000}
# The running cluster's size and peer list, written when it starts.
CLUSTER_FILE="$RUN_DIR/cluster"
# Ports of the nodes `add` started, one a line: kept with the data (the
# nodes are members of the layout stored there), so a later start restarts
# them too.
ADDED_FILE="$DATA_DIR/added-nodes"
# Ports of the nodes that left or were removed from the cluster, one a line:
# kept with the data (their data dirs must not serve again).
GONE_FILE="$DATA_DIR/gone-nodes"
# The cluster token (--cluster-token): made for each fresh cluster, kept
# here so that restarts reuse it.
TOKEN_FILE="$RUN_DIR/cluster-token"
# A secure cluster's CA, node certificates, tokens and auth file.
SECURE_DIR="$RUN_DIR/secure"
# Kept with the data: its cluster was started with --secure, so every later
# start and `add` uses TLS and tokens too (a plaintext node could not talk
# to the others).
SECURE_MARKER="$DATA_DIR/secure-cluster"
# 1 once this run serves the cluster with TLS and tokens; SECURE_ASKED is
# whether --secure was given.
SECURE=0
SECURE_ASKED=0
STOP_GRACE_SECONDS=10
START_DEADLINE_SECONDS=30
# How long `add` waits for a joining node to be added and to serve, and for
# a change in progress to end before it adds one.
JOIN_DEADLINE_SECONDS=60
CHANGE_WAIT_SECONDS=600

usage() { # the comment block at the top of this file, however long it grows
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

quote() { # word -> the word, single-quoted when it has shell-special characters
  if [[ "$1" =~ ^[A-Za-z0-9_./:,=+@-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# The directory holding the release binaries: DKVS_BIN_DIR, or cargo's own
# answer (it knows about CARGO_TARGET_DIR and .cargo/config.toml).
bin_dir() {
  if [[ -n "${DKVS_BIN_DIR:-}" ]]; then
    printf '%s\n' "$DKVS_BIN_DIR"
    return
  fi
  local metadata target
  metadata=$(cargo metadata --format-version 1 --no-deps)
  if command -v python3 >/dev/null 2>&1; then
    target=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' <<<"$metadata")
  else
    target=$(sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p' <<<"$metadata")
  fi
  if [[ -z "$target" ]]; then
    echo "cannot find cargo's target directory in 'cargo metadata'" >&2
    exit 1
  fi
  printf '%s\n' "$target/release"
}

# A pid is a live node when it exists, is not a zombie (a process that has
# exited but that its parent has not reaped yet: kill -0 still succeeds on it)
# and, where /proc says, is a DKVSServer (not an unrelated process that was
# given a recycled pid).
# Like pid_alive, for a node this script has just launched: until the
# forked shell has exec'd DKVSServer, its name is still the script's, or
# nohup's in between (a loaded machine can take a while), and that is a
# node starting, not one that exited.
pid_starting_or_alive() { # pid
  local pid=$1 comm
  pid_alive "$pid" && return 0
  [[ -r "/proc/$pid/comm" ]] || return 1
  read -r comm 2>/dev/null <"/proc/$pid/comm" || return 1
  [[ "$comm" == startServers.sh || "$comm" == bash || "$comm" == nohup ]] || return 1
  local stat state
  read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
  state=${stat##*) }
  state=${state%% *}
  [[ "$state" != Z && "$state" != X ]]
}

pid_alive() { # pid
  local pid=$1 stat state comm
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  if [[ -r "/proc/$pid/stat" ]]; then
    read -r stat 2>/dev/null <"/proc/$pid/stat" || return 1
    state=${stat##*) }   # the field after "(comm)"; comm may hold spaces
    state=${state%% *}
    [[ "$state" != Z && "$state" != X ]] || return 1
    read -r comm 2>/dev/null <"/proc/$pid/comm" || return 1
    [[ "$comm" == DKVSServer ]] || return 1
  else
    state=$(ps -o stat= -p "$pid" 2>/dev/null) || return 1
    [[ "$state" != Z* ]] || return 1
  fi
}

pid_of() { # pidfile -> its pid (empty if missing)
  [[ -f "$1" ]] && cat "$1" 2>/dev/null || true
}

is_running() { # pidfile
  pid_alive "$(pid_of "$1")"
}

is_zombie() { # pid
  [[ -r "/proc/$1/stat" ]] || return 1
  local stat
  read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
  stat=${stat##*) }
  [[ "${stat%% *}" == Z ]]
}

port_in_use() { # port -> 0 when something accepts connections on it
  (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null
}

# Where each started node's log was when it started (logs are appended to).
declare -A LOG_START=()

log_tail() { # port -> the end of what the node logged since this start
  local log="$RUN_DIR/node-$1.log"
  echo "--- last lines of $log:" >&2
  tail -c +"$(( ${LOG_START[$1]:-0} + 1 ))" "$log" 2>/dev/null | tail -n 10 >&2 || true
  echo "---" >&2
}

# What a node that left or was removed logged when it stopped ("this node
# left the cluster ..."), or nothing.
gone_notice() { # port
  tail -n 40 "$RUN_DIR/node-$1.log" 2>/dev/null \
    | grep -o "this node[^\"]*wipe its data dir and --join again" | tail -n 1 || true
}

is_gone() { # port
  [[ -f "$GONE_FILE" ]] && grep -qx "$1" "$GONE_FILE"
}

mark_gone() { # port
  is_gone "$1" || echo "$1" >>"$GONE_FILE"
}

# The addresses of the script's nodes that are running, comma-separated.
running_seeds() {
  shopt -s nullglob
  local pidfile port seeds=""
  for pidfile in "$RUN_DIR"/node-*.pid; do
    port=${pidfile##*/node-}
    port=${port%.pid}
    is_running "$pidfile" && seeds+="${seeds:+,}$HOST:$port"
  done
  printf '%s\n' "$seeds"
}

# Marks gone the script's nodes that the running cluster lists as removed
# (their data dirs hold the removed instance): a member removed while it was
# down never got to say so itself.
sync_removed() { # seeds
  [[ -n "$1" && -x "${CLIENT:-}" ]] || return 0
  local port
  while read -r port; do
    [[ -n "$port" && -d "$DATA_DIR/node-$port" ]] && mark_gone "$port"
  done < <(client --nodes "$1" --timeout-ms 2000 status 2>/dev/null \
    | sed -n "s/^removed: $HOST:\([0-9]*\) .*/\1/p")
}

# sync_removed with the binaries already built (status and stop build
# nothing), while nodes run.
sync_removed_if_built() {
  if [[ -n "${DKVS_BIN_DIR:-}" || -x "$ROOT/target/release/DKVSClient" ]]; then
    local CLIENT
    CLIENT="$(bin_dir)/DKVSClient"
    [[ -f "$SECURE_MARKER" ]] && SECURE=1
    sync_removed "$(running_seeds)"
  fi
}

stop_all() {
  shopt -s nullglob
  # Members removed while down: learnt now, while the cluster can say so.
  sync_removed_if_built
  local pidfiles=() pids=() names=() pidfile pid
  for pidfile in "$RUN_DIR"/node-*.pid; do
    pid=$(pid_of "$pidfile")
    if pid_alive "$pid"; then
      pidfiles+=("$pidfile")
      pids+=("$pid")
      names+=("$(basename "$pidfile" .pid)")
    else
      rm -f "$pidfile"
    fi
  done
  # SIGTERM to every node first, then one deadline for all of them: the nodes
  # drain at the same time, so stopping 5 takes as long as the slowest one.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + STOP_GRACE_SECONDS)) left i
  while :; do
    left=0
    for i in "${!pids[@]}"; do
      if pid_alive "${pids[$i]}"; then left=1; else rm -f "${pidfiles[$i]}"; fi
    done
    (( left && SECONDS < deadline )) || break
    sleep 0.05
  done
  local killed=()
  for i in "${!pids[@]}"; do
    if pid_alive "${pids[$i]}"; then
      echo "${names[$i]} did not stop in ${STOP_GRACE_SECONDS} s; sending SIGKILL"
      kill -KILL "${pids[$i]}" 2>/dev/null || true
      killed+=("$i")
    fi
  done
  for i in "${killed[@]}"; do
    for _ in $(seq 1 40); do pid_alive "${pids[$i]}" || break; sleep 0.05; done
    rm -f "${pidfiles[$i]}"
  done
  rm -f "$CLUSTER_FILE"
  echo "stopped ${#pids[@]} node(s); data kept in $DATA_DIR (remove it for a fresh cluster)"
}

show_status() {
  shopt -s nullglob
  local running=0 pidfile name pid
  sync_removed_if_built
  for pidfile in "$RUN_DIR"/node-*.pid; do
    name=$(basename "$pidfile" .pid)
    pid=$(pid_of "$pidfile")
    if pid_alive "$pid"; then
      echo "$name running, pid $pid"
      running=$((running + 1))
    elif [[ -n "$(gone_notice "${name#node-}")" ]] || is_gone "${name#node-}"; then
      [[ -d "$DATA_DIR" ]] && mark_gone "${name#node-}"
      echo "$name gone: it left or was removed from the cluster (not started again)"
    elif is_zombie "$pid"; then
      echo "$name not running (pid $pid exited; its parent has not reaped it)"
    else
      echo "$name not running"
    fi
  done
  if (( running == 0 )); then
    echo "no DKVS node is running (start a cluster with ./startServers.sh)"
  elif [[ -f "$CLUSTER_FILE" ]]; then
    local gone=0
    [[ -f "$GONE_FILE" ]] && gone=$(grep -cE '^[0-9]+$' "$GONE_FILE" || true)
    echo "$running of $(( $(sed -n 's/^nodes=//p' "$CLUSTER_FILE") + $(added_ports | wc -l) - gone )) node(s) running$( (( gone )) && echo " ($gone gone: left or removed)")"
  fi
  if (( running )) && [[ -f "$SECURE_MARKER" ]]; then
    echo "secure: TLS and tokens (CA and tokens in $SECURE_DIR)"
  fi
}

# The peer list of the cluster whose nodes are running from $RUN_DIR, or
# nothing when none runs. Read from the record written at start; a run dir
# from before that record existed is answered from a node's command line.
running_peers() {
  shopt -s nullglob
  local pidfile pid any=""
  for pidfile in "$RUN_DIR"/node-*.pid; do
    pid=$(pid_of "$pidfile")
    pid_alive "$pid" && { any=$pid; break; }
  done
  [[ -n "$any" ]] || return 0
  if [[ -f "$CLUSTER_FILE" ]]; then
    sed -n 's/^peers=//p' "$CLUSTER_FILE"
  elif [[ -r "/proc/$any/cmdline" ]]; then
    tr '\0' '\n' <"/proc/$any/cmdline" | sed -n '/^--peers$/{n;p;q}'
  else
    echo unknown
  fi
}

# The ports of the nodes `add` started, one a line, in the order added.
added_ports() {
  [[ -f "$ADDED_FILE" ]] || return 0
  grep -E '^[0-9]+$' "$ADDED_FILE" || true
}

# Prints the --cluster-token flag for the cluster on PORTS: a new random
# token when none of their data dirs holds a layout yet (a fresh cluster:
# so a wiped cluster never shares its id with a node left from the old
# one), else the one kept in $TOKEN_FILE. Data dirs without a kept token
# (made by an older script) get none: their nodes agree on a random id.
cluster_token_flag() { # ports...
  local port fresh=1 token
  for port in "$@"; do
    [[ -e "$DATA_DIR/node-$port/layout" ]] && fresh=0
  done
  if (( fresh )); then
    token=$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')
    printf '%s\n' "$token" >"$TOKEN_FILE"
  elif [[ -s "$TOKEN_FILE" ]]; then
    token=$(head -n1 "$TOKEN_FILE")
  else
    return 0
  fi
  printf -- '--cluster-token %s\n' "$token"
}

# Whether any of the data dirs of PORTS holds a layout (a cluster ran there).
has_layout() { # ports...
  local port
  for port in "$@"; do
    [[ -e "$DATA_DIR/node-$port/layout" ]] && return 0
  done
  return 1
}

# Sets SECURE for a start of the cluster on PORTS: the data's choice when it
# has one (the marker), else --secure. Refuses --secure over the data of a
# plaintext cluster: its nodes would not talk to TLS ones.
choose_security() { # count, ports...
  local count=$1
  shift
  if [[ -f "$SECURE_MARKER" ]]; then
    SECURE=1
  elif (( SECURE_ASKED )); then
    if has_layout "$@" || [[ -n "$(running_peers)" ]]; then
      {
        echo "the data in $DATA_DIR belongs to a plaintext cluster (started without --secure): nothing started."
        echo "Start it as it is with ./startServers.sh $count, or for a secure cluster stop it"
        echo "(./startServers.sh stop), remove $DATA_DIR, and run ./startServers.sh $count --secure."
      } >&2
      exit 1
    fi
    SECURE=1
  fi
}

# The certificate of the node on PORT (SUFFIX -key: its key), as
# `DKVSClient certs` names it.
node_cert() { # port [suffix]
  printf '%s\n' "$SECURE_DIR/node-$HOST-$1${2:-}.pem"
}

# Makes what a secure cluster on PORTS needs and does not have yet in
# SECURE_DIR: the CA, each node's certificate (DKVSClient certs), the three
# tokens (32 random hex digits each, one per role) and the auth file. A new
# CA gets new node certificates too: the old ones would not chain to it.
# CLIENT must be set.
ensure_secure_files() { # ports...
  (umask 077 && mkdir -p "$SECURE_DIR")
  local port nodes=() force=()
  [[ -f "$SECURE_DIR/ca.pem" ]] || force=(--force)
  for port in "$@"; do
    if (( ${#force[@]} )) || [[ ! -f "$(node_cert "$port")" || ! -f "$(node_cert "$port" -key)" ]]; then
      nodes+=(--node "$HOST:$port")
    fi
  done
  if [[ ! -f "$SECURE_DIR/ca.pem" ]] || (( ${#nodes[@]} )); then
    if ! "$CLIENT" certs --dir "$SECURE_DIR" "${nodes[@]}" "${force[@]}" | sed 's/^/  /'; then
      echo "could not make the certificates in $SECURE_DIR (see above); nothing started" >&2
      exit 1
    fi
  fi
  local role made=0
  for role in read readwrite admin; do
    if [[ ! -s "$SECURE_DIR/$role.token" ]]; then
      (umask 077 && od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$SECURE_DIR/$role.token" &&
        echo >>"$SECURE_DIR/$role.token")
      made=1
    fi
  done
  if (( made )) || [[ ! -s "$SECURE_DIR/tokens" ]]; then
    # Written next to it and renamed: nodes reread it while they run.
    (
      umask 077
      {
        echo "# <token> <role>: the tokens of the cluster ./startServers.sh --secure started"
        for role in read readwrite admin; do
          printf '%s %s\n' "$(head -n1 "$SECURE_DIR/$role.token")" "$role"
        done
      } >"$SECURE_DIR/tokens.new" && mv -f "$SECURE_DIR/tokens.new" "$SECURE_DIR/tokens"
    )
  fi
}

# Runs DKVSClient against this cluster: with its CA and the admin token
# when it is secure, and never with the caller's DKVS_TLS_CA or DKVS_TOKEN*
# (meant for some other cluster).
client() { # DKVSClient arguments...
  local security=()
  if (( SECURE )); then
    security=(--tls-ca "$SECURE_DIR/ca.pem" --token-file "$SECURE_DIR/admin.token")
  fi
  env -u DKVS_TLS_CA -u DKVS_TOKEN -u DKVS_TOKEN_FILE "$CLIENT" "${security[@]}" "$@"
}

# The flags every node gets: DKVS_SERVER_FLAGS, and --worker-threads
# cores/nodes (at least 1) unless those set it.
node_flags() { # node count
  local flags="$EXTRA_FLAGS" cores
  if [[ " $flags " != *" --worker-threads"* ]]; then
    cores=$(nproc 2>/dev/null || echo 1)
    flags="--worker-threads $(( cores / $1 > 0 ? cores / $1 : 1 )) $flags"
  fi
  printf '%s\n' "$flags"
}

# Sets CMD to the command line of the node on PORT, and PRINTABLE to it as
# a shell line that appends to its log and writes its pid file (what the
# script prints for restarting it by hand). BIN must be set.
node_command() { # port, --peers or --join, addresses, flags
  local port=$1 name="node-$1" word
  # shellcheck disable=SC2206
  CMD=("$BIN" --listen "$HOST:$port" "$2" "$3" --data-dir "$DATA_DIR/$name" $4)
  if (( HTTP_OFFSET > 0 )); then
    CMD+=(--http-listen "$HOST:$((port + HTTP_OFFSET))")
  fi
  if (( RESP_OFFSET > 0 )); then
    CMD+=(--resp-listen "$HOST:$((port + RESP_OFFSET))")
  fi
  if (( SECURE )); then
    CMD+=(--tls-cert "$(node_cert "$port")" --tls-key "$(node_cert "$port" -key)"
      --tls-ca "$SECURE_DIR/ca.pem" --auth-file "$SECURE_DIR/tokens")
  fi
  PRINTABLE=""
  for word in "${CMD[@]}"; do PRINTABLE+="$(quote "$word") "; done
  PRINTABLE+=">> $(quote "$RUN_DIR/$name.log") 2>&1 & echo \$! > $(quote "$RUN_DIR/$name.pid")"
}

# Starts CMD in the background for the node on PORT: output appended to its
# log, its pid in its pid file.
launch() { # port
  local log="$RUN_DIR/node-$1.log"
  LOG_START[$1]=$( { wc -c <"$log"; } 2>/dev/null || echo 0)
  nohup "${CMD[@]}" >>"$log" 2>&1 < /dev/null &
  echo $! >"$RUN_DIR/node-$1.pid"
}

# Builds the release binaries unless DKVS_BIN_DIR names them; sets BIN and
# CLIENT.
find_binaries() {
  if [[ -z "${DKVS_BIN_DIR:-}" ]]; then
    echo "building release binaries (cargo build --release)..."
    cargo build --release --bins --quiet
  fi
  local bins
  bins=$(bin_dir)
  BIN="$bins/DKVSServer"
  CLIENT="$bins/DKVSClient"
  if [[ ! -x "$BIN" ]]; then
    echo "no DKVSServer at $BIN" >&2
    exit 1
  fi
}

start_all() {
  local count=$1
  if ! [[ "$count" =~ ^[0-9]+$ ]] || (( count < 1 || count > 50 )); then
    echo "node count must be a number from 1 to 50, got '$count' (see ./startServers.sh help)" >&2
    exit 2
  fi

  local peers=""
  for i in $(seq 1 "$count"); do
    peers+="${peers:+,}$HOST:$((BASE_PORT + i))"
  done

  # Starting a different cluster next to a running one would split it: the
  # new nodes would hash keys on another ring than the running ones.
  local running
  running=$(running_peers)
  if [[ -n "$running" && "$running" != "$peers" ]]; then
    local size=unknown
    [[ "$running" != unknown ]] && size=$(tr ',' '\n' <<<"$running" | wc -l | tr -d ' ')
    {
      echo "a cluster of $size node(s) is already running from $RUN_DIR ($running);"
      echo "refusing to start $count node(s) ($peers): the two would place keys on different rings."
      echo "Stop it first with ./startServers.sh stop (data is kept), then start the new size,"
      echo "or grow the running cluster one node at a time with ./startServers.sh add."
    } >&2
    exit 1
  fi

  # The cluster's own nodes, then the ones `add` started earlier (members of
  # the layout stored in the data).
  local ports=() added=() port
  for i in $(seq 1 "$count"); do ports+=("$((BASE_PORT + i))"); done
  while read -r port; do
    if [[ " ${ports[*]} " != *" $port "* ]]; then
      ports+=("$port")
      added+=("$port")
    fi
  done < <(added_ports)

  # A port taken by something else would make a node exit at once.
  local name busy=()
  for port in "${ports[@]}"; do
    is_running "$RUN_DIR/node-$port.pid" && continue
    port_in_use "$port" && busy+=("$HOST:$port")
    (( HTTP_OFFSET > 0 )) && port_in_use "$((port + HTTP_OFFSET))" && busy+=("$HOST:$((port + HTTP_OFFSET)) (HTTP)")
    (( RESP_OFFSET > 0 )) && port_in_use "$((port + RESP_OFFSET))" && busy+=("$HOST:$((port + RESP_OFFSET)) (RESP)")
  done
  if (( ${#busy[@]} )); then
    echo "port(s) already in use by another process: ${busy[*]}; nothing started." >&2
    echo "Free them or choose other ports with DKVS_BASE_PORT (and DKVS_HTTP_OFFSET, DKVS_RESP_OFFSET)." >&2
    exit 1
  fi

  choose_security "$count" "${ports[@]}"

  local BIN CLIENT
  find_binaries
  mkdir -p "$RUN_DIR" "$DATA_DIR"
  if (( SECURE )); then
    ensure_secure_files "${ports[@]}"
    printf '%s\n' "This data belongs to a cluster started with ./startServers.sh --secure: its nodes use TLS and tokens (files in $SECURE_DIR). Remove this data to go back to plaintext." >"$SECURE_MARKER"
  fi
  printf 'nodes=%s\npeers=%s\n' "$count" "$peers" >"$CLUSTER_FILE"

  local flags first_ports=()
  flags=$(node_flags "${#ports[@]}")
  for i in $(seq 1 "$count"); do first_ports+=("$((BASE_PORT + i))"); done
  flags="$flags $(cluster_token_flag "${first_ports[@]}")"

  sync_removed "$(running_seeds)"
  local commands=() started=()
  for port in "${ports[@]}"; do
    name="node-$port"
    if [[ " ${added[*]} " == *" $port "* ]]; then
      # --join is ignored once its data dir holds the layout.
      node_command "$port" --join "$peers" "$flags"
    else
      node_command "$port" --peers "$peers" "$flags"
    fi
    commands+=("$PRINTABLE")
    if ! is_running "$RUN_DIR/$name.pid" && [[ -d "$DATA_DIR/$name" ]] \
      && { is_gone "$port" || [[ -n "$(gone_notice "$port")" ]]; }; then
      mark_gone "$port"
      echo "$name left or was removed from the cluster: not started (grow the cluster with ./startServers.sh add instead)"
      continue
    fi
    if is_running "$RUN_DIR/$name.pid"; then
      echo "$name already running (pid $(pid_of "$RUN_DIR/$name.pid"))"
      continue
    fi
    launch "$port"
    started+=("$port")
  done

  # Wait for every started node at once: ready when its port accepts
  # connections, failed as soon as its process is gone.
  local failed=() pending=("${started[@]}") next pid
  local deadline=$((SECONDS + START_DEADLINE_SECONDS))
  while (( ${#pending[@]} )); do
    next=()
    for port in "${pending[@]}"; do
      pid=$(pid_of "$RUN_DIR/node-$port.pid")
      if ! pid_starting_or_alive "$pid" && [[ -n "$(gone_notice "$port")" ]]; then
        mark_gone "$port"
        echo "node-$port exited: $(gone_notice "$port")"
      elif ! pid_starting_or_alive "$pid"; then
        echo "node-$port exited while starting (pid $pid)" >&2
        log_tail "$port"
        failed+=("$port")
      elif ! port_in_use "$port"; then
        next+=("$port")
      fi
    done
    pending=("${next[@]}")
    (( ${#pending[@]} )) || break
    if (( SECONDS >= deadline )); then
      for port in "${pending[@]}"; do
        echo "node-$port did not start listening within ${START_DEADLINE_SECONDS} s" >&2
        log_tail "$port"
        failed+=("$port")
      done
      break
    fi
    sleep 0.05
  done
  # A node listens before it opens its data dir, so one that cannot open it
  # exits just after its port answered.
  if (( ${#started[@]} )); then
    sleep 0.2
    for port in "${started[@]}"; do
      [[ " ${failed[*]} " == *" $port "* ]] && continue
      is_gone "$port" && continue
      pid=$(pid_of "$RUN_DIR/node-$port.pid")
      if ! pid_alive "$pid" && [[ -n "$(gone_notice "$port")" ]]; then
        mark_gone "$port"
        echo "node-$port exited: $(gone_notice "$port")"
      elif ! pid_alive "$pid"; then
        echo "node-$port exited while starting (pid $pid)" >&2
        log_tail "$port"
        failed+=("$port")
      fi
    done
  fi

  echo
  if (( ${#added[@]} )); then
    echo "DKVS cluster: $count node(s) and ${#added[@]} added with ./startServers.sh add, replicas=3 (capped at the node count)"
  else
    echo "DKVS cluster: $count node(s), replicas=3 (capped at the node count)"
  fi
  printf '%-8s %-18s %-8s %s\n' NODE ADDRESS PID LOG
  local i
  for i in "${!ports[@]}"; do
    port=${ports[$i]}
    pid=$(pid_of "$RUN_DIR/node-$port.pid")
    pid_alive "$pid" || pid=exited
    is_gone "$port" && pid=gone
    printf '%-8s %-18s %-8s %s\n' "$((i + 1))" "$HOST:$port" "$pid" "${RUN_DIR#"$ROOT"/}/node-$port.log"
  done
  echo
  echo "Restart a node by hand (after e.g. kill -9 <pid>) with its command:"
  for i in "${!ports[@]}"; do
    is_gone "${ports[$i]}" || echo "  ${commands[$i]}"
  done
  if (( SECURE )); then
    secure_usage
  else
    cat <<USAGE

Try it:
  $CLIENT PUT mykey "Hello Distributed World"
  $CLIENT GET mykey
  $CLIENT status
  grpcurl -plaintext $HOST:$((BASE_PORT + 1)) list
USAGE
    if (( HTTP_OFFSET > 0 )); then
      echo "  curl $HOST:$((BASE_PORT + 1 + HTTP_OFFSET))/metrics    (and /health/ready; deploy/prometheus/ scrapes them all)"
    fi
    if (( RESP_OFFSET > 0 )); then
      echo "  redis-cli -u redis://$HOST:$((BASE_PORT + 1 + RESP_OFFSET))    (the Redis protocol; nc works too: SET a 10, GET a)"
    fi
    cat <<USAGE
Grow it by one node:
  ./startServers.sh add
Stop the cluster:
  ./startServers.sh stop
USAGE
  fi
  if [[ "$BASE_PORT" != 7000 || "$count" != 5 ]]; then
    echo "(DKVSClient defaults to 127.0.0.1:7001..7005; it learns the rest from any node that answers, or set DKVS_NODES=$peers)"
  fi
  if (( ${#failed[@]} )); then
    echo >&2
    echo "${#failed[@]} of ${#ports[@]} node(s) failed to start (see above). Fix the cause and run ./startServers.sh $count again to start them, or ./startServers.sh stop." >&2
    return 1
  fi
}

# How to use a secure cluster: the commands with its CA and tokens.
secure_usage() {
  local ca token env address=$HOST:$((BASE_PORT + 1))
  ca=$(quote "$SECURE_DIR/ca.pem")
  token=$(quote "$SECURE_DIR/readwrite.token")
  env="DKVS_TLS_CA=$ca DKVS_TOKEN_FILE=$token $(quote "$CLIENT")"
  cat <<USAGE

Secure: TLS with the CA $ca, and a token per role in $(quote "$SECURE_DIR")/
(read.token, readwrite.token, admin.token; the nodes' auth file is tokens there).
Try it (the readwrite token; membership changes need admin.token):
  $env PUT mykey "Hello Distributed World"
  $env GET mykey
  $env status
  grpcurl --cacert $ca $address list
  grpcurl --cacert $ca -H "authorization: Bearer \$(cat $token)" -d '{"key":"mykey"}' $address dkvs.v1.KeyValue/Get
Grow it by one node (with its own certificate):
  ./startServers.sh add
Stop the cluster:
  ./startServers.sh stop
USAGE
}

# One more node that joins the running cluster (see the usage at the top).
add_node() {
  local peers
  peers=$(running_peers)
  if [[ -z "$peers" ]]; then
    echo "no DKVS cluster is running from $RUN_DIR: start one with ./startServers.sh, then add nodes to it" >&2
    exit 1
  fi
  # The seeds are the nodes running now; the new port is the next free one
  # after the highest the script uses (pid files, the cluster's peers, nodes
  # added before).
  shopt -s nullglob
  local seeds="" highest=0 port pidfile address running=0
  for pidfile in "$RUN_DIR"/node-*.pid; do
    port=${pidfile##*/node-}
    port=${port%.pid}
    [[ "$port" =~ ^[0-9]+$ ]] || continue
    if (( port > highest )); then highest=$port; fi
    if is_running "$pidfile"; then
      seeds+="${seeds:+,}$HOST:$port"
      running=$((running + 1))
    fi
  done
  for address in ${peers//,/ } $(added_ports); do
    port=${address##*:}
    if [[ "$port" =~ ^[0-9]+$ ]] && (( port > highest )); then highest=$port; fi
  done
  port=$((highest + 1))
  while port_in_use "$port"; do
    port=$((port + 1))
    if (( port > highest + 100 || port > 65535 )); then
      echo "no free port in the 100 after $highest; nothing added" >&2
      exit 1
    fi
  done
  local name="node-$port"
  if [[ -n "$(ls -A "$DATA_DIR/$name" 2>/dev/null)" ]]; then
    echo "$DATA_DIR/$name already holds data (from an earlier cluster?): a joining node needs an empty data dir. Remove it and run ./startServers.sh add again; nothing added." >&2
    exit 1
  fi

  if [[ -f "$SECURE_MARKER" ]]; then
    SECURE=1
    if [[ ! -f "$SECURE_DIR/ca.pem" || ! -f "$SECURE_DIR/ca-key.pem" ]]; then
      echo "the running cluster is secure but its CA is missing from $SECURE_DIR: a new node's certificate cannot be signed. Nothing added; restore it, or stop the cluster and start it again (new certificates and tokens)." >&2
      exit 1
    fi
  elif (( SECURE_ASKED )); then
    echo "the running cluster is plaintext (started without --secure): a secure node could not join it. Nothing added; run ./startServers.sh add without --secure." >&2
    exit 1
  fi

  local BIN CLIENT
  find_binaries
  # The cluster makes one change at a time: let one in progress end first.
  if ! client --nodes "$seeds" cluster wait --timeout-secs 1 >/dev/null 2>&1; then
    echo "a layout change is in progress (one at a time): waiting up to ${CHANGE_WAIT_SECONDS} s for it to end before adding a node (Ctrl-C gives up)" >&2
    if ! client --nodes "$seeds" cluster wait --timeout-secs "$CHANGE_WAIT_SECONDS" >&2; then
      echo "the change did not end within ${CHANGE_WAIT_SECONDS} s: nothing added. See $CLIENT status" >&2
      exit 1
    fi
  fi

  mkdir -p "$RUN_DIR" "$DATA_DIR"
  if (( SECURE )); then ensure_secure_files "$port"; fi
  local flags
  flags=$(node_flags $((running + 1)))
  # The joiner names the cluster it joins (a seed of another refuses).
  if [[ -s "$TOKEN_FILE" ]]; then
    flags="$flags --cluster-token $(head -n1 "$TOKEN_FILE")"
  fi
  if [[ -n "$REPLACE" ]]; then
    flags="$flags --replace $REPLACE"
  fi
  node_command "$port" --join "$seeds" "$flags"
  launch "$port"
  local pid
  pid=$(pid_of "$RUN_DIR/$name.pid")
  # It listens at once, and answers only once the cluster has added it.
  local deadline=$((SECONDS + JOIN_DEADLINE_SECONDS))
  until client --nodes "$HOST:$port" --timeout-ms 1000 status >/dev/null 2>&1; do
    if ! pid_alive "$pid"; then
      echo "$name exited while joining (pid $pid); nothing added" >&2
      log_tail "$port"
      exit 1
    fi
    if (( SECONDS >= deadline )); then
      echo "$HOST:$port did not answer within ${JOIN_DEADLINE_SECONDS} s of asking to join; it still runs (pid $pid, log $RUN_DIR/$name.log); ./startServers.sh stop stops it" >&2
      echo "$port" >>"$ADDED_FILE"
      exit 1
    fi
    sleep 0.2
  done
  echo "$port" >>"$ADDED_FILE"
  # The member it replaced is removed: not started again.
  if [[ -n "$REPLACE" && "${REPLACE%:*}" == "$HOST" && -d "$DATA_DIR/node-${REPLACE##*:}" ]]; then
    mark_gone "${REPLACE##*:}"
  fi

  local members
  members=$(( $(tr ',' '\n' <<<"$peers" | wc -l) + $(added_ports | wc -l) ))
  if [[ -n "$REPLACE" ]]; then
    echo "$name takes the place of $REPLACE (through $seeds): it receives $REPLACE's ranges from their other replicas, then serves reads; $REPLACE is removed."
  else
    echo "$name joins the cluster (through $seeds): it receives the data of the ranges it will own, then serves reads."
  fi
  printf '%-8s %-18s %-8s %s\n' NODE ADDRESS PID LOG
  printf '%-8s %-18s %-8s %s\n' "$members" "$HOST:$port" "$pid" "${RUN_DIR#"$ROOT"/}/$name.log"
  echo
  echo "Restart it by hand (after e.g. kill -9 <pid>) with its command (--join is ignored once its data dir holds the layout):"
  echo "  $PRINTABLE"
  local client_line=$CLIENT
  if (( SECURE )); then
    client_line="DKVS_TLS_CA=$(quote "$SECURE_DIR/ca.pem") DKVS_TOKEN_FILE=$(quote "$SECURE_DIR/admin.token") $(quote "$CLIENT")"
  fi
  cat <<USAGE

Follow the join:
  $client_line status
  $client_line cluster wait      # exits 0 once it is over
./startServers.sh stop stops it with the others.
USAGE
}

# --secure may come before or after the command; `add` takes --replace ADDR.
ARGS=()
REPLACE=""
while (( $# )); do
  case "$1" in
    --secure) SECURE_ASKED=1 ;;
    --replace)
      if [[ -z "${2:-}" ]]; then
        echo "--replace needs the dead member's address, e.g. add --replace $HOST:$((BASE_PORT + 3))" >&2
        exit 2
      fi
      REPLACE=$2
      shift ;;
    *) ARGS+=("$1") ;;
  esac
  shift
done
if [[ -n "$REPLACE" && "${ARGS[0]:-}" != add ]]; then
  echo "--replace goes with add: ./startServers.sh add --replace ADDR" >&2
  exit 2
fi
if (( ${#ARGS[@]} > 1 )); then
  echo "unexpected argument '${ARGS[1]}' (see ./startServers.sh help)" >&2
  exit 2
fi
case "${ARGS[0]:-5}" in
  stop) stop_all ;;
  status) show_status ;;
  add) add_node ;;
  -h|--help|help) usage ;;
  *) start_all "${ARGS[0]:-5}" ;;
esac
