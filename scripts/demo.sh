#!/usr/bin/env bash
# Fresh machine -> set everything up, run a real Envoy with real traffic under the daemon, show the spans.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m otel_envoy.lab.demo "$@"
