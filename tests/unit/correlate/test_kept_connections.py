"""Connections the sampler left out that the kernel kept at their close (EV_CONNECTION_KEPT,
correlate/kept_connections.py): one record becomes the connection a traced one would have been, its TLS
handshake rebuilt from the bytes the kernel held, marked with why it was kept."""

from __future__ import annotations

from otel_envoy.spans.model import STATUS_CODE_ERROR
from tests.support.correlation import Harness, build, by_name, client_hello
from tests.support.events import LISTEN_FD, PEER, C, connection_kept
from tests.support.tls_bytes import handshake, record, server_hello_body

HS_HELLO, HS_DONE = 1, 4
ALERT = record(21, b"\x02\x28")  # fatal handshake_failure: the server refused the hello
SERVER_HELLO_13 = record(22, handshake(2, server_hello_body(extensions=[(43, b"\x03\x04")])))


def test_a_refused_handshake_is_a_connection_with_its_hello_and_the_server_s_alert() -> None:
    hello = client_hello()
    h = Harness().feed([connection_kept(9_000, 31, 40001, "TLS_FAILED", open_ts=2_000, established_ns=1_500,
                                        hello=hello, hello_ts=3_000, flight=ALERT, flight_ts=3_500,
                                        hs_start=3_000, hs_state=HS_HELLO, rx=len(hello), tx=len(ALERT))])
    r = h.only()
    assert (r.fd, r.peer_address, r.peer_port, r.listen_fd) == (31, PEER, 40001, LISTEN_FD)
    assert (r.accept_ns, r.close_ns, r.tcp.established_ns) == (2_000, 9_000, 1_500)
    assert r.kept == "tls_handshake_failed"
    assert (r.traffic.bytes_received, r.traffic.bytes_sent) == (len(hello), len(ALERT))
    tls = r.tls.handshake
    assert tls.client_hello.server_name == "a.example.com" and tls.completed_ns is None
    assert "handshake_failure" in tls.error
    assert h.c.stats["connections_kept_tls_handshake_failed"] == 1
    spans = by_name(build(r))
    assert spans["envoy.downstream.connection"].attributes["otel_envoy.kept"] == "tls_handshake_failed"
    assert spans["tls.handshake"].status.status_code.value == STATUS_CODE_ERROR
    assert spans["tls.handshake"].attributes["tls.client.server_name"] == "a.example.com"


def test_a_slow_handshake_completes_when_the_kernel_saw_it_complete() -> None:
    """The bytes that completed it (the client's Finished) were not held: the kernel's time of it is used."""
    r = Harness().feed([connection_kept(
        900_000_000, 32, 40002, "TLS_SLOW", open_ts=2_000, hello=client_hello(), hello_ts=3_000,
        flight=SERVER_HELLO_13, flight_ts=4_000, hs_start=3_000, hs_end=600_003_000, hs_state=HS_DONE,
        hs_version=0x0304)]).only()
    tls = r.tls.handshake
    assert (tls.version, tls.completed_ns, tls.error) == ("1.3", 600_003_000, None)
    span = by_name(build(r))["tls.handshake"]
    assert span.attributes["tls.established"] is True
    assert span.end_time - span.start_time == 600_000_000


def test_a_kept_connection_whose_bytes_were_not_held_says_so() -> None:
    r = Harness().feed([connection_kept(9_000, 33, 40003, "RESET", open_ts=2_000, established_ns=1_000,
                                        hs_start=3_000, hs_end=5_000, hs_state=HS_DONE)]).only()
    assert r.kept == "reset" and r.partial == ["handshake_bytes_not_held"]
    spans = by_name(build(r))
    assert "tls.handshake" not in spans
    assert spans["envoy.downstream.connection"].attributes["otel_envoy.kept"] == "reset"


def test_a_slow_accept_keeps_its_wait_in_the_accept_queue() -> None:
    r = Harness().feed([connection_kept(900_000_000, 34, 40004, "ACCEPT_SLOW", open_ts=400_001_000,
                                        established_ns=1_000)]).only()
    assert r.kept == "accept_queue_slow" and r.tls.handshake is None and r.partial == []
    waited = by_name(build(r))["tcp.accept_queue"]
    assert waited.end_time - waited.start_time == 400_000_000


def test_reason_names_follow_the_kernel_s_enum() -> None:
    from otel_envoy.correlate.kept_connections import KEPT_CONNECTION_REASONS

    assert {C[f"KEEP_CONN_{k}"] for k in ("TLS_FAILED", "RESET", "TLS_SLOW", "ACCEPT_SLOW")} == {1, 2, 3, 4}
    assert [KEPT_CONNECTION_REASONS[i] for i in range(1, 5)] == [
        "tls_handshake_failed", "reset", "tls_handshake_slow", "accept_queue_slow"]


def test_a_connection_sampled_out_after_its_accept_and_kept_at_its_close_makes_a_span() -> None:
    """h2c decided whole at its preface and not traced, then reset: its close says kept; the span has no
    transfers (none was reported) and says so."""
    from tests.support.events import accept, close, established

    r = Harness().feed([established(1_000, 40005), accept(2_000, 35, 40005),
                        close(8_000, 35, rx=24, sampled_out=1, kept=C["KEEP_CONN_RESET"])]).only()
    assert (r.kept, r.partial, r.close_ns, r.traffic.bytes_received) == (
        "reset", ["transfers_not_reported"], 8_000, 24)


