#!/usr/bin/env bash
# Starts (or stops) a local DKVS cluster.
#
#   ./startServers.sh            build (release) and start 5 nodes on 127.0.0.1:7001..7005
#   ./startServers.sh 3          start 3 nodes instead (1 to 50)
#   ./startServers.sh stop       stop every node this script started: SIGTERM to all
#                                at once, SIGKILL to any still running after 10 s
#   ./startServers.sh status     show which nodes are running
#   ./startServers.sh help       show this text
#
# Data lives under ./data/node-<port>, logs and pids under ./run/.
# Running it again while nodes are up leaves running nodes alone and starts
# the missing ones. It refuses to start a cluster of another size (or on other
# ports) while nodes of the running one are up: stop that cluster first.
# (Growing a running cluster will be `./startServers.sh add` once the cluster
# has membership changes.) If a node exits while starting, the script shows the
# end of its log at once and exits 1.
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
# The running cluster's size and peer list, written when it starts.
CLUSTER_FILE="$RUN_DIR/cluster"
STOP_GRACE_SECONDS=10
START_DEADLINE_SECONDS=30

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

stop_all() {
  shopt -s nullglob
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
  for pidfile in "$RUN_DIR"/node-*.pid; do
    name=$(basename "$pidfile" .pid)
    pid=$(pid_of "$pidfile")
    if pid_alive "$pid"; then
      echo "$name running, pid $pid"
      running=$((running + 1))
    elif is_zombie "$pid"; then
      echo "$name not running (pid $pid exited; its parent has not reaped it)"
    else
      echo "$name not running"
    fi
  done
  if (( running == 0 )); then
    echo "no DKVS node is running (start a cluster with ./startServers.sh)"
  elif [[ -f "$CLUSTER_FILE" ]]; then
    echo "$running of $(sed -n 's/^nodes=//p' "$CLUSTER_FILE") node(s) running"
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
      echo "Stop it first with ./startServers.sh stop (data is kept), then start the new size."
      echo "(Growing a running cluster will be ./startServers.sh add once the cluster has membership changes.)"
    } >&2
    exit 1
  fi

  # A port taken by something else would make a node exit at once.
  local port name busy=()
  for i in $(seq 1 "$count"); do
    port=$((BASE_PORT + i))
    is_running "$RUN_DIR/node-$port.pid" && continue
    port_in_use "$port" && busy+=("$HOST:$port")
  done
  if (( ${#busy[@]} )); then
    echo "port(s) already in use by another process: ${busy[*]}; nothing started." >&2
    echo "Free them or choose other ports with DKVS_BASE_PORT." >&2
    exit 1
  fi

  if [[ -z "${DKVS_BIN_DIR:-}" ]]; then
    echo "building release binaries (cargo build --release)..."
    cargo build --release --bins --quiet
  fi
  local bins
  bins=$(bin_dir)
  local BIN="$bins/DKVSServer" CLIENT="$bins/DKVSClient"
  if [[ ! -x "$BIN" ]]; then
    echo "no DKVSServer at $BIN" >&2
    exit 1
  fi
  mkdir -p "$RUN_DIR" "$DATA_DIR"
  printf 'nodes=%s\npeers=%s\n' "$count" "$peers" >"$CLUSTER_FILE"

  local flags="$EXTRA_FLAGS"
  if [[ " $flags " != *" --worker-threads"* ]]; then
    local cores
    cores=$(nproc 2>/dev/null || echo 1)
    flags="--worker-threads $(( cores / count > 0 ? cores / count : 1 )) $flags"
  fi

  local commands=() started=()
  for i in $(seq 1 "$count"); do
    port=$((BASE_PORT + i))
    name="node-$port"
    local pidfile="$RUN_DIR/$name.pid"
    local log="$RUN_DIR/$name.log"
    # shellcheck disable=SC2206
    local cmd=("$BIN" --listen "$HOST:$port" --peers "$peers" --data-dir "$DATA_DIR/$name" $flags)
    local printable="" word
    for word in "${cmd[@]}"; do printable+="$(quote "$word") "; done
    printable+=">> $(quote "$log") 2>&1 & echo \$! > $(quote "$pidfile")"
    commands+=("$printable")
    if is_running "$pidfile"; then
      echo "$name already running (pid $(pid_of "$pidfile"))"
      continue
    fi
    LOG_START[$port]=$( { wc -c <"$log"; } 2>/dev/null || echo 0)
    nohup "${cmd[@]}" >>"$log" 2>&1 < /dev/null &
    echo $! >"$pidfile"
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
      if ! pid_alive "$pid"; then
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
      pid=$(pid_of "$RUN_DIR/node-$port.pid")
      if ! pid_alive "$pid"; then
        echo "node-$port exited while starting (pid $pid)" >&2
        log_tail "$port"
        failed+=("$port")
      fi
    done
  fi

  echo
  echo "DKVS cluster: $count node(s), replicas=3 (capped at the node count)"
  printf '%-8s %-18s %-8s %s\n' NODE ADDRESS PID LOG
  for i in $(seq 1 "$count"); do
    port=$((BASE_PORT + i))
    pid=$(pid_of "$RUN_DIR/node-$port.pid")
    pid_alive "$pid" || pid=exited
    printf '%-8s %-18s %-8s %s\n' "$i" "$HOST:$port" "$pid" "${RUN_DIR#"$ROOT"/}/node-$port.log"
  done
  echo
  echo "Restart a node by hand (after e.g. kill -9 <pid>) with its command:"
  for i in $(seq 1 "$count"); do
    echo "  ${commands[$((i - 1))]}"
  done
  cat <<USAGE

Try it:
  $CLIENT PUT mykey "Hello Distributed World"
  $CLIENT GET mykey
  $CLIENT status
  grpcurl -plaintext $HOST:$((BASE_PORT + 1)) list
Stop the cluster:
  ./startServers.sh stop
USAGE
  if [[ "$BASE_PORT" != 7000 || "$count" != 5 ]]; then
    echo "(DKVSClient defaults to 127.0.0.1:7001..7005; it learns the rest from any node that answers, or set DKVS_NODES=$peers)"
  fi
  if (( ${#failed[@]} )); then
    echo >&2
    echo "${#failed[@]} of $count node(s) failed to start (see above). Fix the cause and run ./startServers.sh $count again to start them, or ./startServers.sh stop." >&2
    return 1
  fi
}

case "${1:-5}" in
  stop) stop_all ;;
  status) show_status ;;
  -h|--help|help) usage ;;
  *) start_all "${1:-5}" ;;
esac
