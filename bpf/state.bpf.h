/* state.bpf.h: what the units share. The per-connection state (`conns`, keyed by tgid and fd) and the
 * per-thread state (`threads`), the target filter, the drop counters and the ring buffer, and the helpers
 * that build and send a record's header. The x86-64 syscall numbers are here too: the syscall exits
 * (io.bpf.h) dispatch on them and the off-CPU accounting (sched.bpf.h) names waits by them.
 */
#define MAX_IOV 8 /* iovecs of one read/write whose bytes are captured or walked as TLS records */

/* x86-64 syscall numbers and argument registers (di, si, dx, r10, r8, r9): the raw syscall tracepoints see
 * only the number and the registers. The loader refuses other architectures. */
#define NR_READ 0
#define NR_WRITE 1
#define NR_READV 19
#define NR_WRITEV 20
#define NR_CONNECT 42
#define NR_ACCEPT 43
#define NR_SENDTO 44
#define NR_RECVFROM 45
#define NR_SENDMSG 46
#define NR_RECVMSG 47
#define NR_EPOLL_WAIT 232
#define NR_EPOLL_CTL 233
#define EPOLL_CTL_ADD_OP 1
#define NR_ACCEPT4 288
#define NR_EPOLL_PWAIT 281
#define NR_EPOLL_PWAIT2 441
#define NR_FUTEX 202
#define NR_FUTEX_WAITV 449

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
    __u32 epoll_adds;     /* epoll_ctl ADDs before the first real I/O (the close record says them) */
    __u32 role;
    __u32 flags;          /* CONN_* below */
    __u32 tls_flags;      /* TLS_FRAMING_* (events.h) */
    __u8 held_data[8];    /* CONN_HELD: the first bytes of the held TLS record header read */
    __u32 held_captured;  /* how many of them were captured */
    __u32 _pad_held;
    struct tls_framing tls[2]; /* indexed by enum io_direction */
    struct h2_framing h2[2];   /* indexed by enum io_direction (CONN_H2 only) */
    __u64 req_start_ns;        /* SAMPLING: when the current HTTP/1.x request's first read returned */
    __s32 listen_fd;           /* downstream: the listening socket it was accepted on (-1: upstream) */
    __u8 req_method;           /* SAMPLING: the current request's enum http_method (0: not HTTP/1.x) */
    __u8 _pad_req[3];
    __u32 req_head_len;        /* SAMPLING: bytes of req_head read from the current request */
    __u8 req_head[KEPT_HEAD];  /* SAMPLING: its first bytes, sent if it is kept or summarised */
    __u8 req_tp[TP_CONTEXT];   /* SAMPLING: its bytes from a valid traceparent's value on (traceparent.bpf.h) */
    __u8 req_tp_len;           /* SAMPLING: how many of req_tp are the request's (0: no valid traceparent) */
    __u64 hs_start_ns;         /* SAMPLING: the TLS handshake's start (its ClientHello's first read or peek) */
    __u16 hs_version;          /* SAMPLING: the version the ServerHello chose (0 until it is written) */
    __u8 hs_state;             /* SAMPLING: enum tls_hs_state (tls_metrics.bpf.h) */
    __u8 hs_resumed;           /* SAMPLING: the ServerHello resumed a session */
    __u32 sockopt_count;       /* setsockopt calls (the first SOCKOPTS_KEPT kept in sockopts) */
    __u32 quiet_left;          /* SAMPLING: bytes of a quiet TLS record's body still to read (quiet_record) */
    __u32 _pad_quiet;
    __u64 epoll_first_add_ns;  /* the first two epoll_ctl ADDs before the first real I/O (0: none) */
    __u64 epoll_second_add_ns;
    __u8 sockopts[SOCKOPT_BYTES]; /* as in struct close_event */
    /* SAMPLING, a connection sampled whole and not traced (conn_keep.bpf.h): what its kept record says */
    __u64 established_ns;      /* its TCP handshake's completion (accept-queue wait); 0: not seen */
    __u64 hs_end_ns;           /* its TLS handshake's completion; 0: not complete */
    __u8 peer_addr[ADDR_LEN];
    __u16 peer_family;
    __u16 peer_port;
    __u16 local_port;          /* SAMPLING: its listener's port, when its TCP facts fold into its close (below) */
    __u16 _pad_peer;
};