def test_a_traced_tls_connection_s_handshake_summary_leaves_it_open_for_its_later_records() -> None:
    """CONN_HS_SUMMARY: the accept reported, then one record at the handshake's end (KEPT_OPEN) instead of
    the handshake's transfers; the connection goes on as a traced one (a read, its close), not kept."""
    from tests.support.events import accept, close, established, read

    hello = client_hello()
    h = Harness().feed([
        established(1_000, 40006), accept(2_000, 36, 40006),
        connection_kept(5_000, 36, 40006, "SAMPLED", open_ts=2_000, established_ns=1_000, hello=hello,
                        hello_ts=3_000, flight=SERVER_HELLO_13, flight_ts=3_500, hs_start=3_000, hs_end=4_800,
                        hs_state=HS_DONE, hs_version=0x0304, close_flags=C["KEPT_OPEN"], round_=7),
    ])
    assert h.drain() == [] and h.c.stats["tls_handshake_summaries"] == 1
    r = h.feed([read(6_000, 36, b"", ret=120), close(9_000, 36, rx=len(hello) + 120)]).only()
    assert (r.kept, r.partial, r.accept_ns, r.close_ns, r.tcp.established_ns) == ("", [], 2_000, 9_000, 1_000)
    assert r.accept_queue is not None and (r.accept_queue.at_accept, r.accept_queue.on_arrival) == (1, 1)
    tls = r.tls.handshake
    assert (tls.client_hello.server_name, tls.version, tls.completed_ns) == ("a.example.com", "1.3", 4_800)
    assert r.tls.ready_round == 7
    assert (r.listener.peeks, r.listener.first_io_ns) == (1, 3_500)  # peeked: its read came before the flight
    assert r.traffic.bytes_received == len(hello) + 120
    spans = by_name(build(r))
    assert "otel_envoy.kept" not in spans["envoy.downstream.connection"].attributes
    assert spans["tls.handshake"].attributes["tls.client.server_name"] == "a.example.com"
    assert spans["tls.handshake"].end_time - spans["tls.handshake"].start_time == 1_800


def test_a_traced_tls_connection_closed_during_its_handshake_has_its_summary_then_its_close() -> None:
    from tests.support.events import accept, close

    hello = client_hello()
    r = Harness().feed([
        accept(2_000, 37, 40007),
        connection_kept(8_000, 37, 40007, "SAMPLED", open_ts=2_000, hello=hello, hello_ts=3_000,
                        peeked=False, flight=ALERT, flight_ts=3_500, hs_start=3_000, hs_state=HS_HELLO),
        close(8_000, 37, rx=len(hello), tx=len(ALERT)),
    ]).only()
    assert (r.kept, r.close_ns, r.listener.first_io_ns, r.listener.peeks) == ("", 8_000, 3_000, 0)
    assert "handshake_failure" in r.tls.handshake.error


def test_a_handshake_summary_whose_accept_was_lost_makes_the_connection_from_its_record() -> None:
    from tests.support.events import TGID, close

    h = Harness().feed([
        connection_kept(5_000, 38, 40008, "SAMPLED", open_ts=2_000, hello=client_hello(), hello_ts=3_000,
                        flight=SERVER_HELLO_13, flight_ts=3_500, hs_start=3_000, hs_end=4_000,
                        hs_state=HS_DONE, close_flags=C["KEPT_OPEN"]),
    ])
    assert h.c.downstream.open[(TGID, 38)].accept_ns == 2_000
    r = h.feed([close(9_000, 38)]).only()
    assert (r.kept, r.tls.handshake.completed_ns) == ("", 4_000)


def test_a_tls_connection_hands_every_worker_s_socket_of_its_listener_to_the_kernel() -> None:
    """SO_REUSEPORT: each worker accepts on a socket of its own, same address and port. The first TLS
    connection on any of them makes all of them TLS listeners (their connections decided whole, their
    handshakes summarized), not only its own; a socket of another port or address stays as it was."""
    from tests.support.events import TGID, accept, listen_sockets, read

    handed: list[tuple[tuple[int, int], int]] = []
    h = Harness()
    h.c.set_listen_sockets(listen_sockets((TGID, LISTEN_FD, "0.0.0.0", 10000, None),
                                          (TGID, LISTEN_FD + 1, "0.0.0.0", 10000, None),
                                          (TGID, LISTEN_FD + 2, "0.0.0.0", 10001, None),
                                          (TGID, LISTEN_FD + 3, "127.0.0.2", 10000, None)))
    h.c.downstream.on_tls_listener = lambda key, port: handed.append((key, port))
    h.feed([accept(1_000, 40, 40009), read(2_000, 40, client_hello())])
    assert sorted(handed) == [((TGID, LISTEN_FD), 10000), ((TGID, LISTEN_FD + 1), 10000)]
    assert h.c.downstream.tls_listeners == dict(handed)
    h.feed([accept(3_000, 41, 40010, listen_fd=LISTEN_FD + 1), read(4_000, 41, client_hello())])
    assert len(handed) == 2  # known already
