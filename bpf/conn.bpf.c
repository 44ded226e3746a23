/* conn.bpf.c: connection lifecycle of Envoy processes, from syscall and TCP tracepoints only.
 *
 * Hooks (all tracepoints; this kernel has no kprobes/fentry):
 *   raw_syscalls:sys_enter / sys_exit (raw tracepoints): the hot path, i.e. read/readv/recvfrom/recvmsg,
 *             write/writev/sendto/sendmsg and the exits of epoll_wait/epoll_pwait/epoll_pwait2. A raw
 *             tracepoint hands the program the registers instead of building a perf record per call, which
 *             makes each traced syscall markedly cheaper than a syscalls:sys_enter_* program;
 *   syscalls: accept/accept4, connect, close, listen, epoll_ctl, setsockopt (once or a few times per
 *             connection, so the per-syscall tracepoints' convenience costs nothing that matters);
 *   sock:inet_sock_set_state, tcp:tcp_retransmit_skb, tcp:tcp_send_reset, tcp:tcp_receive_reset,
 *   tcp:tcp_retransmit_synack
 * Filtering happens here, not in user space: syscalls only for tgids in `targets` (the daemon itself is
 * never a target, so its own OTLP traffic is invisible), fd-level events only for fds in `conns`
 * (connections the target accepted or connected), TCP events only for ports in `listen_ports` (they fire
 * in softirq context of *other* processes) or sockets a target connected (`upstream_socks`).
 * Cost: the raw syscall programs run for every syscall of every process on the machine: other syscalls pay
 * a switch on the syscall number, other processes' reads and writes one register read and one hash lookup.
 * Per connection, only the first CAPTURE_MSGS_DEFAULT reads/writes carry bytes (up to CAPTURE_MAX each);
 * after that I/O is only counted in `conns` and reported once at close. Plaintext connections (HTTP) carry
 * bytes on every read and write when HTTP_CAPTURE is set; TLS ones stop at the first application data.
 * HTTP/2 connections (prior knowledge) carry their frame headers and non-DATA payloads instead (capture_h2).
 * Never dereference kernel structs here: headers are 6.1, the kernel is newer. Tracepoint fields only.
 */
#include <uapi/linux/ptrace.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/uio.h>
#include <linux/signal.h> /* sigset_t, in the epoll_pwait tracepoints' arguments */
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
#ifndef HTTP_CAPTURE
#define HTTP_CAPTURE 1 /* 0: plaintext connections get the same capture budget as TLS ones */
#endif
#define CAPTURE_UNLIMITED 0xffffffff

/* x86-64 syscall numbers and argument registers (di, si, dx, r10, r8, r9): the raw syscall tracepoints see
 * only the number and the registers. The loader refuses other architectures. */
#define NR_READ 0
#define NR_WRITE 1
#define NR_READV 19
#define NR_WRITEV 20
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47
#define NR_EPOLL_WAIT 232
#define NR_EPOLL_PWAIT 281
#define NR_EPOLL_PWAIT2 441
#define NR_FUTEX 202
#define NR_FUTEX_WAITV 449

#ifndef OFFCPU
#define OFFCPU 1 /* 0: no scheduler probes (no off-CPU waits, no round events) */
#endif
#ifndef OFFCPU_MIN_NS
#define OFFCPU_MIN_NS 1000000ULL /* waits at least this long become EV_OFFCPU records */
#endif
#ifndef ROUND_MIN_NS
#define ROUND_MIN_NS 10000000ULL /* rounds at least this long (or holding such a wait) become EV_ROUND */
#endif
#define TASK_REPORT_MAX 0x100 /* sched_switch prev_state bit for a preempted task ("R+") */
#define STACK_ENTRIES 16384
/* Stops clang from re-deriving a clamped length from its unclamped source, which the verifier rejects. */
#define BARRIER_VAR(v) asm volatile("" : "+r"(v))

/* One direction of a TLS connection's record framing: where the next 5-byte record header starts. */
struct tls_framing {
    __u32 skip;        /* bytes of the current record's body still to come */
    __u32 records;     /* complete record headers seen */
    __u32 app_records; /* of which application_data */
    __u32 max_len;     /* largest record body */
    __u8 hdr_got;      /* bytes of the next header already seen (it straddled two syscalls) */
    __u8 hdr[8];       /* those bytes: type, version (2), length (2); 8 for masked indexing */
};

/* One direction of an HTTP/2 connection's framing (CONN_H2): where the walk of its frames stands. Both
 * directions are walked from their first byte as a sequence of pieces to copy (the client preface, each
 * 9-byte frame header, the payload of every frame but DATA, a padded DATA frame's pad length) and to
 * skip (DATA payloads). A piece may straddle syscalls. */
