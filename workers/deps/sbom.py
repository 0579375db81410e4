"""A CycloneDX 1.6 SBOM of a change's dependency delta, and its digest.

One component per package version the change brings in (added, upgraded, downgraded or
changed; a removal is no component), with its purl, license and hash where known, and
``intake:change`` / ``intake:before`` properties. The document is stored in the task result
as a dict; ``sbom_sha256`` is the SHA-256 of its canonical JSON (sorted keys, no spaces,
UTF-8: :func:`intake.core.models.canonical_json`), the bytes a provenance statement names.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.model.license import LicenseExpression
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from intake.core.licenses import parse_license
from intake.core.models import canonical_json, sha256_hex
from intake.core.versions import PackageRef

from .delta import Change

_PURL_TYPE = {"pypi": "pypi", "npm": "npm", "go": "golang", "cargo": "cargo"}
_ALGORITHMS = {"sha256": HashAlgorithm.SHA_256, "sha384": HashAlgorithm.SHA_384, "sha512": HashAlgorithm.SHA_512}


def purl_of(ref: PackageRef, version: str | None) -> str:
    """The package URL: ``pkg:pypi/requests@2.32.3``, ``pkg:npm/%40scope/x@1.0.0``,
    ``pkg:golang/github.com/google/uuid@v1.6.0``, ``pkg:cargo/serde@1.0.0``."""
    namespace, _, name = ref.name.rpartition("/")
    return str(PackageURL(type=_PURL_TYPE[ref.ecosystem], namespace=namespace or None, name=name,
                          version=version))


def _hash(integrity: str | None) -> HashType | None:
    """A CycloneDX hash from ``sha256:<hex>`` or npm's ``sha512-<base64>``; others (go.sum's
    ``h1:`` dirhash) are not file hashes and stay a property."""
    if not integrity:
        return None
    algorithm, sep, value = integrity.partition(":")
    if not sep:
        algorithm, sep, value = integrity.partition("-")
        try:
            value = base64.b64decode(value, validate=True).hex()
        except (binascii.Error, ValueError):
            return None
    if algorithm.lower() not in _ALGORITHMS or not value:
        return None
    return HashType(alg=_ALGORITHMS[algorithm.lower()], content=value.lower())


def build_sbom(changes: Sequence[Change], licenses: Sequence[str | None]) -> dict[str, Any]:
    """The CycloneDX 1.6 JSON document (as a dict) for ``changes``; ``licenses[i]`` is the
    license the gate settled on for ``changes[i]``."""
    bom = Bom()
    for change, license in zip(changes, licenses, strict=True):
        if change.change == "removed":
            continue
        for version in change.new_versions or change.after:
            integrity, locked_license = change.facts.get(version, (None, None))
            shown = locked_license or license
            props = [Property(name="intake:change", value=change.change)]
            if change.before:
                props.append(Property(name="intake:before", value=", ".join(change.before)))
            digest = _hash(integrity)
            if integrity and digest is None:
                props.append(Property(name="intake:integrity", value=integrity))
            valid_license = None
            if shown:
                try:
                    valid_license = str(parse_license(shown))
                except ValueError:
                    props.append(Property(name="intake:license", value=shown[:200]))
            purl = purl_of(change.package, version)
            bom.components.add(Component(
                name=change.package.name, version=version, type=ComponentType.LIBRARY,
                purl=PackageURL.from_string(purl), bom_ref=purl,
                licenses=[LicenseExpression(valid_license)] if valid_license else None,
                hashes=[digest] if digest else None, properties=props,
            ))
    return dict(json.loads(JsonV1Dot6(bom).output_as_string()))


def sbom_digest(sbom: dict[str, Any]) -> str:
    """SHA-256 (hex) of the SBOM's canonical JSON bytes."""
    return sha256_hex(canonical_json(sbom))
