"""The connection program loads in every build the daemon can ask for (root: the kernel's verifier runs).

``raw_syscalls:sys_exit`` is near the verifier's budget of 1M processed instructions, and the builds differ
(``HTTP_CAPTURE`` for --no-requests, ``OFFCPU`` for --no-offcpu): a change that fits one build can put
another over it (E2BIG at load), which the end-to-end tests, all run in the default build, would not see.
"""

from __future__ import annotations

import pytest

from otel_envoy.probes.btf import KernelTypes
from otel_envoy.probes.loader import SOCK_COMMON_FIELDS, ConnectionProbes, ProbeConfig, sock_field_cflags

# bcc attaches each program by its name (tracepoint__<category>__<event>, raw_tracepoint__<event>); a probe it
# did not find, or compiled without its rewrites (outside the text the loader hands it), would be missing.
PROGRAMS = {
    "raw_tracepoint__sys_exit",
    "raw_tracepoint__inet_sock_set_state",
    "tracepoint__syscalls__sys_enter_accept",
    "tracepoint__syscalls__sys_enter_accept4",
    "tracepoint__syscalls__sys_enter_close",
    "tracepoint__syscalls__sys_enter_connect",
    "tracepoint__syscalls__sys_enter_epoll_ctl",
    "tracepoint__syscalls__sys_enter_epoll_pwait",
    "tracepoint__syscalls__sys_enter_epoll_pwait2",
    "tracepoint__syscalls__sys_enter_epoll_wait",
    "tracepoint__syscalls__sys_enter_listen",
    "tracepoint__syscalls__sys_enter_setsockopt",
    "tracepoint__syscalls__sys_exit_accept",
    "tracepoint__syscalls__sys_exit_accept4",
    "tracepoint__syscalls__sys_exit_connect",
    "raw_tracepoint__tcp_receive_reset",
    "raw_tracepoint__tcp_retransmit_skb",
    "raw_tracepoint__tcp_retransmit_synack",
    "tracepoint__tcp__tcp_send_reset",
    # startup.bpf.h: processes that start and exit, listening sockets being set up
    "tracepoint__sched__sched_process_exec",
    "tracepoint__sched__sched_process_exit",
    "tracepoint__syscalls__sys_enter_bind",
    "tracepoint__syscalls__sys_enter_dup",
    "tracepoint__syscalls__sys_enter_dup2",
    "tracepoint__syscalls__sys_enter_dup3",
    "tracepoint__syscalls__sys_enter_fcntl",
    "tracepoint__syscalls__sys_exit_bind",
    "tracepoint__syscalls__sys_exit_dup",
    "tracepoint__syscalls__sys_exit_dup2",
    "tracepoint__syscalls__sys_exit_dup3",
    "tracepoint__syscalls__sys_exit_fcntl",
}
OFFCPU_PROGRAMS = {"raw_tracepoint__sched_switch", "raw_tracepoint__sched_waking"}


@pytest.mark.parametrize("http_capture", [True, False], ids=["requests", "no-requests"])
@pytest.mark.parametrize("offcpu", [True, False], ids=["offcpu", "no-offcpu"])
def test_connection_program_loads(http_capture: bool, offcpu: bool) -> None:
    probes = ConnectionProbes(ProbeConfig(http_capture=http_capture, offcpu=offcpu))
    try:
        names = {name.decode() for name in probes.bpf.funcs}  # loaded (verified), not only compiled
        assert names == PROGRAMS | (OFFCPU_PROGRAMS if offcpu else set())
        attached = ({"tracepoint__" + tp.decode().replace(":", "__") for tp in probes.bpf.tracepoint_fds}
                    | {"raw_tracepoint__" + tp.decode() for tp in probes.bpf.raw_tracepoint_fds})
        assert attached == names
        # the kernel's count of skipped runs, per program, read from each one's fdinfo
        misses = probes.recursion_misses()
        assert set(misses) == names and all(v >= 0 for v in misses.values()), misses
    finally:
        probes.close()