struct h2_framing {
    __u32 copy;   /* bytes of the current piece still to copy; 0: none (skip, then a frame header) */
    __u32 skip;   /* bytes to skip after it: the rest of a DATA payload */
    __u8 state;   /* H2_WALK, H2_LOST; 0 on connections that are not HTTP/2 */
    __u8 in_hdr;  /* the piece being copied is a frame header */
    __u8 _pad[2];
    __u8 hdr[32]; /* that header (length, type, flags, stream); 32 for masked offsets and sizes */
};

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
    __u32 tls_flags;      /* TLS_FRAMING_* (events.h) */
    __u8 held_data[8];    /* CONN_HELD: the first bytes of the held TLS record header read */
    __u32 held_captured;  /* how many of them were captured */
    __u32 _pad_held;
    struct tls_framing tls[2]; /* indexed by enum io_direction */
    struct h2_framing h2[2];   /* indexed by enum io_direction (CONN_H2 only) */
};

#define CONN_SAW_IO 1   /* a non-peek read or write happened: the listener-filter hand-off is settled */
#define CONN_TLS 2      /* the first bytes read were a TLS handshake record */
#define CONN_TLS_APP 4  /* TLS handshake over: reads carry no bytes (ciphertext), only their round */
#define CONN_H2 8       /* HTTP/2 prior knowledge (the client preface came first): records are condensed */
#define CONN_HELD 16    /* a read of a lone TLS record header waits to ride on the next read's record */
/* Record headers walked per syscall; a read or write holding more records loses the framing. */
#define TLS_WALK_MAX 48
#define TLS_RECORD_HEADER 5
#define TLS_MAX_RECORD (16384 + 2048) /* TLSCiphertext.length bound (RFC 5246 6.2.3) */
/* HTTP/2 condensed capture (capture_h2): walk steps per syscall (a step copies one run of bytes up to the
 * end of a buffer, a frame header or a payload, skips one DATA payload, or moves to the next iovec: two or
 * three per frame, so ~200 frames) and iovecs followed. A syscall needing more, or more than CAPTURE_MAX
 * condensed bytes, loses the framing. The verifier walks every step of the loop: ~300 instructions each,
 * so 512 steps cost ~150k of its 1M-instruction budget for sys_exit (which is ~560k in all). */
#ifndef H2_WALK_MAX
#define H2_WALK_MAX 512
#endif
#define H2_MAX_IOV 1024 /* UIO_MAXIOV: iovecs followed per syscall */
#define H2_PREFACE_LEN 24
#define H2_FRAME_HEADER 9
#define H2_WALK 1
#define H2_LOST 2

/* The buffers of one read/write as (base, length) segments, for reading the stream at an offset. */
struct io_segments {
    __u64 base[MAX_IOV];
    __u64 len[MAX_IOV];
    __u32 n;
    __u32 _pad;
};

/* What a syscall's enter saw, for its exit (one per thread: a thread is in one syscall at a time). */
struct inflight {
    __u64 buf;   /* user buffer, iovec array or msghdr */
    __u64 aux;   /* accept: sockaddr length pointer; connect: sockaddr */
    __s32 fd;
    __u32 len;   /* iovcnt for readv/writev */
    __u32 flags; /* recv/send flags */
    __u8 syscall;
    __u8 is_accept;
    __u8 is_connect;
    __u8 active; /* set by an enter, cleared by the matching exit */
};

/* Round durations per thread: log2 histogram of microseconds, slot = log2(us) (0..ROUND_HIST_SLOTS-1). */
#define ROUND_HIST_SLOTS 32

/* Per target thread: its event-loop round (epoll_wait returns), its off-CPU accounting, and the accept or
 * connect it is in. Reads and writes keep nothing here: their exit reads the arguments back from the saved
 * user registers, so a read/write costs one lookup (the connection) and an EAGAIN none. */
struct thread_state {
    __u32 round;
    __u32 ready;
    __u64 round_start_ns;
    struct inflight in;     /* accept / connect only */
    /* off-CPU accounting (sched_switch / sched_waking) */
    __u64 off_start_ns;     /* switched out at; 0 while on CPU */
    __u64 runnable_ns;      /* became runnable at (woken or preempted); 0 while blocked */
    __s64 prev_state;
    __s32 sys_nr;           /* the syscall it blocked in (from its saved registers), -1 outside one */
    __u32 off_reason;       /* enum offcpu_reason of the current wait */
    __s32 kstack_id;
    __s32 ustack_id;
    __s32 waker_kstack_id;
    __u32 other_pid;
    __u32 other_tgid;
    __u32 cpu;
    char other_comm[COMM_LEN];
    /* the current round's totals */
    __u64 round_offcpu_ns;
    __u64 round_runnable_ns;
    __u32 round_waits;
    __u8 in_round;          /* between an epoll_wait return and the next call */
    __u8 round_flagged;     /* an EV_OFFCPU was sent for a wait inside it */
    __u8 waker_taken;       /* sched_waking recorded the current wait's waker (other_*, waker_kstack_id) */
    __u8 _pad;
    /* what ended the idle wait before the current round (inside the epoll_wait that started it) */
    __u64 idle_ns;          /* time asleep in that epoll_wait (all its idle waits) */
    __s32 wake_kstack_id;   /* the waker's kernel stack: only for a wait >= OFFCPU_MIN_NS, else -1 */
    __u32 wake_pid;
    __u32 wake_tgid;
    char wake_comm[COMM_LEN];
    __u32 round_hist[ROUND_HIST_SLOTS]; /* rounds per log2(duration in us): read by the metrics */
};

