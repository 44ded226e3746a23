/* events.h: the ONE definition of every record that crosses from the BPF programs to user space.
 *
 * Python reads this file at start (otel_envoy/events/layout.py) to get the same constants, struct
 * offsets and sizes; tests/unit/test_layout.py compiles it with the host compiler and compares.
 * Rules that keep both sides simple: fixed-width types only (__u8..__u64, __s32, __s64, char arrays),
 * no unions, no bitfields, explicit padding so every field is naturally aligned, one `#define` or enum
 * constant per line. Every record starts with struct event_header; user space dispatches on `kind`.
 */
#ifndef OTEL_ENVOY_EVENTS_H
#define OTEL_ENVOY_EVENTS_H

/* Bytes captured from the start of one read/write; a power of two (the verifier bounds copies by mask). */
#define CAPTURE_MAX 4096
/* Data events (reads/writes with their first bytes) per connection; later I/O is only counted. */
#define CAPTURE_MSGS_DEFAULT 16
/* Socket options of a connection kept for its close record (setsockopt calls beyond them are counted). */
#define SOCKOPTS_KEPT 8 /* a power of two */
#define SOCKOPT_BYTES 96 /* SOCKOPTS_KEPT x 12 */
/* A conn_state flag (state.bpf.h) only user space sets: a connection open before the daemon started, adopted
 * from the socket table (no accept seen; left out of the connection metrics, whose duration it lacks). */
#define CONN_ADOPTED 1024
#define COMM_LEN 16
#define ADDR_LEN 16

enum event_kind {
    EV_ACCEPT = 1,     /* accept/accept4 returned a connection to the target */
    EV_CONNECT = 2,    /* the target called connect() on an inet socket */
    EV_CLOSE = 3,      /* the target closed a tracked connection fd */
    EV_DATA = 4,       /* a read/write-family syscall on a tracked fd returned */
    /* 5 and 6 were a record per epoll_ctl ADD and per setsockopt: both ride on EV_CLOSE now */
    EV_SOCK_STATE = 7, /* sock:inet_sock_set_state on a target listening port or a target's socket */
    EV_TCP = 8,        /* retransmit / reset / SYN-ACK retransmit on a target listening port */
    EV_LISTEN = 9,     /* the target called listen(): user space rescans its listening ports */
    EV_OFFCPU = 10,    /* a target thread was off CPU for at least OFFCPU_MIN_NS (not idle in epoll_wait) */
    EV_ROUND = 11,     /* an event-loop round that lasted ROUND_MIN_NS or held an EV_OFFCPU wait */
    EV_REQUEST_KEPT = 12, /* SAMPLING: a request that was not sampled, kept for what became of it */
    EV_EXEC = 14,         /* a process took the followed comm (exec): a target from its first instruction */
    EV_EXIT = 15,         /* a target's last thread exited: it is a target no more */
    EV_SOCKET_SETUP = 16, /* a target set up an inet socket it may listen on (enum setup_op) */
    EV_CONNECTION_KEPT = 17, /* SAMPLING: a connection sampled whole and not traced, kept at its close */
};

/* What struct socket_setup_event reports. */
enum setup_op {
    SETUP_BIND = 1,      /* bind() of an inet socket: result 0 or -errno */
    SETUP_REUSEPORT = 2, /* setsockopt(SOL_SOCKET, SO_REUSEPORT) on a bound or unconnected socket: result = value */
    SETUP_DUP = 3,       /* dup/dup2/dup3/fcntl(F_DUPFD*) of a bound socket: fd the copy, other_fd the original */
    SETUP_WATCH = 4,     /* epoll_ctl ADD of a bound socket: the thread that will accept on it; other_fd the epoll fd */
    SETUP_CLOSE = 5,     /* close() of a bound socket */
};

