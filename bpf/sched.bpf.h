/* sched.bpf.h: the event loop's rounds and the off-CPU waits of the targets' threads. A round runs from an
 * epoll_wait return to the thread's next epoll_wait call; sched_switch and sched_waking (OFFCPU builds)
 * account every wait by reason, aggregate them in the kernel, and send the long ones and the rounds that
 * held them.
 */
#define TASK_REPORT_MAX 0x100 /* sched_switch prev_state bit for a preempted task ("R+") */
#define STACK_ENTRIES 16384

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

/* ---------------------------------------------------------------- wake rounds */

static __always_inline int on_epoll_wait_exit(long ret, __u64 pid_tgid) {
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

/* epoll_wait's entry through its own tracepoints: a raw sys_enter program would run on every syscall of
 * every process (Envoy's reads and writes included) only to find most of them uninteresting. */
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_wait) { return on_epoll_wait_enter(); }
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_pwait) { return on_epoll_wait_enter(); }
TRACEPOINT_PROBE(syscalls, sys_enter_epoll_pwait2) { return on_epoll_wait_enter(); }

/* ---------------------------------------------------------------- off-CPU waits */

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

#if OFFCPU
/* sched_switch and sched_waking are raw tracepoints: a classic tracepoint program is skipped when it fires
 * while another BPF program runs on the CPU (sched_waking fires from interrupts that can land in our syscall
 * programs), and a skipped switch or wake-up would corrupt a wait's accounting. They get task pointers; the
 * fields are read at the offsets the loader found in the running kernel's BTF (TASK_PID_OFF, TASK_COMM_OFF). */
#ifndef TASK_PID_OFF /* defaults for reading alone */
#define TASK_PID_OFF 1264
#define TASK_COMM_OFF 1752
#endif
#define TASK_REPORT_IDLE 0x80

static __always_inline __u32 task_pid(const void *task) {
    __u32 pid = 0;
    bpf_probe_read_kernel(&pid, sizeof(pid), (const __u8 *)task + TASK_PID_OFF);
    return pid;
}

/* sched_switch's prev_state as the classic tracepoint reports it: TASK_REPORT_MAX when preempted, else the
 * highest TASK_REPORT bit of the state (TASK_REPORT_IDLE for TASK_IDLE), 0 for a runnable task. */
static __always_inline long switch_state(__u64 preempt, __u32 prev_state) {
    if (preempt)
        return TASK_REPORT_MAX;
    if (prev_state == 0x402 /* TASK_IDLE */)
        return TASK_REPORT_IDLE;
    __u32 s = prev_state & 0x7f; /* TASK_REPORT */
    __u32 top = 0;
#pragma unroll
    for (int i = 6; i >= 0; i--) {
        if ((s >> i) & 1) {
            top = 1u << i;
            break;
        }
    }
    return top;
}

RAW_TRACEPOINT_PROBE(sched_switch) {
    /* TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next, unsigned int prev_state) */
    const void *prev_task = (const void *)ctx->args[1];
    const void *next_task = (const void *)ctx->args[2];
    __u64 now = 0;
    __u32 prev = task_pid(prev_task);
    struct thread_state *t = threads.lookup(&prev);
    if (t && prev != 0) { /* a target thread leaves the CPU */
        now = bpf_ktime_get_ns();
        long state = switch_state(ctx->args[0], (__u32)ctx->args[3]);
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
            t->other_pid = task_pid(next_task);
            bpf_probe_read_kernel(&t->other_comm, sizeof(t->other_comm), (const __u8 *)next_task + TASK_COMM_OFF);
        } else {
            t->runnable_ns = 0;
            t->other_pid = 0;
            t->other_comm[0] = 0;
        }
        if (reason != OFFCPU_IDLE) { /* idle waits are only aggregated: no stacks of the sleeper */
            t->kstack_id = stacks.get_stackid(ctx, 0);
            t->ustack_id = stacks.get_stackid(ctx, BPF_F_USER_STACK);
        } else {
            t->kstack_id = -1;
            t->ustack_id = -1;
        }
    }
    __u32 next = task_pid(next_task);
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

RAW_TRACEPOINT_PROBE(sched_waking) {
    /* TP_PROTO(struct task_struct *p) */
    __u32 pid = task_pid((const void *)ctx->args[0]);
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
    t->waker_kstack_id = stacks.get_stackid(ctx, 0);
    t->waker_taken = 1;
    return 0;
}
#endif
