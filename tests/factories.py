"""Small factories for test data."""

from __future__ import annotations

import itertools
from typing import Any

from intake.core.models import Channel, IdeaDraft

_seq = itertools.count(1)


def draft(**overrides: Any) -> IdeaDraft:
    n = next(_seq)
    fields: dict[str, Any] = {
        "channel": Channel.SLACK,
        "requester": "slack:U0REQUEST1",
        "delivery_id": f"Ev{n:08d}",
        "text": f"Please fix the typo in the README (request {n})",
        "provenance": {"channel_id": "C0GENERAL1"},
    }
    fields.update(overrides)
    return IdeaDraft(**fields)