/* Why a target thread left the CPU (sched_switch prev_state plus the syscall it was in). */
enum offcpu_reason {
    OFFCPU_PREEMPTED = 1, /* involuntary: still runnable (prev_state R / R+) */
    OFFCPU_LOCK = 2,      /* blocked in futex (mutexes, condition variables) */
    OFFCPU_IO = 3,        /* blocked inside a read/write/file syscall, or a page fault */
    OFFCPU_IDLE = 4,      /* in epoll_wait: between rounds, waiting for work */
    OFFCPU_OTHER = 5,     /* any other blocking (nanosleep, other syscalls, page faults) */
    OFFCPU_REASONS = 6,
};

/* Which read or write syscall produced an EV_DATA record. */
enum io_syscall {
    IO_READ = 1,
    IO_READV = 2,
    IO_RECVFROM = 3,
    IO_RECVMSG = 4,
    IO_WRITE = 5,
    IO_WRITEV = 6,
    IO_SENDTO = 7,
    IO_SENDMSG = 8,
};

enum io_direction {
    DIR_READ = 0,  /* bytes the target received (from the peer) */
    DIR_WRITE = 1, /* bytes the target sent */
};

enum conn_role {
    ROLE_DOWNSTREAM = 1, /* accepted by the target */
    ROLE_UPSTREAM = 2,   /* connected by the target */
};

enum tcp_event_type {
    TCP_RETRANSMIT = 1,        /* tcp:tcp_retransmit_skb */
    TCP_RESET_SENT = 2,        /* tcp:tcp_send_reset */
    TCP_RESET_RECEIVED = 3,    /* tcp:tcp_receive_reset */
    TCP_SYNACK_RETRANSMIT = 4, /* tcp:tcp_retransmit_synack */
};

/* Indexes of the per-CPU `drops` array: every place the kernel side loses information. */
enum drop_reason {
    DROP_RINGBUF_FULL = 0,    /* bpf_ringbuf_output failed: user space is not draining fast enough */
    DROP_CONN_TABLE_FULL = 1, /* the connection table refused an insert */
    DROP_INFLIGHT_FULL = 2,   /* the syscall enter->exit table refused an insert */
    DROP_CAPTURE_READ = 3,    /* bpf_probe_read_user of payload or address failed */
    DROP_TAIL_CALL = 4,       /* SAMPLING: front_sys_exit's tail call into io_sys_exit failed */
    DROP_METRICS_FULL = 5,    /* SAMPLING: the request-metrics table refused a new series */
    DROP_REASONS = 6,
};

/* The method of an HTTP/1.x request as the kernel's request metrics key it (http_metrics.bpf.h); names
 * follow the OpenTelemetry http.request.method values (_OTHER for any other token). */
enum http_method {
    HTTP_METHOD_NONE = 0, /* not an HTTP/1.x request line */
    HTTP_METHOD_GET = 1,
    HTTP_METHOD_HEAD = 2,
    HTTP_METHOD_POST = 3,
    HTTP_METHOD_PUT = 4,
    HTTP_METHOD_DELETE = 5,
    HTTP_METHOD_CONNECT = 6,
    HTTP_METHOD_OPTIONS = 7,
    HTTP_METHOD_TRACE = 8,
    HTTP_METHOD_PATCH = 9,
    HTTP_METHOD_OTHER = 10,
};

/* The kernel's request metrics (http_metrics.bpf.h): one series per process, listening socket, method and
 * status code (0: the connection closed before a response), with a log2 histogram of durations. */
#define HTTP_HIST_SLOTS 26 /* slot s: durations of [2^s, 2^(s+1)) us; the last one also takes longer */
struct http_metric_key {
    __u32 pid; /* the process (tgid) */
    __s32 listen_fd;
    __u16 status;
    __u8 method; /* enum http_method */
    __u8 _pad;
};
struct http_metric {
    __u64 count;
    __u64 sum_ns;
    __u64 slots[HTTP_HIST_SLOTS];
};

/* How a downstream connection ended, as the kernel's connection metrics key it: what Envoy's reads and
 * writes on it returned before its close. */
enum close_reason {
    CLOSE_ENVOY_CLOSED = 0, /* Envoy closed it: no EOF read and no reset seen first */
    CLOSE_PEER_CLOSED = 1,  /* a read returned EOF (the peer's FIN) before the close */
    CLOSE_RESET = 2,    /* a read or write failed with ECONNRESET, EPIPE or ETIMEDOUT before the close */
};

