#!/usr/bin/env bash
# Coverage-guided fuzzing of gateway-core's sans-I/O protocol code (see fuzz/README.md).
#
#   tools/fuzz.sh [SECONDS] [TARGET...]   run each target SECONDS (default 30), one after
#                                         another on one core; exit 1 on any crash
#   tools/fuzz.sh --cmin [TARGET...]      fold the last runs' new inputs into the
#                                         committed corpus and minimize it
#   tools/fuzz.sh --build                 install the tool and build the targets only
#
# Works on the stable toolchain: cargo-fuzz (pinned, installed from crates.io into
# ~/.cargo/bin when missing) builds with --sanitizer none, which needs no -Z flag.
# FUZZ_SANITIZER=address turns AddressSanitizer on; on stable that needs
# RUSTC_BOOTSTRAP=1, which this script then sets for the fuzz build only.
# Known, already-reported bugs of gateway-core are tolerated while listed in
# LIVEGATE_FUZZ_KNOWN (default below); set LIVEGATE_FUZZ_KNOWN= to make them crash.
set -euo pipefail

CARGO_FUZZ_VERSION=0.13.2
TARGETS_ALL=(frame_decoder handshake deflate proxy_header)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FUZZ="$ROOT/fuzz"
export PATH="$HOME/.cargo/bin:$PATH"
export LIVEGATE_FUZZ_KNOWN="${LIVEGATE_FUZZ_KNOWN-}"  # none open: deflate-clamp and deflate-exact-cap were fixed
SAN="${FUZZ_SANITIZER:-none}"
if [[ "$SAN" != none ]]; then
    export RUSTC_BOOTSTRAP=1 # -Zsanitizer on a stable rustc
fi
FUZZ_FLAGS=(--sanitizer "$SAN" -O)
WORK="$FUZZ/target/fuzz-work"   # new inputs of each run (not committed)
LOGS="$FUZZ/target/fuzz-logs"

mode=run
secs=30
case "${1:-}" in
    --cmin) mode=cmin; shift ;;
    --build) mode=build; shift ;;
    '' ) ;;
    *[!0-9]*) echo "usage: $0 [SECONDS|--cmin|--build] [TARGET...]" >&2; exit 2 ;;
    *) secs=$1; shift ;;
esac
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=("${TARGETS_ALL[@]}")

if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io (about 1 min)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked -q
fi

cd "$FUZZ"
t0=$(date +%s)
cargo fuzz build "${FUZZ_FLAGS[@]}"
echo "== fuzz targets built in $(( $(date +%s) - t0 )) s (rustc $(rustc --version | cut -d' ' -f2), sanitizer $SAN)"
[[ $mode == build ]] && exit 0

mkdir -p "$WORK" "$LOGS"
if [[ $mode == cmin ]]; then
    for t in "${targets[@]}"; do
        before=$(ls "corpus/$t" | wc -l)
        if [[ -d "$WORK/$t" ]]; then cp -n "$WORK/$t"/* "corpus/$t"/ 2>/dev/null || true; fi
        cargo fuzz cmin "${FUZZ_FLAGS[@]}" "$t" "corpus/$t" >"$LOGS/$t.cmin.log" 2>&1
        echo "== $t: corpus $before -> $(ls "corpus/$t" | wc -l) files, $(du -sh "corpus/$t" | cut -f1)"
    done
    exit 0
fi

failed=()
for t in "${targets[@]}"; do
    mkdir -p "$WORK/$t" "artifacts/$t"
    log="$LOGS/$t.log"
    echo "== $t: ${secs} s"
    s0=$(date +%s)
    # New inputs go to $WORK/$t; the committed corpus is read only.
    if cargo fuzz run "${FUZZ_FLAGS[@]}" "$t" "$WORK/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        failed+=("$t")
    fi
    execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo '?')
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9]+[a-zA-Z]*' "$log" | tail -1 || true)
    known=$(grep -c 'livegate-fuzz: known bug' "$log" || true)
    line="$t: $status, $(( $(date +%s) - s0 )) s, $execs execs, $cov, known-bug lines: $known"
    echo "   $line"
    echo "$(date -u +%FT%TZ) secs=$secs san=$SAN $line" >>"$LOGS/summary.txt"
    if [[ $status == CRASH ]]; then
        grep -E -A12 'panicked at|ERROR: libFuzzer|SUMMARY' "$log" | head -40 >&2 || true
        echo "   crash input in fuzz/artifacts/$t/, full log: $log" >&2
    fi
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "fuzz: crash in ${failed[*]}" >&2
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${secs} s each, no crash"