#define CONN_SAW_IO 1   /* a non-peek read or write happened: the listener-filter hand-off is settled */
#define CONN_TLS 2      /* the first bytes read were a TLS handshake record */
#define CONN_TLS_APP 4  /* TLS handshake over: reads carry no bytes (ciphertext), only their round */
#define CONN_H2 8       /* HTTP/2 prior knowledge (the client preface came first): records are condensed */
#define CONN_HELD 16    /* a read of a lone TLS record header waits to ride on the next read's record */

#define CONN_AWAIT 32    /* SAMPLING: a request was read, its answer not yet written */
#define CONN_SKIP 64     /* SAMPLING: the current request's transfers are not reported (not sampled, or CONN_SUMMARY) */
#define CONN_UNTRACED 128 /* SAMPLING: a connection sampled whole and not traced: it sends no record */
#define CONN_PEER_EOF 256 /* SAMPLING: a read returned EOF (enum close_reason) */
#define CONN_IO_RESET 512 /* SAMPLING: a read or write failed with a reset (enum close_reason) */
/* 1024: CONN_ADOPTED (events.h: user space sets it) */
#define CONN_SUMMARY 2048 /* SAMPLING: the current request was sampled and is reported as one record */
#define CONN_HELLO_PEEKED 4096 /* SAMPLING: a listener filter's peek held the whole ClientHello record */
#define CONN_LATE_UNTRACED 8192 /* SAMPLING: CONN_UNTRACED decided after its accept was reported (h2c or not
                                 * HTTP, at its first transfer): its close is reported, marked `sampled_out`,
                                 * and nothing between */
#define CONN_HOLD 16384 /* SAMPLING: an untraced TLS connection's ClientHello is being held (hold_hello_sys_exit) */
#define CONN_HS_SUMMARY 32768 /* SAMPLING: a traced TLS connection whose handshake is reported as one record at its
                               * end (conn_keep.bpf.h): until then it is CONN_UNTRACED, its handshake bytes held */
#define CONN_FIN_QUIET 65536 /* SAMPLING: the client's Finished comes next, in that summary already: its read is quiet */
#define CONN_HRR 131072 /* SAMPLING: the server's hello flight was a HelloRetryRequest: a second ClientHello comes */
#define CONN_TCP_FOLDED 262144 /* SAMPLING: a traced connection decided whole: the peer's FIN and the first reset
                                * it received ride on its close record (conn_sampling.bpf.h close_facts) */
/* Which of those facts a TCP event is (sockets.bpf.h tcp_record_wanted); NO_CLOSE_FACT: neither. */
#define NO_CLOSE_FACT -1
#define CLOSE_FACT_FIN 0
#define CLOSE_FACT_RESET 1

/* A connection sampled whole and not traced, as opposed to one whose handshake is being summarized. */
static __always_inline int untraced_only(const struct conn_state *cs) {
    return (cs->flags & (CONN_UNTRACED | CONN_HS_SUMMARY)) == CONN_UNTRACED;
}

/* A connection's totals from its state `cs` into record `e`: a struct close_event or a struct
 * connection_kept_event (events.h: the same field names). */