BPF_HASH(targets, __u32, __u8, 1024);
BPF_HASH(listen_ports, __u16, __u8, 1024);
BPF_TABLE("lru_hash", __u64, struct conn_state, conns, MAX_CONNS);
BPF_TABLE("lru_hash", __u64, __u8, upstream_socks, MAX_CONNS);
BPF_TABLE("lru_hash", __u32, struct thread_state, threads, 16384);
BPF_PERCPU_ARRAY(drops, __u64, DROP_REASONS);
BPF_ARRAY(thread_zero, struct thread_state, 1); /* never written: thread_of's initial value */
/* Per target thread and reason: off-CPU totals, aggregated here (one record per context switch would
 * flood user space). Read by the metrics exporter. */
struct offcpu_key {
    __u32 tid;
    __u32 reason;
};
struct offcpu_total {
    __u64 ns;
    __u64 runnable_ns;
    __u64 count;
};
BPF_TABLE("lru_hash", struct offcpu_key, struct offcpu_total, offcpu_totals, 16384);
/* Idle waits (in epoll_wait) of at least OFFCPU_MIN_NS, by waker: what wakes a worker that had no work
 * (downstream data, an xDS push over a Unix socket, an eventfd post from another Envoy thread, a timer).
 * Shorter idle waits are only in offcpu_totals: no waker stack is taken for them. */
struct idle_wake_key {
    __u32 tid;
    __u32 waker_tgid;
    __s32 waker_kstack_id;
    __u32 _pad;
};
struct idle_wake_total {
    __u64 ns;
    __u64 count;
    char waker_comm[COMM_LEN];
};
BPF_TABLE("lru_hash", struct idle_wake_key, struct idle_wake_total, idle_wakes, 16384);
BPF_STACK_TRACE(stacks, STACK_ENTRIES);
/* An EV_DATA record is built here (too big for the stack). The spill area lets the verifier accept
 * copies at masked offsets: off < CAPTURE_MAX and n <= CAPTURE_MAX always fit. */
struct data_scratch_t {
    struct data_event ev;
    __u8 spill[CAPTURE_MAX];
};
BPF_PERCPU_ARRAY(data_scratch, struct data_scratch_t, 1);
BPF_PERCPU_ARRAY(segment_scratch, struct io_segments, 1);
/* The walk of one HTTP/2 read/write through its buffers (capture_h2). It lives in a map, not in registers,
 * so that the verifier sees few distinct states in the walk loop (H2_LOAD). */
