/* tls.bpf.h: the TLS record framing of a TLS connection, walked through the bytes each read/write moved, per
 * direction: records counted and sized for the close event, and the walk given up for good when the bytes
 * do not parse as record headers. Also the held record header: a read of just a record's header rides on
 * the connection's next read record.
 */
/* Record headers walked per syscall; a read or write holding more records loses the framing. */
#define TLS_WALK_MAX 48
#define TLS_RECORD_HEADER 5
#define TLS_MAX_RECORD (16384 + 2048) /* TLSCiphertext.length bound (RFC 5246 6.2.3) */

/* The buffers of one read/write as (base, length) segments, for reading the stream at an offset. */
struct io_segments {
    __u64 base[MAX_IOV];
    __u64 len[MAX_IOV];
    __u32 n;
    __u32 _pad;
};
BPF_PERCPU_ARRAY(segment_scratch, struct io_segments, 1);

/* The byte at offset `pos` of the segments; 0 on success. */
static __always_inline int segment_byte(const struct io_segments *s, __u64 pos, __u8 *out) {
#pragma unroll
    for (int i = 0; i < MAX_IOV; i++) {
        if (i >= s->n)
            return -1;
        if (pos < s->len[i])
            return bpf_probe_read_user(out, 1, (void *)(s->base[i] + pos));
        pos -= s->len[i];
    }
    return -1;
}

/* Fills `s` with the buffers of a read/write that moved `n` bytes. */
static __always_inline void load_segments(struct io_segments *s, const struct inflight *req, __u64 n) {
    s->n = 0;
    const struct iovec *iov = 0;
    __u32 cnt = 0;
    if (req->syscall == IO_READV || req->syscall == IO_WRITEV) {
        iov = (const struct iovec *)req->buf;
        cnt = req->len;
    } else if (req->syscall == IO_RECVMSG || req->syscall == IO_SENDMSG) {
        struct user_msghdr mh = {};
        if (bpf_probe_read_user(&mh, sizeof(mh), (void *)req->buf) != 0)
            return;
        iov = mh.msg_iov;
        cnt = (__u32)mh.msg_iovlen;
    } else {
        s->base[0] = req->buf;
        s->len[0] = n;
        s->n = 1;
        return;
    }
#pragma unroll
    for (int i = 0; i < MAX_IOV; i++) {
        if (i >= cnt)
            break;
        struct iovec v = {};
        if (bpf_probe_read_user(&v, sizeof(v), &iov[i]) != 0)
            break;
        s->base[i] = (__u64)v.iov_base;
        s->len[i] = v.iov_len;
        s->n = i + 1;
    }
}

/* Walks the TLS record headers in the `n` bytes one read/write moved, counting records. A header may
 * straddle two syscalls; bytes that do not parse as a record header stop the walk for good (counted in
 * tls_flags), as does a syscall with more than TLS_WALK_MAX records. */
static __always_inline void walk_tls_records(struct conn_state *cs, const struct inflight *req, __u64 n,
                                             __u8 dir) {
    __u32 lost = dir == DIR_READ ? TLS_FRAMING_LOST_RX : TLS_FRAMING_LOST_TX;
    if (cs->tls_flags & lost)
        return;
    struct tls_framing *f = &cs->tls[dir & 1];
    cs->tls_flags |= TLS_FRAMING_SEEN;
    if (f->skip >= n) { /* inside one record's body: the common case for bulk data */
        f->skip -= n;
        return;
    }
    __u32 zero = 0;
    struct io_segments *s = segment_scratch.lookup(&zero);
    if (!s)
        return;
    load_segments(s, req, n);
    __u64 pos = f->skip;
    f->skip = 0;
    for (int i = 0; i < TLS_WALK_MAX; i++) {
        if (pos >= n)
            return;
#pragma unroll
        for (int j = 0; j < TLS_RECORD_HEADER; j++) {
            if (f->hdr_got < TLS_RECORD_HEADER && pos < n) {
                __u8 b = 0;
                if (segment_byte(s, pos, &b) != 0) {
                    cs->tls_flags |= lost;
                    return;
                }
                f->hdr[f->hdr_got & 7] = b;
                f->hdr_got++;
                pos++;
            }
        }
        if (f->hdr_got < TLS_RECORD_HEADER)
            return; /* the header continues in the next syscall */
        f->hdr_got = 0;
        __u32 len = ((__u32)f->hdr[3] << 8) | f->hdr[4];
        if (f->hdr[0] < 20 || f->hdr[0] > 24 || f->hdr[1] != 3 || len > TLS_MAX_RECORD) {
            cs->tls_flags |= lost;
            return;
        }
        f->records++;
        if (f->hdr[0] == 23)
            f->app_records++;
        if (len > f->max_len)
            f->max_len = len;
        if (pos + len > n) {
            f->skip = (__u32)(pos + len - n);
            return;
        }
        pos += len;
    }
    if (pos < n)
        cs->tls_flags |= lost;
}

/* A read of just a TLS record header (BoringSSL reads the header, then the body) is held back, to ride on
 * this connection's next read record (data_event.held): one record instead of two, while one more record
 * is due. Only with request capture (the default): with --no-requests no record is sent past the
 * handshake, so little is saved, and these branches put sys_exit over the verifier's budget of 1M
 * instructions (it is near it: a variation of this logic failed to load in one build or the other). */

/* The held header, if any, rides on the read record `e` (its bytes counted in e->ret). */
static __always_inline void tls_attach_held(struct conn_state *cs, struct data_event *e, long ret,
                                            __u8 is_write, __u8 peek) {
#if HTTP_CAPTURE
    if (!is_write && !peek && (cs->flags & CONN_HELD)) {
        cs->flags &= ~CONN_HELD;
        e->held = TLS_RECORD_HEADER;
        e->held_captured = cs->held_captured;
        __builtin_memcpy(e->held_data, cs->held_data, sizeof(e->held_data));
        if (ret > 0)
            e->ret = ret + TLS_RECORD_HEADER;
    }
#endif
}

/* Holds back the record `e` (message `seq` of the connection) if it is a read of just a record header;
 * returns 1 when held: not to be sent, its number goes to the next record. */
static __always_inline int tls_hold_header(struct conn_state *cs, const struct data_event *e, long ret,
                                           __u8 is_write, __u8 peek, __u32 seq) {
#if HTTP_CAPTURE
    if (ret == TLS_RECORD_HEADER && !is_write && !peek && (cs->flags & CONN_TLS) && !e->held &&
        cs->data_events < cs->capture_budget) {
        cs->flags |= CONN_HELD;
        cs->held_captured = e->captured;
        __builtin_memcpy(cs->held_data, e->data, sizeof(cs->held_data));
        cs->data_events = seq; /* not sent */
        return 1;
    }
#endif
    return 0;
}