/* The kernel's connection metrics (http_metrics.bpf.h): every downstream connection closed, traced or not,
 * by process, listening socket and enum close_reason, with a log2 histogram of their durations
 * (HTTP_HIST_SLOTS slots of microseconds, as requests). The accept-queue metrics use the same key with
 * close_reason 0: every accepted connection whose handshake completion was seen, by the time from its
 * ESTABLISHED transition to Envoy's accept. */
struct conn_metric_key {
    __u32 pid; /* the process (tgid) */
    __s32 listen_fd;
    __u8 close_reason; /* enum close_reason */
    __u8 _pad[3];
};

/* How a downstream TLS handshake ended, as the kernel's TLS metrics key it (SAMPLING builds). */
enum tls_outcome {
    TLS_HANDSHAKE_DONE = 1,   /* the server's side of it completed */
    TLS_HANDSHAKE_CLOSED = 2, /* the connection closed before it completed */
};

/* TLS handshakes of downstream connections, traced or not (SAMPLING builds), by listening socket, the
 * version and resumption the ServerHello chose, and how it ended. */
struct tls_metric_key {
    __u32 pid;       /* the process (tgid) */
    __s32 listen_fd;
    __u16 version;   /* the ServerHello's (supported_versions for TLS 1.3): 0x0304, 0x0303, ...; 0: not seen */
    __u8 resumed;    /* 1: a resumed session (TLS 1.3: a pre_shared_key; TLS 1.2: an abbreviated handshake) */
    __u8 outcome;    /* enum tls_outcome */
};

/* Accepts per thread and listening socket (SAMPLING builds): every downstream connection a worker accepted,
 * traced or not; the balance of a listener's connections across its workers. */
struct accept_thread_key {
    __u32 pid; /* the process (tgid) */
    __u32 thread_id; /* the accepting thread */
    __s32 listen_fd;
    __u32 _pad;
};

/* Why a request that was not sampled is reported all the same (struct request_kept_event; 0: it was
 * sampled, and is reported as one record). */
enum keep_reason {
    KEEP_SERVER_ERROR = 1,      /* its response's status was 5xx */
    KEEP_CLOSED = 2,            /* its connection closed (or was reset) before an answer */
    KEEP_SLOW = 3,              /* its answer took at least the daemon's slow-request threshold */
};

/* Why a connection sampled whole and not traced is reported at its close all the same (struct
 * connection_kept_event), in this order when several apply. */
enum connection_keep_reason {
    KEEP_CONN_TLS_FAILED = 1, /* it closed during its TLS handshake (an alert, a rejected hello, a client that gave up) */
    KEEP_CONN_RESET = 2,      /* a read or write of it failed with a reset (ECONNRESET, EPIPE, ETIMEDOUT) */
    KEEP_CONN_TLS_SLOW = 3,   /* its TLS handshake took at least the daemon's slow-handshake threshold */
    KEEP_CONN_ACCEPT_SLOW = 4, /* it waited in the accept queue at least the daemon's slow-accept threshold */
    KEEP_CONN_SAMPLED = 5,    /* not kept: a traced TLS connection's handshake, reported as one record
                               * (conn_keep.bpf.h, CONN_HS_SUMMARY) at its end (KEPT_OPEN) or at the close */
};

#define HELLO_HELD 4096 /* bytes of a ClientHello held for a kept record or a handshake summary (CAPTURE_MAX) */
#define FLIGHT_HELD 512 /* bytes of the server's hello flight held (its ServerHello, or an alert) */

#define KEPT_HEAD 128 /* first bytes of a request kept by the kernel: its request line and first headers */
#define TP_VALUE 55    /* a W3C traceparent value: "00-" + 32 + "-" + 16 + "-" + 2 */
#define TP_CONTEXT 192 /* a request's bytes from its traceparent's value on: it, and the tracestate line that
                        * propagators write right after it */


