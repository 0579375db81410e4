"""SPDX license expressions, parsed and checked with ``license-expression``.

An expression passes the policy when some choice it offers is acceptable: ``A OR B`` passes
if either side does, ``A AND B`` only if both do, ``A WITH exception`` as ``A`` does. A
license id passes when it is not denied and, if the policy lists allowed ids, is one of them.
Ids are compared by their SPDX key, so deprecated aliases (``GPL-3.0``) count as the license
they name (``GPL-3.0-only``).
"""

from __future__ import annotations

from collections.abc import Collection
from functools import lru_cache
from typing import Any

from license_expression import ExpressionError, LicenseSymbol, LicenseWithExceptionSymbol, get_spdx_licensing

_LICENSING = get_spdx_licensing()


@lru_cache(maxsize=512)
def parse_license(expression: str) -> Any:
    """The parsed expression; ``ValueError`` (one line) if it is not a valid SPDX expression of
    known ids."""
    if not expression.strip() or len(expression) > 500:
        raise ValueError(f"{expression!r} is not an SPDX license expression")
    try:
        parsed = _LICENSING.parse(expression, validate=True, strict=False)
    except ExpressionError as exc:
        raise ValueError(f"{expression!r} is not a valid SPDX license expression: {exc}") from None
    if parsed is None:
        raise ValueError(f"{expression!r} is not an SPDX license expression")
    return parsed


def license_key(license_id: str) -> str:
    """The SPDX key of one license id (``GPL-3.0`` -> ``GPL-3.0-only``); ``ValueError`` if the id
    is unknown or is an expression rather than one id."""
    parsed = parse_license(license_id)
    if not isinstance(parsed, LicenseSymbol):
        raise ValueError(f"{license_id!r} must be one SPDX license id, not an expression")
    return str(parsed.key)


def license_passes(expression: str, allowed: Collection[str], denied: Collection[str]) -> bool:
    """Whether ``expression`` passes (see the module docstring); ``allowed``/``denied`` hold SPDX
    keys (see :func:`license_key`). ``ValueError`` if ``expression`` does not parse."""
    def ok(node: Any) -> bool:
        if isinstance(node, LicenseWithExceptionSymbol):
            node = node.license_symbol
        if isinstance(node, LicenseSymbol):
            return node.key not in denied and (not allowed or node.key in allowed)
        if node.__class__.__name__ == "AND":
            return all(ok(arg) for arg in node.args)
        return any(ok(arg) for arg in node.args)  # OR

    return ok(parse_license(expression))


def same_license(first: str, second: str) -> bool:
    """Whether two license expressions say the same thing (``MIT OR ISC`` is ``ISC OR MIT``,
    ``GPL-3.0`` is ``GPL-3.0-only``); text that is no SPDX expression equals only itself."""
    try:
        return bool(_LICENSING.is_equivalent(parse_license(first), parse_license(second)))
    except ValueError:
        return " ".join(first.split()) == " ".join(second.split())