struct h2_walk {
    __u64 pos;       /* offset in the bytes the syscall moved */
    __u64 n;         /* bytes it moved */
    __u64 iov;       /* user iovec array; 0 for one flat buffer */
    __u64 seg_base;  /* the current buffer: user address, length, offset of its first byte in the n */
    __u64 seg_len;
    __u64 seg_start;
    __u32 iovcnt;
    __u32 seg;       /* index of the current buffer in iov */
    __u32 out;       /* condensed bytes written to the record */
    __u32 dir;       /* enum io_direction */
};
BPF_PERCPU_ARRAY(h2_scratch, struct h2_walk, 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

static __always_inline void count_drop(int reason) {
    __u64 *v = drops.lookup(&reason);
    if (v)
        (*v)++;
}

static __always_inline int is_target(__u32 tgid) { return targets.lookup(&tgid) != 0; }

static __always_inline __u64 conn_key(__u32 tgid, __s32 fd) { return ((__u64)tgid << 32) | (__u32)fd; }

static __always_inline void fill_header_of(struct event_header *h, __u32 kind, __u64 pid_tgid,
                                           const struct thread_state *t) {
    h->ts_ns = bpf_ktime_get_ns();
    h->kind = kind;
    h->tgid = pid_tgid >> 32;
    h->tid = (__u32)pid_tgid;
    h->round = t ? t->round : 0;
}

static __always_inline void fill_header(struct event_header *h, __u32 kind, __u64 pid_tgid) {
    __u32 tid = (__u32)pid_tgid;
    fill_header_of(h, kind, pid_tgid, threads.lookup(&tid));
}

/* The calling thread's state, created on first use. NULL (counted) only when the table refuses. */
static __always_inline struct thread_state *thread_of(__u32 tid) {
    __u32 idx = 0;
    struct thread_state *zero = thread_zero.lookup(&idx); /* too big for the stack: a zeroed map value */
    if (!zero)
        return 0;
    struct thread_state *t = threads.lookup_or_try_init(&tid, zero);
    if (!t)
        count_drop(DROP_INFLIGHT_FULL);
    return t;
}

/* Takes the in-flight syscall of this thread (clearing it); returns 0 when there is none. */
static __always_inline int take_inflight(struct thread_state *t, struct inflight *out) {
    if (!t || !t->in.active)
        return 0;
    *out = t->in;
    t->in.active = 0;
    return 1;
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
    __u32 tid = (__u32)pid_tgid;
    struct thread_state *t = threads.lookup(&tid); /* only target threads have state */
    if (!t) {
        if (!is_target(pid_tgid >> 32))
            return 0;
        t = thread_of(tid);
        if (!t)
            return 0;
    }
    t->round++;
    t->ready = ret > 0 ? (__u32)ret : 0;
    t->round_start_ns = bpf_ktime_get_ns();
    t->in_round = ret > 0; /* a timeout (0) or EINTR runs timers or nothing: not a round of fd work */
    t->round_offcpu_ns = 0;
    t->round_runnable_ns = 0;
    t->round_waits = 0;
    t->round_flagged = 0;
    return 0;
}

static __always_inline __u32 log2_u64(__u64 v) {
    __u32 r = 0;
#pragma unroll
    for (int i = 5; i >= 0; i--) {
        __u32 shift = 1u << i;
        if (v >> shift) {
            v >>= shift;
            r += shift;
        }
    }
    return r;
}

/* A target thread calls epoll_wait: its round (if any) ends here. */
static __always_inline int on_epoll_wait_enter(void) {
    __u32 tid = (__u32)bpf_get_current_pid_tgid();
    struct thread_state *t = threads.lookup(&tid); /* only target threads have state */
    if (!t)
        return 0;
    __u64 idle = t->idle_ns; /* the sleep that started the round ending now; the next one starts here */
    t->idle_ns = 0;
    if (!t->in_round)
        return 0;
    t->in_round = 0;
    __u64 now = bpf_ktime_get_ns();
    __u64 took = now - t->round_start_ns;
    __u32 slot = log2_u64(took / 1000);
    if (slot < ROUND_HIST_SLOTS)
        t->round_hist[slot]++;
    if (took < ROUND_MIN_NS && !t->round_flagged)
        return 0;
    struct round_event ev = {};
    fill_header_of(&ev.hdr, EV_ROUND, bpf_get_current_pid_tgid(), t);
    ev.hdr.ts_ns = now;
    ev.start_ns = t->round_start_ns;
    ev.offcpu_ns = t->round_offcpu_ns;
    ev.runnable_ns = t->round_runnable_ns;
    ev.ready = t->ready;
    ev.waits = t->round_waits;
    ev.cpu = bpf_get_smp_processor_id();
    ev.idle_ns = idle;
    ev.waker_kstack_id = idle ? t->wake_kstack_id : -1; /* -1: no waker taken */
    ev.waker_pid = t->wake_pid;
    ev.waker_tgid = t->wake_tgid;
    __builtin_memcpy(ev.waker_comm, t->wake_comm, sizeof(ev.waker_comm));
    emit(&ev, sizeof(ev));
    return 0;
}

/* The syscall the current thread is in, from its saved user registers (orig_ax): -1 outside a syscall
 * (an interrupt); inside a page fault, the fault's error code (a small number, read as a read/write). */
static __always_inline __s32 current_syscall(void) {
    struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
    long nr = -1;
    if (regs)
        bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    return (__s32)nr;
}

/* Why a thread that blocked voluntarily in syscall `nr` is waiting (x86-64 numbers). */
static __always_inline __u32 voluntary_reason(__s32 nr) {
    switch (nr) {
    case NR_EPOLL_WAIT:
    case NR_EPOLL_PWAIT:
    case NR_EPOLL_PWAIT2:
        return OFFCPU_IDLE;
    case NR_FUTEX:
    case NR_FUTEX_WAITV:
        return OFFCPU_LOCK;
    case 0 ... 6:    /* read write open close stat fstat lstat (and page faults' error codes) */
    case 17 ... 20:  /* pread64 pwrite64 readv writev */
    case 40:         /* sendfile */
    case 44 ... 47:  /* sendto recvfrom sendmsg recvmsg */
    case 74 ... 75:  /* fsync fdatasync */
    case 257:        /* openat */
    case 262:        /* newfstatat */
    case 295 ... 296: /* preadv pwritev */
    case 299:        /* recvmmsg */
    case 307:        /* sendmmsg */
    case 327 ... 328: /* preadv2 pwritev2 */
    case 332:        /* statx */
        return OFFCPU_IO;
    }
    return OFFCPU_OTHER;
}

/* ---------------------------------------------------------------- off-CPU waits */

#if OFFCPU
TRACEPOINT_PROBE(sched, sched_switch) {
    __u64 now = 0;
    __u32 prev = args->prev_pid;
    struct thread_state *t = threads.lookup(&prev);
    if (t && prev != 0) { /* a target thread leaves the CPU */
        now = bpf_ktime_get_ns();
        long state = args->prev_state;
        __u32 reason;
        __s32 nr = current_syscall(); /* prev is the current task here */
        if (state == 0 || (state & TASK_REPORT_MAX))
            reason = OFFCPU_PREEMPTED;
        else
            reason = voluntary_reason(nr);
        t->off_start_ns = now;
        t->prev_state = state;
        t->off_reason = reason;
        t->sys_nr = nr;
        t->cpu = bpf_get_smp_processor_id();
        t->waker_kstack_id = -1;
        t->waker_taken = 0;
        t->other_tgid = 0;
        if (reason == OFFCPU_PREEMPTED) {
            t->runnable_ns = now;
            t->other_pid = args->next_pid;
            bpf_probe_read_kernel(&t->other_comm, sizeof(t->other_comm), args->next_comm);
        } else {
            t->runnable_ns = 0;
            t->other_pid = 0;
            t->other_comm[0] = 0;
        }
        if (reason != OFFCPU_IDLE) { /* idle waits are only aggregated: no stacks of the sleeper */
            t->kstack_id = stacks.get_stackid(args, 0);
            t->ustack_id = stacks.get_stackid(args, BPF_F_USER_STACK);
        } else {
            t->kstack_id = -1;
            t->ustack_id = -1;
        }
    }
    __u32 next = args->next_pid;
    struct thread_state *n = threads.lookup(&next);
    if (!n || next == 0 || !n->off_start_ns)
        return 0;
    if (!now)
        now = bpf_ktime_get_ns();
    __u64 off = now - n->off_start_ns;
    __u64 runnable = n->runnable_ns ? now - n->runnable_ns : 0;
    __u32 reason = n->off_reason;
    n->off_start_ns = 0;
    struct offcpu_key key = {.tid = next, .reason = reason};
    struct offcpu_total *tot = offcpu_totals.lookup(&key);
    if (tot) {
        __sync_fetch_and_add(&tot->ns, off);
        __sync_fetch_and_add(&tot->runnable_ns, runnable);
        __sync_fetch_and_add(&tot->count, 1);
    } else {
        struct offcpu_total first = {.ns = off, .runnable_ns = runnable, .count = 1};
        offcpu_totals.update(&key, &first);
    }
    if (reason == OFFCPU_IDLE) {
        /* Between rounds: no span, but the next round learns how long the thread slept and, for a long
         * sleep, who woke it; long sleeps are also aggregated by waker. */
        n->idle_ns += off;
        /* kept for the round (other_* are reused by the next wait); without a waker taken (the sleep was
         * shorter than OFFCPU_MIN_NS when it was woken) they are still as the switch-out left them: none */
        n->wake_kstack_id = n->waker_kstack_id;
        n->wake_pid = n->other_pid;
        n->wake_tgid = n->other_tgid;
        __builtin_memcpy(n->wake_comm, n->other_comm, sizeof(n->wake_comm));
        if (!n->waker_taken)
            return 0;
        struct idle_wake_key wk = {.tid = next, .waker_tgid = n->other_tgid,
                                   .waker_kstack_id = n->waker_kstack_id};
        struct idle_wake_total *w = idle_wakes.lookup(&wk);
        if (w) {
            __sync_fetch_and_add(&w->ns, off);
            __sync_fetch_and_add(&w->count, 1);
        } else {
            struct idle_wake_total first = {.ns = off, .count = 1};
            __builtin_memcpy(first.waker_comm, n->other_comm, sizeof(first.waker_comm));
            idle_wakes.update(&wk, &first);
        }
        return 0;
    }
    if (n->in_round) {
        n->round_offcpu_ns += off;
        n->round_runnable_ns += runnable;
        n->round_waits++;
    }
    if (off < OFFCPU_MIN_NS)
        return 0;
    if (n->in_round)
        n->round_flagged = 1;
    struct offcpu_event ev = {};
    ev.hdr.ts_ns = now;
    ev.hdr.kind = EV_OFFCPU;
    ev.hdr.tid = next;
    ev.hdr.tgid = 0; /* sched_switch names threads only; user space knows each thread's process */
    ev.hdr.round = n->in_round ? n->round : 0;
    ev.start_ns = now - off;
    ev.runnable_ns = runnable;
    ev.prev_state = n->prev_state;
    ev.reason = reason;
    ev.syscall = n->sys_nr;
    ev.kstack_id = n->kstack_id;
    ev.ustack_id = n->ustack_id;
    ev.waker_kstack_id = n->waker_kstack_id;
    ev.other_pid = n->other_pid;
    ev.other_tgid = n->other_tgid;
    ev.cpu = n->cpu;
    __builtin_memcpy(ev.other_comm, n->other_comm, sizeof(ev.other_comm));
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_waking) {
    __u32 pid = args->pid;
    struct thread_state *t = threads.lookup(&pid);
    if (!t || !t->off_start_ns || t->runnable_ns)
        return 0;
    __u64 now = bpf_ktime_get_ns();
    t->runnable_ns = now;
    /* An idle loop's waker is taken only when it slept long enough to matter (under load a worker sleeps
     * for microseconds, many times per millisecond: no stack walk for those). */
    if (t->off_reason == OFFCPU_IDLE && now - t->off_start_ns < OFFCPU_MIN_NS)
        return 0;
    __u64 waker = bpf_get_current_pid_tgid();
    t->other_pid = (__u32)waker;
    t->other_tgid = waker >> 32;
    bpf_get_current_comm(&t->other_comm, sizeof(t->other_comm));
    t->waker_kstack_id = stacks.get_stackid(args, 0);
    t->waker_taken = 1;
    return 0;
}
#endif


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
    read_sockaddr((void *)in.buf, &ev.family, &ev.peer_port, ev.peer_addr);
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));

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
    struct thread_state *t = thread_of((__u32)pid_tgid);
    if (!t)
        return 0;
    struct inflight in = {};
    in.fd = args->fd;
    in.aux = (__u64)args->uservaddr;
    in.is_connect = 1;
    in.active = 1;
    t->in = in;
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    struct thread_state *t = threads.lookup(&tid);
    struct inflight in;
    if (!take_inflight(t, &in) || !in.is_connect)
        return 0;
    struct connect_event ev = {};
    fill_header_of(&ev.hdr, EV_CONNECT, pid_tgid, t);
    ev.fd = in.fd;
    ev.ret = (__s32)args->ret;
    int ok = read_sockaddr((void *)in.aux, &ev.family, &ev.peer_port, ev.peer_addr);
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
    __u64 key = conn_key(tgid, (__s32)args->fd); /* only targets' fds are in `conns` */
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
    ev.tls_records_rx = cs->tls[DIR_READ].records;
    ev.tls_records_tx = cs->tls[DIR_WRITE].records;
    ev.tls_app_records_rx = cs->tls[DIR_READ].app_records;
    ev.tls_app_records_tx = cs->tls[DIR_WRITE].app_records;
    ev.tls_max_record_rx = cs->tls[DIR_READ].max_len;
    ev.tls_max_record_tx = cs->tls[DIR_WRITE].max_len;
    ev.tls_flags = cs->tls_flags;
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

