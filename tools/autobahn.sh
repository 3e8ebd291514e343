#!/usr/bin/env bash
# Autobahn|Testsuite fuzzingclient (cases 1-13) against the real engine.
#
# Usage: tools/autobahn.sh [--tls] [--quick] [other run.sh options, e.g. --cases 6.*,7.*]
#   --quick   skip 9.* (performance) and 12.*/13.* (permessage-deflate): about 10 s
#   (none)    the full 1-13 run: about 10 min
#   --tls     over wss:// to the engine's TLS listener, certificate verified (see below);
#             with it, of run.sh's options only --quick, --cases, --exclude, --agent
#
# Starts examples/echo_app.py (gateway._core.Engine echoing every message) on a free
# port of 127.0.0.1, runs ../shared/tools/autobahn/run.sh against it (that script installs
# the suite on first use), stops the echo app and prints a summary.
#
# --tls: a throw-away CA (tests/support/certs.py) issues the echo app's certificate for
# localhost, and the fuzzingclient connects to wss://localhost:PORT trusting that root
# only. The suite verifies a server only when its spec entry names a "hostname": it then
# uses Twisted's optionsForClientTLS (the chain against OpenSSL's default paths, which
# SSL_CERT_FILE and SSL_CERT_DIR replace, and the name through service_identity).
# Without one it uses Twisted's ClientContextFactory, which verifies nothing. run.sh
# writes no hostname, so with --tls this script writes the spec itself and runs the
# wstest run.sh installed ($AUTOBAHN_HOME/py2/bin/wstest) with SSL_CERT_FILE set to the
# test root, then sums up the report the way run.sh does.
#
# Exit status: 0 when no case FAILED and every case ran; 1 on a FAILED or missing case,
# or when the echo app died; 2 when the suite could not be installed or the app not started.
#
# Environment:
#   AUTOBAHN_RUN         the runner (default ../shared/tools/autobahn/run.sh beside the repository)
#   AUTOBAHN_REPORT_DIR  reports (default target/autobahn[-tls][-quick]); JSON summary in
#                        reports/servers/index.json, per-case JSON/HTML next to it
#   PYTHON               interpreter with gateway._core (default .venv/bin/python, else python3)
#   AUTOBAHN_HOME        --tls: where run.sh installed the suite (default /opt/autobahn-testsuite)
#   AUTOBAHN_TLS_CAFILE  --tls: the CA file the fuzzingclient trusts instead of the test root
#                        (a foreign root must make every case fail: verification is on)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="${AUTOBAHN_RUN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/../shared/tools/autobahn/run.sh}"
QUICK=0
TLS=0
PASS=()
for a in "$@"; do
  case "$a" in
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --quick) QUICK=1; PASS+=("$a") ;;
    --tls) TLS=1 ;;
    *) PASS+=("$a") ;;
  esac
done
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
SUFFIX=""
[ "$TLS" = 1 ] && SUFFIX="-tls"
[ "$QUICK" = 1 ] && SUFFIX="$SUFFIX-quick"
REPORT_DIR="${AUTOBAHN_REPORT_DIR:-$ROOT/target/autobahn$SUFFIX}"
export AUTOBAHN_REPORT_DIR="$REPORT_DIR"
mkdir -p "$REPORT_DIR"

log() { printf '[tools/autobahn] %s\n' "$*" >&2; }
[ -x "$RUN" ] || { log "ERROR: runner $RUN not found"; exit 2; }

# Install first, so install time does not count against the echo app's start-up wait.
"$RUN" --install-only || { log "ERROR: the Autobahn suite could not be installed"; exit 2; }

APP_ARGS=()
SCHEME=ws
if [ "$TLS" = 1 ]; then
  PKI="$REPORT_DIR/pki"
  rm -rf "$PKI"
  CERTS="$(cd "$ROOT/tests" && "$PYTHON" -m support.certs "$PKI")" || { log "ERROR: could not make the test certificates"; exit 2; }
  read -r TLS_CERT TLS_KEY TLS_ROOT < <("$PYTHON" -c 'import json, sys; d = json.loads(sys.argv[1]); print(d["cert"], d["key"], d["root"])' "$CERTS")
  APP_ARGS=(--tls-cert "$TLS_CERT" --tls-key "$TLS_KEY")
  SCHEME=wss
fi

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

"$PYTHON" -u "$ROOT/examples/echo_app.py" --host 127.0.0.1 --port 0 "${APP_ARGS[@]}" >"$APP_LOG" 2>&1 &
APP_PID=$!
URL=""
for _ in $(seq 150); do
  URL="$(grep -o "$SCHEME://[^ ]*" "$APP_LOG" 2>/dev/null | head -n 1 || true)"
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

