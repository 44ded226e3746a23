/* startup.bpf.h: processes that become targets or stop being ones, and how a target sets up the sockets it
 * listens on (the startup trace: spans/startup_spans.py).
 *
 *   sched:sched_process_exec  a process whose new comm is the followed one (`followed_comm`, set by user
 *                             space) becomes a target here, before its first instruction, so its startup is
 *                             seen whole: EV_EXEC. Any exec drops the thread's old state.
 *   sched:sched_process_exit  every exiting thread's state is dropped; a target's last thread (group_dead)
 *                             removes it from `targets`: EV_EXIT.
 *   bind / dup / dup2 / dup3 / fcntl(F_DUPFD, F_DUPFD_CLOEXEC) of a target: the enter keeps the arguments in
 *                             `setup_inflight`, the exit reports the bind of an inet socket, and a copy of a
 *                             bound one, as EV_SOCKET_SETUP. Their exits come from front_sys_exit's tail call
 *                             in SAMPLING builds (no syscalls:sys_exit_* is enabled there), else from the
 *                             syscalls:sys_exit_* tracepoints.
 * syscalls.bpf.h reports the rest of a bound socket's setup: SO_REUSEPORT, the epoll registration by the
 * thread that will accept on it, its close; listen() is EV_LISTEN, and makes a socket the target never
 * bound (received from another process: an Envoy hot restart's parent epoch) a followed one, its address
 * unknown. All of these are rare (startup and listener changes): a few hundred records per Envoy start.
 */
#define NR_DUP 32
#define NR_DUP2 33
#define NR_BIND 49
#define NR_FCNTL 72
#define NR_DUP3 292
#define F_DUPFD_CMD 0
#define F_DUPFD_CLOEXEC_CMD 1030

struct setup_inflight_t {
    __u64 uaddr; /* bind: the user's sockaddr */
    __u32 len;   /* bind: its length */
    __s32 fd;    /* bind: the socket; a copy: the fd copied */
    __u32 op;    /* SETUP_BIND or SETUP_DUP */
    __u32 _pad;
};
BPF_ARRAY(followed_comm, struct followed_comm, 1);
BPF_HASH(setup_inflight, __u32, struct setup_inflight_t, 1024); /* by thread */

TRACEPOINT_PROBE(sched, sched_process_exec) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    threads.delete(&tid); /* whatever the thread was before, its state is not the new program's */
    __u32 zero = 0;
    struct followed_comm *want = followed_comm.lookup(&zero);
    if (!want || !want->comm[0])
        return 0;
    struct process_event ev = {};
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
#pragma unroll
    for (int i = 0; i < COMM_LEN; i++) {
        if (ev.comm[i] != want->comm[i])
            return 0;
        if (!ev.comm[i])
            break;
    }
    __u32 tgid = pid_tgid >> 32;
    __u8 one = 1;
    targets.update(&tgid, &one);
    __u32 bit = tgid & (TARGET_BITS - 1);
    target_bits.update(&bit, &one);
    fill_header(&ev.hdr, EV_EXEC, pid_tgid);
    ev.old_pid = args->old_pid;
    emit(&ev, sizeof(ev));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    __u32 tgid = pid_tgid >> 32;
    threads.delete(&tid); /* a reused tid must not inherit this thread's state */
    setup_inflight.delete(&tid);
    if (!args->group_dead || !is_target(tgid))
        return 0;
    targets.delete(&tgid); /* target_bits stays: a stale bit only costs the hash lookup behind it */
    struct process_event ev = {};
    fill_header_of(&ev.hdr, EV_EXIT, pid_tgid, 0);
    bpf_get_current_comm(&ev.comm, sizeof(ev.comm));
    emit(&ev, sizeof(ev));
    return 0;
}

/* ---------------------------------------------------------------- bind and copies of bound sockets */

TRACEPOINT_PROBE(syscalls, sys_enter_bind) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!maybe_target(pid_tgid >> 32) || !is_target(pid_tgid >> 32))
        return 0;
    struct setup_inflight_t in = {};
    in.uaddr = (__u64)args->umyaddr;
    in.len = (__u32)args->addrlen;
    in.fd = (__s32)args->fd;
    in.op = SETUP_BIND;
    __u32 tid = (__u32)pid_tgid;
    if (setup_inflight.update(&tid, &in) != 0)
        count_drop(DROP_INFLIGHT_FULL);
    return 0;
}

/* A copy of `fd` is being made: remembered only when fd is a bound socket of a target. */
static __always_inline int on_dup_enter(__s32 fd) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!maybe_target(pid_tgid >> 32))
        return 0;
    __u64 key = conn_key(pid_tgid >> 32, fd);
    if (!bound_fds.lookup(&key))
        return 0;
    struct setup_inflight_t in = {};
    in.fd = fd;
    in.op = SETUP_DUP;
    __u32 tid = (__u32)pid_tgid;
    if (setup_inflight.update(&tid, &in) != 0)
        count_drop(DROP_INFLIGHT_FULL);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_dup) { return on_dup_enter((__s32)args->fildes); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup2) { return on_dup_enter((__s32)args->oldfd); }
TRACEPOINT_PROBE(syscalls, sys_enter_dup3) { return on_dup_enter((__s32)args->oldfd); }
TRACEPOINT_PROBE(syscalls, sys_enter_fcntl) {
    if (args->cmd != F_DUPFD_CMD && args->cmd != F_DUPFD_CLOEXEC_CMD)
        return 0;
    return on_dup_enter((__s32)args->fd);
}

/* The exit of a bind or a copy kept by its enter. */
static __always_inline int on_setup_exit(long ret) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    struct setup_inflight_t *pending = setup_inflight.lookup(&tid);
    if (!pending)
        return 0;
    struct setup_inflight_t in = *pending;
    setup_inflight.delete(&tid);
    __u32 tgid = pid_tgid >> 32;
    struct bound_socket s = {};
    if (in.op == SETUP_BIND) {
        if (read_sockaddr((const void *)in.uaddr, in.len, &s.family, &s.port, s.addr) != 0)
            return 0; /* not an inet socket (Envoy binds unix sockets for hot restart) */
        if (ret == 0) {
            __u64 key = conn_key(tgid, in.fd);
            bound_fds.update(&key, &s);
        }
        emit_setup(pid_tgid, SETUP_BIND, in.fd, -1, (__s32)ret, &s);
        return 0;
    }
    __u64 old_key = conn_key(tgid, in.fd);
    struct bound_socket *orig = bound_fds.lookup(&old_key);
    if (!orig)
        return 0;
    s = *orig;
    if (ret >= 0) {
        __u64 key = conn_key(tgid, (__s32)ret);
        bound_fds.update(&key, &s);
    }
    emit_setup(pid_tgid, SETUP_DUP, ret >= 0 ? (__s32)ret : -1, in.fd, ret >= 0 ? 0 : (__s32)ret, &s);
    return 0;
}

#if SAMPLING
/* tail-called by front_sys_exit (sampling.bpf.h) for a target's bind, dup, dup2, dup3 and fcntl(F_DUPFD*) */
int setup_sys_exit(struct bpf_raw_tracepoint_args *ctx) { return on_setup_exit((long)ctx->args[1]); }
#else
TRACEPOINT_PROBE(syscalls, sys_exit_bind) { return on_setup_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup) { return on_setup_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup2) { return on_setup_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_dup3) { return on_setup_exit(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_fcntl) { return on_setup_exit(args->ret); }
#endif
