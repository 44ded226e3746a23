/* tls_handshake.bpf.h: the steps of a downstream TLS handshake, on its transfers (SAMPLING builds; the
 * metrics and the states are in tls_metrics.bpf.h). Envoy's TLS library reads a record's 5-byte header
 * before its body, so a read that starts a flight starts with the content type of its first record. */

#define TLS_RECORD_HANDSHAKE 0x16
#define TLS_RECORD_CHANGE_CIPHER_SPEC 0x14
#define TLS_RECORD_APPLICATION_DATA 0x17
#define TLS_HS_SERVER_HELLO 2
#define TLS_EXT_PRE_SHARED_KEY 0x0029
#define TLS_EXT_SUPPORTED_VERSIONS 0x002b
#define TLS_HELLO_EXTENSIONS_MAX 12 /* a ServerHello has a handful */

static __always_inline __u32 be16(const __u8 *b) { return ((__u32)b[0] << 8) | b[1]; }

/* A read (ret > 0, not a peek) that starts a record user space learns nothing from, read alone as its 5-byte
 * header (BoringSSL reads a record's header, then its body): the record's reads are not reported (`quiet`,
 * see quiet_read). Two such records in a handshake: the ClientHello read for real when a listener filter's
 * peek already held all of it (user space parsed it from the peek), and a TLS 1.3 client's ChangeCipherSpec
 * (compatibility only: user space skips it). Their bytes are still counted and their records walked. */
static __always_inline void quiet_record(struct conn_state *cs, const __u8 *h, long ret, __u8 *quiet) {
    if (ret != 5)
        return;
    cs->quiet_left = be16(&h[3]); /* the body's reads, up to its length, are quiet too */
    *quiet = 1;
}

/* The first bytes (ret > 0) of a downstream connection, a listener filter's peek included (hs_state
 * HS_NONE): a TLS handshake record starts the handshake (HS_HELLO), anything else means no TLS (HS_DONE). A
 * peek that holds the whole first record (within what a record captures) lets its real read be quiet. */
static __always_inline void tls_first_bytes(struct conn_state *cs, __u8 io, const void *buf, long ret,
                                            __u32 peek) {
    if (io >= IO_WRITE)
        return;
    __u8 h[5] = {};
    if (first_bytes(io, buf, ret, h, 5) < 1)
        return;
    if (h[0] != TLS_RECORD_HANDSHAKE) {
        cs->hs_state = HS_DONE; /* not TLS */
        return;
    }
    cs->hs_state = HS_HELLO;
    cs->hs_start_ns = bpf_ktime_get_ns();
    if (cs->flags & CONN_UNTRACED) /* its ClientHello is held for a kept record (hold_hello_sys_exit) */
        cs->flags |= CONN_HOLD;
    __u32 record = 5 + be16(&h[3]);
    if (peek && ret >= 5 && record <= (__u64)ret && record <= CAPTURE_MAX && !(cs->flags & CONN_UNTRACED))
        cs->flags |= CONN_HELLO_PEEKED;
}

/* A read of a traced connection's handshake that may be quiet (front_sys_exit then hands it to
 * tls_step_sys_exit): the real read of a ClientHello a peek held, the continuation of a quiet record, or a
 * TLS 1.3 client's answer to the server's hello flight. */
static __always_inline int quiet_candidate(const struct conn_state *cs) {
    return cs->quiet_left || (cs->flags & (CONN_HELLO_PEEKED | CONN_FIN_QUIET)) ||
           (cs->hs_state == HS_CLIENT_FIN && cs->hs_version >= 0x0304 && !(cs->flags & CONN_UNTRACED));
}

/* One transfer (ret > 0) of a downstream connection whose handshake is under way (HS_HELLO..HS_SERVER_FIN).
 * Returns 1 when it is the server's hello flight, which the caller hands to tls_hello_sys_exit. With `quiet`
 * (tls_step_sys_exit: reads only), sets *quiet for a read not to report (quiet_record); without (0, the
 * front), no read is quiet. */
