/* sockets.bpf.h: TCP state changes and TCP events (retransmits, resets) of the targets' sockets. They fire
 * in softirq context, so they are filtered by socket, not by process: the listening ports user space
 * watches (`listen_ports`) and the sockets a target connected (`upstream_socks`).
 */

/* tcp:tcp_send_reset's format names `enum sk_rst_reason` (kernel 6.10+), which the 6.1 headers bcc
 * compiles against lack; bcc copies the field type verbatim. An int-sized stand-in keeps the layout. */
enum sk_rst_reason { SK_RST_REASON_STANDIN = 0 };

BPF_HASH(listen_ports, __u16, __u8, 1024);
BPF_TABLE("lru_hash", __u64, __u8, upstream_socks, MAX_CONNS);

static __always_inline int port_watched(__u16 port) { return listen_ports.lookup(&port) != 0; }

/* sock:inet_sock_set_state as a raw tracepoint: a classic tracepoint program is skipped, silently, when it
 * fires while another BPF program runs on the CPU (they share one per-CPU guard, and this one fires in
 * softirq, which can interrupt our syscall programs); a raw tracepoint program has a guard of its own, so no
 * handshake completion is lost that way. It gets the socket pointer instead of the fields the classic one
 * copies out, and reads them at the offsets the loader found in the running kernel's BTF (probes/btf.py):
 * the kernel's struct layouts are not the headers' (SKC_*_OFF, SK_PROTOCOL_OFF, SKC_READ). The fields are
 * the classic tracepoint's: the local port (skc_num) and the peer's (skc_dport), IPv4 addresses from
 * skc_rcv_saddr / skc_daddr, IPv6 ones from skc_v6_rcv_saddr / skc_v6_daddr. */
#ifndef SKC_READ /* defaults for reading alone: x86-64, 6.x */
#define SKC_DADDR_OFF 0
#define SKC_RCV_SADDR_OFF 4
#define SKC_DPORT_OFF 12
#define SKC_NUM_OFF 14
#define SKC_FAMILY_OFF 16
#define SKC_STATE_OFF 18
#define SKC_V6_DADDR_OFF 56
#define SKC_V6_RCV_SADDR_OFF 72
#define SKC_READ 88
#define SK_PROTOCOL_OFF 532
#endif

/* The local and peer ports, the family and the addresses of a struct sock_common read whole into `c`
 * (SKC_READ bytes, at the running kernel's offsets), as struct sock_state_event and struct tcp_event carry
 * them: ports in host byte order, IPv4 addresses as their 4 bytes, IPv6 ones as their 16. */
static __always_inline void fill_tuple(const __u8 *c, __u16 *sport, __u16 *dport, __u16 *family, __u8 *saddr,
                                       __u8 *daddr) {
    *sport = *(__u16 *)(c + SKC_NUM_OFF);
    *dport = ntohs(*(__u16 *)(c + SKC_DPORT_OFF));
    *family = *(__u16 *)(c + SKC_FAMILY_OFF);
    if (*family == AF_INET) {
        __builtin_memcpy(saddr, c + SKC_RCV_SADDR_OFF, 4);
        __builtin_memcpy(daddr, c + SKC_DADDR_OFF, 4);
    }
#if SKC_V6_DADDR_OFF >= 0 /* -1: a kernel without IPv6 */
    else {
        __builtin_memcpy(saddr, c + SKC_V6_RCV_SADDR_OFF, 16);
        __builtin_memcpy(daddr, c + SKC_V6_DADDR_OFF, 16);
    }
#endif
}

/* Whether a TCP record (a state change, a retransmit, a reset) of a socket on local port `sport` with peer
 * `daddr`:`dport` is sent. Not for a downstream connection its listener's whole-connection sampling left
 * untraced: no record, like the rest of that connection (a TLS listener's client resetting after every
 * answer would otherwise send one record per connection). Nor for a traced one's fact `fold`
 * (CLOSE_FACT_FIN, CLOSE_FACT_RESET; NO_CLOSE_FACT: not one) that its close record will carry
 * (conn_sampling.bpf.h close_facts). `daddr`: the peer's address (4 or 16 bytes by family). */
