/* tls_metrics.bpf.h: the duration of every downstream TLS handshake, traced or not (SAMPLING builds), by
 * listening socket, version, resumption and outcome: the kernel's exact TLS handshake metrics.
 *
 * Each downstream connection walks a small state machine on its transfers (tls_handshake.bpf.h, from the
 * front of sys_exit): a first read (or peek) starting with a handshake record (0x16) starts the handshake;
 * the server's first write after it is its ServerHello flight, parsed for the version and resumption
 * (tls_hello_sys_exit); the handshake is over, on the server's side, when Envoy reads the client's last
 * flight (TLS 1.3; TLS 1.2 resumed) or writes its own ChangeCipherSpec and Finished after reading the
 * client's key exchange (TLS 1.2 full). A connection closed before that counts as TLS_HANDSHAKE_CLOSED.
 */

BPF_HASH(tls_metrics, struct tls_metric_key, struct http_metric, HTTP_METRIC_SERIES);

/* Where a downstream connection's TLS handshake stands (conn_state.hs_state). */
enum tls_hs_state {
    HS_NONE = 0,       /* no byte read yet */
    HS_HELLO = 1,      /* a ClientHello arrived: the server's hello flight comes next */
    HS_CLIENT_FIN = 2, /* the server's hello flight was written: the client's last flight comes next */
    HS_SERVER_FIN = 3, /* TLS 1.2 full handshake: the client's flight was read, the server's Finished next */
    HS_DONE = 4,       /* over (or not TLS at all) */
};

/* The handshake of `cs` ended `now` with `outcome` (enum tls_outcome): counted, and not again. */
static __always_inline void record_tls_handshake(__u32 tgid, struct conn_state *cs, __u8 outcome, __u64 now) {
    cs->hs_state = HS_DONE;
    if (outcome == TLS_HANDSHAKE_DONE)
        cs->hs_end_ns = now;
    struct tls_metric_key key = {.pid = tgid, .listen_fd = cs->listen_fd, .version = cs->hs_version,
                                 .resumed = cs->hs_resumed, .outcome = outcome};
    struct http_metric *m = tls_metrics.lookup(&key);
    if (!m && (m = new_series()))
        m = tls_metrics.lookup_or_try_init(&key, m);
    add_to_series(m, now > cs->hs_start_ns ? now - cs->hs_start_ns : 0);
}

/* A downstream connection closes: a handshake still under way is counted as closed. */
static __always_inline void tls_handshake_closed(__u32 tgid, struct conn_state *cs, __u64 now) {
    if (cs->hs_state > HS_NONE && cs->hs_state < HS_DONE)
        record_tls_handshake(tgid, cs, TLS_HANDSHAKE_CLOSED, now);
}