static __always_inline int tls_handshake_step(struct conn_state *cs, __u32 tgid, __u8 io, const void *buf,
                                              long ret, __u32 peek, __u8 *quiet) {
    __u8 state = cs->hs_state;
    if (io >= IO_WRITE) {
        if (state == HS_HELLO)
            return 1;
        if (state == HS_SERVER_FIN) /* TLS 1.2 full: the server's ChangeCipherSpec and Finished */
            record_tls_handshake(tgid, cs, TLS_HANDSHAKE_DONE, bpf_ktime_get_ns());
        return 0;
    }
    if (state == HS_SERVER_FIN || peek || (state == HS_HELLO && !(cs->flags & CONN_HELLO_PEEKED)))
        return 0; /* more of the same flight, or a listener filter's look at it */
    __u8 h[5] = {};
    if (first_bytes(io, buf, ret, h, 5) < 1)
        return 0;
    if (state == HS_HELLO) { /* more of the ClientHello's flight: its real read, after a peek held it */
        if (quiet && h[0] == TLS_RECORD_HANDSHAKE) {
            cs->flags &= ~CONN_HELLO_PEEKED; /* once: a second ClientHello (after a HelloRetryRequest) is sent */
            quiet_record(cs, h, ret, quiet);
            if (*quiet) /* the connection's first real I/O, which io_sys_exit would have seen: TLS from here */
                cs->flags |= CONN_TLS | CONN_SAW_IO;
        }
        return 0;
    }
    /* HS_CLIENT_FIN: the client's answer to the server's hello flight */
    if (cs->hs_version >= 0x0304) {
        if (h[0] == TLS_RECORD_HANDSHAKE) { /* a second ClientHello: the ServerHello was a HelloRetryRequest */
            cs->hs_state = HS_HELLO;
            cs->flags &= ~CONN_HRR;
        } else if (h[0] == TLS_RECORD_CHANGE_CIPHER_SPEC && (cs->flags & CONN_HRR)) {
            /* the compatibility ChangeCipherSpec before the second ClientHello, not the end: quiet, its body
             * too (read next, through tls_step_sys_exit) */
            __u8 ignored = 0;
            quiet_record(cs, h, ret, quiet ? quiet : &ignored);
        } else {
            if (quiet && h[0] == TLS_RECORD_CHANGE_CIPHER_SPEC)
                quiet_record(cs, h, ret, quiet);
            record_tls_handshake(tgid, cs, TLS_HANDSHAKE_DONE, bpf_ktime_get_ns());
        }
    } else if (cs->hs_resumed) {
        record_tls_handshake(tgid, cs, TLS_HANDSHAKE_DONE, bpf_ktime_get_ns());
    } else {
        cs->hs_state = HS_SERVER_FIN;
    }
    return 0;
}

/* A read (ret > 0, not a peek) of a connection whose handshake summary (CONN_HS_SUMMARY) was sent at its
 * client's ChangeCipherSpec: the client's Finished record that follows (TLS 1.3: application data on the wire;
 * TLS 1.2 resumed: a handshake record) is quiet, as that summary has it already. Once. */
static __always_inline void quiet_finished(struct conn_state *cs, __u8 io, const void *buf, long ret,
                                           __u8 *quiet) {
    cs->flags &= ~CONN_FIN_QUIET;
    __u8 h[5] = {};
    if (first_bytes(io, buf, ret, h, 5) < 1)
        return;
    if (h[0] == TLS_RECORD_APPLICATION_DATA || h[0] == TLS_RECORD_HANDSHAKE)
        quiet_record(cs, h, ret, quiet);
}

/* The read that ended a summarized handshake (hs_summary_sys_exit), alone as a record header: the client's
 * ChangeCipherSpec (its body is quiet, and so is the client's Finished after it: quiet_finished), or the
 * client's Finished itself (no ChangeCipherSpec: after a HelloRetryRequest, or a client without the
 * compatibility one; its body is quiet). */
static __always_inline void quiet_after_summary(struct conn_state *cs, __u8 io, const void *buf, long ret) {
    __u8 h[5] = {};
    if (ret != 5 || first_bytes(io, buf, ret, h, 5) < 5)
        return;
    if (h[0] == TLS_RECORD_CHANGE_CIPHER_SPEC) {
        cs->quiet_left = be16(&h[3]);
        cs->flags |= CONN_FIN_QUIET;
    } else if (h[0] == TLS_RECORD_APPLICATION_DATA || h[0] == TLS_RECORD_HANDSHAKE) {
        cs->quiet_left = be16(&h[3]);
    }
}

/* Whether a read (ret > 0, not a peek) continues a quiet record (quiet_record): it is quiet if it lies within
 * the record's body; one that reaches past it ends the quiet part and is reported. */
static __always_inline __u8 quiet_read(struct conn_state *cs, long ret) {
    __u32 left = cs->quiet_left;
    if (!left)
        return 0;
    if ((__u64)ret > left) {
        cs->quiet_left = 0;
        return 0;
    }
    cs->quiet_left = left - (__u32)ret;
    return 1;
}

/* The server's hello flight (a write): the version the ServerHello chose and whether it resumed a session.
 * Record header (5), handshake header (4), legacy version (2), random (32), session id (1 + n), cipher
 * suite (2), compression (1), extensions (2 + each: type 2, length 2, body). */
