/* syscalls.bpf.h: a connection's life outside its reads and writes, from the syscalls:* tracepoints:
 * accept/accept4 and connect start tracking an fd in `conns` (their enter keeps the arguments in the thread's
 * state for the exit), close ends it with the connection's totals, its epoll_ctl ADDs before its first
 * real I/O and the socket options Envoy set on it (kept in its state: no record each), and listen is
 * reported as it happens. A bound socket's SO_REUSEPORT, epoll registration and close are steps of a
 * listener's setup (startup.bpf.h).
 */

/* Takes the in-flight syscall of this thread (clearing it); returns 0 when there is none. */
static __always_inline int take_inflight(struct thread_state *t, struct inflight *out) {
    if (!t || !t->in.active)
        return 0;
    *out = t->in;
    t->in.active = 0;
    return 1;
}

/* Reads a user sockaddr of `len` bytes (no more: a sockaddr_in at the end of a page must not be read as a
 * sockaddr_in6) into family/port/addr. Returns 0 on success. */
static __always_inline int read_sockaddr(const void *uaddr, __u32 len, __u16 *family, __u16 *port, __u8 *addr) {
    struct sockaddr_in6 sa = {};
    if (len > sizeof(sa))
        len = sizeof(sa);
    if (len < 8) /* family, port and an IPv4 address at least */
        return -1;
    BARRIER_VAR(len); /* clang must not drop the mask below: the verifier needs it to bound the read */
    len &= 31;
    if (len > sizeof(sa))
        len = sizeof(sa);
    if (!uaddr || bpf_probe_read_user(&sa, len, uaddr) != 0) {
        count_drop(DROP_CAPTURE_READ);
        return -1;
    }
    *family = sa.sin6_family;
    *port = ntohs(sa.sin6_port);
    if (sa.sin6_family == AF_INET6 && len < 24)
        return -1;
    if (sa.sin6_family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&sa;
        __builtin_memcpy(addr, &s4->sin_addr, 4);
    } else if (sa.sin6_family == AF_INET6) {
        __builtin_memcpy(addr, &sa.sin6_addr, 16);
    } else {
        return -1;
    }
    return 0;
}

/* Starts tracking a connection fd of a target: later I/O on it is counted and its first bytes captured. */
/* A connection's initial state is built here, not on the stack: it is too big for the accept program's. */
BPF_PERCPU_ARRAY(conn_scratch, struct conn_state, 1);

/* `peer`: the accept's record (its peer address and port, kept for a kept record or the close facts), or 0;
 * `local_port`: its listener's port (with CONN_TCP_FOLDED); `established_ns`: its TCP handshake's
 * completion, when seen. */
static __always_inline void track_conn(__u32 tgid, __s32 fd, __u64 ts_ns, __u32 role, __s32 listen_fd,
                                       __u32 flags, const struct accept_event *peer, __u16 local_port,
                                       __u64 established_ns) {
    __u64 key = conn_key(tgid, fd);
    __u32 zero = 0;
    struct conn_state *cs = conn_scratch.lookup(&zero);
    if (!cs)
        return;
    __builtin_memset(cs, 0, sizeof(*cs));
    cs->open_ts_ns = ts_ns;
    cs->capture_budget = CAPTURE_MSGS_DEFAULT;
    cs->role = role;
    cs->listen_fd = listen_fd;
    cs->flags = flags;
    cs->established_ns = established_ns;
    if (peer) {
        __builtin_memcpy(cs->peer_addr, peer->peer_addr, ADDR_LEN);
        cs->peer_family = peer->family;
        cs->peer_port = peer->peer_port;
        cs->local_port = local_port;
    }
    if (conns.update(&key, cs) != 0)
        count_drop(DROP_CONN_TABLE_FULL);
}

/* ---------------------------------------------------------------- accept / connect / close / listen */

static __always_inline int on_accept_enter(int fd, void *uaddr, int *uaddrlen) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    struct thread_state *t = thread_of((__u32)pid_tgid);
    if (!t)
        return 0;
    struct inflight in = {};
    in.fd = fd;
    in.buf = (__u64)uaddr;
    in.aux = (__u64)uaddrlen;
    int supplied = 0; /* the buffer's size: the kernel writes the address's own length back */
    if (uaddrlen)
        bpf_probe_read_user(&supplied, sizeof(supplied), uaddrlen);
    in.len = supplied > 0 ? (__u32)supplied : 0;
    in.is_accept = 1;
    in.active = 1;
    t->in = in;
    return 0;
}

