"""Repository path patterns: what a task spec's allowed and blocked paths mean.

Path patterns (``allowed_paths``/``blocked_paths`` of a task spec) are anchored at the
repository root and use these rules:

* ``*`` matches any run of characters within one path segment, ``?`` exactly one character,
  ``[abc]``/``[a-z]``/``[!abc]`` one character of (or not of) a set; none of them matches ``/``.
* ``**`` as a whole segment matches any number of segments, including none: ``**/*.pem``
  matches ``k.pem`` and ``a/b/k.pem``; ``a/**/b`` matches ``a/b`` and ``a/x/y/b``.
* A trailing ``/**`` (or a trailing ``/``) matches the directory *itself* and everything
  beneath it: ``payments/keys/**`` matches ``payments/keys`` (say a file that replaced the
  directory) as well as ``payments/keys/a/b.pem``.
* A pattern without ``**`` matches at the root only: ``*.pem`` matches ``k.pem`` but not
  ``a/k.pem``. A leading ``/`` is allowed and means the same.
* ``\\`` escapes the next character.

Blocked patterns match case-insensitively (a checkout on a case-insensitive file system would
treat ``Payments/Keys`` as ``payments/keys``); allowed patterns match case-sensitively. Both
make the gate stricter, never looser.
"""

from __future__ import annotations

import re
from functools import lru_cache


def is_safe_path(path: str) -> bool:
    """A clean repository-relative path: not empty or absolute, no ``.``/``..``/empty segment,
    no ``.git`` segment, no NUL. git never produces anything else, so anything else is refused.
    """
    if not path or path.startswith("/") or "\0" in path:
        return False
    return all(seg not in {"", ".", ".."} and seg.lower() != ".git" for seg in path.split("/"))


def _class(body: str) -> str:
    negate = body[:1] in {"!", "^"}
    if negate:
        body = body[1:]
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            i += 1
            ch = body[i]
            out.append("\\" + ch if ch in "\\]^[-" else ch)
        else:
            out.append("\\" + ch if ch in "\\]^[" else ch)
        i += 1
    # A class never matches "/": a segment cannot contain one.
    return f"[^/{''.join(out)}]" if negate else f"(?!/)[{''.join(out)}]"


def _segment(seg: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(seg):
        ch = seg[i]
        if ch == "\\":
            i += 1
            out.append(re.escape(seg[i]) if i < len(seg) else re.escape("\\"))
        elif ch == "*":
            while i + 1 < len(seg) and seg[i + 1] == "*":  # "a**b" is just "a*b"
                i += 1
            out.append("[^/]*")
        elif ch == "?":
            out.append("[^/]")
        elif ch == "[":
            # "]" right after "[" (or "[!") is a literal member, as in fnmatch.
            j = i + 1
            if j < len(seg) and seg[j] in "!^":
                j += 1
            if j < len(seg) and seg[j] == "]":
                j += 1
            while j < len(seg) and seg[j] != "]":
                j += 2 if seg[j] == "\\" else 1
            if j >= len(seg):
                out.append(re.escape("["))  # unterminated: a literal "["
            else:
                out.append(_class(seg[i + 1 : j]))
                i = j
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


@lru_cache(maxsize=1024)
def _compile(pattern: str, case_sensitive: bool) -> re.Pattern[str]:
    pat = pattern[1:] if pattern.startswith("/") else pattern
    if pat.endswith("/"):
        pat += "**"
    segments = pat.split("/")
    if not pat or any(seg in {"", ".", ".."} for seg in segments):
        raise ValueError(f"invalid path pattern: {pattern!r}")
    regex = ""
    for index, seg in enumerate(segments):
        last = index == len(segments) - 1
        if seg == "**" and last:
            # Trailing "**": everything below, and the directory itself when there is one.
            regex = regex[:-1] + "(?:/.*)?" if regex else ".*"
        elif seg == "**":
            regex += "(?:[^/]+/)*"
        else:
            regex += _segment(seg) + ("" if last else "/")
    flags = re.DOTALL | (0 if case_sensitive else re.IGNORECASE)
    try:
        return re.compile(regex, flags)
    except re.error as exc:
        raise ValueError(f"invalid path pattern: {pattern!r}: {exc}") from None


def validate_pattern(pattern: str) -> None:
    """Raise ``ValueError`` if ``pattern`` is not a valid path pattern (see module docs)."""
    _compile(pattern, True)


def glob_match(pattern: str, path: str, *, case_sensitive: bool = True) -> bool:
    """Whether repository path ``path`` matches ``pattern`` (rules in the module docstring).

    An unsafe path (see :func:`is_safe_path`) matches nothing; :func:`check_paths` reports it.
    Raises ``ValueError`` for an invalid pattern.
    """
    if not is_safe_path(path):
        return False
    return _compile(pattern, case_sensitive).fullmatch(path) is not None
