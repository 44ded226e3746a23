/* http_metrics.bpf.h: exact request metrics of plaintext HTTP/1.x downstream connections (SAMPLING builds),
 * kept whatever the sampler decides.
 *
 * A request begins with a read that follows a write (or the connection's start) whose first bytes are a
 * method token (front_sys_exit, sampling.bpf.h); the first write after it carries the status line. Its
 * duration runs from the first read's return to that write's: for a response written in several calls,
 * until its first bytes (headers) leave. A request still unanswered when its connection closes is counted
 * with status 0. Pipelined requests read before their response count once.
 *
 * One series per (process, listening socket, method, status), each with a count, a sum and a log2
 * histogram of microseconds; user space turns the listening socket into the listener's address and the
 * series into http.server.request.duration. Updates are atomic: workers on several CPUs share a series.
 *
 * A request that was not sampled is still reported, as one EV_REQUEST_KEPT record with its first KEPT_HEAD
 * bytes and its traceparent (as a sampled one is with request summaries on), when its status is 5xx, when
 * its connection closes before an answer, or when its answer comes after at least `keep_slow_ns`: errors
 * and slow requests are traced whatever the sampler.
 */
#define HTTP_METRIC_SERIES 4096

BPF_HASH(http_metrics, struct http_metric_key, struct http_metric, HTTP_METRIC_SERIES);
BPF_ARRAY(keep_slow_ns, __u64, 1); /* an unsampled request answered after at least this long is kept (0: none) */
BPF_ARRAY(http_metric_zero, struct http_metric, 1); /* never written: a new series' initial value */

/* A new metric series' initial value (zero), for a table's lookup_or_try_init; 0 only if the array is
 * missing. Each table's lookups stay at its call site: bcc rewrites map calls by the table's name. */
static __always_inline struct http_metric *new_series(void) {
    __u32 zero = 0;
    return http_metric_zero.lookup(&zero);
}
BPF_HASH(conn_metrics, struct conn_metric_key, struct http_metric, HTTP_METRIC_SERIES); /* by listener */
BPF_HASH(accept_metrics, struct conn_metric_key, struct http_metric, HTTP_METRIC_SERIES); /* by listener */
BPF_HASH(accepts_by_thread, struct accept_thread_key, __u64, HTTP_METRIC_SERIES); /* by worker and listener */

/* Accept-queue waits: a downstream handshake's completion (SYN_RECV -> ESTABLISHED on a watched port, in
 * softirq) is kept by peer until Envoy accepts the connection (by listening fd, in process context), where
 * the wait joins accept_metrics. Bounded (LRU): an entry whose accept never comes (another process's
 * listener on the same port, a connection reset in the queue) ages out. An accept whose entry is missing
 * (the transition was not seen: the daemon started after it, or the kernel skipped the tracepoint) is
 * counted in accept_wait_unseen instead. */
struct peer_key {
    __u8 addr[16]; /* IPv6, or IPv4 mapped (::ffff:a.b.c.d): a dual-stack socket sees either form */
    __u16 port;
    __u16 _pad;
};
/* What the accept takes from its handshake's completion: when, and the local address the peer reached (a
 * traced connection of a listener sampled whole sends no ESTABLISHED record: its accept record carries
 * these, sockets.bpf.h). */
struct established {
    __u64 ts_ns;
    __u16 family;   /* of local_addr, as the socket has it */
    __u16 _pad0;
    __u32 _pad1;
    __u8 local_addr[ADDR_LEN];
};
BPF_TABLE("lru_hash", struct peer_key, struct established, established_at, MAX_CONNS);
BPF_PERCPU_ARRAY(accept_wait_unseen, __u64, 1);

#define W4(a, b, c, d) ((__u32)(a) | ((__u32)(b) << 8) | ((__u32)(c) << 16) | ((__u32)(d) << 24))