/* The record starts with the HTTP/2 client preface (PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n, little-endian words). */
static __always_inline int is_h2_preface(const struct data_event *e) {
    if (e->captured < H2_PREFACE_LEN)
        return 0;
    const __u64 *w = (const __u64 *)e->data;
    return w[0] == 0x5448202a20495250ULL && w[1] == 0x0a0d302e322f5054ULL && w[2] == 0x0a0d0a0d4d530a0dULL;
}

/* A fresh load of a field of the walk state. The walk keeps no value in registers from one step to the
 * next, and takes no branch it can avoid inside a step: the verifier walks every iteration of the loop,
 * and inside a loop it prunes only identical states, so each avoidable branch would double the work. */
#define H2_LOAD(x) (*(volatile typeof(x) *)&(x))

/* min(a, b) for a, b < 2^63, without a branch. */
static __always_inline __u64 h2_min(__u64 a, __u64 b) {
    __s64 d = (__s64)(a - b);
    BARRIER_VAR(d);
    return b + (__u64)(d & (d >> 63));
}

/* 1 if x (< 2^32) is not 0, without a branch. */
static __always_inline __u32 h2_nz(__u64 x) { return (__u32)((x + 0xffffffffULL) >> 32); }

/* A piece of the walk was finished: with nothing left to copy or skip, a frame header comes next. */
static __always_inline void h2_next(struct h2_framing *f, __u32 copy, __u32 skip, __u32 in_hdr) {
    __u32 header = 1 - h2_nz(copy | skip);
    f->copy = copy + header * H2_FRAME_HEADER;
    f->skip = skip;
    f->in_hdr = in_hdr | header;
}

