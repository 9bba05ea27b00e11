#!/usr/bin/env bash
# Checks the deployment files (docs/OPERATIONS.md): the Prometheus rules parse
# and their promtool unit tests pass (each alert fires on a series that should
# fire it and stays silent on one that should not), and systemd accepts the
# unit. The metric names they use are checked against a running labsync by
# the integration tests (tests/core/operations.rs). Needs promtool and
# systemd-analyze (scripts/install-tools.sh installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "check-deploy: promtool check rules + test rules"
promtool check rules deploy/prometheus/labsync.rules.yml
(cd deploy/prometheus && promtool test rules labsync.rules.test.yml)

echo "check-deploy: systemd-analyze verify deploy/systemd/labsync.service"
cargo build --quiet --locked -p labsync
unit_dir="$(mktemp -d)"
trap 'rm -rf "$unit_dir"' EXIT
# The unit names the installed binary; the check needs one that exists.
sed "s|/usr/local/bin/labsync|$PWD/target/debug/labsync|" deploy/systemd/labsync.service \
  >"$unit_dir/labsync.service"
out="$(systemd-analyze verify "$unit_dir/labsync.service" 2>&1)" || { echo "$out" >&2; exit 1; }
# systemd-analyze warns about bad values and exits 0: any word is a failure.
if [[ -n "$out" ]]; then
  echo "$out" >&2
  exit 1
fi
echo "check-deploy: ok"
