"""Rate-limited logging: one line per key (or logger and template) per interval, the rest counted."""

from __future__ import annotations

import logging
import time

import pytest

from otel_envoy.export.log_limiter import ExporterLogFilter, LogRateLimiter, install_log_filter


def test_one_line_per_key_per_interval_and_the_suppressed_are_counted() -> None:
    limiter = LogRateLimiter(interval=0.2)
    assert limiter.allow("a") == (True, 0)
    assert limiter.allow("a") == (False, 0)
    assert limiter.allow("a") == (False, 0)
    assert limiter.allow("b") == (True, 0)  # another key: its own budget
    time.sleep(0.25)
    assert limiter.allow("a") == (True, 2)  # the two held back since the last line


def test_the_filter_holds_back_repeated_warnings_of_one_template(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("otel_envoy.tests.log_limiter")
    log_filter = ExporterLogFilter()
    install_log_filter(log_filter, [logger.name])
    install_log_filter(log_filter, [logger.name])  # once
    try:
        assert logger.filters.count(log_filter) == 1
        with caplog.at_level(logging.DEBUG, logger=logger.name):
            for code in (503, 502, 504):
                logger.warning("export failed: %s", code)
            logger.warning("another template")
            logger.info("below WARNING: %s", 1)
            logger.info("below WARNING: %s", 2)
        assert [r.getMessage() for r in caplog.records] == [
            "export failed: 503", "another template", "below WARNING: 1", "below WARNING: 2"]
    finally:
        logger.removeFilter(log_filter)
