"""Per-connection TLS handshake tracking from both directions of captured bytes.

:class:`TlsHandshakeTracker` drives a :class:`~.record_layer.TlsRecordReader` and a
:class:`~.record_layer.HandshakeReassembler` per direction, decodes the hellos (:mod:`.hello`) and decides
when the handshake completed, failed, or could no longer be followed.  Nothing raises out of its public
API: malformed or truncated input is recorded as strings (``error``, ``warnings``).
"""

from __future__ import annotations

from ...shared_attributes import SharedAttributes
from .hello import (
    HRR_RANDOM,
    HS_CLIENT_HELLO,
    HS_SERVER_HELLO,
    ClientHello,
    ServerHello,
    TlsParseError,
    client_fingerprints,
    server_fingerprint,
)
from .hello_shapes import parse_client_hello_shaped, parse_server_hello_shaped
from .names import alert_description_name, alert_level_name, cipher_suite_name, tls_version_name
from .record_layer import (
    CT_ALERT,
    CT_APPLICATION_DATA,
    CT_CHANGE_CIPHER_SPEC,
    CT_HANDSHAKE,
    HandshakeReassembler,
    TlsRecord,
    TlsRecordReader,
    first_handshake_message,
    whole_record_types,
)

__all__ = ["TlsHandshakeTracker"]

# Smallest possible TLS 1.3 encrypted Finished record: 32-byte verify_data + inner content type + 8-byte
# tag (CCM_8).  An encrypted alert is 2 + 1 + 16 (or 8) bytes: a lone smaller record is taken for an alert.
_MIN_TLS13_FINISHED_RECORD = 32 + 1 + 8
_MAX_TLS13_ALERT_RECORD = 2 + 1 + 16  # an unpadded encrypted alert with a 16-byte AEAD tag

_CLOSURE_ALERTS = (0, 90)  # close_notify, user_canceled: end the connection whatever their level

_MAX_ALERTS = 8
_MAX_WARNINGS = 8

_COLLECT_HELLO = frozenset((CT_ALERT, CT_HANDSHAKE))
_COLLECT_ALERTS = frozenset((CT_ALERT,))
_COLLECT_HANDSHAKE = frozenset((CT_HANDSHAKE,))
_COLLECT_NOTHING: frozenset[int] = frozenset()
#: summary()'s attributes by outcome, shared by the handshakes with that outcome; emptied when full
_SUMMARIES: dict[tuple[object, ...], SharedAttributes] = {}
_SUMMARIES_MAX = 256
_NO_ATTRIBUTES = SharedAttributes()


