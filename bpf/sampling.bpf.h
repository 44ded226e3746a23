/* sampling.bpf.h: the front of raw_syscalls:sys_exit in SAMPLING builds. Head sampling of plaintext
 * HTTP/1.x requests and their exact metrics (http_metrics.bpf.h), decided in the kernel.
 *
 * front_sys_exit is the one program on raw_syscalls:sys_exit. It tail-calls io_sys_exit (io.bpf.h,
 * unchanged: any branch added to it puts it over the verifier's 1M-instruction budget) only for the
 * transfers to report, so an unsampled request, a non-target's read or write and any other syscall cost
 * one short program, not two. epoll_wait exits (event-loop rounds) are handled here directly; the exits of
 * accept, accept4 and connect are tail-called to accept_sys_exit and connect_sys_exit.
 *
 * A request whose first read is not sampled costs no ring record: neither its reads nor the writes of its
 * response are reported (their bytes and calls are still counted on the connection). With request
 * summaries (`request_summary`, the default) a sampled request costs one: its transfers are not reported
 * either, and its answer's first write sends what the kernel knows of it (EV_REQUEST_KEPT, sampled: its
 * first KEPT_HEAD bytes, its traceparent, method, status and times), as for a kept one. Request boundaries
 * come from the direction of the transfers: on a downstream connection a read that follows a write (or
 * the connection's start) begins a request, and a write answers it. So the kernel only changes its
 * decision between exchanges, and user space always sees whole exchanges. Pipelined requests read before
 * their response share the decision of the first.
 *
 * Not decided here: upstream connections (the kernel cannot tell which downstream request an upstream one
 * serves; user space drops the upstream requests it cannot attribute to a traced request), TLS
 * connections (their requests are encrypted) and HTTP/2 (streams share one connection). A connection's
 * first request is decided like the others: its method token tells plaintext HTTP/1.x from TLS and HTTP/2
 * (which io_sys_exit learns from the same bytes when they are reported).
 */

BPF_ARRAY(sample_parent_based, __u32, 1);  /* 1: a valid traceparent's sampled flag decides (parentbased_*) */
BPF_ARRAY(request_summary, __u32, 1);      /* 1: a sampled request is reported as one record, not its transfers */
/* downstream requests: [0] sampled, [1] not sampled (by the ratio); [2] sampled, [3] not sampled (by their
 * traceparent) */
BPF_PERCPU_ARRAY(sample_counts, __u64, 4);
/* tail-call slots, set by the loader: [EXIT_IO] io_sys_exit, [EXIT_ACCEPT] accept_sys_exit,
 * [EXIT_CONNECT] connect_sys_exit, [EXIT_SETUP] setup_sys_exit (startup.bpf.h), [EXIT_TLS_HELLO]
 * tls_hello_sys_exit, [EXIT_TLS_STEP] tls_step_sys_exit, [EXIT_QUIET] quiet_sys_exit, [EXIT_EPOLL_CTL]
 * epoll_ctl_sys_exit (syscalls.bpf.h), [EXIT_HOLD] hold_hello_sys_exit, [EXIT_HS_SUMMARY] hs_summary_sys_exit,
 * [EXIT_QUIET_WRITE] quiet_write_sys_exit */
#define EXIT_IO 0
#define EXIT_ACCEPT 1
#define EXIT_CONNECT 2
#define EXIT_SETUP 3
#define EXIT_TLS_HELLO 4
#define EXIT_TLS_STEP 5
#define EXIT_QUIET 6
#define EXIT_EPOLL_CTL 7
#define EXIT_HOLD 8
#define EXIT_HS_SUMMARY 9
#define EXIT_QUIET_WRITE 10
BPF_PROG_ARRAY(exit_progs, 11);

static __always_inline void count_sampled(__u32 slot) {
    __u64 *v = sample_counts.lookup(&slot);
    if (v)
        (*v)++;
}

/* The ratio's draw: 1 when a 32-bit random number is not below the sampler's threshold (not traced). */
static __always_inline __u32 ratio_skips(void) {
    __u32 zero = 0;
    __u64 *threshold = sample_threshold.lookup(&zero);
    return threshold && (__u64)bpf_get_prandom_u32() >= *threshold;
}

