/* conn_keep.bpf.h: anomalies of connections sampled whole and not traced (SAMPLING builds). A connection of a
 * TLS listener that the sampler left out (CONN_UNTRACED, conn_sampling.bpf.h) sends no record while it lives.
 * At its close the kernel decides whether it is kept all the same (enum connection_keep_reason): its TLS
 * handshake failed (it closed during it) or was slow, a read or write of it hit a reset, or it waited long in
 * the accept queue. A kept connection is one EV_CONNECTION_KEPT record: what its accept, its handshake's data
 * records and its close would have said, with the bytes of its ClientHello and of the server's hello flight
 * that the kernel held (held_handshakes, filled by hold_hello_sys_exit and tls_hello_sys_exit in
 * sampling.bpf.h), so that user space makes the same connection and TLS handshake spans as for a traced one.
 *
 * The held bytes live in an LRU table from the connection's first TLS bytes to its close: one entry per
 * untraced TLS connection open; under more open connections than the table holds, the oldest lose their
 * bytes first (a kept one is then reported without them, and user space says so).
 *
 * A traced connection of such a listener has its accept reported, then goes the same way through its
 * handshake (`tls_handshake_summary` on, CONN_HS_SUMMARY): no record of its handshake's transfers (they are
 * counted and their TLS records walked), its hello bytes held. When the handshake ends (hs_summary_sys_exit,
 * sampling.bpf.h) one record of the same layout, KEEP_CONN_SAMPLED and KEPT_OPEN, says what its handshake's
 * records would have said; its held entry goes, and from there on it is a traced connection like any other.
 * One that closes before its handshake ended has that record at its close (KEEP_CONN_SAMPLED), then its
 * close record. Its held entry lives for the handshake only.
 */

#define HELD_HANDSHAKES 1024

BPF_TABLE("lru_hash", __u64, struct held_handshake, held_handshakes, HELD_HANDSHAKES); /* by conn_key */
BPF_ARRAY(held_zero, struct held_handshake, 1); /* never written: a new entry's initial value */
BPF_ARRAY(keep_slow_handshake_ns, __u64, 1); /* a handshake at least this long is kept (0: none) */
BPF_ARRAY(keep_slow_accept_ns, __u64, 1);    /* an accept-queue wait at least this long is kept (0: none) */
BPF_ARRAY(tls_handshake_summary, __u32, 1);  /* 1: a traced TLS connection's handshake is one record (above) */
/* connections kept, by enum connection_keep_reason; slot 0: of them, those kept without held handshake bytes */
BPF_PERCPU_ARRAY(conn_kept_counts, __u64, 5);

/* A threshold array's value (0 when unset). */
static __always_inline __u64 threshold_of(__u64 *v) { return v ? *v : 0; }

/* Why the untraced downstream connection `cs` is kept at its close (before its handshake state is closed),
 * or 0. */
static __always_inline __u8 connection_keep_reason(const struct conn_state *cs) {
    if (cs->hs_state > HS_NONE && cs->hs_state < HS_DONE)
        return KEEP_CONN_TLS_FAILED;
    if (cs->flags & CONN_IO_RESET)
        return KEEP_CONN_RESET;
    __u32 zero = 0;
    __u64 slow = threshold_of(keep_slow_handshake_ns.lookup(&zero));
    if (slow && cs->hs_end_ns && cs->hs_end_ns - cs->hs_start_ns >= slow)
        return KEEP_CONN_TLS_SLOW;
    slow = threshold_of(keep_slow_accept_ns.lookup(&zero));
    if (slow && cs->established_ns && cs->open_ts_ns > cs->established_ns &&
        cs->open_ts_ns - cs->established_ns >= slow)
        return KEEP_CONN_ACCEPT_SLOW;
    return 0;
}

static __always_inline void count_kept_connection(__u32 slot) {
    __u64 *v = conn_kept_counts.lookup(&slot);
    if (v)
        (*v)++;
}

/* Whether a traced connection of a TLS listener has its handshake reported as one record (CONN_HS_SUMMARY). */
static __always_inline int tls_handshake_summarized(void) {
    __u32 zero = 0;
    __u32 *on = tls_handshake_summary.lookup(&zero);
    return on && *on;
}

/* Reports the untraced downstream connection `cs` (fd `fd`, key `key`) as one record, kept for `reason`
 * (KEEP_CONN_SAMPLED: a traced one's handshake summary), with `close_flags` (KEPT_OPEN) besides its own. */
static __always_inline void keep_connection(__u64 pid_tgid, __u64 key, __s32 fd, const struct conn_state *cs,
                                            __u8 reason, __u8 close_flags, __u64 now) {
    if (!producing())
        return;
    struct connection_kept_event *e = events.ringbuf_reserve(sizeof(struct connection_kept_event));
    if (!e) {
        count_drop(DROP_RINGBUF_FULL);
        return;
    }
    fill_header(&e->hdr, EV_CONNECTION_KEPT, pid_tgid);
    e->hdr.ts_ns = now;
    e->fd = fd;
    e->listen_fd = cs->listen_fd;
    e->family = cs->peer_family;
    e->peer_port = cs->peer_port;
    e->reason = reason;
    e->hs_state = cs->hs_state;
    e->hs_resumed = cs->hs_resumed;
    e->close_flags = close_flags | ((cs->flags & CONN_PEER_EOF) ? KEPT_PEER_EOF : 0) |
                     ((cs->flags & CONN_IO_RESET) ? KEPT_IO_RESET : 0);
    __builtin_memcpy(e->peer_addr, cs->peer_addr, ADDR_LEN);
    bpf_get_current_comm(&e->comm, sizeof(e->comm));
    e->open_ts_ns = cs->open_ts_ns;
    e->established_ns = cs->established_ns;
    e->hs_start_ns = cs->hs_start_ns;
    e->hs_end_ns = cs->hs_end_ns;
    e->hs_version = cs->hs_version;
    e->_pad0 = 0;
    e->_pad1 = 0;
    e->_pad2 = 0;
    COPY_CONN_TOTALS(e, cs);
    /* the held bytes (one copy, not an unrolled one: the struct is 4.6 KiB), or zeros */
    struct held_handshake *held = held_handshakes.lookup(&key);
    __u32 zero = 0;
    if (!held) {
        if (reason != KEEP_CONN_SAMPLED)
            count_kept_connection(0);
        held = held_zero.lookup(&zero);
    }
    if (!held || bpf_probe_read_kernel(&e->held, sizeof(e->held), held) != 0) {
        events.ringbuf_discard(e, 0);
        count_drop(DROP_CAPTURE_READ);
        return;
    }
    events.ringbuf_submit(e, RB_SUBMIT_FLAGS);
    count_submitted();
    if (reason != KEEP_CONN_SAMPLED)
        count_kept_connection(reason);
}
