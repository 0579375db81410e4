"""Ports for servers the tests start as separate processes.

Binding port 0 and closing the socket again hands out a port from the kernel's ephemeral range,
the range every outgoing connection takes its local port from: under xdist another test's
Redis or HTTP client can take that port before the server binds it ("port … in use", seen in
a clean-clone CI run). These ports come from below that range, a block of its own per xdist
worker, in turn, and each is checked to be bindable now.
"""

from __future__ import annotations

import itertools
import os
import socket
from pathlib import Path

BLOCK = 500
_turn = itertools.count()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port on 127.0.0.1 that is free now and that no other xdist worker hands out."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    base = _ephemeral_low() - BLOCK * (index % 16 + 1)
    for _ in range(BLOCK):
        port = base + next(_turn) % BLOCK
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {base}..{base + BLOCK - 1}")
