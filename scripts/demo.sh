#!/usr/bin/env bash
# Runs labsync end to end on this machine: the MongoDB-wire server, the CML
# simulator with two workers of demo labs, and `labsync serve` (the console,
# the HTTP API and the schedule), after registering both workers and running
# a first refresh. It prints the console's address and the token to sign in
# with. Ctrl-C stops everything it started.
#
# With --oidc it also starts the demo OpenID Connect provider
# (devtools/oidc/provider.mjs, with its own login page) and the console signs
# people in through it: olivia (operator) and student (self-service: deletes
# only the labs CML says are theirs), each with the password <name>-password.
#
# Data lives in .labsync-demo/ (delete it for a fresh start). The encryption
# key and the API token below are for this demo only; never reuse them.
set -euo pipefail
cd "$(dirname "$0")/.."

OIDC=""
for arg in "$@"; do
  case "$arg" in
    --oidc) OIDC=yes ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "demo: unknown option $arg (try --oidc)" >&2; exit 2 ;;
  esac
done

DEMO_DIR="${LABSYNC_DEMO_DIR:-$PWD/.labsync-demo}"
MONGO_PORT="${LABSYNC_DEMO_MONGO_PORT:-27517}"
SIM_PORT="${LABSYNC_DEMO_SIM_PORT:-19401}"
API_PORT="${LABSYNC_DEMO_API_PORT:-8080}"
OIDC_PORT="${LABSYNC_DEMO_OIDC_PORT:-4455}"
DEMO_TOKEN="labsync-demo-token"
mkdir -p "$DEMO_DIR"

SECANTUSD="$(bash scripts/install-tools.sh | tail -n 1)"
echo "demo: building labsync and cml-sim"
cargo build --quiet --locked -p labsync -p cml-sim

export LABSYNC__MONGODB__URI="mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true"
export LABSYNC__MONGODB__DATABASE="labsync_demo"
export LABSYNC__SECURITY__ENCRYPTION_KEY="ZGVtby1vbmx5LWtleS1kby1ub3QtdXNlLWFueXdoZXI="
export LABSYNC__REFRESH__CRON="${LABSYNC__REFRESH__CRON:-0 */5 * * * *}"
export LABSYNC__API__LISTEN="127.0.0.1:$API_PORT"
export LABSYNC__API__TOKENS="demo:admin:$(printf %s "$DEMO_TOKEN" | sha256sum | cut -d' ' -f1)"
export CML_SIM_ADMIN_PASSWORD="cml-sim-admin"
if [[ -n "$OIDC" ]]; then
  export LABSYNC__OIDC__ISSUER="http://127.0.0.1:$OIDC_PORT"
  export LABSYNC__OIDC__AUDIENCE="labsync"
  export LABSYNC__OIDC__ROLES="labsync-viewer=viewer,labsync-self-service=self-service,labsync-operator=operator,labsync-admin=admin"
  export LABSYNC__OIDC__CLIENT_ID="labsync-console"
  export LABSYNC__OIDC__CLIENT_SECRET="labsync-console-secret"
  export LABSYNC__OIDC__REDIRECT_URL="http://127.0.0.1:$API_PORT/auth/callback"
fi
LABSYNC=target/debug/labsync

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
if [[ -n "$OIDC" ]]; then
  TOOLS_DIR="${LABSYNC_TOOLS_DIR:-$HOME/.local/share/labsync-tools}"
  PORT="$OIDC_PORT" JWKS_FILE="$DEMO_DIR/oidc-keys.json" \
    CONSOLE_URLS="http://127.0.0.1:$API_PORT" OIDC_PROVIDER_MODULE="$TOOLS_DIR/oidc/package.json" \
    node devtools/oidc/provider.mjs >"$DEMO_DIR/oidc.log" 2>&1 &
  pids+=($!)
fi
target/debug/cml-sim --workers 2 --labs-per-worker 30 --base-port "$SIM_PORT" \
  --addresses-file "$DEMO_DIR/workers.json" >"$DEMO_DIR/cml-sim.log" 2>&1 &
pids+=($!)

