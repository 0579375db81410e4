"""Package names and versions per ecosystem: normalising, comparing, matching specifiers.

Names: PyPI names are PEP 503 normalised (``Flask_Login`` is ``flask-login``); crate names are
lower-cased with ``_`` as ``-`` (crates.io treats them as one); npm and Go names are exact.

Versions and specifiers (what a policy entry's ``version`` may say):

* ``pypi``: PEP 440 versions and specifier sets (``>=8,<9``, ``~=1.4``, ``==2.*``) via
  ``packaging``; pre-releases match a specifier that they fall within.
* ``npm``: semver versions and npm ranges (``^1.7.0``, ``>=1.7 <2``, ``1.x``, ``~0.30``,
  ``1.2.3 || 2.x``) via ``semantic_version.NpmSpec``.
* ``go``: module versions (``v1.6.0``, pseudo-versions, ``+incompatible``) compared as semver
  without the ``v``; specifiers are comma-separated comparators without the ``v``
  (``>=1.6,<2``, ``^1.6``, ``==1.6.0``) via ``semantic_version.SimpleSpec``.
* ``cargo``: semver versions; specifiers as for Go (``^1.0``, ``~0.4``, ``>=1.2,<2``).

Nothing here raises on hostile input except the ``parse_*``/``validate_*`` functions, which
raise ``ValueError`` with a one-line message (the policy check shows it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import semantic_version
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

ECOSYSTEMS = ("pypi", "npm", "go", "cargo")

_NAME = {
    "pypi": re.compile(r"[a-z0-9]([a-z0-9-]{0,198}[a-z0-9])?"),
    "npm": re.compile(r"(@[a-z0-9][a-z0-9._~-]{0,100}/)?[a-z0-9_~][a-z0-9._~-]{0,213}"),
    "go": re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]*(/[A-Za-z0-9._~+-]+){0,20}"),
    "cargo": re.compile(r"[a-z0-9][a-z0-9-]{0,63}"),
}


def normalize_name(ecosystem: str, name: str) -> str:
    """The name as the ecosystem's index identifies it (see the module docstring)."""
    if ecosystem == "pypi":
        return re.sub(r"[-_.]+", "-", name).lower()
    if ecosystem == "cargo":
        return name.lower().replace("_", "-")
    return name


def is_registry_name(ecosystem: str, name: str) -> bool:
    """Whether ``name`` (normalised) is a plain package name of the ecosystem's index, i.e. not
    a URL, path, alias or another source named by its raw text."""
    pattern = _NAME.get(ecosystem)
    return pattern is not None and len(name) <= 250 and pattern.fullmatch(name) is not None


@dataclass(frozen=True, order=True)
class PackageRef:
    """An ecosystem-qualified, normalised package name: ``pypi:flask-login``."""

    ecosystem: str
    name: str

    def __str__(self) -> str:
        return f"{self.ecosystem}:{self.name}"


def parse_package(text: str) -> PackageRef:
    """``"pypi:Flask_Login"`` -> ``PackageRef("pypi", "flask-login")``; ``ValueError`` if the
    ecosystem is missing or unknown, or the name is not a plain package name."""
    ecosystem, sep, name = text.partition(":")
    if not sep or ecosystem not in ECOSYSTEMS:
        raise ValueError(f"{text!r} must start with an ecosystem: one of "
                         + ", ".join(f"{e}:" for e in ECOSYSTEMS))
    normal = normalize_name(ecosystem, name.strip())
    if not is_registry_name(ecosystem, normal):
        raise ValueError(f"{text!r} is not a valid {ecosystem} package name")
    return PackageRef(ecosystem, normal)


def parse_pinned(text: str) -> tuple[PackageRef, str | None]:
    """``"npm:axios@1.14.1"`` -> (``npm:axios``, ``"1.14.1"``); ``"npm:@scope/x"`` -> (…, None).
    The version must be a valid exact version of the ecosystem."""
    ecosystem, _, rest = text.partition(":")
    at = rest.rfind("@")
    if at > 0:  # "@scope/name" starts with "@": that one is part of the name
        package, version = parse_package(f"{ecosystem}:{rest[:at]}"), rest[at + 1:]
        validate_version(package.ecosystem, version)
        return package, version
    return parse_package(text), None


def _semver(ecosystem: str, version: str) -> semantic_version.Version:
    text = version[1:] if ecosystem == "go" and version.startswith("v") else version
    return semantic_version.Version(text)


def validate_version(ecosystem: str, version: str) -> None:
    """Raise ``ValueError`` unless ``version`` is an exact version of ``ecosystem``."""
    try:
        if ecosystem == "pypi":
            Version(version)
        else:
            _semver(ecosystem, version)
    except (InvalidVersion, ValueError):
        raise ValueError(f"{version!r} is not a valid {ecosystem} version") from None


def is_version(ecosystem: str, version: str) -> bool:
    """Whether ``version`` is an exact version of ``ecosystem`` (not a range)."""
    try:
        validate_version(ecosystem, version)
    except ValueError:
        return False
    return True


def validate_specifier(ecosystem: str, spec: str) -> None:
    """Raise ``ValueError`` unless ``spec`` is a version specifier of ``ecosystem``."""
    try:
        _specifier(ecosystem, spec)
    except (InvalidSpecifier, ValueError):
        raise ValueError(f"{spec!r} is not a valid {ecosystem} version specifier") from None


def _specifier(ecosystem: str, spec: str) -> SpecifierSet | semantic_version.BaseSpec:
    if not spec.strip():
        raise ValueError("empty specifier")
    if ecosystem == "pypi":
        return SpecifierSet(spec)
    if ecosystem == "npm":
        return semantic_version.NpmSpec(spec)
    return semantic_version.SimpleSpec(spec)


def version_in(ecosystem: str, version: str, spec: str) -> bool:
    """Whether ``version`` satisfies ``spec``; an unparseable version or spec never does."""
    try:
        matcher = _specifier(ecosystem, spec)
        if isinstance(matcher, SpecifierSet):
            return matcher.contains(Version(version), prereleases=True)
        return matcher.match(_semver(ecosystem, version))
    except (InvalidSpecifier, InvalidVersion, ValueError):
        return False


def compare(ecosystem: str, a: str, b: str) -> int | None:
    """-1, 0 or 1 as version ``a`` is lower than, equal to or higher than ``b``; ``None`` if
    either does not parse (then the two are only known to differ)."""
    try:
        va: object
        vb: object
        if ecosystem == "pypi":
            va, vb = Version(a), Version(b)
        else:
            va, vb = _semver(ecosystem, a), _semver(ecosystem, b)
    except (InvalidVersion, ValueError):
        return None if a != b else 0
    return (va > vb) - (va < vb)  # type: ignore[operator]


def canonical_version(ecosystem: str, version: str) -> str:
    """One key per release, so that versions compare as set members: on PyPI the parsed PEP 440
    parts with trailing zero release parts dropped (``1.0`` is ``1.0.0``); elsewhere the text
    (Go's without its ``v``). An unparseable version is its own key."""
    if ecosystem != "pypi":
        return version[1:] if ecosystem == "go" and version.startswith("v") else version
    try:
        parsed = Version(version)
    except InvalidVersion:
        return version
    release = list(parsed.release)
    while len(release) > 1 and release[-1] == 0:
        release.pop()
    return repr((parsed.epoch, tuple(release), parsed.pre, parsed.post, parsed.dev, parsed.local))


def same_version(ecosystem: str, a: str, b: str) -> bool:
    """Whether two version strings name the same release (``1.0`` is ``1.0.0`` on PyPI)."""
    return a == b or compare(ecosystem, a, b) == 0
