"""How the API says it is an intake broker, so the CLI can refuse anything else listening at
INTAKE_URL before it sends a token there.

Every ``/api/v1`` response (errors and outage 503s included) carries :data:`HEADER`; the
unauthenticated :data:`PATH` answers :data:`SERVICE`. This is a guard against a misconfigured
URL (another service on :8080), not authentication of the broker: a server that copies the
header is not stopped by it. Over a network only ``https://`` (or the local socket, where the
kernel names the peer) authenticates the broker.
"""

from __future__ import annotations

HEADER = "Intake-Broker"
VALUE = "api=1"
PATH = "/identity"  # under /api/v1
SERVICE = {"service": "intake-broker", "api": 1}
