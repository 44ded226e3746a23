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
 * (accepts: the value is the listener's port); filled by user space */
BPF_HASH(conn_sampled_ports, __u16, __u8, 1024);
BPF_HASH(conn_sampled_listeners, __u64, __u16, 1024);
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

/* The port of listening socket (tgid, listen_fd) when its connections are sampled whole, else 0. */
static __always_inline __u16 listener_conn_sampled(__u32 tgid, __s32 listen_fd) {
    __u64 key = conn_key(tgid, listen_fd);
    __u16 *port = conn_sampled_listeners.lookup(&key);
    return port ? (*port ? *port : 1) : 0;
}

/* What a traced connection decided whole learns between its accept and its close in softirq, kept here
 * until its close record carries it (instead of a record each: these connections are the per-connection
 * unit, and every one of a TLS client's ends this way): the peer's FIN (CLOSE_WAIT) and the first reset
 * it received. Keyed by the connection's peer and local port; the entry is made at the accept
 * (CONN_TCP_FOLDED) and taken by the close. What finds no entry (evicted, or after the close took it) is
 * sent as its own record, as before.
 *
 * The close and a softirq on another CPU can meet: the close sets `closing` (an atomic exchange, a full
 * barrier) before it reads the facts; a softirq writes its fact, then reads `closing` with an atomic add
 * of 0 (a full barrier too). So either the close sees the fact or the softirq sees `closing` and sends
 * its record as well (or both: the correlator drops the second copy of a mark or FIN). */
struct close_facts_key {
    struct peer_key peer;
    __u16 local_port;
    __u16 _pad;
};
struct close_facts {
    __u64 peer_fin_ns; /* CLOSE_WAIT: the peer's FIN arrived */
    __u64 reset_rx_ns; /* the first reset received */
    __u64 closing;     /* the close is reading this entry */
};
BPF_TABLE("lru_hash", struct close_facts_key, struct close_facts, close_facts, MAX_CONNS);

static __always_inline void close_facts_key_of(struct close_facts_key *k, const __u8 *peer_addr, __u16 family,
                                               __u16 peer_port, __u16 local_port) {
    peer_key_of(&k->peer, peer_addr, family, peer_port);
    k->local_port = local_port;
}

/* At the accept of a traced connection decided whole: its entry (1), or 0 when the table took none. */
static __always_inline int open_close_facts(const __u8 *peer_addr, __u16 family, __u16 peer_port,
                                            __u16 local_port) {
    struct close_facts_key k = {};
    close_facts_key_of(&k, peer_addr, family, peer_port, local_port);
    struct close_facts zero = {};
    return close_facts.update(&k, &zero) == 0;
}

/* A FIN or reset of connection (peer, local port) at `ts`: 1 when its close record will carry it (no record
 * of its own then), 0 when it needs one (no entry, a fact already there, or the close already reading). */
static __always_inline int fold_close_fact(const __u8 *peer_addr, __u16 family, __u16 peer_port,
                                           __u16 local_port, int which, __u64 ts) {
    struct close_facts_key k = {};
    close_facts_key_of(&k, peer_addr, family, peer_port, local_port);
    struct close_facts *f = close_facts.lookup(&k);
    if (!f)
        return 0;
    __u64 *fact = which == CLOSE_FACT_RESET ? &f->reset_rx_ns : &f->peer_fin_ns;
    if (*fact)
        return 0;
    *fact = ts;
    return __sync_fetch_and_add(&f->closing, 0) == 0;
}

/* The close of a connection with CONN_TCP_FOLDED: its facts into `fin` / `reset` (left 0 when none), its
 * entry gone. */
static __always_inline void take_close_facts(const struct conn_state *cs, __u64 *fin, __u64 *reset) {
    struct close_facts_key k = {};
    close_facts_key_of(&k, cs->peer_addr, cs->peer_family, cs->peer_port, cs->local_port);
    struct close_facts *f = close_facts.lookup(&k);
    if (!f)
        return;
    __sync_lock_test_and_set(&f->closing, 1);
    *fin = f->peer_fin_ns;
    *reset = f->reset_rx_ns;
    close_facts.delete(&k);
}

static __always_inline void count_conn_sampled(__u32 slot) {
    __u64 *v = conn_sample_counts.lookup(&slot);
    if (v)
        (*v)++;
}