static __always_inline int on_accept_exit(long ret) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    struct thread_state *t = threads.lookup(&tid);
    struct inflight in;
    if (!take_inflight(t, &in) || !in.is_accept || ret < 0)
        return 0;
    struct accept_event ev = {};
    fill_header_of(&ev.hdr, EV_ACCEPT, pid_tgid, t);
    ev.fd = (__s32)ret;
    ev.listen_fd = in.fd;
    int written = 0; /* the peer address's length; more than the buffer when it was truncated */
    if (in.aux)
        bpf_probe_read_user(&written, sizeof(written), (void *)in.aux);
    __u32 addr_len = written > 0 && (__u32)written < in.len ? (__u32)written : in.len;
    read_sockaddr((void *)in.buf, addr_len, &ev.family, &ev.peer_port, ev.peer_addr);
    __u64 established = 0;
    __u32 flags = 0;
    __u16 local_port = 0;
#if SAMPLING
    established = record_accept_wait(ev.hdr.tgid, in.fd, ev.peer_addr, ev.family, ev.peer_port, ev.hdr.ts_ns,
                                     &ev.local_family, ev.local_addr);
    ev.established_ns = established;
    count_accept(ev.hdr.tgid, tid, in.fd);
    local_port = listener_conn_sampled(ev.hdr.tgid, in.fd);
    if (local_port) {
        __u32 untraced = !peer_traced(ev.peer_addr, ev.family, ev.peer_port);
        count_conn_sampled(SAMPLED_WHOLE_TLS + untraced);
        if (untraced) { /* its peer and handshake time kept for a kept record (conn_keep.bpf.h) */
            track_conn(ev.hdr.tgid, ev.fd, ev.hdr.ts_ns, ROLE_DOWNSTREAM, in.fd, CONN_UNTRACED, &ev, 0,
                       established);
            return 0;
        }
        if (tls_handshake_summarized()) /* traced: its handshake reported as one record (conn_keep.bpf.h) */
            flags = CONN_UNTRACED | CONN_HS_SUMMARY;
        if (open_close_facts(ev.peer_addr, ev.family, ev.peer_port, local_port)) /* its FIN and reset too */
            flags |= CONN_TCP_FOLDED;
    }
#endif
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));

    track_conn(ev.hdr.tgid, ev.fd, ev.hdr.ts_ns, ROLE_DOWNSTREAM, in.fd, flags, flags ? &ev : 0, local_port,
               established);
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4) {
    return on_accept_enter(args->fd, args->upeer_sockaddr, args->upeer_addrlen);
}
TRACEPOINT_PROBE(syscalls, sys_enter_accept) {
    return on_accept_enter(args->fd, args->upeer_sockaddr, args->upeer_addrlen);
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    struct thread_state *t = thread_of((__u32)pid_tgid);
    if (!t)
        return 0;
    struct inflight in = {};
    in.fd = args->fd;
    in.aux = (__u64)args->uservaddr;
    in.len = args->addrlen > 0 ? (__u32)args->addrlen : 0;
    in.is_connect = 1;
    in.active = 1;
    t->in = in;
    return 0;
}

static __always_inline int on_connect_exit(long ret) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    struct thread_state *t = threads.lookup(&tid);
    struct inflight in;
    if (!take_inflight(t, &in) || !in.is_connect)
        return 0;
    struct connect_event ev = {};
    fill_header_of(&ev.hdr, EV_CONNECT, pid_tgid, t);
    ev.fd = in.fd;
    ev.ret = (__s32)ret;
    int ok = read_sockaddr((void *)in.aux, in.len, &ev.family, &ev.peer_port, ev.peer_addr);
    if (ok != 0)
        return 0; /* not an inet socket (unix sockets to the xDS agent, ...) */
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    if (ev.ret == 0 || ev.ret == -115 /* EINPROGRESS */)
        track_conn(ev.hdr.tgid, ev.fd, ev.hdr.ts_ns, ROLE_UPSTREAM, -1, 0, 0, 0, 0);
    emit(&ev, sizeof(ev));
    return 0;
}