/* One step of the HTTP/2 walk of a read/write (see capture_h2): skip a DATA payload (as far as this syscall
 * goes), move to the next iovec, or copy one run of the current piece (up to the end of the piece, of the
 * buffer or of the syscall). Between steps, copy or skip is never 0 (h2_next). -1 when the framing is lost. */
static __always_inline int h2_step(struct h2_framing *f, struct data_event *e, struct h2_walk *w) {
    __u64 pos = H2_LOAD(w->pos);
    __u64 rest = H2_LOAD(w->n) - pos;
    __u32 copy = H2_LOAD(f->copy);
    if (!copy) { /* a DATA payload: user space counts it from the frame header */
        __u32 skip = H2_LOAD(f->skip);
        __u32 k = (__u32)h2_min(skip, rest);
        w->pos = pos + k;
        h2_next(f, 0, skip - k, 0);
        return 0;
    }
    __u64 seg_start = H2_LOAD(w->seg_start);
    __u64 seg_end = seg_start + H2_LOAD(w->seg_len);
    if (pos >= seg_end) { /* the bytes are in the next buffer: read its struct iovec into seg_base, seg_len */
        __u32 seg = H2_LOAD(w->seg) + 1;
        __u64 iov = H2_LOAD(w->iov);
        if (!iov || seg >= H2_LOAD(w->iovcnt))
            return -1;
        w->seg = seg;
        w->seg_start = seg_end;
        if (bpf_probe_read_user(&w->seg_base, 2 * sizeof(__u64), (void *)(iov + (__u64)seg * sizeof(struct iovec))))
            return -1;
        return 0;
    }
    /* iov_len <= SSIZE_MAX (the syscall succeeded), so all of these are below 2^63 */
    __u32 k = (__u32)h2_min(copy, h2_min(seg_end - pos, rest));
    __u32 out = H2_LOAD(w->out);
    if (out + k > CAPTURE_MAX) /* more than one record holds */
        return -1;
    w->out = out + k;
    w->pos = pos + k;
    void *src = (void *)(H2_LOAD(w->seg_base) + (pos - seg_start));
    BARRIER_VAR(k);
    k &= (2 * CAPTURE_MAX - 1);
    if (k > CAPTURE_MAX)
        k = CAPTURE_MAX;
    BARRIER_VAR(out);
    out &= (CAPTURE_MAX - 1); /* out + k <= CAPTURE_MAX and k >= 1 */
    /* data is CAPTURE_MAX bytes; the scratch buffer behind it has room for out + k < 2*CAPTURE_MAX */
    if (bpf_probe_read_user((__u8 *)e->data + out, k, src) != 0)
        return -1;
    /* The state after the run, branch-free. A frame header's bytes also go to f->hdr, at their offset in
     * the header (it may straddle two syscalls); when the run completes it, the frame's payload is to be
     * copied (all of it but for DATA frames, of which only a padded one's pad length) and skipped. */
    copy = H2_LOAD(f->copy); /* reloaded rather than kept across the call (no spill) */
    __u32 in_hdr = H2_LOAD(f->in_hdr) & 1;
    __u32 got = H2_FRAME_HEADER - copy;
    BARRIER_VAR(got);
    bpf_probe_read_user(f->hdr + (got & 15), (k & 15) * in_hdr, src);
    __u32 rem = copy - k;
    __u32 done = in_hdr * (1 - h2_nz(rem));
    __u32 len = ((__u32)H2_LOAD(f->hdr[0]) << 16) | ((__u32)H2_LOAD(f->hdr[1]) << 8) | H2_LOAD(f->hdr[2]);
    __u32 not_data = (H2_LOAD(f->hdr[3]) + 255) >> 8;                  /* type != DATA */
    __u32 pad = (H2_LOAD(f->hdr[4]) >> 3) & 1 & ((len + 0xffffff) >> 24); /* PADDED and len > 0 */
    __u32 keep = not_data * len + (1 - not_data) * pad;
    h2_next(f, rem + done * keep, H2_LOAD(f->skip) + done * (len - keep), in_hdr - done);
    return 0;
}

