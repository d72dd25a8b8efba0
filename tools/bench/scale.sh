#!/usr/bin/env bash
# Scale notes: memory per key with 1M keys, restart time of a node holding
# 1M keys, and throughput with 3 vs 5 nodes. Uses ./startServers.sh (ports
# 7001..), so stop any running local cluster first; data goes to ./data.
#
#   tools/bench/scale.sh        # KEYS=1000000 VALUE_SIZE=100 DURATION=10
set -euo pipefail
cd "$(dirname "$0")/../.."
KEYS=${KEYS:-1000000}
VALUE_SIZE=${VALUE_SIZE:-100}
DURATION=${DURATION:-10}
C=target/release/DKVSClient

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$(cat "run/node-$1.pid")/status"; }
serving() { "$C" --nodes "127.0.0.1:$1" --timeout-ms 500 replicas probe >/dev/null 2>&1; }

./startServers.sh stop >/dev/null 2>&1 || true
rm -rf data run
./startServers.sh 3 >/dev/null
before=$(rss_kib 7001)
echo "preloading $KEYS keys of $VALUE_SIZE B (N=3 on 3 nodes: every node holds every key)..."
DKVS_NODES=127.0.0.1:7001 "$C" bench --via-node --workload w --keys "$KEYS" --value-size "$VALUE_SIZE" --ops 1 --json >/dev/null
after=$(rss_kib 7001)
echo "RSS of node 7001: $before KiB empty, $after KiB with $KEYS keys: $(( (after - before) * 1024 / KEYS )) bytes/key in memory"
echo "data dir of node 7001: $(du -sk data/node-7001 | cut -f1) KiB on disk: $(( $(du -sk data/node-7001 | cut -f1) * 1024 / KEYS )) bytes/key"

# Restart time: SIGKILL node 7003, restart it with the same command, time to serve.
cmd=$(./startServers.sh 3 2>/dev/null | grep -- "--listen 127.0.0.1:7003" | sed 's/^ *//')
kill -9 "$(cat run/node-7003.pid)"
sleep 1
start=$(date +%s.%N)
eval "$cmd"
for _ in $(seq 1 6000); do serving 7003 && break; sleep 0.05; done
end=$(date +%s.%N)
echo "node 7003 with $KEYS keys: serving $(echo "$end - $start" | bc) s after restart (log: $(grep 'replica opened' run/node-7003.log | tail -1 | sed 's/.*INFO //'))"

echo "throughput, workload A via node, 64 in flight, 3 nodes:"
DKVS_NODES=127.0.0.1:7001 "$C" bench --via-node --workload a --keys 100000 --duration "$DURATION" --no-preload
./startServers.sh stop >/dev/null
rm -rf data run
./startServers.sh 5 >/dev/null
DKVS_NODES=127.0.0.1:7001 "$C" bench --via-node --workload w --keys 100000 --ops 1 --json >/dev/null
echo "throughput, workload A via node, 64 in flight, 5 nodes:"
DKVS_NODES=127.0.0.1:7001 "$C" bench --via-node --workload a --keys 100000 --duration "$DURATION" --no-preload
./startServers.sh stop >/dev/null
