/* conn.bpf.c: connection lifecycle of Envoy processes, from syscall and TCP tracepoints only.
 *
 * Hooks (all tracepoints; this kernel has no kprobes/fentry):
 *   syscalls: accept/accept4, connect, close, listen, read/readv/recvfrom/recvmsg,
 *             write/writev/sendto/sendmsg, epoll_ctl, setsockopt, epoll_wait/epoll_pwait/epoll_pwait2 (exit)
 *   sock:inet_sock_set_state, tcp:tcp_retransmit_skb, tcp:tcp_send_reset, tcp:tcp_receive_reset,
 *   tcp:tcp_retransmit_synack
 * Filtering happens here, not in user space: syscalls only for tgids in `targets` (the daemon itself is
 * never a target, so its own OTLP traffic is invisible), fd-level events only for fds in `conns`
 * (connections the target accepted or connected), TCP events only for ports in `listen_ports` (they fire
 * in softirq context of *other* processes) or sockets a target connected (`upstream_socks`).
 * Cost: syscall tracepoints run for every process on the machine; non-targets pay one hash lookup.
 * Per connection, only the first CAPTURE_MSGS_DEFAULT reads/writes carry bytes (up to CAPTURE_MAX each);
 * after that I/O is only counted in `conns` and reported once at close.
 * Never dereference kernel structs here: headers are 6.1, the kernel is newer. Tracepoint fields only.
 */
#include <uapi/linux/ptrace.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/uio.h>
#include "events.h"

/* tcp:tcp_send_reset's format names `enum sk_rst_reason` (kernel 6.10+), which the 6.1 headers bcc
 * compiles against lack; bcc copies the field type verbatim. An int-sized stand-in keeps the layout. */
enum sk_rst_reason { SK_RST_REASON_STANDIN = 0 };

#ifndef MAX_CONNS
#define MAX_CONNS 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 4096 /* 16 MiB */
#endif
#define MAX_IOV 8
/* Stops clang from re-deriving a clamped length from its unclamped source, which the verifier rejects. */
#define BARRIER_VAR(v) asm volatile("" : "+r"(v))

struct conn_state {
    __u64 open_ts_ns;
    __u64 bytes_rx;
    __u64 bytes_tx;
    __u32 reads;
    __u32 writes;
    __u32 data_events;    /* EV_DATA records sent so far */
    __u32 capture_budget; /* EV_DATA records allowed */
    __u32 epoll_events;   /* EV_EPOLL_CTL records sent so far */
    __u32 role;
    __u32 flags;          /* CONN_* below */
    __u32 _pad;
};

#define CONN_SAW_IO 1 /* a non-peek read or write happened: the listener-filter hand-off is settled */
#define CONN_TLS 2    /* the first bytes read were a TLS handshake record */

/* What a syscall's enter saw, for its exit. Keyed by thread id. */
struct inflight {
    __u64 buf;   /* user buffer, iovec array or msghdr */
    __u64 aux;   /* accept: sockaddr length pointer; connect: sockaddr */
    __s32 fd;
    __u32 len;   /* iovcnt for readv/writev */
    __u32 flags; /* recv/send flags */
    __u8 syscall;
    __u8 is_accept;
    __u8 is_connect;
    __u8 _pad;
};

struct thread_state {
    __u32 round;
    __u32 ready;
    __u64 round_start_ns;
};

BPF_HASH(targets, __u32, __u8, 1024);
BPF_HASH(listen_ports, __u16, __u8, 1024);
BPF_TABLE("lru_hash", __u64, struct conn_state, conns, MAX_CONNS);
BPF_TABLE("lru_hash", __u64, __u8, upstream_socks, MAX_CONNS);
BPF_HASH(inflight, __u32, struct inflight, 16384);
BPF_TABLE("lru_hash", __u32, struct thread_state, threads, 16384);
BPF_PERCPU_ARRAY(drops, __u64, DROP_REASONS);
/* An EV_DATA record is built here (too big for the stack). The spill area lets the verifier accept
 * copies at masked offsets: off < CAPTURE_MAX and n <= CAPTURE_MAX always fit. */
