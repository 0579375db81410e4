"""Who really sent a message: DKIM (RFC 6376, rsa-sha256 and RFC 8463 ed25519-sha256) through
dkimpy, DMARC-style alignment of the signing domain with the From domain, and, from configured
authserv-ids only, an upstream MX's ``Authentication-Results`` (RFC 8601) or ARC chain.

The verdict is provenance: ``pass`` means a signature that verifies was made by a domain
aligned with the From header's domain (the same domain, or, unless the From domain's DMARC
record says ``adkim=s``, the same organisational domain). ``fail`` means signatures were
present but none verified and aligned; ``none`` means the message was not signed. Nothing in the
message but signatures, and results from a trusted authserv-id, moves the verdict.

DNS goes through one small interface (:class:`TxtResolver`); :class:`DnsResolver` is the real
one (dnspython). A lookup that times out raises :class:`DnsUnavailable` so the sender's MTA
retries later instead of the mail being judged on missing data.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal, Protocol

import dkim
import dns.exception
import dns.resolver

from intake.channels.email.message import ParsedMail

Result = Literal["pass", "fail", "none"]
MAX_SIGNATURES = 5  # more than this many DKIM-Signature headers are not all tried
MAX_WALK = 8  # DMARCbis tree walk: at most this many _dmarc lookups per domain

# dkimpy logs signature details at debug and errors at error; none of it belongs in our logs.
_DKIM_LOG = logging.getLogger("intake.channels.email.dkimpy")
_DKIM_LOG.addHandler(logging.NullHandler())
_DKIM_LOG.propagate = False


class DnsUnavailable(Exception):
    """DNS could not answer in time: a temporary failure (SMTP 451), never a verdict."""


class TxtResolver(Protocol):
    def txt(self, name: str) -> list[str]:
        """Every TXT record at ``name`` (each record's strings joined); [] when there is none."""


class DnsResolver:
    """The real resolver: dnspython, with a bounded lifetime per lookup."""

    def __init__(self, lifetime: float = 5.0) -> None:
        self.lifetime = lifetime

    def txt(self, name: str) -> list[str]:
        try:
            answer = dns.resolver.resolve(name, "TXT", lifetime=self.lifetime, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return []
        except (dns.exception.Timeout, dns.resolver.NoResolverConfiguration, dns.resolver.LifetimeTimeout) as exc:
            raise DnsUnavailable(type(exc).__name__) from None
        except dns.exception.DNSException:  # a name that is not a valid DNS name, etc.
            return []
        return [b"".join(r.strings).decode("ascii", "replace") for r in answer]


@dataclass(frozen=True)
class Verdict:
    """The authenticity of one message, as recorded in the idea's provenance."""

    result: Result
    domain: str = ""
    selector: str = ""
    method: str = ""  # "dkim", "authentication-results:<authserv-id>" or "arc:<authserv-id>"
    reason: str = ""

    @property
    def verified(self) -> bool:
        return self.result == "pass"

    def provenance(self) -> dict[str, str]:
        out = {"dkim": self.result}
        for key, value in (("dkim_domain", self.domain), ("dkim_selector", self.selector),
                           ("verified_by", self.method if self.verified else ""),
                           ("dkim_reason", "" if self.verified else self.reason)):
            if value:
                out[key] = value
        return out


def _dnsfunc(resolver: TxtResolver):  # type: ignore[no-untyped-def]
    """dkimpy's ``dnsfunc`` over our resolver (it asks with bytes and a trailing dot)."""

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        records = resolver.txt(name.decode("ascii", "replace").rstrip(".").lower())
        return records[0].encode() if records else None

    return lookup


# -- alignment ------------------------------------------------------------------------------

def _dmarc_record(name: str, resolver: TxtResolver) -> dict[str, str] | None:
    records = [r for r in resolver.txt(f"_dmarc.{name}") if re.match(r"v\s*=\s*DMARC1\s*(?:;|\Z)", r)]
    if len(records) != 1:  # RFC 7489 §6.6.3: none, or more than one, is no record
        return None
    tags = {}
    for item in records[0].split(";"):
        key, sep, value = item.partition("=")
        if sep:
            tags[key.strip().lower()] = value.strip().lower()
    return tags


def _walk(domain: str, resolver: TxtResolver) -> list[tuple[str, dict[str, str]]]:
    """DMARC records from ``domain`` up towards the root (not the TLD), nearest first."""
    labels = domain.split(".")
    found = []
    for start in range(0, max(0, len(labels) - 1)):
        if len(found) >= MAX_WALK or start >= MAX_WALK:
            break
        name = ".".join(labels[start:])
        record = _dmarc_record(name, resolver)
        if record is not None:
            found.append((name, record))
    return found


def organisational_domain(domain: str, resolver: TxtResolver) -> str:
    """The organisational domain by the DMARCbis DNS tree walk: the domain whose record says
    ``psd=n``; the one below a ``psd=y`` record; else the shortest domain with a record; else
    ``domain`` itself. (No public suffix list: DNS says where an organisation starts.)"""
    walked = _walk(domain, resolver)
    labels = domain.split(".")
    for name, record in walked:
        if record.get("psd") == "n":
            return name
        if record.get("psd") == "y":
            below = len(name.split(".")) + 1
            return ".".join(labels[-below:]) if below <= len(labels) else domain
    return walked[-1][0] if walked else domain


def aligned(signing_domain: str, from_domain: str, resolver: TxtResolver) -> bool:
    """DMARC DKIM identifier alignment: strict when the From domain's policy says
    ``adkim=s``, else relaxed (same organisational domain)."""
    d, f = signing_domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if d == f:
        return True
    walked = _walk(f, resolver)
    if walked and walked[0][1].get("adkim") == "s":
        return False
    return organisational_domain(d, resolver) == organisational_domain(f, resolver)


# -- DKIM -----------------------------------------------------------------------------------

def verify_dkim(raw: bytes, mail: ParsedMail, resolver: TxtResolver) -> Verdict:
    """Every DKIM-Signature (up to :data:`MAX_SIGNATURES`), verified; the first that verifies
    and aligns with the From domain is a pass."""
    crlf = re.sub(rb"(?<!\r)\n", b"\r\n", raw)
    count = sum(1 for name, _ in mail.headers if name.lower() == "dkim-signature")
    if count == 0:
        return Verdict("none", reason="the message is not DKIM-signed")
    first: Verdict | None = None
    for idx in range(min(count, MAX_SIGNATURES)):
        signer = dkim.DKIM(crlf, logger=_DKIM_LOG, minkey=1024)
        try:
            ok = signer.verify(idx=idx, dnsfunc=_dnsfunc(resolver))
            reason = "" if ok else "the signature did not verify"
        except dkim.DKIMException as exc:
            ok, reason = False, f"the signature is unusable ({type(exc).__name__})"
        except (ValueError, TypeError, IndexError, KeyError, UnicodeError):  # dkimpy on hostile input
            ok, reason = False, "the signature is malformed"
        if ok and b"l" in signer.signature_fields:
            # l= signs only the first bytes of the body: anyone could append their own words.
            ok, reason = False, "the signature covers only part of the body (l=)"
        domain = _text(signer.domain)
        selector = _text(signer.selector) if signer.domain else ""
        if ok and aligned(domain, mail.from_domain, resolver):
            return Verdict("pass", domain, selector, "dkim")
        if ok:
            reason = f"signed by {domain}, which is not aligned with the From domain {mail.from_domain}"
        if first is None or (ok and "aligned" not in first.reason):
            first = Verdict("fail", domain, selector, "dkim", reason)
    assert first is not None
    return first


def _text(value: object) -> str:
    raw = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    return re.sub(r"[^A-Za-z0-9._-]", "", raw)[:253]


# -- Authentication-Results and ARC from trusted authserv-ids ------------------------------

def _strip_comments(value: str) -> str:
    for _ in range(5):  # nested comments: innermost first
        value = re.sub(r"\([^()]*\)", " ", value)
    return value


def parse_authentication_results(value: str) -> tuple[str, list[dict[str, str]]]:
    """An ``Authentication-Results`` value as (authserv-id, results). Each result is a dict
    of ``method``, ``result`` and its ``ptype.property`` values (lower-cased)."""
    parts = [p.strip() for p in _strip_comments(value).split(";")]
    authserv = parts[0].split()[0].lower() if parts and parts[0].split() else ""
    results = []
    for item in parts[1:]:
        tokens = item.split()
        if not tokens or "=" not in tokens[0]:
            continue
        method, _, result = tokens[0].partition("=")
        entry = {"method": method.lower(), "result": result.lower()}
        for token in tokens[1:]:
            key, sep, val = token.partition("=")
            if sep and "." in key:
                entry[key.lower()] = val.strip('"').lower()
        results.append(entry)
    return authserv, results


def _verdict_from_results(results: list[dict[str, str]], mail: ParsedMail, resolver: TxtResolver,
                          method: str) -> Verdict | None:
    """A pass from one trusted result set: an aligned ``dkim=pass``, or ``dmarc=pass`` for
    exactly the message's From domain."""
    dkim_passes = [r for r in results if r["method"] == "dkim" and r["result"] == "pass"]
    for r in dkim_passes:
        domain = r.get("header.d") or r.get("header.i", "").rpartition("@")[2]
        if domain and aligned(domain, mail.from_domain, resolver):
            return Verdict("pass", _text(domain), _text(r.get("header.s", "")), method)
    for r in results:
        if r["method"] == "dmarc" and r["result"] == "pass" and r.get("header.from") == mail.from_domain:
            selector = next((_text(d.get("header.s", "")) for d in dkim_passes), "")
            return Verdict("pass", mail.from_domain, selector, method)
    return None


def trusted_results(mail: ParsedMail, trusted: frozenset[str], resolver: TxtResolver,
                    ) -> tuple[bool, Verdict | None]:
    """The topmost ``Authentication-Results`` header from a trusted authserv-id: ``(found,
    verdict)``, the verdict only when it says pass; every other such header is ignored. The
    trusted MX must delete incoming copies bearing its own id (RFC 8601 §5), as
    Postfix/OpenDMARC and hosted mail do."""
    if not trusted:
        return False, None
    for name, value in mail.headers:
        if name.lower() != "authentication-results":
            continue
        authserv, results = parse_authentication_results(value)
        if authserv in trusted:
            return True, _verdict_from_results(results, mail, resolver, f"authentication-results:{authserv}")
    return False, None


def _seal_domains(mail: ParsedMail) -> dict[int, str]:
    """Each ARC set's sealer: instance ``i=`` -> the ``d=`` of its ARC-Seal (lower-cased)."""
    found: dict[int, str] = {}
    for name, value in mail.headers:
        if name.lower() != "arc-seal":
            continue
        tags = dict((k.strip().lower(), v.strip()) for k, _, v in
                    (t.partition("=") for t in re.sub(r"\s+", "", value).split(";") if "=" in t))
        if re.fullmatch(r"\d{1,2}", tags.get("i", "")) and tags.get("d"):
            found[int(tags["i"])] = tags["d"].lower()
    return found


def trusted_arc(raw: bytes, mail: ParsedMail, trusted: frozenset[str], resolver: TxtResolver,
                sealers: frozenset[str] = frozenset()) -> Verdict | None:
    """A pass recorded by a trusted authserv-id in an ARC set (RFC 8617), believed only when
    the whole chain validates (so the results were sealed by that hop and not changed since)
    **and** that set was sealed by a configured trusted sealer domain (``sealers``): anyone can
    seal a valid chain with their own key and write any authserv-id into it, so the chain's
    validity says nothing about who vouched. No sealers configured: ARC never counts."""
    if not trusted or not sealers or not any(n.lower() == "arc-seal" for n, _ in mail.headers):
        return None
    crlf = re.sub(rb"(?<!\r)\n", b"\r\n", raw)
    try:
        cv, _, _ = dkim.arc_verify(crlf, logger=_DKIM_LOG, dnsfunc=_dnsfunc(resolver))
    except (dkim.DKIMException, ValueError, TypeError, IndexError, KeyError, UnicodeError):
        return None
    if cv != dkim.CV_Pass:
        return None
    sets = []
    for name, value in mail.headers:
        if name.lower() == "arc-authentication-results":
            instance, _, rest = value.partition(";")
            match = re.fullmatch(r"\s*i\s*=\s*(\d{1,2})\s*", instance)
            if match:
                sets.append((int(match.group(1)), rest))
    seal_domains = _seal_domains(mail)
    for instance, rest in sorted(sets, reverse=True):  # the most recent hop first
        authserv, results = parse_authentication_results(rest)
        if authserv in trusted and seal_domains.get(instance) in sealers:
            return _verdict_from_results(results, mail, resolver, f"arc:{authserv}")
    return None


def authenticate(raw: bytes, mail: ParsedMail, resolver: TxtResolver, trusted: frozenset[str],
                 sealers: frozenset[str] = frozenset()) -> Verdict:
    """The message's verdict: our own DKIM check; failing that, a pass vouched for by a
    trusted authserv-id (its own Authentication-Results, then an ARC set sealed by one of
    ``sealers``); otherwise our own fail or none. When the trusted MTA's own
    Authentication-Results is there and does not pass, ARC is not asked: what the trusted
    hop saw itself is never overridden by what an earlier hop claims it saw."""
    own = verify_dkim(raw, mail, resolver)
    if own.verified:
        return own
    found, vouched = trusted_results(mail, trusted, resolver)
    if vouched is not None:
        return vouched
    if found:
        return own
    return trusted_arc(raw, mail, trusted, resolver, sealers) or own
