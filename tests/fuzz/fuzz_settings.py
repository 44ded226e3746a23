"""How many cases each property of the header and encoder fuzzers runs: ``OTEL_ENVOY_FUZZ_EXAMPLES`` (default
300, what the test suite runs; ``scripts/fuzz.sh`` runs 250 000 per property, 1 000 000 in all)."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("OTEL_ENVOY_FUZZ_EXAMPLES", "300"))
#: The settings of every property here: no deadline (a CI machine may be slow), no example database in
#: the big runs (it would only grow).
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                database=None if EXAMPLES > 10_000 else settings().database,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