/* Reads a new request's first bytes once, into the per-CPU scratch (TP_HEAD of them when a traceparent is
 * looked for, else KEPT_HEAD), keeps KEPT_HEAD of them in the connection's state (sent if the request is
 * kept) and returns its enum http_method. */
static __always_inline __u8 read_request_head(struct conn_state *cs, struct head_scratch *s, __u8 io,
                                              const void *buf, long ret, __u32 want) {
    __u64 avail = (__u64)ret;
    const void *src = transfer_start(io, buf, &avail);
    __u32 n = avail > want ? want : (__u32)avail;
    BARRIER_VAR(n);
    n &= 2 * TP_HEAD - 1;
    if (n > TP_HEAD)
        n = TP_HEAD;
    s->len = 0;
    cs->req_head_len = 0;
    __builtin_memset(s->b, 0, KEPT_HEAD); /* a short read leaves no earlier request's bytes behind */
    if (!src || n == 0 || bpf_probe_read_user(s->b, n, src) != 0)
        return HTTP_METHOD_NONE;
    s->len = n;
    __builtin_memcpy(cs->req_head, s->b, KEPT_HEAD);
    cs->req_head_len = n < KEPT_HEAD ? n : KEPT_HEAD;
    return http_method_of(s->b, n);
}

/* The sampling decision for a new request (its first read, in the scratch): 1 when it is not traced.
 * `scan`: look for its traceparent (kept in the connection's state) even when it does not decide. */
static __always_inline __u32 decide_request(struct head_scratch *s, struct conn_state *cs, __u32 parent_based,
                                            __u32 scan) {
    cs->req_tp_len = 0;
    if (parent_based || scan) {
        int sampled = request_traceparent(s, cs);
        if (sampled >= 0 && parent_based) {
            count_sampled(sampled ? 2 : 3);
            return !sampled;
        }
    }
    __u32 skip = ratio_skips();
    count_sampled(skip);
    return skip;
}

/* A plaintext downstream connection whose requests are not decided one by one, at its first real transfer:
 * HTTP/2 with prior knowledge (its client preface; header blocks HPACK-coded, which user space decodes only
 * if it sees all of them) or another protocol (first bytes that are no HTTP/1.x method and no TLS record,
 * or the server speaking first). Traced whole by the ratio (conn_sampling.bpf.h) and reported as before;
 * otherwise nothing more of it is sent but its close, marked (its accept was sent already). `slot`: its
 * kind's first conn_sample_counts slot. Returns 1 when it is not traced. */
static __always_inline __u32 decide_whole(struct conn_state *cs, __u32 flags, __u32 slot) {
    __u32 untraced = ratio_skips();
    count_conn_sampled(slot + untraced);
    flags &= ~(CONN_AWAIT | CONN_SKIP | CONN_SUMMARY); /* not a request: io_sys_exit takes a traced one */
    cs->flags = untraced ? flags | CONN_SAW_IO | CONN_UNTRACED | CONN_LATE_UNTRACED : flags;
    return untraced;
}

/* One read (ret > 0, not a peek) or write of a plaintext downstream connection: request boundaries, the
 * metrics, and whether io_sys_exit should see it (0) or not (1: the current request is not traced). */
