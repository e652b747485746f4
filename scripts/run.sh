#!/usr/bin/env bash
# Demo: the mock provider (--demo keys) on :8081 and Envoy with envoy.yaml (the ai-key-failover
# plugin) on :10000, admin :9901. It sends twenty requests (scripts/demo.py) and prints how many
# 429s the gateway absorbed, then keeps both running until Ctrl-C. Called by `make run` (which
# builds first). With --demo-only it exits after the twenty requests: 0 if all answered 200.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_ONLY=0
case "${1:-}" in
  --demo-only) DEMO_ONLY=1 ;;
  "") ;;
  *) echo "usage: scripts/run.sh [--demo-only]" >&2; exit 2 ;;
esac

VENV=${VENV:-.venv}
ENVOY=${ENVOY:-$VENV/bin/envoy}
MOCK=${MOCK:-target/debug/mock-provider}
WASM=${WASM:-target/wasm32-wasip1/release/ai_key_failover.wasm}
CONFIG=${CONFIG:-envoy.yaml}
LOG_LEVEL=${LOG_LEVEL:-info}
PYTHON=${PYTHON:-$VENV/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
# Ports can be moved (e.g. MOCK_PORT=18081 make run) if something else holds the defaults.
MOCK_PORT=${MOCK_PORT:-8081} GATEWAY_PORT=${GATEWAY_PORT:-10000} ADMIN_PORT=${ADMIN_PORT:-9901}
LOGDIR=${LOGDIR:-run}
# The pool's keys reach the plugin through the environment (envoy.yaml: fromEnv and
# host_env_keys), never through the configuration: here the mock's three demo keys.
DEMO_KEYS=demo-key-1,demo-key-2,demo-key-3

for f in "$ENVOY" "$MOCK" "$WASM"; do
  [ -e "$f" ] || { echo "run: $f is missing (run: make deps build mock)" >&2; exit 1; }
done

# GET a URL; succeed if it answers 200 (and, if given, the body contains $2).
http_ok() {
  "$PYTHON" - "$1" "${2:-}" <<'PY' 2>/dev/null
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=1) as r:
    sys.exit(0 if r.status == 200 and sys.argv[2] in r.read().decode(errors="replace") else 1)
PY
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $MOCK_PORT $GATEWAY_PORT $ADMIN_PORT; do
  if port_busy "$p"; then
    echo "run: port $p is already in use (another 'make run'?); MOCK_PORT=, GATEWAY_PORT=, ADMIN_PORT= move them" >&2
    exit 1
  fi
done

mkdir -p "$LOGDIR"
if [ "$MOCK_PORT:$GATEWAY_PORT:$ADMIN_PORT" != "8081:10000:9901" ]; then
  sed -e "s/port_value: 8081\b/port_value: $MOCK_PORT/" -e "s/port_value: 10000\b/port_value: $GATEWAY_PORT/" \
      -e "s/port_value: 9901\b/port_value: $ADMIN_PORT/" "$CONFIG" >"$LOGDIR/envoy.yaml"
  CONFIG=$LOGDIR/envoy.yaml
fi
MOCK_PID="" ENVOY_PID=""

cleanup() {
  trap - INT TERM EXIT
  local pids="" p
  for p in $ENVOY_PID $MOCK_PID; do kill -0 "$p" 2>/dev/null && { kill -TERM "$p" 2>/dev/null || true; pids="$pids $p"; }; done
  for _ in $(seq 50); do
    local alive=""
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for p in $pids; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped mock provider and envoy (logs in $LOGDIR/)"
}
trap 'echo; cleanup; exit 0' INT
trap 'cleanup; exit 0' TERM
trap 'cleanup' EXIT

"$MOCK" --port "$MOCK_PORT" --demo >"$LOGDIR/mock.stdout" 2>"$LOGDIR/mock.log" &
MOCK_PID=$!
# The log is written out every 100 ms, not Envoy's default 10 s, so that a grep right after a
# request finds its line.
OPENAI_API_KEYS=$DEMO_KEYS "$ENVOY" -c "$CONFIG" -l "$LOG_LEVEL" --log-path "$LOGDIR/envoy.log" --use-dynamic-base-id \
  --file-flush-interval-msec 100 >"$LOGDIR/envoy.stdout" 2>&1 &
ENVOY_PID=$!

wait_up() { # name pid url [body]
  local i
  for i in $(seq 200); do
    if ! kill -0 "$2" 2>/dev/null; then
      echo "run: $1 exited during startup; last log lines:" >&2
      tail -n 30 "$LOGDIR/$1.log" "$LOGDIR/$1.stdout" 2>/dev/null >&2 || true
      exit 1
    fi
    http_ok "$3" "${4:-}" && return 0
    sleep 0.1
  done
  echo "run: $1 did not come up in 20 s (see $LOGDIR/$1.log)" >&2
  exit 1
}
wait_up mock "$MOCK_PID" "http://127.0.0.1:$MOCK_PORT/_mock/health"
wait_up envoy "$ENVOY_PID" "http://127.0.0.1:$ADMIN_PORT/ready" LIVE
port_busy "$GATEWAY_PORT" || { echo "run: envoy listener :$GATEWAY_PORT not accepting" >&2; exit 1; }

echo
echo "  ai-key-failover demo: the mock's demo keys allow 3, 5 and 20 requests per 10 s."
demo_rc=0
"$PYTHON" scripts/demo.py --gateway "http://127.0.0.1:$GATEWAY_PORT" --admin "http://127.0.0.1:$ADMIN_PORT" \
  --mock "http://127.0.0.1:$MOCK_PORT" || demo_rc=$?
if [ "$DEMO_ONLY" = 1 ]; then
  exit "$demo_rc"
fi

cat <<EOF

  ai-key-failover demo is up
    gateway (Envoy + plugin)  http://localhost:$GATEWAY_PORT
    Envoy admin               http://localhost:$ADMIN_PORT
    mock provider             http://localhost:$MOCK_PORT   (demo-key-1/2/3: 3/5/20 requests per 10 s)
    logs                      $LOGDIR/envoy.log  $LOGDIR/mock.log (one line per request)

  1) A chat completion WITHOUT any key: the plugin puts a pool key on it.
     curl -s localhost:$GATEWAY_PORT/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
     curl -s localhost:$MOCK_PORT/_mock/requests    # "key" = the key the provider received

  2) Twenty more: keys rotate, demo-1 and demo-2 run into their limits again, each 429 takes its
     key out for 10 s and Envoy retries that request with a key still in; clients see only 200s.
     for i in \$(seq 20); do curl -s -o /dev/null -w '%{http_code}\n' localhost:$GATEWAY_PORT/v1/chat/completions \\
       -H 'content-type: application/json' -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'; done
     curl -s localhost:$MOCK_PORT/_mock/stats       # requests and statuses per key
     grep -E 'marked down|restored' $LOGDIR/envoy.log  # the plugin's transitions, keys by name

  3) Envoy's side: http://localhost:$ADMIN_PORT  and
     curl -s localhost:$ADMIN_PORT/stats | grep -E 'wasmcustom|upstream_rq_retry'
     make status ADMIN_PORT=$ADMIN_PORT                # pools and keys, by name

  Ctrl-C stops both.
EOF

# Until Ctrl-C, or until one of them dies.
set +e
wait -n "$MOCK_PID" "$ENVOY_PID"
rc=$?
if ! kill -0 "$MOCK_PID" 2>/dev/null; then who=mock; else who=envoy; fi
echo "run: $who exited (code $rc); see $LOGDIR/$who.log" >&2
exit 1
