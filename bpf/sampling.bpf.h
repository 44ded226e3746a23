/* sampling.bpf.h: head sampling of plaintext HTTP/1.x requests, decided in the kernel (SAMPLING builds).
 *
 * A request whose first read is not sampled costs no ring record: neither its reads nor the writes of its
 * response are reported (their bytes and calls are still counted on the connection). Request boundaries
 * come from the direction of the transfers: on a downstream connection a read that follows a write (or
 * the connection's start) begins a request, and a write answers it. So the kernel only changes its
 * decision between exchanges, and user space always sees whole exchanges. Pipelined requests read before
 * their response share the decision of the first.
 *
 * Not decided here: upstream connections (the kernel cannot tell which downstream request an upstream one
 * serves; user space drops the upstream requests it cannot attribute to a traced request), TLS
 * connections (their requests are encrypted), HTTP/2 (streams share one connection), and the first read
 * of a connection, which is always reported (it tells TLS, HTTP/2 and HTTP/1.x apart).
 *
 * The decision is a program of its own on raw_syscalls:sys_exit, attached before io_sys_exit (io.bpf.h),
 * which is unchanged: any branch added to it puts it over the verifier's 1M-instruction budget. A transfer
 * not to report gets a capture budget of 0 for that transfer only (CONN_SUSPENDED), so io_sys_exit counts
 * its bytes and sends nothing; the next transfer's decision restores the budget first.
 */

BPF_ARRAY(sample_threshold, __u64, 1);     /* a request is sampled when a 32-bit random number is below it */
BPF_PERCPU_ARRAY(sample_counts, __u64, 2); /* downstream requests: [0] sampled, [1] not sampled */

static __always_inline void count_sampled(__u32 skipped) {
    __u64 *v = sample_counts.lookup(&skipped);
    if (v)
        (*v)++;
}

/* The request decision for one transfer of a plaintext HTTP/1.x downstream connection: 1 when it is not
 * reported. */
static __always_inline __u32 skip_transfer(struct conn_state *cs, __u32 flags, __u8 is_write) {
    if (is_write) { /* the answer */
        cs->flags = flags & ~CONN_AWAIT;
        return (flags & CONN_SKIP) ? 1 : 0;
    }
    if (flags & CONN_AWAIT) /* the same request goes on */
        return (flags & CONN_SKIP) ? 1 : 0;
    __u32 zero = 0; /* a new request */
    __u64 *threshold = sample_threshold.lookup(&zero);
    __u32 skip = threshold && (__u64)bpf_get_prandom_u32() >= *threshold;
    count_sampled(skip);
    cs->flags = (flags & ~CONN_SKIP) | CONN_AWAIT | (skip ? CONN_SKIP : 0);
    return skip;
}

int sample_sys_exit(struct bpf_raw_tracepoint_args *ctx) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long ret = (long)ctx->args[1];
    long nr = -1;
    bpf_probe_read_kernel(&nr, sizeof(nr), &regs->orig_ax);
    __u8 io = io_syscall(nr);
    if (!io)
        return 0;
    if (ret == -11 /* EAGAIN: io_sys_exit returns before looking */)
        return 0;
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u64 key = conn_key(pid_tgid >> 32, (__s32)syscall_arg(regs, 0));
    struct conn_state *cs = conns.lookup(&key);
    if (!cs)
        return 0;
    __u32 flags = cs->flags;
    if (flags & CONN_SUSPENDED) { /* the previous transfer was not reported: the budget comes back */
        flags &= ~CONN_SUSPENDED;
        cs->flags = flags;
        cs->capture_budget = CAPTURE_UNLIMITED;
    }
    if (ret <= 0 || (io_recv_flags(io, regs) & MSG_PEEK_FLAG) || (flags & (CONN_TLS | CONN_H2)) ||
        cs->role != ROLE_DOWNSTREAM || cs->capture_budget != CAPTURE_UNLIMITED)
        return 0;
    if (skip_transfer(cs, flags, io >= IO_WRITE)) {
        cs->flags |= CONN_SUSPENDED;
        cs->capture_budget = 0; /* io_sys_exit: counted on the connection, not reported */
    }
    return 0;
}
