#!/usr/bin/env bash
# Instructions one coordinating node executes per write, counted by
# valgrind's callgrind: repeatable whatever else the machine is doing (CPU
# time on this shared machine is not, to a few percent).
#
#   tools/bench/instructions.sh BIN_DIR [BIN_DIR...]
#
# For each binary directory: a 3-node cluster (--worker-threads 1), node 1
# under callgrind, others native; `DKVSClient bench --via-node --workload w`
# with 8 in flight through node 1, once with SMALL and once with LARGE
# operations; prints (Ir(LARGE) - Ir(SMALL)) / (LARGE - SMALL), which
# cancels start-up and shutdown. Needs valgrind. Ports BASE_PORT+1..3.
set -euo pipefail
SMALL=${SMALL:-300}
LARGE=${LARGE:-1500}
BASE=${BASE_PORT:-7600}
NODES="127.0.0.1:$((BASE+1)),127.0.0.1:$((BASE+2)),127.0.0.1:$((BASE+3))"
FLAGS="--worker-threads 1 --rpc-timeout-ms 20000 --request-timeout-ms 60000 --phi-threshold 1000000"
PIDS=()
WORK=$(mktemp -d)
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
# Total instructions of node 1 for a run of $2 writes with the binaries in $1.
run() {
  local bin=$1 ops=$2 dir out
  dir=$(mktemp -d -p "$WORK")
  out="$dir/callgrind.out"
  PIDS=()
  # shellcheck disable=SC2086
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin/DKVSServer" --listen "127.0.0.1:$((BASE+1))" \
    --peers "$NODES" --data-dir "$dir/n1" $FLAGS >"$dir/n1.log" 2>&1 &
  local coordinator=$!
  PIDS+=("$coordinator")
  for i in 2 3; do
    # shellcheck disable=SC2086
    "$bin/DKVSServer" --listen "127.0.0.1:$((BASE+i))" --peers "$NODES" --data-dir "$dir/n$i" $FLAGS >"$dir/n$i.log" 2>&1 &
    PIDS+=($!)
  done
  for _ in $(seq 1 600); do
    "$bin/DKVSClient" --nodes "127.0.0.1:$((BASE+1))" --timeout-ms 60000 PUT warmup ok >/dev/null 2>&1 && break
    sleep 0.2
  done
  "$bin/DKVSClient" --nodes "127.0.0.1:$((BASE+1))" --timeout-ms 60000 bench --via-node --workload w \
    --ops "$ops" --concurrency 8 --keys 500 --no-preload --json >/dev/null
  kill -TERM "$coordinator"
  wait "$coordinator" 2>/dev/null || true
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  awk '/^summary:/ {print $2}' "$out"
}
for bin in "$@"; do
  small=$(run "$bin" "$SMALL")
  large=$(run "$bin" "$LARGE")
  echo "$bin: $(( (large - small) / (LARGE - SMALL) )) instructions per write (node 1, coordinating)"
done
