#!/usr/bin/env bash
# Side-by-side: a 3-node DKVS cluster (N=3, QUORUM) and a 3-member etcd
# cluster on this machine, driven by the same closed-loop client
# (`DKVSClient bench`) with the same workload, in alternating rounds
# (DKVS, etcd, DKVS, etcd), plus a do-nothing gRPC server round as the
# machine's one-hop ceiling. Prints a table of throughput and p99 with the
# DKVS/etcd ratio. Installs Debian's etcd-server when etcd is missing.
#
#   tools/bench/compare.sh           # 10 s per round, 64 in flight, 100-byte values
#   DURATION=20 ROUNDS=3 tools/bench/compare.sh
#   CONCURRENCY=256 tools/bench/compare.sh
#   DKVS_SERVER_FLAGS="--storage-engine fjall" tools/bench/compare.sh   # extra DKVSServer flags
#
# The 3 DKVS nodes share the machine's cores, so each gets --worker-threads
# cores/3 (at least 1), as ./startServers.sh does, unless DKVS_SERVER_FLAGS
# sets it. etcd members keep Go's default (GOMAXPROCS = cores); set
# ETCD_GOMAXPROCS to change that.
#
# DKVS requests go to each node in turn (--via-node, "dkvs": any-node
# routing; a write is forwarded to its key's first live replica), as etcd
# requests go to each member in turn, and through the smart client
# ("smart": writes to the key's first replica, reads straight from the
# replicas). Everything runs on 127.0.0.1
# with data in a temp dir, and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-2}
CONCURRENCY=${CONCURRENCY:-64}
VALUE_SIZE=${VALUE_SIZE:-100}
KEYS=${KEYS:-10000}
BASE=${BASE_PORT:-7300}

if ! command -v etcd >/dev/null 2>&1; then
  echo "etcd not found: installing Debian's etcd-server"
  (apt-get install -y etcd-server >/dev/null 2>&1) || (apt-get update >/dev/null && apt-get install -y etcd-server >/dev/null)
