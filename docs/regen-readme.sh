#!/usr/bin/env bash
# Regenerates the console samples in README.md and docs/*.md from a real run.
#
#   docs/regen-readme.sh           replay every sample on a fresh local cluster
#                                  and write what its commands print into its file
#   docs/regen-readme.sh --check   replay them and fail, with a diff, where a file
#                                  no longer matches (what `cargo test` checks)
#   docs/regen-readme.sh help      show this text
#
# A sample is a fenced block right after a comment `<!-- sample: NAME -->`;
# its lines starting with `$ ` are commands, the rest is their output. The
# replay is tests/readme.rs (its top comment has the details): it starts a
# 5-node cluster with ./startServers.sh in a temp dir, on free ports below
# the ephemeral range (your ./run, ./data and a cluster on 7001..7005 are left
# alone), runs the samples' commands in the order of its SAMPLE_FILES (README.md,
# docs/USER-GUIDE.md, docs/OPERATIONS.md), and shows the cluster as if it ran
# on 127.0.0.1:7001..7005 in a clone at /home/you/dkvs. Comparing ignores what
# differs from run to run (versions, ids, clocks, times, pids, the numbers in
# `status` rows). A sample that needs a program that is not installed
# (grpcurl, jq) is skipped and kept as it is.
#
# After regenerating, review `git diff README.md docs/`: prose around a sample
# may have to follow what it now shows.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  "") export DKVS_README_REGEN=1 ;;
  --check) unset DKVS_README_REGEN ;;
  -h | --help | help)
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
    exit 0
    ;;
  *)
    echo "unknown argument '$1' (see docs/regen-readme.sh help)" >&2
    exit 2
    ;;
esac

exec cargo test --test readme -- --nocapture