struct data_scratch_t {
    struct data_event ev;
    __u8 spill[CAPTURE_MAX];
};
BPF_PERCPU_ARRAY(data_scratch, struct data_scratch_t, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

static __always_inline void count_drop(int reason) {
    __u64 *v = drops.lookup(&reason);
    if (v)
        (*v)++;
}

static __always_inline int is_target(__u32 tgid) { return targets.lookup(&tgid) != 0; }

static __always_inline __u64 conn_key(__u32 tgid, __s32 fd) { return ((__u64)tgid << 32) | (__u32)fd; }

static __always_inline void fill_header(struct event_header *h, __u32 kind, __u64 pid_tgid) {
    __u32 tid = (__u32)pid_tgid;
    h->ts_ns = bpf_ktime_get_ns();
    h->kind = kind;
    h->tgid = pid_tgid >> 32;
    h->tid = tid;
    struct thread_state *t = threads.lookup(&tid);
    h->round = t ? t->round : 0;
}

static __always_inline void emit(void *ev, __u32 size) {
    if (events.ringbuf_output(ev, size, 0) != 0)
        count_drop(DROP_RINGBUF_FULL);
}

/* Reads a user sockaddr into family/port/addr. Returns 0 on success. */
static __always_inline int read_sockaddr(const void *uaddr, __u16 *family, __u16 *port, __u8 *addr) {
    struct sockaddr_in6 sa = {};
    if (!uaddr || bpf_probe_read_user(&sa, sizeof(sa), uaddr) != 0) {
        count_drop(DROP_CAPTURE_READ);
        return -1;
    }
    *family = sa.sin6_family;
    *port = ntohs(sa.sin6_port);
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
static __always_inline void track_conn(__u32 tgid, __s32 fd, __u64 ts_ns, __u32 role) {
    __u64 key = conn_key(tgid, fd);
    struct conn_state cs = {};
    cs.open_ts_ns = ts_ns;
    cs.capture_budget = CAPTURE_MSGS_DEFAULT;
    cs.role = role;
    if (conns.update(&key, &cs) != 0)
        count_drop(DROP_CONN_TABLE_FULL);
}

/* ---------------------------------------------------------------- wake rounds */

static __always_inline int on_epoll_wait_exit(long ret) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    __u32 tid = (__u32)pid_tgid;
    struct thread_state zero = {};
    struct thread_state *t = threads.lookup_or_try_init(&tid, &zero);
    if (!t)
        return 0;
    t->round++;
    t->ready = ret > 0 ? (__u32)ret : 0;
    t->round_start_ns = bpf_ktime_get_ns();
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_epoll_wait) { return on_epoll_wait_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_epoll_pwait) { return on_epoll_wait_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_epoll_pwait2) { return on_epoll_wait_exit(args->ret); }

/* ---------------------------------------------------------------- accept / connect / close / listen */

static __always_inline int on_accept_enter(int fd, void *uaddr, int *uaddrlen) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    __u32 tid = (__u32)pid_tgid;
    struct inflight in = {};
    in.fd = fd;
    in.buf = (__u64)uaddr;
    in.aux = (__u64)uaddrlen;
    in.is_accept = 1;
    if (inflight.update(&tid, &in) != 0)
        count_drop(DROP_INFLIGHT_FULL);
    return 0;
}