static __always_inline __u32 on_plain_transfer(struct conn_state *cs, __u64 pid_tgid, __s32 fd, __u8 io,
                                                const void *buf, long ret) {
    __u32 tgid = pid_tgid >> 32;
    __u32 flags = cs->flags;
    __u8 b[16] = {};
    if (io >= IO_WRITE) {
        /* the server spoke first: no HTTP, no TLS (a database's greeting through tcp_proxy). Not an adopted
         * connection's: the kernel saw none of what came before (an answer in flight) */
        if (!(flags & (CONN_AWAIT | CONN_SAW_IO | CONN_ADOPTED)))
            return decide_whole(cs, flags, SAMPLED_WHOLE_OTHER);
        if (!(flags & CONN_AWAIT))
            return (flags & CONN_SKIP) ? 1 : 0; /* more of the same answer */
        cs->flags = flags & ~CONN_AWAIT;          /* the answer's first bytes: the status line */
        if (cs->req_method) {
            __u16 status = first_bytes(io, buf, ret, b, 12) == 12 ? http_status_of(b) : 0;
            __u64 now = bpf_ktime_get_ns();
            record_request(tgid, cs, status, now);
            __u8 reason = (flags & CONN_SKIP) && !(flags & CONN_SUMMARY) ? keep_reason_of(cs, status, now) : 0;
            if (reason || (flags & CONN_SUMMARY))
                keep_request(pid_tgid, fd, cs, status, now, reason);
        }
        return (flags & CONN_SKIP) ? 1 : 0;
    }
    if (flags & CONN_AWAIT) /* the same request goes on */
        return (flags & CONN_SKIP) ? 1 : 0;
    /* a new request (or the connection's first bytes) */
    __u32 zero = 0;
    struct head_scratch *s = head_scratch.lookup(&zero);
    if (!s)
        return 0;
    __u32 *pb = sample_parent_based.lookup(&zero);
    __u32 parent_based = pb && *pb;
    __u32 *rs = request_summary.lookup(&zero);
    __u32 summary = rs && *rs;
    cs->req_method = read_request_head(cs, s, io, buf, ret, parent_based || summary ? TP_HEAD : KEPT_HEAD);
    cs->req_start_ns = bpf_ktime_get_ns();
    __u8 first = !(flags & CONN_SAW_IO);
    if (!cs->req_method && s->len > 0) {
        if (!first) { /* bytes that start no request (a tunnel's after an upgrade or CONNECT, a body after an
                       * interim answer): they follow the decision of the exchange before them */
            cs->flags = flags | CONN_AWAIT;
            return (flags & CONN_SKIP) ? 1 : 0;
        }
        if (s->b[0] != TLS_RECORD_HANDSHAKE && !(flags & CONN_ADOPTED)) /* h2c, or no HTTP: decided whole */
            return decide_whole(cs, flags, s->len >= 8 &&
                                W4(s->b[0], s->b[1], s->b[2], s->b[3]) == W4('P', 'R', 'I', ' ') &&
                                W4(s->b[4], s->b[5], s->b[6], s->b[7]) == W4('*', ' ', 'H', 'T') ? SAMPLED_WHOLE_H2C
                                                                                          : SAMPLED_WHOLE_OTHER);
    }
    flags |= CONN_AWAIT;
    flags &= ~(CONN_SKIP | CONN_SUMMARY);
    /* Only requests of plaintext connections whose every transfer may be reported are decided. The first
     * bytes of a connection are the first request's: a method token means plaintext HTTP/1.x, and when that
     * request is not traced, what io_sys_exit would have learnt from them is recorded here. */
    if (HTTP_CAPTURE && cs->req_method && (first || cs->capture_budget == CAPTURE_UNLIMITED)) {
        __u32 skip = decide_request(s, cs, parent_based, summary);
        if (skip || summary) { /* not traced, or traced as one record: its transfers are not reported */
            flags |= skip ? CONN_SKIP : (CONN_SKIP | CONN_SUMMARY);
            if (first) {
                flags |= CONN_SAW_IO;
                cs->capture_budget = CAPTURE_UNLIMITED;
            }
        }
    }
    cs->flags = flags;
    return (flags & CONN_SKIP) ? 1 : 0;
}

/* A transfer (ret > 0, not a peek) that io_sys_exit will not see: counted on the connection as it would
 * count it, and not reported. */
static __always_inline void count_unreported(struct conn_state *cs, __u8 io, long ret) {
    if (io >= IO_WRITE) {
        cs->bytes_tx += ret;
        cs->writes++;
    } else {
        cs->bytes_rx += ret;
        cs->reads++;
    }
}

/* The saved user registers the front reads, in one copy: r10 .. orig_ax are contiguous in x86-64's
 * struct pt_regs (a fixed layout: the syscall entry code builds it). */
struct sys_regs {
    __u64 r10, r9, r8, ax, cx, dx, si, di, orig_ax;
};

/* The flags a recv-family call passed (MSG_PEEK marks a listener filter's peek); 0 for the others. */
static __always_inline __u32 recv_flags(__u8 io, const struct sys_regs *r) {
    if (io == IO_RECVMSG)
        return (__u32)r->dx;
    if (io == IO_RECVFROM)
        return (__u32)r->r10;
    return 0;
}

