#!/usr/bin/env bash
# The fleet benchmark: labsync's refresh against the old algorithm, the
# CML latency floor and the database's own write time, deletes at a
# constant arrival rate up to their capacity, the CPU time of each process,
# and the console (the labs page at 50,000
# labs, the event stream's fan-out to 500 streams), on the MongoDB-wire
# server and cml-sim run as separate processes. Prints a table and writes
# target/bench/results.json.
#
#   scripts/bench.sh                 # the reported sizes (release build, about 15 minutes)
#   scripts/bench.sh --console-only  # only the console's figures
#   scripts/bench.sh --quick         # a few seconds
#   scripts/bench.sh --debug --quick # as CI runs it: no release build
# Other arguments go to labsync-bench (see --help). LABSYNC_BENCH_MONGODB_URI
# points it at a running MongoDB instead of starting secantusd-rs.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [[ "${1:-}" == "--debug" ]]; then
  profile=debug
  shift
fi
if [[ -z "${LABSYNC_BENCH_MONGODB_URI:-}" ]]; then
  LABSYNC_SECANTUSD="$(bash scripts/install-tools.sh | tail -n 1)"
  export LABSYNC_SECANTUSD
fi
if [[ "$profile" == release ]]; then
  cargo build --quiet --locked --release -p cml-sim -p labsync-bench
else
  cargo build --quiet --locked -p cml-sim -p labsync-bench
fi
exec "target/$profile/labsync-bench" "$@"
