#!/usr/bin/env bash
# The big fuzz run: 1 000 000 hypothesis cases of the header parsers and the OTLP encoders (docs/fuzzing.md).
# 400 000 per header property, 100 000 per encoder property, the two files in parallel; ~35 min on 2 cores.
# Needs the venv (scripts/setup.sh); no root. Prints hypothesis' statistics (cases run per property).
set -euo pipefail
cd "$(dirname "$0")/.."
run() { OTEL_ENVOY_FUZZ_EXAMPLES="$1" .venv/bin/python -m pytest -q -p no:cacheprovider --timeout=0 \
          --hypothesis-show-statistics "$2"; }
run 400000 tests/fuzz/test_header_fuzz.py > "${FUZZ_LOG_DIR:-.}/fuzz-headers.log" 2>&1 & headers=$!
run 100000 tests/fuzz/test_encoder_fuzz.py > "${FUZZ_LOG_DIR:-.}/fuzz-encoders.log" 2>&1 & encoders=$!
status=0
wait "$headers" || status=1
wait "$encoders" || status=1
grep -hE "passing|Stopped|passed|failed" "${FUZZ_LOG_DIR:-.}"/fuzz-headers.log "${FUZZ_LOG_DIR:-.}"/fuzz-encoders.log
exit "$status"