/* Linux TCP states, as in include/net/tcp_states.h (stable ABI: exposed by /proc/net/tcp). */
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_FIN_WAIT1 4
#define TCP_FIN_WAIT2 5
#define TCP_TIME_WAIT 6
#define TCP_CLOSE 7
#define TCP_CLOSE_WAIT 8
#define TCP_LAST_ACK 9
#define TCP_LISTEN 10
#define TCP_CLOSING 11

#define MSG_PEEK_FLAG 2 /* MSG_PEEK from sys/socket.h */
#define DATA_FLAG_PEEK 1
/* HTTP/2 connection: `data` is the condensed framing of the `ret` bytes moved (preface, frame headers,
 * non-DATA payloads; DATA payloads left out but a padded one's pad length), not their first bytes. */
#define DATA_FLAG_H2_FRAMES 2
/* TLS plaintext (uprobes.bpf.h, UPROBES builds): `data` is what SSL_read returned or SSL_write took on this
 * connection, not bytes of a syscall; `ret` is that call's return value and `syscall` is 0. */
#define DATA_FLAG_TLS_PLAINTEXT 4

struct event_header {
    __u64 ts_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC, converted to wall clock only at export */
    __u32 kind;  /* enum event_kind */
    __u32 tgid;  /* process of the current task (softirq context: whichever task was interrupted) */
    __u32 tid;   /* thread of the current task */
    __u32 round; /* the thread's epoll wake-round number (epoll_wait returns seen so far), 0 if none */
};

struct accept_event {
    struct event_header hdr;
    __s32 fd;                /* the new connection's fd */
    __s32 listen_fd;         /* the listening fd it was accepted from */
    __u16 family;            /* AF_INET / AF_INET6 of the peer address, 0 if it could not be read */
    __u16 peer_port;         /* host byte order */
    __u16 local_family;      /* of local_addr; 0: its handshake's completion was not seen */
    __u16 _pad0;
    __u8 peer_addr[ADDR_LEN]; /* IPv4 in the first 4 bytes */
    char comm[COMM_LEN];     /* the accepting thread's name, e.g. "wrk:worker_0" */
    /* Its TCP handshake's completion, as the kernel kept it for the accept (SAMPLING builds; 0: not seen):
     * when, and the local address the peer reached. A traced connection of a listener sampled whole sends
     * no ESTABLISHED record (sockets.bpf.h): these stand for it. */
    __u64 established_ns;
    __u8 local_addr[ADDR_LEN];
};

struct connect_event {
    struct event_header hdr;
    __s32 fd;
    __s32 ret;               /* 0, or -errno (-EINPROGRESS for a non-blocking connect) */
    __u16 family;
    __u16 peer_port;
    __u32 _pad0;
    __u8 peer_addr[ADDR_LEN];
    char comm[COMM_LEN];
};