static __always_inline int on_accept_exit(long ret) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    struct inflight *in = inflight.lookup(&tid);
    if (!in)
        return 0;
    if (!in->is_accept || ret < 0) {
        inflight.delete(&tid);
        return 0;
    }
    struct accept_event ev = {};
    fill_header(&ev.hdr, EV_ACCEPT, pid_tgid);
    ev.fd = (__s32)ret;
    ev.listen_fd = in->fd;
    read_sockaddr((void *)in->buf, &ev.family, &ev.peer_port, ev.peer_addr);
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    inflight.delete(&tid);

    track_conn(ev.hdr.tgid, ev.fd, ev.hdr.ts_ns, ROLE_DOWNSTREAM);
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_accept4) {
    return on_accept_enter(args->fd, args->upeer_sockaddr, args->upeer_addrlen);
}
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return on_accept_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_accept) {
    return on_accept_enter(args->fd, args->upeer_sockaddr, args->upeer_addrlen);
}
TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return on_accept_exit(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_connect) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    __u32 tid = (__u32)pid_tgid;
    struct inflight in = {};
    in.fd = args->fd;
    in.aux = (__u64)args->uservaddr;
    in.is_connect = 1;
    if (inflight.update(&tid, &in) != 0)
        count_drop(DROP_INFLIGHT_FULL);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    struct inflight *in = inflight.lookup(&tid);
    if (!in)
        return 0;
    if (!in->is_connect) {
        inflight.delete(&tid);
        return 0;
    }
    struct connect_event ev = {};
    fill_header(&ev.hdr, EV_CONNECT, pid_tgid);
    ev.fd = in->fd;
    ev.ret = (__s32)args->ret;
    int ok = read_sockaddr((void *)in->aux, &ev.family, &ev.peer_port, ev.peer_addr);
    inflight.delete(&tid);
    if (ok != 0)
        return 0; /* not an inet socket (unix sockets to the xDS agent, ...) */
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    if (ev.ret == 0 || ev.ret == -115 /* EINPROGRESS */)
        track_conn(ev.hdr.tgid, ev.fd, ev.hdr.ts_ns, ROLE_UPSTREAM);
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    __u64 key = conn_key(tgid, (__s32)args->fd);
    struct conn_state *cs = conns.lookup(&key);
    if (!cs)
        return 0;
    struct close_event ev = {};
    fill_header(&ev.hdr, EV_CLOSE, pid_tgid);
    ev.fd = (__s32)args->fd;
    ev.role = cs->role;
    ev.open_ts_ns = cs->open_ts_ns;
    ev.bytes_rx = cs->bytes_rx;
    ev.bytes_tx = cs->bytes_tx;
    ev.reads = cs->reads;
    ev.writes = cs->writes;
    conns.delete(&key);
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_listen) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!is_target(pid_tgid >> 32))
        return 0;
    struct listen_event ev = {};
    fill_header(&ev.hdr, EV_LISTEN, pid_tgid);
    ev.fd = args->fd;
    ev.backlog = args->backlog;
    emit(&ev, sizeof(ev));
    return 0;
}

/* ---------------------------------------------------------------- reads and writes */

static __always_inline int on_io_enter(__u8 syscall, int fd, const void *buf, __u32 len, __u32 flags) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    /* `conns` holds only the targets' connections: one lookup filters both process and fd. */
    __u64 key = conn_key(tgid, fd);
    if (!conns.lookup(&key))
        return 0;
    __u32 tid = (__u32)pid_tgid;
    struct inflight in = {};
    in.fd = fd;
    in.buf = (__u64)buf;
    in.len = len;
    in.flags = flags;
    in.syscall = syscall;
    if (inflight.update(&tid, &in) != 0)
        count_drop(DROP_INFLIGHT_FULL);
    return 0;
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

