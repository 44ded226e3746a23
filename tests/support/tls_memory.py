"""Real TLS handshakes in memory (Python's ssl with MemoryBIOs), recorded as the bytes each side wrote."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field

__all__ = ["MemoryTls", "Msg"]

Msg = tuple[str, bytes]  # ("c", bytes the client wrote) / ("s", bytes the server wrote)


@dataclass
class MemoryTls:
    """A client and a server SSLObject wired back to back; ``msgs`` records every flight in order."""

    client: ssl.SSLObject
    server: ssl.SSLObject
    c_in: ssl.MemoryBIO
    c_out: ssl.MemoryBIO
    s_in: ssl.MemoryBIO
    s_out: ssl.MemoryBIO
    msgs: list[Msg] = field(default_factory=list)
    errors: list[tuple[str, Exception]] = field(default_factory=list)

    @classmethod
    def wrap(cls, client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, *, sni: str = "a.example.com",
             session: ssl.SSLSession | None = None) -> MemoryTls:
        """Wrap fresh BIOs with the two contexts."""
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_side=False, server_hostname=sni, session=session)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        return cls(client, server, c_in, c_out, s_in, s_out)

    def handshake(self, rounds: int = 20) -> bool:
        """Drive both sides until both finished (an SSLError ends that side, recorded in ``errors``)."""
        done = {"c": False, "s": False}
        sides = (("c", self.client, self.c_out, self.s_in), ("s", self.server, self.s_out, self.c_in))
        for _ in range(rounds):
            for name, obj, out, peer_in in sides:
                if not done[name]:
                    try:
                        obj.do_handshake()
                        done[name] = True
                    except ssl.SSLWantReadError:
                        pass
                    except ssl.SSLError as exc:
                        self.errors.append((name, exc))
                        done[name] = True
                data = out.read()
                if data:
                    self.msgs.append((name, data))
                    peer_in.write(data)
            if all(done.values()):
                return True
        return False

    def exchange(self, request: bytes, response: bytes) -> None:
        """One request and its response over the established session (both recorded)."""
        self.client.write(request)
        data = self.c_out.read()
        self.msgs.append(("c", data))
        self.s_in.write(data)
        self.server.read(1000)
        self.server.write(response)
        data = self.s_out.read()
        self.msgs.append(("s", data))
        self.c_in.write(data)
        self.client.read(1000)  # also consumes TLS 1.3 session tickets
