"""The sandbox's only way out: a filtering HTTP proxy on a unix socket, outside the sandbox.

A sandbox with ``network = "egress"`` keeps its own empty network namespace (loopback only: no
route, no DNS, no UDP or raw sockets to anywhere). The worker runs an :class:`EgressProxy` on a
unix socket in the run directory; the sandbox gets that socket bind-mounted and a ``socat``
forwarder on its own ``127.0.0.1:3128`` (:data:`PROXY_PORT`), and ``HTTPS_PROXY``/``HTTP_PROXY``/
``ALL_PROXY`` point there. A program that ignores the variables reaches nothing at all.

The proxy speaks exactly two forms of HTTP/1.x proxy request, one per connection:

* ``CONNECT host:port`` (a tunnel: TLS for ``https://``), and
* ``METHOD http://host[:port]/path`` (plain HTTP, forwarded with ``Connection: close``).

It refuses, and records why: anything else (SOCKS, origin-form requests, ``https://`` URIs without
CONNECT, malformed or oversized heads), a ``Host`` header that names another authority than the
target, a target not on the allowlist (``host:port`` or ``*.suffix:port``; the port always
counts), and a target whose name resolves to any address that is not public: loopback, private,
link-local (169.254.0.0/16, the cloud metadata address), CGNAT (100.64.0.0/10), multicast,
unspecified, reserved, and the IPv6 equivalents, IPv4-mapped/6to4/Teredo forms checked as the
IPv4 address they carry. The single exception is an allowlist entry that names the literal
address and port (``127.0.0.1:8080``): that address is then allowed on that port only. The proxy
resolves names itself and connects to the address it checked (no second lookup to rebind).

Every attempt, allowed or refused, becomes an :class:`Attempt` (host, port, address, verdict,
reason, bytes up and down, duration) on :attr:`EgressProxy.attempts`; the worker puts them on the
run's result report, and from there they reach the task record and the provenance.

Why a small asyncio proxy rather than Squid/tinyproxy: it must listen on a per-run unix socket,
resolve and vet every address itself (Squid's ACLs do not refuse a public name that resolves to
a private address, and neither speaks to a unix socket without a further bridge), and hand back a
per-run record of every attempt; the whole of it is this module, with no configuration language.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

#: Where the sandbox's forwarder listens, inside the sandbox.
PROXY_PORT = 3128
#: How many attempts a run records in full (the rest are counted).
MAX_RECORDED = 200

_HEAD_LIMIT = 16384
_HEAD_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 15.0
_HOST = r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
_ENTRY = re.compile(rf"(?P<host>(?:\*\.)?{_HOST}|\[[0-9a-f:.]+\]):(?P<port>[0-9]{{1,5}})")
_REQUEST_LINE = re.compile(r"(?P<method>[A-Z]{3,10}) (?P<target>[!-~]{1,8000}) HTTP/1\.[01]")
_ABSOLUTE = re.compile(r"http://(?P<authority>[^/?#@]+)(?P<rest>[/?][!-~]*)?")
_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization", "proxy-authenticate",
        "te", "trailer", "upgrade"}

Resolver = Callable[[str, int], Awaitable[list[str]]]


class EgressError(ValueError):
    """An allowlist entry is malformed (the message names it)."""


@dataclass(frozen=True)
class Rule:
    """One allowlist entry: a host (or ``*.suffix``, or a literal address) and a port."""

    host: str
    port: int

    def matches(self, host: str, port: int) -> bool:
        if port != self.port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    @property
    def literal(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        return _literal(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]"))
    return None


def parse_entry(entry: str) -> Rule:
    """``"api.example.com:443"``, ``"*.example.com:443"``, ``"127.0.0.1:8080"`` or
    ``"[::1]:8080"`` as a :class:`Rule`; anything else raises :class:`EgressError`."""
    if not isinstance(entry, str):
        raise EgressError("an egress entry must be a string 'host:port'")
    value = entry.strip().lower()
    found = _ENTRY.fullmatch(value)
    if found is None:
        raise EgressError(f"egress entry {entry!r} must be 'host:port' or '*.suffix:port' (port required)")
    host, port = found["host"], int(found["port"])
    if not 1 <= port <= 65535:
        raise EgressError(f"egress entry {entry!r}: port must be 1-65535")
    if host.startswith("["):
        if _literal(host) is None or not isinstance(_literal(host), ipaddress.IPv6Address):
            raise EgressError(f"egress entry {entry!r}: not an IPv6 address")
        host = str(_literal(host))
    elif host.startswith("*.") and host.count(".") < 2:
        raise EgressError(f"egress entry {entry!r}: a wildcard needs a suffix of two labels or more")
    return Rule(host, port)


def parse_allowlist(entries: Sequence[str]) -> tuple[Rule, ...]:
    """Every entry parsed (see :func:`parse_entry`)."""
    return tuple(parse_entry(e) for e in entries)


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address`` is a public unicast address (see the module docstring)."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None:
            return is_public(embedded)
        if address in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64: the IPv4 address it names
            return is_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return bool(address.is_global and not (address.is_multicast or address.is_unspecified or address.is_reserved
                                           or address.is_loopback or address.is_link_local
                                           or address.is_private))


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for ``host`` (TCP)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass
class Attempt:
    """One connection attempt through the proxy, as recorded on the run."""

    host: str
    port: int
    method: str
    allowed: bool
    reason: str
    address: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _Refused(Exception):
    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


class EgressProxy:
    """The filtering proxy for one run (see the module docstring).

    :meth:`start` listens on ``socket_path`` in a thread of its own; :meth:`stop` closes it and
    every tunnel. ``resolver`` replaces the system resolver; only tests pass one (the worker's
    configuration has no way to), to make a name resolve to a chosen address.
    """

    def __init__(self, allowlist: Sequence[Rule], socket_path: Path, *, resolver: Resolver | None = None) -> None:
        self.rules = tuple(allowlist)
        self.socket_path = Path(socket_path)
        self.resolver = resolver or system_resolver
        self.attempts: list[Attempt] = []
        self.dropped = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> EgressProxy:
        self._thread = threading.Thread(target=self._serve, name="intake-egress", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None or self._server is None:
            raise OSError(f"the egress proxy could not listen on {self.socket_path}: {self._error}")
        return self

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(asyncio.start_unix_server(self._handle, path=str(self.socket_path)))
            os.chmod(self.socket_path, 0o666)  # reachable only where it is mounted: the sandbox
        except OSError as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._shutdown())
        loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def stop(self) -> list[Attempt]:
        """Close the listener and every open tunnel; return the attempts recorded."""
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        with self._lock:
            return list(self.attempts)

    def summary(self) -> dict[str, object]:
        """The facts a run records: the allowlist, counts and the attempts themselves."""
        with self._lock:
            attempts = [a.as_dict() for a in self.attempts]
            dropped = self.dropped
        return {"allowlist": [str(r) for r in self.rules],
                "allowed": sum(1 for a in attempts if a["allowed"]),
                "refused": sum(1 for a in attempts if not a["allowed"]) + dropped,
                "bytes_up": sum(int(a["bytes_up"]) for a in attempts),  # type: ignore[call-overload]
                "bytes_down": sum(int(a["bytes_down"]) for a in attempts),  # type: ignore[call-overload]
                "attempts": attempts, "attempts_not_listed": dropped}

    def _record(self, attempt: Attempt) -> None:
        with self._lock:
            if len(self.attempts) < MAX_RECORDED:
                self.attempts.append(attempt)
            elif not attempt.allowed:
                self.dropped += 1

    # -- one connection ---------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        started = time.monotonic()
        attempt = Attempt(host="", port=0, method="", allowed=False, reason="")
        upstream: asyncio.StreamWriter | None = None
        try:
            first = await asyncio.wait_for(reader.read(1), _HEAD_TIMEOUT_S)
            if not first:
                return  # opened and closed without a word: not an attempt
            if first in (b"\x04", b"\x05"):  # SOCKS4/5: not offered (names would escape vetting)
                raise _Refused("SOCKS is not offered; use the HTTP proxy", 400)
            try:
                head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
            except asyncio.LimitOverrunError:
                raise _Refused("request head too large", 431) from None
            except (TimeoutError, asyncio.IncompleteReadError) as exc:
                partial = first + getattr(exc, "partial", b"")
                raise _Refused("not an HTTP proxy request" if b"\r\n" not in partial
                               else "incomplete request head", 400) from None
            method, host, port, forward = self._parse(head, attempt)
            attempt.method, attempt.host, attempt.port = method, host, port
            address = await self._vet(host, port)
            attempt.address = address
            try:
                up_reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(address, port), _CONNECT_TIMEOUT_S)
            except (TimeoutError, OSError) as exc:
                raise _Refused(f"upstream unreachable: {type(exc).__name__}", 502) from None
            attempt.allowed, attempt.reason = True, "allowed"
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                await writer.drain()
            else:
                upstream.write(forward)
                attempt.bytes_up += len(forward)
            await self._pipe(reader, writer, up_reader, upstream, attempt)
        except _Refused as refused:
            attempt.allowed, attempt.reason = False, refused.reason
            with contextlib.suppress(OSError):
                body = f"intake egress refused: {refused.reason}\n".encode()
                writer.write(b"HTTP/1.1 %d Refused\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (refused.status, len(body), body))
                await writer.drain()
        except (OSError, TimeoutError, asyncio.CancelledError):
            if not attempt.reason:
                attempt.reason = "closed"
        finally:
            attempt.duration_ms = int((time.monotonic() - started) * 1000)
            if attempt.reason:
                self._record(attempt)
            for w in (writer, upstream):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()
            self._tasks.discard(task)

    def _parse(self, head: bytes, attempt: Attempt) -> tuple[str, str, int, bytes]:
        """The request's method, target host and port, and (plain HTTP) the bytes to forward."""
        try:
            text = head.decode("ascii")
        except UnicodeDecodeError:
            raise _Refused("request head is not ASCII", 400) from None
        lines = text.split("\r\n")
        line = _REQUEST_LINE.fullmatch(lines[0])
        if line is None:
            raise _Refused("not an HTTP proxy request", 400)
        method, target = line["method"], line["target"]
        attempt.method = method
        headers: list[tuple[str, str]] = []
        for raw in lines[1:]:
            if not raw:
                continue
            name, sep, value = raw.partition(":")
            if not sep or not re.fullmatch(r"[!#-'*+.0-9A-Z^-z|~-]+", name):
                raise _Refused("malformed header", 400)
            headers.append((name, value.strip()))
        hosts = [v for n, v in headers if n.lower() == "host"]
        if method == "CONNECT":
            authority, rest = target, None
        else:
            absolute = _ABSOLUTE.fullmatch(target)
            if absolute is None:
                raise _Refused("only CONNECT and absolute http:// requests are proxied", 400)
            authority, rest = absolute["authority"], absolute["rest"] or "/"
        host, port = _authority(authority, 443 if method == "CONNECT" else 80, require_port=method == "CONNECT")
        attempt.host, attempt.port = host, port
        if len(hosts) > 1:
            raise _Refused("more than one Host header", 400)
        if hosts:
            seen = _authority(hosts[0].lower(), port, require_port=False)
            if seen != (host, port):
                raise _Refused("Host header differs from the target", 400)
        if method == "CONNECT":
            return method, host, port, b""
        kept = [(n, v) for n, v in headers if n.lower() not in _HOP and n.lower() != "host"]
        out = [f"{method} {rest} HTTP/1.1", f"Host: {authority}", *(f"{n}: {v}" for n, v in kept),
               "Connection: close", "", ""]
        return method, host, port, "\r\n".join(out).encode("ascii")

    async def _vet(self, host: str, port: int) -> str:
        """The address to connect to for ``host:port``, or :class:`_Refused`."""
        rules = [r for r in self.rules if r.matches(host, port)]
        literal = _literal(host)
        if not rules:
            raise _Refused("not on the allowlist")
        if literal is not None:
            if not is_public(literal) and not any(r.literal == literal for r in rules):
                raise _Refused(f"address {literal} is not public")
            return str(literal)
        try:
            addresses = await asyncio.wait_for(self.resolver(host, port), _CONNECT_TIMEOUT_S)
        except (TimeoutError, OSError, UnicodeError):
            raise _Refused("name does not resolve", 502) from None
        if not addresses:
            raise _Refused("name does not resolve", 502)
        literals = {r.literal for r in self.rules if r.literal is not None and r.port == port}
        for value in addresses:
            address = ipaddress.ip_address(value)
            if not is_public(address) and address not in literals:
                raise _Refused(f"{host} resolves to {address}, which is not public")
        return addresses[0]

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_reader: asyncio.StreamReader, upstream: asyncio.StreamWriter, attempt: Attempt) -> None:
        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            with contextlib.suppress(OSError):
                while chunk := await src.read(65536):
                    if up:
                        attempt.bytes_up += len(chunk)
                    else:
                        attempt.bytes_down += len(chunk)
                    dst.write(chunk)
                    await dst.drain()
            with contextlib.suppress(OSError):
                if dst.can_write_eof():
                    dst.write_eof()

        # Bytes the client sent after the head (already buffered in ``reader``) go through too.
        await asyncio.gather(copy(reader, upstream, True), copy(up_reader, writer, False))


def _authority(value: str, default_port: int, *, require_port: bool) -> tuple[str, int]:
    """``host[:port]`` (or ``[v6]:port``) as a normalised (host, port); :class:`_Refused` if bad."""
    found = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::([0-9]{1,5}))?", value)
    if found is None or (require_port and found[2] is None):
        raise _Refused("target must be host:port", 400)
    host = found[1].lower().rstrip(".")
    if host.startswith("["):
        address = _literal(host)
        if address is None:
            raise _Refused("bad IPv6 literal", 400)
        host = str(address)
    elif not re.fullmatch(_HOST, host):
        raise _Refused("bad host name", 400)
    port = int(found[2]) if found[2] else default_port
    if not 1 <= port <= 65535:
        raise _Refused("bad port", 400)
    return host, port