/* The record of one read/write of an HTTP/2 connection holds its condensed framing instead of its first
 * bytes: the client preface, every 9-byte frame header and every payload except DATA ones (of which only
 * a padded frame's pad length byte), in stream order (struct h2_framing). The walk goes on across syscalls,
 * per direction. When more than CAPTURE_MAX bytes or H2_WALK_MAX steps would be needed, or a buffer cannot
 * be read, the record holds what was condensed so far (user space then misses bytes it needs: a capture
 * gap) and the direction's framing is lost: its later records carry their first bytes, as on any
 * connection. */
static __always_inline void capture_h2(struct conn_state *cs, struct data_event *e, const struct inflight *req,
                                       __u64 n, __u8 dir) {
    e->flags |= DATA_FLAG_H2_FRAMES;
    e->captured = 0;
    __u32 zero = 0;
    struct h2_walk *w = h2_scratch.lookup(&zero);
    if (!w) {
        cs->h2[dir & 1].state = H2_LOST;
        return;
    }
    /* What the walk branches on is reloaded from the map (H2_LOAD): fresh values to the verifier, so
     * what it learns here does not split the states of the caller's registers and the loop is verified
     * once, not once per direction or syscall. */
    w->dir = dir & 1;
    w->n = n;
    w->iov = req->buf;
    w->iovcnt = req->len;
    struct h2_framing *f = &cs->h2[H2_LOAD(w->dir) & 1];
    n = H2_LOAD(w->n);
    if (!f->copy && f->skip >= n) { /* inside a DATA payload, the common case for large bodies */
        h2_next(f, 0, f->skip - (__u32)n, 0);
        return;
    }
    __u8 sc = H2_LOAD(e->syscall);
    __u64 buf = H2_LOAD(w->iov);
    __u64 cnt = H2_LOAD(w->iovcnt);
    w->pos = 0;
    w->out = 0;
    w->seg = 0;
    w->seg_start = 0;
    w->iov = 0;
    w->iovcnt = 1;
    w->seg_base = buf;
    w->seg_len = n;
    if (sc == IO_READV || sc == IO_WRITEV || sc == IO_RECVMSG || sc == IO_SENDMSG) {
        __u64 iov = buf;
        if (sc == IO_RECVMSG || sc == IO_SENDMSG) {
            struct user_msghdr mh = {};
            cnt = 0;
            if (bpf_probe_read_user(&mh, sizeof(mh), (void *)buf) == 0) {
                iov = (__u64)mh.msg_iov;
                cnt = mh.msg_iovlen;
            }
        }
        struct iovec v = {};
        if (cnt == 0 || bpf_probe_read_user(&v, sizeof(v), (void *)iov) != 0) {
            f->state = H2_LOST;
            return;
        }
        w->iov = iov;
        w->iovcnt = cnt > H2_MAX_IOV ? H2_MAX_IOV : (__u32)cnt;
        w->seg_base = (__u64)v.iov_base;
        w->seg_len = v.iov_len;
    }
#pragma clang loop unroll(disable)
    for (int i = 0; i < H2_WALK_MAX; i++) {
        if (H2_LOAD(w->pos) >= H2_LOAD(w->n))
            break;
        if (h2_step(f, e, w) < 0)
            break;
    }
    e->captured = w->out;
    if (w->pos < w->n)
        f->state = H2_LOST;
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
#if HTTP_CAPTURE /* without it, the extra branches put sys_exit over the verifier's 1M-instruction budget */
    if (!is_write && !peek && (cs->flags & CONN_HELD)) {
        cs->flags &= ~CONN_HELD;
        e->held = TLS_RECORD_HEADER;
        e->held_captured = cs->held_captured;
        __builtin_memcpy(e->held_data, cs->held_data, sizeof(e->held_data));
        if (ret > 0)
            e->ret = ret + TLS_RECORD_HEADER;
    }
#endif
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
#if HTTP_CAPTURE
    /* A read of just a TLS record header (BoringSSL reads the header, then the body): held back, to ride
     * on this connection's next read record (e->held), one record instead of two, while one more record
     * is due. Only with request capture (the default): with --no-requests no record is sent past the
     * handshake, so little is saved, and these branches put sys_exit over the verifier's budget of 1M
     * instructions (it is near it: a variation of this test failed to load in one build or the other). */
    if (ret == TLS_RECORD_HEADER && !is_write && !peek && (cs->flags & CONN_TLS) && !e->held &&
        cs->data_events < cs->capture_budget) {
        cs->flags |= CONN_HELD;
        cs->held_captured = e->captured;
        __builtin_memcpy(cs->held_data, e->data, sizeof(cs->held_data));
        cs->data_events = seq; /* not sent */
        return 0;
    }
#endif
    /* HTTP/2 with prior knowledge: the client's first bytes are the preface (downstream: the first read;
     * upstream: the first write). Both directions are walked from here on, this record included. */
    if (first_io && is_write == (cs->role == ROLE_UPSTREAM) && is_h2_preface(e)) {
        cs->flags |= CONN_H2;
        cs->h2[is_write & 1].state = H2_WALK;
        cs->h2[is_write & 1].copy = H2_PREFACE_LEN; /* copied like the frames: user space agrees */
        cs->h2[!is_write].state = H2_WALK;
        cs->h2[!is_write].copy = H2_FRAME_HEADER; /* the server starts with a frame */
        cs->h2[!is_write].in_hdr = 1;
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
    if (syscall == IO_RECVMSG)
        req.flags = (__u32)syscall_arg(regs, 2);
    else if (syscall == IO_RECVFROM)
        req.flags = (__u32)syscall_arg(regs, 3);
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

/* epoll_wait's entry through its own tracepoints: a raw sys_enter program would run on every syscall of
 * every process (Envoy's reads and writes included) only to find most of them uninteresting. */
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_wait) { return on_epoll_wait_enter(); }
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_pwait) { return on_epoll_wait_enter(); }
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_pwait2) { return on_epoll_wait_enter(); }

