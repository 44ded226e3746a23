"""ConnectionSpanBuilder (spans/connection.py) on the records of connection stories the correlator saw.

Each test feeds a connection's story (tests/support/events.py) to the correlator, builds the spans of the
ConnectionRecord it emits and checks the trace shape: root, accept queue, listener filters, TLS handshake.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
from opentelemetry.trace.status import StatusCode

from otel_envoy.events.types import Event
from otel_envoy.spans.clock import MonotonicClock
from otel_envoy.spans.connection import ConnectionSpanBuilder
from tests.support.correlation import (
    CLOSE_WAIT,
    ESTABLISHED,
    OFFSET,
    REQUEST,
    RESOURCE,
    RESPONSE,
    SYN_RECV,
    TCP_CLOSE,
    Harness,
    assert_shape,
    build,
    by_name,
    client_hello,
    plain_story,
)
from tests.support.events import (
    DIR_READ,
    DIR_WRITE,
    LOCAL,
    LPORT,
    PEER,
    TGID,
    TID,
    accept,
    close,
    data,
    established,
    read,
    state,
    tcp,
)
from tests.support.sdk_oracle import readable_connection_spans
from tests.support.tls_memory import MemoryTls


def test_plain_connection_spans() -> None:
    r = Harness().feed(plain_story()).only()
    spans = build(r)
    root = assert_shape(spans)
    assert [s.name for s in spans] == ["envoy.downstream.connection", "tcp.accept_queue",
                                       "envoy.listener_filters"]
    named = by_name(spans)
    assert root.start_time == OFFSET + 1_000 and root.end_time == OFFSET + 8_000
    q, lf = named["tcp.accept_queue"], named["envoy.listener_filters"]
    assert (q.start_time, q.end_time) == (OFFSET + 1_000, OFFSET + 2_000)
    assert (lf.start_time, lf.end_time) == (OFFSET + 2_000, OFFSET + 3_000)
    assert dict(root.attributes) == {
        "network.transport": "tcp",
        "network.type": "ipv4",
        "network.peer.address": PEER,
        "network.peer.port": 40000,
        "network.local.address": LOCAL,
        "network.local.port": LPORT,
        "process.pid": TGID,
        "thread.id": TID,
        "thread.name": "wrk:worker_0",
        "envoy.connection.fd": 30,
        "envoy.connection.bytes_received": len(REQUEST),
        "envoy.connection.bytes_sent": len(RESPONSE),
        "envoy.listener.name": "plain_http",
        "envoy.connection.close_initiator": "peer",
        "envoy.connection.socket_options": ("TCP_NODELAY",),  # one shared tuple per combination
        "envoy.connection.requests": 1,
    }
    assert dict(q.attributes) == {"tcp.accept_queue.depth": 1, "tcp.accept_queue.depth_on_arrival": 1}
    assert dict(lf.attributes) == {"envoy.listener_filters.peeked_bytes": 0,
                                   "envoy.listener_filters.peeks": 0}
    assert root.status.status_code == StatusCode.UNSET
    assert all(s.status.status_code == StatusCode.UNSET for s in spans)
    assert root.events == ()


def test_child_span_attributes_are_shared_by_value() -> None:
    """The accept-queue and listener-filter spans of connections with the same values carry one read-only
    attributes object (encoded once); other values get their own."""
    builder = ConnectionSpanBuilder(RESOURCE, MonotonicClock(OFFSET))
    # the last two queue together: the first of them waits with the other behind it, the other behind it
    stories = [plain_story(fd=30, pport=40001), plain_story(fd=31, pport=40002, t0=20_000),
               [established(40_000, 40003), established(40_100, 40004), accept(41_000, 32, 40003),
                accept(41_500, 33, 40004), close(42_000, 32), close(42_000, 33)]]
    h = Harness().feed([e for story in stories for e in story])
    spans = {r.fd: builder.build_records(r) for r in h.drain()}
    queue = {fd: s[1] for fd, s in spans.items()}
    assert queue[30].attributes is queue[31].attributes
    assert dict(queue[30].attributes) == {"tcp.accept_queue.depth": 1, "tcp.accept_queue.depth_on_arrival": 1}
    assert dict(queue[32].attributes) == {"tcp.accept_queue.depth": 2, "tcp.accept_queue.depth_on_arrival": 1}
    assert dict(queue[33].attributes) == {"tcp.accept_queue.depth": 1, "tcp.accept_queue.depth_on_arrival": 2}
    assert spans[30][2].attributes is spans[31][2].attributes
    with pytest.raises(TypeError):
        queue[30].attributes["tcp.accept_queue.depth"] = 5  # type: ignore[index]


def test_span_ids_differ_between_connections() -> None:
    builder = ConnectionSpanBuilder(RESOURCE, MonotonicClock(OFFSET))
    h = Harness().feed(plain_story(fd=30, pport=40001) + plain_story(fd=31, pport=40002, t0=20_000))
    a, b = (readable_connection_spans(builder, r) for r in h.drain())
    assert a[0].context.trace_id != b[0].context.trace_id
    assert {s.context.span_id for s in a}.isdisjoint({s.context.span_id for s in b})


def test_abort_spans_have_error_status_and_reset_event() -> None:
    r = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000),
        read(4_000, 30, REQUEST[:20]),
        tcp(5_000, "TCP_RESET_RECEIVED", 40000),
        close(6_000, 30, rx=20, epoll_adds=(3_000,)),
    ]).only()
    spans = build(r)
    root = assert_shape(spans)
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description == "connection reset by peer"
    assert [(e.name, e.timestamp) for e in root.events] == [("tcp.reset_received", OFFSET + 5_000)]
    assert not root.events[0].attributes  # tcp_receive_reset has no state
    assert root.attributes["envoy.connection.close_initiator"] == "peer"
    assert all(s.status.status_code == StatusCode.UNSET for s in spans[1:])


def test_reset_sent_by_the_close_extends_the_root() -> None:
    r = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        close(4_000, 30), tcp(4_500, "TCP_RESET_SENT", 40000, tcp_state=TCP_CLOSE),
    ]).only()
    root = assert_shape(build(r))
    assert root.end_time == OFFSET + 4_500
    assert root.status.status_code == StatusCode.ERROR
    assert root.status.description == "connection reset by envoy"
    assert dict(root.events[0].attributes) == {"tcp.state": TCP_CLOSE}
    assert root.attributes["envoy.connection.close_initiator"] == "envoy"


def test_reset_after_fin_is_not_an_error() -> None:
    r = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(3_000, 30, REQUEST),
        state(4_000, 40000, ESTABLISHED, CLOSE_WAIT), read(4_100, 30, b""),
        tcp(4_200, "TCP_RESET_RECEIVED", 40000), close(5_000, 30),
    ]).only()
    root = assert_shape(build(r))
    assert root.status.status_code == StatusCode.UNSET
    assert [e.name for e in root.events] == ["tcp.reset_received"]


def test_partial_connection_spans() -> None:
    # no ESTABLISHED, no epoll, no I/O: no accept-queue span, hand-off unknown
    h = Harness()
    h.c.set_listener_names({})
    r = h.feed([accept(2_000, 30, 40000), close(5_000, 30)]).only()
    spans = build(r)
    root = assert_shape(spans)
    named = by_name(spans)
    assert set(named) == {"envoy.downstream.connection", "envoy.listener_filters"}
    assert root.start_time == OFFSET + 2_000
    assert tuple(root.attributes["otel_envoy.partial"]) == ("established_not_seen",)
    for key in ("network.local.address", "envoy.listener.name", "envoy.connection.socket_options",
                "envoy.connection.still_open", "tls.client.server_name"):
        assert key not in root.attributes, key
    lf = named["envoy.listener_filters"]
    assert tuple(lf.attributes["otel_envoy.partial"]) == ("handoff_not_seen",)
    assert lf.end_time == root.end_time == OFFSET + 5_000


def test_still_open_connection_spans() -> None:
    # the kernel keeps the fd's epoll ADD for a close record that never comes
    h = Harness().feed([established(1_000, 40000), accept(2_000, 30, 40000), read(4_000, 30, REQUEST)])
    h.c.flush(9_000)
    spans = build(h.out[0])
    root = assert_shape(spans)
    assert root.attributes["envoy.connection.still_open"] is True
    assert "envoy.connection.close_initiator" not in root.attributes
    assert root.end_time == OFFSET + 9_000
    assert by_name(spans)["envoy.listener_filters"].end_time == OFFSET + 4_000  # its first real I/O


def test_multiple_partials_are_sorted_and_unique() -> None:
    h = Harness()
    h.c.set_listen_sockets({})
    h.feed([accept(2_000, 30, 40000), accept(3_000, 30, 40001)])
    root = build(h.out[0])[0]
    assert tuple(root.attributes["otel_envoy.partial"]) == (
        "close_not_seen", "established_not_seen", "listener_unknown")


def test_synack_retransmits_are_root_events() -> None:
    r = Harness().feed([tcp(500, "TCP_SYNACK_RETRANSMIT", 40000, tcp_state=SYN_RECV),
                        established(1_000, 40000), accept(2_000, 30, 40000), close(3_000, 30)]).only()
    root = build(r)[0]
    assert [e.name for e in root.events] == ["tcp.synack_retransmit"]
    assert root.status.status_code == StatusCode.UNSET


def test_incomplete_tls_handshake_span_is_an_error() -> None:
    hello = client_hello("b.example.com")
    r = Harness().feed([
        established(1_000, 40000), accept(2_000, 30, 40000), read(4_000, 30, hello, peek=True),
        read(7_000, 30, hello), state(7_500, 40000, ESTABLISHED, CLOSE_WAIT), read(7_600, 30, b""),
        close(8_000, 30, rx=len(hello), epoll_adds=(3_000, 6_000)),
    ]).only()
    spans = build(r)
    root = assert_shape(spans)
    named = by_name(spans)
    assert set(named) == {"envoy.downstream.connection", "tcp.accept_queue", "envoy.listener_filters",
                          "tls.handshake"}
    assert root.attributes["tls.client.server_name"] == "b.example.com"
    hs = named["tls.handshake"]
    assert hs.start_time == OFFSET + 4_000 and hs.end_time == root.end_time
    assert hs.status.status_code == StatusCode.ERROR
    assert hs.status.description == "connection closed during the TLS handshake"
    assert hs.attributes["tls.established"] is False
    assert named["envoy.listener_filters"].attributes["envoy.listener_filters.peeked_bytes"] == len(hello)


@pytest.fixture(scope="module")
def server_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("correlator-tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=a.example.com", "-days", "1", "-addext",
                    "subjectAltName=DNS:a.example.com", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def tls_transcript(cert: Path, key: str | Path) -> list[tuple[str, bytes]]:
    """("c", bytes Envoy read) / ("s", bytes Envoy wrote) of a TLS 1.3 handshake plus one request."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cert)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    pair = MemoryTls.wrap(client_ctx, server_ctx)
    assert pair.handshake(rounds=10) and not pair.errors and pair.client.version() == "TLSv1.3"
    pair.client.write(REQUEST)
    pair.msgs.append(("c", pair.c_out.read()))
    return pair.msgs