static __always_inline void parse_server_hello(struct conn_state *cs, __u8 io, const void *buf, long ret) {
    __u64 avail = (__u64)ret;
    const __u8 *src = transfer_start(io, buf, &avail);
    __u8 h[44];
    if (!src || avail < sizeof(h) || bpf_probe_read_user(h, sizeof(h), src) != 0)
        return;
    if (h[0] != TLS_RECORD_HANDSHAKE || h[5] != TLS_HS_SERVER_HELLO)
        return;
    __u32 record_end = 5 + be16(&h[3]);
    __u32 hello_end = 9 + (((__u32)h[6] << 16) | be16(&h[7]));
    __u32 version = be16(&h[9]);
    __u8 resumed = 0;
    __u32 off = 44 + h[43] + 3; /* past the session id, the cipher suite and the compression method */
    __u8 e[4];
    if (off + 2 <= hello_end && off + 2 <= avail) {
        off += 2; /* the extensions' length: they run to the end of the ServerHello */
        for (int i = 0; i < TLS_HELLO_EXTENSIONS_MAX; i++) {
            if (off + 4 > hello_end || off + 4 > avail || bpf_probe_read_user(e, 4, src + off) != 0)
                break;
            __u32 type = be16(e), len = be16(&e[2]);
            if (type == TLS_EXT_SUPPORTED_VERSIONS && len == 2 && off + 6 <= avail &&
                bpf_probe_read_user(e, 2, src + off + 4) == 0)
                version = be16(e);
            else if (type == TLS_EXT_PRE_SHARED_KEY)
                resumed = 1;
            off += 4 + len;
        }
    }
    if (version < 0x0304) {
        /* TLS 1.2: an abbreviated handshake follows the ServerHello's record with a ChangeCipherSpec record,
         * a full one with the Certificate (in the same record, or the next) */
        __u8 next = 0;
        if (hello_end >= record_end && record_end < avail &&
            bpf_probe_read_user(&next, 1, src + record_end) == 0)
            resumed = next == TLS_RECORD_CHANGE_CIPHER_SPEC;
    }
    cs->hs_version = (__u16)version;
    cs->hs_resumed = resumed;
    cs->hs_state = HS_CLIENT_FIN;
    /* a HelloRetryRequest: a ServerHello whose random is SHA-256("HelloRetryRequest") (RFC 8446 4.1.3) */
    if (h[11] == 0xCF && h[12] == 0x21 && h[13] == 0xAD && h[14] == 0x74 && h[15] == 0xE5 && h[16] == 0x9A &&
        h[17] == 0x61 && h[18] == 0x11)
        cs->flags |= CONN_HRR;
    else
        cs->flags &= ~CONN_HRR;
}

/* Holds up to HELLO_HELD bytes of a read of an untraced connection's ClientHello at `at` (0 or 5: a
 * listener filter's peek or a first read, or the body after a lone 5-byte record header) in `h`. */
static __always_inline void hold_hello_bytes(struct held_handshake *h, const __u8 *src, __u64 avail, __u32 at) {
    __u32 room = at ? HELLO_HELD - 5 : HELLO_HELD;
    __u32 n = avail > room ? room : (__u32)avail;
    BARRIER_VAR(n);
    n &= 2 * HELLO_HELD - 1;
    if (at) {
        if (n > HELLO_HELD - 5)
            n = HELLO_HELD - 5;
        if (bpf_probe_read_user(h->hello + 5, n, src) == 0)
            h->hello_len = 5 + n;
    } else {
        if (n > HELLO_HELD)
            n = HELLO_HELD;
        if (bpf_probe_read_user(h->hello, n, src) == 0)
            h->hello_len = n;
    }
}

/* The server's hello flight of an untraced connection whose ClientHello is held: its first FLIGHT_HELD bytes
 * held too (its ServerHello, or the alert that refused the hello). */
static __always_inline void hold_flight(__u64 key, __u8 io, const void *buf, long ret) {
    struct held_handshake *h = held_handshakes.lookup(&key);
    if (!h)
        return;
    __u64 avail = (__u64)ret;
    const __u8 *src = transfer_start(io, buf, &avail);
    if (!src)
        return;
    __u32 n = avail > FLIGHT_HELD ? FLIGHT_HELD : (__u32)avail;
    BARRIER_VAR(n);
    n &= 2 * FLIGHT_HELD - 1;
    if (n > FLIGHT_HELD)
        n = FLIGHT_HELD;
    if (bpf_probe_read_user(h->flight, n, src) != 0)
        return;
    h->flight_len = n;
    h->flight_ret = (__u32)ret;
    h->flight_ns = bpf_ktime_get_ns();
}