/* tail-called by front_sys_exit for the exits of accept and accept4, and of connect (syscalls.bpf.h): in
 * SAMPLING builds no syscalls:sys_exit_* tracepoint is enabled, so the kernel's perf handler for them
 * (perf_syscall_exit) does not run on every syscall exit of the machine. Programs of their own: their
 * records do not fit in the front's stack (nor both in one). */
int accept_sys_exit(struct bpf_raw_tracepoint_args *ctx) { return on_accept_exit((long)ctx->args[1]); }
int connect_sys_exit(struct bpf_raw_tracepoint_args *ctx) { return on_connect_exit((long)ctx->args[1]); }

/* tail-called by front_sys_exit for a TLS server's hello flight (tls_handshake.bpf.h): parsed, then the
 * write goes on as the front would have sent it on. */
/* For a program tail-called on a read/write's exit: the syscall's saved registers (*r), which one it is (*io)
 * and its connection's state; 0 when it is none of ours. */
static __always_inline struct conn_state *exit_conn(struct bpf_raw_tracepoint_args *ctx, struct sys_regs *r,
                                                    __u8 *io) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    if (bpf_probe_read_kernel(r, sizeof(*r), &regs->r10) != 0)
        return 0;
    *io = io_syscall((long)r->orig_ax);
    __u64 key = conn_key(bpf_get_current_pid_tgid() >> 32, (__s32)r->di);
    struct conn_state *cs = conns.lookup(&key);
    return *io ? cs : 0;
}

/* For a program tail-called on a read's exit: its connection, or 0 when it moved nothing (ret <= 0), was a
 * write, or is none of ours. */
static __always_inline struct conn_state *exit_read_conn(struct bpf_raw_tracepoint_args *ctx, struct sys_regs *r,
                                                         __u8 *io) {
    struct conn_state *cs = (long)ctx->args[1] > 0 ? exit_conn(ctx, r, io) : 0;
    return cs && *io < IO_WRITE ? cs : 0;
}

/* A transfer (ret > 0, not a peek) of a connection that reports none of them (CONN_UNTRACED): counted; those
 * of a summarized handshake (CONN_HS_SUMMARY, conn_keep.bpf.h) have their TLS records walked as well, by
 * quiet_sys_exit or quiet_write_sys_exit. */
static __always_inline int unreported_transfer(struct bpf_raw_tracepoint_args *ctx, struct conn_state *cs,
                                               __u8 io, long ret) {
    if (cs->flags & CONN_HS_SUMMARY) {
        exit_progs.call(ctx, io < IO_WRITE ? EXIT_QUIET : EXIT_QUIET_WRITE);
        count_drop(DROP_TAIL_CALL);
        return 0;
    }
    count_unreported(cs, io, ret);
    return 0;
}

int tls_hello_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    long ret = (long)ctx->args[1];
    struct sys_regs r = {};
    __u8 io = 0;
    struct conn_state *cs = exit_conn(ctx, &r, &io);
    if (!cs)
        return 0;
    parse_server_hello(cs, io, (const void *)r.si, ret);
    if (cs->flags & CONN_UNTRACED) {
        hold_flight(conn_key(bpf_get_current_pid_tgid() >> 32, (__s32)r.di), io, (const void *)r.si, ret);
        return unreported_transfer(ctx, cs, io, ret);
    }
    exit_progs.call(ctx, EXIT_IO);
    count_drop(DROP_TAIL_CALL);
    return 0;
}

/* tail-called by front_sys_exit for a read of a traced downstream TLS connection that may be quiet
 * (quiet_candidate, tls_handshake.bpf.h): the handshake's step, then quiet_sys_exit for a quiet read, else
 * io_sys_exit. A program of its own: neither the front nor io_sys_exit has verifier room for the quiet
 * reads; the front keeps the step of every other handshake transfer (untraced connections' included: no
 * tail call for them). */
