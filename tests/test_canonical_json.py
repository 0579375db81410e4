"""canonical_json: the one encoding every MAC, seal and hash is computed over. Its bytes must
never change (stored MACs and seals would stop verifying), whatever makes it faster."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from intake.core.models import canonical_json

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_DOCUMENTS = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                          max_leaves=20)


@given(_DOCUMENTS)
def test_canonical_json_is_byte_for_byte_the_documented_dumps(doc: Any) -> None:
    assert canonical_json(doc) == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def test_canonical_json_known_bytes() -> None:
    doc = {"b": [1, 2.5, None, True], "a": "é\u202e<&>\"\\", "c": {"z": 1e16, "y": -0.0}}
    assert canonical_json(doc) == '{"a":"é\u202e<&>\\"\\\\","b":[1,2.5,null,true],"c":{"y":-0.0,"z":1e+16}}'.encode()
