"""Connections adopted from the socket table (correlate/downstream.py ``adopt``), told as the kernel reports
them after the adoption: no accept, no TCP handshake, the first bytes seen mid-stream."""

from __future__ import annotations

from otel_envoy.events.recording_context import AdoptedConnection, AdoptedContext
from otel_envoy.protocols.detect import Protocol, is_tls_record
from tests.support.correlation import REQUEST, RESPONSE, Harness, build, by_name, plain_story
from tests.support.events import LISTEN_FD, LPORT, PEER, TGID, accept, close, read, write

ADOPTED_AT = 500


def _adopted(fd: int = 40, pport: int = 41000) -> AdoptedContext:
    conn = AdoptedConnection(TGID, fd, LISTEN_FD, PEER, pport, "10.0.0.1", LPORT)
    return AdoptedContext(ADOPTED_AT, (conn,))


def test_an_adopted_connection_starts_at_its_adoption_and_says_so() -> None:
    h = Harness()
    h.c.adopt(_adopted())
    h.feed([read(1_000, 40, REQUEST), write(2_000, 40, RESPONSE), read(3_000, 40, b""),
            close(4_000, 40, rx=len(REQUEST), tx=len(RESPONSE))])
    r = h.only()
    assert r.adopted and r.accept_ns == ADOPTED_AT and r.start_ns == ADOPTED_AT
    assert (r.peer_address, r.peer_port, r.local_port, r.local_address) == (PEER, 41000, LPORT, "10.0.0.1")
    assert r.listener_name == "plain_http"
    assert r.partial == []  # no handshake was expected: not "established_not_seen"
    assert r.protocol is Protocol.HTTP1 and r.http.count == 1
    spans = by_name(build(r))
    root = spans["envoy.downstream.connection"]
    assert root.attributes["envoy.connection.adopted"] is True
    assert "thread.id" not in root.attributes  # which worker accepted it is not known
    assert set(spans) == {"envoy.downstream.connection"}  # no accept queue, listener filters or TLS
    assert root.start_time == ADOPTED_AT + 1_700_000_000_000_000_000


def test_a_tls_connection_picked_up_mid_stream_is_tls_without_a_handshake() -> None:
    record = bytes([23, 3, 3, 0, 40]) + bytes(40)  # an application-data record
    h = Harness()
    h.c.adopt(_adopted())
    h.feed([read(1_000, 40, record), close(2_000, 40, rx=len(record))])
    r = h.only()
    assert r.protocol is Protocol.TLS and r.tls.handshake is None and r.http.parser is None
    assert (TGID, LISTEN_FD) in h.c.downstream.tls_listeners  # its listener is a TLS one
    assert is_tls_record(record) and not is_tls_record(REQUEST) and not is_tls_record(b"\x17\x03")


def test_an_fd_accepted_after_the_programs_were_attached_is_not_adopted_again() -> None:
    h = Harness()
    h.feed([accept(100, 40, 41000)])
    h.c.adopt(_adopted())
    assert not h.c.downstream.open[(TGID, 40)].adopted
    assert h.c.stats["adopted"] == 0


def test_a_new_connection_is_not_marked_adopted() -> None:
    r = Harness().feed(plain_story()).only()
    assert not r.adopted
    assert "envoy.connection.adopted" not in by_name(build(r))["envoy.downstream.connection"].attributes


def test_the_context_record_round_trips() -> None:
    ctx = _adopted()
    assert AdoptedContext.from_json(ctx.to_json()) == ctx
