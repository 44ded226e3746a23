"""name_this_thread: the calling thread's kernel-visible name (its /proc comm), cut to 15 bytes."""

from __future__ import annotations

import threading
from pathlib import Path

from otel_envoy.thread_names import name_this_thread


def _named_in(name: str) -> tuple[bool, str, str]:
    """Name a fresh thread; return what the call said, its comm and the main thread's comm."""
    out: list[object] = []

    def run() -> None:
        ok = name_this_thread(name)
        out.extend([ok, Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    main = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()
    return out[0], out[1], main  # type: ignore[return-value]


def test_a_thread_gets_its_name_and_only_it() -> None:
    main_before = Path(f"/proc/self/task/{threading.get_native_id()}/comm").read_text().strip()
    ok, comm, main = _named_in("oe-ring")
    assert ok and comm == "oe-ring"
    assert main == main_before  # the calling thread alone is named


def test_a_long_name_is_cut_to_fifteen_bytes() -> None:
    ok, comm, _ = _named_in("oe-sink-otlp-grpc#2")
    assert ok and comm == "oe-sink-otlp-gr"
