/* io.bpf.h: reads and writes. The raw sys_exit program dispatches on the syscall number: epoll_wait exits
 * start a round (sched.bpf.h), read/write-family exits on a tracked fd are counted in `conns` and, within
 * the connection's capture budget, sent as EV_DATA records with their first bytes.
 */

/* An EV_DATA record is built here (too big for the stack). The spill area lets the verifier accept
 * copies at masked offsets: off < CAPTURE_MAX and n <= CAPTURE_MAX always fit. */
struct data_scratch_t {
    struct data_event ev;
    __u8 spill[CAPTURE_MAX];
};
BPF_PERCPU_ARRAY(data_scratch, struct data_scratch_t, 1);

/* Syscall argument i (0-based) of a 64-bit syscall, from the saved user registers. */
static __always_inline __u64 syscall_arg(struct pt_regs *regs, int i) {
    __u64 v = 0;
    switch (i) {
    case 0: bpf_probe_read_kernel(&v, sizeof(v), &regs->di); break;
    case 1: bpf_probe_read_kernel(&v, sizeof(v), &regs->si); break;
    case 2: bpf_probe_read_kernel(&v, sizeof(v), &regs->dx); break;
    case 3: bpf_probe_read_kernel(&v, sizeof(v), &regs->r10); break;
    }
    return v;
}

/* Copies up to `want` bytes from a user buffer or iovec array into e->data; returns bytes copied. */
static __always_inline __u32 capture_flat(struct data_event *e, const void *src, __u32 want) {
    if (want > CAPTURE_MAX)
        want = CAPTURE_MAX;
    if (want == 0)
        return 0;
    BARRIER_VAR(want);
    want &= (2 * CAPTURE_MAX - 1);
    if (want > CAPTURE_MAX)
        want = CAPTURE_MAX;
    if (bpf_probe_read_user(e->data, want, src) != 0) {
        count_drop(DROP_CAPTURE_READ);
        return 0;
    }
    return want;
}

static __always_inline __u32 capture_iov(struct data_event *e, const struct iovec *iov, __u32 iovcnt,
                                         __u32 want) {
    if (want > CAPTURE_MAX)
        want = CAPTURE_MAX;
    __u32 off = 0;
#pragma unroll
    for (int i = 0; i < MAX_IOV; i++) {
        if (i >= iovcnt || off >= want)
            break;
        struct iovec v = {};
        if (bpf_probe_read_user(&v, sizeof(v), &iov[i]) != 0)
            break;
        __u32 n = want - off;
        if (v.iov_len < n)
            n = v.iov_len;
        BARRIER_VAR(n);
        BARRIER_VAR(off);
        off &= (CAPTURE_MAX - 1);
        n &= (2 * CAPTURE_MAX - 1);
        if (n > CAPTURE_MAX)
            n = CAPTURE_MAX;
        if (n == 0)
            continue;
        /* data is CAPTURE_MAX bytes; the scratch buffer behind it has room for off + n < 2*CAPTURE_MAX */
        if (bpf_probe_read_user((__u8 *)e->data + off, n, v.iov_base) != 0) {
            count_drop(DROP_CAPTURE_READ);
            break;
        }
        off += n;
    }
    return off > want ? want : off;
}

/* Sends the EV_DATA record of one read/write (its first bytes, unless the connection is TLS past its
 * handshake, or its condensed framing if it is HTTP/2) and updates the capture budget. Returns 1 on an
 * HTTP/2 connection whose framing is followed (which is not TLS), else 0. */
