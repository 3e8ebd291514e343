#!/usr/bin/env bash
# Autobahn|Testsuite fuzzingclient (cases 1-13) against the real engine.
#
# Usage: tools/autobahn.sh [--quick] [other run.sh options, e.g. --cases 6.*,7.*]
#   --quick   skip 9.* (performance) and 12.*/13.* (permessage-deflate): about 10 s
#   (none)    the full 1-13 run: about 10 min
#
# Starts examples/echo_app.py (gateway._core.Engine echoing every message) on a free
# port of 127.0.0.1, runs ../shared/tools/autobahn/run.sh against it (that script installs
# the suite on first use), stops the echo app and prints a summary.
#
# Exit status: 0 when no case FAILED and every case ran; 1 on a FAILED or missing case,
# or when the echo app died; 2 when the suite could not be installed or the app not started.
#
# Environment:
#   AUTOBAHN_RUN         the runner (default ../shared/tools/autobahn/run.sh beside the repository)
#   AUTOBAHN_REPORT_DIR  reports (default target/autobahn[-quick]); JSON summary in
#                        reports/servers/index.json, per-case JSON/HTML next to it
#   PYTHON               interpreter with gateway._core (default .venv/bin/python, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${AUTOBAHN_RUN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/../shared/tools/autobahn/run.sh}"
QUICK=0
PASS=()
for a in "$@"; do
  case "$a" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --quick) QUICK=1; PASS+=("$a") ;;
    *) PASS+=("$a") ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
SUFFIX=""; [ "$QUICK" = 1 ] && SUFFIX="-quick"
REPORT_DIR="${AUTOBAHN_REPORT_DIR:-$ROOT/target/autobahn$SUFFIX}"
export AUTOBAHN_REPORT_DIR="$REPORT_DIR"
mkdir -p "$REPORT_DIR"

log() { printf '[tools/autobahn] %s\n' "$*" >&2; }
[ -x "$RUN" ] || { log "ERROR: runner $RUN not found"; exit 2; }

# Install first, so install time does not count against the echo app's start-up wait.
"$RUN" --install-only || { log "ERROR: the Autobahn suite could not be installed"; exit 2; }

APP_LOG="$REPORT_DIR/echo_app.log"
APP_PID=""
stop_app() {
  [ -n "$APP_PID" ] || return 0
  if kill -0 "$APP_PID" 2>/dev/null; then
    kill -TERM "$APP_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$APP_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$APP_PID" 2>/dev/null || true
  fi
  wait "$APP_PID" 2>/dev/null || true
  APP_PID=""
}
trap stop_app EXIT
trap 'exit 130' INT TERM

"$PYTHON" -u "$ROOT/examples/echo_app.py" --host 127.0.0.1 --port 0 >"$APP_LOG" 2>&1 &
APP_PID=$!
URL=""
for _ in $(seq 150); do
  URL="$(grep -o 'ws://[^ ]*' "$APP_LOG" 2>/dev/null | head -n 1 || true)"
  [ -n "$URL" ] && break
  kill -0 "$APP_PID" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$URL" ]; then
  log "ERROR: the echo app did not start (log: $APP_LOG)"
  tail -20 "$APP_LOG" >&2 || true
  exit 2
fi
log "echo app pid $APP_PID on $URL; reports in $REPORT_DIR"

t0=$SECONDS
set +e
"$RUN" --agent gateway "${PASS[@]}" "$URL" | tee "$REPORT_DIR/summary.txt"
rc=${PIPESTATUS[0]}
set -e
alive=1
kill -0 "$APP_PID" 2>/dev/null || alive=0
stop_app

echo "tools/autobahn: $(grep -o 'OK=.*' "$REPORT_DIR/summary.txt" | tail -n 1) in $((SECONDS - t0)) s" \
  "(per-case reports: $REPORT_DIR/reports/servers/)"
if [ "$alive" = 0 ]; then
  log "ERROR: the echo app died during the run (log: $APP_LOG)"
  tail -20 "$APP_LOG" >&2 || true
  exit 1
fi
exit "$rc"