/* The enum http_method of a request's first bytes (n of them, at most 8, zero-filled past n). */
static __always_inline __u8 http_method_of(const __u8 *b, __u32 n) {
    __u32 w0 = W4(b[0], b[1], b[2], b[3]);
    __u32 w1 = W4(b[4], b[5], b[6], b[7]);
    if (w0 == W4('G', 'E', 'T', ' '))
        return HTTP_METHOD_GET;
    if (w0 == W4('P', 'O', 'S', 'T') && b[4] == ' ')
        return HTTP_METHOD_POST;
    if (w0 == W4('H', 'E', 'A', 'D') && b[4] == ' ')
        return HTTP_METHOD_HEAD;
    if (w0 == W4('P', 'U', 'T', ' '))
        return HTTP_METHOD_PUT;
    if (w0 == W4('D', 'E', 'L', 'E') && (w1 & 0xffffff) == W4('T', 'E', ' ', 0))
        return HTTP_METHOD_DELETE;
    if (w0 == W4('P', 'A', 'T', 'C') && b[4] == 'H' && b[5] == ' ')
        return HTTP_METHOD_PATCH;
    if (w0 == W4('O', 'P', 'T', 'I') && w1 == W4('O', 'N', 'S', ' '))
        return HTTP_METHOD_OPTIONS;
    if (w0 == W4('C', 'O', 'N', 'N') && w1 == W4('E', 'C', 'T', ' '))
        return HTTP_METHOD_CONNECT;
    if (w0 == W4('T', 'R', 'A', 'C') && b[4] == 'E' && b[5] == ' ')
        return HTTP_METHOD_TRACE;
    if (w0 == W4('P', 'R', 'I', ' ')) /* the HTTP/2 client preface */
        return HTTP_METHOD_NONE;
    /* any other token: upper-case letters up to a space (or up to the end of a short first read) */
    if (n == 0 || b[0] < 'A' || b[0] > 'Z')
        return HTTP_METHOD_NONE;
#pragma unroll
    for (int i = 1; i < 8; i++) {
        if (i >= n || b[i] == ' ')
            return HTTP_METHOD_OTHER;
        if (b[i] < 'A' || b[i] > 'Z')
            return HTTP_METHOD_NONE;
    }
    return HTTP_METHOD_NONE;
}

/* The status code of a response's first bytes ("HTTP/1.x NNN"), or 0. */
static __always_inline __u16 http_status_of(const __u8 *b) {
    if (W4(b[0], b[1], b[2], b[3]) != W4('H', 'T', 'T', 'P') || b[4] != '/' || b[8] != ' ')
        return 0;
    __u8 d0 = b[9] - '0', d1 = b[10] - '0', d2 = b[11] - '0';
    if (d0 > 9 || d1 > 9 || d2 > 9)
        return 0;
    return (__u16)d0 * 100 + (__u16)d1 * 10 + d2;
}

/* Reports the connection's current request as one record: sampled (CONN_SUMMARY), or kept for `reason`. */
static __always_inline void keep_request(__u64 pid_tgid, __s32 fd, const struct conn_state *cs, __u16 status,
                                         __u64 now, __u8 reason) {
    if (reason && !keep_within_rate(now, KEEP_LIMITED_REQUESTS)) /* kept, not sampled: within the rate */
        return;
    if (!producing())
        return;
    struct request_kept_event *e = events.ringbuf_reserve(sizeof(struct request_kept_event));
    if (!e) {
        count_drop(DROP_RINGBUF_FULL);
        return;
    }
    fill_header(&e->hdr, EV_REQUEST_KEPT, pid_tgid);
    e->hdr.ts_ns = now;
    e->start_ns = cs->req_start_ns;
    e->fd = fd;
    e->listen_fd = cs->listen_fd;
    e->status = status;
    e->method = cs->req_method;
    e->reason = reason;
    e->head_len = cs->req_head_len;
    __builtin_memcpy(e->head, cs->req_head, KEPT_HEAD);
    e->sampled = (cs->flags & CONN_SUMMARY) ? 1 : 0;
    e->context_len = cs->req_tp_len; /* 0, or at least TP_VALUE (request_traceparent) */
    __builtin_memcpy(e->context, cs->req_tp, TP_CONTEXT);
    __builtin_memset(e->_pad, 0, sizeof(e->_pad));
    events.ringbuf_submit(e, RB_SUBMIT_FLAGS);
    count_submitted();
}

/* Whether an answered request that was not sampled is kept: the enum keep_reason, or 0. */
static __always_inline __u8 keep_reason_of(const struct conn_state *cs, __u16 status, __u64 now) {
    if (status >= 500 && status <= 599)
        return KEEP_SERVER_ERROR;
    __u32 zero = 0;
    __u64 *slow = keep_slow_ns.lookup(&zero);
    if (slow && *slow && now - cs->req_start_ns >= *slow)
        return KEEP_SLOW;
    return 0;
}

/* Adds `took` to a metric series (count, sum, log2 slot of microseconds). */
static __always_inline void add_duration(struct http_metric *m, __u64 took) {
    __u32 slot = log2_u64(took / 1000);
    if (slot >= HTTP_HIST_SLOTS)
        slot = HTTP_HIST_SLOTS - 1;
    __sync_fetch_and_add(&m->count, 1);
    __sync_fetch_and_add(&m->sum_ns, took);
    __sync_fetch_and_add(&m->slots[slot], 1);
}

/* Adds `took` to series `m` (from its table's lookup_or_try_init), or counts a full table when it has none. */
static __always_inline void add_to_series(struct http_metric *m, __u64 took) {
    if (!m) {
        count_drop(DROP_METRICS_FULL);
        return;
    }
    add_duration(m, took);
}