# run_tls [options]: the fuzzingclient over wss:// with the certificate verified (see
# --tls above); prints the summary lines run.sh prints and exits as run.sh does.
run_tls() {
  local wstest="${AUTOBAHN_HOME:-/opt/autobahn-testsuite}/py2/bin/wstest"
  local cases="*" agent="gateway" exclude=() x=()
  [ -x "$wstest" ] || { log "ERROR: $wstest not found (run.sh --install-only installs it)"; return 2; }
  while [ $# -gt 0 ]; do
    case "$1" in
      --quick) exclude+=("9.*" "12.*" "13.*") ;;
      --no-perf) exclude+=("9.*") ;;
      --no-compression) exclude+=("12.*" "13.*") ;;
      --cases) cases="$2"; shift ;;
      --exclude) IFS=, read -r -a x <<<"$2"; exclude+=("${x[@]}"); shift ;;
      --agent) agent="$2"; shift ;;
      *) log "ERROR: $1 is not supported with --tls"; return 2 ;;
    esac
    shift
  done
  # OpenSSL reads no other CA: an empty directory instead of the system's.
  local certdir="$REPORT_DIR/pki/no-other-cas"
  mkdir -p "$certdir"
  local outdir="$REPORT_DIR/reports/servers" spec="$REPORT_DIR/fuzzingclient.json" runlog="$REPORT_DIR/wstest.log"
  local cafile="${AUTOBAHN_TLS_CAFILE:-$TLS_ROOT}"
  rm -rf "$outdir"
  "$PYTHON" - "$spec" "$outdir" "$agent" "$URL" "$cases" "${exclude[@]}" <<'PY'
import json
import sys
from urllib.parse import urlsplit

spec, outdir, agent, url, cases = sys.argv[1:6]
doc = {
    "options": {"failByDrop": False},
    "outdir": outdir,
    # "hostname": the suite then verifies the chain and this name (optionsForClientTLS).
    "servers": [{"agent": agent, "url": url, "hostname": urlsplit(url).hostname}],
    "cases": [c.strip() for c in cases.split(",") if c.strip()],
    "exclude-cases": sorted({x.strip() for x in sys.argv[6:] if x.strip()}),
    "exclude-agent-cases": {},
}
with open(spec, "w") as f:
    json.dump(doc, f, indent=2)
PY
  log "spec $spec: cases=[$cases] exclude=[${exclude[*]:-}] -> $URL, trusting $cafile only"
  local t0=$SECONDS rc=0
  (cd "$REPORT_DIR" && SSL_CERT_FILE="$cafile" SSL_CERT_DIR="$certdir" \
    timeout "${AUTOBAHN_TIMEOUT:-3600}" "$wstest" -m fuzzingclient -s "$spec") >"$runlog" 2>&1 || rc=$?
  [ "$rc" = 0 ] || log "wstest exited with status $rc"
  "$PYTHON" - "$outdir/index.json" "$runlog" "$agent" "$((SECONDS - t0))" <<'PY'
import collections
import json
import os
import re
import sys

index, runlog, agent, elapsed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with open(runlog, errors="replace") as f:
    m = re.search(r"will run (\d+) test cases", f.read())
expected = int(m.group(1)) if m else None
results = {}
if os.path.exists(index):
    with open(index) as f:
        results = json.load(f).get(agent, {})
order = ["OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED"]
counts = collections.Counter(v.get("behavior", "?") for v in results.values())
print("Autobahn|Testsuite fuzzingclient summary over TLS (agent %s, %d s)" % (agent, elapsed))
print("  report: %s" % index)
print("  cases run: %d%s" % (len(results), "" if expected is None else " of %d" % expected))
for b in order:
    print("  %-14s %d" % (b, counts.get(b, 0)))
failed = sorted((c for c, v in results.items() if v.get("behavior") == "FAILED"), key=lambda c: [int(p) for p in c.split(".")])
if failed:
    print("  FAILED cases: %s%s" % (" ".join(failed[:40]), " ..." if len(failed) > 40 else ""))
    with open(os.path.join(os.path.dirname(index), results[failed[0]]["reportfile"])) as f:
        first = json.load(f)
    print("  first FAILED case %s: %s; HTTP response %r" % (failed[0], first.get("wasNotCleanReason"), (first.get("httpResponse") or "")[:60]))
missing = expected is None or len(results) < expected
if missing:
    print("  ERROR: case(s) missing from the report; see %s" % runlog)
status = 1 if counts.get("FAILED", 0) or missing else 0
print("autobahn: " + " ".join("%s=%d" % (b, counts.get(b, 0)) for b in order) + (" RESULT=FAIL" if status else " RESULT=PASS"))
sys.exit(status)
PY
}

t0=$SECONDS
set +e
if [ "$TLS" = 1 ]; then
  run_tls "${PASS[@]}" | tee "$REPORT_DIR/summary.txt"
else
  "$RUN" --agent gateway "${PASS[@]}" "$URL" | tee "$REPORT_DIR/summary.txt"
fi
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