struct close_event {
    struct event_header hdr;
    __s32 fd;
    __u32 role;       /* enum conn_role */
    __u64 open_ts_ns; /* accept/connect time of this fd */
    __u64 bytes_rx;   /* bytes read (MSG_PEEK excluded) */
    __u64 bytes_tx;   /* bytes written */
    __u32 reads;      /* read-family calls that returned data */
    __u32 writes;     /* write-family calls that sent data */
    /* TLS connections (first byte read 0x16): record framing walked in the kernel, per direction. */
    __u32 tls_records_rx;     /* complete record headers read */
    __u32 tls_records_tx;     /* complete record headers written */
    __u32 tls_app_records_rx; /* of which application_data (content type 23) */
    __u32 tls_app_records_tx;
    __u32 tls_max_record_rx;  /* largest record body (bytes after the 5-byte header) */
    __u32 tls_max_record_tx;
    __u32 tls_flags;          /* TLS_FRAMING_* below */
    __u8 sampled_out;         /* 1: decided whole and not traced after its accept was sent (HTTP/2 with prior
                               * knowledge or not HTTP, at its first transfer): no transfer of it was reported */
    __u8 kept;                /* a sampled_out one kept all the same: enum connection_keep_reason (a reset, a
                               * slow accept); 0: not kept */
    __u16 _pad_kept;
    /* What happened to the fd before its first real I/O, kept in its state instead of a record each: its
     * epoll_ctl ADDs (the listener filters register it once to wait for its first bytes; a second ADD,
     * after a DEL, is the hand-off to the filter chain) and the options Envoy set on it. */
    __u64 epoll_first_add_ns;  /* 0: none */
    __u64 epoll_second_add_ns; /* 0: none */
    __u32 epoll_adds;          /* ADDs before the first real I/O (the first two timed) */
    __u32 sockopt_count;       /* setsockopt calls on the fd (the first SOCKOPTS_KEPT in sockopts) */
    __u8 sockopts[SOCKOPT_BYTES]; /* SOCKOPTS_KEPT x (level, optname, value): 3 x __s32 each */
    /* A traced connection decided whole: what softirq learned before its close, instead of a record each
     * (conn_sampling.bpf.h close_facts); 0: nothing, or sent as its own record (EV_SOCK_STATE, EV_TCP). */
    __u64 peer_fin_ns; /* CLOSE_WAIT: the peer's FIN arrived */
    __u64 reset_rx_ns; /* the first reset received (tcp:tcp_receive_reset) */
};

#define TLS_FRAMING_LOST_RX 1 /* a read did not parse as TLS records (or had too many): counting stopped */
#define TLS_FRAMING_LOST_TX 2
#define TLS_FRAMING_SEEN 4    /* the connection was walked as TLS */

struct data_event {
    struct event_header hdr;
    __s32 fd;
    __u8 direction; /* enum io_direction */
    __u8 syscall;   /* enum io_syscall */
    __u8 flags;     /* DATA_FLAG_PEEK, DATA_FLAG_H2_FRAMES */
    __u8 role;      /* enum conn_role */
    __s64 ret;      /* bytes transferred, 0 at EOF, or -errno */
    __u32 msg_seq;  /* index of this data event on the connection */
    /* A read of just a TLS record header (BoringSSL reads a record's 5-byte header, then its body) is not
     * sent on its own: it rides on the connection's next read record. `held` is how many bytes it read
     * (0 or 5; included in `ret` when this read returned bytes), `held_captured` how many of them are in
     * `held_data` (0 past the handshake, when reads carry no bytes). They come before `data`. */
    __u8 held;
    __u8 held_captured;
    __u8 _pad0[2];
    __u8 held_data[8];
    __u32 captured; /* bytes of `data` that follow (the record is cut right after them) */
    __u8 data[CAPTURE_MAX];
};

struct sock_state_event {
    struct event_header hdr;
    __u64 skaddr; /* kernel socket address: an opaque id that ties transitions of one socket together */
    __s32 oldstate;
    __s32 newstate;
    __u16 sport; /* host byte order */
    __u16 dport;
    __u16 family;
    __u16 _pad0;
    __u8 saddr[ADDR_LEN];
    __u8 daddr[ADDR_LEN];
};

struct tcp_event {
    struct event_header hdr;
    __u64 skaddr;
    __u32 type;  /* enum tcp_event_type */
    __s32 state; /* TCP state of the socket when it happened (0 when the tracepoint has none) */
    __u16 sport; /* host byte order */
    __u16 dport;
    __u16 family;
    __u16 _pad0;
    __u8 saddr[ADDR_LEN];
    __u8 daddr[ADDR_LEN];
};

struct listen_event {
    struct event_header hdr;
    __s32 fd;
    __s32 backlog;
};

