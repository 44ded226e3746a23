/* uprobes.bpf.h (UPROBES builds): the plaintext of TLS connections, from uprobes on the SSL library the
 * traced binary carries (BoringSSL is linked statically into Envoy: SSL_read, SSL_write, SSL_do_handshake
 * are plain C symbols of its .symtab, or of a --symbols debug file matched by build-id).
 *
 * Hooks: uprobes on the entry of SSL_read / SSL_write / SSL_do_handshake and uretprobes on the return of
 * SSL_read / SSL_write (attached by probes/loader.py at the addresses probes/uprobe_symbols.py found), and
 * the entries of the read- and write-family syscalls (syscalls:sys_enter_*).
 * How the fd is learned: an SSL object does not name its socket in any way a probe can read without
 * knowing the library's struct layout. But the library's BIO does the socket reads and writes itself, on
 * the calling thread, inside SSL_read / SSL_write / SSL_do_handshake (Envoy's io_handle BIO: readv and
 * writev on the connection's fd). So an entry saves (ssl, buf) in `ssl_calls` for the thread; a socket
 * syscall entered while the thread is inside such a call names the fd, remembered per SSL object in
 * `ssl_fds` for the calls that need no syscall (a record BoringSSL had already read); the return sends what
 * the call returned, up to CAPTURE_MAX bytes of plaintext, as an EV_DATA record with
 * DATA_FLAG_TLS_PLAINTEXT on that fd, if the connection is traced (`conns`, not CONN_UNTRACED).
 * Cost: each SSL_read / SSL_write is a uprobe plus a uretprobe (two traps into the kernel; measured in
 * docs/overhead.md, bench/uprobe_cost.py), one hash update and delete, and a ring record when it moved
 * bytes. The syscall entries cost other processes one array lookup (target_bits), target threads outside
 * an SSL call one hash lookup.
 */

#define SSL_CALL_READ 1
#define SSL_CALL_WRITE 2
#define SSL_CALL_HANDSHAKE 3

/* The SSL call a thread is in (between a uprobe on entry and the uretprobe or the next entry). */
struct ssl_call {
    __u64 ssl; /* the SSL object (first argument) */
    __u64 buf; /* SSL_read's destination / SSL_write's source */
    __s32 fd;  /* the socket it was seen to use (-1: none yet) */
    __u32 kind; /* SSL_CALL_* */
};

/* An SSL object of one process: the key of its socket. */
struct ssl_key {
    __u64 ssl;
    __u32 tgid;
    __u32 _pad;
};

BPF_TABLE("lru_hash", __u32, struct ssl_call, ssl_calls, 16384);     /* thread -> the call it is in */
BPF_TABLE("lru_hash", struct ssl_key, __s32, ssl_fds, MAX_CONNS);   /* SSL object -> its socket's fd */
BPF_PERCPU_ARRAY(tls_plain_scratch, struct data_scratch_t, 1);      /* the record (too big for the stack) */

static __always_inline int ssl_enter(struct pt_regs *ctx, __u32 kind) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tgid = pid_tgid >> 32;
    if (!maybe_target(tgid) || !is_target(tgid))
        return 0;
    struct ssl_call call = {};
    call.ssl = PT_REGS_PARM1(ctx);
    call.buf = PT_REGS_PARM2(ctx);
    call.kind = kind;
    struct ssl_key key = {};
    key.ssl = call.ssl;
    key.tgid = tgid;
    __s32 *fd = ssl_fds.lookup(&key);
    call.fd = fd ? *fd : -1;
    __u32 tid = (__u32)pid_tgid;
    ssl_calls.update(&tid, &call);
    return 0;
}

int ssl_read_enter(struct pt_regs *ctx) { return ssl_enter(ctx, SSL_CALL_READ); }
int ssl_write_enter(struct pt_regs *ctx) { return ssl_enter(ctx, SSL_CALL_WRITE); }
int ssl_handshake_enter(struct pt_regs *ctx) { return ssl_enter(ctx, SSL_CALL_HANDSHAKE); }

/* A socket syscall entered: inside an SSL call, its fd is that SSL object's socket. */
static __always_inline int ssl_note_fd(__s32 fd) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    if (!maybe_target(pid_tgid >> 32))
        return 0;
    __u32 tid = (__u32)pid_tgid;
    struct ssl_call *call = ssl_calls.lookup(&tid);
    if (!call || call->fd == fd)
        return 0;
    call->fd = fd;
    struct ssl_key key = {};
    key.ssl = call->ssl;
    key.tgid = pid_tgid >> 32;
    ssl_fds.update(&key, &fd);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_read) { return ssl_note_fd((__s32)args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return ssl_note_fd((__s32)args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return ssl_note_fd((__s32)args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return ssl_note_fd((__s32)args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_write) { return ssl_note_fd((__s32)args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return ssl_note_fd((__s32)args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return ssl_note_fd((__s32)args->fd); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return ssl_note_fd((__s32)args->fd); }

/* SSL_read / SSL_write returned: the plaintext it moved, as an EV_DATA record of its connection. */
static __always_inline int ssl_return(struct pt_regs *ctx, __u8 is_write) {
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    __u32 tid = (__u32)pid_tgid;
    struct ssl_call *found = ssl_calls.lookup(&tid);
    if (!found)
        return 0;
    struct ssl_call call = *found;
    ssl_calls.delete(&tid);
    int ret = (int)PT_REGS_RC(ctx);
    if (ret <= 0 || call.fd < 0 || call.kind != (is_write ? SSL_CALL_WRITE : SSL_CALL_READ))
        return 0;
    __u64 key = conn_key(pid_tgid >> 32, call.fd);
    struct conn_state *cs = conns.lookup(&key);
    if (!cs || (cs->flags & CONN_UNTRACED))
        return 0;
    __u32 zero = 0;
    struct data_scratch_t *scratch = tls_plain_scratch.lookup(&zero);
    if (!scratch)
        return 0;
    struct data_event *e = &scratch->ev;
    fill_header(&e->hdr, EV_DATA, pid_tgid);
    e->fd = call.fd;
    e->direction = is_write ? DIR_WRITE : DIR_READ;
    e->syscall = 0;
    e->flags = DATA_FLAG_TLS_PLAINTEXT;
    e->role = cs->role;
    e->ret = ret;
    e->msg_seq = 0; /* not one of the connection's syscall records: their sequence is left alone */
    e->held = 0;
    e->held_captured = 0;
    __builtin_memset(e->held_data, 0, sizeof(e->held_data));
    e->captured = capture_flat(e, (const void *)call.buf, (__u32)ret);
    __u32 size = offsetof(struct data_event, data) + (e->captured & (2 * CAPTURE_MAX - 1));
    if (size > sizeof(struct data_event))
        size = sizeof(struct data_event);
    emit(e, size);
    return 0;
}

int ssl_read_return(struct pt_regs *ctx) { return ssl_return(ctx, 0); }
int ssl_write_return(struct pt_regs *ctx) { return ssl_return(ctx, 1); }
