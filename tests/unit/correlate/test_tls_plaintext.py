"""TLS plaintext from the uprobe tier (correlate/tls_plaintext.py): exact requests on a TLS connection."""

from __future__ import annotations

from otel_envoy.events.layout import load_layout
from tests.support.correlation import Harness
from tests.support.events import accept, close, data, established, read
from tests.support.tls_bytes import handshake, record, spec_client_hello

C = load_layout().constants


def plain(ts: int, fd: int, direction: int, payload: bytes, *, role: int | None = None):
    """A record of the uprobe tier: what SSL_read returned (DIR_READ) or SSL_write took."""
    ev = data(ts, fd, direction, len(payload), payload, role=role, seq=0, syscall=0)
    return ev._replace(flags=C["DATA_FLAG_TLS_PLAINTEXT"])


def client_hello() -> bytes:
    """The client's first TLS record: the connection is TLS on the wire."""
    return record(0x16, handshake(1, spec_client_hello()))


REQ = b"GET /orders/7 HTTP/1.1\r\nHost: shop\r\nUser-Agent: t\r\n\r\n"
RESP = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def test_plaintext_records_make_exact_requests_on_a_tls_connection() -> None:
    seen = []
    h = Harness(on_request=lambda rr, ex: seen.append(
        (rr.conn.http.source, ex.request.method, ex.request.path,
         ex.response.status if ex.response else None)))
    hello = client_hello()
    h.feed([established(1_000, 40100), accept(2_000, 40, 40100), read(3_000, 40, hello),
            plain(4_000, 40, C["DIR_READ"], REQ), plain(5_000, 40, C["DIR_WRITE"], RESP),
            plain(6_000, 40, C["DIR_READ"], REQ.replace(b"/orders/7", b"/orders/8")),
            plain(7_000, 40, C["DIR_WRITE"], RESP.replace(b"404 Not Found", b"200 OK")), close(8_000, 40)])
    assert seen == [("uprobe", "GET", "/orders/7", 404), ("uprobe", "GET", "/orders/8", 200)]
    conn = h.only()
    assert conn.tls.handshake is not None  # the ciphertext still fed the handshake tracker
    assert "records_lost" not in conn.partial  # plaintext records are outside the syscall records' sequence
    assert h.c.stats["tls_plaintext_records"] == 4


def test_a_response_before_any_request_and_upstream_or_unknown_records_are_left_out() -> None:
    seen = []
    h = Harness(on_request=lambda rr, ex: seen.append(ex.request.path))
    h.feed([established(1_000, 40101), accept(2_000, 41, 40101), read(3_000, 41, client_hello()),
            plain(4_000, 41, C["DIR_WRITE"], RESP),  # the middle of a connection: no request seen yet
            plain(4_500, 41, C["DIR_READ"], REQ, role=C["ROLE_UPSTREAM"]),
            plain(4_600, 99, C["DIR_READ"], REQ),  # no such connection
            plain(5_000, 41, C["DIR_READ"], REQ), plain(6_000, 41, C["DIR_WRITE"], RESP), close(7_000, 41)])
    assert seen == ["/orders/7"]
    stats = h.c.stats
    assert stats["tls_plaintext_upstream_ignored"] == 1 and stats["tls_plaintext_without_connection"] == 1
