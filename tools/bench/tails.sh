#!/usr/bin/env bash
# Tails under trouble: the same closed-loop load (64 in flight, 100-byte
# values, 10k preloaded keys, QUORUM) on a 3-node cluster
# (--worker-threads 1) over three windows of DURATION seconds each:
#   steady   nothing happens;
#   kill     a quarter in, node 3 is SIGKILLed; half-way, it restarts from
#            its data dir;
#   join     a quarter in, a 4th node joins (and the data moves).
# Prints throughput, p50/p99/max and errors of each window.
#
#   tools/bench/tails.sh                      # any-node routing (--via-node), writes
#   ROUTE=smart WORKLOAD=a tools/bench/tails.sh
#   BIN=/tmp/other/release DURATION=20 tools/bench/tails.sh
#
# Ports BASE_PORT+1..4 (default 7500); data in a temp dir; every process it
# started is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
DURATION=${DURATION:-12}
WORKLOAD=${WORKLOAD:-w}
BASE=${BASE_PORT:-7500}
case ${ROUTE:-via-node} in
  via-node) ROUTE_FLAG=--via-node ;;
  smart) ROUTE_FLAG="" ;;
  *) echo "ROUTE is via-node or smart" >&2; exit 2 ;;
esac
if [[ -z "${BIN:-}" ]]; then
  BIN=target/release
  cargo build --release --bins --quiet
fi
NODES="127.0.0.1:$((BASE+1)),127.0.0.1:$((BASE+2)),127.0.0.1:$((BASE+3))"
FLAGS="--worker-threads 1"
WORK=$(mktemp -d)
declare -A PID
cleanup() {
  for pid in "${PID[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

start() { # node number, extra flags...
  local i=$1; shift
  # shellcheck disable=SC2086
  "$BIN/DKVSServer" --listen "127.0.0.1:$((BASE+i))" --data-dir "$WORK/n$i" $FLAGS "$@" \
    >>"$WORK/n$i.log" 2>&1 &
  PID[$i]=$!
}
healthy() { # node number: polls Cluster.Status through the client, bounded
  for _ in $(seq 1 200); do
    "$BIN/DKVSClient" --nodes "127.0.0.1:$((BASE+$1))" status >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "node $1 never answered" >&2
  return 1
}
bench() { # label
  # shellcheck disable=SC2086
  out=$("$BIN/DKVSClient" --nodes "$NODES" bench --no-preload $ROUTE_FLAG --workload "$WORKLOAD" \
    --duration "$DURATION" --concurrency 64 --keys 10000 --json)
  python3 -c "
import json, sys
r = json.loads(sys.argv[1])
print(f\"{sys.argv[2]:<8} {r['ops_per_sec']:>9,.0f} ops/s  p50 {r['p50_ms']:6.2f} ms  p99 {r['p99_ms']:7.2f} ms  max {r['max_ms']:8.2f} ms  errors {r['errors']}\")
" "$out" "$1"
}

for i in 1 2 3; do start "$i" --peers "$NODES"; done
for i in 1 2 3; do healthy "$i"; done
for _ in $(seq 1 100); do "$BIN/DKVSClient" --nodes "$NODES" PUT warmup ok >/dev/null 2>&1 && break; sleep 0.1; done
"$BIN/DKVSClient" --nodes "$NODES" bench --workload w --ops 1 --concurrency 1 --keys 10000 --json >/dev/null
echo "route ${ROUTE:-via-node}, workload $WORKLOAD, $DURATION s per window"

bench steady

QUARTER=$(python3 -c "print($DURATION / 4)")
bench kill &
BENCH=$!
sleep "$QUARTER"
kill -9 "${PID[3]}"
sleep "$QUARTER"
start 3 --peers "$NODES"
wait "$BENCH"
healthy 3

bench join &
BENCH=$!
sleep "$QUARTER"
start 4 --join "127.0.0.1:$((BASE+1))"
wait "$BENCH"