static __always_inline int on_io_exit(long ret) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    struct inflight *in = inflight.lookup(&tid);
    if (!in)
        return 0;
    if (in->is_accept || in->is_connect) {
        inflight.delete(&tid);
        return 0;
    }
    struct inflight req = *in;
    inflight.delete(&tid);
    if (ret == -11 /* EAGAIN */)
        return 0;

    __u32 tgid = pid_tgid >> 32;
    __u64 key = conn_key(tgid, req.fd);
    struct conn_state *cs = conns.lookup(&key);
    if (!cs)
        return 0;
    __u8 is_write = req.syscall >= IO_WRITE;
    __u8 peek = (!is_write && (req.flags & MSG_PEEK_FLAG)) ? 1 : 0;
    if (ret > 0 && !peek) {
        if (is_write) {
            __sync_fetch_and_add(&cs->bytes_tx, ret);
            __sync_fetch_and_add(&cs->writes, 1);
        } else {
            __sync_fetch_and_add(&cs->bytes_rx, ret);
            __sync_fetch_and_add(&cs->reads, 1);
        }
    }
    /* Data, EOF and errors are reported within the capture budget only: the close initiator also comes
     * from TCP state changes, so nothing is lost when the budget ran out. */
    if (cs->data_events >= cs->capture_budget)
        return 0;
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
    fill_header(&e->hdr, EV_DATA, pid_tgid);
    e->fd = req.fd;
    e->direction = is_write ? DIR_WRITE : DIR_READ;
    e->syscall = req.syscall;
    e->flags = peek ? DATA_FLAG_PEEK : 0;
    e->role = cs->role;
    e->ret = ret;
    e->msg_seq = seq;
    e->captured = 0;
    if (ret > 0) {
        __u32 want = (__u32)ret;
        if (req.syscall == IO_READV || req.syscall == IO_WRITEV) {
            e->captured = capture_iov(e, (const struct iovec *)req.buf, req.len, want);
        } else if (req.syscall == IO_RECVMSG || req.syscall == IO_SENDMSG) {
            struct user_msghdr mh = {};
            if (bpf_probe_read_user(&mh, sizeof(mh), (void *)req.buf) == 0)
                e->captured = capture_iov(e, mh.msg_iov, (__u32)mh.msg_iovlen, want);
        } else {
            e->captured = capture_flat(e, (const void *)req.buf, want);
        }
    }
    if (e->captured >= 3 && !is_write && !peek) {
        if (first_io && e->data[0] == 0x16)
            cs->flags |= CONN_TLS;
        /* A TLS application-data record header from the client (17 03 0x) on a TLS connection: the
         * handshake is over (TLS 1.3: the encrypted Finished; 1.2: the first request). Stop capturing:
         * the rest of the connection is ciphertext. The 3-byte check makes a false stop on a ciphertext
         * read ~1 in 16M. */
        if ((cs->flags & CONN_TLS) && e->data[0] == 0x17 && e->data[1] == 0x03 && e->data[2] <= 0x04)
            cs->capture_budget = 0;
    }
    __u32 size = offsetof(struct data_event, data) + (e->captured & (2 * CAPTURE_MAX - 1));
    if (size > sizeof(struct data_event))
        size = sizeof(struct data_event);
    emit(e, size);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return on_io_enter(IO_READ, args->fd, args->buf, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return on_io_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return on_io_enter(IO_READV, args->fd, args->vec, args->vlen, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return on_io_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) {
    return on_io_enter(IO_RECVFROM, args->fd, args->ubuf, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return on_io_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) {
    return on_io_enter(IO_RECVMSG, args->fd, args->msg, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return on_io_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return on_io_enter(IO_WRITE, args->fd, args->buf, 0, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return on_io_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) {
    return on_io_enter(IO_WRITEV, args->fd, args->vec, args->vlen, 0);
}
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return on_io_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) {
    return on_io_enter(IO_SENDTO, args->fd, args->buff, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return on_io_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) {
    return on_io_enter(IO_SENDMSG, args->fd, args->msg, 0, args->flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return on_io_exit(args->ret); }

/* ---------------------------------------------------------------- epoll_ctl / setsockopt */

TRACEPOINT_PROBE(syscalls, sys_enter_epoll_ctl) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    __u64 key = conn_key(tgid, (__s32)args->fd);
    struct conn_state *cs = conns.lookup(&key);
    /* Only until the first real I/O: that is where the listener filters hand the fd over. */
    if (!cs || cs->epoll_events >= EPOLL_CTL_EVENTS_MAX || (cs->flags & CONN_SAW_IO))
        return 0;
    cs->epoll_events++;
    struct epoll_ctl_event ev = {};
    fill_header(&ev.hdr, EV_EPOLL_CTL, pid_tgid);
    ev.epfd = args->epfd;
    ev.op = args->op;
    ev.fd = args->fd;
    __u32 mask = 0;
    if (args->event && bpf_probe_read_user(&mask, sizeof(mask), args->event) == 0)
        ev.events = mask;
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_setsockopt) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    if (!is_target(tgid))
        return 0;
    __u64 key = conn_key(tgid, (__s32)args->fd);
    if (!conns.lookup(&key))
        return 0;
    struct setsockopt_event ev = {};
    fill_header(&ev.hdr, EV_SETSOCKOPT, pid_tgid);
    ev.fd = args->fd;
    ev.level = args->level;
    ev.optname = args->optname;
    if (args->optlen >= 4 && args->optval)
        bpf_probe_read_user(&ev.optval, sizeof(ev.optval), args->optval);
    emit(&ev, sizeof(ev));
    return 0;
}

/* ---------------------------------------------------------------- TCP tracepoints (softirq context) */

static __always_inline int port_watched(__u16 port) { return listen_ports.lookup(&port) != 0; }

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP)
        return 0;
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u64 sk = (__u64)args->skaddr;
    int newstate = args->newstate;
    int oldstate = args->oldstate;
    int watched = port_watched(args->sport);
    if (!watched) {
        if (newstate == TCP_SYN_SENT && is_target(pid_tgid >> 32)) {
            __u8 one = 1;
            upstream_socks.update(&sk, &one); /* later transitions of this socket fire in softirq */
            watched = 1;
        } else if (upstream_socks.lookup(&sk)) {
            watched = 1;
            if (newstate == TCP_CLOSE)
                upstream_socks.delete(&sk);
        }
    }
    if (!watched)
        return 0;
    /* Only the transitions spans need: handshake done, who closed first, aborts. */
    if (!(newstate == TCP_ESTABLISHED || newstate == TCP_SYN_SENT || newstate == TCP_FIN_WAIT1 ||
          newstate == TCP_CLOSE_WAIT ||
          (newstate == TCP_CLOSE && (oldstate == TCP_ESTABLISHED || oldstate == TCP_SYN_RECV ||
                                     oldstate == TCP_SYN_SENT || oldstate == TCP_CLOSE_WAIT))))
        return 0;
    struct sock_state_event ev = {};
    fill_header(&ev.hdr, EV_SOCK_STATE, pid_tgid);
    ev.skaddr = sk;
    ev.oldstate = oldstate;
    ev.newstate = newstate;
    ev.sport = args->sport;
    ev.dport = args->dport;
    ev.family = args->family;
    if (args->family == AF_INET) {
        __builtin_memcpy(ev.saddr, args->saddr, 4);
        __builtin_memcpy(ev.daddr, args->daddr, 4);
    } else {
        __builtin_memcpy(ev.saddr, args->saddr_v6, 16);
        __builtin_memcpy(ev.daddr, args->daddr_v6, 16);
    }
    emit(&ev, sizeof(ev));
    return 0;
}

static __always_inline int watched_sock(__u16 sport, __u64 sk) {
    return port_watched(sport) || upstream_socks.lookup(&sk) != 0;
}

#define FILL_TCP_EVENT(ev, typ, a)                                                                    \
    do {                                                                                              \
        fill_header(&(ev).hdr, EV_TCP, bpf_get_current_pid_tgid());                                    \
        (ev).skaddr = (__u64)(a)->skaddr;                                                             \
        (ev).type = (typ);                                                                            \
        (ev).sport = (a)->sport;                                                                      \
        (ev).dport = (a)->dport;                                                                      \
        (ev).family = (a)->family;                                                                    \
        if ((a)->family == AF_INET) {                                                                 \
            __builtin_memcpy((ev).saddr, (a)->saddr, 4);                                              \
            __builtin_memcpy((ev).daddr, (a)->daddr, 4);                                              \
        } else {                                                                                      \
            __builtin_memcpy((ev).saddr, (a)->saddr_v6, 16);                                          \
            __builtin_memcpy((ev).daddr, (a)->daddr_v6, 16);                                          \
        }                                                                                             \
    } while (0)

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    if (!watched_sock(args->sport, (__u64)args->skaddr))
        return 0;
    struct tcp_event ev = {};
    FILL_TCP_EVENT(ev, TCP_RETRANSMIT, args);
    ev.state = args->state;
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    if (!watched_sock(args->sport, (__u64)args->skaddr))
        return 0;
    struct tcp_event ev = {};
    FILL_TCP_EVENT(ev, TCP_RESET_RECEIVED, args);
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_synack) {
    if (!port_watched(args->sport))
        return 0;
    struct tcp_event ev = {};
    FILL_TCP_EVENT(ev, TCP_SYNACK_RETRANSMIT, args);
    ev.state = TCP_SYN_RECV;
    emit(&ev, sizeof(ev));
    return 0;
}

