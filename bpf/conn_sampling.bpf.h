/* conn_sampling.bpf.h: head sampling of whole downstream connections (SAMPLING builds) whose requests the
 * kernel cannot decide one by one, so a connection is the unit: those of the listeners user space names
 * (TLS listeners: their requests are encrypted), and plaintext connections that are not HTTP/1.x, decided at
 * their first transfer (sampling.bpf.h decide_whole): HTTP/2 with prior knowledge (h2c) and other protocols.
 *
 * A connection on such a listener is traced when a hash of its peer address and port is below the
 * sampler's threshold (`sample_threshold`, the same ratio as requests). The hash, not a random draw, lets
 * the TCP state changes (softirq, by port and address) and the accept (process context, by listening fd)
 * reach the same decision without sharing state. A connection not traced sends no record at all: no
 * accept, no TCP state change, no data, no close (CONN_UNTRACED); its bytes are still counted.
 */

BPF_ARRAY(sample_threshold, __u64, 1); /* sampled when a 32-bit random number (or hash) is below it */
/* listeners whose connections are sampled whole: by port (TCP state changes) and by (tgid, listening fd)
 * (accepts); filled by user space */
BPF_HASH(conn_sampled_ports, __u16, __u8, 1024);
BPF_HASH(conn_sampled_listeners, __u64, __u8, 1024);
/* connections decided whole, a pair of slots (traced, not) per kind: on those listeners, h2c at its preface,
 * other protocols at their first transfer (sampling.bpf.h decide_whole) */
#define SAMPLED_WHOLE_TLS 0
#define SAMPLED_WHOLE_H2C 2
#define SAMPLED_WHOLE_OTHER 4
BPF_PERCPU_ARRAY(conn_sample_counts, __u64, 6);

/* A 32-bit hash of a peer (address, port); the IPv4 address as its 4 bytes, IPv6 as its 16. */
static __always_inline __u32 peer_hash(const __u8 *addr, __u16 family, __u16 port) {
    __u32 h = (__u32)port * 0x9E3779B1u;
    __u32 w[4] = {};
    __builtin_memcpy(w, addr, 4);
    if (family == AF_INET6)
        __builtin_memcpy(w, addr, 16);
    h ^= w[0] * 0x85EBCA77u;
    h ^= w[1] * 0xC2B2AE3Du;
    h ^= w[2] * 0x27D4EB2Fu;
    h ^= w[3] * 0x165667B1u;
    h ^= h >> 15;
    h *= 0x2C1B3C6Du;
    h ^= h >> 12;
    return h;
}

/* Whether the connection of this peer is traced. */
static __always_inline int peer_traced(const __u8 *addr, __u16 family, __u16 port) {
    __u32 zero = 0;
    __u64 *threshold = sample_threshold.lookup(&zero);
    return !threshold || (__u64)peer_hash(addr, family, port) < *threshold;
}

static __always_inline int port_conn_sampled(__u16 port) { return conn_sampled_ports.lookup(&port) != 0; }

static __always_inline int listener_conn_sampled(__u32 tgid, __s32 listen_fd) {
    __u64 key = conn_key(tgid, listen_fd);
    return conn_sampled_listeners.lookup(&key) != 0;
}

static __always_inline void count_conn_sampled(__u32 slot) {
    __u64 *v = conn_sample_counts.lookup(&slot);
    if (v)
        (*v)++;
}