fi
echo "building release binaries..."
cargo build --release --bins --quiet
BIN=target/release
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_port() { # port
  for _ in $(seq 1 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  return 1
}

# DKVS: 3 nodes.
SERVER_FLAGS=${DKVS_SERVER_FLAGS:-}
if [[ " $SERVER_FLAGS " != *" --worker-threads"* ]]; then
  CORES=$(nproc 2>/dev/null || echo 1)
  SERVER_FLAGS="--worker-threads $(( CORES / 3 > 0 ? CORES / 3 : 1 )) $SERVER_FLAGS"
fi
echo "DKVSServer flags: $SERVER_FLAGS" >&2
DKVS_NODES_LIST="127.0.0.1:$((BASE+1)),127.0.0.1:$((BASE+2)),127.0.0.1:$((BASE+3))"
for i in 1 2 3; do
  "$BIN/DKVSServer" --listen "127.0.0.1:$((BASE+i))" --peers "$DKVS_NODES_LIST" \
    --data-dir "$WORK/dkvs$i" $SERVER_FLAGS >"$WORK/dkvs$i.log" 2>&1 &
  PIDS+=($!)
done
# etcd: 3 members.
CLUSTER=""
for i in 1 2 3; do CLUSTER+="${CLUSTER:+,}e$i=http://127.0.0.1:$((BASE+20+i))"; done
ETCD_ENDPOINTS=""
for i in 1 2 3; do
  client="http://127.0.0.1:$((BASE+10+i))"
  ETCD_ENDPOINTS+="${ETCD_ENDPOINTS:+,}127.0.0.1:$((BASE+10+i))"
  ${ETCD_GOMAXPROCS:+env GOMAXPROCS=$ETCD_GOMAXPROCS} etcd --name "e$i" --data-dir "$WORK/etcd$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "http://127.0.0.1:$((BASE+20+i))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((BASE+20+i))" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new \
    --log-level error >"$WORK/etcd$i.log" 2>&1 &
  PIDS+=($!)
done
# The one-hop ceiling.
"$BIN/DKVSClient" noop-server --listen "127.0.0.1:$((BASE+30))" >"$WORK/noop.log" 2>&1 &
PIDS+=($!)
for port in $((BASE+1)) $((BASE+2)) $((BASE+3)) $((BASE+11)) $((BASE+12)) $((BASE+13)) $((BASE+30)); do
  wait_port "$port"
done
# Let DKVS's failure detectors and etcd's leader election settle: poll until
# a write succeeds on each system (bounded).
for _ in $(seq 1 100); do
  "$BIN/DKVSClient" --nodes "$DKVS_NODES_LIST" PUT warmup ok >/dev/null 2>&1 && break
  sleep 0.1
done
for _ in $(seq 1 100); do
  "$BIN/DKVSClient" --nodes "$ETCD_ENDPOINTS" bench --etcd --workload w --ops 1 --keys 1 --no-preload --json >/dev/null 2>&1 && break
  sleep 0.1
done

COMMON=(--duration "$DURATION" --concurrency "$CONCURRENCY" --value-size "$VALUE_SIZE" --keys "$KEYS" --json)
RESULTS="$WORK/results.jsonl"
run() { # system workload
  local system=$1 workload=$2 out
  case $system in
    dkvs) out=$("$BIN/DKVSClient" --nodes "$DKVS_NODES_LIST" bench --via-node --workload "$workload" "${COMMON[@]}") ;;
    smart) out=$("$BIN/DKVSClient" --nodes "$DKVS_NODES_LIST" bench --workload "$workload" "${COMMON[@]}") ;;
    etcd) out=$("$BIN/DKVSClient" --nodes "$ETCD_ENDPOINTS" bench --etcd --workload "$workload" "${COMMON[@]}") ;;
    noop) out=$("$BIN/DKVSClient" --nodes "127.0.0.1:$((BASE+30))" bench --noop --workload "$workload" "${COMMON[@]}") ;;
  esac
  echo "$system $workload $out" | tee -a "$RESULTS" >&2
}
for round in $(seq 1 "$ROUNDS"); do
  echo "round $round of $ROUNDS" >&2
  for workload in w c; do
    run dkvs "$workload"
    run smart "$workload"
    run etcd "$workload"
  done
done
run noop w
run noop c

python3 - "$RESULTS" "$ROUNDS" <<'PY'
import json, sys
rows = {}
for line in open(sys.argv[1]):
    system, workload, payload = line.split(" ", 2)
    rows.setdefault((system, workload), []).append(json.loads(payload))
def mean(xs): return sum(xs) / len(xs)
names = {"w": "Put (100% writes)", "c": "Get/Range (100% reads)"}
print()
print(f"{'workload':<24} {'system':<6} {'ops/s (each round)':<28} {'mean ops/s':>10} {'p99 ms (mean)':>14} {'errors':>7} {'/ceiling':>9}")
ceiling = {w: mean([r["ops_per_sec"] for r in rows[("noop", w)]]) for w in ["w", "c"] if ("noop", w) in rows}
for workload in ["w", "c"]:
    means = {}
    for system in ["dkvs", "smart", "etcd"]:
        runs = rows.get((system, workload), [])
        if not runs: continue
        tput = [r["ops_per_sec"] for r in runs]
        means[system] = mean(tput)
        share = f"{mean(tput) / ceiling[workload]:.2f}" if workload in ceiling else ""
        print(f"{names[workload]:<24} {system:<6} {', '.join(f'{t:,.0f}' for t in tput):<28} {mean(tput):>10,.0f} {mean([r['p99_ms'] for r in runs]):>14.2f} {sum(r['errors'] for r in runs):>7} {share:>9}")
    for system in ["dkvs", "smart"]:
        if system in means and "etcd" in means:
            print(f"{'':<24} {'ratio':<6} {system + ' / etcd':<28} {means[system]/means['etcd']:>10.2f}x")
for workload in ["w", "c"]:
    for r in rows.get(("noop", workload), []):
        print(f"{'one-hop ceiling (noop) ' + workload:<24} {'grpc':<6} {'':<28} {r['ops_per_sec']:>10,.0f} {r['p99_ms']:>14.2f}")
PY