# Wait for each to accept connections (the provider says so once it is
# built), with a deadline.
ready=""
for _ in $(seq 1 150); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$MONGO_PORT") 2>/dev/null \
    && (exec 3<>"/dev/tcp/127.0.0.1/$((SIM_PORT + 1))") 2>/dev/null \
    && { [[ -z "$OIDC" ]] || grep -q "listening on" "$DEMO_DIR/oidc.log" 2>/dev/null; }; then
    ready=yes
    break
  fi
  sleep 0.1
done
[[ -n "$ready" ]] || { echo "demo: servers did not start; see $DEMO_DIR/*.log" >&2; exit 1; }

for n in 1 2; do
  out=$("$LABSYNC" workers add --id "cml-$n" --url "http://127.0.0.1:$((SIM_PORT + n - 1))" \
    --username admin --password-env CML_SIM_ADMIN_PASSWORD --allow-http 2>&1) \
    || grep -q "already registered" <<<"$out" || { echo "$out" >&2; exit 1; }
done
echo "demo: first refresh"
"$LABSYNC" refresh

"$LABSYNC" serve >"$DEMO_DIR/labsync.out" 2>"$DEMO_DIR/labsync.log" &
pids+=($!)
for _ in $(seq 1 150); do
  curl -sf "http://127.0.0.1:$API_PORT/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done
API="http://127.0.0.1:$API_PORT/api/v1"

cat <<MSG

demo: MongoDB-wire server  $LABSYNC__MONGODB__URI  (log: $DEMO_DIR/mongo.log)
demo: CML simulator        http://127.0.0.1:$SIM_PORT (cml-1), http://127.0.0.1:$((SIM_PORT + 1)) (cml-2)
demo: labsync serve        $API  refresh on "$LABSYNC__REFRESH__CRON"  (log: $DEMO_DIR/labsync.log)
demo: API token            $DEMO_TOKEN  (role admin)   OpenAPI: $API/openapi.json

Open the console:  http://127.0.0.1:$API_PORT/   and sign in with the token  $DEMO_TOKEN
MSG
if [[ -n "$OIDC" ]]; then
  cat <<MSG
demo: OpenID Connect       $LABSYNC__OIDC__ISSUER  (log: $DEMO_DIR/oidc.log)
      "Sign in with your organisation" on the console's sign-in page, then:
        olivia / olivia-password    operator: deletes any lab
        student / student-password  self-service: deletes only the labs CML says are student's
      An access token for the API:  curl -s -u labsync-operator:labsync-operator-secret \\
        -d grant_type=client_credentials -d scope=api $LABSYNC__OIDC__ISSUER/token
MSG
fi
cat <<MSG

Try the API:
  T=$DEMO_TOKEN
  curl -s -H "Authorization: Bearer \$T" $API/workers
  curl -s -H "Authorization: Bearer \$T" '$API/workers/cml-1/labs?state=DEFINED_ON_CORE&limit=5'
  curl -s -X DELETE -H "Authorization: Bearer \$T" $API/workers/cml-1/labs/<lab id>       # ?force=true, ?mode=async
  curl -s -X POST -H "Authorization: Bearer \$T" $API/workers/cml-1/labs/refresh
  curl -s -H "Authorization: Bearer \$T" http://127.0.0.1:$API_PORT/metrics | grep ^labsync_

Or the CLI, in another shell with the same environment:
  export LABSYNC__MONGODB__URI='$LABSYNC__MONGODB__URI' LABSYNC__MONGODB__DATABASE=labsync_demo \\
         LABSYNC__SECURITY__ENCRYPTION_KEY='$LABSYNC__SECURITY__ENCRYPTION_KEY'
  $LABSYNC labs list --worker cml-1
  $LABSYNC delete-lab --worker cml-1 --lab <a DEFINED_ON_CORE lab id>      # add --force for a running one
  curl -s -X DELETE http://127.0.0.1:$SIM_PORT/_sim/labs/<lab id>          # delete behind labsync's back
  $LABSYNC refresh --worker cml-1                                          # ...and watch it pruned
Ctrl-C stops everything.
MSG
wait -n "${pids[@]}"