@pytest.mark.parametrize("offcpu", [True, False], ids=["offcpu", "no-offcpu"])
def test_the_sampling_build_puts_the_front_program_on_sys_exit_and_tail_calls_io(offcpu: bool) -> None:
    """With request sampling, sys_exit carries one program, front_sys_exit (the decision and the request
    metrics); io_sys_exit (the unchanged io path), accept_sys_exit, connect_sys_exit, setup_sys_exit (the
    exits of accept, accept4, connect, and a target's bind and dup*), tls_hello_sys_exit (a TLS server's
    hello flight), tls_step_sys_exit (a TLS handshake's transfers), quiet_sys_exit (a handshake record's
    reads not reported), epoll_ctl_sys_exit (a successful EPOLL_CTL_ADD), hold_hello_sys_exit (an
    untraced TLS connection's ClientHello, held for a kept record), hs_summary_sys_exit (a traced TLS
    connection's handshake summary at its end) and quiet_write_sys_exit (a summarized handshake's writes,
    counted and walked) are loaded into its tail-call
    slots, not attached, and no syscalls:sys_exit_* program is left, nor the syscalls:sys_enter_epoll_ctl
    one (Envoy's epoll_ctl MODs around requests would each go through the perf record path to reach it).
    Every other program is as without it."""
    probes = ConnectionProbes(ProbeConfig(http_capture=True, offcpu=offcpu, sampling=True))
    try:
        names = {name.decode() for name in probes.bpf.funcs}
        exits = {name for name in PROGRAMS if name.startswith("tracepoint__syscalls__sys_exit_")}
        assert exits <= PROGRAMS
        expected = (PROGRAMS - {"raw_tracepoint__sys_exit", "tracepoint__syscalls__sys_enter_epoll_ctl"}
                    - exits) | {
            "front_sys_exit", "io_sys_exit", "accept_sys_exit", "connect_sys_exit", "setup_sys_exit",
            "tls_hello_sys_exit", "tls_step_sys_exit", "quiet_sys_exit", "epoll_ctl_sys_exit",
            "hold_hello_sys_exit", "hs_summary_sys_exit", "quiet_write_sys_exit"}
        assert names == expected | (OFFCPU_PROGRAMS if offcpu else set())
        raw = ({"sys_exit", "inet_sock_set_state", "tcp_retransmit_skb", "tcp_receive_reset",
                "tcp_retransmit_synack"} | ({"sched_switch", "sched_waking"} if offcpu else set()))
        assert {tp.decode() for tp in probes.bpf.raw_tracepoint_fds} == raw
        assert not any(name.startswith("tracepoint__syscalls__sys_exit_") for name in names)
        slots = probes.bpf[b"exit_progs"]
        assert len(list(slots.items())) == 11
        probes.set_sample_threshold(2**31)
        probes.set_parent_based(True)
        assert probes.sample_counts() == {"sampled": 0, "not_sampled": 0, "parent_sampled": 0,
                                          "parent_not_sampled": 0}
        assert probes.http_request_metrics() == {}
    finally:
        probes.close()


def test_the_socket_programs_read_the_running_kernels_sock_common() -> None:
    """The raw tracepoints of sockets.bpf.h read a struct sock_common whole (SKC_READ bytes from a struct
    sock, or a struct request_sock for a SYN-ACK) at the offsets this kernel's BTF gives, the state byte
    included (a retransmit's tcp.state)."""
    types = KernelTypes.running_kernel()
    flags = dict(f[2:].split("=") for f in sock_field_cflags(types))
    read = int(flags["SKC_READ"])
    for define, member in SOCK_COMMON_FIELDS.items():
        off = int(flags[define])
        assert off == types.member_offset("sock_common", member), define
        if off >= 0:
            assert off < read, define
    assert types.member_offset("request_sock", "__req_common") == 0