int tls_step_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    long ret = (long)ctx->args[1];
    struct sys_regs r = {};
    __u8 io = 0;
    struct conn_state *cs = exit_read_conn(ctx, &r, &io);
    if (!cs)
        return 0;
    __u32 peek = recv_flags(io, &r) & MSG_PEEK_FLAG;
    __u8 quiet = 0;
    if (cs->quiet_left && io < IO_WRITE && !peek)
        quiet = quiet_read(cs, ret);
    else if ((cs->flags & CONN_FIN_QUIET) && io < IO_WRITE && !peek)
        quiet_finished(cs, io, (const void *)r.si, ret, &quiet);
    if (cs->hs_state < HS_DONE && !quiet) /* not within a quiet record's body: no step of its own */
        tls_handshake_step(cs, bpf_get_current_pid_tgid() >> 32, io, (const void *)r.si, ret, peek, &quiet);
    /* an untraced connection (here for a quiet record's body) reports nothing */
    exit_progs.call(ctx, quiet || (cs->flags & CONN_UNTRACED) ? EXIT_QUIET : EXIT_IO);
    count_drop(DROP_TAIL_CALL);
    return 0;
}

/* A transfer not reported (ret > 0) of connection `cs`: counted, and its TLS record headers walked, as
 * io_sys_exit would, without a record. `dir`: a constant (one walk each for the verifier). */
static __always_inline void walk_unreported(struct conn_state *cs, const struct sys_regs *r, __u8 io, long ret,
                                            __u8 dir) {
    count_unreported(cs, io, ret);
    struct inflight req = {};
    req.fd = (__s32)r->di;
    req.syscall = io;
    req.buf = r->si;
    if (io == IO_READV || io == IO_WRITEV)
        req.len = (__u32)r->dx; /* iovcnt */
    walk_tls_records(cs, &req, (__u64)ret, dir);
}

/* tail-called by tls_step_sys_exit for a quiet read, and for the reads of a summarized handshake
 * (CONN_HS_SUMMARY, conn_keep.bpf.h): walk_unreported. */
int quiet_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    long ret = (long)ctx->args[1];
    struct sys_regs r = {};
    __u8 io = 0;
    struct conn_state *cs = exit_read_conn(ctx, &r, &io);
    if (cs)
        walk_unreported(cs, &r, io, ret, DIR_READ);
    return 0;
}

/* tail-called for the writes of a summarized handshake (CONN_HS_SUMMARY): walk_unreported. */
int quiet_write_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    long ret = (long)ctx->args[1];
    struct sys_regs r = {};
    __u8 io = 0;
    struct conn_state *cs = ret > 0 ? exit_conn(ctx, &r, &io) : 0;
    if (cs && io >= IO_WRITE)
        walk_unreported(cs, &r, io, ret, DIR_WRITE);
    return 0;
}

/* For hold_hello_sys_exit, tail-called by front_sys_exit for a read (or peek) of an untraced TLS connection
 * whose ClientHello is held (CONN_HOLD; a traced one whose handshake is summarized too): its bytes kept in
 * held_handshakes for a kept record or the summary (conn_keep.bpf.h). A listener filter's peek shows the
 * stream from its start, so each peek replaces what was held and the real reads after one hold nothing more;
 * without a peek, BoringSSL reads the record's 5-byte header, then its body, and the two are held one after
 * the other. */
static __always_inline void hold_hello(struct conn_state *cs, __u8 io, const struct sys_regs *r, long ret,
                                       __u32 peek) {
    if (cs->hs_state != HS_HELLO) { /* the handshake moved on */
        cs->flags &= ~CONN_HOLD;
        return;
    }
    __u64 key = conn_key(bpf_get_current_pid_tgid() >> 32, (__s32)r->di);
    struct held_handshake *h = held_handshakes.lookup(&key);
    if (!h) {
        __u32 zero = 0;
        struct held_handshake *init = held_zero.lookup(&zero);
        if (init)
            h = held_handshakes.lookup_or_try_init(&key, init);
    }
    __u64 avail = (__u64)ret;
    const __u8 *src = h ? transfer_start(io, (const void *)r->si, &avail) : 0;
    if (!src) {
        cs->flags &= ~CONN_HOLD;
        return;
    }
    if (!h->hello_ns) /* its first bytes' time (tls_first_bytes, this same transfer) */
        h->hello_ns = cs->hs_start_ns;
    if (peek || !h->hello_len) {
        hold_hello_bytes(h, src, avail, 0);
        h->hello_ret = (__u32)ret;
        h->hello_peeked = peek ? 1 : 0;
        /* held for good: a read of more than a lone header, or a peek of the whole first record (no other
         * peek nor read needs a look: BoringSSL's reads of it follow) */
        if ((!peek && ret != 5) || (peek && h->hello_len >= 5 && 5 + be16(&h->hello[3]) <= (__u32)ret))
            cs->flags &= ~CONN_HOLD;
    } else {
        if (!h->hello_peeked && h->hello_len == 5) { /* the body after its lone header */
            hold_hello_bytes(h, src, avail, 5);
            h->hello_ret = 5 + (__u32)ret;
        }
        cs->flags &= ~CONN_HOLD;
    }
}

