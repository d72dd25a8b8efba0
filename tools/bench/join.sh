#!/usr/bin/env bash
# Join benchmark (membership): a 4th node joins a 3-node cluster holding
# KEYS keys of VALUE_SIZE bytes. Reports the time until it serves reads,
# the stream rate, and workload-A latency (QUORUM, CONCURRENCY in flight)
# during the join against the same run without one.
#
#   tools/bench/join.sh                 # unthrottled (--stream-rate 0)
#   RATE=50000 tools/bench/join.sh      # the default --stream-rate
#
# Runs its own processes on ports 7101..7104 with data in $DIR; every
# process it started is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-100}
RATE=${RATE:-0}
DURATION=${DURATION:-20}
CONCURRENCY=${CONCURRENCY:-8}
DIR=${DIR:-/tmp/dkvs-join-bench}
S=target/release/DKVSServer
C=target/release/DKVSClient
PEERS=127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103

cleanup() {
    for pidfile in "$DIR"/*.pid; do
        [ -e "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
}
trap cleanup EXIT

start_node() { # PORT FLAGS...
    local port=$1
    shift
    "$S" --listen "127.0.0.1:$port" --data-dir "$DIR/node-$port" --worker-threads 1 "$@" \
        >"$DIR/node-$port.log" 2>&1 &
    echo $! >"$DIR/node-$port.pid"
    for _ in $(seq 1 600); do
        "$C" --nodes "127.0.0.1:$port" --timeout-ms 500 status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "node $port did not start:" >&2
    tail -5 "$DIR/node-$port.log" >&2
    exit 1
}

bench_a() { # LABEL
    DKVS_NODES=$PEERS "$C" bench --workload a --keys "$KEYS" --value-size "$VALUE_SIZE" \
        --concurrency "$CONCURRENCY" --duration "$DURATION" --no-preload --json
}

cleanup
rm -rf "$DIR"
mkdir -p "$DIR"
for port in 7101 7102 7103; do
    start_node "$port" --peers "$PEERS"
done
echo "preloading $KEYS keys of $VALUE_SIZE B..."
DKVS_NODES=$PEERS "$C" bench --via-node --workload w --keys "$KEYS" --value-size "$VALUE_SIZE" --ops 1 --json >/dev/null
echo "steady state, workload A, $CONCURRENCY in flight, ${DURATION}s:"
bench_a | tee "$DIR/steady.json"

echo "joining 127.0.0.1:7104 (--stream-rate $RATE) while workload A runs:"
bench_a >"$DIR/during.json" &
bench=$!
start=$(date +%s.%N)
start_node 7104 --join 127.0.0.1:7101 --stream-rate "$RATE"
for _ in $(seq 1 36000); do
    grep -q "joined: serving reads" "$DIR/node-7104.log" && break
    sleep 0.1
done
joined=$(date +%s.%N)
wait "$bench"
cat "$DIR/during.json"
echo "join: serving reads $(echo "$joined - $start" | bc) s after start"
grep "every range streamed" "$DIR/node-7104.log" | sed 's/.*INFO //'
"$C" --nodes 127.0.0.1:7101 cluster wait --timeout-secs 120 >/dev/null 2>&1 \
    && echo "settled: $(echo "$(date +%s.%N) - $start" | bc) s after start" \
    || echo "(cluster wait unavailable or timed out)"