/* hdr.ts_ns: back on CPU; hdr.round: the event-loop round the wait interrupted (0: outside a round). */
struct offcpu_event {
    struct event_header hdr;
    __u64 start_ns;       /* switched out */
    __u64 runnable_ns;    /* became runnable (woken, or preempted) until back on CPU: the run-queue delay */
    __s64 prev_state;     /* sched_switch prev_state */
    __u32 reason;         /* enum offcpu_reason */
    __s32 syscall;        /* x86-64 syscall number it blocked in (saved orig_ax), -1 outside one */
    __s32 kstack_id;      /* its kernel stack in `stacks` (negative: not captured) */
    __s32 ustack_id;      /* its user stack in `stacks` */
    __s32 waker_kstack_id; /* the waker's kernel stack (voluntary waits) */
    __u32 other_pid;      /* voluntary: the waker's thread; preempted: the task that took the CPU */
    __u32 other_tgid;     /* the waker's process (0 for preemption: sched_switch names only the thread) */
    __u32 cpu;            /* CPU it ran on before the wait */
    char other_comm[COMM_LEN];
};

/* One event-loop round of a target thread: epoll_wait returned (start) -> the next epoll_wait call
 * (hdr.ts_ns). hdr.round is its number, as in the data events of the fds it handled. */
struct round_event {
    struct event_header hdr;
    __u64 start_ns;
    __u64 offcpu_ns;   /* off CPU inside the round (all waits, any length) */
    __u64 runnable_ns; /* of which runnable but waiting for a CPU */
    __u32 ready;       /* fds epoll_wait returned */
    __u32 waits;       /* off-CPU waits inside the round */
    __u32 cpu;
    __s32 waker_kstack_id; /* who ended the idle wait before the round (kernel stack); -1: not taken */
    __u64 idle_ns;     /* asleep in the epoll_wait that started the round (0: it returned at once) */
    __u32 waker_pid;   /* the waker's thread and process, for an idle wait >= OFFCPU_MIN_NS */
    __u32 waker_tgid;
    char waker_comm[COMM_LEN];
};


/* A plaintext HTTP/1.x request reported as one record (http_metrics.bpf.h): a sampled one (request
 * summaries, the default: its reads and writes send nothing), or one not sampled but kept. What the kernel
 * knows of it, with its first bytes and its traceparent; the ring record is sent when its response begins
 * (or its connection closes). */
struct request_kept_event {
    struct event_header hdr; /* ts_ns: the answer's first write, or the close */
    __u64 start_ns;          /* the request's first read */
    __s32 fd;
    __s32 listen_fd;
    __u16 status;            /* 0: no answer */
    __u8 method;             /* enum http_method */
    __u8 reason;             /* enum keep_reason; 0 for a sampled request that is nothing else */
    __u32 head_len;          /* bytes of head that are the request's */
    __u8 head[KEPT_HEAD];
    __u8 sampled;            /* 1: the sampler chose it (a request summary), 0: kept for `reason` */
    __u8 context_len;        /* bytes of context: 0 when the kernel found no valid traceparent */
    __u8 context[TP_CONTEXT]; /* from the traceparent's value on: TP_VALUE bytes, maybe "\r\ntracestate: ..." */
    __u8 _pad[6];
};

/* How a target set up a socket it may listen on (startup.bpf.h): bind, SO_REUSEPORT, dup, the epoll
 * registration that tells which thread accepts on it, close. listen() itself is struct listen_event. */
struct socket_setup_event {
    struct event_header hdr;
    __s32 fd;        /* the socket (SETUP_DUP: the new fd) */
    __s32 other_fd;  /* SETUP_DUP: the fd copied; SETUP_WATCH: the epoll fd; -1 otherwise */
    __s32 result;    /* SETUP_BIND, SETUP_DUP: 0 or -errno; SETUP_REUSEPORT: the option's value */
    __u16 op;        /* enum setup_op */
    __u16 family;    /* AF_INET / AF_INET6 of the bound address (0: not known) */
    __u16 port;      /* host byte order */
    __u16 _pad0;
    __u32 _pad1;
    __u8 addr[ADDR_LEN];
    char comm[COMM_LEN]; /* the calling thread's name, e.g. "wrk:worker_0" */
};

/* The handshake bytes the kernel holds of a TLS connection it does not trace (the held_handshakes map's
 * value, from its first TLS bytes to its close), sent if the connection is kept: what a traced connection's
 * data records would have carried of its ClientHello (a listener filter's peek, else its first reads) and of
 * the server's hello flight. */
