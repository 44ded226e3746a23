"""The lab's clients (lab/clients.py) against a real Envoy (root; the ``lab`` fixture of conftest.py): the
right TLS filter chain for each SNI, resets, bursts."""

from __future__ import annotations

import pytest

from otel_envoy.lab import EnvoyLab
from otel_envoy.lab.clients import burst, curl_plain, curl_tls, openssl_s_client, reset_client
from tests.support.lab import chain_rq, root, wait_for


@root
def test_curl_plain(lab: EnvoyLab) -> None:
    r = curl_plain(lab.http_port)
    assert r.ok, r.stderr
    assert r.body == "hello from backend\n"
    assert r.http_version == "1.1" and r.local_port is not None and r.tls_version is None
    h2c = curl_plain(lab.http_port, "/bytes/1000", http2_prior_knowledge=True)
    assert h2c.ok and h2c.http_version == "2" and len(h2c.body) == 1000
    assert curl_plain(lab.http_port, "/status/503").http_code == 503


@root
@pytest.mark.parametrize(
    ("sni", "alpn", "version", "chain"),
    [
        ("a.example.com", "h2", "1.3", "chain_a"),
        ("b.example.com", "http/1.1", "1.2", "chain_b"),
        ("a.example.com", "http/1.1", "1.2", "chain_a"),
        ("b.example.com", "h2", "1.3", "chain_b"),
        (None, "h2", "1.3", "chain_default"),
    ],
)
def test_curl_tls_hits_the_right_chain(lab: EnvoyLab, sni: str | None, alpn: str, version: str,
                                       chain: str) -> None:
    before = chain_rq(lab)
    r = curl_tls(lab.tls_port, sni, alpn, version, lab.ca_path)  # type: ignore[arg-type]
    assert r.ok, r.stderr
    assert r.body == "hello from backend\n"
    assert r.tls_version == f"TLSv{version}"
    assert r.alpn == alpn
    assert r.http_version == ("2" if alpn == "h2" else "1.1")
    assert r.local_port is not None
    expected = {name: before[name] + (1 if name == chain else 0) for name in before}
    assert wait_for(lambda: chain_rq(lab) == expected), (chain_rq(lab), expected)


@root
def test_openssl_s_client(lab: EnvoyLab) -> None:
    before = chain_rq(lab)
    r = openssl_s_client(lab.tls_port, "b.example.com", "http/1.1", "1.3", ca=lab.ca_path)
    assert r.returncode == 0, r.output
    assert r.protocol == "TLSv1.3" and r.alpn == "http/1.1"
    assert r.verify_code == 0 and r.subject_cn == "b.example.com"
    assert r.http_status == 200 and "hello from backend" in r.stdout
    r12 = openssl_s_client(lab.tls_port, "a.example.com", "http/1.1", "1.2", ca=lab.ca_path)
    got = (r12.protocol, r12.subject_cn, r12.verify_code, r12.http_status)
    assert got == ("TLSv1.2", "a.example.com", 0, 200)
    nosni = openssl_s_client(lab.tls_port, None, None, "1.3")
    assert nosni.subject_cn == "a.example.com" and nosni.http_status == 200 and nosni.alpn is None
    handshake_only = openssl_s_client(lab.tls_port, "a.example.com", "h2", "1.3", ca=lab.ca_path)
    assert handshake_only.alpn == "h2" and handshake_only.verify_code == 0
    after = {"chain_a": 1, "chain_b": 1, "chain_default": 1}
    assert wait_for(lambda: all(chain_rq(lab)[c] >= before[c] + n for c, n in after.items()))


@root
def test_reset_client_does_not_break_envoy(lab: EnvoyLab) -> None:
    key = "listener.plain_http.downstream_cx_total"
    before = lab.stats(r"^listener\.plain_http\.downstream_cx_total$")[key]
    results = [reset_client(lab.http_port) for _ in range(5)]
    results += [reset_client(lab.tls_port, payload=b"\x16\x03\x01\x00") for _ in range(5)]
    assert all(r.local_port > 0 and r.sent > 0 for r in results)
    assert len({r.local_port for r in results}) == len(results)
    assert lab.running
    assert curl_plain(lab.http_port).ok
    assert curl_tls(lab.tls_port, "a.example.com", "h2", "1.3", lab.ca_path).ok
    assert lab.stats(r"^listener\.plain_http\.downstream_cx_total$")[key] >= before + 6


@root
def test_burst(lab: EnvoyLab) -> None:
    key = "listener.plain_http.downstream_cx_total"
    before = lab.stats(r"^listener\.plain_http\.downstream_cx_total$")[key]
    b = burst(lab.http_port, 200, 20)
    assert b.statuses == {200: 200}, b.errors[:5]
    assert b.all_ok and not b.errors
    assert len(set(b.local_ports)) == 200
    assert lab.stats(r"^listener\.plain_http\.downstream_cx_total$")[key] >= before + 200
    assert lab.running
