#!/usr/bin/env bash
# The full test suite: unit tests, the CML simulator's contract tests and the
# integration tests against a real MongoDB-wire server and the simulator.
# Installs the MongoDB-wire server first if this machine lacks it. Extra
# arguments go to `cargo test` (e.g. a test name filter). Then, without a
# filter, the operations checks: the alerting rules' promtool tests and the
# systemd unit (docs/OPERATIONS.md). Afterwards it prints the figures the
# reliability tests reported (docs/RELIABILITY.md).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${LABSYNC_TEST_MONGODB_URI:-}" ]]; then
  LABSYNC_SECANTUSD="$(bash scripts/install-tools.sh | tail -n 1)"
  export LABSYNC_SECANTUSD
fi
reports=target/tmp/reliability
rm -rf "$reports"
status=0
cargo test --workspace --locked "$@" || status=$?
if [[ $# -eq 0 ]]; then
  bash scripts/check-deploy.sh || status=$?
fi
if compgen -G "$reports/*.txt" >/dev/null; then
  echo
  echo "reliability figures (from $reports):"
  cat "$reports"/*.txt
fi
exit "$status"
