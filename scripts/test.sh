#!/usr/bin/env bash
# Fresh machine -> set everything up and run every test (unit, fuzz, and as root the real-Envoy e2e tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check otel_envoy tests bench
# pytest exits 5 when it collected no test: that is a failure here too.
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