class TlsHandshakeTracker:
    """Follows one downstream connection's TLS handshake from both directions of captured bytes.

    Feed ``on_client_data`` (bytes Envoy read from the client; ``peek=True`` for ``MSG_PEEK``) and
    ``on_server_data`` (bytes Envoy wrote to the client) in capture order, then read the attributes or
    :meth:`summary`.  Public methods never raise; problems are recorded in ``error`` (the handshake
    failed or could not be followed) and ``warnings`` (capture imperfections that were survived).

    Completion (``completed_ns`` = timestamp of the message that completed it):

    * TLS 1.3: the first client message after the ServerHello holding an application-data record
      (the encrypted client Finished; a CCS alone doesn't count).  A lone record too short to be a
      Finished is taken for an encrypted alert (``error`` "tls alert (encrypted)") unless more client
      records follow.  If the server's first record after completion is a lone alert-sized encrypted
      record (it rejected the client's flight, e.g. a missing client certificate), the completion is
      withdrawn and ``error`` is "tls alert (encrypted) from the server after the client Finished".
      ``resumed`` = the server accepted a PSK.
    * TLS 1.2 full: the server message holding its ChangeCipherSpec after the client sent its own.
    * TLS 1.2 abbreviated (``resumed``): the server's first flight holds its CCS; completion is the next
      client message holding the client's CCS.
    * An alert before completion ends the handshake (except non-closure warnings in TLS <= 1.2).

    After completion only record counts are kept (``app_records_in/out``), cheaply.

    A direction's record reader (and handshake reassembler) is made when it is first needed: a listener
    filter's peek of a whole ClientHello and a server's first flight of whole records starting with a whole
    ServerHello (what a traced connection's handshake summary holds) need neither.
    """

    __slots__ = (
        "_abbreviated", "_c_collect", "_ch_done", "_check_server_reply", "_chs", "_client_ccs",
        "_client_reads", "_cr", "_error", "_failed", "_flight_bytes", "_flight_open", "_flight_records",
        "_head", "_pending_counted", "_resync", "_s_collect", "_sh_done", "_shs", "_sr", "_suspect_alert",
        "_tls13",
        "alerts", "app_records_in", "app_records_out", "cipher", "client_hello", "completed_ns",
        "hello_retry_request", "is_tls", "negotiated_alpn", "resumed", "server_hello", "server_hello_ns",
        "started_ns", "version", "warnings",
    )

    def __init__(self, *, resync: bool = True) -> None:
        """``resync``: after a capture gap desynchronises a direction, pick the stream up again at the
        next message that starts with a plausible record header."""
        self.is_tls: bool | None = None
        self.client_hello: ClientHello | None = None
        self.server_hello: ServerHello | None = None
        self.hello_retry_request: ServerHello | None = None
        self.started_ns: int | None = None
        self.server_hello_ns: int | None = None
        self.completed_ns: int | None = None
        self.version: str | None = None
        self.cipher: str | None = None
        self.resumed: bool | None = None
        self.negotiated_alpn: str | None = None
        self.alerts: list[tuple[str, int, int]] = []  # (sender "client"/"server", level, description)
        self.warnings: list[str] = []
        self.app_records_in = 0
        self.app_records_out = 0
        self._error: str | None = None
        self._resync = resync
        self._cr: TlsRecordReader | None = None  # made when first needed (_client_reader)
        self._sr: TlsRecordReader | None = None
        self._chs: HandshakeReassembler | None = None
        self._shs: HandshakeReassembler | None = None
        self._c_collect = self._s_collect = _COLLECT_HELLO  # the readers' collect_types, made or not
        self._flight_records = 0  # records and bytes of a first server flight read without a reader
        self._flight_bytes = 0
        self._head = b""  # first (< 3) client bytes while is_tls is undecided
        self._client_reads = 0  # non-peek client messages
        self._pending_counted = False  # a record judged by its header alone, its body still due
        self._ch_done = False  # ClientHello parsed, failed or lost: stop looking for it
        self._sh_done = False  # final ServerHello parsed or lost
        self._tls13 = False
        self._flight_open = False  # TLS <= 1.2: server's first flight, before any client data after SH
        self._abbreviated = False
        self._client_ccs = False
        self._suspect_alert = False
        self._check_server_reply = False  # TLS 1.3: look at the server's first record after completion
        self._failed = False  # alert seen / internal error: handshake over, no completion possible

    # ---- public API --------------------------------------------------------------------------------

    @property
    def error(self) -> str | None:
        """Why the handshake failed or could not be followed; None when all is well (so far)."""
        if self._error is not None:
            return self._error
        if self.completed_ns is None:
            if self._suspect_alert:
                return "tls alert (encrypted)"
            if self._cr is not None and self._cr.error is not None:
                return f"client stream: {self._cr.error}"
            if self._sr is not None and self._sr.error is not None:
                return f"server stream: {self._sr.error}"
        return None

    @property
    def established(self) -> bool:
        """The handshake completed."""
        return self.completed_ns is not None

    @property
    def records_in(self) -> int:
        """Records read from the client (peeks excluded)."""
        return self._cr.total_records if self._cr is not None else 0

    @property
    def records_out(self) -> int:
        """Records written to the client."""
        return self._flight_records + (self._sr.total_records if self._sr is not None else 0)

    @property
    def bytes_in(self) -> int:
        """Bytes read from the client (peeks excluded), captured or not."""
        return self._cr.bytes if self._cr is not None else 0

    @property
    def bytes_out(self) -> int:
        """Bytes written to the client, captured or not."""
        return self._flight_bytes + (self._sr.bytes if self._sr is not None else 0)

    def buffered_bytes(self) -> int:
        """Bytes currently held in reassembly buffers (bounded by ~2 records + 2 handshake messages)."""
        return sum(part.buffered_bytes for part in (self._cr, self._sr, self._chs, self._shs)
                   if part is not None) + len(self._head)

    def on_client_data(self, ts_ns: int, data: bytes, total_len: int | None = None,
                       peek: bool = False) -> None:
        """Bytes Envoy read from the client (``peek``: a ``MSG_PEEK`` read, not consumed)."""
        try:
            if peek:
                self._client_peek(ts_ns, data, total_len)
            else:
                self._client_read(ts_ns, data, total_len)
        except Exception as exc:  # defensive: never let a parser bug escape into the daemon
            self._internal_error(exc)

    def on_server_data(self, ts_ns: int, data: bytes, total_len: int | None = None) -> None:
        """Bytes Envoy wrote to the client."""
        try:
            self._server_write(ts_ns, data, total_len)
        except Exception as exc:  # defensive, as above
            self._internal_error(exc)

    def completed_at(self, ts_ns: int) -> None:
        """The kernel saw the handshake complete at ``ts_ns`` (its own state machine: bpf/tls_handshake.bpf.h)
        where the bytes that completed it were not captured (a kept connection's): completed then, unless
        what was captured says it failed."""
        if self.completed_ns is None and not self._failed and self._error is None:
            self.completed_ns = ts_ns

    def summary(self) -> SharedAttributes:
        """OpenTelemetry ``tls.*`` attributes of what was observed (unknown values are omitted). Handshakes
        with the same outcome (a client's connections, mostly) get the same read-only object, which the
        encoders write once."""
        if self.is_tls is not True:
            return _NO_ATTRIBUTES
        ch = self.client_hello
        hello = None
        if ch is not None:  # the fingerprints are cached objects: the key hashes and compares cheaply
            hello = (ch.server_name, tuple(ch.alpn), *client_fingerprints(ch))
        server = server_fingerprint(self.server_hello) if self.server_hello is not None else None
        key = (self.version, hello, server, self.negotiated_alpn, self.cipher, self.resumed,
               self.completed_ns is not None)
        attrs = _SUMMARIES.get(key)
        if attrs is None:
            if len(_SUMMARIES) >= _SUMMARIES_MAX:
                _SUMMARIES.clear()
            attrs = _SUMMARIES[key] = SharedAttributes(self._summary(hello, server))
        return attrs

    def _summary(self, hello: tuple | None, server: str | None) -> dict[str, object]:
        attrs: dict[str, object] = {"tls.protocol.name": "tls"}
        if self.version is not None:
            attrs["tls.protocol.version"] = self.version
        if hello is not None:
            server_name, alpn, ciphers, ja3, ja4 = hello
            if server_name is not None:
                attrs["tls.client.server_name"] = server_name
            attrs["tls.client.supported_alpn"] = list(alpn)
            attrs["tls.client.supported_ciphers"] = ciphers
            attrs["tls.client.ja3"] = ja3
            attrs["tls.client.ja4"] = ja4
        if server is not None:
            attrs["tls.server.ja3s"] = server
        if self.negotiated_alpn is not None:
            attrs["tls.next_protocol"] = self.negotiated_alpn
        if self.cipher is not None:
            attrs["tls.cipher"] = self.cipher
        if self.resumed is not None:
            attrs["tls.resumed"] = self.resumed
        attrs["tls.established"] = self.completed_ns is not None
        return attrs

    # ---- client direction ----------------------------------------------------------------------------

    def _client_peek(self, ts_ns: int, data: bytes, total_len: int | None) -> None:
        if self.is_tls is False or self._failed:
            return
        if self.client_hello is not None or self._client_reads:
            return  # a peek after the stream moved on shows nothing new for us
        if self.is_tls is None:
            self._decide(bytes(data[:3]), remember=False)
            if self.is_tls is False:
                return
        if not len(data):
            return
        if self.started_ns is None or ts_ns < self.started_ns:
            self.started_ns = ts_ns
        if self._ch_done:
            return
        first = first_handshake_message(data)
        if first is not None:  # the usual peek: one record holding the whole ClientHello
            if first[0] == HS_CLIENT_HELLO:
                self._on_client_hello(first[1])
            return
        # Parse from scratch with throw-away state: a peek doesn't consume, the next read shows it again.
        reader = TlsRecordReader(collect_types=_COLLECT_HANDSHAKE)
        hs = HandshakeReassembler()
        for rec in reader.feed(data, total_len):
            if rec.content_type != CT_HANDSHAKE:
                return
            for msg_type, body in hs.feed(rec.fragment, rec.length - len(rec.fragment)):
                if msg_type == HS_CLIENT_HELLO:
                    self._on_client_hello(body)
                return

    def _client_read(self, ts_ns: int, data: bytes, total_len: int | None) -> None:
        if self.is_tls is False:
            return
        self._client_reads += 1
        if self.is_tls is None:
            self._decide(self._head + bytes(data[: 3 - len(self._head)]), remember=True)
            if self.is_tls is False:
                return
        if self.started_ns is None and (len(data) or self._head):
            self.started_ns = ts_ns
        reader = self._cr or self._client_reader()
        if self.completed_ns is not None or self._failed:
            before = reader.records.get(CT_APPLICATION_DATA, 0)
            reader.feed(data, total_len)
            if self.completed_ns is not None:
                delta = reader.records.get(CT_APPLICATION_DATA, 0) - before
                if delta and self._pending_counted:  # the record judged by its header completed now
                    delta -= 1
                    self._pending_counted = False
                self.app_records_in += delta
            return
        records = reader.feed(data, total_len)
        pending = reader.partial_header()
        if pending is not None and pending[0] == CT_APPLICATION_DATA and not self._failed:
            # The kernel stops capturing at a client application-data record header (the handshake is
            # over by then), so its body may never arrive: judge the record by its header. If the body
            # does arrive, that record is not counted again as application data.
            records = [*records, TlsRecord(CT_APPLICATION_DATA, 0, pending[1], b"", False)]
            self._pending_counted = True
        if self._flight_open:  # the client answered: the server's first flight is over
            self._flight_open = False
            if not self._abbreviated:
                self.resumed = False
        sh = self.server_hello
        for rec in records:
            ct = rec.content_type
            if self.completed_ns is not None:
                if ct == CT_APPLICATION_DATA:
                    self.app_records_in += 1
                continue
            if self._failed:
                break
            if ct == CT_HANDSHAKE:
                if not self._ch_done:
                    self._client_handshake_record(rec)
            elif ct == CT_ALERT:
                self._on_alert("client", rec)
            elif sh is None:
                continue
            elif ct == CT_CHANGE_CIPHER_SPEC:
                if not self._tls13:
                    if self._abbreviated:
                        self._complete(ts_ns)
                    else:
                        self._client_ccs = True
            elif ct == CT_APPLICATION_DATA and self._tls13:
                if (rec.length >= _MIN_TLS13_FINISHED_RECORD or self._suspect_alert
                        or (sh.psk_accepted and self.client_hello is not None
                            and self.client_hello.offers_early_data())):
                    self._suspect_alert = False
                    self._complete(ts_ns)
                else:
                    self._suspect_alert = True
        if reader.error is not None:
            if not reader.desynced:
                self._failed = True
            elif not self._ch_done:  # a partial ClientHello cannot be trusted across a lost header
                self._ch_done = True
                self._collect(client=_COLLECT_ALERTS)
                self._warn("ClientHello not fully captured")

    def _client_handshake_record(self, rec: TlsRecord) -> None:
        chs = self._chs
        if chs is None:
            chs = self._chs = HandshakeReassembler()
        for msg_type, body in chs.feed(rec.fragment, rec.length - len(rec.fragment)):
            if msg_type == HS_CLIENT_HELLO and not self._ch_done:
                self._on_client_hello(body)
        if not self._ch_done and (chs.error is not None or chs.lost):
            self._ch_done = True
            self._warn("ClientHello not fully captured")
        if self._ch_done:
            self._collect(client=_COLLECT_ALERTS)

    def _on_client_hello(self, body: bytes) -> None:
        self._ch_done = True
        self._collect(client=_COLLECT_ALERTS)
        try:
            self.client_hello = parse_client_hello_shaped(body)  # parsed once per client shape
            self.is_tls = True
        except TlsParseError as exc:
            self._set_error(f"malformed ClientHello: {exc}")

    # ---- server direction ----------------------------------------------------------------------------

    def _server_write(self, ts_ns: int, data: bytes, total_len: int | None) -> None:
        if self.is_tls is None and not self._client_reads and self.started_ns is None:
            self.is_tls = False  # the server spoke first: not a TLS server
            return
        if self.is_tls is False:
            return
        reader = self._sr
        if reader is None:
            if (total_len is None or total_len <= len(data)) and self._server_flight(ts_ns, data):
                return
            reader = self._server_reader()
        if self.completed_ns is not None or self._failed:
            before = reader.records.get(CT_APPLICATION_DATA, 0)
            records = reader.feed(data, total_len)
            if self._check_server_reply and records:
                self._check_server_reply = False
                first = records[0]
                if (len(records) == 1 and first.content_type == CT_APPLICATION_DATA
                        and first.length <= _MAX_TLS13_ALERT_RECORD):
                    # The server's first word after the client Finished is a lone alert-sized record
                    # instead of session tickets or data: it refused the client's flight (typically
                    # certificate_required / bad_certificate with mTLS).  The handshake did not complete.
                    self.completed_ns = None
                    self._failed = True
                    self._set_error("tls alert (encrypted) from the server after the client Finished")
                    return
            if self.completed_ns is not None:
                self.app_records_out += reader.records.get(CT_APPLICATION_DATA, 0) - before
            return
        for rec in reader.feed(data, total_len):
            if not self._server_record(ts_ns, rec.content_type, rec):
                break
        if reader.error is not None:
            if not reader.desynced:
                self._failed = True
            elif not self._sh_done:
                self._sh_done = True
                self._collect(server=_COLLECT_ALERTS)
                self._warn("ServerHello not fully captured")

    def _server_flight(self, ts_ns: int, data: bytes | bytearray | memoryview) -> bool:
        """The server's first write, read without a record reader when it is whole, valid records and the
        first one holds a whole ServerHello that is not a HelloRetryRequest (a server's usual first flight):
        the same outcome as the reader's, the stream left at a record boundary. False (nothing done): not
        such a write, for the reader."""
        if self.completed_ns is not None or self._failed:
            return False
        first = first_handshake_message(data)
        if first is None or first[0] != HS_SERVER_HELLO or first[1].startswith(HRR_RANDOM, 2):
            return False
        types = whole_record_types(data)
        if types is None or CT_ALERT in types:
            return False
        self._flight_records += len(types)
        self._flight_bytes += len(data)
        if not self._sh_done:
            self._on_server_hello(ts_ns, first[1])
        if self._tls13:  # its later records are encrypted and none is an alert: they change nothing here
            return True
        for ct in types[1:]:  # past the ServerHello: no alert (checked) and no handshake record to parse
            if not self._server_record(ts_ns, ct, None):
                break
        return True

    def _server_record(self, ts_ns: int, ct: int, rec: TlsRecord | None) -> bool:
        """One record the server wrote, of content type ``ct``, before the handshake's end or after it.
        ``rec``: the record itself, for a handshake record or an alert (None from a reader-less first
        flight: it has no alert, and no handshake record to parse once its ServerHello is read). False:
        the handshake failed, the write's later records do not count."""
        if self.completed_ns is not None:
            if ct == CT_APPLICATION_DATA:
                self.app_records_out += 1
            return True
        if self._failed:
            return False
        if ct == CT_HANDSHAKE:
            if not self._sh_done and rec is not None:
                self._server_handshake_record(ts_ns, rec)
        elif ct == CT_ALERT:
            if rec is not None:
                self._on_alert("server", rec)
        elif ct == CT_CHANGE_CIPHER_SPEC and self.server_hello is not None and not self._tls13:
            if self._flight_open:
                self._abbreviated = True
                self.resumed = True
            elif self._client_ccs:
                self._complete(ts_ns)
        return True

    def _server_handshake_record(self, ts_ns: int, rec: TlsRecord) -> None:
        shs = self._shs
        if shs is None:
            shs = self._shs = HandshakeReassembler()
        for msg_type, body in shs.feed(rec.fragment, rec.length - len(rec.fragment)):
            if msg_type == HS_SERVER_HELLO and not self._sh_done:
                self._on_server_hello(ts_ns, body)
        if not self._sh_done and (shs.error is not None or shs.lost):
            self._sh_done = True
            self._collect(server=_COLLECT_ALERTS)
            self._warn("ServerHello not fully captured")

    def _on_server_hello(self, ts_ns: int, body: bytes) -> None:
        try:
            sh = parse_server_hello_shaped(body)  # parsed once per shape
        except TlsParseError as exc:
            self._sh_done = True
            self._collect(server=_COLLECT_ALERTS)
            self._set_error(f"malformed ServerHello: {exc}")
            return
        if sh.is_hello_retry_request:
            if self.hello_retry_request is not None:
                self._warn("second HelloRetryRequest")
            self.hello_retry_request = sh
            return  # keep looking for the real ServerHello
        self._sh_done = True
        self._collect(client=_COLLECT_ALERTS, server=_COLLECT_ALERTS)
        self._ch_done = True
        self.server_hello = sh
        self.server_hello_ns = ts_ns
        self.is_tls = True
        self.version = tls_version_name(sh.selected_version)
        self.cipher = cipher_suite_name(sh.cipher_suite)
        self.negotiated_alpn = sh.alpn
        self._tls13 = sh.selected_version == 0x0304 or (sh.selected_version >> 8) == 0x7F
        if self._tls13:
            self.resumed = sh.psk_accepted
        else:
            self._flight_open = True

    # ---- shared --------------------------------------------------------------------------------------

    def _decide(self, head: bytes, remember: bool) -> None:
        """is_tls from the first client bytes: a handshake record header 16 03 0x.

        ``remember``: keep an undecided prefix (< 3 bytes) to complete with the next read; peeks don't,
        since every peek starts again at the beginning of the stream.
        """
        if not head:
            return
        if head[0] != CT_HANDSHAKE or (len(head) > 1 and head[1] != 3) or (len(head) > 2 and head[2] > 4):
            self.is_tls = False
            self._head = b""
        elif len(head) >= 3:
            self.is_tls = True
            self._head = b""
        elif remember:
            self._head = head

    def _on_alert(self, sender: str, rec: TlsRecord) -> None:
        frag = rec.fragment
        if rec.length == 2 and len(frag) == 2:  # plaintext (encrypted alerts are >= 17 bytes)
            level, desc = frag[0], frag[1]
            if len(self.alerts) < _MAX_ALERTS:
                self.alerts.append((sender, level, desc))
            text = f"tls alert {alert_level_name(level)}/{alert_description_name(desc)}"
            if level == 1 and desc not in _CLOSURE_ALERTS and not self._tls13:
                self._warn(f"{sender} sent {text}")  # a warning alert: the handshake may go on
                return
        else:
            text = "tls alert (encrypted)"
        self._set_error(text)
        self._failed = True

    def _complete(self, ts_ns: int) -> None:
        self.completed_ns = ts_ns
        if self.resumed is None:
            self.resumed = False
        self._flight_open = False
        self._check_server_reply = self._tls13
        self._collect(client=_COLLECT_NOTHING, server=_COLLECT_NOTHING)

    def _client_reader(self) -> TlsRecordReader:
        reader = self._cr = TlsRecordReader(collect_types=self._c_collect, resync=self._resync)
        return reader

    def _server_reader(self) -> TlsRecordReader:
        reader = self._sr = TlsRecordReader(collect_types=self._s_collect, resync=self._resync)
        return reader

    def _collect(self, *, client: frozenset[int] | None = None, server: frozenset[int] | None = None) -> None:
        """Which content types each direction's reader keeps the fragments of from now on."""
        if client is not None:
            self._c_collect = client
            if self._cr is not None:
                self._cr.collect_types = client
        if server is not None:
            self._s_collect = server
            if self._sr is not None:
                self._sr.collect_types = server

    def _set_error(self, msg: str) -> None:
        if self._error is None:
            self._error = msg

    def _warn(self, msg: str) -> None:
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(msg)

    def _internal_error(self, exc: Exception) -> None:
        self._failed = True
        self._set_error(f"internal error: {type(exc).__name__}: {exc}")