/* The exits of accept, accept4 and connect. In SAMPLING builds they come from raw_syscalls:sys_exit instead
 * (front_sys_exit tail-calls accept_sys_exit / connect_sys_exit, sampling.bpf.h), which runs on every syscall exit anyway:
 * with no syscalls:sys_exit_* tracepoint enabled, the kernel's perf handler for them (perf_syscall_exit)
 * does not run on every syscall exit of the machine. */
#if !SAMPLING
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return on_accept_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return on_accept_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_connect) { return on_connect_exit(args->ret); }
#endif

/* A target closed a socket it had bound: forgotten, and reported. */
static __always_inline void close_bound(__u64 pid_tgid, __u64 key, __s32 fd) {
    struct bound_socket *found = bound_fds.lookup(&key);
    if (!found)
        return;
    struct bound_socket s = *found;
    bound_fds.delete(&key);
    emit_setup(pid_tgid, SETUP_CLOSE, fd, -1, 0, &s);
}

TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    __u64 key = conn_key(tgid, (__s32)args->fd); /* only targets' fds are in `conns` */
    struct conn_state *cs = conns.lookup(&key);
    __u8 kept = 0;
    if (!cs) {
        if (maybe_target(tgid)) /* a bound socket (startup.bpf.h): a listener closed */
            close_bound(pid_tgid, key, (__s32)args->fd);
        return 0;
    }
#if SAMPLING
    if (cs->role == ROLE_DOWNSTREAM && !(cs->flags & CONN_ADOPTED)) {
        __u64 now = bpf_ktime_get_ns();
        record_connection(tgid, cs, now);
        /* an untraced one is kept if something went wrong with it (conn_keep.bpf.h): reported now whole when
         * nothing of it was sent, else its close says so */
        if (cs->flags & CONN_HS_SUMMARY) { /* traced, its handshake never ended: its summary now, its close next */
            keep_connection(pid_tgid, key, (__s32)args->fd, cs, KEEP_CONN_SAMPLED, 0, now);
        } else {
            kept = (cs->flags & CONN_UNTRACED) ? connection_keep_reason(cs) : 0;
            if (kept && !keep_within_rate(now, KEEP_LIMITED_CONNECTIONS))
                kept = 0;
            if (kept && !(cs->flags & CONN_LATE_UNTRACED))
                keep_connection(pid_tgid, key, (__s32)args->fd, cs, kept, 0, now); /* its handshake as it was */
            else if (kept)
                count_kept_connection(kept);
        }
        tls_handshake_closed(tgid, cs, now);
    }
#endif
    if ((cs->flags & (CONN_UNTRACED | CONN_LATE_UNTRACED | CONN_HS_SUMMARY)) == CONN_UNTRACED) {
#if SAMPLING /* nothing of it was sent */
        held_handshakes.delete(&key);
#endif
        conns.delete(&key);
        return 0;
    }
#if SAMPLING
    if (cs->flags & CONN_HS_SUMMARY) /* its accept was reported, its handshake's summary just now */
        held_handshakes.delete(&key);
#endif
    struct close_event ev = {};
    fill_header(&ev.hdr, EV_CLOSE, pid_tgid);
    ev.fd = (__s32)args->fd;
    ev.role = cs->role;
    ev.open_ts_ns = cs->open_ts_ns;
    COPY_CONN_TOTALS(&ev, cs);
    ev.sampled_out = (cs->flags & CONN_LATE_UNTRACED) ? 1 : 0;
    ev.kept = kept;
#if SAMPLING
    if (cs->flags & CONN_TCP_FOLDED) /* the peer's FIN and first reset, when their softirq found the entry */
        take_close_facts(cs, &ev.peer_fin_ns, &ev.reset_rx_ns);
    if ((cs->flags & CONN_AWAIT) && cs->req_method) { /* a request closed before its answer */
        record_request(tgid, cs, 0, ev.hdr.ts_ns);
        if (cs->flags & CONN_SKIP)
            keep_request(pid_tgid, ev.fd, cs, 0, ev.hdr.ts_ns, KEEP_CLOSED);
    }
#endif
    conns.delete(&key);
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_listen) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    /* A socket the target did not bind (an Envoy hot restart hands the parent epoch's listening sockets
     * to the new process over a unix socket; it calls listen() on each) is followed from here on like a
     * bound one, its address unknown (family 0): its epoll registrations and its close are reported. */
    __u64 key = conn_key(pid_tgid >> 32, (__s32)args->fd);
    struct bound_socket unknown = {};
    bound_fds.insert(&key, &unknown);
    struct listen_event ev = {};
    fill_header(&ev.hdr, EV_LISTEN, pid_tgid);
    ev.fd = args->fd;
    ev.backlog = args->backlog;
    emit(&ev, sizeof(ev));
    return 0;
}

