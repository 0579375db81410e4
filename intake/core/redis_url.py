"""Redis URL shapes that settings validate and the connection helpers use."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

_SENTINEL_URL = re.compile(
    r"redis\+sentinel://(?:(?P<user>[^:@/]*)(?::(?P<password>[^@/]*))?@)?"
    r"(?P<hosts>[^/@,]+:[0-9]{1,5}(?:,[^/@,]+:[0-9]{1,5})*)/(?P<service>[A-Za-z0-9._-]+)(?:/(?P<db>[0-9]{1,2}))?"
)


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://[user:pass@]host:port[,host:port]/service_name[/db]`` URL.
    The credentials are the master's (the Redis user intake logs in as); the Sentinels
    themselves are asked without a password."""

    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The parts of a Sentinel URL, None for any other scheme; ValueError when malformed."""
    if not url.startswith("redis+sentinel://"):
        return None
    found = _SENTINEL_URL.fullmatch(url)
    if found is None:
        raise ValueError("a Sentinel URL is redis+sentinel://[user:pass@]host:port[,host:port]/service_name[/db]")
    hosts = tuple((host.rpartition(":")[0], int(host.rpartition(":")[2])) for host in found["hosts"].split(","))
    return SentinelUrl(hosts, found["service"], int(found["db"] or 0),
                       unquote(found["user"]) if found["user"] else None,
                       unquote(found["password"]) if found["password"] is not None else None)