static __always_inline int tcp_record_wanted(__u16 sport, const __u8 *daddr, __u16 family, __u16 dport, int fold,
                                             __u64 ts) {
#if SAMPLING
    if (!port_conn_sampled(sport))
        return 1;
    if (!peer_traced(daddr, family, dport))
        return 0;
    return fold == NO_CLOSE_FACT || !fold_close_fact(daddr, family, dport, sport, fold, ts);
#else
    return 1;
#endif
}

RAW_TRACEPOINT_PROBE(inet_sock_set_state) {
    const __u8 *skp = (const __u8 *)ctx->args[0];
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    __u64 sk = (__u64)skp;
    __u8 c[SKC_READ];
    if (bpf_probe_read_kernel(c, sizeof(c), skp) != 0)
        return 0;
    __u16 sport = *(__u16 *)(c + SKC_NUM_OFF);
    __u64 pid_tgid = bpf_get_current_pid_tgid();
    int watched = port_watched(sport);
    if (!watched) {
        if (newstate == TCP_SYN_SENT && is_target(pid_tgid >> 32)) {
            __u8 one = 1;
            upstream_socks.update(&sk, &one); /* later transitions of this socket fire in softirq */
            watched = 1;
        } else if (upstream_socks.lookup(&sk)) {
            watched = 1;
            if (newstate == TCP_CLOSE)
                upstream_socks.delete(&sk);
        }
    }
    if (!watched)
        return 0;
    /* Only the transitions spans need: handshake done, who closed first, aborts. */
    if (!(newstate == TCP_ESTABLISHED || newstate == TCP_SYN_SENT || newstate == TCP_FIN_WAIT1 ||
          newstate == TCP_CLOSE_WAIT ||
          (newstate == TCP_CLOSE && (oldstate == TCP_ESTABLISHED || oldstate == TCP_SYN_RECV ||
                                     oldstate == TCP_SYN_SENT))))
        return 0;
    __u16 protocol = 0;
    if (bpf_probe_read_kernel(&protocol, sizeof(protocol), skp + SK_PROTOCOL_OFF) != 0 ||
        protocol != IPPROTO_TCP)
        return 0;
    struct sock_state_event ev = {};
    fill_header(&ev.hdr, EV_SOCK_STATE, pid_tgid);
    ev.skaddr = sk;
    ev.oldstate = oldstate;
    ev.newstate = newstate;
    fill_tuple(c, &ev.sport, &ev.dport, &ev.family, ev.saddr, ev.daddr);
#if SAMPLING
    if (newstate == TCP_ESTABLISHED && oldstate == TCP_SYN_RECV && port_watched(ev.sport)) {
        /* accept-queue metrics, and the accept record's completion time and local address */
        note_established(ev.daddr, ev.family, ev.dport, ev.saddr, ev.hdr.ts_ns);
        if (port_conn_sampled(ev.sport)) /* a listener sampled whole: its accept record stands for this one */
            return 0;
    }
#endif
    if (!tcp_record_wanted(ev.sport, ev.daddr, ev.family, ev.dport,
                           newstate == TCP_CLOSE_WAIT ? CLOSE_FACT_FIN : NO_CLOSE_FACT, ev.hdr.ts_ns))
        return 0;
    emit(&ev, sizeof(ev));
    return 0;
}

static __always_inline int watched_sock(__u16 sport, __u64 sk) {
    return port_watched(sport) || upstream_socks.lookup(&sk) != 0;
}

/* A retransmit or a received reset of socket `skp` (args[0] of tcp:tcp_retransmit_skb and
 * tcp:tcp_receive_reset; `skaddr` is the same socket), or a SYN-ACK retransmitted for the request socket
 * `skp` of listening socket `skaddr` (tcp:tcp_retransmit_synack's args[1] and args[0]: a struct request_sock
 * starts with its struct sock_common too). Raw tracepoints, as inet_sock_set_state is one: a classic
 * tracepoint program is skipped when it fires from softirq while another BPF program runs on the CPU (the
 * kernel counts it, kernel.recursion_missed.*, but the mark is lost); a raw one only when it would nest in
 * itself. The fields are the classic tracepoints': the state is the socket's (retransmits), SYN_RECV
 * (SYN-ACKs) or none (resets). A traced connection decided whole keeps the first reset it received for its
 * close record (conn_sampling.bpf.h close_facts). */
