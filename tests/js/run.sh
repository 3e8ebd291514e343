#!/usr/bin/env bash
# JS SDK tests against real gateways: needs Node >= 20 and the built project (.venv).
#   tests/js/run.sh            # every tests/js/*.test.mjs
#   tests/js/run.sh tests/js/wx.test.mjs
set -euo pipefail
cd "$(dirname "$0")/../.."
flags=(--test)
# Node 20 hides the global WebSocket behind a flag; Node >= 22 has it.
if ! node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' 2>/dev/null; then
  flags=(--experimental-websocket "${flags[@]}")
fi
if [ "$#" -eq 0 ]; then
  set -- tests/js/
fi
exec node --no-warnings "${flags[@]}" "$@"
