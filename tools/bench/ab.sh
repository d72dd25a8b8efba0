#!/usr/bin/env bash
# A/B of DKVSServer settings: starts a fresh 3-node cluster per run, one
# configuration after the other, ROUNDS times, and prints throughput,
# p50/p99 and the servers' CPU time per request (from /proc, so it is less
# sensitive to a noisy machine than throughput).
#
#   tools/bench/ab.sh "--worker-threads 1" "--worker-threads 1 --storage-engine fjall"
#   WORKLOAD=c ROUNDS=3 DURATION=6 tools/bench/ab.sh "" "--worker-threads 1"
#
# Each argument is one configuration (extra DKVSServer flags). Requests go
# through the nodes, each node in turn (--via-node: any-node routing), 64 in
# flight, 100-byte values, 10k keys (preloaded before the measured run).
# ROUTE=smart sends them through the smart client instead;
# DISTRIBUTION=zipfian draws keys from a zipfian distribution (θ = 0.99).
#
# To compare two builds instead of two settings, name their binary
# directories in BIN_DIRS, one per configuration, in order:
#   BIN_DIRS="/tmp/before/release target/release" ROUNDS=5 tools/bench/ab.sh "" ""
# (then nothing is built).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-2}
WORKLOAD=${WORKLOAD:-w}
DURATION=${DURATION:-6}
KEYS=${KEYS:-10000}
DISTRIBUTION=${DISTRIBUTION:-uniform}
case ${ROUTE:-via-node} in
  via-node) ROUTE_FLAG=--via-node ;;
  smart) ROUTE_FLAG="" ;;
  *) echo "ROUTE is via-node or smart" >&2; exit 2 ;;
esac
CONCURRENCY=${CONCURRENCY:-64}
BASE=${BASE_PORT:-7400}
read -r -a BIN_DIRS <<< "${BIN_DIRS:-}"
if [[ ${#BIN_DIRS[@]} -eq 0 ]]; then
  cargo build --release --bins --quiet
elif [[ ${#BIN_DIRS[@]} -ne $# ]]; then
  echo "BIN_DIRS names ${#BIN_DIRS[@]} directories for $# configurations" >&2
  exit 2
fi
NODES="127.0.0.1:$((BASE+1)),127.0.0.1:$((BASE+2)),127.0.0.1:$((BASE+3))"
PIDS=()
WORK=""
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n "$WORK" ]] && rm -rf "$WORK"
  return 0
}
trap cleanup EXIT
cpu_ticks() { local total=0; for pid in "$@"; do total=$((total + $(awk '{print $14+$15}' "/proc/$pid/stat"))); done; echo "$total"; }
for round in $(seq 1 "$ROUNDS"); do
  config=0
  for flags in "$@"; do
    BIN=${BIN_DIRS[$config]:-target/release}
    label="${BIN_DIRS[$config]:+[$BIN] }$flags"
    config=$((config + 1))
    WORK=$(mktemp -d)
    PIDS=()
    for i in 1 2 3; do
      # shellcheck disable=SC2086
      "$BIN/DKVSServer" --listen "127.0.0.1:$((BASE+i))" --peers "$NODES" --data-dir "$WORK/n$i" $flags >"$WORK/n$i.log" 2>&1 &
      PIDS+=($!)
    done
    for _ in $(seq 1 100); do "$BIN/DKVSClient" --nodes "$NODES" PUT warmup ok >/dev/null 2>&1 && break; sleep 0.1; done
    "$BIN/DKVSClient" --nodes "$NODES" bench --via-node --workload "$WORKLOAD" --ops 1 --concurrency 1 --keys "$KEYS" --json >/dev/null
    before=$(cpu_ticks "${PIDS[@]}")
    # shellcheck disable=SC2086
    out=$("$BIN/DKVSClient" --nodes "$NODES" bench --no-preload $ROUTE_FLAG --workload "$WORKLOAD" \
      --distribution "$DISTRIBUTION" --duration "$DURATION" --concurrency "$CONCURRENCY" --keys "$KEYS" --json)
    after=$(cpu_ticks "${PIDS[@]}")
    ticks=$(getconf CLK_TCK)
    python3 -c "
import json, sys
r = json.loads(sys.argv[1])
us = ($after - $before) * 1e6 / $ticks / max(r['ok'], 1)
print(f\"round $round  {sys.argv[2] or '(defaults)':<45} {r['ops_per_sec']:>9,.0f} ops/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}  server CPU {us:.1f} us/op\")
" "$out" "$label"
    cleanup
    PIDS=()
    WORK=""
  done
done
