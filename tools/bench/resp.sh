#!/usr/bin/env bash
# RESP benchmark: redis-benchmark against a 3-node DKVS through its RESP
# door (N=3, QUORUM, --worker-threads 1, as startServers.sh runs nodes on
# this machine), beside a single Debian redis-server (appendfsync
# everysec) and beside DKVS's own gRPC any-node path (DKVSClient bench
# --via-node), in one run, ROUNDS times alternating.
#
#   tools/bench/resp.sh                         # 100,000 requests per test
#   REQUESTS=20000 ROUNDS=1 tools/bench/resp.sh
#
# Runs its own processes (DKVS on 7121..7123 and 9121..9123, redis-server
# on 6391) with data in $DIR; every process it started is killed on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
REQUESTS=${REQUESTS:-100000}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-50}
PIPELINE=${PIPELINE:-16}
KEYS=${KEYS:-100000}
VALUE_SIZE=${VALUE_SIZE:-100}
DURATION=${DURATION:-10}
DIR=${DIR:-/tmp/dkvs-resp-bench}
S=target/release/DKVSServer
C=target/release/DKVSClient
PEERS=127.0.0.1:7121,127.0.0.1:7122,127.0.0.1:7123
REDIS_PORT=6391

cleanup() {
    for pidfile in "$DIR"/*.pid; do
        [ -e "$pidfile" ] && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    done
}
trap cleanup EXIT

cleanup
rm -rf "$DIR"
mkdir -p "$DIR"
for port in 7121 7122 7123; do
    "$S" --listen "127.0.0.1:$port" --peers "$PEERS" --data-dir "$DIR/node-$port" \
        --worker-threads 1 --resp-listen "127.0.0.1:$((port + 2000))" \
        >"$DIR/node-$port.log" 2>&1 &
    echo $! >"$DIR/node-$port.pid"
done
redis-server --port "$REDIS_PORT" --dir "$DIR" --save "" --appendonly yes \
    --appendfsync everysec --daemonize no >"$DIR/redis.log" 2>&1 &
echo $! >"$DIR/redis.pid"
# Ready: the RESP doors answer a write (the cluster id is agreed), and
# redis-server answers PING.
for _ in $(seq 1 300); do
    redis-cli -p 9121 SET bench-probe ready 2>/dev/null | grep -q OK \
        && redis-cli -p "$REDIS_PORT" PING 2>/dev/null | grep -q PONG && break
    sleep 0.1
done

resp() { # PORT TESTS
    redis-benchmark -h 127.0.0.1 -p "$1" -t "$2" -c "$CLIENTS" -P "$PIPELINE" \
        -n "$REQUESTS" -r "$KEYS" -d "$VALUE_SIZE" -q 2>&1 | tr '\r' '\n' | grep -E 'requests per second'
}

grpc() { # WORKLOAD (w: writes, c: reads)
    DKVS_NODES=$PEERS "$C" bench --via-node --workload "$1" --keys "$KEYS" --value-size "$VALUE_SIZE" \
        --concurrency 64 --duration "$DURATION" --no-preload --json
}

echo "preloading $KEYS keys for the gRPC reads..."
DKVS_NODES=$PEERS "$C" bench --via-node --workload w --keys "$KEYS" --value-size "$VALUE_SIZE" --ops 1 --json >/dev/null
for round in $(seq 1 "$ROUNDS"); do
    echo "== round $round"
    echo "-- DKVS through RESP (node 1; any node takes any key)"
    resp 9121 ping,set,get,mset
    echo "-- DKVS INCR through RESP (refused: needs compare-and-set)"
    redis-cli -p 9121 INCR counter || true
    echo "-- redis-server $(redis-server --version | grep -o 'v=[0-9.]*')"
    resp "$REDIS_PORT" ping,set,get,incr,mset
    echo "-- DKVS through gRPC, each request to the next node in turn (64 in flight)"
    grpc w
    grpc c
done