static __always_inline int emit_data(struct conn_state *cs, struct thread_state *t, __u64 pid_tgid,
                                      const struct inflight *req, long ret, __u8 is_write, __u8 peek) {
    __u32 seq = cs->data_events;
    cs->data_events = seq + 1;
    __u8 first_io = ret > 0 && !peek && !(cs->flags & CONN_SAW_IO);
    if (first_io)
        cs->flags |= CONN_SAW_IO;

    __u32 zero = 0;
    struct data_scratch_t *scratch = data_scratch.lookup(&zero);
    if (!scratch)
        return 0;
    struct data_event *e = &scratch->ev;
    fill_header_of(&e->hdr, EV_DATA, pid_tgid, t);
    e->fd = req->fd;
    e->direction = is_write ? DIR_WRITE : DIR_READ;
    e->syscall = req->syscall;
    e->flags = peek ? DATA_FLAG_PEEK : 0;
    e->role = cs->role;
    e->ret = ret;
    e->msg_seq = seq;
    e->captured = 0;
    e->held = 0;
    e->held_captured = 0;
    __builtin_memset(e->held_data, 0, sizeof(e->held_data));
    tls_attach_held(cs, e, ret, is_write, peek); /* a held TLS record header rides on this read */
    /* HTTP/2 connections whose framing is still followed get a condensed record instead (capture_h2) */
    __u8 h2 = (cs->flags & CONN_H2) && cs->h2[is_write & 1].state == H2_WALK;
    if (ret > 0 && !(cs->flags & CONN_TLS_APP) && !h2) {
        __u32 want = (__u32)ret;
        if (req->syscall == IO_READV || req->syscall == IO_WRITEV) {
            e->captured = capture_iov(e, (const struct iovec *)req->buf, req->len, want);
        } else if (req->syscall == IO_RECVMSG || req->syscall == IO_SENDMSG) {
            struct user_msghdr mh = {};
            if (bpf_probe_read_user(&mh, sizeof(mh), (void *)req->buf) == 0)
                e->captured = capture_iov(e, mh.msg_iov, (__u32)mh.msg_iovlen, want);
        } else {
            e->captured = capture_flat(e, (const void *)req->buf, want);
        }
    }
    /* Plaintext from its first byte (not a TLS handshake record): with request capture on, every read
     * and write of the connection carries its first bytes, for the HTTP parser in user space. */
    if (HTTP_CAPTURE && first_io && e->captured >= 1 && e->data[0] != 0x16)
        cs->capture_budget = CAPTURE_UNLIMITED;
    if (e->captured >= 3 && !is_write && !peek) {
        if (first_io && e->data[0] == 0x16)
            cs->flags |= CONN_TLS;
        /* A TLS application-data record header from the client (17 03 0x) on a TLS connection: the
         * handshake is over (TLS 1.3: the encrypted Finished; 1.2: the first request). Stop capturing
         * bytes: the rest of the connection is ciphertext. With request capture on, later reads still
         * send a record without bytes: its thread and round tie the upstream requests they cause to this
         * connection. The 3-byte check makes a false stop on a ciphertext read ~1 in 16M. */
        if ((cs->flags & CONN_TLS) && e->data[0] == 0x17 && e->data[1] == 0x03 && e->data[2] <= 0x04) {
            cs->flags |= CONN_TLS_APP;
            cs->capture_budget = HTTP_CAPTURE ? CAPTURE_UNLIMITED : 0;
        }
    }
    if (tls_hold_header(cs, e, ret, is_write, peek, seq)) /* a lone TLS record header waits for the next */
        return 0;
    /* HTTP/2 with prior knowledge: the client's first bytes are the preface (downstream: the first read;
     * upstream: the first write). */
    if (first_io && is_write == (cs->role == ROLE_UPSTREAM) && is_h2_preface(e)) {
        h2_start(cs, is_write);
        h2 = 1;
    }
    if (h2 && ret > 0 && !peek)
        capture_h2(cs, e, req, (__u64)ret, is_write);
    __u32 size = offsetof(struct data_event, data) + (e->captured & (2 * CAPTURE_MAX - 1));
    if (size > sizeof(struct data_event))
        size = sizeof(struct data_event);
    emit(e, size);
    return h2;
}

/* The read/write-family syscall (enum io_syscall) a syscall number is, or 0 for any other. */
static __always_inline __u8 io_syscall(long nr) {
    switch (nr) {
    case NR_READ: return IO_READ;
    case NR_READV: return IO_READV;
    case NR_RECVFROM: return IO_RECVFROM;
    case NR_RECVMSG: return IO_RECVMSG;
    case NR_WRITE: return IO_WRITE;
    case NR_WRITEV: return IO_WRITEV;
    case NR_SENDTO: return IO_SENDTO;
    case NR_SENDMSG: return IO_SENDMSG;
    default: return 0;
    }
}

/* The flags a recv-family call passed (MSG_PEEK marks a listener filter's peek); 0 for the others. */
static __always_inline __u32 io_recv_flags(__u8 syscall, struct pt_regs *regs) {
    if (syscall == IO_RECVMSG)
        return (__u32)syscall_arg(regs, 2);
    if (syscall == IO_RECVFROM)
        return (__u32)syscall_arg(regs, 3);
    return 0;
}

/* Where the bytes a read/write moved begin in user memory, given its buffer argument (`src`): the buffer,
 * or the base of the first iovec of the iovec forms (readv/writev, recvmsg/sendmsg); *avail is lowered to
 * what that piece holds. 0 when the iovec could not be read. */
