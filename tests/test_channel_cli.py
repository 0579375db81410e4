"""The CLI channel's drafts: a caller-chosen delivery id is the filer's own."""

from __future__ import annotations

import pytest

from intake.channels.cli import cli_draft
from intake.core.errors import InvalidInput
from intake.storage.store import Store


def test_two_filers_reusing_a_delivery_id_get_their_own_ideas(store: Store) -> None:
    erin, _ = store.capture(cli_draft(filer="cli:erin", via="token", text="one", delivery_id="job-7"))
    mallory, created = store.capture(cli_draft(filer="cli:mallory", via="token", text="two", delivery_id="job-7"))
    again, created_again = store.capture(cli_draft(filer="cli:erin", via="token", text="one", delivery_id="job-7"))
    assert created and mallory.id != erin.id and mallory.text == "two"
    assert not created_again and again.id == erin.id


def test_author_is_checked_and_the_filer_kept() -> None:
    draft = cli_draft(filer="cli:erin", via="socket", text="x", author="bob")
    assert draft.requester == "cli:bob" and draft.filed_by == "cli:erin"
    with pytest.raises(InvalidInput):
        cli_draft(filer="cli:erin", via="socket", text="x", author="Bob\n")
