/* http2.bpf.h: the condensed capture of an HTTP/2 (prior knowledge) connection: each read/write's record
 * holds the frame headers and non-DATA payloads of the bytes it moved, walked across syscalls per direction.
 */
#define H2_MAX_IOV 1024 /* UIO_MAXIOV: iovecs followed per syscall */
#define H2_PREFACE_LEN 24
#define H2_FRAME_HEADER 9
#define H2_WALK 1
#define H2_LOST 2

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

/* The record starts with the HTTP/2 client preface (PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n, little-endian words). */
static __always_inline int is_h2_preface(const struct data_event *e) {
    if (e->captured < H2_PREFACE_LEN)
        return 0;
    const __u64 *w = (const __u64 *)e->data;
    return w[0] == 0x5448202a20495250ULL && w[1] == 0x0a0d302e322f5054ULL && w[2] == 0x0a0d0a0d4d530a0dULL;
}

/* The client preface was seen (HTTP/2 with prior knowledge): both directions are walked from here on, the
 * record holding the preface included. */
static __always_inline void h2_start(struct conn_state *cs, __u8 is_write) {
    cs->flags |= CONN_H2;
    cs->h2[is_write & 1].state = H2_WALK;
    cs->h2[is_write & 1].copy = H2_PREFACE_LEN; /* copied like the frames: user space agrees */
    cs->h2[!is_write].state = H2_WALK;
    cs->h2[!is_write].copy = H2_FRAME_HEADER; /* the server starts with a frame */
    cs->h2[!is_write].in_hdr = 1;
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