static __always_inline const void *transfer_start(__u8 io, const void *src, __u64 *avail) {
    if (io != IO_READV && io != IO_WRITEV && io != IO_RECVMSG && io != IO_SENDMSG)
        return src;
    const struct iovec *iov = src;
    if (io == IO_RECVMSG || io == IO_SENDMSG) {
        struct user_msghdr mh = {};
        if (bpf_probe_read_user(&mh, sizeof(mh), src) != 0)
            return 0;
        iov = mh.msg_iov;
    }
    struct iovec v = {};
    if (bpf_probe_read_user(&v, sizeof(v), iov) != 0)
        return 0;
    if (v.iov_len < *avail)
        *avail = v.iov_len;
    return v.iov_base;
}

/* The first `n` (<= 12) bytes a read/write moved, into dst (zero-filled); 0 when they could not be read.
 * The iovec forms are read from their first iovec. */
static __always_inline __u32 first_bytes(__u8 io, const void *buf, long ret, __u8 *dst, __u32 n) {
    __u64 avail = (__u64)ret;
    const void *src = transfer_start(io, buf, &avail);
    if (avail < n)
        n = (__u32)avail;
    n &= 15;
    if (!src || n == 0 || n > 12 || bpf_probe_read_user(dst, n, src) != 0)
        return 0;
    return n;
}

/* A read/write-family syscall returns. Its arguments are read back from the saved user registers (the
 * kernel leaves rdi/rsi/rdx/r10 as the caller passed them), so nothing is kept between enter and exit:
 * an EAGAIN costs no lookup, any other return one (the connection), plus the thread for a record. */
static __always_inline int on_io_exit(__u8 syscall, struct pt_regs *regs, long ret) {
    if (ret == -11 /* EAGAIN */)
        return 0;
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    struct inflight req = {};
    req.fd = (__s32)syscall_arg(regs, 0);
    __u64 key = conn_key(pid_tgid >> 32, req.fd);
    struct conn_state *cs = conns.lookup(&key); /* only targets' connections are in `conns` */
    if (!cs)
        return 0;
    req.syscall = syscall;
    __u8 is_write = syscall >= IO_WRITE;
    /* only reads with flags can peek (listener filters); the buffers are read below, when needed */
    req.flags = io_recv_flags(syscall, regs);
    __u8 peek = (req.flags & MSG_PEEK_FLAG) ? 1 : 0;
    __u8 report = cs->data_events < cs->capture_budget && !(is_write && (cs->flags & CONN_TLS_APP));
    __u8 tls_walk = (cs->flags & CONN_TLS) && ret > 0 && !peek;
    if (report || tls_walk) {
        req.buf = syscall_arg(regs, 1); /* buffer, iovec array or msghdr */
        if (syscall == IO_READV || syscall == IO_WRITEV)
            req.len = (__u32)syscall_arg(regs, 2); /* iovcnt */
    }
    if (ret > 0 && !peek) {
        /* one thread (the worker owning the connection) writes these: no atomics needed */
        if (is_write) {
            cs->bytes_tx += ret;
            cs->writes++;
        } else {
            cs->bytes_rx += ret;
            cs->reads++;
        }
    }
    /* Data, EOF and errors are reported within the capture budget only: the close initiator also comes
     * from TCP state changes, so nothing is lost when the budget ran out. Past a TLS handshake only
     * reads are reported (without bytes). */
    if (report) {
        __u32 tid = (__u32)pid_tgid;
        struct thread_state *t = threads.lookup(&tid);
        if (emit_data(cs, t, pid_tgid, &req, ret, is_write, peek))
            return 0; /* HTTP/2, so not TLS: the verifier need not walk the TLS walk after the HTTP/2 one */
    }
    if ((cs->flags & CONN_TLS) && ret > 0 && !peek) /* CONN_TLS may have been set by emit_data just now */
        walk_tls_records(cs, &req, (__u64)ret, is_write ? DIR_WRITE : DIR_READ);
    return 0;
}

#if SAMPLING
/* tail-called by front_sys_exit (sampling.bpf.h) for the transfers to report and nothing else */
int io_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
#else
RAW_TRACEPOINT_PROBE(sys_exit) {
#endif
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long ret = (long)ctx->args[1];
    long nr = -1;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    if (nr == NR_EPOLL_WAIT || nr == NR_EPOLL_PWAIT || nr == NR_EPOLL_PWAIT2)
        return on_epoll_wait_exit(ret, bpf_get_current_pid_tgid());
    __u8 io = io_syscall(nr);
    if (!io)
        return 0;
    return on_io_exit(io, regs, ret); /* one inlined on_io_exit (one set of its stack slots) */
}