/* tcp_send_reset carries sockaddr-shaped addresses (family, port in network order, address). */
TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    struct sockaddr_in6 src = {}, dst = {};
    __builtin_memcpy(&src, args->saddr, sizeof(src));
    __builtin_memcpy(&dst, args->daddr, sizeof(dst));
    __u16 sport = ntohs(src.sin6_port);
    if (!watched_sock(sport, (__u64)args->skaddr))
        return 0;
    struct tcp_event ev = {};
    fill_header(&ev.hdr, EV_TCP, bpf_get_current_pid_tgid());
    ev.skaddr = (__u64)args->skaddr;
    ev.type = TCP_RESET_SENT;
    ev.state = args->state;
    ev.sport = sport;
    ev.dport = ntohs(dst.sin6_port);
    ev.family = src.sin6_family;
    if (src.sin6_family == AF_INET) {
        __builtin_memcpy(ev.saddr, &((struct sockaddr_in *)&src)->sin_addr, 4);
        __builtin_memcpy(ev.daddr, &((struct sockaddr_in *)&dst)->sin_addr, 4);
    } else {
        __builtin_memcpy(ev.saddr, &src.sin6_addr, 16);
        __builtin_memcpy(ev.daddr, &dst.sin6_addr, 16);
    }
    emit(&ev, sizeof(ev));
    return 0;
}
