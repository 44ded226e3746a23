"""A daemon run on the lab's TLS listener once its connections are decided whole, saving the kernel's records
beside its spans (--record), and those records decoded: for the e2e tests of what the kernel folds into
fewer records."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from otel_envoy.events.decode import Decoder
from otel_envoy.events.recording import RecordingReader
from otel_envoy.events.types import Event
from otel_envoy.lab import clients
from tests.support.daemon import DaemonProcess


@contextlib.contextmanager
def tls_listener_sampled_whole(lab: Any, receiver: Any, tmp_path: Path, sni: str) -> Iterator[Path]:
    """The daemon exporting to ``receiver`` and recording to the path yielded; before the body, the
    listener's first TLS connection has told the daemon it speaks TLS, so the kernel decides its later
    connections whole. The daemon must exit 0 after the body."""
    events = tmp_path / "live.events"
    daemon = DaemonProcess(["--pid", str(lab.pid), "--otlp-endpoint", receiver.grpc_endpoint,
                            "--otlp-protocol", "grpc", "--record", str(events)], tmp_path).start()
    try:
        first = clients.curl_tls(lab.tls_port, sni, alpn="http/1.1", tls_version="1.3", ca=lab.ca_path)
        assert first.http_code == 200, first.stderr
        time.sleep(1.0)
        yield events
    finally:
        code = daemon.stop()
    assert code == 0, daemon.stderr()


def recorded_events(path: Path) -> tuple[int | None, list[Event]]:
    """The recording's clock offset (None: no clock record) and its kernel records decoded, in order."""
    decoder, offset, events = Decoder(), None, []
    for kind, payload in RecordingReader(path):
        if kind == "context":
            if payload.get("type") == "clock":  # type: ignore[union-attr]
                offset = int(payload["offset_ns"])  # type: ignore[index]
            continue
        ev = decoder.decode(payload)  # type: ignore[arg-type]
        if ev is not None:
            events.append(ev)
    return offset, events
