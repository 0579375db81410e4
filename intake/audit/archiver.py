"""Moving sealed history out of Redis into the archive (:mod:`intake.audit.archive`).

Run by the sealer lease holder (:meth:`intake.runtime.Broker.archive_due`): sealed entries older
than the hot window, and before the newest ledger snapshot's anchor, are checked against the seal
chain, written as a new segment, followed by a new signed tree head, and only then dropped from
Redis (a run that stops in between drops them on the next run).
"""

from __future__ import annotations

import gzip
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from intake.audit import archive as archive_mod
from intake.audit import merkle
from intake.audit.archive import Archive, ArchiveBroken, TreeHead, entry_line, segment_name
from intake.audit.log import GENESIS, AuditLog, Head
from intake.protocol.tokens import Signer


def archive_due(archive: Archive, audit: AuditLog, signer: Signer, keys: dict[str, Ed25519PublicKey], *, hot_s: float,
                below_seq: int, now: float | None = None, segment_max: int | None = None) -> int:
    """Move sealed entries older than ``hot_s`` (and before sealed position ``below_seq``,
    the ledger snapshot's anchor, which stays in Redis) into new segments, each followed by a
    signed tree head; then drop them from Redis. Returns how many moved."""
    cutoff_ms = int(((time.time() if now is None else now) - hot_s) * 1000)
    segment_max = segment_max or archive_mod.SEGMENT_MAX
    moved = 0
    with archive.store.locked():
        while True:
            sth = archive.newest_head(keys)
            tail = Head.decode(sth.last) if sth else None
            if tail is not None:
                audit.drop_archived(tail)  # a previous run may have stopped before this
            frontier = merkle.Frontier.from_json(sth.frontier.as_json()) if sth else merkle.Frontier()
            prev, seq = (tail.seal, tail.seq) if tail else (GENESIS, 0)
            lines: list[bytes] = []
            last: Head | None = None
            for stream_id, fields, stored in audit.redis_entries(f"({tail.id}" if tail else "-"):
                if len(lines) >= segment_max or seq + 1 >= below_seq:
                    break
                if int(stream_id.partition("-")[0]) >= cutoff_ms:
                    break
                checked = audit.check_sealed(prev, seq + 1, stream_id, fields, stored)
                if not isinstance(checked, str):
                    raise ArchiveBroken(f"not archiving past a break in the chain: {checked.message}")
                seq += 1
                prev = (stored or "").split(" ")[1]
                line = entry_line(seq, stream_id, fields, checked, prev)
                lines.append(line)
                frontier.append(merkle.leaf_hash(line))
                last = Head(stream_id, seq, prev)
            if last is None:
                return moved
            first = seq - len(lines) + 1
            archive.store.create(segment_name(first, seq), gzip.compress(b"".join(x + b"\n" for x in lines), 6))
            head = TreeHead.signed(signer, frontier, last.encode(), time.time())
            archive.store.create(f"sth-{head.size:012d}.json", head.encode())
            audit.drop_archived(last)
            moved += len(lines)