#define COPY_CONN_TOTALS(e, cs)                                              \
    do {                                                                     \
        (e)->bytes_rx = (cs)->bytes_rx;                                      \
        (e)->bytes_tx = (cs)->bytes_tx;                                      \
        (e)->reads = (cs)->reads;                                            \
        (e)->writes = (cs)->writes;                                          \
        (e)->tls_records_rx = (cs)->tls[DIR_READ].records;                   \
        (e)->tls_records_tx = (cs)->tls[DIR_WRITE].records;                  \
        (e)->tls_app_records_rx = (cs)->tls[DIR_READ].app_records;           \
        (e)->tls_app_records_tx = (cs)->tls[DIR_WRITE].app_records;          \
        (e)->tls_max_record_rx = (cs)->tls[DIR_READ].max_len;                \
        (e)->tls_max_record_tx = (cs)->tls[DIR_WRITE].max_len;               \
        (e)->tls_flags = (cs)->tls_flags;                                    \
        (e)->epoll_first_add_ns = (cs)->epoll_first_add_ns;                  \
        (e)->epoll_second_add_ns = (cs)->epoll_second_add_ns;                \
        (e)->epoll_adds = (cs)->epoll_adds;                                  \
        (e)->sockopt_count = (cs)->sockopt_count;                            \
        __builtin_memcpy((e)->sockopts, (cs)->sockopts, sizeof((e)->sockopts)); \
    } while (0)

#define CAPTURE_UNLIMITED 0xffffffff /* conn_state.capture_budget of a plaintext connection (request capture) */

