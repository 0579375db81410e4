"""Idea and task ids as people type them: any case, and a unique prefix instead of the whole id.

An id is ``I-`` (idea) or ``T-`` (task) and 12 hex digits (:func:`intake.core.models.new_id`). People
may type ``i-3F9A`` for ``I-3f9a1c2b7d0e``: :func:`parse_id_prefix` folds the case and checks the
shape with ``re.fullmatch`` (a prefix is at least :data:`MIN_PREFIX` hex digits, so a slip of
the keyboard does not pick a task), and the kind letter decides which index is searched: an
idea prefix never names a task, nor the other way round.
"""

from __future__ import annotations

import re

from intake.core.errors import InvalidInput

MIN_PREFIX = 4
ID_LENGTH = 12
KIND_NAMES = {"I": "idea", "T": "task"}
_PREFIX = re.compile(rf"([IiTt])-([0-9a-fA-F]{{{MIN_PREFIX},{ID_LENGTH}}})")


def parse_id_prefix(text: str, kinds: str = "IT") -> str:
    """``text`` as a canonical id or id prefix (``I-3f9a``) of one of ``kinds``, or InvalidInput."""
    match = _PREFIX.fullmatch(text)  # no strip: "I-3f9a\n" is not an id
    wanted = " or ".join(f"{KIND_NAMES[k]} id ({k}-…)" for k in kinds)  # "idea id (I-…) or task id (T-…)"
    if match is None:
        raise InvalidInput(f"{text!r} is not {'an' if kinds[0] == 'I' else 'a'} {wanted}: {kinds[0]}- and at least {MIN_PREFIX} of its "
                           f"{ID_LENGTH} hex digits")
    kind = match.group(1).upper()
    if kind not in kinds:
        article = "an" if KIND_NAMES[kind][0] in "aeiou" else "a"
        raise InvalidInput(f"{text!r} is {article} {KIND_NAMES[kind]} id; this needs a {wanted}")
    return f"{kind}-{match.group(2).lower()}"


def is_whole(ident: str) -> bool:
    """Whether a parsed id is complete (no lookup needed)."""
    return len(ident) == 2 + ID_LENGTH