def test_complete_tls_handshake_span(server_cert: tuple[Path, Path]) -> None:
    msgs = tls_transcript(*server_cert)
    hello = msgs[0][1]
    events: list[Event] = [
        established(1_000, 40000), accept(2_000, 30, 40000), read(4_000, 30, hello, peek=True),
    ]
    t = 7_000
    for direction, chunk in msgs:
        events.append(data(t, 30, DIR_READ if direction == "c" else DIR_WRITE, len(chunk), chunk))
        t += 1_000
    events += [state(t, 40000, ESTABLISHED, CLOSE_WAIT), read(t + 100, 30, b""),
               close(t + 1_000, 30, epoll_adds=(3_000, 6_000))]
    r = Harness().feed(events).only()
    spans = build(r)
    root = assert_shape(spans)
    named = by_name(spans)
    hs = named["tls.handshake"]
    assert hs.attributes["tls.protocol.version"] == "1.3"
    assert hs.attributes["tls.client.server_name"] == "a.example.com"
    assert hs.attributes["tls.established"] is True
    assert hs.status.status_code == StatusCode.UNSET
    assert hs.start_time == OFFSET + 4_000  # the peeked ClientHello
    assert OFFSET + 7_000 < hs.end_time < root.end_time
    assert root.attributes["tls.client.server_name"] == "a.example.com"
    lf = named["envoy.listener_filters"]
    assert lf.end_time == OFFSET + 6_000 and lf.start_time <= hs.start_time <= lf.end_time
    assert root.status.status_code == StatusCode.UNSET


