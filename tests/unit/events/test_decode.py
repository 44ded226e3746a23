"""The decoder: raw ring-buffer records to event tuples, errors counted, held TLS record headers rejoined."""

from __future__ import annotations

from otel_envoy.events.decode import Decoder
from otel_envoy.events.layout import load_layout
from otel_envoy.events.recording import RecordingReader
from tests.support.replay import RECORDING


def test_decoder_counts_short_and_unknown_records():
    decoder = Decoder()
    assert decoder.decode(b"\x00" * 4) is None
    assert decoder.decode(b"\x00" * 8 + (99).to_bytes(4, "little") + b"\x00" * 20) is None
    accept_kind = load_layout().constants["EV_ACCEPT"]
    assert decoder.decode(b"\x00" * 8 + accept_kind.to_bytes(4, "little") + b"\x00" * 10) is None
    assert decoder.errors == {"short_record": 2, "unknown_kind": 1}


def _data_record(ret: int, payload: bytes, held: int = 0, held_data: bytes = b"") -> bytes:
    """A raw EV_DATA record as the kernel lays it out (packed with events.h's layout)."""
    layout = load_layout()
    packer, names = layout.structs["data_event"].unpacker(upto="data")
    c = layout.constants
    values = {"ts_ns": 1, "kind": c["EV_DATA"], "tgid": 2, "tid": 3, "round": 4, "fd": 5,
              "direction": c["DIR_READ"], "syscall": c["IO_READ"], "flags": 0, "role": c["ROLE_DOWNSTREAM"],
              "ret": ret, "msg_seq": 0, "held": held, "held_captured": len(held_data),
              "held_data": held_data.ljust(8, b"\0"), "captured": len(payload)}
    return packer.pack(*(values[n] for n in names)) + payload


def test_decoder_puts_a_held_tls_record_header_in_front_of_the_next_read():
    decoder = Decoder()
    header = b"\x16\x03\x01\x02\x00"
    body = b"\x01\x00\x01\xfc" + b"x" * 40
    # the kernel added the held read's 5 bytes to ret; the decoder makes data the stream as read
    ev = decoder.decode(_data_record(5 + len(body), body, held=5, held_data=header))
    assert ev.data == header + body and ev.captured == 5 + len(body) and ev.ret == 5 + len(body)
    # a header whose body was not captured (the handshake ended with that header): the header alone
    ev = decoder.decode(_data_record(74, b"", held=5, held_data=b"\x17\x03\x03\x00\x45"))
    assert ev.data == b"\x17\x03\x03\x00\x45" and ev.captured == 5 and ev.ret == 74
    # past the handshake nothing is captured: neither bytes nor a misaligned body
    ev = decoder.decode(_data_record(82, b"", held=5))
    assert ev.data == b"" and ev.captured == 0
    ev = decoder.decode(_data_record(3, b"abc"))
    assert ev.data == b"abc" and ev.held == 0
    assert not decoder.errors


def test_tls_record_header_reads_ride_on_the_next_read() -> None:
    """BoringSSL reads each TLS record's 5-byte header, then its body: the kernel sends one record for both
    (held + data), so a TLS connection's reads cost half the records. No read of a lone header is sent on
    the TLS connections of the real recording, and their bytes are the stream as read: the listener
    filter's peek holds the whole ClientHello record (its read after the peek is not sent again), and each
    later read's record starts with the record header it rode on."""
    from otel_envoy.events.types import DataEvent

    c = load_layout().constants
    decoder = Decoder()
    conns: list[list[DataEvent]] = []  # each accepted connection's reads, peeks included
    current: dict[int, list[DataEvent]] = {}
    for kind, payload in RecordingReader(RECORDING):
        ev = decoder.decode(payload) if kind == "kernel" else None
        if ev is not None and ev.kind == c["EV_ACCEPT"]:
            current[ev.fd] = []
            conns.append(current[ev.fd])
        elif (isinstance(ev, DataEvent) and ev.direction == c["DIR_READ"] and ev.role == c["ROLE_DOWNSTREAM"]
              and ev.fd in current):
            current[ev.fd].append(ev)
    tls = [evs for evs in conns if evs and evs[0].flags & c["DATA_FLAG_PEEK"] and evs[0].data[:1] == b"\x16"]
    assert len(tls) == 2  # the TLS 1.3 and the TLS 1.2 connection
    for evs in tls:
        peek, reads = evs[0], [ev for ev in evs[1:] if not ev.flags & c["DATA_FLAG_PEEK"]]
        assert peek.ret == 5 + int.from_bytes(peek.data[3:5], "big")  # the whole ClientHello record
        assert all(ev.ret != 5 for ev in reads)
        held = [ev for ev in reads if ev.held]
        assert len(held) >= 3 and all(ev.held == 5 for ev in held)
        first = held[0]  # its header's bytes are in front of its body's
        assert first.data[:1] in (b"\x16", b"\x17")
        assert first.ret == 5 + int.from_bytes(first.data[3:5], "big")
