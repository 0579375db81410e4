"""The audit archive: sealed history older than the hot window, out of Redis, checkable by anyone.

Sealed entries older than ``INTAKE_AUDIT_HOT`` (by their stream id's time) move from Redis into
append-only **segment** files, ``seg-<first>-<last>.jsonl.gz``: gzip'd JSON lines, one per entry,
holding exactly what the chain vouches for (``seq``, stream ``id``, the entry's ``e``/``m``/``k``
fields, its ``verdict`` and ``seal``). The seal chain continues across segments and on into Redis:
:meth:`intake.audit.log.AuditLog.follow` walks the segments first (checking every seal with the
audit key) and then the stream after the archive's last entry.

Each entry is also a leaf of an RFC 9162 Merkle tree (:mod:`intake.audit.merkle`; the leaf is the
entry's canonical JSON line). After each segment the broker writes a **signed tree head**,
``sth-<size>.json``: the tree size, its root, the last entry (id, seq, seal), the Merkle frontier,
and an Ed25519 signature by the broker's signing key. :func:`verify_offline` checks a copy of the
archive with the public key alone (no audit key, no Redis): every segment readable and in order
with no gap, every tree head signed by a key in the keyring, its root recomputed from the entries,
and each head consistent with the one before (an RFC 9162 consistency proof).

Segments go through :class:`SegmentStore` (a local directory here, :class:`LocalDir`; an
S3-compatible bucket would be another implementation of the same four calls). Writes create new
objects only; nothing is ever rewritten in place.

What this does not protect: an archive someone deletes wholesale along with Redis's copy is gone
(keep the archive directory on storage with its own retention); third parties check integrity
and consistency, not that the broker's MACs hold (that needs the audit key: ``intake audit verify``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from intake.audit import merkle
from intake.core.models import canonical_json
from intake.protocol.tokens import Signer

SEGMENT_MAX = 50_000
_SEGMENT = re.compile(r"seg-(\d{12})-(\d{12})\.jsonl\.gz")
_STH = re.compile(r"sth-(\d{12})\.json")


class SegmentStore(Protocol):
    """Where archived segments and tree heads live: a flat namespace of named, create-only
    objects. Everything that touches the archive goes through these four calls (the archiver
    :func:`intake.audit.archiver.archive_due`, the chain walk and ``intake audit verify``
    through :class:`Archive`, and :func:`verify_offline`), so an S3-compatible bucket (objects
    created with ``If-None-Match: *``, a lock held as a lease object or by the sealer lease
    alone) is another implementation of the same calls. :class:`LocalDir` is the one shipped
    and tested."""

    def names(self) -> list[str]:
        """Every object's name, sorted ascending (names are fixed-width, so this is their order)."""
        ...

    def read(self, name: str) -> bytes:
        """The exact bytes stored under ``name`` (raises ``OSError`` when it is not there)."""
        ...

    def create(self, name: str, data: bytes) -> None:
        """Store ``data`` under a new ``name``, durably, all or nothing; refuses
        (``FileExistsError``) to replace an existing object."""
        ...

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Held while archiving: one archiver at a time."""
        ...


class LocalDir:
    """A :class:`SegmentStore` in a local directory (the default: ``$INTAKE_DATA_DIR/audit-archive``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if not p.name.startswith("."))

    def read(self, name: str) -> bytes:
        return (self.path / name).read_bytes()

    def create(self, name: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path / f".{name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, self.path / name)  # fails if the name exists: never overwritten
        finally:
            tmp.unlink()
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.path / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class TreeHead:
    """A signed tree head: the tree over entries ``1..size`` and the entry that ends it."""

    size: int
    root: bytes
    at: float
    last: str  # the Head of entry #size, "id seq seal"
    frontier: merkle.Frontier
    kid: str
    sig: bytes

    def body(self) -> bytes:
        return canonical_json({"v": 1, "size": self.size, "root": self.root.hex(), "at": self.at,
                               "last": self.last, "frontier": self.frontier.as_json(), "kid": self.kid})

    @classmethod
    def signed(cls, signer: Signer, frontier: merkle.Frontier, last: str, at: float) -> TreeHead:
        """A tree head over ``frontier``'s tree (whose last entry is ``last``) signed by ``signer``."""
        head = cls(size=frontier.size, root=frontier.root(), at=at, last=last,
                   frontier=merkle.Frontier(frontier.size, list(frontier.nodes)), kid=signer.kid, sig=b"")
        return replace(head, sig=signer.sign_bytes(head.body()))

    def as_json(self) -> dict[str, Any]:
        return {**json.loads(self.body()), "sig": base64.b64encode(self.sig).decode()}

    def encode(self) -> bytes:
        return canonical_json(self.as_json())

    @classmethod
    def decode(cls, raw: bytes) -> TreeHead:
        """Parse a tree head (raises ValueError, KeyError or TypeError when malformed; its
        signature is checked by :meth:`verify`)."""
        data = json.loads(raw)
        return cls.from_json(data)

    @classmethod
    def from_json(cls, data: Any) -> TreeHead:
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a tree head")
        return cls(size=int(data["size"]), root=bytes.fromhex(data["root"]), at=float(data["at"]),
                   last=str(data["last"]), frontier=merkle.Frontier.from_json(data["frontier"]),
                   kid=str(data["kid"]), sig=base64.b64decode(data["sig"], validate=True))

    def verify(self, keys: dict[str, Ed25519PublicKey]) -> bool:
        key = keys.get(self.kid)
        if key is None:
            return False
        try:
            key.verify(self.sig, self.body())
        except InvalidSignature:
            return False
        return self.frontier.size == self.size and self.frontier.root() == self.root


def entry_line(seq: int, stream_id: str, fields: dict[str, str], verdict: str, seal: str) -> bytes:
    """An archived entry's canonical line: also the Merkle leaf's data."""
    return canonical_json({"seq": seq, "id": stream_id, "f": fields, "verdict": verdict, "seal": seal})


def segment_name(first: int, last: int) -> str:
    return f"seg-{first:012d}-{last:012d}.jsonl.gz"


class ArchiveBroken(Exception):
    """The archive is not whole: a segment or tree head is missing, out of order or altered."""


class Archive:
    """The broker's side: read segments and tree heads back (for the chain walk); moving
    entries out is :func:`intake.audit.archiver.archive_due`."""

    def __init__(self, store: SegmentStore) -> None:
        self.store = store

    def tree_heads(self) -> list[str]:
        return [n for n in self.store.names() if _STH.fullmatch(n)]

    def segments(self) -> list[tuple[int, int, str]]:
        found = []
        for name in self.store.names():
            m = _SEGMENT.fullmatch(name)
            if m:
                found.append((int(m[1]), int(m[2]), name))
        return sorted(found)

    def newest_head(self, keys: dict[str, Ed25519PublicKey]) -> TreeHead | None:
        """The newest tree head (it must verify: the archive is the broker's own record)."""
        names = self.tree_heads()
        if not names:
            return None
        sth = TreeHead.decode(self.store.read(names[-1]))
        if not sth.verify(keys):
            raise ArchiveBroken(f"tree head {names[-1]} is not signed by the broker's key")
        return sth

    def entries(self) -> Iterator[tuple[int, str, dict[str, str], str, str]]:
        """Every archived entry in order: (seq, id, fields, verdict, seal). Raises
        :class:`ArchiveBroken` on a gap, an unreadable segment or a line out of place."""
        expected = 1
        for first, last, name in self.segments():
            if first != expected:
                raise ArchiveBroken(f"segment {name}: expected it to start at #{expected} (a segment is missing "
                                    "or out of order)")
            for line in read_segment(self.store.read(name), name):
                if line["seq"] != expected:
                    raise ArchiveBroken(f"segment {name}: entry #{line['seq']} where #{expected} belongs")
                yield expected, line["id"], line["f"], line["verdict"], line["seal"]
                expected += 1
            if expected != last + 1:
                raise ArchiveBroken(f"segment {name}: ends at #{expected - 1}, its name says #{last}")


def read_segment(raw: bytes, name: str) -> Iterator[dict[str, Any]]:
    try:
        text = gzip.decompress(raw)
    except (OSError, EOFError, ValueError) as exc:
        raise ArchiveBroken(f"segment {name}: not readable ({type(exc).__name__}: altered or truncated)") from None
    for line in text.splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            raise ArchiveBroken(f"segment {name}: a malformed line") from None
        if (not isinstance(data, dict) or canonical_json(data) != line or not isinstance(data.get("seq"), int)
                or not isinstance(data.get("f"), dict)):
            raise ArchiveBroken(f"segment {name}: a malformed line")
        yield data


@dataclass(frozen=True)
class OfflineReport:
    entries: int
    segments: int
    tree_heads: int
    problems: tuple[str, ...]


def verify_offline(store: SegmentStore, keys: dict[str, Ed25519PublicKey]) -> OfflineReport:
    """Check an archive with public keys only: segments whole and in order, every tree head
    signed by ``keys``, its root recomputed from the entries, each head consistent with the one
    before it (RFC 9162 consistency proof) and the last entry it names the entry at its size."""
    archive = Archive(store)
    problems: list[str] = []
    leaves: list[bytes] = []
    ids: list[str] = []
    try:
        for _seq, stream_id, _fields, _verdict, _seal in archive.entries():
            ids.append(stream_id)
        for _first, _last, name in archive.segments():
            leaves.extend(merkle.leaf_hash(canonical_json(line)) for line in read_segment(store.read(name), name))
    except ArchiveBroken as exc:
        problems.append(str(exc))
    heads = archive.tree_heads()
    previous: TreeHead | None = None
    for name in heads:
        try:
            sth = TreeHead.decode(store.read(name))
        except (ValueError, KeyError, TypeError):
            problems.append(f"tree head {name}: malformed")
            continue
        if f"sth-{sth.size:012d}.json" != name:
            problems.append(f"tree head {name}: says size {sth.size}")
        if not sth.verify(keys):
            problems.append(f"tree head {name}: signature does not verify with the given public key")
            continue
        if sth.size > len(leaves):
            problems.append(f"tree head {name}: covers {sth.size} entries, the segments hold {len(leaves)}")
            continue
        if merkle.root(leaves[:sth.size]) != sth.root:
            problems.append(f"tree head {name}: root does not match the entries (history altered)")
            continue
        if sth.last.split(" ")[0] != ids[sth.size - 1] or sth.last.split(" ")[1] != str(sth.size):
            problems.append(f"tree head {name}: its last entry is not entry #{sth.size}")
        if previous is not None:
            proof = merkle.consistency_proof(previous.size, leaves[:sth.size])
            if not merkle.verify_consistency(previous.size, sth.size, proof, previous.root, sth.root):
                problems.append(f"tree head {name}: not consistent with {previous.size}")
        previous = sth
    if previous is not None and previous.size != len(leaves) and not problems:
        problems.append(f"the newest tree head covers {previous.size} entries, the segments hold {len(leaves)}")
    return OfflineReport(entries=len(leaves), segments=len(archive.segments()), tree_heads=len(heads),
                         problems=tuple(problems))
