"""Small factories for test data."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pyotp

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


def previous_step_code(totp: pyotp.TOTP) -> str:
    """The previous TOTP step's code, to confirm an enrolment while "now" stays free for a test's
    first approval. Taken early enough in the current step that it is still within the ±1-step
    window when the broker checks it: a step that ends within 5 s is waited out first (on a
    loaded machine a confirmation straddling the boundary was refused as out of sync)."""
    left = totp.interval - time.time() % totp.interval
    if left < 5:
        time.sleep(left + 0.05)
    return totp.at(time.time() - totp.interval)