static __always_inline int tcp_mark(const __u8 *skp, __u64 skaddr, __u32 type) {
    __u8 c[SKC_READ];
    if (bpf_probe_read_kernel(c, sizeof(c), skp) != 0)
        return 0;
    __u16 sport = *(__u16 *)(c + SKC_NUM_OFF);
    if (type == TCP_SYNACK_RETRANSMIT ? !port_watched(sport) : !watched_sock(sport, skaddr))
        return 0;
    struct tcp_event ev = {};
    fill_header(&ev.hdr, EV_TCP, bpf_get_current_pid_tgid());
    ev.skaddr = skaddr;
    ev.type = type;
    fill_tuple(c, &ev.sport, &ev.dport, &ev.family, ev.saddr, ev.daddr);
    if (!tcp_record_wanted(ev.sport, ev.daddr, ev.family, ev.dport,
                           type == TCP_RESET_RECEIVED ? CLOSE_FACT_RESET : NO_CLOSE_FACT, ev.hdr.ts_ns))
        return 0;
    if (type == TCP_RETRANSMIT)
        ev.state = c[SKC_STATE_OFF];
    else if (type == TCP_SYNACK_RETRANSMIT)
        ev.state = TCP_SYN_RECV;
    emit(&ev, sizeof(ev));
    return 0;
}

RAW_TRACEPOINT_PROBE(tcp_retransmit_skb) {
    return tcp_mark((const __u8 *)ctx->args[0], ctx->args[0], TCP_RETRANSMIT);
}

RAW_TRACEPOINT_PROBE(tcp_receive_reset) {
    return tcp_mark((const __u8 *)ctx->args[0], ctx->args[0], TCP_RESET_RECEIVED);
}

RAW_TRACEPOINT_PROBE(tcp_retransmit_synack) {
    return tcp_mark((const __u8 *)ctx->args[1], ctx->args[0], TCP_SYNACK_RETRANSMIT);
}

/* tcp_send_reset carries sockaddr-shaped addresses (family, port in network order, address). It stays a
 * classic tracepoint: its socket may be NULL (a reset for a segment no socket owns), when only the
 * classic one's addresses, taken from the packet, say whose it was. */
TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    struct sockaddr_in6 src = {}, dst = {};
    __builtin_memcpy(&src, args->saddr, sizeof(src));
    __builtin_memcpy(&dst, args->daddr, sizeof(dst));
    __u16 sport = ntohs(src.sin6_port);
    if (!watched_sock(sport, (__u64)args->skaddr))
        return 0;
    struct tcp_event ev = {};
    fill_header(&ev.hdr, EV_TCP, bpf_get_current_pid_tgid());
    ev.skaddr = (__u64)args->skaddr;
    ev.type = TCP_RESET_SENT;
    ev.state = args->state;
    ev.sport = sport;
    ev.dport = ntohs(dst.sin6_port);
    ev.family = src.sin6_family;
    if (src.sin6_family == AF_INET) {
        __builtin_memcpy(ev.saddr, &((struct sockaddr_in *)&src)->sin_addr, 4);
        __builtin_memcpy(ev.daddr, &((struct sockaddr_in *)&dst)->sin_addr, 4);
    } else {
        __builtin_memcpy(ev.saddr, &src.sin6_addr, 16);
        __builtin_memcpy(ev.daddr, &dst.sin6_addr, 16);
    }
    if (!tcp_record_wanted(ev.sport, ev.daddr, ev.family, ev.dport, NO_CLOSE_FACT, ev.hdr.ts_ns))
        return 0;
    emit(&ev, sizeof(ev));
    return 0;
}
