"""A TLS client over a real TCP connection whose handshake a test drives flight by flight (Python's ssl over
MemoryBIOs): it can give up after the server's hello flight, wait before its own last flight, or end the
connection with a reset."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from pathlib import Path

__all__ = ["SteppedTlsClient"]


class SteppedTlsClient:
    """One connection to ``127.0.0.1:port``, TLS with ``sni`` against the lab's CA (``ca``)."""

    def __init__(self, port: int, sni: str, ca: Path, *, context: ssl.SSLContext | None = None,
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        ctx = context or ssl.create_default_context(cafile=str(ca))
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_hostname=sni)

    def send_hello(self) -> None:
        """Send the ClientHello."""
        self._step()
        self.sock.sendall(self._out.read())

    def read_server_flight(self) -> None:
        """Read the server's answer until the client's side of the handshake is done (its last flight is
        then ready, not sent). Raises ssl.SSLError when the server refused the hello."""
        while not self._step():
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection during the handshake")
            self._in.write(data)

    def send_last_flight(self) -> None:
        """Send the client's last flight (TLS 1.3: its Finished): the server's handshake completes."""
        self.sock.sendall(self._out.read())

    def handshake(self, pause_s: float = 0.0) -> None:
        """The whole handshake, waiting ``pause_s`` before the client's last flight."""
        self.send_hello()
        self.read_server_flight()
        time.sleep(pause_s)
        self.send_last_flight()

    def get(self, path: str = "/") -> bytes:
        """One HTTP/1.1 request over the connection; the first bytes of the answer."""
        self.tls.write(f"GET {path} HTTP/1.1\r\nHost: a.example.com\r\n\r\n".encode())
        self.sock.sendall(self._out.read())
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return b""
                self._in.write(data)

    def close(self) -> None:
        """Close without a reset (a FIN)."""
        self.sock.close()

    def reset(self) -> None:
        """Close with a reset (SO_LINGER 0): the server's next read fails with ECONNRESET."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def _step(self) -> bool:
        """One step of the handshake: True when the client's side is done."""
        try:
            self.tls.do_handshake()
            return True
        except ssl.SSLWantReadError:
            return False
