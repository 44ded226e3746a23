/* traceparent.bpf.h: the sampled flag of a request's W3C traceparent header, read in the kernel for the
 * parent-based samplers (SAMPLING builds; sampling.bpf.h decides with it).
 *
 * The first TP_HEAD bytes of the request's first read are searched for a header line named traceparent
 * (any case) with a Boyer-Moore-Horspool scan: the byte under the pattern's last position (':') says how
 * far the pattern can move, so a header block is crossed in ~1/7 of its length in steps. The value must be
 * a valid version-00 layout: 2 hex digits (not ff), 32 hex (not all zero), 16 hex (not all zero), 2 hex,
 * separated by '-', then the end of the line; anything else counts as no header (the ratio decides), as
 * the W3C specification says. A header beyond the first TP_HEAD bytes, or past TP_STEPS steps of the scan,
 * is not seen.
 */
#define TP_HEAD 512    /* bytes of the request searched */
#define TP_STEPS 128   /* scan steps: at least 128 bytes, ~700 of a typical header block */

/* A request's first bytes, read once at its first read (sampling.bpf.h read_request_head) for its method,
 * its kept head and its traceparent. */
struct head_scratch {
    __u8 b[TP_HEAD + TP_CONTEXT]; /* room past TP_HEAD: any masked position plus a context fits */
    __u32 len;             /* bytes of b that are the request's */
    __u32 opaque;          /* 0, stored and read back: the verifier does not know the value it reads */
};
BPF_PERCPU_ARRAY(head_scratch, struct head_scratch, 1);

/* How far the 12-byte pattern "traceparent:" may move when the byte under its last position is c (folded
 * to lower case) and is not ':'. */
static __always_inline __u32 tp_skip(__u8 c) {
    switch (c) {
    case 't': return 1;
    case 'n': return 2;
    case 'e': return 3;
    case 'r': return 4;
    case 'a': return 5;
    case 'p': return 6;
    case 'c': return 8;
    default: return 12;
    }
}

static __always_inline int tp_is_name(const __u8 *p) {
    return (p[0] | 0x20) == 't' && (p[1] | 0x20) == 'r' && (p[2] | 0x20) == 'a' && (p[3] | 0x20) == 'c' &&
           (p[4] | 0x20) == 'e' && (p[5] | 0x20) == 'p' && (p[6] | 0x20) == 'a' && (p[7] | 0x20) == 'r' &&
           (p[8] | 0x20) == 'e' && (p[9] | 0x20) == 'n' && (p[10] | 0x20) == 't';
}

/* A lower-case hex digit's value, or 16 (the specification allows no upper case). */
static __always_inline __u8 tp_hex(__u8 c) {
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return 16;
}

/* Whether p[0..n) are hex digits, and not all '0' when `nonzero`. */
static __always_inline int tp_hex_run(const __u8 *p, int n, int nonzero) {
    __u8 any = 0;
#pragma unroll
    for (int i = 0; i < 32; i++) {
        if (i >= n)
            break;
        __u8 v = tp_hex(p[i]);
        if (v > 15)
            return 0;
        any |= v;
    }
    return !nonzero || any;
}

/* The traceparent's sampled flag (0 or 1) in the first n bytes at b, or -1 when there is no valid one;
 * *value_at: where its value starts (masked to TP_HEAD - 1; TP_VALUE bytes from there are in b).
 * `opaque` is 0 at run time, unknown to the verifier: adding it to each step's position makes the eight
 * skip lengths one state at the loop's head, so it walks each step once instead of every position. */
static __always_inline int tp_sampled(const __u8 *b, __u32 n, __u32 opaque, __u32 *value_at) {
    __u32 pos = 0;
    int at = -1;
#pragma clang loop unroll(disable)
    for (int i = 0; i < TP_STEPS; i++) {
        if (pos + 12 > n)
            break;
        pos &= TP_HEAD - 1;
        __u8 c = b[pos + 11];
        if (c != ':') {
            pos += tp_skip(c | 0x20) + opaque;
            continue;
        }
        if (pos > 0 && b[(pos - 1) & (TP_HEAD - 1)] == '\n' && tp_is_name(b + pos)) {
            at = (int)pos + 12;
            break;
        }
        pos += 12 + opaque; /* ':' is nowhere else in the pattern */
    }
    if (at < 0)
        return -1;
    __u32 v = (__u32)at;
    if (v < n && (b[v & (TP_HEAD - 1)] == ' ' || b[v & (TP_HEAD - 1)] == '\t'))
        v++;
    if (v + TP_VALUE > n)
        return -1;
    v &= TP_HEAD - 1;
    const __u8 *p = b + v;
    if (p[2] != '-' || p[35] != '-' || p[52] != '-')
        return -1;
    if (!tp_hex_run(p, 2, 0) || (p[0] == 'f' && p[1] == 'f') || !tp_hex_run(p + 3, 32, 1) ||
        !tp_hex_run(p + 36, 16, 1) || !tp_hex_run(p + 53, 2, 0))
        return -1;
    /* version 00 ends here; a later version may go on after another '-' */
    if (v + TP_VALUE < n) {
        __u8 end = p[TP_VALUE];
        __u8 later = end == '-' && !(p[0] == '0' && p[1] == '0');
        if (end != '\r' && end != '\n' && end != ' ' && end != '\t' && !later)
            return -1;
    }
    *value_at = v;
    return tp_hex(p[54]) & 1;
}

/* The sampled flag of the traceparent in a request's first bytes (read into the scratch), or -1. A valid
 * one's value and what follows it (TP_CONTEXT bytes: the tracestate line, when the caller's propagator
 * wrote it next) are kept in the connection's state: a request reported as one record (EV_REQUEST_KEPT)
 * carries them, wherever they were in the header block. */
static __always_inline int request_traceparent(struct head_scratch *s, struct conn_state *cs) {
    __u32 at = 0;
    s->opaque = 0;
    int sampled = tp_sampled(s->b, s->len, *(volatile __u32 *)&s->opaque, &at);
    if (sampled >= 0) { /* decide_request cleared req_tp_len: a request with none sends none */
        at &= TP_HEAD - 1;
        __builtin_memcpy(cs->req_tp, s->b + at, TP_CONTEXT);
        __u32 len = s->len > at ? s->len - at : 0; /* the scratch's bytes past len are an older request's */
        cs->req_tp_len = len > TP_CONTEXT ? TP_CONTEXT : len;
    }
    return sampled;
}