int hold_hello_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    long ret = (long)ctx->args[1];
    struct sys_regs r = {};
    __u8 io = 0;
    struct conn_state *cs = exit_read_conn(ctx, &r, &io);
    if (!cs)
        return 0;
    __u32 peek = recv_flags(io, &r) & MSG_PEEK_FLAG;
    hold_hello(cs, io, &r, ret, peek);
    return peek ? 0 : unreported_transfer(ctx, cs, io, ret);
}

/* tail-called by front_sys_exit for the transfer that ended the handshake of a traced TLS connection whose
 * handshake is summarized (CONN_HS_SUMMARY, conn_keep.bpf.h): its one record (what its accept and its
 * handshake's transfers would have said, with the held hello bytes), then a traced connection from here. The
 * transfer itself is in the record: counted, and its TLS records walked (quiet_sys_exit,
 * quiet_write_sys_exit), as every transfer of its handshake was. First bytes that were not TLS are reported
 * as a traced connection's. */
int hs_summary_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    struct sys_regs r = {};
    __u8 io = 0;
    struct conn_state *cs = exit_conn(ctx, &r, &io);
    if (!cs || !(cs->flags & CONN_HS_SUMMARY))
        return 0;
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u64 key = conn_key(pid_tgid >> 32, (__s32)r.di);
    keep_connection(pid_tgid, key, (__s32)r.di, cs, KEEP_CONN_SAMPLED, KEPT_OPEN, bpf_ktime_get_ns());
    held_handshakes.delete(&key);
    cs->flags &= ~(CONN_UNTRACED | CONN_HOLD | CONN_HS_SUMMARY);
    if (!cs->hs_start_ns) { /* not TLS */
        exit_progs.call(ctx, EXIT_IO);
        count_drop(DROP_TAIL_CALL);
        return 0;
    }
    /* ciphertext from here: reads are reported without bytes (their rounds), as io_sys_exit does past the
     * handshake's first application-data record */
    cs->flags |= CONN_TLS | CONN_SAW_IO | CONN_TLS_APP;
    cs->capture_budget = HTTP_CAPTURE ? CAPTURE_UNLIMITED : 0;
    if (io < IO_WRITE)
        quiet_after_summary(cs, io, (const void *)r.si, (long)ctx->args[1]);
    exit_progs.call(ctx, io < IO_WRITE ? EXIT_QUIET : EXIT_QUIET_WRITE);
    count_drop(DROP_TAIL_CALL);
    return 0;
}