/* ---------------------------------------------------------------- epoll_ctl / setsockopt */

/* A target registered `fd` with epoll (EPOLL_CTL_ADD). Only registrations, and only until the first real
 * I/O: the listener filters register the fd once to wait for its first bytes; a second ADD (after a DEL)
 * is the hand-off to the filter chain. Kept in the connection's state for its close record. */
static __always_inline int on_epoll_ctl_add(__u64 pid_tgid, __s32 epfd, __s32 fd) {
    __u32 tgid = pid_tgid >> 32;
    __u64 key = conn_key(tgid, fd); /* only targets' fds are in `conns` */
    struct conn_state *cs = conns.lookup(&key);
    if (!cs && maybe_target(tgid)) { /* a bound socket's registration: the thread that will accept on it */
        struct bound_socket *s = bound_fds.lookup(&key);
        if (s)
            emit_setup(pid_tgid, SETUP_WATCH, fd, epfd, 0, s);
        return 0;
    }
    if (!cs || (cs->flags & CONN_SAW_IO) || untraced_only(cs))
        return 0;
    __u32 n = cs->epoll_adds;
    if (n < 2) {
        __u64 now = bpf_ktime_get_ns();
        if (n == 0)
            cs->epoll_first_add_ns = now;
        else
            cs->epoll_second_add_ns = now;
    }
    cs->epoll_adds = n + 1;
    return 0;
}

#if SAMPLING
/* tail-called by front_sys_exit (sampling.bpf.h) for a target's successful EPOLL_CTL_ADD: its arguments
 * are still in the saved registers (di epfd, si op, dx fd). No syscalls:sys_enter_epoll_ctl program: Envoy
 * calls epoll_ctl (MOD) around most requests, and each call of a syscalls:* tracepoint's program goes
 * through the kernel's perf record path before the program can tell it is not an ADD. */
int epoll_ctl_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    __u64 args[3] = {}; /* dx (fd), si (op), di (epfd): contiguous in x86-64's struct pt_regs */
    if (bpf_probe_read_kernel(args, sizeof(args), &regs->dx) != 0)
        return 0;
    return on_epoll_ctl_add(bpf_get_current_pid_tgid(), (__s32)args[2], (__s32)args[0]);
}
#else
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_ctl) {
    if (args->op != 1 /* EPOLL_CTL_ADD */) /* other operations (most) cost no lookup */
        return 0;
    return on_epoll_ctl_add(bpf_get_current_pid_tgid(), (__s32)args->epfd, (__s32)args->fd);
}
#endif

TRACEPOINT_PROBE(syscalls, sys_enter_setsockopt) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    __u64 key = conn_key(tgid, (__s32)args->fd); /* only targets' fds are in `conns` */
    struct conn_state *cs = conns.lookup(&key);
    if (!cs && args->level == 1 /* SOL_SOCKET */ && args->optname == 15 /* SO_REUSEPORT */ &&
        is_target(tgid)) { /* a listening socket being set up (startup.bpf.h) */
        __s32 value = 0;
        if (args->optlen >= 4 && args->optval)
            bpf_probe_read_user(&value, sizeof(value), args->optval);
        emit_setup(pid_tgid, SETUP_REUSEPORT, (__s32)args->fd, -1, value, bound_fds.lookup(&key));
        return 0;
    }
    if (!cs || untraced_only(cs))
        return 0;
    /* kept in the connection's state for its close record: level, optname, the value's first 4 bytes */
    __u32 n = cs->sockopt_count;
    cs->sockopt_count = n + 1;
    if (n >= SOCKOPTS_KEPT)
        return 0;
    __s32 opt[3] = {(__s32)args->level, (__s32)args->optname, 0};
    if (args->optlen >= 4 && args->optval)
        bpf_probe_read_user(&opt[2], sizeof(opt[2]), args->optval);
    __builtin_memcpy(cs->sockopts + (n & (SOCKOPTS_KEPT - 1)) * sizeof(opt), opt, sizeof(opt));
    return 0;
}
