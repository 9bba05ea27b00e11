#!/usr/bin/env bash
# Runs labsync's pieces on this machine: the MongoDB-wire server and the CML
# simulator with two workers of demo labs. Ctrl-C stops everything it started.
#
# Data lives in .labsync-demo/ (delete it for a fresh start).
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR="${LABSYNC_DEMO_DIR:-$PWD/.labsync-demo}"
MONGO_PORT="${LABSYNC_DEMO_MONGO_PORT:-27017}"
SIM_PORT="${LABSYNC_DEMO_SIM_PORT:-19401}"
mkdir -p "$DEMO_DIR"

SECANTUSD="$(bash scripts/install-tools.sh | tail -n 1)"
cargo build --quiet --locked -p cml-sim

pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo: stopped"
}
trap cleanup EXIT INT TERM

"$SECANTUSD" --port "$MONGO_PORT" --storage-path "$DEMO_DIR/mongo" \
  --log-file-max 32MB --log-level WARNING >"$DEMO_DIR/mongo.log" 2>&1 &
pids+=($!)
target/debug/cml-sim --workers 2 --labs-per-worker 30 --base-port "$SIM_PORT" \
  --addresses-file "$DEMO_DIR/workers.json" &
pids+=($!)

# Wait for both to accept connections, with a deadline.
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$MONGO_PORT") 2>/dev/null \
    && (exec 3<>"/dev/tcp/127.0.0.1/$SIM_PORT") 2>/dev/null; then
    break
  fi
  sleep 0.1
done

cat <<MSG
demo: MongoDB-wire server  mongodb://127.0.0.1:$MONGO_PORT  (log: $DEMO_DIR/mongo.log)
demo: CML simulator        http://127.0.0.1:$SIM_PORT and http://127.0.0.1:$((SIM_PORT + 1))
demo: try
  curl -s http://127.0.0.1:$SIM_PORT/api/v0/system_information
  TOKEN=\$(curl -s -X POST http://127.0.0.1:$SIM_PORT/api/v0/authenticate \\
          -d '{"username":"admin","password":"cml-sim-admin"}' | tr -d '"')
  curl -s -H "Authorization: Bearer \$TOKEN" 'http://127.0.0.1:$SIM_PORT/api/v0/labs?show_all=true'
demo: Ctrl-C stops everything
MSG
wait -n "${pids[@]}"
