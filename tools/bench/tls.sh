#!/usr/bin/env bash
# The cost of TLS and tokens: a fresh 3-node cluster per run, plaintext and
# secured (--tls-cert/--tls-key/--tls-ca/--auth-file, a readwrite token)
# one after the other, ROUNDS times, for writes (w) and reads (c), through
# the smart client (the default `DKVSClient bench`) and through the nodes
# (--via-node). Prints each run and the mean secured/plaintext ratio.
#
#   tools/bench/tls.sh
#   ROUNDS=3 DURATION=10 tools/bench/tls.sh
#
# Nodes get --worker-threads 1 (three share this machine's cores, as
# startServers.sh runs them); 64 requests in flight, 100-byte values, 10k
# keys preloaded. Everything runs on 127.0.0.1 with data, certificates and
# tokens in a temp dir, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-2}
DURATION=${DURATION:-6}
KEYS=${KEYS:-10000}
CONCURRENCY=${CONCURRENCY:-64}
BASE=${BASE_PORT:-7500}
cargo build --release --bins --quiet
BIN=target/release
NODES="127.0.0.1:$((BASE+1)),127.0.0.1:$((BASE+2)),127.0.0.1:$((BASE+3))"
PKI=$(mktemp -d)
PIDS=()
WORK=""
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n "$WORK" ]] && rm -rf "$WORK"
  return 0
}
trap 'cleanup; rm -rf "$PKI"' EXIT
"$BIN/DKVSClient" certs --dir "$PKI" --node "127.0.0.1:$((BASE+1))" \
  --node "127.0.0.1:$((BASE+2))" --node "127.0.0.1:$((BASE+3))" >/dev/null
TOKEN=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
echo "$TOKEN readwrite" >"$PKI/tokens"
echo "$TOKEN" >"$PKI/readwrite.token"
RESULTS=$(mktemp)

bench_round() { # round mode(plain|tls)
  local round=$1 mode=$2 client=() out
  WORK=$(mktemp -d)
  PIDS=()
  for i in 1 2 3; do
    local port=$((BASE+i)) flags=()
    if [[ $mode == tls ]]; then
      flags=(--tls-cert "$PKI/node-127.0.0.1-$port.pem" --tls-key "$PKI/node-127.0.0.1-$port-key.pem"
             --tls-ca "$PKI/ca.pem" --auth-file "$PKI/tokens")
    fi
    "$BIN/DKVSServer" --listen "127.0.0.1:$port" --peers "$NODES" --data-dir "$WORK/n$i" \
      --worker-threads 1 "${flags[@]}" >"$WORK/n$i.log" 2>&1 &
    PIDS+=($!)
  done
  client=("$BIN/DKVSClient" --nodes "$NODES")
  [[ $mode == tls ]] && client+=(--tls-ca "$PKI/ca.pem" --token-file "$PKI/readwrite.token")
  for _ in $(seq 1 300); do "${client[@]}" PUT warmup ok >/dev/null 2>&1 && break; sleep 0.1; done
  "${client[@]}" cluster wait --timeout-secs 60 >/dev/null
  # Preload every key (retried while the last node comes to serve clients).
  for _ in $(seq 1 30); do
    "${client[@]}" bench --workload w --ops 1 --concurrency 1 --keys "$KEYS" --json >/dev/null 2>&1 && break
    sleep 1
  done
  for path in smart via-node; do
    for workload in w c; do
      local via=()
      [[ $path == via-node ]] && via=(--via-node)
      out=$("${client[@]}" bench --no-preload "${via[@]}" --workload "$workload" \
        --duration "$DURATION" --concurrency "$CONCURRENCY" --keys "$KEYS" --json)
      echo "$mode $path $workload $out" >>"$RESULTS"
      python3 -c "
import json, sys
r = json.loads(sys.argv[1])
print(f\"round $round  {'$mode':<6} {'$path':<9} {'$workload'}  {r['ops_per_sec']:>9,.0f} ops/s  p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  errors {r['errors']}\")
" "$out"
    done
  done
  cleanup
  PIDS=()
  WORK=""
}

for round in $(seq 1 "$ROUNDS"); do
  bench_round "$round" plain
  bench_round "$round" tls
done
python3 - "$RESULTS" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    mode, path, workload, payload = line.split(" ", 3)
    rows.setdefault((path, workload, mode), []).append(json.loads(payload))
mean = lambda xs: sum(xs) / len(xs)
print()
print(f"{'path':<9} {'workload':<8} {'plain ops/s':>12} {'tls ops/s':>10} {'tls/plain':>10} {'p99 plain':>10} {'p99 tls':>8}")
for path in ["smart", "via-node"]:
    for workload in ["w", "c"]:
        p = rows.get((path, workload, "plain"), [])
        t = rows.get((path, workload, "tls"), [])
        if not p or not t:
            continue
        pm, tm = mean([r["ops_per_sec"] for r in p]), mean([r["ops_per_sec"] for r in t])
        print(f"{path:<9} {workload:<8} {pm:>12,.0f} {tm:>10,.0f} {tm/pm:>10.2f} {mean([r['p99_ms'] for r in p]):>10.2f} {mean([r['p99_ms'] for r in t]):>8.2f}")
PY
rm -f "$RESULTS"
