#!/usr/bin/env bash
# Starts (or stops) a local DKVS cluster.
#
#   ./startServers.sh            build (release) and start 5 nodes on 127.0.0.1:7001..7005
#   ./startServers.sh 3          start 3 nodes instead
#   ./startServers.sh stop       stop every node this script started (SIGTERM, then SIGKILL)
#   ./startServers.sh status     show which nodes are running
#
# Data lives under ./data/node-<port>, logs and pids under ./run/.
# Running it again while nodes are up leaves running nodes alone and starts
# the missing ones. Extra flags for every node can be given in DKVS_SERVER_FLAGS
# (e.g. DKVS_SERVER_FLAGS="--fsync always"). The nodes share this machine's
# cores, so each gets --worker-threads cores/nodes (at least 1) unless
# DKVS_SERVER_FLAGS sets it.
set -euo pipefail

cd "$(dirname "$0")"
ROOT=$(pwd)
RUN_DIR="$ROOT/run"
DATA_DIR="$ROOT/data"
BIN="$ROOT/target/release/DKVSServer"
CLIENT="$ROOT/target/release/DKVSClient"
HOST=127.0.0.1
BASE_PORT=${DKVS_BASE_PORT:-7000}
EXTRA_FLAGS=${DKVS_SERVER_FLAGS:-}

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

quote() { # word -> the word, single-quoted when it has shell-special characters
  if [[ "$1" =~ ^[A-Za-z0-9_./:,=+@-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

is_running() { # pidfile
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_all() {
  shopt -s nullglob
  local stopped=0
  for pidfile in "$RUN_DIR"/node-*.pid; do
    local pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      # Wait up to 10 s for a graceful drain, then force it.
      for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
      if kill -0 "$pid" 2>/dev/null; then
        echo "node $(basename "$pidfile" .pid) did not stop in 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
      stopped=$((stopped + 1))
    fi
    rm -f "$pidfile"
  done
  echo "stopped $stopped node(s); data kept in $DATA_DIR (remove it for a fresh cluster)"
}

show_status() {
  shopt -s nullglob
  for pidfile in "$RUN_DIR"/node-*.pid; do
    local name
    name=$(basename "$pidfile" .pid)
    if is_running "$pidfile"; then
      echo "$name running, pid $(cat "$pidfile")"
    else
      echo "$name not running"
    fi
  done
}

wait_for_port() { # port -> 0 when it accepts connections within 30 s
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

start_all() {
  local count=$1
  if ! [[ "$count" =~ ^[0-9]+$ ]] || (( count < 1 || count > 50 )); then
    echo "node count must be a number from 1 to 50, got '$count'" >&2
    exit 2
  fi
  echo "building release binaries (cargo build --release)..."
  cargo build --release --bins --quiet
  mkdir -p "$RUN_DIR" "$DATA_DIR"

  local peers=""
  for i in $(seq 1 "$count"); do
    peers+="${peers:+,}$HOST:$((BASE_PORT + i))"
  done
  local flags="$EXTRA_FLAGS"
  if [[ " $flags " != *" --worker-threads"* ]]; then
    local cores
    cores=$(nproc 2>/dev/null || echo 1)
    flags="--worker-threads $(( cores / count > 0 ? cores / count : 1 )) $flags"
  fi

  local commands=()
  for i in $(seq 1 "$count"); do
    local port=$((BASE_PORT + i))
    local name="node-$port"
    local pidfile="$RUN_DIR/$name.pid"
    local log="$RUN_DIR/$name.log"
    # shellcheck disable=SC2206
    local cmd=("$BIN" --listen "$HOST:$port" --peers "$peers" --data-dir "$DATA_DIR/$name" $flags)
    local printable="" word
    for word in "${cmd[@]}"; do printable+="$(quote "$word") "; done
    printable+=">> $(quote "$log") 2>&1 & echo \$! > $(quote "$pidfile")"
    commands+=("$printable")
    if is_running "$pidfile"; then
      echo "$name already running (pid $(cat "$pidfile"))"
      continue
    fi
    nohup "${cmd[@]}" >>"$log" 2>&1 < /dev/null &
    echo $! >"$pidfile"
  done

  local failed=0
  for i in $(seq 1 "$count"); do
    local port=$((BASE_PORT + i))
    if ! wait_for_port "$port"; then
      echo "node-$port did not start listening within 30 s; see $RUN_DIR/node-$port.log:" >&2
      tail -n 5 "$RUN_DIR/node-$port.log" >&2 || true
      failed=1
    fi
  done

  echo
  echo "DKVS cluster: $count node(s), replicas=3 (capped at the node count)"
  printf '%-8s %-18s %-8s %s\n' NODE ADDRESS PID LOG
  for i in $(seq 1 "$count"); do
    local port=$((BASE_PORT + i))
    printf '%-8s %-18s %-8s %s\n' "$i" "$HOST:$port" "$(cat "$RUN_DIR/node-$port.pid")" "run/node-$port.log"
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
  return $failed
}

case "${1:-5}" in
  stop) stop_all ;;
  status) show_status ;;
  -h|--help|help) usage ;;
  *) start_all "${1:-5}" ;;
esac