/* A read/write of a connection returned `ret` <= 0: an EOF read or a reset, for its close reason. */
static __always_inline void note_transfer_end(struct conn_state *cs, __u8 io, long ret) {
    if (ret == 0 && io < IO_WRITE)
        cs->flags |= CONN_PEER_EOF;
    else if (ret == -104 /* ECONNRESET */ || ret == -32 /* EPIPE */ || ret == -110 /* ETIMEDOUT */)
        cs->flags |= CONN_IO_RESET;
}

/* Counts a downstream connection that closes now (traced or not), by how it ended. */
static __always_inline void record_connection(__u32 tgid, const struct conn_state *cs, __u64 now) {
    struct conn_metric_key key = {.pid = tgid, .listen_fd = cs->listen_fd};
    key.close_reason = (cs->flags & CONN_IO_RESET) ? CLOSE_RESET
                       : (cs->flags & CONN_PEER_EOF) ? CLOSE_PEER_CLOSED : CLOSE_ENVOY_CLOSED;
    struct http_metric *m = conn_metrics.lookup(&key);
    if (!m && (m = new_series()))
        m = conn_metrics.lookup_or_try_init(&key, m);
    add_to_series(m, now > cs->open_ts_ns ? now - cs->open_ts_ns : 0);
}

/* A peer's address and port as an established_at key. */
static __always_inline void peer_key_of(struct peer_key *k, const __u8 *addr, __u16 family, __u16 port) {
    if (family == AF_INET6) {
        __builtin_memcpy(k->addr, addr, 16);
    } else {
        k->addr[10] = 0xff;
        k->addr[11] = 0xff;
        __builtin_memcpy(&k->addr[12], addr, 4);
    }
    k->port = port;
}

/* A downstream connection's handshake completed (its peer is the tracepoint's destination; `local_addr`
 * its source, 4 or 16 bytes by family). */
static __always_inline void note_established(const __u8 *peer_addr, __u16 family, __u16 peer_port,
                                             const __u8 *local_addr, __u64 now) {
    struct peer_key k = {};
    peer_key_of(&k, peer_addr, family, peer_port);
    struct established e = {.ts_ns = now, .family = family};
    __builtin_memcpy(e.local_addr, local_addr, ADDR_LEN);
    established_at.update(&k, &e);
}

/* Thread `tid` of process `tgid` accepted a connection on listening fd `listen_fd`. */
static __always_inline void count_accept(__u32 tgid, __u32 tid, __s32 listen_fd) {
    struct accept_thread_key key = {.pid = tgid, .thread_id = tid, .listen_fd = listen_fd};
    __u64 zero = 0;
    __u64 *n = accepts_by_thread.lookup_or_try_init(&key, &zero);
    if (!n) {
        count_drop(DROP_METRICS_FULL);
        return;
    }
    __sync_fetch_and_add(n, 1);
}

/* Envoy accepted a connection on listening fd `listen_fd` at `now`: its accept-queue wait, if its
 * handshake completion was seen. Returns that completion's time (0: not seen) and puts the local address
 * it was seen with in `local_family` / `local_addr` (left as they are when not seen). */
static __always_inline __u64 record_accept_wait(__u32 tgid, __s32 listen_fd, const __u8 *peer_addr, __u16 family,
                                               __u16 peer_port, __u64 now, __u16 *local_family,
                                               __u8 *local_addr) {
    struct peer_key k = {};
    peer_key_of(&k, peer_addr, family, peer_port);
    struct established *est = established_at.lookup(&k);
    if (!est) {
        __u32 zero = 0;
        __u64 *unseen = accept_wait_unseen.lookup(&zero);
        if (unseen)
            (*unseen)++;
        return 0;
    }
    __u64 established = est->ts_ns;
    *local_family = est->family;
    __builtin_memcpy(local_addr, est->local_addr, ADDR_LEN);
    __u64 waited = now > established ? now - established : 0;
    established_at.delete(&k);
    struct conn_metric_key key = {.pid = tgid, .listen_fd = listen_fd};
    struct http_metric *m = accept_metrics.lookup(&key);
    if (!m && (m = new_series()))
        m = accept_metrics.lookup_or_try_init(&key, m);
    add_to_series(m, waited);
    return established;
}

/* Counts the connection's current request with `status`, ending now. */
static __always_inline void record_request(__u32 tgid, const struct conn_state *cs, __u16 status, __u64 now) {
    struct http_metric_key key = {};
    key.pid = tgid;
    key.listen_fd = cs->listen_fd;
    key.status = status;
    key.method = cs->req_method;
    struct http_metric *m = http_metrics.lookup(&key);
    if (!m && (m = new_series()))
        m = http_metrics.lookup_or_try_init(&key, m);
    add_to_series(m, now > cs->req_start_ns ? now - cs->req_start_ns : 0);
}
