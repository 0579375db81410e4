"""Issue 12 attacks on id prefixes: the resolver must not be an oracle for callers who may not
read ideas at all (no credential, a forged one), and must not be a way into another kind."""

from __future__ import annotations

import http.client

import pytest
import redis

from tests.api_harness import RunningBroker


def _get(base: str, path: str, token: str | None) -> int:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/api/v1" + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    status = conn.getresponse().status
    conn.close()
    return status


@pytest.mark.parametrize("token", [None, "forged-" + "a" * 40])
def test_resolver_answers_nobody_without_a_valid_credential(api: RunningBroker, rclient: redis.Redis,
                                                            token: str | None) -> None:
    """Over TCP with no token or a forged one: the same 401 for an id that exists, one that does
    not and an ambiguous one, so prefixes cannot be walked to enumerate ideas."""
    rclient.zadd("intake:ideas", {"I-abcd00000001": 1.0, "I-abcd00000002": 2.0, "I-beef00000003": 3.0})
    statuses = {_get(api.tcp_url, f"/ids/{p}", token) for p in ("I-abcd", "I-beef", "I-ffff", "T-beef")}
    assert statuses == {401}