/* What a syscall's enter saw, for its exit (one per thread: a thread is in one syscall at a time). */
struct inflight {
    __u64 buf;   /* user buffer, iovec array or msghdr */
    __u64 aux;   /* accept: sockaddr length pointer; connect: sockaddr */
    __s32 fd;
    __u32 len;   /* iovcnt for readv/writev; accept: the address buffer's size; connect: the address's length */
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

/* targets: the traced processes (tgids), filled by user space; conns and threads: the state above. */
BPF_HASH(targets, __u32, __u8, 1024);
/* target_bits[tgid % TARGET_BITS] is set for every target: an array lookup (inlined, no helper call) lets
 * the hot programs turn other processes' syscalls away before any hash lookup; a collision only costs the
 * lookup that follows. */
#define TARGET_BITS 4096
BPF_ARRAY(target_bits, __u8, TARGET_BITS);
BPF_TABLE("lru_hash", __u64, struct conn_state, conns, MAX_CONNS);
BPF_TABLE("lru_hash", __u32, struct thread_state, threads, 16384);
BPF_PERCPU_ARRAY(drops, __u64, DROP_REASONS);
/* Records put in the ring buffer (one slot; per CPU: no atomics). User space checks it against the records it
 * read: the first line of the accounting (otel_envoy/accounting.py). */
BPF_PERCPU_ARRAY(records_submitted, __u64, 1);
BPF_ARRAY(thread_zero, struct thread_state, 1); /* never written: thread_of's initial value */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

static __always_inline void count_drop(int reason) {
    __u64 *v = drops.lookup(&reason);
    if (v)
        (*v)++;
}

/* floor(log2(v)), 0 for v < 2: the slot of a log2 histogram. */
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

static __always_inline int is_target(__u32 tgid) { return targets.lookup(&tgid) != 0; }

/* 0 when tgid is certainly not a target (see target_bits). */
static __always_inline int maybe_target(__u32 tgid) {
    __u32 idx = tgid & (TARGET_BITS - 1);
    __u8 *bit = target_bits.lookup(&idx);
    return bit && *bit;
}

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

static __always_inline void count_submitted(void) {
    int zero = 0;
    __u64 *v = records_submitted.lookup(&zero);
    if (v)
        (*v)++;
}

/* Records are submitted without waking the reader: it drains the ring on a timer (the daemon's ring thread,
 * every RING_TIMER_MS), so no submission queues the kernel's wake-up (irq_work) in the traced process. */
#define RB_SUBMIT_FLAGS 1 /* BPF_RB_NO_WAKEUP */

/* 1 once the daemon stops producing (probes/loader.py, stop_producing): no program sends a record any more,
 * whatever state it still holds (a connection's close, a thread's off-CPU wait, an upstream socket's TCP
 * state), so the last drain reads every record the kernel submitted. */
BPF_ARRAY(producing_stopped, __u32, 1);

static __always_inline int producing(void) {
    __u32 zero = 0;
    __u32 *stopped = producing_stopped.lookup(&zero);
    return !(stopped && *stopped);
}

/* Every record goes out through emit, or through a ring reservation after a check of producing(). */
static __always_inline void emit(void *ev, __u32 size) {
    if (!producing())
        return;
    if (events.ringbuf_output(ev, size, RB_SUBMIT_FLAGS) != 0)
        count_drop(DROP_RINGBUF_FULL);
    else
        count_submitted();
}

/* Sockets a target bound to an inet address (startup.bpf.h), by conn_key(tgid, fd), and their copies: a
 * later epoll registration, SO_REUSEPORT or close of one of them is a step of a listener's setup. */
BPF_TABLE("lru_hash", __u64, struct bound_socket, bound_fds, 4096);

/* One socket_setup_event for the calling thread (`s`: the socket's address, NULL when not known). */
static __always_inline void emit_setup(__u64 pid_tgid, __u16 op, __s32 fd, __s32 other_fd, __s32 result,
                                       const struct bound_socket *s) {
    struct socket_setup_event ev = {};
    fill_header(&ev.hdr, EV_SOCKET_SETUP, pid_tgid);
    ev.op = op;
    ev.fd = fd;
    ev.other_fd = other_fd;
    ev.result = result;
    if (s) {
        ev.family = s->family;
        ev.port = s->port;
        __builtin_memcpy(ev.addr, s->addr, ADDR_LEN);
    }
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    emit(&ev, sizeof(ev));
}

#if SAMPLING
/* What the sampler left out but keeps all the same (kept requests, http_metrics.bpf.h; kept connections,
 * conn_keep.bpf.h) is sent at most `keep_rate` records a second, over all CPUs (0: no limit; user space
 * sets it from --keep-rate and lowers it while the daemon is over its CPU budget): a token bucket of one
 * second's worth, its credit in rate x ns (a record costs NSEC_PER_SEC of it). Shared by the CPUs without a
 * lock: two CPUs that update it at the same time may both take the last token (an approximate rate, never
 * an unbounded one). `keep_counts` counts what the rate refused, and what was sent. */
struct keep_bucket {
    __u64 last_ns;
    __u64 credit;
};
#define NSEC_PER_SEC_ULL 1000000000ULL
#define KEEP_LIMITED_REQUESTS 0
#define KEEP_LIMITED_CONNECTIONS 1
#define KEEP_SENT 2
BPF_ARRAY(keep_rate, __u64, 1);
BPF_ARRAY(keep_bucket, struct keep_bucket, 1);
BPF_PERCPU_ARRAY(keep_counts, __u64, 3); /* [KEEP_LIMITED_*]: refused by the rate; [KEEP_SENT]: sent */

static __always_inline void count_keep(__u32 slot) {
    __u64 *n = keep_counts.lookup(&slot);
    if (n)
        (*n)++;
}

/* Whether one more kept record (`what`: KEEP_LIMITED_*) may be sent at `now`; counted when not. */
static __always_inline int keep_within_rate(__u64 now, __u32 what) {
    __u32 zero = 0;
    __u64 *rate = keep_rate.lookup(&zero);
    struct keep_bucket *b = keep_bucket.lookup(&zero);
    if (!rate || !*rate || !b) {
        count_keep(KEEP_SENT);
        return 1;
    }
    __u64 elapsed = now > b->last_ns ? now - b->last_ns : 0;
    if (elapsed > NSEC_PER_SEC_ULL)
        elapsed = NSEC_PER_SEC_ULL;
    __u64 full = *rate * NSEC_PER_SEC_ULL;
    __u64 credit = b->credit + elapsed * *rate;
    if (credit > full)
        credit = full;
    b->last_ns = now;
    if (credit < NSEC_PER_SEC_ULL) {
        b->credit = credit;
        count_keep(what);
        return 0;
    }
    b->credit = credit - NSEC_PER_SEC_ULL;
    count_keep(KEEP_SENT);
    return 1;
}
#endif
