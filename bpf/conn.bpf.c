/* conn.bpf.c: connection lifecycle of Envoy processes, from syscall, TCP and scheduler tracepoints only.
 *
 * Hooks (all tracepoints; this kernel has no kprobes/fentry), by unit:
 *   io.bpf.h       raw_syscalls:sys_exit (a raw tracepoint): the hot path, i.e. read/readv/recvfrom/recvmsg,
 *                  write/writev/sendto/sendmsg and the exits of epoll_wait/epoll_pwait/epoll_pwait2. A raw
 *                  tracepoint hands the program the registers instead of building a perf record per call,
 *                  which makes each traced syscall markedly cheaper than a syscalls:sys_exit_* program;
 *   syscalls.bpf.h syscalls: accept/accept4, connect, close, listen, epoll_ctl, setsockopt (once or a
 *                  few times per connection: the per-syscall tracepoints' convenience costs nothing that
 *                  matters); in SAMPLING builds the exits of accept/accept4 and connect come from
 *                  raw_syscalls:sys_exit instead (sampling.bpf.h), so no syscalls:sys_exit_* is enabled,
 *                  and so does a successful epoll_ctl ADD (epoll_ctl is called around requests: its MODs
 *                  then cost no program run);
 *   startup.bpf.h  sched:sched_process_exec / sched_process_exit (targets that start and end) and bind, dup*,
 *                  fcntl(F_DUPFD*) of targets (how their listening sockets are set up);
 *   sched.bpf.h    syscalls: the entries of epoll_wait/epoll_pwait/epoll_pwait2; sched:sched_switch and
 *                  sched:sched_waking as raw tracepoints (OFFCPU builds);
 *   sockets.bpf.h  sock:inet_sock_set_state, tcp:tcp_retransmit_skb, tcp:tcp_receive_reset and
 *                  tcp:tcp_retransmit_synack (raw tracepoints), tcp:tcp_send_reset;
 *   uprobes.bpf.h  (UPROBES builds only) uprobes on SSL_read/SSL_write/SSL_do_handshake of the traced binary
 *                  and the entries of the read/write-family syscalls: TLS plaintext.
 * state.bpf.h holds what they share (per-connection and per-thread state, the shared maps and helpers);
 * tls.bpf.h and http2.bpf.h the walks of TLS records and HTTP/2 frames through the bytes a read/write moved.
 * The loader splices the units into this file's text (probes/loader.py program_text): bcc rewrites map calls
 * and tracepoint arguments only in its main file. events.h is the one definition of the records user space
 * reads.
 * Filtering happens here, not in user space: syscalls only for tgids in `targets` (the daemon itself is
 * never a target, so its own OTLP traffic is invisible), fd-level events only for fds in `conns`
 * (connections the target accepted or connected), TCP events only for ports in `listen_ports` (they fire
 * in softirq context of *other* processes) or sockets a target connected (`upstream_socks`).
 * Cost: the raw syscall program runs for every syscall of every process on the machine: other syscalls pay
 * a switch on the syscall number, other processes' reads and writes one register read and one hash lookup.
 * Per connection, only the first CAPTURE_MSGS_DEFAULT reads/writes carry bytes (up to CAPTURE_MAX each);
 * after that I/O is only counted in `conns` and reported once at close. Plaintext connections (HTTP) carry
 * bytes on every read and write when HTTP_CAPTURE is set; TLS ones stop at the first application data.
 * HTTP/2 connections (prior knowledge) carry their frame headers and non-DATA payloads instead (capture_h2).
 * Never dereference kernel structs here: headers are 6.1, the kernel is newer. Tracepoint fields only, or
 * (raw tracepoints) bytes at offsets the loader read from the running kernel's BTF (probes/btf.py).
 */
#include <uapi/linux/ptrace.h>
#include <linux/socket.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/uio.h>
#include <linux/signal.h> /* sigset_t, in the epoll_pwait tracepoints' arguments */
#include "events.h"

/* Build options: the loader passes each as -D (ProbeConfig.cflags); these defaults are for reading alone. */
#ifndef MAX_CONNS
#define MAX_CONNS 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 4096 /* 16 MiB */
#endif
#ifndef HTTP_CAPTURE
#define HTTP_CAPTURE 1 /* 0: plaintext connections get the same capture budget as TLS ones */
#endif
#ifndef OFFCPU
#define OFFCPU 1 /* 0: no scheduler probes (no off-CPU waits, no round events) */
#endif
#ifndef OFFCPU_MIN_NS
#define OFFCPU_MIN_NS 1000000ULL /* waits at least this long become EV_OFFCPU records */
#endif
#ifndef ROUND_MIN_NS
#define ROUND_MIN_NS 10000000ULL /* rounds at least this long (or holding such a wait) become EV_ROUND */
#endif
/* HTTP/2 condensed capture (capture_h2): walk steps per syscall (a step copies one run of bytes up to the
 * end of a buffer, a frame header or a payload, skips one DATA payload, or moves to the next iovec: two or
 * three per frame, so ~200 frames) and iovecs followed. A syscall needing more, or more than CAPTURE_MAX
 * condensed bytes, loses the framing. The verifier walks every step of the loop: ~300 instructions each,
 * so 512 steps cost ~150k of its 1M-instruction budget for sys_exit (which is ~900k in all). */
#ifndef SAMPLING
#define SAMPLING 0 /* 1: head sampling and exact metrics of plaintext HTTP/1.x requests (sampling.bpf.h) */
#endif
#ifndef H2_WALK_MAX
#define H2_WALK_MAX 512
#endif
#ifndef UPROBES
#define UPROBES 0 /* 1: the traced binary has SSL_read/SSL_write symbols: TLS plaintext (uprobes.bpf.h) */
#endif

#include "state.bpf.h"
#if SAMPLING
#include "http_metrics.bpf.h"
#include "tls_metrics.bpf.h"
#include "conn_sampling.bpf.h"
#include "conn_keep.bpf.h"
#endif
#include "sockets.bpf.h"
#include "syscalls.bpf.h"
#include "startup.bpf.h"
#include "sched.bpf.h"
#include "tls.bpf.h"
#include "http2.bpf.h"
#include "io.bpf.h"
#if SAMPLING
#include "traceparent.bpf.h"
#include "tls_handshake.bpf.h"
#include "sampling.bpf.h"
#endif
#if UPROBES
#include "uprobes.bpf.h"
#endif