def test_each_process_s_spans_carry_its_own_resource_in_one_dict() -> None:
    """set_process_resource: the spans of that tgid share one resource dict (the encoders group by identity),
    other processes keep the daemon's; the operator's keys stay; an exited process's resource stays for
    its last spans until RETIRED_PROCESSES more exited."""
    from opentelemetry.sdk.resources import Resource

    from otel_envoy.spans.connection import RETIRED_PROCESSES

    builder = ConnectionSpanBuilder(Resource.create({"service.name": "edge", "deployment.environment": "p"}),
                                    MonotonicClock(OFFSET), fixed_keys={"service.name"})
    default = builder.span_tail[0]
    own = {"service.name": "reviews", "container.id": "ab" * 32, "process.pid": TGID,
           "telemetry.sdk.language": "cpp", "deployment.environment": "dev"}
    builder.set_process_resource(TGID, own)
    first = builder.build_records(Harness().feed(plain_story()).only())
    second = builder.build_records(Harness().feed(plain_story(fd=31, pport=40001)).only())
    attrs = first[0].resource_attributes
    assert all(s.resource_attributes is attrs for s in first + second)
    assert attrs["service.name"] == "edge"  # the operator's OTEL_SERVICE_NAME
    assert attrs["container.id"] == "ab" * 32 and attrs["process.pid"] == TGID
    assert attrs["deployment.environment"] == "dev"  # not fixed: the process's own wins
    assert attrs["telemetry.sdk.language"] == "python"  # otel-envoy made the spans
    builder.set_process_resource(TGID, dict(own))  # told again, the same: the same dict
    assert builder.tail_for(TGID)[0] is attrs
    assert builder.tail_for(TGID + 1)[0] is default
    builder.set_process_resource(TGID, None)  # exited: still there for its lingering connections
    assert builder.tail_for(TGID)[0] is attrs
    for pid in range(10_000, 10_000 + RETIRED_PROCESSES):
        builder.set_process_resource(pid, {"process.pid": pid})
        builder.set_process_resource(pid, None)
    assert builder.tail_for(TGID)[0] is default  # forgotten, oldest first
    last = 10_000 + RETIRED_PROCESSES - 1
    assert builder.tail_for(last)[0]["process.pid"] == last
    assert len(builder.tails) == RETIRED_PROCESSES
    builder.set_process_resource(TGID + 5, None)  # never told of: nothing to forget
    assert len(builder.tails) == RETIRED_PROCESSES
