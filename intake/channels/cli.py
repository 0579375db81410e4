"""The CLI channel: an idea filed through the broker's API by an authenticated caller.

The transport is the API's own authentication (the unix socket's peer credentials or an API
token; intake.api.callers). The filer is the caller; ``--as NAME`` names someone else as the
author, and the filer is still recorded. A caller-chosen ``--delivery-id`` is namespaced by the
filer, so two people reusing the same id never collide (and never learn each other's ideas).
"""

from __future__ import annotations

import uuid

from pydantic import ValidationError

from intake.core.errors import InvalidInput
from intake.core.models import Channel, IdeaDraft
from intake.people.registry import parse_identity


def cli_draft(*, filer: str, via: str, text: str, title: str = "", author: str | None = None,
              delivery_id: str | None = None) -> IdeaDraft:
    """The draft for one API-filed idea. Raises InvalidInput for a bad author or field."""
    requester = parse_identity(f"cli:{author}") if author is not None else filer
    delivery = f"{filer}:{delivery_id}" if delivery_id else f"api-{uuid.uuid4()}"
    try:
        return IdeaDraft(channel=Channel.CLI, requester=requester, filed_by=filer, delivery_id=delivery,
                         text=text, title=title, provenance={"via": f"api:{via}"})
    except ValidationError as exc:
        raise InvalidInput(f"invalid idea: {exc.errors()[0]['msg']}") from None
