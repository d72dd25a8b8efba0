#!/usr/bin/env bash
# Writes the upgrade fixture: the data dirs of a 3-node cluster (N=3) run by
# the DKVSServer of a given commit, and a manifest of what they hold. The
# upgrade test (tests/upgrade.rs) starts the current binaries on a copy of
# them and checks every key.
#
#   tools/make-upgrade-fixture.sh COMMIT [OUT]
#
# OUT defaults to tests/fixtures/release-<short commit>. The binaries of
# COMMIT are built (debug) in a temporary git worktree, unless
# DKVS_FIXTURE_BIN_DIR names a directory holding that commit's DKVSServer
# and DKVSClient already.
#
# The layout stores member addresses, so the fixture cluster runs on fixed
# loopback addresses nothing else uses: 127.77.0.1:7001, 127.77.0.2:7001,
# 127.77.0.3:7001 (Linux answers on all of 127/8). The script refuses to
# start when one of them is taken. The test starts the nodes on the same
# addresses.
#
# What it writes, through DKVSClient at QUORUM:
#   with all three nodes up: k000..k299, a value of 65,520 bytes (big), a
#   UTF-8 key; k000..k049 overwritten; k250..k279 and a key never written
#   deleted;
#   with node3 killed (SIGKILL) and believed down, so nodes 1 and 2 keep
#   hints for it: h000..h039; k050..k069 overwritten; k280..k289 and
#   h030..h034 deleted; k250..k254 written again after their delete.
# Then nodes 1 and 2 stop with SIGTERM. node3's data dir stays as SIGKILL
# left it; nodes 1 and 2 hold the hints.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
  exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMMIT=$(git -C "$ROOT" rev-parse --verify "$1^{commit}")
SHORT=$(git -C "$ROOT" rev-parse --short=7 "$COMMIT")
OUT=${2:-$ROOT/tests/fixtures/release-$SHORT}
ADDRESSES=(127.77.0.1:7001 127.77.0.2:7001 127.77.0.3:7001)
PEERS=$(IFS=,; echo "${ADDRESSES[*]}")
WORK=$(mktemp -d /tmp/dkvs-fixture.XXXXXX)
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
  if [[ -d "$WORK/src" ]]; then
    git -C "$ROOT" worktree remove --force "$WORK/src" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '%s\n' "$*" >&2; }

for address in "${ADDRESSES[@]}"; do
  if (exec 3<>"/dev/tcp/${address%:*}/${address#*:}") 2>/dev/null; then
    say "$address is in use: stop what listens there first"
    exit 1
  fi
done

if [[ -n "${DKVS_FIXTURE_BIN_DIR:-}" ]]; then
  BIN=$DKVS_FIXTURE_BIN_DIR
else
  say "building $SHORT in a temporary worktree"
  git -C "$ROOT" worktree add --detach "$WORK/src" "$COMMIT" >/dev/null
  (cd "$WORK/src" && cargo build --bins)
  BIN=$WORK/src/target/debug
fi
SERVER=$BIN/DKVSServer
CLIENT=$BIN/DKVSClient

start_node() { # index (1-based)
  local i=$1
  "$SERVER" --listen "${ADDRESSES[$((i - 1))]}" --peers "$PEERS" \
    --data-dir "$WORK/data/node$i" --worker-threads 1 \
    >>"$WORK/node$i.log" 2>&1 &
  PIDS[i - 1]=$!
}

client() { "$CLIENT" --nodes "$PEERS" "$@"; }

# Polls (every 0.2 s, at most 30 s) until `check` succeeds.
wait_for() { # description, command...
  local what=$1
  shift
  for _ in $(seq 150); do
    if "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.2
  done
  say "timed out waiting for $what"
  tail -n 20 "$WORK"/node*.log >&2
  exit 1
}

declare -A FINAL # key -> value, or the empty string for deleted
put() { client PUT "$1" "$2" >/dev/null; FINAL[$1]=$2; }
delete() { client DELETE "$1" >/dev/null; FINAL[$1]=; }
serves() { client GET fixture-probe; [[ $? -eq 1 ]]; }
node3_down() { client status | grep -q ' DOWN '; }

mkdir -p "$WORK/data"
for i in 1 2 3; do start_node "$i"; done
wait_for "the cluster to serve reads" serves

say "writing with all nodes up"
for n in $(seq -w 0 299); do put "k$n" "v1-k$n"; done
BIG_PART=0123456789abcdef
BIG_TIMES=4095
put big "$(printf "$BIG_PART%.0s" $(seq $BIG_TIMES))"
put "ключ-κλειδί" "значение-τιμή"
for n in $(seq -w 0 49); do put "k0$n" "v2-k0$n"; done
for n in $(seq 250 279); do delete "k$n"; done
delete never-written

say "killing node3, writing while it is down"
kill -KILL "${PIDS[2]}"
wait "${PIDS[2]}" 2>/dev/null || true
wait_for "node3 to be believed down" node3_down
for n in $(seq -w 0 39); do put "h0$n" "h1-h0$n"; done
for n in $(seq 50 69); do put "k0$n" "v3-k0$n"; done
for n in $(seq 280 289); do delete "k$n"; done
for n in $(seq 30 34); do delete "h0$n"; done
for n in $(seq 250 254); do put "k$n" "v4-k$n"; done
client status >"$WORK/status.txt"

say "stopping nodes 1 and 2 (SIGTERM)"
kill -TERM "${PIDS[0]}" "${PIDS[1]}"
wait "${PIDS[0]}" "${PIDS[1]}" || true
PIDS=()

rm -rf "$OUT"
mkdir -p "$OUT"
cp -a "$WORK/data/node1" "$WORK/data/node2" "$WORK/data/node3" "$OUT/"
{
  printf '# Written by tools/make-upgrade-fixture.sh from %s.\n' "$COMMIT"
  printf '# nodes: node1=%s node2=%s node3=%s (--peers %s)\n' "${ADDRESSES[@]}" "$PEERS"
  printf '# One key a line, tab-separated: live <key> <value> | deleted <key> |\n'
  printf '# live-repeat <key> <part> <times> (the value is <part> repeated <times> times)\n'
  for key in "${!FINAL[@]}"; do
    if [[ $key == big ]]; then
      printf 'live-repeat\t%s\t%s\t%s\n' "$key" "$BIG_PART" "$BIG_TIMES"
    elif [[ -n "${FINAL[$key]}" ]]; then
      printf 'live\t%s\t%s\n' "$key" "${FINAL[$key]}"
    else
      printf 'deleted\t%s\n' "$key"
    fi
  done | LC_ALL=C sort -t $'\t' -k2,2
} >"$OUT/manifest.tsv"
say "status before the stop:"
cat "$WORK/status.txt" >&2
say "wrote $OUT ($(du -sh "$OUT" | cut -f1))"
