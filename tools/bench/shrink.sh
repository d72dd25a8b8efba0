#!/usr/bin/env bash
# Shrink benchmark (membership, 2 of 2): a 5-node cluster holding KEYS keys
# of VALUE_SIZE bytes loses one member by `cluster leave` (it streams its
# ranges away while serving), then another by kill -9 and `cluster remove`
# (its ranges are rebuilt from the surviving replicas). Reports how long
# each takes, what was streamed, and workload-A latency (QUORUM,
# CONCURRENCY in flight) during each against steady state.
#
#   tools/bench/shrink.sh                 # unthrottled (--stream-rate 0)
#   RATE=50000 tools/bench/shrink.sh      # the default --stream-rate
#
# Runs its own processes on ports 7111..7115 with data in $DIR; every
# process it started is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-100}
RATE=${RATE:-0}
DURATION=${DURATION:-20}
CONCURRENCY=${CONCURRENCY:-8}
DIR=${DIR:-/tmp/dkvs-shrink-bench}
S=target/release/DKVSServer
C=target/release/DKVSClient
PORTS="7111 7112 7113 7114 7115"
PEERS=127.0.0.1:7111,127.0.0.1:7112,127.0.0.1:7113,127.0.0.1:7114,127.0.0.1:7115
LEAVER=127.0.0.1:7115
DEAD=127.0.0.1:7114
SURVIVORS=127.0.0.1:7111,127.0.0.1:7112,127.0.0.1:7113

cleanup() {
    for pidfile in "$DIR"/*.pid; do
        [ -e "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
}
trap cleanup EXIT

start_node() { # PORT FLAGS...
    local port=$1
    shift
    "$S" --listen "127.0.0.1:$port" --data-dir "$DIR/node-$port" --worker-threads 1 \
        --stream-rate "$RATE" "$@" >"$DIR/node-$port.log" 2>&1 &
    echo $! >"$DIR/node-$port.pid"
    for _ in $(seq 1 600); do
        "$C" --nodes "127.0.0.1:$port" --timeout-ms 500 status >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "node $port did not start:" >&2
    tail -5 "$DIR/node-$port.log" >&2
    exit 1
}

bench_a() { # NODES
    DKVS_NODES=$1 "$C" bench --workload a --keys "$KEYS" --value-size "$VALUE_SIZE" \
        --concurrency "$CONCURRENCY" --duration "$DURATION" --no-preload --json
}

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }

streamed() { # what each gainer logged for the change
    grep -h "every range streamed" "$DIR"/node-*.log | sed 's/.*INFO //' | tail -n +"$1"
}

cleanup
rm -rf "$DIR"
mkdir -p "$DIR"
for port in $PORTS; do
    start_node "$port" --peers "$PEERS"
done
# Clients are served once the members agree on the cluster id.
for _ in $(seq 1 300); do
    "$C" --nodes "$PEERS" --timeout-ms 500 PUT bench-probe ready >/dev/null 2>&1 && break
    sleep 0.1
done
echo "preloading $KEYS keys of $VALUE_SIZE B..."
DKVS_NODES=$PEERS "$C" bench --via-node --workload w --keys "$KEYS" --value-size "$VALUE_SIZE" --ops 1 --json >/dev/null
echo "steady state, 5 nodes, workload A, $CONCURRENCY in flight, ${DURATION}s:"
bench_a "$PEERS" | tee "$DIR/steady.json"

echo "$LEAVER leaves (--stream-rate $RATE) while workload A runs:"
bench_a "$SURVIVORS,$DEAD" >"$DIR/during-leave.json" &
bench=$!
start=$(now)
"$C" --nodes 127.0.0.1:7111 cluster leave "$LEAVER" --wait --timeout-secs 600
echo "leave: the leaver exited $(since "$start") s after the request"
"$C" --nodes 127.0.0.1:7111 cluster wait --timeout-secs 600 >/dev/null
echo "leave: settled and cleaned up $(since "$start") s after the request"
wait "$bench"
cat "$DIR/during-leave.json"
streamed 1
before=$(grep -h "every range streamed" "$DIR"/node-*.log | wc -l)

echo "steady state, 4 nodes:"
bench_a "$SURVIVORS,$DEAD" | tee "$DIR/steady-4.json"

echo "$DEAD killed (SIGKILL), then removed while workload A runs:"
kill -9 "$(cat "$DIR/node-7114.pid")"
rm "$DIR/node-7114.pid"
bench_a "$SURVIVORS" >"$DIR/during-remove.json" &
bench=$!
start=$(now)
for _ in $(seq 1 600); do
    "$C" --nodes 127.0.0.1:7111 cluster remove "$DEAD" 2>"$DIR/remove.err" && break
    sleep 0.1 # until the members believe it down; remove refuses a member believed up
done
echo "remove: accepted $(since "$start") s after the kill"
"$C" --nodes 127.0.0.1:7111 cluster wait --timeout-secs 600 >/dev/null
echo "remove: ranges rebuilt, settled and cleaned up $(since "$start") s after the kill"
wait "$bench"
cat "$DIR/during-remove.json"
streamed "$((before + 1))"
"$C" --nodes 127.0.0.1:7111 status | head -12