RAW_TRACEPOINT_PROBE(sys_exit) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long ret = (long)ctx->args[1];
    long nr = -1;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    __u8 io = 0;
    switch (nr) {
    case NR_EPOLL_WAIT:
    case NR_EPOLL_PWAIT:
    case NR_EPOLL_PWAIT2:
        return on_epoll_wait_exit(ret);
    case NR_READ: io = IO_READ; break;
    case NR_READV: io = IO_READV; break;
    case NR_RECVFROM: io = IO_RECVFROM; break;
    case NR_RECVMSG: io = IO_RECVMSG; break;
    case NR_WRITE: io = IO_WRITE; break;
    case NR_WRITEV: io = IO_WRITEV; break;
    case NR_SENDTO: io = IO_SENDTO; break;
    case NR_SENDMSG: io = IO_SENDMSG; break;
    default: return 0;
    }
    return on_io_exit(io, regs, ret); /* one inlined on_io_exit (one set of its stack slots) */
}

/* ---------------------------------------------------------------- epoll_ctl / setsockopt */

TRACEPOINT_PROBE(syscalls, sys_enter_epoll_ctl) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    __u64 key = conn_key(tgid, (__s32)args->fd); /* only targets' fds are in `conns` */
    struct conn_state *cs = conns.lookup(&key);
    /* Only registrations (ADD), and only until the first real I/O: the listener filters register the fd
     * once to wait for its first bytes; a second ADD (after a DEL, which is implied and not sent) is the
     * hand-off to the filter chain. */
    if (!cs || args->op != 1 /* EPOLL_CTL_ADD */ || cs->epoll_events >= EPOLL_CTL_EVENTS_MAX ||
        (cs->flags & CONN_SAW_IO))
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
    __u64 key = conn_key(tgid, (__s32)args->fd); /* only targets' fds are in `conns` */
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
                                     oldstate == TCP_SYN_SENT))))
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