struct held_handshake {
    __u64 hello_ns;   /* the read (or peek) that held the ClientHello; 0: none */
    __u64 flight_ns;  /* the server's hello flight's write; 0: none */
    __u32 hello_ret;  /* bytes that read returned (more than hello_len: the rest was not held) */
    __u32 hello_len;  /* bytes of hello held */
    __u32 flight_ret; /* bytes that write sent */
    __u32 flight_len; /* bytes of flight held */
    __u8 hello_peeked; /* 1: hello is a listener filter's peek */
    __u8 _pad0[7];
    __u8 hello[HELLO_HELD];
    __u8 flight[FLIGHT_HELD];
};

/* A downstream connection sampled whole and not traced (CONN_UNTRACED: no record of it was sent), kept at
 * its close for `reason`: what its accept, its handshake's records and its close would have said. */
struct connection_kept_event {
    struct event_header hdr;  /* ts_ns: the close; tid: the closing thread */
    __s32 fd;
    __s32 listen_fd;
    __u16 family;             /* of the peer address (0: not known) */
    __u16 peer_port;
    __u8 reason;              /* enum connection_keep_reason */
    __u8 hs_state;            /* enum tls_hs_state at the close (tls_metrics.bpf.h); 0: no byte read */
    __u8 hs_resumed;          /* the ServerHello resumed a session */
    __u8 close_flags;         /* KEPT_PEER_EOF, KEPT_IO_RESET */
    __u8 peer_addr[ADDR_LEN];
    char comm[COMM_LEN];      /* the closing thread's name */
    __u64 open_ts_ns;         /* the accept */
    __u64 established_ns;     /* its TCP handshake's completion (accept-queue wait from there); 0: not seen */
    __u64 hs_start_ns;        /* its TLS handshake's first bytes; 0: none */
    __u64 hs_end_ns;          /* its TLS handshake's completion; 0: not complete */
    __u16 hs_version;         /* what the ServerHello chose; 0: none seen */
    __u16 _pad0;
    __u32 _pad1;
    /* as in struct close_event */
    __u64 bytes_rx;
    __u64 bytes_tx;
    __u32 reads;
    __u32 writes;
    __u32 tls_records_rx;
    __u32 tls_records_tx;
    __u32 tls_app_records_rx;
    __u32 tls_app_records_tx;
    __u32 tls_max_record_rx;
    __u32 tls_max_record_tx;
    __u32 tls_flags;
    __u32 epoll_adds;
    __u64 epoll_first_add_ns;
    __u64 epoll_second_add_ns;
    __u32 sockopt_count;
    __u32 _pad2;
    __u8 sockopts[SOCKOPT_BYTES];
    struct held_handshake held; /* all zero when nothing was held (evicted from the table, or not TLS) */
};

#define KEPT_PEER_EOF 1 /* connection_kept_event.close_flags: a read returned EOF before the close */
#define KEPT_IO_RESET 2 /* a read or write failed with a reset */
#define KEPT_OPEN 4     /* a traced TLS connection's handshake summary at the handshake's end: it stays open, and its
                         * later transfers and its close are reported as a traced connection's */

/* A bound socket of a target (the bound_fds map's value): its address, for the records of its copies. */
struct bound_socket {
    __u16 family;
    __u16 port;
    __u32 _pad0;
    __u8 addr[ADDR_LEN];
};

/* A process that started (EV_EXEC: its comm is the followed one) or ended (EV_EXIT: its last thread). */
struct process_event {
    struct event_header hdr; /* tgid: the process; ts_ns: the exec, or the last thread's exit */
    __u32 old_pid;           /* EV_EXEC: the pid before exec (differs when a non-leader thread exec'd) */
    __u32 _pad0;
    char comm[COMM_LEN];
};

/* The comm followed (the followed_comm map's value): a process that execs into it becomes a target. */
struct followed_comm {
    char comm[COMM_LEN]; /* NUL-padded; all zero: none followed */
};

#endif /* OTEL_ENVOY_EVENTS_H */