int front_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long ret = (long)ctx->args[1];
    /* EAGAIN (a read with nothing to read, the end of an accept loop), of any process, before anything
     * else: the io program returns before looking, and an accept or connect that would block leaves its
     * in-flight entry to the thread's next accept/connect enter, which overwrites it */
    if (ret == -11)
        return 0;
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!maybe_target(pid_tgid >> 32)) /* another process: nothing of it is traced */
        return 0;
    struct sys_regs r = {};
    if (bpf_probe_read_kernel(&r, sizeof(r), &regs->r10) != 0)
        return 0;
    long nr = (long)r.orig_ax;
    if (nr == NR_EPOLL_WAIT || nr == NR_EPOLL_PWAIT || nr == NR_EPOLL_PWAIT2)
        return on_epoll_wait_exit(ret, pid_tgid);
    __u8 io = io_syscall(nr);
    if (!io) {
        if (nr == NR_ACCEPT4 || nr == NR_ACCEPT || nr == NR_CONNECT) { /* once per connection */
            exit_progs.call(ctx, nr == NR_CONNECT ? EXIT_CONNECT : EXIT_ACCEPT);
            count_drop(DROP_TAIL_CALL);
        } else if (nr == NR_BIND || nr == NR_DUP || nr == NR_DUP2 || nr == NR_DUP3 ||
                   (nr == NR_FCNTL && (r.si == F_DUPFD_CMD || r.si == F_DUPFD_CLOEXEC_CMD))) {
            exit_progs.call(ctx, EXIT_SETUP); /* a listener's setup (startup.bpf.h): rare */
            count_drop(DROP_TAIL_CALL);
        } else if (nr == NR_EPOLL_CTL && r.si == EPOLL_CTL_ADD_OP && ret == 0) { /* once or twice per fd */
            exit_progs.call(ctx, EXIT_EPOLL_CTL);
            count_drop(DROP_TAIL_CALL);
        }
        return 0;
    }
    __s32 fd = (__s32)r.di;
    const void *buf = (const void *)r.si;
    __u64 key = conn_key(pid_tgid >> 32, fd);
    struct conn_state *cs = conns.lookup(&key);
    if (!cs)
        return 0; /* io_sys_exit would find nothing either */
    if (ret <= 0) {
        note_transfer_end(cs, io, ret); /* an EOF or a reset: how the connection ends (its metrics) */
    } else if (cs->role == ROLE_DOWNSTREAM && (cs->hs_state < HS_DONE || cs->quiet_left ||
                                               (cs->flags & CONN_FIN_QUIET))) {
        __u32 peek = recv_flags(io, &r) & MSG_PEEK_FLAG;
        if (cs->hs_state == HS_NONE) { /* the connection's first bytes: TLS or not (tls_handshake.bpf.h) */
            tls_first_bytes(cs, io, buf, ret, peek);
        } else if (io < IO_WRITE && !peek && quiet_candidate(cs)) { /* a read that may be quiet */
            exit_progs.call(ctx, EXIT_TLS_STEP);
            count_drop(DROP_TAIL_CALL);
            return 0;
        } else if (cs->hs_state < HS_DONE && tls_handshake_step(cs, pid_tgid >> 32, io, buf, ret, peek, 0)) {
            exit_progs.call(ctx, EXIT_TLS_HELLO); /* the server's hello flight: parsed in a program of its own */
            count_drop(DROP_TAIL_CALL);
            return 0;
        }
    }
    if (cs->flags & CONN_UNTRACED) { /* counted, never reported */
        if ((cs->flags & CONN_HS_SUMMARY) && cs->hs_state == HS_DONE && ret > 0) { /* its handshake ended */
            exit_progs.call(ctx, EXIT_HS_SUMMARY);
            count_drop(DROP_TAIL_CALL);
            return 0;
        }
        if ((cs->flags & CONN_HOLD) && ret > 0 && io < IO_WRITE) { /* its ClientHello, held (conn_keep.bpf.h) */
            exit_progs.call(ctx, EXIT_HOLD);
            count_drop(DROP_TAIL_CALL);
            return 0;
        }
        if (ret > 0 && !(recv_flags(io, &r) & MSG_PEEK_FLAG))
            return unreported_transfer(ctx, cs, io, ret);
        return 0;
    }
    /* CONN_H2 before the first real read: a listener filter's peek showed the preface (decided at the read) */
    if (ret > 0 && cs->role == ROLE_DOWNSTREAM && !(cs->flags & CONN_TLS) &&
        (cs->flags & (CONN_H2 | CONN_SAW_IO)) != (CONN_H2 | CONN_SAW_IO) &&
        !(recv_flags(io, &r) & MSG_PEEK_FLAG) && on_plain_transfer(cs, pid_tgid, fd, io, buf, ret)) {
        count_unreported(cs, io, ret); /* a request not traced */
        return 0;
    }
    exit_progs.call(ctx, EXIT_IO);
    count_drop(DROP_TAIL_CALL); /* reached only when the tail call failed */
    return 0;
}
